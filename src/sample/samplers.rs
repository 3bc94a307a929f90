//! The flow-matching samplers, chosen by name ([`Sampler`]), in the forms
//! ComfyUI's k-diffusion samplers take for a rectified-flow model such as Flux
//! (sigma = t, x_t = (1 − t)·x0 + t·noise, the model predicts the velocity v, so
//! the denoised prediction is D = x − t·v):
//!
//! - `euler`: x ← x + (t_next − t)·v.
//! - `euler_ancestral`: ComfyUI's rectified-flow Euler a (`sample_euler_ancestral_RF`,
//!   eta = 1, s_noise = 1): an Euler step down to t_down = t_next²/t, then the
//!   signal scaled back to t_next's, (1 − t_next)/(1 − t_down), and fresh noise
//!   added to make up t_next's noise level; the last step (t_next = 0) is x ← D.
//! - `heun`: an Euler predictor to t_next and the trapezoid corrector with the
//!   velocity there (two model passes per step); the last step is plain Euler.
//! - `dpmpp_2m`: DPM-Solver++(2M) in ComfyUI's sigma form (λ = −ln t, which is 0
//!   at t = 1): x ← (t_next/t)·x + (1 − t_next/t)·D′, where D′ = D on the first
//!   step and (1 + 1/2r)·D − (1/2r)·D_prev after, r = h_prev/h with
//!   h = ln(t/t_next); the last step (t_next = 0, λ = ∞) is exactly x ← D.
//!
//! Ancestral noise comes from a [`NoiseSource`]; [`SeededNoise`] draws it from
//! the request's seed, one stream per image of the batch, so a request gives the
//! same image every time and image i of a batch equals seed + i sampled alone.
//!
//! Must not: know about Flux, schedules or requests; the caller brings the
//! velocity model and the times.

use candle_core::{Result, Tensor};
use serde::{Deserialize, Serialize};

use super::velocity::Velocity;
use crate::model::seeded::SeededRng;

/// Progress of one step, reported after the step is taken.
#[derive(Clone, Copy, Debug)]
pub struct StepInfo {
    /// 1-based step index.
    pub step: usize,
    pub total: usize,
    pub t: f64,
}

/// Where ancestral samplers draw fresh noise.
pub trait NoiseSource {
    /// Standard normal noise shaped like `x`, in its dtype, on its device.
    fn standard_normal(&mut self, x: &Tensor) -> Result<Tensor>;
}

/// Noise from seeded streams, one per batch element (the first dimension).
pub struct SeededNoise {
    streams: Vec<SeededRng>,
}

impl SeededNoise {
    /// One stream per image, derived from that image's seed.
    pub fn new(seeds: impl IntoIterator<Item = u64>) -> Self {
        Self {
            streams: seeds
                .into_iter()
                .map(|seed| SeededRng::for_name(seed, "ancestral-noise"))
                .collect(),
        }
    }
}

impl NoiseSource for SeededNoise {
    fn standard_normal(&mut self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims();
        if dims.first() != Some(&self.streams.len()) {
            candle_core::bail!(
                "ancestral noise for {} images asked for a batch of shape {dims:?}",
                self.streams.len()
            );
        }
        let mut one = dims.to_vec();
        one[0] = 1;
        let parts = self
            .streams
            .iter_mut()
            .map(|rng| rng.randn(one.as_slice(), x.device()))
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&parts, 0)?.to_dtype(x.dtype())
    }
}

/// A sampler, chosen by name (ComfyUI's sampler names).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema,
)]
pub enum Sampler {
    #[default]
    #[serde(rename = "euler")]
    Euler,
    #[serde(rename = "euler_ancestral")]
    EulerAncestral,
    #[serde(rename = "heun")]
    Heun,
    #[serde(rename = "dpmpp_2m")]
    Dpmpp2m,
}

