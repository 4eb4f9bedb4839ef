//! `nimbus-bench`: the benchmark harness of Nimbus. It deploys functions on `nimbus server`s
//! it starts itself (the `nimbus` binary next to this one, or `--nimbus-bin`) and measures,
//! over real HTTP on 127.0.0.1: warm latency (one client) and what alias routing adds,
//! throughput (N clients), a process-per-invocation baseline, idle memory, what isolation
//! costs, template and disk-checkpoint starts against cold ones, State API calls (embedded
//! store and Redis) and Node.js against Python; then it reports against the product's
//! targets, as text and optionally Markdown. docs/BENCHMARKS.md holds the figures and how
//! to read them.

mod baseline;
mod fmt;
mod isolation;
mod load;
mod memory;
mod node;
mod phase;
mod render;
mod report;
mod routing;
mod server;
mod snapshots;
mod starts;
mod state;
mod stats;
mod table;
mod targets;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::{Parser, ValueEnum};
use nimbus_client::{Client, FunctionPatch, NewFunction};

use self::baseline::{baseline_python, python_version, run_baseline};
use self::fmt::clients_text;
use self::isolation::measure_isolation;
use self::load::{run_phase, warm_up, LatencyPhase, LoadTarget, ThroughputPhase};
use self::memory::idle_memory;
use self::node::measure_node;
use self::phase::Phase;
use self::render::{human_report, markdown_report};
use self::report::{targets, Machine, Report};
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

/// Measure a Nimbus server: warm latency, throughput, a process-per-invocation baseline,
/// idle memory, isolation, snapshots, state and Node.js.
#[derive(Debug, Parser)]
#[command(name = "nimbus-bench", version, about)]
pub struct BenchArgs {
    /// The `nimbus` binary to start servers from [default: the one next to nimbus-bench],
    /// e.g. an older build for a before/after comparison.
    #[arg(long, value_name = "PATH")]
    pub nimbus_bin: Option<PathBuf>,
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

/// How the report is printed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Human-readable tables.
    #[default]
    Table,
    /// The report as JSON.
    Json,
}

fn main() -> std::process::ExitCode {
    let args = BenchArgs::parse();
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|runtime| runtime.block_on(run(args)));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Runs the benchmark, stopping its servers on Ctrl-C too.
async fn run(args: BenchArgs) -> anyhow::Result<()> {
    server::choose_nimbus_binary(args.nimbus_bin.clone())?;
    let report = tokio::select! {
        r = measure(&args) => r?,
        _ = tokio::signal::ctrl_c() => bail!("interrupted"),
    };
    if args.output == Output::Json {
        let value = serde_json::to_value(&report)?;
        println!("{}", serde_json::to_string_pretty(&value)?);
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
            "warning: this is a debug build; measure with `cargo run --release -p nimbus-bench`",
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
        let _ = client.delete_function(FUNCTION_NAME).await;
    }
    if let Some(mut process) = server.take() {
        process.stop();
    }

    // After the server above is gone: these phases compare fresh servers of their own.
    let isolation = match own_servers_skipped(args, "isolation", true) {
        Some(note) => Phase::Skipped(note),
        None => {
            Phase::Measured(measure_isolation(args.cold_starts, args.requests, args.warmup).await?)
        }
    };
    let snapshots = match own_servers_skipped(args, "snapshots", true) {
        Some(note) => Phase::Skipped(note),
        None if args.snapshot_starts == 0 => {
            progress("skipping the snapshots phase: --snapshot-starts 0");
            Phase::Skipped("skipped: --snapshot-starts 0".to_owned())
        }
        None => Phase::Measured(measure_snapshots(args.snapshot_starts).await?),
    };
    let state = match own_servers_skipped(args, "state", false) {
        Some(note) => Phase::Skipped(note),
        None if args.state_gets == 0 => {
            progress("skipping the state phase: --state-gets 0");
            Phase::Skipped("skipped: --state-gets 0".to_owned())
        }
        None => Phase::Measured(measure_state(args.state_gets, !args.insecure_no_isolation).await?),
    };
    let node = match own_servers_skipped(args, "Node.js", true) {
        Some(note) => Phase::Skipped(note),
        None if args.node_starts == 0 => {
            progress("skipping the Node.js phase: --node-starts 0");
            Phase::Skipped("skipped: --node-starts 0".to_owned())
        }
        None => Phase::Measured(measure_node(args.requests, args.warmup, args.node_starts).await?),
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
        snapshots,
        state,
        node,
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
    let new = NewFunction {
        name: name.to_owned(),
        code: Some(CODE.to_owned()),
        description: Some("nimbus bench: returns its event".to_owned()),
        ..NewFunction::default()
    };
    let deployed = async {
        if created(client.create_function(&new).await, "function_exists")?.is_some() {
            return anyhow::Ok(true);
        }
        let patch = FunctionPatch {
            code: Some(CODE.to_owned()),
            ..FunctionPatch::default()
        };
        client
            .update_function(name, &patch)
            .await
            .map_err(|e| anyhow::anyhow!("updating /functions/{name}: {e}"))?;
        Ok(false)
    };
    deployed.await.with_context(|| format!("deploying {name}"))
}

/// What a create call answered, or `None` if it answered `exists_code` (the resource is
/// left from an earlier run on this server).
fn created<T>(result: nimbus_client::Result<T>, exists_code: &str) -> anyhow::Result<Option<T>> {
    match result {
        Ok(value) => Ok(Some(value)),
        Err(e) if e.has_code(exists_code) => Ok(None),
        Err(e) => Err(e.into()),
    }
}
