//! Learning-rate schedules: the factor applied to every parameter group's base
//! learning rate at a given optimizer step.
//!
//! Owns: [`LrSchedule`] (the serde config, names as kohya's `--lr_scheduler`
//! and diffusers/transformers' `get_scheduler`) and [`LrSchedule::multiplier`],
//! which reproduces the `get_*_schedule_with_warmup` lambdas exactly.
//!
//! Must not: touch optimizers; the trainer calls `Optimizer::set_lr(g,
//! base_lr[g] · multiplier(step, …))` before each optimizer step, where
//! `step` counts the optimizer steps already taken (0 for the first, as
//! PyTorch's `LambdaLR`), so with warmup the first step runs at lr 0.

use serde::{Deserialize, Serialize};

/// The schedule shapes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleKind {
    /// 1 throughout.
    #[default]
    Constant,
    /// Linear ramp 0 → 1 over the warmup, then 1.
    ConstantWithWarmup,
    /// Warmup, then linear decay to 0 at `total_steps`.
    Linear,
    /// Warmup, then ½(1 + cos(2π·num_cycles·progress)); num_cycles 0.5 (the
    /// default) is a half cosine from 1 to 0.
    Cosine,
    /// Warmup, then `num_cycles` half cosines from 1 to 0 with hard restarts.
    #[serde(alias = "cosine_with_hard_restarts")]
    CosineWithRestarts,
    /// Warmup, then (lr_init − lr_end)·(1 − progress)^power + lr_end, over lr_init.
    Polynomial,
}

/// A learning-rate schedule as configured. Unset fields take the defaults of
/// transformers' schedule functions; fields that do not apply to `kind` are
/// rejected by [`LrSchedule::validate`].
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct LrSchedule {
    pub kind: ScheduleKind,
    /// Warmup length in optimizer steps.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warmup_steps: Option<u64>,
    /// Warmup as a fraction of the total steps, in [0, 1]; the step count is
    /// ⌊ratio · total⌋ as kohya computes it. Excludes `warmup_steps`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warmup_ratio: Option<f64>,
    /// Cosine: number of waves (default 0.5). Cosine with restarts: number of
    /// cycles (default 1, kohya's `--lr_scheduler_num_cycles`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub num_cycles: Option<f64>,
    /// Polynomial: the power (default 1.0, kohya's `--lr_scheduler_power`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub power: Option<f64>,
    /// Polynomial: the final learning rate, absolute (default 1e-7, as
    /// transformers/diffusers).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lr_end: Option<f64>,
    /// Cosine: the floor as a fraction of the base lr (transformers'
    /// `cosine_with_min_lr` `min_lr_rate`; default 0).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_lr_ratio: Option<f64>,
}

/// A schedule setting out of range or not applicable; names the field.
#[derive(Debug, thiserror::Error)]
#[error("invalid lr schedule setting `{field}`: {message}")]
pub struct ScheduleError {
    pub field: &'static str,
    pub message: String,
}

fn err(field: &'static str, message: impl Into<String>) -> ScheduleError {
    ScheduleError {
        field,
        message: message.into(),
    }
}