/// A name that is no sampler (or no schedule): what was asked and what is accepted.
#[derive(Debug, thiserror::Error)]
#[error("unknown {what} `{name}`; accepted: {accepted}")]
pub struct UnknownName {
    pub what: &'static str,
    pub name: String,
    pub accepted: String,
}

impl std::str::FromStr for Sampler {
    type Err = UnknownName;

    /// Our names and A1111's (see [`Sampler::from_name`]).
    fn from_str(name: &str) -> std::result::Result<Self, UnknownName> {
        Self::from_name(name).ok_or_else(|| UnknownName {
            what: "sampler",
            name: name.to_string(),
            accepted: Self::ALL.map(Sampler::name).join(", "),
        })
    }
}

/// A sampler's A1111 name (its `/samplers` entry and infotext `Sampler`) and the
/// aliases A1111 also accepts.
#[derive(Clone, Copy, Debug)]
pub struct SamplerNames {
    pub sampler: Sampler,
    pub a1111_name: &'static str,
    pub a1111_aliases: &'static [&'static str],
}

/// A1111's names for our samplers (`modules/sd_samplers_kdiffusion.py`).
pub const A1111_SAMPLERS: [SamplerNames; 4] = [
    SamplerNames {
        sampler: Sampler::Euler,
        a1111_name: "Euler",
        a1111_aliases: &["k_euler"],
    },
    SamplerNames {
        sampler: Sampler::EulerAncestral,
        a1111_name: "Euler a",
        a1111_aliases: &["k_euler_a", "k_euler_ancestral"],
    },
    SamplerNames {
        sampler: Sampler::Heun,
        a1111_name: "Heun",
        a1111_aliases: &["k_heun"],
    },
    SamplerNames {
        sampler: Sampler::Dpmpp2m,
        a1111_name: "DPM++ 2M",
        a1111_aliases: &["k_dpmpp_2m"],
    },
];

impl Sampler {
    /// Every sampler, in the order lists show them.
    pub const ALL: [Sampler; 4] = [
        Sampler::Euler,
        Sampler::EulerAncestral,
        Sampler::Heun,
        Sampler::Dpmpp2m,
    ];

    /// Our (and ComfyUI's) name: `euler`, `euler_ancestral`, `heun`, `dpmpp_2m`.
    pub fn name(self) -> &'static str {
        match self {
            Sampler::Euler => "euler",
            Sampler::EulerAncestral => "euler_ancestral",
            Sampler::Heun => "heun",
            Sampler::Dpmpp2m => "dpmpp_2m",
        }
    }

    /// A1111's name, as its infotexts write `Sampler`.
    pub fn a1111_name(self) -> &'static str {
        A1111_SAMPLERS
            .iter()
            .find(|n| n.sampler == self)
            .map_or(self.name(), |n| n.a1111_name)
    }

    /// The sampler a name means: ours, or an A1111 name or alias (any case).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|s| s.name().eq_ignore_ascii_case(name))
            .or_else(|| Self::from_a1111_name(name))
    }

    /// The sampler an A1111 name or alias means (any case, as A1111 matches
    /// aliases): exactly the names of [`A1111_SAMPLERS`].
    pub fn from_a1111_name(name: &str) -> Option<Self> {
        A1111_SAMPLERS
            .iter()
            .find(|n| {
                n.a1111_name.eq_ignore_ascii_case(name)
                    || n.a1111_aliases.iter().any(|a| a.eq_ignore_ascii_case(name))
            })
            .map(|n| n.sampler)
    }

    /// Integrates the flow from `x` at `times[0]` through every time in `times`
    /// (decreasing, ending at 0 for a finished image). `on_step` sees each step's
    /// x (previews) and may stop sampling by returning an error (cancellation).
    pub fn run(
        self,
        model: &dyn Velocity,
        x: Tensor,
        times: &[f64],
        noise: &mut dyn NoiseSource,
        on_step: &mut dyn FnMut(StepInfo, &Tensor) -> Result<()>,
    ) -> Result<Tensor> {
        let mut x = x;
        let total = times.len().saturating_sub(1);
        // DPM++ 2M: the previous step's time and denoised prediction.
        let mut previous: Option<(f64, Tensor)> = None;
        for (i, pair) in times.windows(2).enumerate() {
            let (t, t_next) = (pair[0], pair[1]);
            let v = model.velocity(&x, t)?.to_dtype(x.dtype())?;
            x = match self {
                Sampler::Euler => (&x + (v * (t_next - t))?)?,
                Sampler::EulerAncestral => euler_ancestral_step(&x, &v, t, t_next, noise)?,
                Sampler::Heun => {
                    let dt = t_next - t;
                    let predicted = (&x + (&v * dt)?)?;
                    if t_next == 0.0 {
                        predicted
                    } else {
                        let v_next = model.velocity(&predicted, t_next)?.to_dtype(x.dtype())?;
                        (&x + ((v + v_next)? * (dt / 2.0))?)?
                    }
                }
                Sampler::Dpmpp2m => {
                    let denoised = (&x - (v * t)?)?;
                    let next = dpmpp_2m_step(&x, &denoised, t, t_next, previous.as_ref())?;
                    previous = Some((t, denoised));
                    next
                }
            };
            on_step(
                StepInfo {
                    step: i + 1,
                    total,
                    t: t_next,
                },
                &x,
            )?;
        }
        Ok(x)
    }
}

