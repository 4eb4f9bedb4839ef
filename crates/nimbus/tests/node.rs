//! The nodejs20 runtime end to end: the real server (isolated), Node.js functions deployed
//! and invoked over HTTP, with state and session keys.

use nimbus_testkit::server::{Backend, Nimbus, Server};
use reqwest::StatusCode;
use serde_json::{json, Value};

/// The binary under test.
const NIMBUS: Nimbus = Nimbus::at(env!("CARGO_BIN_EXE_nimbus"));

const HELLO: &str = r#"
exports.handle = async (event) => ({ message: `Hello, ${event.name ?? 'world'}!`, node: process.version, uid: process.getuid(), pid: process.pid });
"#;

/// The seed's cart, in JavaScript.
const CART: &str = r#"
exports.handle = async (event, state) => {
  const cart = (await state.get('cart')) ?? [];
  cart.push(event.item_id);
  await state.set('cart', cart, 3600);
  const count = await state.incr('item_count');
  return { cart_size: cart.length, total_items: count };
};
"#;

/// `nimbus invoke <function> --data <data> --output json`, parsed.
async fn cli_invoke(s: &Server, function: &str, data: &str) -> Value {
    let out = s
        .cli(&["invoke", function, "--data", data, "--output", "json"])
        .await;
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

async fn invoke(s: &Server, function: &str, query: &str, event: Value) -> Value {
    let (status, body) = s.invoke_raw(function, query, &event.to_string()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

#[tokio::test]
async fn a_node_function_deploys_and_runs_in_its_sandbox() {
    let s = NIMBUS.start(Backend::Sqlite).await;
    let created = s
        .deploy(
            "hello-node",
            HELLO,
            json!({"runtime": "nodejs20", "handler": "index.handle"}),
        )
        .await;
    assert_eq!(created.function.runtime, "nodejs20");
    let r = invoke(&s, "hello-node", "", json!({"name": "Nimbus"})).await;
    assert_eq!(r["body"]["message"], "Hello, Nimbus!", "{r}");
    assert!(
        r["body"]["node"].as_str().unwrap().starts_with("v20."),
        "{r}"
    );
    // Its own pid namespace, where the sandbox's init is PID 1.
    assert_eq!(r["body"]["pid"], 2, "{r}");
    assert_eq!(r["body"]["uid"], 1000, "{r}");
    let again = invoke(&s, "hello-node", "", json!({})).await;
    assert_eq!(again["start_type"], "warm");
    assert_eq!(again["body"]["message"], "Hello, world!");
}

#[tokio::test]
async fn the_cart_in_javascript_keeps_state_per_session() {
    let s = NIMBUS.start(Backend::Sqlite).await;
    s.deploy(
        "cart-node",
        CART,
        json!({"runtime": "nodejs20", "handler": "index.handle", "state_config": {"enabled": true}}),
    )
    .await;
    let a = invoke(
        &s,
        "cart-node",
        "?session_key=alice",
        json!({"item_id": "book"}),
    )
    .await;
    assert_eq!(a["body"], json!({"cart_size": 1, "total_items": 1}), "{a}");
    let a = invoke(
        &s,
        "cart-node",
        "?session_key=alice",
        json!({"item_id": "pen"}),
    )
    .await;
    assert_eq!(a["body"], json!({"cart_size": 2, "total_items": 2}));
    let b = invoke(
        &s,
        "cart-node",
        "?session_key=bob",
        json!({"item_id": "mug"}),
    )
    .await;
    assert_eq!(b["body"], json!({"cart_size": 1, "total_items": 1}));
    let (status, state) = s
        .call("GET", "/functions/cart-node/state/alice?values=true", None)
        .await;
    assert_eq!(status, StatusCode::OK, "{state}");
    assert_eq!(state["keys"][0]["value"], json!(["book", "pen"]), "{state}");
}

#[tokio::test]
async fn a_node_function_that_throws_reports_name_message_and_stack() {
    let s = NIMBUS.start(Backend::Sqlite).await;
    s.deploy(
        "throws-node",
        "exports.handle = () => { throw new RangeError('out of range'); };\n",
        json!({"runtime": "nodejs20", "handler": "index.handle"}),
    )
    .await;
    let (status, body) = s.invoke_raw("throws-node", "", "{}").await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
    assert_eq!(body["error"]["code"], "function_error");
    assert_eq!(body["error"]["type"], "RangeError");
    assert!(
        body["error"]["traceback"]
            .as_str()
            .unwrap()
            .contains("index.js"),
        "{body}"
    );
}

/// Module-level work done once per worker, and what an invocation sees of its instance.
const LOADED: &str = r#"
const loaded = Math.random();
exports.handle = async (event) => {
  if (event.sleep_ms) await new Promise((r) => setTimeout(r, event.sleep_ms));
  return { loaded, instance: process.env.NIMBUS_INSTANCE_ID, pid: process.pid, uid: process.getuid() };
};
"#;

/// A server whose every invocation starts a new instance, snapshots on.
async fn fresh_instance_server() -> Server {
    NIMBUS
        .start_with(Backend::Sqlite, "max_invocations = 1\n", &["--snapshots"])
        .await
}

/// Waits until `function`'s version 1 has a resident template (its spares) and returns
/// its row.
async fn wait_spares(s: &Server, function: &str) -> Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let (status, body) = s
            .call("GET", &format!("/functions/{function}/snapshots"), None)
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        if let Some(found) = body["snapshots"].as_array().and_then(|all| {
            all.iter()
                .find(|x| x["status"] == "ready" && x["resident"] == true)
        }) {
            return found.clone();
        }
        assert!(std::time::Instant::now() < deadline, "no spares: {body}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn new_node_instances_start_from_spares_loaded_ahead_each_in_its_own_sandbox() {
    let s = fresh_instance_server().await;
    s.deploy(
        "spared",
        LOADED,
        json!({"runtime": "nodejs20", "handler": "index.handle"}),
    )
    .await;
    let row = wait_spares(&s, "spared").await;
    assert_eq!(row["runtime"], "nodejs20", "{row}");
    let (_, stats) = s.call("GET", "/snapshots/stats", None).await;
    // Two spares, each what its cgroup is charged (~9 MiB here: the worker's own memory,
    // not the node binary's pages it shares with every other process).
    let bytes = stats["resident_bytes"].as_u64().unwrap_or(0);
    assert!((8 << 20..100 << 20).contains(&bytes), "{stats}");
    let mut instances = std::collections::HashSet::new();
    for _ in 0..4 {
        let r = invoke(&s, "spared", "", json!({})).await;
        assert_eq!(r["start_type"], "template", "{r}");
        assert_eq!(r["cold_start"], true, "{r}");
        // The worker was started under the id the invocation reports.
        assert_eq!(r["body"]["instance"], r["instance_id"], "{r}");
        assert_eq!(r["body"]["pid"], 2, "{r}");
        assert_eq!(r["body"]["uid"], 1000, "{r}");
        instances.insert(r["instance_id"].as_str().unwrap().to_owned());
    }
    assert_eq!(instances.len(), 4, "a new instance each time");

    let (_, metrics) = s.call("GET", "/../../metrics", None).await;
    let metrics = metrics.as_str().unwrap_or_default().to_owned();
    for line in [
        r#"nimbus_snapshot_build_total{status="success"} 1"#,
        r#"nimbus_snapshot_restore_total{status="success",start_type="template"} 4"#,
        r#"nimbus_cold_starts_total{runtime="nodejs20",start_type="template"} 4"#,
    ] {
        assert!(metrics.contains(line), "{line} missing from:\n{metrics}");
    }
}

#[tokio::test]
async fn a_burst_beyond_the_spares_waits_for_the_next_ones_instead_of_failing() {
    let s = NIMBUS
        .start_with(Backend::Sqlite, "", &["--snapshots"])
        .await;
    s.deploy(
        "burst-node",
        LOADED,
        json!({"runtime": "nodejs20", "handler": "index.handle", "max_instances": 8}),
    )
    .await;
    wait_spares(&s, "burst-node").await;
    let served = s
        .burst_of_template_starts("burst-node", 8, r#"{"sleep_ms": 300}"#)
        .await;
    assert_eq!(served, 8);
}

/// Host pids of the Node workers of `function` that are not serving (its spares, on a
/// server that retires instances after each invocation).
fn node_workers_of(function: &str) -> Vec<i32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        let wanted = format!("NIMBUS_FUNCTION_NAME={function}");
        if String::from_utf8_lossy(&cmdline).contains("nimbus_worker.js")
            && environ
                .split(|b| *b == 0)
                .any(|var| var == wanted.as_bytes())
        {
            pids.push(pid);
        }
    }
    pids
}

#[tokio::test]
async fn when_the_spares_are_killed_the_next_start_still_succeeds() {
    let s = fresh_instance_server().await;
    s.deploy(
        "fragile",
        LOADED,
        json!({"runtime": "nodejs20", "handler": "index.handle"}),
    )
    .await;
    wait_spares(&s, "fragile").await;
    let spares = node_workers_of("fragile");
    assert_eq!(spares.len(), 2, "the default two spares: {spares:?}");
    for pid in &spares {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(*pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    std::thread::sleep(std::time::Duration::from_millis(200));
    for _ in 0..3 {
        let r = invoke(&s, "fragile", "", json!({})).await;
        assert_eq!(r["body"]["instance"], r["instance_id"], "{r}");
        // The dead spares are passed over; their replacements serve.
        assert_eq!(r["start_type"], "template", "{r}");
    }
    let survivors = node_workers_of("fragile");
    assert!(
        survivors.iter().all(|pid| !spares.contains(pid)),
        "{survivors:?}"
    );
}

#[tokio::test]
async fn the_node_examples_deploy_and_run_from_the_cli_as_documented() {
    let s = NIMBUS.start(Backend::Sqlite).await;
    let example = |name: &str| format!("{}/../../examples/node/{name}", env!("CARGO_MANIFEST_DIR"));
    let node = ["--runtime", "nodejs20", "--handler", "index.handle"];

    let hello = example("hello/index.js");
    s.cli(&[&["deploy", &hello, "--name", "hello-js"][..], &node].concat())
        .await;
    let r = cli_invoke(&s, "hello-js", r#"{"name": "Nimbus"}"#).await;
    assert_eq!(r["body"]["message"], "Hello, Nimbus!", "{r}");

    let counter = example("counter/index.js");
    s.cli(
        &[
            &["deploy", &counter, "--name", "counter-js", "--state"][..],
            &node,
        ]
        .concat(),
    )
    .await;
    let out = s.cli(&["invoke", "counter-js"]).await;
    assert!(out.contains(r#""count": 1"#), "{out}");
    let out = s
        .cli(&["invoke", "counter-js", "--data", r#"{"by": 5}"#])
        .await;
    assert!(out.contains(r#""count": 6"#), "{out}");

    // A directory: deployed as an archive; index.mjs is an ES module.
    let cart = example("cart");
    let flags = ["--name", "cart-js", "--state", "--session-affinity", "on"];
    s.cli(&[&["deploy", &cart][..], &flags, &node].concat())
        .await;
    let book = r#"{"item_id": "book"}"#;
    let pen = r#"{"item_id": "pen"}"#;
    s.cli(&["invoke", "cart-js", "--session", "alice", "--data", book])
        .await;
    let out = s
        .cli(&["invoke", "cart-js", "--session", "alice", "--data", pen])
        .await;
    assert!(out.contains(r#""cart_size": 2"#), "{out}");
    let out = s
        .cli(&["invoke", "cart-js", "--session", "bob", "--data", book])
        .await;
    assert!(out.contains(r#""cart_size": 1"#), "{out}");

    // The same functions over HTTP, as curl calls them.
    let r = invoke(&s, "hello-js", "", json!({"name": "curl"})).await;
    assert_eq!(r["body"]["message"], "Hello, curl!", "{r}");
    let r = invoke(&s, "counter-js", "", json!({})).await;
    assert_eq!(r["body"]["count"], 7, "{r}");
    let r = invoke(
        &s,
        "cart-js",
        "?session_key=alice",
        json!({"item_id": "cup"}),
    )
    .await;
    assert_eq!(r["body"]["cart_size"], 3, "{r}");
}
/// An ES module that imports from 'nimbus' and reports, for the real `StateConflict` of a
/// stale `setWithVersion`, whether it is an instance of what it imported, and where its
/// code and the package are.
const ESM_NIMBUS: &str = r#"
import nimbus, { StateConflict, StateError } from 'nimbus';
import { createRequire } from 'node:module';

const required = createRequire(import.meta.url)('nimbus');

export async function handle(event, state) {
  try {
    await state.setWithVersion('never-written', 1, 5);
    return 'no conflict';
  } catch (e) {
    return {
      caught: [e instanceof StateConflict, e instanceof StateError, e instanceof nimbus.StateConflict, e.currentVersion],
      sameAsRequire: nimbus === required,
      code: import.meta.url,
      cwd: process.cwd(),
      nimbus: import.meta.resolve('nimbus'),
    };
  }
}
"#;

/// The same from CommonJS, with `require` and `import()`.
const CJS_NIMBUS: &str = r#"
const nimbus = require('nimbus');
exports.handle = async (event, state) => {
  const esm = await import('nimbus');
  try {
    await state.setWithVersion('never-written', 1, 5);
    return 'no conflict';
  } catch (e) {
    return {
      caught: [e instanceof esm.StateConflict, e instanceof esm.StateError, e instanceof nimbus.StateConflict, e.currentVersion],
      sameAsRequire: esm.default === nimbus,
      code: __filename,
      cwd: process.cwd(),
      nimbus: require.resolve('nimbus'),
      write: (() => {
        try {
          require('node:fs').appendFileSync(require.resolve('nimbus'), '// changed');
          return 'written';
        } catch (e) {
          return e.code;
        }
      })(),
    };
  }
};
"#;

#[tokio::test]
async fn es_modules_and_commonjs_get_the_nimbus_package_in_the_sandbox() {
    let s = NIMBUS.start(Backend::Sqlite).await;
    let config = json!({"runtime": "nodejs20", "handler": "index.handle", "state_config": {"enabled": true}});
    let mut esm = json!({"name": "esm-nimbus", "code_archive": nimbus_testkit::server::zip_base64(&[("index.mjs", ESM_NIMBUS)])});
    esm.as_object_mut()
        .unwrap()
        .extend(config.as_object().unwrap().clone());
    let (status, created) = s.call("POST", "/functions", Some(esm)).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    s.deploy("cjs-nimbus", CJS_NIMBUS, config).await;
    // The data directory's own node_modules: an ancestor of every code directory, at the
    // same path inside the sandbox as outside.
    let data = s.dir.path().canonicalize().unwrap();
    let package = data.join("node_modules/nimbus/index.js");
    for (function, code) in [("esm-nimbus", "index.mjs"), ("cjs-nimbus", "index.js")] {
        let r = invoke(&s, function, "", json!({})).await;
        let body = &r["body"];
        assert_eq!(
            body["caught"],
            json!([true, true, true, 0]),
            "{function}: {r}"
        );
        assert_eq!(body["sameAsRequire"], true, "{function}: {r}");
        let cwd = std::path::Path::new(body["cwd"].as_str().unwrap());
        assert_eq!(cwd.parent(), Some(data.join("code").as_path()), "{r}");
        let file = body["code"].as_str().unwrap().trim_start_matches("file://");
        assert_eq!(std::path::Path::new(file), cwd.join(code), "{r}");
        let resolved = body["nimbus"]
            .as_str()
            .unwrap()
            .trim_start_matches("file://");
        assert_eq!(std::path::Path::new(resolved), package, "{r}");
    }
    // Not the function's to change (a host root's file, on a read-only mount): no function
    // alters what the others load.
    let r = invoke(&s, "cjs-nimbus", "", json!({})).await;
    let refused = r["body"]["write"].as_str().unwrap_or_default();
    assert!(["EACCES", "EROFS"].contains(&refused), "{r}");
}

/// A CommonJS package (`main`) and an ES-module-only one (`"type": "module"`, `exports`)
/// in the archive's node_modules, as `npm install` leaves them.
const PACKAGES: &[(&str, &str)] = &[
    (
        "node_modules/pad-lite/package.json",
        r#"{"name": "pad-lite", "version": "1.2.3", "main": "lib/pad.js"}"#,
    ),
    (
        "node_modules/pad-lite/lib/pad.js",
        "module.exports = (text, width, fill) => fill.repeat(Math.max(0, width - text.length)) + text;\n\
         module.exports.version = require('../package.json').version;\n",
    ),
    (
        "node_modules/shout-esm/package.json",
        r#"{"name": "shout-esm", "version": "2.0.0", "type": "module", "exports": {".": "./src/index.js"}}"#,
    ),
    (
        "node_modules/shout-esm/src/index.js",
        "import { suffix } from './suffix.js';\n\
         export const shout = (text) => text.toUpperCase() + suffix;\n\
         export default shout;\n",
    ),
    ("node_modules/shout-esm/src/suffix.js", "export const suffix = '!';\n"),
];

const CJS_USER: &str = r#"
const pad = require('pad-lite');
exports.handle = async (event) => {
  const { shout } = await import('shout-esm');
  let deep;
  try { await import('shout-esm/src/suffix.js'); deep = 'imported'; } catch (e) { deep = e.code; }
  return { padded: pad(event.text, 6, '*'), version: pad.version, shouted: shout(event.text), deep };
};
"#;

const ESM_USER: &str = r#"
import pad from 'pad-lite';
import shout, { shout as named } from 'shout-esm';
import { StateError } from 'nimbus';
export const handle = (event) => ({
  padded: pad(event.text, 6, '*'),
  shouted: shout(event.text),
  same: shout === named,
  nimbus: typeof StateError,
});
"#;

#[tokio::test]
async fn archives_carry_their_node_modules_for_commonjs_and_es_modules() {
    let s = NIMBUS.start(Backend::Sqlite).await;
    let mut files = PACKAGES.to_vec();
    files.extend([("cjs.js", CJS_USER), ("app/esm.mjs", ESM_USER)]);
    let archive = nimbus_testkit::server::zip_base64(&files);
    for (name, handler) in [("uses-cjs", "cjs.handle"), ("uses-esm", "app.esm.handle")] {
        let (status, created) = s
            .call(
                "POST",
                "/functions",
                Some(json!({"name": name, "runtime": "nodejs20", "handler": handler, "code_archive": archive})),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{created}");
        assert_eq!(created["files"].as_array().unwrap().len(), 7, "{created}");
    }
    let r = invoke(&s, "uses-cjs", "", json!({"text": "hey"})).await;
    assert_eq!(
        r["body"],
        json!({"padded": "***hey", "version": "1.2.3", "shouted": "HEY!", "deep": "ERR_PACKAGE_PATH_NOT_EXPORTED"}),
        "{r}"
    );
    let r = invoke(&s, "uses-esm", "", json!({"text": "hey"})).await;
    assert_eq!(
        r["body"],
        json!({"padded": "***hey", "shouted": "HEY!", "same": true, "nimbus": "function"}),
        "{r}"
    );

    // The same files as a directory, packed by the CLI.
    let dir = tempfile::tempdir().unwrap();
    for (name, body) in &files {
        let path = dir.path().join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, body).unwrap();
    }
    let root = dir.path().to_str().unwrap();
    let flags = ["--runtime", "nodejs20", "--handler", "app.esm.handle"];
    s.cli(&[&["deploy", root, "--name", "uses-esm-cli"][..], &flags].concat())
        .await;
    let r = cli_invoke(&s, "uses-esm-cli", r#"{"text": "hi"}"#).await;
    assert_eq!(r["body"]["padded"], "****hi", "{r}");
    assert_eq!(r["body"]["shouted"], "HI!", "{r}");
}

#[tokio::test]
async fn an_evicted_set_of_spares_stops_its_spares_but_not_the_instances_taken_from_it() {
    // A 1 MB budget for templates: each new set of spares evicts the one before.
    let s = NIMBUS
        .start_with(
            Backend::Sqlite,
            "[snapshots]\nmemory_budget_mb = 1\n",
            &["--snapshots"],
        )
        .await;
    let node = json!({"runtime": "nodejs20", "handler": "index.handle"});
    s.deploy("evicted-first", LOADED, node.clone()).await;
    wait_spares(&s, "evicted-first").await;
    let r = invoke(&s, "evicted-first", "", json!({})).await;
    assert_eq!(r["start_type"], "template", "{r}");
    s.deploy("evicting-second", LOADED, node).await;
    wait_spares(&s, "evicting-second").await;
    // The first set is gone with its spares; the instance taken from it still serves.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    while node_workers_of("evicted-first").len() > 1 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(
        node_workers_of("evicted-first").len(),
        1,
        "only the warm instance"
    );
    let again = invoke(&s, "evicted-first", "", json!({})).await;
    assert_eq!(again["start_type"], "warm", "{again}");
    assert_eq!(again["instance_id"], r["instance_id"]);
}

#[tokio::test]
async fn a_node_versions_spares_are_built_listed_and_deleted_like_a_snapshot() {
    let s = NIMBUS
        .start_with(Backend::Sqlite, "", &["--snapshots"])
        .await;
    s.deploy(
        "listed",
        LOADED,
        json!({"runtime": "nodejs20", "handler": "index.handle"}),
    )
    .await;
    let (status, row) = s
        .call(
            "POST",
            "/functions/listed/snapshots",
            Some(json!({"wait": true})),
        )
        .await;
    assert!(status.is_success(), "{row}");
    assert_eq!(
        (&row["status"], &row["resident"], &row["runtime"]),
        (&json!("ready"), &json!(true), &json!("nodejs20")),
        "{row}"
    );
    let listed = s.cli(&["snapshot", "list", "listed"]).await;
    assert!(listed.contains("ready"), "{listed}");
    assert_eq!(node_workers_of("listed").len(), 2, "two spares");

    // Deleting the snapshot stops its spares; the next start is cold and builds new ones.
    let id = row["id"].as_str().unwrap();
    let (status, body) = s
        .call("DELETE", &format!("/functions/listed/snapshots/{id}"), None)
        .await;
    assert!(status.is_success(), "{body}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    while !node_workers_of("listed").is_empty() && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(node_workers_of("listed").is_empty(), "spares left running");
    let r = invoke(&s, "listed", "", json!({})).await;
    assert_eq!(r["start_type"], "cold", "{r}");
    wait_spares(&s, "listed").await;
}
