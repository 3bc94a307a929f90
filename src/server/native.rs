//! The native `/v1` API: jobs (train, sample), control, event replay, job files,
//! synchronous sampling and system information. Handlers translate HTTP into
//! engine calls and back; nothing else.

use std::path::{Component, Path, PathBuf};

use actix_web::{web, HttpResponse};
use serde::Deserialize;
use serde_json::json;

use super::errors::ApiError;
use super::AppState;
use crate::engine::events::JobState;
use crate::engine::{Control, Engine, JobRequest, SampleJob};
use crate::sample::generate::ResolvedRequest;
use crate::train::config::TrainConfig;

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/v1/system", web::get().to(system))
        .route("/v1/jobs", web::get().to(list_jobs))
        .route("/v1/jobs/train", web::post().to(submit_train))
        .route("/v1/jobs/sample", web::post().to(submit_sample))
        .route("/v1/jobs/{id}", web::get().to(get_job))
        .route("/v1/jobs/{id}", web::delete().to(delete_job))
        .route("/v1/loras", web::get().to(list_loras))
        .route("/v1/loras/{name}", web::get().to(get_lora))
        .route("/v1/jobs/{id}/events", web::get().to(job_events))
        .route("/v1/jobs/{id}/files/{path:.*}", web::get().to(job_file))
        .route("/v1/jobs/{id}/{action}", web::post().to(control_job))
        .route("/v1/sample", web::post().to(sample_now))
        .route("/v1/models", web::get().to(list_models))
        .route("/v1/openapi.json", web::get().to(openapi))
        .route("/v1/nodes", web::get().to(nodes))
        .route("/v1/ws", web::get().to(super::ws::connect));
}

async fn openapi() -> HttpResponse {
    HttpResponse::Ok().json(super::openapi::document())
}

/// Node definitions in ComfyUI's `/object_info` format, the LoRA loader's list
/// filled from the LoRA folder.
async fn nodes(state: web::Data<AppState>) -> HttpResponse {
    let loras = state
        .lora_dir
        .as_deref()
        .map(crate::nodes::lora_names)
        .unwrap_or_default();
    HttpResponse::Ok().json(crate::nodes::object_info(&loras))
}

/// The loaded model, and the model files and folders the daemon can see (a
/// different one is chosen with `serve --model` at start).
async fn list_models(state: web::Data<AppState>) -> HttpResponse {
    let mut available = vec![json!({"name": "tiny", "kind": "builtin"})];
    for dir in &state.model_dirs {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        let mut found: Vec<_> = entries
            .flatten()
            .map(|e| e.path())
            .filter_map(|path| {
                let kind = if path.is_dir() {
                    "folder"
                } else if path
                    .extension()
                    .is_some_and(|e| e == "safetensors" || e == "sft")
                {
                    "file"
                } else {
                    return None;
                };
                let name = path.file_name()?.to_string_lossy().into_owned();
                Some(json!({"name": name, "kind": kind, "path": path}))
            })
            .collect();
        found.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
        available.extend(found);
    }
    HttpResponse::Ok().json(json!({
        "loaded": {
            "name": state.model_name,
            "path": state.model_path,
            "device": state.device,
            "dtype": state.dtype,
        },
        "available": available,
    }))
}

async fn system(state: web::Data<AppState>) -> HttpResponse {
    let jobs = state.engine.jobs();
    let queued = jobs.iter().filter(|j| j.state == JobState::Queued).count();
    let running = jobs.iter().filter(|j| j.state == JobState::Running).count();
    HttpResponse::Ok().json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "model": state.model_name,
        "device": state.device,
        "dtype": state.dtype,
        "memory_bytes": crate::train::events::memory_bytes(),
        "peak_memory_bytes": crate::train::events::peak_memory_bytes(),
        "queue": {"queued": queued, "running": running},
        "subscribers": state.engine.subscribers(),
    }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JobFilter {
    /// Only jobs in this state.
    #[serde(default)]
    state: Option<JobState>,
    /// Only `train` or `sample` jobs.
    #[serde(default)]
    kind: Option<crate::engine::store::JobKind>,
    /// Only the newest N (after filtering), still oldest first.
    #[serde(default)]
    limit: Option<usize>,
    /// The token, when sent as a query parameter (checked by the guard).
    #[serde(default, rename = "token")]
    _token: Option<String>,
}

