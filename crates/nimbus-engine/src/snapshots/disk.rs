//! The disk tier: templates checkpointed to this server's disk, restored when a start
//! finds the template not in memory, and kept within the disk quota.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use nimbus_core::{now, Snapshot, SnapshotFile, SnapshotStatus, StartType};

use crate::catalog::VersionEntry;
use crate::launcher::ms_since;
use crate::metrics;
use crate::snapshot_files;

use super::entry::{key_of, DiskCopy, Entry, Pending, Resident};
use super::randomness::{self, Stage};
use super::shared::{remove_dir, Shared};
use super::{index, resident};

/// How a restore from a checkpoint ended.
pub(super) enum Restored {
    /// The template is resident again.
    Resident(Arc<Resident>),
    /// The checkpoint failed (now `corrupt` and deleted): the snapshot is to be rebuilt.
    Corrupt,
    /// The snapshot was deleted or forgotten meanwhile, and stays so.
    Gone,
}

/// The checkpoint to restore `version`'s template from, if it is on disk and not in
/// memory; the entry is `Restoring` until [`restore`] ends.
pub(super) fn take(shared: &Shared, version: &VersionEntry) -> Option<Arc<DiskCopy>> {
    let key = key_of(version);
    let mut entries = shared.entries.lock().expect("snapshots lock");
    let Some(Entry::OnDisk(copy)) = entries.get(&key) else {
        return None;
    };
    let copy = copy.clone();
    entries.insert(key, Entry::Restoring(copy.clone(), Pending::new()));
    Some(copy)
}

/// Restores `version`'s template from `copy` (taken with [`take`]); it is resident again
/// on success. The files that set up the sandbox (the manifest, CRIU's images of
/// namespaces, mounts and credentials, the root) are verified before CRIU reads them, the
/// memory images while it restores (a restored template whose memory does not verify is
/// dropped unused). A failure marks the snapshot `corrupt` and deletes its files (the
/// caller schedules the rebuild). Deleted or forgotten meanwhile, the snapshot stays so;
/// dropped unfinished, the checkpoint is on disk again.
pub(super) async fn restore(
    shared: &Shared,
    version: &Arc<VersionEntry>,
    copy: Arc<DiskCopy>,
) -> Restored {
    let started = Instant::now();
    let mut guard = RestoreGuard {
        shared,
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
            let verify = tokio::task::spawn_blocking(move || snapshot_files::verify(&dir, &memory));
            let (verified, restored) =
                tokio::join!(verify, shared.launcher.restore(version, &copy.dir));
            match (verified.unwrap_or_else(|e| Err(e.to_string())), restored) {
                (Ok(()), Ok(template)) => {
                    // Its first start is readied (a spare child forked and sandboxed)
                    // while the probes run.
                    if let Err(e) = template.fork_ahead().await {
                        tracing::debug!(snapshot = %copy.snapshot_id, "no spare ahead of the first start: {e}");
                    }
                    randomness::check(&shared.launcher, template, Stage::Restore)
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
            let resident = Arc::new(Resident::new(
                template,
                copy.snapshot_id.clone(),
                copy.key.clone(),
                Some(copy.clone()),
            ));
            *copy.last_used.lock().expect("copy lock") = Instant::now();
            if !settle(shared, &copy, Some(Entry::Ready(resident.clone()))) {
                return Restored::Gone; // deleted meanwhile: the template drops with `resident`
            }
            shared
                .estimates
                .lock()
                .expect("estimates lock")
                .restored(started.elapsed());
            resident::enforce_limits(shared, &version.function_id, &resident).await;
            return Restored::Resident(resident);
        }
        Err(failure) => failure,
    };
    if !settle(shared, &copy, None) {
        return Restored::Gone;
    }
    metrics::snapshot_restored("failed", StartType::Snapshot, 0.0);
    tracing::warn!(
        function = %version.function_name,
        version = version.version,
        snapshot = %copy.snapshot_id,
        "snapshot on disk is corrupt, starting cold and rebuilding it: {failure}"
    );
    remove_dir(&copy.dir);
    let _ = shared
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
    Restored::Corrupt
}

/// Ends the restore of `copy`: replaces its `Restoring` entry with `next` (removes it for
/// `None`); false if the entry is not its own any more (deleted or forgotten).
fn settle(shared: &Shared, copy: &Arc<DiskCopy>, next: Option<Entry>) -> bool {
    let mut entries = shared.entries.lock().expect("snapshots lock");
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
pub(super) async fn checkpoint(shared: &Shared, row: &Snapshot, resident: &Arc<Resident>) {
    let dir = shared.dir.join(&row.id);
    remove_dir(&dir);
    let started = Instant::now();
    let sealed = match create_private_dir(&shared.dir).and_then(|()| std::fs::create_dir(&dir)) {
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
    let recorded = shared
        .store
        .finish_snapshot(
            &row.id,
            SnapshotStatus::Ready,
            None,
            Some(&path),
            &files,
            bytes,
            index::expiry(shared, now()),
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
    enforce_quota(shared).await;
}

/// Deletes the least recently used checkpoints until all fit in the disk quota.
async fn enforce_quota(shared: &Shared) {
    let mut copies = shared.disk_copies();
    let mut total: u64 = copies.iter().map(|c| c.bytes).sum();
    if total <= shared.settings.disk_quota {
        return;
    }
    copies.sort_by_key(|c| *c.last_used.lock().expect("copy lock"));
    for copy in copies {
        if total <= shared.settings.disk_quota {
            break;
        }
        total -= copy.bytes;
        delete(
            shared,
            &copy,
            "deleted to keep checkpoints within the disk quota",
        )
        .await;
    }
}

/// Deletes a checkpoint: its files, its entry if it was only on disk, and the record
/// of its files (the snapshot expires unless its template is resident).
pub(super) async fn delete(shared: &Shared, copy: &Arc<DiskCopy>, why: &str) {
    let resident = {
        let mut entries = shared.entries.lock().expect("snapshots lock");
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
    let _ = shared
        .store
        .finish_snapshot(
            &copy.snapshot_id,
            status,
            error,
            None,
            &[],
            0,
            index::expiry(shared, now()),
        )
        .await;
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
    shared: &'a Shared,
    copy: &'a Arc<DiskCopy>,
    settled: bool,
}

impl Drop for RestoreGuard<'_> {
    fn drop(&mut self) {
        if !self.settled {
            settle(
                self.shared,
                self.copy,
                Some(Entry::OnDisk(self.copy.clone())),
            );
        }
    }
}
