//! Resource limits per sandbox instance through cgroups, v2 or v1 (detected at start).
//!
//! Layout: a parent group `<name>` at the root of each hierarchy used, and beneath it one
//! group per instance, `slot-<n>`. Creating a group and tuning it is slow next to reusing
//! one, so a slot goes back to an idle list when its instance ends and the next instance
//! gets it with new limits.
//!
//! On cgroup v1 the module also mounts a controller-less named hierarchy, `name=nimbus`,
//! with the `favordynmods` option at `/run/nimbus/cgroup`, shared by every Nimbus server
//! of the host (each has its parent group in it) and left mounted like systemd's own. The
//! option is a global switch for
//! the kernel's cgroup_threadgroup_rwsem: without it, moving a process into a cgroup after
//! ~100 ms without any move waits for an RCU grace period (8–15 ms measured on this
//! machine, on the cold-start path); with it the move stays well under a millisecond, at
//! the price of a slightly slower fork and exit system-wide. (Since Linux 6.18 the first
//! favordynmods mount also moves cgroup.procs writes to a per-process lock until reboot;
//! before, the effect lasts while the hierarchy exists.) That hierarchy also holds every
//! process of an instance in the slot's group there, whichever controllers exist, so
//! killing and cleaning up can rely on it.

use std::collections::BTreeSet;
use std::ffi::CString;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Where the mount table of our mount namespace is read from.
const MOUNTINFO: &str = "/proc/self/mountinfo";
/// Name of the v1 tracking hierarchy.
const TRACKER_NAME: &str = "nimbus";
/// Where the v1 tracking hierarchy is mounted unless it is mounted already.
const TRACKER_MOUNT: &str = "/run/nimbus/cgroup";
/// How long killing a group's processes may take before the group is given up on.
const KILL_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest pause between two checks that a killed group has emptied.
const KILL_MAX_PAUSE: Duration = Duration::from_millis(10);

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

/// Resource limits of one instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Memory limit in bytes, swap not allowed beyond it.
    pub memory_bytes: u64,
    /// CPU weight on the cgroup v2 scale: 1–10000, 100 is the default share.
    pub cpu_weight: u32,
    /// Most processes and threads the instance may have at once.
    pub pids_max: u32,
}

impl Limits {
    fn validate(&self) -> io::Result<()> {
        let problem = if self.memory_bytes == 0 {
            "memory limit must be positive"
        } else if !(1..=10_000).contains(&self.cpu_weight) {
            "cpu weight must be between 1 and 10000"
        } else if self.pids_max == 0 {
            "pids limit must be positive"
        } else {
            return Ok(());
        };
        Err(io::Error::new(io::ErrorKind::InvalidInput, problem))
    }
}

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
        v2: String,
        /// Why cgroup v1 cannot be used.
        v1: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Controller {
    Memory,
    Cpu,
    Pids,
}

const CONTROLLERS: [Controller; 3] = [Controller::Memory, Controller::Cpu, Controller::Pids];

impl Controller {
    fn name(self) -> &'static str {
        match self {
            Controller::Memory => "memory",
            Controller::Cpu => "cpu",
            Controller::Pids => "pids",
        }
    }
}

/// One hierarchy in use, with our parent group in it.
#[derive(Debug)]
struct Hierarchy {
    /// `<mount point>/<name>`.
    parent: PathBuf,
    /// The controllers we tune here; none for the v1 tracking hierarchy.
    controllers: Vec<Controller>,
}

