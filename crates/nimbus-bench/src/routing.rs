//! The routing phase: what choosing a version through an alias adds to a warm invocation
//! (a version invoked directly, through `latest`, through a split alias; interleaved
//! rounds on one connection). How: docs/BENCHMARKS.md, "How the harness measures".

use std::sync::Arc;

use anyhow::{anyhow, Context};
use serde::Serialize;

use nimbus_client::{AliasPatch, Client, FunctionPatch, NewAlias, UpdatedFunction};
use nimbus_core::{RoutingConfig, WeightedVersion};

use super::load::{run_rounds, warm_up, LatencyPhase, LoadTarget};
use super::{created, FUNCTION_NAME, MAX_PHASE};

/// The split alias the phase routes through.
const CANARY_ALIAS: &str = "bench-canary";
/// Share of the split alias's traffic that goes to the canary, percent.
const CANARY_WEIGHT: u32 = 50;
/// Rounds the requests of each target are split into.
const ROUNDS: usize = 10;

/// The two versions of the phase.
#[derive(Debug, Clone, Copy)]
pub(super) struct Canary {
    stable: u32,
    canary: u32,
}

/// Warm latency with and without alias routing, from one client in the same run.
#[derive(Debug, Serialize)]
pub struct RoutingPhase {
    /// The split alias.
    pub alias: String,
    /// The version before the canary: invoked directly, and part of the alias's traffic.
    pub stable_version: u32,
    /// The canary (same code, other configuration): `latest`, and the rest of the traffic.
    pub canary_version: u32,
    /// Share of the split alias's traffic that goes to the canary, percent.
    pub canary_weight: u32,
    /// Rounds; each invoked every target in turn, starting one target later than the last.
    pub rounds: usize,
    /// `?version=<stable>`: no alias.
    pub pinned: LatencyPhase,
    /// No query: the `latest` alias, one version.
    pub latest: LatencyPhase,
    /// `?alias=<alias>`: a weighted draw between the two versions.
    pub weighted: LatencyPhase,
    /// p50 through `latest` − p50 pinned, µs.
    pub latest_overhead_us: f64,
    /// p50 through the split alias − p50 pinned, µs.
    pub weighted_overhead_us: f64,
}

/// Publishes a canary of the bench function and points the split alias at it and at the
/// version before (creating the alias, or updating it on a server benchmarked before).
pub(super) async fn prepare_canary(client: &Client) -> anyhow::Result<Canary> {
    let function = client
        .get_function(FUNCTION_NAME)
        .await
        .map_err(|e| anyhow!("reading {FUNCTION_NAME}: {e}"))?;
    let stable = function.latest_version;
    // A canary published here carries its own number, so `stable + 1` always differs from
    // the newest version's value: the configuration changes and a version is published.
    let env = env_patch("BENCH_VERSION", (stable + 1).to_string());
    let updated = client
        .update_function(FUNCTION_NAME, &env)
        .await
        .map_err(|e| anyhow!("publishing a canary of {FUNCTION_NAME}: {e}"))?;
    let canary = published_version(&updated)?;
    let routing = RoutingConfig {
        weights: vec![
            WeightedVersion {
                version: stable,
                weight: 100 - CANARY_WEIGHT,
            },
            WeightedVersion {
                version: canary,
                weight: CANARY_WEIGHT,
            },
        ],
    };
    let new = NewAlias {
        name: CANARY_ALIAS.to_owned(),
        description: None,
        routing_config: routing.clone(),
    };
    let pointed = async {
        if created(
            client.create_alias(FUNCTION_NAME, &new).await,
            "alias_exists",
        )?
        .is_none()
        {
            let patch = AliasPatch {
                routing_config: Some(routing),
                ..AliasPatch::default()
            };
            client
                .update_alias(FUNCTION_NAME, CANARY_ALIAS, &patch)
                .await
                .map_err(|e| anyhow!("updating alias {CANARY_ALIAS}: {e}"))?;
        }
        anyhow::Ok(())
    };
    pointed.await.with_context(|| {
        format!("pointing alias {CANARY_ALIAS} at versions {stable} and {canary}")
    })?;
    Ok(Canary { stable, canary })
}

/// A patch that sets the function's only environment variable: a new configuration, so
/// the update publishes a version.
pub(super) fn env_patch(name: &str, value: String) -> FunctionPatch {
    FunctionPatch {
        env_vars: Some([(name.to_owned(), value)].into()),
        ..FunctionPatch::default()
    }
}

/// The version an update published.
pub(super) fn published_version(updated: &UpdatedFunction) -> anyhow::Result<u32> {
    updated.published_version.ok_or_else(|| {
        anyhow!(
            "expected a version number in \"published_version\", the server sent {}",
            serde_json::to_string(updated).unwrap_or_default()
        )
    })
}

/// Warms up both versions, then measures the three targets of `base`'s server in
/// interleaved rounds: `requests` each, rounded up to a multiple of the rounds.
pub(super) async fn measure_routing(
    base: &LoadTarget,
    versions: Canary,
    requests: u64,
    warmup: u64,
) -> anyhow::Result<RoutingPhase> {
    let targets = [
        format!("{}?version={}", base.path, versions.stable),
        base.path.clone(),
        format!("{}?alias={CANARY_ALIAS}", base.path),
    ]
    .map(|path| Arc::new(base.with_path(path)));
    for target in &targets {
        warm_up(target, 1, warmup).await?;
    }
    let per_round = requests.div_ceil(ROUNDS as u64);
    let [pinned, latest, weighted] = run_rounds(&targets, ROUNDS, per_round, MAX_PHASE)
        .await?
        .map(|run| LatencyPhase::from_run(1, run));
    Ok(RoutingPhase {
        alias: CANARY_ALIAS.to_owned(),
        stable_version: versions.stable,
        canary_version: versions.canary,
        canary_weight: CANARY_WEIGHT,
        rounds: ROUNDS,
        latest_overhead_us: latest.latency.p50_us - pinned.latency.p50_us,
        weighted_overhead_us: weighted.latency.p50_us - pinned.latency.p50_us,
        pinned,
        latest,
        weighted,
    })
}
