//! The nodejs20 runtime end to end: the real server (isolated), Node.js functions deployed
//! and invoked over HTTP, with state and session keys.

mod common;

use common::{Backend, Server};
use reqwest::StatusCode;
use serde_json::{json, Value};

const HELLO: &str = r#"
exports.handle = async (event) => ({ message: `Hello, ${event.name ?? 'world'}!`, node: process.version, uid: process.getuid(), pid: process.pid });
"#;

/// The seed's cart, in JavaScript.
const CART: &str = r#"
exports.handle = async (event, state) => {
  const cart = (await state.get('cart')) ?? [];
  cart.push(event.item_id);
  await state.set('cart', cart, 3600);
  const count = await state.incr('item_count');
  return { cart_size: cart.length, total_items: count };
};
"#;

async fn invoke(s: &Server, function: &str, query: &str, event: Value) -> Value {
    let (status, body) = s.invoke_raw(function, query, &event.to_string()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

#[tokio::test]
async fn a_node_function_deploys_and_runs_in_its_sandbox() {
    let s = Server::start(Backend::Sqlite).await;
    let created = s
        .deploy(
            "hello-node",
            HELLO,
            json!({"runtime": "nodejs20", "handler": "index.handle"}),
        )
        .await;
    assert_eq!(created["runtime"], "nodejs20");
    let r = invoke(&s, "hello-node", "", json!({"name": "Nimbus"})).await;
    assert_eq!(r["body"]["message"], "Hello, Nimbus!", "{r}");
    assert!(
        r["body"]["node"].as_str().unwrap().starts_with("v20."),
        "{r}"
    );
    // Its own pid namespace, where the sandbox's init is PID 1.
    assert_eq!(r["body"]["pid"], 2, "{r}");
    assert_eq!(r["body"]["uid"], 1000, "{r}");
    let again = invoke(&s, "hello-node", "", json!({})).await;
    assert_eq!(again["start_type"], "warm");
    assert_eq!(again["body"]["message"], "Hello, world!");
}

#[tokio::test]
async fn the_cart_in_javascript_keeps_state_per_session() {
    let s = Server::start(Backend::Sqlite).await;
    s.deploy(
        "cart-node",
        CART,
        json!({"runtime": "nodejs20", "handler": "index.handle", "state_config": {"enabled": true}}),
    )
    .await;
    let a = invoke(
        &s,
        "cart-node",
        "?session_key=alice",
        json!({"item_id": "book"}),
    )
    .await;
    assert_eq!(a["body"], json!({"cart_size": 1, "total_items": 1}), "{a}");
    let a = invoke(
        &s,
        "cart-node",
        "?session_key=alice",
        json!({"item_id": "pen"}),
    )
    .await;
    assert_eq!(a["body"], json!({"cart_size": 2, "total_items": 2}));
    let b = invoke(
        &s,
        "cart-node",
        "?session_key=bob",
        json!({"item_id": "mug"}),
    )
    .await;
    assert_eq!(b["body"], json!({"cart_size": 1, "total_items": 1}));
    let (status, state) = s
        .call("GET", "/functions/cart-node/state/alice?values=true", None)
        .await;
    assert_eq!(status, StatusCode::OK, "{state}");
    assert_eq!(state["keys"][0]["value"], json!(["book", "pen"]), "{state}");
}

#[tokio::test]
async fn a_node_function_that_throws_reports_name_message_and_stack() {
    let s = Server::start(Backend::Sqlite).await;
    s.deploy(
        "throws-node",
        "exports.handle = () => { throw new RangeError('out of range'); };\n",
        json!({"runtime": "nodejs20", "handler": "index.handle"}),
    )
    .await;
    let (status, body) = s.invoke_raw("throws-node", "", "{}").await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
    assert_eq!(body["error"]["code"], "function_error");
    assert_eq!(body["error"]["type"], "RangeError");
    assert!(
        body["error"]["traceback"]
            .as_str()
            .unwrap()
            .contains("index.js"),
        "{body}"
    );
}

#[tokio::test]
async fn with_snapshots_on_a_node_function_starts_cold_and_builds_no_snapshot() {
    let s = Server::start_with(Backend::Sqlite, "", &["--snapshots"]).await;
    s.deploy(
        "plain-node",
        HELLO,
        json!({"runtime": "nodejs20", "handler": "index.handle"}),
    )
    .await;
    let r = invoke(&s, "plain-node", "", json!({})).await;
    assert_eq!(r["start_type"], "cold", "{r}");
    let (status, body) = s
        .call(
            "POST",
            "/functions/plain-node/snapshots",
            Some(json!({"wait": true})),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["error"]["code"], "snapshots_unsupported");
    let (_, list) = s.call("GET", "/functions/plain-node/snapshots", None).await;
    assert_eq!(list["snapshots"], json!([]), "{list}");
}

#[tokio::test]
async fn the_node_examples_deploy_and_run_from_the_cli_as_documented() {
    let s = Server::start(Backend::Sqlite).await;
    let example = |name: &str| format!("{}/../../examples/node/{name}", env!("CARGO_MANIFEST_DIR"));
    let node = ["--runtime", "nodejs20", "--handler", "index.handle"];

    let hello = example("hello/index.js");
    s.cli(&[&["deploy", &hello, "--name", "hello-js"][..], &node].concat())
        .await;
    let out = s
        .cli(&[
            "invoke",
            "hello-js",
            "--data",
            r#"{"name": "Nimbus"}"#,
            "--output",
            "json",
        ])
        .await;
    let r: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["body"]["message"], "Hello, Nimbus!", "{out}");

    let counter = example("counter/index.js");
    s.cli(
        &[
            &["deploy", &counter, "--name", "counter-js", "--state"][..],
            &node,
        ]
        .concat(),
    )
    .await;
    let out = s.cli(&["invoke", "counter-js"]).await;
    assert!(out.contains(r#""count": 1"#), "{out}");
    let out = s
        .cli(&["invoke", "counter-js", "--data", r#"{"by": 5}"#])
        .await;
    assert!(out.contains(r#""count": 6"#), "{out}");

    // A directory: deployed as an archive; index.mjs is an ES module.
    let cart = example("cart");
    let flags = ["--name", "cart-js", "--state", "--session-affinity", "on"];
    s.cli(&[&["deploy", &cart][..], &flags, &node].concat())
        .await;
    let book = r#"{"item_id": "book"}"#;
    let pen = r#"{"item_id": "pen"}"#;
    s.cli(&["invoke", "cart-js", "--session", "alice", "--data", book])
        .await;
    let out = s
        .cli(&["invoke", "cart-js", "--session", "alice", "--data", pen])
        .await;
    assert!(out.contains(r#""cart_size": 2"#), "{out}");
    let out = s
        .cli(&["invoke", "cart-js", "--session", "bob", "--data", book])
        .await;
    assert!(out.contains(r#""cart_size": 1"#), "{out}");
}
