//! Snapshot rows: claiming a key, finishing a build, use counters and the failure history.

use nimbus_core::{
    ids, NewSnapshot, Snapshot, SnapshotFile, SnapshotKey, SnapshotStatus, SnapshotUse,
};
use sqlx::AnyPool;
use time::OffsetDateTime;

use crate::codec::{self, millis, to_bigint, to_json};
use crate::{StoreError, StoreResult};

/// The failure history's part of an update of a snapshot's status: with the placeholder
/// `$failed` 1 (a failure), one more in the count, and the last failure's status, message
/// and time taken from the placeholders `$status`, `$message` and `$at`.
macro_rules! failure_history {
    ($status:literal, $message:literal, $failed:literal, $at:literal) => {
        concat!(
            "failure_count = failure_count + ",
            $failed,
            ", ",
            "last_failure_status = CASE WHEN ",
            $failed,
            " = 1 THEN ",
            $status,
            " ELSE last_failure_status END, ",
            "last_failure = CASE WHEN ",
            $failed,
            " = 1 THEN ",
            $message,
            " ELSE last_failure END, ",
            "last_failure_at = CASE WHEN ",
            $failed,
            " = 1 THEN ",
            $at,
            " ELSE last_failure_at END"
        )
    };
}

/// Columns of `snapshots`, as selected.
macro_rules! snapshot_columns {
    () => {
        "id, function_id, version, code_hash, runtime, memory_mb, env_vars_hash, driver, \
         path, files, size_bytes, status, error_message, restore_count, avg_restore_ms, \
         created_at, last_used_at, expires_at, failure_count, last_failure_status, \
         last_failure, last_failure_at, fork_count, avg_fork_ms"
    };
}

/// Claims a snapshot key in one statement: inserts a `building` row (id, key, runtime and
/// memory as `$1`–`$8`, empty files `$9`, status `$10`, creation time `$11`), or resets the
/// key's row to one unless that row's status is `$12` or `$13` (building, ready). Returns
/// the row only when it wrote it. Being one statement on the key's unique index, concurrent
/// claims are serialized: only the first finds the row claimable.
const BEGIN_SNAPSHOT: &str = concat!(
    "INSERT INTO snapshots (",
    snapshot_columns!(),
    ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, NULL, $9, 0, $10, NULL, 0, 0.0, $11, NULL, NULL, \
     0, NULL, NULL, NULL, 0, 0.0) \
     ON CONFLICT (function_id, version, code_hash, env_vars_hash, driver) DO UPDATE SET \
     runtime = excluded.runtime, memory_mb = excluded.memory_mb, path = excluded.path, \
     files = excluded.files, size_bytes = excluded.size_bytes, status = excluded.status, \
     error_message = excluded.error_message, created_at = excluded.created_at, \
     expires_at = excluded.expires_at \
     WHERE snapshots.status <> $12 AND snapshots.status <> $13 \
     RETURNING ",
    snapshot_columns!()
);

/// Sets a build's outcome. With `$8` = 1 (a failure: `$2` is failed or corrupt) it also
/// enters the failure history: the count, and status, message and time (`$9`) of the last.
const FINISH_SNAPSHOT: &str = concat!(
    "UPDATE snapshots SET status = $2, error_message = $3, \
     path = $4, files = $5, size_bytes = $6, expires_at = $7, ",
    failure_history!("$2", "$3", "$8", "$9"),
    " WHERE id = $1"
);

/// Sets a status and error message; the failure history as in [`FINISH_SNAPSHOT`] (`$4`
/// = 1 for a failure, at `$5`).
const SET_SNAPSHOT_STATUS: &str = concat!(
    "UPDATE snapshots SET status = $2, error_message = $3, ",
    failure_history!("$2", "$3", "$4", "$5"),
    " WHERE id = $1"
);

/// Counts an instance forked from the template, of `$2` ms: every right-hand side reads
/// the row as it was, so the mean folds in the new value against the old count, atomically
/// with the count's increment.
const RECORD_SNAPSHOT_FORK: &str = "UPDATE snapshots SET fork_count = fork_count + 1, \
     avg_fork_ms = (avg_fork_ms * fork_count + $2) / (fork_count + 1), \
     last_used_at = $3, expires_at = $4 WHERE id = $1";
/// Counts an instance started from the checkpoint on disk, as [`RECORD_SNAPSHOT_FORK`].
const RECORD_SNAPSHOT_RESTORE: &str = "UPDATE snapshots SET restore_count = restore_count + 1, \
     avg_restore_ms = (avg_restore_ms * restore_count + $2) / (restore_count + 1), \
     last_used_at = $3, expires_at = $4 WHERE id = $1";

const SELECT_SNAPSHOT: &str = concat!(
    "SELECT ",
    snapshot_columns!(),
    " FROM snapshots WHERE id = $1"
);
const FIND_SNAPSHOT: &str = concat!(
    "SELECT ",
    snapshot_columns!(),
    " FROM snapshots WHERE function_id = $1 AND version = $2 AND code_hash = $3 \
     AND env_vars_hash = $4 AND driver = $5"
);
const LIST_SNAPSHOTS: &str = concat!(
    "SELECT ",
    snapshot_columns!(),
    " FROM snapshots ORDER BY created_at DESC, id DESC"
);
const LIST_FUNCTION_SNAPSHOTS: &str = concat!(
    "SELECT ",
    snapshot_columns!(),
    " FROM snapshots WHERE function_id = $1 ORDER BY created_at DESC, id DESC"
);

/// How often [`MetadataStore::begin_snapshot`] claims again when the live row that stopped
/// its claim is deleted before it can read it.
const BEGIN_SNAPSHOT_ATTEMPTS: usize = 5;

