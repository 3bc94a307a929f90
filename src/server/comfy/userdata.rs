//! The front end's user routes, for one user (ComfyUI's single-user mode,
//! `app/user_manager.py`, `app/app_settings.py`): `/users`, `/settings`
//! (all, one id; merged and persisted in `comfy.settings.json`) and `/userdata`
//! (list, read, write, delete, move: saved workflows, templates, bookmarks).
//! Everything lives in the user folder (`<data-dir>/user/default`, or
//! `<comfy-root>/user/default`), written atomically.
//!
//! Must not: touch a file outside the user folder: a requested path must be
//! relative, plain (no `..`, no hidden first component) and stay inside once
//! links are followed.

use std::path::{Component, Path, PathBuf};
use std::time::UNIX_EPOCH;

use actix_web::http::Method;
use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::routes::both;
use crate::server::errors::ApiError;
use crate::server::paths;
use crate::server::route_table::RouteTable;
use crate::server::state::AppState;

/// The settings file in the user folder.
const SETTINGS_FILE: &str = "comfy.settings.json";
/// The user's stylesheet, which the front end loads at every start.
pub(super) const USER_CSS: &str = "user.css";

pub(super) fn routes(table: &mut RouteTable) {
    both(table, Method::GET, "/users", get_users);
    both(table, Method::POST, "/users", post_users);
    both(table, Method::GET, "/settings", get_settings);
    both(table, Method::POST, "/settings", post_settings);
    both(table, Method::GET, "/settings/{id}", get_setting);
    both(table, Method::POST, "/settings/{id}", post_setting);
    both(table, Method::GET, "/userdata", list_userdata);
    both(
        table,
        Method::POST,
        "/userdata/{file}/move/{dest}",
        move_userdata,
    );
    both(table, Method::GET, "/userdata/{file:.*}", get_userdata);
    both(table, Method::POST, "/userdata/{file:.*}", post_userdata);
    both(
        table,
        Method::DELETE,
        "/userdata/{file:.*}",
        delete_userdata,
    );
}

/// The user folder, made when missing, canonical (so the paths the policy
/// returns are relative to it).
fn user_dir(state: &AppState) -> PathBuf {
    let dir = state.comfy.folders.root().join("user").join("default");
    let _ = std::fs::create_dir_all(&dir);
    dir.canonicalize().unwrap_or(dir)
}

async fn get_users() -> HttpResponse {
    HttpResponse::Ok().json(json!({"storage": "server", "migrated": true}))
}

async fn post_users() -> HttpResponse {
    HttpResponse::BadRequest().json(json!({
        "error": "this daemon serves one user: multi-user mode is not supported",
    }))
}

