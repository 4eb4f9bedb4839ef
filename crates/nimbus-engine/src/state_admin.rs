//! The admin side of functions' state (SPEC §3 "Sessions and state"): sessions with their
//! bindings and keys, a session's (or the function's) keys with sizes and TTLs, deleting
//! keys and sessions.

use nimbus_core::{echo, limits};
use nimbus_state::{Bucket, KeyInfo, Session, DEFAULT_SESSION};
use serde::Serialize;

use crate::error::{EngineError, EngineResult};
use crate::Engine;

/// The session key that names the function's own state in the admin API.
pub const GLOBAL_STATE: &str = "_global";

/// Most sessions one listing returns.
pub const MAX_SESSIONS_LISTED: usize = 1000;

/// A session with the keys of its state.
#[derive(Debug, Serialize)]
pub struct SessionView {
    /// The session (binding and timestamps).
    #[serde(flatten)]
    pub session: Session,
    /// The keys of its state.
    pub keys: Vec<KeyInfo>,
}

/// One bucket of state: a session's, or the function's (`_global`).
#[derive(Debug, Serialize)]
pub struct StateView {
    /// The function's id.
    pub function_id: String,
    /// The session key, or `_global`.
    pub session_key: String,
    /// `session` or `function`.
    pub scope: &'static str,
    /// Its keys, with size, TTL left and version (and value, when asked for).
    pub keys: Vec<KeyView>,
    /// Sum of the values' sizes, bytes.
    pub total_size: usize,
}

/// A key of [`StateView`].
#[derive(Debug, Serialize)]
pub struct KeyView {
    /// Key, size, TTL, version.
    #[serde(flatten)]
    pub info: KeyInfo,
    /// The value (JSON), when asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<Box<serde_json::value::RawValue>>,
}

/// Checks a session key as given to an invocation or the admin API.
pub fn check_session_key(key: &str) -> EngineResult<()> {
    let bad = |why: &str| {
        EngineError::Validation(nimbus_core::ValidationError::new(
            "session_key",
            format!("{} is not a valid session key: {why}", echo(key)),
        ))
    };
    if key.is_empty() || key.len() > limits::MAX_SESSION_KEY_BYTES {
        return Err(bad("it must be 1-256 bytes"));
    }
    if key.chars().any(char::is_control) {
        return Err(bad("it must not contain control characters"));
    }
    if key == GLOBAL_STATE {
        return Err(bad(
            "\"_global\" names the function's own state in the admin API",
        ));
    }
    Ok(())
}

impl Engine {
    /// The bucket `session_key` names: a session's, or the function's for `_global`.
    fn bucket(function_id: &str, session_key: &str) -> EngineResult<Bucket> {
        if session_key == GLOBAL_STATE {
            return Ok(Bucket::function(function_id));
        }
        if session_key != DEFAULT_SESSION {
            check_session_key(session_key)?;
        }
        Ok(Bucket::session(function_id, session_key))
    }

    /// The function's live sessions, most recently used first.
    pub async fn list_sessions(&self, function: &str, limit: usize) -> EngineResult<Vec<Session>> {
        let function = self.catalog.function(function).await?;
        Ok(self
            .state
            .store()
            .sessions(&function.id, limit.clamp(1, MAX_SESSIONS_LISTED))
            .await?)
    }

    /// One session with its keys; 404 `session_not_found` once it expired.
    pub async fn get_session(
        &self,
        function: &str,
        session_key: &str,
    ) -> EngineResult<SessionView> {
        let function = self.catalog.function(function).await?;
        check_session_key(session_key)?;
        let session = self
            .state
            .store()
            .session(&function.id, session_key)
            .await?
            .ok_or_else(|| session_not_found(&function.name, session_key))?;
        let keys = self
            .state
            .store()
            .list(&Bucket::session(&function.id, session_key))
            .await?;
        Ok(SessionView { session, keys })
    }

    /// Forgets a session and clears its state; 404 if it had neither.
    pub async fn delete_session(&self, function: &str, session_key: &str) -> EngineResult<()> {
        let function = self.catalog.function(function).await?;
        check_session_key(session_key)?;
        let store = self.state.store();
        self.pools.unbind(&function.id, session_key);
        let had_binding = store.delete_session(&function.id, session_key).await?;
        let cleared = store
            .clear(&Bucket::session(&function.id, session_key))
            .await?;
        if !had_binding && cleared == 0 {
            return Err(session_not_found(&function.name, session_key));
        }
        Ok(())
    }

    /// The keys of a session's state (or the function's, `_global`), with their values
    /// when `values`.
    pub async fn get_state(
        &self,
        function: &str,
        session_key: &str,
        values: bool,
    ) -> EngineResult<StateView> {
        let function = self.catalog.function(function).await?;
        let bucket = Self::bucket(&function.id, session_key)?;
        let mut keys = Vec::new();
        for info in self.state.store().list(&bucket).await? {
            let value = match values {
                true => self
                    .state
                    .get(&bucket, &info.key)
                    .await?
                    .map(|v| serde_json::value::RawValue::from_string(v.value))
                    .transpose()
                    .map_err(|e| EngineError::Internal(format!("stored state is not JSON: {e}")))?,
                false => None,
            };
            keys.push(KeyView { info, value });
        }
        Ok(StateView {
            function_id: function.id.clone(),
            session_key: session_key.to_owned(),
            scope: bucket.scope.kind(),
            total_size: keys.iter().map(|k| k.info.size).sum(),
            keys,
        })
    }

    /// Deletes one key of a session's (or the function's) state, or all of them when `key`
    /// is `None`; how many were deleted. 404 `state_key_not_found` for a missing key.
    pub async fn delete_state(
        &self,
        function: &str,
        session_key: &str,
        key: Option<&str>,
    ) -> EngineResult<u64> {
        let function = self.catalog.function(function).await?;
        let bucket = Self::bucket(&function.id, session_key)?;
        match key {
            None => Ok(self.state.store().clear(&bucket).await?),
            Some(key) => match self.state.delete(&bucket, key).await? {
                true => Ok(1),
                false => Err(EngineError::NotFound {
                    code: nimbus_core::ErrorCode::StateKeyNotFound,
                    message: format!(
                        "function {} has no key {} in the state of {}",
                        echo(&function.name),
                        echo(key),
                        echo(session_key)
                    ),
                }),
            },
        }
    }
}

fn session_not_found(function: &str, session_key: &str) -> EngineError {
    EngineError::NotFound {
        code: nimbus_core::ErrorCode::SessionNotFound,
        message: format!(
            "function {} has no live session {}",
            echo(function),
            echo(session_key)
        ),
    }
}
