//! Stateful functions end to end (SPEC §7): the real server, real Python workers, the state
//! API over the worker connection, on the embedded store and on the real Redis
//! (127.0.0.1:6379), and the admin API of sessions and state.

#[path = "../../nimbus-state/tests/common/mod.rs"]
mod private_redis;

use std::time::Duration;

use nimbus_testkit::server::{code_of, Backend, Nimbus, Server};
use private_redis::RedisServer;
use reqwest::StatusCode;
use serde_json::{json, Value};

/// The binary under test.
const NIMBUS: Nimbus = Nimbus::at(env!("CARGO_BIN_EXE_nimbus"));

/// Where the function's state lives.
#[derive(Clone, Copy, Debug)]
enum StateBackend {
    Embedded,
    Redis,
}

/// A server whose functions keep their state in `backend`; its queue takes the 200
/// concurrent invocations of the counting test.
async fn server(backend: StateBackend) -> Server {
    let toml = "queue_depth = 500\n";
    match backend {
        StateBackend::Embedded => NIMBUS.start_with(Backend::Sqlite, toml, &[]).await,
        StateBackend::Redis => {
            NIMBUS
                .start_with(
                    Backend::Sqlite,
                    toml,
                    &["--state-url", "redis://127.0.0.1:6379"],
                )
                .await
        }
    }
}

/// The seed's cart example, as written.
const CART: &str = include_str!("../../../examples/cart/handler.py");

/// Every operation of the API, driven by the event.
const OPS: &str = r#"
import nimbus

def handle(event, state):
    op = event["op"]
    args = event.get("args", [])
    try:
        scope = {"session": lambda: state, "function": state.function,
                 "invocation": state.invocation}[event.get("scope", "session")]()
        if op == "script":
            out = []
            for step in event["steps"]:
                out.append(getattr(scope, step[0])(*step[1:]))
            return {"ok": out}
        result = getattr(scope, op)(*args)
        return {"ok": list(result) if isinstance(result, tuple) else result}
    except nimbus.StateConflict as e:
        return {"error": e.code, "current_version": e.current_version, "message": str(e)}
    except nimbus.StateError as e:
        return {"error": e.code, "type": type(e).__name__, "message": str(e)}
"#;

