//! Instance pools: per function, the idle instances of each version, the capacity bound
//! (`max_instances`), and the bounded queue of invocations waiting for capacity.
//!
//! Capacity is a semaphore of `max_instances` permits per function: an invocation holds one
//! permit while it runs, so at most `max_instances` run at once. With a permit in hand, an
//! invocation takes the most recently used idle instance of its version (`warm`) or starts a
//! new one (`cold`), first stopping the least recently used idle instance of another version
//! if the function is at its instance limit.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nimbus_core::StartType;
use nimbus_runtime::WorkerConn;
use nimbus_sandbox::{ExitInfo, Sandbox};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::catalog::VersionEntry;
use crate::config::EngineConfig;
use crate::error::{EngineError, EngineResult};
pub use crate::launcher::StartError;
use crate::launcher::{ms_since, Launcher};
use crate::metrics::{self, InstanceState};
use crate::snapshots::{Resident, Snapshots};

/// A running worker of one function version.
#[derive(Debug)]
pub struct Instance {
    /// `i_<ulid>`.
    pub id: String,
    /// The version it runs.
    pub version: Arc<VersionEntry>,
    /// Its connection.
    pub conn: WorkerConn,
    sandbox: Box<dyn Sandbox>,
    started: Instant,
    last_used: Instant,
    served: u64,
    /// The template it was forked from, kept alive while the instance lives (the process
    /// driver's forks live in the template's pid namespace).
    _template: Option<Arc<Resident>>,
}

impl Instance {
    pub(crate) fn new(
        id: String,
        version: Arc<VersionEntry>,
        conn: WorkerConn,
        sandbox: Box<dyn Sandbox>,
        template: Option<Arc<Resident>>,
    ) -> Self {
        let now = Instant::now();
        Instance {
            id,
            version,
            conn,
            sandbox,
            started: now,
            last_used: now,
            served: 0,
            _template: template,
        }
    }

    /// Kills the worker and waits for it to end, reporting how it ended.
    pub async fn kill(mut self) -> ExitInfo {
        self.sandbox.kill();
        self.sandbox.wait().await
    }

    /// Waits (briefly) for a worker that closed its connection to end, reporting how.
    pub async fn exit_info(&mut self) -> Option<ExitInfo> {
        tokio::time::timeout(Duration::from_millis(500), self.sandbox.wait())
            .await
            .ok()
    }
}

/// An instance checked out for one invocation, with the capacity permit it runs under.
/// Dropping a lease without [`Pools::release`] kills the instance: its state is unknown.
pub struct Lease {
    instance: Option<Instance>,
    /// How the instance was obtained.
    pub start_type: StartType,
    pool: Arc<FunctionPool>,
    _permit: OwnedSemaphorePermit,
}

impl Lease {
    /// The leased instance.
    pub fn instance(&mut self) -> &mut Instance {
        self.instance
            .as_mut()
            .expect("lease holds an instance until released")
    }

    /// Takes the instance out for disposal (it will not return to the pool).
    pub fn retire(mut self) -> Instance {
        let instance = self.instance.take().expect("lease holds an instance");
        self.pool.forget_one(&instance);
        instance
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(instance) = self.instance.take() {
            self.pool.forget_one(&instance);
            drop(instance);
        }
    }
}

struct PoolState {
    idle: HashMap<u32, Vec<Instance>>,
    live: u32,
    max_instances: u32,
}

struct FunctionPool {
    permits: Arc<Semaphore>,
    waiting: AtomicUsize,
    closed: AtomicBool,
    state: Mutex<PoolState>,
}

impl FunctionPool {
    fn new(max_instances: u32) -> Self {
        FunctionPool {
            permits: Arc::new(Semaphore::new(max_instances as usize)),
            waiting: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
            state: Mutex::new(PoolState {
                idle: HashMap::new(),
                live: 0,
                max_instances,
            }),
        }
    }

    /// Accounts for an instance leaving the pool for good (the caller kills it).
    fn forget_one(&self, instance: &Instance) {
        self.state.lock().expect("pool lock").live -= 1;
        metrics::instance_transition(
            instance.version.config.runtime,
            Some(InstanceState::Busy),
            None,
        );
    }
}

