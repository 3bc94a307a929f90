//! The Flux DiT (Black Forest Labs' rectified-flow transformer), in one file.
//!
//! Owns: [`FluxConfig`], the layers (adapter-aware [`Linear`], modulation, double- and
//! single-stream blocks, final adaLN layer, 3-axis RoPE), the forward pass, loading
//! weights from the BFL single-file key layout (as in `flux1-dev.safetensors` and
//! ComfyUI's `models/diffusion_models`) or the diffusers layout (converted to BFL names
//! on load by `keymap`, q/k/v fused), and the latent packing conventions (2×2 patches,
//! position ids).
//!
//! Every linear carries its BFL module path (`double_blocks.3.img_attn.qkv`) and asks the
//! [`AdapterSet`] passed to `forward` for LoRA updates, so adapters are applied
//! unmerged and the base weights are never copied or changed.
//!
//! Paths that may carry gradients (a trainable adapter) use differentiable
//! compositions of basic ops; candle-nn's fused softmax, norms and RoPE have no
//! backward and are used only when nothing on the input requires a gradient.
//!
//! Must not: decide devices or dtypes (the caller does), sample, or touch files other
//! than the weight source it is given.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Result, Tensor, D};
use candle_nn::init::{Init, DEFAULT_KAIMING_NORMAL};
use serde::{Deserialize, Serialize};

use super::adapter::AdapterSet;
use super::keymap;
use super::layers::{layer_norm, softmax_last, tracks, Linear};
use super::seeded::SeededInit;
use candle_nn::var_builder::SimpleBackend;

/// Architecture hyper-parameters (the field names of BFL's `FluxParams`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FluxConfig {
    pub in_channels: usize,
    pub vec_in_dim: usize,
    pub context_in_dim: usize,
    pub hidden_size: usize,
    pub mlp_ratio: f64,
    pub num_heads: usize,
    pub depth: usize,
    pub depth_single_blocks: usize,
    pub axes_dim: Vec<usize>,
    pub theta: f64,
    pub qkv_bias: bool,
    pub guidance_embed: bool,
}

impl FluxConfig {
    /// FLUX.1 [dev]: guidance-distilled.
    pub fn dev() -> Self {
        Self {
            in_channels: 64,
            vec_in_dim: 768,
            context_in_dim: 4096,
            hidden_size: 3072,
            mlp_ratio: 4.0,
            num_heads: 24,
            depth: 19,
            depth_single_blocks: 38,
            axes_dim: vec![16, 56, 56],
            theta: 10_000.0,
            qkv_bias: true,
            guidance_embed: true,
        }
    }

    /// FLUX.1 [schnell]: timestep-distilled, no guidance embedding.
    pub fn schnell() -> Self {
        Self {
            guidance_embed: false,
            ..Self::dev()
        }
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads.max(1)
    }

    pub fn mlp_hidden(&self) -> usize {
        (self.hidden_size as f64 * self.mlp_ratio) as usize
    }

    /// Checks the sizes fit together; the message names the offending field.
    pub fn validate(&self) -> Result<()> {
        if self.num_heads == 0 || !self.hidden_size.is_multiple_of(self.num_heads) {
            candle_core::bail!(
                "flux config: hidden_size {} is not a multiple of num_heads {}",
                self.hidden_size,
                self.num_heads
            )
        }
        let pe: usize = self.axes_dim.iter().sum();
        if pe != self.head_dim() || self.axes_dim.iter().any(|d| d % 2 != 0) {
            candle_core::bail!(
                "flux config: axes_dim {:?} must be even and sum to the head dim {}",
                self.axes_dim,
                self.head_dim()
            )
        }
        if self.in_channels == 0 || self.vec_in_dim == 0 || self.context_in_dim == 0 {
            candle_core::bail!(
                "flux config: in_channels, vec_in_dim and context_in_dim must be > 0"
            )
        }
        Ok(())
    }

