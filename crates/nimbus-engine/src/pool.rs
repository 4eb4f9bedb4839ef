//! Instance pools: per function, the idle instances of each version, the capacity bound
//! (`max_instances`), and the bounded queue of invocations waiting for capacity.
//!
//! Capacity is a semaphore of `max_instances` permits per function: an invocation holds one
//! permit while it runs, so at most `max_instances` run at once. With a permit in hand, an
//! invocation takes the most recently used idle instance of its version (`warm`) or starts a
//! new one (`cold`), first stopping the least recently used idle instance of another version
//! if the function is at its instance limit.
//!
//! With session affinity (see [`crate::affinity`]), an invocation with a session key first
//! takes its session's turn (invocations of one session run one at a time, in arrival
//! order), then its session's instance, waiting for it if another session's invocation is
//! on it; a new session (or one whose instance is gone) is placed by consistent hashing
//! with bounded loads, on a new instance when the chosen one is busy and the function is
//! under its limit.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nimbus_core::{SnapshotUse, StartType};
use nimbus_runtime::WorkerConn;
use nimbus_sandbox::{ExitInfo, Sandbox};
use tokio::sync::{Notify, OwnedMutexGuard, OwnedSemaphorePermit, Semaphore};

use crate::affinity::{self, Bindings, SessionRoute};
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
    /// The session's turn, given up with the lease (after the instance is back).
    _turn: Option<SessionTurn>,
}

/// What an invocation with a session key asks of a function with session affinity.
#[derive(Debug, Clone)]
pub struct SessionRequest {
    /// The session key.
    pub key: String,
    /// How long its binding lasts after this invocation.
    pub timeout: Duration,
    /// Whether the session registry had it bound to an instance: without a binding on this
    /// server, it is then rebound rather than new.
    pub was_bound: bool,
}

/// One session's turn ([`Pools::turn`]): held from before its invocation takes an
/// instance until the instance is back, so the session's invocations run one at a time, in
/// arrival order.
pub struct SessionTurn {
    pool: Arc<FunctionPool>,
    key: String,
    guard: Option<OwnedMutexGuard<()>>,
}

impl Drop for SessionTurn {
    fn drop(&mut self) {
        drop(self.guard.take());
        let mut turns = self.pool.turns.lock().expect("turns lock");
        // Nobody holds or waits for this session's lock: forget it.
        if turns
            .get(&self.key)
            .is_some_and(|l| Arc::strong_count(l) == 1)
        {
            turns.remove(&self.key);
        }
    }
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
    /// The version of every started instance still alive (idle or busy), by id: where
    /// sessions are placed.
    members: HashMap<String, u32>,
    live: u32,
    max_instances: u32,
    /// Sessions bound to instances (functions with session affinity).
    bindings: Bindings,
}

impl PoolState {
    /// Takes the idle instance `id` of `version` out of the idle list.
    fn take_idle(&mut self, version: u32, id: &str) -> Option<Instance> {
        let list = self.idle.get_mut(&version)?;
        let at = list.iter().position(|i| i.id == id)?;
        Some(list.remove(at))
    }

    /// Accounts for idle instances taken out to be stopped.
    fn drop_idle(&mut self, stopped: &[Instance]) {
        self.live -= stopped.len() as u32;
        for instance in stopped {
            self.members.remove(&instance.id);
        }
    }
}

