//! The A1111 dialect (`/sdapi/v1`) on the real server, driven with the request
//! shapes the `webuiapi` client library (0.9.17) sends: construction
//! (`/scripts`), a default txt2img, batches, LoRA tags, and the refusals.

use base64::Engine as _;
use serde_json::{json, Value};

use crate::support::app::{spawn_app, App};
use crate::support::write_lora;
use fluxlora::model::lora_io;
use fluxlora::sample::png_meta::read_text_chunks;

/// `webuiapi.WebUIApi().txt2img(prompt=…)`'s payload: every field at the
/// library's defaults (sampler "Euler a", scheduler "automatic", cfg_scale 7,
/// steps 20, …), as it posts it.
fn webuiapi_payload(prompt: &str) -> Value {
    let mut payload: Value = serde_json::from_str(WEBUIAPI_TXT2IMG).unwrap();
    payload["prompt"] = json!(prompt);
    payload
}

/// The body `webuiapi` 0.9.17 posts to `/sdapi/v1/txt2img` for
/// `txt2img(prompt="")` on a client built with its defaults.
const WEBUIAPI_TXT2IMG: &str = r#"{
    "enable_hr": false,
    "hr_scale": 2,
    "hr_upscaler": "Latent",
    "hr_second_pass_steps": 0,
    "hr_resize_x": 0,
    "hr_resize_y": 0,
    "hr_checkpoint_name": null,
    "hr_sampler_name": null,
    "hr_scheduler": null,
    "hr_prompt": "",
    "hr_negative_prompt": "",
    "denoising_strength": 0.7,
    "firstphase_width": 0,
    "firstphase_height": 0,
    "prompt": "",
    "styles": [],
    "seed": -1,
    "subseed": -1,
    "subseed_strength": 0.0,
    "seed_resize_from_h": 0,
    "seed_resize_from_w": 0,
    "batch_size": 1,
    "n_iter": 1,
    "steps": 20,
    "cfg_scale": 7.0,
    "width": 512,
    "height": 512,
    "restore_faces": false,
    "tiling": false,
    "do_not_save_samples": false,
    "do_not_save_grid": false,
    "negative_prompt": "",
    "eta": 1.0,
    "s_churn": 0,
    "s_tmax": 0,
    "s_tmin": 0,
    "s_noise": 1,
    "override_settings": {},
    "override_settings_restore_afterwards": true,
    "sampler_name": "Euler a",
    "scheduler": "automatic",
    "sampler_index": "Euler a",
    "script_name": null,
    "script_args": [],
    "send_images": true,
    "save_images": false,
    "alwayson_scripts": {}
}"#;

/// The payload at 64×64 with `edit` applied (the tiny model's size; fewer steps).
fn payload(prompt: &str, edit: Value) -> Value {
    let mut p = webuiapi_payload(prompt);
    p["width"] = json!(64);
    p["height"] = json!(64);
    p["steps"] = json!(3);
    for (k, v) in edit.as_object().unwrap() {
        p[k] = v.clone();
    }
    p
}

struct Answer {
    pngs: Vec<Vec<u8>>,
    info: Value,
    parameters: Value,
}

fn txt2img(app: &App, body: &Value) -> Answer {
    let r = app.post("/sdapi/v1/txt2img", body);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let v = r.json();
    let pngs = v["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            base64::engine::general_purpose::STANDARD
                .decode(b.as_str().unwrap())
                .unwrap()
        })
        .collect();
    Answer {
        pngs,
        info: serde_json::from_str(v["info"].as_str().expect("info is a JSON string")).unwrap(),
        parameters: v["parameters"].clone(),
    }
}

fn parameters_chunk(png: &[u8]) -> String {
    read_text_chunks(png)
        .unwrap()
        .into_iter()
        .find(|(k, _)| k == "parameters")
        .expect("a parameters chunk")
        .1
}

fn pixels(png: &[u8]) -> image::RgbImage {
    image::load_from_memory(png).unwrap().to_rgb8()
}

