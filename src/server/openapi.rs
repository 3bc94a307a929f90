//! The OpenAPI 3.1 document of the native `/v1` API, served at `GET /v1/openapi.json`.
//!
//! Owns: [`document`], the one description of every `/v1` path, its parameters,
//! bodies, responses, the event and error shapes, and the security schemes. It is
//! written by hand from the handlers (`native`, `ws`), the error mapping
//! (`errors`) and the serde types they exchange; its tests check that every route
//! `native::routes` registers is documented, that every `$ref` resolves, and that
//! documented fields and defaults match the Rust types.
//!
//! Must not: serve anything or call the engine; it only describes.

use serde_json::{json, Map, Value};

/// The OpenAPI 3.1 document of the native API.
pub fn document() -> Value {
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "fluxlora native API",
            "version": env!("CARGO_PKG_VERSION"),
            "summary": "Train Flux LoRA adapters and sample images with a local daemon.",
            "description": INFO_DESCRIPTION,
            "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
        },
        "servers": [
            {"url": "http://127.0.0.1:7860", "description": "The daemon with its default address (`fluxlora serve`)."}
        ],
        "security": [{}, {"bearer": []}, {"token": []}],
        "tags": [
            {"name": "system", "description": "The daemon, its model and this document."},
            {"name": "jobs", "description": "Training and sampling jobs: submit, list, steer, delete, events and files."},
            {"name": "sampling", "description": "Synchronous sampling."},
            {"name": "loras", "description": "The LoRA folder."},
            {"name": "events", "description": "Live events over a WebSocket."},
        ],
        "paths": paths(),
        "components": {
            "securitySchemes": security_schemes(),
            "parameters": parameters(),
            "responses": responses(),
            "schemas": schemas(),
        },
    })
}

const INFO_DESCRIPTION: &str = "The native API of the fluxlora daemon. One worker runs jobs \
(training runs and sampling requests) from one queue on the loaded model; sampling requests \
that arrive while a training job runs are served between its optimizer steps. Every change \
of a job is an event (see the `Event` schema), stored with the job and streamed over \
`/v1/ws`.\n\nEvery 4xx/5xx answer has the body `{\"error\": {\"code\", \"message\", \
\"field\"?}}` (`ErrorBody`).\n\nPaths in requests (dataset folders, LoRA files) must lie \
inside the folders the daemon was allowed to read (`--root`, the data folder, ComfyUI's \
LoRA folder); paths in answers and events are the daemon's own file-system paths.";

const AUTH_DESCRIPTION: &str = "A token is only required when the daemon was started with one \
(`--token` or `FLUXLORA_TOKEN`), which it always is when bound to an address other than \
loopback. Then every request must carry it, as `Authorization: Bearer <token>` or, where a \
client cannot set headers (browsers opening a WebSocket), as the `token` query parameter. \
Requests without it are answered 401. Without a token (a daemon on loopback) the \
`Host` header must be `localhost` or a loopback address, so a page whose host name was \
re-pointed at this machine (DNS rebinding) is answered 403.";

fn schema_ref(name: &str) -> Value {
    json!({ "$ref": format!("#/components/schemas/{name}") })
}

fn response_ref(name: &str) -> Value {
    json!({ "$ref": format!("#/components/responses/{name}") })
}

fn parameter_ref(name: &str) -> Value {
    json!({ "$ref": format!("#/components/parameters/{name}") })
}

/// A JSON response with this description and schema.
fn json_response(description: &str, schema: Value) -> Value {
    json!({
        "description": description,
        "content": {"application/json": {"schema": schema}},
    })
}

/// A required JSON request body.
fn json_body(description: &str, schema: Value) -> Value {
    json!({
        "required": true,
        "description": description,
        "content": {"application/json": {"schema": schema}},
    })
}

/// `(status, response)` pairs plus the answers every operation can give (401,
/// 403, 500), as a `responses` object.
fn responses_of(pairs: Vec<(&str, Value)>) -> Value {
    let mut map = Map::new();
    for (status, response) in pairs {
        map.insert(status.to_string(), response);
    }
    for (status, name) in [
        ("401", "Unauthorized"),
        ("403", "Forbidden"),
        ("500", "Internal"),
    ] {
        map.entry(status).or_insert_with(|| response_ref(name));
    }
    Value::Object(map)
}

/// One operation.
fn op(
    id: &str,
    tag: &str,
    summary: &str,
    description: &str,
    responses: Vec<(&str, Value)>,
) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("operationId".into(), json!(id));
    m.insert("tags".into(), json!([tag]));
    m.insert("summary".into(), json!(summary));
    if !description.is_empty() {
        m.insert("description".into(), json!(description));
    }
    m.insert("responses".into(), responses_of(responses));
    m
}

fn with(mut op: Map<String, Value>, key: &str, value: Value) -> Map<String, Value> {
    op.insert(key.into(), value);
    op
}

