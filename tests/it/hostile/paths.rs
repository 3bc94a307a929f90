//! Path traversal on every route that takes a path or a file name: each
//! escape (`..` at several depths, absolute paths, backslashes, NUL bytes,
//! links inside the roots that lead out, `....//` and `..;/` tricks, and in
//! URLs the percent-encoded and double-encoded forms) put into each slot
//! (`/view`'s filename, subfolder and type, `/upload/image`'s file name,
//! subfolder and type, userdata paths and moves, job files, LoRA names, the
//! front end's and extension's files, `/v1` LoRA paths, init images, dataset,
//! validation and cache folders, A1111 LoRA tags, and the ComfyUI nodes' image,
//! LoRA, folder and file-prefix inputs). Each must be a 4xx, no answer may carry
//! the files outside, and nothing outside the roots may change.

use actix_web::test::TestRequest;
use serde_json::{json, Value};

use super::bodies::encode;
use super::{files_under, InProcess, Reply};

/// What the files outside the roots hold; no answer may contain it.
const SECRET: &str = "SECRET-OUTSIDE-THE-ROOTS";

/// The escapes, for a folder `abs` (absolute) outside the roots. `{abs}` is
/// replaced by it.
const ESCAPES: &[&str] = &[
    "../outside/secret.png",
    "../../outside/secret.png",
    "../../../outside/secret.png",
    "../../../../outside/secret.png",
    "../../../../../../../../../../etc/passwd",
    "{abs}/secret.png",
    "{abs}",
    "/etc/passwd",
    "..",
    "../",
    "a/../../outside/secret.png",
    "./../outside/secret.png",
    "..\\outside\\secret.png",
    "..\\..\\..\\outside\\secret.png",
    "\\etc\\passwd",
    "secret.png\0.png",
    "\0",
    "....//....//outside/secret.png",
    "..;/..;/outside/secret.png",
    "link.png",
    "linkdir/secret.png",
    "linkdir",
    "link.json",
    "linkdir/secret.json",
    "link.safetensors",
    "link.js",
    "linkdir/secret.js",
    "link.txt",
    "linkdir/secret.txt",
];

/// Escapes written percent-encoded as a client would put them in a URL; the
/// daemon decodes once and must see a name that leads nowhere outside (a file
/// that does not exist, or a plain file name inside).
const ENCODED: &[&str] = &[
    "%2e%2e%2f%2e%2e%2foutside%2fsecret.png",
    "%2e%2e/%2e%2e/outside/secret.png",
    "..%2f..%2f..%2foutside%2fsecret.png",
    "%252e%252e%252f%252e%252e%252foutside%252fsecret.png",
    "..%252f..%252foutside%252fsecret.png",
    "%2e%2e%5c%2e%2e%5coutside%5csecret.png",
    "secret.png%00.png",
    "%c0%ae%c0%ae%c0%af",
];

