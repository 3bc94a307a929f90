//! The graph executor: runs a queued prompt of our nodes, node by node in
//! dependency order, turning training and sampling nodes into the engine's
//! ordinary jobs (the same [`Engine::submit`] `/v1` uses, after the same
//! [`Admission`] checks) and every engine event of those jobs into ComfyUI's
//! WebSocket messages (`docs/comfyui-protocol.md` §2, §4, §5).
//!
//! - Order: [`graph::execution_order`] over the output nodes, not walking past a
//!   cached node.
//! - Cache: each node's outputs are kept by its [`Signature`] across prompts (a
//!   hash of its class, constants and inputs' signatures, plus a salt for what
//!   lies outside the graph: a LoRA file, a dataset folder, a loaded image), as
//!   ComfyUI does; an entry whose files are gone is not used. Re-queueing a graph
//!   whose training inputs did not change does not train again.
//! - Interrupt: cancels the running node's job. A training job cancelled so
//!   saves its state; queueing the same Train node again resumes it.
//! - Lanes: one thread per [`Lane`] of the queue; prompts that do not train run
//!   beside one that does (samples of the live adapter while it trains).
//! - Values: JSON. A LoRA stack is a list of [`LoraChoice`]s, a trained LoRA
//!   `{"path", "name", "job_id"}`, IMAGE a list of image references (`images`).
//!
//! Must not: touch tensors or HTTP; it talks to the engine, the folders and the hub.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};

use super::folders::Folders;
use super::graph::{self, Input, Node, NodeId, Signature};
use super::hub::Hub;
use super::images::{self, ImageRef};
use super::loss_graph;
use super::nodes::{self, JobKind, NodeDef, NodeRequest, OutputSource};
use super::queue::{Finished, Lane, Outcome, PromptQueue, QueuedPrompt};
use crate::config::Precision;
use crate::engine::bus::Received;
use crate::engine::events::{Event, EventKind, JobState};
use crate::engine::store::JobRecord;
use crate::engine::{Control, Engine, JobRequest, LoraChoice};
use crate::server::admission::Admission;
use crate::train::events::TrainEvent;

/// Cached node outputs kept at most (oldest dropped first).
const CACHE_ENTRIES: usize = 512;

/// What a node produced.
#[derive(Clone, Debug)]
struct NodeOutput {
    /// One value per output, in order.
    values: Vec<Value>,
    /// What the UI shows (`executed.output`, history `outputs`).
    ui: Option<Value>,
    /// Files the values name: the entry is stale once one is gone.
    files: Vec<PathBuf>,
}

impl NodeOutput {
    fn still_valid(&self) -> bool {
        self.files.iter().all(|f| f.exists())
    }
}

/// Why a node did not produce its outputs.
#[derive(Debug)]
enum NodeFailure {
    Error {
        message: String,
        exception_type: &'static str,
    },
    Interrupted,
}

impl NodeFailure {
    fn error(exception_type: &'static str, message: impl std::fmt::Display) -> Self {
        Self::Error {
            message: message.to_string(),
            exception_type,
        }
    }
}

impl From<nodes::NodeError> for NodeFailure {
    fn from(e: nodes::NodeError) -> Self {
        Self::error("ValueError", e)
    }
}

impl From<images::ImageError> for NodeFailure {
    fn from(e: images::ImageError) -> Self {
        Self::error("ValueError", e)
    }
}

impl From<crate::server::errors::ApiError> for NodeFailure {
    fn from(e: crate::server::errors::ApiError) -> Self {
        Self::error("ValueError", e)
    }
}

impl From<crate::engine::EngineError> for NodeFailure {
    fn from(e: crate::engine::EngineError) -> Self {
        Self::error("RuntimeError", e)
    }
}

/// A running prompt's interrupt switch and the job it cancels.
#[derive(Default)]
struct Interrupt {
    requested: bool,
    job: Option<String>,
}

/// Runs prompts; one lives beside the queue for the daemon's life.
pub(crate) struct Executor {
    engine: Engine,
    admission: Admission,
    folders: Folders,
    hub: Hub,
    queue: Arc<PromptQueue>,
    /// Where node-made files live (datasets from images, the demo dataset).
    work_dir: PathBuf,
    /// The loaded model's dtype: the precision a training run defaults to.
    model_precision: Precision,
    cache: Mutex<VecDeque<(Signature, NodeOutput)>>,
    /// Interrupted training nodes: their job, resumed when queued again.
    resumable: Mutex<HashMap<Signature, String>>,
    /// By prompt id, for the running prompts.
    interrupts: Mutex<HashMap<String, Interrupt>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// One prompt being run: where its messages go and what it has done.
struct Run<'a> {
    prompt: &'a QueuedPrompt,
    messages: Vec<Value>,
    /// `progress_state`'s nodes.
    states: BTreeMap<NodeId, Value>,
    executed: Vec<NodeId>,
    values: BTreeMap<NodeId, Vec<Value>>,
    outputs: Map<String, Value>,
}

