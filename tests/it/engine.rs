//! The engine on the built-in tiny model: jobs run from one queue, events are
//! numbered and stored, samples are served between training steps with the live
//! adapter, and a restart leaves a resumable, interrupted job.

use std::path::Path;
use std::time::{Duration, Instant};

use fluxlora::engine::bus::Received;
use fluxlora::engine::events::{Event, EventKind, JobState};
use fluxlora::engine::{Control, Engine, JobRequest, LoraChoice, SampleJob};
use fluxlora::sample::generate::SampleRequest;
use fluxlora::train::config::TrainConfig;
use fluxlora::train::events::TrainEvent;
use fluxlora::train::network::NetworkConfig;
use fluxlora::train::shapes;

use crate::support::{self, bundle};

/// An engine on the tiny model with its state and LoRA folders under `root`.
fn start(root: &Path) -> Engine {
    Engine::start(bundle(), &root.join("state"), root.join("loras")).unwrap()
}

fn train_config(data: &Path, steps: u64) -> TrainConfig {
    TrainConfig {
        output_name: "job".into(),
        network: NetworkConfig {
            rank: 2,
            alpha: 2.0,
            ..NetworkConfig::default()
        },
        learning_rate: 1e-3,
        save_every_n_steps: Some(2),
        ..support::train_config(data, steps)
    }
}

fn sample_job(seed: u64) -> SampleJob {
    SampleJob {
        request: SampleRequest {
            steps: Some(3),
            seed,
            ..SampleRequest::new("a red circle on a blue background")
        },
        loras: vec![],
    }
}

