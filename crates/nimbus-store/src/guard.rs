//! Watching the database: a health check that makes calls fail fast while it does not
//! answer, and that `/ready` reads.
//!
//! A PostgreSQL that is down refuses connections, and sqlx's pool retries them until its
//! acquire timeout; one that hangs (stopped, partitioned) leaves queries waiting on their
//! sockets with no bound at all. Neither should hold a request. So a health check runs
//! every quarter of the store's timeout: `SELECT 1` on a connection of its own (not the
//! pool's, which a busy server may have all in use), bounded by three quarters of the
//! timeout; when that connection cannot be made (a database at `max_connections` refuses
//! new connections while the pool's work), a pooled connection answers instead. After
//! [`FAILURES_TO_DOWN`] failed checks in a row (one slow answer from a busy database is not
//! an outage), every call fails at once with [`StoreError::Unavailable`] naming why, and a
//! call already waiting on the database fails once it has waited the store's timeout (one
//! that began a moment ago may be progressing on a live connection: it keeps its time). So
//! no call waits much longer than twice the timeout for a database that stopped answering.
//! The first check that passes again lets calls through: the store resumes by itself.
//!
//! A SQLite database, a local file, does not hang, so its calls are never held back; its
//! check opens the file afresh and reads its schema (a file deleted, replaced or unreadable
//! fails it, where a pooled connection would go on with what it has open), and only
//! [`MetadataStore::available`] (`/ready`) reports it.
//!
//! A call cut short may still have been applied (as with any timeout, its outcome is
//! unknown); every write is one transaction, so it happened whole or not at all.

use std::collections::HashSet;
use std::future::Future;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use nimbus_core::{
    AliasRevision, Function, FunctionAlias, FunctionVersion, Invocation, NewSnapshot, Snapshot,
    SnapshotFile, SnapshotKey, SnapshotStatus, SnapshotUse,
};
use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{AnyPool, ConnectOptions, Connection, Executor};
use time::OffsetDateTime;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::backend::Dialect;
use crate::sql::SqlStore;
use crate::{
    AliasChange, AliasWrite, DeletedFunction, InvocationFilter, MetadataStore, Page, Published,
    RollbackTarget, StoreError, StoreResult,
};

/// Failed checks in a row after which the database counts as unavailable.
pub(crate) const FAILURES_TO_DOWN: u32 = 2;

/// The `application_name` of the health check's own PostgreSQL connection (so an operator
/// can tell it in `pg_stat_activity`).
pub(crate) const HEALTH_CHECK_NAME: &str = "nimbus-health-check";

/// Why the store is unavailable, or `None` while its health checks pass.
type Health = Option<Arc<str>>;

/// A store watched by a health check (see the module docs).
pub(crate) struct Guarded {
    inner: SqlStore,
    health: watch::Receiver<Health>,
    /// How long a call may wait on a database found unavailable.
    timeout: Duration,
    /// Whether calls fail while the database is unavailable (PostgreSQL), or only
    /// [`MetadataStore::available`] says so (SQLite).
    cuts_calls: bool,
    checks: JoinHandle<()>,
}

impl Guarded {
    /// Watches `inner`, a store on the database at `url`, checking it every quarter of
    /// `timeout`.
    pub(crate) fn start(inner: SqlStore, url: &str, timeout: Duration) -> StoreResult<Self> {
        let (probe, cuts_calls) = match inner.dialect() {
            Dialect::Postgres => {
                let options = PgConnectOptions::from_str(url)?.application_name(HEALTH_CHECK_NAME);
                let probe = Probe::Postgres {
                    options,
                    conn: None,
                    pool: inner.pool().clone(),
                };
                (probe, true)
            }
            Dialect::Sqlite => {
                let options = SqliteConnectOptions::from_str(url)?;
                let path = std::path::absolute(options.get_filename()).map_err(|e| {
                    StoreError::Backend(format!(
                        "sqlite path {}: {e}",
                        options.get_filename().display()
                    ))
                })?;
                (Probe::Sqlite { options, path }, false)
            }
        };
        let (report, health) = watch::channel(None);
        let checks = tokio::spawn(check(probe, timeout, report));
        Ok(Guarded {
            inner,
            health,
            timeout,
            cuts_calls,
            checks,
        })
    }