fn read_settings(state: &AppState) -> Map<String, Value> {
    std::fs::read(user_dir(state).join(SETTINGS_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

fn write_settings(state: &AppState, settings: &Map<String, Value>) -> Result<(), ApiError> {
    let path = user_dir(state).join(SETTINGS_FILE);
    let text =
        serde_json::to_vec_pretty(settings).map_err(|e| ApiError::Internal(e.to_string()))?;
    crate::atomic_file::write(&path, &text)
        .map_err(|e| ApiError::Internal(format!("writing {}: {e}", path.display())))
}

async fn get_settings(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok().json(read_settings(&state))
}

async fn get_setting(state: web::Data<AppState>, id: web::Path<String>) -> HttpResponse {
    HttpResponse::Ok().json(
        read_settings(&state)
            .get(id.as_str())
            .cloned()
            .unwrap_or(Value::Null),
    )
}

/// One writer of the settings file at a time (read, merge, write).
static SETTINGS_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A JSON body, whatever its content type (the front end sends settings as
/// `text/plain`).
fn json_body(body: &web::Bytes) -> Result<Value, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad(format!("the body is not JSON: {e}")))
}

async fn post_settings(
    state: web::Data<AppState>,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    let Value::Object(changes) = json_body(&body)? else {
        return Err(ApiError::bad(
            "send the settings as a JSON object of id → value",
        ));
    };
    let _one = SETTINGS_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let mut settings = read_settings(&state);
    settings.extend(changes);
    write_settings(&state, &settings)?;
    Ok(HttpResponse::Ok().finish())
}

async fn post_setting(
    state: web::Data<AppState>,
    id: web::Path<String>,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    let value = json_body(&body)?;
    let _one = SETTINGS_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let mut settings = read_settings(&state);
    settings.insert(id.into_inner(), value);
    write_settings(&state, &settings)?;
    Ok(HttpResponse::Ok().finish())
}

/// `%XX` decoded (the front end sends `workflows%2Fa.json`); `None` for bad UTF-8.
fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1), bytes.get(i + 2)) {
            (b'%', Some(&h), Some(&l)) if hex(h).is_some() && hex(l).is_some() => {
                out.push((hex(h)? * 16 + hex(l)?) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// The user file a request names: relative, plain components, not the
/// settings file, inside the folder once links are followed.
fn user_file(state: &AppState, raw: &str) -> Result<PathBuf, ApiError> {
    let bad = |why: &str| ApiError::bad(format!("userdata path `{raw}`: {why}"));
    let name = percent_decode(raw).ok_or_else(|| bad("not UTF-8"))?;
    let rel = Path::new(&name);
    if paths::has_overlong_name(rel) {
        return Err(bad(&format!(
            "a file or folder name is longer than {} bytes",
            paths::NAME_MAX
        )));
    }
    if name.is_empty() || name.contains(['\\', '\0']) {
        return Err(bad(
            "give a relative path such as workflows/a.json (`/` between folders, no `\\` or NUL)",
        ));
    }
    if !rel.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(ApiError::Forbidden(format!(
            "userdata path `{name}` leaves the user folder"
        )));
    }
    if name == SETTINGS_FILE {
        return Err(ApiError::Forbidden(
            "the settings file is written through /settings".into(),
        ));
    }
    let dir = user_dir(state);
    // The path policy for writes: the nearest existing ancestor inside the folder
    // once links are followed.
    paths::resolve_for_writing(&[dir.clone()], &dir.join(rel))
        .map_err(|_| ApiError::Forbidden(format!("userdata path `{name}` leaves the user folder")))
}

/// ComfyUI's file info: `{path, size, modified, created}` (times in ms).
fn file_info(dir: &Path, path: &Path) -> Value {
    let meta = std::fs::metadata(path).ok();
    let ms = |t: Option<std::time::SystemTime>| {
        t.and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_millis() as u64)
    };
    json!({
        "path": relative(dir, path),
        "size": meta.as_ref().map_or(0, |m| m.len()),
        "modified": ms(meta.as_ref().and_then(|m| m.modified().ok())),
        "created": ms(meta.as_ref().and_then(|m| m.created().ok())),
    })
}

/// `path` relative to `dir`, with `/` separators.
fn relative(dir: &Path, path: &Path) -> String {
    path.strip_prefix(dir)
        .unwrap_or(path)
        .components()
        .map(|c| c.as_os_str().to_string_lossy().to_string())
        .collect::<Vec<_>>()
        .join("/")
}

#[derive(Deserialize)]
struct ListQuery {
    #[serde(default)]
    dir: Option<String>,
    #[serde(default)]
    recurse: Option<String>,
    #[serde(default)]
    split: Option<String>,
    #[serde(default)]
    full_info: Option<String>,
}

fn is_true(flag: &Option<String>) -> bool {
    flag.as_deref().is_some_and(|f| f == "true" || f == "1")
}

async fn list_userdata(
    state: web::Data<AppState>,
    query: web::Query<ListQuery>,
) -> Result<HttpResponse, ApiError> {
    let Some(dir_name) = query.dir.as_deref().filter(|d| !d.is_empty()) else {
        return Err(ApiError::bad("give the folder to list: ?dir=workflows"));
    };
    let dir = user_file(&state, dir_name)?;
    if !dir.is_dir() {
        // ComfyUI answers 404, which the front end reads as empty: say empty.
        return Ok(HttpResponse::Ok().json(json!([])));
    }
    let mut files = vec![];
    let mut stack = vec![dir.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = e.path();
            let hidden_tmp = e.file_name().to_string_lossy().ends_with(".tmp");
            if path.is_dir() {
                if is_true(&query.recurse) {
                    stack.push(path);
                }
            } else if !hidden_tmp {
                files.push(path);
            }
        }
    }
    files.sort();
    let listed: Vec<Value> = files
        .iter()
        .map(|f| {
            let rel = relative(&dir, f);
            if is_true(&query.full_info) {
                file_info(&dir, f)
            } else if is_true(&query.split) {
                let mut parts = vec![json!(rel)];
                parts.extend(rel.split('/').map(|p| json!(p)));
                Value::Array(parts)
            } else {
                json!(rel)
            }
        })
        .collect();
    Ok(HttpResponse::Ok().json(listed))
}

