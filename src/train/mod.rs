//! Training: datasets (folders, captions, repeats, buckets), caches, the
//! flow-matching objective, optimizers, learning-rate schedules, checkpoints, the
//! kohya training metadata written into the LoRA, and the one training loop ([`run`])
//! that the CLI and the daemon both drive.
//!
//! Must not: know about HTTP; the daemon and the CLI drive it through its API.

pub(crate) mod cache;
pub mod checkpoint;
pub mod config;
pub mod dataset;
pub mod events;
pub mod lr_schedule;
pub(crate) mod metadata;
pub mod network;
pub(crate) mod objective;
pub mod optim;
pub mod pretrain_tiny;
pub(crate) mod prompts;
pub(crate) mod recompute;
pub(crate) mod run;
pub mod shapes;
pub mod trainer;
