//! Templates in memory: the one a start forks from, and the limits on how many are
//! resident (per function) and how much memory they hold (least recently used evicted
//! first, to their checkpoint when they have one).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use nimbus_core::SnapshotStatus;

use crate::catalog::VersionEntry;

use super::entry::{key_of, Entry, Resident};
use super::shared::{remove_dir, Shared};

/// The template to start a new instance of `version` from, if one is resident.
pub(super) async fn find(shared: &Shared, version: &VersionEntry) -> Option<Arc<Resident>> {
    let key = key_of(version);
    let resident = {
        let entries = shared.entries.lock().expect("snapshots lock");
        let Some(Entry::Ready(resident)) = entries.get(&key) else {
            return None;
        };
        resident.clone()
    };
    if resident.template.alive() {
        *resident.last_used.lock().expect("resident lock") = Instant::now();
        // Its checkpoint is in use too (for the disk tier's TTL and quota).
        if let Some(copy) = resident.disk_copy() {
            *copy.last_used.lock().expect("copy lock") = Instant::now();
        }
        return Some(resident);
    }
    // It ended (killed from outside, or its memory limit).
    ended(
        shared,
        &resident,
        "the template ended (killed, or over its memory limit)",
    )
    .await;
    None
}

/// Drops the entry of a template that ended: the next start restores its checkpoint
/// if it has one; otherwise the snapshot expires (recording `why`) and is rebuilt when
/// the version next starts cold. A template the driver refused fails its snapshot.
pub(super) async fn ended(shared: &Shared, resident: &Arc<Resident>, why: &str) {
    // Refused for what the function's code did to it: the same code would do it again.
    let Some(refusal) = resident.template.refused() else {
        return expire(shared, resident, why).await;
    };
    if !replace(shared, resident, Some(Entry::Failed { retry_at: None })) {
        return;
    }
    if let Some(copy) = resident.disk_copy() {
        remove_dir(&copy.dir);
    }
    let _ = shared
        .store
        .finish_snapshot(
            &resident.snapshot_id,
            SnapshotStatus::Failed,
            Some(&refusal),
            None,
            &[],
            0,
            None,
        )
        .await;
}

/// Replaces the `Ready` entry of `resident` with `next` (removes it for `None`); false
/// if the entry is not `resident`'s any more (evicted, deleted or forgotten meanwhile).
pub(super) fn replace(shared: &Shared, resident: &Arc<Resident>, next: Option<Entry>) -> bool {
    let mut entries = shared.entries.lock().expect("snapshots lock");
    match entries.get(&resident.key) {
        Some(Entry::Ready(r)) if Arc::ptr_eq(r, resident) => {}
        _ => return false,
    }
    match next {
        Some(entry) => entries.insert(resident.key.clone(), entry),
        None => entries.remove(&resident.key),
    };
    true
}

/// Evicts `resident` from memory: to its checkpoint if it has one, otherwise for good
/// (`expired`, recording why).
pub(super) async fn expire(shared: &Shared, resident: &Arc<Resident>, why: &str) {
    let copy = resident.disk_copy();
    if !replace(shared, resident, copy.clone().map(Entry::OnDisk)) {
        return;
    }
    if copy.is_some() {
        tracing::info!(snapshot = %resident.snapshot_id, "template evicted from memory, kept on disk: {why}");
        return;
    }
    tracing::info!(snapshot = %resident.snapshot_id, "snapshot expired: {why}");
    let _ = shared
        .store
        .set_snapshot_status(&resident.snapshot_id, SnapshotStatus::Expired, Some(why))
        .await;
}

/// After `fresh` became resident: at most `max_per_function` of its function (those
/// an alias routes to kept first, then the most recently used), and all within the
/// memory budget (least recently used evicted first, `fresh` last).
pub(super) async fn enforce_limits(shared: &Shared, function_id: &str, fresh: &Arc<Resident>) {
    let routed: HashSet<u32> = match shared.store.list_aliases(function_id).await {
        Ok(aliases) => aliases.iter().flat_map(|a| a.routing.versions()).collect(),
        Err(_) => HashSet::new(),
    };
    let mut own: Vec<Arc<Resident>> = shared
        .residents()
        .into_iter()
        .filter(|r| r.key.0 == function_id)
        .collect();
    own.sort_by_key(|r| {
        (
            !Arc::ptr_eq(r, fresh),
            !routed.contains(&r.key.1),
            std::cmp::Reverse(*r.last_used.lock().expect("resident lock")),
        )
    });
    for extra in own.iter().skip(shared.settings.max_per_function.max(1)) {
        expire(
            shared,
            extra,
            "more snapshots of its function than max_snapshots_per_function",
        )
        .await;
    }
    let mut all = shared.residents();
    all.sort_by_key(|r| {
        (
            Arc::ptr_eq(r, fresh),
            *r.last_used.lock().expect("resident lock"),
        )
    });
    let mut total: u64 = all.iter().map(|r| r.bytes).sum();
    for resident in all {
        if total <= shared.settings.memory_budget || Arc::ptr_eq(&resident, fresh) {
            break;
        }
        total -= resident.bytes;
        expire(
            shared,
            &resident,
            "evicted to keep resident templates within the memory budget",
        )
        .await;
    }
}

/// Whether `version`'s template is resident on this server (nothing else checked).
pub(super) fn is_version_resident(shared: &Shared, version: &VersionEntry) -> bool {
    matches!(
        shared
            .entries
            .lock()
            .expect("snapshots lock")
            .get(&key_of(version)),
        Some(Entry::Ready(_))
    )
}

/// Whether a snapshot's template is resident on this server.
pub(super) fn is_resident(shared: &Shared, snapshot_id: &str) -> bool {
    shared
        .residents()
        .iter()
        .any(|r| r.snapshot_id == snapshot_id)
}
