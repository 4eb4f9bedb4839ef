//! Nimbus metadata store: functions, versions, aliases, invocation records and the index
//! of function-level snapshots.
//!
//! One trait, [`MetadataStore`], with two backends side by side: SQLite (embedded default,
//! a file in the data directory) and PostgreSQL (production, shared by several servers).
//! [`open`] picks the backend from the URL. Each backend applies its numbered migrations
//! (`migrations/sqlite`, `migrations/postgres`) when opened. One conformance suite
//! (`tests/conformance.rs`) runs unchanged against both.
//!
//! Both backends share one implementation over sqlx's `Any` driver (`sql`): the SQL is
//! written once in the dialect both databases accept; per-backend differences (URL,
//! connection setup, migrations, parameter limits) live in `backend`, column conversions
//! in `codec`. `guard` watches the database with a health check; on PostgreSQL it makes
//! every call fail fast while the database does not answer.

mod backend;
mod codec;
mod guard;
mod sql;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use nimbus_core::{
    AliasRevision, Function, FunctionAlias, FunctionVersion, Invocation, InvocationStatus,
    NewSnapshot, RoutingConfig, Snapshot, SnapshotFile, SnapshotKey, SnapshotStatus, SnapshotUse,
};
use time::OffsetDateTime;

/// Rows a listing returns when it is asked for a limit of 0.
pub const DEFAULT_LIST_LIMIT: u32 = 100;

/// Opens the metadata store named by `url` and applies its pending migrations.
///
/// - `sqlite:<path>` or `sqlite://<path>`: a SQLite file, created (with its directory) if
///   missing, in WAL mode with `synchronous=NORMAL`, a 5 s busy timeout and foreign keys on.
///   `sqlite::memory:` is a private in-memory database (one connection), for tests.
/// - `postgres://…` or `postgresql://…`: a PostgreSQL database. Connection parameters go in
///   the URL, e.g. `?options=-c%20search_path%3Dmy_schema` to use a schema other than
///   `public` (it must exist; the tables and the migration history are created in it).
///
/// Any other scheme is a [`StoreError::Backend`] naming the accepted ones. Opened with the
/// default [`StoreOptions`].
pub async fn open(url: &str) -> StoreResult<Arc<dyn MetadataStore>> {
    open_with(url, &StoreOptions::default()).await
}

/// [`open`] with `options`. The database is watched by a health check (see
/// [`StoreOptions::timeout`]) that [`MetadataStore::available`] reports. On PostgreSQL,
/// while the database does not answer it, every call fails at once with
/// [`StoreError::Unavailable`], and calls already waiting on it fail once they have waited
/// the timeout. SQLite, a local file, is checked but its calls are not held back; an
/// in-memory SQLite database is not watched.
pub async fn open_with(url: &str, options: &StoreOptions) -> StoreResult<Arc<dyn MetadataStore>> {
    let store = sql::SqlStore::open(url).await?;
    if store.dialect() == backend::Dialect::Sqlite && backend::is_in_memory(url) {
        return Ok(Arc::new(store));
    }
    Ok(Arc::new(guard::Guarded::start(
        store,
        url,
        options.timeout,
    )?))
}

/// How a store is opened.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// The longest the database may take to answer a health check (every quarter of
    /// this; see `open_with`): after two checks in a row that it failed, it counts as
    /// unavailable, and calls then fail within this bound instead of waiting for the
    /// database (default 1 s).
    pub timeout: Duration,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            timeout: Duration::from_secs(1),
        }
    }
}

