//! The engine's Prometheus metrics. Names and labels are part of the product contract
//! (SPEC §8); the exporter is installed by the binary.
//!
//! Series of functions, aliases and versions that are deleted leave `/metrics`: the
//! Prometheus exporter cannot remove one series, but it drops counters that go unchanged
//! for an idle timeout ([`COUNTER_IDLE_TIMEOUT`]). So every counter handed out is kept in
//! an index ([`Retiring`], a recorder layer in front of the exporter), and the binary calls
//! [`touch_counters`] every [`TOUCH_EVERY`], which re-registers and bumps (by 0) each
//! indexed counter: live counters never idle. Deleting a function, alias or version takes
//! its counters out of the index ([`retire_function`], [`retire_alias`],
//! [`retire_version`]), so the exporter drops them once they sit unchanged for the idle
//! timeout; counters of it that appear during [`RETIRED_GRACE`] (an invocation that was
//! still running) are not indexed again. Series are named by the function's name, which a
//! new function may take at once: a function or alias found to exist again (created here,
//! or read from the store) lifts the retirement of its name ([`function_live`],
//! [`alias_live`]).

use std::collections::HashSet;
use std::sync::{LazyLock, Mutex, RwLock};
use std::time::{Duration, Instant};

use metrics::{
    counter, gauge, histogram, Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder,
    SharedString, Unit,
};
use nimbus_core::{Runtime, StartType};

/// `nimbus_invocations_total{function,runtime,status}`.
pub const INVOCATIONS_TOTAL: &str = "nimbus_invocations_total";
/// `nimbus_invocation_duration_ms{start_type}` (histogram).
pub const INVOCATION_DURATION_MS: &str = "nimbus_invocation_duration_ms";
/// `nimbus_cold_starts_total{runtime,start_type}`.
pub const COLD_STARTS_TOTAL: &str = "nimbus_cold_starts_total";
/// `nimbus_pool_instances{runtime,state}` (gauge; state is `starting|idle|busy`).
pub const POOL_INSTANCES: &str = "nimbus_pool_instances";
/// `nimbus_version_publish_total{function}`.
pub const VERSION_PUBLISH_TOTAL: &str = "nimbus_version_publish_total";
/// `nimbus_alias_update_total{function,alias,action}` (action: create, update, publish,
/// rollback, delete).
pub const ALIAS_UPDATE_TOTAL: &str = "nimbus_alias_update_total";
/// `nimbus_invocation_by_version_total{function,version,alias,status}` (alias empty when the
/// version was named explicitly; status as in `nimbus_invocations_total`), so a canary's
/// error rate can be compared with the stable version's.
pub const INVOCATION_BY_VERSION_TOTAL: &str = "nimbus_invocation_by_version_total";

/// `nimbus_snapshot_build_total{status}` (`success|failed`).
pub const SNAPSHOT_BUILD_TOTAL: &str = "nimbus_snapshot_build_total";
/// `nimbus_snapshot_build_duration_seconds` (histogram).
pub const SNAPSHOT_BUILD_DURATION_SECONDS: &str = "nimbus_snapshot_build_duration_seconds";
/// `nimbus_snapshot_restore_total{status,start_type}` (`success|failed`; `template`: forked
/// from the resident template, `snapshot`: from the checkpoint on disk): instances started
/// from a snapshot.
pub const SNAPSHOT_RESTORE_TOTAL: &str = "nimbus_snapshot_restore_total";
/// `nimbus_snapshot_restore_duration_ms{start_type}` (histogram): from the request to the
/// instance's `ready`.
pub const SNAPSHOT_RESTORE_DURATION_MS: &str = "nimbus_snapshot_restore_duration_ms";
/// `nimbus_snapshot_storage_bytes` (gauge): snapshot files on disk.
pub const SNAPSHOT_STORAGE_BYTES: &str = "nimbus_snapshot_storage_bytes";
/// `nimbus_snapshot_resident_bytes` (gauge): memory held by resident templates.
pub const SNAPSHOT_RESIDENT_BYTES: &str = "nimbus_snapshot_resident_bytes";
/// `nimbus_snapshot_count{status}` (gauge): indexed snapshots by status.
pub const SNAPSHOT_COUNT: &str = "nimbus_snapshot_count";
/// `nimbus_snapshot_shared_random_total{stage}` (`build|restore`): templates refused
/// because two instances started from them drew the same values from a generator.
pub const SNAPSHOT_SHARED_RANDOM_TOTAL: &str = "nimbus_snapshot_shared_random_total";

