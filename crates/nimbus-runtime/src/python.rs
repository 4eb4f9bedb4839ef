//! TEMPORARY minimal version (lead's compile stub) — the runtime helper replaces this file.
use std::path::{Path, PathBuf};

use crate::RuntimeCommand;

/// Python runtime.
#[derive(Debug, Clone)]
pub struct PythonRuntime {
    interpreter: PathBuf,
    worker: PathBuf,
}

impl PythonRuntime {
    /// Discover.
    pub fn discover(configured: Option<&Path>, data_dir: &Path) -> Result<Self, String> {
        let interpreter = configured
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("/usr/bin/python3"));
        let dir = data_dir.join("runtime/python");
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let worker = dir.join("nimbus_worker.py");
        std::fs::write(&worker, include_str!("python/nimbus_worker.py"))
            .map_err(|e| e.to_string())?;
        std::fs::create_dir_all(dir.join("nimbus")).map_err(|e| e.to_string())?;
        std::fs::write(
            dir.join("nimbus/__init__.py"),
            include_str!("python/nimbus/__init__.py"),
        )
        .map_err(|e| e.to_string())?;
        Ok(PythonRuntime {
            interpreter,
            worker,
        })
    }
    /// Command.
    pub fn command(&self) -> RuntimeCommand {
        RuntimeCommand {
            program: self.interpreter.clone(),
            args: vec![
                "-I".into(),
                "-S".into(),
                "-B".into(),
                self.worker.display().to_string(),
            ],
            env: vec![("LANG".into(), "C.UTF-8".into())],
        }
    }
    /// Describe.
    pub fn describe(&self) -> String {
        self.interpreter.display().to_string()
    }
}
