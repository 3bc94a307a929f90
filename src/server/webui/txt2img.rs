//! `POST /sdapi/v1/txt2img` and `/img2img` (txt2img plus a start image,
//! `img2img`): an A1111 request checked into a [`Plan`]
//! (`request`), run as `n_iter` engine sampling jobs of `batch_size` images one
//! after the other (recorded for `/progress`, with each batch's newest preview;
//! `/interrupt` stops them, `/skip` drops the batch now sampling), answered
//! as A1111 does: `images` (base64 PNGs carrying their infotext), `parameters`
//! (the request as parsed, with defaults) and `info` (a JSON string).

use actix_web::http::Method;
use actix_web::{web, HttpResponse};
use base64::Engine as _;
use serde_json::json;

use super::errors::WebuiError;
use super::info::{self, Ran};
use super::lists::{lora_files, model_names};
use super::request::{self, Context};
use super::state::{Run, WebuiState};
use std::time::Duration;

use crate::engine::bus::{Received, Subscription};
use crate::engine::events::{EventKind, JobState};
use crate::engine::JobRequest;
use crate::sample::png_meta::read_text_chunks;
use crate::server::route_table::RouteTable;
use crate::server::state::AppState;

pub(super) fn routes(table: &mut RouteTable) {
    table.add(Method::POST, "/sdapi/v1/txt2img", txt2img);
    table.add(Method::POST, "/sdapi/v1/img2img", img2img);
}

/// A seed below 2⁶⁴ that differs from call to call (not secret).
fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    hasher.finish()
}

/// Clears the recorded run when the request ends, however it ends.
struct Running<'a>(&'a WebuiState);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        *self.0.run() = None;
    }
}

/// Waits for sampling job `id` to end, keeping its step and newest preview in
/// the recorded run for `/progress`; `sub` was subscribed before it was submitted.
fn follow(
    state: &AppState,
    sub: &Subscription,
    id: &str,
) -> Result<crate::engine::store::JobRecord, crate::engine::EngineError> {
    loop {
        match sub.recv(Duration::from_millis(500)) {
            Received::Event(e) if e.job == id => match e.kind {
                EventKind::Preview { png, .. } => {
                    if let Some(run) = state.webui.run().as_mut() {
                        run.preview = Some(png);
                    }
                }
                EventKind::SampleStep { step, total } => {
                    if let Some(run) = state.webui.run().as_mut() {
                        (run.step, run.steps) = (step, total);
                    }
                }
                EventKind::State { state: s } if s.is_terminal() => break,
                _ => {}
            },
            Received::Event(_) => {}
            // The state is in the store whatever the bus dropped.
            Received::Missed(_) | Received::Timeout => {
                if state.engine.job(id)?.state.is_terminal() {
                    break;
                }
            }
        }
    }
    state.engine.wait(id)
}

/// Whether `/skip` stopped the batch that just ended (and clears the mark, so
/// the next batch runs).
fn take_skip(webui: &WebuiState) -> bool {
    webui
        .run()
        .as_mut()
        .is_some_and(|r| std::mem::take(&mut r.skipped) && !r.interrupted)
}

async fn txt2img(state: web::Data<AppState>, body: web::Bytes) -> Result<HttpResponse, WebuiError> {
    generate(state, body, false).await
}

async fn img2img(state: web::Data<AppState>, body: web::Bytes) -> Result<HttpResponse, WebuiError> {
    generate(state, body, true).await
}

