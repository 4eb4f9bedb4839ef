//! Resource limits per sandbox instance through cgroups, v2 or v1 (detected at start).
//!
//! Layout: a parent group `<name>` at the root of each hierarchy used, and beneath it one
//! group per instance, `slot-<n>`. Creating a group and tuning it is slow next to reusing
//! one, so a slot goes back to an idle list when its instance ends and the next instance
//! gets it with new limits.
//!
//! - `limits`: what an instance may use, checked before any group is touched;
//! - `interface`: the `Interface` trait, the controllers it tunes and the hierarchies found;
//! - `mounts`: where the hierarchies are, from the mount table;
//! - `group`: one group directory, whichever the interface (create, kill, remove, files);
//! - `v2` and `v1`: the two interfaces (how each finds and prepares its hierarchies, writes
//!   limits and reports memory), detected at start: v2 first, else v1;
//! - here, above them all: the slots, handed out and taken back.

mod group;
mod interface;
mod limits;
mod mounts;
mod v1;
mod v2;

use std::collections::BTreeSet;
use std::ffi::CString;
use std::fs::{self, File};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use group::{at, create_groups, kill_procs, read_key, read_pids, remove_tree, subdirs};
pub use interface::CgroupVersion;
use interface::{Controller, Hierarchy, Interface, MemoryFiles};
pub use limits::Limits;
use mounts::{parse_mountinfo, MOUNTINFO};
pub use v1::V1Unavailable;
pub use v2::V2Unavailable;

/// Why cgroups cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// The parent group name cannot be used as a directory and v1 hierarchy name.
    #[error(
        "invalid cgroup name {0:?}: use 1 to 63 ASCII letters, digits, '.', '_' or '-', \
         not starting with '.'"
    )]
    InvalidName(String),
    /// The mount table could not be read.
    #[error("reading {MOUNTINFO}: {0}")]
    MountInfo(#[source] io::Error),
    /// Neither cgroup v2 nor v1 offers the memory, cpu and pids controllers.
    #[error("no usable cgroups (memory, cpu and pids controllers are needed): {v2}; {v1}")]
    Unavailable {
        /// Why cgroup v2 cannot be used.
        v2: V2Unavailable,
        /// Why cgroup v1 cannot be used.
        #[source]
        v1: V1Unavailable,
    },
}

/// Which slots exist and which are free.
#[derive(Debug, Default)]
struct State {
    /// Slots with a live [`CgroupSlot`].
    in_use: BTreeSet<u32>,
    /// Empty slots ready for reuse.
    idle: BTreeSet<u32>,
    /// Index of the next new slot.
    next: u32,
    /// `remove_all` ran: nothing may be acquired any more.
    removed: bool,
}

/// The cgroups of one server: a parent group per hierarchy and the slots beneath it.
#[derive(Debug)]
pub struct Cgroups {
    /// The parent groups' name.
    name: String,
    /// v1 or v2.
    interface: Box<dyn Interface>,
    /// In the order a process joins them: the first one then holds every process that joined
    /// any (a failed join aborts the exec), so it is the one read to find and kill them.
    hierarchies: Vec<Hierarchy>,
    /// The slots.
    state: Mutex<State>,
}

impl Cgroups {
    /// Detects usable memory, cpu and pids controllers: cgroup v2 (a cgroup2 mount, normally
    /// /sys/fs/cgroup, where those controllers can be enabled for our subtree) first, else v1
    /// (one hierarchy per controller, found from /proc/self/mountinfo; cpu may be co-mounted
    /// as cpu,cpuacct). Creates the parent group `<name>` in each hierarchy at the hierarchy
    /// ROOT (not under our own cgroup). Fails with a message naming what is missing when
    /// neither works.
    ///
    /// On v1 it also mounts (or reuses) the `favordynmods` tracking hierarchy described in
    /// the module documentation; if that fails it logs a warning and goes on without it.
    /// Call [`Cgroups::clean_leftovers`] next, before the first [`Cgroups::acquire`].
    pub fn open(name: &str) -> Result<Arc<Cgroups>, CgroupError> {
        validate_name(name)?;
        let mounts =
            parse_mountinfo(&fs::read_to_string(MOUNTINFO).map_err(CgroupError::MountInfo)?);
        let (interface, hierarchies): (Box<dyn Interface>, _) = match v2::open(name, &mounts) {
            Ok(hierarchies) => (Box::new(v2::V2), hierarchies),
            Err(v2) => {
                tracing::debug!("cgroup v2 not usable: {v2}");
                match v1::open(name, &mounts) {
                    Ok((v1, hierarchies)) => (Box::new(v1), hierarchies),
                    Err(v1) => return Err(CgroupError::Unavailable { v2, v1 }),
                }
            }
        };
        Ok(Arc::new(Cgroups {
            name: name.to_string(),
            interface,
            hierarchies,
            state: Mutex::default(),
        }))
    }

