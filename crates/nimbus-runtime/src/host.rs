//! What the runtimes do on the host at discovery: write their files, find and run
//! executables.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long one run of an interpreter at discovery may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(20);

/// Why a runtime's files could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// A directory could not be created.
    #[error("cannot create {}: {source}", path.display())]
    Create {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A directory could not be resolved to its absolute path.
    #[error("cannot resolve {}: {source}", path.display())]
    Resolve {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A file could not be written.
    #[error("cannot write {}: {source}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Why a run of an interpreter at discovery failed.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// It could not be started.
    #[error("cannot run it: {0}")]
    Spawn(#[source] std::io::Error),
    /// It ran too long and was killed.
    #[error("it did not finish within {} s", PROBE_TIMEOUT.as_secs())]
    Timeout,
    /// It could not be waited for.
    #[error("cannot wait for it: {0}")]
    Wait(#[source] std::io::Error),
    /// It failed: how it exited and the end of what it printed on its standard error.
    #[error("it failed ({status}){}", if stderr.is_empty() { String::new() } else { format!(": {stderr}") })]
    Failed {
        /// How it exited.
        status: std::process::ExitStatus,
        /// The last 300 characters of its standard error.
        stderr: String,
    },
}

/// `source` as an [`InstallError::Create`] of `path`.
pub(crate) fn creating(path: &Path) -> impl FnOnce(std::io::Error) -> InstallError + '_ {
    move |source| InstallError::Create {
        path: path.to_path_buf(),
        source,
    }
}

/// `source` as an [`InstallError::Resolve`] of `path`.
pub(crate) fn resolving(path: &Path) -> impl FnOnce(std::io::Error) -> InstallError + '_ {
    move |source| InstallError::Resolve {
        path: path.to_path_buf(),
        source,
    }
}

/// Replaces `path` with `content` through a temporary file and a rename, unless it already
/// holds exactly that (then its modification time, which cached byte code checks, is kept).
pub(crate) fn write_if_changed(path: &Path, content: &str) -> Result<(), InstallError> {
    if std::fs::read(path).is_ok_and(|old| old == content.as_bytes()) {
        return Ok(());
    }
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    let result = std::fs::write(&tmp, content)
        .and_then(|()| std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644)))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(source) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(InstallError::Write {
            path: path.to_path_buf(),
            source,
        });
    }
    Ok(())
}

/// Runs `cmd` (stdin closed) and returns its stdout, or why it failed.
pub(crate) fn run_with_timeout(cmd: &mut Command) -> Result<Vec<u8>, CommandError> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut attempts = 0;
    let mut child = loop {
        match cmd.spawn() {
            Ok(child) => break child,
            // A script just written may still be open in a child another thread is forking.
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && attempts < 50 => {
                attempts += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(CommandError::Spawn(e)),
        }
    };
    // Both outputs are small; read them on threads so a full pipe cannot block the child.
    let mut stdout = child.stdout.take().expect("piped stdout");
    let mut stderr = child.stderr.take().expect("piped stderr");
    let out = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stdout.read_to_end(&mut buf);
        buf
    });
    let err = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stderr.read_to_end(&mut buf);
        buf
    });
    let deadline = Instant::now() + PROBE_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(2)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(CommandError::Timeout);
            }
            Err(e) => return Err(CommandError::Wait(e)),
        }
    };
    let out = out.join().unwrap_or_default();
    let err = err.join().unwrap_or_default();
    if !status.success() {
        let err = String::from_utf8_lossy(&err);
        let err = err.trim();
        let stderr: String = err
            .chars()
            .rev()
            .take(300)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        return Err(CommandError::Failed { status, stderr });
    }
    Ok(out)
}

/// Whether `path` is a file someone may execute.
pub(crate) fn is_executable_file(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The executable `name` in an absolute directory of `PATH`.
pub(crate) fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .filter(|dir| dir.is_absolute())
        .map(|dir| dir.join(name))
        .find(|p| is_executable_file(p))
}

/// What a sandbox must show of a runtime: its binary, its worker's files, and the
/// installation prefix when it is not the system's (the shared libraries under `/usr` are
/// shown anyway; a binary under `/opt/x/bin` needs `/opt/x`).
pub(crate) fn visible_paths(binary: &Path, runtime_dir: &Path) -> Vec<PathBuf> {
    let mut visible = vec![binary.to_path_buf(), runtime_dir.to_path_buf()];
    if let Some(prefix) = binary.parent().and_then(Path::parent) {
        if prefix != Path::new("/usr") && prefix != Path::new("/") {
            visible.push(prefix.to_path_buf());
        }
    }
    visible
}

/// The first of `candidates` (then `name` on `PATH`) that `resolve` accepts, or what was
/// wrong with each.
pub(crate) fn first_usable<T, E: std::fmt::Display>(
    candidates: &[&str],
    name: &str,
    resolve: impl Fn(&Path) -> Result<T, E>,
) -> Result<T, Vec<String>> {
    let mut tried = Vec::new();
    let candidates = candidates
        .iter()
        .map(|c| (c.to_string(), Some(PathBuf::from(c))))
        .chain(std::iter::once((
            format!("{name} on PATH"),
            find_on_path(name),
        )));
    for (label, candidate) in candidates {
        let Some(path) = candidate.filter(|p| is_executable_file(p)) else {
            tried.push(format!("{label}: not found"));
            continue;
        };
        match resolve(&path) {
            Ok(found) => return Ok(found),
            Err(why) => tried.push(format!("{label}: {why}")),
        }
    }
    Err(tried)
}
