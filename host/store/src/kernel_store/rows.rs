//! Conversions between kernel values and SQLite columns, and the query-building helpers every concern shares.

use std::str::FromStr;

use chrono::{DateTime, Utc};
use keel_kernel::ledger::cost_to_nanos;
use keel_kernel::store::{StoreError, StoreResult};
use sqlx::sqlite::{SqliteConnection, SqliteRow};
use sqlx::{QueryBuilder, Row, Sqlite};
use uuid::Uuid;

pub(crate) fn be(e: sqlx::Error) -> StoreError {
    if is_busy(&e) {
        StoreError::Busy(e.to_string())
    } else {
        StoreError::Backend(e.to_string())
    }
}

/// SQLITE_BUSY / SQLITE_LOCKED (any extended code) after the busy timeout, or no free
/// connection in time: another writer holds the database; the same write may be retried.
pub(super) fn is_busy(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(d) => d
            .code()
            .and_then(|c| c.parse::<i64>().ok())
            .is_some_and(|c| matches!(c & 0xff, 5 | 6)),
        sqlx::Error::PoolTimedOut => true,
        _ => false,
    }
}

/// The database's own time in microseconds since the epoch (SQL): lease expiry is judged on it,
/// never on a caller's clock. (`julianday` has millisecond precision on every SQLite version.)
macro_rules! db_now_micros {
    () => {
        "CAST((julianday('now') - 2440587.5) * 86400000000.0 AS INTEGER)"
    };
}
pub(super) use db_now_micros;

pub(super) fn ttl_micros(ttl_ms: u64) -> i64 {
    i64::try_from(ttl_ms.saturating_mul(1000)).unwrap_or(i64::MAX / 2)
}

/// A write that references job `job_id`: a foreign-key violation means the job does not exist.
pub(super) fn job_ref_error(e: sqlx::Error, job_id: Uuid) -> StoreError {
    match &e {
        sqlx::Error::Database(d) if d.is_foreign_key_violation() => StoreError::NotFound {
            entity: "job",
            id: job_id.to_string(),
        },
        _ => be(e),
    }
}

pub(super) fn corrupt(what: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(what.to_string())
}

pub(super) fn micros(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

pub(super) fn from_micros(v: i64) -> StoreResult<DateTime<Utc>> {
    DateTime::from_timestamp_micros(v).ok_or_else(|| corrupt(format!("timestamp {v} out of range")))
}

pub(super) fn opt_from_micros(v: Option<i64>) -> StoreResult<Option<DateTime<Utc>>> {
    v.map(from_micros).transpose()
}

pub(super) fn uuid(s: &str) -> StoreResult<Uuid> {
    Uuid::parse_str(s).map_err(|e| corrupt(format!("uuid {s:?}: {e}")))
}

pub(super) fn opt_uuid(s: Option<String>) -> StoreResult<Option<Uuid>> {
    s.as_deref().map(uuid).transpose()
}

pub(super) fn to_json<T: serde::Serialize>(v: &T) -> StoreResult<String> {
    serde_json::to_string(v).map_err(corrupt)
}

pub(super) fn from_json<T: serde::de::DeserializeOwned>(s: &str) -> StoreResult<T> {
    serde_json::from_str(s).map_err(corrupt)
}

pub(super) fn parse<T: FromStr>(s: &str) -> StoreResult<T>
where
    T::Err: std::fmt::Display,
{
    s.parse().map_err(corrupt)
}

pub(super) fn i64_of(v: u64) -> StoreResult<i64> {
    i64::try_from(v).map_err(|_| StoreError::Backend(format!("{v} does not fit in SQLite INTEGER")))
}

pub(super) fn u64_of(v: i64) -> StoreResult<u64> {
    u64::try_from(v).map_err(|_| corrupt(format!("negative count {v}")))
}

pub(super) fn nanos(cost: rust_decimal::Decimal) -> StoreResult<i64> {
    cost_to_nanos(cost).map_err(|e| StoreError::Backend(e.to_string()))
}

pub(super) fn get<'r, T: sqlx::Decode<'r, Sqlite> + sqlx::Type<Sqlite>>(
    row: &'r SqliteRow,
    col: &str,
) -> StoreResult<T> {
    row.try_get(col).map_err(be)
}

pub(super) type SqliteQuery<'q> = sqlx::query::Query<'q, Sqlite, sqlx::sqlite::SqliteArguments>;

pub(super) async fn missing_or_conflict(
    conn: &mut SqliteConnection,
    table: &str,
    entity: &'static str,
    id: Uuid,
) -> StoreError {
    let sql = format!("SELECT COUNT(*) AS n FROM {table} WHERE id = ?");
    match sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(id.to_string())
        .fetch_one(&mut *conn)
        .await
    {
        Ok(row) if row.try_get::<i64, _>("n").unwrap_or(0) == 0 => StoreError::NotFound {
            entity,
            id: id.to_string(),
        },
        Ok(_) => StoreError::Conflict {
            entity,
            id: id.to_string(),
        },
        Err(e) => be(e),
    }
}

/// `AND principal = ? AND session = ?` restrictions of a budget or query, appended to `qb`.
/// ` AND column IN (?, ?, ...)` for a non-empty `values`; nothing when empty (no filter).
pub(super) fn push_in(qb: &mut QueryBuilder<Sqlite>, column: &'static str, values: impl IntoIterator<Item = String>) {
    let mut values = values.into_iter().peekable();
    if values.peek().is_none() {
        return;
    }
    qb.push(" AND ").push(column).push(" IN (");
    let mut sep = qb.separated(", ");
    for value in values {
        sep.push_bind(value);
    }
    qb.push(")");
}

pub(super) fn push_subject(qb: &mut QueryBuilder<Sqlite>, principal: Option<&str>, session: Option<&str>) {
    if let Some(p) = principal {
        qb.push(" AND principal = ").push_bind(p.to_string());
    }
    if let Some(s) = session {
        qb.push(" AND session = ").push_bind(s.to_string());
    }
}

pub(super) fn push_limit(qb: &mut QueryBuilder<Sqlite>, limit: Option<u32>) {
    if let Some(l) = limit {
        qb.push(" LIMIT ").push_bind(i64::from(l));
    }
}
