//! The snapshot endpoints (`/functions/{id}/snapshots`, `/snapshots/stats`,
//! `/snapshots/cleanup`) and `nimbus snapshot build|list|delete|cleanup|stats`, end to end:
//! the real binary as a server (isolation on, snapshots on unless a test says otherwise),
//! the CLI as a subprocess against it, and the HTTP answers checked with reqwest.

use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use nimbus_testkit::server::{code_of, Backend, Nimbus, Server};
use reqwest::StatusCode;
use serde_json::{json, Value};

/// The binary under test.
const NIMBUS: Nimbus = Nimbus::at(env!("CARGO_BIN_EXE_nimbus"));

const BIN: &str = env!("CARGO_BIN_EXE_nimbus");

/// A function whose snapshot builds fine.
const SHOP: &str =
    "import random\nSEED = random.random()\n\ndef handle(event):\n    return {\"seed\": SEED}\n";

/// A function whose `before_snapshot` hook raises, so its snapshot always fails.
const BROKEN: &str = r#"
import nimbus

@nimbus.before_snapshot
def close_connections():
    raise RuntimeError("cannot snapshot: socket still open")

def handle(event):
    return "still works"
"#;

/// A function whose initialization (hence its snapshot's build) takes a while.
const SLOW: &str = "import time\ntime.sleep(2)\n\ndef handle(event):\n    return 'slow'\n";

/// Runs `nimbus <args>` against `s`.
async fn nimbus(s: &Server, args: &[&str]) -> Output {
    tokio::process::Command::new(BIN)
        .args(args)
        .env("NIMBUS_SERVER", &s.base)
        .env_remove("NIMBUS_API_KEY")
        .env_remove("NIMBUS_LOG")
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap()
}

