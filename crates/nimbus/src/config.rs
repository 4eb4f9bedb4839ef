//! Server configuration: one typed struct with defaults, read from an optional
//! `nimbus.toml`, then environment variables and flags (which win), printed on start.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use nimbus_engine::{EngineConfig, SnapshotSettings};
use serde::{Deserialize, Serialize};

/// Flags of `nimbus server` (each also readable from its environment variable).
#[derive(Debug, Args)]
pub struct ServerArgs {
    /// Configuration file (TOML); defaults to `<data-dir>/nimbus.toml` when that exists.
    #[arg(long, env = "NIMBUS_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:8080].
    #[arg(long, env = "NIMBUS_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Directory for local state: SQLite database, code cache, runtime files.
    #[arg(long, env = "NIMBUS_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Metadata store: `sqlite:<path>` (default `<data-dir>/nimbus.db`) or `postgres://…`.
    #[arg(long, env = "NIMBUS_DATABASE_URL")]
    pub database_url: Option<String>,
    /// State of stateful functions and their sessions: `embedded` (default, on local disk
    /// at `<data-dir>/state.redb`), `redis://…`, `rediss://…`,
    /// `redis+sentinel://host:port[,…]/<master>` or `redis+cluster://host:port[,…]`.
    #[arg(long, env = "NIMBUS_STATE_URL")]
    pub state_url: Option<String>,
    /// API key accepted as `Authorization: Bearer <key>` (`name:secret` or `secret`; repeatable).
    #[arg(long = "api-key", env = "NIMBUS_API_KEYS", value_delimiter = ',')]
    pub api_keys: Vec<String>,
    /// Python interpreter for the python3.11 runtime (default: the real python3 on this host).
    #[arg(long, env = "NIMBUS_PYTHON")]
    pub python: Option<PathBuf>,
    /// Node.js binary for the nodejs20 runtime (default: the real node on this host).
    #[arg(long, env = "NIMBUS_NODE")]
    pub node: Option<PathBuf>,
    /// Seconds an idle instance is kept [default: 300].
    #[arg(long, env = "NIMBUS_IDLE_TIMEOUT")]
    pub idle_timeout: Option<u64>,
    /// Deploy the bundled example function `hello` at start (if it does not exist yet).
    #[arg(long)]
    pub example: bool,
    /// Run functions as plain processes of the server's user, without namespaces, cgroups
    /// or seccomp. Only for trusted code on hosts that cannot isolate (see docs/SECURITY.md).
    #[arg(long, env = "NIMBUS_INSECURE_NO_ISOLATION")]
    pub insecure_no_isolation: bool,
    /// Start every new instance cold: no function-level snapshots (the same as
    /// `[snapshots] enabled = false`).
    #[arg(long, env = "NIMBUS_NO_SNAPSHOTS")]
    pub no_snapshots: bool,
    /// Client connections served at once; one more is answered 503 `too_many_connections`
    /// [default: half the open-files limit, at most 10,000].
    #[arg(long, env = "NIMBUS_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Seconds a client has to send a request's head [default: 10].
    #[arg(long, env = "NIMBUS_HEADER_TIMEOUT")]
    pub header_timeout: Option<u64>,
    /// Seconds an idle keep-alive connection is kept open; 0 turns keep-alive off
    /// [default: 75].
    #[arg(long, env = "NIMBUS_KEEPALIVE_TIMEOUT")]
    pub keepalive_timeout: Option<u64>,
}

/// `state_url` of the embedded state store.
pub const EMBEDDED_STATE: &str = "embedded";

