//! The periodic pass for deletions (every `purge_interval`): it finds what was deleted
//! elsewhere among what this server holds, and purges what was written for deleted
//! functions after their deletion.
//!
//! A server that has not learned of a deletion yet may still run the function: an
//! invocation may begin within its cache TTL (or its stale TTL while the store does not
//! answer it) and runs for at most the longest timeout a function may have. What such
//! invocations write — state keys, on this server's backend, and records, which the store
//! drops unless they race the deletion — each server purges for itself over the window
//! those bound: at its first pass after the deletion, then at passes spaced by doubling
//! intervals, and once more after the window (about seven purges per deleted function).

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use nimbus_core::limits;

use crate::Engine;

/// How long a deleted function is remembered: records written for it (a server's journal
/// replayed after an outage, say) are not kept meanwhile.
const DELETED_FUNCTIONS_KEPT: Duration = Duration::from_secs(7 * 24 * 3600);

/// When each deleted function is purged next (see the module docs).
#[derive(Default)]
pub(crate) struct PurgeSchedule {
    /// By function id: the age at which it is purged next, or `None` once it is done.
    next: Mutex<HashMap<String, Option<Duration>>>,
}

impl PurgeSchedule {
    /// Whether the function `id`, deleted `age` ago, is purged in this pass.
    fn due(&self, id: &str, age: Duration) -> bool {
        match self.next.lock().expect("purge schedule lock").get(id) {
            None => true,
            Some(None) => false,
            Some(Some(mark)) => age >= *mark,
        }
    }

    /// The function `id`, deleted `age` ago, was purged: its next purge is at the first
    /// doubling of the pass interval `every` past `age`, at most the `window` of late
    /// writes; none once the window has passed. (A purge that failed leaves the schedule
    /// as it was, so the next pass tries again.)
    fn purged(&self, id: &str, age: Duration, every: Duration, window: Duration) {
        let mark = (age < window).then(|| {
            let mut mark = every.max(Duration::from_millis(1));
            while mark <= age {
                mark *= 2;
            }
            mark.min(window)
        });
        let mut next = self.next.lock().expect("purge schedule lock");
        next.insert(id.to_owned(), mark);
    }

    /// Forgets the functions no longer remembered as deleted.
    fn keep_only(&self, ids: &HashSet<&str>) {
        let mut next = self.next.lock().expect("purge schedule lock");
        next.retain(|id, _| ids.contains(id.as_str()));
    }
}

impl Engine {
    /// One pass (see the module docs).
    pub(crate) async fn purge(&self) {
        if let Err(e) = self.catalog.revalidate().await {
            tracing::debug!("checking cached metadata against the store: {e}");
        }
        let deleted = match self.store.deleted_functions().await {
            Ok(deleted) => deleted,
            Err(e) => {
                tracing::debug!("listing deleted functions: {e}");
                return;
            }
        };
        let now = nimbus_core::now();
        let every = self.config.purge_interval;
        let window = self.config.cache_ttl
            + self.config.stale_ttl
            + Duration::from_secs(limits::TIMEOUT_SEC.1.into())
            + every;
        for function in &deleted {
            let age = Duration::try_from(now - function.deleted_at).unwrap_or_default();
            let id = &function.function_id;
            if !self.purges.due(id, age) {
                continue;
            }
            let state = self.state.store().purge_function(id).await;
            if let Err(e) = &state {
                tracing::debug!(function = %id, "purging the state of a deleted function: {e}");
            }
            let records = self.store.purge_deleted_function(id).await;
            match &records {
                Ok(0) => {}
                Ok(n) => tracing::info!(
                    function = %id,
                    records = n,
                    "removed invocation records written as the function was deleted"
                ),
                Err(e) => {
                    tracing::debug!(function = %id, "purging the records of a deleted function: {e}")
                }
            }
            if state.is_ok() && records.is_ok() {
                self.purges.purged(id, age, every, window);
            }
        }
        self.purges
            .keep_only(&deleted.iter().map(|d| d.function_id.as_str()).collect());
        if let Err(e) = self
            .store
            .forget_deleted_functions(now - DELETED_FUNCTIONS_KEPT)
            .await
        {
            tracing::debug!("forgetting deleted functions: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ages at which passes every `every` purge a function deleted at age 0, seen
    /// first at `first`, when the purges at the ages in `failing` fail.
    fn purges(first: Duration, every: Duration, window: Duration, failing: &[u64]) -> Vec<u64> {
        let schedule = PurgeSchedule::default();
        let mut age = first;
        let mut at = Vec::new();
        while age < window * 3 {
            if schedule.due("fn_1", age) {
                at.push(age.as_secs());
                if !failing.contains(&age.as_secs()) {
                    schedule.purged("fn_1", age, every, window);
                }
            }
            age += every;
        }
        at
    }

    #[test]
    fn a_deleted_function_is_purged_at_doubling_intervals_and_once_past_the_window() {
        let (every, window) = (Duration::from_secs(60), Duration::from_secs(1561));
        assert_eq!(
            purges(Duration::from_secs(5), every, window, &[]),
            [5, 65, 125, 245, 485, 965, 1565]
        );
        // A server that first sees it late purges at once, then keeps the schedule.
        assert_eq!(
            purges(Duration::from_secs(700), every, window, &[]),
            [700, 1000, 1600]
        );
        // One that first sees it after the window purges once.
        assert_eq!(
            purges(Duration::from_secs(2000), every, window, &[]),
            [2000]
        );
    }

    /// A purge that fails (the store or the state backend is down) is tried again at the
    /// next pass, the last one past the window included; it used to count as done.
    #[test]
    fn a_purge_that_fails_is_tried_again_at_the_next_pass() {
        let (every, window) = (Duration::from_secs(60), Duration::from_secs(1561));
        assert_eq!(
            purges(Duration::from_secs(5), every, window, &[65, 1565, 1625]),
            [5, 65, 125, 245, 485, 965, 1565, 1625, 1685]
        );
        let schedule = PurgeSchedule::default();
        assert!(schedule.due("fn_1", Duration::from_secs(2000)));
        // Failed: nothing marks it done.
        assert!(schedule.due("fn_1", Duration::from_secs(2060)));
    }

    #[test]
    fn functions_no_longer_deleted_are_forgotten() {
        let schedule = PurgeSchedule::default();
        let (every, window) = (Duration::from_secs(1), Duration::from_secs(10));
        assert!(schedule.due("fn_1", Duration::ZERO));
        schedule.purged("fn_1", Duration::ZERO, every, window);
        assert!(!schedule.due("fn_1", Duration::ZERO));
        schedule.keep_only(&HashSet::new());
        assert!(schedule.due("fn_1", Duration::ZERO));
    }
}
