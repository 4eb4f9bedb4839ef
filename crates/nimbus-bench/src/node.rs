//! The Node.js phase: the `nodejs20` runtime beside Python 3.11 in the same run (warm
//! latency on one server, starts from spares against cold ones). How: docs/BENCHMARKS.md,
//! "How the harness measures".

use std::sync::Arc;

use anyhow::anyhow;
use bytes::Bytes;
use nimbus_client::NewFunction;
use serde::Serialize;

use super::load::{run_rounds, warm_up, LatencyPhase, LoadTarget};
use super::server::{loopback_addr, ServerProcess, Setup};
use super::snapshots::{compare_starts, Function, Server, ONE_INVOCATION};
use super::starts::Starts;
use super::{progress, EVENT, MAX_PHASE};

/// The no-op functions of the warm comparison: (name, runtime, code).
const PYTHON_NOOP: (&str, &str, &str) = (
    "bench-node-python-noop",
    "python3.11",
    "def handle(event):\n    return event\n",
);
const NODE_NOOP: (&str, &str, &str) = (
    "bench-node-noop",
    "nodejs20",
    "exports.handle = (event) => event;\n",
);
/// Rounds the warm requests of each runtime are split into.
const WARM_ROUNDS: usize = 10;

/// The function of the start comparison: what a small real function loads.
const NODE_START: Function = Function {
    name: "bench-node-start",
    runtime: "nodejs20",
    code: r#"const crypto = require('node:crypto');
const zlib = require('node:zlib');
const http = require('node:http');
const url = require('node:url');
const util = require('node:util');
const { Readable } = require('node:stream');
const table = new Map();
for (let i = 0; i < 100000; i++) table.set(i, `row-${i}`);
exports.handle = async () => ({ rows: table.size, id: crypto.randomUUID() });
"#,
    memory_mb: 256,
    max_instances: 10,
    event: b"{}",
};

/// Node.js beside Python: warm latency, and starts from spares against cold ones.
#[derive(Debug, Serialize)]
pub struct NodePhase {
    /// The server of the warm comparison (default configuration).
    pub warm_server: String,
    /// Rounds the warm requests were split into.
    pub warm_rounds: usize,
    /// Warm invocations of the Python no-op.
    pub python: LatencyPhase,
    /// Warm invocations of the Node.js no-op.
    pub node: LatencyPhase,
    /// p50 Node ÷ p50 Python (0 when either has no samples).
    pub ratio: f64,
    /// The function of the start comparison.
    pub function: String,
    /// The server starting instances from spares (`max_invocations = 1`).
    pub template_server: String,
    /// The server started with `--no-snapshots` (`max_invocations = 1`).
    pub cold_server: String,
    /// Seconds from the function's creation to its spares being ready.
    pub spares_ready_s: f64,
    /// Rounds of starts; each started one instance on each server.
    pub start_rounds: u32,
    /// Starts from a spare.
    pub template_starts: Starts,
    /// Cold starts.
    pub cold_starts: Starts,
    /// Server-reported p50 cold ÷ p50 template (0 when either has no samples).
    pub speedup: f64,
}

/// Measures `requests` warm invocations of each runtime (after `warmup`), then
/// `start_rounds` starts from spares and cold. Every server is stopped at the end (also on
/// error).
pub(super) async fn measure_node(
    requests: u64,
    warmup: u64,
    start_rounds: u32,
) -> anyhow::Result<NodePhase> {
    let (mut process, url, client) = ServerProcess::start_healthy(&Setup::plain(true)).await?;
    let (addr, authority) = loopback_addr(&url)?;
    let mut targets = Vec::new();
    for (name, runtime, code) in [PYTHON_NOOP, NODE_NOOP] {
        let new = NewFunction {
            name: name.to_owned(),
            runtime: Some(runtime.to_owned()),
            code: Some(code.to_owned()),
            description: Some("nimbus bench: returns its event".to_owned()),
            ..NewFunction::default()
        };
        client
            .create_function(&new)
            .await
            .map_err(|e| anyhow!("creating {name}: {e}"))?;
        let target = Arc::new(LoadTarget {
            addr,
            authority: authority.clone(),
            path: format!("/api/v1/functions/{name}/invoke"),
            auth: None,
            event: Bytes::from_static(EVENT),
        });
        warm_up(&target, 1, warmup).await?;
        targets.push(target);
    }
    progress(format!(
        "{requests} warm requests to a Python and a Node.js no-op each, in {WARM_ROUNDS} \
         interleaved rounds"
    ));
    let targets: [Arc<LoadTarget>; 2] = [targets[0].clone(), targets[1].clone()];
    let per_round = requests.div_ceil(WARM_ROUNDS as u64);
    let [python, node] = run_rounds(&targets, WARM_ROUNDS, per_round, MAX_PHASE)
        .await?
        .map(|run| LatencyPhase::from_run(1, run));
    process.stop();

    let with = Setup {
        isolated: true,
        flags: &[],
        config: Some(ONE_INVOCATION),
    };
    let template_server = Server::start(&with, &NODE_START).await?;
    progress(format!("waiting for the spares of {}", NODE_START.name));
    let ready = template_server.wait_resident().await?;
    let without = Setup {
        flags: &["--no-snapshots"],
        ..with
    };
    let servers = [template_server, Server::start(&without, &NODE_START).await?];
    progress(format!(
        "{start_rounds} new Node.js instances on each server, from spares and cold, interleaved"
    ));
    let ([template_starts, cold_starts], _) = compare_starts(&servers, start_rounds).await?;
    let [template_url, cold_url] = servers.map(Server::stop);

    Ok(NodePhase {
        warm_server: url,
        warm_rounds: WARM_ROUNDS,
        ratio: ratio(node.latency.p50_us, python.latency.p50_us),
        python,
        node,
        function: NODE_START.name.to_owned(),
        template_server: template_url,
        cold_server: cold_url,
        spares_ready_s: ready.as_secs_f64(),
        start_rounds,
        speedup: ratio(cold_starts.server.p50_us, template_starts.server.p50_us),
        template_starts,
        cold_starts,
    })
}

/// `a ÷ b`, or 0 when either is missing.
fn ratio(a: f64, b: f64) -> f64 {
    if a > 0.0 && b > 0.0 {
        a / b
    } else {
        0.0
    }
}
