//! Purging a deleted function's state on Redis from several servers: what one server wrote
//! after another purged the function is purged by the server that wrote it. Runs against
//! Redis at `redis://127.0.0.1:6379`, under a prefix of its own.

mod common;

use std::sync::Arc;

use common::LIMITS;
use nimbus_state::{Bucket, RedisStore, State};

const REDIS_URL: &str = "redis://127.0.0.1:6379";

fn keys(prefix: &str) -> Vec<String> {
    let mut conn = ::redis::Client::open(REDIS_URL)
        .unwrap()
        .get_connection()
        .unwrap();
    ::redis::cmd("KEYS")
        .arg(format!("{prefix}:*"))
        .query(&mut conn)
        .unwrap()
}

#[tokio::test]
async fn a_write_after_another_servers_purge_is_purged_by_the_writer() {
    let prefix = format!("nimbus-purge-{}", ulid_like());
    let _cleanup = Cleanup(prefix.clone());
    let (a, b) = (node(&prefix).await, node(&prefix).await);
    let function = Bucket::function("fn_gone");
    let session = Bucket::session("fn_gone", "s1");
    a.set(&function, "k", "1", None, None, LIMITS)
        .await
        .unwrap();
    a.set(&session, "k", "1", None, None, LIMITS).await.unwrap();

    // B deletes the function; A, not knowing yet, writes again (its registration of the
    // buckets is cached, so the function's set of buckets no longer names them).
    b.store().purge_function("fn_gone").await.unwrap();
    assert!(keys(&prefix).is_empty(), "{:?}", keys(&prefix));
    a.set(&function, "late", "2", None, None, LIMITS)
        .await
        .unwrap();
    a.set(&session, "late", "2", None, None, LIMITS)
        .await
        .unwrap();
    assert!(!keys(&prefix).is_empty());

    // The purge pass runs on every server: B's finds nothing of A's late keys, A's does.
    b.store().purge_function("fn_gone").await.unwrap();
    a.store().purge_function("fn_gone").await.unwrap();
    assert!(keys(&prefix).is_empty(), "left behind: {:?}", keys(&prefix));
}

/// Deletes the keys of a prefix when dropped (the test passed or not).
struct Cleanup(String);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let left = keys(&self.0);
        if !left.is_empty() {
            let mut conn = ::redis::Client::open(REDIS_URL)
                .unwrap()
                .get_connection()
                .unwrap();
            ::redis::cmd("DEL")
                .arg(left)
                .query::<()>(&mut conn)
                .unwrap();
        }
    }
}

/// One server's state store.
async fn node(prefix: &str) -> State {
    State::new(Arc::new(
        RedisStore::connect(REDIS_URL, prefix).await.unwrap(),
    ))
}

/// A prefix no other test run shares.
fn ulid_like() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{}-{nanos}", std::process::id())
}
