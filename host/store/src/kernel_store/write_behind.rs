//! Write-behind of batches that cannot be refused ([`Batch::deferrable`]: a direct call's one
//! commit).
//!
//! Such a batch writes a dozen b-trees (the job's table and indexes, its events', journal's,
//! ledger's and hold's), which was most of a one-commit call's time with a durable store. Here it
//! is committed as one record appended to `pending_writes` (one small b-tree write, durable as
//! any commit) and its rows reach their tables later, in order, by [`drain`]:
//! - at the start of every other write transaction, in the same transaction (so nothing is ever
//!   written over, or next to, tables that lack a pending record's rows: event ids, budget
//!   totals and per-job sequences stay exactly as if each batch had been applied when committed);
//! - before every read of the tables a record writes to (see `Connections::settle`), so readers,
//!   in this process or another, never see a committed call missing;
//! - in the background, soon after a burst of appends (`Connections`'s write-behind thread), and
//!   when the store is dropped.
//!
//! What the commit returns is decided at append: the events' ids (after the largest id in
//! `events` and in pending records) and sequences (1, 2, ... of the new job), which [`drain`]
//! inserts as they are.

use keel_kernel::event::{EventType, RuntimeEvent};
use keel_kernel::job::Job;
use keel_kernel::json::JsonText;
use keel_kernel::ledger::{LedgerKind, ReserveRequest, SettleRequest, Usage};
use keel_kernel::store::{Batch, HoldWrite, JobWrite, NewJournalEntry, PolicyText, StoreResult};
use rusqlite::Connection;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use uuid::Uuid;

use super::events::insert_events_as;
use super::rows::{be, corrupt, micros};

/// The format of a pending record; a record of another is refused (not guessed at).
const FORMAT: u32 = 1;

/// Records applied per transaction by [`drain`] when asked for a bounded amount.
pub(super) const DRAIN_CHUNK: usize = 64;

/// Whether the store may append `batch` instead of applying it: it says it may, and it is of the
/// shape that makes that safe (see [`Batch::deferrable`]): nothing in it can be refused by rows
/// it does not write itself.
pub(super) fn qualifies(batch: &Batch) -> bool {
    let [
        JobWrite {
            job,
            expected_version: None,
        },
    ] = &batch.jobs[..]
    else {
        return false;
    };
    batch.deferrable
        && job.idempotency_key.is_none()
        && job.state.is_terminal()
        && batch.actions.is_empty()
        && batch.leases.is_empty()
        && batch.claims.is_empty()
        && batch.lease_releases.is_empty()
        && batch
            .events
            .iter()
            .all(|e| e.job_id == job.id && e.tenant == job.tenant)
        && batch.journal.iter().all(|j| j.job_id == job.id)
        && batch.holds.len() == batch.settlements.len()
        && batch
            .holds
            .iter()
            .all(|h| !h.check_budgets && h.request.job_id == Some(job.id))
        && batch
            .settlements
            .iter()
            .all(|s| batch.holds.iter().any(|h| h.id == s.reservation_id))
}

