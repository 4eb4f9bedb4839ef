//! The snapshot admin API of the engine (SPEC §3 Snapshots): list, build on request,
//! delete, stats and cleanup. The manager itself is [`crate::snapshots`].

use std::collections::BTreeMap;

use nimbus_core::{now, Snapshot, SnapshotStatus};
use serde::Serialize;

use crate::error::{EngineError, EngineResult};
use crate::Engine;

/// A snapshot as the API shows it: its index row, and whether this server holds its
/// template in memory.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotView {
    /// The index row.
    #[serde(flatten)]
    pub snapshot: Snapshot,
    /// Its template is resident on this server (new instances fork from it).
    pub resident: bool,
}

/// Totals over every snapshot (`GET /snapshots/stats`).
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotStats {
    /// Indexed snapshots.
    pub total: u64,
    /// Indexed snapshots by status (every status present, zeros included).
    pub by_status: BTreeMap<&'static str, u64>,
    /// Templates resident on this server.
    pub resident_templates: usize,
    /// Memory they hold, bytes.
    pub resident_bytes: u64,
    /// The budget for it, bytes.
    pub memory_budget_bytes: u64,
    /// Snapshot files on disk, bytes.
    pub storage_bytes: u64,
    /// Instances forked from resident templates.
    pub forks: u64,
    /// Mean time of those starts, ms.
    pub avg_fork_ms: f64,
    /// Instances started from checkpoints on disk.
    pub restores: u64,
    /// Mean time of those starts, ms.
    pub avg_restore_ms: f64,
    /// Failures of snapshots (failed builds, corrupt checkpoints), over the snapshots'
    /// lives.
    pub failures: u64,
}

/// What a cleanup removed (or, dry, would remove).
#[derive(Debug, Clone, Serialize)]
pub struct Cleanup {
    /// Nothing was removed.
    pub dry_run: bool,
    /// The snapshots concerned.
    pub removed: Vec<SnapshotView>,
    /// Bytes on disk they held.
    pub freed_bytes: u64,
}

impl Engine {
    fn view(&self, snapshot: Snapshot) -> SnapshotView {
        SnapshotView {
            resident: self.snapshots.is_resident(&snapshot.id),
            snapshot,
        }
    }

    /// A function's snapshots, newest build first.
    pub async fn list_snapshots(&self, reference: &str) -> EngineResult<Vec<SnapshotView>> {
        let function = self.catalog.function(reference).await?;
        let rows = self.store.list_snapshots(Some(&function.id)).await?;
        Ok(rows.into_iter().map(|s| self.view(s)).collect())
    }

    /// Builds the snapshot of a version (the newest when `None`), or joins the build
    /// under way; with `wait`, returns once it has ended (`ready` or `failed`). Returns
    /// whether a build was started or joined (false: it was ready already) and the row.
    pub async fn build_snapshot(
        &self,
        reference: &str,
        version: Option<u32>,
        wait: bool,
    ) -> EngineResult<(bool, SnapshotView)> {
        let function = self.catalog.function(reference).await?;
        let number = match version {
            Some(number) => number,
            None => self
                .store
                .list_versions(&function.id, 1, 0)
                .await?
                .items
                .first()
                .map(|v| v.version)
                .ok_or_else(|| EngineError::NotFound {
                    code: nimbus_core::ErrorCode::VersionNotFound,
                    message: format!("function {:?} has no version", function.name),
                })?,
        };
        let entry = self.catalog.version(&function, number).await?;
        let was_resident = self.snapshots.is_resident_version(&entry);
        let snapshot = self.snapshots.request(&entry, wait).await?;
        Ok((!was_resident, self.view(snapshot)))
    }

