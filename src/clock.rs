//! Wall-clock time as Unix seconds: what events, job records and LoRA metadata
//! carry.
//!
//! Must not: be used to measure durations (use `std::time::Instant`).

/// Seconds since the Unix epoch (0 if the clock is before it).
pub(crate) fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}
