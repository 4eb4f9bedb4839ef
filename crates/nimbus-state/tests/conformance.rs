//! One behaviour, every backend: each test here runs against the embedded store (in a
//! temporary directory), against Redis at `redis://127.0.0.1:6379` (under a prefix of its
//! own, whose keys are deleted afterwards) and against the in-process store of invocation
//! state. Start Redis with `scripts/ensure-services.sh`.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nimbus_state::{
    Bucket, EmbeddedStore, KeyInfo, Limits, MemoryStore, RedisStore, State, StateError, Versioned,
};
use tokio::task::JoinSet;

const REDIS_URL: &str = "redis://127.0.0.1:6379";

const LIMITS: Limits = Limits {
    max_value_bytes: 1024,
    max_keys: 100,
};

/// A backend for one test, and what to clean up after it.
struct Backend {
    state: State,
    _dir: Option<tempfile::TempDir>,
    _keys: Option<RedisKeys>,
}

impl Backend {
    fn embedded() -> Backend {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("state.redb")).unwrap();
        Backend {
            state: State::new(Arc::new(store)),
            _dir: Some(dir),
            _keys: None,
        }
    }

    fn memory() -> Backend {
        Backend {
            state: State::new(Arc::new(MemoryStore::new())),
            _dir: None,
            _keys: None,
        }
    }

    async fn redis() -> Backend {
        let pong: String = ::redis::cmd("PING").query(&mut redis_conn()).unwrap();
        assert_eq!(pong, "PONG");
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
        let prefix = format!(
            "nimbus-test-{}-{}-{}",
            std::process::id(),
            nanos.subsec_nanos(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let store = RedisStore::connect(REDIS_URL, &prefix).await.unwrap();
        Backend {
            state: State::new(Arc::new(store)),
            _dir: None,
            _keys: Some(RedisKeys { prefix }),
        }
    }
}

fn redis_conn() -> ::redis::Connection {
    ::redis::Client::open(REDIS_URL)
        .unwrap()
        .get_connection()
        .unwrap_or_else(|e| {
            panic!("Redis is not running at {REDIS_URL} ({e}): run scripts/ensure-services.sh")
        })
}

/// The keys of one test's prefix, deleted when the test ends (passed or not).
struct RedisKeys {
    prefix: String,
}

impl Drop for RedisKeys {
    fn drop(&mut self) {
        let mut conn = redis_conn();
        let keys: Vec<String> = ::redis::cmd("SCAN")
            .cursor_arg(0)
            .arg("MATCH")
            .arg(format!("{}:*", self.prefix))
            .arg("COUNT")
            .arg(1000)
            .clone()
            .iter(&mut conn)
            .unwrap()
            .collect();
        for chunk in keys.chunks(500) {
            ::redis::cmd("DEL")
                .arg(chunk)
                .query::<()>(&mut conn)
                .unwrap();
        }
    }
}

/// Runs each test on every backend: `embedded::<test>`, `redis::<test>`, `memory::<test>`.
macro_rules! conformance {
    ($($test:ident),* $(,)?) => {
        mod embedded {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    let backend = super::Backend::embedded();
                    super::$test(&backend.state).await;
                }
            )*
        }
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    let backend = super::Backend::memory();
                    super::$test(&backend.state).await;
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    let backend = super::Backend::redis().await;
                    super::$test(&backend.state).await;
                }
            )*
        }
    };
}

conformance!(
    values_round_trip_and_keys_list_and_go,
    counters_add_exactly_in_64_bits,
    versions_grow_and_guard_optimistic_writes,
    concurrent_increments_are_all_counted,
    optimistic_read_modify_write_loses_no_update,
    expired_keys_are_gone_for_every_operation,
    limits_refuse_and_write_nothing,
    sessions_are_registered_expire_and_purge,
    buckets_are_isolated,
);

