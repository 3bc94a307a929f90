//! Prodigy (Mishchenko & Defazio 2023): Adam with a D-adaptation estimate of
//! the distance to the solution, following the `prodigyopt` package (v1.1).
//!
//! Owns the Prodigy update only; must not schedule the lr or touch gradients.
//!
//! One step, with k the number of completed steps, d the current estimate,
//! β3 = beta3 or √β2, and per group dlr = d·lr·bc where
//! bc = √(1 − β2^(k+1)) / (1 − β1^(k+1)) with bias correction, else 1:
//!   g ← g + wd·p                        (only when decouple = false)
//!   first gradient of p: s = 0, p0 = p, m = v = 0
//!   lr > 0:  N += (d/d0)·dlr·⟨g, p0 − p⟩            (N starts as β3·N_prev)
//!            m ← β1·m + d(1 − β1)·g,  v ← β2·v + d²(1 − β2)·g²
//!            s ← β3·s + (d/d0)·(safeguard_warmup ? d : dlr)·g,  D += Σ|s|
//!   D = 0 (no progress possible): stop here, k unchanged.
//!   d̂ = d_coef·N / D;  if d = d0: d ← max(d, d̂);  d_max ← max(d_max, d̂);
//!   d ← min(d_max, d·growth_rate)
//!   p ← p − dlr·wd·p                    (only when decouple = true)
//!   p ← p − dlr · m / (√v + d·ε)        (β1 = 0: p ← p − dlr·d · g / (√v + d·ε))
//!   k ← k + 1
//! The learning rate is a multiplier of the adapted step, typically 1.0.
//!
//! Parameter groups: `prodigyopt` requires all groups to share one lr (or 0)
//! and uses the largest lr for the whole step. Here each group uses its own lr
//! in its dlr (identical when the lrs are equal), so a text-encoder group can
//! take a fraction of the adapted step; a group with lr 0 is frozen (in
//! `prodigyopt` it would still move along its stale first moment).
//! Not implemented: `slice_p` (statistics on every p-th element) and FSDP.

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor};

use super::{
    check_all_used, f32_value, gradient, load_scalar, load_tensor, scalars_to_host, Groups,
    OptimError, Optimizer, OptimizerConfig, OptimizerKind, OptimizerState, ParamGroup, Result,
};

#[derive(Clone, Debug)]
struct State {
    s: Tensor,
    /// The parameter at its first gradient; `None` when it was all zeros.
    p0: Option<Tensor>,
    m: Option<Tensor>,
    v: Tensor,
}

impl State {
    /// The state at a parameter's first gradient: s = 0, p0 = p, m = v = 0.
    fn new(p: &Tensor, first_moment: bool) -> Result<Self> {
        let nonzero =
            p.elem_count() > 0 && p.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()? != 0.0;
        Ok(Self {
            s: p.zeros_like()?,
            p0: if nonzero { Some(p.copy()?) } else { None },
            m: if first_moment {
                Some(p.zeros_like()?)
            } else {
                None
            },
            v: p.zeros_like()?,
        })
    }
}

pub(super) struct Prodigy {
    groups: Groups<State>,
    beta1: f64,
    beta2: f64,
    beta3: f64,
    eps: f64,
    weight_decay: f64,
    decouple: bool,
    use_bias_correction: bool,
    safeguard_warmup: bool,
    d0: f64,
    d_coef: f64,
    growth_rate: f64,
    // Optimizer-wide estimate.
    d: f64,
    d_max: f64,
    d_numerator: f64,
    k: u64,
}

impl Prodigy {
    pub(super) fn new(cfg: &OptimizerConfig, groups: Vec<ParamGroup>) -> Self {
        let (beta1, beta2) = cfg.resolved_betas();
        let d0 = cfg.d0.unwrap_or(1e-6);
        Self {
            groups: Groups::new(groups),
            beta1,
            beta2,
            beta3: cfg.beta3.unwrap_or(beta2.sqrt()),
            eps: cfg.resolved_eps(),
            weight_decay: cfg.resolved_weight_decay(),
            decouple: cfg.decouple.unwrap_or(true),
            use_bias_correction: cfg.use_bias_correction.unwrap_or(false),
            safeguard_warmup: cfg.safeguard_warmup.unwrap_or(false),
            d0,
            d_coef: cfg.d_coef.unwrap_or(1.0),
            growth_rate: cfg.growth_rate.unwrap_or(f64::INFINITY),
            d: d0,
            d_max: d0,
            d_numerator: 0.0,
            k: 0,
        }
    }
}

