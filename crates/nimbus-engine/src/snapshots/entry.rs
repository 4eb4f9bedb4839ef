//! What the manager holds of each version's template: its key, the entry saying which
//! tier it is in, and the resident template and on-disk checkpoint those entries hold.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use nimbus_core::SnapshotFile;
use nimbus_sandbox::Template;
use tokio::sync::Notify;

use crate::catalog::VersionEntry;

/// What identifies a template here: a version's code can only change with its number,
/// but the hash keeps even a reused number from ever meeting old code.
pub(super) type Key = (String, u32, String);

/// The key of `version`'s template.
pub(super) fn key_of(version: &VersionEntry) -> Key {
    (
        version.function_id.clone(),
        version.version,
        version.config.code_hash.clone(),
    )
}

/// What this server has of one version's template.
pub(super) enum Entry {
    /// Queued or being built.
    Building(Pending),
    /// Resident in memory (and maybe checkpointed on disk too).
    Ready(Arc<Resident>),
    /// Not in memory, but checkpointed on disk: the next start restores it.
    OnDisk(Arc<DiskCopy>),
    /// A restore from this checkpoint is under way (other starts meanwhile wait for it, or
    /// go cold when that is faster: see `Snapshots::wait_pending`).
    Restoring(Arc<DiskCopy>, Pending),
    /// The last build failed. The function's own failures (its init or hooks raised) are
    /// not retried by themselves, since the same code fails the same way, only on request;
    /// the platform's (a timeout under load, a cgroup error) are, on a start after
    /// `retry_at`.
    Failed { retry_at: Option<Instant> },
}

/// A build or restore under way: since when, and what wakes those waiting for its end.
#[derive(Clone)]
pub(super) struct Pending {
    pub(super) done: Arc<Notify>,
    pub(super) since: Instant,
}

impl Pending {
    /// One starting now.
    pub(super) fn new() -> Self {
        Pending {
            done: Arc::new(Notify::new()),
            since: Instant::now(),
        }
    }
}

/// A template kept in memory.
pub(crate) struct Resident {
    /// The driver's template (shared with the instances forked from it, which live in it).
    pub(crate) template: Arc<dyn Template>,
    /// Its row in the index.
    pub(crate) snapshot_id: String,
    pub(super) key: Key,
    pub(super) bytes: u64,
    pub(super) last_used: Mutex<Instant>,
    /// Its checkpoint on disk, once written.
    pub(super) disk: Mutex<Option<Arc<DiskCopy>>>,
}

impl Resident {
    /// A template just started (built, or restored from `disk`), used now.
    pub(super) fn new(
        template: Box<dyn Template>,
        snapshot_id: String,
        key: Key,
        disk: Option<Arc<DiskCopy>>,
    ) -> Self {
        Resident {
            bytes: template.resident_bytes().unwrap_or(0),
            template: template.into(),
            snapshot_id,
            key,
            last_used: Mutex::new(Instant::now()),
            disk: Mutex::new(disk),
        }
    }

    /// Its checkpoint on disk, if written (and not deleted since).
    pub(super) fn disk_copy(&self) -> Option<Arc<DiskCopy>> {
        self.disk.lock().expect("resident lock").clone()
    }
}

impl std::fmt::Debug for Resident {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resident")
            .field("snapshot_id", &self.snapshot_id)
            .field("bytes", &self.bytes)
            .finish_non_exhaustive()
    }
}

/// A template's checkpoint on this server's disk.
pub(crate) struct DiskCopy {
    pub(super) snapshot_id: String,
    pub(super) key: Key,
    pub(super) dir: PathBuf,
    /// As sealed, and as the index lists them.
    pub(super) files: Vec<SnapshotFile>,
    pub(super) bytes: u64,
    pub(super) last_used: Mutex<Instant>,
}
