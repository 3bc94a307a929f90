//! `/v1/jobs`: training and sampling jobs — submit, list, get, delete, control
//! (cancel, pause, resume), their stored events and the files of their folders.

use std::path::Path;

use actix_web::http::Method;
use actix_web::{web, HttpResponse};
use serde::de::IntoDeserializer;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::engine::events::{Event, JobState};
use crate::engine::store::{JobKind, JobRecord};
use crate::engine::{Control, JobRequest, SampleJob};
use crate::server::errors::{parse, ApiError, BadRequest, Conflict, NotFound, TooLarge};
use crate::server::route_table::RouteTable;
use crate::server::state::AppState;
use crate::server::{paths, present};
use crate::train::config::TrainConfig;

pub(super) fn routes(table: &mut RouteTable) {
    table
        .add(Method::GET, "/v1/jobs", list_jobs)
        .add(Method::POST, "/v1/jobs/train", submit_train)
        .add(Method::POST, "/v1/jobs/sample", submit_sample)
        .add(Method::GET, "/v1/jobs/{id}", get_job)
        .add(Method::DELETE, "/v1/jobs/{id}", delete_job)
        .add(Method::GET, "/v1/jobs/{id}/events", job_events)
        .add(Method::GET, "/v1/jobs/{id}/files/{path:.*}", job_file)
        .add(Method::POST, "/v1/jobs/{id}/{action}", control_job);
}

/// The id of the queued job.
#[derive(Serialize, ToSchema)]
pub(crate) struct JobId {
    /// The job id.
    pub id: String,
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
struct JobPath {
    /// A job id, as `POST /v1/jobs/train` or `/v1/jobs/sample` answered it.
    #[param(example = "18f0c2a1b3d-0000")]
    id: String,
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct JobFilter {
    /// Only jobs in this state.
    #[serde(default)]
    state: Option<JobState>,
    /// Only training or sampling jobs.
    #[serde(default)]
    kind: Option<JobKind>,
    /// Only the newest N of those (still oldest first).
    #[serde(default)]
    limit: Option<usize>,
    /// The token, when sent as a query parameter (checked by the guard; see the
    /// `token` security scheme).
    #[serde(default, rename = "token")]
    #[param(ignore)]
    _token: Option<String>,
}

/// Jobs, oldest first.
///
/// Every job, or those matching the filters.
#[utoipa::path(
    get,
    path = "/v1/jobs",
    tag = "jobs",
    operation_id = "listJobs",
    params(JobFilter),
    responses(
        (status = 200, description = "The jobs.", body = Vec<JobRecord>),
        (status = 400, response = BadRequest),
    )
)]
async fn list_jobs(state: web::Data<AppState>, filter: web::Query<JobFilter>) -> HttpResponse {
    let mut jobs: Vec<_> = state
        .engine
        .jobs()
        .into_iter()
        .filter(|j| filter.state.is_none_or(|s| j.state == s))
        .filter(|j| filter.kind.as_ref().is_none_or(|k| &j.kind == k))
        .collect();
    if let Some(limit) = filter.limit {
        jobs.drain(..jobs.len().saturating_sub(limit));
    }
    HttpResponse::Ok().json(jobs)
}

/// One job.
#[utoipa::path(
    get,
    path = "/v1/jobs/{id}",
    tag = "jobs",
    operation_id = "getJob",
    params(JobPath),
    responses(
        (status = 200, description = "The job.", body = JobRecord),
        (status = 404, response = NotFound),
    )
)]
async fn get_job(
    state: web::Data<AppState>,
    path: web::Path<JobPath>,
) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(state.engine.job(&path.id)?))
}

/// Delete a job and its folder.
///
/// Only a finished, cancelled, failed or interrupted job can be deleted; a queued,
/// running or paused one is answered 409 (cancel it first). The copy of a finished
/// LoRA in the LoRA folder stays.
#[utoipa::path(
    delete,
    path = "/v1/jobs/{id}",
    tag = "jobs",
    operation_id = "deleteJob",
    params(JobPath),
    responses(
        (status = 204, description = "Deleted."),
        (status = 404, response = NotFound),
        (status = 409, response = Conflict),
    )
)]
async fn delete_job(
    state: web::Data<AppState>,
    path: web::Path<JobPath>,
) -> Result<HttpResponse, ApiError> {
    state.engine.delete(&path.id)?;
    Ok(HttpResponse::NoContent().finish())
}

