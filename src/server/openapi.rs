//! The OpenAPI 3.1 document of the native `/v1` API, served at `GET /v1/openapi.json`.
//!
//! Owns: [`document`]. The paths come from the handlers' `#[utoipa::path]`
//! attributes, the schemas from the `ToSchema` derives of the request, record
//! and event types; written here by hand are only the prose (the API's and the
//! security schemes' descriptions), the WebSocket frames, and the schemas of the
//! types whose serde is hand-written ([`Event`], `Resolution`, `FolderConfig`).
//! Its test checks the document lists exactly the routes the app registers and
//! parses as OpenAPI 3.1.
//!
//! Must not: call the engine; it only describes (and serves itself).

use actix_web::http::Method;
use actix_web::HttpResponse;
use serde_json::json;
use utoipa::openapi::extensions::ExtensionsBuilder;
use utoipa::openapi::schema::{
    AdditionalProperties, ArrayBuilder, KnownFormat, Object, ObjectBuilder, OneOfBuilder, Schema,
    SchemaFormat, SchemaType, Type,
};
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{Ref, RefOr};
use utoipa::{Modify, OpenApi, PartialSchema, ToSchema};

use super::errors::{
    BadRequest, Conflict, ErrorBody, Forbidden, Internal, NotFound, TooLarge, Unauthorized,
};
use super::present::FILE_URL_KEYS;
use super::route_table::RouteTable;
use super::{native, ws};
use crate::engine::events::{Event, EventKind};
use crate::train::dataset::{FolderConfig, Resolution};
use crate::train::events::TrainEvent;

/// The OpenAPI 3.1 document of the native API.
pub(crate) fn document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

pub(super) fn routes(table: &mut RouteTable) {
    table.add(Method::GET, "/v1/openapi.json", openapi_json);
}

/// This document.
#[utoipa::path(
    get,
    path = "/v1/openapi.json",
    tag = "system",
    operation_id = "getOpenApi",
    responses((status = 200, description = "The OpenAPI 3.1 document of the native API.", body = Object))
)]
async fn openapi_json() -> HttpResponse {
    HttpResponse::Ok().json(document())
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "fluxlora native API",
        description = INFO_DESCRIPTION,
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    servers((url = "http://127.0.0.1:7860", description = "The daemon with its default address (`fluxlora serve`).")),
    paths(
        native::system::system,
        native::models::list_models,
        native::system::object_info,
        openapi_json,
        native::jobs::list_jobs,
        native::jobs::submit_train,
        native::jobs::submit_sample,
        native::jobs::get_job,
        native::jobs::delete_job,
        native::jobs::control_job,
        native::jobs::job_events,
        native::jobs::job_file,
        native::sample::sample_now,
        native::loras::list_loras,
        native::loras::get_lora,
        ws::connect,
    ),
    components(
        schemas(ErrorBody, Event, native::jobs::ControlAction),
        responses(BadRequest, Unauthorized, Forbidden, NotFound, Conflict, TooLarge, Internal),
    ),
    tags(
        (name = "system", description = "The daemon, its model and this document."),
        (name = "jobs", description = "Training and sampling jobs: submit, list, steer, delete, events and files."),
        (name = "sampling", description = "Synchronous sampling."),
        (name = "loras", description = "The LoRA folder."),
        (name = "events", description = "Live events over a WebSocket."),
    ),
    security((), ("bearer" = []), ("token" = [])),
    modifiers(&HandWritten),
)]
struct ApiDoc;

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

/// What the derives cannot say: the security schemes, the answers every route
/// can give, the WebSocket frames, and what a job record's `request` holds.
struct HandWritten;

