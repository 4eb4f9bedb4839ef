//! The snapshots phase: what starting new instances from a function's template, or from
//! its checkpoint on disk, saves in start time and memory against cold starts, on fresh
//! servers of its own, interleaved. How: docs/BENCHMARKS.md, "How the harness measures".

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use bytes::Bytes;
use serde::Serialize;
use serde_json::Value;

use nimbus_client::{Client, NewFunction, Snapshot};

use super::load::{call, connect, LoadTarget, Sender};
use super::memory::{descendants, function_processes, process_table, pss_kib, ProcessMemory};
use super::phase::{self, Phase};
use super::server::{loopback_addr, ServerProcess, Setup};
use super::starts::{StartSamples, Starts};
use super::{progress, MAX_PHASE};

/// A function the phase deploys.
pub(super) struct Function {
    pub(super) name: &'static str,
    /// Its runtime (`python3.11`, `nodejs20`).
    pub(super) runtime: &'static str,
    /// Its code (the default handler module's).
    pub(super) code: &'static str,
    pub(super) memory_mb: u32,
    pub(super) max_instances: u32,
    /// The event of every invocation.
    pub(super) event: &'static [u8],
}

/// The function of the start-type comparison: a heavy init, a small answer.
const HEAVY: Function = Function {
    name: "bench-snapshot-heavy",
    runtime: "python3.11",
    code: r#"import asyncio, decimal, email.mime.multipart, http.client, json, logging, sqlite3, ssl
import statistics, xml.etree.ElementTree, urllib.request, uuid, zipfile, csv, argparse
import difflib, fractions, datetime, hashlib


def _rss_kib():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])


_before = _rss_kib()
TABLE = {i: ("row-%07d" % i, i * 0.5) for i in range(230_000)}
BUILT_MIB = round((_rss_kib() - _before) / 1024, 1)


def handle(event):
    return {"rows": len(TABLE), "built_mib": BUILT_MIB}
"#,
    memory_mb: 512,
    max_instances: 10,
    event: b"{}",
};

/// The functions of the disk tier: [`HEAVY`]'s code under two names, so that each one's
/// template, restored, evicts the other's.
const DISK_A: Function = Function {
    name: "bench-snapshot-disk-a",
    ..HEAVY
};
const DISK_B: Function = Function {
    name: "bench-snapshot-disk-b",
    ..HEAVY
};

/// The function of the memory measurement: sleeps for `event["sleep"]` seconds.
const IDLE: Function = Function {
    name: "bench-snapshot-idle",
    runtime: "python3.11",
    code: "def handle(event):\n    import time\n    time.sleep(event.get(\"sleep\", 0))\n    return None\n",
    memory_mb: 128,
    max_instances: INSTANCES as u32,
    event: br#"{"sleep":1.0}"#,
};

/// `nimbus.toml` of the start-type comparison: every invocation starts a new instance.
pub(super) const ONE_INVOCATION: &str = "max_invocations = 1\n";
/// `nimbus.toml` of the disk tier: every invocation starts a new instance, and a template
/// that becomes resident evicts every other one (to its checkpoint).
const DISK_TIER: &str = "max_invocations = 1\n[snapshots]\nmemory_budget_mb = 1\n";
/// Instances the memory measurement starts from the template.
const INSTANCES: usize = 100;
/// Instances of the cold baseline of the memory measurement.
const COLD_INSTANCES: usize = 5;
/// Pause before each start: the instance of the start before (on either server) is retired
/// by then, and each start follows an idle moment, as most do.
const SETTLE: Duration = Duration::from_millis(100);
/// Pause between the last answer of a burst and measuring its instances, idle by then.
const IDLE_SETTLE: Duration = Duration::from_millis(500);
/// Longest wait for a template to be ready and resident, or checkpointed.
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a template must be seen resident, or expired, without a checkpoint before the
/// server is taken to have no disk tier (its checkpoint is taken before it is resident).
const NO_CHECKPOINT_GRACE: Duration = Duration::from_secs(1);

