//! The HTTP and WebSocket API against the real server on an ephemeral port, driven
//! like `curl` and a WebSocket client: a training job end to end with its events
//! streamed, sampling with its LoRA and with the live adapter during training, bad
//! input answered with 4xx JSON errors while the server keeps answering, a client
//! that never reads, the token and origin checks, and a restart of the real
//! process in the middle of training.

use std::net::SocketAddr;
use std::path::Path;

use candle_core::Device;
use fluxlora::config::Settings;
use fluxlora::server;
use serde_json::{json, Value};
use tungstenite::Message;

use crate::support;
use crate::support::app::{
    events_until, frames_until, is_end_of, next_frame, silent_ws_client, small_buffer_stream,
    spawn_app, spawn_app_on, spawn_process, App, Frame, Response,
};

/// A server on loopback whose roots hold a folder of `images` generated shape
/// images (`data`), with its state beside it.
fn app_with_dataset(images: usize, seed: u64) -> (tempfile::TempDir, std::path::PathBuf, App) {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    fluxlora::train::shapes::write_dataset(&data, images, 64, seed).unwrap();
    let app = spawn_app(
        &tmp.path().join("state"),
        vec![tmp.path().to_path_buf()],
        "127.0.0.1",
        None,
    );
    (tmp, data, app)
}

fn train_body(data: &Path) -> Value {
    json!({
        "output_name": "api",
        "max_train_steps": 4,
        "save_every_n_steps": 2,
        "sample_every_n_steps": 2,
        "sample_prompts": ["a red circle on a blue background --w 32 --h 32 --s 2"],
        "learning_rate": 0.001,
        "dataset": {"folders": [data], "resolution": 64, "enable_bucket": false},
        "network": {"rank": 2, "alpha": 2.0}
    })
}

