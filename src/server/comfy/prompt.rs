//! `POST /prompt`, `GET /prompt`: a graph is validated against the node
//! definitions (run-time lists filled now) and queued, or rejected with
//! ComfyUI's 400 shapes (`docs/comfyui-protocol.md` §1, §3); and
//! `POST /fluxlora/run`, which runs one node for the ComfyUI bridge through the
//! same queue and executor and answers with its outputs.
//!
//! Must not: touch tensors or run anything; the executor does.

use actix_web::http::Method;
use actix_web::{web, HttpResponse};
use serde_json::{json, Map, Value};

use super::graph::{self, NodeDefs, NodeId, Validated};
use super::ids;
use super::nodes;
use super::queue::Outcome;
use super::routes::{both, folder_lists};
use crate::server::route_table::RouteTable;
use crate::server::state::AppState;

pub(super) fn routes(table: &mut RouteTable) {
    both(table, Method::POST, "/prompt", post_prompt);
    both(table, Method::GET, "/prompt", get_prompt);
    both(table, Method::POST, "/fluxlora/run", run_node);
}

/// ComfyUI's whole-request error body.
pub(super) fn whole_error(kind: &str, message: &str, details: &str) -> Value {
    json!({
        "error": {"type": kind, "message": message, "details": details, "extra_info": {}},
        "node_errors": {},
    })
}

fn bad_request(kind: &str, message: &str, details: &str) -> HttpResponse {
    HttpResponse::BadRequest().json(whole_error(kind, message, details))
}

/// The definitions with the run-time lists filled, as they are now; `run`
/// counts as an output node (the one node `/fluxlora/run` executes).
fn defs(state: &AppState, run: Option<&str>) -> NodeDefs {
    let mut info = nodes::object_info(&folder_lists(state));
    if let Some(def) = run.and_then(|class| info.get_mut(class)) {
        def["output_node"] = json!(true);
    }
    NodeDefs::from_object_info(&info)
}

/// A prompt that passed validation, ready to queue.
struct Accepted {
    prompt_id: String,
    number: Value,
    node_errors: Value,
}

/// Validates and queues `prompt`; `Err` is the 400 answer.
fn queue_prompt(
    state: &AppState,
    defs: &NodeDefs,
    prompt: &Value,
    body: &Map<String, Value>,
    targets: Option<&[NodeId]>,
) -> Result<Accepted, HttpResponse> {
    let prompt_id = match body.get("prompt_id") {
        None | Some(Value::Null) => ids::uuid4(),
        Some(Value::String(id)) if ids::is_canonical_uuid(id) && !state.comfy.queue.knows(id) => {
            id.clone()
        }
        Some(other) => {
            return Err(bad_request(
                "invalid_prompt_id",
                "prompt_id must be a valid UUID",
                &format!("{other} is not a canonical lower-case UUID, or is in use"),
            ))
        }
    };
    let number = match body.get("number") {
        None | Some(Value::Null) => None,
        Some(n) => match n
            .as_f64()
            .or_else(|| n.as_str().and_then(|s| s.trim().parse().ok()))
        {
            Some(n) if n.is_finite() => Some(n),
            _ => {
                return Err(bad_request(
                    "invalid_prompt",
                    "number must be a number",
                    &n.to_string(),
                ))
            }
        },
    };
    let front = body.get("front").is_some_and(|f| match f {
        Value::Bool(b) => *b,
        Value::Null => false,
        Value::Number(n) => n.as_f64() != Some(0.0),
        Value::String(s) => !s.is_empty(),
        _ => true,
    });
    let Validated { graph, node_errors } = graph::validate(prompt, defs, targets)
        .map_err(|rejected| HttpResponse::BadRequest().json(rejected))?;
    let mut extra_data = match body.get("extra_data") {
        Some(Value::Object(m)) => m.clone(),
        _ => Map::new(),
    };
    let client_id = body
        .get("client_id")
        .and_then(Value::as_str)
        .filter(|c| !c.is_empty())
        .map(str::to_string);
    if let Some(c) = &client_id {
        extra_data.insert("client_id".into(), json!(c));
    }
    extra_data.insert(
        "create_time".into(),
        json!(std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)),
    );
    let numbered = state.comfy.queue.number_for(number, front);
    let answer_number = numbered.0.clone();
    let outputs = graph.outputs().to_vec();
    let trains = graph.nodes().any(|(_, n)| {
        nodes::get(&n.class_type).is_some_and(|d| d.mapping.job == nodes::JobKind::Train)
    });
    state.comfy.queue.put(
        numbered,
        prompt_id.clone(),
        prompt.clone(),
        Value::Object(extra_data),
        outputs,
        graph,
        client_id,
        trains,
    );
    Ok(Accepted {
        prompt_id,
        number: answer_number,
        node_errors: serde_json::to_value(node_errors).unwrap_or_default(),
    })
}

