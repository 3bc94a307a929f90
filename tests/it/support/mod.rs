//! Helpers shared by the integration tests, each written once: the built-in tiny
//! model, LoRAs for it, training configs for it, fixture paths, tensor comparisons, (in
//! [`app`]) a real server on an ephemeral port with an HTTP and WebSocket client, and (in
//! [`daemon`]) the daemon as a child process to kill, limit and restart.
//!
//! Helpers used by one test module stay in that module. These are test code: they
//! panic instead of returning errors.

pub mod app;
pub mod daemon;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use fluxlora::model::adapter::{Lora, LoraLayer};
use fluxlora::model::bundle::ModelBundle;
use fluxlora::model::lora_io;
use fluxlora::model::seeded::SeededRng;
use fluxlora::train::config::TrainConfig;
use fluxlora::train::dataset::{DatasetConfig, FolderConfig, Resolution};

/// The built-in tiny model on the CPU.
pub fn bundle() -> Arc<ModelBundle> {
    Arc::new(ModelBundle::tiny(&Device::Cpu).expect("tiny model"))
}

/// A path under `tests/fixtures/`.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// One folder of 64×64 images (as `shapes::write_dataset` writes them), no buckets.
pub fn dataset_config(dir: &Path) -> DatasetConfig {
    DatasetConfig {
        folders: vec![FolderConfig::new(dir.to_path_buf())],
        resolution: Resolution {
            width: 64,
            height: 64,
        },
        enable_bucket: false,
        ..DatasetConfig::default()
    }
}

/// Defaults, trained on [`dataset_config`]`(data)` for `steps` steps; test modules
/// set the rest.
pub fn train_config(data: &Path, steps: u64) -> TrainConfig {
    TrainConfig {
        dataset: dataset_config(data),
        max_train_steps: Some(steps),
        ..TrainConfig::default()
    }
}

/// A rank-4 LoRA on every linear of the tiny model, scaled so it clearly changes images.
pub fn tiny_lora(bundle: &ModelBundle, name: &str, seed: u64) -> Lora {
    let mut rng = SeededRng::new(seed);
    let mut lora = Lora::new(name);
    for (module, &(out_f, in_f)) in bundle.flux.linear_shapes() {
        let down = (rng.randn((4, in_f), &Device::Cpu).unwrap() * 0.3).unwrap();
        let up = (rng.randn((out_f, 4), &Device::Cpu).unwrap() * 0.3).unwrap();
        lora.layers.insert(
            module.clone(),
            LoraLayer {
                down,
                up,
                alpha: 2.0,
            },
        );
    }
    lora
}

/// [`tiny_lora`] written as `{name}.safetensors` (kohya format) into `dir`.
pub fn write_lora(dir: &Path, name: &str, seed: u64) -> PathBuf {
    let bundle = bundle();
    let path = dir.join(format!("{name}.safetensors"));
    lora_io::save_kohya(
        &path,
        &tiny_lora(&bundle, name, seed),
        &BTreeMap::new(),
        DType::F32,
    )
    .unwrap();
    path
}

/// max |a − b| over all elements.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// ‖a − b‖ / ‖b‖.
pub fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    let num = (a - b)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .sqrt()
        .unwrap();
    let den = b.sqr().unwrap().sum_all().unwrap().sqrt().unwrap();
    num.to_scalar::<f32>().unwrap() / den.to_scalar::<f32>().unwrap()
}

/// Every file and folder under `dir`, recursively.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    for e in std::fs::read_dir(dir).expect("a readable folder").flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        }
        out.push(p);
    }
    out
}

/// The `.tmp` files left under `dir` (every write is temp-file-then-rename, so a
/// clean or killed run leaves none).
pub fn temp_files(dir: &Path) -> Vec<PathBuf> {
    walk(dir)
        .into_iter()
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().ends_with(".tmp"))
        })
        .collect()
}

/// A path for an actix route pattern: every `{param}` (with or without a
/// regex) becomes `with`.
pub fn concrete(pattern: &str, with: &str) -> String {
    pattern
        .split('/')
        .map(|segment| {
            if segment.starts_with('{') {
                with
            } else {
                segment
            }
        })
        .collect::<Vec<_>>()
        .join("/")
}
