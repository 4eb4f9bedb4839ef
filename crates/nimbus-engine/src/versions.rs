//! Versions: publishing the draft as an immutable version, reading and deleting versions.
//!
//! Publishing is one store transaction (number allocated, version inserted, `latest` and
//! the optional `publish_alias` moved); afterwards the routing cache is invalidated so the
//! next invocation on this server routes by the new table.

use nimbus_core::alias::validate_alias_name;
use nimbus_core::echo;
use nimbus_core::function::validate_description;
use nimbus_core::{Function, FunctionAlias, FunctionVersion, ValidationError, LATEST_ALIAS};
use nimbus_store::{Page, Published, StoreError};
use serde::Deserialize;

use crate::error::{EngineError, EngineResult};
use crate::{metrics, Engine};

/// Body of `POST /functions/{id}/versions`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishRequest {
    /// What changed in this version.
    #[serde(default)]
    pub description: String,
    /// An existing alias to point at the new version alone, besides `latest` (400
    /// `validation_error` if it does not exist).
    #[serde(default)]
    pub publish_alias: Option<String>,
}

impl Engine {
    /// Publishes the function's current code and configuration as its next version and
    /// moves `latest` (and `publish_alias`) to it. When nothing changed since the newest
    /// version, that version stands (`created: false`) and the aliases move to it.
    pub async fn publish_version(
        &self,
        reference: &str,
        req: PublishRequest,
        actor: &str,
    ) -> EngineResult<Published> {
        validate_description(&req.description)?;
        if let Some(alias) = &req.publish_alias {
            validate_alias_name(alias).map_err(|e| e.in_field("publish_alias"))?;
        }
        let function = self.get_function(reference).await?;
        let mut aliases = vec![LATEST_ALIAS];
        aliases.extend(req.publish_alias.as_deref());
        // The stored draft is published as read inside the store's transaction, so a
        // draft staged meanwhile is neither lost nor skipped.
        let published = match self
            .store
            .publish_draft(&function.id, &req.description, actor, &aliases)
            .await
        {
            Err(StoreError::AliasNotFound { alias }) => {
                return Err(ValidationError::new(
                    "publish_alias",
                    format!(
                        "function {} has no alias {}; create it first",
                        echo(&function.name),
                        echo(&alias)
                    ),
                )
                .into())
            }
            other => other?,
        };
        self.published(&function, &published);
        self.catalog.invalidate(&function.id);
        if published.created {
            self.snapshot_published(&function.id, published.version.version)
                .await;
        }
        Ok(published)
    }

    /// Counts and logs what a publish did.
    pub(crate) fn published(&self, function: &Function, published: &Published) {
        let number = published.version.version;
        if published.created {
            metrics::version_published(&function.name);
            tracing::info!(function = %function.name, version = number, "version published");
        }
        for alias in &published.moved {
            metrics::alias_updated(&function.name, alias, "publish");
            tracing::info!(function = %function.name, %alias, version = number, "alias moved by publish");
        }
    }

    /// A function's versions, newest first, without code.
    pub async fn list_versions(
        &self,
        reference: &str,
        limit: u32,
        offset: u32,
    ) -> EngineResult<Page<FunctionVersion>> {
        let function = self.get_function(reference).await?;
        Ok(self
            .store
            .list_versions(&function.id, limit, offset)
            .await?)
    }

    /// One version, with its code.
    pub async fn get_version(&self, reference: &str, number: u32) -> EngineResult<FunctionVersion> {
        let function = self.get_function(reference).await?;
        self.store
            .get_version(&function.id, number)
            .await?
            .ok_or_else(|| EngineError::version_not_found(&function.name, number))
    }

    /// Deletes a version no alias routes to and stops its idle instances. Its number is
    /// never given out again. Returns the function's id.
    pub async fn delete_version(&self, reference: &str, number: u32) -> EngineResult<String> {
        let function = self.get_function(reference).await?;
        if !self.store.delete_version(&function.id, number).await? {
            return Err(EngineError::version_not_found(&function.name, number));
        }
        self.catalog.forget_version(&function.id, number);
        self.pools.retire_version(&function.id, number);
        self.snapshots.forget(&function.id, Some(number));
        metrics::retire_version(&function.name, &function.id, number);
        tracing::info!(function = %function.name, version = number, "version deleted");
        Ok(function.id)
    }

    /// The aliases of the function with this id, by name (to show which route to a version).
    pub async fn aliases_of(&self, function_id: &str) -> EngineResult<Vec<FunctionAlias>> {
        Ok(self.store.list_aliases(function_id).await?)
    }
}