/// `nimbus_state_operation_total{operation,scope,status}` (status `ok` or the error code).
pub const STATE_OPERATION_TOTAL: &str = "nimbus_state_operation_total";
/// `nimbus_state_operation_duration_ms{operation}` (histogram): one state call on the host.
pub const STATE_OPERATION_DURATION_MS: &str = "nimbus_state_operation_duration_ms";

/// `nimbus_session_count` (gauge): sessions bound to an instance on this server.
pub const SESSION_COUNT: &str = "nimbus_session_count";
/// `nimbus_session_route_total{result}` (`hit|miss|rebound`): how invocations of functions
/// with session affinity found their instance.
pub const SESSION_ROUTE_TOTAL: &str = "nimbus_session_route_total";

/// `nimbus_metadata_stale_total{kind}` (`function|alias|version`): lookups answered from
/// cached metadata older than `cache_ttl` because the store did not answer.
pub const METADATA_STALE_TOTAL: &str = "nimbus_metadata_stale_total";
/// `nimbus_record_write_failures_total`: failed writes of invocation records to the store
/// (the records wait in the journal and are written later).
pub const RECORD_WRITE_FAILURES_TOTAL: &str = "nimbus_record_write_failures_total";
/// `nimbus_records_dropped_total`: invocation records lost because the journal could not
/// be written and too many already waited in memory.
pub const RECORDS_DROPPED_TOTAL: &str = "nimbus_records_dropped_total";

/// Registers descriptions so `/metrics` documents each series.
pub fn describe() {
    metrics::describe_counter!(
        INVOCATIONS_TOTAL,
        "Invocations by function, runtime and final status."
    );
    metrics::describe_histogram!(
        INVOCATION_DURATION_MS,
        metrics::Unit::Milliseconds,
        "Invocation wall time, by how the instance started."
    );
    metrics::describe_counter!(
        COLD_STARTS_TOTAL,
        "Invocations that did not find a warm instance."
    );
    metrics::describe_gauge!(POOL_INSTANCES, "Instances by runtime and state.");
    metrics::describe_counter!(VERSION_PUBLISH_TOTAL, "Versions published.");
    metrics::describe_counter!(
        ALIAS_UPDATE_TOTAL,
        "Alias changes by function, alias and action."
    );
    metrics::describe_counter!(
        INVOCATION_BY_VERSION_TOTAL,
        "Invocations by function, version, the alias that chose it, and final status."
    );
    metrics::describe_counter!(
        STATE_OPERATION_TOTAL,
        "State API calls of functions, by operation, scope and outcome."
    );
    metrics::describe_histogram!(
        STATE_OPERATION_DURATION_MS,
        metrics::Unit::Milliseconds,
        "Time the host spends on one state call (the backend's round trip included)."
    );
    metrics::describe_gauge!(
        SESSION_COUNT,
        "Sessions bound to an instance on this server (functions with session affinity)."
    );
    metrics::describe_counter!(
        SESSION_ROUTE_TOTAL,
        "Invocations of functions with session affinity, by how they found their instance."
    );
    metrics::describe_counter!(SNAPSHOT_BUILD_TOTAL, "Snapshot builds by outcome.");
    metrics::describe_histogram!(
        SNAPSHOT_BUILD_DURATION_SECONDS,
        metrics::Unit::Seconds,
        "Time to build a snapshot (start the template, load the code, run its hooks)."
    );
    metrics::describe_counter!(
        SNAPSHOT_RESTORE_TOTAL,
        "Instances started from a snapshot, by outcome."
    );
    metrics::describe_histogram!(
        SNAPSHOT_RESTORE_DURATION_MS,
        metrics::Unit::Milliseconds,
        "Time to start an instance from a snapshot until it is ready."
    );
    metrics::describe_gauge!(
        SNAPSHOT_STORAGE_BYTES,
        metrics::Unit::Bytes,
        "Bytes of snapshot files on disk."
    );
    metrics::describe_gauge!(
        SNAPSHOT_RESIDENT_BYTES,
        metrics::Unit::Bytes,
        "Memory held by resident templates."
    );
    metrics::describe_gauge!(SNAPSHOT_COUNT, "Indexed snapshots by status.");
    metrics::describe_counter!(
        SNAPSHOT_SHARED_RANDOM_TOTAL,
        "Templates refused because instances started from them would share a random generator's output."
    );
    metrics::describe_counter!(
        METADATA_STALE_TOTAL,
        "Lookups answered from cached metadata past cache_ttl because the store did not answer."
    );
    metrics::describe_counter!(
        RECORD_WRITE_FAILURES_TOTAL,
        "Failed writes of invocation records to the store (the records wait in the journal)."
    );
    metrics::describe_counter!(
        RECORDS_DROPPED_TOTAL,
        "Invocation records lost: the journal could not be written and memory was full."
    );
}

