//! `GET /sdapi/v1/progress` and `POST /sdapi/v1/interrupt`: the running
//! generation as A1111 reports it (its `ProgressResponse` and `shared.state`
//! keys), from the engine's events of the batch now sampling; interrupting
//! cancels that batch and the ones after it.
//!
//! `current_image` is always null: previews are not kept where this route could
//! read them (`/v1/ws` streams them).

use std::time::Instant;

use actix_web::http::Method;
use actix_web::{web, HttpResponse};
use serde_json::{json, Value};

use super::state::Run;
use crate::engine::events::EventKind;
use crate::engine::Control;
use crate::server::route_table::RouteTable;
use crate::server::state::AppState;

pub(super) fn routes(table: &mut RouteTable) {
    table.add(Method::GET, "/sdapi/v1/progress", progress).add(
        Method::POST,
        "/sdapi/v1/interrupt",
        interrupt,
    );
}

/// A1111's `shared.state.dict()`.
fn state_dict(run: Option<&Run>, step: usize, steps: usize) -> Value {
    let job = match run {
        None => String::new(),
        Some(r) if r.job_count > 1 => format!("Batch {} out of {}", r.job_no + 1, r.job_count),
        Some(_) => "scripts_txt2img".into(),
    };
    json!({
        "skipped": false,
        "interrupted": run.is_some_and(|r| r.interrupted),
        "stopping_generation": false,
        "job": job,
        "job_count": run.map_or(0, |r| r.job_count),
        "job_timestamp": run.map_or("0".to_string(), |r| r.timestamp.clone()),
        "job_no": run.map_or(0, |r| r.job_no),
        "sampling_step": step,
        "sampling_steps": steps,
    })
}

async fn progress(state: web::Data<AppState>) -> HttpResponse {
    let run = state.webui.run().clone();
    let Some(run) = run else {
        return HttpResponse::Ok().json(json!({
            "progress": 0.0,
            "eta_relative": 0.0,
            "state": state_dict(None, 0, 0),
            "current_image": null,
            "textinfo": null,
        }));
    };
    let (step, steps) = run
        .job
        .as_deref()
        .and_then(|id| state.engine.events_since(id, 0).ok())
        .and_then(|events| {
            events.iter().rev().find_map(|e| match e.kind {
                EventKind::SampleStep { step, total } => Some((step, total)),
                _ => None,
            })
        })
        .unwrap_or((0, 0));
    let (fraction, eta) = estimate(&run, step, steps, Instant::now());
    HttpResponse::Ok().json(json!({
        "progress": fraction,
        "eta_relative": eta,
        "state": state_dict(Some(&run), step, steps),
        "current_image": null,
        "textinfo": null,
    }))
}

/// A1111's estimate: 0.01 + the batches done + this batch's share of steps
/// (capped at 1), and the seconds left at the pace so far.
fn estimate(run: &Run, step: usize, steps: usize, now: Instant) -> (f64, f64) {
    let count = run.job_count.max(1) as f64;
    let mut fraction = 0.01 + run.job_no as f64 / count;
    if steps > 0 {
        fraction += step as f64 / steps as f64 / count;
    }
    let elapsed = now.duration_since(run.started).as_secs_f64();
    let eta = elapsed / fraction - elapsed;
    (fraction.min(1.0), eta)
}

async fn interrupt(state: web::Data<AppState>) -> HttpResponse {
    let job = {
        let mut run = state.webui.run();
        run.as_mut().and_then(|r| {
            r.interrupted = true;
            r.job.clone()
        })
    };
    if let Some(id) = job {
        let engine = state.engine.clone();
        // Cancelling takes the engine's lock: off the async thread. A batch that
        // ended meanwhile has nothing to cancel.
        let _ = web::block(move || engine.control(&id, Control::Cancel)).await;
    }
    HttpResponse::Ok().json(json!({}))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn progress_counts_batches_and_steps_as_a1111_does() {
        let started = Instant::now();
        let run = Run {
            job: Some("j".into()),
            job_no: 1,
            job_count: 2,
            started,
            timestamp: "20240101000000".into(),
            interrupted: false,
        };
        let (fraction, eta) = estimate(&run, 5, 10, started + Duration::from_secs(3));
        assert!((fraction - 0.76).abs() < 1e-9, "{fraction}");
        assert!((eta - (3.0 / 0.76 - 3.0)).abs() < 1e-9);
        let s = state_dict(Some(&run), 5, 10);
        assert_eq!(s["job"], "Batch 2 out of 2");
        assert_eq!(s["sampling_step"], 5);
        assert_eq!(state_dict(None, 0, 0)["job_count"], 0);
    }
}
