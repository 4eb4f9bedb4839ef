//! The Redis backend on the other topologies, each run on private `redis-server`s on free
//! ports: a three-node Redis Cluster (buckets spread over the nodes, a purge that crosses
//! slots) and a Sentinel-managed master with a replica (the store follows a failover).

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{free_port, RedisServer, LIMITS};
use nimbus_state::{Bucket, RedisStore, State, StateResult};

/// Runs `redis-cli` with `args`; its output.
fn redis_cli(args: &[&str]) -> String {
    let out = Command::new("redis-cli").args(args).output().unwrap();
    assert!(out.status.success(), "redis-cli {args:?}: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Retries `op` while it fails with `state_unavailable`, for up to `within`.
async fn eventually<T, F, Fut>(within: Duration, mut op: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = StateResult<T>>,
{
    let started = Instant::now();
    loop {
        match op().await {
            Ok(value) => return value,
            Err(e)
                if e.code() == nimbus_core::ErrorCode::StateUnavailable
                    && started.elapsed() < within =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("{e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_spreads_buckets_over_its_nodes_and_purges_across_slots() {
    let dir = tempfile::tempdir().unwrap();
    let ports = [free_port(), free_port(), free_port()];
    let mut servers = Vec::new();
    for port in ports {
        let config = dir.path().join(format!("nodes-{port}.conf"));
        servers.push(RedisServer::start(
            port,
            &[
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                config.to_str().unwrap(),
                "--dir",
                dir.path().to_str().unwrap(),
                "--save",
                "",
                "--appendonly",
                "no",
            ],
        ));
    }
    let nodes: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let mut create = vec!["--cluster", "create"];
    create.extend(nodes.iter().map(String::as_str));
    create.extend(["--cluster-replicas", "0", "--cluster-yes"]);
    redis_cli(&create);
    for port in ports {
        wait_for("the cluster to form", || {
            redis_cli(&["-p", &port.to_string(), "cluster", "info"]).contains("cluster_state:ok")
        });
    }

    let url = format!("redis+cluster://{},{}", nodes[0], nodes[1]);
    let store = RedisStore::connect(&url, "nimbus-cluster").await.unwrap();
    let state = State::new(Arc::new(store));
    let sessions: Vec<Bucket> = (0..30)
        .map(|i| Bucket::session("fn_a", &format!("s{i}")))
        .collect();
    let function = Bucket::function("fn_a");
    let other = Bucket::session("fn_b", "s0");
    for bucket in sessions.iter().chain([&function, &other]) {
        // The cluster may still be settling its slots right after it formed.
        eventually(Duration::from_secs(10), || {
            state.set(bucket, "k", "\"v\"", None, None, LIMITS)
        })
        .await;
        assert_eq!(state.incr(bucket, "n", 2, None, LIMITS).await.unwrap(), 2);
        assert_eq!(state.keys(bucket, "*").await.unwrap(), ["k", "n"]);
    }
    for bucket in &sessions[..5] {
        state
            .store()
            .touch_session(
                "fn_a",
                bucket_session(bucket),
                None,
                Duration::from_secs(60),
            )
            .await
            .unwrap();
    }
    assert_eq!(state.store().sessions("fn_a", 10).await.unwrap().len(), 5);
    let holding: Vec<u64> = ports
        .iter()
        .map(|p| {
            redis_cli(&["-p", &p.to_string(), "dbsize"])
                .trim()
                .parse()
                .unwrap()
        })
        .collect();
    assert!(
        holding.iter().all(|&keys| keys > 0),
        "buckets should spread over every node: {holding:?}"
    );

    state.store().purge_function("fn_a").await.unwrap();
    for bucket in sessions.iter().chain([&function]) {
        assert!(
            state.store().list(bucket).await.unwrap().is_empty(),
            "{bucket:?}"
        );
    }
    assert!(state.store().sessions("fn_a", 10).await.unwrap().is_empty());
    assert_eq!(state.get(&other, "n").await.unwrap().unwrap().value, "2");
    // All that is left is fn_b's bucket: its entries, index, sequence and registration.
    let left: u64 = ports
        .iter()
        .map(|p| {
            redis_cli(&["-p", &p.to_string(), "dbsize"])
                .trim()
                .parse::<u64>()
                .unwrap()
        })
        .sum();
    assert_eq!(left, 5);
}

fn bucket_session(bucket: &Bucket) -> &str {
    match &bucket.scope {
        nimbus_state::Scope::Session(key) => key,
        nimbus_state::Scope::Function => unreachable!(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_master_is_followed_through_a_failover() {
    let dir = tempfile::tempdir().unwrap();
    let (master, replica, sentinel) = (free_port(), free_port(), free_port());
    let mut servers = Vec::new();
    // A replica stores what it syncs as a file: keep it in the temporary directory.
    let no_disk = [
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        dir.path().to_str().unwrap(),
    ];
    servers.push(RedisServer::start(master, &no_disk));
    let replica_of = master.to_string();
    let mut args = no_disk.to_vec();
    args.extend(["--replicaof", "127.0.0.1", &replica_of]);
    servers.push(RedisServer::start(replica, &args));
    let config = write_sentinel_config(dir.path(), master);
    servers.push(RedisServer::start(
        sentinel,
        &[config.as_str(), "--sentinel"],
    ));
    wait_for("the replica to sync", || {
        redis_cli(&["-p", &replica.to_string(), "info", "replication"])
            .contains("master_link_status:up")
    });

    let url = format!("redis+sentinel://127.0.0.1:{sentinel}/nimbus");
    let store = RedisStore::connect(&url, "nimbus-sentinel").await.unwrap();
    let state = State::new(Arc::new(store));
    let bucket = Bucket::function("fn_a");
    state
        .set(&bucket, "k", "\"before\"", None, None, LIMITS)
        .await
        .unwrap();
    assert_eq!(state.incr(&bucket, "n", 1, None, LIMITS).await.unwrap(), 1);
    wait_for("the write to reach the replica", || {
        redis_cli(&["-p", &replica.to_string(), "dbsize"]).trim() != "0"
            && redis_cli(&["-p", &replica.to_string(), "info", "replication"])
                .lines()
                .find_map(|l| l.strip_prefix("slave_repl_offset:"))
                == redis_cli(&["-p", &master.to_string(), "info", "replication"])
                    .lines()
                    .find_map(|l| l.strip_prefix("master_repl_offset:"))
    });

    // The Sentinel promotes only a replica it has seen (it asks the master every few seconds).
    wait_for("the Sentinel to fail over", || {
        redis_cli(&[
            "-p",
            &sentinel.to_string(),
            "sentinel",
            "failover",
            "nimbus",
        ])
        .trim()
            == "OK"
    });
    wait_for("the replica to be promoted", || {
        redis_cli(&["-p", &replica.to_string(), "role"]).starts_with("master")
    });
    // The old master turns replica: the store must notice (READONLY) and ask the Sentinel
    // again rather than keep writing there.
    wait_for("the old master to follow the new one", || {
        redis_cli(&["-p", &master.to_string(), "role"]).starts_with("slave")
    });
    let n = eventually(Duration::from_secs(15), || {
        state.incr(&bucket, "n", 1, None, LIMITS)
    })
    .await;
    assert_eq!(n, 2);
    assert_eq!(
        state.get(&bucket, "k").await.unwrap().unwrap().value,
        "\"before\""
    );
    let on_new_master = redis_cli(&["-p", &replica.to_string(), "keys", "nimbus-sentinel:*"]);
    assert!(on_new_master.contains(":k:n"), "{on_new_master}");
}

/// A Sentinel configuration watching the master on `port` as `nimbus` (Sentinel rewrites
/// its file, so it gets one of its own); its path.
fn write_sentinel_config(dir: &Path, master: u16) -> String {
    let path = dir.join("sentinel.conf");
    std::fs::write(
        &path,
        format!(
            "sentinel monitor nimbus 127.0.0.1 {master} 1\n\
             sentinel down-after-milliseconds nimbus 1000\n\
             sentinel failover-timeout nimbus 10000\n"
        ),
    )
    .unwrap();
    path.to_str().unwrap().to_owned()
}
