//! Aliases and their history: every change of an alias writes its next revision here.

use futures::TryStreamExt;
use nimbus_core::{AliasAction, AliasRevision, FunctionAlias, RoutingConfig};
use sqlx::{AnyConnection, AnyPool, Row};
use time::OffsetDateTime;

use super::{lock_function, page};
use crate::codec::{self, millis, to_json};
use crate::{AliasChange, AliasWrite, Page, RollbackTarget, StoreError, StoreResult};

/// Columns of `function_aliases`, as selected.
macro_rules! alias_columns {
    () => {
        "function_id, name, description, routing_config, revision, created_at, updated_at"
    };
}

/// Columns of `alias_history`, in the order [`insert_revision`] binds them.
macro_rules! revision_columns {
    () => {
        "function_id, alias, revision, action, routing_config, previous_routing_config, \
         description, restored_revision, changed_by, changed_at"
    };
}

const INSERT_ALIAS: &str = concat!(
    "INSERT INTO function_aliases (",
    alias_columns!(),
    ") VALUES ($1, $2, $3, $4, $5, $6, $7)"
);

/// Writes an alias's next revision.
const UPDATE_ALIAS: &str = "UPDATE function_aliases SET description = $3, \
     routing_config = $4, revision = $5, updated_at = $6 WHERE function_id = $1 AND name = $2";

const INSERT_REVISION: &str = concat!(
    "INSERT INTO alias_history (",
    revision_columns!(),
    ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
);

const SELECT_ALIAS: &str = concat!(
    "SELECT ",
    alias_columns!(),
    " FROM function_aliases WHERE function_id = $1 AND name = $2"
);
pub(super) const LIST_ALIASES: &str = concat!(
    "SELECT ",
    alias_columns!(),
    " FROM function_aliases WHERE function_id = $1 ORDER BY name"
);
const LIST_ALIASES_PAGE: &str = concat!(
    "SELECT ",
    alias_columns!(),
    " FROM function_aliases WHERE function_id = $1 ORDER BY name LIMIT $2 OFFSET $3"
);
const COUNT_ALIASES: &str = "SELECT COUNT(*) AS total FROM function_aliases WHERE function_id = $1";

const SELECT_REVISION: &str = concat!(
    "SELECT ",
    revision_columns!(),
    " FROM alias_history WHERE function_id = $1 AND alias = $2 AND revision = $3"
);
/// Revisions before `$3`, newest first.
const EARLIER_REVISIONS: &str = concat!(
    "SELECT ",
    revision_columns!(),
    " FROM alias_history WHERE function_id = $1 AND alias = $2 AND revision < $3 \
     ORDER BY revision DESC"
);
const LIST_REVISIONS: &str = concat!(
    "SELECT ",
    revision_columns!(),
    " FROM alias_history WHERE function_id = $1 AND alias = $2 \
     ORDER BY revision DESC LIMIT $3 OFFSET $4"
);

pub(super) async fn select_alias(
    conn: &mut AnyConnection,
    function_id: &str,
    name: &str,
) -> StoreResult<Option<FunctionAlias>> {
    let row = sqlx::query(SELECT_ALIAS)
        .bind(function_id)
        .bind(name)
        .fetch_optional(conn)
        .await?;
    row.as_ref().map(codec::alias).transpose()
}

/// Locks the function's row and reads the alias: `AliasNotFound` if it does not exist,
/// `RevisionMismatch` if it is not at `expected_revision` (when given).
async fn lock_alias(
    conn: &mut AnyConnection,
    function_id: &str,
    name: &str,
    expected_revision: Option<u32>,
) -> StoreResult<FunctionAlias> {
    lock_function(conn, function_id).await?;
    let current = select_alias(conn, function_id, name)
        .await?
        .ok_or_else(|| StoreError::AliasNotFound {
            alias: name.to_owned(),
        })?;
    match expected_revision {
        Some(expected) if expected != current.revision => Err(StoreError::RevisionMismatch {
            alias: name.to_owned(),
            expected,
            current: current.revision,
        }),
        _ => Ok(current),
    }
}

