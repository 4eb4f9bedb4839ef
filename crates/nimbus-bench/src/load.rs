//! The load generator: bare hyper HTTP/1 virtual clients, one keep-alive connection each,
//! and the bounded warm-up and measuring phases they run.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;

use serde::Serialize;

use super::stats::Latency;
use super::MAX_PHASE;

/// Marker of a warm start in an invoke response.
const WARM_MARKER: &[u8] = br#""start_type":"warm""#;

/// Where and what the virtual clients send.
#[derive(Clone)]
pub(super) struct LoadTarget {
    pub(super) addr: SocketAddr,
    pub(super) authority: String,
    pub(super) path: String,
    pub(super) auth: Option<String>,
    pub(super) event: Bytes,
}

impl LoadTarget {
    /// The same request to another path (and query) of the same server.
    pub(super) fn with_path(&self, path: String) -> Self {
        LoadTarget {
            path,
            ..self.clone()
        }
    }
}

/// One keep-alive HTTP/1 connection.
pub(super) type Sender = SendRequest<Full<Bytes>>;

/// Opens a connection to `t`'s server.
pub(super) async fn connect(t: &LoadTarget) -> anyhow::Result<Sender> {
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
pub(super) async fn call(sender: &mut Sender, t: &LoadTarget) -> anyhow::Result<(u16, Bytes)> {
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
pub(super) struct ClientRun {
    /// Latency of each successful invocation, ns.
    pub(super) latencies_ns: Vec<u64>,
    pub(super) errors: u64,
    pub(super) non_warm: u64,
    pub(super) first_error: Option<String>,
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

/// One virtual client: sequential invocations on one connection until `count` or
/// `deadline`. A broken connection is replaced in `sender`.
async fn virtual_client(
    t: &LoadTarget,
    sender: &mut Sender,
    count: Option<u64>,
    deadline: Instant,
) -> ClientRun {
    let mut run = ClientRun::default();
    let mut done = 0u64;
    let limit = count.unwrap_or(u64::MAX);
    while done < limit && Instant::now() < deadline {
        done += 1;
        let start = Instant::now();
        match call(sender, t).await {
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
                match connect(t).await {
                    Ok(s) => *sender = s,
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

pub(super) fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The result of one phase and how long it took.
#[derive(Default)]
pub(super) struct PhaseRun {
    pub(super) run: ClientRun,
    pub(super) elapsed: Duration,
}

/// `clients` connections, each sending up to `count` requests until `duration` has passed.
pub(super) async fn run_phase(
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
        .map(|mut s| {
            let t = t.clone();
            tokio::spawn(async move { virtual_client(&t, &mut s, count, deadline).await })
        })
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

/// One client runs `rounds` rounds of `per_round` requests to each of `targets`, starting
/// each round one target later, so that drifting machine noise falls on all targets alike.
/// Targets on one server share one keep-alive connection; each server has its own. One
/// result per target, in the order given.
pub(super) async fn run_rounds<const N: usize>(
    targets: &[Arc<LoadTarget>; N],
    rounds: usize,
    per_round: u64,
    duration: Duration,
) -> anyhow::Result<[PhaseRun; N]> {
    if N == 0 {
        bail!("no targets to measure");
    }
    // `conn[k]`: index in `senders` of the connection target `k` uses.
    let mut senders: Vec<(SocketAddr, Sender)> = Vec::new();
    let mut conn = [0; N];
    for (k, target) in targets.iter().enumerate() {
        conn[k] = match senders.iter().position(|(addr, _)| *addr == target.addr) {
            Some(i) => i,
            None => {
                senders.push((target.addr, connect(target).await?));
                senders.len() - 1
            }
        };
    }
    let mut runs: [PhaseRun; N] = std::array::from_fn(|_| PhaseRun::default());
    let deadline = Instant::now() + duration.min(MAX_PHASE);
    for round in 0..rounds {
        for i in 0..N {
            let k = (round + i) % N;
            let start = Instant::now();
            let sender = &mut senders[conn[k]].1;
            let run = virtual_client(&targets[k], sender, Some(per_round), deadline).await;
            runs[k].run.merge(run);
            runs[k].elapsed += start.elapsed();
        }
    }
    Ok(runs)
}

/// Invokes with `clients` clients until a round is served entirely by warm instances (at most 5 rounds).
pub(super) async fn warm_up(t: &Arc<LoadTarget>, clients: usize, total: u64) -> anyhow::Result<()> {
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
    pub fn from_run(clients: usize, mut phase: PhaseRun) -> Self {
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
    pub fn from_run(clients: usize, mut phase: PhaseRun) -> Self {
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
