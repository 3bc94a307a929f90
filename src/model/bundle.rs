//! Finding and loading a model set: the Flux transformer, the T5 and CLIP text
//! encoders with their tokenizers, and the autoencoder.
//!
//! Sources, tried in this order for a path:
//! - a diffusers folder (`model_index.json`, `transformer/`, `text_encoder/`,
//!   `text_encoder_2/`, `tokenizer/`, `tokenizer_2/`, `vae/`);
//! - a ComfyUI install (`models/diffusion_models` or `models/unet`, `models/text_encoders`
//!   or `models/clip`, `models/vae`; tokenizers from `comfy/sd1_tokenizer` and
//!   `comfy/text_encoders/t5_tokenizer`);
//! - a transformer file (BFL single-file layout) with its companions (`ae*.safetensors`,
//!   `t5xxl*.safetensors`, `clip_l*.safetensors`, tokenizer folders) beside it, or in
//!   the ComfyUI install it sits in;
//! - a folder of such loose files.
//!
//! With no path, the built-in tiny model: the same architecture at toy size.
//!
//! Must not: sample or train; it only builds the models.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Result};

use super::flux::{Flux, FluxConfig, WeightSource};
use super::text::{TextEncoderPaths, TextEncoders};
use super::vae::Vae;

/// Seed of the built-in tiny model's deterministic weights.
pub(crate) const TINY_SEED: u64 = 0x_f1a5_10a0;

/// The resolution-dependent time shift a model family samples with (BFL's
/// `base_shift` / `max_shift`): μ is linear in the image token count through
/// (256, base) and (4096, max). Plain data about the model; `sample::schedule`
/// turns μ into the shifted times.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Shift {
    pub base_shift: f64,
    pub max_shift: f64,
}

impl Default for Shift {
    fn default() -> Self {
        Self {
            base_shift: 0.5,
            max_shift: 1.15,
        }
    }
}

impl Shift {
    /// μ for an image of `image_seq_len` tokens.
    pub(crate) fn mu(&self, image_seq_len: usize) -> f64 {
        let (x1, x2) = (256.0, 4096.0);
        let m = (self.max_shift - self.base_shift) / (x2 - x1);
        let b = self.base_shift - m * x1;
        m * image_seq_len as f64 + b
    }
}

/// Generation defaults that fit a model family.
#[derive(Clone, Debug)]
pub struct SamplingDefaults {
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    pub guidance: f64,
    /// Resolution-dependent time shift (dev); `None` for schnell's plain schedule.
    pub shift: Option<Shift>,
}

/// A complete model set on one device. The text encoders and the autoencoder can
/// be released once a training run has cached their outputs (the largest memory
/// saving on real weights); asking for them afterwards is an error that says so.
pub struct ModelBundle {
    /// Display name: `tiny`, or the transformer file/folder name.
    pub name: String,
    pub flux: Flux,
    text: Option<TextEncoders>,
    vae: Option<Vae>,
    pub defaults: SamplingDefaults,
    device: Device,
}

/// Pretrained tiny DiT weights (BFL keys), written by `fluxlora pretrain-tiny`.
const TINY_FLUX: &[u8] = include_bytes!("../../assets/tiny/flux.safetensors");
/// Pretrained tiny autoencoder weights with its latent scale/shift in the metadata.
const TINY_VAE: &[u8] = include_bytes!("../../assets/tiny/vae.safetensors");

/// The tiny VAE from bytes written by the pretraining (scale/shift from metadata).
pub(crate) fn tiny_vae_from_bytes(bytes: &[u8], device: &Device) -> Result<Vae> {
    let (_, meta) = safetensors::SafeTensors::read_metadata(bytes)
        .map_err(|e| candle_core::Error::msg(format!("tiny VAE: {e}")))?;
    let meta = meta.metadata().clone().unwrap_or_default();
    let mut cfg = Vae::tiny_config();
    let num = |k: &str| meta.get(k).and_then(|v| v.parse::<f64>().ok());
    cfg.scale_factor = num("scale_factor").unwrap_or(1.0);
    cfg.shift_factor = num("shift_factor").unwrap_or(0.0);
    let tensors = candle_core::safetensors::load_buffer(bytes, device)?;
    Vae::tiny_from_varbuilder(
        &cfg,
        candle_nn::VarBuilder::from_tensors(tensors, DType::F32, device),
    )
}

const RELEASED: &str =
    "the text encoders and autoencoder were released after caching to save memory \
(keep them with sample prompts, a validation set, or a text-encoder LoRA)";