/// What can go wrong in a store call.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A uniqueness rule was broken (`function name "x" already exists`).
    #[error("{0}")]
    Conflict(String),
    /// The row the call needs does not exist.
    #[error("{0}")]
    NotFound(String),
    /// Stored data could not be read back (corrupt row, unknown enum value).
    #[error("corrupt stored data: {0}")]
    Corrupt(String),
    /// The database failed.
    #[error("database error: {0}")]
    Backend(String),
    /// The database refused the data itself (a value it cannot store, a broken
    /// constraint): the same call with the same data is refused again, whatever the state
    /// of the database.
    #[error("the database refuses the data: {0}")]
    Rejected(String),
    /// The database cannot be reached or does not answer (refused connections, no
    /// connection within the pool's bound, a failed or late health check).
    #[error("{0}")]
    Unavailable(String),
    /// The alias a change names does not exist.
    #[error("alias {alias:?} not found")]
    AliasNotFound {
        /// The alias.
        alias: String,
    },
    /// A rollback named a revision the alias's history does not have.
    #[error("alias {alias:?} has no revision {revision}")]
    RevisionNotFound {
        /// The alias.
        alias: String,
        /// The revision asked for.
        revision: u32,
    },
    /// A routing table names versions that do not exist (never published, or deleted).
    #[error("{}", missing_versions_message(.0))]
    MissingVersions(Vec<u32>),
    /// A version cannot be deleted while aliases route to it.
    #[error("version {version} is routed by alias(es) {}", .aliases.join(", "))]
    VersionInUse {
        /// The version.
        version: u32,
        /// The aliases whose tables name it, by name.
        aliases: Vec<String>,
    },
    /// A rollback would change nothing: there is no earlier revision, or the routing asked
    /// for is the current one.
    #[error("{0}")]
    NothingToRollBack(String),
    /// The function has as many aliases as one may have.
    #[error("the function has {limit} aliases, as many as a function may have")]
    TooManyAliases {
        /// The limit ([`nimbus_core::limits::MAX_ALIASES_PER_FUNCTION`]).
        limit: usize,
    },
    /// A guarded change found the alias at another revision than the caller expected.
    #[error("alias {alias:?} is at revision {current}, not {expected}: it changed meanwhile")]
    RevisionMismatch {
        /// The alias.
        alias: String,
        /// The revision the caller expected.
        expected: u32,
        /// The revision it is at.
        current: u32,
    },
}

fn missing_versions_message(versions: &[u32]) -> String {
    let list: Vec<String> = versions.iter().map(u32::to_string).collect();
    match versions {
        [one] => format!("version {one} does not exist"),
        _ => format!("versions {} do not exist", list.join(", ")),
    }
}

impl From<sqlx::Error> for StoreError {
    /// Unique violations become [`StoreError::Conflict`], refusals of the data itself
    /// (see [`is_data_refusal`]) [`StoreError::Rejected`], values that do not decode
    /// [`StoreError::Corrupt`], failures to reach the database and refusals that go away by
    /// themselves (see [`is_transient`]) [`StoreError::Unavailable`], everything else
    /// [`StoreError::Backend`].
    fn from(error: sqlx::Error) -> Self {
        match &error {
            sqlx::Error::Database(db) if db.is_unique_violation() => {
                StoreError::Conflict(db.message().to_string())
            }
            sqlx::Error::Database(db) if is_data_refusal(db.as_ref()) => {
                StoreError::Rejected(error.to_string())
            }
            sqlx::Error::Database(db) if is_transient(db.as_ref()) => {
                StoreError::Unavailable(error.to_string())
            }
            sqlx::Error::ColumnDecode { .. }
            | sqlx::Error::Decode(_)
            | sqlx::Error::ColumnNotFound(_) => StoreError::Corrupt(error.to_string()),
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed => StoreError::Unavailable(error.to_string()),
            _ => StoreError::Backend(error.to_string()),
        }
    }
}

/// Whether the database refused a statement for a reason that goes away by itself, so that
/// the same statement succeeds later: PostgreSQL's connection exceptions (SQLSTATE class
/// 08), insufficient resources (53), operator intervention (57: shutting down, starting
/// up, cancelled) and transaction rollbacks (40: serialization failures, deadlocks);
/// SQLite's busy and locked.
fn is_transient(error: &dyn sqlx::error::DatabaseError) -> bool {
    if let Some(pg) = error.try_downcast_ref::<sqlx::postgres::PgDatabaseError>() {
        return ["08", "53", "57", "40"].contains(&&pg.code()[..2]);
    }
    if error
        .try_downcast_ref::<sqlx::sqlite::SqliteError>()
        .is_some()
    {
        const BUSY: i64 = 5;
        const LOCKED: i64 = 6;
        return matches!(sqlite_primary_code(error), Some(BUSY | LOCKED));
    }
    false
}

