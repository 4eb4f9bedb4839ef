//! `nimbus bench`: deploys a no-op Python function and measures, over real HTTP on
//! 127.0.0.1, warm invocation latency (one client), throughput (N concurrent clients), the
//! naive design for comparison (a fresh Python process per invocation) and the resident
//! memory of idle workers; then reports against the product's targets.
//!
//! By default it starts its own server (this binary, `server` on a free port with a
//! temporary data directory) and stops it at the end, also on error or Ctrl-C. The load
//! generator is a bare hyper HTTP/1 client with one keep-alive connection per virtual
//! client, so the client's own overhead stays small. Every loop is bounded by a count and
//! a deadline.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::Args;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use reqwest::Method;
use serde::Serialize;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;

use crate::client::table::Table;
use crate::client::{CliError, Client, Output};

/// Name of the function the benchmark deploys.
pub const FUNCTION_NAME: &str = "bench-noop";
/// Its code: returns the event.
const CODE: &str = "def handle(event):\n    return event\n";
/// The event sent with every invocation.
const EVENT: &[u8] = br#"{"ping":1}"#;
/// The naive design's runner: import the handler, call it with the event from stdin, print JSON.
const BASELINE_RUNNER: &str =
    "import json, sys\nfrom handler import handle\njson.dump(handle(json.load(sys.stdin)), sys.stdout)\n";
/// Marker of a warm start in an invoke response.
const WARM_MARKER: &[u8] = br#""start_type":"warm""#;
/// Upper bound on any single measuring loop.
const MAX_PHASE: Duration = Duration::from_secs(300);

/// The product's targets.
const TARGET_P50_US: f64 = 300.0;
const TARGET_RPS: f64 = 6000.0;
const TARGET_RPS_CLIENTS: usize = 32;
const TARGET_RATIO: f64 = 100.0;
const TARGET_RSS_MIB: f64 = 15.0;

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
    let (mut server, url) = match &args.server {
        Some(url) => (None, url.clone()),
        None => {
            let (process, url) = ServerProcess::start()?;
            (Some(process), url)
        }
    };
    let (addr, authority) = loopback_addr(&url)?;
    let api_key = if server.is_some() {
        None
    } else {
        args.api_key.clone()
    };
    let client = Client::new(&url, api_key.clone())?;
    if let Some(process) = &mut server {
        progress(format!("started server pid {} at {url}", process.pid()));
        process.wait_healthy(&client).await?;
    }

    let created = deploy(&client).await?;
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

    let python_version = baseline
        .as_ref()
        .and_then(|b| python_version(Path::new(&b.python)));
    let mut report = Report {
        machine: Machine::detect(python_version),
        server: url,
        spawned_server: args.server.is_none(),
        warm_latency,
        throughput,
        baseline,
        idle_memory,
        targets: Vec::new(),
    };
    report.targets = targets(&report);
    Ok(report)
}

/// Creates (or updates) the benchmark function; true if it was created.
async fn deploy(client: &Client) -> anyhow::Result<bool> {
    let body = json!({ "name": FUNCTION_NAME, "code": CODE, "description": "nimbus bench: returns its event" });
    match client.call(Method::POST, "/functions", &body).await {
        Ok(_) => Ok(true),
        Err(CliError::Api { code, .. }) if code == "function_exists" => {
            client
                .call(
                    Method::PUT,
                    &format!("/functions/{FUNCTION_NAME}"),
                    &json!({ "code": CODE }),
                )
                .await
                .map_err(|e| anyhow::anyhow!("updating {FUNCTION_NAME}: {e}"))?;
            Ok(false)
        }
        Err(e) => bail!("deploying {FUNCTION_NAME}: {e}"),
    }
}

// --- the server under test -------------------------------------------------------------