fn describe(args: &[&str], out: &Output) -> String {
    format!(
        "nimbus {args:?}: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs a command that must succeed; returns its stdout and stderr.
async fn ok(s: &Server, args: &[&str]) -> (String, String) {
    let out = nimbus(s, args).await;
    assert!(out.status.success(), "{}", describe(args, &out));
    (
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

/// Runs a command that must fail with exit code 1; returns its stdout and stderr.
async fn fails(s: &Server, args: &[&str]) -> (String, String) {
    let out = nimbus(s, args).await;
    assert_eq!(out.status.code(), Some(1), "{}", describe(args, &out));
    (
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

/// The value of `key:` in a details view.
fn field(text: &str, key: &str) -> String {
    text.lines()
        .find_map(|line| line.strip_prefix(&format!("{key}:")))
        .map(|v| v.trim().to_owned())
        .unwrap_or_else(|| panic!("no {key:?} in:\n{text}"))
}

fn parse(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}):\n{text}"))
}

async fn stats(s: &Server) -> Value {
    let (status, body) = s.call("GET", "/snapshots/stats", None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

fn is_timestamp(v: &Value) -> bool {
    let re = regex::Regex::new(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$").unwrap();
    v.as_str().is_some_and(|t| re.is_match(t))
}

#[tokio::test]
async fn cli_builds_lists_uses_stats_and_deletes_a_snapshot() {
    // Every invocation retires its instance, so each one starts a fresh instance.
    let s = NIMBUS
        .start_with(Backend::Sqlite, "max_invocations = 1\n", &["--snapshots"])
        .await;
    s.deploy("shop", SHOP, json!({})).await;

    // Waits (joining the build publishing started, if it is still under way).
    let (out, err) = ok(&s, &["snapshot", "build", "shop"]).await;
    assert!(
        err.contains("building snapshot of shop (newest version)…"),
        "{err}"
    );
    assert_eq!(field(&out, "status"), "ready", "{out}");
    assert_eq!(field(&out, "resident"), "yes", "{out}");
    assert_eq!(field(&out, "version"), "1", "{out}");
    let id = field(&out, "id");
    assert!(id.starts_with("snap_"), "{out}");

    // Resident already: nothing to build, same snapshot.
    let (out, err) = ok(&s, &["snapshot", "build", "shop", "--version", "1"]).await;
    assert!(
        err.contains("building snapshot of shop version 1…"),
        "{err}"
    );
    assert!(out.contains("is ready already; nothing was built"), "{out}");
    let (out, _) = ok(&s, &["snapshot", "build", "shop", "--output", "json"]).await;
    let built = parse(&out);
    assert_eq!(
        (&built["id"], &built["status"], &built["resident"]),
        (&json!(id), &json!("ready"), &json!(true)),
        "{built}"
    );

    let (out, _) = ok(&s, &["snapshot", "list", "shop"]).await;
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(
        lines[0].starts_with("ID") && lines[0].contains("FORKS  RESTORES  FAILURES"),
        "{out}"
    );
    let row: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(&row[..4], [id.as_str(), "1", "ready", "yes"], "{out}");

    // Fresh instances start from the template.
    for _ in 0..2 {
        let (status, r) = s.invoke_raw("shop", "", "{}").await;
        assert_eq!(status, StatusCode::OK, "{r}");
        assert_eq!(r["start_type"], "template", "{r}");
    }

    // Forks are recorded behind the invocations.
    let deadline = Instant::now() + Duration::from_secs(10);
    let listed = loop {
        let (out, _) = ok(&s, &["snapshot", "list", "shop", "--output", "json"]).await;
        let listed = parse(&out);
        if listed["snapshots"][0]["fork_count"] == 2 {
            assert_eq!(listed["snapshots"][0]["restore_count"], 0, "{listed}");
            break listed;
        }
        assert!(Instant::now() < deadline, "forks not recorded: {listed}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let snap = &listed["snapshots"][0];
    assert!(is_timestamp(&snap["last_used_at"]), "{snap}");
    assert!(is_timestamp(&snap["created_at"]), "{snap}");
    assert!(is_timestamp(&snap["expires_at"]), "{snap}");

    let (out, _) = ok(&s, &["snapshot", "stats"]).await;
    assert_eq!(field(&out, "snapshots"), "1 (ready 1)", "{out}");
    assert!(
        field(&out, "resident templates").starts_with("1 ("),
        "{out}"
    );
    assert!(field(&out, "forks").starts_with("2 (avg "), "{out}");
    assert_eq!(field(&out, "restores"), "0", "{out}");
    let (out, _) = ok(&s, &["snapshot", "stats", "--output", "json"]).await;
    let st = parse(&out);
    assert_eq!(st["total"], 1, "{st}");
    assert_eq!(st["by_status"]["ready"], 1, "{st}");
    assert_eq!(st["resident_templates"], 1, "{st}");
    assert_eq!(st["forks"], 2, "{st}");
    assert_eq!(st["restores"], 0, "{st}");

    // Unknown ids and functions.
    let (_, err) = fails(&s, &["snapshot", "delete", "shop", "snap_nope"]).await;
    assert!(err.contains("(snapshot_not_found)"), "{err}");
    let (_, err) = fails(&s, &["snapshot", "list", "nope"]).await;
    assert!(err.contains("(function_not_found)"), "{err}");
    let (_, err) = fails(&s, &["snapshot", "build", "shop", "--version", "9"]).await;
    assert!(err.contains("(version_not_found)"), "{err}");

    let (out, _) = ok(&s, &["snapshot", "delete", "shop", &id]).await;
    assert_eq!(out, format!("deleted snapshot {id} of shop\n"));
    let (status, body) = s
        .call("DELETE", &format!("/functions/shop/snapshots/{id}"), None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(code_of(&body), "snapshot_not_found");
    let (status, body) = s.call("GET", "/functions/shop/snapshots", None).await;
    assert_eq!((status, &body), (StatusCode::OK, &json!({"snapshots": []})));
    // With its template gone, the next instance starts cold.
    let (status, r) = s.invoke_raw("shop", "", "{}").await;
    assert_eq!(status, StatusCode::OK, "{r}");
    assert_eq!(r["start_type"], "cold", "{r}");
}

#[tokio::test]
async fn cli_reports_a_failed_build_and_cleans_it_up() {
    let s = NIMBUS
        .start_with(Backend::Sqlite, "", &["--snapshots"])
        .await;
    s.deploy("broken", BROKEN, json!({})).await;
    s.deploy("fine", SHOP, json!({})).await;
    ok(&s, &["snapshot", "build", "fine"]).await;

    let (out, err) = fails(&s, &["snapshot", "build", "broken"]).await;
    assert!(
        out.contains("snapshot build of broken version 1 failed"),
        "{out}"
    );
    assert_eq!(field(&out, "status"), "failed", "{out}");
    assert_eq!(field(&out, "resident"), "no", "{out}");
    let hook = "@nimbus.before_snapshot hook close_connections raised RuntimeError: \
                cannot snapshot: socket still open";
    assert!(field(&out, "error").contains(hook), "{out}");
    assert!(
        err.contains("error: the snapshot build of broken version 1 failed:") && err.contains(hook),
        "{err}"
    );
    // Scripts get the row and the exit code too.
    let (out, _) = fails(&s, &["snapshot", "build", "broken", "--output", "json"]).await;
    let failed = parse(&out);
    assert_eq!(failed["status"], "failed", "{failed}");
    assert!(
        failed["error_message"].as_str().unwrap().contains(hook),
        "{failed}"
    );
    let failed_id = failed["id"].as_str().unwrap().to_owned();
    // The function itself still runs, cold.
    let (status, r) = s.invoke_raw("broken", "", "{}").await;
    assert_eq!(
        (status, &r["body"]),
        (StatusCode::OK, &json!("still works"))
    );
    assert_eq!(r["start_type"], "cold", "{r}");

    let (out, _) = ok(&s, &["snapshot", "list", "broken"]).await;
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert!(
        lines[1].starts_with(&failed_id) && lines[1].contains(" failed "),
        "{out}"
    );
    assert!(
        lines[2].starts_with("  └ error: ") && lines[2].contains(hook),
        "{out}"
    );

    let (out, _) = ok(&s, &["snapshot", "cleanup", "--dry-run"]).await;
    assert!(out.starts_with("would remove 1 snapshot "), "{out}");
    let row = out.lines().last().unwrap();
    assert!(
        row.starts_with(&failed_id) && row.contains(" broken ") && row.contains(" failed "),
        "{out}"
    );
    let (out, _) = ok(
        &s,
        &["snapshot", "--output", "json", "cleanup", "--dry-run"],
    )
    .await;
    let dry = parse(&out);
    assert_eq!(dry["dry_run"], true);
    assert_eq!(dry["removed"].as_array().unwrap().len(), 1, "{dry}");
    assert_eq!(dry["removed"][0]["id"], json!(failed_id));
    // Nothing was removed.
    let (out, _) = ok(&s, &["snapshot", "list", "broken"]).await;
    assert!(out.contains(&failed_id), "{out}");

    let (out, _) = ok(&s, &["snapshot", "cleanup"]).await;
    assert!(out.starts_with("removed 1 snapshot "), "{out}");
    assert!(out.contains(&failed_id), "{out}");
    let (out, _) = ok(&s, &["snapshot", "list", "broken"]).await;
    assert_eq!(out, "no snapshots\n");
    let (out, _) = ok(&s, &["snapshot", "list", "fine"]).await;
    assert!(out.contains(" ready "), "the ready one stays: {out}");
    let (out, _) = ok(&s, &["snapshot", "cleanup"]).await;
    assert!(out.starts_with("nothing to clean up"), "{out}");

    let st = stats(&s).await;
    assert_eq!(st["total"], 1, "{st}");
    assert_eq!(
        (&st["by_status"]["ready"], &st["by_status"]["failed"]),
        (&json!(1), &json!(0)),
        "{st}"
    );
}

#[tokio::test]
async fn http_answers_of_the_snapshot_endpoints() {
    let s = NIMBUS
        .start_with(Backend::Sqlite, "", &["--snapshots"])
        .await;
    s.deploy("slow", SLOW, json!({})).await;

    // Publishing queued the build; an empty body joins it without waiting.
    let (status, building) = s.call("POST", "/functions/slow/snapshots", None).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{building}");
    assert_eq!(building["status"], "building", "{building}");
    assert_eq!(building["resident"], false, "{building}");
    assert_eq!(building["version"], 1, "{building}");
    let id = building["id"].as_str().unwrap().to_owned();
    let (status, body) = s
        .call("DELETE", &format!("/functions/slow/snapshots/{id}"), None)
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(code_of(&body), "snapshot_building");

    // Waiting for the build: 201 once it is ready; then 200, nothing to build.
    let (status, ready) = s
        .call(
            "POST",
            "/functions/slow/snapshots",
            Some(json!({ "wait": true })),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{ready}");
    assert_eq!(
        (&ready["id"], &ready["status"], &ready["resident"]),
        (&json!(id), &json!("ready"), &json!(true)),
        "{ready}"
    );
    assert!(is_timestamp(&ready["created_at"]), "{ready}");
    assert!(is_timestamp(&ready["expires_at"]), "{ready}");
    assert_eq!(ready["last_used_at"], Value::Null, "{ready}");
    for body in [Some(json!({ "wait": true, "version": 1 })), Some(json!({}))] {
        let (status, again) = s.call("POST", "/functions/slow/snapshots", body).await;
        assert_eq!(status, StatusCode::OK, "{again}");
        assert_eq!(again["id"], json!(id), "{again}");
    }

    // Bad requests.
    for (body, want, code) in [
        (
            json!({ "version": 9 }),
            StatusCode::NOT_FOUND,
            "version_not_found",
        ),
        (
            json!({ "version": 0 }),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            json!({ "wiat": true }),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
    ] {
        let (status, r) = s
            .call("POST", "/functions/slow/snapshots", Some(body))
            .await;
        assert_eq!((status, code_of(&r)), (want, code), "{r}");
    }
    let (status, r) = s.call("GET", "/functions/nope/snapshots", None).await;
    assert_eq!(
        (status, code_of(&r)),
        (StatusCode::NOT_FOUND, "function_not_found")
    );

    // A failed build, waited for: 200 with the row saying why.
    s.deploy("broken", BROKEN, json!({})).await;
    let (status, failed) = s
        .call(
            "POST",
            "/functions/broken/snapshots",
            Some(json!({ "wait": true })),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{failed}");
    assert_eq!(failed["status"], "failed", "{failed}");
    assert!(
        failed["error_message"]
            .as_str()
            .unwrap()
            .contains("RuntimeError: cannot snapshot: socket still open"),
        "{failed}"
    );

    // The list, by id as well as by name.
    let (_, f) = s.call("GET", "/functions/slow", None).await;
    let fn_id = f["id"].as_str().unwrap();
    let (status, list) = s
        .call("GET", &format!("/functions/{fn_id}/snapshots"), None)
        .await;
    assert_eq!(status, StatusCode::OK, "{list}");
    assert_eq!(list["snapshots"].as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list["snapshots"][0]["id"], json!(id));

    // Another function's snapshot is not found under this one.
    let failed_id = failed["id"].as_str().unwrap();
    let (status, r) = s
        .call(
            "DELETE",
            &format!("/functions/slow/snapshots/{failed_id}"),
            None,
        )
        .await;
    assert_eq!(
        (status, code_of(&r)),
        (StatusCode::NOT_FOUND, "snapshot_not_found")
    );

    let st = stats(&s).await;
    for key in [
        "total",
        "by_status",
        "resident_templates",
        "resident_bytes",
        "memory_budget_bytes",
        "storage_bytes",
        "forks",
        "avg_fork_ms",
        "restores",
        "avg_restore_ms",
        "failures",
    ] {
        assert!(!st[key].is_null(), "{key} missing: {st}");
    }
    assert_eq!(st["total"], 2, "{st}");
    assert_eq!(
        (&st["by_status"]["ready"], &st["by_status"]["failed"]),
        (&json!(1), &json!(1))
    );

    // Cleanup: dry, bad flag, real.
    let (status, dry) = s
        .call("POST", "/snapshots/cleanup?dry_run=true", None)
        .await;
    assert_eq!(status, StatusCode::OK, "{dry}");
    assert_eq!(dry["dry_run"], true);
    assert_eq!(dry["removed"][0]["id"], json!(failed_id), "{dry}");
    assert!(is_timestamp(&dry["removed"][0]["created_at"]), "{dry}");
    let (status, r) = s
        .call("POST", "/snapshots/cleanup?dry_run=maybe", None)
        .await;
    assert_eq!(
        (status, code_of(&r)),
        (StatusCode::BAD_REQUEST, "invalid_request")
    );
    let (status, r) = s.call("GET", "/snapshots/cleanup", None).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{r}");
    let (status, done) = s.call("POST", "/snapshots/cleanup", None).await;
    assert_eq!(status, StatusCode::OK, "{done}");
    assert_eq!(done["dry_run"], false);
    assert_eq!(done["removed"].as_array().unwrap().len(), 1, "{done}");
    assert_eq!(stats(&s).await["total"], 1);

    // Delete: 204 with no body.
    let resp = s
        .auth(
            s.http
                .delete(s.url(&format!("/functions/slow/snapshots/{id}"))),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    assert!(resp.bytes().await.unwrap().is_empty());
    assert_eq!(stats(&s).await["total"], 0);

    let (_, openapi) = s.call("GET", "/openapi.json", None).await;
    for (path, method, codes) in [
        (
            "/api/v1/functions/{id}/snapshots",
            "get",
            &["200", "404"][..],
        ),
        (
            "/api/v1/functions/{id}/snapshots",
            "post",
            &["200", "201", "202", "404", "409"][..],
        ),
        (
            "/api/v1/functions/{id}/snapshots/{sid}",
            "delete",
            &["204", "404", "409"][..],
        ),
        ("/api/v1/snapshots/stats", "get", &["200"][..]),
        ("/api/v1/snapshots/cleanup", "post", &["200"][..]),
    ] {
        for code in codes {
            assert!(
                openapi["paths"][path][method]["responses"][code].is_object(),
                "{method} {path} {code} undocumented"
            );
        }
    }
}

#[tokio::test]
async fn a_server_without_snapshots_refuses_builds_with_409() {
    let s = NIMBUS.start(Backend::Sqlite).await;
    s.deploy("shop", SHOP, json!({})).await;
    let (status, r) = s.call("POST", "/functions/shop/snapshots", None).await;
    assert_eq!(
        (status, code_of(&r)),
        (StatusCode::CONFLICT, "snapshots_disabled"),
        "{r}"
    );
    let (_, err) = fails(&s, &["snapshot", "build", "shop"]).await;
    assert!(err.contains("(snapshots_disabled)"), "{err}");
    let (out, _) = ok(&s, &["snapshot", "list", "shop"]).await;
    assert_eq!(out, "no snapshots\n");
    let (out, _) = ok(&s, &["snapshot", "stats", "--output", "json"]).await;
    assert_eq!(parse(&out)["total"], 0);
    let (out, _) = ok(&s, &["snapshot", "cleanup", "--dry-run"]).await;
    assert_eq!(out, "nothing to clean up\n");
}
