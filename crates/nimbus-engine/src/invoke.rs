//! The invoke path, top to bottom: resolve the target version, check out an instance,
//! run the event on it under the function's timeout, classify the outcome, return the
//! instance, record the invocation.

use std::sync::Arc;
use std::time::{Duration, Instant};

use nimbus_core::invocation::{log_tail, InvocationError};
use nimbus_core::ErrorCode;
use nimbus_core::{
    ids, limits, now, Invocation, InvocationStatus, StartType, Trigger, LATEST_ALIAS,
};
use nimbus_runtime::protocol::ErrorPayload;
use nimbus_runtime::{InvokeOutcome, WorkerError};
use serde_json::value::RawValue;
use time::OffsetDateTime;

use crate::catalog::{FunctionEntry, VersionEntry};
use crate::error::{EngineError, EngineResult};
use crate::instance::{Instance, StartError, StartFailure};
use crate::pool::{AcquireError, Lease, SessionAsk};
use crate::state::InvocationState;
use crate::{metrics, router, Engine};

/// One invocation request.
#[derive(Debug)]
pub struct InvokeRequest {
    /// Function id or name.
    pub function: String,
    /// Explicit version (wins over the alias).
    pub version: Option<u32>,
    /// Alias to route through (default `latest`).
    pub alias: Option<String>,
    /// Session key, for sticky routing.
    pub session_key: Option<String>,
    /// The event, already validated JSON.
    pub event: Box<RawValue>,
    /// How it was triggered.
    pub trigger: Trigger,
}

/// What an invocation produced. User-code failures are in `outcome`, not errors.
#[derive(Debug)]
pub struct InvokeResponse {
    /// `inv_…`.
    pub request_id: String,
    /// Function id.
    pub function_id: String,
    /// Version that ran.
    pub version: u32,
    /// Alias the version was chosen through.
    pub alias_used: Option<String>,
    /// Session key given.
    pub session_key: Option<String>,
    /// How the instance started.
    pub start_type: StartType,
    /// Instance that served it (absent if none could be started).
    pub instance_id: Option<String>,
    /// Wall time, ms.
    pub duration_ms: f64,
    /// The handler's return value, or why there is none.
    pub outcome: Result<Box<RawValue>, InvocationError>,
}

/// A resolved invocation target.
struct Target {
    function: Arc<FunctionEntry>,
    version: Arc<VersionEntry>,
    alias_used: Option<String>,
}

impl Target {
    /// Counts one finished (or throttled) invocation of this target.
    fn count(&self, status: &'static str) {
        let runtime = self.version.config.runtime;
        metrics::invocation(&self.function.name, runtime, status);
        metrics::invocation_by_version(
            &self.function.name,
            self.version.version,
            self.alias_used.as_deref(),
            status,
        );
    }
}

/// What running the event on an instance gave.
struct Execution {
    start_type: StartType,
    instance_id: Option<String>,
    outcome: Result<Box<RawValue>, InvocationError>,
    logs: String,
    max_rss_kb: Option<u64>,
}

impl Engine {
    /// Runs an invocation to completion. The work runs in its own task, so a caller that
    /// goes away does not cut an invocation short.
    pub async fn invoke(self: &Arc<Self>, req: InvokeRequest) -> EngineResult<InvokeResponse> {
        self.admit()?;
        let target = self.resolve(&req).await?;
        let this = self.clone();
        let request_id = ids::request_id();
        self.inflight
            .spawn(async move { this.execute(&target, &req, request_id).await })
            .await
            .map_err(|e| EngineError::Internal(format!("invocation task failed: {e}")))?
    }

    /// Accepts an invocation to run in the background; returns its request id at once.
    pub async fn invoke_async(self: &Arc<Self>, mut req: InvokeRequest) -> EngineResult<String> {
        req.trigger = Trigger::Async;
        self.admit()?;
        let target = self.resolve(&req).await?;
        let request_id = ids::request_id();
        self.recorder.record(Invocation {
            status: InvocationStatus::Pending,
            ..self.record_base(&target, &req, &request_id, now())
        });
        let this = self.clone();
        let id = request_id.clone();
        self.inflight.spawn(async move {
            let started_at = now();
            if let Err(e) = this.execute(&target, &req, id.clone()).await {
                tracing::warn!(request_id = %id, error = %e, "async invocation failed before running");
                // An accepted async invocation always ends with a record, even if it never ran.
                this.recorder.record(Invocation {
                    status: InvocationStatus::Error,
                    error: Some(InvocationError {
                        code: e.code(),
                        message: e.to_string(),
                        error_type: None,
                        traceback: None,
                    }),
                    completed_at: Some(now()),
                    ..this.record_base(&target, &req, &id, started_at)
                });
            }
        });
        Ok(request_id)
    }

