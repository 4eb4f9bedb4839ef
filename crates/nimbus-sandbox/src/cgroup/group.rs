//! One cgroup directory, whichever the interface: creating, killing what runs in it,
//! removing, and reading and writing its files.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::interface::CgroupVersion;

/// How long killing a group's processes may take before the group is given up on.
pub(super) const KILL_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest pause between two checks that a killed group has emptied.
const KILL_MAX_PAUSE: Duration = Duration::from_millis(10);

/// Creates the groups of a new slot, one per hierarchy; none if one fails.
pub(super) fn create_groups(dirs: &[PathBuf]) -> io::Result<()> {
    for (i, dir) in dirs.iter().enumerate() {
        if let Err(e) = fs::create_dir(dir) {
            for made in &dirs[..i] {
                let _ = fs::remove_dir(made);
            }
            let hint = if e.kind() == io::ErrorKind::AlreadyExists {
                " (a leftover of a previous run? call clean_leftovers at start)"
            } else {
                ""
            };
            return Err(io::Error::new(
                e.kind(),
                format!("creating {}: {e}{hint}", dir.display()),
            ));
        }
    }
    Ok(())
}

/// Creates a parent group; it may exist from a previous run.
pub(super) fn create_group(dir: &Path) -> io::Result<()> {
    match fs::create_dir(dir) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => Err(io::Error::new(
            e.kind(),
            format!("creating {}: {e}", dir.display()),
        )),
        _ => Ok(()),
    }
}

/// Kills the processes of `dir` and of every group below it, and removes them all.
pub(super) fn remove_tree(dir: &Path, version: CgroupVersion) -> io::Result<()> {
    for child in subdirs(dir)? {
        remove_tree(&child, version)?;
    }
    if !kill_procs(dir, version) {
        return Err(io::Error::other(format!(
            "{}: processes still there {} s after SIGKILL",
            dir.display(),
            KILL_TIMEOUT.as_secs()
        )));
    }
    fs::remove_dir(dir).map_err(at(dir))
}

/// The groups directly below `dir`.
pub(super) fn subdirs(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut dirs = Vec::new();
    for entry in fs::read_dir(dir).map_err(at(dir))? {
        let entry = entry.map_err(at(dir))?;
        if entry.file_type().map_err(at(dir))?.is_dir() {
            dirs.push(entry.path());
        }
    }
    Ok(dirs)
}

/// SIGKILLs the processes of one group until it is empty; false if it is not within
/// `KILL_TIMEOUT`. A missing group counts as empty.
pub(super) fn kill_procs(dir: &Path, version: CgroupVersion) -> bool {
    let deadline = Instant::now() + KILL_TIMEOUT;
    let mut pause = Duration::from_micros(100);
    let kill_file = dir.join("cgroup.kill");
    loop {
        let pids = read_pids(dir);
        if pids.is_empty() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        // cgroup.kill (v2, Linux 5.14+) also gets processes forked while it runs. Otherwise
        // rounds of kill(2) catch those; a pid could in theory be reused between reading and
        // killing, but only if the process died and was reaped in that instant.
        let killed_by_kernel = version == CgroupVersion::V2 && write_file(&kill_file, "1").is_ok();
        if !killed_by_kernel {
            for pid in pids {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(KILL_MAX_PAUSE);
    }
}

/// The pids in group `dir` (none if it cannot be read).
pub(super) fn read_pids(dir: &Path) -> Vec<i32> {
    fs::read_to_string(dir.join("cgroup.procs"))
        .map(|text| text.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

/// The value of `key` in a flat-keyed file such as memory.events ("key value" lines).
pub(super) fn read_key(path: &Path, key: &str) -> Option<u64> {
    let text = fs::read_to_string(path).ok()?;
    text.lines().find_map(|line| {
        let (k, v) = line.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

/// The content of a cgroup file.
pub(super) fn read_file(path: &Path) -> io::Result<String> {
    fs::read_to_string(path).map_err(at(path))
}

/// Writes a cgroup file (without creating or truncating: cgroupfs files exist or not).
pub(super) fn write_file(path: &Path, value: &str) -> io::Result<()> {
    OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|mut f| f.write_all(value.as_bytes()))
        .map_err(at(path))
}

/// Adds the path to an error, keeping its kind.
pub(super) fn at(path: &Path) -> impl FnOnce(io::Error) -> io::Error + '_ {
    move |e| io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}
