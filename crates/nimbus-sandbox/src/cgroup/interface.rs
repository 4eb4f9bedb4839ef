//! What cgroup v1 and v2 have in common: the `Interface` trait each implements, the
//! controllers it tunes and the hierarchies it hands back from detection.

use std::fmt;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use super::limits::Limits;

/// The cgroup interface in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupVersion {
    /// One hierarchy per controller (legacy).
    V1,
    /// The unified hierarchy.
    V2,
}

impl fmt::Display for CgroupVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CgroupVersion::V1 => "v1",
            CgroupVersion::V2 => "v2",
        })
    }
}

/// A controller whose limits a slot gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Controller {
    /// Memory limit (and no swap beyond it).
    Memory,
    /// CPU share.
    Cpu,
    /// Process count limit.
    Pids,
}

/// Every controller a slot is limited by, in the order their hierarchies are looked for.
pub(super) const CONTROLLERS: [Controller; 3] =
    [Controller::Memory, Controller::Cpu, Controller::Pids];

impl Controller {
    /// Its name in the kernel's files and mount options.
    pub(super) fn name(self) -> &'static str {
        match self {
            Controller::Memory => "memory",
            Controller::Cpu => "cpu",
            Controller::Pids => "pids",
        }
    }
}

/// One hierarchy in use, with our parent group in it.
#[derive(Debug)]
pub(super) struct Hierarchy {
    /// `<mount point>/<name>`.
    pub(super) parent: PathBuf,
    /// The controllers we tune here; none for the v1 tracking hierarchy.
    pub(super) controllers: Vec<Controller>,
}

/// The memory controller's files of one slot's group.
#[derive(Debug)]
pub(super) struct MemoryFiles {
    /// Where the kernel counts OOM kills (`oom_kill`).
    pub(super) oom: PathBuf,
    /// The peak use since the slot was acquired, if the kernel tells it.
    pub(super) peak: Option<File>,
    /// The use now.
    pub(super) usage: PathBuf,
}

/// What differs between cgroup v1 and v2 once the hierarchies are found: how limits are
/// written and where memory is reported (as Firecracker's jailer puts its two cgroup
/// builders behind one trait).
pub(super) trait Interface: fmt::Debug + Send + Sync {
    /// Which interface it is.
    fn version(&self) -> CgroupVersion;
    /// Writes what `limits` says for `controller` into the group `dir`.
    fn limit(&self, controller: Controller, dir: &Path, limits: &Limits) -> io::Result<()>;
    /// The memory files of the group `dir` (a new group if `fresh`), with the peak reset
    /// to now where the kernel allows.
    fn memory_files(&self, dir: &Path, fresh: bool) -> io::Result<MemoryFiles>;
    /// How the hierarchy without controllers (v1's tracking one) attaches, for the start-up
    /// log.
    fn tracking(&self) -> &'static str {
        ""
    }
}