/// Counts one lookup answered from stale metadata (`function`, `alias` or `version`).
pub fn metadata_stale(kind: &'static str) {
    counter!(METADATA_STALE_TOTAL, "kind" => kind).increment(1);
}

/// Counts one failed write of invocation records.
pub fn record_write_failed() {
    counter!(RECORD_WRITE_FAILURES_TOTAL).increment(1);
}

/// Counts one invocation record lost.
pub fn record_dropped() {
    counter!(RECORDS_DROPPED_TOTAL).increment(1);
}

/// Counts and times one state call.
pub fn state_operation(operation: &'static str, scope: &'static str, status: &str, ms: f64) {
    counter!(STATE_OPERATION_TOTAL, "operation" => operation, "scope" => scope, "status" => status.to_owned())
        .increment(1);
    histogram!(STATE_OPERATION_DURATION_MS, "operation" => operation).record(ms);
}

/// Changes `nimbus_session_count` by `delta` bindings.
pub fn sessions_bound(delta: i64) {
    if delta != 0 {
        gauge!(SESSION_COUNT).increment(delta as f64);
    }
}

/// Counts how one invocation found its session's instance.
pub fn session_route(result: &'static str) {
    counter!(SESSION_ROUTE_TOTAL, "result" => result).increment(1);
}

/// Counts one snapshot build.
pub fn snapshot_built(status: &'static str, seconds: f64) {
    counter!(SNAPSHOT_BUILD_TOTAL, "status" => status).increment(1);
    histogram!(SNAPSHOT_BUILD_DURATION_SECONDS).record(seconds);
}

/// Counts one start from a snapshot, of `start_type` `template` or `snapshot` (its
/// duration only when it succeeded).
pub fn snapshot_restored(status: &'static str, start_type: StartType, ms: f64) {
    let start_type = start_type.as_str();
    counter!(SNAPSHOT_RESTORE_TOTAL, "status" => status, "start_type" => start_type).increment(1);
    if status == "success" {
        histogram!(SNAPSHOT_RESTORE_DURATION_MS, "start_type" => start_type).record(ms);
    }
}

/// Counts one template refused for shared random state, at `stage` (`build|restore`).
pub fn snapshot_shared_random(stage: &'static str) {
    counter!(SNAPSHOT_SHARED_RANDOM_TOTAL, "stage" => stage).increment(1);
}

/// Sets the snapshot gauges: counts by status (every status, zeros included), bytes on
/// disk, bytes resident.
pub fn snapshot_gauges(
    counts: &std::collections::HashMap<nimbus_core::SnapshotStatus, u64>,
    storage_bytes: u64,
    resident_bytes: u64,
) {
    for status in nimbus_core::SnapshotStatus::ALL {
        let count = counts.get(status).copied().unwrap_or(0);
        gauge!(SNAPSHOT_COUNT, "status" => status.as_str()).set(count as f64);
    }
    gauge!(SNAPSHOT_STORAGE_BYTES).set(storage_bytes as f64);
    gauge!(SNAPSHOT_RESIDENT_BYTES).set(resident_bytes as f64);
}

/// Counts one finished (or throttled) invocation.
pub fn invocation(function: &str, runtime: Runtime, status: &'static str) {
    counter!(INVOCATIONS_TOTAL, "function" => function.to_owned(), "runtime" => runtime.as_str(), "status" => status)
        .increment(1);
}

/// Observes an invocation's duration and, when it was not warm, counts the cold start.
pub fn invocation_start(runtime: Runtime, start_type: StartType, duration_ms: f64) {
    histogram!(INVOCATION_DURATION_MS, "start_type" => start_type.as_str()).record(duration_ms);
    if start_type != StartType::Warm {
        counter!(COLD_STARTS_TOTAL, "runtime" => runtime.as_str(), "start_type" => start_type.as_str()).increment(1);
    }
}

/// Instance states tracked by `nimbus_pool_instances`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstanceState {
    /// Loading its handler.
    Starting,
    /// Waiting for work.
    Idle,
    /// Serving an invocation.
    Busy,
}

impl InstanceState {
    fn as_str(self) -> &'static str {
        match self {
            InstanceState::Starting => "starting",
            InstanceState::Idle => "idle",
            InstanceState::Busy => "busy",
        }
    }
}