async fn select_revision(
    conn: &mut AnyConnection,
    function_id: &str,
    name: &str,
    revision: u32,
) -> StoreResult<Option<AliasRevision>> {
    let row = sqlx::query(SELECT_REVISION)
        .bind(function_id)
        .bind(name)
        .bind(i64::from(revision))
        .fetch_optional(conn)
        .await?;
    row.as_ref().map(codec::alias_revision).transpose()
}

/// The newest revision before `current`'s whose routing differs from the current one
/// (description-only changes are passed over), if any.
async fn previous_routing(
    conn: &mut AnyConnection,
    current: &FunctionAlias,
) -> StoreResult<Option<AliasRevision>> {
    let mut rows = sqlx::query(EARLIER_REVISIONS)
        .bind(current.function_id.as_str())
        .bind(current.name.as_str())
        .bind(i64::from(current.revision))
        .fetch(conn);
    while let Some(row) = rows.try_next().await? {
        let revision = codec::alias_revision(&row)?;
        if revision.routing != current.routing {
            return Ok(Some(revision));
        }
    }
    Ok(None)
}

/// Appends `revision` to its alias's history.
async fn insert_revision(conn: &mut AnyConnection, revision: &AliasRevision) -> StoreResult<()> {
    let previous = revision
        .previous_routing
        .as_ref()
        .map(|r| to_json("routing_config", r))
        .transpose()?;
    sqlx::query(INSERT_REVISION)
        .bind(revision.function_id.as_str())
        .bind(revision.alias.as_str())
        .bind(i64::from(revision.revision))
        .bind(revision.action.as_str())
        .bind(to_json("routing_config", &revision.routing)?)
        .bind(previous)
        .bind(revision.description.as_str())
        .bind(revision.restored_revision.map(i64::from))
        .bind(revision.changed_by.as_str())
        .bind(millis(revision.changed_at))
        .execute(conn)
        .await?;
    Ok(())
}

/// Inserts a new alias at revision 1 with its `create` history entry; returns it as stored.
pub(super) async fn insert_alias(
    conn: &mut AnyConnection,
    alias: &FunctionAlias,
    created_by: &str,
    at: OffsetDateTime,
) -> StoreResult<FunctionAlias> {
    let stored = FunctionAlias {
        revision: 1,
        created_at: at,
        updated_at: at,
        ..alias.clone()
    };
    sqlx::query(INSERT_ALIAS)
        .bind(stored.function_id.as_str())
        .bind(stored.name.as_str())
        .bind(stored.description.as_str())
        .bind(to_json("routing_config", &stored.routing)?)
        .bind(i64::from(stored.revision))
        .bind(millis(at))
        .bind(millis(at))
        .execute(&mut *conn)
        .await?;
    let created = revision_entry(&stored, AliasAction::Create, None, None, created_by);
    insert_revision(conn, &created).await?;
    Ok(stored)
}

/// What the next revision of an alias sets, and why.
pub(super) struct NextRevision<'a> {
    pub(super) routing: RoutingConfig,
    pub(super) description: String,
    pub(super) action: AliasAction,
    pub(super) restored_revision: Option<u32>,
    pub(super) changed_by: &'a str,
    pub(super) at: OffsetDateTime,
}

/// Moves `current` to its next revision, recording the change in its history; returns the
/// alias as it is now.
pub(super) async fn write_revision(
    conn: &mut AnyConnection,
    current: FunctionAlias,
    change: NextRevision<'_>,
) -> StoreResult<FunctionAlias> {
    let NextRevision {
        routing,
        description,
        action,
        restored_revision,
        changed_by,
        at,
    } = change;
    let next = FunctionAlias {
        revision: current.revision + 1,
        routing,
        description,
        updated_at: at,
        ..current
    };
    sqlx::query(UPDATE_ALIAS)
        .bind(next.function_id.as_str())
        .bind(next.name.as_str())
        .bind(next.description.as_str())
        .bind(to_json("routing_config", &next.routing)?)
        .bind(i64::from(next.revision))
        .bind(millis(at))
        .execute(&mut *conn)
        .await?;
    let entry = revision_entry(
        &next,
        action,
        Some(current.routing),
        restored_revision,
        changed_by,
    );
    insert_revision(conn, &entry).await?;
    Ok(next)
}