impl Modify for HandWritten {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(AUTH_DESCRIPTION))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "token",
            SecurityScheme::ApiKey(ApiKey::Query(ApiKeyValue::with_description(
                "token",
                AUTH_DESCRIPTION,
            ))),
        );
        components
            .schemas
            .insert("HelloEvent".into(), hello_event());
        components
            .schemas
            .insert("PreviewFrame".into(), preview_frame());
        // `JobRecord.request` is stored as JSON; it holds one of the two requests.
        if let Some(RefOr::T(Schema::Object(record))) = components.schemas.get_mut("JobRecord") {
            record.properties.insert(
                "request".into(),
                OneOfBuilder::new()
                    .item(Ref::from_schema_name("TrainConfig"))
                    .item(Ref::from_schema_name("SampleJob"))
                    .description(Some(
                        "The request as accepted, defaults filled in: a `TrainConfig` for \
                         `train` jobs, a `SampleJob` for `sample` jobs.",
                    ))
                    .into(),
            );
        }

        for (path, item) in doc.paths.paths.iter_mut() {
            for op in [
                &mut item.get,
                &mut item.post,
                &mut item.delete,
                &mut item.put,
                &mut item.patch,
            ]
            .into_iter()
            .flatten()
            {
                // The guard answers every route 401 or 403; any can fail with 500.
                for (status, name) in [
                    ("401", "Unauthorized"),
                    ("403", "Forbidden"),
                    ("500", "Internal"),
                ] {
                    op.responses
                        .responses
                        .entry(status.into())
                        .or_insert_with(|| Ref::from_response_name(name).into());
                }
                if path == "/v1/ws" {
                    let frames = json!({
                        "text": {"oneOf": [
                            {"$ref": "#/components/schemas/HelloEvent"},
                            {"$ref": "#/components/schemas/Event"},
                        ]},
                        "binary": {"$ref": "#/components/schemas/PreviewFrame"},
                    });
                    op.extensions.get_or_insert_with(Default::default).merge(
                        ExtensionsBuilder::new()
                            .add("x-websocket-frames", frames)
                            .build(),
                    );
                }
            }
        }
    }
}

/// A schema with this description.
fn described(schema: impl Into<Object>, description: &str) -> RefOr<Schema> {
    let mut object = schema.into();
    object.description = Some(description.into());
    RefOr::T(Schema::Object(object))
}

fn u64_schema() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::Integer)
        .format(Some(SchemaFormat::KnownFormat(KnownFormat::Int64)))
        .minimum(Some(0))
        .build()
}

fn string_schema() -> Object {
    ObjectBuilder::new().schema_type(Type::String).build()
}

fn f64_schema() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::Number)
        .format(Some(SchemaFormat::KnownFormat(KnownFormat::Double)))
        .build()
}

/// The first text frame of a WebSocket connection.
fn hello_event() -> RefOr<Schema> {
    let jobs = ArrayBuilder::new()
        .schema_type(SchemaType::from_iter([Type::Array, Type::Null]))
        .items(string_schema())
        .description(Some("The jobs followed; null for all."))
        .build();
    let data = ObjectBuilder::new()
        .property(
            "version",
            described(string_schema(), "The daemon's version."),
        )
        .required("version")
        .property("jobs", jobs);
    ObjectBuilder::new()
        .description(Some("The first text frame of a WebSocket connection."))
        .property(
            "seq",
            described(
                u64_schema(),
                "The newest event's seq when the client connected.",
            ),
        )
        .property("job", ObjectBuilder::new().schema_type(Type::Null))
        .property(
            "type",
            ObjectBuilder::new()
                .schema_type(Type::String)
                .enum_values(Some(["hello"])),
        )
        .property("time", described(f64_schema(), "Unix seconds."))
        .property("data", data)
        .required("seq")
        .required("job")
        .required("type")
        .required("time")
        .required("data")
        .into()
}

/// A binary WebSocket frame (layout in `ws`).
fn preview_frame() -> RefOr<Schema> {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .content_media_type("application/octet-stream")
        .description(Some(
            "A binary WebSocket frame: big-endian u32 frame type (1 = preview), u32 image \
             format (1 = JPEG, 2 = PNG, as ComfyUI), u64 seq, u32 step, u16 job-id length n, \
             n bytes job id (UTF-8), then the image bytes.",
        ))
        .into()
}