    /// Runs `call` unless the store is known to be unavailable; if it is found so while the
    /// call runs, the call fails once it has run for the store's timeout.
    async fn guard<T>(&self, call: impl Future<Output = StoreResult<T>>) -> StoreResult<T> {
        if !self.cuts_calls {
            return call.await;
        }
        let mut health = self.health.clone();
        if let Some(why) = health.borrow_and_update().clone() {
            return Err(unavailable(&why));
        }
        let started = Instant::now();
        let mut call = std::pin::pin!(call);
        let why = tokio::select! {
            result = &mut call => return result,
            Ok(down) = health.wait_for(Option::is_some) => down.clone().unwrap_or_default(),
        };
        match tokio::time::timeout_at(started + self.timeout, call).await {
            Ok(result) => result,
            Err(_) => Err(unavailable(&why)),
        }
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        self.checks.abort();
    }
}

fn unavailable(why: &str) -> StoreError {
    StoreError::Unavailable(format!("the database does not answer: {why}"))
}

/// How the health check reaches the database.
enum Probe {
    /// A connection of its own, and the pool when that cannot be made.
    Postgres {
        options: PgConnectOptions,
        conn: Option<PgConnection>,
        pool: AnyPool,
    },
    /// The file, opened afresh each time.
    Sqlite {
        options: SqliteConnectOptions,
        path: PathBuf,
    },
}

impl Probe {
    /// One check, bounded by `limit`: why it failed, if it did.
    async fn check(&mut self, limit: Duration) -> Result<(), String> {
        let deadline = Instant::now() + limit;
        let late = || format!("no answer within {} ms", limit.as_millis());
        match self {
            Probe::Postgres {
                options,
                conn,
                pool,
            } => {
                let why = match tokio::time::timeout_at(deadline, ping_own(options, conn)).await {
                    Ok(Ok(())) => return Ok(()),
                    Ok(Err(e)) => e.to_string(),
                    Err(_) => {
                        // Its state is unknown (a query may be half sent): start afresh.
                        *conn = None;
                        return Err(late());
                    }
                };
                let pooled = sqlx::query("SELECT 1").execute(&*pool);
                match tokio::time::timeout_at(deadline, pooled).await {
                    Ok(Ok(_)) => {
                        tracing::debug!(
                            "the health check cannot use a connection of its own ({why}); \
                             a pooled connection answered"
                        );
                        Ok(())
                    }
                    _ => Err(why),
                }
            }
            Probe::Sqlite { options, path } => {
                let read = async {
                    let mut conn = options
                        .clone()
                        .filename(&*path)
                        .create_if_missing(false)
                        .connect()
                        .await?;
                    conn.execute("SELECT count(*) FROM sqlite_master").await?;
                    conn.close().await
                };
                match tokio::time::timeout_at(deadline, read).await {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err(late()),
                }
            }
        }
    }
}

/// `SELECT 1` on the check's own connection, connecting first if needed (and once more if
/// the connection it had failed: the database may have closed it).
async fn ping_own(
    options: &PgConnectOptions,
    conn: &mut Option<PgConnection>,
) -> Result<(), sqlx::Error> {
    if let Some(live) = conn.as_mut() {
        if live.execute("SELECT 1").await.is_ok() {
            return Ok(());
        }
        *conn = None;
    }
    let mut fresh = options.connect().await?;
    fresh.execute("SELECT 1").await?;
    *conn = Some(fresh);
    Ok(())
}

/// Checks the database every quarter of `timeout` and reports its health on change.
async fn check(mut probe: Probe, timeout: Duration, report: watch::Sender<Health>) {
    let limit = timeout * 3 / 4;
    let mut tick = tokio::time::interval(timeout / 4);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failures = 0;
    let mut down_since: Option<Instant> = None;
    loop {
        tick.tick().await;
        let Err(why) = probe.check(limit).await else {
            failures = 0;
            if let Some(since) = down_since.take() {
                tracing::info!(
                    "metadata store available again after {:.1} s",
                    since.elapsed().as_secs_f64()
                );
                report.send_replace(None);
            }
            continue;
        };
        failures += 1;
        if failures < FAILURES_TO_DOWN {
            tracing::debug!("a health check of the metadata store failed: {why}");
            continue;
        }
        if down_since.is_none() {
            tracing::warn!("metadata store unavailable: {why}");
            down_since = Some(Instant::now());
            report.send_replace(Some(why.into()));
        }
    }
}

