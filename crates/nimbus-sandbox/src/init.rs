//! The sandbox init: the small program that builds one instance's sandbox and starts the
//! worker in it.
//!
//! The process driver starts it (`nimbus __sandbox-init`, or the `nimbus-sandbox-init`
//! binary in tests) already inside the instance's cgroups, as the leader of its own process
//! group, with the worker's socket on fd 3 and an [`InitSpec`] as JSON on stdin. It is
//! single-threaded, so the child it clones may allocate freely. Then:
//!
//! 1. it clones a child into new user, pid, mount, network, IPC and UTS namespaces;
//! 2. still root of the host, it maps the child's uid and gid 0 to the instance's host id and
//!    1000 to the next one, both unprivileged on the host;
//! 3. the child, PID 1 of its pid namespace, builds a read-only root of bind mounts (the
//!    runtime, its libraries and the function's code, nothing else of the host), a private
//!    size-limited `/tmp`, its own `/proc` and a minimal `/dev`; pivots into it; drops to
//!    uid 1000 with no capabilities; sets rlimits, the parent-death signal and the seccomp
//!    filter (which also sets `no_new_privs`); and execs the worker;
//! 4. the init waits for the worker and exits as it did, so the server sees the worker's
//!    status. When the worker (PID 1) ends, the kernel kills everything left in its pid
//!    namespace, and the empty network namespace disappears with it.

use std::ffi::CString;
use std::fs;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::symlink;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Context, Result};
use nix::fcntl::OFlag;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::CloneFlags;
use nix::sys::resource::{setrlimit, Resource};
use nix::sys::signal::{kill, signal, SigHandler};
use nix::sys::statvfs::{statvfs, FsFlags};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{pipe2, pivot_root, sethostname, setresgid, setresuid, Gid, Pid, Uid};
use serde::{Deserialize, Serialize};

use crate::network::{self, Link, OutboundSpec};
use crate::{seccomp, WORKER_SOCKET_FD};

/// The uid and gid the worker runs as inside its sandbox.
pub const WORKER_ID: u32 = 1000;

/// Everything the init needs, sent by the driver as JSON on stdin.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InitSpec {
    /// The worker program (absolute, visible inside).
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<String>,
    /// Its complete environment.
    pub env: Vec<(String, String)>,
    /// Its working directory: the function's code, made visible read-only.
    pub workdir: PathBuf,
    /// Host paths made visible read-only at the same path inside: files, directories, or
    /// symlinks (recreated, with their targets made visible too). Missing ones are skipped.
    pub visible: Vec<PathBuf>,
    /// Host uid and gid of the sandbox's root; the worker runs as `host_id + 1`.
    pub host_id: u32,
    /// An empty host directory to build the new root on (only a mount point: the tmpfs is
    /// mounted in the sandbox's own mount namespace, so the host sees nothing there).
    pub root_dir: PathBuf,
    /// Size of the private `/tmp`, MiB.
    pub tmp_mb: u32,
    /// Most open files of the worker.
    pub max_open_files: u64,
    /// Most processes of the worker's host uid (the pids cgroup bounds the group too).
    pub max_processes: u64,
    /// For an outbound function, what its link needs (the init reserves the link); none:
    /// an empty network namespace.
    pub outbound: Option<OutboundSpec>,
    /// The worker is a template: it runs under the template filter, and its root carries
    /// [`FORK_CONFIG`], what its forked children need to enter sandboxes of their own.
    #[serde(default)]
    pub template: bool,
}

/// Where a template finds, inside its sandbox, the [`ForkConfig`] of its children.
pub const FORK_CONFIG: &str = "/.nimbus/fork.json";

/// What a child forked from a template needs to enter its own sandbox (written by the init
/// as [`FORK_CONFIG`]; read by the runtime's template code, which does the steps).
///
/// The child unshares `namespaces`, maps its own ids, forks once more (to be PID 1 of its
/// new pid namespace), mounts a private `/tmp` and `/dev/shm` of `tmp_mb` and its own
/// `/proc` (with one of `mount_flags` each), binds `rebind` again on top of the new `/tmp`
/// (code and runtime files that live under `/tmp` on the host), drops its capabilities and
/// installs `filter` (the worker filter, hex of the raw `sock_filter` array).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ForkConfig {
    /// `unshare` flags.
    pub namespaces: i32,
    /// The allowed `mount` flags: private tmpfs, `/proc` and `/dev/shm`, recursive bind.
    pub mount_flags: [u64; 3],
    /// Size of the private `/tmp` and `/dev/shm`, MiB.
    pub tmp_mb: u32,
    /// Paths exposed under `/tmp` or `/dev/shm`, to bind again on top of the fresh ones.
    pub rebind: Vec<PathBuf>,
    /// Symlinks recreated there, `(path, target)`.
    pub links: Vec<(PathBuf, PathBuf)>,
    /// The worker seccomp filter, hex.
    pub filter: String,
}

