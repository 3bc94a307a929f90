//! [`TrainConfig`]: everything one training run needs, read from TOML or JSON,
//! with defaults and a validation that names the bad field.
//!
//! Field names follow kohya sd-scripts' arguments where one exists
//! (`learning_rate`, `max_train_steps`, `save_every_n_steps`, …) so configs translate
//! one to one.
//!
//! Must not: open datasets or models (the trainer does).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::dataset::DatasetConfig;
use super::lr_schedule::LrSchedule;
use super::network::NetworkConfig;
use super::objective::ObjectiveConfig;
use super::optim::OptimizerConfig;
use crate::config::{DeviceChoice, Precision};

/// One training run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Base model (file or folder); the built-in tiny model when absent.
    #[schema(value_type = Option<String>)]
    pub model: Option<PathBuf>,
    /// Everything the run writes goes under this folder.
    #[schema(value_type = String)]
    pub output_dir: PathBuf,
    /// File stem of the saved LoRA (`<output_name>.safetensors`).
    pub output_name: String,
    pub dataset: DatasetConfig,
    pub network: NetworkConfig,
    pub optimizer: OptimizerConfig,
    pub lr_scheduler: LrSchedule,
    pub objective: ObjectiveConfig,
    /// Base learning rate of the DiT adapter.
    pub learning_rate: f64,
    /// Learning rate of the CLIP text-encoder adapter (`network.train_text_encoder`);
    /// `learning_rate` when absent.
    pub text_encoder_lr: Option<f64>,
    /// Stop after this many optimizer steps (wins over `max_train_epochs`).
    pub max_train_steps: Option<u64>,
    /// Stop after this many epochs when `max_train_steps` is not set.
    pub max_train_epochs: Option<u64>,
    pub train_batch_size: usize,
    pub gradient_accumulation_steps: usize,
    /// Clip the global gradient norm to this value; 0 disables clipping.
    pub max_grad_norm: f64,
    /// Compute precision of the base model; adapters keep f32 master weights.
    pub mixed_precision: Precision,
    /// Recompute each block's activations during backward instead of keeping them.
    pub gradient_checkpointing: bool,
    pub device: DeviceChoice,
    /// Seed of everything random in the run (init, data order, noise, timesteps).
    pub seed: u64,
    pub save_every_n_steps: Option<u64>,
    pub save_every_n_epochs: Option<u64>,
    /// Keep only the newest N intermediate saves (the final save is always kept).
    pub save_last_n: Option<usize>,
    /// Precision of saved LoRA weights.
    pub save_precision: Precision,
    /// Generate previews every N steps.
    pub sample_every_n_steps: Option<u64>,
    /// Preview prompts, one per line, with kohya's options (`--w --h --d --s --l --n`).
    pub sample_prompts: Vec<String>,
    /// T5 sequence length for captions (kohya's `t5xxl_max_token_length`: 512 for dev,
    /// 256 for schnell); the model's own when absent. Longer captions are truncated,
    /// reported once per run.
    pub t5_max_token_length: Option<usize>,
    /// Held-out images for a validation loss at fixed timesteps and noise.
    pub validation_dataset: Option<DatasetConfig>,
    /// Compute the validation loss every N steps (and at the end).
    pub validate_every_n_steps: Option<u64>,
    /// Train every base weight instead of a LoRA (how the built-in tiny model is
    /// pretrained); the final save is then a transformer checkpoint.
    pub full_finetune: bool,
    /// Folder for cached latents and text embeddings; in memory only when absent.
    #[schema(value_type = Option<String>)]
    pub cache_dir: Option<PathBuf>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            model: None,
            output_dir: PathBuf::from("output"),
            output_name: "lora".into(),
            dataset: DatasetConfig::default(),
            network: NetworkConfig::default(),
            optimizer: OptimizerConfig::default(),
            lr_scheduler: LrSchedule::default(),
            objective: ObjectiveConfig::default(),
            learning_rate: 1e-4,
            text_encoder_lr: None,
            max_train_steps: None,
            max_train_epochs: None,
            train_batch_size: 1,
            gradient_accumulation_steps: 1,
            max_grad_norm: 1.0,
            mixed_precision: Precision::F32,
            gradient_checkpointing: false,
            device: DeviceChoice::Cpu,
            seed: 42,
            save_every_n_steps: None,
            save_every_n_epochs: None,
            save_last_n: None,
            save_precision: Precision::Bf16,
            sample_every_n_steps: None,
            sample_prompts: vec![],
            t5_max_token_length: None,
            validation_dataset: None,
            validate_every_n_steps: None,
            full_finetune: false,
            cache_dir: None,
        }
    }
}