async fn values_round_trip_and_keys_list_and_go(state: &State) {
    let b = Bucket::session("fn_a", "s1");
    assert_eq!(state.get(&b, "doc").await.unwrap(), None);
    assert!(!state.exists(&b, "doc").await.unwrap());

    // Values are stored as given, byte for byte: spacing, key order, escapes, numbers
    // beyond 64 bits.
    let values = [
        r#"{"b": [1, 2.50, "ü\n\"x\""],  "a":null}"#,
        "123456789012345678901234567890",
        "-0.0",
        "\"\"",
        "[]",
    ];
    for (i, value) in values.iter().enumerate() {
        let key = format!("v{i}");
        let version = state
            .set(&b, &key, value, None, None, LIMITS)
            .await
            .unwrap();
        assert_eq!(
            state.get(&b, &key).await.unwrap(),
            Some(Versioned {
                value: value.to_string(),
                version
            })
        );
        assert!(state.exists(&b, &key).await.unwrap());
    }

    for key in ["cart:1", "cart:2", "cart*x", "other"] {
        state.set(&b, key, "1", None, None, LIMITS).await.unwrap();
    }
    assert_eq!(
        state.keys(&b, "cart:*").await.unwrap(),
        ["cart:1", "cart:2"]
    );
    assert_eq!(state.keys(&b, r"cart\*?").await.unwrap(), ["cart*x"]);
    assert_eq!(
        state.keys(&b, "nothing*").await.unwrap(),
        Vec::<String>::new()
    );
    assert_eq!(
        state.keys(&b, "*").await.unwrap(),
        ["cart*x", "cart:1", "cart:2", "other", "v0", "v1", "v2", "v3", "v4"]
    );

    let listed = state.store().list(&b).await.unwrap();
    let v0 = &listed[4];
    assert_eq!(
        (v0.key.as_str(), v0.size, v0.ttl_ms),
        ("v0", values[0].len(), None)
    );
    assert_eq!(
        v0.version,
        state.get(&b, "v0").await.unwrap().unwrap().version
    );

    assert!(state.delete(&b, "other").await.unwrap());
    assert!(!state.delete(&b, "other").await.unwrap());
    assert_eq!(state.get(&b, "other").await.unwrap(), None);
    assert!(!state.exists(&b, "other").await.unwrap());

    assert_eq!(state.store().clear(&b).await.unwrap(), 8);
    assert!(state.store().list(&b).await.unwrap().is_empty());
    assert_eq!(state.get(&b, "v0").await.unwrap(), None);
    assert_eq!(state.store().clear(&b).await.unwrap(), 0);
}

async fn counters_add_exactly_in_64_bits(state: &State) {
    let b = Bucket::function("fn_a");
    assert_eq!(state.incr(&b, "n", 1, None, LIMITS).await.unwrap(), 1);
    assert_eq!(state.incr(&b, "n", 5, None, LIMITS).await.unwrap(), 6);
    // decr is a negative increment.
    assert_eq!(state.incr(&b, "n", -10, None, LIMITS).await.unwrap(), -4);
    let n = state.get(&b, "n").await.unwrap().unwrap();
    assert_eq!(n.value, "-4");

    // Only integers written plainly count; anything else is refused and left alone.
    for value in ["\"7\"", "1.5", "1e3", "007", "-0", "[1]", "true", "null"] {
        let version = state.set(&b, "x", value, None, None, LIMITS).await.unwrap();
        let e = state.incr(&b, "x", 1, None, LIMITS).await.unwrap_err();
        assert_eq!(e.code().as_str(), "not_an_integer", "{value}: {e}");
        assert!(e.to_string().contains("\"x\""), "{e}");
        assert_eq!(
            state.get(&b, "x").await.unwrap(),
            Some(Versioned {
                value: value.into(),
                version
            })
        );
    }

    // Exact at the edges of the 64-bit range, and refused past them.
    state
        .set(&b, "big", "9223372036854775806", None, None, LIMITS)
        .await
        .unwrap();
    assert_eq!(
        state.incr(&b, "big", 1, None, LIMITS).await.unwrap(),
        i64::MAX
    );
    let before = state.get(&b, "big").await.unwrap().unwrap();
    assert_eq!(before.value, "9223372036854775807");
    let e = state.incr(&b, "big", 1, None, LIMITS).await.unwrap_err();
    assert_eq!(e.code().as_str(), "not_an_integer");
    assert!(e.to_string().contains("overflow"), "{e}");
    assert_eq!(state.get(&b, "big").await.unwrap(), Some(before));

    assert_eq!(
        state
            .incr(&b, "small", i64::MIN, None, LIMITS)
            .await
            .unwrap(),
        i64::MIN
    );
    let e = state.incr(&b, "small", -1, None, LIMITS).await.unwrap_err();
    assert!(e.to_string().contains("overflow"), "{e}");
    assert_eq!(
        state.get(&b, "small").await.unwrap().unwrap().value,
        "-9223372036854775808"
    );
}

