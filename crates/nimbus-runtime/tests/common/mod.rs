//! What the worker tests of both runtimes share: starting a worker with the process driver
//! on a fresh code directory, reading outcomes, and a scripted host side of the state API.

#![allow(dead_code)] // Each test crate uses a different part of it.

use std::path::Path;

use nimbus_runtime::protocol::{ErrorPayload, StateFailure};
use nimbus_runtime::{
    InvokeOutcome, RuntimeCommand, StateAnswer, StateCalls, StateRequest, WorkerConn,
};
use nimbus_sandbox::{Driver, LaunchSpec, ProcessDriver, Sandbox};
use serde_json::value::RawValue;
use serde_json::Value;
use tempfile::TempDir;

/// A started worker and what keeps it alive.
pub struct Worker {
    pub conn: WorkerConn,
    pub sandbox: Box<dyn Sandbox>,
    pub code: TempDir,
}

/// Writes `files` into a fresh code directory and starts `command`'s worker on it with
/// `handler` (without handshake).
pub async fn launch(
    command: RuntimeCommand,
    files: &[(&str, &str)],
    handler: &str,
    env: &[(&str, &str)],
) -> Worker {
    launch_in(&std::env::temp_dir(), command, files, handler, env).await
}

/// [`launch`] with the code directory made in `parent` (created if need be), as the server
/// makes them in `<data dir>/code`.
pub async fn launch_in(
    parent: &Path,
    command: RuntimeCommand,
    files: &[(&str, &str)],
    handler: &str,
    env: &[(&str, &str)],
) -> Worker {
    std::fs::create_dir_all(parent).unwrap();
    let code = tempfile::tempdir_in(parent).unwrap();
    for (name, content) in files {
        let path = code.path().join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, content).unwrap();
    }
    let mut vars = command.env;
    vars.extend([
        ("NIMBUS_HANDLER".to_owned(), handler.to_owned()),
        ("NIMBUS_FUNCTION_NAME".to_owned(), "test-fn".to_owned()),
        ("NIMBUS_FUNCTION_VERSION".to_owned(), "3".to_owned()),
        ("NIMBUS_MEMORY_MB".to_owned(), "128".to_owned()),
    ]);
    vars.extend(env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
    let spec = LaunchSpec {
        instance_id: "i_test".into(),
        program: command.program,
        args: command.args,
        env: vars,
        workdir: code.path().to_owned(),
        visible: command.visible,
        memory_mb: 128,
        network: nimbus_core::Network::Isolated,
        template: false,
    };
    let launched = ProcessDriver::new().launch(&spec).await.unwrap();
    Worker {
        conn: WorkerConn::new(launched.stream),
        sandbox: launched.sandbox,
        code,
    }
}

pub async fn invoke(worker: &mut Worker, event: Value) -> InvokeOutcome {
    let raw = RawValue::from_string(event.to_string()).unwrap();
    worker.conn.invoke("inv_test", &raw).await.expect("invoke")
}

/// Invokes with the event `{}` as request `request_id`, the state calls answered by
/// `state`; the handler's result.
pub async fn invoke_with_state(
    worker: &mut Worker,
    request_id: &str,
    state: &mut ScriptedState,
) -> Value {
    let raw = RawValue::from_string("{}".into()).unwrap();
    let outcome = worker
        .conn
        .invoke_with_state(request_id, &raw, state)
        .await
        .expect("invoke");
    body(&outcome)
}

pub fn body(outcome: &InvokeOutcome) -> Value {
    match &outcome.result {
        Ok(raw) => serde_json::from_str(raw.get()).unwrap(),
        Err(e) => panic!("function error: {e:?}\nlogs: {}", outcome.logs),
    }
}

pub fn error(outcome: &InvokeOutcome) -> &ErrorPayload {
    match &outcome.result {
        Ok(raw) => panic!("expected a function error, got {}", raw.get()),
        Err(e) => e,
    }
}

/// The host side of the state API as a test double: answers from a script and records what
/// the worker asked (the real host, on real backends, is tested in the server's tests).
pub struct ScriptedState {
    pub answers: Vec<Result<StateAnswer, StateFailure>>,
    pub asked: Vec<StateRequest>,
}

impl StateCalls for ScriptedState {
    fn enabled(&self) -> bool {
        true
    }

    fn session_key(&self) -> Option<&str> {
        Some("s1")
    }

    async fn call(&mut self, request: StateRequest) -> Result<StateAnswer, StateFailure> {
        self.asked.push(request);
        self.answers.remove(0)
    }
}

pub fn answer(value: Option<&str>, version: Option<u64>) -> StateAnswer {
    StateAnswer {
        value: value.map(|v| RawValue::from_string(v.to_owned()).unwrap()),
        version,
    }
}
