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

use candle_core::backprop::GradStore;
use candle_core::DType;

use super::quant8::{MapKind, Quant8, StateTensor};
use super::{
    check_all_used, f32_value, gradient, write_back, Groups, Optimizer, OptimizerConfig,
    OptimizerKind, OptimizerState, ParamGroup, Result,
};

/// SGD with Nesterov momentum, or its 8-bit variant.
pub struct SgdNesterov {
    groups: Groups<StateTensor>,
    momentum: f64,
    weight_decay: f64,
    quant: Option<Quant8>,
}

impl SgdNesterov {
    pub(super) fn new(
        cfg: &OptimizerConfig,
        groups: Vec<ParamGroup>,
        quant: Option<Quant8>,
    ) -> Self {
        Self {
            groups: Groups::new(groups),
            momentum: cfg.resolved_momentum(),
            weight_decay: cfg.resolved_weight_decay(),
            quant,
        }
    }
}

impl Optimizer for SgdNesterov {
    fn kind(&self) -> OptimizerKind {
        if self.quant.is_some() {
            OptimizerKind::SgdNesterov8bit
        } else {
            OptimizerKind::SgdNesterov
        }
    }

    fn step(&mut self, grads: &GradStore) -> Result<()> {
        let (mu, wd) = (self.momentum, self.weight_decay);
        let quant = self.quant.as_ref();
        for group in &mut self.groups.groups {
            let lr = group.lr;
            for slot in &mut group.slots {
                let Some(g) = gradient(grads, &slot.var) else {
                    continue;
                };
                let p = f32_value(&slot.var)?;
                let mut g = g.to_dtype(DType::F32)?;
                if wd != 0.0 {
                    g = (g + (&p * wd)?)?;
                }
                let codec = Quant8::codec(quant, MapKind::Signed, p.elem_count());
                let buf = match &slot.state {
                    Some(s) => ((s.decode(&codec)? * mu)? + &g)?,
                    None => g.clone(),
                };
                let update = (g + (&buf * mu)?)?;
                let p = (p - (update * lr)?)?;
                write_back(&slot.var, &p)?;
                slot.state = Some(StateTensor::encode(buf, &codec)?);
                slot.steps += 1;
            }
        }
        self.groups.steps += 1;
        Ok(())
    }

    fn steps_taken(&self) -> u64 {
        self.groups.steps
    }

    fn num_groups(&self) -> usize {
        self.groups.groups.len()
    }

    fn set_lr(&mut self, group: usize, lr: f64) -> Result<()> {
        self.groups.set_lr(group, lr)
    }

    fn lr(&self, group: usize) -> Option<f64> {
        self.groups.lr(group)
    }

    fn state(&self) -> Result<OptimizerState> {
        Ok(self.groups.save(self.kind(), |b, prefix, out| {
            b.save(&format!("{prefix}.momentum_buffer"), out);
        }))
    }

    fn load_state(&mut self, st: &OptimizerState) -> Result<()> {
        let quant = self.quant.as_ref();
        let (loaded, used) = self.groups.load(self.kind(), st, |prefix, var, st, used| {
            let codec = Quant8::codec(quant, MapKind::Signed, var.elem_count());
            StateTensor::load(
                &format!("{prefix}.momentum_buffer"),
                st,
                &codec,
                var.shape(),
                var.device(),
                used,
            )
        })?;
        check_all_used(st, &used)?;
        self.groups.commit(loaded, st.step);
        Ok(())
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
