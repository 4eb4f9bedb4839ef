//! The client's HTTP wrapper: one `reqwest` client bound to a server URL and API key, JSON in
//! and out, and the mapping of every failure (server error, unreachable server, unexpected
//! answer) to a [`CliError`] whose message tells the user what to do.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::Value;

/// Why a client command failed.
#[derive(Debug)]
pub enum CliError {
    /// The server answered with an error object.
    Api {
        /// HTTP status.
        status: u16,
        /// The stable error code (`function_not_found`, …).
        code: String,
        /// The server's message.
        message: String,
    },
    /// The server could not be reached.
    Unreachable {
        /// The server URL tried.
        server: String,
        /// What went wrong.
        reason: String,
    },
    /// Bad usage or a local failure, with a message for the user.
    Usage(String),
    /// The failure was already printed in full; only the exit code remains.
    Reported,
}

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CliError::Api { code, message, .. } => write!(f, "{message} ({code})"),
            CliError::Unreachable { server, reason } => write!(
                f,
                "cannot reach the Nimbus server at {server} ({reason}). Is it running? \
                 Start one with `nimbus server`, or point --server (or NIMBUS_SERVER) at it"
            ),
            CliError::Usage(message) => f.write_str(message),
            CliError::Reported => f.write_str("failed"),
        }
    }
}

impl std::error::Error for CliError {}

impl From<anyhow::Error> for CliError {
    fn from(e: anyhow::Error) -> Self {
        CliError::Usage(format!("{e:#}"))
    }
}

/// A response: status and JSON body (`null` when empty).
#[derive(Debug)]
pub struct Reply {
    /// HTTP status.
    pub status: StatusCode,
    /// Parsed body.
    pub body: Value,
}

impl Reply {
    /// The body if the status is a success, else the server's error as [`CliError::Api`].
    pub fn into_result(self) -> Result<Value, CliError> {
        if self.status.is_success() {
            Ok(self.body)
        } else {
            Err(api_error(self.status, &self.body))
        }
    }
}

/// The [`CliError::Api`] of an error answer (`{"error":{"code","message"}}`).
pub fn api_error(status: StatusCode, body: &Value) -> CliError {
    let error = &body["error"];
    let code = error["code"]
        .as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| format!("http_{}", status.as_u16()));
    let message = error["message"]
        .as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| format!("the server answered {status}"));
    CliError::Api {
        status: status.as_u16(),
        code,
        message,
    }
}

/// A server's REST API.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    server: String,
    api_key: Option<String>,
}

impl Client {
    /// A client of `server` (`http://host:port`; `host:port` is taken as http).
    pub fn new(server: &str, api_key: Option<String>) -> Result<Self, CliError> {
        let server = normalize_server(server)?;
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .user_agent(concat!("nimbus-cli/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| CliError::Usage(format!("building the HTTP client: {e}")))?;
        Ok(Client {
            http,
            server,
            api_key: api_key.filter(|k| !k.is_empty()),
        })
    }

    /// A client for the options of a command.
    pub fn from_connection(conn: &super::Connection) -> Result<Self, CliError> {
        Self::new(&conn.server, conn.api_key.clone())
    }

    /// Sends a request to `/api/v1{path}` and returns whatever the server answered.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<Vec<u8>>,
    ) -> Result<Reply, CliError> {
        // URLs resolve `.` and `..` segments, so such a name would address another
        // resource (`alias delete shop ..` would become `DELETE /functions/shop/`).
        if let Some(dots) = path.split('/').find(|s| matches!(*s, "." | "..")) {
            return Err(CliError::Usage(format!("{dots:?} is not a valid name")));
        }
        self.send_raw(method, &format!("/api/v1{path}"), query, body)
            .await
    }

    /// Sends a request to `{server}{path}` (any path, e.g. `/health`).
    pub async fn send_raw(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<Vec<u8>>,
    ) -> Result<Reply, CliError> {
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
        let status = response.status();
        let bytes = response
            .bytes()
            .await
            .map_err(|e| self.transport_error(e))?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(Reply {
                status,
                body: Value::Null,
            });
        }
        match serde_json::from_slice(&bytes) {
            Ok(body) => Ok(Reply { status, body }),
            Err(_) => {
                let text = String::from_utf8_lossy(&bytes);
                let snippet: String = text.chars().take(200).collect();
                Err(CliError::Usage(format!(
                    "unexpected answer from {} ({status}, not JSON): {snippet}",
                    self.server
                )))
            }
        }
    }

    /// `GET` returning the body of a successful answer.
    pub async fn get(&self, path: &str, query: &[(&str, String)]) -> Result<Value, CliError> {
        self.send(Method::GET, path, query, None)
            .await?
            .into_result()
    }

    /// A request with a JSON body, returning whatever the server answered.
    pub async fn send_json(
        &self,
        method: Method,
        path: &str,
        body: &Value,
    ) -> Result<Reply, CliError> {
        let bytes = serde_json::to_vec(body)
            .map_err(|e| CliError::Usage(format!("encoding the request: {e}")))?;
        self.send(method, path, &[], Some(bytes)).await
    }

    /// A request with a JSON body, returning the body of a successful answer.
    pub async fn call(&self, method: Method, path: &str, body: &Value) -> Result<Value, CliError> {
        self.send_json(method, path, body).await?.into_result()
    }

    /// `DELETE` returning the body of a successful answer.
    pub async fn delete(&self, path: &str) -> Result<Value, CliError> {
        self.send(Method::DELETE, path, &[], None)
            .await?
            .into_result()
    }

    fn transport_error(&self, e: reqwest::Error) -> CliError {
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
        CliError::Unreachable {
            server: self.server.clone(),
            reason,
        }
    }
}

/// `http://host:port/` → `http://host:port`; a bare `host:port` gets `http://`.
pub fn normalize_server(server: &str) -> Result<String, CliError> {
    let trimmed = server.trim().trim_end_matches('/');
    if trimmed.is_empty() {
        return Err(CliError::Usage("--server is empty".into()));
    }
    let url = if trimmed.contains("://") {
        trimmed.to_owned()
    } else {
        format!("http://{trimmed}")
    };
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(CliError::Usage(format!(
            "--server {server:?}: only http:// URLs are supported"
        )));
    }
    Ok(url)
}

/// Percent-encodes one path segment (a function name, id or request id).
pub fn segment(s: &str) -> String {
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
    fn segments_are_escaped() {
        assert_eq!(segment("hello-world_1"), "hello-world_1");
        assert_eq!(segment("a/b c"), "a%2Fb%20c");
    }

    #[test]
    fn error_answers_become_api_errors() {
        let body =
            json!({"error": {"code": "function_not_found", "message": "function \"x\" not found"}});
        let e = api_error(StatusCode::NOT_FOUND, &body);
        assert_eq!(
            e.to_string(),
            "function \"x\" not found (function_not_found)"
        );
        let e = api_error(StatusCode::BAD_GATEWAY, &Value::Null);
        assert!(e.to_string().contains("http_502"), "{e}");
    }
}
