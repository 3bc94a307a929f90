//! The rectified-flow objective Flux is trained with: timestep sampling, noise
//! (with offset and multi-resolution "pyramid" noise), the noised input
//! x_t = (1 − t)·x₀ + t·ε and the velocity target ε − x₀, and the MSE loss.
//!
//! Timestep sampling follows kohya sd-scripts' `flux_train_utils`: `uniform`,
//! `sigmoid` (σ(scale·n)), `shift` (sigmoid, then t·s / (1 + (s − 1)·t)) and
//! `flux_shift` (sigmoid, then Flux's resolution-dependent time shift).
//!
//! Must not: touch the model or the optimizer.

use candle_core::{DType, Device, Result, Tensor};
use serde::{Deserialize, Serialize};

use crate::model::seeded::SeededRng;
use crate::sample::schedule::{time_shift, Shift};

/// How training timesteps t ∈ (0, 1) are drawn.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TimestepSampling {
    Uniform,
    #[default]
    Sigmoid,
    Shift,
    FluxShift,
}

/// Timestep and noise settings (kohya's argument names).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct ObjectiveConfig {
    pub timestep_sampling: TimestepSampling,
    /// Scale of the normal sample before the sigmoid; larger is closer to uniform.
    pub sigmoid_scale: f64,
    /// The shift `s` of `timestep_sampling = "shift"`.
    pub discrete_flow_shift: f64,
    /// Distilled guidance fed to dev-style models while training (1.0 as kohya).
    pub guidance_scale: f64,
    /// Adds offset·n (one value per image and channel) to the noise.
    pub noise_offset: f64,
    /// Pyramid noise: number of coarser noise levels added (0 disables).
    pub multires_noise_iterations: usize,
    /// Weight of level i is discount^i.
    pub multires_noise_discount: f64,
}

impl Default for ObjectiveConfig {
    fn default() -> Self {
        Self {
            timestep_sampling: TimestepSampling::Sigmoid,
            sigmoid_scale: 1.0,
            discrete_flow_shift: 3.0,
            guidance_scale: 1.0,
            noise_offset: 0.0,
            multires_noise_iterations: 0,
            multires_noise_discount: 0.3,
        }
    }
}

impl ObjectiveConfig {
    /// Checks value ranges; the message names the field.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if !(self.sigmoid_scale.is_finite() && self.sigmoid_scale > 0.0) {
            return Err(format!(
                "sigmoid_scale must be > 0, got {}",
                self.sigmoid_scale
            ));
        }
        if !(self.discrete_flow_shift.is_finite() && self.discrete_flow_shift > 0.0) {
            return Err(format!(
                "discrete_flow_shift must be > 0, got {}",
                self.discrete_flow_shift
            ));
        }
        if !(self.noise_offset.is_finite() && self.noise_offset >= 0.0) {
            return Err(format!(
                "noise_offset must be ≥ 0, got {}",
                self.noise_offset
            ));
        }
        if !(0.0..=1.0).contains(&self.multires_noise_discount) {
            return Err(format!(
                "multires_noise_discount must be in [0, 1], got {}",
                self.multires_noise_discount
            ));
        }
        if !(self.guidance_scale.is_finite() && self.guidance_scale >= 0.0) {
            return Err(format!(
                "guidance_scale must be ≥ 0, got {}",
                self.guidance_scale
            ));
        }
        Ok(())
    }

    /// One t per image for latents of `lh`×`lw` latent pixels.
    pub(crate) fn sample_timesteps(
        &self,
        rng: &mut SeededRng,
        batch: usize,
        lh: usize,
        lw: usize,
    ) -> Vec<f64> {
        let sigmoid = |x: f64| 1.0 / (1.0 + (-x).exp());
        (0..batch)
            .map(|_| match self.timestep_sampling {
                TimestepSampling::Uniform => rng.uniform(),
                TimestepSampling::Sigmoid => sigmoid(self.sigmoid_scale * rng.normal()),
                TimestepSampling::Shift => {
                    let t = sigmoid(self.sigmoid_scale * rng.normal());
                    let s = self.discrete_flow_shift;
                    t * s / (1.0 + (s - 1.0) * t)
                }
                TimestepSampling::FluxShift => {
                    let t = sigmoid(self.sigmoid_scale * rng.normal());
                    time_shift(Shift::default().mu((lh / 2) * (lw / 2)), t)
                }
            })
            .collect()
    }

    /// Noise like `latents` (b, c, h, w): standard normal, plus the offset and
    /// pyramid terms when enabled.
    pub(crate) fn sample_noise(
        &self,
        rng: &mut SeededRng,
        shape: (usize, usize, usize, usize),
        device: &Device,
    ) -> Result<Tensor> {
        let (b, c, h, w) = shape;
        let mut noise = rng.randn((b, c, h, w), device)?;
        if self.multires_noise_iterations > 0 {
            noise = pyramid_noise(
                noise,
                rng,
                self.multires_noise_iterations,
                self.multires_noise_discount,
            )?;
        }
        if self.noise_offset > 0.0 {
            let offset = (rng.randn((b, c, 1, 1), device)? * self.noise_offset)?;
            noise = noise.broadcast_add(&offset)?;
        }
        Ok(noise)
    }
}

