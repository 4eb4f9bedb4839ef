//! The seccomp filter every function worker runs under (SPEC §5 "Isolation").
//!
//! Default allow: a worker is arbitrary code in arbitrary runtimes, so an allow-list would
//! break them one by one. Instead the calls of the deny table below (kernel attack surface,
//! or ways out of the sandbox the namespaces build) answer `EPERM`, which programs handle as
//! "not permitted here", where a kill would look like a crash.
//!
//! [`worker_filter`] compiles the table with `seccompiler` once; [`install`] applies it in
//! each new worker without allocating, so it is safe between `fork` and `exec`.
//!
//! Cost: calls whose answer depends only on their number (all but `clone`, `socket` and
//! `personality`) are answered from the kernel's per-call action cache (Linux 5.11+)
//! without running the filter, so they cost what any filter costs (~40 ns on the test VM:
//! the kernel's seccomp entry path); the three others run it, ~20 ns more.

use std::collections::BTreeMap;
use std::io;
use std::mem::offset_of;

use seccompiler::{
    sock_filter, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
};
use When::{Always, Any};

/// Why the worker filter could not be built.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The build target is neither x86_64 nor aarch64, the architectures the table is for.
    #[error("no seccomp filter for architecture {0} (supported: x86_64, aarch64)")]
    UnsupportedArch(&'static str),
    /// seccompiler rejected the table.
    #[error("compiling the seccomp filter: {0}")]
    Compile(seccompiler::BackendError),
}

impl From<seccompiler::BackendError> for SeccompError {
    fn from(error: seccompiler::BackendError) -> Self {
        SeccompError::Compile(error)
    }
}

/// The filter of a function worker: dangerous calls answer `EPERM`.
///
/// Build it once and reuse it for every instance: it depends only on the build target.
pub fn worker_filter() -> Result<BpfProgram, SeccompError> {
    compile(&[])
}

/// The namespaces a child forked from a template unshares to enter its own sandbox: all
/// but the network namespace, which only a function with outbound network needs (for a
/// link of its own); the others keep the template's, empty, in which no process of theirs
/// holds a capability.
pub const fn instance_namespaces(outbound: bool) -> libc::c_int {
    let all = libc::CLONE_NEWUSER
        | libc::CLONE_NEWNS
        | libc::CLONE_NEWIPC
        | libc::CLONE_NEWUTS
        | libc::CLONE_NEWPID;
    if outbound {
        all | libc::CLONE_NEWNET
    } else {
        all
    }
}

/// The `mount` flags a forked child uses to build its private `/tmp`, `/dev/shm` and
/// `/proc` and to show its code again on top of the new `/tmp`.
pub const INSTANCE_MOUNT_FLAGS: [libc::c_ulong; 3] = [
    libc::MS_NOSUID | libc::MS_NODEV,
    libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
    libc::MS_BIND | libc::MS_REC,
];

/// The filter of a template (an initialized worker that children are forked from): the
/// worker filter, except that `unshare` with exactly [`instance_namespaces`] and `mount`
/// with one of [`INSTANCE_MOUNT_FLAGS`] are allowed, which is what each forked child needs
/// to enter its own namespaces before it installs the worker filter on top (filters stack:
/// the child then runs under both). Those calls give a process nothing over the host: a
/// new user namespace is what any unprivileged Linux user may create; the cost is the
/// kernel code they open to the template's own init code (see docs/SECURITY.md). Without
/// `outbound`, no new network namespace: no network capabilities anywhere.
pub fn template_filter(outbound: bool) -> Result<BpfProgram, SeccompError> {
    const MOUNT: &[&[Arg]] = &[&[
        ne(3, INSTANCE_MOUNT_FLAGS[0]),
        ne(3, INSTANCE_MOUNT_FLAGS[1]),
        ne(3, INSTANCE_MOUNT_FLAGS[2]),
    ]];
    const ISOLATED: &[&[Arg]] = &[&[ne(0, instance_namespaces(false) as u64)]];
    const OUTBOUND: &[&[Arg]] = &[&[ne(0, instance_namespaces(true) as u64)]];
    compile(&[
        (
            libc::SYS_unshare,
            Any(if outbound { OUTBOUND } else { ISOLATED }),
        ),
        (libc::SYS_mount, Any(MOUNT)),
    ])
}

