//! `GET /sdapi/v1/progress`, `POST /sdapi/v1/interrupt` and `/skip`: the
//! running generation as A1111 reports it (its `ProgressResponse` and
//! `shared.state` keys), from what the txt2img handler recorded of the batch
//! now sampling.
//! Interrupting cancels that batch and the ones after it; skipping cancels that
//! batch only, and the next one runs.
//!
//! The batch's step and its newest preview (`current_image`, unless
//! `skip_current_image`) are kept in the run by the txt2img handler as it
//! follows the job, so a poll reads no event log. With no
//! A1111 generation running, a training job that is running (or paused) is reported instead:
//! its steps as the sampling steps, its loss in `textinfo`, its newest sample
//! preview as the current image.

use std::time::Instant;

use actix_web::http::Method;
use actix_web::{web, HttpResponse};
use base64::Engine as _;
use serde::Deserialize;
use serde_json::{json, Value};

use super::state::Run;
use crate::engine::events::{EventKind, JobState};
use crate::engine::store::JobKind;
use crate::engine::Control;
use crate::server::route_table::RouteTable;
use crate::server::state::AppState;
use crate::train::events::TrainEvent;

pub(super) fn routes(table: &mut RouteTable) {
    table
        .add(Method::GET, "/sdapi/v1/progress", progress)
        .add(Method::POST, "/sdapi/v1/interrupt", interrupt)
        .add(Method::POST, "/sdapi/v1/skip", skip);
}

/// `/progress`'s query (A1111's `ProgressRequest`).
#[derive(Debug, Deserialize)]
struct ProgressQuery {
    #[serde(default)]
    skip_current_image: bool,
}

/// What `/progress` reports, before it is put in A1111's shape.
#[derive(Debug, Default, PartialEq)]
struct Report {
    progress: f64,
    eta_relative: f64,
    skipped: bool,
    interrupted: bool,
    job: String,
    job_count: usize,
    job_no: usize,
    job_timestamp: String,
    sampling_step: u64,
    sampling_steps: u64,
    textinfo: Option<String>,
}

impl Report {
    fn idle() -> Self {
        Self {
            job_timestamp: "0".into(),
            ..Self::default()
        }
    }

    fn into_json(self, current_image: Option<String>) -> Value {
        json!({
            "progress": self.progress,
            "eta_relative": self.eta_relative,
            "state": {
                "skipped": self.skipped,
                "interrupted": self.interrupted,
                "stopping_generation": false,
                "job": self.job,
                "job_count": self.job_count,
                "job_timestamp": self.job_timestamp,
                "job_no": self.job_no,
                "sampling_step": self.sampling_step,
                "sampling_steps": self.sampling_steps,
            },
            "current_image": current_image,
            "textinfo": self.textinfo,
        })
    }
}

/// A generation through `/sdapi/v1`, at the step its current batch is at.
fn generation_report(run: &Run, now: Instant) -> Report {
    let (progress, eta_relative) = estimate(run, now);
    let (step, steps) = (run.step, run.steps);
    Report {
        progress,
        eta_relative,
        skipped: run.skipped,
        interrupted: run.interrupted,
        job: if run.job_count > 1 {
            format!("Batch {} out of {}", run.job_no + 1, run.job_count)
        } else {
            "scripts_txt2img".into()
        },
        job_count: run.job_count,
        job_no: run.job_no,
        job_timestamp: run.timestamp.clone(),
        sampling_step: step as u64,
        sampling_steps: steps as u64,
        textinfo: (steps > 0).then(|| format!("Sampling step {step}/{steps}")),
    }
}

/// A1111's estimate: 0.01 + the batches done + this batch's share of steps
/// (capped at 1), and the seconds left at the pace so far.
fn estimate(run: &Run, now: Instant) -> (f64, f64) {
    let count = run.job_count.max(1) as f64;
    let mut fraction = 0.01 + run.job_no as f64 / count;
    if run.steps > 0 {
        fraction += run.step as f64 / run.steps as f64 / count;
    }
    let elapsed = now.duration_since(run.started).as_secs_f64();
    let eta = elapsed / fraction - elapsed;
    (fraction.min(1.0), eta)
}

/// A training job's progress from its events (oldest first), and the newest
/// sample preview it wrote.
fn training_report(
    name: &str,
    created: f64,
    events: &[crate::engine::events::Event],
) -> (Report, Option<std::path::PathBuf>) {
    let mut report = Report {
        job: format!("Training {name}"),
        job_count: 1,
        job_timestamp: super::info::timestamp(created),
        textinfo: Some("Starting".into()),
        ..Report::default()
    };
    let mut preview = None;
    for event in events {
        let EventKind::Train { event } = &event.kind else {
            continue;
        };
        match event {
            TrainEvent::Caching { done, total } => {
                report.textinfo = Some(format!("Caching latents and text {done}/{total}"));
            }
            TrainEvent::Step(s) => {
                report.sampling_step = s.step;
                report.sampling_steps = s.total_steps;
                report.progress = if s.total_steps > 0 {
                    (s.step as f64 / s.total_steps as f64).min(1.0)
                } else {
                    0.0
                };
                report.eta_relative = s.eta_s;
                report.textinfo = Some(format!(
                    "Training step {}/{}: loss {:.4}, lr {:.2e}, {:.2} it/s",
                    s.step, s.total_steps, s.loss_ema, s.lr, s.it_per_s
                ));
            }
            TrainEvent::Paused { step } => report.textinfo = Some(format!("Paused at step {step}")),
            TrainEvent::Sample { paths, .. } => preview = paths.first().cloned().or(preview),
            _ => {}
        }
    }
    (report, preview)
}

