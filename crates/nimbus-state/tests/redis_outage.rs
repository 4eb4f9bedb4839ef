//! Redis going away: every call fails fast with `state_unavailable` naming the server, and
//! works again by itself once Redis is back. Runs a private `redis-server` on a free port.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{free_port, RedisServer, LIMITS};
use nimbus_state::{Bucket, RedisStore, State, StateResult};

/// The longest a call may take to fail while Redis is away.
const FAIL_FAST: Duration = Duration::from_secs(2);
/// The longest the store may take to work again once Redis is back.
const RECOVERY: Duration = Duration::from_secs(5);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_fail_fast_while_redis_is_away_and_recover_by_themselves() {
    let port = free_port();
    // Connecting does not need the server: the store connects on first use.
    let store = RedisStore::connect(&format!("redis://127.0.0.1:{port}"), "nimbus-outage")
        .await
        .unwrap();
    let state = State::new(Arc::new(store));
    let server = format!("127.0.0.1:{port}");

    let mut slowest = fails_fast(&state, &server, "not started yet").await;
    let redis = RedisServer::start(port, &["--save", "", "--appendonly", "no"]);
    recovers(&state, "started").await;

    // Killed: connections are refused.
    drop(redis);
    slowest = slowest.max(fails_fast(&state, &server, "killed").await);
    let redis = RedisServer::start(port, &["--save", "", "--appendonly", "no"]);
    recovers(&state, "restarted").await;

    // Hung: connected, but no answer.
    redis.signal("STOP");
    slowest = slowest.max(fails_fast(&state, &server, "stopped").await);
    redis.signal("CONT");
    recovers(&state, "continued").await;
    eprintln!("slowest failure while Redis was away: {slowest:?}");
}

/// Checks that each kind of call fails within [`FAIL_FAST`] with `state_unavailable`
/// naming the server; returns the slowest.
async fn fails_fast(state: &State, server: &str, how: &str) -> Duration {
    let bucket = Bucket::function("fn_outage");
    let mut slowest = Duration::ZERO;
    for call in ["get", "set", "incr", "touch_session", "get"] {
        let started = Instant::now();
        let error = match call {
            "get" => state.get(&bucket, "k").await.map(drop),
            "set" => state
                .set(&bucket, "k", "1", None, None, LIMITS)
                .await
                .map(drop),
            "incr" => state.incr(&bucket, "n", 1, None, LIMITS).await.map(drop),
            _ => state
                .store()
                .touch_session("fn_outage", "s", None, Duration::from_secs(60))
                .await
                .map(drop),
        }
        .expect_err(&format!("{call} succeeded while Redis was {how}"));
        let took = started.elapsed();
        assert_eq!(
            error.code().as_str(),
            "state_unavailable",
            "{call} ({how}): {error}"
        );
        assert!(
            error.to_string().contains(server),
            "{call} ({how}): {error}"
        );
        assert!(
            took <= FAIL_FAST,
            "{call} took {took:?} to fail while Redis was {how}"
        );
        slowest = slowest.max(took);
    }
    slowest
}

/// Checks that calls work again within [`RECOVERY`], with no help.
async fn recovers(state: &State, how: &str) {
    let bucket = Bucket::function("fn_outage");
    let started = Instant::now();
    let attempt = || async {
        let version = state
            .set(&bucket, "k", "\"back\"", None, None, LIMITS)
            .await?;
        StateResult::Ok((version, state.get(&bucket, "k").await?))
    };
    loop {
        match attempt().await {
            Ok((version, got)) => {
                let got = got.unwrap();
                assert_eq!((got.value.as_str(), got.version), ("\"back\"", version));
                return;
            }
            Err(e) if started.elapsed() < RECOVERY => {
                assert_eq!(e.code().as_str(), "state_unavailable", "{e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("still failing {RECOVERY:?} after Redis was {how}: {e}"),
        }
    }
}
