//! Faults against the real daemon process (`fluxlora serve`, restarted on the
//! same data dir after each): one training job SIGKILLed at seeded points —
//! while caching, in the middle of a checkpoint write, inside an inline sample
//! preview, inside a sampling job served between its steps, at random steps —
//! and resumed after every restart, ending with exactly the adapter an
//! uninterrupted run trains; then saves that fail on a full disk
//! (`RLIMIT_FSIZE`) and on an unwritable output folder, with the daemon still
//! up and the last save resumable.
//!
//! A kill inside a checkpoint write is made deterministic by the daemon's one
//! fault-injection point (`FLUXLORA_FAULT_STALL_WRITE`, see `atomic_file`): the
//! chosen write stalls half-way and the test kills the process then. The other
//! points are found from the event stream, and each is checked afterwards in
//! `events.jsonl` to have landed where it was meant to.
//!
//! `FLUXLORA_FAULT_SEED` picks other points and `FLUXLORA_FAULT_KILLS`
//! (default 6) kills more often, e.g.
//! `FLUXLORA_FAULT_KILLS=30 cargo test --test it faults:: -- --nocapture`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::Device;
use fluxlora::train::checkpoint::latest_state;
use serde_json::{json, Value};

use crate::support;
use crate::support::app::{events_until, next_frame, App, Frame, Ws};
use crate::support::daemon::Daemon;

/// Steps between saves (and between the states a run resumes from).
const SAVE_EVERY: u64 = 4;
/// Steps between the run's preview images.
const PREVIEW_EVERY: u64 = 8;
/// Images in the dataset (each one cached before the first step).
const IMAGES: usize = 12;
/// The output name of the runs.
const NAME: &str = "crash";
/// The file names the stalled write is chosen from: the step LoRA and the
/// three files of a state folder.
const SAVE_FILES: [&str; 4] = [
    "-step",
    "weights.safetensors",
    "optimizer.safetensors",
    "state.json",
];

/// A small seeded generator for the kill points (splitmix64).
struct Points(u64);