async fn get_userdata(
    state: web::Data<AppState>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let raw = req.match_info().get("file").unwrap_or("");
    let path = user_file(&state, raw)?;
    if raw == USER_CSS && !path.exists() {
        // The front end always asks for the user's stylesheet: none is empty.
        return Ok(HttpResponse::Ok().content_type("text/css").body(""));
    }
    let bytes =
        std::fs::read(&path).map_err(|_| ApiError::NotFound(format!("no user file `{raw}`")))?;
    let content_type = if path.extension().is_some_and(|e| e == "json") {
        "application/json"
    } else {
        "application/octet-stream"
    };
    Ok(HttpResponse::Ok().content_type(content_type).body(bytes))
}

#[derive(Deserialize)]
struct WriteQuery {
    #[serde(default)]
    overwrite: Option<String>,
    #[serde(default)]
    full_info: Option<String>,
}

/// ComfyUI's answer to a write: the path, or its file info.
fn written(state: &AppState, path: &Path, full_info: &Option<String>) -> HttpResponse {
    let dir = user_dir(state);
    if is_true(full_info) {
        HttpResponse::Ok().json(file_info(&dir, path))
    } else {
        HttpResponse::Ok().json(relative(&dir, path))
    }
}

async fn post_userdata(
    state: web::Data<AppState>,
    req: HttpRequest,
    query: web::Query<WriteQuery>,
    body: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let raw = req.match_info().get("file").unwrap_or("");
    let path = user_file(&state, raw)?;
    let limit = state.comfy.max_upload;
    let bytes = match body.to_bytes_limited(limit).await {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => return Err(ApiError::bad(format!("reading the body: {e}"))),
        Err(_) => {
            return Err(ApiError::TooLarge(format!(
                "the file is over the {limit}-byte limit"
            )))
        }
    };
    // ComfyUI overwrites unless told not to.
    if query.overwrite.as_deref() == Some("false") && path.exists() {
        return Err(ApiError::Conflict(format!(
            "`{raw}` exists (overwrite=false)"
        )));
    }
    if path.is_dir() {
        return Err(ApiError::Conflict(format!("`{raw}` is a folder")));
    }
    crate::atomic_file::write(&path, &bytes)
        .map_err(|e| ApiError::Internal(format!("writing {}: {e}", path.display())))?;
    Ok(written(&state, &path, &query.full_info))
}

async fn delete_userdata(
    state: web::Data<AppState>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let raw = req.match_info().get("file").unwrap_or("");
    let path = user_file(&state, raw)?;
    if !path.is_file() {
        return Err(ApiError::NotFound(format!("no user file `{raw}`")));
    }
    std::fs::remove_file(&path).map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(HttpResponse::NoContent().finish())
}

async fn move_userdata(
    state: web::Data<AppState>,
    req: HttpRequest,
    query: web::Query<WriteQuery>,
) -> Result<HttpResponse, ApiError> {
    let raw_from = req.match_info().get("file").unwrap_or("");
    let raw_to = req.match_info().get("dest").unwrap_or("");
    let from = user_file(&state, raw_from)?;
    let to = user_file(&state, raw_to)?;
    if !from.is_file() {
        return Err(ApiError::NotFound(format!("no user file `{raw_from}`")));
    }
    if query.overwrite.as_deref() == Some("false") && to.exists() {
        return Err(ApiError::Conflict(format!(
            "`{raw_to}` exists (overwrite=false)"
        )));
    }
    if let Some(parent) = to.parent() {
        std::fs::create_dir_all(parent).map_err(|e| ApiError::Internal(e.to_string()))?;
    }
    std::fs::rename(&from, &to).map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(written(&state, &to, &query.full_info))
}