/// Whether the database refused a statement for the data it carries, so that the same data
/// is refused again whatever the database's state: PostgreSQL's data exceptions (SQLSTATE
/// class 22: a value out of range, an invalid byte sequence) and integrity constraint
/// violations (23); SQLite's constraint (a NOT NULL or CHECK, say), too big and datatype
/// mismatch. A full disk, an I/O error, a read-only database (a failover under way),
/// missing privileges or an internal error are not: they affect every statement alike.
fn is_data_refusal(error: &dyn sqlx::error::DatabaseError) -> bool {
    if let Some(pg) = error.try_downcast_ref::<sqlx::postgres::PgDatabaseError>() {
        return ["22", "23"].contains(&&pg.code()[..2]);
    }
    if error
        .try_downcast_ref::<sqlx::sqlite::SqliteError>()
        .is_some()
    {
        const TOOBIG: i64 = 18;
        const CONSTRAINT: i64 = 19;
        const MISMATCH: i64 = 20;
        return matches!(
            sqlite_primary_code(error),
            Some(TOOBIG | CONSTRAINT | MISMATCH)
        );
    }
    false
}

/// A SQLite error's primary result code (extended codes keep it in their low byte).
fn sqlite_primary_code(error: &dyn sqlx::error::DatabaseError) -> Option<i64> {
    error
        .code()
        .and_then(|code| code.parse::<i64>().ok())
        .map(|code| code & 0xff)
}

/// Result of store calls.
pub type StoreResult<T> = Result<T, StoreError>;

/// A page of a listing, with the total count across all pages.
#[derive(Debug, Clone, PartialEq)]
pub struct Page<T> {
    /// The items of this page.
    pub items: Vec<T>,
    /// Items across all pages.
    pub total: u64,
}

/// What [`MetadataStore::publish_version`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct Published {
    /// The new version, or the newest existing one when nothing changed since it (its code
    /// is then the function's draft code, which has the same hash).
    pub version: FunctionVersion,
    /// False when nothing changed since the newest version, so no version was added.
    pub created: bool,
    /// The aliases of `move_aliases` that changed (those not already routing there alone).
    pub moved: Vec<String>,
}

/// A change of an alias's routing and/or description.
#[derive(Debug, Clone, Default)]
pub struct AliasChange {
    /// New routing table (validated and normalized by the caller).
    pub routing: Option<RoutingConfig>,
    /// New description.
    pub description: Option<String>,
    /// Apply only if the alias is at this revision (`RevisionMismatch` otherwise).
    pub expected_revision: Option<u32>,
}

/// What a rollback restores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RollbackTarget {
    /// The routing before the last change of routing (description-only changes skipped).
    Previous,
    /// The routing of this revision of the alias's history.
    Revision(u32),
    /// All traffic to this version.
    Version(u32),
}

/// What [`MetadataStore::update_alias`] and [`MetadataStore::rollback_alias`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct AliasWrite {
    /// The alias as it is now.
    pub alias: FunctionAlias,
    /// False when the change changed nothing, so no revision was written.
    pub changed: bool,
    /// For a rollback to an earlier revision, that revision.
    pub restored_revision: Option<u32>,
}

/// Filter for invocation listings.
#[derive(Debug, Clone, Default)]
pub struct InvocationFilter {
    /// Only this status.
    pub status: Option<InvocationStatus>,
    /// At most this many, newest first; 0 means [`DEFAULT_LIST_LIMIT`].
    pub limit: u32,
}

