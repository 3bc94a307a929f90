//! Adafactor (Shazeer & Stern 2018) as HF transformers' `Adafactor` computes it.
//!
//! Owns the Adafactor update only; must not schedule the lr or touch gradients.
//!
//! Per parameter, with its own step t (1-based):
//!   ρ = relative_step ? min(warmup_init ? 1e-6·t : 1e-2, 1/√t) : group lr
//!   α = scale_parameter ? max(eps_scale, RMS(p)) · ρ : ρ
//!   β2ₜ = 1 − t^decay_rate,   u = g² + eps
//!   rank ≥ 2 (factored; HF reduces over the last two dims):
//!     R ← β2ₜ·R + (1 − β2ₜ)·mean_last(u),  C ← β2ₜ·C + (1 − β2ₜ)·mean_second_last(u)
//!     û = g · rsqrt(R / mean_last(R))[…, :, None] · rsqrt(C)[…, None, :]
//!   rank ≤ 1: V ← β2ₜ·V + (1 − β2ₜ)·u,  û = g · rsqrt(V)
//!   û ← û / max(1, RMS(û) / clip_threshold) · α
//!   beta1 set: M ← β1·M + (1 − β1)·û,  û = M
//!   p ← p·(1 − wd·α) − û            (HF applies weight decay this way)
//! Defaults as HF: eps 1e-30, eps_scale 1e-3, clip 1.0, decay −0.8, no β1,
//! wd 0, scale_parameter and relative_step on, warmup_init off.
//!
//! With `relative_step` on (the default) the group learning rate is ignored:
//! HF refuses a manual lr in that mode and kohya drops it with a warning.
//! Set `relative_step = false` (and usually `scale_parameter = false`) to
//! use the configured lr and schedule.

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor};

use super::{
    check_all_used, load_tensor, Groups, Optimizer, OptimizerConfig, OptimizerKind, OptimizerState,
    ParamGroup, Result,
};

#[derive(Clone, Debug)]
enum Second {
    Factored { row: Tensor, col: Tensor },
    Full(Tensor),
}

#[derive(Clone, Debug)]
struct State {
    second: Second,
    first: Option<Tensor>,
}

pub(super) struct Adafactor {
    groups: Groups<State>,
    rule: Rule,
    /// Last step size α of each group's first updated parameter (0-d f32).
    last_alpha: Vec<Option<Tensor>>,
}

/// Adafactor's hyper-parameters and per-parameter update.
struct Rule {
    eps: f64,
    eps_scale: f64,
    clip_threshold: f64,
    decay_rate: f64,
    beta1: Option<f64>,
    weight_decay: f64,
    scale_parameter: bool,
    relative_step: bool,
    warmup_init: bool,
}

/// Root mean square of all elements, as a 0-d tensor.
fn rms(x: &Tensor) -> Result<Tensor> {
    Ok(x.sqr()?.mean_all()?.sqrt()?)
}

/// Shapes of the row and column statistics of a factored parameter.
fn factored_shapes(dims: &[usize]) -> (Vec<usize>, Vec<usize>) {
    let n = dims.len();
    let row = dims[..n - 1].to_vec();
    let mut col = dims[..n - 2].to_vec();
    col.push(dims[n - 1]);
    (row, col)
}

impl Adafactor {
    pub(super) fn new(cfg: &OptimizerConfig, groups: Vec<ParamGroup>) -> Self {
        let n = groups.len();
        Self {
            groups: Groups::new(groups),
            rule: Rule {
                eps: cfg.resolved_eps(),
                eps_scale: cfg.eps_scale.unwrap_or(1e-3),
                clip_threshold: cfg.clip_threshold.unwrap_or(1.0),
                decay_rate: cfg.decay_rate.unwrap_or(-0.8),
                beta1: cfg.beta1,
                weight_decay: cfg.resolved_weight_decay(),
                scale_parameter: cfg.scale_parameter.unwrap_or(true),
                relative_step: cfg.relative_step.unwrap_or(true),
                warmup_init: cfg.warmup_init.unwrap_or(false),
            },
            last_alpha: vec![None; n],
        }
    }
}

