//! End-to-end tests of the command-line client and the benchmark harness: the real binary
//! runs as a server on a free loopback port with a temporary data directory, and the CLI
//! commands run against it as subprocesses, as a user would run them.

mod common;

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_nimbus");

/// A `nimbus server` child, killed on drop.
struct Server {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Server {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut child = Command::new(BIN)
            .args(["server", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path().join("data"))
            .env("NIMBUS_LOG", "warn")
            .env_remove("NIMBUS_API_KEYS")
            .env_remove("NIMBUS_CONFIG")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        // The server prints the address the kernel gave it once it listens; reading it
        // cannot race with another test for a port. The reader keeps draining stdout so
        // the server never blocks on a full pipe.
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("Nimbus is listening on ") {
                    let _ = tx.send(url.to_owned());
                }
            }
        });
        let url = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the server did not listen within 30 s");
        Server {
            child,
            url,
            _dir: dir,
        }
    }

    /// Runs `nimbus <args>` against this server.
    fn run(&self, args: &[&str]) -> Output {
        self.run_in(args, None)
    }

    fn run_in(&self, args: &[&str], cwd: Option<&Path>) -> Output {
        let mut cmd = Command::new(BIN);
        cmd.args(args)
            .env("NIMBUS_SERVER", &self.url)
            .env_remove("NIMBUS_API_KEY")
            .env_remove("NIMBUS_LOG")
            .stdin(Stdio::null());
        if let Some(dir) = cwd {
            cmd.current_dir(dir);
        }
        cmd.output().unwrap()
    }

    /// Runs a command that must succeed; returns its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "nimbus {args:?} failed:\n{}",
            describe(&out)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs a command that must fail with exit code 1; returns its stderr.
    fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert_eq!(
            out.status.code(),
            Some(1),
            "nimbus {args:?}:\n{}",
            describe(&out)
        );
        String::from_utf8(out.stderr).unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        common::stop(&mut self.child);
    }
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
fn deploy_invoke_update_list_and_delete() {
    let server = Server::start();
    let work = tempfile::tempdir().unwrap();
    let file = work.path().join("greet.py");
    let file = file.to_str().unwrap();

    std::fs::write(
        file,
        "def handle(event):\n    return {\"hello\": event.get(\"name\", \"world\")}\n",
    )
    .unwrap();
    let out = server.ok(&["deploy", file, "--name", "greet", "--env", "MODE=test"]);
    assert!(out.contains("created function greet"), "{out}");

    let out = server.run(&["invoke", "greet", "--data", r#"{"name":"nimbus"}"#]);
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(
        json(&String::from_utf8_lossy(&out.stdout)),
        serde_json::json!({"hello": "nimbus"})
    );
    let summary = String::from_utf8_lossy(&out.stderr);
    assert!(
        summary.contains("version 1") && summary.contains("inv_"),
        "{summary}"
    );

    // New code publishes version 2; the same code again changes nothing.
    std::fs::write(
        file,
        "def handle(event):\n    return {\"hi\": event.get(\"name\", \"world\")}\n",
    )
    .unwrap();
    let out = server.ok(&["deploy", file, "--name", "greet"]);
    assert!(out.contains("published version 2"), "{out}");
    let out = server.ok(&["deploy", file, "--name", "greet"]);
    assert!(out.contains("no change"), "{out}");
    assert_eq!(
        json(&server.ok(&["invoke", "greet", "-d", r#"{"name":"v2"}"#])),
        serde_json::json!({"hi": "v2"})
    );
    assert_eq!(
        json(&server.ok(&["invoke", "greet", "--version", "1"])),
        serde_json::json!({"hello": "world"})
    );

    let full = json(&server.ok(&["invoke", "greet", "--output", "json"]));
    assert_eq!(full["status_code"], 200);
    assert_eq!(full["version"], 2);
    assert_eq!(full["body"], serde_json::json!({"hi": "world"}));

    let out = server.ok(&["--version"]);
    assert!(out.contains("nimbus"), "{out}");
    let table = server.ok(&["fn", "list"]);
    assert!(
        table.starts_with("NAME") && table.contains("greet"),
        "{table}"
    );
    let page = json(&server.ok(&["fn", "list", "--output", "json"]));
    assert_eq!(page["total"], 1);
    assert_eq!(page["functions"][0]["name"], "greet");
    let details = server.ok(&["fn", "get", "greet"]);
    assert!(
        details.contains("latest version: 2") && details.contains("MODE=test"),
        "{details}"
    );

    let records = server.ok(&["invocations", "greet"]);
    assert!(
        records.starts_with("REQUEST_ID") && records.contains("success"),
        "{records}"
    );
    assert!(records.lines().count() >= 5, "{records}");
    let listed = json(&server.ok(&["invocations", "greet", "--output", "json", "--limit", "2"]));
    let items = listed["invocations"].as_array().unwrap();
    assert_eq!(items.len(), 2);
    let id = items[0]["request_id"].as_str().unwrap();
    let one = server.ok(&["invocations", id]);
    assert!(one.contains(id) && one.contains("output:"), "{one}");

    // Directories are deployed as archives.
    let pkg = work.path().join("pkg");
    std::fs::create_dir_all(pkg.join("lib/__pycache__")).unwrap();
    std::fs::write(
        pkg.join("main.py"),
        "from lib.util import double\ndef run(event):\n    return double(event['n'])\n",
    )
    .unwrap();
    std::fs::write(pkg.join("lib/__init__.py"), "").unwrap();
    std::fs::write(
        pkg.join("lib/util.py"),
        "def double(n):\n    return 2 * n\n",
    )
    .unwrap();
    std::fs::write(pkg.join("lib/__pycache__/junk.pyc"), b"\0").unwrap();
    let out = server.ok(&[
        "deploy",
        pkg.to_str().unwrap(),
        "--name",
        "pkg",
        "--handler",
        "main.run",
    ]);
    assert!(out.contains("created"), "{out}");
    assert_eq!(
        json(&server.ok(&["invoke", "pkg", "--data", r#"{"n":21}"#])),
        42
    );
    let f = json(&server.ok(&["fn", "get", "pkg", "--output", "json"]));
    assert_eq!(f["files"].as_array().unwrap().len(), 3, "{f}");

    // A handler exception: exit 1, code, type and traceback on stderr.
    std::fs::write(file, "def handle(event):\n    return 1 / 0\n").unwrap();
    server.ok(&["deploy", file, "--name", "boom"]);
    let err = server.fails(&["invoke", "boom"]);
    assert!(
        err.contains("function_error") && err.contains("ZeroDivisionError"),
        "{err}"
    );
    assert!(err.contains("Traceback"), "{err}");

    // Client-side validation.
    let out = server.run(&["deploy", file, "--name", "x", "--env", "NOEQUALS"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("KEY=VALUE"),
        "{}",
        describe(&out)
    );
    let err = server.fails(&["invoke", "greet", "--data", "{not json"]);
    assert!(err.contains("not valid JSON"), "{err}");

    // Deleting needs --yes without a terminal.
    let err = server.fails(&["fn", "delete", "greet"]);
    assert!(err.contains("--yes"), "{err}");
    let out = server.ok(&["fn", "delete", "greet", "--yes"]);
    assert!(out.contains("deleted function greet"), "{out}");
    let err = server.fails(&["invoke", "greet"]);
    assert!(err.contains("function_not_found"), "{err}");
    let err = server.fails(&["fn", "get", "greet"]);
    assert!(
        err.starts_with("error: ") && err.contains("(function_not_found)"),
        "{err}"
    );
}

#[test]
fn an_unreachable_server_is_named_with_a_hint() {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let out = Command::new(BIN)
        .args(["fn", "list", "--server", &url])
        .env_remove("NIMBUS_API_KEY")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&url) && err.contains("nimbus server"), "{err}");
}

#[test]
fn bench_smoke_run_reports_sane_numbers() {
    let out = Command::new(BIN)
        .args([
            "bench",
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

/// The line of `text` whose first word is `first`.
fn line_starting<'a>(text: &'a str, first: &str) -> &'a str {
    text.lines()
        .find(|l| l.split_whitespace().next() == Some(first))
        .unwrap_or_else(|| panic!("no line starting with {first:?} in:\n{text}"))
}

#[test]
fn versions_aliases_and_a_canary_rollout() {
    let server = Server::start();
    let work = tempfile::tempdir().unwrap();
    let file = work.path().join("shop.py");
    let file = file.to_str().unwrap();
    let code = |tag: &str| {
        std::fs::write(file, format!("def handle(event):\n    return \"{tag}\"\n")).unwrap()
    };
    let invoke = |args: &[&str]| -> String {
        let out = server.run(&[&["invoke", "shop"], args].concat());
        assert!(out.status.success(), "{}", describe(&out));
        json(&String::from_utf8_lossy(&out.stdout))
            .as_str()
            .unwrap()
            .to_owned()
    };

    code("v1");
    server.ok(&["deploy", file, "--name", "shop"]);

    // Staged code becomes version 2 on publish; publishing again changes nothing.
    code("v2");
    let out = server.ok(&["deploy", file, "--name", "shop", "--no-publish"]);
    assert!(out.contains("staged"), "{out}");
    let out = server.ok(&["version", "publish", "shop", "--description", "second"]);
    assert_eq!(out, "published shop version 2 (latest → 2)\n");
    let out = server.ok(&["version", "publish", "shop"]);
    assert_eq!(
        out,
        "shop: nothing changed since version 2; no new version published (latest → 2)\n"
    );

    let list = server.ok(&["version", "list", "shop"]);
    assert!(
        list.starts_with("VERSION  CREATED") && list.lines().count() == 3,
        "{list}"
    );
    let page = json(&server.ok(&["version", "list", "shop", "--output", "json"]));
    assert_eq!(page["total"], 2);
    let hash = page["versions"][0]["code_hash"].as_str().unwrap();
    let newest = line_starting(&list, "2");
    assert!(
        newest.contains(&hash[7..19])
            && !newest.contains(&hash[7..20])
            && newest.contains("latest")
            && newest.ends_with("second"),
        "{list}"
    );
    assert!(line_starting(&list, "1").contains("  -  "), "{list}");
    let v1 = server.ok(&["version", "get", "shop", "1", "--code"]);
    assert_eq!(line_starting(&v1, "version:"), "version:     1", "{v1}");
    assert!(
        v1.contains("\n==> handler.py <==\ndef handle(event):\n    return \"v1\"\n"),
        "{v1}"
    );

    // A canary: prod on version 1, then 10% of its traffic to version 2.
    let out = server.ok(&[
        "alias",
        "create",
        "shop",
        "prod",
        "--version",
        "1",
        "--description",
        "production",
    ]);
    assert!(
        out.starts_with("created alias prod of shop (revision 1)\n")
            && out.contains("\n1        100%    "),
        "{out}"
    );
    let out = server.ok(&["alias", "set", "shop", "prod", "--weights", "1=90, 2=10"]);
    assert!(
        out.starts_with("updated alias prod (revision 2)\n"),
        "{out}"
    );
    let details = server.ok(&["alias", "get", "shop", "prod"]);
    let split = format!(
        "VERSION  WEIGHT  SPLIT\n1        90%     {}\n2        10%     █████\n",
        "█".repeat(45)
    );
    assert!(details.ends_with(&split), "{details}");
    assert_eq!(
        line_starting(&details, "description:"),
        "description: production"
    );
    let aliases = server.ok(&["alias", "list", "shop"]);
    assert!(
        line_starting(&aliases, "prod").contains("v1 90% · v2 10%")
            && line_starting(&aliases, "latest").contains("v2 100%"),
        "{aliases}"
    );
    let alias = json(&server.ok(&["alias", "get", "shop", "prod", "--output", "json"]));
    assert_eq!(
        alias["routing_config"],
        serde_json::json!({"weights": [{"version": 1, "weight": 90}, {"version": 2, "weight": 10}]})
    );
    for _ in 0..5 {
        let tag = invoke(&["--alias", "prod"]);
        assert!(tag == "v1" || tag == "v2", "{tag}");
    }
    // A session stays on one version while the weights stand.
    let first = invoke(&["--alias", "prod", "--session", "cart-7"]);
    for _ in 0..3 {
        assert_eq!(invoke(&["--alias", "prod", "--session", "cart-7"]), first);
    }

    // Routed versions cannot be deleted; the server's validation messages come through.
    let err = server.fails(&["version", "delete", "shop", "2"]);
    assert!(
        err.contains("prod") && err.contains("(version_in_use)"),
        "{err}"
    );
    let err = server.fails(&["alias", "set", "shop", "prod", "--weights", "1=60,2=30"]);
    assert!(
        err.contains("sum to 90") && err.contains("(validation_error)"),
        "{err}"
    );
    let err = server.fails(&["alias", "set", "shop", "prod", "--weights", "1=50,9=50"]);
    assert!(
        err.contains('9') && err.contains("(validation_error)"),
        "{err}"
    );
    let out = server.run(&["alias", "set", "shop", "prod", "--weights", "1:100"]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(r#""1:100" is not VERSION=WEIGHT"#), "{err}");

    // The one-liner sends everything to version 2.
    let out = server.ok(&["rollback", "shop", "--alias", "prod", "--to", "2"]);
    assert!(
        out.starts_with("prod of shop rolled back to version 2 (now revision 3)\n"),
        "{out}"
    );
    assert_eq!(invoke(&["--alias", "prod"]), "v2");

    let history = server.ok(&["alias", "history", "shop", "prod"]);
    let newest = line_starting(&history, "3");
    assert!(
        newest.contains(" rollback  v2 100%  ") && newest.ends_with("  v1 90% · v2 10%"),
        "{history}"
    );
    assert!(
        line_starting(&history, "1").contains(" create ")
            && line_starting(&history, "1").ends_with("  -"),
        "{history}"
    );

    // Undo the last change, then go back to the first routing.
    let out = server.ok(&["alias", "rollback", "shop", "prod"]);
    assert!(
        out.starts_with("prod of shop rolled back to the routing of revision 2 (now revision 4)\n")
            && out.ends_with(&split),
        "{out}"
    );
    let rolled = json(&server.ok(&[
        "alias",
        "rollback",
        "shop",
        "prod",
        "--to-revision",
        "1",
        "--output",
        "json",
    ]));
    assert_eq!(rolled["restored_revision"], 1);
    assert_eq!(rolled["revision"], 5);
    let history = server.ok(&["alias", "history", "shop", "prod"]);
    assert!(
        line_starting(&history, "5").contains(" rollback to r1 "),
        "{history}"
    );
    let page = json(&server.ok(&["alias", "history", "shop", "prod", "--output", "json"]));
    assert_eq!(page["total"], 5);

    // `nimbus rollback` without --to undoes the publish that moved latest.
    let out = server.ok(&["rollback", "shop"]);
    assert!(
        out.starts_with("latest of shop rolled back to the routing of revision 1"),
        "{out}"
    );
    assert_eq!(invoke(&[]), "v1");

    // Publishing with --alias moves that alias too; version 2 is then unrouted.
    code("v3");
    server.ok(&["deploy", file, "--name", "shop", "--no-publish"]);
    let out = server.ok(&["version", "publish", "shop", "--alias", "prod"]);
    assert_eq!(out, "published shop version 3 (latest → 3, prod → 3)\n");
    assert_eq!(invoke(&["--alias", "prod"]), "v3");
    let out = server.ok(&["version", "delete", "shop", "2"]);
    assert_eq!(out, "deleted shop version 2\n");
    let err = server.fails(&["version", "get", "shop", "2"]);
    assert!(err.contains("(version_not_found)"), "{err}");
    let page = json(&server.ok(&["version", "list", "shop", "--output", "json"]));
    let numbers: Vec<u64> = page["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["version"].as_u64().unwrap())
        .collect();
    assert_eq!(numbers, [3, 1]);

    let err = server.fails(&["alias", "delete", "shop", "latest"]);
    assert!(err.contains("(alias_protected)"), "{err}");
    // A dot segment would address another resource once the URL is resolved.
    let err = server.fails(&["alias", "delete", "shop", ".."]);
    assert!(err.contains(r#"".." is not a valid name"#), "{err}");
    let out = server.ok(&["alias", "delete", "shop", "prod"]);
    assert_eq!(out, "deleted alias prod of shop\n");
    let err = server.fails(&["alias", "get", "shop", "prod"]);
    assert!(err.contains("(alias_not_found)"), "{err}");
}
