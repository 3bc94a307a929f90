//! `/v1/loras`: the LoRA folder's files, and what one of them holds.

use std::path::PathBuf;

use actix_web::http::Method;
use actix_web::{web, HttpResponse};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::model::lora_io::LoraReport;
use crate::server::errors::{ApiError, BadRequest, NotFound};
use crate::server::paths;
use crate::server::route_table::RouteTable;
use crate::server::state::AppState;

pub(super) fn routes(table: &mut RouteTable) {
    table
        .add(Method::GET, "/v1/loras", list_loras)
        .add(Method::GET, "/v1/loras/{name}", get_lora);
}

/// A `.safetensors` file of the LoRA folder.
#[derive(Serialize, ToSchema)]
pub struct LoraFile {
    /// File name (use it in `GET /v1/loras/{name}` or `LoraChoice.path`).
    pub name: String,
    /// Full path.
    #[schema(value_type = String)]
    pub path: PathBuf,
    /// Bytes.
    pub size: u64,
    /// Modification time, Unix seconds.
    #[schema(required)]
    pub modified: Option<f64>,
}

/// The `.safetensors` files of the LoRA folder.
///
/// Sorted by name; an empty list when the daemon has no LoRA folder. Finished
/// training jobs copy their LoRA here.
#[utoipa::path(
    get,
    path = "/v1/loras",
    tag = "loras",
    operation_id = "listLoras",
    responses((status = 200, description = "The LoRA files.", body = Vec<LoraFile>))
)]
async fn list_loras(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let Some(dir) = &state.admission.lora_dir else {
        return Ok(HttpResponse::Ok().json(Vec::<LoraFile>::new()));
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
        loras.push(LoraFile {
            name: entry.file_name().to_string_lossy().into_owned(),
            path,
            size: meta.len(),
            modified,
        });
    }
    loras.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(HttpResponse::Ok().json(loras))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
struct LoraName {
    /// A file name from `GET /v1/loras`.
    #[param(example = "my-style.safetensors")]
    name: String,
}

/// Inspect a LoRA of the LoRA folder.
///
/// What `fluxlora lora inspect --json` shows: the key format, modules, ranks,
/// alphas, targeted blocks and the file's metadata. A name with folders, or a
/// file that is not a readable LoRA, is answered 400.
#[utoipa::path(
    get,
    path = "/v1/loras/{name}",
    tag = "loras",
    operation_id = "inspectLora",
    params(LoraName),
    responses(
        (status = 200, description = "The report.", body = LoraReport),
        (status = 400, response = BadRequest),
        (status = 404, response = NotFound),
    )
)]
async fn get_lora(
    state: web::Data<AppState>,
    name: web::Path<LoraName>,
) -> Result<HttpResponse, ApiError> {
    let dir = state
        .admission
        .lora_dir
        .as_ref()
        .ok_or_else(|| ApiError::NotFound("no LoRA folder".into()))?;
    let path = paths::lora_in_folder(dir, &name.name)?;
    // A link in the LoRA folder may not lead out of the roots.
    let path = state.admission.resolve_path(&path)?;
    let file = crate::model::lora_io::load(&path, &candle_core::Device::Cpu)
        .map_err(|e| ApiError::bad(e.to_string()))?;
    Ok(HttpResponse::Ok().json(crate::model::lora_io::describe(&file)))
}
