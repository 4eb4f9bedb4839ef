//! The Python worker end to end: the real interpreter, started by the process driver, spoken
//! to over its socket with [`WorkerConn`].

mod common;

use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::{answer, body, error, invoke, invoke_with_state, ScriptedState, Worker};
use nimbus_runtime::protocol::ErrorPayload;
use nimbus_runtime::python::PythonRuntime;
use nimbus_runtime::{WorkerConn, WorkerError};
use nimbus_sandbox::{Driver, LaunchSpec, ProcessDriver};
use serde_json::value::RawValue;
use serde_json::{json, Value};
use tempfile::TempDir;

/// One discovery per test binary; the data directory is shared and idempotent.
fn runtime() -> &'static PythonRuntime {
    static RUNTIME: OnceLock<PythonRuntime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        let data = Path::new(env!("CARGO_TARGET_TMPDIR")).join("nimbus-runtime-python-tests");
        PythonRuntime::discover(None, &data).expect("a Python 3.8+ interpreter on this host")
    })
}

/// Writes `files` into a fresh code directory and starts a worker on it (without handshake).
async fn launch(files: &[(&str, &str)], handler: &str, env: &[(&str, &str)]) -> Worker {
    common::launch(runtime().command(), files, handler, env).await
}

/// Starts a worker on a single-file `handler.py` and completes the handshake.
async fn start(source: &str) -> Worker {
    start_with(&[("handler.py", source)], "handler.handle", &[]).await
}

async fn start_with(files: &[(&str, &str)], handler: &str, env: &[(&str, &str)]) -> Worker {
    let mut worker = launch(files, handler, env).await;
    let ready = worker.conn.handshake().await.expect("handshake");
    assert!(ready.pid > 0);
    assert!(ready.init_ms >= 0.0);
    worker
}

/// Starts a worker that must fail to load; returns the init error and its logs.
async fn init_error(files: &[(&str, &str)], handler: &str) -> (ErrorPayload, String) {
    init_error_with(files, handler, &[]).await
}

async fn init_error_with(
    files: &[(&str, &str)],
    handler: &str,
    env: &[(&str, &str)],
) -> (ErrorPayload, String) {
    let mut worker = launch(files, handler, env).await;
    let err = worker.conn.handshake().await.unwrap_err();
    let exit = tokio::time::timeout(Duration::from_secs(10), worker.sandbox.wait())
        .await
        .expect("the worker exits after an init error");
    assert_eq!(exit.code, Some(1), "{exit}");
    match err {
        WorkerError::Init { error, logs } => (error, logs),
        other => panic!("expected an init error, got {other:?}"),
    }
}

const ECHO: &str = "def handle(event):\n    return event\n";

#[tokio::test]
async fn handshake_then_the_event_comes_back_as_the_body() {
    let mut w = start(ECHO).await;
    let event =
        json!({"a": [1, 2.5, "é ✓ 🎉"], "b": null, "c": {"nested": true}, "n": -12345678901234i64});
    let out = invoke(&mut w, event.clone()).await;
    assert_eq!(body(&out), event);
    assert_eq!(out.logs, "");
    assert!(out.max_rss_kb.unwrap() > 1000, "{:?}", out.max_rss_kb);
    // Scalars are events too.
    let out = invoke(&mut w, json!("just a string")).await;
    assert_eq!(body(&out), json!("just a string"));
    let out = invoke(&mut w, json!(null)).await;
    assert_eq!(body(&out), json!(null));
}

#[tokio::test]
async fn a_two_argument_handler_gets_a_state_that_refuses_use() {
    let source = r#"
import nimbus

def handle(event, state):
    if event.get("touch"):
        return state.get("cart")
    if event.get("catch"):
        try:
            state.set("cart", 1)
        except nimbus.StateNotEnabled as e:
            return {"caught": str(e)}
    return {"truthy": bool(state), "repr": repr(state)}
"#;
    let mut w = start(source).await;
    let out = invoke(&mut w, json!({})).await;
    assert_eq!(body(&out)["truthy"], json!(false));
    let out = invoke(&mut w, json!({"touch": true})).await;
    let e = error(&out);
    assert_eq!(e.error_type, "StateNotEnabled");
    assert!(
        e.message.contains("state is not enabled for this function"),
        "{e:?}"
    );
    assert!(
        e.traceback.contains("return state.get(\"cart\")"),
        "{}",
        e.traceback
    );
    assert!(!e.traceback.contains("nimbus_worker"), "{}", e.traceback);
    let out = invoke(&mut w, json!({"catch": true})).await;
    assert!(body(&out)["caught"]
        .as_str()
        .unwrap()
        .contains("not enabled"));
}

