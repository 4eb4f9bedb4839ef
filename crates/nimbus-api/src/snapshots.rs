//! `/api/v1/functions/{id}/snapshots` (list, build, delete) and `/api/v1/snapshots`
//! (stats, cleanup): function-level snapshots.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use nimbus_core::SnapshotStatus;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::{ApiError, ApiResult};
use crate::extract::{ApiJsonOrDefault, ApiPath, ApiQuery};
use crate::{views, AppState};

/// Body of `POST /functions/{id}/snapshots`; every field is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuildRequest {
    /// The version to snapshot [default: the newest].
    #[serde(default)]
    pub version: Option<u32>,
    /// Answer once the build has ended instead of as soon as it is under way.
    #[serde(default)]
    pub wait: bool,
}

/// `?dry_run=` of a cleanup.
#[derive(Debug, Default, Deserialize)]
pub struct CleanupQuery {
    #[serde(default)]
    dry_run: bool,
}

/// `GET /functions/{id}/snapshots`: `{"snapshots":[…]}`, newest build first.
pub async fn list(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<Value>> {
    let snapshots = state.engine.list_snapshots(&id).await?;
    let snapshots: Vec<Value> = snapshots.iter().map(views::snapshot).collect();
    Ok(Json(json!({ "snapshots": snapshots })))
}

/// `POST /functions/{id}/snapshots` (`{"version"?, "wait"?}`): builds the version's snapshot
/// or joins the build under way. See [`build_status`] for the status codes.
pub async fn build(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    ApiJsonOrDefault(req): ApiJsonOrDefault<BuildRequest>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    if req.version == Some(0) {
        return Err(ApiError::bad_request(
            "version 0 does not exist; versions are integers from 1",
        ));
    }
    let (started, snapshot) = state
        .engine
        .build_snapshot(&id, req.version, req.wait)
        .await?;
    let status = build_status(started, req.wait, snapshot.snapshot.status);
    Ok((status, Json(views::snapshot(&snapshot))))
}

/// The status of a build request's answer:
/// - 200: the snapshot was resident already (nothing built), or the build was waited for
///   and ended without a usable snapshot (`failed`; the row says why in `error_message`);
/// - 201: the build was waited for and the snapshot is `ready`;
/// - 202: the build was started (or joined) and not waited for.
pub fn build_status(started: bool, wait: bool, status: SnapshotStatus) -> StatusCode {
    match (started, wait, status) {
        (false, _, _) => StatusCode::OK,
        (true, false, _) | (true, true, SnapshotStatus::Building) => StatusCode::ACCEPTED,
        (true, true, SnapshotStatus::Ready) => StatusCode::CREATED,
        (true, true, _) => StatusCode::OK,
    }
}

/// `DELETE /functions/{id}/snapshots/{sid}` → 204; 404 `snapshot_not_found`, 409
/// `snapshot_building`.
pub async fn delete(
    State(state): State<AppState>,
    ApiPath((id, sid)): ApiPath<(String, String)>,
) -> ApiResult<Response> {
    state.engine.delete_snapshot(&id, &sid).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `GET /snapshots/stats`: totals over every snapshot.
pub async fn stats(State(state): State<AppState>) -> ApiResult<Json<Value>> {
    let stats = state.engine.snapshot_stats().await?;
    Ok(Json(json!(stats)))
}

/// `POST /snapshots/cleanup?dry_run=true|false` (default false): removes (or lists) the
/// snapshots that serve no more.
pub async fn cleanup(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<CleanupQuery>,
) -> ApiResult<Json<Value>> {
    let cleanup = state.engine.cleanup_snapshots(query.dry_run).await?;
    Ok(Json(views::snapshot_cleanup(&cleanup)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_answers_tell_started_waited_and_outcome_apart() {
        use SnapshotStatus::*;
        // Resident already: nothing was built, whether waited or not.
        assert_eq!(build_status(false, false, Ready), StatusCode::OK);
        assert_eq!(build_status(false, true, Ready), StatusCode::OK);
        // Started and not waited for: accepted, whatever the row says so far.
        assert_eq!(build_status(true, false, Building), StatusCode::ACCEPTED);
        assert_eq!(build_status(true, false, Ready), StatusCode::ACCEPTED);
        // Waited for.
        assert_eq!(build_status(true, true, Ready), StatusCode::CREATED);
        assert_eq!(build_status(true, true, Failed), StatusCode::OK);
        assert_eq!(build_status(true, true, Corrupt), StatusCode::OK);
        assert_eq!(build_status(true, true, Building), StatusCode::ACCEPTED);
    }

    #[test]
    fn build_bodies_are_optional_and_strict() {
        let empty: BuildRequest = serde_json::from_str("{}").unwrap();
        assert_eq!((empty.version, empty.wait), (None, false));
        let full: BuildRequest = serde_json::from_str(r#"{"version":3,"wait":true}"#).unwrap();
        assert_eq!((full.version, full.wait), (Some(3), true));
        let nulls: BuildRequest = serde_json::from_str(r#"{"version":null}"#).unwrap();
        assert_eq!(nulls.version, None);
        assert!(serde_json::from_str::<BuildRequest>(r#"{"versoin":3}"#).is_err());
    }

    #[test]
    fn openapi_documents_every_snapshot_answer() {
        let doc: Value = serde_json::from_str(include_str!("../openapi.json")).unwrap();
        for (path, method, codes) in [
            (
                "/api/v1/functions/{id}/snapshots",
                "get",
                &["200", "404"][..],
            ),
            (
                "/api/v1/functions/{id}/snapshots",
                "post",
                &["200", "201", "202", "400", "404", "409"][..],
            ),
            (
                "/api/v1/functions/{id}/snapshots/{sid}",
                "delete",
                &["204", "404", "409"][..],
            ),
            ("/api/v1/snapshots/stats", "get", &["200"][..]),
            ("/api/v1/snapshots/cleanup", "post", &["200", "400"][..]),
        ] {
            for code in codes {
                assert!(
                    doc["paths"][path][method]["responses"][code].is_object(),
                    "{method} {path} {code} undocumented"
                );
            }
        }
        // Every schema referenced exists.
        let text = include_str!("../openapi.json");
        for name in text.split("\"#/components/schemas/").skip(1) {
            let name = name.split('"').next().unwrap();
            assert!(
                doc["components"]["schemas"][name].is_object(),
                "schema {name} missing"
            );
        }
    }

    #[test]
    fn cleanup_is_real_unless_asked_dry() {
        let q: CleanupQuery = serde_urlencoded::from_str("").unwrap();
        assert!(!q.dry_run);
        let q: CleanupQuery = serde_urlencoded::from_str("dry_run=true").unwrap();
        assert!(q.dry_run);
        assert!(serde_urlencoded::from_str::<CleanupQuery>("dry_run=maybe").is_err());
    }
}
