//! The journal: a job's non-deterministic inputs, appended with the state they change.

use keel_kernel::store::{JournalEntry, NewJournalEntry, StoreError, StoreResult};
use rusqlite::Connection;
use rusqlite::types::Value;
use uuid::Uuid;

use super::rows::{execute, fetch, from_micros, get, job_ref_error, json_text, micros, u64_of};

pub(super) fn insert_journal(conn: &Connection, j: &NewJournalEntry) -> StoreResult<()> {
    // Safe under BEGIN IMMEDIATE, like event sequence numbers.
    const SQL: &str = "INSERT INTO journal (job_id, seq, key, kind, payload_json, at) \
         VALUES (?1, (SELECT COALESCE(MAX(seq), 0) + 1 FROM journal WHERE job_id = ?1), ?2, ?3, ?4, ?5) \
         ON CONFLICT (job_id, key) DO NOTHING";
    let args = [
        Value::Text(j.job_id.to_string()),
        Value::Text(j.key.clone()),
        Value::Text(j.kind.clone()),
        Value::Text(j.payload.as_str().to_owned()),
        Value::Integer(micros(j.at)),
    ];
    let changed = execute(conn, SQL, &args).map_err(|err| job_ref_error(err, j.job_id))?;
    if changed == 0 {
        return Err(StoreError::Conflict {
            entity: "journal",
            id: format!("{}/{}", j.job_id, j.key),
        });
    }
    Ok(())
}

/// [`KernelStore::read_journal`](keel_kernel::store::KernelStore::read_journal).
pub(super) fn read_journal(conn: &Connection, job_id: Uuid) -> StoreResult<Vec<JournalEntry>> {
    fetch(
        conn,
        "SELECT * FROM journal WHERE job_id = ? ORDER BY seq",
        &[Value::Text(job_id.to_string())],
        |r| {
            Ok(JournalEntry {
                seq: u64_of(get(r, "seq")?)?,
                entry: NewJournalEntry {
                    job_id,
                    key: get(r, "key")?,
                    kind: get(r, "kind")?,
                    payload: json_text(get(r, "payload_json")?)?,
                    at: from_micros(get(r, "at")?)?,
                },
            })
        },
    )
}
