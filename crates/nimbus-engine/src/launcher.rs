//! Starting workers of a function version through the sandbox driver: cold (a new runtime
//! loads the code), as a template (an initialized worker kept to fork instances from), as a
//! spare (a cold start whose greeting is left unread), or from a template. Which of these
//! an invocation gets is the starter's choice, not the launcher's.

use std::sync::Arc;
use std::time::{Duration, Instant};

use nimbus_core::ids;
use nimbus_runtime::protocol::ErrorPayload;
use nimbus_runtime::{peek_greeting, Runtimes, WorkerConn, WorkerError};
use nimbus_sandbox::{Driver, LaunchSpec, Launched, Sandbox, Template};

use crate::catalog::VersionEntry;
use crate::config::EngineConfig;
use crate::error::EngineError;
use crate::instance::{Instance, StartError};

/// Starts workers through the sandbox driver.
pub(crate) struct Launcher {
    config: Arc<EngineConfig>,
    driver: Arc<dyn Driver>,
    runtimes: Runtimes,
}

impl Launcher {
    pub(crate) fn new(
        config: Arc<EngineConfig>,
        driver: Arc<dyn Driver>,
        runtimes: Runtimes,
    ) -> Self {
        Launcher {
            config,
            driver,
            runtimes,
        }
    }

    /// Longest time a new instance (or a template's step) may take.
    pub(crate) fn start_timeout(&self) -> Duration {
        self.config.start_timeout
    }

