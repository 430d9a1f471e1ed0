//! SQLite implementation of [`keel_kernel::store::KernelStore`].
//!
//! Every write runs in a `BEGIN IMMEDIATE` transaction: it takes SQLite's write lock up front,
//! so read-modify-write sequences (version checks, per-job sequence numbers, budget sums) are
//! serialized across all connections and processes instead of failing late with SQLITE_BUSY.
//! Reads run outside transactions (WAL gives them a consistent snapshot per statement).

use std::str::FromStr;

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use keel_kernel::action::{Action, ActionFilter, ActionState, ActionType, Resolution};
use keel_kernel::event::{EventQuery, EventType, RuntimeEvent};
use keel_kernel::job::{Job, JobError, JobFilter, JobState};
use keel_kernel::ledger::{
    Budget, BudgetOutcome, BudgetStatus, LedgerEvent, LedgerKind, LedgerQuery, NewLedgerEvent, Reservation,
    ReservationState, ReserveOutcome, ReserveRequest, SettleRequest, Usage, UsageQuery, cost_from_nanos, cost_to_nanos,
};
use keel_kernel::store::{
    Batch, BudgetEvaluator, ClaimRequest, JournalEntry, KernelStore, Lease, LeaseGuard, NewJournalEntry, StoreError,
    StoreResult,
};
use sqlx::sqlite::{SqliteConnection, SqliteRow};
use sqlx::{QueryBuilder, Row, Sqlite, SqlitePool};
use uuid::Uuid;

use crate::sqlite::Database;

/// The kernel store on a [`Database`]. Cheap to clone (shares the pool).
#[derive(Debug, Clone)]
pub struct SqliteKernelStore {
    pool: SqlitePool,
}

impl SqliteKernelStore {
    /// A store on `db` (whose migrations have already created the tables).
    pub fn new(db: &Database) -> Self {
        Self {
            pool: db.pool().clone(),
        }
    }
}

impl Database {
    /// The kernel store on this database.
    pub fn kernel_store(&self) -> SqliteKernelStore {
        SqliteKernelStore::new(self)
    }
}

// ---- conversions ----

fn be(e: sqlx::Error) -> StoreError {
    if is_busy(&e) {
        StoreError::Busy(e.to_string())
    } else {
        StoreError::Backend(e.to_string())
    }
}

