//! Text conditioning for Flux: the T5 encoder (per-token embeddings) and the
//! CLIP-L text model (pooled vector), their tokenizers, and the tiny built-in
//! stand-ins used by the embedded default model.
//!
//! Owns: tokenizing prompts exactly as Flux pipelines do (T5 padded to a fixed
//! length with `</s>` kept at the end; CLIP to 77 tokens, BOS/EOS, padded with
//! EOS, pooled at the first EOS), loading real weights (ComfyUI single files,
//! fp16/bf16/fp8, or diffusers folders) and the tiny word-level tokenizer.
//! Here: [`TextEncoders`] and what it returns; beside it, the Hugging Face and
//! CLIP-BPE tokenizers (`tokenizer`), the tiny word-level tokenizer (`words`), and
//! reading real T5 / CLIP checkpoints with their configs (`weights`).
//!
//! Must not: know about the DiT, sampling, jobs or HTTP; download anything.
//!
//! Truncation is reported in [`TextEmbedding::truncated`] (per prompt) and with
//! one `tracing::warn!` per [`TextEncoders::encode`] call that dropped tokens.

use std::path::PathBuf;

use candle_core::{bail, DType, Device, Result, Shape, Tensor};
use candle_nn::init::Init;
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use candle_transformers::models::clip::text_model::{Activation as ClipActivation, ClipTextConfig};
use candle_transformers::models::t5::{self, ActivationWithOptionalGating, T5EncoderModel};

use super::adapter::AdapterSet;
use super::clip::ClipText;
use super::seeded::SeededInit;
use tokenizer::PromptTokenizer;
use weights::{load_clip, load_t5};
use words::WordStyle;

#[cfg(test)]
mod test_support;
mod tokenizer;
mod weights;
mod words;

pub(crate) use words::{TINY_VOCAB_SIZE, WORD_EOS, WORD_PAD};

/// CLIP's context length (and the position table of every CLIP text model).
pub(crate) const CLIP_MAX_LEN: usize = 77;
/// T5 sequence length of the tiny built-in model.
pub(crate) const TINY_T5_MAX_LEN: usize = 32;

/// A tokenized batch (see [`TextEncoders::tokenize_batch`]).
struct TokenBatch {
    t5_ids: Vec<u32>,
    clip_ids: Vec<u32>,
    eos_rows: Vec<u32>,
    truncated: Vec<Truncation>,
}

/// Conditioning for one batch of prompts, as the Flux DiT consumes it.
#[derive(Debug, Clone)]
pub struct TextEmbedding {
    /// T5 last hidden state, `(b, t5_max_len, t5_dim)`, F32.
    pub t5: Tensor,
    /// CLIP pooled output (final-layer-normed hidden state at the first EOS,
    /// no text projection), `(b, pooled_dim)`, F32.
    pub pooled: Tensor,
    /// Per prompt: how many tokens each encoder had to drop.
    pub truncated: Vec<Truncation>,
}

/// Tokens dropped from one prompt because it was longer than an encoder's
/// context (special tokens are always kept).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Truncation {
    pub t5_dropped: usize,
    pub clip_dropped: usize,
}

/// Where the real text encoders and their tokenizers live on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextEncoderPaths {
    /// `t5xxl_fp16.safetensors` / `t5xxl_fp8_e4m3fn.safetensors` (ComfyUI
    /// `models/text_encoders/`), or a diffusers `text_encoder_2/` folder
    /// (`config.json` + one or more `*.safetensors` shards).
    pub t5: PathBuf,
    /// `clip_l.safetensors`, or a diffusers `text_encoder/` folder.
    pub clip: PathBuf,
    /// A T5 `tokenizer.json`, or a folder holding one (diffusers
    /// `tokenizer_2/`, ComfyUI `comfy/text_encoders/t5_tokenizer/`).
    pub t5_tokenizer: PathBuf,
    /// A folder with `vocab.json` + `merges.txt` (diffusers `tokenizer/`,
    /// ComfyUI `comfy/sd1_tokenizer/`), a folder with a `tokenizer.json`, or
    /// that file itself.
    pub clip_tokenizer: PathBuf,
}

