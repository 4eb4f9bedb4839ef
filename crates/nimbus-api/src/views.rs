//! JSON shapes of the API's resources.

use base64::Engine as _;
use nimbus_core::{
    AliasRevision, CodeBundle, Function, FunctionAlias, FunctionVersion, Invocation,
};
use nimbus_engine::{Cleanup, SnapshotView};
use serde_json::value::RawValue;
use serde_json::{json, Value};
use time::format_description::BorrowedFormatItem;
use time::macros::format_description;
use time::OffsetDateTime;

/// RFC 3339 in UTC with exactly three fractional digits (the precision stored), so
/// timestamps have one width and sort as text.
const TIMESTAMP: &[BorrowedFormatItem<'static>] =
    format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z");

/// RFC 3339 text of a timestamp, e.g. `2026-11-28T03:19:35.340Z`.
pub fn timestamp(t: OffsetDateTime) -> String {
    t.to_offset(time::UtcOffset::UTC)
        .format(TIMESTAMP)
        .unwrap_or_default()
}

/// The files of a code bundle: path and size, and with `contents` the text of each UTF-8
/// file (`content`) or the base64 of each other one (`content_base64`).
fn files(code: &CodeBundle, contents: bool) -> Vec<Value> {
    code.files()
        .iter()
        .map(|(path, data)| {
            let mut file = json!({ "path": path, "size": data.len() });
            if contents {
                match std::str::from_utf8(data) {
                    Ok(text) => file["content"] = json!(text),
                    Err(_) => {
                        file["content_base64"] =
                            json!(base64::engine::general_purpose::STANDARD.encode(data))
                    }
                }
            }
            file
        })
        .collect()
}

/// A function, without its code contents (file names and sizes only).
pub fn function(f: &Function) -> Value {
    let files = files(&f.code, false);
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
        "network": f.config.network,
        "state_config": f.config.state,
        "env_vars": f.config.env_vars,
        "max_instances": f.max_instances,
        "status": f.status.as_str(),
        "latest_version": f.latest_version,
        "created_at": timestamp(f.created_at),
        "updated_at": timestamp(f.updated_at),
    })
}

/// A version without its code; `aliases` names the aliases whose routing includes it.
pub fn version(v: &FunctionVersion, aliases: &[FunctionAlias]) -> Value {
    let routed_by: Vec<&str> = aliases
        .iter()
        .filter(|a| a.routing.versions().any(|n| n == v.version))
        .map(|a| a.name.as_str())
        .collect();
    json!({
        "function_id": v.function_id,
        "version": v.version,
        "description": v.description,
        "runtime": v.config.runtime,
        "handler": v.config.handler,
        "code_hash": v.config.code_hash,
        "memory_mb": v.config.memory_mb,
        "timeout_sec": v.config.timeout_sec,
        "network": v.config.network,
        "state_config": v.config.state,
        "env_vars": v.config.env_vars,
        "created_at": timestamp(v.created_at),
        "created_by": v.created_by,
        "aliases": routed_by,
    })
}

/// A version with its files: their contents too when `contents`.
pub fn version_with_code(v: &FunctionVersion, aliases: &[FunctionAlias], contents: bool) -> Value {
    let mut body = version(v, aliases);
    body["code_size"] = json!(v.code.total_bytes());
    body["files"] = json!(files(&v.code, contents));
    body
}

/// An alias.
pub fn alias(a: &FunctionAlias) -> Value {
    json!({
        "function_id": a.function_id,
        "name": a.name,
        "description": a.description,
        "routing_config": a.routing,
        "revision": a.revision,
        "created_at": timestamp(a.created_at),
        "updated_at": timestamp(a.updated_at),
    })
}

