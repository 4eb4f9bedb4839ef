//! Operational endpoints: `/health`, `/ready`, `/metrics`, `/api/v1/openapi.json`.

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use crate::error::ApiResult;
use crate::AppState;

/// `GET /health`: the process is up.
pub async fn health() -> Json<Value> {
    Json(json!({ "status": "ok", "version": env!("CARGO_PKG_VERSION") }))
}

/// `GET /ready`: the metadata store answers (its last health check, so this never waits)
/// and the server is not stopping: 503 `store_unavailable` while the store does not answer,
/// 503 `shutting_down` from the shutdown signal on (so load balancers stop sending work).
pub async fn ready(State(state): State<AppState>) -> ApiResult<Json<Value>> {
    if state.engine.is_draining() {
        return Err(nimbus_engine::EngineError::ShuttingDown.into());
    }
    state.engine.ready().await?;
    Ok(Json(
        json!({ "status": "ready", "driver": state.engine.driver_name() }),
    ))
}

/// `GET /metrics`: Prometheus text format.
pub async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}

/// `GET /api/v1/openapi.json`.
pub async fn openapi() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        include_str!("../openapi.json"),
    )
        .into_response()
}