async fn list_jobs(state: web::Data<AppState>, filter: web::Query<JobFilter>) -> HttpResponse {
    let mut jobs: Vec<_> = state
        .engine
        .jobs()
        .into_iter()
        .filter(|j| filter.state.is_none_or(|s| j.state == s))
        .filter(|j| filter.kind.as_ref().is_none_or(|k| &j.kind == k))
        .collect();
    if let Some(limit) = filter.limit {
        jobs.drain(..jobs.len().saturating_sub(limit));
    }
    HttpResponse::Ok().json(jobs)
}

async fn get_job(
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(state.engine.job(&id)?))
}

async fn delete_job(
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    state.engine.delete(&id)?;
    Ok(HttpResponse::NoContent().finish())
}

/// The LoRA folder's `.safetensors` files: name, size, modification time.
async fn list_loras(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let Some(dir) = &state.lora_dir else {
        return Ok(HttpResponse::Ok().json(json!([])));
    };
    let mut loras = vec![];
    for entry in std::fs::read_dir(dir)
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .flatten()
    {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "safetensors") {
            continue;
        }
        let meta = entry
            .metadata()
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        let modified = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_secs_f64());
        loras.push(json!({
            "name": entry.file_name().to_string_lossy(),
            "path": path,
            "size": meta.len(),
            "modified": modified,
        }));
    }
    loras.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    Ok(HttpResponse::Ok().json(loras))
}

/// One LoRA of the LoRA folder: what `fluxlora lora inspect --json` shows.
async fn get_lora(
    state: web::Data<AppState>,
    name: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let name = Path::new(name.as_str());
    let dir = state
        .lora_dir
        .as_ref()
        .ok_or_else(|| ApiError::NotFound("no LoRA folder".into()))?;
    if name.components().count() != 1
        || !matches!(name.components().next(), Some(Component::Normal(_)))
    {
        return Err(ApiError::bad(
            "give a file name from /v1/loras, without folders",
        ));
    }
    let path = dir.join(name);
    if !path.is_file() {
        return Err(ApiError::NotFound(format!(
            "no LoRA `{}` in the LoRA folder",
            name.display()
        )));
    }
    // A link in the LoRA folder may not lead out of the roots.
    let path = state.resolve_path(&path).map_err(ApiError::bad)?;
    let file = crate::model::lora_io::load(&path, &candle_core::Device::Cpu)
        .map_err(|e| ApiError::bad(e.to_string()))?;
    Ok(HttpResponse::Ok().json(crate::model::lora_io::describe(&file)))
}

/// Resolves every path of a training config inside the allowed roots, replacing it
/// by its canonical path (so the job reads exactly what was checked), and refuses
/// settings the daemon decides itself.
fn check_train_paths(state: &AppState, cfg: &mut TrainConfig) -> Result<(), ApiError> {
    let bad = |field: String| {
        move |message| ApiError::BadRequest {
            message,
            field: Some(field),
        }
    };
    if let Some(model) = &cfg.model {
        return Err(bad("model".into())(format!(
            "the daemon trains on its loaded model ({}); leave out `model` (here {}), or start `fluxlora serve --model` with it",
            state.model_name,
            model.display()
        )));
    }
    for (i, folder) in cfg.dataset.folders.iter_mut().enumerate() {
        folder.path = state
            .resolve_path(&folder.path)
            .map_err(bad(format!("dataset.folders[{i}]")))?;
    }
    if let Some(validation) = &mut cfg.validation_dataset {
        for (i, folder) in validation.folders.iter_mut().enumerate() {
            folder.path = state
                .resolve_path(&folder.path)
                .map_err(bad(format!("validation_dataset.folders[{i}]")))?;
        }
    }
    if let Some(dir) = &cfg.cache_dir {
        cfg.cache_dir =
            Some(resolve_for_writing(&state.roots, dir).map_err(bad("cache_dir".into()))?);
    }
    Ok(())
}

