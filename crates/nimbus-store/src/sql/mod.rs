//! The one implementation of [`MetadataStore`], over sqlx's `Any` driver.
//!
//! Every statement is SQL that SQLite and PostgreSQL both accept (`$n` placeholders,
//! `ON CONFLICT … DO UPDATE`, `RETURNING`), so each method is written once for both
//! backends; the [`Dialect`] only chooses the migrations, the bind-parameter limit and the
//! placeholders of the one generated statement (the multi-row invocation upsert).
//! Column values are converted by [`crate::codec`].
//!
//! Each entity's statements live in a module of their own ([`functions`], [`versions`],
//! [`aliases`], [`invocations`], [`snapshots`]); this module holds the pool, the helpers
//! they share and the [`MetadataStore`] implementation, which calls them.
//!
//! SQLite takes its write lock at a transaction's first write, so every writing
//! transaction here starts with its write: concurrent writers then wait on the busy
//! timeout instead of failing on a lock upgrade.

use std::collections::HashSet;

use async_trait::async_trait;
use nimbus_core::{
    AliasRevision, CodeBundle, Function, FunctionAlias, FunctionConfig, FunctionVersion,
    Invocation, NewSnapshot, Snapshot, SnapshotFile, SnapshotKey, SnapshotStatus, SnapshotUse,
};
use sqlx::any::AnyArguments;
use sqlx::any::AnyRow;
use sqlx::query::Query;
use sqlx::{Any, AnyConnection, AnyPool, Row};
use time::OffsetDateTime;

use crate::backend::{self, Dialect};
use crate::codec::{self, to_json};
use crate::{
    AliasChange, AliasWrite, DeletedFunction, InvocationFilter, MetadataStore, Page, Published,
    RollbackTarget, StoreError, StoreResult, DEFAULT_LIST_LIMIT,
};

mod aliases;
mod functions;
mod invocations;
mod snapshots;
mod versions;

type AnyQuery<'q> = Query<'q, Any, AnyArguments<'q>>;

/// Takes the function row's lock (PostgreSQL) and the write lock (SQLite) without changing
/// anything. Every alias and version change starts with it, so such changes of one function
/// are serialized: checks (a version exists, no alias routes to it) stay true until commit.
const LOCK_FUNCTION: &str = "UPDATE functions SET latest_version = latest_version WHERE id = $1";

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

/// The row limit of a listing: `requested`, or [`DEFAULT_LIST_LIMIT`] for 0.
fn page_size(requested: u32) -> i64 {
    i64::from(if requested == 0 {
        DEFAULT_LIST_LIMIT
    } else {
        requested
    })
}