/// The history entry of `alias` as it is now written (its revision, routing and
/// description, changed at its `updated_at`).
fn revision_entry(
    alias: &FunctionAlias,
    action: AliasAction,
    previous_routing: Option<RoutingConfig>,
    restored_revision: Option<u32>,
    changed_by: &str,
) -> AliasRevision {
    AliasRevision {
        function_id: alias.function_id.clone(),
        alias: alias.name.clone(),
        revision: alias.revision,
        action,
        routing: alias.routing.clone(),
        previous_routing,
        description: alias.description.clone(),
        restored_revision,
        changed_by: changed_by.to_owned(),
        changed_at: alias.updated_at,
    }
}

/// `MissingVersions` unless every version `routing` names exists.
async fn check_versions_exist(
    conn: &mut AnyConnection,
    function_id: &str,
    routing: &RoutingConfig,
) -> StoreResult<()> {
    let rows = sqlx::query("SELECT version FROM function_versions WHERE function_id = $1")
        .bind(function_id)
        .fetch_all(conn)
        .await?;
    let existing: Vec<i64> = rows
        .iter()
        .map(|row| row.try_get("version"))
        .collect::<Result<_, _>>()?;
    let missing: Vec<u32> = routing
        .versions()
        .filter(|v| !existing.contains(&i64::from(*v)))
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(StoreError::MissingVersions(missing))
    }
}

pub(super) async fn create_alias(
    pool: &AnyPool,
    alias: &FunctionAlias,
    created_by: &str,
) -> StoreResult<FunctionAlias> {
    let mut tx = pool.begin().await?;
    lock_function(&mut tx, &alias.function_id).await?;
    if select_alias(&mut tx, &alias.function_id, &alias.name)
        .await?
        .is_some()
    {
        return Err(StoreError::Conflict(format!(
            "alias {:?} already exists",
            alias.name
        )));
    }
    let count = sqlx::query(COUNT_ALIASES)
        .bind(&alias.function_id)
        .fetch_one(&mut *tx)
        .await?;
    let limit = nimbus_core::limits::MAX_ALIASES_PER_FUNCTION;
    if codec::count(&count, "total")? >= limit as u64 {
        return Err(StoreError::TooManyAliases { limit });
    }
    check_versions_exist(&mut tx, &alias.function_id, &alias.routing).await?;
    let stored = insert_alias(&mut tx, alias, created_by, nimbus_core::now()).await?;
    tx.commit().await?;
    Ok(stored)
}

pub(super) async fn update_alias(
    pool: &AnyPool,
    function_id: &str,
    name: &str,
    change: &AliasChange,
    changed_by: &str,
) -> StoreResult<AliasWrite> {
    let mut tx = pool.begin().await?;
    let current = lock_alias(&mut tx, function_id, name, change.expected_revision).await?;
    let routing = change
        .routing
        .clone()
        .unwrap_or_else(|| current.routing.clone());
    let description = change
        .description
        .clone()
        .unwrap_or_else(|| current.description.clone());
    if routing == current.routing && description == current.description {
        // Nothing changes: no revision, so the history lists only real changes.
        return Ok(AliasWrite {
            alias: current,
            changed: false,
            restored_revision: None,
        });
    }
    check_versions_exist(&mut tx, function_id, &routing).await?;
    let change = NextRevision {
        routing,
        description,
        action: AliasAction::Update,
        restored_revision: None,
        changed_by,
        at: nimbus_core::now(),
    };
    let alias = write_revision(&mut tx, current, change).await?;
    tx.commit().await?;
    Ok(AliasWrite {
        alias,
        changed: true,
        restored_revision: None,
    })
}

