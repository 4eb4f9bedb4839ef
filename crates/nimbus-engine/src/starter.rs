//! Starting one instance of a version: the one place that knows the tiers.
//!
//! In order: a fork of the version's resident template (`template`; Node.js versions take
//! one of their spares the same way); a restore of its checkpoint from disk, then a fork
//! (`snapshot`); a wait for the template being built or restored, when that is faster than
//! a cold start (see [`crate::start_estimates`]), then a look again; else a new worker
//! loads the code (`cold`) and the version's snapshot is queued for building. A template
//! that fails for the platform's reasons is dropped (or marked corrupt) by the snapshot
//! manager and the start falls back to cold, so the invocation still runs; a failure of
//! the user's after-restore hook is the instance's own, and ends the start.

use std::sync::Arc;
use std::time::Instant;

use nimbus_core::{SnapshotUse, StartType};

use crate::catalog::VersionEntry;
use crate::instance::{Instance, StartError, StartFailure};
use crate::launcher::{ms_since, Launcher};
use crate::snapshots::Snapshots;

/// Starts instances of versions, from the fastest tier that has one.
pub(crate) struct Starter {
    launcher: Arc<Launcher>,
    snapshots: Arc<Snapshots>,
}

impl Starter {
    /// Starts instances through `launcher`, from the templates of `snapshots` when there
    /// are some.
    pub(crate) fn new(launcher: Arc<Launcher>, snapshots: Arc<Snapshots>) -> Self {
        Starter {
            launcher,
            snapshots,
        }
    }

    /// Starts a new instance of `version` (see the module's documentation); the start type
    /// says which tier it came from. A failure says which tier it was being started from.
    pub(crate) async fn start(
        &self,
        version: &Arc<VersionEntry>,
    ) -> Result<(Instance, StartType), StartFailure> {
        let failed = |error, start_type| StartFailure { error, start_type };
        let mut waited = false;
        loop {
            if let Some(resident) = self.snapshots.resident(version).await {
                let started = Instant::now();
                match self.launcher.fork(version, &resident.template).await {
                    Ok(instance) => {
                        let ms = ms_since(started);
                        self.snapshots.restored(&resident, SnapshotUse::Fork, ms);
                        return Ok((instance, StartType::Template));
                    }
                    // The user's after-restore hook failed: the instance's failure, not the
                    // template's.
                    Err(e @ StartError::Init { .. }) => return Err(failed(e, StartType::Template)),
                    Err(e) => self.snapshots.restore_failed(version, &resident, &e).await,
                }
            } else if let Some(copy) = self.snapshots.take_on_disk(version) {
                // From disk: the template comes back, then this instance forks from it.
                let started = Instant::now();
                if let Some(resident) = self.snapshots.restore(version, copy).await {
                    match self.launcher.fork(version, &resident.template).await {
                        Ok(instance) => {
                            let ms = ms_since(started);
                            self.snapshots.restored(&resident, SnapshotUse::Restore, ms);
                            return Ok((instance, StartType::Snapshot));
                        }
                        Err(e @ StartError::Init { .. }) => {
                            return Err(failed(e, StartType::Snapshot))
                        }
                        Err(e) => {
                            self.snapshots
                                .restored_template_failed(version, &resident, &e)
                                .await
                        }
                    }
                }
            } else if !waited && self.snapshots.wait_pending(version).await {
                waited = true;
                continue;
            } else {
                self.snapshots.wanted(version);
            }
            break;
        }
        let started = Instant::now();
        match self.launcher.cold(version).await {
            Ok(instance) => {
                self.snapshots.started_cold(version, started.elapsed());
                Ok((instance, StartType::Cold))
            }
            Err(e) => Err(failed(e, StartType::Cold)),
        }
    }

    /// Starts a new instance of `version` from scratch, outside any pool, as the
    /// deploy-time check that its code loads (see [`Launcher::deploy_check`] for
    /// `new_code`).
    pub(crate) async fn deploy_check(
        &self,
        version: &Arc<VersionEntry>,
        new_code: bool,
    ) -> Result<Instance, StartError> {
        let started = Instant::now();
        let instance = self.launcher.deploy_check(version, new_code).await?;
        self.snapshots.started_cold(version, started.elapsed());
        Ok(instance)
    }
}
