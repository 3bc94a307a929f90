//! Node definitions: the top-level `node_defs/*.json` files, embedded in the
//! binary, one per ComfyUI node.
//!
//! Each file is the node's ComfyUI `/object_info` entry (the shape ComfyUI's
//! `server.py` `node_info` returns) plus a `fluxlora` block saying what the
//! executor does with the node and which field of that job's request each input
//! fills:
//!
//! ```json
//! "fluxlora": {
//!   "job": "train" | "sample" | "lora_stack" | "options" | "dataset" | "loss_graph"
//!          | "save_image" | "preview_image" | "load_image",
//!   "fields": { "seed": "seed", "width": {"path": "request.width", "omit_if": 0},
//!               "options": {"merge": true} },
//!   "reads": ["folder"], "chain": "loras", "lora_input": "lora", "volatile": true,
//!   "outputs": { "job_id": "job_id" },
//!   "lora_list_inputs": ["lora_name"], "input_list_inputs": ["image"]
//! }
//! ```
//!
//! - `fields` paths are JSON paths into the request the node builds: a
//!   [`TrainConfig`] for `train`, a [`SampleJob`] for `sample`, one
//!   [`LoraChoice`] for `lora_stack` (a node that adds one entry to a stack of
//!   type [`LORA_STACK_TYPE`], a JSON list of `LoraChoice`), a part of a
//!   `TrainConfig` for `options` and a part of its `dataset` for `dataset`. A
//!   field given as an object may set `omit_if` (the widget value meaning "unset":
//!   ComfyUI widgets cannot be empty, the request's `Option`s can),
//!   `split_lines` (a multiline text becomes a list of its non-empty lines) or
//!   `merge` (the input is a JSON object, such as the options node's output,
//!   merged into the request).
//! - `reads` names inputs the executor reads itself (a dataset's folder, the
//!   images of Save Image); `chain` (stack nodes) names the input whose incoming
//!   stack the new entry is appended to; `lora_input` an optional trained LoRA
//!   that, when connected, replaces the file of `path`. Every input is exactly
//!   one of these. `outputs` says what each output carries ([`OutputSource`]);
//!   `volatile` marks a node whose output depends on more than its inputs (the
//!   adapter or the losses of a running job), which is never cached.
//! - `lora_list_inputs` / `input_list_inputs` are COMBO inputs written as `[]`
//!   and filled at run time with the LoRA folder's file names or the input
//!   folder's images, as ComfyUI fills its loaders from `folder_paths`.
//!
//! [`object_info`] serves the entries with the `fluxlora` block kept: ComfyUI's
//! front end ignores keys it does not know, and the bridge can read the mapping.
//! Without serde_json's `preserve_order` the input maps come out sorted by name;
//! `input_order` keeps the intended order (ComfyUI's front end sorts by it).
//!
//! A definition that fails its checks is logged and left out rather than
//! panicking; the unit tests make sure every embedded file passes.
//!
//! Must not: run jobs, touch tensors or HTTP. The ComfyUI executor turns node
//! inputs into a request here ([`NodeDef::request`]) and submits it itself.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::Path;
use std::sync::OnceLock;

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::engine::{LoraChoice, SampleJob};
use crate::train::config::TrainConfig;
use crate::train::dataset::DatasetConfig;

/// Every node file: (file name, contents). A test checks `node_defs/` has no others.
const NODE_FILES: &[(&str, &str)] = &[
    (
        "FluxLoraDataset.json",
        include_str!("../../../node_defs/FluxLoraDataset.json"),
    ),
    (
        "FluxLoraTrainingOptions.json",
        include_str!("../../../node_defs/FluxLoraTrainingOptions.json"),
    ),
    (
        "FluxLoraTrain.json",
        include_str!("../../../node_defs/FluxLoraTrain.json"),
    ),
    (
        "FluxLoraApply.json",
        include_str!("../../../node_defs/FluxLoraApply.json"),
    ),
    (
        "FluxLoraLiveAdapter.json",
        include_str!("../../../node_defs/FluxLoraLiveAdapter.json"),
    ),
    (
        "FluxLoraSample.json",
        include_str!("../../../node_defs/FluxLoraSample.json"),
    ),
    (
        "FluxLoraLossGraph.json",
        include_str!("../../../node_defs/FluxLoraLossGraph.json"),
    ),
    (
        "LoadImage.json",
        include_str!("../../../node_defs/LoadImage.json"),
    ),
    (
        "SaveImage.json",
        include_str!("../../../node_defs/SaveImage.json"),
    ),
    (
        "PreviewImage.json",
        include_str!("../../../node_defs/PreviewImage.json"),
    ),
];

/// The type of a LoRA stack passed between nodes: a JSON list of [`LoraChoice`].
pub(crate) const LORA_STACK_TYPE: &str = "FLUXLORA_LORAS";

/// The `/object_info` keys every definition has (`output_tooltips` is optional).
const REQUIRED_KEYS: &[&str] = &[
    "input",
    "input_order",
    "output",
    "output_is_list",
    "output_name",
    "name",
    "display_name",
    "description",
    "python_module",
    "category",
    "output_node",
];

/// Errors of node definitions and of turning node inputs into a request.
#[derive(Debug, thiserror::Error)]
pub(crate) enum NodeError {
    #[error("node_defs/{file}: {message}")]
    Definition { file: String, message: String },
    #[error("{node}: required input `{input}` is missing")]
    MissingInput { node: String, input: String },
    #[error("{node}: input `{input}`: {message}")]
    BadInput {
        node: String,
        input: String,
        message: String,
    },
    #[error("{node}: {message}")]
    BadRequest { node: String, message: String },
}

/// What the executor does with a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum JobKind {
    /// A training run: the request is a [`TrainConfig`].
    Train,
    /// A sampling job: the request is a [`SampleJob`].
    Sample,
    /// No job: one [`LoraChoice`] appended to the incoming stack.
    LoraStack,
    /// No job: a part of a [`TrainConfig`], merged into a training request.
    Options,
    /// No job: the dataset part of a [`TrainConfig`] (the executor adds the folders).
    Dataset,
    /// No job: a training run's loss curve drawn as an image.
    LossGraph,
    /// ComfyUI's Save Image: images copied into the output folder.
    SaveImage,
    /// ComfyUI's Preview Image: images copied into the temp folder.
    PreviewImage,
    /// ComfyUI's Load Image: an image of the input folder.
    LoadImage,
}

impl JobKind {
    /// Whether the node's `fields` build a request (the others only read inputs).
    fn builds_request(self) -> bool {
        matches!(
            self,
            Self::Train | Self::Sample | Self::LoraStack | Self::Options | Self::Dataset
        )
    }
}

/// What a node's output carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum OutputSource {
    /// The id of the submitted job.
    JobId,
    /// The LoRA a training job wrote when it finished (type `FLUXLORA_LORA`).
    Lora,
    /// Images (type `IMAGE`).
    Images,
    /// The alpha channel of loaded images (type `MASK`).
    Mask,
    /// The incoming stack with this node's [`LoraChoice`] appended.
    LoraStack,
    /// The options node's part of a training request.
    Options,
    /// The dataset node's part of a training request.
    Dataset,
}

impl OutputSource {
    /// Whether a node of `kind` can produce this output.
    fn comes_from(self, kind: JobKind) -> bool {
        match self {
            Self::JobId | Self::Lora => kind == JobKind::Train,
            Self::Images => matches!(
                kind,
                JobKind::Sample | JobKind::LossGraph | JobKind::LoadImage
            ),
            Self::Mask => kind == JobKind::LoadImage,
            Self::LoraStack => kind == JobKind::LoraStack,
            Self::Options => kind == JobKind::Options,
            Self::Dataset => kind == JobKind::Dataset,
        }
    }
}

