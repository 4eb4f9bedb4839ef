//! Function-level snapshots end to end, through the real server with isolation on (the
//! default): new instances forked from a version's template, in sandboxes of their own.
//!
//! These servers retire an instance after every invocation (`max_invocations = 1`), so
//! every invocation starts a new instance: from the template once it is resident.

use std::time::{Duration, Instant};

use nimbus_testkit::server::{code_of, Backend, Nimbus, Server};
use reqwest::StatusCode;
use serde_json::{json, Value};

/// The binary under test.
const NIMBUS: Nimbus = Nimbus::at(env!("CARGO_BIN_EXE_nimbus"));

/// A server whose every invocation starts a new instance, snapshots on.
async fn server() -> Server {
    NIMBUS
        .start_with(Backend::Sqlite, "max_invocations = 1\n", &["--snapshots"])
        .await
}

/// Waits until `function` has a resident template of `version` (its row `ready`).
async fn wait_resident(s: &Server, function: &str, version: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = s
            .call("GET", &format!("/functions/{function}/snapshots"), None)
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        if let Some(found) = body["snapshots"].as_array().and_then(|all| {
            all.iter().find(|x| {
                x["version"] == version && x["status"] == "ready" && x["resident"] == true
            })
        }) {
            return found.clone();
        }
        assert!(Instant::now() < deadline, "no resident snapshot: {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn invoke(s: &Server, function: &str, query: &str) -> Value {
    let (status, body) = s.invoke_raw(function, query, "{}").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

const SLOW_INIT: &str = r#"
import os, random, time, uuid
time.sleep(0.5)
TABLE = {i: str(i) for i in range(100000)}
LOADED = random.random()

def handle(event):
    return {"loaded": LOADED, "random": random.random(), "uuid": str(uuid.uuid4()),
            "instance": os.environ["NIMBUS_INSTANCE_ID"], "size": len(TABLE)}
"#;

#[tokio::test]
async fn new_instances_start_from_the_template_and_never_share_randomness() {
    let s = server().await;
    s.deploy("slow", SLOW_INIT, json!({})).await;
    wait_resident(&s, "slow", 1).await;
    let a = invoke(&s, "slow", "").await;
    let b = invoke(&s, "slow", "").await;
    for r in [&a, &b] {
        assert_eq!(r["start_type"], "template", "{r}");
        assert_eq!(r["cold_start"], true, "{r}");
        assert_eq!(r["body"]["size"], 100000);
    }
    assert_ne!(a["instance_id"], b["instance_id"]);
    assert_eq!(
        a["body"]["instance"], a["instance_id"],
        "a fresh instance id"
    );
    assert_eq!(a["body"]["loaded"], b["body"]["loaded"], "one init, shared");
    assert_ne!(a["body"]["random"], b["body"]["random"]);
    assert_ne!(a["body"]["uuid"], b["body"]["uuid"]);

    let (_, metrics) = s.call("GET", "/../../metrics", None).await;
    let metrics = metrics.as_str().unwrap_or_default().to_owned();
    for line in [
        r#"nimbus_snapshot_build_total{status="success"} 1"#,
        r#"nimbus_snapshot_restore_total{status="success",start_type="template"} 2"#,
        r#"nimbus_cold_starts_total{runtime="python3.11",start_type="template"} 2"#,
        r#"nimbus_snapshot_count{status="ready"} 1"#,
    ] {
        assert!(metrics.contains(line), "{line} missing from:\n{metrics}");
    }
}

#[tokio::test]
async fn updating_the_code_never_serves_old_code() {
    let s = server().await;
    let code = |word: &str| format!("def handle(event):\n    return {word:?}\n");
    s.deploy("word", &code("one"), json!({})).await;
    wait_resident(&s, "word", 1).await;
    assert_eq!(invoke(&s, "word", "").await["body"], "one");
    let (status, body) = s
        .call(
            "PUT",
            "/functions/word",
            Some(json!({ "code": code("two") })),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // Before, while and after version 2's template is built: never the old code.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut from_template = false;
    while !from_template {
        let r = invoke(&s, "word", "").await;
        assert_eq!(r["body"], "two", "{r}");
        assert_eq!(r["version"], 2, "{r}");
        from_template = r["start_type"] == "template";
        assert!(
            Instant::now() < deadline,
            "version 2 never started from its template"
        );
    }
    // Version 1 still runs its own code, from its own template.
    let old = invoke(&s, "word", "?version=1").await;
    assert_eq!(
        (old["body"].clone(), old["start_type"].clone()),
        (json!("one"), json!("template"))
    );
}

const PROBE: &str = r#"
import ctypes, os, socket

def handle(event):
    marker = "/tmp/mine-" + os.environ["NIMBUS_INSTANCE_ID"]
    open(marker, "w").write("x")
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    libc = ctypes.CDLL(None, use_errno=True)
    unshare = libc.unshare(0x10000000)
    try:
        socket.create_connection(("1.1.1.1", 53), timeout=0.5)
        net = "connected"
    except OSError as e:
        net = type(e).__name__
    def readable(path):
        try:
            open(path, "rb").read(1)
            return True
        except OSError:
            return False
    return {
        "uid": os.getuid(),
        "pids": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
        "tmp": sorted(n for n in os.listdir("/tmp") if n.startswith("mine-")),
        "cap_eff": status["CapEff"].strip(),
        "seccomp_filters": status["Seccomp_filters"].strip(),
        "unshare": [unshare, ctypes.get_errno()],
        "net": net,
        "shadow": readable("/etc/shadow"),
        "data_dir": readable(event["db"]),
    }
"#;

#[tokio::test]
async fn forked_instances_are_sandboxed_like_cold_ones_and_from_each_other() {
    let s = server().await;
    s.deploy("probe", PROBE, json!({})).await;
    wait_resident(&s, "probe", 1).await;
    let db = s.dir.path().join("nimbus.db").display().to_string();
    for _ in 0..2 {
        let (status, r) = s
            .invoke_raw("probe", "", &json!({ "db": db }).to_string())
            .await;
        assert_eq!(status, StatusCode::OK, "{r}");
        assert_eq!(r["start_type"], "template", "{r}");
        let got = &r["body"];
        assert_eq!(got["uid"], 1000, "{got}");
        // PID 1 of its own pid namespace: neither the template nor other instances.
        assert_eq!(got["pids"], json!([1]), "{got}");
        // Its /tmp holds only what it wrote itself, not the earlier instance's file.
        assert_eq!(got["tmp"].as_array().unwrap().len(), 1, "{got}");
        assert_eq!(got["cap_eff"], "0000000000000000", "{got}");
        // The template's filter and the worker filter on top of it.
        assert_eq!(got["seccomp_filters"], "2", "{got}");
        assert_eq!(got["unshare"], json!([-1, 1]), "EPERM: {got}");
        assert_eq!(got["net"], "OSError", "{got}");
        assert_eq!(got["shadow"], false, "{got}");
        assert_eq!(got["data_dir"], false, "{got}");
    }
}

#[tokio::test]
async fn a_forked_instance_is_held_to_its_own_memory_and_process_limits() {
    let s = server().await;
    let code = r#"
import os, time
def handle(event):
    if event.get("small"):
        return "fine"
    if event.get("fork_bomb"):
        made = 0
        try:
            for _ in range(500):
                if os.fork() == 0:
                    time.sleep(30)
                    os._exit(0)
                made += 1
        except OSError as e:
            return {"made": made, "error": type(e).__name__}
        return {"made": made}
    blob = bytearray(400 * 1024 * 1024)
    for i in range(0, len(blob), 4096):
        blob[i] = 1
    return len(blob)
"#;
    s.deploy("hungry", code, json!({ "memory_mb": 128 })).await;
    wait_resident(&s, "hungry", 1).await;
    let (status, r) = s.invoke_raw("hungry", "", "{}").await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{r}");
    assert_eq!(code_of(&r), "out_of_memory", "{r}");

    let bomb = s.invoke_raw("hungry", "", r#"{"fork_bomb": true}"#).await;
    assert_eq!(bomb.0, StatusCode::OK, "{}", bomb.1);
    assert_eq!(bomb.1["start_type"], "template", "{}", bomb.1);
    let made = bomb.1["body"]["made"].as_u64().unwrap();
    assert!(made < 64, "the pids limit stopped it: {}", bomb.1);
    // The template survives its children's excesses and still forks.
    let (status, after) = s
        .invoke_raw("hungry", "", r#"{"fork_bomb": false, "small": true}"#)
        .await;
    assert_eq!(status, StatusCode::OK, "{after}");
    assert_eq!(after["start_type"], "template", "{after}");
}

#[tokio::test]
async fn a_failing_after_restore_hook_fails_the_start_with_its_name() {
    let s = server().await;
    let code = r#"
import nimbus

@nimbus.after_restore
def reconnect():
    raise ConnectionError("database unreachable")

def handle(event):
    return "ok"
"#;
    s.deploy("hooked", code, json!({})).await;
    wait_resident(&s, "hooked", 1).await;
    let (status, r) = s.invoke_raw("hooked", "", "{}").await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{r}");
    assert_eq!(code_of(&r), "function_init_error", "{r}");
    assert_eq!(r["start_type"], "template", "{r}");
    assert_eq!(
        r["error"]["message"],
        "the instance failed to start: @nimbus.after_restore hook reconnect raised \
         ConnectionError: database unreachable",
        "{r}"
    );
}

/// Host pids of the template of `function` and of the instances forked from it (the
/// processes with `NIMBUS_TEMPLATE=1` and the function's name in their environment).
fn template_pids(function: &str) -> Vec<i32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        let vars: Vec<&[u8]> = environ.split(|b| *b == 0).collect();
        let name = format!("NIMBUS_FUNCTION_NAME={function}");
        if vars.contains(&b"NIMBUS_TEMPLATE=1".as_slice()) && vars.contains(&name.as_bytes()) {
            found.push(pid);
        }
    }
    found
}

#[tokio::test]
async fn when_its_template_dies_the_invocation_still_succeeds_and_the_snapshot_is_rebuilt() {
    // In memory only: with a checkpoint on disk, the template would come back from it.
    let s = NIMBUS
        .start_with(
            Backend::Sqlite,
            "max_invocations = 1\n[snapshots]\ndisk = false\n",
            &["--snapshots"],
        )
        .await;
    s.deploy(
        "fragile",
        "def handle(event):\n    return 'fine'\n",
        json!({}),
    )
    .await;
    let first = wait_resident(&s, "fragile", 1).await;
    // The template and its forks share its environment; the oldest is the template.
    let mut pids = template_pids("fragile");
    pids.sort();
    assert!(!pids.is_empty(), "template not found");
    let killed = std::process::Command::new("kill")
        .args(["-KILL", &pids[0].to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    tokio::time::sleep(Duration::from_millis(100)).await;
    let r = invoke(&s, "fragile", "").await;
    assert_eq!(r["body"], "fine");
    assert_eq!(r["start_type"], "cold", "{r}");
    // Marked, then built again under the same id.
    let rebuilt = wait_resident(&s, "fragile", 1).await;
    assert_eq!(rebuilt["id"], first["id"]);
    let r = invoke(&s, "fragile", "").await;
    assert_eq!(r["start_type"], "template", "{r}");
}

#[tokio::test]
async fn an_outbound_function_forks_instances_with_links_of_their_own() {
    let _internet = nimbus_testkit::internet::FakeInternet::start();
    let s = server().await;
    let code = r#"
import socket
def handle(event):
    try:
        c = socket.create_connection(("198.51.100.2", 8080), timeout=2)
        reply = c.recv(5).decode()
        c.close()
    except OSError as e:
        reply = type(e).__name__
    return {"reply": reply}
"#;
    s.deploy("online", code, json!({ "network": "outbound" }))
        .await;
    wait_resident(&s, "online", 1).await;
    for _ in 0..2 {
        let r = invoke(&s, "online", "").await;
        assert_eq!(r["start_type"], "template", "{r}");
        assert_eq!(r["body"]["reply"], "hello", "{r}");
    }
}

#[tokio::test]
async fn a_burst_of_new_instances_all_fork_from_the_template() {
    let s = NIMBUS
        .start_with(Backend::Sqlite, "", &["--snapshots"])
        .await;
    let code = "import time\ndef handle(event):\n    time.sleep(0.5)\n    return 'done'\n";
    s.deploy("burst", code, json!({ "max_instances": 80 }))
        .await;
    wait_resident(&s, "burst", 1).await;
    assert_eq!(s.burst_of_template_starts("burst", 80, "{}").await, 80);
}

// --- the disk tier (CRIU 4, installed by scripts/install-criu.sh, which .ci/run runs) ------

/// Waits until `function`'s snapshot of `version` is ready with its files on disk.
async fn wait_on_disk(s: &Server, function: &str, version: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let found = wait_resident(s, function, version).await;
        if found["path"].is_string() && !found["files"].as_array().unwrap().is_empty() {
            return found;
        }
        assert!(Instant::now() < deadline, "never checkpointed: {found}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_restarted_server_starts_instances_from_the_checkpoint_on_disk() {
    let mut s = server().await;
    s.deploy("slow", SLOW_INIT, json!({})).await;
    let snapshot = wait_on_disk(&s, "slow", 1).await;
    let files = snapshot["files"].as_array().unwrap();
    assert!(
        files.iter().any(|f| f["name"] == "metadata.json"),
        "{snapshot}"
    );
    assert!(
        files
            .iter()
            .all(|f| f["checksum"].as_str().unwrap().len() == "blake3:".len() + 64),
        "{snapshot}"
    );
    let before = invoke(&s, "slow", "").await;
    assert_eq!(before["start_type"], "template", "{before}");
    // A data directory only root can enter, like the default one under /root: the restore
    // binds its paths from inside the sandbox's user namespace.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(s.dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    // The templates die with the server; the checkpoint stays.
    s.restart().await;
    let a = invoke(&s, "slow", "").await;
    assert_eq!(a["start_type"], "snapshot", "{a}");
    // The module's init did not run again: its random draw is the checkpointed one.
    assert_eq!(a["body"]["loaded"], before["body"]["loaded"], "{a}");
    // CRIU ran with the restore tmpfs as its /run, where it keeps what it learned of the
    // kernel for the next restore (it keeps nothing on a /run that is no tmpfs).
    let cache = std::path::Path::new("/run/nimbus/restore/criu.kdat");
    assert!(cache.is_file(), "no {}", cache.display());
    // Restored once, the template is resident again.
    let b = invoke(&s, "slow", "").await;
    assert_eq!(b["start_type"], "template", "{b}");
    assert_eq!(
        a["body"]["loaded"], b["body"]["loaded"],
        "one init, restored"
    );
    assert_ne!(a["body"]["random"], b["body"]["random"]);
    assert_ne!(a["body"]["uuid"], b["body"]["uuid"]);
    let (_, metrics) = s.call("GET", "/../../metrics", None).await;
    let metrics = metrics.as_str().unwrap_or_default().to_owned();
    assert!(
        metrics
            .contains(r#"nimbus_cold_starts_total{runtime="python3.11",start_type="snapshot"} 1"#),
        "{metrics}"
    );
    // Restores from disk and forks are counted apart, in the row and the metrics.
    for line in [
        r#"nimbus_snapshot_restore_total{status="success",start_type="snapshot"} 1"#,
        r#"nimbus_snapshot_restore_total{status="success",start_type="template"} 1"#,
    ] {
        assert!(metrics.contains(line), "{line} missing from:\n{metrics}");
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let row = loop {
        let row = wait_resident(&s, "slow", 1).await;
        // The row counts the starts behind the invocations: the fork before restarting too.
        if row["fork_count"] == 2 && row["restore_count"] == 1 {
            break row;
        }
        assert!(Instant::now() < deadline, "starts not recorded: {row}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        row["avg_restore_ms"].as_f64().unwrap() > row["avg_fork_ms"].as_f64().unwrap(),
        "a restore from disk outlasts a fork: {row}"
    );
}

#[tokio::test]
async fn a_burst_after_a_restart_waits_for_the_one_restore_and_forks_from_it() {
    let mut s = server().await;
    s.deploy("slow", SLOW_INIT, json!({})).await;
    wait_on_disk(&s, "slow", 1).await;
    s.restart().await;
    // Twenty first calls at once: one restores the template, the others wait for it (a
    // cold start of this function takes over half a second) and fork from it.
    let calls = (0..20).map(|_| s.invoke_raw("slow", "", "{}"));
    let mut starts = std::collections::HashMap::new();
    for (status, r) in futures::future::join_all(calls).await {
        assert_eq!(status, StatusCode::OK, "{r}");
        *starts
            .entry(r["start_type"].as_str().unwrap().to_owned())
            .or_insert(0) += 1;
    }
    assert_eq!(starts.get("snapshot"), Some(&1), "{starts:?}");
    assert_eq!(starts.get("template"), Some(&19), "{starts:?}");
}

#[tokio::test]
async fn a_corrupted_checkpoint_is_caught_the_invocation_succeeds_and_it_is_rebuilt() {
    let mut s = server().await;
    s.deploy("fragile", SLOW_INIT, json!({})).await;
    let snapshot = wait_on_disk(&s, "fragile", 1).await;
    s.restart().await;
    // Flip bytes in the middle of the memory image.
    let dir = std::path::PathBuf::from(snapshot["path"].as_str().unwrap());
    let pages = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("pages-")
        })
        .expect("a pages image");
    let mut bytes = std::fs::read(&pages).unwrap();
    let middle = bytes.len() / 2;
    for b in &mut bytes[middle..middle + 16] {
        *b ^= 0xff;
    }
    std::fs::write(&pages, &bytes).unwrap();

    let r = invoke(&s, "fragile", "").await;
    assert_eq!(r["start_type"], "cold", "{r}");
    assert_eq!(r["body"]["size"], 100000, "{r}");
    // Marked corrupt, then rebuilt and checkpointed again under the same id, the failure
    // kept in its history.
    let deadline = Instant::now() + Duration::from_secs(30);
    let row = loop {
        let (_, body) = s.call("GET", "/functions/fragile/snapshots", None).await;
        let row = &body["snapshots"][0];
        if row["status"] == "ready" && row["path"].is_string() {
            break row.clone();
        }
        assert!(Instant::now() < deadline, "not rebuilt: {body}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(row["id"], snapshot["id"]);
    assert_eq!(row["error_message"], Value::Null, "{row}");
    assert_eq!(row["failure_count"], 1, "{row}");
    assert_eq!(row["last_failure"]["status"], "corrupt", "{row}");
    assert!(
        row["last_failure"]["message"]
            .as_str()
            .unwrap()
            .contains("does not match its checksum"),
        "{row}"
    );
    let (_, metrics) = s.call("GET", "/../../metrics", None).await;
    let metrics = metrics.as_str().unwrap_or_default().to_owned();
    assert!(
        metrics
            .contains(r#"nimbus_snapshot_restore_total{status="failed",start_type="snapshot"} 1"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_checkpoint_directory_gone_while_the_server_was_down_is_reported_and_rebuilt() {
    let mut s = server().await;
    s.deploy("lost", SLOW_INIT, json!({})).await;
    let snapshot = wait_on_disk(&s, "lost", 1).await;
    let dir = std::path::PathBuf::from(snapshot["path"].as_str().unwrap());
    s.stop_cleanly();
    std::fs::remove_dir_all(&dir).unwrap();
    s.start_again().await;
    let (_, body) = s.call("GET", "/functions/lost/snapshots", None).await;
    let row = &body["snapshots"][0];
    assert_eq!(row["status"], "corrupt", "{row}");
    assert!(
        row["error_message"]
            .as_str()
            .unwrap()
            .contains("is missing"),
        "{row}"
    );
    assert_eq!(row["failure_count"], 1, "{row}");
    let (_, metrics) = s.call("GET", "/../../metrics", None).await;
    let metrics = metrics.as_str().unwrap_or_default().to_owned();
    assert!(
        metrics
            .contains(r#"nimbus_snapshot_restore_total{status="failed",start_type="snapshot"} 1"#),
        "{metrics}"
    );
    // The version starts cold, and its snapshot is built again.
    let r = invoke(&s, "lost", "").await;
    assert_eq!(r["start_type"], "cold", "{r}");
    let rebuilt = wait_on_disk(&s, "lost", 1).await;
    assert_eq!(rebuilt["id"], snapshot["id"]);
    assert_eq!(rebuilt["last_failure"]["status"], "corrupt", "{rebuilt}");
}

#[tokio::test]
async fn a_killed_server_takes_its_templates_spares_and_forked_instances_along() {
    let mut s = server().await;
    s.deploy("orphans", SLOW_INIT, json!({})).await;
    wait_resident(&s, "orphans", 1).await;
    invoke(&s, "orphans", "").await; // a forked instance, then a spare forked ahead
    assert!(!template_pids("orphans").is_empty());
    s.child.kill().unwrap(); // SIGKILL: no shutdown of its own
    s.child.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !template_pids("orphans").is_empty() {
        assert!(
            Instant::now() < deadline,
            "processes outlived the server: {:?}",
            template_pids("orphans")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The next start on the data directory removes what the killed one left (its cgroups).
    let args = s.args.clone();
    s.spawn(&args.iter().map(String::as_str).collect::<Vec<_>>())
        .await;
}

#[tokio::test]
async fn a_fork_that_skips_its_sandbox_is_refused_by_the_host_and_the_version_starts_cold() {
    let s = server().await;
    // The function's init runs in the template's interpreter and can alter the runtime's
    // own fork code: here it makes children skip their sandbox.
    let code = r#"
import nimbus_fork
nimbus_fork._enter_sandbox = lambda *args: None

def handle(event):
    return "ran"
"#;
    s.deploy("tamper", code, json!({})).await;
    wait_resident(&s, "tamper", 1).await;
    let r = invoke(&s, "tamper", "").await;
    assert_eq!(r["body"], "ran");
    assert_eq!(r["start_type"], "cold", "the refused fork fell back: {r}");
    let (_, body) = s.call("GET", "/functions/tamper/snapshots", None).await;
    let row = &body["snapshots"][0];
    assert_eq!(row["status"], "failed", "{row}");
    assert!(
        row["error_message"]
            .as_str()
            .unwrap()
            .contains("did not enter its sandbox"),
        "{row}"
    );
    // Not rebuilt by itself: the same code would do the same.
    let again = invoke(&s, "tamper", "").await;
    assert_eq!(again["start_type"], "cold", "{again}");
}

#[tokio::test]
async fn a_forked_instance_s_strays_are_ended_also_when_its_threads_end() {
    let s = NIMBUS
        .start_with(Backend::Sqlite, "", &["--snapshots"])
        .await;
    // The instance is PID 1 of its own pid namespace: what else runs there (zombies aside)
    // was left by an invocation.
    let code = r#"
import os, threading, time
done = threading.Event()
def others():
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit() and name != "1":
            with open(f"/proc/{name}/stat") as stat:
                if stat.read().rsplit(")", 1)[1].split()[0] != "Z":
                    found.append(int(name))
    return found
def handle(event):
    global done
    if event.get("threads"):
        done = threading.Event()
        for _ in range(4):
            threading.Thread(target=done.wait, daemon=True).start()
    elif event.get("stray"):
        done.set()
        time.sleep(0.1)
        if os.fork() == 0:
            time.sleep(120)
            os._exit(0)
    time.sleep(0.05)
    return {"others": others(), "threads": threading.active_count()}
"#;
    s.deploy("threaded", code, json!({})).await;
    wait_resident(&s, "threaded", 1).await;
    for (event, start_type, threads) in [
        (r#"{"threads": true}"#, "template", 5),
        (r#"{"stray": true}"#, "warm", 1),
    ] {
        let (status, r) = s.invoke_raw("threaded", "", event).await;
        assert_eq!(status, StatusCode::OK, "{r}");
        assert_eq!(r["start_type"], start_type, "{r}");
        assert_eq!(r["body"]["threads"], threads, "{r}");
    }
    // The stray forked as the threads ended is gone by the next invocation.
    let (status, r) = s.invoke_raw("threaded", "", "{}").await;
    assert_eq!(status, StatusCode::OK, "{r}");
    assert_eq!(r["start_type"], "warm", "{r}");
    assert_eq!(r["body"]["others"], json!([]), "{r}");
}