#[tokio::test]
async fn arity_is_detected_for_methods_callables_wrappers_and_varargs() {
    let source = r#"
import functools

class Service:
    def one(self, event):
        return "one"
    def two(self, event, state):
        return "two:" + repr(state)

class Callable:
    def __call__(self, event):
        return "callable"

def logged(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs)
    return wrapper

@logged
def wrapped(event):
    return "wrapped"

def varargs(*args):
    return len(args)

def defaults(event, state=None, extra=None):
    return state is not None

service = Service()
one = service.one
two = service.two
call = Callable()
"#;
    let files = [("handler.py", source)];
    for (handler, expected) in [
        ("handler.one", json!("one")),
        (
            "handler.two",
            json!("two:<nimbus state: not enabled for this function>"),
        ),
        ("handler.call", json!("callable")),
        ("handler.wrapped", json!("wrapped")),
        ("handler.varargs", json!(2)),
        ("handler.defaults", json!(true)),
    ] {
        let mut w = start_with(&files, handler, &[]).await;
        let out = invoke(&mut w, json!({})).await;
        assert_eq!(body(&out), expected, "{handler}");
    }
}

#[tokio::test]
async fn a_handler_exception_reports_type_message_and_the_users_traceback() {
    let source = "def helper(x):\n    raise ValueError(f'bad input: {x}')\n\ndef handle(event):\n    return helper(event['x'])\n";
    let mut w = start(source).await;
    let out = invoke(&mut w, json!({"x": 42})).await;
    let e = error(&out);
    assert_eq!(e.error_type, "ValueError");
    assert_eq!(e.message, "bad input: 42");
    assert!(
        e.traceback
            .starts_with("Traceback (most recent call last):"),
        "{}",
        e.traceback
    );
    assert!(
        e.traceback.contains("handler.py\", line 2, in helper"),
        "{}",
        e.traceback
    );
    assert!(
        e.traceback.contains("handler.py\", line 5, in handle"),
        "{}",
        e.traceback
    );
    assert!(
        e.traceback
            .trim_end()
            .ends_with("ValueError: bad input: 42"),
        "{}",
        e.traceback
    );
    assert!(!e.traceback.contains("nimbus_worker"), "{}", e.traceback);
    // The worker carries on.
    let out = invoke(&mut w, json!({"x": 1})).await;
    assert_eq!(error(&out).message, "bad input: 1");
}

#[tokio::test]
async fn printed_output_goes_to_that_invocations_logs_only() {
    let source = r#"
import logging, sys
log = logging.getLogger("fn")
log.addHandler(logging.StreamHandler())  # bound to sys.stderr at import time

def handle(event):
    if event.get("say"):
        print("hello", event["say"])
        print("to stderr", file=sys.stderr)
        log.warning("logged %s", event["say"])
        sys.stdout.write("no newline")
        sys.stdout.flush()
    return None
"#;
    let mut w = start(source).await;
    let out = invoke(&mut w, json!({"say": "wörld"})).await;
    assert_eq!(body(&out), Value::Null);
    assert_eq!(out.logs, "hello wörld\nto stderr\nlogged wörld\nno newline");
    let out = invoke(&mut w, json!({})).await;
    assert_eq!(out.logs, "");
}

#[tokio::test]
async fn logs_over_4_kib_keep_their_tail_on_a_character_boundary() {
    let source = r#"
def handle(event):
    if event["kind"] == "ascii":
        for i in range(2000):
            print("line", i)
        print("END")
    else:
        print("é" * 5000 + "END")
    return event["kind"]
"#;
    let mut w = start(source).await;
    let out = invoke(&mut w, json!({"kind": "ascii"})).await;
    assert!(out.logs.len() <= 4096, "{}", out.logs.len());
    assert!(out.logs.len() > 4000, "{}", out.logs.len());
    assert!(
        out.logs.ends_with("line 1999\nEND\n"),
        "{}",
        &out.logs[out.logs.len() - 40..]
    );
    let out = invoke(&mut w, json!({"kind": "multibyte"})).await;
    assert!(
        out.logs.len() <= 4096 && out.logs.len() > 4090,
        "{}",
        out.logs.len()
    );
    assert!(out.logs.ends_with("ééEND\n"));
    assert!(out.logs.starts_with('é'));
}

#[tokio::test]
async fn a_return_value_that_is_not_json_is_a_type_error() {
    let source = r#"
import datetime
shared = []

def handle(event):
    kind = event["kind"]
    if kind == "set":
        return {"items": {1, 2}}
    if kind == "nan":
        return float("nan")
    if kind == "date":
        return [datetime.date(2024, 1, 1)]
    if kind == "circular":
        shared.append(shared)
        return shared
    if kind == "reuse":
        shared.clear()
        return shared
    return "fine"
"#;
    let mut w = start(source).await;
    for kind in ["set", "nan", "date", "circular"] {
        let out = invoke(&mut w, json!({"kind": kind})).await;
        let e = error(&out);
        assert_eq!(e.error_type, "TypeError", "{kind}");
        assert!(
            e.message.contains("return value is not JSON-serializable"),
            "{kind}: {e:?}"
        );
    }
    // A failed encoding leaves nothing behind: the same list encodes fine afterwards.
    let out = invoke(&mut w, json!({"kind": "reuse"})).await;
    assert_eq!(body(&out), json!([]));
}

