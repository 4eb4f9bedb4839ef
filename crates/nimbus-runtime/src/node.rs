//! The Node.js runtime: the worker's files and the resolution of the real `node`.
//!
//! At discovery the server writes the worker and the `nimbus` package (embedded in the
//! binary) under the data directory and resolves `node` once, through `process.execPath`,
//! so a version manager's shim never sits on the start path. A worker is then started as
//! `node <data_dir>/runtime/node/nimbus_worker.js`.
//!
//! Installed files:
//!
//! - `runtime/node/nimbus_worker.js`: the worker.
//! - `node_modules/nimbus/`: the package functions `require` or `import` (the state errors,
//!   `currentRequestId`): `package.json`, `index.js` (its names) and `nimbus.js` (the API,
//!   which the worker loads too, so an error class a function catches is the one the worker
//!   throws).
//!
//! The package sits in the data directory's own `node_modules`, an ancestor of every
//! function's code directory (`<data_dir>/code/<hash>/`, at the same path in the sandbox):
//! Node looks for packages in the `node_modules` of each ancestor of the importing file,
//! so `import ... from 'nimbus'` resolves there with no loader hook (a hook, registered
//! with `module.register`, costs tens of milliseconds per start on Node 20) and
//! `require('nimbus')` too. `NODE_PATH` names it as well, for CommonJS code elsewhere. A
//! `nimbus` package a function bundles in its own `node_modules` comes first.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::host::{creating, resolving, CommandError, InstallError};
use crate::host::{
    first_usable, is_executable_file, run_with_timeout, visible_paths, write_if_changed,
};
use crate::RuntimeCommand;

/// Why there is no usable Node.js.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The worker's files could not be installed.
    #[error(transparent)]
    Install(#[from] InstallError),
    /// The configured binary cannot be used.
    #[error("configured Node.js binary {}: {source}", path.display())]
    Configured {
        /// The configured path.
        path: PathBuf,
        /// Why.
        #[source]
        source: BinaryError,
    },
    /// None of the usual binaries can be used.
    #[error("no usable Node.js {MIN_MAJOR}+ found ({tried})")]
    NoneFound {
        /// What was wrong with each one tried, `; `-separated.
        tried: String,
    },
}

/// Why one `node` binary cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum BinaryError {
    /// It is not an executable file.
    #[error("not an executable file")]
    NotAnExecutableFile,
    /// Running it failed.
    #[error(transparent)]
    Run(#[from] CommandError),
    /// It did not print what the probe prints.
    #[error("unexpected output from the version probe: {0:?}")]
    UnexpectedOutput(String),
    /// Its version is not one.
    #[error("unexpected version {0:?}")]
    UnexpectedVersion(String),
    /// Its version is too old.
    #[error("Node.js {0} is too old (Nimbus needs Node.js {MIN_MAJOR} or newer)")]
    TooOld(String),
    /// The binary it names as its own is not an executable file.
    #[error("its execPath {} is not an executable file", .0.display())]
    ExecPath(PathBuf),
}

/// The worker: loads the handler, then serves invocations over fd 3.
pub const WORKER_SOURCE: &str = include_str!("node/nimbus_worker.js");
/// The API of the `nimbus` package (its `nimbus.js`).
pub const NIMBUS_MODULE_SOURCE: &str = include_str!("node/nimbus.js");
/// The entry of the `nimbus` package (its `index.js`): the names it exports, short so that
/// Node reads them quickly when an ES module imports the package.
pub const NIMBUS_INDEX_SOURCE: &str = include_str!("node/nimbus_index.js");
/// The `package.json` of the `nimbus` package: CommonJS whatever a `package.json` above
/// the data directory says.
const NIMBUS_PACKAGE_JSON: &str = concat!(
    r#"{"name": "nimbus", "version": ""#,
    env!("CARGO_PKG_VERSION"),
    r#"", "private": true, "type": "commonjs", "main": "index.js"}"#,
    "\n"
);

/// Oldest Node.js major version the worker supports.
pub const MIN_MAJOR: u32 = 20;

/// Binaries tried, in order, when none is configured (then `node` on `PATH`).
const DEFAULT_CANDIDATES: &[&str] = &["/usr/bin/node", "/usr/local/bin/node"];

/// Prints `process.execPath` and the version (`20.20.2`).
const PROBE_SCRIPT: &str =
    "process.stdout.write(process.execPath + '\\n' + process.versions.node + '\\n')";

