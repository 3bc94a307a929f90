//! AdamW (Loshchilov & Hutter 2019) with f32 or 8-bit block-wise moments.
//!
//! Owns the AdamW update only; must not schedule the lr or touch gradients.
//!
//! Rule, as `torch.optim.AdamW` (per-parameter step t, counted only on steps
//! where the parameter has a gradient):
//!   p ← p·(1 − lr·wd)
//!   m ← β1·m + (1 − β1)·g,   v ← β2·v + (1 − β2)·g²
//!   p ← p − (lr / (1 − β1ᵗ)) · m / (√v / √(1 − β2ᵗ) + ε)
//! AdamW8bit stores m (signed map) and v (unsigned map) block-wise in 8 bits
//! (see `quant8`; `elementwise` decodes them before and encodes them after
//! each update); the parameter update uses the f32 values of this step, as
//! bitsandbytes does.
//! Differences from bitsandbytes' kernel: weight decay is applied before the
//! step (PyTorch order, bitsandbytes decays after: an O(lr²·wd) difference),
//! and non-finite gradients are not zeroed (the trainer skips such steps).

use candle_core::Tensor;

use super::elementwise::ElementwiseRule;
use super::quant8::MapKind;
use super::{decay, OptimizerConfig, OptimizerKind, Result};

/// AdamW's hyper-parameters; its state is (m, v).
pub(super) struct AdamW {
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
}

impl AdamW {
    pub(super) fn new(cfg: &OptimizerConfig) -> Self {
        let (beta1, beta2) = cfg.resolved_betas();
        Self {
            beta1,
            beta2,
            eps: cfg.resolved_eps(),
            weight_decay: cfg.resolved_weight_decay(),
        }
    }
}

impl ElementwiseRule for AdamW {
    const KIND: OptimizerKind = OptimizerKind::Adamw;
    const KIND_8BIT: OptimizerKind = OptimizerKind::Adamw8bit;
    const STATE: &'static [(&'static str, MapKind)] = &[
        ("exp_avg", MapKind::Signed),
        ("exp_avg_sq", MapKind::Unsigned),
    ];

    fn update(
        &self,
        p: Tensor,
        g: Tensor,
        state: Option<&[Tensor]>,
        lr: f64,
        steps: u64,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let (b1, b2, eps, wd) = (self.beta1, self.beta2, self.eps, self.weight_decay);
        let (m, v) = match state {
            Some([m, v]) => (m.clone(), v.clone()),
            _ => (g.zeros_like()?, g.zeros_like()?),
        };
        let t = (steps + 1) as i32;
        let m = ((m * b1)? + (&g * (1.0 - b1))?)?;
        let v = ((v * b2)? + (g.sqr()? * (1.0 - b2))?)?;
        let bc1 = 1.0 - b1.powi(t);
        let bc2 = 1.0 - b2.powi(t);
        let denom = v.sqrt()?.affine(1.0 / bc2.sqrt(), eps)?;
        let p = decay(p, lr * wd)?;
        let p = (p - ((&m / denom)? * (lr / bc1))?)?;
        Ok((p, vec![m, v]))
    }
}

#[cfg(test)]
#[allow(clippy::needless_range_loop)] // reference rules read best indexed
mod tests {
    use super::super::testutil::*;
    use super::super::*;

    /// Independent f64 AdamW on a vector, PyTorch's formulation.
    struct RefAdamW {
        m: Vec<f64>,
        v: Vec<f64>,
        t: i32,
    }

    impl RefAdamW {
        fn step(&mut self, p: &mut [f64], g: &[f64], lr: f64, b: (f64, f64), eps: f64, wd: f64) {
            self.t += 1;
            for i in 0..p.len() {
                p[i] *= 1.0 - lr * wd;
                self.m[i] = b.0 * self.m[i] + (1.0 - b.0) * g[i];
                self.v[i] = b.1 * self.v[i] + (1.0 - b.1) * g[i] * g[i];
                let mhat = self.m[i] / (1.0 - b.0.powi(self.t));
                let vhat = self.v[i] / (1.0 - b.1.powi(self.t));
                p[i] -= lr * mhat / (vhat.sqrt() + eps);
            }
        }
    }

    #[test]
    fn adamw_matches_reference_rule() -> Result<()> {
        let mut cfg = OptimizerConfig::new(OptimizerKind::Adamw);
        cfg.weight_decay = Some(0.1);
        cfg.betas = Some([0.8, 0.95]);
        cfg.eps = Some(1e-3); // large, so that ε's placement after √ is tested
        let p0 = [0.5, -1.0, 2.0, 0.0];
        let q0 = [1.5, -0.25];
        let a = var(&p0);
        let b = var(&q0);
        let mut opt = build(
            &cfg,
            vec![
                group("dit", vec![a.clone()], 0.01),
                group("te", vec![b.clone()], 0.003),
            ],
        )?;
        let (mut ra, mut rb) = (
            RefAdamW {
                m: vec![0.0; 4],
                v: vec![0.0; 4],
                t: 0,
            },
            RefAdamW {
                m: vec![0.0; 2],
                v: vec![0.0; 2],
                t: 0,
            },
        );
        let (mut pa, mut pb) = (p0.to_vec(), q0.to_vec());
        for step in 0..6 {
            let ga = synthetic_grad(4, step);
            let gb = synthetic_grad(2, step + 10);
            // `te` has no gradient on step 2: skipped, and its t does not advance.
            let with_b = step != 2;
            let mut store = grads(&[(&a, &ga)]);
            if with_b {
                store.insert(&b, tensor(&gb));
            }
            opt.step(&store)?;
            ra.step(&mut pa, &ga, 0.01, (0.8, 0.95), 1e-3, 0.1);
            if with_b {
                rb.step(&mut pb, &gb, 0.003, (0.8, 0.95), 1e-3, 0.1);
            }
            assert_close(&a, &pa, 1e-6, "dit");
            assert_close(&b, &pb, 1e-6, "te");
        }
        Ok(())
    }

    #[test]
    fn adamw_converges_on_least_squares() -> Result<()> {
        let cfg = OptimizerConfig::new(OptimizerKind::Adamw);
        let (first, last) = least_squares_run(&cfg, 0.05, 300)?;
        assert!(last < first * 1e-3, "loss {first} -> {last}");
        Ok(())
    }

    #[test]
    fn adamw8bit_tracks_adamw() -> Result<()> {
        // A 64x64 weight so that the 8-bit path is taken with the default
        // min_8bit_size of 4096.
        let mut c8 = OptimizerConfig::new(OptimizerKind::Adamw8bit);
        c8.block_size = Some(256);
        let c32 = OptimizerConfig::new(OptimizerKind::Adamw);
        let lr = 0.01;
        let (w32, l32) = least_squares_big(&c32, lr, 200)?;
        let (w8, l8) = least_squares_big(&c8, lr, 200)?;
        println!("adamw loss {:?}, adamw8bit loss {:?}", l32, l8);
        assert!(l8.1 < l8.0 * 1e-2, "8-bit loss {} -> {}", l8.0, l8.1);
        assert!((l8.1 - l32.1).abs() <= 0.5 * l32.1 + 1e-4 * l32.0);
        let diff = rel_diff(&w8, &w32);
        println!("relative parameter difference after 200 steps: {diff:.4}");
        assert!(diff < 0.05, "8-bit parameters drift from f32: {diff}");
        Ok(())
    }
}
