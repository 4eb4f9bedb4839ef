//! Function-level snapshots (SPEC §6): per function version, a template (an initialized
//! worker that new instances are started from), built in the background, indexed in the
//! metadata store, and kept within the configured lifecycle.
//!
//! - Builds: on publish, on request (`POST …/snapshots`) and when a version without one
//!   starts cold; a queue served by `build_workers` tasks, de-duplicated per version (here
//!   by the in-memory entry, across servers by the store's one row per key).
//! - Use: [`Snapshots::resident`] gives the pool the template to fork from; a failed start
//!   marks the snapshot `corrupt`, drops the template and schedules a rebuild, and the pool
//!   falls back to a cold start, so the invocation still succeeds.
//! - Lifecycle: unused for `ttl` → `expired`; at most `max_per_function` resident per
//!   function (versions routed by an alias kept first, so a rollback stays warm); the
//!   resident templates' memory within `memory_budget`, least recently used evicted first.
//!   An evicted template whose instances still run stays alive until they end (they live
//!   in its pid namespace), but starts nothing more.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nimbus_core::{
    env_vars_hash, now, NewSnapshot, Snapshot, SnapshotFile, SnapshotKey, SnapshotStatus,
    SnapshotUse, StartType,
};
use nimbus_runtime::protocol::ErrorPayload;
use nimbus_sandbox::Template;
use nimbus_store::MetadataStore;
use time::OffsetDateTime;
use tokio::sync::{mpsc, Notify};

use crate::catalog::VersionEntry;
use crate::error::{EngineError, EngineResult};
use crate::launcher::{ms_since, Launcher, StartError};
use crate::metrics;
use crate::snapshot_files;
use crate::start_estimates::{StartEstimates, Underway};

/// Snapshot settings (the `[snapshots]` section of the server configuration).
#[derive(Debug, Clone)]
pub struct SnapshotSettings {
    /// Build and use templates at all.
    pub enabled: bool,
    /// Builds running at once.
    pub build_workers: usize,
    /// Run one invocation with `{"warmup": true}` in the template before it is kept.
    pub warmup_on_build: bool,
    /// A snapshot unused this long expires.
    pub ttl: Duration,
    /// Most resident templates per function.
    pub max_per_function: usize,
    /// Most memory all resident templates may hold, bytes.
    pub memory_budget: u64,
    /// Time all `before_snapshot` (or all `after_restore`) hooks of a function may take.
    pub hook_budget: Duration,
    /// Checkpoint templates to disk where the driver can (CRIU for the process driver).
    pub disk: bool,
    /// Most bytes all checkpoints on disk may take; least recently used deleted first.
    pub disk_quota: u64,
    /// Instances kept started ahead per version for runtimes whose workers cannot fork
    /// (Node.js): their template tier.
    pub spares: usize,
}

impl Default for SnapshotSettings {
    fn default() -> Self {
        SnapshotSettings {
            enabled: true,
            build_workers: 1,
            warmup_on_build: false,
            ttl: Duration::from_secs(7 * 24 * 3600),
            max_per_function: 3,
            memory_budget: 1 << 30,
            hook_budget: Duration::from_secs(1),
            disk: true,
            disk_quota: 10 << 30,
            spares: 2,
        }
    }
}

/// What identifies a template here: a version's code can only change with its number,
/// but the hash keeps even a reused number from ever meeting old code.
type Key = (String, u32, String);

fn key_of(version: &VersionEntry) -> Key {
    (
        version.function_id.clone(),
        version.version,
        version.config.code_hash.clone(),
    )
}

/// A template kept in memory.
pub(crate) struct Resident {
    /// The driver's template.
    pub(crate) template: Box<dyn Template>,
    /// Its row in the index.
    pub(crate) snapshot_id: String,
    key: Key,
    bytes: u64,
    last_used: Mutex<Instant>,
    /// Its checkpoint on disk, once written.
    disk: Mutex<Option<Arc<DiskCopy>>>,
}

/// A template's checkpoint on this server's disk.
pub(crate) struct DiskCopy {
    snapshot_id: String,
    key: Key,
    dir: PathBuf,
    /// As sealed, and as the index lists them.
    files: Vec<SnapshotFile>,
    bytes: u64,
    last_used: Mutex<Instant>,
}

