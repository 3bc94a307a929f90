//! The queue and history routes (`docs/comfyui-protocol.md` §1): `GET`/`POST
//! /queue`, `GET`/`POST /history`, `/history/{id}`, `POST /interrupt`, and the
//! jobs view newer front ends read them through (`/api/jobs`, `/api/jobs/{id}`).
//!
//! Must not: run anything; it reads and edits the [`PromptQueue`](super::queue::PromptQueue).

use actix_web::http::Method;
use actix_web::{web, HttpResponse};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::queue::{Finished, Outcome, QueuedPrompt};
use super::routes::both;
use crate::server::route_table::RouteTable;
use crate::server::state::AppState;

pub(super) fn routes(table: &mut RouteTable) {
    both(table, Method::GET, "/queue", get_queue);
    both(table, Method::POST, "/queue", post_queue);
    both(table, Method::GET, "/history", get_history);
    both(table, Method::GET, "/history/{prompt_id}", get_history_of);
    both(table, Method::POST, "/history", post_history);
    both(table, Method::POST, "/interrupt", interrupt);
    // Written with the prefix in ComfyUI's table, as here.
    table.add(Method::GET, "/api/jobs", list_jobs);
    table.add(Method::GET, "/api/jobs/{id}", get_job);
}

async fn get_queue(state: web::Data<AppState>) -> HttpResponse {
    let (running, pending) = state.comfy.queue.items();
    HttpResponse::Ok().json(json!({"queue_running": running, "queue_pending": pending}))
}

/// `{"clear": true}` and/or `{"delete": [ids]}`, as `POST /queue` and `/history` take.
#[derive(Deserialize)]
struct Edit {
    #[serde(default)]
    clear: bool,
    #[serde(default)]
    delete: Option<Vec<String>>,
}

fn edit(body: &web::Bytes) -> Result<Edit, HttpResponse> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Edit {
            clear: false,
            delete: None,
        });
    }
    serde_json::from_slice(body).map_err(|e| {
        HttpResponse::BadRequest().json(json!({
            "error": format!("expected {{\"clear\": true}} or {{\"delete\": [prompt ids]}}: {e}"),
        }))
    })
}

async fn post_queue(state: web::Data<AppState>, body: web::Bytes) -> HttpResponse {
    let edit = match edit(&body) {
        Ok(e) => e,
        Err(answer) => return answer,
    };
    if edit.clear {
        state.comfy.queue.remove_pending(None);
    }
    if let Some(ids) = &edit.delete {
        state.comfy.queue.remove_pending(Some(ids));
    }
    HttpResponse::Ok().finish()
}

#[derive(Deserialize)]
struct HistoryQuery {
    #[serde(default)]
    max_items: Option<usize>,
    #[serde(default)]
    offset: Option<usize>,
}

async fn get_history(state: web::Data<AppState>, query: web::Query<HistoryQuery>) -> HttpResponse {
    let entries: Map<String, Value> = state
        .comfy
        .queue
        .history(query.max_items, query.offset)
        .into_iter()
        .collect();
    HttpResponse::Ok().json(entries)
}

/// One entry, or `{}` for an unknown id (ComfyUI answers 200).
async fn get_history_of(state: web::Data<AppState>, id: web::Path<String>) -> HttpResponse {
    let mut one = Map::new();
    if let Some(f) = state.comfy.queue.finished(&id) {
        one.insert(f.prompt_id, f.entry);
    }
    HttpResponse::Ok().json(one)
}

async fn post_history(state: web::Data<AppState>, body: web::Bytes) -> HttpResponse {
    let edit = match edit(&body) {
        Ok(e) => e,
        Err(answer) => return answer,
    };
    if edit.clear {
        state.comfy.queue.remove_history(None);
    }
    if let Some(ids) = &edit.delete {
        state.comfy.queue.remove_history(Some(ids));
    }
    HttpResponse::Ok().finish()
}

async fn interrupt(state: web::Data<AppState>, body: web::Bytes) -> HttpResponse {
    let prompt_id = serde_json::from_slice::<Value>(&body).ok().and_then(|v| {
        v.get("prompt_id")
            .and_then(Value::as_str)
            .map(str::to_string)
    });
    let executor = state.comfy.executor.clone();
    // Cancelling takes the engine's lock: off the async thread.
    let _ = web::block(move || executor.interrupt(prompt_id.as_deref())).await;
    HttpResponse::Ok().finish()
}

/// One job in ComfyUI's jobs view.
fn job_of_queued(prompt: &QueuedPrompt, status: &str) -> Value {
    json!({
        "id": prompt.prompt_id,
        "status": status,
        "priority": prompt.number,
        "create_time": prompt.extra_data.get("create_time"),
        "outputs_count": 0,
        "previewable_outputs_count": 0,
    })
}

/// The timestamp of a history message of this type.
fn message_time(entry: &Value, kind: &str) -> Option<Value> {
    entry["status"]["messages"]
        .as_array()?
        .iter()
        .find(|m| m[0] == kind)
        .map(|m| m[1]["timestamp"].clone())
}

