//! The state phase: how long a State API call (SPEC §7) takes from Python on the embedded
//! store and on Redis, against the protocol round trip alone, on fresh servers of its own,
//! interleaved. How: docs/BENCHMARKS.md, "How the harness measures".

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use bytes::Bytes;
use serde::Serialize;
use serde_json::{json, Value};
use tokio::net::TcpStream;

use nimbus_client::{Client, NewFunction, StateSettings};

/// The `state_url` of a server's embedded state store.
const EMBEDDED_STATE: &str = "embedded";

use super::load::{call, connect, LoadTarget, Sender};
use super::phase::{self, Phase};
use super::server::{loopback_addr, ServerProcess, Setup};
use super::stats::Latency;
use super::{progress, MAX_PHASE};

/// The function the phase deploys on each server.
pub const FUNCTION: &str = "bench-state";
/// Its code: `event["n"]` calls of the kind `event["what"]` names, each timed in Python.
const CODE: &str = r#"import time

# The session key's value: a small dict, as a cart or a counter keeps.
VALUE = {"user": "bench", "items": ["book", "pen"], "total": 42}


def handle(event, state):
    what, n = event["what"], event["n"]
    scope = state.invocation() if what == "baseline" else state
    scope.set("k", VALUE)
    clock = time.perf_counter_ns
    samples = []
    if what == "set":
        for _ in range(n):
            start = clock()
            scope.set("k", VALUE)
            samples.append(clock() - start)
    else:
        if scope.get("k") != VALUE:
            raise RuntimeError("state.get did not return the value just set")
        for _ in range(n):
            start = clock()
            scope.get("k")
            samples.append(clock() - start)
    return {"samples_ns": samples}
"#;
/// The Redis server R keeps its state in.
const REDIS_URL: &str = "redis://127.0.0.1:6379";
/// Its address, tried before R is started.
const REDIS_ADDR: ([u8; 4], u16) = ([127, 0, 0, 1], 6379);
/// Longest wait for that TCP connection.
const REDIS_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Fewest rounds the samples are split into.
const MIN_ROUNDS: u64 = 4;
/// Most calls one invocation makes (keeps each answer small and far from the timeout).
const MAX_CALLS: u64 = 500;
/// Fewest sets measured.
const MIN_SETS: u64 = 50;

/// What one invocation of [`CODE`] measures.
#[derive(Debug, Clone, Copy)]
enum Kind {
    /// `state.get` on the session scope.
    Get,
    /// `state.invocation().get`: the protocol alone.
    Baseline,
    /// `state.set` on the session scope.
    Set,
}

impl Kind {
    const ALL: [Kind; 3] = [Kind::Get, Kind::Baseline, Kind::Set];

    /// `event["what"]`.
    fn what(self) -> &'static str {
        match self {
            Kind::Get => "get",
            Kind::Baseline => "baseline",
            Kind::Set => "set",
        }
    }
}

/// State API latency from Python on each backend, with the protocol-only baseline of the
/// same run.
#[derive(Debug, Serialize)]
pub struct StatePhase {
    /// The function measured on each server.
    pub function: String,
    /// Whether the servers isolated their functions (not with `--insecure-no-isolation`).
    pub isolated: bool,
    /// Rounds; each invoked every kind once on each server.
    pub rounds: u64,
    /// Calls per invocation of `get` and `baseline`.
    pub gets_per_invocation: u64,
    /// Calls per invocation of `set`.
    pub sets_per_invocation: u64,
    /// The embedded store (the default backend).
    pub embedded: StateBackendRun,
    /// Redis.
    #[serde(flatten, serialize_with = "phase::redis")]
    pub redis: Phase<StateBackendRun>,
}

/// The calls measured on one server, µs as Python timed them.
#[derive(Debug, Serialize)]
pub struct StateBackendRun {
    /// The server's `--state-url` (`embedded` for the default).
    pub state_url: String,
    /// The server.
    pub server: String,
    /// `state.get("k")`, session scope: the backend's round trip.
    pub get: Latency,
    /// `state.invocation().get("k")`: the protocol round trip alone (no backend).
    pub baseline_get: Latency,
    /// `state.set("k", value)`, session scope.
    pub set: Latency,
    /// Get p50 − baseline p50: what the backend adds, µs.
    pub backend_get_us: f64,
    /// Failed invocations (their calls are not counted).
    pub errors: u64,
    /// The first failure, if any.
    pub first_error: Option<String>,
}

