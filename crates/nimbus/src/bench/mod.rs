//! `nimbus bench`: deploys a no-op Python function and measures, over real HTTP on
//! 127.0.0.1, warm invocation latency (one client), what routing through an alias adds to
//! it, throughput (N concurrent clients), the naive design for comparison (a fresh Python
//! process per invocation), the resident memory of idle workers, what isolation costs cold
//! starts and warm invocations (against a server without it), and what starting new
//! instances from a function's template saves in start time and memory (against cold
//! starts), and how long a call of the State API takes from Python on the embedded store
//! and on Redis (against the protocol round trip alone), and how the Node.js runtime
//! compares with Python in warm latency and how fast its spares start new instances
//! (against cold starts); then reports against the product's targets.
//!
//! By default it starts its own server (this binary, `server` on a free port with a
//! temporary data directory, functions isolated) and stops it at the end, also on error or
//! Ctrl-C; the isolation phase then starts and stops two fresh ones the same way, one
//! isolated and one with `--insecure-no-isolation`, and the snapshots phase five more, with
//! and without snapshots, and one whose templates are evicted to disk, the state phase
//! two, one per state backend, and the Node.js phase three. The load generator is a bare hyper HTTP/1 client with one
//! keep-alive connection per virtual client, so the client's own overhead stays small.
//! Every loop is bounded by a count and a deadline.

mod baseline;
mod isolation;
mod load;
mod memory;
mod node;
mod render;
mod report;
mod routing;
mod server;
mod snapshots;
mod starts;
mod state;
mod stats;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::Args;
use reqwest::Method;
use serde_json::{json, Value};

use crate::client::{CliError, Client, Output};

use self::baseline::{baseline_python, python_version, run_baseline};
use self::isolation::measure_isolation;
use self::load::{run_phase, warm_up, LoadTarget};
use self::memory::idle_memory;
use self::node::measure_node;
use self::render::{clients_text, human_report, markdown_report};
use self::report::{targets, LatencyPhase, Machine, Report, ThroughputPhase};
use self::routing::{measure_routing, prepare_canary};
use self::server::{loopback_addr, ServerProcess, Setup};
use self::snapshots::measure_snapshots;
use self::state::measure_state;

/// Name of the function the benchmark deploys.
pub const FUNCTION_NAME: &str = "bench-noop";
/// Its code: returns the event.
const CODE: &str = "def handle(event):\n    return event\n";
/// The event sent with every invocation.
const EVENT: &[u8] = br#"{"ping":1}"#;
/// Upper bound on any single measuring loop.
const MAX_PHASE: Duration = Duration::from_secs(300);

/// Flags of `nimbus bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Benchmark this running server (loopback only) instead of starting one.
    #[arg(long, value_name = "URL")]
    pub server: Option<String>,
    /// API key for --server, sent as `Authorization: Bearer <key>`.
    #[arg(long, env = "NIMBUS_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Requests of the single-client latency phase.
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub requests: u64,
    /// Seconds of each throughput phase.
    #[arg(long, default_value_t = 10.0, value_name = "SECONDS")]
    pub duration: f64,
    /// Concurrent clients of the throughput phases (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,32")]
    pub concurrency: Vec<usize>,
    /// Warm-up invocations before measuring (split between the clients of a phase).
    #[arg(long, default_value_t = 300)]
    pub warmup: u64,
    /// Runs of the spawn-a-process-per-invocation baseline (0 skips it).
    #[arg(long, default_value_t = 50)]
    pub baseline_runs: u32,
    /// Cold starts of the isolation phase, on each of the isolated and an unisolated server
    /// (0 skips them; the warm comparison still runs).
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u32).range(0..=10_000))]
    pub cold_starts: u32,
    /// Rounds of the snapshots phase; each starts a new instance from a template on one
    /// server and a cold one on another, then (on a third) two from checkpoints on disk
    /// (0 skips the phase).
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u32).range(0..=10_000))]
    pub snapshot_starts: u32,
    /// State API calls from Python of the state phase, on each of a server with the
    /// embedded store and one with Redis at 127.0.0.1:6379 (if reachable): as many gets
    /// and protocol-only gets, a tenth as many sets (0 skips the phase).
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(0..=100_000))]
    pub state_gets: u64,
    /// Rounds of new Node.js instances of the Node.js phase, each starting one from the
    /// version's spares on one server and one cold on another; the phase also compares
    /// warm Node.js and Python invocations (`--requests` each). 0 skips the phase.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u32).range(0..=10_000))]
    pub node_starts: u32,
    /// Start the benchmark's servers with --insecure-no-isolation (for hosts that cannot
    /// isolate); skips the isolation and snapshots phases.
    #[arg(long)]
    pub insecure_no_isolation: bool,
    /// Python interpreter of the baseline [default: the one the server's workers run].
    #[arg(long)]
    pub python: Option<PathBuf>,
    /// Also print a Markdown section for docs/BENCHMARKS.md.
    #[arg(long)]
    pub markdown: bool,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

