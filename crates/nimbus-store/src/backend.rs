//! Backends: which database a URL names, how to connect to it, and its migrations.
//!
//! Both backends run through sqlx's `Any` driver, so the store's queries are written
//! once. What differs per backend lives here: the URL schemes, the connection setup
//! (SQLite file creation and pragmas), the numbered migration directory and how many bind
//! parameters one statement may carry.

use std::str::FromStr;
use std::time::Duration;

use sqlx::any::AnyPoolOptions;
use sqlx::migrate::Migrator;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
use sqlx::{AnyConnection, AnyPool};
use sqlx::{ConnectOptions, Connection, Executor};

use crate::{StoreError, StoreResult};

static SQLITE_MIGRATIONS: Migrator = sqlx::migrate!("migrations/sqlite");
static POSTGRES_MIGRATIONS: Migrator = sqlx::migrate!("migrations/postgres");

/// How long a SQLite connection waits for another writer before giving up.
const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a PostgreSQL call waits for a pooled connection (sqlx's default is 30 s). An
/// outage fails calls sooner (see `guard`); this bounds a pool that is only busy, or a
/// database that answers the health check but refuses new connections.
const POSTGRES_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// Per-connection SQLite settings, run on every new pooled connection. (`journal_mode = WAL`
/// is a property of the file, set once before the pool opens; see [`connect_sqlite`].)
const SQLITE_CONNECTION_PRAGMAS: &str =
    "PRAGMA synchronous = NORMAL; PRAGMA busy_timeout = 5000; PRAGMA foreign_keys = ON;";

/// The database behind a store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dialect {
    /// `sqlite:<path>`, `sqlite://<path>`, `sqlite::memory:`.
    Sqlite,
    /// `postgres://…`, `postgresql://…`.
    Postgres,
}

impl Dialect {
    /// The backend named by the URL's scheme.
    pub(crate) fn from_url(url: &str) -> StoreResult<Self> {
        if url.starts_with("sqlite:") {
            Ok(Dialect::Sqlite)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Dialect::Postgres)
        } else {
            // Only the scheme is echoed: the rest of a URL may hold a password.
            let scheme = url.split_once(':').map_or(url, |(scheme, _)| scheme);
            Err(StoreError::Backend(format!(
                "unsupported metadata store URL scheme {scheme:?}: expected sqlite:<path>, \
                 sqlite://<path>, postgres://… or postgresql://…"
            )))
        }
    }

    /// Backend name for logs (`sqlite`, `postgres`).
    pub(crate) fn name(self) -> &'static str {
        match self {
            Dialect::Sqlite => "sqlite",
            Dialect::Postgres => "postgres",
        }
    }

    /// Most bind parameters one statement may carry (`SQLITE_MAX_VARIABLE_NUMBER`, and the
    /// 16-bit parameter count of PostgreSQL's wire protocol).
    pub(crate) fn max_bind_params(self) -> usize {
        match self {
            Dialect::Sqlite => 32_766,
            Dialect::Postgres => 65_535,
        }
    }

    /// Appends the `n`-th (1-based) bind parameter of a generated statement: `$n` on
    /// PostgreSQL, an anonymous `?` on SQLite, where parameters then number by position.
    /// (SQLite resolves `$n` names by a linear search, which makes a statement with
    /// thousands of them quadratic to prepare and bind.)
    pub(crate) fn push_placeholder(self, sql: &mut String, n: usize) {
        match self {
            Dialect::Sqlite => sql.push('?'),
            Dialect::Postgres => {
                sql.push('$');
                sql.push_str(&n.to_string());
            }
        }
    }

    fn migrator(self) -> &'static Migrator {
        match self {
            Dialect::Sqlite => &SQLITE_MIGRATIONS,
            Dialect::Postgres => &POSTGRES_MIGRATIONS,
        }
    }
}

/// Connects to the database named by `url` and applies its pending migrations.
pub(crate) async fn connect(url: &str) -> StoreResult<(Dialect, AnyPool)> {
    let dialect = Dialect::from_url(url)?;
    sqlx::any::install_default_drivers();
    let pool = match dialect {
        Dialect::Sqlite => connect_sqlite(url).await?,
        Dialect::Postgres => connect_postgres(url).await?,
    };
    dialect.migrator().run(&pool).await.map_err(|e| {
        StoreError::Backend(format!(
            "applying the {} migrations failed: {e}",
            dialect.name()
        ))
    })?;
    Ok((dialect, pool))
}

