//! Idle worker memory: RSS and PSS of the workers' processes, read from /proc.

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
fn process_table() -> Vec<(u32, u32)> {
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
fn descendants(root: u32, table: &[(u32, u32)]) -> Vec<u32> {
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
    let pss: Vec<u64> = rss
        .iter()
        .filter_map(|&(pid, _)| proc_kib(&format!("/proc/{pid}/smaps_rollup"), "Pss:"))
        .collect();
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
    }
}