impl Resident {
    fn disk_copy(&self) -> Option<Arc<DiskCopy>> {
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

enum Entry {
    /// Queued or being built.
    Building(Pending),
    Ready(Arc<Resident>),
    /// Not in memory, but checkpointed on disk: the next start restores it.
    OnDisk(Arc<DiskCopy>),
    /// A restore from this checkpoint is under way (other starts meanwhile wait for it, or
    /// go cold when that is faster: see [`Snapshots::wait_pending`]).
    Restoring(Arc<DiskCopy>, Pending),
    /// The last build failed. The function's own failures (its init or hooks raised) are
    /// not retried by themselves, since the same code fails the same way, only on request;
    /// the platform's (a timeout under load, a cgroup error) are, on a start after
    /// `retry_at`.
    Failed {
        retry_at: Option<Instant>,
    },
}

/// A build or restore under way: since when, and what wakes those waiting for its end.
#[derive(Clone)]
struct Pending {
    done: Arc<Notify>,
    since: Instant,
}

impl Pending {
    fn new() -> Self {
        Pending {
            done: Arc::new(Notify::new()),
            since: Instant::now(),
        }
    }
}

/// How long a build that failed for the platform's reasons waits before the next try.
const BUILD_RETRY: Duration = Duration::from_secs(60);

struct Job {
    version: Arc<VersionEntry>,
    done: Arc<Notify>,
}

/// The snapshot manager.
pub(crate) struct Snapshots {
    settings: SnapshotSettings,
    store: Arc<dyn MetadataStore>,
    launcher: Arc<Launcher>,
    /// Where checkpoints go: `<data_dir>/snapshots/<snapshot id>/`.
    dir: PathBuf,
    entries: Mutex<HashMap<Key, Entry>>,
    queue: mpsc::UnboundedSender<Job>,
    /// How long restores, builds and cold starts take here.
    estimates: Mutex<StartEstimates<Key>>,
}

impl Snapshots {
    /// The manager, with its build workers running.
    pub(crate) fn start(
        settings: SnapshotSettings,
        store: Arc<dyn MetadataStore>,
        launcher: Arc<Launcher>,
        dir: PathBuf,
    ) -> Arc<Snapshots> {
        let (queue, jobs) = mpsc::unbounded_channel::<Job>();
        let workers = settings.build_workers.max(1);
        let snapshots = Arc::new(Snapshots {
            settings,
            store,
            launcher,
            dir,
            entries: Mutex::default(),
            queue,
            estimates: Mutex::default(),
        });
        let jobs = Arc::new(tokio::sync::Mutex::new(jobs));
        for _ in 0..workers {
            let weak = Arc::downgrade(&snapshots);
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
        snapshots
    }

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
    async fn ended(&self, resident: &Arc<Resident>, why: &str) {
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
    fn replace_resident(&self, resident: &Arc<Resident>, next: Option<Entry>) -> bool {
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
                    template,
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
    fn settle(&self, copy: &Arc<DiskCopy>, next: Option<Entry>) -> bool {
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

    /// A start of `version` that found no template resident: if the template is being built
    /// or restored and waiting beats a cold start (see [`StartEstimates`]), waits until
    /// that ends (for as long as the estimates allow, at most the start timeout). True if
    /// it waited: the caller looks for the template again.
    pub(crate) async fn wait_pending(&self, version: &VersionEntry) -> bool {
        if !self.settings.enabled {
            return false;
        }
        let key = key_of(version);
        let (pending, underway) = match self.entries.lock().expect("snapshots lock").get(&key) {
            Some(Entry::Building(pending)) => (pending.clone(), Underway::Build),
            Some(Entry::Restoring(_, pending)) => (pending.clone(), Underway::Restore),
            _ => return false,
        };
        let patience = self.estimates.lock().expect("estimates lock").wait_for(
            &key,
            underway,
            pending.since.elapsed(),
        );
        let Some(patience) = patience else {
            return false;
        };
        let notified = pending.done.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let still = matches!(
            self.entries.lock().expect("snapshots lock").get(&key),
            Some(Entry::Building(p) | Entry::Restoring(_, p)) if Arc::ptr_eq(&p.done, &pending.done)
        );
        if still {
            let patience = patience.min(self.launcher.start_timeout());
            let _ = tokio::time::timeout(patience, notified).await;
        }
        true
    }

    /// A cold start of `version` took `took` (what waiting for its template is weighed
    /// against).
    pub(crate) fn started_cold(&self, version: &VersionEntry, took: Duration) {
        self.estimates
            .lock()
            .expect("estimates lock")
            .started_cold(&key_of(version), took);
    }

    /// A version just started cold: build its snapshot unless one exists or failed.
    pub(crate) fn wanted(&self, version: &Arc<VersionEntry>) {
        if self.settings.enabled {
            self.enqueue(version, false);
        }
    }

    /// Queues a build of `version`'s snapshot (`retry`: also after a failed one); returns
    /// what to wait on, or `None` if its template is resident already.
    fn enqueue(&self, version: &Arc<VersionEntry>, retry: bool) -> Option<Arc<Notify>> {
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

    /// Marks as failed the builds an earlier server left `building` (it stopped during
    /// them) once they are older than any build can take.
    pub(crate) async fn recover(&self, older_than: Duration) {
        let Ok(all) = self.store.list_snapshots(None).await else {
            return;
        };
        let cutoff = now() - older_than;
        let driver = self.launcher.driver_name();
        for row in all {
            // Checkpoints this server wrote survive its restarts.
            if let (SnapshotStatus::Ready, Some(path), true) = (
                row.status,
                &row.path,
                self.settings.disk && row.driver == driver && self.launcher.can_restore(),
            ) {
                // Only where this server writes them: the path is derived, not trusted.
                let dir = self.dir.join(&row.id);
                if *path != dir.display().to_string() {
                    continue;
                }
                if !dir.is_dir() {
                    // Lost (deleted by hand, a data directory restored without it): the
                    // version starts cold and rebuilds it.
                    let why = format!("its checkpoint directory {} is missing", dir.display());
                    tracing::warn!(snapshot = %row.id, "snapshot on disk is corrupt: {why}");
                    metrics::snapshot_restored("failed", StartType::Snapshot, 0.0);
                    let _ = self
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
                    self.entries
                        .lock()
                        .expect("snapshots lock")
                        .entry(copy.key.clone())
                        .or_insert(Entry::OnDisk(copy));
                }
                continue;
            }
            if row.status == SnapshotStatus::Building && row.created_at < cutoff {
                let _ = self
                    .store
                    .set_snapshot_status(
                        &row.id,
                        SnapshotStatus::Failed,
                        Some("abandoned: the server building it stopped"),
                    )
                    .await;
            }
        }
        self.refresh_gauges().await;
    }

    fn new_snapshot(&self, version: &VersionEntry) -> NewSnapshot {
        NewSnapshot {
            key: SnapshotKey {
                function_id: version.function_id.clone(),
                version: version.version,
                code_hash: version.config.code_hash.clone(),
                env_vars_hash: env_vars_hash(&version.config.env_vars),
                driver: self.launcher.driver_name().to_owned(),
            },
            runtime: version.config.runtime,
            memory_mb: version.config.memory_mb,
        }
    }

    /// One build: claims the row, starts the template, records the outcome.
    async fn build(&self, version: &Arc<VersionEntry>, done: &Arc<Notify>) {
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
        let outcome = match self.launcher.template(version).await {
            Ok(template) => self.check_randomness(template, Stage::Build).await,
            Err(e) => Err(e),
        };
        let seconds = started.elapsed().as_secs_f64();
        match outcome {
            Ok(template) => {
                let resident = Arc::new(Resident {
                    bytes: template.resident_bytes().unwrap_or(0),
                    template,
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

    /// Checks, before `template` serves, that instances started from it would not share
    /// random state (SPEC §6). The runtime reseeds every generator it knows in each new
    /// instance; this does not take that list on trust: two probe instances forked from the
    /// template draw from every generator object the template holds (the function's own
    /// included) and from each OpenSSL, and one that gives both the same output refuses the
    /// template (`stage`: after its build, or after its restore from disk).
    async fn check_randomness(
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
    fn finish_build(&self, key: &Key, done: &Arc<Notify>, next: Entry) -> bool {
        let mut entries = self.entries.lock().expect("snapshots lock");
        match entries.get(key) {
            Some(Entry::Building(pending)) if Arc::ptr_eq(&pending.done, done) => {
                entries.insert(key.clone(), next);
                true
            }
            _ => false,
        }
    }

    fn expiry(&self, from: OffsetDateTime) -> Option<OffsetDateTime> {
        time::Duration::try_from(self.settings.ttl)
            .ok()
            .and_then(|ttl| from.checked_add(ttl))
    }

    /// A start from `resident` (`how`: forked, or restored from disk first) succeeded in
    /// `ms`.
    pub(crate) fn restored(&self, resident: &Arc<Resident>, how: SnapshotUse, ms: f64) {
        let start_type = match how {
            SnapshotUse::Fork => StartType::Template,
            SnapshotUse::Restore => StartType::Snapshot,
        };
        metrics::snapshot_restored("success", start_type, ms);
        let (store, id) = (self.store.clone(), resident.snapshot_id.clone());
        let used = now();
        let expires = self.expiry(used);
        tokio::spawn(async move {
            let _ = store.record_snapshot_use(&id, how, ms, used, expires).await;
        });
    }

    /// A start from `resident` failed for the platform's reasons; the caller starts cold.
    /// If the template itself has ended (or broke), it is dropped: restored from its
    /// checkpoint next time, or rebuilt.
    pub(crate) async fn restore_failed(
        &self,
        version: &Arc<VersionEntry>,
        resident: &Arc<Resident>,
        error: &StartError,
    ) {
        metrics::snapshot_restored("failed", StartType::Template, 0.0);
        if resident.template.alive() {
            // A passing failure (the template could not fork just now): this start goes
            // cold, the template stays.
            tracing::warn!(
                function = %version.function_name,
                version = version.version,
                snapshot = %resident.snapshot_id,
                "start from the template failed, starting cold: {error}"
            );
            return;
        }
        let next = match resident.template.refused() {
            Some(_) => "refused (the snapshot fails; not rebuilt)",
            None if resident.disk_copy().is_some() => "ended (restored from disk next time)",
            None => "ended (rebuilt)",
        };
        tracing::warn!(
            function = %version.function_name,
            version = version.version,
            snapshot = %resident.snapshot_id,
            "starting cold; the template {next}: {error}"
        );
        self.ended(resident, &format!("the template ended: {error}"))
            .await;
        if resident.disk_copy().is_none() && resident.template.refused().is_none() {
            self.enqueue(version, true);
        }
    }

    /// A template just restored from `copy` failed its first start for the platform's
    /// reasons: its checkpoint is not to be trusted (restoring it again would fail again),
    /// so it is `corrupt`, deleted and rebuilt, unless the template was refused for what
    /// the function's code did.
    pub(crate) async fn restored_template_failed(
        &self,
        version: &Arc<VersionEntry>,
        resident: &Arc<Resident>,
        error: &StartError,
    ) {
        if resident.template.alive() || resident.template.refused().is_some() {
            return self.restore_failed(version, resident, error).await;
        }
        metrics::snapshot_restored("failed", StartType::Snapshot, 0.0);
        if !self.replace_resident(resident, None) {
            return;
        }
        if let Some(copy) = resident.disk_copy() {
            remove_dir(&copy.dir);
        }
        tracing::warn!(snapshot = %resident.snapshot_id, "the template restored from disk failed at once, rebuilding the snapshot: {error}");
        let _ = self
            .store
            .finish_snapshot(
                &resident.snapshot_id,
                SnapshotStatus::Corrupt,
                Some(&format!("its restored template failed: {error}")),
                None,
                &[],
                0,
                None,
            )
            .await;
        self.enqueue(version, true);
    }

    /// Residents, for the lifecycle.
    fn residents(&self) -> Vec<Arc<Resident>> {
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
    async fn expire(&self, resident: &Arc<Resident>, why: &str) {
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

    /// Checkpoints `resident` (built as `row`) to disk and records its files; on failure
    /// it stays a memory-only snapshot.
    async fn checkpoint(&self, row: &Snapshot, resident: &Arc<Resident>) {
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
    fn disk_copies(&self) -> Vec<Arc<DiskCopy>> {
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
    async fn enforce_disk_quota(&self) {
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
    async fn delete_copy(&self, copy: &Arc<DiskCopy>, why: &str) {
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

    /// After `fresh` became resident: at most `max_per_function` of its function (those
    /// an alias routes to kept first, then the most recently used), and all within the
    /// memory budget (least recently used evicted first, `fresh` last).
    async fn enforce_limits(&self, function_id: &str, fresh: &Arc<Resident>) {
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

    /// Expires templates and checkpoints unused for the TTL (called periodically).
    pub(crate) async fn sweep(&self) {
        for copy in self.disk_copies() {
            if copy.last_used.lock().expect("copy lock").elapsed() >= self.settings.ttl {
                self.delete_copy(&copy, "deleted: unused for the snapshot TTL")
                    .await;
            }
        }
        for resident in self.residents() {
            let idle = resident.last_used.lock().expect("resident lock").elapsed();
            if idle >= self.settings.ttl {
                self.expire(&resident, "unused for the snapshot TTL").await;
            }
        }
        self.refresh_gauges().await;
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

    /// Drops the template and the files of a snapshot (it is being deleted).
    pub(crate) fn drop_snapshot(&self, snapshot_id: &str) {
        self.entries.lock().expect("snapshots lock").retain(|_, e| {
            let gone = matches!(e, Entry::Ready(r) if r.snapshot_id == snapshot_id)
                || matches!(e, Entry::OnDisk(c) | Entry::Restoring(c, _) if c.snapshot_id == snapshot_id);
            if let (true, Entry::Restoring(_, pending)) = (gone, &e) {
                pending.done.notify_waiters();
            }
            !gone
        });
        remove_dir(&self.dir.join(snapshot_id));
    }

    /// Drops the templates and checkpoints of a function (deleted), or of one of its
    /// versions.
    pub(crate) fn forget(&self, function_id: &str, version: Option<u32>) {
        let mut gone = Vec::new();
        self.entries
            .lock()
            .expect("snapshots lock")
            .retain(|(f, v, _), e| {
                let keep = !(f == function_id && version.is_none_or(|n| n == *v));
                if !keep {
                    match e {
                        Entry::Ready(r) => gone.extend(r.disk_copy().map(|c| c.dir.clone())),
                        Entry::OnDisk(c) => gone.push(c.dir.clone()),
                        Entry::Restoring(c, pending) => {
                            gone.push(c.dir.clone());
                            pending.done.notify_waiters();
                        }
                        _ => {}
                    }
                }
                keep
            });
        self.estimates
            .lock()
            .expect("estimates lock")
            .forget_where(|(f, v, _)| f == function_id && version.is_none_or(|n| n == *v));
        for dir in gone {
            remove_dir(&dir);
        }
    }

    /// Drops every template (server shutdown).
    pub(crate) fn shutdown(&self) {
        self.entries.lock().expect("snapshots lock").clear();
    }

    /// Resident templates and the memory they hold.
    pub(crate) fn resident_totals(&self) -> (usize, u64) {
        let residents = self.residents();
        (residents.len(), residents.iter().map(|r| r.bytes).sum())
    }

    /// The settings in force.
    pub(crate) fn settings(&self) -> &SnapshotSettings {
        &self.settings
    }

    /// Recomputes the count and size gauges from the index.
    pub(crate) async fn refresh_gauges(&self) {
        let Ok(all) = self.store.list_snapshots(None).await else {
            return;
        };
        let mut counts: HashMap<SnapshotStatus, u64> = HashMap::new();
        for snapshot in &all {
            *counts.entry(snapshot.status).or_default() += 1;
        }
        let storage: u64 = all.iter().map(|s| s.size_bytes).sum();
        let (_, resident) = self.resident_totals();
        metrics::snapshot_gauges(&counts, storage, resident);
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

/// Removes a snapshot directory, if there is one.
fn remove_dir(dir: &Path) {
    if let Err(e) = std::fs::remove_dir_all(dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!("removing {}: {e}", dir.display());
        }
    }
}

/// When a template is checked for shared random state.
#[derive(Clone, Copy)]
enum Stage {
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