/// Where an escape goes in a request.
enum Slot {
    /// A GET with the escape in the URL (path or query), through `uri(escape)`.
    Url(&'static str, fn(&str) -> String),
    /// A POST to the route that starts `what`, with a JSON body made from the escape.
    Json(&'static str, fn(&str) -> Value),
    /// `/upload/image` with the escape in the named part.
    Upload(&'static str),
    /// Userdata writes, deletes and moves (from and to).
    UserdataChange,
    /// A file of a finished job.
    JobFile,
}

fn slots() -> Vec<Slot> {
    use Slot::*;
    vec![
        Url("/view filename", |p| {
            format!("/view?filename={p}&type=input")
        }),
        Url("/view filename, output", |p| format!("/view?filename={p}")),
        Url("/view subfolder", |p| {
            format!("/view?filename=secret.png&subfolder={p}&type=input")
        }),
        Url("/view type", |p| {
            format!("/view?filename=secret.png&type={p}")
        }),
        Url("/api/view filename", |p| {
            format!("/api/view?filename={p}&type=temp")
        }),
        Url("GET /userdata", |p| format!("/userdata/{p}")),
        Url("GET /api/userdata", |p| format!("/api/userdata/{p}")),
        Url("/userdata list", |p| format!("/userdata?dir={p}")),
        Url("GET /v1/loras", |p| format!("/v1/loras/{p}")),
        Url("front end file", |p| format!("/{p}")),
        Url("extension file", |p| format!("/extensions/fluxlora/{p}")),
        Url("/models folder", |p| format!("/models/{p}")),
        Url("/experiment/models folder", |p| {
            format!("/experiment/models/{p}")
        }),
        Json(
            "/v1/jobs/sample init_image",
            |p| json!({"request": {"prompt": "x", "width": 32, "height": 32, "steps": 1, "init_image": p}}),
        ),
        Json("/v1/jobs/sample loras[0].path", |p| {
            json!({"request": {"prompt": "x", "width": 32, "height": 32, "steps": 1},
                   "loras": [{"path": p, "strength": 1.0}]})
        }),
        Json("/v1/sample loras[0].path", |p| {
            json!({"request": {"prompt": "x", "width": 32, "height": 32, "steps": 1},
                   "loras": [{"path": p}]})
        }),
        Json(
            "/v1/jobs/train dataset.folders[0]",
            |p| json!({"max_train_steps": 1, "dataset": {"folders": [p], "resolution": 32}}),
        ),
        Json("/v1/jobs/train validation_dataset", |p| {
            json!({"max_train_steps": 1, "dataset": {"folders": ["set"], "resolution": 32},
                   "validation_dataset": {"folders": [p]}})
        }),
        Json("/v1/jobs/train cache_dir", |p| {
            json!({"max_train_steps": 1, "dataset": {"folders": ["set"], "resolution": 32},
                   "cache_dir": p})
        }),
        Json(
            "/sdapi/v1/txt2img LoRA tag",
            |p| json!({"prompt": format!("x <lora:{p}:1>"), "steps": 1, "width": 32, "height": 32}),
        ),
        Json("/prompt LoadImage image", |p| {
            json!({"prompt": {
                "1": {"class_type": "LoadImage", "inputs": {"image": p}},
                "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}})
        }),
        Json("/prompt FluxLoraApply lora_name", |p| {
            json!({"prompt": {
                "1": {"class_type": "FluxLoraApply", "inputs": {"lora_name": p, "strength": 1.0}},
                "2": {"class_type": "FluxLoraSample", "inputs": {"prompt": "x", "width": 32,
                      "height": 32, "steps": 1, "guidance": 0.0, "seed": 1, "batch_size": 1,
                      "loras": ["1", 0]}},
                "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}}}})
        }),
        Json("/prompt SaveImage filename_prefix", |p| {
            json!({"prompt": {
                "1": {"class_type": "FluxLoraSample", "inputs": {"prompt": "x", "width": 32,
                      "height": 32, "steps": 1, "guidance": 0.0, "seed": 1, "batch_size": 1}},
                "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": p}}}})
        }),
        Json("/prompt FluxLoraDataset folder", |p| {
            json!({"prompt": {
                "1": {"class_type": "FluxLoraDataset", "inputs": {"source": "folder", "folder": p,
                      "trigger_word": "", "caption_template": "", "num_repeats": 1,
                      "resolution": 32, "enable_bucket": false}},
                "2": {"class_type": "FluxLoraTrain", "inputs": {"dataset": ["1", 0],
                      "output_name": "x", "max_train_steps": 1, "network_dim": 2,
                      "network_alpha": 2.0, "learning_rate": 0.001, "train_batch_size": 1,
                      "seed": 1}}}})
        }),
        UserdataChange,
        JobFile,
        Upload("image"),
        Upload("subfolder"),
        Upload("type"),
    ]
}

/// Whether the daemon may take `seen` (the path as it reaches the handler) as
/// a name inside its folders: relative, plain components (no `..`), no
/// backslash or NUL, and none of the links out. Anything else must be refused.
fn plain(seen: &str) -> bool {
    !seen.is_empty()
        && !seen.contains(['\\', '\0'])
        && !seen.contains("link")
        && std::path::Path::new(seen)
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)))
}

fn png() -> Vec<u8> {
    let mut out = std::io::Cursor::new(vec![]);
    image::DynamicImage::new_rgb8(16, 16)
        .write_to(&mut out, image::ImageFormat::Png)
        .unwrap();
    out.into_inner()
}

fn upload(part: &str, escape: &str) -> TestRequest {
    let (mut name, mut sub, mut kind) = ("ok.png", "", "input");
    match part {
        "image" => name = escape,
        "subfolder" => sub = escape,
        _ => kind = escape,
    }
    let mut body = vec![];
    let boundary = "pathsboundary";
    for (field, value) in [("subfolder", sub), ("type", kind), ("overwrite", "true")] {
        body.extend_from_slice(
            format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"\r\n\r\n{value}\r\n")
                .as_bytes(),
        );
    }
    body.extend_from_slice(
        format!("--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{name}\"\r\nContent-Type: image/png\r\n\r\n")
            .as_bytes(),
    );
    body.extend_from_slice(&png());
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    TestRequest::post()
        .uri("/upload/image")
        .insert_header((
            "Content-Type",
            format!("multipart/form-data; boundary={boundary}"),
        ))
        .set_payload(body)
}

/// Every file outside the roots with its bytes.
fn outside_state(app: &InProcess) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    files_under(app.dir.path())
        .into_iter()
        .filter(|p| !p.starts_with("state") && !p.starts_with("data"))
        .map(|p| {
            let bytes = std::fs::read(app.dir.path().join(&p)).unwrap_or_default();
            (p, bytes)
        })
        .collect()
}

fn link(target: &std::path::Path, at: std::path::PathBuf) {
    std::fs::create_dir_all(at.parent().unwrap()).unwrap();
    std::os::unix::fs::symlink(target, at).unwrap();
}

#[test]
fn escapes_in_every_path_slot_get_4xx_and_touch_nothing_outside() {
    let app = InProcess::new(|s, dir| {
        for (folder, file) in [("frontend", "index.html"), ("js", "fluxlora.js")] {
            std::fs::create_dir_all(dir.join(folder)).unwrap();
            std::fs::write(dir.join(folder).join(file), "ok").unwrap();
        }
        s.comfy_frontend = Some(dir.join("frontend"));
        s.comfy_js = Some(dir.join("js"));
    });
    let dir = app.dir.path().to_path_buf();
    let state = dir.join("state");
    let outside = dir.join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    for ext in ["png", "json", "js", "safetensors", "txt"] {
        std::fs::write(outside.join(format!("secret.{ext}")), SECRET).unwrap();
    }
    fluxlora::train::shapes::write_dataset(&app.root().join("set"), 2, 32, 1).unwrap();
    // A finished job, for its files.
    let r = app.post_json(
        "/v1/jobs/sample",
        br#"{"request": {"prompt": "x", "width": 16, "height": 16, "steps": 1}}"#,
    );
    assert_eq!(r.status, 202, "{}", r.text());
    let job = r.json()["id"].as_str().unwrap().to_string();
    while !["finished", "failed"].contains(
        &app.get(&format!("/v1/jobs/{job}")).json()["state"]
            .as_str()
            .unwrap_or(""),
    ) {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // Links inside every folder a request can name, leading out.
    for folder in [
        state.join("input"),
        state.join("output"),
        state.join("temp"),
        state.join("user/default"),
        state.join("loras"),
        state.join("jobs").join(&job),
        app.root(),
        dir.join("frontend"),
        dir.join("js"),
    ] {
        link(&outside, folder.join("linkdir"));
        for ext in ["png", "json", "js", "safetensors", "txt"] {
            link(
                &outside.join(format!("secret.{ext}")),
                folder.join(format!("link.{ext}")),
            );
        }
    }
    std::fs::write(state.join("user/default/mine.json"), "{}").unwrap();
    let before = outside_state(&app);
    let abs = outside.display().to_string();
    let mut tally = Tally::default();
    for slot in slots() {
        for raw in ESCAPES {
            let escape = raw.replace("{abs}", &abs);
            match &slot {
                Slot::Url(what, uri) => {
                    // Encoded once: the daemon sees the escape itself.
                    let r = app.get(&uri(&encode(&escape)));
                    tally.judge(format!("{what} {escape:?} (encoded)"), &escape, r);
                    // As written, where a URL can carry it.
                    if escape.bytes().all(|b| b.is_ascii_graphic() && b != b'\\') {
                        let r = app.get(&uri(&escape));
                        tally.judge(format!("{what} {escape:?}"), &escape, r);
                    }
                }
                Slot::UserdataChange => {
                    let e = encode(&escape);
                    for req in [
                        TestRequest::post()
                            .uri(&format!("/userdata/{e}"))
                            .set_payload("pwned"),
                        TestRequest::post()
                            .uri(&format!("/api/userdata/{e}?overwrite=true"))
                            .set_payload("pwned"),
                        TestRequest::delete().uri(&format!("/userdata/{e}")),
                        TestRequest::post().uri(&format!("/userdata/mine.json/move/{e}")),
                        TestRequest::post().uri(&format!("/userdata/{e}/move/mine2.json")),
                    ] {
                        let r = app.send(req);
                        tally.judge(
                            format!("userdata write, delete or move {escape:?}"),
                            &escape,
                            r,
                        );
                    }
                }
                Slot::JobFile => {
                    let uri = format!("/v1/jobs/{job}/files/{}", encode(&escape));
                    let r = app.get(&uri);
                    tally.judge(uri, &escape, r);
                    if escape.bytes().all(|b| b.is_ascii_graphic() && b != b'\\') {
                        let uri = format!("/v1/jobs/{job}/files/{escape}");
                        let r = app.get(&uri);
                        tally.judge(uri, &escape, r);
                    }
                }
                Slot::Json(what, body) => {
                    let route = what.split(' ').next().unwrap();
                    let route = if route == "/v1/sample" {
                        "/v1/sample?format=json"
                    } else {
                        route
                    };
                    let r = app.post_json(route, body(&escape).to_string().as_bytes());
                    if route == "/prompt" && r.status == 200 {
                        // ComfyUI checks a graph's values against the node
                        // definitions when it is queued, and the nodes check
                        // paths when they run: the run must fail.
                        let id = r.json()["prompt_id"].as_str().unwrap().to_string();
                        let status = prompt_status(&app, &id);
                        // Save Image's prefix names a subfolder before its last
                        // `/`; with a plain one (or none) saving is right.
                        let sub = escape.rsplit_once('/').map_or("", |(sub, _)| sub);
                        let may_save = what.contains("SaveImage") && (sub.is_empty() || plain(sub));
                        tally.count(status == "error" || may_save, || {
                            format!("{what} {escape:?}: queued, and the run ended {status}")
                        });
                        continue;
                    }
                    app.cancel_all();
                    // A path in a body is never a plain name of a folder here.
                    tally.judge(format!("{what} {escape:?}"), "/", r);
                }
                Slot::Upload(part) => {
                    let r = app.send(upload(part, &escape));
                    // In a multipart header's quoted file name `\\` escapes the
                    // next character (RFC 822): the name the daemon sees has none.
                    let seen = match *part {
                        "image" => escape.replace('\\', ""),
                        _ => escape.clone(),
                    };
                    tally.judge(format!("upload {part} {escape:?}"), &seen, r);
                }
            }
        }
        for encoded in ENCODED {
            match &slot {
                Slot::Url(what, uri) => {
                    let r = app.get(&uri(encoded));
                    let seen = percent_decoded(encoded);
                    tally.judge(format!("{what} {encoded}"), &seen, r);
                }
                Slot::Upload(part) => {
                    let r = app.send(upload(part, encoded));
                    tally.judge(format!("upload {part} {encoded}"), encoded, r);
                }
                Slot::Json(..) | Slot::UserdataChange | Slot::JobFile => {}
            }
        }
    }
    let after = outside_state(&app);
    assert_eq!(before, after, "something outside the roots changed");
    assert!(
        tally.failures.is_empty(),
        "{} of {} cases failed:\n{}",
        tally.failures.len(),
        tally.tried,
        tally.failures.join("\n")
    );
    println!(
        "hostile paths: {} traversal cases over {} slots",
        tally.tried,
        slots().len()
    );
}

/// Cases tried and the failures among them.
#[derive(Default)]
struct Tally {
    tried: usize,
    failures: Vec<String>,
}

impl Tally {
    fn count(&mut self, ok: bool, failure: impl FnOnce() -> String) {
        self.tried += 1;
        if !ok {
            self.failures.push(failure());
        }
    }

    /// An answer to an escape the daemon saw as `seen`: a 4xx unless `seen` is a
    /// plain name inside (then any answer but a 5xx), and never the files outside.
    fn judge(&mut self, what: String, seen: &str, r: Reply) {
        let status_ok = if plain(seen) {
            r.status < 500
        } else {
            (400..500).contains(&r.status)
        };
        let ok = status_ok && !r.text().contains(SECRET);
        self.count(ok, || {
            format!(
                "{what}: {} {}",
                r.status,
                r.text().chars().take(200).collect::<String>()
            )
        });
    }
}

/// `s` percent-decoded once (invalid escapes kept), as the daemon sees a URL.
fn percent_decoded(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = vec![];
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (
            bytes[i],
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// How a queued ComfyUI prompt ended (`success`, `error`), from `/history`.
fn prompt_status(app: &InProcess, id: &str) -> String {
    loop {
        let history = app.get(&format!("/history/{id}")).json();
        if let Some(status) = history[id]["status"]["status_str"].as_str() {
            return status.to_string();
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
