//! Sampling schedules: the times t from 1 (noise) to 0 (data) a sampler visits,
//! chosen by name ([`Scheduler`]), each optionally time-shifted with a shift μ
//! that grows with the image token count (BFL `get_schedule`). The μ of a token
//! count comes from the model's [`Shift`] parameters.
//!
//! - `simple`: t from 1 to 0 in equal steps, then shifted: Flux's own schedule,
//!   what ComfyUI's `simple` gives a Flux model (its sigma table is this curve
//!   sampled at 10 000 points) and what A1111/Forge call `Automatic` for Flux.
//! - `beta`: ComfyUI's `beta_scheduler` (α = β = 0.6, after "Beta Sampling is All
//!   You Need", arXiv 2407.12173): the unshifted times sit at quantiles of
//!   Beta(0.6, 0.6), denser near both ends, then are shifted like `simple`'s.
//!   ComfyUI looks the quantiles up in its 10 000-entry sigma table (rounding each
//!   to the nearest entry and dropping repeats); our schedule is the continuous
//!   curve, so we take the exact quantile instead: t_i = shift(ppf(1 − i/steps)),
//!   i < steps, then 0. That keeps exactly `steps` steps, matches `simple`'s
//!   continuous form, and differs from ComfyUI's by the table's rounding only:
//!   at most 1.5·10⁻⁴ in t before the shift, 4.7·10⁻⁴ after it at μ = 1.15
//!   (checked for 1 to 150 steps, where ComfyUI drops no repeated entry either).
//!
//! Must not: know about models or tensors; the bundle says which shift applies.

use serde::{Deserialize, Serialize};

use super::beta;
use super::samplers::UnknownName;

/// The shift parameters are a fact of the model family (its bundle's sampling
/// defaults say which one it uses); the schedule here only applies them.
pub use crate::model::bundle::Shift;

/// exp(μ) / (exp(μ) + (1/t − 1)^σ) with σ = 1; t = 0 and t = 1 map to themselves.
pub(crate) fn time_shift(mu: f64, t: f64) -> f64 {
    if t <= 0.0 {
        return 0.0;
    }
    if t >= 1.0 {
        return 1.0;
    }
    mu.exp() / (mu.exp() + (1.0 / t - 1.0))
}

/// ComfyUI's `beta_scheduler` parameters.
const BETA_ALPHA: f64 = 0.6;
const BETA_BETA: f64 = 0.6;

/// A schedule, chosen by name (ComfyUI's scheduler names).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema,
)]
pub enum Scheduler {
    /// Equal steps in t, shifted (Flux's schedule).
    #[default]
    #[serde(rename = "simple")]
    Simple,
    /// Beta(0.6, 0.6) quantiles in t, shifted (ComfyUI's `beta`).
    #[serde(rename = "beta")]
    Beta,
}

/// A scheduler's names: ours (ComfyUI's) and A1111's `/schedulers` name and
/// label. Several A1111 names may run one of our schedules.
#[derive(Clone, Copy, Debug)]
pub struct SchedulerNames {
    pub scheduler: Scheduler,
    pub a1111_name: &'static str,
    pub a1111_label: &'static str,
}

/// Every A1111 scheduler name we accept and the schedule it runs. `automatic`
/// (A1111's default) and `normal` (ComfyUI's `normal` is linear in t between the
/// sigma table's ends, the same shifted curve for Flux) run `simple`.
pub const A1111_SCHEDULERS: [SchedulerNames; 4] = [
    SchedulerNames {
        scheduler: Scheduler::Simple,
        a1111_name: "automatic",
        a1111_label: "Automatic",
    },
    SchedulerNames {
        scheduler: Scheduler::Simple,
        a1111_name: "simple",
        a1111_label: "Simple",
    },
    SchedulerNames {
        scheduler: Scheduler::Simple,
        a1111_name: "normal",
        a1111_label: "Normal",
    },
    SchedulerNames {
        scheduler: Scheduler::Beta,
        a1111_name: "beta",
        a1111_label: "Beta",
    },
];

impl std::str::FromStr for Scheduler {
    type Err = UnknownName;

    /// Our names and A1111's (see [`Scheduler::from_name`]).
    fn from_str(name: &str) -> Result<Self, UnknownName> {
        Self::from_name(name).ok_or_else(|| UnknownName {
            what: "scheduler",
            name: name.to_string(),
            accepted: Self::ALL.map(Scheduler::name).join(", "),
        })
    }
}

impl Scheduler {
    /// Every schedule, in the order lists show them.
    pub const ALL: [Scheduler; 2] = [Scheduler::Simple, Scheduler::Beta];