/// A function deleted recently (see [`MetadataStore::deleted_functions`]).
#[derive(Debug, Clone, PartialEq)]
pub struct DeletedFunction {
    /// Its id (never given to another function).
    pub function_id: String,
    /// When it was deleted.
    pub deleted_at: OffsetDateTime,
}

/// The metadata store. Every method is one transaction: it happens whole or not at all.
#[async_trait]
pub trait MetadataStore: Send + Sync + 'static {
    /// Backend name (`sqlite`, `postgres`), for logs.
    fn backend(&self) -> &'static str;

    /// `Ok` while the store answers its health checks; otherwise
    /// [`StoreError::Unavailable`] saying why, at once (no round trip).
    fn available(&self) -> StoreResult<()> {
        Ok(())
    }

    /// Inserts a new function with its version 1 and alias `latest` → 1.
    /// `Conflict` if the name is taken.
    async fn create_function(
        &self,
        function: &Function,
        first: &FunctionVersion,
    ) -> StoreResult<()>;

    /// A function by id (`fn_…`) or by name; code included.
    async fn get_function(&self, id_or_name: &str) -> StoreResult<Option<Function>>;

    /// Functions ordered by name.
    async fn list_functions(&self, limit: u32, offset: u32) -> StoreResult<Page<Function>>;

    /// Replaces the function's draft (description, config, code, max_instances, status,
    /// updated_at) without publishing. `NotFound` if it is gone.
    async fn update_function(&self, function: &Function) -> StoreResult<()>;

    /// Saves the function's draft and publishes it, in one transaction: unless the draft's
    /// configuration and code equal the newest existing version's (then that version
    /// stands, `created: false`), allocates the next number (`latest_version + 1`, never
    /// reused) and inserts the version with `description` and `created_by`. Either way each
    /// alias in `move_aliases` is pointed at the version alone (a `publish` revision in its
    /// history unless it already pointed there). `AliasNotFound` if one of them does not
    /// exist, and then nothing is written.
    async fn publish_version(
        &self,
        function: &Function,
        description: &str,
        created_by: &str,
        move_aliases: &[&str],
    ) -> StoreResult<Published>;

    /// Publishes the function's stored draft, read under the row lock in the same
    /// transaction (so a draft staged concurrently is never overwritten or skipped), with
    /// the same rules and results as [`MetadataStore::publish_version`]. `NotFound` if the
    /// function does not exist.
    async fn publish_draft(
        &self,
        function_id: &str,
        description: &str,
        created_by: &str,
        move_aliases: &[&str],
    ) -> StoreResult<Published>;

    /// Deletes the function with its versions, aliases (and their history), invocation
    /// records and snapshot rows, and remembers it as deleted (see
    /// [`MetadataStore::deleted_functions`]). False if absent.
    async fn delete_function(&self, function_id: &str) -> StoreResult<bool>;

    /// Functions deleted and not yet forgotten, oldest first. Records of them written after
    /// the deletion (by servers that ran them meanwhile) are not kept, and
    /// [`MetadataStore::purge_deleted_function`] removes any that raced it.
    async fn deleted_functions(&self) -> StoreResult<Vec<DeletedFunction>>;

    /// Deletes the invocation records of a deleted function written since its deletion;
    /// returns how many. Nothing for a function not remembered as deleted.
    async fn purge_deleted_function(&self, function_id: &str) -> StoreResult<u64>;

    /// Forgets the deleted functions deleted before `before`; returns how many.
    async fn forget_deleted_functions(&self, before: OffsetDateTime) -> StoreResult<u64>;

    /// Which of `function_ids` exist (a cheap check that loads no code).
    async fn existing_functions(&self, function_ids: &[String]) -> StoreResult<HashSet<String>>;

    /// One version, code included.
    async fn get_version(
        &self,
        function_id: &str,
        version: u32,
    ) -> StoreResult<Option<FunctionVersion>>;

    /// Versions newest first. Listing items carry an empty code bundle (code is not loaded).
    async fn list_versions(
        &self,
        function_id: &str,
        limit: u32,
        offset: u32,
    ) -> StoreResult<Page<FunctionVersion>>;

    /// Whether a version exists (a cheap check that loads no code).
    async fn has_version(&self, function_id: &str, version: u32) -> StoreResult<bool>;

    /// Deletes a version. `VersionInUse` naming the aliases whose tables include it (even
    /// at weight 0); false if the version does not exist, `NotFound` if the function does
    /// not. Its snapshot rows go with it. Its number is never given out again.
    async fn delete_version(&self, function_id: &str, version: u32) -> StoreResult<bool>;

    /// Creates an alias at revision 1 (its `revision`, `created_at` and `updated_at` are
    /// set by the store) and returns it as stored. `TooManyAliases` if the function has
    /// [`nimbus_core::limits::MAX_ALIASES_PER_FUNCTION`] already (counted under the
    /// function's lock, so concurrent creations cannot pass it). `Conflict` if the function has an alias
    /// of that name, `MissingVersions` if the routing names versions that do not exist,
    /// `NotFound` if the function is gone.
    async fn create_alias(
        &self,
        alias: &FunctionAlias,
        created_by: &str,
    ) -> StoreResult<FunctionAlias>;

    /// Applies `change` to an alias as its next revision (an `update` in its history); a
    /// change that changes nothing writes no revision (`changed: false`). `AliasNotFound`,
    /// `MissingVersions` as above, `RevisionMismatch` if `expected_revision` is not the
    /// current one, `NotFound` if the function does not exist.
    async fn update_alias(
        &self,
        function_id: &str,
        name: &str,
        change: &AliasChange,
        changed_by: &str,
    ) -> StoreResult<AliasWrite>;

    /// Restores a routing (see [`RollbackTarget`]) as the alias's next revision (a
    /// `rollback` in its history). `AliasNotFound`, `RevisionNotFound`, `NothingToRollBack`
    /// (no earlier routing, or the target is the current routing), `MissingVersions` (the
    /// target routes to a version that does not exist, e.g. deleted since),
    /// `RevisionMismatch`, `NotFound` if the function does not exist.
    async fn rollback_alias(
        &self,
        function_id: &str,
        name: &str,
        target: RollbackTarget,
        expected_revision: Option<u32>,
        changed_by: &str,
    ) -> StoreResult<AliasWrite>;

    /// Deletes an alias with its history. False if it does not exist, `NotFound` if the
    /// function does not.
    async fn delete_alias(&self, function_id: &str, name: &str) -> StoreResult<bool>;

    /// An alias's history, newest revision first.
    async fn alias_history(
        &self,
        function_id: &str,
        name: &str,
        limit: u32,
        offset: u32,
    ) -> StoreResult<Page<AliasRevision>>;

    /// One alias.
    async fn get_alias(&self, function_id: &str, name: &str) -> StoreResult<Option<FunctionAlias>>;

    /// All aliases of a function (at most
    /// [`MAX_ALIASES_PER_FUNCTION`](nimbus_core::limits::MAX_ALIASES_PER_FUNCTION)), by name.
    async fn list_aliases(&self, function_id: &str) -> StoreResult<Vec<FunctionAlias>>;

    /// One page of a function's aliases, by name (`limit` 0: the default page size).
    async fn list_aliases_page(
        &self,
        function_id: &str,
        limit: u32,
        offset: u32,
    ) -> StoreResult<Page<FunctionAlias>>;

    /// Inserts a batch of invocation records in one transaction. A record whose request_id
    /// exists already replaces it only while the stored one is unfinished (no
    /// `completed_at`): a pending record can be completed, and writing a batch again (a
    /// replay) changes nothing. Records of functions deleted (see
    /// [`MetadataStore::deleted_functions`]) are left out. NUL characters in logs are
    /// stored as U+FFFD.
    async fn record_invocations(&self, records: &[Invocation]) -> StoreResult<()>;

    /// One invocation record.
    async fn get_invocation(&self, request_id: &str) -> StoreResult<Option<Invocation>>;

    /// A function's invocation records, newest first.
    async fn list_invocations(
        &self,
        function_id: &str,
        filter: &InvocationFilter,
    ) -> StoreResult<Vec<Invocation>>;

    /// Claims the snapshot of `new.key` for building, race-free (one row per key):
    /// - no row for the key: inserts one, `building`, with a new id (`true`);
    /// - a `building` or `ready` row: returns it unchanged (`false`), so a snapshot is
    ///   never built twice at once nor rebuilt while it is usable;
    /// - a `failed`, `expired` or `corrupt` row: resets it in place to `building` (same id;
    ///   error, path, files, size and expiry cleared; `created_at` now; start statistics,
    ///   failure history and `last_used_at` kept) and returns it (`true`).
    ///
    /// Of concurrent calls for one key, exactly one gets `true`: that caller builds the
    /// snapshot and reports with [`MetadataStore::finish_snapshot`]. `NotFound` if the
    /// version does not exist.
    async fn begin_snapshot(&self, new: &NewSnapshot) -> StoreResult<(Snapshot, bool)>;

    /// Records the outcome of a build: status, error message, on-disk directory, files,
    /// bytes on disk and expiry, all replaced; a `failed` or `corrupt` outcome also counts
    /// in the failure history (`failure_count`, `last_failure`), which rebuilds keep. False
    /// if there is no such snapshot.
    // One argument per column it sets.
    #[allow(clippy::too_many_arguments)]
    async fn finish_snapshot(
        &self,
        id: &str,
        status: SnapshotStatus,
        error_message: Option<&str>,
        path: Option<&str>,
        files: &[SnapshotFile],
        size_bytes: u64,
        expires_at: Option<OffsetDateTime>,
    ) -> StoreResult<bool>;

    /// Sets a snapshot's status and error message (`None` clears it), e.g. `expired` by the
    /// reaper or `corrupt` when its files do not verify (a failure, counted in the history
    /// as by [`MetadataStore::finish_snapshot`]). False if there is no such snapshot.
    async fn set_snapshot_status(
        &self,
        id: &str,
        status: SnapshotStatus,
        error_message: Option<&str>,
    ) -> StoreResult<bool>;

    /// Counts one instance started from the snapshot (`how`: forked from its template, or
    /// from its checkpoint on disk), taking `start_ms`, at `used_at`: bumps `fork_count` or
    /// `restore_count`, folds `start_ms` into the matching running mean and sets
    /// `last_used_at` and `expires_at`, in one statement, so concurrent calls all count.
    /// False if there is no such snapshot.
    async fn record_snapshot_use(
        &self,
        id: &str,
        how: SnapshotUse,
        start_ms: f64,
        used_at: OffsetDateTime,
        expires_at: Option<OffsetDateTime>,
    ) -> StoreResult<bool>;

    /// One snapshot by id.
    async fn get_snapshot(&self, id: &str) -> StoreResult<Option<Snapshot>>;

    /// The snapshot of a key, whatever its status.
    async fn find_snapshot(&self, key: &SnapshotKey) -> StoreResult<Option<Snapshot>>;

    /// Snapshots of one function, or of all functions for `None`, newest build first.
    async fn list_snapshots(&self, function_id: Option<&str>) -> StoreResult<Vec<Snapshot>>;

    /// Deletes a snapshot's row (its files are the caller's to remove). False if absent.
    async fn delete_snapshot(&self, id: &str) -> StoreResult<bool>;

    /// Cheap liveness check: a round trip through the pool.
    async fn ping(&self) -> StoreResult<()>;
}

