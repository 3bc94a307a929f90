//! Preview prompts in kohya's prompt-file syntax:
//! `a photo of sks dog --w 512 --h 512 --d 42 --s 20 --g 3.5 --n blurry`.
//!
//! Options (case-insensitive, separated by ` --`): `w`/`h` size, `d` seed, `s` steps
//! (clamped to 1..=1000 like kohya), `g` distilled guidance, `l` true CFG scale with
//! the negative prompt `n` (kohya's Flux sampling: `scale`, default 1 = one pass),
//! `ss` the sampler: ours or A1111's names (`euler`, `euler_ancestral`, `heun`,
//! `dpmpp_2m`, `k_euler_a`, …) and kohya's `euler_a` and `dpmsolver++` (diffusers'
//! DPM-Solver++, second order multistep: our `dpmpp_2m`); a sampler we lack is an
//! error, not Euler in disguise. kohya's other options (`cn`, `ctr`, `rcfg`, `fs`)
//! are accepted and ignored.
//!
//! Must not: sample (the trainer turns a spec into a `SampleRequest`).

use crate::sample::generate::SampleRequest;
use crate::sample::samplers::Sampler;
use crate::sample::schedule::Scheduler;

/// kohya's `--ss` names that are not ours or A1111's, and the sampler each runs.
const KOHYA_SAMPLERS: [(&str, Sampler); 2] = [
    ("euler_a", Sampler::EulerAncestral),
    ("dpmsolver++", Sampler::Dpmpp2m),
];

/// One preview prompt with its options.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct PromptSpec {
    pub prompt: String,
    pub negative_prompt: String,
    pub width: Option<usize>,
    pub height: Option<usize>,
    pub seed: Option<u64>,
    pub steps: Option<usize>,
    pub guidance: Option<f64>,
    /// True CFG scale (`--l`).
    pub cfg_scale: Option<f64>,
    /// The sampler (`--ss`).
    pub sampler: Option<Sampler>,
}

impl PromptSpec {
    /// Parses one line; unparsable option values are errors naming the option.
    pub fn parse(line: &str) -> Result<Self, String> {
        let mut parts = line.split(" --");
        let prompt = parts.next().unwrap_or_default().trim().to_string();
        if prompt.is_empty() {
            return Err(format!("empty prompt in `{line}`"));
        }
        let mut spec = Self {
            prompt,
            ..Self::default()
        };
        for part in parts {
            let (key, value) = part.split_once(' ').unwrap_or((part, ""));
            let value = value.trim();
            let num = |what: &str| format!("--{key} needs {what}, got `{value}` in `{line}`");
            match key.to_ascii_lowercase().as_str() {
                "w" => spec.width = Some(value.parse().map_err(|_| num("a whole number"))?),
                "h" => spec.height = Some(value.parse().map_err(|_| num("a whole number"))?),
                "d" => spec.seed = Some(value.parse().map_err(|_| num("a whole number"))?),
                "s" => {
                    let s: usize = value.parse().map_err(|_| num("a whole number"))?;
                    spec.steps = Some(s.clamp(1, 1000));
                }
                "g" => spec.guidance = Some(value.parse().map_err(|_| num("a number"))?),
                "l" => spec.cfg_scale = Some(value.parse().map_err(|_| num("a number"))?),
                "n" => spec.negative_prompt = value.to_string(),
                "ss" => {
                    let kohya = KOHYA_SAMPLERS
                        .iter()
                        .find(|(name, _)| name.eq_ignore_ascii_case(value))
                        .map(|(_, s)| *s);
                    let sampler = match kohya {
                        Some(s) => s,
                        None => value
                            .parse::<Sampler>()
                            .map_err(|e| format!("--ss: {e} in `{line}`"))?,
                    };
                    spec.sampler = Some(sampler);
                }
                "cn" | "ctr" | "rcfg" | "fs" => {}
                other => return Err(format!("unknown prompt option `--{other}` in `{line}`")),
            }
        }
        Ok(spec)
    }

    /// The sample request for this prompt; `default_seed` when no `--d` was given.
    pub(crate) fn request(&self, default_seed: u64) -> SampleRequest {
        SampleRequest {
            prompt: self.prompt.clone(),
            negative_prompt: self.negative_prompt.clone(),
            width: self.width,
            height: self.height,
            steps: self.steps,
            guidance: self.guidance,
            cfg_scale: self.cfg_scale,
            init_image: None,
            denoise: None,
            seed: self.seed.unwrap_or(default_seed),
            sampler: self.sampler.unwrap_or_default(),
            scheduler: Scheduler::default(),
            batch_size: 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kohya_options() {
        let p = PromptSpec::parse(
            "a sks dog, park --w 512 --H 384 --d 7 --s 2000 --l 3.5 --n blurry, bad",
        )
        .unwrap();
        assert_eq!(p.prompt, "a sks dog, park");
        assert_eq!(
            (p.width, p.height, p.seed, p.steps),
            (Some(512), Some(384), Some(7), Some(1000))
        );
        assert_eq!((p.guidance, p.cfg_scale), (None, Some(3.5)));
        assert_eq!(p.negative_prompt, "blurry, bad");
        let g = PromptSpec::parse("x --l 7 --g 2.5 --ss euler").unwrap();
        assert_eq!((g.guidance, g.cfg_scale), (Some(2.5), Some(7.0)));
        assert_eq!(g.request(1).cfg_scale, Some(7.0));
        assert_eq!(g.request(1).sampler, Sampler::Euler);
        for (ss, sampler) in [
            ("euler_a", Sampler::EulerAncestral),
            ("K_EULER_A", Sampler::EulerAncestral),
            ("heun", Sampler::Heun),
            ("dpmsolver++", Sampler::Dpmpp2m),
            ("dpmpp_2m", Sampler::Dpmpp2m),
        ] {
            let p = PromptSpec::parse(&format!("x --ss {ss} --s 4")).unwrap();
            assert_eq!(p.request(1).sampler, sampler, "{ss}");
            assert_eq!(p.steps, Some(4));
        }
        assert_eq!(
            PromptSpec::parse("x").unwrap().request(1).sampler,
            Sampler::Euler
        );
    }

    #[test]
    fn bad_options_are_errors() {
        assert!(PromptSpec::parse("x --w big").unwrap_err().contains("--w"));
        assert!(PromptSpec::parse("x --zz 1").unwrap_err().contains("--zz"));
        let e = PromptSpec::parse("x --ss ddim").unwrap_err();
        assert!(e.contains("--ss") && e.contains("euler_ancestral"), "{e}");
        assert!(PromptSpec::parse(" --w 64").is_err());
    }
}
