//! The stable error codes of the API (`{"error":{"code":…}}`) and of failed invocations.
//!
//! Every code the server answers or records is a variant here, serialized to the same
//! string it always was; the HTTP layer chooses each one's status by an exhaustive match.

string_enum!(
    /// A stable, machine-readable error code.
    ErrorCode {
        /// The request is not what the endpoint takes (bad query, path, body or header).
        InvalidRequest => "invalid_request",
        /// An invocation's event is not valid JSON.
        InvalidJson => "invalid_json",
        /// Input breaks a rule of the domain model (the answer names the field).
        ValidationError => "validation_error",
        /// The function's code failed to load when validated at deploy time.
        FunctionInitFailed => "function_init_failed",
        /// The function's runtime cannot run on this server.
        RuntimeUnavailable => "runtime_unavailable",
        /// A state key is longer than the limit.
        KeyTooLong => "key_too_long",
        /// A state key is not a valid key.
        InvalidKey => "invalid_key",
        /// A state value is larger than the limit.
        ValueTooLarge => "value_too_large",
        /// A state scope holds as many keys as it may.
        TooManyKeys => "too_many_keys",
        /// A conditional state write lost to another writer.
        StateConflict => "state_conflict",
        /// A state increment found a value that is not an integer.
        NotAnInteger => "not_an_integer",
        /// A state operation's argument is out of its range.
        InvalidArgument => "invalid_argument",
        /// No or a wrong API key.
        Unauthorized => "unauthorized",
        /// No function of that id or name.
        FunctionNotFound => "function_not_found",
        /// The function has no such version.
        VersionNotFound => "version_not_found",
        /// The function has no such alias.
        AliasNotFound => "alias_not_found",
        /// The alias has no such revision.
        RevisionNotFound => "revision_not_found",
        /// No invocation of that request id.
        InvocationNotFound => "invocation_not_found",
        /// No snapshot of that id.
        SnapshotNotFound => "snapshot_not_found",
        /// No session of that key.
        SessionNotFound => "session_not_found",
        /// The session's state has no such key.
        StateKeyNotFound => "state_key_not_found",
        /// Something the metadata store was asked for does not exist.
        NotFound => "not_found",
        /// No endpoint at that path.
        RouteNotFound => "route_not_found",
        /// The endpoint does not take that method.
        MethodNotAllowed => "method_not_allowed",
        /// A function of that name exists.
        FunctionExists => "function_exists",
        /// An alias of that name exists.
        AliasExists => "alias_exists",
        /// The alias cannot be deleted (`latest`).
        AliasProtected => "alias_protected",
        /// A version cannot be deleted while aliases route to it.
        VersionInUse => "version_in_use",
        /// The alias has no earlier routing to roll back to.
        NothingToRollBack => "nothing_to_roll_back",
        /// The routing names a deleted version.
        VersionDeleted => "version_deleted",
        /// The alias changed since the revision the request was based on.
        RevisionMismatch => "revision_mismatch",
        /// The function has as many aliases as it may.
        TooManyAliases => "too_many_aliases",
        /// The snapshot is being built.
        SnapshotBuilding => "snapshot_building",
        /// Snapshots are turned off on this server.
        SnapshotsDisabled => "snapshots_disabled",
        /// A uniqueness rule of the metadata store prevents the change.
        Conflict => "conflict",
        /// The request body is larger than the limit.
        PayloadTooLarge => "payload_too_large",
        /// The request body stopped arriving.
        RequestTimeout => "request_timeout",
        /// The request's URI is longer than the limit.
        UriTooLong => "uri_too_long",
        /// The request's headers are larger than the limit.
        HeadersTooLarge => "headers_too_large",
        /// The request's content type is not JSON.
        UnsupportedMediaType => "unsupported_media_type",
        /// No capacity within the queue bound or timeout.
        Throttled => "throttled",
        /// A bug or corrupt data.
        Internal => "internal",
        /// The server cannot answer now.
        ServiceUnavailable => "service_unavailable",
        /// The metadata store is unreachable or does not answer.
        StoreUnavailable => "store_unavailable",
        /// The server is shutting down.
        ShuttingDown => "shutting_down",
        /// The server serves as many connections as it may.
        TooManyConnections => "too_many_connections",
        /// The state backend is unreachable.
        StateUnavailable => "state_unavailable",
        /// The handler raised an exception.
        FunctionError => "function_error",
        /// The instance failed to load the handler or to run its after-restore hook.
        FunctionInitError => "function_init_error",
        /// The invocation ran past the function's timeout.
        FunctionTimeout => "function_timeout",
        /// The instance exited or failed during the invocation.
        InstanceCrashed => "instance_crashed",
        /// The instance was killed for using more memory than the function may.
        OutOfMemory => "out_of_memory",
        /// The handler returned more than the response limit.
        ResponseTooLarge => "response_too_large",
    }
);

impl ErrorCode {
    /// Whether the code is the outcome of an invocation that ran (or tried to start) user
    /// code, answered in the invocation's result rather than as an API error.
    pub fn is_invocation_outcome(self) -> bool {
        matches!(
            self,
            ErrorCode::FunctionError
                | ErrorCode::FunctionInitError
                | ErrorCode::FunctionTimeout
                | ErrorCode::InstanceCrashed
                | ErrorCode::OutOfMemory
                | ErrorCode::ResponseTooLarge
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_round_trips_to_its_string() {
        for &code in ErrorCode::ALL {
            let text = code.as_str();
            assert_eq!(code.to_string(), text);
            assert_eq!(text.parse::<ErrorCode>().unwrap(), code);
            let json = serde_json::to_string(&code).unwrap();
            assert_eq!(json, format!("\"{text}\""));
            assert_eq!(serde_json::from_str::<ErrorCode>(&json).unwrap(), code);
            // snake_case: what clients match on never changes shape.
            assert!(
                text.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{text}"
            );
        }
        assert!("no_such_code".parse::<ErrorCode>().is_err());
    }
}
