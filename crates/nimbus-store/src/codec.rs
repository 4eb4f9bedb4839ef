//! Conversions between domain values and database columns.
//!
//! Timestamps are unix milliseconds (BIGINT), unsigned numbers are BIGINT, enums are their
//! `as_str()` text, maps and routing tables are JSON text, code is the normalized
//! [`CodeBundle`] encoding. A stored value that does not read back is
//! [`StoreError::Corrupt`], naming its column.

use std::fmt::Display;
use std::str::FromStr;

use nimbus_core::{
    AliasRevision, CodeBundle, Function, FunctionAlias, FunctionConfig, FunctionVersion,
    Invocation, Snapshot, SnapshotFailure,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use sqlx::any::AnyRow;
use sqlx::Row;
use time::OffsetDateTime;

use crate::{StoreError, StoreResult};

/// A timestamp as unix milliseconds (sub-millisecond precision is dropped).
pub(crate) fn millis(t: OffsetDateTime) -> i64 {
    (t.unix_timestamp_nanos() / 1_000_000) as i64
}

/// A value as JSON text.
pub(crate) fn to_json<T: Serialize>(what: &str, value: &T) -> StoreResult<String> {
    serde_json::to_string(value)
        .map_err(|e| StoreError::Rejected(format!("cannot encode {what} as JSON: {e}")))
}

/// A `u64` as BIGINT; `Rejected` for values past `i64::MAX`, which no column can hold.
pub(crate) fn to_bigint(what: &str, value: u64) -> StoreResult<i64> {
    i64::try_from(value)
        .map_err(|_| StoreError::Rejected(format!("{what} {value} is too large to store")))
}

fn corrupt(column: &str, why: impl Display) -> StoreError {
    StoreError::Corrupt(format!("{column}: {why}"))
}

fn text(row: &AnyRow, column: &str) -> StoreResult<String> {
    Ok(row.try_get(column)?)
}

fn optional_text(row: &AnyRow, column: &str) -> StoreResult<Option<String>> {
    Ok(row.try_get(column)?)
}

fn parsed<T: FromStr>(row: &AnyRow, column: &str) -> StoreResult<T>
where
    T::Err: Display,
{
    text(row, column)?.parse().map_err(|e| corrupt(column, e))
}

fn optional_parsed<T: FromStr>(row: &AnyRow, column: &str) -> StoreResult<Option<T>>
where
    T::Err: Display,
{
    optional_text(row, column)?
        .map(|s| s.parse().map_err(|e| corrupt(column, e)))
        .transpose()
}

fn json<T: DeserializeOwned>(row: &AnyRow, column: &str) -> StoreResult<T> {
    serde_json::from_str(&text(row, column)?).map_err(|e| corrupt(column, e))
}

fn optional_json<T: DeserializeOwned>(row: &AnyRow, column: &str) -> StoreResult<Option<T>> {
    optional_text(row, column)?
        .map(|s| serde_json::from_str(&s).map_err(|e| corrupt(column, e)))
        .transpose()
}

fn to_u32(column: &str, value: i64) -> StoreResult<u32> {
    u32::try_from(value).map_err(|_| corrupt(column, format!("{value} is out of range")))
}

fn unsigned(row: &AnyRow, column: &str) -> StoreResult<u32> {
    to_u32(column, row.try_get(column)?)
}

fn optional_unsigned(row: &AnyRow, column: &str) -> StoreResult<Option<u32>> {
    let value: Option<i64> = row.try_get(column)?;
    value.map(|v| to_u32(column, v)).transpose()
}

/// A count column (`COUNT(*)`, or any non-negative BIGINT) as `u64`.
pub(crate) fn count(row: &AnyRow, column: &str) -> StoreResult<u64> {
    let value: i64 = row.try_get(column)?;
    u64::try_from(value).map_err(|_| corrupt(column, format!("{value} is negative")))
}

fn to_timestamp(column: &str, ms: i64) -> StoreResult<OffsetDateTime> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .map_err(|e| corrupt(column, e))
}

fn timestamp(row: &AnyRow, column: &str) -> StoreResult<OffsetDateTime> {
    to_timestamp(column, row.try_get(column)?)
}

fn optional_timestamp(row: &AnyRow, column: &str) -> StoreResult<Option<OffsetDateTime>> {
    let value: Option<i64> = row.try_get(column)?;
    value.map(|ms| to_timestamp(column, ms)).transpose()
}

fn code(row: &AnyRow) -> StoreResult<CodeBundle> {
    let bytes: Vec<u8> = row.try_get("code")?;
    CodeBundle::decode(&bytes).map_err(|e| corrupt("code", e))
}

/// The configuration columns shared by `functions` and `function_versions`.
fn config(row: &AnyRow) -> StoreResult<FunctionConfig> {
    Ok(FunctionConfig {
        runtime: parsed(row, "runtime")?,
        handler: parsed(row, "handler")?,
        code_hash: text(row, "code_hash")?,
        env_vars: json(row, "env_vars")?,
        memory_mb: unsigned(row, "memory_mb")?,
        timeout_sec: unsigned(row, "timeout_sec")?,
        network: parsed(row, "network")?,
        state: json(row, "state_config")?,
    })
}

/// A `deleted_functions` row.
pub(crate) fn deleted_function(row: &AnyRow) -> StoreResult<crate::DeletedFunction> {
    Ok(crate::DeletedFunction {
        function_id: text(row, "function_id")?,
        deleted_at: timestamp(row, "deleted_at")?,
    })
}

