//! [`AppState`]: what every handler shares (the engine, the loaded model's
//! description and the folders requests may use). Its own module so that route
//! modules reach it without importing the module that builds the app.
//!
//! Must not: serve anything; it only holds.

use std::path::PathBuf;
use std::sync::Arc;

use super::admission::Admission;
use super::comfy::state::ComfyState;
use super::webui::state::WebuiState;
use crate::config::{Precision, Settings};
use crate::engine::Engine;

/// What handlers share.
pub struct AppState {
    pub engine: Engine,
    pub model_name: String,
    pub device: String,
    pub dtype: String,
    /// The checks job requests pass (roots, LoRA folder, sampling defaults).
    pub(crate) admission: Admission,
    /// The loaded model's file or folder; `None` for the built-in tiny model.
    pub model_path: Option<PathBuf>,
    /// Where other model files are looked for.
    pub model_dirs: Vec<PathBuf>,
    /// Set to `true` when the daemon stops: long-lived connections (WebSockets)
    /// close so they do not hold up the graceful stop.
    pub stopping: Arc<tokio::sync::watch::Sender<bool>>,
    /// The ComfyUI dialect: folders, prompt queue, executor.
    pub comfy: ComfyState,
    /// The A1111 dialect: its queue lock and running generation.
    pub(crate) webui: WebuiState,
}

impl AppState {
    /// The state for serving `bundle` through `engine` with these settings.
    pub fn new(
        settings: &Settings,
        bundle: &crate::model::bundle::ModelBundle,
        engine: Engine,
    ) -> Self {
        let admission = Admission {
            roots: settings.read_roots(),
            lora_dir: Some(settings.lora_dir()),
            sampling: bundle.defaults.clone(),
            model_name: bundle.name.clone(),
        };
        let precision = match bundle.flux.dtype() {
            candle_core::DType::BF16 => Precision::Bf16,
            candle_core::DType::F16 => Precision::F16,
            _ => Precision::F32,
        };
        let comfy = ComfyState::new(settings, engine.clone(), admission.clone(), precision);
        Self {
            engine,
            model_name: bundle.name.clone(),
            device: settings.device.to_string(),
            dtype: format!("{:?}", bundle.flux.dtype()).to_lowercase(),
            admission,
            model_path: settings.model.clone(),
            model_dirs: settings.model_dirs(),
            stopping: Arc::new(tokio::sync::watch::channel(false).0),
            comfy,
            webui: WebuiState::new(settings),
        }
    }
}
