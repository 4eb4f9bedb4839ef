//! Invocation records: what was run, how it started and how it ended.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::ErrorCode;

string_enum!(
    /// How an invocation was triggered.
    Trigger {
        /// Synchronous HTTP invoke.
        Http => "http",
        /// Queued asynchronous invoke.
        Async => "async",
        /// Scheduled.
        Cron => "cron",
    }
);

string_enum!(
    /// Where an invocation is in its life.
    InvocationStatus {
        /// Accepted, not started.
        Pending => "pending",
        /// Running.
        Running => "running",
        /// Handler returned.
        Success => "success",
        /// Handler raised, or the instance failed.
        Error => "error",
        /// Ran past the function's timeout.
        Timeout => "timeout",
    }
);

string_enum!(
    /// How the instance that served an invocation was obtained, fastest first.
    StartType {
        /// An idle instance was reused.
        Warm => "warm",
        /// Forked from an initialized template.
        Template => "template",
        /// Restored from an on-disk snapshot.
        Snapshot => "snapshot",
        /// A new runtime loaded the code from scratch.
        Cold => "cold",
    }
);

/// Why an invocation failed, as recorded and returned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InvocationError {
    /// Stable error code (`function_error`, `function_timeout`, `instance_crashed`, …).
    pub code: ErrorCode,
    /// Human-readable message.
    pub message: String,
    /// Exception type raised by the handler, for `function_error`.
    #[serde(default, skip_serializing_if = "Option::is_none", rename = "type")]
    pub error_type: Option<String>,
    /// Traceback of the handler's exception.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceback: Option<String>,
}

/// One invocation, as recorded in the metadata store.
#[derive(Debug, Clone, PartialEq)]
pub struct Invocation {
    /// `inv_<ulid>`.
    pub request_id: String,
    /// Function id.
    pub function_id: String,
    /// Function name at the time of the call.
    pub function_name: String,
    /// Version that served it.
    pub version: u32,
    /// Alias the version was chosen through, if any.
    pub alias_used: Option<String>,
    /// Session key given by the caller.
    pub session_key: Option<String>,
    /// Trigger.
    pub trigger: Trigger,
    /// Outcome.
    pub status: InvocationStatus,
    /// The event as JSON text (absent when larger than the recording limit).
    pub input: Option<String>,
    /// The handler's return value as JSON text (absent when larger than the recording limit).
    pub output: Option<String>,
    /// Failure details.
    pub error: Option<InvocationError>,
    /// How its instance started.
    pub start_type: Option<StartType>,
    /// Instance that served it.
    pub instance_id: Option<String>,
    /// Start time.
    pub started_at: OffsetDateTime,
    /// End time.
    pub completed_at: Option<OffsetDateTime>,
    /// Wall time in milliseconds.
    pub duration_ms: Option<f64>,
    /// Peak resident memory of the instance, MiB.
    pub memory_used_mb: Option<u32>,
    /// Tail of the handler's stdout/stderr (at most 4 KiB).
    pub logs: String,
}

impl Invocation {
    /// Whether the instance was not an idle, already-warm one.
    pub fn cold_start(&self) -> bool {
        self.start_type.is_some_and(|s| s != StartType::Warm)
    }
}

/// The last `max` bytes of `logs`, cut at a character boundary.
pub fn log_tail(logs: &str, max: usize) -> &str {
    if logs.len() <= max {
        return logs;
    }
    let mut start = logs.len() - max;
    while !logs.is_char_boundary(start) {
        start += 1;
    }
    &logs[start..]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enums_round_trip() {
        for s in ["warm", "template", "snapshot", "cold"] {
            assert_eq!(s.parse::<StartType>().unwrap().as_str(), s);
        }
        assert!("x"
            .parse::<InvocationStatus>()
            .unwrap_err()
            .message
            .contains("success"));
    }

    #[test]
    fn log_tail_keeps_the_end_on_a_char_boundary() {
        assert_eq!(log_tail("abc", 10), "abc");
        assert_eq!(log_tail("abcdef", 3), "def");
        assert_eq!(log_tail("aé", 1), "");
        assert_eq!(log_tail("aéb", 2), "b");
    }
}
