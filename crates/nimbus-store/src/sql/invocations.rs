//! Invocation records: the batched upsert and the listings.

use std::collections::HashMap;

use nimbus_core::Invocation;
use sqlx::AnyPool;

use super::{ids_in, page_size, push_placeholders, AnyQuery};
use crate::backend::Dialect;
use crate::codec::{self, millis, to_json};
use crate::{InvocationFilter, StoreResult};

/// Columns of `invocations`, in the order [`bind_invocation`] binds them.
macro_rules! invocation_columns {
    () => {
        "request_id, function_id, function_name, version, alias_used, session_key, \
         trigger_kind, status, input, output, error, start_type, instance_id, started_at, \
         completed_at, duration_ms, memory_used_mb, logs"
    };
}

const SELECT_INVOCATION: &str = concat!(
    "SELECT ",
    invocation_columns!(),
    " FROM invocations WHERE request_id = $1"
);
const LIST_INVOCATIONS: &str = concat!(
    "SELECT ",
    invocation_columns!(),
    " FROM invocations WHERE function_id = $1 \
     ORDER BY started_at DESC, request_id DESC LIMIT $2"
);
const LIST_INVOCATIONS_WITH_STATUS: &str = concat!(
    "SELECT ",
    invocation_columns!(),
    " FROM invocations WHERE function_id = $1 AND status = $3 \
     ORDER BY started_at DESC, request_id DESC LIMIT $2"
);

/// `… IN (` completed by [`ids_in`]: which of some function ids are deleted ones.
const DELETED_AMONG: &str = "SELECT function_id FROM deleted_functions WHERE function_id IN (";

/// Binds one record in the order of `invocation_columns!`.
fn bind_invocation<'q>(query: AnyQuery<'q>, record: &'q Invocation) -> StoreResult<AnyQuery<'q>> {
    let error = record
        .error
        .as_ref()
        .map(|e| to_json("invocation error", e))
        .transpose()?;
    Ok(query
        .bind(record.request_id.as_str())
        .bind(record.function_id.as_str())
        .bind(record.function_name.as_str())
        .bind(i64::from(record.version))
        .bind(record.alias_used.as_deref())
        .bind(record.session_key.as_deref())
        .bind(record.trigger.as_str())
        .bind(record.status.as_str())
        .bind(record.input.as_deref())
        .bind(record.output.as_deref())
        .bind(error)
        .bind(record.start_type.map(|s| s.as_str()))
        .bind(record.instance_id.as_deref())
        .bind(millis(record.started_at))
        .bind(record.completed_at.map(millis))
        .bind(record.duration_ms)
        .bind(record.memory_used_mb.map(i64::from))
        .bind(storable_text(&record.logs)))
}

/// `text` with NUL characters replaced by U+FFFD: PostgreSQL refuses them in text columns,
/// and a function's output (its logs) may hold anything.
fn storable_text(text: &str) -> String {
    text.replace('\0', "\u{FFFD}")
}

fn invocation_columns() -> impl Iterator<Item = &'static str> + Clone {
    invocation_columns!().split(',').map(str::trim)
}

/// `INSERT INTO invocations … VALUES (…), (…) … ON CONFLICT (request_id) DO UPDATE` for
/// `rows` records, every column replaced on conflict unless the stored record is finished.
fn upsert_invocations_sql(dialect: Dialect, rows: usize) -> String {
    let columns = invocation_columns().count();
    let mut sql = String::with_capacity(800 + rows * columns * 7);
    sql.push_str(concat!(
        "INSERT INTO invocations (",
        invocation_columns!(),
        ") VALUES "
    ));
    for row in 0..rows {
        sql.push_str(if row == 0 { "(" } else { ", (" });
        for column in 0..columns {
            if column > 0 {
                sql.push_str(", ");
            }
            dialect.push_placeholder(&mut sql, row * columns + column + 1);
        }
        sql.push(')');
    }
    sql.push_str(" ON CONFLICT (request_id) DO UPDATE SET ");
    let updates: Vec<String> = invocation_columns()
        .skip(1)
        .map(|column| format!("{column} = excluded.{column}"))
        .collect();
    sql.push_str(&updates.join(", "));
    sql.push_str(" WHERE invocations.completed_at IS NULL");
    sql
}

/// The last record of each request id, in batch order: one statement may not upsert the
/// same row twice (PostgreSQL refuses), and the last write is the one that must win.
fn last_per_request(records: &[Invocation]) -> Vec<&Invocation> {
    let last: HashMap<&str, usize> = records
        .iter()
        .enumerate()
        .map(|(i, r)| (r.request_id.as_str(), i))
        .collect();
    records
        .iter()
        .enumerate()
        .filter(|(i, r)| last[r.request_id.as_str()] == *i)
        .map(|(_, r)| r)
        .collect()
}

