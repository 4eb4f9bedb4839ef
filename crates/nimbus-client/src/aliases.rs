//! Aliases: `/api/v1/functions/{id}/aliases[/{name}[/history|/rollback]]`.

use nimbus_core::RoutingConfig;
use reqwest::Method;
use serde::{Deserialize, Serialize};

use crate::{api_path, Client, PageInfo, Result};

/// A named route to one version or a weighted split.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Alias {
    /// Owning function.
    pub function_id: String,
    /// Its name.
    pub name: String,
    /// Free text.
    pub description: String,
    /// Where its traffic goes.
    pub routing_config: RoutingConfig,
    /// 1 at creation, one more per change.
    pub revision: u32,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339.
    pub updated_at: String,
}

impl Default for Alias {
    fn default() -> Self {
        Alias {
            function_id: String::new(),
            name: String::new(),
            description: String::new(),
            routing_config: RoutingConfig {
                weights: Vec::new(),
            },
            revision: 0,
            created_at: String::new(),
            updated_at: String::new(),
        }
    }
}

/// `GET /functions/{id}/aliases`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct AliasPage {
    /// This page.
    pub aliases: Vec<Alias>,
    /// Where it is in the whole list.
    #[serde(flatten)]
    pub page: PageInfo,
}

/// `POST …/rollback`: the alias, and the revision whose routing was restored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Rollback {
    /// The alias as it is now.
    #[serde(flatten)]
    pub alias: Alias,
    /// The revision restored (none for a rollback to a version).
    pub restored_revision: Option<u32>,
}

/// One change of an alias.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct AliasRevision {
    /// 1 for the creation, then one more per change.
    pub revision: u32,
    /// `create`, `update`, `publish` or `rollback`.
    pub action: String,
    /// Routing after the change.
    pub routing_config: Option<RoutingConfig>,
    /// Routing before the change (none for a creation).
    pub previous_routing_config: Option<RoutingConfig>,
    /// Description after the change.
    pub description: String,
    /// For a rollback, the revision restored.
    pub restored_revision: Option<u32>,
    /// Who made the change.
    pub changed_by: String,
    /// RFC 3339.
    pub changed_at: String,
}

/// `GET …/history`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct HistoryPage {
    /// This page, newest change first.
    pub history: Vec<AliasRevision>,
    /// Where it is in the whole history.
    #[serde(flatten)]
    pub page: PageInfo,
}

/// `DELETE /functions/{id}/aliases/{name}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct DeletedAlias {
    /// Always true.
    pub deleted: bool,
    /// The function's id.
    pub function_id: String,
    /// The alias deleted.
    pub name: String,
}

/// Body of `POST /functions/{id}/aliases`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewAlias {
    /// `[a-z][a-z0-9-_]{0,63}`.
    pub name: String,
    /// Free text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Where its traffic goes.
    pub routing_config: RoutingConfig,
}

/// Body of `PUT /functions/{id}/aliases/{name}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AliasPatch {
    /// Apply only if the alias is still at this revision (409 `revision_mismatch`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expected_revision: Option<u32>,
    /// New routing table.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub routing_config: Option<RoutingConfig>,
    /// New description.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// Body of `POST …/rollback`: at most one target; none undoes the last change.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RollbackRequest {
    /// Revision whose routing to restore.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to_revision: Option<u32>,
    /// Version to send all traffic to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to_version: Option<u32>,
    /// Apply only if the alias is still at this revision.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expected_revision: Option<u32>,
}

impl Client {
    /// `POST /functions/{function}/aliases`.
    pub async fn create_alias(&self, function: &str, new: &NewAlias) -> Result<Alias> {
        let path = api_path(&["functions", function, "aliases"])?;
        self.send_json(Method::POST, path, new).await
    }

    /// `GET /functions/{function}/aliases?limit&offset`.
    pub async fn list_aliases(&self, function: &str, limit: u32, offset: u32) -> Result<AliasPage> {
        let path = api_path(&["functions", function, "aliases"])?;
        let query = [("limit", limit.to_string()), ("offset", offset.to_string())];
        self.send(Method::GET, path, &query, None).await
    }

    /// `GET /functions/{function}/aliases/{name}`.
    pub async fn get_alias(&self, function: &str, name: &str) -> Result<Alias> {
        let path = api_path(&["functions", function, "aliases", name])?;
        self.send(Method::GET, path, &[], None).await
    }

    /// `PUT /functions/{function}/aliases/{name}`.
    pub async fn update_alias(
        &self,
        function: &str,
        name: &str,
        patch: &AliasPatch,
    ) -> Result<Alias> {
        let path = api_path(&["functions", function, "aliases", name])?;
        self.send_json(Method::PUT, path, patch).await
    }

    /// `DELETE /functions/{function}/aliases/{name}`.
    pub async fn delete_alias(&self, function: &str, name: &str) -> Result<DeletedAlias> {
        let path = api_path(&["functions", function, "aliases", name])?;
        self.send(Method::DELETE, path, &[], None).await
    }

    /// `GET /functions/{function}/aliases/{name}/history?limit&offset`.
    pub async fn alias_history(
        &self,
        function: &str,
        name: &str,
        limit: u32,
        offset: u32,
    ) -> Result<HistoryPage> {
        let path = api_path(&["functions", function, "aliases", name, "history"])?;
        let query = [("limit", limit.to_string()), ("offset", offset.to_string())];
        self.send(Method::GET, path, &query, None).await
    }

    /// `POST /functions/{function}/aliases/{name}/rollback`.
    pub async fn rollback_alias(
        &self,
        function: &str,
        name: &str,
        req: &RollbackRequest,
    ) -> Result<Rollback> {
        let path = api_path(&["functions", function, "aliases", name, "rollback"])?;
        self.send_json(Method::POST, path, req).await
    }
}