/// The server's settings. Field names are the keys of `nimbus.toml`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Listen address.
    pub listen: SocketAddr,
    /// Local state directory.
    pub data_dir: PathBuf,
    /// Metadata store URL.
    pub database_url: String,
    /// State backend: `embedded` or a Redis URL.
    pub state_url: String,
    /// API keys.
    pub api_keys: Vec<String>,
    /// Python interpreter override.
    pub python: Option<PathBuf>,
    /// Node.js binary override.
    pub node: Option<PathBuf>,
    /// Seconds an idle instance is kept.
    pub idle_timeout_sec: u64,
    /// Invocations an instance serves before it is replaced.
    pub max_invocations: u64,
    /// Seconds an instance lives before it is replaced.
    pub max_age_sec: u64,
    /// Invocations of one function that may wait for capacity.
    pub queue_depth: usize,
    /// Milliseconds an invocation may wait for capacity before 429.
    pub queue_timeout_ms: u64,
    /// Seconds a new instance may take to load its handler.
    pub start_timeout_sec: u64,
    /// Milliseconds cached metadata is trusted (bounds cross-server staleness).
    pub cache_ttl_ms: u64,
    /// Milliseconds cached metadata may still be served while the metadata store does not
    /// answer (warm invocations of known functions go on through an outage this long).
    pub stale_ttl_ms: u64,
    /// Milliseconds the metadata store (PostgreSQL) may take to answer a health check
    /// before calls that need it fail at once with 503 `store_unavailable`.
    pub store_timeout_ms: u64,
    /// Seconds between passes that drop what this server holds of functions deleted
    /// elsewhere and purge state and records written late for deleted functions.
    pub purge_interval_sec: u64,
    /// Seconds a stopping server waits for running invocations before stopping instances.
    pub shutdown_grace_sec: u64,
    /// Function-level snapshots (`[snapshots]`).
    pub snapshots: SnapshotsConfig,
    /// Client connections and requests (`[http]`).
    pub http: HttpConfig,
}

/// The `[http]` section: connections and request heads. See docs/LIMITS.md.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Connections served at once (absent: half the open-files limit, at most 10,000).
    pub max_connections: Option<usize>,
    /// Seconds for a request's head: from the accept (first request) or from its first
    /// byte (later requests on a kept-alive connection).
    pub header_timeout_sec: u64,
    /// Seconds a kept-alive connection may wait for its next request; 0: no keep-alive.
    pub keepalive_timeout_sec: u64,
    /// Seconds a request body may send nothing (408 `request_timeout`), or a response go
    /// unread (the connection is closed).
    pub stall_timeout_sec: u64,
    /// Longest request target (path and query), bytes.
    pub max_uri_bytes: usize,
    /// Most bytes of header fields of a request.
    pub max_header_bytes: usize,
    /// Most header fields of a request.
    pub max_headers: usize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            max_connections: None,
            header_timeout_sec: 10,
            keepalive_timeout_sec: 75,
            stall_timeout_sec: 30,
            max_uri_bytes: 8 * 1024,
            max_header_bytes: 16 * 1024,
            max_headers: 100,
        }
    }
}

impl HttpConfig {
    /// Refuses settings that would leave the server unreachable or undefended.
    fn validate(&self) -> anyhow::Result<()> {
        let checks = [
            (
                "max_connections",
                self.max_connections.unwrap_or(1) >= 1,
                "at least 1",
            ),
            (
                "header_timeout_sec",
                self.header_timeout_sec >= 1,
                "at least 1",
            ),
            (
                "stall_timeout_sec",
                self.stall_timeout_sec >= 1,
                "at least 1",
            ),
            ("max_uri_bytes", self.max_uri_bytes >= 256, "at least 256"),
            (
                "max_header_bytes",
                self.max_header_bytes >= 1024,
                "at least 1024",
            ),
            ("max_headers", self.max_headers >= 8, "at least 8"),
        ];
        for (key, ok, rule) in checks {
            anyhow::ensure!(ok, "[http] {key} must be {rule}");
        }
        Ok(())
    }

