//! End-to-end checks of the command-line jobs on the built-in tiny model:
//! sampling with and without LoRAs, every sampler and schedule, PNG metadata, `lora inspect|convert|merge`,
//! and the errors a user sees for broken files.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use fluxlora::commands::{self, LoraArg, ModelArgs, SaveFormat};
use fluxlora::model::adapter::{AdapterSet, Lora, LoraLayer};
use fluxlora::model::flux::{image_ids, text_ids, Flux, FluxInputs};
use fluxlora::model::lora_io;
use fluxlora::model::seeded::SeededRng;
use fluxlora::sample::generate::SampleRequest;
use fluxlora::sample::png_meta::read_text_chunks;
use fluxlora::sample::samplers::Sampler;
use fluxlora::sample::schedule::Scheduler;

use crate::support::{bundle, max_abs_diff, write_lora};

fn pixels(path: &Path) -> Vec<u8> {
    image::open(path).unwrap().to_rgb8().into_raw()
}

fn request(seed: u64) -> SampleRequest {
    SampleRequest {
        steps: Some(4),
        seed,
        ..SampleRequest::new("a red circle on a blue background")
    }
}

#[test]
fn sample_is_deterministic_and_loras_change_it() {
    let dir = tempfile::tempdir().unwrap();
    let model = ModelArgs::default();
    let lora = write_lora(dir.path(), "style", 1);

    let a = commands::sample(&model, &request(7), &[], &dir.path().join("a.png")).unwrap();
    let b = commands::sample(&model, &request(7), &[], &dir.path().join("b.png")).unwrap();
    assert_eq!(pixels(&a[0]), pixels(&b[0]), "same seed, same image");
    let c = commands::sample(&model, &request(8), &[], &dir.path().join("c.png")).unwrap();
    assert_ne!(pixels(&a[0]), pixels(&c[0]), "another seed, another image");

    let zero = LoraArg {
        path: lora.clone(),
        strength: 0.0,
    };
    let z = commands::sample(&model, &request(7), &[zero], &dir.path().join("z.png")).unwrap();
    assert_eq!(pixels(&a[0]), pixels(&z[0]), "strength 0 is the base model");
    let one = LoraArg {
        path: lora,
        strength: 1.0,
    };
    let l = commands::sample(&model, &request(7), &[one], &dir.path().join("l.png")).unwrap();
    assert_ne!(pixels(&a[0]), pixels(&l[0]), "the LoRA changes the image");

    let chunks = read_text_chunks(&std::fs::read(&l[0]).unwrap()).unwrap();
    let params = &chunks.iter().find(|(k, _)| k == "parameters").unwrap().1;
    assert!(params.contains("<lora:style:1>"), "{params}");
    assert!(
        params.contains("Seed: 7, Size: 64x64, Model: tiny"),
        "{params}"
    );
}

#[test]
fn batch_images_equal_single_images_with_consecutive_seeds() {
    let dir = tempfile::tempdir().unwrap();
    let model = ModelArgs::default();
    let batch = SampleRequest {
        batch_size: 2,
        ..request(3)
    };
    let out = commands::sample(&model, &batch, &[], &dir.path().join("b.png")).unwrap();
    assert_eq!(out.len(), 2);
    let single = commands::sample(&model, &request(4), &[], &dir.path().join("s.png")).unwrap();
    let (b1, s) = (pixels(&out[1]), pixels(&single[0]));
    let max_diff = b1
        .iter()
        .zip(&s)
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap();
    assert!(
        max_diff <= 1,
        "batch image 1 vs seed 4 alone: max pixel difference {max_diff}"
    );
}

#[test]
fn bad_sizes_are_refused_with_the_field_named() {
    let dir = tempfile::tempdir().unwrap();
    let req = SampleRequest {
        width: Some(100),
        ..request(0)
    };
    let err =
        commands::sample(&ModelArgs::default(), &req, &[], &dir.path().join("x.png")).unwrap_err();
    assert!(
        format!("{err:#}").contains("width must be a positive multiple of 16"),
        "{err:#}"
    );
    assert!(!dir.path().join("x.png").exists());
}

fn tiny_inputs(cfg_ctx: usize, cfg_vec: usize, cfg_in: usize) -> Vec<Tensor> {
    let dev = Device::Cpu;
    let mut rng = SeededRng::new(9);
    vec![
        rng.randn((1, 4, cfg_in), &dev).unwrap(),
        image_ids(1, 2, 2, &dev).unwrap(),
        rng.randn((1, 3, cfg_ctx), &dev).unwrap(),
        text_ids(1, 3, &dev).unwrap(),
        Tensor::new(&[0.4f32], &dev).unwrap(),
        rng.randn((1, cfg_vec), &dev).unwrap(),
    ]
}

