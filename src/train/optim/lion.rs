//! Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms")
//! with an f32 or 8-bit block-wise momentum.
//!
//! Owns the Lion update only; must not schedule the lr or touch gradients.
//!
//! Rule, as lucidrains' `lion-pytorch` and bitsandbytes' `Lion`:
//!   p ← p·(1 − lr·wd)
//!   p ← p − lr · sign(β1·m + (1 − β1)·g)      (sign(0) = 0)
//!   m ← β2·m + (1 − β2)·g
//! Defaults β = (0.9, 0.99), wd = 0. Lion8bit keeps m in the signed 8-bit map,
//! as bitsandbytes' `Lion8bit` does. It tracks Lion less closely than
//! AdamW8bit tracks AdamW: with β2 = 0.99 one step moves m by 1% of (g − m),
//! often less than the code spacing of large entries, so the stored momentum
//! lags (on the test problem: final loss 0.019 vs 0.0024 for f32 Lion).

use candle_core::Tensor;

use super::elementwise::ElementwiseRule;
use super::quant8::MapKind;
use super::{decay, OptimizerConfig, OptimizerKind, Result};

/// Lion's hyper-parameters; its state is the momentum m.
pub(super) struct Lion {
    beta1: f64,
    beta2: f64,
    weight_decay: f64,
}

impl Lion {
    pub(super) fn new(cfg: &OptimizerConfig) -> Self {
        let (beta1, beta2) = cfg.resolved_betas();
        Self {
            beta1,
            beta2,
            weight_decay: cfg.resolved_weight_decay(),
        }
    }
}

impl ElementwiseRule for Lion {
    const KIND: OptimizerKind = OptimizerKind::Lion;
    const KIND_8BIT: OptimizerKind = OptimizerKind::Lion8bit;
    const STATE: &'static [(&'static str, MapKind)] = &[("exp_avg", MapKind::Signed)];

    fn update(
        &self,
        p: Tensor,
        g: Tensor,
        state: Option<&[Tensor]>,
        lr: f64,
        _steps: u64,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let (b1, b2, wd) = (self.beta1, self.beta2, self.weight_decay);
        let m = match state {
            Some([m]) => m.clone(),
            _ => g.zeros_like()?,
        };
        let direction = ((&m * b1)? + (&g * (1.0 - b1))?)?.sign()?;
        let p = decay(p, lr * wd)?;
        let p = (p - (direction * lr)?)?;
        let m = ((m * b2)? + (g * (1.0 - b2))?)?;
        Ok((p, vec![m]))
    }
}

#[cfg(test)]
#[allow(clippy::needless_range_loop)] // reference rules read best indexed
mod tests {
    use super::super::testutil::*;
    use super::super::*;

    fn sign(x: f64) -> f64 {
        if x > 0.0 {
            1.0
        } else if x < 0.0 {
            -1.0
        } else {
            0.0
        }
    }

    #[test]
    fn lion_matches_reference_rule() -> Result<()> {
        let mut cfg = OptimizerConfig::new(OptimizerKind::Lion);
        cfg.weight_decay = Some(0.5);
        let p0 = [0.3, -0.7, 1.2, 0.0, -2.0];
        let a = var(&p0);
        let lr = 0.02;
        let mut opt = build(&cfg, vec![group("w", vec![a.clone()], lr)])?;
        let (b1, b2, wd) = (0.9, 0.99, 0.5); // the defaults
        let mut p = p0.to_vec();
        let mut m = [0.0; 5];
        for step in 0..7 {
            let mut g = synthetic_grad(5, step);
            if step == 0 {
                g[3] = 0.0; // sign(0) = 0: no move on the first step
            }
            opt.step(&grads(&[(&a, &g)]))?;
            for i in 0..5 {
                p[i] *= 1.0 - lr * wd;
                p[i] -= lr * sign(b1 * m[i] + (1.0 - b1) * g[i]);
                m[i] = b2 * m[i] + (1.0 - b2) * g[i];
            }
            assert_close(&a, &p, 1e-6, "lion");
        }
        Ok(())
    }

    #[test]
    fn lion_converges_on_least_squares() -> Result<()> {
        let cfg = OptimizerConfig::new(OptimizerKind::Lion);
        let (first, last) = least_squares_run(&cfg, 0.003, 600)?;
        assert!(last < first * 1e-3, "loss {first} -> {last}");
        Ok(())
    }

    #[test]
    fn lion8bit_converges_near_lion() -> Result<()> {
        let (w32, l32) = least_squares_big(&OptimizerConfig::new(OptimizerKind::Lion), 0.003, 600)?;
        let (w8, l8) =
            least_squares_big(&OptimizerConfig::new(OptimizerKind::Lion8bit), 0.003, 600)?;
        let diff = rel_diff(&w8, &w32);
        println!("lion loss {l32:?}, lion8bit loss {l8:?}, parameter difference {diff:.4}");
        assert!(l8.1 < l8.0 * 1e-2, "8-bit loss {} -> {}", l8.0, l8.1);
        // Looser than AdamW8bit: with β2 = 0.99 a step changes m by 1% of
        // (g − m), below the code spacing of large entries, so the 8-bit
        // momentum lags and sign(·) flips more often near the optimum.
        assert!(l8.1 < 10.0 * l32.1, "8-bit {} vs f32 {}", l8.1, l32.1);
        assert!(diff < 0.2, "8-bit parameters drift from f32: {diff}");
        Ok(())
    }
}
