//! The build queue: builds asked for (on publish, on request, after a cold start), served
//! by `build_workers` tasks, each one starting a template, checking it for shared random
//! state, and checkpointing it to disk.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nimbus_core::{now, Snapshot, SnapshotStatus};
use nimbus_runtime::protocol::ErrorPayload;
use nimbus_sandbox::Template;
use tokio::sync::{mpsc, Notify};

use crate::catalog::VersionEntry;
use crate::error::{EngineError, EngineResult};
use crate::instance::StartError;
use crate::launcher::ms_since;
use crate::metrics;
use crate::spares::Spares;

use super::{key_of, remove_dir, Entry, Key, Pending, Resident, Snapshots};

/// How long a build that failed for the platform's reasons waits before the next try.
const BUILD_RETRY: Duration = Duration::from_secs(60);

pub(super) struct Job {
    pub(super) version: Arc<VersionEntry>,
    pub(super) done: Arc<Notify>,
}

/// Runs `workers` build workers taking jobs off `jobs`, until the queue or the manager
/// is gone.
pub(super) fn serve(
    snapshots: &Arc<Snapshots>,
    jobs: mpsc::UnboundedReceiver<Job>,
    workers: usize,
) {
    let jobs = Arc::new(tokio::sync::Mutex::new(jobs));
    for _ in 0..workers {
        let weak = Arc::downgrade(snapshots);
        let jobs = jobs.clone();
        tokio::spawn(async move {
            loop {
                let Some(job) = jobs.lock().await.recv().await else {
                    break;
                };
                let Some(snapshots) = weak.upgrade() else {
                    break;
                };
                snapshots.build(&job.version, &job.done).await;
                job.done.notify_waiters();
            }
        });
    }
}

impl Snapshots {
    /// A version just started cold: build its snapshot unless one exists or failed.
    pub(crate) fn wanted(&self, version: &Arc<VersionEntry>) {
        if self.settings.enabled {
            self.enqueue(version, false);
        }
    }

    /// Queues a build of `version`'s snapshot (`retry`: also after a failed one); returns
    /// what to wait on, or `None` if its template is resident already.
    pub(super) fn enqueue(&self, version: &Arc<VersionEntry>, retry: bool) -> Option<Arc<Notify>> {
        let key = key_of(version);
        let mut entries = self.entries.lock().expect("snapshots lock");
        match entries.get(&key) {
            Some(Entry::Building(pending)) => return Some(pending.done.clone()),
            Some(Entry::Ready(_) | Entry::OnDisk(_) | Entry::Restoring(..)) => return None,
            Some(Entry::Failed { retry_at })
                if !retry && retry_at.is_none_or(|t| t > Instant::now()) =>
            {
                return None
            }
            _ => {}
        }
        let pending = Pending::new();
        let done = pending.done.clone();
        entries.insert(key, Entry::Building(pending));
        drop(entries);
        let job = Job {
            version: version.clone(),
            done: done.clone(),
        };
        if self.queue.send(job).is_err() {
            // Shutting down: nothing will build it.
            self.entries
                .lock()
                .expect("snapshots lock")
                .remove(&key_of(version));
        }
        Some(done)
    }

    /// Builds `version`'s snapshot now (or joins the build under way) and, with `wait`,
    /// returns its row once the build has ended.
    pub(crate) async fn request(
        &self,
        version: &Arc<VersionEntry>,
        wait: bool,
    ) -> EngineResult<Snapshot> {
        if !self.settings.enabled {
            return Err(EngineError::Conflict {
                code: nimbus_core::ErrorCode::SnapshotsDisabled,
                message: "snapshots are disabled on this server ([snapshots] enabled = false)"
                    .into(),
            });
        }
        let new = self.new_snapshot(version);
        let done = self.enqueue(version, true);
        if done.is_some() {
            // The row exists (`building`) before the answer, however long the queue.
            self.store.begin_snapshot(&new).await?;
        }
        if let (true, Some(done)) = (wait, done) {
            let notified = done.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let building = matches!(
                self.entries
                    .lock()
                    .expect("snapshots lock")
                    .get(&key_of(version)),
                Some(Entry::Building(_))
            );
            if building {
                notified.await;
            }
        }
        self.store
            .find_snapshot(&new.key)
            .await?
            .ok_or_else(|| EngineError::Internal("the snapshot's row disappeared".into()))
    }