/// Moves one instance between states (`None` = not alive).
pub fn instance_transition(
    runtime: Runtime,
    from: Option<InstanceState>,
    to: Option<InstanceState>,
) {
    if let Some(from) = from {
        gauge!(POOL_INSTANCES, "runtime" => runtime.as_str(), "state" => from.as_str())
            .decrement(1.0);
    }
    if let Some(to) = to {
        gauge!(POOL_INSTANCES, "runtime" => runtime.as_str(), "state" => to.as_str())
            .increment(1.0);
    }
}

/// Counts a published version.
pub fn version_published(function: &str) {
    counter!(VERSION_PUBLISH_TOTAL, "function" => function.to_owned()).increment(1);
}

/// Counts one change of an alias.
pub fn alias_updated(function: &str, alias: &str, action: &'static str) {
    counter!(ALIAS_UPDATE_TOTAL, "function" => function.to_owned(), "alias" => alias.to_owned(), "action" => action)
        .increment(1);
}

/// Counts an invocation of `version`, chosen through `alias` (if any), by final status.
pub fn invocation_by_version(
    function: &str,
    version: u32,
    alias: Option<&str>,
    status: &'static str,
) {
    counter!(
        INVOCATION_BY_VERSION_TOTAL,
        "function" => function.to_owned(),
        "version" => version.to_string(),
        "alias" => alias.unwrap_or_default().to_owned(),
        "status" => status
    )
    .increment(1);
}

/// How long a counter may go unchanged before the exporter drops it; the binary sets it as
/// the exporter's idle timeout for counters.
pub const COUNTER_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the binary calls [`touch_counters`] (well within the idle timeout, so a late
/// tick on a busy server does not drop a live counter).
pub const TOUCH_EVERY: Duration = Duration::from_secs(2);
/// How long after a retirement counters of what was retired are not indexed again.
pub const RETIRED_GRACE: Duration = Duration::from_secs(60);

/// Counters handed out and still live (see the module docs).
static LIVE: LazyLock<RwLock<HashSet<Key>>> = LazyLock::new(RwLock::default);
/// What was retired recently, and when.
static RETIRED: Mutex<Vec<(Retired, Instant)>> = Mutex::new(Vec::new());

/// Series of a deleted function, or of one of its aliases or versions.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Retired {
    /// The function's name: what the series are labelled with.
    function: String,
    /// The function's id: a function of the same name with another id is not retired.
    function_id: String,
    alias: Option<String>,
    version: Option<String>,
}

impl Retired {
    fn matches(&self, key: &Key) -> bool {
        let label = |name: &str| key.labels().find(|l| l.key() == name).map(|l| l.value());
        label("function") == Some(self.function.as_str())
            && self
                .alias
                .as_deref()
                .is_none_or(|a| label("alias") == Some(a))
            && self
                .version
                .as_deref()
                .is_none_or(|v| label("version") == Some(v))
    }
}

/// Takes the counters of a deleted function (`function` by name, `function_id`) out of
/// `/metrics`.
pub fn retire_function(function: &str, function_id: &str) {
    retire(Retired {
        function: function.to_owned(),
        function_id: function_id.to_owned(),
        alias: None,
        version: None,
    });
}

/// Takes the counters of a deleted alias out of `/metrics`.
pub fn retire_alias(function: &str, function_id: &str, alias: &str) {
    retire(Retired {
        function: function.to_owned(),
        function_id: function_id.to_owned(),
        alias: Some(alias.to_owned()),
        version: None,
    });
}

/// Takes the counters of a deleted version out of `/metrics`.
pub fn retire_version(function: &str, function_id: &str, version: u32) {
    retire(Retired {
        function: function.to_owned(),
        function_id: function_id.to_owned(),
        alias: None,
        version: Some(version.to_string()),
    });
}

/// The function `function_id` named `function` exists: series of that name retired with
/// another function (deleted, its name taken again) are indexed again from now on.
pub fn function_live(function: &str, function_id: &str) {
    let mut recent = RETIRED.lock().expect("metrics index lock");
    if !recent.is_empty() {
        recent.retain(|(r, _)| r.function != function || r.function_id == function_id);
    }
}

/// The alias `alias` of function `function_id` exists: its series retired with an alias
/// of that name deleted earlier are indexed again from now on.
pub fn alias_live(function_id: &str, alias: &str) {
    let mut recent = RETIRED.lock().expect("metrics index lock");
    if !recent.is_empty() {
        recent.retain(|(r, _)| r.function_id != function_id || r.alias.as_deref() != Some(alias));
    }
}

