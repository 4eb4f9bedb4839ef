//! Nimbus HTTP API (`/api/v1`, JSON). Handlers stay thin: parse the request, call the
//! engine, map the result; [`error::ApiError`] owns the mapping to status and error code.

pub mod aliases;
pub mod auth;
pub mod error;
pub mod extract;
pub mod functions;
pub mod invoke;
pub mod ops;
pub mod snapshots;
pub mod state;
pub mod strict;
pub mod versions;
pub mod views;

use std::sync::Arc;

use axum::routing::{delete, get, post};
use axum::{middleware, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use nimbus_core::ErrorCode;
use nimbus_engine::Engine;

pub use auth::ApiKeys;
use error::ApiError;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    /// The engine.
    pub engine: Arc<Engine>,
    /// Renders `/metrics`.
    pub metrics: PrometheusHandle,
}

/// The whole HTTP surface.
pub fn router(state: AppState, keys: ApiKeys) -> Router {
    let api = Router::new()
        .route("/functions", post(functions::create).get(functions::list))
        .route(
            "/functions/{id}",
            get(functions::get)
                .put(functions::update)
                .delete(functions::delete),
        )
        .route(
            "/functions/{id}/versions",
            post(versions::publish).get(versions::list),
        )
        .route(
            "/functions/{id}/versions/{n}",
            get(versions::get).delete(versions::delete),
        )
        .route(
            "/functions/{id}/aliases",
            post(aliases::create).get(aliases::list),
        )
        .route(
            "/functions/{id}/aliases/{name}",
            get(aliases::get)
                .put(aliases::update)
                .delete(aliases::delete),
        )
        .route(
            "/functions/{id}/aliases/{name}/history",
            get(aliases::history),
        )
        .route(
            "/functions/{id}/aliases/{name}/rollback",
            post(aliases::rollback),
        )
        .route(
            "/functions/{id}/snapshots",
            get(snapshots::list).post(snapshots::build),
        )
        .route("/functions/{id}/snapshots/{sid}", delete(snapshots::delete))
        .route("/snapshots/stats", get(snapshots::stats))
        .route("/snapshots/cleanup", post(snapshots::cleanup))
        .route("/functions/{id}/sessions", get(state::list_sessions))
        .route(
            "/functions/{id}/sessions/{key}",
            get(state::get_session).delete(state::delete_session),
        )
        .route(
            "/functions/{id}/state/{session_key}",
            get(state::get_state).delete(state::delete_state),
        )
        .route("/functions/{id}/invoke", post(invoke::invoke))
        .route("/functions/{id}/async", post(invoke::invoke_async))
        .route("/functions/{id}/invocations", get(invoke::list_invocations))
        .route("/invocations/{request_id}", get(invoke::get_invocation))
        .route("/openapi.json", get(ops::openapi));
    let protected = Router::new()
        .nest("/api/v1", api)
        .route("/metrics", get(ops::metrics))
        .fallback(route_not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state.clone());
    // Every request but `/health` and `/ready` is checked for a key before it is routed: a
    // caller without one learns nothing of which routes and methods exist (401, never
    // 404 or 405 with its `Allow`).
    Router::new()
        .fallback_service(protected)
        .layer(middleware::from_fn_with_state(keys, auth::require_key))
        .route("/health", get(ops::health))
        .route("/ready", get(ops::ready))
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::map_response(error::json_errors))
        .with_state(state)
}

async fn route_not_found() -> ApiError {
    ApiError::new(ErrorCode::RouteNotFound, "no such endpoint")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        ErrorCode::MethodNotAllowed,
        "this endpoint does not take that method",
    )
}
