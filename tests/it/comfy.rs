//! The ComfyUI dialect on the real server: discovery routes, both bare and
//! under `/api/`; the official websocket example's flow on
//! `examples/comfyui/train_and_sample.json` (train, apply, sample, save);
//! the output cache across prompts; invalid graphs; interrupt and resume;
//! `/view` and `/upload/image` confined to ComfyUI's folders.

use serde_json::{json, Value};

use crate::support::app::{next_frame, spawn_app, App, Frame, Ws};

fn app() -> (tempfile::TempDir, App) {
    let tmp = tempfile::tempdir().unwrap();
    let app = spawn_app(&tmp.path().join("data"), vec![], "127.0.0.1", None);
    (tmp, app)
}

#[test]
fn discovery_routes_answer_bare_and_under_api() {
    let (_tmp, app) = app();
    for prefix in ["", "/api"] {
        let info = app.get(&format!("{prefix}/object_info"));
        assert_eq!(info.status, 200);
        let info = info.json();
        for class in [
            "FluxLoraTrain",
            "FluxLoraApply",
            "FluxLoraLiveAdapter",
            "FluxLoraSample",
            "SaveImage",
            "LoadImage",
        ] {
            assert_eq!(info[class]["name"], class, "{prefix}");
        }
        let one = app
            .get(&format!("{prefix}/object_info/FluxLoraSample"))
            .json();
        assert_eq!(one.as_object().unwrap().len(), 1);
        assert_eq!(one["FluxLoraSample"]["display_name"], "Flux Sample");
        // An unknown class is 200 `{}` in ComfyUI, not 404.
        let none = app.get(&format!("{prefix}/object_info/NoSuchNode"));
        assert_eq!((none.status, none.json()), (200, serde_json::json!({})));
        let stats = app.get(&format!("{prefix}/system_stats")).json();
        assert!(stats["system"]["os"].is_string(), "{stats}");
        assert_eq!(stats["devices"][0]["type"], "cpu");
        assert_eq!(
            app.get(&format!("{prefix}/embeddings")).json(),
            serde_json::json!([])
        );
        // Our front-end extension (the checkout's js/, found from the working directory).
        let extensions = app.get(&format!("{prefix}/extensions")).json();
        assert!(
            extensions
                .as_array()
                .unwrap()
                .contains(&Value::from("/extensions/fluxlora/fluxlora.js")),
            "{extensions}"
        );
        let features = app.get(&format!("{prefix}/features")).json();
        assert!(features["max_upload_size"].as_u64().unwrap() > 0);
        let folders = app.get(&format!("{prefix}/models")).json();
        assert!(folders.as_array().unwrap().contains(&Value::from("loras")));
        assert_eq!(
            app.get(&format!("{prefix}/models/loras")).json(),
            serde_json::json!([])
        );
        assert_eq!(app.get(&format!("{prefix}/models/nope")).status, 404);
    }
}

#[test]
fn view_serves_files_of_its_folders_and_refuses_escapes() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let app = spawn_app(&data, vec![], "127.0.0.1", None);
    std::fs::create_dir_all(data.join("output/sub")).unwrap();
    std::fs::write(data.join("output/sub/a.png"), b"\x89PNG fake").unwrap();
    std::fs::write(data.join("output/b.png"), b"b").unwrap();
    std::fs::write(data.join("secret.txt"), b"secret").unwrap();
    let ok = app.get("/view?filename=a.png&subfolder=sub&type=output");
    assert_eq!(ok.status, 200);
    assert_eq!(ok.body, b"\x89PNG fake");
    assert_eq!(ok.content_type, "image/png");
    assert_eq!(
        ok.header("x-content-type-options").as_deref(),
        Some("nosniff")
    );
    assert_eq!(app.get("/api/view?filename=b.png").body, b"b");
    for (query, status) in [
        ("filename=..%2Fsecret.txt", 400),
        ("filename=%2E%2E%2Fsecret.txt", 400),
        ("filename=../secret.txt", 400),
        ("filename=/etc/passwd", 400),
        ("filename=%2Fetc%2Fpasswd", 400),
        ("filename=", 400),
        ("filename=b.png&type=models", 400),
        ("filename=secret.txt&subfolder=..", 403),
        ("filename=secret.txt&subfolder=%2E%2E", 403),
        ("filename=passwd&subfolder=/etc", 403),
        ("filename=secret.txt&subfolder=sub/../..", 403),
        ("filename=nope.png", 404),
        ("type=output", 404),
    ] {
        let r = app.get(&format!("/view?{query}"));
        assert_eq!(
            r.status,
            status,
            "{query}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert!(!r.body.starts_with(b"secret"), "{query}");
    }
    // The daemon still answers.
    assert_eq!(app.get("/object_info").status, 200);
}

