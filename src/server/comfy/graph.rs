//! Prompt graphs in ComfyUI's API format: parsing, validation against node
//! definitions, execution order and output-cache signatures.
//!
//! A prompt is `{node_id: {class_type, inputs: {name: constant | [src_id, out_index]}, _meta?}}`.
//! [`validate`] checks it against definitions in ComfyUI's `/object_info`
//! shape ([`NodeDefs`]) the way ComfyUI's `execution.validate_prompt` does and
//! answers with the same error objects (`type`, `message`, `details`,
//! `extra_info`, per-node `node_errors`), so a client sees what ComfyUI would
//! tell it. On success it gives a [`PromptGraph`]: the nodes the passing
//! output nodes need, constants converted as ComfyUI converts them.
//! [`execution_order`] lists what to run for the outputs, dependencies first;
//! [`signatures`] keys every node by its class, its constants and its inputs'
//! keys, never by node ids, so an executor can reuse an output across prompts.
//!
//! The facts (and where we differ on purpose) are in `docs/comfyui-protocol.md`
//! §3–5.
//!
//! Must not: touch HTTP, jobs or tensors. Pure functions of JSON values.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Serialize, Serializer};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

/// A node's id in a prompt (ComfyUI's ids are strings: `"3"`, `"12:5"`).
pub(crate) type NodeId = String;

/// How deep links may nest before validation gives up (ComfyUI's Python
/// stops at its recursion limit of about 1000 frames too).
const MAX_LINK_DEPTH: usize = 1000;

/// Combos with more options than this are not echoed back in errors
/// (ComfyUI leaves out long model lists the same way).
const MAX_LISTED_OPTIONS: usize = 20;

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

/// ComfyUI's error `type` strings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum ErrorKind {
    /// The prompt (or a node's `inputs`) is not a JSON object.
    InvalidPrompt,
    /// A node without `class_type`, or with a class that has no definition.
    MissingNodeType,
    /// No node of an output class (after `partial_execution_targets`).
    PromptNoOutputs,
    /// Every output node failed; the per-node reasons are in `node_errors`.
    PromptOutputsFailedValidation,
    RequiredInputMissing,
    /// A link that is not `[node_id, output_index]`.
    BadLinkedInput,
    /// A link whose output type the input does not accept.
    ReturnTypeMismatch,
    /// A constant that does not convert to the input's INT/FLOAT/STRING/BOOLEAN.
    InvalidInputType,
    ValueSmallerThanMin,
    ValueBiggerThanMax,
    /// A combo value that is not one of the options.
    ValueNotInList,
    /// The node is part of a cycle of links.
    DependencyCycle,
    /// A link to a missing node or output, found on an output node.
    ExceptionDuringValidation,
    /// A link to a missing node or output, found on a node an output depends on.
    ExceptionDuringInnerValidation,
}

impl ErrorKind {
    /// The `type` string ComfyUI uses.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            ErrorKind::InvalidPrompt => "invalid_prompt",
            ErrorKind::MissingNodeType => "missing_node_type",
            ErrorKind::PromptNoOutputs => "prompt_no_outputs",
            ErrorKind::PromptOutputsFailedValidation => "prompt_outputs_failed_validation",
            ErrorKind::RequiredInputMissing => "required_input_missing",
            ErrorKind::BadLinkedInput => "bad_linked_input",
            ErrorKind::ReturnTypeMismatch => "return_type_mismatch",
            ErrorKind::InvalidInputType => "invalid_input_type",
            ErrorKind::ValueSmallerThanMin => "value_smaller_than_min",
            ErrorKind::ValueBiggerThanMax => "value_bigger_than_max",
            ErrorKind::ValueNotInList => "value_not_in_list",
            ErrorKind::DependencyCycle => "dependency_cycle",
            ErrorKind::ExceptionDuringValidation => "exception_during_validation",
            ErrorKind::ExceptionDuringInnerValidation => "exception_during_inner_validation",
        }
    }
}

impl Serialize for ErrorKind {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One error object: `{"type", "message", "details", "extra_info"}`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub(crate) struct ErrorInfo {
    #[serde(rename = "type")]
    pub kind: ErrorKind,
    pub message: String,
    pub details: String,
    pub extra_info: Value,
}

impl ErrorInfo {
    fn new(
        kind: ErrorKind,
        message: impl Into<String>,
        details: impl Into<String>,
        extra_info: Value,
    ) -> Self {
        Self {
            kind,
            message: message.into(),
            details: details.into(),
            extra_info,
        }
    }
}

/// A node's entry in `node_errors`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub(crate) struct NodeErrors {
    pub errors: Vec<ErrorInfo>,
    /// The failed output nodes that depend on this node.
    pub dependent_outputs: Vec<NodeId>,
    pub class_type: String,
}

/// A rejected prompt: serialized, it is the body of ComfyUI's 400 answer to
/// `POST /prompt` (`{"error": {...}, "node_errors": {...}}`).
#[derive(Clone, Debug, PartialEq, Serialize, thiserror::Error)]
#[error("{}: {}", .error.message, .error.details)]
pub(crate) struct PromptError {
    pub error: ErrorInfo,
    pub node_errors: BTreeMap<NodeId, NodeErrors>,
}

impl PromptError {
    fn whole(error: ErrorInfo) -> Self {
        Self {
            error,
            node_errors: BTreeMap::new(),
        }
    }
}

// ---------------------------------------------------------------------------
// Node definitions
// ---------------------------------------------------------------------------

/// The type of an input or output in a definition.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum TypeSpec {
    /// `"INT"`, `"IMAGE"`, `"*"`, a union `"IMAGE,MASK"`, `"COMBO"`.
    Named(String),
    /// A combo written as its list of allowed values (also a list-typed output).
    Options(Vec<Value>),
}

impl TypeSpec {
    fn from_json(value: &Value) -> Self {
        match value {
            Value::String(name) => TypeSpec::Named(name.clone()),
            Value::Array(options) => TypeSpec::Options(options.clone()),
            // A malformed definition: accept anything rather than reject every prompt.
            _ => TypeSpec::Named("*".into()),
        }
    }