/// The node running now, for its progress and previews.
struct NodeCtx<'a> {
    hub: &'a Hub,
    client: Option<&'a str>,
    prompt_id: &'a str,
    node: &'a str,
}

impl NodeCtx<'_> {
    fn progress(&self, value: u64, max: u64) {
        let state = json!({
            "value": value, "max": max, "state": "running", "node_id": self.node,
            "prompt_id": self.prompt_id, "display_node_id": self.node,
            "parent_node_id": null, "real_node_id": self.node,
        });
        self.hub.to_client_or_all(
            self.client,
            "progress_state",
            json!({"prompt_id": self.prompt_id, "nodes": {self.node: state}}),
        );
        self.hub.to_client_or_all(
            self.client,
            "progress",
            json!({"value": value, "max": max, "prompt_id": self.prompt_id, "node": self.node}),
        );
    }

    fn preview(&self, png: Arc<[u8]>) {
        self.hub.preview(
            self.client,
            png,
            json!({
                "node_id": self.node, "prompt_id": self.prompt_id,
                "display_node_id": self.node, "parent_node_id": null,
                "real_node_id": self.node, "image_type": "image/png",
            }),
        );
    }

    /// Our own message of a training step, for the js/ extension.
    fn train_step(&self, stats: &crate::train::events::StepStats) {
        self.hub.to_client_or_all(
            self.client,
            "fluxlora.train",
            json!({
                "prompt_id": self.prompt_id, "node": self.node,
                "step": stats.step, "total": stats.total_steps,
                "loss": stats.loss, "loss_ema": stats.loss_ema, "lr": stats.lr,
                "it_per_s": stats.it_per_s, "eta_s": stats.eta_s,
            }),
        );
    }
}

impl Executor {
    pub(crate) fn new(
        engine: Engine,
        admission: Admission,
        folders: Folders,
        hub: Hub,
        queue: Arc<PromptQueue>,
        work_dir: PathBuf,
        model_precision: Precision,
    ) -> Self {
        Self {
            engine,
            admission,
            folders,
            hub,
            queue,
            work_dir,
            model_precision,
            cache: Mutex::new(VecDeque::new()),
            resumable: Mutex::new(HashMap::new()),
            interrupts: Mutex::new(HashMap::new()),
        }
    }

    /// Takes prompts from the queue's `lane` and runs them until the queue stops.
    pub(crate) fn serve(&self, lane: Lane) {
        while let Some(prompt) = self.queue.take(lane) {
            let span = tracing::info_span!("prompt", id = %prompt.prompt_id, lane = ?lane);
            let _enter = span.enter();
            lock(&self.interrupts).insert(prompt.prompt_id.clone(), Interrupt::default());
            let finished = self.run(&prompt);
            lock(&self.interrupts).remove(&prompt.prompt_id);
            tracing::info!(outcome = ?finished.outcome, "prompt done");
            self.queue.finish(finished);
            self.hub.to_client(
                prompt.client_id.as_deref(),
                "executing",
                json!({"node": null, "prompt_id": prompt.prompt_id}),
            );
        }
    }

    /// Interrupts the running prompts (only `prompt_id`, when given).
    pub(crate) fn interrupt(&self, prompt_id: Option<&str>) {
        let jobs: Vec<String> = lock(&self.interrupts)
            .iter_mut()
            .filter(|(id, _)| prompt_id.is_none_or(|wanted| wanted == id.as_str()))
            .filter_map(|(_, i)| {
                i.requested = true;
                i.job.clone()
            })
            .collect();
        for job in jobs {
            // The job may have ended just now; nothing to cancel then.
            let _ = self.engine.control(&job, Control::Cancel);
        }
    }

    fn interrupted(&self, prompt_id: &str) -> bool {
        lock(&self.interrupts)
            .get(prompt_id)
            .is_some_and(|i| i.requested)
    }

    fn cached(&self, signature: &Signature) -> Option<NodeOutput> {
        lock(&self.cache)
            .iter()
            .rev()
            .find(|(s, _)| s == signature)
            .map(|(_, o)| o.clone())
            .filter(NodeOutput::still_valid)
    }

    fn remember(&self, signature: Signature, output: NodeOutput) {
        let mut cache = lock(&self.cache);
        cache.retain(|(s, _)| *s != signature);
        cache.push_back((signature, output));
        while cache.len() > CACHE_ENTRIES {
            cache.pop_front();
        }
    }

