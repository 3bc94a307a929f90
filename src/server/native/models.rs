//! `/v1/models`: the loaded model, and the model files and folders the daemon
//! can see (another one is chosen with `serve --model` at start).

use std::path::PathBuf;

use actix_web::http::Method;
use actix_web::{web, HttpResponse};
use serde::Serialize;
use utoipa::ToSchema;

use crate::server::route_table::RouteTable;
use crate::server::state::AppState;

pub(super) fn routes(table: &mut RouteTable) {
    table.add(Method::GET, "/v1/models", list_models);
}

/// The loaded model and the models the daemon can see.
#[derive(Serialize, ToSchema)]
pub(crate) struct Models {
    pub loaded: LoadedModel,
    /// The built-in model first, then each model folder's entries sorted by name.
    pub available: Vec<AvailableModel>,
}

/// The model every job samples and trains with.
#[derive(Serialize, ToSchema)]
pub(crate) struct LoadedModel {
    /// The model's name (`tiny` for the built-in model).
    pub name: String,
    /// The model file or folder; null for the built-in model.
    #[schema(value_type = Option<String>, required)]
    pub path: Option<PathBuf>,
    /// `cpu` or `cuda:N`.
    pub device: String,
    #[schema(value_type = crate::config::Precision)]
    pub dtype: String,
}

/// A model the daemon can see.
#[derive(Serialize, ToSchema)]
pub(crate) struct AvailableModel {
    /// File or folder name (`tiny` for the built-in model).
    pub name: String,
    pub kind: ModelKind,
    /// Where it is; absent for the built-in model.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub path: Option<PathBuf>,
}

/// `file`: a `.safetensors`/`.sft` file; `folder`: a model folder.
#[derive(Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub(crate) enum ModelKind {
    Builtin,
    File,
    Folder,
}

/// The loaded model and the models the daemon can see.
///
/// `loaded` is the model every job samples and trains with. `available` lists the
/// built-in tiny model and the `.safetensors`/`.sft` files and folders of the model
/// folders; another one is chosen with `fluxlora serve --model` when the daemon starts.
#[utoipa::path(
    get,
    path = "/v1/models",
    tag = "system",
    operation_id = "listModels",
    responses((status = 200, description = "The models.", body = Models))
)]
async fn list_models(state: web::Data<AppState>) -> HttpResponse {
    let mut available = vec![AvailableModel {
        name: "tiny".into(),
        kind: ModelKind::Builtin,
        path: None,
    }];
    for dir in &state.model_dirs {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        let mut found: Vec<_> = entries
            .flatten()
            .map(|e| e.path())
            .filter_map(|path| {
                let kind = if path.is_dir() {
                    ModelKind::Folder
                } else if path
                    .extension()
                    .is_some_and(|e| e == "safetensors" || e == "sft")
                {
                    ModelKind::File
                } else {
                    return None;
                };
                let name = path.file_name()?.to_string_lossy().into_owned();
                Some(AvailableModel {
                    name,
                    kind,
                    path: Some(path),
                })
            })
            .collect();
        found.sort_by(|a, b| a.name.cmp(&b.name));
        available.extend(found);
    }
    HttpResponse::Ok().json(Models {
        loaded: LoadedModel {
            name: state.model_name.clone(),
            path: state.model_path.clone(),
            device: state.device.clone(),
            dtype: state.dtype.clone(),
        },
        available,
    })
}