const EVENT_DESCRIPTION: &str = "One thing that happened to a job: `{\"seq\", \"job\", \"type\", \
\"time\", \"data\"}`, where `type` says what and `data` holds its fields (one schema per type, \
below). Training events carry the trainer's own types (`caching`, `started`, `step`, `sample`, \
`saved`, …); `state` reports a change of the job's state and `error` a failed job.\n\n\
Preview images are only sent as binary WebSocket frames (`PreviewFrame`), never as events. \
Paths are the daemon's file-system paths; beside each, events served over HTTP and WebSocket \
carry `url`/`urls`, the `GET /v1/jobs/{id}/files/…` address of a file inside the job's folder.";

/// `(type, data)` of every text event, derived from [`EventKind`] and
/// [`TrainEvent`]: a training event goes out under the trainer's own type, and
/// previews never become text events.
fn event_types() -> Vec<(String, RefOr<Schema>)> {
    let mut out = vec![];
    for (ty, data) in tagged_variants(EventKind::schema()) {
        match ty.as_str() {
            "train" => out.extend(tagged_variants(TrainEvent::schema())),
            "preview" => {}
            _ => out.push((ty, data)),
        }
    }
    // The presentation adds a URL beside every file.
    for (_, data) in &mut out {
        if let RefOr::T(Schema::Object(data)) = data {
            for (file_key, url_key) in FILE_URL_KEYS {
                if !data.properties.contains_key(file_key) {
                    continue;
                }
                let url = ObjectBuilder::new()
                    .schema_type(SchemaType::from_iter([Type::String, Type::Null]));
                let schema: RefOr<Schema> = if file_key == "paths" {
                    ArrayBuilder::new()
                        .items(url)
                        .description(Some(
                            "`GET` URL of each file under `/v1/jobs/{id}/files/` (null for a \
                             file outside the job's folder), in the order of `paths`. Added \
                             to events served over HTTP and WebSocket.",
                        ))
                        .into()
                } else {
                    url.description(Some(
                        "`GET` URL of the file under `/v1/jobs/{id}/files/`; null when it \
                         lies outside the job's folder. Added to events served over HTTP \
                         and WebSocket.",
                    ))
                    .into()
                };
                data.properties.insert(url_key.into(), schema);
            }
        }
    }
    out
}

/// `(tag, fields)` of each variant of an enum serialised with `#[serde(tag = "type")]`.
fn tagged_variants(schema: RefOr<Schema>) -> Vec<(String, RefOr<Schema>)> {
    let RefOr::T(Schema::OneOf(one_of)) = schema else {
        panic!("a tagged enum derives a oneOf schema");
    };
    one_of
        .items
        .into_iter()
        .map(|variant| match variant {
            // A struct variant: its fields and the tag.
            RefOr::T(Schema::Object(mut fields)) => {
                let tag = tag_of(&fields);
                fields.properties.shift_remove("type");
                fields.required.retain(|r| r != "type");
                (tag, RefOr::T(Schema::Object(fields)))
            }
            // A newtype variant: the inner type, all of it, and the tag.
            RefOr::T(Schema::AllOf(all_of)) => {
                let mut tag = None;
                let mut inner = None;
                for part in all_of.items {
                    match part {
                        RefOr::T(Schema::Object(o)) if o.properties.contains_key("type") => {
                            tag = Some(tag_of(&o));
                        }
                        other => inner = Some(other),
                    }
                }
                (
                    tag.expect("a newtype variant has its tag"),
                    inner.expect("a newtype variant has its type"),
                )
            }
            _ => panic!("unexpected variant schema"),
        })
        .collect()
}

fn tag_of(variant: &Object) -> String {
    match variant.properties.get("type") {
        Some(RefOr::T(Schema::Object(tag))) => tag
            .enum_values
            .as_ref()
            .and_then(|v| v.first())
            .and_then(|v| v.as_str())
            .expect("the tag is a one-value enum")
            .to_string(),
        _ => panic!("a tagged variant has a `type` property"),
    }
}

/// `step` → `StepEvent`, `sample_step` → `SampleStepEvent`.
fn event_schema_name(ty: &str) -> String {
    let mut name: String = ty
        .split('_')
        .map(|part| {
            let mut c = part.chars();
            c.next()
                .map(|first| first.to_uppercase().chain(c).collect::<String>())
                .unwrap_or_default()
        })
        .collect();
    name.push_str("Event");
    name
}

