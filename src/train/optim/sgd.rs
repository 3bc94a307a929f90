//! SGD with Nesterov momentum, f32 or 8-bit block-wise momentum buffer.
//!
//! Owns the SGD update only; must not schedule the lr or touch gradients.
//!
//! Rule, as `torch.optim.SGD(momentum=μ, dampening=0, nesterov=True)`:
//!   g ← g + wd·p                      (L2 weight decay, coupled)
//!   b ← μ·b + g                       (b = g on the first step: b starts at 0)
//!   p ← p − lr·(g + μ·b)
//! Default μ = 0.9 (kohya's default for SGDNesterov). SgdNesterov8bit keeps b
//! in the signed 8-bit map. Note: bitsandbytes' `SGD8bit` accepts
//! `nesterov=True` but its kernel applies plain heavy-ball momentum; this
//! implementation applies the Nesterov rule in both variants.

use candle_core::Tensor;

use super::elementwise::ElementwiseRule;
use super::quant8::MapKind;
use super::{OptimizerConfig, OptimizerKind, Result};

/// The hyper-parameters of SGD with Nesterov momentum; its state is the
/// momentum buffer b.
pub(super) struct SgdNesterov {
    momentum: f64,
    weight_decay: f64,
}

impl SgdNesterov {
    pub(super) fn new(cfg: &OptimizerConfig) -> Self {
        Self {
            momentum: cfg.resolved_momentum(),
            weight_decay: cfg.resolved_weight_decay(),
        }
    }
}

impl ElementwiseRule for SgdNesterov {
    const KIND: OptimizerKind = OptimizerKind::SgdNesterov;
    const KIND_8BIT: OptimizerKind = OptimizerKind::SgdNesterov8bit;
    const STATE: &'static [(&'static str, MapKind)] = &[("momentum_buffer", MapKind::Signed)];

    fn update(
        &self,
        p: Tensor,
        g: Tensor,
        state: Option<&[Tensor]>,
        lr: f64,
        _steps: u64,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let (mu, wd) = (self.momentum, self.weight_decay);
        let g = if wd != 0.0 { (g + (&p * wd)?)? } else { g };
        let buf = match state {
            Some([b]) => ((b * mu)? + &g)?,
            _ => g.clone(),
        };
        let update = (g + (&buf * mu)?)?;
        let p = (p - (update * lr)?)?;
        Ok((p, vec![buf]))
    }
}

#[cfg(test)]
#[allow(clippy::needless_range_loop)] // reference rules read best indexed
mod tests {
    use super::super::testutil::*;
    use super::super::*;

    #[test]
    fn sgd_nesterov_matches_reference_rule() -> Result<()> {
        let mut cfg = OptimizerConfig::new(OptimizerKind::SgdNesterov);
        cfg.weight_decay = Some(0.05);
        cfg.momentum = Some(0.8);
        let p0 = [1.0, -0.5, 0.25];
        let a = var(&p0);
        let lr = 0.1;
        let mut opt = build(&cfg, vec![group("w", vec![a.clone()], lr)])?;
        let (mu, wd) = (0.8, 0.05);
        let mut p = p0.to_vec();
        let mut buf: Option<Vec<f64>> = None;
        for step in 0..6 {
            let g = synthetic_grad(3, step);
            opt.step(&grads(&[(&a, &g)]))?;
            // PyTorch: buffer is a clone of d_p on the first step.
            let d: Vec<f64> = (0..3).map(|i| g[i] + wd * p[i]).collect();
            let b: Vec<f64> = match &buf {
                None => d.clone(),
                Some(b) => (0..3).map(|i| mu * b[i] + d[i]).collect(),
            };
            for i in 0..3 {
                p[i] -= lr * (d[i] + mu * b[i]);
            }
            buf = Some(b);
            assert_close(&a, &p, 1e-6, "sgd");
        }
        Ok(())
    }

    #[test]
    fn sgd_nesterov_converges_on_least_squares() -> Result<()> {
        let cfg = OptimizerConfig::new(OptimizerKind::SgdNesterov);
        let (first, last) = least_squares_run(&cfg, 0.05, 300)?;
        assert!(last < first * 1e-3, "loss {first} -> {last}");
        Ok(())
    }

    #[test]
    fn sgd_nesterov8bit_tracks_sgd_nesterov() -> Result<()> {
        let c32 = OptimizerConfig::new(OptimizerKind::SgdNesterov);
        let c8 = OptimizerConfig::new(OptimizerKind::SgdNesterov8bit);
        let (w32, l32) = least_squares_big(&c32, 0.1, 600)?;
        let (w8, l8) = least_squares_big(&c8, 0.1, 600)?;
        let diff = rel_diff(&w8, &w32);
        println!("sgd loss {l32:?}, sgd8bit loss {l8:?}, parameter difference {diff:.4}");
        assert!(l8.1 < l8.0 * 1e-2, "8-bit loss {} -> {}", l8.0, l8.1);
        assert!(
            l8.1 < 1.5 * l32.1 + 1e-4 * l32.0,
            "8-bit {} vs f32 {}",
            l8.1,
            l32.1
        );
        assert!(diff < 0.05, "8-bit parameters drift from f32: {diff}");
        Ok(())
    }
}
