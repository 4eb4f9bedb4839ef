//! The disk tier of process-driver templates: CRIU checkpoints of a template's sandbox.
//!
//! A template is PID 1 of its own pid namespace (see [`init`](crate::init)), so its
//! checkpoint is the whole sandbox: its namespaces, its memory and its mounts, dumped with
//! the template left running. Restored, it is a template again, in a new pid namespace
//! of its own (so several restores of one checkpoint can live at once), in a fresh cgroup
//! slot, connected to the server by a new socket.
//!
//! What makes a template checkpointable, and why:
//! - its session starts in its namespace and it maps no host file the namespace cannot
//!   name (it execs itself as PID 1: no init binary stays mapped);
//! - its connection must belong to its own network namespace: before the dump it is moved
//!   onto a socket pair made inside (the process driver's [`Template::checkpoint`] asks it
//!   to `detach`), which the dump records as external and the restore replaces
//!   (`--inherit-fd`);
//! - the host paths bound into it (runtime, libraries, code) are external mounts, bound
//!   again from the same host paths at restore; everything else of its root is tmpfs,
//!   whose contents the checkpoint holds.
//!
//! CRIU 4 or later is needed (Debian bookworm's 3.17 fails on kernels ≥ 6.13);
//! `scripts/install-criu.sh` builds it. Without it templates stay in memory only.
//!
//! [`Template::checkpoint`]: crate::Template::checkpoint

use std::ffi::CString;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use serde::{Deserialize, Serialize};

use crate::child::socket_and_cgroups;
use crate::isolation::Isolation;
use crate::pidfd::PidfdSandbox;
use crate::{LaunchSpec, Launched, WORKER_SOCKET_FD};

/// Why there is no usable CRIU.
#[derive(Debug, thiserror::Error)]
pub enum CriuError {
    /// No CRIU binary was found.
    #[error("criu is not installed (scripts/install-criu.sh builds CRIU 4)")]
    NotInstalled,
    /// CRIU could not be run.
    #[error("{}: {source}", program.display())]
    Run {
        /// The CRIU binary.
        program: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `criu --version` printed no version.
    #[error("{} --version: unexpected output {output:?}", program.display())]
    NoVersion {
        /// The CRIU binary.
        program: PathBuf,
        /// What it printed.
        output: String,
    },
    /// CRIU is older than 4.
    #[error(
        "{} is CRIU {version}; checkpoints need CRIU 4 or later (scripts/install-criu.sh)",
        program.display()
    )]
    TooOld {
        /// The CRIU binary.
        program: PathBuf,
        /// Its version.
        version: String,
    },
    /// `criu check` could not be run.
    #[error("{} check: {source}", program.display())]
    RunCheck {
        /// The CRIU binary.
        program: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `criu check` found this kernel lacking.
    #[error("{} check failed: {stderr}", program.display())]
    CheckFailed {
        /// The CRIU binary.
        program: PathBuf,
        /// What it printed on its standard error.
        stderr: String,
    },
}

/// A run of CRIU that failed.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// CRIU could not be started.
    #[error("{}: {source}", program.display())]
    Spawn {
        /// The CRIU binary.
        program: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// CRIU ran and failed: the first errors of its log (or its standard error).
    #[error("criu {action} failed ({status}): {log}")]
    Failed {
        /// What it was asked to do (`dump`, `restore`).
        action: String,
        /// How it exited.
        status: std::process::ExitStatus,
        /// What it said went wrong.
        log: String,
    },
}

