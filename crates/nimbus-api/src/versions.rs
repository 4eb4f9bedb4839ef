//! `/api/v1/functions/{id}/versions`: publish, list, get, delete.

use axum::extract::State;
use axum::http::StatusCode;
use axum::{Extension, Json};
use nimbus_engine::PublishRequest;
use serde_json::{json, Value};

use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::extract::{ApiJsonOrDefault, ApiPath, ApiQuery, Paging};
use crate::{views, AppState};

/// `POST /functions/{id}/versions`: 201 with the new version, or 200 with the newest one
/// when nothing changed since it (`"created": false`).
pub async fn publish(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
    ApiJsonOrDefault(req): ApiJsonOrDefault<PublishRequest>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let published = state.engine.publish_version(&id, req, &caller.0).await?;
    let aliases = state
        .engine
        .aliases_of(&published.version.function_id)
        .await?;
    let mut body = views::version_with_code(&published.version, &aliases, false);
    body["created"] = json!(published.created);
    let status = if published.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(body)))
}

/// `GET /functions/{id}/versions?limit=&offset=`: newest first, without code.
pub async fn list(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(paging): ApiQuery<Paging>,
) -> ApiResult<Json<Value>> {
    let page = state
        .engine
        .list_versions(&id, paging.limit(), paging.offset())
        .await?;
    // Which aliases name each version; an empty page needs none.
    let aliases = match page.items.first() {
        Some(v) => state.engine.aliases_of(&v.function_id).await?,
        None => Vec::new(),
    };
    let versions: Vec<Value> = page
        .items
        .iter()
        .map(|v| views::version(v, &aliases))
        .collect();
    Ok(Json(paging.page("versions", versions, page.total)))
}

/// `GET /functions/{id}/versions/{n}`: with code.
pub async fn get(
    State(state): State<AppState>,
    ApiPath((id, n)): ApiPath<(String, String)>,
) -> ApiResult<Json<Value>> {
    let number = version_number(&n)?;
    let version = state.engine.get_version(&id, number).await?;
    let aliases = state.engine.aliases_of(&version.function_id).await?;
    Ok(Json(views::version_with_code(&version, &aliases, true)))
}

/// `DELETE /functions/{id}/versions/{n}`: 409 `version_in_use` while an alias routes to it.
pub async fn delete(
    State(state): State<AppState>,
    ApiPath((id, n)): ApiPath<(String, String)>,
) -> ApiResult<Json<Value>> {
    let number = version_number(&n)?;
    let function_id = state.engine.delete_version(&id, number).await?;
    Ok(Json(
        json!({ "deleted": true, "function_id": function_id, "version": number }),
    ))
}

/// A version number from the path: a positive integer.
fn version_number(text: &str) -> ApiResult<u32> {
    match text.parse::<u32>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(ApiError::bad_request(format!(
            "{} is not a version number; versions are integers from 1",
            nimbus_core::echo(text)
        ))),
    }
}