fn max_pixel_diff(a: &[u8], b: &[u8]) -> u8 {
    let (a, b) = (pixels(a), pixels(b));
    a.as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap()
}

/// A 422 in A1111's `HTTPException` shape; its detail.
fn refused(app: &App, body: &Value) -> String {
    let r = app.post("/sdapi/v1/txt2img", body);
    assert_eq!(r.status, 422, "{}", String::from_utf8_lossy(&r.body));
    let v = r.json();
    assert_eq!(v["error"], "HTTPException");
    assert!(v["errors"].as_str().unwrap().starts_with("422: "), "{v}");
    v["detail"].as_str().unwrap().to_string()
}

#[test]
fn webuiapi_construction_and_default_txt2img() {
    let tmp = tempfile::tempdir().unwrap();
    let app = spawn_app(tmp.path(), vec![], "127.0.0.1", None);
    // The client's constructor asks for the scripts.
    assert_eq!(
        app.get("/sdapi/v1/scripts").json(),
        json!({"txt2img": [], "img2img": []})
    );
    let mut body = webuiapi_payload("a red circle");
    body["width"] = json!(64);
    body["height"] = json!(64);
    let a = txt2img(&app, &body);
    assert_eq!(a.pngs.len(), 1);
    let img = pixels(&a.pngs[0]);
    assert_eq!((img.width(), img.height()), (64, 64));
    let seed = a.info["seed"].as_u64().expect("the seed used");
    assert!(seed < 4_294_967_294);
    assert_eq!(a.info["all_seeds"], json!([seed]));
    assert_eq!(a.info["prompt"], "a red circle");
    assert_eq!(a.info["steps"], 20);
    assert_eq!(
        a.info["cfg_scale"], 7.0,
        "A1111's default 7: true CFG, as Forge runs it"
    );
    assert_eq!(
        a.info["extra_generation_params"]["Distilled CFG Scale"],
        3.5
    );
    for key in [
        "all_prompts",
        "negative_prompt",
        "all_negative_prompts",
        "subseed",
        "all_subseeds",
        "subseed_strength",
        "width",
        "height",
        "sampler_name",
        "batch_size",
        "restore_faces",
        "face_restoration_model",
        "sd_model_name",
        "sd_model_hash",
        "seed_resize_from_w",
        "seed_resize_from_h",
        "denoising_strength",
        "index_of_first_image",
        "styles",
        "job_timestamp",
        "clip_skip",
        "is_using_inpainting_conditioning",
        "version",
    ] {
        assert!(a.info.get(key).is_some(), "info lacks {key}");
    }
    // The PNG carries the infotext that info reports.
    let text = parameters_chunk(&a.pngs[0]);
    assert_eq!(a.info["infotexts"], json!([text]));
    assert!(
        text.contains(&format!("Seed: {seed}, Size: 64x64")),
        "{text}"
    );
    // The request as parsed, with A1111's defaults.
    assert_eq!(a.parameters["sampler_name"], "Euler a");
    assert_eq!(a.parameters["distilled_cfg_scale"], 3.5);
    assert_eq!(a.parameters["seed"], -1);
}

#[test]
fn batches_and_iterations_use_consecutive_seeds() {
    let tmp = tempfile::tempdir().unwrap();
    let app = spawn_app(tmp.path(), vec![], "127.0.0.1", None);
    let a = txt2img(
        &app,
        &payload(
            "a blue square",
            json!({"seed": 100, "batch_size": 2, "n_iter": 2}),
        ),
    );
    assert_eq!(a.pngs.len(), 4);
    assert_eq!(a.info["all_seeds"], json!([100, 101, 102, 103]));
    assert_eq!(a.info["infotexts"].as_array().unwrap().len(), 4);
    for (i, png) in a.pngs.iter().enumerate() {
        assert!(parameters_chunk(png).contains(&format!("Seed: {}", 100 + i)));
    }
    for i in [1, 2] {
        let single = txt2img(&app, &payload("a blue square", json!({"seed": 100 + i})));
        let diff = max_pixel_diff(&a.pngs[i], &single.pngs[0]);
        assert!(diff <= 1, "image {i} vs seed {} alone: {diff}", 100 + i);
    }
    // Idle again: progress reports no job.
    let p = app.get("/sdapi/v1/progress").json();
    assert_eq!(p["state"]["job_count"], 0);
    assert_eq!(p["progress"], 0.0);
}