#[tokio::test]
async fn import_errors_are_init_errors_with_clear_messages() {
    let (e, _) = init_error(
        &[("handler.py", "import does_not_exist\n")],
        "handler.handle",
    )
    .await;
    assert_eq!(e.error_type, "ModuleNotFoundError");
    assert!(
        e.message
            .contains("error while importing handler module 'handler'"),
        "{e:?}"
    );
    assert!(e.message.contains("does_not_exist"), "{e:?}");
    assert!(
        e.traceback.contains("handler.py\", line 1"),
        "{}",
        e.traceback
    );
    assert!(!e.traceback.contains("importlib"), "{}", e.traceback);
    assert!(!e.traceback.contains("nimbus_worker"), "{}", e.traceback);

    let (e, _) = init_error(&[("handler.py", ECHO)], "missing.handle").await;
    assert_eq!(e.error_type, "ModuleNotFoundError");
    assert!(
        e.message.contains("handler module 'missing' not found"),
        "{e:?}"
    );
    assert!(e.message.contains("missing.py"), "{e:?}");

    let (e, _) = init_error(&[("handler.py", "x = 1\n")], "handler").await;
    assert_eq!(e.error_type, "InvalidHandler");
    assert!(e.message.contains("module.function"), "{e:?}");
}

#[tokio::test]
async fn a_syntax_error_names_the_file_and_line() {
    let source = "def handle(event):\n    return event\n\ndef broken(:\n    pass\n";
    let (e, _) = init_error(&[("handler.py", source)], "handler.handle").await;
    assert_eq!(e.error_type, "SyntaxError");
    assert!(e.message.contains("handler.py, line 4"), "{e:?}");
    assert!(e.traceback.contains("def broken(:"), "{}", e.traceback);
}

#[tokio::test]
async fn a_missing_or_uncallable_handler_function_is_named() {
    let source = "def main(event):\n    return 1\n\nhandle_count = 3\n";
    let (e, _) = init_error(&[("handler.py", source)], "handler.handle").await;
    assert_eq!(e.error_type, "AttributeError");
    assert!(
        e.message
            .starts_with("handler function 'handle' not found in module 'handler'"),
        "{e:?}"
    );
    assert!(e.message.contains("main"), "{e:?}");

    let (e, _) = init_error(&[("handler.py", source)], "handler.handle_count").await;
    assert_eq!(e.error_type, "TypeError");
    assert!(e.message.contains("is not callable"), "{e:?}");
}

#[tokio::test]
async fn output_and_exceptions_during_init_are_reported() {
    let source = "print('loading config')\nimport sys\nprint('oops', file=sys.stderr)\nraise RuntimeError('boom at init')\n";
    let (e, logs) = init_error(&[("handler.py", source)], "handler.handle").await;
    assert_eq!(e.error_type, "RuntimeError");
    assert!(e.message.contains("boom at init"), "{e:?}");
    assert!(
        e.traceback.contains("handler.py\", line 4, in <module>"),
        "{}",
        e.traceback
    );
    assert_eq!(logs, "loading config\noops\n");
}

#[tokio::test]
async fn errors_show_paths_in_the_code_not_on_the_host() {
    let files = [
        (
            "handler.py",
            "from lib import util\n\ndef handle(event):\n    return util.fail()\n",
        ),
        ("lib/__init__.py", ""),
        (
            "lib/util.py",
            "import os\n\ndef fail():\n    open(os.path.join(os.path.dirname(__file__), 'missing.json'))\n",
        ),
    ];
    let mut w = start_with(&files, "handler.handle", &[]).await;
    let code_dir = w.code.path().canonicalize().unwrap();
    let data_dir = runtime()
        .runtime_dir()
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .to_owned();
    let hidden = [code_dir.to_str().unwrap(), data_dir.to_str().unwrap()];
    let out = invoke(&mut w, json!({})).await;
    let e = error(&out);
    assert_eq!(
        e.message,
        "[Errno 2] No such file or directory: 'lib/missing.json'"
    );
    assert!(
        e.traceback
            .contains("File \"lib/util.py\", line 4, in fail"),
        "{}",
        e.traceback
    );
    assert!(
        e.traceback
            .contains("File \"handler.py\", line 4, in handle"),
        "{}",
        e.traceback
    );
    for text in [&e.message, &e.traceback] {
        for path in hidden {
            assert!(!text.contains(path), "{path} in {text}");
        }
    }

    // An init failure that names paths in its message: the code's own, its working
    // directory, and the runtime's package.
    let source = "import os, nimbus\nraise RuntimeError(f'no config next to {__file__} in {os.getcwd()} for {nimbus.__file__}')\n";
    let (e, _) = init_error(&[("handler.py", source)], "handler.handle").await;
    assert!(
        e.message.ends_with(
            "no config next to handler.py in . for <nimbus>/runtime/python/nimbus/__init__.py"
        ),
        "{e:?}"
    );
    assert!(
        e.traceback
            .contains("File \"handler.py\", line 2, in <module>"),
        "{}",
        e.traceback
    );
    for text in [&e.message, &e.traceback] {
        assert!(!text.contains(data_dir.to_str().unwrap()), "{text}");
        assert!(
            !text.contains(&std::env::temp_dir().display().to_string()),
            "{text}"
        );
    }
}

