//! End-to-end tests of the command-line client and the benchmark harness: the real binary
//! runs as a server on a free loopback port with a temporary data directory, and the CLI
//! commands run against it as subprocesses, as a user would run them.

use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

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
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let listen = format!("127.0.0.1:{port}");
        let child = Command::new(BIN)
            .args(["server", "--listen", &listen, "--data-dir"])
            .arg(dir.path().join("data"))
            .env("NIMBUS_LOG", "warn")
            .env_remove("NIMBUS_API_KEYS")
            .env_remove("NIMBUS_CONFIG")
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let mut server = Server {
            child,
            url: format!("http://{listen}"),
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(&listen).is_err() {
            assert!(
                server.child.try_wait().unwrap().is_none(),
                "the server exited early"
            );
            assert!(
                Instant::now() < deadline,
                "the server did not listen within 30 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        server
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
        let _ = self.child.kill();
        let _ = self.child.wait();
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
    let overhead = |key: &str| routing[key].as_f64().unwrap();
    assert_eq!(
        overhead("latest_overhead_us"),
        p50("latest") - p50("pinned")
    );
    assert_eq!(
        overhead("weighted_overhead_us"),
        p50("weighted") - p50("pinned")
    );
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
    let targets = report["targets"].as_array().unwrap();
    assert_eq!(targets.len(), 5, "{report}");
    assert!(
        targets.iter().any(|t| t["name"]
            .as_str()
            .unwrap()
            .starts_with("alias routing overhead")
            && t["met"].is_boolean()),
        "{report}"
    );
}