/// One page of a listing and the number of all it lists, read in one transaction so the
/// two agree. `scope` (a function id, an alias name) is bound first in both queries;
/// `list` takes the page's limit and offset after it.
async fn page<T>(
    pool: &AnyPool,
    count: &str,
    list: &str,
    scope: &[&str],
    (limit, offset): (u32, u32),
    decode: impl Fn(&AnyRow) -> StoreResult<T>,
) -> StoreResult<Page<T>> {
    let mut count = sqlx::query(count);
    let mut list = sqlx::query(list);
    for value in scope {
        count = count.bind(*value);
        list = list.bind(*value);
    }
    let mut tx = pool.begin().await?;
    let total = count.fetch_one(&mut *tx).await?;
    let rows = list
        .bind(page_size(limit))
        .bind(i64::from(offset))
        .fetch_all(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(Page {
        items: rows.iter().map(decode).collect::<StoreResult<_>>()?,
        total: codec::count(&total, "total")?,
    })
}

fn function_not_found(id: &str) -> StoreError {
    StoreError::NotFound(format!("function {id:?} not found"))
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

#[async_trait]
impl MetadataStore for SqlStore {
    fn backend(&self) -> &'static str {
        self.dialect.name()
    }

    async fn create_function(
        &self,
        function: &Function,
        first: &FunctionVersion,
    ) -> StoreResult<()> {
        functions::create_function(&self.pool, function, first).await
    }

    async fn get_function(&self, id_or_name: &str) -> StoreResult<Option<Function>> {
        functions::get_function(&self.pool, id_or_name).await
    }

    async fn list_functions(&self, limit: u32, offset: u32) -> StoreResult<Page<Function>> {
        functions::list_functions(&self.pool, limit, offset).await
    }

    async fn update_function(&self, function: &Function) -> StoreResult<()> {
        functions::update_function(&self.pool, function).await
    }

    async fn publish_version(
        &self,
        function: &Function,
        description: &str,
        created_by: &str,
        move_aliases: &[&str],
    ) -> StoreResult<Published> {
        functions::publish_version(&self.pool, function, description, created_by, move_aliases)
            .await
    }

    async fn publish_draft(
        &self,
        function_id: &str,
        description: &str,
        created_by: &str,
        move_aliases: &[&str],
    ) -> StoreResult<Published> {
        functions::publish_draft(
            &self.pool,
            function_id,
            description,
            created_by,
            move_aliases,
        )
        .await
    }

    async fn delete_function(&self, function_id: &str) -> StoreResult<bool> {
        functions::delete_function(&self.pool, function_id).await
    }

    async fn deleted_functions(&self) -> StoreResult<Vec<DeletedFunction>> {
        functions::deleted_functions(&self.pool).await
    }

    async fn purge_deleted_function(&self, function_id: &str) -> StoreResult<u64> {
        functions::purge_deleted_function(&self.pool, function_id).await
    }

    async fn forget_deleted_functions(&self, before: OffsetDateTime) -> StoreResult<u64> {
        functions::forget_deleted_functions(&self.pool, before).await
    }

    async fn existing_functions(&self, function_ids: &[String]) -> StoreResult<HashSet<String>> {
        functions::existing_functions(&self.pool, self.dialect, function_ids).await
    }

    async fn get_version(
        &self,
        function_id: &str,
        version: u32,
    ) -> StoreResult<Option<FunctionVersion>> {
        versions::get_version(&self.pool, function_id, version).await
    }

    async fn list_versions(
        &self,
        function_id: &str,
        limit: u32,
        offset: u32,
    ) -> StoreResult<Page<FunctionVersion>> {
        versions::list_versions(&self.pool, function_id, limit, offset).await
    }

    async fn has_version(&self, function_id: &str, version: u32) -> StoreResult<bool> {
        versions::has_version(&self.pool, function_id, version).await
    }

    async fn delete_version(&self, function_id: &str, version: u32) -> StoreResult<bool> {
        versions::delete_version(&self.pool, function_id, version).await
    }

    async fn create_alias(
        &self,
        alias: &FunctionAlias,
        created_by: &str,
    ) -> StoreResult<FunctionAlias> {
        aliases::create_alias(&self.pool, alias, created_by).await
    }

    async fn update_alias(
        &self,
        function_id: &str,
        name: &str,
        change: &AliasChange,
        changed_by: &str,
    ) -> StoreResult<AliasWrite> {
        aliases::update_alias(&self.pool, function_id, name, change, changed_by).await
    }

    async fn rollback_alias(
        &self,
        function_id: &str,
        name: &str,
        target: RollbackTarget,
        expected_revision: Option<u32>,
        changed_by: &str,
    ) -> StoreResult<AliasWrite> {
        aliases::rollback_alias(
            &self.pool,
            function_id,
            name,
            target,
            expected_revision,
            changed_by,
        )
        .await
    }

    async fn delete_alias(&self, function_id: &str, name: &str) -> StoreResult<bool> {
        aliases::delete_alias(&self.pool, function_id, name).await
    }

    async fn alias_history(
        &self,
        function_id: &str,
        name: &str,
        limit: u32,
        offset: u32,
    ) -> StoreResult<Page<AliasRevision>> {
        aliases::alias_history(&self.pool, function_id, name, limit, offset).await
    }

    async fn get_alias(&self, function_id: &str, name: &str) -> StoreResult<Option<FunctionAlias>> {
        aliases::get_alias(&self.pool, function_id, name).await
    }

    async fn list_aliases(&self, function_id: &str) -> StoreResult<Vec<FunctionAlias>> {
        aliases::list_aliases(&self.pool, function_id).await
    }

    async fn list_aliases_page(
        &self,
        function_id: &str,
        limit: u32,
        offset: u32,
    ) -> StoreResult<Page<FunctionAlias>> {
        aliases::list_aliases_page(&self.pool, function_id, limit, offset).await
    }

    async fn record_invocations(&self, records: &[Invocation]) -> StoreResult<()> {
        invocations::record_invocations(&self.pool, self.dialect, records).await
    }

    async fn get_invocation(&self, request_id: &str) -> StoreResult<Option<Invocation>> {
        invocations::get_invocation(&self.pool, request_id).await
    }

    async fn list_invocations(
        &self,
        function_id: &str,
        filter: &InvocationFilter,
    ) -> StoreResult<Vec<Invocation>> {
        invocations::list_invocations(&self.pool, function_id, filter).await
    }

    async fn begin_snapshot(&self, new: &NewSnapshot) -> StoreResult<(Snapshot, bool)> {
        snapshots::begin_snapshot(&self.pool, new).await
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
        snapshots::finish_snapshot(
            &self.pool,
            id,
            status,
            error_message,
            path,
            files,
            size_bytes,
            expires_at,
        )
        .await
    }

    async fn set_snapshot_status(
        &self,
        id: &str,
        status: SnapshotStatus,
        error_message: Option<&str>,
    ) -> StoreResult<bool> {
        snapshots::set_snapshot_status(&self.pool, id, status, error_message).await
    }

    async fn record_snapshot_use(
        &self,
        id: &str,
        how: SnapshotUse,
        start_ms: f64,
        used_at: OffsetDateTime,
        expires_at: Option<OffsetDateTime>,
    ) -> StoreResult<bool> {
        snapshots::record_snapshot_use(&self.pool, id, how, start_ms, used_at, expires_at).await
    }

    async fn get_snapshot(&self, id: &str) -> StoreResult<Option<Snapshot>> {
        snapshots::get_snapshot(&self.pool, id).await
    }

    async fn find_snapshot(&self, key: &SnapshotKey) -> StoreResult<Option<Snapshot>> {
        snapshots::find_snapshot(&self.pool, key).await
    }

    async fn list_snapshots(&self, function_id: Option<&str>) -> StoreResult<Vec<Snapshot>> {
        snapshots::list_snapshots(&self.pool, function_id).await
    }

    async fn delete_snapshot(&self, id: &str) -> StoreResult<bool> {
        snapshots::delete_snapshot(&self.pool, id).await
    }

    async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }
}