async fn post_prompt(state: web::Data<AppState>, body: web::Json<Value>) -> HttpResponse {
    let Value::Object(body) = body.into_inner() else {
        return bad_request(
            "invalid_prompt",
            "The request body must be a JSON object",
            "",
        );
    };
    let Some(prompt) = body.get("prompt").filter(|p| !p.is_null()) else {
        return bad_request("no_prompt", "No prompt provided", "No prompt provided");
    };
    let targets: Option<Vec<NodeId>> = match body.get("partial_execution_targets") {
        None | Some(Value::Null) => None,
        Some(t) => match serde_json::from_value(t.clone()) {
            Ok(t) => Some(t),
            Err(_) => {
                return bad_request(
                    "invalid_prompt",
                    "partial_execution_targets must be a list of node ids",
                    &t.to_string(),
                )
            }
        },
    };
    match queue_prompt(
        &state,
        &defs(&state, None),
        prompt,
        &body,
        targets.as_deref(),
    ) {
        Ok(a) => HttpResponse::Ok().json(json!({
            "prompt_id": a.prompt_id, "number": a.number, "node_errors": a.node_errors,
        })),
        Err(answer) => answer,
    }
}

async fn get_prompt(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok()
        .json(json!({"exec_info": {"queue_remaining": state.comfy.queue.remaining()}}))
}

/// `POST /fluxlora/run`'s body.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RunNode {
    class_type: String,
    #[serde(default)]
    inputs: Map<String, Value>,
    #[serde(default)]
    client_id: Option<String>,
}

/// Runs one node (the bridge's way to run ours inside a real ComfyUI): a
/// one-node prompt whose only target is that node, queued like any other, and
/// answered when it ends with the node's output values (`/ws` carries its
/// progress to `client_id`). List values are constants, not links.
async fn run_node(state: web::Data<AppState>, body: web::Json<Value>) -> HttpResponse {
    let run: RunNode = match serde_json::from_value(body.into_inner()) {
        Ok(r) => r,
        Err(e) => {
            return bad_request(
                "invalid_prompt",
                "expected {\"class_type\", \"inputs\", \"client_id\"}",
                &e.to_string(),
            )
        }
    };
    let inputs: Map<String, Value> = run
        .inputs
        .into_iter()
        .map(|(k, v)| match v {
            // A list would read as a link: ComfyUI's wrapper for list constants.
            Value::Array(_) => (k, json!({"__value__": v})),
            v => (k, v),
        })
        .collect();
    let defs = defs(&state, Some(&run.class_type));
    let prompt = json!({"1": {"class_type": run.class_type, "inputs": inputs}});
    let mut body = Map::new();
    if let Some(c) = run.client_id {
        body.insert("client_id".into(), json!(c));
    }
    let accepted = match queue_prompt(&state, &defs, &prompt, &body, Some(&["1".to_string()])) {
        Ok(a) => a,
        Err(answer) => return answer,
    };
    let queue = state.comfy.queue.clone();
    let id = accepted.prompt_id.clone();
    let Ok(Some(finished)) = web::block(move || queue.wait_for(&id)).await else {
        return HttpResponse::Conflict().json(whole_error(
            "execution_interrupted",
            "The prompt was removed from the queue or the daemon is stopping",
            &accepted.prompt_id,
        ));
    };
    match finished.outcome {
        Outcome::Success => HttpResponse::Ok().json(json!({
            "prompt_id": finished.prompt_id,
            "outputs": finished.values.get("1").cloned().unwrap_or_default(),
        })),
        Outcome::Interrupted => HttpResponse::Conflict().json(whole_error(
            "execution_interrupted",
            "The node was interrupted",
            &finished.prompt_id,
        )),
        Outcome::Error => {
            let (message, node_type) = finished.error.unwrap_or_default();
            HttpResponse::UnprocessableEntity().json(json!({
                "error": {
                    "type": "execution_error", "message": message, "details": node_type,
                    "extra_info": {"prompt_id": finished.prompt_id},
                },
            }))
        }
    }
}
