//! A short run of the benchmark harness against servers of the `nimbus` binary built in the
//! same target directory: every phase runs, and the report's numbers are sane.

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use serde_json::Value;

/// The `nimbus` binary next to `nimbus-bench` (built by `cargo test --workspace`, or
/// `cargo build -p nimbus`).
fn nimbus_binary() -> PathBuf {
    let path = PathBuf::from(env!("CARGO_BIN_EXE_nimbus-bench")).with_file_name("nimbus");
    assert!(
        path.is_file(),
        "{} is missing: build it first (`cargo build -p nimbus`)",
        path.display()
    );
    path
}

fn describe(out: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}):\n{text}"))
}

#[test]
fn bench_smoke_run_reports_sane_numbers() {
    let nimbus = nimbus_binary();
    let out = Command::new(env!("CARGO_BIN_EXE_nimbus-bench"))
        .args([
            "--nimbus-bin",
            nimbus.to_str().unwrap(),
            "--requests",
            "200",
            "--duration",
            "1",
            "--baseline-runs",
            "3",
            "--cold-starts",
            "3",
            "--snapshot-starts",
            "3",
            "--state-gets",
            "40",
            "--output",
            "json",
        ])
        .env_remove("NIMBUS_API_KEY")
        .env_remove("NIMBUS_LOG")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    let report = json(&String::from_utf8_lossy(&out.stdout));
    let latency = &report["warm_latency"];
    assert_eq!(latency["samples"], 200, "{report}");
    assert!(latency["p50_us"].as_f64().unwrap() > 0.0, "{report}");
    let routing = &report["routing"];
    assert_eq!(routing["alias"], "bench-canary", "{report}");
    assert_eq!(routing["stable_version"], 1, "{report}");
    assert_eq!(routing["canary_version"], 2, "{report}");
    assert_eq!(routing["rounds"], 10, "{report}");
    let p50 = |phase: &str| routing[phase]["p50_us"].as_f64().unwrap();
    for phase in ["pinned", "latest", "weighted"] {
        assert_eq!(routing[phase]["samples"], 200, "{phase}: {report}");
        assert_eq!(routing[phase]["errors"], 0, "{phase}: {report}");
        assert!(p50(phase) > 0.0, "{phase}: {report}");
    }
    // The overheads are p50 differences (compared with a tolerance: JSON rounds floats).
    let overhead = |key: &str| routing[key].as_f64().unwrap();
    for (key, phase) in [
        ("latest_overhead_us", "latest"),
        ("weighted_overhead_us", "weighted"),
    ] {
        let expected = p50(phase) - p50("pinned");
        assert!((overhead(key) - expected).abs() < 1e-6, "{key}: {report}");
    }
    let phases = report["throughput"].as_array().unwrap();
    assert_eq!(phases.len(), 2, "{report}");
    for phase in phases {
        assert!(
            phase["invocations_per_sec"].as_f64().unwrap() > 0.0,
            "{report}"
        );
        assert_eq!(phase["errors"], 0, "{report}");
    }
    assert!(
        report["baseline"]["p50_us"].as_f64().unwrap() > latency["p50_us"].as_f64().unwrap(),
        "{report}"
    );
    assert!(
        report["idle_memory"]["max_rss_mib"].as_f64().unwrap() > 0.0,
        "{report}"
    );
    // Isolation: two fresh servers, one with --insecure-no-isolation, compared in the same
    // run; every forced start is cold, and the differences are of the p50s shown.
    let isolation = &report["isolation"];
    assert!(report["isolation_skipped"].is_null(), "{report}");
    assert_eq!(isolation["function"], "bench-isolation", "{report}");
    assert_ne!(
        isolation["isolated_server"], isolation["unisolated_server"],
        "{report}"
    );
    assert_eq!(isolation["cold_rounds"], 3, "{report}");
    let f = |v: &Value| v.as_f64().unwrap();
    for mode in ["cold_isolated", "cold_unisolated"] {
        let cold = &isolation[mode];
        assert_eq!(cold["server"]["samples"], 3, "{mode}: {report}");
        assert_eq!(cold["round_trip"]["samples"], 3, "{mode}: {report}");
        assert_eq!(cold["errors"], 0, "{mode}: {report}");
        assert_eq!(cold["unexpected"], 0, "{mode}: {report}");
        // A new instance is far slower than a warm call, and the round trip contains the
        // server's own measurement.
        let server_p50 = f(&cold["server"]["p50_us"]);
        assert!(server_p50 > f(&latency["p50_us"]), "{mode}: {report}");
        assert!(
            f(&cold["round_trip"]["p50_us"]) + 1.0 >= server_p50,
            "{mode}: {report}"
        );
    }
    let p50_of = |mode: &str, series: &str| f(&isolation[mode][series]["p50_us"]);
    let expected = p50_of("cold_isolated", "server") - p50_of("cold_unisolated", "server");
    assert!(
        (f(&isolation["cold_overhead_us"]) - expected).abs() < 1e-6,
        "{report}"
    );
    let expected = p50_of("cold_isolated", "round_trip") - p50_of("cold_unisolated", "round_trip");
    assert!(
        (f(&isolation["cold_round_trip_overhead_us"]) - expected).abs() < 1e-6,
        "{report}"
    );
    assert_eq!(isolation["warm_rounds"], 10, "{report}");
    for mode in ["warm_isolated", "warm_unisolated"] {
        assert_eq!(isolation[mode]["samples"], 200, "{mode}: {report}");
        assert_eq!(isolation[mode]["errors"], 0, "{mode}: {report}");
        assert!(f(&isolation[mode]["p50_us"]) > 0.0, "{mode}: {report}");
    }
    let (isolated, unisolated) = (
        f(&isolation["warm_isolated"]["p50_us"]),
        f(&isolation["warm_unisolated"]["p50_us"]),
    );
    assert!(
        (f(&isolation["warm_difference_us"]) - (isolated - unisolated)).abs() < 1e-6,
        "{report}"
    );
    let noise = f(&isolation["warm_noise_us"]);
    assert!(
        (noise - (0.05 * unisolated).max(10.0)).abs() < 1e-6,
        "{report}"
    );

    // Snapshots: starts from the template against cold ones of the same heavy function,
    // and the memory of instances forked from a template.
    let snapshots = &report["snapshots"];
    assert!(report["snapshots_skipped"].is_null(), "{report}");
    assert_eq!(snapshots["rounds"], 3, "{report}");
    for kind in ["template_starts", "cold_starts"] {
        assert_eq!(snapshots[kind]["server"]["samples"], 3, "{kind}: {report}");
        assert_eq!(snapshots[kind]["unexpected"], 0, "{kind}: {report}");
        assert_eq!(snapshots[kind]["errors"], 0, "{kind}: {report}");
    }
    assert!(
        f(&snapshots["cold_starts"]["server"]["p50_us"])
            > f(&snapshots["template_starts"]["server"]["p50_us"]),
        "{report}"
    );
    let forked = &snapshots["memory"]["instances"];
    assert!(forked["processes"].as_u64().unwrap() > 0, "{report}");
    assert!(f(&forked["avg_pss_mib"]) > 0.0, "{report}");

    // State: gets, protocol-only gets and sets timed in Python on a server per backend (the
    // Redis of this machine, as in tests/state.rs), split into 4 rounds: 40 gets are 4 × 10,
    // the sets (at least 50) 4 × 13.
    let state = &report["state"];
    assert!(report["state_skipped"].is_null(), "{report}");
    assert_eq!(state["function"], "bench-state", "{report}");
    assert_eq!(state["rounds"], 4, "{report}");
    assert!(
        state["redis_skipped"].is_null(),
        "is Redis running at 127.0.0.1:6379? {report}"
    );
    for backend in ["embedded", "redis"] {
        let run = &state[backend];
        for (series, calls) in [("get", 40), ("baseline_get", 40), ("set", 52)] {
            assert_eq!(
                run[series]["samples"], calls,
                "{backend} {series}: {report}"
            );
            assert!(
                f(&run[series]["min_us"]) > 0.0,
                "{backend} {series}: {report}"
            );
        }
        assert_eq!(run["errors"], 0, "{backend}: {report}");
        let expected = f(&run["get"]["p50_us"]) - f(&run["baseline_get"]["p50_us"]);
        assert!(
            (f(&run["backend_get_us"]) - expected).abs() < 1e-6,
            "{backend}: {report}"
        );
    }
    assert_eq!(state["embedded"]["state_url"], "embedded", "{report}");
    assert_eq!(
        state["redis"]["state_url"], "redis://127.0.0.1:6379",
        "{report}"
    );

    let targets = report["targets"].as_array().unwrap();
    assert!(targets.len() >= 13, "{report}");
    for name in [
        "alias routing overhead",
        "isolation cold-start overhead",
        "warm invocation with isolation within noise",
        "template start p50",
        "PSS of an idle instance from a template",
        "state get p50 (embedded, from Python)",
        "state get p50 (Redis, from Python)",
    ] {
        assert!(
            targets
                .iter()
                .any(|t| t["name"].as_str().unwrap().starts_with(name) && t["met"].is_boolean()),
            "{name}: {report}"
        );
    }
}
