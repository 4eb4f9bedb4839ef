//! JSON shapes of the API's resources.

use nimbus_core::{Function, Invocation};
use serde_json::value::RawValue;
use serde_json::{json, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// RFC 3339 text of a timestamp.
pub fn timestamp(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_default()
}

/// A function, without its code contents (file names and sizes only).
pub fn function(f: &Function) -> Value {
    let files: Vec<Value> = f
        .code
        .files()
        .iter()
        .map(|(path, data)| json!({ "path": path, "size": data.len() }))
        .collect();
    json!({
        "id": f.id,
        "name": f.name,
        "description": f.description,
        "runtime": f.config.runtime,
        "handler": f.config.handler,
        "code_hash": f.config.code_hash,
        "code_size": f.code.total_bytes(),
        "files": files,
        "memory_mb": f.config.memory_mb,
        "timeout_sec": f.config.timeout_sec,
        "env_vars": f.config.env_vars,
        "max_instances": f.max_instances,
        "status": f.status.as_str(),
        "latest_version": f.latest_version,
        "created_at": timestamp(f.created_at),
        "updated_at": timestamp(f.updated_at),
    })
}

/// Stored JSON text as a JSON value (a string if it is somehow not valid JSON).
fn stored_json(text: &Option<String>) -> Value {
    match text {
        None => Value::Null,
        Some(t) => RawValue::from_string(t.clone())
            .ok()
            .and_then(|raw| serde_json::from_str(raw.get()).ok())
            .unwrap_or_else(|| Value::String(t.clone())),
    }
}

/// An invocation record.
pub fn invocation(i: &Invocation) -> Value {
    json!({
        "request_id": i.request_id,
        "function_id": i.function_id,
        "function_name": i.function_name,
        "version": i.version,
        "alias_used": i.alias_used,
        "session_key": i.session_key,
        "trigger": i.trigger,
        "status": i.status,
        "input": stored_json(&i.input),
        "output": stored_json(&i.output),
        "error": i.error,
        "start_type": i.start_type,
        "cold_start": i.cold_start(),
        "instance_id": i.instance_id,
        "started_at": timestamp(i.started_at),
        "completed_at": i.completed_at.map(timestamp),
        "duration_ms": i.duration_ms,
        "memory_used_mb": i.memory_used_mb,
        "logs": i.logs,
    })
}