/// What starting from a template saves, in the same run.
#[derive(Debug, Serialize)]
pub struct SnapshotPhase {
    /// The function of the start-type comparison.
    pub function: String,
    /// Its memory limit, MiB.
    pub memory_mb: u32,
    /// The worker's RSS growth while the function's init built its data structure, MiB (as
    /// the handler reported it).
    pub structure_mib: Option<f64>,
    /// The server starting instances from templates (`max_invocations = 1`).
    pub template_server: String,
    /// The server started with `--no-snapshots` (`max_invocations = 1`).
    pub cold_server: String,
    /// Seconds from the function's creation to its template being ready and resident.
    pub template_ready_s: f64,
    /// Rounds; each started one instance on each server.
    pub rounds: u32,
    /// Starts from the template.
    pub template_starts: Starts,
    /// Cold starts.
    pub cold_starts: Starts,
    /// Server-reported p50 cold ÷ p50 template (0 when either has no samples).
    pub speedup: f64,
    /// Starts from checkpoints on disk.
    #[serde(flatten, serialize_with = "phase::disk")]
    pub disk: Phase<SnapshotDisk>,
    /// Memory of idle instances started from a template, and of cold-started ones.
    pub memory: SnapshotMemory,
}

/// Starts from checkpoints on disk: templates restored after they were evicted.
#[derive(Debug, Serialize)]
pub struct SnapshotDisk {
    /// The two functions, the same code as the start-type comparison's, invoked in turn.
    pub functions: Vec<String>,
    /// The server (`max_invocations = 1`, `[snapshots] memory_budget_mb = 1`).
    pub server: String,
    /// Seconds from the first function's creation to its snapshot row showing its
    /// checkpoint (built, then checkpointed).
    pub checkpoint_ready_s: f64,
    /// Bytes of the first function's checkpoint: the sum of its files' sizes.
    pub checkpoint_bytes: u64,
    /// Its files.
    pub checkpoint_files: usize,
    /// Rounds; each started each function once.
    pub rounds: u32,
    /// Starts from a checkpoint (`start_type` `snapshot`).
    pub starts: Starts,
}

/// Memory of idle instances, from a template and cold.
#[derive(Debug, Serialize)]
pub struct SnapshotMemory {
    /// The function measured.
    pub function: String,
    /// Its memory limit, MiB.
    pub memory_mb: u32,
    /// The server with snapshots (default configuration).
    pub server: String,
    /// The invocations that started the instances there.
    pub burst: Burst,
    /// The instances forked from the template, idle: one process each.
    pub instances: Option<ProcessMemory>,
    /// The template's worker.
    pub template: Option<ProcessMemory>,
    /// The server with `--no-snapshots`.
    pub cold_server: String,
    /// The invocations that started the cold instances there.
    pub cold_burst: Burst,
    /// The workers of the cold-started instances, idle.
    pub cold_workers: Option<ProcessMemory>,
    /// Mean PSS of a whole cold-started instance, MiB: its worker and the sandbox's init
    /// and PID 1 above it.
    pub cold_instance_pss_mib: Option<f64>,
}

/// Invocations sent at once, one connection each.
#[derive(Debug, Default, Serialize)]
pub struct Burst {
    /// Invocations sent.
    pub invocations: usize,
    /// Successful answers by `start_type`.
    pub start_types: BTreeMap<String, u64>,
    /// Failed invocations.
    pub errors: u64,
    /// The first failure, if any.
    pub first_error: Option<String>,
}

/// A function created on a server of the phase.
struct Deployed {
    /// The function's name.
    name: &'static str,
    target: Arc<LoadTarget>,
    /// The function's version.
    version: u32,
    /// When the function was created.
    created: Instant,
}

/// A server of the phase with its function deployed.
pub(super) struct Server {
    process: ServerProcess,
    url: String,
    client: Client,
    /// The function (the first one, on the disk tier's server).
    function: Deployed,
}

