//! [`KernelStore::commit`]: one `BEGIN IMMEDIATE` transaction applying a whole [`Batch`].

use std::collections::HashMap;

use keel_kernel::event::{NewEvent, RuntimeEvent};
use keel_kernel::store::{Batch, StoreError, StoreResult};
use sqlx::sqlite::SqliteConnection;
use sqlx::{QueryBuilder, Sqlite};
use uuid::Uuid;

use super::SqliteKernelStore;
use super::actions::{insert_action, update_action};
use super::jobs::{insert_job_leased, update_job_fenced};
use super::journal::insert_journal;
use super::leases::{check_lease, release_lease_in};
use super::ledger::{hold_in, settle_in};
use super::rows::{
    be, db_now_micros, get, i64_of, job_ref_error, micros, missing_or_conflict, to_json, ttl_micros, u64_of,
};

impl SqliteKernelStore {
    pub(super) async fn commit_batch(&self, batch: Batch) -> StoreResult<Vec<RuntimeEvent>> {
        let mut tx = self.begin().await?;
        // Round trips to the database thread are what a batch costs beyond its commit, so the
        // usual shapes are folded into fewer statements (same checks, same outcome):
        // - a step's last write (one job row under one lease guard, possibly released with it):
        //   guard, update and release in one UPDATE;
        // - a job inserted already claimed: the lease in the INSERT (epoch 1);
        // - the events, and each plan's ledger entries, in one INSERT each.
        let fenced = match (&batch.jobs[..], &batch.leases[..]) {
            ([w], [g]) if w.expected_version.is_some() && w.job.id == g.job_id => {
                let release = batch.lease_releases.iter().any(|r| r == g);
                Some((g, release))
            }
            _ => None,
        };
        if fenced.is_none() {
            // Fencing first, against the rows as they were before this batch.
            for g in &batch.leases {
                check_lease(&mut tx, g).await?;
            }
        }
        let mut claimed_at_insert = Vec::new();
        for w in &batch.jobs {
            match w.expected_version {
                None => {
                    let claim = batch
                        .claims
                        .iter()
                        .find(|c| c.job_id == w.job.id && !claimed_at_insert.contains(&c.job_id));
                    insert_job_leased(&mut tx, &w.job, claim.map(|c| (c.owner.as_str(), c.ttl_ms))).await?;
                    if claim.is_some() {
                        claimed_at_insert.push(w.job.id);
                    }
                }
                Some(v) => update_job_fenced(&mut tx, &w.job, v, fenced).await?,
            }
        }
        for w in &batch.actions {
            match w.expected_version {
                None => insert_action(&mut tx, &w.action).await?,
                Some(v) => update_action(&mut tx, &w.action, v).await?,
            }
        }
        let mut folded = claimed_at_insert.clone();
        for c in &batch.claims {
            if let Some(i) = folded.iter().position(|id| *id == c.job_id) {
                folded.swap_remove(i);
                continue;
            }
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
        let inserted: Vec<_> = batch
            .jobs
            .iter()
            .filter(|w| w.expected_version.is_none())
            .map(|w| w.job.id)
            .collect();
        let out = insert_events(&mut tx, batch.events, &inserted).await?;
        for g in &batch.lease_releases {
            if fenced.is_some_and(|(f, release)| release && f == g) {
                continue;
            }
            release_lease_in(&mut tx, g).await?;
        }
        tx.commit().await.map_err(be)?;
        Ok(out)
    }
}

/// Append `events`, each with the next sequence number of its job, in one INSERT (plus one
/// `MAX(seq)` read per job that existed before the batch; a job `inserted` by it starts at 0).
/// Safe under BEGIN IMMEDIATE: no other writer can append to these jobs meanwhile.
async fn insert_events(
    conn: &mut SqliteConnection,
    events: Vec<NewEvent>,
    inserted: &[Uuid],
) -> StoreResult<Vec<RuntimeEvent>> {
    if events.is_empty() {
        return Ok(vec![]);
    }
    let mut next: HashMap<Uuid, u64> = HashMap::new();
    let mut rows = Vec::with_capacity(events.len());
    for e in &events {
        let seq = match next.get_mut(&e.job_id) {
            Some(seq) => seq,
            None => {
                let last = if inserted.contains(&e.job_id) {
                    0
                } else {
                    let row = sqlx::query("SELECT COALESCE(MAX(seq), 0) AS seq FROM events WHERE job_id = ?")
                        .bind(e.job_id.to_string())
                        .fetch_one(&mut *conn)
                        .await
                        .map_err(be)?;
                    u64_of(get(&row, "seq")?)?
                };
                next.entry(e.job_id).or_insert(last)
            }
        };
        *seq += 1;
        rows.push((e, i64_of(*seq)?, to_json(&e.data)?));
    }
    let seqs: Vec<i64> = rows.iter().map(|(_, seq, _)| *seq).collect();
    let mut qb = QueryBuilder::<Sqlite>::new("INSERT INTO events (job_id, tenant, seq, event_type, data_json, at) ");
    qb.push_values(rows, |mut b, (e, seq, data)| {
        b.push_bind(e.job_id.to_string())
            .push_bind(e.tenant.clone())
            .push_bind(seq)
            .push_bind(e.event_type.as_str())
            .push_bind(data)
            .push_bind(micros(e.at));
    });
    qb.push(" RETURNING id, job_id, seq");
    let returned = qb
        .build()
        .fetch_all(&mut *conn)
        .await
        .map_err(|err| job_ref_error(err, events[0].job_id))?;
    // RETURNING gives no order: match rows back by (job, seq), unique per job.
    let mut ids: HashMap<(String, i64), i64> = HashMap::with_capacity(returned.len());
    for row in &returned {
        ids.insert((get(row, "job_id")?, get(row, "seq")?), get(row, "id")?);
    }
    let mut out = Vec::with_capacity(events.len());
    for (e, seq) in events.into_iter().zip(seqs) {
        let id = ids
            .get(&(e.job_id.to_string(), seq))
            .copied()
            .ok_or_else(|| StoreError::Corrupt(format!("event {seq} of job {} was not returned", e.job_id)))?;
        out.push(RuntimeEvent {
            id,
            seq: u64_of(seq)?,
            job_id: e.job_id,
            tenant: e.tenant,
            event_type: e.event_type,
            data: e.data,
            at: e.at,
        });
    }
    Ok(out)
}