    /// Reads a parity-fixture / BFL-style `config.json`.
    pub fn from_json_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| candle_core::Error::msg(format!("{}: {e}", path.display())))?;
        let cfg: Self = serde_json::from_str(&text)
            .map_err(|e| candle_core::Error::msg(format!("{}: {e}", path.display())))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Infers the config from the shapes of BFL-named weights. RoPE axes follow
    /// Flux's split of a 128-wide head ([16, 56, 56]) scaled to the head dim.
    pub fn infer(weights: &WeightSource) -> Result<Self> {
        let shape = |name: &str| weights.shape(name);
        let img_in = shape("img_in.weight")?;
        let (hidden_size, in_channels) = (img_in[0], img_in[1]);
        let context_in_dim = shape("txt_in.weight")?[1];
        let vec_in_dim = shape("vector_in.in_layer.weight")?[1];
        let mlp = shape("double_blocks.0.img_mlp.0.weight")
            .or_else(|_| shape("single_blocks.0.linear2.weight").map(|s| vec![s[1] - s[0]]))?[0];
        let head_dim = shape("double_blocks.0.img_attn.norm.query_norm.scale")
            .or_else(|_| shape("single_blocks.0.norm.query_norm.scale"))?[0];
        let count = |prefix: &str| {
            (0..)
                .take_while(|i| weights.contains(&format!("{prefix}.{i}.{}", block_probe(prefix))))
                .count()
        };
        let axes_dim = if head_dim == 128 {
            vec![16, 56, 56]
        } else {
            let first = (head_dim / 8) & !1;
            let rest = ((head_dim - first) / 2) & !1;
            vec![first, rest, head_dim - first - rest]
        };
        let cfg = Self {
            in_channels,
            vec_in_dim,
            context_in_dim,
            hidden_size,
            mlp_ratio: mlp as f64 / hidden_size as f64,
            num_heads: hidden_size / head_dim.max(1),
            depth: count("double_blocks"),
            depth_single_blocks: count("single_blocks"),
            axes_dim,
            theta: 10_000.0,
            qkv_bias: weights.contains("double_blocks.0.img_attn.qkv.bias")
                || weights.contains("single_blocks.0.linear1.bias"),
            guidance_embed: weights.contains("guidance_in.in_layer.weight"),
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

fn block_probe(prefix: &str) -> &'static str {
    if prefix == "double_blocks" {
        "img_attn.qkv.weight"
    } else {
        "linear1.weight"
    }
}

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

    pub fn contains(&self, name: &str) -> bool {
        match self {
            Self::Seeded(_) => true,
            Self::Tensors(t) => t.contains_key(name),
            Self::Mmap { st, prefix, .. } => st.get(&format!("{prefix}{name}")).is_ok(),
        }
    }

    fn shape(&self, name: &str) -> Result<Vec<usize>> {
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
struct Loader<'a> {
    source: &'a WeightSource,
    dtype: DType,
    device: &'a Device,
    shapes: BTreeMap<String, (usize, usize)>,
    /// When set, every weight becomes a trainable `Var` (full fine-tuning).
    trainable: bool,
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

    fn linear(&mut self, module: &str, in_f: usize, out_f: usize, bias: bool) -> Result<Linear> {
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

    fn rms_scale(&self, name: &str, dim: usize) -> Result<Tensor> {
        self.tensor(name, &[dim], Init::Const(1.0))
    }
}

/// Flux's QK RMSNorm: x·rsqrt(mean(x²) + 1e-6) in f32, back to x's dtype, times `scale`.
fn rms_norm(x: &Tensor, scale: &Tensor) -> Result<Tensor> {
    let dtype = x.dtype();
    let scale = scale.to_dtype(dtype)?;
    let xf = x.to_dtype(DType::F32)?;
    let normed = if tracks(&[&xf, &scale]) {
        let rrms = (xf.sqr()?.mean_keepdim(D::Minus1)? + 1e-6)?
            .sqrt()?
            .recip()?;
        xf.broadcast_mul(&rrms)?
    } else {
        let ones = Tensor::ones(xf.dim(D::Minus1)?, DType::F32, xf.device())?;
        candle_nn::ops::rms_norm(&xf.contiguous()?, &ones, 1e-6)?
    };
    normed.to_dtype(dtype)?.broadcast_mul(&scale)
}

/// RoPE angles for position ids: cos and sin, each (b, seq, head_dim / 2), f32.
#[derive(Clone, Debug)]
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    /// ids (b, seq, n_axes) → per-axis frequencies θ^(−2j/dᵢ), concatenated over axes.
    pub fn new(ids: &Tensor, axes_dim: &[usize], theta: f64) -> Result<Self> {
        let ids = ids.to_dtype(DType::F32)?;
        let (_b, _seq, n_axes) = ids.dims3()?;
        if n_axes != axes_dim.len() {
            candle_core::bail!(
                "position ids have {n_axes} axes, the config has {}",
                axes_dim.len()
            )
        }
        let mut angles = Vec::with_capacity(n_axes);
        for (i, &d) in axes_dim.iter().enumerate() {
            let omega: Vec<f32> = (0..d / 2)
                .map(|j| (1.0 / theta.powf(2.0 * j as f64 / d as f64)) as f32)
                .collect();
            let omega = Tensor::from_vec(omega, (1, 1, d / 2), ids.device())?;
            let pos = ids.narrow(2, i, 1)?; // (b, seq, 1)
            angles.push(pos.broadcast_mul(&omega)?);
        }
        let angles = Tensor::cat(&angles, 2)?.contiguous()?; // (b, seq, head_dim/2)
        Ok(Self {
            cos: angles.cos()?,
            sin: angles.sin()?,
        })
    }

    /// x (b, heads, seq, head_dim) with (x₂ᵢ, x₂ᵢ₊₁) pairs rotated by the angles.
    fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let cos = self.cos.to_dtype(dtype)?;
        let sin = self.sin.to_dtype(dtype)?;
        if !tracks(&[x]) {
            return candle_nn::rotary_emb::rope_i(&x.contiguous()?, &cos, &sin);
        }
        let (b, h, seq, d) = x.dims4()?;
        let pairs = x.reshape((b, h, seq, d / 2, 2))?;
        let x0 = pairs.narrow(4, 0, 1)?.squeeze(4)?;
        let x1 = pairs.narrow(4, 1, 1)?.squeeze(4)?;
        let cos = cos.unsqueeze(1)?; // (b, 1, seq, d/2)
        let sin = sin.unsqueeze(1)?;
        let r0 = (x0.broadcast_mul(&cos)? - x1.broadcast_mul(&sin)?)?;
        let r1 = (x0.broadcast_mul(&sin)? + x1.broadcast_mul(&cos)?)?;
        Tensor::stack(&[r0, r1], 4)?.reshape((b, h, seq, d))
    }
}

