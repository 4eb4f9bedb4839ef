//! Hostile functions against the real sandbox: each test deploys a function that attacks
//! the host, the network, the platform or another function through the real server
//! (isolation on, as by default), asserts that the attack fails, and that the platform
//! keeps serving. Runs on the real kernel as root, as CI does.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{json, Value};

use nimbus_testkit::internet::FakeInternet;
use nimbus_testkit::server::{code_of, Backend, Nimbus, Server};

/// The binary under test.
const NIMBUS: Nimbus = Nimbus::at(env!("CARGO_BIN_EXE_nimbus"));

/// Deploys `code` as `name` (with extra fields) and invokes it with `event`.
async fn run(
    s: &Server,
    name: &str,
    code: &str,
    extra: Value,
    event: Value,
) -> (StatusCode, Value) {
    s.deploy(name, code, extra).await;
    s.invoke_raw(name, "", &event.to_string()).await
}

/// Invokes and returns the handler's result, which must be a success.
async fn result(s: &Server, name: &str, code: &str, event: Value) -> Value {
    let (status, body) = run(s, name, code, json!({}), event).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["body"].clone()
}

/// Name of the server's cgroup, as the server derives it from its data directory.
fn cgroup_name(s: &Server) -> String {
    let hash = std::fs::canonicalize(s.dir.path())
        .unwrap()
        .as_os_str()
        .as_encoded_bytes()
        .iter()
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        });
    format!("nimbus-{hash:016x}")
}

/// Host pids of live processes in the server's sandboxes (by cgroup, so the sandboxes of
/// other tests running at the same time do not count).
fn sandboxed_pids(s: &Server) -> Vec<u32> {
    let marker = format!("/{}/", cgroup_name(s));
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let (Ok(cgroups), Ok(stat)) = (
            std::fs::read_to_string(format!("/proc/{pid}/cgroup")),
            std::fs::read_to_string(format!("/proc/{pid}/stat")),
        ) else {
            continue;
        };
        let zombie = stat
            .rsplit(") ")
            .next()
            .is_some_and(|rest| rest.starts_with('Z'));
        if !zombie && cgroups.contains(&marker) {
            pids.push(pid);
        }
    }
    pids
}

/// Whether a sandboxed host process is part of the instance itself: the init (host side,
/// no inner pid), the sandbox's PID 1 or the worker (PID 2).
fn instance_of(pid: u32) -> bool {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let inner = status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .and_then(|l| l.split_whitespace().nth(1));
    matches!(inner, None | Some("1") | Some("2"))
}