/// The built-in tiny transformer's config, sized to the tiny encoders and VAE.
pub(crate) fn tiny_flux_config(text: &TextEncoders, vae: &Vae) -> FluxConfig {
    FluxConfig {
        in_channels: vae.latent_channels() * 4,
        vec_in_dim: text.pooled_dim(),
        context_in_dim: text.t5_dim(),
        hidden_size: 64,
        mlp_ratio: 4.0,
        num_heads: 4,
        depth: 1,
        depth_single_blocks: 2,
        axes_dim: vec![4, 6, 6],
        theta: 10_000.0,
        qkv_bias: true,
        guidance_embed: false,
    }
}

impl ModelBundle {
    /// The built-in tiny model (f32): works anywhere with no files. Its DiT and VAE
    /// are the pretrained weights embedded in the binary (see `train::pretrain_tiny`);
    /// the tiny text encoders are deterministic from their seed.
    pub fn tiny(device: &Device) -> Result<Self> {
        Self::tiny_in(device, DType::F32)
    }

    /// The built-in tiny model with the transformer computing in `dtype` (the small
    /// text encoders and autoencoder stay f32).
    pub fn tiny_in(device: &Device, dtype: DType) -> Result<Self> {
        let text = TextEncoders::tiny(TINY_SEED, device)?;
        let vae = tiny_vae_from_bytes(TINY_VAE, device)?;
        let cfg = tiny_flux_config(&text, &vae);
        let weights = candle_core::safetensors::load_buffer(TINY_FLUX, device)?;
        let flux = Flux::new(&cfg, &WeightSource::Tensors(weights), dtype, device)?;
        Ok(Self::new("tiny", flux, text, vae, Self::tiny_defaults()))
    }

    /// The tiny model before pretraining: every weight from the seed.
    pub fn tiny_untrained(device: &Device) -> Result<Self> {
        let text = TextEncoders::tiny(TINY_SEED, device)?;
        let vae = Vae::tiny(TINY_SEED, device)?;
        let cfg = tiny_flux_config(&text, &vae);
        let flux = Flux::new(&cfg, &WeightSource::Seeded(TINY_SEED), DType::F32, device)?;
        Ok(Self::new(
            "tiny-untrained",
            flux,
            text,
            vae,
            Self::tiny_defaults(),
        ))
    }

    /// Sampling defaults of the tiny model: 64×64, 12 steps, shifted schedule.
    pub(crate) fn tiny_defaults() -> SamplingDefaults {
        SamplingDefaults {
            width: 64,
            height: 64,
            steps: 12,
            guidance: 1.0,
            shift: Some(Shift::default()),
        }
    }

    /// Loads a real model set from `path` (see the module doc for the layouts).
    pub fn load(path: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let paths = ModelPaths::discover(path)?;
        tracing::info!(transformer = %paths.transformer.display(), vae = %paths.vae.display(),
            t5 = %paths.text.t5.display(), clip = %paths.text.clip.display(), "loading model files");
        let flux = Flux::load(&paths.transformer, dtype, device)?;
        let dev_like = flux.config().guidance_embed;
        let t5_max_len = if dev_like { 512 } else { 256 };
        let text = TextEncoders::load(&paths.text, t5_max_len, device, dtype)?;
        let vae = Vae::load(&paths.vae, device, dtype)?;
        let defaults = if dev_like {
            SamplingDefaults {
                width: 1024,
                height: 1024,
                steps: 28,
                guidance: 3.5,
                shift: Some(Shift::default()),
            }
        } else {
            SamplingDefaults {
                width: 1024,
                height: 1024,
                steps: 4,
                guidance: 0.0,
                shift: None,
            }
        };
        let name = paths
            .transformer
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "flux".into());
        Ok(Self::new(name, flux, text, vae, defaults))
    }

    pub(crate) fn new(
        name: impl Into<String>,
        flux: Flux,
        text: TextEncoders,
        vae: Vae,
        defaults: SamplingDefaults,
    ) -> Self {
        let device = text.device().clone();
        Self {
            name: name.into(),
            flux,
            text: Some(text),
            vae: Some(vae),
            defaults,
            device,
        }
    }

    pub(crate) fn device(&self) -> &Device {
        &self.device
    }

    /// The text encoders, unless released.
    pub fn text(&self) -> Result<&TextEncoders> {
        self.text
            .as_ref()
            .ok_or_else(|| candle_core::Error::msg(RELEASED))
    }

    pub(crate) fn text_mut(&mut self) -> Result<&mut TextEncoders> {
        self.text
            .as_mut()
            .ok_or_else(|| candle_core::Error::msg(RELEASED))
    }

    /// The autoencoder, unless released.
    pub fn vae(&self) -> Result<&Vae> {
        self.vae
            .as_ref()
            .ok_or_else(|| candle_core::Error::msg(RELEASED))
    }

    /// Frees the text encoders and the autoencoder (after caching their outputs).
    pub(crate) fn release_encoders(&mut self) {
        self.text = None;
        self.vae = None;
    }

    /// Every module a LoRA may target, DiT and CLIP text encoder, with (out, in).
    pub fn adapter_shapes(&self) -> std::collections::BTreeMap<String, (usize, usize)> {
        let mut shapes = self.flux.linear_shapes().clone();
        if let Some(text) = &self.text {
            shapes.extend(text.clip_linear_shapes());
        }
        shapes
    }
}