#[async_trait]
impl MetadataStore for Guarded {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }

    fn available(&self) -> StoreResult<()> {
        match self.health.borrow().as_deref() {
            Some(why) => Err(unavailable(why)),
            None => Ok(()),
        }
    }

    async fn create_function(
        &self,
        function: &Function,
        first: &FunctionVersion,
    ) -> StoreResult<()> {
        self.guard(self.inner.create_function(function, first))
            .await
    }

    async fn get_function(&self, id_or_name: &str) -> StoreResult<Option<Function>> {
        self.guard(self.inner.get_function(id_or_name)).await
    }

    async fn list_functions(&self, limit: u32, offset: u32) -> StoreResult<Page<Function>> {
        self.guard(self.inner.list_functions(limit, offset)).await
    }

    async fn update_function(&self, function: &Function) -> StoreResult<()> {
        self.guard(self.inner.update_function(function)).await
    }

    async fn publish_version(
        &self,
        function: &Function,
        description: &str,
        created_by: &str,
        move_aliases: &[&str],
    ) -> StoreResult<Published> {
        self.guard(
            self.inner
                .publish_version(function, description, created_by, move_aliases),
        )
        .await
    }

    async fn publish_draft(
        &self,
        function_id: &str,
        description: &str,
        created_by: &str,
        move_aliases: &[&str],
    ) -> StoreResult<Published> {
        self.guard(
            self.inner
                .publish_draft(function_id, description, created_by, move_aliases),
        )
        .await
    }

    async fn delete_function(&self, function_id: &str) -> StoreResult<bool> {
        self.guard(self.inner.delete_function(function_id)).await
    }

    async fn deleted_functions(&self) -> StoreResult<Vec<DeletedFunction>> {
        self.guard(self.inner.deleted_functions()).await
    }

    async fn purge_deleted_function(&self, function_id: &str) -> StoreResult<u64> {
        self.guard(self.inner.purge_deleted_function(function_id))
            .await
    }

    async fn forget_deleted_functions(&self, before: OffsetDateTime) -> StoreResult<u64> {
        self.guard(self.inner.forget_deleted_functions(before))
            .await
    }

    async fn existing_functions(&self, function_ids: &[String]) -> StoreResult<HashSet<String>> {
        self.guard(self.inner.existing_functions(function_ids))
            .await
    }

    async fn get_version(
        &self,
        function_id: &str,
        version: u32,
    ) -> StoreResult<Option<FunctionVersion>> {
        self.guard(self.inner.get_version(function_id, version))
            .await
    }

    async fn list_versions(
        &self,
        function_id: &str,
        limit: u32,
        offset: u32,
    ) -> StoreResult<Page<FunctionVersion>> {
        self.guard(self.inner.list_versions(function_id, limit, offset))
            .await
    }

    async fn has_version(&self, function_id: &str, version: u32) -> StoreResult<bool> {
        self.guard(self.inner.has_version(function_id, version))
            .await
    }

    async fn delete_version(&self, function_id: &str, version: u32) -> StoreResult<bool> {
        self.guard(self.inner.delete_version(function_id, version))
            .await
    }

    async fn create_alias(
        &self,
        alias: &FunctionAlias,
        created_by: &str,
    ) -> StoreResult<FunctionAlias> {
        self.guard(self.inner.create_alias(alias, created_by)).await
    }

    async fn update_alias(
        &self,
        function_id: &str,
        name: &str,
        change: &AliasChange,
        changed_by: &str,
    ) -> StoreResult<AliasWrite> {
        self.guard(
            self.inner
                .update_alias(function_id, name, change, changed_by),
        )
        .await
    }

    async fn rollback_alias(
        &self,
        function_id: &str,
        name: &str,
        target: RollbackTarget,
        expected_revision: Option<u32>,
        changed_by: &str,
    ) -> StoreResult<AliasWrite> {
        self.guard(self.inner.rollback_alias(
            function_id,
            name,
            target,
            expected_revision,
            changed_by,
        ))
        .await
    }

    async fn delete_alias(&self, function_id: &str, name: &str) -> StoreResult<bool> {
        self.guard(self.inner.delete_alias(function_id, name)).await
    }

    async fn alias_history(
        &self,
        function_id: &str,
        name: &str,
        limit: u32,
        offset: u32,
    ) -> StoreResult<Page<AliasRevision>> {
        self.guard(self.inner.alias_history(function_id, name, limit, offset))
            .await
    }

    async fn get_alias(&self, function_id: &str, name: &str) -> StoreResult<Option<FunctionAlias>> {
        self.guard(self.inner.get_alias(function_id, name)).await
    }

    async fn list_aliases_page(
        &self,
        function_id: &str,
        limit: u32,
        offset: u32,
    ) -> StoreResult<Page<FunctionAlias>> {
        self.guard(self.inner.list_aliases_page(function_id, limit, offset))
            .await
    }

    async fn list_aliases(&self, function_id: &str) -> StoreResult<Vec<FunctionAlias>> {
        self.guard(self.inner.list_aliases(function_id)).await
    }

    async fn record_invocations(&self, records: &[Invocation]) -> StoreResult<()> {
        self.guard(self.inner.record_invocations(records)).await
    }

    async fn get_invocation(&self, request_id: &str) -> StoreResult<Option<Invocation>> {
        self.guard(self.inner.get_invocation(request_id)).await
    }

    async fn list_invocations(
        &self,
        function_id: &str,
        filter: &InvocationFilter,
    ) -> StoreResult<Vec<Invocation>> {
        self.guard(self.inner.list_invocations(function_id, filter))
            .await
    }

    async fn begin_snapshot(&self, new: &NewSnapshot) -> StoreResult<(Snapshot, bool)> {
        self.guard(self.inner.begin_snapshot(new)).await
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
        self.guard(self.inner.finish_snapshot(
            id,
            status,
            error_message,
            path,
            files,
            size_bytes,
            expires_at,
        ))
        .await
    }

    async fn set_snapshot_status(
        &self,
        id: &str,
        status: SnapshotStatus,
        error_message: Option<&str>,
    ) -> StoreResult<bool> {
        self.guard(self.inner.set_snapshot_status(id, status, error_message))
            .await
    }

    async fn record_snapshot_use(
        &self,
        id: &str,
        how: SnapshotUse,
        start_ms: f64,
        used_at: OffsetDateTime,
        expires_at: Option<OffsetDateTime>,
    ) -> StoreResult<bool> {
        self.guard(
            self.inner
                .record_snapshot_use(id, how, start_ms, used_at, expires_at),
        )
        .await
    }

    async fn get_snapshot(&self, id: &str) -> StoreResult<Option<Snapshot>> {
        self.guard(self.inner.get_snapshot(id)).await
    }

    async fn find_snapshot(&self, key: &SnapshotKey) -> StoreResult<Option<Snapshot>> {
        self.guard(self.inner.find_snapshot(key)).await
    }

    async fn list_snapshots(&self, function_id: Option<&str>) -> StoreResult<Vec<Snapshot>> {
        self.guard(self.inner.list_snapshots(function_id)).await
    }

    async fn delete_snapshot(&self, id: &str) -> StoreResult<bool> {
        self.guard(self.inner.delete_snapshot(id)).await
    }

    async fn ping(&self) -> StoreResult<()> {
        self.guard(self.inner.ping()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A guard whose health the test sets, cutting calls as on PostgreSQL.
    async fn guard(timeout: Duration) -> (Guarded, watch::Sender<Health>) {
        let (report, health) = watch::channel(None);
        let guarded = Guarded {
            inner: SqlStore::open("sqlite::memory:").await.unwrap(),
            health,
            timeout,
            cuts_calls: true,
            checks: tokio::spawn(async {}),
        };
        (guarded, report)
    }

    /// A call that takes `took`, then succeeds.
    async fn call(took: Duration) -> StoreResult<()> {
        tokio::time::sleep(took).await;
        Ok(())
    }

    /// A store found unavailable fails new calls at once and calls that have waited its
    /// timeout, but not a call that began a moment ago (it may be progressing on a live
    /// connection): that one keeps its time. (Every call waiting used to fail at once.)
    #[tokio::test]
    async fn a_store_found_down_cuts_only_calls_that_waited_its_timeout() {
        let (guarded, report) = guard(Duration::from_secs(2)).await;
        let recent = guarded.guard(call(Duration::from_millis(300)));
        let down = async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            report.send_replace(Some("no answer".into()));
        };
        let (recent, ()) = tokio::join!(recent, down);
        assert!(recent.is_ok(), "{recent:?}");

        let refused = guarded.guard(call(Duration::ZERO)).await;
        assert!(
            matches!(refused, Err(StoreError::Unavailable(_))),
            "{refused:?}"
        );

        report.send_replace(None);
        let hung = guarded.guard(std::future::pending::<StoreResult<()>>());
        let down = async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            report.send_replace(Some("no answer".into()));
        };
        let (hung, ()) =
            tokio::time::timeout(Duration::from_secs(30), async { tokio::join!(hung, down) })
                .await
                .expect("a hung call fails once it has waited the timeout");
        assert!(matches!(hung, Err(StoreError::Unavailable(_))), "{hung:?}");
    }
}
