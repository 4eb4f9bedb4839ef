//! Engine behaviour against real parts: a SQLite store in a temp dir, real Python workers
//! started by the process driver.

use std::time::Duration;

use nimbus_core::{
    CodeBundle, Function, FunctionConfig, FunctionStatus, FunctionVersion, Handler,
    InvocationStatus, Runtime, StartType, Trigger,
};
use nimbus_engine::{
    EngineConfig, EngineError, FunctionPatch, InvokeRequest, InvokeResponse, NewFunction,
};
use nimbus_store::InvocationFilter;
use serde_json::value::RawValue;

mod common;

use common::Harness;

/// An engine whose new instances start cold unless a test turns snapshots on.
async fn harness(tune: impl FnOnce(&mut EngineConfig)) -> Harness {
    common::harness(|config| {
        config.snapshots.enabled = false;
        tune(config);
    })
    .await
}

fn new_function(name: &str, code: &str) -> NewFunction {
    serde_json::from_value(serde_json::json!({ "name": name, "code": code })).unwrap()
}

fn request(function: &str, event: &str) -> InvokeRequest {
    InvokeRequest {
        function: function.into(),
        version: None,
        alias: None,
        session_key: None,
        event: RawValue::from_string(event.into()).unwrap(),
        trigger: Trigger::Http,
    }
}

async fn invoke(h: &Harness, function: &str, event: &str) -> InvokeResponse {
    h.engine.invoke(request(function, event)).await.unwrap()
}

const ECHO: &str = "def handle(event):\n    return event\n";

