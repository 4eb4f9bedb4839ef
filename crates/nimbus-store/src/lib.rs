//! Nimbus metadata store: functions, versions, aliases and invocation records.
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
//! in `codec`.

mod backend;
mod codec;
mod sql;

use std::sync::Arc;

use async_trait::async_trait;
use nimbus_core::{Function, FunctionAlias, FunctionVersion, Invocation, InvocationStatus};

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
/// Any other scheme is a [`StoreError::Backend`] naming the accepted ones.
pub async fn open(url: &str) -> StoreResult<Arc<dyn MetadataStore>> {
    Ok(Arc::new(sql::SqlStore::open(url).await?))
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
    /// The database failed or is unreachable.
    #[error("database error: {0}")]
    Backend(String),
}

impl From<sqlx::Error> for StoreError {
    /// Unique violations become [`StoreError::Conflict`], values that do not decode
    /// [`StoreError::Corrupt`], everything else [`StoreError::Backend`].
    fn from(error: sqlx::Error) -> Self {
        match &error {
            sqlx::Error::Database(db) if db.is_unique_violation() => {
                StoreError::Conflict(db.message().to_string())
            }
            sqlx::Error::ColumnDecode { .. }
            | sqlx::Error::Decode(_)
            | sqlx::Error::ColumnNotFound(_) => StoreError::Corrupt(error.to_string()),
            _ => StoreError::Backend(error.to_string()),
        }
    }
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

/// Filter for invocation listings.
#[derive(Debug, Clone, Default)]
pub struct InvocationFilter {
    /// Only this status.
    pub status: Option<InvocationStatus>,
    /// At most this many, newest first; 0 means [`DEFAULT_LIST_LIMIT`].
    pub limit: u32,
}

/// The metadata store. Every method is one transaction: it happens whole or not at all.
#[async_trait]
pub trait MetadataStore: Send + Sync + 'static {
    /// Backend name (`sqlite`, `postgres`), for logs.
    fn backend(&self) -> &'static str;

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

    /// Saves the function's draft and publishes it as the next version in one transaction:
    /// allocates the number (`latest_version + 1`, never reused), inserts the version built
    /// from the draft with `description` and `created_by`, points each alias in `move_aliases`
    /// at it alone (creating an alias that does not exist), and returns the new version.
    async fn publish_version(
        &self,
        function: &Function,
        description: &str,
        created_by: &str,
        move_aliases: &[&str],
    ) -> StoreResult<FunctionVersion>;

    /// Deletes the function with its versions, aliases and invocation records. False if absent.
    async fn delete_function(&self, function_id: &str) -> StoreResult<bool>;

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

    /// One alias.
    async fn get_alias(&self, function_id: &str, name: &str) -> StoreResult<Option<FunctionAlias>>;

    /// All aliases of a function, by name.
    async fn list_aliases(&self, function_id: &str) -> StoreResult<Vec<FunctionAlias>>;

    /// Inserts a batch of invocation records in one transaction; a record whose
    /// request_id exists already replaces it (so a pending record can be completed).
    async fn record_invocations(&self, records: &[Invocation]) -> StoreResult<()>;

    /// One invocation record.
    async fn get_invocation(&self, request_id: &str) -> StoreResult<Option<Invocation>>;

    /// A function's invocation records, newest first.
    async fn list_invocations(
        &self,
        function_id: &str,
        filter: &InvocationFilter,
    ) -> StoreResult<Vec<Invocation>>;

    /// Cheap liveness check of the connection (used by `GET /ready`).
    async fn ping(&self) -> StoreResult<()>;
}
