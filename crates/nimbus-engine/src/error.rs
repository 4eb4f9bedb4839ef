//! The engine's error type: everything that stops a request before user code runs.
//!
//! Failures of user code (exceptions, timeouts, crashes) are not errors of the engine:
//! they are outcomes of an invocation, carried in [`crate::InvokeResponse`].

use nimbus_core::{echo, ErrorCode, ValidationError};
use nimbus_runtime::protocol::ErrorPayload;
use nimbus_store::StoreError;

/// What a request can fail with before (or instead of) running user code.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// Input breaks a rule.
    #[error("{0}")]
    Validation(#[from] ValidationError),
    /// The request body is not what the endpoint takes (bad JSON, unknown field, wrong type).
    #[error("{0}")]
    BadRequest(String),
    /// A named thing does not exist.
    #[error("{message}")]
    NotFound {
        /// Stable error code (`function_not_found`, `version_not_found`, …).
        code: ErrorCode,
        /// Names what was not found.
        message: String,
    },
    /// A uniqueness or state rule prevents the change.
    #[error("{message}")]
    Conflict {
        /// Stable error code (`function_exists`, …).
        code: ErrorCode,
        /// Names the conflict.
        message: String,
    },
    /// A version cannot be deleted while aliases route to it.
    #[error("version {version} cannot be deleted: it is routed by {}; change that routing first", routed_by(.aliases))]
    VersionInUse {
        /// The version.
        version: u32,
        /// The aliases whose routing names it.
        aliases: Vec<String>,
    },
    /// The function's code failed to load when validated at deploy time.
    #[error("the function's code failed to load: {}: {}", .error.error_type, .error.message)]
    InvalidCode {
        /// The exception raised while loading.
        error: ErrorPayload,
        /// What the code printed while loading.
        logs: String,
    },
    /// The function's runtime cannot run on this server.
    #[error("{0}")]
    RuntimeUnavailable(String),
    /// No capacity within the queue bound or timeout.
    #[error("{0}")]
    Throttled(String),
    /// The metadata store is unreachable or does not answer (`store_unavailable`).
    #[error("{0}")]
    Unavailable(String),
    /// A state operation of the admin API failed (the backend is unreachable, or the key
    /// is not one).
    #[error("{0}")]
    State(#[from] nimbus_state::StateError),
    /// The server is shutting down.
    #[error("the server is shutting down")]
    ShuttingDown,
    /// A bug or corrupt data.
    #[error("{0}")]
    Internal(String),
}

impl EngineError {
    /// A `version_not_found` error naming the function and version.
    pub fn version_not_found(function: &str, version: u32) -> Self {
        EngineError::NotFound {
            code: ErrorCode::VersionNotFound,
            message: format!("function {} has no version {version}", echo(function)),
        }
    }

    /// An `alias_not_found` error naming the function and alias.
    pub fn alias_not_found(function: &str, alias: &str) -> Self {
        EngineError::NotFound {
            code: ErrorCode::AliasNotFound,
            message: format!("function {} has no alias {}", echo(function), echo(alias)),
        }
    }

    /// A `function_not_found` error naming the reference.
    pub fn function_not_found(reference: &str) -> Self {
        EngineError::NotFound {
            code: ErrorCode::FunctionNotFound,
            message: format!("function {} not found", echo(reference)),
        }
    }
}

/// `alias "prod"` or `aliases "canary", "prod"`.
fn routed_by(aliases: &[String]) -> String {
    let quoted: Vec<String> = aliases.iter().map(|a| echo(a).to_string()).collect();
    match quoted.as_slice() {
        [one] => format!("alias {one}"),
        _ => format!("aliases {}", quoted.join(", ")),
    }
}

impl From<StoreError> for EngineError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict(message) => EngineError::Conflict {
                code: ErrorCode::Conflict,
                message,
            },
            StoreError::NotFound(message) => EngineError::NotFound {
                code: ErrorCode::NotFound,
                message,
            },
            StoreError::Backend(message)
            | StoreError::Rejected(message)
            | StoreError::Unavailable(message) => {
                EngineError::Unavailable(format!("metadata store unavailable: {message}"))
            }
            StoreError::Corrupt(message) => {
                EngineError::Internal(format!("corrupt metadata: {message}"))
            }
            StoreError::AliasNotFound { .. } => EngineError::NotFound {
                code: ErrorCode::AliasNotFound,
                message: e.to_string(),
            },
            StoreError::RevisionNotFound { .. } => EngineError::NotFound {
                code: ErrorCode::RevisionNotFound,
                message: e.to_string(),
            },
            StoreError::MissingVersions(_) => EngineError::Validation(ValidationError::new(
                "routing_config.weights",
                e.to_string(),
            )),
            StoreError::VersionInUse { version, aliases } => {
                EngineError::VersionInUse { version, aliases }
            }
            StoreError::NothingToRollBack(message) => EngineError::Conflict {
                code: ErrorCode::NothingToRollBack,
                message,
            },
            StoreError::TooManyAliases { limit } => EngineError::Conflict {
                code: ErrorCode::TooManyAliases,
                message: format!(
                    "the function has {limit} aliases, as many as a function may have; delete \
                     one it no longer needs first"
                ),
            },
            StoreError::RevisionMismatch { .. } => EngineError::Conflict {
                code: ErrorCode::RevisionMismatch,
                message: e.to_string(),
            },
        }
    }
}

/// Result of engine calls.
pub type EngineResult<T> = Result<T, EngineError>;

impl EngineError {
    /// The stable error code of the API (`{"error":{"code":…}}`).
    pub fn code(&self) -> ErrorCode {
        match self {
            EngineError::Validation(_) => ErrorCode::ValidationError,
            EngineError::BadRequest(_) => ErrorCode::InvalidRequest,
            EngineError::NotFound { code, .. } | EngineError::Conflict { code, .. } => *code,
            EngineError::VersionInUse { .. } => ErrorCode::VersionInUse,
            EngineError::InvalidCode { .. } => ErrorCode::FunctionInitFailed,
            EngineError::RuntimeUnavailable(_) => ErrorCode::RuntimeUnavailable,
            EngineError::Throttled(_) => ErrorCode::Throttled,
            EngineError::Unavailable(_) => ErrorCode::StoreUnavailable,
            EngineError::State(e) => e.code(),
            EngineError::ShuttingDown => ErrorCode::ShuttingDown,
            EngineError::Internal(_) => ErrorCode::Internal,
        }
    }
}
