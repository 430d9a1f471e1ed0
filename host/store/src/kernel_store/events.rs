//! Events: appending (inside a batch) and reading the persisted stream.

use std::collections::HashMap;

use keel_kernel::event::{EventQuery, EventType, NewEvent, RuntimeEvent};
use keel_kernel::store::StoreResult;
use rusqlite::types::Value;
use rusqlite::{Connection, Row};
use uuid::Uuid;

use super::rows::{
    Query, fetch_optional, from_micros, get, i64_of, job_ref_error, json_text, micros, parse, u64_of, uuid,
};

pub(super) fn event_from_row(r: &Row<'_>) -> StoreResult<RuntimeEvent> {
    Ok(RuntimeEvent {
        id: get(r, "id")?,
        seq: u64_of(get(r, "seq")?)?,
        job_id: uuid(&get::<String>(r, "job_id")?)?,
        tenant: get(r, "tenant")?,
        event_type: parse::<EventType>(&get::<String>(r, "event_type")?)?,
        data: json_text(get(r, "data_json")?)?,
        at: from_micros(get(r, "at")?)?,
    })
}

/// Append `events`, each with the next sequence number of its job (one `MAX(seq)` read per job
/// that existed before the batch; a job `inserted` by it starts at 0). Safe under BEGIN
/// IMMEDIATE: no other writer can append to these jobs meanwhile.
pub(super) fn insert_events(
    conn: &Connection,
    events: Vec<NewEvent>,
    inserted: &[Uuid],
) -> StoreResult<Vec<RuntimeEvent>> {
    // No `RETURNING id`: SQLite collects RETURNING rows in an ephemeral table opened and closed
    // per statement, which cost more than the insert; the rowid is the connection's last one.
    const INSERT: &str = "INSERT INTO events (job_id, tenant, seq, event_type, data_json, at) \
                          VALUES (?, ?, ?, ?, ?, ?)";
    let mut next: HashMap<Uuid, u64> = HashMap::new();
    let mut out = Vec::with_capacity(events.len());
    for e in events {
        let seq = match next.get_mut(&e.job_id) {
            Some(seq) => seq,
            None => {
                let last = if inserted.contains(&e.job_id) {
                    0
                } else {
                    let last = fetch_optional(
                        conn,
                        "SELECT COALESCE(MAX(seq), 0) AS seq FROM events WHERE job_id = ?",
                        &[Value::Text(e.job_id.to_string())],
                        |r| get::<i64>(r, "seq"),
                    )?;
                    u64_of(last.unwrap_or(0))?
                };
                next.entry(e.job_id).or_insert(last)
            }
        };
        *seq += 1;
        let seq = *seq;
        let args = [
            Value::Text(e.job_id.to_string()),
            Value::Text(e.tenant.clone()),
            Value::Integer(i64_of(seq)?),
            Value::Text(e.event_type.as_str().to_owned()),
            Value::Text(e.data.as_str().to_owned()),
            Value::Integer(micros(e.at)),
        ];
        conn.prepare_cached(INSERT)
            .and_then(|mut s| s.execute(rusqlite::params_from_iter(&args)))
            .map_err(|err| job_ref_error(err, e.job_id))?;
        let id = conn.last_insert_rowid();
        out.push(RuntimeEvent {
            id,
            seq,
            job_id: e.job_id,
            tenant: e.tenant,
            event_type: e.event_type,
            data: e.data,
            at: e.at,
        });
    }
    Ok(out)
}

/// [`KernelStore::read_events`](keel_kernel::store::KernelStore::read_events).
pub(super) fn read_events(conn: &Connection, query: &EventQuery) -> StoreResult<Vec<RuntimeEvent>> {
    let mut q = Query::new("SELECT * FROM events WHERE id > ");
    q.bind(query.after_id);
    q.push(" AND seq > ").bind(i64_of(query.after_seq)?);
    if let Some(t) = &query.filter.tenant {
        q.push(" AND tenant = ").bind(t.clone());
    }
    if let Some(j) = query.filter.job_id {
        q.push(" AND job_id = ").bind(j.to_string());
    }
    q.push_in("event_type", query.filter.types.iter().map(|v| v.as_str().to_string()));
    q.push(" ORDER BY id");
    q.push_limit(query.limit);
    q.fetch(conn, event_from_row)
}
