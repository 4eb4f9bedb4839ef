//! Engine settings, with the platform's documented defaults. This module is the bottom of
//! the crate: everything reads its settings from here, and it imports nothing of the crate.

use std::path::PathBuf;
use std::time::Duration;

/// How the engine runs instances and records invocations.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Root of the server's local files (code cache, runtime files).
    pub data_dir: PathBuf,
    /// Idle instances are stopped after this long unused.
    pub idle_timeout: Duration,
    /// An instance is retired after serving this many invocations.
    pub max_invocations: u64,
    /// An instance is retired once this old.
    pub max_age: Duration,
    /// Most invocations of one function waiting for capacity; beyond it, 429 at once.
    pub queue_depth: usize,
    /// Longest wait for capacity before 429.
    pub queue_timeout: Duration,
    /// Longest time a new instance may take to load its handler.
    pub start_timeout: Duration,
    /// How long a cached function or alias may be served before it is re-read
    /// (bounds how stale another server's change can look).
    pub cache_ttl: Duration,
    /// How old cached metadata may be served while the store does not answer (warm
    /// invocations of known functions go on through an outage this long).
    pub stale_ttl: Duration,
    /// How often this server checks for functions deleted elsewhere (dropping their
    /// instances and templates here) and purges state and records written late for
    /// deleted functions.
    pub purge_interval: Duration,
    /// How failed writes of invocation records are retried (they wait in the journal).
    pub record_retry: RetryPolicy,
    /// Largest event or result kept in an invocation record, bytes (larger ones are omitted).
    pub record_payload_limit: usize,
    /// Function-level snapshots.
    pub snapshots: SnapshotSettings,
}

impl EngineConfig {
    /// Defaults rooted at `data_dir`.
    pub fn new(data_dir: PathBuf) -> Self {
        EngineConfig {
            data_dir,
            idle_timeout: Duration::from_secs(300),
            max_invocations: 1000,
            max_age: Duration::from_secs(3600),
            queue_depth: 100,
            queue_timeout: Duration::from_secs(10),
            start_timeout: Duration::from_secs(30),
            cache_ttl: Duration::from_secs(1),
            stale_ttl: Duration::from_secs(600),
            purge_interval: Duration::from_secs(60),
            record_retry: RetryPolicy::default(),
            record_payload_limit: 64 * 1024,
            snapshots: SnapshotSettings::default(),
        }
    }
}

/// Snapshot settings (the `[snapshots]` section of the server configuration).
#[derive(Debug, Clone)]
pub struct SnapshotSettings {
    /// Build and use templates at all.
    pub enabled: bool,
    /// Builds running at once.
    pub build_workers: usize,
    /// Run one invocation with `{"warmup": true}` in the template before it is kept.
    pub warmup_on_build: bool,
    /// A snapshot unused this long expires.
    pub ttl: Duration,
    /// Most resident templates per function.
    pub max_per_function: usize,
    /// Most memory all resident templates may hold, bytes.
    pub memory_budget: u64,
    /// Time all `before_snapshot` (or all `after_restore`) hooks of a function may take.
    pub hook_budget: Duration,
    /// Checkpoint templates to disk where the driver can (CRIU for the process driver).
    pub disk: bool,
    /// Most bytes all checkpoints on disk may take; least recently used deleted first.
    pub disk_quota: u64,
    /// Instances kept started ahead per version for runtimes whose workers cannot fork
    /// (Node.js): their template tier.
    pub spares: usize,
}

impl Default for SnapshotSettings {
    fn default() -> Self {
        SnapshotSettings {
            enabled: true,
            build_workers: 1,
            warmup_on_build: false,
            ttl: Duration::from_secs(7 * 24 * 3600),
            max_per_function: 3,
            memory_budget: 1 << 30,
            hook_budget: Duration::from_secs(1),
            disk: true,
            disk_quota: 10 << 30,
            spares: 2,
        }
    }
}

/// How a failed write is retried: after `first`, then twice as long each time, at most
/// `max` apart, until it succeeds.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// The first wait.
    pub first: Duration,
    /// The longest wait.
    pub max: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            first: Duration::from_millis(100),
            max: Duration::from_secs(2),
        }
    }
}
