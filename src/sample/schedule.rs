//! Flux's sampling schedule: t from 1 to 0 in equal steps, optionally time-shifted
//! with a shift μ that grows with the image token count (BFL `get_schedule`).
//! The μ of a token count comes from the model's [`Shift`] parameters.

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

/// The `steps + 1` times from 1 to 0 the sampler visits.
pub fn schedule(steps: usize, image_seq_len: usize, shift: Option<Shift>) -> Vec<f64> {
    let steps = steps.max(1);
    let ts = (0..=steps).map(|i| 1.0 - i as f64 / steps as f64);
    match shift {
        Some(s) => {
            let mu = s.mu(image_seq_len);
            ts.map(|t| time_shift(mu, t)).collect()
        }
        None => ts.collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unshifted_is_linear_from_one_to_zero() {
        assert_eq!(schedule(4, 256, None), vec![1.0, 0.75, 0.5, 0.25, 0.0]);
    }

    #[test]
    fn shift_keeps_endpoints_and_pushes_times_up() {
        let s = schedule(4, 4096, Some(Shift::default()));
        assert_eq!(s[0], 1.0);
        assert_eq!(s[4], 0.0);
        // μ = 1.15 at 4096 tokens: t = 0.5 → e^1.15 / (e^1.15 + 1)
        let expect = 1.15f64.exp() / (1.15f64.exp() + 1.0);
        assert!((s[2] - expect).abs() < 1e-12);
        assert!(s.windows(2).all(|w| w[0] > w[1]));
    }
}
