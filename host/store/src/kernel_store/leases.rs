//! Leases: claiming jobs (fencing epochs on the database clock), renewing, releasing, checking a guard.

use keel_kernel::job::{Job, JobState};
use keel_kernel::store::{ClaimRequest, Lease, LeaseGuard, StoreError, StoreResult};
use sqlx::sqlite::SqliteConnection;
use sqlx::{QueryBuilder, Sqlite};
use uuid::Uuid;

use super::SqliteKernelStore;
use super::jobs::job_from_row;
use super::rows::{be, db_now_micros, from_micros, get, i64_of, micros, parse, push_in, ttl_micros, u64_of};

/// `Conflict { entity: "lease" }` unless `g` holds its job's lease (owner and epoch) and the job
/// has not ended.
pub(super) async fn check_lease(conn: &mut SqliteConnection, g: &LeaseGuard) -> StoreResult<()> {
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

/// Drop the lease if `g` (owner and epoch) holds it; whether it did. Keeps the epoch counter.
pub(super) async fn release_lease_in(conn: &mut SqliteConnection, g: &LeaseGuard) -> StoreResult<bool> {
    let res = sqlx::query(
        "UPDATE jobs SET lease_owner = NULL, lease_until = NULL WHERE id = ? AND lease_owner = ? AND lease_epoch = ?",
    )
    .bind(g.job_id.to_string())
    .bind(g.owner.clone())
    .bind(i64_of(g.epoch)?)
    .execute(&mut *conn)
    .await
    .map_err(be)?;
    Ok(res.rows_affected() == 1)
}

impl SqliteKernelStore {
    pub(super) async fn claim_tx(&self, req: ClaimRequest) -> StoreResult<Vec<Job>> {
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

    /// [`KernelStore::renew_lease`].
    pub(super) async fn sql_renew_lease(&self, guard: &LeaseGuard, ttl_ms: u64) -> StoreResult<bool> {
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
    }

    /// [`KernelStore::release_lease`].
    pub(super) async fn sql_release_lease(&self, guard: &LeaseGuard) -> StoreResult<bool> {
        let mut conn = self.pool.acquire().await.map_err(be)?;
        release_lease_in(&mut conn, guard).await
    }

    /// [`KernelStore::get_lease`].
    pub(super) async fn sql_get_lease(&self, job_id: Uuid) -> StoreResult<Option<Lease>> {
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
    }
}