    fn run(&self, prompt: &QueuedPrompt) -> Finished {
        let mut run = Run {
            prompt,
            messages: vec![],
            states: BTreeMap::new(),
            executed: vec![],
            values: BTreeMap::new(),
            outputs: Map::new(),
        };
        let client = prompt.client_id.as_deref();
        let id = prompt.prompt_id.as_str();
        self.record(
            &mut run,
            "execution_start",
            json!({"prompt_id": id, "timestamp": now_ms()}),
        );

        let graph = &prompt.graph;
        let signatures = graph::signatures(graph, |_, node| self.salt(node));
        let mut hits: BTreeMap<NodeId, NodeOutput> = BTreeMap::new();
        for (node, signature) in &signatures {
            if let Some(out) = self.cached(signature) {
                hits.insert(node.clone(), out);
            }
        }
        let mut cached_ids: Vec<&NodeId> = hits.keys().collect();
        cached_ids.sort_by(|a, b| graph::id_order(a, b));
        self.record(
            &mut run,
            "execution_cached",
            json!({"nodes": cached_ids, "prompt_id": id, "timestamp": now_ms()}),
        );

        let order = graph::execution_order(graph, |node| hits.contains_key(node));
        let mut failure: Option<(NodeId, String, NodeFailure)> = None;
        for step in order {
            let Some(node) = graph.node(&step.node) else {
                continue;
            };
            if let Some(out) = hits.get(&step.node) {
                if node.output_node {
                    self.executed(&mut run, &step.node, out);
                }
                run.values.insert(step.node.clone(), out.values.clone());
                continue;
            }
            if self.interrupted(id) {
                failure = Some((
                    step.node.clone(),
                    node.class_type.clone(),
                    NodeFailure::Interrupted,
                ));
                break;
            }
            self.queue.set_running_node(id, Some(step.node.clone()));
            self.node_state(&mut run, &step.node, "running");
            self.hub.to_client(
                client,
                "executing",
                json!({"node": step.node, "display_node": step.node, "prompt_id": id}),
            );
            let result = self.run_node(&run, &step.node, node, signatures.get(&step.node));
            self.queue.set_running_node(id, None);
            match result {
                Ok(out) => {
                    self.executed(&mut run, &step.node, &out);
                    run.executed.push(step.node.clone());
                    run.values.insert(step.node.clone(), out.values.clone());
                    self.node_state(&mut run, &step.node, "finished");
                    let volatile = nodes::get(&node.class_type).is_some_and(|d| d.mapping.volatile);
                    if let (Some(signature), false) = (signatures.get(&step.node), volatile) {
                        self.remember(*signature, out);
                    }
                }
                Err(f) => {
                    self.node_state(&mut run, &step.node, "error");
                    failure = Some((step.node.clone(), node.class_type.clone(), f));
                    break;
                }
            }
        }

        let (outcome, error) = match failure {
            None => {
                self.record(
                    &mut run,
                    "execution_success",
                    json!({"prompt_id": id, "timestamp": now_ms()}),
                );
                (Outcome::Success, None)
            }
            Some((node, class, NodeFailure::Interrupted)) => {
                let data = json!({
                    "prompt_id": id, "node_id": node, "node_type": class,
                    "executed": run.executed, "timestamp": now_ms(),
                });
                run.messages
                    .push(json!(["execution_interrupted", data.clone()]));
                self.hub
                    .to_client_or_all(client, "execution_interrupted", data);
                (Outcome::Interrupted, None)
            }
            Some((
                node,
                class,
                NodeFailure::Error {
                    message,
                    exception_type,
                },
            )) => {
                tracing::warn!(node = %node, class = %class, error = %message, "node failed");
                let inputs: Map<String, Value> = graph
                    .node(&node)
                    .map(|n| {
                        n.inputs
                            .iter()
                            .filter_map(|(k, v)| match v {
                                Input::Value(v) => Some((k.clone(), json!([v]))),
                                Input::Link(_) => None,
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                let data = json!({
                    "prompt_id": id, "node_id": node, "node_type": class,
                    "executed": run.executed, "exception_message": message,
                    "exception_type": exception_type, "traceback": [],
                    "current_inputs": inputs, "current_outputs": run.values.keys().collect::<Vec<_>>(),
                    "timestamp": now_ms(),
                });
                self.record(&mut run, "execution_error", data);
                (Outcome::Error, Some((message, class)))
            }
        };
        let status_str = if outcome == Outcome::Success {
            "success"
        } else {
            "error"
        };
        let entry = json!({
            "prompt": prompt.item(),
            "outputs": run.outputs,
            "status": {
                "status_str": status_str,
                "completed": outcome == Outcome::Success,
                "messages": run.messages,
            },
            "meta": run.outputs.keys().map(|k| (k.clone(), json!({
                "node_id": k, "display_node": k, "parent_node": null, "real_node_id": k,
            }))).collect::<Map<String, Value>>(),
        });
        Finished {
            prompt_id: prompt.prompt_id.clone(),
            entry,
            outcome,
            values: run.values,
            error,
        }
    }

    /// Sends a message to the prompt's client and keeps it for the history.
    fn record(&self, run: &mut Run, kind: &str, data: Value) {
        run.messages.push(json!([kind, data.clone()]));
        self.hub
            .to_client(run.prompt.client_id.as_deref(), kind, data);
    }

    fn executed(&self, run: &mut Run, node: &str, out: &NodeOutput) {
        let Some(ui) = &out.ui else {
            return;
        };
        run.outputs.insert(node.to_string(), ui.clone());
        self.hub.to_client(
            run.prompt.client_id.as_deref(),
            "executed",
            json!({"node": node, "display_node": node, "output": ui, "prompt_id": run.prompt.prompt_id}),
        );
    }

    fn node_state(&self, run: &mut Run, node: &str, state: &str) {
        let (value, max) = if state == "finished" { (1, 1) } else { (0, 1) };
        run.states.insert(
            node.to_string(),
            json!({
                "value": value, "max": max, "state": state, "node_id": node,
                "prompt_id": run.prompt.prompt_id, "display_node_id": node,
                "parent_node_id": null, "real_node_id": node,
            }),
        );
        self.hub.to_client_or_all(
            run.prompt.client_id.as_deref(),
            "progress_state",
            json!({"prompt_id": run.prompt.prompt_id, "nodes": run.states}),
        );
    }

    /// What a node's output depends on outside the graph (ComfyUI's `IS_CHANGED`).
    fn salt(&self, node: &Node) -> Option<String> {
        let constant = |name: &str| match node.inputs.get(name) {
            Some(Input::Value(v)) => v.as_str().map(str::to_string),
            _ => None,
        };
        if nodes::get(&node.class_type).is_some_and(|d| d.mapping.volatile) {
            // Never the same twice (the adapter as trained so far, a run's losses).
            return Some(super::ids::uuid4());
        }
        match node.class_type.as_str() {
            "LoadImage" => constant("image").map(|name| {
                let (sub, base) = name.rsplit_once('/').unwrap_or(("", &name));
                file_stamp(self.folders.existing("input", sub, base).ok().as_deref())
            }),
            "FluxLoraApply" => constant("lora_name").map(|name| {
                let path = self.admission.lora_dir.as_ref().map(|d| d.join(&name));
                file_stamp(path.as_deref())
            }),
            "FluxLoraDataset" if constant("source").as_deref() == Some("folder") => {
                constant("folder").map(|f| folder_stamp(&self.dataset_folder(&f)))
            }
            _ => None,
        }
    }

    /// A dataset folder as written in the node: relative ones are inside the input folder.
    fn dataset_folder(&self, folder: &str) -> PathBuf {
        let path = Path::new(folder);
        if path.is_absolute() {
            path.to_path_buf()
        } else {
            self.folders
                .dir("input")
                .map(|d| d.join(path))
                .unwrap_or_else(|_| path.to_path_buf())
        }
    }

    /// The node's input values: constants, and the outputs of linked nodes.
    fn inputs_of(&self, run: &Run, node: &Node) -> Result<Map<String, Value>, NodeFailure> {
        let mut inputs = Map::new();
        for (name, input) in &node.inputs {
            let value = match input {
                Input::Value(v) => v.clone(),
                Input::Link(link) => run
                    .values
                    .get(&link.node)
                    .and_then(|v| v.get(link.output))
                    .cloned()
                    .ok_or_else(|| {
                        NodeFailure::error(
                            "KeyError",
                            format!(
                                "input `{name}`: node {} produced no output {}",
                                link.node, link.output
                            ),
                        )
                    })?,
            };
            inputs.insert(name.clone(), value);
        }
        Ok(inputs)
    }

    fn run_node(
        &self,
        run: &Run,
        id: &str,
        node: &Node,
        signature: Option<&Signature>,
    ) -> Result<NodeOutput, NodeFailure> {
        let def = nodes::get(&node.class_type).ok_or_else(|| {
            NodeFailure::error("KeyError", format!("no node class `{}`", node.class_type))
        })?;
        let inputs = self.inputs_of(run, node)?;
        let ctx = NodeCtx {
            hub: &self.hub,
            client: run.prompt.client_id.as_deref(),
            prompt_id: &run.prompt.prompt_id,
            node: id,
        };
        let mut out = match def.mapping.job {
            JobKind::Train => self.train(&ctx, def, &inputs, signature)?,
            JobKind::Sample => self.sample(&ctx, def, &inputs)?,
            JobKind::LoraStack => self.lora_stack(def, &inputs)?,
            JobKind::Options => match def.request(&inputs)? {
                NodeRequest::Part(part) => NodeOutput {
                    values: vec![part],
                    ui: None,
                    files: vec![],
                },
                other => return Err(NodeFailure::error("TypeError", format!("{other:?}"))),
            },
            JobKind::Dataset => self.dataset(def, &inputs, signature)?,
            JobKind::LossGraph => self.loss_graph(&inputs)?,
            JobKind::SaveImage => self.save_images(&inputs, "output")?,
            JobKind::PreviewImage => self.save_images(&inputs, "temp")?,
            JobKind::LoadImage => self.load_image(&inputs)?,
        };
        // Values in the order of the definition's outputs.
        if out.values.len() != def.outputs.len() {
            out.values.resize(def.outputs.len(), Value::Null);
        }
        Ok(out)
    }

    /// The first value of `source` among the outputs, placed at its output index.
    fn arrange(def: &NodeDef, by_source: &[(OutputSource, Value)]) -> Vec<Value> {
        def.outputs
            .iter()
            .map(|o| {
                def.mapping
                    .outputs
                    .get(&o.name)
                    .and_then(|s| by_source.iter().find(|(k, _)| k == s))
                    .map_or(Value::Null, |(_, v)| v.clone())
            })
            .collect()
    }

    fn train(
        &self,
        ctx: &NodeCtx,
        def: &NodeDef,
        inputs: &Map<String, Value>,
        signature: Option<&Signature>,
    ) -> Result<NodeOutput, NodeFailure> {
        let mut json = def.request_json(inputs)?;
        if json.get("mixed_precision").is_none() {
            json["mixed_precision"] = json!(self.model_precision);
        }
        let NodeRequest::Train(mut cfg) = def.parse_request(json)? else {
            return Err(NodeFailure::error("TypeError", "not a training request"));
        };
        self.admission.check_train(&mut cfg)?;
        let output_name = cfg.output_name.clone();
        let sub = self.engine.subscribe(None, 1024, true);
        let earlier = signature.and_then(|s| lock(&self.resumable).remove(s));
        let id = match earlier {
            Some(job) if self.engine.control(&job, Control::Resume).is_ok() => {
                tracing::info!(job = %job, "resuming the interrupted training job");
                job
            }
            _ => self.engine.submit(JobRequest::Train(cfg))?,
        };
        let mut lora_path: Option<PathBuf> = None;
        let record = self.follow(&sub, ctx.prompt_id, &id, |event| match &event.kind {
            EventKind::Train { event } => match event {
                TrainEvent::Caching { done, total } => ctx.progress(*done as u64, *total as u64),
                TrainEvent::Started {
                    total_steps,
                    resumed_from_step,
                    ..
                } => ctx.progress(resumed_from_step.unwrap_or(0), *total_steps),
                TrainEvent::Step(stats) => {
                    ctx.progress(stats.step, stats.total_steps);
                    ctx.train_step(stats);
                }
                TrainEvent::Finished { path, .. } => lora_path = Some(path.clone()),
                _ => {}
            },
            EventKind::Preview { png, .. } => ctx.preview(png.clone()),
            _ => {}
        })?;
        match record.state {
            JobState::Finished => {
                let path = lora_path
                    .or_else(|| {
                        record
                            .outputs
                            .iter()
                            .find(|p| p.extension().is_some_and(|x| x == "safetensors"))
                            .cloned()
                    })
                    .ok_or_else(|| {
                        NodeFailure::error("RuntimeError", "the training job wrote no LoRA")
                    })?;
                let name = format!("{output_name}.safetensors");
                let lora = json!({"path": path, "name": name, "job_id": id});
                Ok(NodeOutput {
                    values: Self::arrange(
                        def,
                        &[(OutputSource::Lora, lora), (OutputSource::JobId, json!(id))],
                    ),
                    ui: Some(json!({"lora": [name], "job_id": [id]})),
                    files: vec![path],
                })
            }
            JobState::Cancelled if self.interrupted(ctx.prompt_id) => {
                if let Some(s) = signature {
                    lock(&self.resumable).insert(*s, id);
                }
                Err(NodeFailure::Interrupted)
            }
            state => Err(NodeFailure::error(
                "RuntimeError",
                record
                    .error
                    .unwrap_or_else(|| format!("the training job ended {state:?}")),
            )),
        }
    }

    fn sample(
        &self,
        ctx: &NodeCtx,
        def: &NodeDef,
        inputs: &Map<String, Value>,
    ) -> Result<NodeOutput, NodeFailure> {
        let NodeRequest::Sample(mut job) = def.request(inputs)? else {
            return Err(NodeFailure::error("TypeError", "not a sampling request"));
        };
        // img2img: the first image of a connected batch, and its denoise.
        if let Some(images) = inputs.get("image").filter(|v| !v.is_null()) {
            let first = images::refs(images)?.remove(0);
            job.request.init_image = Some(images::path_of(&self.folders, &first)?);
            job.request.denoise = inputs.get("denoise").and_then(Value::as_f64);
        }
        self.admission.check_sample(&mut job)?;
        let sub = self.engine.subscribe(None, 1024, true);
        let id = self.engine.submit(JobRequest::Sample(job))?;
        let mut paths: Vec<PathBuf> = vec![];
        let record = self.follow(&sub, ctx.prompt_id, &id, |event| match &event.kind {
            EventKind::SampleStep { step, total } => ctx.progress(*step as u64, *total as u64),
            EventKind::Preview { png, .. } => ctx.preview(png.clone()),
            EventKind::Images { paths: p } => paths.extend(p.iter().cloned()),
            _ => {}
        })?;
        match record.state {
            JobState::Finished => {
                let pngs = paths
                    .iter()
                    .map(|p| std::fs::read(p))
                    .collect::<std::io::Result<Vec<_>>>()
                    .map_err(|e| {
                        NodeFailure::error("OSError", format!("reading the samples: {e}"))
                    })?;
                let refs = images::save_pngs(&self.folders, "temp", "", "fluxlora_sample", &pngs)?;
                Ok(self.image_output(def, refs, None))
            }
            JobState::Cancelled if self.interrupted(ctx.prompt_id) => Err(NodeFailure::Interrupted),
            state => Err(NodeFailure::error(
                "RuntimeError",
                record
                    .error
                    .unwrap_or_else(|| format!("the sampling job ended {state:?}")),
            )),
        }
    }

    /// An output of images (placed at the IMAGE and MASK outputs), with `ui`.
    fn image_output(&self, def: &NodeDef, refs: Vec<ImageRef>, ui: Option<Value>) -> NodeOutput {
        let files = refs
            .iter()
            .filter_map(|r| images::path_of(&self.folders, r).ok())
            .collect();
        let value = images::value(&refs);
        NodeOutput {
            values: Self::arrange(
                def,
                &[
                    (OutputSource::Images, value.clone()),
                    (OutputSource::Mask, value),
                ],
            ),
            ui,
            files,
        }
    }

    /// Follows job `id` through `sub` (subscribed before the job was submitted)
    /// until it ends, handing each of its events to `on`.
    fn follow(
        &self,
        sub: &crate::engine::bus::Subscription,
        prompt_id: &str,
        id: &str,
        mut on: impl FnMut(&Event),
    ) -> Result<JobRecord, NodeFailure> {
        let requested = lock(&self.interrupts).get_mut(prompt_id).is_some_and(|i| {
            i.job = Some(id.to_string());
            i.requested
        });
        if requested {
            let _ = self.engine.control(id, Control::Cancel);
        }
        let mut last = 0;
        let result = loop {
            let events = match sub.recv(Duration::from_secs(1)) {
                Received::Event(e) => vec![e],
                Received::Missed(_) => self.engine.events_since(id, last)?,
                Received::Timeout => {
                    let rec = self.engine.job(id)?;
                    if rec.state.is_terminal() {
                        // Whatever the bus did not deliver is in the store.
                        for e in self.engine.events_since(id, last)? {
                            on(&e);
                        }
                        break Ok(rec);
                    }
                    if rec.state == JobState::Interrupted {
                        break Err(NodeFailure::error("RuntimeError", "the daemon is stopping"));
                    }
                    continue;
                }
            };
            let mut ended = false;
            for e in &events {
                if e.job != id || (e.seq <= last && !e.is_preview()) {
                    continue;
                }
                if !e.is_preview() {
                    last = e.seq;
                }
                on(e);
                if let EventKind::State { state } = e.kind {
                    ended |= state.is_terminal();
                }
            }
            if ended {
                break Ok(self.engine.job(id)?);
            }
        };
        if let Some(i) = lock(&self.interrupts).get_mut(prompt_id) {
            i.job = None;
        }
        result
    }

    fn lora_stack(
        &self,
        def: &NodeDef,
        inputs: &Map<String, Value>,
    ) -> Result<NodeOutput, NodeFailure> {
        let NodeRequest::Lora(choice) = def.request(inputs)? else {
            return Err(NodeFailure::error("TypeError", "not a LoRA choice"));
        };
        let mut stack: Vec<LoraChoice> =
            match def.mapping.chain.as_deref().and_then(|c| inputs.get(c)) {
                None | Some(Value::Null) => vec![],
                Some(v) => serde_json::from_value(v.clone()).map_err(|e| {
                    NodeFailure::error(
                        "ValueError",
                        format!("input `loras`: not a LoRA stack: {e}"),
                    )
                })?,
            };
        stack.push(choice);
        Ok(NodeOutput {
            values: Self::arrange(def, &[(OutputSource::LoraStack, json!(stack))]),
            ui: None,
            files: vec![],
        })
    }

    fn text<'i>(inputs: &'i Map<String, Value>, name: &str) -> &'i str {
        inputs.get(name).and_then(Value::as_str).unwrap_or("")
    }

    fn dataset(
        &self,
        def: &NodeDef,
        inputs: &Map<String, Value>,
        signature: Option<&Signature>,
    ) -> Result<NodeOutput, NodeFailure> {
        let NodeRequest::Part(mut dataset) = def.request(inputs)? else {
            return Err(NodeFailure::error("TypeError", "not a dataset"));
        };
        let repeats = inputs
            .get("num_repeats")
            .and_then(Value::as_u64)
            .unwrap_or(1);
        let folder = |path: &Path| json!({"path": path, "num_repeats": repeats});
        let folders: Vec<Value> = match Self::text(inputs, "source") {
            "folder" => {
                let written = Self::text(inputs, "folder");
                if written.trim().is_empty() {
                    return Err(NodeFailure::error(
                        "ValueError",
                        "source is `folder` but `folder` is empty: name an image folder",
                    ));
                }
                let path = self
                    .admission
                    .resolve_path(&self.dataset_folder(written))
                    .map_err(|e| {
                        NodeFailure::error("ValueError", format!("folder `{written}`: {e}"))
                    })?;
                vec![folder(&path)]
            }
            "images" => {
                let refs =
                    images::refs(inputs.get("images").unwrap_or(&Value::Null)).map_err(|e| {
                        NodeFailure::error(
                            "ValueError",
                            format!("source is `images`: connect images: {e}"),
                        )
                    })?;
                let dir = self.images_dataset(&refs, inputs, signature)?;
                vec![folder(&dir)]
            }
            "demo" => {
                let dir = self.demo_dataset()?;
                vec![folder(&dir.join("zorbly")), folder(&dir.join("regular"))]
            }
            other => {
                return Err(NodeFailure::error(
                    "ValueError",
                    format!("unknown source `{other}`"),
                ))
            }
        };
        let files = folders
            .iter()
            .filter_map(|f| f["path"].as_str().map(PathBuf::from))
            .collect();
        dataset["folders"] = Value::Array(folders);
        Ok(NodeOutput {
            values: Self::arrange(def, &[(OutputSource::Dataset, dataset)]),
            ui: None,
            files,
        })
    }

    /// A dataset folder made of graph images and their captions (kept by the
    /// node's signature: the same images and captions give the same folder).
    fn images_dataset(
        &self,
        refs: &[ImageRef],
        inputs: &Map<String, Value>,
        signature: Option<&Signature>,
    ) -> Result<PathBuf, NodeFailure> {
        let name = signature.map_or_else(
            || format!("{}", now_ms()),
            |s| s.to_string()[..16].to_string(),
        );
        let dir = self.work_dir.join("datasets").join(name);
        if dir.is_dir() {
            return Ok(dir);
        }
        let trigger = Self::text(inputs, "trigger_word");
        let template = Self::text(inputs, "caption_template");
        let lines: Vec<&str> = Self::text(inputs, "captions")
            .lines()
            .map(str::trim)
            .collect();
        let make = |tmp: &Path| -> Result<(), NodeFailure> {
            for (i, image) in refs.iter().enumerate() {
                let decoded = images::load(&self.folders, image)?;
                let png = images::encode_png(&decoded)?;
                let caption = lines
                    .get(i)
                    .filter(|l| !l.is_empty())
                    .map_or_else(|| template.replace("[trigger]", trigger), |l| l.to_string());
                let io = |e: std::io::Error| {
                    NodeFailure::error("OSError", format!("writing the dataset: {e}"))
                };
                std::fs::write(tmp.join(format!("{i:04}.png")), png).map_err(io)?;
                std::fs::write(tmp.join(format!("{i:04}.txt")), caption).map_err(io)?;
            }
            Ok(())
        };
        write_folder(&dir, make)?;
        Ok(dir)
    }

    /// The built-in demo set (the `fluxlora train --demo` images), written once.
    fn demo_dataset(&self) -> Result<PathBuf, NodeFailure> {
        use crate::train::shapes::{write_concept_dataset, write_dataset, Concept};
        let dir = self.work_dir.join("datasets").join("demo");
        if dir.is_dir() {
            return Ok(dir);
        }
        write_folder(&dir, |tmp| {
            write_concept_dataset(&tmp.join("zorbly"), &Concept::demo(), 24, 64, 7)
                .and_then(|_| write_dataset(&tmp.join("regular"), 24, 64, 8))
                .map(|_| ())
                .map_err(|e| {
                    NodeFailure::error("OSError", format!("writing the demo dataset: {e}"))
                })
        })?;
        Ok(dir)
    }

    fn loss_graph(&self, inputs: &Map<String, Value>) -> Result<NodeOutput, NodeFailure> {
        let job = Self::text(inputs, "job_id");
        let events = self
            .engine
            .events_since(job, 0)
            .map_err(|e| NodeFailure::error("ValueError", format!("job_id `{job}`: {e}")))?;
        let (mut loss, mut ema) = (vec![], vec![]);
        for e in &events {
            if let EventKind::Train {
                event: TrainEvent::Step(s),
            } = &e.kind
            {
                loss.push((s.step, s.loss));
                ema.push((s.step, s.loss_ema));
            }
        }
        let side = |name: &str| inputs.get(name).and_then(Value::as_u64).unwrap_or(512) as u32;
        let drawn = loss_graph::draw(&loss, Some(&ema), side("width"), side("height"))
            .map_err(|e| NodeFailure::error("ValueError", format!("job `{job}`: {e}")))?;
        let png = images::encode_png(&image::DynamicImage::ImageRgb8(drawn))?;
        let refs = images::save_pngs(&self.folders, "temp", "", "fluxlora_loss", &[png])?;
        let def = nodes::get("FluxLoraLossGraph")
            .ok_or_else(|| NodeFailure::error("KeyError", "FluxLoraLossGraph"))?;
        Ok(self.image_output(def, refs, None))
    }

    /// Save Image (into `output`, named by `filename_prefix`) and Preview Image
    /// (into `temp`): PNG files copied as they are, other images converted.
    fn save_images(
        &self,
        inputs: &Map<String, Value>,
        kind: &str,
    ) -> Result<NodeOutput, NodeFailure> {
        let refs = images::refs(inputs.get("images").unwrap_or(&Value::Null))?;
        let mut pngs = Vec::with_capacity(refs.len());
        for r in &refs {
            let path = images::path_of(&self.folders, r)?;
            let is_png = path
                .extension()
                .is_some_and(|x| x.eq_ignore_ascii_case("png"));
            let bytes = std::fs::read(&path)
                .map_err(|e| NodeFailure::error("OSError", format!("{}: {e}", r.filename)))?;
            pngs.push(if is_png {
                images::decode(&r.filename, &bytes)?;
                bytes
            } else {
                images::encode_png(&images::decode(&r.filename, &bytes)?)?
            });
        }
        let (sub, stem) = if kind == "output" {
            images::split_prefix(
                inputs
                    .get("filename_prefix")
                    .and_then(Value::as_str)
                    .unwrap_or("ComfyUI"),
            )?
        } else {
            (
                String::new(),
                format!("ComfyUI_temp_{}", &format!("{:x}", now_ms())[4..9]),
            )
        };
        let saved = images::save_pngs(&self.folders, kind, &sub, &stem, &pngs)?;
        let files = saved
            .iter()
            .filter_map(|r| images::path_of(&self.folders, r).ok())
            .collect();
        Ok(NodeOutput {
            values: vec![],
            ui: Some(json!({"images": saved})),
            files,
        })
    }

    fn load_image(&self, inputs: &Map<String, Value>) -> Result<NodeOutput, NodeFailure> {
        let name = Self::text(inputs, "image");
        let (sub, base) = name.rsplit_once('/').unwrap_or(("", name));
        let image = ImageRef {
            filename: base.to_string(),
            subfolder: sub.to_string(),
            kind: "input".into(),
        };
        images::load(&self.folders, &image)?;
        let def =
            nodes::get("LoadImage").ok_or_else(|| NodeFailure::error("KeyError", "LoadImage"))?;
        Ok(self.image_output(def, vec![image], None))
    }
}

/// Size and modification time of a file ("missing" when it is not there).
fn file_stamp(path: Option<&Path>) -> String {
    path.and_then(|p| std::fs::metadata(p).ok()).map_or_else(
        || "missing".into(),
        |m| format!("{}@{:?}", m.len(), m.modified().ok()),
    )
}

/// The names, sizes and times of a folder's files, two levels deep (so a
/// changed image or caption changes the dataset node's key).
fn folder_stamp(dir: &Path) -> String {
    let mut entries = vec![];
    let mut stack = vec![(dir.to_path_buf(), 0)];
    while let Some((d, depth)) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = e.path();
            if path.is_dir() && depth < 2 {
                stack.push((path, depth + 1));
            } else {
                entries.push(format!("{}:{}", path.display(), file_stamp(Some(&path))));
            }
        }
    }
    entries.sort();
    entries.join("\n")
}

/// Makes folder `dir` whole or not at all: filled in a temporary sibling, then renamed.
fn write_folder(
    dir: &Path,
    fill: impl FnOnce(&Path) -> Result<(), NodeFailure>,
) -> Result<(), NodeFailure> {
    let io = |e: std::io::Error| NodeFailure::error("OSError", format!("{}: {e}", dir.display()));
    let parent = dir.parent().unwrap_or(Path::new("."));
    let tmp = parent.join(format!(".partial-{}", super::ids::uuid4()));
    std::fs::create_dir_all(&tmp).map_err(io)?;
    let filled = fill(&tmp);
    let renamed = filled.and_then(|()| std::fs::rename(&tmp, dir).map_err(io));
    if renamed.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    match renamed {
        // Another prompt made it meanwhile: theirs is as good.
        Err(_) if dir.is_dir() => Ok(()),
        other => other,
    }
}
