//! Hostile files and oversized bodies: malformed, truncated and lying
//! safetensors as LoRAs (inspected, sampled with through `/v1` and A1111's
//! `<lora:>` tags, queued with a sampling job); malformed, truncated and bomb
//! images as uploads, img2img start images (A1111 base64 and `/v1` init
//! images), PNG info and in training datasets; and bodies and uploads over the
//! configured limits on every POST route. Each is refused with a 4xx that says
//! what is wrong (or, for a queued job, the job fails with such a message), and
//! the daemon keeps answering.

use std::collections::BTreeMap;

use actix_web::test::TestRequest;
use base64::Engine as _;
use serde_json::{json, Value};

use super::{files_under, InProcess, Reply};

/// A safetensors file from `(name, dtype, shape, data)`, with `header` edits.
fn safetensors(
    tensors: &[(String, String, Vec<u64>, Vec<u8>)],
    edit: impl FnOnce(&mut Value),
) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let mut data = vec![];
    for (name, dtype, shape, bytes) in tensors {
        let start = data.len();
        data.extend_from_slice(bytes);
        header.insert(
            name.clone(),
            json!({"dtype": dtype, "shape": shape, "data_offsets": [start, data.len()]}),
        );
    }
    let mut header = Value::Object(header);
    edit(&mut header);
    let mut text = header.to_string();
    while text.len() % 8 != 0 {
        text.push(' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(&data);
    out
}

/// The tensors of a valid LoRA file, as `(name, dtype, shape, data)`.
fn tensors_of(bytes: &[u8]) -> Vec<(String, String, Vec<u64>, Vec<u8>)> {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: BTreeMap<String, Value> = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    header
        .into_iter()
        .filter(|(k, _)| k != "__metadata__")
        .map(|(k, v)| {
            let offsets: Vec<usize> = serde_json::from_value(v["data_offsets"].clone()).unwrap();
            (
                k,
                v["dtype"].as_str().unwrap().to_string(),
                serde_json::from_value(v["shape"].clone()).unwrap(),
                bytes[8 + n + offsets[0]..8 + n + offsets[1]].to_vec(),
            )
        })
        .collect()
}

/// Bad LoRA files, by name: every way a safetensors file can lie or break.
fn bad_loras(valid: &[u8]) -> Vec<(String, Vec<u8>)> {
    let tensors = tensors_of(valid);
    let header_end = 8 + u64::from_le_bytes(valid[..8].try_into().unwrap()) as usize;
    let with_len = |n: u64, rest: &[u8]| {
        let mut b = n.to_le_bytes().to_vec();
        b.extend_from_slice(rest);
        b
    };
    let first_down = tensors
        .iter()
        .position(|t| t.0.ends_with("lora_down.weight"))
        .expect("a down weight");
    let edited = |f: &dyn Fn(&mut Vec<(String, String, Vec<u64>, Vec<u8>)>)| {
        let mut t = tensors.clone();
        f(&mut t);
        safetensors(&t, |_| {})
    };
    let mut out: Vec<(String, Vec<u8>)> = vec![
        ("empty".into(), vec![]),
        ("three-bytes".into(), vec![1, 2, 3]),
        ("huge-header-length".into(), with_len(u64::MAX, b"{}")),
        ("header-length-1TiB".into(), with_len(1 << 40, b"{}")),
        (
            "header-length-past-the-end".into(),
            with_len(4096, b"{\"a\": {\"dtype\":"),
        ),
        ("header-not-json".into(), with_len(8, b"not json")),
        ("header-a-list".into(), with_len(8, b"[1,2,3] ")),
        (
            "header-not-utf8".into(),
            with_len(8, &[0xff, 0xfe, 0xfd, 0xfc, 0, 1, 2, 3]),
        ),
        (
            "data-past-the-end".into(),
            safetensors(&tensors, |h| {
                let name = tensors[first_down].0.clone();
                h[&name]["data_offsets"] = json!([0, 1 << 30]);
            }),
        ),
        (
            "offsets-reversed".into(),
            safetensors(&tensors, |h| {
                let name = tensors[first_down].0.clone();
                h[&name]["data_offsets"] = json!([64, 0]);
            }),
        ),
        (
            "shape-that-overflows".into(),
            safetensors(&tensors, |h| {
                let name = tensors[first_down].0.clone();
                h[&name]["shape"] = json!([u64::MAX / 2, 4]);
            }),
        ),
        (
            "shape-larger-than-data".into(),
            safetensors(&tensors, |h| {
                let name = tensors[first_down].0.clone();
                h[&name]["shape"] = json!([4096, 4096]);
            }),
        ),
        (
            "unknown-dtype".into(),
            safetensors(&tensors, |h| {
                let name = tensors[first_down].0.clone();
                h[&name]["dtype"] = json!("Q4");
            }),
        ),
        (
            "metadata-not-strings".into(),
            safetensors(&tensors, |h| {
                h["__metadata__"] = json!({"ss_network_dim": 4, "x": [1]})
            }),
        ),
        (
            "integer-weights".into(),
            edited(&|t| {
                for (_, dtype, _, _) in t.iter_mut() {
                    *dtype = "I32".into();
                }
            }),
        ),
        (
            "rank-mismatch".into(),
            edited(&|t| {
                let (_, _, shape, data) = &mut t[first_down];
                let rank = shape[0];
                shape[0] = rank + 1;
                data.extend(std::iter::repeat_n(0u8, (shape[1] * 4) as usize));
            }),
        ),
        (
            "wrong-input-width".into(),
            edited(&|t| {
                let (_, _, shape, data) = &mut t[first_down];
                *shape = vec![shape[0], 7];
                *data = vec![0u8; (shape[0] * 7 * 4) as usize];
            }),
        ),
        (
            "alpha-not-a-scalar".into(),
            edited(&|t| {
                for (name, _, shape, data) in t.iter_mut() {
                    if name.ends_with(".alpha") {
                        *shape = vec![3];
                        *data = vec![0u8; 12];
                    }
                }
            }),
        ),
        (
            "no-lora-keys".into(),
            safetensors(
                &[("model.weight".into(), "F32".into(), vec![2], vec![0; 8])],
                |_| {},
            ),
        ),
        (
            "down-without-up".into(),
            edited(&|t| t.retain(|(name, ..)| !name.ends_with("lora_up.weight"))),
        ),
    ];
    for cut in [
        4,
        8,
        9,
        header_end / 2,
        header_end - 1,
        header_end,
        header_end + 3,
        valid.len() - 1,
    ] {
        out.push((format!("truncated-at-{cut}"), valid[..cut].to_vec()));
    }
    // Every digit of the header a 9: offsets and shapes that lie.
    let mut nines = valid.to_vec();
    for b in &mut nines[8..header_end] {
        if b.is_ascii_digit() {
            *b = b'9';
        }
    }
    out.push(("header-digits-all-nines".into(), nines));
    out
}

fn assert_refused(what: &str, r: &Reply) {
    assert!(
        (400..500).contains(&r.status),
        "{what}: {} {}",
        r.status,
        r.text().chars().take(300).collect::<String>()
    );
    assert!(
        !r.message().trim().is_empty(),
        "{what}: a {} without a message",
        r.status
    );
}

/// Waits for a queued job to end; its record.
fn wait(app: &InProcess, id: &str) -> Value {
    loop {
        let job = app.get(&format!("/v1/jobs/{id}")).json();
        if ["finished", "failed", "cancelled"].contains(&job["state"].as_str().unwrap_or("")) {
            return job;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// A queued job's outcome for a bad input: refused at once, or failed with a
/// message that names `name`.
fn refused_or_failed(app: &InProcess, what: &str, name: &str, r: &Reply) {
    if r.status == 202 {
        let id = r.json()["id"].as_str().unwrap().to_string();
        let job = wait(app, &id);
        assert_eq!(job["state"], "failed", "{what}: {job}");
        assert!(
            job.to_string().contains(name),
            "{what}: the failure does not name {name}: {job}"
        );
    } else {
        assert_refused(what, r);
    }
}

/// Odd but readable: integer tensors are cast to the compute dtype, as
/// safetensors readers do.
const LOADABLE: &[&str] = &["integer-weights"];

#[test]
fn bad_lora_files_are_refused_wherever_a_lora_is_read() {
    let app = InProcess::new(|_, _| {});
    let loras = app.dir.path().join("state/loras");
    std::fs::create_dir_all(&loras).unwrap();
    let valid = std::fs::read(crate::support::write_lora(&loras, "valid", 1)).unwrap();
    let mut tried = 0usize;
    let bad = bad_loras(&valid);
    for (name, bytes) in &bad {
        let file = format!("{name}.safetensors");
        std::fs::write(loras.join(&file), bytes).unwrap();
        // Listing and inspecting: an answer, never a 5xx.
        let listed = app.get("/v1/loras");
        assert_eq!(listed.status, 200, "{name}: {}", listed.text());
        let inspected = app.get(&format!("/v1/loras/{file}"));
        assert!(
            inspected.status < 500,
            "inspect {name}: {} {}",
            inspected.status,
            inspected.text()
        );
        let small = json!({"prompt": "x", "width": 32, "height": 32, "steps": 1});
        if LOADABLE.contains(&name.as_str()) {
            let r = app.post_json(
                "/v1/sample?format=json",
                json!({"request": small, "loras": [{"path": file}]})
                    .to_string()
                    .as_bytes(),
            );
            assert!(r.status < 500, "{name}: {} {}", r.status, r.text());
            tried += 2;
            std::fs::remove_file(loras.join(&file)).unwrap();
            continue;
        }
        let now = app.post_json(
            "/v1/sample?format=json",
            json!({"request": small, "loras": [{"path": file}]})
                .to_string()
                .as_bytes(),
        );
        assert_refused(&format!("/v1/sample with {name}"), &now);
        let queued = app.post_json(
            "/v1/jobs/sample",
            json!({"request": small, "loras": [{"path": file}]})
                .to_string()
                .as_bytes(),
        );
        refused_or_failed(&app, &format!("/v1/jobs/sample with {name}"), name, &queued);
        let a1111 = app.post_json(
            "/sdapi/v1/txt2img",
            json!({"prompt": format!("x <lora:{name}:1>"), "steps": 1, "width": 32, "height": 32})
                .to_string()
                .as_bytes(),
        );
        assert_refused(&format!("A1111 <lora:{name}>"), &a1111);
        tried += 5;
        std::fs::remove_file(loras.join(&file)).unwrap();
    }
    // The valid one still works after all that.
    let ok = app.post_json(
        "/v1/sample?format=json",
        br#"{"request": {"prompt": "x", "width": 32, "height": 32, "steps": 1}, "loras": [{"path": "valid.safetensors"}]}"#,
    );
    assert_eq!(ok.status, 200, "{}", ok.text());
    println!("hostile LoRA files: {} files, {tried} requests", bad.len());
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn chunk(kind: &[u8], data: &[u8]) -> Vec<u8> {
    let mut out = (data.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let mut crc_input = kind.to_vec();
    crc_input.extend_from_slice(data);
    out.extend_from_slice(&crc32(&crc_input).to_be_bytes());
    out
}

/// A PNG whose header claims `width` × `height` RGB pixels, with a few bytes of
/// (valid, zlib-compressed) image data: a decoder that believes the header
/// before checking its limits allocates `width * height * 3` bytes.
fn png_claiming(width: u32, height: u32) -> Vec<u8> {
    let mut ihdr = width.to_be_bytes().to_vec();
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    // zlib: a stored block of 16 zero bytes.
    let mut idat = vec![0x78, 0x01, 0x01, 16, 0, !16u8, 0xff];
    idat.extend_from_slice(&[0u8; 16]);
    idat.extend_from_slice(&[0, 0, 0, 16]);
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    out.extend(chunk(b"IHDR", &ihdr));
    out.extend(chunk(b"IDAT", &idat));
    out.extend(chunk(b"IEND", &[]));
    out
}

fn encoded(format: image::ImageFormat, side: u32) -> Vec<u8> {
    let mut out = std::io::Cursor::new(vec![]);
    image::DynamicImage::new_rgb8(side, side)
        .write_to(&mut out, format)
        .unwrap();
    out.into_inner()
}

/// A JPEG whose frame header claims 65500 × 65500 pixels.
fn jpeg_claiming_65500() -> Vec<u8> {
    let mut jpeg = encoded(image::ImageFormat::Jpeg, 16);
    let sof = jpeg
        .windows(2)
        .position(|w| w == [0xFF, 0xC0])
        .expect("a baseline frame");
    jpeg[sof + 5..sof + 9].copy_from_slice(&[0xFF, 0xDC, 0xFF, 0xDC]);
    jpeg
}

/// Bad images, by file name.
fn bad_images() -> Vec<(&'static str, Vec<u8>)> {
    let png = encoded(image::ImageFormat::Png, 32);
    vec![
        ("empty.png", vec![]),
        (
            "noise.png",
            (0..2048u32)
                .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
                .collect(),
        ),
        ("text.jpg", b"hello, not a jpeg".to_vec()),
        ("truncated.png", png[..png.len() / 2].to_vec()),
        ("header-only.png", png[..33].to_vec()),
        ("bomb-100000x100000.png", png_claiming(100_000, 100_000)),
        ("bomb-1x2147483647.png", png_claiming(1, i32::MAX as u32)),
        ("bomb-0x0.png", png_claiming(0, 0)),
        ("bomb-65500x65500.jpg", jpeg_claiming_65500()),
        (
            "garbage.webp",
            b"RIFF\x10\x00\x00\x00WEBPVP8 \x04\x00\x00\x00junk".to_vec(),
        ),
    ]
}

fn upload(name: &str, bytes: &[u8]) -> TestRequest {
    let boundary = "filesboundary";
    let mut body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{name}\"\r\nContent-Type: image/png\r\n\r\n"
    )
    .into_bytes();
    body.extend_from_slice(bytes);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    TestRequest::post()
        .uri("/upload/image")
        .insert_header((
            "Content-Type",
            format!("multipart/form-data; boundary={boundary}"),
        ))
        .set_payload(body)
}

#[test]
fn bad_images_are_refused_as_uploads_start_images_and_dataset_files() {
    let app = InProcess::new(|_, _| {});
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let input = app.dir.path().join("state/input");
    let mut tried = 0usize;
    let images = bad_images();
    for (name, bytes) in &images {
        let r = app.send(upload(name, bytes));
        assert_refused(&format!("upload {name}"), &r);
        assert!(!input.join(name).exists(), "upload {name} was written");
        for init in [b64(bytes), format!("data:image/png;base64,{}", b64(bytes))] {
            let r = app.post_json(
                "/sdapi/v1/img2img",
                json!({"prompt": "x", "steps": 1, "width": 32, "height": 32, "init_images": [init]})
                    .to_string()
                    .as_bytes(),
            );
            assert_refused(&format!("img2img {name}"), &r);
        }
        let info = app.post_json(
            "/sdapi/v1/png-info",
            json!({"image": b64(bytes)}).to_string().as_bytes(),
        );
        assert!(
            info.status < 500,
            "png-info {name}: {} {}",
            info.status,
            info.text()
        );
        let path = app.root().join(name);
        std::fs::write(&path, bytes).unwrap();
        let r = app.post_json(
            "/v1/jobs/sample",
            json!({"request": {"prompt": "x", "width": 32, "height": 32, "steps": 1, "init_image": path}})
                .to_string()
                .as_bytes(),
        );
        refused_or_failed(&app, &format!("/v1 init_image {name}"), name, &r);
        tried += 5;
    }
    for (what, init) in [("not base64", "@@@not base64@@@"), ("empty", "")] {
        let r = app.post_json(
            "/sdapi/v1/img2img",
            json!({"prompt": "x", "steps": 1, "init_images": [init]})
                .to_string()
                .as_bytes(),
        );
        assert_refused(&format!("img2img {what}"), &r);
        tried += 1;
    }
    // Training over a folder with one bad image among good ones: the job fails
    // naming the file, or trains on the rest; the daemon goes on.
    let mut trained = 0usize;
    for (name, bytes) in &images {
        let folder = app.root().join(format!("set-{name}"));
        fluxlora::train::shapes::write_dataset(&folder, 2, 32, 1).unwrap();
        std::fs::write(folder.join(name), bytes).unwrap();
        let r = app.post_json(
            "/v1/jobs/train",
            json!({"output_name": format!("bad-{trained}"), "max_train_steps": 1,
                   "dataset": {"folders": [folder], "resolution": 32, "enable_bucket": false},
                   "network": {"rank": 2, "alpha": 2.0}})
            .to_string()
            .as_bytes(),
        );
        trained += 1;
        if r.status != 202 {
            assert_refused(&format!("training with {name}"), &r);
            assert!(r.message().contains(name), "{name}: {}", r.message());
            continue;
        }
        let job = wait(&app, r.json()["id"].as_str().unwrap());
        match job["state"].as_str() {
            Some("failed") => assert!(job.to_string().contains(name), "{name}: {job}"),
            Some("finished") => {}
            _ => panic!("training with {name}: {job}"),
        }
    }
    assert_eq!(app.get("/v1/system").status, 200);
    println!(
        "hostile images: {} images, {tried} upload/img2img/init-image requests, {trained} training jobs",
        images.len()
    );
}

/// The POST routes that read a body (ComfyUI's also under `/api`).
const BODY_READERS: &[&str] = &[
    "/v1/jobs/train",
    "/v1/jobs/sample",
    "/v1/sample",
    "/sdapi/v1/txt2img",
    "/sdapi/v1/img2img",
    "/sdapi/v1/png-info",
    "/sdapi/v1/options",
    "/prompt",
    "/fluxlora/run",
    "/queue",
    "/history",
    "/settings",
    "/userdata",
    "/upload/image",
];

#[test]
fn bodies_and_uploads_over_the_limits_get_413_on_every_post_route() {
    let app = InProcess::new(|_, _| {});
    // 64 KiB JSON bodies, 1 MiB uploads (InProcess's settings).
    let json_body = json!({"prompt": "x".repeat(70 * 1024)}).to_string();
    let upload_body = vec![b'x'; (1 << 20) + 1];
    let mut tried = 0usize;
    let mut limited = 0usize;
    let mut readers = 0usize;
    for (method, pattern) in fluxlora::server::route_list() {
        if method.as_str() != "POST" {
            continue;
        }
        let uri = crate::support::concrete(&pattern, "none.json");
        for body in [json_body.as_bytes(), &upload_body[..]] {
            let r = app.send(
                TestRequest::post()
                    .uri(&uri)
                    .insert_header(("Content-Type", "application/json"))
                    .set_payload(body.to_vec()),
            );
            tried += 1;
            assert!(r.status < 500, "{uri}: {} {}", r.status, r.text());
            if r.status == 413 {
                limited += 1;
                assert!(r.message().contains("limit"), "{uri}: {}", r.text());
            }
        }
        // Routes that read a body refuse one over the upload limit (which is
        // over the JSON limit too); the others (`/interrupt`, job actions,
        // `/refresh-loras`, userdata moves) do not read it.
        let reads_body = !uri.contains("/move/")
            && BODY_READERS.iter().any(|r| {
                uri == *r || uri == format!("/api{r}") || uri.starts_with(&format!("{r}/"))
            });
        if reads_body {
            let r = app.send(
                TestRequest::post()
                    .uri(&uri)
                    .insert_header(("Content-Type", "application/json"))
                    .set_payload(upload_body.clone()),
            );
            assert_eq!(r.status, 413, "{uri}: {}", r.text());
            readers += 1;
        }
    }
    assert!(
        readers >= BODY_READERS.len(),
        "{readers} body-reading routes"
    );
    let upload = app.send(upload("big.png", &upload_body));
    assert_eq!(upload.status, 413, "{}", upload.text());
    assert!(upload.message().contains("limit"));
    assert!(files_under(&app.dir.path().join("state"))
        .iter()
        .all(|p| !p.ends_with("big.png")));
    assert_eq!(
        app.get("/v1/system").status,
        200,
        "the daemon still answers"
    );
    println!(
        "hostile sizes: {tried} oversized requests over the POST routes, {limited} answered 413"
    );
}
