//! The OpenAPI document (`crates/nimbus-api/openapi.json`) as the contract of the real
//! server. openapi-spec-validator checks that it is valid OpenAPI 3.0; schemathesis (both
//! installed by `scripts/ensure-services.sh` into `target/schemathesis`) fuzzes every documented operation of the real binary, API keys on,
//! with all its checks: no server errors, documented status codes, response bodies and
//! headers against their schemas, content types, schema-valid requests accepted (within the
//! rules `tests/fuzz/hooks.py` lists) and invalid ones refused, authentication required,
//! methods the document does not list refused. Positive and negative cases, from a fixed
//! seed, after deploying fixtures so invocations, versions, aliases, sessions, snapshots and
//! records have something to hit (`tests/fuzz/schemathesis.toml`).
//!
//! A second run against a copy of the document with one response field left out must fail,
//! so a harness that checks nothing cannot pass; and the refusals the hooks excuse are
//! excused only for requests that break their rule (judged on cases that keep and break
//! each one). The tests at the end pin down defects the
//! fuzzer found.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Instant;

use reqwest::StatusCode;
use serde_json::{json, Value};

use nimbus_testkit::server::{code_of, Backend, Nimbus, Server};

/// The binary under test.
const NIMBUS: Nimbus = Nimbus::at(env!("CARGO_BIN_EXE_nimbus"));

/// The secret of the server's one API key (`--api-key fuzz:<secret>`).
const SECRET: &str = "fuzz-3c1d9a7e";
const DOCUMENT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../nimbus-api/openapi.json");
const HOOKS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fuzz/hooks.py");
const SETTINGS: &str = include_str!("fuzz/schemathesis.toml");
/// Cases per operation and phase: about a minute for the whole run on two cores.
const MAX_EXAMPLES: u32 = 40;

/// Echoes its event and counts calls in its session's and its own state.
const ECHO: &str = "def handle(event, state):\n    state.incr('calls')\n    return event\n";
const ECHO_2: &str = "def handle(event, state):\n    state.incr('calls')\n    state.function().incr('calls')\n    return event\n";
/// Fails every invocation, so failed answers and records meet the document too.
const FAILING: &str = "def handle(event):\n    raise RuntimeError('fails on purpose')\n";

/// `name` from `target/schemathesis/bin` of this workspace (or `$NIMBUS_FUZZ_TOOLS`), where
/// `scripts/ensure-services.sh` installs schemathesis and openapi-spec-validator.
fn tool(name: &str) -> PathBuf {
    let dir = std::env::var_os("NIMBUS_FUZZ_TOOLS").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/schemathesis/bin"),
        PathBuf::from,
    );
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} not found: run scripts/ensure-services.sh (it installs it there), or point \
         NIMBUS_FUZZ_TOOLS at a directory holding schemathesis and openapi-spec-validator",
        path.display()
    );
    path
}

/// The server under test: API keys on (so authentication is part of what is checked) and
/// snapshots on (so snapshot answers have rows to show).
async fn server() -> Server {
    NIMBUS
        .start_with(
            Backend::Sqlite,
            "",
            &["--snapshots", "--api-key", &format!("fuzz:{SECRET}")],
        )
        .await
}