/// One step of a [`JobPath`].
#[derive(Clone, Debug, PartialEq, Eq)]
enum Segment {
    Key(String),
    Index(usize),
}

/// A path into a request's JSON: `dataset.folders[0].path`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct JobPath {
    text: String,
    segments: Vec<Segment>,
}

impl JobPath {
    fn parse(text: &str) -> Result<Self, String> {
        let bad = || format!("bad field path `{text}`: use names and [index] joined by dots");
        let mut segments = vec![];
        for part in text.split('.') {
            let (name, mut rest) = part
                .split_once('[')
                .map_or((part, ""), |(n, _)| (n, &part[n.len()..]));
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(bad());
            }
            segments.push(Segment::Key(name.to_string()));
            while !rest.is_empty() {
                let (index, after) = rest
                    .strip_prefix('[')
                    .and_then(|r| r.split_once(']'))
                    .ok_or_else(bad)?;
                segments.push(Segment::Index(index.parse().map_err(|_| bad())?));
                rest = after;
            }
        }
        Ok(Self {
            text: text.to_string(),
            segments,
        })
    }

    /// The request itself: what a root `merge` fills.
    fn root() -> Self {
        Self {
            text: String::new(),
            segments: vec![],
        }
    }

    pub(crate) fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether `self` is `other` or lies inside it (`a.b[0]` within `a.b`).
    fn within(&self, other: &JobPath) -> bool {
        self.segments.starts_with(&other.segments)
    }

    /// The value at this path, if present.
    #[cfg(test)]
    pub(crate) fn get<'v>(&self, root: &'v Value) -> Option<&'v Value> {
        self.segments.iter().try_fold(root, |v, s| match s {
            Segment::Key(k) => v.get(k),
            Segment::Index(i) => v.get(i),
        })
    }

    /// Sets the value at this path, making missing objects and lists on the way;
    /// a list index may only append at the end.
    pub(crate) fn set(&self, root: &mut Value, value: Value) -> Result<(), String> {
        *self.slot(root)? = value;
        Ok(())
    }

    /// Merges `value` into the value at this path: objects key by key (deeply),
    /// anything else replaces what is there.
    fn merge(&self, root: &mut Value, value: Value) -> Result<(), String> {
        merge_into(self.slot(root)?, value);
        Ok(())
    }

    /// The value at this path, made (as null) when missing.
    fn slot<'v>(&self, root: &'v mut Value) -> Result<&'v mut Value, String> {
        let mut here = root;
        for s in &self.segments {
            here = match s {
                Segment::Key(k) => {
                    if here.is_null() {
                        *here = Value::Object(Map::new());
                    }
                    let Value::Object(map) = here else {
                        return Err(format!("`{}`: `{k}` is inside a non-object", self.text));
                    };
                    map.entry(k.clone()).or_insert(Value::Null)
                }
                Segment::Index(i) => {
                    if here.is_null() {
                        *here = Value::Array(vec![]);
                    }
                    let Value::Array(list) = here else {
                        return Err(format!("`{}`: [{i}] is inside a non-list", self.text));
                    };
                    if *i == list.len() {
                        list.push(Value::Null);
                    }
                    list.get_mut(*i).ok_or_else(|| {
                        format!("`{}`: [{i}] would leave a gap in the list", self.text)
                    })?
                }
            };
        }
        Ok(here)
    }
}

/// Deep merge: keys of `value` objects go into `into` objects, the rest replaces.
fn merge_into(into: &mut Value, value: Value) {
    match (into, value) {
        (Value::Object(into), Value::Object(value)) => {
            for (k, v) in value {
                merge_into(into.entry(k).or_insert(Value::Null), v);
            }
        }
        (into, value) => *into = value,
    }
}

impl fmt::Display for JobPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Where an input goes in the request.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct FieldTarget {
    /// The field; the request itself (an empty path) for a root `merge`.
    pub path: JobPath,
    /// The input value that means "leave the field out" (numbers compare by value).
    pub omit_if: Option<Value>,
    /// A text input becomes the list of its non-empty, trimmed lines.
    pub split_lines: bool,
    /// The input is a JSON object merged into the field (objects merge key by
    /// key, everything else is replaced).
    pub merge: bool,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum FieldTargetRepr {
    Path(String),
    Full {
        #[serde(default)]
        path: Option<String>,
        #[serde(default)]
        omit_if: Option<Value>,
        #[serde(default)]
        split_lines: bool,
        #[serde(default)]
        merge: bool,
    },
}

impl TryFrom<FieldTargetRepr> for FieldTarget {
    type Error = String;
    fn try_from(repr: FieldTargetRepr) -> Result<Self, String> {
        let (path, omit_if, split_lines, merge) = match repr {
            FieldTargetRepr::Path(p) => (Some(p), None, false, false),
            FieldTargetRepr::Full {
                path,
                omit_if,
                split_lines,
                merge,
            } => (path, omit_if, split_lines, merge),
        };
        let path = match path {
            Some(p) => JobPath::parse(&p)?,
            None if merge => JobPath::root(),
            None => return Err("a field needs a `path` (or `merge`)".into()),
        };
        if merge && split_lines {
            return Err("`merge` and `split_lines` exclude each other".into());
        }
        Ok(Self {
            path,
            omit_if,
            split_lines,
            merge,
        })
    }
}

impl<'de> Deserialize<'de> for FieldTarget {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        FieldTargetRepr::deserialize(d)?
            .try_into()
            .map_err(serde::de::Error::custom)
    }
}

/// A node's `fluxlora` block: what the executor does with it and how its inputs
/// fill the request.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct JobMapping {
    pub job: JobKind,
    /// The output depends on more than the inputs (a running job): never cached,
    /// and a ComfyUI bridge re-runs it every time.
    #[serde(default)]
    pub volatile: bool,
    /// Input name → the request field it fills.
    pub fields: BTreeMap<String, FieldTarget>,
    /// Inputs the executor reads itself.
    #[serde(default)]
    pub reads: Vec<String>,
    /// Stack nodes: the input whose incoming stack this node's entry is appended to.
    #[serde(default)]
    pub chain: Option<String>,
    /// Stack nodes: an optional trained LoRA (`FLUXLORA_LORA`) used instead of
    /// the file named in `path` when connected.
    #[serde(default)]
    pub lora_input: Option<String>,
    /// Output name → what it carries.
    pub outputs: BTreeMap<String, OutputSource>,
    /// COMBO inputs filled with the LoRA folder's file names at run time.
    #[serde(default)]
    pub lora_list_inputs: Vec<String>,
    /// COMBO inputs filled with the input folder's image files at run time.
    #[serde(default)]
    pub input_list_inputs: Vec<String>,
}

/// The type passed from Train Flux LoRA to Apply LoRA: `{"path", "name", "job_id"}`.
pub(crate) const LORA_TYPE: &str = "FLUXLORA_LORA";

/// The type of an input.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum InputType {
    Int,
    Float,
    String,
    Boolean,
    /// A choice among these (empty in the file for run-time filled lists).
    Combo(Vec<String>),
    /// A type passed between nodes (`FLUXLORA_LORAS`, `IMAGE`, …).
    Other(String),
}

/// One input of a node.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct InputDef {
    pub name: String,
    pub required: bool,
    pub ty: InputType,
    /// The widget options: `default`, `min`, `max`, `step`, `tooltip`, …
    pub options: Map<String, Value>,
}

impl InputDef {
    pub(crate) fn default_value(&self) -> Option<&Value> {
        self.options.get("default")
    }

    pub(crate) fn min(&self) -> Option<f64> {
        self.options.get("min").and_then(Value::as_f64)
    }

    pub(crate) fn max(&self) -> Option<f64> {
        self.options.get("max").and_then(Value::as_f64)
    }
}

/// One output of a node.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct OutputDef {
    pub name: String,
    /// `COMBO` for a list-typed output, as ComfyUI's front end names it.
    pub ty: String,
    pub is_list: bool,
}

