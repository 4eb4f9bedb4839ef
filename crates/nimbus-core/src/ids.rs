//! Generated identifiers: a type prefix and a ULID, so ids sort by creation time.

/// A new function id, `fn_<ulid>`.
pub fn function_id() -> String {
    format!("fn_{}", ulid::Ulid::new().to_string().to_lowercase())
}

/// A new invocation request id, `inv_<ulid>`.
pub fn request_id() -> String {
    format!("inv_{}", ulid::Ulid::new().to_string().to_lowercase())
}

/// A new instance id, `i_<ulid>`.
pub fn instance_id() -> String {
    format!("i_{}", ulid::Ulid::new().to_string().to_lowercase())
}

/// A new snapshot id, `snap_<ulid>`.
pub fn snapshot_id() -> String {
    format!("snap_{}", ulid::Ulid::new().to_string().to_lowercase())
}

#[cfg(test)]
mod tests {
    #[test]
    fn ids_carry_their_prefix_and_are_unique() {
        let a = super::function_id();
        let b = super::function_id();
        assert!(a.starts_with("fn_") && a.len() == 29, "{a}");
        assert_ne!(a, b);
        assert!(super::request_id().starts_with("inv_"));
        assert!(super::instance_id().starts_with("i_"));
        assert!(super::snapshot_id().starts_with("snap_"));
    }
}
