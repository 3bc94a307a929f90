//! Load on the real server while it trains (a ComfyUI prompt, so both
//! WebSocket dialects carry its progress): 200 WebSocket clients spread over
//! `/v1/ws` and ComfyUI's `/ws`, a quarter of them never reading, and a burst
//! of 2,000 status requests over the three dialects. Asserts that every
//! request is answered, that nothing is lost from the event log (each reading
//! client sees contiguous sequence numbers, and so does the replay), that the
//! never-reading clients' queues stay bounded while training goes on past
//! them, and prints the figures: status latency p50/p99 against an idle
//! server, and the training step rate idle and under load (no timing is
//! asserted).
//!
//! `FLUXLORA_LOAD_CLIENTS` and `FLUXLORA_LOAD_REQUESTS` size a bigger run.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde_json::{json, Value};
use tungstenite::Message;

use crate::support::app::{is_end_of, next_frame, silent_ws_client, spawn_app_on, App, Frame, Ws};

/// The events a never-reading `/v1/ws` client asks the server to hold
/// (`queue=`): small, so it backs up within the run.
const SILENT_QUEUE: usize = 32;
/// Concurrent connections of the status burst.
const BURST_THREADS: usize = 32;

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Raises this process's open-file limit to its hard limit (each client is a
/// socket here and one in the server).
fn raise_fd_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain calls on a local struct.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        limit.rlim_cur = limit.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
    }
    limit.rlim_cur as u64
}

/// A ComfyUI graph that trains `steps` steps on the demo set, without saves or
/// previews (every event it causes is stored).
fn train_graph(name: &str, steps: u64) -> Value {
    json!({
        "1": {"class_type": "FluxLoraDataset", "inputs": {
            "source": "demo", "folder": "", "trigger_word": "zorbly",
            "caption_template": "a photo of [trigger]", "num_repeats": 1,
            "resolution": 64, "enable_bucket": false}},
        "2": {"class_type": "FluxLoraTrainingOptions", "inputs": {
            "optimizer": "adamw", "weight_decay": -1.0, "max_grad_norm": 1.0,
            "gradient_accumulation_steps": 1, "lr_scheduler": "constant",
            "lr_warmup_steps": 0, "mixed_precision": "model",
            "gradient_checkpointing": false, "cache_dir": "",
            "timestep_sampling": "sigmoid", "noise_offset": 0.0,
            "shuffle_caption": false, "keep_tokens": 0, "caption_dropout_rate": 0.0,
            "network_targets": "blocks", "train_blocks": "all", "network_dropout": 0.0,
            "save_every_n_steps": 0, "sample_every_n_steps": 0}},
        "3": {"class_type": "FluxLoraTrain", "inputs": {
            "dataset": ["1", 0], "options": ["2", 0], "output_name": name,
            "max_train_steps": steps, "network_dim": 2, "network_alpha": 2.0,
            "learning_rate": 0.002, "train_batch_size": 1, "seed": 42,
            "sample_prompt": ""}}
    })
}