    /// Our (and ComfyUI's) name: `simple`, `beta`.
    pub fn name(self) -> &'static str {
        match self {
            Scheduler::Simple => "simple",
            Scheduler::Beta => "beta",
        }
    }

    /// The schedule a name means: ours, or an A1111 name or label (any case).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|s| s.name().eq_ignore_ascii_case(name))
            .or_else(|| Self::from_a1111_name(name))
    }

    /// The schedule an A1111 name or label means (any case): exactly the names
    /// of [`A1111_SCHEDULERS`].
    pub fn from_a1111_name(name: &str) -> Option<Self> {
        A1111_SCHEDULERS
            .iter()
            .find(|n| {
                n.a1111_name.eq_ignore_ascii_case(name) || n.a1111_label.eq_ignore_ascii_case(name)
            })
            .map(|n| n.scheduler)
    }

    /// How A1111 writes it in an infotext's `Schedule type`.
    pub fn a1111_label(self) -> &'static str {
        match self {
            Scheduler::Simple => "Simple",
            Scheduler::Beta => "Beta",
        }
    }

    /// The `steps + 1` times from 1 to 0 the sampler visits.
    pub fn times(self, steps: usize, image_seq_len: usize, shift: Option<Shift>) -> Vec<f64> {
        let steps = steps.max(1);
        let unshifted = |i: usize| -> f64 {
            let q = 1.0 - i as f64 / steps as f64;
            match self {
                Scheduler::Simple => q,
                Scheduler::Beta if i == steps => 0.0,
                Scheduler::Beta => beta::quantile(q, BETA_ALPHA, BETA_BETA),
            }
        };
        let ts = (0..=steps).map(unshifted);
        match shift {
            Some(s) => {
                let mu = s.mu(image_seq_len);
                ts.map(|t| time_shift(mu, t)).collect()
            }
            None => ts.collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unshifted_simple_is_linear_from_one_to_zero() {
        assert_eq!(
            Scheduler::Simple.times(4, 256, None),
            vec![1.0, 0.75, 0.5, 0.25, 0.0]
        );
    }

    #[test]
    fn shift_keeps_endpoints_and_pushes_times_up() {
        let s = Scheduler::Simple.times(4, 4096, Some(Shift::default()));
        assert_eq!(s[0], 1.0);
        assert_eq!(s[4], 0.0);
        // μ = 1.15 at 4096 tokens: t = 0.5 → e^1.15 / (e^1.15 + 1)
        let expect = 1.15f64.exp() / (1.15f64.exp() + 1.0);
        assert!((s[2] - expect).abs() < 1e-12);
        assert!(s.windows(2).all(|w| w[0] > w[1]));
    }

    #[test]
    fn beta_sits_at_beta_quantiles_denser_at_both_ends() {
        // scipy.stats.beta.ppf([0.75, 0.5, 0.25], 0.6, 0.6)
        let expect = [1.0, 0.824319621347305, 0.5, 0.17568037865269498, 0.0];
        let got = Scheduler::Beta.times(4, 256, None);
        for (g, e) in got.iter().zip(expect) {
            assert!((g - e).abs() < 1e-12, "{got:?}");
        }
        let s = Scheduler::Beta.times(10, 4096, Some(Shift::default()));
        assert_eq!((s[0], s[10]), (1.0, 0.0));
        let gaps: Vec<f64> = s.windows(2).map(|w| w[0] - w[1]).collect();
        assert!(gaps.iter().all(|g| *g > 0.0), "{s:?}");
        // Unshifted, the middle gap is the widest; the end gaps are narrower.
        let u = Scheduler::Beta.times(10, 0, None);
        let gaps: Vec<f64> = u.windows(2).map(|w| w[0] - w[1]).collect();
        assert!(gaps[0] < gaps[4] && gaps[9] < gaps[5], "{gaps:?}");
    }

    #[test]
    fn names_and_a1111_names_resolve() {
        for s in Scheduler::ALL {
            assert_eq!(Scheduler::from_name(s.name()), Some(s));
            assert_eq!(serde_json::to_value(s).unwrap(), s.name());
            assert_eq!(Scheduler::from_name(s.a1111_label()), Some(s));
        }
        assert_eq!(Scheduler::from_name("Automatic"), Some(Scheduler::Simple));
        assert_eq!(Scheduler::from_name("BETA"), Some(Scheduler::Beta));
        assert_eq!(Scheduler::from_name("karras"), None);
        // Ours are A1111 names too: the A1111 lookup takes exactly the same.
        for s in Scheduler::ALL {
            assert_eq!(Scheduler::from_a1111_name(s.name()), Some(s));
        }
        let err = "karras".parse::<Scheduler>().unwrap_err().to_string();
        assert_eq!(err, "unknown scheduler `karras`; accepted: simple, beta");
    }
}