/// Scaled dot-product attention with RoPE; q, k, v (b, heads, seq, head_dim) → (b, seq, heads·head_dim).
fn attention(q: &Tensor, k: &Tensor, v: &Tensor, pe: &Rope) -> Result<Tensor> {
    let q = pe.apply(q)?;
    let k = pe.apply(k)?;
    let (b, h, seq, d) = q.dims4()?;
    let scores = (q.matmul(&k.t()?.contiguous()?)? * (1.0 / (d as f64).sqrt()))?;
    let probs = softmax_last(&scores.to_dtype(DType::F32)?)?.to_dtype(v.dtype())?;
    let out = probs.matmul(&v.contiguous()?)?; // (b, heads, seq, head_dim)
    out.transpose(1, 2)?.reshape((b, seq, h * d))
}

/// Sinusoidal embedding of t ∈ [0, 1] (scaled by 1000), [cos | sin], (b, dim), f32.
pub fn timestep_embedding(t: &Tensor, dim: usize) -> Result<Tensor> {
    const TIME_FACTOR: f64 = 1000.0;
    const MAX_PERIOD: f64 = 10_000.0;
    let half = dim / 2;
    let freqs: Vec<f32> = (0..half)
        .map(|i| (-(MAX_PERIOD.ln()) * i as f64 / half as f64).exp() as f32)
        .collect();
    let freqs = Tensor::from_vec(freqs, (1, half), t.device())?;
    let t = (t.to_dtype(DType::F32)? * TIME_FACTOR)?.unsqueeze(1)?;
    let args = t.broadcast_mul(&freqs)?;
    let emb = Tensor::cat(&[args.cos()?, args.sin()?], 1)?;
    if dim % 2 == 1 {
        let b = emb.dim(0)?;
        Tensor::cat(&[emb, Tensor::zeros((b, 1), DType::F32, t.device())?], 1)
    } else {
        Ok(emb)
    }
}

/// Two-layer MLP with SiLU (`in_layer`, `out_layer`): time, guidance and vector embedders.
#[derive(Clone, Debug)]
struct MlpEmbedder {
    in_layer: Linear,
    out_layer: Linear,
}

impl MlpEmbedder {
    fn new(ld: &mut Loader, module: &str, in_dim: usize, hidden: usize) -> Result<Self> {
        Ok(Self {
            in_layer: ld.linear(&format!("{module}.in_layer"), in_dim, hidden, true)?,
            out_layer: ld.linear(&format!("{module}.out_layer"), hidden, hidden, true)?,
        })
    }

    fn forward(&self, x: &Tensor, ad: &AdapterSet) -> Result<Tensor> {
        let h = self.in_layer.forward(x, ad)?.silu()?;
        self.out_layer.forward(&h, ad)
    }
}

/// shift, scale, gate for one sub-layer, each (b, 1, hidden).
struct ModulationOut {
    shift: Tensor,
    scale: Tensor,
    gate: Tensor,
}

impl ModulationOut {
    /// (1 + scale) · x + shift
    fn modulate(&self, x: &Tensor) -> Result<Tensor> {
        x.broadcast_mul(&(&self.scale + 1.0)?)?
            .broadcast_add(&self.shift)
    }

    /// gate · x
    fn gate(&self, x: &Tensor) -> Result<Tensor> {
        x.broadcast_mul(&self.gate)
    }
}

/// `lin(silu(vec))` chunked into `n` (shift, scale, gate) triples.
fn modulation(lin: &Linear, vec: &Tensor, n: usize, ad: &AdapterSet) -> Result<Vec<ModulationOut>> {
    let out = lin.forward(&vec.silu()?, ad)?.unsqueeze(1)?; // (b, 1, 3n·hidden)
    let chunks = out.chunk(3 * n, D::Minus1)?;
    Ok(chunks
        .chunks(3)
        .map(|c| ModulationOut {
            shift: c[0].clone(),
            scale: c[1].clone(),
            gate: c[2].clone(),
        })
        .collect())
}

/// (b, seq, 3·hidden) → q, k, v each (b, heads, seq, head_dim).
fn split_qkv(qkv: &Tensor, heads: usize) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, seq, three_hidden) = qkv.dims3()?;
    let head_dim = three_hidden / 3 / heads;
    let qkv = qkv
        .reshape((b, seq, 3, heads, head_dim))?
        .permute((2, 0, 3, 1, 4))?;
    Ok((qkv.get(0)?, qkv.get(1)?, qkv.get(2)?))
}

/// One stream (image or text) of a double block.
#[derive(Clone, Debug)]
struct Stream {
    modulation: Linear,
    qkv: Linear,
    query_norm: Tensor,
    key_norm: Tensor,
    proj: Linear,
    mlp_in: Linear,
    mlp_out: Linear,
}