#[tokio::test]
async fn first_call_is_cold_then_warm_on_the_same_instance() {
    let h = harness(|_| {}).await;
    h.engine
        .create_function(new_function("echo", ECHO), "test")
        .await
        .unwrap();
    let first = invoke(&h, "echo", r#"{"n":1}"#).await;
    assert_eq!(first.outcome.as_ref().unwrap().get(), r#"{"n":1}"#);
    assert_eq!(first.start_type, StartType::Cold);
    assert_eq!(first.version, 1);
    assert_eq!(first.alias_used.as_deref(), Some("latest"));
    let second = invoke(&h, "echo", r#"[2]"#).await;
    assert_eq!(second.start_type, StartType::Warm);
    assert_eq!(second.instance_id, first.instance_id);
    assert_eq!(second.outcome.unwrap().get(), "[2]");
}

#[tokio::test]
async fn broken_code_is_rejected_at_deploy_and_nothing_is_stored() {
    let h = harness(|_| {}).await;
    let err = h
        .engine
        .create_function(new_function("broken", "import does_not_exist\n"), "test")
        .await
        .unwrap_err();
    match &err {
        EngineError::InvalidCode { error, .. } => {
            assert_eq!(error.error_type, "ModuleNotFoundError");
            assert!(
                error.message.contains("does_not_exist"),
                "{}",
                error.message
            );
        }
        other => panic!("expected InvalidCode, got {other:?}"),
    }
    assert!(matches!(
        h.engine.get_function("broken").await,
        Err(EngineError::NotFound { .. })
    ));

    let err = h
        .engine
        .create_function(
            new_function("nohandler", "def other(e):\n    return 1\n"),
            "test",
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("handle"), "{err}");
}

#[tokio::test]
async fn an_update_publishes_version_2_and_new_invocations_run_it() {
    let h = harness(|_| {}).await;
    h.engine
        .create_function(
            new_function("greet", "def handle(e):\n    return 'v1'\n"),
            "test",
        )
        .await
        .unwrap();
    assert_eq!(
        invoke(&h, "greet", "{}").await.outcome.unwrap().get(),
        r#""v1""#
    );
    let patch = FunctionPatch {
        code: Some("def handle(e):\n    return 'v2'\n".into()),
        ..Default::default()
    };
    let updated = h
        .engine
        .update_function("greet", patch, "test")
        .await
        .unwrap();
    assert_eq!(updated.published_version, Some(2));
    let after = invoke(&h, "greet", "{}").await;
    assert_eq!(after.version, 2);
    assert_eq!(after.outcome.unwrap().get(), r#""v2""#);
    // Version 1 is still reachable explicitly.
    let mut old = request("greet", "{}");
    old.version = Some(1);
    let old = h.engine.invoke(old).await.unwrap();
    assert_eq!(old.outcome.unwrap().get(), r#""v1""#);
    assert_eq!(old.alias_used, None);
    // The same update again changes nothing.
    let same = FunctionPatch {
        code: Some("def handle(e):\n    return 'v2'\n".into()),
        ..Default::default()
    };
    assert_eq!(
        h.engine
            .update_function("greet", same, "test")
            .await
            .unwrap()
            .published_version,
        None
    );
}

#[tokio::test]
async fn exceptions_timeouts_and_crashes_are_outcomes_with_codes() {
    let h = harness(|_| {}).await;
    let code = r#"
import os, time
def handle(event):
    action = event["action"]
    if action == "raise":
        raise ValueError("bad input")
    if action == "sleep":
        time.sleep(10)
    if action == "exit":
        os._exit(3)
    return "ok"
"#;
    let mut f = new_function("faulty", code);
    f.timeout_sec = Some(1);
    h.engine.create_function(f, "test").await.unwrap();

    let raised = invoke(&h, "faulty", r#"{"action":"raise"}"#).await;
    let err = raised.outcome.unwrap_err();
    assert_eq!(err.code, nimbus_core::ErrorCode::FunctionError);
    assert_eq!(err.error_type.as_deref(), Some("ValueError"));
    assert!(err.traceback.unwrap().contains("bad input"));

    let slow = invoke(&h, "faulty", r#"{"action":"sleep"}"#).await;
    let err = slow.outcome.unwrap_err();
    assert_eq!(err.code, nimbus_core::ErrorCode::FunctionTimeout);

    let crashed = invoke(&h, "faulty", r#"{"action":"exit"}"#).await;
    let err = crashed.outcome.unwrap_err();
    assert_eq!(err.code, nimbus_core::ErrorCode::InstanceCrashed);
    assert!(
        err.message.contains("exited with code 3"),
        "{}",
        err.message
    );

    // The function keeps serving on fresh instances.
    let fine = invoke(&h, "faulty", r#"{"action":"ok"}"#).await;
    assert_eq!(fine.outcome.unwrap().get(), r#""ok""#);
    assert_eq!(fine.start_type, StartType::Cold);
}

#[tokio::test]
async fn capacity_is_bounded_and_excess_is_throttled() {
    let h = harness(|c| {
        c.queue_depth = 1;
        c.queue_timeout = Duration::from_millis(300);
    })
    .await;
    let mut f = new_function(
        "slow",
        "import time\ndef handle(e):\n    time.sleep(1)\n    return 1\n",
    );
    f.max_instances = Some(1);
    h.engine.create_function(f, "test").await.unwrap();
    let calls = (0..3).map(|_| h.engine.invoke(request("slow", "{}")));
    let results = futures::future::join_all(calls).await;
    let ok = results.iter().filter(|r| r.is_ok()).count();
    let throttled = results
        .iter()
        .filter(|r| matches!(r, Err(EngineError::Throttled(_))))
        .count();
    assert_eq!((ok, throttled), (1, 2), "{results:?}");
    assert_eq!(
        h.engine
            .live_instances(&h.engine.get_function("slow").await.unwrap().id),
        1
    );
}

#[tokio::test]
async fn waiting_invocations_get_the_instance_when_it_frees_up() {
    let h = harness(|_| {}).await;
    let mut f = new_function(
        "one",
        "import time\ndef handle(e):\n    time.sleep(0.1)\n    return 1\n",
    );
    f.max_instances = Some(1);
    h.engine.create_function(f, "test").await.unwrap();
    let calls = (0..4).map(|_| h.engine.invoke(request("one", "{}")));
    let results = futures::future::join_all(calls).await;
    let warm = results
        .iter()
        .map(|r| r.as_ref().unwrap())
        .filter(|r| r.start_type == StartType::Warm)
        .count();
    assert_eq!(
        warm, 3,
        "one cold start, then the same instance serves the queue"
    );
}

#[tokio::test]
async fn idle_instances_are_reaped_and_worn_ones_recycled() {
    let h = harness(|c| {
        c.idle_timeout = Duration::from_millis(300);
        c.max_invocations = 3;
    })
    .await;
    h.engine
        .create_function(new_function("reap", ECHO), "test")
        .await
        .unwrap();
    let id = h.engine.get_function("reap").await.unwrap().id;
    let ids: Vec<String> = {
        let mut ids = Vec::new();
        for _ in 0..4 {
            ids.push(invoke(&h, "reap", "{}").await.instance_id.unwrap());
        }
        ids
    };
    assert_eq!(ids[0], ids[2]);
    assert_ne!(
        ids[2], ids[3],
        "the instance is replaced after max_invocations"
    );
    assert_eq!(h.engine.live_instances(&id), 1);
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(h.engine.live_instances(&id), 0, "idle instance reaped");
}

#[tokio::test]
async fn every_invocation_is_recorded_with_logs() {
    let h = harness(|_| {}).await;
    let code =
        "def handle(event):\n    print('hello from', event['who'])\n    return {'ok': True}\n";
    h.engine
        .create_function(new_function("logs", code), "test")
        .await
        .unwrap();
    let r = invoke(&h, "logs", r#"{"who":"test"}"#).await;
    let record = h.engine.get_invocation(&r.request_id).await.unwrap();
    assert_eq!(record.status, InvocationStatus::Success);
    assert_eq!(record.version, 1);
    assert_eq!(record.alias_used.as_deref(), Some("latest"));
    assert_eq!(record.start_type, Some(StartType::Cold));
    assert!(record.logs.contains("hello from test"), "{:?}", record.logs);
    assert_eq!(record.input.as_deref(), Some(r#"{"who":"test"}"#));
    assert_eq!(record.output.as_deref(), Some(r#"{"ok":true}"#));
    assert!(record.duration_ms.unwrap() > 0.0);
    let listed = h
        .engine
        .list_invocations(
            "logs",
            &InvocationFilter {
                status: None,
                limit: 10,
            },
        )
        .await
        .unwrap();
    assert_eq!(listed.len(), 1);
}

#[tokio::test]
async fn deleting_a_function_stops_its_instances() {
    let h = harness(|_| {}).await;
    h.engine
        .create_function(new_function("gone", ECHO), "test")
        .await
        .unwrap();
    let id = h.engine.get_function("gone").await.unwrap().id;
    invoke(&h, "gone", "{}").await;
    assert_eq!(h.engine.live_instances(&id), 1);
    h.engine.delete_function("gone").await.unwrap();
    assert_eq!(h.engine.live_instances(&id), 0);
    let err = h.engine.invoke(request("gone", "{}")).await.unwrap_err();
    assert!(
        matches!(
            err,
            EngineError::NotFound {
                code: nimbus_core::ErrorCode::FunctionNotFound,
                ..
            }
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn alias_changes_keep_instances_and_deleting_a_version_stops_its_own() {
    let h = harness(|_| {}).await;
    let e = &h.engine;
    e.create_function(new_function("multi", ECHO), "test")
        .await
        .unwrap();
    let patch: FunctionPatch =
        serde_json::from_value(serde_json::json!({ "env_vars": { "V": "2" } })).unwrap();
    e.update_function("multi", patch, "test").await.unwrap();
    let routing = |pairs: &[(u32, u32)]| {
        let weights: Vec<_> = pairs
            .iter()
            .map(|(version, weight)| serde_json::json!({ "version": version, "weight": weight }))
            .collect();
        serde_json::json!({ "weights": weights })
    };
    let alias: nimbus_engine::NewAlias = serde_json::from_value(
        serde_json::json!({ "name": "prod", "routing_config": routing(&[(1, 100)]) }),
    )
    .unwrap();
    e.create_alias("multi", alias, "test").await.unwrap();
    let on = |alias: &str| InvokeRequest {
        alias: Some(alias.into()),
        ..request("multi", "{}")
    };
    assert_eq!(e.invoke(on("prod")).await.unwrap().version, 1);
    assert_eq!(e.invoke(on("latest")).await.unwrap().version, 2);
    let function_id = e.get_function("multi").await.unwrap().id;
    assert_eq!(e.live_instances(&function_id), 2);

    // Moving prod off version 1 leaves its instance warm for a rollback.
    let patch: nimbus_engine::AliasPatch =
        serde_json::from_value(serde_json::json!({ "routing_config": routing(&[(2, 100)]) }))
            .unwrap();
    e.update_alias("multi", "prod", patch, "test")
        .await
        .unwrap();
    assert_eq!(e.invoke(on("prod")).await.unwrap().version, 2);
    assert_eq!(e.live_instances(&function_id), 2);

    // Deleting version 1 stops its instance at once; version 2's stays.
    e.delete_version("multi", 1).await.unwrap();
    assert_eq!(e.live_instances(&function_id), 1);
    let explicit = InvokeRequest {
        version: Some(1),
        ..request("multi", "{}")
    };
    match e.invoke(explicit).await {
        Err(EngineError::NotFound { code, .. }) => {
            assert_eq!(code, nimbus_core::ErrorCode::VersionNotFound)
        }
        other => panic!("expected version_not_found, got {other:?}"),
    }
    assert_eq!(
        e.invoke(on("prod")).await.unwrap().start_type,
        StartType::Warm
    );
}

/// Stores `name` as a version deployed before today's rules for new code would have: the
/// handler and code as given, straight into the store.
async fn store_as_deployed_earlier(h: &Harness, name: &str, handler: &str, source: &str) {
    let handler: Handler = handler.parse().expect("a stored handler parses");
    let code = CodeBundle::from_inline(source, &handler, Runtime::Python311).unwrap();
    let at = nimbus_core::now();
    let function = Function {
        id: nimbus_core::ids::function_id(),
        name: name.into(),
        description: String::new(),
        config: FunctionConfig {
            runtime: Runtime::Python311,
            handler,
            code_hash: code.hash(),
            env_vars: Default::default(),
            memory_mb: 128,
            timeout_sec: 30,
            network: Default::default(),
            state: Default::default(),
        },
        code,
        max_instances: 5,
        status: FunctionStatus::Active,
        latest_version: 1,
        created_at: at,
        updated_at: at,
    };
    let first = FunctionVersion {
        function_id: function.id.clone(),
        version: 1,
        description: String::new(),
        config: function.config.clone(),
        code: function.code.clone(),
        created_at: at,
        created_by: "an earlier release".into(),
    };
    h.store.create_function(&function, &first).await.unwrap();
}

fn patch(body: serde_json::Value) -> FunctionPatch {
    serde_json::from_value(body).unwrap()
}

/// Versions are immutable: one deployed before a rule for new code existed reads back,
/// starts and serves, and its other settings can still change; code or a handler that a
/// request brings meets the rule. The rules: a Python handler module is not named after a
/// standard-library module (`code.py`), a module path is at most 10 modules deep.
#[tokio::test]
async fn versions_deployed_before_a_rule_of_new_code_keep_working() {
    let h = harness(|_| {}).await;
    let e = &h.engine;
    let deep = format!(
        "{}.handle",
        (0..12)
            .map(|i| format!("m{i}"))
            .collect::<Vec<_>>()
            .join(".")
    );
    let source = |says: &str| format!("def handle(event):\n    return '{says}'\n");
    store_as_deployed_earlier(&h, "shadowing", "code.handle", &source("mine")).await;
    store_as_deployed_earlier(&h, "deep", &deep, &source("deep")).await;
    assert_eq!(e.list_functions(10, 0).await.unwrap().items.len(), 2);
    for (name, says) in [("shadowing", "\"mine\""), ("deep", "\"deep\"")] {
        let out = invoke(&h, name, "{}").await;
        assert_eq!(out.outcome.unwrap().get(), says, "{name}");
        assert_eq!(out.start_type, StartType::Cold);
        let updated = e
            .update_function(name, patch(serde_json::json!({ "memory_mb": 256 })), "test")
            .await
            .unwrap();
        assert_eq!(updated.published_version, Some(2), "{name}");
        let out = invoke(&h, name, "{}").await;
        assert_eq!((out.version, out.outcome.unwrap().get()), (2, says));
    }

    // New code under the shadowing handler, or the deep handler named again: refused, and
    // the versions stay as they were.
    let err = e
        .update_function(
            "shadowing",
            patch(serde_json::json!({ "code": source("new") })),
            "test",
        )
        .await
        .unwrap_err();
    match &err {
        EngineError::InvalidCode { error, .. } => {
            assert_eq!(error.error_type, "InvalidHandler", "{error:?}");
            assert!(error.message.contains("'code'"), "{}", error.message);
        }
        other => panic!("expected InvalidCode, got {other:?}"),
    }
    let err = e
        .update_function(
            "deep",
            patch(serde_json::json!({ "handler": deep })),
            "test",
        )
        .await
        .unwrap_err();
    match &err {
        EngineError::Validation(v) => {
            assert_eq!(v.field, "handler");
            assert!(v.message.contains("12 modules"), "{}", v.message);
        }
        other => panic!("expected a validation error, got {other:?}"),
    }
    for name in ["shadowing", "deep"] {
        assert_eq!(e.get_function(name).await.unwrap().latest_version, 2);
    }

    // New functions alike.
    let new = |name: &str, handler: &str| -> NewFunction {
        serde_json::from_value(
            serde_json::json!({ "name": name, "code": source("x"), "handler": handler }),
        )
        .unwrap()
    };
    let err = e
        .create_function(new("queue", "queue.handle"), "test")
        .await
        .unwrap_err();
    assert!(
        matches!(&err, EngineError::InvalidCode { error, .. } if error.error_type == "InvalidHandler"),
        "{err:?}"
    );
    let err = e
        .create_function(new("deeper", &deep), "test")
        .await
        .unwrap_err();
    assert!(
        matches!(&err, EngineError::Validation(v) if v.field == "handler"),
        "{err:?}"
    );
}
