//! What a run writes to disk and reads back to resume.
//!
//! Layout under the output folder (kohya's naming):
//! - `<name>.safetensors`: the final LoRA;
//! - `<name>-step000100.safetensors` / `<name>-000002.safetensors`: intermediate LoRAs
//!   saved every N steps / epochs;
//! - `<name>-step000100-state/`: the full training state beside a step save:
//!   `weights.safetensors` (f32 master weights of what trains), `optimizer.safetensors`,
//!   `state.json` (step, epoch, position in the epoch, loss EMA).
//!
//! A state folder is assembled under a temporary name and renamed into place, so a
//! crash never leaves a half-written state that `--resume` would pick up.
//!
//! Must not: decide when to save (the trainer does).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Result, Tensor};
use serde::{Deserialize, Serialize};

use super::optim::OptimizerState;
use crate::atomic_file;

/// The counters that place a run in its schedule.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// Optimizer steps taken.
    pub step: u64,
    /// Current epoch (0-based).
    pub epoch: u64,
    /// Batches of the current epoch already consumed.
    pub batch_in_epoch: usize,
    /// Micro-batches consumed in the whole run (seeds noise and timesteps).
    pub micro_step: u64,
    pub loss_ema: f64,
    /// Number of losses folded into `loss_ema` (for bias correction).
    pub loss_count: u64,
}

/// The saved training state of a step.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct StateJson {
    format: u32,
    progress: Progress,
    optimizer_kind: String,
    output_name: String,
}

const STATE_FORMAT: u32 = 1;

/// `<name>-step000100.safetensors`
pub(crate) fn step_lora_path(dir: &Path, name: &str, step: u64) -> PathBuf {
    dir.join(format!("{name}-step{step:06}.safetensors"))
}

/// `<name>-000002.safetensors` (kohya's epoch naming)
pub(crate) fn epoch_lora_path(dir: &Path, name: &str, epoch: u64) -> PathBuf {
    dir.join(format!("{name}-{epoch:06}.safetensors"))
}

/// `<name>-step000100-state`
pub(crate) fn state_dir(dir: &Path, name: &str, step: u64) -> PathBuf {
    dir.join(format!("{name}-step{step:06}-state"))
}

fn io_err(path: &Path, e: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::msg(format!("{}: {e}", path.display()))
}

/// Writes the full training state of `progress.step` atomically (whole folder).
pub(crate) fn save_state(
    dir: &Path,
    name: &str,
    progress: &Progress,
    weights: &[(String, Tensor)],
    optimizer: &OptimizerState,
) -> Result<PathBuf> {
    let final_dir = state_dir(dir, name, progress.step);
    let tmp = dir.join(format!(".{name}-step{:06}-state.tmp", progress.step));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| io_err(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| io_err(&tmp, e))?;
    let saved = assemble_state(&tmp, &final_dir, name, progress, weights, optimizer);
    if saved.is_err() {
        // A failed save (a full disk, say) leaves nothing half-assembled behind.
        let _ = std::fs::remove_dir_all(&tmp);
    }
    saved.map(|()| final_dir)
}

/// Writes the state's files into `tmp` and renames it to `final_dir`.
fn assemble_state(
    tmp: &Path,
    final_dir: &Path,
    name: &str,
    progress: &Progress,
    weights: &[(String, Tensor)],
    optimizer: &OptimizerState,
) -> Result<()> {
    let weights_path = tmp.join("weights.safetensors");
    let bytes = safetensors::serialize(weights.iter().map(|(k, v)| (k.as_str(), v)), None)
        .map_err(|e| io_err(&weights_path, e))?;
    atomic_file::write(&weights_path, &bytes).map_err(|e| io_err(&weights_path, e))?;
    let tensors: HashMap<String, Tensor> = optimizer
        .to_tensors()
        .map_err(candle_core::Error::wrap)?
        .into_iter()
        .map(|(k, t)| Ok((k, t.to_device(&Device::Cpu)?)))
        .collect::<Result<_>>()?;
    let bytes = safetensors::serialize(tensors.iter().map(|(k, v)| (k.as_str(), v)), None)
        .map_err(|e| io_err(tmp, e))?;
    let opt_path = tmp.join("optimizer.safetensors");
    atomic_file::write(&opt_path, &bytes).map_err(|e| io_err(&opt_path, e))?;
    let json = StateJson {
        format: STATE_FORMAT,
        progress: progress.clone(),
        optimizer_kind: optimizer.kind.clone(),
        output_name: name.to_string(),
    };
    let text = serde_json::to_string_pretty(&json).map_err(|e| io_err(tmp, e))?;
    let state_path = tmp.join("state.json");
    atomic_file::write(&state_path, text.as_bytes()).map_err(|e| io_err(&state_path, e))?;
    if final_dir.exists() {
        std::fs::remove_dir_all(final_dir).map_err(|e| io_err(final_dir, e))?;
    }
    std::fs::rename(tmp, final_dir).map_err(|e| io_err(final_dir, e))
}

/// A loaded training state.
pub(crate) struct SavedState {
    pub progress: Progress,
    pub weights: HashMap<String, Tensor>,
    pub optimizer: OptimizerState,
}

