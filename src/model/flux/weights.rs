//! Where Flux weights come from and where they go: [`WeightSource`] (a seed,
//! in-memory tensors, or memory-mapped BFL / ComfyUI / diffusers safetensors), the
//! loader that stores them in the compute dtype (fp8 stays fp8 and is upcast per layer
//! at compute time), and BFL-layout checkpoints with their config in the metadata.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Result, Tensor};
use candle_nn::init::{Init, DEFAULT_KAIMING_NORMAL};
use candle_nn::var_builder::SimpleBackend;

use super::config::FluxConfig;
use crate::model::keymap;
use crate::model::layers::Linear;
use crate::model::seeded::SeededInit;

/// Where the weights come from. Tensors are returned in their stored dtype.
pub enum WeightSource {
    /// Deterministic weights from a seed (the built-in tiny model before training).
    Seeded(u64),
    /// In-memory tensors with BFL names (tests, converted diffusers weights).
    Tensors(HashMap<String, Tensor>),
    /// Memory-mapped safetensors file(s) with BFL names under `prefix`.
    Mmap {
        files: Vec<PathBuf>,
        st: MmapedSafetensors,
        prefix: String,
    },
}

impl WeightSource {
    /// Opens a transformer checkpoint: a BFL/ComfyUI single file (optionally under a
    /// `model.diffusion_model.` / `diffusion_model.` prefix), or diffusers shards
    /// (a folder, a file, or several files), which are converted to BFL names.
    pub fn open(path: &Path) -> Result<Self> {
        let files = safetensors_files(path)?;
        // SAFETY: the files are opened read-only and not modified while mapped; a file
        // changed underneath us is outside what any mmap-based loader can guard against.
        let st = unsafe { MmapedSafetensors::multi(&files) }?;
        let names: Vec<String> = st.tensors().into_iter().map(|(n, _)| n).collect();
        for prefix in ["", "model.diffusion_model.", "diffusion_model."] {
            if names.iter().any(|n| n == &format!("{prefix}img_in.weight")) {
                return Ok(Self::Mmap {
                    files,
                    st,
                    prefix: prefix.to_string(),
                });
            }
        }
        if keymap::is_diffusers_layout(&names) {
            let lazy = keymap::MmapSource {
                tensors: &st,
                device: &Device::Cpu,
            };
            let bfl = keymap::convert_diffusers_to_bfl(&lazy)
                .map_err(|e| candle_core::Error::msg(format!("{}: {e}", path.display())))?;
            return Ok(Self::Tensors(bfl));
        }
        candle_core::bail!(
            "{}: not a Flux transformer checkpoint (no `img_in.weight` and no diffusers `x_embedder.weight`)",
            path.display()
        )
    }

    pub(crate) fn contains(&self, name: &str) -> bool {
        match self {
            Self::Seeded(_) => true,
            Self::Tensors(t) => t.contains_key(name),
            Self::Mmap { st, prefix, .. } => st.get(&format!("{prefix}{name}")).is_ok(),
        }
    }

    pub(super) fn shape(&self, name: &str) -> Result<Vec<usize>> {
        match self {
            Self::Seeded(_) => {
                candle_core::bail!("seeded weights have no shapes to infer a config from")
            }
            Self::Tensors(t) => t
                .get(name)
                .map(|t| t.dims().to_vec())
                .ok_or_else(|| candle_core::Error::msg(format!("missing weight `{name}`"))),
            Self::Mmap { st, prefix, files } => st
                .get(&format!("{prefix}{name}"))
                .map(|v| v.shape().to_vec())
                .map_err(|_| missing(name, files)),
        }
    }

    /// The tensor `name` with the expected `shape`, in its stored dtype, on `device`.
    fn get(&self, name: &str, shape: &[usize], init: Init, device: &Device) -> Result<Tensor> {
        let t = match self {
            Self::Seeded(seed) => {
                SeededInit { seed: *seed }.get(shape.into(), name, init, DType::F32, device)?
            }
            Self::Tensors(t) => t
                .get(name)
                .ok_or_else(|| candle_core::Error::msg(format!("missing weight `{name}`")))?
                .to_device(device)?,
            Self::Mmap { st, prefix, files } => st
                .load(&format!("{prefix}{name}"), device)
                .map_err(|_| missing(name, files))?,
        };
        if t.dims() != shape {
            candle_core::bail!(
                "weight `{name}` has shape {:?}, the model config expects {shape:?}",
                t.dims()
            )
        }
        Ok(t)
    }
}

