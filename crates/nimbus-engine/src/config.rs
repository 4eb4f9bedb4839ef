//! Engine settings, with the platform's documented defaults.

use std::path::PathBuf;
use std::time::Duration;

pub use crate::recorder::RetryPolicy;
pub use crate::snapshots::SnapshotSettings;

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
