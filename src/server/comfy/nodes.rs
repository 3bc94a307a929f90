//! Node definitions: the top-level `node_defs/*.json` files, embedded in the
//! binary, one per ComfyUI node.
//!
//! Each file is the node's ComfyUI `/object_info` entry (the shape ComfyUI's
//! `server.py` `node_info` returns) plus a `fluxlora` block saying which job the
//! node becomes and which field of that job's request each input fills:
//!
//! ```json
//! "fluxlora": {
//!   "job": "train" | "sample" | "lora_stack",
//!   "fields": { "seed": "seed", "width": {"path": "request.width", "omit_if": 0} },
//!   "chain": "loras",
//!   "outputs": { "job_id": "job_id" },
//!   "lora_list_inputs": ["lora_name"], "lora_list_outputs": []
//! }
//! ```
//!
//! - `fields` paths are JSON paths into the request of the job: a
//!   [`TrainConfig`] for `train`, a [`SampleJob`] for `sample`, and one
//!   [`LoraChoice`] for `lora_stack` (a node that adds one entry to a stack of
//!   type [`LORA_STACK_TYPE`], a JSON list of `LoraChoice`). A field given as an
//!   object may set `omit_if` (the widget value meaning "unset": ComfyUI widgets
//!   cannot be empty, the request's `Option`s can) and `split_lines` (a multiline
//!   text becomes a list of its non-empty lines).
//! - `chain` (stack nodes) names the input whose incoming stack the new entry is
//!   appended to; `outputs` says what each output carries ([`OutputSource`]).
//! - `lora_list_inputs` / `lora_list_outputs` are COMBO inputs and list-typed
//!   outputs written as `[]` and filled at run time with the LoRA folder's file
//!   names, as ComfyUI fills its loaders from `folder_paths`. A list-typed output
//!   is ComfyUI's way to feed a COMBO input (the backend compares the lists, the
//!   front end shows both as `COMBO`); so the trainer's `lora_name` output
//!   connects to a loader's `lora_name`.
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

