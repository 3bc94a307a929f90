//! The A1111 lists and settings, in the shapes of its `modules/api/models.py`
//! (and the Lora extension's `/loras`): `/scripts` (none), `/samplers`,
//! `/schedulers`, `/sd-models` (the loaded model), `/sd-modules` (its
//! autoencoder and text encoders), `/upscalers` and `/embeddings` (none), `/loras` and
//! `/refresh-loras` (the LoRA folder, read on every call, so nothing needs a
//! refresh), `/options` (a few real keys; a POST accepts and ignores what it
//! cannot apply).

use actix_web::http::Method;
use actix_web::{web, HttpResponse};
use serde_json::{json, Map, Value};

use super::errors::WebuiError;
use super::lora_tags;
use crate::model::lora_io;
use crate::sample::samplers::A1111_SAMPLERS;
use crate::sample::schedule::A1111_SCHEDULERS;
use crate::server::paths;
use crate::server::route_table::RouteTable;
use crate::server::state::AppState;

pub(super) fn routes(table: &mut RouteTable) {
    table
        .add(Method::GET, "/sdapi/v1/scripts", scripts)
        .add(Method::GET, "/sdapi/v1/samplers", samplers)
        .add(Method::GET, "/sdapi/v1/schedulers", schedulers)
        .add(Method::GET, "/sdapi/v1/sd-models", sd_models)
        .add(Method::GET, "/sdapi/v1/sd-modules", sd_modules)
        .add(Method::GET, "/sdapi/v1/upscalers", upscalers)
        .add(Method::GET, "/sdapi/v1/embeddings", embeddings)
        .add(Method::GET, "/sdapi/v1/loras", loras)
        .add(Method::POST, "/sdapi/v1/refresh-loras", refresh_loras)
        .add(Method::GET, "/sdapi/v1/options", get_options)
        .add(Method::POST, "/sdapi/v1/options", set_options);
}

/// The LoRA folder's `.safetensors` file names (none without a folder).
pub(super) fn lora_files(state: &AppState) -> Vec<String> {
    state
        .admission
        .lora_dir
        .as_deref()
        .map(|dir| paths::file_names_with(dir, &["safetensors"]))
        .unwrap_or_default()
}

/// The loaded model's A1111 title (its file name, or the built-in model's name).
fn model_title(state: &AppState) -> String {
    state
        .model_path
        .as_deref()
        .and_then(|p| p.file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| state.model_name.clone())
}

/// Every name `sd_model_checkpoint` may give the loaded model, the title first.
pub(super) fn model_names(state: &AppState) -> Vec<String> {
    vec![model_title(state), state.model_name.clone()]
}

async fn scripts() -> HttpResponse {
    HttpResponse::Ok().json(json!({"txt2img": [], "img2img": []}))
}

async fn samplers() -> HttpResponse {
    let list: Vec<Value> = A1111_SAMPLERS
        .iter()
        .map(|n| {
            json!({
                "name": n.a1111_name,
                "aliases": n.a1111_aliases,
                // Which of our samplers the name runs.
                "options": {"fluxlora_sampler": n.sampler.name()},
            })
        })
        .collect();
    HttpResponse::Ok().json(list)
}

async fn schedulers() -> HttpResponse {
    let list: Vec<Value> = A1111_SCHEDULERS
        .iter()
        .map(|n| {
            json!({
                "name": n.a1111_name,
                "label": n.a1111_label,
                "aliases": null,
                "default_rho": -1.0,
                "need_inner_model": false,
            })
        })
        .collect();
    HttpResponse::Ok().json(list)
}

async fn sd_models(state: web::Data<AppState>) -> HttpResponse {
    let filename = model_source(&state);
    HttpResponse::Ok().json(json!([{
        "title": model_title(&state),
        "model_name": state.model_name,
        "hash": null,
        "sha256": null,
        "filename": filename,
        "config": null,
    }]))
}

/// Where the loaded model's parts came from (its file, or the built-in model).
fn model_source(state: &AppState) -> String {
    state
        .model_path
        .as_deref()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| format!("(built in: {})", state.model_name))
}

/// Forge's additional modules: the autoencoder and text encoders loaded with
/// the model (one set; they cannot be switched per request).
async fn sd_modules(state: web::Data<AppState>) -> HttpResponse {
    let filename = model_source(&state);
    let list: Vec<Value> = ["ae", "t5xxl", "clip_l"]
        .iter()
        .map(|name| json!({"model_name": name, "filename": filename}))
        .collect();
    HttpResponse::Ok().json(list)
}

/// No upscalers: hires fix is refused, so only A1111's "None" entry.
async fn upscalers() -> HttpResponse {
    HttpResponse::Ok().json(json!([{
        "name": "None",
        "model_name": null,
        "model_path": null,
        "model_url": null,
        "scale": 4.0,
    }]))
}

/// Textual-inversion embeddings: Flux has none loaded.
async fn embeddings() -> HttpResponse {
    HttpResponse::Ok().json(json!({"loaded": {}, "skipped": {}}))
}

async fn loras(state: web::Data<AppState>) -> HttpResponse {
    let Some(dir) = state.admission.lora_dir.clone() else {
        return HttpResponse::Ok().json(json!([]));
    };
    let files = lora_files(&state);
    // Reading each header is file I/O: off the async thread.
    let list = web::block(move || {
        files
            .iter()
            .map(|file| {
                let path = dir.join(file);
                let metadata = lora_io::read_metadata(&path).unwrap_or_default();
                let name = lora_tags::stem(file).to_string();
                let alias = metadata
                    .get("ss_output_name")
                    .cloned()
                    .unwrap_or_else(|| name.clone());
                json!({
                    "name": name,
                    "alias": alias,
                    "path": path.display().to_string(),
                    "metadata": metadata,
                })
            })
            .collect::<Vec<Value>>()
    })
    .await
    .unwrap_or_default();
    HttpResponse::Ok().json(list)
}

async fn refresh_loras() -> HttpResponse {
    HttpResponse::Ok().json(Value::Null)
}

async fn get_options(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok().json(json!({
        "sd_model_checkpoint": model_title(&state),
        "sd_checkpoint_hash": null,
        "sd_vae": "Automatic",
        "samples_format": "png",
        "CLIP_stop_at_last_layers": 1,
        "forge_preset": "flux",
        "forge_additional_modules": [],
    }))
}

/// Settings: `sd_model_checkpoint` must name the loaded model; the rest is
/// accepted and ignored (logged).
async fn set_options(
    state: web::Data<AppState>,
    body: web::Bytes,
) -> Result<HttpResponse, WebuiError> {
    let options: Map<String, Value> =
        serde_json::from_slice(&body).map_err(|e| WebuiError::Validation {
            loc: vec!["body".into()],
            msg: format!("JSON object expected: {e}"),
            kind: "json_invalid",
        })?;
    let names = model_names(&state);
    for (key, value) in &options {
        if key == "sd_model_checkpoint" && !names.iter().any(|n| Some(n.as_str()) == value.as_str())
        {
            return Err(WebuiError::field(
                key,
                format!(
                    "the daemon serves one model ({}); start `fluxlora serve --model` with another to switch",
                    names[0]
                ),
            ));
        }
        tracing::debug!(key, "A1111 option ignored");
    }
    Ok(HttpResponse::Ok().json(Value::Null))
}
