//! Store outages, crashes and deletions lose nothing silently: the real server through a
//! PostgreSQL of its own that the tests stop (hung, then shut down) and start again, a
//! SQLite database on a disk that fills up, a server killed with SIGKILL right after
//! answering, a server stopped while invocations still run, two servers on one
//! PostgreSQL and one Redis where one deletes a function the other runs, and `/metrics`
//! after deletions.

#[path = "../../nimbus-state/tests/common/mod.rs"]
mod private_redis;
#[path = "../../nimbus-store/tests/common/tmpfs.rs"]
mod tmpfs;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use nimbus_testkit::server::{code_of, Backend, Nimbus, Server};
use private_redis::RedisServer;
use reqwest::StatusCode;
use serde_json::{json, Value};

/// The binary under test.
const NIMBUS: Nimbus = Nimbus::at(env!("CARGO_BIN_EXE_nimbus"));

const ECHO: &str = "def handle(event):\n    return event\n";

/// Bounds the tests' requests: a call that hangs fails the test instead of holding it.
const CALL_LIMIT: Duration = Duration::from_secs(10);
/// Generous bound on a call that must fail fast (the server promises ~1 s).
const FAST: Duration = Duration::from_secs(3);

/// A PostgreSQL of the test's own: a cluster in a temporary directory, on a free port,
/// run as the `postgres` user (PostgreSQL refuses root). Stopped and removed when dropped.
struct PrivatePg {
    dir: tempfile::TempDir,
    port: u16,
}