fn paths() -> Value {
    let mut paths = Map::new();
    let mut add = |path: &str, method: &str, op: Map<String, Value>| {
        let item = paths
            .entry(path.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
        item[method] = Value::Object(op);
    };

    // System.
    add(
        "/v1/system",
        "get",
        op(
            "getSystem",
            "system",
            "The daemon: version, model, device, queue and subscribers",
            "",
            vec![(
                "200",
                json_response("The daemon's state.", schema_ref("System")),
            )],
        ),
    );
    add(
        "/v1/models",
        "get",
        op(
            "listModels",
            "system",
            "The loaded model and the models the daemon can see",
            "`loaded` is the model every job samples and trains with. `available` lists the \
             built-in tiny model and the `.safetensors`/`.sft` files and folders of the model \
             folders; another one is chosen with `fluxlora serve --model` when the daemon starts.",
            vec![("200", json_response("The models.", schema_ref("Models")))],
        ),
    );
    add(
        "/v1/nodes",
        "get",
        op(
            "getNodes",
            "system",
            "Node definitions in ComfyUI's `/object_info` format",
            "A map from node class name to node definition, exactly as ComfyUI's \
             `GET /object_info` answers (`input`, `output`, `output_name`, `name`, \
             `display_name`, `category`, …), with the current LoRA names filled in.",
            vec![(
                "200",
                json_response("The node definitions.", schema_ref("ObjectInfo")),
            )],
        ),
    );
    add(
        "/v1/openapi.json",
        "get",
        op(
            "getOpenApi",
            "system",
            "This document",
            "",
            vec![(
                "200",
                json_response(
                    "The OpenAPI 3.1 document of the native API.",
                    json!({"type": "object"}),
                ),
            )],
        ),
    );

    // Jobs.
    add(
        "/v1/jobs",
        "get",
        with(
            op(
                "listJobs",
                "jobs",
                "Jobs, oldest first",
                "Every job, or those matching the filters.",
                vec![
                    (
                        "200",
                        json_response(
                            "The jobs.",
                            json!({"type": "array", "items": schema_ref("JobRecord")}),
                        ),
                    ),
                    ("400", response_ref("BadRequest")),
                ],
            ),
            "parameters",
            json!([
                {"name": "state", "in": "query", "required": false, "description": "Only jobs in this state.", "schema": schema_ref("JobState")},
                {"name": "kind", "in": "query", "required": false, "description": "Only training or sampling jobs.", "schema": {"type": "string", "enum": ["train", "sample"]}},
                {"name": "limit", "in": "query", "required": false, "description": "Only the newest N of those (still oldest first).", "schema": {"type": "integer", "minimum": 0}},
            ]),
        ),
    );
    add(
        "/v1/jobs/train",
        "post",
        with(
            op(
                "submitTrain",
                "jobs",
                "Queue a training run",
                "The config is parsed and validated before anything is queued; a 400 names the \
                 offending field in `error.field`. Dataset and validation folders must lie \
                 inside the allowed folders (`field`: `dataset.folders[i]`, \
                 `validation_dataset.folders[i]`), and `cache_dir` too (it may not exist yet; \
                 no `..`). The daemon trains its loaded model on its device and writes into the \
                 job's folder: a config that sets `model` is refused, `device` and `output_dir` \
                 are not used; `mixed_precision` must match the loaded model's dtype or the job \
                 fails.",
                vec![
                    ("202", json_response("Queued.", schema_ref("JobId"))),
                    ("400", response_ref("BadRequest")),
                    ("413", response_ref("TooLarge")),
                ],
            ),
            "requestBody",
            json_body("The training run.", schema_ref("TrainConfig")),
        ),
    );
    add(
        "/v1/jobs/sample",
        "post",
        with(
            op(
                "submitSample",
                "jobs",
                "Queue a sampling job",
                "Answers at once with the job id; follow the job with its events. LoRA paths \
                 must lie inside the allowed folders (a bare file name is looked up in the LoRA \
                 folder; `field`: `loras[i].path`). Sizes, steps, batch size, guidance and the \
                 path-or-`live_job` rule are checked before queueing (`field`: \
                 `request.width`, …); the LoRA files themselves are read when the job runs, \
                 and a bad one fails the job (an `error` event).",
                vec![
                    ("202", json_response("Queued.", schema_ref("JobId"))),
                    ("400", response_ref("BadRequest")),
                    ("413", response_ref("TooLarge")),
                ],
            ),
            "requestBody",
            json_body("The sampling job.", schema_ref("SampleJob")),
        ),
    );
    add(
        "/v1/jobs/{id}",
        "get",
        with(
            op(
                "getJob",
                "jobs",
                "One job",
                "",
                vec![
                    ("200", json_response("The job.", schema_ref("JobRecord"))),
                    ("404", response_ref("NotFound")),
                ],
            ),
            "parameters",
            json!([parameter_ref("JobIdPath")]),
        ),
    );
    add(
        "/v1/jobs/{id}",
        "delete",
        with(
            op(
                "deleteJob",
                "jobs",
                "Delete a job and its folder",
                "Only a finished, cancelled, failed or interrupted job can be deleted; a queued, \
                 running or paused one is answered 409 (cancel it first). The copy of a finished \
                 LoRA in the LoRA folder stays.",
                vec![
                    ("204", json!({"description": "Deleted."})),
                    ("404", response_ref("NotFound")),
                    ("409", response_ref("Conflict")),
                ],
            ),
            "parameters",
            json!([parameter_ref("JobIdPath")]),
        ),
    );
    for (action, id, summary, description) in [
        (
            "cancel",
            "cancelJob",
            "Cancel a job",
            "Possible while the job is queued, running, paused or interrupted (409 once it \
             finished, failed or was cancelled). A running training job stops after the \
             current optimizer step and saves its progress; a running sampling job stops \
             after the current sampling step.",
        ),
        (
            "pause",
            "pauseJob",
            "Pause a job",
            "Possible while the job is queued, or running if it is a training job (409 \
             otherwise; a running sampling job can only be cancelled). A running training \
             job pauses after the current optimizer step; sampling requests are still served \
             while it is paused.",
        ),
        (
            "resume",
            "resumeJob",
            "Resume a paused or interrupted job",
            "Possible while the job is paused or interrupted (409 otherwise). Resuming an \
             `interrupted` training job (one that was running when the daemon stopped) \
             re-queues it; it continues from its last saved state.",
        ),
    ] {
        add(
            &format!("/v1/jobs/{{id}}/{action}"),
            "post",
            with(
                op(
                    id,
                    "jobs",
                    summary,
                    &format!(
                        "{description} The answer is the job as it is when the request has been \
                         accepted: the change itself takes effect in the worker (between \
                         optimizer steps for a running training job) and is reported as a \
                         `state` event."
                    ),
                    vec![
                        ("200", json_response("The job.", schema_ref("JobRecord"))),
                        ("404", response_ref("NotFound")),
                        ("409", response_ref("Conflict")),
                    ],
                ),
                "parameters",
                json!([parameter_ref("JobIdPath")]),
            ),
        );
    }
    add(
        "/v1/jobs/{id}/events",
        "get",
        with(
            op(
                "getJobEvents",
                "jobs",
                "The job's stored events",
                "Every stored event of the job with `seq` greater than `since`, in order. \
                 Previews are never stored.",
                vec![
                    (
                        "200",
                        json_response(
                            "The events.",
                            json!({"type": "array", "items": schema_ref("Event")}),
                        ),
                    ),
                    ("400", response_ref("BadRequest")),
                    ("404", response_ref("NotFound")),
                ],
            ),
            "parameters",
            json!([
                parameter_ref("JobIdPath"),
                {
                    "name": "since",
                    "in": "query",
                    "required": false,
                    "description": "Only events with a greater `seq`.",
                    "schema": {"type": "integer", "format": "uint64", "minimum": 0, "default": 0},
                },
            ]),
        ),
    );
    add(
        "/v1/jobs/{id}/files/{path}",
        "get",
        with(
            op(
                "getJobFile",
                "jobs",
                "A file of the job's folder",
                "Samples (`samples/<id>_00.png`), saves and the LoRA of a job, by their path \
                 relative to the job's folder (slashes allowed; `..` and absolute paths are \
                 answered 400). PNG files are sent as `image/png`, JSON as `application/json`, \
                 anything else as `application/octet-stream`.",
                vec![
                    (
                        "200",
                        json!({
                            "description": "The file's bytes.",
                            "content": {
                                "image/png": {"schema": {"type": "string", "contentMediaType": "image/png"}},
                                "application/json": {"schema": {}},
                                "application/octet-stream": {"schema": {"type": "string", "contentMediaType": "application/octet-stream"}},
                            },
                        }),
                    ),
                    ("400", response_ref("BadRequest")),
                    ("404", response_ref("NotFound")),
                ],
            ),
            "parameters",
            json!([
                parameter_ref("JobIdPath"),
                {
                    "name": "path",
                    "in": "path",
                    "required": true,
                    "description": "The file's path inside the job folder; it may contain slashes.",
                    "schema": {"type": "string"},
                    "example": "samples/18f0c2a1b3d-0001_00.png",
                },
            ]),
        ),
    );

    // Synchronous sampling.
    add(
        "/v1/sample",
        "post",
        with(
            with(
                op(
                    "sampleNow",
                    "sampling",
                    "Sample and wait for the images",
                    "Queues a sampling job like `POST /v1/jobs/sample` and answers when it \
                     ends (it waits behind queued jobs; a running training job serves it \
                     between optimizer steps). The answer is the first image as PNG bytes, \
                     or with `format=json` every image of the batch as base64 PNG. A job that \
                     fails or is cancelled is answered 400 with the job's error as message.",
                    vec![
                        (
                            "200",
                            json!({
                                "description": "The first image, or all images with `format=json`.",
                                "content": {
                                    "image/png": {"schema": {"type": "string", "contentMediaType": "image/png"}},
                                    "application/json": {"schema": schema_ref("SampleImages")},
                                },
                            }),
                        ),
                        ("400", response_ref("BadRequest")),
                        ("413", response_ref("TooLarge")),
                    ],
                ),
                "parameters",
                json!([{
                    "name": "format",
                    "in": "query",
                    "required": false,
                    "description": "`json` for `{\"id\", \"images\": [base64 PNG…]}` instead of the first image's PNG bytes.",
                    "schema": {"type": "string", "enum": ["json"]},
                }]),
            ),
            "requestBody",
            json_body("The sampling job.", schema_ref("SampleJob")),
        ),
    );

    // LoRAs.
    add(
        "/v1/loras",
        "get",
        op(
            "listLoras",
            "loras",
            "The `.safetensors` files of the LoRA folder",
            "Sorted by name; an empty list when the daemon has no LoRA folder. Finished \
             training jobs copy their LoRA here.",
            vec![(
                "200",
                json_response(
                    "The LoRA files.",
                    json!({"type": "array", "items": schema_ref("LoraFile")}),
                ),
            )],
        ),
    );
    add(
        "/v1/loras/{name}",
        "get",
        with(
            op(
                "inspectLora",
                "loras",
                "Inspect a LoRA of the LoRA folder",
                "What `fluxlora lora inspect --json` shows: the key format, modules, ranks, \
                 alphas, targeted blocks and the file's metadata. A name with folders, or a \
                 file that is not a readable LoRA, is answered 400.",
                vec![
                    (
                        "200",
                        json_response("The report.", schema_ref("LoraReport")),
                    ),
                    ("400", response_ref("BadRequest")),
                    ("404", response_ref("NotFound")),
                ],
            ),
            "parameters",
            json!([{
                "name": "name",
                "in": "path",
                "required": true,
                "description": "A file name from `GET /v1/loras`.",
                "schema": {"type": "string"},
                "example": "my-style.safetensors",
            }]),
        ),
    );

    // Events.
    add("/v1/ws", "get", ws_operation());

    Value::Object(paths)
}

const WS_DESCRIPTION: &str = "Upgrades to a WebSocket that streams events of all jobs, or \
of the jobs named in `jobs` (an unknown job id is answered 404 before the upgrade; a request \
that is not a WebSocket upgrade is answered 400).\n\n**Text frames** are JSON `Event` \
objects. The first frame is a `hello` (`HelloEvent`): `{\"seq\": <the newest event's seq at \
connect>, \"job\": null, \"type\": \"hello\", \"time\", \"data\": {\"version\", \"jobs\"}}`. \
With `since`, the stored events with `seq > since` of the subscribed jobs are replayed next, \
then live events follow; a client that reconnects passes the last `seq` it saw.\n\n**Binary \
frames** are preview images (a sampling job's latent preview at each step, and a training run's sample images at their optimizer step), with a big-endian header:\n\n| bytes | \
field |\n|---|---|\n| 0..4 | frame type, u32: 1 = preview |\n| 4..8 | image format, u32: 1 \
= JPEG, 2 = PNG (ComfyUI's codes; the daemon sends PNG) |\n| 8..16 | seq, u64 |\n| 16..20 | \
step, u32 |\n| 20..22 | job id length n, u16 |\n| 22..22+n | job id, UTF-8 |\n| rest | the \
image bytes |\n\nPreviews are sent unless `previews=false` and are never stored or \
replayed.\n\nThe server pings every 20 s and closes a connection that has not been heard from \
(pong or message) for 60 s, or that has not taken a frame for 60 s; client pings are \
answered with pongs; client text frames are ignored. The engine never waits for a client: a \
client that falls behind loses previews first, and events it missed are replayed from the \
store, so text events arrive complete and in `seq` order.";

fn ws_operation() -> Map<String, Value> {
    let mut ws = op(
        "connectEvents",
        "events",
        "Live events over a WebSocket",
        WS_DESCRIPTION,
        vec![
            (
                "101",
                json!({"description": "Switching protocols: the WebSocket is open."}),
            ),
            ("400", response_ref("BadRequest")),
            ("404", response_ref("NotFound")),
        ],
    );
    ws.insert(
        "parameters".into(),
        json!([
            {
                "name": "jobs",
                "in": "query",
                "required": false,
                "description": "Comma-separated job ids to follow; all jobs when absent.",
                "schema": {"type": "string"},
                "example": "18f0c2a1b3d-0000,18f0c2a1b3d-0001",
            },
            {
                "name": "since",
                "in": "query",
                "required": false,
                "description": "Replay the stored events with a greater `seq` before live ones.",
                "schema": {"type": "integer", "format": "uint64", "minimum": 0},
            },
            {
                "name": "previews",
                "in": "query",
                "required": false,
                "description": "Send binary preview frames.",
                "schema": {"type": "boolean", "default": true},
            },
            {
                "name": "queue",
                "in": "query",
                "required": false,
                "description": "Events the server holds for this connection while the client is behind; beyond it previews are dropped, then events (replayed from the store when the client catches up).",
                "schema": {"type": "integer", "minimum": 1, "maximum": 4096, "default": 256},
            },
            {
                "name": "token",
                "in": "query",
                "required": false,
                "description": "The daemon's token, for clients that cannot set `Authorization` (browsers).",
                "schema": {"type": "string"},
            },
        ]),
    );
    ws.insert(
        "x-websocket-frames".into(),
        json!({
            "text": {"oneOf": [schema_ref("HelloEvent"), schema_ref("Event")]},
            "binary": schema_ref("PreviewFrame"),
        }),
    );
    ws
}

fn security_schemes() -> Value {
    json!({
        "bearer": {
            "type": "http",
            "scheme": "bearer",
            "description": AUTH_DESCRIPTION,
        },
        "token": {
            "type": "apiKey",
            "in": "query",
            "name": "token",
            "description": AUTH_DESCRIPTION,
        },
    })
}

fn parameters() -> Value {
    json!({
        "JobIdPath": {
            "name": "id",
            "in": "path",
            "required": true,
            "description": "A job id, as `POST /v1/jobs/train` or `/v1/jobs/sample` answered it.",
            "schema": {"type": "string"},
            "example": "18f0c2a1b3d-0000",
        },
    })
}

fn error_response(description: &str) -> Value {
    json_response(description, schema_ref("ErrorBody"))
}

fn responses() -> Value {
    json!({
        "BadRequest": error_response(
            "The request is malformed or does not validate (`bad_request`); `field` names the \
             offending field where one is known."
        ),
        "Unauthorized": error_response(
            "The daemon has a token and the request did not carry it (`unauthorized`)."
        ),
        "Forbidden": error_response(
            "The request came from a browser origin the daemon does not serve (`forbidden`): \
             only loopback origins and those given with `--cors-origin` are."
        ),
        "NotFound": error_response("No such job, file, LoRA or route (`not_found`)."),
        "Conflict": error_response(
            "The job's state does not allow this (`conflict`); the message names the state."
        ),
        "TooLarge": error_response(
            "The request body is over the daemon's limit (`payload_too_large`)."
        ),
        "Internal": error_response("The daemon failed (`internal`)."),
    })
}

fn schemas() -> Value {
    let mut s = Map::new();
    let parts: Vec<(&str, Value)> = vec![
        ("ErrorBody", error_body()),
        ("System", system()),
        ("SubscriberStats", subscriber_stats()),
        ("Models", models()),
        ("ObjectInfo", object_info()),
        ("JobId", job_id()),
        (
            "JobKind",
            json!({"type": "string", "enum": ["train", "sample"]}),
        ),
        ("JobState", job_state()),
        ("JobRecord", job_record()),
        ("SampleJob", sample_job()),
        ("SampleRequest", sample_request()),
        ("LoraChoice", lora_choice()),
        ("SampleImages", sample_images()),
        ("LoraFile", lora_file()),
        ("LoraReport", lora_report()),
        ("Event", event()),
        ("HelloEvent", hello_event()),
        ("PreviewFrame", preview_frame()),
        ("StateData", state_data()),
        ("TrainStartedData", train_started_data()),
        ("StepStats", step_stats()),
        ("StepPathsData", step_paths_data()),
        ("StepPathData", step_path_data()),
        ("ValidationData", validation_data()),
        ("StepData", step_data()),
        ("TrainFinishedData", train_finished_data()),
        ("MessageData", message_data()),
        ("SampleStepData", sample_step_data()),
        ("CachingData", caching_data()),
        ("ImagesData", images_data()),
        ("TrainConfig", train_config()),
        ("Precision", precision()),
        ("DeviceChoice", device_choice()),
        ("DatasetConfig", dataset_config()),
        ("FolderConfig", folder_config()),
        ("Resolution", resolution()),
        ("NetworkConfig", network_config()),
        ("OptimizerConfig", optimizer_config()),
        ("LrSchedule", lr_schedule()),
        ("ObjectiveConfig", objective_config()),
    ];
    for (name, schema) in parts {
        s.insert(name.into(), schema);
    }
    Value::Object(s)
}

/// An object schema with these properties.
fn object(description: &str, required: &[&str], properties: Vec<(&str, Value)>) -> Value {
    let mut props = Map::new();
    for (name, schema) in properties {
        props.insert(name.into(), schema);
    }
    let mut o = Map::new();
    o.insert("type".into(), json!("object"));
    if !description.is_empty() {
        o.insert("description".into(), json!(description));
    }
    if !required.is_empty() {
        o.insert("required".into(), json!(required));
    }
    o.insert("properties".into(), Value::Object(props));
    Value::Object(o)
}

/// An object schema that refuses unknown fields (`deny_unknown_fields`).
fn closed(description: &str, required: &[&str], properties: Vec<(&str, Value)>) -> Value {
    let mut o = object(description, required, properties);
    o["additionalProperties"] = json!(false);
    o
}

fn u64_schema(description: &str) -> Value {
    json!({"type": "integer", "format": "uint64", "minimum": 0, "description": description})
}

fn f64_schema(description: &str) -> Value {
    json!({"type": "number", "format": "double", "description": description})
}

fn string_schema(description: &str) -> Value {
    json!({"type": "string", "description": description})
}

fn path_schema(description: &str) -> Value {
    json!({"type": "string", "description": description})
}

/// The `url` the daemon adds beside a `path` in an event (served events only).
fn url_schema() -> Value {
    json!({"type": ["string", "null"], "description": "`GET` URL of the file under `/v1/jobs/{id}/files/`; null when it lies outside the job's folder. Added to events served over HTTP and WebSocket."})
}

/// The `urls` the daemon adds beside `paths`, one per path.
fn urls_schema() -> Value {
    json!({"type": "array", "items": {"type": ["string", "null"]}, "description": "`GET` URL of each file under `/v1/jobs/{id}/files/` (null for a file outside the job's folder), in the order of `paths`. Added to events served over HTTP and WebSocket."})
}

fn paths_schema(description: &str) -> Value {
    json!({"type": "array", "items": {"type": "string"}, "description": description})
}

/// A field with a default.
fn d(mut schema: Value, default: Value) -> Value {
    schema["default"] = default;
    schema
}

/// An optional integer setting (`Option<u64>`), null or absent when unset.
fn opt_u64(description: &str) -> Value {
    json!({"type": ["integer", "null"], "format": "uint64", "minimum": 0, "description": description, "default": null})
}

fn opt_f64(description: &str) -> Value {
    json!({"type": ["number", "null"], "format": "double", "description": description, "default": null})
}

fn opt_bool(description: &str) -> Value {
    json!({"type": ["boolean", "null"], "description": description, "default": null})
}

fn error_body() -> Value {
    object(
        "Every 4xx/5xx answer's body.",
        &["error"],
        vec![(
            "error",
            object(
                "",
                &["code", "message"],
                vec![
                    (
                        "code",
                        json!({
                            "type": "string",
                            "enum": ["bad_request", "not_found", "conflict", "payload_too_large", "unauthorized", "forbidden", "internal"],
                            "description": "400 `bad_request`, 401 `unauthorized`, 403 `forbidden`, 404 `not_found`, 409 `conflict`, 413 `payload_too_large`, 500 `internal`.",
                        }),
                    ),
                    ("message", string_schema("What went wrong, for people.")),
                    (
                        "field",
                        string_schema(
                            "The offending field's path in the request body (`dataset.folders[0]`, \
                             `request.width`), on 400 answers where one is known.",
                        ),
                    ),
                ],
            ),
        )],
    )
}

fn system() -> Value {
    object(
        "The daemon's state.",
        &[
            "version",
            "model",
            "device",
            "dtype",
            "memory_bytes",
            "peak_memory_bytes",
            "queue",
            "subscribers",
        ],
        vec![
            ("version", string_schema("The daemon's version.")),
            ("model", string_schema("Name of the loaded model.")),
            (
                "device",
                string_schema("Where the model runs: `cpu` or `cuda:N`."),
            ),
            (
                "dtype",
                json!({"type": "string", "enum": ["f32", "bf16", "f16"], "description": "The loaded model's compute dtype."}),
            ),
            (
                "memory_bytes",
                json!({"type": ["integer", "null"], "format": "uint64", "minimum": 0, "description": "Resident memory of the process now (Linux `VmRSS`); null where the OS does not tell."}),
            ),
            (
                "peak_memory_bytes",
                json!({"type": ["integer", "null"], "format": "uint64", "minimum": 0, "description": "Peak resident memory of the process (Linux `VmHWM`); null where the OS does not tell."}),
            ),
            (
                "queue",
                object(
                    "",
                    &["queued", "running"],
                    vec![
                        ("queued", u64_schema("Jobs waiting to run.")),
                        ("running", u64_schema("Jobs running.")),
                    ],
                ),
            ),
            (
                "subscribers",
                json!({
                    "type": "array",
                    "items": schema_ref("SubscriberStats"),
                    "description": "One entry per live event subscription (WebSocket connection); its length is the number of subscribers.",
                }),
            ),
        ],
    )
}

fn subscriber_stats() -> Value {
    object(
        "How one subscriber keeps up, since it subscribed.",
        &["queued", "delivered", "dropped_previews", "dropped_events"],
        vec![
            ("queued", u64_schema("Events waiting in its queue now.")),
            ("delivered", u64_schema("Events handed to it.")),
            (
                "dropped_previews",
                u64_schema("Previews dropped because it fell behind."),
            ),
            (
                "dropped_events",
                u64_schema("Events dropped from its queue (then replayed from the store)."),
            ),
        ],
    )
}

fn models() -> Value {
    object(
        "The loaded model and the models the daemon can see.",
        &["loaded", "available"],
        vec![
            (
                "loaded",
                object(
                    "The model every job samples and trains with.",
                    &["name", "device", "dtype"],
                    vec![
                        (
                            "name",
                            string_schema("The model's name (`tiny` for the built-in model)."),
                        ),
                        (
                            "path",
                            json!({"type": ["string", "null"], "description": "The model file or folder; null for the built-in model."}),
                        ),
                        ("device", string_schema("`cpu` or `cuda:N`.")),
                        (
                            "dtype",
                            json!({"type": "string", "enum": ["f32", "bf16", "f16"]}),
                        ),
                    ],
                ),
            ),
            (
                "available",
                json!({
                    "type": "array",
                    "description": "The built-in model first, then each model folder's entries sorted by name.",
                    "items": object(
                        "",
                        &["name", "kind"],
                        vec![
                            ("name", string_schema("File or folder name (`tiny` for the built-in model).")),
                            (
                                "kind",
                                json!({"type": "string", "enum": ["builtin", "file", "folder"], "description": "`file`: a `.safetensors`/`.sft` file; `folder`: a model folder."}),
                            ),
                            ("path", path_schema("Where it is; absent for the built-in model.")),
                        ],
                    ),
                }),
            ),
        ],
    )
}

fn object_info() -> Value {
    json!({
        "type": "object",
        "description": "ComfyUI's `/object_info` format: node class name → node definition.",
        "additionalProperties": {
            "type": "object",
            "description": "A node definition (`input` {required, optional}, `output`, `output_name`, `name`, `display_name`, `description`, `category`, …).",
            "additionalProperties": true,
        },
    })
}

fn job_id() -> Value {
    object(
        "The id of the queued job.",
        &["id"],
        vec![("id", string_schema("The job id."))],
    )
}

fn job_state() -> Value {
    json!({
        "type": "string",
        "enum": ["queued", "running", "paused", "finished", "cancelled", "failed", "interrupted"],
        "description": "Where a job is in its life. `finished`, `cancelled` and `failed` are final; `interrupted`: the daemon stopped while the job ran or waited (it can be resumed, a training job from its last save, or deleted).",
    })
}

fn job_record() -> Value {
    object(
        "A job as stored (`job.json` in its folder).",
        &[
            "id", "kind", "state", "created", "updated", "request", "outputs", "error",
        ],
        vec![
            ("id", string_schema("The job id.")),
            ("kind", schema_ref("JobKind")),
            ("state", schema_ref("JobState")),
            ("created", f64_schema("Unix seconds.")),
            ("updated", f64_schema("Unix seconds of the last change.")),
            (
                "request",
                json!({
                    "description": "The request as accepted, defaults filled in: a `TrainConfig` for `train` jobs, a `SampleJob` for `sample` jobs.",
                    "oneOf": [schema_ref("TrainConfig"), schema_ref("SampleJob")],
                }),
            ),
            (
                "outputs",
                paths_schema(
                    "Files the job produced: the images of a sampling job; the LoRA of a \
                     training job and its copy in the LoRA folder.",
                ),
            ),
            (
                "error",
                json!({"type": ["string", "null"], "description": "Why the job failed."}),
            ),
        ],
    )
}

fn sample_job() -> Value {
    closed(
        "A sampling job: the request and the LoRAs to apply.",
        &["request"],
        vec![
            ("request", schema_ref("SampleRequest")),
            (
                "loras",
                json!({"type": "array", "items": schema_ref("LoraChoice"), "default": [], "description": "Applied together, each with its strength."}),
            ),
        ],
    )
}

fn sample_request() -> Value {
    closed(
        "One text-to-image request. Unset sizes, steps and guidance take the loaded model's \
         defaults. Values are checked before the job is queued (400 naming the field).",
        &["prompt"],
        vec![
            ("prompt", string_schema("The prompt.")),
            (
                "negative_prompt",
                d(string_schema("Recorded in the PNG metadata."), json!("")),
            ),
            (
                "width",
                json!({"type": ["integer", "null"], "minimum": 16, "maximum": 4096, "multipleOf": 16, "default": null, "description": "Pixels, a multiple of 16 up to 4096; the model's default when unset."}),
            ),
            (
                "height",
                json!({"type": ["integer", "null"], "minimum": 16, "maximum": 4096, "multipleOf": 16, "default": null, "description": "Pixels, a multiple of 16 up to 4096; the model's default when unset."}),
            ),
            (
                "steps",
                json!({"type": ["integer", "null"], "minimum": 1, "maximum": 1000, "default": null, "description": "Sampling steps; the model's default when unset."}),
            ),
            (
                "guidance",
                json!({"type": ["number", "null"], "minimum": 0, "default": null, "description": "Distilled guidance; the model's default when unset."}),
            ),
            (
                "seed",
                d(
                    u64_schema("Seed of the noise; image i of the batch uses seed + i."),
                    json!(0),
                ),
            ),
            (
                "batch_size",
                json!({"type": "integer", "minimum": 1, "maximum": 64, "default": 1, "description": "Images to generate."}),
            ),
        ],
    )
}

fn lora_choice() -> Value {
    closed(
        "A LoRA to apply: a file (`path`) or the live adapter of the running training job \
         (`live_job`), exactly one of the two.",
        &[],
        vec![
            (
                "path",
                json!({"type": ["string", "null"], "default": null, "description": "A LoRA file inside the allowed folders; a bare file name is looked up in the LoRA folder."}),
            ),
            (
                "live_job",
                json!({"type": ["string", "null"], "default": null, "description": "The id of the running training job whose adapter, as trained so far, is applied."}),
            ),
            (
                "strength",
                d(f64_schema("Multiplier of the LoRA's update."), json!(1.0)),
            ),
        ],
    )
}

fn sample_images() -> Value {
    object(
        "`POST /v1/sample?format=json`'s answer.",
        &["id", "images"],
        vec![
            ("id", string_schema("The sampling job's id.")),
            (
                "images",
                json!({"type": "array", "items": {"type": "string", "contentEncoding": "base64", "contentMediaType": "image/png"}, "description": "Every image of the batch, base64 PNG."}),
            ),
        ],
    )
}

fn lora_file() -> Value {
    object(
        "A `.safetensors` file of the LoRA folder.",
        &["name", "path", "size", "modified"],
        vec![
            (
                "name",
                string_schema("File name (use it in `GET /v1/loras/{name}` or `LoraChoice.path`)."),
            ),
            ("path", path_schema("Full path.")),
            (
                "size",
                json!({"type": "integer", "format": "uint64", "minimum": 0, "description": "Bytes."}),
            ),
            (
                "modified",
                json!({"type": ["number", "null"], "format": "double", "description": "Modification time, Unix seconds."}),
            ),
        ],
    )
}

fn lora_report() -> Value {
    let mut report = object(
        "What `fluxlora lora inspect --json` shows about a LoRA file.",
        &["name", "format", "modules"],
        vec![
            ("name", string_schema("The LoRA's name.")),
            (
                "format",
                json!({"type": "string", "enum": ["kohya", "diffusers", "ai_toolkit", "comfy_ui", "one_trainer", "unknown"], "description": "The key layout the file was written in."}),
            ),
            (
                "modules",
                json!({"type": "integer", "description": "Adapted modules."}),
            ),
            (
                "ranks",
                json!({"type": "object", "additionalProperties": {"type": "integer"}, "description": "rank → number of modules."}),
            ),
            (
                "alphas",
                json!({"type": "object", "additionalProperties": {"type": "integer"}, "description": "alpha (as written) → number of modules."}),
            ),
            (
                "double_blocks",
                json!({"type": "array", "items": {"type": "integer"}, "description": "Double-stream block indices targeted."}),
            ),
            (
                "single_blocks",
                json!({"type": "array", "items": {"type": "integer"}, "description": "Single-stream block indices targeted."}),
            ),
            ("double_modules", json!({"type": "integer"})),
            ("single_modules", json!({"type": "integer"})),
            (
                "other_modules",
                json!({"type": "array", "items": {"type": "string"}, "description": "Modules outside the blocks (embedders, final layer)."}),
            ),
            (
                "parameters",
                json!({"type": "integer", "description": "LoRA parameters (down + up elements)."}),
            ),
            (
                "text_encoder_keys",
                json!({"type": "array", "items": {"type": "string"}}),
            ),
            (
                "unmatched",
                json!({"type": "array", "items": {"type": "string"}, "description": "Keys that were not recognised."}),
            ),
            (
                "metadata",
                json!({"type": "object", "additionalProperties": {"type": "string"}, "description": "The file's safetensors metadata."}),
            ),
        ],
    );
    report["additionalProperties"] = json!(true);
    report
}

/// `(type, data schema)` of every stored event, in documentation order.
const EVENT_TYPES: &[(&str, &str)] = &[
    ("state", "StateData"),
    ("caching", "CachingData"),
    ("started", "TrainStartedData"),
    ("step", "StepStats"),
    ("sample", "StepPathsData"),
    ("saved", "StepPathData"),
    ("validation", "ValidationData"),
    ("paused", "StepData"),
    ("resumed", "StepData"),
    ("finished", "TrainFinishedData"),
    ("cancelled", "StepData"),
    ("failed", "MessageData"),
    ("sample_step", "SampleStepData"),
    ("images", "ImagesData"),
    ("error", "MessageData"),
];

fn event() -> Value {
    let types: Vec<&str> = EVENT_TYPES.iter().map(|(t, _)| *t).collect();
    let branches: Vec<Value> = EVENT_TYPES
        .iter()
        .map(|(t, data)| {
            json!({
                "properties": {"type": {"const": t}, "data": schema_ref(data)},
            })
        })
        .collect();
    let mut e = object(
        "One thing that happened to a job. `type` says what; `data` holds its fields:\n\n\
         - `state` {state}: the job's state changed;\n\
         - training (the trainer's events): `caching` {done, total} (before the first step), \
         `started` {total_steps, steps_per_epoch, images, \
         trainable_parameters, resumed_from_step}, `step` (StepStats), `sample` {step, paths} \
         (preview images of `sample_prompts`), `saved` {step, path}, `validation` {step, loss}, \
         `paused` {step}, `resumed` {step}, `finished` {step, path, seconds}, `cancelled` \
         {step}, `failed` {message};\n\
         - sampling: `sample_step` {step, total}, `images` {paths};\n\
         - `error` {message}: the job failed.\n\n\
         Preview images are only sent as binary WebSocket frames (`PreviewFrame`), never as \
         events. Paths are the daemon's file-system paths; beside each, events served over HTTP \
         and WebSocket carry `url`/`urls`, the `GET /v1/jobs/{id}/files/…` address of a file \
         inside the job's folder.",
        &["seq", "job", "type", "time", "data"],
        vec![
            (
                "seq",
                u64_schema("Numbers every event of the daemon, increasing (across restarts too)."),
            ),
            ("job", string_schema("The job's id.")),
            ("type", json!({"type": "string", "enum": types})),
            ("time", f64_schema("Unix seconds.")),
            (
                "data",
                json!({"type": "object", "description": "The type's fields."}),
            ),
        ],
    );
    e["oneOf"] = Value::Array(branches);
    e
}

fn hello_event() -> Value {
    object(
        "The first text frame of a WebSocket connection.",
        &["seq", "job", "type", "time", "data"],
        vec![
            (
                "seq",
                u64_schema("The newest event's seq when the client connected."),
            ),
            ("job", json!({"type": "null"})),
            ("type", json!({"const": "hello"})),
            ("time", f64_schema("Unix seconds.")),
            (
                "data",
                object(
                    "",
                    &["version"],
                    vec![
                        ("version", string_schema("The daemon's version.")),
                        (
                            "jobs",
                            json!({"type": ["array", "null"], "items": {"type": "string"}, "description": "The jobs followed; null for all."}),
                        ),
                    ],
                ),
            ),
        ],
    )
}

fn preview_frame() -> Value {
    json!({
        "type": "string",
        "contentMediaType": "application/octet-stream",
        "description": "A binary WebSocket frame: big-endian u32 frame type (1 = preview), u32 image format (1 = JPEG, 2 = PNG, as ComfyUI), u64 seq, u32 step, u16 job-id length n, n bytes job id (UTF-8), then the image bytes.",
    })
}

fn state_data() -> Value {
    object("", &["state"], vec![("state", schema_ref("JobState"))])
}

fn train_started_data() -> Value {
    object(
        "A training run started (or resumed from a save).",
        &[
            "total_steps",
            "steps_per_epoch",
            "images",
            "trainable_parameters",
            "resumed_from_step",
        ],
        vec![
            (
                "total_steps",
                u64_schema("Optimizer steps of the whole run."),
            ),
            ("steps_per_epoch", u64_schema("Optimizer steps per epoch.")),
            ("images", u64_schema("Images in the dataset.")),
            ("trainable_parameters", u64_schema("Trained elements.")),
            (
                "resumed_from_step",
                json!({"type": ["integer", "null"], "format": "uint64", "minimum": 0, "description": "The step of the save the run continues from."}),
            ),
        ],
    )
}

fn step_stats() -> Value {
    object(
        "Progress of one optimizer step.",
        &[
            "step",
            "total_steps",
            "epoch",
            "loss",
            "loss_ema",
            "lr",
            "grad_norm",
            "it_per_s",
            "eta_s",
            "peak_memory_bytes",
        ],
        vec![
            ("step", u64_schema("Optimizer steps done.")),
            (
                "total_steps",
                u64_schema("Optimizer steps of the whole run."),
            ),
            ("epoch", u64_schema("The current epoch.")),
            ("loss", f64_schema("The step's loss.")),
            (
                "loss_ema",
                f64_schema("Exponential moving average of the loss (β = 0.9, bias-corrected)."),
            ),
            ("lr", f64_schema("The learning rate of the step.")),
            (
                "grad_norm",
                json!({"type": ["number", "null"], "format": "double", "description": "Global gradient norm before clipping, where computed."}),
            ),
            ("it_per_s", f64_schema("Optimizer steps per second.")),
            ("eta_s", f64_schema("Seconds left, estimated.")),
            (
                "peak_memory_bytes",
                json!({"type": ["integer", "null"], "format": "uint64", "minimum": 0, "description": "Peak resident memory of the process so far, where the OS tells."}),
            ),
        ],
    )
}

fn step_paths_data() -> Value {
    object(
        "",
        &["step", "paths"],
        vec![
            ("step", u64_schema("")),
            ("paths", paths_schema("The preview images written.")),
            ("urls", urls_schema()),
        ],
    )
}

fn step_path_data() -> Value {
    object(
        "",
        &["step", "path"],
        vec![
            ("step", u64_schema("")),
            ("path", path_schema("The LoRA saved.")),
            ("url", url_schema()),
        ],
    )
}

fn validation_data() -> Value {
    object(
        "",
        &["step", "loss"],
        vec![
            ("step", u64_schema("")),
            (
                "loss",
                f64_schema("Validation loss at fixed timesteps and noise."),
            ),
        ],
    )
}

fn step_data() -> Value {
    object(
        "",
        &["step"],
        vec![("step", u64_schema("Optimizer steps done."))],
    )
}

fn train_finished_data() -> Value {
    object(
        "",
        &["step", "path", "seconds"],
        vec![
            ("step", u64_schema("")),
            ("path", path_schema("The final LoRA.")),
            ("url", url_schema()),
            ("seconds", f64_schema("Duration of the run.")),
        ],
    )
}

fn message_data() -> Value {
    object("", &["message"], vec![("message", string_schema(""))])
}

fn caching_data() -> Value {
    object(
        "",
        &["done", "total"],
        vec![
            (
                "done",
                u64_schema("Images whose latents and captions are encoded."),
            ),
            ("total", u64_schema("Images in the dataset.")),
        ],
    )
}

fn sample_step_data() -> Value {
    object(
        "",
        &["step", "total"],
        vec![
            ("step", u64_schema("Sampling steps done.")),
            ("total", u64_schema("Sampling steps of the request.")),
        ],
    )
}

fn images_data() -> Value {
    object(
        "",
        &["paths"],
        vec![
            (
                "paths",
                paths_schema("The PNG files written, in batch order."),
            ),
            ("urls", urls_schema()),
        ],
    )
}

fn precision() -> Value {
    json!({"type": "string", "enum": ["f32", "bf16", "f16"]})
}

fn device_choice() -> Value {
    json!({
        "description": "`\"cpu\"`, or `{\"cuda\": N}` for GPU N.",
        "oneOf": [
            {"const": "cpu"},
            {"type": "object", "required": ["cuda"], "properties": {"cuda": {"type": "integer", "minimum": 0}}, "additionalProperties": false},
        ],
    })
}

fn train_config() -> Value {
    closed(
        "One training run. Every field has a default; `dataset.folders` and one of \
         `max_train_steps` / `max_train_epochs` are needed. Field names follow kohya \
         sd-scripts' arguments.",
        &[],
        vec![
            (
                "model",
                json!({"type": ["string", "null"], "default": null, "description": "Base model file or folder (the CLI's `train`); the daemon trains its loaded model and refuses a job that sets this (400, `field`: `model`)."}),
            ),
            (
                "output_dir",
                d(path_schema("Where the run writes (the CLI's `train`); the daemon uses the job's folder."), json!("output")),
            ),
            (
                "output_name",
                d(string_schema("File stem of the saved LoRA (`<output_name>.safetensors`): no slashes, not starting with a dot."), json!("lora")),
            ),
            ("dataset", schema_ref("DatasetConfig")),
            ("network", schema_ref("NetworkConfig")),
            ("optimizer", schema_ref("OptimizerConfig")),
            ("lr_scheduler", schema_ref("LrSchedule")),
            ("objective", schema_ref("ObjectiveConfig")),
            (
                "learning_rate",
                json!({"type": "number", "exclusiveMinimum": 0, "default": 1e-4, "description": "Base learning rate of the DiT adapter."}),
            ),
            (
                "text_encoder_lr",
                json!({"type": ["number", "null"], "minimum": 0, "default": null, "description": "Learning rate of the CLIP text-encoder adapter (`network.train_text_encoder`); `learning_rate` when unset."}),
            ),
            (
                "max_train_steps",
                json!({"type": ["integer", "null"], "minimum": 1, "default": null, "description": "Stop after this many optimizer steps (wins over `max_train_epochs`)."}),
            ),
            (
                "max_train_epochs",
                json!({"type": ["integer", "null"], "minimum": 1, "default": null, "description": "Stop after this many epochs when `max_train_steps` is not set."}),
            ),
            (
                "train_batch_size",
                json!({"type": "integer", "minimum": 1, "default": 1}),
            ),
            (
                "gradient_accumulation_steps",
                json!({"type": "integer", "minimum": 1, "default": 1}),
            ),
            (
                "max_grad_norm",
                json!({"type": "number", "minimum": 0, "default": 1.0, "description": "Clip the global gradient norm to this; 0 disables clipping."}),
            ),
            (
                "mixed_precision",
                d(json!({"$ref": "#/components/schemas/Precision", "description": "Compute precision of the base model (must match the loaded model's dtype); adapters keep f32 master weights."}), json!("f32")),
            ),
            (
                "gradient_checkpointing",
                json!({"type": "boolean", "default": false, "description": "Recompute each block's activations during backward instead of keeping them (not with `network.dropout`)."}),
            ),
            (
                "device",
                d(json!({"$ref": "#/components/schemas/DeviceChoice", "description": "The CLI's `train`; the daemon trains on its own device."}), json!("cpu")),
            ),
            (
                "seed",
                d(u64_schema("Seed of everything random in the run (init, data order, noise, timesteps)."), json!(42)),
            ),
            ("save_every_n_steps", opt_min1("Save every N optimizer steps.")),
            ("save_every_n_epochs", opt_min1("Save every N epochs.")),
            (
                "save_last_n",
                opt_min1("Keep only the newest N intermediate saves (the final save is always kept)."),
            ),
            (
                "save_precision",
                d(json!({"$ref": "#/components/schemas/Precision", "description": "Precision of saved LoRA weights."}), json!("bf16")),
            ),
            ("sample_every_n_steps", opt_min1("Generate the `sample_prompts` previews every N steps.")),
            (
                "sample_prompts",
                json!({"type": "array", "items": {"type": "string"}, "default": [], "description": "Preview prompts, one per entry, with kohya's options (`--w --h --d --s --l --n`)."}),
            ),
            (
                "t5_max_token_length",
                json!({"type": ["integer", "null"], "minimum": 1, "maximum": 4096, "default": null, "description": "T5 sequence length for captions (512 for dev, 256 for schnell); must match the model's; the model's own when unset."}),
            ),
            (
                "validation_dataset",
                json!({"oneOf": [schema_ref("DatasetConfig"), {"type": "null"}], "default": null, "description": "Held-out images for a validation loss at fixed timesteps and noise."}),
            ),
            ("validate_every_n_steps", opt_min1("Compute the validation loss every N steps (and at the end); needs `validation_dataset`.")),
            (
                "full_finetune",
                json!({"type": "boolean", "default": false, "description": "Train every base weight instead of a LoRA; the final save is then a transformer checkpoint."}),
            ),
            (
                "cache_dir",
                json!({"type": ["string", "null"], "default": null, "description": "Folder for cached latents and text embeddings; in memory only when unset."}),
            ),
        ],
    )
}

/// An optional count that must be at least 1 when set.
fn opt_min1(description: &str) -> Value {
    json!({"type": ["integer", "null"], "minimum": 1, "default": null, "description": description})
}

fn dataset_config() -> Value {
    closed(
        "Settings of one training dataset (kohya / ai-toolkit names). Every field has a \
         default; at least one folder is needed.",
        &[],
        vec![
            (
                "folders",
                json!({
                    "type": "array",
                    "items": schema_ref("FolderConfig"),
                    "default": [],
                    "description": "Image folders (at least one). A folder holding images is one image folder; a kohya `N_name` folder name gives its repeats and class tokens. A folder with no images of its own is a kohya `train_data_dir`: its `N_name` subfolders are the image folders. In the daemon every folder must lie inside the allowed folders.",
                }),
            ),
            (
                "caption_extension",
                d(string_schema("Extension of the caption file next to each image (`.txt` also finds `.caption` and back); a leading dot is added if missing."), json!(".txt")),
            ),
            (
                "trigger_word",
                json!({"type": ["string", "null"], "default": null, "description": "Prepended to every caption that lacks it; `[trigger]` and `[name]` in captions are replaced by it."}),
            ),
            (
                "shuffle_caption",
                json!({"type": "boolean", "default": false, "description": "Shuffle the tags of each caption every time it is used, keeping the first `keep_tokens`."}),
            ),
            (
                "keep_tokens",
                json!({"type": "integer", "minimum": 0, "default": 0, "description": "Leading tags kept in place by shuffling and tag dropout."}),
            ),
            (
                "caption_separator",
                json!({"type": "string", "minLength": 1, "default": ",", "description": "Tag separator."}),
            ),
            (
                "caption_dropout_rate",
                json!({"type": "number", "minimum": 0, "maximum": 1, "default": 0.0, "description": "Probability of training an item with an empty caption."}),
            ),
            (
                "caption_tag_dropout_rate",
                json!({"type": "number", "minimum": 0, "maximum": 1, "default": 0.0, "description": "Probability of dropping each non-kept tag."}),
            ),
            (
                "flip_aug",
                json!({"type": "boolean", "default": false, "description": "Mirror images horizontally with probability 1/2."}),
            ),
            (
                "random_crop",
                json!({"type": "boolean", "default": false, "description": "Crop a random window of the resized image instead of the centre."}),
            ),
            (
                "resolution",
                d(json!({"$ref": "#/components/schemas/Resolution"}), json!(512)),
            ),
            (
                "enable_bucket",
                json!({"type": "boolean", "default": true, "description": "Aspect-ratio buckets (kohya `--enable_bucket`)."}),
            ),
            (
                "min_bucket_reso",
                json!({"type": "integer", "minimum": 0, "default": 256, "description": "Smallest bucket side in pixels (rounded down to `bucket_reso_steps`)."}),
            ),
            (
                "max_bucket_reso",
                json!({"type": "integer", "minimum": 0, "default": 1024, "description": "Largest bucket side in pixels (rounded up to `bucket_reso_steps`)."}),
            ),
            (
                "bucket_reso_steps",
                json!({"type": "integer", "minimum": 16, "multipleOf": 16, "default": 64, "description": "Bucket sides are multiples of this (a multiple of 16 for Flux)."}),
            ),
            (
                "bucket_no_upscale",
                json!({"type": "boolean", "default": false, "description": "Never upscale: each image gets its own bucket no larger than itself."}),
            ),
            (
                "weighted_captions",
                json!({"type": "boolean", "default": false, "description": "Parse `(word:1.2)`, `(word)`, `[word]` in captions as prompt weights."}),
            ),
        ],
    )
}

fn folder_config() -> Value {
    json!({
        "description": "A folder path, or a table overriding what its kohya `N_name` name gives.",
        "oneOf": [
            {"type": "string"},
            closed(
                "",
                &["path"],
                vec![
                    ("path", path_schema("An image folder or a kohya `train_data_dir`.")),
                    ("num_repeats", json!({"type": ["integer", "null"], "minimum": 1, "description": "Repeats per epoch of each image."})),
                    ("caption_extension", json!({"type": ["string", "null"], "description": "Overrides the dataset's."})),
                    ("class_tokens", json!({"type": ["string", "null"], "description": "Caption of images without a caption file."})),
                ],
            ),
        ],
    })
}

fn resolution() -> Value {
    json!({
        "description": "Training resolution: a side in pixels (square) or `[width, height]`; at least 16.",
        "oneOf": [
            {"type": "integer", "minimum": 16},
            {"type": "array", "items": {"type": "integer", "minimum": 16}, "minItems": 2, "maxItems": 2},
        ],
    })
}

fn network_config() -> Value {
    closed(
        "LoRA network settings.",
        &[],
        vec![
            (
                "rank",
                json!({"type": "integer", "minimum": 1, "default": 16, "description": "Rank (kohya's `network_dim`)."}),
            ),
            (
                "alpha",
                json!({"type": "number", "exclusiveMinimum": 0, "default": 16.0, "description": "Scale numerator (kohya's `network_alpha`); the update is scaled by alpha / rank."}),
            ),
            (
                "dropout",
                json!({"type": "number", "minimum": 0, "exclusiveMaximum": 1, "default": 0.0, "description": "Dropout on the down projection's output while training (kohya's `network_dropout`)."}),
            ),
            (
                "targets",
                json!({"type": "string", "enum": ["attention", "attention_mlp", "blocks", "all_linear"], "default": "blocks", "description": "Which linears train: attention projections; plus the double blocks' MLPs; every linear inside the blocks; every linear of the model."}),
            ),
            (
                "train_blocks",
                json!({"type": "string", "enum": ["all", "double", "single"], "default": "all", "description": "Which blocks train (kohya's `train_blocks`)."}),
            ),
            (
                "train_transformer",
                json!({"type": "boolean", "default": true, "description": "Train a LoRA on the DiT."}),
            ),
            (
                "train_text_encoder",
                json!({"type": "boolean", "default": false, "description": "Train a LoRA on the CLIP-L text encoder too."}),
            ),
            (
                "include",
                json!({"type": "array", "items": {"type": "string"}, "default": [], "description": "Regexes on the module path: when not empty, only matching modules train."}),
            ),
            (
                "exclude",
                json!({"type": "array", "items": {"type": "string"}, "default": [], "description": "Regexes on the module path: matching modules never train."}),
            ),
        ],
    )
}

const OPTIMIZER_KINDS: &[&str] = &[
    "adamw",
    "adamw8bit",
    "lion",
    "lion8bit",
    "sgd_nesterov",
    "sgd_nesterov8bit",
    "adafactor",
    "prodigy",
];

const OPTIMIZER_ALIASES: &[&str] = &[
    "AdamW",
    "adam_w",
    "AdamW8bit",
    "adamw_8bit",
    "adam_w8bit",
    "Lion",
    "Lion8bit",
    "lion_8bit",
    "SGDNesterov",
    "sgdnesterov",
    "SGDNesterov8bit",
    "sgdnesterov8bit",
    "sgd_nesterov_8bit",
    "Adafactor",
    "AdaFactor",
    "Prodigy",
];

fn optimizer_config() -> Value {
    closed(
        "The optimizer. Every field but `kind` is optional: unset, it takes the reference \
         implementation's default for the kind; a field that does not apply to the kind is \
         refused.",
        &[],
        vec![
            (
                "kind",
                json!({
                    "default": "adamw",
                    "description": "The algorithm; kohya's `--optimizer_type` spellings are accepted too.",
                    "anyOf": [
                        {"type": "string", "enum": OPTIMIZER_KINDS},
                        {"type": "string", "enum": OPTIMIZER_ALIASES, "description": "Accepted on input; stored under the canonical name."},
                    ],
                }),
            ),
            ("weight_decay", opt_f64("Decoupled (AdamW, Lion, Adafactor, Prodigy) or L2 (SGD) weight decay, ≥ 0. Default 0.01 for AdamW/AdamW8bit, else 0.")),
            (
                "betas",
                json!({"type": ["array", "null"], "items": {"type": "number", "minimum": 0, "exclusiveMaximum": 1}, "minItems": 2, "maxItems": 2, "default": null, "description": "(β1, β2); AdamW, Prodigy, Lion. Default (0.9, 0.999), (0.9, 0.99) for Lion."}),
            ),
            ("eps", opt_f64("AdamW/Prodigy: added to the denominator (default 1e-8). Adafactor: regulariser of squared gradients (default 1e-30).")),
            ("momentum", opt_f64("SGD momentum in (0, 1); default 0.9.")),
            ("relative_step", opt_bool("Adafactor: ignore the lr and use min(1e-2, 1/√t) (default true).")),
            ("scale_parameter", opt_bool("Adafactor: multiply the step by max(eps_scale, RMS(param)) (default true).")),
            ("warmup_init", opt_bool("Adafactor: relative step min(1e-6·t, 1/√t); needs relative_step (default false).")),
            ("clip_threshold", opt_f64("Adafactor: the RMS of an update is clipped to this (default 1.0).")),
            ("decay_rate", opt_f64("Adafactor: β2 at step t is 1 − t^decay_rate, ≤ 0 (default −0.8).")),
            ("beta1", opt_f64("Adafactor: first-moment coefficient; unset means no first moment.")),
            ("eps_scale", opt_f64("Adafactor: lower bound of the parameter scale (default 1e-3).")),
            ("d0", opt_f64("Prodigy: initial D estimate (default 1e-6).")),
            ("d_coef", opt_f64("Prodigy: multiplier of the D estimate (default 1.0).")),
            ("growth_rate", opt_f64("Prodigy: D grows at most by this factor per step, ≥ 1 (default unbounded).")),
            ("use_bias_correction", opt_bool("Prodigy: Adam bias correction in the step size (default false).")),
            ("safeguard_warmup", opt_bool("Prodigy: leave the lr out of the D denominator during warmup (default false).")),
            ("decouple", opt_bool("Prodigy: AdamW-style decoupled weight decay (default true).")),
            ("beta3", opt_f64("Prodigy: EMA coefficient of the D statistics (default √β2).")),
            ("block_size", opt_u64("8-bit kinds: elements per quantisation block, 16..=65536 (default 256).")),
            ("min_8bit_size", opt_u64("8-bit kinds: parameters with fewer elements keep f32 state (default 4096).")),
        ],
    )
}

fn lr_schedule() -> Value {
    closed(
        "The learning-rate schedule (kohya's `--lr_scheduler`). Unset fields take \
         transformers' defaults; a field that does not apply to the kind is refused.",
        &[],
        vec![
            (
                "kind",
                json!({
                    "type": "string",
                    "enum": ["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "cosine_with_hard_restarts", "polynomial"],
                    "default": "constant",
                    "description": "The shape (`cosine_with_hard_restarts` is an alias of `cosine_with_restarts`). `constant` has no warmup.",
                }),
            ),
            ("warmup_steps", opt_u64("Warmup length in optimizer steps.")),
            (
                "warmup_ratio",
                json!({"type": ["number", "null"], "minimum": 0, "maximum": 1, "default": null, "description": "Warmup as a fraction of the total steps; excludes `warmup_steps`."}),
            ),
            ("num_cycles", opt_f64("Cosine: number of waves (default 0.5); cosine_with_restarts: number of cycles (default 1).")),
            ("power", opt_f64("Polynomial: the power (default 1.0).")),
            ("lr_end", opt_f64("Polynomial: the final learning rate, absolute, below `learning_rate` (default 1e-7).")),
            (
                "min_lr_ratio",
                json!({"type": ["number", "null"], "minimum": 0, "maximum": 1, "default": null, "description": "Cosine: the floor as a fraction of the base lr (default 0)."}),
            ),
        ],
    )
}

fn objective_config() -> Value {
    closed(
        "Timestep and noise settings (kohya's argument names).",
        &[],
        vec![
            (
                "timestep_sampling",
                json!({"type": "string", "enum": ["uniform", "sigmoid", "shift", "flux_shift"], "default": "sigmoid", "description": "How training timesteps are drawn (kohya's `flux_train_utils`)."}),
            ),
            (
                "sigmoid_scale",
                json!({"type": "number", "exclusiveMinimum": 0, "default": 1.0, "description": "Scale of the normal sample before the sigmoid; larger is closer to uniform."}),
            ),
            (
                "discrete_flow_shift",
                json!({"type": "number", "exclusiveMinimum": 0, "default": 3.0, "description": "The shift of `timestep_sampling = \"shift\"`."}),
            ),
            (
                "guidance_scale",
                json!({"type": "number", "minimum": 0, "default": 1.0, "description": "Distilled guidance fed to dev-style models while training."}),
            ),
            (
                "noise_offset",
                json!({"type": "number", "minimum": 0, "default": 0.0, "description": "Adds offset·n (one value per image and channel) to the noise."}),
            ),
            (
                "multires_noise_iterations",
                json!({"type": "integer", "minimum": 0, "default": 0, "description": "Pyramid noise: coarser noise levels added (0 disables)."}),
            ),
            (
                "multires_noise_discount",
                json!({"type": "number", "minimum": 0, "maximum": 1, "default": 0.3, "description": "Weight of level i is discount^i."}),
            ),
        ],
    )
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::path::PathBuf;

    use serde::Serialize;
    use serde_json::{json, Value};

    use super::{document, EVENT_TYPES};
    use crate::engine::events::{Event, EventKind, JobState};
    use crate::engine::store::{JobKind, JobRecord};
    use crate::engine::{LoraChoice, SampleJob};
    use crate::sample::generate::SampleRequest;
    use crate::train::config::TrainConfig;
    use crate::train::dataset::DatasetConfig;
    use crate::train::events::{StepStats, TrainEvent};
    use crate::train::lr_schedule::LrSchedule;
    use crate::train::network::NetworkConfig;
    use crate::train::objective::ObjectiveConfig;
    use crate::train::optim::OptimizerConfig;

    const METHODS: &[&str] = &[
        "get", "put", "post", "delete", "options", "head", "patch", "trace",
    ];

    /// Every `$ref` string in `v`, with the JSON path where it occurs.
    fn refs(v: &Value, at: String, out: &mut Vec<(String, String)>) {
        match v {
            Value::Object(m) => {
                for (k, child) in m {
                    if k == "$ref" {
                        out.push((
                            at.clone(),
                            child.as_str().unwrap_or("<not a string>").into(),
                        ));
                    } else {
                        refs(child, format!("{at}/{k}"), out);
                    }
                }
            }
            Value::Array(a) => {
                for (i, child) in a.iter().enumerate() {
                    refs(child, format!("{at}/{i}"), out);
                }
            }
            _ => {}
        }
    }

    /// Follows a local `$ref`.
    fn resolve<'a>(doc: &'a Value, v: &'a Value) -> &'a Value {
        match v.get("$ref").and_then(Value::as_str) {
            Some(r) => doc
                .pointer(r.trim_start_matches('#'))
                .unwrap_or_else(|| panic!("{r} does not resolve")),
            None => v,
        }
    }

    fn schema<'a>(doc: &'a Value, name: &str) -> &'a Value {
        doc.pointer(&format!("/components/schemas/{name}"))
            .unwrap_or_else(|| panic!("no schema {name}"))
    }

    #[test]
    fn document_is_openapi_3_1_and_every_ref_resolves() {
        let doc = document();
        assert_eq!(doc["openapi"], "3.1.0");
        assert_eq!(doc["info"]["version"], env!("CARGO_PKG_VERSION"));
        assert!(doc["info"]["title"].is_string());
        let mut found = vec![];
        refs(&doc, String::new(), &mut found);
        assert!(found.len() > 50, "only {} $refs", found.len());
        for (at, r) in &found {
            let pointer = r
                .strip_prefix("#/components/")
                .unwrap_or_else(|| panic!("{at}: $ref {r} is not a local component"));
            assert!(
                doc["components"].pointer(&format!("/{pointer}")).is_some(),
                "{at}: $ref {r} points at nothing"
            );
        }
        // The schemes the guard accepts, both optional (no token configured).
        let schemes = &doc["components"]["securitySchemes"];
        assert_eq!(schemes["bearer"]["type"], "http");
        assert_eq!(schemes["bearer"]["scheme"], "bearer");
        assert_eq!(schemes["token"]["type"], "apiKey");
        assert_eq!(schemes["token"]["in"], "query");
        assert_eq!(schemes["token"]["name"], "token");
        assert!(doc["security"].as_array().unwrap().contains(&json!({})));
        // The document is what /v1/openapi.json serves: plain JSON, stable.
        assert_eq!(
            serde_json::to_string(&doc).unwrap(),
            serde_json::to_string(&document()).unwrap()
        );
    }

    /// `(path, method)` of every `.route("…", web::METHOD()` in `source`, with
    /// `{name:regex}` segments written `{name}` as OpenAPI does.
    fn native_routes(source: &str) -> Vec<(String, String)> {
        let mut out = vec![];
        let mut rest = source;
        while let Some(i) = rest.find(".route(") {
            rest = &rest[i + ".route(".len()..];
            let Some(after_quote) = rest.trim_start().strip_prefix('"') else {
                continue;
            };
            let Some(end) = after_quote.find('"') else {
                break;
            };
            let path = &after_quote[..end];
            let tail = after_quote[end + 1..].trim_start();
            let Some(tail) = tail.strip_prefix(',') else {
                continue;
            };
            let Some(method) = tail.trim_start().strip_prefix("web::") else {
                continue;
            };
            let method: String = method
                .chars()
                .take_while(|c| c.is_ascii_alphabetic())
                .collect();
            out.push((openapi_path(path), method));
        }
        out
    }

    /// `/a/{id}/files/{path:.*}` → `/a/{id}/files/{path}`.
    fn openapi_path(actix: &str) -> String {
        let mut out = String::new();
        let mut in_brace = false;
        let mut skipping = false;
        for c in actix.chars() {
            match c {
                '{' => {
                    in_brace = true;
                    out.push(c);
                }
                '}' if in_brace => {
                    in_brace = false;
                    skipping = false;
                    out.push(c);
                }
                ':' if in_brace => skipping = true,
                _ if skipping => {}
                _ => out.push(c),
            }
        }
        out
    }

    #[test]
    fn route_strings_parse() {
        let src = r#"cfg.route("/v1/a", web::get().to(a))
            .route(
                "/v1/jobs/{id}/files/{path:.*}",
                web::post().to(b),
            )"#;
        assert_eq!(
            native_routes(src),
            vec![
                ("/v1/a".to_string(), "get".to_string()),
                ("/v1/jobs/{id}/files/{path}".to_string(), "post".to_string()),
            ]
        );
    }

    #[test]
    fn every_native_route_is_documented() {
        let doc = document();
        let paths = doc["paths"].as_object().unwrap();
        let routes = native_routes(include_str!("native.rs"));
        assert!(routes.len() >= 12, "found only {routes:?} in native.rs");
        let mut expected: Vec<(String, String)> = vec![];
        for (path, method) in routes {
            // One handler serves the control actions; each is its own documented path.
            if let Some(prefix) = path.strip_suffix("/{action}") {
                for action in ["cancel", "pause", "resume"] {
                    expected.push((format!("{prefix}/{action}"), method.clone()));
                }
            } else {
                expected.push((path, method));
            }
        }
        for (path, method) in [
            ("/v1/ws", "get"),
            ("/v1/models", "get"),
            ("/v1/nodes", "get"),
            ("/v1/openapi.json", "get"),
        ] {
            expected.push((path.into(), method.into()));
        }
        for (path, method) in &expected {
            assert!(
                paths.get(path).and_then(|p| p.get(method)).is_some(),
                "{} {path} is not documented",
                method.to_uppercase()
            );
        }
    }

    #[test]
    fn operations_are_complete() {
        let doc = document();
        let mut ids = BTreeSet::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            let templated: BTreeSet<&str> = path
                .split('/')
                .filter_map(|s| s.strip_prefix('{')?.strip_suffix('}'))
                .collect();
            for (method, op) in item.as_object().unwrap() {
                assert!(METHODS.contains(&method.as_str()), "{path}: {method}");
                let id = op["operationId"].as_str().expect("operationId");
                assert!(ids.insert(id.to_string()), "operationId {id} twice");
                assert!(op["summary"].is_string(), "{method} {path}: no summary");
                let responses = op["responses"].as_object().unwrap();
                assert!(
                    responses.keys().any(|s| s.starts_with('2') || s == "101"),
                    "{method} {path}: no success response"
                );
                for (status, response) in responses {
                    assert!(
                        resolve(&doc, response)["description"].is_string(),
                        "{method} {path} {status}: no description"
                    );
                }
                let declared: BTreeSet<&str> = op["parameters"]
                    .as_array()
                    .map(|ps| {
                        ps.iter()
                            .map(|p| resolve(&doc, p))
                            .filter(|p| p["in"] == "path")
                            .map(|p| {
                                assert_eq!(p["required"], true, "{method} {path}");
                                p["name"].as_str().unwrap()
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                assert_eq!(declared, templated, "{method} {path}: path parameters");
            }
        }
    }

    /// Checks `schema`'s properties against `value`, a serialised default of the
    /// Rust type: the same field names (fields skipped when unset are documented
    /// with a null default) and documented defaults equal to the real ones.
    fn check_against(doc: &Value, name: &str, value: &impl Serialize) {
        let value = serde_json::to_value(value).unwrap();
        let value = value.as_object().unwrap();
        let schema = schema(doc, name);
        let props = schema["properties"].as_object().unwrap();
        for key in value.keys() {
            assert!(props.contains_key(key), "{name}.{key} is not documented");
        }
        for (key, prop) in props {
            match (value.get(key), prop.get("default")) {
                (Some(actual), Some(documented)) => {
                    assert_eq!(documented, actual, "{name}.{key}: documented default");
                }
                (None, Some(documented)) => {
                    assert_eq!(documented, &Value::Null, "{name}.{key}: skipped when unset");
                }
                (None, None) => panic!("{name}.{key} is documented but not a field"),
                (Some(_), None) => {}
            }
        }
    }

    #[test]
    fn config_schemas_match_the_rust_types() {
        let doc = document();
        check_against(&doc, "TrainConfig", &TrainConfig::default());
        check_against(&doc, "DatasetConfig", &DatasetConfig::default());
        check_against(&doc, "NetworkConfig", &NetworkConfig::default());
        check_against(&doc, "OptimizerConfig", &OptimizerConfig::default());
        check_against(&doc, "LrSchedule", &LrSchedule::default());
        check_against(&doc, "ObjectiveConfig", &ObjectiveConfig::default());
        let mut request = SampleRequest::new("a cat");
        request.prompt = String::new();
        check_against(&doc, "SampleRequest", &request);
        let choice: LoraChoice = serde_json::from_value(json!({})).unwrap();
        check_against(&doc, "LoraChoice", &choice);
        let job: SampleJob = serde_json::from_value(json!({"request": {"prompt": "x"}})).unwrap();
        check_against(&doc, "SampleJob", &job);

        // Every field of TrainConfig (which serialises unset options as null) is
        // documented with a default or as a nested config.
        let train = serde_json::to_value(TrainConfig::default()).unwrap();
        let props = schema(&doc, "TrainConfig")["properties"]
            .as_object()
            .unwrap();
        assert_eq!(
            props.keys().collect::<BTreeSet<_>>(),
            train.as_object().unwrap().keys().collect::<BTreeSet<_>>()
        );
        // Optional optimizer and schedule settings are all documented.
        let optimizer = schema(&doc, "OptimizerConfig")["properties"]
            .as_object()
            .unwrap();
        assert_eq!(optimizer.len(), 21);
        let schedule = schema(&doc, "LrSchedule")["properties"]
            .as_object()
            .unwrap();
        assert_eq!(schedule.len(), 7);

        // `additionalProperties: false` where the type refuses unknown fields.
        for (name, refused) in [
            (
                "TrainConfig",
                serde_json::from_value::<TrainConfig>(json!({"nope": 1})).is_err(),
            ),
            (
                "DatasetConfig",
                serde_json::from_value::<DatasetConfig>(json!({"nope": 1})).is_err(),
            ),
            (
                "NetworkConfig",
                serde_json::from_value::<NetworkConfig>(json!({"nope": 1})).is_err(),
            ),
            (
                "OptimizerConfig",
                serde_json::from_value::<OptimizerConfig>(json!({"nope": 1})).is_err(),
            ),
            (
                "LrSchedule",
                serde_json::from_value::<LrSchedule>(json!({"nope": 1})).is_err(),
            ),
            (
                "ObjectiveConfig",
                serde_json::from_value::<ObjectiveConfig>(json!({"nope": 1})).is_err(),
            ),
            (
                "SampleRequest",
                serde_json::from_value::<SampleRequest>(json!({"prompt": "x", "nope": 1})).is_err(),
            ),
            (
                "LoraChoice",
                serde_json::from_value::<LoraChoice>(json!({"nope": 1})).is_err(),
            ),
            (
                "SampleJob",
                serde_json::from_value::<SampleJob>(json!({"request": {"prompt": "x"}, "nope": 1}))
                    .is_err(),
            ),
        ] {
            assert!(refused, "{name} accepts unknown fields");
            assert_eq!(schema(&doc, name)["additionalProperties"], false, "{name}");
        }

        // Enumerated values deserialise.
        for kind in super::OPTIMIZER_KINDS
            .iter()
            .chain(super::OPTIMIZER_ALIASES)
        {
            serde_json::from_value::<OptimizerConfig>(json!({"kind": kind}))
                .unwrap_or_else(|e| panic!("optimizer kind {kind}: {e}"));
        }
        let enums = |v: &Value| -> Vec<String> {
            v["enum"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s.as_str().unwrap().to_string())
                .collect()
        };
        for kind in enums(&schema(&doc, "LrSchedule")["properties"]["kind"]) {
            serde_json::from_value::<LrSchedule>(json!({"kind": kind})).unwrap();
        }
        for targets in enums(&schema(&doc, "NetworkConfig")["properties"]["targets"]) {
            serde_json::from_value::<NetworkConfig>(json!({"targets": targets})).unwrap();
        }
        for blocks in enums(&schema(&doc, "NetworkConfig")["properties"]["train_blocks"]) {
            serde_json::from_value::<NetworkConfig>(json!({"train_blocks": blocks})).unwrap();
        }
        for sampling in enums(&schema(&doc, "ObjectiveConfig")["properties"]["timestep_sampling"]) {
            serde_json::from_value::<ObjectiveConfig>(json!({"timestep_sampling": sampling}))
                .unwrap();
        }
        for p in enums(schema(&doc, "Precision")) {
            serde_json::from_value::<TrainConfig>(json!({"mixed_precision": p})).unwrap();
        }
        for device in [json!("cpu"), json!({"cuda": 1})] {
            serde_json::from_value::<TrainConfig>(json!({"device": device})).unwrap();
        }
        for folders in [json!(["a"]), json!([{"path": "a", "num_repeats": 2}])] {
            serde_json::from_value::<DatasetConfig>(
                json!({"folders": folders, "resolution": [512, 768]}),
            )
            .unwrap();
        }
        for state in enums(schema(&doc, "JobState")) {
            serde_json::from_value::<JobState>(json!(state)).unwrap();
        }
    }

    #[test]
    fn records_and_events_match_the_documented_shapes() {
        let doc = document();
        let record = JobRecord {
            id: "j".into(),
            kind: JobKind::Sample,
            state: JobState::Queued,
            created: 0.0,
            updated: 0.0,
            request: json!({}),
            outputs: vec![],
            error: None,
        };
        let keys =
            |v: &Value| -> BTreeSet<String> { v.as_object().unwrap().keys().cloned().collect() };
        let required = |s: &Value| -> BTreeSet<String> {
            s["required"]
                .as_array()
                .map(|r| r.iter().map(|k| k.as_str().unwrap().to_string()).collect())
                .unwrap_or_default()
        };
        let record = serde_json::to_value(record).unwrap();
        assert_eq!(keys(&record), required(schema(&doc, "JobRecord")));
        assert_eq!(
            keys(&record),
            keys(&schema(&doc, "JobRecord")["properties"])
        );
        let stats = serde_json::to_value(crate::engine::bus::SubscriberStats::default()).unwrap();
        assert_eq!(keys(&stats), required(schema(&doc, "SubscriberStats")));

        let path = PathBuf::from("/data/jobs/j/lora.safetensors");
        let step = StepStats {
            step: 1,
            total_steps: 2,
            epoch: 1,
            loss: 0.5,
            loss_ema: 0.5,
            lr: 1e-4,
            grad_norm: None,
            it_per_s: 1.0,
            eta_s: 1.0,
            peak_memory_bytes: None,
        };
        let train = [
            TrainEvent::Caching { done: 1, total: 2 },
            TrainEvent::Started {
                total_steps: 2,
                steps_per_epoch: 1,
                images: 1,
                trainable_parameters: 1,
                resumed_from_step: None,
            },
            TrainEvent::Step(step),
            TrainEvent::Sample {
                step: 1,
                paths: vec![path.clone()],
            },
            TrainEvent::Saved {
                step: 1,
                path: path.clone(),
            },
            TrainEvent::Validation { step: 1, loss: 0.5 },
            TrainEvent::Paused { step: 1 },
            TrainEvent::Resumed { step: 1 },
            TrainEvent::Finished {
                step: 2,
                path: path.clone(),
                seconds: 1.0,
            },
            TrainEvent::Cancelled { step: 1 },
            TrainEvent::Failed {
                message: "x".into(),
            },
        ];
        let mut kinds: Vec<EventKind> = vec![EventKind::State {
            state: JobState::Running,
        }];
        kinds.extend(train.into_iter().map(|event| EventKind::Train { event }));
        kinds.extend([
            EventKind::SampleStep { step: 1, total: 2 },
            EventKind::Images { paths: vec![path] },
            EventKind::Error {
                message: "x".into(),
            },
        ]);
        let event_schema = schema(&doc, "Event");
        let mut seen = BTreeSet::new();
        for kind in kinds {
            let wire = Event {
                seq: 7,
                job: "j".into(),
                time: 1.5,
                kind,
            }
            .to_json();
            assert_eq!(keys(&wire), required(event_schema), "{wire}");
            let ty = wire["type"].as_str().unwrap();
            let (_, data_schema) = EVENT_TYPES
                .iter()
                .find(|(t, _)| *t == ty)
                .unwrap_or_else(|| panic!("event type {ty} is not documented"));
            let data_schema = schema(&doc, data_schema);
            assert_eq!(keys(&wire["data"]), required(data_schema), "data of {ty}");
            // `url`/`urls` are added by the server beside `path`/`paths`.
            let mut documented = keys(&data_schema["properties"]);
            documented.retain(|k| k != "url" && k != "urls");
            assert_eq!(keys(&wire["data"]), documented, "data of {ty}");
            seen.insert(ty.to_string());
        }
        let documented: BTreeSet<String> = EVENT_TYPES.iter().map(|(t, _)| t.to_string()).collect();
        assert_eq!(seen, documented);
        let branches = event_schema["oneOf"].as_array().unwrap();
        assert_eq!(branches.len(), EVENT_TYPES.len());
        // Previews never become text events.
        let preview = Event {
            seq: 1,
            job: "j".into(),
            time: 0.0,
            kind: EventKind::Preview {
                step: 1,
                png: vec![].into(),
            },
        };
        assert!(!documented.contains(preview.to_json()["type"].as_str().unwrap()));
    }
}
