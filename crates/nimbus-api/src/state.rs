//! `/api/v1/functions/{id}/sessions` and `/api/v1/functions/{id}/state`: the sessions of a
//! stateful function and their state (SPEC §3 "Sessions and state").

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use nimbus_engine::{SessionView, StateView};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::ApiResult;
use crate::extract::{ApiPath, ApiQuery};
use crate::AppState;

/// `?limit=` of a session listing.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionsQuery {
    #[serde(default = "default_limit")]
    limit: usize,
}

fn default_limit() -> usize {
    100
}

/// `?values=` of a state read.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateQuery {
    #[serde(default)]
    values: bool,
}

/// `?key=` of a state deletion.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeleteStateQuery {
    #[serde(default)]
    key: Option<String>,
}

/// `GET /functions/{id}/sessions?limit=` (default 100, at most 1000): `{"sessions":[…]}`,
/// most recently used first.
pub async fn list_sessions(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(query): ApiQuery<SessionsQuery>,
) -> ApiResult<Json<Value>> {
    let sessions = state.engine.list_sessions(&id, query.limit).await?;
    Ok(Json(json!({ "sessions": sessions })))
}

/// `GET /functions/{id}/sessions/{key}`: the session's binding, timestamps and keys; 404
/// `session_not_found`.
pub async fn get_session(
    State(state): State<AppState>,
    ApiPath((id, key)): ApiPath<(String, String)>,
) -> ApiResult<Json<SessionView>> {
    Ok(Json(state.engine.get_session(&id, &key).await?))
}

/// `DELETE /functions/{id}/sessions/{key}` → 204: unbinds the session and clears its state;
/// 404 `session_not_found` if it had neither.
pub async fn delete_session(
    State(state): State<AppState>,
    ApiPath((id, key)): ApiPath<(String, String)>,
) -> ApiResult<StatusCode> {
    state.engine.delete_session(&id, &key).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /functions/{id}/state/{session_key}?values=`: the keys (size, TTL left, version;
/// values with `values=true`) and total size; `_global` is the function's own state.
pub async fn get_state(
    State(state): State<AppState>,
    ApiPath((id, session_key)): ApiPath<(String, String)>,
    ApiQuery(query): ApiQuery<StateQuery>,
) -> ApiResult<Json<StateView>> {
    Ok(Json(
        state
            .engine
            .get_state(&id, &session_key, query.values)
            .await?,
    ))
}

/// `DELETE /functions/{id}/state/{session_key}?key=` → 200 `{"deleted": n}`: one key (404
/// `state_key_not_found` if absent), or every key without `key`.
pub async fn delete_state(
    State(state): State<AppState>,
    ApiPath((id, session_key)): ApiPath<(String, String)>,
    ApiQuery(query): ApiQuery<DeleteStateQuery>,
) -> ApiResult<Json<Value>> {
    let deleted = state
        .engine
        .delete_state(&id, &session_key, query.key.as_deref())
        .await?;
    Ok(Json(json!({ "deleted": deleted })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openapi_documents_every_session_and_state_answer() {
        let doc: Value = serde_json::from_str(include_str!("../openapi.json")).unwrap();
        for (path, method, codes) in [
            (
                "/api/v1/functions/{id}/sessions",
                "get",
                &["200", "404", "503"][..],
            ),
            (
                "/api/v1/functions/{id}/sessions/{key}",
                "get",
                &["200", "400", "404", "503"][..],
            ),
            (
                "/api/v1/functions/{id}/sessions/{key}",
                "delete",
                &["204", "404", "503"][..],
            ),
            (
                "/api/v1/functions/{id}/state/{session_key}",
                "get",
                &["200", "400", "404", "503"][..],
            ),
            (
                "/api/v1/functions/{id}/state/{session_key}",
                "delete",
                &["200", "404", "503"][..],
            ),
        ] {
            for code in codes {
                assert!(
                    doc["paths"][path][method]["responses"][code].is_object(),
                    "{method} {path} {code} undocumented"
                );
            }
        }
        assert!(
            doc["components"]["schemas"]["NewFunction"]["properties"]["state_config"].is_object()
        );
    }

    #[test]
    fn queries_take_their_defaults_and_refuse_unknown_parameters() {
        let q: SessionsQuery = serde_urlencoded::from_str("").unwrap();
        assert_eq!(q.limit, 100);
        assert!(serde_urlencoded::from_str::<SessionsQuery>("limt=3").is_err());
        let q: StateQuery = serde_urlencoded::from_str("values=true").unwrap();
        assert!(q.values);
        let q: DeleteStateQuery = serde_urlencoded::from_str("key=cart").unwrap();
        assert_eq!(q.key.as_deref(), Some("cart"));
    }
}