/// A config that does not parse or does not validate.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("invalid `{field}`: {message}")]
    Invalid { field: String, message: String },
}

fn invalid(field: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.to_string(),
        message: message.into(),
    }
}

impl TrainConfig {
    /// Reads a `.toml` or `.json` file (by extension; TOML otherwise) and validates it.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let parsed = if path.extension().is_some_and(|e| e == "json") {
            serde_json::from_str(&text).map_err(|e| e.to_string())
        } else {
            toml::from_str(&text).map_err(|e| e.to_string())
        };
        let cfg: Self = parsed.map_err(|message| ConfigError::Parse {
            path: path.display().to_string(),
            message,
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks every value; the error names the first bad field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.output_name.is_empty()
            || self.output_name.contains(['/', '\\'])
            || self.output_name.starts_with('.')
        {
            return Err(invalid(
                "output_name",
                "must be a plain file stem (no slashes, not starting with a dot)",
            ));
        }
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return Err(invalid(
                "learning_rate",
                format!("must be > 0, got {}", self.learning_rate),
            ));
        }
        if let Some(lr) = self.text_encoder_lr {
            if !(lr.is_finite() && lr >= 0.0) {
                return Err(invalid("text_encoder_lr", format!("must be ≥ 0, got {lr}")));
            }
        }
        match (self.max_train_steps, self.max_train_epochs) {
            (None, None) => {
                return Err(invalid(
                    "max_train_steps",
                    "set max_train_steps or max_train_epochs",
                ))
            }
            (Some(0), _) => return Err(invalid("max_train_steps", "must be at least 1")),
            (None, Some(0)) => return Err(invalid("max_train_epochs", "must be at least 1")),
            _ => {}
        }
        if self.t5_max_token_length.is_some_and(|n| n == 0 || n > 4096) {
            return Err(invalid("t5_max_token_length", "must be between 1 and 4096"));
        }
        if self.train_batch_size == 0 {
            return Err(invalid("train_batch_size", "must be at least 1"));
        }
        if self.gradient_accumulation_steps == 0 {
            return Err(invalid("gradient_accumulation_steps", "must be at least 1"));
        }
        if !(self.max_grad_norm.is_finite() && self.max_grad_norm >= 0.0) {
            return Err(invalid(
                "max_grad_norm",
                format!("must be ≥ 0, got {}", self.max_grad_norm),
            ));
        }
        for (field, v) in [
            ("save_every_n_steps", self.save_every_n_steps),
            ("save_every_n_epochs", self.save_every_n_epochs),
            ("sample_every_n_steps", self.sample_every_n_steps),
            ("validate_every_n_steps", self.validate_every_n_steps),
        ] {
            if v == Some(0) {
                return Err(invalid(field, "must be at least 1 when set"));
            }
        }
        if self.save_last_n == Some(0) {
            return Err(invalid("save_last_n", "must be at least 1 when set"));
        }
        self.dataset
            .validate()
            .map_err(|e| invalid("dataset", e.to_string()))?;
        if let Some(v) = &self.validation_dataset {
            v.validate()
                .map_err(|e| invalid("validation_dataset", e.to_string()))?;
        }
        if self.validate_every_n_steps.is_some() && self.validation_dataset.is_none() {
            return Err(invalid(
                "validate_every_n_steps",
                "needs a validation_dataset",
            ));
        }
        self.network.validate().map_err(|m| invalid("network", m))?;
        self.optimizer
            .validate()
            .map_err(|e| invalid("optimizer", e.to_string()))?;
        self.lr_scheduler
            .check(self.learning_rate)
            .map_err(|e| invalid("lr_scheduler", e.to_string()))?;
        self.objective
            .validate()
            .map_err(|m| invalid("objective", m))?;
        for (i, line) in self.sample_prompts.iter().enumerate() {
            super::prompts::PromptSpec::parse(line)
                .map_err(|m| invalid(&format!("sample_prompts[{i}]"), m))?;
        }
        Ok(())
    }
}