/// The sampler without LoRAs.
fn sampler() -> Value {
    json!({"class_type": "FluxLoraSample", "inputs": {
        "prompt": "a red circle", "width": 64, "height": 64, "steps": 2,
        "guidance": 0.0, "seed": 1, "batch_size": 1}})
}

fn loader(lora: &str, chain: Option<&str>) -> Value {
    let mut inputs = json!({"lora_name": lora, "strength": 1.0});
    if let Some(source) = chain {
        inputs["loras"] = json!([source, 0]);
    }
    json!({"class_type": "FluxLoraApply", "inputs": inputs})
}

#[test]
fn invalid_graphs_get_comfyui_shaped_400s_and_nothing_runs() {
    let (_tmp, app) = app();
    let with = |edit: &dyn Fn(&mut Value)| {
        let mut prompt = json!({
            "1": sampler(),
            "9": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "t"}},
        });
        edit(&mut prompt);
        json!({"prompt": prompt, "client_id": "t"})
    };
    // (case, body, whole error type, (node, node error type))
    type Case = (
        &'static str,
        Value,
        &'static str,
        Option<(&'static str, &'static str)>,
    );
    let cases: Vec<Case> = vec![
        ("no prompt", json!({"client_id": "t"}), "no_prompt", None),
        (
            "unknown class",
            with(&|p| p["2"] = json!({"class_type": "NoSuchNode", "inputs": {}})),
            "missing_node_type",
            None,
        ),
        (
            "no output node",
            json!({"prompt": {"2": loader("x", None)}}),
            "prompt_no_outputs",
            None,
        ),
        (
            "required input missing",
            with(&|p| {
                p["1"]["inputs"].as_object_mut().unwrap().remove("prompt");
            }),
            "prompt_outputs_failed_validation",
            Some(("1", "required_input_missing")),
        ),
        (
            "link to a missing node",
            with(&|p| p["1"]["inputs"]["loras"] = json!(["99", 0])),
            "prompt_outputs_failed_validation",
            Some(("1", "exception_during_inner_validation")),
        ),
        (
            "link to a missing output",
            with(&|p| {
                p["2"] = loader("x", None);
                p["1"]["inputs"]["loras"] = json!(["2", 3]);
            }),
            "prompt_outputs_failed_validation",
            Some(("1", "exception_during_inner_validation")),
        ),
        (
            "link to a missing node from an output node",
            with(&|p| p["9"]["inputs"]["images"] = json!(["99", 0])),
            "prompt_outputs_failed_validation",
            Some(("9", "exception_during_validation")),
        ),
        (
            "link of the wrong type",
            with(&|p| {
                p["2"] = loader("x", None);
                p["1"]["inputs"]["prompt"] = json!(["2", 0]);
            }),
            "prompt_outputs_failed_validation",
            Some(("1", "return_type_mismatch")),
        ),
        (
            "INT above max",
            with(&|p| p["1"]["inputs"]["width"] = json!(5000)),
            "prompt_outputs_failed_validation",
            Some(("1", "value_bigger_than_max")),
        ),
        (
            "INT below min",
            with(&|p| p["1"]["inputs"]["batch_size"] = json!(0)),
            "prompt_outputs_failed_validation",
            Some(("1", "value_smaller_than_min")),
        ),
        (
            "not a number",
            with(&|p| p["1"]["inputs"]["steps"] = json!("many")),
            "prompt_outputs_failed_validation",
            Some(("1", "invalid_input_type")),
        ),
        (
            "LoRA not in the folder's list",
            with(&|p| {
                p["2"] = loader("nope.safetensors", None);
                p["1"]["inputs"]["loras"] = json!(["2", 0]);
            }),
            "prompt_outputs_failed_validation",
            Some(("2", "value_not_in_list")),
        ),
        (
            "cycle",
            with(&|p| {
                p["2"] = loader("x", Some("3"));
                p["3"] = loader("x", Some("2"));
                p["1"]["inputs"]["loras"] = json!(["2", 0]);
            }),
            "prompt_outputs_failed_validation",
            Some(("2", "dependency_cycle")),
        ),
    ];
    for prefix in ["", "/api"] {
        for (case, body, whole, node) in &cases {
            let r = app.post(&format!("{prefix}/prompt"), body);
            assert_eq!(
                r.status,
                400,
                "{case}: {}",
                String::from_utf8_lossy(&r.body)
            );
            let r = r.json();
            assert_eq!(r["error"]["type"], *whole, "{case}: {r}");
            for key in ["message", "details", "extra_info"] {
                assert!(!r["error"][key].is_null(), "{case}: {key}: {r}");
            }
            match node {
                None => assert_eq!(r["node_errors"], json!({}), "{case}: {r}"),
                Some((id, kind)) => {
                    let errors = &r["node_errors"][id];
                    assert!(
                        errors["errors"]
                            .as_array()
                            .is_some_and(|e| e.iter().any(|e| e["type"] == *kind)),
                        "{case}: {r}"
                    );
                    assert!(errors["class_type"].is_string(), "{case}: {r}");
                    assert!(errors["dependent_outputs"].is_array(), "{case}: {r}");
                }
            }
        }
    }
    // Nothing ran or queued, and the daemon still answers.
    assert_eq!(app.get("/v1/jobs").json(), json!([]));
    assert_eq!(
        app.get("/queue").json(),
        json!({"queue_running": [], "queue_pending": []})
    );
    assert_eq!(app.get("/history").json(), json!({}));
    assert_eq!(app.get("/object_info").status, 200);
}

