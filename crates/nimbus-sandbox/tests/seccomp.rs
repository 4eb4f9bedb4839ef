//! The worker seccomp filter against the real kernel, probed by a real Python through
//! `ctypes`: once under the filter, once without it (the control), as root. Every denied
//! probe is harmless and would not fail with `EPERM` for root without the filter, so the
//! control run proves each `EPERM` of the filtered run comes from the filter.

use std::collections::BTreeMap;
use std::io;
use std::os::unix::process::CommandExt;
use std::process::Command;

use nimbus_sandbox::seccomp;
use seccompiler::BpfProgram;

/// Probes the filter must answer with `EPERM`.
const DENIED: &[&str] = &[
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "pidfd_getfd",
    "unshare",
    "setns",
    "clone_newns",
    "clone_newcgroup",
    "clone_newuts",
    "clone_newipc",
    "clone_newuser",
    "clone_newpid",
    "clone_newnet",
    "mount",
    "umount2",
    "pivot_root",
    "chroot",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "move_mount",
    "open_tree",
    "open_tree_attr",
    "mount_setattr",
    "open_by_handle_at",
    "name_to_handle_at",
    "kexec_load",
    "kexec_file_load",
    "init_module",
    "finit_module",
    "delete_module",
    "bpf",
    "perf_event_open",
    "userfaultfd",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "keyctl",
    "add_key",
    "request_key",
    "lookup_dcookie",
    "syslog",
    "reboot",
    "swapon",
    "swapoff",
    "acct",
    "quotactl",
    "quotactl_fd",
    "vhangup",
    "settimeofday",
    "clock_settime",
    "adjtimex",
    "clock_adjtime",
    "personality_no_aslr",
    "socket_packet",
    "socket_packet_dgram",
    "socket_inet_raw",
    "socket_inet6_raw_nonblock_cloexec",
    "socket_netlink_netfilter",
    "socket_netlink_audit_dgram",
    #[cfg(target_arch = "x86_64")]
    "iopl",
    #[cfg(target_arch = "x86_64")]
    "ioperm",
    #[cfg(target_arch = "x86_64")]
    "x32_ptrace",
];

/// The probe the filter must answer with `ENOSYS`.
const CLONE3: &str = "clone3";

/// Ordinary work that must succeed, filter or not.
const ALLOWED: &[&str] = &[
    "getpid",
    "time",
    "file_io",
    "fork",
    "clone_plain",
    "thread",
    "posix_spawn",
    "socket_inet_stream",
    "socket_inet_dgram",
    "socket_unix",
    "socket_netlink_route",
    "personality_default",
    "personality_query",
];

/// Runs each probe named on the command line and prints `{name: errno}` as JSON (errno 0:
/// the call succeeded).
/// Probes fail early on purpose (missing paths, bad descriptors, no such pid, bad flags):
/// root gets some errno other than EPERM from the kernel, and the host is left alone.
const SCRIPT: &str = r#"
import ctypes, json, os, signal, socket, sys, tempfile, threading, time

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
NR = {k: int(v) for k, v in (p.split("=") for p in os.environ["NR"].split(","))}
MISSING = b"/nonexistent-nimbus-seccomp-probe"
NO_PID = 0x3FFFFFFF  # above the largest pid_max
AT_FDCWD = -100
CLONE_NEW = {"ns": 0x20000, "cgroup": 0x2000000, "uts": 0x4000000, "ipc": 0x8000000,
             "user": 0x10000000, "pid": 0x20000000, "net": 0x40000000}

def errno_of(ret):
    return ctypes.get_errno() if ret == -1 else 0

def raw(name, *args):
    # Every argument a full register wide: ctypes passes bare ints as 32-bit ints.
    args = [ctypes.c_long(a) if isinstance(a, int) else a for a in args]
    return errno_of(libc.syscall(ctypes.c_long(NR[name]), *args))

def clone(flags):
    # Raw clone without CLONE_VM: the child is a copy of this process, like fork.
    pid = libc.syscall(ctypes.c_long(NR["clone"]), ctypes.c_long(flags | signal.SIGCHLD),
                       ctypes.c_long(0), ctypes.c_long(0), ctypes.c_long(0), ctypes.c_long(0))
    if pid == 0:
        os._exit(0)
    if pid == -1:
        return ctypes.get_errno()
    return exit_code(pid)

def exit_code(pid):
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])

def sock(family, type_, proto=0):
    fd = libc.socket(family, type_, proto)
    if fd == -1:
        return ctypes.get_errno()
    os.close(fd)
    return 0

def fork():
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    return exit_code(pid)