fn forward(flux: &Flux, t: &[Tensor], adapters: &AdapterSet) -> Tensor {
    let inputs = FluxInputs {
        img: &t[0],
        img_ids: &t[1],
        txt: &t[2],
        txt_ids: &t[3],
        timesteps: &t[4],
        y: &t[5],
        guidance: None,
    };
    flux.forward(&inputs, adapters).unwrap()
}

#[test]
fn merge_of_two_stacked_loras_equals_applying_them_unmerged() {
    let dir = tempfile::tempdir().unwrap();
    let a = write_lora(dir.path(), "a", 1);
    let b = write_lora(dir.path(), "b", 2);
    let loras = [
        LoraArg {
            path: a.clone(),
            strength: 0.8,
        },
        LoraArg {
            path: b.clone(),
            strength: -0.5,
        },
    ];
    let merged_path = dir.path().join("merged.safetensors");
    commands::lora_merge(&ModelArgs::default(), &loras, &merged_path).unwrap();

    let bundle = bundle();
    let cfg = bundle.flux.config().clone();
    let t = tiny_inputs(cfg.context_in_dim, cfg.vec_in_dim, cfg.in_channels);
    let load = |p: &Path| Arc::new(lora_io::load(p, &Device::Cpu).unwrap().lora);
    let stacked = AdapterSet::none().with(load(&a), 0.8).with(load(&b), -0.5);
    let unmerged = forward(&bundle.flux, &t, &stacked);
    let only_a = forward(&bundle.flux, &t, &AdapterSet::none().with(load(&a), 0.8));
    assert!(
        max_abs_diff(&unmerged, &only_a) > 1e-3,
        "the second adapter must count"
    );

    let merged = Flux::load(&merged_path, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(
        merged.config(),
        &cfg,
        "config inferred from the merged file"
    );
    let out = forward(&merged, &t, &AdapterSet::none());
    let diff = max_abs_diff(&out, &unmerged);
    assert!(diff < 1e-4, "merged vs unmerged: {diff}");
}

#[test]
fn convert_kohya_diffusers_kohya_is_lossless_and_inspect_reports_it() {
    let dir = tempfile::tempdir().unwrap();
    let kohya = write_lora(dir.path(), "k", 5);
    let diffusers = dir.path().join("d.safetensors");
    let back = dir.path().join("k2.safetensors");
    commands::lora_convert(&kohya, &diffusers, SaveFormat::Diffusers, "f32").unwrap();
    commands::lora_convert(&diffusers, &back, SaveFormat::Kohya, "f32").unwrap();
    let orig = candle_core::safetensors::load(&kohya, &Device::Cpu).unwrap();
    let round = candle_core::safetensors::load(&back, &Device::Cpu).unwrap();
    assert_eq!(orig.len(), round.len());
    for (k, v) in &orig {
        let w = round
            .get(k)
            .unwrap_or_else(|| panic!("{k} lost in the round trip"));
        assert_eq!(max_abs_diff(v, w), 0.0, "{k} changed");
    }
    let text = commands::lora_inspect(&diffusers, false).unwrap();
    assert!(text.contains("diffusers"), "{text}");
    let json: serde_json::Value =
        serde_json::from_str(&commands::lora_inspect(&back, true).unwrap()).unwrap();
    assert_eq!(json["format"], "kohya");
}

#[test]
fn broken_files_give_errors_that_name_them() {
    let dir = tempfile::tempdir().unwrap();
    let good = write_lora(dir.path(), "good", 3);
    let bytes = std::fs::read(&good).unwrap();

    let truncated = dir.path().join("truncated.safetensors");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let garbage = dir.path().join("garbage.safetensors");
    std::fs::write(&garbage, b"this is not a safetensors file").unwrap();
    for bad in [&truncated, &garbage] {
        let arg = LoraArg {
            path: bad.clone(),
            strength: 1.0,
        };
        let err = commands::sample(
            &ModelArgs::default(),
            &request(0),
            &[arg],
            &dir.path().join("x.png"),
        )
        .unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains(&bad.display().to_string()), "{msg}");
    }

    // A LoRA made for a bigger model: the error names the module and the shapes.
    let mut lora = Lora::new("wrong");
    lora.layers.insert(
        "double_blocks.0.img_attn.qkv".into(),
        LoraLayer {
            down: Tensor::zeros((4, 3072), DType::F32, &Device::Cpu).unwrap(),
            up: Tensor::zeros((9216, 4), DType::F32, &Device::Cpu).unwrap(),
            alpha: 4.0,
        },
    );
    let wrong = dir.path().join("wrong.safetensors");
    lora_io::save_kohya(&wrong, &lora, &BTreeMap::new(), DType::F32).unwrap();
    let arg = LoraArg {
        path: wrong,
        strength: 1.0,
    };
    let err = commands::sample(
        &ModelArgs::default(),
        &request(0),
        &[arg],
        &dir.path().join("x.png"),
    )
    .unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("double_blocks.0.img_attn.qkv"), "{msg}");
    assert!(msg.contains("3072"), "{msg}");

    // A corrupt model file.
    let model = ModelArgs {
        model: Some(truncated.clone()),
        ..ModelArgs::default()
    };
    let err = commands::sample(&model, &request(0), &[], &dir.path().join("x.png")).unwrap_err();
    assert!(
        format!("{err:#}").contains("truncated.safetensors"),
        "{err:#}"
    );
    assert!(!dir.path().join("x.png").exists());
}

