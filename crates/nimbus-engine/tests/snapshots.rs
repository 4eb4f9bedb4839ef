//! The snapshot manager against real parts: a SQLite index, real Python templates forked
//! by the (unisolated) process driver. The server's tests cover isolated forks.

use std::time::{Duration, Instant};

use nimbus_core::{SnapshotStatus, StartType, Trigger};
use nimbus_engine::{Engine, EngineConfig, FunctionPatch, InvokeRequest, NewFunction};
use serde_json::json;
use serde_json::value::RawValue;

mod common;

use common::Harness;

/// An engine whose instances retire after one invocation, so every invocation starts one.
async fn harness(tune: impl FnOnce(&mut EngineConfig)) -> Harness {
    common::harness(|config| {
        config.max_invocations = 1;
        tune(config);
    })
    .await
}

fn request(function: &str, version: Option<u32>) -> InvokeRequest {
    InvokeRequest {
        function: function.into(),
        version,
        alias: None,
        session_key: None,
        event: RawValue::from_string("{}".into()).unwrap(),
        trigger: Trigger::Http,
    }
}

async fn create(e: &Engine, name: &str, code: &str) {
    let new: NewFunction = serde_json::from_value(json!({ "name": name, "code": code })).unwrap();
    e.create_function(new, "test").await.unwrap();
}

async fn publish(e: &Engine, name: &str, code: &str) {
    let patch: FunctionPatch = serde_json::from_value(json!({ "code": code })).unwrap();
    e.update_function(name, patch, "test").await.unwrap();
}