/// kohya's pyramid noise: add up-sampled coarser noise at random scale factors
/// r ∈ [2, 4) per level, weighted discount^i, then renormalise to unit std.
/// Nearest up-sampling (kohya uses bilinear).
fn pyramid_noise(
    noise: Tensor,
    rng: &mut SeededRng,
    iterations: usize,
    discount: f64,
) -> Result<Tensor> {
    let (b, c, h, w) = noise.dims4()?;
    let mut out = noise;
    for i in 1..=iterations {
        let r = rng.uniform() * 2.0 + 2.0;
        let nh = ((h as f64 / r.powi(i as i32)) as usize).max(1);
        let nw = ((w as f64 / r.powi(i as i32)) as usize).max(1);
        let coarse = rng
            .randn((b, c, nh, nw), out.device())?
            .upsample_nearest2d(h, w)?;
        out = (out + (coarse * discount.powi(i as i32))?)?;
        if nh == 1 || nw == 1 {
            break;
        }
    }
    let std = out.flatten_all()?.to_dtype(DType::F64)?;
    let mean = std.mean_all()?.to_scalar::<f64>()?;
    let var = (std - mean)?.sqr()?.mean_all()?.to_scalar::<f64>()?;
    out / var.sqrt().max(1e-12)
}

/// x_t = (1 − t)·x₀ + t·ε with t per image; x₀ and ε (b, …).
pub(crate) fn noised(x0: &Tensor, noise: &Tensor, t: &[f64]) -> Result<Tensor> {
    let b = x0.dim(0)?;
    let rank = x0.rank();
    let mut shape = vec![b];
    shape.extend(std::iter::repeat_n(1, rank - 1));
    let t: Vec<f32> = t.iter().map(|&v| v as f32).collect();
    let t = Tensor::from_vec(t, shape, x0.device())?.to_dtype(x0.dtype())?;
    x0.broadcast_mul(&(1.0 - &t)?)?
        .broadcast_add(&noise.broadcast_mul(&t)?)
}

/// The velocity the model must predict: ε − x₀.
pub(crate) fn velocity_target(x0: &Tensor, noise: &Tensor) -> Result<Tensor> {
    noise - x0
}

