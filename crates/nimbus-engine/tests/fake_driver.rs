//! The engine's own logic — placement, queueing, recycling, session affinity — on
//! in-process fake workers ([`FakeDriver`]), so it is tested in milliseconds and without
//! a language runtime's behaviour in the way. The real-worker tests are in `engine.rs`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use nimbus_core::{ErrorCode, StartType, Trigger};
use nimbus_engine::{EngineConfig, EngineError, InvokeRequest, InvokeResponse, NewFunction};
use nimbus_testkit::fake_driver::FakeDriver;
use serde_json::value::RawValue;
use serde_json::{json, Value};

mod common;

use common::Harness;

/// An engine on `driver`, starting every instance cold (the fake keeps no templates).
async fn harness(driver: &Arc<FakeDriver>, tune: impl FnOnce(&mut EngineConfig)) -> Harness {
    common::harness_on(driver.clone(), |config| {
        config.snapshots.enabled = false;
        tune(config);
    })
    .await
}

/// Deploys function `name` with `fields` (JSON) added; the fake worker ignores the code.
async fn deploy(h: &Harness, name: &str, fields: Value) {
    let mut function = json!({"name": name, "code": "def handle(event):\n    return event\n"});
    function
        .as_object_mut()
        .unwrap()
        .extend(fields.as_object().unwrap().clone());
    let function: NewFunction = serde_json::from_value(function).unwrap();
    h.engine.create_function(function, "test").await.unwrap();
}

fn request(function: &str, session: Option<&str>, event: Value) -> InvokeRequest {
    InvokeRequest {
        function: function.into(),
        version: None,
        alias: None,
        session_key: session.map(str::to_owned),
        event: RawValue::from_string(event.to_string()).unwrap(),
        trigger: Trigger::Http,
    }
}

async fn invoke(h: &Harness, function: &str, event: Value) -> InvokeResponse {
    h.engine
        .invoke(request(function, None, event))
        .await
        .unwrap()
}

/// Runs `req` in a task of its own, started `after` from now.
fn spawn_after(
    h: &Harness,
    after: Duration,
    req: InvokeRequest,
) -> tokio::task::JoinHandle<Result<InvokeResponse, EngineError>> {
    let engine = h.engine.clone();
    tokio::spawn(async move {
        tokio::time::sleep(after).await;
        engine.invoke(req).await
    })
}