fn example() -> Value {
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("examples/comfyui/train_and_sample.json"),
    )
    .unwrap();
    serde_json::from_str(&text).unwrap()
}

/// The text messages of one prompt on a `/ws` socket, up to `executing` with
/// node null for it (the official example's end signal), and the previews.
fn messages_until_done(ws: &mut Ws, prompt_id: &str) -> (Vec<Value>, Vec<Vec<u8>>) {
    let (mut messages, mut previews) = (vec![], vec![]);
    loop {
        match next_frame(ws) {
            Frame::Preview(p) => previews.push(p),
            Frame::Event(m) => {
                let done = m["type"] == "executing"
                    && m["data"]["node"].is_null()
                    && m["data"]["prompt_id"] == prompt_id;
                messages.push(m);
                if done {
                    return (messages, previews);
                }
            }
        }
    }
}

fn of_type<'m>(messages: &'m [Value], kind: &str) -> Vec<&'m Value> {
    messages
        .iter()
        .filter(|m| m["type"] == kind)
        .map(|m| &m["data"])
        .collect()
}

/// Queues `prompt` for `client`, waits for its end, returns (id, messages, previews, history entry).
fn run_prompt(
    app: &App,
    ws: &mut Ws,
    client: &str,
    prompt: &Value,
) -> (String, Vec<Value>, Vec<Vec<u8>>, Value) {
    let r = app.post("/prompt", &json!({"prompt": prompt, "client_id": client}));
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let r = r.json();
    assert_eq!(r["node_errors"], json!({}), "{r}");
    let id = r["prompt_id"].as_str().unwrap().to_string();
    let (messages, previews) = messages_until_done(ws, &id);
    let history = app.get(&format!("/history/{id}")).json();
    (id.clone(), messages, previews, history[&id].clone())
}

/// The saved images of a history entry's outputs, fetched with `/view`.
fn saved_images(app: &App, entry: &Value) -> Vec<Vec<u8>> {
    let mut images = vec![];
    for output in entry["outputs"].as_object().unwrap().values() {
        for image in output["images"].as_array().into_iter().flatten() {
            let r = app.get(&format!(
                "/view?filename={}&subfolder={}&type={}",
                image["filename"].as_str().unwrap(),
                image["subfolder"].as_str().unwrap(),
                image["type"].as_str().unwrap()
            ));
            assert_eq!(r.status, 200);
            assert_eq!(r.content_type, "image/png");
            images.push(r.body);
        }
    }
    images
}

