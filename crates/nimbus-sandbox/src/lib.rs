//! Nimbus sandbox drivers: start one worker, isolated, connected to the host by a socket.
//!
//! A [`Driver`] turns a [`LaunchSpec`] (program, arguments, environment, code directory,
//! limits) into a running [`Sandbox`] plus the host end of its socket. The worker finds its
//! end of the socket on file descriptor [`WORKER_SOCKET_FD`]. The driver knows nothing of
//! languages or the protocol; the runtime and engine crates do.
//!
//! Drivers: [`process::ProcessDriver`] (child processes). A microVM driver implements the
//! same trait, exposing the guest's vsock as a host Unix socket.

pub mod cgroup;
pub mod checkpoint;
mod child;
mod fork;
mod frames;
pub mod init;
pub mod isolation;
pub mod network;
mod pidfd;
pub mod process;
mod procfs;
pub mod seccomp;
pub mod template;

use std::fmt;
use std::path::PathBuf;

use async_trait::async_trait;
use tokio::net::UnixStream;

pub use process::ProcessDriver;
pub use template::{Probe, Template};

/// File descriptor on which a worker finds its end of the host connection.
pub const WORKER_SOCKET_FD: i32 = 3;

/// Everything a driver needs to start one worker.
#[derive(Debug, Clone)]
pub struct LaunchSpec {
    /// Instance id, for logs and resource names.
    pub instance_id: String,
    /// Absolute path of the program to run.
    pub program: PathBuf,
    /// Arguments after the program.
    pub args: Vec<String>,
    /// The complete environment of the worker (nothing is inherited from the server).
    pub env: Vec<(String, String)>,
    /// Working directory: the function's unpacked code.
    pub workdir: PathBuf,
    /// Host paths the worker must be able to read besides its code (the runtime's files);
    /// an isolating driver shows it nothing else of the host.
    pub visible: Vec<PathBuf>,
    /// Memory limit, MiB.
    pub memory_mb: u32,
    /// What network the worker gets.
    pub network: nimbus_core::Network,
    /// The worker is a template: once initialized it forks the function's instances (see
    /// [`template`]), which its sandbox must allow.
    pub template: bool,
}

/// How a sandboxed worker ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitInfo {
    /// Exit code, if it exited.
    pub code: Option<i32>,
    /// Signal number, if a signal killed it.
    pub signal: Option<i32>,
    /// The kernel killed it for exceeding its memory limit.
    pub out_of_memory: bool,
}

impl fmt::Display for ExitInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.out_of_memory {
            return f.write_str("was killed for exceeding its memory limit");
        }
        match (self.code, self.signal) {
            (Some(code), _) => write!(f, "exited with code {code}"),
            (None, Some(signal)) => {
                let name = nix::sys::signal::Signal::try_from(signal)
                    .map(|s| s.as_str())
                    .unwrap_or("unknown");
                write!(f, "killed by signal {signal} ({name})")
            }
            (None, None) => f.write_str("ended for an unknown reason"),
        }
    }
}

/// A running sandboxed worker. Dropping it kills the worker and everything it started.
#[async_trait]
pub trait Sandbox: Send + Sync + fmt::Debug {
    /// Host pid of the worker's main process.
    fn pid(&self) -> u32;
    /// Kills the worker and every process it started. Idempotent.
    fn kill(&mut self);
    /// How the worker ended, if it has ended (non-blocking).
    fn try_exit(&mut self) -> Option<ExitInfo>;
    /// Kills the processes an invocation left running in the sandbox (anything but the
    /// worker and the sandbox's own init), so nothing of a finished invocation keeps running
    /// while the instance waits for the next one. Called after every invocation: cheap when
    /// there is nothing to do.
    fn end_strays(&mut self) {}
    /// Memory the sandbox holds, bytes (what keeping it costs: what is charged to its
    /// cgroup, or the worker's resident memory without one), if the driver can tell.
    fn resident_bytes(&self) -> Option<u64> {
        None
    }
    /// Waits until the worker has ended.
    async fn wait(&mut self) -> ExitInfo;
}

/// A started worker: its sandbox and the host end of its socket.
#[derive(Debug)]
pub struct Launched {
    /// The instance id the worker was started as (a worker started ahead of its use, as
    /// a spare, has the id it was launched with, not the one its user asked for).
    pub instance_id: String,
    /// The host end of the worker's connection.
    pub stream: UnixStream,
    /// The worker itself.
    pub sandbox: Box<dyn Sandbox>,
}

/// A worker that could not be started.
#[derive(Debug, thiserror::Error)]
#[error("could not start worker {instance_id}: {message}")]
pub struct DriverError {
    /// The instance that failed.
    pub instance_id: String,
    /// Why.
    pub message: String,
    /// The driver refused what the function's own code made of its worker (a template
    /// with threads or processes left running, a child that did not enter its sandbox):
    /// the function's failure, not the platform's, and one that retrying will not cure.
    pub refused: bool,
}

impl DriverError {
    /// The platform failed to start `instance_id` (not a refusal), for `error`.
    pub(crate) fn failed(instance_id: &str, error: impl fmt::Display) -> DriverError {
        DriverError {
            instance_id: instance_id.to_owned(),
            message: error.to_string(),
            refused: false,
        }
    }
}

/// A way of starting isolated workers.
#[async_trait]
pub trait Driver: Send + Sync + 'static {
    /// Driver name (`process`, `firecracker`), recorded with snapshots and shown at start.
    fn name(&self) -> &'static str;
    /// Starts a worker.
    async fn launch(&self, spec: &LaunchSpec) -> Result<Launched, DriverError>;
    /// Takes over a template: a worker launched from `spec` (with [`LaunchSpec::template`])
    /// that has completed the runtime's handshake on `launched.stream`.
    fn template(
        &self,
        spec: &LaunchSpec,
        launched: Launched,
    ) -> Result<Box<dyn Template>, DriverError> {
        drop(launched);
        Err(DriverError {
            instance_id: spec.instance_id.clone(),
            message: format!("the {} driver keeps no templates", self.name()),
            refused: false,
        })
    }
    /// Whether templates launched from `spec` can be checkpointed to disk and restored.
    fn can_checkpoint(&self, spec: &LaunchSpec) -> bool {
        let _ = spec;
        false
    }
    /// Whether this driver can restore checkpoints at all (on this host, as configured).
    fn can_restore(&self) -> bool {
        false
    }
    /// Starts again, from its checkpoint in `dir` (see [`Template::checkpoint`]), a
    /// template launched from `spec`: a new template, in a sandbox of its own.
    async fn restore_template(
        &self,
        spec: &LaunchSpec,
        dir: &std::path::Path,
    ) -> Result<Box<dyn Template>, DriverError> {
        let _ = dir;
        Err(DriverError {
            instance_id: spec.instance_id.clone(),
            message: format!("the {} driver cannot restore templates", self.name()),
            refused: false,
        })
    }
}