impl Rule {
    /// The new value and state of one parameter from its f32 value `p` and
    /// gradient `g`, with the step size α it took (0-d f32).
    fn update(
        &self,
        p: Tensor,
        g: Tensor,
        state: Option<&State>,
        lr: f64,
        steps: u64,
    ) -> Result<(Tensor, State, Tensor)> {
        let dims = p.dims().to_vec();
        let factored = dims.len() >= 2;
        let t = (steps + 1) as f64;

        // Step size α as a 0-d tensor (it depends on RMS(p)).
        let rho = if self.relative_step {
            let min_step = if self.warmup_init { 1e-6 * t } else { 1e-2 };
            min_step.min(1.0 / t.sqrt())
        } else {
            lr
        };
        let alpha = if self.scale_parameter {
            (rms(&p)?.maximum(self.eps_scale)? * rho)?
        } else {
            Tensor::new(rho as f32, p.device())?
        };

        let beta2t = 1.0 - t.powf(self.decay_rate);
        let u = g.sqr()?.affine(1.0, self.eps)?;
        let nd = dims.len();
        let (second, update) = if factored {
            let (row, col) = match state {
                Some(State {
                    second: Second::Factored { row, col },
                    ..
                }) => (row.clone(), col.clone()),
                _ => {
                    let (rs, cs) = factored_shapes(&dims);
                    (
                        Tensor::zeros(rs, DType::F32, p.device())?,
                        Tensor::zeros(cs, DType::F32, p.device())?,
                    )
                }
            };
            let row = ((row * beta2t)? + (u.mean(nd - 1)? * (1.0 - beta2t))?)?;
            let col = ((col * beta2t)? + (u.mean(nd - 2)? * (1.0 - beta2t))?)?;
            // (…, R, 1) and (…, 1, C)
            let r = row
                .broadcast_div(&row.mean_keepdim(nd - 2)?)?
                .sqrt()?
                .recip()?
                .unsqueeze(nd - 1)?;
            let c = col.sqrt()?.recip()?.unsqueeze(nd - 2)?;
            let update = r.broadcast_mul(&c)?.mul(&g)?;
            (Second::Factored { row, col }, update)
        } else {
            let v = match state {
                Some(State {
                    second: Second::Full(v),
                    ..
                }) => v.clone(),
                _ => u.zeros_like()?,
            };
            let v = ((v * beta2t)? + (u * (1.0 - beta2t))?)?;
            let update = v.sqrt()?.recip()?.mul(&g)?;
            (Second::Full(v), update)
        };
        // Clip the update's RMS to clip_threshold, then scale by α.
        let clip = (rms(&update)? / self.clip_threshold)?.maximum(1.0)?;
        let update = update.broadcast_div(&clip)?.broadcast_mul(&alpha)?;
        let (first, update) = match self.beta1 {
            Some(b1) => {
                let m = match state.and_then(|s| s.first.clone()) {
                    Some(m) => m,
                    None => update.zeros_like()?,
                };
                let m = ((m * b1)? + (update * (1.0 - b1))?)?;
                (Some(m.clone()), m)
            }
            None => (None, update),
        };
        let p = if self.weight_decay != 0.0 {
            let wd_alpha = (&alpha * self.weight_decay)?;
            (&p - p.broadcast_mul(&wd_alpha)?)?
        } else {
            p
        };
        let p = (p - update)?;
        Ok((p, State { second, first }, alpha))
    }
}

impl Optimizer for Adafactor {
    fn kind(&self) -> OptimizerKind {
        OptimizerKind::Adafactor
    }

    fn step(&mut self, grads: &GradStore) -> Result<()> {
        let mut first_alpha: Vec<Option<Tensor>> = vec![None; self.last_alpha.len()];
        let rule = &self.rule;
        self.groups.step(grads, |group, lr, p, g, state, steps| {
            let (p, state, alpha) = rule.update(p, g, state, lr, steps)?;
            first_alpha[group].get_or_insert(alpha);
            Ok((p, state))
        })?;
        for (last, first) in self.last_alpha.iter_mut().zip(first_alpha) {
            if first.is_some() {
                *last = first;
            }
        }
        Ok(())
    }

    fn set_lr(&mut self, group: usize, lr: f64) -> Result<()> {
        self.groups.set_lr(group, lr)
    }

    fn lr(&self, group: usize) -> Option<f64> {
        self.groups.lr(group)
    }

    fn effective_lr(&self, group: usize) -> Option<f64> {
        match self.last_alpha.get(group)? {
            Some(a) => a.to_scalar::<f32>().ok().map(|v| v as f64),
            None if self.rule.relative_step => None,
            None => self.lr(group),
        }
    }

    fn state(&self) -> Result<OptimizerState> {
        Ok(self.groups.save(self.kind(), |s, prefix, out| {
            match &s.second {
                Second::Factored { row, col } => {
                    out.tensors
                        .insert(format!("{prefix}.exp_avg_sq_row"), row.clone());
                    out.tensors
                        .insert(format!("{prefix}.exp_avg_sq_col"), col.clone());
                }
                Second::Full(v) => {
                    out.tensors
                        .insert(format!("{prefix}.exp_avg_sq"), v.clone());
                }
            }
            if let Some(m) = &s.first {
                out.tensors.insert(format!("{prefix}.exp_avg"), m.clone());
            }
        }))
    }

