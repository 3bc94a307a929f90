//! What a training run reports ([`TrainEvent`]) and how it is steered from outside
//! ([`TrainControl`]: cancel between optimizer steps; the daemon's engine pauses
//! and resumes its jobs with hooks of its own).
//!
//! Events are plain serialisable data so the daemon can forward them unchanged
//! (WebSocket, events.jsonl), read them back from its job store, and the CLI can
//! draw its progress bar from them.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::{Deserialize, Serialize};

/// Progress of one optimizer step.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct StepStats {
    pub step: u64,
    pub total_steps: u64,
    pub epoch: u64,
    pub loss: f64,
    /// Exponential moving average of the loss (β = 0.9, bias-corrected).
    pub loss_ema: f64,
    pub lr: f64,
    #[schema(required)]
    pub grad_norm: Option<f64>,
    pub it_per_s: f64,
    pub eta_s: f64,
    /// Peak resident memory of the process so far, in bytes (when the OS tells).
    #[schema(required)]
    pub peak_memory_bytes: Option<u64>,
}

/// Everything a run reports, in order.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum TrainEvent {
    /// Latents and text embeddings encoded (or found cached) for `done` of `total`
    /// images, before the first step (reported about a hundred times per run).
    Caching {
        done: usize,
        total: usize,
    },
    Started {
        total_steps: u64,
        steps_per_epoch: u64,
        images: usize,
        trainable_parameters: usize,
        #[schema(required)]
        resumed_from_step: Option<u64>,
    },
    Step(StepStats),
    Sample {
        step: u64,
        #[schema(value_type = Vec<String>)]
        paths: Vec<PathBuf>,
    },
    Saved {
        step: u64,
        #[schema(value_type = String)]
        path: PathBuf,
    },
    Validation {
        step: u64,
        loss: f64,
    },
    Paused {
        step: u64,
    },
    Resumed {
        step: u64,
    },
    Finished {
        step: u64,
        #[schema(value_type = String)]
        path: PathBuf,
        seconds: f64,
    },
    Cancelled {
        step: u64,
    },
    Failed {
        message: String,
    },
}

/// A shared switch a running trainer checks between optimizer steps.
#[derive(Debug, Default)]
pub struct TrainControl {
    cancel: AtomicBool,
}

impl TrainControl {
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::SeqCst);
    }

    pub(crate) fn is_cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }
}

/// Peak resident set size of this process (Linux `VmHWM`), in bytes.
pub(crate) fn peak_memory_bytes() -> Option<u64> {
    proc_status_bytes("VmHWM:")
}

/// Resident memory of the process now, in bytes (Linux; `None` elsewhere).
pub(crate) fn memory_bytes() -> Option<u64> {
    proc_status_bytes("VmRSS:")
}

/// `(total, available)` bytes of the machine's RAM (Linux `/proc/meminfo`), zeros
/// elsewhere.
pub(crate) fn system_ram() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    (field("MemTotal:"), field("MemAvailable:"))
}

/// A `kB` field of `/proc/self/status`, in bytes.
fn proc_status_bytes(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_serialise_with_a_type_tag() {
        let e = TrainEvent::Saved {
            step: 3,
            path: PathBuf::from("a.safetensors"),
        };
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["type"], "saved");
        assert_eq!(v["step"], 3);
    }

    #[test]
    fn control_flags_toggle() {
        let c = TrainControl::default();
        assert!(!c.is_cancelled());
        c.cancel();
        assert!(c.is_cancelled());
    }
}
