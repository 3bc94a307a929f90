//! The entry points of the fuzz targets (`fuzz/`, run by hand with cargo-fuzz):
//! each takes arbitrary bytes, as a client or a file on disk may hand them to
//! the daemon, and must return (an error is fine) without panicking, hanging
//! or allocating without bound. Built only with `--features fuzzing` (the fuzz
//! crate) and in tests, where [`tests`] replays the committed corpus
//! (`fuzz/corpus/<target>/`) through them on stable Rust.
//!
//! Must not: hold any logic of its own beyond decoding the bytes for the
//! function under test.

use candle_core::Device;

use crate::model::lora_io;
use crate::server::comfy::graph::{self, NodeDefs};
use crate::server::comfy::nodes::{object_info, FolderLists};
use crate::train::config::TrainConfig;

/// ComfyUI's graph validator (`POST /prompt`'s `prompt`) on `bytes` as JSON,
/// against our node definitions with empty folder lists.
pub fn validate_graph(bytes: &[u8]) {
    let Ok(prompt) = serde_json::from_slice::<serde_json::Value>(bytes) else {
        return;
    };
    let defs = NodeDefs::from_object_info(&object_info(&FolderLists::read(None, None)));
    let _ = graph::validate(&prompt, &defs, None);
}

/// The training-config parser and its checks on `bytes` as TOML and as JSON
/// (what `fluxlora train CONFIG` and `POST /v1/jobs/train` read).
pub fn parse_train_config(bytes: &[u8]) {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return;
    };
    if let Ok(cfg) = toml::from_str::<TrainConfig>(text) {
        let _ = cfg.validate();
    }
    if let Ok(cfg) = serde_json::from_str::<TrainConfig>(text) {
        let _ = cfg.validate();
    }
}

/// The LoRA reader (safetensors decoding, format detection, layer building)
/// on `bytes` as a LoRA file's contents.
pub fn read_lora(bytes: &[u8]) {
    let _ = lora_io::from_bytes(bytes, "fuzz", "fuzz.safetensors", &Device::Cpu);
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    /// Every file of `fuzz/corpus/<target>/` through `run`; how many there were.
    fn replay(target: &str, run: fn(&[u8])) -> usize {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz/corpus")
            .join(target);
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let bytes = std::fs::read(entry.unwrap().path()).unwrap();
            run(&bytes);
            n += 1;
        }
        assert!(n > 0, "no corpus in {}", dir.display());
        n
    }

    #[test]
    fn the_fuzz_corpora_replay_without_panics() {
        let graphs = replay("graph", super::validate_graph);
        let configs = replay("train_config", super::parse_train_config);
        let loras = replay("lora", super::read_lora);
        println!("fuzz corpora replayed: {graphs} graphs, {configs} training configs, {loras} LoRA files");
    }
}