    /// Deletes one of a function's snapshots (its template stops once its instances end).
    pub async fn delete_snapshot(&self, reference: &str, snapshot_id: &str) -> EngineResult<()> {
        let function = self.catalog.function(reference).await?;
        let not_found = || EngineError::NotFound {
            code: nimbus_core::ErrorCode::SnapshotNotFound,
            message: format!(
                "function {:?} has no snapshot {}",
                function.name,
                nimbus_core::echo(snapshot_id)
            ),
        };
        let snapshot = self
            .store
            .get_snapshot(snapshot_id)
            .await?
            .filter(|s| s.function_id == function.id)
            .ok_or_else(not_found)?;
        if snapshot.status == SnapshotStatus::Building {
            return Err(EngineError::Conflict {
                code: nimbus_core::ErrorCode::SnapshotBuilding,
                message: format!(
                    "snapshot {} is being built; delete it once the build has ended",
                    nimbus_core::echo(snapshot_id)
                ),
            });
        }
        self.snapshots.drop_snapshot(snapshot_id);
        if !self.store.delete_snapshot(snapshot_id).await? {
            return Err(not_found());
        }
        self.snapshots.refresh_gauges().await;
        Ok(())
    }

    /// Totals over every snapshot.
    pub async fn snapshot_stats(&self) -> EngineResult<SnapshotStats> {
        let all = self.store.list_snapshots(None).await?;
        let mut by_status: BTreeMap<&'static str, u64> = SnapshotStatus::ALL
            .iter()
            .map(|s| (s.as_str(), 0))
            .collect();
        for snapshot in &all {
            *by_status.entry(snapshot.status.as_str()).or_default() += 1;
        }
        let (forks, avg_fork_ms) = weighted_mean(all.iter().map(|s| (s.fork_count, s.avg_fork_ms)));
        let (restores, avg_restore_ms) =
            weighted_mean(all.iter().map(|s| (s.restore_count, s.avg_restore_ms)));
        let (resident_templates, resident_bytes) = self.snapshots.resident_totals();
        Ok(SnapshotStats {
            total: all.len() as u64,
            by_status,
            resident_templates,
            resident_bytes,
            memory_budget_bytes: self.snapshots.settings().memory_budget,
            storage_bytes: all.iter().map(|s| s.size_bytes).sum(),
            forks,
            avg_fork_ms,
            restores,
            avg_restore_ms,
            failures: all.iter().map(|s| s.failure_count).sum(),
        })
    }

    /// Removes the snapshots that serve no more: `failed`, `expired` and `corrupt` ones and
    /// those past their expiry. `dry_run` only reports them.
    pub async fn cleanup_snapshots(&self, dry_run: bool) -> EngineResult<Cleanup> {
        let at = now();
        let stale: Vec<Snapshot> = self
            .store
            .list_snapshots(None)
            .await?
            .into_iter()
            .filter(|s| match s.status {
                SnapshotStatus::Building => false,
                SnapshotStatus::Ready => s.expires_at.is_some_and(|e| e <= at),
                SnapshotStatus::Failed | SnapshotStatus::Expired | SnapshotStatus::Corrupt => true,
            })
            .collect();
        let freed_bytes = stale.iter().map(|s| s.size_bytes).sum();
        let removed: Vec<SnapshotView> = stale.into_iter().map(|s| self.view(s)).collect();
        if !dry_run {
            for view in &removed {
                self.snapshots.drop_snapshot(&view.snapshot.id);
                self.store.delete_snapshot(&view.snapshot.id).await?;
            }
            self.snapshots.refresh_gauges().await;
        }
        Ok(Cleanup {
            dry_run,
            removed,
            freed_bytes,
        })
    }

    /// A version was published: build its snapshot in the background.
    pub(crate) async fn snapshot_published(&self, function_id: &str, version: u32) {
        let Ok(function) = self.catalog.function(function_id).await else {
            return;
        };
        match self.catalog.version(&function, version).await {
            Ok(entry) => self.snapshots.wanted(&entry),
            Err(e) => {
                tracing::warn!(function = %function.name, version, "cannot build the new version's snapshot: {e}")
            }
        }
    }
}

/// The total count and the mean over `(count, mean)` pairs (0 without any).
fn weighted_mean(parts: impl Iterator<Item = (u64, f64)>) -> (u64, f64) {
    let (count, sum) = parts.fold((0u64, 0.0f64), |(n, sum), (count, mean)| {
        (n + count, sum + mean * count as f64)
    });
    (count, if count > 0 { sum / count as f64 } else { 0.0 })
}
