//! Function-level snapshots: an initialized instance of one version, saved by a sandbox
//! driver so later instances can be restored from it instead of starting cold.
//!
//! A snapshot is identified by its [`SnapshotKey`]: everything that decides whether a
//! restored instance would behave like a freshly started one (the version and its code,
//! its environment, and the driver that wrote it). The metadata store keeps one row per key.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use crate::function::FunctionVersion;
use crate::runtime::Runtime;

string_enum!(
    /// Where a snapshot is in its life.
    SnapshotStatus {
        /// Being written by its driver; not restorable yet.
        Building => "building",
        /// Complete and restorable.
        Ready => "ready",
        /// Writing it failed (see its error message).
        Failed => "failed",
        /// Past its expiry; its files may be gone.
        Expired => "expired",
        /// Its files did not verify (missing, wrong size or checksum).
        Corrupt => "corrupt",
    }
);

impl SnapshotStatus {
    /// Building or ready: the snapshot is usable or about to be, so building another one
    /// for its key would only duplicate the work.
    pub fn is_live(self) -> bool {
        matches!(self, SnapshotStatus::Building | SnapshotStatus::Ready)
    }

    /// Failed or corrupt: kept in the snapshot's failure history.
    pub fn is_failure(self) -> bool {
        matches!(self, SnapshotStatus::Failed | SnapshotStatus::Corrupt)
    }
}

/// How an instance was started from a snapshot (counted apart: a fork takes milliseconds,
/// a restore from disk tens of them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotUse {
    /// Forked from the resident template (`start_type: template`).
    Fork,
    /// From the checkpoint on disk, restored as the template first
    /// (`start_type: snapshot`).
    Restore,
}

/// The last time a snapshot failed or was found corrupt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotFailure {
    /// `failed` or `corrupt`.
    pub status: SnapshotStatus,
    /// Why.
    pub message: Option<String>,
    /// When.
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
}

/// One file of a snapshot's on-disk tier.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotFile {
    /// File name, relative to the snapshot's directory.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Checksum of the contents: `blake3:<lowercase hex>`. Files recorded by earlier
    /// versions carry a SHA-256 here (in a field named `sha256`, as bare hex).
    #[serde(alias = "sha256")]
    pub checksum: String,
}

/// What identifies a snapshot: two instances restored from snapshots with equal keys are
/// interchangeable.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SnapshotKey {
    /// Function id.
    pub function_id: String,
    /// Version the snapshot was taken of.
    pub version: u32,
    /// The version's `sha256:<hex>` code hash.
    pub code_hash: String,
    /// [`env_vars_hash`] of the version's environment.
    pub env_vars_hash: String,
    /// Sandbox driver that wrote it (`process`, `firecracker`): snapshots of one driver
    /// cannot be restored by another.
    pub driver: String,
}

/// Everything needed to create a snapshot row: its key and the settings it was taken with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewSnapshot {
    /// What identifies it.
    pub key: SnapshotKey,
    /// Runtime of the snapshotted instance.
    pub runtime: Runtime,
    /// Memory limit of the snapshotted instance, MiB.
    pub memory_mb: u32,
}

impl NewSnapshot {
    /// The snapshot of `version` that `driver` would write.
    pub fn for_version(version: &FunctionVersion, driver: impl Into<String>) -> Self {
        let config = &version.config;
        NewSnapshot {
            key: SnapshotKey {
                function_id: version.function_id.clone(),
                version: version.version,
                code_hash: config.code_hash.clone(),
                env_vars_hash: env_vars_hash(&config.env_vars),
                driver: driver.into(),
            },
            runtime: config.runtime,
            memory_mb: config.memory_mb,
        }
    }
}

/// A snapshot as the metadata store indexes it. The files themselves are the driver's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// `snap_<ulid>`; kept when a failed snapshot is rebuilt under the same key.
    pub id: String,
    /// Function id.
    pub function_id: String,
    /// Version the snapshot was taken of.
    pub version: u32,
    /// The version's `sha256:<hex>` code hash.
    pub code_hash: String,
    /// Runtime of the snapshotted instance.
    pub runtime: Runtime,
    /// Memory limit of the snapshotted instance, MiB.
    pub memory_mb: u32,
    /// [`env_vars_hash`] of the version's environment.
    pub env_vars_hash: String,
    /// Sandbox driver that wrote it.
    pub driver: String,
    /// Directory of the on-disk tier, if the snapshot has one.
    pub path: Option<String>,
    /// The files of the on-disk tier.
    pub files: Vec<SnapshotFile>,
    /// Bytes on disk.
    pub size_bytes: u64,
    /// Where it is in its life.
    pub status: SnapshotStatus,
    /// Why it failed or was found corrupt (cleared when it is rebuilt: see
    /// `last_failure`).
    pub error_message: Option<String>,
    /// Times it failed or was found corrupt, over its whole life (kept across rebuilds).
    /// (Absent from what earlier versions wrote, such as a checkpoint's metadata.json.)
    #[serde(default)]
    pub failure_count: u64,
    /// The last of those failures.
    #[serde(default)]
    pub last_failure: Option<SnapshotFailure>,
    /// Instances forked from its resident template, over its whole life (kept across
    /// rebuilds).
    #[serde(default)]
    pub fork_count: u64,
    /// Mean start time of those instances, ms.
    #[serde(default)]
    pub avg_fork_ms: f64,
    /// Instances started from its checkpoint on disk (each restoring the template first),
    /// over its whole life.
    pub restore_count: u64,
    /// Mean start time of those instances, ms.
    pub avg_restore_ms: f64,
    /// When its current build started.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// Last restore.
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_used_at: Option<OffsetDateTime>,
    /// When it may be removed.
    #[serde(with = "time::serde::rfc3339::option")]
    pub expires_at: Option<OffsetDateTime>,
}

