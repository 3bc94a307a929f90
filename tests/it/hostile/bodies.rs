//! Property tests over what clients send: random JSON, garbage bytes, valid
//! bodies with one to three fields replaced (wrong types, huge or negative
//! numbers, hostile strings), removed or added, random ComfyUI graphs, random
//! multipart uploads, and random path parameters and query strings on every
//! route of the table. The property: the daemon answers (no panic), never with
//! a 5xx, a 4xx says what to fix, and memory stays bounded (sizes are refused
//! before anything is allocated for them). Accepted jobs are cancelled at once,
//! so cases stay cheap on two cores.

use std::cell::Cell;

use actix_web::test::TestRequest;
use base64::Engine as _;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed, TestCaseError, TestRunner};
use serde_json::{json, Map, Value};

use super::{cases, files_under, peak_rss_mib, InProcess, Reply};

/// A runner of `PROPTEST_CASES` (else `default_cases`) cases from a fixed seed,
/// so a CI run is repeatable; `PROPTEST_RNG_SEED` picks another.
fn runner(default_cases: u32) -> TestRunner {
    let base = Config::default();
    let rng_seed = match std::env::var_os("PROPTEST_RNG_SEED") {
        Some(_) => base.rng_seed,
        None => RngSeed::Fixed(13),
    };
    TestRunner::new(Config {
        cases: cases(default_cases),
        failure_persistence: None,
        max_shrink_iters: 256,
        rng_seed,
        ..base
    })
}

/// Strings that have broken parsers and path checks elsewhere.
const HOSTILE: &[&str] = &[
    "",
    "..",
    "../../../../etc/passwd",
    "/etc/passwd",
    "..\\..\\windows\\win.ini",
    "C:\\Windows\\System32",
    "%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "%252e%252e%252f",
    "a\0b",
    "\u{202e}txt.png",
    "<lora:../../etc/passwd:1>",
    "<lora:x:1e308>",
    "<lora::>",
    "{\"a\": 1}",
    "~/.ssh/id_rsa",
    "$(reboot)",
    "nul",
    ".hidden",
    "a/b/c/../../../..",
    "🦀🦀",
    "\r\nX-Injected: 1",
];

fn text() -> BoxedStrategy<String> {
    prop_oneof![
        3 => prop::collection::vec(any::<char>(), 0..12).prop_map(String::from_iter),
        3 => prop::sample::select(HOSTILE).prop_map(str::to_string),
        1 => (0usize..20_000).prop_map(|n| "x".repeat(n)),
    ]
    .boxed()
}

/// Numbers just beyond the limits and absurd, with many small ones (which are
/// valid for most fields, so a case reaches deeper checks). Valid but costly
/// values (4096 × 4096 images, 1000 steps, large batches) are left out: they
/// are not client mistakes, and on two cores one would take the whole run.
fn number() -> BoxedStrategy<Value> {
    prop_oneof![
        4 => (-3i64..=4).prop_map(Value::from),
        2 => prop::sample::select(vec![
            16i64, 32, 64, 65, 1001, 4097, 65_536, 100_000,
            i64::from(u32::MAX), i64::from(i32::MAX), i64::MAX, i64::MIN, -1,
        ])
        .prop_map(Value::from),
        1 => Just(Value::from(u64::MAX)),
        2 => prop::sample::select(vec![0.5f64, -0.5, 1e308, -1e308, 1e-300, 3.5, 7.0, 1.0])
            .prop_map(Value::from),
        1 => any::<f64>().prop_filter_map("finite", |f| {
            serde_json::Number::from_f64(f).map(Value::Number)
        }),
    ]
    .boxed()
}

