//! The typed HTTP client of Nimbus's REST API (`/api/v1`, SPEC §3): one method per
//! operation, request and response types that mirror the API's JSON, and an [`Error`] that
//! carries the API's error shape (status, code, message).
//!
//! Response types keep every field the server sends, so serializing one through
//! [`serde_json::Value`] gives back the server's document (the CLI's `--output json`).
//!
//! - [`functions`], [`versions`], [`aliases`], [`snapshots`], [`state`], [`invocations`]:
//!   one module per resource, its types and its methods on [`Client`].
//! - [`error`]: [`Error`] and [`ApiError`].

pub mod aliases;
pub mod error;
pub mod functions;
pub mod invocations;
pub mod snapshots;
pub mod state;
pub mod versions;

use std::time::Duration;

use reqwest::Method;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

pub use aliases::{
    Alias, AliasPage, AliasPatch, AliasRevision, DeletedAlias, HistoryPage, NewAlias, Rollback,
    RollbackRequest,
};
pub use error::{ApiError, Error};
pub use functions::{
    CreatedFunction, DeletedFunction, File, Function, FunctionPage, FunctionPatch, NewFunction,
    StateSettings, UpdatedFunction,
};
pub use invocations::{Accepted, Failure, Invocation, InvocationPage, InvokeResult, Target};
pub use snapshots::{
    Build, BuildOutcome, BuildSnapshot, Cleanup, Snapshot, SnapshotFailure, SnapshotList,
    SnapshotStats,
};
pub use state::{DeletedKeys, KeyInfo, Session, SessionList, SessionState, StateKey, StateView};
pub use versions::{DeletedVersion, PublishRequest, PublishedVersion, Version, VersionPage};

/// The result of a call.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Paging of a list answer: the number of items in all, and the window asked for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct PageInfo {
    /// Items in all.
    pub total: u64,
    /// Most items in one page.
    pub limit: u32,
    /// Items skipped first.
    pub offset: u32,
}

/// `/health`: the server is up.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Health {
    /// `ok`.
    pub status: String,
    /// The server's version.
    pub version: String,
}

/// A client of one server's REST API. Cloning it is cheap (one connection pool).
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    server: String,
    api_key: Option<String>,
}

impl Client {
    /// A client of `server` (`http://host:port`; a bare `host:port` is taken as http),
    /// sending `api_key`, if any, as `Authorization: Bearer <key>`.
    pub fn new(server: &str, api_key: Option<String>) -> Result<Self> {
        let server = normalize_server(server)?;
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .user_agent(concat!("nimbus-cli/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| Error::Request(format!("building the HTTP client: {e}")))?;
        Ok(Client {
            http,
            server,
            api_key: api_key.filter(|k| !k.is_empty()),
        })
    }

    /// The server's URL (`http://host:port`, no trailing slash).
    pub fn server(&self) -> &str {
        &self.server
    }

    /// `GET /health`.
    pub async fn health(&self) -> Result<Health> {
        self.send(Method::GET, "/health".into(), &[], None).await
    }

    /// Sends a request to `{server}{path}` and decodes the body of a successful answer.
    async fn send<T: DeserializeOwned>(
        &self,
        method: Method,
        path: String,
        query: &[(&str, String)],
        body: Option<Vec<u8>>,
    ) -> Result<T> {
        let (status, body) = self.exchange(method, &path, query, body).await?;
        if !(200..300).contains(&status) {
            return Err(Error::Api(ApiError::from_answer(status, &body)));
        }
        self.decode(status, body)
    }

    /// A request with a JSON body; decodes the body of a successful answer.
    async fn send_json<T: DeserializeOwned>(
        &self,
        method: Method,
        path: String,
        body: &impl Serialize,
    ) -> Result<T> {
        let bytes = serde_json::to_vec(body)
            .map_err(|e| Error::Request(format!("encoding the request: {e}")))?;
        self.send(method, path, &[], Some(bytes)).await
    }

    /// Decodes an answer's JSON as `T`.
    fn decode<T: DeserializeOwned>(&self, status: u16, body: Value) -> Result<T> {
        serde_json::from_value(body.clone()).map_err(|e| Error::Unexpected {
            server: self.server.clone(),
            status,
            problem: e.to_string(),
            snippet: snippet(&body.to_string()),
        })
    }

    /// Sends a request and returns the answer's status and JSON body (`null` when empty),
    /// whatever the status.
    async fn exchange(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<Vec<u8>>,
    ) -> Result<(u16, Value)> {
        let mut req = self.http.request(method, format!("{}{path}", self.server));
        if !query.is_empty() {
            req = req.query(query);
        }
        if let Some(key) = &self.api_key {
            req = req.bearer_auth(key);
        }
        if let Some(body) = body {
            req = req
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body);
        }
        let response = req.send().await.map_err(|e| self.transport_error(e))?;
        let status = response.status().as_u16();
        let bytes = response
            .bytes()
            .await
            .map_err(|e| self.transport_error(e))?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok((status, Value::Null));
        }
        match serde_json::from_slice(&bytes) {
            Ok(body) => Ok((status, body)),
            Err(_) => Err(Error::Unexpected {
                server: self.server.clone(),
                status,
                problem: "not JSON".into(),
                snippet: snippet(&String::from_utf8_lossy(&bytes)),
            }),
        }
    }

