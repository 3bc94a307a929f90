//! [`ComfyState`]: what the ComfyUI routes share beside [`AppState`](crate::server::AppState):
//! its folders and limits, the prompt queue and history, the hub of WebSocket
//! messages, and the executor, which runs on a thread per queue lane for the
//! daemon's life (they stop when this state is dropped).
//!
//! Must not: serve anything; it only holds.

use std::sync::Arc;

use super::executor::Executor;
use super::folders::{Folders, FrontEnd};
use super::hub::Hub;
use super::queue::{Lane, PromptQueue};
use crate::config::{Precision, Settings};
use crate::engine::Engine;
use crate::server::admission::Admission;

/// The ComfyUI dialect's shared state.
pub struct ComfyState {
    pub(crate) folders: Folders,
    /// The largest upload accepted (`/features`' `max_upload_size`).
    pub max_upload: usize,
    pub(crate) queue: Arc<PromptQueue>,
    pub(crate) hub: Hub,
    pub(crate) executor: Arc<Executor>,
    /// The front end and our extension, found at start.
    pub(crate) frontend: FrontEnd,
}

impl ComfyState {
    pub(crate) fn new(
        settings: &Settings,
        engine: Engine,
        admission: Admission,
        model_precision: Precision,
    ) -> Self {
        let folders = Folders::new(settings);
        let hub = Hub::default();
        let queue = PromptQueue::new(hub.clone());
        let executor = Arc::new(Executor::new(
            engine,
            admission,
            folders.clone(),
            hub.clone(),
            queue.clone(),
            settings.data_dir.join("comfy"),
            model_precision,
        ));
        for (lane, name) in [
            (Lane::Main, "fluxlora-comfy"),
            (Lane::Side, "fluxlora-comfy-side"),
        ] {
            let serving = executor.clone();
            let started = std::thread::Builder::new()
                .name(name.into())
                .spawn(move || serving.serve(lane));
            if let Err(e) = started {
                tracing::error!(error = %e, ?lane, "a ComfyUI executor lane could not start");
            }
        }
        Self {
            folders,
            max_upload: settings.max_upload_bytes,
            queue,
            hub,
            executor,
            frontend: FrontEnd::find(settings),
        }
    }
}

impl Drop for ComfyState {
    fn drop(&mut self) {
        self.queue.stop();
    }
}