impl LrSchedule {
    /// Checks ranges and applicability of the fields.
    pub fn validate(&self) -> Result<(), ScheduleError> {
        use ScheduleKind as S;
        let k = self.kind;
        if self.warmup_steps.is_some() && self.warmup_ratio.is_some() {
            return Err(err(
                "warmup_ratio",
                "set either warmup_steps or warmup_ratio, not both",
            ));
        }
        if k == S::Constant {
            // kohya refuses a warmup for `constant` (use constant_with_warmup).
            if self.warmup_steps.unwrap_or(0) != 0 {
                return Err(err(
                    "warmup_steps",
                    "constant has no warmup; use constant_with_warmup",
                ));
            }
            if self.warmup_ratio.unwrap_or(0.0) != 0.0 {
                return Err(err(
                    "warmup_ratio",
                    "constant has no warmup; use constant_with_warmup",
                ));
            }
        }
        if let Some(r) = self.warmup_ratio {
            if !(0.0..=1.0).contains(&r) {
                return Err(err("warmup_ratio", format!("must be in [0, 1], got {r}")));
            }
        }
        let cosine = matches!(k, S::Cosine | S::CosineWithRestarts);
        if let Some(c) = self.num_cycles {
            if !cosine {
                return Err(err(
                    "num_cycles",
                    "applies to cosine and cosine_with_restarts only",
                ));
            }
            if !(c.is_finite() && c > 0.0) {
                return Err(err("num_cycles", format!("must be > 0, got {c}")));
            }
        }
        if let Some(p) = self.power {
            if k != S::Polynomial {
                return Err(err("power", "applies to polynomial only"));
            }
            if !(p.is_finite() && p > 0.0) {
                return Err(err("power", format!("must be > 0, got {p}")));
            }
        }
        if let Some(e) = self.lr_end {
            if k != S::Polynomial {
                return Err(err("lr_end", "applies to polynomial only"));
            }
            if !(e.is_finite() && e >= 0.0) {
                return Err(err("lr_end", format!("must be >= 0, got {e}")));
            }
        }
        if let Some(m) = self.min_lr_ratio {
            if k != S::Cosine {
                return Err(err("min_lr_ratio", "applies to cosine only"));
            }
            if !(0.0..=1.0).contains(&m) {
                return Err(err("min_lr_ratio", format!("must be in [0, 1], got {m}")));
            }
        }
        Ok(())
    }

    /// [`LrSchedule::validate`] plus the run-time condition of transformers'
    /// polynomial schedule: `lr_end` must be below the reference lr.
    pub(crate) fn check(&self, reference_lr: f64) -> Result<(), ScheduleError> {
        self.validate()?;
        let below = reference_lr > self.resolved_lr_end();
        if self.kind == ScheduleKind::Polynomial && !below {
            return Err(err(
                "lr_end",
                format!(
                    "must be below the learning rate ({reference_lr}), got {}",
                    self.resolved_lr_end()
                ),
            ));
        }
        Ok(())
    }

    /// The warmup length in steps for a run of `total_steps`.
    pub(crate) fn warmup_steps(&self, total_steps: u64) -> u64 {
        match (self.warmup_steps, self.warmup_ratio) {
            (Some(w), _) => w,
            (None, Some(r)) => (r * total_steps as f64).floor() as u64,
            (None, None) => 0,
        }
    }

    fn resolved_lr_end(&self) -> f64 {
        self.lr_end.unwrap_or(1e-7)
    }

