//! The Python runtime: the worker's bootstrap files and the resolution of the real interpreter.
//!
//! At discovery the server writes the worker (embedded in the binary) under
//! `<data_dir>/runtime/python/`, resolves the interpreter once (through `sys.executable`, so a
//! pyenv-style shim never sits on the start path) and compiles the worker's byte code. A worker
//! is then started as `python -I -S -B <runtime dir>/nimbus_boot.py`:
//!
//! - `-I` (isolated): `PYTHON*` variables and the user site directory are ignored and neither
//!   the script's nor the current directory is put on `sys.path` (the worker puts the
//!   function's code directory there itself).
//! - `-S`: no `site` import. That saves about 3 ms of the ~11 ms interpreter start here and
//!   keeps functions hermetic: only the standard library, the function's own code (where its
//!   dependencies are bundled) and the `nimbus` package are importable; the host's
//!   site-packages are not.
//! - `-B`: no `__pycache__` is written into the function's code (`PYTHONDONTWRITEBYTECODE`
//!   would be ignored under `-I`); byte code already there is still used.
//!
//! Installed files: `nimbus_boot.py` (entry point), `nimbus_worker.py` (the worker, imported
//! so its byte code is cached), `nimbus_fork.py` (template mode: forking instances, see the
//! sandbox crate's `template` module), `nimbus_entropy.py` (template mode: fresh randomness
//! in every forked instance, and the probe that checks it) and `nimbus/__init__.py` (the API
//! functions import).

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::host::{creating, resolving, CommandError, InstallError};
use crate::host::{
    first_usable, is_executable_file, run_with_timeout, visible_paths, write_if_changed,
};
use crate::RuntimeCommand;

/// Why there is no usable Python interpreter.
#[derive(Debug, thiserror::Error)]
pub enum PythonError {
    /// The worker's files could not be installed.
    #[error(transparent)]
    Install(#[from] InstallError),
    /// The configured interpreter cannot be used.
    #[error("configured Python interpreter {}: {source}", path.display())]
    Configured {
        /// The configured path.
        path: PathBuf,
        /// Why.
        #[source]
        source: InterpreterError,
    },
    /// None of the usual interpreters can be used.
    #[error(
        "no usable Python {}.{}+ interpreter found ({tried}); set the Python interpreter path \
         in the runtime settings",
        MIN_VERSION.0,
        MIN_VERSION.1
    )]
    NoneFound {
        /// What was wrong with each one tried, `; `-separated.
        tried: String,
    },
    /// The runtime directory cannot be passed as an argument.
    #[error("the runtime directory {} is not valid UTF-8", .0.display())]
    NotUtf8(PathBuf),
}

/// Why one interpreter cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum InterpreterError {
    /// Its path cannot be examined.
    #[error("{0}")]
    Metadata(#[source] std::io::Error),
    /// Its path is not a file.
    #[error("is not a file")]
    NotAFile,
    /// It is not executable.
    #[error("is not executable")]
    NotExecutable,
    /// It is not an executable file.
    #[error("not an executable file")]
    NotAnExecutableFile,
    /// Running it failed.
    #[error(transparent)]
    Run(#[from] CommandError),
    /// It did not print what the probe prints.
    #[error("unexpected output from the version probe: {0:?}")]
    UnexpectedOutput(String),
    /// Its version is too old.
    #[error(
        "Python {version} is too old (Nimbus needs Python {}.{} or newer)",
        MIN_VERSION.0,
        MIN_VERSION.1,
        version = .0
    )]
    TooOld(String),
    /// The interpreter a shim runs does not run on its own.
    #[error("its sys.executable {} does not run: {source}", path.display())]
    Shim {
        /// The interpreter's path.
        path: PathBuf,
        /// Why.
        #[source]
        source: Box<InterpreterError>,
    },
}

/// The worker: loads the handler, then serves invocations over fd 3.
pub const WORKER_SOURCE: &str = include_str!("python/nimbus_worker.py");
/// Template mode: answers fork requests and enters each child's sandbox.
pub const FORK_SOURCE: &str = include_str!("python/nimbus_fork.py");
/// Template mode: reseeds generators in forked instances and fingerprints them in probes.
pub const ENTROPY_SOURCE: &str = include_str!("python/nimbus_entropy.py");
/// The entry script: imports the worker (so its byte code comes from `__pycache__`).
pub const BOOT_SOURCE: &str = include_str!("python/nimbus_boot.py");
/// The `nimbus` package functions can import (`nimbus.StateNotEnabled`, …).
pub const NIMBUS_PACKAGE_SOURCE: &str = include_str!("python/nimbus/__init__.py");