/// Waits (up to 5 s) until `pids` are all gone (or zombies awaiting their reaper).
async fn gone(pids: &[u32]) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        let alive = pids.iter().any(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|stat| !stat.rsplit(") ").next().is_some_and(|r| r.starts_with('Z')))
        });
        if !alive {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

const PROBE_FILES: &str = r#"
import os
def handle(event):
    out = {}
    for path in event["paths"]:
        try:
            with open(path, "rb") as f:
                out[path] = "read %d bytes" % len(f.read())
        except OSError as e:
            out[path] = type(e).__name__
    return out
"#;

#[tokio::test]
async fn host_files_and_the_data_directory_are_invisible() {
    let s = NIMBUS.start(Backend::Sqlite).await;
    let data = s.dir.path().display().to_string();
    let paths = [
        "/etc/shadow".to_owned(),
        "/etc/passwd".to_owned(),
        "/root/.bashrc".to_owned(),
        format!("{data}/nimbus.db"),
        format!("{data}/nimbus.toml"),
    ];
    let got = result(&s, "snoop", PROBE_FILES, json!({ "paths": paths })).await;
    assert_eq!(got["/etc/shadow"], "FileNotFoundError", "{got}");
    assert_eq!(got["/root/.bashrc"], "FileNotFoundError", "{got}");
    assert_eq!(
        got[format!("{data}/nimbus.db")],
        "FileNotFoundError",
        "{got}"
    );
    assert_eq!(
        got[format!("{data}/nimbus.toml")],
        "FileNotFoundError",
        "{got}"
    );
    // /etc/passwd inside is the sandbox's own, naming no host account.
    assert!(
        got["/etc/passwd"].as_str().unwrap().starts_with("read"),
        "{got}"
    );
}

#[tokio::test]
async fn writes_outside_tmp_fail_and_tmp_is_bounded() {
    let s = NIMBUS.start(Backend::Sqlite).await;
    let code = r#"
import os
def handle(event):
    out = {}
    for path in ["/code.txt", "/tmp/ok.txt", "/usr/lib/evil.so", os.getcwd() + "/x.py", "/etc/hosts"]:
        try:
            with open(path, "w") as f:
                f.write("x")
            out[path] = "written"
        except OSError as e:
            out[path] = e.strerror
    # Fill /tmp past its size.
    written = 0
    try:
        with open("/tmp/fill", "wb") as f:
            while written < 512 * 1024 * 1024:
                f.write(b"\0" * (1 << 20))
                f.flush()
                written += 1 << 20
        out["fill"] = "no limit"
    except OSError as e:
        out["fill"] = e.strerror
    out["fill_mb"] = written >> 20
    os.remove("/tmp/fill")
    return out
"#;
    let got = result(&s, "writer", code, json!({})).await;
    assert_eq!(got["/tmp/ok.txt"], "written", "{got}");
    for path in ["/code.txt", "/usr/lib/evil.so", "/etc/hosts"] {
        assert_eq!(got[path], "Read-only file system", "{path}: {got}");
    }
    assert_eq!(got["fill"], "No space left on device", "{got}");
    assert!(got["fill_mb"].as_u64().unwrap() <= 64, "{got}");
}

#[tokio::test]
async fn host_processes_are_invisible_and_unsignalable() {
    let s = NIMBUS.start(Backend::Sqlite).await;
    let code = r#"
import os, signal
def handle(event):
    pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
    try:
        os.kill(event["server_pid"], signal.SIGKILL)
        killed = "killed"
    except OSError as e:
        killed = type(e).__name__
    status = open("/proc/self/status").read()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return {
        "pids": pids,
        "kill": killed,
        "uid": os.getuid(),
        "pid": os.getpid(),
        "hostname": os.uname().nodename,
        "cap_eff": fields["CapEff"].strip(),
        "cap_bnd": fields["CapBnd"].strip(),
        "no_new_privs": fields["NoNewPrivs"].strip(),
        "seccomp": fields["Seccomp"].strip(),
    }
"#;
    let server_pid = s.child.id();
    let got = result(&s, "ps", code, json!({ "server_pid": server_pid })).await;
    // PID 1 is the sandbox's init (a reaper), the worker PID 2: nothing of the host.
    assert_eq!(got["pid"], 2, "{got}");
    assert_eq!(got["pids"], json!([1, 2]), "{got}");
    assert_eq!(got["kill"], "ProcessLookupError", "{got}");
    assert_eq!(got["uid"], 1000, "{got}");
    assert_eq!(got["hostname"], "nimbus", "{got}");
    assert_eq!(got["cap_eff"], "0000000000000000", "{got}");
    assert_eq!(got["cap_bnd"], "0000000000000000", "{got}");
    assert_eq!(got["no_new_privs"], "1", "{got}");
    assert_eq!(got["seccomp"], "2", "{got}");
    assert!(std::path::Path::new(&format!("/proc/{server_pid}")).exists());
}

#[tokio::test]
async fn the_network_is_unreachable_without_the_network_option() {
    let s = NIMBUS.start(Backend::Sqlite).await;
    // A listener of our own on the host's loopback: reachable from any host process.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let code = r#"
import socket
def handle(event):
    out = {}
    for host, port in [("127.0.0.1", event["port"]), ("127.0.0.1", 5432), ("127.0.0.1", 6379), ("1.1.1.1", 53), ("169.254.169.254", 80)]:
        try:
            socket.create_connection((host, port), timeout=2).close()
            out[f"{host}:{port}"] = "connected"
        except OSError as e:
            out[f"{host}:{port}"] = type(e).__name__
    return out
"#;
    let got = result(&s, "net", code, json!({ "port": port })).await;
    assert_eq!(got.as_object().unwrap().len(), 5, "{got}");
    for (target, outcome) in got.as_object().unwrap() {
        assert_ne!(outcome, "connected", "{target}: {got}");
        assert_ne!(
            outcome, "TimeoutError",
            "{target} should fail at once: {got}"
        );
    }
    // The host itself reaches the listener, so the sandbox is what stopped the function.
    std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
}

#[tokio::test]
async fn dangerous_system_calls_are_refused() {
    let s = NIMBUS.start(Backend::Sqlite).await;
    // Calls an unprivileged process may make on this kernel: only the seccomp filter stops
    // them (`Seccomp: 2` is checked elsewhere; this proves what the filter denies).
    let code = r#"
import ctypes, socket
libc = ctypes.CDLL(None, use_errno=True)
def errno_of(result):
    return 0 if result >= 0 else ctypes.get_errno()
def sock(family, kind):
    try:
        socket.socket(family, kind).close()
        return 0
    except OSError as e:
        return e.errno
def handle(event):
    params = ctypes.create_string_buffer(120)
    return {
        "io_uring_setup": errno_of(libc.syscall(425, 1, params)),
        "userfaultfd": errno_of(libc.syscall(323, 0)),
        "keyctl": errno_of(libc.syscall(250, 1, None)),          # KEYCTL_JOIN_SESSION_KEYRING
        "personality": errno_of(libc.personality(0x0040000)),    # ADDR_NO_RANDOMIZE
        "vsock": sock(40, socket.SOCK_STREAM),                   # AF_VSOCK
        "packet": sock(17, socket.SOCK_RAW),                     # AF_PACKET
        "raw_inet": sock(socket.AF_INET, socket.SOCK_RAW),
        "unshare": errno_of(libc.unshare(0x10000000)),           # CLONE_NEWUSER
        "ptrace_self": errno_of(libc.ptrace(0, 0, 0, 0)),        # PTRACE_TRACEME
        "mount": errno_of(libc.mount(b"none", b"/tmp", b"tmpfs", 0, None)),
        "init_module": errno_of(libc.syscall(175, None, 0, b"")),
        "inet_ok": sock(socket.AF_INET, socket.SOCK_STREAM),
        "unix_ok": sock(socket.AF_UNIX, socket.SOCK_STREAM),
    }
"#;
    let got = result(&s, "syscalls", code, json!({})).await;
    for call in [
        "io_uring_setup",
        "userfaultfd",
        "keyctl",
        "personality",
        "vsock",
        "packet",
        "raw_inet",
        "unshare",
        "ptrace_self",
        "mount",
        "init_module",
    ] {
        assert_eq!(got[call], 1, "{call} must fail with EPERM: {got}");
    }
    assert_eq!(
        (got["inet_ok"].clone(), got["unix_ok"].clone()),
        (json!(0), json!(0)),
        "{got}"
    );
}

#[tokio::test]
async fn exceeding_memory_is_out_of_memory_and_the_host_is_fine() {
    let s = NIMBUS.start(Backend::Sqlite).await;
    // Bytes that are written, so the pages are really used (a zeroed allocation is not).
    let code =
        "def handle(event):\n    hog = b'\\x01' * (2 * 1024 * 1024 * 1024)\n    return len(hog)\n";
    let (status, body) = run(&s, "hog", code, json!({ "memory_mb": 128 }), json!({})).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    assert_eq!(code_of(&body), "out_of_memory", "{body}");
    // The next invocation gets a fresh instance and fails the same way, not worse.
    let (status, body) = s.invoke_raw("hog", "", "{}").await;
    assert_eq!(
        (status, code_of(&body)),
        (StatusCode::BAD_GATEWAY, "out_of_memory")
    );
    assert_eq!(
        result(&s, "fine", "def handle(e):\n    return 'ok'\n", json!({})).await,
        "ok"
    );
}

#[tokio::test]
async fn a_fork_bomb_is_contained() {
    let s = NIMBUS.start(Backend::Sqlite).await;
    let code = r#"
import os, time
def handle(event):
    children = 0
    try:
        while children < 10000:
            if os.fork() == 0:
                time.sleep(60)
                os._exit(0)
            children += 1
        return {"children": children, "stopped": "never"}
    except OSError as e:
        return {"children": children, "stopped": type(e).__name__}
"#;
    let got = result(&s, "bomb", code, json!({})).await;
    assert_eq!(got["stopped"], "BlockingIOError", "{got}");
    assert!(got["children"].as_u64().unwrap() < 64, "{got}");
    // The platform keeps serving other functions meanwhile.
    assert_eq!(
        result(&s, "calm", "def handle(e):\n    return 'ok'\n", json!({})).await,
        "ok"
    );
    // The sleeping children do not outlive the invocation; the instance stays.
    let deadline = Instant::now() + Duration::from_secs(5);
    while sandboxed_pids(&s).len() > 6 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Two instances (bomb's and calm's), three processes each.
    assert_eq!(sandboxed_pids(&s).len(), 6, "{:?}", sandboxed_pids(&s));
}

#[tokio::test]
async fn a_timeout_kills_the_whole_instance_tree() {
    let s = NIMBUS.start(Backend::Sqlite).await;
    let code = r#"
import os
def handle(event):
    if os.fork() == 0:
        os.setsid()
        while True:
            pass
    while True:
        pass
"#;
    s.deploy("spin", code, json!({ "timeout_sec": 1 })).await;
    let s = std::sync::Arc::new(s);
    let call = {
        let s = s.clone();
        tokio::spawn(async move { s.invoke_raw("spin", "", "{}").await })
    };
    // Mid-invocation: the worker, its init and the escaped spinner are all running.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let spinning = sandboxed_pids(&s);
    assert!(spinning.len() >= 3, "{spinning:?}");
    let (status, body) = call.await.unwrap();
    assert_eq!(
        (status, code_of(&body)),
        (StatusCode::GATEWAY_TIMEOUT, "function_timeout"),
        "{body}"
    );
    assert!(
        gone(&spinning).await,
        "spinning processes survived the timeout: {spinning:?}"
    );
}

#[tokio::test]
async fn background_processes_end_with_their_invocation() {
    let s = NIMBUS.start(Backend::Sqlite).await;
    let code = r#"
import os, time
def handle(event):
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            while True:
                pass
        os._exit(0)
    time.sleep(0.2)
    return "returned"
"#;
    s.deploy("daemon", code, json!({})).await;
    let s = std::sync::Arc::new(s);
    let call = {
        let s = s.clone();
        tokio::spawn(async move { s.invoke_raw("daemon", "", "{}").await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let during = sandboxed_pids(&s);
    let strays: Vec<u32> = during
        .iter()
        .copied()
        .filter(|p| !instance_of(*p))
        .collect();
    let (status, body) = call.await.unwrap();
    assert_eq!(
        (status, body["body"].clone()),
        (StatusCode::OK, json!("returned"))
    );
    // The spinning grandchild ran during the invocation and is gone once it returned,
    // while the instance itself (init, its PID 1 and the worker) stays warm.
    assert!(during.len() >= 4, "{during:?}");
    assert!(!strays.is_empty(), "{during:?}");
    assert!(
        gone(&strays).await,
        "a background process outlived its invocation"
    );
    assert_eq!(sandboxed_pids(&s).len(), 3, "{:?}", sandboxed_pids(&s));
    let (status, body) = s.invoke_raw("daemon", "", "{}").await;
    assert_eq!(
        (status, body["start_type"].clone()),
        (StatusCode::OK, json!("warm"))
    );
}

#[tokio::test]
async fn orphans_are_reaped_and_do_not_use_up_the_process_limit() {
    let s = NIMBUS.start(Backend::Sqlite).await;
    // Each call double-forks a short-lived helper: its orphan must be reaped, or the
    // zombies would reach the 64-process limit within a few calls.
    let code = r#"
import os, time
def handle(event):
    for _ in range(10):
        if os.fork() == 0:
            if os.fork() == 0:
                os._exit(0)
            os._exit(0)
        os.wait()
    time.sleep(0.05)
    return "ok"
"#;
    s.deploy("forker", code, json!({})).await;
    for i in 0..12 {
        let (status, body) = s.invoke_raw("forker", "", "{}").await;
        assert_eq!(status, StatusCode::OK, "call {i}: {body}");
    }
}

#[tokio::test]
async fn two_functions_cannot_see_each_other() {
    let s = NIMBUS.start(Backend::Sqlite).await;
    let writer = r#"
import os
def handle(event):
    with open("/tmp/secret", "w") as f:
        f.write("mine")
    return {"cwd": os.getcwd(), "code": sorted(os.listdir("."))}
"#;
    let a = result(&s, "alpha", writer, json!({})).await;
    let reader = r#"
import os
def handle(event):
    out = {"tmp": sorted(os.listdir("/tmp")), "pids": sorted(int(p) for p in os.listdir("/proc") if p.isdigit())}
    try:
        out["code"] = sorted(os.listdir(event["cwd"]))
    except OSError as e:
        out["code"] = type(e).__name__
    return out
"#;
    let b = result(&s, "beta", reader, json!({ "cwd": a["cwd"] })).await;
    // (A data directory under /tmp, as in tests, shows its own path there; never alpha's file.)
    assert!(
        !b["tmp"].as_array().unwrap().contains(&json!("secret")),
        "{b}"
    );
    assert_eq!(b["pids"], json!([1, 2]), "{b}");
    assert_eq!(
        b["code"], "FileNotFoundError",
        "alpha's code dir is not visible to beta: {b}"
    );
}

#[tokio::test]
async fn nothing_is_left_after_the_server_is_killed_and_restarted() {
    let mut s = NIMBUS.start(Backend::Sqlite).await;
    assert_eq!(
        result(&s, "alive", "def handle(e):\n    return 'ok'\n", json!({})).await,
        "ok"
    );
    let instances = sandboxed_pids(&s);
    assert!(!instances.is_empty());
    s.child.kill().unwrap();
    s.child.wait().unwrap();
    // Workers die with the server (parent-death signal through the sandbox init).
    assert!(
        gone(&instances).await,
        "instances survived the server's SIGKILL"
    );
    // A new server on the same data removes the old sandboxes' cgroups and serves.
    s.spawn(&[]).await;
    let (status, body) = s.invoke_raw("alive", "", "{}").await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test]
async fn ordinary_python_works_in_the_sandbox() {
    let s = NIMBUS.start(Backend::Sqlite).await;
    let code = r#"
import getpass, hashlib, json, multiprocessing, os, socket, ssl, tempfile, threading, time
def square(x):
    return x * x
def handle(event):
    with tempfile.NamedTemporaryFile(dir="/tmp") as f:
        f.write(b"ok")
    results = []
    t = threading.Thread(target=lambda: results.append(1))
    t.start(); t.join()
    with multiprocessing.Pool(2) as pool:
        squares = pool.map(square, [1, 2, 3])
    return {
        "user": getpass.getuser(),
        "host": socket.gethostname(),
        "sha": hashlib.sha256(b"x").hexdigest()[:8],
        "thread": results,
        "squares": squares,
        "tz": time.tzname[0],
        "ssl": ssl.OPENSSL_VERSION.split()[0],
    }
"#;
    let got = result(&s, "plain", code, json!({})).await;
    assert_eq!(got["user"], "sandbox", "{got}");
    assert_eq!(got["host"], "nimbus", "{got}");
    assert_eq!(got["sha"], "2d711642", "{got}");
    assert_eq!(got["thread"], json!([1]), "{got}");
    assert_eq!(got["squares"], json!([1, 4, 9]), "{got}");
    assert_eq!(got["ssl"], "OpenSSL", "{got}");
}

#[tokio::test]
async fn a_second_server_on_the_same_data_directory_is_refused() {
    let s = NIMBUS.start(Backend::Sqlite).await;
    assert_eq!(
        result(&s, "first", "def handle(e):\n    return 'ok'\n", json!({})).await,
        "ok"
    );
    // It would otherwise take the first server's sandboxes for leftovers and kill them.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_nimbus"))
        .args(["server", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(s.dir.path())
        .env("NIMBUS_LOG", "warn")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("another Nimbus server"), "{err}");
    let (status, body) = s.invoke_raw("first", "", "{}").await;
    assert_eq!(
        (status, body["start_type"].clone()),
        (StatusCode::OK, json!("warm"))
    );
}

#[tokio::test]
async fn outbound_functions_reach_public_addresses_and_nothing_else() {
    let internet = FakeInternet::start();
    let s = NIMBUS.start(Backend::Sqlite).await;
    let host_listener = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let port = host_listener.local_addr().unwrap().port();
    let code = r#"
import socket
def handle(event):
    out = {}
    for host, port in event["targets"]:
        try:
            c = socket.create_connection((host, port), timeout=2)
            out[f"{host}:{port}"] = c.recv(5).decode() or "connected"
            c.close()
        except OSError as e:
            out[f"{host}:{port}"] = type(e).__name__
    return out
"#;
    let targets = json!({ "targets": [
        ["198.51.100.2", 8080],
        ["127.0.0.1", port],
        ["192.0.2.2", port],
        ["10.255.255.53", 80],
        ["169.254.169.254", 80],
    ]});
    let (status, body) = run(
        &s,
        "online",
        code,
        json!({ "network": "outbound" }),
        targets.clone(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let got = &body["body"];
    assert_eq!(got["198.51.100.2:8080"], "hello", "{got}");
    for blocked in [
        format!("127.0.0.1:{port}"),
        format!("192.0.2.2:{port}"),
        "10.255.255.53:80".to_owned(),
        "169.254.169.254:80".to_owned(),
    ] {
        let outcome = got[&blocked].as_str().unwrap();
        assert!(
            outcome.ends_with("Error"),
            "{blocked} must be unreachable: {got}"
        );
    }
    let (_, function) = s.call("GET", "/functions/online", None).await;
    assert_eq!(function["network"], "outbound");
    // No IPv6 at all inside: no link-local path to the host's `::` listeners.
    let v6 = "def handle(e):\n    return open('/proc/net/if_inet6').read()\n";
    let (status, body) = run(&s, "v6", v6, json!({ "network": "outbound" }), json!({})).await;
    assert_eq!(
        (status, body["body"].clone()),
        (StatusCode::OK, json!("")),
        "{body}"
    );
    let (status, body) = s
        .call(
            "POST",
            "/functions",
            Some(json!({ "name": "wifi", "code": code, "network": "wifi" })),
        )
        .await;
    assert_eq!(
        (status, code_of(&body)),
        (StatusCode::BAD_REQUEST, "validation_error"),
        "{body}"
    );
    assert_eq!(body["error"]["field"], "network");
    // Without the option the same function reaches nothing.
    let (status, body) = run(&s, "offline", code, json!({}), targets).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["body"]["198.51.100.2:8080"], "OSError", "{body}");
    drop(internet);
}

#[tokio::test]
async fn strays_of_back_to_back_invocations_are_ended_too() {
    let s = NIMBUS.start(Backend::Sqlite).await;
    // Each call leaves a sleeping grandchild; calls come faster than any cache of the
    // kernel's process lists expires.
    let code = r#"
import os, time
def handle(event):
    if os.fork() == 0:
        if os.fork() == 0:
            time.sleep(120)
        os._exit(0)
    os.wait()
    return "ok"
"#;
    s.deploy("leaky", code, json!({})).await;
    for i in 0..5 {
        let (status, body) = s.invoke_raw("leaky", "", "{}").await;
        assert_eq!(status, StatusCode::OK, "call {i}: {body}");
        let deadline = Instant::now() + Duration::from_secs(2);
        while sandboxed_pids(&s).len() > 3 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(sandboxed_pids(&s).len(), 3, "call {i} left a stray");
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
}

/// Invokes `function` with `event` and waits (up to 2 s) until its sandbox holds only the
/// instance's own three processes; false if something else is still running then.
async fn strays_ended(s: &Server, function: &str, event: &str) -> bool {
    let (status, body) = s.invoke_raw(function, "", event).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let deadline = Instant::now() + Duration::from_secs(2);
    while sandboxed_pids(s).len() > 3 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sandboxed_pids(s).len() == 3
}

#[tokio::test]
async fn a_node_workers_threads_are_left_alone_and_its_strays_are_ended() {
    let s = NIMBUS.start(Backend::Sqlite).await;
    // Node.js runs several threads of its own, and a handler may start and end more: the
    // check after each invocation must tell them from processes the handler left behind,
    // also when threads end in the invocation that leaves a process (the task count then
    // does not rise).
    let code = r#"
const { spawn } = require('node:child_process');
const { Worker } = require('node:worker_threads');
let workers = [];
exports.handle = async (event) => {
  if (event.threads) {
    workers = Array.from({ length: 12 }, () => new Worker('setInterval(() => {}, 1000)', { eval: true }));
    await new Promise((r) => setTimeout(r, 300));
    return 'threads';
  }
  await Promise.all(workers.splice(0).map((w) => w.terminate()));
  spawn(process.execPath, ['-e', 'setTimeout(() => {}, 120000)'], { detached: true, stdio: 'ignore' }).unref();
  await new Promise((r) => setTimeout(r, 100));
  return 'stray';
};
"#;
    s.deploy("leaky-node", code, json!({ "runtime": "nodejs20" }))
        .await;
    for i in 0..3 {
        assert!(
            strays_ended(&s, "leaky-node", "{}").await,
            "call {i} left a stray"
        );
    }
    assert!(strays_ended(&s, "leaky-node", r#"{"threads": true}"#).await);
    assert!(
        strays_ended(&s, "leaky-node", "{}").await,
        "the stray of the call that ended 12 threads survived"
    );
}

#[tokio::test]
async fn a_python_stray_born_as_threads_end_is_ended() {
    let s = NIMBUS.start(Backend::Sqlite).await;
    let code = r#"
import os, threading, time
done = threading.Event()
def handle(event):
    global done
    if event.get("threads"):
        done = threading.Event()
        for _ in range(4):
            threading.Thread(target=done.wait, daemon=True).start()
        return "threads"
    done.set()
    time.sleep(0.1)
    if os.fork() == 0:
        time.sleep(120)
        os._exit(0)
    return "stray"
"#;
    s.deploy("leaky-threads", code, json!({})).await;
    assert!(strays_ended(&s, "leaky-threads", r#"{"threads": true}"#).await);
    assert!(
        strays_ended(&s, "leaky-threads", "{}").await,
        "the stray of the call that ended 4 threads survived"
    );
}

#[tokio::test]
async fn a_node_function_is_held_to_its_timeout_and_memory_limit() {
    let s = NIMBUS.start(Backend::Sqlite).await;
    // A synchronous spin never yields to the event loop: only the host's timeout ends it.
    s.deploy(
        "spin-node",
        "exports.handle = () => { for (;;) {} };\n",
        json!({ "runtime": "nodejs20", "timeout_sec": 1 }),
    )
    .await;
    let started = Instant::now();
    let (status, body) = s.invoke_raw("spin-node", "", "{}").await;
    assert_eq!(
        (status, code_of(&body)),
        (StatusCode::GATEWAY_TIMEOUT, "function_timeout"),
        "{body}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    // Buffers outside V8's heap, written so that the pages are really used: the cgroup's
    // limit, not V8's heap limit, stops it.
    s.deploy(
        "hog-node",
        "exports.handle = () => { const all = []; for (let i = 0; i < 64; i++) all.push(Buffer.alloc(32 << 20, 1)); return all.length; };\n",
        json!({ "runtime": "nodejs20", "memory_mb": 128 }),
    )
    .await;
    let (status, body) = s.invoke_raw("hog-node", "", "{}").await;
    assert_eq!(
        (status, code_of(&body)),
        (StatusCode::BAD_GATEWAY, "out_of_memory"),
        "{body}"
    );
    // Both come back with fresh instances, which fail the same way, not worse.
    for (function, status, code) in [
        ("spin-node", StatusCode::GATEWAY_TIMEOUT, "function_timeout"),
        ("hog-node", StatusCode::BAD_GATEWAY, "out_of_memory"),
    ] {
        let (got, body) = s.invoke_raw(function, "", "{}").await;
        assert_eq!((got, code_of(&body)), (status, code), "{body}");
    }
    assert_eq!(
        result(&s, "calm", "def handle(e):\n    return 'ok'\n", json!({})).await,
        "ok"
    );
}
