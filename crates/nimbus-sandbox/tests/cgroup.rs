//! Cgroup slots on the real kernel. Needs root, as in CI on the project's machine.

use std::ffi::{CString, OsStr};
use std::fs;
use std::io;
use std::ops::Deref;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nimbus_sandbox::cgroup::{CgroupSlot, CgroupVersion, Cgroups, Limits};

const MIB: u64 = 1 << 20;

fn unique_name() -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("nimbus-test-{}-{n}-{nanos}", std::process::id())
}

/// A test's cgroups, removed (with the tracking mount) when the test ends, even by a panic.
struct Guard(Arc<Cgroups>);

impl Guard {
    fn open(name: &str) -> Guard {
        Guard(Cgroups::open(name).expect("open cgroups"))
    }
}

impl Deref for Guard {
    type Target = Arc<Cgroups>;
    fn deref(&self) -> &Arc<Cgroups> {
        &self.0
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let removed = self.0.remove_all();
        if std::thread::panicking() {
            if let Err(e) = removed {
                eprintln!("remove_all after a failure: {e}");
            }
        } else {
            removed.expect("remove_all");
        }
    }
}

fn limits(memory_mib: u64, cpu_weight: u32, pids_max: u32) -> Limits {
    Limits {
        memory_bytes: memory_mib * MIB,
        cpu_weight,
        pids_max,
    }
}

fn group_dirs(slot: &CgroupSlot) -> Vec<PathBuf> {
    slot.procs_files()
        .iter()
        .map(|f| {
            Path::new(OsStr::from_bytes(f.as_bytes()))
                .parent()
                .unwrap()
                .to_path_buf()
        })
        .collect()
}

/// The trimmed content of a control file, from whichever of the slot's groups has it.
fn setting(slot: &CgroupSlot, file: &str) -> String {
    let dir = group_dirs(slot)
        .into_iter()
        .find(|d| d.join(file).exists())
        .unwrap_or_else(|| panic!("no group of slot {} has {file}", slot.index()));
    fs::read_to_string(dir.join(file))
        .unwrap()
        .trim()
        .to_string()
}

fn has_setting(slot: &CgroupSlot, file: &str) -> bool {
    group_dirs(slot).iter().any(|d| d.join(file).exists())
}

fn assert_limits(version: CgroupVersion, slot: &CgroupSlot, l: &Limits) {
    let memory = l.memory_bytes.to_string();
    match version {
        CgroupVersion::V1 => {
            assert_eq!(setting(slot, "memory.limit_in_bytes"), memory);
            if has_setting(slot, "memory.memsw.limit_in_bytes") {
                assert_eq!(setting(slot, "memory.memsw.limit_in_bytes"), memory);
            }
            assert_eq!(setting(slot, "memory.swappiness"), "0");
            let shares = u64::from(l.cpu_weight) * 1024 / 100;
            assert_eq!(setting(slot, "cpu.shares"), shares.to_string());
        }
        CgroupVersion::V2 => {
            assert_eq!(setting(slot, "memory.max"), memory);
            if has_setting(slot, "memory.swap.max") {
                assert_eq!(setting(slot, "memory.swap.max"), "0");
            }
            assert_eq!(setting(slot, "cpu.weight"), l.cpu_weight.to_string());
        }
    }
    assert_eq!(setting(slot, "pids.max"), l.pids_max.to_string());
}

/// Joins every group by writing "0" to each file, as a pre-exec hook must: only open, write
/// and close, no allocation.
fn join(files: &[CString]) -> io::Result<()> {
    for file in files {
        // SAFETY: plain system calls on a valid NUL-terminated path and a static buffer.
        unsafe {
            let fd = libc::open(file.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            let written = libc::write(fd, b"0".as_ptr().cast(), 1);
            let error = io::Error::last_os_error();
            libc::close(fd);
            if written != 1 {
                return Err(error);
            }
        }
    }
    Ok(())
}

fn command_in(files: &[CString], program: &str, args: &[&str]) -> Command {
    let files = files.to_vec();
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: `join` is async-signal-safe (see above); `files` was allocated before the fork.
    unsafe {
        cmd.pre_exec(move || join(&files));
    }
    cmd
}

fn spawn_in(slot: &CgroupSlot, program: &str, args: &[&str]) -> Child {
    command_in(slot.procs_files(), program, args)
        .spawn()
        .expect("spawn in slot")
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn mountinfo() -> String {
    fs::read_to_string("/proc/self/mountinfo").unwrap()
}

/// What the host offers, found independently of the module: v2 if a cgroup2 mount has the
/// memory, cpu and pids controllers available.
fn expected_version() -> CgroupVersion {
    let v2 = mountinfo().lines().any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let Some(dash) = fields.iter().position(|f| *f == "-") else {
            return false;
        };
        fields.get(dash + 1) == Some(&"cgroup2")
            && fs::read_to_string(Path::new(fields[4]).join("cgroup.controllers")).is_ok_and(|c| {
                let c: Vec<&str> = c.split_whitespace().collect();
                ["memory", "cpu", "pids"].iter().all(|n| c.contains(n))
            })
    });
    if v2 {
        CgroupVersion::V2
    } else {
        CgroupVersion::V1
    }
}