/// Oldest Python the worker supports.
pub const MIN_VERSION: (u32, u32) = (3, 8);

/// Interpreters tried, in order, when none is configured (then `python3` on `PATH`).
const DEFAULT_CANDIDATES: &[&str] = &["/usr/bin/python3.11", "/usr/bin/python3"];

/// Environment the worker itself needs; the engine adds the function's variables.
const WORKER_ENV: &[(&str, &str)] = &[
    // Ignored by the worker under -I, but honoured by Python processes the function starts.
    ("PYTHONDONTWRITEBYTECODE", "1"),
    ("LANG", "C.UTF-8"),
    ("PATH", "/usr/local/bin:/usr/bin:/bin"),
];

/// Prints `sys.executable` and the version; valid Python 2 too, so an old interpreter is
/// reported by version rather than by a syntax error.
const PROBE_SCRIPT: &str = "import sys; sys.stdout.write('%s\\n%d.%d.%d\\n' % \
     ((sys.executable or '',) + tuple(sys.version_info[:3])))";

/// Writes the byte code of the worker and of the `nimbus` package (argv[1] is the runtime dir).
const COMPILE_SCRIPT: &str = "import py_compile, sys\n\
     for name in ('nimbus_worker.py', 'nimbus_fork.py', 'nimbus_entropy.py', 'nimbus/__init__.py'):\n    \
     py_compile.compile(sys.argv[1] + '/' + name, doraise=True)";

/// A usable Python interpreter and the installed worker files.
#[derive(Debug, Clone)]
pub struct PythonRuntime {
    interpreter: PathBuf,
    version: String,
    runtime_dir: PathBuf,
    boot: String,
}

impl PythonRuntime {
    /// Installs the worker under `data_dir/runtime/python/` and resolves the interpreter:
    /// `configured` if given (it must work; there is no fallback), otherwise the first of
    /// `/usr/bin/python3.11`, `/usr/bin/python3` and `python3` on `PATH` that is Python ≥ 3.8.
    /// The interpreter kept is the one `sys.executable` names, never a shim.
    pub fn discover(
        configured: Option<&Path>,
        data_dir: &Path,
    ) -> Result<PythonRuntime, PythonError> {
        let runtime_dir = install(data_dir)?;
        let (interpreter, version) = match configured {
            Some(path) => resolve_configured(path)?,
            None => resolve_default()?,
        };
        if let Err(e) = precompile(&interpreter, &runtime_dir) {
            // Not fatal: the worker then compiles itself at every start (about 2 ms).
            tracing::warn!(interpreter = %interpreter.display(), "could not precompile the Python worker: {e}");
        }
        let boot = runtime_dir.join("nimbus_boot.py");
        let boot = boot
            .to_str()
            .ok_or_else(|| PythonError::NotUtf8(runtime_dir.clone()))?
            .to_owned();
        Ok(PythonRuntime {
            interpreter,
            version,
            runtime_dir,
            boot,
        })
    }

    /// The command that starts a worker (the engine adds `NIMBUS_HANDLER` and the function's
    /// variables, and starts it in the function's code directory with the socket on fd 3).
    pub fn command(&self) -> RuntimeCommand {
        RuntimeCommand {
            program: self.interpreter.clone(),
            args: vec!["-I".into(), "-S".into(), "-B".into(), self.boot.clone()],
            env: WORKER_ENV
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            visible: visible_paths(&self.interpreter, &self.runtime_dir),
        }
    }

    /// `/usr/bin/python3.11 (3.11.2)`.
    pub fn describe(&self) -> String {
        format!("{} ({})", self.interpreter.display(), self.version)
    }

    /// Absolute path of the real interpreter.
    pub fn interpreter(&self) -> &Path {
        &self.interpreter
    }

    /// Interpreter version, `3.11.2`.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The directory holding the worker files (`<data_dir>/runtime/python`, absolute). A
    /// sandbox must make it readable to the worker.
    pub fn runtime_dir(&self) -> &Path {
        &self.runtime_dir
    }
}

/// Writes the worker files (each only if its content differs, atomically) and returns the
/// absolute runtime directory.
fn install(data_dir: &Path) -> Result<PathBuf, InstallError> {
    let dir = data_dir.join("runtime").join("python");
    let package = dir.join("nimbus");
    std::fs::create_dir_all(&package).map_err(creating(&package))?;
    let dir = std::fs::canonicalize(&dir).map_err(resolving(&dir))?;
    write_if_changed(&dir.join("nimbus_worker.py"), WORKER_SOURCE)?;
    write_if_changed(&dir.join("nimbus_boot.py"), BOOT_SOURCE)?;
    write_if_changed(&dir.join("nimbus_fork.py"), FORK_SOURCE)?;
    write_if_changed(&dir.join("nimbus_entropy.py"), ENTROPY_SOURCE)?;
    write_if_changed(
        &dir.join("nimbus").join("__init__.py"),
        NIMBUS_PACKAGE_SOURCE,
    )?;
    Ok(dir)
}

