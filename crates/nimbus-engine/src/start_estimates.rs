//! How long starts take on this server, to decide whether a start that finds its version's
//! template being built or restored should wait for it (then fork from it) or go cold.
//!
//! After a restart, a burst of first calls would otherwise bring one restore and many cold
//! starts, each slower than the restore (they share the CPUs); but for a function that
//! loads in a few milliseconds, waiting for a long build is the slower choice. So a start
//! waits when what is left of the build or restore, by the times measured here, is less
//! than a cold start of the version takes, and always when no cold start has been measured
//! (a template exists because a cold start is slow). It waits at most what is left plus a
//! cold start's time (so an estimate that was wrong costs at most one more cold start), or,
//! with no cold start measured, twice what is left and a second more.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::Duration;

/// Weight of the newest sample in a moving average.
const WEIGHT: f64 = 0.3;
/// What a restore from disk is taken to last before one was measured here.
const FIRST_RESTORE: Duration = Duration::from_millis(150);
/// What a build is taken to add to a cold start (probes, checkpoint) before one of the
/// version was measured.
const BUILD_OVERHEAD: Duration = Duration::from_millis(250);

/// What a start found under way for its version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Underway {
    /// The template is being built (or waits in the build queue).
    Build,
    /// The template is being restored from its checkpoint.
    Restore,
}

/// An exponentially weighted moving average of durations, none until the first sample.
#[derive(Debug, Default, Clone, Copy)]
struct Average(Option<f64>);

impl Average {
    fn add(&mut self, sample: Duration) {
        let ms = sample.as_secs_f64() * 1000.0;
        self.0 = Some(match self.0 {
            Some(mean) => mean + (ms - mean) * WEIGHT,
            None => ms,
        });
    }

    fn get(self) -> Option<Duration> {
        self.0.map(|ms| Duration::from_secs_f64(ms / 1000.0))
    }
}

#[derive(Debug, Default)]
struct VersionTimes {
    build: Average,
    cold: Average,
}

/// Measured durations: restores (all versions alike: the same work for a template of any
/// size, give or take its memory), and per version its builds and cold starts.
#[derive(Debug)]
pub(crate) struct StartEstimates<K> {
    restore: Average,
    versions: HashMap<K, VersionTimes>,
}

impl<K> Default for StartEstimates<K> {
    fn default() -> Self {
        StartEstimates {
            restore: Average::default(),
            versions: HashMap::new(),
        }
    }
}

impl<K: Eq + Hash + Clone> StartEstimates<K> {
    /// A restore from disk took `took` (until its template was resident).
    pub(crate) fn restored(&mut self, took: Duration) {
        self.restore.add(took);
    }

    /// A build of `key`'s template took `took`.
    pub(crate) fn built(&mut self, key: &K, took: Duration) {
        self.versions
            .entry(key.clone())
            .or_default()
            .build
            .add(took);
    }

    /// A cold start of `key` took `took`.
    pub(crate) fn started_cold(&mut self, key: &K, took: Duration) {
        self.versions.entry(key.clone()).or_default().cold.add(took);
    }

    /// Forgets the times of the versions `gone` says are gone.
    pub(crate) fn forget_where(&mut self, gone: impl Fn(&K) -> bool) {
        self.versions.retain(|key, _| !gone(key));
    }

    /// How long at most a start should wait for the `underway` work on `key`'s template,
    /// begun `elapsed` ago, to fork from it then: `None` when a cold start is faster.
    pub(crate) fn wait_for(
        &self,
        key: &K,
        underway: Underway,
        elapsed: Duration,
    ) -> Option<Duration> {
        let times = self.versions.get(key);
        let cold = times.and_then(|t| t.cold.get());
        let typical = match underway {
            Underway::Restore => self.restore.get().unwrap_or(FIRST_RESTORE),
            Underway::Build => times
                .and_then(|t| t.build.get())
                .or(cold.map(|c| c + BUILD_OVERHEAD))
                .unwrap_or(BUILD_OVERHEAD),
        };
        let left = typical.saturating_sub(elapsed);
        match cold {
            Some(cold) if left >= cold => None,
            Some(cold) => Some(left + cold),
            None => Some(left * 2 + Duration::from_secs(1)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn without_a_measured_cold_start_a_start_waits_for_what_is_under_way() {
        let estimates = StartEstimates::<u32>::default();
        let patience = |left: Duration| Some(left * 2 + ms(1000));
        assert_eq!(
            estimates.wait_for(&1, Underway::Restore, ms(0)),
            patience(FIRST_RESTORE)
        );
        assert_eq!(
            estimates.wait_for(&1, Underway::Restore, ms(400)),
            patience(ms(0))
        );
        assert_eq!(
            estimates.wait_for(&1, Underway::Build, ms(0)),
            patience(BUILD_OVERHEAD)
        );
    }

    #[test]
    fn a_start_waits_only_when_what_is_left_beats_a_cold_start() {
        let mut estimates = StartEstimates::default();
        estimates.restored(ms(100));
        // A slow init: waiting for the restore wins (for what is left, and a cold start's
        // time more if the estimate was wrong).
        estimates.started_cold(&"slow", ms(900));
        assert_eq!(
            estimates.wait_for(&"slow", Underway::Restore, ms(10)),
            Some(ms(90 + 900))
        );
        // A function that loads in a few milliseconds goes cold...
        estimates.started_cold(&"quick", ms(30));
        assert_eq!(
            estimates.wait_for(&"quick", Underway::Restore, ms(10)),
            None
        );
        // ...unless the restore is almost done; past its estimate, it waits a cold start's
        // time at most.
        assert_eq!(
            estimates.wait_for(&"quick", Underway::Restore, ms(80)),
            Some(ms(20 + 30))
        );
        assert_eq!(
            estimates.wait_for(&"quick", Underway::Restore, ms(900)),
            Some(ms(30))
        );
        // A build lasts a cold start and more, until one was measured.
        assert_eq!(estimates.wait_for(&"slow", Underway::Build, ms(0)), None);
        assert_eq!(
            estimates.wait_for(&"slow", Underway::Build, ms(300)),
            Some(ms(850 + 900))
        );
        estimates.built(&"slow", ms(1000));
        assert_eq!(
            estimates.wait_for(&"slow", Underway::Build, ms(300)),
            Some(ms(700 + 900))
        );
        estimates.forget_where(|key| *key == "slow");
        assert_eq!(
            estimates.wait_for(&"slow", Underway::Build, ms(0)),
            Some(BUILD_OVERHEAD * 2 + ms(1000))
        );
    }

    #[test]
    fn the_averages_follow_the_newest_samples() {
        let mut estimates = StartEstimates::<u32>::default();
        estimates.restored(ms(100));
        estimates.restored(ms(200));
        // 100 + (200 - 100) × 0.3, twice, and a second.
        assert_eq!(
            estimates.wait_for(&1, Underway::Restore, ms(0)),
            Some(ms(130) * 2 + ms(1000))
        );
    }
}
