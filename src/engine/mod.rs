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
mod handle;
mod lora_cache;
mod requests;
mod shared;
pub mod store;
mod worker;

pub use self::handle::Engine;
pub use self::requests::{Control, EngineError, JobRequest, LoraChoice, SampleJob};