/// Queues `graph` without a client id (its progress goes to every `/ws`
/// socket) and returns the id of the training job it starts.
fn start_training(app: &App, graph: &Value) -> String {
    let before = train_jobs(app);
    let r = app.post("/prompt", &json!({"prompt": graph}));
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let start = Instant::now();
    loop {
        if let Some(id) = train_jobs(app).into_iter().find(|j| !before.contains(j)) {
            return id;
        }
        assert!(start.elapsed() < Duration::from_secs(120), "no job started");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn train_jobs(app: &App) -> Vec<String> {
    app.get("/v1/jobs?kind=train")
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap().to_string())
        .collect()
}

/// The (time, step) of a job's stored step events.
fn step_times(app: &App, job: &str) -> Vec<(f64, u64)> {
    app.get(&format!("/v1/jobs/{job}/events?since=0"))
        .json()
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "step")
        .map(|e| {
            (
                e["time"].as_f64().unwrap(),
                e["data"]["step"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// Steps per second between the first and last of `times`.
fn rate(times: &[(f64, u64)]) -> f64 {
    match (times.first(), times.last()) {
        (Some(a), Some(b)) if b.0 > a.0 => (b.1 - a.1) as f64 / (b.0 - a.0),
        _ => f64::NAN,
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// `n` status requests over `threads` connections at a time, cycling through
/// `paths`; every answer must be 200. Returns the sorted latencies.
fn burst(app: &Arc<App>, paths: &[String], n: usize, threads: usize) -> Vec<Duration> {
    let next = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let (app, next, paths) = (app.clone(), next.clone(), paths.to_vec());
            std::thread::spawn(move || {
                let mut latencies = vec![];
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= n {
                        return latencies;
                    }
                    let path = &paths[i % paths.len()];
                    let start = Instant::now();
                    let r = app.get(path);
                    latencies.push(start.elapsed());
                    assert_eq!(
                        r.status,
                        200,
                        "{path}: {}",
                        String::from_utf8_lossy(&r.body)
                    );
                }
            })
        })
        .collect();
    let mut all: Vec<Duration> = workers
        .into_iter()
        .flat_map(|w| w.join().unwrap())
        .collect();
    all.sort();
    all
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

/// The seqs a reading `/v1/ws` client receives: its hello's, then every text
/// event's until the end of `job`.
fn read_native(mut ws: Ws, job: String) -> (u64, Vec<u64>) {
    let hello = match next_frame(&mut ws) {
        Frame::Event(h) => h["seq"].as_u64().unwrap(),
        Frame::Preview(_) => panic!("the hello comes first"),
    };
    let end = is_end_of(&job);
    let mut seqs = vec![];
    loop {
        if let Frame::Event(e) = next_frame(&mut ws) {
            seqs.push(e["seq"].as_u64().unwrap());
            if end(&e) {
                return (hello, seqs);
            }
        }
    }
}

/// The text messages a reading `/ws` client receives until the prompt is
/// interrupted.
fn read_comfy(mut ws: Ws) -> usize {
    let mut n = 0;
    loop {
        match ws.read().expect("a message") {
            Message::Text(t) => {
                n += 1;
                let m: Value = serde_json::from_str(t.as_str()).unwrap();
                if m["type"] == "execution_interrupted" {
                    return n;
                }
            }
            Message::Close(_) => panic!("closed before the end"),
            _ => {}
        }
    }
}

#[test]
fn two_hundred_websocket_clients_and_a_status_burst_lose_no_event_and_do_not_stall_training() {
    let clients = env_number("FLUXLORA_LOAD_CLIENTS", 200);
    let requests = env_number("FLUXLORA_LOAD_REQUESTS", 2000);
    let fds = raise_fd_limit();
    let tmp = tempfile::tempdir().unwrap();
    // Small kernel send buffers on the server's connections, so a client that
    // does not read backs up after kilobytes rather than megabytes.
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_send_buffer_size(8192).unwrap();
    socket
        .bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    socket.listen(1024).unwrap();
    let app = Arc::new(spawn_app_on(
        socket.into(),
        &tmp.path().join("state"),
        vec![tmp.path().to_path_buf()],
        None,
    ));
    let status_paths = |job: &str| -> Vec<String> {
        [
            format!("/v1/jobs/{job}"),
            format!("/v1/jobs/{job}"),
            "/v1/jobs?state=running".into(),
            "/v1/system".into(),
            "/queue".into(),
            "/sdapi/v1/progress".into(),
        ]
        .to_vec()
    };

    // Idle: the step rate alone, then status latency with nothing running.
    let idle_job = start_training(&app, &train_graph("idle", 150));
    assert_eq!(app.wait_finished(&idle_job)["state"], "finished");
    let idle_rate = rate(&step_times(&app, &idle_job));
    let idle_latency = burst(&app, &status_paths(&idle_job), requests / 4, BURST_THREADS);

    // Loaded: training runs (past caching), the clients connect, the burst comes.
    let job = start_training(&app, &train_graph("loaded", 1_000_000));
    let steps_at = |app: &App| step_times(app, &job).last().map_or(0, |s| s.1);
    let wait_start = Instant::now();
    while steps_at(&app) == 0 {
        assert!(
            wait_start.elapsed() < Duration::from_secs(120),
            "no first step"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let connecting = unix_now();
    let mut silent = vec![];
    let (mut natives, mut comfys) = (vec![], vec![]);
    for i in 0..clients {
        // Even clients on /v1/ws, odd ones on /ws; two of every eight never read.
        let native = i % 2 == 0;
        if i % 8 >= 6 {
            let path = if native {
                format!("/v1/ws?previews=false&queue={SILENT_QUEUE}")
            } else {
                format!("/ws?clientId=silent-{i}")
            };
            silent.push(silent_ws_client(app.addr, &path));
            continue;
        }
        let builder = std::thread::Builder::new().stack_size(256 * 1024);
        if native {
            let (ws, job) = (app.ws("previews=false"), job.clone());
            natives.push(builder.spawn(move || read_native(ws, job)).unwrap());
        } else {
            let ws = app.comfy_ws(&format!("reader-{i}"));
            comfys.push(builder.spawn(move || read_comfy(ws)).unwrap());
        }
    }
    let (burst_start, started) = (unix_now(), Instant::now());
    let loaded_latency = burst(&app, &status_paths(&job), requests, BURST_THREADS);
    let (burst_end, burst_time) = (unix_now(), started.elapsed());

    // The never-reading clients back up (events dropped, their queues held to
    // SILENT_QUEUE), no queue grows past the default bound, and training goes
    // on past them.
    let silent_native = silent.len() / 2;
    let queued = |s: &Value| s["queued"].as_u64().unwrap();
    let wait_start = Instant::now();
    let system = loop {
        let system = app.get("/v1/system").json();
        let backed_up = system["subscribers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| {
                s["dropped_events"].as_u64().unwrap() > 0 && queued(s) <= SILENT_QUEUE as u64
            })
            .count();
        if backed_up >= silent_native {
            break system;
        }
        assert!(
            wait_start.elapsed() < Duration::from_secs(120),
            "the never-reading clients never backed up: {system}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let subscribers = system["subscribers"].as_array().unwrap();
    assert!(
        subscribers.iter().all(|s| queued(s) <= 256),
        "a queue grew past the default bound: {system}"
    );
    let past = steps_at(&app) + 20;
    while steps_at(&app) < past {
        assert!(
            wait_start.elapsed() < Duration::from_secs(120),
            "training stalled behind the never-reading clients"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let interrupting = unix_now();
    assert_eq!(app.post("/interrupt", &json!({})).status, 200);
    assert_eq!(app.wait_finished(&job)["state"], "cancelled");

    // Nothing lost: the replay's sequence numbers are contiguous, and every
    // reading client got exactly those after its hello.
    let stored: Vec<u64> = app
        .get(&format!("/v1/jobs/{job}/events?since=0"))
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert!(stored.windows(2).all(|w| w[1] == w[0] + 1), "{stored:?}");
    let readers = natives.len();
    for reader in natives {
        let (hello, seqs) = reader.join().unwrap();
        let want: Vec<u64> = stored.iter().copied().filter(|&s| s > hello).collect();
        assert_eq!(seqs, want, "a /v1/ws client after seq {hello}");
    }
    let comfy_readers = comfys.len();
    let comfy_messages: usize = comfys.into_iter().map(|c| c.join().unwrap()).sum();
    drop(silent);

    let times = step_times(&app, &job);
    let within = |from: f64, to: f64| -> Vec<(f64, u64)> {
        times
            .iter()
            .copied()
            .filter(|(t, _)| (from..=to).contains(t))
            .collect()
    };
    let with_clients = within(connecting, interrupting);
    let in_burst = within(burst_start, burst_end).len();
    let dropped: u64 = subscribers
        .iter()
        .map(|s| s["dropped_events"].as_u64().unwrap())
        .sum();
    println!(
        "load: {clients} WebSocket clients ({readers} reading /v1/ws, {comfy_readers} reading /ws, {} never reading), open-file limit {fds}",
        clients - readers - comfy_readers
    );
    println!(
        "status latency, idle server ({} requests): p50 {:.1} ms, p99 {:.1} ms; while training with the clients ({requests} requests in {:.1} s, {BURST_THREADS} at a time): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        idle_latency.len(),
        percentile(&idle_latency, 0.5),
        percentile(&idle_latency, 0.99),
        burst_time.as_secs_f64(),
        percentile(&loaded_latency, 0.5),
        percentile(&loaded_latency, 0.99),
        percentile(&loaded_latency, 1.0),
    );
    println!(
        "training step rate: idle {idle_rate:.1} it/s; with the {clients} clients connected {:.1} it/s ({} steps), {in_burst} steps during the {:.2} s burst ({:.1} it/s); {} events replayed, contiguous; {comfy_messages} ComfyUI messages read; {dropped} events dropped from the queues of never-reading clients (each held to {SILENT_QUEUE})",
        rate(&with_clients),
        with_clients.len(),
        burst_end - burst_start,
        in_burst as f64 / (burst_end - burst_start),
        stored.len(),
    );
}