/// The configured interpreter `path`, resolved (see [`resolve`]).
fn resolve_configured(path: &Path) -> Result<(PathBuf, String), PythonError> {
    let check = || {
        let meta = std::fs::metadata(path).map_err(InterpreterError::Metadata)?;
        if !meta.is_file() {
            return Err(InterpreterError::NotAFile);
        }
        if meta.permissions().mode() & 0o111 == 0 {
            return Err(InterpreterError::NotExecutable);
        }
        resolve(path)
    };
    check().map_err(|source| PythonError::Configured {
        path: path.to_path_buf(),
        source,
    })
}

/// The first usable of the usual interpreters (see [`resolve`]).
fn resolve_default() -> Result<(PathBuf, String), PythonError> {
    first_usable(DEFAULT_CANDIDATES, "python3", resolve).map_err(|tried| PythonError::NoneFound {
        tried: tried.join("; "),
    })
}

/// Runs `path` once and returns the real interpreter (its `sys.executable`, verified by
/// running it too) and its version.
fn resolve(path: &Path) -> Result<(PathBuf, String), InterpreterError> {
    let probe = probe(path)?;
    check_version(&probe.version)?;
    let real = match probe.executable {
        Some(exe) if exe != path => exe,
        _ => return Ok((path.to_owned(), probe.version)),
    };
    // A shim (pyenv, asdf) re-executes the real interpreter: keep that one, after checking
    // that it runs on its own.
    let direct = probe_direct(&real).map_err(|why| InterpreterError::Shim {
        path: real.clone(),
        source: Box::new(why),
    })?;
    check_version(&direct.version)?;
    Ok((real, direct.version))
}

/// [`probe`] of `path`, once it is known to be an executable file.
fn probe_direct(path: &Path) -> Result<Probe, InterpreterError> {
    if !is_executable_file(path) {
        return Err(InterpreterError::NotAnExecutableFile);
    }
    probe(path)
}

struct Probe {
    executable: Option<PathBuf>,
    version: String,
}

/// Runs `path` with the probe script: its `sys.executable` and version.
fn probe(path: &Path) -> Result<Probe, InterpreterError> {
    let out = run_with_timeout(Command::new(path).args(["-E", "-s", "-S", "-c", PROBE_SCRIPT]))?;
    let mut lines = out.split(|b| *b == b'\n');
    let executable = lines.next().unwrap_or_default();
    let version = lines
        .next()
        .and_then(|v| std::str::from_utf8(v).ok())
        .unwrap_or_default();
    if version.split('.').count() != 3 || !version.split('.').all(|p| p.parse::<u32>().is_ok()) {
        return Err(InterpreterError::UnexpectedOutput(
            String::from_utf8_lossy(&out).into_owned(),
        ));
    }
    let executable = PathBuf::from(OsString::from_vec(executable.to_vec()));
    Ok(Probe {
        executable: executable.is_absolute().then_some(executable),
        version: version.to_owned(),
    })
}

/// Refuses a Python older than [`MIN_VERSION`].
fn check_version(version: &str) -> Result<(), InterpreterError> {
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    if (major, minor) < MIN_VERSION {
        return Err(InterpreterError::TooOld(version.to_owned()));
    }
    Ok(())
}

