//! Failing fast while PostgreSQL does not answer.
//!
//! A database that is down refuses connections, and sqlx's pool retries them until its
//! acquire timeout; a database that hangs (stopped, partitioned) leaves queries waiting on
//! their sockets with no bound at all. Neither should hold a request. So a health check
//! runs on a connection of its own (not the pool's, which a busy server may have all in
//! use): `SELECT 1` every quarter of the store's timeout, bounded by three quarters of it.
//! While the last check failed, every call fails at once with [`StoreError::Unavailable`]
//! naming why, and a check that fails also fails the calls already waiting on the database;
//! so no call waits longer than about the timeout for a database that stopped answering.
//! The first check that passes again lets calls through: the store resumes by itself.
//!
//! A call cut short this way may still have been applied (as with any timeout, its
//! outcome is unknown); every write is one transaction, so it happened whole or not at all.

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use nimbus_core::{
    AliasRevision, Function, FunctionAlias, FunctionVersion, Invocation, NewSnapshot, Snapshot,
    SnapshotFile, SnapshotKey, SnapshotStatus, SnapshotUse,
};
use sqlx::{AnyConnection, Connection, Executor};
use time::OffsetDateTime;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::sql::SqlStore;
use crate::{
    AliasChange, AliasWrite, DeletedFunction, InvocationFilter, MetadataStore, Page, Published,
    RollbackTarget, StoreError, StoreResult,
};

/// Why the store is unavailable, or `None` while its health checks pass.
type Health = Option<Arc<str>>;

/// A store whose calls fail fast while its database does not answer (see the module docs).
pub(crate) struct Guarded {
    inner: SqlStore,
    health: watch::Receiver<Health>,
    checks: JoinHandle<()>,
}

impl Guarded {
    /// Guards `inner`, checking the database at `url` with a connection of its own.
    pub(crate) fn start(inner: SqlStore, url: &str, timeout: Duration) -> Self {
        let (report, health) = watch::channel(None);
        let checks = tokio::spawn(check(url.to_owned(), timeout, report));
        Guarded {
            inner,
            health,
            checks,
        }
    }

    /// Runs `call` unless the store is known to be unavailable, and fails it as soon as
    /// the store becomes so.
    async fn guard<T>(&self, call: impl Future<Output = StoreResult<T>>) -> StoreResult<T> {
        let mut health = self.health.clone();
        if let Some(why) = health.borrow_and_update().clone() {
            return Err(unavailable(&why));
        }
        tokio::select! {
            result = call => result,
            Ok(down) = health.wait_for(Option::is_some) => Err(unavailable(down.as_deref().unwrap_or_default())),
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

/// Checks the database every quarter of `timeout` and reports its health on change.
async fn check(url: String, timeout: Duration, report: watch::Sender<Health>) {
    let limit = timeout * 3 / 4;
    let mut tick = tokio::time::interval(timeout / 4);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut conn: Option<AnyConnection> = None;
    let mut down_since: Option<Instant> = None;
    loop {
        tick.tick().await;
        let why = match tokio::time::timeout(limit, ping(&url, &mut conn)).await {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some(format!("no answer within {} ms", limit.as_millis())),
        };
        match (&why, down_since) {
            (Some(why), None) => {
                tracing::warn!("metadata store unavailable: {why}");
                down_since = Some(Instant::now());
            }
            (None, Some(since)) => {
                tracing::info!(
                    "metadata store available again after {:.1} s",
                    since.elapsed().as_secs_f64()
                );
                down_since = None;
            }
            _ => {}
        }
        if why.is_some() {
            // Its state is unknown (a query may be half sent): start afresh next time.
            conn = None;
        }
        let why: Health = why.map(Into::into);
        report.send_if_modified(|health| {
            let changed = health.is_some() != why.is_some();
            *health = why;
            changed
        });
    }
}

/// One `SELECT 1`, connecting first if needed.
async fn ping(url: &str, conn: &mut Option<AnyConnection>) -> Result<(), sqlx::Error> {
    if conn.is_none() {
        *conn = Some(AnyConnection::connect(url).await?);
    }
    let live = conn.as_mut().expect("connected above");
    live.execute("SELECT 1").await?;
    Ok(())
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
