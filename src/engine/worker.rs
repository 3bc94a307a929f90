//! The worker thread: owns the model, runs jobs from the queue one at a time, and
//! serves sampling requests between the steps of a training job (with its live
//! adapter when asked). Controls that arrive during a job take effect between
//! its steps.
//!
//! Must not: be reached except through the commands the handle sends.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::mpsc::Receiver;
use std::sync::Arc;

use super::events::{EventKind, JobState};
use super::lora_cache;
use super::requests::{Control, JobRequest, SampleJob};
use super::shared::{Command, Shared};
use crate::model::adapter::{AdapterSet, Lora};
use crate::model::bundle::ModelBundle;
use crate::model::lora_io;
use crate::sample::generate::{generate, ResolvedRequest};
use crate::sample::png_meta::{save_png, AppliedLora};
use crate::train::checkpoint;
use crate::train::config::TrainConfig;
use crate::train::events::TrainEvent;
use crate::train::run::{RunEnd, TrainHooks, Verdict};
use crate::train::trainer::Trainer;

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
pub(super) struct Worker {
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
    pub(super) fn new(
        shared: Arc<Shared>,
        bundle: Arc<ModelBundle>,
        rx: Receiver<Command>,
    ) -> Self {
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

    pub(super) fn run(mut self) {
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
            names.push(AppliedLora {
                name: lora.name.clone(),
                strength: choice.strength,
                hash: lora.hash.clone(),
            });
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
        let resume = checkpoint::latest_state(&dir, &cfg.output_name);
        let mut trainer = match Trainer::new(cfg, self.bundle.clone(), resume.as_deref()) {
            Ok(t) => t,
            Err(e) => return self.fail(id, e.to_string()),
        };
        self.shared.set_state(id, JobState::Running);
        let mut job = TrainJob {
            worker: self,
            id,
            pending: Between::Continue,
            outputs: vec![],
        };
        let end = trainer.run_with(&mut job);
        let outputs = job.outputs;
        match end {
            Ok(RunEnd::Finished(_)) => self.shared.update(id, |r| {
                r.outputs = outputs;
                r.state = JobState::Finished;
            }),
            Ok(RunEnd::Cancelled) => self.shared.set_state(id, JobState::Cancelled),
            // Shutdown: the job is resumed later from the state saved now.
            Ok(RunEnd::Stopped) => self.shared.set_state(id, JobState::Interrupted),
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

/// The engine's hooks into the training loop for the running job `id`: events go
/// to the store and the bus (a run's preview images also as binary previews);
/// between steps the worker serves sampling requests (with the live adapter when
/// asked) and applies controls: a pause holds the job (still serving samples), a
/// cancel or a daemon stop ends it.
struct TrainJob<'w> {
    worker: &'w mut Worker,
    id: &'w str,
    /// What was decided while caching, applied before the first step.
    pending: Between,
    /// The final LoRA and its copy in the LoRA folder.
    outputs: Vec<PathBuf>,
}

impl TrainHooks for TrainJob<'_> {
    fn emit(&mut self, event: TrainEvent) {
        let (shared, id) = (&self.worker.shared, self.id);
        // Preview images of the run also go out as previews (WebSocket binary frames).
        let previews = match &event {
            TrainEvent::Sample { step, paths } => Some((*step, paths.clone())),
            _ => None,
        };
        shared.emit(id, EventKind::Train { event });
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
    }

    /// Caching can take long on a real model: controls are seen after each image.
    /// A pause waits for the first step; a cancel or stop first serves what is
    /// queued, as between steps.
    fn while_caching(&mut self, trainer: &Trainer) -> Verdict {
        self.worker.take_commands(self.id, &mut self.pending);
        match self.worker.settle(self.pending) {
            Between::Cancel | Between::Stop => self.between_steps(trainer),
            Between::Continue | Between::Pause => Verdict::Continue,
        }
    }

    fn between_steps(&mut self, trainer: &Trainer) -> Verdict {
        let (worker, id) = (&mut *self.worker, self.id);
        let pending = std::mem::replace(&mut self.pending, Between::Continue);
        let mut between = worker.between_steps(id, trainer, pending);
        if let Between::Pause = between {
            let step = trainer.progress().step;
            // The event first: whoever sees the job paused finds its step stored.
            let paused = TrainEvent::Paused { step };
            worker.shared.emit(id, EventKind::Train { event: paused });
            worker.shared.set_state(id, JobState::Paused);
            between = worker.wait_while_paused(id, trainer);
            if let Between::Continue = between {
                worker.shared.set_state(id, JobState::Running);
                let resumed = TrainEvent::Resumed { step };
                worker.shared.emit(id, EventKind::Train { event: resumed });
            }
        }
        match between {
            Between::Continue | Between::Pause => Verdict::Continue,
            Between::Cancel => Verdict::Cancel,
            Between::Stop => Verdict::Stop,
        }
    }

    fn before_finished(&mut self, lora: &Path) {
        self.outputs.push(lora.to_path_buf());
        match self.worker.shared.publish_lora(lora) {
            Ok(copy) => self.outputs.push(copy),
            Err(e) => tracing::warn!(error = %e, "could not copy the LoRA to the LoRA folder"),
        }
    }
}