/// The files of one model set.
#[derive(Clone, Debug)]
pub(crate) struct ModelPaths {
    pub transformer: PathBuf,
    pub vae: PathBuf,
    pub text: TextEncoderPaths,
}

impl ModelPaths {
    /// Finds every part of a model set from one path; the error lists what is missing
    /// and where it was looked for.
    pub(crate) fn discover(path: &Path) -> Result<Self> {
        if !path.exists() {
            candle_core::bail!("{}: no such file or folder", path.display())
        }
        if path.join("model_index.json").is_file() {
            return Ok(Self {
                transformer: path.join("transformer"),
                vae: path.join("vae"),
                text: TextEncoderPaths {
                    t5: path.join("text_encoder_2"),
                    clip: path.join("text_encoder"),
                    t5_tokenizer: path.join("tokenizer_2"),
                    clip_tokenizer: path.join("tokenizer"),
                },
            })
            .and_then(Self::check);
        }
        let (transformer, root) = if path.is_file() {
            (Some(path.to_path_buf()), comfy_root_of(path))
        } else if path.join("models").is_dir() {
            (None, Some(path.to_path_buf()))
        } else {
            (None, None)
        };
        let folder = if path.is_file() {
            path.parent().unwrap_or(Path::new(".")).to_path_buf()
        } else {
            path.to_path_buf()
        };
        // Where each part may live: the folder itself first, then ComfyUI's folders.
        let dirs = |subs: &[&str]| {
            let mut d = vec![folder.clone()];
            if let Some(r) = &root {
                d.extend(subs.iter().map(|s| r.join(s)));
            }
            d
        };
        let transformer_dirs = dirs(&["models/diffusion_models", "models/unet"]);
        let vae_dirs = dirs(&["models/vae"]);
        let te_dirs = dirs(&["models/text_encoders", "models/clip"]);
        let t5_tok_dirs = dirs(&["comfy/text_encoders/t5_tokenizer"]);
        let clip_tok_dirs = dirs(&["comfy/sd1_tokenizer"]);

        let mut missing = vec![];
        let mut need = |what: &str, found: Option<PathBuf>, dirs: &[PathBuf]| {
            found.unwrap_or_else(|| {
                let where_: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
                missing.push(format!("{what} (looked in {})", where_.join(", ")));
                PathBuf::new()
            })
        };
        let transformer = transformer.or_else(|| find_file(&transformer_dirs, &["flux"]));
        let transformer = need(
            "a Flux transformer (*flux*.safetensors)",
            transformer,
            &transformer_dirs,
        );
        let vae = need(
            "the autoencoder (ae.safetensors)",
            find_file(&vae_dirs, &["ae", "flux_vae", "vae"]),
            &vae_dirs,
        );
        let t5 = need(
            "T5 (t5xxl*.safetensors)",
            find_file(&te_dirs, &["t5xxl", "t5"]),
            &te_dirs,
        );
        let clip = need(
            "CLIP-L (clip_l*.safetensors)",
            find_file(&te_dirs, &["clip_l"]),
            &te_dirs,
        );
        let t5_tokenizer = need(
            "the T5 tokenizer (tokenizer.json)",
            find_dir_with(
                &t5_tok_dirs,
                &["tokenizer_2", "t5_tokenizer"],
                "tokenizer.json",
            ),
            &t5_tok_dirs,
        );
        let clip_tokenizer = need(
            "the CLIP tokenizer (vocab.json + merges.txt)",
            find_dir_with(
                &clip_tok_dirs,
                &["tokenizer", "clip_tokenizer"],
                "vocab.json",
            ),
            &clip_tok_dirs,
        );
        if !missing.is_empty() {
            candle_core::bail!(
                "{}: incomplete model set, missing {}",
                path.display(),
                missing.join("; ")
            )
        }
        Ok(Self {
            transformer,
            vae,
            text: TextEncoderPaths {
                t5,
                clip,
                t5_tokenizer,
                clip_tokenizer,
            },
        })
    }