    /// One build: claims the row, starts the template, records the outcome.
    pub(super) async fn build(&self, version: &Arc<VersionEntry>, done: &Arc<Notify>) {
        let key = key_of(version);
        let started = Instant::now();
        // Starts that wait for it weigh what is left of the build, not of its queueing.
        if let Some(Entry::Building(pending)) =
            self.entries.lock().expect("snapshots lock").get_mut(&key)
        {
            if Arc::ptr_eq(&pending.done, done) {
                pending.since = started;
            }
        }
        let new = self.new_snapshot(version);
        let row = match self.store.begin_snapshot(&new).await {
            Ok((row, true)) => row,
            // The index says ready or building (an earlier run of this server, or another
            // server): this server has no template of it, so it builds its own.
            Ok((row, false)) => {
                let _ = self
                    .store
                    .set_snapshot_status(&row.id, SnapshotStatus::Building, None)
                    .await;
                row
            }
            Err(e) => {
                tracing::warn!(function = %version.function_name, version = version.version, "cannot index the snapshot: {e}");
                self.entries.lock().expect("snapshots lock").remove(&key);
                return;
            }
        };
        let outcome = match self.start_template(version).await {
            Ok(template) => self.check_randomness(template, Stage::Build).await,
            Err(e) => Err(e),
        };
        let seconds = started.elapsed().as_secs_f64();
        match outcome {
            Ok(template) => {
                let resident = Arc::new(Resident {
                    bytes: template.resident_bytes().unwrap_or(0),
                    template: template.into(),
                    snapshot_id: row.id.clone(),
                    key: key.clone(),
                    last_used: Mutex::new(Instant::now()),
                    disk: Mutex::new(None),
                });
                let expires = self.expiry(now());
                let _ = self
                    .store
                    .finish_snapshot(&row.id, SnapshotStatus::Ready, None, None, &[], 0, expires)
                    .await;
                metrics::snapshot_built("success", seconds);
                tracing::info!(
                    function = %version.function_name,
                    version = version.version,
                    snapshot = %row.id,
                    ms = (seconds * 1000.0).round(),
                    resident_mib = resident.bytes >> 20,
                    "snapshot ready"
                );
                // Checkpointed before it forks anything (see the runtime's template mode),
                // then readied for its first start; neither may hold a build worker for
                // longer than a start may take (the template then counts as broken).
                let limit = self.launcher.start_timeout();
                if self.settings.disk && self.launcher.can_checkpoint(version) {
                    let checkpoint = self.checkpoint(&row, &resident);
                    if tokio::time::timeout(limit, checkpoint).await.is_err() {
                        tracing::warn!(snapshot = %row.id, "checkpointing the template timed out");
                        remove_dir(&self.dir.join(&row.id));
                    }
                }
                match tokio::time::timeout(limit, resident.template.fork_ahead()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        tracing::debug!(snapshot = %row.id, "no spare ahead of the first start: {e}")
                    }
                    Err(_) => {
                        tracing::warn!(snapshot = %row.id, "the template did not fork a spare in time")
                    }
                }
                self.estimates
                    .lock()
                    .expect("estimates lock")
                    .built(&key, started.elapsed());
                if !self.finish_build(&key, done, Entry::Ready(resident.clone())) {
                    // Forgotten meanwhile (its version or function deleted).
                    if let Some(copy) = resident.disk_copy() {
                        remove_dir(&copy.dir);
                    }
                    return;
                }
                self.enforce_limits(&version.function_id, &resident).await;
            }
            Err(e) => {
                let message = build_error(&e);
                let _ = self
                    .store
                    .finish_snapshot(
                        &row.id,
                        SnapshotStatus::Failed,
                        Some(&message),
                        None,
                        &[],
                        0,
                        None,
                    )
                    .await;
                metrics::snapshot_built("failed", seconds);
                tracing::warn!(function = %version.function_name, version = version.version, "snapshot build failed: {message}");
                let retry_at = match e {
                    StartError::Init { .. } => None,
                    _ => Some(Instant::now() + BUILD_RETRY),
                };
                self.finish_build(&key, done, Entry::Failed { retry_at });
            }
        }
        self.refresh_gauges().await;
    }

    /// Starts a template of `version`: the driver's, or for a runtime whose workers
    /// cannot fork, [`Spares`] of the version.
    async fn start_template(
        &self,
        version: &Arc<VersionEntry>,
    ) -> Result<Box<dyn Template>, StartError> {
        if version.config.runtime.forks_templates() {
            return self.launcher.template(version).await;
        }
        let spares = Spares::start(self.launcher.clone(), version.clone(), self.settings.spares);
        Ok(Box::new(spares.await?))
    }

    /// Checks, before `template` serves, that instances started from it would not share
    /// random state (SPEC §6). The runtime reseeds every generator it knows in each new
    /// instance; this does not take that list on trust: two probe instances forked from the
    /// template draw from every generator object the template holds (the function's own
    /// included) and from each OpenSSL, and one that gives both the same output refuses the
    /// template (`stage`: after its build, or after its restore from disk).
    pub(super) async fn check_randomness(
        &self,
        template: Box<dyn Template>,
        stage: Stage,
    ) -> Result<Box<dyn Template>, StartError> {
        let limit = self.launcher.start_timeout();
        let started = Instant::now();
        let probe = match tokio::time::timeout(limit, template.probe()).await {
            Err(_) => return Err(StartError::Timeout(limit)),
            Ok(Err(e)) => return Err(StartError::Crashed(e.message)),
            Ok(Ok(probe)) => probe,
        };
        tracing::debug!(
            stage = stage.as_str(),
            ms = ms_since(started),
            generators = probe.compared,
            "probed the template's instances for shared random state"
        );
        if probe.same.is_empty() {
            return Ok(template);
        }
        metrics::snapshot_shared_random(stage.as_str());
        Err(StartError::Init {
            error: ErrorPayload {
                error_type: "SharedRandomState".into(),
                message: shared_random_message(&probe.same, probe.same_count),
                traceback: String::new(),
            },
            logs: String::new(),
        })
    }

    /// Replaces the `Building` entry of the build `done` belongs to with `next`; false if
    /// the entry is not its own any more.
    pub(super) fn finish_build(&self, key: &Key, done: &Arc<Notify>, next: Entry) -> bool {
        let mut entries = self.entries.lock().expect("snapshots lock");
        match entries.get(key) {
            Some(Entry::Building(pending)) if Arc::ptr_eq(&pending.done, done) => {
                entries.insert(key.clone(), next);
                true
            }
            _ => false,
        }
    }
}