/// What the engine sets for its deploy-time check of new code (and only then).
const DEPLOY_CHECK: &[(&str, &str)] = &[("NIMBUS_DEPLOY_CHECK", "1")];

#[tokio::test]
async fn handler_modules_named_after_the_standard_library_or_the_runtime_are_refused_at_deploy() {
    // The files, the handler, what the refusal says.
    type Case<'a> = (&'a [(&'a str, &'a str)], &'a str, &'a str);
    let cases: &[Case] = &[
        (
            &[("os.py", "def system(event):\n    return 'mine'\n")],
            "os.system",
            "'os' is the name of a standard-library module, which the function's os.py",
        ),
        (
            &[("json.py", "def loads(event):\n    return 1\n")],
            "json.loads",
            "'json' is the name of a standard-library module",
        ),
        (
            &[("code.py", "def handle(event):\n    return 1\n")],
            "code.handle",
            "'code' is the name of a standard-library module",
        ),
        (
            &[
                ("email/__init__.py", ""),
                ("email/handler.py", "def handle(event):\n    return 1\n"),
            ],
            "email.handler.handle",
            "'email' is the name of a standard-library module, which the function's email/",
        ),
        (
            &[("nimbus.py", "def handle(event):\n    return 1\n")],
            "nimbus.handle",
            "'nimbus' is the name of a module of the runtime",
        ),
        // Modules of the runtime's template mode, not loaded by the deploy's check.
        (
            &[("nimbus_entropy.py", "def handle(event):\n    return 1\n")],
            "nimbus_entropy.handle",
            "'nimbus_entropy' is the name of a module of the runtime",
        ),
        (
            &[("nimbus_fork.py", "def handle(event):\n    return 1\n")],
            "nimbus_fork.handle",
            "'nimbus_fork' is the name of a module of the runtime",
        ),
    ];
    for (files, handler, needle) in cases {
        let (e, _) = init_error_with(files, handler, DEPLOY_CHECK).await;
        assert_eq!(e.error_type, "InvalidHandler", "{handler}: {e:?}");
        assert!(e.message.contains(needle), "{handler}: {}", e.message);
        assert!(e.message.contains("rename it"), "{handler}: {}", e.message);
    }
    // A module of the function's own that only starts like one is fine.
    let mut w = start_with(
        &[("osx.py", "def handle(event):\n    return 'mine'\n")],
        "osx.handle",
        DEPLOY_CHECK,
    )
    .await;
    assert_eq!(body(&invoke(&mut w, json!({})).await), json!("mine"));
}

#[tokio::test]
async fn versions_deployed_before_the_shadowing_rule_keep_starting() {
    // Versions are immutable: one deployed before the rule, whose handler module is named
    // after a standard-library module the runtime has not loaded, starts as it always did
    // (outside the deploy check) and runs the function's own module.
    for module in ["code", "queue"] {
        let file = format!("{module}.py");
        let handler = format!("{module}.handle");
        let source = format!("def handle(event):\n    return 'mine: {module}'\n");
        let mut w = start_with(&[(&file, &source)], &handler, &[]).await;
        assert_eq!(
            body(&invoke(&mut w, json!({})).await),
            json!(format!("mine: {module}")),
            "{handler}"
        );
        let (e, _) = init_error_with(&[(&file, &source)], &handler, DEPLOY_CHECK).await;
        assert_eq!(e.error_type, "InvalidHandler", "{handler}: {e:?}");
    }
}