def thread():
    ran = []
    t = threading.Thread(target=lambda: ran.append(os.getpid()))
    t.start()
    t.join()
    return 0 if ran == [os.getpid()] else -1

def file_io():
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "f")
        with open(path, "w") as f:
            f.write("nimbus")
        with open(path) as f:
            return 0 if f.read() == "nimbus" else -1

PROBES = {
    "ptrace": lambda: raw("ptrace", 2, NO_PID, 0, 0),  # PTRACE_PEEKDATA
    "process_vm_readv": lambda: raw("process_vm_readv", os.getpid(), None, 0, None, 0, 1),
    "process_vm_writev": lambda: raw("process_vm_writev", os.getpid(), None, 0, None, 0, 1),
    "pidfd_getfd": lambda: raw("pidfd_getfd", -1, 0, 0),
    "unshare": lambda: raw("unshare", CLONE_NEW["uts"]),
    "setns": lambda: raw("setns", -1, 0),
    **{f"clone_new{name}": (lambda flag=flag: clone(flag)) for name, flag in CLONE_NEW.items()},
    "mount": lambda: raw("mount", b"none", MISSING, b"tmpfs", 0, None),
    "umount2": lambda: raw("umount2", MISSING, 0),
    "pivot_root": lambda: raw("pivot_root", MISSING, MISSING),
    "chroot": lambda: raw("chroot", MISSING),
    "fsopen": lambda: raw("fsopen", b"nimbus-no-such-fs", 0),
    "fsconfig": lambda: raw("fsconfig", -1, 0, None, None, 0),
    "fsmount": lambda: raw("fsmount", -1, 0, 0),
    "fspick": lambda: raw("fspick", AT_FDCWD, MISSING, 0),
    "move_mount": lambda: raw("move_mount", AT_FDCWD, MISSING, AT_FDCWD, MISSING, 0),
    "open_tree": lambda: raw("open_tree", AT_FDCWD, MISSING, 0),
    "open_tree_attr": lambda: raw("open_tree_attr", AT_FDCWD, MISSING, 0, None, 0),
    "mount_setattr": lambda: raw("mount_setattr", AT_FDCWD, MISSING, 0, None, 0),
    "open_by_handle_at": lambda: raw("open_by_handle_at", -1, None, 0),
    "name_to_handle_at": lambda: raw("name_to_handle_at", AT_FDCWD, MISSING, None, None, 0),
    "kexec_load": lambda: raw("kexec_load", 0, 0, None, 0xDEAD0000),
    "kexec_file_load": lambda: raw("kexec_file_load", -1, -1, 0, None, 0xDEAD0000),
    "init_module": lambda: raw("init_module", None, 0, b""),
    "finit_module": lambda: raw("finit_module", -1, b"", 0),
    "delete_module": lambda: raw("delete_module", b"nimbus_no_such_module", 0),
    "bpf": lambda: raw("bpf", 0xFFFF, None, 0),
    "perf_event_open": lambda: raw("perf_event_open", None, 0, -1, -1, -1),  # bad flags
    "userfaultfd": lambda: raw("userfaultfd", 2),  # bad flags
    "io_uring_setup": lambda: raw("io_uring_setup", 1, None),
    "io_uring_enter": lambda: raw("io_uring_enter", -1, 0, 0, 0, None, 0),
    "io_uring_register": lambda: raw("io_uring_register", -1, 0, None, 0),
    "keyctl": lambda: raw("keyctl", 0xFFFF),
    "add_key": lambda: raw("add_key", None, None, None, 0, 0),
    "request_key": lambda: raw("request_key", None, None, None, 0),
    "lookup_dcookie": lambda: raw("lookup_dcookie", 0, None, 0),
    "syslog": lambda: raw("syslog", 10, None, 0),  # SYSLOG_ACTION_SIZE_BUFFER: read-only
    "reboot": lambda: raw("reboot", 0, 0, 0, None),  # wrong magic
    "swapon": lambda: raw("swapon", MISSING, 0),
    "swapoff": lambda: raw("swapoff", MISSING),
    "acct": lambda: raw("acct", MISSING),
    "quotactl": lambda: raw("quotactl", 0xFF, None, 0, None),
    "quotactl_fd": lambda: raw("quotactl_fd", -1, 0, 0, None),
    "vhangup": lambda: raw("vhangup"),  # no controlling terminal: the test calls setsid
    "settimeofday": lambda: raw("settimeofday", None, None),  # sets nothing
    "clock_settime": lambda: raw("clock_settime", 1000, None),  # no such clock
    "adjtimex": lambda: raw("adjtimex", None),
    "clock_adjtime": lambda: raw("clock_adjtime", 1000, None),
    "personality_no_aslr": lambda: raw("personality", 0x0040000),  # ADDR_NO_RANDOMIZE
    "iopl": lambda: raw("iopl", 4),  # above the highest level
    "ioperm": lambda: raw("ioperm", 0, 0, 0),
    "x32_ptrace": lambda: raw("x32_ptrace", 2, NO_PID, 0, 0),
    "socket_packet": lambda: sock(socket.AF_PACKET, socket.SOCK_RAW),
    "socket_packet_dgram": lambda: sock(socket.AF_PACKET, socket.SOCK_DGRAM),
    "socket_inet_raw": lambda: sock(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP),
    "socket_inet6_raw_nonblock_cloexec": lambda: sock(
        socket.AF_INET6, socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
        socket.IPPROTO_ICMPV6),
    "clone3": lambda: raw("clone3", None, 0),
    "getpid": lambda: 0 if os.getpid() > 1 else -1,
    "time": lambda: 0 if time.time() > 1.7e9 else -1,
    "file_io": file_io,
    "fork": fork,
    "clone_plain": lambda: clone(0),
    "thread": thread,
    "posix_spawn": lambda: exit_code(os.posix_spawn("/bin/true", ["true"], {})),
    "socket_inet_stream": lambda: sock(socket.AF_INET, socket.SOCK_STREAM),
    "socket_inet_dgram": lambda: sock(socket.AF_INET, socket.SOCK_DGRAM),
    "socket_unix": lambda: sock(socket.AF_UNIX, socket.SOCK_STREAM),
    "socket_netlink_route": lambda: sock(socket.AF_NETLINK, socket.SOCK_RAW, 0),  # NETLINK_ROUTE
    "socket_netlink_netfilter": lambda: sock(socket.AF_NETLINK, socket.SOCK_RAW, 12),
    "socket_netlink_audit_dgram": lambda: sock(socket.AF_NETLINK, socket.SOCK_DGRAM, 9),
    "personality_default": lambda: raw("personality", 0),  # PER_LINUX
    "personality_query": lambda: raw("personality", 0xFFFFFFFF),
}

