//! Session affinity (SPEC §7): which instance each session of a function is bound to on
//! this server, and the order in which a new session considers the instances.
//!
//! Consistent hashing with bounded loads (Mirrokni, Thorup and Zadimoghaddam, 2018): every
//! instance owns [`POINTS`] points on a hash ring, the session key hashes to a point, and
//! the session walks the ring clockwise to the first instance whose number of bound
//! sessions is under its fair share plus [`MARGIN`] ([`cap`]). The same key meets the
//! instances in the same order while the set of instances is the same, and no instance
//! takes a session past `ceil((sessions + 1) / instances × (1 + MARGIN))`. [`placement`]
//! adds what hashing does not know: whether an instance is idle, busy or still starting,
//! and the function's instance limit (and places invocations without a session too).
//!
//! Bindings live in memory, for routing without a round trip; the state backend keeps the
//! session registry (created, last access, instance), which tells a session that lost its
//! instance (rebound) from a new one.

pub(crate) mod placement;

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::time::{Duration, Instant};

/// Points of each instance on the ring: enough for an even spread of a few instances.
pub(crate) const POINTS: usize = 64;
/// How far over its fair share of sessions an instance may go.
pub(crate) const MARGIN: f64 = 0.25;

/// How an invocation with a session key found its instance
/// (`nimbus_session_route_total{result}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionRoute {
    /// The session's instance served it.
    Hit,
    /// A new session was placed.
    Miss,
    /// The session's instance was gone (stopped, crashed, recycled): it was placed again.
    Rebound,
}

impl SessionRoute {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            SessionRoute::Hit => "hit",
            SessionRoute::Miss => "miss",
            SessionRoute::Rebound => "rebound",
        }
    }
}

/// A session's binding.
#[derive(Debug, Clone)]
struct Binding {
    instance: String,
    /// When the binding lapses unless used again.
    expires: Instant,
}

/// The session bindings of one function on this server.
#[derive(Debug, Default)]
pub(crate) struct Bindings {
    sessions: HashMap<String, Binding>,
    /// Sessions bound to each instance.
    load: HashMap<String, usize>,
}

impl Bindings {
    /// The instance `session` is bound to, unless the binding lapsed.
    pub(crate) fn bound(&self, session: &str, now: Instant) -> Option<&str> {
        self.sessions
            .get(session)
            .filter(|b| b.expires > now)
            .map(|b| b.instance.as_str())
    }

    /// Binds `session` to `instance` until `timeout` from now; whether it is a new binding
    /// (for `nimbus_session_count`).
    pub(crate) fn bind(&mut self, session: &str, instance: &str, timeout: Duration) -> bool {
        let expires = Instant::now() + timeout;
        let before = self.sessions.insert(
            session.to_owned(),
            Binding {
                instance: instance.to_owned(),
                expires,
            },
        );
        if let Some(old) = &before {
            self.unload(&old.instance);
        }
        *self.load.entry(instance.to_owned()).or_default() += 1;
        before.is_none()
    }

    /// Forgets `session`'s binding; whether there was one.
    pub(crate) fn unbind(&mut self, session: &str) -> bool {
        match self.sessions.remove(session) {
            Some(old) => {
                self.unload(&old.instance);
                true
            }
            None => false,
        }
    }

    fn unload(&mut self, instance: &str) {
        if let Some(n) = self.load.get_mut(instance) {
            *n -= 1;
            if *n == 0 {
                self.load.remove(instance);
            }
        }
    }

    /// Sessions bound to `instance`.
    pub(crate) fn load(&self, instance: &str) -> usize {
        self.load.get(instance).copied().unwrap_or(0)
    }