impl Optimizer for Prodigy {
    fn kind(&self) -> OptimizerKind {
        OptimizerKind::Prodigy
    }

    fn step(&mut self, grads: &GradStore) -> Result<()> {
        let (b1, b2, b3) = (self.beta1, self.beta2, self.beta3);
        let (d, d0) = (self.d, self.d0);
        let kp1 = (self.k + 1) as i32;
        let bc = if self.use_bias_correction {
            (1.0 - b2.powi(kp1)).sqrt() / (1.0 - b1.powi(kp1))
        } else {
            1.0
        };
        let lr_max = self.groups.groups.iter().map(|g| g.lr).fold(0.0, f64::max);
        let wd = self.weight_decay;
        let coupled_wd = wd != 0.0 && !self.decouple;
        let decoupled_wd = wd != 0.0 && self.decouple;
        // The gradient the statistics and a step without first moment use.
        let with_decay = |g: Tensor, p: &Tensor| -> Result<Tensor> {
            Ok(if coupled_wd { (g + (p * wd)?)? } else { g })
        };

        // Pass 1: statistics. Nothing is written to `self` until all are in.
        // (group, slot, new state)
        let mut pending: Vec<(usize, usize, State)> = Vec::new();
        let mut dots: Vec<Tensor> = Vec::new();
        let mut dot_coefs: Vec<f64> = Vec::new();
        let mut s_sums: Vec<Tensor> = Vec::new();
        for (gi, group) in self.groups.groups.iter().enumerate() {
            let dlr = d * group.lr * bc;
            for (si, slot) in group.slots.iter().enumerate() {
                let Some(g) = gradient(grads, &slot.var)? else {
                    continue;
                };
                let p = f32_value(&slot.var)?;
                let g = with_decay(g, &p)?;
                let mut st = match &slot.state {
                    Some(s) => s.clone(),
                    None => State::new(&p, b1 > 0.0)?,
                };
                if group.lr > 0.0 {
                    let diff = match &st.p0 {
                        Some(p0) => (p0 - &p)?,
                        None => p.neg()?,
                    };
                    dots.push((&g * diff)?.sum_all()?);
                    dot_coefs.push((d / d0) * dlr);
                    if let Some(m) = &st.m {
                        st.m = Some(((m * b1)? + (&g * (d * (1.0 - b1)))?)?);
                    }
                    st.v = ((&st.v * b2)? + (g.sqr()? * (d * d * (1.0 - b2)))?)?;
                    let s_coef = (d / d0) * if self.safeguard_warmup { d } else { dlr };
                    st.s = ((&st.s * b3)? + (&g * s_coef)?)?;
                    s_sums.push(st.s.abs()?.sum_all()?);
                }
                pending.push((gi, si, st));
            }
        }
        // One device round trip for all the dot products and |s| sums.
        let mut all = dots;
        all.extend(s_sums.iter().cloned());
        let n_dots = dot_coefs.len();
        let values = scalars_to_host(&all)?;
        let delta_numerator: f64 = values[..n_dots]
            .iter()
            .zip(&dot_coefs)
            .map(|(v, c)| c * *v as f64)
            .sum();
        let d_denom: f64 = values[n_dots..].iter().map(|v| *v as f64).sum();

        // Commit the statistics (prodigyopt updates them in place in pass 1).
        for (gi, si, st) in pending {
            self.groups.groups[gi].slots[si].state = Some(st);
        }
        if d_denom == 0.0 {
            // The step counts, though no parameter moved.
            self.groups.steps += 1;
            return Ok(());
        }
        let numerator = self.d_numerator * b3 + delta_numerator;
        let mut d_new = d;
        if lr_max > 0.0 {
            let d_hat = self.d_coef * numerator / d_denom;
            if d_new == d0 {
                d_new = d_new.max(d_hat);
            }
            self.d_max = self.d_max.max(d_hat);
            d_new = self.d_max.min(d_new * self.growth_rate);
        }
        self.d_numerator = numerator;
        self.d = d_new;

        // Pass 2: parameter updates with the new d in the denominator and the
        // step's dlr (computed from the old d); the states are pass 1's.
        // Without a first moment the step takes the gradient as pass 1 did
        // (p has not moved since).
        let eps = self.eps;
        self.groups.step(grads, |_, lr, p, g, state, _| {
            let st = state
                .cloned()
                .ok_or_else(|| OptimError::State("a parameter without statistics".into()))?;
            let dlr = d * lr * bc;
            let denom = st.v.sqrt()?.affine(1.0, d_new * eps)?;
            let step = match &st.m {
                Some(m) => (m / &denom)?.affine(dlr, 0.0)?,
                None => (with_decay(g, &p)? / &denom)?.affine(dlr * d_new, 0.0)?,
            };
            let p = if decoupled_wd {
                p.affine(1.0 - wd * dlr, 0.0)?
            } else {
                p
            };
            Ok(((p - step)?, st))
        })?;
        self.k += 1;
        Ok(())
    }

