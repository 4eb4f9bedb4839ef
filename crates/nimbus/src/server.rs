//! `nimbus server`: wires the store, runtimes, sandbox driver, engine and HTTP API together,
//! and serves until SIGINT/SIGTERM. Then it drains: `/ready` answers 503 `shutting_down`
//! and new invocations are refused while running ones finish (up to `shutdown_grace_sec`;
//! `/health` and everything else keep answering), then it stops accepting connections,
//! stops the instances and writes pending records. A second signal cuts the wait short.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use metrics_util::MetricKindMask;
use nimbus_api::{ApiKeys, AppState};
use nimbus_engine::metrics as engine_metrics;
use nimbus_engine::{Engine, NewFunction};
use nimbus_runtime::{RuntimeSettings, Runtimes};
use nimbus_sandbox::checkpoint::Criu;
use nimbus_sandbox::isolation::{Isolation, IsolationSettings};
use nimbus_sandbox::ProcessDriver;
use nimbus_state::embedded::EmbeddedStore;
use nimbus_state::redis::RedisStore;
use nimbus_state::{State, StateStore};

use tokio::signal::unix::{signal, Signal, SignalKind};

use crate::config::{ServerArgs, ServerConfig, EMBEDDED_STATE};
use crate::serve;

/// First argument that makes this binary the sandbox init (see `nimbus_sandbox::init`).
pub const SANDBOX_INIT: &str = "__sandbox-init";

const EXAMPLE_NAME: &str = "hello";
const EXAMPLE_CODE: &str = include_str!("../../../examples/hello/handler.py");

/// Runs the server until a shutdown signal.
pub async fn run(args: ServerArgs) -> anyhow::Result<()> {
    let config = ServerConfig::load(&args)?;
    // From here on a stop signal waits until serving has begun, then drains.
    let mut signals = StopSignals::install()?;
    let open_files = serve::raise_open_files_limit();
    let http = config.http.settings(open_files);
    let http_fds = http.max_connections + serve::lingering_refusals(http.max_connections);
    if http_fds as u64 > open_files * 3 / 4 {
        tracing::warn!(
            "max_connections = {} leaves few of the {open_files} open files this process may \
             have to instances, sandboxes and the stores",
            http.max_connections
        );
    }
    let keys = ApiKeys::new(&config.api_keys);
    if keys.is_empty() && !config.listen.ip().is_loopback() {
        bail!(
            "refusing to listen on {} without an API key: pass --api-key or set NIMBUS_API_KEYS \
             (authentication may be off only on a loopback address)",
            config.listen
        );
    }
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating data directory {}", config.data_dir.display()))?;
    let _lock = lock_data_dir(&config.data_dir)?;
    tracing::info!("configuration:\n{}", config.redacted());

    let metrics = install_metrics()?;
    let store = nimbus_store::open_with(&config.database_url, &config.store())
        .await
        .with_context(|| "opening the metadata store")?;
    let runtimes = Runtimes::discover(
        &RuntimeSettings {
            python: config.python.clone(),
            node: config.node.clone(),
        },
        &config.data_dir,
    );
    for line in runtimes.describe() {
        tracing::info!("runtime {line}");
    }
    let state = open_state(&config).await?;
    let isolation = open_isolation(&args, &config)?;
    let driver = match &isolation {
        Some(isolation) => with_disk_tier(ProcessDriver::isolated(isolation.clone()), &config),
        None => ProcessDriver::new(),
    };
    let engine = Engine::start(config.engine(), store, state, Arc::new(driver), runtimes)?;
    engine.recover_snapshots().await;
    tracing::info!(store = %config.database_url.split(':').next().unwrap_or(""), driver = engine.driver_name(), "engine started");

    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("listening on {}", config.listen))?;
    let addr = listener.local_addr()?;
    // On stdout, so a supervisor or test that listens on port 0 learns the real address.
    println!("Nimbus is listening on http://{addr}");
    if args.example {
        deploy_example(&engine).await?;
        println!("Try the example function:");
        println!("  curl -s -X POST http://{addr}/api/v1/functions/{EXAMPLE_NAME}/invoke -d '{{\"name\":\"Nimbus\"}}'");
    }
    tracing::info!(
        %addr,
        max_connections = http.max_connections,
        open_files,
        "listening"
    );

    let app = nimbus_api::router(
        AppState {
            engine: engine.clone(),
            metrics,
        },
        keys,
    );
    let serving = serve::start(listener, app, &http);

    signals.next().await;
    let grace = Duration::from_secs(config.shutdown_grace_sec);
    let deadline = tokio::time::Instant::now() + grace;
    tracing::info!("draining: /ready answers 503, running invocations may finish within {grace:?}");
    engine.begin_drain();
    tokio::select! {
        _ = engine.drain(grace) => {}
        () = signals.next() => tracing::warn!("second stop signal: not waiting any longer"),
    }
    // Responses of the invocations that just finished are still being written.
    let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
    serving.stop(remaining.max(Duration::from_secs(1))).await;
    tracing::info!("stopping instances and writing pending records");
    engine.shutdown(Duration::ZERO).await;
    if let Some(isolation) = &isolation {
        isolation.shutdown();
    }
    tracing::info!("stopped");
    Ok(())
}

