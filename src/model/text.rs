//! Text conditioning for Flux: the T5 encoder (per-token embeddings) and the
//! CLIP-L text model (pooled vector), their tokenizers, and the tiny built-in
//! stand-ins used by the embedded default model.
//!
//! Owns: tokenizing prompts exactly as Flux pipelines do (T5 padded to a fixed
//! length with `</s>` kept at the end; CLIP to 77 tokens, BOS/EOS, padded with
//! EOS, pooled at the first EOS), loading real weights (ComfyUI single files,
//! fp16/bf16/fp8, or diffusers folders) and the tiny word-level tokenizer.
//!
//! Must not: know about the DiT, sampling, jobs or HTTP; download anything.
//!
//! Truncation is reported in [`TextEmbedding::truncated`] (per prompt) and with
//! one `tracing::warn!` per [`TextEncoders::encode`] call that dropped tokens.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{bail, DType, Device, Result, Shape, Tensor};
use candle_nn::init::Init;
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use candle_transformers::models::clip::text_model::{Activation as ClipActivation, ClipTextConfig};
use candle_transformers::models::t5::{self, ActivationWithOptionalGating, T5EncoderModel};
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Lowercase, Replace, Sequence as NormalizerSequence, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::roberta::RobertaProcessing;
use tokenizers::{AddedToken, Model, SplitDelimiterBehavior, Tokenizer, TruncationParams};

use super::adapter::AdapterSet;
use super::clip::ClipText;
use super::seeded::SeededInit;

/// CLIP's context length (and the position table of every CLIP text model).
pub const CLIP_MAX_LEN: usize = 77;
/// T5 sequence length of flux1-dev pipelines.
pub const T5_MAX_LEN_DEV: usize = 512;
/// T5 sequence length of flux1-schnell pipelines.
pub const T5_MAX_LEN_SCHNELL: usize = 256;
/// T5 sequence length of the tiny built-in model.
pub const TINY_T5_MAX_LEN: usize = 32;

const CLIP_BOS: &str = "<|startoftext|>";
const CLIP_EOS: &str = "<|endoftext|>";
// Tokens that CLIP's pre-tokenizer keeps whole: contractions, letter runs,
// single digits, runs of other non-space characters (transformers' CLIP fast
// tokenizer uses the same pattern).
const CLIP_SPLIT_PATTERN: &str = r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// A `tokenizer.json` given directly or inside a folder.
fn tokenizer_json(path: &Path) -> PathBuf {
    if path.is_dir() {
        path.join("tokenizer.json")
    } else {
        path.to_path_buf()
    }
}

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
    dtype: DType,
}

impl TextEncoders {
    /// The tiny built-in encoders with weights made from `seed` (F32).
    pub fn tiny(seed: u64, device: &Device) -> Result<Self> {
        let backend = TinyTextInit {
            inner: SeededInit { seed },
        };
        let vb = VarBuilder::from_backend(Box::new(backend), DType::F32, device.clone());
        Self::tiny_from_varbuilder(vb)
    }