/// All pools of this server.
pub struct Pools {
    config: Arc<EngineConfig>,
    launcher: Arc<Launcher>,
    snapshots: Arc<Snapshots>,
    functions: Mutex<HashMap<String, Arc<FunctionPool>>>,
    shutting_down: AtomicBool,
}

impl Pools {
    /// Pools starting instances through `launcher`, from templates of `snapshots` when
    /// there are some.
    pub(crate) fn new(
        config: Arc<EngineConfig>,
        launcher: Arc<Launcher>,
        snapshots: Arc<Snapshots>,
    ) -> Self {
        Pools {
            config,
            launcher,
            snapshots,
            functions: Mutex::default(),
            shutting_down: AtomicBool::new(false),
        }
    }

    fn pool(&self, function_id: &str, max_instances: u32) -> Arc<FunctionPool> {
        let mut functions = self.functions.lock().expect("pools lock");
        let pool = functions
            .entry(function_id.to_owned())
            .or_insert_with(|| Arc::new(FunctionPool::new(max_instances)))
            .clone();
        drop(functions);
        resize(&pool, max_instances);
        pool
    }

    /// Checks out an instance of `version` for one invocation, waiting in the function's
    /// queue for capacity if needed.
    pub async fn acquire(
        &self,
        version: &Arc<VersionEntry>,
        max_instances: u32,
    ) -> EngineResult<Result<Lease, (StartError, StartType)>> {
        if self.shutting_down.load(Ordering::Relaxed) {
            return Err(EngineError::ShuttingDown);
        }
        let pool = self.pool(&version.function_id, max_instances);
        let permit = match pool.permits.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                self.wait_for_capacity(&pool, &version.function_name)
                    .await?
            }
        };
        let runtime = version.config.runtime;
        let evicted = loop {
            let step = {
                let mut state = pool.state.lock().expect("pool lock");
                match state.idle.get_mut(&version.version).and_then(Vec::pop) {
                    Some(mut instance) => {
                        if instance.sandbox.try_exit().is_some() {
                            state.live -= 1;
                            Step::Dead(instance)
                        } else {
                            Step::Warm(instance)
                        }
                    }
                    None if state.live < state.max_instances => {
                        state.live += 1;
                        Step::Start(None)
                    }
                    // At the limit: make room by stopping another version's idle instance.
                    None => match take_least_recently_used(&mut state.idle) {
                        Some(old) => Step::Start(Some(old)),
                        None => Step::Wait,
                    },
                }
            };
            match step {
                Step::Warm(instance) => {
                    metrics::instance_transition(
                        runtime,
                        Some(InstanceState::Idle),
                        Some(InstanceState::Busy),
                    );
                    return Ok(Ok(Lease {
                        instance: Some(instance),
                        start_type: StartType::Warm,
                        pool,
                        _permit: permit,
                    }));
                }
                // Died while idle (e.g. a background thread exited the process): replace it.
                Step::Dead(dead) => {
                    metrics::instance_transition(runtime, Some(InstanceState::Idle), None);
                    drop(dead);
                }
                Step::Start(evicted) => break evicted,
                // Only while the limit is being lowered: wait for running instances to retire.
                Step::Wait => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        };
        if let Some(old) = evicted {
            metrics::instance_transition(
                old.version.config.runtime,
                Some(InstanceState::Idle),
                None,
            );
            tokio::spawn(old.kill());
        }
        metrics::instance_transition(runtime, None, Some(InstanceState::Starting));
        match self.start(version).await {
            Ok((instance, start_type)) => {
                metrics::instance_transition(
                    runtime,
                    Some(InstanceState::Starting),
                    Some(InstanceState::Busy),
                );
                Ok(Ok(Lease {
                    instance: Some(instance),
                    start_type,
                    pool,
                    _permit: permit,
                }))
            }
            Err(e) => {
                pool.state.lock().expect("pool lock").live -= 1;
                metrics::instance_transition(runtime, Some(InstanceState::Starting), None);
                Ok(Err(e))
            }
        }
    }

    async fn wait_for_capacity(
        &self,
        pool: &Arc<FunctionPool>,
        function_name: &str,
    ) -> EngineResult<OwnedSemaphorePermit> {
        let queued = pool.waiting.fetch_add(1, Ordering::AcqRel);
        let _leave = WaitGuard(&pool.waiting);
        if queued >= self.config.queue_depth {
            return Err(EngineError::Throttled(format!(
                "function {function_name:?} is at its instance limit and {queued} invocations are already waiting"
            )));
        }
        match tokio::time::timeout(
            self.config.queue_timeout,
            pool.permits.clone().acquire_owned(),
        )
        .await
        {
            Ok(Ok(permit)) => Ok(permit),
            Ok(Err(_)) => Err(EngineError::ShuttingDown),
            Err(_) => Err(EngineError::Throttled(format!(
                "function {function_name:?} had no free capacity within {:?}",
                self.config.queue_timeout
            ))),
        }
    }

    /// Returns a healthy instance to its pool, or retires it if it has served enough.
    pub fn release(&self, mut lease: Lease) {
        let mut instance = lease.instance.take().expect("lease holds an instance");
        instance.sandbox.end_strays();
        instance.served += 1;
        instance.last_used = Instant::now();
        let runtime = instance.version.config.runtime;
        let worn_out = instance.served >= self.config.max_invocations
            || instance.started.elapsed() >= self.config.max_age;
        if worn_out || lease.pool.closed.load(Ordering::Relaxed) {
            lease.pool.forget_one(&instance);
            tokio::spawn(instance.kill());
            return;
        }
        let mut state = lease.pool.state.lock().expect("pool lock");
        state
            .idle
            .entry(instance.version.version)
            .or_default()
            .push(instance);
        drop(state);
        metrics::instance_transition(
            runtime,
            Some(InstanceState::Busy),
            Some(InstanceState::Idle),
        );
        // The permit is released when `lease` drops, after the instance is back in the pool.
    }

    /// Starts a new instance of `version` from scratch, outside any pool (the deploy-time
    /// check that new code loads).
    pub(crate) async fn start_cold(
        &self,
        version: &Arc<VersionEntry>,
    ) -> Result<Instance, StartError> {
        self.launcher.cold(version).await
    }

    /// Starts a new instance of `version`: forked from its template when there is one
    /// (falling back to a cold start if the template fails), cold otherwise. A failure
    /// says how the instance was being started.
    async fn start(
        &self,
        version: &Arc<VersionEntry>,
    ) -> Result<(Instance, StartType), (StartError, StartType)> {
        if let Some(template) = self.snapshots.resident(version).await {
            let started = Instant::now();
            match self.launcher.fork(version, &template).await {
                Ok(instance) => {
                    self.snapshots.restored(&template, ms_since(started));
                    return Ok((instance, StartType::Template));
                }
                // The user's after-restore hook failed: the instance's failure, not the
                // template's.
                Err(e @ StartError::Init { .. }) => return Err((e, StartType::Template)),
                Err(e) => self.snapshots.restore_failed(version, &template, &e).await,
            }
        } else if let Some(copy) = self.snapshots.take_on_disk(version) {
            // From disk: the template comes back, then this instance forks from it.
            let started = Instant::now();
            if let Some(template) = self.snapshots.restore(version, copy).await {
                match self.launcher.fork(version, &template).await {
                    Ok(instance) => {
                        self.snapshots.restored(&template, ms_since(started));
                        return Ok((instance, StartType::Snapshot));
                    }
                    Err(e @ StartError::Init { .. }) => return Err((e, StartType::Snapshot)),
                    Err(e) => {
                        self.snapshots
                            .restored_template_failed(version, &template, &e)
                            .await
                    }
                }
            }
        } else {
            self.snapshots.wanted(version);
        }
        match self.launcher.cold(version).await {
            Ok(instance) => Ok((instance, StartType::Cold)),
            Err(e) => Err((e, StartType::Cold)),
        }
    }

    /// Stops instances idle longer than `idle_timeout` or older than `max_age`; returns how many.
    pub fn reap_idle(&self) -> usize {
        let pools: Vec<Arc<FunctionPool>> = self
            .functions
            .lock()
            .expect("pools lock")
            .values()
            .cloned()
            .collect();
        let mut reaped = 0;
        for pool in pools {
            let mut expired = Vec::new();
            {
                let mut state = pool.state.lock().expect("pool lock");
                for instances in state.idle.values_mut() {
                    let (keep, old) = std::mem::take(instances)
                        .into_iter()
                        .partition(|i| !self.expired(i));
                    *instances = keep;
                    expired.extend::<Vec<Instance>>(old);
                }
                state.live -= expired.len() as u32;
            }
            reaped += expired.len();
            stop_idle(expired);
        }
        reaped
    }

    fn expired(&self, instance: &Instance) -> bool {
        instance.last_used.elapsed() >= self.config.idle_timeout
            || instance.started.elapsed() >= self.config.max_age
    }

    /// Stops the idle instances of a deleted version; busy ones age out after they finish,
    /// since nothing routes to the version any more.
    pub fn retire_version(&self, function_id: &str, version: u32) {
        let pool = self
            .functions
            .lock()
            .expect("pools lock")
            .get(function_id)
            .cloned();
        let Some(pool) = pool else { return };
        let idle = {
            let mut state = pool.state.lock().expect("pool lock");
            let idle = state.idle.remove(&version).unwrap_or_default();
            state.live -= idle.len() as u32;
            idle
        };
        stop_idle(idle);
    }

    /// Stops every idle instance of a function and makes its busy ones stop when released.
    pub fn remove_function(&self, function_id: &str) {
        let pool = self
            .functions
            .lock()
            .expect("pools lock")
            .remove(function_id);
        if let Some(pool) = pool {
            close(&pool);
        }
    }

    /// Stops all idle instances; busy ones stop when released. New acquisitions fail.
    pub fn shutdown(&self) {
        self.shutting_down.store(true, Ordering::Relaxed);
        let pools: Vec<Arc<FunctionPool>> = self
            .functions
            .lock()
            .expect("pools lock")
            .drain()
            .map(|(_, p)| p)
            .collect();
        for pool in pools {
            close(&pool);
        }
    }

    /// Instances alive (idle and busy) for a function, for tests and admin views.
    pub fn live_instances(&self, function_id: &str) -> u32 {
        self.functions
            .lock()
            .expect("pools lock")
            .get(function_id)
            .map(|p| p.state.lock().expect("pool lock").live)
            .unwrap_or(0)
    }
}

