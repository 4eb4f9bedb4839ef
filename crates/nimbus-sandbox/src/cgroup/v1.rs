//! cgroup v1: one hierarchy per controller (found from the mount table; cpu may be
//! co-mounted as cpu,cpuacct), our parent group at the root of each.
//!
//! The module also mounts a controller-less named hierarchy, `name=nimbus`, with the
//! `favordynmods` option at `/run/nimbus/cgroup`, shared by every Nimbus server of the host
//! (each has its parent group in it) and left mounted like systemd's own. The option is a
//! global switch for the kernel's cgroup_threadgroup_rwsem: without it, moving a process
//! into a cgroup after ~100 ms without any move waits for an RCU grace period (8–15 ms
//! measured on this machine, on the cold-start path); with it the move stays well under a
//! millisecond, at the price of a slightly slower fork and exit system-wide. (Since Linux
//! 6.18 the first favordynmods mount also moves cgroup.procs writes to a per-process lock
//! until reboot; before, the effect lasts while the hierarchy exists.) That hierarchy also
//! holds every process of an instance in the slot's group there, whichever controllers
//! exist, so killing and cleaning up can rely on it.

use std::ffi::CString;
use std::fs::{self, File};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::group::{create_group, read_file, write_file};
use super::interface::{CgroupVersion, Controller, Hierarchy, Interface, MemoryFiles, CONTROLLERS};
use super::limits::Limits;
use super::mounts::Mount;

/// Name of the tracking hierarchy.
const TRACKER_NAME: &str = "nimbus";
/// Where the tracking hierarchy is mounted unless it is mounted already.
const TRACKER_MOUNT: &str = "/run/nimbus/cgroup";

/// Why cgroup v1 cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("cgroup v1: {0}")]
pub struct V1Unavailable(#[source] Problem);

/// What is wrong with the v1 hierarchies.
#[derive(Debug, thiserror::Error)]
pub(super) enum Problem {
    /// Controllers we need have no hierarchy.
    #[error(
        "no hierarchy with the {} controller{} mounted",
        .0.join(", "),
        if .0.len() > 1 { "s" } else { "" }
    )]
    Missing(Vec<&'static str>),
    /// Our parent group could not be created.
    #[error("{0}")]
    Create(#[source] io::Error),
}

/// The v1 interface.
#[derive(Debug)]
pub(super) struct V1 {
    /// The tracking hierarchy, if it could be had.
    tracker: Option<Tracker>,
}

/// The named hierarchy that tracks every process of an instance.
#[derive(Debug)]
struct Tracker {
    /// Where it is mounted.
    mount_point: PathBuf,
    /// Whether it is mounted with `favordynmods` (fast attach).
    favordynmods: bool,
}

/// Finds a hierarchy for each of memory, cpu and pids, creates our parent group `name` in
/// each and in the tracking hierarchy (mounted if need be; without it if that fails, with
/// a warning); returns the hierarchies in join order, the tracking one first.
pub(super) fn open(name: &str, mounts: &[Mount]) -> Result<(V1, Vec<Hierarchy>), V1Unavailable> {
    let controller_mounts = controller_mounts(mounts).map_err(V1Unavailable)?;
    let create =
        |parent: &Path| create_group(parent).map_err(|e| V1Unavailable(Problem::Create(e)));
    let mut hierarchies = Vec::new();
    for (mount_point, controllers) in controller_mounts {
        let parent = mount_point.join(name);
        create(&parent)?;
        hierarchies.push(Hierarchy {
            parent,
            controllers,
        });
    }
    let tracker = open_tracker(mounts);
    if let Some(tracker) = &tracker {
        let parent = tracker.mount_point.join(name);
        create(&parent)?;
        // First: see `Cgroups::hierarchies`.
        hierarchies.insert(
            0,
            Hierarchy {
                parent,
                controllers: Vec::new(),
            },
        );
    }
    Ok((V1 { tracker }, hierarchies))
}

/// The mount point of the hierarchy of each controller, merged where co-mounted, in the
/// order memory, cpu, pids.
pub(super) fn controller_mounts(
    mounts: &[Mount],
) -> Result<Vec<(PathBuf, Vec<Controller>)>, Problem> {
    let mut found: Vec<(PathBuf, Vec<Controller>)> = Vec::new();
    let mut missing = Vec::new();
    for controller in CONTROLLERS {
        let mut candidates = mounts
            .iter()
            .filter(|m| m.fs_type == "cgroup" && m.has_option(controller.name()));
        // Prefer a mount of the hierarchy's root over a bind mount of a group inside it.
        let best = candidates
            .clone()
            .find(|m| m.root == "/")
            .or_else(|| candidates.next());
        match best {
            Some(m) => match found.iter_mut().find(|(p, _)| *p == m.mount_point) {
                Some((_, controllers)) => controllers.push(controller),
                None => found.push((m.mount_point.clone(), vec![controller])),
            },
            None => missing.push(controller.name()),
        }
    }
    if missing.is_empty() {
        Ok(found)
    } else {
        Err(Problem::Missing(missing))
    }
}

impl Interface for V1 {
    fn version(&self) -> CgroupVersion {
        CgroupVersion::V1
    }

    fn limit(&self, controller: Controller, dir: &Path, limits: &Limits) -> io::Result<()> {
        match controller {
            Controller::Memory => set_memory(dir, limits.memory_bytes),
            Controller::Cpu => {
                let shares = cpu_shares(limits.cpu_weight);
                write_file(&dir.join("cpu.shares"), &shares.to_string())
            }
            Controller::Pids => write_file(&dir.join("pids.max"), &limits.pids_max.to_string()),
        }
    }

    fn memory_files(&self, dir: &Path, _fresh: bool) -> io::Result<MemoryFiles> {
        let max_usage = dir.join("memory.max_usage_in_bytes");
        // Writing resets the peak to the current use.
        write_file(&max_usage, "0")?;
        Ok(MemoryFiles {
            oom: dir.join("memory.oom_control"),
            peak: File::open(&max_usage).ok(),
            usage: dir.join("memory.usage_in_bytes"),
        })
    }

    fn tracking(&self) -> &'static str {
        match &self.tracker {
            Some(t) if t.favordynmods => "favordynmods",
            _ => "without favordynmods: slow attach",
        }
    }
}