/// A request built from a node's inputs, ready for checking and submitting.
#[derive(Clone, Debug)]
pub(crate) enum NodeRequest {
    Train(Box<TrainConfig>),
    Sample(SampleJob),
    /// The entry a stack node appends to its chain input's stack.
    Lora(LoraChoice),
    /// A part of a request (options, dataset), as JSON.
    Part(Value),
}

/// The run-time contents of the COMBO lists written as `[]` in the files.
#[derive(Clone, Debug, Default)]
pub(crate) struct FolderLists {
    /// The LoRA folder's `.safetensors` file names.
    pub loras: Vec<String>,
    /// The input folder's image file names.
    pub input_images: Vec<String>,
}

impl FolderLists {
    /// The lists as the folders hold them now (empty for a missing folder).
    pub(crate) fn read(lora_dir: Option<&Path>, input_dir: Option<&Path>) -> Self {
        Self {
            loras: lora_dir.map(lora_names).unwrap_or_default(),
            input_images: input_dir.map(image_names).unwrap_or_default(),
        }
    }
}

/// One node: its typed inputs, outputs and job mapping, and its `/object_info` entry.
#[derive(Clone, Debug)]
pub(crate) struct NodeDef {
    pub name: String,
    /// In `input_order`: required inputs first.
    pub inputs: Vec<InputDef>,
    pub outputs: Vec<OutputDef>,
    pub mapping: JobMapping,
    /// The file's JSON, `fluxlora` block included.
    info: Map<String, Value>,
}

impl NodeDef {
    pub(crate) fn input(&self, name: &str) -> Option<&InputDef> {
        self.inputs.iter().find(|i| i.name == name)
    }

    /// The `/object_info` entry, with the run-time lists filled from `lists`.
    pub(crate) fn info(&self, lists: &FolderLists) -> Value {
        let mut info = self.info.clone();
        let fills = [
            (&self.mapping.lora_list_inputs, &lists.loras),
            (&self.mapping.input_list_inputs, &lists.input_images),
        ];
        for (inputs, names) in fills {
            for name in inputs {
                for group in ["required", "optional"] {
                    if let Some(spec) = info
                        .get_mut("input")
                        .and_then(|i| i.get_mut(group))
                        .and_then(|g| g.get_mut(name))
                    {
                        spec[0] = Value::from(names.clone());
                    }
                }
            }
        }
        Value::Object(info)
    }

    /// The input whose request field `path` (as serde_path_to_error or a
    /// validation error names it) lies in, to report an error at the input.
    pub(crate) fn input_for_path(&self, path: &str) -> Option<&str> {
        let path = JobPath::parse(path).ok()?;
        // The most specific field wins over a root merge.
        self.mapping
            .fields
            .iter()
            .filter(|(_, t)| path.within(&t.path))
            .max_by_key(|(_, t)| t.path.segments.len())
            .map(|(name, _)| name.as_str())
    }

    /// Builds this node's request from its input values (links already resolved;
    /// a stack is the JSON list of [`LoraChoice`]). Unknown inputs are ignored,
    /// missing optional ones left out. The request is parsed, not validated:
    /// the caller checks it as the native API does before submitting.
    pub(crate) fn request(&self, inputs: &Map<String, Value>) -> Result<NodeRequest, NodeError> {
        self.parse_request(self.request_json(inputs)?)
    }

    /// Parses a request built by [`Self::request_json`] (and perhaps completed
    /// by the executor) into the type this node's job takes.
    pub(crate) fn parse_request(&self, json: Value) -> Result<NodeRequest, NodeError> {
        let bad = |e: serde_path_to_error::Error<serde_json::Error>| {
            let path = e.path().to_string();
            match self.input_for_path(&path) {
                Some(input) => NodeError::BadInput {
                    node: self.name.clone(),
                    input: input.to_string(),
                    message: e.inner().to_string(),
                },
                None => NodeError::BadRequest {
                    node: self.name.clone(),
                    message: format!("`{path}`: {}", e.inner()),
                },
            }
        };
        Ok(match self.mapping.job {
            JobKind::Train => NodeRequest::Train(Box::new(
                serde_path_to_error::deserialize(json).map_err(bad)?,
            )),
            JobKind::Sample => {
                NodeRequest::Sample(serde_path_to_error::deserialize(json).map_err(bad)?)
            }
            JobKind::LoraStack => {
                NodeRequest::Lora(serde_path_to_error::deserialize(json).map_err(bad)?)
            }
            JobKind::Options => {
                // Parsed as a whole config so a misnamed field fails here.
                serde_path_to_error::deserialize::<_, TrainConfig>(json.clone()).map_err(bad)?;
                NodeRequest::Part(json)
            }
            JobKind::Dataset => {
                serde_path_to_error::deserialize::<_, DatasetConfig>(json.clone()).map_err(bad)?;
                NodeRequest::Part(json)
            }
            JobKind::LossGraph
            | JobKind::SaveImage
            | JobKind::PreviewImage
            | JobKind::LoadImage => {
                return Err(NodeError::BadRequest {
                    node: self.name.clone(),
                    message: "this node builds no request".into(),
                })
            }
        })
    }

    /// The request's JSON as the inputs fill it, before parsing.
    pub(crate) fn request_json(&self, inputs: &Map<String, Value>) -> Result<Value, NodeError> {
        let mut job = Value::Object(Map::new());
        for input in &self.inputs {
            let Some(target) = self.mapping.fields.get(&input.name) else {
                continue;
            };
            let value = match inputs.get(&input.name) {
                None | Some(Value::Null) if !input.required => continue,
                None | Some(Value::Null) => {
                    return Err(NodeError::MissingInput {
                        node: self.name.clone(),
                        input: input.name.clone(),
                    })
                }
                Some(v) => v,
            };
            if target
                .omit_if
                .as_ref()
                .is_some_and(|o| same_value(o, value))
            {
                continue;
            }
            let bad = |message: String| NodeError::BadInput {
                node: self.name.clone(),
                input: input.name.clone(),
                message,
            };
            let value = if target.split_lines {
                let Value::String(text) = value else {
                    return Err(bad("expected text".into()));
                };
                let lines: Vec<Value> = text
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(Value::from)
                    .collect();
                if lines.is_empty() {
                    continue;
                }
                Value::Array(lines)
            } else {
                value.clone()
            };
            if target.merge {
                target.path.merge(&mut job, value).map_err(bad)?;
            } else {
                target.path.set(&mut job, value).map_err(bad)?;
            }
        }
        if let Some(name) = &self.mapping.lora_input {
            match inputs.get(name).filter(|v| !v.is_null()) {
                Some(lora) => {
                    let path = lora.get("path").filter(|p| p.is_string()).ok_or_else(|| {
                        NodeError::BadInput {
                            node: self.name.clone(),
                            input: name.clone(),
                            message: "expected a trained LoRA (Train Flux LoRA's lora output)"
                                .into(),
                        }
                    })?;
                    job["path"] = path.clone();
                }
                None if job.get("path").is_none() => {
                    let file_input = self
                        .mapping
                        .fields
                        .iter()
                        .find(|(_, t)| t.path.as_str() == "path")
                        .map_or("", |(n, _)| n.as_str());
                    return Err(NodeError::BadRequest {
                        node: self.name.clone(),
                        message: format!(
                            "connect a trained LoRA to `{name}` or choose a file in `{file_input}`"
                        ),
                    });
                }
                None => {}
            }
        }
        Ok(job)
    }
}

/// JSON equality, but numbers compare by value (`0` equals `0.0`, as a browser
/// sends a float widget's zero).
fn same_value(a: &Value, b: &Value) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => x == y,
        _ => a == b,
    }
}

