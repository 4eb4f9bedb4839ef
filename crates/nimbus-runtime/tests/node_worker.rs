//! The Node.js worker end to end: the real `node`, started by the process driver, spoken to
//! over its socket with `WorkerConn`, as the engine does.

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use common::{answer, body, error, invoke, invoke_with_state, ScriptedState, Worker};
use nimbus_runtime::node::NodeRuntime;
use nimbus_runtime::protocol::{ErrorPayload, StateFailure};
use nimbus_runtime::WorkerError;
use serde_json::{json, Value};

/// The data directory every test of this binary shares (discovery is idempotent).
fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("nimbus-runtime-node-tests")
}

/// One discovery per test binary.
fn runtime() -> &'static NodeRuntime {
    static RUNTIME: OnceLock<NodeRuntime> = OnceLock::new();
    RUNTIME
        .get_or_init(|| NodeRuntime::discover(None, &data_dir()).expect("Node.js 20+ on this host"))
}

/// Starts a worker on `files`, in a code directory under `<data dir>/code` as the server
/// makes them (where `import ... from 'nimbus'` finds the package).
async fn launch(files: &[(&str, &str)], handler: &str) -> Worker {
    let command = runtime().command();
    common::launch_in(&data_dir().join("code"), command, files, handler, &[]).await
}

async fn start(files: &[(&str, &str)], handler: &str) -> Worker {
    let mut worker = launch(files, handler).await;
    let ready = worker.conn.handshake().await.expect("handshake");
    assert!(ready.pid > 0);
    worker
}

async fn init_error(files: &[(&str, &str)], handler: &str) -> ErrorPayload {
    let mut worker = launch(files, handler).await;
    match worker.conn.handshake().await.unwrap_err() {
        WorkerError::Init { error, .. } => error,
        other => panic!("expected an init error, got {other:?}"),
    }
}

#[tokio::test]
async fn commonjs_handlers_sync_and_async_serve_with_their_logs() {
    let mut w = start(
        &[(
            "index.js",
            "let calls = 0;\n\
             exports.handle = async (event) => { calls += 1; console.log('call', calls); return { echo: event, calls }; };\n\
             exports.sync = (event) => event.n * 2;\n",
        )],
        "index.handle",
    )
    .await;
    let out = invoke(&mut w, json!({"a": [1, "ü"]})).await;
    assert_eq!(body(&out), json!({"echo": {"a": [1, "ü"]}, "calls": 1}));
    assert_eq!(out.logs, "call 1\n");
    assert!(out.max_rss_kb.unwrap() > 1000);
    let out = invoke(&mut w, json!(null)).await;
    assert_eq!(
        body(&out)["calls"],
        2,
        "module state stays between invocations"
    );
    w.conn.ping().await.unwrap();

    let mut sync = start(
        &[("index.js", "exports.sync = (event) => event.n * 2;\n")],
        "index.sync",
    )
    .await;
    assert_eq!(body(&invoke(&mut sync, json!({"n": 21})).await), json!(42));
}