/// Compiles [`DENIED`] with the rows of `overrides` in place of the table's own.
fn compile(overrides: &[(libc::c_long, When)]) -> Result<BpfProgram, SeccompError> {
    let arch = if cfg!(target_arch = "x86_64") {
        TargetArch::x86_64
    } else if cfg!(target_arch = "aarch64") {
        TargetArch::aarch64
    } else {
        return Err(SeccompError::UnsupportedArch(std::env::consts::ARCH));
    };
    let mut table = BTreeMap::new();
    for (nr, when) in DENIED {
        let when = overrides
            .iter()
            .find(|(o, _)| o == nr)
            .map_or(when, |(_, w)| w);
        let rules = match when {
            // No rule: the call matches whatever its arguments.
            Always => Vec::new(),
            Any(alternatives) => alternatives
                .iter()
                .map(|tests| rule(tests))
                .collect::<Result<_, _>>()?,
        };
        table.insert(*nr, rules);
    }
    let table: BpfProgram = SeccompFilter::new(
        table,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )?
    .try_into()?;
    let mut program = prologue();
    program.extend(table);
    Ok(program)
}

/// The seccompiler rule that holds when all `tests` hold.
fn rule(tests: &[Arg]) -> Result<SeccompRule, seccompiler::BackendError> {
    let conditions = tests
        .iter()
        .map(|test| {
            SeccompCondition::new(
                test.index,
                // Every tested argument is an `int`, or (`clone`) flags the kernel truncates
                // to 32 bits: the low half is what counts.
                SeccompCmpArgLen::Dword,
                test.op.clone(),
                test.value,
            )
        })
        .collect::<Result<_, _>>()?;
    SeccompRule::new(conditions)
}

/// Installs `filter` on the calling thread (and what it execs or forks), setting
/// `no_new_privs` first, as unprivileged seccomp requires.
///
/// Async-signal-safe, it allocates nothing: usable in a pre-exec hook or right after `clone`.
pub fn install(filter: &BpfProgram) -> io::Result<()> {
    // `apply_filter` is `prctl(PR_SET_NO_NEW_PRIVS)` then `seccomp(2)`, and its errors carry
    // a bare errno: no allocation on any path.
    seccompiler::apply_filter(filter).map_err(|error| match error {
        seccompiler::Error::Prctl(e) | seccompiler::Error::Seccomp(e) => e,
        // An empty program, the one other failure without TSYNC. No allocation either.
        _ => io::ErrorKind::InvalidInput.into(),
    })
}

/// When a call of the deny table is denied.
enum When {
    /// Whatever its arguments.
    Always,
    /// When all the tests of any one of these lists hold.
    Any(&'static [&'static [Arg]]),
}

/// A test of the low 32 bits of one argument.
struct Arg {
    index: u8,
    op: SeccompCmpOp,
    value: u64,
}

/// Argument `index` has every bit of `bits` set.
const fn has(index: u8, bits: libc::c_int) -> Arg {
    Arg {
        index,
        op: SeccompCmpOp::MaskedEq(bits as u64),
        value: bits as u64,
    }
}

/// Argument `index`, masked with `mask`, equals `value`.
const fn masked(index: u8, mask: u64, value: libc::c_int) -> Arg {
    Arg {
        index,
        op: SeccompCmpOp::MaskedEq(mask),
        value: value as u64,
    }
}

/// Argument `index` equals `value`.
const fn eq(index: u8, value: u64) -> Arg {
    Arg {
        index,
        op: SeccompCmpOp::Eq,
        value,
    }
}

/// Argument `index` differs from `value`.
const fn ne(index: u8, value: u64) -> Arg {
    Arg {
        index,
        op: SeccompCmpOp::Ne,
        value,
    }
}

/// `clone` asking for any new namespace. The flags are argument 0 on x86_64 and aarch64
/// alike (the two differ only in the order of `tls` and `child_tid`). `CLONE_NEWTIME` is
/// absent: in `clone` its bit is part of the exit signal; only `unshare` and `clone3`, both
/// denied, can ask for it.
const NEW_NAMESPACE: &[&[Arg]] = &[
    &[has(0, libc::CLONE_NEWNS)],
    &[has(0, libc::CLONE_NEWCGROUP)],
    &[has(0, libc::CLONE_NEWUTS)],
    &[has(0, libc::CLONE_NEWIPC)],
    &[has(0, libc::CLONE_NEWUSER)],
    &[has(0, libc::CLONE_NEWPID)],
    &[has(0, libc::CLONE_NEWNET)],
];

/// The kernel's `SOCK_TYPE_MASK`: the type without `SOCK_NONBLOCK` and `SOCK_CLOEXEC`.
const SOCK_TYPE_MASK: u64 = 0xf;