/// Every node that passed its checks, parsed once.
pub(crate) fn all() -> &'static [NodeDef] {
    static DEFS: OnceLock<Vec<NodeDef>> = OnceLock::new();
    DEFS.get_or_init(|| {
        parse_all()
            .into_iter()
            .filter_map(|r| {
                r.map_err(|e| tracing::error!(error = %e, "node definition left out"))
                    .ok()
            })
            .collect()
    })
}

/// The node named `name` (its ComfyUI `class_type`).
pub(crate) fn get(name: &str) -> Option<&'static NodeDef> {
    all().iter().find(|d| d.name == name)
}

/// ComfyUI's `/object_info`: node name → definition, run-time lists filled from `lists`.
pub(crate) fn object_info(lists: &FolderLists) -> Value {
    Value::Object(
        all()
            .iter()
            .map(|d| (d.name.clone(), d.info(lists)))
            .collect(),
    )
}

/// The `.safetensors` file names directly in `dir`, sorted (none when it is missing),
/// as `/v1/loras` lists them; the engine looks a bare name up in the LoRA folder.
pub(crate) fn lora_names(dir: &Path) -> Vec<String> {
    crate::server::paths::file_names_with(dir, &["safetensors"])
}

/// The image file names directly in `dir` (ComfyUI's input folder), sorted.
pub(crate) fn image_names(dir: &Path) -> Vec<String> {
    crate::server::paths::file_names_with(dir, &["png", "jpg", "jpeg", "webp"])
}

fn parse_all() -> Vec<Result<NodeDef, NodeError>> {
    NODE_FILES
        .iter()
        .map(|(file, text)| {
            parse(file, text).map_err(|message| NodeError::Definition {
                file: file.to_string(),
                message,
            })
        })
        .collect()
}

/// Parses and checks one node file.
fn parse(file: &str, text: &str) -> Result<NodeDef, String> {
    let info: Map<String, Value> = serde_json::from_str(text).map_err(|e| e.to_string())?;
    for key in REQUIRED_KEYS {
        if !info.contains_key(*key) {
            return Err(format!("missing `{key}`"));
        }
    }
    let text_of = |key: &str| {
        info[key]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| format!("`{key}` must be a string"))
    };
    let name = text_of("name")?;
    for key in ["display_name", "description", "python_module", "category"] {
        text_of(key)?;
    }
    if file.strip_suffix(".json") != Some(name.as_str()) {
        return Err(format!("file name must be `{name}.json`"));
    }
    info["output_node"]
        .as_bool()
        .ok_or("`output_node` must be true or false")?;
    let mapping: JobMapping = serde_json::from_value(
        info.get("fluxlora")
            .cloned()
            .ok_or("missing the `fluxlora` block")?,
    )
    .map_err(|e| format!("`fluxlora`: {e}"))?;
    let inputs = parse_inputs(&info)?;
    let outputs = parse_outputs(&info)?;
    let def = NodeDef {
        name,
        inputs,
        outputs,
        mapping,
        info,
    };
    check_inputs(&def)?;
    check_mapping(&def)?;
    Ok(def)
}

fn parse_inputs(info: &Map<String, Value>) -> Result<Vec<InputDef>, String> {
    let groups = info["input"]
        .as_object()
        .ok_or("`input` must be an object")?;
    let order = info["input_order"]
        .as_object()
        .ok_or("`input_order` must be an object")?;
    if !groups.contains_key("required") {
        return Err("`input` needs `required` (it may be empty)".into());
    }
    let group_names: BTreeSet<_> = groups.keys().collect();
    if group_names != order.keys().collect() {
        return Err("`input_order` must have the same groups as `input`".into());
    }
    let mut inputs = vec![];
    for group in ["required", "optional"] {
        let Some(specs) = groups.get(group) else {
            continue;
        };
        let specs = specs
            .as_object()
            .ok_or(format!("`input.{group}` must be an object"))?;
        let names: Vec<&str> = order[group]
            .as_array()
            .and_then(|a| a.iter().map(Value::as_str).collect())
            .ok_or(format!("`input_order.{group}` must be a list of names"))?;
        let unique: BTreeSet<&str> = names.iter().copied().collect();
        if unique.len() != names.len() || unique != specs.keys().map(String::as_str).collect() {
            return Err(format!(
                "`input_order.{group}` must list each input of `input.{group}` once"
            ));
        }
        for name in names {
            inputs.push(parse_input(name, group == "required", &specs[name])?);
        }
    }
    if groups.keys().any(|g| g != "required" && g != "optional") {
        return Err("`input` may only have `required` and `optional`".into());
    }
    Ok(inputs)
}

fn parse_input(name: &str, required: bool, spec: &Value) -> Result<InputDef, String> {
    let bad = |what: &str| format!("input `{name}`: {what}");
    let spec = spec
        .as_array()
        .filter(|s| (1..=2).contains(&s.len()))
        .ok_or_else(|| bad("must be [TYPE] or [TYPE, {options}]"))?;
    let ty = match &spec[0] {
        Value::String(t) => match t.as_str() {
            "INT" => InputType::Int,
            "FLOAT" => InputType::Float,
            "STRING" => InputType::String,
            "BOOLEAN" => InputType::Boolean,
            _ => InputType::Other(t.clone()),
        },
        Value::Array(options) => InputType::Combo(
            options
                .iter()
                .map(|o| o.as_str().map(str::to_string))
                .collect::<Option<_>>()
                .ok_or_else(|| bad("COMBO options must be strings"))?,
        ),
        _ => return Err(bad("the type must be a name or a list of options")),
    };
    let options = match spec.get(1) {
        None => Map::new(),
        Some(Value::Object(o)) => o.clone(),
        Some(_) => return Err(bad("options must be an object")),
    };
    Ok(InputDef {
        name: name.to_string(),
        required,
        ty,
        options,
    })
}

fn parse_outputs(info: &Map<String, Value>) -> Result<Vec<OutputDef>, String> {
    let list = |key: &str| {
        info[key]
            .as_array()
            .ok_or_else(|| format!("`{key}` must be a list"))
    };
    let (types, is_list, names) = (
        list("output")?,
        list("output_is_list")?,
        list("output_name")?,
    );
    if is_list.len() != types.len() || names.len() != types.len() {
        return Err(
            "`output`, `output_is_list` and `output_name` must have the same length".into(),
        );
    }
    if let Some(tips) = info.get("output_tooltips") {
        if tips.as_array().map(Vec::len) != Some(types.len()) {
            return Err("`output_tooltips` must be a list as long as `output`".into());
        }
    }
    types
        .iter()
        .zip(is_list)
        .zip(names)
        .map(|((ty, is_list), name)| {
            let ty = match ty {
                Value::String(t) => t.clone(),
                Value::Array(options) if options.iter().all(Value::is_string) => "COMBO".into(),
                _ => return Err("`output` entries must be type names or lists of names".into()),
            };
            Ok(OutputDef {
                name: name
                    .as_str()
                    .ok_or("`output_name` entries must be strings")?
                    .into(),
                ty,
                is_list: is_list
                    .as_bool()
                    .ok_or("`output_is_list` entries must be true or false")?,
            })
        })
        .collect()
}