/// What the snapshot row of a function's version shows.
enum Row<'a> {
    /// Not there yet, or `building`.
    Pending,
    /// `ready`.
    Ready(&'a Snapshot),
    /// Any other status (the row).
    Other(&'a Snapshot),
}

impl Server {
    /// Starts a server set up as `setup` says and creates `function` on it.
    pub(super) async fn start(setup: &Setup<'_>, function: &Function) -> anyhow::Result<Server> {
        let (process, url, client) = ServerProcess::start_healthy(setup).await?;
        let function = deploy(&client, &url, function).await?;
        Ok(Server {
            process,
            url,
            client,
            function,
        })
    }

    /// Reads the snapshots of `function` and passes what its version's row shows to
    /// `judge`, which returns `Some` when the wait is over.
    async fn snapshot_row<T>(
        &self,
        function: &Deployed,
        judge: impl FnOnce(Row<'_>) -> anyhow::Result<Option<T>>,
    ) -> anyhow::Result<(Option<T>, String)> {
        let name = function.name;
        let list = self
            .client
            .list_snapshots(name)
            .await
            .map_err(|e| anyhow!("reading the snapshots of {name}: {e}"))?;
        let snapshot = list
            .snapshots
            .iter()
            .find(|s| s.version == function.version);
        let row = match snapshot {
            None => Row::Pending,
            Some(s) => match s.status.as_str() {
                "building" => Row::Pending,
                "ready" => Row::Ready(s),
                _ => Row::Other(s),
            },
        };
        let verdict = judge(row)?;
        Ok((verdict, serde_json::to_string(&list).unwrap_or_default()))
    }

    /// Waits (at most [`READY_TIMEOUT`]) until the template of the function's version is
    /// ready and resident; returns how long after the function's creation it was.
    pub(super) async fn wait_resident(&self) -> anyhow::Result<Duration> {
        let function = &self.function;
        loop {
            let (done, list) = self
                .snapshot_row(function, |row| match row {
                    Row::Ready(s) if s.resident => Ok(Some(())),
                    Row::Ready(_) | Row::Pending => Ok(None),
                    Row::Other(s) => Err(unusable(function, s)),
                })
                .await?;
            if done.is_some() {
                return Ok(function.created.elapsed());
            }
            if function.created.elapsed() > READY_TIMEOUT {
                bail!(
                    "the template of {} version {} was not ready and resident within {} s: {list}",
                    function.name,
                    function.version,
                    READY_TIMEOUT.as_secs()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits (at most [`READY_TIMEOUT`]) until the snapshot of `function`'s version is
    /// ready with a checkpoint on disk (a `path` and its `files`), resident or not; returns
    /// how long after the function's creation it was, and the row. `Ok(Err(why))` when
    /// the server has no disk tier: the template was resident, or expired, without a
    /// checkpoint for [`NO_CHECKPOINT_GRACE`], or none came within the timeout.
    async fn wait_checkpoint(
        &self,
        function: &Deployed,
    ) -> anyhow::Result<Result<(Duration, Snapshot), String>> {
        let no_disk_tier = "the server has no disk tier (CRIU 4 missing or not usable here; \
                            `nimbus server` logs why at start)";
        let mut without_checkpoint: Option<Instant> = None;
        loop {
            let (row, list) = self
                .snapshot_row(function, |row| match row {
                    Row::Ready(s) if s.path.is_some() && !s.files.is_empty() => {
                        Ok(Some(Some(s.clone())))
                    }
                    Row::Ready(s) if s.resident => Ok(Some(None)),
                    Row::Ready(_) | Row::Pending => Ok(None),
                    Row::Other(s) if s.status == "expired" => Ok(Some(None)),
                    Row::Other(s) => Err(unusable(function, s)),
                })
                .await?;
            match row {
                Some(Some(row)) => return Ok(Ok((function.created.elapsed(), row))),
                Some(None) => {
                    let since = *without_checkpoint.get_or_insert_with(Instant::now);
                    if since.elapsed() >= NO_CHECKPOINT_GRACE {
                        return Ok(Err(format!(
                            "the template of {} version {} was resident, or evicted for good, \
                             without a checkpoint on disk: {no_disk_tier}{}",
                            function.name,
                            function.version,
                            self.checkpoint_log()
                        )));
                    }
                }
                None => without_checkpoint = None,
            }
            if function.created.elapsed() > READY_TIMEOUT {
                return Ok(Err(format!(
                    "the snapshot of {} version {} had no checkpoint on disk within {} s \
                     ({list}): {no_disk_tier}{}",
                    function.name,
                    function.version,
                    READY_TIMEOUT.as_secs(),
                    self.checkpoint_log()
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `; server log: …`: the last line of the server's log about checkpoints, if any.
    fn checkpoint_log(&self) -> String {
        self.process
            .log_tail()
            .lines()
            .rev()
            .find(|l| l.contains("checkpoint"))
            .map(|l| format!("; server log: {}", l.trim()))
            .unwrap_or_default()
    }

    /// Stops the server; returns its URL.
    pub(super) fn stop(mut self) -> String {
        self.process.stop();
        self.url
    }
}

/// Creates `function` on the server at `url`.
async fn deploy(client: &Client, url: &str, function: &Function) -> anyhow::Result<Deployed> {
    let (addr, authority) = loopback_addr(url)?;
    let new = NewFunction {
        name: function.name.to_owned(),
        runtime: Some(function.runtime.to_owned()),
        code: Some(function.code.to_owned()),
        memory_mb: Some(function.memory_mb),
        max_instances: Some(function.max_instances),
        description: Some("nimbus bench: new-instance starts".to_owned()),
        ..NewFunction::default()
    };
    let created = client
        .create_function(&new)
        .await
        .map_err(|e| anyhow!("creating {}: {e}", function.name))?;
    Ok(Deployed {
        name: function.name,
        version: created.function.latest_version,
        created: Instant::now(),
        target: Arc::new(LoadTarget {
            addr,
            authority,
            path: format!("/api/v1/functions/{}/invoke", function.name),
            auth: None,
            event: Bytes::from_static(function.event),
        }),
    })
}

/// The error of a snapshot row that can no longer become usable.
fn unusable(function: &Deployed, row: &Snapshot) -> anyhow::Error {
    anyhow!(
        "the snapshot of {} version {} is {}: {}",
        function.name,
        function.version,
        row.status,
        serde_json::to_string(&row.error_message).unwrap_or_default()
    )
}

/// `rounds` starts on each of `servers` (template, cold), interleaved, after one uncounted
/// invocation each; stops early at [`MAX_PHASE`]. Returns the starts and what the first
/// answer said about the data structure.
pub(super) async fn compare_starts(
    servers: &[Server; 2],
    rounds: u32,
) -> anyhow::Result<([Starts; 2], Option<f64>)> {
    let mut senders = [
        connect(&servers[0].function.target).await?,
        connect(&servers[1].function.target).await?,
    ];
    let mut structure_mib = None;
    for (server, sender) in servers.iter().zip(&mut senders) {
        let reply = invoke_once(&server.function, &server.url, sender).await?;
        structure_mib = structure_mib.or(reply["body"]["built_mib"].as_f64());
    }
    let mut samples = [StartSamples::new("template"), StartSamples::new("cold")];
    let deadline = Instant::now() + MAX_PHASE;
    for round in 0..rounds {
        if Instant::now() > deadline {
            break;
        }
        for i in 0..2 {
            tokio::time::sleep(SETTLE).await;
            let k = (round as usize + i) % 2;
            let function = &servers[k].function;
            samples[k]
                .invoke(&function.target, function.version, &mut senders[k])
                .await?;
        }
    }
    Ok((samples.map(StartSamples::summary), structure_mib))
}

/// One uncounted invocation of `function` on the server at `url`; its answer.
async fn invoke_once(function: &Deployed, url: &str, sender: &mut Sender) -> anyhow::Result<Value> {
    let (status, body) = call(sender, &function.target).await?;
    if status != 200 {
        bail!(
            "invoking {} on {url}: HTTP {status}: {}",
            function.name,
            String::from_utf8_lossy(&body[..body.len().min(300)])
        );
    }
    Ok(serde_json::from_slice(&body)?)
}

/// The disk tier: a server with a 1 MB memory budget for templates and [`DISK_A`] and
/// [`DISK_B`]; once both are checkpointed, one uncounted round, then `rounds` rounds of A
/// then B, each start restoring its template from disk; stops early at [`MAX_PHASE`]. The
/// server is stopped at the end (also on error). `Err(why)` when it has no disk tier.
async fn measure_disk_tier(rounds: u32) -> anyhow::Result<Result<SnapshotDisk, String>> {
    let setup = Setup {
        isolated: true,
        flags: &[],
        config: Some(DISK_TIER),
    };
    let server = Server::start(&setup, &DISK_A).await?;
    let second = deploy(&server.client, &server.url, &DISK_B).await?;
    let functions = [&server.function, &second];
    progress(format!(
        "waiting for the checkpoints on disk of {} and {}",
        DISK_A.name, DISK_B.name
    ));
    let mut waited = Vec::new();
    for function in functions {
        match server.wait_checkpoint(function).await? {
            Ok(ready) => waited.push(ready),
            Err(why) => {
                // The server stops as it drops.
                progress(format!("skipping the disk tier: {why}"));
                return Ok(Err(format!("skipped: {why}")));
            }
        }
    }
    let (ready, row) = waited.swap_remove(0);
    let files = &row.files;

    progress(format!(
        "{rounds} rounds of {} then {}, each start restoring its template from disk",
        DISK_A.name, DISK_B.name
    ));
    let mut senders = [
        connect(&functions[0].target).await?,
        connect(&functions[1].target).await?,
    ];
    for (function, sender) in functions.into_iter().zip(&mut senders) {
        tokio::time::sleep(SETTLE).await;
        invoke_once(function, &server.url, sender).await?;
    }
    let mut samples = StartSamples::new("snapshot");
    let deadline = Instant::now() + MAX_PHASE;
    for _ in 0..rounds {
        if Instant::now() > deadline {
            break;
        }
        for (function, sender) in functions.into_iter().zip(&mut senders) {
            tokio::time::sleep(SETTLE).await;
            samples
                .invoke(&function.target, function.version, sender)
                .await?;
        }
    }
    let names = functions.map(|f| f.name.to_owned()).to_vec();
    Ok(Ok(SnapshotDisk {
        functions: names,
        server: server.stop(),
        checkpoint_ready_s: ready.as_secs_f64(),
        checkpoint_bytes: files.iter().map(|f| f.size).sum(),
        checkpoint_files: files.len(),
        rounds,
        starts: samples.summary(),
    }))
}

/// Sends `n` invocations to `target` at once, one connection each, and counts their start
/// types.
async fn burst(target: &Arc<LoadTarget>, n: usize) -> anyhow::Result<Burst> {
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let target = target.clone();
            tokio::spawn(async move {
                let mut sender = connect(&target).await?;
                call(&mut sender, &target).await
            })
        })
        .collect();
    let mut burst = Burst {
        invocations: n,
        ..Burst::default()
    };
    for task in tasks {
        let failure = match task.await? {
            Ok((200, body)) => {
                let reply: Value = serde_json::from_slice(&body)?;
                let start_type = reply["start_type"].as_str().unwrap_or("unknown");
                *burst.start_types.entry(start_type.to_owned()).or_default() += 1;
                continue;
            }
            Ok((status, body)) => format!(
                "HTTP {status}: {}",
                String::from_utf8_lossy(&body[..body.len().min(300)])
            ),
            Err(e) => format!("{e:#}"),
        };
        burst.errors += 1;
        burst.first_error.get_or_insert(failure);
    }
    Ok(burst)
}

/// Idle instances of [`IDLE`] forked from its template on a server with the default
/// configuration, then cold-started ones on a `--no-snapshots` server.
async fn measure_memory() -> anyhow::Result<SnapshotMemory> {
    let server = Server::start(&Setup::plain(true), &IDLE).await?;
    server.wait_resident().await?;
    progress(format!(
        "{INSTANCES} invocations of {} at once, then measuring its idle instances",
        IDLE.name
    ));
    let template_burst = burst(&server.function.target, INSTANCES).await?;
    tokio::time::sleep(IDLE_SETTLE).await;
    let table = process_table();
    let processes = function_processes(&descendants(server.process.pid(), &table), IDLE.name);
    let forked: Vec<u32> = processes
        .iter()
        .filter(|p| p.is_forked_instance())
        .map(|p| p.pid)
        .collect();
    let instances = ProcessMemory::of(&forked);
    let template = processes
        .iter()
        .filter(|p| p.is_template())
        .min_by_key(|p| p.start_ticks)
        .and_then(|p| ProcessMemory::of(&[p.pid]));
    let template_url = server.stop();

    let cold_setup = Setup {
        isolated: true,
        flags: &["--no-snapshots"],
        config: None,
    };
    let server = Server::start(&cold_setup, &IDLE).await?;
    progress(format!(
        "{COLD_INSTANCES} invocations of {} at once, then measuring its idle cold instances",
        IDLE.name
    ));
    let cold_burst = burst(&server.function.target, COLD_INSTANCES).await?;
    tokio::time::sleep(IDLE_SETTLE).await;
    let server_pid = server.process.pid();
    let table = process_table();
    let workers: Vec<u32> = function_processes(&descendants(server_pid, &table), IDLE.name)
        .iter()
        .map(|p| p.pid)
        .collect();
    // Each worker with the processes of its sandbox above it, up to the server.
    let instance_pss: Vec<u64> = workers
        .iter()
        .filter_map(|&worker| {
            let mut total = 0;
            let mut pid = worker;
            while pid != server_pid {
                total += pss_kib(pid)?;
                pid = table.iter().find(|&&(p, _)| p == pid)?.1;
            }
            Some(total)
        })
        .collect();
    let cold_workers = ProcessMemory::of(&workers);
    let cold_url = server.stop();

    Ok(SnapshotMemory {
        function: IDLE.name.to_owned(),
        memory_mb: IDLE.memory_mb,
        server: template_url,
        burst: template_burst,
        instances,
        template,
        cold_server: cold_url,
        cold_burst,
        cold_workers,
        cold_instance_pss_mib: (!instance_pss.is_empty() && instance_pss.len() == workers.len())
            .then(|| instance_pss.iter().sum::<u64>() as f64 / instance_pss.len() as f64 / 1024.0),
    })
}

/// Starts a server with snapshots and one without (both retiring instances after one
/// invocation) with [`HEAVY`] and measures `rounds` starts on each, then `rounds` rounds of
/// starts from disk on a third server, then the memory of idle instances. Every server is
/// stopped at the end (also on error).
pub(super) async fn measure_snapshots(rounds: u32) -> anyhow::Result<SnapshotPhase> {
    let with = Setup {
        isolated: true,
        flags: &[],
        config: Some(ONE_INVOCATION),
    };
    let template_server = Server::start(&with, &HEAVY).await?;
    progress(format!(
        "waiting for the template of {} version {}",
        HEAVY.name, template_server.function.version
    ));
    let ready = template_server.wait_resident().await?;
    let without = Setup {
        flags: &["--no-snapshots"],
        ..with
    };
    let servers = [template_server, Server::start(&without, &HEAVY).await?];

    progress(format!(
        "{rounds} new instances on each server, from the template and cold, interleaved"
    ));
    let ([template_starts, cold_starts], structure_mib) = compare_starts(&servers, rounds).await?;
    let [template_url, cold_url] = servers.map(Server::stop);

    let disk = match measure_disk_tier(rounds).await? {
        Ok(disk) => Phase::Measured(disk),
        Err(why) => Phase::Skipped(why),
    };
    let memory = measure_memory().await?;
    let (template_p50, cold_p50) = (template_starts.server.p50_us, cold_starts.server.p50_us);
    Ok(SnapshotPhase {
        function: HEAVY.name.to_owned(),
        memory_mb: HEAVY.memory_mb,
        structure_mib,
        template_server: template_url,
        cold_server: cold_url,
        template_ready_s: ready.as_secs_f64(),
        rounds,
        speedup: if template_p50 > 0.0 && cold_p50 > 0.0 {
            cold_p50 / template_p50
        } else {
            0.0
        },
        template_starts,
        cold_starts,
        disk,
        memory,
    })
}
