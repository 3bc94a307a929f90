//! Captions: the per-use transformation of a raw caption (trigger word,
//! dropout, tag shuffle with `keep_tokens`, tag dropout), prompt-weight
//! parsing, and tag counting for kohya's `ss_tag_frequency`.
//!
//! Must not: read files or own randomness; the caller passes a seeded RNG so
//! the same (seed, epoch, step) always gives the same caption.

use std::collections::BTreeMap;

use super::bucket::below;
use super::config::DatasetConfig;
use crate::model::seeded::SeededRng;

/// How a raw caption becomes the caption of one training step.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct CaptionRules {
    pub trigger_word: Option<String>,
    pub shuffle: bool,
    pub keep_tokens: usize,
    pub separator: String,
    pub dropout_rate: f64,
    pub tag_dropout_rate: f64,
}

impl CaptionRules {
    pub(crate) fn from_config(cfg: &DatasetConfig) -> Self {
        Self {
            trigger_word: cfg
                .trigger_word
                .as_ref()
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty()),
            shuffle: cfg.shuffle_caption,
            keep_tokens: cfg.keep_tokens,
            separator: cfg.caption_separator.clone(),
            dropout_rate: cfg.caption_dropout_rate,
            tag_dropout_rate: cfg.caption_tag_dropout_rate,
        }
    }

    /// True when every use of a raw caption gives the same text, so text
    /// embeddings can be computed once and cached.
    pub(crate) fn is_static(&self) -> bool {
        !self.shuffle && self.dropout_rate <= 0.0 && self.tag_dropout_rate <= 0.0
    }

    /// The raw caption with the trigger word, placeholders and no randomness:
    /// what a static caption always is.
    pub(crate) fn fixed(&self, raw: &str) -> String {
        let caption = self.replace_placeholders(raw);
        self.with_trigger(caption)
    }

    /// One use of `raw`, in this order (kohya's `process_caption`, then
    /// ai-toolkit's trigger injection):
    /// 1. `[trigger]` / `[name]` are replaced by the trigger word;
    /// 2. with probability `dropout_rate` the caption is empty (trigger
    ///    included: an unconditional step);
    /// 3. if shuffling or tag dropout is on, the caption is split at the
    ///    separator and trimmed (empty tags dropped); the first `keep_tokens`
    ///    tags stay, the rest are shuffled and then each dropped with
    ///    probability `tag_dropout_rate`; tags are joined with `", "` (for
    ///    another separator: that separator and a space);
    /// 4. the trigger word is put first unless it already appears as a word.
    ///
    /// Random draws: one uniform for dropout (only when its rate is > 0), the
    /// shuffle, then one uniform per flexible tag (only when its rate is > 0).
    pub(crate) fn apply(&self, raw: &str, rng: &mut SeededRng) -> String {
        let caption = self.replace_placeholders(raw);
        if self.dropout_rate > 0.0 && rng.uniform() < self.dropout_rate {
            return String::new();
        }
        let caption = if self.shuffle || self.tag_dropout_rate > 0.0 {
            let tags = split_tags(&caption, &self.separator);
            let keep = self.keep_tokens.min(tags.len());
            let (fixed, flex) = tags.split_at(keep);
            let mut flex: Vec<&str> = flex.to_vec();
            if self.shuffle {
                shuffle(&mut flex, rng);
            }
            if self.tag_dropout_rate > 0.0 {
                flex.retain(|_| rng.uniform() >= self.tag_dropout_rate);
            }
            let mut all: Vec<&str> = fixed.to_vec();
            all.extend(flex);
            all.join(&self.joiner())
        } else {
            caption
        };
        self.with_trigger(caption)
    }

    fn replace_placeholders(&self, raw: &str) -> String {
        let trigger = self.trigger_word.as_deref().unwrap_or("");
        if raw.contains("[trigger]") || raw.contains("[name]") {
            raw.replace("[trigger]", trigger).replace("[name]", trigger)
        } else {
            raw.to_string()
        }
    }

    fn joiner(&self) -> String {
        let sep = self.separator.trim();
        if sep.is_empty() {
            self.separator.clone()
        } else {
            format!("{sep} ")
        }
    }

    fn with_trigger(&self, caption: String) -> String {
        match &self.trigger_word {
            Some(t) if !contains_word(&caption, t) => {
                if caption.trim().is_empty() {
                    t.clone()
                } else {
                    format!("{t}{}{caption}", self.joiner())
                }
            }
            _ => caption,
        }
    }
}

