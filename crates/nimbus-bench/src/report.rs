//! The report of one run: what was measured, on which machine, and the target checks.

use serde::Serialize;

use super::baseline::Baseline;
use super::fmt::{fmt_count, fmt_delta_us, fmt_us, fmt_us_tenths};
use super::isolation::IsolationPhase;
use super::load::{LatencyPhase, ThroughputPhase};
use super::memory::IdleMemory;
use super::node::NodePhase;
use super::phase::{self, Phase};
use super::routing::RoutingPhase;
use super::snapshots::SnapshotPhase;
use super::state::{StateBackendRun, StatePhase};
use super::targets::*;

/// Everything one run measured.
#[derive(Debug, Serialize)]
pub struct Report {
    /// Where it ran.
    pub machine: Machine,
    /// URL of the server measured.
    pub server: String,
    /// Whether the benchmark started that server itself.
    pub spawned_server: bool,
    /// One client, a fixed number of requests.
    pub warm_latency: LatencyPhase,
    /// One client, with and without an alias, interleaved.
    pub routing: RoutingPhase,
    /// One entry per `--concurrency` value.
    pub throughput: Vec<ThroughputPhase>,
    /// The spawn-per-invocation baseline.
    pub baseline: Option<Baseline>,
    /// Idle worker memory after the load.
    pub idle_memory: Option<IdleMemory>,
    /// Cold starts and warm latency, isolated vs unisolated.
    #[serde(flatten, serialize_with = "phase::isolation")]
    pub isolation: Phase<IsolationPhase>,
    /// Starts and idle memory, from templates vs cold.
    #[serde(flatten, serialize_with = "phase::snapshots")]
    pub snapshots: Phase<SnapshotPhase>,
    /// State API calls from Python, per backend.
    #[serde(flatten, serialize_with = "phase::state")]
    pub state: Phase<StatePhase>,
    /// Node.js beside Python: warm latency and starts.
    #[serde(flatten, serialize_with = "phase::node")]
    pub node: Phase<NodePhase>,
    /// The product's targets and whether they were met.
    pub targets: Vec<TargetCheck>,
}

/// The machine and build.
#[derive(Debug, Serialize)]
pub struct Machine {
    /// UTC date of the run.
    pub date: String,
    /// CPUs available (`nproc`).
    pub cpus: usize,
    /// CPU model from /proc/cpuinfo.
    pub cpu_model: String,
    /// Kernel (`uname -sr`).
    pub kernel: String,
    /// Python version of the baseline interpreter.
    pub python: Option<String>,
    /// Nimbus version.
    pub nimbus_version: String,
    /// `release` or `debug`.
    pub build: String,
}

impl Machine {
    pub(super) fn detect(python: Option<String>) -> Self {
        let read = |p: &str| {
            std::fs::read_to_string(p)
                .unwrap_or_default()
                .trim()
                .to_owned()
        };
        let cpu_model = read("/proc/cpuinfo")
            .lines()
            .find_map(|l| {
                l.strip_prefix("model name")
                    .map(|r| r.trim_start_matches([' ', '\t', ':']).to_owned())
            })
            .unwrap_or_else(|| "unknown".into());
        let date = time::OffsetDateTime::now_utc().date();
        Machine {
            date: format!(
                "{:04}-{:02}-{:02}",
                date.year(),
                u8::from(date.month()),
                date.day()
            ),
            cpus: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            cpu_model,
            kernel: format!(
                "{} {}",
                read("/proc/sys/kernel/ostype"),
                read("/proc/sys/kernel/osrelease")
            ),
            python,
            nimbus_version: env!("CARGO_PKG_VERSION").to_owned(),
            build: if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            }
            .to_owned(),
        }
    }
}

/// One target and the measurement it is judged on.
#[derive(Debug, Serialize)]
pub struct TargetCheck {
    /// What is measured.
    pub name: String,
    /// The promise, as text.
    pub target: String,
    /// The measurement, as text (`n/a` when not measured).
    pub measured: String,
    /// Whether it was met (`null` when not measured).
    pub met: Option<bool>,
}