/// Mean squared error over every element, computed in f32.
pub(crate) fn mse(pred: &Tensor, target: &Tensor) -> Result<Tensor> {
    (pred.to_dtype(DType::F32)? - target.to_dtype(DType::F32)?)?
        .sqr()?
        .mean_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(kind: TimestepSampling) -> ObjectiveConfig {
        ObjectiveConfig {
            timestep_sampling: kind,
            ..ObjectiveConfig::default()
        }
    }

    #[test]
    fn timesteps_are_in_range_and_shift_moves_them_up() {
        let mut rng = SeededRng::new(1);
        let mean = |v: Vec<f64>| v.iter().sum::<f64>() / v.len() as f64;
        for kind in [
            TimestepSampling::Uniform,
            TimestepSampling::Sigmoid,
            TimestepSampling::Shift,
            TimestepSampling::FluxShift,
        ] {
            let t = cfg(kind).sample_timesteps(&mut rng, 2000, 64, 64);
            assert!(t.iter().all(|&v| v > 0.0 && v < 1.0), "{kind:?}");
        }
        let sig = mean(cfg(TimestepSampling::Sigmoid).sample_timesteps(
            &mut SeededRng::new(2),
            4000,
            64,
            64,
        ));
        let shifted = mean(cfg(TimestepSampling::Shift).sample_timesteps(
            &mut SeededRng::new(2),
            4000,
            64,
            64,
        ));
        assert!((sig - 0.5).abs() < 0.02, "sigmoid mean {sig}");
        assert!(
            shifted > sig + 0.15,
            "shift 3 pushes t towards noise: {shifted}"
        );
    }

    #[test]
    fn shift_formula_matches_kohya() {
        // With sigmoid_scale → the same normal draw, shift(t) = t·s/(1+(s−1)t).
        let c = ObjectiveConfig {
            timestep_sampling: TimestepSampling::Shift,
            discrete_flow_shift: 3.0,
            ..ObjectiveConfig::default()
        };
        let n = SeededRng::new(5).normal();
        let t = 1.0 / (1.0 + (-n).exp());
        let got = c.sample_timesteps(&mut SeededRng::new(5), 1, 8, 8)[0];
        assert!((got - 3.0 * t / (1.0 + 2.0 * t)).abs() < 1e-12);
    }

    #[test]
    fn noised_interpolates_and_target_is_the_velocity() -> Result<()> {
        let dev = Device::Cpu;
        let x0 = Tensor::new(&[[1.0f32, 2.0], [3.0, 4.0]], &dev)?;
        let eps = Tensor::new(&[[0.0f32, 0.0], [1.0, 1.0]], &dev)?;
        let xt = noised(&x0, &eps, &[0.25, 1.0])?;
        assert_eq!(xt.to_vec2::<f32>()?, vec![vec![0.75, 1.5], vec![1.0, 1.0]]);
        let v = velocity_target(&x0, &eps)?;
        assert_eq!(
            v.to_vec2::<f32>()?,
            vec![vec![-1.0, -2.0], vec![-2.0, -3.0]]
        );
        assert_eq!(mse(&x0, &x0)?.to_scalar::<f32>()?, 0.0);
        Ok(())
    }

    #[test]
    fn noise_offset_and_pyramid_keep_noise_well_scaled() -> Result<()> {
        let dev = Device::Cpu;
        let c = ObjectiveConfig {
            noise_offset: 0.1,
            multires_noise_iterations: 6,
            ..ObjectiveConfig::default()
        };
        let n = c.sample_noise(&mut SeededRng::new(3), (2, 4, 32, 32), &dev)?;
        let std = n
            .flatten_all()?
            .sqr()?
            .mean_all()?
            .sqrt()?
            .to_scalar::<f32>()?;
        assert!((std - 1.0).abs() < 0.1, "rms {std}");
        let plain = ObjectiveConfig::default().sample_noise(
            &mut SeededRng::new(3),
            (2, 4, 32, 32),
            &dev,
        )?;
        assert!((n - plain)?.abs()?.max_all()?.to_scalar::<f32>()? > 0.01);
        Ok(())
    }

    #[test]
    fn validation_names_the_field() {
        let bad = ObjectiveConfig {
            noise_offset: -1.0,
            ..ObjectiveConfig::default()
        };
        assert!(bad.validate().unwrap_err().contains("noise_offset"));
    }
}