async fn invoke(s: &Server, function: &str, session: Option<&str>, event: Value) -> Value {
    let query = session.map_or(String::new(), |k| format!("?session_key={k}"));
    let (status, body) = s.invoke_raw(function, &query, &event.to_string()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

async fn op(s: &Server, session: Option<&str>, event: Value) -> Value {
    invoke(s, "ops", session, event).await["body"].clone()
}

async fn the_seed_cart_runs_as_written_per_session(backend: StateBackend) {
    let s = server(backend).await;
    s.deploy("cart", CART, json!({"state_config": {"enabled": true}}))
        .await;
    let first = invoke(&s, "cart", Some("alice"), json!({"item_id": "book"})).await;
    assert_eq!(
        first["body"],
        json!({"cart_size": 1, "total_items": 1}),
        "{first}"
    );
    assert_eq!(first["session_key"], "alice");
    let second = invoke(&s, "cart", Some("alice"), json!({"item_id": "pen"})).await;
    assert_eq!(second["body"], json!({"cart_size": 2, "total_items": 2}));
    let bob = invoke(&s, "cart", Some("bob"), json!({"item_id": "mug"})).await;
    assert_eq!(bob["body"], json!({"cart_size": 1, "total_items": 1}));
    // Without a session key: the `_default` session.
    let anon = invoke(&s, "cart", None, json!({"item_id": "cup"})).await;
    assert_eq!(anon["body"], json!({"cart_size": 1, "total_items": 1}));

    let (status, state) = s
        .call("GET", "/functions/cart/state/alice?values=true", None)
        .await;
    assert_eq!(status, StatusCode::OK, "{state}");
    assert_eq!(state["scope"], "session");
    let keys = state["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 2, "{state}");
    let cart = keys.iter().find(|k| k["key"] == "cart").unwrap();
    assert_eq!(cart["value"], json!(["book", "pen"]));
    assert_eq!(cart["size"], 14);
    let ttl = cart["ttl_ms"].as_u64().unwrap();
    assert!(ttl > 3_500_000 && ttl <= 3_600_000, "{cart}");
    let count = keys.iter().find(|k| k["key"] == "item_count").unwrap();
    assert_eq!(count["value"], 2);
    assert!(count["ttl_ms"].is_null(), "{count}");
    assert_eq!(state["total_size"], 15);

    // Deleting one key, then the session.
    let (status, body) = s
        .call("DELETE", "/functions/cart/state/alice?key=cart", None)
        .await;
    assert_eq!(
        (status, &body["deleted"]),
        (StatusCode::OK, &json!(1)),
        "{body}"
    );
    let (status, body) = s
        .call("DELETE", "/functions/cart/state/alice?key=cart", None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(code_of(&body), "state_key_not_found");
    let again = invoke(&s, "cart", Some("alice"), json!({"item_id": "ink"})).await;
    assert_eq!(again["body"], json!({"cart_size": 1, "total_items": 3}));
}

async fn two_hundred_concurrent_increments_count_exactly_two_hundred(backend: StateBackend) {
    let s = server(backend).await;
    s.deploy(
        "ops",
        OPS,
        json!({"state_config": {"enabled": true}, "max_instances": 8}),
    )
    .await;
    let event = json!({"op": "incr", "scope": "function", "args": ["n"]}).to_string();
    let calls = (0..200).map(|i| {
        let s = &s;
        let event = event.clone();
        async move {
            let session = format!("?session_key=s{i}");
            s.invoke_raw("ops", &session, &event).await
        }
    });
    let results = futures::future::join_all(calls).await;
    let mut seen: Vec<i64> = results
        .iter()
        .map(|(status, body)| {
            assert_eq!(*status, StatusCode::OK, "{body}");
            body["body"]["ok"].as_i64().unwrap()
        })
        .collect();
    seen.sort_unstable();
    assert_eq!(seen, (1..=200).collect::<Vec<_>>(), "every count once");
    let body = op(
        &s,
        None,
        json!({"op": "get", "scope": "function", "args": ["n"]}),
    )
    .await;
    assert_eq!(body["ok"], 200);
}

async fn optimistic_read_modify_write_loops_lose_no_update(backend: StateBackend) {
    let s = server(backend).await;
    let code = r#"
import nimbus

def handle(event, state):
    shared = state.function()
    conflicts = 0
    while True:
        value, version = shared.get_with_version("total")
        try:
            shared.set_with_version("total", (value or 0) + 1, version)
            return {"conflicts": conflicts}
        except nimbus.StateConflict as e:
            assert e.current_version != version
            conflicts += 1
"#;
    s.deploy(
        "rmw",
        code,
        json!({"state_config": {"enabled": true}, "max_instances": 8}),
    )
    .await;
    let calls = (0..50).map(|_| s.invoke_raw("rmw", "", "{}"));
    let results = futures::future::join_all(calls).await;
    let conflicts: i64 = results
        .iter()
        .map(|(status, body)| {
            assert_eq!(*status, StatusCode::OK, "{body}");
            body["body"]["conflicts"].as_i64().unwrap()
        })
        .sum();
    let (_, state) = s
        .call("GET", "/functions/rmw/state/_global?values=true", None)
        .await;
    assert_eq!(state["scope"], "function", "{state}");
    assert_eq!(
        state["keys"][0]["value"], 50,
        "{state} ({conflicts} conflicts)"
    );
}

async fn every_operation_versions_and_scopes(backend: StateBackend) {
    let s = server(backend).await;
    s.deploy("ops", OPS, json!({"state_config": {"enabled": true}}))
        .await;
    let steps = json!({"op": "script", "steps": [
        ["set", "a", {"x": [1, "ü", null]}],
        ["get", "a"],
        ["exists", "a"],
        ["exists", "nope"],
        ["get", "nope", "fallback"],
        ["incr", "n"],
        ["incr", "n", 10],
        ["decr", "n", 4],
        ["keys"],
        ["keys", "?"],
        ["get_with_version", "a"],
        ["get_with_version", "nope"],
        ["delete", "a"],
        ["delete", "a"],
        ["keys", "*"],
        ["set", "nothing", null],
        ["get_with_version", "nothing"],
        ["exists", "nothing"]
    ]});
    let out = op(&s, Some("u1"), steps).await["ok"].clone();
    assert_eq!(out[1], json!({"x": [1, "ü", null]}));
    assert_eq!(out[2], true);
    assert_eq!(out[3], false);
    assert_eq!(out[4], "fallback");
    assert_eq!(
        (&out[5], &out[6], &out[7]),
        (&json!(1), &json!(11), &json!(7))
    );
    assert_eq!(out[8], json!(["a", "n"]));
    assert_eq!(out[9], json!(["a", "n"]));
    let version = out[10][1].as_u64().unwrap();
    assert!(
        version >= 1 && out[10][0] == json!({"x": [1, "ü", null]}),
        "{out}"
    );
    assert_eq!(out[11], json!([null, 0]));
    assert_eq!((&out[12], &out[13]), (&json!(true), &json!(false)));
    assert_eq!(out[14], json!(["n"]));
    // A stored JSON null is a value like any other.
    assert_eq!(out[16][0], Value::Null);
    assert!(out[16][1].as_u64().unwrap() > 0, "{out}");
    assert_eq!(out[17], true);

    // Optimistic writes: the version from a read, a stale one, 0 for "only if absent".
    let v1 = op(&s, Some("u1"), json!({"op": "set", "args": ["k", 1]})).await["ok"].clone();
    let v2 = op(
        &s,
        Some("u1"),
        json!({"op": "set_with_version", "args": ["k", 2, v1]}),
    )
    .await;
    assert!(v2["ok"].as_u64().unwrap() > v1.as_u64().unwrap(), "{v2}");
    let stale = op(
        &s,
        Some("u1"),
        json!({"op": "set_with_version", "args": ["k", 3, v1]}),
    )
    .await;
    assert_eq!(stale["error"], "state_conflict", "{stale}");
    assert_eq!(stale["current_version"], v2["ok"]);
    let create = op(
        &s,
        Some("u1"),
        json!({"op": "set_with_version", "args": ["fresh", 1, 0]}),
    )
    .await;
    assert!(create["ok"].as_u64().is_some(), "{create}");
    let again = op(
        &s,
        Some("u1"),
        json!({"op": "set_with_version", "args": ["fresh", 1, 0]}),
    )
    .await;
    assert_eq!(again["error"], "state_conflict", "{again}");
    assert_eq!(again["current_version"], create["ok"]);

    // Scopes: the session's, another session's, the function's, the invocation's.
    assert_eq!(
        op(&s, Some("u2"), json!({"op": "get", "args": ["k"]})).await["ok"],
        Value::Null
    );
    assert_eq!(
        op(&s, Some("u1"), json!({"op": "get", "args": ["k"]})).await["ok"],
        2
    );
    assert_eq!(
        op(
            &s,
            None,
            json!({"op": "get", "scope": "function", "args": ["k"]})
        )
        .await["ok"],
        Value::Null
    );
    let within = op(
        &s,
        None,
        json!({"op": "script", "scope": "invocation", "steps": [
            ["set", "tmp", 5], ["incr", "tmp"], ["get", "tmp"], ["keys"]
        ]}),
    )
    .await;
    assert_eq!(within["ok"][2], 6, "{within}");
    assert_eq!(within["ok"][3], json!(["tmp"]));
    let next = op(
        &s,
        None,
        json!({"op": "get", "scope": "invocation", "args": ["tmp"]}),
    )
    .await;
    assert_eq!(
        next["ok"],
        Value::Null,
        "the invocation scope ends with the invocation"
    );

    // incr of something that is not an integer.
    let bad = op(
        &s,
        Some("u1"),
        json!({"op": "script", "steps": [
            ["set", "word", "seven"], ["incr", "word"]
        ]}),
    )
    .await;
    assert_eq!(bad["error"], "not_an_integer", "{bad}");
    // A delta past 64 bits never leaves the worker, and the instance serves on.
    let huge = op(
        &s,
        Some("u1"),
        json!({"op": "incr", "args": ["n", 9_223_372_036_854_775_808u64]}),
    )
    .await;
    assert_eq!(huge["error"], "not_an_integer", "{huge}");
    assert_eq!(
        op(&s, Some("u1"), json!({"op": "get", "args": ["n"]})).await["ok"],
        7
    );
}

async fn limits_are_enforced_with_typed_errors_and_nothing_written(backend: StateBackend) {
    let s = server(backend).await;
    s.deploy(
        "ops",
        OPS,
        json!({"state_config": {"enabled": true, "max_state_size": 100, "max_keys": 3}}),
    )
    .await;
    // Value over max_state_size (100 bytes of JSON).
    let big = "x".repeat(120);
    let r = op(
        &s,
        Some("l"),
        json!({"op": "script", "steps": [
            ["set", "v", "small"], ["set", "v", big]
        ]}),
    )
    .await;
    assert_eq!(r["error"], "value_too_large", "{r}");
    assert_eq!(r["type"], "StateValueTooLarge");
    assert!(r["message"].as_str().unwrap().contains("100"), "{r}");
    assert_eq!(
        op(&s, Some("l"), json!({"op": "get", "args": ["v"]})).await["ok"],
        "small"
    );
    // Key over 256 bytes.
    let long = "k".repeat(257);
    let r = op(&s, Some("l"), json!({"op": "set", "args": [long, 1]})).await;
    assert_eq!(r["error"], "key_too_long", "{r}");
    assert_eq!(r["type"], "StateKeyTooLong");
    // More than max_keys keys: the fourth new key is refused; updating one is fine.
    let r = op(
        &s,
        Some("l"),
        json!({"op": "script", "steps": [
            ["set", "b", 1], ["set", "c", 1], ["set", "v", "update"], ["set", "d", 1]
        ]}),
    )
    .await;
    assert_eq!(r["error"], "too_many_keys", "{r}");
    assert_eq!(r["type"], "StateTooManyKeys");
    let keys = op(&s, Some("l"), json!({"op": "keys"})).await;
    assert_eq!(keys["ok"], json!(["b", "c", "v"]));
    assert_eq!(
        op(&s, Some("l"), json!({"op": "get", "args": ["v"]})).await["ok"],
        "update"
    );
}

async fn ttls_expire_and_default_ttl_applies(backend: StateBackend) {
    let s = server(backend).await;
    s.deploy(
        "ops",
        OPS,
        json!({"state_config": {"enabled": true, "default_ttl": 1}}),
    )
    .await;
    let r = op(
        &s,
        Some("t"),
        json!({"op": "script", "steps": [
            ["set", "short", 1, 1],
            ["set", "defaulted", 1],
            ["set", "long", 1, 3600],
            ["incr", "counter"]
        ]}),
    )
    .await;
    assert!(r["ok"].is_array(), "{r}");
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let r = op(
        &s,
        Some("t"),
        json!({"op": "script", "steps": [
            ["get", "short"], ["exists", "defaulted"], ["get", "long"], ["get", "counter"], ["keys"]
        ]}),
    )
    .await;
    assert_eq!(r["ok"], json!([null, false, 1, null, ["long"]]), "{r}");
}

async fn a_function_without_state_gets_a_clear_error(backend: StateBackend) {
    let s = server(backend).await;
    s.deploy("ops", OPS, json!({})).await;
    let r = op(&s, None, json!({"op": "get", "args": ["k"]})).await;
    assert_eq!(r["error"], "state_not_enabled", "{r}");
    assert!(
        r["message"].as_str().unwrap().contains("state_config"),
        "{r}"
    );
    // Enabling it publishes a new version whose instances have state.
    let (status, body) = s
        .call(
            "PUT",
            "/functions/ops",
            Some(json!({"state_config": {"enabled": true, "max_keys": 5}})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["state_config"]["enabled"], true, "{body}");
    assert_eq!(body["state_config"]["max_keys"], 5);
    assert_eq!(body["state_config"]["max_state_size"], 65536);
    let r = op(&s, None, json!({"op": "incr", "args": ["k"]})).await;
    assert_eq!(r["ok"], 1, "{r}");
    // Out-of-range configuration is refused, naming the field.
    let (status, body) = s
        .call(
            "PUT",
            "/functions/ops",
            Some(json!({"state_config": {"max_keys": 0}})),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("state_config.max_keys"),
        "{body}"
    );
}

async fn sessions_and_state_admin_answers(backend: StateBackend) {
    let s = server(backend).await;
    s.deploy("cart", CART, json!({"state_config": {"enabled": true}}))
        .await;
    let served = invoke(&s, "cart", Some("carol"), json!({"item_id": "a"})).await;
    // The session is recorded behind the invocation.
    let mut listed = Value::Null;
    for _ in 0..50 {
        let (status, body) = s.call("GET", "/functions/cart/sessions", None).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        if body["sessions"].as_array().is_some_and(|l| !l.is_empty()) {
            listed = body;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let session = &listed["sessions"][0];
    assert_eq!(session["session_key"], "carol", "{listed}");
    assert_eq!(session["instance_id"], served["instance_id"], "{listed}");
    let (status, body) = s.call("GET", "/functions/cart/sessions/carol", None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let keys: Vec<&str> = body["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["key"].as_str().unwrap())
        .collect();
    assert_eq!(keys, ["cart", "item_count"], "{body}");
    let (status, body) = s.call("GET", "/functions/cart/sessions/nobody", None).await;
    assert_eq!(
        (status, code_of(&body)),
        (StatusCode::NOT_FOUND, "session_not_found")
    );
    let (status, body) = s.call("GET", "/functions/cart/state/nobody", None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["keys"], json!([]));
    let (status, body) = s.call("GET", "/functions/missing/state/x", None).await;
    assert_eq!(
        (status, code_of(&body)),
        (StatusCode::NOT_FOUND, "function_not_found")
    );
    let long = "s".repeat(257);
    let (status, body) = s
        .invoke_raw(
            "cart",
            &format!("?session_key={long}"),
            r#"{"item_id":"a"}"#,
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, body) = s
        .invoke_raw("cart", "?session_key=_global", r#"{"item_id":"a"}"#)
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("_global"),
        "{body}"
    );
    // Clearing a session's state, then the session.
    let (status, body) = s.call("DELETE", "/functions/cart/state/carol", None).await;
    assert_eq!(
        (status, &body["deleted"]),
        (StatusCode::OK, &json!(2)),
        "{body}"
    );
    let (status, _) = s
        .call("DELETE", "/functions/cart/sessions/carol", None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, body) = s
        .call("DELETE", "/functions/cart/sessions/carol", None)
        .await;
    assert_eq!(
        (status, code_of(&body)),
        (StatusCode::NOT_FOUND, "session_not_found")
    );
    // Deleting the function removes its state.
    invoke(&s, "cart", Some("dave"), json!({"item_id": "a"})).await;
    let (status, _) = s.call("DELETE", "/functions/cart", None).await;
    assert_eq!(status, StatusCode::OK);
    s.deploy("cart", CART, json!({"state_config": {"enabled": true}}))
        .await;
    let fresh = invoke(&s, "cart", Some("dave"), json!({"item_id": "b"})).await;
    assert_eq!(fresh["body"]["cart_size"], 1, "{fresh}");
}

/// Reports the instance that served, and counts per session.
const STICKY: &str = r#"
import os

def handle(event, state):
    if event.get("crash"):
        os._exit(1)
    n = state.incr("n")
    return {"n": n}
"#;

async fn sessions_stick_to_their_instance_and_rebind_when_it_dies(backend: StateBackend) {
    let s = server(backend).await;
    s.deploy(
        "sticky",
        STICKY,
        json!({
            "state_config": {"enabled": true, "session_affinity": true},
            "max_instances": 10
        }),
    )
    .await;
    // 100 sessions at once, 20 invocations each (one after the other within a session).
    let sessions = (0..100).map(|i| {
        let s = &s;
        async move {
            let key = format!("user-{i}");
            let mut instances = std::collections::BTreeSet::new();
            let mut trail = Vec::new();
            for n in 1..=20 {
                let r = invoke(s, "sticky", Some(&key), json!({})).await;
                assert_eq!(r["body"]["n"], n, "{r}");
                instances.insert(r["instance_id"].as_str().unwrap().to_owned());
                trail.push(format!(
                    "{} {} {}",
                    r["instance_id"], r["start_type"], r["duration_ms"]
                ));
            }
            (key, instances, trail)
        }
    });
    let seen = futures::future::join_all(sessions).await;
    let mut per_instance = std::collections::BTreeMap::<String, usize>::new();
    for (key, instances, trail) in &seen {
        assert_eq!(
            instances.len(),
            1,
            "{key} was served by {instances:?}: {trail:#?}"
        );
        *per_instance
            .entry(instances.first().unwrap().clone())
            .or_default() += 1;
    }
    assert!(
        per_instance.len() > 1,
        "every session on one instance: {per_instance:?}"
    );
    // Bounded loads: none over its fair share plus the margin (10 instances, 100 sessions).
    let most = per_instance.values().max().unwrap();
    assert!(
        *most <= 13,
        "an instance holds {most} sessions: {per_instance:?}"
    );
    let (_, metrics) = s.call("GET", "/../../metrics", None).await;
    let metrics = metrics.as_str().unwrap_or_default().to_owned();
    assert!(
        metrics.contains(r#"nimbus_session_route_total{result="miss"} 100"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"nimbus_session_route_total{result="hit"} 1900"#),
        "{metrics}"
    );
    assert!(metrics.contains("nimbus_session_count 100"), "{metrics}");

    // The instance of user-0 dies: its sessions move, their state intact.
    let (victim, instances, _) = &seen[0];
    let dead = instances.first().unwrap().clone();
    let (status, body) = s
        .invoke_raw(
            "sticky",
            &format!("?session_key={victim}"),
            r#"{"crash": true}"#,
        )
        .await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    assert_eq!(code_of(&body), "instance_crashed");
    let orphans: Vec<&String> = seen
        .iter()
        .filter(|(_, i, _)| i.first() == Some(&dead))
        .map(|(k, _, _)| k)
        .collect();
    for key in &orphans {
        let r = invoke(&s, "sticky", Some(key), json!({})).await;
        assert_eq!(r["body"]["n"], 21, "{key}: {r}");
        assert_ne!(
            r["instance_id"],
            dead.as_str(),
            "{key} still on the dead instance"
        );
        let again = invoke(&s, "sticky", Some(key), json!({})).await;
        assert_eq!(again["instance_id"], r["instance_id"], "{key} rebound once");
    }
    let (_, metrics) = s.call("GET", "/../../metrics", None).await;
    let metrics = metrics.as_str().unwrap_or_default().to_owned();
    assert!(
        metrics.contains(&format!(
            r#"nimbus_session_route_total{{result="rebound"}} {}"#,
            orphans.len()
        )),
        "{} orphans: {metrics}",
        orphans.len()
    );
}

async fn a_sessions_invocations_run_one_at_a_time_in_arrival_order(backend: StateBackend) {
    let s = server(backend).await;
    // A read-modify-write without versions: correct only if nothing interleaves.
    let code = r#"
import time

def handle(event, state):
    seen = state.get("seen") or []
    time.sleep(0.02)
    seen.append(event["n"])
    state.set("seen", seen)
    return {"seen": len(seen)}
"#;
    s.deploy(
        "ordered",
        code,
        json!({
            "state_config": {"enabled": true, "session_affinity": true},
            "max_instances": 4
        }),
    )
    .await;
    let calls = (0..10).map(|n| {
        let s = &s;
        async move {
            // Arrival order: each request 10 ms after the one before, while the one
            // before still runs (20 ms).
            tokio::time::sleep(Duration::from_millis(10 * n)).await;
            invoke(s, "ordered", Some("only"), json!({ "n": n })).await
        }
    });
    futures::future::join_all(calls).await;
    let (_, state) = s
        .call("GET", "/functions/ordered/state/only?values=true", None)
        .await;
    assert_eq!(
        state["keys"][0]["value"],
        json!([0, 1, 2, 3, 4, 5, 6, 7, 8, 9]),
        "{state}"
    );
}

#[tokio::test]
async fn a_session_whose_instance_stays_busy_moves_after_the_queue_timeout() {
    let s = NIMBUS
        .start_with(Backend::Sqlite, "queue_timeout_ms = 300\n", &[])
        .await;
    let code = r#"
import time

def handle(event, state):
    time.sleep(event.get("sleep", 0))
    return {"n": state.incr("n")}
"#;
    s.deploy(
        "busy",
        code,
        json!({
            "state_config": {"enabled": true, "session_affinity": true},
            "max_instances": 2
        }),
    )
    .await;
    // Both sessions on the one instance there is.
    let a = invoke(&s, "busy", Some("a"), json!({})).await;
    let b = invoke(&s, "busy", Some("b"), json!({})).await;
    assert_eq!(a["instance_id"], b["instance_id"], "{a} {b}");
    // b keeps it busy for 3 s; a waits for it for the queue timeout, then moves on.
    let long = tokio::spawn({
        let (http, url) = (
            s.http.clone(),
            s.url("/functions/busy/invoke?session_key=b"),
        );
        async move { http.post(url).body(r#"{"sleep": 3}"#).send().await.unwrap() }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = std::time::Instant::now();
    let moved = invoke(&s, "busy", Some("a"), json!({})).await;
    let took = started.elapsed();
    assert!(took < Duration::from_millis(2500), "a waited {took:?}");
    assert_ne!(moved["instance_id"], a["instance_id"], "{moved}");
    assert_eq!(moved["body"]["n"], 2, "its state came along: {moved}");
    let again = invoke(&s, "busy", Some("a"), json!({})).await;
    assert_eq!(
        again["instance_id"], moved["instance_id"],
        "bound to its new instance"
    );
    assert_eq!(long.await.unwrap().status(), StatusCode::OK);
}

/// The other examples of examples/, as the docs run them.
const COUNTER: &str = include_str!("../../../examples/counter/handler.py");
const CHAT: &str = include_str!("../../../examples/chat/handler.py");
const TRANSFER: &str = include_str!("../../../examples/transfer/handler.py");

async fn the_examples_run_as_documented(backend: StateBackend) {
    let s = server(backend).await;
    let on = json!({"state_config": {"enabled": true}});
    s.deploy("counter", COUNTER, on.clone()).await;
    assert_eq!(
        invoke(&s, "counter", None, json!({})).await["body"],
        json!({"count": 1})
    );
    let by = invoke(&s, "counter", Some("x"), json!({"by": 5})).await;
    assert_eq!(
        by["body"],
        json!({"count": 6}),
        "the function's state, whatever the session"
    );

    s.deploy("chat", CHAT, on.clone()).await;
    invoke(
        &s,
        "chat",
        Some("room-1"),
        json!({"user": "ann", "text": "hi"}),
    )
    .await;
    let r = invoke(
        &s,
        "chat",
        Some("room-1"),
        json!({"user": "bob", "text": "hello"}),
    )
    .await;
    assert_eq!(r["body"]["messages"], 2, "{r}");
    assert_eq!(
        r["body"]["last"][1],
        json!({"user": "bob", "text": "hello"})
    );
    let other = invoke(&s, "chat", Some("room-2"), json!({})).await;
    assert_eq!(other["body"]["messages"], 0);
    let (_, state) = s.call("GET", "/functions/chat/state/room-1", None).await;
    let ttl = state["keys"][0]["ttl_ms"].as_u64().unwrap();
    assert!(ttl > 590_000 && ttl <= 600_000, "{state}");

    s.deploy("transfer", TRANSFER, on).await;
    let opened = invoke(&s, "transfer", None, json!({"open": {"a": 100, "b": 0}})).await;
    assert_eq!(opened["body"], json!({"a": 100, "b": 0}));
    let moves =
        (0..10).map(|_| s.invoke_raw("transfer", "", r#"{"from": "a", "to": "b", "amount": 7}"#));
    for (status, body) in futures::future::join_all(moves).await {
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let (_, state) = s
        .call("GET", "/functions/transfer/state/_global?values=true", None)
        .await;
    let balance = |k: &str| {
        state["keys"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["key"] == k)
            .unwrap()["value"]
            .clone()
    };
    assert_eq!(
        (balance("a"), balance("b")),
        (json!(30), json!(70)),
        "{state}"
    );
    let (status, body) = s
        .invoke_raw("transfer", "", r#"{"from": "a", "to": "b", "amount": 31}"#)
        .await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("insufficient funds"),
        "{body}"
    );
}

#[tokio::test]
async fn the_cli_deploys_with_state_and_shows_and_deletes_sessions_and_state() {
    let s = server(StateBackend::Embedded).await;
    let cart = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/cart/handler.py"
    );
    let deploy = [
        "deploy",
        cart,
        "--name",
        "cart",
        "--state",
        "--session-affinity",
        "on",
    ];
    let out = s.cli(&deploy).await;
    assert!(out.contains("created function cart"), "{out}");
    let out = s.cli(&["fn", "get", "cart"]).await;
    assert!(
        out.contains("state:          on: values ≤ 65536 B, ≤ 100 keys, no default TTL; affinity on (sessions last 3600 s)"),
        "{out}"
    );
    let data = r#"{"item_id": "book"}"#;
    let out = s
        .cli(&["invoke", "cart", "--session", "alice", "--data", data])
        .await;
    assert!(out.contains(r#""cart_size": 1"#), "{out}");
    let data = r#"{"item_id": "pen"}"#;
    let out = s
        .cli(&[
            "invoke",
            "cart",
            "--session",
            "alice",
            "--data",
            data,
            "--output",
            "json",
        ])
        .await;
    let r: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        r["body"],
        json!({"cart_size": 2, "total_items": 2}),
        "{out}"
    );

    let out = s.cli(&["state", "get", "cart", "alice"]).await;
    assert!(out.starts_with("session alice: 2 key(s), 15 B\n"), "{out}");
    assert!(
        out.contains(r#"cart        ["book","pen"]  14 B  "#),
        "{out}"
    );
    let out = s.cli(&["state", "get", "cart", "_global"]).await;
    assert_eq!(out, "the function's state: no keys\n");
    // The session is recorded behind the invocation.
    let mut listed = String::new();
    for _ in 0..50 {
        listed = s.cli(&["session", "list", "cart"]).await;
        if listed.contains("alice") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        listed.contains(r["instance_id"].as_str().unwrap()),
        "{listed}"
    );
    let out = s.cli(&["session", "get", "cart", "alice"]).await;
    assert!(
        out.contains("keys:        cart (14 B), item_count (1 B)"),
        "{out}"
    );
    let out = s
        .cli(&["state", "delete", "cart", "alice", "--key", "cart"])
        .await;
    assert_eq!(out, "deleted key \"cart\" of alice's state\n");
    let out = s.cli(&["session", "delete", "cart", "alice"]).await;
    assert_eq!(out, "deleted session alice of cart and its state\n");
    let out = s
        .cli(&["state", "get", "cart", "alice", "--output", "json"])
        .await;
    let state: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(state["keys"], json!([]), "{out}");
}

async fn embedded_state_survives_a_restart() {
    let mut s = server(StateBackend::Embedded).await;
    s.deploy("cart", CART, json!({"state_config": {"enabled": true}}))
        .await;
    invoke(&s, "cart", Some("eve"), json!({"item_id": "a"})).await;
    invoke(&s, "cart", Some("eve"), json!({"item_id": "b"})).await;
    s.restart().await;
    let after = invoke(&s, "cart", Some("eve"), json!({"item_id": "c"})).await;
    assert_eq!(
        after["body"],
        json!({"cart_size": 3, "total_items": 3}),
        "{after}"
    );
}

macro_rules! on_both_state_backends {
    ($($name:ident),+ $(,)?) => {
        mod embedded {
            $(#[tokio::test] async fn $name() { super::$name(super::StateBackend::Embedded).await })+
        }
        mod redis {
            $(#[tokio::test] async fn $name() { super::$name(super::StateBackend::Redis).await })+
        }
    };
}

on_both_state_backends!(
    the_seed_cart_runs_as_written_per_session,
    two_hundred_concurrent_increments_count_exactly_two_hundred,
    optimistic_read_modify_write_loops_lose_no_update,
    every_operation_versions_and_scopes,
    limits_are_enforced_with_typed_errors_and_nothing_written,
    ttls_expire_and_default_ttl_applies,
    a_function_without_state_gets_a_clear_error,
    sessions_and_state_admin_answers,
    sessions_stick_to_their_instance_and_rebind_when_it_dies,
    a_sessions_invocations_run_one_at_a_time_in_arrival_order,
    the_examples_run_as_documented,
);

#[tokio::test]
async fn embedded_state_is_durable_across_restarts() {
    embedded_state_survives_a_restart().await;
}

/// Writes `event["key"]` in the function's state; the answer acknowledges the write.
const WRITER: &str = r#"
def handle(event, state):
    state.function().set(event["key"], event["value"])
    return {"written": event["key"]}
"#;

#[tokio::test]
async fn every_acknowledged_write_survives_kill_9_of_the_server() {
    let mut s = server(StateBackend::Embedded).await;
    s.deploy(
        "writer",
        WRITER,
        json!({"state_config": {"enabled": true, "max_keys": 10000}}),
    )
    .await;
    // Four clients write distinct keys as fast as they can; the server is killed mid-stream.
    let acknowledged = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let (http, url) = (s.http.clone(), s.url("/functions/writer/invoke"));
            let acknowledged = acknowledged.clone();
            tokio::spawn(async move {
                for n in 0.. {
                    let key = format!("w{w}-{n}");
                    let body = json!({"key": key, "value": n}).to_string();
                    match http.post(&url).body(body).send().await {
                        Ok(r) if r.status() == StatusCode::OK => {
                            acknowledged.lock().unwrap().push((key, n))
                        }
                        _ => break, // the server is gone
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    s.child.kill().unwrap(); // SIGKILL
    s.child.wait().unwrap();
    for writer in writers {
        writer.await.unwrap();
    }
    let acknowledged = acknowledged.lock().unwrap().clone();
    assert!(
        acknowledged.len() > 20,
        "only {} writes before the kill",
        acknowledged.len()
    );
    let args: Vec<String> = s.args.clone();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    s.spawn(&args).await;
    let (status, state) = s
        .call("GET", "/functions/writer/state/_global?values=true", None)
        .await;
    assert_eq!(status, StatusCode::OK, "{state}");
    let stored: std::collections::HashMap<String, Value> = state["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| (k["key"].as_str().unwrap().to_owned(), k["value"].clone()))
        .collect();
    for (key, n) in &acknowledged {
        assert_eq!(
            stored.get(key),
            Some(&json!(n)),
            "acknowledged {key} was lost"
        );
    }
}

#[tokio::test]
async fn when_redis_goes_away_state_calls_fail_fast_and_recover_by_themselves() {
    let port = private_redis::free_port();
    let no_disk = ["--save", "", "--appendonly", "no"];
    let redis = RedisServer::start(port, &no_disk);
    let url = format!("redis://127.0.0.1:{port}");
    let s = NIMBUS
        .start_with(Backend::Sqlite, "", &["--state-url", &url])
        .await;
    s.deploy("ops", OPS, json!({"state_config": {"enabled": true}}))
        .await;
    let incr = json!({"op": "incr", "scope": "function", "args": ["n"]});
    assert_eq!(op(&s, None, incr.clone()).await["ok"], 1);

    drop(redis);
    for _ in 0..3 {
        let started = std::time::Instant::now();
        let r = op(&s, None, incr.clone()).await;
        let took = started.elapsed();
        assert_eq!(r["error"], "state_unavailable", "{r}");
        assert_eq!(r["type"], "StateUnavailable");
        assert!(took < Duration::from_secs(2), "the call took {took:?}");
    }
    let (status, body) = s.call("GET", "/functions/ops/state/_global", None).await;
    assert_eq!(
        (status, code_of(&body)),
        (StatusCode::SERVICE_UNAVAILABLE, "state_unavailable")
    );
    let health = s
        .http
        .get(format!("{}/health", s.base))
        .send()
        .await
        .unwrap();
    assert!(health.status().is_success(), "the server stays up");

    // Back (empty, as a restarted cache would be): the same server works again by itself.
    let _redis = RedisServer::start(port, &no_disk);
    let mut answer = Value::Null;
    for _ in 0..100 {
        answer = op(&s, None, incr.clone()).await;
        if answer["ok"].is_number() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(answer["ok"], 1, "{answer}");
}