#[test]
fn train_command_runs_a_toml_config_and_resumes() {
    use fluxlora::commands::ResumeArg;
    use fluxlora::train::config::TrainConfig;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    fluxlora::train::shapes::write_dataset(&data, 3, 64, 4).unwrap();
    let out = dir.path().join("out");
    let toml = format!(
        r#"
output_dir = "{out}"
output_name = "cli"
max_train_steps = 4
save_every_n_steps = 2
learning_rate = 1e-3
t5_max_token_length = 16
[dataset]
folders = ["{data}"]
resolution = 64
enable_bucket = false
[network]
rank = 2
alpha = 1.0
"#,
        out = out.display(),
        data = data.display()
    );
    let path = dir.path().join("run.toml");
    std::fs::write(&path, toml).unwrap();
    let cfg = TrainConfig::from_file(&path).unwrap();
    let lora = commands::train(cfg.clone(), None).unwrap();
    assert_eq!(lora, out.join("cli.safetensors"));
    assert!(out.join("cli-step000002.safetensors").is_file());
    // `--resume auto` picks the newest state (step 2) and finishes the run again.
    let again = commands::train(cfg, Some(&ResumeArg::Auto)).unwrap();
    assert_eq!(again, lora);

    // Unknown fields and bad values are named.
    std::fs::write(&path, "max_train_steps = 3\nlerning_rate = 1.0\n").unwrap();
    let err = TrainConfig::from_file(&path).unwrap_err().to_string();
    assert!(err.contains("lerning_rate"), "{err}");
    std::fs::write(&path, "{\"max_train_steps\": 0}").unwrap();
    let json = dir.path().join("run.json");
    std::fs::rename(&path, &json).unwrap();
    let err = TrainConfig::from_file(&json).unwrap_err().to_string();
    assert!(err.contains("max_train_steps"), "{err}");
}

#[test]
fn nodes_lists_the_node_definitions_with_the_lora_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let settings = fluxlora::config::Settings {
        data_dir: tmp.path().to_path_buf(),
        ..Default::default()
    };
    std::fs::create_dir_all(settings.lora_dir()).unwrap();
    std::fs::write(settings.lora_dir().join("style.safetensors"), b"x").unwrap();
    let info: serde_json::Value =
        serde_json::from_str(&commands::nodes(&settings, true).unwrap()).unwrap();
    for node in [
        "FluxLoraTrain",
        "FluxLoraApply",
        "FluxLoraLiveAdapter",
        "FluxLoraSample",
        "SaveImage",
    ] {
        assert_eq!(info[node]["name"], node);
    }
    assert_eq!(
        info["FluxLoraApply"]["input"]["optional"]["lora_name"][0],
        serde_json::json!(["style.safetensors"])
    );
}

#[test]
fn true_cfg_uses_the_negative_prompt_and_scale_one_is_one_pass() {
    let dir = tempfile::tempdir().unwrap();
    let model = ModelArgs::default();
    let with = |cfg: Option<f64>, negative: &str, name: &str| {
        let req = SampleRequest {
            cfg_scale: cfg,
            negative_prompt: negative.into(),
            ..request(5)
        };
        let out = commands::sample(&model, &req, &[], &dir.path().join(name)).unwrap();
        pixels(&out[0])
    };
    let plain = with(None, "a green square", "plain.png");
    assert_eq!(
        plain,
        with(Some(1.0), "a green square", "one.png"),
        "scale 1: one pass, the negative unused"
    );
    let cfg = with(Some(4.0), "a green square", "cfg.png");
    assert_ne!(plain, cfg, "true CFG changes the image");
    assert_ne!(
        cfg,
        with(Some(4.0), "a red circle", "other.png"),
        "the negative prompt matters"
    );
    let file = dir.path().join("cfg.png");
    let chunks = read_text_chunks(&std::fs::read(file).unwrap()).unwrap();
    let params = &chunks.iter().find(|(k, _)| k == "parameters").unwrap().1;
    assert!(params.contains("CFG scale: 4,"), "{params}");
    let bad = SampleRequest {
        cfg_scale: Some(-1.0),
        ..request(5)
    };
    let err = commands::sample(&model, &bad, &[], &dir.path().join("bad.png")).unwrap_err();
    assert!(format!("{err:#}").contains("cfg_scale"), "{err:#}");
}

