//! End-to-end training on the built-in tiny model with a generated shapes dataset:
//! the loss falls, saves and resume reproduce an uninterrupted run exactly, events
//! come in order, and the saved LoRA loads back with its kohya metadata.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::Device;
use fluxlora::config::Precision;
use fluxlora::model::bundle::ModelBundle;
use fluxlora::model::lora_io;
use fluxlora::train::config::TrainConfig;
use fluxlora::train::events::{TrainControl, TrainEvent};
use fluxlora::train::network::{NetworkConfig, TargetPreset};
use fluxlora::train::optim::{OptimizerConfig, OptimizerKind};
use fluxlora::train::shapes;
use fluxlora::train::trainer::Trainer;

use crate::support::{self, bundle, max_abs_diff};

fn config(data: &Path, out: &Path, steps: u64) -> TrainConfig {
    TrainConfig {
        output_dir: out.to_path_buf(),
        output_name: "test".into(),
        network: NetworkConfig {
            rank: 4,
            alpha: 4.0,
            targets: TargetPreset::AllLinear,
            ..NetworkConfig::default()
        },
        optimizer: OptimizerConfig::new(OptimizerKind::Adamw),
        learning_rate: 3e-3,
        train_batch_size: 2,
        save_precision: Precision::F32,
        seed: 7,
        ..support::train_config(data, steps)
    }
}

#[test]
fn loss_falls_on_a_learnable_task_and_the_lora_loads_back() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    shapes::write_dataset(&data, 6, 64, 1).unwrap();
    let out = tmp.path().join("out");
    let mut cfg = config(&data, &out, 60);
    cfg.validation_dataset = Some(support::dataset_config(&data));
    cfg.save_every_n_steps = Some(30);
    // The untrained tiny model: the test does not depend on the shipped weights.
    let base = Arc::new(ModelBundle::tiny_untrained(&Device::Cpu).unwrap());
    let mut trainer = Trainer::new(cfg, base, None).unwrap();
    let before = trainer.validation_loss().unwrap().unwrap();
    let mut events = vec![];
    let path = trainer
        .run(&TrainControl::default(), &mut |e| events.push(e))
        .unwrap()
        .expect("finished");
    let after = trainer.validation_loss().unwrap().unwrap();
    println!("validation loss before {before:.4}, after {after:.4}");
    assert!(after < before * 0.8, "validation loss {before} → {after}");

    // Events: caching progress, then started, steps numbered 1..=60, a save at 30,
    // finished last.
    let caching: Vec<(usize, usize)> = events
        .iter()
        .map_while(|e| match e {
            TrainEvent::Caching { done, total } => Some((*done, *total)),
            _ => None,
        })
        .collect();
    assert_eq!(caching, (1..=6).map(|d| (d, 6)).collect::<Vec<_>>());
    assert!(matches!(
        events[caching.len()],
        TrainEvent::Started {
            total_steps: 60,
            ..
        }
    ));
    let steps: Vec<u64> = events
        .iter()
        .filter_map(|e| match e {
            TrainEvent::Step(s) => Some(s.step),
            _ => None,
        })
        .collect();
    assert_eq!(steps, (1..=60).collect::<Vec<_>>());
    assert!(events
        .iter()
        .any(|e| matches!(e, TrainEvent::Saved { step: 30, .. })));
    assert!(events
        .iter()
        .any(|e| matches!(e, TrainEvent::Validation { step: 60, .. })));
    assert!(matches!(
        events.last(),
        Some(TrainEvent::Finished { step: 60, .. })
    ));

    // The final LoRA loads through lora_io with kohya metadata.
    let file = lora_io::load(&path, &Device::Cpu).unwrap();
    assert_eq!(file.format, lora_io::LoraFormat::Kohya);
    assert!(file.unmatched.is_empty());
    lora_io::validate(&file.lora, trainer.bundle().flux.linear_shapes()).unwrap();
    assert_eq!(file.metadata["ss_network_module"], "networks.lora_flux");
    assert_eq!(file.metadata["ss_network_dim"], "4");
    let tags: serde_json::Value = serde_json::from_str(&file.metadata["ss_tag_frequency"]).unwrap();
    assert!(
        tags["data"]["a red circle on a blue background"].is_number()
            || tags["data"].as_object().is_some_and(|m| !m.is_empty())
    );
    let report = lora_io::describe(&file).to_string();
    assert!(report.contains("ss_network_dim"), "{report}");
}

