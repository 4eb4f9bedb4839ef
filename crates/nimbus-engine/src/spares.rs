//! The template tier of runtimes whose workers cannot be forked (Node.js is
//! multi-threaded): a few instances of one version started ahead, each with the function
//! loaded and its `ready` greeting waiting unread in its socket.
//!
//! A start takes one, whose handshake then completes at once, and another is started
//! behind it. Starts that find none ready wait for the next one to come up rather than
//! starting more of their own, and each waiting start adds one to those being started, so
//! a burst is served as fast as workers can be started. A spare that fails to come up
//! breaks the set: the snapshot manager then drops it, and the version's next cold start
//! builds a new one.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use nimbus_sandbox::{DriverError, Launched, Template};
use tokio::sync::Notify;

use crate::catalog::VersionEntry;
use crate::launcher::{Launcher, StartError};

/// Instances of one version started ahead of their use (see the module docs).
pub(crate) struct Spares {
    shared: Arc<Shared>,
}

struct Shared {
    /// Starts the spares.
    launcher: Arc<Launcher>,
    /// The version they are instances of.
    version: Arc<VersionEntry>,
    /// Spares kept ready when no start is waiting.
    target: usize,
    /// What is ready, coming and waiting.
    state: Mutex<State>,
    /// A spare came up, or the set broke.
    changed: Notify,
}

#[derive(Default)]
struct State {
    /// Spares with the function loaded and their greeting unread, oldest first.
    ready: VecDeque<Launched>,
    /// Spares being started.
    starting: usize,
    /// Starts waiting for a spare.
    waiting: usize,
    /// Why a spare failed to come up: the set is not used any more.
    broken: Option<String>,
    /// The set was dropped: spares still coming up are stopped when they do.
    closed: bool,
}

impl Spares {
    /// Starts `count` (at least one) spares of `version` and returns once all are ready;
    /// the first failure fails the whole set.
    pub(crate) async fn start(
        launcher: Arc<Launcher>,
        version: Arc<VersionEntry>,
        count: usize,
    ) -> Result<Spares, StartError> {
        let target = count.max(1);
        let mut starting = tokio::task::JoinSet::new();
        for _ in 0..target {
            let (launcher, version) = (launcher.clone(), version.clone());
            starting.spawn(async move { launcher.spare(&version).await });
        }
        let mut ready = VecDeque::with_capacity(target);
        while let Some(started) = starting.join_next().await {
            let started =
                started.map_err(|e| StartError::Crashed(format!("starting a spare: {e}")))?;
            // Returning drops the set: the other spares are aborted or killed with it.
            ready.push_back(started?);
        }
        Ok(Spares {
            shared: Arc::new(Shared {
                launcher,
                version,
                target,
                state: Mutex::new(State {
                    ready,
                    ..State::default()
                }),
                changed: Notify::new(),
            }),
        })
    }
}

impl Shared {
    /// Starts spares until the ready and coming ones cover the target and every waiting
    /// start.
    fn top_up(self: &Arc<Self>) {
        let mut state = self.state.lock().expect("spares lock");
        // A spare that ended while it waited (killed from outside) is replaced, not handed out.
        state
            .ready
            .retain_mut(|spare| spare.sandbox.try_exit().is_none());
        while !state.closed
            && state.broken.is_none()
            && state.ready.len() + state.starting < self.target + state.waiting
        {
            state.starting += 1;
            let shared = self.clone();
            tokio::spawn(async move {
                let started = shared.launcher.spare(&shared.version).await;
                let mut state = shared.state.lock().expect("spares lock");
                state.starting -= 1;
                match started {
                    // Dropped meanwhile (evicted, or the server stops): not wanted.
                    _ if state.closed => {}
                    // The start it was for gave up (timed out and went cold): one too many.
                    Ok(_surplus) if state.ready.len() >= shared.target + state.waiting => {}
                    Ok(spare) => state.ready.push_back(spare),
                    Err(e) => {
                        tracing::warn!(
                            function = %shared.version.function_name,
                            version = shared.version.version,
                            "a spare instance did not start: {e}"
                        );
                        state.broken = Some(format!("a spare instance did not start: {e}"));
                    }
                }
                drop(state);
                shared.changed.notify_waiters();
            });
        }
    }
}

/// Counts a start among the waiting ones for as long as it waits (also if it is dropped
/// while waiting, as by a timeout).
struct Waiting<'a>(&'a Shared);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.state.lock().expect("spares lock").waiting -= 1;
    }
}

#[async_trait]
impl Template for Spares {
    /// A ready spare (started ahead as an instance of its own id, which
    /// [`Launched::instance_id`] tells; `instance_id` only names a failure).
    async fn spawn(&self, instance_id: &str) -> Result<Launched, DriverError> {
        let shared = &self.shared;
        let mut waiting = None;
        loop {
            let changed = shared.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            {
                let mut state = shared.state.lock().expect("spares lock");
                while let Some(mut spare) = state.ready.pop_front() {
                    if spare.sandbox.try_exit().is_some() {
                        continue; // ended while it waited (killed from outside)
                    }
                    drop(state);
                    drop(waiting);
                    shared.top_up();
                    return Ok(spare);
                }
                if let Some(why) = &state.broken {
                    return Err(DriverError {
                        instance_id: instance_id.to_owned(),
                        message: why.clone(),
                        refused: false,
                    });
                }
                if waiting.is_none() {
                    state.waiting += 1;
                    waiting = Some(Waiting(shared));
                }
            }
            shared.top_up();
            changed.await;
        }
    }

    fn alive(&self) -> bool {
        self.shared
            .state
            .lock()
            .expect("spares lock")
            .broken
            .is_none()
    }

    /// The memory the ready spares hold (what keeping the set costs), as far as known.
    fn resident_bytes(&self) -> Option<u64> {
        let state = self.shared.state.lock().expect("spares lock");
        let known: Vec<u64> = state
            .ready
            .iter()
            .filter_map(|spare| spare.sandbox.resident_bytes())
            .collect();
        (!known.is_empty()).then(|| known.iter().sum())
    }
}

impl std::fmt::Debug for Spares {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.shared.state.lock().expect("spares lock");
        f.debug_struct("Spares")
            .field("ready", &state.ready.len())
            .field("starting", &state.starting)
            .field("broken", &state.broken)
            .finish()
    }
}

impl Drop for Spares {
    fn drop(&mut self) {
        let mut state = self.shared.state.lock().expect("spares lock");
        state.closed = true;
        // Dropping a launched worker kills it.
        state.ready.clear();
    }
}
