//! The disk tier: templates checkpointed to this server's disk, restored when a start
//! finds the template not in memory, and kept within the disk quota.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use nimbus_core::{now, Snapshot, SnapshotFile, SnapshotStatus, StartType};

use crate::catalog::VersionEntry;
use crate::launcher::ms_since;
use crate::metrics;
use crate::snapshot_files;

use super::build::Stage;
use super::{key_of, remove_dir, Entry, Key, Pending, Resident, Snapshots};

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

impl Snapshots {
    /// The checkpoint to restore `version`'s template from, if it is on disk and not in
    /// memory; the entry is `Restoring` until [`Snapshots::restore`] ends.
    pub(crate) fn take_on_disk(&self, version: &VersionEntry) -> Option<Arc<DiskCopy>> {
        if !self.settings.enabled {
            return None;
        }
        let key = key_of(version);
        let mut entries = self.entries.lock().expect("snapshots lock");
        let Some(Entry::OnDisk(copy)) = entries.get(&key) else {
            return None;
        };
        let copy = copy.clone();
        entries.insert(key, Entry::Restoring(copy.clone(), Pending::new()));
        Some(copy)
    }

    /// Restores `version`'s template from `copy` (taken with [`Snapshots::take_on_disk`]);
    /// it is resident again on success. The files that set up the sandbox (the manifest,
    /// CRIU's images of namespaces, mounts and credentials, the root) are verified before
    /// CRIU reads them, the memory images while it restores (a restored template whose
    /// memory does not verify is dropped unused). A failure marks the snapshot `corrupt`,
    /// deletes its files and schedules a rebuild. Deleted or forgotten meanwhile, the
    /// snapshot stays so; dropped unfinished, the checkpoint is on disk again.
    pub(crate) async fn restore(
        &self,
        version: &Arc<VersionEntry>,
        copy: Arc<DiskCopy>,
    ) -> Option<Arc<Resident>> {
        let started = Instant::now();
        let mut guard = RestoreGuard {
            snapshots: self,
            copy: &copy,
            settled: false,
        };
        let (memory, setup): (Vec<SnapshotFile>, Vec<SnapshotFile>) = copy
            .files
            .iter()
            .cloned()
            .partition(|f| f.name.starts_with("pages-"));
        let dir = copy.dir.clone();
        let checked = tokio::task::spawn_blocking(move || snapshot_files::verify(&dir, &setup))
            .await
            .unwrap_or_else(|e| Err(e.to_string()));
        let outcome = match checked {
            Err(e) => Err(format!("its files do not verify: {e}")),
            Ok(()) => {
                let dir = copy.dir.clone();
                let verify =
                    tokio::task::spawn_blocking(move || snapshot_files::verify(&dir, &memory));
                let (verified, restored) =
                    tokio::join!(verify, self.launcher.restore(version, &copy.dir));
                match (verified.unwrap_or_else(|e| Err(e.to_string())), restored) {
                    (Ok(()), Ok(template)) => {
                        // Its first start is readied (a spare child forked and sandboxed)
                        // while the probes run.
                        if let Err(e) = template.fork_ahead().await {
                            tracing::debug!(snapshot = %copy.snapshot_id, "no spare ahead of the first start: {e}");
                        }
                        self.check_randomness(template, Stage::Restore)
                            .await
                            .map_err(|e| format!("the restored template failed its check: {e}"))
                    }
                    (Err(e), _) => Err(format!("its files do not verify: {e}")),
                    (Ok(()), Err(e)) => Err(format!("the restore failed: {e}")),
                }
            }
        };
        guard.settled = true;
        let failure = match outcome {
            Ok(template) => {
                let resident = Arc::new(Resident {
                    bytes: template.resident_bytes().unwrap_or(0),
                    template: template.into(),
                    snapshot_id: copy.snapshot_id.clone(),
                    key: copy.key.clone(),
                    last_used: Mutex::new(Instant::now()),
                    disk: Mutex::new(Some(copy.clone())),
                });
                *copy.last_used.lock().expect("copy lock") = Instant::now();
                if !self.settle(&copy, Some(Entry::Ready(resident.clone()))) {
                    return None; // deleted meanwhile: the template drops with `resident`
                }
                self.estimates
                    .lock()
                    .expect("estimates lock")
                    .restored(started.elapsed());
                self.enforce_limits(&version.function_id, &resident).await;
                return Some(resident);
            }
            Err(failure) => failure,
        };
        if !self.settle(&copy, None) {
            return None;
        }
        metrics::snapshot_restored("failed", StartType::Snapshot, 0.0);
        tracing::warn!(
            function = %version.function_name,
            version = version.version,
            snapshot = %copy.snapshot_id,
            "snapshot on disk is corrupt, starting cold and rebuilding it: {failure}"
        );
        remove_dir(&copy.dir);
        let _ = self
            .store
            .finish_snapshot(
                &copy.snapshot_id,
                SnapshotStatus::Corrupt,
                Some(&failure),
                None,
                &[],
                0,
                None,
            )
            .await;
        self.enqueue(version, true);
        None
    }

