//! The one mapping from failures to HTTP: status, stable code, message naming the problem.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use nimbus_core::ErrorCode;
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
    pub code: ErrorCode,
    /// Human-readable message naming the problem.
    pub message: String,
    /// Extra fields merged into the error object (exception type, traceback, logs).
    pub details: serde_json::Map<String, serde_json::Value>,
}

impl ApiError {
    /// An error with the status of its code ([`status_of`]) and no extra details.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self::with_status(status_of(code), code, message)
    }

    /// An error answered with a status of its own rather than its code's: a rejection of
    /// the HTTP layer keeps the status it was given.
    pub fn with_status(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            details: serde_json::Map::new(),
        }
    }

    /// 400 `invalid_request`.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidRequest, message)
    }
}

/// The HTTP status of each code, of API errors and of failed invocations alike.
pub fn status_of(code: ErrorCode) -> StatusCode {
    use ErrorCode as C;
    match code {
        C::InvalidRequest
        | C::InvalidJson
        | C::ValidationError
        | C::FunctionInitFailed
        | C::RuntimeUnavailable
        | C::KeyTooLong
        | C::InvalidKey
        | C::ValueTooLarge
        | C::TooManyKeys
        | C::StateConflict
        | C::NotAnInteger
        | C::InvalidArgument => StatusCode::BAD_REQUEST,
        C::Unauthorized => StatusCode::UNAUTHORIZED,
        C::FunctionNotFound
        | C::VersionNotFound
        | C::AliasNotFound
        | C::RevisionNotFound
        | C::InvocationNotFound
        | C::SnapshotNotFound
        | C::SessionNotFound
        | C::StateKeyNotFound
        | C::NotFound
        | C::RouteNotFound => StatusCode::NOT_FOUND,
        C::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
        C::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
        C::FunctionExists
        | C::AliasExists
        | C::AliasProtected
        | C::VersionInUse
        | C::NothingToRollBack
        | C::VersionDeleted
        | C::RevisionMismatch
        | C::TooManyAliases
        | C::SnapshotBuilding
        | C::SnapshotsDisabled
        | C::Conflict => StatusCode::CONFLICT,
        C::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        C::UriTooLong => StatusCode::URI_TOO_LONG,
        C::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
        C::Throttled => StatusCode::TOO_MANY_REQUESTS,
        C::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        C::Internal | C::FunctionError | C::FunctionInitError => StatusCode::INTERNAL_SERVER_ERROR,
        C::InstanceCrashed | C::OutOfMemory | C::ResponseTooLarge => StatusCode::BAD_GATEWAY,
        C::ServiceUnavailable
        | C::StoreUnavailable
        | C::ShuttingDown
        | C::TooManyConnections
        | C::StateUnavailable => StatusCode::SERVICE_UNAVAILABLE,
        C::FunctionTimeout => StatusCode::GATEWAY_TIMEOUT,
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        let code = e.code();
        if code == ErrorCode::Internal {
            tracing::error!(error = %e, "internal error");
        }
        let mut err = ApiError::new(code, e.to_string());
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

/// The last layer of the router: an error response that is not JSON (one answered by axum
/// or a tower layer rather than by a handler, such as an extractor's rejection) is
/// answered again in the API's shape, with the code of its status and its text (cut
/// short) as the message. Other responses pass untouched.
pub async fn json_errors(response: Response) -> Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 4096).await.unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let message = match text.trim() {
        "" => status.canonical_reason().unwrap_or("error").to_owned(),
        text => nimbus_core::echo::cut(text, 160).into_owned(),
    };
    let mut answer = ApiError::with_status(status, code_of_status(status), message).into_response();
    // Headers the answer needs beyond its body (`Allow`, `Retry-After`) are kept.
    for (name, value) in &parts.headers {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            answer.headers_mut().append(name, value.clone());
        }
    }
    answer
}

/// The stable code of an error answered by the HTTP layer: one per status it can answer,
/// `invalid_request` for other client errors and `internal` for other server errors.
pub fn code_of_status(status: StatusCode) -> ErrorCode {
    match status {
        StatusCode::BAD_REQUEST | StatusCode::UNPROCESSABLE_ENTITY => ErrorCode::InvalidRequest,
        StatusCode::UNAUTHORIZED => ErrorCode::Unauthorized,
        StatusCode::NOT_FOUND => ErrorCode::RouteNotFound,
        StatusCode::METHOD_NOT_ALLOWED => ErrorCode::MethodNotAllowed,
        StatusCode::PAYLOAD_TOO_LARGE => ErrorCode::PayloadTooLarge,
        StatusCode::TOO_MANY_REQUESTS => ErrorCode::Throttled,
        StatusCode::SERVICE_UNAVAILABLE => ErrorCode::ServiceUnavailable,
        StatusCode::REQUEST_TIMEOUT => ErrorCode::RequestTimeout,
        StatusCode::URI_TOO_LONG => ErrorCode::UriTooLong,
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ErrorCode::UnsupportedMediaType,
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => ErrorCode::HeadersTooLarge,
        s if s.is_client_error() => ErrorCode::InvalidRequest,
        _ => ErrorCode::Internal,
    }
}

/// Result of API handlers.
pub type ApiResult<T> = Result<T, ApiError>;

#[cfg(test)]
mod tests {
    use axum::body::{to_bytes, Body};
    use axum::http::{Request, StatusCode};
    use axum::response::IntoResponse;
    use axum::routing::get;
    use axum::{middleware, Router};
    use serde_json::Value;
    use tower::ServiceExt;