    /// Name of the driver (part of a snapshot's key).
    pub(crate) fn driver_name(&self) -> &'static str {
        self.driver.name()
    }

    /// What the driver needs to start a worker of `version` named `id`.
    fn spec(
        &self,
        version: &VersionEntry,
        id: &str,
        template: bool,
    ) -> Result<LaunchSpec, StartError> {
        let config = &version.config;
        let command = self
            .runtimes
            .command(config.runtime)
            .map_err(|e| StartError::Platform(EngineError::RuntimeUnavailable(e.to_string())))?;
        let mut env = command.env;
        env.extend([
            ("NIMBUS_HANDLER".to_owned(), config.handler.to_string()),
            (
                "NIMBUS_FUNCTION_NAME".to_owned(),
                version.function_name.clone(),
            ),
            (
                "NIMBUS_FUNCTION_VERSION".to_owned(),
                version.version.to_string(),
            ),
            ("NIMBUS_MEMORY_MB".to_owned(), config.memory_mb.to_string()),
            ("NIMBUS_INSTANCE_ID".to_owned(), id.to_owned()),
        ]);
        if template {
            let settings = &self.config.snapshots;
            env.push(("NIMBUS_TEMPLATE".to_owned(), "1".to_owned()));
            env.push((
                "NIMBUS_HOOK_BUDGET_MS".to_owned(),
                settings.hook_budget.as_millis().to_string(),
            ));
            if settings.warmup_on_build {
                env.push(("NIMBUS_WARMUP".to_owned(), "1".to_owned()));
            }
        }
        env.extend(config.env_vars.iter().map(|(k, v)| (k.clone(), v.clone())));
        Ok(LaunchSpec {
            instance_id: id.to_owned(),
            program: command.program,
            args: command.args,
            env,
            workdir: version.code_dir.clone(),
            visible: command.visible,
            memory_mb: config.memory_mb,
            network: config.network,
            template,
        })
    }

    /// Starts a new instance of `version` from scratch and waits until its handler is loaded.
    pub(crate) async fn cold(&self, version: &Arc<VersionEntry>) -> Result<Instance, StartError> {
        self.cold_with(version, None).await
    }

    /// [`Launcher::cold`] for the deploy's check that code loads. With `new_code` (the
    /// request brings a handler, code or runtime) the worker also applies the rules only new
    /// code must meet (`NIMBUS_DEPLOY_CHECK=1`: a Python handler module must not be named
    /// after a standard-library module), which spare versions deployed before a rule existed.
    pub(crate) async fn deploy_check(
        &self,
        version: &Arc<VersionEntry>,
        new_code: bool,
    ) -> Result<Instance, StartError> {
        self.cold_with(version, new_code.then_some(("NIMBUS_DEPLOY_CHECK", "1")))
            .await
    }

    async fn cold_with(
        &self,
        version: &Arc<VersionEntry>,
        extra_env: Option<(&str, &str)>,
    ) -> Result<Instance, StartError> {
        let id = ids::instance_id();
        let mut spec = self.spec(version, &id, false)?;
        spec.env
            .extend(extra_env.map(|(k, v)| (k.to_owned(), v.to_owned())));
        let launched = self.launch(&spec).await?;
        let (conn, sandbox) = self.handshake(launched).await?;
        Ok(Instance::new(id, version.clone(), conn, sandbox, None))
    }

    /// Starts a template of `version` (whose runtime forks templates): a worker with the
    /// code loaded (and its before-snapshot hooks and warm-up run), handed over to the
    /// driver.
    pub(crate) async fn template(
        &self,
        version: &Arc<VersionEntry>,
    ) -> Result<Box<dyn Template>, StartError> {
        let id = ids::instance_id();
        let spec = self.spec(version, &id, true)?;
        let launched = self.launch(&spec).await?;
        let (conn, sandbox) = self.handshake(launched).await?;
        let stream = conn
            .into_stream()
            .map_err(|e| StartError::Crashed(e.to_string()))?;
        let launched = Launched {
            instance_id: id,
            stream,
            sandbox,
        };
        self.driver
            .template(&spec, launched)
            // A refusal of what the function's code made of the template (threads or
            // processes left running) is the function's failure, not the platform's.
            .map_err(|e| match e.refused {
                true => StartError::Init {
                    error: ErrorPayload {
                        error_type: "TemplateRefused".into(),
                        message: e.message,
                        traceback: String::new(),
                    },
                    logs: String::new(),
                },
                false => StartError::Platform(EngineError::Internal(e.message)),
            })
    }

    /// Starts a new instance of `version` from scratch and returns it once its handler is
    /// loaded, without reading its greeting: the instance a spare is made of.
    pub(crate) async fn spare(&self, version: &VersionEntry) -> Result<Launched, StartError> {
        let id = ids::instance_id();
        let spec = self.spec(version, &id, false)?;
        let mut launched = self.launch(&spec).await?;
        let timeout = self.config.start_timeout;
        match tokio::time::timeout(timeout, peek_greeting(&launched.stream)).await {
            Ok(Ok(_ready)) => Ok(launched),
            Ok(Err(e)) => Err(start_failed(e, &mut launched.sandbox).await),
            Err(_) => {
                launched.sandbox.kill();
                Err(StartError::Timeout(timeout))
            }
        }
    }

    /// Whether the driver can checkpoint `version`'s template to disk (spares are not
    /// checkpointed).
    pub(crate) fn can_checkpoint(&self, version: &VersionEntry) -> bool {
        version.config.runtime.forks_templates()
            && self
                .spec(version, "", true)
                .is_ok_and(|spec| self.driver.can_checkpoint(&spec))
    }

    /// Whether the driver can restore checkpoints on this server.
    pub(crate) fn can_restore(&self) -> bool {
        self.driver.can_restore()
    }

    /// Starts `version`'s template again from its checkpoint in `dir`.
    pub(crate) async fn restore(
        &self,
        version: &VersionEntry,
        dir: &std::path::Path,
    ) -> Result<Box<dyn Template>, String> {
        let id = ids::instance_id();
        let spec = self.spec(version, &id, true).map_err(|e| e.to_string())?;
        self.driver
            .restore_template(&spec, dir)
            .await
            .map_err(|e| e.message)
    }

    /// Starts a new instance of `version` from its template.
    pub(crate) async fn fork(
        &self,
        version: &Arc<VersionEntry>,
        template: &Arc<dyn Template>,
    ) -> Result<Instance, StartError> {
        // A template that does not answer is broken (the driver then reports it ended).
        let timeout = self.config.start_timeout;
        let launched = tokio::time::timeout(timeout, template.spawn(&ids::instance_id()))
            .await
            .map_err(|_| {
                StartError::Crashed(format!(
                    "the template did not start an instance within {} s",
                    timeout.as_secs()
                ))
            })?
            .map_err(|e| StartError::Crashed(e.to_string()))?;
        let id = launched.instance_id.clone();
        let (conn, sandbox) = self.handshake(launched).await?;
        // A forked instance lives in its template's pid namespace, which must outlive it; a
        // spare owes its set nothing, and an evicted set's other spares should not linger.
        let parent = version
            .config
            .runtime
            .forks_templates()
            .then(|| template.clone());
        Ok(Instance::new(id, version.clone(), conn, sandbox, parent))
    }

    async fn launch(&self, spec: &LaunchSpec) -> Result<Launched, StartError> {
        self.driver
            .launch(spec)
            .await
            .map_err(|e| StartError::Platform(EngineError::Internal(e.to_string())))
    }

    /// Waits for the worker's `ready` within the start timeout.
    async fn handshake(
        &self,
        launched: Launched,
    ) -> Result<(WorkerConn, Box<dyn Sandbox>), StartError> {
        let mut conn = WorkerConn::new(launched.stream);
        let mut sandbox = launched.sandbox;
        let timeout = self.config.start_timeout;
        match tokio::time::timeout(timeout, conn.handshake()).await {
            Ok(Ok(_ready)) => Ok((conn, sandbox)),
            Ok(Err(e)) => Err(start_failed(e, &mut sandbox).await),
            Err(_) => {
                sandbox.kill();
                Err(StartError::Timeout(timeout))
            }
        }
    }
}

/// What a worker's failed greeting means: the function's init failure, or a worker that
/// broke (killed, and its end reported).
async fn start_failed(error: WorkerError, sandbox: &mut Box<dyn Sandbox>) -> StartError {
    match error {
        WorkerError::Init { error, logs } => StartError::Init { error, logs },
        e => {
            sandbox.kill();
            let exit = tokio::time::timeout(Duration::from_millis(500), sandbox.wait()).await;
            let how = exit
                .map(|x| x.to_string())
                .unwrap_or_else(|_| "did not exit".into());
            StartError::Crashed(format!("the worker failed while starting ({e}); it {how}"))
        }
    }
}

/// Milliseconds since `start`.
pub(crate) fn ms_since(start: Instant) -> f64 {
    start.elapsed().as_secs_f64() * 1000.0
}
