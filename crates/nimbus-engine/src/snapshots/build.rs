//! The build queue: builds asked for (on publish, on request, after a cold start), served
//! by `build_workers` tasks, each one starting a template, checking it for shared random
//! state, and checkpointing it to disk.

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use nimbus_core::{now, Snapshot, SnapshotStatus};
use nimbus_sandbox::Template;
use tokio::sync::{mpsc, Notify};

use crate::catalog::VersionEntry;
use crate::error::{EngineError, EngineResult};
use crate::instance::StartError;
use crate::metrics;
use crate::spares::Spares;

use super::entry::{key_of, Entry, Key, Pending, Resident};
use super::randomness::{self, Stage};
use super::shared::{remove_dir, Shared};
use super::{disk, index, resident};

/// How long a build that failed for the platform's reasons waits before the next try.
const BUILD_RETRY: Duration = Duration::from_secs(60);

/// A build asked for: of which version, and what wakes those waiting for its end.
struct Job {
    version: Arc<VersionEntry>,
    done: Arc<Notify>,
}

/// The build queue and its workers (which end once it is dropped).
pub(super) struct Builds {
    shared: Arc<Shared>,
    queue: mpsc::UnboundedSender<Job>,
}

impl Builds {
    /// The queue, with `workers` build workers taking jobs off it until it or `shared` is
    /// gone.
    pub(super) fn start(shared: Arc<Shared>, workers: usize) -> Builds {
        let (queue, jobs) = mpsc::unbounded_channel::<Job>();
        let jobs = Arc::new(tokio::sync::Mutex::new(jobs));
        for _ in 0..workers {
            let weak: Weak<Shared> = Arc::downgrade(&shared);
            let jobs = jobs.clone();
            tokio::spawn(async move {
                loop {
                    let Some(job) = jobs.lock().await.recv().await else {
                        break;
                    };
                    let Some(shared) = weak.upgrade() else {
                        break;
                    };
                    build(&shared, &job.version, &job.done).await;
                    job.done.notify_waiters();
                }
            });
        }
        Builds { shared, queue }
    }

    /// Queues a build of `version`'s snapshot (`retry`: also after a failed one); returns
    /// what to wait on, or `None` if its template is resident already.
    pub(super) fn enqueue(&self, version: &Arc<VersionEntry>, retry: bool) -> Option<Arc<Notify>> {
        let key = key_of(version);
        let mut entries = self.shared.entries.lock().expect("snapshots lock");
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
            self.shared
                .entries
                .lock()
                .expect("snapshots lock")
                .remove(&key_of(version));
        }
        Some(done)
    }

    /// Builds `version`'s snapshot now (or joins the build under way) and, with `wait`,
    /// returns its row once the build has ended.
    pub(super) async fn request(
        &self,
        version: &Arc<VersionEntry>,
        wait: bool,
    ) -> EngineResult<Snapshot> {
        let new = index::new_snapshot(&self.shared, version);
        let done = self.enqueue(version, true);
        if done.is_some() {
            // The row exists (`building`) before the answer, however long the queue.
            self.shared.store.begin_snapshot(&new).await?;
        }
        if let (true, Some(done)) = (wait, done) {
            let notified = done.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let building = matches!(
                self.shared
                    .entries
                    .lock()
                    .expect("snapshots lock")
                    .get(&key_of(version)),
                Some(Entry::Building(_))
            );
            if building {
                notified.await;
            }
        }
        self.shared
            .store
            .find_snapshot(&new.key)
            .await?
            .ok_or_else(|| EngineError::Internal("the snapshot's row disappeared".into()))
    }
}

/// One build: claims the row, starts the template, records the outcome.
async fn build(shared: &Shared, version: &Arc<VersionEntry>, done: &Arc<Notify>) {
    let key = key_of(version);
    let started = Instant::now();
    // Starts that wait for it weigh what is left of the build, not of its queueing.
    if let Some(Entry::Building(pending)) =
        shared.entries.lock().expect("snapshots lock").get_mut(&key)
    {
        if Arc::ptr_eq(&pending.done, done) {
            pending.since = started;
        }
    }
    let new = index::new_snapshot(shared, version);
    let row = match shared.store.begin_snapshot(&new).await {
        Ok((row, true)) => row,
        // The index says ready or building (an earlier run of this server, or another
        // server): this server has no template of it, so it builds its own.
        Ok((row, false)) => {
            let _ = shared
                .store
                .set_snapshot_status(&row.id, SnapshotStatus::Building, None)
                .await;
            row
        }
        Err(e) => {
            tracing::warn!(function = %version.function_name, version = version.version, "cannot index the snapshot: {e}");
            shared.entries.lock().expect("snapshots lock").remove(&key);
            return;
        }
    };
    let outcome = match start_template(shared, version).await {
        Ok(template) => randomness::check(&shared.launcher, template, Stage::Build).await,
        Err(e) => Err(e),
    };
    let seconds = started.elapsed().as_secs_f64();
    match outcome {
        Ok(template) => {
            let resident = Arc::new(Resident::new(template, row.id.clone(), key.clone(), None));
            let expires = index::expiry(shared, now());
            let _ = shared
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
            let limit = shared.launcher.start_timeout();
            if shared.settings.disk && shared.launcher.can_checkpoint(version) {
                let checkpoint = disk::checkpoint(shared, &row, &resident);
                if tokio::time::timeout(limit, checkpoint).await.is_err() {
                    tracing::warn!(snapshot = %row.id, "checkpointing the template timed out");
                    remove_dir(&shared.dir.join(&row.id));
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
            shared
                .estimates
                .lock()
                .expect("estimates lock")
                .built(&key, started.elapsed());
            if !finish_build(shared, &key, done, Entry::Ready(resident.clone())) {
                // Forgotten meanwhile (its version or function deleted).
                if let Some(copy) = resident.disk_copy() {
                    remove_dir(&copy.dir);
                }
                return;
            }
            resident::enforce_limits(shared, &version.function_id, &resident).await;
        }
        Err(e) => {
            let message = build_error(&e);
            let _ = shared
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
            finish_build(shared, &key, done, Entry::Failed { retry_at });
        }
    }
    index::refresh_gauges(shared).await;
}

/// Starts a template of `version`: the driver's, or for a runtime whose workers
/// cannot fork, [`Spares`] of the version.
async fn start_template(
    shared: &Shared,
    version: &Arc<VersionEntry>,
) -> Result<Box<dyn Template>, StartError> {
    if version.config.runtime.forks_templates() {
        return shared.launcher.template(version).await;
    }
    let spares = Spares::start(
        shared.launcher.clone(),
        version.clone(),
        shared.settings.spares,
    );
    Ok(Box::new(spares.await?))
}

/// Replaces the `Building` entry of the build `done` belongs to with `next`; false if
/// the entry is not its own any more.
fn finish_build(shared: &Shared, key: &Key, done: &Arc<Notify>, next: Entry) -> bool {
    let mut entries = shared.entries.lock().expect("snapshots lock");
    match entries.get(key) {
        Some(Entry::Building(pending)) if Arc::ptr_eq(&pending.done, done) => {
            entries.insert(key.clone(), next);
            true
        }
        _ => false,
    }
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
