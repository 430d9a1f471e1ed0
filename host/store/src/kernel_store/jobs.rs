//! Jobs: rows, inserts and compare-and-set updates, and the job queries.

use chrono::{DateTime, Utc};
use keel_kernel::job::{Job, JobError, JobFilter, JobState};
use keel_kernel::store::{LeaseGuard, StoreError, StoreResult};
use rusqlite::types::Value;
use rusqlite::{Connection, Row};
use uuid::Uuid;

use super::leases::check_lease;
use super::rows::{
    Query, be, conflict_or, corrupt, db_now_micros, execute, fetch_optional, from_json, from_micros, get, i64_of, int,
    json_text, micros, missing_or_conflict, opt_from_micros, opt_uuid, parse, text, to_json, ttl_micros, u64_of, uuid,
};

pub(super) fn job_from_row(r: &Row<'_>) -> StoreResult<Job> {
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
        input: json_text(get(r, "input_json")?)?,
        progress: get(r, "progress")?,
        progress_message: get(r, "progress_message")?,
        turns: u32::try_from(get::<i64>(r, "turns")?).map_err(corrupt)?,
        tool_calls: u32::try_from(get::<i64>(r, "tool_calls")?).map_err(corrupt)?,
        deadline: opt_from_micros(get(r, "deadline")?)?,
        error,
        result_ref: get(r, "result_ref")?,
        tags: from_json(&get::<String>(r, "tags_json")?)?,
        metadata: json_text(get(r, "metadata_json")?)?,
        created_at: from_micros(get(r, "created_at")?)?,
        updated_at: from_micros(get(r, "updated_at")?)?,
        started_at: opt_from_micros(get(r, "started_at")?)?,
        finished_at: opt_from_micros(get(r, "finished_at")?)?,
    })
}

/// The values of the job columns, in the order the INSERT below names them: the id, what is
/// fixed at insert, then what an update may change ([`job_update_values`] after its id).
fn job_values(job: &Job) -> StoreResult<Vec<Value>> {
    let mut values = vec![
        Value::Text(job.id.to_string()),
        Value::Text(job.tenant.clone()),
        text(job.principal.as_deref()),
        text(job.session.as_deref()),
        text(job.run_id.map(|u| u.to_string()).as_deref()),
        text(job.parent_id.map(|u| u.to_string()).as_deref()),
        Value::Text(job.kind.clone()),
        text(job.idempotency_key.as_deref()),
        Value::Text(job.input.as_str().to_owned()),
        Value::Integer(micros(job.created_at)),
    ];
    values.extend(job_update_values(job)?.into_iter().skip(1));
    Ok(values)
}

/// The values a job UPDATE writes, in the order [`update_job!`] numbers them: `?1` the id (the
/// guard), then what can change; what is fixed at insert is never rewritten
/// ([`Job::keep_fixed_fields`]), so the primary key and the tenant, idempotency and parent indexes
/// are left alone.
fn job_update_values(job: &Job) -> StoreResult<Vec<Value>> {
    Ok(vec![
        Value::Text(job.id.to_string()),
        Value::Text(job.state.as_str().to_owned()),
        Value::Integer(i64_of(job.version)?),
        Value::Real(job.progress),
        text(job.progress_message.as_deref()),
        Value::Integer(i64::from(job.turns)),
        Value::Integer(i64::from(job.tool_calls)),
        int(job.deadline.map(micros)),
        text(job.error.as_ref().map(|e| e.code.as_str())),
        text(job.error.as_ref().map(|e| e.message.as_str())),
        text(job.result_ref.as_deref()),
        Value::Text(to_json(&job.tags)?),
        Value::Text(job.metadata.as_str().to_owned()),
        Value::Integer(micros(job.updated_at)),
        int(job.started_at.map(micros)),
        int(job.finished_at.map(micros)),
    ])
}