#[test]
fn lora_tags_apply_the_folders_loras_and_are_recorded() {
    let tmp = tempfile::tempdir().unwrap();
    let lora_dir = tmp.path().join("loras");
    std::fs::create_dir_all(&lora_dir).unwrap();
    let file = write_lora(&lora_dir, "webui-style", 7);
    let app = spawn_app(tmp.path(), vec![], "127.0.0.1", None);

    let loras = app.get("/sdapi/v1/loras").json();
    assert_eq!(loras[0]["name"], "webui-style");
    assert_eq!(loras[0]["alias"], "webui-style");
    assert_eq!(loras[0]["path"], file.display().to_string());
    assert!(loras[0]["metadata"].is_object());

    let plain = txt2img(&app, &payload("a cat", json!({"seed": 5})));
    let tagged = txt2img(
        &app,
        &payload("a cat <lora:webui-style:0.8>", json!({"seed": 5})),
    );
    assert!(
        max_pixel_diff(&plain.pngs[0], &tagged.pngs[0]) > 8,
        "the LoRA changes the image"
    );
    let hash = lora_io::tensor_data_hash(&std::fs::read(&file).unwrap());
    let text = parameters_chunk(&tagged.pngs[0]);
    assert!(text.starts_with("a cat <lora:webui-style:0.8>\n"), "{text}");
    assert!(
        text.contains(&format!("Lora hashes: \"webui-style: {}\"", &hash[..12])),
        "{text}"
    );
    assert_eq!(tagged.info["infotexts"], json!([text]));
    assert_eq!(tagged.info["prompt"], "a cat <lora:webui-style:0.8>");
    assert_eq!(
        tagged.info["extra_generation_params"]["Lora hashes"],
        format!("webui-style: {}", &hash[..12])
    );
    // The same tag by file name, at multiplier 1 by default, runs too.
    txt2img(
        &app,
        &payload("a cat <lora:webui-style.safetensors>", json!({})),
    );

    let detail = refused(&app, &payload("a cat <lora:webui-styel:1>", json!({})));
    assert!(detail.starts_with("prompt: "), "{detail}");
    assert!(detail.contains("closest: webui-style"), "{detail}");
}

