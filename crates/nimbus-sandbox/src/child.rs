//! What a child the driver spawns (a worker's init, a restoring CRIU) does between fork
//! and exec.

use std::ffi::CString;
use std::os::fd::RawFd;

use crate::WORKER_SOCKET_FD;

/// In a forked child before exec: puts the socket `raw` on [`WORKER_SOCKET_FD`] and joins
/// the cgroups whose `cgroup.procs` files are `join` ("0" is the writer itself).
///
/// Async-signal-safe: only `fcntl`, `dup2`, `open`, `write` and `close`, on data prepared
/// before the fork.
///
/// # Safety
///
/// Only for a pre-exec hook: it replaces whatever descriptor is 3 in the calling process.
pub(crate) unsafe fn socket_and_cgroups(raw: RawFd, join: &[CString]) -> std::io::Result<()> {
    // SAFETY: plain system calls on descriptors and NUL-terminated paths this process owns.
    unsafe {
        if raw == WORKER_SOCKET_FD {
            // dup2 onto itself keeps FD_CLOEXEC set; clear it instead.
            if libc::fcntl(raw, libc::F_SETFD, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
        } else if libc::dup2(raw, WORKER_SOCKET_FD) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        for procs in join {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                return Err(std::io::Error::last_os_error());
            }
            libc::close(fd);
        }
    }
    Ok(())
}