/// `caption` split at `separator`, each tag trimmed, empty tags left out.
pub(crate) fn split_tags<'a>(caption: &'a str, separator: &str) -> Vec<&'a str> {
    caption
        .split(separator)
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .collect()
}

/// Fisher–Yates with the seeded generator.
pub(crate) fn shuffle<T>(items: &mut [T], rng: &mut SeededRng) {
    for i in (1..items.len()).rev() {
        let j = below(rng, i as u64 + 1) as usize;
        items.swap(i, j);
    }
}

/// `word` occurs in `text` not glued to letters or digits on either side.
fn contains_word(text: &str, word: &str) -> bool {
    let mut start = 0;
    while let Some(pos) = text[start..].find(word) {
        let at = start + pos;
        let end = at + word.len();
        let before = text[..at].chars().next_back();
        let after = text[end..].chars().next();
        if !before.is_some_and(char::is_alphanumeric) && !after.is_some_and(char::is_alphanumeric) {
            return true;
        }
        start = at + text[at..].chars().next().map_or(1, char::len_utf8);
    }
    false
}

/// Tag counts of one folder's raw captions, as kohya records them for
/// `ss_tag_frequency`: split at the separator, trimmed, lower-cased, empty
/// tags skipped.
pub(crate) fn count_tags<'a>(
    captions: impl IntoIterator<Item = &'a str>,
    separator: &str,
    into: &mut BTreeMap<String, u64>,
) {
    for caption in captions {
        for tag in split_tags(caption, separator) {
            *into.entry(tag.to_lowercase()).or_insert(0) += 1;
        }
    }
}

/// A piece of a weighted caption and its attention weight.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct WeightedChunk {
    pub text: String,
    pub weight: f32,
}

const ROUND_MULTIPLIER: f64 = 1.1;
const SQUARE_MULTIPLIER: f64 = 1.0 / 1.1;