/// A `nimbus server` child with its own temporary data directory, stopped on drop.
struct ServerProcess {
    child: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl ServerProcess {
    /// Starts `<this binary> server` on a free loopback port; returns it and its URL.
    fn start() -> anyhow::Result<(Self, String)> {
        let exe = std::env::current_exe().context("locating the nimbus binary")?;
        let dir = tempfile::Builder::new().prefix("nimbus-bench-").tempdir()?;
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let listen = format!("127.0.0.1:{port}");
        let log = dir.path().join("server.log");
        let log_file = std::fs::File::create(&log)?;
        let child = std::process::Command::new(exe)
            .args(["server", "--listen", &listen, "--data-dir"])
            .arg(dir.path().join("data"))
            .env("NIMBUS_LOG", "warn")
            .env_remove("NIMBUS_CONFIG")
            .env_remove("NIMBUS_LISTEN")
            .env_remove("NIMBUS_DATA_DIR")
            .env_remove("NIMBUS_DATABASE_URL")
            .env_remove("NIMBUS_API_KEYS")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .context("starting the server")?;
        Ok((
            ServerProcess {
                child,
                log,
                _dir: dir,
            },
            format!("http://{listen}"),
        ))
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Waits (at most 30 s) until `GET /health` answers.
    async fn wait_healthy(&mut self, client: &Client) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "the server exited ({status}) before it was ready:\n{}",
                    self.log_tail()
                );
            }
            if let Ok(reply) = client.send_raw(Method::GET, "/health", &[], None).await {
                if reply.status.is_success() {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "the server did not answer /health within 30 s:\n{}",
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM, up to 5 s to drain, then SIGKILL.
    fn stop(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        // SAFETY: kill(2) on the pid of our own child, which has not been reaped yet.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The socket address and `Host` of a loopback `http://` URL; anything else is refused.
fn loopback_addr(url: &str) -> anyhow::Result<(SocketAddr, String)> {
    let url = crate::client::http::normalize_server(url).map_err(|e| anyhow::anyhow!("{e}"))?;
    let Some(rest) = url.strip_prefix("http://") else {
        bail!("bench needs an http:// server URL, got {url}");
    };
    let authority = rest.split('/').next().unwrap_or_default().to_owned();
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) if !port.contains(']') => (
            host,
            port.parse::<u16>()
                .with_context(|| format!("invalid port in {url}"))?,
        ),
        _ => (authority.as_str(), 80),
    };
    let ip = match host {
        "127.0.0.1" | "localhost" => [127, 0, 0, 1].into(),
        "[::1]" => std::net::Ipv6Addr::LOCALHOST.into(),
        _ => bail!("bench only targets a server on this machine (127.0.0.1, localhost or [::1]), got {host}"),
    };
    Ok((SocketAddr::new(ip, port), authority))
}

// --- load generator --------------------------------------------------------------------

/// Where and what the virtual clients send.
struct LoadTarget {
    addr: SocketAddr,
    authority: String,
    path: String,
    auth: Option<String>,
    event: Bytes,
}

type Sender = SendRequest<Full<Bytes>>;

async fn connect(t: &LoadTarget) -> anyhow::Result<Sender> {
    let stream = tokio::net::TcpStream::connect(t.addr)
        .await
        .with_context(|| format!("connecting to {}", t.addr))?;
    stream.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// One invocation: status and response body.
async fn call(sender: &mut Sender, t: &LoadTarget) -> anyhow::Result<(u16, Bytes)> {
    let mut req = hyper::Request::post(t.path.as_str())
        .header(hyper::header::HOST, t.authority.as_str())
        .header(hyper::header::CONTENT_TYPE, "application/json");
    if let Some(auth) = &t.auth {
        req = req.header(hyper::header::AUTHORIZATION, auth.as_str());
    }
    let req = req.body(Full::new(t.event.clone()))?;
    sender.ready().await?;
    let response = sender.send_request(req).await?;
    let status = response.status().as_u16();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, body))
}

/// What some virtual clients observed.
#[derive(Debug, Default)]
struct ClientRun {
    /// Latency of each successful invocation, ns.
    latencies_ns: Vec<u64>,
    errors: u64,
    non_warm: u64,
    first_error: Option<String>,
}

impl ClientRun {
    fn merge(&mut self, other: ClientRun) {
        self.latencies_ns.extend(other.latencies_ns);
        self.errors += other.errors;
        self.non_warm += other.non_warm;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }

    fn fail(&mut self, message: String) {
        self.errors += 1;
        self.first_error.get_or_insert(message);
    }
}

/// One virtual client: sequential invocations on one connection until `count` or `deadline`.
async fn virtual_client(
    t: Arc<LoadTarget>,
    mut sender: Sender,
    count: Option<u64>,
    deadline: Instant,
) -> ClientRun {
    let mut run = ClientRun::default();
    let mut done = 0u64;
    let limit = count.unwrap_or(u64::MAX);
    while done < limit && Instant::now() < deadline {
        done += 1;
        let start = Instant::now();
        match call(&mut sender, &t).await {
            Ok((200, body)) => {
                run.latencies_ns.push(start.elapsed().as_nanos() as u64);
                if !contains(&body, WARM_MARKER) {
                    run.non_warm += 1;
                }
            }
            Ok((status, body)) => {
                let text = String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned();
                run.fail(format!("HTTP {status}: {text}"));
            }
            Err(e) => {
                run.fail(format!("{e:#}"));
                match connect(&t).await {
                    Ok(s) => sender = s,
                    Err(e) => {
                        run.fail(format!("{e:#}"));
                        break;
                    }
                }
            }
        }
        // Give up on a phase that mostly fails rather than spin on errors.
        if run.errors >= 100 && run.errors as usize > run.latencies_ns.len() {
            break;
        }
    }
    run
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The result of one phase and how long it took.
struct PhaseRun {
    run: ClientRun,
    elapsed: Duration,
}

/// `clients` connections, each sending up to `count` requests until `duration` has passed.
async fn run_phase(
    t: &Arc<LoadTarget>,
    clients: usize,
    count: Option<u64>,
    duration: Duration,
) -> anyhow::Result<PhaseRun> {
    let mut senders = Vec::with_capacity(clients);
    for _ in 0..clients {
        senders.push(connect(t).await?);
    }
    let start = Instant::now();
    let deadline = start + duration.min(MAX_PHASE);
    let tasks: Vec<_> = senders
        .into_iter()
        .map(|s| tokio::spawn(virtual_client(t.clone(), s, count, deadline)))
        .collect();
    let mut run = ClientRun::default();
    for task in tasks {
        run.merge(task.await?);
    }
    Ok(PhaseRun {
        run,
        elapsed: start.elapsed(),
    })
}

/// Invokes with `clients` clients until a round is served entirely by warm instances (at most 5 rounds).
async fn warm_up(t: &Arc<LoadTarget>, clients: usize, total: u64) -> anyhow::Result<()> {
    let per_client = (total / clients as u64).max(10);
    for _ in 0..5 {
        let phase = run_phase(t, clients, Some(per_client), Duration::from_secs(60)).await?;
        if phase.run.latencies_ns.is_empty() {
            bail!(
                "warm-up failed: {}",
                phase
                    .run
                    .first_error
                    .unwrap_or_else(|| "no invocation succeeded".into())
            );
        }
        if phase.run.non_warm == 0 && phase.run.errors == 0 {
            break;
        }
    }
    Ok(())
}

// --- statistics ------------------------------------------------------------------------

/// Nearest-rank percentile (`p` in 0–100) of sorted samples; 0 when there are none.
pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Summary of latency samples, in microseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Latency {
    /// Samples.
    pub samples: usize,
    /// Mean.
    pub mean_us: f64,
    /// Minimum.
    pub min_us: f64,
    /// Median.
    pub p50_us: f64,
    /// 90th percentile.
    pub p90_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// Maximum.
    pub max_us: f64,
}

impl Latency {
    /// Summarizes samples in nanoseconds (sorts them).
    pub fn from_ns(samples: &mut [u64]) -> Self {
        samples.sort_unstable();
        let us = |ns: u64| ns as f64 / 1000.0;
        let n = samples.len();
        Latency {
            samples: n,
            mean_us: if n == 0 {
                0.0
            } else {
                samples.iter().map(|&s| s as f64).sum::<f64>() / n as f64 / 1000.0
            },
            min_us: us(samples.first().copied().unwrap_or(0)),
            p50_us: us(percentile(samples, 50.0)),
            p90_us: us(percentile(samples, 90.0)),
            p99_us: us(percentile(samples, 99.0)),
            max_us: us(samples.last().copied().unwrap_or(0)),
        }
    }
}

// --- baseline: a fresh process per invocation ------------------------------------------

/// The Python interpreter of the baseline: `--python`, `NIMBUS_PYTHON`, the executable of a
/// running worker (what the server resolved), else the runtime's own resolution (never a shim).
fn baseline_python(
    explicit: Option<&Path>,
    worker_pids: Option<&[u32]>,
) -> anyhow::Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os("NIMBUS_PYTHON").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    for pid in worker_pids.unwrap_or_default() {
        if let Ok(exe) = std::fs::read_link(format!("/proc/{pid}/exe")) {
            if exe
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("python"))
            {
                return Ok(exe);
            }
        }
    }
    // Resolve exactly as the server's Python runtime does (its files go to a scratch dir).
    let scratch = tempfile::Builder::new()
        .prefix("nimbus-bench-python-")
        .tempdir()?;
    nimbus_runtime::python::PythonRuntime::discover(None, scratch.path())
        .map(|runtime| runtime.interpreter().to_path_buf())
        .map_err(|why| {
            anyhow::anyhow!("no Python interpreter for the baseline ({why}); pass --python")
        })
}

