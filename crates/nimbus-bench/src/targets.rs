//! The product's targets, as the reports check them.

pub const TARGET_P50_US: f64 = 300.0;
pub const TARGET_RPS: f64 = 6000.0;
pub const TARGET_RPS_CLIENTS: usize = 32;
pub const TARGET_RATIO: f64 = 100.0;
pub const TARGET_RSS_MIB: f64 = 15.0;
pub const TARGET_ROUTING_US: f64 = 20.0;
pub const TARGET_COLD_OVERHEAD_US: f64 = 5000.0;
/// "Within noise" for a warm p50 difference: at most the larger of this floor and
/// [`TARGET_WARM_NOISE_SHARE`] of the unisolated p50.
pub const TARGET_WARM_NOISE_FLOOR_US: f64 = 10.0;
pub const TARGET_WARM_NOISE_SHARE: f64 = 0.05;
/// Server-reported p50 of a start from a template.
pub const TARGET_TEMPLATE_START_US: f64 = 8000.0;
/// Cold start p50 ÷ template start p50.
pub const TARGET_TEMPLATE_SPEEDUP: f64 = 15.0;
/// Mean PSS of an idle instance forked from a template.
pub const TARGET_TEMPLATE_PSS_MIB: f64 = 5.0;
/// Server-reported p50 of a start from a checkpoint on disk (the disk tier).
pub const TARGET_DISK_START_US: f64 = 60_000.0;
/// p50 of a `state.get` from Python on the embedded store.
pub const TARGET_STATE_GET_EMBEDDED_US: f64 = 60.0;
/// p50 of a `state.get` from Python on Redis.
pub const TARGET_STATE_GET_REDIS_US: f64 = 250.0;

/// Node.js warm p50 ÷ Python warm p50, same server, same run.
pub const TARGET_NODE_WARM_RATIO: f64 = 1.5;
/// Server-reported p50 of a Node.js start from a spare (its template tier).
pub const TARGET_NODE_TEMPLATE_START_US: f64 = 10_000.0;
