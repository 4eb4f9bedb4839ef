//! Invocations: `/api/v1/functions/{id}/invoke|async|invocations` and
//! `/api/v1/invocations/{request_id}`.

use reqwest::Method;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{api_path, present, ApiError, Client, Error, Result};

/// Which version an invocation runs, and in which session.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Target {
    /// This version.
    pub version: Option<u32>,
    /// Through this alias (default: `latest`).
    pub alias: Option<String>,
    /// Session key.
    pub session_key: Option<String>,
}

impl Target {
    fn query(&self) -> Vec<(&'static str, String)> {
        let mut query = Vec::new();
        if let Some(v) = self.version {
            query.push(("version", v.to_string()));
        }
        if let Some(a) = &self.alias {
            query.push(("alias", a.clone()));
        }
        if let Some(s) = &self.session_key {
            query.push(("session_key", s.clone()));
        }
        query
    }
}

/// Why an invocation failed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Failure {
    /// Stable code (`function_error`, `function_timeout`, …).
    pub code: String,
    /// Human-readable message.
    pub message: String,
    /// Exception type raised by the handler.
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub error_type: Option<String>,
    /// Traceback of the handler's exception.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub traceback: Option<String>,
}

/// The answer of a synchronous invocation that ran (succeeded or failed).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct InvokeResult {
    /// `inv_<ulid>`.
    pub request_id: String,
    /// The HTTP status of the answer.
    pub status_code: u16,
    /// What the handler returned (on success; `null` is a value).
    #[serde(deserialize_with = "present", skip_serializing_if = "Option::is_none")]
    pub body: Option<Value>,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<Failure>,
    /// Time in the instance, ms.
    pub duration_ms: f64,
    /// Whether a new instance started for it.
    pub cold_start: bool,
    /// `warm`, `cold`, `template`, …
    pub start_type: String,
    /// The version that ran.
    pub version: u32,
    /// The alias it was routed through.
    pub alias_used: Option<String>,
    /// Its session.
    pub session_key: Option<String>,
    /// The instance that ran it.
    pub instance_id: Option<String>,
}

/// `POST /functions/{id}/async`: queued.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Accepted {
    /// `inv_<ulid>`.
    pub request_id: String,
    /// `pending`.
    pub status: String,
}

/// An invocation record.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Invocation {
    /// `inv_<ulid>`.
    pub request_id: String,
    /// The function's id.
    pub function_id: String,
    /// Its name at the time of the call.
    pub function_name: String,
    /// The version that served it.
    pub version: u32,
    /// The alias it was routed through.
    pub alias_used: Option<String>,
    /// Its session.
    pub session_key: Option<String>,
    /// `http`, `async`, …
    pub trigger: String,
    /// `pending`, `running`, `success`, `error`, `timeout`.
    pub status: String,
    /// The event (`null` if not kept).
    pub input: Value,
    /// What the handler returned (`null` if none).
    pub output: Value,
    /// Why it failed.
    pub error: Option<Failure>,
    /// How its instance started.
    pub start_type: Option<String>,
    /// Whether a new instance started for it.
    pub cold_start: bool,
    /// The instance that ran it.
    pub instance_id: Option<String>,
    /// RFC 3339.
    pub started_at: String,
    /// RFC 3339.
    pub completed_at: Option<String>,
    /// Time in the instance, ms.
    pub duration_ms: Option<f64>,
    /// Peak memory, MiB.
    pub memory_used_mb: Option<u64>,
    /// What it printed.
    pub logs: String,
}

/// `GET /functions/{id}/invocations`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct InvocationPage {
    /// Newest first.
    pub invocations: Vec<Invocation>,
    /// Most records asked for.
    pub limit: u32,
}

impl Client {
    /// `POST /functions/{function}/invoke`: runs the function on `event` (JSON text) and
    /// waits for it. An invocation that ran and failed is an `Ok` whose `error` says why;
    /// one refused before running (not found, bad request, throttled…) is an [`Error::Api`].
    pub async fn invoke(
        &self,
        function: &str,
        target: &Target,
        event: Vec<u8>,
    ) -> Result<InvokeResult> {
        let path = api_path(&["functions", function, "invoke"])?;
        let (status, body) = self
            .exchange(Method::POST, &path, &target.query(), Some(event))
            .await?;
        if !(200..300).contains(&status) && body.get("request_id").is_none() {
            return Err(Error::Api(ApiError::from_answer(status, &body)));
        }
        self.decode(status, body)
    }

    /// `POST /functions/{function}/async`: queues an invocation.
    pub async fn invoke_async(
        &self,
        function: &str,
        target: &Target,
        event: Vec<u8>,
    ) -> Result<Accepted> {
        let path = api_path(&["functions", function, "async"])?;
        self.send(Method::POST, path, &target.query(), Some(event))
            .await
    }

    /// `GET /invocations/{request_id}`.
    pub async fn get_invocation(&self, request_id: &str) -> Result<Invocation> {
        let path = api_path(&["invocations", request_id])?;
        self.send(Method::GET, path, &[], None).await
    }

    /// `GET /functions/{function}/invocations?limit[&status]`.
    pub async fn list_invocations(
        &self,
        function: &str,
        limit: u32,
        status: Option<&str>,
    ) -> Result<InvocationPage> {
        let path = api_path(&["functions", function, "invocations"])?;
        let mut query = vec![("limit", limit.to_string())];
        if let Some(s) = status {
            query.push(("status", s.to_owned()));
        }
        self.send(Method::GET, path, &query, None).await
    }
}
