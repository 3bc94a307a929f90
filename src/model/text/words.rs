//! The tiny built-in model's word-level tokenizer: a fixed vocabulary of the words
//! of procedurally generated captions, unknown words hashed into buckets after it.

use std::collections::HashMap;

/// Padding id of the tiny tokenizer.
pub(crate) const WORD_PAD: u32 = 0;
/// End-of-sequence id of the tiny tokenizer (also CLIP-style padding).
pub(crate) const WORD_EOS: u32 = 1;
/// Begin-of-sequence id of the tiny tokenizer (CLIP-style prompts only).
pub(crate) const WORD_BOS: u32 = 2;
const FIRST_WORD_ID: u32 = 3;
/// Unknown words are hashed into this many ids after the fixed vocabulary.
pub(crate) const WORD_HASH_BUCKETS: u32 = 64;
/// Vocabulary size of the tiny tokenizer (specials + words + hash buckets).
pub(crate) const TINY_VOCAB_SIZE: usize =
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
pub(super) enum WordStyle {
    /// `words… </s>`, padded with [`WORD_PAD`] (T5).
    T5,
    /// `<bos> words… <eos>`, padded with [`WORD_EOS`] (CLIP).
    Clip,
}

impl WordStyle {
    pub(super) fn encode(self, text: &str, max_len: usize) -> (Vec<u32>, usize) {
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
pub(crate) fn word_ids(text: &str) -> Vec<u32> {
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

#[cfg(test)]
mod tests {
    use super::*;
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
}
