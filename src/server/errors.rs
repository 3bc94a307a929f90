//! The one mapping from errors to HTTP: every failure becomes
//! `{"error": {"code", "message", "field"?}}` ([`ErrorBody`]) with a 4xx/5xx
//! status. The typed errors of the layers below (the engine's, the config's, the
//! path policy's, a body that does not parse) are mapped here, once. Handlers
//! never format an error body by hand.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;
use utoipa::openapi::{Content, Ref, RefOr, Response, ResponseBuilder};

use super::paths::PathError;
use crate::engine::EngineError;
use crate::train::config::ConfigError;

/// An error as the API reports it.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ApiError {
    #[error("{message}")]
    BadRequest {
        message: String,
        field: Option<String>,
    },
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("a token is required: send `Authorization: Bearer <token>`, or `?token=<token>` (a browser opening the front end once with it keeps a session cookie)")]
    Unauthorized,
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    pub(crate) fn bad(message: impl Into<String>) -> Self {
        Self::BadRequest {
            message: message.into(),
            field: None,
        }
    }

    /// The same error, naming `field` of the request when it is a 400.
    pub(crate) fn at(self, field: impl Into<String>) -> Self {
        match self {
            Self::BadRequest { message, .. } => Self::BadRequest {
                message,
                field: Some(field.into()),
            },
            other => other,
        }
    }

    fn code(&self) -> ErrorCode {
        match self {
            Self::BadRequest { .. } => ErrorCode::BadRequest,
            Self::NotFound(_) => ErrorCode::NotFound,
            Self::Conflict(_) => ErrorCode::Conflict,
            Self::TooLarge(_) => ErrorCode::PayloadTooLarge,
            Self::Unauthorized => ErrorCode::Unauthorized,
            Self::Forbidden(_) => ErrorCode::Forbidden,
            Self::Internal(_) => ErrorCode::Internal,
        }
    }
}

/// Every 4xx/5xx answer's body.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct ErrorBody {
    pub error: ErrorDetail,
}

/// What went wrong.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct ErrorDetail {
    pub code: ErrorCode,
    /// What went wrong, for people.
    pub message: String,
    /// The offending field's path in the request body (`dataset.folders[0]`,
    /// `request.width`), on 400 answers where one is known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

/// 400 `bad_request`, 401 `unauthorized`, 403 `forbidden`, 404 `not_found`, 409
/// `conflict`, 413 `payload_too_large`, 500 `internal`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub(crate) enum ErrorCode {
    BadRequest,
    NotFound,
    Conflict,
    PayloadTooLarge,
    Unauthorized,
    Forbidden,
    Internal,
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            Self::BadRequest { .. } => StatusCode::BAD_REQUEST,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let field = match self {
            Self::BadRequest { field, .. } => field.clone(),
            _ => None,
        };
        HttpResponse::build(self.status_code()).json(ErrorBody {
            error: ErrorDetail {
                code: self.code(),
                message: self.to_string(),
                field,
            },
        })
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::NoSuchJob(_) => Self::NotFound(e.to_string()),
            EngineError::BadState { .. } => Self::Conflict(e.to_string()),
            EngineError::Stopped | EngineError::Io(_) => Self::Internal(e.to_string()),
        }
    }
}

impl From<ConfigError> for ApiError {
    fn from(e: ConfigError) -> Self {
        match &e {
            ConfigError::Invalid { field, .. } => Self::BadRequest {
                field: Some(field.clone()),
                message: e.to_string(),
            },
            _ => Self::bad(e.to_string()),
        }
    }
}

impl From<PathError> for ApiError {
    fn from(e: PathError) -> Self {
        match e {
            PathError::NoJobFile { .. } | PathError::NoLora(_) => Self::NotFound(e.to_string()),
            PathError::JobFolder(_) => Self::Internal(e.to_string()),
            PathError::OutsideReadable(_)
            | PathError::OutsideWritable(_)
            | PathError::Missing(_)
            | PathError::ParentDir(_)
            | PathError::NoParent(_)
            | PathError::Unreadable(_)
            | PathError::LeavesJobFolder
            | PathError::NotAFileName => Self::bad(e.to_string()),
        }
    }
}

/// A JSON body that does not fit its type: 400 naming the offending field's path.
impl From<serde_path_to_error::Error<serde_json::Error>> for ApiError {
    fn from(e: serde_path_to_error::Error<serde_json::Error>) -> Self {
        let path = e.path().to_string();
        Self::BadRequest {
            message: format!("`{path}`: {}", e.inner()),
            field: (path != ".").then_some(path),
        }
    }
}

/// Parses a JSON value into `T`; errors name the offending field's path.
pub fn parse<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> Result<T, ApiError> {
    Ok(serde_path_to_error::deserialize(value)?)
}

/// JSON bodies that do not parse or do not fit the type: 400 with serde's message
/// (which names the field and position) instead of actix's plain-text default.
pub(crate) fn json_error(
    err: actix_web::error::JsonPayloadError,
    _req: &actix_web::HttpRequest,
) -> actix_web::Error {
    use actix_web::error::JsonPayloadError as J;
    let message = match &err {
        J::OverflowKnownLength { length, limit } => {
            return ApiError::TooLarge(format!(
                "request body of {length} bytes is over the {limit}-byte limit"
            ))
            .into();
        }
        J::Overflow { limit } => {
            return ApiError::TooLarge(format!("request body is over the {limit}-byte limit"))
                .into();
        }
        J::ContentType => "send the body as JSON with `Content-Type: application/json`".into(),
        J::Deserialize(e) => format!("invalid JSON body: {e}"),
        other => format!("invalid request body: {other}"),
    };
    ApiError::bad(message).into()
}

// The error answers as OpenAPI response components, named in each handler's
// `#[utoipa::path]`; the guard's 401 and 403 and the 500 apply to every route.
// Each is a marker type whose doc comment is the response's description and whose
// content is an `ErrorBody`.

/// The OpenAPI response `name`: `doc` (the lines of a doc comment) as its
/// description, an [`ErrorBody`] as its JSON content.
fn error_answer<'s>(name: &'s str, doc: &[&str]) -> (&'s str, RefOr<Response>) {
    let description: Vec<&str> = doc.iter().map(|line| line.trim()).collect();
    let body = Ref::from_schema_name(<ErrorBody as utoipa::ToSchema>::name());
    let response = ResponseBuilder::new()
        .description(description.join("\n"))
        .content("application/json", Content::new(Some(body)))
        .build();
    (name, response.into())
}

macro_rules! error_answers {
    ($($(#[doc = $doc:literal])+ $name:ident;)+) => {$(
        $(#[doc = $doc])+
        pub(crate) struct $name;

        impl<'s> utoipa::ToResponse<'s> for $name {
            fn response() -> (&'s str, RefOr<Response>) {
                error_answer(stringify!($name), &[$($doc),+])
            }
        }
    )+};
}

error_answers! {
    /// The request is malformed or does not validate (`bad_request`); `field` names
    /// the offending field where one is known.
    BadRequest;

    /// The daemon has a token and the request carried neither it nor the session
    /// cookie (`unauthorized`).
    Unauthorized;

    /// The request came from a browser origin the daemon does not serve, or (without
    /// a token) named a host that is not this machine (`forbidden`): only loopback
    /// origins and those given with `--cors-origin` are served.
    Forbidden;

    /// No such job, file, LoRA or route (`not_found`).
    NotFound;

    /// The job's state does not allow this (`conflict`); the message names the state.
    Conflict;

    /// The request body is over the daemon's limit (`payload_too_large`).
    TooLarge;

    /// The daemon failed (`internal`).
    Internal;
}