fn final_weights(path: &Path) -> Vec<(String, Vec<f32>)> {
    let tensors = candle_core::safetensors::load(path, &Device::Cpu).unwrap();
    let mut out: Vec<(String, Vec<f32>)> = tensors
        .into_iter()
        .map(|(k, t)| (k, t.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn run_to_end(trainer: &mut Trainer) -> PathBuf {
    trainer
        .run(&TrainControl::default(), &mut |_| {})
        .unwrap()
        .expect("finished")
}

#[test]
fn resumed_run_reaches_the_same_weights_as_an_uninterrupted_one() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    shapes::write_dataset(&data, 5, 64, 2).unwrap();
    let model = bundle();

    // Uninterrupted: 8 steps, 5 images at batch 2 → epochs roll over mid-run.
    let straight = tmp.path().join("straight");
    let mut cfg = config(&data, &straight, 8);
    cfg.gradient_accumulation_steps = 2;
    cfg.lr_scheduler.kind = fluxlora::train::lr_schedule::ScheduleKind::Cosine;
    let a = run_to_end(&mut Trainer::new(cfg.clone(), model.clone(), None).unwrap());

    // Interrupted: cancelled after step 3 (a state is saved), then resumed.
    let resumed = tmp.path().join("resumed");
    let cfg_b = TrainConfig {
        output_dir: resumed.clone(),
        ..cfg.clone()
    };
    let control = TrainControl::default();
    let mut first = Trainer::new(cfg_b.clone(), model.clone(), None).unwrap();
    let mut n = 0;
    let outcome = first
        .run(&control, &mut |e| {
            if let TrainEvent::Step(_) = e {
                n += 1;
                if n == 3 {
                    control.cancel();
                }
            }
        })
        .unwrap();
    assert!(outcome.is_none(), "cancelled run returns no final LoRA");
    let state =
        fluxlora::train::checkpoint::latest_state(&resumed, "test").expect("state saved on cancel");
    let b = run_to_end(&mut Trainer::new(cfg_b, model, Some(&state)).unwrap());

    let (wa, wb) = (final_weights(&a), final_weights(&b));
    assert_eq!(wa.len(), wb.len());
    for ((ka, va), (kb, vb)) in wa.iter().zip(&wb) {
        assert_eq!(ka, kb);
        assert_eq!(va, vb, "{ka} differs after resume");
    }
}

#[test]
fn bad_configs_name_the_field() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("nope");
    let cfg = config(&missing, tmp.path(), 5);
    let err = Trainer::new(cfg, bundle(), None)
        .err()
        .expect("error")
        .to_string();
    assert!(err.contains("nope"), "{err}");
    let mut cfg = config(tmp.path(), tmp.path(), 5);
    cfg.learning_rate = -1.0;
    let err = Trainer::new(cfg, bundle(), None)
        .err()
        .expect("error")
        .to_string();
    assert!(err.contains("learning_rate"), "{err}");
}

#[test]
fn text_encoder_lora_trains_with_its_own_rate_and_saves_kohya_te_keys() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    shapes::write_dataset(&data, 4, 64, 3).unwrap();
    let out = tmp.path().join("out");
    let mut cfg = config(&data, &out, 3);
    cfg.network.train_text_encoder = true;
    cfg.text_encoder_lr = Some(1e-3);
    let model = bundle();
    let mut trainer = Trainer::new(cfg, model.clone(), None).unwrap();
    let path = trainer
        .run(&TrainControl::default(), &mut |_| {})
        .unwrap()
        .expect("finished");

    let file = lora_io::load(&path, &Device::Cpu).unwrap();
    lora_io::validate(&file.lora, &model.adapter_shapes()).unwrap();
    let clip: Vec<_> = file
        .lora
        .layers
        .iter()
        .filter(|(m, _)| m.starts_with("te1."))
        .collect();
    assert_eq!(
        clip.len(),
        model.text().unwrap().clip_linear_shapes().len(),
        "every CLIP linear trains"
    );
    // Ups start at zero: non-zero after 3 steps means gradient reached every one.
    for (m, layer) in &clip {
        let up = layer
            .up
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(up > 0.0, "{m}: up never updated");
    }
    assert_eq!(file.metadata["ss_text_encoder_lr"], "0.001");
    let raw = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    assert!(raw
        .keys()
        .any(|k| k.starts_with("lora_te1_text_model_encoder_layers_0_")));

    // The text-encoder LoRA changes the pooled conditioning when sampling.
    let lora = Arc::new(file.lora);
    let with = fluxlora::model::adapter::AdapterSet::none().with(lora, 1.0);
    let a = model
        .text()
        .unwrap()
        .encode(&["a red circle"])
        .unwrap()
        .pooled;
    let b = model
        .text()
        .unwrap()
        .encode_with(&["a red circle"], &with)
        .unwrap()
        .pooled;
    let d = max_abs_diff(&a, &b);
    assert!(d > 0.0, "text-encoder LoRA had no effect");
}

