//! End-to-end tests of versions, aliases and weighted routing through the HTTP API of the
//! real binary: the version and alias lifecycle with every error answer (on SQLite and on
//! PostgreSQL), split accuracy and session stickiness counted over real invocations, alias
//! changes racing invocations, propagation to another server, and warm rollbacks.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{json, Value};

use nimbus_testkit::on_both_backends;
use nimbus_testkit::server::{code_of, Backend, Nimbus, Server};

/// The binary under test.
const NIMBUS: Nimbus = Nimbus::at(env!("CARGO_BIN_EXE_nimbus"));

on_both_backends!(versions_and_aliases_lifecycle);

/// Code whose handler answers with its version's tag.
fn tagged(tag: u32) -> String {
    format!("def handle(event):\n    return {{\"tag\": {tag}}}\n")
}

fn weights(pairs: &[(u32, u32)]) -> Value {
    let weights: Vec<Value> = pairs
        .iter()
        .map(|&(version, weight)| json!({ "version": version, "weight": weight }))
        .collect();
    json!({ "weights": weights })
}

/// The steps of these tests, on the kit's server.
trait CanarySteps {
    /// Stages new code without publishing it.
    async fn stage(&self, function: &str, tag: u32);
    /// Publishes version `tag` of `function` whose handler returns `tag`.
    async fn publish_tagged(&self, function: &str, tag: u32);
    async fn set_alias(&self, function: &str, alias: &str, pairs: &[(u32, u32)]) -> Value;
    async fn create_alias(&self, function: &str, alias: &str, pairs: &[(u32, u32)]);
    /// Invokes and checks the answer is a success whose body matches its version; returns
    /// the whole response.
    async fn invoke_ok(&self, function: &str, query: &str) -> Value;
}

