//! The one implementation of [`MetadataStore`], over sqlx's `Any` driver.
//!
//! Every statement is SQL that SQLite and PostgreSQL both accept (`$n` placeholders,
//! `ON CONFLICT … DO UPDATE`, `RETURNING`), so each method is written once for both
//! backends; the [`Dialect`] only chooses the migrations, the bind-parameter limit and the
//! placeholders of the one generated statement (the multi-row invocation upsert).
//! Column values are converted by [`crate::codec`].
//!
//! SQLite takes its write lock at a transaction's first write, so every writing
//! transaction here starts with its write: concurrent writers then wait on the busy
//! timeout instead of failing on a lock upgrade.

use std::collections::{HashMap, HashSet};

use async_trait::async_trait;
use futures::TryStreamExt;
use nimbus_core::{
    ids, AliasAction, AliasRevision, CodeBundle, Function, FunctionAlias, FunctionConfig,
    FunctionVersion, Invocation, NewSnapshot, RoutingConfig, Snapshot, SnapshotFile, SnapshotKey,
    SnapshotStatus, SnapshotUse, LATEST_ALIAS,
};
use sqlx::any::AnyArguments;
use sqlx::query::Query;
use sqlx::{Any, AnyConnection, AnyPool, Row};
use time::OffsetDateTime;

use crate::backend::{self, Dialect};
use crate::codec::{self, millis, to_bigint, to_json};
use crate::{
    AliasChange, AliasWrite, DeletedFunction, InvocationFilter, MetadataStore, Page, Published,
    RollbackTarget, StoreError, StoreResult, DEFAULT_LIST_LIMIT,
};

type AnyQuery<'q> = Query<'q, Any, AnyArguments<'q>>;

/// Columns of `functions`, as selected.
macro_rules! function_columns {
    () => {
        "id, name, description, runtime, handler, code_hash, env_vars, memory_mb, \
         timeout_sec, network, state_config, code, max_instances, status, latest_version, \
         created_at, updated_at"
    };
}

/// Columns of `function_versions` except `code`, as selected.
macro_rules! version_columns {
    () => {
        "function_id, version, description, runtime, handler, code_hash, env_vars, \
         memory_mb, timeout_sec, network, state_config, created_at, created_by"
    };
}

/// Columns of `function_aliases`, as selected.
macro_rules! alias_columns {
    () => {
        "function_id, name, description, routing_config, revision, created_at, updated_at"
    };
}

/// Columns of `alias_history`, in the order [`insert_revision`] binds them.
macro_rules! revision_columns {
    () => {
        "function_id, alias, revision, action, routing_config, previous_routing_config, \
         description, restored_revision, changed_by, changed_at"
    };
}

/// Columns of `invocations`, in the order [`bind_invocation`] binds them.
macro_rules! invocation_columns {
    () => {
        "request_id, function_id, function_name, version, alias_used, session_key, \
         trigger_kind, status, input, output, error, start_type, instance_id, started_at, \
         completed_at, duration_ms, memory_used_mb, logs"
    };
}

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

/// `$1` id, then the draft in [`bind_draft`] order (`$2`–`$14`), then name, latest
/// version and creation time.
const INSERT_FUNCTION: &str = "INSERT INTO functions (id, description, runtime, handler, \
     code_hash, env_vars, memory_mb, timeout_sec, network, state_config, code, \
     max_instances, status, updated_at, name, latest_version, created_at) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)";

/// Saves the draft bound by [`bind_draft`].
const UPDATE_DRAFT: &str = "UPDATE functions SET description = $2, runtime = $3, \
     handler = $4, code_hash = $5, env_vars = $6, memory_mb = $7, timeout_sec = $8, \
     network = $9, state_config = $10, code = $11, max_instances = $12, status = $13, \
     updated_at = $14 WHERE id = $1";

/// Allocates the next version number under the function's row lock.
const NEXT_VERSION: &str = "UPDATE functions SET latest_version = latest_version + 1 \
     WHERE id = $1 RETURNING latest_version";

/// Takes the function row's lock (PostgreSQL) and the write lock (SQLite) without changing
/// anything. Every alias and version change starts with it, so such changes of one function
/// are serialized: checks (a version exists, no alias routes to it) stay true until commit.
const LOCK_FUNCTION: &str = "UPDATE functions SET latest_version = latest_version WHERE id = $1";

/// Function id, version and description, the configuration in [`bind_config`] order
/// (`$4`–`$12`), then creation time and author.
const INSERT_VERSION: &str = "INSERT INTO function_versions (function_id, version, \
     description, runtime, handler, code_hash, env_vars, memory_mb, timeout_sec, network, \
     state_config, code, created_at, created_by) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)";

const INSERT_ALIAS: &str = concat!(
    "INSERT INTO function_aliases (",
    alias_columns!(),
    ") VALUES ($1, $2, $3, $4, $5, $6, $7)"
);

/// Writes an alias's next revision.
const UPDATE_ALIAS: &str = "UPDATE function_aliases SET description = $3, \
     routing_config = $4, revision = $5, updated_at = $6 WHERE function_id = $1 AND name = $2";

const INSERT_REVISION: &str = concat!(
    "INSERT INTO alias_history (",
    revision_columns!(),
    ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
);

const SELECT_FUNCTION_BY_ID: &str = concat!(
    "SELECT ",
    function_columns!(),
    " FROM functions WHERE id = $1"
);
const SELECT_FUNCTION_BY_NAME: &str = concat!(
    "SELECT ",
    function_columns!(),
    " FROM functions WHERE name = $1"
);
const LIST_FUNCTIONS: &str = concat!(
    "SELECT ",
    function_columns!(),
    " FROM functions ORDER BY name LIMIT $1 OFFSET $2"
);