    fn set_lr(&mut self, group: usize, lr: f64) -> Result<()> {
        self.groups.set_lr(group, lr)
    }

    fn lr(&self, group: usize) -> Option<f64> {
        self.groups.lr(group)
    }

    /// d·lr, what kohya logs as the Prodigy learning rate.
    fn effective_lr(&self, group: usize) -> Option<f64> {
        self.lr(group).map(|lr| self.d * lr)
    }

    fn state(&self) -> Result<OptimizerState> {
        let mut out = self.groups.save(self.kind(), |s, prefix, out| {
            out.tensors.insert(format!("{prefix}.s"), s.s.clone());
            if let Some(p0) = &s.p0 {
                out.tensors.insert(format!("{prefix}.p0"), p0.clone());
            }
            if let Some(m) = &s.m {
                out.tensors.insert(format!("{prefix}.exp_avg"), m.clone());
            }
            out.tensors
                .insert(format!("{prefix}.exp_avg_sq"), s.v.clone());
        });
        out.scalars.insert("d".into(), self.d);
        out.scalars.insert("d_max".into(), self.d_max);
        out.scalars.insert("d_numerator".into(), self.d_numerator);
        out.scalars.insert("k".into(), self.k as f64);
        Ok(out)
    }

    fn load_state(&mut self, st: &OptimizerState) -> Result<()> {
        let use_m = self.beta1 > 0.0;
        let (loaded, mut used) = self.groups.load(self.kind(), st, |prefix, var, st, used| {
            let (shape, dev) = (var.shape(), var.device());
            let key = |f: &str| format!("{prefix}.{f}");
            let p0 = if st.tensors.contains_key(&key("p0")) {
                Some(load_tensor(st, &key("p0"), DType::F32, shape, dev, used)?)
            } else {
                None
            };
            let m = if use_m {
                Some(load_tensor(
                    st,
                    &key("exp_avg"),
                    DType::F32,
                    shape,
                    dev,
                    used,
                )?)
            } else {
                None
            };
            Ok(State {
                s: load_tensor(st, &key("s"), DType::F32, shape, dev, used)?,
                p0,
                m,
                v: load_tensor(st, &key("exp_avg_sq"), DType::F32, shape, dev, used)?,
            })
        })?;
        let d = load_scalar(st, "d", &mut used)?;
        let d_max = load_scalar(st, "d_max", &mut used)?;
        let d_numerator = load_scalar(st, "d_numerator", &mut used)?;
        let k = load_scalar(st, "k", &mut used)?;
        check_all_used(st, &used)?;
        self.groups.commit(loaded, st.step);
        self.d = d;
        self.d_max = d_max;
        self.d_numerator = d_numerator;
        self.k = k as u64;
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::needless_range_loop)] // reference rules read best indexed
mod tests {
    use super::super::testutil::*;
    use super::super::*;

