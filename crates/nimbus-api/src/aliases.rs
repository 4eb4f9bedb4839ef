//! `/api/v1/functions/{id}/aliases`: create, list, get, update, delete, history, rollback.

use axum::extract::State;
use axum::http::StatusCode;
use axum::{Extension, Json};
use nimbus_engine::{AliasPatch, NewAlias, RollbackRequest};
use serde_json::{json, Value};

use crate::auth::Caller;
use crate::error::ApiResult;
use crate::extract::{ApiJson, ApiJsonOrDefault, ApiPath, ApiQuery, Paging};
use crate::{views, AppState};

/// `POST /functions/{id}/aliases` → 201.
pub async fn create(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<NewAlias>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let alias = state.engine.create_alias(&id, req, &caller.0).await?;
    Ok((StatusCode::CREATED, Json(views::alias(&alias))))
}

/// `GET /functions/{id}/aliases?limit=&offset=`: by name.
pub async fn list(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(paging): ApiQuery<Paging>,
) -> ApiResult<Json<Value>> {
    let page = state
        .engine
        .list_aliases(&id, paging.limit(), paging.offset())
        .await?;
    let aliases: Vec<Value> = page.items.iter().map(views::alias).collect();
    Ok(Json(paging.page("aliases", aliases, page.total)))
}

/// `GET /functions/{id}/aliases/{name}`.
pub async fn get(
    State(state): State<AppState>,
    ApiPath((id, name)): ApiPath<(String, String)>,
) -> ApiResult<Json<Value>> {
    let alias = state.engine.get_alias(&id, &name).await?;
    Ok(Json(views::alias(&alias)))
}

/// `PUT /functions/{id}/aliases/{name}`: routing and/or description.
pub async fn update(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath((id, name)): ApiPath<(String, String)>,
    ApiJson(patch): ApiJson<AliasPatch>,
) -> ApiResult<Json<Value>> {
    let alias = state
        .engine
        .update_alias(&id, &name, patch, &caller.0)
        .await?;
    Ok(Json(views::alias(&alias)))
}

/// `DELETE /functions/{id}/aliases/{name}`: `latest` → 409.
pub async fn delete(
    State(state): State<AppState>,
    ApiPath((id, name)): ApiPath<(String, String)>,
) -> ApiResult<Json<Value>> {
    let function_id = state.engine.delete_alias(&id, &name).await?;
    Ok(Json(
        json!({ "deleted": true, "function_id": function_id, "name": name }),
    ))
}

/// `GET /functions/{id}/aliases/{name}/history?limit=&offset=`: newest first.
pub async fn history(
    State(state): State<AppState>,
    ApiPath((id, name)): ApiPath<(String, String)>,
    ApiQuery(paging): ApiQuery<Paging>,
) -> ApiResult<Json<Value>> {
    let page = state
        .engine
        .alias_history(&id, &name, paging.limit(), paging.offset())
        .await?;
    let history: Vec<Value> = page.items.iter().map(views::alias_revision).collect();
    Ok(Json(paging.page("history", history, page.total)))
}

/// `POST /functions/{id}/aliases/{name}/rollback` (`{"to_revision"?, "to_version"?,
/// "expected_revision"?}`): the alias as it is now, plus `restored_revision` (null for a
/// rollback to a version).
pub async fn rollback(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath((id, name)): ApiPath<(String, String)>,
    ApiJsonOrDefault(req): ApiJsonOrDefault<RollbackRequest>,
) -> ApiResult<Json<Value>> {
    let rolled_back = state
        .engine
        .rollback_alias(&id, &name, req, &caller.0)
        .await?;
    let mut body = views::alias(&rolled_back.alias);
    body["restored_revision"] = json!(rolled_back.restored_revision);
    Ok(Json(body))
}
