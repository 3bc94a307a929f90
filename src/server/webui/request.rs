//! The txt2img request as A1111 takes it (`StableDiffusionTxt2ImgProcessingAPI`:
//! the fields of its `StableDiffusionProcessing` and `…Txt2Img` classes plus the
//! API's own, with their defaults, and Forge's `distilled_cfg_scale`), and the
//! [`Plan`] it becomes.
//!
//! What is served and what is refused (422 naming the field):
//! - guidance, as Forge does it for Flux: `distilled_cfg_scale` is Flux's distilled
//!   guidance (3.5 when absent); `cfg_scale` 1 is a single pass, above 1 true CFG
//!   with the negative prompt (two passes per step). A1111's default 7, which
//!   `webuiapi` sends untouched, is true CFG at 7, as in Forge: send 1 for the
//!   distilled model's one pass.
//! - sampler (`sampler_name`, else `sampler_index`): `Euler`, `Euler a`, `Heun`,
//!   `DPM++ 2M` and their `k_…` aliases, each run as its rectified-flow form
//!   (`sample::samplers`); schedulers (names or labels) `automatic`, `simple` and
//!   `normal` run Flux's shifted schedule, `beta` the beta schedule
//!   (`sample::schedule`). The names come from the tables there.
//! - sizes must be multiples of 16 (Flux packs 2×2 latent patches; A1111 would
//!   round to 8): others are refused, not rounded.
//! - `seed` −1 is random (below 2³², as A1111 draws); image i of the whole run
//!   uses seed + i (`n_iter` batches of `batch_size`).
//! - features we lack, at a value other than their default, are refused: hires fix
//!   (`enable_hr`), `restore_faces`, `tiling`, `script_name`, `alwayson_scripts`,
//!   variation seeds (`subseed_strength`, `seed_resize_from_*`), `styles`, a
//!   refiner, `firstpass_image`, `infotext`, and another model in
//!   `override_settings.sd_model_checkpoint`. The sampler knobs (`eta`, `s_*`),
//!   saving flags and `override_settings` otherwise are accepted and ignored;
//!   fields A1111 does not know are ignored too (pydantic's default), logged.
//!
//! Must not: touch the engine or HTTP; the handler submits the plan.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::errors::WebuiError;
use super::lora_tags::{self, LoraTag};
use crate::engine::{LoraChoice, SampleJob};
use crate::sample::generate::{SampleRequest, MAX_BATCH, SIZE_MULTIPLE};
use crate::sample::samplers::{Sampler, A1111_SAMPLERS};
use crate::sample::schedule::{Scheduler, A1111_SCHEDULERS};

/// `cfg_scale`'s A1111 default.
const A1111_DEFAULT_CFG: f64 = 7.0;
/// Flux's distilled guidance when `distilled_cfg_scale` is absent (Forge's default).
pub(super) const FORGE_DISTILLED_CFG: f64 = 3.5;
/// The most batches one request may ask for.
const MAX_ITERATIONS: i64 = 64;
/// A random seed is below this, as A1111 draws them (`random.randrange(4294967294)`).
const RANDOM_SEED_BOUND: u64 = 4_294_967_294;