/// The state backend `state_url` names.
async fn open_state(config: &ServerConfig) -> anyhow::Result<State> {
    let store: Arc<dyn StateStore> = if config.state_url == EMBEDDED_STATE {
        let path = config.data_dir.join("state.redb");
        let store = EmbeddedStore::open(&path)
            .with_context(|| format!("opening the state store {}", path.display()))?;
        Arc::new(store)
    } else if config.state_url.starts_with("redis") {
        let store = RedisStore::connect(&config.state_url, "nimbus")
            .await
            .context("connecting to the Redis state store")?;
        Arc::new(store)
    } else {
        bail!(
            "unknown state_url {:?}: use \"embedded\" or a redis://, rediss://, \
             redis+sentinel:// or redis+cluster:// URL",
            config.state_url
        );
    };
    tracing::info!(backend = store.backend(), "state store opened");
    Ok(State::new(store))
}

async fn deploy_example(engine: &Engine) -> anyhow::Result<()> {
    match engine.get_function(EXAMPLE_NAME).await {
        Ok(_) => return Ok(()),
        Err(nimbus_engine::EngineError::NotFound { .. }) => {}
        Err(e) => return Err(e.into()),
    }
    let example = NewFunction {
        name: EXAMPLE_NAME.into(),
        description: "The bundled example function".into(),
        runtime: Some("python3.11".into()),
        handler: None,
        code: Some(EXAMPLE_CODE.into()),
        code_archive: None,
        memory_mb: None,
        timeout_sec: None,
        env_vars: Default::default(),
        max_instances: None,
        network: None,
        state_config: Default::default(),
    };
    engine
        .create_function(example, "nimbus")
        .await
        .context("deploying the example function")?;
    Ok(())
}

/// The driver, checkpointing templates to disk when snapshots and their disk tier are on
/// and CRIU 4 works here; otherwise templates stay in memory, and the log says why.
fn with_disk_tier(driver: ProcessDriver, config: &ServerConfig) -> ProcessDriver {
    if !config.snapshots.enabled || !config.snapshots.disk {
        return driver;
    }
    match Criu::detect() {
        Ok(criu) => {
            tracing::info!("snapshots: in memory, and on disk with {}", criu.describe());
            driver.with_checkpoints(criu)
        }
        Err(why) => {
            tracing::info!("snapshots: in memory only (no disk tier: {why})");
            driver
        }
    }
}

/// The sandboxes' isolation, or none when `--insecure-no-isolation` says so. A host that
/// cannot isolate is refused with what is missing.
fn open_isolation(
    args: &ServerArgs,
    config: &ServerConfig,
) -> anyhow::Result<Option<Arc<Isolation>>> {
    if args.insecure_no_isolation {
        tracing::warn!(
            "isolation is OFF (--insecure-no-isolation): functions run as plain processes \
             of the server's user and can read what it reads"
        );
        return Ok(None);
    }
    // This very binary, even if an upgrade replaced the file since the server started.
    let init = (
        PathBuf::from("/proc/self/exe"),
        vec![SANDBOX_INIT.to_owned()],
    );
    let mut settings = IsolationSettings::new(init);
    // One cgroup per data directory: servers on one host stay apart, and a restart on the
    // same data cleans up exactly what its predecessor left.
    let data_dir = std::fs::canonicalize(&config.data_dir)
        .with_context(|| format!("resolving {}", config.data_dir.display()))?;
    settings.cgroup_name = format!(
        "nimbus-{:016x}",
        fnv1a(data_dir.as_os_str().as_encoded_bytes())
    );
    let isolation = Isolation::open(settings).map_err(|e| {
        anyhow::anyhow!(
            "cannot isolate functions on this host: {e}\n(see docs/SECURITY.md; to run \
             trusted code without isolation, pass --insecure-no-isolation)"
        )
    })?;
    tracing::info!("isolation: {}", isolation.describe());
    Ok(Some(Arc::new(isolation)))
}

/// Takes the data directory for this server alone (held until the server exits): a second
/// server on the same directory would remove the first one's sandboxes as leftovers.
fn lock_data_dir(dir: &std::path::Path) -> anyhow::Result<nix::fcntl::Flock<std::fs::File>> {
    use std::io::{Read, Seek, Write};
    let path = dir.join("server.lock");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    let mut lock = match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
    {
        Ok(lock) => lock,
        Err((mut file, _)) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            bail!(
                "another Nimbus server (pid {}) is using the data directory {}",
                holder.trim(),
                dir.display()
            );
        }
    };
    lock.set_len(0)?;
    lock.rewind()?;
    write!(lock, "{}", std::process::id())?;
    Ok(lock)
}

/// FNV-1a, for a short stable name derived from a path.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Installs the Prometheus recorder with the duration buckets the product documents, behind
/// the engine's layer that lets series of deleted functions, aliases and versions go (see
/// `nimbus_engine::metrics`).
fn install_metrics() -> anyhow::Result<PrometheusHandle> {
    let buckets = [
        0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0,
        5000.0, 10000.0, 30000.0,
    ];
    let recorder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_ms".into()), &buckets)?
        .idle_timeout(
            MetricKindMask::COUNTER,
            Some(engine_metrics::COUNTER_IDLE_TIMEOUT),
        )
        .build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(engine_metrics::Retiring::new(recorder))
        .map_err(|e| anyhow::anyhow!("installing the metrics recorder: {e}"))?;
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(engine_metrics::TOUCH_EVERY);
        loop {
            tick.tick().await;
            engine_metrics::touch_counters();
            upkeep.run_upkeep();
        }
    });
    Ok(handle)
}

/// SIGTERM and SIGINT, as one stream of stop requests.
struct StopSignals {
    term: Signal,
    interrupt: Signal,
}

impl StopSignals {
    fn install() -> anyhow::Result<Self> {
        Ok(StopSignals {
            term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            interrupt: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
        })
    }

    async fn next(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.interrupt.recv() => {}
        }
        tracing::info!("stop signal received");
    }
}