#[test]
fn encoders_are_released_after_caching_when_nothing_needs_them() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    shapes::write_dataset(&data, 3, 64, 5).unwrap();
    let cfg = config(&data, &tmp.path().join("out"), 2);
    // The trainer is the only owner of the model, as in `fluxlora train`.
    let mut trainer = Trainer::new(cfg, bundle(), None).unwrap();
    trainer
        .run(&TrainControl::default(), &mut |_| {})
        .unwrap()
        .expect("finished");
    let err = trainer.bundle().text().err().expect("released").to_string();
    assert!(err.contains("released"), "{err}");
    assert!(trainer.bundle().vae().is_err());
}

#[test]
fn bf16_compute_trains_f32_adapter_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    shapes::write_dataset(&data, 3, 64, 6).unwrap();
    let mut cfg = config(&data, &tmp.path().join("out"), 3);
    cfg.mixed_precision = Precision::Bf16;
    let model = Arc::new(ModelBundle::tiny_in(&Device::Cpu, candle_core::DType::BF16).unwrap());
    let mut trainer = Trainer::new(cfg, model, None).unwrap();
    let mut losses = vec![];
    let path = trainer
        .run(&TrainControl::default(), &mut |e| {
            if let TrainEvent::Step(s) = e {
                losses.push(s.loss);
            }
        })
        .unwrap()
        .expect("finished");
    assert!(losses.iter().all(|l| l.is_finite()), "{losses:?}");
    let lora = trainer.live_lora().unwrap();
    let (_, layer) = lora.layers.iter().next().unwrap();
    assert_eq!(
        layer.down.dtype(),
        candle_core::DType::F32,
        "master weights stay f32"
    );
    let up = layer
        .up
        .abs()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(up > 0.0, "bf16 gradients reached the f32 adapter");
    assert!(lora_io::load(&path, &Device::Cpu).is_ok());
}

#[test]
fn a_cancel_during_caching_stops_before_the_first_step() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    shapes::write_dataset(&data, 4, 64, 3).unwrap();
    let out = tmp.path().join("out");
    let mut trainer = Trainer::new(config(&data, &out, 10), bundle(), None).unwrap();
    let control = TrainControl::default();
    control.cancel();
    let mut events = vec![];
    let result = trainer.run(&control, &mut |e| events.push(e)).unwrap();
    assert_eq!(result, None);
    assert_eq!(
        events,
        [
            TrainEvent::Caching { done: 1, total: 4 },
            TrainEvent::Cancelled { step: 0 }
        ]
    );
    assert_eq!(trainer.progress().step, 0);
}