/// Parses a JSON value into `T`; errors name the offending field's path.
fn parse<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        ApiError::BadRequest {
            message: format!("`{path}`: {}", e.inner()),
            field: (path != ".").then_some(path),
        }
    })
}

async fn submit_train(
    state: web::Data<AppState>,
    body: web::Json<serde_json::Value>,
) -> Result<HttpResponse, ApiError> {
    let mut cfg: TrainConfig = parse(body.into_inner())?;
    cfg.validate()?;
    check_train_paths(&state, &mut cfg)?;
    let id = state.engine.submit(JobRequest::Train(Box::new(cfg)))?;
    Ok(HttpResponse::Accepted().json(json!({ "id": id })))
}

/// Checks a sampling job before it is queued, and resolves every LoRA path inside
/// the allowed roots (a bare file name is looked up in the LoRA folder, as ComfyUI
/// and A1111 name LoRAs).
fn check_sample(state: &AppState, job: &mut SampleJob) -> Result<(), ApiError> {
    ResolvedRequest::with_defaults(&job.request, &state.sampling).map_err(|e| {
        ApiError::BadRequest {
            message: e.to_string(),
            field: Some(format!("request.{}", e.field)),
        }
    })?;
    for (i, lora) in job.loras.iter_mut().enumerate() {
        if lora.path.is_some() == lora.live_job.is_some() {
            return Err(ApiError::BadRequest {
                message: "give a LoRA either a `path` or the `live_job` of a running training job"
                    .into(),
                field: Some(format!("loras[{i}]")),
            });
        }
        if !lora.strength.is_finite() {
            return Err(ApiError::BadRequest {
                message: "strength must be a finite number".into(),
                field: Some(format!("loras[{i}].strength")),
            });
        }
        if let Some(p) = &lora.path {
            let candidate = match (p.components().count(), &state.lora_dir) {
                (1, Some(dir)) if dir.join(p).is_file() => dir.join(p),
                _ => p.clone(),
            };
            let resolved =
                state
                    .resolve_path(&candidate)
                    .map_err(|message| ApiError::BadRequest {
                        message,
                        field: Some(format!("loras[{i}].path")),
                    })?;
            lora.path = Some(resolved);
        }
    }
    Ok(())
}

async fn submit_sample(
    state: web::Data<AppState>,
    body: web::Json<serde_json::Value>,
) -> Result<HttpResponse, ApiError> {
    let mut job: SampleJob = parse(body.into_inner())?;
    check_sample(&state, &mut job)?;
    let id = state.engine.submit(JobRequest::Sample(job))?;
    Ok(HttpResponse::Accepted().json(json!({ "id": id })))
}

#[derive(Deserialize)]
struct SampleQuery {
    /// `json` for `{ "images": [base64 PNG…] }` instead of PNG bytes.
    #[serde(default)]
    format: Option<String>,
}

/// Samples and answers with the first PNG (or all as base64 JSON with `?format=json`).
async fn sample_now(
    state: web::Data<AppState>,
    body: web::Json<serde_json::Value>,
    query: web::Query<SampleQuery>,
) -> Result<HttpResponse, ApiError> {
    let mut job: SampleJob = parse(body.into_inner())?;
    check_sample(&state, &mut job)?;
    let engine = state.engine.clone();
    let id = engine.submit(JobRequest::Sample(job))?;
    let record = web::block(move || engine.wait(&id))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))??;
    if record.state != JobState::Finished {
        let message = record
            .error
            .unwrap_or_else(|| format!("sampling ended {:?}", record.state));
        return Err(ApiError::bad(message));
    }
    let images: Vec<Vec<u8>> = record
        .outputs
        .iter()
        .map(std::fs::read)
        .collect::<Result<_, _>>()
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    if query.format.as_deref() == Some("json") {
        use base64::Engine as _;
        let encoded: Vec<String> = images
            .iter()
            .map(|b| base64::engine::general_purpose::STANDARD.encode(b))
            .collect();
        return Ok(HttpResponse::Ok().json(json!({ "id": record.id, "images": encoded })));
    }
    let first = images
        .into_iter()
        .next()
        .ok_or_else(|| ApiError::Internal("no image produced".into()))?;
    Ok(HttpResponse::Ok().content_type("image/png").body(first))
}

