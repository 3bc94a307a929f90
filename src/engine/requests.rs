//! What callers hand the engine and what it answers with: the [`JobRequest`]s
//! (training configs, [`SampleJob`]s with their [`LoraChoice`]s), the [`Control`]s
//! that steer a job, and the [`EngineError`]s.
//!
//! Must not: run anything; these are plain data the protocol adapters build.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::events::JobState;
use crate::sample::generate::SampleRequest;
use crate::train::config::TrainConfig;

/// A LoRA to apply when sampling: a file, or the live adapter of a running
/// training job (exactly one of the two).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoraChoice {
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub path: Option<PathBuf>,
    #[serde(default)]
    pub live_job: Option<String>,
    #[serde(default = "one")]
    #[schema(default = 1.0)]
    pub strength: f64,
}

fn one() -> f64 {
    1.0
}

/// A sampling job: the request and the LoRAs to apply.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SampleJob {
    pub request: SampleRequest,
    #[serde(default)]
    pub loras: Vec<LoraChoice>,
}

/// What can be submitted.
#[derive(Clone, Debug)]
pub enum JobRequest {
    Train(Box<TrainConfig>),
    Sample(SampleJob),
}

/// Steering a job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Control {
    Cancel,
    Pause,
    Resume,
}

/// Errors the engine reports to callers.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("no job `{0}`")]
    NoSuchJob(String),
    #[error("job `{id}` is {state:?}: {action} is not possible")]
    BadState {
        id: String,
        state: JobState,
        action: &'static str,
    },
    #[error("the engine has stopped")]
    Stopped,
    #[error("{0}")]
    Io(#[from] std::io::Error),
}
