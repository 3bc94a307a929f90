//! The velocity models the samplers drive: the [`Velocity`] interface, and the
//! Flux model behind it.
//!
//! The samplers know nothing about Flux: they integrate dx/dt = v(x, t) from t = 1
//! (noise) to t = 0 (data). [`FluxVelocity`] binds a Flux model, its conditioning
//! and an adapter set into such a v; [`TrueCfg`] combines two of them (prompt and
//! negative prompt) into classifier-free guidance.
//!
//! Must not: step through a schedule (the samplers do that).

use candle_core::{Result, Tensor};

use crate::model::adapter::AdapterSet;
use crate::model::flux::{Flux, FluxInputs};

/// Something that predicts the flow velocity v(x, t) for packed latents x (b, n, c).
pub trait Velocity {
    fn velocity(&self, x: &Tensor, t: f64) -> Result<Tensor>;
}

/// A Flux model with fixed conditioning: the velocity field for one sampling run.
pub struct FluxVelocity<'a> {
    pub flux: &'a Flux,
    pub adapters: &'a AdapterSet,
    /// (b, n_img, 3)
    pub img_ids: &'a Tensor,
    /// (b, n_txt, context_in_dim)
    pub txt: &'a Tensor,
    /// (b, n_txt, 3)
    pub txt_ids: &'a Tensor,
    /// (b, vec_in_dim)
    pub y: &'a Tensor,
    /// Distilled guidance for dev models; ignored by models without a guidance embedding.
    pub guidance: f64,
}

impl Velocity for FluxVelocity<'_> {
    fn velocity(&self, x: &Tensor, t: f64) -> Result<Tensor> {
        let b = x.dim(0)?;
        let device = x.device();
        let timesteps = Tensor::full(t as f32, b, device)?;
        let guidance = Tensor::full(self.guidance as f32, b, device)?;
        let inputs = FluxInputs {
            img: x,
            img_ids: self.img_ids,
            txt: self.txt,
            txt_ids: self.txt_ids,
            timesteps: &timesteps,
            y: self.y,
            guidance: self.flux.config().guidance_embed.then_some(&guidance),
        };
        self.flux.forward(&inputs, self.adapters)
    }
}

/// True classifier-free guidance: v = v_neg + scale·(v_pos − v_neg), two model
/// passes per step (what Forge does for Flux when CFG scale > 1).
pub struct TrueCfg<'a> {
    pub positive: &'a dyn Velocity,
    pub negative: &'a dyn Velocity,
    pub scale: f64,
}

impl Velocity for TrueCfg<'_> {
    fn velocity(&self, x: &Tensor, t: f64) -> Result<Tensor> {
        let pos = self.positive.velocity(x, t)?;
        let neg = self.negative.velocity(x, t)?;
        let diff = ((&pos - &neg)? * self.scale)?;
        &neg + diff
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// A velocity that is the same constant everywhere.
    struct Constant(Tensor);

    impl Velocity for Constant {
        fn velocity(&self, _x: &Tensor, _t: f64) -> Result<Tensor> {
            Ok(self.0.clone())
        }
    }

    #[test]
    fn true_cfg_extrapolates_from_the_negative_towards_the_positive() -> Result<()> {
        let dev = Device::Cpu;
        let pos = Constant(Tensor::new(&[[[3.0f32, 1.0]]], &dev)?);
        let neg = Constant(Tensor::new(&[[[1.0f32, 1.0]]], &dev)?);
        let x = Tensor::zeros((1, 1, 2), candle_core::DType::F32, &dev)?;
        let at = |scale| -> Result<Vec<f32>> {
            let cfg = TrueCfg {
                positive: &pos,
                negative: &neg,
                scale,
            };
            cfg.velocity(&x, 0.5)?.flatten_all()?.to_vec1::<f32>()
        };
        assert_eq!(at(1.0)?, vec![3.0, 1.0], "scale 1 is the positive alone");
        assert_eq!(at(0.0)?, vec![1.0, 1.0], "scale 0 is the negative alone");
        assert_eq!(at(3.5)?, vec![8.0, 1.0]);
        Ok(())
    }
}