/// `Python 3.11.2` of an interpreter.
fn python_version(python: &Path) -> Option<String> {
    let out = std::process::Command::new(python)
        .arg("--version")
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(if out.stdout.is_empty() {
        &out.stderr
    } else {
        &out.stdout
    })
    .trim()
    .to_owned();
    (!text.is_empty()).then_some(text)
}

/// The naive design's latency: spawn Python, import the handler, call it, print JSON, exit.
async fn run_baseline(python: &Path, runs: u32, warm_p50_us: f64) -> anyhow::Result<Baseline> {
    let dir = tempfile::Builder::new()
        .prefix("nimbus-bench-baseline-")
        .tempdir()?;
    std::fs::write(dir.path().join("handler.py"), CODE)?;
    let expected: Value = serde_json::from_slice(EVENT)?;
    let mut samples = Vec::with_capacity(runs as usize);
    for _ in 0..runs {
        let start = Instant::now();
        let mut child = tokio::process::Command::new(python)
            .args(["-c", BASELINE_RUNNER])
            .current_dir(dir.path())
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", python.display()))?;
        let mut stdin = child.stdin.take().context("baseline stdin")?;
        stdin.write_all(EVENT).await?;
        drop(stdin);
        let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
            .await
            .context("a baseline run took more than 30 s")??;
        let elapsed = start.elapsed();
        if !out.status.success() {
            bail!(
                "the baseline run failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let got: Value = serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "baseline output is not JSON: {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })?;
        if got != expected {
            bail!("the baseline returned {got}, expected {expected}");
        }
        samples.push(elapsed.as_nanos() as u64);
    }
    let latency = Latency::from_ns(&mut samples);
    let ratio = if warm_p50_us > 0.0 {
        latency.p50_us / warm_p50_us
    } else {
        0.0
    };
    Ok(Baseline {
        python: python.display().to_string(),
        runs,
        latency,
        ratio_to_warm_p50: ratio,
    })
}

// --- idle memory -----------------------------------------------------------------------

/// `(pid, ppid)` of every process.
fn process_table() -> Vec<(u32, u32)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // `pid (comm) state ppid …`: comm may hold spaces and parentheses.
            let after = &stat[stat.rfind(')')? + 1..];
            let ppid = after.split_whitespace().nth(1)?.parse().ok()?;
            Some((pid, ppid))
        })
        .collect()
}