/// A socket of any family but Unix, IPv4, IPv6 and netlink (AF_PACKET sniffs and forges
/// traffic; AF_VSOCK reaches the hypervisor and is not confined by network namespaces;
/// AF_ALG, AF_BLUETOOTH and the rest are kernel attack surface a function does not need),
/// a `SOCK_RAW` socket of any family but netlink (glibc's `getaddrinfo` and
/// `if_nameindex` open `socket(AF_NETLINK, SOCK_RAW, NETLINK_ROUTE)`), or a netlink socket
/// of another protocol than `NETLINK_ROUTE`.
const ODD_SOCKET: &[&[Arg]] = &[
    &[
        ne(0, libc::AF_UNIX as u64),
        ne(0, libc::AF_INET as u64),
        ne(0, libc::AF_INET6 as u64),
        ne(0, libc::AF_NETLINK as u64),
    ],
    &[
        masked(1, SOCK_TYPE_MASK, libc::SOCK_RAW),
        ne(0, libc::AF_NETLINK as u64),
    ],
    // Netlink other than NETLINK_ROUTE (netfilter, audit, crypto, …): kernel attack
    // surface, reachable with capabilities in a user namespace of one's own.
    &[
        eq(0, libc::AF_NETLINK as u64),
        ne(2, libc::NETLINK_ROUTE as u64),
    ],
];

/// A socket pair of any family but Unix.
const ODD_SOCKET_PAIR: &[&[Arg]] = &[&[ne(0, libc::AF_UNIX as u64)]];

/// `personality(PER_LINUX)`, the default persona.
const PER_LINUX: u64 = 0;
/// `personality(0xffffffff)` only reads the current persona.
const PERSONA_QUERY: u64 = 0xffff_ffff;

/// Any persona but the default (`ADDR_NO_RANDOMIZE`, `READ_IMPLIES_EXEC`… weaken the
/// exploit mitigations of what the worker execs).
const ODD_PERSONA: &[&[Arg]] = &[&[ne(0, PER_LINUX), ne(0, PERSONA_QUERY)]];

/// `open_tree_attr` (Linux 6.15), not in `libc` yet: the same number on every architecture.
const SYS_OPEN_TREE_ATTR: libc::c_long = 467;

/// The calls that answer `EPERM`, with why. `clone3` and, on x86_64, the x32 ABI are denied
/// by [`prologue`], since they need other answers than this table's single action.
#[rustfmt::skip]
const DENIED: &[(libc::c_long, When)] = &[
    // Other processes.
    (libc::SYS_ptrace, Always),             // reads and writes other processes' memory, registers
    (libc::SYS_process_vm_readv, Always),   // reads another process's memory
    (libc::SYS_process_vm_writev, Always),  // writes another process's memory
    (libc::SYS_pidfd_getfd, Always),        // copies file descriptors out of another process
    // Namespaces: a new one makes the worker root in it, and opens kernel code to root.
    (libc::SYS_unshare, Always),            // creates namespaces
    (libc::SYS_setns, Always),              // joins another namespace
    (libc::SYS_clone, Any(NEW_NAMESPACE)),  // clone into new namespaces, as unshare
    // Mounts: the filesystem view the sandbox is built of.
    (libc::SYS_mount, Always),              // changes the sandbox's filesystem view
    (libc::SYS_umount2, Always),            // uncovers what the sandbox's mounts hide
    (libc::SYS_pivot_root, Always),         // swaps the root filesystem
    (libc::SYS_chroot, Always),             // changes the root directory (chroot escapes)
    (libc::SYS_fsopen, Always),             // new mount API: mount by another name
    (libc::SYS_fsconfig, Always),           // new mount API: mount by another name
    (libc::SYS_fsmount, Always),            // new mount API: mount by another name
    (libc::SYS_fspick, Always),             // new mount API: remount by another name
    (libc::SYS_move_mount, Always),         // new mount API: mount by another name
    (libc::SYS_open_tree, Always),          // new mount API: bind mount by another name
    (SYS_OPEN_TREE_ATTR, Always),           // new mount API: bind mount by another name
    (libc::SYS_mount_setattr, Always),      // new mount API: changes mount flags
    (libc::SYS_open_by_handle_at, Always),  // opens files past path checks ("shocker" escape)
    (libc::SYS_name_to_handle_at, Always),  // makes the handles open_by_handle_at takes
    // The kernel itself.
    (libc::SYS_kexec_load, Always),         // replaces the running kernel
    (libc::SYS_kexec_file_load, Always),    // replaces the running kernel
    (libc::SYS_init_module, Always),        // loads kernel code
    (libc::SYS_finit_module, Always),       // loads kernel code
    (libc::SYS_delete_module, Always),      // unloads kernel code
    (libc::SYS_bpf, Always),                // loads programs into the kernel
    (libc::SYS_perf_event_open, Always),    // kernel profiling: exploits, side channels
    (libc::SYS_userfaultfd, Always),        // stalls kernel page faults: widens exploit races
    (libc::SYS_io_uring_setup, Always),     // io_uring: its operations bypass seccomp
    (libc::SYS_io_uring_enter, Always),     // io_uring: its operations bypass seccomp
    (libc::SYS_io_uring_register, Always),  // io_uring: its operations bypass seccomp
    (libc::SYS_keyctl, Always),             // kernel keyrings: not fully namespaced
    (libc::SYS_add_key, Always),            // kernel keyrings: not fully namespaced
    (libc::SYS_request_key, Always),        // kernel keyrings: not fully namespaced
    (libc::SYS_lookup_dcookie, Always),     // profiling interface, leaks kernel paths
    (libc::SYS_syslog, Always),             // kernel log: kernel addresses, other tenants
    // The host machine.
    (libc::SYS_reboot, Always),             // reboots or halts the host
    (libc::SYS_swapon, Always),             // changes the host's swap
    (libc::SYS_swapoff, Always),            // changes the host's swap
    (libc::SYS_acct, Always),               // starts host-wide process accounting
    (libc::SYS_quotactl, Always),           // changes disk quotas
    (libc::SYS_quotactl_fd, Always),        // changes disk quotas
    (libc::SYS_vhangup, Always),            // hangs up the terminal
    (libc::SYS_settimeofday, Always),       // sets the host clock
    (libc::SYS_clock_settime, Always),      // sets the host clock
    (libc::SYS_adjtimex, Always),           // adjusts the host clock
    (libc::SYS_clock_adjtime, Always),      // adjusts the host clock
    #[cfg(target_arch = "x86_64")]
    (libc::SYS_iopl, Always),               // raw hardware I/O ports
    #[cfg(target_arch = "x86_64")]
    (libc::SYS_ioperm, Always),             // raw hardware I/O ports
    // Networking, on top of the network namespace.
    (libc::SYS_socket, Any(ODD_SOCKET)),    // only unix, inet, inet6, netlink; no raw sockets
    (libc::SYS_socketpair, Any(ODD_SOCKET_PAIR)), // only unix socket pairs
    // Exploit mitigations.
    (libc::SYS_personality, Any(ODD_PERSONA)), // personas that turn off ASLR or NX
];