/// The job UPDATE of [`job_update_values`] (then `$tail`: more assignments and the guard, whose
/// parameters start at `?17`).
macro_rules! update_job {
    ($tail:literal) => {
        concat!(
            "UPDATE jobs SET state = ?2, version = ?3, progress = ?4, progress_message = ?5, turns = ?6, \
             tool_calls = ?7, deadline = ?8, error_code = ?9, error_message = ?10, result_ref = ?11, \
             tags_json = ?12, metadata_json = ?13, updated_at = ?14, started_at = ?15, finished_at = ?16",
            $tail
        )
    };
}

/// The job INSERT's columns, up to the request hash (then `$tail`: more columns and the values).
macro_rules! insert_job {
    ($($tail:expr),+) => {
        concat!(
            "INSERT INTO jobs (id, tenant, principal, session, run_id, parent_id, kind, idempotency_key, \
             input_json, created_at, state, version, progress, progress_message, turns, tool_calls, deadline, \
             error_code, error_message, result_ref, tags_json, metadata_json, updated_at, started_at, \
             finished_at, request_hash",
            $($tail),+,
            " ON CONFLICT (tenant, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING"
        )
    };
}

const INSERT_JOB: &str =
    insert_job!(") VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)");

const INSERT_JOB_LEASED: &str = insert_job!(
    ", lease_owner, lease_until, lease_epoch) \
     VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ",
    db_now_micros!(),
    " + ?, 1)"
);

/// Insert `job`, and with `lease = Some((owner, ttl_ms))` give it its first lease (epoch 1,
/// until the database's now + ttl) in the same statement: a job created already claimed.
pub(super) fn insert_job_leased(conn: &Connection, job: &Job, lease: Option<(&str, u64)>) -> StoreResult<()> {
    let mut args = job_values(job)?;
    // The request hash is written once, here: it never changes (updates leave it alone).
    args.push(text(job.request_hash.as_deref()));
    let sql = match lease {
        None => INSERT_JOB,
        Some((owner, ttl_ms)) => {
            args.push(Value::Text(owner.to_owned()));
            args.push(Value::Integer(ttl_micros(ttl_ms)));
            INSERT_JOB_LEASED
        }
    };
    let changed = execute(conn, sql, &args).map_err(|e| conflict_or(e, "job", job.id, be))?;
    if changed == 0 {
        // The unique index on (tenant, idempotency_key) refused it: another writer got there first.
        return Err(StoreError::DuplicateIdempotencyKey {
            tenant: job.tenant.clone(),
            key: job.idempotency_key.clone().unwrap_or_default(),
        });
    }
    Ok(())
}

const UPDATE_JOB: &str = update_job!(" WHERE id = ?1 AND version = ?17");

/// Guarded by version, lease (owner and epoch) and a state that has not ended.
const UPDATE_JOB_FENCED: &str = update_job!(
    " WHERE id = ?1 AND version = ?17 AND lease_owner = ?18 AND lease_epoch = ?19 \
     AND state NOT IN ('SUCCEEDED', 'FAILED', 'CANCELLED', 'TIMED_OUT')"
);

/// [`UPDATE_JOB_FENCED`] that also drops the lease.
const UPDATE_JOB_FENCED_RELEASE: &str = update_job!(
    ", lease_owner = NULL, lease_until = NULL WHERE id = ?1 AND version = ?17 AND lease_owner = ?18 \
     AND lease_epoch = ?19 AND state NOT IN ('SUCCEEDED', 'FAILED', 'CANCELLED', 'TIMED_OUT')"
);

/// Compare-and-set the whole row of `job` from version `expected`; with `fence = Some((guard,
/// release))` only while `guard` holds the job's lease and the job has not ended (else
/// `Conflict { entity: "lease" }`, as a separate `check_lease` would say), dropping the lease in
/// the same statement if `release`: one statement for the usual "last write of a step".
pub(super) fn update_job_fenced(
    conn: &Connection,
    job: &Job,
    expected: u64,
    fence: Option<(&LeaseGuard, bool)>,
) -> StoreResult<()> {
    let sql = match fence {
        None => UPDATE_JOB,
        Some((_, false)) => UPDATE_JOB_FENCED,
        Some((_, true)) => UPDATE_JOB_FENCED_RELEASE,
    };
    let mut args = job_update_values(job)?;
    args.push(Value::Integer(i64_of(expected)?));
    if let Some((guard, _)) = fence {
        args.push(Value::Text(guard.owner.clone()));
        args.push(Value::Integer(i64_of(guard.epoch)?));
    }
    if execute(conn, sql, &args).map_err(be)? == 0 {
        if let Some((guard, _)) = fence {
            check_lease(conn, guard)?;
        }
        return Err(missing_or_conflict(conn, "jobs", "job", job.id));
    }
    Ok(())
}