print(json.dumps({name: PROBES[name]() for name in sys.argv[1:]}))
"#;

/// The system call numbers the script needs, from the build target's `libc`.
const NUMBERS: &[(&str, libc::c_long)] = &[
    ("ptrace", libc::SYS_ptrace),
    ("process_vm_readv", libc::SYS_process_vm_readv),
    ("process_vm_writev", libc::SYS_process_vm_writev),
    ("pidfd_getfd", libc::SYS_pidfd_getfd),
    ("unshare", libc::SYS_unshare),
    ("setns", libc::SYS_setns),
    ("clone", libc::SYS_clone),
    ("clone3", libc::SYS_clone3),
    ("mount", libc::SYS_mount),
    ("umount2", libc::SYS_umount2),
    ("pivot_root", libc::SYS_pivot_root),
    ("chroot", libc::SYS_chroot),
    ("fsopen", libc::SYS_fsopen),
    ("fsconfig", libc::SYS_fsconfig),
    ("fsmount", libc::SYS_fsmount),
    ("fspick", libc::SYS_fspick),
    ("move_mount", libc::SYS_move_mount),
    ("open_tree", libc::SYS_open_tree),
    // Linux 6.15, not in libc yet; one number on every architecture.
    ("open_tree_attr", 467),
    ("mount_setattr", libc::SYS_mount_setattr),
    ("open_by_handle_at", libc::SYS_open_by_handle_at),
    ("name_to_handle_at", libc::SYS_name_to_handle_at),
    ("kexec_load", libc::SYS_kexec_load),
    ("kexec_file_load", libc::SYS_kexec_file_load),
    ("init_module", libc::SYS_init_module),
    ("finit_module", libc::SYS_finit_module),
    ("delete_module", libc::SYS_delete_module),
    ("bpf", libc::SYS_bpf),
    ("perf_event_open", libc::SYS_perf_event_open),
    ("userfaultfd", libc::SYS_userfaultfd),
    ("io_uring_setup", libc::SYS_io_uring_setup),
    ("io_uring_enter", libc::SYS_io_uring_enter),
    ("io_uring_register", libc::SYS_io_uring_register),
    ("keyctl", libc::SYS_keyctl),
    ("add_key", libc::SYS_add_key),
    ("request_key", libc::SYS_request_key),
    ("lookup_dcookie", libc::SYS_lookup_dcookie),
    ("syslog", libc::SYS_syslog),
    ("reboot", libc::SYS_reboot),
    ("swapon", libc::SYS_swapon),
    ("swapoff", libc::SYS_swapoff),
    ("acct", libc::SYS_acct),
    ("quotactl", libc::SYS_quotactl),
    ("quotactl_fd", libc::SYS_quotactl_fd),
    ("vhangup", libc::SYS_vhangup),
    ("settimeofday", libc::SYS_settimeofday),
    ("clock_settime", libc::SYS_clock_settime),
    ("adjtimex", libc::SYS_adjtimex),
    ("clock_adjtime", libc::SYS_clock_adjtime),
    ("personality", libc::SYS_personality),
    #[cfg(target_arch = "x86_64")]
    ("iopl", libc::SYS_iopl),
    #[cfg(target_arch = "x86_64")]
    ("ioperm", libc::SYS_ioperm),
    // ptrace in the x32 ABI: its own number, with __X32_SYSCALL_BIT.
    #[cfg(target_arch = "x86_64")]
    ("x32_ptrace", 0x4000_0000 | 521),
];