    /// The tiny encoders with weights from `vb`: T5 under `t5.` (`shared.weight`,
    /// `encoder.block.N…` as in Hugging Face T5) and CLIP under
    /// `clip_l.text_model.` (as in Hugging Face CLIP).
    pub fn tiny_from_varbuilder(vb: VarBuilder) -> Result<Self> {
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
            dtype: vb.dtype(),
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
            dtype,
        })
    }

    /// Changes the T5 sequence length (e.g. 256 for schnell).
    pub fn set_t5_max_len(&mut self, t5_max_len: usize) -> Result<()> {
        if t5_max_len == 0 {
            bail!("t5_max_len must be at least 1");
        }
        self.t5_tokenizer.set_max_len(t5_max_len)
    }

    /// Width of the per-token T5 embedding (4096 for T5-XXL).
    pub fn t5_dim(&self) -> usize {
        self.t5_dim
    }

    /// Width of the pooled CLIP vector (768 for CLIP-L).
    pub fn pooled_dim(&self) -> usize {
        self.pooled_dim
    }

    /// Number of T5 tokens per prompt (every prompt is padded to it).
    pub fn t5_max_len(&self) -> usize {
        self.t5_tokenizer.max_len
    }

    /// Number of CLIP tokens per prompt (77).
    pub fn clip_max_len(&self) -> usize {
        self.clip_tokenizer.max_len
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The dtype the encoders compute in (outputs are always F32).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Token ids as the encoders see them: `(t5_ids, clip_ids)`, each padded
    /// to its fixed length, plus what truncation dropped.
    pub fn tokenize(&self, prompt: &str) -> Result<(Vec<u32>, Vec<u32>, Truncation)> {
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
    pub fn pooled_with(&self, prompts: &[&str], adapters: &AdapterSet) -> Result<Tensor> {
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
pub fn tiny_t5_config() -> t5::Config {
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
pub fn tiny_clip_config() -> ClipTextConfig {
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

// ---------------------------------------------------------------------------
// Tokenizers

/// A tokenizer that frames every prompt to exactly `max_len` ids.
struct PromptTokenizer {
    max_len: usize,
    kind: TokenizerKind,
}

enum TokenizerKind {
    /// A Hugging Face tokenizer. `raw` adds special tokens but neither
    /// truncates nor pads (to count what truncation drops); `truncating`
    /// truncates to `max_len`, keeping the special tokens.
    Hf {
        raw: Box<Tokenizer>,
        truncating: Box<Tokenizer>,
        pad_id: u32,
        eos_id: u32,
        what: String,
    },
    /// The tiny built-in word-level tokenizer.
    Words(WordStyle),
}

impl PromptTokenizer {
    fn words(style: WordStyle, max_len: usize) -> Self {
        Self {
            max_len,
            kind: TokenizerKind::Words(style),
        }
    }

    fn t5_from_path(path: &Path, max_len: usize) -> Result<Self> {
        let file = tokenizer_json(path);
        let tok = Tokenizer::from_file(&file).map_err(|e| {
            candle_core::Error::Msg(format!(
                "T5 tokenizer {}: {e} (expected a tokenizer.json as in diffusers' tokenizer_2/ \
                 or ComfyUI's comfy/text_encoders/t5_tokenizer/)",
                file.display()
            ))
        })?;
        let what = format!("T5 tokenizer {}", file.display());
        let pad_id = tok.token_to_id("<pad>").unwrap_or(0);
        let eos_id = tok.token_to_id("</s>").unwrap_or(1);
        Self::hf(tok, pad_id, eos_id, max_len, what)
    }

    fn clip_from_path(path: &Path, max_len: usize) -> Result<Self> {
        let (tok, what) = if path.is_dir() && path.join("vocab.json").is_file() {
            let vocab = path.join("vocab.json");
            let merges = path.join("merges.txt");
            let what = format!("CLIP tokenizer {}", path.display());
            (clip_bpe_tokenizer(&vocab, &merges)?, what)
        } else {
            let file = tokenizer_json(path);
            let tok = Tokenizer::from_file(&file).map_err(|e| {
                candle_core::Error::Msg(format!(
                    "CLIP tokenizer {}: {e} (expected a folder with vocab.json + merges.txt, \
                     or a tokenizer.json)",
                    file.display()
                ))
            })?;
            (tok, format!("CLIP tokenizer {}", file.display()))
        };
        let eos_id = tok
            .token_to_id(CLIP_EOS)
            .ok_or_else(|| candle_core::Error::Msg(format!("{what}: no {CLIP_EOS} token")))?;
        // Flux's CLIP tokenizer pads with its EOS token (pad_token = <|endoftext|>).
        Self::hf(tok, eos_id, eos_id, max_len, what)
    }

    fn hf(tok: Tokenizer, pad_id: u32, eos_id: u32, max_len: usize, what: String) -> Result<Self> {
        let mut raw = tok;
        raw.with_padding(None);
        raw.with_truncation(None)
            .map_err(|e| candle_core::Error::Msg(format!("{what}: {e}")))?;
        let truncating = truncating(&raw, max_len, &what)?;
        Ok(Self {
            max_len,
            kind: TokenizerKind::Hf {
                raw: Box::new(raw),
                truncating: Box::new(truncating),
                pad_id,
                eos_id,
                what,
            },
        })
    }

    fn set_max_len(&mut self, max_len: usize) -> Result<()> {
        if let TokenizerKind::Hf {
            raw,
            truncating: t,
            what,
            ..
        } = &mut self.kind
        {
            **t = truncating(raw, max_len, what)?;
        }
        self.max_len = max_len;
        Ok(())
    }

    fn eos_id(&self) -> u32 {
        match &self.kind {
            TokenizerKind::Hf { eos_id, .. } => *eos_id,
            TokenizerKind::Words(_) => WORD_EOS,
        }
    }

    /// `max_len` ids (padded) and how many tokens truncation dropped.
    fn encode(&self, text: &str) -> Result<(Vec<u32>, usize)> {
        let max_len = self.max_len;
        match &self.kind {
            TokenizerKind::Hf {
                raw,
                truncating,
                pad_id,
                what,
                ..
            } => {
                let err = |e| candle_core::Error::Msg(format!("{what}: {e}"));
                let full = raw.encode(text, true).map_err(err)?.len();
                let mut ids = truncating
                    .encode(text, true)
                    .map_err(err)?
                    .get_ids()
                    .to_vec();
                if ids.len() > max_len {
                    bail!(
                        "{what}: truncation gave {} tokens, wanted {max_len}",
                        ids.len()
                    );
                }
                ids.resize(max_len, *pad_id);
                Ok((ids, full.saturating_sub(max_len)))
            }
            TokenizerKind::Words(style) => Ok(style.encode(text, max_len)),
        }
    }
}

fn truncating(raw: &Tokenizer, max_len: usize, what: &str) -> Result<Tokenizer> {
    let mut t = raw.clone();
    t.with_truncation(Some(TruncationParams {
        max_length: max_len,
        ..Default::default()
    }))
    .map_err(|e| candle_core::Error::Msg(format!("{what}: {e}")))?;
    Ok(t)
}

/// CLIP's byte-level BPE built from `vocab.json` + `merges.txt`, configured as
/// transformers' `CLIPTokenizerFast`: NFC + whitespace collapse + lowercase,
/// CLIP's split pattern, byte-level mapping, `</w>` end-of-word suffix, and
/// `<|startoftext|> … <|endoftext|>` around every prompt.
fn clip_bpe_tokenizer(vocab: &Path, merges: &Path) -> Result<Tokenizer> {
    let what = || format!("CLIP tokenizer {} + {}", vocab.display(), merges.display());
    let err = |e: tokenizers::Error| candle_core::Error::Msg(format!("{}: {e}", what()));
    let (Some(vocab_s), Some(merges_s)) = (vocab.to_str(), merges.to_str()) else {
        bail!("{}: paths must be valid UTF-8", what());
    };
    if !merges.is_file() {
        bail!("{}: merges.txt is missing", what());
    }
    let bpe = BPE::from_file(vocab_s, merges_s)
        .continuing_subword_prefix(String::new())
        .end_of_word_suffix("</w>".to_string())
        .unk_token(CLIP_EOS.to_string())
        .fuse_unk(false)
        .build()
        .map_err(err)?;
    let bos = bpe
        .token_to_id(CLIP_BOS)
        .ok_or_else(|| candle_core::Error::Msg(format!("{}: no {CLIP_BOS} in vocab", what())))?;
    let eos = bpe
        .token_to_id(CLIP_EOS)
        .ok_or_else(|| candle_core::Error::Msg(format!("{}: no {CLIP_EOS} in vocab", what())))?;

    let mut tok = Tokenizer::new(bpe);
    let whitespace = Replace::new(
        tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".to_string()),
        " ",
    )
    .map_err(err)?;
    tok.with_normalizer(Some(NormalizerSequence::new(vec![
        NFC.into(),
        whitespace.into(),
        Lowercase.into(),
    ])));
    let split = Split::new(
        SplitPattern::Regex(CLIP_SPLIT_PATTERN.to_string()),
        SplitDelimiterBehavior::Removed,
        true,
    )
    .map_err(err)?;
    tok.with_pre_tokenizer(Some(PreTokenizerSequence::new(vec![
        split.into(),
        ByteLevel::new(false, true, false).into(),
    ])));
    tok.with_post_processor(Some(
        RobertaProcessing::new((CLIP_EOS.to_string(), eos), (CLIP_BOS.to_string(), bos))
            .trim_offsets(false)
            .add_prefix_space(false),
    ));
    tok.add_special_tokens(&[
        AddedToken::from(CLIP_BOS, true),
        AddedToken::from(CLIP_EOS, true),
    ]);
    Ok(tok)
}

// ---------------------------------------------------------------------------
// The tiny word-level tokenizer

/// Padding id of the tiny tokenizer.
pub const WORD_PAD: u32 = 0;
/// End-of-sequence id of the tiny tokenizer (also CLIP-style padding).
pub const WORD_EOS: u32 = 1;
/// Begin-of-sequence id of the tiny tokenizer (CLIP-style prompts only).
pub const WORD_BOS: u32 = 2;
const FIRST_WORD_ID: u32 = 3;
/// Unknown words are hashed into this many ids after the fixed vocabulary.
pub const WORD_HASH_BUCKETS: u32 = 64;
/// Vocabulary size of the tiny tokenizer (specials + words + hash buckets).
pub const TINY_VOCAB_SIZE: usize =
    FIRST_WORD_ID as usize + CAPTION_WORDS.len() + WORD_HASH_BUCKETS as usize;

/// Words of procedurally generated captions. Order is part of the format of
/// the committed tiny weights: append only.
#[rustfmt::skip]
const CAPTION_WORDS: &[&str] = &[
    // articles, prepositions, glue
    "a", "an", "the", "on", "in", "of", "with", "and", "or", "at", "to", "by", "is", "are",
    "its", "has", "from", "into", "onto", "for", "as", "very", "no", "not", "some", "each",
    "all", "both", "other", "another", "one", "two", "three", "four", "five", "six", "seven",
    "eight", "nine", "ten", "many", "several", "few", "single", "pair", "group", "row",
    "column", "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10",
    // colours and tones
    "red", "green", "blue", "yellow", "orange", "purple", "pink", "brown", "black", "white",
    "gray", "grey", "cyan", "magenta", "teal", "navy", "maroon", "olive", "lime", "gold",
    "golden", "silver", "beige", "violet", "indigo", "turquoise", "crimson", "scarlet", "amber",
    "cream", "tan", "coral", "lavender", "mint", "dark", "light", "pale", "bright", "deep",
    "vivid", "pastel", "neon", "muted", "colorful", "colourful", "monochrome", "transparent",
    "colored", "coloured", "color", "colour", "colors", "colours",
    // shapes
    "circle", "circles", "square", "squares", "triangle", "triangles", "rectangle",
    "rectangles", "star", "stars", "hexagon", "hexagons", "pentagon", "octagon", "diamond",
    "diamonds", "oval", "ellipse", "ring", "rings", "cross", "heart", "hearts", "line", "lines",
    "dot", "dots", "stripe", "stripes", "grid", "checkerboard", "spiral", "arrow", "arrows",
    "wave", "waves", "blob", "blobs", "polygon", "polygons", "crescent", "moon", "sun", "box",
    "boxes", "cube", "sphere", "cone", "cylinder", "pyramid", "disc", "disk", "shape", "shapes",
    "object", "objects", "curve", "zigzag", "frame", "border", "outline", "point", "points",
    "bar", "bars", "block", "blocks", "tile", "tiles", "ball", "balls",
    // positions and layout
    "left", "right", "top", "bottom", "center", "centre", "centered", "middle", "corner",
    "corners", "upper", "lower", "above", "below", "under", "over", "near", "next", "beside",
    "behind", "front", "inside", "outside", "between", "around", "edge", "edges", "side",
    "sides", "across", "along", "diagonal", "horizontal", "vertical", "overlapping", "touching",
    "apart", "together", "far", "close", "half", "quarter", "whole",
    // sizes and proportions
    "small", "smaller", "smallest", "large", "larger", "largest", "big", "bigger", "tiny",
    "huge", "medium", "little", "giant", "thin", "thick", "wide", "narrow", "tall", "short",
    "long", "size", "sized", "round", "flat", "pointed", "rounded", "tilted", "rotated",
    // textures and styles
    "smooth", "rough", "striped", "dotted", "spotted", "checkered", "plain", "solid",
    "gradient", "noisy", "noise", "glossy", "matte", "soft", "hard", "shiny", "textured",
    "texture", "patterned", "pattern", "outlined", "filled", "hollow", "empty", "blurry",
    "blurred", "sharp", "glowing", "faded", "dashed", "wavy", "fuzzy", "grainy", "clean",
    "simple", "abstract", "geometric", "minimal", "shaded", "shadow", "shadows",
    // scene words
    "background", "foreground", "image", "picture", "photo", "drawing", "painting",
    "illustration", "render", "scene", "canvas", "sky", "ground", "floor", "wall", "water",
    "grass", "sand", "snow", "cloud", "clouds", "tree", "trees", "flower", "flowers", "leaf",
    "house", "car", "cat", "dog", "bird", "fish", "person", "face", "eye", "eyes", "hand",
    "text", "letter", "letters", "number", "numbers", "logo", "icon", "pixel", "pixels", "art",
    "style", "day", "night", "sunset", "space", "field", "road", "city", "mountain",
    // actions and states
    "sitting", "standing", "floating", "falling", "lying", "stacked", "scattered", "arranged",
    "surrounded", "covered", "made", "shows", "showing", "containing", "contains", "holding",
    "partly", "partially", "mostly", "slightly", "only",
];

/// How the tiny tokenizer frames a prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WordStyle {
    /// `words… </s>`, padded with [`WORD_PAD`] (T5).
    T5,
    /// `<bos> words… <eos>`, padded with [`WORD_EOS`] (CLIP).
    Clip,
}

impl WordStyle {
    fn encode(self, text: &str, max_len: usize) -> (Vec<u32>, usize) {
        let words = word_ids(text);
        let (specials, pad) = match self {
            Self::T5 => (1, WORD_PAD),
            Self::Clip => (2, WORD_EOS),
        };
        let room = max_len.saturating_sub(specials);
        let dropped = words.len().saturating_sub(room);
        let mut ids = Vec::with_capacity(max_len);
        if self == Self::Clip {
            ids.push(WORD_BOS);
        }
        ids.extend(words.iter().take(room));
        ids.push(WORD_EOS);
        ids.truncate(max_len);
        ids.resize(max_len, pad);
        (ids, dropped)
    }
}

/// Ids of the words of `text`: lowercased, split on anything that is not a
/// letter or digit; unknown words hash (FNV-1a) into the bucket range.
pub fn word_ids(text: &str) -> Vec<u32> {
    let vocab = word_vocab();
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(|w| {
            let w = w.to_lowercase();
            match vocab.get(w.as_str()) {
                Some(&id) => id,
                None => {
                    let mut h: u32 = 0x811c_9dc5;
                    for b in w.bytes() {
                        h ^= b as u32;
                        h = h.wrapping_mul(0x0100_0193);
                    }
                    FIRST_WORD_ID + CAPTION_WORDS.len() as u32 + h % WORD_HASH_BUCKETS
                }
            }
        })
        .collect()
}

fn word_vocab() -> &'static HashMap<&'static str, u32> {
    static VOCAB: std::sync::OnceLock<HashMap<&'static str, u32>> = std::sync::OnceLock::new();
    VOCAB.get_or_init(|| {
        let mut m = HashMap::with_capacity(CAPTION_WORDS.len());
        for (i, w) in CAPTION_WORDS.iter().enumerate() {
            // A repeated word keeps its first id.
            m.entry(*w).or_insert(FIRST_WORD_ID + i as u32);
        }
        m
    })
}

// ---------------------------------------------------------------------------
// Loading real weights

/// Tensors of one or more safetensors files, found under `prefix`, with fp8
/// weights upcast on load: read on the CPU, NaNs zeroed (as ComfyUI does for
/// fp8 T5), multiplied by a per-tensor `scale_weight` / `weight_scale` when
/// the file has one (ComfyUI "scaled fp8"), then cast and moved.
struct Checkpoint {
    st: MmapedSafetensors,
    prefix: String,
    what: String,
}

impl Checkpoint {
    fn open(files: &[PathBuf], what: &str) -> Result<Self> {
        if files.is_empty() {
            bail!("{what}: no .safetensors file found");
        }
        // SAFETY: the files are memory-mapped read-only; like every mmap user
        // we rely on no one truncating them while the model is loaded.
        let st = unsafe { MmapedSafetensors::multi(files) }.map_err(|e| {
            candle_core::Error::Msg(format!("{what}: cannot read {}: {e}", show(files)))
        })?;
        Ok(Self {
            st,
            prefix: String::new(),
            what: format!("{what} {}", show(files)),
        })
    }

    /// Sets the prefix to whatever stands before `marker` in the file's keys
    /// (e.g. `text_encoders.t5xxl.transformer.`), or errors naming the marker.
    fn find_prefix(&mut self, marker: &str) -> Result<()> {
        let mut found = None;
        for (name, _) in self.st.tensors() {
            if let Some(p) = name.strip_suffix(marker) {
                if found.as_ref().is_none_or(|f: &String| p.len() < f.len()) {
                    found = Some(p.to_string());
                }
            }
        }
        match found {
            Some(p) => {
                self.prefix = p;
                Ok(())
            }
            None => bail!(
                "{}: no tensor named …{marker}; is this the right file?",
                self.what
            ),
        }
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.st
            .get(&format!("{}{name}", self.prefix))
            .ok()
            .map(|v| v.shape().to_vec())
    }

    fn need_shape(&self, name: &str) -> Result<Vec<usize>> {
        self.shape(name).ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "{}: missing tensor {}{name}",
                self.what, self.prefix
            ))
        })
    }

    fn count(&self, pattern: impl Fn(usize) -> String) -> usize {
        (0..)
            .take_while(|&i| self.shape(&pattern(i)).is_some())
            .count()
    }

    fn load(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        let key = format!("{}{name}", self.prefix);
        let view = self
            .st
            .get(&key)
            .map_err(|_| candle_core::Error::Msg(format!("{}: missing tensor {key}", self.what)))?;
        let stored = DType::try_from(view.dtype()).ok();
        let ctx = |e: candle_core::Error| {
            candle_core::Error::Msg(format!("{}: tensor {key}: {e}", self.what))
        };
        if stored == Some(DType::F8E4M3) {
            let t = self.st.load(&key, &Device::Cpu).map_err(ctx)?;
            let t = t.to_dtype(DType::F32).map_err(ctx)?;
            let zeros = t.zeros_like()?;
            let mut t = t.ne(&t)?.where_cond(&zeros, &t)?;
            let stem = key.strip_suffix(".weight").unwrap_or(&key);
            for scale_key in [
                format!("{stem}.scale_weight"),
                format!("{stem}.weight_scale"),
            ] {
                if self.st.get(&scale_key).is_ok() {
                    let s = self
                        .st
                        .load(&scale_key, &Device::Cpu)?
                        .to_dtype(DType::F32)?;
                    if s.elem_count() != 1 {
                        bail!(
                            "{}: {scale_key} has {} elements; only per-tensor fp8 scales are supported",
                            self.what,
                            s.elem_count()
                        );
                    }
                    t = t.broadcast_mul(&s.flatten_all()?)?;
                }
            }
            t.to_dtype(dtype)?.to_device(dev)
        } else {
            self.st.load(&key, dev).map_err(ctx)?.to_dtype(dtype)
        }
    }
}