#[test]
fn refusals_name_the_field_and_the_daemon_answers_after() {
    let tmp = tempfile::tempdir().unwrap();
    let app = spawn_app(tmp.path(), vec![], "127.0.0.1", None);
    let detail = refused(&app, &payload("x", json!({"enable_hr": true})));
    assert!(detail.starts_with("enable_hr: "), "{detail}");
    let detail = refused(&app, &payload("x", json!({"cfg_scale": -1.0})));
    assert!(detail.starts_with("cfg_scale: "), "{detail}");
    let detail = refused(&app, &payload("x", json!({"width": 72})));
    assert!(
        detail.starts_with("width: ") && detail.contains("A1111 would round to 8"),
        "{detail}"
    );
    let detail = refused(
        &app,
        &payload("x", json!({"sampler_name": "DPM++ 2M Karras"})),
    );
    assert!(
        detail.starts_with("sampler_name: ") && detail.contains("Euler, Euler a, Heun, DPM++ 2M"),
        "{detail}"
    );
    let detail = refused(&app, &payload("x", json!({"scheduler": "karras"})));
    assert!(
        detail.starts_with("scheduler: ") && detail.contains("automatic, simple, normal, beta"),
        "{detail}"
    );

    let r = app.request("POST", "/sdapi/v1/txt2img", Some(b"{\"prompt\": "));
    assert!((400..500).contains(&r.status), "{}", r.status);
    assert!(r.json()["detail"].is_array(), "FastAPI's validation shape");
    let r = app.post("/sdapi/v1/txt2img", &json!({"steps": "many"}));
    assert_eq!(r.status, 422);
    assert_eq!(r.json()["detail"][0]["loc"], json!(["body", "steps"]));

    // The daemon still answers, and the lists clients read on start.
    let samplers = app.get("/sdapi/v1/samplers").json();
    assert_eq!(samplers[1]["name"], "Euler a");
    assert_eq!(
        app.get("/sdapi/v1/schedulers").json()[0]["name"],
        "automatic"
    );
    let models = app.get("/sdapi/v1/sd-models").json();
    assert_eq!(models[0]["model_name"], "tiny");
    let options = app.get("/sdapi/v1/options").json();
    assert_eq!(options["sd_model_checkpoint"], models[0]["title"]);
    let set = app.post(
        "/sdapi/v1/options",
        &json!({"samples_format": "png", "x": 1}),
    );
    assert_eq!(set.status, 200);
    let switch = app.post(
        "/sdapi/v1/options",
        &json!({"sd_model_checkpoint": "sdxl.safetensors"}),
    );
    assert_eq!(switch.status, 422);
    assert_eq!(app.post("/sdapi/v1/refresh-loras", &json!({})).status, 200);
    assert_eq!(
        app.post("/sdapi/v1/interrupt", &json!({})).json(),
        json!({})
    );
    assert_eq!(app.get("/sdapi/v1/progress").json()["state"]["job"], "");
    txt2img(&app, &payload("still here", json!({"seed": 1})));
}

#[test]
fn samplers_and_schedulers_are_chosen_by_a1111_name() {
    let tmp = tempfile::tempdir().unwrap();
    let app = spawn_app(tmp.path(), vec![], "127.0.0.1", None);
    // The lists name exactly what is accepted.
    let samplers = app.get("/sdapi/v1/samplers").json();
    let names: Vec<&str> = samplers
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["Euler", "Euler a", "Heun", "DPM++ 2M"]);
    assert_eq!(samplers[3]["aliases"], json!(["k_dpmpp_2m"]));
    assert_eq!(samplers[3]["options"]["fluxlora_sampler"], "dpmpp_2m");
    let schedulers = app.get("/sdapi/v1/schedulers").json();
    let labels: Vec<&str> = schedulers
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["label"].as_str().unwrap())
        .collect();
    assert_eq!(labels, ["Automatic", "Simple", "Normal", "Beta"]);

    let body = |edit: Value| {
        let mut p = payload("a red circle", json!({"seed": 4, "cfg_scale": 1}));
        for (k, v) in edit.as_object().unwrap() {
            p[k] = v.clone();
        }
        p
    };
    let dpm = txt2img(
        &app,
        &body(json!({"sampler_name": "DPM++ 2M", "scheduler": "beta"})),
    );
    assert_eq!(dpm.info["sampler_name"], "DPM++ 2M");
    assert_eq!(dpm.info["extra_generation_params"]["Schedule type"], "Beta");
    let text = parameters_chunk(&dpm.pngs[0]);
    assert!(
        text.contains("Steps: 3, Sampler: DPM++ 2M, Schedule type: Beta, "),
        "{text}"
    );
    let euler = txt2img(
        &app,
        &body(json!({"sampler_name": "Euler", "scheduler": "simple"})),
    );
    assert!(parameters_chunk(&euler.pngs[0]).contains("Sampler: Euler, Schedule type: Simple, "));
    assert!(
        max_pixel_diff(&dpm.pngs[0], &euler.pngs[0]) > 0,
        "another sampler and schedule give another image"
    );
    // Euler a by its index alias: deterministic per seed, and another seed differs.
    let ancestral = |seed: u64| {
        txt2img(
            &app,
            &body(json!({"sampler_name": null, "sampler_index": "k_euler_a", "seed": seed})),
        )
    };
    let a = ancestral(4);
    assert!(parameters_chunk(&a.pngs[0]).contains("Sampler: Euler a, Schedule type: Simple, "));
    assert_eq!(max_pixel_diff(&a.pngs[0], &ancestral(4).pngs[0]), 0);
    assert!(max_pixel_diff(&a.pngs[0], &euler.pngs[0]) > 0);
}

