//! The state API of a running invocation (SPEC §7): the host's answers to the `state`
//! requests a worker sends while its handler runs.
//!
//! The session scope (`state`, `state.session()`: the invocation's session key, `_default`
//! without one) and the function scope go to the server's state backend; the invocation
//! scope is an in-memory store that lives as long as the invocation. Every call is counted
//! in `nimbus_state_operation_total{operation,scope,status}` and timed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use nimbus_core::StateConfig;
use nimbus_runtime::protocol::StateFailure;
use nimbus_runtime::{StateAnswer, StateCalls, StateRequest};
use nimbus_state::{Bucket, Limits, MemoryStore, State, StateError, DEFAULT_SESSION};
use serde_json::value::RawValue;

use crate::metrics;

/// The state of one invocation, as its worker sees it.
pub(crate) struct InvocationState<'a> {
    shared: &'a State,
    function_id: &'a str,
    config: StateConfig,
    session_key: Option<&'a str>,
    /// The invocation scope, made on first use.
    local: Option<State>,
}

impl<'a> InvocationState<'a> {
    pub(crate) fn new(
        shared: &'a State,
        function_id: &'a str,
        config: StateConfig,
        session_key: Option<&'a str>,
    ) -> Self {
        InvocationState {
            shared,
            function_id,
            config,
            session_key,
            local: None,
        }
    }

    fn limits(&self) -> Limits {
        Limits {
            max_value_bytes: self.config.max_state_size as usize,
            max_keys: self.config.max_keys,
        }
    }

    /// The function's default TTL, if it has one.
    fn default_ttl(&self) -> Option<Duration> {
        (self.config.default_ttl > 0).then(|| Duration::from_secs(self.config.default_ttl.into()))
    }

    async fn run(
        &mut self,
        op: Op,
        scope: Scope,
        request: StateRequest,
    ) -> Result<Answer, Failure> {
        let outcome = self.run_in(op, scope, request).await;
        outcome.map_err(|failure| match (scope, failure) {
            // The invocation scope is a bucket of the in-memory store; its errors name it.
            (Scope::Invocation, Failure::State(StateError::TooManyKeys { max, .. })) => {
                Failure::State(StateError::TooManyKeys {
                    scope: "invocation",
                    max,
                })
            }
            (_, failure) => failure,
        })
    }

    async fn run_in(
        &mut self,
        op: Op,
        scope: Scope,
        request: StateRequest,
    ) -> Result<Answer, Failure> {
        let (state, bucket) = match scope {
            Scope::Session => (
                self.shared.clone(),
                Bucket::session(
                    self.function_id,
                    self.session_key.unwrap_or(DEFAULT_SESSION),
                ),
            ),
            Scope::Function => (self.shared.clone(), Bucket::function(self.function_id)),
            Scope::Invocation => (
                self.local
                    .get_or_insert_with(|| State::new(Arc::new(MemoryStore::new())))
                    .clone(),
                Bucket::function(self.function_id),
            ),
        };
        let limits = self.limits();
        let key = || request.key.as_deref().ok_or(Failure::Missing("key"));
        // A JSON `null` value arrives as no value at all (see `WorkerMessage::value`).
        let value = || request.value.as_deref().map_or("null", RawValue::get);
        let ttl = ttl(request.ttl)?;
        Ok(match op {
            Op::Get | Op::GetWithVersion => match state.get(&bucket, key()?).await? {
                Some(found) => Answer::Value(found.value, Some(found.version)),
                None => Answer::Value("null".into(), Some(0)),
            },
            Op::Set => {
                let ttl = ttl.or(self.default_ttl());
                let version = state
                    .set(&bucket, key()?, value(), ttl, None, limits)
                    .await?;
                Answer::Version(version)
            }
            Op::SetWithVersion => {
                let expected = request.version.ok_or(Failure::Missing("version"))?;
                let ttl = ttl.or(self.default_ttl());
                let version = state
                    .set(&bucket, key()?, value(), ttl, Some(expected), limits)
                    .await?;
                Answer::Version(version)
            }
            Op::Delete => Answer::Flag(state.delete(&bucket, key()?).await?),
            Op::Exists => Answer::Flag(state.exists(&bucket, key()?).await?),
            Op::Expire => Answer::Flag(state.expire(&bucket, key()?, ttl).await?),
            Op::Incr => {
                let delta = request.delta.unwrap_or(1);
                let ttl = ttl.or(self.default_ttl());
                Answer::Value(
                    state
                        .incr(&bucket, key()?, delta, ttl, limits)
                        .await?
                        .to_string(),
                    None,
                )
            }
            Op::Keys => {
                let pattern = request.pattern.as_deref().unwrap_or("*");
                let keys = state.keys(&bucket, pattern).await?;
                Answer::Value(
                    serde_json::to_string(&keys).expect("strings serialize"),
                    None,
                )
            }
        })
    }
}

