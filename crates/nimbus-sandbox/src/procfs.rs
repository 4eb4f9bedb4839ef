//! What the driver reads of host processes in `/proc`: thread counts, resident memory,
//! children, and pids as a sandbox's pid namespace sees them.

use std::fs::File;
use std::os::unix::fs::MetadataExt;

use crate::cgroup::CgroupSlot;

/// The thread count of the process whose `/proc/<pid>/task` directory is `tasks`: procfs
/// gives that directory two links plus one per thread, so one `fstat` tells it (no text to
/// format or parse). `None` once the process has ended.
pub(crate) fn thread_count(tasks: &File) -> Option<u64> {
    let links = tasks.metadata().ok()?.nlink();
    links.checked_sub(2).filter(|&n| n > 0)
}

/// Resident memory of host process `pid` (`VmRSS`), bytes.
pub(crate) fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Memory a sandbox holds: what is charged to its cgroup `slot`, or without one the
/// resident memory of its process `pid`.
pub(crate) fn sandbox_memory(slot: Option<&CgroupSlot>, pid: u32) -> Option<u64> {
    match slot {
        Some(slot) => slot.memory_bytes(),
        None => rss_bytes(pid),
    }
}

/// The first child of host process `pid` (the sandbox's PID 1, for the init).
pub(crate) fn first_child(pid: u32) -> Option<i32> {
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).ok()?;
    children.split_whitespace().next()?.parse().ok()
}

/// A host process's pid in the innermost pid namespace it belongs to (the last `NSpid`
/// field of its status): 1 for the sandbox's init, 2 for the worker.
pub(crate) fn pid_in_sandbox(pid: i32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("NSpid:"))?;
    line.split_whitespace().last()?.parse().ok()
}