/// Waits (up to a second) until `check` holds.
async fn eventually(what: &str, check: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(1);
    while !check() {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn an_idle_instance_serves_and_a_new_one_starts_only_when_all_are_busy() {
    let driver = Arc::new(FakeDriver::new());
    let h = harness(&driver, |_| {}).await;
    deploy(&h, "echo", json!({"max_instances": 2})).await;
    let deployed = driver.launches(); // the deploy's check that the code loads
    let first = invoke(&h, "echo", json!({"n": 1})).await;
    assert_eq!(first.outcome.unwrap().get(), r#"{"n":1}"#);
    assert_eq!(first.start_type, StartType::Cold);
    let second = invoke(&h, "echo", json!({"n": 2})).await;
    assert_eq!(second.start_type, StartType::Warm);
    assert_eq!(second.instance_id, first.instance_id);
    assert_eq!(driver.launches(), deployed + 1);

    // Two at once: the idle instance takes one, a new instance the other.
    let slow = json!({"sleep_ms": 200});
    let a = spawn_after(&h, Duration::ZERO, request("echo", None, slow.clone()));
    let b = spawn_after(&h, Duration::from_millis(50), request("echo", None, slow));
    let (a, b) = (a.await.unwrap().unwrap(), b.await.unwrap().unwrap());
    let mut types = [a.start_type, b.start_type];
    types.sort_by_key(|t| t.as_str());
    assert_eq!(types, [StartType::Cold, StartType::Warm]);
    assert_ne!(a.instance_id, b.instance_id);
    assert_eq!(driver.launches(), deployed + 2);
    assert_eq!(h.engine.live_instances(&first.function_id), 2);
}

#[tokio::test]
async fn at_the_instance_limit_invocations_queue_and_past_the_queue_are_throttled() {
    let driver = Arc::new(FakeDriver::new());
    let h = harness(&driver, |c| {
        c.queue_depth = 1;
        c.queue_timeout = Duration::from_secs(5);
    })
    .await;
    deploy(&h, "one", json!({"max_instances": 1})).await;
    let slow = || request("one", None, json!({"sleep_ms": 300}));
    let running = spawn_after(&h, Duration::ZERO, slow());
    let queued = spawn_after(&h, Duration::from_millis(100), slow());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let refused = h.engine.invoke(slow()).await.unwrap_err();
    assert!(matches!(refused, EngineError::Throttled(_)), "{refused:?}");
    let (running, queued) = (
        running.await.unwrap().unwrap(),
        queued.await.unwrap().unwrap(),
    );
    // The queued invocation waited for the instance rather than starting another.
    assert_eq!(queued.start_type, StartType::Warm);
    assert_eq!(queued.instance_id, running.instance_id);
}

#[tokio::test]
async fn an_invocation_waiting_past_the_queue_timeout_is_throttled() {
    let driver = Arc::new(FakeDriver::new());
    let h = harness(&driver, |c| c.queue_timeout = Duration::from_millis(100)).await;
    deploy(&h, "one", json!({"max_instances": 1})).await;
    let running = spawn_after(
        &h,
        Duration::ZERO,
        request("one", None, json!({"sleep_ms": 500})),
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    let waited = Instant::now();
    let refused = h.engine.invoke(request("one", None, json!({}))).await;
    assert!(
        matches!(refused, Err(EngineError::Throttled(_))),
        "{refused:?}"
    );
    assert!(waited.elapsed() < Duration::from_millis(400));
    assert!(running.await.unwrap().unwrap().outcome.is_ok());
}

#[tokio::test]
async fn an_instance_is_replaced_after_max_invocations() {
    let driver = Arc::new(FakeDriver::new());
    let h = harness(&driver, |c| c.max_invocations = 2).await;
    deploy(&h, "echo", json!({})).await;
    let first = invoke(&h, "echo", json!(1)).await;
    let second = invoke(&h, "echo", json!(2)).await;
    let third = invoke(&h, "echo", json!(3)).await;
    assert_eq!(second.instance_id, first.instance_id);
    assert_eq!(third.start_type, StartType::Cold);
    assert_ne!(third.instance_id, first.instance_id);
    // The worn-out instance and the deploy's check are stopped: one worker is left.
    eventually("retired workers are stopped", || driver.running() == 1).await;
    assert_eq!(h.engine.live_instances(&first.function_id), 1);
}

#[tokio::test]
async fn a_crashed_instance_fails_its_invocation_and_is_replaced() {
    let driver = Arc::new(FakeDriver::new());
    let h = harness(&driver, |_| {}).await;
    deploy(&h, "echo", json!({})).await;
    let first = invoke(&h, "echo", json!({})).await;
    let crashed = invoke(&h, "echo", json!({"crash": true})).await;
    assert_eq!(crashed.instance_id, first.instance_id);
    let error = crashed.outcome.unwrap_err();
    assert_eq!(error.code, ErrorCode::InstanceCrashed);
    assert!(error.message.contains("exited with code 1"), "{error:?}");
    assert_eq!(h.engine.live_instances(&first.function_id), 0);
    let next = invoke(&h, "echo", json!({})).await;
    assert_eq!(next.start_type, StartType::Cold);
    assert_ne!(next.instance_id, first.instance_id);
}

#[tokio::test]
async fn a_handler_that_fails_to_load_is_refused_at_deploy() {
    let driver = Arc::new(FakeDriver::new().failing_init("no such module"));
    let h = harness(&driver, |_| {}).await;
    let function: NewFunction =
        serde_json::from_value(json!({"name": "broken", "code": "import nothing\n"})).unwrap();
    match h.engine.create_function(function, "test").await {
        Err(EngineError::InvalidCode { error, .. }) => {
            assert_eq!(error.error_type, "FakeInitError");
            assert_eq!(error.message, "no such module");
        }
        other => panic!("expected invalid code, got {other:?}"),
    }
}

#[tokio::test]
async fn sessions_stay_on_their_instances_and_a_busy_one_sends_a_new_session_elsewhere() {
    let driver = Arc::new(FakeDriver::new());
    let h = harness(&driver, |_| {}).await;
    let affinity = json!({"max_instances": 2, "state_config": {"session_affinity": true}});
    deploy(&h, "sticky", affinity).await;
    let slow = json!({"sleep_ms": 200});
    // While session a's instance is busy, session b gets an instance of its own.
    let a = spawn_after(
        &h,
        Duration::ZERO,
        request("sticky", Some("a"), slow.clone()),
    );
    let b = spawn_after(
        &h,
        Duration::from_millis(50),
        request("sticky", Some("b"), slow),
    );
    let (a, b) = (a.await.unwrap().unwrap(), b.await.unwrap().unwrap());
    assert_ne!(a.instance_id, b.instance_id);
    for _ in 0..3 {
        for (session, first) in [("a", &a), ("b", &b)] {
            let again = h
                .engine
                .invoke(request("sticky", Some(session), json!({})))
                .await
                .unwrap();
            assert_eq!(again.instance_id, first.instance_id, "session {session}");
            assert_eq!(again.start_type, StartType::Warm);
        }
    }
}

#[tokio::test]
async fn a_sessions_invocations_run_one_at_a_time_on_its_instance() {
    let driver = Arc::new(FakeDriver::new());
    let h = harness(&driver, |_| {}).await;
    let affinity = json!({"max_instances": 3, "state_config": {"session_affinity": true}});
    deploy(&h, "sticky", affinity).await;
    let deployed = driver.launches();
    let calls: Vec<_> = (0..3)
        .map(|n| {
            let event = json!({"sleep_ms": 100, "n": n});
            spawn_after(
                &h,
                Duration::from_millis(20 * n),
                request("sticky", Some("s"), event),
            )
        })
        .collect();
    let started = Instant::now();
    let mut ids = Vec::new();
    for call in calls {
        ids.push(call.await.unwrap().unwrap().instance_id);
    }
    // In turn, on the one instance, though the function could have started three.
    assert!(ids.iter().all(|id| *id == ids[0]), "{ids:?}");
    assert_eq!(driver.launches(), deployed + 1);
    assert!(started.elapsed() >= Duration::from_millis(300));
}