/// Runs the init: reads the spec from stdin, builds the sandbox, execs the worker and exits
/// with its status. Never returns.
pub fn main() -> ! {
    let code = match run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("nimbus sandbox: {e:#}");
            125
        }
    };
    std::process::exit(code)
}

/// Builds the sandbox of the spec on stdin and mirrors its worker's exit: the init's exit
/// code.
fn run() -> Result<i32> {
    let mut input = String::new();
    std::io::stdin()
        .read_to_string(&mut input)
        .context("reading the spec from stdin")?;
    let spec: InitSpec = serde_json::from_str(&input).context("parsing the spec")?;
    let worker_filter = seccomp::worker_filter().context("building the seccomp filter")?;
    let (filter, fork_config) = if spec.template {
        let filter = seccomp::template_filter(spec.outbound.is_some())
            .context("building the seccomp filter")?;
        (filter, Some(filter_hex(&worker_filter)))
    } else {
        (worker_filter, None)
    };
    let link = spec
        .outbound
        .as_ref()
        .map(network::reserve)
        .transpose()
        // A network error's message names its cause already: as a plain message, `main`'s
        // `{e:#}` does not repeat it.
        .map_err(anyhow::Error::msg)?;
    let inside_link = link.as_ref().map(|(link, _)| link.clone());

    // `go` releases the child once its id maps exist; `report` carries a setup error back;
    // `status` carries the worker's wait status from the sandbox's PID 1. All close on
    // exec: the worker inherits none, and a successful exec leaves `report` empty.
    let (go_read, go_write) = pipe2(OFlag::O_CLOEXEC).context("pipe")?;
    let go_write = fs::File::from(go_write);
    let (report_read, report_write) = pipe2(OFlag::O_CLOEXEC).context("pipe")?;
    let (report_read, report_write) = (fs::File::from(report_read), fs::File::from(report_write));
    let (status_read, status_write) = pipe2(OFlag::O_CLOEXEC).context("pipe")?;
    let (status_read, status_write) = (fs::File::from(status_read), fs::File::from(status_write));
    let flags = CloneFlags::CLONE_NEWUSER
        | CloneFlags::CLONE_NEWPID
        | CloneFlags::CLONE_NEWNS
        | CloneFlags::CLONE_NEWNET
        | CloneFlags::CLONE_NEWIPC
        | CloneFlags::CLONE_NEWUTS;
    let mut stack = vec![0u8; 1 << 20];
    let child_body = Box::new(|| -> isize {
        let error = match sandbox_pid1(
            &spec,
            inside_link.as_ref(),
            &filter,
            fork_config.as_deref(),
            &go_read,
            &report_write,
            &status_write,
        ) {
            Err(e) => e,
            Ok(never) => match never {},
        };
        let _ = (&report_write).write_all(format!("{error:#}").as_bytes());
        126
    });
    // SAFETY: this process is single-threaded (the init runs no other threads), so the
    // child may allocate and use the standard library freely; its stack outlives it.
    let child = unsafe { nix::sched::clone(child_body, &mut stack, flags, Some(libc::SIGCHLD)) }
        .context("creating the sandbox namespaces (clone)")?;
    drop(go_read);
    drop(report_write);
    drop(status_write);

    map_ids(child, spec.host_id)?;
    // Held (open) until this process exits: the link stays reserved as long as the sandbox.
    let _reservation = match &link {
        Some((link, reservation)) => {
            network::attach(link, child.as_raw()).map_err(anyhow::Error::msg)?;
            Some(reservation)
        }
        None => None,
    };
    (&go_write)
        .write_all(b"1")
        .context("releasing the sandbox")?;
    drop(go_write);

    let mut report = String::new();
    let _ = (&report_read).read_to_string(&mut report);
    if !report.is_empty() {
        let _ = waitpid(child, None);
        bail!("{report}");
    }
    mirror_exit(child, status_read)
}