async fn generate(
    state: web::Data<AppState>,
    body: web::Bytes,
    from_image: bool,
) -> Result<HttpResponse, WebuiError> {
    let request = request::parse(&body)?;
    let init = from_image
        .then(|| {
            super::img2img::init_image(
                request.denoising_strength,
                &request.unknown,
                &state.webui.init_dir,
            )
        })
        .transpose()?;
    let (files, names) = (lora_files(&state), model_names(&state));
    let ctx = Context {
        lora_files: &files,
        model_names: &names,
    };
    let plan = request.plan(&ctx, &mut random_seed)?;
    let mut jobs: Vec<_> = (0..plan.n_iter).map(|i| plan.job(i)).collect();
    for job in &mut jobs {
        if let Some(init) = &init {
            job.request.init_image = Some(init.path.clone());
            job.request.denoise = Some(init.denoise);
        }
        state.admission.check_sample(job)?;
    }

    let _queue = state.webui.queue.lock().await;
    let timestamp = info::timestamp(crate::clock::unix_now());
    *state.webui.run() = Some(Run::new(plan.n_iter, timestamp.clone()));
    let running = Running(&state.webui);
    let mut outputs = vec![];
    for (i, job) in jobs.into_iter().enumerate() {
        if state.webui.run().as_ref().is_some_and(|r| r.interrupted) {
            break;
        }
        // Subscribed before submitting, so no preview of the batch is missed.
        let sub = state.engine.subscribe(None, 64, true);
        let id = state
            .engine
            .submit(JobRequest::Sample(job))
            .map_err(|e| WebuiError::Internal(e.to_string()))?;
        let stopped = {
            let mut run = state.webui.run();
            let run = run.as_mut();
            let stopped = run.as_ref().is_some_and(|r| r.interrupted || r.skipped);
            if let Some(r) = run {
                r.job = Some(id.clone());
                r.job_no = i;
                (r.step, r.steps, r.preview) = (0, 0, None);
            }
            stopped
        };
        let following = state.clone();
        let record = web::block(move || {
            if stopped {
                let _ = following
                    .engine
                    .control(&id, crate::engine::Control::Cancel);
            }
            follow(&following, &sub, &id)
        })
        .await
        .map_err(|e| WebuiError::Internal(e.to_string()))?
        .map_err(|e| WebuiError::Internal(e.to_string()))?;
        match record.state {
            JobState::Finished => outputs.extend(record.outputs),
            // Skipped: this batch gives no images; the next one runs.
            JobState::Cancelled if take_skip(&state.webui) => continue,
            // Interrupted: A1111 answers with the images made so far.
            JobState::Cancelled => break,
            other => {
                return Err(WebuiError::Failed(
                    record
                        .error
                        .unwrap_or_else(|| format!("sampling ended {other:?}")),
                ))
            }
        }
    }
    drop(running);

    let pngs = web::block(move || {
        outputs
            .iter()
            .map(std::fs::read)
            .collect::<std::io::Result<Vec<_>>>()
    })
    .await
    .map_err(|e| WebuiError::Internal(e.to_string()))?
    .map_err(|e| WebuiError::Internal(e.to_string()))?;
    let infotexts: Vec<String> = pngs
        .iter()
        .map(|png| {
            read_text_chunks(png)
                .ok()
                .and_then(|chunks| chunks.into_iter().find(|(k, _)| k == "parameters"))
                .map(|(_, text)| text)
                .unwrap_or_default()
        })
        .collect();
    let lora_hashes = infotexts
        .first()
        .and_then(|t| info::infotext_value(t, "Lora hashes"));
    let mut info = info::info(
        &plan,
        &Ran {
            model_name: &state.model_name,
            infotexts: &infotexts,
            job_timestamp: &timestamp,
            lora_hashes,
        },
    );
    if let Some(init) = &init {
        info["denoising_strength"] = json!(init.denoise);
    }
    let images: Vec<String> = if plan.send_images {
        pngs.iter()
            .map(|b| base64::engine::general_purpose::STANDARD.encode(b))
            .collect()
    } else {
        vec![]
    };
    let parameters =
        serde_json::to_value(&request).map_err(|e| WebuiError::Internal(e.to_string()))?;
    Ok(HttpResponse::Ok().json(json!({
        "images": images,
        "parameters": parameters,
        "info": info.to_string(),
    })))
}
