//! The process driver: each worker is a child process in its own process group, tied to
//! the server's life (it gets SIGKILL if the server dies), with the host connection on fd 3.
//!
//! Isolated (the default of the server), the child is the sandbox [`init`](crate::init),
//! started inside the instance's cgroup slot (joined before exec, so everything it starts is
//! in it from its first instruction), which builds the namespaces, mounts and identity and
//! execs the worker. Without isolation (`--insecure-no-isolation`, and tests of the driver
//! itself) the worker is started directly with a clean environment.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;

use async_trait::async_trait;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;
use tokio::process::{Child, Command};

use crate::cgroup::CgroupSlot;
use crate::checkpoint::RestoreError;
use crate::checkpoint::{self, Criu};
use crate::child::socket_and_cgroups;
use crate::fork::ProcessTemplate;
use crate::isolation::{Isolation, OutboundUnavailable};
use crate::procfs::{self, first_child, pid_in_sandbox};
use crate::template::Template;
use crate::{Driver, DriverError, ExitInfo, LaunchSpec, Launched, Sandbox};

/// Why a worker could not be launched.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// The socket pair of the host connection could not be made.
    #[error("socketpair: {0}")]
    SocketPair(#[source] std::io::Error),
    /// The host end of the connection could not be set up.
    #[error("socket: {0}")]
    Socket(#[source] std::io::Error),
    /// No cgroup slot could be had for the sandbox.
    #[error("cgroup: {0}")]
    Cgroup(#[source] std::io::Error),
    /// The sandbox asks for a network this host cannot give.
    #[error(transparent)]
    Outbound(#[from] OutboundUnavailable),
    /// The sandbox spec could not be encoded for the init.
    #[error("encoding the sandbox spec: {0}")]
    EncodeSpec(#[source] serde_json::Error),
    /// The init (or, without isolation, the worker) could not be started.
    #[error("spawn {program}: {source}")]
    Spawn {
        /// The program.
        program: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The init did not take its spec.
    #[error("sending the sandbox spec: {0}")]
    SendSpec(#[source] std::io::Error),
}

/// Starts workers as child processes, isolated or not.
#[derive(Debug, Default, Clone)]
pub struct ProcessDriver {
    isolation: Option<Arc<Isolation>>,
    /// Checkpoints of templates to disk (isolated only).
    criu: Option<Arc<Criu>>,
}

impl ProcessDriver {
    /// A driver that starts workers as plain child processes: no namespaces, cgroups or
    /// seccomp. For trusted code only.
    pub fn new() -> Self {
        ProcessDriver::default()
    }

    /// A driver that starts every worker in its own sandbox.
    pub fn isolated(isolation: Arc<Isolation>) -> Self {
        ProcessDriver {
            isolation: Some(isolation),
            criu: None,
        }
    }

    /// The same, also checkpointing templates to disk with `criu` (isolated drivers only).
    pub fn with_checkpoints(mut self, criu: Criu) -> Self {
        if self.isolation.is_some() {
            self.criu = Some(Arc::new(criu));
        }
        self
    }
}

#[async_trait]
impl Driver for ProcessDriver {
    fn name(&self) -> &'static str {
        "process"
    }

    fn template(
        &self,
        spec: &LaunchSpec,
        launched: Launched,
    ) -> Result<Box<dyn Template>, DriverError> {
        ProcessTemplate::new(spec, launched, self.isolation.clone(), self.criu.clone())
            .map(|t| Box::new(t) as Box<dyn Template>)
            .map_err(|e| e.for_instance(&spec.instance_id))
    }

    fn can_checkpoint(&self, spec: &LaunchSpec) -> bool {
        self.can_restore() && spec.network == nimbus_core::Network::Isolated
    }

    fn can_restore(&self) -> bool {
        self.criu.is_some() && self.isolation.is_some()
    }

    async fn restore_template(
        &self,
        spec: &LaunchSpec,
        dir: &Path,
    ) -> Result<Box<dyn Template>, DriverError> {
        let (Some(isolation), Some(criu)) = (&self.isolation, &self.criu) else {
            return Err(DriverError::failed(
                &spec.instance_id,
                RestoreError::Unsupported,
            ));
        };
        let launched = checkpoint::restore(isolation, criu, spec, dir)
            .await
            .map_err(|e| DriverError::failed(&spec.instance_id, e))?;
        ProcessTemplate::restored(spec, launched, isolation.clone(), criu.clone())
            .map(|t| Box::new(t) as Box<dyn Template>)
            .map_err(|e| e.for_instance(&spec.instance_id))
    }

    async fn launch(&self, spec: &LaunchSpec) -> Result<Launched, DriverError> {
        self.start(spec)
            .await
            .map_err(|e| DriverError::failed(&spec.instance_id, e))
    }
}

impl ProcessDriver {
    /// Starts the worker of `spec`: [`Driver::launch`] but for the error's type.
    async fn start(&self, spec: &LaunchSpec) -> Result<Launched, LaunchError> {
        let (host, worker) =
            std::os::unix::net::UnixStream::pair().map_err(LaunchError::SocketPair)?;
        host.set_nonblocking(true).map_err(LaunchError::Socket)?;
        let worker_fd: OwnedFd = worker.into();
        let raw = worker_fd.as_raw_fd();

        let (mut cmd, slot, init_spec) = match &self.isolation {
            Some(isolation) => {
                let slot = match spec.template {
                    true => isolation.template_slot(spec.memory_mb),
                    false => isolation.slot(spec.memory_mb),
                }
                .map_err(LaunchError::Cgroup)?;
                let init_spec = isolation.init_spec(spec, &slot)?;
                let init_spec = serde_json::to_vec(&init_spec).map_err(LaunchError::EncodeSpec)?;
                let (program, args) = isolation.init_command();
                let mut cmd = Command::new(program);
                // The worker's environment travels in the spec, not in the init's.
                cmd.args(args)
                    .env_clear()
                    .current_dir("/")
                    .stdin(Stdio::piped());
                (cmd, Some(slot), Some(init_spec))
            }
            None => {
                let mut cmd = Command::new(&spec.program);
                cmd.args(&spec.args)
                    .env_clear()
                    .envs(spec.env.iter().map(|(k, v)| (k, v)))
                    .current_dir(&spec.workdir)
                    .stdin(Stdio::null());
                (cmd, None, None)
            }
        };
        // Isolated, the sandbox is ended through its PID 1 (see `ProcessSandbox::kill`): a
        // SIGKILL to the init on drop would orphan PID 1 to the host's init.
        cmd.stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(self.isolation.is_none());
        let join: Vec<CString> = slot
            .as_ref()
            .map(|s| s.procs_files().to_vec())
            .unwrap_or_default();
        // SAFETY: the closure runs in the forked child before exec and only makes
        // async-signal-safe system calls (setsid, prctl, dup2, fcntl, open, write, close)
        // on data prepared before the fork.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // Fires when the spawning *thread* exits: launches run on the runtime's
                // long-lived worker threads, never on short-lived blocking threads.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // This is the pre-exec hook the helper is for.
                socket_and_cgroups(raw, &join)
            });
        }
        let residue = slot.as_ref().and_then(CgroupSlot::task_count).unwrap_or(0);
        let program = cmd.as_std().get_program().to_owned();
        let mut child = cmd.spawn().map_err(|source| LaunchError::Spawn {
            program: program.to_string_lossy().into_owned(),
            source,
        })?;
        drop(worker_fd);
        if let (Some(init_spec), Some(mut stdin)) = (init_spec, child.stdin.take()) {
            stdin
                .write_all(&init_spec)
                .await
                .map_err(LaunchError::SendSpec)?;
        }
        let stream = UnixStream::from_std(host).map_err(LaunchError::Socket)?;
        let pid = child.id().unwrap_or(0);
        Ok(Launched {
            instance_id: spec.instance_id.clone(),
            stream,
            sandbox: Box::new(ProcessSandbox {
                child,
                pid,
                exit: None,
                slot,
                residue,
                worker_tasks: None,
            }),
        })
    }
}

/// A worker running as a child process group (and, isolated, in its cgroup slot).
#[derive(Debug)]
struct ProcessSandbox {
    child: Child,
    pid: u32,
    exit: Option<ExitInfo>,
    /// Dropped with the sandbox: whatever is left in it is killed and the slot reused.
    slot: Option<CgroupSlot>,
    /// Tasks charged to the slot before the sandbox started (exited, unreaped processes of
    /// an earlier occupant), less those reaped since.
    residue: u64,
    /// The worker's `/proc/<pid>/task`, kept open once the worker is found: its thread
    /// count tells the worker's own tasks from processes an invocation left running.
    worker_tasks: Option<File>,
}

impl ProcessSandbox {
    fn kill_group(&self) {
        // Once the child is reaped its pid (and group id) may belong to someone else: an
        // isolated sandbox then relies on its cgroup, which holds whatever is left.
        if self.pid == 0 || (self.exit.is_some() && self.slot.is_some()) {
            return;
        }
        // The child leads its own process group (setsid): this also kills what it spawned.
        let _ = killpg(Pid::from_raw(self.pid as i32), Signal::SIGKILL);
    }

    /// Ends the sandbox. Isolated, through its PID 1: the init reaps it (and with it goes
    /// every process of the namespace) and exits itself. Killing the init first would leave
    /// PID 1 to the host's init, a zombie charged to the reused cgroup slot until reaped.
    fn end(&mut self) {
        if self.slot.is_some() && self.exit.is_none() {
            if let Some(pid1) = first_child(self.pid) {
                let _ = nix::sys::signal::kill(Pid::from_raw(pid1), Signal::SIGKILL);
                return;
            }
        }
        self.kill_group();
        let _ = self.child.start_kill();
    }

    fn exit_info(&self, status: std::process::ExitStatus) -> ExitInfo {
        use std::os::unix::process::ExitStatusExt;
        ExitInfo {
            code: status.code(),
            signal: status.signal(),
            out_of_memory: self.slot.as_ref().is_some_and(CgroupSlot::oom_killed),
        }
    }
}

#[async_trait]
impl Sandbox for ProcessSandbox {
    fn pid(&self) -> u32 {
        self.pid
    }

    fn resident_bytes(&self) -> Option<u64> {
        procfs::sandbox_memory(self.slot.as_ref(), self.pid)
    }

    fn kill(&mut self) {
        self.end();
    }

    fn end_strays(&mut self) {
        let Some(slot) = &self.slot else { return };
        // The init, the sandbox's PID 1 and the worker's threads (plus any zombie of an
        // earlier occupant of the slot not yet reaped): nothing else to look at. Two cheap
        // calls on files kept open, since this runs after every invocation: the worker's
        // thread count first, then the group's, so a thread born in between costs only a
        // listing.
        let threads = self.worker_tasks.as_ref().and_then(procfs::thread_count);
        if let (Some(threads), Some(tasks)) = (threads, slot.task_count()) {
            let expected = 2 + threads + self.residue;
            if tasks <= expected {
                // Fewer: the earlier occupant's leftovers were reaped meanwhile.
                self.residue = self.residue.saturating_sub(expected - tasks);
                return;
            }
        }
        for pid in slot.pids() {
            if pid as u32 == self.pid {
                continue;
            }
            match pid_in_sandbox(pid) {
                Some(1) | None => {}
                Some(2) => {
                    if self.worker_tasks.is_none() {
                        self.worker_tasks = File::open(format!("/proc/{pid}/task")).ok();
                    }
                }
                Some(_) => {
                    let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
                }
            }
        }
    }

    fn try_exit(&mut self) -> Option<ExitInfo> {
        if self.exit.is_none() {
            if let Ok(Some(status)) = self.child.try_wait() {
                self.exit = Some(self.exit_info(status));
            }
        }
        self.exit
    }

    async fn wait(&mut self) -> ExitInfo {
        if let Some(exit) = self.exit {
            return exit;
        }
        let exit = match self.child.wait().await {
            Ok(status) => self.exit_info(status),
            Err(_) => ExitInfo {
                code: None,
                signal: None,
                out_of_memory: false,
            },
        };
        self.exit = Some(exit);
        exit
    }
}

impl Drop for ProcessSandbox {
    fn drop(&mut self) {
        // Leftover children of the worker die with its group even if the worker itself exited.
        self.end();
        // Emptying the slot may wait (bounded) for its processes to die: not on an async
        // thread.
        if let Some(slot) = self.slot.take() {
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => drop(runtime.spawn_blocking(move || drop(slot))),
                Err(_) => drop(slot),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn spec(script: &str) -> LaunchSpec {
        LaunchSpec {
            instance_id: "i_test".into(),
            program: "/bin/sh".into(),
            args: vec!["-c".into(), script.into()],
            env: vec![("GREETING".into(), "hello".into())],
            workdir: std::env::temp_dir(),
            visible: vec![],
            memory_mb: 128,
            network: nimbus_core::Network::Isolated,
            template: false,
        }
    }

    #[tokio::test]
    async fn worker_gets_the_socket_on_fd_3_and_only_the_given_env() {
        let driver = ProcessDriver::new();
        let mut launched = driver
            .launch(&spec(
                "printf '%s:%s' \"$GREETING\" \"${HOME:-none}\" >&3; cat <&3 >&3",
            ))
            .await
            .unwrap();
        let mut got = [0u8; 10];
        launched.stream.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello:none");
        launched.stream.write_all(b"echo").await.unwrap();
        let mut echo = [0u8; 4];
        launched.stream.read_exact(&mut echo).await.unwrap();
        assert_eq!(&echo, b"echo");
        launched.sandbox.kill();
        let exit = launched.sandbox.wait().await;
        assert_eq!(exit.signal, Some(libc::SIGKILL), "{exit}");
        assert_eq!(exit.to_string(), "killed by signal 9 (SIGKILL)");
    }

    #[tokio::test]
    async fn exit_status_is_reported() {
        let driver = ProcessDriver::new();
        let mut launched = driver.launch(&spec("exit 7")).await.unwrap();
        let exit = launched.sandbox.wait().await;
        assert_eq!(exit.code, Some(7));
        assert_eq!(launched.sandbox.try_exit(), Some(exit));
    }

    #[tokio::test]
    async fn kill_takes_the_whole_process_group() {
        let driver = ProcessDriver::new();
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("bg.pid");
        let script = format!(
            "sleep 300 & echo $! > {}; echo x >&3; wait",
            pidfile.display()
        );
        let mut launched = driver.launch(&spec(&script)).await.unwrap();
        let mut byte = [0u8; 2];
        launched.stream.read_exact(&mut byte).await.unwrap();
        let bg: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        drop(launched);
        // The background sleep must be gone (or a zombie awaiting its reaper).
        for _ in 0..100 {
            let alive = std::fs::read_to_string(format!("/proc/{bg}/stat"))
                .map(|s| !s.contains(") Z "))
                .unwrap_or(false);
            if !alive {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("background process {bg} survived its sandbox");
    }

    #[tokio::test]
    async fn a_missing_program_is_a_clear_error() {
        let mut s = spec("");
        s.program = "/nonexistent/python".into();
        let err = ProcessDriver::new().launch(&s).await.unwrap_err();
        assert!(err.to_string().contains("/nonexistent/python"), "{err}");
    }
}