async fn versions_grow_and_guard_optimistic_writes(state: &State) {
    let b = Bucket::session("fn_a", "s1");
    let mut versions = Vec::new();
    versions.push(state.set(&b, "a", "1", None, None, LIMITS).await.unwrap());
    versions.push(state.set(&b, "a", "2", None, None, LIMITS).await.unwrap());
    assert_eq!(
        state.get(&b, "a").await.unwrap().unwrap().version,
        versions[1]
    );

    // With the current version: written.
    let current = versions[1];
    versions.push(
        state
            .set(&b, "a", "3", None, Some(current), LIMITS)
            .await
            .unwrap(),
    );
    // With a stale one: refused, naming the current version, nothing written.
    let latest = versions[2];
    assert_eq!(
        state.set(&b, "a", "4", None, Some(current), LIMITS).await,
        Err(StateError::Conflict {
            expected: current,
            current: latest
        })
    );
    assert_eq!(
        state.get(&b, "a").await.unwrap(),
        Some(Versioned {
            value: "3".into(),
            version: latest
        })
    );

    // Expected 0: only if absent.
    versions.push(
        state
            .set(&b, "new", "1", None, Some(0), LIMITS)
            .await
            .unwrap(),
    );
    assert_eq!(
        state.set(&b, "new", "2", None, Some(0), LIMITS).await,
        Err(StateError::Conflict {
            expected: 0,
            current: versions[3]
        })
    );
    assert_eq!(
        state.set(&b, "absent", "1", None, Some(7), LIMITS).await,
        Err(StateError::Conflict {
            expected: 7,
            current: 0
        })
    );
    assert_eq!(state.get(&b, "absent").await.unwrap(), None);

    // Counters take versions from the same sequence; expire keeps a key's version.
    state.incr(&b, "n", 1, None, LIMITS).await.unwrap();
    versions.push(state.get(&b, "n").await.unwrap().unwrap().version);
    assert!(state
        .expire(&b, "n", Some(Duration::from_secs(60)))
        .await
        .unwrap());
    assert_eq!(
        state.get(&b, "n").await.unwrap().unwrap().version,
        versions[4]
    );

    // Deleted and written again: higher than any version before, so a writer holding the
    // old one fails.
    assert!(state.delete(&b, "a").await.unwrap());
    versions.push(state.set(&b, "a", "5", None, None, LIMITS).await.unwrap());
    assert!(versions[0] >= 1);
    assert!(
        versions.windows(2).all(|w| w[0] < w[1]),
        "versions must grow: {versions:?}"
    );
    assert_eq!(
        state.set(&b, "a", "6", None, Some(latest), LIMITS).await,
        Err(StateError::Conflict {
            expected: latest,
            current: versions[5]
        })
    );
}

async fn concurrent_increments_are_all_counted(state: &State) {
    let b = Bucket::function("fn_a");
    let mut tasks = JoinSet::new();
    for _ in 0..200 {
        let (state, b) = (state.clone(), b.clone());
        tasks.spawn(async move { state.incr(&b, "hits", 1, None, LIMITS).await.unwrap() });
    }
    let mut results = tasks.join_all().await;
    results.sort_unstable();
    // Each increment saw its own total.
    assert_eq!(results, (1..=200).collect::<Vec<i64>>());
    assert_eq!(state.get(&b, "hits").await.unwrap().unwrap().value, "200");
}

async fn optimistic_read_modify_write_loses_no_update(state: &State) {
    let b = Bucket::function("fn_a");
    state
        .set(&b, "total", "0", None, None, LIMITS)
        .await
        .unwrap();
    let mut tasks = JoinSet::new();
    for _ in 0..50 {
        let (state, b) = (state.clone(), b.clone());
        tasks.spawn(async move {
            loop {
                let current = state.get(&b, "total").await.unwrap().unwrap();
                let next = current.value.parse::<i64>().unwrap() + 1;
                match state
                    .set(
                        &b,
                        "total",
                        &next.to_string(),
                        None,
                        Some(current.version),
                        LIMITS,
                    )
                    .await
                {
                    Ok(_) => return,
                    Err(StateError::Conflict { .. }) => continue,
                    Err(e) => panic!("{e}"),
                }
            }
        });
    }
    tasks.join_all().await;
    assert_eq!(state.get(&b, "total").await.unwrap().unwrap().value, "50");
}

