//! Idle worker memory: RSS and PSS of the workers' processes, read from /proc, and the
//! processes of one function among them.

use std::collections::HashMap;

use serde::Serialize;

use super::load::contains;

/// Resident memory of the idle workers.
#[derive(Debug, Serialize)]
pub struct IdleMemory {
    /// How the processes were found.
    pub basis: String,
    /// Processes measured.
    pub processes: usize,
    /// Largest VmRSS, MiB.
    pub max_rss_mib: f64,
    /// Mean VmRSS, MiB.
    pub avg_rss_mib: f64,
    /// Mean proportional set size (shared pages split between sharers), MiB.
    pub avg_pss_mib: Option<f64>,
    /// Their pids.
    pub pids: Vec<u32>,
}

/// `(pid, ppid)` of every process.
pub(super) fn process_table() -> Vec<(u32, u32)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // `pid (comm) state ppid …`: comm may hold spaces and parentheses.
            let after = &stat[stat.rfind(')')? + 1..];
            let ppid = after.split_whitespace().nth(1)?.parse().ok()?;
            Some((pid, ppid))
        })
        .collect()
}

/// All descendants of `root`.
pub(super) fn descendants(root: u32, table: &[(u32, u32)]) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    for &(pid, ppid) in table {
        children.entry(ppid).or_default().push(pid);
    }
    let mut out = Vec::new();
    let mut stack = vec![root];
    while let Some(pid) = stack.pop() {
        for &child in children.get(&pid).map(Vec::as_slice).unwrap_or_default() {
            out.push(child);
            stack.push(child);
        }
    }
    out.sort_unstable();
    out
}

/// A `kB` field of a /proc file (`VmRSS:`, `Pss:`).
fn proc_kib(path: &str, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
}

/// PSS of a process, KiB.
pub(super) fn pss_kib(pid: u32) -> Option<u64> {
    proc_kib(&format!("/proc/{pid}/smaps_rollup"), "Pss:")
}

/// Resident memory of some processes.
#[derive(Debug, Serialize)]
pub struct ProcessMemory {
    /// Processes measured.
    pub processes: usize,
    /// Mean proportional set size (shared pages split between sharers), MiB.
    pub avg_pss_mib: f64,
    /// Largest PSS, MiB.
    pub max_pss_mib: f64,
    /// Mean VmRSS, MiB.
    pub avg_rss_mib: f64,
    /// Largest VmRSS, MiB.
    pub max_rss_mib: f64,
}

impl ProcessMemory {
    /// Of those of `pids` whose RSS and PSS can be read; `None` if none can.
    pub(super) fn of(pids: &[u32]) -> Option<Self> {
        let kib: Vec<(u64, u64)> = pids
            .iter()
            .filter_map(|&pid| {
                let rss = proc_kib(&format!("/proc/{pid}/status"), "VmRSS:")?;
                Some((rss, pss_kib(pid)?))
            })
            .collect();
        if kib.is_empty() {
            return None;
        }
        let n = kib.len() as f64;
        let mib = |kib: u64| kib as f64 / 1024.0;
        Some(ProcessMemory {
            processes: kib.len(),
            avg_pss_mib: mib(kib.iter().map(|k| k.1).sum()) / n,
            max_pss_mib: mib(kib.iter().map(|k| k.1).max().unwrap_or(0)),
            avg_rss_mib: mib(kib.iter().map(|k| k.0).sum()) / n,
            max_rss_mib: mib(kib.iter().map(|k| k.0).max().unwrap_or(0)),
        })
    }
}

/// A worker process of one function.
pub(super) struct FunctionProcess {
    pub(super) pid: u32,
    /// Its pids from the host's pid namespace inward (the `NSpid` of its status): a worker
    /// started cold in a sandbox is `[host, 2]` (its sandbox's PID 1 reaps for it), a
    /// template `[host, 1]` (it reaps its own children), an instance forked from a template
    /// `[host, n, 1]` (PID 1 of a namespace of its own, inside the template's); without
    /// isolation just `[host]`.
    pub(super) ns_pids: Vec<u32>,
    /// It holds a connection on fd 3: a worker, not a template's spare child (forked
    /// ahead, waiting for a request).
    pub(super) connected: bool,
    /// When it started, clock ticks after boot.
    pub(super) start_ticks: u64,
}

impl FunctionProcess {
    /// An instance forked from a template (its spare excluded).
    pub(super) fn is_forked_instance(&self) -> bool {
        self.ns_pids.len() == 3 && self.ns_pids[2] == 1 && self.connected
    }

    /// A template (isolated: PID 1 of its own namespace, one level in).
    pub(super) fn is_template(&self) -> bool {
        self.ns_pids.len() == 2 && self.ns_pids[1] == 1
    }
}