/// Maps the child's ids 0 and [`WORKER_ID`] to `host_id` and `host_id + 1`: root inside
/// is an unprivileged user of the host, and the worker another one (and group 1 to
/// `host_id + 2`).
fn map_ids(child: Pid, host_id: u32) -> Result<()> {
    let proc = PathBuf::from(format!("/proc/{child}"));
    let uids = format!("0 {host_id} 1\n{WORKER_ID} {} 1\n", host_id + 1);
    // Group 1 too, which nothing uses: the kernel keeps an empty `ping_group_range` as
    // "1 0", and a checkpoint's restore writes that value back from inside the namespace,
    // where both groups must exist.
    let gids = format!(
        "0 {host_id} 1\n1 {} 1\n{WORKER_ID} {} 1\n",
        host_id + 2,
        host_id + 1
    );
    fs::write(proc.join("setgroups"), "deny").context("denying setgroups in the sandbox")?;
    fs::write(proc.join("uid_map"), &uids).context("writing the sandbox's uid map")?;
    fs::write(proc.join("gid_map"), &gids).context("writing the sandbox's gid map")?;
    Ok(())
}

/// Waits for the sandbox's PID 1 and ends this process the way the worker ended (as PID 1
/// reported it), or the way PID 1 itself ended if it could not say.
fn mirror_exit(child: Pid, mut status: fs::File) -> Result<i32> {
    let pid1 = loop {
        match waitpid(child, None) {
            Ok(status @ (WaitStatus::Exited(..) | WaitStatus::Signaled(..))) => break status,
            Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => bail!("waiting for the sandbox: {e}"),
        }
    };
    let mut raw = [0u8; 4];
    let worker = match status.read_exact(&mut raw) {
        Ok(()) => WaitStatus::from_raw(child, i32::from_ne_bytes(raw)).unwrap_or(pid1),
        Err(_) => pid1,
    };
    match worker {
        WaitStatus::Signaled(_, sig, _) => {
            // Die of the same signal, so the server sees how the worker ended.
            // SAFETY: restoring the default disposition has no preconditions.
            unsafe {
                let _ = signal(sig, SigHandler::SigDfl);
            }
            let _ = kill(Pid::this(), sig);
            Ok(128 + sig as i32)
        }
        WaitStatus::Exited(_, code) => Ok(code),
        _ => Ok(125),
    }
}

/// The sandbox's PID 1: builds the sandbox, starts the worker as PID 2, then reaps every
/// process of the namespace until the worker ends, and reports the worker's wait status.
/// (A worker as PID 1 would never reap the orphans of its double-forked children, and the
/// zombies would use up the process limit.) A template is the exception: it execs itself
/// as PID 1 and reaps its own children.
fn sandbox_pid1(
    spec: &InitSpec,
    link: Option<&Link>,
    filter: &seccompiler::BpfProgram,
    fork_filter: Option<&str>,
    go: &OwnedFd,
    report: &fs::File,
    status: &fs::File,
) -> Result<std::convert::Infallible> {
    // The status pipe must sit above the socket so that closing the ranges around it works.
    debug_assert!(status.as_raw_fd() > WORKER_SOCKET_FD);
    let exec = prepare_exec(spec)?;
    sandbox(spec, link, filter, fork_filter, go)?;
    if spec.template {
        // A template is PID 1 itself (it reaps the children it forks): a checkpoint of the
        // sandbox (CRIU) then holds no mapping of this host binary, which its mount
        // namespace cannot name. Its session starts inside the namespace, as a checkpoint
        // requires; the status pipe closes at exec, so the init reports its exit as is.
        nix::unistd::setsid().context("setsid")?;
        return Err(exec.run());
    }
    // SAFETY: PID 1 is single-threaded (cloned from the single-threaded init).
    match unsafe { nix::unistd::fork() }.context("fork")? {
        nix::unistd::ForkResult::Child => {
            let error = exec.run();
            let _ = (&*report).write_all(format!("{error:#}").as_bytes());
            std::process::exit(126)
        }
        nix::unistd::ForkResult::Parent { child: worker } => {
            // PID 1 keeps only the status pipe: the server must see the connection close when
            // the worker ends, the init see the exec, and nothing the server inherited stays
            // open in the sandbox.
            let keep = status.as_raw_fd() as u32;
            // SAFETY: close_range on this process's own descriptors, none of them in use.
            unsafe {
                libc::syscall(libc::SYS_close_range, WORKER_SOCKET_FD as u32, keep - 1, 0);
                libc::syscall(libc::SYS_close_range, keep + 1, u32::MAX, 0);
            }
            loop {
                match waitpid(Pid::from_raw(-1), None) {
                    Ok(WaitStatus::Exited(pid, code)) if pid == worker => {
                        report_status(status, code << 8);
                    }
                    Ok(WaitStatus::Signaled(pid, sig, core)) if pid == worker => {
                        report_status(status, sig as i32 | if core { 0x80 } else { 0 });
                    }
                    Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
                    Err(_) => std::process::exit(0),
                }
            }
        }
    }
}

