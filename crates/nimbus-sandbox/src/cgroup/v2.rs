//! cgroup v2, the unified hierarchy: one group per slot under our parent group at the root
//! of the cgroup2 mount, with memory, cpu and pids enabled for the parent's subtree.
//!
//! No tracking hierarchy here: the unified one already holds every process, and attaching
//! fast there would take `CLONE_INTO_CGROUP` or a remount of cgroup2 with `favordynmods`,
//! both outside this module.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use super::group::{create_group, write_file};
use super::interface::{CgroupVersion, Controller, Hierarchy, Interface, MemoryFiles, CONTROLLERS};
use super::limits::Limits;
use super::mounts::Mount;

/// The controllers a parent group enables for its children.
const ENABLE: &str = "+memory +cpu +pids";

/// Why cgroup v2 cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("cgroup v2: {0}")]
pub struct V2Unavailable(#[source] Problem);

/// What is wrong with a cgroup2 mount (the last one tried).
#[derive(Debug, thiserror::Error)]
pub(super) enum Problem {
    /// There is none.
    #[error("no cgroup2 mount")]
    NoMount,
    /// Its controllers could not be read.
    #[error("reading {}/cgroup.controllers: {source}", mount.display())]
    Controllers {
        /// The mount point.
        mount: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Controllers we need are not available there.
    #[error("controllers {missing} not available at {} (available: {available})", mount.display())]
    Missing {
        /// Those missing, `, `-separated.
        missing: String,
        /// The mount point.
        mount: PathBuf,
        /// Those available, space-separated, or `none`.
        available: String,
    },
    /// The controllers could not be enabled for our subtree.
    #[error("enabling {ENABLE}: {0}")]
    Enable(#[source] io::Error),
    /// Our parent group could not be created.
    #[error("{0}")]
    Create(#[source] io::Error),
}

/// The v2 interface.
#[derive(Debug)]
pub(super) struct V2;

/// Finds a cgroup2 mount where our parent group `name` can have memory, cpu and pids;
/// returns its one hierarchy.
pub(super) fn open(name: &str, mounts: &[Mount]) -> Result<Vec<Hierarchy>, V2Unavailable> {
    let mut problem = Problem::NoMount;
    for mount in mounts.iter().filter(|m| m.fs_type == "cgroup2") {
        match prepare_parent(&mount.mount_point, name) {
            Ok(parent) => {
                return Ok(vec![Hierarchy {
                    parent,
                    controllers: CONTROLLERS.to_vec(),
                }])
            }
            Err(p) => problem = p,
        }
    }
    Err(V2Unavailable(problem))
}

/// Enables memory, cpu and pids for `<mount>/<name>` and its children; returns the parent.
pub(super) fn prepare_parent(mount: &Path, name: &str) -> Result<PathBuf, Problem> {
    let available = fs::read_to_string(mount.join("cgroup.controllers")).map_err(|source| {
        Problem::Controllers {
            mount: mount.to_path_buf(),
            source,
        }
    })?;
    let available: Vec<&str> = available.split_whitespace().collect();
    let missing: Vec<&str> = CONTROLLERS
        .iter()
        .map(|c| c.name())
        .filter(|c| !available.contains(c))
        .collect();
    if !missing.is_empty() {
        return Err(Problem::Missing {
            missing: missing.join(", "),
            mount: mount.to_path_buf(),
            available: if available.is_empty() {
                "none".to_string()
            } else {
                available.join(" ")
            },
        });
    }
    let parent = mount.join(name);
    // The mount root is the hierarchy root (exempt from the no-internal-processes rule) on a
    // host; inside a cgroup namespace it may hold our own processes, and enabling fails there.
    write_file(&mount.join("cgroup.subtree_control"), ENABLE).map_err(Problem::Enable)?;
    create_group(&parent).map_err(Problem::Create)?;
    write_file(&parent.join("cgroup.subtree_control"), ENABLE).map_err(Problem::Enable)?;
    Ok(parent)
}

impl Interface for V2 {
    fn version(&self) -> CgroupVersion {
        CgroupVersion::V2
    }

    fn limit(&self, controller: Controller, dir: &Path, limits: &Limits) -> io::Result<()> {
        match controller {
            Controller::Memory => {
                write_file(&dir.join("memory.max"), &limits.memory_bytes.to_string())?;
                let swap = dir.join("memory.swap.max");
                if swap.exists() {
                    write_file(&swap, "0")?;
                }
                Ok(())
            }
            Controller::Cpu => write_file(&dir.join("cpu.weight"), &limits.cpu_weight.to_string()),
            Controller::Pids => write_file(&dir.join("pids.max"), &limits.pids_max.to_string()),
        }
    }

    fn memory_files(&self, dir: &Path, fresh: bool) -> io::Result<MemoryFiles> {
        Ok(MemoryFiles {
            oom: dir.join("memory.events"),
            peak: open_peak(dir, fresh),
            usage: dir.join("memory.current"),
        })
    }
}

/// memory.peak opened so that it reports the peak since now, if the kernel allows.
fn open_peak(dir: &Path, fresh: bool) -> Option<File> {
    let path = dir.join("memory.peak");
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .or_else(|_| File::open(&path))
        .ok()?;
    // Since Linux 6.12 a write resets the peak seen through this descriptor. Before, the
    // peak covers the group's whole life, which is "since acquire" only for a new group.
    (file.write_all(b"reset\n").is_ok() || fresh).then_some(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cgroup2_mount_without_the_controllers_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("cgroup.controllers"), "hugetlb cpu\n").unwrap();
        let problem = prepare_parent(dir.path(), "nimbus").unwrap_err();
        assert_eq!(
            problem.to_string(),
            format!(
                "controllers memory, pids not available at {} (available: hugetlb cpu)",
                dir.path().display()
            )
        );
        // Nothing was created or enabled.
        assert!(!dir.path().join("nimbus").exists());
        assert!(!dir.path().join("cgroup.subtree_control").exists());
    }
}