/// Waits until `id` reaches a terminal state (or `want`), failing after 120 s.
fn wait_for(engine: &Engine, id: &str, want: JobState) -> JobState {
    let start = Instant::now();
    loop {
        let state = engine.job(id).unwrap().state;
        if state == want || state.is_terminal() {
            return state;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "job {id} stuck in {state:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn train_then_sample_with_the_produced_lora_and_events_in_order() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    shapes::write_dataset(&data, 3, 64, 1).unwrap();
    let engine = start(tmp.path());
    let sub = engine.subscribe(None, 10_000, true);

    let train = engine
        .submit(JobRequest::Train(Box::new(train_config(&data, 4))))
        .unwrap();
    assert_eq!(
        wait_for(&engine, &train, JobState::Finished),
        JobState::Finished
    );
    let record = engine.job(&train).unwrap();
    let shared_lora = tmp.path().join("loras/job.safetensors");
    assert!(
        record.outputs.contains(&shared_lora),
        "{:?}",
        record.outputs
    );

    let mut job = sample_job(1);
    job.loras.push(LoraChoice {
        path: Some(shared_lora.clone()),
        live_job: None,
        strength: 0.8,
    });
    let sample = engine.submit(JobRequest::Sample(job)).unwrap();
    assert_eq!(
        wait_for(&engine, &sample, JobState::Finished),
        JobState::Finished
    );
    let png = &engine.job(&sample).unwrap().outputs[0];
    assert!(image::open(png).is_ok());

    // The subscriber saw everything, numbered in order, previews included.
    let mut events: Vec<Event> = vec![];
    while let Received::Event(e) = sub.recv(Duration::from_millis(100)) {
        events.push(e);
    }
    assert!(events.windows(2).all(|w| w[0].seq < w[1].seq));
    let preview = events
        .iter()
        .find_map(|e| match &e.kind {
            EventKind::Preview { png, .. } if e.job == sample => Some(png.clone()),
            _ => None,
        })
        .expect("a preview while sampling");
    assert!(image::load_from_memory(&preview).is_ok());
    let train_kinds: Vec<String> = events
        .iter()
        .filter(|e| e.job == train)
        .map(|e| match &e.kind {
            EventKind::State { state } => format!("{state:?}"),
            EventKind::Train {
                event: TrainEvent::Caching { done, total },
            } => format!("caching {done}/{total}"),
            EventKind::Train {
                event: TrainEvent::Step(_),
            } => "step".into(),
            EventKind::Train {
                event: TrainEvent::Saved { .. },
            } => "saved".into(),
            EventKind::Train {
                event: TrainEvent::Started { .. },
            } => "started".into(),
            EventKind::Train {
                event: TrainEvent::Finished { .. },
            } => "finished".into(),
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(
        train_kinds,
        [
            "Queued",
            "Running",
            "caching 1/3",
            "caching 2/3",
            "caching 3/3",
            "started",
            "step",
            "step",
            "saved",
            "step",
            "step",
            "finished",
            "Finished"
        ]
    );
    // The same events were stored and can be replayed from any point.
    let stored: Vec<_> = engine
        .events_since(&train, 0)
        .unwrap()
        .iter()
        .map(Event::to_json)
        .collect();
    assert_eq!(stored.len(), train_kinds.len());
    let since = stored[4]["seq"].as_u64().unwrap();
    assert_eq!(
        engine.events_since(&train, since).unwrap().len(),
        train_kinds.len() - 5
    );

    // A second run of the same name does not replace the first one's LoRA.
    let first = std::fs::read(&shared_lora).unwrap();
    let again = engine
        .submit(JobRequest::Train(Box::new(train_config(&data, 2))))
        .unwrap();
    assert_eq!(
        wait_for(&engine, &again, JobState::Finished),
        JobState::Finished
    );
    let second = tmp.path().join("loras/job_2.safetensors");
    assert!(engine.job(&again).unwrap().outputs.contains(&second));
    assert_eq!(std::fs::read(&shared_lora).unwrap(), first);
    engine.shutdown();
}

#[test]
fn samples_run_between_training_steps_with_the_live_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    shapes::write_dataset(&data, 3, 64, 2).unwrap();
    let engine = start(tmp.path());
    let sub = engine.subscribe(None, 10_000, true);
    let mut cfg = train_config(&data, 10_000);
    cfg.save_every_n_steps = None;
    let train = engine.submit(JobRequest::Train(Box::new(cfg))).unwrap();
    // Wait for a few steps, then ask for a sample with the adapter being trained.
    let mut steps = 0;
    while steps < 3 {
        if let Received::Event(Event {
            kind: EventKind::Train {
                event: TrainEvent::Step(_),
            },
            ..
        }) = sub.recv(Duration::from_secs(60))
        {
            steps += 1;
        }
    }
    let mut job = sample_job(3);
    job.loras.push(LoraChoice {
        path: None,
        live_job: Some(train.clone()),
        strength: 1.0,
    });
    let sample = engine.submit(JobRequest::Sample(job)).unwrap();
    assert_eq!(
        wait_for(&engine, &sample, JobState::Finished),
        JobState::Finished
    );
    assert_eq!(
        engine.job(&train).unwrap().state,
        JobState::Running,
        "training goes on"
    );

    // Pause and resume between steps, then cancel: a resumable state is saved.
    engine.control(&train, Control::Pause).unwrap();
    assert_eq!(
        wait_for(&engine, &train, JobState::Paused),
        JobState::Paused
    );
    engine.control(&train, Control::Resume).unwrap();
    assert_eq!(
        wait_for(&engine, &train, JobState::Running),
        JobState::Running
    );
    engine.control(&train, Control::Cancel).unwrap();
    assert_eq!(
        wait_for(&engine, &train, JobState::Cancelled),
        JobState::Cancelled
    );
    assert!(fluxlora::train::checkpoint::latest_state(&engine.job_dir(&train), "job").is_some());
    // The pause is reported as the trainer's own events too, at one step.
    let steps: Vec<(bool, u64)> = engine
        .events_since(&train, 0)
        .unwrap()
        .into_iter()
        .filter_map(|e| match e.kind {
            EventKind::Train {
                event: TrainEvent::Paused { step },
            } => Some((true, step)),
            EventKind::Train {
                event: TrainEvent::Resumed { step },
            } => Some((false, step)),
            _ => None,
        })
        .collect();
    assert!(
        matches!(steps[..], [(true, a), (false, b)] if a == b),
        "{steps:?}"
    );
    let err = engine
        .control(&train, Control::Pause)
        .unwrap_err()
        .to_string();
    assert!(err.contains("Cancelled"), "{err}");
    engine.shutdown();
}

#[test]
fn a_restart_marks_the_running_job_interrupted_and_resume_completes_it() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    shapes::write_dataset(&data, 3, 64, 3).unwrap();
    let state_dir = tmp.path().join("state");
    let model = bundle();
    let engine = Engine::start(model.clone(), &state_dir, tmp.path().join("loras")).unwrap();
    let sub = engine.subscribe(None, 10_000, true);
    let train = engine
        .submit(JobRequest::Train(Box::new(train_config(&data, 8))))
        .unwrap();
    // Stop the engine after the first save, as a stopping daemon would (the
    // killed-process case is in the `server` tests).
    loop {
        if let Received::Event(Event {
            kind: EventKind::Train {
                event: TrainEvent::Saved { .. },
            },
            ..
        }) = sub.recv(Duration::from_secs(60))
        {
            break;
        }
    }
    engine.shutdown();
    let newest = engine.last_seq();
    drop(engine);

    let engine = Engine::start(model, &state_dir, tmp.path().join("loras")).unwrap();
    assert_eq!(engine.job(&train).unwrap().state, JobState::Interrupted);
    // Numbering goes on after the newest event of the last run, previews included.
    assert_eq!(engine.last_seq(), newest);
    engine.control(&train, Control::Resume).unwrap();
    assert!(
        engine.events_since(&train, newest).unwrap()[0].to_json()["seq"].as_u64() > Some(newest)
    );
    assert_eq!(
        wait_for(&engine, &train, JobState::Finished),
        JobState::Finished
    );
    let started: Vec<_> = engine
        .events_since(&train, 0)
        .unwrap()
        .iter()
        .map(Event::to_json)
        .filter(|e| e["type"] == "started")
        .collect();
    assert_eq!(started.len(), 2);
    // A clean stop saves where it stopped: no step is trained twice.
    let steps_before: Vec<u64> = engine
        .events_since(&train, 0)
        .unwrap()
        .iter()
        .map(Event::to_json)
        .take_while(|e| e["seq"].as_u64() < started[1]["seq"].as_u64())
        .filter(|e| e["type"] == "step")
        .map(|e| e["data"]["step"].as_u64().unwrap())
        .collect();
    assert_eq!(
        started[1]["data"]["resumed_from_step"].as_u64(),
        steps_before.last().copied()
    );
    assert!(started[1]["data"]["resumed_from_step"].as_u64().unwrap() >= 2);
    // No temporary files anywhere.
    let leftovers = support::temp_files(&state_dir);
    assert!(leftovers.is_empty(), "{leftovers:?}");
    engine.shutdown();
}

#[test]
fn wait_returns_when_a_job_ends_and_reports_a_stopped_engine() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    shapes::write_dataset(&data, 2, 64, 1).unwrap();
    let engine = start(tmp.path());
    let id = engine.submit(JobRequest::Sample(sample_job(7))).unwrap();
    let done = engine.wait(&id).unwrap();
    assert_eq!(done.state, JobState::Finished);
    assert_eq!(done.outputs.len(), 1);
    assert!(engine.wait("no-such-job").is_err());

    // A job that can no longer end: the engine stops while it trains.
    let train = engine
        .submit(JobRequest::Train(Box::new(train_config(&data, 100_000))))
        .unwrap();
    assert_eq!(
        wait_for(&engine, &train, JobState::Running),
        JobState::Running
    );
    engine.shutdown();
    assert!(matches!(
        engine.wait(&train),
        Err(fluxlora::engine::EngineError::Stopped)
    ));
}

#[test]
fn a_running_sample_can_be_cancelled_but_not_paused() {
    let tmp = tempfile::tempdir().unwrap();
    let engine = start(tmp.path());
    let sub = engine.subscribe(None, 10_000, false);
    let mut long = sample_job(3);
    long.request.steps = Some(1000);
    let id = engine.submit(JobRequest::Sample(long)).unwrap();
    loop {
        if let Received::Event(Event {
            kind: EventKind::SampleStep { .. },
            ..
        }) = sub.recv(Duration::from_secs(60))
        {
            break;
        }
    }
    assert!(matches!(
        engine.control(&id, Control::Pause),
        Err(fluxlora::engine::EngineError::BadState { .. })
    ));
    // Jobs queued behind it: a pause and a cancel sent right after their submits
    // are seen before they could start.
    let held = engine.submit(JobRequest::Sample(sample_job(4))).unwrap();
    engine.control(&held, Control::Pause).unwrap();
    let dropped = engine.submit(JobRequest::Sample(sample_job(5))).unwrap();
    engine.control(&dropped, Control::Cancel).unwrap();
    engine.control(&id, Control::Cancel).unwrap();
    assert_eq!(engine.wait(&id).unwrap().state, JobState::Cancelled);
    assert_eq!(engine.wait(&dropped).unwrap().state, JobState::Cancelled);
    while engine.job(&held).unwrap().state != JobState::Paused {
        let _ = sub.recv(Duration::from_secs(60));
    }
    engine.control(&held, Control::Resume).unwrap();
    assert_eq!(engine.wait(&held).unwrap().state, JobState::Finished);
    let kinds: Vec<String> = engine
        .events_since(&dropped, 0)
        .unwrap()
        .iter()
        .map(Event::to_json)
        .map(|e| format!("{}", e["data"]["state"]))
        .collect();
    assert_eq!(kinds, ["\"queued\"", "\"cancelled\""], "it never ran");

    // A control after a job ended is refused and leaves its end state alone.
    assert!(engine.control(&held, Control::Pause).is_err());
    assert_eq!(engine.job(&held).unwrap().state, JobState::Finished);
}