    fn load_state(&mut self, st: &OptimizerState) -> Result<()> {
        let use_first = self.rule.beta1.is_some();
        let (loaded, used) = self.groups.load(self.kind(), st, |prefix, var, st, used| {
            let dims = var.dims();
            let dev = var.device();
            let second = if dims.len() >= 2 {
                let (rs, cs) = factored_shapes(dims);
                Second::Factored {
                    row: load_tensor(
                        st,
                        &format!("{prefix}.exp_avg_sq_row"),
                        DType::F32,
                        &rs.into(),
                        dev,
                        used,
                    )?,
                    col: load_tensor(
                        st,
                        &format!("{prefix}.exp_avg_sq_col"),
                        DType::F32,
                        &cs.into(),
                        dev,
                        used,
                    )?,
                }
            } else {
                Second::Full(load_tensor(
                    st,
                    &format!("{prefix}.exp_avg_sq"),
                    DType::F32,
                    var.shape(),
                    dev,
                    used,
                )?)
            };
            let first = if use_first {
                Some(load_tensor(
                    st,
                    &format!("{prefix}.exp_avg"),
                    DType::F32,
                    var.shape(),
                    dev,
                    used,
                )?)
            } else {
                None
            };
            Ok(State { second, first })
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
    use candle_core::{Device, Tensor, Var};

    fn rms(x: &[f64]) -> f64 {
        (x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64).sqrt()
    }

    /// Independent f64 Adafactor for a (r, c) matrix or a vector (c == 0).
    struct RefAdafactor {
        r: usize,
        c: usize,
        row: Vec<f64>,
        col: Vec<f64>,
        v: Vec<f64>,
        m: Vec<f64>,
        t: f64,
    }

    struct Opts {
        lr: f64,
        relative: bool,
        scale: bool,
        warmup_init: bool,
        beta1: Option<f64>,
        wd: f64,
        clip: f64,
    }

    impl RefAdafactor {
        fn new(r: usize, c: usize) -> Self {
            let n = if c == 0 { r } else { r * c };
            Self {
                r,
                c,
                row: vec![0.0; r],
                col: vec![0.0; c],
                v: vec![0.0; n],
                m: vec![0.0; n],
                t: 0.0,
            }
        }

        fn step(&mut self, p: &mut [f64], g: &[f64], o: &Opts) {
            self.t += 1.0;
            let t = self.t;
            let rho = if o.relative {
                let min_step = if o.warmup_init { 1e-6 * t } else { 1e-2 };
                f64::min(min_step, 1.0 / t.sqrt())
            } else {
                o.lr
            };
            let alpha = if o.scale {
                f64::max(1e-3, rms(p)) * rho
            } else {
                rho
            };
            let b2 = 1.0 - t.powf(-0.8);
            let u: Vec<f64> = g.iter().map(|x| x * x + 1e-30).collect();
            let mut upd = vec![0.0; p.len()];
            if self.c == 0 {
                for i in 0..p.len() {
                    self.v[i] = b2 * self.v[i] + (1.0 - b2) * u[i];
                    upd[i] = g[i] / self.v[i].sqrt();
                }
            } else {
                let (r, c) = (self.r, self.c);
                for i in 0..r {
                    let mean: f64 = (0..c).map(|j| u[i * c + j]).sum::<f64>() / c as f64;
                    self.row[i] = b2 * self.row[i] + (1.0 - b2) * mean;
                }
                for j in 0..c {
                    let mean: f64 = (0..r).map(|i| u[i * c + j]).sum::<f64>() / r as f64;
                    self.col[j] = b2 * self.col[j] + (1.0 - b2) * mean;
                }
                let row_mean = self.row.iter().sum::<f64>() / r as f64;
                for i in 0..r {
                    for j in 0..c {
                        // V̂_ij = R_i · C_j / mean(R)
                        let vhat = self.row[i] * self.col[j] / row_mean;
                        upd[i * c + j] = g[i * c + j] / vhat.sqrt();
                    }
                }
            }
            let scale = f64::max(1.0, rms(&upd) / o.clip);
            for x in upd.iter_mut() {
                *x = *x / scale * alpha;
            }
            if let Some(b1) = o.beta1 {
                for i in 0..p.len() {
                    self.m[i] = b1 * self.m[i] + (1.0 - b1) * upd[i];
                    upd[i] = self.m[i];
                }
            }
            for i in 0..p.len() {
                p[i] = p[i] * (1.0 - o.wd * alpha) - upd[i];
            }
        }
    }

    fn run_case(cfg: &OptimizerConfig, o: &Opts) -> Result<()> {
        let (r, c) = (3, 4);
        let w0: Vec<f64> = uniform(12, 5).iter().map(|v| *v as f64).collect();
        let b0 = [0.5, -0.25, 0.125];
        let w = Var::from_tensor(&tensor(&w0).reshape((r, c))?)?;
        let b = var(&b0);
        let mut opt = build(cfg, vec![group("w", vec![w.clone(), b.clone()], o.lr)])?;
        let (mut rw, mut rb) = (RefAdafactor::new(r, c), RefAdafactor::new(3, 0));
        let (mut pw, mut pb) = (w0.clone(), b0.to_vec());
        for step in 0..6 {
            // Large gradients on some steps so that update clipping engages.
            let scale = if step % 3 == 1 { 50.0 } else { 1.0 };
            let gw: Vec<f64> = synthetic_grad(12, step).iter().map(|v| v * scale).collect();
            let gb = synthetic_grad(3, step + 20);
            opt.step(&grads(&[(&w, &gw), (&b, &gb)]))?;
            rw.step(&mut pw, &gw, o);
            rb.step(&mut pb, &gb, o);
            assert_close(&w, &pw, 2e-5, "factored");
            assert_close(&b, &pb, 2e-5, "vector");
        }
        Ok(())
    }

    #[test]
    fn adafactor_matches_reference_rule() -> Result<()> {
        // HF defaults: relative step, parameter scaling, no first moment.
        let cfg = OptimizerConfig::new(OptimizerKind::Adafactor);
        run_case(
            &cfg,
            &Opts {
                lr: 0.5, // ignored with relative_step
                relative: true,
                scale: true,
                warmup_init: false,
                beta1: None,
                wd: 0.0,
                clip: 1.0,
            },
        )?;
        // External lr, first moment, weight decay, tighter clipping.
        let mut cfg = OptimizerConfig::new(OptimizerKind::Adafactor);
        cfg.relative_step = Some(false);
        cfg.scale_parameter = Some(false);
        cfg.beta1 = Some(0.9);
        cfg.weight_decay = Some(0.1);
        cfg.clip_threshold = Some(0.5);
        run_case(
            &cfg,
            &Opts {
                lr: 0.01,
                relative: false,
                scale: false,
                warmup_init: false,
                beta1: Some(0.9),
                wd: 0.1,
                clip: 0.5,
            },
        )?;
        // warmup_init with parameter scaling.
        let mut cfg = OptimizerConfig::new(OptimizerKind::Adafactor);
        cfg.warmup_init = Some(true);
        run_case(
            &cfg,
            &Opts {
                lr: 1.0,
                relative: true,
                scale: true,
                warmup_init: true,
                beta1: None,
                wd: 0.0,
                clip: 1.0,
            },
        )
    }

    #[test]
    fn adafactor_factors_higher_rank_over_last_two_dims() -> Result<()> {
        let mut cfg = OptimizerConfig::new(OptimizerKind::Adafactor);
        cfg.relative_step = Some(false);
        let w = Var::zeros((2, 3, 4), candle_core::DType::F32, &Device::Cpu)?;
        let mut opt = build(&cfg, vec![group("w", vec![w.clone()], 0.01)])?;
        let g = Tensor::ones((2, 3, 4), candle_core::DType::F32, &Device::Cpu)?;
        let mut store = candle_core::backprop::GradStore::default();
        store.insert(&w, g);
        opt.step(&store)?;
        let st = opt.state()?;
        assert_eq!(st.tensors["w.0.exp_avg_sq_row"].dims(), &[2, 3]);
        assert_eq!(st.tensors["w.0.exp_avg_sq_col"].dims(), &[2, 4]);
        Ok(())
    }

    #[test]
    fn adafactor_converges_on_least_squares() -> Result<()> {
        let mut cfg = OptimizerConfig::new(OptimizerKind::Adafactor);
        cfg.relative_step = Some(false);
        cfg.scale_parameter = Some(false);
        let (first, last) = least_squares_run(&cfg, 0.02, 400)?;
        assert!(last < first * 1e-3, "loss {first} -> {last}");
        // Default (relative step) settings: the step is 1e-2·max(1e-3, RMS(W))
        // and W starts at 0, so progress is slow by design, but steady.
        let cfg = OptimizerConfig::new(OptimizerKind::Adafactor);
        let (first, last) = least_squares_run(&cfg, 1.0, 400)?;
        assert!(last < first * 0.97, "relative-step loss {first} -> {last}");
        Ok(())
    }
}