impl StateCalls for InvocationState<'_> {
    fn enabled(&self) -> bool {
        self.config.enabled
    }

    fn session_key(&self) -> Option<&str> {
        self.session_key
    }

    async fn call(&mut self, request: StateRequest) -> Result<StateAnswer, StateFailure> {
        let started = Instant::now();
        let (op, scope) = match (Op::parse(&request.op), Scope::parse(&request.scope)) {
            (Some(op), Some(scope)) => (op, scope),
            _ => {
                return Err(Failure::Unknown(request.op, request.scope).into_failure());
            }
        };
        let outcome = if self.config.enabled {
            self.run(op, scope, request).await
        } else {
            Err(Failure::NotEnabled)
        };
        let ms = started.elapsed().as_secs_f64() * 1000.0;
        match outcome {
            Ok(answer) => {
                metrics::state_operation(op.name(), scope.name(), "ok", ms);
                Ok(answer.into_answer())
            }
            Err(failure) => {
                let failure = failure.into_failure();
                metrics::state_operation(op.name(), scope.name(), &failure.code, ms);
                Err(failure)
            }
        }
    }
}

/// A TTL in seconds from the worker, as a duration (whole milliseconds, at least one).
fn ttl(seconds: Option<f64>) -> Result<Option<Duration>, Failure> {
    match seconds {
        None => Ok(None),
        Some(s) if s.is_finite() && s > 0.0 && s <= nimbus_state::MAX_TTL.as_secs_f64() => {
            Ok(Some(Duration::from_millis((s * 1000.0).ceil() as u64)))
        }
        Some(s) => Err(Failure::State(StateError::InvalidArgument(format!(
            "ttl must be a number of seconds between 0.001 and {}, not {s}",
            nimbus_state::MAX_TTL.as_secs()
        )))),
    }
}

/// A state operation.
#[derive(Debug, Clone, Copy)]
enum Op {
    Get,
    Set,
    Delete,
    Exists,
    Keys,
    Incr,
    Expire,
    GetWithVersion,
    SetWithVersion,
}

impl Op {
    const ALL: [Op; 9] = [
        Op::Get,
        Op::Set,
        Op::Delete,
        Op::Exists,
        Op::Keys,
        Op::Incr,
        Op::Expire,
        Op::GetWithVersion,
        Op::SetWithVersion,
    ];

    fn name(self) -> &'static str {
        match self {
            Op::Get => "get",
            Op::Set => "set",
            Op::Delete => "delete",
            Op::Exists => "exists",
            Op::Keys => "keys",
            Op::Incr => "incr",
            Op::Expire => "expire",
            Op::GetWithVersion => "get_with_version",
            Op::SetWithVersion => "set_with_version",
        }
    }

    fn parse(name: &str) -> Option<Op> {
        Op::ALL.into_iter().find(|op| op.name() == name)
    }
}

/// Whose state.
#[derive(Debug, Clone, Copy)]
enum Scope {
    Session,
    Function,
    Invocation,
}

impl Scope {
    fn name(self) -> &'static str {
        match self {
            Scope::Session => "session",
            Scope::Function => "function",
            Scope::Invocation => "invocation",
        }
    }

    fn parse(name: &str) -> Option<Scope> {
        [Scope::Session, Scope::Function, Scope::Invocation]
            .into_iter()
            .find(|s| s.name() == name)
    }
}

/// What an operation returns to the worker.
enum Answer {
    /// A value (JSON text) and, for reads, its version (0: absent).
    Value(String, Option<u64>),
    /// The version a write gave.
    Version(u64),
    /// Whether the key was there.
    Flag(bool),
}

impl Answer {
    fn into_answer(self) -> StateAnswer {
        let raw = |text: String| Some(RawValue::from_string(text).expect("stored values are JSON"));
        match self {
            Answer::Value(text, version) => StateAnswer {
                value: raw(text),
                version,
            },
            Answer::Version(version) => StateAnswer {
                value: None,
                version: Some(version),
            },
            Answer::Flag(flag) => StateAnswer {
                value: raw(flag.to_string()),
                version: None,
            },
        }
    }
}

/// Why a call failed.
enum Failure {
    State(StateError),
    Missing(&'static str),
    Unknown(String, String),
    NotEnabled,
}

impl From<StateError> for Failure {
    fn from(e: StateError) -> Self {
        Failure::State(e)
    }
}

impl Failure {
    fn into_failure(self) -> StateFailure {
        let (code, message, current_version) = match self {
            Failure::State(e) => {
                let current = match e {
                    StateError::Conflict { current, .. } => Some(current),
                    _ => None,
                };
                (e.code().as_str(), e.to_string(), current)
            }
            Failure::Missing(field) => (
                "invalid_argument",
                format!("the state request has no {field}"),
                None,
            ),
            Failure::Unknown(op, scope) => (
                "invalid_argument",
                format!(
                    "unknown state operation {} on scope {}",
                    nimbus_core::echo(&op),
                    nimbus_core::echo(&scope)
                ),
                None,
            ),
            Failure::NotEnabled => (
                "state_not_enabled",
                "state is not enabled for this function (enable it in its state_config)".into(),
                None,
            ),
        };
        StateFailure {
            code: code.into(),
            message,
            current_version,
        }
    }
}