/// One event of one type, as served.
fn event_of_type(ty: &str, data: RefOr<Schema>) -> RefOr<Schema> {
    ObjectBuilder::new()
        .property(
            "seq",
            described(
                u64_schema(),
                "Numbers every event of the daemon, increasing (across restarts too).",
            ),
        )
        .property("job", described(string_schema(), "The job's id."))
        .property(
            "type",
            ObjectBuilder::new()
                .schema_type(Type::String)
                .enum_values(Some([ty])),
        )
        .property("time", described(f64_schema(), "Unix seconds."))
        .property("data", data)
        .required("seq")
        .required("job")
        .required("type")
        .required("time")
        .required("data")
        .into()
}

// `Event` serialises by hand (`Event::to_json`), so its schema is put together
// here from the derived schemas of its kinds.
impl PartialSchema for Event {
    fn schema() -> RefOr<Schema> {
        let mut one_of = OneOfBuilder::new().description(Some(EVENT_DESCRIPTION));
        for (ty, _) in event_types() {
            one_of = one_of.item(Ref::from_schema_name(event_schema_name(&ty)));
        }
        one_of.into()
    }
}

impl ToSchema for Event {
    fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
        for (ty, data) in event_types() {
            schemas.push((event_schema_name(&ty), event_of_type(&ty, data)));
        }
        // What the kinds' fields refer to (JobState, StepStats, …), but not the
        // kinds themselves: they are flattened into the events above.
        let mut referenced = vec![];
        <EventKind as ToSchema>::schemas(&mut referenced);
        schemas.extend(
            referenced
                .into_iter()
                .filter(|(name, _)| name != "TrainEvent" && name != "EventKind"),
        );
    }
}

// `Resolution` and `FolderConfig` deserialise by hand from two shapes each.
impl PartialSchema for Resolution {
    fn schema() -> RefOr<Schema> {
        let side = || {
            ObjectBuilder::new()
                .schema_type(Type::Integer)
                .minimum(Some(16))
        };
        OneOfBuilder::new()
            .description(Some(
                "Training resolution: a side in pixels (square) or `[width, height]`; at least 16.",
            ))
            .item(side())
            .item(
                ArrayBuilder::new()
                    .items(side())
                    .min_items(Some(2))
                    .max_items(Some(2)),
            )
            .into()
    }
}

impl ToSchema for Resolution {}

impl PartialSchema for FolderConfig {
    fn schema() -> RefOr<Schema> {
        let optional = |ty: Type, description: &str| {
            ObjectBuilder::new()
                .schema_type(SchemaType::from_iter([ty, Type::Null]))
                .description(Some(description))
        };
        let table = ObjectBuilder::new()
            .property(
                "path",
                described(
                    string_schema(),
                    "An image folder or a kohya `train_data_dir`.",
                ),
            )
            .required("path")
            .property(
                "num_repeats",
                optional(Type::Integer, "Repeats per epoch of each image.").minimum(Some(1)),
            )
            .property(
                "caption_extension",
                optional(Type::String, "Overrides the dataset's."),
            )
            .property(
                "class_tokens",
                optional(Type::String, "Caption of images without a caption file."),
            )
            .additional_properties(Some(AdditionalProperties::FreeForm(false)));
        OneOfBuilder::new()
            .description(Some(
                "A folder path, or a table overriding what its kohya `N_name` name gives.",
            ))
            .item(string_schema())
            .item(table)
            .into()
    }
}

