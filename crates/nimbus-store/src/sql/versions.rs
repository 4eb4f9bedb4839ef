//! Versions: the frozen configuration and code of each published version.

use nimbus_core::{AliasAction, Function, FunctionVersion, RoutingConfig};
use sqlx::{AnyConnection, AnyPool, Row};

use super::aliases::{select_alias, write_revision, NextRevision, LIST_ALIASES};
use super::{bind_config, lock_function, page};
use crate::codec::{self, millis};
use crate::{Page, Published, StoreError, StoreResult};

/// Columns of `function_versions` except `code`, as selected.
macro_rules! version_columns {
    () => {
        "function_id, version, description, runtime, handler, code_hash, env_vars, \
         memory_mb, timeout_sec, network, state_config, created_at, created_by"
    };
}

/// Allocates the next version number under the function's row lock.
const NEXT_VERSION: &str = "UPDATE functions SET latest_version = latest_version + 1 \
     WHERE id = $1 RETURNING latest_version";

/// Function id, version and description, the configuration in [`bind_config`] order
/// (`$4`–`$12`), then creation time and author.
const INSERT_VERSION: &str = "INSERT INTO function_versions (function_id, version, \
     description, runtime, handler, code_hash, env_vars, memory_mb, timeout_sec, network, \
     state_config, code, created_at, created_by) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)";

const SELECT_VERSION: &str = concat!(
    "SELECT ",
    version_columns!(),
    ", code FROM function_versions WHERE function_id = $1 AND version = $2"
);
/// The newest existing version, without code.
const NEWEST_VERSION: &str = concat!(
    "SELECT ",
    version_columns!(),
    " FROM function_versions WHERE function_id = $1 ORDER BY version DESC LIMIT 1"
);
const LIST_VERSIONS: &str = concat!(
    "SELECT ",
    version_columns!(),
    " FROM function_versions WHERE function_id = $1 ORDER BY version DESC LIMIT $2 OFFSET $3"
);

/// Inserts `version` under `function_id`.
pub(super) async fn insert_version(
    conn: &mut AnyConnection,
    function_id: &str,
    version: &FunctionVersion,
) -> StoreResult<()> {
    let query = sqlx::query(INSERT_VERSION)
        .bind(function_id)
        .bind(i64::from(version.version))
        .bind(version.description.as_str());
    bind_config(query, &version.config, &version.code)?
        .bind(millis(version.created_at))
        .bind(version.created_by.as_str())
        .execute(conn)
        .await?;
    Ok(())
}

/// Publishes `function`'s draft (saved and locked by the caller's transaction): see
/// [`MetadataStore::publish_version`].
pub(super) async fn publish_locked(
    tx: &mut AnyConnection,
    function: &Function,
    description: &str,
    created_by: &str,
    move_aliases: &[&str],
) -> StoreResult<Published> {
    // One timestamp per publish: a new version's and its aliases' moves agree.
    let at = nimbus_core::now();
    let newest = sqlx::query(NEWEST_VERSION)
        .bind(function.id.as_str())
        .fetch_optional(&mut *tx)
        .await?
        .map(|row| codec::version(&row, false))
        .transpose()?;
    let mut published = match newest {
        Some(newest) if newest.config == function.config => Published {
            version: FunctionVersion {
                code: function.code.clone(),
                ..newest
            },
            created: false,
            moved: Vec::new(),
        },
        _ => {
            let row = sqlx::query(NEXT_VERSION)
                .bind(function.id.as_str())
                .fetch_one(&mut *tx)
                .await?;
            let number: i64 = row.try_get("latest_version")?;
            let number = u32::try_from(number).map_err(|_| {
                StoreError::Corrupt(format!("latest_version: {number} is out of range"))
            })?;
            let version = FunctionVersion {
                function_id: function.id.clone(),
                version: number,
                description: description.to_string(),
                config: function.config.clone(),
                code: function.code.clone(),
                created_at: at,
                created_by: created_by.to_string(),
            };
            insert_version(&mut *tx, &function.id, &version).await?;
            Published {
                version,
                created: true,
                moved: Vec::new(),
            }
        }
    };
    let target = RoutingConfig::single(published.version.version);
    let mut seen: Vec<&str> = Vec::with_capacity(move_aliases.len());
    for &name in move_aliases {
        if seen.contains(&name) {
            continue;
        }
        seen.push(name);
        let current = select_alias(&mut *tx, &function.id, name)
            .await?
            .ok_or_else(|| StoreError::AliasNotFound {
                alias: name.to_owned(),
            })?;
        if current.routing != target {
            let description = current.description.clone();
            let change = NextRevision {
                routing: target.clone(),
                description,
                action: AliasAction::Publish,
                restored_revision: None,
                changed_by: created_by,
                at,
            };
            write_revision(&mut *tx, current, change).await?;
            published.moved.push(name.to_owned());
        }
    }
    Ok(published)
}

pub(super) async fn get_version(
    pool: &AnyPool,
    function_id: &str,
    version: u32,
) -> StoreResult<Option<FunctionVersion>> {
    let row = sqlx::query(SELECT_VERSION)
        .bind(function_id)
        .bind(i64::from(version))
        .fetch_optional(pool)
        .await?;
    row.map(|row| codec::version(&row, true)).transpose()
}

pub(super) async fn list_versions(
    pool: &AnyPool,
    function_id: &str,
    limit: u32,
    offset: u32,
) -> StoreResult<Page<FunctionVersion>> {
    page(
        pool,
        "SELECT COUNT(*) AS total FROM function_versions WHERE function_id = $1",
        LIST_VERSIONS,
        &[function_id],
        (limit, offset),
        |row| codec::version(row, false),
    )
    .await
}

pub(super) async fn has_version(
    pool: &AnyPool,
    function_id: &str,
    version: u32,
) -> StoreResult<bool> {
    let row = sqlx::query(
        "SELECT COUNT(*) AS found FROM function_versions WHERE function_id = $1 AND version = $2",
    )
    .bind(function_id)
    .bind(i64::from(version))
    .fetch_one(pool)
    .await?;
    Ok(codec::count(&row, "found")? > 0)
}

pub(super) async fn delete_version(
    pool: &AnyPool,
    function_id: &str,
    version: u32,
) -> StoreResult<bool> {
    let mut tx = pool.begin().await?;
    lock_function(&mut tx, function_id).await?;
    let aliases = sqlx::query(LIST_ALIASES)
        .bind(function_id)
        .fetch_all(&mut *tx)
        .await?;
    let mut routing_to = Vec::new();
    for row in &aliases {
        let alias = codec::alias(row)?;
        if alias.routing.versions().any(|v| v == version) {
            routing_to.push(alias.name);
        }
    }
    if !routing_to.is_empty() {
        return Err(StoreError::VersionInUse {
            version,
            aliases: routing_to,
        });
    }
    // Its snapshot rows first (the foreign key cascades too, as in delete_function).
    sqlx::query("DELETE FROM snapshots WHERE function_id = $1 AND version = $2")
        .bind(function_id)
        .bind(i64::from(version))
        .execute(&mut *tx)
        .await?;
    let deleted =
        sqlx::query("DELETE FROM function_versions WHERE function_id = $1 AND version = $2")
            .bind(function_id)
            .bind(i64::from(version))
            .execute(&mut *tx)
            .await?
            .rows_affected();
    tx.commit().await?;
    Ok(deleted > 0)
}