    /// The HTTP front's settings, with the connection limit sized from `open_files` unless
    /// it is set.
    pub fn settings(&self, open_files: u64) -> crate::serve::Settings {
        let stall = Duration::from_secs(self.stall_timeout_sec);
        crate::serve::Settings {
            max_connections: self
                .max_connections
                .unwrap_or_else(|| crate::serve::default_max_connections(open_files)),
            timeouts: crate::serve::Timeouts {
                header: Duration::from_secs(self.header_timeout_sec),
                keepalive: Duration::from_secs(self.keepalive_timeout_sec),
                stall,
            },
            limits: crate::serve::RequestLimits {
                max_uri_bytes: self.max_uri_bytes,
                max_header_bytes: self.max_header_bytes,
                max_headers: self.max_headers,
                body_stall: stall,
            },
        }
    }
}

/// The `[snapshots]` section. See docs/SNAPSHOTS.md.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SnapshotsConfig {
    /// Build templates and start new instances from them.
    pub enabled: bool,
    /// Snapshot builds running at once.
    pub build_workers: usize,
    /// Run one invocation with `{"warmup": true}` before a snapshot is taken.
    pub warmup_on_build: bool,
    /// Seconds a snapshot may go unused before it expires.
    pub ttl_sec: u64,
    /// Most resident snapshots per function (versions routed by aliases kept first).
    pub max_snapshots_per_function: usize,
    /// MiB all resident templates may hold together; least recently used evicted first.
    pub memory_budget_mb: u64,
    /// Milliseconds all `before_snapshot` (or all `after_restore`) hooks may take.
    pub hook_timeout_ms: u64,
    /// Also checkpoint templates to disk (needs isolation and CRIU 4), so an evicted
    /// template, or one of a restarted server, comes back from disk instead of cold.
    pub disk: bool,
    /// MiB all checkpoints on disk may take; least recently used deleted first.
    pub disk_quota_mb: u64,
    /// Instances of each version kept started ahead, with the function loaded, as the
    /// template of runtimes that cannot fork (Node.js).
    pub spares: usize,
}

impl Default for SnapshotsConfig {
    fn default() -> Self {
        let engine = SnapshotSettings::default();
        SnapshotsConfig {
            enabled: engine.enabled,
            build_workers: engine.build_workers,
            warmup_on_build: engine.warmup_on_build,
            ttl_sec: engine.ttl.as_secs(),
            max_snapshots_per_function: engine.max_per_function,
            memory_budget_mb: engine.memory_budget >> 20,
            hook_timeout_ms: engine.hook_budget.as_millis() as u64,
            disk: engine.disk,
            disk_quota_mb: engine.disk_quota >> 20,
            spares: engine.spares,
        }
    }
}

impl SnapshotsConfig {
    fn settings(&self) -> SnapshotSettings {
        SnapshotSettings {
            enabled: self.enabled,
            build_workers: self.build_workers.max(1),
            warmup_on_build: self.warmup_on_build,
            ttl: Duration::from_secs(self.ttl_sec),
            max_per_function: self.max_snapshots_per_function.max(1),
            memory_budget: self.memory_budget_mb << 20,
            hook_budget: Duration::from_millis(self.hook_timeout_ms.max(1)),
            disk: self.disk,
            disk_quota: self.disk_quota_mb << 20,
            spares: self.spares.max(1),
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        let data_dir = dirs::data_dir()
            .unwrap_or_else(|| PathBuf::from("."))
            .join("nimbus");
        let engine = EngineConfig::new(data_dir.clone());
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            database_url: String::new(),
            state_url: EMBEDDED_STATE.to_owned(),
            data_dir,
            api_keys: Vec::new(),
            python: None,
            node: None,
            idle_timeout_sec: engine.idle_timeout.as_secs(),
            max_invocations: engine.max_invocations,
            max_age_sec: engine.max_age.as_secs(),
            queue_depth: engine.queue_depth,
            queue_timeout_ms: engine.queue_timeout.as_millis() as u64,
            start_timeout_sec: engine.start_timeout.as_secs(),
            cache_ttl_ms: engine.cache_ttl.as_millis() as u64,
            stale_ttl_ms: engine.stale_ttl.as_millis() as u64,
            store_timeout_ms: nimbus_store::StoreOptions::default().timeout.as_millis() as u64,
            purge_interval_sec: engine.purge_interval.as_secs(),
            shutdown_grace_sec: 30,
            snapshots: SnapshotsConfig::default(),
            http: HttpConfig::default(),
        }
    }
}

