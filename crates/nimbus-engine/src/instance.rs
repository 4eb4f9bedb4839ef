//! A running worker of one function version ([`Instance`]), and why one did not come up
//! ([`StartError`], with the tier it was started from in [`StartFailure`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use nimbus_core::StartType;
use nimbus_runtime::protocol::ErrorPayload;
use nimbus_runtime::WorkerConn;
use nimbus_sandbox::{ExitInfo, Sandbox, Template};

use crate::catalog::VersionEntry;
use crate::error::EngineError;

/// A running worker of one function version.
#[derive(Debug)]
pub struct Instance {
    /// `i_<ulid>`.
    pub id: String,
    /// The version it runs.
    pub version: Arc<VersionEntry>,
    /// Its connection.
    pub conn: WorkerConn,
    pub(crate) sandbox: Box<dyn Sandbox>,
    pub(crate) started: Instant,
    pub(crate) last_used: Instant,
    pub(crate) served: u64,
    /// The template it was forked from, kept alive while the instance lives (the process
    /// driver's forks live in the template's pid namespace).
    _template: Option<Arc<dyn Template>>,
}

impl Instance {
    /// A worker that has just greeted the host; `template` is the one it lives in, if any.
    pub(crate) fn new(
        id: String,
        version: Arc<VersionEntry>,
        conn: WorkerConn,
        sandbox: Box<dyn Sandbox>,
        template: Option<Arc<dyn Template>>,
    ) -> Self {
        let now = Instant::now();
        Instance {
            id,
            version,
            conn,
            sandbox,
            started: now,
            last_used: now,
            served: 0,
            _template: template,
        }
    }

    /// Kills the worker and waits for it to end, reporting how it ended.
    pub async fn kill(mut self) -> ExitInfo {
        self.sandbox.kill();
        self.sandbox.wait().await
    }

    /// Waits (briefly) for a worker that closed its connection to end, reporting how.
    pub async fn exit_info(&mut self) -> Option<ExitInfo> {
        tokio::time::timeout(Duration::from_millis(500), self.sandbox.wait())
            .await
            .ok()
    }
}

/// Why a new instance (or template) did not come up.
#[derive(Debug)]
pub enum StartError {
    /// The handler failed to load, or a snapshot hook failed (the user's code raised).
    Init {
        /// The exception.
        error: ErrorPayload,
        /// What the code printed while loading.
        logs: String,
    },
    /// The worker died or broke the protocol while starting.
    Crashed(String),
    /// The worker did not become ready within the start timeout.
    Timeout(Duration),
    /// The platform could not start it at all (runtime missing, driver failure).
    Platform(EngineError),
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartError::Init { error, .. } => write!(f, "{}: {}", error.error_type, error.message),
            StartError::Crashed(message) => f.write_str(message),
            StartError::Timeout(limit) => {
                write!(f, "not ready within {} s", limit.as_secs())
            }
            StartError::Platform(e) => write!(f, "{e}"),
        }
    }
}

/// A start of an instance for an invocation that failed: why, and from which tier it was
/// being started (what the invocation reports as its start type).
#[derive(Debug)]
pub struct StartFailure {
    /// Why the instance did not come up.
    pub error: StartError,
    /// How it was being started.
    pub start_type: StartType,
}