#[cfg(test)]
mod tests {
    use sqlx::{Connection, Executor};

    use super::*;

    const POSTGRES_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

    /// A refusal that goes away by itself is `Unavailable` (retried, served stale around),
    /// one that would come back the same is not.
    #[tokio::test]
    async fn transient_refusals_are_unavailable_and_others_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite:{}?mode=rwc", dir.path().join("x.db").display());
        let mut holder = sqlx::SqliteConnection::connect(&url).await.unwrap();
        holder
            .execute("CREATE TABLE t (n INTEGER); BEGIN EXCLUSIVE")
            .await
            .unwrap();
        let mut writer = sqlx::SqliteConnection::connect(&url).await.unwrap();
        writer.execute("PRAGMA busy_timeout = 0").await.unwrap();
        let busy = writer
            .execute("INSERT INTO t VALUES (1)")
            .await
            .unwrap_err();
        assert!(
            matches!(StoreError::from(busy), StoreError::Unavailable(_)),
            "SQLite busy"
        );

        let url = std::env::var("NIMBUS_TEST_DATABASE_URL").unwrap_or_else(|_| POSTGRES_URL.into());
        let mut pg = sqlx::PgConnection::connect(&url).await.unwrap();
        let cancelled = pg
            .execute("SET statement_timeout = 1; SELECT pg_sleep(1)")
            .await
            .unwrap_err();
        assert!(
            matches!(StoreError::from(cancelled), StoreError::Unavailable(_)),
            "a cancelled statement (57014)"
        );
    }

    /// Only a refusal of the data itself is `Rejected` (the recorder drops a record refused
    /// so, and retries every other failure): a full disk, a read-only transaction (what a
    /// failover looks like), missing privileges are refusals of every statement alike.
    #[tokio::test]
    async fn only_refusals_of_the_data_itself_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite:{}?mode=rwc", dir.path().join("x.db").display());
        let mut sqlite = sqlx::SqliteConnection::connect(&url).await.unwrap();
        sqlite
            .execute("CREATE TABLE t (n INTEGER NOT NULL, s TEXT)")
            .await
            .unwrap();
        let rejected = |e: sqlx::Error| matches!(StoreError::from(e), StoreError::Rejected(_));
        let null = sqlite
            .execute("INSERT INTO t VALUES (NULL, '')")
            .await
            .unwrap_err();
        assert!(rejected(null), "SQLite NOT NULL (constraint)");
        // The file may not grow past its current pages: SQLITE_FULL, as on a full disk.
        let pages: i64 = sqlx::query_scalar("PRAGMA page_count")
            .fetch_one(&mut sqlite)
            .await
            .unwrap();
        sqlite
            .execute(format!("PRAGMA max_page_count = {pages}").as_str())
            .await
            .unwrap();
        let full = sqlite
            .execute(
                "WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c WHERE n < 20) \
                 INSERT INTO t SELECT n, zeroblob(100000) FROM c",
            )
            .await
            .unwrap_err();
        assert!(
            full.as_database_error()
                .and_then(|e| e.code())
                .is_some_and(|c| c == "13"),
            "{full}"
        );
        assert!(!rejected(full), "SQLite full");

        let url = std::env::var("NIMBUS_TEST_DATABASE_URL").unwrap_or_else(|_| POSTGRES_URL.into());
        let mut pg = sqlx::PgConnection::connect(&url).await.unwrap();
        let refused = pg.execute("SELECT 1 / 0").await.unwrap_err();
        assert!(rejected(refused), "division by zero (22012)");
        let read_only = pg
            .execute("BEGIN READ ONLY; CREATE TABLE nimbus_read_only (n int)")
            .await
            .unwrap_err();
        pg.execute("ROLLBACK").await.unwrap();
        assert!(
            read_only
                .as_database_error()
                .and_then(|e| e.code())
                .is_some_and(|c| c == "25006"),
            "{read_only}"
        );
        assert!(!rejected(read_only), "read-only transaction (25006)");
        let denied = pg
            .execute("SET ROLE pg_read_all_stats; SELECT pg_read_file('/etc/hostname')")
            .await
            .unwrap_err();
        pg.execute("RESET ROLE").await.unwrap();
        assert!(
            denied
                .as_database_error()
                .and_then(|e| e.code())
                .is_some_and(|c| c == "42501"),
            "{denied}"
        );
        assert!(!rejected(denied), "insufficient privilege (42501)");
    }
}
