//! The process driver's templates: instances forked from a template process, each of
//! which enters a sandbox of its own (see [`Template`](crate::Template)).
//!
//! # The fork protocol (process driver)
//!
//! Runtimes implement it in their template mode, on the template's connection (fd 3),
//! in the frames of the worker protocol (u32 big-endian length, then JSON):
//!
//! 1. driver → template: `{"type":"fork","instance_id":"i_…"}`, with the worker's end of a
//!    new socket pair attached (`SCM_RIGHTS`);
//! 2. the template forks and answers `{"type":"forked","ok":true}` (or `"ok":false` with an
//!    `"error"`);
//! 3. the child puts the received socket on fd 3 and, isolated (the template's root holds
//!    the [`ForkConfig`](crate::init::ForkConfig)), enters a sandbox of its own: new
//!    namespaces, private `/tmp`, no capabilities, the worker seccomp filter;
//! 4. the child sends the single byte `H` on its socket; the driver learns its host pid from
//!    the socket's credentials (`SO_PASSCRED`), moves it into the instance's cgroup slot and
//!    answers `G`; only then does the child run the function's code again. A child that
//!    fails before `H` sends `E` and a message instead, and exits.
//!
//! Then the child is a worker like any other: it sends `ready` and serves invocations.

use std::fmt;
use std::io::IoSliceMut;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use nix::sys::socket::{recvmsg, setsockopt, sockopt, ControlMessageOwned, MsgFlags};
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::UnixStream;

use crate::cgroup::CgroupSlot;
use crate::checkpoint::{self, external_mounts, CheckpointError, Criu, Manifest, MANIFEST};
use crate::frames::{frame, read_frame, read_frame_with_fd, send_with_fd};
use crate::isolation::{Isolation, OutboundUnavailable};
use crate::network::{self, NetworkError, OutboundSpec};
use crate::pidfd::PidfdSandbox;
use crate::template::{Probe, Template};
use crate::{DriverError, LaunchSpec, Launched, Sandbox};