    /// The cgroup version in use.
    pub fn version(&self) -> CgroupVersion {
        self.interface.version()
    }

    /// One line for the start-up log: version and paths.
    pub fn describe(&self) -> String {
        let groups: Vec<String> = self
            .hierarchies
            .iter()
            .map(|h| {
                if h.controllers.is_empty() {
                    let fast = self.interface.tracking();
                    format!("tracking {} ({fast})", h.parent.display())
                } else {
                    let names: Vec<&str> = h.controllers.iter().map(|c| c.name()).collect();
                    format!("{} {}", names.join("+"), h.parent.display())
                }
            })
            .collect();
        format!("cgroup {}: {}", self.version(), groups.join(", "))
    }

    /// Kills every process left in this parent's groups (a server killed with SIGKILL leaves
    /// them) and removes the child groups; returns how many groups it removed.
    ///
    /// Groups are counted once by name, however many hierarchies hold them. Slots of this
    /// `Cgroups` (in use or idle) are left alone. On failure it still cleans what it can and
    /// returns the first error.
    pub fn clean_leftovers(&self) -> io::Result<usize> {
        // Held throughout so that no slot is created while we look for strangers.
        let state = self.lock();
        let mut removed = BTreeSet::new();
        let mut first_error = None;
        for h in &self.hierarchies {
            let children = match subdirs(&h.parent) {
                Ok(children) => children,
                Err(e) => {
                    first_error.get_or_insert(e);
                    continue;
                }
            };
            for child in children {
                let name = child
                    .file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned();
                if owned_slot(&state, &name) {
                    continue;
                }
                match remove_tree(&child, self.version()) {
                    Ok(()) => {
                        removed.insert(name);
                    }
                    Err(e) => {
                        first_error.get_or_insert(e);
                    }
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(removed.len()),
        }
    }

    /// A group for one instance: an idle one if any, else a new `<parent>/slot-<n>`; applies
    /// `limits` and records the OOM-kill counter baseline.
    ///
    /// An idle group that refuses the new limits (say, memory still charged to it that cannot
    /// be reclaimed below a lower limit) is removed and a new one used instead.
    pub fn acquire(self: &Arc<Self>, limits: &Limits) -> io::Result<CgroupSlot> {
        limits.validate()?;
        loop {
            let (index, fresh) = {
                let mut state = self.lock();
                if state.removed {
                    return Err(io::Error::other(format!(
                        "cgroups {} were removed (server shutting down)",
                        self.name
                    )));
                }
                let taken = match state.idle.pop_first() {
                    Some(index) => (index, false),
                    None => {
                        state.next += 1;
                        (state.next - 1, true)
                    }
                };
                state.in_use.insert(taken.0);
                taken
            };
            let dirs = self.slot_dirs(index);
            if fresh {
                if let Err(e) = create_groups(&dirs) {
                    self.lock().in_use.remove(&index);
                    return Err(e);
                }
            }
            let error = match self.prepare(index, dirs.clone(), fresh, limits) {
                Ok(slot) => return Ok(slot),
                Err(e) => e,
            };
            self.lock().in_use.remove(&index);
            self.discard(&dirs);
            if fresh {
                return Err(error);
            }
            tracing::warn!(
                "cgroup slot-{index} refused new limits, replaced by a new one: {error}"
            );
        }
    }

    /// Kills what is left in every group and removes them and the parent (server shutdown).
    ///
    /// Slots still held are emptied and removed too;
    /// `acquire` fails afterwards, and a second call does nothing. On failure it still removes
    /// what it can and returns the first error.
    pub fn remove_all(&self) -> io::Result<()> {
        let mut state = self.lock();
        if state.removed {
            return Ok(());
        }
        state.removed = true;
        state.idle.clear();
        let mut result = Ok(());
        for h in &self.hierarchies {
            if h.parent.exists() {
                if let Err(e) = remove_tree(&h.parent, self.version()) {
                    tracing::warn!("removing cgroup {}: {e}", h.parent.display());
                    result = result.and(Err(e));
                }
            }
        }
        // The tracking hierarchy stays mounted: other servers of the host use it too.
        result
    }

    /// The slots' state.
    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent at every step, so a panic elsewhere does not taint it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The groups of slot `index`, one per hierarchy.
    fn slot_dirs(&self, index: u32) -> Vec<PathBuf> {
        let name = format!("slot-{index}");
        self.hierarchies
            .iter()
            .map(|h| h.parent.join(&name))
            .collect()
    }

    /// Applies the limits to a slot's groups and records the baselines.
    fn prepare(
        self: &Arc<Self>,
        index: u32,
        dirs: Vec<PathBuf>,
        fresh: bool,
        limits: &Limits,
    ) -> io::Result<CgroupSlot> {
        let mut memory_dir = None;
        let mut pids_dir = None;
        for (h, dir) in self.hierarchies.iter().zip(&dirs) {
            for &controller in &h.controllers {
                self.interface.limit(controller, dir, limits)?;
                if controller == Controller::Memory {
                    memory_dir = Some(dir.clone());
                }
                if controller == Controller::Pids {
                    pids_dir = Some(dir.clone());
                }
            }
        }
        // Every Cgroups has a memory hierarchy (checked by open).
        let memory_dir = memory_dir.expect("memory hierarchy");
        let MemoryFiles { oom, peak, usage } = self.interface.memory_files(&memory_dir, fresh)?;
        let oom_baseline = read_key(&oom, "oom_kill");
        let procs = dirs
            .iter()
            .map(|d| CString::new(d.join("cgroup.procs").as_os_str().as_bytes()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        // pids.current is read live; a kept-open v1 cgroup.procs would serve a cached list.
        let tasks = pids_dir.and_then(|d: PathBuf| File::open(d.join("pids.current")).ok());
        Ok(CgroupSlot {
            cgroups: Arc::clone(self),
            index,
            dirs,
            procs,
            oom_file: oom,
            oom_baseline,
            usage_file: usage,
            peak,
            tasks,
        })
    }

    /// Removes a slot's groups that are not to be reused; what fails to go is a leftover for
    /// `clean_leftovers` or `remove_all`.
    fn discard(&self, dirs: &[PathBuf]) {
        for dir in dirs.iter().filter(|d| d.exists()) {
            if let Err(e) = remove_tree(dir, self.version()) {
                tracing::warn!("removing cgroup {}: {e}", dir.display());
            }
        }
    }

    /// Takes back a slot whose instance ended.
    fn release(&self, index: u32, dirs: &[PathBuf], emptied: bool) {
        let mut state = self.lock();
        state.in_use.remove(&index);
        if state.removed {
            return;
        }
        if emptied {
            state.idle.insert(index);
        } else {
            drop(state);
            tracing::warn!("cgroup slot-{index} still has processes after SIGKILL; not reused");
            self.discard(dirs);
        }
    }
}

/// One instance's groups, with its limits applied. Dropping it kills what runs in it and
/// returns the groups for reuse; that blocks until the group is empty (well under a
/// millisecond usually, 2 s at most).
#[derive(Debug)]
pub struct CgroupSlot {
    /// Where it goes back to.
    cgroups: Arc<Cgroups>,
    /// Its number: its groups are `slot-<index>`.
    index: u32,
    /// One per hierarchy, in the order of `Cgroups::hierarchies`.
    dirs: Vec<PathBuf>,
    /// The `cgroup.procs` files of `dirs`, for a pre-exec hook.
    procs: Vec<CString>,
    /// Where the kernel counts OOM kills.
    oom_file: PathBuf,
    /// The OOM kill count when the slot was acquired.
    oom_baseline: Option<u64>,
    /// v1 `memory.usage_in_bytes`, v2 `memory.current`.
    usage_file: PathBuf,
    /// Read from offset 0 each time: on v2 the peak reset applies to this descriptor only.
    peak: Option<File>,
    /// The pids controller's `pids.current`, kept open: counting the group's tasks after
    /// every invocation is then one `pread`, not an open, a read and a close.
    tasks: Option<File>,
}

impl CgroupSlot {
    /// Small stable number of the slot (0, 1, …), reused with the group; the caller derives the
    /// instance's host uid from it.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// The `cgroup.procs` files a process writes "0" into to join this group (one per v1
    /// hierarchy, one for v2), as `CString`s so a pre-exec hook (async-signal-safe context:
    /// no allocation) can open/write them.
    ///
    /// Write them in this order and fail the exec if one fails: the first group then holds
    /// every process that joined any of them, which `pids` and `kill_all` rely on.
    pub fn procs_files(&self) -> &[CString] {
        &self.procs
    }

    /// Pids in the group.
    pub fn pids(&self) -> Vec<i32> {
        read_pids(&self.dirs[0])
    }

    /// How many tasks (threads included) the group holds, cheaply: one `pread` of
    /// `pids.current` into a stack buffer. `None` if it cannot tell (then ask
    /// [`CgroupSlot::pids`], which reads the process list afresh).
    pub fn task_count(&self) -> Option<u64> {
        let mut buf = [0u8; 32];
        let n = self.tasks.as_ref()?.read_at(&mut buf, 0).ok()?;
        std::str::from_utf8(&buf[..n]).ok()?.trim().parse().ok()
    }

    /// Whether the kernel OOM-killed a process in this group since `acquire` (v1: `oom_kill`
    /// in memory.oom_control; v2: `oom_kill` in memory.events). Always false on kernels
    /// without that counter (before 4.13).
    pub fn oom_killed(&self) -> bool {
        match (self.oom_baseline, read_key(&self.oom_file, "oom_kill")) {
            (Some(before), Some(now)) => now > before,
            _ => false,
        }
    }

    /// Peak memory use since acquire, if the kernel reports it (v1 memory.max_usage_in_bytes —
    /// reset it at acquire; v2 memory.peak when present).
    ///
    /// On v2 before Linux 6.12 memory.peak cannot be reset, so a reused group reports `None`.
    pub fn memory_peak_bytes(&self) -> Option<u64> {
        let mut buf = [0u8; 32];
        let n = self.peak.as_ref()?.read_at(&mut buf, 0).ok()?;
        std::str::from_utf8(&buf[..n]).ok()?.trim().parse().ok()
    }

    /// Memory charged to the group now (v1 memory.usage_in_bytes, v2 memory.current).
    pub fn memory_bytes(&self) -> Option<u64> {
        std::fs::read_to_string(&self.usage_file)
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Moves process `pid` (with its threads) into this group, in every hierarchy, in the
    /// order of [`CgroupSlot::procs_files`]. Charges it made before stay where they were.
    pub fn adopt(&self, pid: u32) -> io::Result<()> {
        let pid = pid.to_string();
        for procs in &self.procs {
            let path = Path::new(std::ffi::OsStr::from_bytes(procs.as_bytes()));
            std::fs::write(path, &pid).map_err(at(path))?;
        }
        Ok(())
    }

    /// SIGKILLs every process in the group (v2 `cgroup.kill` when present; v1: read procs,
    /// kill, repeat until empty, bounded).
    ///
    /// Returns once the group is empty or after 2 s at most.
    pub fn kill_all(&self) {
        kill_procs(&self.dirs[0], self.cgroups.version());
    }
}

impl Drop for CgroupSlot {
    fn drop(&mut self) {
        let emptied = kill_procs(&self.dirs[0], self.cgroups.version());
        self.cgroups.release(self.index, &self.dirs, emptied);
    }
}

// `Cgroups` is shared as `Arc<Cgroups>` across threads and slots move between tasks.
const _: fn() = || {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Cgroups>();
    send_sync::<CgroupSlot>();
};

/// Refuses a parent group name that is no v1 hierarchy name or directory name.
fn validate_name(name: &str) -> Result<(), CgroupError> {
    // The v1 hierarchy name rules (kernel: alphanumerics, '_', '.', '-'; < 64 bytes) are
    // also safe as a directory name once a leading '.' is excluded.
    let valid = (1..=63).contains(&name.len())
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if valid {
        Ok(())
    } else {
        Err(CgroupError::InvalidName(name.to_string()))
    }
}

/// Whether `name` is the group of one of our slots (in use or idle).
fn owned_slot(state: &State, name: &str) -> bool {
    let Some(digits) = name.strip_prefix("slot-") else {
        return false;
    };
    // Only the exact name we create ("slot-3", not "slot-03") is ours.
    match digits.parse::<u32>() {
        Ok(n) if n.to_string() == digits => state.in_use.contains(&n) || state.idle.contains(&n),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_must_suit_a_v1_hierarchy_and_a_directory() {
        for good in ["nimbus", "nimbus-test_1.2", &"a".repeat(63)] {
            assert!(validate_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            ".",
            "..",
            ".hidden",
            "a/b",
            "a b",
            "a,b",
            &"a".repeat(64),
        ] {
            let err = validate_name(bad).unwrap_err();
            assert!(
                err.to_string().contains("invalid cgroup name"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn only_canonical_slot_names_are_owned() {
        let state = State {
            in_use: [0].into(),
            idle: [3].into(),
            ..State::default()
        };
        assert!(owned_slot(&state, "slot-0"));
        assert!(owned_slot(&state, "slot-3"));
        for stranger in ["slot-1", "slot-03", "slot-+3", "slot-", "other", "slot-x"] {
            assert!(!owned_slot(&state, stranger), "{stranger}");
        }
    }
}
