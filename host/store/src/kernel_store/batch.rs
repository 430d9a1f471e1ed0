//! [`KernelStore::commit`](keel_kernel::store::KernelStore::commit): one `BEGIN IMMEDIATE`
//! transaction applying a whole [`Batch`].

use keel_kernel::event::RuntimeEvent;
use keel_kernel::ledger::{NewLedgerEvent, SettleRequest};
use keel_kernel::store::{Batch, StoreResult};
use rusqlite::Connection;

use super::actions::{insert_action, update_action};
use super::events::insert_events;
use super::jobs::{insert_job_leased, update_job_fenced};
use super::journal::insert_journal;
use super::leases::{check_lease, claim_free, release_lease};
use super::ledger::{hold_in, insert_ledger_many, settle_in};
use super::policy_texts::insert_policy_text;
use super::rows::missing_or_conflict;

/// Apply `batch` inside the caller's transaction (all or nothing: an error rolls it back).
pub(super) fn commit(conn: &Connection, batch: Batch) -> StoreResult<Vec<RuntimeEvent>> {
    // The usual shapes take fewer statements (same checks, same outcome):
    // - a step's last write (one job row under one lease guard, possibly released with it):
    //   guard, update and release in one UPDATE;
    // - a job inserted already claimed: the lease in the INSERT (epoch 1).
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
            check_lease(conn, g)?;
        }
    }
    for text in &batch.policy_texts {
        insert_policy_text(conn, text)?;
    }
    let mut claimed_at_insert = Vec::new();
    for w in &batch.jobs {
        match w.expected_version {
            None => {
                let claim = batch
                    .claims
                    .iter()
                    .find(|c| c.job_id == w.job.id && !claimed_at_insert.contains(&c.job_id));
                insert_job_leased(conn, &w.job, claim.map(|c| (c.owner.as_str(), c.ttl_ms)))?;
                if claim.is_some() {
                    claimed_at_insert.push(w.job.id);
                }
            }
            Some(v) => update_job_fenced(conn, &w.job, v, fenced)?,
        }
    }
    for w in &batch.actions {
        match w.expected_version {
            None => insert_action(conn, &w.action)?,
            Some(v) => update_action(conn, &w.action, v)?,
        }
    }
    let mut folded = claimed_at_insert;
    for c in &batch.claims {
        if let Some(i) = folded.iter().position(|id| *id == c.job_id) {
            folded.swap_remove(i);
            continue;
        }
        if !claim_free(conn, c.job_id, &c.owner, c.ttl_ms)? {
            return Err(missing_or_conflict(conn, "jobs", "lease", c.job_id));
        }
    }
    // A hold settled by the same batch (a call committed once, after it ran) is inserted settled;
    // its settlement's entries are still appended where the batch settles, so the ledger reads as
    // if the hold had been inserted and then settled.
    let mut settlements: Vec<Option<SettleRequest>> = batch.settlements.into_iter().map(Some).collect();
    let mut settled_with_hold: Vec<Vec<NewLedgerEvent>> = settlements.iter().map(|_| Vec::new()).collect();
    for h in &batch.holds {
        let same = settlements
            .iter()
            .position(|s| s.as_ref().is_some_and(|s| s.reservation_id == h.id));
        let entries = hold_in(conn, h, same.and_then(|i| settlements[i].take()))?;
        if let Some(i) = same {
            settled_with_hold[i] = entries;
        }
    }
    for j in &batch.journal {
        insert_journal(conn, j)?;
    }
    for (settlement, entries) in settlements.into_iter().zip(settled_with_hold) {
        match settlement {
            Some(req) => {
                settle_in(conn, req)?;
            }
            None => insert_ledger_many(conn, &entries)?,
        }
    }
    let inserted: Vec<_> = batch
        .jobs
        .iter()
        .filter(|w| w.expected_version.is_none())
        .map(|w| w.job.id)
        .collect();
    let out = insert_events(conn, batch.events, &inserted)?;
    for g in &batch.lease_releases {
        if fenced.is_some_and(|(f, release)| release && f == g) {
            continue;
        }
        release_lease(conn, g)?;
    }
    Ok(out)
}