/// The T5 and CLIP text encoders of a Flux model set, with their tokenizers.
pub struct TextEncoders {
    t5: T5EncoderModel,
    clip: ClipText,
    t5_tokenizer: PromptTokenizer,
    clip_tokenizer: PromptTokenizer,
    t5_dim: usize,
    pooled_dim: usize,
    device: Device,
}

impl TextEncoders {
    /// The tiny built-in encoders with weights made from `seed` (F32).
    pub(crate) fn tiny(seed: u64, device: &Device) -> Result<Self> {
        let backend = TinyTextInit {
            inner: SeededInit { seed },
        };
        let vb = VarBuilder::from_backend(Box::new(backend), DType::F32, device.clone());
        Self::tiny_from_varbuilder(vb)
    }

    /// The tiny encoders with weights from `vb`: T5 under `t5.` (`shared.weight`,
    /// `encoder.block.N…` as in Hugging Face T5) and CLIP under
    /// `clip_l.text_model.` (as in Hugging Face CLIP).
    pub(crate) fn tiny_from_varbuilder(vb: VarBuilder) -> Result<Self> {
        let t5_cfg = tiny_t5_config();
        let clip_cfg = tiny_clip_config();
        let t5 = T5EncoderModel::load(vb.pp("t5"), &t5_cfg)?;
        let clip = ClipText::new(vb.pp("clip_l"), &clip_cfg)?;
        Ok(Self {
            t5,
            clip,
            t5_tokenizer: PromptTokenizer::words(WordStyle::T5, TINY_T5_MAX_LEN),
            clip_tokenizer: PromptTokenizer::words(
                WordStyle::Clip,
                clip_cfg.max_position_embeddings,
            ),
            t5_dim: t5_cfg.d_model,
            pooled_dim: clip_cfg.embed_dim,
            device: vb.device().clone(),
        })
    }

    /// Loads real T5 and CLIP weights (memory-mapped; fp8 tensors are upcast
    /// to `dtype` on load) and their tokenizers. `t5_max_len` is 512 for
    /// flux1-dev, 256 for flux1-schnell. Use F32 or BF16: T5 activations
    /// overflow F16.
    pub fn load(
        paths: &TextEncoderPaths,
        t5_max_len: usize,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        if t5_max_len == 0 {
            bail!("t5_max_len must be at least 1");
        }
        if dtype == DType::F16 {
            tracing::warn!("T5 in F16 overflows to inf/NaN on real prompts; prefer BF16 or F32");
        }
        let (t5, t5_cfg) = load_t5(&paths.t5, device, dtype)?;
        let (clip, clip_cfg) = load_clip(&paths.clip, device, dtype)?;
        let t5_tokenizer = PromptTokenizer::t5_from_path(&paths.t5_tokenizer, t5_max_len)?;
        let clip_tokenizer = PromptTokenizer::clip_from_path(
            &paths.clip_tokenizer,
            clip_cfg.max_position_embeddings,
        )?;
        Ok(Self {
            t5,
            clip,
            t5_tokenizer,
            clip_tokenizer,
            t5_dim: t5_cfg.d_model,
            pooled_dim: clip_cfg.embed_dim,
            device: device.clone(),
        })
    }

    /// Changes the T5 sequence length (e.g. 256 for schnell).
    pub(crate) fn set_t5_max_len(&mut self, t5_max_len: usize) -> Result<()> {
        if t5_max_len == 0 {
            bail!("t5_max_len must be at least 1");
        }
        self.t5_tokenizer.set_max_len(t5_max_len)
    }

    /// Width of the per-token T5 embedding (4096 for T5-XXL).
    pub(crate) fn t5_dim(&self) -> usize {
        self.t5_dim
    }

    /// Width of the pooled CLIP vector (768 for CLIP-L).
    pub(crate) fn pooled_dim(&self) -> usize {
        self.pooled_dim
    }