/// The workers of function `name` among `pids`: the processes with
/// `NIMBUS_FUNCTION_NAME=<name>` in their environment (workers started cold, templates,
/// and the instances forked from a template, which inherit its environment). Reading
/// another user's environment takes root.
pub(super) fn function_processes(pids: &[u32], name: &str) -> Vec<FunctionProcess> {
    let var = format!("NIMBUS_FUNCTION_NAME={name}");
    pids.iter()
        .filter(|&&pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|env| env.split(|&b| b == 0).any(|v| v == var.as_bytes()))
        })
        .filter_map(|&pid| {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
            let ns_pids = status
                .lines()
                .find_map(|l| l.strip_prefix("NSpid:"))?
                .split_whitespace()
                .map(str::parse)
                .collect::<Result<Vec<u32>, _>>()
                .ok()?;
            let connected = std::fs::read_link(format!("/proc/{pid}/fd/3"))
                .is_ok_and(|target| target.to_string_lossy().starts_with("socket:"));
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // After `(comm)`: state is field 3 of stat(5), starttime field 22.
            let after = &stat[stat.rfind(')')? + 1..];
            let start_ticks = after.split_whitespace().nth(19)?.parse().ok()?;
            Some(FunctionProcess {
                pid,
                ns_pids,
                connected,
                start_ticks,
            })
        })
        .collect()
}

/// Memory of the idle workers: the server's descendants, or (for an external server) the
/// processes running the Python worker bootstrap.
pub(super) fn idle_memory(server_pid: Option<u32>) -> Option<IdleMemory> {
    let table = process_table();
    let (basis, pids) = match server_pid {
        Some(pid) => (
            format!("descendants of server pid {pid}"),
            descendants(pid, &table),
        ),
        None => {
            let pids = table
                .iter()
                .map(|&(pid, _)| pid)
                .filter(|pid| {
                    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                        contains(&c, b"nimbus_boot.py") || contains(&c, b"nimbus_worker.py")
                    })
                })
                .collect();
            (
                "processes running the Nimbus Python worker".to_owned(),
                pids,
            )
        }
    };
    let rss: Vec<(u32, u64)> = pids
        .iter()
        .filter_map(|&pid| Some((pid, proc_kib(&format!("/proc/{pid}/status"), "VmRSS:")?)))
        .collect();
    if rss.is_empty() {
        return None;
    }
    let pss: Vec<u64> = rss.iter().filter_map(|&(pid, _)| pss_kib(pid)).collect();
    let mib = |kib: f64| kib / 1024.0;
    Some(IdleMemory {
        basis,
        processes: rss.len(),
        max_rss_mib: mib(rss.iter().map(|&(_, k)| k).max().unwrap_or(0) as f64),
        avg_rss_mib: mib(rss.iter().map(|&(_, k)| k as f64).sum::<f64>() / rss.len() as f64),
        avg_pss_mib: (pss.len() == rss.len())
            .then(|| mib(pss.iter().sum::<u64>() as f64 / pss.len() as f64)),
        pids: rss.iter().map(|&(pid, _)| pid).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descendants_follow_the_tree() {
        let table = [(1, 0), (10, 1), (11, 10), (12, 10), (13, 11), (20, 1)];
        assert_eq!(descendants(10, &table), [11, 12, 13]);
        assert!(descendants(13, &table).is_empty());
    }

    #[test]
    fn this_process_is_found_with_its_memory() {
        let table = process_table();
        let me = std::process::id();
        assert!(table.iter().any(|&(pid, _)| pid == me));
        assert!(proc_kib(&format!("/proc/{me}/status"), "VmRSS:").unwrap() > 0);
        let memory = ProcessMemory::of(&[me]).unwrap();
        assert_eq!(memory.processes, 1);
        assert!(memory.avg_pss_mib > 0.0 && memory.avg_pss_mib <= memory.max_rss_mib);
    }

    #[test]
    fn function_processes_are_found_by_their_environment() {
        let me = std::process::id();
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .env("NIMBUS_FUNCTION_NAME", "bench-env-test")
            .spawn()
            .unwrap();
        // The spawn returns while the exec may still be setting up the new environment.
        let cmdline = format!("/proc/{}/cmdline", child.id());
        for _ in 0..100 {
            if std::fs::read(&cmdline).is_ok_and(|c| !c.is_empty()) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let found = function_processes(&[me, child.id()], "bench-env-test");
        let prefix_only = function_processes(&[child.id()], "bench-env");
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].pid, child.id());
        assert!(!found[0].ns_pids.is_empty() && found[0].start_ticks > 0);
        assert!(prefix_only.is_empty());
    }
}
