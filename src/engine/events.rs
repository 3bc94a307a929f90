//! The engine's event: one numbered, timestamped record per thing that happened to
//! a job. The single source of progress for every surface (WebSocket, job files,
//! ComfyUI and A1111 adapters).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::train::events::TrainEvent;

/// Where a job is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued,
    Running,
    Paused,
    Finished,
    Cancelled,
    Failed,
    /// The process stopped while the job ran; it can be resumed from its last save.
    Interrupted,
}

impl JobState {
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Finished | Self::Cancelled | Self::Failed)
    }
}

/// What happened.
#[derive(Clone, Debug, Serialize, PartialEq, utoipa::ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EventKind {
    /// The job's state changed.
    State {
        state: JobState,
    },
    /// A training event, as the trainer reported it.
    Train {
        event: TrainEvent,
    },
    /// A sampling step finished.
    SampleStep {
        step: usize,
        total: usize,
    },
    /// Images were written.
    Images {
        #[schema(value_type = Vec<String>)]
        paths: Vec<PathBuf>,
    },
    /// A preview image (PNG bytes, shared by every subscriber's queue); never
    /// stored, dropped first under back-pressure.
    Preview {
        step: u64,
        #[serde(skip)]
        png: std::sync::Arc<[u8]>,
    },
    Error {
        message: String,
    },
}

/// One event of one job. On the wire (WebSocket text frames, `events.jsonl`,
/// `/v1/jobs/{id}/events`) it is `{"seq", "job", "type", "time", "data"}`, where
/// a training event's type is the trainer's own (`started`, `step`, `saved`, …).
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    /// Monotonically increasing over the whole daemon.
    pub seq: u64,
    pub job: String,
    /// Unix seconds.
    pub time: f64,
    pub kind: EventKind,
}

impl Event {
    pub fn is_preview(&self) -> bool {
        matches!(self.kind, EventKind::Preview { .. })
    }

    /// The wire form: `type` pulled out of the kind, the rest under `data`.
    pub fn to_json(&self) -> serde_json::Value {
        let mut data = match &self.kind {
            EventKind::Train { event } => serde_json::to_value(event),
            kind => serde_json::to_value(kind),
        }
        .unwrap_or_default();
        let kind = data
            .as_object_mut()
            .and_then(|m| m.remove("type"))
            .unwrap_or_default();
        serde_json::json!({
            "seq": self.seq,
            "job": self.job,
            "type": kind,
            "time": self.time,
            "data": data,
        })
    }
}

impl Serialize for Event {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.to_json().serialize(s)
    }
}