/// Widget defaults fit their type, options and limits.
fn check_inputs(def: &NodeDef) -> Result<(), String> {
    for input in &def.inputs {
        let bad = |what: String| Err(format!("input `{}`: {what}", input.name));
        let default = input.default_value();
        match &input.ty {
            InputType::Int | InputType::Float => {
                let is_int = matches!(input.ty, InputType::Int);
                let number = |v: &Value| {
                    if is_int {
                        v.is_u64() || v.is_i64()
                    } else {
                        v.is_number()
                    }
                };
                for key in ["default", "min", "max", "step"] {
                    if input.options.get(key).is_some_and(|v| !number(v)) {
                        return bad(format!("`{key}` must be a number of the input's type"));
                    }
                }
                let (Some(d), Some(min), Some(max)) =
                    (default.and_then(Value::as_f64), input.min(), input.max())
                else {
                    return bad("needs `default`, `min` and `max`".into());
                };
                if !(min <= d && d <= max) {
                    return bad(format!("default {d} is outside [{min}, {max}]"));
                }
                if input
                    .options
                    .get("step")
                    .and_then(Value::as_f64)
                    .is_some_and(|s| s <= 0.0)
                {
                    return bad("`step` must be positive".into());
                }
            }
            InputType::String if !default.is_some_and(Value::is_string) => {
                return bad("needs a text `default`".into());
            }
            InputType::Boolean if !default.is_some_and(Value::is_boolean) => {
                return bad("needs a true/false `default`".into());
            }
            InputType::Combo(options) => {
                if let Some(d) = default {
                    if !d.as_str().is_some_and(|d| options.iter().any(|o| o == d)) {
                        return bad(format!("default {d} is not one of its options"));
                    }
                }
                let filled = def.mapping.lora_list_inputs.contains(&input.name)
                    || def.mapping.input_list_inputs.contains(&input.name);
                if options.is_empty() != filled {
                    return bad(
                        "options are `[]` exactly when it is in `lora_list_inputs` or `input_list_inputs`"
                            .into(),
                    );
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// The `fluxlora` block names real inputs and outputs and accounts for each.
fn check_mapping(def: &NodeDef) -> Result<(), String> {
    let m = &def.mapping;
    for input in &def.inputs {
        let roles = [
            m.fields.contains_key(&input.name),
            m.reads.contains(&input.name),
            m.chain.as_deref() == Some(input.name.as_str()),
            m.lora_input.as_deref() == Some(input.name.as_str()),
        ];
        if roles.iter().filter(|r| **r).count() != 1 {
            return Err(format!(
                "input `{}` must be exactly one of `fields`, `reads`, `chain` and `lora_input`",
                input.name
            ));
        }
    }
    for name in m
        .fields
        .keys()
        .chain(&m.reads)
        .chain(&m.lora_list_inputs)
        .chain(&m.input_list_inputs)
    {
        if def.input(name).is_none() {
            return Err(format!("`fluxlora` names `{name}`, which is no input"));
        }
    }
    if !m.fields.is_empty() && !m.job.builds_request() {
        return Err(format!("a {:?} node builds no request: use `reads`", m.job));
    }
    let paths: Vec<(&String, &FieldTarget)> = m.fields.iter().filter(|(_, t)| !t.merge).collect();
    for (i, (a, ta)) in paths.iter().enumerate() {
        for (b, tb) in &paths[i + 1..] {
            if ta.path.within(&tb.path) || tb.path.within(&ta.path) {
                return Err(format!("inputs `{a}` and `{b}` fill overlapping fields"));
            }
        }
    }
    for (name, target) in &m.fields {
        let ty = def.input(name).map(|d| &d.ty);
        if target.split_lines && ty != Some(&InputType::String) {
            return Err(format!(
                "`split_lines` on `{name}`, which is not a text input"
            ));
        }
        if target.merge && !matches!(ty, Some(InputType::Other(_))) {
            return Err(format!("`merge` on `{name}`, which is not a linked input"));
        }
    }
    let optional_of = |name: &str, ty: &str| {
        def.input(name)
            .is_some_and(|i| !i.required && i.ty == InputType::Other(ty.into()))
    };
    if let Some(chain) = &m.chain {
        if m.job != JobKind::LoraStack {
            return Err("only `lora_stack` nodes have a `chain`".into());
        }
        if !optional_of(chain, LORA_STACK_TYPE) {
            return Err(format!(
                "`chain` must be an optional {LORA_STACK_TYPE} input"
            ));
        }
    }
    if let Some(lora) = &m.lora_input {
        if m.job != JobKind::LoraStack || !optional_of(lora, LORA_TYPE) {
            return Err(format!(
                "`lora_input` must be an optional {LORA_TYPE} input of a `lora_stack` node"
            ));
        }
    }
    let names: BTreeSet<&String> = def.outputs.iter().map(|o| &o.name).collect();
    if names.len() != def.outputs.len() || names != m.outputs.keys().collect() {
        return Err("`fluxlora.outputs` must name each output once".into());
    }
    for (name, source) in &m.outputs {
        if !source.comes_from(m.job) {
            return Err(format!(
                "output `{name}`: {source:?} does not come from a {:?} node",
                m.job
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::bundle::ModelBundle;
    use crate::sample::generate::ResolvedRequest;
    use crate::sample::samplers::Sampler;
    use crate::sample::schedule::Scheduler;
    use crate::train::lr_schedule::ScheduleKind;
    use crate::train::optim::OptimizerKind;
    use serde_json::json;

    fn defs() -> Vec<NodeDef> {
        parse_all()
            .into_iter()
            .map(|r| r.unwrap_or_else(|e| panic!("{e}")))
            .collect()
    }

    fn def(name: &str) -> NodeDef {
        defs().into_iter().find(|d| d.name == name).unwrap()
    }

    /// ComfyUI's own nodes, which we implement under their names.
    const COMFY_BUILTINS: [&str; 3] = ["LoadImage", "SaveImage", "PreviewImage"];

    #[test]
    fn every_node_file_is_embedded_and_passes_its_checks() {
        let defs = defs();
        assert_eq!(all().len(), defs.len());
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("node_defs");
        let mut on_disk: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        let mut embedded: Vec<String> = NODE_FILES.iter().map(|(f, _)| f.to_string()).collect();
        on_disk.sort();
        embedded.sort();
        assert_eq!(on_disk, embedded, "node_defs/ and NODE_FILES differ");
        let displayed: BTreeMap<&str, &str> = defs
            .iter()
            .map(|d| (d.name.as_str(), d.info["display_name"].as_str().unwrap()))
            .collect();
        // The display names the issue asks for, exactly.
        for (class, display) in [
            ("FluxLoraTrain", "Train Flux LoRA"),
            ("FluxLoraTrainingOptions", "Flux LoRA Training Options"),
            ("FluxLoraDataset", "Flux LoRA Dataset"),
            ("FluxLoraApply", "Apply LoRA"),
            ("FluxLoraLiveAdapter", "Flux LoRA Live Adapter"),
            ("FluxLoraSample", "Flux Sample"),
            ("FluxLoraLossGraph", "Flux LoRA Loss Graph"),
            ("SaveImage", "Save Image"),
            ("PreviewImage", "Preview Image"),
            ("LoadImage", "Load Image"),
        ] {
            assert_eq!(displayed.get(class), Some(&display), "{class}");
        }
        assert_eq!(displayed.len(), 10);
        for d in &defs {
            let ours = !COMFY_BUILTINS.contains(&d.name.as_str());
            let (category, module) = if ours {
                ("fluxlora", "custom_nodes.fluxlora")
            } else {
                ("image", "nodes")
            };
            assert_eq!(d.info["category"], category, "{}", d.name);
            assert_eq!(d.info["python_module"], module, "{}", d.name);
            assert!(get(&d.name).is_some());
            for input in &d.inputs {
                assert!(
                    input.options.get("tooltip").is_some_and(Value::is_string),
                    "{}.{} has no tooltip",
                    d.name,
                    input.name
                );
            }
        }
        assert!(get("KSampler").is_none());
    }

    #[test]
    fn object_info_entries_have_comfyui_shape() {
        let info = object_info(&FolderLists::default());
        let info = info.as_object().unwrap();
        assert_eq!(info.len(), 10);
        for (name, entry) in info {
            assert_eq!(entry["name"], name.as_str());
            for key in REQUIRED_KEYS {
                assert!(entry.get(key).is_some(), "{name}: no `{key}`");
            }
            let n = entry["output"].as_array().unwrap().len();
            for key in ["output_is_list", "output_name"] {
                assert_eq!(entry[key].as_array().unwrap().len(), n, "{name}.{key}");
            }
            if let Some(tips) = entry.get("output_tooltips") {
                assert_eq!(tips.as_array().unwrap().len(), n, "{name}.output_tooltips");
            }
            for (group, specs) in entry["input"].as_object().unwrap() {
                let order: BTreeSet<&str> = entry["input_order"][group]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_str().unwrap())
                    .collect();
                let keys: BTreeSet<&str> = specs
                    .as_object()
                    .unwrap()
                    .keys()
                    .map(String::as_str)
                    .collect();
                assert_eq!(order, keys, "{name}: input_order.{group}");
            }
        }
        assert_eq!(info["FluxLoraTrain"]["output_node"], true);
        assert_eq!(
            info["FluxLoraTrain"]["output"],
            json!([LORA_TYPE, "STRING"])
        );
        assert_eq!(info["FluxLoraSample"]["output_node"], false);
        assert_eq!(info["SaveImage"]["output_node"], true);
        assert_eq!(info["FluxLoraApply"]["output"], json!([LORA_STACK_TYPE]));
        assert_eq!(info["FluxLoraSample"]["output"], json!(["IMAGE"]));
        assert_eq!(info["LoadImage"]["output"], json!(["IMAGE", "MASK"]));
        assert_eq!(
            info["FluxLoraSample"]["input"]["required"]["seed"][1]["max"],
            json!(u64::MAX)
        );
        assert_eq!(
            info["FluxLoraSample"]["input"]["required"]["seed"][1]["control_after_generate"],
            true
        );
    }

    #[test]
    fn combo_defaults_are_options_and_numbers_within_limits() {
        for d in defs() {
            for input in &d.inputs {
                let default = input.default_value();
                match &input.ty {
                    InputType::Combo(options) => {
                        if let Some(v) = default {
                            assert!(options.iter().any(|o| v == o), "{}.{}", d.name, input.name);
                        }
                    }
                    InputType::Int | InputType::Float => {
                        let v = default.and_then(Value::as_f64).unwrap();
                        let (min, max) = (input.min().unwrap(), input.max().unwrap());
                        assert!(min <= v && v <= max, "{}.{}", d.name, input.name);
                    }
                    _ => {}
                }
            }
        }
    }

    /// A value of a type passed between nodes, as the node making it would.
    fn linked_probe(ty: &str) -> Value {
        match ty {
            LORA_STACK_TYPE => {
                json!([{"path": "probe.safetensors", "live_job": null, "strength": 0.5}])
            }
            LORA_TYPE => {
                json!({"path": "trained.safetensors", "name": "t.safetensors", "job_id": "j"})
            }
            "FLUXLORA_DATASET" => json!({
                "folders": [{"path": "data/10_dog", "num_repeats": 2}],
                "resolution": 64,
                "enable_bucket": false,
            }),
            "FLUXLORA_TRAIN_OPTIONS" => {
                json!({"optimizer": {"kind": "lion"}, "dataset": {"flip_aug": true}})
            }
            "IMAGE" => json!([{"filename": "x.png", "subfolder": "", "type": "input"}]),
            other => panic!("no probe value for {other}"),
        }
    }

    /// A value for `input` that the mapping does not omit.
    fn probe(input: &InputDef, target: Option<&FieldTarget>) -> Value {
        let omitted = |v: &Value| {
            target
                .and_then(|t| t.omit_if.as_ref())
                .is_some_and(|o| same_value(o, v))
        };
        let default = input.default_value().filter(|v| !omitted(v)).cloned();
        match &input.ty {
            _ if target.is_some_and(|t| t.split_lines) => json!("first line\n\n second line "),
            InputType::String => default.filter(|v| v != "").unwrap_or(json!("probe text")),
            InputType::Int | InputType::Float => {
                default.unwrap_or_else(|| input.options.get("step").cloned().unwrap_or(json!(1)))
            }
            InputType::Combo(options) => default
                .or_else(|| {
                    options
                        .iter()
                        .find(|o| !omitted(&json!(o)))
                        .map(|o| json!(o))
                })
                .unwrap_or(json!("probe.safetensors")),
            InputType::Boolean => default.unwrap(),
            InputType::Other(t) => linked_probe(t),
        }
    }

    fn request_value(r: &NodeRequest) -> Value {
        match r {
            NodeRequest::Train(c) => serde_json::to_value(c.as_ref()),
            NodeRequest::Sample(s) => serde_json::to_value(s),
            NodeRequest::Lora(l) => serde_json::to_value(l),
            NodeRequest::Part(p) => Ok(p.clone()),
        }
        .unwrap()
    }

    /// Whether `got` holds everything of `sent` (objects key by key, numbers by value).
    fn holds(got: Option<&Value>, sent: &Value) -> bool {
        match (got, sent) {
            (Some(Value::Object(g)), Value::Object(s)) => {
                s.iter().all(|(k, v)| holds(g.get(k), v) || v.is_null())
            }
            (Some(Value::Array(g)), Value::Array(s)) => {
                g.len() == s.len() && g.iter().zip(s).all(|(g, s)| holds(Some(g), s))
            }
            (Some(g), s) => match (g.as_f64(), s.as_f64()) {
                (Some(a), Some(b)) => (a - b).abs() <= 1e-6 * b.abs(),
                _ => g == s,
            },
            (None, _) => false,
        }
    }

    fn requesting() -> impl Iterator<Item = NodeDef> {
        defs()
            .into_iter()
            .filter(|d| d.mapping.job.builds_request())
    }

    /// Every mapped path names a field of the Rust request type: the request types
    /// refuse unknown fields, and the value comes back at the same path when the
    /// parsed request is serialized again (so a renamed or aliased field fails too).
    #[test]
    fn field_mappings_name_real_request_fields() {
        for d in requesting() {
            // A connected trained LoRA replaces `path`: probed in its own test.
            let inputs: Map<String, Value> = d
                .inputs
                .iter()
                .filter(|i| d.mapping.lora_input.as_ref() != Some(&i.name))
                .map(|i| (i.name.clone(), probe(i, d.mapping.fields.get(&i.name))))
                .collect();
            let request = d
                .request(&inputs)
                .unwrap_or_else(|e| panic!("{}: {e}", d.name));
            let back = request_value(&request);
            for (name, target) in &d.mapping.fields {
                let sent = if target.split_lines {
                    json!(["first line", "second line"])
                } else {
                    inputs[name].clone()
                };
                let got = if target.merge {
                    Some(&back)
                } else {
                    target.path.get(&back)
                };
                assert!(
                    holds(got, &sent),
                    "{}.{name} → {}: sent {sent}, read back {got:?}",
                    d.name,
                    target.path
                );
            }
        }
    }

    #[test]
    fn a_mapping_to_a_missing_field_is_caught() {
        let mut d = def("FluxLoraTrain");
        d.mapping.fields.get_mut("network_dim").unwrap().path =
            JobPath::parse("network.dim").unwrap();
        let inputs: Map<String, Value> = d
            .inputs
            .iter()
            .map(|i| (i.name.clone(), probe(i, d.mapping.fields.get(&i.name))))
            .collect();
        match d.request(&inputs) {
            Err(NodeError::BadInput { input, message, .. }) => {
                assert_eq!(input, "network_dim");
                assert!(message.contains("dim"), "{message}");
            }
            other => panic!("expected an unknown-field error, got {other:?}"),
        }
    }

    fn default_inputs(d: &NodeDef) -> Map<String, Value> {
        let mut inputs: Map<String, Value> = d
            .inputs
            .iter()
            .filter_map(|i| match &i.ty {
                InputType::Other(t) if i.required => Some((i.name.clone(), linked_probe(t))),
                _ => Some((i.name.clone(), i.default_value()?.clone())),
            })
            .collect();
        for (k, v) in [
            ("prompt", json!("a photo of a dog")),
            ("lora_name", json!("dog.safetensors")),
            ("job_id", json!("abc-0001")),
        ] {
            if d.input(k).is_some() {
                inputs.insert(k.into(), v);
            }
        }
        inputs
    }

    /// A whole training config with this part merged in (the options node's part
    /// goes in at the root, the dataset node's under `dataset`).
    fn with_part(d: &NodeDef, part: &Value) -> TrainConfig {
        let mut cfg = json!({"dataset": linked_probe("FLUXLORA_DATASET"), "max_train_steps": 10});
        match d.mapping.job {
            JobKind::Options => JobPath::root().merge(&mut cfg, part.clone()).unwrap(),
            _ => JobPath::parse("dataset")
                .unwrap()
                .merge(&mut cfg, part.clone())
                .unwrap(),
        }
        serde_json::from_value(cfg).unwrap()
    }

    fn assert_valid(d: &NodeDef, inputs: &Map<String, Value>, what: &str) {
        let request = d.request(inputs).unwrap_or_else(|e| panic!("{what}: {e}"));
        match request {
            NodeRequest::Train(cfg) => cfg.validate().unwrap_or_else(|e| panic!("{what}: {e}")),
            NodeRequest::Sample(job) => {
                ResolvedRequest::with_defaults(&job.request, &ModelBundle::tiny_defaults())
                    .unwrap_or_else(|e| panic!("{what}: {e}"));
                assert!(job.loras.iter().all(|l| l.strength.is_finite()));
            }
            NodeRequest::Lora(l) => assert!(l.path.is_some() != l.live_job.is_some(), "{what}"),
            NodeRequest::Part(part) => with_part(d, &part)
                .validate()
                .unwrap_or_else(|e| panic!("{what}: {e}")),
        }
    }

    /// Defaults, and each numeric input at its min and max, make requests that pass
    /// the engine's own checks (training below 256 px needs buckets off; a warmup
    /// needs a schedule that has one).
    #[test]
    fn widget_defaults_and_limits_make_valid_requests() {
        for d in requesting() {
            let inputs = default_inputs(&d);
            assert_valid(&d, &inputs, &format!("{} defaults", d.name));
            let mut base = inputs.clone();
            match d.name.as_str() {
                "FluxLoraDataset" => {
                    base.insert("enable_bucket".into(), json!(false));
                }
                "FluxLoraTrainingOptions" => {
                    base.insert("lr_scheduler".into(), json!("constant_with_warmup"));
                }
                _ => {}
            }
            for input in &d.inputs {
                if !matches!(input.ty, InputType::Int | InputType::Float) {
                    continue;
                }
                for key in ["min", "max"] {
                    let mut inputs = base.clone();
                    inputs.insert(input.name.clone(), input.options[key].clone());
                    assert_valid(&d, &inputs, &format!("{}.{} at {key}", d.name, input.name));
                }
            }
        }
    }

    fn options_of(d: &NodeDef, name: &str) -> Vec<String> {
        match &d.input(name).unwrap().ty {
            InputType::Combo(o) => o.clone(),
            other => panic!("{name} is {other:?}"),
        }
    }

    #[test]
    fn combos_offer_exactly_the_names_the_config_accepts() {
        let d = def("FluxLoraTrainingOptions");
        use OptimizerKind as O;
        // Exhaustive: a new optimizer does not compile here until the node offers it.
        let kinds = [
            O::Adamw,
            O::Adamw8bit,
            O::Lion,
            O::Lion8bit,
            O::SgdNesterov,
            O::SgdNesterov8bit,
            O::Adafactor,
            O::Prodigy,
        ];
        for k in kinds {
            match k {
                O::Adamw
                | O::Adamw8bit
                | O::Lion
                | O::Lion8bit
                | O::SgdNesterov
                | O::SgdNesterov8bit
                | O::Adafactor
                | O::Prodigy => {}
            }
        }
        let names: Vec<String> = kinds.iter().map(|k| k.name().to_string()).collect();
        assert_eq!(options_of(&d, "optimizer"), names);
        use ScheduleKind as S;
        let kinds = [
            S::Constant,
            S::ConstantWithWarmup,
            S::Linear,
            S::Cosine,
            S::CosineWithRestarts,
            S::Polynomial,
        ];
        for k in kinds {
            match k {
                S::Constant
                | S::ConstantWithWarmup
                | S::Linear
                | S::Cosine
                | S::CosineWithRestarts
                | S::Polynomial => {}
            }
        }
        let names: Vec<Value> = kinds
            .iter()
            .map(|k| serde_json::to_value(k).unwrap())
            .collect();
        assert_eq!(
            Value::from(options_of(&d, "lr_scheduler")),
            Value::Array(names)
        );
        // Every other combo value parses as its field (the default-free ones).
        for (input, field) in [
            ("timestep_sampling", "objective.timestep_sampling"),
            ("network_targets", "network.targets"),
            ("train_blocks", "network.train_blocks"),
            ("mixed_precision", "mixed_precision"),
        ] {
            for option in options_of(&d, input) {
                if option == "model" {
                    continue;
                }
                let mut cfg = json!({});
                JobPath::parse(field)
                    .unwrap()
                    .set(&mut cfg, json!(option))
                    .unwrap();
                serde_json::from_value::<TrainConfig>(cfg)
                    .unwrap_or_else(|e| panic!("{input} = {option}: {e}"));
            }
        }
    }

    #[test]
    fn folder_lists_fill_the_loaders() {
        let dir = tempfile::tempdir().unwrap();
        for f in [
            "b.safetensors",
            "a.safetensors",
            "notes.txt",
            "c.ckpt",
            "x.PNG",
            "y.jpg",
        ] {
            std::fs::write(dir.path().join(f), b"x").unwrap();
        }
        std::fs::create_dir(dir.path().join("sub.png")).unwrap();
        let lists = FolderLists::read(Some(dir.path()), Some(dir.path()));
        assert_eq!(lists.loras, ["a.safetensors", "b.safetensors"]);
        assert_eq!(lists.input_images, ["x.PNG", "y.jpg"]);
        assert!(lora_names(&dir.path().join("missing")).is_empty());
        let info = object_info(&lists);
        let apply = &info["FluxLoraApply"]["input"]["optional"]["lora_name"];
        assert_eq!(apply[0], json!(lists.loras));
        assert_eq!(
            info["LoadImage"]["input"]["required"]["image"][0],
            json!(lists.input_images)
        );
        assert_eq!(
            info["LoadImage"]["input"]["required"]["image"][1]["image_upload"],
            true
        );
        // The embedded definitions stay unfilled.
        assert_eq!(
            object_info(&FolderLists::default())["FluxLoraApply"]["input"]["optional"]["lora_name"]
                [0],
            json!([])
        );
    }

    #[test]
    fn requests_follow_the_mapping() {
        let train = def("FluxLoraTrain");
        let mut inputs = default_inputs(&train);
        inputs.insert("network_dim".into(), json!(8));
        inputs.insert(
            "sample_prompt".into(),
            json!("a sks dog --d 1\n\na sks cat"),
        );
        inputs.insert("options".into(), linked_probe("FLUXLORA_TRAIN_OPTIONS"));
        let NodeRequest::Train(cfg) = train.request(&inputs).unwrap() else {
            panic!()
        };
        assert_eq!(cfg.dataset.folders[0].path, Path::new("data/10_dog"));
        assert_eq!(cfg.dataset.folders[0].num_repeats, Some(2));
        assert!(cfg.dataset.flip_aug, "the options merge into the dataset");
        assert_eq!(cfg.optimizer.kind, OptimizerKind::Lion);
        assert_eq!(cfg.network.rank, 8);
        assert_eq!(cfg.sample_prompts, ["a sks dog --d 1", "a sks cat"]);
        assert_eq!(cfg.max_train_steps, Some(1000));
        assert_eq!(train.input_for_path("optimizer.kind"), Some("options"));
        assert_eq!(train.input_for_path("network.rank"), Some("network_dim"));
        assert_eq!(
            train.input_for_path("dataset.folders[0].path"),
            Some("dataset")
        );

        let options = def("FluxLoraTrainingOptions");
        let mut inputs = default_inputs(&options);
        inputs.insert("lr_warmup_steps".into(), json!(0));
        let NodeRequest::Part(part) = options.request(&inputs).unwrap() else {
            panic!()
        };
        assert_eq!(
            part["optimizer"],
            json!({"kind": "adamw"}),
            "-1 leaves weight decay unset"
        );
        assert!(
            part.get("mixed_precision").is_none(),
            "`model` leaves it to the executor"
        );
        assert!(
            part.get("save_every_n_steps").is_none(),
            "0 leaves it unset"
        );
        inputs.insert("optimizer".into(), json!("sgd"));
        assert!(matches!(
            options.request(&inputs),
            Err(NodeError::BadInput { input, .. }) if input == "optimizer"
        ));

        let sampler = def("FluxLoraSample");
        let mut inputs = default_inputs(&sampler);
        inputs.insert("guidance".into(), json!(0)); // a browser's 0.0
        inputs.insert("width".into(), json!(512));
        let NodeRequest::Sample(job) = sampler.request(&inputs).unwrap() else {
            panic!()
        };
        assert_eq!((job.request.width, job.request.height), (Some(512), None));
        assert_eq!(job.request.guidance, None);
        assert!(job.loras.is_empty());
        assert_eq!(
            (job.request.sampler, job.request.scheduler),
            (Sampler::Euler, Scheduler::Simple),
            "the defaults of the combos"
        );
        // The combos offer exactly the sampling core's names.
        let optional = &sampler.info["input"]["optional"];
        let names: Vec<&str> = Sampler::ALL.iter().map(|s| s.name()).collect();
        assert_eq!(optional["sampler_name"][0], json!(names));
        let names: Vec<&str> = Scheduler::ALL.iter().map(|s| s.name()).collect();
        assert_eq!(optional["scheduler"][0], json!(names));
        inputs.insert("sampler_name".into(), json!("dpmpp_2m"));
        inputs.insert("scheduler".into(), json!("beta"));
        let NodeRequest::Sample(job) = sampler.request(&inputs).unwrap() else {
            panic!()
        };
        assert_eq!(
            (job.request.sampler, job.request.scheduler),
            (Sampler::Dpmpp2m, Scheduler::Beta)
        );
        inputs.remove("prompt");
        assert!(matches!(
            sampler.request(&inputs),
            Err(NodeError::MissingInput { input, .. }) if input == "prompt"
        ));
        inputs.insert("prompt".into(), json!("x"));
        inputs.insert("steps".into(), json!("many"));
        assert!(matches!(
            sampler.request(&inputs),
            Err(NodeError::BadInput { input, .. }) if input == "steps"
        ));

        let apply = def("FluxLoraApply");
        let inputs = json!({"lora_name": "dog.safetensors", "strength": -0.5});
        let NodeRequest::Lora(choice) = apply.request(inputs.as_object().unwrap()).unwrap() else {
            panic!()
        };
        assert_eq!(choice.path.as_deref(), Some(Path::new("dog.safetensors")));
        assert_eq!((choice.live_job, choice.strength), (None, -0.5));
        assert_eq!(apply.mapping.chain.as_deref(), Some("loras"));
        // A connected trained LoRA wins over the file name.
        let inputs = json!({"lora_name": "dog.safetensors", "strength": 1.0, "lora": linked_probe(LORA_TYPE)});
        let NodeRequest::Lora(choice) = apply.request(inputs.as_object().unwrap()).unwrap() else {
            panic!()
        };
        assert_eq!(
            choice.path.as_deref(),
            Some(Path::new("trained.safetensors"))
        );
        let neither = json!({"strength": 1.0});
        let err = apply
            .request(neither.as_object().unwrap())
            .unwrap_err()
            .to_string();
        assert!(err.contains("lora") && err.contains("lora_name"), "{err}");
        let bad = json!({"strength": 1.0, "lora": "x.safetensors"});
        assert!(matches!(
            apply.request(bad.as_object().unwrap()),
            Err(NodeError::BadInput { input, .. }) if input == "lora"
        ));
        assert!(def("SaveImage").request(&Map::new()).is_err());
    }

    #[test]
    fn broken_definitions_are_refused() {
        let (_, text) = NODE_FILES
            .iter()
            .find(|(f, _)| *f == "FluxLoraApply.json")
            .unwrap();
        let good: Value = serde_json::from_str(text).unwrap();
        let broken = |edit: &dyn Fn(&mut Value)| {
            let mut v = good.clone();
            edit(&mut v);
            parse("FluxLoraApply.json", &v.to_string()).unwrap_err()
        };
        assert!(broken(&|v| {
            v.as_object_mut().unwrap().remove("category");
        })
        .contains("category"));
        assert!(broken(&|v| v["output_is_list"] = json!([false, false])).contains("same length"));
        assert!(broken(&|v| v["input_order"]["required"] = json!([])).contains("input_order"));
        assert!(
            broken(&|v| v["input"]["required"]["strength"][1]["default"] = json!(11.0))
                .contains("outside")
        );
        assert!(
            broken(&|v| v["fluxlora"]["fields"]["strength"] = json!("strength[x]"))
                .contains("path")
        );
        assert!(broken(&|v| v["fluxlora"]["fields"]["loras"] = json!("x")).contains("exactly one"));
        assert!(broken(&|v| v["fluxlora"]["reads"] = json!(["strength"])).contains("exactly one"));
        assert!(
            broken(&|v| v["fluxlora"]["outputs"] = json!({"stack": "lora_stack"}))
                .contains("outputs")
        );
        assert!(
            broken(&|v| v["fluxlora"]["outputs"] = json!({"loras": "images"}))
                .contains("does not come")
        );
        assert!(
            broken(&|v| v["fluxlora"]["lora_list_inputs"] = json!([])).contains("lora_list_inputs")
        );
        assert!(broken(
            &|v| v["fluxlora"]["fields"]["strength"] = json!({"path": "strength", "merge": true})
        )
        .contains("merge"));
        assert!(broken(&|v| v["fluxlora"]["job"] = json!("save_image")).contains("no request"));
        assert!(broken(&|v| v["name"] = json!("Other")).contains("file name"));
        let combo = broken(&|v| {
            v["input"]["required"]["strength"] =
                json!([["a", "b"], {"default": "c", "tooltip": "t"}]);
        });
        assert!(combo.contains("not one of its options"), "{combo}");
    }

    #[test]
    fn job_paths_set_and_merge_nested_fields() {
        let mut v = json!({});
        JobPath::parse("a.b[0].c")
            .unwrap()
            .set(&mut v, json!(1))
            .unwrap();
        JobPath::parse("a.d")
            .unwrap()
            .set(&mut v, json!("x"))
            .unwrap();
        assert_eq!(v, json!({"a": {"b": [{"c": 1}], "d": "x"}}));
        JobPath::root()
            .merge(&mut v, json!({"a": {"d": "y", "e": 2}, "f": [1]}))
            .unwrap();
        assert_eq!(
            v,
            json!({"a": {"b": [{"c": 1}], "d": "y", "e": 2}, "f": [1]})
        );
        assert!(JobPath::parse("a.b[2]")
            .unwrap()
            .set(&mut v, json!(0))
            .is_err());
        assert!(JobPath::parse("a.d.e")
            .unwrap()
            .set(&mut v, json!(0))
            .is_err());
        for bad in ["", "a..b", "a[", "a[x]", "a b", "[0]"] {
            assert!(JobPath::parse(bad).is_err(), "{bad}");
        }
    }
}
