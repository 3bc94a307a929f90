//! The CLIP text transformer (as Hugging Face's `CLIPTextModel`), built on
//! adapter-aware linears so a LoRA can train on it (kohya's `lora_te1_…` modules)
//! and be applied unmerged at sampling time. candle-transformers' CLIP uses plain
//! linears and fused layer norms without backward, so it can host neither.
//!
//! Module paths are `te1.` + the Hugging Face path
//! (`te1.text_model.encoder.layers.3.self_attn.q_proj`), so the kohya name is
//! `lora_` + the path with dots as underscores.
//!
//! Must not: tokenize (that is `text`), or know about Flux.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Result, Tensor, D};
use candle_nn::init::{Init, DEFAULT_KAIMING_NORMAL};
use candle_nn::VarBuilder;
use candle_transformers::models::clip::text_model::ClipTextConfig;

use super::adapter::AdapterSet;
use super::layers::{layer_norm, softmax_last, Linear};

/// The prefix of every CLIP-L module path (kohya's first text encoder).
pub(crate) const CLIP_MODULE_PREFIX: &str = "te1.text_model";

const LN_EPS: f64 = 1e-5;

// Weights are requested with candle-nn's init hints (Kaiming-normal weights,
// uniform biases, N(0, 1) embeddings, unit norms), so a seeded builder gives this
// model exactly the weights it gives candle-transformers' CLIP.

fn linear(vb: &VarBuilder, prefix: &str, name: &str, in_f: usize, out_f: usize) -> Result<Linear> {
    let vb = vb.pp(name);
    let weight = vb.get_with_hints((out_f, in_f), "weight", DEFAULT_KAIMING_NORMAL)?;
    let bound = 1.0 / (in_f as f64).sqrt();
    let bias = vb.get_with_hints(
        out_f,
        "bias",
        Init::Uniform {
            lo: -bound,
            up: bound,
        },
    )?;
    Ok(Linear::new(format!("{prefix}.{name}"), weight, Some(bias)))
}

fn norm(vb: &VarBuilder, name: &str, dim: usize) -> Result<(Tensor, Tensor)> {
    let vb = vb.pp(name);
    Ok((
        vb.get_with_hints(dim, "weight", Init::Const(1.0))?,
        vb.get_with_hints(dim, "bias", Init::Const(0.0))?,
    ))
}

fn embedding(vb: &VarBuilder, name: &str, rows: usize, dim: usize) -> Result<Tensor> {
    let init = Init::Randn {
        mean: 0.0,
        stdev: 1.0,
    };
    vb.pp(name).get_with_hints((rows, dim), "weight", init)
}

#[derive(Clone, Debug)]
struct EncoderLayer {
    layer_norm1: (Tensor, Tensor),
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    layer_norm2: (Tensor, Tensor),
    fc1: Linear,
    fc2: Linear,
}

impl EncoderLayer {
    fn new(vb: VarBuilder, prefix: &str, cfg: &ClipTextConfig) -> Result<Self> {
        let d = cfg.embed_dim;
        let attn = vb.pp("self_attn");
        let attn_prefix = format!("{prefix}.self_attn");
        let mlp = vb.pp("mlp");
        let mlp_prefix = format!("{prefix}.mlp");
        Ok(Self {
            layer_norm1: norm(&vb, "layer_norm1", d)?,
            q_proj: linear(&attn, &attn_prefix, "q_proj", d, d)?,
            k_proj: linear(&attn, &attn_prefix, "k_proj", d, d)?,
            v_proj: linear(&attn, &attn_prefix, "v_proj", d, d)?,
            out_proj: linear(&attn, &attn_prefix, "out_proj", d, d)?,
            layer_norm2: norm(&vb, "layer_norm2", d)?,
            fc1: linear(&mlp, &mlp_prefix, "fc1", d, cfg.intermediate_size)?,
            fc2: linear(&mlp, &mlp_prefix, "fc2", cfg.intermediate_size, d)?,
        })
    }