/// Parses A1111 / kohya prompt weighting, used only when
/// `weighted_captions` is on (otherwise brackets are plain text):
/// `(text)` ×1.1, `[text]` ÷1.1, `(text:1.3)` ×1.3, nesting multiplies,
/// `\(` `\)` `\[` `\]` `\\` are literal characters, an unmatched closing
/// bracket is text, an unclosed opening bracket applies to the end.
/// Adjacent chunks of equal weight are merged; an empty text gives one empty
/// chunk of weight 1. Unlike A1111, a backslash before any other character is
/// kept as a backslash, and `:x)` with an unparsable number is text.
pub(crate) fn parse_weighted_caption(text: &str) -> Vec<WeightedChunk> {
    let mut out: Vec<(String, f64)> = Vec::new();
    let mut round: Vec<usize> = Vec::new();
    let mut square: Vec<usize> = Vec::new();
    let scale = |out: &mut Vec<(String, f64)>, from: usize, m: f64| {
        for chunk in &mut out[from..] {
            chunk.1 *= m;
        }
    };
    let chars: Vec<char> = text.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            '\\' => match chars.get(i + 1) {
                Some(&n @ ('(' | ')' | '[' | ']' | '\\')) => {
                    out.push((n.to_string(), 1.0));
                    i += 2;
                }
                _ => {
                    out.push(("\\".into(), 1.0));
                    i += 1;
                }
            },
            '(' => {
                round.push(out.len());
                i += 1;
            }
            '[' => {
                square.push(out.len());
                i += 1;
            }
            ':' => {
                // `:<number>)` closes the innermost round bracket with that weight.
                let mut j = i + 1;
                if matches!(chars.get(j), Some('+' | '-')) {
                    j += 1;
                }
                let digits_start = j;
                while matches!(chars.get(j), Some(d) if d.is_ascii_digit() || *d == '.') {
                    j += 1;
                }
                let closes = j > digits_start && chars.get(j) == Some(&')');
                let number: String = chars[i + 1..j].iter().collect();
                match (closes, number.parse::<f64>(), round.last()) {
                    (true, Ok(w), Some(_)) => {
                        if let Some(from) = round.pop() {
                            scale(&mut out, from, w);
                        }
                        i = j + 1;
                    }
                    (true, _, _) => {
                        out.push((chars[i..=j].iter().collect(), 1.0));
                        i = j + 1;
                    }
                    _ => {
                        out.push((":".into(), 1.0));
                        i += 1;
                    }
                }
            }
            ')' => {
                match round.pop() {
                    Some(from) => scale(&mut out, from, ROUND_MULTIPLIER),
                    None => out.push((")".into(), 1.0)),
                }
                i += 1;
            }
            ']' => {
                match square.pop() {
                    Some(from) => scale(&mut out, from, SQUARE_MULTIPLIER),
                    None => out.push(("]".into(), 1.0)),
                }
                i += 1;
            }
            _ => {
                let start = i;
                while i < chars.len() && !matches!(chars[i], '\\' | '(' | ')' | '[' | ']' | ':') {
                    i += 1;
                }
                out.push((chars[start..i].iter().collect(), 1.0));
            }
        }
    }
    for from in round {
        scale(&mut out, from, ROUND_MULTIPLIER);
    }
    for from in square {
        scale(&mut out, from, SQUARE_MULTIPLIER);
    }
    let mut merged: Vec<WeightedChunk> = Vec::new();
    let mut last_weight = f64::NAN;
    for (text, w) in out {
        match merged.last_mut() {
            Some(prev) if w == last_weight => prev.text.push_str(&text),
            _ => merged.push(WeightedChunk {
                text,
                weight: w as f32,
            }),
        }
        last_weight = w;
    }
    if merged.is_empty() {
        merged.push(WeightedChunk {
            text: String::new(),
            weight: 1.0,
        });
    }
    merged
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> CaptionRules {
        CaptionRules {
            trigger_word: None,
            shuffle: false,
            keep_tokens: 0,
            separator: ",".into(),
            dropout_rate: 0.0,
            tag_dropout_rate: 0.0,
        }
    }

    fn chunks(v: &[(&str, f32)]) -> Vec<WeightedChunk> {
        v.iter()
            .map(|(t, w)| WeightedChunk {
                text: t.to_string(),
                weight: *w,
            })
            .collect()
    }

    fn close(a: &[WeightedChunk], b: &[WeightedChunk]) -> bool {
        a.len() == b.len()
            && a.iter()
                .zip(b)
                .all(|(x, y)| x.text == y.text && (x.weight - y.weight).abs() < 1e-5)
    }

    #[test]
    fn shuffle_keeps_the_first_tokens() {
        let r = CaptionRules {
            shuffle: true,
            keep_tokens: 2,
            ..rules()
        };
        let raw = "sks, dog, red collar, grass, sunny day, park, running";
        let mut rng = SeededRng::new(11);
        let mut orders = std::collections::HashSet::new();
        for _ in 0..50 {
            let c = r.apply(raw, &mut rng);
            assert!(c.starts_with("sks, dog, "), "{c}");
            let mut tags = split_tags(&c, ",");
            assert_eq!(tags.len(), 7);
            orders.insert(c.clone());
            tags.sort();
            let mut want = split_tags(raw, ",");
            want.sort();
            assert_eq!(tags, want);
        }
        assert!(orders.len() > 10, "shuffle should vary: {}", orders.len());
    }

    #[test]
    fn no_shuffle_leaves_caption_text_untouched() {
        let r = rules();
        let mut rng = SeededRng::new(1);
        assert_eq!(r.apply("a photo,of  a dog", &mut rng), "a photo,of  a dog");
    }

    #[test]
    fn caption_dropout_rate_is_roughly_honoured() {
        let r = CaptionRules {
            dropout_rate: 0.2,
            trigger_word: Some("sks".into()),
            ..rules()
        };
        let mut rng = SeededRng::new(5);
        let n = 20_000;
        let empty = (0..n)
            .filter(|_| r.apply("a dog", &mut rng).is_empty())
            .count();
        let rate = empty as f64 / n as f64;
        assert!((rate - 0.2).abs() < 0.015, "rate {rate}");
    }

    #[test]
    fn tag_dropout_never_drops_kept_tokens() {
        let r = CaptionRules {
            tag_dropout_rate: 0.5,
            keep_tokens: 1,
            ..rules()
        };
        let mut rng = SeededRng::new(9);
        let mut total = 0;
        for _ in 0..2000 {
            let c = r.apply("sks, a, b, c, d", &mut rng);
            assert!(c.starts_with("sks"));
            total += split_tags(&c, ",").len() - 1;
        }
        let mean = total as f64 / 2000.0;
        assert!((mean - 2.0).abs() < 0.15, "mean kept {mean}");
    }

    #[test]
    fn trigger_word_is_prepended_once() {
        let r = CaptionRules {
            trigger_word: Some("ohwx".into()),
            ..rules()
        };
        let mut rng = SeededRng::new(0);
        assert_eq!(r.apply("a dog, grass", &mut rng), "ohwx, a dog, grass");
        assert_eq!(r.apply("photo of ohwx dog", &mut rng), "photo of ohwx dog");
        assert_eq!(r.apply("ohwxdog", &mut rng), "ohwx, ohwxdog");
        assert_eq!(r.apply("", &mut rng), "ohwx");
        assert_eq!(r.apply("a [trigger] dog", &mut rng), "a ohwx dog");
        assert_eq!(r.fixed("cat"), "ohwx, cat");
        let shuffled = CaptionRules {
            shuffle: true,
            ..r.clone()
        };
        for _ in 0..20 {
            assert!(shuffled.apply("a, b, c, d", &mut rng).starts_with("ohwx, "));
        }
    }

    #[test]
    fn other_separators_join_with_themselves() {
        let r = CaptionRules {
            shuffle: true,
            separator: ".".into(),
            keep_tokens: 1,
            ..rules()
        };
        let c = r.apply("First sentence. Second one. Third", &mut SeededRng::new(2));
        assert!(c.starts_with("First sentence. "), "{c}");
        assert_eq!(c.matches(". ").count(), 2);
    }

    #[test]
    fn same_seed_same_caption() {
        let r = CaptionRules {
            shuffle: true,
            dropout_rate: 0.1,
            ..rules()
        };
        let raw = "a, b, c, d, e, f";
        let a: Vec<String> = {
            let mut g = SeededRng::new(42);
            (0..20).map(|_| r.apply(raw, &mut g)).collect()
        };
        let b: Vec<String> = {
            let mut g = SeededRng::new(42);
            (0..20).map(|_| r.apply(raw, &mut g)).collect()
        };
        assert_eq!(a, b);
    }

    #[test]
    fn weighted_plain_text_is_one_chunk() {
        assert_eq!(
            parse_weighted_caption("just words"),
            chunks(&[("just words", 1.0)])
        );
        assert_eq!(parse_weighted_caption(""), chunks(&[("", 1.0)]));
        assert_eq!(
            parse_weighted_caption("ratio 16:9"),
            chunks(&[("ratio 16:9", 1.0)])
        );
    }

    #[test]
    fn weighted_brackets_and_explicit_weights() {
        let got = parse_weighted_caption("a (red:1.5) ball, (big) [small] cat");
        let want = chunks(&[
            ("a ", 1.0),
            ("red", 1.5),
            (" ball, ", 1.0),
            ("big", 1.1),
            (" ", 1.0),
            ("small", 1.0 / 1.1),
            (" cat", 1.0),
        ]);
        assert!(close(&got, &want), "{got:?}");
    }

    #[test]
    fn weighted_nesting_multiplies_and_unclosed_runs_to_end() {
        let got = parse_weighted_caption("((tall:1.2)) tree (open");
        let want = chunks(&[("tall", 1.2 * 1.1), (" tree ", 1.0), ("open", 1.1)]);
        assert!(close(&got, &want), "{got:?}");
        let got = parse_weighted_caption("[[dim]]");
        assert!(close(&got, &chunks(&[("dim", 1.0 / 1.21)])), "{got:?}");
    }

    #[test]
    fn weighted_escapes_and_stray_closers_are_text() {
        let got = parse_weighted_caption(r"\(not weighted\) ] x) y:2)");
        assert_eq!(got, chunks(&[("(not weighted) ] x) y:2)", 1.0)]));
        let got = parse_weighted_caption(r"back\slash");
        assert_eq!(got, chunks(&[(r"back\slash", 1.0)]));
    }

    #[test]
    fn tags_are_counted_lowercased_and_trimmed() {
        let mut m = BTreeMap::new();
        count_tags(["Dog, grass ,dog", "  ,sky"], ",", &mut m);
        assert_eq!(m.get("dog"), Some(&2));
        assert_eq!(m.get("grass"), Some(&1));
        assert_eq!(m.get("sky"), Some(&1));
        assert_eq!(m.len(), 3);
    }
}