/// Writes the worker's raw wait status for the init and ends PID 1 (and with it every
/// process left in the namespace).
fn report_status(status: &fs::File, raw: i32) -> ! {
    let _ = (&*status).write_all(&raw.to_ne_bytes());
    std::process::exit(0)
}

/// The worker's program, arguments and environment, ready for `execve`.
struct Exec {
    /// The program.
    program: CString,
    /// Its arguments, the program first.
    argv: Vec<CString>,
    /// Its environment, `KEY=VALUE`.
    env: Vec<CString>,
}

/// The worker's `execve` arguments, prepared before the clone.
fn prepare_exec(spec: &InitSpec) -> Result<Exec> {
    let program = cstring(spec.program.as_os_str().as_encoded_bytes())?;
    let mut argv = vec![program.clone()];
    for arg in &spec.args {
        argv.push(cstring(arg.as_bytes())?);
    }
    let env = spec
        .env
        .iter()
        .map(|(k, v)| cstring(format!("{k}={v}").as_bytes()))
        .collect::<Result<Vec<_>>>()?;
    Ok(Exec { program, argv, env })
}

impl Exec {
    /// In PID 2: only fds 0–3 (stdin, stdout and stderr on `/dev/null`, the socket on 3)
    /// survive into the worker, then exec. Returns only on failure.
    fn run(&self) -> anyhow::Error {
        let setup = || -> Result<()> {
            let null = fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/null")
                .context("opening /dev/null")?;
            // Not the server's stderr: a function must not write into the server's log
            // (or its terminal). What it prints is captured per invocation by the runtime.
            for fd in 0..=2 {
                // SAFETY: dup2 onto the standard descriptors of this process.
                if unsafe { libc::dup2(null.as_raw_fd(), fd) } < 0 {
                    bail!("dup2: {}", std::io::Error::last_os_error());
                }
            }
            // Whatever the server inherited from its own parent must not reach the worker:
            // mark every other descriptor close-on-exec (the report pipe still reports a
            // failed exec).
            // SAFETY: close_range with the CLOEXEC flag only changes descriptor flags.
            if unsafe {
                libc::syscall(
                    libc::SYS_close_range,
                    4u32,
                    u32::MAX,
                    libc::CLOSE_RANGE_CLOEXEC,
                )
            } < 0
            {
                bail!("close_range: {}", std::io::Error::last_os_error());
            }
            Ok(())
        };
        if let Err(e) = setup() {
            return e;
        }
        let error = nix::unistd::execve(&self.program, &self.argv, &self.env).unwrap_err();
        anyhow::anyhow!("exec {}: {error}", self.program.to_string_lossy())
    }
}

