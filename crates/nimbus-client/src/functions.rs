//! Functions: `/api/v1/functions[/{id}]`.

use std::collections::BTreeMap;

use nimbus_core::StateConfig;
use reqwest::Method;
use serde::{Deserialize, Serialize};

use crate::{api_path, Client, PageInfo, Result};

/// A file of a function's (or version's) code: path and size, and when asked for, its text
/// (`content`) or, for a file that is not UTF-8, its base64 (`content_base64`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct File {
    /// Path inside the bundle.
    pub path: String,
    /// Size, bytes.
    pub size: u64,
    /// Text of a UTF-8 file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// Base64 of any other file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content_base64: Option<String>,
}

/// A function (its code as file names and sizes).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Function {
    /// `fn_<ulid>`.
    pub id: String,
    /// Unique name.
    pub name: String,
    /// Free text.
    pub description: String,
    /// `python3.11` or `nodejs20`.
    pub runtime: String,
    /// `module.function`.
    pub handler: String,
    /// `sha256:<hex>` of the code bundle.
    pub code_hash: String,
    /// Size of the code, bytes.
    pub code_size: u64,
    /// The bundle's files.
    pub files: Vec<File>,
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
    /// Instance limit.
    pub max_instances: u32,
    /// `active`, …
    pub status: String,
    /// Newest version.
    pub latest_version: u32,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339.
    pub updated_at: String,
}

/// `GET /functions`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct FunctionPage {
    /// This page.
    pub functions: Vec<Function>,
    /// Where it is in the whole list.
    #[serde(flatten)]
    pub page: PageInfo,
}

/// `POST /functions`: the function and its first version.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CreatedFunction {
    /// The function.
    #[serde(flatten)]
    pub function: Function,
    /// Its version, 1.
    pub version: u32,
}

/// `PUT /functions/{id}`: the function and the version published, if any.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct UpdatedFunction {
    /// The function after the update.
    #[serde(flatten)]
    pub function: Function,
    /// The version the update published (none when staged, or when nothing changed).
    pub published_version: Option<u32>,
}

/// `DELETE /functions/{id}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct DeletedFunction {
    /// Always true.
    pub deleted: bool,
    /// Its id.
    pub id: String,
    /// Its name.
    pub name: String,
}

/// State settings to set: the fields left out take the server's defaults (new function)
/// or keep their values (update).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateSettings {
    /// State on or off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// TTL of values written without one, seconds (0: none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default_ttl: Option<u32>,
    /// Largest value, bytes of JSON.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_state_size: Option<u32>,
    /// Most keys per bucket.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_keys: Option<u32>,
    /// Same session key → same instance.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_affinity: Option<bool>,
    /// Seconds a session lasts after its last invocation.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_timeout: Option<u32>,
}

impl StateSettings {
    /// Whether no field is set.
    pub fn is_empty(&self) -> bool {
        *self == StateSettings::default()
    }
}

/// Body of `POST /functions`; fields left out take the server's defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewFunction {
    /// Unique name.
    pub name: String,
    /// Free text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Runtime.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub runtime: Option<String>,
    /// Handler.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub handler: Option<String>,
    /// Source of a single-file function.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// Base64 zip, tar or tar.gz of several files.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code_archive: Option<String>,
    /// Memory limit, MiB.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_mb: Option<u32>,
    /// Timeout, seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout_sec: Option<u32>,
    /// Environment variables.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub env_vars: Option<BTreeMap<String, String>>,
    /// Instance limit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_instances: Option<u32>,
    /// `none` or `outbound`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    /// State settings.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state_config: Option<StateSettings>,
}

/// Body of `PUT /functions/{id}`: the fields to change.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionPatch {
    /// New description.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// New runtime.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub runtime: Option<String>,
    /// New handler.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub handler: Option<String>,
    /// New single-file source.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// New archive.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code_archive: Option<String>,
    /// New memory limit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_mb: Option<u32>,
    /// New timeout.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout_sec: Option<u32>,
    /// Replaces all environment variables.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub env_vars: Option<BTreeMap<String, String>>,
    /// New instance limit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_instances: Option<u32>,
    /// New network.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    /// State settings to change.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state_config: Option<StateSettings>,
    /// Publish the result as a new version (the server's default: true).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub publish: Option<bool>,
}

impl Client {
    /// `POST /functions`.
    pub async fn create_function(&self, new: &NewFunction) -> Result<CreatedFunction> {
        self.send_json(Method::POST, api_path(&["functions"])?, new)
            .await
    }

    /// `GET /functions?limit&offset`.
    pub async fn list_functions(&self, limit: u32, offset: u32) -> Result<FunctionPage> {
        let query = [("limit", limit.to_string()), ("offset", offset.to_string())];
        self.send(Method::GET, api_path(&["functions"])?, &query, None)
            .await
    }

    /// `GET /functions/{function}` (name or id).
    pub async fn get_function(&self, function: &str) -> Result<Function> {
        self.send(Method::GET, api_path(&["functions", function])?, &[], None)
            .await
    }

    /// `PUT /functions/{function}`.
    pub async fn update_function(
        &self,
        function: &str,
        patch: &FunctionPatch,
    ) -> Result<UpdatedFunction> {
        self.send_json(Method::PUT, api_path(&["functions", function])?, patch)
            .await
    }

    /// `DELETE /functions/{function}`, with its versions and aliases.
    pub async fn delete_function(&self, function: &str) -> Result<DeletedFunction> {
        self.send(
            Method::DELETE,
            api_path(&["functions", function])?,
            &[],
            None,
        )
        .await
    }
}