async fn control_job(
    state: web::Data<AppState>,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let (id, action) = path.into_inner();
    let control = match action.as_str() {
        "cancel" => Control::Cancel,
        "pause" => Control::Pause,
        "resume" => Control::Resume,
        other => {
            return Err(ApiError::NotFound(format!(
                "no action `{other}`: use cancel, pause or resume"
            )))
        }
    };
    state.engine.control(&id, control)?;
    Ok(HttpResponse::Ok().json(state.engine.job(&id)?))
}

#[derive(Deserialize)]
struct Since {
    #[serde(default)]
    since: u64,
}

async fn job_events(
    state: web::Data<AppState>,
    id: web::Path<String>,
    q: web::Query<Since>,
) -> Result<HttpResponse, ApiError> {
    let mut events: Vec<serde_json::Value> = state
        .engine
        .events_since(&id, q.since)?
        .iter()
        .map(crate::engine::events::Event::to_json)
        .collect();
    for event in &mut events {
        add_file_urls(&state.engine, event);
    }
    Ok(HttpResponse::Ok().json(events))
}

/// Gives every file an event names inside its job's folder (`data.path`,
/// `data.paths`) a URL under `/v1/jobs/{id}/files/` (`data.url`, `data.urls`), so
/// clients on other machines can fetch samples and LoRAs.
pub fn add_file_urls(engine: &Engine, event: &mut serde_json::Value) {
    let Some(job) = event["job"].as_str().map(str::to_string) else {
        return;
    };
    let dir = engine.job_dir(&job);
    let url = |path: &serde_json::Value| -> serde_json::Value {
        let rel = path
            .as_str()
            .and_then(|p| Path::new(p).strip_prefix(&dir).ok())
            .filter(|rel| rel.components().all(|c| matches!(c, Component::Normal(_))));
        match rel {
            Some(rel) => {
                let segments: Vec<String> = rel
                    .components()
                    .map(|c| percent_encode(&c.as_os_str().to_string_lossy()))
                    .collect();
                json!(format!(
                    "/v1/jobs/{}/files/{}",
                    percent_encode(&job),
                    segments.join("/")
                ))
            }
            None => serde_json::Value::Null,
        }
    };
    let data = &mut event["data"];
    if let Some(path) = data.get("path") {
        let u = url(path);
        data["url"] = u;
    }
    if let Some(paths) = data.get("paths").and_then(|p| p.as_array()) {
        let urls: Vec<serde_json::Value> = paths.iter().map(url).collect();
        data["urls"] = json!(urls);
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

/// A file inside a job's folder (samples, checkpoints, the LoRA); `..` is refused.
async fn job_file(
    state: web::Data<AppState>,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let (id, rel) = path.into_inner();
    state.engine.job(&id)?;
    let rel = Path::new(&rel);
    if rel.components().any(|c| !matches!(c, Component::Normal(_))) {
        return Err(ApiError::bad("file paths must stay inside the job folder"));
    }
    let dir = state.engine.job_dir(&id);
    let full = dir.join(rel);
    let canonical = full
        .canonicalize()
        .map_err(|_| ApiError::NotFound(format!("no file `{}` in job {id}", rel.display())))?;
    let dir = dir
        .canonicalize()
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    if !canonical.starts_with(&dir) || !canonical.is_file() {
        return Err(ApiError::NotFound(format!(
            "no file `{}` in job {id}",
            rel.display()
        )));
    }
    let mime = match canonical.extension().and_then(|e| e.to_str()) {
        Some("png") => "image/png",
        Some("json") => "application/json",
        _ => "application/octet-stream",
    };
    // Checkpoints can be large: read off the request threads.
    let bytes = web::block(move || std::fs::read(&canonical))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(HttpResponse::Ok().content_type(mime).body(bytes))
}

/// `path` made absolute against the daemon's working folder.
fn absolute(path: &Path) -> Result<PathBuf, String> {
    if path.is_absolute() {
        return Ok(path.to_path_buf());
    }
    Ok(std::env::current_dir()
        .map_err(|e| e.to_string())?
        .join(path))
}

fn inside_roots(roots: &[PathBuf], canonical: &Path) -> bool {
    roots
        .iter()
        .filter_map(|r| r.canonicalize().ok())
        .any(|r| canonical.starts_with(&r))
}

/// Resolves `path` (absolute, or relative to the daemon's working folder) and checks
/// it lies inside one of `roots` after following symlinks. A path that is outside
/// as written is refused before the file system is asked, so the answer does not
/// tell whether something exists out there.
pub fn resolve_in_roots(roots: &[PathBuf], path: &Path) -> Result<PathBuf, String> {
    let outside = || {
        format!(
            "{} is outside the folders this server may read",
            path.display()
        )
    };
    let full = absolute(path)?;
    let written = lexically_normal(&full);
    let lexically_inside = roots.iter().any(|r| {
        absolute(r).is_ok_and(|r| written.starts_with(lexically_normal(&r)))
            || r.canonicalize().is_ok_and(|r| written.starts_with(r))
    });
    if !lexically_inside {
        return Err(outside());
    }
    let canonical = full
        .canonicalize()
        .map_err(|_| format!("{}: no such file or folder", path.display()))?;
    if inside_roots(roots, &canonical) {
        Ok(canonical)
    } else {
        Err(outside())
    }
}

/// `path` with `.` dropped and `..` taken against the part before it, without
/// asking the file system (links are followed later, by `canonicalize`).
fn lexically_normal(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    out
}

/// Like [`resolve_in_roots`] for a folder that may not exist yet: its nearest
/// existing ancestor must lie inside the roots, and the rest may not contain `..`.
fn resolve_for_writing(roots: &[PathBuf], path: &Path) -> Result<PathBuf, String> {
    let full = absolute(path)?;
    if full.components().any(|c| c == Component::ParentDir) {
        return Err(format!("{}: `..` is not allowed here", path.display()));
    }
    let mut existing = full.as_path();
    let mut rest = vec![];
    while !existing.exists() {
        rest.push(existing.file_name().unwrap_or_default().to_owned());
        existing = existing
            .parent()
            .ok_or_else(|| format!("{}: no existing parent folder", path.display()))?;
    }
    let mut canonical = existing.canonicalize().map_err(|e| e.to_string())?;
    if !inside_roots(roots, &canonical) {
        return Err(format!(
            "{} is outside the folders this server may write",
            path.display()
        ));
    }
    canonical.extend(rest.iter().rev());
    Ok(canonical)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_resolve_inside_the_roots_and_outside_ones_say_nothing_of_what_exists() {
        let root = tempfile::tempdir().unwrap();
        let inside = root.path().join("a.txt");
        std::fs::write(&inside, b"x").unwrap();
        let roots = vec![root.path().to_path_buf()];
        assert_eq!(
            resolve_in_roots(&roots, &inside).unwrap(),
            inside.canonicalize().unwrap()
        );
        let missing = resolve_in_roots(&roots, &root.path().join("b.txt")).unwrap_err();
        assert!(missing.contains("no such file"), "{missing}");
        // Outside as written: the same answer whether or not the file exists.
        for outside in ["/etc/passwd", "/no/such/file"] {
            let e = resolve_in_roots(&roots, Path::new(outside)).unwrap_err();
            assert!(e.contains("outside"), "{outside}: {e}");
        }
        let climbing = root.path().join("../../etc/passwd");
        assert!(resolve_in_roots(&roots, &climbing)
            .unwrap_err()
            .contains("outside"));
        // A link inside that leads out is followed, then refused.
        std::os::unix::fs::symlink("/etc", root.path().join("etc")).unwrap();
        let linked = resolve_in_roots(&roots, &root.path().join("etc/passwd")).unwrap_err();
        assert!(linked.contains("outside"), "{linked}");
    }
}