/// In the sandbox's PID 1: waits for the id maps, builds the root, drops every privilege
/// and installs the seccomp filter (inherited by the worker it forks next).
fn sandbox(
    spec: &InitSpec,
    link: Option<&Link>,
    filter: &seccompiler::BpfProgram,
    fork_filter: Option<&str>,
    go: &OwnedFd,
) -> Result<()> {
    let mut byte = [0u8; 1];
    let mut go = fs::File::from(go.try_clone().context("dup")?);
    go.read_exact(&mut byte)
        .context("waiting for the id maps")?;
    // Still with the host root's file-system identity: find and open what to expose, as
    // the data directory may sit in a directory only root can enter (`/root/...`).
    let mut exposed = Vec::new();
    for path in spec.visible.iter().chain([&spec.workdir, &spec.program]) {
        plan_exposure(path, &mut exposed)?;
    }
    drop_covered(&mut exposed);
    // Root of the user namespace (an unprivileged host user) with every capability in it:
    // files it creates in the new root must belong to a user the namespace maps.
    setresgid(Gid::from_raw(0), Gid::from_raw(0), Gid::from_raw(0)).context("setresgid 0")?;
    setresuid(Uid::from_raw(0), Uid::from_raw(0), Uid::from_raw(0)).context("setresuid 0")?;
    if let Some(link) = link {
        // With the host's `ip` still visible, and the namespace's network capabilities.
        network::configure_inside(link).map_err(anyhow::Error::msg)?;
    }

    let fork_config = fork_filter.map(|filter| fork_config(spec, &exposed, filter));
    build_root(spec, &exposed, fork_config.as_ref())?;
    drop(exposed);
    sethostname("nimbus").context("sethostname")?;
    set_limits(spec)?;
    drop_bounding_set();
    let worker = Gid::from_raw(WORKER_ID);
    setresgid(worker, worker, worker).context("setresgid")?;
    let worker = Uid::from_raw(WORKER_ID);
    // A uid change away from root clears every capability.
    setresuid(worker, worker, worker).context("setresuid")?;
    // The parent-death signal is reset by credential changes: set it after them.
    // SAFETY: plain prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) } < 0 {
        bail!(
            "prctl(PR_SET_PDEATHSIG): {}",
            std::io::Error::last_os_error()
        );
    }
    std::env::set_current_dir(&spec.workdir)
        .with_context(|| format!("chdir {}", spec.workdir.display()))?;
    seccomp::install(filter).context("installing the seccomp filter")?;
    Ok(())
}

/// `bytes` as a C string.
fn cstring(bytes: &[u8]) -> Result<CString> {
    CString::new(bytes).context("a NUL byte in an argument or variable")
}

/// The raw `sock_filter` array of `filter`, hex (native byte order, as the kernel reads it).
fn filter_hex(filter: &seccompiler::BpfProgram) -> String {
    let mut hex = String::with_capacity(filter.len() * 16);
    for insn in filter {
        let mut raw = Vec::with_capacity(8);
        raw.extend_from_slice(&insn.code.to_ne_bytes());
        raw.extend_from_slice(&[insn.jt, insn.jf]);
        raw.extend_from_slice(&insn.k.to_ne_bytes());
        for byte in raw {
            hex.push_str(&format!("{byte:02x}"));
        }
    }
    hex
}

/// The [`ForkConfig`] of a template's children.
fn fork_config(spec: &InitSpec, exposed: &[Exposed], filter: &str) -> ForkConfig {
    let private = |p: &Path| p.starts_with("/tmp") || p.starts_with("/dev/shm");
    let mut rebind = Vec::new();
    let mut links = Vec::new();
    for entry in exposed {
        match entry {
            Exposed::Bind { path, .. } if private(path) => rebind.push(path.clone()),
            Exposed::Link { path, target } if private(path) => {
                links.push((path.clone(), target.clone()))
            }
            _ => {}
        }
    }
    ForkConfig {
        namespaces: seccomp::instance_namespaces(spec.outbound.is_some()),
        mount_flags: seccomp::INSTANCE_MOUNT_FLAGS,
        tmp_mb: spec.tmp_mb,
        rebind,
        links,
        filter: filter.to_owned(),
    }
}

/// Builds the new root under `spec.root_dir` and pivots into it.
fn build_root(spec: &InitSpec, exposed: &[Exposed], fork: Option<&ForkConfig>) -> Result<()> {
    let root = &spec.root_dir;
    // Nothing mounted here may propagate back to the host.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .context("making the mounts private")?;
    mount(
        Some("tmpfs"),
        root,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("size=1m,mode=0755"),
    )
    .with_context(|| format!("mounting the root tmpfs on {}", root.display()))?;

    // /tmp first: exposed paths under /tmp (code in a temporary data directory) then land
    // on top of it instead of being hidden by it.
    let tmp = inside(root, Path::new("/tmp"));
    fs::create_dir_all(&tmp)?;
    mount(
        Some("tmpfs"),
        &tmp,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(format!("size={}m,mode=1777", spec.tmp_mb).as_str()),
    )
    .context("mounting /tmp")?;

    for entry in exposed {
        entry.apply(root)?;
    }

    let proc = inside(root, Path::new("/proc"));
    fs::create_dir_all(&proc)?;
    mount(
        Some("proc"),
        &proc,
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .context("mounting /proc")?;

    build_dev(root, spec.tmp_mb)?;
    build_etc(root, spec.outbound.as_ref().map(|o| o.resolvers.as_slice()))?;
    if let Some(fork) = fork {
        let path = inside(root, Path::new(FORK_CONFIG));
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir)?;
        }
        fs::write(&path, serde_json::to_vec(fork)?).context("writing the fork configuration")?;
    }

    let old = root.join(".old-root");
    fs::create_dir_all(&old)?;
    pivot_root(root, &old).context("pivot_root")?;
    std::env::set_current_dir("/")?;
    umount2("/.old-root", MntFlags::MNT_DETACH).context("detaching the host's root")?;
    fs::remove_dir("/.old-root")?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REMOUNT
            | MsFlags::MS_BIND
            | MsFlags::MS_RDONLY
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV,
        None::<&str>,
    )
    .context("making the root read-only")?;
    Ok(())
}

