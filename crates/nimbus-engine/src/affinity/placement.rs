//! Where an invocation runs, decided on the pool's state in one step under its lock: a warm
//! instance, room for a new one (stopping another version's least recently used idle
//! instance at the function's limit), or a wait. With a session (a function with session
//! affinity), its instance first, else a place along its walk of the ring (see the
//! [parent module](super)).
//!
//! This module does no I/O and holds no lock: the pool calls [`any_step`] or
//! [`session_step`] with its state locked and acts on the [`Step`]. It is generic over the
//! instances it places ([`Member`]), so it is tested here without workers.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::{cap, ring_order, Bindings, SessionRoute};
use crate::metrics;

/// What placement needs of an instance.
pub(crate) trait Member {
    /// Its id.
    fn id(&self) -> &str;
    /// When it last served (the least recently used idle one is stopped first).
    fn last_used(&self) -> Instant;
    /// Whether it has ended while idle (it is then replaced, not handed out).
    fn has_ended(&mut self) -> bool;
}

/// What an invocation with a session key asks of a function with session affinity.
#[derive(Debug, Clone)]
pub(crate) struct SessionRequest {
    /// The session key.
    pub(crate) key: String,
    /// How long its binding lasts after this invocation.
    pub(crate) timeout: Duration,
    /// Whether the session registry had it bound to an instance: without a binding on this
    /// server, it is then rebound rather than new.
    pub(crate) was_bound: bool,
}

/// The instances of one function on this server, as placement sees them.
#[derive(Debug)]
pub(crate) struct PoolState<I> {
    /// Idle instances per version, least recently used first.
    pub(crate) idle: HashMap<u32, Vec<I>>,
    /// The version of every started instance still alive (idle or busy), by id: where
    /// sessions are placed.
    pub(crate) members: HashMap<String, u32>,
    /// Instances alive or being started.
    pub(crate) live: u32,
    /// The function's instance limit.
    pub(crate) max_instances: u32,
    /// Sessions bound to instances (functions with session affinity).
    pub(crate) bindings: Bindings,
}

impl<I: Member> PoolState<I> {
    /// No instances, under a limit of `max_instances`.
    pub(crate) fn new(max_instances: u32) -> Self {
        PoolState {
            idle: HashMap::new(),
            members: HashMap::new(),
            live: 0,
            max_instances,
            bindings: Bindings::default(),
        }
    }

    /// Takes the idle instance `id` of `version` out of the idle list.
    fn take_idle(&mut self, version: u32, id: &str) -> Option<I> {
        let list = self.idle.get_mut(&version)?;
        let at = list.iter().position(|i| i.id() == id)?;
        Some(list.remove(at))
    }

    /// Accounts for idle instances taken out to be stopped.
    pub(crate) fn drop_idle(&mut self, stopped: &[I]) {
        self.live -= stopped.len() as u32;
        for instance in stopped {
            self.members.remove(instance.id());
        }
    }
}

/// What an invocation found in the pool.
#[derive(Debug)]
pub(crate) enum Step<I> {
    /// An idle instance, now checked out.
    Warm(I),
    /// An idle instance that had ended, now out of the pool (look again).
    Dead(I),
    /// Room for a new instance (counted in `live` already), made by stopping the idle
    /// instance given, if any.
    Start(Option<I>),
    /// Wait for an instance to come back (the session's instance is busy).
    WaitFor,
    /// Wait: the function is at its limit with nothing idle to stop.
    Wait,
}

/// Takes an idle instance out as a warm (or dead) one.
fn checked_out<I: Member>(state: &mut PoolState<I>, mut instance: I) -> Step<I> {
    if instance.has_ended() {
        state.live -= 1;
        state.members.remove(instance.id());
        Step::Dead(instance)
    } else {
        Step::Warm(instance)
    }
}

/// Without a session: the most recently used idle instance of the version, or room for a
/// new one (stopping another version's least recently used idle instance at the limit).
pub(crate) fn any_step<I: Member>(state: &mut PoolState<I>, version: u32) -> Step<I> {
    match state.idle.get_mut(&version).and_then(Vec::pop) {
        Some(instance) => checked_out(state, instance),
        None => make_room(state, version),
    }
}