impl SimpleBackend for Checkpoint {
    fn get(&self, s: Shape, name: &str, _h: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let t = self.load(name, dtype, dev)?;
        if t.shape() != &s {
            bail!(
                "{}: tensor {}{name} has shape {:?}, the model expects {:?}",
                self.what,
                self.prefix,
                t.dims(),
                s.dims()
            );
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        self.load(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.st.get(&format!("{}{name}", self.prefix)).is_ok()
    }
}

fn show(files: &[PathBuf]) -> String {
    match files {
        [one] => one.display().to_string(),
        many => format!(
            "{} (+{} more)",
            many.first()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            many.len().saturating_sub(1)
        ),
    }
}

/// The safetensors files of a model: the file itself, or every `*.safetensors`
/// in a folder (diffusers shards), sorted.
fn safetensors_files(path: &Path, what: &str) -> Result<Vec<PathBuf>> {
    if path.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    if !path.is_dir() {
        bail!("{what}: {} does not exist", path.display());
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(|e| candle_core::Error::Msg(format!("{what}: {}: {e}", path.display())))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("{what}: no .safetensors file in {}", path.display());
    }
    Ok(files)
}

fn read_json(path: &Path, what: &str) -> Result<Option<serde_json::Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| candle_core::Error::Msg(format!("{what}: {}: {e}", path.display())))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| candle_core::Error::Msg(format!("{what}: {}: {e}", path.display())))
}