fn job_of_finished(f: &Finished) -> Value {
    let status = match f.outcome {
        Outcome::Success => "completed",
        Outcome::Interrupted => "cancelled",
        Outcome::Error => "failed",
    };
    let outputs = f.entry["outputs"].as_object().cloned().unwrap_or_default();
    let images: Vec<(String, Value)> = outputs
        .iter()
        .flat_map(|(node, ui)| {
            ui["images"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .map(move |i| (node.clone(), i))
        })
        .collect();
    // Saved images win over temporary ones as the preview.
    let preview = images
        .iter()
        .find(|(_, i)| i["type"] == "output")
        .or_else(|| images.first())
        .map(|(node, i)| {
            let mut p = i.clone();
            p["nodeId"] = json!(node);
            p["mediaType"] = json!("images");
            p
        });
    let end = message_time(&f.entry, "execution_success")
        .or_else(|| message_time(&f.entry, "execution_error"))
        .or_else(|| message_time(&f.entry, "execution_interrupted"));
    let error = f.entry["status"]["messages"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m[0] == "execution_error"))
        .map(|m| m[1].clone());
    let mut job = json!({
        "id": f.prompt_id,
        "status": status,
        "priority": f.entry["prompt"][0],
        "create_time": f.entry["prompt"][3]["create_time"],
        "outputs_count": images.len(),
        "previewable_outputs_count": images.len(),
        "execution_start_time": message_time(&f.entry, "execution_start"),
        "execution_end_time": end,
        "execution_error": error,
        "preview_output": preview,
    });
    prune(&mut job);
    job
}

/// Drops keys whose value is null (ComfyUI's `prune_dict`).
fn prune(job: &mut Value) {
    if let Value::Object(m) = job {
        m.retain(|_, v| !v.is_null());
    }
}

#[derive(Deserialize)]
struct JobsQuery {
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    sort_order: Option<String>,
    #[serde(default)]
    limit: Option<usize>,
    #[serde(default)]
    offset: Option<i64>,
}

const JOB_STATUSES: [&str; 5] = ["pending", "in_progress", "completed", "failed", "cancelled"];

async fn list_jobs(state: web::Data<AppState>, query: web::Query<JobsQuery>) -> HttpResponse {
    let wanted: Option<Vec<&str>> = query.status.as_deref().map(|s| {
        s.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect()
    });
    if let Some(bad) = wanted.iter().flatten().find(|s| !JOB_STATUSES.contains(s)) {
        return HttpResponse::BadRequest().json(json!({
            "error": format!("unknown status `{bad}`: use {}", JOB_STATUSES.join(", ")),
        }));
    }
    let queue = &state.comfy.queue;
    let mut jobs: Vec<Value> = queue
        .running_prompts()
        .iter()
        .map(|p| job_of_queued(p, "in_progress"))
        .chain(queue.pending().iter().map(|p| job_of_queued(p, "pending")))
        .chain(queue.all_finished().iter().map(job_of_finished))
        .map(|mut j| {
            prune(&mut j);
            j
        })
        .filter(|j| {
            wanted
                .as_ref()
                .is_none_or(|w| j["status"].as_str().is_some_and(|s| w.contains(&s)))
        })
        .collect();
    let key = |j: &Value| j["create_time"].as_f64().unwrap_or(0.0);
    jobs.sort_by(|a, b| key(a).total_cmp(&key(b)));
    if query.sort_order.as_deref() != Some("asc") {
        jobs.reverse();
    }
    let total = jobs.len();
    let offset = query.offset.unwrap_or(0).max(0) as usize;
    let page: Vec<Value> = jobs
        .into_iter()
        .skip(offset)
        .take(query.limit.unwrap_or(usize::MAX))
        .collect();
    let has_more = offset + page.len() < total;
    HttpResponse::Ok().json(json!({
        "jobs": page,
        "pagination": {"offset": offset, "limit": query.limit, "total": total, "has_more": has_more},
    }))
}

async fn get_job(state: web::Data<AppState>, id: web::Path<String>) -> HttpResponse {
    let queue = &state.comfy.queue;
    if let Some(f) = queue.finished(&id) {
        let mut job = job_of_finished(&f);
        job["outputs"] = f.entry["outputs"].clone();
        job["execution_status"] = f.entry["status"].clone();
        job["workflow"] =
            json!({"prompt": f.entry["prompt"][2], "extra_data": f.entry["prompt"][3]});
        return HttpResponse::Ok().json(job);
    }
    let queued = queue
        .running_prompts()
        .into_iter()
        .find(|p| p.prompt_id == *id)
        .map(|p| (p, "in_progress"))
        .or_else(|| {
            queue
                .pending()
                .into_iter()
                .find(|p| p.prompt_id == *id)
                .map(|p| (p, "pending"))
        });
    match queued {
        Some((p, status)) => {
            let mut job = job_of_queued(&p, status);
            prune(&mut job);
            job["workflow"] = json!({"prompt": p.prompt, "extra_data": p.extra_data});
            HttpResponse::Ok().json(job)
        }
        None => HttpResponse::NotFound().json(json!({"error": "Job not found"})),
    }
}