    fn to_json(&self) -> Value {
        match self {
            TypeSpec::Named(name) => Value::String(name.clone()),
            TypeSpec::Options(options) => Value::Array(options.clone()),
        }
    }

    fn is_named(&self, name: &str) -> bool {
        matches!(self, TypeSpec::Named(n) if n == name)
    }
}

/// One declared input of a definition.
#[derive(Clone, Debug)]
struct InputDef {
    name: String,
    required: bool,
    spec: TypeSpec,
    /// The options object (`min`, `max`, `options`, `multiselect`, ...).
    options: Map<String, Value>,
}

impl InputDef {
    /// ComfyUI's `input_config`: `[type, options]`.
    fn config(&self) -> Value {
        json!([self.spec.to_json(), Value::Object(self.options.clone())])
    }
}

/// One node class: its declared inputs (required then optional, in
/// `input_order`), its output types and whether it is an output node.
#[derive(Clone, Debug)]
pub(crate) struct NodeDef {
    inputs: Vec<InputDef>,
    outputs: Vec<TypeSpec>,
    output_node: bool,
}

impl NodeDef {
    fn from_json(def: &Value) -> Option<Self> {
        let def = def.as_object()?;
        let input = def.get("input").and_then(Value::as_object);
        let order = def.get("input_order").and_then(Value::as_object);
        let mut inputs = Vec::new();
        for (category, required) in [("required", true), ("optional", false)] {
            let Some(declared) = input
                .and_then(|i| i.get(category))
                .and_then(Value::as_object)
            else {
                continue;
            };
            // `input_order` when it names the inputs, else by name (a JSON map has no order here).
            let mut names: Vec<&String> = Vec::new();
            if let Some(listed) = order
                .and_then(|o| o.get(category))
                .and_then(Value::as_array)
            {
                for name in listed.iter().filter_map(Value::as_str) {
                    if let Some((key, _)) = declared.get_key_value(name) {
                        if !names.contains(&key) {
                            names.push(key);
                        }
                    }
                }
            }
            let mut rest: Vec<&String> = declared.keys().filter(|k| !names.contains(k)).collect();
            rest.sort();
            names.extend(rest);
            for name in names {
                // A name declared twice counts once, as required (ComfyUI's `get_input_info`).
                if inputs.iter().any(|i: &InputDef| i.name == *name) {
                    continue;
                }
                let entry = &declared[name.as_str()];
                let (spec, options) = match entry {
                    Value::Array(parts) if !parts.is_empty() => (
                        TypeSpec::from_json(&parts[0]),
                        parts
                            .get(1)
                            .and_then(Value::as_object)
                            .cloned()
                            .unwrap_or_default(),
                    ),
                    other => (TypeSpec::from_json(other), Map::new()),
                };
                inputs.push(InputDef {
                    name: name.clone(),
                    required,
                    spec,
                    options,
                });
            }
        }
        let outputs = def
            .get("output")
            .and_then(Value::as_array)
            .map(|outs| outs.iter().map(TypeSpec::from_json).collect())
            .unwrap_or_default();
        let output_node = def
            .get("output_node")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        Some(Self {
            inputs,
            outputs,
            output_node,
        })
    }

    /// Whether the class is an output node (ComfyUI's `OUTPUT_NODE`).
    pub(crate) fn is_output_node(&self) -> bool {
        self.output_node
    }

    fn input(&self, name: &str) -> Option<&InputDef> {
        self.inputs.iter().find(|i| i.name == name)
    }
}

/// Node definitions by class name, read from an `/object_info` map.
#[derive(Clone, Debug, Default)]
pub(crate) struct NodeDefs {
    defs: BTreeMap<String, NodeDef>,
}

impl NodeDefs {
    /// Reads `{class: NodeDef, ...}`; entries that are not objects are left out.
    pub(crate) fn from_object_info(object_info: &Value) -> Self {
        let defs = object_info
            .as_object()
            .map(|classes| {
                classes
                    .iter()
                    .filter_map(|(class, def)| Some((class.clone(), NodeDef::from_json(def)?)))
                    .collect()
            })
            .unwrap_or_default();
        Self { defs }
    }

    pub(crate) fn get(&self, class_type: &str) -> Option<&NodeDef> {
        self.defs.get(class_type)
    }
}

// ---------------------------------------------------------------------------
// Prompt graphs
// ---------------------------------------------------------------------------

/// A link to another node's output.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct Link {
    pub node: NodeId,
    pub output: usize,
}

/// A node input: a constant or a link.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Input {
    Value(Value),
    Link(Link),
}

/// A validated node: its declared inputs only (hidden and undeclared ones are
/// dropped), constants converted to the input's type.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Node {
    pub class_type: String,
    pub inputs: BTreeMap<String, Input>,
    /// `_meta.title`, when the client gave one.
    pub title: Option<String>,
    /// Whether the node's class is an output node.
    pub output_node: bool,
}

impl Node {
    /// The links of this node, by input name.
    pub(crate) fn links(&self) -> impl Iterator<Item = (&str, &Link)> {
        self.inputs.iter().filter_map(|(name, input)| match input {
            Input::Link(link) => Some((name.as_str(), link)),
            Input::Value(_) => None,
        })
    }
}

/// A validated prompt: the output nodes that passed validation and every node
/// they depend on, with no cycles.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct PromptGraph {
    nodes: BTreeMap<NodeId, Node>,
    outputs: Vec<NodeId>,
}

impl PromptGraph {
    pub(crate) fn node(&self, id: &str) -> Option<&Node> {
        self.nodes.get(id)
    }

    /// Every node, by id.
    pub(crate) fn nodes(&self) -> impl Iterator<Item = (&NodeId, &Node)> {
        self.nodes.iter()
    }

    /// The output nodes to execute (those that passed), in node-id order.
    pub(crate) fn outputs(&self) -> &[NodeId] {
        &self.outputs
    }
}

