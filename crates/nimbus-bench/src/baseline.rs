//! The spawn-per-invocation baseline: a fresh Python process per invocation, the naive
//! design the warm path is compared with.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;
use serde_json::Value;
use tokio::io::AsyncWriteExt;

use super::stats::Latency;
use super::{CODE, EVENT};

/// The naive design's runner: import the handler, call it with the event from stdin, print JSON.
const BASELINE_RUNNER: &str =
    "import json, sys\nfrom handler import handle\njson.dump(handle(json.load(sys.stdin)), sys.stdout)\n";

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

/// The Python interpreter of the baseline: `--python`, `NIMBUS_PYTHON`, the executable of a
/// running worker (what the server resolved), else the runtime's own resolution (never a shim).
pub(super) fn baseline_python(
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
pub(super) fn python_version(python: &Path) -> Option<String> {
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
pub(super) async fn run_baseline(
    python: &Path,
    runs: u32,
    warm_p50_us: f64,
) -> anyhow::Result<Baseline> {
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