/// A usable `node` and the installed worker files.
#[derive(Debug, Clone)]
pub struct NodeRuntime {
    binary: PathBuf,
    version: String,
    runtime_dir: PathBuf,
    modules_dir: PathBuf,
}

impl NodeRuntime {
    /// Installs the worker under `data_dir/runtime/node/` and the `nimbus` package under
    /// `data_dir/node_modules/`, and resolves `node`: `configured` if given (it must work),
    /// otherwise the first of `/usr/bin/node`, `/usr/local/bin/node` and `node` on `PATH`
    /// that is Node.js ≥ 20. The binary kept is the one `process.execPath` names, never a
    /// shim.
    pub fn discover(configured: Option<&Path>, data_dir: &Path) -> Result<NodeRuntime, NodeError> {
        let (runtime_dir, modules_dir) = install(data_dir)?;
        let (binary, version) = match configured {
            Some(path) => resolve(path).map_err(|source| NodeError::Configured {
                path: path.to_path_buf(),
                source,
            })?,
            None => resolve_default()?,
        };
        Ok(NodeRuntime {
            binary,
            version,
            runtime_dir,
            modules_dir,
        })
    }

    /// The command that starts a worker (the engine adds `NIMBUS_HANDLER` and the function's
    /// variables, and starts it in the function's code directory with the socket on fd 3).
    pub fn command(&self) -> RuntimeCommand {
        let mut visible = visible_paths(&self.binary, &self.runtime_dir);
        visible.push(self.modules_dir.clone());
        RuntimeCommand {
            program: self.binary.clone(),
            args: vec![self
                .runtime_dir
                .join("nimbus_worker.js")
                .to_string_lossy()
                .into_owned()],
            env: vec![
                (
                    "NODE_PATH".into(),
                    self.modules_dir.to_string_lossy().into_owned(),
                ),
                ("LANG".into(), "C.UTF-8".into()),
                ("PATH".into(), "/usr/local/bin:/usr/bin:/bin".into()),
            ],
            visible,
        }
    }

    /// `/usr/bin/node (20.20.2)`.
    pub fn describe(&self) -> String {
        format!("{} ({})", self.binary.display(), self.version)
    }

    /// Absolute path of the real binary.
    pub fn binary(&self) -> &Path {
        &self.binary
    }

    /// Node.js version, `20.20.2`.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The directory holding the worker files (`<data_dir>/runtime/node`, absolute).
    pub fn runtime_dir(&self) -> &Path {
        &self.runtime_dir
    }

    /// The `node_modules` directory holding the `nimbus` package (`<data_dir>/node_modules`,
    /// absolute): an ancestor of the code directories of the data directory.
    pub fn modules_dir(&self) -> &Path {
        &self.modules_dir
    }
}

/// Writes the worker and the `nimbus` package (each file only if its content differs) and
/// returns the absolute runtime and `node_modules` directories.
fn install(data_dir: &Path) -> Result<(PathBuf, PathBuf), InstallError> {
    let runtime = data_dir.join("runtime").join("node");
    let package = data_dir.join("node_modules").join("nimbus");
    for dir in [&runtime, &package] {
        std::fs::create_dir_all(dir).map_err(creating(dir))?;
    }
    let canonical = |dir: &Path| std::fs::canonicalize(dir).map_err(resolving(dir));
    let runtime = canonical(&runtime)?;
    let modules = canonical(&data_dir.join("node_modules"))?;
    write_if_changed(&runtime.join("nimbus_worker.js"), WORKER_SOURCE)?;
    let package = modules.join("nimbus");
    write_if_changed(&package.join("package.json"), NIMBUS_PACKAGE_JSON)?;
    write_if_changed(&package.join("nimbus.js"), NIMBUS_MODULE_SOURCE)?;
    write_if_changed(&package.join("index.js"), NIMBUS_INDEX_SOURCE)?;
    // Where earlier versions installed the package: nothing loads it any more.
    let _ = std::fs::remove_dir_all(runtime.join("node_modules"));
    Ok((runtime, modules))
}

/// The first usable of the usual binaries (see [`resolve`]).
fn resolve_default() -> Result<(PathBuf, String), NodeError> {
    first_usable(DEFAULT_CANDIDATES, "node", resolve).map_err(|tried| NodeError::NoneFound {
        tried: tried.join("; "),
    })
}