/// Whether `error` is a foreign key violation (a row referring to one that does not exist).
fn is_missing_reference(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(db) if db.is_foreign_key_violation())
}

pub(super) async fn begin_snapshot(
    pool: &AnyPool,
    new: &NewSnapshot,
) -> StoreResult<(Snapshot, bool)> {
    let key = &new.key;
    let no_files = to_json("files", &Vec::<SnapshotFile>::new())?;
    for _ in 0..BEGIN_SNAPSHOT_ATTEMPTS {
        let claimed = sqlx::query(BEGIN_SNAPSHOT)
            .bind(ids::snapshot_id())
            .bind(key.function_id.as_str())
            .bind(i64::from(key.version))
            .bind(key.code_hash.as_str())
            .bind(new.runtime.as_str())
            .bind(i64::from(new.memory_mb))
            .bind(key.env_vars_hash.as_str())
            .bind(key.driver.as_str())
            .bind(no_files.as_str())
            .bind(SnapshotStatus::Building.as_str())
            .bind(millis(nimbus_core::now()))
            .bind(SnapshotStatus::Building.as_str())
            .bind(SnapshotStatus::Ready.as_str())
            .fetch_optional(pool)
            .await;
        match claimed {
            Ok(Some(row)) => return Ok((codec::snapshot(&row)?, true)),
            // A live row holds the key: it is the caller's answer (unless it was
            // deleted since, and then the key is claimable again).
            Ok(None) => {
                if let Some(live) = find_snapshot(pool, key).await? {
                    return Ok((live, false));
                }
            }
            Err(e) if is_missing_reference(&e) => {
                return Err(StoreError::NotFound(format!(
                    "version {} of function {:?} not found",
                    key.version, key.function_id
                )))
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(StoreError::Backend(format!(
        "snapshot of version {} of function {:?}: its row kept being deleted while claimed",
        key.version, key.function_id
    )))
}

// The parameters of `MetadataStore::finish_snapshot`, and the pool.
#[allow(clippy::too_many_arguments)]
pub(super) async fn finish_snapshot(
    pool: &AnyPool,
    id: &str,
    status: SnapshotStatus,
    error_message: Option<&str>,
    path: Option<&str>,
    files: &[SnapshotFile],
    size_bytes: u64,
    expires_at: Option<OffsetDateTime>,
) -> StoreResult<bool> {
    let updated = sqlx::query(FINISH_SNAPSHOT)
        .bind(id)
        .bind(status.as_str())
        .bind(error_message)
        .bind(path)
        .bind(to_json("files", &files)?)
        .bind(to_bigint("size_bytes", size_bytes)?)
        .bind(expires_at.map(millis))
        .bind(i64::from(status.is_failure()))
        .bind(millis(nimbus_core::now()))
        .execute(pool)
        .await?
        .rows_affected();
    Ok(updated > 0)
}

pub(super) async fn set_snapshot_status(
    pool: &AnyPool,
    id: &str,
    status: SnapshotStatus,
    error_message: Option<&str>,
) -> StoreResult<bool> {
    let updated = sqlx::query(SET_SNAPSHOT_STATUS)
        .bind(id)
        .bind(status.as_str())
        .bind(error_message)
        .bind(i64::from(status.is_failure()))
        .bind(millis(nimbus_core::now()))
        .execute(pool)
        .await?
        .rows_affected();
    Ok(updated > 0)
}

pub(super) async fn record_snapshot_use(
    pool: &AnyPool,
    id: &str,
    how: SnapshotUse,
    start_ms: f64,
    used_at: OffsetDateTime,
    expires_at: Option<OffsetDateTime>,
) -> StoreResult<bool> {
    let statement = match how {
        SnapshotUse::Fork => RECORD_SNAPSHOT_FORK,
        SnapshotUse::Restore => RECORD_SNAPSHOT_RESTORE,
    };
    let updated = sqlx::query(statement)
        .bind(id)
        .bind(start_ms)
        .bind(millis(used_at))
        .bind(expires_at.map(millis))
        .execute(pool)
        .await?
        .rows_affected();
    Ok(updated > 0)
}

pub(super) async fn get_snapshot(pool: &AnyPool, id: &str) -> StoreResult<Option<Snapshot>> {
    let row = sqlx::query(SELECT_SNAPSHOT)
        .bind(id)
        .fetch_optional(pool)
        .await?;
    row.as_ref().map(codec::snapshot).transpose()
}

pub(super) async fn find_snapshot(
    pool: &AnyPool,
    key: &SnapshotKey,
) -> StoreResult<Option<Snapshot>> {
    let row = sqlx::query(FIND_SNAPSHOT)
        .bind(key.function_id.as_str())
        .bind(i64::from(key.version))
        .bind(key.code_hash.as_str())
        .bind(key.env_vars_hash.as_str())
        .bind(key.driver.as_str())
        .fetch_optional(pool)
        .await?;
    row.as_ref().map(codec::snapshot).transpose()
}

pub(super) async fn list_snapshots(
    pool: &AnyPool,
    function_id: Option<&str>,
) -> StoreResult<Vec<Snapshot>> {
    let query = match function_id {
        None => sqlx::query(LIST_SNAPSHOTS),
        Some(id) => sqlx::query(LIST_FUNCTION_SNAPSHOTS).bind(id),
    };
    let rows = query.fetch_all(pool).await?;
    rows.iter().map(codec::snapshot).collect()
}

pub(super) async fn delete_snapshot(pool: &AnyPool, id: &str) -> StoreResult<bool> {
    let deleted = sqlx::query("DELETE FROM snapshots WHERE id = $1")
        .bind(id)
        .execute(pool)
        .await?
        .rows_affected();
    Ok(deleted > 0)
}