async fn expired_keys_are_gone_for_every_operation(state: &State) {
    let b = Bucket::session("fn_a", "s1");
    let limits = Limits {
        max_keys: 5,
        ..LIMITS
    };
    let second = Some(Duration::from_secs(1));
    let minute = Some(Duration::from_secs(60));
    state
        .set(&b, "short", "1", second, None, limits)
        .await
        .unwrap();
    state
        .set(&b, "long", "1", minute, None, limits)
        .await
        .unwrap();
    state
        .set(&b, "forever", "1", None, None, limits)
        .await
        .unwrap();
    state
        .set(&b, "counter", "5", minute, None, limits)
        .await
        .unwrap();
    // A new counter takes the TTL given; an existing one keeps its own.
    assert_eq!(state.incr(&b, "fresh", 1, second, limits).await.unwrap(), 1);
    assert_eq!(
        state.incr(&b, "counter", 1, second, limits).await.unwrap(),
        6
    );

    let ttl = |keys: &[KeyInfo], key: &str| keys.iter().find(|k| k.key == key).unwrap().ttl_ms;
    let listed = state.store().list(&b).await.unwrap();
    assert!(
        matches!(ttl(&listed, "short"), Some(1..=1000)),
        "{listed:?}"
    );
    assert!(
        matches!(ttl(&listed, "fresh"), Some(1..=1000)),
        "{listed:?}"
    );
    assert!(
        matches!(ttl(&listed, "long"), Some(58_000..=60_000)),
        "{listed:?}"
    );
    assert!(
        matches!(ttl(&listed, "counter"), Some(58_000..=60_000)),
        "{listed:?}"
    );
    assert_eq!(ttl(&listed, "forever"), None);

    // Set without a TTL drops the TTL; expire sets or drops one.
    state
        .set(&b, "long", "2", None, None, limits)
        .await
        .unwrap();
    assert!(state.expire(&b, "forever", second).await.unwrap());
    assert!(state.expire(&b, "counter", None).await.unwrap());
    assert!(!state.expire(&b, "missing", second).await.unwrap());
    let listed = state.store().list(&b).await.unwrap();
    assert_eq!(ttl(&listed, "long"), None);
    assert_eq!(ttl(&listed, "counter"), None);
    assert!(
        matches!(ttl(&listed, "forever"), Some(1..=1000)),
        "{listed:?}"
    );

    // The bucket is full: five live keys.
    assert_eq!(
        state
            .set(&b, "sixth", "1", None, None, limits)
            .await
            .unwrap_err()
            .code()
            .as_str(),
        "too_many_keys"
    );

    tokio::time::sleep(Duration::from_millis(1100)).await;

    for key in ["short", "fresh", "forever"] {
        assert_eq!(state.get(&b, key).await.unwrap(), None, "{key}");
        assert!(!state.exists(&b, key).await.unwrap(), "{key}");
        assert!(!state.expire(&b, key, minute).await.unwrap(), "{key}");
        assert!(!state.delete(&b, key).await.unwrap(), "{key}");
    }
    assert_eq!(state.keys(&b, "*").await.unwrap(), ["counter", "long"]);
    assert_eq!(state.store().list(&b).await.unwrap().len(), 2);

    // Expired keys leave room: three more fit, no fourth.
    for key in ["a", "b"] {
        state.set(&b, key, "1", None, None, limits).await.unwrap();
    }
    // An expired key written again starts afresh: as absent (expected version 0), and a
    // counter from 0 without the old TTL.
    assert_eq!(state.incr(&b, "short", 2, None, limits).await.unwrap(), 2);
    assert_eq!(ttl(&state.store().list(&b).await.unwrap(), "short"), None);
    assert_eq!(
        state
            .set(&b, "fresh", "1", None, Some(0), limits)
            .await
            .unwrap_err(),
        StateError::TooManyKeys {
            scope: "session",
            max: 5
        }
    );
    assert!(state.delete(&b, "a").await.unwrap());
    state
        .set(&b, "fresh", "1", None, Some(0), limits)
        .await
        .unwrap();
    assert_eq!(state.store().clear(&b).await.unwrap(), 5);
}