/// A `functions` row, code included.
pub(crate) fn function(row: &AnyRow) -> StoreResult<Function> {
    Ok(Function {
        id: text(row, "id")?,
        name: text(row, "name")?,
        description: text(row, "description")?,
        config: config(row)?,
        code: code(row)?,
        max_instances: unsigned(row, "max_instances")?,
        status: parsed(row, "status")?,
        latest_version: unsigned(row, "latest_version")?,
        created_at: timestamp(row, "created_at")?,
        updated_at: timestamp(row, "updated_at")?,
    })
}

/// A `function_versions` row; with an empty code bundle unless `with_code` (the row must
/// then carry the `code` column).
pub(crate) fn version(row: &AnyRow, with_code: bool) -> StoreResult<FunctionVersion> {
    Ok(FunctionVersion {
        function_id: text(row, "function_id")?,
        version: unsigned(row, "version")?,
        description: text(row, "description")?,
        config: config(row)?,
        code: if with_code {
            code(row)?
        } else {
            CodeBundle::default()
        },
        created_at: timestamp(row, "created_at")?,
        created_by: text(row, "created_by")?,
    })
}

/// A `function_aliases` row.
pub(crate) fn alias(row: &AnyRow) -> StoreResult<FunctionAlias> {
    Ok(FunctionAlias {
        function_id: text(row, "function_id")?,
        name: text(row, "name")?,
        description: text(row, "description")?,
        routing: json(row, "routing_config")?,
        revision: unsigned(row, "revision")?,
        created_at: timestamp(row, "created_at")?,
        updated_at: timestamp(row, "updated_at")?,
    })
}

/// An `alias_history` row.
pub(crate) fn alias_revision(row: &AnyRow) -> StoreResult<AliasRevision> {
    Ok(AliasRevision {
        function_id: text(row, "function_id")?,
        alias: text(row, "alias")?,
        revision: unsigned(row, "revision")?,
        action: parsed(row, "action")?,
        routing: json(row, "routing_config")?,
        previous_routing: optional_json(row, "previous_routing_config")?,
        description: text(row, "description")?,
        restored_revision: optional_unsigned(row, "restored_revision")?,
        changed_by: text(row, "changed_by")?,
        changed_at: timestamp(row, "changed_at")?,
    })
}

/// An `invocations` row.
pub(crate) fn invocation(row: &AnyRow) -> StoreResult<Invocation> {
    Ok(Invocation {
        request_id: text(row, "request_id")?,
        function_id: text(row, "function_id")?,
        function_name: text(row, "function_name")?,
        version: unsigned(row, "version")?,
        alias_used: optional_text(row, "alias_used")?,
        session_key: optional_text(row, "session_key")?,
        trigger: parsed(row, "trigger_kind")?,
        status: parsed(row, "status")?,
        input: optional_text(row, "input")?,
        output: optional_text(row, "output")?,
        error: optional_json(row, "error")?,
        start_type: optional_parsed(row, "start_type")?,
        instance_id: optional_text(row, "instance_id")?,
        started_at: timestamp(row, "started_at")?,
        completed_at: optional_timestamp(row, "completed_at")?,
        duration_ms: row.try_get("duration_ms")?,
        memory_used_mb: optional_unsigned(row, "memory_used_mb")?,
        logs: text(row, "logs")?,
    })
}

/// A `snapshots` row.
pub(crate) fn snapshot(row: &AnyRow) -> StoreResult<Snapshot> {
    Ok(Snapshot {
        id: text(row, "id")?,
        function_id: text(row, "function_id")?,
        version: unsigned(row, "version")?,
        code_hash: text(row, "code_hash")?,
        runtime: parsed(row, "runtime")?,
        memory_mb: unsigned(row, "memory_mb")?,
        env_vars_hash: text(row, "env_vars_hash")?,
        driver: text(row, "driver")?,
        path: optional_text(row, "path")?,
        files: json(row, "files")?,
        size_bytes: count(row, "size_bytes")?,
        status: parsed(row, "status")?,
        error_message: optional_text(row, "error_message")?,
        failure_count: count(row, "failure_count")?,
        last_failure: match optional_timestamp(row, "last_failure_at")? {
            Some(at) => Some(SnapshotFailure {
                status: parsed(row, "last_failure_status")?,
                message: optional_text(row, "last_failure")?,
                at,
            }),
            None => None,
        },
        fork_count: count(row, "fork_count")?,
        avg_fork_ms: row.try_get("avg_fork_ms")?,
        restore_count: count(row, "restore_count")?,
        avg_restore_ms: row.try_get("avg_restore_ms")?,
        created_at: timestamp(row, "created_at")?,
        last_used_at: optional_timestamp(row, "last_used_at")?,
        expires_at: optional_timestamp(row, "expires_at")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn millis_round_trip_at_millisecond_precision() {
        let t = nimbus_core::now();
        assert_eq!(to_timestamp("t", millis(t)).unwrap(), t);
        assert!(matches!(to_u32("v", -1), Err(StoreError::Corrupt(m)) if m.contains("v:")));
        assert_eq!(to_bigint("size", 5 << 30).unwrap(), 5 << 30);
        assert!(
            matches!(to_bigint("size", u64::MAX), Err(StoreError::Rejected(m)) if m.contains("size"))
        );
    }
}