/// A1111's txt2img request, every field with A1111's default.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct Txt2ImgRequest {
    pub prompt: String,
    pub negative_prompt: String,
    pub styles: Vec<String>,
    pub seed: i64,
    pub subseed: i64,
    pub subseed_strength: f64,
    pub seed_resize_from_h: i64,
    pub seed_resize_from_w: i64,
    pub sampler_name: Option<String>,
    pub scheduler: Option<String>,
    pub batch_size: i64,
    pub n_iter: i64,
    pub steps: i64,
    pub cfg_scale: f64,
    /// Forge: Flux's distilled guidance.
    pub distilled_cfg_scale: f64,
    pub width: i64,
    pub height: i64,
    pub restore_faces: Option<bool>,
    pub tiling: Option<bool>,
    pub do_not_save_samples: bool,
    pub do_not_save_grid: bool,
    pub eta: Option<f64>,
    pub denoising_strength: Option<f64>,
    pub s_min_uncond: Option<f64>,
    pub s_churn: Option<f64>,
    pub s_tmax: Option<f64>,
    pub s_tmin: Option<f64>,
    pub s_noise: Option<f64>,
    pub override_settings: Map<String, Value>,
    pub override_settings_restore_afterwards: bool,
    pub refiner_checkpoint: Option<String>,
    pub refiner_switch_at: Option<f64>,
    pub disable_extra_networks: bool,
    pub firstpass_image: Option<String>,
    pub comments: Option<Map<String, Value>>,
    pub enable_hr: bool,
    pub firstphase_width: i64,
    pub firstphase_height: i64,
    pub hr_scale: f64,
    pub hr_upscaler: Option<String>,
    pub hr_second_pass_steps: i64,
    pub hr_resize_x: i64,
    pub hr_resize_y: i64,
    pub hr_checkpoint_name: Option<String>,
    pub hr_sampler_name: Option<String>,
    pub hr_scheduler: Option<String>,
    pub hr_prompt: String,
    pub hr_negative_prompt: String,
    /// Forge's hires-fix guidance.
    pub hr_cfg: f64,
    pub hr_distilled_cfg: f64,
    pub hr_additional_modules: Option<Vec<Value>>,
    pub force_task_id: Option<String>,
    pub sampler_index: String,
    pub script_name: Option<String>,
    pub script_args: Vec<Value>,
    pub send_images: bool,
    pub save_images: bool,
    pub alwayson_scripts: Map<String, Value>,
    pub infotext: Option<String>,
    /// Fields A1111 does not know: ignored.
    #[serde(flatten, skip_serializing)]
    pub unknown: Map<String, Value>,
}

impl Default for Txt2ImgRequest {
    fn default() -> Self {
        Self {
            prompt: String::new(),
            negative_prompt: String::new(),
            styles: vec![],
            seed: -1,
            subseed: -1,
            subseed_strength: 0.0,
            seed_resize_from_h: -1,
            seed_resize_from_w: -1,
            sampler_name: None,
            scheduler: None,
            batch_size: 1,
            n_iter: 1,
            steps: 50,
            cfg_scale: A1111_DEFAULT_CFG,
            distilled_cfg_scale: FORGE_DISTILLED_CFG,
            width: 512,
            height: 512,
            restore_faces: None,
            tiling: None,
            do_not_save_samples: false,
            do_not_save_grid: false,
            eta: None,
            denoising_strength: None,
            s_min_uncond: None,
            s_churn: None,
            s_tmax: None,
            s_tmin: None,
            s_noise: None,
            override_settings: Map::new(),
            override_settings_restore_afterwards: true,
            refiner_checkpoint: None,
            refiner_switch_at: None,
            disable_extra_networks: false,
            firstpass_image: None,
            comments: None,
            enable_hr: false,
            firstphase_width: 0,
            firstphase_height: 0,
            hr_scale: 2.0,
            hr_upscaler: None,
            hr_second_pass_steps: 0,
            hr_resize_x: 0,
            hr_resize_y: 0,
            hr_checkpoint_name: None,
            hr_sampler_name: None,
            hr_scheduler: None,
            hr_prompt: String::new(),
            hr_negative_prompt: String::new(),
            hr_cfg: 1.0,
            hr_distilled_cfg: FORGE_DISTILLED_CFG,
            hr_additional_modules: None,
            force_task_id: None,
            sampler_index: "Euler".into(),
            script_name: None,
            script_args: vec![],
            send_images: true,
            save_images: false,
            alwayson_scripts: Map::new(),
            infotext: None,
            unknown: Map::new(),
        }
    }
}

