//! Prompt tokenizers that frame every prompt to a fixed length: Hugging Face
//! tokenizers (T5's `tokenizer.json`; CLIP's, or CLIP's byte-level BPE built from
//! `vocab.json` + `merges.txt` as transformers' `CLIPTokenizerFast` does), and the
//! tiny word-level one. Each reports how many tokens truncation dropped.

use std::path::{Path, PathBuf};

use candle_core::{bail, Result};
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Lowercase, Replace, Sequence as NormalizerSequence, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::roberta::RobertaProcessing;
use tokenizers::{AddedToken, Model, SplitDelimiterBehavior, Tokenizer, TruncationParams};

use super::words::{WordStyle, WORD_EOS};

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

/// A tokenizer that frames every prompt to exactly `max_len` ids.
pub(super) struct PromptTokenizer {
    pub(super) max_len: usize,
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
    pub(super) fn words(style: WordStyle, max_len: usize) -> Self {
        Self {
            max_len,
            kind: TokenizerKind::Words(style),
        }
    }

    pub(super) fn t5_from_path(path: &Path, max_len: usize) -> Result<Self> {
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

    pub(super) fn clip_from_path(path: &Path, max_len: usize) -> Result<Self> {
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

    pub(super) fn set_max_len(&mut self, max_len: usize) -> Result<()> {
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

    pub(super) fn eos_id(&self) -> u32 {
        match &self.kind {
            TokenizerKind::Hf { eos_id, .. } => *eos_id,
            TokenizerKind::Words(_) => WORD_EOS,
        }
    }

    /// `max_len` ids (padded) and how many tokens truncation dropped.
    pub(super) fn encode(&self, text: &str) -> Result<(Vec<u32>, usize)> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::text::test_support::write_tiny_clip_vocab;

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
}
