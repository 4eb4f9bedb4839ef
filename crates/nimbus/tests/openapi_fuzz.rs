//! The HTTP API against its contract: defects of the API found by fuzzing it, pinned down.

mod common;

use reqwest::StatusCode;
use serde_json::{json, Value};

use common::{code_of, Backend, Server};

/// The secret of the server's one API key (`--api-key fuzz:<secret>`).
const SECRET: &str = "fuzz-3c1d9a7e";

/// Echoes its event and counts calls in its session's state.
const ECHO: &str = "def handle(event, state):\n    state.incr('calls')\n    return event\n";

/// The server under test: API keys on.
async fn server() -> Server {
    Server::start_with(
        Backend::Sqlite,
        "",
        &["--api-key", &format!("fuzz:{SECRET}")],
    )
    .await
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
