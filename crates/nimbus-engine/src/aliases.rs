//! Aliases: named, weighted routing tables over a function's versions, with a history of
//! every change and rollback to any earlier revision.
//!
//! Every change is validated here (name, 1–10 distinct entries, weights summing to 100),
//! normalized (entries by ascending version, see [`RoutingConfig`]), checked against the
//! versions that exist and written as the alias's next revision in one store transaction;
//! then the routing cache is invalidated so this server routes by it at once (other servers
//! within the cache TTL).

use nimbus_core::alias::validate_alias_name;
use nimbus_core::echo;
use nimbus_core::function::validate_description;
use nimbus_core::{
    AliasRevision, Function, FunctionAlias, RoutingConfig, ValidationError, LATEST_ALIAS,
};
use nimbus_store::{AliasChange, Page, RollbackTarget, StoreError};
use serde::Deserialize;

use crate::error::{EngineError, EngineResult};
use crate::{metrics, Engine};

/// Body of `POST /functions/{id}/aliases`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewAlias {
    /// `[a-z][a-z0-9-_]{0,63}`.
    pub name: String,
    /// Free text.
    #[serde(default)]
    pub description: String,
    /// Where its traffic goes.
    pub routing_config: RoutingConfig,
}

/// Body of `PUT /functions/{id}/aliases/{name}`: a routing table and/or a description.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AliasPatch {
    /// New routing table.
    pub routing_config: Option<RoutingConfig>,
    /// New description.
    pub description: Option<String>,
    /// Apply only if the alias is still at this revision (409 `revision_mismatch`).
    pub expected_revision: Option<u32>,
}

/// Body of `POST /functions/{id}/aliases/{name}/rollback`: at most one target.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RollbackRequest {
    /// Revision whose routing to restore.
    pub to_revision: Option<u32>,
    /// Version to send all traffic to.
    pub to_version: Option<u32>,
    /// Apply only if the alias is still at this revision (409 `revision_mismatch`).
    pub expected_revision: Option<u32>,
}

/// What a rollback did.
#[derive(Debug)]
pub struct RolledBack {
    /// The alias as it is now.
    pub alias: FunctionAlias,
    /// The revision whose routing was restored (none for a rollback to a version).
    pub restored_revision: Option<u32>,
}

impl Engine {
    /// Creates an alias. `alias_exists` (409) if the function has one of that name,
    /// `too_many_aliases` (409) if it has `MAX_ALIASES_PER_FUNCTION` already.
    pub async fn create_alias(
        &self,
        reference: &str,
        req: NewAlias,
        actor: &str,
    ) -> EngineResult<FunctionAlias> {
        validate_alias_name(&req.name)?;
        validate_description(&req.description)?;
        let routing = checked(req.routing_config)?;
        let function = self.get_function(reference).await?;
        let at = nimbus_core::now();
        let alias = FunctionAlias {
            function_id: function.id.clone(),
            name: req.name,
            description: req.description,
            routing,
            revision: 1,
            created_at: at,
            updated_at: at,
        };
        let created = match self.store.create_alias(&alias, actor).await {
            Err(StoreError::Conflict(_)) => {
                return Err(EngineError::Conflict {
                    code: nimbus_core::ErrorCode::AliasExists,
                    message: format!(
                        "function {} already has an alias {}",
                        echo(&function.name),
                        echo(&alias.name)
                    ),
                })
            }
            other => other?,
        };
        self.alias_changed(&function, &created, "create");
        Ok(created)
    }

    /// One page of a function's aliases, by name.
    pub async fn list_aliases(
        &self,
        reference: &str,
        limit: u32,
        offset: u32,
    ) -> EngineResult<Page<FunctionAlias>> {
        let function = self.get_function(reference).await?;
        Ok(self
            .store
            .list_aliases_page(&function.id, limit, offset)
            .await?)
    }

    /// One alias.
    pub async fn get_alias(&self, reference: &str, name: &str) -> EngineResult<FunctionAlias> {
        let function = self.get_function(reference).await?;
        self.store
            .get_alias(&function.id, name)
            .await?
            .ok_or_else(|| EngineError::alias_not_found(&function.name, name))
    }

    /// Changes an alias's routing and/or description. A change that changes nothing
    /// writes no revision.
    pub async fn update_alias(
        &self,
        reference: &str,
        name: &str,
        patch: AliasPatch,
        actor: &str,
    ) -> EngineResult<FunctionAlias> {
        if patch.routing_config.is_none() && patch.description.is_none() {
            return Err(EngineError::BadRequest(
                "give routing_config and/or description to change".into(),
            ));
        }
        if let Some(description) = &patch.description {
            validate_description(description)?;
        }
        let change = AliasChange {
            routing: patch.routing_config.map(checked).transpose()?,
            description: patch.description,
            expected_revision: patch.expected_revision,
        };
        let function = self.get_function(reference).await?;
        let written = self
            .store
            .update_alias(&function.id, name, &change, actor)
            .await
            .map_err(|e| in_alias(e, &function, name))?;
        if written.changed {
            self.alias_changed(&function, &written.alias, "update");
        }
        Ok(written.alias)
    }

