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
//! The manager ([`Snapshots`], this module: what the rest of the engine asks of it) is
//! split by concern, each part below the ones that use it: [`build`] (the build queue and
//! its workers), [`disk`] (checkpoints: writing, restoring, the disk quota), [`resident`]
//! (templates in memory, within their count and memory budget), [`randomness`] (the check
//! for shared random state, after a build or a restore) and [`index`] (the snapshot rows of
//! the metadata store), all working on the [`shared`] state: the table of [`entry`]s, one
//! per version's template.

mod build;
mod disk;
mod entry;
mod index;
mod randomness;
mod resident;
mod shared;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nimbus_core::{Snapshot, SnapshotStatus, SnapshotUse, StartType};
use nimbus_store::MetadataStore;

use crate::catalog::VersionEntry;
use crate::config::SnapshotSettings;
use crate::error::{EngineError, EngineResult};
use crate::instance::StartError;
use crate::launcher::Launcher;
use crate::metrics;
use crate::start_estimates::Underway;

use build::Builds;
use disk::Restored;
use entry::{key_of, Entry};
pub(crate) use entry::{DiskCopy, Resident};
use shared::{remove_dir, Shared};

/// The snapshot manager.
pub(crate) struct Snapshots {
    /// What every part works on (the build workers hold it too).
    shared: Arc<Shared>,
    /// The build queue, which the workers serve until it is dropped.
    builds: Builds,
}

impl Snapshots {
    /// The manager, with its build workers running.
    pub(crate) fn start(
        settings: SnapshotSettings,
        store: Arc<dyn MetadataStore>,
        launcher: Arc<Launcher>,
        dir: PathBuf,
    ) -> Arc<Snapshots> {
        let workers = settings.build_workers.max(1);
        let shared = Arc::new(Shared {
            settings,
            store,
            launcher,
            dir,
            entries: Mutex::new(HashMap::new()),
            estimates: Mutex::default(),
        });
        let builds = Builds::start(shared.clone(), workers);
        Arc::new(Snapshots { shared, builds })
    }

    /// The template to start a new instance of `version` from, if one is resident.
    pub(crate) async fn resident(&self, version: &VersionEntry) -> Option<Arc<Resident>> {
        if !self.shared.settings.enabled {
            return None;
        }
        resident::find(&self.shared, version).await
    }

    /// The checkpoint to restore `version`'s template from, if it is on disk and not in
    /// memory; the entry is `Restoring` until [`Snapshots::restore`] ends.
    pub(crate) fn take_on_disk(&self, version: &VersionEntry) -> Option<Arc<DiskCopy>> {
        if !self.shared.settings.enabled {
            return None;
        }
        disk::take(&self.shared, version)
    }

    /// Restores `version`'s template from `copy` (taken with [`Snapshots::take_on_disk`]);
    /// it is resident again on success. A checkpoint that fails (its files do not verify,
    /// the restore or the check for shared random state fails) is marked `corrupt`,
    /// deleted and rebuilt. Deleted or forgotten meanwhile, the snapshot stays so; dropped
    /// unfinished, the checkpoint is on disk again.
    pub(crate) async fn restore(
        &self,
        version: &Arc<VersionEntry>,
        copy: Arc<DiskCopy>,
    ) -> Option<Arc<Resident>> {
        match disk::restore(&self.shared, version, copy).await {
            Restored::Resident(resident) => Some(resident),
            Restored::Corrupt => {
                self.builds.enqueue(version, true);
                None
            }
            Restored::Gone => None,
        }
    }

    /// A start from `resident` (`how`: forked, or restored from disk first) succeeded in
    /// `ms`.
    pub(crate) fn restored(&self, resident: &Arc<Resident>, how: SnapshotUse, ms: f64) {
        index::restored(&self.shared, resident, how, ms);
    }

    /// A version just started cold: build its snapshot unless one exists or failed.
    pub(crate) fn wanted(&self, version: &Arc<VersionEntry>) {
        if self.shared.settings.enabled {
            self.builds.enqueue(version, false);
        }
    }

    /// Builds `version`'s snapshot now (or joins the build under way) and, with `wait`,
    /// returns its row once the build has ended.
    pub(crate) async fn request(
        &self,
        version: &Arc<VersionEntry>,
        wait: bool,
    ) -> EngineResult<Snapshot> {
        if !self.shared.settings.enabled {
            return Err(EngineError::Conflict {
                code: nimbus_core::ErrorCode::SnapshotsDisabled,
                message: "snapshots are disabled on this server ([snapshots] enabled = false)"
                    .into(),
            });
        }
        self.builds.request(version, wait).await
    }