/// All descendants of `root`.
fn descendants(root: u32, table: &[(u32, u32)]) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    for &(pid, ppid) in table {
        children.entry(ppid).or_default().push(pid);
    }
    let mut out = Vec::new();
    let mut stack = vec![root];
    while let Some(pid) = stack.pop() {
        for &child in children.get(&pid).map(Vec::as_slice).unwrap_or_default() {
            out.push(child);
            stack.push(child);
        }
    }
    out.sort_unstable();
    out
}

/// A `kB` field of a /proc file (`VmRSS:`, `Pss:`).
fn proc_kib(path: &str, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
}

/// Memory of the idle workers: the server's descendants, or (for an external server) the
/// processes running the Python worker bootstrap.
fn idle_memory(server_pid: Option<u32>) -> Option<IdleMemory> {
    let table = process_table();
    let (basis, pids) = match server_pid {
        Some(pid) => (
            format!("descendants of server pid {pid}"),
            descendants(pid, &table),
        ),
        None => {
            let pids = table
                .iter()
                .map(|&(pid, _)| pid)
                .filter(|pid| {
                    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                        contains(&c, b"nimbus_boot.py") || contains(&c, b"nimbus_worker.py")
                    })
                })
                .collect();
            (
                "processes running the Nimbus Python worker".to_owned(),
                pids,
            )
        }
    };
    let rss: Vec<(u32, u64)> = pids
        .iter()
        .filter_map(|&pid| Some((pid, proc_kib(&format!("/proc/{pid}/status"), "VmRSS:")?)))
        .collect();
    if rss.is_empty() {
        return None;
    }
    let pss: Vec<u64> = rss
        .iter()
        .filter_map(|&(pid, _)| proc_kib(&format!("/proc/{pid}/smaps_rollup"), "Pss:"))
        .collect();
    let mib = |kib: f64| kib / 1024.0;
    Some(IdleMemory {
        basis,
        processes: rss.len(),
        max_rss_mib: mib(rss.iter().map(|&(_, k)| k).max().unwrap_or(0) as f64),
        avg_rss_mib: mib(rss.iter().map(|&(_, k)| k as f64).sum::<f64>() / rss.len() as f64),
        avg_pss_mib: (pss.len() == rss.len())
            .then(|| mib(pss.iter().sum::<u64>() as f64 / pss.len() as f64)),
        pids: rss.iter().map(|&(pid, _)| pid).collect(),
    })
}

