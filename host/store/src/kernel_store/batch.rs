//! [`KernelStore::commit`]: one `BEGIN IMMEDIATE` transaction applying a whole [`Batch`].

use keel_kernel::event::RuntimeEvent;
use keel_kernel::store::{Batch, StoreResult};

use super::SqliteKernelStore;
use super::actions::{insert_action, update_action};
use super::jobs::{insert_job, update_job};
use super::journal::insert_journal;
use super::leases::{check_lease, release_lease_in};
use super::ledger::{hold_in, settle_in};
use super::rows::{be, db_now_micros, get, job_ref_error, micros, missing_or_conflict, to_json, ttl_micros, u64_of};

impl SqliteKernelStore {
    pub(super) async fn commit_batch(&self, batch: Batch) -> StoreResult<Vec<RuntimeEvent>> {
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
        for h in &batch.holds {
            hold_in(&mut tx, h).await?;
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
        for g in &batch.lease_releases {
            release_lease_in(&mut tx, g).await?;
        }
        tx.commit().await.map_err(be)?;
        Ok(out)
    }
}