    fn check(self) -> Result<Self> {
        let parts = [
            ("transformer", &self.transformer),
            ("vae", &self.vae),
            ("text_encoder_2 (T5)", &self.text.t5),
            ("text_encoder (CLIP)", &self.text.clip),
            ("tokenizer_2", &self.text.t5_tokenizer),
            ("tokenizer", &self.text.clip_tokenizer),
        ];
        let missing: Vec<String> = parts
            .iter()
            .filter(|(_, p)| !p.exists())
            .map(|(what, p)| format!("{what} at {}", p.display()))
            .collect();
        if missing.is_empty() {
            Ok(self)
        } else {
            candle_core::bail!("diffusers model folder is missing {}", missing.join(", "))
        }
    }
}

/// The ComfyUI root of a file under `<root>/models/<kind>/…`.
fn comfy_root_of(file: &Path) -> Option<PathBuf> {
    file.ancestors()
        .skip(1)
        .find(|a| a.file_name().is_some_and(|n| n == "models"))
        .and_then(|models| models.parent().map(Path::to_path_buf))
}

/// The first `.safetensors` file (sorted by name) in `dirs` whose lower-cased name
/// starts with or contains one of `stems`, earlier stems preferred.
fn find_file(dirs: &[PathBuf], stems: &[&str]) -> Option<PathBuf> {
    for stem in stems {
        for dir in dirs {
            let Ok(entries) = std::fs::read_dir(dir) else {
                continue;
            };
            let mut files: Vec<PathBuf> = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "safetensors"))
                .filter(|p| {
                    let name = p
                        .file_name()
                        .map(|n| n.to_string_lossy().to_lowercase())
                        .unwrap_or_default();
                    name.starts_with(stem) || (stem.len() > 2 && name.contains(stem))
                })
                .collect();
            files.sort();
            if let Some(f) = files.into_iter().next() {
                return Some(f);
            }
        }
    }
    None
}

/// A folder among `dirs` (or their `subs` subfolders) that holds `marker`.
fn find_dir_with(dirs: &[PathBuf], subs: &[&str], marker: &str) -> Option<PathBuf> {
    dirs.iter()
        .flat_map(|d| std::iter::once(d.clone()).chain(subs.iter().map(move |s| d.join(s))))
        .find(|d| d.join(marker).is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(p: &Path) {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, b"").unwrap();
    }

    #[test]
    fn discovers_a_comfyui_install_from_the_transformer_file() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        let unet = r.join("models/diffusion_models/flux1-dev.safetensors");
        for p in [
            &unet,
            &r.join("models/vae/ae.safetensors"),
            &r.join("models/text_encoders/t5xxl_fp16.safetensors"),
            &r.join("models/text_encoders/clip_l.safetensors"),
            &r.join("comfy/text_encoders/t5_tokenizer/tokenizer.json"),
            &r.join("comfy/sd1_tokenizer/vocab.json"),
        ] {
            touch(p);
        }
        let paths = ModelPaths::discover(&unet).unwrap();
        assert_eq!(paths.transformer, unet);
        assert_eq!(paths.vae, r.join("models/vae/ae.safetensors"));
        assert_eq!(
            paths.text.t5,
            r.join("models/text_encoders/t5xxl_fp16.safetensors")
        );
        assert_eq!(
            paths.text.clip,
            r.join("models/text_encoders/clip_l.safetensors")
        );
        assert_eq!(paths.text.clip_tokenizer, r.join("comfy/sd1_tokenizer"));
        // The install root finds the same set.
        assert_eq!(
            ModelPaths::discover(r).unwrap().transformer,
            paths.transformer
        );
    }

    #[test]
    fn incomplete_set_names_every_missing_part() {
        let root = tempfile::tempdir().unwrap();
        let f = root.path().join("flux1-schnell.safetensors");
        touch(&f);
        let err = ModelPaths::discover(&f).unwrap_err().to_string();
        for part in [
            "autoencoder",
            "T5",
            "CLIP-L",
            "T5 tokenizer",
            "CLIP tokenizer",
        ] {
            assert!(err.contains(part), "{part} not in: {err}");
        }
    }

    #[test]
    fn diffusers_folder_layout() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        touch(&r.join("model_index.json"));
        for d in [
            "transformer",
            "vae",
            "text_encoder",
            "text_encoder_2",
            "tokenizer",
            "tokenizer_2",
        ] {
            std::fs::create_dir_all(r.join(d)).unwrap();
        }
        let paths = ModelPaths::discover(r).unwrap();
        assert_eq!(paths.transformer, r.join("transformer"));
        std::fs::remove_dir(r.join("vae")).unwrap();
        assert!(ModelPaths::discover(r)
            .unwrap_err()
            .to_string()
            .contains("vae"));
    }

    #[test]
    fn mu_interpolates_base_and_max() {
        let s = Shift::default();
        assert!((s.mu(256) - 0.5).abs() < 1e-12);
        assert!((s.mu(4096) - 1.15).abs() < 1e-12);
    }
}
