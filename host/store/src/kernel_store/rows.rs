//! Conversions between kernel values and SQLite columns, error mapping, and the small query
//! builder every concern's dynamic queries share.

use std::str::FromStr;

use chrono::{DateTime, Utc};
use keel_kernel::json::JsonText;
use keel_kernel::ledger::cost_to_nanos;
use keel_kernel::store::{StoreError, StoreResult};
use rusqlite::types::{FromSql, Value};
use rusqlite::{Connection, ErrorCode, OptionalExtension, Row, ffi, params_from_iter};
use uuid::Uuid;

pub(crate) fn be(e: rusqlite::Error) -> StoreError {
    if is_busy(&e) {
        StoreError::Busy(e.to_string())
    } else {
        StoreError::Backend(e.to_string())
    }
}

fn extended_code(e: &rusqlite::Error) -> Option<(ErrorCode, i32)> {
    match e {
        rusqlite::Error::SqliteFailure(f, _) => Some((f.code, f.extended_code)),
        _ => None,
    }
}

/// SQLITE_BUSY / SQLITE_LOCKED after the busy timeout: another writer holds the database; the
/// same write may be retried.
pub(crate) fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(
        extended_code(e),
        Some((ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked, _))
    )
}

/// A UNIQUE or PRIMARY KEY constraint refused the write.
fn is_unique_violation(e: &rusqlite::Error) -> bool {
    matches!(
        extended_code(e),
        Some((_, ffi::SQLITE_CONSTRAINT_UNIQUE | ffi::SQLITE_CONSTRAINT_PRIMARYKEY))
    )
}

/// What a refused write means: `Conflict` on `entity` `id` when a UNIQUE or PRIMARY KEY
/// constraint refused it, else `other(e)`.
pub(super) fn conflict_or(
    e: rusqlite::Error,
    entity: &'static str,
    id: impl ToString,
    other: impl FnOnce(rusqlite::Error) -> StoreError,
) -> StoreError {
    if is_unique_violation(&e) {
        StoreError::Conflict {
            entity,
            id: id.to_string(),
        }
    } else {
        other(e)
    }
}

