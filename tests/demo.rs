//! The README's main job: the demo LoRA teaches the pretrained tiny model a colour
//! it has never seen ("zorbly" = hot pink). Measured on image statistics: with the
//! LoRA, trigger-word prompts draw far more pink than without it, while an
//! unrelated prompt barely changes.

use std::sync::Arc;

use candle_core::Device;
use fluxlora::commands::DEMO_CONFIG;
use fluxlora::model::adapter::AdapterSet;
use fluxlora::model::bundle::ModelBundle;
use fluxlora::sample::generate::{generate, ResolvedRequest, SampleRequest};
use fluxlora::train::config::TrainConfig;
use fluxlora::train::events::{TrainControl, TrainEvent};
use fluxlora::train::shapes::{write_concept_dataset, Concept};
use fluxlora::train::trainer::Trainer;
use image::RgbImage;

/// Fraction of pixels close to the concept's pink.
fn pink_fraction(img: &RgbImage) -> f64 {
    let [pr, pg, pb] = Concept::demo().rgb;
    let near = img
        .pixels()
        .filter(|p| {
            let d = |a: u8, b: u8| (a as i32 - b as i32).abs();
            d(p[0], pr) < 60 && d(p[1], pg) < 60 && d(p[2], pb) < 60
        })
        .count();
    near as f64 / (img.width() * img.height()) as f64
}

fn mean_abs_diff(a: &RgbImage, b: &RgbImage) -> f64 {
    let sum: u64 = a
        .as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(x, y)| x.abs_diff(*y) as u64)
        .sum();
    sum as f64 / a.as_raw().len() as f64
}

#[test]
fn demo_lora_teaches_the_trigger_word_and_leaves_other_prompts_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg: TrainConfig = toml::from_str(DEMO_CONFIG).unwrap();
    cfg.output_dir = tmp.path().join("out");
    cfg.dataset.folders[0].path = tmp.path().join("dataset");
    cfg.sample_every_n_steps = None;
    cfg.save_every_n_steps = None;
    write_concept_dataset(&cfg.dataset.folders[0].path, &Concept::demo(), 24, 64, 7).unwrap();

    let bundle = Arc::new(ModelBundle::tiny(&Device::Cpu).unwrap());
    let mut trainer = Trainer::new(cfg, bundle.clone(), None).unwrap();
    let mut losses = vec![];
    trainer
        .run(&TrainControl::default(), &mut |e| {
            if let TrainEvent::Step(s) = e {
                losses.push(s.loss);
            }
        })
        .unwrap()
        .expect("finished");
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (first, last) = (mean(&losses[..30]), mean(&losses[losses.len() - 30..]));
    println!("demo loss: first 30 steps {first:.4}, last 30 steps {last:.4}");
    assert!(last < first, "loss did not fall: {first} → {last}");

    let lora = trainer.live_lora().expect("a LoRA run");
    let with = AdapterSet::none().with(lora, 1.0);
    let without = AdapterSet::none();
    let sample = |prompt: &str, seed: u64, adapters: &AdapterSet| {
        let req = SampleRequest {
            seed,
            ..SampleRequest::new(prompt)
        };
        let req = ResolvedRequest::new(&req, &bundle).unwrap();
        generate(&bundle, &req, adapters, &mut |_, _| Ok(()))
            .unwrap()
            .remove(0)
    };
    let (mut pink_with, mut pink_without) = (0.0, 0.0);
    for (i, prompt) in [
        "a zorbly circle on a blue background",
        "a zorbly square on a black background",
        "a zorbly triangle on a green background",
    ]
    .iter()
    .enumerate()
    {
        pink_with += pink_fraction(&sample(prompt, i as u64, &with));
        pink_without += pink_fraction(&sample(prompt, i as u64, &without));
    }
    println!("pink pixels with the trigger word: {pink_with:.3} with the LoRA, {pink_without:.3} without");
    assert!(pink_with > 0.15, "the LoRA draws little pink: {pink_with}");
    assert!(
        pink_with > 3.0 * pink_without + 0.05,
        "{pink_with} vs {pink_without}"
    );

    // An unrelated prompt changes much less than a trigger prompt does.
    let unrelated = "a red circle on a blue background";
    let d_unrelated = mean_abs_diff(
        &sample(unrelated, 5, &with),
        &sample(unrelated, 5, &without),
    );
    let trigger = "a zorbly circle on a blue background";
    let d_trigger = mean_abs_diff(&sample(trigger, 5, &with), &sample(trigger, 5, &without));
    println!("mean pixel change: unrelated prompt {d_unrelated:.2}, trigger prompt {d_trigger:.2}");
    assert!(
        d_unrelated < 0.5 * d_trigger,
        "unrelated {d_unrelated} vs trigger {d_trigger}"
    );
}