fn close(pool: &FunctionPool) {
    pool.closed.store(true, Ordering::Relaxed);
    pool.permits.close();
    let idle: Vec<Instance> = {
        let mut state = pool.state.lock().expect("pool lock");
        let idle: Vec<Instance> = state.idle.drain().flat_map(|(_, v)| v).collect();
        state.live -= idle.len() as u32;
        idle
    };
    stop_idle(idle);
}

/// Stops instances taken out of the idle lists (their sandboxes kill them when dropped).
fn stop_idle(instances: Vec<Instance>) {
    for instance in instances {
        metrics::instance_transition(
            instance.version.config.runtime,
            Some(InstanceState::Idle),
            None,
        );
        drop(instance);
    }
}

fn resize(pool: &FunctionPool, max_instances: u32) {
    let mut state = pool.state.lock().expect("pool lock");
    if state.max_instances == max_instances {
        return;
    }
    let old = state.max_instances;
    state.max_instances = max_instances;
    drop(state);
    if max_instances > old {
        pool.permits.add_permits((max_instances - old) as usize);
    } else {
        // Shrink as running invocations finish.
        let permits = pool.permits.clone();
        let excess = old - max_instances;
        tokio::spawn(async move {
            if let Ok(p) = permits.acquire_many_owned(excess).await {
                p.forget();
            }
        });
    }
}

fn take_least_recently_used(idle: &mut HashMap<u32, Vec<Instance>>) -> Option<Instance> {
    let (&version, _) = idle
        .iter()
        .filter_map(|(v, list)| list.first().map(|i| (v, i.last_used)))
        .min_by_key(|(_, used)| *used)?;
    let list = idle.get_mut(&version)?;
    Some(list.remove(0))
}

/// What `acquire` found in the pool.
enum Step {
    Warm(Instance),
    Dead(Instance),
    Start(Option<Instance>),
    Wait,
}

struct WaitGuard<'a>(&'a AtomicUsize);

impl Drop for WaitGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}