/// Append `batch` (which [`qualifies`]) as one pending record; the events it will insert, with
/// their ids and sequences.
pub(super) fn append(conn: &Connection, mut batch: Batch) -> StoreResult<Vec<RuntimeEvent>> {
    let last_id: i64 = conn
        .prepare_cached(
            "SELECT MAX(COALESCE((SELECT MAX(id) FROM events), 0), \
             COALESCE((SELECT last_event_id FROM pending_writes ORDER BY seq DESC LIMIT 1), 0))",
        )
        .and_then(|mut s| s.query_row([], |r| r.get(0)))
        .map_err(be)?;
    let Some(JobWrite { mut job, .. }) = batch.jobs.pop() else {
        return Err(corrupt("a deferred batch without its job"));
    };
    let events: Vec<RuntimeEvent> = batch
        .events
        .into_iter()
        .zip(1..)
        .map(|(e, n)| RuntimeEvent {
            id: last_id + n,
            seq: n as u64,
            job_id: e.job_id,
            tenant: e.tenant,
            event_type: e.event_type,
            data: e.data,
            at: e.at,
        })
        .collect();
    // The JSON documents go into the record as they are (not through a tree, which would reorder
    // keys and round numbers beyond 64 bits): beside the job, not in it.
    let input = std::mem::take(&mut job.input);
    let metadata = std::mem::take(&mut job.metadata);
    let record = Record {
        format: FORMAT,
        job: &job,
        input: &input,
        metadata: &metadata,
        events: &events,
        journal: &batch.journal,
        holds: batch.holds.iter().map(|h| (h.id, &h.request)).collect(),
        settlements: &batch.settlements,
        policy_texts: batch.policy_texts.iter().map(PolicyText::text).collect(),
    };
    let text = serde_json::to_string(&record).map_err(|e| corrupt(format!("a pending record: {e}")))?;
    let last_event_id = events.last().map_or(last_id, |e| e.id);
    conn.prepare_cached("INSERT INTO pending_writes (last_event_id, record) VALUES (?, ?)")
        .and_then(|mut s| s.execute((last_event_id, &text)))
        .map_err(be)?;
    Ok(events)
}

/// Whether any record is pending.
pub(super) fn pending(conn: &Connection) -> StoreResult<bool> {
    conn.prepare_cached("SELECT EXISTS (SELECT 1 FROM pending_writes)")
        .and_then(|mut s| s.query_row([], |r| r.get(0)))
        .map_err(be)
}