/// What the fuzzer is pointed at: the placeholders of `tests/fuzz/schemathesis.toml`.
struct Fixtures(Vec<(&'static str, String)>);

async fn deploy_fixtures(s: &Server) -> Fixtures {
    let echo = s
        .deploy(
            "fuzz-echo",
            ECHO,
            json!({"state_config": {"enabled": true}}),
        )
        .await;
    let (status, body) = s
        .call(
            "PUT",
            "/functions/fuzz-echo",
            Some(json!({ "code": ECHO_2 })),
        )
        .await;
    assert_eq!(body["published_version"], 2, "{status} {body}");
    let canary = json!({"weights": [{"version": 1, "weight": 50}, {"version": 2, "weight": 50}]});
    let (status, body) = s
        .call(
            "POST",
            "/functions/fuzz-echo/aliases",
            Some(json!({"name": "canary", "routing_config": canary})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    s.deploy("fuzz-fail", FAILING, json!({})).await;
    s.deploy("fuzz-doomed", FAILING, json!({})).await;

    let (status, ok) = s
        .invoke_raw("fuzz-echo", "?session_key=s1", r#"{"hello": 1}"#)
        .await;
    assert_eq!(status, StatusCode::OK, "{ok}");
    let (status, failed) = s.invoke_raw("fuzz-fail", "", "{}").await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{failed}");
    let (status, snapshot) = s
        .call(
            "POST",
            "/functions/fuzz-echo/snapshots",
            Some(json!({"wait": true})),
        )
        .await;
    assert!(status.is_success(), "{status} {snapshot}");

    let text = |v: &Value| v.as_str().unwrap().to_owned();
    Fixtures(vec![
        ("FUNCTION", "fuzz-echo".into()),
        ("FUNCTION_ID", echo.function.id.clone()),
        ("FAILING", "fuzz-fail".into()),
        ("DOOMED", "fuzz-doomed".into()),
        ("SESSION", "s1".into()),
        ("SNAPSHOT", text(&snapshot["id"])),
        ("REQUEST", text(&ok["request_id"])),
        ("FAILED_REQUEST", text(&failed["request_id"])),
    ])
}

/// What a schemathesis run ended with.
struct Run {
    passed: bool,
    output: String,
}

/// Runs `schemathesis run` on `document` against `s` with every check (positive data
/// acceptance as `hooks.py` refines it) and the settings filled in with `fixtures`.
async fn fuzz(s: &Server, document: &str, fixtures: &Fixtures, only: &[&str]) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = SETTINGS
        .replace("@HOOKS@", HOOKS)
        .replace("@KEY@", SECRET)
        .replace("@MAX_EXAMPLES@", &MAX_EXAMPLES.to_string());
    for (name, value) in &fixtures.0 {
        settings = settings.replace(&format!("@{name}@"), value);
    }
    let left = regex::Regex::new("@[A-Z_]+@").unwrap();
    assert!(
        !left.is_match(&settings),
        "a placeholder is left:\n{settings}"
    );
    let config = dir.path().join("schemathesis.toml");
    std::fs::write(&config, settings).unwrap();

    let mut command = tokio::process::Command::new(tool("schemathesis"));
    command
        .arg("--config-file")
        .arg(&config)
        .args(["run", document, "--url", &s.base])
        .args([
            "--checks",
            "all",
            "--exclude-checks",
            "positive_data_acceptance",
        ])
        .arg("--no-color")
        // Whatever it leaves behind stays in the temporary directory.
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    for operation in only {
        command.args(["--include-operation-id", operation]);
    }
    let started = Instant::now();
    let out = command.output().await.expect("schemathesis runs");
    let output = format!(
        "{}{}\n(schemathesis ran {:.0?})",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        started.elapsed()
    );
    Run {
        passed: out.status.success(),
        output,
    }
}

/// The document is valid OpenAPI 3.0, which schemathesis does not check.
#[test]
fn the_document_is_valid_openapi() {
    let out = std::process::Command::new(tool("openapi-spec-validator"))
        .arg(DOCUMENT)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn the_server_keeps_the_contract_of_its_openapi_document() {
    let s = server().await;
    let fixtures = deploy_fixtures(&s).await;
    // The document fuzzed is the one the server serves.
    let served: Value = s
        .auth(s.http.get(s.url("/openapi.json")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let file: Value = serde_json::from_str(&std::fs::read_to_string(DOCUMENT).unwrap()).unwrap();
    assert_eq!(served, file);

    let run = fuzz(&s, DOCUMENT, &fixtures, &[]).await;
    assert!(
        run.passed,
        "the server breaks its OpenAPI document:\n{}",
        run.output
    );
    println!("{}", run.output);
}

/// The harness must be able to fail: with `code_size` left out of the documented function
/// (whose objects admit no other fields), every answer carrying a function breaks it.
#[tokio::test]
async fn a_document_that_misdescribes_an_answer_fails_the_run() {
    let s = server().await;
    let fixtures = deploy_fixtures(&s).await;
    let mut doc: Value = serde_json::from_str(&std::fs::read_to_string(DOCUMENT).unwrap()).unwrap();
    let function = &mut doc["components"]["schemas"]["Function"];
    function["properties"]
        .as_object_mut()
        .unwrap()
        .remove("code_size")
        .expect("Function documents code_size");
    let required = function["required"].as_array_mut().unwrap();
    required.retain(|f| f != "code_size");
    let dir = tempfile::tempdir().unwrap();
    let planted = dir.path().join("openapi.json");
    std::fs::write(&planted, doc.to_string()).unwrap();

    let run = fuzz(&s, planted.to_str().unwrap(), &fixtures, &["getFunction"]).await;
    assert!(
        !run.passed,
        "a misdescribed answer went unnoticed:\n{}",
        run.output
    );
    assert!(
        run.output.contains("Response violates schema") && run.output.contains("code_size"),
        "{}",
        run.output
    );
}

/// Judges refusals as `hooks.py` does for the fuzz run, against the real server: each case is
/// an operation, a body, the error the server would give, and whether a schema-valid request
/// may get it. Run by the venv's Python with the hooks imported.
const HOOKS_CASES: &str = r#"
import base64, io, json, sys, types, zipfile
import hooks

base, secret = sys.argv[1], sys.argv[2]
f = base + "/api/v1/functions/f"

def zip_of(name):
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        z.writestr(name, "def handle(event):\n    return event\n")
    return base64.b64encode(out.getvalue()).decode()

class Answer:
    def __init__(self, url, code, field):
        self.request = types.SimpleNamespace(url=url, headers={"Authorization": "Bearer " + secret})
        self.error = {"code": code, "field": field}
    def json(self):
        return {"error": self.error}

GOOD = "def handle(event):\n    return event\n"
CASES = [
    # (operation, url, body, error code, field, allowed)
    ("updateFunction", f, {"memory_mb": 128}, "function_init_failed", None, False),
    ("updateFunction", f, {"code": GOOD, "handler": "app.handle"}, "function_init_failed", None, False),
    ("updateFunction", f, {"code": "x = ("}, "function_init_failed", None, True),
    ("updateFunction", f, {"handler": "handler.run"}, "function_init_failed", None, True),
    ("createFunction", base + "/api/v1/functions", {"name": "g", "code": GOOD, "handler": "json.handle"}, "function_init_failed", None, True),
    ("createFunction", base + "/api/v1/functions", {"name": "g", "code_archive": zip_of("handler.py")}, "validation_error", "code_archive", False),
    ("createFunction", base + "/api/v1/functions", {"name": "g", "code_archive": "bm90IGFuIGFyY2hpdmU="}, "validation_error", "code_archive", True),
    ("createFunction", base + "/api/v1/functions", {"name": "g", "code_archive": zip_of("handler.py")}, "validation_error", "handler", False),
    ("createFunction", base + "/api/v1/functions", {"name": "g", "code_archive": zip_of("main.py")}, "validation_error", "handler", True),
    ("updateFunction", f, {"handler": "handler.handle", "memory_mb": 128}, "validation_error", "handler", False),
    ("updateFunction", f, {"handler": "app.handle", "code": GOOD}, "validation_error", "handler", False),
    ("updateFunction", f, {"handler": "app.handle"}, "validation_error", "handler", True),
    ("updateFunction", f, {"runtime": "nodejs20"}, "validation_error", "handler", True),
    ("createAlias", f + "/aliases", {"name": "a", "routing_config": {"weights": [{"version": 1, "weight": 100}]}}, "validation_error", "routing_config.weights", False),
    ("updateAlias", f + "/aliases/latest", {"routing_config": {"weights": [{"version": 1, "weight": 100}]}}, "validation_error", "routing_config.weights", False),
    ("createAlias", f + "/aliases", {"name": "a", "routing_config": {"weights": [{"version": 2, "weight": 100}]}}, "validation_error", "routing_config.weights", True),
    ("createAlias", f + "/aliases", {"name": "a", "routing_config": {"weights": [{"version": 1, "weight": 90}]}}, "validation_error", "routing_config.weights", True),
    ("createAlias", f + "/aliases", {"name": "a", "routing_config": {"weights": [{"version": 1, "weight": 50}, {"version": 1, "weight": 50}]}}, "validation_error", "routing_config.weights", True),
    ("publishVersion", f + "/versions", {"publish_alias": "latest"}, "validation_error", "publish_alias", False),
    ("publishVersion", f + "/versions", {"publish_alias": "nope"}, "validation_error", "publish_alias", True),
    ("rollbackAlias", f + "/aliases/latest/rollback", {"to_version": 1}, "validation_error", "to_version", False),
    ("rollbackAlias", f + "/aliases/latest/rollback", {"to_version": 5}, "validation_error", "to_version", True),
]
wrong = []
for operation, url, body, code, field, allowed in CASES:
    case = types.SimpleNamespace(
        body=body,
        operation=types.SimpleNamespace(definition=types.SimpleNamespace(raw={"operationId": operation})),
    )
    if hooks.allowed_by_rule(case, Answer(url, code, field)) != allowed:
        wrong.append((operation, body, code, field, "allowed" if not allowed else "refused"))
print("\n".join(json.dumps(w) for w in wrong))
sys.exit(1 if wrong else 0)
"#;

/// The hooks excuse a 400 under one of the rules JSON Schema cannot state only for a request
/// that breaks that rule (asking the server where it depends on what is stored), so a wrong
/// refusal under those codes fails the run like any other.
#[tokio::test]
async fn the_hooks_excuse_a_refusal_only_for_a_request_that_breaks_its_rule() {
    let s = server().await;
    s.deploy("f", "def handle(event):\n    return event\n", json!({}))
        .await;
    let dir = tempfile::tempdir().unwrap();
    let out = tokio::process::Command::new(tool("python"))
        .args(["-c", HOOKS_CASES, &s.base, SECRET])
        .env("PYTHONPATH", PathBuf::from(HOOKS).parent().unwrap())
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "cases the hooks judge wrongly (operation, body, error, field, what they did):\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Found by the fuzzer: a session key given both as `session_key` and in the
/// `X-Nimbus-Session-Key` header was used from the query alone, the header's dropped
/// unchecked (even `_global`, which no session may be); and an empty `session_key` hid the
/// header's key.
#[tokio::test]
async fn a_session_key_given_twice_must_agree() {
    let s = server().await;
    s.deploy("echo", ECHO, json!({"state_config": {"enabled": true}}))
        .await;
    for (query, header) in [
        ("?session_key=alice", "_global"),
        ("?session_key=alice", "bob"),
    ] {
        let (status, body) = invoke_with_header(&s, query, header).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query} {header}: {body}");
        assert_eq!(code_of(&body), "invalid_request", "{body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("X-Nimbus-Session-Key"),
            "{body}"
        );
    }
    let (status, body) = invoke_with_header(&s, "?session_key=alice", "alice").await;
    assert_eq!(
        (status, &body["session_key"]),
        (StatusCode::OK, &json!("alice")),
        "{body}"
    );
    let (status, body) = invoke_with_header(&s, "?session_key=", "bob").await;
    assert_eq!(
        (status, &body["session_key"]),
        (StatusCode::OK, &json!("bob")),
        "{body}"
    );
}

async fn invoke_with_header(s: &Server, query: &str, header: &str) -> (StatusCode, Value) {
    let req = s
        .http
        .post(s.url(&format!("/functions/echo/invoke{query}")))
        .header("X-Nimbus-Session-Key", header)
        .body("{}");
    let resp = s.auth(req).send().await.unwrap();
    (resp.status(), resp.json().await.unwrap())
}
