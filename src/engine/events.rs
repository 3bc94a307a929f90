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
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EventKind {
    /// The job's state changed.
    State {
        state: JobState,
    },
    /// A training event, as the trainer reported it (on the wire under the
    /// trainer's own type, which [`Event`]'s `Deserialize` reads back).
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
        #[serde(skip, default = "no_png")]
        png: std::sync::Arc<[u8]>,
    },
    Error {
        message: String,
    },
}

fn no_png() -> std::sync::Arc<[u8]> {
    std::sync::Arc::from(Vec::new())
}

impl EventKind {
    /// The kind a wire `type` and `data` describe: one of the engine's own kinds,
    /// or else a training event.
    fn from_wire(kind: &str, data: serde_json::Value) -> Result<Self, String> {
        let mut tagged = match data {
            serde_json::Value::Object(m) => m,
            serde_json::Value::Null => serde_json::Map::new(),
            other => return Err(format!("`{kind}` event: data is not an object: {other}")),
        };
        tagged.insert("type".into(), kind.into());
        let tagged = serde_json::Value::Object(tagged);
        match serde_json::from_value::<EventKind>(tagged.clone()) {
            Ok(own) => Ok(own),
            Err(own) => serde_json::from_value::<TrainEvent>(tagged)
                .map(|event| EventKind::Train { event })
                .map_err(|train| format!("`{kind}` event: {own}; as a training event: {train}")),
        }
    }
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
    pub(crate) fn is_preview(&self) -> bool {
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

/// Reads the wire form back (a stored line of `events.jsonl`). A preview's image
/// never travels in JSON: it comes back empty.
impl<'de> Deserialize<'de> for Event {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Wire {
            seq: u64,
            job: String,
            #[serde(rename = "type")]
            kind: String,
            time: f64,
            #[serde(default)]
            data: serde_json::Value,
        }
        let wire = Wire::deserialize(d)?;
        Ok(Event {
            seq: wire.seq,
            job: wire.job,
            time: wire.time,
            kind: EventKind::from_wire(&wire.kind, wire.data).map_err(serde::de::Error::custom)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::events::StepStats;

    fn event(seq: u64, kind: EventKind) -> Event {
        Event {
            seq,
            job: "j1".into(),
            time: 1_700_000_000.5,
            kind,
        }
    }

    fn train(event: TrainEvent) -> EventKind {
        EventKind::Train { event }
    }

    /// Every kind, with the training events of every trainer kind.
    fn every_kind() -> Vec<EventKind> {
        let path = PathBuf::from("/data/jobs/j1/a.safetensors");
        vec![
            EventKind::State {
                state: JobState::Interrupted,
            },
            EventKind::SampleStep { step: 2, total: 4 },
            EventKind::Images {
                paths: vec![path.clone(), PathBuf::from("b.png")],
            },
            EventKind::Preview {
                step: 3,
                png: no_png(),
            },
            EventKind::Error {
                message: "café".into(),
            },
            train(TrainEvent::Caching { done: 1, total: 3 }),
            train(TrainEvent::Started {
                total_steps: 10,
                steps_per_epoch: 5,
                images: 3,
                trainable_parameters: 1024,
                resumed_from_step: Some(4),
            }),
            train(TrainEvent::Started {
                total_steps: 10,
                steps_per_epoch: 5,
                images: 3,
                trainable_parameters: 1024,
                resumed_from_step: None,
            }),
            train(TrainEvent::Step(StepStats {
                step: 1,
                total_steps: 10,
                epoch: 0,
                loss: 0.25,
                loss_ema: 0.5,
                lr: 1e-3,
                grad_norm: Some(1.5),
                it_per_s: 2.0,
                eta_s: 4.5,
                peak_memory_bytes: Some(1 << 30),
            })),
            train(TrainEvent::Step(StepStats {
                step: 2,
                total_steps: 10,
                epoch: 1,
                loss: 0.125,
                loss_ema: 0.25,
                lr: 5e-4,
                grad_norm: None,
                it_per_s: 2.0,
                eta_s: 4.0,
                peak_memory_bytes: None,
            })),
            train(TrainEvent::Sample {
                step: 2,
                paths: vec![PathBuf::from("sample/x_000002_00_1.png")],
            }),
            train(TrainEvent::Saved {
                step: 2,
                path: path.clone(),
            }),
            train(TrainEvent::Validation {
                step: 2,
                loss: 0.75,
            }),
            train(TrainEvent::Paused { step: 3 }),
            train(TrainEvent::Resumed { step: 3 }),
            train(TrainEvent::Finished {
                step: 10,
                path,
                seconds: 12.5,
            }),
            train(TrainEvent::Cancelled { step: 5 }),
            train(TrainEvent::Failed {
                message: "out of memory".into(),
            }),
        ]
    }

    #[test]
    fn every_kind_reads_back_from_its_wire_form() {
        for (seq, kind) in every_kind().into_iter().enumerate() {
            let e = event(seq as u64 + 1, kind);
            let line = serde_json::to_string(&e).unwrap();
            let back: Event =
                serde_json::from_str(&line).unwrap_or_else(|err| panic!("{line}: {err}"));
            assert_eq!(back, e, "{line}");
            assert_eq!(back.to_json(), e.to_json());
        }
    }

    #[test]
    fn training_events_keep_the_trainers_type_on_the_wire() {
        let e = event(
            7,
            train(TrainEvent::Saved {
                step: 2,
                path: PathBuf::from("a.safetensors"),
            }),
        );
        let v = e.to_json();
        assert_eq!(v["type"], "saved");
        assert_eq!(v["data"]["step"], 2);
        assert!(v["data"].get("type").is_none());
    }

    #[test]
    fn a_line_of_no_known_kind_does_not_parse() {
        for line in [
            r#"{"seq": 1, "job": "j1", "type": "nonsense", "time": 0.0, "data": {}}"#,
            r#"{"seq": 1, "job": "j1", "type": "step", "time": 0.0, "data": {"step": 1}}"#,
            r#"{"seq": 1, "job": "j1", "time": 0.0, "data": {}}"#,
            r#"{"seq": 1, "job": "j1", "type": "state", "time": 0.0, "data": 3}"#,
        ] {
            assert!(serde_json::from_str::<Event>(line).is_err(), "{line}");
        }
    }
}