/// The v1 named hierarchy that tracks every process of an instance.
#[derive(Debug)]
struct Tracker {
    mount_point: PathBuf,
    favordynmods: bool,
}

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
    name: String,
    version: CgroupVersion,
    /// In the order a process joins them: the first one then holds every process that joined
    /// any (a failed join aborts the exec), so it is the one read to find and kill them.
    hierarchies: Vec<Hierarchy>,
    tracker: Option<Tracker>,
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
        let v2 = match open_v2(name, &mounts) {
            Ok(cgroups) => return Ok(Arc::new(cgroups)),
            Err(problem) => problem,
        };
        tracing::debug!("cgroup v2 not usable: {v2}");
        match open_v1(name, &mounts) {
            Ok(cgroups) => Ok(Arc::new(cgroups)),
            Err(v1) => Err(CgroupError::Unavailable { v2, v1 }),
        }
    }

    /// The cgroup version in use.
    pub fn version(&self) -> CgroupVersion {
        self.version
    }

    /// One line for the start-up log: version and paths.
    pub fn describe(&self) -> String {
        let groups: Vec<String> = self
            .hierarchies
            .iter()
            .map(|h| {
                if h.controllers.is_empty() {
                    let fast = match &self.tracker {
                        Some(t) if t.favordynmods => "favordynmods",
                        _ => "without favordynmods: slow attach",
                    };
                    format!("tracking {} ({fast})", h.parent.display())
                } else {
                    let names: Vec<&str> = h.controllers.iter().map(|c| c.name()).collect();
                    format!("{} {}", names.join("+"), h.parent.display())
                }
            })
            .collect();
        format!("cgroup {}: {}", self.version, groups.join(", "))
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
                match remove_tree(&child, self.version) {
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
                if let Err(e) = remove_tree(&h.parent, self.version) {
                    tracing::warn!("removing cgroup {}: {e}", h.parent.display());
                    result = result.and(Err(e));
                }
            }
        }
        // The tracking hierarchy stays mounted: other servers of the host use it too.
        result
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent at every step, so a panic elsewhere does not taint it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

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
                match (self.version, controller) {
                    (CgroupVersion::V1, Controller::Memory) => {
                        set_v1_memory(dir, limits.memory_bytes)?;
                    }
                    (CgroupVersion::V2, Controller::Memory) => {
                        write_file(&dir.join("memory.max"), &limits.memory_bytes.to_string())?;
                        let swap = dir.join("memory.swap.max");
                        if swap.exists() {
                            write_file(&swap, "0")?;
                        }
                    }
                    (CgroupVersion::V1, Controller::Cpu) => {
                        let shares = v1_cpu_shares(limits.cpu_weight);
                        write_file(&dir.join("cpu.shares"), &shares.to_string())?;
                    }
                    (CgroupVersion::V2, Controller::Cpu) => {
                        write_file(&dir.join("cpu.weight"), &limits.cpu_weight.to_string())?;
                    }
                    (_, Controller::Pids) => {
                        write_file(&dir.join("pids.max"), &limits.pids_max.to_string())?;
                    }
                }
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
        let (oom_file, peak) = match self.version {
            CgroupVersion::V1 => {
                let max_usage = memory_dir.join("memory.max_usage_in_bytes");
                // Writing resets the peak to the current use.
                write_file(&max_usage, "0")?;
                (
                    memory_dir.join("memory.oom_control"),
                    File::open(&max_usage).ok(),
                )
            }
            CgroupVersion::V2 => (
                memory_dir.join("memory.events"),
                open_v2_peak(&memory_dir, fresh),
            ),
        };
        let oom_baseline = read_key(&oom_file, "oom_kill");
        let usage_file = memory_dir.join(match self.version {
            CgroupVersion::V1 => "memory.usage_in_bytes",
            CgroupVersion::V2 => "memory.current",
        });
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
            oom_file,
            oom_baseline,
            usage_file,
            peak,
            tasks,
        })
    }

    /// Removes a slot's groups that are not to be reused; what fails to go is a leftover for
    /// `clean_leftovers` or `remove_all`.
    fn discard(&self, dirs: &[PathBuf]) {
        for dir in dirs.iter().filter(|d| d.exists()) {
            if let Err(e) = remove_tree(dir, self.version) {
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
    cgroups: Arc<Cgroups>,
    index: u32,
    /// One per hierarchy, in the order of `Cgroups::hierarchies`.
    dirs: Vec<PathBuf>,
    procs: Vec<CString>,
    oom_file: PathBuf,
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
        kill_procs(&self.dirs[0], self.cgroups.version);
    }
}

impl Drop for CgroupSlot {
    fn drop(&mut self) {
        let emptied = kill_procs(&self.dirs[0], self.cgroups.version);
        self.cgroups.release(self.index, &self.dirs, emptied);
    }
}

// `Cgroups` is shared as `Arc<Cgroups>` across threads and slots move between tasks.
const _: fn() = || {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Cgroups>();
    send_sync::<CgroupSlot>();
};

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

/// One line of /proc/self/mountinfo, the fields we use.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Mount {
    /// The directory of the filesystem mounted here (`/` for a hierarchy's root).
    root: String,
    mount_point: PathBuf,
    fs_type: String,
    super_options: Vec<String>,
}