/// Apply up to `limit` pending records (all with `None`), oldest first, inside the caller's
/// write transaction, and remove them; how many there were. A record that cannot be applied (a
/// defect: nothing should refuse one) is moved to `failed_writes` with its error and logged, so
/// that it does not block every later write; its rows are then missing from the tables.
pub(super) fn drain(conn: &Connection, limit: Option<usize>) -> StoreResult<usize> {
    let limit = limit.map_or(-1, |n| i64::try_from(n).unwrap_or(i64::MAX));
    let records: Vec<(i64, String)> = conn
        .prepare_cached("SELECT seq, record FROM pending_writes ORDER BY seq LIMIT ?")
        .and_then(|mut s| {
            s.query_map([limit], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<Result<_, _>>()
        })
        .map_err(be)?;
    let Some((last, _)) = records.last() else {
        return Ok(0);
    };
    let last = *last;
    for (seq, text) in &records {
        conn.execute_batch("SAVEPOINT pending_write").map_err(be)?;
        match apply(conn, text) {
            Ok(()) => conn.execute_batch("RELEASE pending_write").map_err(be)?,
            Err(e) => {
                conn.execute_batch("ROLLBACK TO pending_write; RELEASE pending_write")
                    .map_err(be)?;
                tracing::error!(seq, error = %e, "a pending write could not be applied; kept in failed_writes");
                conn.prepare_cached("INSERT INTO failed_writes (seq, record, error, failed_at) VALUES (?, ?, ?, ?)")
                    .and_then(|mut s| s.execute((seq, text, e.to_string(), micros(chrono::Utc::now()))))
                    .map_err(be)?;
            }
        }
    }
    conn.prepare_cached("DELETE FROM pending_writes WHERE seq <= ?")
        .and_then(|mut s| s.execute([last]))
        .map_err(be)?;
    Ok(records.len())
}

/// Write one record's rows to their tables, as the batch it came from would have been written.
fn apply(conn: &Connection, text: &str) -> StoreResult<()> {
    let record: RecordIn<'_> = serde_json::from_str(text).map_err(|e| corrupt(format!("a pending record: {e}")))?;
    if record.format != FORMAT {
        return Err(corrupt(format!("a pending record of format {}", record.format)));
    }
    let raw = |v: &RawValue| JsonText::from_text(v.get().to_owned()).map_err(|e| corrupt(e.to_string()));
    let mut job = record.job;
    job.input = raw(record.input)?;
    job.metadata = raw(record.metadata)?;
    let events = record
        .events
        .into_iter()
        .map(|e| {
            Ok(RuntimeEvent {
                id: e.id,
                seq: e.seq,
                job_id: e.job_id,
                tenant: e.tenant,
                event_type: e.event_type,
                data: raw(e.data)?,
                at: e.at,
            })
        })
        .collect::<StoreResult<Vec<_>>>()?;
    let batch = Batch {
        jobs: vec![JobWrite {
            job,
            expected_version: None,
        }],
        journal: record
            .journal
            .into_iter()
            .map(|j| {
                Ok(NewJournalEntry {
                    job_id: j.job_id,
                    key: j.key,
                    kind: j.kind,
                    payload: raw(j.payload)?,
                    at: j.at,
                })
            })
            .collect::<StoreResult<_>>()?,
        holds: record
            .holds
            .into_iter()
            .map(|(id, request)| HoldWrite {
                id,
                request,
                check_budgets: false,
            })
            .collect(),
        settlements: record
            .settlements
            .into_iter()
            .map(|s| {
                Ok(SettleRequest {
                    reservation_id: s.reservation_id,
                    kind: s.kind,
                    actual: s.actual,
                    duration_ms: s.duration_ms,
                    model: s.model,
                    tool: s.tool,
                    data: raw(s.data)?,
                    now: s.now,
                })
            })
            .collect::<StoreResult<_>>()?,
        policy_texts: record.policy_texts.into_iter().map(PolicyText::new).collect(),
        ..Batch::default()
    };
    // Events are inserted last by a batch too (only lease releases come after them, and a
    // deferred batch has none).
    super::batch::commit(conn, batch)?;
    insert_events_as(conn, &events)
}

/// A pending record as written: the batch's rows, its events as the commit returned them.
#[derive(Serialize)]
struct Record<'a> {
    format: u32,
    /// The job, its input and metadata taken out (they are the next two fields).
    job: &'a Job,
    input: &'a JsonText,
    metadata: &'a JsonText,
    events: &'a [RuntimeEvent],
    journal: &'a [NewJournalEntry],
    holds: Vec<(Uuid, &'a ReserveRequest)>,
    settlements: &'a [SettleRequest],
    policy_texts: Vec<&'a str>,
}

/// A pending record as read: its JSON documents borrowed as they were written.
#[derive(Deserialize)]
struct RecordIn<'a> {
    format: u32,
    job: Job,
    #[serde(borrow)]
    input: &'a RawValue,
    #[serde(borrow)]
    metadata: &'a RawValue,
    #[serde(borrow)]
    events: Vec<EventIn<'a>>,
    #[serde(borrow)]
    journal: Vec<JournalIn<'a>>,
    holds: Vec<(Uuid, ReserveRequest)>,
    #[serde(borrow)]
    settlements: Vec<SettleIn<'a>>,
    policy_texts: Vec<String>,
}

/// [`RuntimeEvent`] with its data as written.
#[derive(Deserialize)]
struct EventIn<'a> {
    id: i64,
    seq: u64,
    job_id: Uuid,
    tenant: String,
    event_type: EventType,
    #[serde(borrow)]
    data: &'a RawValue,
    at: chrono::DateTime<chrono::Utc>,
}

/// [`NewJournalEntry`] with its payload as written.
#[derive(Deserialize)]
struct JournalIn<'a> {
    job_id: Uuid,
    key: String,
    kind: String,
    #[serde(borrow)]
    payload: &'a RawValue,
    at: chrono::DateTime<chrono::Utc>,
}

/// [`SettleRequest`] with its data as written.
#[derive(Deserialize)]
struct SettleIn<'a> {
    reservation_id: Uuid,
    kind: LedgerKind,
    actual: Usage,
    duration_ms: Option<u64>,
    model: Option<String>,
    tool: Option<String>,
    #[serde(borrow)]
    data: &'a RawValue,
    now: chrono::DateTime<chrono::Utc>,
}

