//! The engine: one worker thread owns the device and the loaded model, runs jobs
//! from one queue, and publishes every event on the bus and into the job store.
//!
//! Jobs are training runs and sampling requests. Sampling requests that arrive
//! while a training job runs are served between its optimizer steps, on the same
//! base weights, optionally with the live adapter being trained (no second copy of
//! the model). LoRA files are hot-loaded and cached by path and modification time.
//! Control (cancel, pause, resume) takes effect between steps. On start, jobs that
//! were running when the process died are marked interrupted; resuming one
//! continues from its last saved state.
//!
//! Must not: know about HTTP; protocol adapters translate requests into [`JobRequest`]s.

pub mod bus;
pub mod events;
mod lora_cache;
pub mod store;

use std::collections::{HashMap, VecDeque};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use serde::{Deserialize, Serialize};

use self::bus::{EventBus, Subscription};
use self::events::{Event, EventKind, JobState};
use self::store::{JobKind, JobRecord, JobStore};
use crate::clock::unix_now;
use crate::model::adapter::{AdapterSet, Lora};
use crate::model::bundle::ModelBundle;
use crate::model::lora_io;
use crate::sample::generate::{generate, ResolvedRequest, SampleRequest};
use crate::sample::png_meta::save_png;
use crate::train::checkpoint;
use crate::train::config::TrainConfig;
use crate::train::events::TrainEvent;
use crate::train::trainer::Trainer;

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

enum Command {
    Run(String, JobRequest),
    Control(String, Control),
    Stop,
}

/// State shared by the handle and the worker.
struct Shared {
    store: JobStore,
    bus: EventBus,
    jobs: Mutex<HashMap<String, JobRecord>>,
    /// The newest sequence number handed out. Held while an event is numbered,
    /// stored and published, so the store and the bus see events in order.
    seq: Mutex<u64>,
    /// The newest stored event of each job (replays skip jobs with nothing newer).
    job_seqs: Mutex<HashMap<String, u64>>,
    /// Running sampling jobs asked to stop (checked after every sampling step).
    cancel_samples: Mutex<std::collections::HashSet<String>>,
    /// Makes job ids unique within a process (with the time for uniqueness across runs).
    next_id: AtomicU64,
    /// Where finished LoRAs are copied for other tools (`<data>/loras` or ComfyUI's).
    lora_dir: PathBuf,
}