/// Denials run before the compiled table. seccompiler gives every rule of a filter the same
/// action, so the two that need another answer are written here. They only ever deny, so
/// running them before the table's architecture check cannot let anything through; and
/// they read only the call number, which keeps the kernel's action cache usable.
fn prologue() -> BpfProgram {
    let mut program = vec![
        load(offset_of!(libc::seccomp_data, nr)),
        // clone3 passes its flags in memory, which seccomp cannot read, so the namespace check
        // on `clone` cannot apply to it. ENOSYS ("no such call") makes glibc's pthread_create
        // and posix_spawn fall back to `clone`; EPERM would make them fail. The usual answer
        // (Docker's default profile, systemd's RestrictNamespaces).
        jump(libc::BPF_JEQ, libc::SYS_clone3 as u32, 0, 1),
        ret_errno(libc::ENOSYS),
    ];
    if cfg!(target_arch = "x86_64") {
        // x32 ABI calls (`nr | __X32_SYSCALL_BIT`) report AUDIT_ARCH_X86_64 too, so the
        // table's architecture check lets them in, under other numbers (x32 ptrace is 521).
        // No worker needs x32: deny all of it.
        const X32_SYSCALL_BIT: u32 = 0x4000_0000;
        program.extend([
            jump(libc::BPF_JSET, X32_SYSCALL_BIT, 0, 1),
            ret_errno(libc::EPERM),
        ]);
    }
    program
}

/// Loads the 32-bit word at `offset` of `struct seccomp_data`.
fn load(offset: usize) -> sock_filter {
    sock_filter {
        code: (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16,
        jt: 0,
        jf: 0,
        k: offset as u32,
    }
}

/// Compares the loaded word with `k` (`op`: `BPF_JEQ`, `BPF_JSET`…) and skips `jt` or `jf`
/// instructions.
fn jump(op: u32, k: u32, jt: u8, jf: u8) -> sock_filter {
    sock_filter {
        code: (libc::BPF_JMP | op | libc::BPF_K) as u16,
        jt,
        jf,
        k,
    }
}

/// Fails the call with `errno`.
fn ret_errno(errno: libc::c_int) -> sock_filter {
    sock_filter {
        code: (libc::BPF_RET | libc::BPF_K) as u16,
        jt: 0,
        jf: 0,
        k: libc::SECCOMP_RET_ERRNO | (errno as u32 & libc::SECCOMP_RET_DATA),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    /// Rules are keyed by call number: a second row for one call would silently replace the
    /// first.
    #[test]
    fn each_call_has_one_row() {
        let mut seen = BTreeSet::new();
        for (nr, _) in DENIED {
            assert!(seen.insert(nr), "call {nr} has two rows");
        }
    }
}