/// [`NUMBERS`] as the script reads them: `name=number,…`.
fn syscall_numbers() -> String {
    NUMBERS
        .iter()
        .map(|(name, nr)| format!("{name}={nr}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Runs `probes` in `/usr/bin/python3` in its own session (no controlling terminal for
/// `vhangup` to hang up), under `filter` if given; returns each probe's errno.
fn run(filter: Option<&BpfProgram>, probes: &[&str]) -> BTreeMap<String, i32> {
    // Copied before the fork: the hook below must not allocate.
    let filter = filter.cloned();
    let mut command = Command::new("/usr/bin/python3");
    command
        .args(["-I", "-S", "-c", SCRIPT])
        .args(probes)
        .env_clear()
        .env("NR", syscall_numbers());
    // SAFETY: the hook makes only async-signal-safe calls and allocates nothing.
    unsafe {
        command.pre_exec(move || {
            if libc::setsid() == -1 {
                return Err(io::Error::last_os_error());
            }
            match &filter {
                Some(filter) => seccomp::install(filter),
                None => Ok(()),
            }
        });
    }
    let output = command.output().expect("starting /usr/bin/python3");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "probe script failed ({}):\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let results: BTreeMap<String, i32> =
        serde_json::from_str(&stdout).expect("the script's JSON report");
    let mut expected: Vec<&str> = probes.to_vec();
    expected.sort_unstable();
    assert_eq!(
        results.keys().map(String::as_str).collect::<Vec<_>>(),
        expected
    );
    results
}

/// Every probe, the denied ones first.
fn all_probes() -> Vec<&'static str> {
    let mut probes = DENIED.to_vec();
    probes.push(CLONE3);
    probes.extend(ALLOWED);
    probes
}

/// The probes among `names` whose errno is not `ok`, with their errno.
fn unexpected(
    results: &BTreeMap<String, i32>,
    names: &[&'static str],
    ok: impl Fn(i32) -> bool,
) -> Vec<(&'static str, i32)> {
    names
        .iter()
        .map(|name| (*name, results[*name]))
        .filter(|(_, errno)| !ok(*errno))
        .collect()
}

#[test]
fn filter_denies_dangerous_calls_and_allows_ordinary_work() {
    let filter = seccomp::worker_filter().expect("building the filter");
    let results = run(Some(&filter), &all_probes());

    let wrong = unexpected(&results, DENIED, |errno| errno == libc::EPERM);
    assert!(
        wrong.is_empty(),
        "denied calls not answered EPERM: {wrong:?}"
    );
    assert_eq!(results[CLONE3], libc::ENOSYS, "clone3 must answer ENOSYS");
    let wrong = unexpected(&results, ALLOWED, |errno| errno == 0);
    assert!(wrong.is_empty(), "ordinary work failed: {wrong:?}");
}

#[test]
fn without_the_filter_root_gets_other_answers() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(euid, 0, "the control run must run as root");
    let results = run(None, &all_probes());

    let wrong = unexpected(&results, DENIED, |errno| errno != libc::EPERM);
    assert!(wrong.is_empty(), "EPERM without the filter: {wrong:?}");
    assert_ne!(
        results[CLONE3],
        libc::ENOSYS,
        "clone3 exists without the filter"
    );
    // The namespaces the filter refuses are root's to create without it.
    let namespaces: Vec<_> = DENIED
        .iter()
        .copied()
        .filter(|name| *name == "unshare" || name.starts_with("clone_new"))
        .collect();
    let wrong = unexpected(&results, &namespaces, |errno| errno == 0);
    assert!(
        wrong.is_empty(),
        "namespaces failed without the filter: {wrong:?}"
    );
    let wrong = unexpected(&results, ALLOWED, |errno| errno == 0);
    assert!(
        wrong.is_empty(),
        "ordinary work failed without the filter: {wrong:?}"
    );
}
