//! Nimbus runtimes: the host↔worker protocol and the code that runs inside a worker.
//!
//! - [`protocol`]: length-prefixed JSON frames (u32 big-endian length, then JSON) and the
//!   message types both sides exchange.
//! - [`worker`]: the host's end of one worker connection: handshake, invoke.
//! - [`python`]: the Python worker bootstrap and the resolution of the real interpreter.
//! - [`node`]: the Node.js worker and the resolution of the real `node`.
//! - [`Runtimes`]: which runtimes this host can run, and the command that starts each.

mod host;
pub mod node;
pub mod protocol;
pub mod python;
pub mod worker;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use nimbus_core::Runtime;

pub use host::{CommandError, InstallError};
pub use node::NodeError;
pub use python::PythonError;
pub use worker::{
    peek_greeting, InvokeOutcome, StateAnswer, StateCalls, StateRequest, Stateless, WorkerConn,
    WorkerError,
};

/// How to start a worker process for one runtime (before the sandbox wraps it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeCommand {
    /// Absolute path of the real interpreter (never a shim).
    pub program: PathBuf,
    /// Arguments after the program.
    pub args: Vec<String>,
    /// Environment the runtime itself needs (the function's variables are added by the engine).
    pub env: Vec<(String, String)>,
    /// Host paths the worker reads besides the function's code and the shared libraries: the
    /// interpreter, its standard library, the worker's own files. A sandbox shows only these.
    pub visible: Vec<PathBuf>,
}

/// Runtime settings from the server configuration.
#[derive(Debug, Clone, Default)]
pub struct RuntimeSettings {
    /// Python interpreter to use; when unset, the real interpreter is resolved.
    pub python: Option<PathBuf>,
    /// Node.js binary to use; when unset, the real `node` is resolved.
    pub node: Option<PathBuf>,
}

/// A runtime this host cannot run.
#[derive(Debug, thiserror::Error)]
#[error("runtime {runtime} is not available on this server: {reason}")]
pub struct RuntimeUnavailable {
    /// The runtime asked for.
    pub runtime: Runtime,
    /// Why it is not available.
    #[source]
    pub reason: DiscoveryError,
}

/// Why discovery found no usable interpreter for a runtime (kept from the start).
#[derive(Debug, Clone, thiserror::Error)]
pub enum DiscoveryError {
    /// No usable Python.
    #[error(transparent)]
    Python(Arc<PythonError>),
    /// No usable Node.js.
    #[error(transparent)]
    Node(Arc<NodeError>),
}

/// The runtimes this host can run, discovered once at start.
#[derive(Debug, Clone)]
pub struct Runtimes {
    /// Python, or why this host has none.
    python: Result<python::PythonRuntime, DiscoveryError>,
    /// Node.js, or why this host has none.
    node: Result<node::NodeRuntime, DiscoveryError>,
}

impl Runtimes {
    /// Resolves interpreters and installs the bootstrap files under `data_dir/runtime/`.
    pub fn discover(settings: &RuntimeSettings, data_dir: &Path) -> Self {
        Runtimes {
            python: python::PythonRuntime::discover(settings.python.as_deref(), data_dir)
                .map_err(|e| DiscoveryError::Python(Arc::new(e))),
            node: node::NodeRuntime::discover(settings.node.as_deref(), data_dir)
                .map_err(|e| DiscoveryError::Node(Arc::new(e))),
        }
    }

    /// The command that starts a worker for `runtime`.
    pub fn command(&self, runtime: Runtime) -> Result<RuntimeCommand, RuntimeUnavailable> {
        match runtime {
            Runtime::Python311 => self
                .python
                .as_ref()
                .map(python::PythonRuntime::command)
                .map_err(|reason| RuntimeUnavailable {
                    runtime,
                    reason: reason.clone(),
                }),
            Runtime::NodeJs20 => {
                self.node
                    .as_ref()
                    .map(node::NodeRuntime::command)
                    .map_err(|reason| RuntimeUnavailable {
                        runtime,
                        reason: reason.clone(),
                    })
            }
        }
    }

    /// One line per runtime for the start-up banner (`python3.11: /usr/bin/python3.11 (3.11.2)`).
    pub fn describe(&self) -> Vec<String> {
        vec![
            match &self.python {
                Ok(p) => format!("python3.11: {}", p.describe()),
                Err(e) => format!("python3.11: unavailable ({e})"),
            },
            match &self.node {
                Ok(n) => format!("nodejs20: {}", n.describe()),
                Err(e) => format!("nodejs20: unavailable ({e})"),
            },
        ]
    }
}