impl ServerConfig {
    /// Defaults, then the config file, then flags and environment.
    pub fn load(args: &ServerArgs) -> anyhow::Result<Self> {
        let data_dir_hint = args
            .data_dir
            .clone()
            .unwrap_or_else(|| ServerConfig::default().data_dir);
        let file = args.config.clone().or_else(|| {
            let candidate = data_dir_hint.join("nimbus.toml");
            candidate.exists().then_some(candidate)
        });
        let mut config = match &file {
            Some(path) => Self::from_file(path)?,
            None => ServerConfig::default(),
        };
        if let Some(listen) = args.listen {
            config.listen = listen;
        }
        if let Some(dir) = &args.data_dir {
            config.data_dir = dir.clone();
        }
        if let Some(url) = &args.database_url {
            config.database_url = url.clone();
        }
        if let Some(url) = &args.state_url {
            config.state_url = url.clone();
        }
        if !args.api_keys.is_empty() {
            config.api_keys = args.api_keys.clone();
        }
        if let Some(python) = &args.python {
            config.python = Some(python.clone());
        }
        if let Some(node) = &args.node {
            config.node = Some(node.clone());
        }
        if let Some(idle) = args.idle_timeout {
            config.idle_timeout_sec = idle;
        }
        if args.no_snapshots {
            config.snapshots.enabled = false;
        }
        if let Some(max) = args.max_connections {
            config.http.max_connections = Some(max);
        }
        if let Some(secs) = args.header_timeout {
            config.http.header_timeout_sec = secs;
        }
        if let Some(secs) = args.keepalive_timeout {
            config.http.keepalive_timeout_sec = secs;
        }
        config.http.validate()?;
        // Sandboxes and CRIU resolve paths from elsewhere: a relative data directory would
        // name another place for them.
        config.data_dir = std::path::absolute(&config.data_dir)
            .with_context(|| format!("resolving data directory {}", config.data_dir.display()))?;
        if config.database_url.is_empty() {
            config.database_url = format!("sqlite:{}", config.data_dir.join("nimbus.db").display());
        }
        Ok(config)
    }

    fn from_file(path: &Path) -> anyhow::Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        toml::from_str(&text)
            .with_context(|| format!("invalid configuration in {}", path.display()))
    }

    /// The engine's part of the configuration.
    pub fn engine(&self) -> EngineConfig {
        EngineConfig {
            idle_timeout: Duration::from_secs(self.idle_timeout_sec),
            max_invocations: self.max_invocations,
            max_age: Duration::from_secs(self.max_age_sec),
            queue_depth: self.queue_depth,
            queue_timeout: Duration::from_millis(self.queue_timeout_ms),
            start_timeout: Duration::from_secs(self.start_timeout_sec),
            cache_ttl: Duration::from_millis(self.cache_ttl_ms),
            stale_ttl: Duration::from_millis(self.stale_ttl_ms),
            purge_interval: Duration::from_secs(self.purge_interval_sec.max(1)),
            snapshots: self.snapshots.settings(),
            ..EngineConfig::new(self.data_dir.clone())
        }
    }

    /// How the metadata store is opened.
    pub fn store(&self) -> nimbus_store::StoreOptions {
        nimbus_store::StoreOptions {
            // A check every quarter of it must be possible.
            timeout: Duration::from_millis(self.store_timeout_ms.max(20)),
        }
    }

    /// The configuration as TOML with secrets masked, for the start-up log.
    pub fn redacted(&self) -> String {
        let mut shown = self.clone();
        shown.api_keys = shown
            .api_keys
            .iter()
            .map(|_| "********".to_owned())
            .collect();
        shown.database_url = redact_url(&shown.database_url);
        shown.state_url = redact_url(&shown.state_url);
        toml::to_string(&shown).unwrap_or_default()
    }
}

