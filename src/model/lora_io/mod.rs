//! LoRA files: reading the formats in the wild into one [`Lora`] keyed by BFL module
//! path, and writing kohya and diffusers/peft files.
//!
//! Owns, one file each:
//! - `read`: format detection (kohya `lora_unet_…`, kohya's split-qkv
//!   parts, diffusers / peft `lora_A`/`lora_B`, ai-toolkit, OneTrainer
//!   `lora_transformer_…`, ComfyUI-style BFL keys) and alpha handling;
//! - `fuse`: fusing split q/k/v(/mlp) components into the fused BFL
//!   linears and splitting them back;
//! - `write`: kohya and diffusers/peft files, kohya's `sshs_*` hashes,
//!   atomic writes;
//! - `report`: validation against a model's linear shapes and the
//!   `lora inspect` report.
//!
//! Reading rules (checked against kohya-ss/sd-scripts `networks/lora_flux.py`,
//! diffusers `loaders/lora_conversion_utils.py` and `loaders/lora_pipeline.py`,
//! ComfyUI `comfy/lora.py` and `comfy/weight_adapter/lora.py`, ostris/ai-toolkit
//! `toolkit/network_mixins.py`):
//! - scale = alpha / rank; a missing alpha means alpha = rank (scale 1), as ComfyUI,
//!   kohya and diffusers do; peft's `lora_adapter_metadata` (`lora_alpha`,
//!   `alpha_pattern`, `use_rslora`) is honoured when a module has no `.alpha` key;
//! - text-encoder keys are recognised, listed and kept out of the [`Lora`];
//! - every other key that is no LoRA tensor of a known module is listed as unmatched.
//!
//! Metadata is a plain string map: the writers take it as it is (minus stale hashes).
//! Which `ss_*` / `modelspec.*` fields a training run writes is the trainer's business
//! (`train::metadata`).
//!
//! Must not: apply adapters or touch the model (that is `adapter` / `flux`), know
//! the BFL ↔ diffusers names itself (that is `keymap`), or know about training.

use std::collections::BTreeMap;
use std::fmt;

use candle_core::DType;
use serde::Serialize;

use super::adapter::Lora;

mod fuse;
mod read;
mod report;
#[cfg(test)]
mod test_support;
mod write;

pub use read::{from_bytes, load, parse, read_metadata, tensor_data_hash};
pub use report::{describe, validate, LoraReport};
pub use write::{diffusers_tensors, kohya_hashes, kohya_tensors, save_diffusers, save_kohya};

/// Errors of reading, writing and validating LoRA files. `file` is the path (or the
/// name given to [`parse`]).
#[derive(Debug, thiserror::Error)]
pub enum LoraIoError {
    #[error("{file}: {source}")]
    Io {
        file: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: not a valid safetensors file ({reason})")]
    Corrupt { file: String, reason: String },
    #[error("{file}: `{key}` has no partner `{partner}`")]
    MissingPartner {
        file: String,
        key: String,
        partner: String,
    },
    #[error("{file}: `{key}`: rank mismatch, down is {down:?} but up is {up:?}")]
    RankMismatch {
        file: String,
        key: String,
        down: Vec<usize>,
        up: Vec<usize>,
    },
    #[error("{file}: `{key}`: {reason}")]
    BadTensor {
        file: String,
        key: String,
        reason: String,
    },
    #[error("{file}: `{key}` and `{other}` both give the same LoRA tensor")]
    Duplicate {
        file: String,
        key: String,
        other: String,
    },
    #[error(
        "{file}: unsupported network type {kind} (e.g. key `{key}`); only plain LoRA is supported"
    )]
    Unsupported {
        file: String,
        kind: String,
        key: String,
    },
    #[error("{file}: `{module}` is not a linear module of the Flux transformer")]
    UnknownModule { file: String, module: String },
    #[error("LoRA `{file}` does not fit the model: {}", summarize(.problems))]
    Incompatible { file: String, problems: Vec<String> },
    #[error("{file}: cannot save in {dtype:?}; use f32, f16 or bf16")]
    SaveDtype { file: String, dtype: DType },
    #[error("{file}: {source}")]
    Tensor {
        file: String,
        #[source]
        source: candle_core::Error,
    },
}

fn summarize(problems: &[String]) -> String {
    const SHOWN: usize = 20;
    let mut s = problems
        .iter()
        .take(SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join("; ");
    if problems.len() > SHOWN {
        s.push_str(&format!("; … and {} more", problems.len() - SHOWN));
    }
    s
}

/// The key layout a file was written in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum LoraFormat {
    /// kohya sd-scripts: `lora_unet_<bfl path with _>.lora_down.weight` / `.lora_up.weight` / `.alpha`.
    Kohya,
    /// diffusers / peft: `transformer.<diffusers path>.lora_A.weight` / `lora_B` (optional `.alpha`).
    Diffusers,
    /// ostris/ai-toolkit: diffusers keys without alpha (metadata `software` names
    /// ai-toolkit), or diffusers paths under `diffusion_model.`.
    AiToolkit,
    /// ComfyUI-style BFL paths: `diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight` or `lora_A`.
    ComfyUi,
    /// kohya-style names over diffusers paths: OneTrainer's `lora_transformer_…`, SimpleTuner's `lycoris_…`.
    OneTrainer,
    /// No transformer LoRA tensor recognised.
    Unknown,
}

impl fmt::Display for LoraFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LoraFormat::Kohya => "kohya",
            LoraFormat::Diffusers => "diffusers/peft",
            LoraFormat::AiToolkit => "ai-toolkit",
            LoraFormat::ComfyUi => "comfyui (BFL keys)",
            LoraFormat::OneTrainer => "onetrainer (lora_transformer_)",
            LoraFormat::Unknown => "unknown",
        })
    }
}

/// A parsed LoRA file.
#[derive(Clone, Debug)]
pub struct LoraFile {
    pub lora: Lora,
    pub format: LoraFormat,
    /// The safetensors `__metadata__`.
    pub metadata: BTreeMap<String, String>,
    /// Text-encoder LoRA keys: recognised, not loaded.
    pub text_encoder: Vec<String>,
    /// Keys that are no LoRA tensor of a known transformer module.
    pub unmatched: Vec<String>,
}