impl CanarySteps for Server {
    /// Stages new code without publishing it.
    async fn stage(&self, function: &str, tag: u32) {
        let (status, body) = self
            .call(
                "PUT",
                &format!("/functions/{function}"),
                Some(json!({ "code": tagged(tag), "publish": false })),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }

    /// Publishes version `tag` of `function` whose handler returns `tag`.
    async fn publish_tagged(&self, function: &str, tag: u32) {
        self.stage(function, tag).await;
        let (status, body) = self
            .call("POST", &format!("/functions/{function}/versions"), None)
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        assert_eq!(body["version"], tag, "{body}");
    }

    async fn set_alias(&self, function: &str, alias: &str, pairs: &[(u32, u32)]) -> Value {
        let (status, body) = self
            .call(
                "PUT",
                &format!("/functions/{function}/aliases/{alias}"),
                Some(json!({ "routing_config": weights(pairs) })),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body
    }

    async fn create_alias(&self, function: &str, alias: &str, pairs: &[(u32, u32)]) {
        let (status, body) = self
            .call(
                "POST",
                &format!("/functions/{function}/aliases"),
                Some(json!({ "name": alias, "routing_config": weights(pairs) })),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }

    /// Invokes and checks the answer is a success whose body matches its version; returns
    /// the whole response.
    async fn invoke_ok(&self, function: &str, query: &str) -> Value {
        let (status, body) = self.invoke_raw(function, query, "{}").await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["body"]["tag"], body["version"], "{body}");
        body
    }
}

/// A function `name` with versions 1..=`count`, each answering with its number.
async fn function_with_versions(s: &Server, name: &str, count: u32) {
    s.deploy(name, &tagged(1), json!({})).await;
    for tag in 2..=count {
        s.publish_tagged(name, tag).await;
    }
}

async fn versions_and_aliases_lifecycle(backend: Backend) {
    let s = NIMBUS.start(backend).await;
    let f = "shop";
    s.deploy(f, &tagged(1), json!({})).await;

    // Publishing with nothing changed returns the newest version, not a duplicate.
    let (status, body) = s.call("POST", "/functions/shop/versions", None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        (body["version"].clone(), body["created"].clone()),
        (json!(1), json!(false))
    );

    s.publish_tagged(f, 2).await;
    let (status, body) = s.call("GET", "/functions/shop/versions/2", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["files"][0]["content"], tagged(2));
    assert_eq!(body["aliases"], json!(["latest"]));

    // publish_alias must name an existing alias; a failed publish writes nothing.
    s.stage(f, 3).await;
    let (status, body) = s
        .call(
            "POST",
            "/functions/shop/versions",
            Some(json!({ "description": "v3", "publish_alias": "prod" })),
        )
        .await;
    assert_eq!(
        (status, code_of(&body)),
        (StatusCode::BAD_REQUEST, "validation_error"),
        "{body}"
    );
    assert_eq!(body["error"]["field"], "publish_alias");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("\"prod\""));
    let (_, listed) = s.call("GET", "/functions/shop/versions", None).await;
    assert_eq!(listed["total"], 2);

    s.create_alias(f, "prod", &[(2, 100)]).await;
    let (status, body) = s
        .call(
            "POST",
            "/functions/shop/versions",
            Some(json!({ "description": "v3", "publish_alias": "prod" })),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["version"], 3);
    assert_eq!(body["aliases"], json!(["latest", "prod"]));
    let (_, prod) = s.call("GET", "/functions/shop/aliases/prod", None).await;
    assert_eq!(prod["routing_config"], weights(&[(3, 100)]));
    assert_eq!(prod["revision"], 2);

    // Listing: newest first, paginated, without code.
    let (_, page) = s
        .call("GET", "/functions/shop/versions?limit=2&offset=1", None)
        .await;
    let numbers: Vec<&Value> = page["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| &v["version"])
        .collect();
    assert_eq!(numbers, [&json!(2), &json!(1)]);
    assert_eq!(
        (
            page["total"].clone(),
            page["limit"].clone(),
            page["offset"].clone()
        ),
        (json!(3), json!(2), json!(1))
    );
    assert!(page["versions"][0].get("files").is_none(), "{page}");

    // Invalid routing tables answer 400 naming the problem; nothing changes.
    let bad: [(Value, &str); 7] = [
        (weights(&[(2, 50), (3, 40)]), "sum to 90"),
        (weights(&[(2, 50), (2, 50)]), "more than once"),
        (weights(&[(2, 101)]), "out of range"),
        (weights(&[]), "between 1 and 10"),
        (
            weights(
                &(1..=11)
                    .map(|v| (v, if v == 1 { 90 } else { 1 }))
                    .collect::<Vec<_>>(),
            ),
            "between 1 and 10",
        ),
        (weights(&[(2, 50), (99, 50)]), "version 99 does not exist"),
        (
            json!({ "weights": [{ "version": 2, "weight": 50.5 }, { "version": 3, "weight": 49.5 }] }),
            "invalid",
        ),
    ];
    for (routing, needle) in bad {
        let (status, body) = s
            .call(
                "PUT",
                "/functions/shop/aliases/prod",
                Some(json!({ "routing_config": routing })),
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{routing}: {body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains(needle), "{routing}: {message}");
    }
    let (_, unchanged) = s.call("GET", "/functions/shop/aliases/prod", None).await;
    assert_eq!(unchanged, prod);

    let cases: [(&str, &str, Option<Value>, StatusCode, &str); 9] = [
        (
            "POST",
            "/functions/shop/aliases",
            Some(json!({ "name": "Prod", "routing_config": weights(&[(1, 100)]) })),
            StatusCode::BAD_REQUEST,
            "validation_error",
        ),
        (
            "POST",
            "/functions/shop/aliases",
            Some(json!({ "name": "prod", "routing_config": weights(&[(1, 100)]) })),
            StatusCode::CONFLICT,
            "alias_exists",
        ),
        (
            "POST",
            "/functions/shop/aliases",
            Some(json!({ "name": "x", "routing_config": weights(&[(1, 100)]), "extra": 1 })),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            "POST",
            "/functions/nope/aliases",
            Some(json!({ "name": "x", "routing_config": weights(&[(1, 100)]) })),
            StatusCode::NOT_FOUND,
            "function_not_found",
        ),
        (
            "PUT",
            "/functions/shop/aliases/prod",
            Some(json!({})),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            "PUT",
            "/functions/shop/aliases/ghost",
            Some(json!({ "description": "x" })),
            StatusCode::NOT_FOUND,
            "alias_not_found",
        ),
        (
            "GET",
            "/functions/shop/aliases/ghost/history",
            None,
            StatusCode::NOT_FOUND,
            "alias_not_found",
        ),
        (
            "GET",
            "/functions/shop/versions/9",
            None,
            StatusCode::NOT_FOUND,
            "version_not_found",
        ),
        (
            "DELETE",
            "/functions/shop/aliases/latest",
            None,
            StatusCode::CONFLICT,
            "alias_protected",
        ),
    ];
    for (method, path, body, status, code) in cases {
        let (got, answer) = s.call(method, path, body).await;
        assert_eq!(
            (got, code_of(&answer)),
            (status, code),
            "{method} {path}: {answer}"
        );
        assert!(!answer["error"]["message"].as_str().unwrap().is_empty());
    }

    // A canary: every invocation reports the version that ran and the alias that chose it,
    // and so does its record.
    let canary = s.set_alias(f, "prod", &[(3, 10), (2, 90)]).await;
    assert_eq!(
        canary["routing_config"],
        weights(&[(2, 90), (3, 10)]),
        "stored in version order"
    );
    let mut seen = BTreeMap::new();
    for _ in 0..40 {
        let answer = s.invoke_ok(f, "?alias=prod").await;
        assert_eq!(answer["alias_used"], "prod");
        *seen.entry(answer["version"].as_u64().unwrap()).or_insert(0) += 1;
    }
    assert!(seen.keys().all(|v| [2, 3].contains(v)), "{seen:?}");
    let answer = s.invoke_ok(f, "?alias=prod&version=1").await;
    assert_eq!(
        (answer["version"].clone(), answer["alias_used"].clone()),
        (json!(1), Value::Null)
    );
    let (_, record) = s
        .call(
            "GET",
            &format!("/invocations/{}", answer["request_id"].as_str().unwrap()),
            None,
        )
        .await;
    assert_eq!(
        (record["version"].clone(), record["alias_used"].clone()),
        (json!(1), Value::Null)
    );
    let answer = s.invoke_ok(f, "").await;
    assert_eq!(
        (answer["version"].clone(), answer["alias_used"].clone()),
        (json!(3), json!("latest"))
    );

    // Versions an alias routes to (even at weight 0) cannot be deleted; others can, and
    // their numbers are never given out again.
    s.set_alias(f, "prod", &[(2, 0), (3, 100)]).await;
    let (status, body) = s.call("DELETE", "/functions/shop/versions/2", None).await;
    assert_eq!(
        (status, code_of(&body)),
        (StatusCode::CONFLICT, "version_in_use"),
        "{body}"
    );
    assert_eq!(body["error"]["aliases"], json!(["prod"]));
    assert!(body["error"]["message"].as_str().unwrap().contains("prod"));
    s.create_alias(f, "old", &[(1, 100)]).await;
    s.set_alias(f, "old", &[(3, 100)]).await;
    let (status, body) = s.call("DELETE", "/functions/shop/versions/1", None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = s.call("DELETE", "/functions/shop/versions/1", None).await;
    assert_eq!(
        (status, code_of(&body)),
        (StatusCode::NOT_FOUND, "version_not_found")
    );
    s.set_alias(f, "latest", &[(3, 100)]).await;
    s.publish_tagged(f, 4).await;
    s.set_alias(f, "latest", &[(3, 100)]).await;
    let (status, _) = s.call("DELETE", "/functions/shop/versions/4", None).await;
    assert_eq!(status, StatusCode::OK);
    s.stage(f, 5).await;
    let (_, body) = s.call("POST", "/functions/shop/versions", None).await;
    assert_eq!(body["version"], 5, "a deleted number is not reused: {body}");

    // Rollback: to the routing before the last change, to any revision, with clear errors.
    let (status, body) = s
        .call("POST", "/functions/shop/aliases/old/rollback", None)
        .await;
    assert_eq!(
        (status, code_of(&body)),
        (StatusCode::CONFLICT, "version_deleted"),
        "{body}"
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("version 1"),
        "{body}"
    );
    let (status, body) = s
        .call("POST", "/functions/shop/aliases/prod/rollback", None)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["routing_config"], weights(&[(2, 90), (3, 10)]));
    let revision = body["revision"].as_u64().unwrap();
    assert_eq!(body["restored_revision"], revision - 2);
    let (status, body) = s
        .call(
            "POST",
            "/functions/shop/aliases/prod/rollback",
            Some(json!({ "to_revision": 1 })),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["routing_config"], weights(&[(2, 100)]));
    let (status, body) = s
        .call(
            "POST",
            "/functions/shop/aliases/prod/rollback",
            Some(json!({ "to_revision": 1 })),
        )
        .await;
    assert_eq!(
        (status, code_of(&body)),
        (StatusCode::CONFLICT, "nothing_to_roll_back"),
        "{body}"
    );
    let (status, body) = s
        .call(
            "POST",
            "/functions/shop/aliases/prod/rollback",
            Some(json!({ "to_revision": 99 })),
        )
        .await;
    assert_eq!(
        (status, code_of(&body)),
        (StatusCode::NOT_FOUND, "revision_not_found"),
        "{body}"
    );

    // History: every change, newest first, with who, what before and what after.
    let (_, history) = s
        .call(
            "GET",
            "/functions/shop/aliases/prod/history?limit=100",
            None,
        )
        .await;
    let actions: Vec<&str> = history["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        ["rollback", "rollback", "update", "update", "publish", "create"]
    );
    assert_eq!(history["total"], 6);
    let last = &history["history"][0];
    assert_eq!(
        (last["revision"].clone(), last["restored_revision"].clone()),
        (json!(6), json!(1))
    );
    assert_eq!(
        last["previous_routing_config"],
        weights(&[(2, 90), (3, 10)])
    );
    assert_eq!(last["changed_by"], "anonymous");
    assert_eq!(
        history["history"][5]["previous_routing_config"],
        Value::Null
    );

    // The default rollback passes over description-only changes; a rollback can send all
    // traffic to one version; `expected_revision` guards against concurrent operators.
    let put = |body: Value| s.call("PUT", "/functions/shop/aliases/prod", Some(body));
    let (status, body) = put(json!({ "description": "checkout", "expected_revision": 6 })).await;
    assert_eq!(
        (status, body["revision"].clone()),
        (StatusCode::OK, json!(7)),
        "{body}"
    );
    let (status, body) = put(json!({ "description": "x", "expected_revision": 6 })).await;
    assert_eq!(
        (status, code_of(&body)),
        (StatusCode::CONFLICT, "revision_mismatch"),
        "{body}"
    );
    let rollback =
        |body: Value| s.call("POST", "/functions/shop/aliases/prod/rollback", Some(body));
    let (status, body) = rollback(json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["routing_config"], weights(&[(2, 90), (3, 10)]));
    assert_eq!(
        (
            body["restored_revision"].clone(),
            body["description"].clone()
        ),
        (json!(5), json!("checkout"))
    );
    let (status, body) = rollback(json!({ "to_version": 3, "expected_revision": 8 })).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["routing_config"], weights(&[(3, 100)]));
    assert_eq!(body["restored_revision"], Value::Null);
    let refused = [
        (
            json!({ "to_version": 3 }),
            StatusCode::CONFLICT,
            "nothing_to_roll_back",
        ),
        (
            json!({ "to_version": 9 }),
            StatusCode::BAD_REQUEST,
            "validation_error",
        ),
        (
            json!({ "to_version": 2, "to_revision": 1 }),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            json!({ "expected_revision": 1 }),
            StatusCode::CONFLICT,
            "revision_mismatch",
        ),
    ];
    for (request, status, code) in refused {
        let (got, body) = rollback(request.clone()).await;
        assert_eq!((got, code_of(&body)), (status, code), "{request}: {body}");
    }
    let (_, history) = s
        .call("GET", "/functions/shop/aliases/prod/history?limit=1", None)
        .await;
    assert_eq!(history["history"][0]["action"], "rollback");
    assert_eq!(history["total"], 9);

    // Deleting an alias removes it and its history.
    let (status, _) = s.call("DELETE", "/functions/shop/aliases/old", None).await;
    assert_eq!(status, StatusCode::OK);
    let (_, aliases) = s.call("GET", "/functions/shop/aliases", None).await;
    let names: Vec<&str> = aliases["aliases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["latest", "prod"]);

    let metrics = s
        .http
        .get(format!("{}/metrics", s.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for series in [
        r#"nimbus_invocation_by_version_total{function="shop",version="1",alias="",status="success"} 1"#,
        r#"nimbus_alias_update_total{function="shop",alias="prod",action="rollback"} 4"#,
        r#"nimbus_alias_update_total{function="shop",alias="latest",action="publish"}"#,
        r#"nimbus_version_publish_total{function="shop"} 5"#,
    ] {
        assert!(metrics.contains(series), "{series} missing from\n{metrics}");
    }
}

/// Invokes `function` `n` times over `clients` concurrent connections; the query of the
/// i-th invocation is `query(i)`. Returns the version each invocation ran on, in order.
async fn invoke_many(
    s: &Arc<Server>,
    function: &str,
    n: usize,
    clients: usize,
    query: impl Fn(usize) -> String + Send + Sync + 'static,
) -> Vec<u32> {
    let query = Arc::new(query);
    let mut tasks = Vec::new();
    for client in 0..clients {
        let (s, query, function) = (s.clone(), query.clone(), function.to_owned());
        tasks.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            for i in (client..n).step_by(clients) {
                let (status, body) = s.invoke_raw(&function, &query(i), "{}").await;
                assert_eq!(status, StatusCode::OK, "{body}");
                seen.push((i, body["version"].as_u64().unwrap() as u32));
            }
            seen
        }));
    }
    let mut all = Vec::with_capacity(n);
    for task in tasks {
        all.extend(task.await.unwrap());
    }
    all.sort_unstable();
    all.into_iter().map(|(_, v)| v).collect()
}

fn shares(versions: &[u32]) -> BTreeMap<u32, f64> {
    let mut counts: BTreeMap<u32, usize> = BTreeMap::new();
    for v in versions {
        *counts.entry(*v).or_default() += 1;
    }
    counts
        .into_iter()
        .map(|(v, c)| (v, c as f64 * 100.0 / versions.len() as f64))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_split_is_accurate_over_20000_invocations() {
    let s = Arc::new(NIMBUS.start(Backend::Sqlite).await);
    function_with_versions(&s, "split", 3).await;
    for table in [vec![(1, 90), (2, 10)], vec![(1, 34), (2, 33), (3, 33)]] {
        s.set_alias("split", "latest", &table).await;
        let versions = invoke_many(&s, "split", 20_000, 8, |_| String::new()).await;
        let got = shares(&versions);
        for (version, weight) in &table {
            let share = got.get(version).copied().unwrap_or(0.0);
            assert!(
                (share - f64::from(*weight)).abs() <= 1.0,
                "{table:?}: version {version} got {share:.2}% ({got:?})"
            );
        }
        assert_eq!(got.len(), table.len(), "{got:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_keys_stick_and_move_only_to_the_new_version() {
    let s = Arc::new(NIMBUS.start(Backend::Sqlite).await);
    function_with_versions(&s, "sticky", 2).await;
    s.create_alias("sticky", "prod", &[(1, 90), (2, 10)]).await;
    const KEYS: usize = 1000;
    // Invocation i is of key i % KEYS.
    let by_key = |versions: Vec<u32>| -> Vec<Vec<u32>> {
        let mut keys = vec![Vec::new(); KEYS];
        for (i, v) in versions.into_iter().enumerate() {
            keys[i % KEYS].push(v);
        }
        keys
    };
    let query = |i: usize| format!("?alias=prod&session_key=user-{}", i % KEYS);
    let before = by_key(invoke_many(&s, "sticky", KEYS * 20, 8, query).await);
    let mut on_canary = 0;
    for (key, seen) in before.iter().enumerate() {
        assert!(
            seen.iter().all(|v| *v == seen[0]),
            "user-{key} bounced: {seen:?}"
        );
        on_canary += usize::from(seen[0] == 2);
    }
    let share = on_canary as f64 * 100.0 / KEYS as f64;
    assert!(
        (share - 10.0).abs() <= 3.0,
        "{share:.1}% of sessions on the canary"
    );

    // The header works like the query parameter.
    let body: Value = s
        .http
        .post(s.url("/functions/sticky/invoke?alias=prod"))
        .header("X-Nimbus-Session-Key", "user-7")
        .body("{}")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["version"], before[7][0]);
    assert_eq!(body["session_key"], "user-7");

    s.set_alias("sticky", "prod", &[(1, 80), (2, 20)]).await;
    let after = by_key(invoke_many(&s, "sticky", KEYS * 5, 8, query).await);
    let mut moved = 0;
    for key in 0..KEYS {
        let (old, new) = (before[key][0], after[key][0]);
        assert!(
            after[key].iter().all(|v| *v == new),
            "user-{key} bounced after the shift"
        );
        assert!(
            old == new || (old, new) == (1, 2),
            "user-{key} moved from {old} to {new}"
        );
        moved += usize::from(old != new);
    }
    let share = (on_canary + moved) as f64 * 100.0 / KEYS as f64;
    // 1,000 keys hashed with a random function id: ±4.5 points is 3.5 standard deviations.
    assert!(
        (share - 20.0).abs() <= 4.5,
        "{share:.1}% of sessions on the canary after the shift"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alias_updates_racing_invocations_never_misroute() {
    let s = Arc::new(NIMBUS.start(Backend::Sqlite).await);
    // Version 4 exists (and is `latest`) but prod never routes to it.
    function_with_versions(&s, "racy", 4).await;
    let tables: [&[(u32, u32)]; 2] = [&[(1, 100)], &[(2, 50), (3, 50)]];
    s.create_alias("racy", "prod", tables[0]).await;
    let origin = Instant::now();
    let since = move || origin.elapsed();

    // Table i is in force from the start of its PUT to the end of the next one's.
    let updater = {
        let s = s.clone();
        tokio::spawn(async move {
            let mut changes = vec![(Duration::ZERO, Duration::ZERO, 0usize)];
            for i in 1..=50 {
                let table = i % 2;
                let start = since();
                s.set_alias("racy", "prod", tables[table]).await;
                changes.push((start, since(), table));
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            changes
        })
    };
    let mut invocations = Vec::new();
    for _ in 0..4 {
        let s = s.clone();
        invocations.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            for _ in 0..50 {
                let start = since();
                let (status, body) = s.invoke_raw("racy", "?alias=prod", "{}").await;
                assert!(!status.is_server_error(), "{status}: {body}");
                assert_eq!(status, StatusCode::OK, "{body}");
                seen.push((start, since(), body["version"].as_u64().unwrap() as u32));
            }
            seen
        }));
    }
    let changes = updater.await.unwrap();
    let mut checked = 0;
    for task in invocations {
        for (start, end, version) in task.await.unwrap() {
            let in_force = changes.iter().enumerate().filter(|(i, (began, _, _))| {
                let until = changes.get(i + 1).map_or(Duration::MAX, |next| next.1);
                *began <= end && start <= until
            });
            let allowed: Vec<u32> = in_force
                .flat_map(|(_, (_, _, table))| tables[*table].iter().map(|(v, _)| *v))
                .collect();
            assert!(
                allowed.contains(&version),
                "an invocation during {start:?}..{end:?} ran version {version}; the alias routed to {allowed:?} then"
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alias_changes_reach_another_server_within_a_second() {
    let a = NIMBUS.start(Backend::Postgres).await;
    function_with_versions(&a, "fleet", 2).await;
    a.create_alias("fleet", "prod", &[(1, 100)]).await;
    let b = a.start_peer().await;
    assert_eq!(b.invoke_ok("fleet", "?alias=prod").await["version"], 1);

    a.set_alias("fleet", "prod", &[(2, 100)]).await;
    let changed = Instant::now();
    // Stale answers are allowed only within the routing cache's 1 s bound.
    tokio::time::sleep_until((changed + Duration::from_secs(1)).into()).await;
    for _ in 0..20 {
        assert_eq!(b.invoke_ok("fleet", "?alias=prod").await["version"], 2);
    }
    // And the server that made the change routes by it at once.
    a.set_alias("fleet", "prod", &[(1, 100)]).await;
    assert_eq!(a.invoke_ok("fleet", "?alias=prod").await["version"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_back_finds_the_old_version_warm() {
    let s = NIMBUS.start(Backend::Sqlite).await;
    function_with_versions(&s, "warm", 2).await;
    s.create_alias("warm", "prod", &[(1, 100)]).await;
    let first = s.invoke_ok("warm", "?alias=prod").await;
    assert_eq!(first["start_type"], "cold");

    s.set_alias("warm", "prod", &[(2, 100)]).await;
    assert_eq!(s.invoke_ok("warm", "?alias=prod").await["version"], 2);
    let (status, _) = s
        .call("POST", "/functions/warm/aliases/prod/rollback", None)
        .await;
    assert_eq!(status, StatusCode::OK);
    let back = s.invoke_ok("warm", "?alias=prod").await;
    assert_eq!(back["version"], 1);
    assert_eq!(back["start_type"], "warm", "{back}");
    assert_eq!(back["instance_id"], first["instance_id"]);
}