/// A server of the phase with [`FUNCTION`] deployed.
struct Server {
    process: ServerProcess,
    url: String,
    client: Client,
    state_url: &'static str,
    /// One keep-alive connection for all its invocations.
    sender: Sender,
    /// The invocation of each kind, in [`Kind::ALL`]'s order.
    targets: [LoadTarget; 3],
    /// The samples of each kind, ns, in the same order.
    samples: [Vec<u64>; 3],
    errors: u64,
    first_error: Option<String>,
}

impl Server {
    /// Starts a server whose state lives in `state_url` and creates [`FUNCTION`] on it;
    /// each invocation of a kind makes `calls(kind)` calls.
    async fn start(
        isolated: bool,
        state_url: &'static str,
        calls: impl Fn(Kind) -> u64,
    ) -> anyhow::Result<Server> {
        // Named even when it is the default, so that NIMBUS_STATE_URL cannot pick another.
        let state_flag = format!("--state-url={state_url}");
        let setup = Setup {
            isolated,
            flags: &["--no-snapshots", &state_flag],
            config: None,
        };
        let (process, url, client) = ServerProcess::start_healthy(&setup).await?;
        let new = NewFunction {
            name: FUNCTION.to_owned(),
            code: Some(CODE.to_owned()),
            state_config: Some(StateSettings {
                enabled: Some(true),
                ..StateSettings::default()
            }),
            description: Some("nimbus bench: state phase".to_owned()),
            ..NewFunction::default()
        };
        client
            .create_function(&new)
            .await
            .map_err(|e| anyhow!("creating {FUNCTION} on {url}: {e}"))?;
        let (addr, authority) = loopback_addr(&url)?;
        let targets = Kind::ALL.map(|kind| LoadTarget {
            addr,
            authority: authority.clone(),
            path: format!("/api/v1/functions/{FUNCTION}/invoke"),
            auth: None,
            event: Bytes::from(json!({ "what": kind.what(), "n": calls(kind) }).to_string()),
        });
        Ok(Server {
            sender: connect(&targets[0]).await?,
            process,
            url,
            client,
            state_url,
            targets,
            samples: Default::default(),
            errors: 0,
            first_error: None,
        })
    }

    /// Invokes `kind` once; its samples, or why there are none. A broken connection is
    /// replaced.
    async fn invoke(&mut self, kind: Kind) -> anyhow::Result<Result<Vec<u64>, String>> {
        let target = &self.targets[kind as usize];
        let (status, body) = match call(&mut self.sender, target).await {
            Ok(reply) => reply,
            Err(e) => {
                self.sender = connect(target).await?;
                return Ok(Err(format!("{e:#}")));
            }
        };
        let reply: Value = serde_json::from_slice(&body).unwrap_or_default();
        let samples = reply["body"]["samples_ns"]
            .as_array()
            .and_then(|s| s.iter().map(Value::as_u64).collect::<Option<Vec<u64>>>());
        Ok(match samples {
            Some(samples) if status == 200 => Ok(samples),
            _ => Err(format!(
                "{} on {}: HTTP {status}: {}",
                kind.what(),
                self.url,
                String::from_utf8_lossy(&body[..body.len().min(300)])
            )),
        })
    }

    /// One uncounted invocation of each kind; the first failure is an error.
    async fn warm_up(&mut self) -> anyhow::Result<()> {
        for kind in Kind::ALL {
            if let Err(why) = self.invoke(kind).await? {
                bail!("the uncounted first invocation failed: {why}");
            }
        }
        Ok(())
    }

    /// Invokes `kind` once and keeps its samples, or counts the failure.
    async fn measure(&mut self, kind: Kind) -> anyhow::Result<()> {
        match self.invoke(kind).await? {
            Ok(samples) => self.samples[kind as usize].extend(samples),
            Err(why) => {
                self.errors += 1;
                self.first_error.get_or_insert(why);
            }
        }
        Ok(())
    }

    /// Deletes [`FUNCTION`], which drops its state (on Redis, that leaves the database as
    /// it was found), stops the server, and summarizes its samples.
    async fn finish(mut self) -> StateBackendRun {
        if let Err(e) = self.client.delete_function(FUNCTION).await {
            progress(format!("could not delete {FUNCTION} on {}: {e}", self.url));
        }
        self.process.stop();
        let [get, baseline_get, set] = self.samples.map(|mut ns| Latency::from_ns(&mut ns));
        StateBackendRun {
            state_url: self.state_url.to_owned(),
            server: self.url,
            backend_get_us: get.p50_us - baseline_get.p50_us,
            get,
            baseline_get,
            set,
            errors: self.errors,
            first_error: self.first_error,
        }
    }
}