/// The shared `name=nimbus` hierarchy: reused wherever it is mounted, else mounted at
/// [`TRACKER_MOUNT`] with `favordynmods`.
fn open_tracker(mounts: &[Mount]) -> Option<Tracker> {
    let name_option = format!("name={TRACKER_NAME}");
    if let Some(m) = mounts
        .iter()
        .find(|m| m.fs_type == "cgroup" && m.has_option(&name_option))
    {
        let favordynmods = m.has_option("favordynmods");
        if !favordynmods {
            tracing::warn!(
                "cgroup v1 hierarchy {TRACKER_NAME} at {} is mounted without favordynmods: \
                 attaching processes to cgroups may take 10+ ms",
                m.mount_point.display()
            );
        }
        return Some(Tracker {
            mount_point: m.mount_point.clone(),
            favordynmods,
        });
    }
    let mount_point = PathBuf::from(TRACKER_MOUNT);
    match mount_named_hierarchy(&mount_point) {
        Ok(()) => Some(Tracker {
            mount_point,
            favordynmods: true,
        }),
        Err(e) => {
            tracing::warn!(
                "cannot mount cgroup v1 hierarchy {TRACKER_NAME} with favordynmods at {}: {e}; \
                 going on without it (attaching processes to cgroups may take 10+ ms)",
                mount_point.display()
            );
            None
        }
    }
}

/// Mounts the tracking hierarchy on `dir`, with `favordynmods`.
fn mount_named_hierarchy(dir: &Path) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    let target = CString::new(dir.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let options =
        CString::new(format!("none,name={TRACKER_NAME},favordynmods")).map_err(io::Error::other)?;
    // SAFETY: all pointers are valid NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            c"cgroup".as_ptr(),
            target.as_ptr(),
            c"cgroup".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            options.as_ptr().cast(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// cpu.shares for a v2 weight: 100 (default) is 1024. Weight ≥ 1 gives ≥ 10, above the
/// kernel's minimum of 2.
fn cpu_shares(weight: u32) -> u64 {
    u64::from(weight) * 1024 / 100
}

/// Sets limit_in_bytes and, when swap is accounted, memsw.limit_in_bytes to the same value,
/// so nothing is swapped beyond the limit.
fn set_memory(dir: &Path, bytes: u64) -> io::Result<()> {
    let limit = dir.join("memory.limit_in_bytes");
    let memsw = dir.join("memory.memsw.limit_in_bytes");
    let value = bytes.to_string();
    if memsw.exists() {
        // The kernel refuses memsw < limit at every step: raise memsw first, lower it last.
        let current: u64 = read_file(&limit)?
            .trim()
            .parse()
            .map_err(io::Error::other)?;
        if bytes > current {
            write_file(&memsw, &value)?;
            write_file(&limit, &value)?;
        } else {
            write_file(&limit, &value)?;
            write_file(&memsw, &value)?;
        }
    } else {
        write_file(&limit, &value)?;
    }
    // Fails on the root group and on some kernels: only a preference.
    let _ = write_file(&dir.join("memory.swappiness"), "0");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::mounts::{parse_mountinfo, HYBRID};
    use super::*;

    #[test]
    fn finds_v1_controllers_preferring_hierarchy_roots() {
        let found = controller_mounts(&parse_mountinfo(HYBRID)).unwrap();
        assert_eq!(
            found,
            vec![
                ("/sys/fs/cgroup/memory".into(), vec![Controller::Memory]),
                ("/sys/fs/cgroup/cpu,cpuacct".into(), vec![Controller::Cpu]),
                ("/sys/fs/cgroup/pids".into(), vec![Controller::Pids]),
            ]
        );
    }

    #[test]
    fn merges_co_mounted_v1_controllers_and_names_missing_ones() {
        let co_mounted = "1 0 0:1 / /cg/mc rw - cgroup cgroup rw,memory,cpu\n";
        assert_eq!(
            controller_mounts(&parse_mountinfo(co_mounted))
                .unwrap_err()
                .to_string(),
            "no hierarchy with the pids controller mounted"
        );
        let all = format!("{co_mounted}2 0 0:2 / /cg/pids rw - cgroup cgroup rw,pids\n");
        assert_eq!(
            controller_mounts(&parse_mountinfo(&all)).unwrap(),
            vec![
                ("/cg/mc".into(), vec![Controller::Memory, Controller::Cpu]),
                ("/cg/pids".into(), vec![Controller::Pids]),
            ]
        );
        let v2_only = "1 0 0:1 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            controller_mounts(&parse_mountinfo(v2_only))
                .unwrap_err()
                .to_string(),
            "no hierarchy with the memory, cpu, pids controllers mounted"
        );
    }

    #[test]
    fn cpu_weight_maps_to_v1_shares() {
        assert_eq!(cpu_shares(100), 1024);
        assert_eq!(cpu_shares(1), 10);
        assert_eq!(cpu_shares(10_000), 102_400);
    }
}
