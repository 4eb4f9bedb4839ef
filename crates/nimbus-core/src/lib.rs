//! Nimbus domain model: the types every other crate speaks, and their validation.
//!
//! This crate performs no I/O. Stores, drivers and the HTTP layer depend on it,
//! never the other way round.

#[macro_use]
mod string_enum;

pub mod alias;
pub mod code;
pub mod echo;
pub mod error;
pub mod error_code;
pub mod function;
pub mod ids;
pub mod invocation;
pub mod json_depth;
pub mod limits;
pub mod runtime;
pub mod snapshot;

pub use alias::{
    AliasAction, AliasRevision, FunctionAlias, RoutingConfig, WeightedVersion, LATEST_ALIAS,
};
pub use code::CodeBundle;
pub use echo::echo;
pub use error::ValidationError;
pub use error_code::ErrorCode;
pub use function::{
    Function, FunctionConfig, FunctionStatus, FunctionVersion, Network, StateConfig,
    StateConfigPatch,
};
pub use invocation::{Invocation, InvocationError, InvocationStatus, StartType, Trigger};
pub use runtime::{Handler, Runtime};
pub use snapshot::{
    env_vars_hash, NewSnapshot, Snapshot, SnapshotFailure, SnapshotFile, SnapshotKey,
    SnapshotStatus, SnapshotUse,
};

/// Current wall-clock time, truncated to milliseconds (the precision every store keeps).
pub fn now() -> time::OffsetDateTime {
    let now = time::OffsetDateTime::now_utc();
    let millis = now.unix_timestamp_nanos() / 1_000_000;
    time::OffsetDateTime::from_unix_timestamp_nanos(millis * 1_000_000).expect("valid timestamp")
}
