//! Hostile input on every surface: what a careless or malicious client may
//! send, and what the daemon must do with it (a 4xx that says what to fix,
//! nothing written outside the roots, the daemon still answering).
//!
//! - `bodies`: property tests (proptest) over the request bodies, path
//!   parameters and query strings of `/v1`, the ComfyUI routes and
//!   `/sdapi/v1`, in process through `actix_web::test`;
//! - `paths`: path traversal on every route that takes a path or file name;
//! - `files`: malformed, truncated, oversized and bomb files (safetensors,
//!   images) in datasets, uploads, img2img and LoRA loading, and oversized
//!   bodies.
//!
//! Each test prints how many cases it tried (`cargo test --test it hostile::
//! -- --nocapture`); `PROPTEST_CASES` sets the property tests' case count.
//! [`InProcess`] is the app they share: the real app (`server::app`, guard and
//! limits included) on the built-in tiny model, without a socket.

mod bodies;
mod files;
mod paths;

use std::path::{Path, PathBuf};

use actix_web::body::BoxBody;
use actix_web::dev::{Service, ServiceResponse};
use actix_web::test::TestRequest;
use fluxlora::config::Settings;
use fluxlora::engine::Engine;
use fluxlora::server::{self, AppState};
use serde_json::Value;

/// An answer of the in-process app.
pub struct Reply {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON (`Null` when it is not).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    /// The error message of a native or ComfyUI answer (`error.message`), of an
    /// A1111 one (`detail`, `error`), or the body as text: what a client is
    /// told to fix.
    pub fn message(&self) -> String {
        let json = self.json();
        for pointer in ["/error/message", "/detail", "/error"] {
            if let Some(Value::String(m)) = json.pointer(pointer) {
                return m.clone();
            }
        }
        if let Some(detail) = json.get("detail").filter(|d| !d.is_null()) {
            return detail.to_string();
        }
        self.text()
    }
}

/// The daemon's app in this process on a data dir of its own, with the
/// settings of `spawn_app` (64 KiB JSON bodies) edited by the caller.
pub struct InProcess {
    pub dir: tempfile::TempDir,
    sys: actix_web::rt::SystemRunner,
    call: Box<dyn Fn(TestRequest) -> std::pin::Pin<Box<dyn std::future::Future<Output = Reply>>>>,
    engine: Engine,
}

impl InProcess {
    pub fn new(edit: impl FnOnce(&mut Settings, &Path)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut settings = Settings {
            port: 0,
            data_dir: dir.path().join("state"),
            roots: vec![dir.path().join("data")],
            max_body_bytes: 64 * 1024,
            max_upload_bytes: 1 << 20,
            token: None,
            ..Settings::default()
        };
        std::fs::create_dir_all(dir.path().join("data")).unwrap();
        edit(&mut settings, dir.path());
        let bundle = crate::support::bundle();
        let engine =
            Engine::start(bundle.clone(), &settings.data_dir, settings.lora_dir()).unwrap();
        let state = actix_web::web::Data::new(AppState::new(&settings, &bundle, engine.clone()));
        let sys = actix_web::rt::System::new();
        let app = std::rc::Rc::new(
            sys.block_on(actix_web::test::init_service(server::app(&settings, state))),
        );
        let call = Box::new(move |req: TestRequest| {
            let app = app.clone();
            Box::pin(async move {
                let res: ServiceResponse<BoxBody> = match app.call(req.to_request()).await {
                    Ok(res) => res,
                    Err(e) => panic!("the app failed instead of answering: {e}"),
                };
                let status = res.status().as_u16();
                let body = actix_web::test::read_body(res).await.to_vec();
                Reply { status, body }
            }) as std::pin::Pin<Box<dyn std::future::Future<Output = Reply>>>
        });
        Self {
            dir,
            sys,
            call,
            engine,
        }
    }

    /// Sends one request and reads the whole answer.
    pub fn send(&self, req: TestRequest) -> Reply {
        self.sys.block_on((self.call)(req))
    }

    pub fn get(&self, uri: &str) -> Reply {
        self.send(TestRequest::get().uri(uri))
    }

    /// `POST uri` with `body` as `application/json`.
    pub fn post_json(&self, uri: &str, body: &[u8]) -> Reply {
        self.send(
            TestRequest::post()
                .uri(uri)
                .insert_header(("Content-Type", "application/json"))
                .set_payload(body.to_vec()),
        )
    }

    /// The folder requests may read datasets and files from (a `--root`).
    pub fn root(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Stops whatever a case queued, so the next starts on an idle engine.
    pub fn cancel_all(&self) {
        for job in self.get("/v1/jobs").json().as_array().into_iter().flatten() {
            if let Some(id) = job["id"].as_str() {
                let _ = self.send(TestRequest::post().uri(&format!("/v1/jobs/{id}/cancel")));
            }
        }
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        self.engine.shutdown();
    }
}

/// Every file under `dir`, recursively, as paths relative to it.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() && !p.is_symlink() {
                stack.push(p.clone());
            }
            out.push(p.strip_prefix(dir).unwrap().to_path_buf());
        }
    }
    out.sort();
    out
}

/// The number of property-test cases: `PROPTEST_CASES`, else `default`.
pub fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Peak resident memory of this test process so far (Linux `VmHWM`), in MiB.
pub fn peak_rss_mib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kb| kb / 1024)
}
