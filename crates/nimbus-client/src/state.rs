//! Sessions and state: `/api/v1/functions/{id}/sessions[/{key}]` and
//! `/api/v1/functions/{id}/state/{session_key}`.

use reqwest::Method;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{api_path, present, Client, Result};

/// A session: where its invocations go, and for how long.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Session {
    /// The function's id.
    pub function_id: String,
    /// The session key.
    pub session_key: String,
    /// The instance it is bound to, if any.
    pub instance_id: Option<String>,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339.
    pub last_access: String,
    /// RFC 3339.
    pub expires_at: String,
}

/// A key of a session's (or the function's) state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct KeyInfo {
    /// The key.
    pub key: String,
    /// Size of its value, bytes of JSON.
    pub size: u64,
    /// Time left to live, ms (none: no expiry).
    pub ttl_ms: Option<u64>,
    /// Its version.
    pub version: u64,
}

/// `GET /functions/{id}/sessions`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SessionList {
    /// The live sessions.
    pub sessions: Vec<Session>,
}

/// `GET /functions/{id}/sessions/{key}`: the session and the keys of its state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SessionState {
    /// The session.
    #[serde(flatten)]
    pub session: Session,
    /// The keys of its state.
    pub keys: Vec<KeyInfo>,
}

/// A key of [`StateView`], with its value when asked for.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct StateKey {
    /// Key, size, TTL, version.
    #[serde(flatten)]
    pub info: KeyInfo,
    /// The value (JSON), when asked for.
    #[serde(deserialize_with = "present", skip_serializing_if = "Option::is_none")]
    pub value: Option<Value>,
}

/// `GET /functions/{id}/state/{session_key}`: one bucket of state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct StateView {
    /// The function's id.
    pub function_id: String,
    /// The session key, or `_global`.
    pub session_key: String,
    /// `session` or `function`.
    pub scope: String,
    /// Its keys.
    pub keys: Vec<StateKey>,
    /// Sum of the values' sizes, bytes.
    pub total_size: u64,
}

/// `DELETE /functions/{id}/state/{session_key}`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct DeletedKeys {
    /// Keys deleted.
    pub deleted: u64,
}

impl Client {
    /// `GET /functions/{function}/sessions?limit`.
    pub async fn list_sessions(&self, function: &str, limit: usize) -> Result<SessionList> {
        let path = api_path(&["functions", function, "sessions"])?;
        self.send(Method::GET, path, &[("limit", limit.to_string())], None)
            .await
    }

    /// `GET /functions/{function}/sessions/{session}`.
    pub async fn get_session(&self, function: &str, session: &str) -> Result<SessionState> {
        let path = api_path(&["functions", function, "sessions", session])?;
        self.send(Method::GET, path, &[], None).await
    }

    /// `DELETE /functions/{function}/sessions/{session}`, with its state.
    pub async fn delete_session(&self, function: &str, session: &str) -> Result<()> {
        let path = api_path(&["functions", function, "sessions", session])?;
        self.send::<serde::de::IgnoredAny>(Method::DELETE, path, &[], None)
            .await
            .map(drop)
    }

    /// `GET /functions/{function}/state/{session}[?values=true]` (`_global`: the
    /// function's own state).
    pub async fn get_state(
        &self,
        function: &str,
        session: &str,
        values: bool,
    ) -> Result<StateView> {
        let path = api_path(&["functions", function, "state", session])?;
        let query = if values {
            vec![("values", "true".to_owned())]
        } else {
            Vec::new()
        };
        self.send(Method::GET, path, &query, None).await
    }

    /// `DELETE /functions/{function}/state/{session}[?key]`: one key, or all of them.
    pub async fn delete_state(
        &self,
        function: &str,
        session: &str,
        key: Option<&str>,
    ) -> Result<DeletedKeys> {
        let path = api_path(&["functions", function, "state", session])?;
        let query: Vec<_> = key.map(|k| ("key", k.to_owned())).into_iter().collect();
        self.send(Method::DELETE, path, &query, None).await
    }
}