    /// Drops lapsed bindings; how many.
    pub(crate) fn sweep(&mut self, now: Instant) -> usize {
        let lapsed: Vec<String> = self
            .sessions
            .iter()
            .filter(|(_, b)| b.expires <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for session in &lapsed {
            self.unbind(session);
        }
        lapsed.len()
    }

    /// Bound sessions.
    pub(crate) fn len(&self) -> usize {
        self.sessions.len()
    }
}

/// The most sessions an instance may hold once one more session is placed among
/// `instances` instances holding `sessions`: the fair share plus [`MARGIN`].
pub(crate) fn cap(sessions: usize, instances: usize) -> usize {
    (((sessions + 1) as f64 / instances.max(1) as f64) * (1.0 + MARGIN)).ceil() as usize
}

/// The instances (indexes into `ids`) in the order a walk of the ring from `session`'s
/// point meets them, each once.
pub(crate) fn ring_order(session: &str, ids: &[&str]) -> Vec<usize> {
    let mut ring: Vec<(u64, usize)> = ids
        .iter()
        .enumerate()
        .flat_map(|(i, id)| (0..POINTS).map(move |p| (hash(&(id, p)), i)))
        .collect();
    ring.sort_unstable();
    let start = ring.partition_point(|(h, _)| *h < hash(&session));
    let mut seen = vec![false; ids.len()];
    let mut order = Vec::with_capacity(ids.len());
    for step in 0..ring.len() {
        let i = ring[(start + step) % ring.len()].1;
        if !std::mem::replace(&mut seen[i], true) {
            order.push(i);
        }
    }
    order
}

/// A hash that is the same for the same value within this process (SipHash with fixed keys).
fn hash<T: Hash>(value: &T) -> u64 {
    #[allow(deprecated)] // SipHasher is deprecated for HashMap use, not as a stable hash.
    let mut hasher = std::hash::SipHasher::new();
    value.hash(&mut hasher);
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Where a new session goes when every instance can take it: the first under the cap
    /// along its walk of the ring (index into `candidates`, each with its sessions).
    fn place(session: &str, candidates: &[(&str, usize)]) -> Option<usize> {
        let ids: Vec<&str> = candidates.iter().map(|(id, _)| *id).collect();
        let cap = cap(
            candidates.iter().map(|(_, load)| load).sum(),
            candidates.len(),
        );
        ring_order(session, &ids)
            .into_iter()
            .find(|&i| candidates[i].1 < cap)
    }

    #[test]
    fn a_walk_of_the_ring_meets_every_instance_once() {
        let ids = ["i_a", "i_b", "i_c", "i_d"];
        let mut order = ring_order("alice", &ids);
        assert_eq!(order.len(), 4);
        assert_eq!(order, ring_order("alice", &ids), "the same walk every time");
        order.sort_unstable();
        assert_eq!(order, [0, 1, 2, 3]);
        assert!(ring_order("alice", &[]).is_empty());
        assert_eq!(cap(0, 1), 2);
        assert_eq!(cap(99, 10), 13);
    }

    #[test]
    fn the_same_session_lands_on_the_same_instance() {
        let candidates = [("i_a", 0), ("i_b", 0), ("i_c", 0)];
        for session in ["alice", "bob", "carol", "dave"] {
            let first = place(session, &candidates);
            assert!(first.is_some());
            assert_eq!(place(session, &candidates), first);
        }
        assert_eq!(place("x", &[]), None);
    }

    #[test]
    fn loads_stay_within_the_fair_share_plus_the_margin() {
        let ids: Vec<String> = (0..7).map(|i| format!("i_{i}")).collect();
        let mut bindings = Bindings::default();
        for n in 0..1000 {
            let session = format!("s{n}");
            let candidates: Vec<(&str, usize)> = ids
                .iter()
                .map(|id| (id.as_str(), bindings.load(id)))
                .collect();
            let chosen = place(&session, &candidates).unwrap();
            bindings.bind(&session, &ids[chosen], Duration::from_secs(60));
        }
        let cap = ((1000.0 / 7.0) * (1.0 + MARGIN)).ceil() as usize;
        for id in &ids {
            let load = bindings.load(id);
            assert!(load <= cap, "{id} holds {load} sessions, over {cap}");
            assert!(load > 0, "{id} got no session");
        }
        assert_eq!(bindings.len(), 1000);
    }

    #[test]
    fn a_new_instance_takes_only_part_of_the_sessions() {
        let before = [("i_a", 0), ("i_b", 0), ("i_c", 0)];
        let after = [("i_a", 0), ("i_b", 0), ("i_c", 0), ("i_d", 0)];
        let moved = (0..1000)
            .map(|n| format!("s{n}"))
            .filter(|s| {
                let was = before[place(s, &before).unwrap()].0;
                let is = after[place(s, &after).unwrap()].0;
                was != is
            })
            .count();
        // About a quarter move to the new instance; the rest stay where they were.
        assert!(
            (150..400).contains(&moved),
            "{moved} of 1000 sessions moved"
        );
    }

    #[test]
    fn bindings_lapse_rebind_and_count_loads() {
        let mut b = Bindings::default();
        assert!(b.bind("s1", "i_a", Duration::from_secs(60)));
        assert!(b.bind("s2", "i_a", Duration::from_millis(0)));
        assert_eq!(b.load("i_a"), 2);
        let now = Instant::now();
        assert_eq!(b.bound("s1", now), Some("i_a"));
        assert_eq!(b.bound("s2", now), None, "lapsed");
        assert!(
            !b.bind("s1", "i_b", Duration::from_secs(60)),
            "moved, not new"
        );
        assert_eq!((b.load("i_a"), b.load("i_b")), (1, 1));
        assert_eq!(b.sweep(Instant::now()), 1);
        assert_eq!((b.len(), b.load("i_a")), (1, 0));
        assert!(b.unbind("s1"));
        assert!(!b.unbind("s1"));
        assert_eq!(b.load("i_b"), 0);
    }
}