const SELECT_VERSION: &str = concat!(
    "SELECT ",
    version_columns!(),
    ", code FROM function_versions WHERE function_id = $1 AND version = $2"
);
/// The newest existing version, without code.
const NEWEST_VERSION: &str = concat!(
    "SELECT ",
    version_columns!(),
    " FROM function_versions WHERE function_id = $1 ORDER BY version DESC LIMIT 1"
);
const LIST_VERSIONS: &str = concat!(
    "SELECT ",
    version_columns!(),
    " FROM function_versions WHERE function_id = $1 ORDER BY version DESC LIMIT $2 OFFSET $3"
);

const SELECT_ALIAS: &str = concat!(
    "SELECT ",
    alias_columns!(),
    " FROM function_aliases WHERE function_id = $1 AND name = $2"
);
const LIST_ALIASES: &str = concat!(
    "SELECT ",
    alias_columns!(),
    " FROM function_aliases WHERE function_id = $1 ORDER BY name"
);
const LIST_ALIASES_PAGE: &str = concat!(
    "SELECT ",
    alias_columns!(),
    " FROM function_aliases WHERE function_id = $1 ORDER BY name LIMIT $2 OFFSET $3"
);
const COUNT_ALIASES: &str = "SELECT COUNT(*) AS total FROM function_aliases WHERE function_id = $1";

const SELECT_REVISION: &str = concat!(
    "SELECT ",
    revision_columns!(),
    " FROM alias_history WHERE function_id = $1 AND alias = $2 AND revision = $3"
);
/// Revisions before `$3`, newest first.
const EARLIER_REVISIONS: &str = concat!(
    "SELECT ",
    revision_columns!(),
    " FROM alias_history WHERE function_id = $1 AND alias = $2 AND revision < $3 \
     ORDER BY revision DESC"
);
const LIST_REVISIONS: &str = concat!(
    "SELECT ",
    revision_columns!(),
    " FROM alias_history WHERE function_id = $1 AND alias = $2 \
     ORDER BY revision DESC LIMIT $3 OFFSET $4"
);

const SELECT_INVOCATION: &str = concat!(
    "SELECT ",
    invocation_columns!(),
    " FROM invocations WHERE request_id = $1"
);
const LIST_INVOCATIONS: &str = concat!(
    "SELECT ",
    invocation_columns!(),
    " FROM invocations WHERE function_id = $1 \
     ORDER BY started_at DESC, request_id DESC LIMIT $2"
);
const LIST_INVOCATIONS_WITH_STATUS: &str = concat!(
    "SELECT ",
    invocation_columns!(),
    " FROM invocations WHERE function_id = $1 AND status = $3 \
     ORDER BY started_at DESC, request_id DESC LIMIT $2"
);

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

/// A [`MetadataStore`] on a SQLite or PostgreSQL connection pool.
pub(crate) struct SqlStore {
    pool: AnyPool,
    dialect: Dialect,
}

impl SqlStore {
    /// Connects to `url` and applies pending migrations.
    pub(crate) async fn open(url: &str) -> StoreResult<Self> {
        let (dialect, pool) = backend::connect(url).await?;
        tracing::debug!(backend = dialect.name(), "metadata store opened");
        Ok(SqlStore { pool, dialect })
    }

    /// The database behind it.
    pub(crate) fn dialect(&self) -> Dialect {
        self.dialect
    }

    /// Its pool of connections.
    pub(crate) fn pool(&self) -> &AnyPool {
        &self.pool
    }
}

/// Binds the configuration a version freezes and its code, in the column order
/// `runtime, handler, code_hash, env_vars, memory_mb, timeout_sec, network, state_config,
/// code`.
fn bind_config<'q>(
    query: AnyQuery<'q>,
    config: &'q FunctionConfig,
    code: &CodeBundle,
) -> StoreResult<AnyQuery<'q>> {
    Ok(query
        .bind(config.runtime.as_str())
        .bind(config.handler.to_string())
        .bind(config.code_hash.as_str())
        .bind(to_json("env_vars", &config.env_vars)?)
        .bind(i64::from(config.memory_mb))
        .bind(i64::from(config.timeout_sec))
        .bind(config.network.as_str())
        .bind(to_json("state_config", &config.state)?)
        .bind(code.encode()))
}

/// Binds a function's id and draft as `$1`–`$14`: id, description, the configuration and
/// code (see [`bind_config`]), max_instances, status, updated_at.
fn bind_draft<'q>(query: AnyQuery<'q>, function: &'q Function) -> StoreResult<AnyQuery<'q>> {
    let query = query
        .bind(function.id.as_str())
        .bind(function.description.as_str());
    Ok(bind_config(query, &function.config, &function.code)?
        .bind(i64::from(function.max_instances))
        .bind(function.status.as_str())
        .bind(millis(function.updated_at)))
}

/// Binds one record in the order of `invocation_columns!`.
fn bind_invocation<'q>(query: AnyQuery<'q>, record: &'q Invocation) -> StoreResult<AnyQuery<'q>> {
    let error = record
        .error
        .as_ref()
        .map(|e| to_json("invocation error", e))
        .transpose()?;
    Ok(query
        .bind(record.request_id.as_str())
        .bind(record.function_id.as_str())
        .bind(record.function_name.as_str())
        .bind(i64::from(record.version))
        .bind(record.alias_used.as_deref())
        .bind(record.session_key.as_deref())
        .bind(record.trigger.as_str())
        .bind(record.status.as_str())
        .bind(record.input.as_deref())
        .bind(record.output.as_deref())
        .bind(error)
        .bind(record.start_type.map(|s| s.as_str()))
        .bind(record.instance_id.as_deref())
        .bind(millis(record.started_at))
        .bind(record.completed_at.map(millis))
        .bind(record.duration_ms)
        .bind(record.memory_used_mb.map(i64::from))
        .bind(storable_text(&record.logs)))
}

/// `text` with NUL characters replaced by U+FFFD: PostgreSQL refuses them in text columns,
/// and a function's output (its logs) may hold anything.
fn storable_text(text: &str) -> String {
    text.replace('\0', "\u{FFFD}")
}

fn invocation_columns() -> impl Iterator<Item = &'static str> + Clone {
    invocation_columns!().split(',').map(str::trim)
}

