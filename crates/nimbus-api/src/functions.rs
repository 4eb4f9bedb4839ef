//! `/api/v1/functions`: create, list, get, update, delete.

use axum::extract::State;
use axum::http::StatusCode;
use axum::{Extension, Json};
use nimbus_engine::{FunctionPatch, NewFunction};
use serde_json::{json, Value};

use crate::auth::Caller;
use crate::error::ApiResult;
use crate::extract::{ApiJson, ApiPath, ApiQuery, Paging};
use crate::{views, AppState};

/// `POST /functions`.
pub async fn create(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiJson(req): ApiJson<NewFunction>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let function = state.engine.create_function(req, &caller.0).await?;
    let mut body = views::function(&function);
    body["version"] = json!(1);
    Ok((StatusCode::CREATED, Json(body)))
}

/// `GET /functions?limit=&offset=`.
pub async fn list(
    State(state): State<AppState>,
    ApiQuery(paging): ApiQuery<Paging>,
) -> ApiResult<Json<Value>> {
    let page = state
        .engine
        .list_functions(paging.limit(), paging.offset())
        .await?;
    let functions: Vec<Value> = page.items.iter().map(views::function).collect();
    Ok(Json(paging.page("functions", functions, page.total)))
}

/// `GET /functions/{id}`.
pub async fn get(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<Value>> {
    let function = state.engine.get_function(&id).await?;
    Ok(Json(views::function(&function)))
}

/// `PUT /functions/{id}`.
pub async fn update(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
    ApiJson(patch): ApiJson<FunctionPatch>,
) -> ApiResult<Json<Value>> {
    let updated = state.engine.update_function(&id, patch, &caller.0).await?;
    let mut body = views::function(&updated.function);
    body["published_version"] = json!(updated.published_version);
    Ok(Json(body))
}

/// `DELETE /functions/{id}`.
pub async fn delete(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<Value>> {
    let function = state.engine.delete_function(&id).await?;
    Ok(Json(
        json!({ "deleted": true, "id": function.id, "name": function.name }),
    ))
}