    fn transport_error(&self, e: reqwest::Error) -> Error {
        let reason = if e.is_connect() {
            let mut source: Option<&dyn std::error::Error> = Some(&e);
            let mut text = "connection failed".to_owned();
            while let Some(s) = source {
                if let Some(io) = s.downcast_ref::<std::io::Error>() {
                    text = io.to_string();
                    break;
                }
                source = s.source();
            }
            text
        } else if e.is_timeout() {
            "timed out".to_owned()
        } else {
            let mut text = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                text.push_str(": ");
                text.push_str(&s.to_string());
                source = s.source();
            }
            text
        };
        Error::Unreachable {
            server: self.server.clone(),
            reason,
        }
    }
}

/// The first 200 characters of a text.
fn snippet(text: &str) -> String {
    text.chars().take(200).collect()
}

/// `http://host:port/` → `http://host:port`; a bare `host:port` gets `http://`.
pub fn normalize_server(server: &str) -> Result<String> {
    let trimmed = server.trim().trim_end_matches('/');
    if trimmed.is_empty() {
        return Err(Error::InvalidServer("--server is empty".into()));
    }
    let url = if trimmed.contains("://") {
        trimmed.to_owned()
    } else {
        format!("http://{trimmed}")
    };
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(Error::InvalidServer(format!(
            "--server {server:?}: only http:// URLs are supported"
        )));
    }
    Ok(url)
}

/// `/api/v1/<segments…>`, each segment percent-encoded. `.` and `..` are refused: URLs
/// resolve them, so such a name would address another resource (`..` as an alias name
/// would turn `DELETE /functions/shop/aliases/..` into `DELETE /functions/shop/`).
fn api_path(segments: &[&str]) -> Result<String> {
    let mut path = String::from("/api/v1");
    for s in segments {
        if matches!(*s, "." | "..") {
            return Err(Error::InvalidName((*s).to_owned()));
        }
        path.push('/');
        path.push_str(&segment(s));
    }
    Ok(path)
}

/// Percent-encodes one path segment (a function name, id or request id).
fn segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Deserializes a field that may be present and `null` (`Some(Value::Null)`) apart from
/// absent (`None`, with `#[serde(default)]`): user data such as a handler's return value.
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn server_urls_are_normalized() {
        assert_eq!(
            normalize_server("http://127.0.0.1:8080/").unwrap(),
            "http://127.0.0.1:8080"
        );
        assert_eq!(
            normalize_server("localhost:9000").unwrap(),
            "http://localhost:9000"
        );
        assert!(normalize_server("ftp://x").is_err());
        assert!(normalize_server(" ").is_err());
    }

    #[test]
    fn paths_escape_segments_and_refuse_dots() {
        assert_eq!(
            api_path(&["functions", "hello-world_1"]).unwrap(),
            "/api/v1/functions/hello-world_1"
        );
        assert_eq!(
            api_path(&["functions", "a/b c"]).unwrap(),
            "/api/v1/functions/a%2Fb%20c"
        );
        let e = api_path(&["functions", "shop", "aliases", ".."]).unwrap_err();
        assert_eq!(e.to_string(), r#"".." is not a valid name"#);
    }

    #[test]
    fn error_answers_become_api_errors() {
        let body =
            json!({"error": {"code": "function_not_found", "message": "function \"x\" not found"}});
        let e = Error::Api(ApiError::from_answer(404, &body));
        assert_eq!(
            e.to_string(),
            "function \"x\" not found (function_not_found)"
        );
        assert!(e.has_code("function_not_found") && e.has_status(404));
        let e = ApiError::from_answer(502, &Value::Null);
        assert_eq!(e.code, "http_502");
        assert_eq!(e.message, "the server answered 502 Bad Gateway");
    }

    #[test]
    fn present_nulls_are_kept_apart_from_absent_fields() {
        #[derive(Deserialize)]
        struct Answer {
            #[serde(default, deserialize_with = "present")]
            body: Option<Value>,
        }
        let null: Answer = serde_json::from_str(r#"{"body":null}"#).unwrap();
        assert_eq!(null.body, Some(Value::Null));
        let absent: Answer = serde_json::from_str("{}").unwrap();
        assert_eq!(absent.body, None);
    }
}