/// Whether Redis takes a TCP connection; why not otherwise.
async fn redis_reachable() -> Result<(), String> {
    let addr = SocketAddr::from(REDIS_ADDR);
    match tokio::time::timeout(REDIS_CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!("Redis is not reachable at {addr} ({e})")),
        Err(_) => Err(format!(
            "Redis is not reachable at {addr} (no connection within {} s)",
            REDIS_CONNECT_TIMEOUT.as_secs()
        )),
    }
}

/// Starts R and warms it up; `Err(why)` when Redis cannot be measured. The server stops on
/// error.
async fn start_redis(
    isolated: bool,
    calls: impl Fn(Kind) -> u64,
) -> anyhow::Result<Result<Server, String>> {
    if let Err(why) = redis_reachable().await {
        return Ok(Err(why));
    }
    let mut server = Server::start(isolated, REDIS_URL, calls).await?;
    Ok(match server.warm_up().await {
        Ok(()) => Ok(server),
        Err(e) => Err(format!("a server with --state-url {REDIS_URL}: {e:#}")),
    })
}

/// Rounds, and calls per invocation of a get (or baseline get) and of a set, for `gets`
/// gets: at least [`MIN_ROUNDS`] rounds of at most [`MAX_CALLS`] calls, and a tenth as many
/// sets, at least [`MIN_SETS`] (rounded up to whole rounds).
fn split(gets: u64) -> (u64, u64, u64) {
    let rounds = gets.div_ceil(MAX_CALLS).max(MIN_ROUNDS);
    let sets = (gets / 10).max(MIN_SETS);
    (rounds, gets.div_ceil(rounds), sets.div_ceil(rounds))
}

/// Measures `gets` gets and as many invocation-scope gets from Python on a server with the
/// embedded store and on one with Redis (if reachable), interleaved, with a tenth as many
/// sets (at least [`MIN_SETS`]). Every server is stopped at the end (also on error).
pub(super) async fn measure_state(gets: u64, isolated: bool) -> anyhow::Result<StatePhase> {
    let (rounds, gets_per_invocation, sets_per_invocation) = split(gets);
    let calls = |kind| match kind {
        Kind::Get | Kind::Baseline => gets_per_invocation,
        Kind::Set => sets_per_invocation,
    };

    let mut embedded = Server::start(isolated, EMBEDDED_STATE, calls).await?;
    embedded.warm_up().await?;
    let mut redis = match start_redis(isolated, calls).await? {
        Ok(redis) => Phase::Measured(redis),
        Err(why) => {
            progress(format!("measuring the embedded store only: {why}"));
            Phase::Skipped(format!("skipped: {why}"))
        }
    };

    progress(format!(
        "{rounds} rounds of {gets_per_invocation} gets, {gets_per_invocation} \
         invocation-scope gets and {sets_per_invocation} sets from Python on each server, \
         interleaved"
    ));
    let deadline = Instant::now() + MAX_PHASE;
    for round in 0..rounds as usize {
        if Instant::now() > deadline {
            break;
        }
        let mut order: Vec<&mut Server> = std::iter::once(&mut embedded)
            .chain(redis.measured_mut())
            .collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for server in order {
            for j in 0..Kind::ALL.len() {
                server
                    .measure(Kind::ALL[(round + j) % Kind::ALL.len()])
                    .await?;
            }
        }
    }

    let embedded = embedded.finish().await;
    let redis = match redis {
        Phase::Measured(redis) => Phase::Measured(redis.finish().await),
        Phase::Skipped(why) => Phase::Skipped(why),
    };
    Ok(StatePhase {
        function: FUNCTION.to_owned(),
        isolated,
        rounds,
        gets_per_invocation,
        sets_per_invocation,
        embedded,
        redis,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_are_split_into_rounds() {
        assert_eq!(split(2000), (4, 500, 50));
        assert_eq!(split(40), (4, 10, 13));
        assert_eq!(split(1), (4, 1, 13));
        assert_eq!(split(2001), (5, 401, 40));
        assert_eq!(split(100_000), (200, 500, 50));
    }
}
