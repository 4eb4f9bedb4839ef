//! Functions: their rows (the draft), creation with version 1 and `latest`, publishing,
//! deletion and the record of deleted functions.

use std::collections::HashSet;

use nimbus_core::{Function, FunctionAlias, FunctionVersion, RoutingConfig, LATEST_ALIAS};
use sqlx::AnyPool;
use time::OffsetDateTime;

use super::aliases::insert_alias;
use super::versions::{insert_version, publish_locked};
use super::{bind_config, function_not_found, ids_in, lock_function, page, AnyQuery};
use crate::backend::Dialect;
use crate::codec::{self, millis};
use crate::{DeletedFunction, Page, Published, StoreError, StoreResult};

/// Columns of `functions`, as selected.
macro_rules! function_columns {
    () => {
        "id, name, description, runtime, handler, code_hash, env_vars, memory_mb, \
         timeout_sec, network, state_config, code, max_instances, status, latest_version, \
         created_at, updated_at"
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

/// `… IN (` completed by [`ids_in`]: which of some function ids exist.
const EXISTING_AMONG: &str = "SELECT id FROM functions WHERE id IN (";

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

/// Whether `error` is the unique violation of the function name.
fn is_name_taken(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Database(db) if db.is_unique_violation() => {
            db.constraint() == Some("functions_name_key") || db.message().contains("functions.name")
        }
        _ => false,
    }
}

/// The function row records `first.version` as its latest version; `first` is stored
/// under `function.id`.
pub(super) async fn create_function(
    pool: &AnyPool,
    function: &Function,
    first: &FunctionVersion,
) -> StoreResult<()> {
    let mut tx = pool.begin().await?;
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

pub(super) async fn get_function(
    pool: &AnyPool,
    id_or_name: &str,
) -> StoreResult<Option<Function>> {
    let sql = if id_or_name.starts_with("fn_") {
        SELECT_FUNCTION_BY_ID
    } else {
        SELECT_FUNCTION_BY_NAME
    };
    let row = sqlx::query(sql)
        .bind(id_or_name)
        .fetch_optional(pool)
        .await?;
    row.as_ref().map(codec::function).transpose()
}

pub(super) async fn list_functions(
    pool: &AnyPool,
    limit: u32,
    offset: u32,
) -> StoreResult<Page<Function>> {
    page(
        pool,
        "SELECT COUNT(*) AS total FROM functions",
        LIST_FUNCTIONS,
        &[],
        (limit, offset),
        codec::function,
    )
    .await
}

pub(super) async fn update_function(pool: &AnyPool, function: &Function) -> StoreResult<()> {
    let result = bind_draft(sqlx::query(UPDATE_DRAFT), function)?
        .execute(pool)
        .await?;
    if result.rows_affected() == 0 {
        return Err(function_not_found(&function.id));
    }
    Ok(())
}

pub(super) async fn delete_function(pool: &AnyPool, function_id: &str) -> StoreResult<bool> {
    let mut tx = pool.begin().await?;
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

pub(super) async fn deleted_functions(pool: &AnyPool) -> StoreResult<Vec<DeletedFunction>> {
    let rows = sqlx::query(
        "SELECT function_id, deleted_at FROM deleted_functions \
         ORDER BY deleted_at, function_id",
    )
    .fetch_all(pool)
    .await?;
    rows.iter().map(codec::deleted_function).collect()
}

pub(super) async fn purge_deleted_function(pool: &AnyPool, function_id: &str) -> StoreResult<u64> {
    Ok(sqlx::query(
        "DELETE FROM invocations WHERE function_id = $1 \
         AND EXISTS (SELECT 1 FROM deleted_functions WHERE function_id = $1)",
    )
    .bind(function_id)
    .execute(pool)
    .await?
    .rows_affected())
}

pub(super) async fn forget_deleted_functions(
    pool: &AnyPool,
    before: OffsetDateTime,
) -> StoreResult<u64> {
    Ok(
        sqlx::query("DELETE FROM deleted_functions WHERE deleted_at < $1")
            .bind(millis(before))
            .execute(pool)
            .await?
            .rows_affected(),
    )
}

pub(super) async fn existing_functions(
    pool: &AnyPool,
    dialect: Dialect,
    function_ids: &[String],
) -> StoreResult<HashSet<String>> {
    if function_ids.is_empty() {
        return Ok(HashSet::new());
    }
    let ids: Vec<&str> = function_ids.iter().map(String::as_str).collect();
    let mut conn = pool.acquire().await?;
    ids_in(&mut conn, dialect, EXISTING_AMONG, &ids).await
}

pub(super) async fn publish_version(
    pool: &AnyPool,
    function: &Function,
    description: &str,
    created_by: &str,
    move_aliases: &[&str],
) -> StoreResult<Published> {
    let mut tx = pool.begin().await?;
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

pub(super) async fn publish_draft(
    pool: &AnyPool,
    function_id: &str,
    description: &str,
    created_by: &str,
    move_aliases: &[&str],
) -> StoreResult<Published> {
    let mut tx = pool.begin().await?;
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
