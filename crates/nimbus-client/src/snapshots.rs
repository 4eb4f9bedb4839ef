//! Snapshots: `/api/v1/functions/{id}/snapshots[/{sid}]` and `/api/v1/snapshots/…`.

use std::collections::BTreeMap;

use nimbus_core::snapshot::SnapshotFile;
use reqwest::Method;
use serde::{Deserialize, Serialize};

use crate::{api_path, Client, Result};

/// The last failure of a snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SnapshotFailure {
    /// `failed` or `corrupt`.
    pub status: String,
    /// Why.
    pub message: Option<String>,
    /// RFC 3339.
    pub at: String,
}

/// A function-level snapshot: its index row and whether this server holds its template.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Snapshot {
    /// `snap_<ulid>`.
    pub id: String,
    /// The function's id.
    pub function_id: String,
    /// The version it is of.
    pub version: u32,
    /// The version's code hash.
    pub code_hash: String,
    /// Runtime.
    pub runtime: String,
    /// Memory limit, MiB.
    pub memory_mb: u32,
    /// Hash of the environment variables.
    pub env_vars_hash: String,
    /// The driver that built it.
    pub driver: String,
    /// Its directory on disk, if it has one.
    pub path: Option<String>,
    /// Its files on disk.
    pub files: Vec<SnapshotFile>,
    /// Their size, bytes.
    pub size_bytes: u64,
    /// `building`, `ready`, `failed`, `corrupt`, …
    pub status: String,
    /// Why it failed.
    pub error_message: Option<String>,
    /// Failures over its life.
    pub failure_count: u64,
    /// The last of them.
    pub last_failure: Option<SnapshotFailure>,
    /// Whether its template is resident on this server.
    pub resident: bool,
    /// Instances forked from its template.
    pub fork_count: u64,
    /// Their mean start time, ms.
    pub avg_fork_ms: f64,
    /// Instances restored from its checkpoint on disk.
    pub restore_count: u64,
    /// Their mean start time, ms.
    pub avg_restore_ms: f64,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339.
    pub last_used_at: Option<String>,
    /// RFC 3339.
    pub expires_at: Option<String>,
}

/// `GET /functions/{id}/snapshots`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SnapshotList {
    /// Newest build first.
    pub snapshots: Vec<Snapshot>,
}

/// `POST /snapshots/cleanup`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Cleanup {
    /// Nothing was removed.
    pub dry_run: bool,
    /// The snapshots removed (or, dry, that would be).
    pub removed: Vec<Snapshot>,
    /// Bytes on disk they held.
    pub freed_bytes: u64,
}

/// `GET /snapshots/stats`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SnapshotStats {
    /// Indexed snapshots.
    pub total: u64,
    /// By status, zeros included.
    pub by_status: BTreeMap<String, u64>,
    /// Templates resident on this server.
    pub resident_templates: u64,
    /// Memory they hold, bytes.
    pub resident_bytes: u64,
    /// The budget for it, bytes.
    pub memory_budget_bytes: u64,
    /// Snapshot files on disk, bytes.
    pub storage_bytes: u64,
    /// Instances forked from resident templates.
    pub forks: u64,
    /// Their mean start time, ms.
    pub avg_fork_ms: f64,
    /// Instances restored from disk.
    pub restores: u64,
    /// Their mean start time, ms.
    pub avg_restore_ms: f64,
    /// Failures of snapshots over their lives.
    pub failures: u64,
}

/// Body of `POST /functions/{id}/snapshots`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildSnapshot {
    /// The version (default: the newest).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<u32>,
    /// Answer once the build has ended.
    pub wait: bool,
}

/// What a build request came to (the answer's status).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuildOutcome {
    /// 202: a build started and was not waited for.
    UnderWay,
    /// 201: a build started and ended with the snapshot ready.
    Built,
    /// 200: nothing was started (the snapshot is there already), or the build waited for
    /// ended without a ready snapshot; the snapshot's status says which.
    Answered,
}

/// `POST /functions/{id}/snapshots`: the outcome and the snapshot.
#[derive(Debug, Clone, PartialEq)]
pub struct Build {
    /// What the request came to.
    pub outcome: BuildOutcome,
    /// The snapshot as it is now.
    pub snapshot: Snapshot,
}

impl Client {
    /// `GET /functions/{function}/snapshots`.
    pub async fn list_snapshots(&self, function: &str) -> Result<SnapshotList> {
        let path = api_path(&["functions", function, "snapshots"])?;
        self.send(Method::GET, path, &[], None).await
    }

    /// `POST /functions/{function}/snapshots`: builds (or joins the build of) a version's
    /// snapshot.
    pub async fn build_snapshot(&self, function: &str, req: &BuildSnapshot) -> Result<Build> {
        let path = api_path(&["functions", function, "snapshots"])?;
        let body = serde_json::to_vec(req)
            .map_err(|e| crate::Error::Request(format!("encoding the request: {e}")))?;
        let (status, body) = self.exchange(Method::POST, &path, &[], Some(body)).await?;
        if !(200..300).contains(&status) {
            return Err(crate::Error::Api(crate::ApiError::from_answer(
                status, &body,
            )));
        }
        let outcome = match status {
            202 => BuildOutcome::UnderWay,
            201 => BuildOutcome::Built,
            _ => BuildOutcome::Answered,
        };
        let snapshot = self.decode(status, body)?;
        Ok(Build { outcome, snapshot })
    }

    /// `DELETE /functions/{function}/snapshots/{id}`.
    pub async fn delete_snapshot(&self, function: &str, id: &str) -> Result<()> {
        let path = api_path(&["functions", function, "snapshots", id])?;
        self.send::<serde::de::IgnoredAny>(Method::DELETE, path, &[], None)
            .await
            .map(drop)
    }

    /// `GET /snapshots/stats`.
    pub async fn snapshot_stats(&self) -> Result<SnapshotStats> {
        self.send(Method::GET, api_path(&["snapshots", "stats"])?, &[], None)
            .await
    }

    /// `POST /snapshots/cleanup?dry_run`.
    pub async fn cleanup_snapshots(&self, dry_run: bool) -> Result<Cleanup> {
        let path = api_path(&["snapshots", "cleanup"])?;
        let query = [("dry_run", dry_run.to_string())];
        self.send(Method::POST, path, &query, None).await
    }
}