#[test]
fn detects_the_version_the_host_offers_and_describes_it() {
    let name = unique_name();
    let cgroups = Guard::open(&name);
    let version = cgroups.version();
    assert_eq!(version, expected_version());
    let description = cgroups.describe();
    println!("{description}");
    match version {
        CgroupVersion::V1 => {
            assert!(description.starts_with("cgroup v1: "), "{description}");
            let tracking = format!("tracking /run/nimbus/cgroup/{name} (favordynmods)");
            assert!(description.contains(&tracking), "{description}");
            for controller in ["memory", "cpu", "pids"] {
                assert!(
                    description.contains(&format!("{controller} /")),
                    "{description}"
                );
            }
            let mount = mountinfo()
                .lines()
                .find(|l| l.contains(" /run/nimbus/cgroup "))
                .map(str::to_string)
                .expect("tracking hierarchy mounted");
            assert!(
                mount.contains("favordynmods") && mount.contains("name=nimbus"),
                "{mount}"
            );
        }
        CgroupVersion::V2 => assert!(description.starts_with("cgroup v2: "), "{description}"),
    }
    let slot = cgroups.acquire(&limits(64, 100, 16)).unwrap();
    let dirs = group_dirs(&slot);
    // Tracking (v1 only), then memory, cpu and pids: 4 groups on v1, 1 on v2.
    assert_eq!(dirs.len(), if version == CgroupVersion::V1 { 4 } else { 1 });
    for dir in &dirs {
        assert!(dir.is_dir(), "{}", dir.display());
        let parent = dir.parent().unwrap();
        assert_eq!(parent.file_name().unwrap(), name.as_str());
        assert!(
            description.contains(&parent.display().to_string()),
            "{description}"
        );
    }
    drop(slot);

    cgroups.remove_all().unwrap();
    for dir in &dirs {
        assert!(!dir.parent().unwrap().exists(), "{} left", dir.display());
    }
    // The shared tracking hierarchy stays mounted for the other servers of the host.
    if version == CgroupVersion::V1 {
        assert!(mountinfo().contains(" /run/nimbus/cgroup "));
    }
    let after = cgroups.acquire(&limits(64, 100, 16)).unwrap_err();
    assert!(after.to_string().contains("removed"), "{after}");
}

#[test]
fn acquire_writes_the_limits_and_reuses_idle_slots_with_new_ones() {
    let cgroups = Guard::open(&unique_name());
    let version = cgroups.version();
    let first = limits(64, 50, 16);
    let a = cgroups.acquire(&first).unwrap();
    let b = cgroups.acquire(&first).unwrap();
    assert_eq!((a.index(), b.index()), (0, 1));
    assert_ne!(a.procs_files(), b.procs_files());
    assert_limits(version, &a, &first);
    assert_limits(version, &b, &first);
    let files_of_a = a.procs_files().to_vec();
    drop(a);

    // Raising the memory limit and then lowering it exercises both orders of the v1
    // limit/memsw writes.
    for next in [limits(256, 200, 32), limits(32, 10_000, 8)] {
        let reused = cgroups.acquire(&next).unwrap();
        assert_eq!(reused.index(), 0);
        assert_eq!(reused.procs_files(), files_of_a.as_slice());
        assert_limits(version, &reused, &next);
    }
    let out_of_range = cgroups.acquire(&limits(64, 0, 16)).unwrap_err();
    assert_eq!(out_of_range.kind(), io::ErrorKind::InvalidInput);
    drop(b);
}

#[test]
fn joined_processes_are_listed_and_kill_all_empties_the_group() {
    let cgroups = Guard::open(&unique_name());
    let slot = cgroups.acquire(&limits(64, 100, 16)).unwrap();
    assert!(slot.pids().is_empty());
    assert_eq!(slot.task_count(), Some(0));
    let mut child = spawn_in(&slot, "/bin/sh", &["-c", "sleep 30 & sleep 30 & wait"]);
    let pid = child.id() as i32;
    wait_until("the shell and its two sleeps are in the group", || {
        slot.pids().len() == 3
    });
    // The count comes from a descriptor kept open since acquire: it must see the joins.
    assert_eq!(slot.task_count(), Some(3));
    assert!(slot.pids().contains(&pid));
    for file in slot.procs_files() {
        let listed = fs::read_to_string(OsStr::from_bytes(file.as_bytes())).unwrap();
        assert!(
            listed.lines().any(|l| l == pid.to_string()),
            "{file:?}: {listed}"
        );
    }

    slot.kill_all();
    assert_eq!(slot.pids(), Vec::<i32>::new());
    assert_eq!(child.wait().unwrap().signal(), Some(libc::SIGKILL));
    // Tasks leave the count once reaped (the shell by this test, its sleeps by init).
    wait_until("the task count drops to 0", || slot.task_count() == Some(0));
}