/// A write that references job `job_id`: a foreign-key violation means the job does not exist.
pub(super) fn job_ref_error(e: rusqlite::Error, job_id: Uuid) -> StoreError {
    if matches!(extended_code(&e), Some((_, ffi::SQLITE_CONSTRAINT_FOREIGNKEY))) {
        StoreError::NotFound {
            entity: "job",
            id: job_id.to_string(),
        }
    } else {
        be(e)
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

/// A JSON column as stored: its text, checked to be one JSON document but not parsed into a tree.
pub(super) fn json_text(s: String) -> StoreResult<JsonText> {
    JsonText::from_text(s).map_err(corrupt)
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

/// Column `col` of `row`.
pub(super) fn get<T: FromSql>(row: &Row<'_>, col: &str) -> StoreResult<T> {
    row.get(col).map_err(be)
}

/// Optional text or NULL, as a column value.
pub(super) fn text(v: Option<&str>) -> Value {
    v.map_or(Value::Null, |s| Value::Text(s.to_owned()))
}

/// An optional integer as a column value.
pub(super) fn int(v: Option<i64>) -> Value {
    v.map_or(Value::Null, Value::Integer)
}

/// Run `sql` with `args` and decode every row with `decode`.
pub(super) fn fetch<T>(
    conn: &Connection,
    sql: &str,
    args: &[Value],
    mut decode: impl FnMut(&Row<'_>) -> StoreResult<T>,
) -> StoreResult<Vec<T>> {
    let mut stmt = conn.prepare_cached(sql).map_err(be)?;
    let mut rows = stmt.query(params_from_iter(args)).map_err(be)?;
    let mut out = Vec::new();
    while let Some(row) = rows.next().map_err(be)? {
        out.push(decode(row)?);
    }
    Ok(out)
}

/// Run `sql` with `args` and decode its first row, if any.
pub(super) fn fetch_optional<T>(
    conn: &Connection,
    sql: &str,
    args: &[Value],
    decode: impl FnOnce(&Row<'_>) -> StoreResult<T>,
) -> StoreResult<Option<T>> {
    let mut stmt = conn.prepare_cached(sql).map_err(be)?;
    let mut rows = stmt.query(params_from_iter(args)).map_err(be)?;
    match rows.next().map_err(be)? {
        Some(row) => decode(row).map(Some),
        None => Ok(None),
    }
}

/// Run a write statement; the number of rows it changed.
pub(super) fn execute(conn: &Connection, sql: &str, args: &[Value]) -> Result<usize, rusqlite::Error> {
    conn.prepare_cached(sql)?.execute(params_from_iter(args))
}

/// `NotFound` when no `table` row has `id`, else `Conflict` (the row exists but a guard refused
/// the write).
pub(super) fn missing_or_conflict(conn: &Connection, table: &str, entity: &'static str, id: Uuid) -> StoreError {
    let sql = format!("SELECT 1 FROM {table} WHERE id = ?");
    match conn
        .prepare_cached(&sql)
        .and_then(|mut s| s.query_row([id.to_string()], |_| Ok(())).optional())
    {
        Ok(None) => StoreError::NotFound {
            entity,
            id: id.to_string(),
        },
        Ok(Some(())) => StoreError::Conflict {
            entity,
            id: id.to_string(),
        },
        Err(e) => be(e),
    }
}

/// A query assembled from fixed SQL and bound values (never values spliced into the text).
#[derive(Debug, Default)]
pub(super) struct Query {
    pub(super) sql: String,
    pub(super) args: Vec<Value>,
}

impl Query {
    pub(super) fn new(sql: impl Into<String>) -> Self {
        Self {
            sql: sql.into(),
            args: Vec::new(),
        }
    }

    /// Append SQL text.
    pub(super) fn push(&mut self, sql: &str) -> &mut Self {
        self.sql.push_str(sql);
        self
    }

    /// Append a placeholder bound to `value`.
    pub(super) fn bind(&mut self, value: impl Into<Value>) -> &mut Self {
        self.sql.push('?');
        self.args.push(value.into());
        self
    }

    /// ` AND column IN (?, ?, ...)` for a non-empty `values`; nothing when empty (no filter).
    pub(super) fn push_in(&mut self, column: &'static str, values: impl IntoIterator<Item = String>) {
        let mut values = values.into_iter().peekable();
        if values.peek().is_none() {
            return;
        }
        self.push(" AND ").push(column).push(" IN (");
        for (i, value) in values.enumerate() {
            if i > 0 {
                self.push(", ");
            }
            self.bind(value);
        }
        self.push(")");
    }

    /// `AND principal = ? AND session = ?` restrictions of a budget or query.
    pub(super) fn push_subject(&mut self, principal: Option<&str>, session: Option<&str>) {
        if let Some(p) = principal {
            self.push(" AND principal = ").bind(p.to_owned());
        }
        if let Some(s) = session {
            self.push(" AND session = ").bind(s.to_owned());
        }
    }

    pub(super) fn push_limit(&mut self, limit: Option<u32>) {
        if let Some(l) = limit {
            self.push(" LIMIT ").bind(i64::from(l));
        }
    }

    /// Run it and decode every row.
    pub(super) fn fetch<T>(
        &self,
        conn: &Connection,
        decode: impl FnMut(&Row<'_>) -> StoreResult<T>,
    ) -> StoreResult<Vec<T>> {
        fetch(conn, &self.sql, &self.args, decode)
    }

    /// Run it as a write; the number of rows changed.
    pub(super) fn execute(&self, conn: &Connection) -> StoreResult<usize> {
        execute(conn, &self.sql, &self.args).map_err(be)
    }
}