/// Reads a state folder written by [`save_state`]; errors name the file.
pub(crate) fn load_state(dir: &Path, device: &Device) -> Result<SavedState> {
    let state_path = dir.join("state.json");
    let text = std::fs::read_to_string(&state_path).map_err(|e| io_err(&state_path, e))?;
    let json: StateJson = serde_json::from_str(&text).map_err(|e| io_err(&state_path, e))?;
    if json.format != STATE_FORMAT {
        candle_core::bail!(
            "{}: unknown state format {}",
            state_path.display(),
            json.format
        )
    }
    let weights_path = dir.join("weights.safetensors");
    let weights = candle_core::safetensors::load(&weights_path, device)
        .map_err(|e| io_err(&weights_path, e))?;
    let opt_path = dir.join("optimizer.safetensors");
    let tensors =
        candle_core::safetensors::load(&opt_path, device).map_err(|e| io_err(&opt_path, e))?;
    let optimizer = OptimizerState::from_tensors(&json.optimizer_kind, tensors)
        .map_err(candle_core::Error::wrap)?;
    Ok(SavedState {
        progress: json.progress,
        weights,
        optimizer,
    })
}

/// The newest state folder of run `name` in `dir`, if any.
pub fn latest_state(dir: &Path, name: &str) -> Option<PathBuf> {
    step_saves(dir, name)
        .into_iter()
        .filter(|(_, _, state)| state.is_dir())
        .map(|(_, _, s)| s)
        .next_back()
}

/// (step, lora file, state folder) of every step save of `name`, oldest first.
fn step_saves(dir: &Path, name: &str) -> Vec<(u64, PathBuf, PathBuf)> {
    let prefix = format!("{name}-step");
    let mut out: Vec<(u64, PathBuf, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let file = e.file_name().to_string_lossy().into_owned();
            let rest = file.strip_prefix(&prefix)?;
            let digits = rest
                .strip_suffix(".safetensors")
                .or_else(|| rest.strip_suffix("-state"))?;
            let step: u64 = digits.parse().ok()?;
            Some(step)
        })
        .map(|step| {
            (
                step,
                step_lora_path(dir, name, step),
                state_dir(dir, name, step),
            )
        })
        .collect();
    out.sort_by_key(|(s, _, _)| *s);
    out.dedup_by_key(|(s, _, _)| *s);
    out
}

/// Deletes all but the newest `keep` step saves (LoRA files and state folders).
pub(crate) fn prune_step_saves(dir: &Path, name: &str, keep: usize) -> Result<Vec<u64>> {
    let saves = step_saves(dir, name);
    let n = saves.len().saturating_sub(keep);
    let mut removed = vec![];
    for (step, lora, state) in saves.into_iter().take(n) {
        if lora.exists() {
            std::fs::remove_file(&lora).map_err(|e| io_err(&lora, e))?;
        }
        if state.exists() {
            std::fs::remove_dir_all(&state).map_err(|e| io_err(&state, e))?;
        }
        removed.push(step);
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_and_old_saves_are_pruned() -> Result<()> {
        let dir = tempfile::tempdir().map_err(candle_core::Error::wrap)?;
        let dev = Device::Cpu;
        let weights = vec![("w".to_string(), Tensor::new(&[[0.3f32], [0.4]], &dev)?)];
        let mut opt = OptimizerState {
            kind: "adamw".into(),
            step: 3,
            ..Default::default()
        };
        opt.tensors
            .insert("0.0.m".into(), Tensor::new(&[1.5f32], &dev)?);
        for step in [1, 2, 3] {
            let progress = Progress {
                step,
                epoch: 1,
                batch_in_epoch: 2,
                micro_step: 7,
                loss_ema: 0.25,
                loss_count: 7,
            };
            save_state(dir.path(), "run", &progress, &weights, &opt)?;
            atomic_file::write(&step_lora_path(dir.path(), "run", step), b"lora")
                .map_err(candle_core::Error::wrap)?;
        }
        let latest = latest_state(dir.path(), "run").expect("a state");
        assert_eq!(latest, state_dir(dir.path(), "run", 3));
        let loaded = load_state(&latest, &dev)?;
        assert_eq!(loaded.progress.step, 3);
        assert_eq!(loaded.optimizer.step, 3);
        assert_eq!(
            loaded.optimizer.tensors["0.0.m"].to_vec1::<f32>()?,
            vec![1.5]
        );
        assert_eq!(
            loaded.weights["w"].to_vec2::<f32>()?,
            vec![vec![0.3], vec![0.4]]
        );
        assert_eq!(prune_step_saves(dir.path(), "run", 1)?, vec![1, 2]);
        assert!(!state_dir(dir.path(), "run", 2).exists());
        assert!(step_lora_path(dir.path(), "run", 3).exists());
        // No temporary folders left behind.
        let leftovers = std::fs::read_dir(dir.path())
            .map_err(candle_core::Error::wrap)?
            .filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.file_name().to_string_lossy().starts_with('.'))
            })
            .count();
        assert_eq!(leftovers, 0);
        Ok(())
    }
}