/// SQLITE_BUSY / SQLITE_LOCKED (any extended code) after the busy timeout, or no free
/// connection in time: another writer holds the database; the same write may be retried.
fn is_busy(e: &sqlx::Error) -> bool {
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

fn ttl_micros(ttl_ms: u64) -> i64 {
    i64::try_from(ttl_ms.saturating_mul(1000)).unwrap_or(i64::MAX / 2)
}

/// A write that references job `job_id`: a foreign-key violation means the job does not exist.
fn job_ref_error(e: sqlx::Error, job_id: Uuid) -> StoreError {
    match &e {
        sqlx::Error::Database(d) if d.is_foreign_key_violation() => StoreError::NotFound {
            entity: "job",
            id: job_id.to_string(),
        },
        _ => be(e),
    }
}

fn corrupt(what: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(what.to_string())
}

fn micros(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

fn from_micros(v: i64) -> StoreResult<DateTime<Utc>> {
    DateTime::from_timestamp_micros(v).ok_or_else(|| corrupt(format!("timestamp {v} out of range")))
}

fn opt_from_micros(v: Option<i64>) -> StoreResult<Option<DateTime<Utc>>> {
    v.map(from_micros).transpose()
}

fn uuid(s: &str) -> StoreResult<Uuid> {
    Uuid::parse_str(s).map_err(|e| corrupt(format!("uuid {s:?}: {e}")))
}

fn opt_uuid(s: Option<String>) -> StoreResult<Option<Uuid>> {
    s.as_deref().map(uuid).transpose()
}

fn to_json<T: serde::Serialize>(v: &T) -> StoreResult<String> {
    serde_json::to_string(v).map_err(corrupt)
}

fn from_json<T: serde::de::DeserializeOwned>(s: &str) -> StoreResult<T> {
    serde_json::from_str(s).map_err(corrupt)
}

fn parse<T: FromStr>(s: &str) -> StoreResult<T>
where
    T::Err: std::fmt::Display,
{
    s.parse().map_err(corrupt)
}

fn i64_of(v: u64) -> StoreResult<i64> {
    i64::try_from(v).map_err(|_| StoreError::Backend(format!("{v} does not fit in SQLite INTEGER")))
}

fn u64_of(v: i64) -> StoreResult<u64> {
    u64::try_from(v).map_err(|_| corrupt(format!("negative count {v}")))
}

fn nanos(cost: rust_decimal::Decimal) -> StoreResult<i64> {
    cost_to_nanos(cost).map_err(|e| StoreError::Backend(e.to_string()))
}

fn get<'r, T: sqlx::Decode<'r, Sqlite> + sqlx::Type<Sqlite>>(row: &'r SqliteRow, col: &str) -> StoreResult<T> {
    row.try_get(col).map_err(be)
}

fn job_from_row(r: &SqliteRow) -> StoreResult<Job> {
    let error = match (
        get::<Option<String>>(r, "error_code")?,
        get::<Option<String>>(r, "error_message")?,
    ) {
        (Some(code), message) => Some(JobError {
            code,
            message: message.unwrap_or_default(),
        }),
        (None, _) => None,
    };
    Ok(Job {
        id: uuid(&get::<String>(r, "id")?)?,
        tenant: get(r, "tenant")?,
        principal: get(r, "principal")?,
        session: get(r, "session")?,
        run_id: opt_uuid(get(r, "run_id")?)?,
        parent_id: opt_uuid(get(r, "parent_id")?)?,
        kind: get(r, "kind")?,
        state: parse::<JobState>(&get::<String>(r, "state")?)?,
        version: u64_of(get(r, "version")?)?,
        idempotency_key: get(r, "idempotency_key")?,
        request_hash: get(r, "request_hash")?,
        input: from_json(&get::<String>(r, "input_json")?)?,
        progress: get(r, "progress")?,
        progress_message: get(r, "progress_message")?,
        turns: u32::try_from(get::<i64>(r, "turns")?).map_err(corrupt)?,
        tool_calls: u32::try_from(get::<i64>(r, "tool_calls")?).map_err(corrupt)?,
        deadline: opt_from_micros(get(r, "deadline")?)?,
        error,
        result_ref: get(r, "result_ref")?,
        tags: from_json(&get::<String>(r, "tags_json")?)?,
        metadata: from_json(&get::<String>(r, "metadata_json")?)?,
        created_at: from_micros(get(r, "created_at")?)?,
        updated_at: from_micros(get(r, "updated_at")?)?,
        started_at: opt_from_micros(get(r, "started_at")?)?,
        finished_at: opt_from_micros(get(r, "finished_at")?)?,
    })
}

fn action_from_row(r: &SqliteRow) -> StoreResult<Action> {
    let resolution: Option<String> = get(r, "resolution_json")?;
    Ok(Action {
        id: uuid(&get::<String>(r, "id")?)?,
        job_id: uuid(&get::<String>(r, "job_id")?)?,
        tenant: get(r, "tenant")?,
        action_type: parse::<ActionType>(&get::<String>(r, "action_type")?)?,
        state: parse::<ActionState>(&get::<String>(r, "state")?)?,
        version: u64_of(get(r, "version")?)?,
        title: get(r, "title")?,
        request: from_json(&get::<String>(r, "request_json")?)?,
        call_digest: get(r, "call_digest")?,
        token_hash: get(r, "token_hash")?,
        resolution: resolution.as_deref().map(from_json::<Resolution>).transpose()?,
        created_at: from_micros(get(r, "created_at")?)?,
        expires_at: from_micros(get(r, "expires_at")?)?,
        resolved_at: opt_from_micros(get(r, "resolved_at")?)?,
    })
}

fn event_from_row(r: &SqliteRow) -> StoreResult<RuntimeEvent> {
    Ok(RuntimeEvent {
        id: get(r, "id")?,
        seq: u64_of(get(r, "seq")?)?,
        job_id: uuid(&get::<String>(r, "job_id")?)?,
        tenant: get(r, "tenant")?,
        event_type: parse::<EventType>(&get::<String>(r, "event_type")?)?,
        data: from_json(&get::<String>(r, "data_json")?)?,
        at: from_micros(get(r, "at")?)?,
    })
}

fn usage_from_row(r: &SqliteRow) -> StoreResult<Usage> {
    Ok(Usage {
        tokens: u64_of(get(r, "tokens")?)?,
        cost: cost_from_nanos(get(r, "cost_nanos")?),
        requests: u64_of(get(r, "requests")?)?,
        tool_calls: u64_of(get(r, "tool_calls")?)?,
    })
}

fn ledger_from_row(r: &SqliteRow) -> StoreResult<LedgerEvent> {
    Ok(LedgerEvent {
        id: get(r, "id")?,
        entry: NewLedgerEvent {
            kind: parse::<LedgerKind>(&get::<String>(r, "kind")?)?,
            tenant: get(r, "tenant")?,
            principal: get(r, "principal")?,
            session: get(r, "session")?,
            job_id: opt_uuid(get(r, "job_id")?)?,
            reservation_id: opt_uuid(get(r, "reservation_id")?)?,
            usage: usage_from_row(r)?,
            duration_ms: get::<Option<i64>>(r, "duration_ms")?.map(u64_of).transpose()?,
            model: get(r, "model")?,
            tool: get(r, "tool")?,
            data: from_json(&get::<String>(r, "data_json")?)?,
            at: from_micros(get(r, "at")?)?,
        },
    })
}

fn reservation_from_row(r: &SqliteRow) -> StoreResult<Reservation> {
    let actual: Option<String> = get(r, "actual_json")?;
    Ok(Reservation {
        id: uuid(&get::<String>(r, "id")?)?,
        tenant: get(r, "tenant")?,
        principal: get(r, "principal")?,
        session: get(r, "session")?,
        job_id: opt_uuid(get(r, "job_id")?)?,
        amount: usage_from_row(r)?,
        state: parse::<ReservationState>(&get::<String>(r, "state")?)?,
        actual: actual.as_deref().map(from_json::<Usage>).transpose()?,
        created_at: from_micros(get(r, "created_at")?)?,
        expires_at: from_micros(get(r, "expires_at")?)?,
        closed_at: opt_from_micros(get(r, "closed_at")?)?,
    })
}

// ---- writes (inside a transaction) ----

const JOB_COLUMNS: &str = "id, tenant, principal, session, run_id, parent_id, kind, state, version, idempotency_key, \
     input_json, progress, progress_message, turns, tool_calls, deadline, error_code, error_message, result_ref, \
     tags_json, metadata_json, created_at, updated_at, started_at, finished_at";

async fn insert_job(conn: &mut SqliteConnection, job: &Job) -> StoreResult<()> {
    let sql = format!(
        "INSERT INTO jobs ({JOB_COLUMNS}, request_hash) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) \
         ON CONFLICT (tenant, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING"
    );
    // The request hash is written once, here: it never changes (updates leave it alone).
    let q = bind_job(sqlx::query(sqlx::AssertSqlSafe(sql)), job)?.bind(job.request_hash.clone());
    let res = q.execute(&mut *conn).await.map_err(|e| match &e {
        sqlx::Error::Database(d) if d.is_unique_violation() => StoreError::Conflict {
            entity: "job",
            id: job.id.to_string(),
        },
        _ => be(e),
    })?;
    if res.rows_affected() == 0 {
        // The unique index on (tenant, idempotency_key) refused it: another writer got there first.
        return Err(StoreError::DuplicateIdempotencyKey {
            tenant: job.tenant.clone(),
            key: job.idempotency_key.clone().unwrap_or_default(),
        });
    }
    Ok(())
}

type SqliteQuery<'q> = sqlx::query::Query<'q, Sqlite, sqlx::sqlite::SqliteArguments>;

fn bind_job<'q>(q: SqliteQuery<'q>, job: &Job) -> StoreResult<SqliteQuery<'q>> {
    Ok(q.bind(job.id.to_string())
        .bind(job.tenant.clone())
        .bind(job.principal.clone())
        .bind(job.session.clone())
        .bind(job.run_id.map(|u| u.to_string()))
        .bind(job.parent_id.map(|u| u.to_string()))
        .bind(job.kind.clone())
        .bind(job.state.as_str())
        .bind(i64_of(job.version)?)
        .bind(job.idempotency_key.clone())
        .bind(to_json(&job.input)?)
        .bind(job.progress)
        .bind(job.progress_message.clone())
        .bind(i64::from(job.turns))
        .bind(i64::from(job.tool_calls))
        .bind(job.deadline.map(micros))
        .bind(job.error.as_ref().map(|e| e.code.clone()))
        .bind(job.error.as_ref().map(|e| e.message.clone()))
        .bind(job.result_ref.clone())
        .bind(to_json(&job.tags)?)
        .bind(to_json(&job.metadata)?)
        .bind(micros(job.created_at))
        .bind(micros(job.updated_at))
        .bind(job.started_at.map(micros))
        .bind(job.finished_at.map(micros)))
}