fn load_t5(path: &Path, device: &Device, dtype: DType) -> Result<(T5EncoderModel, t5::Config)> {
    let what = "T5 encoder";
    let mut ckpt = Checkpoint::open(&safetensors_files(path, what)?, what)?;
    ckpt.find_prefix("encoder.final_layer_norm.weight")?;
    let config_json = if path.is_dir() {
        read_json(&path.join("config.json"), what)?
    } else {
        None
    };
    let cfg = match config_json {
        Some(json) => serde_json::from_value::<t5::Config>(json).map_err(|e| {
            candle_core::Error::Msg(format!("{what}: {}/config.json: {e}", path.display()))
        })?,
        None => infer_t5_config(&ckpt)?,
    };
    let vb = VarBuilder::from_backend(Box::new(ckpt), dtype, device.clone());
    Ok((T5EncoderModel::load(vb, &cfg)?, cfg))
}

/// A T5 v1.1 encoder config read off the tensor shapes (ComfyUI single files
/// carry no config).
fn infer_t5_config(ckpt: &Checkpoint) -> Result<t5::Config> {
    let embed = match ckpt.shape("shared.weight") {
        Some(s) => s,
        None => ckpt.need_shape("encoder.embed_tokens.weight")?,
    };
    let [vocab_size, d_model] = embed[..] else {
        bail!("{}: embedding has shape {embed:?}", ckpt.what);
    };
    let attn = "encoder.block.0.layer.0.SelfAttention";
    let bias = ckpt.need_shape(&format!("{attn}.relative_attention_bias.weight"))?;
    let [buckets, num_heads] = bias[..] else {
        bail!("{}: relative_attention_bias has shape {bias:?}", ckpt.what);
    };
    let inner = ckpt.need_shape(&format!("{attn}.q.weight"))?[0];
    let num_layers = ckpt.count(|i| format!("encoder.block.{i}.layer.0.SelfAttention.q.weight"));
    let ff = "encoder.block.0.layer.1.DenseReluDense";
    let (gated, d_ff) = match ckpt.shape(&format!("{ff}.wi_0.weight")) {
        Some(s) => (true, s[0]),
        None => (false, ckpt.need_shape(&format!("{ff}.wi.weight"))?[0]),
    };
    if num_heads == 0 || inner % num_heads != 0 {
        bail!(
            "{}: {inner} attention width for {num_heads} heads",
            ckpt.what
        );
    }
    Ok(t5::Config {
        vocab_size,
        d_model,
        d_kv: inner / num_heads,
        d_ff,
        num_layers,
        num_decoder_layers: None,
        num_heads,
        relative_attention_num_buckets: buckets,
        relative_attention_max_distance: 128,
        dropout_rate: 0.0,
        layer_norm_epsilon: 1e-6,
        initializer_factor: 1.0,
        feed_forward_proj: ActivationWithOptionalGating {
            gated,
            // T5 v1.1 (Flux's T5-XXL) is gated-gelu (tanh form); v1.0 is relu.
            activation: if gated {
                candle_nn::Activation::NewGelu
            } else {
                candle_nn::Activation::Relu
            },
        },
        tie_word_embeddings: false,
        is_decoder: false,
        is_encoder_decoder: false,
        use_cache: false,
        pad_token_id: 0,
        eos_token_id: 1,
        decoder_start_token_id: None,
    })
}