/// Runs `path` once and returns the real binary (its `process.execPath`) and its version.
fn resolve(path: &Path) -> Result<(PathBuf, String), BinaryError> {
    if !is_executable_file(path) {
        return Err(BinaryError::NotAnExecutableFile);
    }
    let out = run_with_timeout(Command::new(path).args(["-e", PROBE_SCRIPT]))?;
    let text = String::from_utf8_lossy(&out);
    let mut lines = text.lines();
    let (Some(exec), Some(version)) = (lines.next(), lines.next()) else {
        return Err(BinaryError::UnexpectedOutput(text.into_owned()));
    };
    let major: u32 = version
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .ok_or_else(|| BinaryError::UnexpectedVersion(version.to_owned()))?;
    if major < MIN_MAJOR {
        return Err(BinaryError::TooOld(version.to_owned()));
    }
    let exec = PathBuf::from(exec);
    if !exec.is_absolute() || !is_executable_file(&exec) {
        return Err(BinaryError::ExecPath(exec));
    }
    Ok((exec, version.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discovery_resolves_node_and_installs_the_worker() {
        let data = tempfile::tempdir().unwrap();
        let rt = NodeRuntime::discover(None, data.path()).expect("Node.js 20+ on this host");
        assert!(rt.binary().is_absolute());
        assert!(
            rt.version()
                .split('.')
                .next()
                .unwrap()
                .parse::<u32>()
                .unwrap()
                >= MIN_MAJOR
        );
        let dir = rt.runtime_dir();
        assert_eq!(
            std::fs::read_to_string(dir.join("nimbus_worker.js")).unwrap(),
            WORKER_SOURCE
        );
        let modules = rt.modules_dir();
        assert_eq!(
            modules,
            data.path().canonicalize().unwrap().join("node_modules")
        );
        for (file, content) in [
            ("index.js", NIMBUS_INDEX_SOURCE),
            ("nimbus.js", NIMBUS_MODULE_SOURCE),
            ("package.json", NIMBUS_PACKAGE_JSON),
        ] {
            let path = modules.join("nimbus").join(file);
            assert_eq!(std::fs::read_to_string(&path).unwrap(), content, "{file}");
        }
        let package: serde_json::Value = serde_json::from_str(NIMBUS_PACKAGE_JSON).unwrap();
        assert_eq!(package["type"], "commonjs");
        let command = rt.command();
        assert_eq!(command.program, rt.binary());
        assert!(command
            .env
            .iter()
            .any(|(k, v)| k == "NODE_PATH" && Path::new(v) == modules));
        assert!(command.visible.contains(&dir.to_path_buf()));
        assert!(command.visible.contains(&modules.to_path_buf()));
    }

    #[test]
    fn the_package_names_every_public_name_of_the_api() {
        // index.js exports each name of nimbus.js's `module.exports` literal, in the
        // `exports.<name> = api.<name>;` form Node's export scanner reads.
        let literal = NIMBUS_MODULE_SOURCE
            .split("module.exports = {")
            .nth(1)
            .and_then(|rest| rest.split("};").next())
            .expect("nimbus.js ends with a module.exports literal");
        let names: Vec<&str> = literal
            .split(',')
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .collect();
        assert!(names.contains(&"StateConflict"), "{names:?}");
        let exported: Vec<&str> = NIMBUS_INDEX_SOURCE
            .lines()
            .filter_map(|l| l.strip_prefix("exports."))
            .map(|l| l.split(' ').next().unwrap())
            .collect();
        assert_eq!(exported, names);
        for name in names {
            assert!(
                NIMBUS_INDEX_SOURCE.contains(&format!("exports.{name} = api.{name};\n")),
                "{name}"
            );
        }
    }

    /// A data directory installed by an earlier version keeps no second copy of the API.
    #[test]
    fn discovery_removes_the_package_of_the_earlier_layout() {
        let data = tempfile::tempdir().unwrap();
        let old = data.path().join("runtime/node/node_modules/nimbus");
        std::fs::create_dir_all(&old).unwrap();
        std::fs::write(old.join("index.js"), "module.exports = {};").unwrap();
        let rt = NodeRuntime::discover(None, data.path()).unwrap();
        assert!(!rt.runtime_dir().join("node_modules").exists());
        assert!(rt.modules_dir().join("nimbus/index.js").is_file());
    }

    #[test]
    fn a_configured_binary_that_is_not_node_is_refused() {
        let data = tempfile::tempdir().unwrap();
        let err = NodeRuntime::discover(Some(Path::new("/bin/true")), data.path())
            .unwrap_err()
            .to_string();
        assert!(err.contains("/bin/true"), "{err}");
        let err = NodeRuntime::discover(Some(Path::new("/nonexistent/node")), data.path())
            .unwrap_err()
            .to_string();
        assert!(err.contains("not an executable file"), "{err}");
    }
}