impl Snapshot {
    /// What identifies it.
    pub fn key(&self) -> SnapshotKey {
        SnapshotKey {
            function_id: self.function_id.clone(),
            version: self.version,
            code_hash: self.code_hash.clone(),
            env_vars_hash: self.env_vars_hash.clone(),
            driver: self.driver.clone(),
        }
    }
}

/// Lowercase hex sha256 of an environment, independent of insertion order: the digest of
/// `name=value\0` for each variable in name order. (Validated names hold no `=` and values
/// no NUL, so distinct environments never encode alike.)
pub fn env_vars_hash(env: &BTreeMap<String, String>) -> String {
    let mut hasher = Sha256::new();
    // A BTreeMap iterates in key order: that is the canonical order.
    for (name, value) in env {
        hasher.update(name.as_bytes());
        hasher.update(b"=");
        hasher.update(value.as_bytes());
        hasher.update(b"\0");
    }
    let mut out = String::with_capacity(64);
    for byte in hasher.finalize() {
        let _ = write!(out, "{byte:02x}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|&(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn env_vars_hash_ignores_order_and_sees_every_change() {
        let a = env_vars_hash(&env(&[("A", "1"), ("B", "2")]));
        assert_eq!(a, env_vars_hash(&env(&[("B", "2"), ("A", "1")])));
        assert_eq!(a.len(), 64);
        assert!(a
            .chars()
            .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c)));
        assert_ne!(a, env_vars_hash(&env(&[("A", "1"), ("B", "3")])));
        assert_ne!(a, env_vars_hash(&env(&[("A", "1")])));
        // Moving a character across the separator is a different environment.
        assert_ne!(
            env_vars_hash(&env(&[("A", "1B=2")])),
            env_vars_hash(&env(&[("A", "1"), ("B", "2")]))
        );
        // sha256 of nothing.
        assert_eq!(
            env_vars_hash(&BTreeMap::new()),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn statuses_round_trip_and_tell_which_are_live() {
        for s in ["building", "ready", "failed", "expired", "corrupt"] {
            let status: SnapshotStatus = s.parse().unwrap();
            assert_eq!(status.as_str(), s);
            assert_eq!(
                status.is_live(),
                matches!(status, SnapshotStatus::Building | SnapshotStatus::Ready)
            );
        }
        assert!("stale".parse::<SnapshotStatus>().is_err());
    }

    #[test]
    fn snapshots_serialize_with_readable_timestamps() {
        let snapshot = Snapshot {
            id: "snap_x".into(),
            function_id: "fn_x".into(),
            version: 3,
            code_hash: "sha256:00".into(),
            runtime: Runtime::Python311,
            memory_mb: 256,
            env_vars_hash: env_vars_hash(&BTreeMap::new()),
            driver: "process".into(),
            path: Some("/var/lib/nimbus/snapshots/snap_x".into()),
            files: vec![SnapshotFile {
                name: "memory.img".into(),
                size: 5 << 30,
                checksum: format!("blake3:{}", "ab".repeat(32)),
            }],
            size_bytes: 5 << 30,
            status: SnapshotStatus::Ready,
            error_message: None,
            failure_count: 1,
            last_failure: Some(SnapshotFailure {
                status: SnapshotStatus::Corrupt,
                message: Some("its files do not verify".into()),
                at: time::macros::datetime!(2026-01-02 03:00 UTC),
            }),
            fork_count: 40,
            avg_fork_ms: 4.5,
            restore_count: 2,
            avg_restore_ms: 85.0,
            created_at: time::macros::datetime!(2026-01-02 03:04:05.678 UTC),
            last_used_at: None,
            expires_at: Some(time::macros::datetime!(2026-02-01 00:00 UTC)),
        };
        let json = serde_json::to_value(&snapshot).unwrap();
        assert_eq!(json["status"], "ready");
        assert_eq!(json["runtime"], "python3.11");
        assert_eq!(json["created_at"], "2026-01-02T03:04:05.678Z");
        assert_eq!(json["last_used_at"], serde_json::Value::Null);
        assert_eq!(json["last_failure"]["status"], "corrupt");
        assert_eq!(json["last_failure"]["at"], "2026-01-02T03:00:00Z");
        let back: Snapshot = serde_json::from_value(json).unwrap();
        assert_eq!(back, snapshot);
        assert_eq!(back.key().driver, "process");
    }
}
