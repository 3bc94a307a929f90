//! One config, two drivers: `fluxlora train` (the CLI's [`commands::train`]) and a
//! training job of the engine run the same loop, so they write the same files:
//! the same previews (step 0 included, byte for byte), the same saves and states,
//! and a final LoRA with the same tensors.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::Device;

use super::events::JobState;
use super::{Engine, JobRequest};
use crate::commands;
use crate::config::Precision;
use crate::model::bundle::ModelBundle;
use crate::train::config::TrainConfig;
use crate::train::dataset::{DatasetConfig, FolderConfig, Resolution};
use crate::train::network::NetworkConfig;
use crate::train::shapes;

/// The engine's own files in a job's folder, which `fluxlora train` does not write.
const JOB_FILES: [&str; 3] = ["job.json", "events.jsonl", "config.json"];

fn config(data: &Path, out: &Path) -> TrainConfig {
    TrainConfig {
        output_dir: out.to_path_buf(),
        output_name: "same".into(),
        dataset: DatasetConfig {
            folders: vec![FolderConfig::new(data.to_path_buf())],
            resolution: Resolution {
                width: 64,
                height: 64,
            },
            enable_bucket: false,
            ..DatasetConfig::default()
        },
        network: NetworkConfig {
            rank: 2,
            alpha: 2.0,
            ..NetworkConfig::default()
        },
        learning_rate: 1e-3,
        max_train_steps: Some(4),
        save_every_n_steps: Some(2),
        sample_every_n_steps: Some(2),
        sample_prompts: vec![
            "a red circle on a blue background --w 32 --h 32 --s 2".into(),
            "a green square --w 32 --h 32 --s 2 --d 5".into(),
        ],
        save_precision: Precision::F32,
        seed: 11,
        ..TrainConfig::default()
    }
}

/// Every file under `dir` by its path relative to `dir`, with its bytes.
fn files(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                let rel = path.strip_prefix(root).unwrap().to_path_buf();
                out.insert(rel, std::fs::read(&path).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// The tensors of a safetensors file, by name, as f32 values.
fn tensors(bytes: &[u8]) -> BTreeMap<String, Vec<f32>> {
    candle_core::safetensors::load_buffer(bytes, &Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(k, t)| {
            let values = t
                .to_dtype(candle_core::DType::F32)
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1::<f32>())
                .unwrap();
            (k, values)
        })
        .collect()
}

#[test]
fn the_cli_and_the_engine_write_the_same_previews_and_files_for_one_config() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    shapes::write_dataset(&data, 3, 64, 4).unwrap();

    // `fluxlora train`: the CLI loads the built-in tiny model itself.
    let cli_out = tmp.path().join("cli");
    let cli_lora = commands::train(config(&data, &cli_out), None).unwrap();
    assert_eq!(cli_lora, cli_out.join("same.safetensors"));

    // `POST /v1/jobs/train`: the engine writes into the job's folder.
    let bundle = Arc::new(ModelBundle::tiny(&Device::Cpu).unwrap());
    let engine =
        Engine::start(bundle, &tmp.path().join("state"), tmp.path().join("loras")).unwrap();
    let cfg = config(&data, &tmp.path().join("ignored"));
    let id = engine.submit(JobRequest::Train(Box::new(cfg))).unwrap();
    let record = engine.wait(&id).unwrap();
    assert_eq!(record.state, JobState::Finished, "{:?}", record.error);
    let job_dir = engine.job_dir(&id);
    engine.shutdown();

    let cli = files(&cli_out);
    let mut job = files(&job_dir);
    for name in JOB_FILES {
        assert!(job.remove(Path::new(name)).is_some(), "{name}");
    }
    let names = |m: &BTreeMap<PathBuf, Vec<u8>>| m.keys().cloned().collect::<Vec<_>>();
    assert_eq!(names(&job), names(&cli), "the same files");

    // Previews at steps 0, 2 and 4 for both prompts, step 0 included.
    let previews: Vec<&PathBuf> = cli
        .keys()
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
        .collect();
    assert_eq!(previews.len(), 6, "{previews:?}");
    for p in &previews {
        assert!(p.starts_with("sample"), "{}", p.display());
    }
    let at_step_0: Vec<_> = previews
        .iter()
        .filter(|p| p.to_string_lossy().contains("same_000000_"))
        .collect();
    assert_eq!(at_step_0.len(), 2, "{previews:?}");

    for (path, bytes) in &cli {
        let other = &job[path];
        if path.extension().is_some_and(|e| e == "safetensors") {
            // LoRA metadata names the run's folder and times; the tensors are the run.
            assert_eq!(tensors(other), tensors(bytes), "{}", path.display());
        } else {
            assert!(other == bytes, "{} differs", path.display());
        }
    }
    assert!(
        !tensors(&cli[Path::new("same.safetensors")]).is_empty(),
        "the final LoRA has tensors"
    );
}