    /// Restores an earlier routing: a revision's (`to_revision`), all traffic to one version
    /// (`to_version`), or by default the routing before the last change of routing.
    pub async fn rollback_alias(
        &self,
        reference: &str,
        name: &str,
        req: RollbackRequest,
        actor: &str,
    ) -> EngineResult<RolledBack> {
        let target = match (req.to_revision, req.to_version) {
            (Some(_), Some(_)) => {
                return Err(EngineError::BadRequest(
                    "give to_revision or to_version, not both".into(),
                ))
            }
            (Some(revision), None) => RollbackTarget::Revision(revision),
            (None, Some(version)) => RollbackTarget::Version(version),
            (None, None) => RollbackTarget::Previous,
        };
        let function = self.get_function(reference).await?;
        let written = match self
            .store
            .rollback_alias(&function.id, name, target, req.expected_revision, actor)
            .await
        {
            Err(StoreError::MissingVersions(missing)) => {
                let what = match target {
                    RollbackTarget::Version(_) => {
                        let missing = StoreError::MissingVersions(missing).to_string();
                        return Err(ValidationError::new("to_version", missing).into());
                    }
                    RollbackTarget::Previous => "the previous routing".to_owned(),
                    RollbackTarget::Revision(r) => format!("revision {r}"),
                };
                return Err(EngineError::Conflict {
                    code: nimbus_core::ErrorCode::VersionDeleted,
                    message: format!(
                        "cannot roll back alias {} to {what}: {}",
                        echo(name),
                        StoreError::MissingVersions(missing)
                    ),
                });
            }
            other => other.map_err(|e| in_alias(e, &function, name))?,
        };
        self.alias_changed(&function, &written.alias, "rollback");
        Ok(RolledBack {
            alias: written.alias,
            restored_revision: written.restored_revision,
        })
    }

    /// Deletes an alias and its history. `latest` cannot be deleted (409 `alias_protected`).
    /// Returns the function's id.
    pub async fn delete_alias(&self, reference: &str, name: &str) -> EngineResult<String> {
        let function = self.get_function(reference).await?;
        if name == LATEST_ALIAS {
            return Err(EngineError::Conflict {
                code: nimbus_core::ErrorCode::AliasProtected,
                message: format!(
                    "alias {LATEST_ALIAS:?} cannot be deleted: every publish moves it, and \
                     invocations without an alias or version use it"
                ),
            });
        }
        if !self.store.delete_alias(&function.id, name).await? {
            return Err(EngineError::alias_not_found(&function.name, name));
        }
        self.catalog.invalidate(&function.id);
        metrics::alias_updated(&function.name, name, "delete");
        metrics::retire_alias(&function.name, &function.id, name);
        tracing::info!(function = %function.name, alias = name, "alias deleted");
        Ok(function.id)
    }

    /// An alias's changes, newest first.
    pub async fn alias_history(
        &self,
        reference: &str,
        name: &str,
        limit: u32,
        offset: u32,
    ) -> EngineResult<Page<AliasRevision>> {
        let alias = self.get_alias(reference, name).await?;
        Ok(self
            .store
            .alias_history(&alias.function_id, name, limit, offset)
            .await?)
    }

    /// After an alias change: route by it from now on, count and log it.
    fn alias_changed(&self, function: &Function, alias: &FunctionAlias, action: &'static str) {
        self.catalog.invalidate(&function.id);
        metrics::alias_live(&function.id, &alias.name);
        metrics::alias_updated(&function.name, &alias.name, action);
        tracing::info!(
            function = %function.name,
            alias = %alias.name,
            revision = alias.revision,
            routing = ?alias.routing.weights,
            action,
            "alias changed"
        );
    }
}

/// A valid routing table in its stored (normalized) form.
fn checked(routing: RoutingConfig) -> EngineResult<RoutingConfig> {
    routing.validate()?;
    Ok(routing.normalized())
}

/// A store error of a change to alias `name`, with a message naming the function.
fn in_alias(e: StoreError, function: &Function, name: &str) -> EngineError {
    match e {
        StoreError::AliasNotFound { .. } => EngineError::alias_not_found(&function.name, name),
        other => other.into(),
    }
}
