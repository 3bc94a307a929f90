//! ComfyUI's official front end, served by the daemon: the static folder of
//! PyPI's `comfyui-frontend-package` at `/` (`index.html`, `assets/`, …), our
//! extension (`js/`) at `/extensions/fluxlora/` and listed in
//! `GET /extensions`, and the small routes the front end reads at boot that
//! have nothing of ours behind them yet (i18n, global subgraphs, templates,
//! model folders). What each must answer: `../shared/research/comfyui-frontend.md`.
//!
//! Without a front end, `/` answers a short page saying how to get one.
//!
//! Must not: serve a file outside its folder; paths are checked component by
//! component and then canonicalized.

use std::path::Path;

use actix_web::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use actix_web::http::Method;
use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::json;

use super::folders::FRONTEND_VERSION;
use super::routes::both;
use crate::server::paths;
use crate::server::route_table::RouteTable;
use crate::server::state::AppState;

pub(super) fn routes(table: &mut RouteTable) {
    both(table, Method::GET, "/extensions", extensions);
    table.add(
        Method::GET,
        "/extensions/fluxlora/{path:.*}",
        extension_file,
    );
    table.add(
        Method::HEAD,
        "/extensions/fluxlora/{path:.*}",
        extension_file,
    );
    both(table, Method::GET, "/i18n", empty_object);
    both(table, Method::GET, "/global_subgraphs", empty_object);
    both(table, Method::GET, "/workflow_templates", empty_object);
    both(table, Method::GET, "/node_replacements", empty_object);
    both(table, Method::POST, "/free", ok);
    both(table, Method::GET, "/experiment/models", model_folders);
    both(
        table,
        Method::GET,
        "/experiment/models/{folder}",
        model_files,
    );
    table.add(
        Method::GET,
        "/templates/index.json",
        super::routes::empty_list,
    );
    table.add(Method::GET, "/templates/index_logo.json", empty_object);
    table.add(Method::GET, "/", index);
}

/// Registered last: every other GET path is a file of the front end.
pub(super) fn static_routes(table: &mut RouteTable) {
    table.add(Method::GET, "/{path:.*}", static_file);
    table.add(Method::HEAD, "/{path:.*}", static_file);
}

async fn empty_object() -> HttpResponse {
    HttpResponse::Ok().json(json!({}))
}

async fn ok() -> HttpResponse {
    HttpResponse::Ok().finish()
}

async fn extensions(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok().json(state.comfy.frontend.extension_urls())
}

/// The model folders the front end's model library shows (ours: the LoRA folder).
async fn model_folders(state: web::Data<AppState>) -> HttpResponse {
    let folders: Vec<String> = state
        .admission
        .lora_dir
        .iter()
        .map(|d| d.display().to_string())
        .collect();
    HttpResponse::Ok().json(json!([{"name": "loras", "folders": folders}]))
}

async fn model_files(state: web::Data<AppState>, folder: web::Path<String>) -> HttpResponse {
    if folder.as_str() != "loras" {
        return HttpResponse::NotFound().json(json!([]));
    }
    let files: Vec<_> = super::routes::folder_lists(&state)
        .loras
        .into_iter()
        .map(|name| json!({"name": name, "pathIndex": 0}))
        .collect();
    HttpResponse::Ok().json(files)
}

/// The page to show when no front end is installed.
fn no_frontend() -> String {
    NO_FRONTEND.replace("{version}", FRONTEND_VERSION)
}

const NO_FRONTEND: &str = "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>fluxlora</title></head>\n\
<body style=\"font-family: sans-serif; max-width: 40em; margin: 3em auto\">\n\
<h1>fluxlora</h1>\n<p>The daemon is running, but no ComfyUI front end is installed.</p>\n\
<p>Get ComfyUI's official front end (PyPI's <code>comfyui-frontend-package</code> {version}) with\n\
<code>bash scripts/get-frontend.sh</code>, which unpacks it to <code>fluxlora-data/frontend</code>\n\
(the default data dir), or start the daemon with <code>--comfy-frontend DIR</code>.</p>\n\
<p>The APIs work without it: <a href=\"/v1/openapi.json\">/v1/openapi.json</a>, ComfyUI's\n\
<a href=\"/object_info\">/object_info</a> and <code>/prompt</code>.</p>\n</body></html>\n";

async fn index(state: web::Data<AppState>) -> HttpResponse {
    let Some(dir) = &state.comfy.frontend.static_dir else {
        return HttpResponse::Ok()
            .content_type("text/html; charset=utf-8")
            .insert_header((CACHE_CONTROL, "no-store"))
            .body(no_frontend());
    };
    serve(dir, "index.html", "no-store")
}

async fn static_file(state: web::Data<AppState>, req: HttpRequest) -> HttpResponse {
    let path = req.match_info().get("path").unwrap_or("");
    match &state.comfy.frontend.static_dir {
        // index.html links the user's stylesheet beside it: none is empty.
        Some(dir) if path == super::userdata::USER_CSS && !dir.join(path).exists() => {
            HttpResponse::Ok().content_type("text/css").body("")
        }
        Some(dir) => serve(dir, path, "no-cache"),
        None => not_found(path),
    }
}

async fn extension_file(state: web::Data<AppState>, req: HttpRequest) -> HttpResponse {
    let path = req.match_info().get("path").unwrap_or("");
    match &state.comfy.frontend.js_dir {
        Some(dir) => serve(dir, path, "no-cache"),
        None => not_found(path),
    }
}

fn not_found(path: &str) -> HttpResponse {
    HttpResponse::NotFound().json(json!({
        "error": {"code": "not_found", "message": format!("fluxlora does not implement GET /{path} (no route, and no front-end file)")},
    }))
}

/// The content type of a static file, by extension.
fn content_type(path: &Path) -> &'static str {
    match path.extension().and_then(|e| e.to_str()).unwrap_or("") {
        "html" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "json" | "map" => "application/json",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "webp" => "image/webp",
        "ico" => "image/x-icon",
        "woff" => "font/woff",
        "woff2" => "font/woff2",
        "ttf" => "font/ttf",
        "txt" | "md" => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    }
}

/// The file `rel` of `dir`: plain components only, and inside `dir` once links
/// are followed.
fn serve(dir: &Path, rel: &str, cache: &str) -> HttpResponse {
    // The path policy: plain components, and no link out of the folder.
    let file = match paths::job_file(dir, "front end", Path::new(rel)) {
        Ok(file) if !rel.is_empty() => file,
        _ => return not_found(rel),
    };
    match std::fs::read(&file) {
        Ok(bytes) => HttpResponse::Ok()
            .insert_header((CONTENT_TYPE, content_type(&file)))
            .insert_header((CACHE_CONTROL, cache))
            .insert_header(("X-Content-Type-Options", "nosniff"))
            .body(bytes),
        Err(_) => not_found(rel),
    }
}