    use super::*;

    /// Answers of handlers that do not use the API's shape, as axum's own rejections do.
    fn router() -> Router {
        Router::new()
            .route(
                "/text-400",
                get(|| async { (StatusCode::BAD_REQUEST, "Invalid URL") }),
            )
            .route(
                "/empty-500",
                get(|| async { StatusCode::INTERNAL_SERVER_ERROR }),
            )
            .route(
                "/text-503",
                get(|| async {
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        [(header::RETRY_AFTER, "1")],
                        "x".repeat(10_000),
                    )
                }),
            )
            .route(
                "/json-409",
                get(|| async { ApiError::new(ErrorCode::AliasExists, "taken").into_response() }),
            )
            .route("/ok", get(|| async { "fine" }))
            .layer(middleware::map_response(json_errors))
    }

    async fn call(path: &str) -> (StatusCode, axum::http::HeaderMap, Vec<u8>) {
        let request = Request::get(path).body(Body::empty()).unwrap();
        let response = router().oneshot(request).await.unwrap();
        let (parts, body) = response.into_parts();
        let body = to_bytes(body, usize::MAX).await.unwrap().to_vec();
        (parts.status, parts.headers, body)
    }

    #[tokio::test]
    async fn error_answers_without_json_are_put_in_the_apis_shape() {
        for (path, status, code, message) in [
            (
                "/text-400",
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "Invalid URL",
            ),
            (
                "/empty-500",
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "Internal Server Error",
            ),
        ] {
            let (got, headers, body) = call(path).await;
            assert_eq!(got, status, "{path}");
            assert_eq!(headers[header::CONTENT_TYPE], "application/json", "{path}");
            let body: Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(body["error"]["code"], code, "{path}");
            assert_eq!(body["error"]["message"], message, "{path}");
        }
        // Long text is cut; headers the answer needs are kept.
        let (_, headers, body) = call("/text-503").await;
        assert_eq!(headers[header::RETRY_AFTER], "1");
        assert!(body.len() < 400, "{} bytes", body.len());
        let body: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["error"]["code"], "service_unavailable");
    }

    #[tokio::test]
    async fn json_errors_and_successes_pass_untouched() {
        let (status, _, body) = call("/json-409").await;
        assert_eq!(status, StatusCode::CONFLICT);
        let body: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["error"]["code"], "alias_exists");
        let (status, headers, body) = call("/ok").await;
        assert_eq!((status, body.as_slice()), (StatusCode::OK, &b"fine"[..]));
        assert!(headers[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/plain"));
    }

    #[test]
    fn codes_choose_their_statuses() {
        for (code, status) in [
            (ErrorCode::FunctionError, StatusCode::INTERNAL_SERVER_ERROR),
            (
                ErrorCode::FunctionInitError,
                StatusCode::INTERNAL_SERVER_ERROR,
            ),
            (ErrorCode::FunctionTimeout, StatusCode::GATEWAY_TIMEOUT),
            (ErrorCode::InstanceCrashed, StatusCode::BAD_GATEWAY),
            (ErrorCode::OutOfMemory, StatusCode::BAD_GATEWAY),
            (ErrorCode::ResponseTooLarge, StatusCode::BAD_GATEWAY),
            (ErrorCode::VersionInUse, StatusCode::CONFLICT),
            (ErrorCode::StateUnavailable, StatusCode::SERVICE_UNAVAILABLE),
            (ErrorCode::StateConflict, StatusCode::BAD_REQUEST),
        ] {
            assert_eq!(status_of(code), status, "{code}");
        }
        // The code the HTTP layer gives a status is that status's own.
        for status in [
            StatusCode::BAD_REQUEST,
            StatusCode::UNAUTHORIZED,
            StatusCode::NOT_FOUND,
            StatusCode::METHOD_NOT_ALLOWED,
            StatusCode::REQUEST_TIMEOUT,
            StatusCode::PAYLOAD_TOO_LARGE,
            StatusCode::URI_TOO_LONG,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            StatusCode::TOO_MANY_REQUESTS,
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            StatusCode::INTERNAL_SERVER_ERROR,
            StatusCode::SERVICE_UNAVAILABLE,
        ] {
            assert_eq!(status_of(code_of_status(status)), status);
        }
    }

    /// docs/LIMITS.md's table of codes states the status each code is answered with.
    #[test]
    fn statuses_are_the_documented_ones() {
        let limits = include_str!("../../../docs/LIMITS.md");
        let table = &limits[limits.find("## Error codes").expect("an error code table")..];
        let mut checked = 0;
        for row in table.lines().filter(|l| l.starts_with("| ")) {
            let cells: Vec<&str> = row.split('|').map(str::trim).collect();
            let Ok(status) = cells[1].parse::<u16>() else {
                continue;
            };
            for code in cells[2].split(", ") {
                let code: ErrorCode = code.trim_matches('`').parse().expect("a known code");
                assert_eq!(status_of(code).as_u16(), status, "{code}");
                checked += 1;
            }
        }
        assert!(checked > 30, "{checked} codes checked");
    }

    #[test]
    fn every_status_has_a_stable_code() {
        assert_eq!(
            code_of_status(StatusCode::NOT_FOUND),
            ErrorCode::RouteNotFound
        );
        assert_eq!(
            code_of_status(StatusCode::IM_A_TEAPOT),
            ErrorCode::InvalidRequest
        );
        assert_eq!(code_of_status(StatusCode::BAD_GATEWAY), ErrorCode::Internal);
    }
}
