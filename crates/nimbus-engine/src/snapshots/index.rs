//! The snapshot index: the rows of the metadata store that list every snapshot, its
//! status and use, and what an earlier run of this server left there.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nimbus_core::{
    env_vars_hash, now, NewSnapshot, SnapshotKey, SnapshotStatus, SnapshotUse, StartType,
};
use time::OffsetDateTime;

use crate::catalog::VersionEntry;
use crate::metrics;

use super::entry::{DiskCopy, Entry, Resident};
use super::shared::Shared;

/// Marks as failed the builds an earlier server left `building` (it stopped during
/// them) once they are older than any build can take.
pub(super) async fn recover(shared: &Shared, older_than: Duration) {
    let Ok(all) = shared.store.list_snapshots(None).await else {
        return;
    };
    let cutoff = now() - older_than;
    let driver = shared.launcher.driver_name();
    for row in all {
        // Checkpoints this server wrote survive its restarts.
        if let (SnapshotStatus::Ready, Some(path), true) = (
            row.status,
            &row.path,
            shared.settings.disk && row.driver == driver && shared.launcher.can_restore(),
        ) {
            // Only where this server writes them: the path is derived, not trusted.
            let dir = shared.dir.join(&row.id);
            if *path != dir.display().to_string() {
                continue;
            }
            if !dir.is_dir() {
                // Lost (deleted by hand, a data directory restored without it): the
                // version starts cold and rebuilds it.
                let why = format!("its checkpoint directory {} is missing", dir.display());
                tracing::warn!(snapshot = %row.id, "snapshot on disk is corrupt: {why}");
                metrics::snapshot_restored("failed", StartType::Snapshot, 0.0);
                let _ = shared
                    .store
                    .set_snapshot_status(&row.id, SnapshotStatus::Corrupt, Some(&why))
                    .await;
            } else {
                let copy = Arc::new(DiskCopy {
                    snapshot_id: row.id.clone(),
                    key: (row.function_id.clone(), row.version, row.code_hash.clone()),
                    dir,
                    files: row.files.clone(),
                    bytes: row.size_bytes,
                    last_used: Mutex::new(Instant::now()),
                });
                shared
                    .entries
                    .lock()
                    .expect("snapshots lock")
                    .entry(copy.key.clone())
                    .or_insert(Entry::OnDisk(copy));
            }
            continue;
        }
        if row.status == SnapshotStatus::Building && row.created_at < cutoff {
            let _ = shared
                .store
                .set_snapshot_status(
                    &row.id,
                    SnapshotStatus::Failed,
                    Some("abandoned: the server building it stopped"),
                )
                .await;
        }
    }
    refresh_gauges(shared).await;
}

/// The row of `version`'s snapshot, to begin.
pub(super) fn new_snapshot(shared: &Shared, version: &VersionEntry) -> NewSnapshot {
    NewSnapshot {
        key: SnapshotKey {
            function_id: version.function_id.clone(),
            version: version.version,
            code_hash: version.config.code_hash.clone(),
            env_vars_hash: env_vars_hash(&version.config.env_vars),
            driver: shared.launcher.driver_name().to_owned(),
        },
        runtime: version.config.runtime,
        memory_mb: version.config.memory_mb,
    }
}

/// When a snapshot used (or built) at `from` expires, unused.
pub(super) fn expiry(shared: &Shared, from: OffsetDateTime) -> Option<OffsetDateTime> {
    time::Duration::try_from(shared.settings.ttl)
        .ok()
        .and_then(|ttl| from.checked_add(ttl))
}

/// A start from `resident` (`how`: forked, or restored from disk first) succeeded in
/// `ms`.
pub(super) fn restored(shared: &Shared, resident: &Arc<Resident>, how: SnapshotUse, ms: f64) {
    let start_type = match how {
        SnapshotUse::Fork => StartType::Template,
        SnapshotUse::Restore => StartType::Snapshot,
    };
    metrics::snapshot_restored("success", start_type, ms);
    let (store, id) = (shared.store.clone(), resident.snapshot_id.clone());
    let used = now();
    let expires = expiry(shared, used);
    tokio::spawn(async move {
        let _ = store.record_snapshot_use(&id, how, ms, used, expires).await;
    });
}

/// Recomputes the count and size gauges from the index.
pub(super) async fn refresh_gauges(shared: &Shared) {
    let Ok(all) = shared.store.list_snapshots(None).await else {
        return;
    };
    let mut counts: HashMap<SnapshotStatus, u64> = HashMap::new();
    for snapshot in &all {
        *counts.entry(snapshot.status).or_default() += 1;
    }
    let storage: u64 = all.iter().map(|s| s.size_bytes).sum();
    let (_, resident) = shared.resident_totals();
    metrics::snapshot_gauges(&counts, storage, resident);
}
