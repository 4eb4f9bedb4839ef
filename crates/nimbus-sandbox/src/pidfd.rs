//! Sandboxes watched through a pidfd: processes the server did not spawn itself.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use async_trait::async_trait;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use crate::cgroup::CgroupSlot;
use crate::{ExitInfo, Sandbox};

/// A pidfd of process `pid`.
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

/// A sandbox whose main process the server did not spawn itself (an instance forked from
/// a template, a template restored from a checkpoint), watched through a pidfd, which
/// tells that it ended and (on recent kernels) how.
#[derive(Debug)]
pub(crate) struct PidfdSandbox {
    pid: u32,
    pidfd: AsyncFd<OwnedFd>,
    slot: Option<CgroupSlot>,
    /// Tasks charged to the slot before the sandbox started, less those reaped since.
    residue: u64,
    /// Its `/proc/<pid>/task`: its thread count tells its own tasks from processes an
    /// invocation left running.
    tasks: Option<std::fs::File>,
    exit: Option<ExitInfo>,
    /// The outbound link's reservation, if any (held open with the sandbox).
    _reservation: Option<std::fs::File>,
    /// The server is its parent (a restore made it so) and must reap it.
    reap: bool,
}

impl PidfdSandbox {
    /// Watches process `pid` (which must still run: its pid is only named once here).
    pub(crate) fn watch(
        pid: u32,
        slot: Option<CgroupSlot>,
        residue: u64,
        reservation: Option<std::fs::File>,
        reap: bool,
    ) -> std::io::Result<PidfdSandbox> {
        let pidfd = pidfd_open(pid)?;
        let tasks = std::fs::File::open(format!("/proc/{pid}/task")).ok();
        // SAFETY: an OwnedFd keeps its descriptor open and unchanged until it drops, with
        // the AsyncFd that owns it.
        let pidfd = unsafe { AsyncFd::register_with_interest(pidfd, Interest::READABLE) }
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok(PidfdSandbox {
            pid,
            pidfd,
            slot,
            residue,
            tasks,
            exit: None,
            _reservation: reservation,
            reap,
        })
    }

    /// The same, with the cgroup slot it was moved into (holding `residue` tasks of an
    /// earlier occupant) and its link reservation.
    pub(crate) fn with(
        mut self,
        slot: Option<CgroupSlot>,
        residue: u64,
        reservation: Option<std::fs::File>,
    ) -> PidfdSandbox {
        self.slot = slot;
        self.residue = residue;
        self._reservation = reservation;
        self
    }

    /// Records how it ended: the wait status when the kernel kept it for the pidfd
    /// (`PIDFD_GET_INFO`, Linux 6.15+, once its reaper has reaped it), and the cgroup's OOM
    /// count.
    fn ended(&mut self) -> ExitInfo {
        if self.reap && self.exit.is_none() {
            // SAFETY: siginfo_t is a plain C struct for which all zero bytes are valid.
            let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
            // SAFETY: waitid on a pidfd this sandbox owns, of an ended child, not blocking.
            unsafe {
                libc::waitid(
                    libc::P_PIDFD,
                    self.pidfd.as_raw_fd() as libc::id_t,
                    &mut info,
                    libc::WEXITED | libc::WNOHANG,
                );
            }
        }
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
impl Sandbox for PidfdSandbox {
    fn pid(&self) -> u32 {
        self.pid
    }

    fn resident_bytes(&self) -> Option<u64> {
        crate::procfs::sandbox_memory(self.slot.as_ref(), self.pid)
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
        // Its own threads (the handler may have started some) and an earlier occupant's
        // leftovers: nothing else to look at. Its thread count first, then the group's, so
        // a thread born in between costs only a listing.
        let threads = self.tasks.as_ref().and_then(crate::procfs::thread_count);
        if let (Some(threads), Some(tasks)) = (threads, slot.task_count()) {
            let expected = threads + self.residue;
            if tasks <= expected {
                self.residue = self.residue.saturating_sub(expected - tasks);
                return;
            }
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

impl Drop for PidfdSandbox {
    fn drop(&mut self) {
        self.signal_kill();
        // Its own child (a restored template) must be reaped once it is gone, or it stays
        // a zombie; waiting for that, like emptying the slot, blocks.
        let reap = match (
            self.reap && self.exit.is_none(),
            self.pidfd.get_ref().try_clone(),
        ) {
            (true, Ok(pidfd)) => Some(pidfd),
            _ => None,
        };
        let slot = self.slot.take();
        let finish = move || {
            if let Some(pidfd) = reap {
                // SAFETY: siginfo_t is a plain C struct for which all zero bytes are valid.
                let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
                // SAFETY: waitid on an owned pidfd of a child this process started.
                unsafe {
                    libc::waitid(
                        libc::P_PIDFD,
                        pidfd.as_raw_fd() as libc::id_t,
                        &mut info,
                        libc::WEXITED,
                    );
                }
            }
            drop(slot);
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn_blocking(finish)),
            Err(_) => finish(),
        }
    }
}