/// `postgres://user:secret@host/db` → `postgres://user:********@host/db`.
fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let Some((userinfo, host)) = rest.split_once('@') else {
        return url.to_owned();
    };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:********@{host}"),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_masked() {
        assert_eq!(
            redact_url("postgres://u:pw@h:5432/db"),
            "postgres://u:********@h:5432/db"
        );
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact_url("sqlite:/x/nimbus.db"), "sqlite:/x/nimbus.db");
        assert_eq!(
            redact_url("redis://:secret@h:6379/0"),
            "redis://:********@h:6379/0"
        );
    }

    #[test]
    fn file_values_apply_and_flags_win() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nimbus.toml");
        std::fs::write(
            &path,
            "listen = \"127.0.0.1:9000\"\nidle_timeout_sec = 5\nqueue_depth = 7\n\
             stale_ttl_ms = 5000\nstore_timeout_ms = 400\npurge_interval_sec = 7\n\
             [http]\nmax_connections = 40\nheader_timeout_sec = 3\n",
        )
        .unwrap();
        let args = ServerArgs {
            config: Some(path),
            listen: None,
            data_dir: Some(dir.path().to_path_buf()),
            database_url: None,
            state_url: None,
            api_keys: vec![],
            python: None,
            node: None,
            idle_timeout: Some(9),
            example: false,
            insecure_no_isolation: false,
            no_snapshots: false,
            max_connections: None,
            header_timeout: Some(4),
            keepalive_timeout: None,
        };
        let c = ServerConfig::load(&args).unwrap();
        assert_eq!(c.listen.port(), 9000);
        assert_eq!(c.http.max_connections, Some(40));
        assert_eq!(c.http.header_timeout_sec, 4);
        assert_eq!(c.http.keepalive_timeout_sec, 75);
        assert_eq!(c.queue_depth, 7);
        assert_eq!(c.idle_timeout_sec, 9);
        let engine = c.engine();
        assert_eq!(engine.stale_ttl, Duration::from_secs(5));
        assert_eq!(engine.purge_interval, Duration::from_secs(7));
        assert_eq!(c.store().timeout, Duration::from_millis(400));
        assert_eq!(
            c.database_url,
            format!("sqlite:{}", dir.path().join("nimbus.db").display())
        );
        std::fs::write(dir.path().join("bad.toml"), "listn = 1").unwrap();
        let bad = ServerArgs {
            config: Some(dir.path().join("bad.toml")),
            ..args
        };
        let err = format!("{:#}", ServerConfig::load(&bad).unwrap_err());
        assert!(err.contains("listn"), "{err}");
        std::fs::write(dir.path().join("bad.toml"), "[http]\nmax_uri_bytes = 10").unwrap();
        let err = format!("{:#}", ServerConfig::load(&bad).unwrap_err());
        assert!(err.contains("max_uri_bytes must be at least 256"), "{err}");
    }

    #[test]
    fn a_relative_data_directory_is_made_absolute() {
        let args = ServerArgs {
            config: None,
            listen: None,
            data_dir: Some(PathBuf::from("some/data")),
            database_url: None,
            state_url: None,
            api_keys: vec![],
            python: None,
            node: None,
            idle_timeout: None,
            example: false,
            insecure_no_isolation: false,
            no_snapshots: false,
            max_connections: None,
            header_timeout: None,
            keepalive_timeout: None,
        };
        let c = ServerConfig::load(&args).unwrap();
        assert_eq!(
            c.data_dir,
            std::env::current_dir().unwrap().join("some/data")
        );
        assert!(c.database_url.starts_with("sqlite:/"), "{}", c.database_url);
    }
}
