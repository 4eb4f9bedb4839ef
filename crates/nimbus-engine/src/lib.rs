//! Nimbus engine: the one place where API requests turn into work.
//!
//! Request path: [`Engine::invoke`] ([`invoke`]) → [`catalog`] (function, alias, version;
//! cached) → [`router`] (alias → version) → `pool` (a warm instance, placed by
//! `affinity::placement`, or a new one from `starter`: forked from a template, restored
//! from a checkpoint, or cold through `launcher`) → the worker protocol
//! (`nimbus_runtime::WorkerConn`) → outcome → the lease released → [`recorder`]
//! (journaled, then written behind). Function management ([`functions`]) validates, loads new code once, and
//! writes the store; [`versions`] publishes and deletes versions, [`aliases`] manages the
//! routing tables. Deletions converge across servers: what a server finds deleted elsewhere
//! it drops ([`catalog::Gone`]), and a periodic pass purges what was written late.

mod affinity;
pub mod aliases;
pub mod catalog;
pub mod code_cache;
pub mod config;
pub mod error;
pub mod functions;
mod instance;
pub mod invoke;
mod journal;
mod launcher;
pub mod metrics;
mod pool;
mod purge;
pub mod recorder;
pub mod router;
pub mod snapshot_admin;
mod snapshot_files;
mod snapshots;
mod spares;
mod start_estimates;
mod starter;
mod state;
pub mod state_admin;
pub mod versions;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nimbus_core::Invocation;
use nimbus_runtime::Runtimes;
use nimbus_sandbox::Driver;
use nimbus_state::State;
use nimbus_store::{InvocationFilter, MetadataStore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use aliases::{AliasPatch, NewAlias, RollbackRequest, RolledBack};
pub use config::{EngineConfig, SnapshotSettings};
pub use error::{EngineError, EngineResult};
pub use functions::{FunctionPatch, NewFunction, Updated};
pub use invoke::{InvokeRequest, InvokeResponse};
pub use snapshot_admin::{Cleanup, SnapshotStats, SnapshotView};
pub use state_admin::{KeyView, SessionView, StateView};
pub use versions::PublishRequest;

use catalog::{Catalog, Freshness, Gone};
use code_cache::CodeCache;
use launcher::Launcher;
use pool::Pools;
use recorder::Recorder;
use snapshots::Snapshots;
use starter::Starter;

/// The engine: metadata, pools and recording behind one handle.
pub struct Engine {
    config: Arc<EngineConfig>,
    store: Arc<dyn MetadataStore>,
    catalog: Catalog,
    pools: Pools,
    /// Starts instances (the pools' new ones, and the deploy's check that code loads).
    starter: Arc<Starter>,
    snapshots: Arc<Snapshots>,
    recorder: Recorder,
    /// The recorder's writing task, stopped at shutdown.
    recorder_task: Mutex<Option<JoinHandle<()>>>,
    /// When deleted functions are purged next (see [`purge`]).
    purges: purge::PurgeSchedule,
    code: CodeCache,
    /// Functions' state (SPEC §7) and the session registry.
    state: State,
    driver_name: &'static str,
    /// Every running invocation task, so shutdown can wait for them.
    inflight: TaskTracker,
    /// Set when the server starts stopping: new invocations are refused from then on.
    draining: AtomicBool,
    /// Cancelled when the server stops: invocations still running are cut short.
    stopping: CancellationToken,
}

/// Longest [`Engine::shutdown`] waits for the invocations it cut short to record their end
/// (an instance being started cannot be cut short; one that ends later is recorded at the
/// next start, from the journal).
const CUT_SHORT_WAIT: Duration = Duration::from_secs(5);

impl Engine {
    /// Starts the engine and its background tasks (recorder, idle reaper, purge pass).
    /// Fails if the invocation journal (`<data_dir>/records`) cannot be opened.
    pub fn start(
        config: EngineConfig,
        store: Arc<dyn MetadataStore>,
        state: State,
        driver: Arc<dyn Driver>,
        runtimes: Runtimes,
    ) -> EngineResult<Arc<Engine>> {
        let config = Arc::new(config);
        let code = CodeCache::new(config.data_dir.join("code"));
        let journal = config.data_dir.join("records");
        let (recorder, recorder_task) =
            Recorder::start(&journal, Arc::new(store.clone()), config.record_retry).map_err(
                |e| {
                    EngineError::Internal(format!(
                        "opening the invocation journal {}: {e}",
                        journal.display()
                    ))
                },
            )?;
        let driver_name = driver.name();
        let launcher = Arc::new(Launcher::new(config.clone(), driver, runtimes));
        let snapshots = Snapshots::start(
            config.snapshots.clone(),
            store.clone(),
            launcher.clone(),
            config.data_dir.join("snapshots"),
        );
        let starter = Arc::new(Starter::new(launcher, snapshots.clone()));
        let freshness = Freshness {
            ttl: config.cache_ttl,
            stale_ttl: config.stale_ttl,
        };
        let (catalog, mut gone) = Catalog::new(store.clone(), code.clone(), freshness);
        let engine = Arc::new(Engine {
            catalog,
            driver_name,
            pools: Pools::new(config.clone(), starter.clone()),
            starter,
            snapshots,
            recorder,
            recorder_task: Mutex::new(Some(recorder_task)),
            purges: purge::PurgeSchedule::default(),
            code,
            state,
            store,
            config,
            inflight: TaskTracker::new(),
            draining: AtomicBool::new(false),
            stopping: CancellationToken::new(),
        });
        metrics::describe();
        let weak = Arc::downgrade(&engine);
        let every = (engine.config.idle_timeout / 10)
            .clamp(Duration::from_millis(100), Duration::from_secs(10));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                let Some(engine) = weak.upgrade() else { break };
                let reaped = engine.pools.reap_idle();
                if reaped > 0 {
                    tracing::debug!(reaped, "stopped idle instances");
                }
            }
        });
        let weak = Arc::downgrade(&engine);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(60));
            loop {
                tick.tick().await;
                let Some(engine) = weak.upgrade() else { break };
                engine.snapshots.sweep().await;
            }
        });
        let weak = Arc::downgrade(&engine);
        tokio::spawn(async move {
            while let Some(gone) = gone.recv().await {
                let Some(engine) = weak.upgrade() else { break };
                engine.drop_gone(gone);
            }
        });
        let weak = Arc::downgrade(&engine);
        let every = engine.config.purge_interval;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(engine) = weak.upgrade() else { break };
                engine.purge().await;
            }
        });
        Ok(engine)
    }

    /// Takes over the snapshots an earlier run of this server left: its checkpoints on disk
    /// serve again, and builds it left unfinished are marked failed. Call it once, before
    /// serving.
    pub async fn recover_snapshots(&self) {
        // A build takes at most the start timeout; one older than twice that was abandoned.
        self.snapshots.recover(self.config.start_timeout * 2).await;
    }

    /// Name of the sandbox driver in use.
    pub fn driver_name(&self) -> &'static str {
        self.driver_name
    }

    /// Whether the metadata store answers: its last health check, so this never waits.
    pub async fn ready(&self) -> EngineResult<()> {
        Ok(self.store.available()?)
    }

    /// One invocation record. Records are written behind; a miss waits for pending writes
    /// (at most [`recorder::READ_WAIT`]).
    pub async fn get_invocation(&self, request_id: &str) -> EngineResult<Invocation> {
        if let Some(found) = self.store.get_invocation(request_id).await? {
            return Ok(found);
        }
        self.recorder.flush_for_read().await;
        self.store
            .get_invocation(request_id)
            .await?
            .ok_or_else(|| EngineError::NotFound {
                code: nimbus_core::ErrorCode::InvocationNotFound,
                message: format!("invocation {} not found", nimbus_core::echo(request_id)),
            })
    }

    /// A function's invocation records, newest first, including ones pending a moment
    /// ago (waiting for them at most [`recorder::READ_WAIT`]).
    pub async fn list_invocations(
        &self,
        function: &str,
        filter: &InvocationFilter,
    ) -> EngineResult<Vec<Invocation>> {
        let function = self.get_function(function).await?;
        self.recorder.flush_for_read().await;
        Ok(self.store.list_invocations(&function.id, filter).await?)
    }

    /// Instances alive for a function on this server.
    pub fn live_instances(&self, function_id: &str) -> u32 {
        self.pools.live_instances(function_id)
    }

    /// Starts stopping: from now on new invocations (synchronous and asynchronous) are
    /// refused with [`EngineError::ShuttingDown`], while running ones go on.
    pub fn begin_drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
        self.inflight.close();
    }

    /// Whether [`Engine::begin_drain`] was called.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Refuses a new invocation once the server is stopping.
    fn admit(&self) -> EngineResult<()> {
        if self.is_draining() {
            return Err(EngineError::ShuttingDown);
        }
        Ok(())
    }

    /// Begins the drain and waits up to `grace` for running invocations, synchronous and
    /// asynchronous, to finish. True if none is left.
    pub async fn drain(&self, grace: Duration) -> bool {
        self.begin_drain();
        tokio::time::timeout(grace, self.inflight.wait())
            .await
            .is_ok()
    }

    /// Drains (up to `grace`), then stops every instance, cutting short the invocations
    /// still running (each records its end: `instance_crashed`), waits for them to record
    /// it (up to [`CUT_SHORT_WAIT`]) and writes every pending record.
    pub async fn shutdown(&self, grace: Duration) {
        if !self.drain(grace).await {
            tracing::warn!(
                running = self.inflight.len(),
                "invocations still running at shutdown are cut short"
            );
        }
        self.stopping.cancel();
        self.pools.shutdown();
        self.snapshots.shutdown();
        if tokio::time::timeout(CUT_SHORT_WAIT, self.inflight.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                running = self.inflight.len(),
                "invocations cut short have not ended within {CUT_SHORT_WAIT:?}: a record \
                 they make later is written at the next start"
            );
        }
        let writer = self.recorder_task.lock().expect("recorder lock").take();
        match writer {
            Some(writer) => self.recorder.close(writer).await,
            None => self.recorder.flush().await,
        }
    }

    /// Drops what this server holds for something deleted (here or elsewhere): a
    /// function's pools, instances, templates and metric series, a version's idle
    /// instances, templates and series, an alias's series.
    fn drop_gone(&self, gone: Gone) {
        match gone {
            Gone::Function { id, name } => {
                self.catalog.remove(&id);
                self.pools.remove_function(&id);
                self.snapshots.forget(&id, None);
                metrics::retire_function(&name, &id);
                tracing::info!(function = %name, %id, "function deleted: its instances and templates here are stopped");
            }
            Gone::Version {
                function_id,
                function,
                version,
            } => {
                self.pools.retire_version(&function_id, version);
                self.snapshots.forget(&function_id, Some(version));
                metrics::retire_version(&function, &function_id, version);
            }
            Gone::Alias {
                function_id,
                function,
                alias,
            } => metrics::retire_alias(&function, &function_id, &alias),
        }
    }
}