    /// Number of T5 tokens per prompt (every prompt is padded to it).
    pub(crate) fn t5_max_len(&self) -> usize {
        self.t5_tokenizer.max_len
    }

    /// Number of CLIP tokens per prompt (77).
    pub(crate) fn clip_max_len(&self) -> usize {
        self.clip_tokenizer.max_len
    }

    pub(crate) fn device(&self) -> &Device {
        &self.device
    }

    /// Token ids as the encoders see them: `(t5_ids, clip_ids)`, each padded
    /// to its fixed length, plus what truncation dropped.
    pub(crate) fn tokenize(&self, prompt: &str) -> Result<(Vec<u32>, Vec<u32>, Truncation)> {
        let (t5_ids, t5_dropped) = self.t5_tokenizer.encode(prompt)?;
        let (clip_ids, clip_dropped) = self.clip_tokenizer.encode(prompt)?;
        Ok((
            t5_ids,
            clip_ids,
            Truncation {
                t5_dropped,
                clip_dropped,
            },
        ))
    }

    /// Encodes a batch of prompts. Outputs are F32 on the encoders' device.
    pub fn encode(&self, prompts: &[&str]) -> Result<TextEmbedding> {
        self.encode_with(prompts, &AdapterSet::none())
    }

    /// Every CLIP linear's module path and (out, in): what a text-encoder LoRA may target.
    pub fn clip_linear_shapes(&self) -> std::collections::BTreeMap<String, (usize, usize)> {
        self.clip.linear_shapes()
    }

    /// The CLIP pooled vectors (b, pooled_dim) of `prompts` with text-encoder
    /// adapters applied (T5 is not run): what training a CLIP LoRA needs each step.
    pub(crate) fn pooled_with(&self, prompts: &[&str], adapters: &AdapterSet) -> Result<Tensor> {
        let batch = self.tokenize_batch(prompts)?;
        self.pooled_of(batch.clip_ids, batch.eos_rows, prompts.len(), adapters)
    }

    /// Token ids of a batch, the CLIP row of each prompt's first EOS (where the pooled
    /// vector sits, as in transformers' CLIPTextTransformer: the argmax of the ids
    /// for OpenAI configs, where EOS is the largest id; the first `eos_token_id`
    /// otherwise), and what truncation dropped.
    fn tokenize_batch(&self, prompts: &[&str]) -> Result<TokenBatch> {
        if prompts.is_empty() {
            bail!("text encoders: no prompts to encode");
        }
        let b = prompts.len();
        let mut batch = TokenBatch {
            t5_ids: Vec::with_capacity(b * self.t5_max_len()),
            clip_ids: Vec::with_capacity(b * self.clip_max_len()),
            eos_rows: Vec::with_capacity(b),
            truncated: Vec::with_capacity(b),
        };
        let clip_eos = self.clip_tokenizer.eos_id();
        for (i, prompt) in prompts.iter().enumerate() {
            let (t5, clip, trunc) = self.tokenize(prompt)?;
            let eos = clip
                .iter()
                .position(|&t| t == clip_eos)
                .unwrap_or(clip.len() - 1);
            batch.eos_rows.push((i * self.clip_max_len() + eos) as u32);
            batch.t5_ids.extend(t5);
            batch.clip_ids.extend(clip);
            batch.truncated.push(trunc);
        }
        Ok(batch)
    }

    fn pooled_of(
        &self,
        clip_ids: Vec<u32>,
        eos_rows: Vec<u32>,
        b: usize,
        adapters: &AdapterSet,
    ) -> Result<Tensor> {
        let clip_ids = Tensor::from_vec(clip_ids, (b, self.clip_max_len()), &self.device)?;
        let hidden = self.clip.forward(&clip_ids, adapters)?; // (b, 77, d)
        let hidden = hidden.reshape((b * self.clip_max_len(), self.pooled_dim))?;
        let rows = Tensor::from_vec(eos_rows, b, &self.device)?;
        hidden.index_select(&rows, 0)?.to_dtype(DType::F32) // (b, d)
    }

