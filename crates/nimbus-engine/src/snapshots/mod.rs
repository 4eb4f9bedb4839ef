//! Function-level snapshots (SPEC §6): per function version, a template (an initialized
//! worker that new instances are started from), built in the background, indexed in the
//! metadata store, and kept within the configured lifecycle.
//!
//! - Builds: on publish, on request (`POST …/snapshots`) and when a version without one
//!   starts cold; a queue served by `build_workers` tasks, de-duplicated per version (here
//!   by the in-memory entry, across servers by the store's one row per key).
//! - Use: [`Snapshots::resident`] gives the starter the template to fork from
//!   ([`Snapshots::take_on_disk`] and [`Snapshots::restore`] the checkpoint to restore it
//!   from); a failed start marks the snapshot `corrupt`, drops the template and schedules a
//!   rebuild, and the starter falls back to a cold start, so the invocation still succeeds.
//! - Lifecycle: unused for `ttl` → `expired`; at most `max_per_function` resident per
//!   function (versions routed by an alias kept first, so a rollback stays warm); the
//!   resident templates' memory within `memory_budget`, least recently used evicted first.
//!   An evicted template whose instances still run stays alive until they end (they live
//!   in its pid namespace), but starts nothing more.
//!
//! The manager ([`Snapshots`]) is split by concern: [`build`] (the build queue and its
//! workers), [`resident`] (templates in memory, within their count and memory budget),
//! [`disk`] (checkpoints: writing, restoring, the disk quota) and [`index`] (the snapshot
//! rows of the metadata store); this module ties them together and answers the starter.

mod build;
mod disk;
mod index;
mod resident;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nimbus_core::{SnapshotStatus, StartType};
use nimbus_store::MetadataStore;
use tokio::sync::{mpsc, Notify};

use crate::catalog::VersionEntry;
use crate::config::SnapshotSettings;
use crate::instance::StartError;
use crate::launcher::Launcher;
use crate::metrics;
use crate::start_estimates::{StartEstimates, Underway};

use build::Job;
pub(crate) use disk::DiskCopy;
pub(crate) use resident::Resident;

/// What identifies a template here: a version's code can only change with its number,
/// but the hash keeps even a reused number from ever meeting old code.
type Key = (String, u32, String);

fn key_of(version: &VersionEntry) -> Key {
    (
        version.function_id.clone(),
        version.version,
        version.config.code_hash.clone(),
    )
}

/// What this server has of one version's template.
enum Entry {
    /// Queued or being built.
    Building(Pending),
    /// Resident in memory (and maybe checkpointed on disk too).
    Ready(Arc<Resident>),
    /// Not in memory, but checkpointed on disk: the next start restores it.
    OnDisk(Arc<DiskCopy>),
    /// A restore from this checkpoint is under way (other starts meanwhile wait for it, or
    /// go cold when that is faster: see [`Snapshots::wait_pending`]).
    Restoring(Arc<DiskCopy>, Pending),
    /// The last build failed. The function's own failures (its init or hooks raised) are
    /// not retried by themselves, since the same code fails the same way, only on request;
    /// the platform's (a timeout under load, a cgroup error) are, on a start after
    /// `retry_at`.
    Failed { retry_at: Option<Instant> },
}

/// A build or restore under way: since when, and what wakes those waiting for its end.
#[derive(Clone)]
struct Pending {
    done: Arc<Notify>,
    since: Instant,
}

impl Pending {
    fn new() -> Self {
        Pending {
            done: Arc::new(Notify::new()),
            since: Instant::now(),
        }
    }
}

/// The snapshot manager.
pub(crate) struct Snapshots {
    settings: SnapshotSettings,
    store: Arc<dyn MetadataStore>,
    launcher: Arc<Launcher>,
    /// Where checkpoints go: `<data_dir>/snapshots/<snapshot id>/`.
    dir: PathBuf,
    entries: Mutex<HashMap<Key, Entry>>,
    queue: mpsc::UnboundedSender<Job>,
    /// How long restores, builds and cold starts take here.
    estimates: Mutex<StartEstimates<Key>>,
}

