//! Sampling: flow-matching samplers (Euler), Flux's shifted schedule, seeds and
//! batching, and PNG output carrying the generation parameters.
//!
//! Must not: know about HTTP or jobs; the daemon and the CLI call in here.

pub mod euler;
pub mod generate;
pub mod png_meta;
pub mod schedule;