#[test]
fn img2img_starts_from_the_given_image() {
    let tmp = tempfile::tempdir().unwrap();
    let app = spawn_app(tmp.path(), vec![], "127.0.0.1", None);
    let base = |edit: Value| payload("a red circle on a blue background", edit);
    let start = txt2img(&app, &base(json!({"seed": 3, "cfg_scale": 1})));
    let b64 = base64::engine::general_purpose::STANDARD.encode(&start.pngs[0]);
    let img2img = |edit: Value| {
        let mut body = base(json!({"seed": 9, "cfg_scale": 1}));
        for (k, v) in edit.as_object().unwrap() {
            body[k] = v.clone();
        }
        let r = app.post("/sdapi/v1/img2img", &body);
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        let v = r.json();
        let png = base64::engine::general_purpose::STANDARD
            .decode(v["images"][0].as_str().unwrap())
            .unwrap();
        let info: Value = serde_json::from_str(v["info"].as_str().unwrap()).unwrap();
        (png, info)
    };
    let fresh = txt2img(&app, &base(json!({"seed": 9, "cfg_scale": 1})));
    // Denoise 1 starts from pure noise: the txt2img image of the same seed.
    let (full, _) = img2img(json!({"init_images": [b64], "denoising_strength": 1.0}));
    assert_eq!(max_pixel_diff(&full, &fresh.pngs[0]), 0);
    // A little denoise stays near the start image; a data URL works too.
    let (light, info) = img2img(json!({
        "init_images": [format!("data:image/png;base64,{b64}")],
        "denoising_strength": 0.2,
    }));
    assert_eq!(info["denoising_strength"], 0.2);
    let mean = |a: &[u8], b: &[u8]| {
        let (a, b) = (pixels(a), pixels(b));
        a.as_raw()
            .iter()
            .zip(b.as_raw())
            .map(|(x, y)| x.abs_diff(*y) as f64)
            .sum::<f64>()
            / a.as_raw().len() as f64
    };
    assert!(
        mean(&light, &start.pngs[0]) < mean(&fresh.pngs[0], &start.pngs[0]),
        "{} vs {}",
        mean(&light, &start.pngs[0]),
        mean(&fresh.pngs[0], &start.pngs[0])
    );
    // Refused: no image, not base64, not an image, a mask, another resize mode.
    for (edit, field) in [
        (json!({}), "init_images"),
        (json!({"init_images": ["!!"]}), "init_images"),
        (json!({"init_images": ["aGVsbG8="]}), "init_images"),
        (json!({"init_images": [b64], "mask": b64}), "mask"),
        (
            json!({"init_images": [b64], "resize_mode": 2}),
            "resize_mode",
        ),
        (
            json!({"init_images": [b64], "denoising_strength": 2.0}),
            "denoise",
        ),
    ] {
        let mut body = base(json!({}));
        for (k, v) in edit.as_object().unwrap() {
            body[k] = v.clone();
        }
        let r = app.post("/sdapi/v1/img2img", &body);
        assert_eq!(
            r.status,
            422,
            "{field}: {}",
            String::from_utf8_lossy(&r.body)
        );
        let detail = r.json()["detail"].as_str().unwrap().to_string();
        assert!(detail.starts_with(field), "{field}: {detail}");
    }
}