    /// [`TextEncoders::encode`] with text-encoder LoRAs from `adapters` applied to CLIP.
    pub fn encode_with(&self, prompts: &[&str], adapters: &AdapterSet) -> Result<TextEmbedding> {
        let b = prompts.len();
        let TokenBatch {
            t5_ids,
            clip_ids,
            eos_rows,
            truncated,
        } = self.tokenize_batch(prompts)?;
        let dropped: Vec<(usize, Truncation)> = truncated
            .iter()
            .copied()
            .enumerate()
            .filter(|(_, t)| t.t5_dropped > 0 || t.clip_dropped > 0)
            .collect();
        if !dropped.is_empty() {
            tracing::warn!(
                prompts = ?dropped,
                t5_max_len = self.t5_max_len(),
                clip_max_len = self.clip_max_len(),
                "prompt too long: tokens past the encoders' context were dropped"
            );
        }

        let t5_ids = Tensor::from_vec(t5_ids, (b, self.t5_max_len()), &self.device)?;
        // T5EncoderModel::forward needs `&mut` only for its (unused, decoder-only)
        // kv cache; a clone shares the weights, so `encode` stays `&self`.
        let mut t5 = self.t5.clone();
        let t5_out = t5.forward(&t5_ids)?.to_dtype(DType::F32)?;

        let pooled = self.pooled_of(clip_ids, eos_rows, b, adapters)?;

        Ok(TextEmbedding {
            t5: t5_out,
            pooled,
            truncated,
        })
    }
}

/// T5 v1.1 (gated-GELU) at toy size, sized to the tiny word vocabulary.
pub(crate) fn tiny_t5_config() -> t5::Config {
    t5::Config {
        vocab_size: TINY_VOCAB_SIZE,
        d_model: 32,
        d_kv: 8,
        d_ff: 64,
        num_layers: 2,
        num_decoder_layers: None,
        num_heads: 4,
        relative_attention_num_buckets: 32,
        relative_attention_max_distance: 128,
        dropout_rate: 0.0,
        layer_norm_epsilon: 1e-6,
        initializer_factor: 1.0,
        feed_forward_proj: ActivationWithOptionalGating {
            gated: true,
            activation: candle_nn::Activation::NewGelu,
        },
        tie_word_embeddings: false,
        is_decoder: false,
        is_encoder_decoder: false,
        use_cache: false,
        pad_token_id: WORD_PAD as usize,
        eos_token_id: WORD_EOS as usize,
        decoder_start_token_id: None,
    }
}

/// CLIP text model at toy size (77 positions, as the real one).
pub(crate) fn tiny_clip_config() -> ClipTextConfig {
    ClipTextConfig {
        vocab_size: TINY_VOCAB_SIZE,
        embed_dim: 32,
        activation: ClipActivation::QuickGelu,
        intermediate_size: 64,
        max_position_embeddings: CLIP_MAX_LEN,
        pad_with: None,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        projection_dim: 32,
    }
}

/// Seeded weights for the tiny encoders. T5's layer norms are fetched with
/// `VarBuilder::get` (hint: zeros), which would silence the whole encoder, so
/// they start at one, as in the real model's initialisation.
struct TinyTextInit {
    inner: SeededInit,
}