/// The result of a prompt that passed (at least one output passed).
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Validated {
    pub graph: PromptGraph,
    /// Errors of the outputs that failed (answered with 200 as `node_errors`).
    pub node_errors: BTreeMap<NodeId, NodeErrors>,
}

/// An input as the client sent it.
#[derive(Clone, Debug)]
enum RawInput {
    Value(Value),
    Link(Link),
    /// A JSON list that is not `[string id, non-negative integer]`.
    BadLink(Value),
}

#[derive(Clone, Debug)]
struct RawNode {
    class_type: String,
    title: Option<String>,
    inputs: BTreeMap<String, RawInput>,
}

/// Node ids in a stable, human order: numeric ids numerically, then the rest by text.
pub(crate) fn id_order(a: &str, b: &str) -> Ordering {
    match (a.parse::<u64>(), b.parse::<u64>()) {
        (Ok(x), Ok(y)) => x.cmp(&y).then_with(|| a.cmp(b)),
        (Ok(_), Err(_)) => Ordering::Less,
        (Err(_), Ok(_)) => Ordering::Greater,
        (Err(_), Err(_)) => a.cmp(b),
    }
}

fn sort_ids(ids: &mut [NodeId]) {
    ids.sort_by(|a, b| id_order(a, b));
}

fn node_id_details(id: &str) -> String {
    format!("Node ID '#{id}'")
}

/// Parses the prompt object; fails on what ComfyUI rejects before looking at
/// inputs (no class, unknown class) and on values that are not objects.
fn parse(prompt: &Value, defs: &NodeDefs) -> Result<BTreeMap<NodeId, RawNode>, PromptError> {
    let Some(object) = prompt.as_object() else {
        return Err(PromptError::whole(ErrorInfo::new(
            ErrorKind::InvalidPrompt,
            "The prompt must be an object of nodes keyed by node id.",
            "",
            json!({}),
        )));
    };
    let mut ids: Vec<NodeId> = object.keys().cloned().collect();
    sort_ids(&mut ids);
    let mut nodes = BTreeMap::new();
    for id in ids {
        let node = &object[id.as_str()];
        let title = node
            .get("_meta")
            .and_then(|m| m.get("title"))
            .and_then(Value::as_str)
            .map(str::to_owned);
        let Some(class_value) = node.as_object().and_then(|n| n.get("class_type")) else {
            let shown = title.clone().unwrap_or_else(|| format!("ID #{id}"));
            return Err(PromptError::whole(ErrorInfo::new(
                ErrorKind::MissingNodeType,
                format!(
                    "Node '{shown}' has no class_type. The workflow may be corrupted or a custom node is missing."
                ),
                node_id_details(&id),
                json!({"node_id": id, "class_type": null, "node_title": title}),
            )));
        };
        let class_type = match class_value {
            Value::String(class) => class.clone(),
            other => other.to_string(),
        };
        if defs.get(&class_type).is_none() {
            let shown = title.clone().unwrap_or_else(|| class_type.clone());
            return Err(PromptError::whole(ErrorInfo::new(
                ErrorKind::MissingNodeType,
                format!("Node '{shown}' not found. The custom node may not be installed."),
                node_id_details(&id),
                json!({"node_id": id, "class_type": class_value, "node_title": shown}),
            )));
        }
        let inputs = match node.get("inputs") {
            None | Some(Value::Null) => BTreeMap::new(),
            Some(Value::Object(inputs)) => inputs
                .iter()
                .map(|(name, value)| (name.clone(), parse_input(value)))
                .collect(),
            Some(_) => {
                return Err(PromptError::whole(ErrorInfo::new(
                    ErrorKind::InvalidPrompt,
                    format!(
                        "The inputs of node '{}' are not an object.",
                        title.as_deref().unwrap_or(&class_type)
                    ),
                    node_id_details(&id),
                    json!({"node_id": id, "class_type": class_type}),
                )));
            }
        };
        nodes.insert(
            id,
            RawNode {
                class_type,
                title,
                inputs,
            },
        );
    }
    Ok(nodes)
}

fn parse_input(value: &Value) -> RawInput {
    match value {
        Value::Array(parts) => match parts.as_slice() {
            [Value::String(node), Value::Number(index)] => match index.as_u64() {
                Some(output) => RawInput::Link(Link {
                    node: node.clone(),
                    output: output as usize,
                }),
                None => RawInput::BadLink(value.clone()),
            },
            _ => RawInput::BadLink(value.clone()),
        },
        // ComfyUI wraps list constants so they are not read as links.
        Value::Object(wrapper) if wrapper.contains_key("__value__") => {
            RawInput::Value(wrapper["__value__"].clone())
        }
        other => RawInput::Value(other.clone()),
    }
}

// ---------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------