fn load_clip(path: &Path, device: &Device, dtype: DType) -> Result<(ClipText, ClipTextConfig)> {
    let what = "CLIP text encoder";
    let mut ckpt = Checkpoint::open(&safetensors_files(path, what)?, what)?;
    ckpt.find_prefix("text_model.final_layer_norm.weight")?;
    let config_json = if path.is_dir() {
        read_json(&path.join("config.json"), what)?
    } else {
        None
    };
    let cfg = infer_clip_config(&ckpt, config_json.as_ref())?;
    let vb = VarBuilder::from_backend(Box::new(ckpt), dtype, device.clone());
    Ok((ClipText::new(vb, &cfg)?, cfg))
}

/// A CLIP text config from the tensor shapes, with the head count and the
/// activation from a diffusers `config.json` when there is one, else one head
/// per 64 channels (true of OpenAI's and OpenCLIP's text towers: L 12, bigG 20).
fn infer_clip_config(
    ckpt: &Checkpoint,
    json: Option<&serde_json::Value>,
) -> Result<ClipTextConfig> {
    let tm = "text_model";
    let tok = ckpt.need_shape(&format!("{tm}.embeddings.token_embedding.weight"))?;
    let [vocab_size, embed_dim] = tok[..] else {
        bail!("{}: token_embedding has shape {tok:?}", ckpt.what);
    };
    let max_position_embeddings =
        ckpt.need_shape(&format!("{tm}.embeddings.position_embedding.weight"))?[0];
    let num_hidden_layers =
        ckpt.count(|i| format!("{tm}.encoder.layers.{i}.self_attn.q_proj.weight"));
    let intermediate_size = ckpt.need_shape(&format!("{tm}.encoder.layers.0.mlp.fc1.weight"))?[0];
    let mut num_attention_heads = embed_dim / 64;
    if let Some(json) = json {
        if let Some(h) = json.get("num_attention_heads").and_then(|v| v.as_u64()) {
            num_attention_heads = h as usize;
        }
        if let Some(act) = json.get("hidden_act").and_then(|v| v.as_str()) {
            if act != "quick_gelu" {
                bail!(
                    "{}: hidden_act {act:?} is not supported (only quick_gelu, as CLIP-L)",
                    ckpt.what
                );
            }
        }
    }
    if num_attention_heads == 0 || embed_dim % num_attention_heads != 0 {
        bail!(
            "{}: cannot split {embed_dim} channels into heads",
            ckpt.what
        );
    }
    Ok(ClipTextConfig {
        vocab_size,
        embed_dim,
        activation: ClipActivation::QuickGelu,
        intermediate_size,
        max_position_embeddings,
        pad_with: None,
        num_hidden_layers,
        num_attention_heads,
        projection_dim: embed_dim,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::max_abs_diff;
    use std::collections::HashSet;

    #[test]
    fn word_list_has_no_duplicates_and_fits_the_vocab() {
        let mut seen = HashSet::new();
        let dups: Vec<_> = CAPTION_WORDS.iter().filter(|w| !seen.insert(**w)).collect();
        assert!(dups.is_empty(), "duplicates: {dups:?}");
        for w in CAPTION_WORDS {
            assert_eq!(word_ids(w).len(), 1, "{w} must be one word");
        }
        let ids = word_ids("A red circle, on the LEFT; zorblax quux!");
        assert!(ids.iter().all(|&i| (i as usize) < TINY_VOCAB_SIZE));
        assert_eq!(ids[0], word_ids("a")[0]);
        assert_eq!(word_ids("zorblax"), word_ids("ZORBLAX"));
        assert!(word_ids("zorblax")[0] >= FIRST_WORD_ID + CAPTION_WORDS.len() as u32);
    }

    #[test]
    fn word_styles_frame_and_truncate() {
        let (ids, dropped) = WordStyle::T5.encode("a red circle", 6);
        let w = word_ids("a red circle");
        assert_eq!(ids, vec![w[0], w[1], w[2], WORD_EOS, WORD_PAD, WORD_PAD]);
        assert_eq!(dropped, 0);
        let (ids, dropped) = WordStyle::Clip.encode("a red circle", 4);
        assert_eq!(ids, vec![WORD_BOS, w[0], w[1], WORD_EOS]);
        assert_eq!(dropped, 1);
        let (ids, _) = WordStyle::Clip.encode("", 4);
        assert_eq!(ids, vec![WORD_BOS, WORD_EOS, WORD_EOS, WORD_EOS]);
    }

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

    /// A CLIP BPE vocabulary small enough to write by hand.
    fn write_tiny_clip_vocab(dir: &Path) {
        let vocab = serde_json::json!({
            "a": 0, "c": 1, "t": 2, "a</w>": 3, "t</w>": 4, "ca": 5, "cat</w>": 6,
            "!</w>": 7, "<|startoftext|>": 8, "<|endoftext|>": 9, "s</w>": 10, "'s</w>": 11,
            "'": 12,
        });
        std::fs::write(dir.join("vocab.json"), vocab.to_string()).expect("vocab");
        std::fs::write(
            dir.join("merges.txt"),
            "#version: 0.2\nc a\nca t</w>\n' s</w>\n",
        )
        .expect("merges");
    }

    #[test]
    fn clip_bpe_tokenizer_from_vocab_and_merges() -> Result<()> {
        let dir = tempfile::tempdir().expect("tempdir");
        write_tiny_clip_vocab(dir.path());
        let mut tok = PromptTokenizer::clip_from_path(dir.path(), 8)?;
        let (ids, dropped) = tok.encode("  A\tCAT!")?;
        // <bos> a</w> cat</w> !</w> <eos>, padded with <eos>
        assert_eq!(ids, vec![8, 3, 6, 7, 9, 9, 9, 9]);
        assert_eq!(dropped, 0);
        let (ids, _) = tok.encode("cat's")?;
        assert_eq!(&ids[..4], &[8, 6, 11, 9]);
        tok.set_max_len(6)?;
        let (ids, dropped) = tok.encode("a cat a cat a cat a cat")?;
        assert_eq!(ids, vec![8, 3, 6, 3, 6, 9]);
        assert_eq!(dropped, 4);
        assert_eq!(tok.eos_id(), 9);
        Ok(())
    }

    /// Needs a real CLIP vocabulary: set FLUXLORA_CLIP_TOKENIZER to a folder
    /// with vocab.json + merges.txt (openai/clip-vit-large-patch14's).
    #[test]
    #[ignore]
    fn real_clip_vocab_gives_known_ids() -> Result<()> {
        let Ok(dir) = std::env::var("FLUXLORA_CLIP_TOKENIZER") else {
            return Ok(());
        };
        let tok = PromptTokenizer::clip_from_path(Path::new(&dir), 77)?;
        // Reference ids from OpenAI's CLIP tokenizer (open_clip's copy).
        let cases: &[(&str, &[u32])] = &[
            (
                "a photo of a cat",
                &[49406, 320, 1125, 539, 320, 2368, 49407],
            ),
            (
                "A  RED circle, on the left!!",
                &[49406, 320, 736, 7117, 267, 525, 518, 1823, 748, 49407],
            ),
            (
                "it's 42 degrees & \u{fc}ber-cool: na\u{ef}ve caf\u{e9}",
                &[
                    49406, 585, 568, 275, 273, 8000, 261, 6522, 1516, 268, 2077, 281, 1097, 35689,
                    563, 15304, 49407,
                ],
            ),
            ("emoji \u{1f642} test", &[49406, 16327, 14860, 1628, 49407]),
            ("hello\tworld\n", &[49406, 3306, 1002, 49407]),
        ];
        for (text, want) in cases {
            let (ids, _) = tok.encode(text)?;
            assert_eq!(&ids[..want.len()], *want, "{text:?}");
            assert!(ids[want.len()..].iter().all(|&t| t == 49407), "{text:?}");
        }
        Ok(())
    }

    /// A T5-like `tokenizer.json` (word level, `$A </s>` as T5's template),
    /// for tests.
    fn write_word_tokenizer_json(path: &Path) {
        let special = |id: u32, content: &str| {
            serde_json::json!({"id": id, "content": content, "single_word": false,
                "lstrip": false, "rstrip": false, "normalized": false, "special": true})
        };
        let json = serde_json::json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": [special(0, "<pad>"), special(1, "</s>"), special(2, "<unk>")],
            "normalizer": null,
            "pre_tokenizer": {"type": "Whitespace"},
            "post_processor": {
                "type": "TemplateProcessing",
                "single": [{"Sequence": {"id": "A", "type_id": 0}},
                           {"SpecialToken": {"id": "</s>", "type_id": 0}}],
                "pair": [{"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": "</s>", "type_id": 0}},
                         {"Sequence": {"id": "B", "type_id": 0}},
                         {"SpecialToken": {"id": "</s>", "type_id": 0}}],
                "special_tokens": {"</s>": {"id": "</s>", "ids": [1], "tokens": ["</s>"]}}
            },
            "decoder": null,
            "model": {
                "type": "WordLevel",
                "vocab": {"<pad>": 0, "</s>": 1, "<unk>": 2, "a": 5, "red": 9, "dot": 12},
                "unk_token": "<unk>"
            }
        });
        std::fs::write(path, json.to_string()).expect("write tokenizer.json");
    }

    /// Writes the tiny encoders' tensors as a ComfyUI-style fp8 T5 single file
    /// and a diffusers-style CLIP folder, and checks that `load` reads them
    /// back and computes what the originals compute.
    #[test]
    fn load_reads_real_layouts_and_upcasts_fp8() -> Result<()> {
        let dev = Device::Cpu;
        let dir = tempfile::tempdir().expect("tempdir");
        let varmap = candle_nn::VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
        let tiny = TextEncoders::tiny_from_varbuilder(vb)?;
        // Deterministic values (VarMap's own init is random, and zero for T5's
        // layer norms).
        for (name, var) in varmap.data().lock().expect("varmap").iter() {
            let t = if name.ends_with("layer_norm.weight") {
                var.ones_like()?
            } else {
                (crate::model::seeded::SeededRng::for_name(11, name).randn(var.shape(), &dev)?
                    * 0.3)?
            };
            var.set(&t)?;
        }
        let mut t5_tensors = HashMap::new();
        let mut clip_tensors = HashMap::new();
        for (name, var) in varmap.data().lock().expect("varmap").iter() {
            let t = var.as_tensor().clone();
            if let Some(rest) = name.strip_prefix("t5.") {
                t5_tensors.insert(rest.to_string(), t.to_dtype(DType::F8E4M3)?);
            } else if let Some(rest) = name.strip_prefix("clip_l.") {
                clip_tensors.insert(rest.to_string(), t.to_dtype(DType::F16)?);
            }
        }
        // ComfyUI's scaled-fp8 marker tensors must not confuse the loader.
        t5_tensors.insert(
            "scaled_fp8".to_string(),
            Tensor::zeros(2, DType::F8E4M3, &dev)?,
        );
        let t5_file = dir.path().join("t5xxl_fp8_e4m3fn.safetensors");
        candle_core::safetensors::save(&t5_tensors, &t5_file)?;
        let clip_dir = dir.path().join("text_encoder");
        std::fs::create_dir(&clip_dir).expect("mkdir");
        candle_core::safetensors::save(&clip_tensors, clip_dir.join("model.safetensors"))?;
        std::fs::write(
            clip_dir.join("config.json"),
            r#"{"num_attention_heads": 4, "hidden_act": "quick_gelu", "hidden_size": 32}"#,
        )
        .expect("config");
        let tok_dir = dir.path().join("tokenizer");
        std::fs::create_dir(&tok_dir).expect("mkdir");
        write_tiny_clip_vocab(&tok_dir);
        let t5_tok = dir.path().join("tokenizer.json");
        write_word_tokenizer_json(&t5_tok);

        let mut ckpt = Checkpoint::open(std::slice::from_ref(&t5_file), "T5 encoder")?;
        ckpt.find_prefix("encoder.final_layer_norm.weight")?;
        let mut want_cfg = tiny_t5_config();
        (want_cfg.pad_token_id, want_cfg.eos_token_id) = (0, 1);
        assert_eq!(infer_t5_config(&ckpt)?, want_cfg);

        let paths = TextEncoderPaths {
            t5: t5_file.clone(),
            clip: clip_dir,
            t5_tokenizer: t5_tok,
            clip_tokenizer: tok_dir,
        };
        let enc = TextEncoders::load(&paths, 4, &dev, DType::F32)?;
        assert_eq!(
            (enc.t5_dim(), enc.pooled_dim(), enc.t5_max_len()),
            (32, 32, 4)
        );
        let (t5_ids, clip_ids, trunc) = enc.tokenize("a red dot red")?;
        assert_eq!(t5_ids, vec![5, 9, 12, 1]);
        assert_eq!(trunc.t5_dropped, 1);
        assert_eq!(&clip_ids[..2], &[8, 3]);

        // fp8 weights (NaN-free after upcast) give close T5 outputs.
        let ids = Tensor::new(&[[5u32, 9, 12, 1]], &dev)?;
        let want = tiny.t5.clone().forward(&ids)?;
        let got = enc.t5.clone().forward(&ids)?;
        let scale = want.abs()?.mean_all()?.to_scalar::<f32>()?;
        let err = (&want - &got)?.abs()?.mean_all()?.to_scalar::<f32>()?;
        // (measured 0.17: e4m3 keeps 3 mantissa bits; the loader itself is
        // checked exactly below)
        assert!(err / scale < 0.3, "fp8 round trip too far: {}", err / scale);
        // and the loader itself is exact: stored fp8 values, upcast
        let (name, stored) = t5_tensors.iter().next().expect("a tensor");
        let mut ckpt = Checkpoint::open(std::slice::from_ref(&paths.t5), "T5 encoder")?;
        ckpt.find_prefix("encoder.final_layer_norm.weight")?;
        let loaded = ckpt.load(name, DType::F32, &dev)?;
        assert_eq!(max_abs_diff(&loaded, &stored.to_dtype(DType::F32)?), 0.0);
        // f16 CLIP weights give (nearly) the same hidden states.
        let ids = Tensor::new(&[[8u32, 3, 6, 9, 9]], &dev)?;
        let want = tiny.clip.forward(&ids, &AdapterSet::none())?;
        let got = enc.clip.forward(&ids, &AdapterSet::none())?;
        assert!(max_abs_diff(&want, &got) < 1e-2);
        let out = enc.encode(&["a red dot"])?;
        assert_eq!(out.t5.dims(), &[1, 4, 32]);
        assert_eq!(out.pooled.dims(), &[1, 32]);
        Ok(())
    }

    #[test]
    fn diffusers_t5_config_json_parses() {
        // text_encoder_2/config.json of the FLUX.1 diffusers repos (T5 v1.1 XXL)
        let json = r#"{"architectures": ["T5EncoderModel"], "classifier_dropout": 0.0,
            "d_ff": 10240, "d_kv": 64, "d_model": 4096, "decoder_start_token_id": 0,
            "dense_act_fn": "gelu_new", "dropout_rate": 0.1, "eos_token_id": 1,
            "feed_forward_proj": "gated-gelu", "initializer_factor": 1.0,
            "is_encoder_decoder": true, "is_gated_act": true, "layer_norm_epsilon": 1e-06,
            "model_type": "t5", "num_decoder_layers": 24, "num_heads": 64, "num_layers": 24,
            "output_past": true, "pad_token_id": 0, "relative_attention_max_distance": 128,
            "relative_attention_num_buckets": 32, "tie_word_embeddings": false,
            "torch_dtype": "bfloat16", "use_cache": true, "vocab_size": 32128}"#;
        let cfg: t5::Config = serde_json::from_str(json).expect("config");
        assert_eq!(
            (cfg.d_model, cfg.num_layers, cfg.num_heads, cfg.d_kv),
            (4096, 24, 64, 64)
        );
        assert!(cfg.feed_forward_proj.gated);
        assert_eq!(
            cfg.feed_forward_proj.activation,
            candle_nn::Activation::NewGelu
        );
    }

    #[test]
    fn fp8_nans_are_zeroed_and_scales_applied() -> Result<()> {
        let dev = Device::Cpu;
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("w.safetensors");
        // 0x7f is NaN in e4m3fn
        let raw = [0x38u8, 0x7f, 0x40, 0xb8];
        let w = Tensor::from_raw_buffer(&raw, DType::F8E4M3, &[2, 2], &dev)?;
        let mut m = HashMap::new();
        m.insert("x.layer.weight".to_string(), w);
        m.insert(
            "x.layer.scale_weight".to_string(),
            Tensor::new(&[2f32], &dev)?,
        );
        candle_core::safetensors::save(&m, &file)?;
        let mut ckpt = Checkpoint::open(&[file], "test")?;
        ckpt.find_prefix("layer.weight")?;
        assert_eq!(ckpt.prefix, "x.");
        let t = ckpt.load("layer.weight", DType::F32, &dev)?;
        assert_eq!(
            t.flatten_all()?.to_vec1::<f32>()?,
            vec![2.0, 0.0, 4.0, -2.0]
        );
        Ok(())
    }
}