#[tokio::test]
async fn only_whole_host_paths_are_hidden_in_errors() {
    // With a data directory D and a code directory C: D/x, D and C/x are paths of theirs;
    // Dbase, D-old, D.bak, /mnt/D and C2/x are other paths, shown as they are.
    let mut w = start_with(
        &[(
            "handler.py",
            "def handle(event):\n    raise RuntimeError(event['text'])\n",
        )],
        "handler.handle",
        &[],
    )
    .await;
    let code = w.code.path().canonicalize().unwrap();
    let code = code.to_str().unwrap();
    let data = runtime().runtime_dir().parent().unwrap().parent().unwrap();
    let data = data.to_str().unwrap();
    let text = format!(
        "{data}base {data}-old/x {data}.bak /mnt{data}/y {code}2/z | {data}/x ({data}) \
         '{code}/lib/u.py' {code}: in {data}."
    );
    let out = invoke(&mut w, json!({ "text": text })).await;
    assert_eq!(
        error(&out).message,
        format!(
            "{data}base {data}-old/x {data}.bak /mnt{data}/y {code}2/z | <nimbus>/x (<nimbus>) \
             'lib/u.py' .: in <nimbus>."
        )
    );
}

#[tokio::test]
async fn a_dotted_handler_in_a_package_loads() {
    let files = [
        ("pkg/__init__.py", ""),
        ("pkg/helpers.py", "def double(x):\n    return 2 * x\n"),
        (
            "pkg/mod.py",
            "from .helpers import double\n\ndef run(event):\n    return double(event['n'])\n",
        ),
    ];
    let mut w = start_with(&files, "pkg.mod.run", &[]).await;
    let out = invoke(&mut w, json!({"n": 21})).await;
    assert_eq!(body(&out), json!(42));
}

#[tokio::test]
async fn the_functions_environment_and_request_id_are_visible() {
    let source = r#"
import os, sys, nimbus

def handle(event):
    return {
        "greeting": os.environ.get("GREETING"),
        "name": os.environ.get("NIMBUS_FUNCTION_NAME"),
        "version": os.environ.get("NIMBUS_FUNCTION_VERSION"),
        "pythonpath": os.environ.get("PYTHONPATH"),
        "cwd_first": sys.path[0] == os.getcwd(),
        "request_id": nimbus.current_request_id(),
    }
"#;
    let mut w = start_with(
        &[("handler.py", source)],
        "handler.handle",
        &[("GREETING", "hi there")],
    )
    .await;
    let out = invoke(&mut w, json!({})).await;
    assert_eq!(
        body(&out),
        json!({"greeting": "hi there", "name": "test-fn", "version": "3", "pythonpath": null,
               "cwd_first": true, "request_id": "inv_test"})
    );
}

#[tokio::test]
async fn an_async_handler_is_awaited() {
    let source = "import asyncio\n\nasync def handle(event):\n    await asyncio.sleep(0)\n    return {'async': event}\n";
    let mut w = start(source).await;
    for i in 0..3 {
        let out = invoke(&mut w, json!(i)).await;
        assert_eq!(body(&out), json!({"async": i}));
    }
}

