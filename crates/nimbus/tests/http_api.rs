//! End-to-end tests of the HTTP API: the real `nimbus` binary as a server, driven over
//! HTTP as a user would, once on SQLite and once on the real PostgreSQL (each run in a
//! schema of its own).

use std::process::Command;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{json, Value};

use nimbus_testkit::on_both_backends;
use nimbus_testkit::server::{code_of, Backend, Nimbus};

/// The binary under test.
const NIMBUS: Nimbus = Nimbus::at(env!("CARGO_BIN_EXE_nimbus"));

on_both_backends!(
    deploy_invoke_update_and_records,
    error_cases_answer_with_status_and_code,
    code_archives_with_packages,
    records_survive_a_clean_restart,
    async_invocations_complete,
);

async fn deploy_invoke_update_and_records(backend: Backend) {
    let s = NIMBUS.start(backend).await;
    let created = s
        .deploy(
            "greet",
            "def handle(event):\n    print('v1 saw', event)\n    return {'v': 1, 'echo': event}\n",
            json!({}),
        )
        .await;
    assert_eq!(created.version, 1);
    assert_eq!(created.function.latest_version, 1);
    assert!(created.function.id.starts_with("fn_"));

    let (status, r) = s.invoke_raw("greet", "", r#"{"x": 42}"#).await;
    assert_eq!(status, StatusCode::OK, "{r}");
    assert_eq!(r["body"], json!({"v": 1, "echo": {"x": 42}}));
    assert_eq!(r["status_code"], 200);
    assert_eq!(r["version"], 1);
    assert_eq!(r["alias_used"], "latest");
    assert_eq!(r["start_type"], "cold");
    assert_eq!(r["cold_start"], true);
    let (_, warm) = s.invoke_raw(&created.function.id, "", "{}").await;
    assert_eq!(warm["start_type"], "warm");
    assert_eq!(warm["instance_id"], r["instance_id"]);

    let (status, updated) = s
        .call(
            "PUT",
            "/functions/greet",
            Some(json!({"code": "def handle(event):\n    return {'v': 2}\n"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{updated}");
    assert_eq!(updated["published_version"], 2);
    let (_, v2) = s.invoke_raw("greet", "", "{}").await;
    assert_eq!(
        (v2["body"]["v"].clone(), v2["version"].clone()),
        (json!(2), json!(2))
    );
    let (_, v1) = s.invoke_raw("greet", "?version=1", "{}").await;
    assert_eq!(v1["body"]["v"], 1);
    assert_eq!(v1["alias_used"], Value::Null);

    let (status, staged) = s
        .call(
            "PUT",
            "/functions/greet",
            Some(json!({"memory_mb": 128, "publish": false})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(staged["published_version"], Value::Null);
    assert_eq!(staged["memory_mb"], 128);
    let (_, still_v2) = s.invoke_raw("greet", "", "{}").await;
    assert_eq!(still_v2["version"], 2);

    let (status, record) = s
        .call(
            "GET",
            &format!("/invocations/{}", r["request_id"].as_str().unwrap()),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{record}");
    assert_eq!(record["status"], "success");
    assert_eq!(record["version"], 1);
    assert_eq!(record["function_name"], "greet");
    assert_eq!(record["input"], json!({"x": 42}));
    assert_eq!(record["output"], json!({"v": 1, "echo": {"x": 42}}));
    assert!(
        record["logs"]
            .as_str()
            .unwrap()
            .contains("v1 saw {'x': 42}"),
        "{record}"
    );
    assert_eq!(record["start_type"], "cold");

    let (_, listed) = s
        .call("GET", "/functions/greet/invocations?limit=2", None)
        .await;
    assert_eq!(listed["invocations"].as_array().unwrap().len(), 2);
    let (_, only_ok) = s
        .call("GET", "/functions/greet/invocations?status=error", None)
        .await;
    assert_eq!(only_ok["invocations"].as_array().unwrap().len(), 0);

    let (status, _) = s.call("DELETE", "/functions/greet", None).await;
    assert_eq!(status, StatusCode::OK);
    let (status, gone) = s.invoke_raw("greet", "", "{}").await;
    assert_eq!(
        (status, code_of(&gone)),
        (StatusCode::NOT_FOUND, "function_not_found")
    );
}

async fn error_cases_answer_with_status_and_code(backend: Backend) {
    let s = NIMBUS.start_with(backend, "queue_depth = 0\n", &[]).await;
    let faulty = r#"
import os, time
def handle(event):
    a = event.get("action")
    if a == "raise": raise KeyError("missing thing")
    if a == "sleep": time.sleep(5)
    if a == "exit": os._exit(9)
    if a == "hold": time.sleep(0.8)
    return "ok"
"#;
    s.deploy(
        "faulty",
        faulty,
        json!({"timeout_sec": 1, "max_instances": 1}),
    )
    .await;

    let cases: &[(&str, &str, &str, StatusCode, &str)] = &[
        (
            "faulty",
            "",
            "{not json",
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        (
            "missing",
            "",
            "{}",
            StatusCode::NOT_FOUND,
            "function_not_found",
        ),
        (
            "faulty",
            "?version=7",
            "{}",
            StatusCode::NOT_FOUND,
            "version_not_found",
        ),
        (
            "faulty",
            "?alias=prod",
            "{}",
            StatusCode::NOT_FOUND,
            "alias_not_found",
        ),
        (
            "faulty",
            "?version=x",
            "{}",
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            "faulty",
            "",
            r#"{"action":"raise"}"#,
            StatusCode::INTERNAL_SERVER_ERROR,
            "function_error",
        ),
        (
            "faulty",
            "",
            r#"{"action":"sleep"}"#,
            StatusCode::GATEWAY_TIMEOUT,
            "function_timeout",
        ),
        (
            "faulty",
            "",
            r#"{"action":"exit"}"#,
            StatusCode::BAD_GATEWAY,
            "instance_crashed",
        ),
    ];
    for (function, query, body, status, code) in cases {
        let (got, value) = s.invoke_raw(function, query, body).await;
        assert_eq!(
            (got, code_of(&value)),
            (*status, *code),
            "{function}{query} {body}: {value}"
        );
    }
    let (_, raised) = s.invoke_raw("faulty", "", r#"{"action":"raise"}"#).await;
    assert_eq!(raised["error"]["type"], "KeyError");
    assert!(raised["error"]["traceback"]
        .as_str()
        .unwrap()
        .contains("missing thing"));
    assert!(raised["request_id"].as_str().unwrap().starts_with("inv_"));
    assert_eq!(raised["version"], 1);

    let big = format!("\"{}\"", "a".repeat(6 * 1024 * 1024 + 1));
    let (status, value) = s.invoke_raw("faulty", "", &big).await;
    assert_eq!(
        (status, code_of(&value)),
        (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large")
    );

    // One instance, no queue: a second concurrent call is throttled.
    let hold = s.invoke_raw("faulty", "", r#"{"action":"hold"}"#);
    let second = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        s.invoke_raw("faulty", "", "{}").await
    };
    let ((first_status, _), (status, value)) = tokio::join!(hold, second);
    assert_eq!(first_status, StatusCode::OK);
    assert_eq!(
        (status, code_of(&value)),
        (StatusCode::TOO_MANY_REQUESTS, "throttled"),
        "{value}"
    );

    let deploy_cases: &[(Value, StatusCode, &str)] = &[
        (
            json!({"name": "faulty", "code": "def handle(e): return 1"}),
            StatusCode::CONFLICT,
            "function_exists",
        ),
        (
            json!({"name": "Bad Name", "code": "x"}),
            StatusCode::BAD_REQUEST,
            "validation_error",
        ),
        (
            json!({"name": "ok", "code": "def handle(e): return 1", "memory_mb": 1}),
            StatusCode::BAD_REQUEST,
            "validation_error",
        ),
        (
            json!({"name": "ok", "code": "def handle(e): return 1", "colour": "red"}),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            json!({"name": "ok"}),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            json!({"name": "ok", "code": "import nope_nope\n"}),
            StatusCode::BAD_REQUEST,
            "function_init_failed",
        ),
        (
            json!({"name": "ok", "code": "def handle(:\n"}),
            StatusCode::BAD_REQUEST,
            "function_init_failed",
        ),
        (
            json!({"name": "ok", "code": "x = 1\n"}),
            StatusCode::BAD_REQUEST,
            "function_init_failed",
        ),
        (
            json!({"name": "ok", "code": "x", "runtime": "cobol"}),
            StatusCode::BAD_REQUEST,
            "validation_error",
        ),
    ];
    for (body, status, code) in deploy_cases {
        let (got, value) = s.call("POST", "/functions", Some(body.clone())).await;
        assert_eq!((got, code_of(&value)), (*status, *code), "{body}: {value}");
    }
    let (status, _) = s.call("GET", "/functions/ok", None).await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "a failed deploy stores nothing"
    );
}

async fn code_archives_with_packages(backend: Backend) {
    let s = NIMBUS.start(backend).await;
    let archive = nimbus_testkit::server::zip_base64(&[
        ("app/__init__.py", ""),
        (
            "app/main.py",
            "from app.util import shout\ndef run(event):\n    return shout(event['w'])\n",
        ),
        ("app/util.py", "def shout(w):\n    return w.upper() + '!'\n"),
    ]);
    let (status, created) = s
        .call(
            "POST",
            "/functions",
            Some(json!({"name": "pkg", "handler": "app.main.run", "code_archive": archive})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!(created["files"].as_array().unwrap().len(), 3);
    let (status, r) = s.invoke_raw("pkg", "", r#"{"w":"hey"}"#).await;
    assert_eq!((status, r["body"].clone()), (StatusCode::OK, json!("HEY!")));
    let (status, bad) = s
        .call(
            "POST",
            "/functions",
            Some(json!({"name": "pkg2", "code_archive": "!!!"})),
        )
        .await;
    assert_eq!(
        (status, code_of(&bad)),
        (StatusCode::BAD_REQUEST, "invalid_request")
    );
}

async fn records_survive_a_clean_restart(backend: Backend) {
    let mut s = NIMBUS.start(backend).await;
    s.deploy("count", "def handle(e):\n    return e['i']\n", json!({}))
        .await;
    let events: Vec<String> = (0..40).map(|i| format!(r#"{{"i":{i}}}"#)).collect();
    let calls = events.iter().map(|e| s.invoke_raw("count", "", e));
    for (status, _) in futures::future::join_all(calls).await {
        assert_eq!(status, StatusCode::OK);
    }
    s.restart().await;
    let (_, listed) = s
        .call("GET", "/functions/count/invocations?limit=100", None)
        .await;
    assert_eq!(listed["invocations"].as_array().unwrap().len(), 40);
    let (status, r) = s.invoke_raw("count", "", r#"{"i":"after"}"#).await;
    assert_eq!(
        (status, r["body"].clone()),
        (StatusCode::OK, json!("after"))
    );
}

async fn async_invocations_complete(backend: Backend) {
    let s = NIMBUS.start(backend).await;
    s.deploy("bg", "def handle(e):\n    return e['n'] * 2\n", json!({}))
        .await;
    let resp = s
        .auth(s.http.post(s.url("/functions/bg/async")))
        .body(r#"{"n": 21}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let id = resp.json::<Value>().await.unwrap()["request_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, record) = s.call("GET", &format!("/invocations/{id}"), None).await;
        assert_eq!(status, StatusCode::OK, "{record}");
        if record["status"] == "success" {
            assert_eq!(record["output"], 42);
            assert_eq!(record["trigger"], "async");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "async invocation did not finish: {record}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn api_keys_guard_everything_but_health() {
    let s = NIMBUS
        .start_with(Backend::Sqlite, "", &["--api-key", "ci:s3cret"])
        .await;
    let plain = reqwest::Client::new();
    let health = plain
        .get(format!("{}/health", s.base))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    for path in ["/api/v1/functions", "/metrics"] {
        let r = plain.get(format!("{}{path}", s.base)).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{path}");
        let wrong = plain
            .get(format!("{}{path}", s.base))
            .bearer_auth("nope")
            .send()
            .await
            .unwrap();
        assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED, "{path}");
    }
    let (status, _) = s.call("GET", "/functions", None).await;
    assert_eq!(status, StatusCode::OK);
}

#[test]
fn a_public_listener_without_a_key_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_nimbus"))
        .args(["server", "--listen", "0.0.0.0:0", "--data-dir"])
        .arg(dir.path())
        .env_remove("NIMBUS_API_KEYS")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("refusing to listen on 0.0.0.0:0 without an API key"),
        "{stderr}"
    );
}

#[tokio::test]
async fn metrics_and_ops_endpoints() {
    let s = NIMBUS.start(Backend::Sqlite).await;
    s.deploy("m", "def handle(e):\n    return 1\n", json!({}))
        .await;
    s.invoke_raw("m", "", "{}").await;
    s.invoke_raw("m", "", "{}").await;
    let text = s
        .http
        .get(format!("{}/metrics", s.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for needle in [
        r#"nimbus_invocations_total{function="m",runtime="python3.11",status="success"} 2"#,
        r#"nimbus_cold_starts_total{runtime="python3.11",start_type="cold"} 1"#,
        r#"nimbus_pool_instances{runtime="python3.11",state="idle"} 1"#,
        r#"nimbus_invocation_duration_ms_bucket{start_type="warm",le="#,
        r#"nimbus_version_publish_total{function="m"} 1"#,
        r#"nimbus_invocation_by_version_total{function="m",version="1",alias="latest",status="success"} 2"#,
    ] {
        assert!(text.contains(needle), "missing {needle} in\n{text}");
    }
    let ready: Value = s
        .http
        .get(format!("{}/ready", s.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready["status"], "ready");
    let openapi: Value = s
        .http
        .get(s.url("/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    for path in [
        "/api/v1/functions/{id}/invoke",
        "/api/v1/functions/{id}/versions/{n}",
        "/api/v1/functions/{id}/aliases/{name}/rollback",
    ] {
        assert!(openapi["paths"][path].is_object(), "{path} undocumented");
    }
    let r = s.http.get(format!("{}/nope", s.base)).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        code_of(&r.json::<Value>().await.unwrap()),
        "route_not_found"
    );
}

#[tokio::test]
async fn shutdown_waits_for_running_invocations() {
    let mut s = NIMBUS.start(Backend::Sqlite).await;
    s.deploy(
        "slow",
        "import time\ndef handle(e):\n    time.sleep(1)\n    return 'done'\n",
        json!({}),
    )
    .await;
    let resp = s
        .auth(s.http.post(s.url("/functions/slow/async")))
        .body("{}")
        .send()
        .await
        .unwrap();
    let id = resp.json::<Value>().await.unwrap()["request_id"]
        .as_str()
        .unwrap()
        .to_owned();
    tokio::time::sleep(Duration::from_millis(200)).await;
    s.restart().await;
    let (status, record) = s.call("GET", &format!("/invocations/{id}"), None).await;
    assert_eq!(status, StatusCode::OK, "{record}");
    assert_eq!(record["status"], "success", "{record}");
    assert_eq!(record["output"], "done");
}