/// `path` (absolute, on the host) as a path under `root`.
fn inside(root: &Path, path: &Path) -> PathBuf {
    let relative: PathBuf = path
        .components()
        .filter(|c| matches!(c, Component::Normal(_)))
        .collect();
    root.join(relative)
}

/// A host path to show in the sandbox at the same path.
enum Exposed {
    /// A file or directory, bind-mounted read-only from a handle opened beforehand.
    Bind {
        path: PathBuf,
        source: fs::File,
        dir: bool,
    },
    /// A symlink, recreated as such.
    Link { path: PathBuf, target: PathBuf },
}

impl Exposed {
    /// Creates the entry under `root`.
    fn apply(&self, root: &Path) -> Result<()> {
        match self {
            Exposed::Link { path, target } => {
                let at = inside(root, path);
                if let Some(parent) = at.parent() {
                    fs::create_dir_all(parent)?;
                }
                symlink(target, &at)
                    .with_context(|| format!("recreating the symlink {}", path.display()))
            }
            Exposed::Bind { path, source, dir } => {
                let at = inside(root, path);
                if *dir {
                    fs::create_dir_all(&at)?;
                } else {
                    if let Some(parent) = at.parent() {
                        fs::create_dir_all(parent)?;
                    }
                    fs::File::create(&at)?;
                }
                // The handle's magic link reaches the source without walking its parents,
                // which this user may not enter.
                let source = PathBuf::from(format!("/proc/self/fd/{}", source.as_raw_fd()));
                bind(&source, &at, MsFlags::MS_RDONLY | MsFlags::MS_NODEV)
                    .with_context(|| format!("exposing {}", path.display()))
            }
        }
    }
}

/// Plans showing host `path`: a symlink is recreated and its target shown too; parent
/// directories are resolved on the host, so `/lib/x` under a `/lib -> usr/lib` link lands
/// at `/usr/lib/x`. Missing paths are skipped.
fn plan_exposure(path: &Path, planned: &mut Vec<Exposed>) -> Result<()> {
    let path = match (path.parent(), path.file_name()) {
        (Some(parent), Some(name)) => match fs::canonicalize(parent) {
            Ok(parent) => parent.join(name),
            Err(_) => return Ok(()),
        },
        _ => return Ok(()),
    };
    let known = |e: &Exposed| match e {
        Exposed::Bind { path: p, .. } | Exposed::Link { path: p, .. } => *p == path,
    };
    if planned.iter().any(known) {
        return Ok(());
    }
    let Ok(meta) = fs::symlink_metadata(&path) else {
        return Ok(());
    };
    if meta.file_type().is_symlink() {
        let target = fs::read_link(&path)?;
        let resolved = path.parent().unwrap_or(Path::new("/")).join(&target);
        planned.push(Exposed::Link { path, target });
        return plan_exposure(&resolved, planned);
    }
    let source = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_CLOEXEC)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    planned.push(Exposed::Bind {
        path,
        source,
        dir: meta.is_dir(),
    });
    Ok(())
}

/// Drops the entries that a directory bound in full already shows (the time zone file
/// `/etc/localtime` names, under `/usr/share/zoneinfo`): a mount hidden under another one
/// serves nothing, and a checkpoint could not restore it.
fn drop_covered(planned: &mut Vec<Exposed>) {
    let dirs: Vec<PathBuf> = planned
        .iter()
        .filter_map(|e| match e {
            Exposed::Bind {
                path, dir: true, ..
            } => Some(path.clone()),
            _ => None,
        })
        .collect();
    planned.retain(|e| {
        let path = match e {
            Exposed::Bind { path, .. } | Exposed::Link { path, .. } => path,
        };
        !dirs.iter().any(|d| path != d && path.starts_with(d))
    });
}