pub(super) fn targets(r: &Report) -> Vec<TargetCheck> {
    let check = |name: &str, target: String, measured: Option<(String, bool)>| TargetCheck {
        name: name.to_owned(),
        target,
        measured: measured
            .as_ref()
            .map(|m| m.0.clone())
            .unwrap_or_else(|| "n/a".into()),
        met: measured.map(|m| m.1),
    };
    let p50 = r.warm_latency.latency.p50_us;
    let routing = &r.routing;
    let overhead = routing.weighted_overhead_us;
    let state_get = |run: Option<&StateBackendRun>, target: f64| {
        run.filter(|b| b.get.samples > 0).map(|b| {
            let p50 = b.get.p50_us;
            (fmt_us_tenths(p50), p50 <= target)
        })
    };
    let rps = r
        .throughput
        .iter()
        .find(|t| t.clients == TARGET_RPS_CLIENTS)
        .map(|t| t.invocations_per_sec);
    vec![
        check(
            "warm p50 latency, 1 client",
            format!("≤ {}", fmt_us(TARGET_P50_US)),
            (r.warm_latency.latency.samples > 0).then(|| (fmt_us(p50), p50 <= TARGET_P50_US)),
        ),
        check(
            "alias routing overhead (p50), 1 client",
            format!("≤ {}", fmt_us(TARGET_ROUTING_US)),
            (routing.pinned.latency.samples > 0 && routing.weighted.latency.samples > 0)
                .then(|| (fmt_delta_us(overhead), overhead <= TARGET_ROUTING_US)),
        ),
        check(
            &format!("throughput, {TARGET_RPS_CLIENTS} clients"),
            format!("≥ {} inv/s", fmt_count(TARGET_RPS)),
            rps.map(|v| (format!("{} inv/s", fmt_count(v)), v >= TARGET_RPS)),
        ),
        check(
            "warm vs spawn-per-invocation",
            format!("≥ {TARGET_RATIO:.0}× faster"),
            r.baseline.as_ref().map(|b| {
                (
                    format!("{:.0}×", b.ratio_to_warm_p50),
                    b.ratio_to_warm_p50 >= TARGET_RATIO,
                )
            }),
        ),
        check(
            "idle warm instance RSS",
            format!("≤ {TARGET_RSS_MIB} MiB"),
            r.idle_memory.as_ref().map(|m| {
                (
                    format!("{:.1} MiB", m.max_rss_mib),
                    m.max_rss_mib <= TARGET_RSS_MIB,
                )
            }),
        ),
        check(
            "isolation cold-start overhead (p50)",
            format!("≤ {}", fmt_us(TARGET_COLD_OVERHEAD_US)),
            r.isolation
                .measured()
                .filter(|i| {
                    i.cold_isolated.server.samples > 0 && i.cold_unisolated.server.samples > 0
                })
                .map(|i| {
                    (
                        fmt_delta_us(i.cold_overhead_us),
                        i.cold_overhead_us <= TARGET_COLD_OVERHEAD_US,
                    )
                }),
        ),
        check(
            "warm invocation with isolation within noise (p50)",
            format!(
                "|Δ| ≤ max({}, {:.0}% of unisolated p50)",
                fmt_us(TARGET_WARM_NOISE_FLOOR_US),
                TARGET_WARM_NOISE_SHARE * 100.0
            ),
            r.isolation
                .measured()
                .filter(|i| {
                    i.warm_isolated.latency.samples > 0 && i.warm_unisolated.latency.samples > 0
                })
                .map(|i| {
                    (
                        format!(
                            "{} (noise bound {})",
                            fmt_delta_us(i.warm_difference_us),
                            fmt_us(i.warm_noise_us)
                        ),
                        i.warm_difference_us.abs() <= i.warm_noise_us,
                    )
                }),
        ),
        check(
            "template start p50 (server)",
            format!("≤ {}", fmt_us(TARGET_TEMPLATE_START_US)),
            r.snapshots
                .measured()
                .filter(|s| s.template_starts.server.samples > 0)
                .map(|s| {
                    let p50 = s.template_starts.server.p50_us;
                    (fmt_us(p50), p50 <= TARGET_TEMPLATE_START_US)
                }),
        ),
        check(
            "template vs cold start (p50, server)",
            format!("≥ {TARGET_TEMPLATE_SPEEDUP:.0}× faster"),
            r.snapshots.measured().filter(|s| s.speedup > 0.0).map(|s| {
                (
                    format!("{:.1}×", s.speedup),
                    s.speedup >= TARGET_TEMPLATE_SPEEDUP,
                )
            }),
        ),
        check(
            "snapshot (disk tier) start p50 (server)",
            format!("≤ {}", fmt_us(TARGET_DISK_START_US)),
            r.snapshots
                .measured()
                .and_then(|s| s.disk.measured())
                .filter(|d| d.starts.server.samples > 0)
                .map(|d| {
                    let p50 = d.starts.server.p50_us;
                    (fmt_us(p50), p50 <= TARGET_DISK_START_US)
                }),
        ),
        check(
            "PSS of an idle instance from a template (mean)",
            format!("≤ {TARGET_TEMPLATE_PSS_MIB} MiB"),
            r.snapshots
                .measured()
                .and_then(|s| s.memory.instances.as_ref())
                .map(|m| {
                    (
                        format!("{:.2} MiB", m.avg_pss_mib),
                        m.avg_pss_mib <= TARGET_TEMPLATE_PSS_MIB,
                    )
                }),
        ),
        check(
            "state get p50 (embedded, from Python)",
            format!("≤ {}", fmt_us(TARGET_STATE_GET_EMBEDDED_US)),
            state_get(
                r.state.measured().map(|s| &s.embedded),
                TARGET_STATE_GET_EMBEDDED_US,
            ),
        ),
        check(
            "state get p50 (Redis, from Python)",
            format!("≤ {}", fmt_us(TARGET_STATE_GET_REDIS_US)),
            state_get(
                r.state.measured().and_then(|s| s.redis.measured()),
                TARGET_STATE_GET_REDIS_US,
            ),
        ),
        check(
            "Node.js warm p50 ÷ Python warm p50",
            format!("≤ {TARGET_NODE_WARM_RATIO}×"),
            r.node.measured().filter(|n| n.ratio > 0.0).map(|n| {
                (
                    format!("{:.2}×", n.ratio),
                    n.ratio <= TARGET_NODE_WARM_RATIO,
                )
            }),
        ),
        check(
            "Node.js start from a spare p50 (server)",
            format!("≤ {}", fmt_us(TARGET_NODE_TEMPLATE_START_US)),
            r.node
                .measured()
                .filter(|n| n.template_starts.server.samples > 0)
                .map(|n| {
                    let p50 = n.template_starts.server.p50_us;
                    (fmt_us(p50), p50 <= TARGET_NODE_TEMPLATE_START_US)
                }),
        ),
    ]
}
