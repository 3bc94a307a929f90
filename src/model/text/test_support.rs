//! Fixtures shared by the unit tests of `text`: tokenizer files small enough to
//! write by hand.

use std::path::Path;

/// A CLIP BPE vocabulary small enough to write by hand.
pub(super) fn write_tiny_clip_vocab(dir: &Path) {
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

/// A T5-like `tokenizer.json` (word level, `$A </s>` as T5's template),
/// for tests.
pub(super) fn write_word_tokenizer_json(path: &Path) {
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