/// Parses a request body. A `null` field takes its default (A1111's fields are
/// all optional); errors are FastAPI's validation errors.
pub(super) fn parse(body: &[u8]) -> Result<Txt2ImgRequest, WebuiError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| WebuiError::Validation {
        loc: vec!["body".into(), e.column().into()],
        msg: format!("JSON decode error: {e}"),
        kind: "json_invalid",
    })?;
    let Value::Object(mut fields) = value else {
        return Err(WebuiError::Validation {
            loc: vec!["body".into()],
            msg: "Input should be a valid dictionary or object".into(),
            kind: "model_attributes_type",
        });
    };
    fields.retain(|_, v| !v.is_null());
    let request: Txt2ImgRequest =
        serde_path_to_error::deserialize(Value::Object(fields)).map_err(|e| {
            let mut loc: Vec<Value> = vec!["body".into()];
            loc.extend(
                e.path()
                    .to_string()
                    .split('.')
                    .filter(|s| !s.is_empty())
                    .map(Value::from),
            );
            WebuiError::Validation {
                loc,
                msg: e.inner().to_string(),
                kind: "type_error",
            }
        })?;
    if !request.unknown.is_empty() {
        let keys: Vec<&String> = request.unknown.keys().collect();
        tracing::debug!(?keys, "txt2img: fields A1111 does not know, ignored");
    }
    Ok(request)
}

/// What the daemon knows that a plan needs.
pub(super) struct Context<'a> {
    /// The LoRA folder's `.safetensors` file names.
    pub lora_files: &'a [String],
    /// Names the loaded model answers to in `sd_model_checkpoint`.
    pub model_names: &'a [String],
}

/// A checked request: what to sample, in `n_iter` engine jobs.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Plan {
    /// As given, LoRA tags and all (what A1111's `info.prompt` reports).
    pub prompt: String,
    /// Without the LoRA tags: what the model sees.
    pub model_prompt: String,
    pub negative_prompt: String,
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    pub guidance: f64,
    /// True CFG scale (1: one pass).
    pub cfg_scale: f64,
    pub sampler: Sampler,
    pub scheduler: Scheduler,
    pub seed: u64,
    pub subseed: i64,
    pub batch_size: usize,
    pub n_iter: usize,
    /// (file name in the LoRA folder, strength).
    pub loras: Vec<(String, f64)>,
    pub send_images: bool,
}

impl Plan {
    /// The engine job of batch `iteration`: its first image's seed is
    /// seed + iteration × batch_size.
    pub(super) fn job(&self, iteration: usize) -> SampleJob {
        SampleJob {
            request: SampleRequest {
                prompt: self.model_prompt.clone(),
                negative_prompt: self.negative_prompt.clone(),
                width: Some(self.width),
                height: Some(self.height),
                steps: Some(self.steps),
                guidance: Some(self.guidance),
                cfg_scale: Some(self.cfg_scale),
                init_image: None,
                denoise: None,
                seed: self.seed.wrapping_add((iteration * self.batch_size) as u64),
                sampler: self.sampler,
                scheduler: self.scheduler,
                batch_size: self.batch_size,
            },
            loras: self
                .loras
                .iter()
                .map(|(file, strength)| LoraChoice {
                    path: Some(file.into()),
                    live_job: None,
                    strength: *strength,
                })
                .collect(),
        }
    }

    /// Every image's seed, in order.
    pub(super) fn all_seeds(&self) -> Vec<u64> {
        (0..self.batch_size * self.n_iter)
            .map(|i| self.seed.wrapping_add(i as u64))
            .collect()
    }
}

/// A positive count from an A1111 integer field.
fn count(field: &str, value: i64, max: i64) -> Result<usize, WebuiError> {
    if !(1..=max).contains(&value) {
        return Err(WebuiError::field(
            field,
            format!("must be between 1 and {max}, got {value}"),
        ));
    }
    Ok(value as usize)
}

/// `field` must be `ok`; otherwise "`what` is not supported".
fn unsupported(field: &str, ok: bool, what: &str) -> Result<(), WebuiError> {
    if ok {
        Ok(())
    } else {
        Err(WebuiError::field(
            field,
            format!("{what} is not supported by this daemon; leave `{field}` at its default"),
        ))
    }
}

fn is_unset(s: &Option<String>) -> bool {
    s.as_deref().is_none_or(|s| s.is_empty() || s == "None")
}

