//! Leases: claiming jobs (fencing epochs on the database clock), renewing, releasing, checking a guard.

use keel_kernel::job::{Job, JobState};
use keel_kernel::store::{ClaimRequest, Lease, LeaseGuard, StoreError, StoreResult};
use rusqlite::Connection;
use rusqlite::types::Value;
use uuid::Uuid;

use super::jobs::job_from_row;
use super::rows::{
    Query, be, db_now_micros, execute, fetch_optional, from_micros, get, i64_of, micros, parse, ttl_micros, u64_of,
};

/// `Conflict { entity: "lease" }` unless `g` holds its job's lease (owner and epoch) and the job
/// has not ended.
pub(super) fn check_lease(conn: &Connection, g: &LeaseGuard) -> StoreResult<()> {
    let row = fetch_optional(
        conn,
        "SELECT lease_owner, lease_epoch, state FROM jobs WHERE id = ?",
        &[Value::Text(g.job_id.to_string())],
        |r| {
            Ok((
                get::<Option<String>>(r, "lease_owner")?,
                get::<i64>(r, "lease_epoch")?,
                get::<String>(r, "state")?,
            ))
        },
    )?;
    let holds = match row {
        Some((owner, epoch, state)) => {
            owner.as_deref() == Some(g.owner.as_str())
                && u64_of(epoch)? == g.epoch
                && !parse::<JobState>(&state)?.is_terminal()
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

/// Drop the lease if `g` (owner and epoch) holds it; whether it did. Keeps the epoch counter.
pub(super) fn release_lease(conn: &Connection, g: &LeaseGuard) -> StoreResult<bool> {
    let changed = execute(
        conn,
        "UPDATE jobs SET lease_owner = NULL, lease_until = NULL WHERE id = ? AND lease_owner = ? AND lease_epoch = ?",
        &[
            Value::Text(g.job_id.to_string()),
            Value::Text(g.owner.clone()),
            Value::Integer(i64_of(g.epoch)?),
        ],
    )
    .map_err(be)?;
    Ok(changed == 1)
}

/// Lease job `job_id` to `owner` for `ttl_ms` if its lease is free (a [`keel_kernel::store::Batch`]
/// claim); whether it did.
pub(super) fn claim_free(conn: &Connection, job_id: Uuid, owner: &str, ttl_ms: u64) -> StoreResult<bool> {
    const SQL: &str = concat!(
        "UPDATE jobs SET lease_owner = ?, lease_until = ",
        db_now_micros!(),
        " + ?, lease_epoch = lease_epoch + 1 WHERE id = ? AND (lease_until IS NULL OR lease_until <= ",
        db_now_micros!(),
        ")"
    );
    let args = [
        Value::Text(owner.to_owned()),
        Value::Integer(ttl_micros(ttl_ms)),
        Value::Text(job_id.to_string()),
    ];
    Ok(execute(conn, SQL, &args).map_err(be)? == 1)
}

/// [`KernelStore::claim_jobs`](keel_kernel::store::KernelStore::claim_jobs), inside a transaction.
pub(super) fn claim(conn: &Connection, req: &ClaimRequest) -> StoreResult<Vec<Job>> {
    let mut q = Query::new(concat!(
        "SELECT * FROM jobs WHERE state IN ('QUEUED', 'RUNNING') AND (lease_until IS NULL OR lease_until <= ",
        db_now_micros!(),
        ")"
    ));
    q.push_in("kind", req.kinds.iter().cloned());
    if let Some(id) = req.job_id {
        q.push(" AND id = ").bind(id.to_string());
    }
    q.push(" ORDER BY created_at, id LIMIT ").bind(i64::from(req.limit));
    let candidates = q.fetch(conn, job_from_row)?;
    const TAKE: &str = concat!(
        "UPDATE jobs SET lease_owner = ?, lease_until = ",
        db_now_micros!(),
        " + ?, lease_epoch = lease_epoch + 1, version = version + 1, updated_at = ? WHERE id = ? AND version = ?"
    );
    let mut out = Vec::with_capacity(candidates.len());
    for mut job in candidates {
        let args = [
            Value::Text(req.owner.clone()),
            Value::Integer(ttl_micros(req.ttl_ms)),
            Value::Integer(micros(req.now)),
            Value::Text(job.id.to_string()),
            Value::Integer(i64_of(job.version)?),
        ];
        if execute(conn, TAKE, &args).map_err(be)? == 1 {
            job.version += 1;
            job.updated_at = req.now;
            out.push(job);
        }
    }
    Ok(out)
}

/// [`KernelStore::renew_lease`](keel_kernel::store::KernelStore::renew_lease).
pub(super) fn renew_lease(conn: &Connection, guard: &LeaseGuard, ttl_ms: u64) -> StoreResult<bool> {
    const SQL: &str = concat!(
        "UPDATE jobs SET lease_until = MAX(COALESCE(lease_until, 0), ",
        db_now_micros!(),
        " + ?) WHERE id = ? AND lease_owner = ? AND lease_epoch = ?"
    );
    let args = [
        Value::Integer(ttl_micros(ttl_ms)),
        Value::Text(guard.job_id.to_string()),
        Value::Text(guard.owner.clone()),
        Value::Integer(i64_of(guard.epoch)?),
    ];
    Ok(execute(conn, SQL, &args).map_err(be)? == 1)
}

/// [`KernelStore::get_lease`](keel_kernel::store::KernelStore::get_lease).
pub(super) fn get_lease(conn: &Connection, job_id: Uuid) -> StoreResult<Option<Lease>> {
    let row = fetch_optional(
        conn,
        "SELECT lease_owner, lease_until, lease_epoch FROM jobs WHERE id = ?",
        &[Value::Text(job_id.to_string())],
        |r| {
            Ok((
                get::<Option<String>>(r, "lease_owner")?,
                get::<Option<i64>>(r, "lease_until")?,
                get::<i64>(r, "lease_epoch")?,
            ))
        },
    )?;
    match row {
        Some((Some(owner), Some(until), epoch)) => Ok(Some(Lease {
            owner,
            until: from_micros(until)?,
            epoch: u64_of(epoch)?,
        })),
        _ => Ok(None),
    }
}
