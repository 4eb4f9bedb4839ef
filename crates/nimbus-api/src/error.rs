//! The one mapping from failures to HTTP: status, stable code, message naming the problem.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use nimbus_engine::EngineError;
use serde_json::json;

/// `Retry-After` of every 429 (`throttled`), seconds. Capacity frees as soon as one running
/// invocation ends, and a throttled call has already waited its queue's turn: one second
/// spaces retries without keeping a client away longer than a typical invocation.
pub const RETRY_AFTER_SECS: u32 = 1;

/// An error answered as `{"error":{"code":…,"message":…}}`.
#[derive(Debug)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable machine-readable code.
    pub code: &'static str,
    /// Human-readable message naming the problem.
    pub message: String,
    /// Extra fields merged into the error object (exception type, traceback, logs).
    pub details: serde_json::Map<String, serde_json::Value>,
}

impl ApiError {
    /// An error with no extra details.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            details: serde_json::Map::new(),
        }
    }

    /// 400 `invalid_request`.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        let status = match &e {
            EngineError::Validation(_)
            | EngineError::BadRequest(_)
            | EngineError::InvalidCode { .. } => StatusCode::BAD_REQUEST,
            EngineError::RuntimeUnavailable(_) => StatusCode::BAD_REQUEST,
            EngineError::NotFound { .. } => StatusCode::NOT_FOUND,
            EngineError::Conflict { .. } | EngineError::VersionInUse { .. } => StatusCode::CONFLICT,
            EngineError::Throttled(_) => StatusCode::TOO_MANY_REQUESTS,
            EngineError::Unavailable(_) | EngineError::ShuttingDown => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            EngineError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            EngineError::State(nimbus_state::StateError::Unavailable(_)) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            EngineError::State(_) => StatusCode::BAD_REQUEST,
        };
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!(error = %e, "internal error");
        }
        let mut err = ApiError::new(status, e.code(), e.to_string());
        if let EngineError::Validation(v) = &e {
            err.details.insert("field".into(), json!(v.field));
        }
        if let EngineError::VersionInUse { aliases, .. } = &e {
            err.details.insert("aliases".into(), json!(aliases));
        }
        if let EngineError::InvalidCode { error, logs } = e {
            err.details.insert("type".into(), json!(error.error_type));
            err.details
                .insert("traceback".into(), json!(error.traceback));
            err.details.insert("logs".into(), json!(logs));
        }
        err
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut error = serde_json::Map::new();
        error.insert("code".into(), json!(self.code));
        error.insert("message".into(), json!(self.message));
        error.extend(self.details);
        let mut response = (self.status, Json(json!({ "error": error }))).into_response();
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
        }
        response
    }
}

/// Result of API handlers.
pub type ApiResult<T> = Result<T, ApiError>;
