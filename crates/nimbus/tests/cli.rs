//! End-to-end tests of the command-line client: the real binary
//! runs as a server on a free loopback port with a temporary data directory, and the CLI
//! commands run against it as subprocesses, as a user would run them.

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
        nimbus_testkit::server::stop(&mut self.child);
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