impl ToSchema for FolderConfig {}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::collections::BTreeSet;
    use std::path::PathBuf;
    use std::rc::Rc;

    use actix_web::{test as actix_test, web, App, HttpResponse};
    use serde::Serialize;
    use serde_json::{json, Value};

    use crate::engine::events::{Event, EventKind, JobState};
    use crate::engine::store::{JobKind, JobRecord};
    use crate::engine::{LoraChoice, SampleJob};
    use crate::sample::generate::SampleRequest;
    use crate::sample::samplers::Sampler;
    use crate::sample::schedule::Scheduler;
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

    fn document() -> Value {
        serde_json::to_value(super::document()).unwrap()
    }

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

    /// Follows local `$ref`s.
    fn resolve<'a>(doc: &'a Value, v: &'a Value) -> &'a Value {
        match v.get("$ref").and_then(Value::as_str) {
            Some(r) => resolve(
                doc,
                doc.pointer(r.trim_start_matches('#'))
                    .unwrap_or_else(|| panic!("{r} does not resolve")),
            ),
            None => v,
        }
    }

    fn schema<'a>(doc: &'a Value, name: &str) -> &'a Value {
        doc.pointer(&format!("/components/schemas/{name}"))
            .unwrap_or_else(|| panic!("no schema {name}"))
    }

    /// `{name:regex}` segments of an actix pattern written `{name}`, as OpenAPI does.
    fn openapi_path(actix: &str) -> String {
        actix
            .split('/')
            .map(|segment| match segment.strip_prefix('{') {
                Some(inner) => format!("{{{}}}", inner.split([':', '}']).next().unwrap()),
                None => segment.to_string(),
            })
            .collect::<Vec<_>>()
            .join("/")
    }

    #[actix_web::test]
    async fn the_document_lists_exactly_the_routes_the_app_serves_and_parses_as_openapi_3_1() {
        // The routes as the app registers them...
        let registered = Rc::new(RefCell::new(vec![]));
        let app = {
            let registered = registered.clone();
            actix_test::init_service(
                App::new()
                    .configure(move |cfg| {
                        // The native routes: the ones the document lists.
                        *registered.borrow_mut() = crate::server::routes(cfg)
                            .into_iter()
                            .filter(|(_, path)| path.starts_with("/v1/"))
                            .collect()
                    })
                    .default_service(web::to(|| async { HttpResponse::ImATeapot().finish() })),
            )
            .await
        };
        let registered = registered.take();
        assert!(registered.len() >= 16, "{registered:?}");
        // ... each really served (not by the default service) ...
        for (method, pattern) in &registered {
            let uri = openapi_path(pattern)
                .replace("{id}", "j")
                .replace("{path}", "samples/a.png")
                .replace("{action}", "cancel")
                .replace("{name}", "a.safetensors");
            let req = actix_test::TestRequest::default()
                .method(method.clone())
                .uri(&uri)
                .to_request();
            let res = actix_test::call_service(&app, req).await;
            assert_ne!(res.status(), 418, "{method} {uri} is not served");
        }
        let served: BTreeSet<(String, String)> = registered
            .iter()
            .map(|(m, p)| (m.as_str().to_lowercase(), openapi_path(p)))
            .collect();
        assert_eq!(
            served.len(),
            registered.len(),
            "a route is registered twice"
        );

        // ... are the operations of the document, read as OpenAPI 3.1 by a
        // maintained parser: no more, no fewer.
        let text = serde_json::to_string(&super::document()).unwrap();
        let spec = oas3::from_json(&text).unwrap_or_else(|e| panic!("not OpenAPI: {e}"));
        spec.validate_version().expect("OpenAPI 3.1");
        let documented: BTreeSet<(String, String)> = spec
            .operations()
            .map(|(path, method, _)| (method.as_str().to_lowercase(), path))
            .collect();
        assert_eq!(documented, served);
        // Every operation's parameters, body and answers resolve.
        for (path, method, op) in spec.operations() {
            op.parameters(&spec)
                .unwrap_or_else(|e| panic!("{method} {path}: parameters: {e}"));
            op.request_body(&spec)
                .unwrap_or_else(|e| panic!("{method} {path}: body: {e}"));
            let answers = op.responses(&spec);
            assert_eq!(
                answers.len(),
                op.responses.as_ref().map_or(0, |r| r.len()),
                "{method} {path}: an answer does not resolve"
            );
            for (status, answer) in answers {
                for (media, content) in answer.content {
                    content
                        .schema(&spec)
                        .unwrap_or_else(|e| panic!("{method} {path} {status} {media}: {e}"));
                }
            }
        }
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

    /// The values of a string enum, following `$ref`s.
    fn enums(doc: &Value, v: &Value) -> Vec<String> {
        // A field of a named enum type with a default is `{"oneOf": [{"$ref"}], "default"}`.
        let v = match v["oneOf"].as_array().map(Vec::as_slice) {
            Some([only]) => only,
            _ => v,
        };
        resolve(doc, v)["enum"]
            .as_array()
            .unwrap_or_else(|| panic!("not an enum: {v}"))
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect()
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
        // The sampler and the schedule are chosen by name, and the document lists the names.
        let props = &schema(&doc, "SampleRequest")["properties"];
        assert!(props.get("sampler").is_some() && props.get("scheduler").is_some());
        let names: Vec<&str> = Sampler::ALL.iter().map(|s| s.name()).collect();
        assert_eq!(schema(&doc, "Sampler")["enum"], json!(names));
        let names: Vec<&str> = Scheduler::ALL.iter().map(|s| s.name()).collect();
        assert_eq!(schema(&doc, "Scheduler")["enum"], json!(names));
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
        for kind in enums(&doc, &schema(&doc, "OptimizerConfig")["properties"]["kind"]) {
            serde_json::from_value::<OptimizerConfig>(json!({"kind": kind}))
                .unwrap_or_else(|e| panic!("optimizer kind {kind}: {e}"));
        }
        for kind in enums(&doc, &schema(&doc, "LrSchedule")["properties"]["kind"]) {
            serde_json::from_value::<LrSchedule>(json!({"kind": kind})).unwrap();
        }
        for targets in enums(
            &doc,
            &schema(&doc, "NetworkConfig")["properties"]["targets"],
        ) {
            serde_json::from_value::<NetworkConfig>(json!({"targets": targets})).unwrap();
        }
        for blocks in enums(
            &doc,
            &schema(&doc, "NetworkConfig")["properties"]["train_blocks"],
        ) {
            serde_json::from_value::<NetworkConfig>(json!({"train_blocks": blocks})).unwrap();
        }
        for sampling in enums(
            &doc,
            &schema(&doc, "ObjectiveConfig")["properties"]["timestep_sampling"],
        ) {
            serde_json::from_value::<ObjectiveConfig>(json!({"timestep_sampling": sampling}))
                .unwrap();
        }
        for p in enums(&doc, schema(&doc, "Precision")) {
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
        for state in enums(&doc, schema(&doc, "JobState")) {
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

        let dir = PathBuf::from("/data/jobs/j");
        let path = dir.join("lora.safetensors");
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
        // `Event` is one schema per type.
        let branches = schema(&doc, "Event")["oneOf"].as_array().unwrap();
        let by_type = |ty: &str| -> Option<&Value> {
            branches
                .iter()
                .map(|b| resolve(&doc, b))
                .find(|b| b["properties"]["type"]["enum"] == json!([ty]))
        };
        let mut seen = BTreeSet::new();
        for kind in kinds {
            let event = Event {
                seq: 7,
                job: "j".into(),
                time: 1.5,
                kind,
            };
            let wire = event.to_json();
            let ty = wire["type"].as_str().unwrap().to_string();
            let event_schema =
                by_type(&ty).unwrap_or_else(|| panic!("event type {ty} is not documented"));
            assert_eq!(keys(&wire), required(event_schema), "{wire}");
            assert_eq!(keys(&wire), keys(&event_schema["properties"]), "{wire}");
            let data_schema = resolve(&doc, &event_schema["properties"]["data"]);
            assert_eq!(keys(&wire["data"]), required(data_schema), "data of {ty}");
            // `url`/`urls` are added by the server beside `path`/`paths`.
            let mut documented = keys(&data_schema["properties"]);
            let presented = super::super::present::in_folder(&dir, &event);
            assert_eq!(keys(&presented["data"]), documented, "served data of {ty}");
            documented.retain(|k| k != "url" && k != "urls");
            assert_eq!(keys(&wire["data"]), documented, "data of {ty}");
            seen.insert(ty);
        }
        let documented: BTreeSet<String> = branches
            .iter()
            .map(|b| {
                resolve(&doc, b)["properties"]["type"]["enum"][0]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        assert_eq!(seen, documented);
        assert_eq!(branches.len(), super::event_types().len());
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