#[test]
fn a_memory_hog_is_oom_killed_and_reported() {
    let cgroups = Guard::open(&unique_name());
    let slot = cgroups.acquire(&limits(64, 100, 16)).unwrap();
    assert!(!slot.oom_killed());
    let hog = spawn_in(
        &slot,
        "/usr/bin/python3",
        &["-c", "b = bytearray(512 * 1024 * 1024)"],
    );
    let status = hog.wait_with_output().unwrap().status;
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status}");
    assert!(slot.oom_killed());
    let peak = slot.memory_peak_bytes().expect("peak reported");
    assert!((32 * MIB..=64 * MIB).contains(&peak), "peak {peak}");
    let index = slot.index();
    drop(slot);

    // The reused group starts over: no OOM kill and a peak near zero since acquire.
    let again = cgroups.acquire(&limits(64, 100, 16)).unwrap();
    assert_eq!(again.index(), index);
    assert!(!again.oom_killed());
    let peak = again.memory_peak_bytes().expect("peak reported");
    assert!(peak < 16 * MIB, "peak {peak} was not reset");
}

#[test]
fn pids_max_caps_a_fork_loop() {
    let cgroups = Guard::open(&unique_name());
    let slot = cgroups.acquire(&limits(64, 100, 5)).unwrap();
    let script = "i=0; while [ $i -lt 20 ]; do sleep 30 >/dev/null 2>&1 & i=$((i+1)); done; \
                  echo all-started";
    let output = spawn_in(&slot, "/bin/sh", &["-c", script])
        .wait_with_output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{}", output.status);
    assert!(!stdout.contains("all-started"), "{stdout}");
    assert!(stderr.to_lowercase().contains("fork"), "{stderr}");
    // The shell is gone; the sleeps it managed to start are left, fewer than the limit.
    let left = slot.pids().len();
    assert!((1..5).contains(&left), "{left} processes left");
    slot.kill_all();
    assert!(slot.pids().is_empty());
}

#[test]
fn clean_leftovers_kills_and_removes_what_a_killed_server_left() {
    let name = unique_name();
    let previous = Cgroups::open(&name).unwrap();
    let slot = previous.acquire(&limits(64, 100, 16)).unwrap();
    let mut child = spawn_in(&slot, "/bin/sleep", &["30"]);
    wait_until("the process is in the group", || {
        slot.pids() == [child.id() as i32]
    });
    let dirs = group_dirs(&slot);
    // As if the server died with SIGKILL: nothing released.
    std::mem::forget(slot);
    drop(previous);

    let cgroups = Guard::open(&name);
    assert_eq!(cgroups.clean_leftovers().unwrap(), 1);
    assert_eq!(child.wait().unwrap().signal(), Some(libc::SIGKILL));
    for dir in &dirs {
        assert!(!dir.exists(), "{} left", dir.display());
    }
    assert_eq!(cgroups.clean_leftovers().unwrap(), 0);
    let fresh = cgroups.acquire(&limits(64, 100, 16)).unwrap();
    assert_eq!(group_dirs(&fresh), dirs);
    assert!(fresh.pids().is_empty());
}

#[test]
fn clean_leftovers_spares_the_slots_of_this_server() {
    let cgroups = Guard::open(&unique_name());
    let held = cgroups.acquire(&limits(64, 100, 16)).unwrap();
    drop(cgroups.acquire(&limits(64, 100, 16)).unwrap());
    let mut child = spawn_in(&held, "/bin/sleep", &["30"]);
    wait_until("the process is in the group", || held.pids().len() == 1);
    assert_eq!(cgroups.clean_leftovers().unwrap(), 0);
    assert_eq!(held.pids(), [child.id() as i32]);
    drop(held);
    assert_eq!(child.wait().unwrap().signal(), Some(libc::SIGKILL));
}

/// Median and maximum, in milliseconds.
fn summary(mut samples: Vec<Duration>) -> String {
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    format!(
        "median {:.3} ms, max {:.3} ms ({} samples)",
        ms(samples[samples.len() / 2]),
        ms(samples[samples.len() - 1]),
        samples.len()
    )
}

const SAMPLES: usize = 10;
const IDLE_GAP: Duration = Duration::from_millis(300);

