//! `/v1/sample`: sample and wait for the images.

use actix_web::http::Method;
use actix_web::{web, HttpResponse};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::engine::events::JobState;
use crate::engine::{JobRequest, SampleJob};
use crate::server::errors::{parse, ApiError, BadRequest, TooLarge};
use crate::server::route_table::RouteTable;
use crate::server::state::AppState;

pub(super) fn routes(table: &mut RouteTable) {
    table.add(Method::POST, "/v1/sample", sample_now);
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct SampleQuery {
    /// `json` for `{"id", "images": [base64 PNG…]}` instead of the first image's
    /// PNG bytes.
    #[serde(default)]
    format: Option<String>,
}

/// `POST /v1/sample?format=json`'s answer.
#[derive(Serialize, ToSchema)]
pub(crate) struct SampleImages {
    /// The sampling job's id.
    pub id: String,
    /// Every image of the batch, base64 PNG.
    #[schema(content_encoding = "base64", content_media_type = "image/png")]
    pub images: Vec<String>,
}

/// Sample and wait for the images.
///
/// Queues a sampling job like `POST /v1/jobs/sample` and answers when it ends (it
/// waits behind queued jobs; a running training job serves it between optimizer
/// steps). The answer is the first image as PNG bytes, or with `format=json`
/// every image of the batch as base64 PNG. A job that fails or is cancelled is
/// answered 400 with the job's error as message.
#[utoipa::path(
    post,
    path = "/v1/sample",
    tag = "sampling",
    operation_id = "sampleNow",
    params(SampleQuery),
    request_body(content = SampleJob, description = "The sampling job."),
    responses(
        (status = 200, description = "The first image, or all images with `format=json`.", content(
            ("image/png"),
            (SampleImages = "application/json"),
        )),
        (status = 400, response = BadRequest),
        (status = 413, response = TooLarge),
    )
)]
async fn sample_now(
    state: web::Data<AppState>,
    body: web::Json<serde_json::Value>,
    query: web::Query<SampleQuery>,
) -> Result<HttpResponse, ApiError> {
    let mut job: SampleJob = parse(body.into_inner())?;
    state.admission.check_sample(&mut job)?;
    let engine = state.engine.clone();
    let id = engine.submit(JobRequest::Sample(job))?;
    let record = web::block(move || engine.wait(&id))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))??;
    if record.state != JobState::Finished {
        let message = record
            .error
            .unwrap_or_else(|| format!("sampling ended {:?}", record.state));
        return Err(ApiError::bad(message));
    }
    let images: Vec<Vec<u8>> = record
        .outputs
        .iter()
        .map(std::fs::read)
        .collect::<Result<_, _>>()
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    if query.format.as_deref() == Some("json") {
        use base64::Engine as _;
        let images = images
            .iter()
            .map(|b| base64::engine::general_purpose::STANDARD.encode(b))
            .collect();
        return Ok(HttpResponse::Ok().json(SampleImages {
            id: record.id,
            images,
        }));
    }
    let first = images
        .into_iter()
        .next()
        .ok_or_else(|| ApiError::Internal("no image produced".into()))?;
    Ok(HttpResponse::Ok().content_type("image/png").body(first))
}
