//! Deploying and managing functions: create, update (publishing versions), read, delete.
//! New code is loaded once in a real worker before anything is stored, so a broken import or
//! a missing handler is reported at deploy time and nothing half-made is kept.

use std::collections::BTreeMap;
use std::sync::Arc;

use base64::Engine as _;
use nimbus_core::function::{check_range, validate_description, validate_function_name};
use nimbus_core::{
    ids, limits, now, CodeBundle, Function, FunctionConfig, FunctionStatus, FunctionVersion,
    Handler, Network, Runtime, StateConfig, StateConfigPatch, ValidationError, LATEST_ALIAS,
};
use nimbus_runtime::protocol::ErrorPayload;
use nimbus_store::Page;
use serde::Deserialize;

use crate::catalog::VersionEntry;
use crate::error::{EngineError, EngineResult};
use crate::instance::StartError;
use crate::{metrics, Engine};

/// Body of `POST /functions`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewFunction {
    /// Unique name.
    pub name: String,
    /// Free text.
    #[serde(default)]
    pub description: String,
    /// Runtime (default `python3.11`).
    #[serde(default)]
    pub runtime: Option<String>,
    /// Handler (default `handler.handle`).
    #[serde(default)]
    pub handler: Option<String>,
    /// Source of a single-file function.
    #[serde(default)]
    pub code: Option<String>,
    /// Base64 zip, tar or tar.gz of several files.
    #[serde(default)]
    pub code_archive: Option<String>,
    /// Memory limit, MiB (default 256).
    #[serde(default)]
    pub memory_mb: Option<u32>,
    /// Timeout, seconds (default 30).
    #[serde(default)]
    pub timeout_sec: Option<u32>,
    /// Environment variables.
    #[serde(default)]
    pub env_vars: BTreeMap<String, String>,
    /// Instance limit (default 50).
    #[serde(default)]
    pub max_instances: Option<u32>,
    /// `none` (default) or `outbound`.
    #[serde(default)]
    pub network: Option<String>,
    /// State settings (default: state off); fields left out take their defaults.
    #[serde(default)]
    pub state_config: StateConfig,
}

/// Body of `PUT /functions/{id}`: every field optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionPatch {
    /// New description.
    pub description: Option<String>,
    /// New runtime.
    pub runtime: Option<String>,
    /// New handler.
    pub handler: Option<String>,
    /// New single-file source.
    pub code: Option<String>,
    /// New archive.
    pub code_archive: Option<String>,
    /// New memory limit.
    pub memory_mb: Option<u32>,
    /// New timeout.
    pub timeout_sec: Option<u32>,
    /// Replaces all environment variables.
    pub env_vars: Option<BTreeMap<String, String>>,
    /// New instance limit.
    pub max_instances: Option<u32>,
    /// New network: `none` or `outbound`.
    pub network: Option<String>,
    /// State settings to change; fields left out keep their values.
    pub state_config: Option<StateConfigPatch>,
    /// Publish the result as a new version and move `latest` (default true).
    pub publish: Option<bool>,
}

/// What an update did.
#[derive(Debug)]
pub struct Updated {
    /// The function after the update.
    pub function: Function,
    /// The version published by it, if any.
    pub published_version: Option<u32>,
}

