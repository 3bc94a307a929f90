//! The [`Engine`] handle: starting the worker, submitting and steering jobs,
//! reading job records and stored events, subscribing to live ones, deleting
//! jobs, shutting down. Cheap to clone; every protocol adapter holds one.
//!
//! Must not: touch the model or run jobs (it sends commands to the worker).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex};

use super::bus::{self, EventBus, Subscription};
use super::events::{Event, EventKind, JobState};
use super::requests::{Control, EngineError, JobRequest};
use super::shared::{lock, Command, Shared};
use super::store::{JobKind, JobRecord, JobStore};
use super::worker::Worker;
use crate::clock::unix_now;
use crate::model::bundle::ModelBundle;

/// Handle to the running engine; cheap to clone.
#[derive(Clone)]
pub struct Engine {
    shared: Arc<Shared>,
    tx: Sender<Command>,
    worker: Arc<Mutex<Option<std::thread::JoinHandle<()>>>>,
}

impl Engine {
    /// Starts the worker on `bundle`, reloading jobs from `data_dir`.
    pub fn start(
        bundle: Arc<ModelBundle>,
        data_dir: &Path,
        lora_dir: PathBuf,
    ) -> Result<Self, EngineError> {
        let store = JobStore::open(data_dir)?;
        std::fs::create_dir_all(&lora_dir)?;
        // A process killed mid-write leaves temporary files; the targets are intact.
        let removed = crate::atomic_file::remove_leftovers(store.root(), 2)?
            + crate::atomic_file::remove_leftovers(&lora_dir, 0)?;
        if removed > 0 {
            tracing::info!(removed, "removed temporary files left by a stopped process");
        }
        let mut jobs = HashMap::new();
        let mut job_seqs = HashMap::new();
        let mut interrupted = vec![];
        for mut rec in store.load_all()? {
            store.seal_log(&rec.id)?;
            if let Some(last) = store.last_seq(&rec.id) {
                job_seqs.insert(rec.id.clone(), last);
            }
            if !rec.state.is_terminal() && rec.state != JobState::Interrupted {
                rec.state = JobState::Interrupted;
                rec.updated = unix_now();
                store.save(&rec)?;
                interrupted.push(rec.id.clone());
            }
            jobs.insert(rec.id.clone(), rec);
        }
        // Numbers go on from the newest ever handed out (deleted jobs' included), so
        // a client's `since` from before the restart stays meaningful.
        let last_seq = job_seqs
            .values()
            .copied()
            .max()
            .unwrap_or(0)
            .max(store.high_water());
        let shared = Arc::new(Shared {
            store,
            bus: EventBus::new(last_seq),
            jobs: Mutex::new(jobs),
            seq: Mutex::new(last_seq),
            job_seqs: Mutex::new(job_seqs),
            cancel_samples: Mutex::default(),
            next_id: AtomicU64::new(0),
            lora_dir,
        });
        for id in interrupted {
            shared.emit(
                &id,
                EventKind::State {
                    state: JobState::Interrupted,
                },
            );
        }
        let (tx, rx) = channel();
        let worker_shared = shared.clone();
        let handle = std::thread::Builder::new()
            .name("fluxlora-engine".into())
            .spawn(move || Worker::new(worker_shared, bundle, rx).run())?;
        Ok(Self {
            shared,
            tx,
            worker: Arc::new(Mutex::new(Some(handle))),
        })
    }