async fn limits_refuse_and_write_nothing(state: &State) {
    let b = Bucket::session("fn_a", "s1");
    let limits = Limits {
        max_value_bytes: 16,
        max_keys: 3,
    };
    let fits = "\"0123456789abcd\"";
    assert_eq!(fits.len(), 16);
    let v1 = state.set(&b, "k", fits, None, None, limits).await.unwrap();
    let too_big = "\"0123456789abcde\"";
    assert_eq!(
        state.set(&b, "k", too_big, None, None, limits).await,
        Err(StateError::ValueTooLarge { size: 17, max: 16 })
    );
    assert_eq!(
        state.set(&b, "other", too_big, None, None, limits).await,
        Err(StateError::ValueTooLarge { size: 17, max: 16 })
    );
    assert_eq!(
        state.get(&b, "k").await.unwrap(),
        Some(Versioned {
            value: fits.into(),
            version: v1
        })
    );
    assert_eq!(state.get(&b, "other").await.unwrap(), None);

    let longest = "k".repeat(256);
    state
        .set(&b, &longest, "1", None, None, limits)
        .await
        .unwrap();
    assert_eq!(state.get(&b, &longest).await.unwrap().unwrap().value, "1");
    let too_long = "k".repeat(257);
    assert_eq!(
        state.set(&b, &too_long, "1", None, None, limits).await,
        Err(StateError::KeyTooLong { len: 257 })
    );
    assert_eq!(
        state.incr(&b, &too_long, 1, None, limits).await,
        Err(StateError::KeyTooLong { len: 257 })
    );
    assert_eq!(
        state.get(&b, &too_long).await.unwrap_err().code().as_str(),
        "key_too_long"
    );
    assert_eq!(
        state.get(&b, "").await.unwrap_err().code().as_str(),
        "invalid_key"
    );
    assert_eq!(
        state
            .set(&b, "k", "1", Some(Duration::ZERO), None, limits)
            .await
            .unwrap_err()
            .code()
            .as_str(),
        "invalid_argument"
    );

    // Three keys is the limit: a fourth is refused, by set and by incr; the three can still
    // be updated.
    assert_eq!(state.incr(&b, "n", 1, None, limits).await.unwrap(), 1);
    let full = StateError::TooManyKeys {
        scope: "session",
        max: 3,
    };
    assert_eq!(
        state.set(&b, "fourth", "1", None, None, limits).await,
        Err(full.clone())
    );
    assert_eq!(state.incr(&b, "fourth", 1, None, limits).await, Err(full));
    assert_eq!(state.get(&b, "fourth").await.unwrap(), None);
    let v2 = state.set(&b, "k", "2", None, None, limits).await.unwrap();
    assert!(v2 > v1);
    assert_eq!(state.incr(&b, "n", 1, None, limits).await.unwrap(), 2);
    assert_eq!(state.store().list(&b).await.unwrap().len(), 3);

    let f = Bucket::function("fn_a");
    let one = Limits {
        max_keys: 1,
        ..limits
    };
    state.set(&f, "only", "1", None, None, one).await.unwrap();
    assert_eq!(
        state.set(&f, "second", "1", None, None, one).await,
        Err(StateError::TooManyKeys {
            scope: "function",
            max: 1
        })
    );
}