/// `… IN (` completed by [`ids_in`]: which of some function ids are deleted ones.
const DELETED_AMONG: &str = "SELECT function_id FROM deleted_functions WHERE function_id IN (";
/// `… IN (` completed by [`ids_in`]: which of some function ids exist.
const EXISTING_AMONG: &str = "SELECT id FROM functions WHERE id IN (";

/// Runs `select` (a statement ending in `IN (`) over `ids`, in statements within the
/// parameter limit; the ids it returns.
async fn ids_in(
    conn: &mut AnyConnection,
    dialect: Dialect,
    select: &str,
    ids: &[&str],
) -> StoreResult<HashSet<String>> {
    let mut found = HashSet::new();
    for chunk in ids.chunks(dialect.max_bind_params()) {
        let mut sql = select.to_owned();
        push_placeholders(dialect, &mut sql, chunk.len());
        sql.push(')');
        let mut query = sqlx::query(&sql).persistent(false);
        for id in chunk {
            query = query.bind(*id);
        }
        for row in query.fetch_all(&mut *conn).await? {
            found.insert(row.try_get::<String, _>(0)?);
        }
    }
    Ok(found)
}

/// Appends `n` bind parameters, comma-separated, numbered from 1.
fn push_placeholders(dialect: Dialect, sql: &mut String, n: usize) {
    for i in 1..=n {
        if i > 1 {
            sql.push_str(", ");
        }
        dialect.push_placeholder(sql, i);
    }
}

/// `INSERT INTO invocations … VALUES (…), (…) … ON CONFLICT (request_id) DO UPDATE` for
/// `rows` records, every column replaced on conflict unless the stored record is finished.
fn upsert_invocations_sql(dialect: Dialect, rows: usize) -> String {
    let columns = invocation_columns().count();
    let mut sql = String::with_capacity(800 + rows * columns * 7);
    sql.push_str(concat!(
        "INSERT INTO invocations (",
        invocation_columns!(),
        ") VALUES "
    ));
    for row in 0..rows {
        sql.push_str(if row == 0 { "(" } else { ", (" });
        for column in 0..columns {
            if column > 0 {
                sql.push_str(", ");
            }
            dialect.push_placeholder(&mut sql, row * columns + column + 1);
        }
        sql.push(')');
    }
    sql.push_str(" ON CONFLICT (request_id) DO UPDATE SET ");
    let updates: Vec<String> = invocation_columns()
        .skip(1)
        .map(|column| format!("{column} = excluded.{column}"))
        .collect();
    sql.push_str(&updates.join(", "));
    sql.push_str(" WHERE invocations.completed_at IS NULL");
    sql
}

/// The last record of each request id, in batch order: one statement may not upsert the
/// same row twice (PostgreSQL refuses), and the last write is the one that must win.
fn last_per_request(records: &[Invocation]) -> Vec<&Invocation> {
    let last: HashMap<&str, usize> = records
        .iter()
        .enumerate()
        .map(|(i, r)| (r.request_id.as_str(), i))
        .collect();
    records
        .iter()
        .enumerate()
        .filter(|(i, r)| last[r.request_id.as_str()] == *i)
        .map(|(_, r)| r)
        .collect()
}

/// Whether `error` is the unique violation of the function name.
fn is_name_taken(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Database(db) if db.is_unique_violation() => {
            db.constraint() == Some("functions_name_key") || db.message().contains("functions.name")
        }
        _ => false,
    }
}

/// Whether `error` is a foreign key violation (a row referring to one that does not exist).
fn is_missing_reference(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(db) if db.is_foreign_key_violation())
}

/// The row limit of a listing: `requested`, or [`DEFAULT_LIST_LIMIT`] for 0.
fn page_size(requested: u32) -> i64 {
    i64::from(if requested == 0 {
        DEFAULT_LIST_LIMIT
    } else {
        requested
    })
}

fn function_not_found(id: &str) -> StoreError {
    StoreError::NotFound(format!("function {id:?} not found"))
}

/// Inserts `version` under `function_id`.
async fn insert_version(
    conn: &mut AnyConnection,
    function_id: &str,
    version: &FunctionVersion,
) -> StoreResult<()> {
    let query = sqlx::query(INSERT_VERSION)
        .bind(function_id)
        .bind(i64::from(version.version))
        .bind(version.description.as_str());
    bind_config(query, &version.config, &version.code)?
        .bind(millis(version.created_at))
        .bind(version.created_by.as_str())
        .execute(conn)
        .await?;
    Ok(())
}

/// Locks the function's row (see [`LOCK_FUNCTION`]); `NotFound` if it does not exist.
async fn lock_function(conn: &mut AnyConnection, function_id: &str) -> StoreResult<()> {
    let locked = sqlx::query(LOCK_FUNCTION)
        .bind(function_id)
        .execute(conn)
        .await?
        .rows_affected();
    if locked == 0 {
        return Err(function_not_found(function_id));
    }
    Ok(())
}

/// `MissingVersions` unless every version `routing` names exists.
async fn check_versions_exist(
    conn: &mut AnyConnection,
    function_id: &str,
    routing: &RoutingConfig,
) -> StoreResult<()> {
    let rows = sqlx::query("SELECT version FROM function_versions WHERE function_id = $1")
        .bind(function_id)
        .fetch_all(conn)
        .await?;
    let existing: Vec<i64> = rows
        .iter()
        .map(|row| row.try_get("version"))
        .collect::<Result<_, _>>()?;
    let missing: Vec<u32> = routing
        .versions()
        .filter(|v| !existing.contains(&i64::from(*v)))
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(StoreError::MissingVersions(missing))
    }
}

async fn select_alias(
    conn: &mut AnyConnection,
    function_id: &str,
    name: &str,
) -> StoreResult<Option<FunctionAlias>> {
    let row = sqlx::query(SELECT_ALIAS)
        .bind(function_id)
        .bind(name)
        .fetch_optional(conn)
        .await?;
    row.as_ref().map(codec::alias).transpose()
}

