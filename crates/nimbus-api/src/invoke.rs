//! `POST /functions/{id}/invoke` and `/async`, and the invocation records.

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use nimbus_core::invocation::InvocationError;
use nimbus_core::{limits, ErrorCode, InvocationStatus, Trigger};
use nimbus_engine::{InvokeRequest, InvokeResponse};
use nimbus_store::InvocationFilter;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{json, Value};

use crate::error::{status_of, ApiError, ApiResult};
use crate::extract::{check_depth, json_error, read_body, ApiPath, ApiQuery};
use crate::{views, AppState};

/// Header carrying the session key (same as `?session_key=`).
pub const SESSION_HEADER: &str = "x-nimbus-session-key";

/// `?version=&alias=&session_key=`.
#[derive(Debug, Deserialize)]
pub struct Target {
    version: Option<u32>,
    alias: Option<String>,
    session_key: Option<String>,
}

/// `POST /functions/{id}/invoke`.
pub async fn invoke(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(target): ApiQuery<Target>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let req = invoke_request(id, target, &headers, body, Trigger::Http).await?;
    let response = state.engine.invoke(req).await?;
    Ok(invoke_response(response))
}

/// `POST /functions/{id}/async`: 202 with the request id.
pub async fn invoke_async(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(target): ApiQuery<Target>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let req = invoke_request(id, target, &headers, body, Trigger::Async).await?;
    let request_id = state.engine.invoke_async(req).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "request_id": request_id, "status": "pending" })),
    ))
}

async fn invoke_request(
    function: String,
    target: Target,
    headers: &HeaderMap,
    body: Body,
    trigger: Trigger,
) -> ApiResult<InvokeRequest> {
    let header_key = match headers.get(SESSION_HEADER) {
        Some(v) => Some(
            v.to_str()
                .map_err(|_| {
                    ApiError::bad_request("the X-Nimbus-Session-Key header is not valid text")
                })?
                .to_owned(),
        ),
        None => None,
    };
    // Checked by the engine (1-256 bytes, no control characters, not `_global`). Given both
    // ways, the two must agree: otherwise one would be dropped unchecked and unsaid.
    let query_key = target.session_key.filter(|k| !k.is_empty());
    let session_key =
        match (query_key, header_key.filter(|k| !k.is_empty())) {
            (Some(query), Some(header)) if query != header => return Err(ApiError::bad_request(
                "session_key and the X-Nimbus-Session-Key header name different sessions; give one",
            )),
            (query, header) => query.or(header),
        };
    if let Some(alias) = &target.alias {
        nimbus_core::alias::validate_alias_name(alias)
            .map_err(|e| ApiError::bad_request(format!("alias: {}", e.message)))?;
    }
    let bytes = read_body(body, limits::MAX_EVENT_BYTES).await?;
    let event = if bytes.iter().all(u8::is_ascii_whitespace) {
        RawValue::from_string("{}".into()).expect("valid JSON")
    } else {
        check_depth(&bytes, ErrorCode::InvalidJson)?;
        serde_json::from_slice::<Box<RawValue>>(&bytes).map_err(|e| {
            ApiError::new(
                ErrorCode::InvalidJson,
                format!("the request body is not valid JSON: {}", json_error(&e)),
            )
        })?
    };
    Ok(InvokeRequest {
        function,
        version: target.version,
        alias: target.alias,
        session_key,
        event,
        trigger,
    })
}

#[derive(Serialize)]
struct InvokeBody<'a> {
    request_id: &'a str,
    status_code: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    body: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a InvocationError>,
    duration_ms: f64,
    cold_start: bool,
    start_type: &'static str,
    version: u32,
    alias_used: Option<&'a str>,
    session_key: Option<&'a str>,
    instance_id: Option<&'a str>,
}

fn invoke_response(r: InvokeResponse) -> Response {
    let status = match &r.outcome {
        Ok(_) => StatusCode::OK,
        Err(e) => status_of(e.code),
    };
    let body = InvokeBody {
        request_id: &r.request_id,
        status_code: status.as_u16(),
        body: r.outcome.as_ref().ok().map(|b| &**b),
        error: r.outcome.as_ref().err(),
        duration_ms: (r.duration_ms * 1000.0).round() / 1000.0,
        cold_start: r.start_type != nimbus_core::StartType::Warm,
        start_type: r.start_type.as_str(),
        version: r.version,
        alias_used: r.alias_used.as_deref(),
        session_key: r.session_key.as_deref(),
        instance_id: r.instance_id.as_deref(),
    };
    (status, Json(body)).into_response()
}

/// `GET /invocations/{request_id}`.
pub async fn get_invocation(
    State(state): State<AppState>,
    ApiPath(request_id): ApiPath<String>,
) -> ApiResult<Json<Value>> {
    let record = state.engine.get_invocation(&request_id).await?;
    Ok(Json(views::invocation(&record)))
}

/// `?limit=&status=`.
#[derive(Debug, Deserialize)]
pub struct ListInvocations {
    limit: Option<u32>,
    status: Option<String>,
}

/// `GET /functions/{id}/invocations`.
pub async fn list_invocations(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<ListInvocations>,
) -> ApiResult<Json<Value>> {
    let status = q
        .status
        .as_deref()
        .map(str::parse::<InvocationStatus>)
        .transpose()
        .map_err(|e| ApiError::bad_request(format!("status: {}", e.message)))?;
    let limit = q.limit.unwrap_or(20).clamp(1, 1000);
    let records = state
        .engine
        .list_invocations(&id, &InvocationFilter { status, limit })
        .await?;
    let items: Vec<Value> = records.iter().map(views::invocation).collect();
    Ok(Json(json!({ "invocations": items, "limit": limit })))
}