impl Engine {
    /// Creates a function and publishes version 1 behind alias `latest`.
    pub async fn create_function(&self, req: NewFunction, actor: &str) -> EngineResult<Function> {
        validate_function_name(&req.name)?;
        validate_description(&req.description)?;
        let runtime: Runtime = req.runtime.as_deref().unwrap_or("python3.11").parse()?;
        let handler = match &req.handler {
            Some(h) => new_handler(h)?,
            None => Handler::default(),
        };
        let code = match (&req.code, &req.code_archive) {
            (Some(_), Some(_)) => {
                return Err(EngineError::BadRequest(
                    "give either code or code_archive, not both".into(),
                ))
            }
            (None, None) => {
                return Err(EngineError::BadRequest(
                    "code or code_archive is required".into(),
                ))
            }
            (Some(source), None) => CodeBundle::from_inline(source, &handler, runtime)?,
            (None, Some(archive)) => CodeBundle::from_archive(&decode_archive(archive)?)?,
        };
        let max_instances = req.max_instances.unwrap_or(limits::MAX_INSTANCES.2);
        check_range("max_instances", max_instances, limits::MAX_INSTANCES)?;
        let config = FunctionConfig {
            runtime,
            handler,
            code_hash: code.hash(),
            env_vars: req.env_vars,
            memory_mb: req.memory_mb.unwrap_or(limits::MEMORY_MB.2),
            timeout_sec: req.timeout_sec.unwrap_or(limits::TIMEOUT_SEC.2),
            network: match &req.network {
                Some(network) => network
                    .parse()
                    .map_err(|e: ValidationError| e.in_field("network"))?,
                None => Network::default(),
            },
            state: req.state_config,
        };
        config.validate()?;
        code.check_handler(&config.handler, runtime)?;
        if self.store.get_function(&req.name).await?.is_some() {
            return Err(function_exists(&req.name));
        }
        self.load_once(&req.name, &config, &code, true).await?;

        let at = now();
        let function = Function {
            id: ids::function_id(),
            name: req.name,
            description: req.description,
            config,
            code,
            max_instances,
            status: FunctionStatus::Active,
            latest_version: 1,
            created_at: at,
            updated_at: at,
        };
        let first = FunctionVersion {
            function_id: function.id.clone(),
            version: 1,
            description: function.description.clone(),
            config: function.config.clone(),
            code: function.code.clone(),
            created_at: at,
            created_by: actor.to_owned(),
        };
        self.store
            .create_function(&function, &first)
            .await
            .map_err(|e| match e {
                nimbus_store::StoreError::Conflict(_) => function_exists(&function.name),
                other => other.into(),
            })?;
        metrics::function_live(&function.name, &function.id);
        metrics::version_published(&function.name);
        metrics::alias_updated(&function.name, LATEST_ALIAS, "create");
        tracing::info!(function = %function.name, id = %function.id, "function created");
        self.snapshot_published(&function.id, 1).await;
        Ok(function)
    }

    /// Applies a partial update; a change of code or configuration publishes a new version
    /// and moves `latest`, unless `publish` is false. When the result equals the newest
    /// version, no version is published.
    pub async fn update_function(
        &self,
        reference: &str,
        patch: FunctionPatch,
        actor: &str,
    ) -> EngineResult<Updated> {
        let mut function = self.get_function(reference).await?;
        let before = function.clone();
        if let Some(description) = patch.description {
            validate_description(&description)?;
            function.description = description;
        }
        if let Some(runtime) = &patch.runtime {
            function.config.runtime = runtime.parse()?;
        }
        if let Some(handler) = &patch.handler {
            function.config.handler = new_handler(handler)?;
        }
        let (runtime, handler) = (function.config.runtime, function.config.handler.clone());
        match (&patch.code, &patch.code_archive) {
            (Some(_), Some(_)) => {
                return Err(EngineError::BadRequest(
                    "give either code or code_archive, not both".into(),
                ))
            }
            (Some(source), None) => {
                function.code = CodeBundle::from_inline(source, &handler, runtime)?
            }
            (None, Some(archive)) => {
                function.code = CodeBundle::from_archive(&decode_archive(archive)?)?
            }
            (None, None) => {}
        }
        function.config.code_hash = function.code.hash();
        if let Some(memory_mb) = patch.memory_mb {
            function.config.memory_mb = memory_mb;
        }
        if let Some(timeout_sec) = patch.timeout_sec {
            function.config.timeout_sec = timeout_sec;
        }
        if let Some(env_vars) = patch.env_vars {
            function.config.env_vars = env_vars;
        }
        if let Some(network) = &patch.network {
            function.config.network = network
                .parse()
                .map_err(|e: ValidationError| e.in_field("network"))?;
        }
        if let Some(state) = &patch.state_config {
            function.config.state = function.config.state.patched(state);
        }
        if let Some(max_instances) = patch.max_instances {
            check_range("max_instances", max_instances, limits::MAX_INSTANCES)?;
            function.max_instances = max_instances;
        }
        function.config.validate()?;
        function
            .code
            .check_handler(&function.config.handler, runtime)?;

        if function.config != before.config {
            // Rules of new code apply to the handler, code and runtime a request brings; a
            // change of other settings loads the stored ones as they are.
            let (new, old) = (&function.config, &before.config);
            let new_code = new.code_hash != old.code_hash
                || new.handler != old.handler
                || new.runtime != old.runtime;
            self.load_once(&function.name, new, &function.code, new_code)
                .await?;
        }
        function.updated_at = now();
        let published_version = if patch.publish.unwrap_or(true) {
            let published = self
                .store
                .publish_version(&function, &function.description, actor, &[LATEST_ALIAS])
                .await?;
            self.published(&function, &published);
            published.created.then_some(published.version.version)
        } else {
            self.store.update_function(&function).await?;
            None
        };
        if let Some(version) = published_version {
            function.latest_version = version;
        }
        self.catalog.invalidate(&function.id);
        if let Some(version) = published_version {
            self.snapshot_published(&function.id, version).await;
        }
        Ok(Updated {
            function,
            published_version,
        })
    }