/// Every node file: (file name, contents). A test checks `node_defs/` has no others.
const NODE_FILES: &[(&str, &str)] = &[
    (
        "FluxLoraTrain.json",
        include_str!("../../../node_defs/FluxLoraTrain.json"),
    ),
    (
        "FluxLoraLoader.json",
        include_str!("../../../node_defs/FluxLoraLoader.json"),
    ),
    (
        "FluxLoraLiveAdapter.json",
        include_str!("../../../node_defs/FluxLoraLiveAdapter.json"),
    ),
    (
        "FluxLoraSampler.json",
        include_str!("../../../node_defs/FluxLoraSampler.json"),
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

/// Which job a node becomes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    /// A training run: the request is a [`TrainConfig`].
    Train,
    /// A sampling job: the request is a [`SampleJob`].
    Sample,
    /// No job: one [`LoraChoice`] appended to the incoming stack.
    LoraStack,
}

/// What a node's output carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum OutputSource {
    /// The id of the submitted job.
    JobId,
    /// The file name a training job writes to the LoRA folder when it finishes
    /// (`<output_name>.safetensors`).
    LoraFile,
    /// The images of a sampling job.
    Images,
    /// The incoming stack with this node's [`LoraChoice`] appended.
    LoraStack,
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

    pub(crate) fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether `self` is `other` or lies inside it (`a.b[0]` within `a.b`).
    fn within(&self, other: &JobPath) -> bool {
        self.segments.starts_with(&other.segments)
    }

    /// The value at this path, if present.
    pub(crate) fn get<'v>(&self, root: &'v Value) -> Option<&'v Value> {
        self.segments.iter().try_fold(root, |v, s| match s {
            Segment::Key(k) => v.get(k),
            Segment::Index(i) => v.get(i),
        })
    }

    /// Sets the value at this path, making missing objects and lists on the way;
    /// a list index may only append at the end.
    pub(crate) fn set(&self, root: &mut Value, value: Value) -> Result<(), String> {
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
        *here = value;
        Ok(())
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
    pub path: JobPath,
    /// The input value that means "leave the field out" (numbers compare by value).
    pub omit_if: Option<Value>,
    /// A text input becomes the list of its non-empty, trimmed lines.
    pub split_lines: bool,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum FieldTargetRepr {
    Path(String),
    Full {
        path: String,
        #[serde(default)]
        omit_if: Option<Value>,
        #[serde(default)]
        split_lines: bool,
    },
}

impl TryFrom<FieldTargetRepr> for FieldTarget {
    type Error = String;
    fn try_from(repr: FieldTargetRepr) -> Result<Self, String> {
        let (path, omit_if, split_lines) = match repr {
            FieldTargetRepr::Path(p) => (p, None, false),
            FieldTargetRepr::Full {
                path,
                omit_if,
                split_lines,
            } => (path, omit_if, split_lines),
        };
        Ok(Self {
            path: JobPath::parse(&path)?,
            omit_if,
            split_lines,
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

/// A node's `fluxlora` block: which job it becomes and how its inputs fill it.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct JobMapping {
    pub job: JobKind,
    /// Input name → the request field it fills.
    pub fields: BTreeMap<String, FieldTarget>,
    /// Stack nodes: the input whose incoming stack this node's entry is appended to.
    #[serde(default)]
    pub chain: Option<String>,
    /// Output name → what it carries.
    pub outputs: BTreeMap<String, OutputSource>,
    /// COMBO inputs filled with the LoRA folder's file names at run time.
    #[serde(default)]
    pub lora_list_inputs: Vec<String>,
    /// Outputs whose type is the list of the LoRA folder's file names.
    #[serde(default)]
    pub lora_list_outputs: Vec<String>,
}

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
}

/// One node: its typed inputs, outputs and job mapping, and its `/object_info` entry.
#[derive(Clone, Debug)]
pub(crate) struct NodeDef {
    pub name: String,
    pub output_node: bool,
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

    /// The `/object_info` entry, with the LoRA lists filled with `lora_names`.
    pub(crate) fn info(&self, lora_names: &[String]) -> Value {
        let names = Value::from(lora_names.to_vec());
        let mut info = self.info.clone();
        for name in &self.mapping.lora_list_inputs {
            for group in ["required", "optional"] {
                if let Some(spec) = info
                    .get_mut("input")
                    .and_then(|i| i.get_mut(group))
                    .and_then(|g| g.get_mut(name))
                {
                    spec[0] = names.clone();
                }
            }
        }
        for name in &self.mapping.lora_list_outputs {
            if let Some(i) = self.outputs.iter().position(|o| &o.name == name) {
                info["output"][i] = names.clone();
            }
        }
        Value::Object(info)
    }

    /// The input whose request field `path` (as serde_path_to_error or a
    /// validation error names it) lies in, to report an error at the input.
    pub(crate) fn input_for_path(&self, path: &str) -> Option<&str> {
        let path = JobPath::parse(path).ok()?;
        self.mapping
            .fields
            .iter()
            .find(|(_, t)| path.within(&t.path))
            .map(|(name, _)| name.as_str())
    }

    /// Builds this node's request from its input values (links already resolved;
    /// a stack is the JSON list of [`LoraChoice`]). Unknown inputs are ignored,
    /// missing optional ones left out. The request is parsed, not validated:
    /// the caller checks it as the native API does before submitting.
    pub(crate) fn request(&self, inputs: &Map<String, Value>) -> Result<NodeRequest, NodeError> {
        let json = self.request_json(inputs)?;
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
        })
    }

    fn request_json(&self, inputs: &Map<String, Value>) -> Result<Value, NodeError> {
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
            target.path.set(&mut job, value).map_err(bad)?;
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

/// ComfyUI's `/object_info`: node name → definition, LoRA lists filled with `lora_names`.
pub(crate) fn object_info(lora_names: &[String]) -> Value {
    Value::Object(
        all()
            .iter()
            .map(|d| (d.name.clone(), d.info(lora_names)))
            .collect(),
    )
}

/// The `.safetensors` file names directly in `dir`, sorted (none when it is missing),
/// as `/v1/loras` lists them; the engine looks a bare name up in the LoRA folder.
pub(crate) fn lora_names(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return vec![];
    };
    let mut names: Vec<String> = entries
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    names
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
    let output_node = info["output_node"]
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
        output_node,
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
                if options.is_empty() != def.mapping.lora_list_inputs.contains(&input.name) {
                    return bad("options are `[]` exactly when it is in `lora_list_inputs`".into());
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
        let mapped = m.fields.contains_key(&input.name);
        let chained = m.chain.as_deref() == Some(input.name.as_str());
        if mapped == chained {
            return Err(format!(
                "input `{}` must be in `fluxlora.fields` or be its `chain`, not both",
                input.name
            ));
        }
    }
    for name in m.fields.keys().chain(&m.lora_list_inputs) {
        if def.input(name).is_none() {
            return Err(format!("`fluxlora` names `{name}`, which is no input"));
        }
    }
    let paths: Vec<(&String, &FieldTarget)> = m.fields.iter().collect();
    for (i, (a, ta)) in paths.iter().enumerate() {
        for (b, tb) in &paths[i + 1..] {
            if ta.path.within(&tb.path) || tb.path.within(&ta.path) {
                return Err(format!("inputs `{a}` and `{b}` fill overlapping fields"));
            }
        }
        let is_text = def.input(a).is_some_and(|d| d.ty == InputType::String);
        if ta.split_lines && !is_text {
            return Err(format!("`split_lines` on `{a}`, which is not a text input"));
        }
    }
    match (&m.chain, m.job) {
        (Some(chain), JobKind::LoraStack) => {
            let input = def
                .input(chain)
                .ok_or(format!("`chain` `{chain}` is no input"))?;
            if input.required || input.ty != InputType::Other(LORA_STACK_TYPE.into()) {
                return Err(format!(
                    "`chain` must be an optional {LORA_STACK_TYPE} input"
                ));
            }
        }
        (Some(_), _) => return Err("only `lora_stack` nodes have a `chain`".into()),
        (None, _) => {}
    }
    let names: BTreeSet<&String> = def.outputs.iter().map(|o| &o.name).collect();
    if names.len() != def.outputs.len() || names != m.outputs.keys().collect() {
        return Err("`fluxlora.outputs` must name each output once".into());
    }
    for (name, source) in &m.outputs {
        let fits = match source {
            OutputSource::JobId => m.job != JobKind::LoraStack,
            OutputSource::LoraFile => m.job == JobKind::Train,
            OutputSource::Images => m.job == JobKind::Sample,
            OutputSource::LoraStack => m.job == JobKind::LoraStack,
        };
        if !fits {
            return Err(format!(
                "output `{name}`: {source:?} does not come from a {:?} node",
                m.job
            ));
        }
        let lora_list = def
            .outputs
            .iter()
            .any(|o| &o.name == name && o.ty == "COMBO");
        if lora_list != m.lora_list_outputs.contains(name) {
            return Err(format!(
                "output `{name}`: list-typed exactly when it is in `lora_list_outputs`"
            ));
        }
    }
    for name in &m.lora_list_outputs {
        if !names.contains(name) {
            return Err(format!(
                "`lora_list_outputs` names `{name}`, which is no output"
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
        let names: Vec<&str> = defs.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "FluxLoraTrain",
                "FluxLoraLoader",
                "FluxLoraLiveAdapter",
                "FluxLoraSampler"
            ]
        );
        for d in &defs {
            assert_eq!(d.info["category"], "fluxlora");
            assert_eq!(d.info["python_module"], "custom_nodes.fluxlora");
            assert!(get(&d.name).is_some());
        }
        assert!(get("KSampler").is_none());
    }

    #[test]
    fn object_info_entries_have_comfyui_shape() {
        let info = object_info(&[]);
        let info = info.as_object().unwrap();
        assert_eq!(info.len(), 4);
        for (name, entry) in info {
            assert_eq!(entry["name"], name.as_str());
            for key in REQUIRED_KEYS {
                assert!(entry.get(key).is_some(), "{name}: no `{key}`");
            }
            let n = entry["output"].as_array().unwrap().len();
            for key in ["output_is_list", "output_name", "output_tooltips"] {
                assert_eq!(entry[key].as_array().unwrap().len(), n, "{name}.{key}");
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
        assert_eq!(info["FluxLoraSampler"]["output_node"], true);
        assert_eq!(info["FluxLoraLoader"]["output_node"], false);
        assert_eq!(info["FluxLoraSampler"]["output"], json!(["IMAGE"]));
        assert_eq!(info["FluxLoraLoader"]["output"], json!([LORA_STACK_TYPE]));
        assert_eq!(
            info["FluxLoraSampler"]["input"]["required"]["seed"][1]["max"],
            json!(u64::MAX)
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
                .or_else(|| options.first().map(|o| json!(o)))
                .unwrap_or(json!("probe.safetensors")),
            InputType::Boolean => default.unwrap(),
            InputType::Other(t) if t == LORA_STACK_TYPE => {
                json!([{"path": "probe.safetensors", "live_job": null, "strength": 0.5}])
            }
            InputType::Other(t) => panic!("no probe value for {t}"),
        }
    }

    fn request_value(r: &NodeRequest) -> Value {
        match r {
            NodeRequest::Train(c) => serde_json::to_value(c.as_ref()),
            NodeRequest::Sample(s) => serde_json::to_value(s),
            NodeRequest::Lora(l) => serde_json::to_value(l),
        }
        .unwrap()
    }

    /// Every mapped path names a field of the Rust request type: the request types
    /// refuse unknown fields, and the value comes back at the same path when the
    /// parsed request is serialized again (so a renamed or aliased field fails too).
    #[test]
    fn field_mappings_name_real_request_fields() {
        for d in defs() {
            let inputs: Map<String, Value> = d
                .inputs
                .iter()
                .map(|i| (i.name.clone(), probe(i, d.mapping.fields.get(&i.name))))
                .collect();
            let request = d.request(&inputs).unwrap_or_else(|e| panic!("{e}"));
            let back = request_value(&request);
            for (name, target) in &d.mapping.fields {
                let sent = if target.split_lines {
                    json!(["first line", "second line"])
                } else {
                    inputs[name].clone()
                };
                let got = target.path.get(&back);
                let same = match (got.and_then(Value::as_f64), sent.as_f64()) {
                    (Some(a), Some(b)) => (a - b).abs() <= 1e-6 * b.abs(),
                    _ => got == Some(&sent),
                };
                assert!(
                    same,
                    "{}.{name} → {}: sent {sent}, read back {got:?}",
                    d.name, target.path
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
            .filter_map(|i| Some((i.name.clone(), i.default_value()?.clone())))
            .collect();
        for (k, v) in [
            ("dataset_path", json!("data/10_dog")),
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
        }
    }

    /// Defaults, and each numeric input at its min and max, make requests that pass
    /// the engine's own checks (training below 256 px needs buckets off; a warmup
    /// needs a schedule that has one).
    #[test]
    fn widget_defaults_and_limits_make_valid_requests() {
        for d in defs() {
            let inputs = default_inputs(&d);
            assert_valid(&d, &inputs, &format!("{} defaults", d.name));
            let mut base = inputs.clone();
            if d.name == "FluxLoraTrain" {
                base.insert("enable_bucket".into(), json!(false));
                base.insert("lr_scheduler".into(), json!("constant_with_warmup"));
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

    #[test]
    fn combos_offer_exactly_the_names_the_config_accepts() {
        let d = def("FluxLoraTrain");
        let options = |name: &str| match &d.input(name).unwrap().ty {
            InputType::Combo(o) => o.clone(),
            other => panic!("{name} is {other:?}"),
        };
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
        assert_eq!(options("optimizer"), names);
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
        assert_eq!(Value::from(options("lr_scheduler")), Value::Array(names));
    }

    #[test]
    fn lora_names_fill_the_loader_and_the_trainer_output() {
        let dir = tempfile::tempdir().unwrap();
        for f in ["b.safetensors", "a.safetensors", "notes.txt", "c.ckpt"] {
            std::fs::write(dir.path().join(f), b"x").unwrap();
        }
        let names = lora_names(dir.path());
        assert_eq!(names, ["a.safetensors", "b.safetensors"]);
        assert!(lora_names(&dir.path().join("missing")).is_empty());
        let info = object_info(&names);
        let loader = &info["FluxLoraLoader"]["input"]["required"]["lora_name"];
        assert_eq!(loader[0], json!(names));
        assert_eq!(info["FluxLoraTrain"]["output"][0], json!(names));
        assert_eq!(info["FluxLoraTrain"]["output"][1], "STRING");
        // The embedded definitions stay unfilled.
        assert_eq!(
            object_info(&[])["FluxLoraLoader"]["input"]["required"]["lora_name"][0],
            json!([])
        );
    }

    #[test]
    fn requests_follow_the_mapping() {
        let train = def("FluxLoraTrain");
        let mut inputs = default_inputs(&train);
        inputs.insert("trigger_word".into(), json!("sks"));
        inputs.insert("network_dim".into(), json!(8));
        inputs.insert(
            "sample_prompt".into(),
            json!("a sks dog --d 1\n\na sks cat"),
        );
        let NodeRequest::Train(cfg) = train.request(&inputs).unwrap() else {
            panic!()
        };
        assert_eq!(cfg.dataset.folders[0].path, Path::new("data/10_dog"));
        assert_eq!(cfg.dataset.trigger_word.as_deref(), Some("sks"));
        assert_eq!(cfg.network.rank, 8);
        assert_eq!(cfg.sample_prompts, ["a sks dog --d 1", "a sks cat"]);
        assert_eq!(cfg.save_every_n_steps, None, "0 leaves it unset");
        assert_eq!(cfg.max_train_steps, Some(1000));

        let sampler = def("FluxLoraSampler");
        let mut inputs = default_inputs(&sampler);
        inputs.insert("guidance".into(), json!(0)); // a browser's 0.0
        inputs.insert("width".into(), json!(512));
        let NodeRequest::Sample(job) = sampler.request(&inputs).unwrap() else {
            panic!()
        };
        assert_eq!((job.request.width, job.request.height), (Some(512), None));
        assert_eq!(job.request.guidance, None);
        assert!(job.loras.is_empty());

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

        let loader = def("FluxLoraLoader");
        let inputs = json!({"lora_name": "dog.safetensors", "strength": -0.5});
        let NodeRequest::Lora(choice) = loader.request(inputs.as_object().unwrap()).unwrap() else {
            panic!()
        };
        assert_eq!(choice.path.as_deref(), Some(Path::new("dog.safetensors")));
        assert_eq!((choice.live_job, choice.strength), (None, -0.5));
        assert_eq!(loader.mapping.chain.as_deref(), Some("loras"));
        assert_eq!(
            train.input_for_path("dataset.folders[0].path"),
            Some("dataset_path")
        );
        assert_eq!(train.input_for_path("network.alpha"), Some("network_alpha"));
        assert_eq!(train.input_for_path("network"), None);
    }

    #[test]
    fn broken_definitions_are_refused() {
        let good: Value = serde_json::from_str(NODE_FILES[1].1).unwrap();
        let broken = |edit: &dyn Fn(&mut Value)| {
            let mut v = good.clone();
            edit(&mut v);
            parse("FluxLoraLoader.json", &v.to_string()).unwrap_err()
        };
        assert!(broken(&|v| {
            v.as_object_mut().unwrap().remove("category");
        })
        .contains("category"));
        assert!(broken(&|v| v["output_is_list"] = json!([false, false])).contains("same length"));
        assert!(
            broken(&|v| v["input_order"]["required"] = json!(["strength"])).contains("input_order")
        );
        assert!(
            broken(&|v| v["input"]["required"]["strength"][1]["default"] = json!(11.0))
                .contains("outside")
        );
        assert!(
            broken(&|v| v["fluxlora"]["fields"]["strength"] = json!("strength[x]"))
                .contains("path")
        );
        assert!(broken(&|v| v["fluxlora"]["fields"]["loras"] = json!("x")).contains("not both"));
        assert!(
            broken(&|v| v["fluxlora"]["outputs"] = json!({"stack": "lora_stack"}))
                .contains("outputs")
        );
        assert!(
            broken(&|v| v["fluxlora"]["lora_list_inputs"] = json!([])).contains("lora_list_inputs")
        );
        assert!(broken(&|v| v["name"] = json!("Other")).contains("file name"));
        let combo = broken(&|v| {
            v["input"]["required"]["strength"] = json!([["a", "b"], {"default": "c"}]);
        });
        assert!(combo.contains("not one of its options"), "{combo}");
    }

    #[test]
    fn job_paths_set_nested_fields() {
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