/// Runs `nimbus bench`, stopping its server on Ctrl-C too.
pub async fn run(args: BenchArgs) -> Result<(), CliError> {
    let report = tokio::select! {
        r = measure(&args) => r?,
        _ = tokio::signal::ctrl_c() => return Err(CliError::Usage("interrupted".into())),
    };
    if args.output == Output::Json {
        crate::client::print_json(&serde_json::to_value(&report).map_err(anyhow::Error::from)?);
    } else {
        print!("{}", human_report(&report));
        if args.markdown {
            println!();
            print!("{}", markdown_report(&report, &args));
        }
    }
    Ok(())
}

fn progress(message: impl std::fmt::Display) {
    eprintln!("bench: {message}");
}

async fn measure(args: &BenchArgs) -> anyhow::Result<Report> {
    if !(args.duration > 0.0 && args.duration <= MAX_PHASE.as_secs_f64()) {
        bail!(
            "--duration must be more than 0 and at most {} seconds",
            MAX_PHASE.as_secs()
        );
    }
    if args.concurrency.is_empty() || args.concurrency.iter().any(|&c| c == 0 || c > 1024) {
        bail!("--concurrency takes client counts from 1 to 1024, e.g. 1,32");
    }
    if cfg!(debug_assertions) {
        progress(
            "warning: this is a debug build; measure with `cargo run --release -p nimbus -- bench`",
        );
    }
    let (mut server, url, client, api_key) = match &args.server {
        Some(url) => {
            let client = Client::new(url, args.api_key.clone())?;
            (None, url.clone(), client, args.api_key.clone())
        }
        None => {
            let (process, url, client) =
                ServerProcess::start_healthy(&Setup::plain(!args.insecure_no_isolation)).await?;
            (Some(process), url, client, None)
        }
    };
    let (addr, authority) = loopback_addr(&url)?;

    let created = deploy(&client, FUNCTION_NAME).await?;
    let target = Arc::new(LoadTarget {
        addr,
        authority,
        path: format!("/api/v1/functions/{FUNCTION_NAME}/invoke"),
        auth: api_key.map(|k| format!("Bearer {k}")),
        event: Bytes::from_static(EVENT),
    });

    progress(format!(
        "warming up, then {} requests with 1 client",
        args.requests
    ));
    warm_up(&target, 1, args.warmup).await?;
    let phase = run_phase(&target, 1, Some(args.requests), MAX_PHASE).await?;
    let warm_latency = LatencyPhase::from_run(1, phase);

    progress("publishing a canary behind a split alias, then measuring routing");
    let canary = prepare_canary(&client).await?;
    let routing = measure_routing(&target, canary, args.requests, args.warmup).await?;

    let mut throughput = Vec::new();
    let duration = Duration::from_secs_f64(args.duration);
    for &clients in &args.concurrency {
        progress(format!(
            "warming up {}, then measuring for {:.1} s",
            clients_text(clients),
            args.duration
        ));
        warm_up(&target, clients, args.warmup.max(clients as u64 * 10)).await?;
        let phase = run_phase(&target, clients, None, duration).await?;
        throughput.push(ThroughputPhase::from_run(clients, phase));
    }

    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle_memory = idle_memory(server.as_ref().map(ServerProcess::pid));

    let baseline = if args.baseline_runs > 0 {
        let python = baseline_python(
            args.python.as_deref(),
            idle_memory.as_ref().map(|m| m.pids.as_slice()),
        )?;
        progress(format!(
            "baseline: {} runs of a fresh {} per invocation",
            args.baseline_runs,
            python.display()
        ));
        Some(run_baseline(&python, args.baseline_runs, warm_latency.latency.p50_us).await?)
    } else {
        None
    };

    if created && server.is_none() {
        let _ = client
            .send(
                Method::DELETE,
                &format!("/functions/{FUNCTION_NAME}"),
                &[],
                None,
            )
            .await;
    }
    if let Some(mut process) = server.take() {
        process.stop();
    }

    // After the server above is gone: these phases compare fresh servers of their own.
    let (isolation, isolation_skipped) = match own_servers_skipped(args, "isolation", true) {
        Some(note) => (None, Some(note)),
        None => {
            let phase = measure_isolation(args.cold_starts, args.requests, args.warmup).await?;
            (Some(phase), None)
        }
    };
    let (snapshots, snapshots_skipped) = match own_servers_skipped(args, "snapshots", true) {
        Some(note) => (None, Some(note)),
        None if args.snapshot_starts == 0 => {
            progress("skipping the snapshots phase: --snapshot-starts 0");
            (None, Some("skipped: --snapshot-starts 0".to_owned()))
        }
        None => (Some(measure_snapshots(args.snapshot_starts).await?), None),
    };
    let (state, state_skipped) = match own_servers_skipped(args, "state", false) {
        Some(note) => (None, Some(note)),
        None if args.state_gets == 0 => {
            progress("skipping the state phase: --state-gets 0");
            (None, Some("skipped: --state-gets 0".to_owned()))
        }
        None => (
            Some(measure_state(args.state_gets, !args.insecure_no_isolation).await?),
            None,
        ),
    };

    let (node, node_skipped) = match own_servers_skipped(args, "Node.js", true) {
        Some(note) => (None, Some(note)),
        None if args.node_starts == 0 => {
            progress("skipping the Node.js phase: --node-starts 0");
            (None, Some("skipped: --node-starts 0".to_owned()))
        }
        None => (
            Some(measure_node(args.requests, args.warmup, args.node_starts).await?),
            None,
        ),
    };

    let python_version = baseline
        .as_ref()
        .and_then(|b| python_version(Path::new(&b.python)));
    let mut report = Report {
        machine: Machine::detect(python_version),
        server: url,
        spawned_server: args.server.is_none(),
        warm_latency,
        routing,
        throughput,
        baseline,
        idle_memory,
        isolation,
        isolation_skipped,
        snapshots,
        snapshots_skipped,
        state,
        state_skipped,
        node,
        node_skipped,
        targets: Vec::new(),
    };
    report.targets = targets(&report);
    Ok(report)
}