async fn update_job(conn: &mut SqliteConnection, job: &Job, expected: u64) -> StoreResult<()> {
    // Every column is rewritten; the WHERE on version makes it a compare-and-set.
    let sql = "UPDATE jobs SET id = ?1, tenant = ?2, principal = ?3, session = ?4, run_id = ?5, parent_id = ?6, \
         kind = ?7, state = ?8, version = ?9, idempotency_key = ?10, input_json = ?11, progress = ?12, \
         progress_message = ?13, turns = ?14, tool_calls = ?15, deadline = ?16, error_code = ?17, \
         error_message = ?18, result_ref = ?19, tags_json = ?20, metadata_json = ?21, created_at = ?22, \
         updated_at = ?23, started_at = ?24, finished_at = ?25 WHERE id = ?1 AND version = ?26";
    let q = bind_job(sqlx::query(sql), job)?.bind(i64_of(expected)?);
    let res = q.execute(&mut *conn).await.map_err(be)?;
    if res.rows_affected() == 0 {
        return Err(missing_or_conflict(conn, "jobs", "job", job.id).await);
    }
    Ok(())
}

async fn missing_or_conflict(conn: &mut SqliteConnection, table: &str, entity: &'static str, id: Uuid) -> StoreError {
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

fn bind_action<'q>(q: SqliteQuery<'q>, a: &Action) -> StoreResult<SqliteQuery<'q>> {
    Ok(q.bind(a.id.to_string())
        .bind(a.job_id.to_string())
        .bind(a.tenant.clone())
        .bind(a.action_type.as_str())
        .bind(a.state.as_str())
        .bind(i64_of(a.version)?)
        .bind(a.title.clone())
        .bind(to_json(&a.request)?)
        .bind(a.call_digest.clone())
        .bind(a.token_hash.clone())
        .bind(a.resolution.as_ref().map(to_json).transpose()?)
        .bind(micros(a.created_at))
        .bind(micros(a.expires_at))
        .bind(a.resolved_at.map(micros)))
}

async fn insert_action(conn: &mut SqliteConnection, a: &Action) -> StoreResult<()> {
    let sql = "INSERT INTO actions (id, job_id, tenant, action_type, state, version, title, request_json, \
         call_digest, token_hash, resolution_json, created_at, expires_at, resolved_at) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)";
    bind_action(sqlx::query(sql), a)?
        .execute(&mut *conn)
        .await
        .map_err(|e| match &e {
            sqlx::Error::Database(d) if d.is_unique_violation() => StoreError::Conflict {
                entity: "action",
                id: a.id.to_string(),
            },
            _ => job_ref_error(e, a.job_id),
        })?;
    Ok(())
}

async fn update_action(conn: &mut SqliteConnection, a: &Action, expected: u64) -> StoreResult<()> {
    let sql = "UPDATE actions SET id = ?1, job_id = ?2, tenant = ?3, action_type = ?4, state = ?5, version = ?6, \
         title = ?7, request_json = ?8, call_digest = ?9, token_hash = ?10, resolution_json = ?11, \
         created_at = ?12, expires_at = ?13, resolved_at = ?14 WHERE id = ?1 AND version = ?15";
    let res = bind_action(sqlx::query(sql), a)?
        .bind(i64_of(expected)?)
        .execute(&mut *conn)
        .await
        .map_err(be)?;
    if res.rows_affected() == 0 {
        return Err(missing_or_conflict(conn, "actions", "action", a.id).await);
    }
    Ok(())
}

async fn insert_ledger(conn: &mut SqliteConnection, e: &NewLedgerEvent) -> StoreResult<i64> {
    let sql = "INSERT INTO ledger_events (kind, tenant, principal, session, job_id, reservation_id, tokens, \
         cost_nanos, requests, tool_calls, duration_ms, model, tool, data_json, at) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id";
    let row = sqlx::query(sql)
        .bind(e.kind.as_str())
        .bind(e.tenant.clone())
        .bind(e.principal.clone())
        .bind(e.session.clone())
        .bind(e.job_id.map(|u| u.to_string()))
        .bind(e.reservation_id.map(|u| u.to_string()))
        .bind(i64_of(e.usage.tokens)?)
        .bind(nanos(e.usage.cost)?)
        .bind(i64_of(e.usage.requests)?)
        .bind(i64_of(e.usage.tool_calls)?)
        .bind(e.duration_ms.map(i64_of).transpose()?)
        .bind(e.model.clone())
        .bind(e.tool.clone())
        .bind(to_json(&e.data)?)
        .bind(micros(e.at))
        .fetch_one(&mut *conn)
        .await
        .map_err(be)?;
    get(&row, "id")
}