/// Why a template could not be restored from its checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The driver has no CRIU or no isolation.
    #[error("this server does not restore checkpoints")]
    Unsupported,
    /// A file or directory of the checkpoint could not be used.
    #[error("{}: {source}", path.display())]
    File {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The manifest could not be read.
    #[error("{MANIFEST}: {0}")]
    Manifest(#[source] serde_json::Error),
    /// No cgroup slot could be had for the restored sandbox.
    #[error("cgroup: {0}")]
    Cgroup(#[source] std::io::Error),
    /// The socket pair of the host connection could not be made.
    #[error("socketpair: {0}")]
    SocketPair(#[source] std::io::Error),
    /// The host end of the connection could not be set up.
    #[error("socket: {0}")]
    Socket(#[source] std::io::Error),
    /// A host path could not be bound where the restored sandbox can reach it.
    #[error("exposing {}: {source}", path.display())]
    Expose {
        /// The host path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A host path could not be bound where the restored sandbox can reach it.
    #[error("exposing {}: {source}", path.display())]
    Bind {
        /// The host path.
        path: PathBuf,
        /// Why.
        #[source]
        source: nix::Error,
    },
    /// The restore tmpfs's path cannot be handed to CRIU.
    #[error("{}: {source}", path.display())]
    TmpfsPath {
        /// The restore tmpfs.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::ffi::NulError,
    },
    /// CRIU failed.
    #[error(transparent)]
    Criu(#[from] RunError),
    /// CRIU reported success but no pid.
    #[error("criu restore wrote no pid")]
    NoPid,
    /// The restored template could not be watched.
    #[error("pidfd_open({pid}): {source}")]
    Watch {
        /// Its host pid.
        pid: u32,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Why a template could not be checkpointed.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The template is not one the driver checkpoints.
    #[error("this template cannot be checkpointed")]
    Unsupported,
    /// An earlier exchange with the template was cut short.
    #[error("the template's connection is out of step")]
    OutOfStep,
    /// A request or the manifest could not be encoded.
    #[error("{0}")]
    Encode(#[source] serde_json::Error),
    /// The template could not be asked to detach.
    #[error("asking the template to detach: {0}")]
    Detach(#[source] std::io::Error),
    /// The template did not answer.
    #[error("the template's answer to detach: {0}")]
    NoAnswer(#[source] std::io::Error),
    /// The template's answer is not one.
    #[error("the template's answer: {0}")]
    Answer(#[source] serde_json::Error),
    /// The template could not detach.
    #[error("the template could not detach: {0}")]
    NotDetached(String),
    /// The template's new connection could not be set up.
    #[error("socket: {0}")]
    Socket(#[source] std::io::Error),
    /// The template's connection could not be found.
    #[error("the template's connection: {0}")]
    Connection(#[source] std::io::Error),
    /// The template's fd 3 is not a socket.
    #[error("fd 3 of the template is {}", .0.display())]
    NotASocket(PathBuf),
    /// The template's mounts could not be read.
    #[error("the template's mounts: {0}")]
    Mounts(#[source] std::io::Error),
    /// CRIU failed.
    #[error(transparent)]
    Criu(#[from] RunError),
    /// The template's root could not be copied.
    #[error("copying the template's root: {0}")]
    CopyRoot(#[source] std::io::Error),
    /// The manifest could not be written.
    #[error("writing the manifest: {0}")]
    WriteManifest(#[source] std::io::Error),
    /// The checkpoint directory could not be listed.
    #[error("{}: {source}", path.display())]
    List {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// `source` as a [`RestoreError::File`] at `path`.
fn at(path: &Path) -> impl FnOnce(std::io::Error) -> RestoreError + '_ {
    move |source| RestoreError::File {
        path: path.to_path_buf(),
        source,
    }
}

/// The manifest the driver keeps next to CRIU's images.
pub(crate) const MANIFEST: &str = "nimbus-checkpoint.json";

/// A usable CRIU.
#[derive(Debug, Clone)]
pub struct Criu {
    /// The binary.
    program: PathBuf,
    /// Its version, `4.1.1`.
    version: String,
}

/// Where CRIU is looked for, in order (then `PATH`).
const CANDIDATES: &[&str] = &[
    "/usr/local/sbin/criu",
    "/usr/sbin/criu",
    "/usr/local/bin/criu",
];

impl Criu {
    /// Finds CRIU ≥ 4 that passes `criu check` on this kernel, or says why there is none.
    pub fn detect() -> Result<Criu, CriuError> {
        let path_dirs = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
            .unwrap_or_default();
        let program = CANDIDATES
            .iter()
            .map(PathBuf::from)
            .chain(path_dirs.into_iter().map(|d| d.join("criu")))
            .find(|p| p.is_file())
            .ok_or(CriuError::NotInstalled)?;
        let out = std::process::Command::new(&program)
            .arg("--version")
            .output()
            .map_err(|source| CriuError::Run {
                program: program.clone(),
                source,
            })?;
        let text = String::from_utf8_lossy(&out.stdout);
        let version = text
            .lines()
            .find_map(|l| l.strip_prefix("Version:"))
            .map(|v| v.trim().to_owned())
            .ok_or_else(|| CriuError::NoVersion {
                program: program.clone(),
                output: text.clone().into_owned(),
            })?;
        let major: u32 = version
            .split('.')
            .next()
            .and_then(|m| m.parse().ok())
            .unwrap_or(0);
        if major < 4 {
            return Err(CriuError::TooOld { program, version });
        }
        let check = std::process::Command::new(&program)
            .arg("check")
            .stdin(Stdio::null())
            .output()
            .map_err(|source| CriuError::RunCheck {
                program: program.clone(),
                source,
            })?;
        if !check.status.success() {
            return Err(CriuError::CheckFailed {
                program,
                stderr: String::from_utf8_lossy(&check.stderr).trim().to_owned(),
            });
        }
        Ok(Criu { program, version })
    }

    /// `criu 4.1.1 (/usr/local/sbin/criu)`.
    pub fn describe(&self) -> String {
        format!("criu {} ({})", self.version, self.program.display())
    }

    /// The binary.
    pub(crate) fn program(&self) -> &Path {
        &self.program
    }
}

/// What the restore needs besides CRIU's images.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Manifest {
    /// Inode of the template's connection at the dump (CRIU names the socket by it).
    pub socket_inode: u64,
    /// External mounts: CRIU's key and the host path bound there (the same path inside).
    pub mounts: Vec<(String, PathBuf)>,
    /// The CRIU that wrote it.
    pub criu: String,
}

/// The directory of a checkpoint that holds a copy of the template's root file system:
/// CRIU restores a mount namespace onto a root that already has every mount point, and
/// the template's root (a tmpfs with its `/etc` files and its fork configuration) is not
/// among what it dumps. Shared by every restore of the checkpoint (the root is mounted
/// read-only).
pub(crate) const ROOT: &str = "root";

/// Copies the root file system of process `pid` (not what is mounted on it: mount points
/// become empty directories or files) into `dst`; returns the regular files copied,
/// relative to `dst`'s parent (`root/etc/passwd`).
pub(crate) fn copy_root(pid: u32, dst: &Path) -> std::io::Result<Vec<String>> {
    use std::os::unix::fs::MetadataExt;
    let src = PathBuf::from(format!("/proc/{pid}/root"));
    let device = std::fs::metadata(&src)?.dev();
    let mut files = Vec::new();
    let mut pending = vec![PathBuf::new()];
    std::fs::create_dir_all(dst)?;
    while let Some(relative) = pending.pop() {
        for entry in std::fs::read_dir(src.join(&relative))? {
            let entry = entry?;
            let relative = relative.join(entry.file_name());
            let (from, to) = (src.join(&relative), dst.join(&relative));
            let meta = std::fs::symlink_metadata(&from)?;
            if meta.file_type().is_symlink() {
                std::os::unix::fs::symlink(std::fs::read_link(&from)?, &to)?;
            } else if meta.is_dir() {
                std::fs::create_dir(&to)?;
                if meta.dev() == device {
                    pending.push(relative);
                }
            } else if meta.dev() != device {
                std::fs::File::create(&to)?;
            } else {
                std::fs::copy(&from, &to)?;
                files.push(Path::new(ROOT).join(&relative).display().to_string());
            }
        }
    }
    Ok(files)
}

/// A mount of the template's namespace that comes from the host: everything but its
/// tmpfs and proc mounts. Their paths inside are the host paths (see `init`).
pub(crate) fn external_mounts(pid: u32) -> std::io::Result<Vec<(String, PathBuf)>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/mountinfo"))?;
    let mut mounts = Vec::new();
    for line in text.lines() {
        // `id parent major:minor root mountpoint options ... - fstype source super`
        let fields: Vec<&str> = line.split_whitespace().collect();
        let Some(dash) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        let (Some(mountpoint), Some(fstype)) = (fields.get(4), fields.get(dash + 1)) else {
            continue;
        };
        if matches!(*fstype, "tmpfs" | "proc") {
            continue;
        }
        let key = format!("m{}", mounts.len());
        mounts.push((key, PathBuf::from(unescape(mountpoint))));
    }
    Ok(mounts)
}

/// A mountinfo path with its octal escapes (`\040` for a space) decoded.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            if let Ok(code) = u8::from_str_radix(&field[i + 1..i + 4], 8) {
                out.push(code);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// CRIU's working directory for one restore, removed when dropped.
struct WorkDir(PathBuf);

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Host paths bound, for one restore, under a directory any user can walk to; unmounted
/// and removed when dropped.
///
/// The directory lies in the restore tmpfs, a private tmpfs (shared by the servers of the
/// host, kept until reboot) that CRIU is shown as its `/run` (see [`CriuRun`]): CRIU
/// caches what it learns of the kernel in `/run/criu.kdat` only on a tmpfs, and probing
/// again costs each restore about 25 ms on a host whose `/run` is not one.
struct Staging {
    dir: PathBuf,
    /// The restore tmpfs.
    tmpfs: PathBuf,
    mounts: Vec<PathBuf>,
}

impl Staging {
    /// A fresh directory `name` under `base`, this server's own directory, whose parent
    /// is the restore tmpfs; private, so that these binds never propagate to other mount
    /// namespaces.
    fn new(base: &Path, name: &str) -> Result<Staging, RestoreError> {
        let tmpfs = base.parent().unwrap_or(base).to_path_buf();
        // Once per server, and again after a failure.
        static READY: std::sync::Mutex<bool> = std::sync::Mutex::new(false);
        let mut ready = READY.lock().expect("staging lock");
        if !*ready {
            private_tmpfs(&tmpfs).map_err(at(&tmpfs))?;
            create_dir_mode(base, 0o711).map_err(at(base))?;
            sweep_staging(base);
            *ready = true;
        }
        drop(ready);
        let dir = base.join(name);
        // Walkable, not listable: the restored sandbox's user must reach its mounts, other
        // host users need not see them.
        create_dir_mode(&dir, 0o711).map_err(at(&dir))?;
        Ok(Staging {
            dir,
            tmpfs,
            mounts: Vec::new(),
        })
    }

    /// Binds `source` at `key` in the staging directory; returns where.
    fn expose(&mut self, key: &str, source: &Path) -> Result<PathBuf, RestoreError> {
        let target = self.dir.join(key);
        let fail = |e: std::io::Error| RestoreError::Expose {
            path: source.to_path_buf(),
            source: e,
        };
        if source.is_dir() {
            std::fs::create_dir(&target).map_err(fail)?;
        } else {
            std::fs::File::create(&target).map_err(fail)?;
        }
        nix::mount::mount(
            Some(source),
            &target,
            None::<&str>,
            nix::mount::MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| RestoreError::Bind {
            path: source.to_path_buf(),
            source: e,
        })?;
        self.mounts.push(target.clone());
        Ok(target)
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        for mount in &self.mounts {
            let _ = nix::mount::umount2(mount, nix::mount::MntFlags::MNT_DETACH);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Unmounts and removes what restores of a killed server left in `base`, this server's own
/// directory (see `Isolation::own_dir`); the first restore of a server runs it before any
/// of its own.
fn sweep_staging(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let dir = entry.path();
        if let Ok(mounts) = std::fs::read_dir(&dir) {
            for mount in mounts.flatten() {
                let _ = nix::mount::umount2(&mount.path(), nix::mount::MntFlags::MNT_DETACH);
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// Creates `dir` (its parents as they come) with `mode`.
fn create_dir_mode(dir: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
}

/// Mounts a small tmpfs on `dir` unless one is there (kept across server restarts, gone at
/// reboot, as CRIU wants its cache), and makes it private.
fn private_tmpfs(dir: &Path) -> std::io::Result<()> {
    use nix::mount::{mount, MsFlags};
    create_dir_mode(dir, 0o711)?;
    let fs = nix::sys::statfs::statfs(dir)?;
    if fs.filesystem_type() != nix::sys::statfs::TMPFS_MAGIC {
        mount(
            Some("tmpfs"),
            dir,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            Some("size=16m,mode=0711"),
        )?;
    }
    mount(
        None::<&str>,
        dir,
        None::<&str>,
        MsFlags::MS_PRIVATE,
        None::<&str>,
    )?;
    Ok(())
}

/// How a restore's CRIU is started: in a mount namespace of its own whose `/run` is the
/// restore tmpfs (see [`Staging`]), so paths in the tmpfs are named from `/run` for it.
/// Not when the images themselves are under `/run`, which that would hide: CRIU then sees
/// the host's mounts and probes the kernel again.
struct CriuRun {
    /// The restore tmpfs as the host sees it.
    tmpfs: PathBuf,
    /// The same, NUL-terminated for the pre-exec hook, if CRIU is shown it as `/run`.
    shown_as_run: Option<CString>,
}

impl CriuRun {
    /// How CRIU restores the images in `images`, with the binds of `staging`.
    fn new(staging: &Staging, images: &Path) -> Result<CriuRun, RestoreError> {
        use std::os::unix::ffi::OsStrExt;
        let shown_as_run = (!images.starts_with("/run"))
            .then(|| CString::new(staging.tmpfs.as_os_str().as_bytes()))
            .transpose()
            .map_err(|source| RestoreError::TmpfsPath {
                path: staging.tmpfs.clone(),
                source,
            })?;
        Ok(CriuRun {
            tmpfs: staging.tmpfs.clone(),
            shown_as_run,
        })
    }

    /// `path` as CRIU sees it.
    fn path(&self, path: &Path) -> PathBuf {
        match (&self.shown_as_run, path.strip_prefix(&self.tmpfs)) {
            (Some(_), Ok(inside)) => Path::new("/run").join(inside),
            _ => path.to_path_buf(),
        }
    }

    /// Enters CRIU's mount namespace; for a pre-exec hook.
    ///
    /// # Safety
    ///
    /// Only for a pre-exec hook: it changes the calling process's mount namespace.
    unsafe fn enter(&self) -> std::io::Result<()> {
        let Some(tmpfs) = &self.shown_as_run else {
            return Ok(());
        };
        let fail = || Err(std::io::Error::last_os_error());
        // SAFETY: plain system calls on NUL-terminated strings prepared before the fork.
        unsafe {
            if libc::unshare(libc::CLONE_NEWNS) != 0 {
                return fail();
            }
            let (root, run) = (c"/".as_ptr(), c"/run".as_ptr());
            let flags = libc::MS_REC | libc::MS_PRIVATE;
            if libc::mount(
                std::ptr::null(),
                root,
                std::ptr::null(),
                flags,
                std::ptr::null(),
            ) != 0
            {
                return fail();
            }
            let flags = libc::MS_BIND | libc::MS_REC;
            if libc::mount(
                tmpfs.as_ptr(),
                run,
                std::ptr::null(),
                flags,
                std::ptr::null(),
            ) != 0
            {
                return fail();
            }
        }
        Ok(())
    }
}

/// Runs CRIU with `args`; on failure, the error quotes the end of its log.
pub(crate) async fn run(
    criu: &Criu,
    args: &[String],
    log: &Path,
    command: impl FnOnce(&mut tokio::process::Command),
) -> Result<(), RunError> {
    let mut cmd = tokio::process::Command::new(criu.program());
    cmd.args(args)
        .arg("-o")
        .arg(log)
        // A caller that gives up (a timeout) leaves no CRIU behind.
        .kill_on_drop(true)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    command(&mut cmd);
    let out = cmd.output().await.map_err(|source| RunError::Spawn {
        program: criu.program().to_path_buf(),
        source,
    })?;
    if out.status.success() {
        return Ok(());
    }
    let log_text = std::fs::read_to_string(log).unwrap_or_default();
    // The first errors say what went wrong; the rest follow from them. CRIU also logs as
    // errors what it only probes (rlimits, iptables tools).
    let tail = log_text
        .lines()
        .filter(|l| l.contains("Error") && !l.contains("RLIMIT_NOFILE") && !l.contains("iptables"))
        .take(3)
        .map(str::trim)
        .collect::<Vec<_>>()
        .join("; ");
    Err(RunError::Failed {
        action: args.first().cloned().unwrap_or_default(),
        status: out.status,
        log: if tail.is_empty() {
            String::from_utf8_lossy(&out.stderr).trim().to_owned()
        } else {
            tail
        },
    })
}

/// Restores the template checkpointed in `dir`, launched from `spec`: CRIU, started in a
/// fresh template slot (so the restored processes are born in it), recreates the sandbox
/// as a sibling of itself, that is as a child of the server, with fd 3 of the template
/// replaced by the worker's end of a new socket pair.
pub(crate) async fn restore(
    isolation: &Isolation,
    criu: &Criu,
    spec: &LaunchSpec,
    dir: &Path,
) -> Result<Launched, RestoreError> {
    let manifest = std::fs::read(dir.join(MANIFEST)).map_err(at(&dir.join(MANIFEST)))?;
    let manifest: Manifest = serde_json::from_slice(&manifest).map_err(RestoreError::Manifest)?;
    let slot = isolation
        .template_slot(spec.memory_mb)
        .map_err(RestoreError::Cgroup)?;
    let residue = slot.task_count().unwrap_or(0);
    let (host, worker) =
        std::os::unix::net::UnixStream::pair().map_err(RestoreError::SocketPair)?;
    host.set_nonblocking(true).map_err(RestoreError::Socket)?;
    // CRIU's own files (log, pid file) go next to the images, not among them: the images
    // stay as their checksums describe them.
    let work = dir.with_file_name(format!(
        ".restore-{}-{}",
        dir.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("snapshot"),
        spec.instance_id
    ));
    std::fs::create_dir_all(&work).map_err(at(&work))?;
    // Removed however the restore ends, a cancelled one included.
    let work = WorkDir(work);
    let work = &work.0;
    let pidfile = work.join("pid");
    // CRIU binds the external mounts from inside the restored user namespace, as an
    // unprivileged host user, who may not be able to walk to their host paths (a data
    // directory under /root): they are bound first where that user can reach them.
    let mut staging = Staging::new(&isolation.own_dir("restore"), &spec.instance_id)?;
    let criu_run = CriuRun::new(&staging, dir)?;
    let root = criu_run.path(&staging.expose("root", &dir.join(ROOT))?);
    let mut externals = Vec::new();
    for (key, path) in &manifest.mounts {
        externals.push((key, criu_run.path(&staging.expose(key, path)?)));
    }
    let mut args: Vec<String> = vec![
        "restore".into(),
        "-D".into(),
        dir.display().to_string(),
        "-W".into(),
        work.display().to_string(),
        "--restore-detached".into(),
        "--restore-sibling".into(),
        "--root".into(),
        root.display().to_string(),
        "--manage-cgroups=ignore".into(),
        // See the dump (`ProcessTemplate::checkpoint`).
        "--empty-ns".into(),
        "net".into(),
        "--network-lock".into(),
        "skip".into(),
        "--inherit-fd".into(),
        format!("fd[{WORKER_SOCKET_FD}]:socket:[{}]", manifest.socket_inode),
        "--pidfile".into(),
        pidfile.display().to_string(),
    ];
    for (key, path) in &externals {
        args.push("--external".into());
        args.push(format!("mnt[{key}]:{}", path.display()));
    }
    let join: Vec<CString> = slot.procs_files().to_vec();
    let raw = worker.as_raw_fd();
    let outcome = run(criu, &args, &work.join("restore.log"), |cmd| {
        // SAFETY: the hook only makes async-signal-safe calls on data prepared before the
        // fork (see `socket_and_cgroups`).
        unsafe {
            cmd.pre_exec(move || {
                socket_and_cgroups(raw, &join)?;
                criu_run.enter()
            });
        }
    })
    .await;
    drop(worker);
    // The restored sandbox holds mounts of its own now.
    drop(staging);
    let pid = std::fs::read_to_string(&pidfile)
        .ok()
        .and_then(|p| p.trim().parse::<u32>().ok());
    outcome?;
    let pid = pid.ok_or(RestoreError::NoPid)?;
    let sandbox = PidfdSandbox::watch(pid, Some(slot), residue, None, true)
        .map_err(|source| RestoreError::Watch { pid, source })?;
    let stream = tokio::net::UnixStream::from_std(host).map_err(RestoreError::Socket)?;
    Ok(Launched {
        instance_id: spec.instance_id.clone(),
        stream,
        sandbox: Box::new(sandbox),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape(r"/tmp/a\040b"), "/tmp/a b");
        assert_eq!(unescape("/usr/lib"), "/usr/lib");
    }
}