/// One rectified-flow ancestral step (eta = 1) from t to t_next with velocity v.
fn euler_ancestral_step(
    x: &Tensor,
    v: &Tensor,
    t: f64,
    t_next: f64,
    noise: &mut dyn NoiseSource,
) -> Result<Tensor> {
    if t_next == 0.0 {
        return x - (v * t)?;
    }
    // eta = 1: t_down = t_next · (1 + (t_next/t − 1)·eta).
    let t_down = t_next * t_next / t;
    let x_down = (x + (v * (t_down - t))?)?;
    let (alpha_next, alpha_down) = (1.0 - t_next, 1.0 - t_down);
    let scale = alpha_next / alpha_down;
    let renoise = (t_next * t_next - (t_down * scale).powi(2)).max(0.0).sqrt();
    let eps = noise.standard_normal(x)?;
    (x_down * scale)? + (eps * renoise)?
}

/// One DPM-Solver++(2M) step in sigma form; `previous` is the last step's
/// (t, denoised), absent on the first step.
fn dpmpp_2m_step(
    x: &Tensor,
    denoised: &Tensor,
    t: f64,
    t_next: f64,
    previous: Option<&(f64, Tensor)>,
) -> Result<Tensor> {
    if t_next == 0.0 {
        return Ok(denoised.clone());
    }
    let h = (t / t_next).ln();
    let target = match previous {
        Some((t_prev, d_prev)) => {
            let r = (t_prev / t).ln() / h;
            if r > 0.0 && r.is_finite() {
                let k = 1.0 / (2.0 * r);
                ((denoised * (1.0 + k))? - (d_prev * k)?)?
            } else {
                denoised.clone()
            }
        }
        None => denoised.clone(),
    };
    let ratio = t_next / t;
    (x * ratio)? + (target * (1.0 - ratio))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// v = noise − data everywhere: the straight path from data to that noise.
    struct Straight {
        data: Tensor,
        noise: Tensor,
    }

    impl Velocity for Straight {
        fn velocity(&self, _x: &Tensor, _t: f64) -> Result<Tensor> {
            &self.noise - &self.data
        }
    }

    /// The exact flow of a point mass at `data`: v = (x − data)/t, so the
    /// denoised prediction is `data` from anywhere.
    struct PointMass(Tensor);

    impl Velocity for PointMass {
        fn velocity(&self, x: &Tensor, t: f64) -> Result<Tensor> {
            (x - &self.0)? / t
        }
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        (a - b)?.abs()?.max_all()?.to_scalar::<f32>()
    }

    fn run(sampler: Sampler, model: &dyn Velocity, x: &Tensor, times: &[f64]) -> Result<Tensor> {
        let mut noise = SeededNoise::new([7]);
        sampler.run(model, x.clone(), times, &mut noise, &mut |_, _| Ok(()))
    }

    #[test]
    fn deterministic_samplers_integrate_a_straight_flow_exactly() -> Result<()> {
        let dev = Device::Cpu;
        let data = Tensor::new(&[[[0.5f32, -1.0]]], &dev)?;
        let noise = Tensor::new(&[[[2.0f32, 3.0]]], &dev)?;
        let model = Straight {
            data: data.clone(),
            noise: noise.clone(),
        };
        for sampler in [Sampler::Euler, Sampler::Heun, Sampler::Dpmpp2m] {
            let mut seen = vec![];
            let mut source = SeededNoise::new([0]);
            let out = sampler.run(
                &model,
                noise.clone(),
                &[1.0, 0.7, 0.2, 0.0],
                &mut source,
                &mut |info, _| {
                    seen.push((info.step, info.total));
                    Ok(())
                },
            )?;
            let diff = max_diff(&out, &data)?;
            assert!(diff < 1e-6, "{sampler:?}: {diff}");
            assert_eq!(seen, vec![(1, 3), (2, 3), (3, 3)], "{sampler:?}");
        }
        Ok(())
    }

    #[test]
    fn euler_is_the_plain_euler_loop_bit_for_bit() -> Result<()> {
        // A non-linear field: v = tanh(2x + t).
        struct Bent;
        impl Velocity for Bent {
            fn velocity(&self, x: &Tensor, t: f64) -> Result<Tensor> {
                ((x * 2.0)? + t)?.tanh()
            }
        }
        let dev = Device::Cpu;
        let x = SeededRng::new(9).randn((2, 5, 3), &dev)?;
        let times = [1.0, 0.93, 0.71, 0.4, 0.12, 0.0];
        let mut plain = x.clone();
        for w in times.windows(2) {
            plain = (&plain + (Bent.velocity(&plain, w[0])? * (w[1] - w[0]))?)?;
        }
        let ours = run(Sampler::Euler, &Bent, &x, &times)?;
        assert_eq!(
            ours.flatten_all()?.to_vec1::<f32>()?,
            plain.flatten_all()?.to_vec1::<f32>()?
        );
        Ok(())
    }

    #[test]
    fn every_sampler_lands_on_a_point_mass() -> Result<()> {
        let dev = Device::Cpu;
        let data = Tensor::new(&[[[0.25f32, -0.75, 1.5]]], &dev)?;
        let x = Tensor::new(&[[[1.0f32, -2.0, 0.5]]], &dev)?;
        let times = [1.0, 0.8, 0.45, 0.1, 0.0];
        for sampler in Sampler::ALL {
            let out = run(sampler, &PointMass(data.clone()), &x, &times)?;
            let diff = max_diff(&out, &data)?;
            assert!(diff < 1e-5, "{sampler:?}: {diff}");
        }
        Ok(())
    }

    #[test]
    fn heun_converges_at_second_order_and_euler_at_first() -> Result<()> {
        // dx/dt = x: from x(1) = 1, x(0) = 1/e.
        struct Growth;
        impl Velocity for Growth {
            fn velocity(&self, x: &Tensor, _t: f64) -> Result<Tensor> {
                Ok(x.clone())
            }
        }
        let dev = Device::Cpu;
        let x = Tensor::ones((1, 1, 1), DType::F64, &dev)?;
        let exact = (-1f64).exp();
        let error = |sampler: Sampler, steps: usize| -> Result<f64> {
            let times: Vec<f64> = (0..=steps).map(|i| 1.0 - i as f64 / steps as f64).collect();
            let out = run(sampler, &Growth, &x, &times)?;
            Ok((out.flatten_all()?.to_vec1::<f64>()?[0] - exact).abs())
        };
        let euler = error(Sampler::Euler, 20)? / error(Sampler::Euler, 40)?;
        let heun = error(Sampler::Heun, 20)? / error(Sampler::Heun, 40)?;
        assert!((1.8..2.2).contains(&euler), "Euler error ratio {euler}");
        assert!((3.6..4.4).contains(&heun), "Heun error ratio {heun}");
        assert!(error(Sampler::Heun, 20)? < error(Sampler::Euler, 20)? / 10.0);
        Ok(())
    }

    #[test]
    fn ancestral_noise_keeps_the_noise_level_and_follows_the_seed() -> Result<()> {
        let dev = Device::Cpu;
        let n = 20_000;
        let data = Tensor::zeros((1, n, 1), DType::F32, &dev)?;
        let x = SeededRng::new(3).randn((1, n, 1), &dev)?;
        // One step from t = 1 to 0.6 over a point mass at 0: x is pure noise of
        // standard deviation 0.6 again (the re-noise makes up what the down-step took).
        let step = |seed: u64| -> Result<Tensor> {
            let mut noise = SeededNoise::new([seed]);
            Sampler::EulerAncestral.run(
                &PointMass(data.clone()),
                x.clone(),
                &[1.0, 0.6],
                &mut noise,
                &mut |_, _| Ok(()),
            )
        };
        let out = step(5)?;
        let std = out.sqr()?.mean_all()?.to_scalar::<f32>()?.sqrt();
        assert!((std - 0.6).abs() < 0.02, "std {std}");
        assert_eq!(max_diff(&out, &step(5)?)?, 0.0, "same seed, same noise");
        assert!(
            max_diff(&out, &step(6)?)? > 0.1,
            "another seed, other noise"
        );
        // Euler on the same field only scales x: no noise, whatever the seed.
        let mut a = SeededNoise::new([5]);
        let euler = Sampler::Euler.run(
            &PointMass(data.clone()),
            x.clone(),
            &[1.0, 0.6],
            &mut a,
            &mut |_, _| Ok(()),
        )?;
        assert!(max_diff(&euler, &(&x * 0.6)?)? < 1e-6);
        Ok(())
    }

    #[test]
    fn seeded_noise_gives_each_image_its_own_stream() -> Result<()> {
        let dev = Device::Cpu;
        let like = Tensor::zeros((2, 3, 4), DType::F32, &dev)?;
        let both = SeededNoise::new([10, 11]).standard_normal(&like)?;
        let alone = SeededNoise::new([11]).standard_normal(&like.narrow(0, 1, 1)?)?;
        assert_eq!(max_diff(&both.narrow(0, 1, 1)?, &alone)?, 0.0);
        assert!(SeededNoise::new([1]).standard_normal(&like).is_err());
        Ok(())
    }

    #[test]
    fn names_and_a1111_names_resolve() {
        for s in Sampler::ALL {
            assert_eq!(Sampler::from_name(s.name()), Some(s));
            assert_eq!(serde_json::to_value(s).unwrap(), s.name());
            assert_eq!(Sampler::from_name(s.a1111_name()), Some(s));
        }
        assert_eq!(Sampler::EulerAncestral.a1111_name(), "Euler a");
        assert_eq!(
            Sampler::from_name("k_euler_a"),
            Some(Sampler::EulerAncestral)
        );
        assert_eq!(Sampler::from_name("dpm++ 2m"), Some(Sampler::Dpmpp2m));
        assert_eq!(Sampler::from_name("DPM++ 2M Karras"), None);
        assert_eq!(Sampler::from_a1111_name("k_heun"), Some(Sampler::Heun));
        assert_eq!(
            Sampler::from_a1111_name("euler_ancestral"),
            None,
            "A1111 knows only its own names"
        );
        let err = "lms".parse::<Sampler>().unwrap_err().to_string();
        assert_eq!(
            err,
            "unknown sampler `lms`; accepted: euler, euler_ancestral, heun, dpmpp_2m"
        );
        assert_eq!("Heun".parse::<Sampler>().unwrap(), Sampler::Heun);
    }
}