/// Locks the function's row and reads the alias: `AliasNotFound` if it does not exist,
/// `RevisionMismatch` if it is not at `expected_revision` (when given).
async fn lock_alias(
    conn: &mut AnyConnection,
    function_id: &str,
    name: &str,
    expected_revision: Option<u32>,
) -> StoreResult<FunctionAlias> {
    lock_function(conn, function_id).await?;
    let current = select_alias(conn, function_id, name)
        .await?
        .ok_or_else(|| StoreError::AliasNotFound {
            alias: name.to_owned(),
        })?;
    match expected_revision {
        Some(expected) if expected != current.revision => Err(StoreError::RevisionMismatch {
            alias: name.to_owned(),
            expected,
            current: current.revision,
        }),
        _ => Ok(current),
    }
}

async fn select_revision(
    conn: &mut AnyConnection,
    function_id: &str,
    name: &str,
    revision: u32,
) -> StoreResult<Option<AliasRevision>> {
    let row = sqlx::query(SELECT_REVISION)
        .bind(function_id)
        .bind(name)
        .bind(i64::from(revision))
        .fetch_optional(conn)
        .await?;
    row.as_ref().map(codec::alias_revision).transpose()
}

/// The newest revision before `current`'s whose routing differs from the current one
/// (description-only changes are passed over), if any.
async fn previous_routing(
    conn: &mut AnyConnection,
    current: &FunctionAlias,
) -> StoreResult<Option<AliasRevision>> {
    let mut rows = sqlx::query(EARLIER_REVISIONS)
        .bind(current.function_id.as_str())
        .bind(current.name.as_str())
        .bind(i64::from(current.revision))
        .fetch(conn);
    while let Some(row) = rows.try_next().await? {
        let revision = codec::alias_revision(&row)?;
        if revision.routing != current.routing {
            return Ok(Some(revision));
        }
    }
    Ok(None)
}

/// Appends `revision` to its alias's history.
async fn insert_revision(conn: &mut AnyConnection, revision: &AliasRevision) -> StoreResult<()> {
    let previous = revision
        .previous_routing
        .as_ref()
        .map(|r| to_json("routing_config", r))
        .transpose()?;
    sqlx::query(INSERT_REVISION)
        .bind(revision.function_id.as_str())
        .bind(revision.alias.as_str())
        .bind(i64::from(revision.revision))
        .bind(revision.action.as_str())
        .bind(to_json("routing_config", &revision.routing)?)
        .bind(previous)
        .bind(revision.description.as_str())
        .bind(revision.restored_revision.map(i64::from))
        .bind(revision.changed_by.as_str())
        .bind(millis(revision.changed_at))
        .execute(conn)
        .await?;
    Ok(())
}

/// Inserts a new alias at revision 1 with its `create` history entry; returns it as stored.
async fn insert_alias(
    conn: &mut AnyConnection,
    alias: &FunctionAlias,
    created_by: &str,
    at: OffsetDateTime,
) -> StoreResult<FunctionAlias> {
    let stored = FunctionAlias {
        revision: 1,
        created_at: at,
        updated_at: at,
        ..alias.clone()
    };
    sqlx::query(INSERT_ALIAS)
        .bind(stored.function_id.as_str())
        .bind(stored.name.as_str())
        .bind(stored.description.as_str())
        .bind(to_json("routing_config", &stored.routing)?)
        .bind(i64::from(stored.revision))
        .bind(millis(at))
        .bind(millis(at))
        .execute(&mut *conn)
        .await?;
    insert_revision(
        conn,
        &AliasRevision {
            function_id: stored.function_id.clone(),
            alias: stored.name.clone(),
            revision: 1,
            action: AliasAction::Create,
            routing: stored.routing.clone(),
            previous_routing: None,
            description: stored.description.clone(),
            restored_revision: None,
            changed_by: created_by.to_owned(),
            changed_at: at,
        },
    )
    .await?;
    Ok(stored)
}

/// What the next revision of an alias sets, and why.
struct NextRevision<'a> {
    routing: RoutingConfig,
    description: String,
    action: AliasAction,
    restored_revision: Option<u32>,
    changed_by: &'a str,
    at: OffsetDateTime,
}

/// Moves `current` to its next revision, recording the change in its history; returns the
/// alias as it is now.
async fn write_revision(
    conn: &mut AnyConnection,
    current: FunctionAlias,
    change: NextRevision<'_>,
) -> StoreResult<FunctionAlias> {
    let NextRevision {
        routing,
        description,
        action,
        restored_revision,
        changed_by,
        at,
    } = change;
    let next = FunctionAlias {
        revision: current.revision + 1,
        routing,
        description,
        updated_at: at,
        ..current
    };
    sqlx::query(UPDATE_ALIAS)
        .bind(next.function_id.as_str())
        .bind(next.name.as_str())
        .bind(next.description.as_str())
        .bind(to_json("routing_config", &next.routing)?)
        .bind(i64::from(next.revision))
        .bind(millis(at))
        .execute(&mut *conn)
        .await?;
    insert_revision(
        conn,
        &AliasRevision {
            function_id: next.function_id.clone(),
            alias: next.name.clone(),
            revision: next.revision,
            action,
            routing: next.routing.clone(),
            previous_routing: Some(current.routing),
            description: next.description.clone(),
            restored_revision,
            changed_by: changed_by.to_owned(),
            changed_at: at,
        },
    )
    .await?;
    Ok(next)
}