async fn progress(state: web::Data<AppState>, query: web::Query<ProgressQuery>) -> HttpResponse {
    let want_image = !query.skip_current_image;
    let run = state.webui.run().clone();
    if let Some(run) = run {
        let image = run
            .preview
            .as_deref()
            .filter(|_| want_image)
            .map(|png| base64::engine::general_purpose::STANDARD.encode(png));
        let report = generation_report(&run, Instant::now());
        return HttpResponse::Ok().json(report.into_json(image));
    }
    let training = state.engine.jobs().into_iter().find(|j| {
        j.kind == JobKind::Train && matches!(j.state, JobState::Running | JobState::Paused)
    });
    let Some(job) = training else {
        return HttpResponse::Ok().json(Report::idle().into_json(None));
    };
    let engine = state.engine.clone();
    // The event log and the preview file are file I/O: off the async thread.
    let answer = web::block(move || {
        let events = engine.events_since(&job.id, 0).unwrap_or_default();
        let name = job.request["output_name"]
            .as_str()
            .unwrap_or(job.id.as_str())
            .to_string();
        let (report, preview) = training_report(&name, job.created, &events);
        let image = preview
            .filter(|_| want_image)
            .and_then(|p| std::fs::read(p).ok())
            .map(|png| base64::engine::general_purpose::STANDARD.encode(png));
        report.into_json(image)
    })
    .await
    .unwrap_or_else(|_| Report::idle().into_json(None));
    HttpResponse::Ok().json(answer)
}

/// Marks the running generation with `mark` and cancels the batch now sampling.
async fn stop_batch(state: &AppState, mark: fn(&mut Run)) {
    let job = {
        let mut run = state.webui.run();
        run.as_mut().and_then(|r| {
            mark(r);
            r.job.clone()
        })
    };
    if let Some(id) = job {
        let engine = state.engine.clone();
        // Cancelling takes the engine's lock: off the async thread. A batch that
        // ended meanwhile has nothing to cancel.
        let _ = web::block(move || engine.control(&id, Control::Cancel)).await;
    }
}

async fn interrupt(state: web::Data<AppState>) -> HttpResponse {
    stop_batch(&state, |r| r.interrupted = true).await;
    HttpResponse::Ok().json(json!({}))
}

async fn skip(state: web::Data<AppState>) -> HttpResponse {
    stop_batch(&state, |r| r.skipped = true).await;
    HttpResponse::Ok().json(json!({}))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::events::Event;
    use crate::train::events::StepStats;
    use std::time::Duration;

    #[test]
    fn progress_counts_batches_and_steps_as_a1111_does() {
        let started = Instant::now();
        let run = Run {
            job: Some("j".into()),
            job_no: 1,
            started,
            step: 5,
            steps: 10,
            ..Run::new(2, "20240101000000".into())
        };
        let (fraction, eta) = estimate(&run, started + Duration::from_secs(3));
        assert!((fraction - 0.76).abs() < 1e-9, "{fraction}");
        assert!((eta - (3.0 / 0.76 - 3.0)).abs() < 1e-9);
        let s = generation_report(&run, started).into_json(None);
        assert_eq!(s["state"]["job"], "Batch 2 out of 2");
        assert_eq!(s["state"]["sampling_step"], 5);
        assert_eq!(s["textinfo"], "Sampling step 5/10");
        let idle = Report::idle().into_json(None);
        assert_eq!(idle["state"]["job_count"], 0);
        assert_eq!(idle["state"]["job_timestamp"], "0");
        assert_eq!(idle["textinfo"], Value::Null);
    }

    fn train_event(seq: u64, event: TrainEvent) -> Event {
        Event {
            seq,
            job: "t".into(),
            time: 0.0,
            kind: EventKind::Train { event },
        }
    }

    #[test]
    fn a_training_job_reports_its_steps_loss_and_newest_preview() {
        let step = |step: u64, loss: f64| {
            TrainEvent::Step(StepStats {
                step,
                total_steps: 40,
                epoch: 0,
                loss,
                loss_ema: loss,
                lr: 1e-4,
                grad_norm: None,
                it_per_s: 2.0,
                eta_s: (40 - step) as f64 / 2.0,
                peak_memory_bytes: None,
            })
        };
        let events = vec![
            train_event(1, TrainEvent::Caching { done: 2, total: 2 }),
            train_event(
                2,
                TrainEvent::Sample {
                    step: 0,
                    paths: vec!["a.png".into()],
                },
            ),
            train_event(3, step(10, 0.5)),
            train_event(
                4,
                TrainEvent::Sample {
                    step: 10,
                    paths: vec!["b.png".into(), "c.png".into()],
                },
            ),
            train_event(5, step(11, 0.25)),
            train_event(6, TrainEvent::Paused { step: 11 }),
        ];
        let (report, preview) = training_report("style", 0.0, &events);
        assert_eq!(preview.as_deref(), Some(std::path::Path::new("b.png")));
        assert_eq!((report.sampling_step, report.sampling_steps), (11, 40));
        assert!((report.progress - 11.0 / 40.0).abs() < 1e-12);
        assert_eq!(report.eta_relative, 14.5);
        assert_eq!(report.job, "Training style");
        assert_eq!(report.textinfo.as_deref(), Some("Paused at step 11"));
        let (running, _) = training_report("style", 0.0, &events[..5]);
        let text = running.textinfo.unwrap();
        assert!(
            text.starts_with("Training step 11/40: loss 0.2500"),
            "{text}"
        );
        let (early, none) = training_report("style", 0.0, &events[..1]);
        assert_eq!(none, None);
        assert_eq!(
            early.textinfo.as_deref(),
            Some("Caching latents and text 2/2")
        );
    }
}