fn train_jobs(app: &App) -> Vec<Value> {
    app.get("/v1/jobs?kind=train")
        .json()
        .as_array()
        .unwrap()
        .clone()
}

#[test]
fn the_websocket_example_flow_trains_applies_samples_and_caches() {
    let (tmp, app) = app();
    let client = "websocket-example";
    let mut ws = app.comfy_ws(client);
    // `status` with the socket's sid comes first.
    let Frame::Event(hello) = next_frame(&mut ws) else {
        panic!("a text message first")
    };
    assert_eq!(hello["type"], "status");
    assert_eq!(hello["data"]["sid"], client);
    assert_eq!(hello["data"]["status"]["exec_info"]["queue_remaining"], 0);
    // The feature-flags exchange.
    ws.send(tungstenite::Message::text(
        json!({"type": "feature_flags", "data": {"supports_preview_metadata": false}}).to_string(),
    ))
    .unwrap();

    let graph = example();
    let (id, messages, previews, entry) = run_prompt(&app, &mut ws, client, &graph);
    let flags = of_type(&messages, "feature_flags");
    assert_eq!(flags.len(), 1, "{messages:?}");
    assert!(flags[0]["max_upload_size"].as_u64().is_some());
    // ComfyUI's order: start, cached (none yet), the nodes, success, end.
    let kinds: Vec<&str> = messages
        .iter()
        .map(|m| m["type"].as_str().unwrap())
        .collect();
    let at = |k: &str| {
        kinds
            .iter()
            .position(|x| *x == k)
            .unwrap_or_else(|| panic!("no {k}: {kinds:?}"))
    };
    assert!(at("execution_start") < at("execution_cached"));
    assert!(at("execution_cached") < at("executing"));
    assert!(at("executed") < at("execution_success"), "{kinds:?}");
    assert_eq!(
        of_type(&messages, "execution_cached")[0]["nodes"],
        json!([])
    );
    let executing: Vec<&Value> = of_type(&messages, "executing")
        .into_iter()
        .map(|d| &d["node"])
        .collect();
    assert_eq!(
        executing,
        [
            &json!("1"),
            &json!("2"),
            &json!("3"),
            &json!("4"),
            &json!("5"),
            &json!("6"),
            &Value::Null
        ]
    );
    // The Train node's progress rises to max = the run's steps.
    let train_progress: Vec<(u64, u64)> = of_type(&messages, "progress")
        .into_iter()
        .filter(|p| p["node"] == "3" && p["prompt_id"] == id.as_str())
        .map(|p| (p["value"].as_u64().unwrap(), p["max"].as_u64().unwrap()))
        .collect();
    let steps: Vec<u64> = train_progress
        .iter()
        .filter(|(_, m)| *m == 20)
        .map(|(v, _)| *v)
        .collect();
    assert!(steps.windows(2).all(|w| w[0] <= w[1]), "{train_progress:?}");
    assert_eq!(steps.last(), Some(&20), "{train_progress:?}");
    assert!(steps.len() >= 20, "{train_progress:?}");
    // Our per-step message carries loss and lr.
    let train_steps = of_type(&messages, "fluxlora.train");
    assert_eq!(train_steps.len(), 20);
    assert!(train_steps
        .iter()
        .all(|s| s["loss"].as_f64().is_some_and(f64::is_finite) && s["node"] == "3"));
    // The run's sample images (steps 0, 10, 20) arrive as type 1 previews.
    assert!(previews.len() >= 3, "{} previews", previews.len());
    for p in &previews {
        assert_eq!(&p[..8], &[0, 0, 0, 1, 0, 0, 0, 2]);
        assert!(p[8..].starts_with(b"\x89PNG"));
    }
    // History: success, and Save Image's output; /view serves it.
    assert_eq!(entry["status"]["status_str"], "success");
    assert_eq!(entry["status"]["completed"], true);
    assert_eq!(entry["prompt"][1], id.as_str());
    let saved = &entry["outputs"]["6"]["images"];
    assert_eq!(saved[0]["type"], "output");
    assert_eq!(saved[0]["subfolder"], "fluxlora");
    assert_eq!(saved[0]["filename"], "zorbly_00001_.png");
    let with_lora = saved_images(&app, &entry);
    assert_eq!(with_lora.len(), 1);
    assert!(tmp
        .path()
        .join("data/output/fluxlora/zorbly_00001_.png")
        .is_file());
    assert_eq!(train_jobs(&app).len(), 1);
    assert_eq!(train_jobs(&app)[0]["state"], "finished");

    // The same graph without Apply LoRA: training is cached, the image differs.
    let mut base = graph.clone();
    base.as_object_mut().unwrap().remove("4");
    base["5"]["inputs"].as_object_mut().unwrap().remove("loras");
    let (_, messages, _, entry) = run_prompt(&app, &mut ws, client, &base);
    let cached = &of_type(&messages, "execution_cached")[0]["nodes"];
    assert!(cached.as_array().unwrap().contains(&json!("3")), "{cached}");
    let without_lora = saved_images(&app, &entry);
    assert_ne!(with_lora, without_lora, "the LoRA changes the image");
    // The cached Train node still reports its result.
    assert_eq!(
        entry["outputs"]["3"]["job_id"][0],
        train_jobs(&app)[0]["id"]
    );

    // The same graph again: everything is cached, no new training job.
    let (_, messages, _, entry) = run_prompt(&app, &mut ws, client, &graph);
    let cached = &of_type(&messages, "execution_cached")[0]["nodes"];
    for node in ["1", "2", "3", "4", "5", "6"] {
        assert!(
            cached.as_array().unwrap().contains(&json!(node)),
            "{node}: {cached}"
        );
    }
    assert!(of_type(&messages, "progress")
        .iter()
        .all(|p| p["node"] != "3"));
    assert_eq!(train_jobs(&app).len(), 1, "no new training job");
    assert_eq!(
        saved_images(&app, &entry),
        with_lora,
        "cached outputs re-sent"
    );

    // The queue and history views.
    assert_eq!(
        app.get("/prompt").json(),
        json!({"exec_info": {"queue_remaining": 0}})
    );
    assert_eq!(app.get("/history").json().as_object().unwrap().len(), 3);
    assert_eq!(
        app.get("/history?max_items=1")
            .json()
            .as_object()
            .unwrap()
            .len(),
        1
    );
    let jobs = app.get("/api/jobs").json();
    assert_eq!(jobs["pagination"]["total"], 3);
    assert_eq!(jobs["jobs"][0]["status"], "completed");
    let job = app.get(&format!("/api/jobs/{id}")).json();
    assert_eq!(job["outputs"]["6"], json!({"images": [saved[0].clone()]}));
    assert_eq!(app.get("/api/jobs/nope").status, 404);
    assert_eq!(
        app.request("POST", "/history", Some(br#"{"delete": []}"#))
            .status,
        200
    );
    assert_eq!(
        app.request("POST", "/history", Some(br#"{"clear": true}"#))
            .status,
        200
    );
    assert_eq!(app.get("/history").json(), json!({}));

    // One node through the bridge's route: its outputs come back as values.
    let run = app.post(
        "/fluxlora/run",
        &json!({"class_type": "FluxLoraSample", "client_id": client, "inputs": sampler()["inputs"]}),
    );
    assert_eq!(run.status, 200, "{}", String::from_utf8_lossy(&run.body));
    let image = &run.json()["outputs"][0][0];
    assert_eq!(image["type"], "temp");
    let bad = app.post(
        "/fluxlora/run",
        &json!({"class_type": "FluxLoraSample", "inputs": {}}),
    );
    assert_eq!(bad.status, 400);
    assert_eq!(
        bad.json()["error"]["type"],
        "prompt_outputs_failed_validation"
    );
}

#[test]
fn interrupt_cancels_training_and_queueing_again_resumes_it() {
    let (_tmp, app) = app();
    let client = "interrupt";
    let mut ws = app.comfy_ws(client);
    let mut graph = example();
    graph["3"]["inputs"]["max_train_steps"] = json!(100_000);
    graph["2"]["inputs"]["save_every_n_steps"] = json!(2);
    let r = app
        .post("/prompt", &json!({"prompt": graph, "client_id": client}))
        .json();
    let id = r["prompt_id"].as_str().unwrap().to_string();
    // Wait for a few steps, then interrupt.
    loop {
        if let Frame::Event(m) = next_frame(&mut ws) {
            if m["type"] == "fluxlora.train" && m["data"]["step"].as_u64() >= Some(3) {
                break;
            }
        }
    }
    assert_eq!(app.get("/queue").json()["queue_running"][0][1], id.as_str());
    // While it trains, a graph that samples the live adapter runs beside it.
    let job = train_jobs(&app)[0]["id"].as_str().unwrap().to_string();
    let mut sample = sampler();
    sample["inputs"]["loras"] = json!(["2", 0]);
    let live = json!({
        "1": sample,
        "2": {"class_type": "FluxLoraLiveAdapter", "inputs": {"job_id": job, "strength": 1.0}},
        "3": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
    });
    let (live_id, messages, _, entry) = run_prompt(&app, &mut ws, client, &live);
    assert_eq!(entry["status"]["status_str"], "success", "{messages:?}");
    assert_eq!(entry["outputs"]["3"]["images"][0]["type"], "temp");
    assert_eq!(train_jobs(&app)[0]["state"], "running", "still training");
    // The live adapter is never cached: queued again, it samples again.
    let (_, messages, _, _) = run_prompt(&app, &mut ws, client, &live);
    let cached = &of_type(&messages, "execution_cached")[0]["nodes"];
    assert!(
        !cached.as_array().unwrap().contains(&json!("2")),
        "{cached}"
    );
    assert_ne!(live_id, id);
    assert_eq!(app.request("POST", "/interrupt", None).status, 200);
    let (messages, _) = messages_until_done(&mut ws, &id);
    let interrupted = of_type(&messages, "execution_interrupted");
    assert_eq!(interrupted.len(), 1, "{messages:?}");
    assert_eq!(interrupted[0]["node_id"], "3");
    assert_eq!(interrupted[0]["node_type"], "FluxLoraTrain");
    let entry = &app.get(&format!("/history/{id}")).json()[&id];
    assert_eq!(entry["status"]["status_str"], "error");
    let jobs = train_jobs(&app);
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0]["state"], "cancelled");
    assert_eq!(
        app.get(&format!("/api/jobs/{id}")).json()["status"],
        "cancelled"
    );
    let statuses = app.get("/api/jobs?status=cancelled").json();
    assert_eq!(statuses["jobs"].as_array().unwrap().len(), 1, "{statuses}");
    assert_eq!(app.get("/api/jobs?status=sideways").status, 400);

    // Queued again: the same job resumes from its last save.
    let r = app
        .post("/prompt", &json!({"prompt": graph, "client_id": client}))
        .json();
    let again = r["prompt_id"].as_str().unwrap().to_string();
    let resumed_from = loop {
        if let Frame::Event(m) = next_frame(&mut ws) {
            if m["type"] == "fluxlora.train" {
                break m["data"]["step"].as_u64().unwrap();
            }
        }
    };
    assert!(
        resumed_from > 1,
        "resumed, not restarted: first step {resumed_from}"
    );
    let jobs = train_jobs(&app);
    assert_eq!(jobs.len(), 1, "no new training job");
    assert_eq!(jobs[0]["state"], "running");
    // Interrupting a prompt that is not running changes nothing; this one stops.
    assert_eq!(
        app.post("/interrupt", &json!({"prompt_id": id})).status,
        200
    );
    assert_eq!(
        app.post("/interrupt", &json!({"prompt_id": again})).status,
        200
    );
    let (messages, _) = messages_until_done(&mut ws, &again);
    assert_eq!(of_type(&messages, "execution_interrupted").len(), 1);
}

/// A multipart body with one file field `image` and text fields.
fn multipart(filename: &str, bytes: &[u8], fields: &[(&str, &str)]) -> (String, Vec<u8>) {
    let boundary = "----fluxloraTestBoundary7MA4YWxk";
    let mut body = vec![];
    for (name, value) in fields {
        body.extend_from_slice(
            format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n").as_bytes(),
        );
    }
    body.extend_from_slice(
        format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{filename}\"\r\nContent-Type: image/png\r\n\r\n"
        )
        .as_bytes(),
    );
    body.extend_from_slice(bytes);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

fn png(side: u32, shade: u8) -> Vec<u8> {
    let image = image::RgbImage::from_pixel(side, side, image::Rgb([shade, 0, 0]));
    let mut out = std::io::Cursor::new(vec![]);
    image.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

#[test]
fn uploads_are_checked_confined_and_loadable() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let app = spawn_app(&data, vec![], "127.0.0.1", None);
    let upload = |filename: &str, bytes: &[u8], fields: &[(&str, &str)]| {
        let (content_type, body) = multipart(filename, bytes, fields);
        app.request_with(
            "POST",
            "/upload/image",
            Some(&body),
            &[("Content-Type", &content_type)],
        )
    };
    let ok = upload("red.png", &png(32, 200), &[("subfolder", "mine")]);
    assert_eq!(ok.status, 200, "{}", String::from_utf8_lossy(&ok.body));
    assert_eq!(
        ok.json(),
        json!({"name": "red.png", "subfolder": "mine", "type": "input"})
    );
    assert!(data.join("input/mine/red.png").is_file());
    // The same bytes again: the same name; other bytes: numbered.
    assert_eq!(
        upload("red.png", &png(32, 200), &[("subfolder", "mine")]).json()["name"],
        "red.png"
    );
    assert_eq!(
        upload("red.png", &png(32, 100), &[("subfolder", "mine")]).json()["name"],
        "red (1).png"
    );
    let replaced = upload(
        "red.png",
        &png(32, 50),
        &[("subfolder", "mine"), ("overwrite", "true")],
    );
    assert_eq!(replaced.json()["name"], "red.png");
    // Served back by /view, listed for Load Image.
    assert_eq!(
        app.get("/view?filename=red.png&subfolder=mine&type=input")
            .body,
        png(32, 50)
    );
    assert_eq!(upload("top.png", &png(16, 9), &[]).status, 200);
    let info = app.get("/object_info/LoadImage").json();
    assert_eq!(
        info["LoadImage"]["input"]["required"]["image"][0],
        json!(["top.png"])
    );
    // Load Image → Preview Image runs; a file in a subfolder is not in the list.
    let mut ws = app.comfy_ws("uploads");
    for name in ["top.png", "mine/red.png"] {
        let graph = json!({
            "1": {"class_type": "LoadImage", "inputs": {"image": name}},
            "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
        });
        let r = app.post("/prompt", &json!({"prompt": graph, "client_id": "uploads"}));
        if name.contains('/') {
            assert_eq!(r.status, 400, "top-level files only, as in ComfyUI");
            continue;
        }
        let id = r.json()["prompt_id"].as_str().unwrap().to_string();
        messages_until_done(&mut ws, &id);
        let entry = &app.get(&format!("/history/{id}")).json()[&id];
        assert_eq!(entry["status"]["status_str"], "success", "{entry}");
        let shown = saved_images(&app, entry);
        assert_eq!(image::load_from_memory(&shown[0]).unwrap().width(), 16);
    }
    // img2img from a loaded image: Load Image → Flux Sample (image, denoise) → Preview.
    let mut sample = sampler();
    sample["inputs"]["image"] = json!(["1", 0]);
    sample["inputs"]["denoise"] = json!(0.5);
    let graph = json!({
        "1": {"class_type": "LoadImage", "inputs": {"image": "top.png"}},
        "2": sample,
        "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}},
    });
    let r = app.post("/prompt", &json!({"prompt": graph, "client_id": "uploads"}));
    let id = r.json()["prompt_id"].as_str().unwrap().to_string();
    messages_until_done(&mut ws, &id);
    let entry = &app.get(&format!("/history/{id}")).json()[&id];
    assert_eq!(entry["status"]["status_str"], "success", "{entry}");
    let shown = saved_images(&app, entry);
    assert_eq!(image::load_from_memory(&shown[0]).unwrap().width(), 64);
    let job = app.get("/v1/jobs?kind=sample").json()[0].clone();
    assert_eq!(job["request"]["request"]["denoise"], 0.5);
    assert!(job["request"]["request"]["init_image"]
        .as_str()
        .unwrap()
        .ends_with("top.png"));

    std::fs::write(data.join("secret.png"), png(8, 1)).unwrap();
    for (case, filename, bytes, fields, status) in [
        ("not an image", "x.png", b"not a png".to_vec(), vec![], 400),
        ("truncated", "x.png", png(32, 1)[..50].to_vec(), vec![], 400),
        (
            "climbing subfolder",
            "x.png",
            png(8, 1),
            vec![("subfolder", "..")],
            400,
        ),
        (
            "absolute subfolder",
            "x.png",
            png(8, 1),
            vec![("subfolder", "/tmp")],
            400,
        ),
        (
            "nested climb",
            "x.png",
            png(8, 1),
            vec![("subfolder", "a/../../..")],
            400,
        ),
        (
            "unknown type",
            "x.png",
            png(8, 1),
            vec![("type", "models")],
            400,
        ),
        ("hidden name", ".x.png", png(8, 1), vec![], 400),
    ] {
        let r = upload(filename, &bytes, &fields);
        assert_eq!(
            r.status,
            status,
            "{case}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert!(r.json()["error"]["message"].is_string(), "{case}");
    }
    // A name with a path is refused (as ComfyUI refuses one that leaves the
    // folder), and nothing is written anywhere.
    for name in ["../../secret.png", "sub/secret.png", "..\\secret.png"] {
        let r = upload(name, &png(8, 2), &[]);
        assert_eq!(r.status, 400, "{name}");
        assert!(r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("plain file name"));
    }
    assert_eq!(
        std::fs::read(data.join("secret.png")).unwrap(),
        png(8, 1),
        "untouched"
    );
    assert!(!data.join("input/secret.png").exists());
    // No image field; not multipart.
    let (ct, body) = multipart("x.png", &png(8, 1), &[]);
    let renamed = String::from_utf8_lossy(&body).replace("name=\"image\"", "name=\"file\"");
    let r = app.request_with(
        "POST",
        "/upload/image",
        Some(renamed.as_bytes()),
        &[("Content-Type", &ct)],
    );
    assert_eq!(r.status, 400);
    let r = app.request("POST", "/upload/image", Some(b"{}"));
    assert_eq!(r.status, 400);
    // Nothing half-written is left in the folder, and the daemon answers.
    let leftovers: Vec<_> = std::fs::read_dir(data.join("input"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
        .collect();
    assert!(leftovers.is_empty());
    assert_eq!(app.get("/object_info").status, 200);
}

#[test]
fn the_sample_node_runs_the_chosen_sampler_and_schedule() {
    let (_tmp, app) = app();
    let mut ws = app.comfy_ws("samplers");
    next_frame(&mut ws); // status
    let graph = |sampler_name: &str, scheduler: &str| {
        let mut sample = sampler();
        sample["inputs"]["sampler_name"] = json!(sampler_name);
        sample["inputs"]["scheduler"] = json!(scheduler);
        json!({
            "1": sample,
            "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
        })
    };
    let (_, _, _, entry) = run_prompt(&app, &mut ws, "samplers", &graph("euler_ancestral", "beta"));
    assert_eq!(entry["status"]["status_str"], "success", "{entry}");
    let ancestral = saved_images(&app, &entry);
    let job = newest_sample_job(&app);
    assert_eq!(job["request"]["request"]["sampler"], "euler_ancestral");
    assert_eq!(job["request"]["request"]["scheduler"], "beta");
    // Without the optional inputs: Euler over the simple schedule, another image.
    let (_, _, _, entry) = run_prompt(
        &app,
        &mut ws,
        "samplers",
        &json!({
            "1": sampler(),
            "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
        }),
    );
    assert_ne!(saved_images(&app, &entry), ancestral);
    let job = newest_sample_job(&app);
    assert_eq!(job["request"]["request"]["sampler"], "euler");
    // A name outside the combo is ComfyUI's validation error.
    let r = app.post(
        "/prompt",
        &json!({"prompt": graph("lms", "simple"), "client_id": "samplers"}),
    );
    assert_eq!(r.status, 400);
    let errors = r.json()["node_errors"]["1"]["errors"].clone();
    assert!(errors.to_string().contains("'lms' not in"), "{errors}");
}

/// The newest sample job (the list is oldest first).
fn newest_sample_job(app: &App) -> Value {
    let jobs = app.get("/v1/jobs?kind=sample").json();
    jobs.as_array()
        .and_then(|j| j.last())
        .cloned()
        .expect("a sample job")
}