/// Publishes `function`'s draft (saved and locked by the caller's transaction): see
/// [`MetadataStore::publish_version`].
async fn publish_locked(
    tx: &mut AnyConnection,
    function: &Function,
    description: &str,
    created_by: &str,
    move_aliases: &[&str],
) -> StoreResult<Published> {
    // One timestamp per publish: a new version's and its aliases' moves agree.
    let at = nimbus_core::now();
    let newest = sqlx::query(NEWEST_VERSION)
        .bind(function.id.as_str())
        .fetch_optional(&mut *tx)
        .await?
        .map(|row| codec::version(&row, false))
        .transpose()?;
    let mut published = match newest {
        Some(newest) if newest.config == function.config => Published {
            version: FunctionVersion {
                code: function.code.clone(),
                ..newest
            },
            created: false,
            moved: Vec::new(),
        },
        _ => {
            let row = sqlx::query(NEXT_VERSION)
                .bind(function.id.as_str())
                .fetch_one(&mut *tx)
                .await?;
            let number: i64 = row.try_get("latest_version")?;
            let number = u32::try_from(number).map_err(|_| {
                StoreError::Corrupt(format!("latest_version: {number} is out of range"))
            })?;
            let version = FunctionVersion {
                function_id: function.id.clone(),
                version: number,
                description: description.to_string(),
                config: function.config.clone(),
                code: function.code.clone(),
                created_at: at,
                created_by: created_by.to_string(),
            };
            insert_version(&mut *tx, &function.id, &version).await?;
            Published {
                version,
                created: true,
                moved: Vec::new(),
            }
        }
    };
    let target = RoutingConfig::single(published.version.version);
    let mut seen: Vec<&str> = Vec::with_capacity(move_aliases.len());
    for &name in move_aliases {
        if seen.contains(&name) {
            continue;
        }
        seen.push(name);
        let current = select_alias(&mut *tx, &function.id, name)
            .await?
            .ok_or_else(|| StoreError::AliasNotFound {
                alias: name.to_owned(),
            })?;
        if current.routing != target {
            let description = current.description.clone();
            let change = NextRevision {
                routing: target.clone(),
                description,
                action: AliasAction::Publish,
                restored_revision: None,
                changed_by: created_by,
                at,
            };
            write_revision(&mut *tx, current, change).await?;
            published.moved.push(name.to_owned());
        }
    }
    Ok(published)
}