    /// Explicit version > alias > `latest`.
    async fn resolve(&self, req: &InvokeRequest) -> EngineResult<Target> {
        if let Some(key) = &req.session_key {
            crate::state_admin::check_session_key(key)?;
        }
        let function = self.catalog.function(&req.function).await?;
        let (number, alias_used) = match (req.version, &req.alias) {
            (Some(n), _) => (n, None),
            (None, alias) => {
                let alias = alias.as_deref().unwrap_or(LATEST_ALIAS);
                let route = self.catalog.alias(&function, alias).await?;
                let n =
                    router::pick_version(&route, &function.id, alias, req.session_key.as_deref());
                (n, Some(alias.to_owned()))
            }
        };
        let version = self.catalog.version(&function, number).await?;
        Ok(Target {
            function,
            version,
            alias_used,
        })
    }

    async fn execute(
        &self,
        target: &Target,
        req: &InvokeRequest,
        request_id: String,
    ) -> EngineResult<InvokeResponse> {
        let started_at = now();
        let clock = Instant::now();
        let runtime = target.version.config.runtime;
        let execution = match self.checkout(target, req).await {
            Ok(mut lease) => {
                let session_key = req.session_key.as_deref();
                let instance = lease.instance();
                let ran = self
                    .run_on(instance, target, &request_id, &req.event, session_key)
                    .await;
                self.give_back(lease, ran).await
            }
            Err(AcquireError::Refused(e)) => {
                if matches!(e, EngineError::Throttled(_)) {
                    target.count("throttled");
                }
                return Err(e);
            }
            Err(AcquireError::Start(StartFailure {
                error: StartError::Platform(e),
                ..
            })) => return Err(e),
            Err(AcquireError::Start(StartFailure { error, start_type })) => Execution {
                start_type,
                instance_id: None,
                outcome: Err(start_failure(error, start_type)),
                logs: String::new(),
                max_rss_kb: None,
            },
        };
        let duration_ms = clock.elapsed().as_secs_f64() * 1000.0;
        self.record_session(target, req, execution.instance_id.as_deref());

        let status = match &execution.outcome {
            Ok(_) => InvocationStatus::Success,
            Err(e) if e.code == ErrorCode::FunctionTimeout => InvocationStatus::Timeout,
            Err(_) => InvocationStatus::Error,
        };
        target.count(status.as_str());
        metrics::invocation_start(runtime, execution.start_type, duration_ms);

        let limit = self.config.record_payload_limit;
        let event_text = req.event.get();
        self.recorder.record(Invocation {
            status,
            input: (event_text.len() <= limit).then(|| event_text.to_owned()),
            output: execution
                .outcome
                .as_ref()
                .ok()
                .map(|b| b.get())
                .filter(|b| b.len() <= limit)
                .map(str::to_owned),
            error: execution.outcome.as_ref().err().cloned(),
            start_type: Some(execution.start_type),
            instance_id: execution.instance_id.clone(),
            completed_at: Some(now()),
            duration_ms: Some(duration_ms),
            memory_used_mb: execution.max_rss_kb.map(|kb| kb.div_ceil(1024) as u32),
            logs: log_tail(&execution.logs, limits::MAX_LOG_BYTES).to_owned(),
            ..self.record_base(target, req, &request_id, started_at)
        });

        Ok(InvokeResponse {
            request_id,
            function_id: target.function.id.clone(),
            version: target.version.version,
            alias_used: target.alias_used.clone(),
            session_key: req.session_key.clone(),
            start_type: execution.start_type,
            instance_id: execution.instance_id,
            duration_ms,
            outcome: execution.outcome,
        })
    }

