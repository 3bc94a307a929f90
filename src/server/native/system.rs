//! `/v1/system` (the daemon: version, model, device, queue, subscribers) and
//! `/v1/nodes` (the node definitions in ComfyUI's `/object_info` format).

use actix_web::http::Method;
use actix_web::{web, HttpResponse};
use serde::Serialize;
use utoipa::ToSchema;

use crate::engine::bus::SubscriberStats;
use crate::engine::events::JobState;
use crate::server::comfy::nodes;
use crate::server::route_table::RouteTable;
use crate::server::state::AppState;

pub(super) fn routes(table: &mut RouteTable) {
    table
        .add(Method::GET, "/v1/system", system)
        .add(Method::GET, "/v1/nodes", object_info);
}

/// The daemon's state.
#[derive(Serialize, ToSchema)]
pub(crate) struct System {
    /// The daemon's version.
    pub version: String,
    /// Name of the loaded model.
    pub model: String,
    /// Where the model runs: `cpu` or `cuda:N`.
    pub device: String,
    /// The loaded model's compute dtype.
    #[schema(value_type = crate::config::Precision)]
    pub dtype: String,
    /// Resident memory of the process now (Linux `VmRSS`); null where the OS does not tell.
    #[schema(required)]
    pub memory_bytes: Option<u64>,
    /// Peak resident memory of the process (Linux `VmHWM`); null where the OS does not tell.
    #[schema(required)]
    pub peak_memory_bytes: Option<u64>,
    pub queue: QueueCounts,
    /// One entry per live event subscription (WebSocket connection); its length is
    /// the number of subscribers.
    pub subscribers: Vec<SubscriberStats>,
}

/// Jobs waiting and running.
#[derive(Serialize, ToSchema)]
pub(crate) struct QueueCounts {
    /// Jobs waiting to run.
    pub queued: usize,
    /// Jobs running.
    pub running: usize,
}

/// The daemon: version, model, device, queue and subscribers.
#[utoipa::path(
    get,
    path = "/v1/system",
    tag = "system",
    operation_id = "getSystem",
    responses((status = 200, description = "The daemon's state.", body = System))
)]
async fn system(state: web::Data<AppState>) -> HttpResponse {
    let jobs = state.engine.jobs();
    let count = |s: JobState| jobs.iter().filter(|j| j.state == s).count();
    HttpResponse::Ok().json(System {
        version: env!("CARGO_PKG_VERSION").to_string(),
        model: state.model_name.clone(),
        device: state.device.clone(),
        dtype: state.dtype.clone(),
        memory_bytes: crate::train::events::memory_bytes(),
        peak_memory_bytes: crate::train::events::peak_memory_bytes(),
        queue: QueueCounts {
            queued: count(JobState::Queued),
            running: count(JobState::Running),
        },
        subscribers: state.engine.subscribers(),
    })
}

/// Node definitions in ComfyUI's `/object_info` format.
///
/// A map from node class name to node definition, exactly as ComfyUI's
/// `GET /object_info` answers (`input`, `output`, `output_name`, `name`,
/// `display_name`, `category`, …), with the current LoRA names filled in.
#[utoipa::path(
    get,
    path = "/v1/nodes",
    tag = "system",
    operation_id = "getNodes",
    responses((status = 200, description = "The node definitions: node class name → node definition.", body = HashMap<String, Object>))
)]
async fn object_info(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok().json(nodes::object_info(&crate::server::comfy::folder_lists(
        &state,
    )))
}