/// Moves `pid` alternately between two groups after an idle gap, timing each write.
fn time_moves(pid: u32, groups: [&Path; 2], gap: Duration) -> Vec<Duration> {
    (0..SAMPLES)
        .map(|i| {
            std::thread::sleep(gap);
            let procs = groups[i % 2].join("cgroup.procs");
            let start = Instant::now();
            fs::write(&procs, pid.to_string()).unwrap();
            start.elapsed()
        })
        .collect()
}

/// Times `spawn` (which returns once the child has exec'd) of /bin/true joining `files`
/// in its pre-exec hook, after an idle gap.
fn time_spawns(files: &[CString]) -> Vec<Duration> {
    (0..SAMPLES)
        .map(|_| {
            std::thread::sleep(IDLE_GAP);
            let mut cmd = command_in(files, "/bin/true", &[]);
            let start = Instant::now();
            let mut child = cmd.spawn().unwrap();
            let took = start.elapsed();
            child.wait().unwrap();
            took
        })
        .collect()
}

/// Two plain memory groups and a process to move between them, removed at the end.
struct PlainGroups {
    dirs: [PathBuf; 2],
    sleeper: Child,
}

impl PlainGroups {
    fn new(memory_root: &Path, name: &str) -> PlainGroups {
        let dirs = [
            memory_root.join(format!("{name}-a")),
            memory_root.join(format!("{name}-b")),
        ];
        for dir in &dirs {
            fs::create_dir(dir).unwrap();
        }
        let sleeper = Command::new("/bin/sleep").arg("600").spawn().unwrap();
        PlainGroups { dirs, sleeper }
    }
}

impl Drop for PlainGroups {
    fn drop(&mut self) {
        let _ = self.sleeper.kill();
        let _ = self.sleeper.wait();
        for dir in &self.dirs {
            if let Err(e) = fs::remove_dir(dir) {
                eprintln!("removing {}: {e}", dir.display());
            }
        }
    }
}

/// Prints how long joining cgroups takes before and after `Cgroups::open` mounts the
/// favordynmods hierarchy. Run it alone, with no other favordynmods hierarchy on the machine:
/// `cargo test -p nimbus-sandbox --test cgroup -- --ignored --nocapture`. On Linux 6.18+ the
/// "before" numbers show the slow path only on a machine where no favordynmods mount
/// happened since boot: the first one switches cgroup.procs writes to a per-process lock
/// for good.
#[test]
#[ignore = "measurement, prints timings: see its doc comment"]
fn attach_timings() {
    if expected_version() != CgroupVersion::V1 {
        println!("cgroup v2 host: the favordynmods tracking hierarchy is v1 only");
        return;
    }
    // Look at every hierarchy the kernel has, not only the mounted ones.
    let hierarchies = fs::read_to_string("/proc/self/cgroup").unwrap();
    if hierarchies
        .lines()
        .any(|l| l.contains(":name=") && !l.contains(":name=systemd:"))
    {
        println!("WARNING: other named hierarchies exist, maybe with favordynmods:\n{hierarchies}");
    }
    let info = mountinfo();
    let memory_root = info
        .lines()
        .find(|l| l.contains(" - cgroup ") && l.split(',').any(|o| o.trim() == "memory"))
        .map(|l| PathBuf::from(l.split_whitespace().nth(4).unwrap()))
        .expect("memory hierarchy");
    let name = unique_name();
    let plain = PlainGroups::new(&memory_root, &name);
    let pid = plain.sleeper.id();
    let groups = [plain.dirs[0].as_path(), plain.dirs[1].as_path()];
    let first_procs = plain.dirs[0].join("cgroup.procs");
    let first_procs = [CString::new(first_procs.as_os_str().as_bytes()).unwrap()];

    let without_idle = time_moves(pid, groups, IDLE_GAP);
    let without_busy = time_moves(pid, groups, Duration::from_millis(1));
    let no_join_spawn = time_spawns(&[]);
    let without_spawn = time_spawns(&first_procs);

    let cgroups = Guard::open(&name);
    assert!(cgroups.describe().contains("(favordynmods)"));
    let with_idle = time_moves(pid, groups, IDLE_GAP);
    let slot = cgroups.acquire(&limits(64, 100, 16)).unwrap();
    let with_spawn = time_spawns(slot.procs_files());

    println!(
        "memory cgroup move, before open, after {IDLE_GAP:?} idle: {}",
        summary(without_idle)
    );
    println!(
        "memory cgroup move, before open, back to back: {}",
        summary(without_busy)
    );
    println!(
        "memory cgroup move, favordynmods mounted, after {IDLE_GAP:?} idle: {}",
        summary(with_idle)
    );
    println!(
        "spawn /bin/true joining nothing: {}",
        summary(no_join_spawn)
    );
    println!(
        "spawn /bin/true joining 1 memory group, before open: {}",
        summary(without_spawn)
    );
    println!(
        "spawn /bin/true joining the slot's {} groups, favordynmods: {}",
        slot.procs_files().len(),
        summary(with_spawn)
    );
}