#[test]
fn png_info_reads_our_parameters_back() {
    let tmp = tempfile::tempdir().unwrap();
    let app = spawn_app(tmp.path(), vec![], "127.0.0.1", None);
    let made = txt2img(
        &app,
        &payload("a blue square", json!({"seed": 12, "cfg_scale": 1})),
    );
    let b64 = base64::engine::general_purpose::STANDARD.encode(&made.pngs[0]);
    let r = app.post(
        "/sdapi/v1/png-info",
        &json!({"image": format!("data:image/png;base64,{b64}")}),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let v = r.json();
    assert_eq!(v["info"], parameters_chunk(&made.pngs[0]));
    assert_eq!(v["parameters"]["Prompt"], "a blue square");
    assert_eq!(v["parameters"]["Seed"], "12");
    assert_eq!(v["parameters"]["Size"], "64x64");
    assert!(v["items"]["fluxlora"].is_string(), "{v}");
    let r = app.post("/sdapi/v1/png-info", &json!({"image": "aGVsbG8="}));
    assert_eq!(r.status, 422);
}

/// Polls `/progress` until `done` holds for it; the last answer.
fn progress_until(app: &App, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let start = std::time::Instant::now();
    loop {
        let p = app.get("/sdapi/v1/progress").json();
        if done(&p) {
            return p;
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(120),
            "{what}: {p}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn progress_polled_during_a_run_then_skip_and_interrupt() {
    let tmp = tempfile::tempdir().unwrap();
    let app = spawn_app(tmp.path(), vec![], "127.0.0.1", None);
    let addr = app.addr;
    // Three batches of many steps, so the polls below see them running.
    let body = payload(
        "a red circle",
        json!({"seed": 50, "n_iter": 3, "steps": 1000, "cfg_scale": 1}),
    );
    let run = std::thread::spawn(move || {
        let app = App { addr, token: None };
        txt2img(&app, &body)
    });

    // Batch 1 samples: its step, the estimate, a preview image, and the text.
    let p = progress_until(&app, "batch 1 sampling with a preview", |p| {
        p["state"]["sampling_step"].as_u64().unwrap_or(0) > 0 && p["current_image"].is_string()
    });
    assert_eq!(p["state"]["job_count"], 3);
    assert_eq!(p["state"]["job_no"], 0);
    assert_eq!(p["state"]["job"], "Batch 1 out of 3");
    assert_eq!(p["state"]["sampling_steps"], 1000);
    assert_eq!(p["state"]["skipped"], false);
    assert_eq!(p["state"]["interrupted"], false);
    assert_eq!(p["state"]["job_timestamp"].as_str().unwrap().len(), 14);
    let progress = p["progress"].as_f64().unwrap();
    assert!(progress > 0.01 && progress < 0.34, "{progress}");
    assert!(p["eta_relative"].as_f64().unwrap() >= 0.0);
    assert!(p["textinfo"]
        .as_str()
        .unwrap()
        .starts_with("Sampling step "));
    let preview = base64::engine::general_purpose::STANDARD
        .decode(p["current_image"].as_str().unwrap())
        .unwrap();
    // The cheap latent preview: one pixel per latent cell (64 / 8).
    assert_eq!(pixels(&preview).width(), 8);
    let without = app.get("/sdapi/v1/progress?skip_current_image=true").json();
    assert_eq!(without["current_image"], Value::Null);

    // Skip drops batch 1 and batch 2 runs; interrupt during batch 3 stops it.
    assert_eq!(app.post("/sdapi/v1/skip", &json!({})).status, 200);
    progress_until(&app, "batch 3 sampling", |p| {
        p["state"]["job_no"] == 2 && p["state"]["sampling_step"].as_u64().unwrap_or(0) > 0
    });
    assert_eq!(app.post("/sdapi/v1/interrupt", &json!({})).status, 200);
    let a = run.join().unwrap();
    assert_eq!(a.pngs.len(), 1, "batch 2's image only");
    let text = parameters_chunk(&a.pngs[0]);
    assert!(text.contains("Seed: 51,"), "{text}");
    let idle = app.get("/sdapi/v1/progress").json();
    assert_eq!(idle["state"]["job_count"], 0);
    assert_eq!(idle["current_image"], Value::Null);
}

#[test]
fn lists_flags_memory_and_routes_we_lack() {
    let tmp = tempfile::tempdir().unwrap();
    let app = spawn_app(tmp.path(), vec![], "127.0.0.1", None);
    let modules = app.get("/sdapi/v1/sd-modules").json();
    let names: Vec<&str> = modules
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["model_name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["ae", "t5xxl", "clip_l"]);
    assert!(modules[0]["filename"].as_str().unwrap().contains("tiny"));
    let upscalers = app.get("/sdapi/v1/upscalers").json();
    assert_eq!(upscalers[0]["name"], "None");
    assert_eq!(
        app.get("/sdapi/v1/embeddings").json(),
        json!({"loaded": {}, "skipped": {}})
    );
    let flags = app.get("/sdapi/v1/cmd-flags").json();
    assert_eq!(flags["api"], true);
    assert_eq!(flags["listen"], false);
    assert_eq!(flags["data_dir"], tmp.path().display().to_string());
    let memory = app.get("/sdapi/v1/memory").json();
    let ram = &memory["ram"];
    assert!(ram["total"].as_u64().unwrap() > 0);
    assert_eq!(
        ram["used"].as_u64().unwrap() + ram["free"].as_u64().unwrap(),
        ram["total"].as_u64().unwrap()
    );
    assert!(memory["cuda"]["error"].is_string());

    // Routes we lack: a JSON 404 that says so, whatever the method.
    for (method, path) in [
        ("GET", "/sdapi/v1/extensions"),
        ("POST", "/sdapi/v1/extra-single-image"),
        ("GET", "/sdapi/v1/"),
        ("DELETE", "/sdapi/v2/anything"),
    ] {
        let r = app.request(method, path, Some(b"{}"));
        assert_eq!(r.status, 404, "{method} {path}");
        let v = r.json();
        assert_eq!(v["detail"], "Not Found");
        let msg = v["errors"].as_str().unwrap();
        assert!(
            msg.contains(&format!("does not implement {method} {path}")),
            "{msg}"
        );
    }
    // An extension's route outside /sdapi (ControlNet's), both methods.
    for method in ["GET", "POST"] {
        let r = app.request(method, "/controlnet/model_list", Some(b"{}"));
        assert_eq!(r.status, 404);
        assert!(
            String::from_utf8_lossy(&r.body).contains("does not implement"),
            "{}",
            String::from_utf8_lossy(&r.body)
        );
    }
}

#[test]
fn a_lora_the_daemon_trains_is_listed_at_once_and_applies_by_tag() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    fluxlora::train::shapes::write_dataset(&data, 2, 64, 4).unwrap();
    let app = spawn_app(
        &tmp.path().join("state"),
        vec![tmp.path().to_path_buf()],
        "127.0.0.1",
        None,
    );
    let id = app.submit(
        "/v1/jobs/train",
        &json!({
            "output_name": "trained-style",
            "max_train_steps": 400,
            "sample_every_n_steps": 1000,
            "sample_prompts": ["a red circle --w 32 --h 32 --s 2"],
            "learning_rate": 0.01,
            "dataset": {"folders": [data], "resolution": 64, "enable_bucket": false},
            "network": {"rank": 4, "alpha": 4.0}
        }),
    );
    // A training job shows in /progress: paused, so the answer holds still.
    progress_until(&app, "training steps", |p| {
        p["state"]["job"] == "Training trained-style"
            && p["state"]["sampling_step"].as_u64().unwrap_or(0) >= 2
    });
    assert_eq!(
        app.post(&format!("/v1/jobs/{id}/pause"), &json!({})).status,
        200
    );
    let p = progress_until(&app, "paused training", |p| {
        p["textinfo"]
            .as_str()
            .is_some_and(|t| t.starts_with("Paused at step "))
    });
    let step = p["state"]["sampling_step"].as_u64().unwrap();
    assert_eq!(p["state"]["sampling_steps"], 400);
    assert!((p["progress"].as_f64().unwrap() - step as f64 / 400.0).abs() < 1e-9);
    assert_eq!(p["state"]["job_count"], 1);
    // The step-0 sample preview is the current image.
    let preview = base64::engine::general_purpose::STANDARD
        .decode(p["current_image"].as_str().expect("a preview"))
        .unwrap();
    assert_eq!(pixels(&preview).width(), 32);
    assert_eq!(
        app.post(&format!("/v1/jobs/{id}/resume"), &json!({}))
            .status,
        200
    );
    assert_eq!(app.wait_finished(&id)["state"], "finished");

    // Listed at once, without a refresh, with its kohya metadata.
    let loras = app.get("/sdapi/v1/loras").json();
    let listed = loras
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == "trained-style")
        .unwrap_or_else(|| panic!("not listed: {loras}"));
    assert_eq!(listed["metadata"]["ss_output_name"], "trained-style");
    assert_eq!(listed["metadata"]["ss_network_dim"], "4");

    let plain = txt2img(
        &app,
        &payload("a red circle", json!({"seed": 5, "cfg_scale": 1})),
    );
    let tagged = txt2img(
        &app,
        &payload(
            "a red circle <lora:trained-style:0.8>",
            json!({"seed": 5, "cfg_scale": 1}),
        ),
    );
    assert!(
        max_pixel_diff(&plain.pngs[0], &tagged.pngs[0]) > 2,
        "the trained LoRA changes the image"
    );
    // The same through /v1 (webuiapi's "Euler a" with "automatic" is
    // euler_ancestral over the simple schedule): the same pixels.
    let sid = app.submit(
        "/v1/jobs/sample",
        &json!({
            "request": {"prompt": "a red circle", "width": 64, "height": 64, "steps": 3,
                        "guidance": 3.5, "cfg_scale": 1, "seed": 5,
                        "sampler": "euler_ancestral", "scheduler": "simple"},
            "loras": [{"path": "trained-style.safetensors", "strength": 0.8}],
        }),
    );
    let job = app.wait_finished(&sid);
    let native = std::fs::read(job["outputs"][0].as_str().unwrap()).unwrap();
    assert_eq!(max_pixel_diff(&native, &tagged.pngs[0]), 0);
}

#[test]
fn img2img_at_denoise_zero_is_the_vae_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let app = spawn_app(tmp.path(), vec![], "127.0.0.1", None);
    let start = txt2img(
        &app,
        &payload("a blue square", json!({"seed": 8, "cfg_scale": 1})),
    );
    let b64 = base64::engine::general_purpose::STANDARD.encode(&start.pngs[0]);
    let mut body = payload("anything", json!({"seed": 2, "cfg_scale": 1}));
    body["init_images"] = json!([b64]);
    body["denoising_strength"] = json!(0.0);
    let r = app.post("/sdapi/v1/img2img", &body);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let png = base64::engine::general_purpose::STANDARD
        .decode(r.json()["images"][0].as_str().unwrap())
        .unwrap();
    // /v1 with the same start image at denoise 0 (the sampling core's test shows
    // that this is the VAE's encode-decode round trip): the same pixels.
    let init = tmp.path().join("start.png");
    std::fs::write(&init, &start.pngs[0]).unwrap();
    let sid = app.submit(
        "/v1/jobs/sample",
        &json!({"request": {"prompt": "anything", "width": 64, "height": 64, "steps": 3,
                            "cfg_scale": 1, "seed": 2, "init_image": init, "denoise": 0.0}}),
    );
    let job = app.wait_finished(&sid);
    let native = std::fs::read(job["outputs"][0].as_str().unwrap()).unwrap();
    assert_eq!(max_pixel_diff(&native, &png), 0);
    assert!(
        max_pixel_diff(&png, &start.pngs[0]) > 0,
        "the tiny VAE's round trip is not the identity"
    );
}
