//! [`FakeDriver`]: a fake sandbox driver for tests of the engine's own logic (placement,
//! queueing, recycling, affinity) without real workers.
//!
//! It is a fake, not an isolating driver: each "worker" is a tokio task on one end of a
//! Unix socket pair, speaking the runtime's frame protocol (`nimbus_runtime::protocol`)
//! in-process. It greets with `ready` (or `init_error`, see [`FakeDriver::failing_init`]),
//! then answers every `invoke` with a `result` whose body is the event, and every `ping`
//! with a `pong`. What the event asks changes what the worker does:
//!
//! - `{"sleep_ms": n}`: it answers after `n` milliseconds (a slow handler);
//! - `{"crash": true}`: it ends without answering, as a worker that died.
//!
//! It keeps no templates and restores nothing (the trait's defaults), so the engine starts
//! every new instance cold; run it with snapshots disabled to count launches exactly.

use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use nimbus_runtime::protocol::{read_frame, write_frame};
use nimbus_sandbox::{Driver, DriverError, ExitInfo, LaunchSpec, Launched, Sandbox};
use serde_json::{json, Value};
use tokio::net::UnixStream;
use tokio::sync::watch;
use tokio::task::AbortHandle;

/// A fake driver whose workers run in-process (see the module docs).
#[derive(Debug, Default)]
pub struct FakeDriver {
    /// How long a worker takes to greet.
    start_delay: Duration,
    /// The greeting is an `init_error` with this message (the handler "failed to load").
    init_error: Option<String>,
    /// Workers launched so far.
    launched: AtomicUsize,
    /// Workers still running.
    running: Arc<AtomicUsize>,
}

impl FakeDriver {
    /// Workers that greet at once and echo events.
    pub fn new() -> Self {
        FakeDriver::default()
    }

    /// Workers that take `delay` to greet (a slow cold start).
    pub fn with_start_delay(mut self, delay: Duration) -> Self {
        self.start_delay = delay;
        self
    }

    /// Workers whose handler fails to load, raising `message`.
    pub fn failing_init(mut self, message: &str) -> Self {
        self.init_error = Some(message.to_owned());
        self
    }

    /// How many workers were launched so far.
    pub fn launches(&self) -> usize {
        self.launched.load(Ordering::SeqCst)
    }

    /// How many workers are running now (launched, not yet ended or killed).
    pub fn running(&self) -> usize {
        self.running.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl Driver for FakeDriver {
    fn name(&self) -> &'static str {
        "fake"
    }

    async fn launch(&self, spec: &LaunchSpec) -> Result<Launched, DriverError> {
        static PIDS: AtomicU32 = AtomicU32::new(1_000_000);
        let (host, worker) = UnixStream::pair().map_err(|e| DriverError {
            instance_id: spec.instance_id.clone(),
            message: format!("socketpair: {e}"),
            refused: false,
        })?;
        let pid = PIDS.fetch_add(1, Ordering::Relaxed);
        let (exit_tx, exit) = watch::channel(None);
        let exit_tx = Arc::new(exit_tx);
        self.launched.fetch_add(1, Ordering::SeqCst);
        self.running.fetch_add(1, Ordering::SeqCst);
        let greeting = match &self.init_error {
            None => json!({"type": "ready", "pid": pid, "init_ms": 0.1}),
            Some(message) => json!({
                "type": "init_error",
                "error": {"type": "FakeInitError", "message": message, "traceback": ""},
                "logs": "",
            }),
        };
        let task = tokio::spawn(serve(worker, greeting, self.start_delay));
        let worker = task.abort_handle();
        let ended = exit_tx.clone();
        let running = self.running.clone();
        // Reports the worker's end once its task returns (a kill reports it itself).
        tokio::spawn(async move {
            if let Ok(code) = task.await {
                let info = ExitInfo {
                    code: Some(code),
                    signal: None,
                    out_of_memory: false,
                };
                report_exit(&ended, info, &running);
            }
        });
        Ok(Launched {
            instance_id: spec.instance_id.clone(),
            stream: host,
            sandbox: Box::new(FakeSandbox {
                pid,
                worker,
                exit_tx,
                exit,
                running: self.running.clone(),
            }),
        })
    }
}

/// A fake worker: greets, then answers frames until the host closes the socket or an
/// event asks it to crash. Returns its exit code.
async fn serve(mut socket: UnixStream, greeting: Value, start_delay: Duration) -> i32 {
    let mut buf = Vec::new();
    tokio::time::sleep(start_delay).await;
    if write_frame(&mut socket, &greeting, &mut buf).await.is_err() {
        return 1;
    }
    if greeting["type"] != "ready" {
        return 1;
    }
    let mut frame = Vec::new();
    while read_frame(&mut socket, &mut frame).await.is_ok() {
        let Ok(message) = serde_json::from_slice::<Value>(&frame) else {
            return 2;
        };
        let id = message["id"].clone();
        let answer = match message["type"].as_str() {
            Some("invoke") => {
                let event = &message["event"];
                if event["crash"] == true {
                    return 1;
                }
                if let Some(ms) = event["sleep_ms"].as_u64() {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                }
                json!({"type": "result", "id": id, "ok": true, "body": event, "logs": ""})
            }
            Some("ping") => json!({"type": "pong", "id": id}),
            _ => continue,
        };
        if write_frame(&mut socket, &answer, &mut buf).await.is_err() {
            return 1;
        }
    }
    0
}

/// Records how a worker ended, unless its end was recorded already.
fn report_exit(exit: &watch::Sender<Option<ExitInfo>>, info: ExitInfo, running: &AtomicUsize) {
    let first = exit.send_if_modified(|e| match e {
        None => {
            *e = Some(info);
            true
        }
        Some(_) => false,
    });
    if first {
        running.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A fake worker's sandbox: killing it aborts the worker's task.
#[derive(Debug)]
struct FakeSandbox {
    pid: u32,
    /// The task that runs the worker.
    worker: AbortHandle,
    exit_tx: Arc<watch::Sender<Option<ExitInfo>>>,
    exit: watch::Receiver<Option<ExitInfo>>,
    running: Arc<AtomicUsize>,
}

#[async_trait]
impl Sandbox for FakeSandbox {
    fn pid(&self) -> u32 {
        self.pid
    }

    fn kill(&mut self) {
        self.worker.abort();
        let killed = ExitInfo {
            code: None,
            signal: Some(9),
            out_of_memory: false,
        };
        report_exit(&self.exit_tx, killed, &self.running);
    }

    fn try_exit(&mut self) -> Option<ExitInfo> {
        *self.exit.borrow()
    }

    async fn wait(&mut self) -> ExitInfo {
        match self.exit.wait_for(Option::is_some).await {
            Ok(info) => info.expect("waited for an exit"),
            // The sender lives in this sandbox too: it cannot be gone while we wait.
            Err(_) => unreachable!("the exit sender outlives the sandbox's waits"),
        }
    }
}

impl Drop for FakeSandbox {
    fn drop(&mut self) {
        self.kill();
    }
}
