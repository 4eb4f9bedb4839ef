//! Request extractors whose rejections use the API's error shape instead of axum's plain
//! text, and the checks every JSON body passes before it is parsed.

use axum::body::{to_bytes, Body};
use axum::extract::{FromRequest, FromRequestParts, Path, Request};
use axum::http::request::Parts;
use nimbus_core::echo::cut;
use nimbus_core::limits::{MAX_API_BODY_BYTES, MAX_JSON_DEPTH};
use nimbus_core::ErrorCode;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::strict;

/// Longest parser message repeated in an error (it may quote the input it refused).
const MAX_PARSER_MESSAGE_CHARS: usize = 160;

/// A JSON object of at most [`MAX_API_BODY_BYTES`] and [`MAX_JSON_DEPTH`] levels, parsed as
/// `T` (whose structs read from objects only, at any depth: see [`strict`]).
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, Self::Rejection> {
        let bytes = read_body(req.into_body(), MAX_API_BODY_BYTES).await?;
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
        let bytes = read_body(req.into_body(), MAX_API_BODY_BYTES).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(ApiJsonOrDefault(T::default()));
        }
        parse_json(&bytes).map(ApiJsonOrDefault)
    }
}

/// A management body: 400 `invalid_request` if it nests too deeply, is not a JSON object
/// or does not fit `T`.
fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    check_depth(bytes, ErrorCode::InvalidRequest)?;
    match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{') => {}
        Some(b'[') => {
            return Err(ApiError::bad_request(
                "the request body is a JSON array; a JSON object is required",
            ))
        }
        _ => {
            return Err(ApiError::bad_request(
                "the request body is not a JSON object",
            ))
        }
    }
    strict::from_slice(bytes)
        .map_err(|e| ApiError::bad_request(format!("invalid request body: {}", json_error(&e))))
}

/// 400 `code` if `text` nests arrays and objects deeper than [`MAX_JSON_DEPTH`].
pub fn check_depth(text: &[u8], code: ErrorCode) -> Result<(), ApiError> {
    match nimbus_core::json_depth::too_deep_at(text, MAX_JSON_DEPTH) {
        None => Ok(()),
        Some(at) => Err(ApiError::new(
            code,
            format!(
                "the request body nests arrays and objects more than {MAX_JSON_DEPTH} levels \
                 deep (at byte {at})"
            ),
        )),
    }
}

/// A parser's message about JSON text, cut short (it may quote the input), with its
/// position.
pub fn json_error(e: &serde_json::Error) -> String {
    let text = e.to_string();
    let position = format!(" at line {} column {}", e.line(), e.column());
    let message = text.strip_suffix(&position).unwrap_or(&text);
    let message = cut(message, MAX_PARSER_MESSAGE_CHARS);
    if e.line() == 0 {
        message.into_owned()
    } else {
        format!("{message}{position}")
    }
}

/// Path parameters parsed as `T`: 400 `invalid_request` when a segment is not valid UTF-8
/// once percent-decoded (or does not fit `T`).
pub struct ApiPath<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(value)) => Ok(ApiPath(value)),
            Err(rejection) => {
                let status = rejection.status();
                let code = if status.is_client_error() {
                    ErrorCode::InvalidRequest
                } else {
                    ErrorCode::Internal
                };
                let message = cut(&rejection.body_text(), MAX_PARSER_MESSAGE_CHARS).into_owned();
                Err(ApiError::with_status(status, code, message))
            }
        }
    }
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
                ErrorCode::PayloadTooLarge,
                format!("the request body is larger than the {limit}-byte limit"),
            )
        } else if stalled {
            ApiError::new(
                ErrorCode::RequestTimeout,
                "the request body stopped arriving: nothing came within the stall timeout",
            )
        } else {
            ApiError::bad_request(format!(
                "could not read the request body: {}",
                cut(&e.to_string(), MAX_PARSER_MESSAGE_CHARS)
            ))
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
            .map_err(|e| {
                ApiError::bad_request(format!(
                    "invalid query string: {}",
                    cut(&e.to_string(), MAX_PARSER_MESSAGE_CHARS)
                ))
            })
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
