//! The template tier of runtimes whose workers cannot be forked (Node.js is
//! multi-threaded): a few instances of one version started ahead, each with the function
//! loaded and its `ready` greeting waiting unread in its socket.
//!
//! A start takes one, whose handshake then completes at once, and another is started
//! behind it. Starts that find none ready queue for the next ones in arrival order rather
//! than starting more of their own, and each queued start adds one to those being started,
//! so a burst is served as fast as workers can be started, first come first served. A
//! spare that fails to come up breaks the set: the snapshot manager then drops it, and the
//! version's next cold start builds a new one.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use nimbus_sandbox::{DriverError, Launched, Template};
use tokio::sync::oneshot;

use crate::catalog::VersionEntry;
use crate::instance::StartError;
use crate::launcher::Launcher;

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
}

#[derive(Default)]
struct State {
    /// Spares with the function loaded and their greeting unread, oldest first.
    ready: VecDeque<Launched>,
    /// Spares being started.
    starting: usize,
    /// Starts waiting for a spare, in arrival order (a start that gave up has dropped its
    /// receiver).
    waiting: VecDeque<oneshot::Sender<Launched>>,
    /// Why a spare failed to come up: the set is not used any more.
    broken: Option<String>,
    /// The set was dropped: spares still coming up are stopped when they do.
    closed: bool,
}

impl State {
    /// Hands `spare` to the first start still waiting; back if none is.
    fn hand_over(&mut self, mut spare: Launched) -> Option<Launched> {
        while let Some(start) = self.waiting.pop_front() {
            match start.send(spare) {
                Ok(()) => return None,
                Err(back) => spare = back, // that start gave up (timed out)
            }
        }
        Some(spare)
    }
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
            }),
        })
    }
}

impl Shared {
    /// Starts spares until the ready and coming ones cover the target and every waiting
    /// start.
    fn top_up(self: &Arc<Self>) {
        let mut state = self.state.lock().expect("spares lock");
        // A spare that ended while it waited (killed from outside) is replaced, not handed
        // out; a start that gave up waits for nothing.
        state
            .ready
            .retain_mut(|spare| spare.sandbox.try_exit().is_none());
        state.waiting.retain(|start| !start.is_closed());
        while !state.closed
            && state.broken.is_none()
            && state.ready.len() + state.starting < self.target + state.waiting.len()
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
                    Ok(spare) => {
                        if let Some(spare) = state.hand_over(spare) {
                            // Kept unless the start it was for gave up: one too many then.
                            if state.ready.len() < shared.target {
                                state.ready.push_back(spare);
                            }
                        }
                    }
                    Err(e) => {
                        tracing::warn!(
                            function = %shared.version.function_name,
                            version = shared.version.version,
                            "a spare instance did not start: {e}"
                        );
                        state.broken = Some(format!("a spare instance did not start: {e}"));
                        // The waiting starts learn it as their senders drop.
                        state.waiting.clear();
                    }
                }
            });
        }
    }
}

#[async_trait]
impl Template for Spares {
    /// A ready spare (started ahead as an instance of its own id, which
    /// [`Launched::instance_id`] tells; `instance_id` only names a failure), or the next one
    /// to come up, after the starts that were waiting before this one.
    async fn spawn(&self, instance_id: &str) -> Result<Launched, DriverError> {
        let shared = &self.shared;
        let broken = |why: Option<&String>| DriverError {
            instance_id: instance_id.to_owned(),
            message: why.map_or_else(|| "the spares were dropped".to_owned(), Clone::clone),
            refused: false,
        };
        let next = {
            let mut state = shared.state.lock().expect("spares lock");
            if let Some(why) = &state.broken {
                return Err(broken(Some(why)));
            }
            // Spares that ended while they waited (killed from outside) are passed over.
            state
                .ready
                .retain_mut(|spare| spare.sandbox.try_exit().is_none());
            state.waiting.retain(|start| !start.is_closed());
            // Earlier starts are served first.
            let ready = match state.waiting.is_empty() {
                true => state.ready.pop_front(),
                false => None,
            };
            match ready {
                Some(spare) => Ok(spare),
                None => {
                    let (start, next) = oneshot::channel();
                    state.waiting.push_back(start);
                    Err(next)
                }
            }
        };
        shared.top_up(); // one more for this start if it waits
        let spare = match next {
            Ok(spare) => spare,
            Err(next) => next.await.map_err(|_| {
                let state = shared.state.lock().expect("spares lock");
                broken(state.broken.as_ref())
            })?,
        };
        shared.top_up();
        Ok(spare)
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
            .field("waiting", &state.waiting.len())
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
        state.waiting.clear();
    }
}