impl Snapshots {
    /// The manager, with its build workers running.
    pub(crate) fn start(
        settings: SnapshotSettings,
        store: Arc<dyn MetadataStore>,
        launcher: Arc<Launcher>,
        dir: PathBuf,
    ) -> Arc<Snapshots> {
        let (queue, jobs) = mpsc::unbounded_channel::<Job>();
        let workers = settings.build_workers.max(1);
        let snapshots = Arc::new(Snapshots {
            settings,
            store,
            launcher,
            dir,
            entries: Mutex::default(),
            queue,
            estimates: Mutex::default(),
        });
        build::serve(&snapshots, jobs, workers);
        snapshots
    }

    /// A start of `version` that found no template resident: if the template is being built
    /// or restored and waiting beats a cold start (see [`StartEstimates`]), waits until
    /// that ends (for as long as the estimates allow, at most the start timeout). True if
    /// it waited: the caller looks for the template again.
    pub(crate) async fn wait_pending(&self, version: &VersionEntry) -> bool {
        if !self.settings.enabled {
            return false;
        }
        let key = key_of(version);
        let (pending, underway) = match self.entries.lock().expect("snapshots lock").get(&key) {
            Some(Entry::Building(pending)) => (pending.clone(), Underway::Build),
            Some(Entry::Restoring(_, pending)) => (pending.clone(), Underway::Restore),
            _ => return false,
        };
        let patience = self.estimates.lock().expect("estimates lock").wait_for(
            &key,
            underway,
            pending.since.elapsed(),
        );
        let Some(patience) = patience else {
            return false;
        };
        let notified = pending.done.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let still = matches!(
            self.entries.lock().expect("snapshots lock").get(&key),
            Some(Entry::Building(p) | Entry::Restoring(_, p)) if Arc::ptr_eq(&p.done, &pending.done)
        );
        if still {
            let patience = patience.min(self.launcher.start_timeout());
            let _ = tokio::time::timeout(patience, notified).await;
        }
        true
    }

    /// A cold start of `version` took `took` (what waiting for its template is weighed
    /// against).
    pub(crate) fn started_cold(&self, version: &VersionEntry, took: Duration) {
        self.estimates
            .lock()
            .expect("estimates lock")
            .started_cold(&key_of(version), took);
    }

    /// A start from `resident` failed for the platform's reasons; the caller starts cold.
    /// If the template itself has ended (or broke), it is dropped: restored from its
    /// checkpoint next time, or rebuilt.
    pub(crate) async fn restore_failed(
        &self,
        version: &Arc<VersionEntry>,
        resident: &Arc<Resident>,
        error: &StartError,
    ) {
        metrics::snapshot_restored("failed", StartType::Template, 0.0);
        if resident.template.alive() {
            // A passing failure (the template could not fork just now): this start goes
            // cold, the template stays.
            tracing::warn!(
                function = %version.function_name,
                version = version.version,
                snapshot = %resident.snapshot_id,
                "start from the template failed, starting cold: {error}"
            );
            return;
        }
        let next = match resident.template.refused() {
            Some(_) => "refused (the snapshot fails; not rebuilt)",
            None if resident.disk_copy().is_some() => "ended (restored from disk next time)",
            None => "ended (rebuilt)",
        };
        tracing::warn!(
            function = %version.function_name,
            version = version.version,
            snapshot = %resident.snapshot_id,
            "starting cold; the template {next}: {error}"
        );
        self.ended(resident, &format!("the template ended: {error}"))
            .await;
        if resident.disk_copy().is_none() && resident.template.refused().is_none() {
            self.enqueue(version, true);
        }
    }