/// How many records are pending.
#[cfg(test)]
pub(super) fn pending_count(conn: &Connection) -> i64 {
    conn.query_row("SELECT count(*) FROM pending_writes", [], |r| r.get(0))
        .expect("count pending writes")
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use chrono::{SubsecRound as _, Utc};
    use keel_kernel::event::NewEvent;
    use keel_kernel::job::{JobState, NewJob};
    use keel_kernel::store::KernelStore;
    use rusqlite::TransactionBehavior;

    use super::*;
    use crate::sqlite::Durability;

    /// A direct call's one commit: a new job in its final state, its hold settled, two events.
    fn call_batch(tenant: &str) -> Batch {
        // The store keeps microseconds.
        let now = Utc::now().trunc_subsecs(6);
        let mut job = Job::queued(NewJob::new(tenant, "tool"), None, now);
        job.state = JobState::Succeeded;
        let hold = HoldWrite {
            id: Uuid::now_v7(),
            request: ReserveRequest {
                tenant: tenant.into(),
                principal: None,
                session: None,
                job_id: Some(job.id),
                amount: Usage {
                    tool_calls: 1,
                    ..Usage::zero()
                },
                now,
                expires_at: now + chrono::Duration::minutes(1),
            },
            check_budgets: false,
        };
        let event = |event_type| NewEvent {
            job_id: job.id,
            tenant: tenant.into(),
            event_type,
            data: serde_json::json!({ "n": 1 }).into(),
            at: now,
        };
        Batch {
            events: vec![event(EventType::ToolStart), event(EventType::FinalResult)],
            settlements: vec![SettleRequest {
                reservation_id: hold.id,
                kind: LedgerKind::ToolUsage,
                actual: hold.request.amount.clone(),
                duration_ms: Some(1),
                model: None,
                tool: Some("p/t".into()),
                data: serde_json::json!({}).into(),
                now,
            }],
            holds: vec![hold],
            jobs: vec![JobWrite {
                job,
                expected_version: None,
            }],
            deferrable: true,
            ..Batch::default()
        }
    }

    /// A migrated database file with no store open on it, and a writer connection of its own.
    async fn file() -> (tempfile::TempDir, std::path::PathBuf, Connection) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("keel.db");
        drop(crate::Database::open(&path).await.expect("open"));
        let conn = super::super::conn::open_one(&path, Durability::Full, false).expect("connection");
        (dir, path, conn)
    }

    fn in_tx<T>(conn: &mut Connection, f: impl FnOnce(&Connection) -> StoreResult<T>) -> StoreResult<T> {
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .expect("begin");
        let out = f(&tx)?;
        tx.commit().expect("commit");
        Ok(out)
    }

    fn count(conn: &Connection, table: &str) -> i64 {
        conn.query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))
            .expect("count")
    }

    #[tokio::test]
    async fn a_deferred_batch_is_one_record_until_applied_with_the_ids_it_was_given() {
        let (_dir, _path, mut conn) = file().await;
        let batch = call_batch("t");
        assert!(qualifies(&batch));
        let job_id = batch.jobs[0].job.id;
        let events = in_tx(&mut conn, |c| append(c, batch)).expect("append");
        assert_eq!(pending_count(&conn), 1);
        assert_eq!(count(&conn, "jobs"), 0, "no table written yet");
        assert_eq!(count(&conn, "events"), 0);
        let second = in_tx(&mut conn, |c| append(c, call_batch("t"))).expect("append");
        assert_eq!(second[0].id, events[1].id + 1, "ids follow the pending ones");

        assert_eq!(in_tx(&mut conn, |c| drain(c, Some(1))).expect("drain"), 1);
        assert_eq!(pending_count(&conn), 1, "a bounded drain leaves the rest in order");
        assert_eq!(in_tx(&mut conn, |c| drain(c, None)).expect("drain"), 1);
        assert_eq!(pending_count(&conn), 0);
        assert_eq!(count(&conn, "jobs"), 2);
        let ids: Vec<(i64, i64)> = conn
            .prepare("SELECT id, seq FROM events WHERE job_id = ? ORDER BY id")
            .expect("prepare")
            .query_map([job_id.to_string()], |r| Ok((r.get(0)?, r.get(1)?)))
            .expect("query")
            .collect::<Result<_, _>>()
            .expect("rows");
        assert_eq!(ids, events.iter().map(|e| (e.id, e.seq as i64)).collect::<Vec<_>>());
        assert_eq!(count(&conn, "ledger_events"), 6, "hold, usage, settle per call");
    }

    #[test]
    fn only_a_batch_nothing_can_refuse_is_deferred() {
        assert!(qualifies(&call_batch("t")));
        let mut b = call_batch("t");
        b.deferrable = false;
        assert!(!qualifies(&b), "not asked for");
        let mut b = call_batch("t");
        b.holds[0].check_budgets = true;
        assert!(!qualifies(&b), "a budget may refuse the hold");
        let mut b = call_batch("t");
        b.jobs[0].job.state = JobState::Running;
        assert!(!qualifies(&b), "a job that is not final (could be claimed, cancelled)");
        let mut b = call_batch("t");
        b.jobs[0].job.idempotency_key = Some("k".into());
        assert!(!qualifies(&b), "a key another job may hold");
        let mut b = call_batch("t");
        b.jobs[0].expected_version = Some(1);
        assert!(!qualifies(&b), "an update");
        let mut b = call_batch("t");
        b.events[0].job_id = Uuid::now_v7();
        assert!(!qualifies(&b), "another job's row");
        let mut b = call_batch("t");
        b.settlements.clear();
        assert!(!qualifies(&b), "a hold left live");
    }

    /// A record that cannot be applied (here: its job was inserted behind the store's back) is
    /// kept aside and logged; the records after it, and every later write, still go through.
    #[tokio::test]
    async fn a_record_that_cannot_be_applied_is_set_aside_and_blocks_nothing() {
        let (_dir, _path, mut conn) = file().await;
        let clash = call_batch("t");
        let mut same = clash.clone();
        same.deferrable = false;
        in_tx(&mut conn, |c| append(c, clash)).expect("append");
        in_tx(&mut conn, |c| append(c, call_batch("t"))).expect("append");
        // The same job, applied directly while the record waits.
        conn.execute_batch("BEGIN IMMEDIATE").expect("begin");
        super::super::batch::commit(&conn, same).expect("the clashing job");
        conn.execute_batch("COMMIT").expect("commit");

        assert_eq!(in_tx(&mut conn, |c| drain(c, None)).expect("drain"), 2);
        assert_eq!(pending_count(&conn), 0);
        assert_eq!(count(&conn, "failed_writes"), 1);
        assert_eq!(count(&conn, "jobs"), 2, "the clashing job once, and the next record's");
        let error: String = conn
            .query_row("SELECT error FROM failed_writes", [], |r| r.get(0))
            .expect("error");
        assert!(error.contains("job"), "{error}");
    }

    /// Records left by a process that ended before applying them are durable: the next store
    /// on the file applies them before its first read.
    #[tokio::test]
    async fn records_left_by_an_ended_process_are_read_by_the_next() {
        let (_dir, path, mut conn) = file().await;
        let batch = call_batch("t");
        let job = batch.jobs[0].job.clone();
        let events = in_tx(&mut conn, |c| append(c, batch)).expect("append");
        drop(conn);

        let db = crate::Database::open(&path).await.expect("open");
        let store = db.kernel_store();
        assert_eq!(store.get_job(job.id).await.expect("read"), Some(job.clone()));
        let read = store
            .read_events(&keel_kernel::event::EventQuery {
                filter: keel_kernel::event::EventFilter {
                    job_id: Some(job.id),
                    ..Default::default()
                },
                ..Default::default()
            })
            .await
            .expect("events");
        assert_eq!(read, events);
    }

    /// The store's own background thread applies what it appended, with no read or write
    /// asking for it.
    #[tokio::test]
    async fn the_store_applies_its_records_in_the_background() {
        let (_dir, path, conn) = file().await;
        let db = crate::Database::open(&path).await.expect("open");
        db.kernel_store().commit(call_batch("t")).await.expect("commit");
        let deadline = Instant::now() + Duration::from_secs(5);
        while count(&conn, "jobs") == 0 {
            assert!(Instant::now() < deadline, "not applied in the background");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(pending_count(&conn), 0);
    }
}