/// `AND principal = ? AND session = ?` restrictions of a budget or query, appended to `qb`.
/// ` AND column IN (?, ?, ...)` for a non-empty `values`; nothing when empty (no filter).
fn push_in(qb: &mut QueryBuilder<Sqlite>, column: &'static str, values: impl IntoIterator<Item = String>) {
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

fn push_subject(qb: &mut QueryBuilder<Sqlite>, principal: Option<&str>, session: Option<&str>) {
    if let Some(p) = principal {
        qb.push(" AND principal = ").push_bind(p.to_string());
    }
    if let Some(s) = session {
        qb.push(" AND session = ").push_bind(s.to_string());
    }
}

async fn budget_usage(conn: &mut SqliteConnection, budget: &Budget, now: DateTime<Utc>) -> StoreResult<Usage> {
    let sums = "COALESCE(SUM(tokens), 0) AS tokens, COALESCE(SUM(cost_nanos), 0) AS cost_nanos, \
                COALESCE(SUM(requests), 0) AS requests, COALESCE(SUM(tool_calls), 0) AS tool_calls";
    let mut qb = QueryBuilder::<Sqlite>::new(format!(
        "SELECT {sums} FROM ledger_events WHERE kind IN ('model_usage', 'tool_usage', 'overage') AND tenant = "
    ));
    qb.push_bind(budget.tenant.clone());
    push_subject(&mut qb, budget.principal.as_deref(), budget.session.as_deref());
    if let Some(start) = budget.window.start(now) {
        qb.push(" AND at >= ").push_bind(micros(start));
    }
    let settled = usage_from_row(&qb.build().fetch_one(&mut *conn).await.map_err(be)?)?;

    // Live holds count whatever the window: they are about to be spent now.
    let mut qb = QueryBuilder::<Sqlite>::new(format!(
        "SELECT {sums} FROM reservations WHERE state = 'HELD' AND tenant = "
    ));
    qb.push_bind(budget.tenant.clone());
    qb.push(" AND expires_at > ").push_bind(micros(now));
    push_subject(&mut qb, budget.principal.as_deref(), budget.session.as_deref());
    let held = usage_from_row(&qb.build().fetch_one(&mut *conn).await.map_err(be)?)?;
    Ok(settled + held)
}

fn reservation_entry(r: &Reservation, kind: LedgerKind, usage: Usage, at: DateTime<Utc>) -> NewLedgerEvent {
    NewLedgerEvent {
        kind,
        tenant: r.tenant.clone(),
        principal: r.principal.clone(),
        session: r.session.clone(),
        job_id: r.job_id,
        reservation_id: Some(r.id),
        usage,
        duration_ms: None,
        model: None,
        tool: None,
        data: serde_json::Value::Null,
        at,
    }
}

async fn load_reservation(conn: &mut SqliteConnection, id: Uuid) -> StoreResult<Reservation> {
    let row = sqlx::query("SELECT * FROM reservations WHERE id = ?")
        .bind(id.to_string())
        .fetch_optional(&mut *conn)
        .await
        .map_err(be)?
        .ok_or_else(|| StoreError::NotFound {
            entity: "reservation",
            id: id.to_string(),
        })?;
    reservation_from_row(&row)
}

async fn close_reservation(
    conn: &mut SqliteConnection,
    r: &Reservation,
    state: ReservationState,
    actual: Option<&Usage>,
    now: DateTime<Utc>,
) -> StoreResult<()> {
    let res =
        sqlx::query("UPDATE reservations SET state = ?, actual_json = ?, closed_at = ? WHERE id = ? AND state = ?")
            .bind(state.as_str())
            .bind(actual.map(to_json).transpose()?)
            .bind(micros(now))
            .bind(r.id.to_string())
            .bind(r.state.as_str())
            .execute(&mut *conn)
            .await
            .map_err(be)?;
    if res.rows_affected() == 0 {
        return Err(StoreError::Conflict {
            entity: "reservation",
            id: r.id.to_string(),
        });
    }
    Ok(())
}

async fn release_in(
    conn: &mut SqliteConnection,
    id: Uuid,
    now: DateTime<Utc>,
    reason: &str,
) -> StoreResult<Reservation> {
    let r = load_reservation(conn, id).await?;
    if r.state != ReservationState::Held {
        return Err(StoreError::Conflict {
            entity: "reservation",
            id: id.to_string(),
        });
    }
    close_reservation(conn, &r, ReservationState::Released, None, now).await?;
    let mut e = reservation_entry(&r, LedgerKind::Release, r.amount.clone(), now);
    e.data = serde_json::json!({ "reason": reason });
    insert_ledger(conn, &e).await?;
    Ok(Reservation {
        state: ReservationState::Released,
        closed_at: Some(now),
        ..r
    })
}

async fn settle_in(conn: &mut SqliteConnection, req: SettleRequest) -> StoreResult<Reservation> {
    let r = load_reservation(conn, req.reservation_id).await?;
    if r.state == ReservationState::Settled {
        return Err(StoreError::Conflict {
            entity: "reservation",
            id: r.id.to_string(),
        });
    }
    // Bounded by the hold (a lapsed hold covers nothing): the excess is an `overage` entry.
    let plan = r.settle_plan(&req.actual, req.now);
    close_reservation(conn, &r, ReservationState::Settled, Some(&req.actual), req.now).await?;
    let mut usage = reservation_entry(&r, req.kind, plan.charged.clone(), req.now);
    usage.duration_ms = req.duration_ms;
    usage.model = req.model;
    usage.tool = req.tool;
    usage.data = req.data;
    insert_ledger(conn, &usage).await?;
    if !plan.overage.is_zero() {
        let overage = NewLedgerEvent {
            kind: LedgerKind::Overage,
            usage: plan.overage,
            data: plan.data,
            ..usage
        };
        insert_ledger(conn, &overage).await?;
    }
    insert_ledger(
        conn,
        &reservation_entry(&r, LedgerKind::Settle, req.actual.clone(), req.now),
    )
    .await?;
    Ok(Reservation {
        state: ReservationState::Settled,
        actual: Some(req.actual),
        closed_at: Some(req.now),
        ..r
    })
}

async fn insert_journal(conn: &mut SqliteConnection, j: &NewJournalEntry) -> StoreResult<()> {
    // Safe under BEGIN IMMEDIATE, like event sequence numbers.
    let res = sqlx::query(
        "INSERT INTO journal (job_id, seq, key, kind, payload_json, at) \
         VALUES (?1, (SELECT COALESCE(MAX(seq), 0) + 1 FROM journal WHERE job_id = ?1), ?2, ?3, ?4, ?5) \
         ON CONFLICT (job_id, key) DO NOTHING",
    )
    .bind(j.job_id.to_string())
    .bind(j.key.clone())
    .bind(j.kind.clone())
    .bind(to_json(&j.payload)?)
    .bind(micros(j.at))
    .execute(&mut *conn)
    .await
    .map_err(|err| job_ref_error(err, j.job_id))?;
    if res.rows_affected() == 0 {
        return Err(StoreError::Conflict {
            entity: "journal",
            id: format!("{}/{}", j.job_id, j.key),
        });
    }
    Ok(())
}

/// `Conflict { entity: "lease" }` unless `g` holds its job's lease (owner and epoch) and the job
/// has not ended.
async fn check_lease(conn: &mut SqliteConnection, g: &LeaseGuard) -> StoreResult<()> {
    let row = sqlx::query("SELECT lease_owner, lease_epoch, state FROM jobs WHERE id = ?")
        .bind(g.job_id.to_string())
        .fetch_optional(&mut *conn)
        .await
        .map_err(be)?;
    let holds = match row {
        Some(row) => {
            let state: JobState = parse(&get::<String>(&row, "state")?)?;
            get::<Option<String>>(&row, "lease_owner")?.as_deref() == Some(g.owner.as_str())
                && u64_of(get::<i64>(&row, "lease_epoch")?)? == g.epoch
                && !state.is_terminal()
        }
        None => false,
    };
    if holds {
        Ok(())
    } else {
        Err(StoreError::Conflict {
            entity: "lease",
            id: g.job_id.to_string(),
        })
    }
}

impl SqliteKernelStore {
    async fn begin(&self) -> StoreResult<sqlx::Transaction<'static, Sqlite>> {
        self.pool.begin_with("BEGIN IMMEDIATE").await.map_err(be)
    }

    async fn commit_batch(&self, batch: Batch) -> StoreResult<Vec<RuntimeEvent>> {
        let mut tx = self.begin().await?;
        // Fencing first, against the rows as they were before this batch.
        for g in &batch.leases {
            check_lease(&mut tx, g).await?;
        }
        for w in &batch.jobs {
            match w.expected_version {
                None => insert_job(&mut tx, &w.job).await?,
                Some(v) => update_job(&mut tx, &w.job, v).await?,
            }
        }
        for w in &batch.actions {
            match w.expected_version {
                None => insert_action(&mut tx, &w.action).await?,
                Some(v) => update_action(&mut tx, &w.action, v).await?,
            }
        }
        for c in &batch.claims {
            let res = sqlx::query(concat!(
                "UPDATE jobs SET lease_owner = ?, lease_until = ",
                db_now_micros!(),
                " + ?, lease_epoch = lease_epoch + 1 WHERE id = ? AND (lease_until IS NULL OR lease_until <= ",
                db_now_micros!(),
                ")"
            ))
            .bind(c.owner.clone())
            .bind(ttl_micros(c.ttl_ms))
            .bind(c.job_id.to_string())
            .execute(&mut *tx)
            .await
            .map_err(be)?;
            if res.rows_affected() == 0 {
                return Err(missing_or_conflict(&mut tx, "jobs", "lease", c.job_id).await);
            }
        }
        for j in &batch.journal {
            insert_journal(&mut tx, j).await?;
        }
        for req in batch.settlements {
            settle_in(&mut tx, req).await?;
        }
        let mut out = Vec::with_capacity(batch.events.len());
        for e in batch.events {
            // Safe under BEGIN IMMEDIATE: no other writer can append to this job meanwhile.
            let row = sqlx::query(
                "INSERT INTO events (job_id, tenant, seq, event_type, data_json, at) \
                 VALUES (?1, ?2, (SELECT COALESCE(MAX(seq), 0) + 1 FROM events WHERE job_id = ?1), ?3, ?4, ?5) \
                 RETURNING id, seq",
            )
            .bind(e.job_id.to_string())
            .bind(e.tenant.clone())
            .bind(e.event_type.as_str())
            .bind(to_json(&e.data)?)
            .bind(micros(e.at))
            .fetch_one(&mut *tx)
            .await
            .map_err(|err| job_ref_error(err, e.job_id))?;
            out.push(RuntimeEvent {
                id: get(&row, "id")?,
                seq: u64_of(get(&row, "seq")?)?,
                job_id: e.job_id,
                tenant: e.tenant,
                event_type: e.event_type,
                data: e.data,
                at: e.at,
            });
        }
        tx.commit().await.map_err(be)?;
        Ok(out)
    }

    async fn reserve_tx(&self, req: ReserveRequest, evaluate: BudgetEvaluator) -> StoreResult<ReserveOutcome> {
        let mut tx = self.begin().await?;
        let rows = sqlx::query("SELECT budget_json FROM budgets WHERE tenant = ? ORDER BY id")
            .bind(req.tenant.clone())
            .fetch_all(&mut *tx)
            .await
            .map_err(be)?;
        let mut statuses = Vec::new();
        for row in rows {
            let budget: Budget = from_json(&get::<String>(&row, "budget_json")?)?;
            if budget.applies_to(&req.tenant, req.principal.as_deref(), req.session.as_deref()) {
                let used = budget_usage(&mut tx, &budget, req.now).await?;
                statuses.push(BudgetStatus { budget, used });
            }
        }
        let decision = evaluate(&req.amount, &statuses);
        let entry = |kind: LedgerKind, reservation_id: Option<Uuid>, data: serde_json::Value| NewLedgerEvent {
            kind,
            tenant: req.tenant.clone(),
            principal: req.principal.clone(),
            session: req.session.clone(),
            job_id: req.job_id,
            reservation_id,
            usage: req.amount.clone(),
            duration_ms: None,
            model: None,
            tool: None,
            data,
            at: req.now,
        };
        if decision.outcome != BudgetOutcome::Allow {
            insert_ledger(
                &mut tx,
                &entry(
                    LedgerKind::BudgetCheck,
                    None,
                    serde_json::to_value(&decision).map_err(corrupt)?,
                ),
            )
            .await?;
        }
        if !decision.outcome.is_allowed() {
            // Commit the budget-check record; nothing is held.
            tx.commit().await.map_err(be)?;
            return Ok(ReserveOutcome {
                decision,
                reservation: None,
            });
        }
        let r = Reservation::held(&req);
        sqlx::query(
            "INSERT INTO reservations (id, tenant, principal, session, job_id, tokens, cost_nanos, requests, \
             tool_calls, state, actual_json, created_at, expires_at, closed_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, ?, ?, NULL)",
        )
        .bind(r.id.to_string())
        .bind(r.tenant.clone())
        .bind(r.principal.clone())
        .bind(r.session.clone())
        .bind(r.job_id.map(|u| u.to_string()))
        .bind(i64_of(r.amount.tokens)?)
        .bind(nanos(r.amount.cost)?)
        .bind(i64_of(r.amount.requests)?)
        .bind(i64_of(r.amount.tool_calls)?)
        .bind(r.state.as_str())
        .bind(micros(r.created_at))
        .bind(micros(r.expires_at))
        .execute(&mut *tx)
        .await
        .map_err(be)?;
        insert_ledger(&mut tx, &entry(LedgerKind::Hold, Some(r.id), serde_json::Value::Null)).await?;
        tx.commit().await.map_err(be)?;
        Ok(ReserveOutcome {
            decision,
            reservation: Some(r),
        })
    }

    async fn settle_tx(&self, req: SettleRequest) -> StoreResult<Reservation> {
        let mut tx = self.begin().await?;
        let r = settle_in(&mut tx, req).await?;
        tx.commit().await.map_err(be)?;
        Ok(r)
    }

    async fn release_tx(&self, id: Uuid, now: DateTime<Utc>, reason: String) -> StoreResult<Reservation> {
        let mut tx = self.begin().await?;
        let r = release_in(&mut tx, id, now, &reason).await?;
        tx.commit().await.map_err(be)?;
        Ok(r)
    }

    async fn release_expired_tx(&self, now: DateTime<Utc>, limit: u32) -> StoreResult<Vec<Reservation>> {
        let mut tx = self.begin().await?;
        let rows = sqlx::query(
            "SELECT id FROM reservations WHERE state = 'HELD' AND expires_at <= ? ORDER BY expires_at, id LIMIT ?",
        )
        .bind(micros(now))
        .bind(i64::from(limit))
        .fetch_all(&mut *tx)
        .await
        .map_err(be)?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let id = uuid(&get::<String>(&row, "id")?)?;
            out.push(release_in(&mut tx, id, now, "expired").await?);
        }
        tx.commit().await.map_err(be)?;
        Ok(out)
    }

    async fn claim_tx(&self, req: ClaimRequest) -> StoreResult<Vec<Job>> {
        if req.kinds.is_empty() || req.limit == 0 {
            return Ok(vec![]);
        }
        let mut tx = self.begin().await?;
        let mut qb = QueryBuilder::<Sqlite>::new(concat!(
            "SELECT * FROM jobs WHERE state IN ('QUEUED', 'RUNNING') AND (lease_until IS NULL OR lease_until <= ",
            db_now_micros!(),
            ")"
        ));
        push_in(&mut qb, "kind", req.kinds.iter().cloned());
        if let Some(id) = req.job_id {
            qb.push(" AND id = ").push_bind(id.to_string());
        }
        qb.push(" ORDER BY created_at, id LIMIT ")
            .push_bind(i64::from(req.limit));
        let rows = qb.build().fetch_all(&mut *tx).await.map_err(be)?;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            let mut job = job_from_row(row)?;
            let res = sqlx::query(concat!(
                "UPDATE jobs SET lease_owner = ?, lease_until = ",
                db_now_micros!(),
                " + ?, lease_epoch = lease_epoch + 1, version = version + 1, updated_at = ? WHERE id = ? AND version = ?"
            ))
            .bind(req.owner.clone())
            .bind(ttl_micros(req.ttl_ms))
            .bind(micros(req.now))
            .bind(job.id.to_string())
            .bind(i64_of(job.version)?)
            .execute(&mut *tx)
            .await
            .map_err(be)?;
            if res.rows_affected() == 1 {
                job.version += 1;
                job.updated_at = req.now;
                out.push(job);
            }
        }
        tx.commit().await.map_err(be)?;
        Ok(out)
    }

    async fn fetch_jobs(&self, qb: &mut QueryBuilder<Sqlite>) -> StoreResult<Vec<Job>> {
        let rows = qb.build().fetch_all(&self.pool).await.map_err(be)?;
        rows.iter().map(job_from_row).collect()
    }

    async fn fetch_actions(&self, qb: &mut QueryBuilder<Sqlite>) -> StoreResult<Vec<Action>> {
        let rows = qb.build().fetch_all(&self.pool).await.map_err(be)?;
        rows.iter().map(action_from_row).collect()
    }
}