#[tokio::test]
async fn es_modules_load_from_mjs_and_from_type_module_packages() {
    let mut mjs = start(
        &[(
            "app/main.mjs",
            "export async function handle(event) { return { esm: true, got: event }; }\n",
        )],
        "app.main.handle",
    )
    .await;
    assert_eq!(
        body(&invoke(&mut mjs, json!(1)).await),
        json!({"esm": true, "got": 1})
    );

    let mut typed = start(
        &[
            ("package.json", r#"{"type": "module"}"#),
            ("index.js", "export const handle = () => 'module .js';\n"),
        ],
        "index.handle",
    )
    .await;
    assert_eq!(
        body(&invoke(&mut typed, json!({})).await),
        json!("module .js")
    );
}

#[tokio::test]
async fn errors_carry_name_message_and_stack_and_results_must_be_json() {
    let mut w = start(
        &[(
            "index.js",
            "class Oops extends Error { constructor(m) { super(m); this.name = 'Oops'; } }\n\
             exports.handle = async (event) => {\n\
               if (event.kind === 'throw') throw new Oops('it broke');\n\
               if (event.kind === 'string') throw 'plain';\n\
               if (event.kind === 'bigint') return { n: 1n };\n\
               return undefined;\n\
             };\n",
        )],
        "index.handle",
    )
    .await;
    let out = invoke(&mut w, json!({"kind": "throw"})).await;
    let e = error(&out);
    assert_eq!(
        (e.error_type.as_str(), e.message.as_str()),
        ("Oops", "it broke")
    );
    assert!(e.traceback.contains("index.js:3"), "{}", e.traceback);
    let out = invoke(&mut w, json!({"kind": "string"})).await;
    assert!(
        error(&out).message.contains("thrown: plain"),
        "{:?}",
        error(&out)
    );
    let out = invoke(&mut w, json!({"kind": "bigint"})).await;
    assert_eq!(error(&out).error_type, "TypeError");
    assert!(error(&out).message.contains("not JSON-serializable"));
    assert_eq!(
        body(&invoke(&mut w, json!({})).await),
        Value::Null,
        "undefined is null"
    );
}

#[tokio::test]
async fn load_failures_are_init_errors_that_name_the_problem() {
    let e = init_error(&[("other.js", "")], "index.handle").await;
    assert_eq!(e.error_type, "HandlerNotFound");
    assert!(
        e.message.contains("index.js, .mjs or .cjs"),
        "{}",
        e.message
    );
    let e = init_error(
        &[("index.js", "exports.other = () => 1;\n")],
        "index.handle",
    )
    .await;
    assert!(
        e.message.contains("no exported function \"handle\""),
        "{}",
        e.message
    );
    let e = init_error(&[("index.js", "exports.handle = (;\n")], "index.handle").await;
    assert_eq!(e.error_type, "SyntaxError");
    let e = init_error(
        &[("index.js", "throw new RangeError('bad init');\n")],
        "index.handle",
    )
    .await;
    assert_eq!(
        (e.error_type.as_str(), e.message.as_str()),
        ("RangeError", "bad init")
    );
}

#[tokio::test]
async fn errors_show_paths_in_the_code_not_on_the_host() {
    runtime();
    let data_dir = data_dir().canonicalize().unwrap();
    let data_dir = data_dir.to_str().unwrap();
    let files = [
        (
            "index.js",
            "const util = require('./lib/util');\nexports.handle = () => util.fail();\n",
        ),
        (
            "lib/util.js",
            "const fs = require('fs');\nexports.fail = () => fs.readFileSync(__dirname + '/missing.json');\n",
        ),
        (
            "esm.mjs",
            "export const handle = () => {\n  throw new Error(`no config next to ${import.meta.url}`);\n};\n",
        ),
    ];
    let mut w = start(&files, "index.handle").await;
    let out = invoke(&mut w, json!({})).await;
    let e = error(&out);
    assert!(
        e.message
            .contains("no such file or directory, open 'lib/missing.json'"),
        "{}",
        e.message
    );
    assert!(e.traceback.contains("(lib/util.js:2:"), "{}", e.traceback);
    assert!(e.traceback.contains("(index.js:2:"), "{}", e.traceback);
    // The worker's own frames keep their place, under the data directory's stand-in.
    assert!(
        e.traceback
            .contains("<nimbus>/runtime/node/nimbus_worker.js"),
        "{}",
        e.traceback
    );
    for text in [&e.message, &e.traceback] {
        assert!(!text.contains(data_dir), "{text}");
    }
    let mut w = start(&files, "esm.handle").await;
    let out = invoke(&mut w, json!({})).await;
    let e = error(&out);
    assert_eq!(e.message, "no config next to esm.mjs");
    assert!(e.traceback.contains("(esm.mjs:2:"), "{}", e.traceback);
    assert!(!e.traceback.contains(data_dir), "{}", e.traceback);
    // Init failures alike.
    let e = init_error(
        &[(
            "index.js",
            "throw new Error(`no config in ${process.cwd()} for ${__filename}`);\n",
        )],
        "index.handle",
    )
    .await;
    assert_eq!(e.message, "no config in . for index.js");
    assert!(!e.traceback.contains(data_dir), "{}", e.traceback);
}

#[tokio::test]
async fn only_whole_host_paths_are_hidden_in_errors() {
    // With a data directory D and a code directory C: D/x, D and C/x are paths of theirs;
    // Dbase, D-old, D.bak, /mnt/D and C2/x are other paths, shown as they are (C2 is in D,
    // the code directories' parent, as D/code/...).
    let mut w = start(
        &[(
            "index.js",
            "exports.handle = (event) => { throw new Error(event.text); };\n",
        )],
        "index.handle",
    )
    .await;
    let code = w.code.path().canonicalize().unwrap();
    let code = code.to_str().unwrap();
    let data = data_dir().canonicalize().unwrap();
    let data = data.to_str().unwrap();
    let text = format!(
        "{data}base {data}-old/x {data}.bak /mnt{data}/y {code}2/z | {data}/x ({data}) \
         '{code}/lib/u.js' {code}: in {data}."
    );
    let out = invoke(&mut w, json!({ "text": text })).await;
    let sibling = format!("<nimbus>{}2/z", code.strip_prefix(data).unwrap());
    assert_eq!(
        error(&out).message,
        format!(
            "{data}base {data}-old/x {data}.bak /mnt{data}/y {sibling} | <nimbus>/x (<nimbus>) \
             'lib/u.js' .: in <nimbus>."
        )
    );
}

#[tokio::test]
async fn a_handler_module_named_like_a_builtin_is_the_functions_own_file() {
    // The handler names a file of the code: `fs.readFileSync` loads ./fs.js, never Node's
    // `fs`, and a handler without its file is refused at deploy (nimbus-core).
    let mut w = start(
        &[("fs.js", "exports.readFileSync = () => 'mine';\n")],
        "fs.readFileSync",
    )
    .await;
    assert_eq!(
        body(&invoke(&mut w, json!("/etc/passwd")).await),
        json!("mine")
    );
    let e = init_error(&[("index.js", "")], "fs.readFileSync").await;
    assert_eq!(e.error_type, "HandlerNotFound", "{e:?}");
}

#[tokio::test]
async fn state_calls_are_promises_over_the_connection_with_typed_errors() {
    let mut w = start(
        &[(
            "index.js",
            r#"
const nimbus = require('nimbus');
exports.handle = async (event, state) => {
  const out = {};
  out.cart = await state.get('cart');
  out.missing = await state.get('nope', 'dflt');
  out.version = await state.function().set('n', { a: [1, 'ü'] }, 1.5);
  try {
    await state.setWithVersion('k', 1, 4);
  } catch (e) {
    out.conflict = [e instanceof nimbus.StateConflict, e instanceof nimbus.StateError, e.code, e.currentVersion];
  }
  const [a, b] = await Promise.all([state.invocation().incr('x'), state.keys('c*')]);
  out.both = [a, b];
  try { await state.incr('x', 1.5); } catch (e) { out.delta = e.constructor.name; }
  out.requestId = nimbus.currentRequestId();
  return out;
};
"#,
        )],
        "index.handle",
    )
    .await;
    let mut state = ScriptedState {
        answers: vec![
            Ok(answer(Some(r#"["book"]"#), Some(3))),
            Ok(answer(Some("null"), Some(0))),
            Ok(answer(None, Some(9))),
            Err(StateFailure {
                code: "state_conflict".into(),
                message: "version conflict".into(),
                current_version: Some(7),
            }),
            Ok(answer(Some("1"), None)),
            Ok(answer(Some(r#"["cart"]"#), None)),
        ],
        asked: Vec::new(),
    };
    let out = invoke_with_state(&mut w, "inv_state", &mut state).await;
    assert_eq!(out["cart"], json!(["book"]));
    assert_eq!(out["missing"], "dflt");
    assert_eq!(out["version"], 9);
    assert_eq!(out["conflict"], json!([true, true, "state_conflict", 7]));
    assert_eq!(out["both"], json!([1, ["cart"]]));
    assert_eq!(out["delta"], "TypeError");
    assert_eq!(out["requestId"], "inv_state");
    let asked: Vec<(&str, &str)> = state
        .asked
        .iter()
        .map(|r| (r.op.as_str(), r.scope.as_str()))
        .collect();
    assert_eq!(
        asked,
        [
            ("get", "session"),
            ("get", "session"),
            ("set", "function"),
            ("set_with_version", "session"),
            ("incr", "invocation"),
            ("keys", "session"),
        ]
    );
    assert_eq!(state.asked[2].ttl, Some(1.5));
    assert_eq!(
        state.asked[2].value.as_ref().unwrap().get(),
        r#"{"a":[1,"ü"]}"#
    );
    w.conn.ping().await.unwrap();
}

#[tokio::test]
async fn a_function_without_state_gets_a_state_that_rejects() {
    let mut w = start(
        &[(
            "index.js",
            "const nimbus = require('nimbus');\n\
             exports.handle = async (event, state) => {\n\
               try { await state.get('k'); } catch (e) { return [e instanceof nimbus.StateNotEnabled, e.code]; }\n\
             };\n",
        )],
        "index.handle",
    )
    .await;
    assert_eq!(
        body(&invoke(&mut w, json!({})).await),
        json!([true, "state_not_enabled"])
    );
}

/// A state host that answers every call with a version conflict (current version 7).
fn conflicting() -> ScriptedState {
    ScriptedState {
        answers: (0..4)
            .map(|_| {
                Err(StateFailure {
                    code: "state_conflict".into(),
                    message: "version conflict".into(),
                    current_version: Some(7),
                })
            })
            .collect(),
        asked: Vec::new(),
    }
}

async fn invoke_conflicting(w: &mut Worker) -> Value {
    invoke_with_state(w, "inv_esm", &mut conflicting()).await
}

/// What the handlers below return: whether the worker's conflict is an instance of the
/// classes the function imported, and what it sees of the package.
const ESM_PROBE: &str = r#"
import nimbus, { StateConflict, StateError, currentRequestId } from 'nimbus';
import * as names from 'nimbus';
import { createRequire } from 'node:module';

const required = createRequire(import.meta.url)('nimbus');

export async function handle(event, state) {
  try {
    await state.setWithVersion('k', 1, 4);
    return 'no conflict';
  } catch (e) {
    return {
      named: [e instanceof StateConflict, e instanceof StateError, e.currentVersion],
      default: e instanceof nimbus.StateConflict,
      sameAsRequire: nimbus === required && StateConflict === required.StateConflict,
      names: Object.keys(names).filter((k) => k !== 'default').sort(),
      defaultNames: Object.keys(nimbus).sort(),
      requestId: currentRequestId(),
    };
  }
}
"#;

#[tokio::test]
async fn es_modules_import_the_nimbus_package_with_the_classes_the_worker_throws() {
    let expected = json!({
        "named": [true, true, 7],
        "default": true,
        "sameAsRequire": true,
        "names": [
            "StateConflict", "StateError", "StateKeyTooLong", "StateNotEnabled",
            "StateTooManyKeys", "StateUnavailable", "StateValueTooLarge", "currentRequestId",
        ],
        "defaultNames": [
            "StateConflict", "StateError", "StateKeyTooLong", "StateNotEnabled",
            "StateTooManyKeys", "StateUnavailable", "StateValueTooLarge", "currentRequestId",
        ],
        "requestId": "inv_esm",
    });
    // An .mjs file at the top and deeper (a dotted module path), and a .js file of a
    // `"type": "module"` package that awaits at top level.
    let cases: [(&[(&str, &str)], &str); 3] = [
        (&[("index.mjs", ESM_PROBE)], "index.handle"),
        (&[("app/api/main.mjs", ESM_PROBE)], "app.api.main.handle"),
        (
            &[
                ("package.json", r#"{"type": "module"}"#),
                (
                    "index.js",
                    &format!("await Promise.resolve();\n{ESM_PROBE}"),
                ),
            ],
            "index.handle",
        ),
    ];
    for (files, handler) in cases {
        let mut w = start(files, handler).await;
        assert_eq!(invoke_conflicting(&mut w).await, expected, "{handler}");
    }
}

#[tokio::test]
async fn commonjs_require_and_import_of_nimbus_are_one_module() {
    let mut w = start(
        &[(
            "index.js",
            r#"
const nimbus = require('nimbus');
exports.handle = async (event, state) => {
  const esm = await import('nimbus');
  try {
    await state.setWithVersion('k', 1, 4);
  } catch (e) {
    return [esm.default === nimbus, e instanceof esm.StateConflict, e instanceof nimbus.StateConflict];
  }
};
"#,
        )],
        "index.handle",
    )
    .await;
    assert_eq!(invoke_conflicting(&mut w).await, json!([true, true, true]));
}