impl Points {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi`.
    fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Where a session is killed.
#[derive(Clone, Copy, Debug)]
enum Kill {
    /// Once the `n`-th image is cached, with more to come.
    Caching(usize),
    /// While the write of the `nth` save file of this session named like
    /// `part` stalls half-way (the fault-injection point).
    InWrite { part: &'static str, nth: u64 },
    /// Right after step `s`, while its preview image is drawn.
    Preview(u64),
    /// During a sampling job with the live adapter, queued after step `s` and
    /// served between the steps.
    ServedSample(u64),
    /// Right after step `s`.
    Step(u64),
}

/// What each kill is, in order: caching first (later sessions find the disk
/// cache warm), then each other kind once in a seeded order, then seeded picks.
fn plan(kills: u64, points: &mut Points) -> Vec<&'static str> {
    let mut kinds = vec!["in-write", "preview", "served-sample", "step"];
    for i in (1..kinds.len()).rev() {
        kinds.swap(i, points.between(0, i as u64) as usize);
    }
    let mut plan = vec!["caching"];
    plan.extend(kinds);
    let all = ["in-write", "preview", "served-sample", "step", "step"];
    while (plan.len() as u64) < kills {
        plan.push(all[points.between(0, all.len() as u64 - 1) as usize]);
    }
    plan.truncate(kills.max(1) as usize);
    plan
}

/// The kill of `kind` for a session that resumes from step `from`.
fn place(kind: &str, from: u64, points: &mut Points) -> Kill {
    match kind {
        "caching" => Kill::Caching(points.between(1, IMAGES as u64 / 2) as usize),
        "in-write" => Kill::InWrite {
            part: SAVE_FILES[points.between(0, SAVE_FILES.len() as u64 - 1) as usize],
            nth: points.between(1, 2),
        },
        "preview" => Kill::Preview((from / PREVIEW_EVERY + 1) * PREVIEW_EVERY),
        "served-sample" => Kill::ServedSample(from + points.between(1, SAVE_EVERY)),
        _ => Kill::Step(from + points.between(1, 2 * SAVE_EVERY)),
    }
}

fn train_body(data: &Path, cache: &Path, steps: u64) -> Value {
    json!({
        "output_name": NAME,
        "max_train_steps": steps,
        "save_every_n_steps": SAVE_EVERY,
        "sample_every_n_steps": PREVIEW_EVERY,
        "sample_prompts": ["a red circle on a blue background --w 32 --h 32 --s 60"],
        "learning_rate": 0.002,
        "save_precision": "f32",
        "seed": 11,
        "cache_dir": cache,
        "dataset": {"folders": [data], "resolution": 32, "enable_bucket": false},
        "network": {"rank": 2, "alpha": 2.0}
    })
}

/// A job's stored events, read from its `events.jsonl` (a line torn by a kill
/// is counted and skipped, as the daemon skips it).
fn stored_events(job_dir: &Path) -> (Vec<Value>, usize) {
    let text = std::fs::read(job_dir.join("events.jsonl")).unwrap();
    let mut torn = 0;
    let events = text
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .filter_map(|l| {
            let parsed = serde_json::from_slice::<Value>(l).ok();
            torn += usize::from(parsed.is_none());
            parsed
        })
        .collect();
    (events, torn)
}

/// The step of a save's file or folder name (`crash-step000012…`).
fn step_of(name: &str) -> Option<u64> {
    let digits = name.strip_prefix(&format!("{NAME}-step"))?.get(..6)?;
    digits.parse().ok()
}

/// Every LoRA, state folder and cache file under `job_dir`, `cache` and `loras`
/// is complete and loads; temporary names are skipped. Returns the number checked.
fn assert_saves_complete(job_dir: &Path, cache: &Path, loras: &Path) -> usize {
    let mut checked = 0;
    for dir in [job_dir, loras] {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            if name.starts_with('.') {
                continue;
            }
            if name.ends_with(".safetensors") {
                if let Err(e) = fluxlora::model::lora_io::load(&path, &Device::Cpu) {
                    panic!("{}: {e}", path.display());
                }
                checked += 1;
            } else if name.ends_with("-state") {
                let state: Value =
                    serde_json::from_slice(&std::fs::read(path.join("state.json")).unwrap())
                        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                assert_eq!(
                    state["progress"]["step"].as_u64(),
                    step_of(&name),
                    "{}",
                    path.display()
                );
                for file in ["weights.safetensors", "optimizer.safetensors"] {
                    let bytes = std::fs::read(path.join(file)).unwrap();
                    if let Err(e) = safetensors::SafeTensors::deserialize(&bytes) {
                        panic!("{}/{file}: {e}", path.display());
                    }
                }
                checked += 1;
            }
        }
    }
    for kind in ["latents", "text"] {
        for entry in std::fs::read_dir(cache.join(kind)).into_iter().flatten() {
            let path = entry.unwrap().path();
            if path.file_name().unwrap().to_string_lossy().starts_with('.') {
                continue;
            }
            let bytes = std::fs::read(&path).unwrap();
            if let Err(e) = safetensors::SafeTensors::deserialize(&bytes) {
                panic!("{}: {e}", path.display());
            }
            checked += 1;
        }
    }
    checked
}

/// The step of the newest state folder of `NAME` in `job_dir` (0: none), as
/// the test sees the folder; the daemon's own choice must agree.
fn resume_point(job_dir: &Path) -> u64 {
    let newest = std::fs::read_dir(job_dir)
        .unwrap()
        .flatten()
        .filter(|e| e.path().is_dir())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.ends_with("-state").then(|| step_of(&name)).flatten()
        })
        .max()
        .unwrap_or(0);
    let daemons = latest_state(job_dir, NAME)
        .and_then(|s| step_of(&s.file_name()?.to_string_lossy()))
        .unwrap_or(0);
    assert_eq!(newest, daemons, "the state a resume picks");
    newest
}

/// The tensors of a safetensors file, by name: (dtype, shape, bytes).
fn tensors(path: &Path) -> BTreeMap<String, (String, Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    file.tensors()
        .into_iter()
        .map(|(name, view)| {
            let dtype = format!("{:?}", view.dtype());
            (name, (dtype, view.shape().to_vec(), view.data().to_vec()))
        })
        .collect()
}

/// The `hello` of a fresh `/v1/ws` connection: the newest event's seq.
fn hello_seq(ws: &mut Ws) -> u64 {
    match next_frame(ws) {
        Frame::Event(h) if h["type"] == "hello" => h["seq"].as_u64().unwrap(),
        _ => panic!("the first frame is the hello"),
    }
}

fn is_step(job: &str, step: u64) -> impl Fn(&Value) -> bool + '_ {
    move |e: &Value| e["job"] == job && e["type"] == "step" && e["data"]["step"] == step
}

/// Kills the daemon at `kill` of job `id`; returns what the kill point names in
/// the stored events (a served sampling job's id).
fn kill_at(daemon: Daemon, ws: &mut Ws, id: &str, kill: Kill) -> Option<String> {
    let mut sample = None;
    match kill {
        Kill::Caching(n) => {
            events_until(ws, |e| {
                e["job"] == id && e["type"] == "caching" && e["data"]["done"] == n
            });
        }
        Kill::Preview(s) | Kill::Step(s) => {
            events_until(ws, is_step(id, s));
        }
        Kill::ServedSample(s) => {
            events_until(ws, is_step(id, s));
            let body = json!({
                "request": {"prompt": "a blue square", "steps": 400, "width": 32, "height": 32},
                "loras": [{"live_job": id, "strength": 1.0}],
            });
            let sid = daemon.app.submit("/v1/jobs/sample", &body);
            events_until(ws, |e| {
                e["job"] == sid.as_str() && e["type"] == "sample_step"
            });
            sample = Some(sid);
        }
        Kill::InWrite { .. } => {
            let line = daemon.wait_for_log("fault injection");
            let file = line
                .split("file=")
                .nth(1)
                .and_then(|r| r.split_whitespace().next())
                .map(PathBuf::from)
                .unwrap_or_else(|| panic!("no file in `{line}`"));
            // Half of it is in the temporary file beside it, and it is not in place.
            let prefix = format!(".{}.", file.file_name().unwrap().to_string_lossy());
            let partial = std::fs::read_dir(file.parent().unwrap())
                .unwrap()
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
                .map(|e| e.metadata().unwrap().len())
                .collect::<Vec<_>>();
            assert!(partial.len() == 1 && partial[0] > 0, "{line}: {partial:?}");
        }
    }
    daemon.kill();
    sample
}

/// Checks in the stored events of the session after `since` that the kill
/// landed where it was meant to.
fn assert_landed(job_dir: &Path, since: u64, kill: Kill, sample: Option<&str>, from: u64) {
    let (events, _) = stored_events(job_dir);
    let session: Vec<&Value> = events
        .iter()
        .filter(|e| e["seq"].as_u64().unwrap() > since)
        .collect();
    let has = |kind: &str, step: u64| {
        session
            .iter()
            .any(|e| e["type"] == kind && e["data"]["step"] == step)
    };
    match kill {
        Kill::Caching(_) => assert!(
            !session.iter().any(|e| e["type"] == "started"),
            "the kill came after caching ended"
        ),
        Kill::Preview(s) => assert!(!has("sample", s), "the preview of step {s} was done"),
        Kill::InWrite { nth, .. } => {
            let save = from + nth * SAVE_EVERY;
            assert!(!has("saved", save), "the save of step {save} was done");
        }
        Kill::ServedSample(_) => {
            let sid = sample.unwrap();
            let (events, _) = stored_events(&job_dir.parent().unwrap().join(sid));
            assert!(
                !events.iter().any(|e| e["type"] == "images"),
                "the served sample finished"
            );
        }
        Kill::Step(_) => {}
    }
}

#[test]
fn a_job_killed_at_seeded_points_resumes_each_time_to_the_uninterrupted_adapter() {
    let seed = env_number("FLUXLORA_FAULT_SEED", 13);
    let kills = env_number("FLUXLORA_FAULT_KILLS", 6).max(5);
    let mut points = Points(seed);
    let steps = PREVIEW_EVERY * (kills + 2);
    let tmp = tempfile::tempdir().unwrap();
    let (data, cache, state) = (
        tmp.path().join("data"),
        tmp.path().join("cache"),
        tmp.path().join("state"),
    );
    fluxlora::train::shapes::write_dataset(&data, IMAGES, 256, 9).unwrap();
    let body = train_body(&data, &cache, steps);
    let loras = state.join("loras");

    let mut id = String::new();
    // The step each run that gets past caching starts from.
    let mut expected_resumes = vec![];
    for (i, kind) in plan(kills, &mut points).into_iter().enumerate() {
        let from = if id.is_empty() {
            0
        } else {
            resume_point(&state.join("jobs").join(&id))
        };
        let kill = place(kind, from, &mut points);
        let env: Vec<(&str, String)> = match kill {
            Kill::InWrite { part, nth } => {
                vec![("FLUXLORA_FAULT_STALL_WRITE", format!("{part}:{nth}"))]
            }
            _ => vec![],
        };
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let daemon = Daemon::start(&state, tmp.path(), &env, None);
        // Nothing a killed process left behind is taken for a real file.
        let leftovers = support::temp_files(&state);
        assert!(leftovers.is_empty(), "{leftovers:?}");
        let mut ws = daemon.app.ws("previews=false");
        let since = hello_seq(&mut ws);
        if id.is_empty() {
            id = daemon.app.submit("/v1/jobs/train", &body);
        } else {
            resume(&daemon.app, &id);
        }
        if !matches!(kill, Kill::Caching(_)) {
            expected_resumes.push(from);
        }
        let job_dir = state.join("jobs").join(&id);
        let sample = kill_at(daemon, &mut ws, &id, kill);
        assert_landed(&job_dir, since, kill, sample.as_deref(), from);
        let checked = assert_saves_complete(&job_dir, &cache, &loras);
        println!(
            "kill {}: {kill:?}, in a run from step {from}; {checked} saves and cache files complete; the next run resumes from step {}",
            i + 1,
            resume_point(&job_dir)
        );
    }

    // The last run ends the job, then an uninterrupted one runs with the same config.
    let daemon = Daemon::start(&state, tmp.path(), &[], None);
    assert!(support::temp_files(&state).is_empty());
    let from = resume_point(&state.join("jobs").join(&id));
    resume(&daemon.app, &id);
    expected_resumes.push(from);
    let job = daemon.app.wait_finished(&id);
    assert_eq!(job["state"], "finished", "{job}");
    let reference = daemon.app.submit("/v1/jobs/train", &body);
    assert_eq!(daemon.app.wait_finished(&reference)["state"], "finished");
    let job_dir = state.join("jobs").join(&id);
    assert_saves_complete(&job_dir, &cache, &loras);
    assert!(support::temp_files(&state).is_empty());

    // From events.jsonl: every step ran, each resume started at the newest
    // complete save, and no resume redid more than one save interval.
    let (events, torn) = stored_events(&job_dir);
    let seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    let resumes: Vec<u64> = events
        .iter()
        .filter(|e| e["type"] == "started")
        .map(|e| e["data"]["resumed_from_step"].as_u64().unwrap_or(0))
        .collect();
    // Each restart loses the steps after the newest complete save (at most one
    // save interval); every step lost is trained again, and nothing else is.
    let (mut newest, mut lost, mut retrained) = (0, vec![], 0);
    for e in &events {
        match e["type"].as_str() {
            Some("started") if newest > 0 => {
                lost.push(newest - e["data"]["resumed_from_step"].as_u64().unwrap_or(0))
            }
            Some("step") => {
                let step = e["data"]["step"].as_u64().unwrap();
                retrained += u64::from(step <= newest);
                newest = newest.max(step);
            }
            _ => {}
        }
    }
    assert_eq!(newest, steps);
    println!(
        "{kills} kills (seed {seed}), {} runs trained, {steps} steps; steps lost per restart {lost:?}, {retrained} steps trained twice in all; resumed from {resumes:?}; {torn} torn event lines",
        resumes.len()
    );
    assert!(lost.iter().all(|&n| n <= SAVE_EVERY), "{lost:?}");
    assert_eq!(resumes, expected_resumes, "resume points");

    // How long the kill windows were open: caching in the first run (a cold
    // cache), a preview in the uninterrupted one.
    let caching: Vec<f64> = events
        .iter()
        .take_while(|e| e["type"] != "started")
        .filter(|e| e["type"] == "caching")
        .map(|e| e["time"].as_f64().unwrap())
        .collect();
    let (reference_events, _) = stored_events(&state.join("jobs").join(&reference));
    let time_of = |kind: &str, step: u64| {
        reference_events
            .iter()
            .find(|e| e["type"] == kind && e["data"]["step"] == step)
            .map(|e| e["time"].as_f64().unwrap())
            .unwrap()
    };
    println!(
        "windows: caching {:.0} ms per image, a preview {:.0} ms",
        (caching[caching.len() - 1] - caching[0]) * 1000.0 / (caching.len() - 1).max(1) as f64,
        (time_of("sample", PREVIEW_EVERY) - time_of("step", PREVIEW_EVERY)) * 1000.0,
    );

    // Bit for bit the adapter of the run that was never interrupted.
    let final_lora = |job: &str| {
        state
            .join("jobs")
            .join(job)
            .join(format!("{NAME}.safetensors"))
    };
    let (a, b) = (tensors(&final_lora(&id)), tensors(&final_lora(&reference)));
    assert_eq!(a.len(), b.len());
    for ((ka, va), (kb, vb)) in a.iter().zip(&b) {
        assert_eq!(ka, kb);
        assert!(va == vb, "{ka} differs from the uninterrupted run's");
    }
}

/// Resumes an interrupted (or failed) job: 200.
fn resume(app: &App, id: &str) {
    let r = app.post(&format!("/v1/jobs/{id}/resume"), &json!({}));
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
}

/// Polls job `id` until it is in `state` (failing after 120 s).
fn wait_state(app: &App, id: &str, state: &str) {
    let start = std::time::Instant::now();
    while app.get(&format!("/v1/jobs/{id}")).json()["state"] != state {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(120),
            "job {id} never {state}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Whether a folder with mode 0555 refuses new files here (not as root).
fn chmod_stops_writes(scratch: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let probe = scratch.join("probe");
    std::fs::create_dir_all(&probe).unwrap();
    std::fs::set_permissions(&probe, std::fs::Permissions::from_mode(0o555)).unwrap();
    let refused = std::fs::File::create(probe.join("file")).is_err();
    std::fs::set_permissions(&probe, std::fs::Permissions::from_mode(0o755)).unwrap();
    refused
}

/// What stops the save of `step` in `job_dir`, and the error it causes.
enum Blocker {
    /// The job folder is mode 0555.
    ReadOnly,
    /// The state folder of the save is a regular file (as root, where mode 0555
    /// does not stop writes).
    FileInTheWay(PathBuf),
}

impl Blocker {
    fn block(job_dir: &Path, step: u64, chmod_works: bool) -> Self {
        use std::os::unix::fs::PermissionsExt;
        if chmod_works {
            std::fs::set_permissions(job_dir, std::fs::Permissions::from_mode(0o555)).unwrap();
            Self::ReadOnly
        } else {
            let path = job_dir.join(format!("{NAME}-step{step:06}-state"));
            std::fs::write(&path, b"not a folder").unwrap();
            Self::FileInTheWay(path)
        }
    }

    /// The OS error the failed save reports.
    fn error(&self) -> &'static str {
        match self {
            Self::ReadOnly => "Permission denied",
            Self::FileInTheWay(_) => "Not a directory",
        }
    }

    fn lift(self, job_dir: &Path) {
        use std::os::unix::fs::PermissionsExt;
        match self {
            Self::ReadOnly => {
                std::fs::set_permissions(job_dir, std::fs::Permissions::from_mode(0o755)).unwrap()
            }
            Self::FileInTheWay(path) => std::fs::remove_file(path).unwrap(),
        }
    }
}

#[test]
fn a_save_on_a_full_disk_or_an_unwritable_folder_fails_the_job_and_keeps_the_last_save() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, state) = (tmp.path().join("data"), tmp.path().join("state"));
    fluxlora::train::shapes::write_dataset(&data, 3, 64, 4).unwrap();
    // A bf16 LoRA (the default) beside an f32 state: the LoRA of a save is the
    // smaller file, so a limit between the two fails a save half-way. Enough
    // steps that a pause asked for after a save lands long before the end.
    let body = json!({
        "output_name": NAME,
        "max_train_steps": 200,
        "save_every_n_steps": SAVE_EVERY,
        "learning_rate": 0.002,
        "seed": 5,
        "dataset": {"folders": [&data], "resolution": 32, "enable_bucket": false},
        "network": {"rank": 2, "alpha": 2.0}
    });
    let loras = state.join("loras");
    let no_cache = tmp.path().join("no-cache");
    // Errors made with a backtrace at hand must still reach the job as one line.
    let env = [("RUST_BACKTRACE", "1")];

    // A first run saves and is killed.
    let daemon = Daemon::start(&state, tmp.path(), &env, None);
    let mut ws = daemon.app.ws("previews=false");
    let id = daemon.app.submit("/v1/jobs/train", &body);
    events_until(&mut ws, |e| e["type"] == "saved");
    daemon.kill();
    let job_dir = state.join("jobs").join(&id);
    let saved = resume_point(&job_dir);
    let size = |p: PathBuf| std::fs::metadata(p).unwrap().len();
    let lora = size(job_dir.join(format!("{NAME}-step{saved:06}.safetensors")));
    let weights = size(job_dir.join(format!("{NAME}-step{saved:06}-state/weights.safetensors")));
    assert!(lora < weights, "LoRA {lora} B, state weights {weights} B");
    let limit = (lora + weights) / 2;
    // The job's small files stay far below the limit, so only the save hits it.
    let log = size(job_dir.join("events.jsonl"));
    assert!(3 * log < limit, "events.jsonl {log} B, limit {limit} B");

    // On a "full disk" the next save fails half-way: the job fails, saying why.
    let mut daemon = Daemon::start(&state, tmp.path(), &env, Some(limit));
    resume(&daemon.app, &id);
    let job = daemon.app.wait_finished(&id);
    assert_eq!(job["state"], "failed", "{job}");
    let error = job["error"].as_str().unwrap();
    let failed_save = format!("step{:06}", saved + SAVE_EVERY);
    assert!(
        error.contains("File too large")
            && error.contains("weights.safetensors")
            && error.contains(&failed_save)
            && !error.contains('\n'),
        "{error}"
    );
    let (events, _) = stored_events(&job_dir);
    assert!(
        events
            .iter()
            .any(|e| e["type"] == "error" && e["data"]["message"] == error),
        "the error is in events.jsonl"
    );
    println!("full disk (RLIMIT_FSIZE {limit} B, the save after step {saved}'s): {error}");
    // The daemon goes on serving and sampling.
    assert!(daemon.is_running());
    let sample =
        json!({"request": {"prompt": "a red circle", "steps": 2, "width": 32, "height": 32}});
    let sid = daemon.app.submit("/v1/jobs/sample", &sample);
    assert_eq!(daemon.app.wait_finished(&sid)["state"], "finished");
    // The save before stays the one to resume from; nothing half-written is left.
    assert_eq!(resume_point(&job_dir), saved);
    assert_saves_complete(&job_dir, &no_cache, &loras);
    let leftovers = support::temp_files(&state);
    assert!(leftovers.is_empty(), "{leftovers:?}");
    daemon.kill();

    // With room again, the failed job resumes from that save ...
    let daemon = Daemon::start(&state, tmp.path(), &env, None);
    assert_eq!(
        daemon.app.get(&format!("/v1/jobs/{id}")).json()["state"],
        "failed"
    );
    let mut ws = daemon.app.ws("previews=false");
    resume(&daemon.app, &id);
    events_until(&mut ws, |e| e["type"] == "saved");
    // ... and, paused after a save, finds its output folder unwritable at the next.
    let r = daemon.app.post(&format!("/v1/jobs/{id}/pause"), &json!({}));
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    wait_state(&daemon.app, &id, "paused");
    let paused: Vec<u64> = stored_events(&job_dir)
        .0
        .iter()
        .filter(|e| e["type"] == "paused")
        .map(|e| e["data"]["step"].as_u64().unwrap())
        .collect();
    let [paused] = paused[..] else {
        panic!("one pause: {paused:?}")
    };
    let (kept, blocked) = (
        paused / SAVE_EVERY * SAVE_EVERY,
        (paused / SAVE_EVERY + 1) * SAVE_EVERY,
    );
    let chmod_works = chmod_stops_writes(tmp.path());
    if !chmod_works {
        println!("running as root, where mode 0555 does not stop writes: the save's state folder is a regular file instead");
    }
    let blocker = Blocker::block(&job_dir, blocked, chmod_works);
    resume(&daemon.app, &id);
    let job = daemon.app.wait_finished(&id);
    assert_eq!(job["state"], "failed", "{job}");
    let error = job["error"].as_str().unwrap();
    assert!(
        error.contains(blocker.error())
            && error.contains(&format!("step{blocked:06}"))
            && !error.contains('\n'),
        "{error}"
    );
    println!("unwritable output folder (paused at step {paused}): {error}");
    assert_eq!(daemon.app.get("/v1/system").status, 200);
    assert_eq!(resume_point(&job_dir), kept);
    blocker.lift(&job_dir);
    assert_saves_complete(&job_dir, &no_cache, &loras);
    assert!(support::temp_files(&state).is_empty());
    resume(&daemon.app, &id);
    assert_eq!(daemon.app.wait_finished(&id)["state"], "finished");
    let resumes: Vec<Value> = stored_events(&job_dir)
        .0
        .into_iter()
        .filter(|e| e["type"] == "started")
        .map(|e| e["data"]["resumed_from_step"].clone())
        .collect();
    assert_eq!(
        resumes,
        [json!(null), json!(saved), json!(saved), json!(kept)]
    );
    assert_saves_complete(&job_dir, &no_cache, &loras);
    let lora = job_dir.join(format!("{NAME}.safetensors"));
    assert!(fluxlora::model::lora_io::load(&lora, &Device::Cpu).is_ok());
}
