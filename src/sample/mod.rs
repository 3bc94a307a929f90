//! Sampling: the flow-matching samplers (`samplers`: Euler, Euler a, Heun,
//! DPM++ 2M, chosen by name) driving a velocity model (`velocity`: the Flux model
//! with its conditioning, true CFG), the schedules (`schedule`: Flux's shifted
//! `simple` and `beta`, chosen by name, with the beta quantiles of `beta`),
//! seeds and batching (`generate`), and PNG output carrying the generation
//! parameters (`png_meta`). Every dialect reaches these by name.
//!
//! Must not: know about HTTP or jobs; the daemon and the CLI call in here.

pub mod beta;
pub mod generate;
pub mod png_meta;
pub mod samplers;
pub mod schedule;
pub mod velocity;