/// Validates `prompt` against `defs` as ComfyUI's `validate_prompt` does.
///
/// `targets` is ComfyUI's `partial_execution_targets`: when given, only the
/// output nodes listed there run. `Ok` when at least one output passed (the
/// failures of the others are in [`Validated::node_errors`]); `Err` with the
/// 400 body otherwise.
pub fn validate(
    prompt: &Value,
    defs: &NodeDefs,
    targets: Option<&[NodeId]>,
) -> Result<Validated, PromptError> {
    let raw = parse(prompt, defs)?;
    let mut outputs: Vec<NodeId> = raw
        .iter()
        .filter(|(id, node)| {
            defs.get(&node.class_type)
                .is_some_and(NodeDef::is_output_node)
                && targets.is_none_or(|t| t.iter().any(|target| target == *id))
        })
        .map(|(id, _)| id.clone())
        .collect();
    sort_ids(&mut outputs);
    if outputs.is_empty() {
        return Err(PromptError::whole(ErrorInfo::new(
            ErrorKind::PromptNoOutputs,
            "Prompt has no outputs",
            "",
            json!({}),
        )));
    }

    let mut checker = Checker {
        raw: &raw,
        defs,
        checked: BTreeMap::new(),
        visiting: Vec::new(),
    };
    let mut good = Vec::new();
    let mut failed = Vec::new();
    let mut node_errors: BTreeMap<NodeId, NodeErrors> = BTreeMap::new();
    for output in &outputs {
        if checker.check(output) {
            good.push(output.clone());
            continue;
        }
        failed.push(output.clone());
        for id in checker.ancestry(output) {
            let Some(checked) = checker.checked.get(&id) else {
                continue;
            };
            if checked.errors.is_empty() {
                continue;
            }
            let entry = node_errors.entry(id.clone()).or_insert_with(|| NodeErrors {
                errors: checked.errors.clone(),
                dependent_outputs: Vec::new(),
                class_type: raw[&id].class_type.clone(),
            });
            entry.dependent_outputs.push(output.clone());
        }
    }
    for entry in node_errors.values_mut() {
        sort_ids(&mut entry.dependent_outputs);
    }

    if good.is_empty() {
        // As ComfyUI: only the output nodes' own errors make the summary.
        let details = failed
            .iter()
            .flat_map(|o| checker.checked[o].errors.iter())
            .map(|e| format!("{}: {}", e.message, e.details))
            .collect::<Vec<_>>()
            .join("\n");
        return Err(PromptError {
            error: ErrorInfo::new(
                ErrorKind::PromptOutputsFailedValidation,
                "Prompt outputs failed validation",
                details,
                json!({}),
            ),
            node_errors,
        });
    }

    let mut nodes = BTreeMap::new();
    for output in &good {
        for id in checker.ancestry(output) {
            if let Some(node) = checker.checked.get(&id).and_then(|c| c.node.clone()) {
                nodes.insert(id, node);
            }
        }
    }
    Ok(Validated {
        graph: PromptGraph {
            nodes,
            outputs: good,
        },
        node_errors,
    })
}

/// What validation found for one node.
struct Checked {
    valid: bool,
    errors: Vec<ErrorInfo>,
    /// The converted node, when all of its own inputs passed.
    node: Option<Node>,
}

/// ComfyUI's recursive `validate_inputs`, memoised per node.
struct Checker<'a> {
    raw: &'a BTreeMap<NodeId, RawNode>,
    defs: &'a NodeDefs,
    checked: BTreeMap<NodeId, Checked>,
    /// The path of nodes being checked (for cycles).
    visiting: Vec<NodeId>,
}

impl Checker<'_> {
    /// Checks `id` and, through its links, everything it depends on.
    fn check(&mut self, id: &str) -> bool {
        if let Some(done) = self.checked.get(id) {
            return done.valid;
        }
        if let Some(start) = self.visiting.iter().position(|v| v == id) {
            self.mark_cycle(start);
            return false;
        }
        let raw = &self.raw[id];
        let def = self
            .defs
            .get(&raw.class_type)
            .expect("classes are checked when parsing");
        if self.visiting.len() >= MAX_LINK_DEPTH {
            let error = ErrorInfo::new(
                ErrorKind::ExceptionDuringValidation,
                "Exception when validating node",
                format!("links nest deeper than {MAX_LINK_DEPTH} nodes"),
                json!({"exception_type": "RecursionError", "traceback": []}),
            );
            self.checked.insert(
                id.to_owned(),
                Checked {
                    valid: false,
                    errors: vec![error],
                    node: None,
                },
            );
            return false;
        }

        let mut errors = Vec::new();
        let mut upstream_ok = true;
        let mut inputs = BTreeMap::new();
        for input in &def.inputs {
            let name = &input.name;
            match raw.inputs.get(name) {
                None => {
                    if input.required {
                        errors.push(ErrorInfo::new(
                            ErrorKind::RequiredInputMissing,
                            "Required input is missing",
                            name.clone(),
                            json!({"input_name": name}),
                        ));
                    }
                }
                Some(RawInput::BadLink(value)) => errors.push(ErrorInfo::new(
                    ErrorKind::BadLinkedInput,
                    "Bad linked input, must be a length-2 list of [node_id, slot_index]",
                    name.clone(),
                    json!({"input_name": name, "input_config": input.config(), "received_value": value}),
                )),
                Some(RawInput::Link(link)) => match self.check_link(input, link) {
                    Err(error) => errors.push(error),
                    Ok(()) => {
                        self.visiting.push(id.to_owned());
                        let ok = self.check(&link.node);
                        self.visiting.pop();
                        if ok {
                            inputs.insert(name.clone(), Input::Link(link.clone()));
                        } else {
                            upstream_ok = false;
                        }
                    }
                },
                Some(RawInput::Value(value)) => match check_value(input, value) {
                    Err(error) => errors.push(error),
                    Ok(value) => {
                        inputs.insert(name.clone(), Input::Value(value));
                    }
                },
            }
        }

        // A cycle through this node may already have put an error on it: join it.
        let (prior_valid, mut all_errors) = match self.checked.remove(id) {
            Some(prior) => (prior.valid, prior.errors),
            None => (true, Vec::new()),
        };
        let own_ok = errors.is_empty();
        for error in errors {
            if !all_errors.contains(&error) {
                all_errors.push(error);
            }
        }
        let valid = prior_valid && own_ok && upstream_ok;
        let node = valid.then(|| Node {
            class_type: raw.class_type.clone(),
            inputs,
            title: raw.title.clone(),
            output_node: def.output_node,
        });
        self.checked.insert(
            id.to_owned(),
            Checked {
                valid,
                errors: all_errors,
                node,
            },
        );
        valid
    }

    /// The linked node and output exist and their type fits the input.
    fn check_link(&self, input: &InputDef, link: &Link) -> Result<(), ErrorInfo> {
        let name = &input.name;
        let missing = |exception_type: &str, problem: String| {
            // ComfyUI finds these as a KeyError / IndexError: the same types as it reports.
            let (kind, message) = if self.visiting.is_empty() {
                (
                    ErrorKind::ExceptionDuringValidation,
                    "Exception when validating node",
                )
            } else {
                (
                    ErrorKind::ExceptionDuringInnerValidation,
                    "Exception when validating inner node",
                )
            };
            let details = format!("{name}: {problem}");
            ErrorInfo::new(
                kind,
                message,
                details.clone(),
                json!({
                    "input_name": name,
                    "input_config": input.config(),
                    "exception_message": details,
                    "exception_type": exception_type,
                    "traceback": [],
                    "linked_node": [link.node, link.output],
                }),
            )
        };
        let Some(source) = self.raw.get(&link.node) else {
            return Err(missing(
                "KeyError",
                format!("node '{}' does not exist", link.node),
            ));
        };
        let source_def = self
            .defs
            .get(&source.class_type)
            .expect("classes are checked when parsing");
        let Some(received) = source_def.outputs.get(link.output) else {
            return Err(missing(
                "IndexError",
                format!(
                    "node '{}' ({}) has no output {} (it has {})",
                    link.node,
                    source.class_type,
                    link.output,
                    source_def.outputs.len()
                ),
            ));
        };
        if accepts(received, &input.spec) {
            return Ok(());
        }
        Err(ErrorInfo::new(
            ErrorKind::ReturnTypeMismatch,
            "Return type mismatch between linked nodes",
            format!(
                "{name}, received_type({}) mismatch input_type({})",
                py_str(&received.to_json()),
                py_str(&input.spec.to_json())
            ),
            json!({
                "input_name": name,
                "input_config": input.config(),
                "received_type": received.to_json(),
                "linked_node": [link.node, link.output],
            }),
        ))
    }

    /// Marks every node of the cycle `visiting[start..]` (closing on its first node).
    fn mark_cycle(&mut self, start: usize) {
        let cycle: Vec<NodeId> = self.visiting[start..].to_vec();
        let mut path = cycle.clone();
        path.push(cycle[0].clone());
        let details = path
            .iter()
            .map(|id| format!("{id} ({})", self.raw[id].class_type))
            .collect::<Vec<_>>()
            .join(" -> ");
        for id in &cycle {
            let error = ErrorInfo::new(
                ErrorKind::DependencyCycle,
                "Dependency cycle detected",
                details.clone(),
                json!({"node_id": id, "cycle_nodes": cycle}),
            );
            self.checked.insert(
                id.clone(),
                Checked {
                    valid: false,
                    errors: vec![error],
                    node: None,
                },
            );
        }
    }

    /// `id` and every node it reaches through the links of its declared inputs.
    fn ancestry(&self, id: &str) -> Vec<NodeId> {
        let mut seen = BTreeSet::new();
        let mut stack = vec![id.to_owned()];
        while let Some(current) = stack.pop() {
            let Some(node) = self.raw.get(&current) else {
                continue;
            };
            if !seen.insert(current.clone()) {
                continue;
            }
            let def = self.defs.get(&node.class_type);
            for (name, input) in &node.inputs {
                if let RawInput::Link(link) = input {
                    if def.is_some_and(|d| d.input(name).is_some()) && !seen.contains(&link.node) {
                        stack.push(link.node.clone());
                    }
                }
            }
        }
        seen.into_iter().collect()
    }
}