    /// Runs the event on a checked-out instance, under the function's timeout, until the
    /// server stops.
    async fn run_on(
        &self,
        instance: &mut Instance,
        target: &Target,
        request_id: &str,
        event: &RawValue,
        session_key: Option<&str>,
    ) -> Ran {
        let timeout = Duration::from_secs(u64::from(target.version.config.timeout_sec));
        let mut state = InvocationState::new(
            &self.state,
            &target.function.id,
            target.version.config.state,
            session_key,
        );
        let invocation = instance
            .conn
            .invoke_with_state(request_id, event, &mut state);
        tokio::select! {
            ran = tokio::time::timeout(timeout, invocation) => match ran {
                Ok(Ok(done)) => Ran::Done(done),
                Ok(Err(e)) => Ran::Failed(e),
                Err(_) => Ran::TimedOut(timeout),
            },
            () = self.stopping.cancelled() => Ran::Stopped,
        }
    }

    /// Gives the instance back to its pool after a run that left it healthy, or disposes of
    /// it, and says what the invocation produced.
    async fn give_back(&self, mut lease: Lease, ran: Ran) -> Execution {
        let start_type = lease.start_type;
        let instance_id = Some(lease.instance().id.clone());
        let failed = |code: ErrorCode, message: String| Execution {
            start_type,
            instance_id: instance_id.clone(),
            outcome: Err(InvocationError {
                code,
                message,
                error_type: None,
                traceback: None,
            }),
            logs: String::new(),
            max_rss_kb: None,
        };
        match ran {
            Ran::Done(done) => {
                self.pools.release(lease);
                let outcome = match done.result {
                    Ok(body) if body.get().len() > limits::MAX_EVENT_BYTES => {
                        Err(InvocationError {
                            code: ErrorCode::ResponseTooLarge,
                            message: format!(
                                "the handler returned {} bytes; the limit is {} bytes",
                                body.get().len(),
                                limits::MAX_EVENT_BYTES
                            ),
                            error_type: None,
                            traceback: None,
                        })
                    }
                    Ok(body) => Ok(body),
                    Err(raised) => Err(function_error(raised)),
                };
                Execution {
                    start_type,
                    instance_id,
                    outcome,
                    logs: done.logs,
                    max_rss_kb: done.max_rss_kb,
                }
            }
            Ran::Stopped => {
                tokio::spawn(lease.retire().kill());
                failed(
                    ErrorCode::InstanceCrashed,
                    "the server stopped during the invocation (it ran past the shutdown \
                     grace period) and stopped its instance"
                        .into(),
                )
            }
            Ran::Failed(WorkerError::Closed) => {
                let mut instance = lease.retire();
                let exit = instance.exit_info().await;
                tokio::spawn(instance.kill());
                let how = exit.map_or("closed its connection".into(), |e| e.to_string());
                let code = if exit.is_some_and(|e| e.out_of_memory) {
                    ErrorCode::OutOfMemory
                } else {
                    ErrorCode::InstanceCrashed
                };
                failed(code, format!("the instance {how} during the invocation"))
            }
            Ran::Failed(e) => {
                tokio::spawn(lease.retire().kill());
                failed(
                    ErrorCode::InstanceCrashed,
                    format!("the instance failed: {e}"),
                )
            }
            Ran::TimedOut(timeout) => {
                tokio::spawn(lease.retire().kill());
                failed(
                    ErrorCode::FunctionTimeout,
                    format!(
                        "the invocation did not finish within the function's timeout of {} s",
                        timeout.as_secs()
                    ),
                )
            }
        }
    }

    /// Takes an instance for the invocation: with session affinity, in the session's turn.
    async fn checkout(&self, target: &Target, req: &InvokeRequest) -> Result<Lease, AcquireError> {
        let session = affinity_key(target, req).map(|key| self.session_ask(target, key));
        self.pools
            .acquire(&target.version, target.function.max_instances, session)
            .await
    }