    /// A start of `version` that found no template resident: if the template is being built
    /// or restored and waiting beats a cold start (see [`StartEstimates`]), waits until
    /// that ends (for as long as the estimates allow, at most the start timeout). True if
    /// it waited: the caller looks for the template again.
    pub(crate) async fn wait_pending(&self, version: &VersionEntry) -> bool {
        if !self.shared.settings.enabled {
            return false;
        }
        let key = key_of(version);
        let (pending, underway) = match self
            .shared
            .entries
            .lock()
            .expect("snapshots lock")
            .get(&key)
        {
            Some(Entry::Building(pending)) => (pending.clone(), Underway::Build),
            Some(Entry::Restoring(_, pending)) => (pending.clone(), Underway::Restore),
            _ => return false,
        };
        let patience = self
            .shared
            .estimates
            .lock()
            .expect("estimates lock")
            .wait_for(&key, underway, pending.since.elapsed());
        let Some(patience) = patience else {
            return false;
        };
        let notified = pending.done.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let still = matches!(
            self.shared.entries.lock().expect("snapshots lock").get(&key),
            Some(Entry::Building(p) | Entry::Restoring(_, p)) if Arc::ptr_eq(&p.done, &pending.done)
        );
        if still {
            let patience = patience.min(self.shared.launcher.start_timeout());
            let _ = tokio::time::timeout(patience, notified).await;
        }
        true
    }

    /// A cold start of `version` took `took` (what waiting for its template is weighed
    /// against).
    pub(crate) fn started_cold(&self, version: &VersionEntry, took: Duration) {
        self.shared
            .estimates
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
        resident::ended(
            &self.shared,
            resident,
            &format!("the template ended: {error}"),
        )
        .await;
        if resident.disk_copy().is_none() && resident.template.refused().is_none() {
            self.builds.enqueue(version, true);
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
        if !resident::replace(&self.shared, resident, None) {
            return;
        }
        if let Some(copy) = resident.disk_copy() {
            remove_dir(&copy.dir);
        }
        tracing::warn!(snapshot = %resident.snapshot_id, "the template restored from disk failed at once, rebuilding the snapshot: {error}");
        let _ = self
            .shared
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
        self.builds.enqueue(version, true);
    }

    /// Expires templates and checkpoints unused for the TTL (called periodically).
    pub(crate) async fn sweep(&self) {
        for copy in self.shared.disk_copies() {
            if copy.last_used.lock().expect("copy lock").elapsed() >= self.shared.settings.ttl {
                disk::delete(&self.shared, &copy, "deleted: unused for the snapshot TTL").await;
            }
        }
        for resident in self.shared.residents() {
            let idle = resident.last_used.lock().expect("resident lock").elapsed();
            if idle >= self.shared.settings.ttl {
                resident::expire(&self.shared, &resident, "unused for the snapshot TTL").await;
            }
        }
        index::refresh_gauges(&self.shared).await;
    }

    /// Drops the template and the files of a snapshot (it is being deleted).
    pub(crate) fn drop_snapshot(&self, snapshot_id: &str) {
        self.shared.entries.lock().expect("snapshots lock").retain(|_, e| {
            let gone = matches!(e, Entry::Ready(r) if r.snapshot_id == snapshot_id)
                || matches!(e, Entry::OnDisk(c) | Entry::Restoring(c, _) if c.snapshot_id == snapshot_id);
            if let (true, Entry::Restoring(_, pending)) = (gone, &e) {
                pending.done.notify_waiters();
            }
            !gone
        });
        remove_dir(&self.shared.dir.join(snapshot_id));
    }

    /// Drops the templates and checkpoints of a function (deleted), or of one of its
    /// versions.
    pub(crate) fn forget(&self, function_id: &str, version: Option<u32>) {
        let mut gone = Vec::new();
        self.shared
            .entries
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
        self.shared
            .estimates
            .lock()
            .expect("estimates lock")
            .forget_where(|(f, v, _)| f == function_id && version.is_none_or(|n| n == *v));
        for dir in gone {
            remove_dir(&dir);
        }
    }

    /// Drops every template (server shutdown).
    pub(crate) fn shutdown(&self) {
        self.shared.entries.lock().expect("snapshots lock").clear();
    }

    /// The settings in force.
    pub(crate) fn settings(&self) -> &SnapshotSettings {
        &self.shared.settings
    }

    /// Marks as failed the builds an earlier server left `building` (it stopped during
    /// them) once they are older than any build can take, and takes back the checkpoints
    /// it left on disk.
    pub(crate) async fn recover(&self, older_than: Duration) {
        index::recover(&self.shared, older_than).await;
    }

    /// Recomputes the count and size gauges from the index.
    pub(crate) async fn refresh_gauges(&self) {
        index::refresh_gauges(&self.shared).await;
    }

    /// Whether `version`'s template is resident on this server (nothing else checked).
    pub(crate) fn is_resident_version(&self, version: &VersionEntry) -> bool {
        resident::is_version_resident(&self.shared, version)
    }

    /// Whether a snapshot's template is resident on this server.
    pub(crate) fn is_resident(&self, snapshot_id: &str) -> bool {
        resident::is_resident(&self.shared, snapshot_id)
    }

    /// Resident templates and the memory they hold.
    pub(crate) fn resident_totals(&self) -> (usize, u64) {
        self.shared.resident_totals()
    }
}
