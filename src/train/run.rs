//! The training loop, the one every driver runs: caches, `Started`, the step-0
//! previews, optimizer steps, the final LoRA and `Finished`. What a driver adds
//! plugs in through [`TrainHooks`]: where events go, whether to go on (asked
//! after every cached image and before every step), and work between steps.
//! `fluxlora train` drives it with [`ControlHooks`] (a [`TrainControl`] and a
//! callback that draws the progress bar); the daemon's engine with hooks that
//! publish events, serve sampling requests between steps and turn controls into
//! job states.
//!
//! Must not: know who drives it; a behaviour only one driver has lives in its hooks.

use std::path::{Path, PathBuf};

use super::checkpoint;
use super::events::{TrainControl, TrainEvent};
use super::trainer::{Result, TrainError, Trainer};

/// What a driver's hooks decide at a check: go on, or end the run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    Continue,
    /// End the run as cancelled: the state of the current step is saved (a
    /// cancelled run can still be resumed) and `Cancelled` is emitted.
    Cancel,
    /// End the run because the driver stops (a daemon shutting down): the state
    /// of the current step is saved, so a resumed run trains no step twice.
    Stop,
}

/// How a run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum RunEnd {
    /// Every step ran; the final LoRA.
    Finished(PathBuf),
    Cancelled,
    Stopped,
}

/// What a driver plugs into the loop.
pub(crate) trait TrainHooks {
    /// Receives every event of the run, in order.
    fn emit(&mut self, event: TrainEvent);

    /// Asked after each image is cached; anything but `Continue` ends the run
    /// before its first step (with a `cache_dir`, a later run finds the work done).
    fn while_caching(&mut self, trainer: &Trainer) -> Verdict;

    /// Asked before every step: the driver's work between steps (waiting while
    /// paused, serving previews with [`Trainer::live_lora`]) and whether to go on.
    fn between_steps(&mut self, trainer: &Trainer) -> Verdict;

    /// The final LoRA is written; called before `Finished` is emitted.
    fn before_finished(&mut self, _lora: &Path) {}
}

impl Trainer {
    /// Runs to the end with `hooks`: caches (the encoders are released afterwards
    /// when nothing needs them and the trainer is the model's only owner),
    /// `Started`, previews at step 0 when previews are asked for and the run starts
    /// from scratch, steps with the hooks' checks between them, the final save and
    /// `Finished`.
    pub(crate) fn run_with(&mut self, hooks: &mut dyn TrainHooks) -> Result<RunEnd> {
        let dir = self.config().output_dir.clone();
        std::fs::create_dir_all(&dir).map_err(|source| TrainError::Io {
            path: dir.clone(),
            source,
        })?;
        match self.prepare_caches(hooks)? {
            Verdict::Continue => {}
            verdict => return Ok(self.end(verdict == Verdict::Cancel, hooks)),
        }
        self.release_encoders_if_unused();
        hooks.emit(self.started_event());
        if self.progress().step == 0 && self.config().sample_every_n_steps.is_some() {
            let paths = self.sample_previews(0)?;
            if !paths.is_empty() {
                hooks.emit(TrainEvent::Sample { step: 0, paths });
            }
        }
        while !self.is_done() {
            match hooks.between_steps(self) {
                Verdict::Continue => {}
                verdict => return Ok(self.end(verdict == Verdict::Cancel, hooks)),
            }
            self.step(&mut |e| hooks.emit(e))?;
        }
        let path = self.finish()?;
        hooks.before_finished(&path);
        hooks.emit(TrainEvent::Finished {
            step: self.progress().step,
            path: path.clone(),
            seconds: self.elapsed().as_secs_f64(),
        });
        Ok(RunEnd::Finished(path))
    }

    /// Runs to the end under `control` (cancel between steps and while caching),
    /// sending every event to `emit`. Returns the final LoRA, or `None` when
    /// cancelled (after saving a resumable state).
    pub fn run(
        &mut self,
        control: &TrainControl,
        emit: &mut dyn FnMut(TrainEvent),
    ) -> Result<Option<PathBuf>> {
        Ok(match self.run_with(&mut ControlHooks { control, emit })? {
            RunEnd::Finished(path) => Some(path),
            RunEnd::Cancelled | RunEnd::Stopped => None,
        })
    }

    /// Ends the run before a step: saves the state of the current step unless that
    /// save exists (a step that just saved, or the state a run resumed from), then
    /// reports a cancel. A failed save is logged: the run ends either way.
    fn end(&mut self, cancelled: bool, hooks: &mut dyn TrainHooks) -> RunEnd {
        let step = self.progress().step;
        let cfg = self.config();
        if step > 0 && !checkpoint::state_dir(&cfg.output_dir, &cfg.output_name, step).exists() {
            if let Err(e) = self.save_step(&mut |e| hooks.emit(e)) {
                tracing::warn!(error = %e, "could not save the run's state");
            }
        }
        if cancelled {
            hooks.emit(TrainEvent::Cancelled { step });
            RunEnd::Cancelled
        } else {
            RunEnd::Stopped
        }
    }
}

/// The hooks of a run steered by a [`TrainControl`] (the CLI, tests, the tiny
/// model's pretraining): a cancel seen after every cached image and before every
/// step.
struct ControlHooks<'a> {
    control: &'a TrainControl,
    emit: &'a mut dyn FnMut(TrainEvent),
}

impl ControlHooks<'_> {
    fn verdict(&self) -> Verdict {
        if self.control.is_cancelled() {
            Verdict::Cancel
        } else {
            Verdict::Continue
        }
    }
}

impl TrainHooks for ControlHooks<'_> {
    fn emit(&mut self, event: TrainEvent) {
        (self.emit)(event)
    }

    fn while_caching(&mut self, _trainer: &Trainer) -> Verdict {
        self.verdict()
    }

    fn between_steps(&mut self, _trainer: &Trainer) -> Verdict {
        self.verdict()
    }
}
