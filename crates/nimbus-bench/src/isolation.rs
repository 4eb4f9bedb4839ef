//! The isolation phase: what running every instance in a sandbox costs (cold starts and
//! warm latency on two fresh servers that differ only in `--insecure-no-isolation`,
//! interleaved). How: docs/BENCHMARKS.md, "How the harness measures".

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::anyhow;
use serde::Serialize;

use nimbus_client::Client;

use super::load::LatencyPhase;
use super::load::{connect, run_rounds, warm_up, LoadTarget};
use super::routing::{env_patch, published_version};
use super::server::{loopback_addr, ServerProcess, Setup};
use super::starts::{StartSamples, Starts};
use super::targets::{TARGET_WARM_NOISE_FLOOR_US, TARGET_WARM_NOISE_SHARE};
use super::{deploy, progress, EVENT, MAX_PHASE};

/// The function both servers run.
pub const FUNCTION: &str = "bench-isolation";
/// Rounds the warm requests of each server are split into.
const WARM_ROUNDS: usize = 10;
/// Pause between publishing the versions of a round and starting them: the instance of the
/// version before (and the publish's throwaway worker) are gone by then, and each start
/// follows an idle moment, as most do.
const SETTLE: Duration = Duration::from_millis(100);

/// Cold starts and warm latency with and without isolation, in the same run.
#[derive(Debug, Serialize)]
pub struct IsolationPhase {
    /// The function measured on both servers.
    pub function: String,
    /// The server with isolation (the default).
    pub isolated_server: String,
    /// The server started with `--insecure-no-isolation`.
    pub unisolated_server: String,
    /// Rounds of cold starts; each started one instance on each server.
    pub cold_rounds: u32,
    /// Cold starts on the isolated server.
    pub cold_isolated: Starts,
    /// Cold starts on the unisolated server (plain processes).
    pub cold_unisolated: Starts,
    /// Server-reported p50 isolated − p50 unisolated, µs.
    pub cold_overhead_us: f64,
    /// Round-trip p50 isolated − p50 unisolated, µs.
    pub cold_round_trip_overhead_us: f64,
    /// Rounds of the warm comparison; each invoked both servers in turn.
    pub warm_rounds: usize,
    /// Warm latency on the isolated server.
    pub warm_isolated: LatencyPhase,
    /// Warm latency on the unisolated server (plain processes).
    pub warm_unisolated: LatencyPhase,
    /// Warm p50 isolated − p50 unisolated, µs.
    pub warm_difference_us: f64,
    /// What counts as noise: max(10 µs, 5% of the unisolated p50), µs. A warm difference
    /// within ± this is "unchanged".
    pub warm_noise_us: f64,
}

/// One server of the comparison.
struct Side {
    process: ServerProcess,
    url: String,
    client: Client,
    target: Arc<LoadTarget>,
    /// The newest version of [`FUNCTION`] there.
    version: u32,
}

impl Side {
    /// Starts a server without snapshots and deploys [`FUNCTION`] on it.
    async fn start(isolated: bool) -> anyhow::Result<Side> {
        let setup = Setup {
            isolated,
            flags: &["--no-snapshots"],
            config: None,
        };
        let (process, url, client) = ServerProcess::start_healthy(&setup).await?;
        let (addr, authority) = loopback_addr(&url)?;
        deploy(&client, FUNCTION).await?;
        let function = client
            .get_function(FUNCTION)
            .await
            .map_err(|e| anyhow!("reading {FUNCTION}: {e}"))?;
        Ok(Side {
            version: function.latest_version,
            target: Arc::new(LoadTarget {
                addr,
                authority,
                path: format!("/api/v1/functions/{FUNCTION}/invoke"),
                auth: None,
                event: bytes::Bytes::from_static(EVENT),
            }),
            process,
            url,
            client,
        })
    }

    /// Publishes a version no instance runs yet (its environment names the round) and
    /// deletes the one before, which stops that version's idle instance.
    async fn next_version(&mut self, round: u32) -> anyhow::Result<()> {
        let env = env_patch("BENCH_COLD", round.to_string());
        let updated = self
            .client
            .update_function(FUNCTION, &env)
            .await
            .map_err(|e| anyhow!("publishing a new version of {FUNCTION}: {e}"))?;
        let published = published_version(&updated)?;
        self.client
            .delete_version(FUNCTION, self.version)
            .await
            .map_err(|e| anyhow!("deleting version {} of {FUNCTION}: {e}", self.version))?;
        self.version = published;
        Ok(())
    }
}

/// `rounds` cold starts on each side, interleaved; stops early at [`MAX_PHASE`].
async fn cold_starts(sides: &mut [Side; 2], rounds: u32) -> anyhow::Result<[Starts; 2]> {
    let mut senders = [
        connect(&sides[0].target).await?,
        connect(&sides[1].target).await?,
    ];
    let mut samples = [StartSamples::new("cold"), StartSamples::new("cold")];
    let deadline = Instant::now() + MAX_PHASE;
    for round in 0..rounds {
        if Instant::now() > deadline {
            break;
        }
        for side in sides.iter_mut() {
            side.next_version(round).await?;
        }
        tokio::time::sleep(SETTLE).await;
        for i in 0..2 {
            let k = (round as usize + i) % 2;
            let side = &sides[k];
            samples[k]
                .invoke(&side.target, side.version, &mut senders[k])
                .await?;
        }
    }
    Ok(samples.map(StartSamples::summary))
}

/// Starts an isolated and an unisolated server with [`FUNCTION`] and measures:
/// `cold_rounds` cold starts on each, then `requests` warm invocations each (after
/// `warmup`). Both servers are stopped at the end (also on error).
pub(super) async fn measure_isolation(
    cold_rounds: u32,
    requests: u64,
    warmup: u64,
) -> anyhow::Result<IsolationPhase> {
    let mut sides = [Side::start(true).await?, Side::start(false).await?];

    progress(format!(
        "{cold_rounds} cold starts on each server, interleaved"
    ));
    let [cold_isolated, cold_unisolated] = cold_starts(&mut sides, cold_rounds).await?;

    progress(format!(
        "warming up both, then {requests} requests to each in {WARM_ROUNDS} interleaved rounds"
    ));
    for side in &sides {
        warm_up(&side.target, 1, warmup).await?;
    }
    let targets = [sides[0].target.clone(), sides[1].target.clone()];
    let per_round = requests.div_ceil(WARM_ROUNDS as u64);
    let [warm_isolated, warm_unisolated] = run_rounds(&targets, WARM_ROUNDS, per_round, MAX_PHASE)
        .await?
        .map(|run| LatencyPhase::from_run(1, run));
    let [isolated, unisolated] = sides.map(|mut side| {
        side.process.stop();
        side.url
    });

    let unisolated_p50 = warm_unisolated.latency.p50_us;
    Ok(IsolationPhase {
        function: FUNCTION.to_owned(),
        isolated_server: isolated,
        unisolated_server: unisolated,
        cold_rounds,
        cold_overhead_us: cold_isolated.server.p50_us - cold_unisolated.server.p50_us,
        cold_round_trip_overhead_us: cold_isolated.round_trip.p50_us
            - cold_unisolated.round_trip.p50_us,
        cold_isolated,
        cold_unisolated,
        warm_rounds: WARM_ROUNDS,
        warm_difference_us: warm_isolated.latency.p50_us - unisolated_p50,
        warm_noise_us: TARGET_WARM_NOISE_FLOOR_US.max(TARGET_WARM_NOISE_SHARE * unisolated_p50),
        warm_isolated,
        warm_unisolated,
    })
}