/// Waits until `version`'s snapshot has status `status` (and, ready, a resident template).
async fn wait_for(e: &Engine, name: &str, version: u32, status: SnapshotStatus) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let all = e.list_snapshots(name).await.unwrap();
        if all.iter().any(|s| {
            s.snapshot.version == version
                && s.snapshot.status == status
                && (status != SnapshotStatus::Ready || s.resident)
        }) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{version} never {status}: {all:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn code(word: &str) -> String {
    format!("def handle(event):\n    return {word:?}\n")
}

#[tokio::test]
async fn a_published_version_gets_a_template_and_new_instances_fork_from_it() {
    let h = harness(|_| {}).await;
    let e = &h.engine;
    create(e, "f", &code("one")).await;
    wait_for(e, "f", 1, SnapshotStatus::Ready).await;
    for _ in 0..3 {
        let r = e.invoke(request("f", None)).await.unwrap();
        assert_eq!(r.start_type, StartType::Template);
        assert_eq!(r.outcome.unwrap().get(), r#""one""#);
    }
    let all = e.list_snapshots("f").await.unwrap();
    assert_eq!(all.len(), 1);
    // Forks are recorded behind the invocations (apart from restores from disk).
    let deadline = Instant::now() + Duration::from_secs(5);
    while e.list_snapshots("f").await.unwrap()[0].snapshot.fork_count < 3 {
        assert!(Instant::now() < deadline, "forks not recorded");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stats = e.snapshot_stats().await.unwrap();
    assert_eq!(stats.by_status["ready"], 1);
    assert_eq!(stats.resident_templates, 1);
    assert!(stats.resident_bytes > 1 << 20, "{stats:?}");
    assert_eq!((stats.forks, stats.restores), (3, 0));
}

#[tokio::test]
async fn a_failing_build_is_recorded_and_instances_start_cold() {
    let h = harness(|_| {}).await;
    let e = &h.engine;
    let broken = "import nimbus\n\n@nimbus.before_snapshot\ndef close():\n    raise RuntimeError('cannot close the pool')\n\ndef handle(event):\n    return 'still works'\n";
    create(e, "b", broken).await;
    wait_for(e, "b", 1, SnapshotStatus::Failed).await;
    let row = &e.list_snapshots("b").await.unwrap()[0];
    let message = row.snapshot.error_message.as_deref().unwrap();
    assert!(
        message.contains(
            "@nimbus.before_snapshot hook close raised RuntimeError: cannot close the pool"
        ),
        "{message}"
    );
    let r = e.invoke(request("b", None)).await.unwrap();
    assert_eq!(r.start_type, StartType::Cold);
    assert_eq!(r.outcome.unwrap().get(), r#""still works""#);
    // Not retried by itself: the same code would fail the same way.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let again = &e.list_snapshots("b").await.unwrap()[0];
    assert_eq!(again.snapshot.status, SnapshotStatus::Failed);
    // On request it is.
    let (started, view) = e.build_snapshot("b", Some(1), true).await.unwrap();
    assert!(started);
    assert_eq!(view.snapshot.status, SnapshotStatus::Failed);
}

#[tokio::test]
async fn at_most_max_per_function_stay_resident_and_routed_versions_are_kept_first() {
    let h = harness(|c| c.snapshots.max_per_function = 2).await;
    let e = &h.engine;
    create(e, "m", &code("v1")).await;
    wait_for(e, "m", 1, SnapshotStatus::Ready).await;
    let alias: nimbus_engine::NewAlias = serde_json::from_value(json!({
        "name": "prod",
        "routing_config": { "weights": [{ "version": 1, "weight": 100 }] }
    }))
    .unwrap();
    e.create_alias("m", alias, "test").await.unwrap();
    publish(e, "m", &code("v2")).await;
    wait_for(e, "m", 2, SnapshotStatus::Ready).await;
    publish(e, "m", &code("v3")).await;
    wait_for(e, "m", 3, SnapshotStatus::Ready).await;
    // Version 2 is routed by nothing (latest moved on to 3): it made room.
    wait_for(e, "m", 2, SnapshotStatus::Expired).await;
    let resident: Vec<u32> = e
        .list_snapshots("m")
        .await
        .unwrap()
        .iter()
        .filter(|s| s.resident)
        .map(|s| s.snapshot.version)
        .collect();
    assert_eq!(resident.len(), 2);
    assert!(
        resident.contains(&1) && resident.contains(&3),
        "{resident:?}"
    );
    // An expired snapshot's version starts cold, and that schedules its rebuild.
    let r = e.invoke(request("m", Some(2))).await.unwrap();
    assert_eq!(r.start_type, StartType::Cold);
    assert_eq!(r.outcome.unwrap().get(), r#""v2""#);
    wait_for(e, "m", 2, SnapshotStatus::Ready).await;
}

#[tokio::test]
async fn the_memory_budget_evicts_the_least_recently_used_template() {
    let h = harness(|c| c.snapshots.memory_budget = 1).await;
    let e = &h.engine;
    create(e, "x", &code("x")).await;
    wait_for(e, "x", 1, SnapshotStatus::Ready).await;
    create(e, "y", &code("y")).await;
    wait_for(e, "y", 1, SnapshotStatus::Ready).await;
    wait_for(e, "x", 1, SnapshotStatus::Expired).await;
    let row = &e.list_snapshots("x").await.unwrap()[0];
    assert!(
        row.snapshot
            .error_message
            .as_deref()
            .unwrap()
            .contains("memory budget"),
        "{row:?}"
    );
    let stats = e.snapshot_stats().await.unwrap();
    assert_eq!(stats.resident_templates, 1);
}

#[tokio::test]
async fn cleanup_removes_what_serves_no_more_and_a_dry_run_only_reports_it() {
    let h = harness(|_| {}).await;
    let e = &h.engine;
    create(e, "ok", &code("ok")).await;
    create(e, "bad", "import nimbus\n@nimbus.before_snapshot\ndef f():\n    raise ValueError('no')\ndef handle(event):\n    return 1\n").await;
    wait_for(e, "ok", 1, SnapshotStatus::Ready).await;
    wait_for(e, "bad", 1, SnapshotStatus::Failed).await;
    let dry = e.cleanup_snapshots(true).await.unwrap();
    assert_eq!(dry.removed.len(), 1);
    assert_eq!(dry.removed[0].snapshot.status, SnapshotStatus::Failed);
    assert_eq!(e.list_snapshots("bad").await.unwrap().len(), 1);
    let done = e.cleanup_snapshots(false).await.unwrap();
    assert_eq!(done.removed.len(), 1);
    assert!(e.list_snapshots("bad").await.unwrap().is_empty());
    assert_eq!(e.list_snapshots("ok").await.unwrap().len(), 1);
}

#[tokio::test]
async fn deleting_a_snapshot_stops_new_forks_from_it() {
    let h = harness(|_| {}).await;
    let e = &h.engine;
    create(e, "d", &code("d")).await;
    wait_for(e, "d", 1, SnapshotStatus::Ready).await;
    let id = e.list_snapshots("d").await.unwrap()[0].snapshot.id.clone();
    e.delete_snapshot("d", &id).await.unwrap();
    assert!(e.list_snapshots("d").await.unwrap().is_empty());
    let r = e.invoke(request("d", None)).await.unwrap();
    assert_eq!(r.start_type, StartType::Cold);
    match e.delete_snapshot("d", &id).await {
        Err(nimbus_engine::EngineError::NotFound { code, .. }) => {
            assert_eq!(code, nimbus_core::ErrorCode::SnapshotNotFound)
        }
        other => panic!("expected snapshot_not_found, got {other:?}"),
    }
}

#[tokio::test]
async fn a_template_whose_init_left_a_thread_running_is_refused() {
    let h = harness(|_| {}).await;
    let e = &h.engine;
    let code = "import threading, time\nthreading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n\ndef handle(event):\n    return 'ok'\n";
    create(e, "threads", code).await;
    wait_for(e, "threads", 1, SnapshotStatus::Failed).await;
    let row = &e.list_snapshots("threads").await.unwrap()[0];
    let message = row.snapshot.error_message.as_deref().unwrap();
    assert!(
        message.contains("a template must be a single process"),
        "{message}"
    );
    let r = e.invoke(request("threads", None)).await.unwrap();
    assert_eq!(r.start_type, StartType::Cold);
}