/// Room for a new instance of `version`: under the limit, or by stopping another
/// version's least recently used idle instance at it (never one of `version`'s own, which
/// sessions may be bound to).
fn make_room<I: Member>(state: &mut PoolState<I>, version: u32) -> Step<I> {
    if state.live < state.max_instances {
        state.live += 1;
        return Step::Start(None);
    }
    match take_least_recently_used(&mut state.idle, version) {
        Some(old) => {
            state.members.remove(old.id());
            Step::Start(Some(old))
        }
        None => Step::Wait,
    }
}

/// The least recently used idle instance of a version other than `keep`.
fn take_least_recently_used<I: Member>(idle: &mut HashMap<u32, Vec<I>>, keep: u32) -> Option<I> {
    let (&version, _) = idle
        .iter()
        .filter(|(v, _)| **v != keep)
        .filter_map(|(v, list)| list.first().map(|i| (v, i.last_used())))
        .min_by_key(|(_, used)| *used)?;
    let list = idle.get_mut(&version)?;
    Some(list.remove(0))
}

/// With a session: its instance if it is alive (waiting for it while busy, unless the
/// invocation ran out of `patient`ce), else a place for it. `route` records how the
/// session was found, the first time.
pub(crate) fn session_step<I: Member>(
    state: &mut PoolState<I>,
    version: u32,
    session: &SessionRequest,
    patient: bool,
    route: &mut Option<SessionRoute>,
) -> Step<I> {
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
    let cap = cap(loads.iter().sum(), ids.len() + starting);
    let order = ring_order(&session.key, &refs);
    let is_idle = |id: &str| {
        state
            .idle
            .get(&version)
            .is_some_and(|list| list.iter().any(|i| i.id() == id))
    };
    let under_cap = order.iter().copied().filter(|&i| loads[i] < cap);
    let pick = |state: &mut PoolState<I>, i: usize| {
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
pub(crate) fn bind(bindings: &mut Bindings, session: &SessionRequest, instance: &str) {
    if bindings.bind(&session.key, instance, session.timeout) {
        metrics::sessions_bound(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An instance as placement sees it.
    #[derive(Debug)]
    struct Fake {
        id: String,
        used: Instant,
        ended: bool,
    }

    impl Member for Fake {
        fn id(&self) -> &str {
            &self.id
        }
        fn last_used(&self) -> Instant {
            self.used
        }
        fn has_ended(&mut self) -> bool {
            self.ended
        }
    }

    /// A pool under `max` with the idle instances `idle` (id, version), used in that order.
    fn pool(max: u32, idle: &[(&str, u32)]) -> PoolState<Fake> {
        let mut state = PoolState::new(max);
        let start = Instant::now();
        for (n, (id, version)) in idle.iter().enumerate() {
            state.idle.entry(*version).or_default().push(Fake {
                id: (*id).to_owned(),
                used: start + Duration::from_millis(n as u64),
                ended: false,
            });
            state.members.insert((*id).to_owned(), *version);
            state.live += 1;
        }
        state
    }

    /// Marks `id` busy: a member, not idle.
    fn busy(state: &mut PoolState<Fake>, id: &str, version: u32) {
        state.members.insert(id.to_owned(), version);
        state.live += 1;
    }

    fn session(key: &str) -> SessionRequest {
        SessionRequest {
            key: key.to_owned(),
            timeout: Duration::from_secs(60),
            was_bound: false,
        }
    }

    fn warm_id(step: Step<Fake>) -> String {
        match step {
            Step::Warm(i) => i.id,
            other => panic!("expected a warm instance, got {other:?}"),
        }
    }

    #[test]
    fn without_a_session_the_most_recently_used_idle_instance_serves() {
        let mut state = pool(3, &[("i_a", 1), ("i_b", 1)]);
        assert_eq!(warm_id(any_step(&mut state, 1)), "i_b");
        assert_eq!(warm_id(any_step(&mut state, 1)), "i_a");
        // None idle, under the limit: room for one more.
        assert!(matches!(any_step(&mut state, 1), Step::Start(None)));
        assert_eq!(state.live, 3);
        // At the limit with nothing idle: wait.
        assert!(matches!(any_step(&mut state, 1), Step::Wait));
    }

    #[test]
    fn at_the_limit_another_versions_least_recently_used_idle_instance_makes_room() {
        let mut state = pool(3, &[("i_old", 1), ("i_new", 1), ("i_v2", 2)]);
        match any_step(&mut state, 3) {
            Step::Start(Some(stopped)) => assert_eq!(stopped.id, "i_old"),
            other => panic!("expected room, got {other:?}"),
        }
        assert!(!state.members.contains_key("i_old"));
        assert_eq!(state.live, 3, "one stopped, one starting");
        // A version's own idle instances are never stopped to start one of it.
        let mut state = pool(1, &[("i_a", 1)]);
        state.idle.get_mut(&1).unwrap().clear();
        assert!(matches!(any_step(&mut state, 1), Step::Wait));
    }

    #[test]
    fn an_idle_instance_that_ended_is_dropped_and_not_handed_out() {
        let mut state = pool(2, &[("i_a", 1)]);
        state.idle.get_mut(&1).unwrap()[0].ended = true;
        assert!(matches!(any_step(&mut state, 1), Step::Dead(_)));
        assert_eq!(state.live, 0);
        assert!(state.members.is_empty());
    }

    #[test]
    fn a_new_session_takes_an_idle_instance_and_is_bound_to_it() {
        let mut state = pool(2, &[("i_a", 1)]);
        let mut route = None;
        let id = warm_id(session_step(&mut state, 1, &session("s"), true, &mut route));
        assert_eq!(id, "i_a");
        assert_eq!(route, Some(SessionRoute::Miss));
        assert_eq!(state.bindings.bound("s", Instant::now()), Some("i_a"));
    }

    #[test]
    fn a_bound_session_waits_for_its_busy_instance_while_patient() {
        let mut state = pool(1, &[]);
        busy(&mut state, "i_a", 1);
        bind(&mut state.bindings, &session("s"), "i_a");
        let mut route = None;
        let step = session_step(&mut state, 1, &session("s"), true, &mut route);
        assert!(matches!(step, Step::WaitFor), "{step:?}");
        assert_eq!(route, Some(SessionRoute::Hit));
        // Back in the pool: it is the session's.
        state.idle.entry(1).or_default().push(Fake {
            id: "i_a".into(),
            used: Instant::now(),
            ended: false,
        });
        assert_eq!(
            warm_id(session_step(&mut state, 1, &session("s"), true, &mut route)),
            "i_a"
        );
        assert_eq!(route, Some(SessionRoute::Hit));
    }

    #[test]
    fn an_impatient_session_is_placed_again_elsewhere() {
        let mut state = pool(2, &[("i_b", 1)]);
        busy(&mut state, "i_a", 1);
        bind(&mut state.bindings, &session("s"), "i_a");
        let mut route = None;
        let id = warm_id(session_step(
            &mut state,
            1,
            &session("s"),
            false,
            &mut route,
        ));
        assert_eq!(id, "i_b");
        assert_eq!(route, Some(SessionRoute::Rebound));
        assert_eq!(state.bindings.bound("s", Instant::now()), Some("i_b"));
    }

    #[test]
    fn a_session_whose_instance_is_gone_is_rebound() {
        let mut state = pool(2, &[]);
        bind(&mut state.bindings, &session("s"), "i_gone");
        let mut route = None;
        // Nothing idle, under the limit: a new instance (bound once it has started).
        let step = session_step(&mut state, 1, &session("s"), true, &mut route);
        assert!(matches!(step, Step::Start(None)), "{step:?}");
        assert_eq!(route, Some(SessionRoute::Rebound));
        assert_eq!(state.bindings.bound("s", Instant::now()), None);
        // A session the registry knew, new on this server, is rebound too.
        let mut route = None;
        let known = SessionRequest {
            was_bound: true,
            ..session("t")
        };
        session_step(&mut state, 1, &known, true, &mut route);
        assert_eq!(route, Some(SessionRoute::Rebound));
    }

    #[test]
    fn busy_instances_over_the_cap_send_new_sessions_to_new_instances() {
        // One busy instance holding two sessions: a new session gets an instance of its
        // own while the function is under its limit.
        let mut state = pool(2, &[]);
        busy(&mut state, "i_a", 1);
        bind(&mut state.bindings, &session("s1"), "i_a");
        bind(&mut state.bindings, &session("s2"), "i_a");
        let mut route = None;
        let step = session_step(&mut state, 1, &session("s3"), true, &mut route);
        assert!(matches!(step, Step::Start(None)), "{step:?}");
        // At the limit: it waits for an instance under the cap, bound to it already.
        let step = session_step(&mut state, 1, &session("s4"), true, &mut route);
        assert!(matches!(step, Step::WaitFor | Step::Wait), "{step:?}");
    }
}
