//! Templates: an initialized worker kept alive as the parent of new instances.
//!
//! A template is started like any worker, with [`LaunchSpec::template`] set, and answers
//! the runtime's handshake once its code is loaded. The driver then owns its connection and
//! starts instances from it ([`Template::spawn`]). How is the driver's business; for the
//! process driver it is a fork (below), for a microVM driver it would be a restore of the
//! VM's memory snapshot. Either way the caller gets a [`Launched`] worker, as from
//! [`Driver::launch`](crate::Driver::launch), which then answers the runtime's handshake.
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
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use nix::sys::socket::{
    recvmsg, sendmsg, setsockopt, sockopt, ControlMessage, ControlMessageOwned, MsgFlags,
};
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::UnixStream;

use crate::cgroup::CgroupSlot;
use crate::checkpoint::{self, external_mounts, Criu, Manifest, MANIFEST};
use crate::isolation::Isolation;
use crate::network::{self, OutboundSpec};
use crate::pidfd::PidfdSandbox;
use crate::{DriverError, LaunchSpec, Launched, Sandbox};

/// A template ready to start instances.
#[async_trait]
pub trait Template: Send + Sync + fmt::Debug {
    /// Starts a new instance from the template, in a sandbox of its own with the limits and
    /// network of the template's launch spec. The worker answers the runtime's handshake
    /// next.
    async fn spawn(&self, instance_id: &str) -> Result<Launched, DriverError>;
    /// Whether the template still runs.
    fn alive(&self) -> bool;
    /// Readies the template to start its first instance as fast as later ones (the process
    /// driver's template forks a spare child ahead). Call it after any checkpoint.
    async fn fork_ahead(&self) -> Result<(), DriverError> {
        Ok(())
    }
    /// Forks two throwaway probes from the template, readied as instances are, in which the
    /// runtime draws once from every per-process generator it knows in the template, and
    /// reports which gave the same output in both: instances started from this template
    /// would share them. A template whose instances do not share its memory has nothing to
    /// compare.
    async fn probe(&self) -> Result<Probe, DriverError> {
        Ok(Probe::default())
    }
    /// Writes a checkpoint of the template, left running, into the empty directory `dir`,
    /// from which [`Driver::restore_template`](crate::Driver::restore_template) starts it
    /// again. Returns the paths (relative to `dir`) of the regular files written.
    async fn checkpoint(&self, dir: &Path) -> Result<Vec<String>, DriverError> {
        let _ = dir;
        Err(DriverError {
            instance_id: String::new(),
            message: "this template cannot be checkpointed".into(),
            refused: false,
        })
    }
    /// Memory the template holds resident, bytes (what keeping it costs).
    fn resident_bytes(&self) -> Option<u64>;
    /// Why the driver stopped trusting this template because of what the function's code
    /// did to it (a child it forked did not enter its sandbox), if it did: not worth
    /// rebuilding from the same code.
    fn refused(&self) -> Option<String> {
        None
    }
}

/// What two probes of a template found (see [`Template::probe`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct Probe {
    /// How many generators both probes drew from.
    #[serde(default)]
    pub compared: usize,
    /// Those of them that gave the same output in both (the first few, by name).
    #[serde(default)]
    pub same: Vec<String>,
    /// How many gave the same output in both.
    #[serde(default)]
    pub same_count: usize,
}

