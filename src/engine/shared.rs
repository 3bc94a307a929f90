//! The state the [`Engine`](super::Engine) handle and the worker share: the job
//! records, the event numbering (store and bus see events in order), the pending
//! cancels of running samples, and the commands the handle sends the worker.
//!
//! Must not: run jobs (the worker does) or decide what a control means (the handle).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Mutex, MutexGuard, PoisonError};

use super::bus::EventBus;
use super::events::{Event, EventKind, JobState};
use super::requests::{Control, JobRequest};
use super::store::{JobRecord, JobStore};
use crate::clock::unix_now;

pub(super) enum Command {
    Run(String, JobRequest),
    Control(String, Control),
    Stop,
}

/// State shared by the handle and the worker.
pub(super) struct Shared {
    pub(super) store: JobStore,
    pub(super) bus: EventBus,
    pub(super) jobs: Mutex<HashMap<String, JobRecord>>,
    /// The newest sequence number handed out. Held while an event is numbered,
    /// stored and published, so the store and the bus see events in order.
    pub(super) seq: Mutex<u64>,
    /// The newest stored event of each job (replays skip jobs with nothing newer).
    pub(super) job_seqs: Mutex<HashMap<String, u64>>,
    /// Running sampling jobs asked to stop (checked after every sampling step).
    pub(super) cancel_samples: Mutex<HashSet<String>>,
    /// Makes job ids unique within a process (with the time for uniqueness across runs).
    pub(super) next_id: AtomicU64,
    /// Where finished LoRAs are copied for other tools (`<data>/loras` or ComfyUI's).
    pub(super) lora_dir: PathBuf,
}

/// A lock whose holder panicked still guards consistent data here (every change
/// under these locks is a single assignment or insert), so it is taken anyway.
pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    /// Numbers, stores and publishes an event.
    pub(super) fn emit(&self, job: &str, kind: EventKind) {
        let mut seq = lock(&self.seq);
        let event = Event {
            seq: *seq + 1,
            job: job.to_string(),
            time: unix_now(),
            kind,
        };
        *seq = event.seq;
        if !event.is_preview() {
            match self.store.append(&event) {
                Ok(()) => {
                    lock(&self.job_seqs).insert(event.job.clone(), event.seq);
                }
                Err(e) => {
                    tracing::warn!(job, error = %e, "could not store event");
                    // A partly written line must not swallow the next event.
                    let _ = self.store.seal_log(job);
                }
            }
        }
        self.bus.publish(&event);
    }

    pub(super) fn update(&self, id: &str, f: impl FnOnce(&mut JobRecord)) {
        self.update_in(&mut lock(&self.jobs), id, f);
    }

    /// Changes a job's record under the held jobs lock, saves it, and announces a
    /// change of state (under the same lock, so state events follow the records).
    pub(super) fn update_in(
        &self,
        jobs: &mut HashMap<String, JobRecord>,
        id: &str,
        f: impl FnOnce(&mut JobRecord),
    ) {
        let Some(rec) = jobs.get_mut(id) else {
            return;
        };
        let before = rec.state;
        f(rec);
        rec.updated = unix_now();
        if let Err(e) = self.store.save(rec) {
            tracing::warn!(job = id, error = %e, "could not save job record");
        }
        if rec.state != before {
            let state = rec.state;
            self.emit(id, EventKind::State { state });
        }
    }

    /// Copies a finished LoRA into the LoRA folder under its own name, or with
    /// `_2`, `_3`, … when that name is taken: a LoRA already there (another run's,
    /// or one of a ComfyUI install) is never replaced.
    pub(super) fn publish_lora(&self, path: &Path) -> std::io::Result<PathBuf> {
        let stem = path.file_stem().unwrap_or_default().to_string_lossy();
        let ext = path.extension().unwrap_or_default().to_string_lossy();
        let target = (1..)
            .map(|n| match n {
                1 => self.lora_dir.join(format!("{stem}.{ext}")),
                n => self.lora_dir.join(format!("{stem}_{n}.{ext}")),
            })
            .find(|p| !p.exists())
            .unwrap_or_default();
        crate::atomic_file::write(&target, &std::fs::read(path)?)?;
        Ok(target)
    }

    pub(super) fn set_state(&self, id: &str, state: JobState) {
        self.update(id, |r| r.state = state);
    }

    pub(super) fn sample_cancel_requested(&self, id: &str) -> bool {
        self.cancel_samples.lock().is_ok_and(|c| c.contains(id))
    }

    /// Whether cancelling `id` was asked, forgetting the request.
    pub(super) fn take_sample_cancel(&self, id: &str) -> bool {
        self.cancel_samples.lock().is_ok_and(|mut c| c.remove(id))
    }
}