fn push_job_filter(qb: &mut QueryBuilder<Sqlite>, f: &JobFilter) {
    qb.push(" WHERE tenant = ").push_bind(f.tenant.clone());
    push_in(qb, "state", f.states.iter().map(|v| v.as_str().to_string()));
    push_subject(qb, f.principal.as_deref(), f.session.as_deref());
    if let Some(p) = f.parent_id {
        qb.push(" AND parent_id = ").push_bind(p.to_string());
    }
    if let Some(k) = &f.kind {
        qb.push(" AND kind = ").push_bind(k.clone());
    }
    if let Some(t) = &f.tag {
        qb.push(" AND EXISTS (SELECT 1 FROM json_each(jobs.tags_json) WHERE json_each.value = ")
            .push_bind(t.clone());
        qb.push(")");
    }
}

fn push_limit(qb: &mut QueryBuilder<Sqlite>, limit: Option<u32>) {
    if let Some(l) = limit {
        qb.push(" LIMIT ").push_bind(i64::from(l));
    }
}

impl KernelStore for SqliteKernelStore {
    fn commit(&self, batch: Batch) -> BoxFuture<'_, StoreResult<Vec<RuntimeEvent>>> {
        Box::pin(self.commit_batch(batch))
    }

    fn get_job(&self, id: Uuid) -> BoxFuture<'_, StoreResult<Option<Job>>> {
        Box::pin(async move {
            let row = sqlx::query("SELECT * FROM jobs WHERE id = ?")
                .bind(id.to_string())
                .fetch_optional(&self.pool)
                .await
                .map_err(be)?;
            row.as_ref().map(job_from_row).transpose()
        })
    }

    fn get_job_by_key<'a>(&'a self, tenant: &'a str, key: &'a str) -> BoxFuture<'a, StoreResult<Option<Job>>> {
        Box::pin(async move {
            let row = sqlx::query("SELECT * FROM jobs WHERE tenant = ? AND idempotency_key = ?")
                .bind(tenant.to_string())
                .bind(key.to_string())
                .fetch_optional(&self.pool)
                .await
                .map_err(be)?;
            row.as_ref().map(job_from_row).transpose()
        })
    }

    fn list_jobs<'a>(&'a self, filter: &'a JobFilter) -> BoxFuture<'a, StoreResult<Vec<Job>>> {
        Box::pin(async move {
            let mut qb = QueryBuilder::<Sqlite>::new("SELECT * FROM jobs");
            push_job_filter(&mut qb, filter);
            qb.push(" ORDER BY created_at DESC, id DESC");
            push_limit(&mut qb, filter.limit);
            self.fetch_jobs(&mut qb).await
        })
    }

    fn count_jobs<'a>(&'a self, filter: &'a JobFilter) -> BoxFuture<'a, StoreResult<u64>> {
        Box::pin(async move {
            let mut qb = QueryBuilder::<Sqlite>::new("SELECT COUNT(*) AS n FROM jobs");
            push_job_filter(&mut qb, filter);
            let row = qb.build().fetch_one(&self.pool).await.map_err(be)?;
            u64_of(get(&row, "n")?)
        })
    }

    fn overdue_jobs(&self, now: DateTime<Utc>, limit: u32) -> BoxFuture<'_, StoreResult<Vec<Job>>> {
        Box::pin(async move {
            let mut qb = QueryBuilder::<Sqlite>::new(
                "SELECT * FROM jobs WHERE deadline IS NOT NULL AND state IN ('QUEUED', 'RUNNING', 'WAITING_ACTION') \
                 AND deadline <= ",
            );
            qb.push_bind(micros(now)).push(" ORDER BY deadline, id");
            push_limit(&mut qb, Some(limit));
            self.fetch_jobs(&mut qb).await
        })
    }

    fn get_action(&self, id: Uuid) -> BoxFuture<'_, StoreResult<Option<Action>>> {
        Box::pin(async move {
            let row = sqlx::query("SELECT * FROM actions WHERE id = ?")
                .bind(id.to_string())
                .fetch_optional(&self.pool)
                .await
                .map_err(be)?;
            row.as_ref().map(action_from_row).transpose()
        })
    }

    fn get_action_by_token_hash<'a>(&'a self, token_hash: &'a str) -> BoxFuture<'a, StoreResult<Option<Action>>> {
        Box::pin(async move {
            let row = sqlx::query("SELECT * FROM actions WHERE token_hash = ?")
                .bind(token_hash.to_string())
                .fetch_optional(&self.pool)
                .await
                .map_err(be)?;
            row.as_ref().map(action_from_row).transpose()
        })
    }

    fn list_actions<'a>(&'a self, filter: &'a ActionFilter) -> BoxFuture<'a, StoreResult<Vec<Action>>> {
        Box::pin(async move {
            let mut qb = QueryBuilder::<Sqlite>::new("SELECT * FROM actions WHERE tenant = ");
            qb.push_bind(filter.tenant.clone());
            if let Some(j) = filter.job_id {
                qb.push(" AND job_id = ").push_bind(j.to_string());
            }
            push_in(&mut qb, "state", filter.states.iter().map(|v| v.as_str().to_string()));
            qb.push(" ORDER BY created_at, id");
            push_limit(&mut qb, filter.limit);
            self.fetch_actions(&mut qb).await
        })
    }

    fn expired_actions(&self, now: DateTime<Utc>, limit: u32) -> BoxFuture<'_, StoreResult<Vec<Action>>> {
        Box::pin(async move {
            let mut qb =
                QueryBuilder::<Sqlite>::new("SELECT * FROM actions WHERE state = 'PENDING' AND expires_at <= ");
            qb.push_bind(micros(now)).push(" ORDER BY expires_at, id");
            push_limit(&mut qb, Some(limit));
            self.fetch_actions(&mut qb).await
        })
    }

    fn read_events<'a>(&'a self, query: &'a EventQuery) -> BoxFuture<'a, StoreResult<Vec<RuntimeEvent>>> {
        Box::pin(async move {
            let mut qb = QueryBuilder::<Sqlite>::new("SELECT * FROM events WHERE id > ");
            qb.push_bind(query.after_id);
            qb.push(" AND seq > ").push_bind(i64_of(query.after_seq)?);
            if let Some(t) = &query.filter.tenant {
                qb.push(" AND tenant = ").push_bind(t.clone());
            }
            if let Some(j) = query.filter.job_id {
                qb.push(" AND job_id = ").push_bind(j.to_string());
            }
            push_in(
                &mut qb,
                "event_type",
                query.filter.types.iter().map(|v| v.as_str().to_string()),
            );
            qb.push(" ORDER BY id");
            push_limit(&mut qb, query.limit);
            let rows = qb.build().fetch_all(&self.pool).await.map_err(be)?;
            rows.iter().map(event_from_row).collect()
        })
    }

    fn append_ledger(&self, entry: NewLedgerEvent) -> BoxFuture<'_, StoreResult<LedgerEvent>> {
        Box::pin(async move {
            let mut conn = self.pool.acquire().await.map_err(be)?;
            let id = insert_ledger(&mut conn, &entry).await?;
            Ok(LedgerEvent { id, entry })
        })
    }

    fn list_ledger<'a>(&'a self, query: &'a LedgerQuery) -> BoxFuture<'a, StoreResult<Vec<LedgerEvent>>> {
        Box::pin(async move {
            let mut qb = QueryBuilder::<Sqlite>::new("SELECT * FROM ledger_events WHERE tenant = ");
            push_ledger_filter(&mut qb, query)?;
            qb.push(" ORDER BY id");
            push_limit(&mut qb, query.limit);
            let rows = qb.build().fetch_all(&self.pool).await.map_err(be)?;
            rows.iter().map(ledger_from_row).collect()
        })
    }

    fn usage<'a>(&'a self, query: &'a UsageQuery) -> BoxFuture<'a, StoreResult<Usage>> {
        Box::pin(async move {
            let mut qb = QueryBuilder::<Sqlite>::new(
                "SELECT COALESCE(SUM(tokens), 0) AS tokens, COALESCE(SUM(cost_nanos), 0) AS cost_nanos, \
                 COALESCE(SUM(requests), 0) AS requests, COALESCE(SUM(tool_calls), 0) AS tool_calls \
                 FROM ledger_events WHERE tenant = ",
            );
            push_ledger_filter(&mut qb, &query.as_ledger_query())?;
            usage_from_row(&qb.build().fetch_one(&self.pool).await.map_err(be)?)
        })
    }

    fn put_budget(&self, budget: Budget) -> BoxFuture<'_, StoreResult<()>> {
        Box::pin(async move {
            sqlx::query(
                "INSERT INTO budgets (id, tenant, budget_json) VALUES (?, ?, ?) \
                 ON CONFLICT (id) DO UPDATE SET tenant = excluded.tenant, budget_json = excluded.budget_json",
            )
            .bind(budget.id.to_string())
            .bind(budget.tenant.clone())
            .bind(to_json(&budget)?)
            .execute(&self.pool)
            .await
            .map_err(be)?;
            Ok(())
        })
    }

    fn list_budgets<'a>(&'a self, tenant: &'a str) -> BoxFuture<'a, StoreResult<Vec<Budget>>> {
        Box::pin(async move {
            let rows = sqlx::query("SELECT budget_json FROM budgets WHERE tenant = ? ORDER BY id")
                .bind(tenant.to_string())
                .fetch_all(&self.pool)
                .await
                .map_err(be)?;
            rows.iter()
                .map(|r| from_json(&get::<String>(r, "budget_json")?))
                .collect()
        })
    }

    fn delete_budget(&self, id: Uuid) -> BoxFuture<'_, StoreResult<bool>> {
        Box::pin(async move {
            let res = sqlx::query("DELETE FROM budgets WHERE id = ?")
                .bind(id.to_string())
                .execute(&self.pool)
                .await
                .map_err(be)?;
            Ok(res.rows_affected() > 0)
        })
    }

    fn reserve(
        &self,
        request: ReserveRequest,
        evaluate: BudgetEvaluator,
    ) -> BoxFuture<'_, StoreResult<ReserveOutcome>> {
        Box::pin(self.reserve_tx(request, evaluate))
    }

    fn get_reservation(&self, id: Uuid) -> BoxFuture<'_, StoreResult<Option<Reservation>>> {
        Box::pin(async move {
            let row = sqlx::query("SELECT * FROM reservations WHERE id = ?")
                .bind(id.to_string())
                .fetch_optional(&self.pool)
                .await
                .map_err(be)?;
            row.as_ref().map(reservation_from_row).transpose()
        })
    }

    fn settle(&self, request: SettleRequest) -> BoxFuture<'_, StoreResult<Reservation>> {
        Box::pin(self.settle_tx(request))
    }

    fn release(&self, id: Uuid, now: DateTime<Utc>, reason: String) -> BoxFuture<'_, StoreResult<Reservation>> {
        Box::pin(self.release_tx(id, now, reason))
    }

    fn release_expired(&self, now: DateTime<Utc>, limit: u32) -> BoxFuture<'_, StoreResult<Vec<Reservation>>> {
        Box::pin(self.release_expired_tx(now, limit))
    }

    fn read_journal(&self, job_id: Uuid) -> BoxFuture<'_, StoreResult<Vec<JournalEntry>>> {
        Box::pin(async move {
            let rows = sqlx::query("SELECT * FROM journal WHERE job_id = ? ORDER BY seq")
                .bind(job_id.to_string())
                .fetch_all(&self.pool)
                .await
                .map_err(be)?;
            rows.iter()
                .map(|r| {
                    Ok(JournalEntry {
                        seq: u64_of(get(r, "seq")?)?,
                        entry: NewJournalEntry {
                            job_id,
                            key: get(r, "key")?,
                            kind: get(r, "kind")?,
                            payload: from_json(&get::<String>(r, "payload_json")?)?,
                            at: from_micros(get(r, "at")?)?,
                        },
                    })
                })
                .collect()
        })
    }

    fn extend_holds<'a>(&'a self, ids: &'a [Uuid], until: DateTime<Utc>) -> BoxFuture<'a, StoreResult<u64>> {
        Box::pin(async move {
            if ids.is_empty() {
                return Ok(0);
            }
            let mut qb = QueryBuilder::<Sqlite>::new("UPDATE reservations SET expires_at = MAX(expires_at, ");
            qb.push_bind(micros(until)).push(") WHERE state = 'HELD'");
            push_in(&mut qb, "id", ids.iter().map(Uuid::to_string));
            let res = qb.build().execute(&self.pool).await.map_err(be)?;
            Ok(res.rows_affected())
        })
    }

    fn claim_jobs(&self, request: ClaimRequest) -> BoxFuture<'_, StoreResult<Vec<Job>>> {
        Box::pin(self.claim_tx(request))
    }

    fn renew_lease<'a>(&'a self, guard: &'a LeaseGuard, ttl_ms: u64) -> BoxFuture<'a, StoreResult<bool>> {
        Box::pin(async move {
            let res = sqlx::query(concat!(
                "UPDATE jobs SET lease_until = MAX(COALESCE(lease_until, 0), ",
                db_now_micros!(),
                " + ?) WHERE id = ? AND lease_owner = ? AND lease_epoch = ?"
            ))
            .bind(ttl_micros(ttl_ms))
            .bind(guard.job_id.to_string())
            .bind(guard.owner.clone())
            .bind(i64_of(guard.epoch)?)
            .execute(&self.pool)
            .await
            .map_err(be)?;
            Ok(res.rows_affected() == 1)
        })
    }

    fn release_lease<'a>(&'a self, guard: &'a LeaseGuard) -> BoxFuture<'a, StoreResult<bool>> {
        Box::pin(async move {
            let res = sqlx::query(
                "UPDATE jobs SET lease_owner = NULL, lease_until = NULL \
                 WHERE id = ? AND lease_owner = ? AND lease_epoch = ?",
            )
            .bind(guard.job_id.to_string())
            .bind(guard.owner.clone())
            .bind(i64_of(guard.epoch)?)
            .execute(&self.pool)
            .await
            .map_err(be)?;
            Ok(res.rows_affected() == 1)
        })
    }

    fn get_lease(&self, job_id: Uuid) -> BoxFuture<'_, StoreResult<Option<Lease>>> {
        Box::pin(async move {
            let row = sqlx::query("SELECT lease_owner, lease_until, lease_epoch FROM jobs WHERE id = ?")
                .bind(job_id.to_string())
                .fetch_optional(&self.pool)
                .await
                .map_err(be)?;
            let Some(row) = row else { return Ok(None) };
            match (
                get::<Option<String>>(&row, "lease_owner")?,
                get::<Option<i64>>(&row, "lease_until")?,
            ) {
                (Some(owner), Some(until)) => Ok(Some(Lease {
                    owner,
                    until: from_micros(until)?,
                    epoch: u64_of(get::<i64>(&row, "lease_epoch")?)?,
                })),
                _ => Ok(None),
            }
        })
    }
}

/// Binds the tenant (the builder ends in `tenant = `) and the rest of a ledger query.
fn push_ledger_filter(qb: &mut QueryBuilder<Sqlite>, q: &LedgerQuery) -> StoreResult<()> {
    qb.push_bind(q.tenant.clone());
    push_in(qb, "kind", q.kinds.iter().map(|v| v.as_str().to_string()));
    push_subject(qb, q.principal.as_deref(), q.session.as_deref());
    if let Some(j) = q.job_id {
        qb.push(" AND job_id = ").push_bind(j.to_string());
    }
    if let Some(f) = q.from {
        qb.push(" AND at >= ").push_bind(micros(f));
    }
    if let Some(t) = q.to {
        qb.push(" AND at < ").push_bind(micros(t));
    }
    Ok(())
}