impl Mount {
    fn has_option(&self, option: &str) -> bool {
        self.super_options.iter().any(|o| o == option)
    }
}

fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // After the optional fields, a "-" separates fs type, source and super options.
            let dash = fields.iter().skip(6).position(|f| *f == "-")? + 6;
            Some(Mount {
                root: unescape_mount_field(fields.get(3)?),
                mount_point: PathBuf::from(unescape_mount_field(fields.get(4)?)),
                fs_type: fields.get(dash + 1)?.to_string(),
                super_options: fields
                    .get(dash + 3)
                    .map(|o| o.split(',').map(str::to_string).collect())
                    .unwrap_or_default(),
            })
        })
        .collect()
}

/// Undoes the kernel's octal escapes (`\040` for a space) in mountinfo paths.
fn unescape_mount_field(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|b| (b'0'..=b'7').contains(b)));
        match (bytes[i], octal) {
            (b'\\', Some(d)) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn open_v2(name: &str, mounts: &[Mount]) -> Result<Cgroups, String> {
    let mut problem = "no cgroup2 mount".to_string();
    for mount in mounts.iter().filter(|m| m.fs_type == "cgroup2") {
        match prepare_v2_parent(&mount.mount_point, name) {
            Ok(parent) => {
                return Ok(Cgroups {
                    name: name.to_string(),
                    version: CgroupVersion::V2,
                    hierarchies: vec![Hierarchy {
                        parent,
                        controllers: CONTROLLERS.to_vec(),
                    }],
                    // No tracking hierarchy on v2: the unified one already holds every process,
                    // and attaching fast there would take CLONE_INTO_CGROUP or a remount of
                    // cgroup2 with favordynmods, both outside this module.
                    tracker: None,
                    state: Mutex::default(),
                });
            }
            Err(p) => problem = p,
        }
    }
    Err(format!("cgroup v2: {problem}"))
}

/// Enables memory, cpu and pids for `<mount>/<name>` and its children; returns the parent.
fn prepare_v2_parent(mount: &Path, name: &str) -> Result<PathBuf, String> {
    let available = fs::read_to_string(mount.join("cgroup.controllers"))
        .map_err(|e| format!("reading {}/cgroup.controllers: {e}", mount.display()))?;
    let available: Vec<&str> = available.split_whitespace().collect();
    let missing: Vec<&str> = CONTROLLERS
        .iter()
        .map(|c| c.name())
        .filter(|c| !available.contains(c))
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "controllers {} not available at {} (available: {})",
            missing.join(", "),
            mount.display(),
            if available.is_empty() {
                "none".to_string()
            } else {
                available.join(" ")
            }
        ));
    }
    let enable = "+memory +cpu +pids";
    let parent = mount.join(name);
    // The mount root is the hierarchy root (exempt from the no-internal-processes rule) on a
    // host; inside a cgroup namespace it may hold our own processes, and enabling fails there.
    write_file(&mount.join("cgroup.subtree_control"), enable)
        .map_err(|e| format!("enabling {enable}: {e}"))?;
    create_group(&parent).map_err(|e| e.to_string())?;
    write_file(&parent.join("cgroup.subtree_control"), enable)
        .map_err(|e| format!("enabling {enable}: {e}"))?;
    Ok(parent)
}

