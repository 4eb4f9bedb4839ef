//! Instance pools: per function, the idle instances of each version, the capacity bound
//! (`max_instances`), and the bounded queue of invocations waiting for capacity.
//!
//! Capacity is a semaphore of `max_instances` permits per function: an invocation holds one
//! permit while it runs, so at most `max_instances` run at once. With a permit in hand, an
//! invocation takes the most recently used idle instance of its version (`warm`) or has the
//! [starter](crate::starter) start a new one, first stopping the least recently used idle
//! instance of another version if the function is at its instance limit. Which of these
//! it gets is decided by [`crate::affinity::placement`] on the pool's state.
//!
//! With session affinity (see [`crate::affinity`]), an invocation with a session key first
//! takes its session's turn (invocations of one session run one at a time, in arrival
//! order), then its session's instance, waiting for it if another session's invocation is
//! on it; a new session (or one whose instance is gone) is placed by consistent hashing
//! with bounded loads, on a new instance when the chosen one is busy and the function is
//! under its limit.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nimbus_core::StartType;
use tokio::sync::{Notify, OwnedMutexGuard, OwnedSemaphorePermit, Semaphore};

use crate::affinity::placement::{
    any_step, bind, session_step, Member, PoolState, SessionRequest, Step,
};
use crate::affinity::SessionRoute;
use crate::catalog::VersionEntry;
use crate::config::EngineConfig;
use crate::error::{EngineError, EngineResult};
use crate::instance::{Instance, StartFailure};
use crate::metrics::{self, InstanceState};
use crate::starter::Starter;

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

/// An invocation's session, for a function with session affinity.
pub(crate) struct SessionAsk<'a> {
    /// The session key.
    pub(crate) key: &'a str,
    /// How long its binding lasts after this invocation.
    pub(crate) timeout: Duration,
    /// Whether the session registry has the session bound to an instance (somewhere):
    /// awaited in the session's turn, and only if this server has no binding for it.
    pub(crate) was_bound: Pin<Box<dyn Future<Output = bool> + Send + 'a>>,
}

/// Why [`Pools::acquire`] gave no instance.
#[derive(Debug)]
pub(crate) enum AcquireError {
    /// None was looked for: the function is throttled, or it (or the server) is going
    /// away.
    Refused(EngineError),
    /// A new instance was started for the invocation and did not come up.
    Start(StartFailure),
}

impl From<EngineError> for AcquireError {
    fn from(e: EngineError) -> Self {
        AcquireError::Refused(e)
    }
}

/// One session's turn: held from before its invocation takes an instance until the
/// instance is back, so the session's invocations run one at a time, in arrival order.
struct SessionTurn {
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

impl Member for Instance {
    fn id(&self) -> &str {
        &self.id
    }

    fn last_used(&self) -> Instant {
        self.last_used
    }

    fn has_ended(&mut self) -> bool {
        self.sandbox.try_exit().is_some()
    }
}

struct FunctionPool {
    permits: Arc<Semaphore>,
    waiting: AtomicUsize,
    closed: AtomicBool,
    state: Mutex<PoolState<Instance>>,
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
            state: Mutex::new(PoolState::new(max_instances)),
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
pub(crate) struct Pools {
    config: Arc<EngineConfig>,
    starter: Arc<Starter>,
    functions: Mutex<HashMap<String, Arc<FunctionPool>>>,
    shutting_down: AtomicBool,
}

impl Pools {
    /// Pools whose new instances `starter` starts.
    pub(crate) fn new(config: Arc<EngineConfig>, starter: Arc<Starter>) -> Self {
        Pools {
            config,
            starter,
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

    /// Checks out an instance of `version` for one invocation, waiting in the function's
    /// queue for capacity if needed; with `session` (a function with session affinity),
    /// first the session's turn, then the session's instance (see the module's
    /// documentation). The caller gives the lease back with [`Pools::release`].
    pub(crate) async fn acquire(
        &self,
        version: &Arc<VersionEntry>,
        max_instances: u32,
        session: Option<SessionAsk<'_>>,
    ) -> Result<Lease, AcquireError> {
        let (session, turn) = match session {
            Some(ask) => {
                // Taken as soon as the invocation arrives, before anything else it waits for.
                let turn = self
                    .pool(&version.function_id, max_instances)
                    .turn(ask.key, &self.config, &version.function_name)
                    .await?;
                let was_bound =
                    !self.is_bound(&version.function_id, ask.key) && ask.was_bound.await;
                let session = SessionRequest {
                    key: ask.key.to_owned(),
                    timeout: ask.timeout,
                    was_bound,
                };
                (Some(session), Some(turn))
            }
            None => (None, None),
        };
        if self.shutting_down.load(Ordering::Relaxed) {
            return Err(EngineError::ShuttingDown.into());
        }
        let pool = self.pool(&version.function_id, max_instances);
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
                return Err(EngineError::ShuttingDown.into());
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
                    return Ok(Lease {
                        instance: Some(instance),
                        start_type: StartType::Warm,
                        pool,
                        _permit: permit,
                        _turn: turn,
                    });
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
        match self.starter.start(version).await {
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
                Ok(Lease {
                    instance: Some(instance),
                    start_type,
                    pool,
                    _permit: permit,
                    _turn: turn,
                })
            }
            Err(e) => {
                pool.state.lock().expect("pool lock").live -= 1;
                metrics::instance_transition(runtime, Some(InstanceState::Starting), None);
                Err(AcquireError::Start(e))
            }
        }
    }

    /// Whether this server has `session` of the function bound to a live instance.
    pub(crate) fn is_bound(&self, function_id: &str, session: &str) -> bool {
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