#[test]
fn curl_flow_train_then_sample_with_the_lora() {
    let (_tmp, data, app) = app_with_dataset(3, 1);

    let mut ws = app.ws("");
    let Frame::Event(hello) = next_frame(&mut ws) else {
        panic!("the first frame is the hello")
    };
    assert_eq!(hello["type"], "hello");
    // The server answers a ping with a pong carrying its payload.
    ws.send(Message::Ping(b"are you there".to_vec().into()))
        .unwrap();
    match ws.read().unwrap() {
        Message::Pong(p) => assert_eq!(&p[..], b"are you there"),
        other => panic!("expected a pong, got {other:?}"),
    }
    let id = app.submit("/v1/jobs/train", &train_body(&data));

    // The WebSocket streams the run: increasing sequence numbers, kinds in order,
    // and the run's preview images as binary frames.
    let (streamed, previews) = frames_until(&mut ws, is_end_of(&id));
    let preview_steps: Vec<u32> = previews.iter().map(|p| p.1).collect();
    assert_eq!(preview_steps, vec![0, 2, 4]);
    for (job, _, png) in &previews {
        assert_eq!(job, &id);
        assert!(image::load_from_memory(png).is_ok());
    }
    let seqs: Vec<u64> = streamed
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    assert!(seqs[0] > hello["seq"].as_u64().unwrap());
    for e in &streamed {
        assert_eq!(e["job"], id.as_str());
        assert!(e["time"].as_f64().unwrap() > 1.7e9, "{e}");
        assert!(e["data"].is_object(), "{e}");
    }
    let kinds: Vec<&str> = streamed
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    let first = |k: &str| {
        kinds
            .iter()
            .position(|x| *x == k)
            .unwrap_or_else(|| panic!("{k} missing from {kinds:?}"))
    };
    let order = ["started", "sample", "step", "saved", "finished"].map(first);
    assert!(order.windows(2).all(|w| w[0] < w[1]), "{kinds:?}");
    let steps: Vec<u64> = streamed
        .iter()
        .filter(|e| e["type"] == "step")
        .map(|e| e["data"]["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, vec![1, 2, 3, 4]);
    let job = app.get(&format!("/v1/jobs/{id}")).json();
    assert_eq!(job["state"], "finished", "{job}");
    // Files the events name come with URLs a remote client can fetch.
    let of = |kind: &str| streamed.iter().find(|e| e["type"] == kind).unwrap();
    let saved = app.get(of("saved")["data"]["url"].as_str().unwrap());
    assert_eq!(saved.status, 200);
    assert!(safetensors::SafeTensors::deserialize(&saved.body).is_ok());
    let sample = app.get(of("sample")["data"]["urls"][0].as_str().unwrap());
    assert_eq!(sample.content_type, "image/png");

    // The same events are stored; a client that reconnects with `since` gets the rest.
    let stored = app.get(&format!("/v1/jobs/{id}/events?since=0")).json();
    assert_eq!(stored.as_array().unwrap(), &streamed);
    let midway = seqs[seqs.len() / 2];
    let mut again = app.ws(&format!("jobs={id}&since={midway}"));
    assert!(matches!(next_frame(&mut again), Frame::Event(h) if h["type"] == "hello"));
    let replayed = events_until(&mut again, is_end_of(&id));
    assert_eq!(replayed, streamed[seqs.len() / 2 + 1..].to_vec());
    let lora = job["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p.as_str().unwrap().contains("loras"))
        .unwrap()
        .clone();
    let file = app.get(&format!("/v1/jobs/{id}/files/api.safetensors"));
    assert_eq!(file.status, 200);
    // The run's config is kept beside it, readable by `fluxlora train`.
    let config = app.get(&format!("/v1/jobs/{id}/files/config.json"));
    assert_eq!(config.content_type, "application/json");
    let config: fluxlora::train::config::TrainConfig =
        serde_json::from_slice(&config.body).unwrap();
    assert_eq!(config.max_train_steps, Some(4));
    // The stored request names the folder the run wrote to, not the default `output`.
    let job_dir = config.output_dir.clone();
    assert!(job_dir.ends_with(&id), "{}", job_dir.display());
    assert_eq!(job["request"]["output_dir"], job_dir.to_str().unwrap());
    for escape in [
        "../../state/jobs",
        "..%2F..%2Fdata%2F0000.txt",
        "%2E%2E/%2E%2E/data/0000.txt",
    ] {
        let r = app.get(&format!("/v1/jobs/{id}/files/{escape}"));
        assert!(r.status == 400 || r.status == 404, "{escape}: {}", r.status);
        assert!(r.json()["error"]["message"].is_string(), "{escape}");
    }

    assert!(lora.as_str().unwrap().ends_with("api.safetensors"));
    // A bare file name is found in the LoRA folder, as ComfyUI and A1111 name LoRAs.
    let body = json!({"request": {"prompt": "a red circle on a blue background", "steps": 3}, "loras": [{"path": "api.safetensors", "strength": 0.8}]});
    let png = app.post("/v1/sample", &body);
    assert_eq!(png.status, 200, "{}", String::from_utf8_lossy(&png.body));
    assert_eq!(png.content_type, "image/png");
    assert!(image::load_from_memory(&png.body).is_ok());
    let as_json = app.post("/v1/sample?format=json", &body).json();
    assert_eq!(as_json["images"].as_array().unwrap().len(), 1);

    // A queued sampling job streams its steps and binary previews.
    let sid = app.submit(
        "/v1/jobs/sample",
        &json!({"request": {"prompt": "a green square", "steps": 3}}),
    );
    let (events, previews) = frames_until(&mut ws, is_end_of(&sid));
    let kinds: Vec<&str> = events
        .iter()
        .filter(|e| e["job"] == sid.as_str())
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    let previews: Vec<_> = previews.into_iter().filter(|p| p.0 == sid).collect();
    assert_eq!(
        kinds.iter().filter(|k| **k == "sample_step").count(),
        3,
        "{kinds:?}"
    );
    assert!(kinds.contains(&"images"), "{kinds:?}");
    assert_eq!(previews.len(), 3);
    for (i, (job, step, png)) in previews.iter().enumerate() {
        assert_eq!(job, &sid);
        assert_eq!(*step as usize, i + 1);
        assert!(image::load_from_memory(png).is_ok());
    }

    // The job list filters by kind and state and keeps the newest N.
    let ids = |query: &str| -> Vec<String> {
        let jobs = app.get(&format!("/v1/jobs{query}")).json();
        jobs.as_array()
            .unwrap_or_else(|| panic!("{jobs}"))
            .iter()
            .map(|j| j["id"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(ids("?kind=train&state=finished"), vec![id.clone()]);
    assert_eq!(ids("?limit=1"), vec![sid.clone()]);
    assert_eq!(ids("").len(), 4);
    let r = app.get("/v1/jobs?state=exploded");
    assert_eq!(r.status, 400);
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("exploded"));

    // The LoRA folder lists the result and shows its kohya metadata.
    let loras = app.get("/v1/loras").json();
    assert_eq!(loras[0]["name"], "api.safetensors");
    let info = app.get("/v1/loras/api.safetensors").json();
    assert_eq!(info["format"], "kohya");
    assert_eq!(info["metadata"]["ss_network_dim"], "2");
    assert_eq!(app.get("/v1/loras/..%2Fjobs").status, 400);

    // A finished job can be deleted; it is then gone.
    assert_eq!(
        app.request("DELETE", &format!("/v1/jobs/{id}"), None)
            .status,
        204
    );
    assert_eq!(app.get(&format!("/v1/jobs/{id}")).status, 404);
}

#[test]
fn bad_input_gets_4xx_json_errors_and_the_server_keeps_answering() {
    let (tmp, data, app) = app_with_dataset(2, 2);
    let with = |f: &dyn Fn(&mut Value)| {
        let mut b = train_body(&data);
        f(&mut b);
        b
    };
    // A link in the LoRA folder to a file outside every root.
    let outside = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(outside.path(), b"not yours").unwrap();
    let loras = tmp.path().join("state/loras");
    std::fs::create_dir_all(&loras).unwrap();
    std::os::unix::fs::symlink(outside.path(), loras.join("link.safetensors")).unwrap();
    let cases: Vec<(&str, Response, u16, &str)> = vec![
        (
            "malformed JSON",
            app.request("POST", "/v1/jobs/train", Some(b"{\"max_train_steps\": ")),
            400,
            "invalid JSON",
        ),
        (
            "wrong type",
            app.post(
                "/v1/jobs/train",
                &with(&|b| b["max_train_steps"] = json!("ten")),
            ),
            400,
            "max_train_steps",
        ),
        (
            "unknown field",
            app.post("/v1/jobs/train", &with(&|b| b["lerning_rate"] = json!(1))),
            400,
            "lerning_rate",
        ),
        (
            "negative steps",
            app.post(
                "/v1/jobs/train",
                &with(&|b| b["max_train_steps"] = json!(-5)),
            ),
            400,
            "max_train_steps",
        ),
        (
            "zero steps",
            app.post(
                "/v1/jobs/train",
                &with(&|b| b["max_train_steps"] = json!(0)),
            ),
            400,
            "max_train_steps",
        ),
        (
            "missing dataset",
            app.post(
                "/v1/jobs/train",
                &with(&|b| b["dataset"]["folders"] = json!([tmp.path().join("nope")])),
            ),
            400,
            "nope",
        ),
        (
            "outside the roots",
            app.post(
                "/v1/jobs/train",
                &with(&|b| b["dataset"]["folders"] = json!(["/etc"])),
            ),
            400,
            "outside",
        ),
        (
            "file traversal",
            app.get("/v1/jobs/x/files/..%2F..%2Fetc%2Fpasswd"),
            404,
            "no job",
        ),
        ("unknown job", app.get("/v1/jobs/none"), 404, "no job"),
        (
            "unknown action",
            app.request("POST", "/v1/jobs/none/explode", None),
            404,
            "",
        ),
        (
            "oversized body",
            app.request("POST", "/v1/jobs/train", Some(&vec![b' '; 100 * 1024])),
            413,
            "limit",
        ),
        (
            "sample with a bad size",
            app.post(
                "/v1/sample",
                &json!({"request": {"prompt": "x", "width": 100}}),
            ),
            400,
            "width",
        ),
        (
            "queued sample with zero steps",
            app.post(
                "/v1/jobs/sample",
                &json!({"request": {"prompt": "x", "steps": 0}}),
            ),
            400,
            "steps must be between",
        ),
        (
            "LoRA with both a path and a live job",
            app.post(
                "/v1/jobs/sample",
                &json!({"request": {"prompt": "x"}, "loras": [{"path": "a.safetensors", "live_job": "j"}]}),
            ),
            400,
            "either a `path` or",
        ),
        (
            "unknown route",
            app.get("/v2/nothing"),
            404,
            "does not implement GET /v2/nothing",
        ),
        (
            "wrong method",
            app.request("PUT", "/v1/jobs", None),
            404,
            "does not implement PUT /v1/jobs",
        ),
        (
            "cache folder outside the roots",
            app.post(
                "/v1/jobs/train",
                &with(&|b| b["cache_dir"] = json!("/tmp/../etc/fluxlora-cache")),
            ),
            400,
            "..",
        ),
        (
            "validation folder outside the roots",
            app.post(
                "/v1/jobs/train",
                &with(&|b| b["validation_dataset"] = json!({"folders": ["/usr"]})),
            ),
            400,
            "outside",
        ),
        (
            "another base model",
            app.post(
                "/v1/jobs/train",
                &with(&|b| b["model"] = json!("/models/flux1-dev.safetensors")),
            ),
            400,
            "loaded model",
        ),
        (
            "WebSocket without upgrade",
            app.get("/v1/ws"),
            400,
            "WebSocket upgrade",
        ),
        (
            "training images too large",
            app.post(
                "/v1/jobs/train",
                &with(&|b| b["dataset"]["resolution"] = json!([65536, 65536])),
            ),
            400,
            "at most 4096",
        ),
        (
            "bucket size that would overflow",
            app.post(
                "/v1/jobs/train",
                &with(&|b| {
                    b["dataset"]["enable_bucket"] = json!(true);
                    b["dataset"]["max_bucket_reso"] = json!(u32::MAX);
                }),
            ),
            400,
            "more than 4096",
        ),
        (
            "LoRA linked from outside the roots",
            app.get("/v1/loras/link.safetensors"),
            400,
            "outside",
        ),
        (
            "a host name re-pointed at loopback (DNS rebinding)",
            app.request_with(
                "GET",
                "/v1/jobs",
                None,
                &[("Host", "rebound.example.com:7860")],
            ),
            403,
            "not this machine",
        ),
    ];
    for (what, r, status, needle) in cases {
        assert_eq!(
            r.status,
            status,
            "{what}: {}",
            String::from_utf8_lossy(&r.body)
        );
        let body = r.json();
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(needle), "{what}: {body}");
    }
    let r = app.post(
        "/v1/jobs/train",
        &with(&|b| b["learning_rate"] = json!(-1.0)),
    );
    assert_eq!(r.json()["error"]["field"], "learning_rate");
    // The largest seed of a batch wraps around instead of stopping the engine.
    let r = app.post(
        "/v1/sample?format=json",
        &json!({"request": {"prompt": "x", "steps": 2, "seed": u64::MAX, "batch_size": 2}}),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["images"].as_array().unwrap().len(), 2);
    assert_eq!(
        app.get("/v1/system").status,
        200,
        "the server still answers"
    );
}

#[test]
fn non_loopback_binds_need_a_token_and_requests_must_carry_it() {
    let tmp = tempfile::tempdir().unwrap();
    let settings = Settings {
        host: "0.0.0.0".into(),
        token: None,
        ..Settings::default()
    };
    assert!(server::check_bind(&settings).unwrap_err().contains("token"));

    let app = spawn_app(
        &tmp.path().join("state"),
        vec![],
        "127.0.0.1",
        Some("s3cret"),
    );
    assert_eq!(app.get("/v1/system").status, 200);
    let anonymous = App {
        addr: app.addr,
        token: None,
    };
    let r = anonymous.get("/v1/system");
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error"]["code"], "unauthorized");
    assert_eq!(anonymous.get("/v1/system?token=s3cret").status, 200);
    // A query token may be percent-encoded, and routes with query options take it too.
    assert_eq!(anonymous.get("/v1/system?token=s3%63ret").status, 200);
    assert_eq!(anonymous.get("/v1/jobs?limit=1&token=s3cret").status, 200);
    assert_eq!(anonymous.get("/v1/system?token=s3cre").status, 401);
    // With a token, the daemon may be reached under any name.
    let by_name = app.request_with("GET", "/v1/system", None, &[("Host", "studio.lan:7860")]);
    assert_eq!(by_name.status, 200);
    // Browsers cannot set headers on a WebSocket: the token goes in the query.
    let refused = anonymous.ws_with_headers("", &[]).err().unwrap_or_default();
    assert!(refused.contains("401"), "{refused}");
    let mut ws = app.ws("previews=false");
    assert!(matches!(next_frame(&mut ws), Frame::Event(h) if h["type"] == "hello"));
}

/// A training body without previews or saves: `steps` optimizer steps.
fn plain_train_body(data: &Path, name: &str, steps: u64) -> Value {
    let mut body = train_body(data);
    let obj = body.as_object_mut().unwrap();
    for key in [
        "save_every_n_steps",
        "sample_every_n_steps",
        "sample_prompts",
    ] {
        obj.remove(key);
    }
    obj.insert("output_name".into(), json!(name));
    obj.insert("max_train_steps".into(), json!(steps));
    body
}

#[test]
fn a_sample_during_training_uses_the_live_adapter_and_training_goes_on() {
    let (_tmp, data, app) = app_with_dataset(3, 3);
    let mut ws = app.ws("");
    let mut body = plain_train_body(&data, "live", 100_000);
    body["learning_rate"] = json!(0.01);
    let id = app.submit("/v1/jobs/train", &body);
    events_until(&mut ws, |e| e["type"] == "step" && e["data"]["step"] == 3);

    let sample = json!({
        "request": {"prompt": "a red circle on a blue background", "steps": 2, "width": 32, "height": 32},
        "loras": [{"live_job": id, "strength": 1.0}],
    });
    let r = app.post("/v1/sample?format=json", &sample);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let answer = r.json();
    let sample_id = answer["id"].as_str().unwrap().to_string();
    use base64::Engine as _;
    let png = base64::engine::general_purpose::STANDARD
        .decode(answer["images"][0].as_str().unwrap())
        .unwrap();
    let chunks = fluxlora::sample::png_meta::read_text_chunks(&png).unwrap();
    let parameters = &chunks.iter().find(|(k, _)| k == "parameters").unwrap().1;
    assert!(parameters.contains("<lora:"), "{parameters}");

    // The sample ran between optimizer steps: steps came before and come after it.
    let images_seq = answer_seq(&app, &sample_id).unwrap();
    let after = events_until(&mut ws, |e| {
        e["job"] == id.as_str() && e["type"] == "step" && e["seq"].as_u64().unwrap() > images_seq
    });
    assert!(after
        .iter()
        .any(|e| e["job"] == sample_id.as_str() && e["type"] == "images"));
    assert_eq!(
        app.get(&format!("/v1/jobs/{id}")).json()["state"],
        "running"
    );
    assert_eq!(
        app.post(&format!("/v1/jobs/{id}/cancel"), &json!({}))
            .status,
        200
    );
    assert_eq!(app.wait_finished(&id)["state"], "cancelled");
}

/// The sequence number of a finished sampling job's `images` event.
fn answer_seq(app: &App, job: &str) -> Option<u64> {
    app.get(&format!("/v1/jobs/{job}/events?since=0"))
        .json()
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["type"] == "images")
        .and_then(|e| e["seq"].as_u64())
}

/// Optimizer steps per second of a finished job, from its stored step events.
fn step_rate(app: &App, job: &str) -> f64 {
    let times: Vec<f64> = app
        .get(&format!("/v1/jobs/{job}/events?since=0"))
        .json()
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "step")
        .map(|e| e["time"].as_f64().unwrap())
        .collect();
    (times.len() - 1) as f64 / (times[times.len() - 1] - times[0])
}

#[test]
fn a_websocket_client_that_never_reads_does_not_slow_training() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    fluxlora::train::shapes::write_dataset(&data, 3, 64, 4).unwrap();
    // Small kernel send buffers on the server's connections, so a client that does
    // not read backs up after kilobytes rather than megabytes.
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_send_buffer_size(8192).unwrap();
    socket
        .bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    socket.listen(64).unwrap();
    let app = spawn_app_on(
        socket.into(),
        &tmp.path().join("state"),
        vec![tmp.path().to_path_buf()],
        None,
    );
    let steps = 200;
    let alone = app.submit("/v1/jobs/train", &plain_train_body(&data, "alone", steps));
    assert_eq!(app.wait_finished(&alone)["state"], "finished");

    // A client that never reads; one that reads only at the end, with a short queue
    // so it loses events (to be replayed from the store); and a reading one.
    let silent = silent_ws_client(app.addr, "/v1/ws");
    let mut lagging = app
        .ws_on(small_buffer_stream(app.addr), "previews=false&queue=8", &[])
        .unwrap();
    let mut reader = app.ws("");
    // Previews (binary frames) first, enough to back the silent client up.
    let flood = json!({"request": {"prompt": "noise", "steps": 24, "width": 128, "height": 128}});
    for _ in 0..10 {
        app.submit("/v1/jobs/sample", &flood);
    }
    let watched = app.submit("/v1/jobs/train", &plain_train_body(&data, "watched", steps));
    assert_eq!(app.wait_finished(&watched)["state"], "finished");

    // The silent client was backed up (its queue dropped previews or events) ...
    let system = app.get("/v1/system").json();
    let subscribers = system["subscribers"].as_array().unwrap();
    assert_eq!(subscribers.len(), 3, "{system}");
    let count = |key: &str| {
        subscribers
            .iter()
            .map(|s| s[key].as_u64().unwrap())
            .max()
            .unwrap()
    };
    assert!(
        count("dropped_previews") > 0,
        "the silent client never backed up: {system}"
    );
    assert!(
        count("dropped_events") > 0,
        "the lagging client never lost events: {system}"
    );
    // ... while the reading clients got every event of the run, in order, once.
    for ws in [&mut reader, &mut lagging] {
        let streamed = events_until(ws, is_end_of(&watched));
        let seqs: Vec<u64> = streamed
            .iter()
            .map(|e| e["seq"].as_u64().unwrap())
            .collect();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
        let got: Vec<u64> = streamed
            .iter()
            .filter(|e| e["job"] == watched.as_str() && e["type"] == "step")
            .map(|e| e["data"]["step"].as_u64().unwrap())
            .collect();
        assert_eq!(got, (1..=steps).collect::<Vec<_>>());
    }
    println!(
        "training step rate: {:.1} it/s without WebSocket clients, {:.1} it/s with a client that never reads ({system})",
        step_rate(&app, &alone),
        step_rate(&app, &watched),
    );
    drop(silent);
}

#[test]
fn browsers_are_served_only_from_loopback_or_configured_origins() {
    let tmp = tempfile::tempdir().unwrap();
    let app = spawn_app(&tmp.path().join("state"), vec![], "127.0.0.1", None);
    let local = "http://localhost:8188";
    let preflight = app.request_with(
        "OPTIONS",
        "/v1/jobs/train",
        None,
        &[
            ("Origin", local),
            ("Access-Control-Request-Method", "POST"),
            ("Access-Control-Request-Headers", "content-type"),
        ],
    );
    assert_eq!(preflight.status, 204);
    assert_eq!(
        preflight.header("access-control-allow-origin").as_deref(),
        Some(local)
    );
    assert!(preflight
        .header("access-control-allow-headers")
        .unwrap()
        .contains("content-type"));
    let r = app.request_with(
        "GET",
        "/v1/system",
        None,
        &[("Origin", "http://127.0.0.1:8188")],
    );
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("access-control-allow-origin").as_deref(),
        Some("http://127.0.0.1:8188")
    );
    let evil = "https://evil.example.com";
    let r = app.request_with("GET", "/v1/system", None, &[("Origin", evil)]);
    assert_eq!(r.status, 403);
    assert_eq!(r.json()["error"]["code"], "forbidden");
    assert!(r.header("access-control-allow-origin").is_none());
    // A page elsewhere cannot open the event stream either (cross-site WebSocket).
    assert!(app.ws_with_headers("", &[("Origin", evil)]).is_err());
    assert!(app.ws_with_headers("", &[("Origin", local)]).is_ok());
    let unknown = app
        .ws_with_headers("jobs=nope", &[])
        .err()
        .unwrap_or_default();
    assert!(unknown.contains("404"), "{unknown}");
}