pub(super) async fn record_invocations(
    pool: &AnyPool,
    dialect: Dialect,
    records: &[Invocation],
) -> StoreResult<()> {
    let records = last_per_request(records);
    if records.is_empty() {
        return Ok(());
    }
    let per_statement = dialect.max_bind_params() / invocation_columns().count();
    let mut tx = pool.begin().await?;
    for chunk in records.chunks(per_statement) {
        let sql = upsert_invocations_sql(dialect, chunk.len());
        // Batch sizes vary, so these statements are not worth a slot in the statement cache.
        let mut query = sqlx::query(&sql).persistent(false);
        for &record in chunk {
            query = bind_invocation(query, record)?;
        }
        query.execute(&mut *tx).await?;
    }
    // Records of functions deleted meanwhile (run by a server that had not learned of
    // it yet, or replayed after an outage) are not kept: nothing could reach them. (After
    // the writes, which take SQLite's write lock first.)
    let mut functions: Vec<&str> = records.iter().map(|r| r.function_id.as_str()).collect();
    functions.sort_unstable();
    functions.dedup();
    // Looked up first (by key, in a table that is mostly empty), so that the usual batch,
    // with no deleted function, deletes nothing and scans no records.
    let deleted = ids_in(&mut tx, dialect, DELETED_AMONG, &functions).await?;
    let deleted: Vec<&str> = deleted.iter().map(String::as_str).collect();
    for chunk in deleted.chunks(dialect.max_bind_params()) {
        let mut sql = String::from("DELETE FROM invocations WHERE function_id IN (");
        push_placeholders(dialect, &mut sql, chunk.len());
        sql.push(')');
        let mut query = sqlx::query(&sql).persistent(false);
        for id in chunk {
            query = query.bind(*id);
        }
        query.execute(&mut *tx).await?;
    }
    tx.commit().await?;
    Ok(())
}

pub(super) async fn get_invocation(
    pool: &AnyPool,
    request_id: &str,
) -> StoreResult<Option<Invocation>> {
    let row = sqlx::query(SELECT_INVOCATION)
        .bind(request_id)
        .fetch_optional(pool)
        .await?;
    row.as_ref().map(codec::invocation).transpose()
}

pub(super) async fn list_invocations(
    pool: &AnyPool,
    function_id: &str,
    filter: &InvocationFilter,
) -> StoreResult<Vec<Invocation>> {
    let query = match filter.status {
        None => sqlx::query(LIST_INVOCATIONS)
            .bind(function_id)
            .bind(page_size(filter.limit)),
        Some(status) => sqlx::query(LIST_INVOCATIONS_WITH_STATUS)
            .bind(function_id)
            .bind(page_size(filter.limit))
            .bind(status.as_str()),
    };
    let rows = query.fetch_all(pool).await?;
    rows.iter().map(codec::invocation).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upsert_sql_binds_every_column_of_every_row() {
        let sql = upsert_invocations_sql(Dialect::Postgres, 2);
        let first: Vec<String> = (1..=18).map(|n| format!("${n}")).collect();
        let second: Vec<String> = (19..=36).map(|n| format!("${n}")).collect();
        let values = format!("VALUES ({}), ({}) ON", first.join(", "), second.join(", "));
        assert!(sql.contains(&values), "{sql}");
        assert!(sql.ends_with(
            "ON CONFLICT (request_id) DO UPDATE SET function_id = excluded.function_id, \
             function_name = excluded.function_name, version = excluded.version, \
             alias_used = excluded.alias_used, session_key = excluded.session_key, \
             trigger_kind = excluded.trigger_kind, status = excluded.status, \
             input = excluded.input, output = excluded.output, error = excluded.error, \
             start_type = excluded.start_type, instance_id = excluded.instance_id, \
             started_at = excluded.started_at, completed_at = excluded.completed_at, \
             duration_ms = excluded.duration_ms, memory_used_mb = excluded.memory_used_mb, \
             logs = excluded.logs WHERE invocations.completed_at IS NULL"
        ));

        let sql = upsert_invocations_sql(Dialect::Sqlite, 2);
        let row = format!("({})", vec!["?"; 18].join(", "));
        assert!(sql.contains(&format!("VALUES {row}, {row} ON")), "{sql}");
        assert!(!sql.contains('$'));
    }
}