pub(super) async fn rollback_alias(
    pool: &AnyPool,
    function_id: &str,
    name: &str,
    target: RollbackTarget,
    expected_revision: Option<u32>,
    changed_by: &str,
) -> StoreResult<AliasWrite> {
    let mut tx = pool.begin().await?;
    let current = lock_alias(&mut tx, function_id, name, expected_revision).await?;
    let (routing, restored_revision) = match target {
        RollbackTarget::Version(version) => (RoutingConfig::single(version), None),
        RollbackTarget::Revision(revision) => {
            let restored = select_revision(&mut tx, function_id, name, revision)
                .await?
                .ok_or_else(|| StoreError::RevisionNotFound {
                    alias: name.to_owned(),
                    revision,
                })?;
            (restored.routing, Some(revision))
        }
        RollbackTarget::Previous => {
            let previous = previous_routing(&mut tx, &current).await?.ok_or_else(|| {
                StoreError::NothingToRollBack(format!(
                    "alias {name:?} has routed the same way since it was created; there is no earlier routing to restore"
                ))
            })?;
            (previous.routing, Some(previous.revision))
        }
    };
    if routing == current.routing {
        let already = match target {
            RollbackTarget::Version(v) => format!("sends all traffic to version {v}"),
            RollbackTarget::Revision(r) => format!("routes as it did at revision {r}"),
            // Unreachable: the previous routing is by definition a different one.
            RollbackTarget::Previous => "routes as it did before".to_owned(),
        };
        return Err(StoreError::NothingToRollBack(format!(
            "alias {name:?} already {already}"
        )));
    }
    check_versions_exist(&mut tx, function_id, &routing).await?;
    let description = current.description.clone();
    let change = NextRevision {
        routing,
        description,
        action: AliasAction::Rollback,
        restored_revision,
        changed_by,
        at: nimbus_core::now(),
    };
    let alias = write_revision(&mut tx, current, change).await?;
    tx.commit().await?;
    Ok(AliasWrite {
        alias,
        changed: true,
        restored_revision,
    })
}

pub(super) async fn delete_alias(
    pool: &AnyPool,
    function_id: &str,
    name: &str,
) -> StoreResult<bool> {
    let mut tx = pool.begin().await?;
    lock_function(&mut tx, function_id).await?;
    sqlx::query("DELETE FROM alias_history WHERE function_id = $1 AND alias = $2")
        .bind(function_id)
        .bind(name)
        .execute(&mut *tx)
        .await?;
    let deleted = sqlx::query("DELETE FROM function_aliases WHERE function_id = $1 AND name = $2")
        .bind(function_id)
        .bind(name)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    tx.commit().await?;
    Ok(deleted > 0)
}

pub(super) async fn alias_history(
    pool: &AnyPool,
    function_id: &str,
    name: &str,
    limit: u32,
    offset: u32,
) -> StoreResult<Page<AliasRevision>> {
    page(
        pool,
        "SELECT COUNT(*) AS total FROM alias_history WHERE function_id = $1 AND alias = $2",
        LIST_REVISIONS,
        &[function_id, name],
        (limit, offset),
        codec::alias_revision,
    )
    .await
}

pub(super) async fn get_alias(
    pool: &AnyPool,
    function_id: &str,
    name: &str,
) -> StoreResult<Option<FunctionAlias>> {
    let mut conn = pool.acquire().await?;
    select_alias(&mut conn, function_id, name).await
}

pub(super) async fn list_aliases(
    pool: &AnyPool,
    function_id: &str,
) -> StoreResult<Vec<FunctionAlias>> {
    let rows = sqlx::query(LIST_ALIASES)
        .bind(function_id)
        .fetch_all(pool)
        .await?;
    rows.iter().map(codec::alias).collect()
}

pub(super) async fn list_aliases_page(
    pool: &AnyPool,
    function_id: &str,
    limit: u32,
    offset: u32,
) -> StoreResult<Page<FunctionAlias>> {
    page(
        pool,
        COUNT_ALIASES,
        LIST_ALIASES_PAGE,
        &[function_id],
        (limit, offset),
        codec::alias,
    )
    .await
}