    /// Queues a job; returns its id.
    pub fn submit(&self, mut request: JobRequest) -> Result<String, EngineError> {
        // Time and a per-process counter; the folder is claimed, so a clock that
        // stepped back cannot hand out the id of a stored job.
        let id = loop {
            let n = self.shared.next_id.fetch_add(1, Ordering::SeqCst);
            let id = format!("{:x}-{n:04x}", (unix_now() * 1000.0) as u64);
            if self.shared.store.claim(&id)? {
                break id;
            }
        };
        if let JobRequest::Train(cfg) = &mut request {
            // A training job writes into its own folder; the stored request says so.
            cfg.output_dir = self.shared.store.dir(&id);
        }
        let (kind, value) = match &request {
            JobRequest::Train(cfg) => (JobKind::Train, serde_json::to_value(cfg.as_ref())),
            JobRequest::Sample(s) => (JobKind::Sample, serde_json::to_value(s)),
        };
        let record = JobRecord {
            id: id.clone(),
            kind,
            state: JobState::Queued,
            created: unix_now(),
            updated: unix_now(),
            request: value.unwrap_or_default(),
            outputs: vec![],
            error: None,
        };
        self.shared.store.save(&record)?;
        let mut jobs = lock(&self.shared.jobs);
        jobs.insert(id.clone(), record);
        self.shared.emit(
            &id,
            EventKind::State {
                state: JobState::Queued,
            },
        );
        // Sent under the jobs lock: a control of this job comes after it.
        if self.tx.send(Command::Run(id.clone(), request)).is_err() {
            jobs.remove(&id);
            let _ = self.shared.store.remove(&id);
            return Err(EngineError::Stopped);
        }
        Ok(id)
    }

    /// Cancels, pauses or resumes a job (resuming an interrupted job re-queues it:
    /// training continues from its last save, sampling starts over; a cancelled or
    /// failed training job also continues from its last save).
    ///
    /// The check and the action happen under the jobs lock, so two controls of one
    /// job cannot both pass a check that only one of them should.
    pub fn control(&self, id: &str, control: Control) -> Result<(), EngineError> {
        let mut jobs = lock(&self.shared.jobs);
        let rec = jobs
            .get(id)
            .ok_or_else(|| EngineError::NoSuchJob(id.into()))?;
        let state = rec.state;
        let refuse = |action| {
            Err(EngineError::BadState {
                id: id.into(),
                state,
                action,
            })
        };
        if rec.kind == JobKind::Sample && state == JobState::Running {
            // Sampling runs inside the worker: cancel is checked after every step;
            // pausing half-way would hold the device for nothing.
            if control == Control::Cancel {
                lock(&self.shared.cancel_samples).insert(id.to_string());
                return Ok(());
            }
            return refuse("pause (a running sampling job can only be cancelled)");
        }
        let to_worker = match (control, state) {
            (Control::Cancel, s) if s.is_terminal() => return refuse("cancel"),
            (Control::Cancel, JobState::Interrupted) => {
                // Nothing runs or waits for it: it ends here.
                self.shared
                    .update_in(&mut jobs, id, |r| r.state = JobState::Cancelled);
                return Ok(());
            }
            // A cancelled training run saved its state, and a failed one (a full
            // disk during a save, say) keeps its last complete save: resuming
            // continues from it.
            (Control::Resume, JobState::Interrupted)
            | (Control::Resume, JobState::Cancelled | JobState::Failed)
                if state == JobState::Interrupted || rec.kind == JobKind::Train =>
            {
                let request = match rec.kind {
                    JobKind::Train => serde_json::from_value(rec.request.clone())
                        .map(|c| JobRequest::Train(Box::new(c))),
                    JobKind::Sample => {
                        serde_json::from_value(rec.request.clone()).map(JobRequest::Sample)
                    }
                }
                .map_err(|e| {
                    EngineError::Io(std::io::Error::other(format!(
                        "job `{id}`: stored request unreadable: {e}"
                    )))
                })?;
                Command::Run(id.to_string(), request)
            }
            (Control::Cancel, _)
            | (Control::Pause, JobState::Running | JobState::Queued)
            | (Control::Resume, JobState::Paused) => Command::Control(id.to_string(), control),
            (Control::Pause, _) => return refuse("pause"),
            (Control::Resume, _) => return refuse("resume"),
        };
        let requeue = matches!(to_worker, Command::Run(..));
        self.tx.send(to_worker).map_err(|_| EngineError::Stopped)?;
        if requeue {
            self.shared.update_in(&mut jobs, id, |r| {
                r.state = JobState::Queued;
                r.error = None;
            });
        }
        Ok(())
    }

    pub fn job(&self, id: &str) -> Result<JobRecord, EngineError> {
        lock(&self.shared.jobs)
            .get(id)
            .cloned()
            .ok_or_else(|| EngineError::NoSuchJob(id.into()))
    }

