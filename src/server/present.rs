//! How events are presented to clients: the one wire form that REST
//! (`GET /v1/jobs/{id}/events`) and WebSocket (`/v1/ws`) serve alike.
//!
//! An event goes out as the engine writes it (`{"seq", "job", "type", "time",
//! "data"}`), plus a URL for every file it names inside its job's folder: beside
//! `data.path` a `data.url`, beside `data.paths` a `data.urls` (one per path, in
//! order), each `/v1/jobs/{id}/files/…` or null for a file outside the folder,
//! so clients on other machines can fetch samples and LoRAs.
//!
//! Must not: change jobs or send anything; it only shapes JSON.

use std::path::{Component, Path};

use serde_json::{json, Value};

use crate::engine::events::Event;
use crate::engine::Engine;

/// The key a URL is added under beside each file key of an event's `data`.
pub(crate) const FILE_URL_KEYS: [(&str, &str); 2] = [("path", "url"), ("paths", "urls")];

/// `event` as clients receive it.
pub(crate) fn event(engine: &Engine, event: &Event) -> Value {
    in_folder(&engine.job_dir(&event.job), event)
}

/// `event` as clients receive it, its job's folder being `job_dir`.
pub(crate) fn in_folder(job_dir: &Path, event: &Event) -> Value {
    let mut json = event.to_json();
    add_file_urls(job_dir, &event.job, &mut json["data"]);
    json
}

/// Adds `url`/`urls` beside `path`/`paths` in an event's `data`.
fn add_file_urls(job_dir: &Path, job: &str, data: &mut Value) {
    let url = |path: &Value| -> Value {
        let rel = path
            .as_str()
            .and_then(|p| Path::new(p).strip_prefix(job_dir).ok())
            .filter(|rel| rel.components().all(|c| matches!(c, Component::Normal(_))));
        match rel {
            Some(rel) => {
                let segments: Vec<String> = rel
                    .components()
                    .map(|c| percent_encode(&c.as_os_str().to_string_lossy()))
                    .collect();
                json!(format!(
                    "/v1/jobs/{}/files/{}",
                    percent_encode(job),
                    segments.join("/")
                ))
            }
            None => Value::Null,
        }
    };
    let [(path_key, url_key), (paths_key, urls_key)] = FILE_URL_KEYS;
    if let Some(path) = data.get(path_key) {
        let u = url(path);
        data[url_key] = u;
    }
    if let Some(paths) = data.get(paths_key).and_then(|p| p.as_array()) {
        let urls: Vec<Value> = paths.iter().map(url).collect();
        data[urls_key] = json!(urls);
    }
}

/// `text` with everything but RFC 3986 unreserved characters percent-encoded.
fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::engine::events::EventKind;
    use crate::train::events::TrainEvent;

    #[test]
    fn files_inside_the_job_folder_get_urls_and_others_null() {
        let dir = PathBuf::from("/data/jobs/j 1");
        let saved = Event {
            seq: 3,
            job: "j 1".into(),
            time: 0.0,
            kind: EventKind::Train {
                event: TrainEvent::Saved {
                    step: 2,
                    path: dir.join("checkpoints/a b.safetensors"),
                },
            },
        };
        let wire = in_folder(&dir, &saved);
        assert_eq!(
            wire["data"]["url"],
            "/v1/jobs/j%201/files/checkpoints/a%20b.safetensors"
        );
        let images = Event {
            kind: EventKind::Images {
                paths: vec![dir.join("samples/0.png"), PathBuf::from("/etc/passwd")],
            },
            ..saved
        };
        let wire = in_folder(&dir, &images);
        assert_eq!(
            wire["data"]["urls"],
            json!(["/v1/jobs/j%201/files/samples/0.png", null])
        );
        assert_eq!(wire["type"], "images");
        assert_eq!(wire["seq"], 3);
    }
}