    /// x (b, seq, d) with a causal mask (seq, seq) → (b, seq, d).
    fn forward(&self, x: &Tensor, mask: &Tensor, heads: usize, ad: &AdapterSet) -> Result<Tensor> {
        let (b, seq, d) = x.dims3()?;
        let head_dim = d / heads;
        let h = layer_norm(x, Some((&self.layer_norm1.0, &self.layer_norm1.1)), LN_EPS)?;
        let split = |t: Tensor| -> Result<Tensor> {
            t.reshape((b, seq, heads, head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = split((self.q_proj.forward(&h, ad)? * (head_dim as f64).powf(-0.5))?)?;
        let k = split(self.k_proj.forward(&h, ad)?)?;
        let v = split(self.v_proj.forward(&h, ad)?)?;
        let scores = q
            .to_dtype(DType::F32)?
            .matmul(&k.to_dtype(DType::F32)?.t()?.contiguous()?)?
            .broadcast_add(mask)?; // (b, heads, seq, seq)
        let probs = softmax_last(&scores)?.to_dtype(v.dtype())?;
        let attn = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, seq, d))?;
        let x = (x + self.out_proj.forward(&attn, ad)?)?;
        let h = layer_norm(&x, Some((&self.layer_norm2.0, &self.layer_norm2.1)), LN_EPS)?;
        let h = self.fc1.forward(&h, ad)?;
        let h = quick_gelu(&h)?;
        x + self.fc2.forward(&h, ad)?
    }
}

/// x·σ(1.702·x), CLIP's activation, from differentiable basic ops.
fn quick_gelu(x: &Tensor) -> Result<Tensor> {
    let sig = ((x * -1.702)?.exp()? + 1.0)?.recip()?;
    x * sig
}

/// The CLIP text transformer up to the final layer norm.
#[derive(Clone, Debug)]
pub(crate) struct ClipText {
    token_embedding: Tensor,
    position_embedding: Tensor,
    layers: Vec<EncoderLayer>,
    final_layer_norm: (Tensor, Tensor),
    heads: usize,
}

impl ClipText {
    /// `vb` points at the model root holding `text_model.` (HF `CLIPTextModel` keys).
    pub(crate) fn new(vb: VarBuilder, cfg: &ClipTextConfig) -> Result<Self> {
        let tm = vb.pp("text_model");
        let emb = tm.pp("embeddings");
        let token_embedding = embedding(&emb, "token_embedding", cfg.vocab_size, cfg.embed_dim)?;
        let position_embedding = embedding(
            &emb,
            "position_embedding",
            cfg.max_position_embeddings,
            cfg.embed_dim,
        )?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let prefix = format!("{CLIP_MODULE_PREFIX}.encoder.layers.{i}");
                EncoderLayer::new(
                    tm.pp("encoder").pp("layers").pp(i.to_string()),
                    &prefix,
                    cfg,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            token_embedding,
            position_embedding,
            layers,
            final_layer_norm: norm(&tm, "final_layer_norm", cfg.embed_dim)?,
            heads: cfg.num_attention_heads,
        })
    }

    /// ids (b, seq) → final-layer-normed hidden states (b, seq, d), causal attention.
    pub(crate) fn forward(&self, ids: &Tensor, adapters: &AdapterSet) -> Result<Tensor> {
        let (b, seq) = ids.dims2()?;
        let tokens = self.token_embedding.index_select(&ids.flatten_all()?, 0)?;
        let d = tokens.dim(D::Minus1)?;
        let positions = self.position_embedding.narrow(0, 0, seq)?;
        let mut x = tokens.reshape((b, seq, d))?.broadcast_add(&positions)?;
        let mask = causal_mask(seq, ids.device())?;
        for layer in &self.layers {
            x = layer.forward(&x, &mask, self.heads, adapters)?;
        }
        layer_norm(
            &x,
            Some((&self.final_layer_norm.0, &self.final_layer_norm.1)),
            LN_EPS,
        )
    }

    /// Every linear's module path and (out, in): what a text-encoder LoRA may target.
    pub(crate) fn linear_shapes(&self) -> BTreeMap<String, (usize, usize)> {
        self.layers
            .iter()
            .flat_map(|l| [&l.q_proj, &l.k_proj, &l.v_proj, &l.out_proj, &l.fc1, &l.fc2])
            .map(|l| (l.module().to_string(), l.shape()))
            .collect()
    }
}

/// (seq, seq) additive mask: 0 on and below the diagonal, a large negative above.
fn causal_mask(seq: usize, device: &Device) -> Result<Tensor> {
    let data: Vec<f32> = (0..seq)
        .flat_map(|i| (0..seq).map(move |j| if j > i { f32::MIN } else { 0.0 }))
        .collect();
    Tensor::from_vec(data, (seq, seq), device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_transformers::models::clip::text_model::{Activation, ClipTextTransformer};

    fn cfg() -> ClipTextConfig {
        ClipTextConfig {
            vocab_size: 50,
            embed_dim: 32,
            activation: Activation::QuickGelu,
            intermediate_size: 64,
            max_position_embeddings: 12,
            pad_with: None,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            projection_dim: 32,
        }
    }

    #[test]
    fn matches_candle_transformers_clip() -> Result<()> {
        let dev = Device::Cpu;
        // The reference creates the (randomly initialised) weights; ours reads the same.
        let varmap = candle_nn::VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
        let reference = ClipTextTransformer::new(vb.pp("text_model"), &cfg())?;
        let ours = ClipText::new(vb, &cfg())?;
        let ids = Tensor::new(
            &[
                [1u32, 5, 9, 2, 0, 0, 0, 0, 0, 0, 0, 0],
                [3, 4, 7, 8, 9, 11, 2, 0, 0, 0, 0, 0],
            ],
            &dev,
        )?;
        let a = ours.forward(&ids, &AdapterSet::none())?;
        let b = reference.forward_with_mask(&ids, usize::MAX)?;
        let d = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(d < 1e-4, "max difference {d}");
        // Seeded builders give both the same weights too (the tiny model's case).
        let seeded = crate::model::seeded::SeededInit::var_builder(3, DType::F32, &dev);
        let ours = ClipText::new(seeded.clone(), &cfg())?;
        let reference = ClipTextTransformer::new(seeded.pp("text_model"), &cfg())?;
        let a = ours.forward(&ids, &AdapterSet::none())?;
        let b = reference.forward_with_mask(&ids, usize::MAX)?;
        let d = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(d < 1e-4, "seeded: max difference {d}");
        let shapes = ours.linear_shapes();
        assert_eq!(shapes.len(), 12);
        assert_eq!(shapes["te1.text_model.encoder.layers.1.mlp.fc1"], (64, 32));
        Ok(())
    }
}