    /// A template just restored from `copy` failed its first start for the platform's
    /// reasons: its checkpoint is not to be trusted (restoring it again would fail again),
    /// so it is `corrupt`, deleted and rebuilt, unless the template was refused for what
    /// the function's code did.
    pub(crate) async fn restored_template_failed(
        &self,
        version: &Arc<VersionEntry>,
        resident: &Arc<Resident>,
        error: &StartError,
    ) {
        if resident.template.alive() || resident.template.refused().is_some() {
            return self.restore_failed(version, resident, error).await;
        }
        metrics::snapshot_restored("failed", StartType::Snapshot, 0.0);
        if !self.replace_resident(resident, None) {
            return;
        }
        if let Some(copy) = resident.disk_copy() {
            remove_dir(&copy.dir);
        }
        tracing::warn!(snapshot = %resident.snapshot_id, "the template restored from disk failed at once, rebuilding the snapshot: {error}");
        let _ = self
            .store
            .finish_snapshot(
                &resident.snapshot_id,
                SnapshotStatus::Corrupt,
                Some(&format!("its restored template failed: {error}")),
                None,
                &[],
                0,
                None,
            )
            .await;
        self.enqueue(version, true);
    }

    /// Expires templates and checkpoints unused for the TTL (called periodically).
    pub(crate) async fn sweep(&self) {
        for copy in self.disk_copies() {
            if copy.last_used.lock().expect("copy lock").elapsed() >= self.settings.ttl {
                self.delete_copy(&copy, "deleted: unused for the snapshot TTL")
                    .await;
            }
        }
        for resident in self.residents() {
            let idle = resident.last_used.lock().expect("resident lock").elapsed();
            if idle >= self.settings.ttl {
                self.expire(&resident, "unused for the snapshot TTL").await;
            }
        }
        self.refresh_gauges().await;
    }

    /// Drops the template and the files of a snapshot (it is being deleted).
    pub(crate) fn drop_snapshot(&self, snapshot_id: &str) {
        self.entries.lock().expect("snapshots lock").retain(|_, e| {
            let gone = matches!(e, Entry::Ready(r) if r.snapshot_id == snapshot_id)
                || matches!(e, Entry::OnDisk(c) | Entry::Restoring(c, _) if c.snapshot_id == snapshot_id);
            if let (true, Entry::Restoring(_, pending)) = (gone, &e) {
                pending.done.notify_waiters();
            }
            !gone
        });
        remove_dir(&self.dir.join(snapshot_id));
    }

    /// Drops the templates and checkpoints of a function (deleted), or of one of its
    /// versions.
    pub(crate) fn forget(&self, function_id: &str, version: Option<u32>) {
        let mut gone = Vec::new();
        self.entries
            .lock()
            .expect("snapshots lock")
            .retain(|(f, v, _), e| {
                let keep = !(f == function_id && version.is_none_or(|n| n == *v));
                if !keep {
                    match e {
                        Entry::Ready(r) => gone.extend(r.disk_copy().map(|c| c.dir.clone())),
                        Entry::OnDisk(c) => gone.push(c.dir.clone()),
                        Entry::Restoring(c, pending) => {
                            gone.push(c.dir.clone());
                            pending.done.notify_waiters();
                        }
                        _ => {}
                    }
                }
                keep
            });
        self.estimates
            .lock()
            .expect("estimates lock")
            .forget_where(|(f, v, _)| f == function_id && version.is_none_or(|n| n == *v));
        for dir in gone {
            remove_dir(&dir);
        }
    }

    /// Drops every template (server shutdown).
    pub(crate) fn shutdown(&self) {
        self.entries.lock().expect("snapshots lock").clear();
    }

    /// The settings in force.
    pub(crate) fn settings(&self) -> &SnapshotSettings {
        &self.settings
    }
}

/// Removes a snapshot directory, if there is one.
fn remove_dir(dir: &Path) {
    if let Err(e) = std::fs::remove_dir_all(dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!("removing {}: {e}", dir.display());
        }
    }
}