    /// The factor for the optimizer step `step` (0-based) of `total_steps`.
    ///
    /// `reference_lr` is the lr that transformers' polynomial schedule reads
    /// from the optimizer's defaults (kohya: `--learning_rate`, the main/DiT
    /// lr); the factor is the same for every group, as one `LambdaLR` over all
    /// groups computes it. Other kinds ignore it.
    pub(crate) fn multiplier(&self, step: u64, total_steps: u64, reference_lr: f64) -> f64 {
        use ScheduleKind as S;
        let warmup = match self.kind {
            S::Constant => 0,
            _ => self.warmup_steps(total_steps),
        };
        if step < warmup {
            return step as f64 / warmup.max(1) as f64;
        }
        let progress = || (step - warmup) as f64 / total_steps.saturating_sub(warmup).max(1) as f64;
        match self.kind {
            S::Constant | S::ConstantWithWarmup => 1.0,
            S::Linear => {
                let left = total_steps as f64 - step as f64;
                (left / total_steps.saturating_sub(warmup).max(1) as f64).max(0.0)
            }
            S::Cosine => {
                let cycles = self.num_cycles.unwrap_or(0.5);
                let min = self.min_lr_ratio.unwrap_or(0.0);
                let f = 0.5 * (1.0 + (std::f64::consts::PI * cycles * 2.0 * progress()).cos());
                (f * (1.0 - min) + min).max(0.0)
            }
            S::CosineWithRestarts => {
                let p = progress();
                if p >= 1.0 {
                    return 0.0;
                }
                let cycles = self.num_cycles.unwrap_or(1.0);
                (0.5 * (1.0 + (std::f64::consts::PI * ((cycles * p) % 1.0)).cos())).max(0.0)
            }
            S::Polynomial => {
                let lr_end = self.resolved_lr_end();
                if reference_lr.is_nan() || reference_lr <= 0.0 {
                    return 0.0;
                }
                if step > total_steps {
                    return lr_end / reference_lr;
                }
                let decay_steps = total_steps.saturating_sub(warmup);
                let pct_remaining = if decay_steps == 0 {
                    0.0
                } else {
                    1.0 - (step - warmup) as f64 / decay_steps as f64
                };
                let power = self.power.unwrap_or(1.0);
                ((reference_lr - lr_end) * pct_remaining.powf(power) + lr_end) / reference_lr
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) {
        assert!((a - b).abs() < 1e-12, "{a} != {b}");
    }

    /// A schedule of `kind` with every setting at its default.
    fn of_kind(kind: ScheduleKind) -> LrSchedule {
        LrSchedule {
            kind,
            ..LrSchedule::default()
        }
    }

    fn sched(kind: ScheduleKind, warmup: u64) -> LrSchedule {
        LrSchedule {
            kind,
            warmup_steps: Some(warmup),
            ..LrSchedule::default()
        }
    }

    #[test]
    fn constant_and_warmup_ramp() {
        let c = of_kind(ScheduleKind::Constant);
        for s in [0, 1, 50, 1000] {
            close(c.multiplier(s, 100, 1e-4), 1.0);
        }
        let w = sched(ScheduleKind::ConstantWithWarmup, 10);
        close(w.multiplier(0, 100, 1e-4), 0.0);
        close(w.multiplier(5, 100, 1e-4), 0.5);
        close(w.multiplier(9, 100, 1e-4), 0.9);
        close(w.multiplier(10, 100, 1e-4), 1.0);
        close(w.multiplier(500, 100, 1e-4), 1.0);
    }

    #[test]
    fn linear_decays_to_zero_after_warmup() {
        let l = sched(ScheduleKind::Linear, 10);
        close(l.multiplier(4, 110, 1e-4), 0.4);
        close(l.multiplier(10, 110, 1e-4), 1.0);
        close(l.multiplier(60, 110, 1e-4), 0.5);
        close(l.multiplier(110, 110, 1e-4), 0.0);
        close(l.multiplier(200, 110, 1e-4), 0.0);
    }

    #[test]
    fn cosine_half_way_is_one_half() {
        let c = of_kind(ScheduleKind::Cosine);
        close(c.multiplier(0, 100, 1e-4), 1.0);
        close(c.multiplier(50, 100, 1e-4), 0.5);
        close(
            c.multiplier(25, 100, 1e-4),
            0.5 * (1.0 + (std::f64::consts::PI / 4.0).cos()),
        );
        close(c.multiplier(100, 100, 1e-4), 0.0);
        // With warmup the half-way point moves.
        let w = sched(ScheduleKind::Cosine, 10);
        close(w.multiplier(5, 110, 1e-4), 0.5);
        close(w.multiplier(60, 110, 1e-4), 0.5);
        // Floor.
        let mut m = of_kind(ScheduleKind::Cosine);
        m.min_lr_ratio = Some(0.1);
        close(m.multiplier(100, 100, 1e-4), 0.1);
        close(m.multiplier(50, 100, 1e-4), 0.55);
    }

    #[test]
    fn cosine_with_restarts_restarts() {
        let mut r = of_kind(ScheduleKind::CosineWithRestarts);
        r.num_cycles = Some(2.0);
        close(r.multiplier(0, 100, 1e-4), 1.0);
        close(r.multiplier(25, 100, 1e-4), 0.5);
        close(r.multiplier(50, 100, 1e-4), 1.0); // restart
        close(r.multiplier(75, 100, 1e-4), 0.5);
        close(r.multiplier(100, 100, 1e-4), 0.0);
        // Default one cycle: a plain half cosine.
        let one = of_kind(ScheduleKind::CosineWithRestarts);
        let cos = of_kind(ScheduleKind::Cosine);
        for s in 0..100 {
            close(one.multiplier(s, 100, 1e-4), cos.multiplier(s, 100, 1e-4));
        }
    }

    #[test]
    fn polynomial_ends_at_lr_end() {
        let lr = 1e-4;
        let p = of_kind(ScheduleKind::Polynomial);
        close(p.multiplier(0, 100, lr), 1.0);
        close(p.multiplier(50, 100, lr), ((lr - 1e-7) * 0.5 + 1e-7) / lr);
        close(p.multiplier(100, 100, lr), 1e-7 / lr);
        close(p.multiplier(150, 100, lr), 1e-7 / lr);
        let mut sq = sched(ScheduleKind::Polynomial, 20);
        sq.power = Some(2.0);
        close(sq.multiplier(10, 120, lr), 0.5);
        close(sq.multiplier(70, 120, lr), ((lr - 1e-7) * 0.25 + 1e-7) / lr);
        assert!(sq.check(lr).is_ok());
        assert_eq!(sq.check(1e-8).map_err(|e| e.field).err(), Some("lr_end"));
    }

    #[test]
    fn warmup_ratio_equals_equivalent_steps() {
        for kind in [
            ScheduleKind::ConstantWithWarmup,
            ScheduleKind::Linear,
            ScheduleKind::Cosine,
            ScheduleKind::CosineWithRestarts,
            ScheduleKind::Polynomial,
        ] {
            for (ratio, total, steps) in [(0.1, 200u64, 20u64), (0.05, 99, 4), (0.0, 50, 0)] {
                let by_ratio = LrSchedule {
                    kind,
                    warmup_ratio: Some(ratio),
                    ..LrSchedule::default()
                };
                let by_steps = sched(kind, steps);
                assert_eq!(by_ratio.warmup_steps(total), steps);
                for s in 0..=total + 5 {
                    assert_eq!(
                        by_ratio.multiplier(s, total, 1e-4).to_bits(),
                        by_steps.multiplier(s, total, 1e-4).to_bits(),
                        "{kind:?} step {s}"
                    );
                }
            }
        }
    }

    #[test]
    fn config_validation_names_fields() {
        let field = |s: LrSchedule| s.validate().map_err(|e| e.field).err();
        let mut both = sched(ScheduleKind::Linear, 10);
        both.warmup_ratio = Some(0.1);
        assert_eq!(field(both), Some("warmup_ratio"));
        assert_eq!(
            field(sched(ScheduleKind::Constant, 10)),
            Some("warmup_steps")
        );
        let mut p = of_kind(ScheduleKind::Linear);
        p.power = Some(2.0);
        assert_eq!(field(p), Some("power"));
        let mut c = of_kind(ScheduleKind::Linear);
        c.num_cycles = Some(2.0);
        assert_eq!(field(c), Some("num_cycles"));
        let mut r = of_kind(ScheduleKind::Cosine);
        r.warmup_ratio = Some(1.5);
        assert_eq!(field(r), Some("warmup_ratio"));
        assert_eq!(field(sched(ScheduleKind::Constant, 0)), None);

        let s: LrSchedule = serde_json::from_str(
            r#"{"kind": "cosine_with_restarts", "num_cycles": 3, "warmup_ratio": 0.05}"#,
        )
        .expect("parse");
        assert_eq!(s.kind, ScheduleKind::CosineWithRestarts);
        assert_eq!(s.num_cycles, Some(3.0));
        assert!(serde_json::from_str::<LrSchedule>(r#"{"kind": "linear", "cycles": 2}"#).is_err());
        assert!(serde_json::from_str::<LrSchedule>(r#"{"kind": "exponential"}"#).is_err());
    }
}