#[test]
fn img2img_starts_part_way_down_the_schedule_from_the_image() {
    let dir = tempfile::tempdir().unwrap();
    let model = ModelArgs::default();
    // A start image: a txt2img result of another prompt.
    let init = SampleRequest {
        prompt: "a yellow square on a black background".into(),
        ..request(11)
    };
    let init = commands::sample(&model, &init, &[], &dir.path().join("init.png")).unwrap();
    let run = |denoise: Option<f64>, image: bool, name: &str| {
        let req = SampleRequest {
            init_image: image.then(|| init[0].clone()),
            denoise,
            ..request(5)
        };
        let out = commands::sample(&model, &req, &[], &dir.path().join(name)).unwrap();
        pixels(&out[0])
    };
    let distance = |a: &[u8], b: &[u8]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (*x as f64 - *y as f64).abs())
            .sum::<f64>()
            / a.len() as f64
    };
    let txt2img = run(None, false, "t.png");
    assert_eq!(
        run(Some(1.0), true, "full.png"),
        txt2img,
        "denoise 1 starts from pure noise"
    );
    let start = pixels(&init[0]);
    let light = run(Some(0.25), true, "light.png");
    let default = run(None, true, "default.png");
    assert!(
        distance(&light, &start) < distance(&default, &start)
            && distance(&default, &start) < distance(&txt2img, &start),
        "less denoise stays closer to the image: {} {} {}",
        distance(&light, &start),
        distance(&default, &start),
        distance(&txt2img, &start)
    );
    let bad = SampleRequest {
        denoise: Some(0.5),
        ..request(5)
    };
    let err = commands::sample(&model, &bad, &[], &dir.path().join("x.png")).unwrap_err();
    assert!(format!("{err:#}").contains("init_image"), "{err:#}");
}

#[test]
fn every_sampler_and_schedule_samples_and_is_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let model = ModelArgs::default();
    let mut seen: Vec<(String, Vec<u8>)> = vec![];
    for sampler in Sampler::ALL {
        for scheduler in Scheduler::ALL {
            let req = SampleRequest {
                width: Some(32),
                height: Some(32),
                steps: Some(3),
                sampler,
                scheduler,
                ..request(7)
            };
            let name = format!("{}_{}", sampler.name(), scheduler.name());
            let out = commands::sample(&model, &req, &[], &dir.path().join(format!("{name}.png")))
                .unwrap();
            let chunks = read_text_chunks(&std::fs::read(&out[0]).unwrap()).unwrap();
            let params = &chunks.iter().find(|(k, _)| k == "parameters").unwrap().1;
            let recorded = format!(
                "Sampler: {}, Schedule type: {},",
                sampler.a1111_name(),
                scheduler.a1111_label()
            );
            assert!(params.contains(&recorded), "{params}");
            let again = commands::sample(&model, &req, &[], &dir.path().join("again.png")).unwrap();
            assert_eq!(pixels(&out[0]), pixels(&again[0]), "{name} repeats exactly");
            seen.push((name, pixels(&out[0])));
        }
    }
    for (i, (a, pa)) in seen.iter().enumerate() {
        for (b, pb) in &seen[i + 1..] {
            assert_ne!(pa, pb, "{a} and {b} gave the same image");
        }
    }
}

#[test]
fn the_sample_command_takes_sampler_and_scheduler_names() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("cli.png");
    let run = |extra: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_fluxlora"))
            .args(["sample", "--prompt", "a red circle", "--steps", "2"])
            .args(["--width", "32", "--height", "32", "--out"])
            .arg(&out)
            .args(extra)
            .output()
            .unwrap()
    };
    let ok = run(&["--sampler", "dpmpp_2m", "--scheduler", "beta"]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let chunks = read_text_chunks(&std::fs::read(&out).unwrap()).unwrap();
    let params = &chunks.iter().find(|(k, _)| k == "parameters").unwrap().1;
    assert!(
        params.contains("Sampler: DPM++ 2M, Schedule type: Beta,"),
        "{params}"
    );
    let bad = run(&["--sampler", "lms"]);
    assert!(!bad.status.success());
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(
        stderr.contains("unknown sampler `lms`; accepted: euler, euler_ancestral, heun, dpmpp_2m"),
        "{stderr}"
    );
}