/// Whether an output of type `received` may feed an input of type `input`
/// (ComfyUI's `validate_node_input`, non-strict).
fn accepts(received: &TypeSpec, input: &TypeSpec) -> bool {
    if received == input || received.is_named("*") || input.is_named("*") {
        return true;
    }
    match (received, input) {
        // A list of values feeds a COMBO input.
        (TypeSpec::Options(_), TypeSpec::Named(name)) if name == "COMBO" => true,
        (TypeSpec::Named(a), TypeSpec::Named(b)) => {
            let a: BTreeSet<&str> = a.split(',').map(str::trim).collect();
            let b: BTreeSet<&str> = b.split(',').map(str::trim).collect();
            a.contains("*") || b.contains("*") || !a.is_disjoint(&b)
        }
        _ => false,
    }
}

/// A converted number, before it is checked against `min` and `max`.
#[derive(Clone, Copy, Debug)]
enum Number {
    Int(i128),
    Float(f64),
}

impl Number {
    fn to_json(self) -> Value {
        match self {
            Number::Int(i) => i64::try_from(i)
                .map(Value::from)
                .or_else(|_| u64::try_from(i).map(Value::from))
                .unwrap_or_else(|_| Value::from(i as f64)),
            Number::Float(f) => Value::from(f),
        }
    }

    fn display(self) -> String {
        match self {
            Number::Int(i) => i.to_string(),
            Number::Float(f) => py_float(f),
        }
    }

    /// Compares with a bound from a definition; `None` when the bound is not a number.
    fn compare(self, bound: &Value) -> Option<Ordering> {
        let bound = bound.as_number()?;
        match (
            self,
            bound
                .as_i64()
                .map(i128::from)
                .or(bound.as_u64().map(i128::from)),
        ) {
            (Number::Int(v), Some(b)) => Some(v.cmp(&b)),
            (Number::Int(v), None) => (v as f64).partial_cmp(&bound.as_f64()?),
            (Number::Float(v), _) => v.partial_cmp(&bound.as_f64()?),
        }
    }
}

fn bound_display(bound: &Value) -> String {
    match bound.as_number() {
        Some(n) if n.is_f64() => py_float(n.as_f64().unwrap_or(f64::NAN)),
        _ => py_str(bound),
    }
}

