//! Slow and many clients against the real `nimbus` binary: stalled request heads, idle and
//! stalled connections, the connection limit, a flood past the open-files limit, the
//! memory it leaves behind, and a drain on SIGTERM. See docs/LIMITS.md (`[http]`).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use nimbus_testkit::server::{code_of, Backend, Nimbus};

/// The binary under test.
const NIMBUS: Nimbus = Nimbus::at(env!("CARGO_BIN_EXE_nimbus"));

const FLOOD: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/flood.py");

/// The server binary with its log kept in a file, for the tests that read it.
struct Logged {
    child: Child,
    addr: String,
    http: reqwest::Client,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Logged {
    async fn start(toml: &str) -> Logged {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("nimbus.toml"), toml).unwrap();
        let log = dir.path().join("server.log");
        let mut child = Command::new(env!("CARGO_BIN_EXE_nimbus"))
            .args(["server", "--listen", "127.0.0.1:0", "--no-snapshots"])
            .arg("--data-dir")
            .arg(dir.path())
            .env("NIMBUS_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let addr = tokio::task::spawn_blocking(move || {
            BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
                .find_map(|l| {
                    l.strip_prefix("Nimbus is listening on http://")
                        .map(str::to_owned)
                })
        })
        .await
        .unwrap()
        .expect("the server reports its address");
        let server = Logged {
            child,
            addr,
            // No pooled connections: each request here opens and closes its own, so the
            // server's connection counts are the test's connections alone.
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(0)
                .build()
                .unwrap(),
            log,
            _dir: dir,
        };
        assert_eq!(server.health().await, Some(200));
        server
    }

    /// `/health`'s status, or `None` if it does not answer within 5 s.
    async fn health(&self) -> Option<u16> {
        let resp = self
            .http
            .get(format!("http://{}/health", self.addr))
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .ok()?;
        Some(resp.status().as_u16())
    }

    async fn metric(&self, series: &str) -> f64 {
        metric(&self.http, &format!("http://{}", self.addr), series).await
    }

    /// Waits until the server has `n` connections open, counting the one that asks.
    async fn wait_for_connections(&self, n: u32) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.metric("nimbus_http_connections").await != f64::from(n) {
            assert!(
                Instant::now() < deadline,
                "connections did not settle at {n}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn rss_kb(&self) -> u64 {
        rss_kb(self.child.id())
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap()
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        nimbus_testkit::server::stop(&mut self.child);
    }
}

/// One series' value from `/metrics` (0 when absent).
async fn metric(http: &reqwest::Client, base: &str, series: &str) -> f64 {
    let text = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

fn rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// The flood script's reports, as they come.
struct Flood {
    child: tokio::process::Child,
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
}

impl Flood {
    /// `count` connections that each send part of a request head and stall, watched for at
    /// most `hold`.
    fn start(addr: &str, count: usize, hold: Duration) -> Flood {
        use tokio::io::AsyncBufReadExt;
        let (host, port) = addr.rsplit_once(':').unwrap();
        let mut child = tokio::process::Command::new("/usr/bin/python3")
            .arg(FLOOD)
            .args([host, port, &count.to_string(), &hold.as_secs().to_string()])
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        Flood { child, lines }
    }

    async fn report(&mut self, phase: &str) -> Value {
        let line = self
            .lines
            .next_line()
            .await
            .unwrap()
            .expect("a flood report");
        let report: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(report["phase"], phase, "{report}");
        report
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// Sends `raw` on `stream` and reads one response: its head and body.
async fn exchange(stream: &mut TcpStream, raw: &str) -> (String, String) {
    stream.write_all(raw.as_bytes()).await.unwrap();
    read_response(stream).await
}

async fn read_response(stream: &mut TcpStream) -> (String, String) {
    let mut data = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&data[..end]).to_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .map_or(0, |n| n.trim().parse().unwrap());
            if data.len() >= end + 4 + length {
                let body = String::from_utf8_lossy(&data[end + 4..end + 4 + length]);
                return (head, body.into_owned());
            }
        }
        let n = tokio::time::timeout(Duration::from_secs(30), stream.read(&mut chunk))
            .await
            .expect("a response within 30 s")
            .unwrap();
        assert!(n > 0, "closed before a whole response: {data:?}");
        data.extend_from_slice(&chunk[..n]);
    }
}

/// Whether the server closes `stream` (EOF or reset) within `within`, reading and
/// discarding what it sends meanwhile.
async fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    let mut sink = [0u8; 65536];
    tokio::time::timeout(within, async {
        while let Ok(1..) = stream.read(&mut sink).await {}
    })
    .await
    .is_ok()
}

