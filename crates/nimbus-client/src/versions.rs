//! Versions: `/api/v1/functions/{id}/versions[/{n}]`.

use std::collections::BTreeMap;

use nimbus_core::StateConfig;
use reqwest::Method;
use serde::{Deserialize, Serialize};

use crate::{api_path, Client, File, PageInfo, Result};

/// An immutable version of a function.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Version {
    /// The function's id.
    pub function_id: String,
    /// Its number, from 1.
    pub version: u32,
    /// What changed in it.
    pub description: String,
    /// Runtime.
    pub runtime: String,
    /// Handler.
    pub handler: String,
    /// `sha256:<hex>` of its code.
    pub code_hash: String,
    /// Memory limit, MiB.
    pub memory_mb: u32,
    /// Timeout, seconds.
    pub timeout_sec: u32,
    /// `none` or `outbound`.
    pub network: String,
    /// State settings.
    pub state_config: StateConfig,
    /// Environment variables.
    pub env_vars: BTreeMap<String, String>,
    /// RFC 3339.
    pub created_at: String,
    /// Who published it.
    pub created_by: String,
    /// The aliases whose routing includes it.
    pub aliases: Vec<String>,
    /// Size of its code, bytes (one version's answers, not lists).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code_size: Option<u64>,
    /// Its files (one version's answers, not lists); with contents from `GET`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub files: Option<Vec<File>>,
}

/// `GET /functions/{id}/versions`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct VersionPage {
    /// This page, newest first.
    pub versions: Vec<Version>,
    /// Where it is in the whole list.
    #[serde(flatten)]
    pub page: PageInfo,
}

/// `POST /functions/{id}/versions`: the version, and whether it is new.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PublishedVersion {
    /// The version published (or the newest one, when nothing changed).
    #[serde(flatten)]
    pub version: Version,
    /// False when nothing changed since the newest version, which stands.
    pub created: bool,
}

/// `DELETE /functions/{id}/versions/{n}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct DeletedVersion {
    /// Always true.
    pub deleted: bool,
    /// The function's id.
    pub function_id: String,
    /// The version deleted.
    pub version: u32,
}

/// Body of `POST /functions/{id}/versions`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishRequest {
    /// What changed in this version.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// An existing alias to point at the new version alone, besides `latest`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub publish_alias: Option<String>,
}

impl Client {
    /// `POST /functions/{function}/versions`: publishes the function's current code and
    /// configuration.
    pub async fn publish_version(
        &self,
        function: &str,
        req: &PublishRequest,
    ) -> Result<PublishedVersion> {
        let path = api_path(&["functions", function, "versions"])?;
        self.send_json(Method::POST, path, req).await
    }

    /// `GET /functions/{function}/versions?limit&offset`.
    pub async fn list_versions(
        &self,
        function: &str,
        limit: u32,
        offset: u32,
    ) -> Result<VersionPage> {
        let path = api_path(&["functions", function, "versions"])?;
        let query = [("limit", limit.to_string()), ("offset", offset.to_string())];
        self.send(Method::GET, path, &query, None).await
    }

    /// `GET /functions/{function}/versions/{version}`, with its files' contents.
    pub async fn get_version(&self, function: &str, version: u32) -> Result<Version> {
        let path = api_path(&["functions", function, "versions", &version.to_string()])?;
        self.send(Method::GET, path, &[], None).await
    }

    /// `DELETE /functions/{function}/versions/{version}`.
    pub async fn delete_version(&self, function: &str, version: u32) -> Result<DeletedVersion> {
        let path = api_path(&["functions", function, "versions", &version.to_string()])?;
        self.send(Method::DELETE, path, &[], None).await
    }
}