struct FunctionPool {
    permits: Arc<Semaphore>,
    waiting: AtomicUsize,
    closed: AtomicBool,
    state: Mutex<PoolState>,
    /// Woken whenever an instance comes back or leaves: invocations waiting for their
    /// session's instance look again.
    released: Notify,
    /// Per session, the lock that orders its invocations.
    turns: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl FunctionPool {
    fn new(max_instances: u32) -> Self {
        FunctionPool {
            permits: Arc::new(Semaphore::new(max_instances as usize)),
            waiting: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
            state: Mutex::new(PoolState {
                idle: HashMap::new(),
                members: HashMap::new(),
                live: 0,
                max_instances,
                bindings: Bindings::default(),
            }),
            released: Notify::new(),
            turns: Mutex::default(),
        }
    }

    /// Accounts for an instance leaving the pool for good (the caller kills it).
    fn forget_one(&self, instance: &Instance) {
        {
            let mut state = self.state.lock().expect("pool lock");
            state.live -= 1;
            state.members.remove(&instance.id);
        }
        self.released.notify_waiters();
        metrics::instance_transition(
            instance.version.config.runtime,
            Some(InstanceState::Busy),
            None,
        );
    }

    /// Waits for `key`'s turn (tokio's mutex is fair: turns come in arrival order). Waiting
    /// for a turn counts against the function's queue like waiting for capacity does: at
    /// most `queue_depth` waiters, each for at most `queue_timeout`, else `Throttled`.
    async fn turn(
        self: &Arc<Self>,
        key: &str,
        config: &EngineConfig,
        function_name: &str,
    ) -> EngineResult<SessionTurn> {
        let lock = self
            .turns
            .lock()
            .expect("turns lock")
            .entry(key.to_owned())
            .or_default()
            .clone();
        let turn = |guard| SessionTurn {
            pool: self.clone(),
            key: key.to_owned(),
            guard: Some(guard),
        };
        if let Ok(guard) = lock.clone().try_lock_owned() {
            return Ok(turn(guard));
        }
        let queued = self.waiting.fetch_add(1, Ordering::AcqRel);
        let _leave = WaitGuard(&self.waiting);
        if queued >= config.queue_depth {
            return Err(EngineError::Throttled(format!(
                "function {function_name:?} has {queued} invocations waiting already; session {} waits for its previous invocation", nimbus_core::echo(key)
            )));
        }
        match tokio::time::timeout(config.queue_timeout, lock.lock_owned()).await {
            Ok(guard) => Ok(turn(guard)),
            Err(_) => Err(EngineError::Throttled(format!(
                "session {} of function {function_name:?} was busy with earlier invocations for {:?}",
                nimbus_core::echo(key),
                config.queue_timeout
            ))),
        }
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

    /// The function's pool, if it has one.
    fn existing(&self, function_id: &str) -> Option<Arc<FunctionPool>> {
        self.functions
            .lock()
            .expect("pools lock")
            .get(function_id)
            .cloned()
    }

    /// Waits for the turn of `session` of a function with session affinity: take it as
    /// soon as the invocation arrives, before anything else it waits for.
    pub async fn turn(
        &self,
        version: &VersionEntry,
        max_instances: u32,
        session: &str,
    ) -> EngineResult<SessionTurn> {
        self.pool(&version.function_id, max_instances)
            .turn(session, &self.config, &version.function_name)
            .await
    }

    /// Checks out an instance of `version` for one invocation, waiting in the function's
    /// queue for capacity if needed; with `session` (a function with session affinity,
    /// whose `turn` the invocation holds), the session's instance (see the module's
    /// documentation).
    pub async fn acquire(
        &self,
        version: &Arc<VersionEntry>,
        max_instances: u32,
        session: Option<(SessionRequest, SessionTurn)>,
    ) -> EngineResult<Result<Lease, (StartError, StartType)>> {
        if self.shutting_down.load(Ordering::Relaxed) {
            return Err(EngineError::ShuttingDown);
        }
        let pool = self.pool(&version.function_id, max_instances);
        let (session, turn) = match session {
            Some((session, turn)) => (Some(session), Some(turn)),
            None => (None, None),
        };
        let session = session.as_ref();
        let permit = match pool.permits.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                self.wait_for_capacity(&pool, &version.function_name)
                    .await?
            }
        };
        let runtime = version.config.runtime;
        let mut route = None;
        // How long an invocation waits for its session's busy instance before it is placed
        // elsewhere (its state is in the backend either way).
        let patience = tokio::time::Instant::now() + self.config.queue_timeout;
        let mut patient = true;
        let evicted = loop {
            // The function was deleted (or the server is stopping) while this waited.
            if pool.closed.load(Ordering::Relaxed) {
                return Err(EngineError::ShuttingDown);
            }
            // Made before looking, so that a release right after the look is not missed.
            let released = pool.released.notified();
            let step = {
                let mut state = pool.state.lock().expect("pool lock");
                match session {
                    Some(session) => {
                        session_step(&mut state, version.version, session, patient, &mut route)
                    }
                    None => any_step(&mut state, version.version),
                }
            };
            match step {
                Step::Warm(instance) => {
                    drop(released);
                    metrics::instance_transition(
                        runtime,
                        Some(InstanceState::Idle),
                        Some(InstanceState::Busy),
                    );
                    count_route(route);
                    return Ok(Ok(Lease {
                        instance: Some(instance),
                        start_type: StartType::Warm,
                        pool,
                        _permit: permit,
                        _turn: turn,
                    }));
                }
                // Died while idle (e.g. a background thread exited the process): replace it.
                Step::Dead(dead) => {
                    metrics::instance_transition(runtime, Some(InstanceState::Idle), None);
                    drop(dead);
                }
                Step::Start(evicted) => break evicted,
                // The session's instance is busy with another session's invocation.
                Step::WaitFor if patient => {
                    if tokio::time::timeout_at(patience, released).await.is_err() {
                        patient = false;
                    }
                }
                Step::WaitFor => released.await,
                // Only while the limit is being lowered: wait for running instances to retire.
                // Also while every instance the session may wait for is still starting.
                Step::Wait => {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    patient &= tokio::time::Instant::now() < patience;
                }
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
        count_route(route);
        match self.start(version).await {
            Ok((instance, start_type)) => {
                {
                    let mut state = pool.state.lock().expect("pool lock");
                    state.members.insert(instance.id.clone(), version.version);
                    if let Some(session) = session {
                        bind(&mut state.bindings, session, &instance.id);
                    }
                }
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
                    _turn: turn,
                }))
            }
            Err(e) => {
                pool.state.lock().expect("pool lock").live -= 1;
                metrics::instance_transition(runtime, Some(InstanceState::Starting), None);
                Ok(Err(e))
            }
        }
    }

    /// Whether this server has `session` of the function bound to a live instance.
    pub fn is_bound(&self, function_id: &str, session: &str) -> bool {
        let pool = self.existing(function_id);
        pool.is_some_and(|pool| {
            let state = pool.state.lock().expect("pool lock");
            state
                .bindings
                .bound(session, Instant::now())
                .is_some_and(|id| state.members.contains_key(id))
        })
    }

    /// Forgets `session`'s binding on this server (the session was deleted).
    pub fn unbind(&self, function_id: &str, session: &str) {
        let pool = self.existing(function_id);
        if let Some(pool) = pool {
            if pool
                .state
                .lock()
                .expect("pool lock")
                .bindings
                .unbind(session)
            {
                metrics::sessions_bound(-1);
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
        lease.pool.released.notify_waiters();
        metrics::instance_transition(
            runtime,
            Some(InstanceState::Busy),
            Some(InstanceState::Idle),
        );
        // The permit is released when `lease` drops, after the instance is back in the pool.
    }

    /// Starts a new instance of `version` from scratch, outside any pool, as the deploy-time
    /// check that its code loads (see [`Launcher::deploy_check`] for `new_code`).
    pub(crate) async fn start_deploy_check(
        &self,
        version: &Arc<VersionEntry>,
        new_code: bool,
    ) -> Result<Instance, StartError> {
        let started = Instant::now();
        let instance = self.launcher.deploy_check(version, new_code).await?;
        self.snapshots.started_cold(version, started.elapsed());
        Ok(instance)
    }

    /// Starts a new instance of `version`: forked from its template when there is one
    /// (falling back to a cold start if the template fails), restored from its checkpoint,
    /// forked from the template being built or restored when waiting for it is faster, cold
    /// otherwise. A failure says how the instance was being started.
    async fn start(
        &self,
        version: &Arc<VersionEntry>,
    ) -> Result<(Instance, StartType), (StartError, StartType)> {
        let mut waited = false;
        loop {
            if let Some(template) = self.snapshots.resident(version).await {
                let started = Instant::now();
                match self.launcher.fork(version, &template).await {
                    Ok(instance) => {
                        let ms = ms_since(started);
                        self.snapshots.restored(&template, SnapshotUse::Fork, ms);
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
                            let ms = ms_since(started);
                            self.snapshots.restored(&template, SnapshotUse::Restore, ms);
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
                state.drop_idle(&expired);
                let lapsed = state.bindings.sweep(Instant::now());
                metrics::sessions_bound(-(lapsed as i64));
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
        let pool = self.existing(function_id);
        let Some(pool) = pool else { return };
        let idle = {
            let mut state = pool.state.lock().expect("pool lock");
            let idle = state.idle.remove(&version).unwrap_or_default();
            state.drop_idle(&idle);
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
        self.existing(function_id)
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
        state.drop_idle(&idle);
        let bound = std::mem::take(&mut state.bindings).len();
        metrics::sessions_bound(-(bound as i64));
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
        // Sessions waiting for a busy instance may start one of their own now.
        pool.released.notify_waiters();
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

/// The least recently used idle instance of a version other than `keep`.
fn take_least_recently_used(idle: &mut HashMap<u32, Vec<Instance>>, keep: u32) -> Option<Instance> {
    let (&version, _) = idle
        .iter()
        .filter(|(v, _)| **v != keep)
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
    /// Wait for an instance to come back (the session's instance is busy).
    WaitFor,
    Wait,
}

/// Takes an idle instance out as a warm (or dead) one.
fn checked_out(state: &mut PoolState, mut instance: Instance) -> Step {
    if instance.sandbox.try_exit().is_some() {
        state.live -= 1;
        state.members.remove(&instance.id);
        Step::Dead(instance)
    } else {
        Step::Warm(instance)
    }
}

/// Without a session: the most recently used idle instance of the version, or room for a
/// new one (stopping another version's least recently used idle instance at the limit).
fn any_step(state: &mut PoolState, version: u32) -> Step {
    match state.idle.get_mut(&version).and_then(Vec::pop) {
        Some(instance) => checked_out(state, instance),
        None => make_room(state, version),
    }
}

/// Room for a new instance of `version`: under the limit, or by stopping another
/// version's least recently used idle instance at it (never one of `version`'s own, which
/// sessions may be bound to).
fn make_room(state: &mut PoolState, version: u32) -> Step {
    if state.live < state.max_instances {
        state.live += 1;
        return Step::Start(None);
    }
    match take_least_recently_used(&mut state.idle, version) {
        Some(old) => {
            state.members.remove(&old.id);
            Step::Start(Some(old))
        }
        None => Step::Wait,
    }
}

/// With a session: its instance if it is alive (waiting for it while busy, unless the
/// invocation ran out of `patient`ce), else a place for it. `route` records how the
/// session was found, the first time.
fn session_step(
    state: &mut PoolState,
    version: u32,
    session: &SessionRequest,
    patient: bool,
    route: &mut Option<SessionRoute>,
) -> Step {
    let bound = state
        .bindings
        .bound(&session.key, Instant::now())
        .map(str::to_owned);
    if let Some(id) = bound {
        if patient && state.members.get(&id) == Some(&version) {
            route.get_or_insert(SessionRoute::Hit);
            return match state.take_idle(version, &id) {
                Some(instance) => {
                    bind(&mut state.bindings, session, &id);
                    checked_out(state, instance)
                }
                None => Step::WaitFor,
            };
        }
        // Gone (stopped, crashed, recycled), of another version, or busy for too long.
        if state.bindings.unbind(&session.key) {
            metrics::sessions_bound(-1);
        }
        *route = Some(SessionRoute::Rebound);
    } else if route.is_none() {
        *route = Some(if session.was_bound {
            SessionRoute::Rebound
        } else {
            SessionRoute::Miss
        });
    }
    // Where it goes, in order of preference along its walk of the ring (consistent
    // hashing; the cap bounds loads over the version's instances, those still starting
    // included, so the first instance up does not take every new session): an idle
    // instance under the cap; a new instance while under the limit (bound once started);
    // once impatient, any idle instance; a new one in place of another version's idle
    // instance; else it waits, for the instance under the cap while patient, for any
    // after that.
    let ids: Vec<String> = state
        .members
        .iter()
        .filter(|(_, v)| **v == version)
        .map(|(id, _)| id.clone())
        .collect();
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let loads: Vec<usize> = refs.iter().map(|id| state.bindings.load(id)).collect();
    let starting = state.live as usize - state.members.len();
    let cap = affinity::cap(loads.iter().sum(), ids.len() + starting);
    let order = affinity::ring_order(&session.key, &refs);
    let is_idle = |id: &str| {
        state
            .idle
            .get(&version)
            .is_some_and(|list| list.iter().any(|i| i.id == id))
    };
    let under_cap = order.iter().copied().filter(|&i| loads[i] < cap);
    let pick = |state: &mut PoolState, i: usize| {
        let instance = state
            .take_idle(version, &ids[i])
            .expect("picked among the idle instances");
        bind(&mut state.bindings, session, &ids[i]);
        checked_out(state, instance)
    };
    if let Some(i) = under_cap.clone().find(|&i| is_idle(&ids[i])) {
        return pick(state, i);
    }
    if state.live < state.max_instances {
        state.live += 1;
        return Step::Start(None);
    }
    if !patient {
        if let Some(i) = order.iter().copied().find(|&i| is_idle(&ids[i])) {
            return pick(state, i);
        }
    }
    match make_room(state, version) {
        Step::Wait if patient => match under_cap.clone().next() {
            Some(i) => {
                bind(&mut state.bindings, session, &ids[i]);
                Step::WaitFor
            }
            None => Step::Wait,
        },
        Step::Wait => Step::WaitFor,
        step => step,
    }
}

/// Binds (or rebinds) `session` to `instance`, counting new bindings.
fn bind(bindings: &mut Bindings, session: &SessionRequest, instance: &str) {
    if bindings.bind(&session.key, instance, session.timeout) {
        metrics::sessions_bound(1);
    }
}

fn count_route(route: Option<SessionRoute>) {
    if let Some(route) = route {
        metrics::session_route(route.as_str());
    }
}

struct WaitGuard<'a>(&'a AtomicUsize);

impl Drop for WaitGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}