fn retire(retired: Retired) {
    LIVE.write()
        .expect("metrics index lock")
        .retain(|key| !retired.matches(key));
    let mut recent = RETIRED.lock().expect("metrics index lock");
    recent.retain(|(_, at)| at.elapsed() < RETIRED_GRACE);
    recent.push((retired, Instant::now()));
}

/// Re-registers every live counter and bumps it by 0, so the exporter keeps it (call it
/// every [`TOUCH_EVERY`]).
pub fn touch_counters() {
    static META: Metadata<'static> =
        Metadata::new(module_path!(), metrics::Level::INFO, Some(module_path!()));
    let live: Vec<Key> = LIVE
        .read()
        .expect("metrics index lock")
        .iter()
        .cloned()
        .collect();
    metrics::with_recorder(|recorder| {
        for key in &live {
            recorder.register_counter(key, &META).increment(0);
        }
    });
}

/// The recorder layer that indexes counters for [`touch_counters`] (see the module docs).
#[derive(Debug)]
pub struct Retiring<R> {
    inner: R,
}

impl<R> Retiring<R> {
    /// `inner`, with its counters indexed.
    pub fn new(inner: R) -> Self {
        Retiring { inner }
    }
}

impl<R: Recorder> Recorder for Retiring<R> {
    fn describe_counter(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.inner.describe_counter(key, unit, description);
    }

    fn describe_gauge(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.inner.describe_gauge(key, unit, description);
    }

    fn describe_histogram(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.inner.describe_histogram(key, unit, description);
    }

    fn register_counter(&self, key: &Key, metadata: &Metadata<'_>) -> Counter {
        let counter = self.inner.register_counter(key, metadata);
        if !LIVE.read().expect("metrics index lock").contains(key) {
            let retired = RETIRED
                .lock()
                .expect("metrics index lock")
                .iter()
                .any(|(r, at)| at.elapsed() < RETIRED_GRACE && r.matches(key));
            if !retired {
                LIVE.write()
                    .expect("metrics index lock")
                    .insert(key.clone());
            }
        }
        counter
    }

    fn register_gauge(&self, key: &Key, metadata: &Metadata<'_>) -> Gauge {
        self.inner.register_gauge(key, metadata)
    }

    fn register_histogram(&self, key: &Key, metadata: &Metadata<'_>) -> Histogram {
        self.inner.register_histogram(key, metadata)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether a series of `metric` labelled `label` = `value` is indexed (kept live).
    fn indexed(metric: &str, label: &str, value: &str) -> bool {
        LIVE.read().unwrap().iter().any(|k| {
            k.name() == metric && k.labels().any(|l| l.key() == label && l.value() == value)
        })
    }

    /// A function deleted and created again under its name within [`RETIRED_GRACE`] keeps
    /// its series, and so does an alias deleted and created again; what the deleted ones
    /// count late stays out meanwhile.
    #[test]
    fn a_name_taken_again_within_the_grace_keeps_its_series() {
        let recorder = Retiring::new(metrics::NoopRecorder);
        let count = |function: &str, alias: &str| {
            metrics::with_local_recorder(&recorder, || {
                invocation(function, Runtime::Python311, "success");
                invocation_by_version(function, 1, Some(alias), "success");
            })
        };
        let (function, alias) = ("metrics-test-recreated", "metrics-test-alias");
        count(function, alias);
        assert!(indexed(INVOCATIONS_TOTAL, "function", function));

        retire_function(function, "fn_old");
        assert!(!indexed(INVOCATIONS_TOTAL, "function", function));
        // An invocation of the deleted function that was still running ends.
        count(function, alias);
        assert!(!indexed(INVOCATIONS_TOTAL, "function", function));
        // The same id read again (a read that raced the deletion) lifts nothing.
        function_live(function, "fn_old");
        count(function, alias);
        assert!(!indexed(INVOCATIONS_TOTAL, "function", function));

        // A new function takes the name.
        function_live(function, "fn_new");
        count(function, alias);
        assert!(indexed(INVOCATIONS_TOTAL, "function", function));
        assert!(indexed(INVOCATION_BY_VERSION_TOTAL, "alias", alias));

        // Its alias is deleted and created again.
        retire_alias(function, "fn_new", alias);
        count(function, alias);
        assert!(!indexed(INVOCATION_BY_VERSION_TOTAL, "alias", alias));
        assert!(indexed(INVOCATIONS_TOTAL, "function", function));
        alias_live("fn_new", alias);
        count(function, alias);
        assert!(indexed(INVOCATION_BY_VERSION_TOTAL, "alias", alias));
    }
}