impl Stream {
    fn new(ld: &mut Loader, block: &str, s: &str, cfg: &FluxConfig) -> Result<Self> {
        let h = cfg.hidden_size;
        let m = cfg.mlp_hidden();
        Ok(Self {
            modulation: ld.linear(&format!("{block}.{s}_mod.lin"), h, 6 * h, true)?,
            qkv: ld.linear(&format!("{block}.{s}_attn.qkv"), h, 3 * h, cfg.qkv_bias)?,
            query_norm: ld.rms_scale(
                &format!("{block}.{s}_attn.norm.query_norm.scale"),
                cfg.head_dim(),
            )?,
            key_norm: ld.rms_scale(
                &format!("{block}.{s}_attn.norm.key_norm.scale"),
                cfg.head_dim(),
            )?,
            proj: ld.linear(&format!("{block}.{s}_attn.proj"), h, h, true)?,
            mlp_in: ld.linear(&format!("{block}.{s}_mlp.0"), h, m, true)?,
            mlp_out: ld.linear(&format!("{block}.{s}_mlp.2"), m, h, true)?,
        })
    }

    /// The stream's normed q, k, v (b, heads, seq, head_dim) and its modulations.
    fn pre_attention(
        &self,
        x: &Tensor,
        vec: &Tensor,
        heads: usize,
        ad: &AdapterSet,
    ) -> Result<(Tensor, Tensor, Tensor, Vec<ModulationOut>)> {
        let mods = modulation(&self.modulation, vec, 2, ad)?;
        let x_mod = mods[0].modulate(&layer_norm(x, None, 1e-6)?)?;
        let (q, k, v) = split_qkv(&self.qkv.forward(&x_mod, ad)?, heads)?;
        let q = rms_norm(&q, &self.query_norm)?;
        let k = rms_norm(&k, &self.key_norm)?;
        Ok((q, k, v, mods))
    }

    /// Residual attention output and MLP after the joint attention.
    fn post_attention(
        &self,
        x: &Tensor,
        attn: &Tensor,
        mods: &[ModulationOut],
        ad: &AdapterSet,
    ) -> Result<Tensor> {
        let x = (x + mods[0].gate(&self.proj.forward(attn, ad)?)?)?;
        let h = mods[1].modulate(&layer_norm(&x, None, 1e-6)?)?;
        let h = self.mlp_in.forward(&h, ad)?.gelu()?;
        let h = self.mlp_out.forward(&h, ad)?;
        x + mods[1].gate(&h)?
    }
}

/// Double-stream block: separate image and text weights, joint attention.
#[derive(Clone, Debug)]
pub struct DoubleBlock {
    img: Stream,
    txt: Stream,
    heads: usize,
}

impl DoubleBlock {
    fn new(ld: &mut Loader, i: usize, cfg: &FluxConfig) -> Result<Self> {
        let block = format!("double_blocks.{i}");
        Ok(Self {
            img: Stream::new(ld, &block, "img", cfg)?,
            txt: Stream::new(ld, &block, "txt", cfg)?,
            heads: cfg.num_heads,
        })
    }

    /// img (b, n_img, hidden), txt (b, n_txt, hidden) → updated (img, txt).
    pub fn forward(
        &self,
        img: &Tensor,
        txt: &Tensor,
        vec: &Tensor,
        pe: &Rope,
        ad: &AdapterSet,
    ) -> Result<(Tensor, Tensor)> {
        let (img_q, img_k, img_v, img_mods) = self.img.pre_attention(img, vec, self.heads, ad)?;
        let (txt_q, txt_k, txt_v, txt_mods) = self.txt.pre_attention(txt, vec, self.heads, ad)?;
        let q = Tensor::cat(&[txt_q, img_q], 2)?;
        let k = Tensor::cat(&[txt_k, img_k], 2)?;
        let v = Tensor::cat(&[txt_v, img_v], 2)?;
        let attn = attention(&q, &k, &v, pe)?; // (b, n_txt + n_img, hidden)
        let n_txt = txt.dim(1)?;
        let txt_attn = attn.narrow(1, 0, n_txt)?;
        let img_attn = attn.narrow(1, n_txt, attn.dim(1)? - n_txt)?;
        let img = self.img.post_attention(img, &img_attn, &img_mods, ad)?;
        let txt = self.txt.post_attention(txt, &txt_attn, &txt_mods, ad)?;
        Ok((img, txt))
    }
}

/// Single-stream block: fused qkv + MLP input (`linear1`) and output (`linear2`).
#[derive(Clone, Debug)]
pub struct SingleBlock {
    linear1: Linear,
    linear2: Linear,
    query_norm: Tensor,
    key_norm: Tensor,
    modulation: Linear,
    hidden: usize,
    heads: usize,
}

impl SingleBlock {
    fn new(ld: &mut Loader, i: usize, cfg: &FluxConfig) -> Result<Self> {
        let b = format!("single_blocks.{i}");
        let (h, m) = (cfg.hidden_size, cfg.mlp_hidden());
        Ok(Self {
            linear1: ld.linear(&format!("{b}.linear1"), h, 3 * h + m, cfg.qkv_bias)?,
            linear2: ld.linear(&format!("{b}.linear2"), h + m, h, true)?,
            query_norm: ld.rms_scale(&format!("{b}.norm.query_norm.scale"), cfg.head_dim())?,
            key_norm: ld.rms_scale(&format!("{b}.norm.key_norm.scale"), cfg.head_dim())?,
            modulation: ld.linear(&format!("{b}.modulation.lin"), h, 3 * h, true)?,
            hidden: h,
            heads: cfg.num_heads,
        })
    }