/// Compiles the worker's files to byte code ahead.
fn precompile(interpreter: &Path, runtime_dir: &Path) -> Result<(), CommandError> {
    run_with_timeout(
        Command::new(interpreter)
            .args(["-I", "-S", "-c", COMPILE_SCRIPT])
            .arg(runtime_dir),
    )
    .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn is_elf(path: &Path) -> bool {
        let mut magic = [0u8; 4];
        std::fs::File::open(path)
            .and_then(|mut f| f.read_exact(&mut magic))
            .is_ok()
            && magic == *b"\x7fELF"
    }

    #[test]
    fn discovery_resolves_a_real_interpreter_and_installs_the_worker() {
        let data = tempfile::tempdir().unwrap();
        let rt = PythonRuntime::discover(None, data.path()).expect("a Python 3.8+ on this host");
        assert!(rt.interpreter().is_absolute());
        assert!(
            is_elf(rt.interpreter()),
            "{} is not a binary (a shim?)",
            rt.interpreter().display()
        );
        assert!(rt
            .describe()
            .starts_with(&rt.interpreter().display().to_string()));
        assert!(rt.describe().ends_with(&format!("({})", rt.version())));

        let dir = rt.runtime_dir();
        assert_eq!(
            std::fs::read_to_string(dir.join("nimbus_worker.py")).unwrap(),
            WORKER_SOURCE
        );
        assert_eq!(
            std::fs::read_to_string(dir.join("nimbus_boot.py")).unwrap(),
            BOOT_SOURCE
        );
        assert_eq!(
            std::fs::read_to_string(dir.join("nimbus/__init__.py")).unwrap(),
            NIMBUS_PACKAGE_SOURCE
        );
        let cached = std::fs::read_dir(dir.join("__pycache__")).unwrap().count();
        assert!(cached >= 1, "the worker's byte code was not written");

        let cmd = rt.command();
        assert_eq!(cmd.program, rt.interpreter());
        assert_eq!(cmd.args[..3], ["-I", "-S", "-B"]);
        assert!(Path::new(&cmd.args[3]).is_absolute());
        assert!(cmd.env.iter().any(|(k, v)| k == "LANG" && v == "C.UTF-8"));

        // A second discovery leaves unchanged files alone (their mtime keeps the byte code valid).
        let before = std::fs::metadata(dir.join("nimbus_worker.py"))
            .unwrap()
            .modified()
            .unwrap();
        let again = PythonRuntime::discover(None, data.path()).unwrap();
        let after = std::fs::metadata(dir.join("nimbus_worker.py"))
            .unwrap()
            .modified()
            .unwrap();
        assert_eq!(before, after);
        assert_eq!(again.interpreter(), rt.interpreter());
    }

    #[test]
    fn a_changed_worker_file_is_rewritten() {
        let data = tempfile::tempdir().unwrap();
        let rt = PythonRuntime::discover(None, data.path()).unwrap();
        let worker = rt.runtime_dir().join("nimbus_worker.py");
        std::fs::write(&worker, "stale").unwrap();
        PythonRuntime::discover(None, data.path()).unwrap();
        assert_eq!(std::fs::read_to_string(&worker).unwrap(), WORKER_SOURCE);
    }

    #[test]
    fn a_shim_resolves_to_the_interpreter_it_runs() {
        let data = tempfile::tempdir().unwrap();
        let real = PythonRuntime::discover(None, data.path()).unwrap();
        let shim = data.path().join("python3-shim");
        std::fs::write(
            &shim,
            format!("#!/bin/sh\nexec {} \"$@\"\n", real.interpreter().display()),
        )
        .unwrap();
        std::fs::set_permissions(&shim, std::fs::Permissions::from_mode(0o755)).unwrap();
        let via_shim = PythonRuntime::discover(Some(&shim), data.path()).unwrap();
        assert_eq!(via_shim.interpreter(), real.interpreter());
        assert_eq!(via_shim.version(), real.version());
    }

    #[test]
    fn a_bad_configured_path_is_a_clear_error() {
        let data = tempfile::tempdir().unwrap();
        let err = PythonRuntime::discover(Some(Path::new("/nonexistent/python3")), data.path())
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/python3"), "{err}");
        assert!(err.contains("No such file"), "{err}");

        let not_exec = data.path().join("python");
        std::fs::write(&not_exec, "").unwrap();
        std::fs::set_permissions(&not_exec, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = PythonRuntime::discover(Some(&not_exec), data.path())
            .unwrap_err()
            .to_string();
        assert!(err.contains("is not executable"), "{err}");

        let err = PythonRuntime::discover(Some(data.path()), data.path())
            .unwrap_err()
            .to_string();
        assert!(err.contains("is not a file"), "{err}");

        let not_python = data.path().join("false");
        std::fs::write(&not_python, "#!/bin/sh\necho nope >&2\nexit 3\n").unwrap();
        std::fs::set_permissions(&not_python, std::fs::Permissions::from_mode(0o755)).unwrap();
        let err = PythonRuntime::discover(Some(&not_python), data.path())
            .unwrap_err()
            .to_string();
        assert!(err.contains("failed") && err.contains("nope"), "{err}");
    }

    #[test]
    fn an_old_python_is_rejected_with_its_version() {
        let data = tempfile::tempdir().unwrap();
        let old = data.path().join("python2");
        std::fs::write(&old, "#!/bin/sh\nprintf '/usr/bin/python2.7\\n2.7.18\\n'\n").unwrap();
        std::fs::set_permissions(&old, std::fs::Permissions::from_mode(0o755)).unwrap();
        let err = PythonRuntime::discover(Some(&old), data.path())
            .unwrap_err()
            .to_string();
        assert!(err.contains("Python 2.7.18 is too old"), "{err}");
        assert!(err.contains("3.8 or newer"), "{err}");
    }
}