/// Opens a PostgreSQL pool after one direct connection attempt: a pool retries until its
/// acquire timeout and then reports only that it timed out, while the direct attempt fails
/// at once with the cause (refused, authentication, unknown database).
async fn connect_postgres(url: &str) -> StoreResult<AnyPool> {
    let probe = AnyConnection::connect(url)
        .await
        .map_err(|e| StoreError::Backend(format!("cannot connect to PostgreSQL: {e}")))?;
    probe.close().await?;
    Ok(AnyPoolOptions::new()
        .acquire_timeout(POSTGRES_ACQUIRE_TIMEOUT)
        .connect(url)
        .await?)
}

/// Whether a `sqlite:` URL names an in-memory database (`:memory:` or `mode=memory`).
pub(crate) fn is_in_memory(url: &str) -> bool {
    let rest = url
        .trim_start_matches("sqlite://")
        .trim_start_matches("sqlite:");
    let (database, params) = rest.split_once('?').unwrap_or((rest, ""));
    database == ":memory:" || params.split('&').any(|param| param == "mode=memory")
}

/// Opens a SQLite database: creates the file (and its directory) when missing, switches it
/// to WAL once, then pools connections that each set their pragmas.
///
/// A connection goes back to the pool only outside a transaction. When SQLite rolls a
/// transaction back by itself (a full disk, an I/O error: at a COMMIT or mid-statement),
/// the ROLLBACK sqlx then queues fails ("no transaction is active") and sqlx goes on
/// counting the transaction open: that connection's next BEGIN would be a SAVEPOINT and its
/// COMMIT a RELEASE, leaving every later write of it in a transaction that never commits
/// (visible through that connection alone, holding the write lock, lost at exit). Such a
/// connection is closed instead.
async fn connect_sqlite(url: &str) -> StoreResult<AnyPool> {
    let options = SqliteConnectOptions::from_str(url)?;
    let pool = AnyPoolOptions::new()
        .after_connect(|conn, _meta| {
            Box::pin(async move { conn.execute(SQLITE_CONNECTION_PRAGMAS).await.map(drop) })
        })
        .after_release(|conn, _meta| {
            Box::pin(async move {
                // Runs the rollback a dropped transaction queued, then asks where it left
                // the connection.
                conn.ping().await?;
                Ok(!conn.is_in_transaction())
            })
        });

    if is_in_memory(url) {
        // The database lives exactly as long as its connection: keep one, forever.
        return Ok(pool
            .max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect(url)
            .await?);
    }

    // An absolute path keeps the URL handed to the `Any` driver unambiguous.
    let path = std::path::absolute(options.get_filename()).map_err(|e| {
        StoreError::Backend(format!(
            "sqlite path {}: {e}",
            options.get_filename().display()
        ))
    })?;
    if let Some(dir) = path.parent() {
        tokio::fs::create_dir_all(dir).await.map_err(|e| {
            StoreError::Backend(format!("creating directory {}: {e}", dir.display()))
        })?;
    }
    let options = options
        .filename(&path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal)
        .busy_timeout(SQLITE_BUSY_TIMEOUT)
        .foreign_keys(true);
    // Switching to WAL needs an exclusive lock that busy_timeout does not wait for, so it is
    // done by this one connection before any pooled connection exists.
    options.connect().await?.close().await?;
    Ok(pool.connect(options.to_url_lossy().as_str()).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schemes_pick_the_backend() {
        assert_eq!(
            Dialect::from_url("sqlite:/tmp/x.db").unwrap(),
            Dialect::Sqlite
        );
        assert_eq!(Dialect::from_url("sqlite://x.db").unwrap(), Dialect::Sqlite);
        assert_eq!(
            Dialect::from_url("postgres://u@h/db").unwrap(),
            Dialect::Postgres
        );
        assert_eq!(
            Dialect::from_url("postgresql://u@h/db").unwrap(),
            Dialect::Postgres
        );
        let e = Dialect::from_url("mysql://root:secret@h/db")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("\"mysql\"") && e.contains("postgresql://"),
            "{e}"
        );
        assert!(!e.contains("secret"), "{e}");
    }

    #[test]
    fn in_memory_urls_are_recognized() {
        assert!(is_in_memory("sqlite::memory:"));
        assert!(is_in_memory("sqlite://:memory:"));
        assert!(is_in_memory("sqlite://x.db?cache=shared&mode=memory"));
        assert!(!is_in_memory("sqlite:/tmp/memory.db"));
        assert!(!is_in_memory("sqlite://data/nimbus.db?mode=rwc"));
    }
}