/// When a template is checked for shared random state.
#[derive(Clone, Copy)]
pub(super) enum Stage {
    /// Built from the function's code.
    Build,
    /// Restored from its checkpoint.
    Restore,
}

impl Stage {
    fn as_str(self) -> &'static str {
        match self {
            Stage::Build => "build",
            Stage::Restore => "restore",
        }
    }
}

/// Why a template whose probes agree is refused, naming (a few of) the `count`
/// generators, of which `same` names the first.
fn shared_random_message(same: &[String], count: usize) -> String {
    const SHOWN: usize = 5;
    let mut names: Vec<String> = same
        .iter()
        .take(SHOWN)
        .map(|name| nimbus_core::echo::cut(name, 120).into_owned())
        .collect();
    let count = count.max(same.len());
    if count > names.len() {
        names.push(format!("and {} more", count - names.len()));
    }
    format!(
        "instances started from this snapshot would share random state: {} gave the same \
         values in two of them; reseed it in an @nimbus.after_restore hook, or mark a \
         generator meant to repeat with nimbus.deterministic() (docs/SNAPSHOTS.md). \
         Instances start cold until a snapshot passes",
        names.join(", ")
    )
}

/// What a failed build reports: the error (its message names the exception type where
/// the worker's does not already), and what the code printed.
fn build_error(error: &StartError) -> String {
    match error {
        StartError::Init { error, logs } => {
            let mut text = if error.message.contains(&error.error_type) {
                error.message.clone()
            } else {
                format!("{}: {}", error.error_type, error.message)
            };
            if !logs.trim().is_empty() {
                text.push_str(&format!(" (output: {})", logs.trim()));
            }
            text
        }
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_names_a_few_generators_and_counts_the_rest() {
        let names: Vec<String> = (0..20).map(|i| format!("handler.RNG{i}")).collect();
        let message = shared_random_message(&names, 4000);
        assert!(message.contains("handler.RNG0, handler.RNG1"), "{message}");
        assert!(
            message.contains("handler.RNG4, and 3995 more gave"),
            "{message}"
        );
        assert!(!message.contains("RNG5"), "{message}");
        let one = shared_random_message(&["tempfile names".to_owned()], 1);
        assert!(one.contains(": tempfile names gave the same"), "{one}");
        let long = shared_random_message(&["x".repeat(1000)], 1);
        assert!(long.len() < 600, "{long}");
    }
}