    /// Independent f64 transcription of prodigyopt's step for one group.
    struct RefProdigy {
        d: f64,
        d_max: f64,
        num: f64,
        k: i32,
        s: Vec<f64>,
        p0: Vec<f64>,
        m: Vec<f64>,
        v: Vec<f64>,
        init: bool,
    }

    struct Opts {
        lr: f64,
        b1: f64,
        b2: f64,
        wd: f64,
        decouple: bool,
        bias_correction: bool,
        safeguard: bool,
        growth: f64,
        d_coef: f64,
    }

    impl RefProdigy {
        fn new(n: usize) -> Self {
            Self {
                d: 1e-6,
                d_max: 1e-6,
                num: 0.0,
                k: 0,
                s: vec![0.0; n],
                p0: vec![0.0; n],
                m: vec![0.0; n],
                v: vec![0.0; n],
                init: false,
            }
        }

        fn step(&mut self, p: &mut [f64], g_in: &[f64], o: &Opts) {
            let (d0, eps) = (1e-6, 1e-8);
            let b3 = o.b2.sqrt();
            let bc = if o.bias_correction {
                (1.0 - o.b2.powi(self.k + 1)).sqrt() / (1.0 - o.b1.powi(self.k + 1))
            } else {
                1.0
            };
            let d = self.d;
            let dlr = d * o.lr * bc;
            let mut g = g_in.to_vec();
            if o.wd != 0.0 && !o.decouple {
                for i in 0..p.len() {
                    g[i] += o.wd * p[i];
                }
            }
            if !self.init {
                self.p0 = p.to_vec();
                self.init = true;
            }
            let mut num = self.num * b3;
            let mut dot = 0.0;
            for i in 0..p.len() {
                dot += g[i] * (self.p0[i] - p[i]);
            }
            num += (d / d0) * dlr * dot;
            let mut den = 0.0;
            for i in 0..p.len() {
                self.m[i] = o.b1 * self.m[i] + d * (1.0 - o.b1) * g[i];
                self.v[i] = o.b2 * self.v[i] + d * d * (1.0 - o.b2) * g[i] * g[i];
                let c = if o.safeguard { d } else { dlr };
                self.s[i] = b3 * self.s[i] + (d / d0) * c * g[i];
                den += self.s[i].abs();
            }
            let d_hat = o.d_coef * num / den;
            let mut dn = d;
            if dn == d0 {
                dn = dn.max(d_hat);
            }
            self.d_max = self.d_max.max(d_hat);
            dn = self.d_max.min(dn * o.growth);
            self.num = num;
            self.d = dn;
            for i in 0..p.len() {
                let denom = self.v[i].sqrt() + dn * eps;
                if o.wd != 0.0 && o.decouple {
                    p[i] -= o.wd * dlr * p[i];
                }
                if o.b1 > 0.0 {
                    p[i] -= dlr * self.m[i] / denom;
                } else {
                    p[i] -= dlr * dn * g[i] / denom;
                }
                // Parameters live in f32: ⟨g, p0 − p⟩ sees the rounded values
                // (p0 − p cancels heavily), so the reference must too.
                p[i] = p[i] as f32 as f64;
            }
            self.k += 1;
        }
    }

