//! The journal: a job's non-deterministic inputs, appended with the state they change.

use keel_kernel::store::{JournalEntry, NewJournalEntry, StoreError, StoreResult};
use sqlx::sqlite::SqliteConnection;
use uuid::Uuid;

use super::SqliteKernelStore;
use super::rows::{be, from_json, from_micros, get, job_ref_error, micros, to_json, u64_of};

pub(super) async fn insert_journal(conn: &mut SqliteConnection, j: &NewJournalEntry) -> StoreResult<()> {
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

impl SqliteKernelStore {
    /// [`KernelStore::read_journal`].
    pub(super) async fn sql_read_journal(&self, job_id: Uuid) -> StoreResult<Vec<JournalEntry>> {
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
    }
}