/// One entry of an alias's history.
pub fn alias_revision(r: &AliasRevision) -> Value {
    json!({
        "revision": r.revision,
        "action": r.action,
        "routing_config": r.routing,
        "previous_routing_config": r.previous_routing,
        "description": r.description,
        "restored_revision": r.restored_revision,
        "changed_by": r.changed_by,
        "changed_at": timestamp(r.changed_at),
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

/// A snapshot: its index row and whether this server holds its template in memory.
pub fn snapshot(view: &SnapshotView) -> Value {
    let s = &view.snapshot;
    json!({
        "id": s.id,
        "function_id": s.function_id,
        "version": s.version,
        "code_hash": s.code_hash,
        "runtime": s.runtime,
        "memory_mb": s.memory_mb,
        "env_vars_hash": s.env_vars_hash,
        "driver": s.driver,
        "path": s.path,
        "files": s.files,
        "size_bytes": s.size_bytes,
        "status": s.status.as_str(),
        "error_message": s.error_message,
        "failure_count": s.failure_count,
        "last_failure": s.last_failure.as_ref().map(|f| json!({
            "status": f.status.as_str(),
            "message": f.message,
            "at": timestamp(f.at),
        })),
        "resident": view.resident,
        "fork_count": s.fork_count,
        "avg_fork_ms": s.avg_fork_ms,
        "restore_count": s.restore_count,
        "avg_restore_ms": s.avg_restore_ms,
        "created_at": timestamp(s.created_at),
        "last_used_at": s.last_used_at.map(timestamp),
        "expires_at": s.expires_at.map(timestamp),
    })
}

/// What a snapshot cleanup removed (or, dry, would remove).
pub fn snapshot_cleanup(c: &Cleanup) -> Value {
    let removed: Vec<Value> = c.removed.iter().map(snapshot).collect();
    json!({
        "dry_run": c.dry_run,
        "removed": removed,
        "freed_bytes": c.freed_bytes,
    })
}

#[cfg(test)]
mod tests {
    use time::macros::datetime;

    #[test]
    fn timestamps_have_millisecond_precision_and_one_width() {
        assert_eq!(
            super::timestamp(datetime!(2026-11-28 03:19:35.34 UTC)),
            "2026-11-28T03:19:35.340Z"
        );
        assert_eq!(
            super::timestamp(datetime!(2026-11-28 05:19:35 +02:00)),
            "2026-11-28T03:19:35.000Z"
        );
    }

    #[test]
    fn snapshots_show_millisecond_timestamps_and_residency() {
        use nimbus_core::{Runtime, Snapshot, SnapshotStatus};
        let view = nimbus_engine::SnapshotView {
            snapshot: Snapshot {
                id: "snap_1".into(),
                function_id: "fn_1".into(),
                version: 3,
                code_hash: "sha256:00".into(),
                runtime: Runtime::Python311,
                memory_mb: 256,
                env_vars_hash: "e3".into(),
                driver: "process".into(),
                path: None,
                files: Vec::new(),
                size_bytes: 0,
                status: SnapshotStatus::Failed,
                error_message: Some("RuntimeError: no".into()),
                failure_count: 3,
                last_failure: Some(nimbus_core::SnapshotFailure {
                    status: SnapshotStatus::Failed,
                    message: Some("RuntimeError: no".into()),
                    at: datetime!(2026-01-02 03:04:05.5 UTC),
                }),
                fork_count: 9,
                avg_fork_ms: 4.0,
                restore_count: 2,
                avg_restore_ms: 1.5,
                created_at: datetime!(2026-01-02 03:04:05.6789 UTC),
                last_used_at: Some(datetime!(2026-01-02 03:04:06 UTC)),
                expires_at: None,
            },
            resident: true,
        };
        let json = super::snapshot(&view);
        assert_eq!(json["created_at"], "2026-01-02T03:04:05.678Z");
        assert_eq!(json["last_used_at"], "2026-01-02T03:04:06.000Z");
        assert_eq!(json["expires_at"], serde_json::Value::Null);
        assert_eq!(json["status"], "failed");
        assert_eq!(json["runtime"], "python3.11");
        assert_eq!(json["error_message"], "RuntimeError: no");
        assert_eq!(json["failure_count"], 3);
        assert_eq!(json["last_failure"]["at"], "2026-01-02T03:04:05.500Z");
        assert_eq!(json["last_failure"]["status"], "failed");
        assert_eq!(json["fork_count"], 9);
        assert_eq!(json["resident"], true);
        assert_eq!(json["files"], serde_json::json!([]));
        let cleanup = super::snapshot_cleanup(&nimbus_engine::Cleanup {
            dry_run: true,
            removed: vec![view],
            freed_bytes: 7,
        });
        assert_eq!(cleanup["dry_run"], true);
        assert_eq!(cleanup["freed_bytes"], 7);
        assert_eq!(cleanup["removed"][0]["id"], "snap_1");
        assert_eq!(
            cleanup["removed"][0]["created_at"],
            "2026-01-02T03:04:05.678Z"
        );
    }
}