    fn run_case(cfg: &OptimizerConfig, o: &Opts) -> Result<()> {
        // Small parameters: early Prodigy steps are ~d0, and p0 − p must not
        // drown in f32 rounding of p for the comparison of d to be sharp.
        let p_init = [0.004, -0.006, 0.011, 0.002];
        let a = var(&p_init);
        let mut opt = build(cfg, vec![group("w", vec![a.clone()], o.lr)])?;
        let mut r = RefProdigy::new(4);
        let mut p = p_init.to_vec();
        for step in 0..8 {
            // Gradients of a quadratic pulling towards 0, plus noise, so that
            // ⟨g, p0 − p⟩ becomes positive and d grows.
            let noise = synthetic_grad(4, step);
            let g: Vec<f64> = (0..4)
                .map(|i| (10.0 * p[i] + 0.1 * noise[i]) as f32 as f64)
                .collect();
            opt.step(&grads(&[(&a, &g)]))?;
            let before = p.clone();
            r.step(&mut p, &g, o);
            // Steps are ~d, far below the parameters: compare the step itself
            // (0.1% of it) with a few ulps of slack for f32 storage.
            let got = values(&a);
            for i in 0..4 {
                let err = (got[i] as f64 - p[i]).abs();
                let tol = 1e-3 * (p[i] - before[i]).abs() + 4e-7 * p[i].abs();
                assert!(
                    err <= tol,
                    "step {step} [{i}]: got {}, want {} (err {err:e})",
                    got[i],
                    p[i]
                );
            }
        }
        // d amplifies ulp-level differences of p through ⟨g, p0 − p⟩.
        let d = opt.state()?.scalars["d"];
        assert!((d - r.d).abs() <= 1e-3 * r.d, "d = {d}, reference {}", r.d);
        assert!(r.d > 1e-6, "d never grew in the reference: {}", r.d);
        Ok(())
    }

    #[test]
    fn prodigy_matches_reference_rule() -> Result<()> {
        let defaults = Opts {
            lr: 1.0,
            b1: 0.9,
            b2: 0.999,
            wd: 0.0,
            decouple: true,
            bias_correction: false,
            safeguard: false,
            growth: f64::INFINITY,
            d_coef: 1.0,
        };
        run_case(&OptimizerConfig::new(OptimizerKind::Prodigy), &defaults)?;

        let mut cfg = OptimizerConfig::new(OptimizerKind::Prodigy);
        cfg.weight_decay = Some(0.1);
        cfg.use_bias_correction = Some(true);
        cfg.growth_rate = Some(1.5);
        cfg.d_coef = Some(2.0);
        run_case(
            &cfg,
            &Opts {
                wd: 0.1,
                bias_correction: true,
                growth: 1.5,
                d_coef: 2.0,
                lr: 0.5,
                ..defaults
            },
        )?;

        // No first moment: the step uses the gradient scaled by the new d.
        let mut cfg = OptimizerConfig::new(OptimizerKind::Prodigy);
        cfg.betas = Some([0.0, 0.99]);
        run_case(
            &cfg,
            &Opts {
                b1: 0.0,
                b2: 0.99,
                ..defaults
            },
        )?;

        let mut cfg = OptimizerConfig::new(OptimizerKind::Prodigy);
        cfg.weight_decay = Some(0.1);
        cfg.decouple = Some(false);
        cfg.safeguard_warmup = Some(true);
        run_case(
            &cfg,
            &Opts {
                wd: 0.1,
                decouple: false,
                safeguard: true,
                ..defaults
            },
        )
    }

    #[test]
    fn prodigy_zero_lr_group_is_frozen_and_no_grad_is_a_no_op() -> Result<()> {
        let cfg = OptimizerConfig::new(OptimizerKind::Prodigy);
        let a = var(&[1.0, 2.0]);
        let b = var(&[3.0, 4.0]);
        let mut opt = build(
            &cfg,
            vec![
                group("a", vec![a.clone()], 1.0),
                group("b", vec![b.clone()], 0.0),
            ],
        )?;
        for step in 0..3 {
            let g = synthetic_grad(2, step);
            opt.step(&grads(&[(&a, &g), (&b, &g)]))?;
        }
        assert_eq!(values(&b), vec![3.0, 4.0]);
        assert_ne!(values(&a), vec![1.0, 2.0]);
        // A step without any gradient changes nothing but the call count.
        let before = opt.state()?;
        opt.step(&candle_core::backprop::GradStore::default())?;
        let after = opt.state()?;
        assert_eq!(before.scalars, after.scalars);
        Ok(())
    }

    #[test]
    fn prodigy_converges_on_least_squares() -> Result<()> {
        let cfg = OptimizerConfig::new(OptimizerKind::Prodigy);
        let (first, last) = least_squares_run(&cfg, 1.0, 400)?;
        assert!(last < first * 1e-3, "loss {first} -> {last}");
        Ok(())
    }
}