#[tokio::test]
async fn an_event_python_cannot_decode_is_an_error_result_not_a_crash() {
    let mut w = start(ECHO).await;
    // Python refuses to parse integers of more than 4300 digits.
    let huge = format!(r#"{{"n":{}}}"#, "7".repeat(5000));
    let raw = RawValue::from_string(huge).unwrap();
    let out = w.conn.invoke("inv_big", &raw).await.unwrap();
    let e = error(&out);
    assert_eq!(e.error_type, "InvalidEvent");
    assert!(e.message.contains("could not be decoded"), "{e:?}");
    let out = invoke(&mut w, json!({"after": 1})).await;
    assert_eq!(body(&out), json!({"after": 1}));
}

#[tokio::test]
async fn import_nimbus_is_always_the_platform_api() {
    let files = [
        (
            "nimbus.py",
            "raise RuntimeError(\"the function's own nimbus.py must not load\")\n",
        ),
        ("handler.py", "import nimbus\n\ndef handle(event):\n    return issubclass(nimbus.StateNotEnabled, nimbus.NimbusError)\n"),
    ];
    let mut w = start_with(&files, "handler.handle", &[]).await;
    let out = invoke(&mut w, json!({})).await;
    assert_eq!(body(&out), json!(true));
}

#[tokio::test]
async fn ping_is_answered() {
    let mut w = start(ECHO).await;
    w.conn.ping().await.unwrap();
    let out = invoke(&mut w, json!(1)).await;
    assert_eq!(body(&out), json!(1));
    w.conn.ping().await.unwrap();
}

#[tokio::test]
async fn a_thousand_sequential_invocations_succeed() {
    let source = "count = 0\n\ndef handle(event):\n    global count\n    count += 1\n    return {'i': event['i'], 'count': count}\n";
    let mut w = start(source).await;
    for i in 1..=1000 {
        let out = invoke(&mut w, json!({"i": i})).await;
        assert_eq!(body(&out), json!({"i": i, "count": i}));
    }
}

#[tokio::test]
async fn the_worker_exits_when_the_host_end_is_dropped() {
    let mut w = start(ECHO).await;
    let out = invoke(&mut w, json!(1)).await;
    assert_eq!(body(&out), json!(1));
    let Worker {
        conn,
        mut sandbox,
        code: _code,
    } = w;
    drop(conn);
    let exit = tokio::time::timeout(Duration::from_secs(10), sandbox.wait())
        .await
        .expect("the worker exits once the host hangs up");
    assert_eq!(exit.code, Some(0), "{exit}");
}

#[tokio::test]
async fn an_idle_worker_stays_under_15_mib() {
    let mut w = start(ECHO).await;
    let out = invoke(&mut w, json!({"warm": true})).await;
    assert_eq!(body(&out), json!({"warm": true}));
    let rss_kb = vm_rss_kb(w.sandbox.pid());
    assert!(rss_kb <= 15 * 1024, "idle worker RSS {rss_kb} KiB");
}

fn vm_rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Start-up time, idle memory and no-op round trips; run with
/// `cargo test --release -p nimbus-runtime --test python_worker -- --ignored --nocapture`.
#[tokio::test]
#[ignore = "measurement, not a check"]
async fn measure_start_memory_and_round_trips() {
    let source = "def handle(event):\n    return None\n";
    let mut starts = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        let mut w = launch(&[("handler.py", source)], "handler.handle", &[]).await;
        w.conn.handshake().await.unwrap();
        starts.push(t.elapsed());
    }
    starts.sort();
    println!(
        "start to ready: p50 {:?}, min {:?}",
        starts[starts.len() / 2],
        starts[0]
    );

    let mut w = start(source).await;
    println!("idle RSS: {} KiB", vm_rss_kb(w.sandbox.pid()));
    let event = RawValue::from_string(r#"{"path":"/","n":1}"#.into()).unwrap();
    for _ in 0..1000 {
        w.conn.invoke("inv_x", &event).await.unwrap();
    }
    let mut times = Vec::with_capacity(10_000);
    let all = Instant::now();
    for _ in 0..10_000 {
        let t = Instant::now();
        w.conn.invoke("inv_x", &event).await.unwrap();
        times.push(t.elapsed());
    }
    let total = all.elapsed();
    times.sort();
    println!(
        "no-op invoke round trip over 10k: p50 {:?}, p99 {:?}, {:.0}/s",
        times[times.len() / 2],
        times[times.len() * 99 / 100],
        10_000.0 / total.as_secs_f64()
    );
    println!("RSS after 10k: {} KiB", vm_rss_kb(w.sandbox.pid()));
}

// --- templates (unisolated here; the server's tests fork isolated instances) ---------------

/// Starts a template worker on `source` (its greeting read).
async fn start_template(source: &str, env: &[(&str, &str)]) -> Worker {
    let mut vars = vec![("NIMBUS_TEMPLATE", "1")];
    vars.extend_from_slice(env);
    start_with(&[("handler.py", source)], "handler.handle", &vars).await
}

/// Hands a template worker over to the driver; the code directory lives on beside it.
fn take_over(
    worker: Worker,
) -> (
    Result<Box<dyn nimbus_sandbox::Template>, nimbus_sandbox::DriverError>,
    TempDir,
) {
    let stream = worker
        .conn
        .into_stream()
        .expect("nothing after the greeting");
    let launched = nimbus_sandbox::Launched {
        instance_id: "i_template".into(),
        stream,
        sandbox: worker.sandbox,
    };
    let spec = LaunchSpec {
        instance_id: "i_template".into(),
        program: "/unused".into(),
        args: vec![],
        env: vec![],
        workdir: "/".into(),
        visible: vec![],
        memory_mb: 128,
        network: nimbus_core::Network::Isolated,
        template: true,
    };
    (ProcessDriver::new().template(&spec, launched), worker.code)
}

/// Starts a template on `source` and turns it over to the driver.
async fn template(
    source: &str,
    env: &[(&str, &str)],
) -> (Box<dyn nimbus_sandbox::Template>, TempDir) {
    let (template, code) = take_over(start_template(source, env).await);
    (template.expect("a template"), code)
}

/// Forks an instance and completes its handshake.
async fn fork(template: &dyn nimbus_sandbox::Template, id: &str) -> Result<Worker, WorkerError> {
    let launched = template.spawn(id).await.expect("fork");
    let mut worker = Worker {
        conn: WorkerConn::new(launched.stream),
        sandbox: launched.sandbox,
        code: tempfile::tempdir().unwrap(),
    };
    worker.conn.handshake().await?;
    Ok(worker)
}

#[tokio::test]
async fn instances_forked_from_a_template_share_its_init_but_not_its_randomness() {
    let source = r#"
import os, random, uuid, nimbus
LOADED = [random.random()]
restored = []

@nimbus.after_restore
def again():
    restored.append(os.environ["NIMBUS_INSTANCE_ID"])

def handle(event):
    return {"loaded": LOADED[0], "random": random.random(), "uuid": str(uuid.uuid4()),
            "restored": restored, "pid": os.getpid()}
"#;
    let (template, _code) = template(source, &[]).await;
    assert!(template.alive());
    let mut a = fork(template.as_ref(), "i_a").await.unwrap();
    let mut b = fork(template.as_ref(), "i_b").await.unwrap();
    let a = body(&invoke(&mut a, json!({})).await);
    let b = body(&invoke(&mut b, json!({})).await);
    assert_eq!(
        a["loaded"], b["loaded"],
        "module init ran once, in the template"
    );
    assert_ne!(a["random"], b["random"]);
    assert_ne!(a["uuid"], b["uuid"]);
    assert_eq!(a["restored"], json!(["i_a"]));
    assert_eq!(b["restored"], json!(["i_b"]));
    assert_ne!(a["pid"], b["pid"]);
}

#[tokio::test]
async fn a_failing_after_restore_hook_fails_the_instance_start_with_its_name() {
    let source = r#"
import nimbus

@nimbus.after_restore
def reconnect():
    raise ConnectionError("database is down")

def handle(event):
    return 1
"#;
    let (template, _code) = template(source, &[]).await;
    match fork(template.as_ref(), "i_x").await {
        Err(WorkerError::Init { error, .. }) => {
            assert!(
                error.message.contains(
                    "@nimbus.after_restore hook reconnect raised ConnectionError: database is down"
                ),
                "{}",
                error.message
            );
        }
        other => panic!("expected an init error, got {:?}", other.map(|_| ())),
    }
    assert!(template.alive(), "the template survives a failed child");
}

#[tokio::test]
async fn an_overrunning_hook_is_stopped_at_its_budget() {
    let source = r#"
import time, nimbus

@nimbus.after_restore
def slow():
    time.sleep(30)

def handle(event):
    return 1
"#;
    let (template, _code) = template(source, &[("NIMBUS_HOOK_BUDGET_MS", "200")]).await;
    let started = Instant::now();
    match fork(template.as_ref(), "i_x").await {
        Err(WorkerError::Init { error, .. }) => {
            assert_eq!(error.error_type, "HookTimeout");
            assert!(
                error.message.contains("slow did not finish within 0.2 s"),
                "{}",
                error.message
            );
        }
        other => panic!("expected an init error, got {:?}", other.map(|_| ())),
    }
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn before_snapshot_hooks_and_the_warm_up_run_in_the_template() {
    let source = r#"
import nimbus
seen = []

@nimbus.before_snapshot
def prepare():
    seen.append("before_snapshot")

def handle(event):
    if event.get("warmup"):
        seen.append("warmup")
        return None
    return seen
"#;
    let (template, _code) = template(source, &[("NIMBUS_WARMUP", "1")]).await;
    let mut worker = fork(template.as_ref(), "i_a").await.unwrap();
    assert_eq!(
        body(&invoke(&mut worker, json!({})).await),
        json!(["before_snapshot", "warmup"])
    );
}

#[tokio::test]
async fn a_template_whose_init_left_a_thread_or_a_process_running_is_refused() {
    for source in [
        "import threading, time\nthreading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n\ndef handle(event):\n    return 1\n",
        "import subprocess\nhelper = subprocess.Popen(['sleep', '60'])\n\ndef handle(event):\n    return 1\n",
    ] {
        let worker = start_template(source, &[]).await;
        let pid = worker.sandbox.pid();
        let err = take_over(worker).0.unwrap_err();
        assert!(err.message.contains("a template must be a single process"), "{pid}: {err}");
    }
}

#[tokio::test]
async fn how_a_forked_instance_ended_is_known() {
    let source = "import os\n\ndef handle(event):\n    os._exit(event['code'])\n";
    let (template, _code) = template(source, &[]).await;
    let mut worker = fork(template.as_ref(), "i_a").await.unwrap();
    let raw = RawValue::from_string(r#"{"code": 3}"#.into()).unwrap();
    assert!(matches!(
        worker.conn.invoke("inv_x", &raw).await,
        Err(WorkerError::Closed)
    ));
    let exit = worker.sandbox.wait().await;
    assert_eq!(exit.code, Some(3), "{exit}");
}

#[tokio::test]
async fn the_first_instance_after_fork_ahead_is_the_spare_forked_before_it_was_asked_for() {
    let source = "import os\n\ndef handle(event):\n    return os.getpid()\n";
    let worker = start_template(source, &[]).await;
    let template_pid = worker.sandbox.pid();
    let (template, _code) = take_over(worker);
    let template = template.unwrap();
    template.fork_ahead().await.unwrap();
    let children =
        std::fs::read_to_string(format!("/proc/{template_pid}/task/{template_pid}/children"))
            .unwrap();
    let spare: u32 = children.split_whitespace().next().unwrap().parse().unwrap();
    let mut instance = fork(template.as_ref(), "i_a").await.unwrap();
    assert_eq!(body(&invoke(&mut instance, json!({})).await), json!(spare));
}

#[tokio::test]
async fn state_calls_travel_over_the_connection_and_failures_raise_typed_errors() {
    let mut w = start(
        r#"
import nimbus

def handle(event, state):
    out = {"get": state.get("cart"), "missing": state.get("nope", "dflt")}
    out["version"] = state.function().set("n", {"a": [1, "ü"]}, ttl=1.5)
    try:
        state.set_with_version("k", 1, 4)
    except nimbus.StateConflict as e:
        out["conflict"] = [e.code, e.current_version, str(e)]
    try:
        state.invocation().set("big", "x")
    except nimbus.StateValueTooLarge as e:
        out["too_large"] = isinstance(e, nimbus.StateError)
    try:
        state.set("bad", object())
    except TypeError as e:
        out["type_error"] = str(e)
    try:
        state.set("k", 1, ttl=0)
    except ValueError as e:
        out["ttl_error"] = str(e)
    out["keys"] = state.keys("c*")
    import threading
    caught = []
    def elsewhere():
        try:
            state.get("cart")
        except nimbus.StateError as e:
            caught.append(e.code)
    t = threading.Thread(target=elsewhere)
    t.start()
    t.join()
    out["from_thread"] = caught
    try:
        state.incr("n", 2**63)
    except nimbus.StateError as e:
        out["big_delta"] = e.code
    try:
        state.set("\ud800", 1)
    except nimbus.StateError as e:
        out["surrogate"] = e.code
    return out
"#,
    )
    .await;
    let mut state = ScriptedState {
        answers: vec![
            Ok(answer(Some(r#"["book"]"#), Some(3))),
            Ok(answer(Some("null"), Some(0))),
            Ok(answer(None, Some(9))),
            Err(nimbus_runtime::protocol::StateFailure {
                code: "state_conflict".into(),
                message: "version conflict: the key is at version 7, not 4".into(),
                current_version: Some(7),
            }),
            Err(nimbus_runtime::protocol::StateFailure {
                code: "value_too_large".into(),
                message: "too large".into(),
                current_version: None,
            }),
            Ok(answer(Some(r#"["cart"]"#), None)),
        ],
        asked: Vec::new(),
    };
    let out = invoke_with_state(&mut w, "inv_state", &mut state).await;
    assert_eq!(out["get"], json!(["book"]));
    assert_eq!(out["missing"], "dflt");
    assert_eq!(out["version"], 9);
    assert_eq!(
        out["conflict"],
        json!([
            "state_conflict",
            7,
            "version conflict: the key is at version 7, not 4"
        ])
    );
    assert_eq!(out["too_large"], true);
    assert!(
        out["type_error"]
            .as_str()
            .unwrap()
            .contains("not JSON-serializable"),
        "{out}"
    );
    assert!(out["ttl_error"].as_str().unwrap().contains("ttl"), "{out}");
    assert_eq!(out["keys"], json!(["cart"]));
    // Refused in the worker, before anything is sent: from another thread, a delta past
    // 64 bits, a key that is not valid Unicode.
    assert_eq!(out["from_thread"], json!(["invalid_argument"]));
    assert_eq!(out["big_delta"], "not_an_integer");
    assert_eq!(out["surrogate"], "invalid_key");
    // What the worker asked, in order: the unserializable value and the bad TTL never left it.
    let asked: Vec<(&str, &str, Option<&str>)> = state
        .asked
        .iter()
        .map(|r| (r.op.as_str(), r.scope.as_str(), r.key.as_deref()))
        .collect();
    assert_eq!(
        asked,
        [
            ("get", "session", Some("cart")),
            ("get", "session", Some("nope")),
            ("set", "function", Some("n")),
            ("set_with_version", "session", Some("k")),
            ("set", "invocation", Some("big")),
            ("keys", "session", None),
        ]
    );
    let set = &state.asked[2];
    assert_eq!(set.value.as_ref().unwrap().get(), r#"{"a":[1,"\u00fc"]}"#);
    assert_eq!(set.ttl, Some(1.5));
    assert_eq!(state.asked[3].version, Some(4));
    assert_eq!(state.asked[5].pattern.as_deref(), Some("c*"));
    // The connection is in step afterwards.
    w.conn.ping().await.unwrap();
}

#[tokio::test]
async fn a_function_without_state_gets_a_falsy_state_that_raises() {
    let mut w = start(
        r#"
import nimbus

def handle(event, state):
    try:
        state.get("k")
    except nimbus.StateNotEnabled as e:
        return {"truthy": bool(state), "code": e.code, "is_state_error": isinstance(e, nimbus.StateError)}
"#,
    )
    .await;
    let out = body(&invoke(&mut w, json!({})).await);
    assert_eq!(
        out,
        json!({"truthy": false, "code": "state_not_enabled", "is_state_error": true})
    );
}
