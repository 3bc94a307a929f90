//! The HTTP API against the real server on an ephemeral port, driven like `curl`:
//! a training job end to end, sampling with its LoRA, bad input answered with 4xx
//! JSON errors while the server keeps answering, and the token check.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::Device;
use fluxlora::config::Settings;
use fluxlora::engine::Engine;
use fluxlora::model::bundle::ModelBundle;
use fluxlora::server::{self, AppState};
use serde_json::{json, Value};

struct App {
    addr: SocketAddr,
    token: Option<String>,
}

/// Starts engine + server on port 0 in a background thread (like `fluxlora serve`).
fn spawn_app(
    data_dir: &Path,
    roots: Vec<std::path::PathBuf>,
    host: &str,
    token: Option<&str>,
) -> App {
    let settings = Settings {
        host: host.into(),
        port: 0,
        data_dir: data_dir.to_path_buf(),
        token: token.map(str::to_string),
        roots,
        max_body_bytes: 64 * 1024,
        ..Settings::default()
    };
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let bundle = Arc::new(ModelBundle::tiny(&Device::Cpu).unwrap());
        let engine =
            Engine::start(bundle.clone(), &settings.data_dir, settings.lora_dir()).unwrap();
        let state = AppState {
            engine,
            model_name: bundle.name.clone(),
            device: "cpu".into(),
            dtype: "f32".into(),
            roots: settings.read_roots(),
            lora_dir: Some(settings.lora_dir()),
        };
        actix_web::rt::System::new().block_on(async move {
            let (server, addr) = server::start(&settings, state).unwrap();
            tx.send(addr).unwrap();
            server.await
        })
    });
    App {
        addr: rx.recv_timeout(Duration::from_secs(30)).unwrap(),
        token: token.map(str::to_string),
    }
}

struct Response {
    status: u16,
    content_type: String,
    body: Vec<u8>,
}

impl Response {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&self.body)))
    }
}

impl App {
    /// One HTTP/1.1 request with `Connection: close`.
    fn request(&self, method: &str, path: &str, body: Option<&[u8]>) -> Response {
        let mut stream = TcpStream::connect(self.addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(120)))
            .unwrap();
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n",
            self.addr
        );
        if let Some(t) = &self.token {
            head.push_str(&format!("Authorization: Bearer {t}\r\n"));
        }
        if let Some(b) = body {
            head.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                b.len()
            ));
        }
        head.push_str("\r\n");
        stream.write_all(head.as_bytes()).unwrap();
        if let Some(b) = body {
            let _ = stream.write_all(b);
        }
        let mut raw = vec![];
        let _ = stream.read_to_end(&mut raw);
        let split = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("a response");
        let head = String::from_utf8_lossy(&raw[..split]).to_string();
        let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
        let header = |name: &str| {
            head.lines().find_map(|l| {
                l.split_once(':')
                    .filter(|(k, _)| k.eq_ignore_ascii_case(name))
                    .map(|(_, v)| v.trim().to_string())
            })
        };
        let mut body = raw[split + 4..].to_vec();
        if header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
            body = dechunk(&body);
        }
        Response {
            status,
            content_type: header("content-type").unwrap_or_default(),
            body,
        }
    }

    fn get(&self, path: &str) -> Response {
        self.request("GET", path, None)
    }

    fn post(&self, path: &str, body: &Value) -> Response {
        self.request("POST", path, Some(body.to_string().as_bytes()))
    }

    fn wait_finished(&self, id: &str) -> Value {
        let start = Instant::now();
        loop {
            let job = self.get(&format!("/v1/jobs/{id}")).json();
            if ["finished", "failed", "cancelled"].contains(&job["state"].as_str().unwrap_or("")) {
                return job;
            }
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "job {id} stuck: {job}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = vec![];
    loop {
        let Some(eol) = b.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size =
            usize::from_str_radix(String::from_utf8_lossy(&b[..eol]).trim(), 16).unwrap_or(0);
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + size]);
        b = &b[eol + 2 + size + 2..];
    }
}

fn train_body(data: &Path) -> Value {
    json!({
        "output_name": "api",
        "max_train_steps": 4,
        "save_every_n_steps": 2,
        "learning_rate": 0.001,
        "dataset": {"folders": [data], "resolution": 64, "enable_bucket": false},
        "network": {"rank": 2, "alpha": 2.0}
    })
}

#[test]
fn curl_flow_train_then_sample_with_the_lora() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    fluxlora::train::shapes::write_dataset(&data, 3, 64, 1).unwrap();
    let app = spawn_app(
        &tmp.path().join("state"),
        vec![tmp.path().to_path_buf()],
        "127.0.0.1",
        None,
    );

    let r = app.post("/v1/jobs/train", &train_body(&data));
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
    let id = r.json()["id"].as_str().unwrap().to_string();
    let job = app.wait_finished(&id);
    assert_eq!(job["state"], "finished", "{job}");
    let events = app.get(&format!("/v1/jobs/{id}/events?since=0")).json();
    let seqs: Vec<u64> = events
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    let kinds: Vec<String> = events
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            e["event"]["type"]
                .as_str()
                .or(e["state"].as_str())
                .unwrap_or("")
                .to_string()
        })
        .collect();
    for want in ["started", "step", "saved", "finished"] {
        assert!(
            kinds.iter().any(|k| k == want),
            "{want} missing from {kinds:?}"
        );
    }
    let lora = job["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p.as_str().unwrap().contains("loras"))
        .unwrap()
        .clone();
    let file = app.get(&format!("/v1/jobs/{id}/files/api.safetensors"));
    assert_eq!(file.status, 200);
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
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    fluxlora::train::shapes::write_dataset(&data, 2, 64, 2).unwrap();
    let app = spawn_app(
        &tmp.path().join("state"),
        vec![tmp.path().to_path_buf()],
        "127.0.0.1",
        None,
    );
    let with = |f: &dyn Fn(&mut Value)| {
        let mut b = train_body(&data);
        f(&mut b);
        b
    };
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
        ("unknown route", app.get("/v2/nothing"), 404, "no route"),
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
}