#[async_trait]
impl MetadataStore for SqlStore {
    fn backend(&self) -> &'static str {
        self.dialect.name()
    }

    /// The function row records `first.version` as its latest version; `first` is stored
    /// under `function.id`.
    async fn create_function(
        &self,
        function: &Function,
        first: &FunctionVersion,
    ) -> StoreResult<()> {
        let mut tx = self.pool.begin().await?;
        let inserted = bind_draft(sqlx::query(INSERT_FUNCTION), function)?
            .bind(function.name.as_str())
            .bind(i64::from(first.version))
            .bind(millis(function.created_at))
            .execute(&mut *tx)
            .await;
        match inserted {
            Err(e) if is_name_taken(&e) => {
                return Err(StoreError::Conflict(format!(
                    "function name {:?} already exists",
                    function.name
                )))
            }
            other => other?,
        };
        insert_version(&mut tx, &function.id, first).await?;
        let latest = FunctionAlias {
            function_id: function.id.clone(),
            name: LATEST_ALIAS.to_owned(),
            description: String::new(),
            routing: RoutingConfig::single(first.version),
            revision: 1,
            created_at: function.created_at,
            updated_at: function.created_at,
        };
        insert_alias(&mut tx, &latest, &first.created_by, function.created_at).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn get_function(&self, id_or_name: &str) -> StoreResult<Option<Function>> {
        let sql = if id_or_name.starts_with("fn_") {
            SELECT_FUNCTION_BY_ID
        } else {
            SELECT_FUNCTION_BY_NAME
        };
        let row = sqlx::query(sql)
            .bind(id_or_name)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(codec::function).transpose()
    }

    async fn list_functions(&self, limit: u32, offset: u32) -> StoreResult<Page<Function>> {
        let mut tx = self.pool.begin().await?;
        let total = sqlx::query("SELECT COUNT(*) AS total FROM functions")
            .fetch_one(&mut *tx)
            .await?;
        let rows = sqlx::query(LIST_FUNCTIONS)
            .bind(page_size(limit))
            .bind(i64::from(offset))
            .fetch_all(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Page {
            items: rows
                .iter()
                .map(codec::function)
                .collect::<StoreResult<_>>()?,
            total: codec::count(&total, "total")?,
        })
    }

    async fn update_function(&self, function: &Function) -> StoreResult<()> {
        let result = bind_draft(sqlx::query(UPDATE_DRAFT), function)?
            .execute(&self.pool)
            .await?;
        if result.rows_affected() == 0 {
            return Err(function_not_found(&function.id));
        }
        Ok(())
    }

    async fn publish_version(
        &self,
        function: &Function,
        description: &str,
        created_by: &str,
        move_aliases: &[&str],
    ) -> StoreResult<Published> {
        let mut tx = self.pool.begin().await?;
        let saved = bind_draft(sqlx::query(UPDATE_DRAFT), function)?
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if saved == 0 {
            return Err(function_not_found(&function.id));
        }
        let published =
            publish_locked(&mut tx, function, description, created_by, move_aliases).await?;
        tx.commit().await?;
        Ok(published)
    }

    async fn publish_draft(
        &self,
        function_id: &str,
        description: &str,
        created_by: &str,
        move_aliases: &[&str],
    ) -> StoreResult<Published> {
        let mut tx = self.pool.begin().await?;
        lock_function(&mut tx, function_id).await?;
        let row = sqlx::query(SELECT_FUNCTION_BY_ID)
            .bind(function_id)
            .fetch_one(&mut *tx)
            .await?;
        let function = codec::function(&row)?;
        let published =
            publish_locked(&mut tx, &function, description, created_by, move_aliases).await?;
        tx.commit().await?;
        Ok(published)
    }

    async fn delete_function(&self, function_id: &str) -> StoreResult<bool> {
        let mut tx = self.pool.begin().await?;
        // Lock order as every other change of the function (row first), so a concurrent
        // alias change waits instead of deadlocking.
        match lock_function(&mut tx, function_id).await {
            Err(StoreError::NotFound(_)) => return Ok(false),
            other => other?,
        }
        // The foreign keys cascade too; deleting explicitly does not depend on them being on.
        for sql in [
            "DELETE FROM invocations WHERE function_id = $1",
            "DELETE FROM snapshots WHERE function_id = $1",
            "DELETE FROM alias_history WHERE function_id = $1",
            "DELETE FROM function_aliases WHERE function_id = $1",
            "DELETE FROM function_versions WHERE function_id = $1",
        ] {
            sqlx::query(sql).bind(function_id).execute(&mut *tx).await?;
        }
        let deleted = sqlx::query("DELETE FROM functions WHERE id = $1")
            .bind(function_id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        sqlx::query(
            "INSERT INTO deleted_functions (function_id, deleted_at) VALUES ($1, $2) \
             ON CONFLICT (function_id) DO NOTHING",
        )
        .bind(function_id)
        .bind(millis(OffsetDateTime::now_utc()))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(deleted > 0)
    }

    async fn deleted_functions(&self) -> StoreResult<Vec<DeletedFunction>> {
        let rows = sqlx::query(
            "SELECT function_id, deleted_at FROM deleted_functions \
             ORDER BY deleted_at, function_id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(codec::deleted_function).collect()
    }

    async fn purge_deleted_function(&self, function_id: &str) -> StoreResult<u64> {
        Ok(sqlx::query(
            "DELETE FROM invocations WHERE function_id = $1 \
             AND EXISTS (SELECT 1 FROM deleted_functions WHERE function_id = $1)",
        )
        .bind(function_id)
        .execute(&self.pool)
        .await?
        .rows_affected())
    }

    async fn forget_deleted_functions(&self, before: OffsetDateTime) -> StoreResult<u64> {
        Ok(
            sqlx::query("DELETE FROM deleted_functions WHERE deleted_at < $1")
                .bind(millis(before))
                .execute(&self.pool)
                .await?
                .rows_affected(),
        )
    }

    async fn existing_functions(&self, function_ids: &[String]) -> StoreResult<HashSet<String>> {
        if function_ids.is_empty() {
            return Ok(HashSet::new());
        }
        let ids: Vec<&str> = function_ids.iter().map(String::as_str).collect();
        let mut conn = self.pool.acquire().await?;
        ids_in(&mut conn, self.dialect, EXISTING_AMONG, &ids).await
    }

    async fn get_version(
        &self,
        function_id: &str,
        version: u32,
    ) -> StoreResult<Option<FunctionVersion>> {
        let row = sqlx::query(SELECT_VERSION)
            .bind(function_id)
            .bind(i64::from(version))
            .fetch_optional(&self.pool)
            .await?;
        row.map(|row| codec::version(&row, true)).transpose()
    }

    async fn list_versions(
        &self,
        function_id: &str,
        limit: u32,
        offset: u32,
    ) -> StoreResult<Page<FunctionVersion>> {
        let mut tx = self.pool.begin().await?;
        let total =
            sqlx::query("SELECT COUNT(*) AS total FROM function_versions WHERE function_id = $1")
                .bind(function_id)
                .fetch_one(&mut *tx)
                .await?;
        let rows = sqlx::query(LIST_VERSIONS)
            .bind(function_id)
            .bind(page_size(limit))
            .bind(i64::from(offset))
            .fetch_all(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Page {
            items: rows
                .iter()
                .map(|row| codec::version(row, false))
                .collect::<StoreResult<_>>()?,
            total: codec::count(&total, "total")?,
        })
    }

    async fn has_version(&self, function_id: &str, version: u32) -> StoreResult<bool> {
        let row = sqlx::query(
            "SELECT COUNT(*) AS found FROM function_versions WHERE function_id = $1 AND version = $2",
        )
        .bind(function_id)
        .bind(i64::from(version))
        .fetch_one(&self.pool)
        .await?;
        Ok(codec::count(&row, "found")? > 0)
    }

    async fn delete_version(&self, function_id: &str, version: u32) -> StoreResult<bool> {
        let mut tx = self.pool.begin().await?;
        lock_function(&mut tx, function_id).await?;
        let aliases = sqlx::query(LIST_ALIASES)
            .bind(function_id)
            .fetch_all(&mut *tx)
            .await?;
        let mut routing_to = Vec::new();
        for row in &aliases {
            let alias = codec::alias(row)?;
            if alias.routing.versions().any(|v| v == version) {
                routing_to.push(alias.name);
            }
        }
        if !routing_to.is_empty() {
            return Err(StoreError::VersionInUse {
                version,
                aliases: routing_to,
            });
        }
        // Its snapshot rows first (the foreign key cascades too, as in delete_function).
        sqlx::query("DELETE FROM snapshots WHERE function_id = $1 AND version = $2")
            .bind(function_id)
            .bind(i64::from(version))
            .execute(&mut *tx)
            .await?;
        let deleted =
            sqlx::query("DELETE FROM function_versions WHERE function_id = $1 AND version = $2")
                .bind(function_id)
                .bind(i64::from(version))
                .execute(&mut *tx)
                .await?
                .rows_affected();
        tx.commit().await?;
        Ok(deleted > 0)
    }

    async fn create_alias(
        &self,
        alias: &FunctionAlias,
        created_by: &str,
    ) -> StoreResult<FunctionAlias> {
        let mut tx = self.pool.begin().await?;
        lock_function(&mut tx, &alias.function_id).await?;
        if select_alias(&mut tx, &alias.function_id, &alias.name)
            .await?
            .is_some()
        {
            return Err(StoreError::Conflict(format!(
                "alias {:?} already exists",
                alias.name
            )));
        }
        let count = sqlx::query(COUNT_ALIASES)
            .bind(&alias.function_id)
            .fetch_one(&mut *tx)
            .await?;
        let limit = nimbus_core::limits::MAX_ALIASES_PER_FUNCTION;
        if codec::count(&count, "total")? >= limit as u64 {
            return Err(StoreError::TooManyAliases { limit });
        }
        check_versions_exist(&mut tx, &alias.function_id, &alias.routing).await?;
        let stored = insert_alias(&mut tx, alias, created_by, nimbus_core::now()).await?;
        tx.commit().await?;
        Ok(stored)
    }

    async fn update_alias(
        &self,
        function_id: &str,
        name: &str,
        change: &AliasChange,
        changed_by: &str,
    ) -> StoreResult<AliasWrite> {
        let mut tx = self.pool.begin().await?;
        let current = lock_alias(&mut tx, function_id, name, change.expected_revision).await?;
        let routing = change
            .routing
            .clone()
            .unwrap_or_else(|| current.routing.clone());
        let description = change
            .description
            .clone()
            .unwrap_or_else(|| current.description.clone());
        if routing == current.routing && description == current.description {
            // Nothing changes: no revision, so the history lists only real changes.
            return Ok(AliasWrite {
                alias: current,
                changed: false,
                restored_revision: None,
            });
        }
        check_versions_exist(&mut tx, function_id, &routing).await?;
        let change = NextRevision {
            routing,
            description,
            action: AliasAction::Update,
            restored_revision: None,
            changed_by,
            at: nimbus_core::now(),
        };
        let alias = write_revision(&mut tx, current, change).await?;
        tx.commit().await?;
        Ok(AliasWrite {
            alias,
            changed: true,
            restored_revision: None,
        })
    }

    async fn rollback_alias(
        &self,
        function_id: &str,
        name: &str,
        target: RollbackTarget,
        expected_revision: Option<u32>,
        changed_by: &str,
    ) -> StoreResult<AliasWrite> {
        let mut tx = self.pool.begin().await?;
        let current = lock_alias(&mut tx, function_id, name, expected_revision).await?;
        let (routing, restored_revision) = match target {
            RollbackTarget::Version(version) => (RoutingConfig::single(version), None),
            RollbackTarget::Revision(revision) => {
                let restored = select_revision(&mut tx, function_id, name, revision)
                    .await?
                    .ok_or_else(|| StoreError::RevisionNotFound {
                        alias: name.to_owned(),
                        revision,
                    })?;
                (restored.routing, Some(revision))
            }
            RollbackTarget::Previous => {
                let previous = previous_routing(&mut tx, &current).await?.ok_or_else(|| {
                    StoreError::NothingToRollBack(format!(
                        "alias {name:?} has routed the same way since it was created; there is no earlier routing to restore"
                    ))
                })?;
                (previous.routing, Some(previous.revision))
            }
        };
        if routing == current.routing {
            let already = match target {
                RollbackTarget::Version(v) => format!("sends all traffic to version {v}"),
                RollbackTarget::Revision(r) => format!("routes as it did at revision {r}"),
                // Unreachable: the previous routing is by definition a different one.
                RollbackTarget::Previous => "routes as it did before".to_owned(),
            };
            return Err(StoreError::NothingToRollBack(format!(
                "alias {name:?} already {already}"
            )));
        }
        check_versions_exist(&mut tx, function_id, &routing).await?;
        let description = current.description.clone();
        let change = NextRevision {
            routing,
            description,
            action: AliasAction::Rollback,
            restored_revision,
            changed_by,
            at: nimbus_core::now(),
        };
        let alias = write_revision(&mut tx, current, change).await?;
        tx.commit().await?;
        Ok(AliasWrite {
            alias,
            changed: true,
            restored_revision,
        })
    }

    async fn delete_alias(&self, function_id: &str, name: &str) -> StoreResult<bool> {
        let mut tx = self.pool.begin().await?;
        lock_function(&mut tx, function_id).await?;
        sqlx::query("DELETE FROM alias_history WHERE function_id = $1 AND alias = $2")
            .bind(function_id)
            .bind(name)
            .execute(&mut *tx)
            .await?;
        let deleted =
            sqlx::query("DELETE FROM function_aliases WHERE function_id = $1 AND name = $2")
                .bind(function_id)
                .bind(name)
                .execute(&mut *tx)
                .await?
                .rows_affected();
        tx.commit().await?;
        Ok(deleted > 0)
    }

    async fn alias_history(
        &self,
        function_id: &str,
        name: &str,
        limit: u32,
        offset: u32,
    ) -> StoreResult<Page<AliasRevision>> {
        let mut tx = self.pool.begin().await?;
        let total = sqlx::query(
            "SELECT COUNT(*) AS total FROM alias_history WHERE function_id = $1 AND alias = $2",
        )
        .bind(function_id)
        .bind(name)
        .fetch_one(&mut *tx)
        .await?;
        let rows = sqlx::query(LIST_REVISIONS)
            .bind(function_id)
            .bind(name)
            .bind(page_size(limit))
            .bind(i64::from(offset))
            .fetch_all(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Page {
            items: rows
                .iter()
                .map(codec::alias_revision)
                .collect::<StoreResult<_>>()?,
            total: codec::count(&total, "total")?,
        })
    }

    async fn get_alias(&self, function_id: &str, name: &str) -> StoreResult<Option<FunctionAlias>> {
        let mut conn = self.pool.acquire().await?;
        select_alias(&mut conn, function_id, name).await
    }

    async fn list_aliases(&self, function_id: &str) -> StoreResult<Vec<FunctionAlias>> {
        let rows = sqlx::query(LIST_ALIASES)
            .bind(function_id)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(codec::alias).collect()
    }

    async fn list_aliases_page(
        &self,
        function_id: &str,
        limit: u32,
        offset: u32,
    ) -> StoreResult<Page<FunctionAlias>> {
        let mut tx = self.pool.begin().await?;
        let total = sqlx::query(COUNT_ALIASES)
            .bind(function_id)
            .fetch_one(&mut *tx)
            .await?;
        let rows = sqlx::query(LIST_ALIASES_PAGE)
            .bind(function_id)
            .bind(page_size(limit))
            .bind(i64::from(offset))
            .fetch_all(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Page {
            items: rows.iter().map(codec::alias).collect::<StoreResult<_>>()?,
            total: codec::count(&total, "total")?,
        })
    }

    async fn record_invocations(&self, records: &[Invocation]) -> StoreResult<()> {
        let records = last_per_request(records);
        if records.is_empty() {
            return Ok(());
        }
        let per_statement = self.dialect.max_bind_params() / invocation_columns().count();
        let mut tx = self.pool.begin().await?;
        for chunk in records.chunks(per_statement) {
            let sql = upsert_invocations_sql(self.dialect, chunk.len());
            // Batch sizes vary, so these statements are not worth a slot in the statement cache.
            let mut query = sqlx::query(&sql).persistent(false);
            for &record in chunk {
                query = bind_invocation(query, record)?;
            }
            query.execute(&mut *tx).await?;
        }
        // Records of functions deleted meanwhile (run by a server that had not learned of
        // it yet, or replayed after an outage) are not kept: nothing could reach them. (After
        // the writes, which take SQLite's write lock first.)
        let mut functions: Vec<&str> = records.iter().map(|r| r.function_id.as_str()).collect();
        functions.sort_unstable();
        functions.dedup();
        // Looked up first (by key, in a table that is mostly empty), so that the usual batch,
        // with no deleted function, deletes nothing and scans no records.
        let deleted = ids_in(&mut tx, self.dialect, DELETED_AMONG, &functions).await?;
        let deleted: Vec<&str> = deleted.iter().map(String::as_str).collect();
        for chunk in deleted.chunks(self.dialect.max_bind_params()) {
            let mut sql = String::from("DELETE FROM invocations WHERE function_id IN (");
            push_placeholders(self.dialect, &mut sql, chunk.len());
            sql.push(')');
            let mut query = sqlx::query(&sql).persistent(false);
            for id in chunk {
                query = query.bind(*id);
            }
            query.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn get_invocation(&self, request_id: &str) -> StoreResult<Option<Invocation>> {
        let row = sqlx::query(SELECT_INVOCATION)
            .bind(request_id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(codec::invocation).transpose()
    }

    async fn list_invocations(
        &self,
        function_id: &str,
        filter: &InvocationFilter,
    ) -> StoreResult<Vec<Invocation>> {
        let query = match filter.status {
            None => sqlx::query(LIST_INVOCATIONS)
                .bind(function_id)
                .bind(page_size(filter.limit)),
            Some(status) => sqlx::query(LIST_INVOCATIONS_WITH_STATUS)
                .bind(function_id)
                .bind(page_size(filter.limit))
                .bind(status.as_str()),
        };
        let rows = query.fetch_all(&self.pool).await?;
        rows.iter().map(codec::invocation).collect()
    }

    async fn begin_snapshot(&self, new: &NewSnapshot) -> StoreResult<(Snapshot, bool)> {
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
                .fetch_optional(&self.pool)
                .await;
            match claimed {
                Ok(Some(row)) => return Ok((codec::snapshot(&row)?, true)),
                // A live row holds the key: it is the caller's answer (unless it was
                // deleted since, and then the key is claimable again).
                Ok(None) => {
                    if let Some(live) = self.find_snapshot(key).await? {
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

    async fn finish_snapshot(
        &self,
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
            .execute(&self.pool)
            .await?
            .rows_affected();
        Ok(updated > 0)
    }

    async fn set_snapshot_status(
        &self,
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
            .execute(&self.pool)
            .await?
            .rows_affected();
        Ok(updated > 0)
    }

    async fn record_snapshot_use(
        &self,
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
            .execute(&self.pool)
            .await?
            .rows_affected();
        Ok(updated > 0)
    }

    async fn get_snapshot(&self, id: &str) -> StoreResult<Option<Snapshot>> {
        let row = sqlx::query(SELECT_SNAPSHOT)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(codec::snapshot).transpose()
    }

    async fn find_snapshot(&self, key: &SnapshotKey) -> StoreResult<Option<Snapshot>> {
        let row = sqlx::query(FIND_SNAPSHOT)
            .bind(key.function_id.as_str())
            .bind(i64::from(key.version))
            .bind(key.code_hash.as_str())
            .bind(key.env_vars_hash.as_str())
            .bind(key.driver.as_str())
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(codec::snapshot).transpose()
    }

    async fn list_snapshots(&self, function_id: Option<&str>) -> StoreResult<Vec<Snapshot>> {
        let query = match function_id {
            None => sqlx::query(LIST_SNAPSHOTS),
            Some(id) => sqlx::query(LIST_FUNCTION_SNAPSHOTS).bind(id),
        };
        let rows = query.fetch_all(&self.pool).await?;
        rows.iter().map(codec::snapshot).collect()
    }

    async fn delete_snapshot(&self, id: &str) -> StoreResult<bool> {
        let deleted = sqlx::query("DELETE FROM snapshots WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?
            .rows_affected();
        Ok(deleted > 0)
    }

    async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upsert_sql_binds_every_column_of_every_row() {
        let sql = upsert_invocations_sql(Dialect::Postgres, 2);
        let first: Vec<String> = (1..=18).map(|n| format!("${n}")).collect();
        let second: Vec<String> = (19..=36).map(|n| format!("${n}")).collect();
        let values = format!("VALUES ({}), ({}) ON", first.join(", "), second.join(", "));
        assert!(sql.contains(&values), "{sql}");
        assert!(sql.ends_with(
            "ON CONFLICT (request_id) DO UPDATE SET function_id = excluded.function_id, \
             function_name = excluded.function_name, version = excluded.version, \
             alias_used = excluded.alias_used, session_key = excluded.session_key, \
             trigger_kind = excluded.trigger_kind, status = excluded.status, \
             input = excluded.input, output = excluded.output, error = excluded.error, \
             start_type = excluded.start_type, instance_id = excluded.instance_id, \
             started_at = excluded.started_at, completed_at = excluded.completed_at, \
             duration_ms = excluded.duration_ms, memory_used_mb = excluded.memory_used_mb, \
             logs = excluded.logs WHERE invocations.completed_at IS NULL"
        ));

        let sql = upsert_invocations_sql(Dialect::Sqlite, 2);
        let row = format!("({})", vec!["?"; 18].join(", "));
        assert!(sql.contains(&format!("VALUES {row}, {row} ON")), "{sql}");
        assert!(!sql.contains('$'));
    }
}