// --- report ----------------------------------------------------------------------------

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
    /// One entry per `--concurrency` value.
    pub throughput: Vec<ThroughputPhase>,
    /// The spawn-per-invocation baseline.
    pub baseline: Option<Baseline>,
    /// Idle worker memory after the load.
    pub idle_memory: Option<IdleMemory>,
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
    fn detect(python: Option<String>) -> Self {
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

/// The single-client latency phase.
#[derive(Debug, Serialize)]
pub struct LatencyPhase {
    /// Concurrent clients (1).
    pub clients: usize,
    /// Failed invocations.
    pub errors: u64,
    /// Successful invocations not served by a warm instance.
    pub non_warm: u64,
    /// Latency of the successful invocations.
    #[serde(flatten)]
    pub latency: Latency,
    /// The first failure seen, if any.
    pub first_error: Option<String>,
}

impl LatencyPhase {
    fn from_run(clients: usize, mut phase: PhaseRun) -> Self {
        LatencyPhase {
            clients,
            errors: phase.run.errors,
            non_warm: phase.run.non_warm,
            latency: Latency::from_ns(&mut phase.run.latencies_ns),
            first_error: phase.run.first_error,
        }
    }
}

/// One throughput phase.
#[derive(Debug, Serialize)]
pub struct ThroughputPhase {
    /// Concurrent clients.
    pub clients: usize,
    /// Seconds measured.
    pub duration_s: f64,
    /// Successful invocations per second.
    pub invocations_per_sec: f64,
    /// Failed invocations.
    pub errors: u64,
    /// Successful invocations not served by a warm instance.
    pub non_warm: u64,
    /// Latency of the successful invocations.
    #[serde(flatten)]
    pub latency: Latency,
    /// The first failure seen, if any.
    pub first_error: Option<String>,
}

impl ThroughputPhase {
    fn from_run(clients: usize, mut phase: PhaseRun) -> Self {
        let seconds = phase.elapsed.as_secs_f64();
        let ok = phase.run.latencies_ns.len() as f64;
        ThroughputPhase {
            clients,
            duration_s: seconds,
            invocations_per_sec: if seconds > 0.0 { ok / seconds } else { 0.0 },
            errors: phase.run.errors,
            non_warm: phase.run.non_warm,
            latency: Latency::from_ns(&mut phase.run.latencies_ns),
            first_error: phase.run.first_error,
        }
    }
}

/// The naive design: a fresh Python process per invocation.
#[derive(Debug, Serialize)]
pub struct Baseline {
    /// Interpreter used.
    pub python: String,
    /// Runs measured.
    pub runs: u32,
    /// Latency of a run (spawn to exit).
    #[serde(flatten)]
    pub latency: Latency,
    /// Baseline p50 / warm p50.
    pub ratio_to_warm_p50: f64,
}

/// Resident memory of the idle workers.
#[derive(Debug, Serialize)]
pub struct IdleMemory {
    /// How the processes were found.
    pub basis: String,
    /// Processes measured.
    pub processes: usize,
    /// Largest VmRSS, MiB.
    pub max_rss_mib: f64,
    /// Mean VmRSS, MiB.
    pub avg_rss_mib: f64,
    /// Mean proportional set size (shared pages split between sharers), MiB.
    pub avg_pss_mib: Option<f64>,
    /// Their pids.
    pub pids: Vec<u32>,
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

fn targets(r: &Report) -> Vec<TargetCheck> {
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
    ]
}

/// `1 client`, `32 clients`.
fn clients_text(n: usize) -> String {
    if n == 1 {
        "1 client".to_owned()
    } else {
        format!("{n} clients")
    }
}

/// `212 µs`, `1.25 ms`, `2.10 s`.
fn fmt_us(us: f64) -> String {
    if us < 1000.0 {
        format!("{us:.0} µs")
    } else if us < 1_000_000.0 {
        format!("{:.2} ms", us / 1000.0)
    } else {
        format!("{:.2} s", us / 1_000_000.0)
    }
}

/// `6,412`.
fn fmt_count(v: f64) -> String {
    let digits = format!("{:.0}", v.max(0.0));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn machine_line(m: &Machine) -> String {
    format!(
        "{} CPUs ({}), {}, {}, nimbus {} ({} build)",
        m.cpus,
        m.cpu_model,
        m.kernel,
        m.python.as_deref().unwrap_or("Python unknown"),
        m.nimbus_version,
        m.build
    )
}

fn human_report(r: &Report) -> String {
    let mut out = format!(
        "Nimbus benchmark, {}\nMachine: {}\n",
        r.machine.date,
        machine_line(&r.machine)
    );
    out.push_str(&format!(
        "Server:  {} ({})\n\n",
        r.server,
        if r.spawned_server {
            "started by bench"
        } else {
            "external"
        }
    ));
    let w = &r.warm_latency;
    out.push_str(&format!(
        "Warm latency, 1 client, {} requests: p50 {}  p90 {}  p99 {}  mean {}  ({} errors, {} not warm)\n\n",
        w.latency.samples,
        fmt_us(w.latency.p50_us),
        fmt_us(w.latency.p90_us),
        fmt_us(w.latency.p99_us),
        fmt_us(w.latency.mean_us),
        w.errors,
        w.non_warm
    ));
    let mut table = Table::new(&[
        "clients",
        "seconds",
        "invocations",
        "inv/s",
        "p50",
        "p99",
        "errors",
        "not warm",
    ]);
    for t in &r.throughput {
        table.row([
            t.clients.to_string(),
            format!("{:.1}", t.duration_s),
            t.latency.samples.to_string(),
            fmt_count(t.invocations_per_sec),
            fmt_us(t.latency.p50_us),
            fmt_us(t.latency.p99_us),
            t.errors.to_string(),
            t.non_warm.to_string(),
        ]);
    }
    out.push_str("Throughput:\n");
    out.push_str(&table.render());
    for t in r.throughput.iter().filter_map(|t| t.first_error.as_ref()) {
        out.push_str(&format!("  first error: {t}\n"));
    }
    if let Some(e) = &w.first_error {
        out.push_str(&format!("  first error (latency phase): {e}\n"));
    }
    out.push('\n');
    match &r.baseline {
        Some(b) => out.push_str(&format!(
            "Spawn-per-invocation baseline ({}, {} runs): p50 {}  p99 {}  → warm is {:.0}× faster\n",
            b.python,
            b.runs,
            fmt_us(b.latency.p50_us),
            fmt_us(b.latency.p99_us),
            b.ratio_to_warm_p50
        )),
        None => out.push_str("Spawn-per-invocation baseline: skipped\n"),
    }
    match &r.idle_memory {
        Some(m) => out.push_str(&format!(
            "Idle workers ({} processes, {}): max RSS {:.1} MiB, avg RSS {:.1} MiB{}\n\n",
            m.processes,
            m.basis,
            m.max_rss_mib,
            m.avg_rss_mib,
            m.avg_pss_mib
                .map(|p| format!(", avg PSS {p:.1} MiB"))
                .unwrap_or_default()
        )),
        None => out.push_str("Idle workers: none found\n\n"),
    }
    out.push_str("Targets:\n");
    let mut table = Table::new(&["target", "promise", "measured", "result"]);
    for t in &r.targets {
        let result = match t.met {
            Some(true) => "met",
            Some(false) => "MISSED",
            None => "not measured",
        };
        table.row([
            t.name.clone(),
            t.target.clone(),
            t.measured.clone(),
            result.to_owned(),
        ]);
    }
    out.push_str(&table.render());
    out
}

fn markdown_report(r: &Report, args: &BenchArgs) -> String {
    let m = &r.machine;
    let mut out = format!("## {} — {} CPUs, {}\n\n", m.date, m.cpus, m.cpu_model);
    out.push_str(&format!(
        "Machine: `nproc` {}, {}, {}, {}; nimbus {} ({} build), process driver.\n\n",
        m.cpus,
        m.cpu_model,
        m.kernel,
        m.python.as_deref().unwrap_or("Python unknown"),
        m.nimbus_version,
        m.build
    ));
    let concurrency: Vec<String> = args.concurrency.iter().map(ToString::to_string).collect();
    out.push_str(&format!(
        "Command: `nimbus bench --requests {} --duration {} --concurrency {} --baseline-runs {}`\n\n",
        args.requests,
        args.duration,
        concurrency.join(","),
        args.baseline_runs
    ));
    out.push_str("| Measurement | Target | Result | Met |\n|---|---|---|---|\n");
    let w = &r.warm_latency.latency;
    let met = |name: &str| match r
        .targets
        .iter()
        .find(|t| t.name.starts_with(name))
        .and_then(|t| t.met)
    {
        Some(true) => "yes",
        Some(false) => "**no**",
        None => "–",
    };
    out.push_str(&format!(
        "| Warm latency, 1 client ({} requests) | p50 ≤ {} | p50 {}, p90 {}, p99 {} | {} |\n",
        w.samples,
        fmt_us(TARGET_P50_US),
        fmt_us(w.p50_us),
        fmt_us(w.p90_us),
        fmt_us(w.p99_us),
        met("warm p50")
    ));
    for t in &r.throughput {
        let (target, ok) = if t.clients == TARGET_RPS_CLIENTS {
            (
                format!("≥ {} inv/s", fmt_count(TARGET_RPS)),
                met("throughput"),
            )
        } else {
            ("–".to_owned(), "–")
        };
        out.push_str(&format!(
            "| Throughput, {} ({:.0} s) | {target} | {} inv/s (p50 {}, p99 {}, {} errors) | {ok} |\n",
            clients_text(t.clients),
            t.duration_s,
            fmt_count(t.invocations_per_sec),
            fmt_us(t.latency.p50_us),
            fmt_us(t.latency.p99_us),
            t.errors
        ));
    }
    if let Some(b) = &r.baseline {
        out.push_str(&format!(
            "| Fresh Python process per invocation ({} runs) | – | p50 {}, p99 {} | – |\n",
            b.runs,
            fmt_us(b.latency.p50_us),
            fmt_us(b.latency.p99_us)
        ));
        out.push_str(&format!(
            "| Warm vs process per invocation (p50) | ≥ {TARGET_RATIO:.0}× | {:.0}× | {} |\n",
            b.ratio_to_warm_p50,
            met("warm vs")
        ));
    }
    if let Some(i) = &r.idle_memory {
        out.push_str(&format!(
            "| Idle warm instance RSS (max of {}) | ≤ {TARGET_RSS_MIB} MiB | {:.1} MiB (avg {:.1}{}) | {} |\n",
            i.processes,
            i.max_rss_mib,
            i.avg_rss_mib,
            i.avg_pss_mib.map(|p| format!(", PSS {p:.1}")).unwrap_or_default(),
            met("idle")
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), 50);
        assert_eq!(percentile(&v, 90.0), 90);
        assert_eq!(percentile(&v, 99.0), 99);
        assert_eq!(percentile(&v, 100.0), 100);
        assert_eq!(percentile(&v, 0.0), 1);
        assert_eq!(percentile(&[7], 99.0), 7);
        assert_eq!(percentile(&[], 50.0), 0);
        assert_eq!(percentile(&[1, 2, 3, 4], 50.0), 2);
    }

    #[test]
    fn latency_summary_is_in_microseconds() {
        let mut ns = vec![3000, 1000, 2000, 4000];
        let l = Latency::from_ns(&mut ns);
        assert_eq!(l.samples, 4);
        assert_eq!(l.min_us, 1.0);
        assert_eq!(l.p50_us, 2.0);
        assert_eq!(l.max_us, 4.0);
        assert_eq!(l.mean_us, 2.5);
        assert_eq!(Latency::from_ns(&mut []).p50_us, 0.0);
    }

    #[test]
    fn only_loopback_servers_are_benchmarked() {
        let (addr, host) = loopback_addr("http://127.0.0.1:8080/").unwrap();
        assert_eq!(addr.to_string(), "127.0.0.1:8080");
        assert_eq!(host, "127.0.0.1:8080");
        assert_eq!(
            loopback_addr("localhost:9").unwrap().0.to_string(),
            "127.0.0.1:9"
        );
        assert_eq!(
            loopback_addr("http://[::1]:81").unwrap().0.to_string(),
            "[::1]:81"
        );
        assert!(loopback_addr("http://example.com:80").is_err());
        assert!(loopback_addr("http://10.0.0.1:8080").is_err());
    }

    #[test]
    fn numbers_are_formatted_for_people() {
        assert_eq!(fmt_us(212.4), "212 µs");
        assert_eq!(fmt_us(1250.0), "1.25 ms");
        assert_eq!(fmt_us(2_100_000.0), "2.10 s");
        assert_eq!(fmt_count(6412.3), "6,412");
        assert_eq!(fmt_count(999.0), "999");
        assert_eq!(fmt_count(1_234_567.0), "1,234,567");
    }

    #[test]
    fn descendants_follow_the_tree() {
        let table = [(1, 0), (10, 1), (11, 10), (12, 10), (13, 11), (20, 1)];
        assert_eq!(descendants(10, &table), [11, 12, 13]);
        assert!(descendants(13, &table).is_empty());
    }

    #[test]
    fn this_process_is_found_with_its_memory() {
        let table = process_table();
        let me = std::process::id();
        assert!(table.iter().any(|&(pid, _)| pid == me));
        assert!(proc_kib(&format!("/proc/{me}/status"), "VmRSS:").unwrap() > 0);
    }
}