    /// Waits until job `id` ends (finished, failed or cancelled) and returns its record.
    pub fn wait(&self, id: &str) -> Result<JobRecord, EngineError> {
        // Subscribe first, then look: an end between the two is still seen.
        let sub = self.subscribe(Some(vec![id.to_string()]), 64, false);
        loop {
            let rec = self.job(id)?;
            if rec.state.is_terminal() {
                return Ok(rec);
            }
            if let bus::Received::Timeout = sub.recv(std::time::Duration::from_secs(1)) {
                if !self.is_running() {
                    return Err(EngineError::Stopped);
                }
            }
        }
    }

    pub(crate) fn jobs(&self) -> Vec<JobRecord> {
        let mut v: Vec<JobRecord> = lock(&self.shared.jobs).values().cloned().collect();
        v.sort_by(|a, b| a.created.total_cmp(&b.created));
        v
    }

    /// Stored events of a job after `since` (replay).
    pub fn events_since(&self, id: &str, since: u64) -> Result<Vec<Event>, EngineError> {
        self.job(id)?;
        Ok(self.shared.store.events_since(id, since)?)
    }

    /// Stored events after `since` of some jobs (all when `None`), in sequence order:
    /// what a subscriber that reconnects or fell behind missed.
    pub(crate) fn replay(&self, jobs: Option<&[String]>, since: u64) -> Vec<Event> {
        let ids: Vec<String> = match jobs {
            Some(ids) => ids.to_vec(),
            None => self.jobs().into_iter().map(|r| r.id).collect(),
        };
        let newest = lock(&self.shared.job_seqs).clone();
        let ids = ids
            .into_iter()
            .filter(|id| newest.get(id).is_some_and(|&last| last > since));
        let mut events: Vec<Event> = ids
            .filter_map(|id| self.shared.store.events_since(&id, since).ok())
            .flatten()
            .collect();
        events.sort_by_key(|e| e.seq);
        events
    }

    /// The sequence number of the newest event published.
    pub fn last_seq(&self) -> u64 {
        self.shared.bus.last_seq()
    }

    /// Live events of some jobs (all when `None`), after [`Subscription::after`];
    /// see [`EventBus::subscribe`].
    pub fn subscribe(
        &self,
        jobs: Option<Vec<String>>,
        capacity: usize,
        previews: bool,
    ) -> Subscription {
        self.shared.bus.subscribe(jobs, capacity, previews)
    }

    /// How each live subscription is keeping up.
    pub(crate) fn subscribers(&self) -> Vec<bus::SubscriberStats> {
        self.shared.bus.stats()
    }

    pub fn job_dir(&self, id: &str) -> PathBuf {
        self.shared.store.dir(id)
    }

    /// Deletes a finished, failed, cancelled or interrupted job and its folder (the
    /// copy of its LoRA in the LoRA folder stays).
    pub(crate) fn delete(&self, id: &str) -> Result<(), EngineError> {
        let mut jobs = lock(&self.shared.jobs);
        let state = jobs
            .get(id)
            .ok_or_else(|| EngineError::NoSuchJob(id.into()))?
            .state;
        if !(state.is_terminal() || state == JobState::Interrupted) {
            return Err(EngineError::BadState {
                id: id.into(),
                state,
                action: "delete (cancel it first)",
            });
        }
        jobs.remove(id);
        drop(jobs);
        lock(&self.shared.job_seqs).remove(id);
        // Its events' numbers stay used after a restart.
        self.shared.store.set_high_water(self.last_seq())?;
        Ok(self.shared.store.remove(id)?)
    }

    /// Whether the worker still runs jobs.
    fn is_running(&self) -> bool {
        self.worker
            .lock()
            .is_ok_and(|h| h.as_ref().is_some_and(|h| !h.is_finished()))
    }

    /// Stops the worker after the current step (a running training job stays
    /// resumable from its last save) and waits for it.
    pub fn shutdown(&self) {
        let _ = self.tx.send(Command::Stop);
        if let Some(handle) = self.worker.lock().ok().and_then(|mut h| h.take()) {
            let _ = handle.join();
        }
        // Preview numbers are not stored with any job; the next start goes on after them.
        if let Err(e) = self.shared.store.set_high_water(self.last_seq()) {
            tracing::warn!(error = %e, "could not record the newest event number");
        }
    }
}
