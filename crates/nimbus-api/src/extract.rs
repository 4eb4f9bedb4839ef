//! Request extractors whose rejections use the API's error shape instead of axum's plain text.

use axum::body::{to_bytes, Body};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::ApiError;

/// A JSON body of at most `nimbus_core::limits::MAX_API_BODY_BYTES`, parsed as `T`.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, Self::Rejection> {
        let bytes = read_body(req.into_body(), nimbus_core::limits::MAX_API_BODY_BYTES).await?;
        if bytes.is_empty() {
            return Err(ApiError::bad_request(
                "the request body is empty; a JSON object is required",
            ));
        }
        parse_json(&bytes).map(ApiJson)
    }
}

/// A JSON body parsed as `T` like [`ApiJson`], or `T::default()` when the body is empty
/// (for endpoints whose every field is optional, such as publishing a version).
pub struct ApiJsonOrDefault<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Default> FromRequest<S> for ApiJsonOrDefault<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, Self::Rejection> {
        let bytes = read_body(req.into_body(), nimbus_core::limits::MAX_API_BODY_BYTES).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(ApiJsonOrDefault(T::default()));
        }
        parse_json(&bytes).map(ApiJsonOrDefault)
    }
}

fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad_request(format!("invalid request body: {e}")))
}

/// Reads a whole body, answering 413 `payload_too_large` past `limit` bytes.
pub async fn read_body(body: Body, limit: usize) -> Result<bytes::Bytes, ApiError> {
    to_bytes(body, limit).await.map_err(|e| {
        let too_large = std::error::Error::source(&e)
            .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
        // The server's stall timeout on request bodies (see the binary's `serve`).
        let stalled = std::iter::successors(Some(&e as &dyn std::error::Error), |e| e.source())
            .any(|e| e.is::<tower_http::timeout::TimeoutError>());
        if too_large {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("the request body is larger than the {limit}-byte limit"),
            )
        } else if stalled {
            ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                "the request body stopped arriving: nothing came within the stall timeout",
            )
        } else {
            ApiError::bad_request(format!("could not read the request body: {e}"))
        }
    })
}

/// Query parameters parsed as `T`.
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let query = parts.uri.query().unwrap_or_default();
        serde_urlencoded::from_str(query)
            .map(ApiQuery)
            .map_err(|e| ApiError::bad_request(format!("invalid query string: {e}")))
    }
}

/// `?limit=&offset=` of a listing: limit 1–1000 (default 20), offset default 0.
#[derive(Debug, Deserialize)]
pub struct Paging {
    #[serde(default = "default_limit")]
    limit: u32,
    #[serde(default)]
    offset: u32,
}

fn default_limit() -> u32 {
    20
}

impl Paging {
    /// The page size asked for, within 1–1000.
    pub fn limit(&self) -> u32 {
        self.limit.clamp(1, 1000)
    }

    /// Items skipped first.
    pub fn offset(&self) -> u32 {
        self.offset
    }

    /// `{"<key>": items, "total", "limit", "offset"}`.
    pub fn page(&self, key: &str, items: Vec<Value>, total: u64) -> Value {
        json!({ key: items, "total": total, "limit": self.limit(), "offset": self.offset })
    }
}