impl Txt2ImgRequest {
    /// Checks every field and resolves the LoRA tags; `random_seed` draws the seed
    /// when `seed` is −1 (and the subseed likewise).
    pub(super) fn plan(
        &self,
        ctx: &Context,
        random_seed: &mut dyn FnMut() -> u64,
    ) -> Result<Plan, WebuiError> {
        unsupported("enable_hr", !self.enable_hr, "hires fix")?;
        unsupported(
            "restore_faces",
            self.restore_faces != Some(true),
            "face restoration",
        )?;
        unsupported("tiling", self.tiling != Some(true), "tiling")?;
        unsupported("script_name", is_unset(&self.script_name), "scripts")?;
        unsupported(
            "alwayson_scripts",
            self.alwayson_scripts.is_empty(),
            "always-on scripts (extensions)",
        )?;
        unsupported(
            "subseed_strength",
            self.subseed_strength == 0.0,
            "variation seeds",
        )?;
        unsupported(
            "seed_resize_from_h",
            self.seed_resize_from_h <= 0,
            "resizing the seed",
        )?;
        unsupported(
            "seed_resize_from_w",
            self.seed_resize_from_w <= 0,
            "resizing the seed",
        )?;
        unsupported("styles", self.styles.is_empty(), "prompt styles")?;
        unsupported(
            "refiner_checkpoint",
            is_unset(&self.refiner_checkpoint),
            "a refiner",
        )?;
        unsupported(
            "firstpass_image",
            self.firstpass_image.is_none(),
            "a first-pass image",
        )?;
        unsupported(
            "infotext",
            self.infotext.as_deref().is_none_or(str::is_empty),
            "taking parameters from an infotext",
        )?;
        for (key, value) in &self.override_settings {
            if key == "sd_model_checkpoint" {
                let asked = value.as_str().unwrap_or_default();
                if !ctx.model_names.iter().any(|m| m == asked) {
                    return Err(WebuiError::field(
                        "override_settings.sd_model_checkpoint",
                        format!(
                            "the daemon serves one model ({}); it cannot switch to {value}",
                            ctx.model_names.first().map_or("", String::as_str)
                        ),
                    ));
                }
            } else {
                tracing::debug!(key, "txt2img: override setting ignored");
            }
        }

        let guidance = self.guidance()?;
        let sampler = self.sampler()?;
        let scheduler = self.schedule()?;
        let size = |field: &str, v: i64| -> Result<usize, WebuiError> {
            if v <= 0 || v % SIZE_MULTIPLE as i64 != 0 {
                return Err(WebuiError::field(
                    field,
                    format!(
                        "must be a positive multiple of {SIZE_MULTIPLE} (Flux packs 2×2 latent patches; A1111 would round to 8), got {v}"
                    ),
                ));
            }
            Ok(v as usize)
        };
        let (width, height) = (size("width", self.width)?, size("height", self.height)?);
        let steps = count("steps", self.steps, i64::MAX)?;
        let batch_size = count("batch_size", self.batch_size, MAX_BATCH as i64)?;
        let n_iter = count("n_iter", self.n_iter, MAX_ITERATIONS)?;
        let seed = match self.seed {
            -1 => random_seed() % RANDOM_SEED_BOUND,
            s if s < 0 => {
                return Err(WebuiError::field(
                    "seed",
                    format!("must be −1 (random) or ≥ 0, got {s}"),
                ))
            }
            s => s as u64,
        };
        let subseed = match self.subseed {
            -1 => (random_seed() % RANDOM_SEED_BOUND) as i64,
            s => s,
        };

        let (model_prompt, tags) =
            lora_tags::split(&self.prompt).map_err(|e| WebuiError::field("prompt", e.0))?;
        let loras = if self.disable_extra_networks {
            vec![]
        } else {
            tags.iter()
                .map(|tag| resolve(tag, ctx.lora_files))
                .collect::<Result<_, _>>()?
        };
        Ok(Plan {
            prompt: self.prompt.clone(),
            model_prompt,
            negative_prompt: self.negative_prompt.clone(),
            width,
            height,
            steps,
            guidance,
            cfg_scale: self.cfg_scale,
            sampler,
            scheduler,
            seed,
            subseed,
            batch_size,
            n_iter,
            loras,
            send_images: self.send_images,
        })
    }