    /// What session affinity needs to know of an invocation with session key `key`. A
    /// session this server has no binding for is looked up in the session registry: if it
    /// was bound somewhere (to an instance since gone, on this server or one that
    /// restarted), it is rebound rather than new.
    fn session_ask<'a>(&'a self, target: &'a Target, key: &'a str) -> SessionAsk<'a> {
        let config = target.version.config.state;
        let function_id = &target.function.id;
        // Bounded (from when it is asked, in the session's turn): the answer only tells a
        // rebound session from a new one, and a slow or unreachable backend must not hold
        // the invocation up.
        let was_bound = async move {
            let lookup = self.state.store().session(function_id, key);
            match tokio::time::timeout(REGISTRY_LOOKUP, lookup).await {
                Ok(Ok(session)) => session.is_some_and(|s| s.instance_id.is_some()),
                Ok(Err(e)) => {
                    tracing::debug!(function = %function_id, session = %key, "session registry unavailable: {e}");
                    false
                }
                Err(_) => false,
            }
        };
        SessionAsk {
            key,
            timeout: Duration::from_secs(config.session_timeout.into()),
            was_bound: Box::pin(was_bound),
        }
    }

    /// Records a stateful function's session (created, last access, the instance that
    /// served it) behind the invocation, off its path: the registry is what the admin API
    /// lists, and a lost update only delays a binding's expiry.
    fn record_session(&self, target: &Target, req: &InvokeRequest, instance: Option<&str>) {
        let (Some(key), config) = (&req.session_key, target.version.config.state) else {
            return;
        };
        if !config.enabled && !config.session_affinity {
            return;
        }
        let state = self.state.clone();
        let function_id = target.function.id.clone();
        let key = key.clone();
        let instance = instance.map(str::to_owned);
        let timeout = Duration::from_secs(config.session_timeout.into());
        self.inflight.spawn(async move {
            if let Err(e) = state
                .store()
                .touch_session(&function_id, &key, instance.as_deref(), timeout)
                .await
            {
                tracing::debug!(function = %function_id, session = %key, "session not recorded: {e}");
            }
        });
    }

    fn record_base(
        &self,
        target: &Target,
        req: &InvokeRequest,
        request_id: &str,
        started_at: OffsetDateTime,
    ) -> Invocation {
        Invocation {
            request_id: request_id.to_owned(),
            function_id: target.function.id.clone(),
            function_name: target.function.name.clone(),
            version: target.version.version,
            alias_used: target.alias_used.clone(),
            session_key: req.session_key.clone(),
            trigger: req.trigger,
            status: InvocationStatus::Running,
            input: None,
            output: None,
            error: None,
            start_type: None,
            instance_id: None,
            started_at,
            completed_at: None,
            duration_ms: None,
            memory_used_mb: None,
            logs: String::new(),
        }
    }
}

/// What running the event on an instance came to.
enum Ran {
    /// The worker answered (the handler returned or raised).
    Done(InvokeOutcome),
    /// The worker broke (closed its connection, or broke the protocol).
    Failed(WorkerError),
    /// The function's timeout passed first.
    TimedOut(Duration),
    /// The server stopped first (past its shutdown grace period).
    Stopped,
}

/// The longest an invocation waits for the session registry to say whether a session it
/// has no binding for was bound before.
const REGISTRY_LOOKUP: Duration = Duration::from_millis(200);

/// The session key of an invocation whose version has session affinity.
fn affinity_key<'a>(target: &Target, req: &'a InvokeRequest) -> Option<&'a str> {
    req.session_key
        .as_deref()
        .filter(|_| target.version.config.state.session_affinity)
}

fn function_error(raised: ErrorPayload) -> InvocationError {
    InvocationError {
        code: ErrorCode::FunctionError,
        message: format!("{}: {}", raised.error_type, raised.message),
        error_type: Some(raised.error_type),
        traceback: Some(raised.traceback),
    }
}

fn start_failure(failure: StartError, start_type: StartType) -> InvocationError {
    let plain = |code: ErrorCode, message: String| InvocationError {
        code,
        message,
        error_type: None,
        traceback: None,
    };
    match failure {
        // From a snapshot the code is loaded already: what failed is an after-restore hook.
        StartError::Init { error, .. } if start_type != StartType::Cold => InvocationError {
            code: ErrorCode::FunctionInitError,
            message: format!("the instance failed to start: {}", error.message),
            error_type: Some(error.error_type),
            traceback: Some(error.traceback),
        },
        StartError::Init { error, .. } => InvocationError {
            code: ErrorCode::FunctionInitError,
            message: format!(
                "the handler failed to load: {}: {}",
                error.error_type, error.message
            ),
            error_type: Some(error.error_type),
            traceback: Some(error.traceback),
        },
        StartError::Crashed(message) => plain(ErrorCode::InstanceCrashed, message),
        StartError::Timeout(limit) => plain(
            ErrorCode::FunctionTimeout,
            format!(
                "the instance did not finish loading the handler within {} s",
                limit.as_secs()
            ),
        ),
        StartError::Platform(e) => plain(ErrorCode::Internal, e.to_string()),
    }
}
