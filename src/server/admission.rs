//! [`Admission`]: the checks every job request passes before any dialect
//! submits it (`/v1`, the ComfyUI executor, A1111): sampling sizes and LoRA
//! choices, and every path of a training config resolved inside the allowed
//! roots (replaced by its canonical path, so the job reads exactly what was
//! checked).
//!
//! Must not: submit anything, or know which dialect asks; errors name the
//! request field (`loras[0].path`), and each dialect maps them to its own shape.

use std::path::{Path, PathBuf};

use super::errors::ApiError;
use super::paths::{self, PathError};
use crate::engine::SampleJob;
use crate::model::bundle::SamplingDefaults;
use crate::sample::generate::ResolvedRequest;
use crate::train::config::TrainConfig;

/// What the checks need to know of the daemon.
#[derive(Clone, Debug)]
pub(crate) struct Admission {
    /// Folders requests may read from (datasets, LoRAs).
    pub roots: Vec<PathBuf>,
    /// Where bare LoRA file names are looked up.
    pub lora_dir: Option<PathBuf>,
    /// The loaded model's sampling defaults.
    pub sampling: SamplingDefaults,
    /// The loaded model's name, for messages.
    pub model_name: String,
}

impl Admission {
    /// `path` resolved inside the configured roots.
    pub(crate) fn resolve_path(&self, path: &Path) -> Result<PathBuf, PathError> {
        paths::resolve_in_roots(&self.roots, path)
    }

    /// Checks a sampling job, and resolves its init image and every LoRA path
    /// inside the allowed roots (a bare file name is looked up in the LoRA folder, as ComfyUI and
    /// A1111 name LoRAs).
    pub(crate) fn check_sample(&self, job: &mut SampleJob) -> Result<(), ApiError> {
        ResolvedRequest::with_defaults(&job.request, &self.sampling)
            .map_err(|e| ApiError::bad(e.to_string()).at(format!("request.{}", e.field)))?;
        if let Some(image) = &job.request.init_image {
            job.request.init_image = Some(
                self.resolve_path(image)
                    .map_err(|e| ApiError::from(e).at("request.init_image"))?,
            );
        }
        for (i, lora) in job.loras.iter_mut().enumerate() {
            if lora.path.is_some() == lora.live_job.is_some() {
                return Err(ApiError::bad(
                    "give a LoRA either a `path` or the `live_job` of a running training job",
                )
                .at(format!("loras[{i}]")));
            }
            if !lora.strength.is_finite() {
                return Err(ApiError::bad("strength must be a finite number")
                    .at(format!("loras[{i}].strength")));
            }
            if let Some(p) = &lora.path {
                let candidate = match (p.components().count(), &self.lora_dir) {
                    (1, Some(dir)) if dir.join(p).is_file() => dir.join(p),
                    _ => p.clone(),
                };
                let resolved = self
                    .resolve_path(&candidate)
                    .map_err(|e| ApiError::from(e).at(format!("loras[{i}].path")))?;
                lora.path = Some(resolved);
            }
        }
        Ok(())
    }

    /// Validates a training config, resolves its paths inside the allowed roots
    /// and refuses settings the daemon decides itself (`model`).
    pub(crate) fn check_train(&self, cfg: &mut TrainConfig) -> Result<(), ApiError> {
        cfg.validate()?;
        if let Some(model) = &cfg.model {
            return Err(ApiError::bad(format!(
                "the daemon trains on its loaded model ({}); leave out `model` (here {}), or start `fluxlora serve --model` with it",
                self.model_name,
                model.display()
            ))
            .at("model"));
        }
        for (i, folder) in cfg.dataset.folders.iter_mut().enumerate() {
            folder.path = self
                .resolve_path(&folder.path)
                .map_err(|e| ApiError::from(e).at(format!("dataset.folders[{i}]")))?;
        }
        if let Some(validation) = &mut cfg.validation_dataset {
            for (i, folder) in validation.folders.iter_mut().enumerate() {
                folder.path = self.resolve_path(&folder.path).map_err(|e| {
                    ApiError::from(e).at(format!("validation_dataset.folders[{i}]"))
                })?;
            }
        }
        if let Some(dir) = &cfg.cache_dir {
            cfg.cache_dir = Some(
                paths::resolve_for_writing(&self.roots, dir)
                    .map_err(|e| ApiError::from(e).at("cache_dir"))?,
            );
        }
        Ok(())
    }
}