/// A lock whose holder panicked still guards consistent data here (every change
/// under these locks is a single assignment or insert), so it is taken anyway.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    /// Numbers, stores and publishes an event.
    fn emit(&self, job: &str, kind: EventKind) {
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

    fn update(&self, id: &str, f: impl FnOnce(&mut JobRecord)) {
        self.update_in(&mut lock(&self.jobs), id, f);
    }

    /// Changes a job's record under the held jobs lock, saves it, and announces a
    /// change of state (under the same lock, so state events follow the records).
    fn update_in(
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
    fn publish_lora(&self, path: &Path) -> std::io::Result<PathBuf> {
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

    fn set_state(&self, id: &str, state: JobState) {
        self.update(id, |r| r.state = state);
    }

    fn sample_cancel_requested(&self, id: &str) -> bool {
        self.cancel_samples.lock().is_ok_and(|c| c.contains(id))
    }

    /// Whether cancelling `id` was asked, forgetting the request.
    fn take_sample_cancel(&self, id: &str) -> bool {
        self.cancel_samples.lock().is_ok_and(|mut c| c.remove(id))
    }
}

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
    /// training continues from its last save, sampling starts over).
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
            (Control::Resume, JobState::Interrupted) => {
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
            self.shared
                .update_in(&mut jobs, id, |r| r.state = JobState::Queued);
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

    pub fn jobs(&self) -> Vec<JobRecord> {
        let mut v: Vec<JobRecord> = lock(&self.shared.jobs).values().cloned().collect();
        v.sort_by(|a, b| a.created.total_cmp(&b.created));
        v
    }

    /// Stored events of a job after `since` (replay).
    pub fn events_since(
        &self,
        id: &str,
        since: u64,
    ) -> Result<Vec<serde_json::Value>, EngineError> {
        self.job(id)?;
        Ok(self.shared.store.events_since(id, since)?)
    }

    /// Stored events after `since` of some jobs (all when `None`), in sequence order:
    /// what a subscriber that reconnects or fell behind missed.
    pub fn replay(&self, jobs: Option<&[String]>, since: u64) -> Vec<serde_json::Value> {
        let ids: Vec<String> = match jobs {
            Some(ids) => ids.to_vec(),
            None => self.jobs().into_iter().map(|r| r.id).collect(),
        };
        let newest = lock(&self.shared.job_seqs).clone();
        let ids = ids
            .into_iter()
            .filter(|id| newest.get(id).is_some_and(|&last| last > since));
        let mut events: Vec<serde_json::Value> = ids
            .filter_map(|id| self.shared.store.events_since(&id, since).ok())
            .flatten()
            .collect();
        events.sort_by_key(|e| e["seq"].as_u64());
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
    pub fn subscribers(&self) -> Vec<bus::SubscriberStats> {
        self.shared.bus.stats()
    }

    pub fn job_dir(&self, id: &str) -> PathBuf {
        self.shared.store.dir(id)
    }

    /// Deletes a finished, failed, cancelled or interrupted job and its folder (the
    /// copy of its LoRA in the LoRA folder stays).
    pub fn delete(&self, id: &str) -> Result<(), EngineError> {
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

/// A cheap preview of packed latents (first image of the batch): ComfyUI's linear
/// latent→RGB projection, PNG-encoded, at latent resolution.
fn preview_png(packed: &candle_core::Tensor, lh: usize, lw: usize) -> candle_core::Result<Vec<u8>> {
    let latents = crate::model::flux::unpack_latents(&packed.narrow(0, 0, 1)?, lh, lw)?;
    let rgb =
        crate::model::vae::latent_to_rgb_preview(&latents.to_dtype(candle_core::DType::F32)?)?; // [0, 1]
    let images = crate::model::vae::tensor_to_images(&((rgb * 2.0)? - 1.0)?)?;
    let mut png = Vec::new();
    if let Some(img) = images.first() {
        img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .map_err(candle_core::Error::wrap)?;
    }
    Ok(png)
}

/// What a job that panicked reports: a bug, not the request's fault. The worker
/// survives it and goes on with the next job.
fn panic_message(panic: Box<dyn std::any::Any + Send>) -> String {
    let what = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into());
    tracing::error!(panic = %what, "a job panicked");
    format!("internal error (a bug in fluxlora, please report it): {what}")
}

/// The worker: owns the model and runs jobs one at a time.
struct Worker {
    shared: Arc<Shared>,
    bundle: Arc<ModelBundle>,
    rx: Receiver<Command>,
    queue: VecDeque<(String, JobRequest)>,
    paused: Vec<String>,
    loras: lora_cache::LoraCache,
    stop: bool,
}

/// What the worker does with a command that arrives during a training run.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Between {
    Continue,
    Cancel,
    Pause,
    /// The daemon is shutting down.
    Stop,
}

impl Worker {
    fn new(shared: Arc<Shared>, bundle: Arc<ModelBundle>, rx: Receiver<Command>) -> Self {
        Self {
            shared,
            bundle,
            rx,
            queue: VecDeque::new(),
            paused: vec![],
            loras: lora_cache::LoraCache::new(lora_cache::DEFAULT_CAPACITY),
            stop: false,
        }
    }

    fn run(mut self) {
        while !self.stop {
            // Everything that has arrived first, so a cancel or pause sent right
            // after a submit is seen before the job starts.
            while let Ok(cmd) = self.rx.try_recv() {
                self.accept(cmd);
            }
            if self.stop {
                break;
            }
            if let Some((id, req)) = self.next_runnable() {
                self.run_job(&id, req);
                continue;
            }
            match self.rx.recv() {
                Ok(cmd) => self.accept(cmd),
                Err(_) => break,
            }
        }
    }

    fn next_runnable(&mut self) -> Option<(String, JobRequest)> {
        let i = self
            .queue
            .iter()
            .position(|(id, _)| !self.paused.contains(id))?;
        self.queue.remove(i)
    }

    /// Handles a command while no job runs.
    fn accept(&mut self, cmd: Command) {
        match cmd {
            Command::Run(id, req) => self.queue.push_back((id, req)),
            Command::Stop => self.stop = true,
            Command::Control(id, c) => self.control_queued(&id, c),
        }
    }

    fn control_queued(&mut self, id: &str, c: Control) {
        let waiting =
            self.queue.iter().any(|(j, _)| j == id) || self.paused.iter().any(|j| j == id);
        if !waiting {
            // It ran in the meantime; the state it ended in stands.
            return;
        }
        match c {
            Control::Cancel => {
                self.queue.retain(|(j, _)| j != id);
                self.paused.retain(|j| j != id);
                self.shared.set_state(id, JobState::Cancelled);
            }
            Control::Pause => {
                self.paused.push(id.to_string());
                self.shared.set_state(id, JobState::Paused);
            }
            Control::Resume => {
                self.paused.retain(|j| j != id);
                self.shared.set_state(id, JobState::Queued);
            }
        }
    }

    fn run_job(&mut self, id: &str, req: JobRequest) {
        let span = tracing::info_span!("job", id);
        let _guard = span.enter();
        match req {
            JobRequest::Sample(job) => self.run_sample(id, &job, None),
            JobRequest::Train(cfg) => {
                let run = catch_unwind(AssertUnwindSafe(|| self.run_train(id, *cfg)));
                if let Err(panic) = run {
                    self.fail(id, panic_message(panic));
                }
            }
        }
    }

    /// A LoRA file, hot-loaded (kept by path and modification time).
    fn lora(&mut self, path: &Path) -> Result<Arc<Lora>, String> {
        let mtime = std::fs::metadata(path)
            .and_then(|m| m.modified())
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let bundle = &self.bundle;
        self.loras.get_or_load(path, mtime, || {
            let file = lora_io::load(path, bundle.device()).map_err(|e| e.to_string())?;
            lora_io::validate(&file.lora, &bundle.adapter_shapes()).map_err(|e| e.to_string())?;
            Ok(file.lora)
        })
    }

    /// Runs a sampling job; `live` is the running training job and its adapter.
    fn run_sample(&mut self, id: &str, job: &SampleJob, live: Option<(&str, Arc<Lora>)>) {
        self.shared.set_state(id, JobState::Running);
        let result = catch_unwind(AssertUnwindSafe(|| self.sample(id, job, live)))
            .unwrap_or_else(|panic| Err(panic_message(panic)));
        if self.shared.take_sample_cancel(id) && result.is_err() {
            return self.shared.set_state(id, JobState::Cancelled);
        }
        match result {
            Ok(paths) => {
                self.shared.emit(
                    id,
                    EventKind::Images {
                        paths: paths.clone(),
                    },
                );
                self.shared.update(id, |r| {
                    r.outputs = paths;
                    r.state = JobState::Finished;
                });
            }
            Err(message) => self.fail(id, message),
        }
    }

    fn sample(
        &mut self,
        id: &str,
        job: &SampleJob,
        live: Option<(&str, Arc<Lora>)>,
    ) -> Result<Vec<PathBuf>, String> {
        let mut adapters = AdapterSet::none();
        let mut names = vec![];
        for choice in &job.loras {
            let lora = match (&choice.path, &choice.live_job) {
                (Some(p), None) => self.lora(p)?,
                (None, Some(j)) => match &live {
                    Some((running, lora)) if running == j => lora.clone(),
                    _ => return Err(format!("job `{j}` is not a running training job; its live adapter is not available")),
                },
                _ => return Err("each LoRA needs exactly one of `path` or `live_job`".into()),
            };
            names.push((lora.name.clone(), choice.strength));
            adapters.push(lora, choice.strength);
        }
        let req = ResolvedRequest::new(&job.request, &self.bundle).map_err(|e| e.to_string())?;
        let shared = self.shared.clone();
        let factor = self
            .bundle
            .vae()
            .map_err(|e| e.to_string())?
            .downsample_factor();
        let (lh, lw) = (req.height / factor, req.width / factor);
        let images = generate(&self.bundle, &req, &adapters, &mut |info, x| {
            if shared.sample_cancel_requested(id) {
                candle_core::bail!("cancelled");
            }
            shared.emit(
                id,
                EventKind::SampleStep {
                    step: info.step,
                    total: info.total,
                },
            );
            match preview_png(x, lh, lw) {
                Ok(png) => shared.emit(
                    id,
                    EventKind::Preview {
                        step: info.step as u64,
                        png: png.into(),
                    },
                ),
                Err(e) => tracing::debug!(error = %e, "no preview"),
            }
            Ok(())
        })
        .map_err(|e| e.to_string())?;
        let dir = self.shared.store.dir(id).join("samples");
        let mut paths = vec![];
        for (i, image) in images.iter().enumerate() {
            let path = dir.join(format!("{id}_{i:02}.png"));
            save_png(&path, image, &req.params(i, &self.bundle.name, &names))
                .map_err(|e| format!("{}: {e}", path.display()))?;
            paths.push(path);
        }
        Ok(paths)
    }

    fn fail(&self, id: &str, message: String) {
        tracing::warn!(job = id, %message, "job failed");
        self.shared.emit(
            id,
            EventKind::Error {
                message: message.clone(),
            },
        );
        self.shared.update(id, |r| {
            r.error = Some(message);
            r.state = JobState::Failed;
        });
    }

    fn run_train(&mut self, id: &str, mut cfg: TrainConfig) {
        let dir = self.shared.store.dir(id);
        cfg.output_dir = dir.clone();
        // The run's config beside its outputs, as `fluxlora train config.json` reads it.
        let config = serde_json::to_vec_pretty(&cfg).map_err(std::io::Error::other);
        if let Err(e) = config.and_then(|c| crate::atomic_file::write(&dir.join("config.json"), &c))
        {
            return self.fail(id, format!("writing the job's config.json: {e}"));
        }
        let name = cfg.output_name.clone();
        let resume = checkpoint::latest_state(&dir, &name);
        let started = std::time::Instant::now();
        let mut trainer = match Trainer::new(cfg, self.bundle.clone(), resume.as_deref()) {
            Ok(t) => t,
            Err(e) => return self.fail(id, e.to_string()),
        };
        self.shared.set_state(id, JobState::Running);
        let shared = self.shared.clone();
        let mut emit = |e: TrainEvent| {
            // Preview images of the run also go out as previews (WebSocket binary frames).
            let previews = match &e {
                TrainEvent::Sample { step, paths } => Some((*step, paths.clone())),
                _ => None,
            };
            shared.emit(id, EventKind::Train { event: e });
            for (step, path) in previews
                .into_iter()
                .flat_map(|(s, p)| p.into_iter().map(move |p| (s, p)))
            {
                match std::fs::read(&path) {
                    Ok(png) => shared.emit(
                        id,
                        EventKind::Preview {
                            step,
                            png: png.into(),
                        },
                    ),
                    Err(e) => tracing::debug!(error = %e, "no preview"),
                }
            }
        };
        // Caching can take long on a real model: controls are seen after each image.
        let mut pending = Between::Continue;
        let cached = trainer.prepare_caches(&mut emit, &mut || {
            self.take_commands(id, &mut pending);
            !matches!(self.settle(pending), Between::Cancel | Between::Stop)
        });
        match cached {
            Ok(true) => emit(trainer.started_event()),
            Ok(false) => {}
            Err(e) => return self.fail(id, e.to_string()),
        }
        while !trainer.is_done() {
            let mut between = self.between_steps(
                id,
                &trainer,
                std::mem::replace(&mut pending, Between::Continue),
            );
            if let Between::Pause = between {
                self.shared.set_state(id, JobState::Paused);
                between = self.wait_while_paused(id, &trainer);
                if let Between::Continue = between {
                    self.shared.set_state(id, JobState::Running);
                }
            }
            let end = match between {
                Between::Continue | Between::Pause => None,
                Between::Cancel => Some(JobState::Cancelled),
                // Shutdown: the job is resumed later from the state saved now.
                Between::Stop => Some(JobState::Interrupted),
            };
            if let Some(state) = end {
                let step = trainer.progress().step;
                if step > 0 && !checkpoint::state_dir(&dir, &name, step).exists() {
                    if let Err(e) = trainer.save_step(&mut emit) {
                        tracing::warn!(error = %e, "could not save the run's state");
                    }
                }
                if state == JobState::Cancelled {
                    emit(TrainEvent::Cancelled { step });
                }
                return self.shared.set_state(id, state);
            }
            if let Err(e) = trainer.step(&mut emit) {
                return self.fail(id, e.to_string());
            }
        }
        match trainer.finish() {
            Ok(path) => {
                let mut outputs = vec![path.clone()];
                match self.shared.publish_lora(&path) {
                    Ok(copy) => outputs.push(copy),
                    Err(e) => {
                        tracing::warn!(error = %e, "could not copy the LoRA to the LoRA folder")
                    }
                }
                emit(TrainEvent::Finished {
                    step: trainer.progress().step,
                    path,
                    seconds: started.elapsed().as_secs_f64(),
                });
                self.shared.update(id, |r| {
                    r.outputs = outputs;
                    r.state = JobState::Finished;
                });
            }
            Err(e) => self.fail(id, e.to_string()),
        }
    }

    /// Serves what arrived since the last step: samples run now (with the live
    /// adapter when asked), other jobs queue, controls apply (on top of `pending`,
    /// what was decided while caching).
    fn between_steps(&mut self, running: &str, trainer: &Trainer, pending: Between) -> Between {
        let mut outcome = pending;
        self.serve_arrivals(running, trainer, &mut outcome);
        self.settle(outcome)
    }

    /// Blocks while `id` is paused, still serving samples, until it is resumed
    /// (`Continue`), cancelled or the daemon stops.
    fn wait_while_paused(&mut self, id: &str, trainer: &Trainer) -> Between {
        let mut outcome = Between::Pause;
        loop {
            self.serve_arrivals(id, trainer, &mut outcome);
            match self.settle(outcome) {
                Between::Pause => {}
                decided => return decided,
            }
            let Ok(cmd) = self.rx.recv() else {
                return Between::Stop;
            };
            self.during(id, cmd, &mut outcome);
        }
    }

    /// A stop of the daemon wins over everything but a cancel.
    fn settle(&self, outcome: Between) -> Between {
        if self.stop && outcome != Between::Cancel {
            Between::Stop
        } else {
            outcome
        }
    }

    /// Takes every command that has arrived and runs the queued sampling jobs on
    /// the live adapter of the training job `running`, one at a time, looking at
    /// new commands before each (a cancel of a queued sample is seen in time).
    fn serve_arrivals(&mut self, running: &str, trainer: &Trainer, outcome: &mut Between) {
        loop {
            self.take_commands(running, outcome);
            let Some((id, job)) = self.take_queued_sample() else {
                return;
            };
            let live = trainer.live_lora().map(|l| (running, l));
            self.run_sample(&id, &job, live);
        }
    }

    /// Every command that has arrived, without waiting (see [`Self::during`]).
    fn take_commands(&mut self, running: &str, outcome: &mut Between) {
        while let Ok(cmd) = self.rx.try_recv() {
            self.during(running, cmd, outcome);
        }
    }

    /// A command that arrives during the training job `running`: its own controls
    /// decide `outcome` (a cancel wins over a pause), the rest go to the queue.
    fn during(&mut self, running: &str, cmd: Command, outcome: &mut Between) {
        match cmd {
            Command::Control(id, c) if id == running => match c {
                Control::Cancel => *outcome = Between::Cancel,
                Control::Pause if *outcome == Between::Continue => *outcome = Between::Pause,
                Control::Resume if *outcome == Between::Pause => *outcome = Between::Continue,
                Control::Pause | Control::Resume => {}
            },
            cmd => self.accept(cmd),
        }
    }

    /// The first queued sampling job that is not paused.
    fn take_queued_sample(&mut self) -> Option<(String, SampleJob)> {
        let i = self.queue.iter().position(|(id, req)| {
            matches!(req, JobRequest::Sample(_)) && !self.paused.contains(id)
        })?;
        match self.queue.remove(i)? {
            (id, JobRequest::Sample(job)) => Some((id, job)),
            other => {
                self.queue.insert(i, other);
                None
            }
        }
    }
}
