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
//! Training jobs run the same loop as `fluxlora train` ([`crate::train::run`]);
//! the worker plugs its pause, cancel, stop, inline samples and event publishing
//! into it as hooks.
//!
//! Parts: [`Engine`] (`handle`: what callers hold), `requests` (what they submit
//! and the errors they get), `shared` (job records and event numbering the handle
//! and the worker share), `worker` (the thread that runs jobs), [`bus`], [`events`],
//! [`store`].
//!
//! Must not: know about HTTP; protocol adapters translate requests into [`JobRequest`]s.

pub mod bus;
#[cfg(test)]
mod cli_parity;
pub mod events;
mod handle;
mod lora_cache;
mod requests;
mod shared;
pub(crate) mod store;
mod worker;

pub use self::handle::Engine;
pub use self::requests::{Control, EngineError, JobRequest, LoraChoice, SampleJob};