/// Converts and range-checks a constant as ComfyUI does for its input type.
fn check_value(input: &InputDef, value: &Value) -> Result<Value, ErrorInfo> {
    let name = &input.name;
    let invalid = |type_name: &str, exception: String| {
        ErrorInfo::new(
            ErrorKind::InvalidInputType,
            format!("Failed to convert an input value to a {type_name} value"),
            format!("{name}, {}, {exception}", py_str(value)),
            json!({
                "input_name": name,
                "input_config": input.config(),
                "received_value": value,
                "exception_message": exception,
            }),
        )
    };
    let number = match &input.spec {
        TypeSpec::Named(t) if t == "INT" => Some(to_int(value).map_err(|e| invalid("INT", e))?),
        TypeSpec::Named(t) if t == "FLOAT" => {
            Some(to_float(value).map_err(|e| invalid("FLOAT", e))?)
        }
        TypeSpec::Named(t) if t == "STRING" => {
            return to_string(value)
                .map(Value::String)
                .map_err(|e| invalid("STRING", e));
        }
        TypeSpec::Named(t) if t == "BOOLEAN" => {
            return to_bool(value)
                .map(Value::Bool)
                .map_err(|e| invalid("BOOLEAN", e));
        }
        _ => None,
    };
    if let Some(number) = number {
        let range_error = |kind, word: &str, bound: &Value| {
            ErrorInfo::new(
                kind,
                format!(
                    "Value {} {word} of {}",
                    number.display(),
                    bound_display(bound)
                ),
                name.clone(),
                json!({"input_name": name, "input_config": input.config(), "received_value": number.to_json()}),
            )
        };
        if let Some(min) = input.options.get("min") {
            if number.compare(min) == Some(Ordering::Less) {
                return Err(range_error(
                    ErrorKind::ValueSmallerThanMin,
                    "smaller than min",
                    min,
                ));
            }
        }
        if let Some(max) = input.options.get("max") {
            if number.compare(max) == Some(Ordering::Greater) {
                return Err(range_error(
                    ErrorKind::ValueBiggerThanMax,
                    "bigger than max",
                    max,
                ));
            }
        }
        if let Number::Int(i) = number {
            if i64::try_from(i).is_err() && u64::try_from(i).is_err() {
                return Err(invalid("INT", format!("{i} does not fit in 64 bits")));
            }
        }
        return Ok(number.to_json());
    }
    check_combo(input, value)?;
    Ok(value.clone())
}

/// A combo value must be one of the options (each element, for `multiselect`).
fn check_combo(input: &InputDef, value: &Value) -> Result<(), ErrorInfo> {
    let options: &[Value] = match &input.spec {
        TypeSpec::Options(options) => options,
        TypeSpec::Named(t) if t == "COMBO" => {
            if input
                .options
                .get("remote_combo")
                .is_some_and(|r| !r.is_null() && r != &Value::Bool(false))
            {
                return Ok(());
            }
            match input.options.get("options").and_then(Value::as_array) {
                Some(options) => options,
                None => &[],
            }
        }
        _ => return Ok(()),
    };
    let multiselect = input
        .options
        .get("multiselect")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let candidates: Vec<&Value> = match value {
        Value::Array(values) if multiselect => values.iter().collect(),
        other => vec![other],
    };
    let bad: Vec<&Value> = candidates
        .into_iter()
        .filter(|v| !options.iter().any(|o| py_eq(o, v)))
        .collect();
    if bad.is_empty() {
        return Ok(());
    }
    let (listed, config) = if options.len() > MAX_LISTED_OPTIONS {
        (format!("(list of length {})", options.len()), Value::Null)
    } else {
        (py_repr(&Value::Array(options.to_vec())), input.config())
    };
    let name = &input.name;
    Err(ErrorInfo::new(
        ErrorKind::ValueNotInList,
        "Value not in list",
        format!(
            "{name}: {} not in {listed}",
            bad.iter()
                .map(|v| py_repr(v))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        json!({"input_name": name, "input_config": config, "received_value": value}),
    ))
}

fn py_type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "NoneType",
        Value::Bool(_) => "bool",
        Value::Number(n) if n.is_f64() => "float",
        Value::Number(_) => "int",
        Value::String(_) => "str",
        Value::Array(_) => "list",
        Value::Object(_) => "dict",
    }
}

/// Python's `int(value)`: numbers truncate, strings must be integer literals.
fn to_int(value: &Value) -> Result<Number, String> {
    match value {
        Value::Bool(b) => Ok(Number::Int(i128::from(*b))),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Ok(Number::Int(i128::from(i)))
            } else if let Some(u) = n.as_u64() {
                Ok(Number::Int(i128::from(u)))
            } else {
                let f = n.as_f64().unwrap_or(f64::NAN);
                if !f.is_finite() || f.abs() >= 1.0e38 {
                    Err(format!("cannot convert float {} to integer", py_float(f)))
                } else {
                    Ok(Number::Int(f.trunc() as i128))
                }
            }
        }
        Value::String(s) => parse_py_int(s)
            .map(Number::Int)
            .ok_or_else(|| format!("invalid literal for int() with base 10: {}", py_repr(value))),
        other => Err(format!(
            "int() argument must be a string, a bytes-like object or a real number, not '{}'",
            py_type_name(other)
        )),
    }
}

/// A base-10 integer literal as Python's `int()` reads it: surrounding
/// whitespace, an optional sign, digits with single underscores between them.
fn parse_py_int(text: &str) -> Option<i128> {
    let t = text.trim();
    let (negative, digits) = match t.as_bytes().first()? {
        b'-' => (true, &t[1..]),
        b'+' => (false, &t[1..]),
        _ => (false, t),
    };
    if digits.is_empty()
        || digits.starts_with('_')
        || digits.ends_with('_')
        || digits.contains("__")
    {
        return None;
    }
    let clean: String = digits.chars().filter(|c| *c != '_').collect();
    if !clean.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let magnitude: i128 = clean.parse().ok()?;
    Some(if negative { -magnitude } else { magnitude })
}

/// Python's `float(value)`, finite values only (ours: NaN and infinities would
/// not survive the trip into a job's JSON request).
fn to_float(value: &Value) -> Result<Number, String> {
    let f = match value {
        Value::Bool(b) => f64::from(u8::from(*b)),
        Value::Number(n) => n.as_f64().unwrap_or(f64::NAN),
        Value::String(s) => {
            let t = s.trim();
            let parsed = if t.contains("__") || t.starts_with('_') || t.ends_with('_') {
                None
            } else {
                t.replace('_', "").parse::<f64>().ok()
            };
            parsed
                .ok_or_else(|| format!("could not convert string to float: {}", py_repr(value)))?
        }
        other => {
            return Err(format!(
                "float() argument must be a string or a real number, not '{}'",
                py_type_name(other)
            ))
        }
    };
    if f.is_finite() {
        Ok(Number::Float(f))
    } else {
        Err(format!("{} is not a finite number", py_float(f)))
    }
}