/// Why `phase`, which compares servers the benchmark starts itself (isolated ones if
/// `needs_isolation`), is skipped with these flags (and says so), or `None` when it runs.
fn own_servers_skipped(args: &BenchArgs, phase: &str, needs_isolation: bool) -> Option<String> {
    let (reason, note) = if args.server.is_some() {
        (
            "--server is not a server bench started",
            format!(
                "--server points at an external server; the {phase} phase needs servers the \
                 benchmark starts itself"
            ),
        )
    } else if needs_isolation && args.insecure_no_isolation {
        (
            "--insecure-no-isolation",
            "--insecure-no-isolation (this host may not isolate)".to_owned(),
        )
    } else {
        return None;
    };
    progress(format!("skipping the {phase} phase: {reason}"));
    Some(format!("skipped: {note}"))
}

/// Creates (or updates) a benchmark function `name` with the bench's code; true if it was
/// created.
async fn deploy(client: &Client, name: &str) -> anyhow::Result<bool> {
    let body =
        json!({ "name": name, "code": CODE, "description": "nimbus bench: returns its event" });
    create_or_update(
        client,
        "/functions",
        &body,
        "function_exists",
        &format!("/functions/{name}"),
        &json!({ "code": CODE }),
    )
    .await
    .with_context(|| format!("deploying {name}"))
}

/// POSTs `body` to `collection`; if that answers `exists_code` (left from an earlier run
/// on this server), PUTs `update` to `item` instead. True if it was created.
async fn create_or_update(
    client: &Client,
    collection: &str,
    body: &Value,
    exists_code: &str,
    item: &str,
    update: &Value,
) -> anyhow::Result<bool> {
    match client.call(Method::POST, collection, body).await {
        Ok(_) => Ok(true),
        Err(CliError::Api { code, .. }) if code == exists_code => {
            client
                .call(Method::PUT, item, update)
                .await
                .map_err(|e| anyhow::anyhow!("updating {item}: {e}"))?;
            Ok(false)
        }
        Err(e) => Err(e.into()),
    }
}