fn json_value() -> BoxedStrategy<Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        number(),
        text().prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(text(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
    .boxed()
}

/// One change to a JSON document: at the `at`-th node (in document order,
/// modulo their number), replace it, remove it, or add `key` = `value` to it.
#[derive(Clone, Debug)]
struct Mutation {
    at: usize,
    kind: u8,
    key: String,
    value: Value,
}

fn mutations() -> impl Strategy<Value = Vec<Mutation>> {
    let known_keys = prop_oneof![
        3 => text(),
        2 => prop::sample::select(vec![
            "width", "height", "steps", "batch_size", "n_iter", "seed", "path", "strength",
            "init_image", "denoise", "denoising_strength", "init_images", "folders",
            "resolution", "max_train_steps", "rank", "alpha", "cache_dir", "class_type",
            "inputs", "prompt", "loras", "lora_name", "image", "subfolder",
        ])
        .prop_map(str::to_string),
    ];
    prop::collection::vec(
        (any::<usize>(), 0u8..3, known_keys, json_value()).prop_map(|(at, kind, key, value)| {
            Mutation {
                at,
                kind,
                key,
                value,
            }
        }),
        1..4,
    )
}

/// Applies one mutation in place; returns whether it found its node.
fn apply(doc: &mut Value, m: &Mutation) {
    fn count(v: &Value) -> usize {
        1 + match v {
            Value::Array(a) => a.iter().map(count).sum(),
            Value::Object(o) => o.values().map(count).sum(),
            _ => 0,
        }
    }
    fn visit(v: &mut Value, target: &mut usize, m: &Mutation) -> bool {
        if *target == 0 {
            match (m.kind, &mut *v) {
                (0, slot) => *slot = m.value.clone(),
                (1, Value::Object(o)) => {
                    let first = o.keys().next().cloned();
                    if let Some(k) = first {
                        o.remove(&k);
                    }
                }
                (1, Value::Array(a)) => {
                    a.pop();
                }
                (_, Value::Object(o)) => {
                    o.insert(m.key.clone(), m.value.clone());
                }
                (_, Value::Array(a)) => a.push(m.value.clone()),
                (_, slot) => *slot = m.value.clone(),
            }
            return true;
        }
        *target -= 1;
        match v {
            Value::Array(a) => a.iter_mut().any(|c| visit(c, target, m)),
            Value::Object(o) => o.values_mut().any(|c| visit(c, target, m)),
            _ => false,
        }
    }
    let mut target = m.at % count(doc);
    visit(doc, &mut target, m);
}

/// What every answer must be: not a 5xx, and a 4xx that says something.
fn check(what: &str, r: &Reply) -> Result<(), TestCaseError> {
    prop_assert!(
        r.status < 500,
        "{what}: {} {}",
        r.status,
        r.text().chars().take(400).collect::<String>()
    );
    if r.status >= 400 {
        prop_assert!(
            !r.message().trim().is_empty(),
            "{what}: {} with no message",
            r.status
        );
    }
    Ok(())
}

fn png(side: u32) -> Vec<u8> {
    let mut out = std::io::Cursor::new(vec![]);
    image::DynamicImage::new_rgb8(side, side)
        .write_to(&mut out, image::ImageFormat::Png)
        .unwrap();
    out.into_inner()
}

/// The in-process app with a dataset of two images in its root and one LoRA in
/// its LoRA folder, so mutated bodies reach the deep checks.
fn app_with_files() -> InProcess {
    let app = InProcess::new(|_, _| {});
    fluxlora::train::shapes::write_dataset(&app.root().join("set"), 2, 64, 3).unwrap();
    let loras = app.dir.path().join("state/loras");
    std::fs::create_dir_all(&loras).unwrap();
    crate::support::write_lora(&loras, "lora", 1);
    app
}

/// (route, valid body) pairs: every POST body the three surfaces take.
fn templates(app: &InProcess) -> Vec<(&'static str, Value)> {
    let set = app.root().join("set");
    let init = base64::engine::general_purpose::STANDARD.encode(png(32));
    let sample =
        json!({"prompt": "a red circle", "width": 32, "height": 32, "steps": 1, "seed": 7});
    vec![
        (
            "/v1/jobs/train",
            json!({
                "output_name": "hostile", "max_train_steps": 1, "learning_rate": 0.001,
                "dataset": {"folders": [set], "resolution": 32, "enable_bucket": false},
                "network": {"rank": 2, "alpha": 2.0},
            }),
        ),
        (
            "/v1/jobs/sample",
            json!({"request": sample, "loras": [{"path": "lora.safetensors", "strength": 0.5}]}),
        ),
        (
            "/v1/sample?format=json",
            json!({"request": sample, "loras": [{"path": "lora.safetensors", "strength": 0.5}]}),
        ),
        (
            "/sdapi/v1/txt2img",
            json!({"prompt": "a circle <lora:lora:0.5>", "steps": 1, "width": 32, "height": 32,
                   "seed": 3, "batch_size": 1, "sampler_name": "Euler"}),
        ),
        (
            "/sdapi/v1/img2img",
            json!({"prompt": "a circle", "steps": 1, "width": 32, "height": 32, "seed": 3,
                   "init_images": [init], "denoising_strength": 0.5}),
        ),
        ("/sdapi/v1/png-info", json!({"image": init})),
        (
            "/prompt",
            json!({"client_id": "hostile", "prompt": {
                "1": {"class_type": "FluxLoraApply", "inputs": {"lora_name": "lora.safetensors", "strength": 0.5}},
                "2": {"class_type": "FluxLoraSample", "inputs": {
                    "prompt": "a circle", "width": 32, "height": 32, "steps": 1, "guidance": 0.0,
                    "seed": 1, "batch_size": 1, "loras": ["1", 0]}},
                "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}},
            }}),
        ),
        (
            "/settings",
            json!({"Comfy.Locale": "en", "Comfy.Sidebar.Size": 2}),
        ),
        (
            "/userdata/workflows%2Fhostile.json",
            json!({"nodes": [], "links": []}),
        ),
        ("/queue", json!({"delete": ["x"], "clear": false})),
        ("/history", json!({"delete": ["x"]})),
    ]
}

#[test]
fn mutated_bodies_of_every_surface_get_4xx_or_run() {
    let app = app_with_files();
    let templates = templates(&app);
    let tried = Cell::new(0usize);
    let accepted = Cell::new(0usize);
    let strategy = (0..templates.len(), mutations());
    runner(160)
        .run(&strategy, |(which, muts)| {
            let (route, template) = &templates[which];
            let mut body = template.clone();
            for m in &muts {
                apply(&mut body, m);
            }
            let r = app.post_json(route, body.to_string().as_bytes());
            tried.set(tried.get() + 1);
            if r.status < 300 {
                accepted.set(accepted.get() + 1);
                app.cancel_all();
            }
            check(&format!("POST {route} {body}"), &r)
        })
        .unwrap_or_else(|e| panic!("{e}"));
    app.cancel_all();
    assert!(app.get("/v1/system").status == 200, "the app still answers");
    println!(
        "hostile bodies: {} mutated bodies over {} routes ({} accepted), peak RSS {} MiB",
        tried.get(),
        templates.len(),
        accepted.get(),
        peak_rss_mib()
    );
}

/// Bytes that are not the JSON a route wants: random JSON documents, random
/// bytes, truncations of a valid body, deep nesting, numbers out of range.
fn raw_body() -> BoxedStrategy<Vec<u8>> {
    prop_oneof![
        3 => json_value().prop_map(|v| v.to_string().into_bytes()),
        2 => prop::collection::vec(any::<u8>(), 0..256),
        1 => (1usize..200_000).prop_map(|n| "[".repeat(n).into_bytes()),
        1 => prop::sample::select(vec![
            "{\"width\": 1e400}", "{\"steps\": 18446744073709551616}", "{\"prompt\": \"\\ud800\"}",
            "{\"a\":1,\"a\":2}", "null", "\"\"", "{", "{\"prompt\": {\"1\": null}}",
            "{\"prompt\": {\"1\": {\"class_type\": \"FluxLoraSample\", \"inputs\": {\"loras\": [\"1\", 0]}}}}",
        ])
        .prop_map(|s| s.as_bytes().to_vec()),
    ]
    .boxed()
}

#[test]
fn random_bytes_to_every_post_route_get_4xx() {
    let app = app_with_files();
    let posts: Vec<String> = fluxlora::server::route_list()
        .into_iter()
        .filter(|(m, _)| m.as_str() == "POST")
        .map(|(_, p)| crate::support::concrete(&p, "none"))
        .collect();
    let tried = Cell::new(0usize);
    let strategy = (0..posts.len(), raw_body(), any::<bool>());
    runner(160)
        .run(&strategy, |(which, body, as_json)| {
            let route = &posts[which];
            let mut req = TestRequest::post().uri(route).set_payload(body.clone());
            if as_json {
                req = req.insert_header(("Content-Type", "application/json"));
            }
            let r = app.send(req);
            tried.set(tried.get() + 1);
            if r.status < 300 {
                app.cancel_all();
            }
            check(
                &format!(
                    "POST {route} {}",
                    String::from_utf8_lossy(&body[..body.len().min(200)])
                ),
                &r,
            )
        })
        .unwrap_or_else(|e| panic!("{e}"));
    app.cancel_all();
    println!(
        "hostile bodies: {} random bodies over {} POST routes, peak RSS {} MiB",
        tried.get(),
        posts.len(),
        peak_rss_mib()
    );
}

/// A node of a random graph: its id, class (ours, ComfyUI's, or made up) and
/// inputs (values, or links `[id, index]` to random ids).
fn random_node() -> impl Strategy<Value = (String, Value)> {
    let classes = prop_oneof![
        3 => prop::sample::select(vec![
            "FluxLoraApply", "FluxLoraDataset", "FluxLoraLiveAdapter", "FluxLoraLossGraph",
            "FluxLoraSample", "FluxLoraTrain", "FluxLoraTrainingOptions", "LoadImage",
            "PreviewImage", "SaveImage",
        ])
        .prop_map(|s| Value::from(s)),
        1 => json_value(),
    ];
    let id = prop_oneof![
        3 => (0u8..6).prop_map(|i| i.to_string()),
        1 => text(),
    ];
    let input = prop_oneof![
        2 => json_value(),
        2 => ((0u8..6).prop_map(|i| i.to_string()), -2i64..4)
            .prop_map(|(id, slot)| json!([id, slot])),
    ];
    let inputs = prop::collection::btree_map(
        prop_oneof![
            3 => prop::sample::select(vec![
                "prompt", "width", "height", "steps", "seed", "batch_size", "images", "image",
                "loras", "lora_name", "strength", "dataset", "folder", "options", "filename_prefix",
                "guidance", "denoise", "max_train_steps", "resolution", "rank",
            ])
            .prop_map(str::to_string),
            1 => text(),
        ],
        input,
        0..8,
    );
    (id, classes, inputs).prop_map(|(id, class, inputs)| {
        let node =
            json!({"class_type": class, "inputs": Value::Object(inputs.into_iter().collect())});
        (id, node)
    })
}

#[test]
fn random_comfyui_graphs_get_validation_errors_not_crashes() {
    let app = app_with_files();
    let tried = Cell::new(0usize);
    let queued = Cell::new(0usize);
    let strategy = prop::collection::vec(random_node(), 0..8);
    runner(160)
        .run(&strategy, |nodes| {
            let graph: Map<String, Value> = nodes.into_iter().collect();
            let body = json!({"prompt": graph, "client_id": "fuzz"});
            let r = app.post_json("/prompt", body.to_string().as_bytes());
            tried.set(tried.get() + 1);
            if r.status < 300 {
                queued.set(queued.get() + 1);
                let _ = app.post_json("/interrupt", b"{}");
                let _ = app.post_json("/queue", br#"{"clear": true}"#);
                app.cancel_all();
            }
            check(&format!("POST /prompt {body}"), &r)
        })
        .unwrap_or_else(|e| panic!("{e}"));
    println!(
        "hostile graphs: {} random graphs ({} queued)",
        tried.get(),
        queued.get()
    );
}

/// Percent-encodes every byte but unreserved ones (RFC 3986).
pub(super) fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[test]
fn random_path_parameters_and_queries_on_every_route_get_4xx_or_an_answer() {
    let app = app_with_files();
    let outside_before = files_under(app.dir.path())
        .into_iter()
        .filter(|p| !p.starts_with("state") && !p.starts_with("data"))
        .count();
    // WebSockets upgrade and never end: `auth` and `server` cover them.
    let routes: Vec<(String, String)> = fluxlora::server::route_list()
        .into_iter()
        .filter(|(_, p)| !p.ends_with("/ws"))
        .map(|(m, p)| (m.as_str().to_string(), p))
        .collect();
    let keys = prop_oneof![
        3 => prop::sample::select(vec![
            "filename", "subfolder", "type", "preview", "channel", "dir", "recurse", "split",
            "full_info", "overwrite", "max_items", "offset", "limit", "since", "jobs", "format",
            "status", "sort_order", "previews", "queue", "clientId",
        ])
        .prop_map(str::to_string),
        1 => text(),
    ];
    let values = prop_oneof![
        3 => text(),
        1 => number().prop_map(|n| n.to_string()),
    ];
    let query = prop::collection::vec((keys, values), 0..5);
    let segments = prop::collection::vec(text(), 1..4);
    let tried = Cell::new(0usize);
    let strategy = (0..routes.len(), segments, query);
    runner(200)
        .run(&strategy, |(which, segments, query)| {
            let (method, pattern) = &routes[which];
            let mut segment = segments.iter().cycle();
            let path: Vec<String> = pattern
                .split('/')
                .map(|s| match s.starts_with('{') {
                    true => encode(segment.next().map_or("", String::as_str)),
                    false => s.to_string(),
                })
                .collect();
            let query: Vec<String> = query
                .iter()
                .map(|(k, v)| format!("{}={}", encode(k), encode(v)))
                .collect();
            let uri = format!("{}?{}", path.join("/"), query.join("&"));
            let req = TestRequest::default()
                .method(method.parse().unwrap())
                .uri(&uri);
            let r = app.send(req);
            tried.set(tried.get() + 1);
            if r.status < 300 && method == "POST" {
                app.cancel_all();
            }
            check(&format!("{method} {uri}"), &r)
        })
        .unwrap_or_else(|e| panic!("{e}"));
    let outside_after = files_under(app.dir.path())
        .into_iter()
        .filter(|p| !p.starts_with("state") && !p.starts_with("data"))
        .count();
    assert_eq!(
        outside_before, outside_after,
        "a request wrote outside the data dir"
    );
    println!(
        "hostile queries: {} requests with random path parameters and queries over {} routes",
        tried.get(),
        routes.len()
    );
}

/// One multipart part: name, file name, content type, bytes.
type PartSpec = (String, Option<String>, Vec<u8>);

fn part() -> impl Strategy<Value = PartSpec> {
    let name = prop_oneof![
        3 => prop::sample::select(vec!["image", "subfolder", "type", "overwrite"]).prop_map(str::to_string),
        1 => text(),
    ];
    let data = prop_oneof![
        2 => Just(png(16)),
        2 => Just(png(16)).prop_flat_map(|p| {
            let n = p.len();
            (Just(p), 0..n).prop_map(|(p, cut)| p[..cut].to_vec())
        }),
        2 => text().prop_map(String::into_bytes),
        1 => prop::collection::vec(any::<u8>(), 0..512),
    ];
    (name, prop::option::of(text()), data)
}

/// A multipart body of `parts` with `boundary`, optionally cut short.
fn multipart(boundary: &str, parts: &[PartSpec], cut: Option<usize>) -> Vec<u8> {
    let mut body = vec![];
    for (name, filename, data) in parts {
        body.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
        let mut disposition = format!("Content-Disposition: form-data; name=\"{name}\"");
        if let Some(f) = filename {
            disposition.push_str(&format!("; filename=\"{f}\""));
        }
        body.extend_from_slice(disposition.as_bytes());
        body.extend_from_slice(b"\r\n\r\n");
        body.extend_from_slice(data);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    if let Some(cut) = cut {
        body.truncate(cut % (body.len() + 1));
    }
    body
}

#[test]
fn random_multipart_uploads_land_in_the_input_folder_or_get_4xx() {
    let app = app_with_files();
    let tried = Cell::new(0usize);
    let stored = Cell::new(0usize);
    // Boundaries a client could send in a header: printable ASCII.
    let boundary = prop_oneof![
        3 => Just("hostileboundary".to_string()),
        1 => prop::collection::vec(0x20u8..0x7f, 0..80)
            .prop_map(|b| String::from_utf8(b).unwrap()),
    ];
    let strategy = (
        boundary,
        prop::collection::vec(part(), 0..5),
        prop::option::of(any::<usize>()),
    );
    let state = app.dir.path().join("state");
    runner(160)
        .run(&strategy, |(boundary, parts, cut)| {
            let body = multipart(&boundary, &parts, cut);
            let req = TestRequest::post()
                .uri("/upload/image")
                .insert_header((
                    "Content-Type",
                    format!("multipart/form-data; boundary={boundary}"),
                ))
                .set_payload(body);
            let r = app.send(req);
            tried.set(tried.get() + 1);
            check(&format!("upload {parts:?}"), &r)?;
            if r.status == 200 {
                stored.set(stored.get() + 1);
                let answer = r.json();
                let name = answer["name"].as_str().unwrap_or_default();
                let sub = answer["subfolder"].as_str().unwrap_or_default();
                let kind = answer["type"].as_str().unwrap_or("input");
                let file = state.join(kind).join(sub).join(name);
                prop_assert!(file.is_file(), "{answer} names no file");
                prop_assert!(
                    file.canonicalize()
                        .unwrap()
                        .starts_with(state.canonicalize().unwrap()),
                    "{answer} is outside the data dir"
                );
            }
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{e}"));
    println!(
        "hostile uploads: {} random multipart uploads ({} stored)",
        tried.get(),
        stored.get()
    );
}