/// Bind-mounts `source` on `target`, then remounts it with `extra` flags (and `nosuid`),
/// keeping the flags the kernel locks on mounts seen from a user namespace.
fn bind(source: &Path, target: &Path, extra: MsFlags) -> Result<()> {
    mount(
        Some(source),
        target,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )?;
    let current = statvfs(target)?.flags();
    let mut flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_NOSUID | extra;
    for (has, keep) in [
        (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
        (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
        (FsFlags::ST_RDONLY, MsFlags::MS_RDONLY),
        (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
        (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
        (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
    ] {
        if current.contains(has) {
            flags |= keep;
        }
    }
    mount(None::<&str>, target, None::<&str>, flags, None::<&str>)?;
    Ok(())
}

/// A minimal `/dev`: the harmless character devices, a private `/dev/shm` (POSIX shared
/// memory and semaphores, as `multiprocessing` uses) and the usual links into `/proc`.
/// A directory of the root tmpfs (read-only like it), not a tmpfs of its own: the devices
/// are bind mounts that carry their own flags, and every tmpfs costs a checkpoint's
/// restore a `tar` run.
fn build_dev(root: &Path, shm_mb: u32) -> Result<()> {
    let dev = inside(root, Path::new("/dev"));
    fs::create_dir_all(&dev)?;
    for name in ["null", "zero", "full", "random", "urandom"] {
        let target = dev.join(name);
        fs::File::create(&target)?;
        bind(&Path::new("/dev").join(name), &target, MsFlags::MS_NOEXEC)
            .with_context(|| format!("exposing /dev/{name}"))?;
    }
    let shm = dev.join("shm");
    fs::create_dir(&shm)?;
    mount(
        Some("tmpfs"),
        &shm,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some(format!("size={shm_mb}m,mode=1777").as_str()),
    )
    .context("mounting /dev/shm")?;
    for (name, to) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        symlink(to, dev.join(name))?;
    }
    Ok(())
}

/// `/etc` with only what a process expects to find: its user, localhost and the name
/// service switch, no secrets of the host.
fn build_etc(root: &Path, resolvers: Option<&[std::net::Ipv4Addr]>) -> Result<()> {
    let etc = inside(root, Path::new("/etc"));
    fs::create_dir_all(&etc)?;
    let files = [
        (
            "passwd",
            format!(
                "root:x:0:0::/:/bin/false\nsandbox:x:{WORKER_ID}:{WORKER_ID}::/tmp:/bin/false\n"
            ),
        ),
        ("group", format!("root:x:0:\nsandbox:x:{WORKER_ID}:\n")),
        (
            "hosts",
            "127.0.0.1 localhost nimbus\n::1 localhost\n".to_owned(),
        ),
        (
            "nsswitch.conf",
            "passwd: files\ngroup: files\nhosts: files dns\n".to_owned(),
        ),
    ];
    let resolv: String = resolvers
        .unwrap_or_default()
        .iter()
        .map(|r| format!("nameserver {r}\n"))
        .collect();
    let files = files.into_iter().chain([("resolv.conf", resolv)]);
    for (name, content) in files {
        // Created in place, so it does not overwrite a file exposed from the host.
        let path = etc.join(name);
        if !path.exists() {
            fs::write(&path, content)?;
        }
    }
    Ok(())
}

/// Resource limits of the worker (and what it starts).
fn set_limits(spec: &InitSpec) -> Result<()> {
    for (resource, limit) in [
        (Resource::RLIMIT_NOFILE, spec.max_open_files),
        (Resource::RLIMIT_NPROC, spec.max_processes),
        (Resource::RLIMIT_CORE, 0),
    ] {
        setrlimit(resource, limit, limit).with_context(|| format!("setrlimit {resource:?}"))?;
    }
    Ok(())
}

/// Drops every capability from the bounding set, so nothing the worker execs can regain one.
fn drop_bounding_set() {
    for cap in 0..=63 {
        // SAFETY: plain prctl with integer arguments; EINVAL past the last capability.
        unsafe {
            libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0);
        }
    }
}