    /// Flux's distilled guidance; `cfg_scale` is checked with the rest of the
    /// sampling request (0 to 100).
    fn guidance(&self) -> Result<f64, WebuiError> {
        if self.cfg_scale == A1111_DEFAULT_CFG {
            tracing::debug!(
                "txt2img: cfg_scale 7 (A1111's default): true CFG, two passes per step"
            );
        }
        Ok(self.distilled_cfg_scale)
    }

    fn sampler(&self) -> Result<Sampler, WebuiError> {
        let (field, name) = match &self.sampler_name {
            Some(name) if !name.is_empty() => ("sampler_name", name.as_str()),
            _ => ("sampler_index", self.sampler_index.as_str()),
        };
        Sampler::from_a1111_name(name).ok_or_else(|| {
            let names: Vec<&str> = A1111_SAMPLERS.iter().map(|n| n.a1111_name).collect();
            WebuiError::field(
                field,
                format!(
                    "sampler `{name}` is not available; accepted: {}",
                    names.join(", ")
                ),
            )
        })
    }

    fn schedule(&self) -> Result<Scheduler, WebuiError> {
        let Some(name) = self.scheduler.as_deref().filter(|s| !s.is_empty()) else {
            return Ok(Scheduler::default());
        };
        Scheduler::from_a1111_name(name).ok_or_else(|| {
            let names: Vec<&str> = A1111_SCHEDULERS.iter().map(|n| n.a1111_name).collect();
            WebuiError::field(
                "scheduler",
                format!(
                    "scheduler `{name}` is not available; accepted: {}",
                    names.join(", ")
                ),
            )
        })
    }
}