    /// x (b, n_txt + n_img, hidden) → same shape.
    pub fn forward(&self, x: &Tensor, vec: &Tensor, pe: &Rope, ad: &AdapterSet) -> Result<Tensor> {
        let mods = modulation(&self.modulation, vec, 1, ad)?;
        let x_mod = mods[0].modulate(&layer_norm(x, None, 1e-6)?)?;
        let lin1 = self.linear1.forward(&x_mod, ad)?;
        let mlp_width = lin1.dim(D::Minus1)? - 3 * self.hidden;
        let qkv = lin1.narrow(D::Minus1, 0, 3 * self.hidden)?;
        let mlp = lin1.narrow(D::Minus1, 3 * self.hidden, mlp_width)?;
        let (q, k, v) = split_qkv(&qkv, self.heads)?;
        let q = rms_norm(&q, &self.query_norm)?;
        let k = rms_norm(&k, &self.key_norm)?;
        let attn = attention(&q, &k, &v, pe)?;
        let out = self
            .linear2
            .forward(&Tensor::cat(&[attn, mlp.gelu()?], D::Minus1)?, ad)?;
        x + mods[0].gate(&out)?
    }
}

/// The final adaLN-modulated projection back to latent channels.
#[derive(Clone, Debug)]
struct FinalLayer {
    linear: Linear,
    ada_ln: Linear,
}

impl FinalLayer {
    fn forward(&self, x: &Tensor, vec: &Tensor, ad: &AdapterSet) -> Result<Tensor> {
        let mods = self.ada_ln.forward(&vec.silu()?, ad)?.unsqueeze(1)?;
        let chunks = mods.chunk(2, D::Minus1)?; // (shift, scale)
        let x = layer_norm(x, None, 1e-6)?
            .broadcast_mul(&(&chunks[1] + 1.0)?)?
            .broadcast_add(&chunks[0])?;
        self.linear.forward(&x, ad)
    }
}

/// One batch of model inputs (packed tokens, see [`pack_latents`]).
pub struct FluxInputs<'a> {
    /// (b, n_img, in_channels)
    pub img: &'a Tensor,
    /// (b, n_img, 3)
    pub img_ids: &'a Tensor,
    /// (b, n_txt, context_in_dim)
    pub txt: &'a Tensor,
    /// (b, n_txt, 3)
    pub txt_ids: &'a Tensor,
    /// (b,) in [0, 1]
    pub timesteps: &'a Tensor,
    /// (b, vec_in_dim)
    pub y: &'a Tensor,
    /// (b,) distilled guidance; required when the config has `guidance_embed`
    pub guidance: Option<&'a Tensor>,
}

/// The embedded inputs every block sees.
pub struct Embedded {
    pub img: Tensor,
    pub txt: Tensor,
    pub vec: Tensor,
    pub pe: Rope,
}

/// The Flux transformer.
#[derive(Clone, Debug)]
pub struct Flux {
    cfg: FluxConfig,
    img_in: Linear,
    txt_in: Linear,
    time_in: MlpEmbedder,
    vector_in: MlpEmbedder,
    guidance_in: Option<MlpEmbedder>,
    pub double_blocks: Vec<DoubleBlock>,
    pub single_blocks: Vec<SingleBlock>,
    final_layer: FinalLayer,
    linear_shapes: BTreeMap<String, (usize, usize)>,
    dtype: DType,
}

impl Flux {
    /// Builds the model from `source`, storing weights in `dtype` (fp8 weights stay fp8).
    pub fn new(
        cfg: &FluxConfig,
        source: &WeightSource,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        Self::build(cfg, source, dtype, device, false)
    }

    /// The model with every weight a trainable `Var` (f32 master weights for full
    /// fine-tuning); [`Flux::trainable_weights`] hands them to an optimizer.
    pub fn new_trainable(cfg: &FluxConfig, source: &WeightSource, device: &Device) -> Result<Self> {
        Self::build(cfg, source, DType::F32, device, true)
    }

    fn build(
        cfg: &FluxConfig,
        source: &WeightSource,
        dtype: DType,
        device: &Device,
        trainable: bool,
    ) -> Result<Self> {
        cfg.validate()?;
        let mut ld = Loader {
            source,
            dtype,
            device,
            shapes: BTreeMap::new(),
            trainable,
        };
        let h = cfg.hidden_size;
        let img_in = ld.linear("img_in", cfg.in_channels, h, true)?;
        let time_in = MlpEmbedder::new(&mut ld, "time_in", 256, h)?;
        let vector_in = MlpEmbedder::new(&mut ld, "vector_in", cfg.vec_in_dim, h)?;
        let guidance_in = if cfg.guidance_embed {
            Some(MlpEmbedder::new(&mut ld, "guidance_in", 256, h)?)
        } else {
            None
        };
        let txt_in = ld.linear("txt_in", cfg.context_in_dim, h, true)?;
        let double_blocks = (0..cfg.depth)
            .map(|i| DoubleBlock::new(&mut ld, i, cfg))
            .collect::<Result<Vec<_>>>()?;
        let single_blocks = (0..cfg.depth_single_blocks)
            .map(|i| SingleBlock::new(&mut ld, i, cfg))
            .collect::<Result<Vec<_>>>()?;
        let final_layer = FinalLayer {
            linear: ld.linear("final_layer.linear", h, cfg.in_channels, true)?,
            ada_ln: ld.linear("final_layer.adaLN_modulation.1", h, 2 * h, true)?,
        };
        Ok(Self {
            cfg: cfg.clone(),
            img_in,
            txt_in,
            time_in,
            vector_in,
            guidance_in,
            double_blocks,
            single_blocks,
            final_layer,
            linear_shapes: ld.shapes,
            dtype,
        })
    }