/// A process-driver template: the template's connection and its sandbox.
#[derive(Debug)]
pub(crate) struct ProcessTemplate {
    control: tokio::sync::Mutex<UnixStream>,
    sandbox: std::sync::Mutex<Box<dyn Sandbox>>,
    /// Host pid of the template process itself.
    worker: u32,
    isolation: Option<Arc<Isolation>>,
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
    /// An error says why, and whether it is a refusal (see [`DriverError::refused`]).
    pub(crate) fn new(
        spec: &LaunchSpec,
        launched: Launched,
        isolation: Option<Arc<Isolation>>,
        criu: Option<Arc<Criu>>,
    ) -> Result<Self, (String, bool)> {
        let pid = launched.sandbox.pid();
        // Isolated, the sandbox's pid is its init's, and the template is its PID 1.
        let worker = match &isolation {
            Some(_) => crate::procfs::first_child(pid)
                .ok_or(("the template's sandbox has no PID 1".to_owned(), false))?
                as u32,
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
    ) -> Result<Self, (String, bool)> {
        let worker = launched.sandbox.pid();
        Self::assemble(spec, launched, worker, Some(isolation), Some(criu))
    }

    fn assemble(
        spec: &LaunchSpec,
        launched: Launched,
        worker: u32,
        isolation: Option<Arc<Isolation>>,
        criu: Option<Arc<Criu>>,
    ) -> Result<Self, (String, bool)> {
        let outbound = match &isolation {
            Some(isolation) => isolation.outbound(spec.network).map_err(|e| (e, false))?,
            None => None,
        };
        let criu = criu.filter(|_| isolation.is_some() && outbound.is_none());
        alone(worker).map_err(|e| (e, true))?;
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
    ok: bool,
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
        let fail = |message: String| DriverError {
            instance_id: instance_id.to_owned(),
            message,
            refused: false,
        };
        let (host, worker) =
            std::os::unix::net::UnixStream::pair().map_err(|e| fail(format!("socketpair: {e}")))?;
        // Every message on the host end carries its sender's pid, as this host sees it.
        setsockopt(&host, sockopt::PassCred, &true)
            .map_err(|e| fail(format!("SO_PASSCRED: {e}")))?;
        host.set_nonblocking(true)
            .map_err(|e| fail(format!("socket: {e}")))?;
        let slot = match &self.isolation {
            Some(isolation) => Some(
                isolation
                    .slot(self.memory_mb)
                    .map_err(|e| fail(format!("cgroup: {e}")))?,
            ),
            None => None,
        };
        let request = serde_json::to_vec(&serde_json::json!({
            "type": "fork",
            "instance_id": instance_id,
        }))
        .map_err(|e| fail(e.to_string()))?;
        {
            let mut control = self.control.lock().await;
            if self.broken.load(Ordering::Relaxed) {
                return Err(fail("the template's connection is out of step".into()));
            }
            let exchange = Exchange(&self.broken);
            send_with_fd(&control, &request, worker.as_raw_fd())
                .await
                .map_err(|e| fail(format!("sending the fork request to the template: {e}")))?;
            drop(worker);
            let reply = read_frame(&mut control)
                .await
                .map_err(|e| fail(format!("the template did not answer the fork: {e}")))?;
            let reply: Answer = serde_json::from_slice(&reply)
                .map_err(|e| fail(format!("the template's answer: {e}")))?;
            exchange.done();
            if !reply.ok {
                return Err(fail(format!(
                    "the template could not fork: {}",
                    reply.error.unwrap_or_default()
                )));
            }
        }
        let mut stream = UnixStream::from_std(host).map_err(|e| fail(format!("socket: {e}")))?;
        let pid = hello(&mut stream).await.map_err(fail)?;
        let residue = slot.as_ref().and_then(CgroupSlot::task_count).unwrap_or(0);
        // Watched before it is moved or released, while its pid surely names it.
        let watched = PidfdSandbox::watch(pid, None, 0, None, false)
            .map_err(|e| fail(format!("pidfd_open({pid}): {e}")))?;
        if self.isolation.is_some() {
            // The child set its sandbox up itself, with code the function's init could have
            // tampered with (it ran in the same interpreter): nothing runs before the host
            // has seen the result.
            if let Err(e) = check_sandboxed(pid, self.worker, self.filters, self.outbound.is_some())
            {
                let why = format!("the forked instance did not enter its sandbox: {e}");
                *self.refusal.lock().expect("template lock") = Some(why.clone());
                return Err(DriverError {
                    instance_id: instance_id.to_owned(),
                    message: why,
                    refused: true,
                });
            }
        }
        if let Some(slot) = &slot {
            slot.adopt(pid)
                .map_err(|e| fail(format!("moving the instance into its cgroup: {e}")))?;
        }
        // Held (open) as long as the sandbox: the link stays reserved.
        let reservation = match &self.outbound {
            Some(outbound) => {
                let (link, reservation) = network::reserve(outbound).map_err(&fail)?;
                let pid = pid as i32;
                tokio::task::spawn_blocking(move || network::attach_forked(&link, pid))
                    .await
                    .map_err(|e| fail(e.to_string()))?
                    .map_err(|e| fail(format!("the instance's network: {e}")))?;
                Some(reservation)
            }
            None => None,
        };
        stream
            .write_all(b"G")
            .await
            .map_err(|e| fail(format!("releasing the instance: {e}")))?;
        Ok(Launched {
            instance_id: instance_id.to_owned(),
            stream,
            sandbox: Box::new(watched.with(slot, residue, reservation)),
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
        match self.ask(serde_json::json!({ "type": "spare" })).await?.ok {
            true => Ok(()),
            false => Err(template_error("the template could not fork a spare".into())),
        }
    }

    async fn probe(&self) -> Result<Probe, DriverError> {
        let reply = self.ask(serde_json::json!({ "type": "probe" })).await?;
        match reply.ok {
            true => Ok(reply.probe),
            false => Err(template_error(format!(
                "the template could not probe its instances: {}",
                reply.error.unwrap_or_default()
            ))),
        }
    }

    async fn checkpoint(&self, dir: &Path) -> Result<Vec<String>, DriverError> {
        let fail = |message: String| DriverError {
            instance_id: String::new(),
            message,
            refused: false,
        };
        let criu = self
            .criu
            .as_ref()
            .ok_or_else(|| fail("this template cannot be checkpointed".into()))?;
        // Forks wait while the template is moved and dumped.
        let mut control = self.control.lock().await;
        if self.broken.load(Ordering::Relaxed) {
            return Err(fail("the template's connection is out of step".into()));
        }
        let detach = serde_json::to_vec(&serde_json::json!({ "type": "detach" }))
            .map_err(|e| fail(e.to_string()))?;
        let exchange = Exchange(&self.broken);
        control
            .write_all(&frame(&detach))
            .await
            .map_err(|e| fail(format!("asking the template to detach: {e}")))?;
        let (reply, fd) = read_frame_with_fd(&mut control)
            .await
            .map_err(|e| fail(format!("the template's answer to detach: {e}")))?;
        let reply: Answer = serde_json::from_slice(&reply)
            .map_err(|e| fail(format!("the template's answer: {e}")))?;
        exchange.done();
        let fd = match (reply.ok, fd) {
            (true, Some(fd)) => fd,
            _ => {
                return Err(fail(format!(
                    "the template could not detach: {}",
                    reply.error.unwrap_or_default()
                )))
            }
        };
        let stream = std::os::unix::net::UnixStream::from(fd);
        stream
            .set_nonblocking(true)
            .map_err(|e| fail(format!("socket: {e}")))?;
        *control = UnixStream::from_std(stream).map_err(|e| fail(format!("socket: {e}")))?;

        let socket = std::fs::read_link(format!("/proc/{}/fd/3", self.worker))
            .map_err(|e| fail(format!("the template's connection: {e}")))?;
        let socket_inode = socket
            .to_string_lossy()
            .strip_prefix("socket:[")
            .and_then(|s| s.strip_suffix(']'))
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or_else(|| fail(format!("fd 3 of the template is {}", socket.display())))?;
        let mounts = external_mounts(self.worker)
            .map_err(|e| fail(format!("the template's mounts: {e}")))?;
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
        checkpoint::run(criu, &args, &log, |_| {})
            .await
            .map_err(fail)?;
        let _ = std::fs::remove_file(&log);
        let root_files = checkpoint::copy_root(self.worker, &dir.join(checkpoint::ROOT))
            .map_err(|e| fail(format!("copying the template's root: {e}")))?;
        let manifest = Manifest {
            socket_inode,
            mounts,
            criu: criu.describe(),
        };
        let manifest = serde_json::to_vec_pretty(&manifest).map_err(|e| fail(e.to_string()))?;
        std::fs::write(dir.join(MANIFEST), manifest)
            .map_err(|e| fail(format!("writing the manifest: {e}")))?;
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .map_err(|e| fail(format!("{}: {e}", dir.display())))?
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
            .filter_map(|e| e.file_name().into_string().ok())
            .chain(root_files)
            .collect();
        names.sort();
        Ok(names)
    }

    fn resident_bytes(&self) -> Option<u64> {
        crate::procfs::rss_bytes(self.worker)
    }
}

impl ProcessTemplate {
    /// Sends the template `request` (no descriptor) and reads its answer.
    async fn ask(&self, request: serde_json::Value) -> Result<Answer, DriverError> {
        let kind = request["type"].as_str().unwrap_or_default().to_owned();
        let request = serde_json::to_vec(&request).map_err(|e| template_error(e.to_string()))?;
        let mut control = self.control.lock().await;
        if self.broken.load(Ordering::Relaxed) {
            return Err(template_error(
                "the template's connection is out of step".into(),
            ));
        }
        let exchange = Exchange(&self.broken);
        control
            .write_all(&frame(&request))
            .await
            .map_err(|e| template_error(format!("sending the template a {kind} request: {e}")))?;
        let reply = read_frame(&mut control)
            .await
            .map_err(|e| template_error(format!("the template's answer: {e}")))?;
        let reply: Answer = serde_json::from_slice(&reply)
            .map_err(|e| template_error(format!("the template's answer: {e}")))?;
        exchange.done();
        Ok(reply)
    }
}

/// A failure of the template itself (not of one instance, not a refusal).
fn template_error(message: String) -> DriverError {
    DriverError {
        instance_id: String::new(),
        message,
        refused: false,
    }
}

/// Checks that the template `pid` is a single thread with no child: threads would not
/// survive a fork, and a process the function's init left running would live on in the
/// template, outside any invocation, limit or timeout.
fn alone(pid: u32) -> Result<(), String> {
    let threads = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| d.count())
        .map_err(|e| format!("the template's threads: {e}"))?;
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .map_err(|e| format!("the template's children: {e}"))?;
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
        return Err(format!(
            "the function's init left {} thread(s) and {children} process(es) running besides \
             its own; a template must be a single process (no snapshot: its instances start cold)",
            threads - 1
        ));
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
) -> Result<(), String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("its status: {e}"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .map(str::trim)
            .unwrap_or_default()
    };
    for caps in ["CapEff", "CapPrm", "CapBnd"] {
        if !field(caps).trim_start_matches('0').is_empty() {
            return Err(format!("it holds capabilities ({caps} {})", field(caps)));
        }
    }
    if field("NoNewPrivs") != "1" {
        return Err("no_new_privs is not set".into());
    }
    if field("Seccomp") != "2" {
        return Err("it runs without a seccomp filter".into());
    }
    if let Some(template_filters) = template_filters {
        if field("Seccomp_filters").parse::<u32>().ok() != Some(template_filters + 1) {
            return Err(format!(
                "it runs under {} seccomp filters, not the template's {template_filters} and the worker filter",
                field("Seccomp_filters")
            ));
        }
    }
    if field("NSpid").split_whitespace().last() != Some("1") {
        return Err("it is not PID 1 of a pid namespace of its own".into());
    }
    let namespaces: &[&str] = if outbound {
        &["user", "mnt", "pid", "net"]
    } else {
        &["user", "mnt", "pid"]
    };
    for ns in namespaces {
        let of = |p: u32| std::fs::read_link(format!("/proc/{p}/ns/{ns}")).ok();
        if of(pid).is_none() || of(pid) == of(template) {
            return Err(format!("it shares the template's {ns} namespace"));
        }
    }
    Ok(())
}

/// `payload` as a frame.
fn frame(payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(payload.len() + 4);
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// Reads one frame and the descriptor that came with it, if any.
async fn read_frame_with_fd(
    stream: &mut UnixStream,
) -> std::io::Result<(Vec<u8>, Option<OwnedFd>)> {
    let mut head = [0u8; 4];
    let mut got = 0;
    let mut fd = None;
    while got < head.len() {
        stream.readable().await?;
        let mut space = nix::cmsg_space!([RawFd; 1]);
        let read = stream.try_io(Interest::READABLE, || {
            let mut iov = [IoSliceMut::new(&mut head[got..])];
            let msg = recvmsg::<()>(
                stream.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                MsgFlags::MSG_CMSG_CLOEXEC,
            )
            .map_err(std::io::Error::from)?;
            let mut fds = Vec::new();
            if let Ok(cmsgs) = msg.cmsgs() {
                for cmsg in cmsgs {
                    if let ControlMessageOwned::ScmRights(received) = cmsg {
                        fds.extend(received);
                    }
                }
            }
            Ok((msg.bytes, fds))
        });
        match read {
            Ok((0, _)) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok((n, fds)) => {
                got += n;
                for raw in fds {
                    // SAFETY: the kernel just installed this descriptor for us.
                    let owned = unsafe { OwnedFd::from_raw_fd(raw) };
                    fd.get_or_insert(owned);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok((read_payload(stream, head).await?, fd))
}

/// Sends one frame with `fd` attached.
async fn send_with_fd(stream: &UnixStream, payload: &[u8], fd: RawFd) -> std::io::Result<()> {
    let frame = frame(payload);
    let fds = [fd];
    let mut sent = 0;
    while sent < frame.len() {
        stream.writable().await?;
        let rights = [ControlMessage::ScmRights(&fds)];
        // The descriptor travels with the first bytes only.
        let cmsgs: &[ControlMessage] = if sent == 0 { &rights } else { &[] };
        match stream.try_io(Interest::WRITABLE, || {
            sendmsg::<()>(
                stream.as_raw_fd(),
                &[IoSlice::new(&frame[sent..])],
                cmsgs,
                MsgFlags::MSG_NOSIGNAL,
                None,
            )
            .map_err(std::io::Error::from)
        }) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads one frame's payload.
async fn read_frame(stream: &mut UnixStream) -> std::io::Result<Vec<u8>> {
    let mut head = [0u8; 4];
    stream.read_exact(&mut head).await?;
    read_payload(stream, head).await
}

/// Reads the payload of the frame whose length prefix is `head`.
async fn read_payload(stream: &mut UnixStream, head: [u8; 4]) -> std::io::Result<Vec<u8>> {
    let len = u32::from_be_bytes(head) as usize;
    if len > 1 << 20 {
        return Err(std::io::Error::other(format!("a {len}-byte frame")));
    }
    let mut payload = vec![0; len];
    stream.read_exact(&mut payload).await?;
    Ok(payload)
}

/// Waits for the forked child's `H` and returns its host pid, or the error it reports.
async fn hello(stream: &mut UnixStream) -> Result<u32, String> {
    loop {
        stream
            .readable()
            .await
            .map_err(|e| format!("waiting for the forked instance: {e}"))?;
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
            Ok((0, _)) => {
                return Err("the forked instance ended before it entered its sandbox".into())
            }
            Ok((_, pid)) if byte[0] == b'H' => {
                return pid
                    .filter(|p| *p > 0)
                    .map(|p| p as u32)
                    .ok_or_else(|| "the forked instance's pid is unknown".into())
            }
            Ok(_) if byte[0] == b'E' => {
                let mut message = Vec::new();
                let _ = tokio::time::timeout(
                    std::time::Duration::from_secs(1),
                    stream.read_to_end(&mut message),
                )
                .await;
                return Err(format!(
                    "the forked instance could not enter its sandbox: {}",
                    String::from_utf8_lossy(&message).trim()
                ));
            }
            Ok(_) => {
                return Err(format!(
                    "the forked instance sent {:?} instead of its greeting",
                    byte[0] as char
                ))
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(format!("reading from the forked instance: {e}")),
        }
    }
}