impl SimpleBackend for TinyTextInit {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let h = if name.ends_with("layer_norm.weight") {
            Init::Const(1.0)
        } else {
            h
        };
        self.inner.get(s, name, h, dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        self.inner.get_unchecked(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.inner.contains_tensor(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::max_abs_diff;

    #[test]
    fn tiny_encoders_are_deterministic_batched_and_shaped() -> Result<()> {
        let dev = Device::Cpu;
        let enc = TextEncoders::tiny(42, &dev)?;
        assert_eq!(
            (enc.t5_dim(), enc.pooled_dim(), enc.t5_max_len()),
            (32, 32, 32)
        );

        let t0 = std::time::Instant::now();
        let a = enc.encode(&["a red circle on the left"])?;
        let single_ms = t0.elapsed().as_secs_f64() * 1e3;
        assert_eq!(a.t5.dims(), &[1, 32, 32]);
        assert_eq!(a.pooled.dims(), &[1, 32]);
        assert_eq!(a.t5.dtype(), DType::F32);

        let again = TextEncoders::tiny(42, &dev)?.encode(&["a red circle on the left"])?;
        assert_eq!(max_abs_diff(&a.t5, &again.t5), 0.0);
        assert_eq!(max_abs_diff(&a.pooled, &again.pooled), 0.0);

        let b = enc.encode(&["a blue square at the bottom"])?;
        assert!(max_abs_diff(&a.t5, &b.t5) > 1e-3);
        assert!(max_abs_diff(&a.pooled, &b.pooled) > 1e-3);

        let t0 = std::time::Instant::now();
        let both = enc.encode(&["a red circle on the left", "a blue square at the bottom"])?;
        let pair_ms = t0.elapsed().as_secs_f64() * 1e3;
        assert_eq!(both.t5.dims(), &[2, 32, 32]);
        assert!(max_abs_diff(&both.t5.narrow(0, 0, 1)?, &a.t5) < 1e-5);
        assert!(max_abs_diff(&both.t5.narrow(0, 1, 1)?, &b.t5) < 1e-5);
        assert!(max_abs_diff(&both.pooled.narrow(0, 0, 1)?, &a.pooled) < 1e-5);
        assert!(max_abs_diff(&both.pooled.narrow(0, 1, 1)?, &b.pooled) < 1e-5);
        assert!(all_finite(&both.t5)? && all_finite(&both.pooled)?);

        let other_seed = TextEncoders::tiny(43, &dev)?.encode(&["a red circle on the left"])?;
        assert!(max_abs_diff(&a.pooled, &other_seed.pooled) > 1e-3);
        eprintln!("tiny text encoders: 1 prompt {single_ms:.1} ms, 2 prompts {pair_ms:.1} ms");
        Ok(())
    }

    fn all_finite(t: &Tensor) -> Result<bool> {
        Ok(t.flatten_all()?
            .to_vec1::<f32>()?
            .iter()
            .all(|v| v.is_finite()))
    }

    #[test]
    fn truncation_is_reported_and_keeps_eos() -> Result<()> {
        let mut enc = TextEncoders::tiny(1, &Device::Cpu)?;
        let long = vec!["red"; 40].join(" ");
        let out = enc.encode(&[&long, "a dot"])?;
        assert_eq!(
            out.truncated,
            vec![
                Truncation {
                    t5_dropped: 9,
                    clip_dropped: 0
                },
                Truncation::default()
            ]
        );
        let (t5, clip, _) = enc.tokenize(&long)?;
        assert_eq!(t5.len(), 32);
        assert_eq!(t5[31], WORD_EOS);
        assert_eq!(clip.len(), 77);
        enc.set_t5_max_len(8)?;
        assert_eq!(enc.encode(&["a dot"])?.t5.dims(), &[1, 8, 32]);
        Ok(())
    }

    #[test]
    fn pooled_output_is_taken_at_the_first_eos() -> Result<()> {
        let enc = TextEncoders::tiny(5, &Device::Cpu)?;
        let out = enc.encode(&["a green star"])?;
        let (_, clip, _) = enc.tokenize("a green star")?;
        let ids = Tensor::from_vec(clip, (1, 77), &Device::Cpu)?;
        let hidden = enc.clip.forward(&ids, &AdapterSet::none())?;
        // <bos> a green star <eos>: the first EOS is at position 4.
        let expect = hidden.narrow(1, 4, 1)?.squeeze(1)?;
        assert!(max_abs_diff(&out.pooled, &expect) < 1e-6);
        Ok(())
    }

    #[test]
    fn encoders_can_be_shared_between_threads() {
        fn is_send_sync<T: Send + Sync>() {}
        is_send_sync::<TextEncoders>();
    }
}