    /// A function by id or name, with its draft code.
    pub async fn get_function(&self, reference: &str) -> EngineResult<Function> {
        self.store
            .get_function(reference)
            .await?
            .ok_or_else(|| EngineError::function_not_found(reference))
    }

    /// Functions by name.
    pub async fn list_functions(&self, limit: u32, offset: u32) -> EngineResult<Page<Function>> {
        Ok(self.store.list_functions(limit, offset).await?)
    }

    /// Deletes a function with its versions, aliases and records, and stops its instances.
    /// Other servers drop theirs when they learn of it (see [`crate::catalog::Gone`]).
    pub async fn delete_function(&self, reference: &str) -> EngineResult<Function> {
        let function = self.get_function(reference).await?;
        if !self.store.delete_function(&function.id).await? {
            return Err(EngineError::function_not_found(reference));
        }
        self.catalog.remove(&function.id);
        self.pools.remove_function(&function.id);
        self.snapshots.forget(&function.id, None);
        metrics::retire_function(&function.name, &function.id);
        // Its state and sessions go with it; a backend that is down now leaves them to
        // expire (the function id is never reused).
        if let Err(e) = self.state.store().purge_function(&function.id).await {
            tracing::warn!(function = %function.name, id = %function.id, "the deleted function's state was not removed: {e}");
        }
        tracing::info!(function = %function.name, id = %function.id, "function deleted");
        Ok(function)
    }

    /// Loads the code in a throwaway worker to prove the handler imports; with `new_code`,
    /// under the rules only new code must meet as well.
    async fn load_once(
        &self,
        name: &str,
        config: &FunctionConfig,
        code: &CodeBundle,
        new_code: bool,
    ) -> EngineResult<()> {
        let cache = self.code.clone();
        let bundle = code.clone();
        let code_dir = tokio::task::spawn_blocking(move || cache.materialize(&bundle))
            .await
            .map_err(|e| EngineError::Internal(e.to_string()))?
            .map_err(|e| EngineError::Internal(format!("unpacking code: {e}")))?;
        let probe = Arc::new(VersionEntry {
            function_id: format!("deploy:{name}"),
            function_name: name.to_owned(),
            version: 0,
            config: config.clone(),
            code_dir,
        });
        let failed = |error_type: &str, message: String| EngineError::InvalidCode {
            error: ErrorPayload {
                error_type: error_type.into(),
                message,
                traceback: String::new(),
            },
            logs: String::new(),
        };
        match self.starter.deploy_check(&probe, new_code).await {
            Ok(instance) => {
                instance.kill().await;
                Ok(())
            }
            Err(StartError::Init { error, logs }) => Err(EngineError::InvalidCode { error, logs }),
            Err(StartError::Crashed(message)) => Err(failed("InstanceCrashed", message)),
            Err(StartError::Timeout(limit)) => Err(failed(
                "InitTimeout",
                format!(
                    "the handler did not finish loading within {} s",
                    limit.as_secs()
                ),
            )),
            Err(StartError::Platform(e)) => Err(e),
        }
    }
}

/// A handler a request names: the rules of new code apply (a version's stored handler only
/// has to parse).
fn new_handler(text: &str) -> Result<Handler, ValidationError> {
    let handler: Handler = text.parse()?;
    handler.check_new()?;
    Ok(handler)
}

fn decode_archive(archive: &str) -> EngineResult<Vec<u8>> {
    base64::engine::general_purpose::STANDARD
        .decode(archive.trim())
        .map_err(|e| EngineError::BadRequest(format!("code_archive is not valid base64: {e}")))
}

fn function_exists(name: &str) -> EngineError {
    EngineError::Conflict {
        code: nimbus_core::ErrorCode::FunctionExists,
        message: format!("a function named {name:?} already exists"),
    }
}
