//! The Node.js runtime: the worker's files and the resolution of the real `node` binary.
//!
//! At discovery the server writes the worker (embedded in the binary) under
//! `<data_dir>/runtime/node/` and resolves `node` once, through `process.execPath`, so a
//! version manager's shim never sits on the start path. A worker is then started as
//! `node <runtime dir>/nimbus_worker.js` with `NODE_PATH` naming the runtime's
//! `node_modules`, where the `nimbus` module functions `require` lives.
//!
//! Installed files: `nimbus_worker.js` (the worker) and `node_modules/nimbus/index.js` (the
//! API: the state errors, `currentRequestId`); the worker loads that same file, so an error
//! class a function catches is the one the worker throws.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::host::{
    first_usable, is_executable_file, run_with_timeout, visible_paths, write_if_changed,
};
use crate::RuntimeCommand;

/// The worker: loads the handler, then serves invocations over fd 3.
pub const WORKER_SOURCE: &str = include_str!("node/nimbus_worker.js");
/// The `nimbus` module functions can require.
pub const NIMBUS_MODULE_SOURCE: &str = include_str!("node/nimbus.js");

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
}

impl NodeRuntime {
    /// Installs the worker under `data_dir/runtime/node/` and resolves `node`: `configured`
    /// if given (it must work), otherwise the first of `/usr/bin/node`,
    /// `/usr/local/bin/node` and `node` on `PATH` that is Node.js ≥ 20. The binary kept is
    /// the one `process.execPath` names, never a shim.
    pub fn discover(configured: Option<&Path>, data_dir: &Path) -> Result<NodeRuntime, String> {
        let runtime_dir = install(data_dir)?;
        let (binary, version) = match configured {
            Some(path) => resolve(path)
                .map_err(|why| format!("configured Node.js binary {}: {why}", path.display()))?,
            None => resolve_default()?,
        };
        Ok(NodeRuntime {
            binary,
            version,
            runtime_dir,
        })
    }

    /// The command that starts a worker (the engine adds `NIMBUS_HANDLER` and the function's
    /// variables, and starts it in the function's code directory with the socket on fd 3).
    pub fn command(&self) -> RuntimeCommand {
        let modules = self.runtime_dir.join("node_modules");
        RuntimeCommand {
            program: self.binary.clone(),
            args: vec![self
                .runtime_dir
                .join("nimbus_worker.js")
                .to_string_lossy()
                .into_owned()],
            env: vec![
                ("NODE_PATH".into(), modules.to_string_lossy().into_owned()),
                ("LANG".into(), "C.UTF-8".into()),
                ("PATH".into(), "/usr/local/bin:/usr/bin:/bin".into()),
            ],
            visible: visible_paths(&self.binary, &self.runtime_dir),
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
}

/// Writes the worker files (each only if its content differs) and returns the absolute
/// runtime directory.
fn install(data_dir: &Path) -> Result<PathBuf, String> {
    let dir = data_dir.join("runtime").join("node");
    let module = dir.join("node_modules").join("nimbus");
    std::fs::create_dir_all(&module)
        .map_err(|e| format!("cannot create {}: {e}", module.display()))?;
    let dir = std::fs::canonicalize(&dir)
        .map_err(|e| format!("cannot resolve {}: {e}", dir.display()))?;
    write_if_changed(&dir.join("nimbus_worker.js"), WORKER_SOURCE)?;
    write_if_changed(
        &dir.join("node_modules").join("nimbus").join("index.js"),
        NIMBUS_MODULE_SOURCE,
    )?;
    Ok(dir)
}

fn resolve_default() -> Result<(PathBuf, String), String> {
    first_usable(DEFAULT_CANDIDATES, "node", resolve).map_err(|tried| {
        format!(
            "no usable Node.js {MIN_MAJOR}+ found ({})",
            tried.join("; ")
        )
    })
}

/// Runs `path` once and returns the real binary (its `process.execPath`) and its version.
fn resolve(path: &Path) -> Result<(PathBuf, String), String> {
    if !is_executable_file(path) {
        return Err("not an executable file".into());
    }
    let out = run_with_timeout(Command::new(path).args(["-e", PROBE_SCRIPT]))?;
    let text = String::from_utf8_lossy(&out);
    let mut lines = text.lines();
    let (Some(exec), Some(version)) = (lines.next(), lines.next()) else {
        return Err(format!(
            "unexpected output from the version probe: {text:?}"
        ));
    };
    let major: u32 = version
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .ok_or_else(|| format!("unexpected version {version:?}"))?;
    if major < MIN_MAJOR {
        return Err(format!(
            "Node.js {version} is too old (Nimbus needs Node.js {MIN_MAJOR} or newer)"
        ));
    }
    let exec = PathBuf::from(exec);
    if !exec.is_absolute() || !is_executable_file(&exec) {
        return Err(format!(
            "its execPath {} is not an executable file",
            exec.display()
        ));
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
        assert_eq!(
            std::fs::read_to_string(dir.join("node_modules/nimbus/index.js")).unwrap(),
            NIMBUS_MODULE_SOURCE
        );
        let command = rt.command();
        assert_eq!(command.program, rt.binary());
        assert!(command
            .env
            .iter()
            .any(|(k, v)| k == "NODE_PATH" && v.ends_with("node_modules")));
        assert!(command.visible.contains(&dir.to_path_buf()));
    }

    #[test]
    fn a_configured_binary_that_is_not_node_is_refused() {
        let data = tempfile::tempdir().unwrap();
        let err = NodeRuntime::discover(Some(Path::new("/bin/true")), data.path()).unwrap_err();
        assert!(err.contains("/bin/true"), "{err}");
        let err =
            NodeRuntime::discover(Some(Path::new("/nonexistent/node")), data.path()).unwrap_err();
        assert!(err.contains("not an executable file"), "{err}");
    }
}