/// The LoRA folder file a tag names, or an error listing the closest names.
fn resolve(tag: &LoraTag, files: &[String]) -> Result<(String, f64), WebuiError> {
    match lora_tags::find(&tag.name, files) {
        Some(file) => Ok((file.to_string(), tag.multiplier)),
        None => {
            let closest = lora_tags::closest(&tag.name, files, 3);
            let hint = if closest.is_empty() {
                "the LoRA folder has none".to_string()
            } else {
                format!("closest: {}", closest.join(", "))
            };
            Err(WebuiError::field(
                "prompt",
                format!("no LoRA named `{}` in the LoRA folder ({hint})", tag.name),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ctx_plan(body: Value) -> Result<Plan, WebuiError> {
        let files = vec!["style.safetensors".to_string()];
        let models = vec!["tiny".to_string()];
        let ctx = Context {
            lora_files: &files,
            model_names: &models,
        };
        parse(body.to_string().as_bytes())?.plan(&ctx, &mut || 4_294_967_300)
    }

    fn refused_field(body: Value) -> String {
        match ctx_plan(body) {
            Err(WebuiError::Unprocessable { field, .. }) => field,
            other => panic!("not refused: {other:?}"),
        }
    }

    #[test]
    fn defaults_plan_one_pass_with_forge_guidance() {
        let plan = ctx_plan(json!({"prompt": "a <lora:style:0.5> cat", "width": 64, "height": 48}))
            .unwrap();
        assert_eq!(plan.model_prompt, "a cat");
        assert_eq!(plan.loras, [("style.safetensors".to_string(), 0.5)]);
        assert_eq!(plan.guidance, 3.5);
        assert_eq!(plan.steps, 50);
        assert_eq!(plan.seed, 6, "random seeds stay below 2³² − 2");
        assert_eq!((plan.width, plan.height), (64, 48));
        let plan = ctx_plan(json!({"seed": 10, "batch_size": 2, "n_iter": 3, "cfg_scale": 1, "distilled_cfg_scale": 2.0})).unwrap();
        assert_eq!(plan.all_seeds(), [10, 11, 12, 13, 14, 15]);
        assert_eq!(plan.job(2).request.seed, 14);
        assert_eq!(plan.guidance, 2.0);
    }

    #[test]
    fn features_we_lack_are_refused_by_field() {
        for (body, field) in [
            (json!({"enable_hr": true}), "enable_hr"),
            (json!({"restore_faces": true}), "restore_faces"),
            (json!({"tiling": true}), "tiling"),
            (json!({"script_name": "x/y/z plot"}), "script_name"),
            (
                json!({"alwayson_scripts": {"ControlNet": {"args": []}}}),
                "alwayson_scripts",
            ),
            (json!({"subseed_strength": 0.5}), "subseed_strength"),
            (json!({"styles": ["s"]}), "styles"),
            (json!({"sampler_name": "DPM++ 2M Karras"}), "sampler_name"),
            (json!({"sampler_index": "LMS"}), "sampler_index"),
            (json!({"sampler_name": "dpmpp_2m"}), "sampler_name"),
            (json!({"scheduler": "karras"}), "scheduler"),
            (json!({"width": 520}), "width"),
            (json!({"seed": -2}), "seed"),
            (json!({"n_iter": 0}), "n_iter"),
            (json!({"prompt": "<lora:styel:1>"}), "prompt"),
            (
                json!({"override_settings": {"sd_model_checkpoint": "sdxl"}}),
                "override_settings.sd_model_checkpoint",
            ),
        ] {
            assert_eq!(refused_field(body.clone()), field, "{body}");
        }
        let Err(e) = ctx_plan(json!({"prompt": "<lora:styel:1>"})) else {
            panic!()
        };
        assert!(e.to_string().contains("closest: style"), "{e}");
        // True CFG is planned, not refused (its range is the sampling core's check).
        assert_eq!(ctx_plan(json!({"cfg_scale": 4.5})).unwrap().cfg_scale, 4.5);
    }

    #[test]
    fn a1111_aliases_nulls_and_unknown_fields_are_accepted() {
        let plan = ctx_plan(json!({
            "sampler_name": null, "sampler_index": "k_euler_a", "scheduler": "Simple",
            "seed": null, "hr_upscaler": "Latent", "eta": 1.0, "s_noise": 1,
            "override_settings": {"sd_model_checkpoint": "tiny", "CLIP_stop_at_last_layers": 2},
            "a_field_from_the_future": [1, 2],
        }));
        let plan = plan.unwrap();
        assert_eq!(
            (plan.sampler, plan.scheduler),
            (Sampler::EulerAncestral, Scheduler::Simple)
        );
        let plan = ctx_plan(json!({"sampler_name": "DPM++ 2M", "scheduler": "beta"})).unwrap();
        assert_eq!(
            (plan.sampler, plan.scheduler),
            (Sampler::Dpmpp2m, Scheduler::Beta)
        );
        assert_eq!(plan.job(0).request.sampler, Sampler::Dpmpp2m);
        assert_eq!(plan.job(0).request.scheduler, Scheduler::Beta);
        let plan = ctx_plan(json!({"sampler_index": "k_heun", "scheduler": "Automatic"})).unwrap();
        assert_eq!(
            (plan.sampler, plan.scheduler),
            (Sampler::Heun, Scheduler::Simple)
        );
        let Err(e) = ctx_plan(json!({"scheduler": "karras"})) else {
            panic!()
        };
        assert!(
            e.to_string().contains("automatic, simple, normal, beta"),
            "{e}"
        );
        let Err(e) = ctx_plan(json!({"sampler_name": "LMS"})) else {
            panic!()
        };
        assert!(
            e.to_string().contains("Euler, Euler a, Heun, DPM++ 2M"),
            "{e}"
        );
        let bad = parse(br#"{"steps": "many"}"#);
        assert!(
            matches!(bad, Err(WebuiError::Validation { ref loc, .. }) if loc == &[json!("body"), json!("steps")]),
            "{bad:?}"
        );
        assert!(matches!(
            parse(b"{nope"),
            Err(WebuiError::Validation { .. })
        ));
        assert!(matches!(parse(b"[1]"), Err(WebuiError::Validation { .. })));
        let echoed = serde_json::to_value(parse(br#"{"x": 1}"#).unwrap()).unwrap();
        assert_eq!(echoed["sampler_index"], "Euler");
        assert_eq!(echoed["cfg_scale"], 7.0);
        assert!(echoed.get("x").is_none() && echoed.get("unknown").is_none());
    }
}