    /// Ends the restore of `copy`: replaces its `Restoring` entry with `next` (removes it for
    /// `None`); false if the entry is not its own any more (deleted or forgotten).
    pub(super) fn settle(&self, copy: &Arc<DiskCopy>, next: Option<Entry>) -> bool {
        let mut entries = self.entries.lock().expect("snapshots lock");
        let pending = match entries.get(&copy.key) {
            Some(Entry::Restoring(c, pending)) if Arc::ptr_eq(c, copy) => pending.clone(),
            _ => return false,
        };
        match next {
            Some(entry) => entries.insert(copy.key.clone(), entry),
            None => entries.remove(&copy.key),
        };
        pending.done.notify_waiters();
        true
    }

    /// Checkpoints `resident` (built as `row`) to disk and records its files; on failure
    /// it stays a memory-only snapshot.
    pub(super) async fn checkpoint(&self, row: &Snapshot, resident: &Arc<Resident>) {
        let dir = self.dir.join(&row.id);
        remove_dir(&dir);
        let started = Instant::now();
        let sealed = match create_private_dir(&self.dir).and_then(|()| std::fs::create_dir(&dir)) {
            Err(e) => Err(format!("{}: {e}", dir.display())),
            Ok(()) => match resident.template.checkpoint(&dir).await {
                Err(e) => Err(e.message),
                Ok(names) => {
                    let (dir, row) = (dir.clone(), row.clone());
                    tokio::task::spawn_blocking(move || snapshot_files::seal(&dir, &row, &names))
                        .await
                        .unwrap_or_else(|e| Err(e.to_string()))
                }
            },
        };
        let files = match sealed {
            Ok(files) => files,
            Err(e) => {
                tracing::warn!(snapshot = %row.id, "cannot checkpoint the template to disk, keeping it in memory only: {e}");
                remove_dir(&dir);
                return;
            }
        };
        let bytes = files.iter().map(|f| f.size).sum();
        let path = dir.display().to_string();
        let recorded = self
            .store
            .finish_snapshot(
                &row.id,
                SnapshotStatus::Ready,
                None,
                Some(&path),
                &files,
                bytes,
                self.expiry(now()),
            )
            .await;
        if !matches!(recorded, Ok(true)) {
            // Deleted meanwhile.
            remove_dir(&dir);
            return;
        }
        tracing::info!(
            snapshot = %row.id,
            ms = ms_since(started).round(),
            mib = bytes >> 20,
            "snapshot checkpointed to disk"
        );
        *resident.disk.lock().expect("resident lock") = Some(Arc::new(DiskCopy {
            snapshot_id: row.id.clone(),
            key: resident.key.clone(),
            dir,
            files,
            bytes,
            last_used: Mutex::new(Instant::now()),
        }));
        self.enforce_disk_quota().await;
    }

    /// Every checkpoint on disk, resident or not.
    pub(super) fn disk_copies(&self) -> Vec<Arc<DiskCopy>> {
        self.entries
            .lock()
            .expect("snapshots lock")
            .values()
            .filter_map(|e| match e {
                Entry::Ready(r) => r.disk_copy(),
                Entry::OnDisk(copy) => Some(copy.clone()),
                _ => None,
            })
            .collect()
    }

    /// Deletes the least recently used checkpoints until all fit in the disk quota.
    pub(super) async fn enforce_disk_quota(&self) {
        let mut copies = self.disk_copies();
        let mut total: u64 = copies.iter().map(|c| c.bytes).sum();
        if total <= self.settings.disk_quota {
            return;
        }
        copies.sort_by_key(|c| *c.last_used.lock().expect("copy lock"));
        for copy in copies {
            if total <= self.settings.disk_quota {
                break;
            }
            total -= copy.bytes;
            self.delete_copy(&copy, "deleted to keep checkpoints within the disk quota")
                .await;
        }
    }

    /// Deletes a checkpoint: its files, its entry if it was only on disk, and the record
    /// of its files (the snapshot expires unless its template is resident).
    pub(super) async fn delete_copy(&self, copy: &Arc<DiskCopy>, why: &str) {
        let resident = {
            let mut entries = self.entries.lock().expect("snapshots lock");
            match entries.get(&copy.key) {
                Some(Entry::OnDisk(c)) if Arc::ptr_eq(c, copy) => {
                    entries.remove(&copy.key);
                    false
                }
                Some(Entry::Ready(r)) => {
                    let mut disk = r.disk.lock().expect("resident lock");
                    if disk.as_ref().is_some_and(|c| Arc::ptr_eq(c, copy)) {
                        *disk = None;
                    }
                    true
                }
                _ => false,
            }
        };
        remove_dir(&copy.dir);
        tracing::info!(snapshot = %copy.snapshot_id, "snapshot files {why}");
        let (status, error) = match resident {
            true => (SnapshotStatus::Ready, None),
            false => (SnapshotStatus::Expired, Some(why)),
        };
        let _ = self
            .store
            .finish_snapshot(
                &copy.snapshot_id,
                status,
                error,
                None,
                &[],
                0,
                self.expiry(now()),
            )
            .await;
    }
}

/// Creates `dir` (and its parents) readable by root only: checkpoints hold the memory of
/// templates, their environment variables included.
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// Puts a checkpoint back on disk if its restore is dropped unfinished (the invocation that
/// asked for it went away), so that it is neither lost nor stuck `Restoring`.
struct RestoreGuard<'a> {
    snapshots: &'a Snapshots,
    copy: &'a Arc<DiskCopy>,
    settled: bool,
}

impl Drop for RestoreGuard<'_> {
    fn drop(&mut self) {
        if !self.settled {
            self.snapshots
                .settle(self.copy, Some(Entry::OnDisk(self.copy.clone())));
        }
    }
}
