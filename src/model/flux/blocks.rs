//! The layers of the Flux DiT, each built from the [`Loader`] under its BFL key
//! names: QK RMSNorm, 3-axis RoPE and attention, the timestep sinusoid, MLP embedders,
//! adaLN modulation, the double- and single-stream blocks and the final layer.

use candle_core::{DType, Result, Tensor, D};

use super::config::FluxConfig;
use super::weights::Loader;
use crate::model::adapter::AdapterSet;
use crate::model::fused_grad;
use crate::model::layers::{layer_norm, softmax_last, Linear};

/// Flux's QK RMSNorm: x·rsqrt(mean(x²) + 1e-6) in f32, back to x's dtype, times `scale`.
fn rms_norm(x: &Tensor, scale: &Tensor) -> Result<Tensor> {
    let dtype = x.dtype();
    let scale = scale.to_dtype(dtype)?;
    let normed = fused_grad::rms_norm(&x.to_dtype(DType::F32)?, 1e-6)?;
    normed.to_dtype(dtype)?.broadcast_mul(&scale)
}

/// RoPE angles for position ids: cos and sin, each (b, seq, head_dim / 2), f32.
#[derive(Clone, Debug)]
pub(crate) struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    /// ids (b, seq, n_axes) → per-axis frequencies θ^(−2j/dᵢ), concatenated over axes.
    pub(crate) fn new(ids: &Tensor, axes_dim: &[usize], theta: f64) -> Result<Self> {
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
        fused_grad::rope_i(x, &cos, &sin)
    }
}

/// Scaled dot-product attention with RoPE; q, k, v (b, heads, seq, head_dim) → (b, seq, heads·head_dim).
fn attention(q: &Tensor, k: &Tensor, v: &Tensor, pe: &Rope) -> Result<Tensor> {
    let (b, h, seq, d) = q.dims4()?;
    // The 1/√d scale on q (seq·d values) rather than on the scores (seq² values);
    // kᵀ stays a strided view, which the matmul reads directly.
    let q = (pe.apply(q)? * (1.0 / (d as f64).sqrt()))?;
    let k = pe.apply(k)?;
    let scores = q.matmul(&k.t()?)?;
    let probs = softmax_last(&scores.to_dtype(DType::F32)?)?.to_dtype(v.dtype())?;
    let out = probs.matmul(&v.contiguous()?)?; // (b, heads, seq, head_dim)
    out.transpose(1, 2)?.reshape((b, seq, h * d))
}

/// Sinusoidal embedding of t ∈ [0, 1] (scaled by 1000), [cos | sin], (b, dim), f32.
pub(crate) fn timestep_embedding(t: &Tensor, dim: usize) -> Result<Tensor> {
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
pub(super) struct MlpEmbedder {
    pub(super) in_layer: Linear,
    pub(super) out_layer: Linear,
}

impl MlpEmbedder {
    pub(super) fn new(ld: &mut Loader, module: &str, in_dim: usize, hidden: usize) -> Result<Self> {
        Ok(Self {
            in_layer: ld.linear(&format!("{module}.in_layer"), in_dim, hidden, true)?,
            out_layer: ld.linear(&format!("{module}.out_layer"), hidden, hidden, true)?,
        })
    }

    pub(super) fn forward(&self, x: &Tensor, ad: &AdapterSet) -> Result<Tensor> {
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
pub(super) struct Stream {
    pub(super) modulation: Linear,
    pub(super) qkv: Linear,
    pub(super) query_norm: Tensor,
    pub(super) key_norm: Tensor,
    pub(super) proj: Linear,
    pub(super) mlp_in: Linear,
    pub(super) mlp_out: Linear,
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
        let h = fused_grad::gelu_tanh(&self.mlp_in.forward(&h, ad)?)?;
        let h = self.mlp_out.forward(&h, ad)?;
        x + mods[1].gate(&h)?
    }
}

/// Double-stream block: separate image and text weights, joint attention.
#[derive(Clone, Debug)]
pub struct DoubleBlock {
    pub(super) img: Stream,
    pub(super) txt: Stream,
    heads: usize,
}

impl DoubleBlock {
    pub(super) fn new(ld: &mut Loader, i: usize, cfg: &FluxConfig) -> Result<Self> {
        let block = format!("double_blocks.{i}");
        Ok(Self {
            img: Stream::new(ld, &block, "img", cfg)?,
            txt: Stream::new(ld, &block, "txt", cfg)?,
            heads: cfg.num_heads,
        })
    }

    /// img (b, n_img, hidden), txt (b, n_txt, hidden) → updated (img, txt).
    pub(crate) fn forward(
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
    pub(super) linear1: Linear,
    pub(super) linear2: Linear,
    pub(super) query_norm: Tensor,
    pub(super) key_norm: Tensor,
    pub(super) modulation: Linear,
    hidden: usize,
    heads: usize,
}

impl SingleBlock {
    pub(super) fn new(ld: &mut Loader, i: usize, cfg: &FluxConfig) -> Result<Self> {
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
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        vec: &Tensor,
        pe: &Rope,
        ad: &AdapterSet,
    ) -> Result<Tensor> {
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
        let out = self.linear2.forward(
            &Tensor::cat(&[attn, fused_grad::gelu_tanh(&mlp)?], D::Minus1)?,
            ad,
        )?;
        x + mods[0].gate(&out)?
    }
}

/// The final adaLN-modulated projection back to latent channels.
#[derive(Clone, Debug)]
pub(super) struct FinalLayer {
    pub(super) linear: Linear,
    pub(super) ada_ln: Linear,
}

impl FinalLayer {
    pub(super) fn new(ld: &mut Loader, cfg: &FluxConfig) -> Result<Self> {
        let h = cfg.hidden_size;
        Ok(Self {
            linear: ld.linear("final_layer.linear", h, cfg.in_channels, true)?,
            ada_ln: ld.linear("final_layer.adaLN_modulation.1", h, 2 * h, true)?,
        })
    }

    pub(super) fn forward(&self, x: &Tensor, vec: &Tensor, ad: &AdapterSet) -> Result<Tensor> {
        let mods = self.ada_ln.forward(&vec.silu()?, ad)?.unsqueeze(1)?;
        let chunks = mods.chunk(2, D::Minus1)?; // (shift, scale)
        let x = layer_norm(x, None, 1e-6)?
            .broadcast_mul(&(&chunks[1] + 1.0)?)?
            .broadcast_add(&chunks[0])?;
        self.linear.forward(&x, ad)
    }
}
