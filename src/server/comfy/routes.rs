//! ComfyUI's HTTP routes (`docs/comfyui-protocol.md` §1), each registered bare
//! and under `/api/` as ComfyUI's `PromptServer` does: the node definitions
//! (`/object_info`), the discovery routes the front end and scripts read first
//! (`/system_stats`, `/embeddings`, `/extensions`, `/features`, `/models`), and `/view` (a file of the output, input or temp
//! folder).
//!
//! Must not: touch tensors; answers are built from the engine and the folders.

use actix_web::http::Method;
use actix_web::{web, FromRequest, Handler, HttpResponse, Responder, ResponseError};
use serde_json::{json, Map, Value};

use super::folders::FileError;
use super::nodes;
use crate::server::errors::ApiError;
use crate::server::route_table::RouteTable;
use crate::server::state::AppState;

/// Registers the discovery routes and `/view`.
pub fn routes(table: &mut RouteTable) {
    both(table, Method::GET, "/object_info", object_info);
    both(table, Method::GET, "/object_info/{class}", object_info_of);
    both(table, Method::GET, "/system_stats", system_stats);
    both(table, Method::GET, "/embeddings", empty_list);
    both(table, Method::GET, "/features", features);
    both(table, Method::GET, "/models", model_folders);
    both(table, Method::GET, "/models/{folder}", models_in);
    both(table, Method::GET, "/view", view);
    both(table, Method::GET, "/ws", super::socket::connect);
}

/// `path` and `/api{path}`, as ComfyUI registers its table twice.
pub(super) fn both<F, Args>(table: &mut RouteTable, method: Method, path: &str, handler: F)
where
    F: Handler<Args>,
    Args: FromRequest + 'static,
    F::Output: Responder + 'static,
{
    table.add(method.clone(), path, handler.clone());
    table.add(method, &format!("/api{path}"), handler);
}

/// The run-time lists, read now (a new file shows without a restart): the LoRA
/// folder's files and the input folder's images.
pub(crate) fn folder_lists(state: &AppState) -> nodes::FolderLists {
    let input = state.comfy.folders.dir("input").ok();
    nodes::FolderLists::read(state.admission.lora_dir.as_deref(), input.as_deref())
}

async fn object_info(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok().json(nodes::object_info(&folder_lists(&state)))
}

/// One class, or `{}` for an unknown one (ComfyUI answers 200, not 404).
async fn object_info_of(state: web::Data<AppState>, class: web::Path<String>) -> HttpResponse {
    let mut one = Map::new();
    if let Some(def) = nodes::get(&class) {
        one.insert(def.name.clone(), def.info(&folder_lists(&state)));
    }
    HttpResponse::Ok().json(Value::Object(one))
}

async fn system_stats(state: web::Data<AppState>) -> HttpResponse {
    let (total, free) = crate::train::events::system_ram();
    let kind = state.device.split(':').next().unwrap_or("cpu").to_string();
    let index = state
        .device
        .split_once(':')
        .and_then(|(_, i)| i.parse::<u64>().ok())
        .unwrap_or(0);
    HttpResponse::Ok().json(json!({
        "system": {
            "os": std::env::consts::OS,
            "ram_total": total,
            "ram_free": free,
            "comfyui_version": format!("fluxlora {}", env!("CARGO_PKG_VERSION")),
            "required_frontend_version": "",
            "installed_templates_version": "",
            "required_templates_version": "",
            "comfy_package_versions": [],
            "python_version": "",
            "pytorch_version": "",
            "embedded_python": false,
            "deploy_environment": "local",
            "argv": std::env::args().collect::<Vec<_>>(),
        },
        "devices": [{
            "name": format!("{} ({})", state.device, state.model_name),
            "type": kind,
            "index": index,
            "vram_total": 0,
            "vram_free": 0,
            "torch_vram_total": 0,
            "torch_vram_free": 0,
        }],
    }))
}

pub(super) async fn empty_list() -> HttpResponse {
    HttpResponse::Ok().json(json!([]))
}

async fn features(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok().json(super::socket::server_features(&state))
}

/// The model folders we list: LoRAs, and the diffusion models the daemon sees.
const MODEL_FOLDERS: &[&str] = &["loras", "diffusion_models"];

async fn model_folders() -> HttpResponse {
    HttpResponse::Ok().json(MODEL_FOLDERS)
}

/// The files of one model folder; 404 for a folder we do not have.
async fn models_in(state: web::Data<AppState>, folder: web::Path<String>) -> HttpResponse {
    match folder.as_str() {
        "loras" => HttpResponse::Ok().json(folder_lists(&state).loras),
        "diffusion_models" => {
            let mut names: Vec<String> = state
                .model_dirs
                .iter()
                .filter_map(|d| std::fs::read_dir(d).ok())
                .flat_map(|entries| entries.flatten())
                .filter(|e| {
                    e.path()
                        .extension()
                        .is_some_and(|x| x == "safetensors" || x == "sft")
                })
                .filter_map(|e| e.file_name().into_string().ok())
                .collect();
            names.sort();
            names.dedup();
            HttpResponse::Ok().json(names)
        }
        other => ApiError::NotFound(format!(
            "no model folder `{other}`: the folders are {}",
            MODEL_FOLDERS.join(", ")
        ))
        .error_response(),
    }
}

/// `/view`'s query; only `filename` is required.
#[derive(serde::Deserialize)]
struct ViewQuery {
    #[serde(default)]
    filename: Option<String>,
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    subfolder: Option<String>,
}

/// A file of ComfyUI's folders: 400 for a bad name or type, 403 for a
/// subfolder that leaves its folder, 404 when missing (`docs/comfyui-protocol.md` §1).
async fn view(
    state: web::Data<AppState>,
    query: web::Query<ViewQuery>,
) -> Result<HttpResponse, ApiError> {
    let Some(filename) = query.filename.as_deref() else {
        return Err(ApiError::NotFound(
            "give the file to show: /view?filename=NAME&type=output&subfolder=".into(),
        ));
    };
    let kind = query
        .kind
        .as_deref()
        .filter(|k| !k.is_empty())
        .unwrap_or("output");
    let subfolder = query.subfolder.as_deref().unwrap_or("");
    let path = match state.comfy.folders.existing(kind, subfolder, filename) {
        Ok(path) => path,
        Err(FileError::Bad(why)) => return Err(ApiError::bad(why)),
        Err(FileError::Escapes) => {
            return Err(ApiError::Forbidden(format!(
                "subfolder `{subfolder}` leaves the {kind} folder"
            )))
        }
        Err(FileError::Missing) => {
            return Err(ApiError::NotFound(format!(
                "no file `{filename}` in the {kind} folder"
            )))
        }
    };
    let Ok(bytes) = std::fs::read(&path) else {
        return Err(ApiError::NotFound(format!(
            "no file `{filename}` in the {kind} folder"
        )));
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().replace('"', ""))
        .unwrap_or_default();
    let content_type = match path.extension().and_then(|e| e.to_str()) {
        Some("png") => "image/png",
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("webp") => "image/webp",
        // Anything else is downloaded, never rendered (no active content).
        _ => "application/octet-stream",
    };
    Ok(HttpResponse::Ok()
        .content_type(content_type)
        .insert_header(("Content-Disposition", format!("filename=\"{name}\"")))
        .insert_header(("X-Content-Type-Options", "nosniff"))
        .body(bytes))
}
