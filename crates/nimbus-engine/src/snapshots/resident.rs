//! Templates in memory: the one a start forks from, and the limits on how many are
//! resident (per function) and how much memory they hold (least recently used evicted
//! first, to their checkpoint when they have one).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use nimbus_core::SnapshotStatus;
use nimbus_sandbox::Template;

use crate::catalog::VersionEntry;

use super::{key_of, remove_dir, DiskCopy, Entry, Key, Snapshots};

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

impl Snapshots {
    /// The template to start a new instance of `version` from, if one is resident.
    pub(crate) async fn resident(&self, version: &VersionEntry) -> Option<Arc<Resident>> {
        if !self.settings.enabled {
            return None;
        }
        let key = key_of(version);
        let resident = {
            let entries = self.entries.lock().expect("snapshots lock");
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
        self.ended(
            &resident,
            "the template ended (killed, or over its memory limit)",
        )
        .await;
        None
    }

    /// Drops the entry of a template that ended: the next start restores its checkpoint
    /// if it has one; otherwise the snapshot expires (recording `why`) and is rebuilt when
    /// the version next starts cold. A template the driver refused fails its snapshot.
    pub(super) async fn ended(&self, resident: &Arc<Resident>, why: &str) {
        // Refused for what the function's code did to it: the same code would do it again.
        let Some(refusal) = resident.template.refused() else {
            return self.expire(resident, why).await;
        };
        if !self.replace_resident(resident, Some(Entry::Failed { retry_at: None })) {
            return;
        }
        if let Some(copy) = resident.disk_copy() {
            remove_dir(&copy.dir);
        }
        let _ = self
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
    pub(super) fn replace_resident(&self, resident: &Arc<Resident>, next: Option<Entry>) -> bool {
        let mut entries = self.entries.lock().expect("snapshots lock");
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

    /// Residents, for the lifecycle.
    pub(super) fn residents(&self) -> Vec<Arc<Resident>> {
        self.entries
            .lock()
            .expect("snapshots lock")
            .values()
            .filter_map(|e| match e {
                Entry::Ready(r) => Some(r.clone()),
                _ => None,
            })
            .collect()
    }

    /// Evicts `resident` from memory: to its checkpoint if it has one, otherwise for good
    /// (`expired`, recording why).
    pub(super) async fn expire(&self, resident: &Arc<Resident>, why: &str) {
        let copy = resident.disk_copy();
        if !self.replace_resident(resident, copy.clone().map(Entry::OnDisk)) {
            return;
        }
        if copy.is_some() {
            tracing::info!(snapshot = %resident.snapshot_id, "template evicted from memory, kept on disk: {why}");
            return;
        }
        tracing::info!(snapshot = %resident.snapshot_id, "snapshot expired: {why}");
        let _ = self
            .store
            .set_snapshot_status(&resident.snapshot_id, SnapshotStatus::Expired, Some(why))
            .await;
    }

    /// After `fresh` became resident: at most `max_per_function` of its function (those
    /// an alias routes to kept first, then the most recently used), and all within the
    /// memory budget (least recently used evicted first, `fresh` last).
    pub(super) async fn enforce_limits(&self, function_id: &str, fresh: &Arc<Resident>) {
        let routed: HashSet<u32> = match self.store.list_aliases(function_id).await {
            Ok(aliases) => aliases.iter().flat_map(|a| a.routing.versions()).collect(),
            Err(_) => HashSet::new(),
        };
        let mut own: Vec<Arc<Resident>> = self
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
        for extra in own.iter().skip(self.settings.max_per_function.max(1)) {
            self.expire(
                extra,
                "more snapshots of its function than max_snapshots_per_function",
            )
            .await;
        }
        let mut all = self.residents();
        all.sort_by_key(|r| {
            (
                Arc::ptr_eq(r, fresh),
                *r.last_used.lock().expect("resident lock"),
            )
        });
        let mut total: u64 = all.iter().map(|r| r.bytes).sum();
        for resident in all {
            if total <= self.settings.memory_budget || Arc::ptr_eq(&resident, fresh) {
                break;
            }
            total -= resident.bytes;
            self.expire(
                &resident,
                "evicted to keep resident templates within the memory budget",
            )
            .await;
        }
    }

    /// Whether `version`'s template is resident on this server (nothing else checked).
    pub(crate) fn is_resident_version(&self, version: &VersionEntry) -> bool {
        matches!(
            self.entries
                .lock()
                .expect("snapshots lock")
                .get(&key_of(version)),
            Some(Entry::Ready(_))
        )
    }

    /// Whether a snapshot's template is resident on this server.
    pub(crate) fn is_resident(&self, snapshot_id: &str) -> bool {
        self.residents()
            .iter()
            .any(|r| r.snapshot_id == snapshot_id)
    }

    /// Resident templates and the memory they hold.
    pub(crate) fn resident_totals(&self) -> (usize, u64) {
        let residents = self.residents();
        (residents.len(), residents.iter().map(|r| r.bytes).sum())
    }
}
