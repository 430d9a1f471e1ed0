//! Jobs: rows, inserts and compare-and-set updates, and the job queries.

use chrono::{DateTime, Utc};
use keel_kernel::job::{Job, JobError, JobFilter, JobState};
use keel_kernel::store::{LeaseGuard, StoreError, StoreResult};
use sqlx::sqlite::{SqliteConnection, SqliteRow};
use sqlx::{QueryBuilder, Sqlite};
use uuid::Uuid;

use super::SqliteKernelStore;
use super::leases::check_lease;
use super::rows::{
    SqliteQuery, be, corrupt, db_now_micros, from_json, from_micros, get, i64_of, micros, missing_or_conflict,
    opt_from_micros, opt_uuid, parse, push_in, push_limit, push_subject, to_json, ttl_micros, u64_of, uuid,
};

pub(super) fn job_from_row(r: &SqliteRow) -> StoreResult<Job> {
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

pub(super) const JOB_COLUMNS: &str = "id, tenant, principal, session, run_id, parent_id, kind, state, version, idempotency_key, \
     input_json, progress, progress_message, turns, tool_calls, deadline, error_code, error_message, result_ref, \
     tags_json, metadata_json, created_at, updated_at, started_at, finished_at";

/// Insert `job`, and with `lease = Some((owner, ttl_ms))` give it its first lease (epoch 1,
/// until the database's now + ttl) in the same statement: a job created already claimed.
pub(super) async fn insert_job_leased(
    conn: &mut SqliteConnection,
    job: &Job,
    lease: Option<(&str, u64)>,
) -> StoreResult<()> {
    let sql = match lease {
        None => format!(
            "INSERT INTO jobs ({JOB_COLUMNS}, request_hash) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) \
             ON CONFLICT (tenant, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING"
        ),
        Some(_) => format!(
            "INSERT INTO jobs ({JOB_COLUMNS}, request_hash, lease_owner, lease_until, lease_epoch) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, {} + ?, 1) \
             ON CONFLICT (tenant, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING",
            db_now_micros!()
        ),
    };
    // The request hash is written once, here: it never changes (updates leave it alone).
    let mut q = bind_job(sqlx::query(sqlx::AssertSqlSafe(sql)), job)?.bind(job.request_hash.clone());
    if let Some((owner, ttl_ms)) = lease {
        q = q.bind(owner.to_string()).bind(ttl_micros(ttl_ms));
    }
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

pub(super) fn bind_job<'q>(q: SqliteQuery<'q>, job: &Job) -> StoreResult<SqliteQuery<'q>> {
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

/// Compare-and-set the whole row of `job` from version `expected`; with `fence = Some((guard, release))` only while `guard` holds the job's
/// lease and the job has not ended (else `Conflict { entity: "lease" }`, as a separate
/// `check_lease` would say), dropping the lease in the same statement if `release`. One statement
/// instead of three for the usual "last write of a step" batch.
pub(super) async fn update_job_fenced(
    conn: &mut SqliteConnection,
    job: &Job,
    expected: u64,
    fence: Option<(&LeaseGuard, bool)>,
) -> StoreResult<()> {
    // Every column is rewritten; the WHERE on version makes it a compare-and-set.
    const SET: &str = "UPDATE jobs SET id = ?1, tenant = ?2, principal = ?3, session = ?4, run_id = ?5, parent_id = ?6, \
         kind = ?7, state = ?8, version = ?9, idempotency_key = ?10, input_json = ?11, progress = ?12, \
         progress_message = ?13, turns = ?14, tool_calls = ?15, deadline = ?16, error_code = ?17, \
         error_message = ?18, result_ref = ?19, tags_json = ?20, metadata_json = ?21, created_at = ?22, \
         updated_at = ?23, started_at = ?24, finished_at = ?25";
    let sql = match fence {
        None => format!("{SET} WHERE id = ?1 AND version = ?26"),
        Some((_, release)) => format!(
            "{SET}{} WHERE id = ?1 AND version = ?26 AND lease_owner = ?27 AND lease_epoch = ?28 \
             AND state NOT IN ('SUCCEEDED', 'FAILED', 'CANCELLED', 'TIMED_OUT')",
            if release {
                ", lease_owner = NULL, lease_until = NULL"
            } else {
                ""
            }
        ),
    };
    let mut q = bind_job(sqlx::query(sqlx::AssertSqlSafe(sql)), job)?.bind(i64_of(expected)?);
    if let Some((guard, _)) = fence {
        q = q.bind(guard.owner.clone()).bind(i64_of(guard.epoch)?);
    }
    let res = q.execute(&mut *conn).await.map_err(be)?;
    if res.rows_affected() == 0 {
        if let Some((guard, _)) = fence {
            check_lease(conn, guard).await?;
        }
        return Err(missing_or_conflict(conn, "jobs", "job", job.id).await);
    }
    Ok(())
}

pub(super) fn push_job_filter(qb: &mut QueryBuilder<Sqlite>, f: &JobFilter) {
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

impl SqliteKernelStore {
    pub(super) async fn fetch_jobs(&self, qb: &mut QueryBuilder<Sqlite>) -> StoreResult<Vec<Job>> {
        let rows = qb.build().fetch_all(&self.pool).await.map_err(be)?;
        rows.iter().map(job_from_row).collect()
    }

    /// [`KernelStore::get_job`].
    pub(super) async fn sql_get_job(&self, id: Uuid) -> StoreResult<Option<Job>> {
        let row = sqlx::query("SELECT * FROM jobs WHERE id = ?")
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await
            .map_err(be)?;
        row.as_ref().map(job_from_row).transpose()
    }

    /// [`KernelStore::get_job_by_key`].
    pub(super) async fn sql_get_job_by_key(&self, tenant: &str, key: &str) -> StoreResult<Option<Job>> {
        let row = sqlx::query("SELECT * FROM jobs WHERE tenant = ? AND idempotency_key = ?")
            .bind(tenant.to_string())
            .bind(key.to_string())
            .fetch_optional(&self.pool)
            .await
            .map_err(be)?;
        row.as_ref().map(job_from_row).transpose()
    }

    /// [`KernelStore::list_jobs`].
    pub(super) async fn sql_list_jobs(&self, filter: &JobFilter) -> StoreResult<Vec<Job>> {
        let mut qb = QueryBuilder::<Sqlite>::new("SELECT * FROM jobs");
        push_job_filter(&mut qb, filter);
        qb.push(" ORDER BY created_at DESC, id DESC");
        push_limit(&mut qb, filter.limit);
        self.fetch_jobs(&mut qb).await
    }

    /// [`KernelStore::count_jobs`].
    pub(super) async fn sql_count_jobs(&self, filter: &JobFilter) -> StoreResult<u64> {
        let mut qb = QueryBuilder::<Sqlite>::new("SELECT COUNT(*) AS n FROM jobs");
        push_job_filter(&mut qb, filter);
        let row = qb.build().fetch_one(&self.pool).await.map_err(be)?;
        u64_of(get(&row, "n")?)
    }

    /// [`KernelStore::overdue_jobs`].
    pub(super) async fn sql_overdue_jobs(&self, now: DateTime<Utc>, limit: u32) -> StoreResult<Vec<Job>> {
        let mut qb = QueryBuilder::<Sqlite>::new(
            "SELECT * FROM jobs WHERE deadline IS NOT NULL AND state IN ('QUEUED', 'RUNNING', 'WAITING_ACTION') \
             AND deadline <= ",
        );
        qb.push_bind(micros(now)).push(" ORDER BY deadline, id");
        push_limit(&mut qb, Some(limit));
        self.fetch_jobs(&mut qb).await
    }
}
