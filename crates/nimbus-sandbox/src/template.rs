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
use std::sync::Arc;

use async_trait::async_trait;
use nix::sys::socket::{
    recvmsg, sendmsg, setsockopt, sockopt, ControlMessage, ControlMessageOwned, MsgFlags,
};
use serde::Deserialize;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::UnixStream;

use crate::cgroup::CgroupSlot;
use crate::isolation::Isolation;
use crate::network::{self, OutboundSpec};
use crate::{DriverError, ExitInfo, LaunchSpec, Launched, Sandbox};

/// A template ready to start instances.
#[async_trait]
pub trait Template: Send + Sync + fmt::Debug {
    /// Starts a new instance from the template, in a sandbox of its own with the limits and
    /// network of the template's launch spec. The worker answers the runtime's handshake
    /// next.
    async fn spawn(&self, instance_id: &str) -> Result<Launched, DriverError>;
    /// Whether the template still runs.
    fn alive(&self) -> bool;
    /// Memory the template holds resident, bytes (what keeping it costs).
    fn resident_bytes(&self) -> Option<u64>;
}

/// A process-driver template: the template's connection and its sandbox.
#[derive(Debug)]
pub(crate) struct ProcessTemplate {
    control: tokio::sync::Mutex<UnixStream>,
    sandbox: std::sync::Mutex<Box<dyn Sandbox>>,
    isolation: Option<Arc<Isolation>>,
    memory_mb: u32,
    /// What each instance's link needs, for an outbound function.
    outbound: Option<OutboundSpec>,
}

impl ProcessTemplate {
    pub(crate) fn new(
        spec: &LaunchSpec,
        launched: Launched,
        isolation: Option<Arc<Isolation>>,
    ) -> Result<Self, String> {
        let outbound = match &isolation {
            Some(isolation) => isolation.outbound(spec.network)?,
            None => None,
        };
        Ok(ProcessTemplate {
            control: tokio::sync::Mutex::new(launched.stream),
            sandbox: std::sync::Mutex::new(launched.sandbox),
            isolation,
            memory_mb: spec.memory_mb,
            outbound,
        })
    }
}

#[derive(Deserialize)]
struct Forked {
    ok: bool,
    #[serde(default)]
    error: Option<String>,
}

#[async_trait]
impl Template for ProcessTemplate {
    async fn spawn(&self, instance_id: &str) -> Result<Launched, DriverError> {
        let fail = |message: String| DriverError {
            instance_id: instance_id.to_owned(),
            message,
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
            send_with_fd(&control, &request, worker.as_raw_fd())
                .await
                .map_err(|e| fail(format!("sending the fork request to the template: {e}")))?;
            drop(worker);
            let reply = read_frame(&mut control)
                .await
                .map_err(|e| fail(format!("the template did not answer the fork: {e}")))?;
            let reply: Forked = serde_json::from_slice(&reply)
                .map_err(|e| fail(format!("the template's answer: {e}")))?;
            if !reply.ok {
                return Err(fail(format!(
                    "the template could not fork: {}",
                    reply.error.unwrap_or_default()
                )));
            }
        }
        let mut stream = UnixStream::from_std(host).map_err(|e| fail(format!("socket: {e}")))?;
        let pid = hello(&mut stream).await.map_err(fail)?;
        let pidfd = pidfd_open(pid).map_err(|e| fail(format!("pidfd_open({pid}): {e}")))?;
        let residue = slot.as_ref().and_then(CgroupSlot::task_count).unwrap_or(0);
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
        // SAFETY: an OwnedFd keeps its descriptor open and unchanged until it drops, with the
        // AsyncFd that owns it.
        let pidfd = unsafe { AsyncFd::register_with_interest(pidfd, Interest::READABLE) }
            .map_err(|e| fail(format!("pidfd: {e}")))?;
        Ok(Launched {
            stream,
            sandbox: Box::new(ForkedSandbox {
                pid,
                pidfd,
                slot,
                residue,
                exit: None,
                _reservation: reservation,
            }),
        })
    }

    fn alive(&self) -> bool {
        self.sandbox
            .lock()
            .expect("template lock")
            .try_exit()
            .is_none()
    }

    fn resident_bytes(&self) -> Option<u64> {
        let pid = self.sandbox.lock().expect("template lock").pid();
        // Isolated, the sandbox's pid is its init's: the worker is PID 1's first child.
        let worker = match self.isolation {
            Some(_) => crate::process::first_child(pid)
                .and_then(|pid1| crate::process::first_child(pid1 as u32))?
                as u32,
            None => pid,
        };
        let status = std::fs::read_to_string(format!("/proc/{worker}/status")).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    }
}

