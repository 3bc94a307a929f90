//! The one mapping from errors to HTTP: every failure becomes
//! `{"error": {"code", "message", "field"?}}` with a 4xx/5xx status. Handlers never
//! format an error body by hand.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use serde_json::json;

use crate::engine::EngineError;
use crate::train::config::ConfigError;

/// An error as the API reports it.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
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
    #[error("a bearer token is required: send `Authorization: Bearer <token>`")]
    Unauthorized,
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    pub fn bad(message: impl Into<String>) -> Self {
        Self::BadRequest {
            message: message.into(),
            field: None,
        }
    }

    fn code(&self) -> &'static str {
        match self {
            Self::BadRequest { .. } => "bad_request",
            Self::NotFound(_) => "not_found",
            Self::Conflict(_) => "conflict",
            Self::TooLarge(_) => "payload_too_large",
            Self::Unauthorized => "unauthorized",
            Self::Forbidden(_) => "forbidden",
            Self::Internal(_) => "internal",
        }
    }
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
        let mut body = json!({"code": self.code(), "message": self.to_string()});
        if let Self::BadRequest { field: Some(f), .. } = self {
            body["field"] = json!(f);
        }
        HttpResponse::build(self.status_code()).json(json!({ "error": body }))
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

/// JSON bodies that do not parse or do not fit the type: 400 with serde's message
/// (which names the field and position) instead of actix's plain-text default.
pub fn json_error(
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