fn missing(name: &str, files: &[PathBuf]) -> candle_core::Error {
    let files: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
    candle_core::Error::msg(format!("missing weight `{name}` in {}", files.join(", ")))
}

/// The safetensors files of a checkpoint path (a file, or every `.safetensors` in a folder).
fn safetensors_files(path: &Path) -> Result<Vec<PathBuf>> {
    let err = |e: std::io::Error| candle_core::Error::msg(format!("{}: {e}", path.display()));
    if path.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(err)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        files.sort();
        if files.is_empty() {
            candle_core::bail!("{}: no .safetensors files in this folder", path.display())
        }
        Ok(files)
    } else if path.is_file() {
        Ok(vec![path.to_path_buf()])
    } else {
        candle_core::bail!("{}: no such file or folder", path.display())
    }
}

/// Loads weights for layers: stores them in the compute dtype, except fp8 weights,
/// which stay fp8 in memory and are upcast per layer at compute time.
pub(super) struct Loader<'a> {
    pub(super) source: &'a WeightSource,
    pub(super) dtype: DType,
    pub(super) device: &'a Device,
    pub(super) shapes: BTreeMap<String, (usize, usize)>,
    /// When set, every weight becomes a trainable `Var` (full fine-tuning).
    pub(super) trainable: bool,
}

impl Loader<'_> {
    fn tensor(&self, name: &str, shape: &[usize], init: Init) -> Result<Tensor> {
        let t = self.source.get(name, shape, init, self.device)?;
        if self.trainable {
            return Ok(candle_core::Var::from_tensor(&t.to_dtype(self.dtype)?)?
                .as_tensor()
                .clone());
        }
        if t.dtype() == DType::F8E4M3 || t.dtype() == self.dtype {
            Ok(t)
        } else {
            t.to_dtype(self.dtype)
        }
    }

    pub(super) fn linear(
        &mut self,
        module: &str,
        in_f: usize,
        out_f: usize,
        bias: bool,
    ) -> Result<Linear> {
        let weight = self.tensor(
            &format!("{module}.weight"),
            &[out_f, in_f],
            DEFAULT_KAIMING_NORMAL,
        )?;
        let bias = if bias {
            Some(self.tensor(&format!("{module}.bias"), &[out_f], Init::Const(0.0))?)
        } else {
            None
        };
        self.shapes.insert(module.to_string(), (out_f, in_f));
        Ok(Linear::new(module, weight, bias))
    }

    pub(super) fn rms_scale(&self, name: &str, dim: usize) -> Result<Tensor> {
        self.tensor(name, &[dim], Init::Const(1.0))
    }
}

/// Metadata key under which we store the config of checkpoints we write.
pub const CONFIG_METADATA_KEY: &str = "fluxlora.flux_config";

/// Writes a BFL-layout checkpoint (named weights) with `cfg` in its metadata, atomically.
pub fn save_checkpoint(
    path: &Path,
    cfg: &FluxConfig,
    weights: &[(String, Tensor)],
    dtype: DType,
) -> Result<()> {
    let weights: Vec<(&str, Tensor)> = weights
        .iter()
        .map(|(n, t)| Ok((n.as_str(), t.to_dtype(dtype)?.to_device(&Device::Cpu)?)))
        .collect::<Result<_>>()?;
    let config = serde_json::to_string(cfg).map_err(|e| candle_core::Error::msg(e.to_string()))?;
    let metadata = HashMap::from([(CONFIG_METADATA_KEY.to_string(), config)]);
    let bytes = safetensors::serialize(weights.iter().map(|(k, v)| (*k, v)), Some(metadata))
        .map_err(|e| candle_core::Error::msg(format!("{}: {e}", path.display())))?;
    crate::atomic_file::write(path, &bytes)
        .map_err(|e| candle_core::Error::msg(format!("{}: {e}", path.display())))
}

/// The config stored in a checkpoint's safetensors metadata, if any.
pub(super) fn stored_config(file: &Path) -> Result<Option<FluxConfig>> {
    let metadata = crate::model::lora_io::read_metadata(file)
        .map_err(|e| candle_core::Error::msg(e.to_string()))?;
    match metadata.get(CONFIG_METADATA_KEY) {
        None => Ok(None),
        Some(json) => {
            let cfg: FluxConfig = serde_json::from_str(json).map_err(|e| {
                candle_core::Error::msg(format!(
                    "{}: bad `{CONFIG_METADATA_KEY}` metadata: {e}",
                    file.display()
                ))
            })?;
            cfg.validate()?;
            Ok(Some(cfg))
        }
    }
}