/// Python's `str(value)` for strings, numbers and booleans (ours: null, lists
/// and objects are refused rather than turned into their Python text).
fn to_string(value: &Value) -> Result<String, String> {
    match value {
        Value::String(s) => Ok(s.clone()),
        Value::Number(_) | Value::Bool(_) => Ok(py_str(value)),
        other => Err(format!("expected a string, not '{}'", py_type_name(other))),
    }
}

/// Python's `bool(value)` for booleans and numbers (ours: strings, null, lists
/// and objects are refused; Python would call `"false"` true).
fn to_bool(value: &Value) -> Result<bool, String> {
    match value {
        Value::Bool(b) => Ok(*b),
        Value::Number(n) => Ok(n.as_f64().is_some_and(|f| f != 0.0)),
        other => Err(format!("expected a boolean, not '{}'", py_type_name(other))),
    }
}

/// Python's `==` on JSON values (numbers and booleans compare by value).
fn py_eq(a: &Value, b: &Value) -> bool {
    fn numeric(v: &Value) -> Option<f64> {
        match v {
            Value::Bool(b) => Some(f64::from(u8::from(*b))),
            Value::Number(n) => n.as_f64(),
            _ => None,
        }
    }
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            match (x.as_i64(), y.as_i64(), x.as_u64(), y.as_u64()) {
                (Some(i), Some(j), _, _) => i == j,
                (_, _, Some(i), Some(j)) => i == j,
                _ => x.as_f64() == y.as_f64(),
            }
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| py_eq(p, q))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| py_eq(v, w)))
        }
        _ => match (numeric(a), numeric(b)) {
            (Some(x), Some(y)) => x == y,
            _ => a == b,
        },
    }
}

/// Python's `repr(float)`: shortest round-trip digits, positional for
/// exponents -4..16, else `1e-07` / `1.5e+16`.
fn py_float(f: f64) -> String {
    if f.is_nan() {
        return "nan".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "inf".into() } else { "-inf".into() };
    }
    if f == 0.0 {
        return if f.is_sign_negative() {
            "-0.0".into()
        } else {
            "0.0".into()
        };
    }
    let formatted = format!("{f:e}");
    let (mantissa, exponent) = formatted
        .split_once('e')
        .expect("LowerExp writes an exponent");
    let exponent: i32 = exponent
        .parse()
        .expect("LowerExp writes an integer exponent");
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    if (-4..16).contains(&exponent) {
        if exponent >= 0 {
            let point = exponent as usize + 1;
            let (int_part, frac_part) = if digits.len() > point {
                (digits[..point].to_owned(), digits[point..].to_owned())
            } else {
                (format!("{digits:0<point$}"), "0".to_owned())
            };
            format!("{sign}{int_part}.{frac_part}")
        } else {
            let zeros = "0".repeat((-exponent - 1) as usize);
            format!("{sign}0.{zeros}{digits}")
        }
    } else {
        let rest = if digits.len() > 1 {
            format!(".{}", &digits[1..])
        } else {
            String::new()
        };
        let exp_sign = if exponent < 0 { '-' } else { '+' };
        format!(
            "{sign}{}{rest}e{exp_sign}{:02}",
            &digits[..1],
            exponent.abs()
        )
    }
}