async fn sessions_are_registered_expire_and_purge(state: &State) {
    let store = state.store();
    let minute = Duration::from_secs(60);
    assert_eq!(store.session("fn_a", "s1").await.unwrap(), None);

    let first = store
        .touch_session("fn_a", "s1", None, minute)
        .await
        .unwrap();
    assert_eq!(
        (first.function_id.as_str(), first.session_key.as_str()),
        ("fn_a", "s1")
    );
    assert_eq!(first.instance_id, None);
    assert_eq!(first.created_at, first.last_access);
    assert_eq!(first.expires_at - first.last_access, minute);

    tokio::time::sleep(Duration::from_millis(5)).await;
    let bound = store
        .touch_session("fn_a", "s1", Some("inst_1"), minute)
        .await
        .unwrap();
    assert_eq!(bound.instance_id.as_deref(), Some("inst_1"));
    assert_eq!(bound.created_at, first.created_at);
    assert!(bound.last_access > first.last_access);
    assert_eq!(bound.expires_at - bound.last_access, minute);
    tokio::time::sleep(Duration::from_millis(5)).await;
    // Without an instance the binding stays.
    let kept = store
        .touch_session("fn_a", "s1", None, minute)
        .await
        .unwrap();
    assert_eq!(kept.instance_id.as_deref(), Some("inst_1"));
    assert_eq!(store.session("fn_a", "s1").await.unwrap(), Some(kept));

    for key in ["s2", "s3"] {
        tokio::time::sleep(Duration::from_millis(5)).await;
        store
            .touch_session("fn_a", key, None, minute)
            .await
            .unwrap();
    }
    let keys = |sessions: Vec<nimbus_state::Session>| {
        sessions
            .into_iter()
            .map(|s| s.session_key)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        keys(store.sessions("fn_a", 10).await.unwrap()),
        ["s3", "s2", "s1"]
    );
    tokio::time::sleep(Duration::from_millis(5)).await;
    store
        .touch_session("fn_a", "s1", None, minute)
        .await
        .unwrap();
    assert_eq!(keys(store.sessions("fn_a", 2).await.unwrap()), ["s1", "s3"]);
    assert_eq!(store.sessions("fn_a", 0).await.unwrap(), []);

    // A session lapses after its timeout, and comes back as a new one.
    let short = Duration::from_millis(500);
    let lapsing = store
        .touch_session("fn_a", "short", Some("inst_2"), short)
        .await
        .unwrap();
    assert!(store.session("fn_a", "short").await.unwrap().is_some());
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(store.session("fn_a", "short").await.unwrap(), None);
    assert_eq!(
        keys(store.sessions("fn_a", 10).await.unwrap()),
        ["s1", "s3", "s2"]
    );
    let renewed = store
        .touch_session("fn_a", "short", None, short)
        .await
        .unwrap();
    assert!(renewed.created_at > lapsing.created_at);
    assert_eq!(renewed.instance_id, None);

    assert!(store.delete_session("fn_a", "s2").await.unwrap());
    assert!(!store.delete_session("fn_a", "s2").await.unwrap());
    assert_eq!(store.session("fn_a", "s2").await.unwrap(), None);
    assert_eq!(
        keys(store.sessions("fn_a", 10).await.unwrap()),
        ["short", "s1", "s3"]
    );

    // Purging a function removes its state and sessions, and nothing of another function's.
    let (a_session, a_function) = (Bucket::session("fn_a", "s1"), Bucket::function("fn_a"));
    let (b_session, b_function) = (Bucket::session("fn_b", "s1"), Bucket::function("fn_b"));
    for bucket in [&a_session, &a_function, &b_session, &b_function] {
        state
            .set(bucket, "k", "1", None, None, LIMITS)
            .await
            .unwrap();
    }
    store
        .touch_session("fn_b", "s1", None, minute)
        .await
        .unwrap();
    store.purge_function("fn_a").await.unwrap();
    for bucket in [&a_session, &a_function] {
        assert_eq!(state.get(bucket, "k").await.unwrap(), None);
        assert!(store.list(bucket).await.unwrap().is_empty());
    }
    assert_eq!(store.sessions("fn_a", 10).await.unwrap(), []);
    assert_eq!(store.session("fn_a", "s1").await.unwrap(), None);
    for bucket in [&b_session, &b_function] {
        assert_eq!(state.get(bucket, "k").await.unwrap().unwrap().value, "1");
    }
    assert_eq!(keys(store.sessions("fn_b", 10).await.unwrap()), ["s1"]);
}

async fn buckets_are_isolated(state: &State) {
    let buckets = [
        Bucket::session("fn_a", "s1"),
        Bucket::session("fn_a", "s2"),
        Bucket::function("fn_a"),
        Bucket::session("fn_b", "s1"),
        Bucket::function("fn_b"),
        // Ids holding the separators of the backends' key layouts.
        Bucket::session("fn_a", "s1}:k:{x"),
        Bucket::session("fn_a", "s1:k"),
    ];
    for (i, bucket) in buckets.iter().enumerate() {
        // Each bucket has its own version sequence.
        let version = state
            .set(bucket, "k", &i.to_string(), None, None, LIMITS)
            .await
            .unwrap();
        assert_eq!(version, 1, "{bucket:?}");
    }
    state
        .set(&buckets[6], "x", "\"x\"", None, None, LIMITS)
        .await
        .unwrap();
    for (i, bucket) in buckets.iter().enumerate().take(6) {
        assert_eq!(
            state.get(bucket, "k").await.unwrap().unwrap().value,
            i.to_string()
        );
        assert_eq!(state.keys(bucket, "*").await.unwrap(), ["k"], "{bucket:?}");
    }

    assert!(state.delete(&buckets[0], "k").await.unwrap());
    assert_eq!(state.store().clear(&buckets[2]).await.unwrap(), 1);
    assert_eq!(state.get(&buckets[0], "k").await.unwrap(), None);
    assert_eq!(state.get(&buckets[2], "k").await.unwrap(), None);
    for bucket in [&buckets[1], &buckets[3], &buckets[4]] {
        assert!(state.exists(bucket, "k").await.unwrap(), "{bucket:?}");
    }
    assert_eq!(state.keys(&buckets[6], "*").await.unwrap(), ["k", "x"]);
}
