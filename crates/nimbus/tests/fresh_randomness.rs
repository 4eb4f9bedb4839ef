//! Every instance started from a snapshot draws randomness of its own (SPEC §6), through
//! the real server with isolation on: each forked or restored instance is PID 1 of its
//! own pid namespace, so no library can tell it was forked by a change of `getpid()`.
//!
//! These servers retire an instance after every invocation (`max_invocations = 1`), so
//! every invocation starts a new instance.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use nimbus_testkit::server::{Backend, Nimbus, Server};
use reqwest::StatusCode;
use serde_json::{json, Value};

/// The binary under test.
const NIMBUS: Nimbus = Nimbus::at(env!("CARGO_BIN_EXE_nimbus"));

async fn server() -> Server {
    NIMBUS
        .start_with(Backend::Sqlite, "max_invocations = 1\n", &["--snapshots"])
        .await
}

/// Waits until `function`'s snapshot of `version` has `status`; returns its row.
async fn wait_status(s: &Server, function: &str, version: u64, status: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (code, body) = s
            .call("GET", &format!("/functions/{function}/snapshots"), None)
            .await;
        assert_eq!(code, StatusCode::OK, "{body}");
        if let Some(found) = body["snapshots"].as_array().and_then(|all| {
            all.iter()
                .find(|x| x["version"] == version && x["status"] == status)
        }) {
            let ready = status != "ready" || found["resident"] == true;
            if ready {
                return found.clone();
            }
        }
        assert!(
            Instant::now() < deadline,
            "no {status} snapshot of {version}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn invoke(s: &Server, function: &str) -> Value {
    let (status, body) = s.invoke_raw(function, "", "{}").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

/// A function whose init draws from OpenSSL (as `requests`, `urllib3` and TLS database
/// drivers do when they make a context), from `tempfile`'s names and from `random`: the
/// template holds all three generators' states.
const DRAWS_AT_INIT: &str = r#"
import random, ssl, tempfile

CONTEXT = ssl.create_default_context()
ssl.RAND_bytes(16)
with tempfile.TemporaryFile():
    pass
random.random()

def handle(event):
    return {
        "openssl": ssl.RAND_bytes(16).hex(),
        "tempfile": tempfile.mktemp(),
        "random": random.getrandbits(64),
    }
"#;

/// Adds each generator's draw in `r` to the draws seen so far, failing on a repeat.
fn record(seen: &mut [HashSet<String>; 3], r: &Value) {
    for (i, key) in ["openssl", "tempfile", "random"].iter().enumerate() {
        let draw = r["body"][key].to_string();
        assert!(
            seen[i].insert(draw.clone()),
            "two instances drew the same {key} value {draw}: {r}"
        );
    }
}

#[tokio::test]
async fn instances_forked_from_a_template_or_restored_from_disk_never_share_random_state() {
    let mut s = server().await;
    s.deploy("draws", DRAWS_AT_INIT, json!({})).await;
    let snapshot = wait_status(&s, "draws", 1, "ready").await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !wait_status(&s, "draws", 1, "ready").await["path"].is_string() {
        assert!(Instant::now() < deadline, "never checkpointed: {snapshot}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut seen: [HashSet<String>; 3] = Default::default();
    // Forked from the template, one after the other and at once.
    for _ in 0..3 {
        let r = invoke(&s, "draws").await;
        assert_eq!(r["start_type"], "template", "{r}");
        record(&mut seen, &r);
    }
    let burst = futures::future::join_all((0..4).map(|_| invoke(&s, "draws"))).await;
    for r in &burst {
        assert_eq!(r["start_type"], "template", "{r}");
        record(&mut seen, r);
    }
    // Restored from the one checkpoint after each restart: the same memory every time.
    for _ in 0..3 {
        s.restart().await;
        let restored = invoke(&s, "draws").await;
        assert_eq!(restored["start_type"], "snapshot", "{restored}");
        record(&mut seen, &restored);
        let forked = invoke(&s, "draws").await;
        assert_eq!(forked["start_type"], "template", "{forked}");
        record(&mut seen, &forked);
    }
}

#[tokio::test]
async fn a_snapshot_whose_instances_would_share_a_generator_of_the_function_is_refused() {
    let s = server().await;
    // A generator of the function's own, seeded at init: every fork would repeat it.
    let shared = "import random\nRNG = random.Random()\n\
                  def handle(event):\n    return RNG.random()\n";
    s.deploy("own", shared, json!({})).await;
    let failed = wait_status(&s, "own", 1, "failed").await;
    let error = failed["error_message"].as_str().unwrap_or_default();
    assert!(
        error.contains("SharedRandomState") && error.contains("handler.RNG"),
        "{failed}"
    );
    assert!(error.contains("@nimbus.after_restore"), "{failed}");
    // Its instances start cold instead, each with a generator of its own.
    let a = invoke(&s, "own").await;
    let b = invoke(&s, "own").await;
    assert_eq!(a["start_type"], "cold", "{a}");
    assert_eq!(b["start_type"], "cold", "{b}");
    assert_ne!(a["body"], b["body"]);
    let (_, metrics) = s.call("GET", "/../../metrics", None).await;
    let metrics = metrics.as_str().unwrap_or_default().to_owned();
    assert!(
        metrics.contains(r#"nimbus_snapshot_shared_random_total{stage="build"} 1"#),
        "{metrics}"
    );

    // Reseeded in an after-restore hook, as the error says: the snapshot serves.
    let reseeded = "import random, nimbus\nRNG = random.Random()\n\
                    @nimbus.after_restore\ndef reseed():\n    RNG.seed()\n\
                    def handle(event):\n    return RNG.random()\n";
    let (status, body) = s
        .call("PUT", "/functions/own", Some(json!({ "code": reseeded })))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    wait_status(&s, "own", 2, "ready").await;
    let a = invoke(&s, "own").await;
    let b = invoke(&s, "own").await;
    assert_eq!(a["start_type"], "template", "{a}");
    assert_eq!(b["start_type"], "template", "{b}");
    assert_ne!(a["body"], b["body"]);

    // A generator meant to repeat, marked so: the snapshot serves and it repeats.
    let fixed = "import random, nimbus\nRNG = nimbus.deterministic(random.Random(7))\n\
                 def handle(event):\n    return RNG.random()\n";
    let (status, body) = s
        .call("PUT", "/functions/own", Some(json!({ "code": fixed })))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    wait_status(&s, "own", 3, "ready").await;
    let a = invoke(&s, "own").await;
    let b = invoke(&s, "own").await;
    assert_eq!(a["start_type"], "template", "{a}");
    assert_eq!(a["body"], b["body"]);
}

#[tokio::test]
async fn a_large_template_with_many_generators_of_its_own_is_checked_without_walking_its_heap() {
    let s = server().await;
    // A million small objects the garbage collector tracks, and 4,000 generators the
    // function reseeds itself: probes that walked the heap would copy much of it, and
    // naming each generator (a walk per generator) would outlast the start timeout.
    let code = r#"
import random, nimbus
DATA = [[i] for i in range(1_000_000)]
RNGS = [random.Random() for _ in range(4_000)]

@nimbus.after_restore
def reseed():
    for rng in RNGS:
        rng.seed()

def handle(event):
    return [rng.random() for rng in RNGS[:3]]
"#;
    s.deploy("large", code, json!({ "memory_mb": 384 })).await;
    wait_status(&s, "large", 1, "ready").await;
    let a = invoke(&s, "large").await;
    let b = invoke(&s, "large").await;
    assert_eq!(a["start_type"], "template", "{a}");
    assert_eq!(b["start_type"], "template", "{b}");
    assert_ne!(a["body"], b["body"]);
}

#[tokio::test]
async fn files_of_the_function_named_like_the_runtime_s_template_modules_do_not_replace_them() {
    let s = server().await;
    // Were these imported in their place, reseeding and the probes would be the
    // function's to replace (here: to break).
    let archive = nimbus_testkit::server::zip_base64(&[
        (
            "handler.py",
            "import random
def handle(event):
    return random.random()
",
        ),
        (
            "nimbus_entropy.py",
            "def prepare(skip=()):
    raise RuntimeError('not the runtime')
",
        ),
        (
            "nimbus_fork.py",
            "raise RuntimeError('not the runtime')
",
        ),
    ]);
    let (status, body) = s
        .call(
            "POST",
            "/functions",
            Some(json!({ "name": "namesakes", "code_archive": archive })),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    wait_status(&s, "namesakes", 1, "ready").await;
    let a = invoke(&s, "namesakes").await;
    let b = invoke(&s, "namesakes").await;
    assert_eq!(a["start_type"], "template", "{a}");
    assert_ne!(a["body"], b["body"]);
}