/// Why a launched worker could not be taken over as a template.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TakeOverError {
    /// The isolated template's init has no child.
    #[error("the template's sandbox has no PID 1")]
    NoPid1,
    /// Its instances would need a network this host cannot give.
    #[error(transparent)]
    Outbound(#[from] OutboundUnavailable),
    /// It is not a single process.
    #[error(transparent)]
    NotAlone(#[from] NotAlone),
}

impl TakeOverError {
    /// The error as the driver reports it for `instance_id`: a refusal when the function's
    /// code left the template more than one process (see [`DriverError::refused`]).
    pub(crate) fn for_instance(self, instance_id: &str) -> DriverError {
        let refused = matches!(self, TakeOverError::NotAlone(_));
        DriverError {
            refused,
            ..DriverError::failed(instance_id, self)
        }
    }
}

/// Why a template is not a single process.
#[derive(Debug, thiserror::Error)]
pub(crate) enum NotAlone {
    /// Its threads could not be listed.
    #[error("the template's threads: {0}")]
    Threads(#[source] std::io::Error),
    /// Its children could not be listed.
    #[error("the template's children: {0}")]
    Children(#[source] std::io::Error),
    /// The function's init left threads or processes running.
    #[error(
        "the function's init left {threads} thread(s) and {children} process(es) running \
         besides its own; a template must be a single process (no snapshot: its instances \
         start cold)"
    )]
    Busy {
        /// Threads besides the template's own.
        threads: usize,
        /// Running children.
        children: usize,
    },
}

/// Why an instance could not be forked from a template.
#[derive(Debug, thiserror::Error)]
enum ForkError {
    /// The socket pair of the instance's connection could not be made.
    #[error("socketpair: {0}")]
    SocketPair(#[source] std::io::Error),
    /// The host end could not be told to carry its sender's credentials.
    #[error("SO_PASSCRED: {0}")]
    PassCred(#[source] nix::Error),
    /// The host end of the connection could not be set up.
    #[error("socket: {0}")]
    Socket(#[source] std::io::Error),
    /// No cgroup slot could be had for the instance.
    #[error("cgroup: {0}")]
    Cgroup(#[source] std::io::Error),
    /// The request could not be encoded.
    #[error("{0}")]
    Encode(#[source] serde_json::Error),
    /// An earlier exchange with the template was cut short.
    #[error("the template's connection is out of step")]
    OutOfStep,
    /// The request could not be sent.
    #[error("sending the fork request to the template: {0}")]
    Send(#[source] std::io::Error),
    /// The template did not answer.
    #[error("the template did not answer the fork: {0}")]
    NoAnswer(#[source] std::io::Error),
    /// The template's answer is not one.
    #[error("the template's answer: {0}")]
    Answer(#[source] serde_json::Error),
    /// The template could not fork.
    #[error("the template could not fork: {0}")]
    NotForked(String),
    /// The forked child did not greet.
    #[error(transparent)]
    Hello(#[from] HelloError),
    /// The forked child could not be watched.
    #[error("pidfd_open({pid}): {source}")]
    Watch {
        /// Its host pid.
        pid: u32,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The forked child is not in a sandbox of its own (a refusal).
    #[error("the forked instance did not enter its sandbox: {0}")]
    NotSandboxed(#[source] Unsandboxed),
    /// The forked child could not be moved into its cgroup slot.
    #[error("moving the instance into its cgroup: {0}")]
    Adopt(#[source] std::io::Error),
    /// No link could be reserved for the instance.
    #[error(transparent)]
    Link(NetworkError),
    /// The instance's link could not be set up.
    #[error("the instance's network: {0}")]
    Network(#[source] NetworkError),
    /// Setting the link up did not finish.
    #[error("{0}")]
    Join(#[from] tokio::task::JoinError),
    /// The child could not be told to go on.
    #[error("releasing the instance: {0}")]
    Release(#[source] std::io::Error),
}

/// Why a request to a template (a spare, a probe) failed.
#[derive(Debug, thiserror::Error)]
enum RequestError {
    /// The request could not be encoded.
    #[error("{0}")]
    Encode(#[source] serde_json::Error),
    /// An earlier exchange with the template was cut short.
    #[error("the template's connection is out of step")]
    OutOfStep,
    /// The request could not be sent.
    #[error("sending the template a {kind} request: {source}")]
    Send {
        /// The request's type.
        kind: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The template did not answer.
    #[error("the template's answer: {0}")]
    NoAnswer(#[source] std::io::Error),
    /// The template's answer is not one.
    #[error("the template's answer: {0}")]
    Answer(#[source] serde_json::Error),
    /// The template could not fork a spare child.
    #[error("the template could not fork a spare")]
    NoSpare,
    /// The template could not probe its instances.
    #[error("the template could not probe its instances: {0}")]
    NoProbe(String),
}

/// What the forked child said instead of its greeting, or why it said nothing.
#[derive(Debug, thiserror::Error)]
enum HelloError {
    /// Its socket could not be waited on.
    #[error("waiting for the forked instance: {0}")]
    Wait(#[source] std::io::Error),
    /// It closed its socket first.
    #[error("the forked instance ended before it entered its sandbox")]
    Ended,
    /// Its greeting came without credentials.
    #[error("the forked instance's pid is unknown")]
    UnknownPid,
    /// It reported an error.
    #[error("the forked instance could not enter its sandbox: {0}")]
    Failed(String),
    /// It sent something else.
    #[error("the forked instance sent {0:?} instead of its greeting")]
    Unexpected(char),
    /// Its socket could not be read.
    #[error("reading from the forked instance: {0}")]
    Read(#[source] std::io::Error),
}

/// How a forked child is not in a sandbox of its own.
#[derive(Debug, thiserror::Error)]
enum Unsandboxed {
    /// Its status could not be read.
    #[error("its status: {0}")]
    Status(#[source] std::io::Error),
    /// It holds capabilities.
    #[error("it holds capabilities ({set} {value})")]
    Capabilities {
        /// The capability set (`CapEff`, `CapPrm`, `CapBnd`).
        set: &'static str,
        /// Its value.
        value: String,
    },
    /// It may gain privileges.
    #[error("no_new_privs is not set")]
    NewPrivileges,
    /// It has no seccomp filter.
    #[error("it runs without a seccomp filter")]
    NoSeccomp,
    /// Its seccomp filters are not the template's and the worker filter.
    #[error(
        "it runs under {found} seccomp filters, not the template's {template} and the worker filter"
    )]
    Filters {
        /// Its filters, as the kernel tells.
        found: String,
        /// The template's.
        template: u32,
    },
    /// It is not PID 1 of a pid namespace.
    #[error("it is not PID 1 of a pid namespace of its own")]
    NotPid1,
    /// It shares one of the template's namespaces.
    #[error("it shares the template's {0} namespace")]
    SharedNamespace(&'static str),
}

/// A process-driver template: the template's connection and its sandbox.
#[derive(Debug)]
pub(crate) struct ProcessTemplate {
    /// The template's connection, one exchange at a time.
    control: tokio::sync::Mutex<UnixStream>,
    /// The template's own sandbox.
    sandbox: std::sync::Mutex<Box<dyn Sandbox>>,
    /// Host pid of the template process itself.
    worker: u32,
    /// Isolation of its instances, unless the driver runs without.
    isolation: Option<Arc<Isolation>>,
    /// Each instance's memory limit, MiB.
    memory_mb: u32,
    /// What each instance's link needs, for an outbound function.
    outbound: Option<OutboundSpec>,
    /// CRIU, when this template can be checkpointed (isolated, without a link: a link's
    /// host end is not the template's to take along).
    criu: Option<Arc<Criu>>,
    /// An exchange with it was cut short: it counts as ended (see [`Exchange`]).
    broken: AtomicBool,
    /// A child it forked did not enter its sandbox: it counts as ended, and why.
    refusal: std::sync::Mutex<Option<String>>,
    /// Its own number of seccomp filters (a child must have one more), if the kernel says.
    filters: Option<u32>,
}

impl ProcessTemplate {
    /// The template launched from `spec`, after its handshake.
    pub(crate) fn new(
        spec: &LaunchSpec,
        launched: Launched,
        isolation: Option<Arc<Isolation>>,
        criu: Option<Arc<Criu>>,
    ) -> Result<Self, TakeOverError> {
        let pid = launched.sandbox.pid();
        // Isolated, the sandbox's pid is its init's, and the template is its PID 1.
        let worker = match &isolation {
            Some(_) => crate::procfs::first_child(pid).ok_or(TakeOverError::NoPid1)? as u32,
            None => pid,
        };
        Self::assemble(spec, launched, worker, isolation, criu)
    }

    /// A template restored from a checkpoint: `launched.sandbox` is the template itself.
    pub(crate) fn restored(
        spec: &LaunchSpec,
        launched: Launched,
        isolation: Arc<Isolation>,
        criu: Arc<Criu>,
    ) -> Result<Self, TakeOverError> {
        let worker = launched.sandbox.pid();
        Self::assemble(spec, launched, worker, Some(isolation), Some(criu))
    }

    /// The template whose process is `worker`, once checked to be a single process.
    fn assemble(
        spec: &LaunchSpec,
        launched: Launched,
        worker: u32,
        isolation: Option<Arc<Isolation>>,
        criu: Option<Arc<Criu>>,
    ) -> Result<Self, TakeOverError> {
        let outbound = match &isolation {
            Some(isolation) => isolation.outbound(spec.network)?,
            None => None,
        };
        let criu = criu.filter(|_| isolation.is_some() && outbound.is_none());
        alone(worker)?;
        let filters = seccomp_filters(worker);
        Ok(ProcessTemplate {
            control: tokio::sync::Mutex::new(launched.stream),
            sandbox: std::sync::Mutex::new(launched.sandbox),
            worker,
            isolation,
            memory_mb: spec.memory_mb,
            outbound,
            criu,
            broken: AtomicBool::new(false),
            refusal: std::sync::Mutex::new(None),
            filters,
        })
    }
}

/// The template's answer to a request (`forked`, `detached`, `spared`, `probed`).
#[derive(Deserialize)]
struct Answer {
    /// It did what was asked.
    ok: bool,
    /// Why not.
    #[serde(default)]
    error: Option<String>,
    /// What a `probe` found.
    #[serde(flatten)]
    probe: Probe,
}

/// An exchange on the template's connection: if it ends before the answer is read (an
/// error, a cancelled start), the connection is out of step and the template is broken.
struct Exchange<'a>(&'a AtomicBool);

impl Exchange<'_> {
    /// The answer was read: the connection is in step.
    fn done(self) {
        std::mem::forget(self);
    }
}

impl Drop for Exchange<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

#[async_trait]
impl Template for ProcessTemplate {
    async fn spawn(&self, instance_id: &str) -> Result<Launched, DriverError> {
        self.fork(instance_id).await.map_err(|e| match e {
            ForkError::NotSandboxed(_) => {
                let why = e.to_string();
                *self.refusal.lock().expect("template lock") = Some(why.clone());
                DriverError {
                    instance_id: instance_id.to_owned(),
                    message: why,
                    refused: true,
                }
            }
            e => DriverError::failed(instance_id, e),
        })
    }

    fn refused(&self) -> Option<String> {
        self.refusal.lock().expect("template lock").clone()
    }

    fn alive(&self) -> bool {
        !self.broken.load(Ordering::Relaxed)
            && self.refusal.lock().expect("template lock").is_none()
            && self
                .sandbox
                .lock()
                .expect("template lock")
                .try_exit()
                .is_none()
    }

    async fn fork_ahead(&self) -> Result<(), DriverError> {
        match self
            .ask(serde_json::json!({ "type": "spare" }))
            .await
            .map_err(template_error)?
            .ok
        {
            true => Ok(()),
            false => Err(template_error(RequestError::NoSpare)),
        }
    }

    async fn probe(&self) -> Result<Probe, DriverError> {
        let reply = self
            .ask(serde_json::json!({ "type": "probe" }))
            .await
            .map_err(template_error)?;
        match reply.ok {
            true => Ok(reply.probe),
            false => Err(template_error(RequestError::NoProbe(
                reply.error.unwrap_or_default(),
            ))),
        }
    }

    async fn checkpoint(&self, dir: &Path) -> Result<Vec<String>, DriverError> {
        self.dump(dir).await.map_err(template_error)
    }

    fn resident_bytes(&self) -> Option<u64> {
        crate::procfs::rss_bytes(self.worker)
    }
}

impl ProcessTemplate {
    /// Forks an instance (see the fork protocol above): [`Template::spawn`] but for the
    /// error's type.
    async fn fork(&self, instance_id: &str) -> Result<Launched, ForkError> {
        let (host, worker) =
            std::os::unix::net::UnixStream::pair().map_err(ForkError::SocketPair)?;
        // Every message on the host end carries its sender's pid, as this host sees it.
        setsockopt(&host, sockopt::PassCred, &true).map_err(ForkError::PassCred)?;
        host.set_nonblocking(true).map_err(ForkError::Socket)?;
        let slot = match &self.isolation {
            Some(isolation) => Some(isolation.slot(self.memory_mb).map_err(ForkError::Cgroup)?),
            None => None,
        };
        let request = serde_json::to_vec(&serde_json::json!({
            "type": "fork",
            "instance_id": instance_id,
        }))
        .map_err(ForkError::Encode)?;
        {
            let mut control = self.control.lock().await;
            if self.broken.load(Ordering::Relaxed) {
                return Err(ForkError::OutOfStep);
            }
            let exchange = Exchange(&self.broken);
            send_with_fd(&control, &request, worker.as_raw_fd())
                .await
                .map_err(ForkError::Send)?;
            drop(worker);
            let reply = read_frame(&mut control)
                .await
                .map_err(ForkError::NoAnswer)?;
            let reply: Answer = serde_json::from_slice(&reply).map_err(ForkError::Answer)?;
            exchange.done();
            if !reply.ok {
                return Err(ForkError::NotForked(reply.error.unwrap_or_default()));
            }
        }
        let mut stream = UnixStream::from_std(host).map_err(ForkError::Socket)?;
        let pid = hello(&mut stream).await?;
        let residue = slot.as_ref().and_then(CgroupSlot::task_count).unwrap_or(0);
        // Watched before it is moved or released, while its pid surely names it.
        let watched = PidfdSandbox::watch(pid, None, 0, None, false)
            .map_err(|source| ForkError::Watch { pid, source })?;
        if self.isolation.is_some() {
            // The child set its sandbox up itself, with code the function's init could have
            // tampered with (it ran in the same interpreter): nothing runs before the host
            // has seen the result.
            check_sandboxed(pid, self.worker, self.filters, self.outbound.is_some())
                .map_err(ForkError::NotSandboxed)?;
        }
        if let Some(slot) = &slot {
            slot.adopt(pid).map_err(ForkError::Adopt)?;
        }
        // Held (open) as long as the sandbox: the link stays reserved.
        let reservation = match &self.outbound {
            Some(outbound) => {
                let (link, reservation) = network::reserve(outbound).map_err(ForkError::Link)?;
                let pid = pid as i32;
                tokio::task::spawn_blocking(move || network::attach_forked(&link, pid))
                    .await?
                    .map_err(ForkError::Network)?;
                Some(reservation)
            }
            None => None,
        };
        stream.write_all(b"G").await.map_err(ForkError::Release)?;
        Ok(Launched {
            instance_id: instance_id.to_owned(),
            stream,
            sandbox: Box::new(watched.with(slot, residue, reservation)),
        })
    }

    /// Checkpoints the template into `dir`: [`Template::checkpoint`] but for the error's
    /// type.
    async fn dump(&self, dir: &Path) -> Result<Vec<String>, CheckpointError> {
        let criu = self.criu.as_ref().ok_or(CheckpointError::Unsupported)?;
        // Forks wait while the template is moved and dumped.
        let mut control = self.control.lock().await;
        if self.broken.load(Ordering::Relaxed) {
            return Err(CheckpointError::OutOfStep);
        }
        let detach = serde_json::to_vec(&serde_json::json!({ "type": "detach" }))
            .map_err(CheckpointError::Encode)?;
        let exchange = Exchange(&self.broken);
        control
            .write_all(&frame(&detach))
            .await
            .map_err(CheckpointError::Detach)?;
        let (reply, fd) = read_frame_with_fd(&mut control)
            .await
            .map_err(CheckpointError::NoAnswer)?;
        let reply: Answer = serde_json::from_slice(&reply).map_err(CheckpointError::Answer)?;
        exchange.done();
        let fd = match (reply.ok, fd) {
            (true, Some(fd)) => fd,
            _ => {
                return Err(CheckpointError::NotDetached(
                    reply.error.unwrap_or_default(),
                ))
            }
        };
        let stream = std::os::unix::net::UnixStream::from(fd);
        stream
            .set_nonblocking(true)
            .map_err(CheckpointError::Socket)?;
        *control = UnixStream::from_std(stream).map_err(CheckpointError::Socket)?;

        let socket = std::fs::read_link(format!("/proc/{}/fd/3", self.worker))
            .map_err(CheckpointError::Connection)?;
        let socket_inode = socket
            .to_string_lossy()
            .strip_prefix("socket:[")
            .and_then(|s| s.strip_suffix(']'))
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or_else(|| CheckpointError::NotASocket(socket.clone()))?;
        let mounts = external_mounts(self.worker).map_err(CheckpointError::Mounts)?;
        let mut args: Vec<String> = vec![
            "dump".into(),
            "-t".into(),
            self.worker.to_string(),
            "-D".into(),
            dir.display().to_string(),
            "--leave-running".into(),
            "--external".into(),
            format!("unix[{socket_inode}]"),
            // A checkpointed sandbox has no network: its namespace holds only loopback,
            // down (outbound templates are not checkpointed). Restored as a new empty
            // namespace, which is the same, without CRIU's runs of `ip` and `iptables`;
            // and there is no traffic to lock.
            "--empty-ns".into(),
            "net".into(),
            "--network-lock".into(),
            "skip".into(),
        ];
        for (key, path) in &mounts {
            args.push("--external".into());
            args.push(format!("mnt[{}]:{key}", path.display()));
        }
        let log = dir.join("dump.log");
        checkpoint::run(criu, &args, &log, |_| {}).await?;
        let _ = std::fs::remove_file(&log);
        let root_files = checkpoint::copy_root(self.worker, &dir.join(checkpoint::ROOT))
            .map_err(CheckpointError::CopyRoot)?;
        let manifest = Manifest {
            socket_inode,
            mounts,
            criu: criu.describe(),
        };
        let manifest = serde_json::to_vec_pretty(&manifest).map_err(CheckpointError::Encode)?;
        std::fs::write(dir.join(MANIFEST), manifest).map_err(CheckpointError::WriteManifest)?;
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .map_err(|source| CheckpointError::List {
                path: dir.to_path_buf(),
                source,
            })?
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
            .filter_map(|e| e.file_name().into_string().ok())
            .chain(root_files)
            .collect();
        names.sort();
        Ok(names)
    }

    /// Sends the template `request` (no descriptor) and reads its answer.
    async fn ask(&self, request: serde_json::Value) -> Result<Answer, RequestError> {
        let kind = request["type"].as_str().unwrap_or_default().to_owned();
        let request = serde_json::to_vec(&request).map_err(RequestError::Encode)?;
        let mut control = self.control.lock().await;
        if self.broken.load(Ordering::Relaxed) {
            return Err(RequestError::OutOfStep);
        }
        let exchange = Exchange(&self.broken);
        control
            .write_all(&frame(&request))
            .await
            .map_err(|source| RequestError::Send { kind, source })?;
        let reply = read_frame(&mut control)
            .await
            .map_err(RequestError::NoAnswer)?;
        let reply: Answer = serde_json::from_slice(&reply).map_err(RequestError::Answer)?;
        exchange.done();
        Ok(reply)
    }
}

/// A failure of the template itself (not of one instance, not a refusal).
fn template_error(error: impl fmt::Display) -> DriverError {
    DriverError::failed("", error)
}

/// Checks that the template `pid` is a single thread with no child: threads would not
/// survive a fork, and a process the function's init left running would live on in the
/// template, outside any invocation, limit or timeout.
fn alone(pid: u32) -> Result<(), NotAlone> {
    let threads = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| d.count())
        .map_err(NotAlone::Threads)?;
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .map_err(NotAlone::Children)?;
    // Ended children not reaped yet (zombies) run nothing.
    let children = children
        .split_whitespace()
        .filter(|child| {
            std::fs::read_to_string(format!("/proc/{child}/stat"))
                .ok()
                .and_then(|stat| {
                    let after = stat[stat.rfind(')')? + 1..].trim_start().to_owned();
                    after.chars().next()
                })
                .is_some_and(|state| state != 'Z')
        })
        .count();
    if threads != 1 || children != 0 {
        return Err(NotAlone::Busy {
            threads: threads - 1,
            children,
        });
    }
    Ok(())
}

/// The number of seccomp filters process `pid` runs under, if the kernel tells (5.9+).
fn seccomp_filters(pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Seccomp_filters:"))?
        .trim()
        .parse()
        .ok()
}

/// Checks, from the host, that process `pid` forked from the template `template` (which
/// runs under `template_filters` seccomp filters) is in a sandbox of its own: no
/// capability (effective, permitted or bounding), `no_new_privs`, one filter more than the
/// template (the worker filter), PID 1 of its own pid namespace, and user, mount and pid
/// namespaces other than the template's (and network, for an `outbound` one).
fn check_sandboxed(
    pid: u32,
    template: u32,
    template_filters: Option<u32>,
    outbound: bool,
) -> Result<(), Unsandboxed> {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).map_err(Unsandboxed::Status)?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .map(str::trim)
            .unwrap_or_default()
    };
    for caps in ["CapEff", "CapPrm", "CapBnd"] {
        if !field(caps).trim_start_matches('0').is_empty() {
            return Err(Unsandboxed::Capabilities {
                set: caps,
                value: field(caps).to_owned(),
            });
        }
    }
    if field("NoNewPrivs") != "1" {
        return Err(Unsandboxed::NewPrivileges);
    }
    if field("Seccomp") != "2" {
        return Err(Unsandboxed::NoSeccomp);
    }
    if let Some(template_filters) = template_filters {
        if field("Seccomp_filters").parse::<u32>().ok() != Some(template_filters + 1) {
            return Err(Unsandboxed::Filters {
                found: field("Seccomp_filters").to_owned(),
                template: template_filters,
            });
        }
    }
    if field("NSpid").split_whitespace().last() != Some("1") {
        return Err(Unsandboxed::NotPid1);
    }
    let namespaces: &[&str] = if outbound {
        &["user", "mnt", "pid", "net"]
    } else {
        &["user", "mnt", "pid"]
    };
    for ns in namespaces {
        let of = |p: u32| std::fs::read_link(format!("/proc/{p}/ns/{ns}")).ok();
        if of(pid).is_none() || of(pid) == of(template) {
            return Err(Unsandboxed::SharedNamespace(ns));
        }
    }
    Ok(())
}

/// Waits for the forked child's `H` and returns its host pid, or the error it reports.
async fn hello(stream: &mut UnixStream) -> Result<u32, HelloError> {
    loop {
        stream.readable().await.map_err(HelloError::Wait)?;
        let mut byte = [0u8; 1];
        let mut space = nix::cmsg_space!(libc::ucred);
        let got = stream.try_io(Interest::READABLE, || {
            let mut iov = [IoSliceMut::new(&mut byte)];
            let msg = recvmsg::<()>(
                stream.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                MsgFlags::MSG_CMSG_CLOEXEC,
            )
            .map_err(std::io::Error::from)?;
            let pid = msg.cmsgs().ok().and_then(|mut c| {
                c.find_map(|c| match c {
                    ControlMessageOwned::ScmCredentials(creds) => Some(creds.pid()),
                    _ => None,
                })
            });
            Ok((msg.bytes, pid))
        });
        match got {
            Ok((0, _)) => return Err(HelloError::Ended),
            Ok((_, pid)) if byte[0] == b'H' => {
                return pid
                    .filter(|p| *p > 0)
                    .map(|p| p as u32)
                    .ok_or(HelloError::UnknownPid)
            }
            Ok(_) if byte[0] == b'E' => {
                let mut message = Vec::new();
                let _ = tokio::time::timeout(
                    std::time::Duration::from_secs(1),
                    stream.read_to_end(&mut message),
                )
                .await;
                return Err(HelloError::Failed(
                    String::from_utf8_lossy(&message).trim().to_owned(),
                ));
            }
            Ok(_) => return Err(HelloError::Unexpected(byte[0] as char)),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(HelloError::Read(e)),
        }
    }
}
