//! What every part of the snapshot manager works on: its settings, the metadata store,
//! the launcher, where checkpoints go, the table of entries (one per version's template)
//! and the start estimates; with the reads of that table the parts share.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use nimbus_store::MetadataStore;

use crate::config::SnapshotSettings;
use crate::launcher::Launcher;
use crate::start_estimates::StartEstimates;

use super::entry::{DiskCopy, Entry, Key, Resident};

/// The snapshot manager's state, shared by its parts (and by its build workers).
pub(super) struct Shared {
    pub(super) settings: SnapshotSettings,
    pub(super) store: Arc<dyn MetadataStore>,
    pub(super) launcher: Arc<Launcher>,
    /// Where checkpoints go: `<data_dir>/snapshots/<snapshot id>/`.
    pub(super) dir: PathBuf,
    pub(super) entries: Mutex<HashMap<Key, Entry>>,
    /// How long restores, builds and cold starts take here.
    pub(super) estimates: Mutex<StartEstimates<Key>>,
}

impl Shared {
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

    /// Resident templates and the memory they hold.
    pub(super) fn resident_totals(&self) -> (usize, u64) {
        let residents = self.residents();
        (residents.len(), residents.iter().map(|r| r.bytes).sum())
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
}

/// Removes a snapshot directory, if there is one.
pub(super) fn remove_dir(dir: &Path) {
    if let Err(e) = std::fs::remove_dir_all(dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!("removing {}: {e}", dir.display());
        }
    }
}
