//! The README's main job: the demo LoRA teaches the pretrained tiny model a colour
//! it has never seen ("zorbly" = hot pink). Measured on image statistics: with the
//! LoRA, trigger-word prompts draw far more pink than without it, while an
//! unrelated prompt barely changes.

use fluxlora::commands::{write_demo_dataset, DEMO_CONFIG};
use fluxlora::model::adapter::AdapterSet;
use fluxlora::sample::generate::{generate, ResolvedRequest, SampleRequest};
use fluxlora::train::config::TrainConfig;
use fluxlora::train::events::{TrainControl, TrainEvent};
use fluxlora::train::shapes::Concept;
use fluxlora::train::trainer::Trainer;
use image::RgbImage;

use crate::support;

/// Mean colour of the central 16×16 pixels, where the generated shape sits (the
/// training shapes are centred with a small jitter).
fn centre_colour(img: &RgbImage) -> [f64; 3] {
    let (cx, cy) = (img.width() / 2, img.height() / 2);
    let mut sum = [0.0; 3];
    for y in cy - 8..cy + 8 {
        for x in cx - 8..cx + 8 {
            for (acc, v) in sum.iter_mut().zip(img.get_pixel(x, y).0) {
                *acc += v as f64;
            }
        }
    }
    sum.map(|v| v / 256.0)
}

fn distance(a: [f64; 3], b: [f64; 3]) -> f64 {
    (0..3).map(|c| (a[c] - b[c]).powi(2)).sum::<f64>().sqrt()
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
    cfg.dataset.folders[0].path = tmp.path().join("dataset/zorbly");
    cfg.dataset.folders[1].path = tmp.path().join("dataset/regular");
    cfg.sample_every_n_steps = None;
    cfg.save_every_n_steps = None;
    write_demo_dataset(&cfg).unwrap();

    let bundle = support::bundle();
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
    // Inside the shape, the trigger word now gives (close to) the concept's pink.
    let pink = Concept::demo().rgb.map(|v| v as f64);
    let (mut d_with, mut d_without) = (0.0, 0.0);
    let prompts = [
        "a zorbly circle on a blue background",
        "a zorbly square on a black background",
        "a zorbly triangle on a green background",
    ];
    for (i, prompt) in prompts.iter().enumerate() {
        d_with += distance(centre_colour(&sample(prompt, i as u64, &with)), pink) / 3.0;
        d_without += distance(centre_colour(&sample(prompt, i as u64, &without)), pink) / 3.0;
    }
    println!("distance of the shape's colour to the concept's pink: {d_with:.1} with the LoRA, {d_without:.1} without");
    assert!(
        d_with < 0.75 * d_without,
        "the LoRA does not draw the concept: {d_with} vs {d_without}"
    );

    // An unrelated prompt's shape keeps its colour; a trigger prompt's does not.
    let change = |prompt: &str| {
        let a = centre_colour(&sample(prompt, 5, &with));
        let b = centre_colour(&sample(prompt, 5, &without));
        distance(a, b)
    };
    let unrelated = change("a red circle on a blue background");
    let trigger = change("a zorbly circle on a blue background");
    let whole_image = mean_abs_diff(
        &sample("a red circle on a blue background", 5, &with),
        &sample("a red circle on a blue background", 5, &without),
    );
    println!("shape colour change: unrelated prompt {unrelated:.1}, trigger prompt {trigger:.1}; unrelated whole-image mean change {whole_image:.2}");
    assert!(
        unrelated < 0.5 * trigger,
        "unrelated {unrelated} vs trigger {trigger}"
    );
}