/// Queue a training run.
///
/// The config is parsed and validated before anything is queued; a 400 names the
/// offending field in `error.field`. Dataset and validation folders must lie
/// inside the allowed folders (`field`: `dataset.folders[i]`,
/// `validation_dataset.folders[i]`), and `cache_dir` too (it may not exist yet;
/// no `..`). The daemon trains its loaded model on its device and writes into the
/// job's folder: a config that sets `model` is refused, `device` and `output_dir`
/// are not used; `mixed_precision` must match the loaded model's dtype or the job
/// fails.
#[utoipa::path(
    post,
    path = "/v1/jobs/train",
    tag = "jobs",
    operation_id = "submitTrain",
    request_body(content = TrainConfig, description = "The training run."),
    responses(
        (status = 202, description = "Queued.", body = JobId),
        (status = 400, response = BadRequest),
        (status = 413, response = TooLarge),
    )
)]
async fn submit_train(
    state: web::Data<AppState>,
    body: web::Json<serde_json::Value>,
) -> Result<HttpResponse, ApiError> {
    let mut cfg: TrainConfig = parse(body.into_inner())?;
    state.admission.check_train(&mut cfg)?;
    let id = state.engine.submit(JobRequest::Train(Box::new(cfg)))?;
    Ok(HttpResponse::Accepted().json(JobId { id }))
}

/// Queue a sampling job.
///
/// Answers at once with the job id; follow the job with its events. LoRA paths
/// must lie inside the allowed folders (a bare file name is looked up in the LoRA
/// folder; `field`: `loras[i].path`). Sizes, steps, batch size, guidance and the
/// path-or-`live_job` rule are checked before queueing (`field`:
/// `request.width`, …); the LoRA files themselves are read when the job runs,
/// and a bad one fails the job (an `error` event).
#[utoipa::path(
    post,
    path = "/v1/jobs/sample",
    tag = "jobs",
    operation_id = "submitSample",
    request_body(content = SampleJob, description = "The sampling job."),
    responses(
        (status = 202, description = "Queued.", body = JobId),
        (status = 400, response = BadRequest),
        (status = 413, response = TooLarge),
    )
)]
async fn submit_sample(
    state: web::Data<AppState>,
    body: web::Json<serde_json::Value>,
) -> Result<HttpResponse, ApiError> {
    let mut job: SampleJob = parse(body.into_inner())?;
    state.admission.check_sample(&mut job)?;
    let id = state.engine.submit(JobRequest::Sample(job))?;
    Ok(HttpResponse::Accepted().json(JobId { id }))
}

/// What `POST /v1/jobs/{id}/{action}` asks of a job.
#[derive(Clone, Copy, Debug, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub(crate) enum ControlAction {
    Cancel,
    Pause,
    Resume,
}