    /// Loads a checkpoint file or folder. The config comes from the file's
    /// `fluxlora.flux_config` metadata when we wrote it, else from the weight shapes.
    pub fn load(path: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let source = WeightSource::open(path)?;
        let stored = match &source {
            WeightSource::Mmap { files, .. } => stored_config(&files[0])?,
            _ => None,
        };
        let cfg = match stored {
            Some(cfg) => cfg,
            None => FluxConfig::infer(&source)?,
        };
        Self::new(&cfg, &source, dtype, device)
    }

    pub fn config(&self) -> &FluxConfig {
        &self.cfg
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Every linear's BFL module path and (out_features, in_features): what a LoRA may target.
    pub fn linear_shapes(&self) -> &BTreeMap<String, (usize, usize)> {
        &self.linear_shapes
    }

    /// Every linear layer, in construction order (for merging and export).
    pub fn linears(&self) -> Vec<&Linear> {
        let mut out = vec![&self.img_in];
        out.extend([&self.time_in.in_layer, &self.time_in.out_layer]);
        out.extend([&self.vector_in.in_layer, &self.vector_in.out_layer]);
        if let Some(g) = &self.guidance_in {
            out.extend([&g.in_layer, &g.out_layer]);
        }
        out.push(&self.txt_in);
        for b in &self.double_blocks {
            for s in [&b.img, &b.txt] {
                out.extend([&s.modulation, &s.qkv, &s.proj, &s.mlp_in, &s.mlp_out]);
            }
        }
        for b in &self.single_blocks {
            out.extend([&b.linear1, &b.linear2, &b.modulation]);
        }
        out.extend([&self.final_layer.linear, &self.final_layer.ada_ln]);
        out
    }

    /// Every weight under its BFL name, with `adapters` merged into the linears
    /// (W + Σ sᵢ·ΔWᵢ): the base for `lora merge` and for exporting a fine-tune.
    pub fn merged_weights(&self, adapters: &AdapterSet) -> Result<Vec<(String, Tensor)>> {
        let mut out = vec![];
        for l in self.linears() {
            out.push((
                format!("{}.weight", l.module()),
                adapters.merged_weight(l.module(), l.weight())?,
            ));
            if let Some(b) = l.bias() {
                out.push((format!("{}.bias", l.module()), b.clone()));
            }
        }
        let norms = |prefix: String, q: &Tensor, k: &Tensor| {
            [
                (format!("{prefix}.query_norm.scale"), q.clone()),
                (format!("{prefix}.key_norm.scale"), k.clone()),
            ]
        };
        for (i, b) in self.double_blocks.iter().enumerate() {
            for (s, st) in [("img", &b.img), ("txt", &b.txt)] {
                out.extend(norms(
                    format!("double_blocks.{i}.{s}_attn.norm"),
                    &st.query_norm,
                    &st.key_norm,
                ));
            }
        }
        for (i, b) in self.single_blocks.iter().enumerate() {
            out.extend(norms(
                format!("single_blocks.{i}.norm"),
                &b.query_norm,
                &b.key_norm,
            ));
        }
        Ok(out)
    }

    /// Every weight as a `Var` with its BFL name, when the model was built with
    /// [`Flux::new_trainable`]; `None` otherwise.
    pub fn trainable_weights(&self) -> Result<Option<Vec<(String, candle_core::Var)>>> {
        let weights = self.merged_weights(&AdapterSet::none())?;
        if !weights.iter().all(|(_, t)| t.is_variable()) {
            return Ok(None);
        }
        weights
            .into_iter()
            .map(|(n, t)| Ok((n, candle_core::Var::from_tensor(&t)?)))
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    /// Input embeddings and RoPE: the state before the first block.
    pub fn embed(&self, inp: &FluxInputs, ad: &AdapterSet) -> Result<Embedded> {
        let dtype = self.dtype;
        let img = self.img_in.forward(&inp.img.to_dtype(dtype)?, ad)?;
        let txt = self.txt_in.forward(&inp.txt.to_dtype(dtype)?, ad)?;
        let t_emb = timestep_embedding(inp.timesteps, 256)?.to_dtype(dtype)?;
        let mut vec = self.time_in.forward(&t_emb, ad)?;
        if let Some(g_in) = &self.guidance_in {
            let g = inp.guidance.ok_or_else(|| {
                candle_core::Error::msg(
                    "this model is guidance-distilled (dev): a guidance value is required",
                )
            })?;
            let g_emb = timestep_embedding(g, 256)?.to_dtype(dtype)?;
            vec = (vec + g_in.forward(&g_emb, ad)?)?;
        }
        vec = (vec + self.vector_in.forward(&inp.y.to_dtype(dtype)?, ad)?)?;
        let ids = Tensor::cat(&[inp.txt_ids, inp.img_ids], 1)?;
        let pe = Rope::new(&ids, &self.cfg.axes_dim, self.cfg.theta)?;
        Ok(Embedded { img, txt, vec, pe })
    }

    /// The final layer on the image tokens of the joint sequence.
    pub fn head(&self, x: &Tensor, n_txt: usize, vec: &Tensor, ad: &AdapterSet) -> Result<Tensor> {
        let n_img = x.dim(1)? - n_txt;
        let img = x.narrow(1, n_txt, n_img)?;
        self.final_layer.forward(&img, vec, ad)
    }

    /// The velocity prediction (b, n_img, in_channels) for `inp` with `adapters` applied.
    pub fn forward(&self, inp: &FluxInputs, adapters: &AdapterSet) -> Result<Tensor> {
        let Embedded {
            mut img,
            mut txt,
            vec,
            pe,
        } = self.embed(inp, adapters)?;
        for block in &self.double_blocks {
            (img, txt) = block.forward(&img, &txt, &vec, &pe, adapters)?;
        }
        let n_txt = txt.dim(1)?;
        let mut x = Tensor::cat(&[txt, img], 1)?;
        for block in &self.single_blocks {
            x = block.forward(&x, &vec, &pe, adapters)?;
        }
        self.head(&x, n_txt, &vec, adapters)
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
fn stored_config(file: &Path) -> Result<Option<FluxConfig>> {
    let metadata =
        super::lora_io::read_metadata(file).map_err(|e| candle_core::Error::msg(e.to_string()))?;
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

/// (b, c, h, w) latents → (b, h/2·w/2, c·4) tokens: 2×2 patches, channel-major (BFL's
/// `b c (h ph) (w pw) -> b (h w) (c ph pw)`).
pub fn pack_latents(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    if h % 2 != 0 || w % 2 != 0 {
        candle_core::bail!("latent height and width must be even, got {h}×{w}")
    }
    x.reshape((b, c, h / 2, 2, w / 2, 2))?
        .permute((0, 2, 4, 1, 3, 5))?
        .reshape((b, (h / 2) * (w / 2), c * 4))
}

/// Inverse of [`pack_latents`] for a latent of `h`×`w` (in latent pixels).
pub fn unpack_latents(x: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    let (b, _n, c4) = x.dims3()?;
    let c = c4 / 4;
    x.reshape((b, h / 2, w / 2, c, 2, 2))?
        .permute((0, 3, 1, 4, 2, 5))?
        .reshape((b, c, h, w))
}

/// Position ids (b, rows·cols, 3) = (0, row, col) for a token grid.
pub fn image_ids(b: usize, rows: usize, cols: usize, device: &Device) -> Result<Tensor> {
    let mut data = Vec::with_capacity(rows * cols * 3);
    for r in 0..rows {
        for c in 0..cols {
            data.extend([0f32, r as f32, c as f32]);
        }
    }
    Tensor::from_vec(data, (1, rows * cols, 3), device)?.repeat((b, 1, 1))
}

/// Position ids (b, n, 3) of zeros for text tokens.
pub fn text_ids(b: usize, n: usize, device: &Device) -> Result<Tensor> {
    Tensor::zeros((b, n, 3), DType::F32, device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::adapter::{Lora, LoraLayer};
    use crate::model::seeded::SeededRng;
    use crate::testing::rel_err;
    use candle_core::Var;
    use std::sync::Arc;

    fn tiny_config(guidance: bool) -> FluxConfig {
        FluxConfig {
            in_channels: 8,
            vec_in_dim: 12,
            context_in_dim: 10,
            hidden_size: 32,
            mlp_ratio: 2.0,
            num_heads: 2,
            depth: 1,
            depth_single_blocks: 1,
            axes_dim: vec![4, 6, 6],
            theta: 10_000.0,
            qkv_bias: true,
            guidance_embed: guidance,
        }
    }

    struct Batch {
        img: Tensor,
        img_ids: Tensor,
        txt: Tensor,
        txt_ids: Tensor,
        t: Tensor,
        y: Tensor,
        g: Tensor,
    }

    fn batch(cfg: &FluxConfig, dev: &Device) -> Result<Batch> {
        let mut rng = SeededRng::new(3);
        Ok(Batch {
            img: rng.randn((2, 6, cfg.in_channels), dev)?,
            img_ids: image_ids(2, 2, 3, dev)?,
            txt: rng.randn((2, 4, cfg.context_in_dim), dev)?,
            txt_ids: text_ids(2, 4, dev)?,
            t: Tensor::new(&[0.3f32, 0.9], dev)?,
            y: rng.randn((2, cfg.vec_in_dim), dev)?,
            g: Tensor::new(&[3.5f32, 1.0], dev)?,
        })
    }

    impl Batch {
        fn inputs(&self) -> FluxInputs<'_> {
            FluxInputs {
                img: &self.img,
                img_ids: &self.img_ids,
                txt: &self.txt,
                txt_ids: &self.txt_ids,
                timesteps: &self.t,
                y: &self.y,
                guidance: Some(&self.g),
            }
        }
    }

    /// A LoRA of Vars on every linear, with non-zero up so every path is live.
    type LoraVars = Vec<(String, Var, Var)>;

    fn var_lora(model: &Flux, dev: &Device) -> Result<(Lora, LoraVars)> {
        let mut lora = Lora::new("trainable");
        let mut vars = vec![];
        let mut rng = SeededRng::new(11);
        for (module, &(out_f, in_f)) in model.linear_shapes() {
            let down = Var::from_tensor(&(rng.randn((2, in_f), dev)? * 0.1)?)?;
            let up = Var::from_tensor(&(rng.randn((out_f, 2), dev)? * 0.1)?)?;
            lora.layers.insert(
                module.clone(),
                LoraLayer {
                    down: down.as_tensor().clone(),
                    up: up.as_tensor().clone(),
                    alpha: 1.0,
                },
            );
            vars.push((module.clone(), down, up));
        }
        Ok((lora, vars))
    }

    #[test]
    fn forward_shapes_and_guidance_requirement() -> Result<()> {
        let dev = Device::Cpu;
        let cfg = tiny_config(true);
        let model = Flux::new(&cfg, &WeightSource::Seeded(1), DType::F32, &dev)?;
        let b = batch(&cfg, &dev)?;
        let out = model.forward(&b.inputs(), &AdapterSet::none())?;
        assert_eq!(out.dims(), &[2, 6, cfg.in_channels]);
        let mut no_guidance = b.inputs();
        no_guidance.guidance = None;
        let err = model
            .forward(&no_guidance, &AdapterSet::none())
            .unwrap_err();
        assert!(err.to_string().contains("guidance"), "{err}");
        Ok(())
    }

    #[test]
    fn fused_inference_path_matches_differentiable_path() -> Result<()> {
        let dev = Device::Cpu;
        let cfg = tiny_config(true);
        let model = Flux::new(&cfg, &WeightSource::Seeded(1), DType::F32, &dev)?;
        let b = batch(&cfg, &dev)?;
        let fused = model.forward(&b.inputs(), &AdapterSet::none())?;
        // Making the input a Var routes every op through the differentiable forms.
        let img = Var::from_tensor(&b.img)?;
        let mut inputs = b.inputs();
        inputs.img = img.as_tensor();
        let slow = model.forward(&inputs, &AdapterSet::none())?;
        let err = rel_err(&slow, &fused);
        assert!(err < 1e-5, "fused vs differentiable: {err}");
        Ok(())
    }

    #[test]
    fn every_adapter_tensor_receives_a_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let cfg = tiny_config(true);
        let model = Flux::new(&cfg, &WeightSource::Seeded(1), DType::F32, &dev)?;
        let b = batch(&cfg, &dev)?;
        let (lora, vars) = var_lora(&model, &dev)?;
        let adapters = AdapterSet::none().with(Arc::new(lora), 1.0);
        let out = model.forward(&b.inputs(), &adapters)?;
        let grads = out.sqr()?.mean_all()?.backward()?;
        assert_eq!(vars.len(), model.linears().len());
        for (module, down, up) in &vars {
            for (which, var) in [("down", down), ("up", up)] {
                let g = grads
                    .get(var.as_tensor())
                    .unwrap_or_else(|| panic!("{module}.{which}: no gradient"));
                let norm = g.sqr()?.sum_all()?.to_scalar::<f32>()?;
                assert!(norm > 0.0, "{module}.{which}: zero gradient");
            }
        }
        Ok(())
    }

    #[test]
    fn adapter_strength_zero_is_the_base_and_merge_equals_unmerged() -> Result<()> {
        let dev = Device::Cpu;
        let cfg = tiny_config(false);
        let source = WeightSource::Seeded(5);
        let model = Flux::new(&cfg, &source, DType::F32, &dev)?;
        let b = batch(&cfg, &dev)?;
        let mut inputs = b.inputs();
        inputs.guidance = None;
        let (lora, _vars) = var_lora(&model, &dev)?;
        let lora = Arc::new(lora);
        let base = model.forward(&inputs, &AdapterSet::none())?;
        let zero = model.forward(&inputs, &AdapterSet::none().with(lora.clone(), 0.0))?;
        assert_eq!(rel_err(&zero, &base), 0.0);
        let set = AdapterSet::none().with(lora, 0.7);
        let unmerged = model.forward(&inputs, &set)?;
        assert!(
            rel_err(&unmerged, &base) > 1e-3,
            "the LoRA must change the output"
        );
        let all: HashMap<String, Tensor> = model.merged_weights(&set)?.into_iter().collect();
        let merged = Flux::new(&cfg, &WeightSource::Tensors(all), DType::F32, &dev)?;
        let out = merged.forward(&inputs, &AdapterSet::none())?;
        let err = rel_err(&out, &unmerged);
        assert!(err < 1e-5, "merged vs unmerged: {err}");
        Ok(())
    }

    #[test]
    fn pack_and_unpack_are_inverse() -> Result<()> {
        let dev = Device::Cpu;
        let x = SeededRng::new(2).randn((2, 4, 6, 8), &dev)?;
        let packed = pack_latents(&x)?;
        assert_eq!(packed.dims(), &[2, 12, 16]);
        let back = unpack_latents(&packed, 6, 8)?;
        assert_eq!((back - &x)?.abs()?.max_all()?.to_scalar::<f32>()?, 0.0);
        Ok(())
    }
}