#[test]
fn a_daemon_killed_mid_training_restarts_with_the_job_interrupted_and_resumable() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let state = tmp.path().join("state");
    fluxlora::train::shapes::write_dataset(&data, 3, 64, 5).unwrap();
    let (mut first, app) = spawn_process(&state, tmp.path());
    let mut body = plain_train_body(&data, "survivor", 30);
    body["save_every_n_steps"] = json!(4);
    let mut ws = app.ws("");
    let id = app.submit("/v1/jobs/train", &body);
    events_until(&mut ws, |e| e["type"] == "saved" && e["data"]["step"] == 8);
    first.kill().unwrap(); // SIGKILL: no chance to clean up
    first.wait().unwrap();

    let (mut second, app) = spawn_process(&state, tmp.path());
    let job = app.get(&format!("/v1/jobs/{id}")).json();
    assert_eq!(job["state"], "interrupted", "{job}");
    let r = app.post(&format!("/v1/jobs/{id}/resume"), &json!({}));
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let job = app.wait_finished(&id);
    assert_eq!(job["state"], "finished", "{job}");
    let events = app.get(&format!("/v1/jobs/{id}/events?since=0")).json();
    let states: Vec<&str> = events
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "state")
        .map(|e| e["data"]["state"].as_str().unwrap())
        .collect();
    // The restart says so in the job's log, before it runs again.
    assert_eq!(
        states,
        [
            "queued",
            "running",
            "interrupted",
            "queued",
            "running",
            "finished"
        ]
    );
    let resumed_from = events
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "started")
        .filter_map(|e| e["data"]["resumed_from_step"].as_u64())
        .collect::<Vec<_>>();
    assert!(
        resumed_from.len() == 1 && resumed_from[0] >= 8,
        "{resumed_from:?}"
    );
    let lora = state.join("loras").join("survivor.safetensors");
    assert!(fluxlora::model::lora_io::load(&lora, &Device::Cpu).is_ok());
    // A clean stop (SIGTERM) tells WebSocket clients it is going away, and exits.
    let mut ws = app.ws("previews=false");
    assert!(matches!(next_frame(&mut ws), Frame::Event(h) if h["type"] == "hello"));
    let term = std::process::Command::new("kill")
        .args(["-TERM", &second.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    match ws.read() {
        Ok(Message::Close(Some(frame))) => {
            assert_eq!(
                frame.code,
                tungstenite::protocol::frame::coding::CloseCode::Away
            );
            assert!(frame.reason.contains("stopping"), "{}", frame.reason);
        }
        other => panic!("expected a close frame, got {other:?}"),
    }
    assert!(second.wait().unwrap().success());

    let leftovers = support::temp_files(&state);
    assert!(leftovers.is_empty(), "partial files: {leftovers:?}");
}

#[test]
fn discovery_routes_describe_models_nodes_and_the_api() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    std::fs::create_dir_all(state.join("models/flux-dev")).unwrap();
    std::fs::create_dir_all(state.join("loras")).unwrap();
    std::fs::write(state.join("models/schnell.safetensors"), b"x").unwrap();
    std::fs::write(state.join("loras/mine.safetensors"), b"x").unwrap();
    let app = spawn_app(&state, vec![], "127.0.0.1", None);

    let system = app.get("/v1/system").json();
    assert!(
        system["memory_bytes"].as_u64().unwrap() > 1 << 20,
        "{system}"
    );
    assert_eq!(system["version"], env!("CARGO_PKG_VERSION"));
    let models = app.get("/v1/models").json();
    assert_eq!(models["loaded"]["device"], "cpu");
    let names: Vec<&str> = models["available"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["tiny", "flux-dev", "schnell.safetensors"]);

    let nodes = app.get("/v1/nodes").json();
    let loader = &nodes["FluxLoraApply"]["input"]["optional"]["lora_name"][0];
    assert_eq!(loader, &json!(["mine.safetensors"]));
    assert!(nodes["FluxLoraSample"]["output"]
        .as_array()
        .unwrap()
        .contains(&json!("IMAGE")));

    let api = app.get("/v1/openapi.json").json();
    assert_eq!(api["openapi"], "3.1.0");
    for path in [
        "/v1/jobs/train",
        "/v1/ws",
        "/v1/sample",
        "/v1/models",
        "/v1/nodes",
    ] {
        assert!(api["paths"][path].is_object(), "{path} undocumented");
    }
}