const HEALTH: &str = "GET /health HTTP/1.1\r\nHost: t\r\n\r\n";

#[tokio::test]
async fn two_thousand_stalled_heads_are_cut_after_the_header_timeout() {
    let s = Logged::start("[http]\nheader_timeout_sec = 2\n").await;
    let mut flood = Flood::start(&s.addr, 2_000, Duration::from_secs(40));
    let held = flood.report("held").await;
    assert_eq!(held["connected"], 2_000, "{held}");
    // The stalled connections do not keep others out.
    assert_eq!(s.health().await, Some(200));
    let done = flood.report("done").await;
    assert_eq!(
        (
            &done["cut"],
            &done["open"],
            &done["refused"],
            &done["other"]
        ),
        (&json!(2_000), &json!(0), &json!(0), &json!(0)),
        "every stalled connection is closed by the server, without an answer: {done}"
    );
    assert_eq!(
        s.metric(r#"nimbus_http_connection_timeouts_total{timeout="header"}"#)
            .await,
        2_000.0
    );
    assert_eq!(s.health().await, Some(200));
    s.wait_for_connections(1).await;
}

#[tokio::test]
async fn idle_and_stalled_connections_are_closed() {
    let s = Logged::start(
        "[http]\nheader_timeout_sec = 30\nkeepalive_timeout_sec = 1\nstall_timeout_sec = 1\n",
    )
    .await;
    let counted =
        |which: &str| format!(r#"nimbus_http_connection_timeouts_total{{timeout="{which}"}}"#);

    // Kept alive after a response, then idle: closed after the keep-alive timeout.
    let mut idle = TcpStream::connect(&s.addr).await.unwrap();
    let (head, _) = exchange(&mut idle, HEALTH).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(closed_within(&mut idle, Duration::from_secs(20)).await);
    assert_eq!(s.metric(&counted("keepalive")).await, 1.0);

    // A request body that stops arriving: 408 in the API's shape.
    let mut slow = TcpStream::connect(&s.addr).await.unwrap();
    let (head, body) = exchange(
        &mut slow,
        "POST /api/v1/functions/f/invoke HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n{\"a\":",
    )
    .await;
    assert!(head.starts_with("http/1.1 408"), "{head}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(code_of(&body), "request_timeout", "{body}");

    // A client that sends requests but reads no answers: closed once its answers fill the
    // socket buffers and then stall.
    let mut deaf = TcpStream::connect(&s.addr).await.unwrap();
    let request = "GET /api/v1/openapi.json HTTP/1.1\r\nHost: t\r\n\r\n".repeat(400);
    deaf.write_all(request.as_bytes()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while s.metric(&counted("stall")).await < 1.0 {
        assert!(
            Instant::now() < deadline,
            "the stalled writer is not closed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(closed_within(&mut deaf, Duration::from_secs(20)).await);
    assert_eq!(s.metric(&counted("header")).await, 0.0);
}

#[tokio::test]
async fn at_the_connection_limit_the_next_connection_is_refused_clearly() {
    let s = Logged::start("[http]\nmax_connections = 50\nheader_timeout_sec = 60\n").await;
    s.wait_for_connections(1).await;
    // 50 kept-alive connections, each served once: the limit is reached.
    let mut held = Vec::new();
    for _ in 0..50 {
        let mut stream = TcpStream::connect(&s.addr).await.unwrap();
        let (head, _) = exchange(&mut stream, HEALTH).await;
        assert!(head.starts_with("http/1.1 200"), "{head}");
        held.push(stream);
    }
    let mut extra = TcpStream::connect(&s.addr).await.unwrap();
    let (head, body) = exchange(&mut extra, HEALTH).await;
    assert!(head.starts_with("http/1.1 503"), "{head}");
    assert!(head.contains("retry-after: 1"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(code_of(&body), "too_many_connections", "{body}");
    assert!(closed_within(&mut extra, Duration::from_secs(10)).await);
    // A client library sees the same answer.
    let resp = s
        .http
        .get(format!("http://{}/health", s.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(resp.headers().contains_key("retry-after"));

    // Once some close, the server serves new connections again.
    held.truncate(40);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if s.health().await == Some(200) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no room after connections closed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The held connections still work.
    let (head, _) = exchange(&mut held[0], HEALTH).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(s.metric("nimbus_http_connections_refused_total").await >= 2.0);
}

/// 20,000 connections at once, past the server's open-files limit (this machine's: 20,000
/// soft and hard, which no process here may raise). Each flood process opens 10,000, as one
/// process cannot hold 20,000 sockets under that limit.
#[tokio::test]
async fn a_flood_of_twenty_thousand_connections_leaves_the_server_serving() {
    let s = Logged::start("").await;
    for _ in 0..20 {
        assert_eq!(s.health().await, Some(200));
    }
    let baseline = s.rss_kb();
    let hold = Duration::from_secs(50);
    let mut floods = [
        Flood::start(&s.addr, 10_000, hold),
        Flood::start(&s.addr, 10_000, hold),
    ];
    let mut peak = 0;
    for flood in &mut floods {
        let held = flood.report("held").await;
        assert_eq!(held["connect_failed"], 0, "{held}");
        peak = peak.max(s.rss_kb());
    }
    for flood in &mut floods {
        let done = flood.report("done").await;
        assert_eq!(done["connected"], 10_000, "{done}");
        assert_eq!(
            (&done["open"], &done["other"]),
            (&json!(0), &json!(0)),
            "every connection is refused or cut by the header timeout: {done}"
        );
    }
    let refused = s.metric("nimbus_http_connections_refused_total").await;
    assert!(
        refused > 0.0,
        "the flood did not reach the connection limit"
    );
    assert_eq!(s.health().await, Some(200));
    // The memory of the cut connections goes back to the system.
    let bound = baseline + 32 * 1024;
    let deadline = Instant::now() + Duration::from_secs(20);
    while s.rss_kb() > bound {
        assert!(
            Instant::now() < deadline,
            "RSS {} kB after the flood; {baseline} kB before, {peak} kB at its peak",
            s.rss_kb()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eprintln!(
        "RSS: {baseline} kB before, {peak} kB during, {} kB after; {refused} refused",
        s.rss_kb()
    );
    let log = s.log();
    assert!(!log.contains("Too many open files"), "{log}");
    assert!(!log.contains("accepting a connection failed"), "{log}");
}

#[tokio::test]
async fn request_heads_over_the_limits_answer_in_json() {
    let s = Logged::start("").await;
    let base = format!("http://{}", s.addr);
    let cases = [
        // Over the API's limit, under the parser's.
        (
            format!("{base}/api/v1/functions?x={}", "a".repeat(9_000)),
            vec![],
            414,
            "uri_too_long",
        ),
        (
            format!("{base}/api/v1/functions"),
            vec![("x-big", "b".repeat(17_000))],
            431,
            "headers_too_large",
        ),
        (
            format!("{base}/api/v1/functions"),
            (0..101).map(|i| ("x-many", format!("{i}"))).collect(),
            431,
            "headers_too_large",
        ),
    ];
    for (url, headers, status, code) in cases {
        let mut req = s.http.get(&url);
        for (name, value) in headers {
            req = req.header(name, value);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status().as_u16(), status, "{url:.60}");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(code_of(&body), code, "{body}");
    }
    // Past twice the limits hyper's parser answers itself (empty 431), as documented.
    let resp = s
        .http
        .get(format!("{base}/health"))
        .header("x-huge", "c".repeat(60_000))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 431);
    assert_eq!(s.health().await, Some(200));
}

/// A client that sends its whole request before it reads, as many do, gets the answer even
/// when the server answers before reading the body (a head over the limits, a route that
/// does not exist): the server reads the body and discards it instead of closing the
/// connection on it, which would reset it and fail the client's write (EPIPE).
#[tokio::test]
async fn answers_given_before_the_body_reach_a_client_that_sends_it_all_first() {
    let s = Logged::start("").await;
    // Past what the kernel's socket buffers take without the server reading.
    const BODY: usize = 32 << 20;
    let body = vec![b'x'; BODY];
    let long_target = format!("/api/v1/functions?x={}", "a".repeat(9_000));
    let big_header = format!("x-big: {}\r\n", "b".repeat(17_000));
    let cases = [
        (long_target.as_str(), String::new(), 414, "uri_too_long"),
        ("/api/v1/functions", big_header, 431, "headers_too_large"),
        ("/api/v1/nowhere", String::new(), 404, "route_not_found"),
    ];
    for (target, extra, status, code) in cases {
        let mut stream = TcpStream::connect(&s.addr).await.unwrap();
        let head = format!(
            "POST {target} HTTP/1.1\r\nHost: t\r\ncontent-type: application/json\r\n\
             {extra}content-length: {BODY}\r\n\r\n"
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        let sent = tokio::time::timeout(Duration::from_secs(60), stream.write_all(&body))
            .await
            .expect("the body is taken within 60 s");
        assert!(sent.is_ok(), "{status}: the body was cut off: {sent:?}");
        let (head, answer) = read_response(&mut stream).await;
        assert!(head.starts_with(&format!("http/1.1 {status} ")), "{head}");
        let answer: Value = serde_json::from_str(&answer).unwrap();
        assert_eq!(code_of(&answer), code, "{answer}");
        if head.contains("connection: close") {
            assert!(closed_within(&mut stream, Duration::from_secs(10)).await);
        } else {
            // The whole body was read: the connection serves the next request.
            let (head, _) = exchange(&mut stream, HEALTH).await;
            assert!(head.starts_with("http/1.1 200 "), "{head}");
        }
    }
}

#[tokio::test]
async fn throttled_answers_say_when_to_retry() {
    let s = NIMBUS
        .start_with(Backend::Sqlite, "queue_depth = 0\n", &[])
        .await;
    s.deploy(
        "one",
        "import time\ndef handle(e):\n    time.sleep(e.get('sleep', 0))\n    return 'ok'\n",
        json!({"max_instances": 1}),
    )
    .await;
    let hold = s.invoke_raw("one", "", r#"{"sleep": 2}"#);
    let second = async {
        tokio::time::sleep(Duration::from_millis(700)).await;
        s.auth(s.http.post(s.url("/functions/one/invoke")))
            .body("{}")
            .send()
            .await
            .unwrap()
    };
    let ((first, _), throttled) = tokio::join!(hold, second);
    assert_eq!(first, StatusCode::OK);
    assert_eq!(throttled.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(throttled.headers()["retry-after"], "1");
    let body: Value = throttled.json().await.unwrap();
    assert_eq!(code_of(&body), "throttled", "{body}");
}

#[tokio::test]
async fn sigterm_drains_running_invocations_while_ready_says_503() {
    let mut s = NIMBUS.start(Backend::Sqlite).await;
    s.deploy(
        "slow",
        "import time\ndef handle(e):\n    time.sleep(3)\n    return 'done'\n",
        json!({}),
    )
    .await;
    let base = s.base.clone();
    let running = tokio::spawn({
        let http = s.http.clone();
        let url = s.url("/functions/slow/invoke");
        async move {
            let resp = http.post(url).body("{}").send().await.unwrap();
            (resp.status(), resp.json::<Value>().await.unwrap())
        }
    });
    // Running once its instance is busy.
    let deadline = Instant::now() + Duration::from_secs(20);
    while metric(
        &s.http,
        &base,
        r#"nimbus_pool_instances{runtime="python3.11",state="busy"}"#,
    )
    .await
        < 1.0
    {
        assert!(Instant::now() < deadline, "the invocation did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let pid = s.child.id();
    Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();

    // At once: not ready, still healthy, new invocations refused.
    let deadline = Instant::now() + Duration::from_secs(2);
    let ready = loop {
        let resp = s.http.get(format!("{base}/ready")).send().await.unwrap();
        if resp.status() != StatusCode::OK || Instant::now() > deadline {
            break resp;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(code_of(&ready.json().await.unwrap()), "shutting_down");
    let health = s.http.get(format!("{base}/health")).send().await.unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    for path in ["/functions/slow/invoke", "/functions/slow/async"] {
        let (status, value) = s.call("POST", path, Some(json!({}))).await;
        assert_eq!(
            (status, code_of(&value)),
            (StatusCode::SERVICE_UNAVAILABLE, "shutting_down"),
            "{path}: {value}"
        );
    }
    // Still draining (the invocation sleeps 3 s): the process is up.
    assert!(s.child.try_wait().unwrap().is_none());

    let (status, answer) = running.await.unwrap();
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["body"], "done", "{answer}");
    let exit = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = s.child.try_wait().unwrap() {
                return (s, status);
            }
            assert!(
                Instant::now() < deadline,
                "the server did not exit once drained"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    let (mut s, status) = exit.await.unwrap();
    assert!(status.success(), "{status}");

    // Its record was written before the exit.
    s.spawn(&[]).await;
    let id = answer["request_id"].as_str().unwrap();
    let (status, record) = s.call("GET", &format!("/invocations/{id}"), None).await;
    assert_eq!(status, StatusCode::OK, "{record}");
    assert_eq!(record["status"], "success", "{record}");
    assert_eq!(record["output"], "done", "{record}");
}