/// Python's `repr` of a JSON value (strings in single quotes).
fn py_repr(value: &Value) -> String {
    match value {
        Value::Null => "None".into(),
        Value::Bool(true) => "True".into(),
        Value::Bool(false) => "False".into(),
        Value::Number(n) if n.is_f64() => py_float(n.as_f64().unwrap_or(f64::NAN)),
        Value::Number(n) => n.to_string(),
        Value::String(s) => {
            let quote = if s.contains('\'') && !s.contains('"') {
                '"'
            } else {
                '\''
            };
            let mut out = String::with_capacity(s.len() + 2);
            out.push(quote);
            for c in s.chars() {
                match c {
                    '\\' => out.push_str("\\\\"),
                    '\n' => out.push_str("\\n"),
                    '\r' => out.push_str("\\r"),
                    '\t' => out.push_str("\\t"),
                    c if c == quote => {
                        out.push('\\');
                        out.push(c);
                    }
                    c => out.push(c),
                }
            }
            out.push(quote);
            out
        }
        Value::Array(items) => format!(
            "[{}]",
            items.iter().map(py_repr).collect::<Vec<_>>().join(", ")
        ),
        Value::Object(map) => format!(
            "{{{}}}",
            map.iter()
                .map(|(k, v)| format!("{}: {}", py_repr(&Value::String(k.clone())), py_repr(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// Python's `str` of a JSON value (a string is itself).
fn py_str(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => py_repr(other),
    }
}

// ---------------------------------------------------------------------------
// Execution order
// ---------------------------------------------------------------------------

/// One node to visit when executing a prompt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Step {
    pub node: NodeId,
    /// The node's output comes from the cache: do not run it (an output node
    /// still reports its cached result, as ComfyUI re-sends `executed`).
    pub cached: bool,
}

/// The nodes the graph's outputs need, each after everything it links to.
///
/// A node for which `is_cached` says yes is a leaf: its own inputs are not
/// needed (ComfyUI's `ExecutionList` does not walk past a cached node).
/// Among ready nodes the order prefers, as ComfyUI's `ux_friendly_pick_node`
/// does, an output node, then a node feeding one, then a node two links from
/// one; ties go by node id, so the order is the same for the same graph.
pub(crate) fn execution_order(graph: &PromptGraph, is_cached: impl Fn(&str) -> bool) -> Vec<Step> {
    // The needed nodes and whether each is cached.
    let mut needed: BTreeMap<NodeId, bool> = BTreeMap::new();
    let mut stack: Vec<NodeId> = graph.outputs.iter().rev().cloned().collect();
    while let Some(id) = stack.pop() {
        if needed.contains_key(&id) || !graph.nodes.contains_key(&id) {
            continue;
        }
        let cached = is_cached(&id);
        needed.insert(id.clone(), cached);
        if !cached {
            stack.extend(graph.nodes[&id].links().map(|(_, link)| link.node.clone()));
        }
    }

    let mut waiting_on: BTreeMap<NodeId, BTreeSet<NodeId>> = BTreeMap::new();
    let mut dependents: BTreeMap<NodeId, BTreeSet<NodeId>> = BTreeMap::new();
    for (id, cached) in &needed {
        let deps: BTreeSet<NodeId> = if *cached {
            BTreeSet::new()
        } else {
            graph.nodes[id]
                .links()
                .map(|(_, link)| link.node.clone())
                .collect()
        };
        for dep in &deps {
            dependents
                .entry(dep.clone())
                .or_default()
                .insert(id.clone());
        }
        waiting_on.insert(id.clone(), deps);
    }

    let is_output = |id: &str| graph.nodes.get(id).is_some_and(|n| n.output_node);
    let mut order = Vec::with_capacity(needed.len());
    while !waiting_on.is_empty() {
        let mut ready: Vec<NodeId> = waiting_on
            .iter()
            .filter(|(_, deps)| deps.is_empty())
            .map(|(id, _)| id.clone())
            .collect();
        if ready.is_empty() {
            // Cannot happen for a validated graph; stop rather than spin.
            break;
        }
        sort_ids(&mut ready);
        let pending_dependents = |id: &str| -> Vec<NodeId> {
            dependents
                .get(id)
                .map(|ds| {
                    ds.iter()
                        .filter(|d| waiting_on.contains_key(*d))
                        .cloned()
                        .collect()
                })
                .unwrap_or_default()
        };
        let feeds_output = |id: &str| pending_dependents(id).iter().any(|d| is_output(d));
        let pick = ready
            .iter()
            .find(|id| is_output(id))
            .or_else(|| ready.iter().find(|id| feeds_output(id)))
            .or_else(|| {
                ready
                    .iter()
                    .find(|id| pending_dependents(id).iter().any(|d| feeds_output(d)))
            })
            .unwrap_or(&ready[0])
            .clone();
        waiting_on.remove(&pick);
        if let Some(ds) = dependents.get(&pick) {
            for d in ds {
                if let Some(deps) = waiting_on.get_mut(d) {
                    deps.remove(&pick);
                }
            }
        }
        order.push(Step {
            cached: needed[&pick],
            node: pick,
        });
    }
    order
}

// ---------------------------------------------------------------------------
// Cache signatures
// ---------------------------------------------------------------------------

/// A node's cache key: equal for equal subgraphs, whatever their node ids.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct Signature([u8; 32]);

impl fmt::Display for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signature({})", &self.to_string()[..16])
    }
}

/// Every node's [`Signature`]: a hash of its class, `salt` (the executor's
/// `IS_CHANGED`: what outside the graph the output depends on, such as a file's
/// hash; `None` when nothing), its converted constants by input name, and for
/// each link the input name, the output index and the source's signature.
pub(crate) fn signatures(
    graph: &PromptGraph,
    salt: impl Fn(&str, &Node) -> Option<String>,
) -> BTreeMap<NodeId, Signature> {
    let mut done: BTreeMap<NodeId, Signature> = BTreeMap::new();
    // Post-order without recursion: a node is hashed once its sources are.
    let mut ids: Vec<&NodeId> = graph.nodes.keys().collect();
    ids.sort_by(|a, b| id_order(a, b));
    for root in ids {
        let mut stack: Vec<(&NodeId, bool)> = vec![(root, false)];
        while let Some((id, expanded)) = stack.pop() {
            if done.contains_key(id) {
                continue;
            }
            let node = &graph.nodes[id];
            if !expanded {
                stack.push((id, true));
                for (_, link) in node.links() {
                    if let Some((source, _)) = graph.nodes.get_key_value(&link.node) {
                        if !done.contains_key(source) {
                            stack.push((source, false));
                        }
                    }
                }
                continue;
            }
            let signature = hash_node(node, salt(id, node), &done);
            done.insert(id.clone(), signature);
        }
    }
    done
}

fn hash_node(node: &Node, salt: Option<String>, done: &BTreeMap<NodeId, Signature>) -> Signature {
    fn field(hasher: &mut Sha256, bytes: &[u8]) {
        hasher.update((bytes.len() as u64).to_le_bytes());
        hasher.update(bytes);
    }
    let mut hasher = Sha256::new();
    hasher.update(b"fluxlora.comfy.node.v1");
    field(&mut hasher, node.class_type.as_bytes());
    match salt {
        None => hasher.update([0u8]),
        Some(salt) => {
            hasher.update([1u8]);
            field(&mut hasher, salt.as_bytes());
        }
    }
    hasher.update((node.inputs.len() as u64).to_le_bytes());
    for (name, input) in &node.inputs {
        field(&mut hasher, name.as_bytes());
        match input {
            Input::Value(value) => {
                hasher.update([b'C']);
                let mut text = String::new();
                canonical_json(value, &mut text);
                field(&mut hasher, text.as_bytes());
            }
            Input::Link(link) => {
                hasher.update([b'L']);
                hasher.update((link.output as u64).to_le_bytes());
                // Validated graphs hold every linked node; a missing one hashes as unknown.
                match done.get(&link.node) {
                    Some(source) => hasher.update(source.0),
                    None => hasher.update([0u8; 32]),
                }
            }
        }
    }
    Signature(hasher.finalize().into())
}

/// JSON text with object keys sorted, whatever order the map keeps.
fn canonical_json(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(key.clone()).to_string());
                out.push(':');
                canonical_json(&map[key.as_str()], out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                canonical_json(item, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

#[cfg(test)]
mod tests;