impl From<ControlAction> for Control {
    fn from(action: ControlAction) -> Self {
        match action {
            ControlAction::Cancel => Control::Cancel,
            ControlAction::Pause => Control::Pause,
            ControlAction::Resume => Control::Resume,
        }
    }
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
struct ControlPath {
    /// A job id, as `POST /v1/jobs/train` or `/v1/jobs/sample` answered it.
    #[param(example = "18f0c2a1b3d-0000")]
    id: String,
    /// What to do: `cancel`, `pause` or `resume`.
    #[param(value_type = ControlAction)]
    action: String,
}

/// Cancel, pause or resume a job.
///
/// - `cancel`: possible while the job is queued, running, paused or interrupted
///   (409 once it finished, failed or was cancelled). A running training job stops
///   after the current optimizer step and saves its progress; a running sampling
///   job stops after the current sampling step.
/// - `pause`: possible while the job is queued, or running if it is a training job
///   (409 otherwise; a running sampling job can only be cancelled). A running
///   training job pauses after the current optimizer step; sampling requests are
///   still served while it is paused.
/// - `resume`: possible while the job is paused or interrupted, or a cancelled or
///   failed training job (409 otherwise). Resuming an `interrupted` training job
///   (one that was running when the daemon stopped), a cancelled one or a failed
///   one (say, the disk filled up during a save) re-queues it; it continues from
///   its last complete save, and a failed job's `error` is cleared.
///
/// The answer is the job as it is when the request has been accepted: the change
/// itself takes effect in the worker (between optimizer steps for a running
/// training job) and is reported as a `state` event. Another `action` is answered
/// 404.
#[utoipa::path(
    post,
    path = "/v1/jobs/{id}/{action}",
    tag = "jobs",
    operation_id = "controlJob",
    params(ControlPath),
    responses(
        (status = 200, description = "The job.", body = JobRecord),
        (status = 404, response = NotFound),
        (status = 409, response = Conflict),
    )
)]
async fn control_job(
    state: web::Data<AppState>,
    path: web::Path<ControlPath>,
) -> Result<HttpResponse, ApiError> {
    let ControlPath { id, action } = path.into_inner();
    let parsed: Result<ControlAction, serde::de::value::Error> =
        ControlAction::deserialize(action.as_str().into_deserializer());
    let control = parsed.map_err(|_| {
        ApiError::NotFound(format!("no action `{action}`: use cancel, pause or resume"))
    })?;
    state.engine.control(&id, control.into())?;
    Ok(HttpResponse::Ok().json(state.engine.job(&id)?))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct Since {
    /// Only events with a greater `seq`.
    #[serde(default)]
    #[param(default = 0)]
    since: u64,
}

/// The job's stored events.
///
/// Every stored event of the job with `seq` greater than `since`, in order.
/// Previews are never stored.
#[utoipa::path(
    get,
    path = "/v1/jobs/{id}/events",
    tag = "jobs",
    operation_id = "getJobEvents",
    params(JobPath, Since),
    responses(
        (status = 200, description = "The events.", body = Vec<Event>),
        (status = 400, response = BadRequest),
        (status = 404, response = NotFound),
    )
)]
async fn job_events(
    state: web::Data<AppState>,
    path: web::Path<JobPath>,
    q: web::Query<Since>,
) -> Result<HttpResponse, ApiError> {
    let events: Vec<serde_json::Value> = state
        .engine
        .events_since(&path.id, q.since)?
        .iter()
        .map(|event| present::event(&state.engine, event))
        .collect();
    Ok(HttpResponse::Ok().json(events))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
struct JobFilePath {
    /// A job id, as `POST /v1/jobs/train` or `/v1/jobs/sample` answered it.
    #[param(example = "18f0c2a1b3d-0000")]
    id: String,
    /// The file's path inside the job folder; it may contain slashes.
    #[param(example = "samples/18f0c2a1b3d-0001_00.png")]
    path: String,
}

/// A file of the job's folder.
///
/// Samples (`samples/<id>_00.png`), saves and the LoRA of a job, by their path
/// relative to the job's folder (slashes allowed; `..` and absolute paths are
/// answered 400). PNG files are sent as `image/png`, JSON as `application/json`,
/// anything else as `application/octet-stream`.
#[utoipa::path(
    get,
    path = "/v1/jobs/{id}/files/{path}",
    tag = "jobs",
    operation_id = "getJobFile",
    params(JobFilePath),
    responses(
        (status = 200, description = "The file's bytes.", content(
            ("image/png"),
            (Object = "application/json"),
            ("application/octet-stream"),
        )),
        (status = 400, response = BadRequest),
        (status = 404, response = NotFound),
    )
)]
async fn job_file(
    state: web::Data<AppState>,
    path: web::Path<JobFilePath>,
) -> Result<HttpResponse, ApiError> {
    let JobFilePath { id, path: rel } = path.into_inner();
    state.engine.job(&id)?;
    let canonical = paths::job_file(&state.engine.job_dir(&id), &id, Path::new(&rel))?;
    let mime = match canonical.extension().and_then(|e| e.to_str()) {
        Some("png") => "image/png",
        Some("json") => "application/json",
        _ => "application/octet-stream",
    };
    // Checkpoints can be large: read off the request threads.
    let bytes = web::block(move || std::fs::read(&canonical))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(HttpResponse::Ok().content_type(mime).body(bytes))
}
