//! [`AppState`]: what every handler shares (the engine, the loaded model's
//! description and the folders requests may use). Its own module so that route
//! modules reach it without importing the module that builds the app.
//!
//! Must not: serve anything; it only holds.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::paths::{self, PathError};
use crate::config::Settings;
use crate::engine::Engine;

/// What handlers share.
pub struct AppState {
    pub engine: Engine,
    pub model_name: String,
    pub device: String,
    pub dtype: String,
    /// Folders requests may read from (datasets, LoRAs).
    pub roots: Vec<PathBuf>,
    /// Where bare LoRA file names are looked up.
    pub lora_dir: Option<PathBuf>,
    /// The loaded model's file or folder; `None` for the built-in tiny model.
    pub model_path: Option<PathBuf>,
    /// Where other model files are looked for.
    pub model_dirs: Vec<PathBuf>,
    /// The loaded model's sampling defaults, to check requests before queueing them.
    pub sampling: crate::model::bundle::SamplingDefaults,
    /// Set to `true` when the daemon stops: long-lived connections (WebSockets)
    /// close so they do not hold up the graceful stop.
    pub stopping: Arc<tokio::sync::watch::Sender<bool>>,
    /// The ComfyUI dialect's folders and limits.
    pub comfy: super::comfy::state::ComfyState,
}

impl AppState {
    /// The state for serving `bundle` through `engine` with these settings.
    pub fn new(
        settings: &Settings,
        bundle: &crate::model::bundle::ModelBundle,
        engine: Engine,
    ) -> Self {
        Self {
            engine,
            model_name: bundle.name.clone(),
            device: settings.device.to_string(),
            dtype: format!("{:?}", bundle.flux.dtype()).to_lowercase(),
            roots: settings.read_roots(),
            lora_dir: Some(settings.lora_dir()),
            model_path: settings.model.clone(),
            model_dirs: settings.model_dirs(),
            sampling: bundle.defaults.clone(),
            stopping: Arc::new(tokio::sync::watch::channel(false).0),
            comfy: super::comfy::state::ComfyState::new(settings),
        }
    }

    /// `path` resolved inside the configured roots.
    pub(crate) fn resolve_path(&self, path: &Path) -> Result<PathBuf, PathError> {
        paths::resolve_in_roots(&self.roots, path)
    }
}
