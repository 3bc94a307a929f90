//! How the A1111 dialect answers failures, in A1111's shapes (its
//! `modules/api/api.py`), mapped here once:
//!
//! - a request A1111 would take but we cannot serve (a feature we lack, an unknown
//!   LoRA, a bad size): 422 `{"error": "HTTPException", "detail", "body", "errors"}`,
//!   A1111's exception handler's body for its own `HTTPException(422, …)`; the
//!   detail starts with the field's name;
//! - a generation that failed on what the request named (a LoRA file that does
//!   not load): the same 422, its detail the job's error (as `/v1/sample`
//!   answers 400);
//! - a body that is not JSON, or a field of the wrong type: 422 `{"detail":
//!   [{"loc", "msg", "type"}]}`, FastAPI's request-validation body;
//! - a failure of ours: 500 in the exception handler's shape;
//! - a route we do not implement: 404 `{"detail": "Not Found", "errors"}`.
//!
//! Must not: decide what is refused; handlers and `request` do.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use serde_json::{json, Value};

use crate::server::errors::ApiError;

/// An A1111-dialect failure.
#[derive(Debug, thiserror::Error)]
pub(crate) enum WebuiError {
    /// `field` has a value we cannot serve.
    #[error("{field}: {message}")]
    Unprocessable { field: String, message: String },
    /// The body does not parse into the request: `loc` as FastAPI writes it.
    #[error("{msg}")]
    Validation {
        loc: Vec<Value>,
        msg: String,
        kind: &'static str,
    },
    /// The sampling job failed; its error.
    #[error("{0}")]
    Failed(String),
    #[error("{0}")]
    Internal(String),
}

impl WebuiError {
    pub(crate) fn field(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Unprocessable {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// What the shared checks (admission, the engine) refuse, named by our field
/// paths (`request.width`), in A1111's field names.
impl From<ApiError> for WebuiError {
    fn from(e: ApiError) -> Self {
        match e {
            ApiError::BadRequest { message, field } => {
                let field = field.unwrap_or_default();
                let field = field.strip_prefix("request.").unwrap_or(&field);
                let field = match field {
                    "guidance" => "distilled_cfg_scale",
                    f if f.starts_with("loras") => "prompt",
                    f => f,
                };
                Self::field(field, message)
            }
            other => Self::Internal(other.to_string()),
        }
    }
}

impl ResponseError for WebuiError {
    fn status_code(&self) -> StatusCode {
        match self {
            Self::Unprocessable { .. } | Self::Validation { .. } | Self::Failed(_) => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let status = self.status_code();
        let body = match self {
            Self::Validation { loc, msg, kind } => {
                json!({"detail": [{"loc": loc, "msg": msg, "type": kind}]})
            }
            Self::Unprocessable { .. } | Self::Failed(_) => {
                let detail = self.to_string();
                json!({
                    "error": "HTTPException",
                    "errors": format!("{}: {detail}", status.as_u16()),
                    "detail": detail,
                    "body": "",
                })
            }
            Self::Internal(message) => json!({
                "error": "RuntimeError",
                "detail": "",
                "body": "",
                "errors": message,
            }),
        };
        HttpResponse::build(status).json(body)
    }
}

/// Any `/sdapi/…` route we lack (extensions' routes, A1111 routes not served):
/// FastAPI's 404 `{"detail": "Not Found"}`, and a message that says so.
pub(super) async fn not_implemented(req: actix_web::HttpRequest) -> HttpResponse {
    HttpResponse::NotFound().json(json!({
        "detail": "Not Found",
        "error": "NotImplemented",
        "errors": format!(
            "fluxlora does not implement {} {}; docs/a1111-api.md lists the /sdapi/v1 routes it serves (GET /v1/openapi.json documents its own API)",
            req.method(),
            req.path()
        ),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_take_a1111_shapes_and_field_names() {
        let e = WebuiError::from(ApiError::bad("must be …").at("request.guidance"));
        assert_eq!(e.status_code(), StatusCode::UNPROCESSABLE_ENTITY);
        assert!(e.to_string().starts_with("distilled_cfg_scale: "));
        let validation = WebuiError::Validation {
            loc: vec![json!("body"), json!("steps")],
            msg: "x".into(),
            kind: "type_error",
        };
        assert_eq!(validation.status_code().as_u16(), 422);
        assert_eq!(
            WebuiError::from(ApiError::Internal("boom".into())).status_code(),
            StatusCode::INTERNAL_SERVER_ERROR
        );
    }
}