/// The mount point of the v1 hierarchy of each controller, merged where co-mounted, in the
/// order memory, cpu, pids.
fn v1_controller_mounts(mounts: &[Mount]) -> Result<Vec<(PathBuf, Vec<Controller>)>, String> {
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
        let plural = if missing.len() > 1 { "s" } else { "" };
        Err(format!(
            "no hierarchy with the {} controller{plural} mounted",
            missing.join(", ")
        ))
    }
}

fn open_v1(name: &str, mounts: &[Mount]) -> Result<Cgroups, String> {
    let controller_mounts = v1_controller_mounts(mounts).map_err(|e| format!("cgroup v1: {e}"))?;
    let mut hierarchies = Vec::new();
    for (mount_point, controllers) in controller_mounts {
        let parent = mount_point.join(name);
        create_group(&parent).map_err(|e| format!("cgroup v1: {e}"))?;
        hierarchies.push(Hierarchy {
            parent,
            controllers,
        });
    }
    let tracker = open_tracker(mounts);
    if let Some(tracker) = &tracker {
        let parent = tracker.mount_point.join(name);
        create_group(&parent).map_err(|e| format!("cgroup v1: {e}"))?;
        // First: see `Cgroups::hierarchies`.
        hierarchies.insert(
            0,
            Hierarchy {
                parent,
                controllers: Vec::new(),
            },
        );
    }
    Ok(Cgroups {
        name: name.to_string(),
        version: CgroupVersion::V1,
        hierarchies,
        tracker,
        state: Mutex::default(),
    })
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

/// v1 cpu.shares for a v2 weight: 100 (default) is 1024. Weight ≥ 1 gives ≥ 10, above the
/// kernel's minimum of 2.
fn v1_cpu_shares(weight: u32) -> u64 {
    u64::from(weight) * 1024 / 100
}

/// Sets limit_in_bytes and, when swap is accounted, memsw.limit_in_bytes to the same value,
/// so nothing is swapped beyond the limit.
fn set_v1_memory(dir: &Path, bytes: u64) -> io::Result<()> {
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

/// memory.peak opened so that it reports the peak since now, if the kernel allows.
fn open_v2_peak(dir: &Path, fresh: bool) -> Option<File> {
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

fn create_groups(dirs: &[PathBuf]) -> io::Result<()> {
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
fn create_group(dir: &Path) -> io::Result<()> {
    match fs::create_dir(dir) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => Err(io::Error::new(
            e.kind(),
            format!("creating {}: {e}", dir.display()),
        )),
        _ => Ok(()),
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

/// Kills the processes of `dir` and of every group below it, and removes them all.
fn remove_tree(dir: &Path, version: CgroupVersion) -> io::Result<()> {
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

fn subdirs(dir: &Path) -> io::Result<Vec<PathBuf>> {
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
fn kill_procs(dir: &Path, version: CgroupVersion) -> bool {
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

fn read_pids(dir: &Path) -> Vec<i32> {
    fs::read_to_string(dir.join("cgroup.procs"))
        .map(|text| text.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

/// The value of `key` in a flat-keyed file such as memory.events ("key value" lines).
fn read_key(path: &Path, key: &str) -> Option<u64> {
    let text = fs::read_to_string(path).ok()?;
    text.lines().find_map(|line| {
        let (k, v) = line.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

fn read_file(path: &Path) -> io::Result<String> {
    fs::read_to_string(path).map_err(at(path))
}

/// Writes a cgroup file (without creating or truncating: cgroupfs files exist or not).
fn write_file(path: &Path, value: &str) -> io::Result<()> {
    OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|mut f| f.write_all(value.as_bytes()))
        .map_err(at(path))
}

/// Adds the path to an error, keeping its kind.
fn at(path: &Path) -> impl FnOnce(io::Error) -> io::Error + '_ {
    move |e| io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    // A hybrid host like this one: v1 controllers, cpu co-mounted with cpuacct, an empty
    // cgroup2, a bind mount of a group, and a path with a space.
    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime shared:9 - cgroup cgroup rw,cpu,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
90 23 0:32 /some/group /mnt/mem\\040bind rw,relatime - cgroup cgroup rw,memory
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw,nsdelegate
42 27 0:39 / /run/nimbus-cgroup-x rw,relatime - cgroup cgroup rw,favordynmods,name=x
";

    #[test]
    fn parses_mountinfo_lines() {
        let mounts = parse_mountinfo(HYBRID);
        assert_eq!(mounts.len(), 8);
        assert_eq!(
            mounts[1],
            Mount {
                root: "/".into(),
                mount_point: "/sys/fs/cgroup/cpu,cpuacct".into(),
                fs_type: "cgroup".into(),
                super_options: vec!["rw".into(), "cpu".into(), "cpuacct".into()],
            }
        );
        assert_eq!(mounts[3].root, "/some/group");
        assert_eq!(mounts[3].mount_point, Path::new("/mnt/mem bind"));
        assert_eq!(mounts[6].fs_type, "cgroup2");
        assert!(mounts[7].has_option("name=x") && mounts[7].has_option("favordynmods"));
    }

    #[test]
    fn finds_v1_controllers_preferring_hierarchy_roots() {
        let found = v1_controller_mounts(&parse_mountinfo(HYBRID)).unwrap();
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
            v1_controller_mounts(&parse_mountinfo(co_mounted)).unwrap_err(),
            "no hierarchy with the pids controller mounted"
        );
        let all = format!("{co_mounted}2 0 0:2 / /cg/pids rw - cgroup cgroup rw,pids\n");
        assert_eq!(
            v1_controller_mounts(&parse_mountinfo(&all)).unwrap(),
            vec![
                ("/cg/mc".into(), vec![Controller::Memory, Controller::Cpu]),
                ("/cg/pids".into(), vec![Controller::Pids]),
            ]
        );
        let v2_only = "1 0 0:1 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            v1_controller_mounts(&parse_mountinfo(v2_only)).unwrap_err(),
            "no hierarchy with the memory, cpu, pids controllers mounted"
        );
    }

    #[test]
    fn a_cgroup2_mount_without_the_controllers_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("cgroup.controllers"), "hugetlb cpu\n").unwrap();
        let problem = prepare_v2_parent(dir.path(), "nimbus").unwrap_err();
        assert_eq!(
            problem,
            format!(
                "controllers memory, pids not available at {} (available: hugetlb cpu)",
                dir.path().display()
            )
        );
        // Nothing was created or enabled.
        assert!(!dir.path().join("nimbus").exists());
        assert!(!dir.path().join("cgroup.subtree_control").exists());
    }

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
    fn cpu_weight_maps_to_v1_shares() {
        assert_eq!(v1_cpu_shares(100), 1024);
        assert_eq!(v1_cpu_shares(1), 10);
        assert_eq!(v1_cpu_shares(10_000), 102_400);
    }

    #[test]
    fn limits_are_validated() {
        let ok = Limits {
            memory_bytes: 1 << 20,
            cpu_weight: 100,
            pids_max: 1,
        };
        assert!(ok.validate().is_ok());
        for bad in [
            Limits {
                memory_bytes: 0,
                ..ok
            },
            Limits {
                cpu_weight: 0,
                ..ok
            },
            Limits {
                cpu_weight: 10_001,
                ..ok
            },
            Limits { pids_max: 0, ..ok },
        ] {
            assert_eq!(
                bad.validate().unwrap_err().kind(),
                io::ErrorKind::InvalidInput
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
