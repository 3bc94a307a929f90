//! `POST /prompt`: the graph is validated against the node definitions (LoRA
//! lists filled now) and rejected with ComfyUI's 400 shapes
//! (`docs/comfyui-protocol.md` §1, §3). The executor that runs a valid graph
//! is not here yet: a valid graph is answered 501, and nothing runs.
//!
//! Must not: touch tensors.

use actix_web::http::Method;
use actix_web::{web, HttpResponse};
use serde_json::{json, Value};

use super::graph::{self, NodeDefs, NodeId};
use super::nodes;
use super::routes::{both, lora_names};
use crate::server::route_table::RouteTable;
use crate::server::state::AppState;

pub(super) fn routes(table: &mut RouteTable) {
    both(table, Method::POST, "/prompt", post_prompt);
}

/// ComfyUI's whole-request error body.
fn whole_error(kind: &str, message: &str, details: &str) -> Value {
    json!({
        "error": {"type": kind, "message": message, "details": details, "extra_info": {}},
        "node_errors": {},
    })
}

async fn post_prompt(state: web::Data<AppState>, body: web::Json<Value>) -> HttpResponse {
    let Some(prompt) = body.get("prompt").filter(|p| !p.is_null()) else {
        return HttpResponse::BadRequest().json(whole_error(
            "no_prompt",
            "No prompt provided",
            "No prompt provided",
        ));
    };
    let defs = NodeDefs::from_object_info(&nodes::object_info(&lora_names(&state)));
    let targets: Option<Vec<NodeId>> = body
        .get("partial_execution_targets")
        .and_then(|t| serde_json::from_value(t.clone()).ok());
    match graph::validate(prompt, &defs, targets.as_deref()) {
        Err(rejected) => HttpResponse::BadRequest().json(rejected),
        Ok(_) => HttpResponse::NotImplemented().json(whole_error(
            "not_implemented",
            "This daemon validates prompts but does not execute them yet",
            "",
        )),
    }
}