/// Sends one frame with `fd` attached.
async fn send_with_fd(stream: &UnixStream, payload: &[u8], fd: RawFd) -> std::io::Result<()> {
    let mut frame = Vec::with_capacity(payload.len() + 4);
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    frame.extend_from_slice(payload);
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

fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// `struct pidfd_info` of `<linux/pidfd.h>` (first version, 64 bytes).
#[repr(C)]
#[derive(Default)]
struct PidfdInfo {
    mask: u64,
    cgroupid: u64,
    ids: [u32; 11],
    exit_code: i32,
}

/// `PIDFD_GET_INFO`: `_IOWR(0xFF, 11, struct pidfd_info)`.
const PIDFD_GET_INFO: libc::c_ulong =
    (3 << 30) | ((std::mem::size_of::<PidfdInfo>() as libc::c_ulong) << 16) | (0xFF << 8) | 11;
/// `PIDFD_INFO_EXIT`: ask for the exit status.
const PIDFD_INFO_EXIT: u64 = 1 << 3;

/// The wait status of the ended process of `pidfd`, if the kernel can tell.
fn exit_status(pidfd: &AsyncFd<OwnedFd>) -> Option<i32> {
    let mut info = PidfdInfo {
        mask: PIDFD_INFO_EXIT,
        ..PidfdInfo::default()
    };
    // SAFETY: the ioctl fills a struct of the size its number encodes, which `info` is.
    let ok = unsafe { libc::ioctl(pidfd.as_raw_fd(), PIDFD_GET_INFO, &mut info) } == 0;
    (ok && info.mask & PIDFD_INFO_EXIT != 0).then_some(info.exit_code)
}

/// An instance forked from a template. Not a child of the server: it is watched through a
/// pidfd, which tells that it ended and (on recent kernels) how.
#[derive(Debug)]
struct ForkedSandbox {
    pid: u32,
    pidfd: AsyncFd<OwnedFd>,
    slot: Option<CgroupSlot>,
    residue: u64,
    exit: Option<ExitInfo>,
    /// The outbound link's reservation, if any.
    _reservation: Option<std::fs::File>,
}

impl ForkedSandbox {
    /// Records how it ended: the wait status when the kernel kept it for the pidfd
    /// (`PIDFD_GET_INFO`, Linux 6.15+, once its reaper has reaped it), and the cgroup's OOM
    /// count.
    fn ended(&mut self) -> ExitInfo {
        let status = exit_status(&self.pidfd);
        *self.exit.get_or_insert_with(|| ExitInfo {
            code: status.and_then(|s| libc::WIFEXITED(s).then(|| libc::WEXITSTATUS(s))),
            signal: status.and_then(|s| libc::WIFSIGNALED(s).then(|| libc::WTERMSIG(s))),
            out_of_memory: self.slot.as_ref().is_some_and(CgroupSlot::oom_killed),
        })
    }

    fn signal_kill(&self) {
        // SAFETY: pidfd_send_signal on a descriptor this sandbox owns; the pidfd names this
        // process even if its pid is reused after it ends.
        unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.pidfd.as_raw_fd(),
                libc::SIGKILL,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            );
        }
    }
}

#[async_trait]
impl Sandbox for ForkedSandbox {
    fn pid(&self) -> u32 {
        self.pid
    }

    fn kill(&mut self) {
        // PID 1 of its namespace (isolated): everything it started dies with it; the slot,
        // emptied when the sandbox drops, holds anything else.
        self.signal_kill();
    }

    fn try_exit(&mut self) -> Option<ExitInfo> {
        if self.exit.is_none() {
            let mut poll = [libc::pollfd {
                fd: self.pidfd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            }];
            // SAFETY: poll on one valid descriptor without waiting.
            let ready = unsafe { libc::poll(poll.as_mut_ptr(), 1, 0) };
            if ready > 0 {
                self.ended();
            }
        }
        self.exit
    }

    fn end_strays(&mut self) {
        let Some(slot) = &self.slot else { return };
        if slot.task_count().is_some_and(|n| n <= 1 + self.residue) {
            return;
        }
        for pid in slot.pids() {
            if pid as u32 != self.pid {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }

    async fn wait(&mut self) -> ExitInfo {
        if let Some(exit) = self.exit {
            return exit;
        }
        // A pidfd turns readable when its process ends; its status is known once its reaper
        // (the template's PID 1) has reaped it, a moment later.
        let _ = self.pidfd.readable().await;
        for _ in 0..20 {
            if exit_status(&self.pidfd).is_some() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        self.ended()
    }
}

impl Drop for ForkedSandbox {
    fn drop(&mut self) {
        self.signal_kill();
        if let Some(slot) = self.slot.take() {
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => drop(runtime.spawn_blocking(move || drop(slot))),
                Err(_) => drop(slot),
            }
        }
    }
}