pub(super) fn push_job_filter(q: &mut Query, f: &JobFilter) {
    q.push(" WHERE tenant = ").bind(f.tenant.clone());
    q.push_in("state", f.states.iter().map(|v| v.as_str().to_string()));
    q.push_subject(f.principal.as_deref(), f.session.as_deref());
    if let Some(p) = f.parent_id {
        q.push(" AND parent_id = ").bind(p.to_string());
    }
    if let Some(k) = &f.kind {
        q.push(" AND kind = ").bind(k.clone());
    }
    if let Some((at, id)) = f.before {
        // The row value compares like the list's ORDER BY (created_at DESC, id DESC).
        q.push(" AND (created_at, id) < (")
            .bind(micros(at))
            .push(", ")
            .bind(id.to_string())
            .push(")");
    }
    if let Some(t) = &f.tag {
        q.push(" AND EXISTS (SELECT 1 FROM json_each(jobs.tags_json) WHERE json_each.value = ")
            .bind(t.clone());
        q.push(")");
    }
}

/// [`KernelStore::get_job`](keel_kernel::store::KernelStore::get_job).
pub(super) fn get_job(conn: &Connection, id: Uuid) -> StoreResult<Option<Job>> {
    fetch_optional(
        conn,
        "SELECT * FROM jobs WHERE id = ?",
        &[Value::Text(id.to_string())],
        job_from_row,
    )
}

/// [`KernelStore::get_job_by_key`](keel_kernel::store::KernelStore::get_job_by_key).
pub(super) fn get_job_by_key(conn: &Connection, tenant: &str, key: &str) -> StoreResult<Option<Job>> {
    fetch_optional(
        conn,
        "SELECT * FROM jobs WHERE tenant = ? AND idempotency_key = ?",
        &[Value::Text(tenant.to_owned()), Value::Text(key.to_owned())],
        job_from_row,
    )
}

/// [`KernelStore::list_jobs`](keel_kernel::store::KernelStore::list_jobs).
pub(super) fn list_jobs(conn: &Connection, filter: &JobFilter) -> StoreResult<Vec<Job>> {
    let mut q = Query::new("SELECT * FROM jobs");
    push_job_filter(&mut q, filter);
    q.push(" ORDER BY created_at DESC, id DESC");
    q.push_limit(filter.limit);
    q.fetch(conn, job_from_row)
}

/// [`KernelStore::count_jobs`](keel_kernel::store::KernelStore::count_jobs).
pub(super) fn count_jobs(conn: &Connection, filter: &JobFilter) -> StoreResult<u64> {
    let mut q = Query::new("SELECT COUNT(*) AS n FROM jobs");
    push_job_filter(&mut q, filter);
    let n = q.fetch(conn, |r| get::<i64>(r, "n"))?;
    u64_of(n.first().copied().unwrap_or(0))
}

/// [`KernelStore::overdue_jobs`](keel_kernel::store::KernelStore::overdue_jobs).
pub(super) fn overdue_jobs(conn: &Connection, now: DateTime<Utc>, limit: u32) -> StoreResult<Vec<Job>> {
    let mut q = Query::new(
        "SELECT * FROM jobs WHERE deadline IS NOT NULL AND state IN ('QUEUED', 'RUNNING', 'WAITING_ACTION') \
         AND deadline <= ",
    );
    q.bind(micros(now)).push(" ORDER BY deadline, id");
    q.push_limit(Some(limit));
    q.fetch(conn, job_from_row)
}