impl PrivatePg {
    fn start() -> PrivatePg {
        let dir = tempfile::tempdir().unwrap();
        // The postgres user must reach its directories inside root's temporary one.
        set_mode(dir.path(), 0o755);
        let postgres = nix::unistd::User::from_name("postgres")
            .unwrap()
            .expect("a postgres user (PostgreSQL is installed)");
        for sub in ["data", "sock"] {
            std::fs::create_dir(dir.path().join(sub)).unwrap();
            std::os::unix::fs::chown(dir.path().join(sub), Some(postgres.uid.as_raw()), None)
                .unwrap();
        }
        as_postgres_ok(
            "initdb",
            &[
                "-D",
                path_str(&dir.path().join("data")),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
            ],
        );
        let pg = PrivatePg {
            port: private_redis::free_port(),
            dir,
        };
        pg.up();
        pg
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Starts the server and waits until it accepts connections.
    fn up(&self) {
        let options = format!(
            "-p {} -h 127.0.0.1 -k {} -c fsync=off -c shared_buffers=16MB",
            self.port,
            path_str(&self.dir.path().join("sock"))
        );
        as_postgres_ok(
            "pg_ctl",
            &[
                "start",
                "-w",
                "-D",
                path_str(&self.data()),
                "-l",
                path_str(&self.data().join("log")),
                "-o",
                &options,
            ],
        );
    }

    /// Shuts the server down (connections are refused from then on).
    fn down(&self) {
        as_postgres_ok(
            "pg_ctl",
            &["stop", "-m", "immediate", "-D", path_str(&self.data())],
        );
    }

    /// Stops (`STOP`) or continues (`CONT`) every process of the server: connections stay
    /// open and nothing answers.
    fn signal(&self, signal: &str) {
        let pid = std::fs::read_to_string(self.data().join("postmaster.pid")).unwrap();
        let postmaster = pid.lines().next().unwrap().trim().to_owned();
        let mut pids = vec![postmaster.clone()];
        pids.extend(children(&postmaster));
        if signal == "CONT" {
            pids.reverse();
        }
        for pid in pids {
            let _ = Command::new("kill")
                .args([&format!("-{signal}"), &pid])
                .status();
        }
    }
}

impl Drop for PrivatePg {
    fn drop(&mut self) {
        if self.data().join("postmaster.pid").exists() {
            self.signal("CONT");
            as_postgres(
                "pg_ctl",
                &["stop", "-m", "immediate", "-D", path_str(&self.data())],
                false,
            );
        }
    }
}

fn path_str(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Runs a PostgreSQL tool as the `postgres` user, checking it worked.
fn as_postgres_ok(tool: &str, args: &[&str]) {
    as_postgres(tool, args, true);
}

fn as_postgres(tool: &str, args: &[&str], check: bool) {
    let out = Command::new("runuser")
        .args(["-u", "postgres", "--", tool])
        .args(args)
        .output()
        .unwrap();
    if check {
        assert!(
            out.status.success(),
            "{tool} {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The ids of `pid`'s children (forked by any of its threads).
fn children(pid: &str) -> Vec<String> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut children = Vec::new();
    for task in tasks.flatten() {
        let text = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        children.extend(text.split_whitespace().map(str::to_owned));
    }
    children
}

/// Every process below `pid`.
fn descendants(pid: u32) -> Vec<String> {
    let mut all = Vec::new();
    let mut next = vec![pid.to_string()];
    while let Some(p) = next.pop() {
        for child in children(&p) {
            next.push(child.clone());
            all.push(child);
        }
    }
    all
}

/// `call`, failing the test if it does not answer within [`CALL_LIMIT`]; also how long it
/// took.
async fn timed<T>(what: &str, call: impl std::future::Future<Output = T>) -> (T, Duration) {
    let started = Instant::now();
    let result = tokio::time::timeout(CALL_LIMIT, call)
        .await
        .unwrap_or_else(|_| panic!("{what} did not answer within {CALL_LIMIT:?}"));
    (result, started.elapsed())
}

async fn ready(s: &Server) -> (StatusCode, Value) {
    let r = s
        .http
        .get(format!("{}/ready", s.base))
        .send()
        .await
        .unwrap();
    let status = r.status();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// Polls `/ready` until it answers `want`.
async fn wait_ready(s: &Server, want: StatusCode) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) = ready(s).await;
        if status == want {
            return;
        }
        assert!(Instant::now() < deadline, "/ready stayed {status}: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Invokes `f` and checks it answered 200; its request id.
async fn invoke_ok(s: &Server, f: &str, n: usize) -> String {
    let ((status, body), _) = timed(
        "a warm invocation",
        s.invoke_raw(f, "", &json!({ "n": n }).to_string()),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["request_id"].as_str().unwrap().to_owned()
}

/// Checks a call that needs the store fails fast with 503 `store_unavailable`.
async fn fails_fast(s: &Server, what: &str, method: &str, path: &str, body: Option<Value>) {
    let ((status, answer), took) = timed(what, s.call(method, path, body)).await;
    assert_eq!(
        (status, code_of(&answer)),
        (StatusCode::SERVICE_UNAVAILABLE, "store_unavailable"),
        "{what}: {answer}"
    );
    assert!(took < FAST, "{what} took {took:?}");
}

/// Every record of `ids` can be read (waiting for the store to take them).
async fn all_recorded(s: &Server, ids: &[String]) {
    for id in ids {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (status, body) = s.call("GET", &format!("/invocations/{id}"), None).await;
            if status == StatusCode::OK {
                assert_eq!(body["status"], "success", "{body}");
                break;
            }
            assert!(Instant::now() < deadline, "record {id} is missing: {body}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[tokio::test]
async fn through_a_postgres_outage_warm_functions_run_the_rest_fails_fast_and_nothing_is_lost() {
    let pg = PrivatePg::start();
    let s = NIMBUS
        .start_on(
            tempfile::tempdir().unwrap(),
            pg.url(),
            None,
            "stale_ttl_ms = 6000\n",
            &[],
        )
        .await;
    s.deploy("warm", ECHO, json!({})).await;
    let mut during = Vec::new();
    invoke_ok(&s, "warm", 0).await;
    assert_eq!(ready(&s).await.0, StatusCode::OK);

    // Hung: the server takes connections and answers nothing.
    pg.signal("STOP");
    let frozen = Instant::now();
    // Past the 1 s cache bound the metadata would be re-read: it is served stale.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for n in 0..5 {
        during.push(invoke_ok(&s, "warm", n).await);
    }
    let ((status, body), took) = timed("/ready", ready(&s)).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("store_unavailable")),
        "{body}"
    );
    assert!(took < FAST, "/ready took {took:?}");
    fails_fast(&s, "reading a function", "GET", "/functions/warm", None).await;
    fails_fast(&s, "listing functions", "GET", "/functions", None).await;
    let other = json!({"name": "other", "code": ECHO});
    fails_fast(&s, "creating a function", "POST", "/functions", Some(other)).await;
    fails_fast(
        &s,
        "invoking an unknown function",
        "POST",
        "/functions/nope/invoke",
        None,
    )
    .await;
    let read = format!("/invocations/{}", during[0]);
    fails_fast(&s, "reading a record", "GET", &read, None).await;

    // Past stale_ttl (6 s from the last read) the metadata is too old to serve.
    let stale_until = frozen + Duration::from_millis(6500);
    tokio::time::sleep(stale_until.saturating_duration_since(Instant::now())).await;
    let invoke = "/functions/warm/invoke";
    fails_fast(&s, "a warm invocation past stale_ttl", "POST", invoke, None).await;

    // Back: the server resumes by itself, and the records of the outage are all there
    // (it lasted longer than the 5 tries the recorder used to give up after).
    pg.signal("CONT");
    wait_ready(&s, StatusCode::OK).await;
    during.push(invoke_ok(&s, "warm", 10).await);
    all_recorded(&s, &during).await;

    // Shut down: connections are refused.
    pg.down();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let mut refused = Vec::new();
    for n in 20..23 {
        refused.push(invoke_ok(&s, "warm", n).await);
    }
    let ((status, _), took) = timed("/ready", ready(&s)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(took < FAST, "/ready took {took:?}");
    fails_fast(&s, "reading a function", "GET", "/functions/warm", None).await;
    pg.up();
    wait_ready(&s, StatusCode::OK).await;
    all_recorded(&s, &refused).await;
}

/// Runs `sql` on the private PostgreSQL as its superuser; the rows it prints.
fn pg_sql(pg: &PrivatePg, sql: &str) -> String {
    let out = Command::new("psql")
        .args([pg.url().as_str(), "-qAtc", sql])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "psql {sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Polls `/ready` for `period`: every answer must be 200.
async fn ready_throughout(s: &Server, period: Duration, during: &str) {
    let until = Instant::now() + period;
    while Instant::now() < until {
        let ((status, body), _) = timed("/ready", ready(s)).await;
        assert_eq!(status, StatusCode::OK, "{during}: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One slow answer to the health check is not an outage: a PostgreSQL that stops
/// answering for longer than one check may take (¾ of `store_timeout_ms`), but less than
/// two in a row, is never reported down, and a call waiting on it meanwhile is not cut
/// (both happened after one check failed).
#[tokio::test]
async fn a_postgres_slow_for_one_health_check_is_not_down() {
    let pg = PrivatePg::start();
    let s = NIMBUS
        .start_on(
            tempfile::tempdir().unwrap(),
            pg.url(),
            None,
            // Checks every 750 ms, each failing after 2250 ms.
            "store_timeout_ms = 3000\n",
            &[],
        )
        .await;
    s.deploy("f", ECHO, json!({})).await;
    wait_ready(&s, StatusCode::OK).await;

    pg.signal("STOP");
    // The check under way when it stopped, or the next one (at most 750 ms later), fails
    // 2250 ms after it began, and the check after it begins then: it has at least 1200 ms
    // after the database answers again at 3300 ms.
    let waiting = {
        let (http, url) = (s.http.clone(), s.url("/functions/f"));
        tokio::spawn(async move {
            let r = http.get(url).send().await.unwrap();
            (r.status(), r.json::<Value>().await.unwrap())
        })
    };
    ready_throughout(&s, Duration::from_millis(3300), "PostgreSQL paused").await;
    pg.signal("CONT");
    let (status, body) = timed("the call waiting on PostgreSQL", waiting)
        .await
        .0
        .unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    ready_throughout(&s, Duration::from_secs(2), "PostgreSQL back").await;
}

/// A PostgreSQL that refuses new connections (at `max_connections`; here, the server's
/// role at its connection limit, the same refusal, SQLSTATE 53300) while the pool's
/// connections work is available: the health check that cannot connect asks a pooled
/// connection, and reconnects once it can (it marked the store down before).
#[tokio::test]
async fn a_postgres_refusing_new_connections_is_checked_through_the_pool() {
    let pg = PrivatePg::start();
    pg_sql(&pg, "CREATE ROLE nimbus LOGIN");
    pg_sql(&pg, "CREATE DATABASE nimbus OWNER nimbus");
    let url = format!("postgres://nimbus@127.0.0.1:{}/nimbus", pg.port);
    let s = NIMBUS
        .start_on(tempfile::tempdir().unwrap(), url, None, "", &[])
        .await;
    s.deploy("f", ECHO, json!({})).await;
    invoke_ok(&s, "f", 0).await;
    wait_ready(&s, StatusCode::OK).await;

    let connections = "SELECT count(*) FROM pg_stat_activity WHERE usename = 'nimbus'";
    let health_check =
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'nimbus-health-check'";
    assert_eq!(
        pg_sql(&pg, health_check),
        "1",
        "the check names its connection"
    );
    // No new connection for the role: the pool's stay, the check's is closed.
    let pooled: u32 = pg_sql(&pg, connections).parse::<u32>().unwrap() - 1;
    pg_sql(&pg, &format!("ALTER ROLE nimbus CONNECTION LIMIT {pooled}"));
    pg_sql(
        &pg,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE application_name = 'nimbus-health-check'",
    );
    ready_throughout(&s, Duration::from_secs(3), "new connections refused").await;
    let (status, body) = timed("reading a function", s.call("GET", "/functions/f", None))
        .await
        .0;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        pg_sql(&pg, health_check),
        "0",
        "the check could not connect"
    );

    pg_sql(&pg, "ALTER ROLE nimbus CONNECTION LIMIT -1");
    let deadline = Instant::now() + Duration::from_secs(10);
    while pg_sql(&pg, health_check) != "1" {
        assert!(Instant::now() < deadline, "the check did not reconnect");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// With SQLite, `/ready` checks the database file (it answered 200 whatever became of
/// it): a database file that is gone from its path (moved, deleted) makes it answer 503
/// `store_unavailable` at once, and it is ready again when the file is back.
#[tokio::test]
async fn ready_checks_the_sqlite_database() {
    let s = NIMBUS.start(Backend::Sqlite).await;
    wait_ready(&s, StatusCode::OK).await;
    let path = s.dir.path().join("nimbus.db");
    let moved = s.dir.path().join("nimbus.db.moved");
    std::fs::rename(&path, &moved).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ((status, body), took) = timed("/ready", ready(&s)).await;
        assert!(took < FAST, "/ready took {took:?}");
        if status == StatusCode::SERVICE_UNAVAILABLE {
            assert_eq!(code_of(&body), "store_unavailable", "{body}");
            break;
        }
        assert!(Instant::now() < deadline, "/ready stayed {status}: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    std::fs::rename(&moved, &path).unwrap();
    wait_ready(&s, StatusCode::OK).await;
}

#[tokio::test]
async fn a_server_killed_right_after_answering_loses_no_record() {
    let mut s = NIMBUS.start(Backend::Sqlite).await;
    s.deploy("echo", ECHO, json!({})).await;
    let mut answered = Vec::new();
    for round in 0..3 {
        let calls = (0..20).map(|n| invoke_ok(&s, "echo", round * 100 + n));
        answered.extend(futures::future::join_all(calls).await);
        // SIGKILL the moment the last answer is in: no shutdown, no flush.
        s.child.kill().unwrap();
        s.child.wait().unwrap();
        let args = s.args.clone();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        s.spawn(&args).await;
    }
    all_recorded(&s, &answered).await;
    let (status, listed) = s
        .call("GET", "/functions/echo/invocations?limit=100", None)
        .await;
    assert_eq!(status, StatusCode::OK, "{listed}");
    let listed: HashSet<&str> = listed["invocations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["request_id"].as_str().unwrap())
        .collect();
    assert_eq!(listed.len(), answered.len(), "each record once");
}

/// Sleeps as long as asked, then answers its event.
const SLEEPER: &str =
    "import time\ndef handle(event):\n    time.sleep(event.get('sleep', 0))\n    return event\n";

/// Instances busy with an invocation, from `/metrics`.
async fn busy_instances(s: &Server) -> f64 {
    metrics(s)
        .await
        .lines()
        .filter(|l| l.starts_with("nimbus_pool_instances{") && l.contains("state=\"busy\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn invocations_cut_short_by_a_shutdown_are_recorded() {
    let mut s = NIMBUS
        .start_with(Backend::Sqlite, "shutdown_grace_sec = 1\n", &[])
        .await;
    s.deploy("slow", SLEEPER, json!({})).await;
    let event = json!({"sleep": 120});
    let sync = {
        let (http, url) = (s.http.clone(), s.url("/functions/slow/invoke"));
        let event = event.clone();
        tokio::spawn(async move {
            let r = http.post(url).json(&event).send().await.unwrap();
            (r.status(), r.json::<Value>().await.unwrap())
        })
    };
    let (status, accepted) = s.call("POST", "/functions/slow/async", Some(event)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{accepted}");
    let async_id = accepted["request_id"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(30);
    while busy_instances(&s).await < 2.0 {
        assert!(Instant::now() < deadline, "the invocations did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Stopped while both run: past the grace period they are cut short, and answered.
    Command::new("kill")
        .args(["-TERM", &s.child.id().to_string()])
        .status()
        .unwrap();
    let (status, answer) = timed("the cut-short invocation", sync).await.0.unwrap();
    assert_eq!(
        (status, code_of(&answer)),
        (StatusCode::BAD_GATEWAY, "instance_crashed"),
        "{answer}"
    );
    let sync_id = answer["request_id"].as_str().unwrap().to_owned();
    assert!(s.child.wait().unwrap().success());

    // Their records were written before the server exited.
    s.start_again().await;
    for id in [&sync_id, &async_id] {
        let (status, record) = s.call("GET", &format!("/invocations/{id}"), None).await;
        assert_eq!(status, StatusCode::OK, "{id}: {record}");
        assert_eq!(
            (record["status"].as_str(), record["error"]["code"].as_str()),
            (Some("error"), Some("instance_crashed")),
            "{record}"
        );
    }
}

#[tokio::test]
async fn a_full_disk_under_sqlite_loses_no_record_and_reads_stay_consistent() {
    let Some(disk) = tmpfs::Tmpfs::mount("4m") else {
        return;
    };
    let database = format!("sqlite:{}", disk.path().join("nimbus.db").display());
    let mut s = NIMBUS
        .start_on(tempfile::tempdir().unwrap(), database, None, "", &[])
        .await;
    s.deploy("echo", ECHO, json!({})).await;
    let mut ids = vec![invoke_ok(&s, "echo", 0).await];

    // Records large enough that the database must grow to take them.
    let filler = disk.fill();
    let big = json!({"pad": "x".repeat(30_000)}).to_string();
    for _ in 0..10 {
        let (status, body) = s.invoke_raw("echo", "", &big).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        ids.push(body["request_id"].as_str().unwrap().to_owned());
    }
    // The recorder tries (and fails) a few times.
    tokio::time::sleep(Duration::from_secs(3)).await;
    std::fs::remove_file(filler).unwrap();

    // Every record is stored, and every read finds it, whichever pooled connection
    // serves it; and still after a restart.
    for id in &ids {
        let deadline = Instant::now() + Duration::from_secs(30);
        while s.call("GET", &format!("/invocations/{id}"), None).await.0 != StatusCode::OK {
            assert!(Instant::now() < deadline, "record {id} is missing");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    assert_eq!(reads_found(&s, &ids).await, 4 * ids.len());
    s.restart().await;
    assert_eq!(reads_found(&s, &ids).await, 4 * ids.len());
    drop(s);
}

/// How many of four concurrent reads of each record of `ids` find it.
async fn reads_found(s: &Server, ids: &[String]) -> usize {
    let paths: Vec<String> = (0..4)
        .flat_map(|_| ids.iter().map(|id| format!("/invocations/{id}")))
        .collect();
    let reads = paths.iter().map(|path| s.call("GET", path, None));
    futures::future::join_all(reads)
        .await
        .iter()
        .filter(|(status, _)| *status == StatusCode::OK)
        .count()
}

/// The function of the deletion test: sleeps if asked, then writes a state key.
const STATEFUL: &str = "import time\n\
def handle(event, state):\n    time.sleep(event.get('sleep', 0))\n    \
state.set(event['key'], 1)\n    return event['key']\n";

#[tokio::test]
async fn a_function_deleted_on_one_server_leaves_nothing_on_another() {
    let port = private_redis::free_port();
    let _redis = RedisServer::start(port, &["--save", "", "--appendonly", "no"]);
    let state_url = format!("redis://127.0.0.1:{port}");
    let toml = "purge_interval_sec = 1\n";
    let args = ["--state-url", state_url.as_str(), "--snapshots"];
    let a = NIMBUS.start_with(Backend::Postgres, toml, &args).await;
    let b = a.start_peer_with(toml, &args).await;
    let created = a
        .deploy(
            "doomed",
            STATEFUL,
            json!({"state_config": {"enabled": true}}),
        )
        .await;
    let id = created.function.id;
    let (status, body) = b
        .invoke_raw("doomed", "", &json!({"key": "early"}).to_string())
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(!descendants(b.child.id()).is_empty(), "B runs an instance");
    assert!(metrics(&b).await.contains("function=\"doomed\""));

    // An invocation on B still running when A deletes the function writes state (and its
    // record) after A purged them.
    let late = {
        let (http, url) = (b.http.clone(), b.url("/functions/doomed/invoke"));
        tokio::spawn(async move {
            let event = json!({"key": "late", "sleep": 3});
            let r = http.post(url).json(&event).send().await.unwrap();
            (r.status(), r.json::<Value>().await.unwrap())
        })
    };
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let (status, body) = a.call("DELETE", "/functions/doomed", None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = late.await.unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    let late_record = body["request_id"].as_str().unwrap().to_owned();

    // Everything converges: B's instances and template stop, the late state key and the
    // late record go, and neither server's /metrics names the function.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let keys = redis_keys(port, &id);
        let left = descendants(b.child.id());
        let (record, _) = a
            .call("GET", &format!("/invocations/{late_record}"), None)
            .await;
        let (ma, mb) = (metrics(&a).await, metrics(&b).await);
        let named = ma.contains("function=\"doomed\"") || mb.contains("function=\"doomed\"");
        if keys.is_empty() && left.is_empty() && record == StatusCode::NOT_FOUND && !named {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "left behind: state keys {keys:?}, processes {left:?}, record {record}, \
             metric series named: {named}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test]
async fn series_of_deleted_functions_aliases_and_versions_leave_metrics() {
    let s = NIMBUS.start(Backend::Sqlite).await;
    s.deploy("kept", ECHO, json!({})).await;
    s.deploy("churn", ECHO, json!({})).await;
    let (status, body) = s
        .call(
            "PUT",
            "/functions/churn",
            Some(json!({"env_vars": {"V": "2"}})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let aliases: Vec<String> = (0..30).map(|n| format!("a{n}")).collect();
    for alias in &aliases {
        let routing = json!({"weights": [{"version": 1, "weight": 100}]});
        let new = json!({"name": alias, "routing_config": routing});
        let (status, body) = s.call("POST", "/functions/churn/aliases", Some(new)).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        let (status, body) = s
            .invoke_raw("churn", &format!("?alias={alias}"), "{}")
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let doomed: Vec<String> = (0..5).map(|n| format!("gone{n}")).collect();
    for name in &doomed {
        s.deploy(name, ECHO, json!({})).await;
        assert_eq!(s.invoke_raw(name, "", "{}").await.0, StatusCode::OK);
    }
    assert_eq!(s.invoke_raw("kept", "", "{}").await.0, StatusCode::OK);
    assert_eq!(s.invoke_raw("churn", "", "{}").await.0, StatusCode::OK);
    assert_eq!(
        s.invoke_raw("churn", "?version=2", "{}").await.0,
        StatusCode::OK
    );
    let before = metrics(&s).await;
    assert!(before.contains("alias=\"a29\"") && before.contains("function=\"gone4\""));

    for alias in &aliases {
        let path = format!("/functions/churn/aliases/{alias}");
        assert_eq!(s.call("DELETE", &path, None).await.0, StatusCode::OK);
    }
    for name in &doomed {
        let path = format!("/functions/{name}");
        assert_eq!(s.call("DELETE", &path, None).await.0, StatusCode::OK);
    }
    // A function and an alias deleted and created again at once under their names keep
    // their series (they used to stay retired for 60 s, and so left /metrics).
    let reborn = "gone0";
    s.deploy(reborn, ECHO, json!({})).await;
    assert_eq!(s.invoke_raw(reborn, "", "{}").await.0, StatusCode::OK);
    let routing = json!({"weights": [{"version": 1, "weight": 100}]});
    let again = json!({"name": "a0", "routing_config": routing});
    let (status, body) = s
        .call("POST", "/functions/churn/aliases", Some(again))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(
        s.invoke_raw("churn", "?alias=a0", "{}").await.0,
        StatusCode::OK
    );
    let reborn_counted = Instant::now();
    // Version 2 routed by `latest` cannot go; move `latest` back to 1 and delete 2.
    let back = json!({"routing_config": {"weights": [{"version": 1, "weight": 100}]}});
    let (status, body) = s
        .call("PUT", "/functions/churn/aliases/latest", Some(back))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        s.call("DELETE", "/functions/churn/versions/2", None)
            .await
            .0,
        StatusCode::OK
    );

    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = metrics(&s).await;
        let named: Vec<&str> = text
            .lines()
            .filter(|l| {
                aliases[1..]
                    .iter()
                    .any(|a| l.contains(&format!("alias=\"{a}\"")))
                    || doomed[1..]
                        .iter()
                        .any(|f| l.contains(&format!("function=\"{f}\"")))
                    || (l.contains("function=\"churn\"") && l.contains("version=\"2\""))
            })
            .collect();
        if named.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "still named: {named:#?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // What lives keeps its series, though idle all along (the ones created again too, once
    // idle past the exporter's idle timeout of 10 s).
    tokio::time::sleep(
        (reborn_counted + Duration::from_secs(13)).saturating_duration_since(Instant::now()),
    )
    .await;
    let text = metrics(&s).await;
    for live in [
        "nimbus_invocations_total{function=\"gone0\"",
        "nimbus_version_publish_total{function=\"gone0\"}",
        "function=\"churn\",version=\"1\",alias=\"a0\"",
        "nimbus_alias_update_total{function=\"churn\",alias=\"a0\",action=\"create\"}",
        "nimbus_invocations_total{function=\"kept\"",
        "function=\"kept\",version=\"1\",alias=\"latest\"",
        "nimbus_invocations_total{function=\"churn\"",
        "nimbus_alias_update_total{function=\"churn\",alias=\"latest\"",
    ] {
        assert!(text.contains(live), "{live} is gone:\n{text}");
    }
}

async fn metrics(s: &Server) -> String {
    let r = s
        .http
        .get(format!("{}/metrics", s.base))
        .send()
        .await
        .unwrap();
    r.text().await.unwrap()
}

/// The keys of the private Redis that belong to function `id`.
fn redis_keys(port: u16, id: &str) -> Vec<String> {
    let out = Command::new("redis-cli")
        .args([
            "-p",
            &port.to_string(),
            "--scan",
            "--pattern",
            &format!("*{id}*"),
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}
