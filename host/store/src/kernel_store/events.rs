//! Events: reading the persisted stream (appends happen in [`super::batch`]).

use keel_kernel::event::{EventQuery, EventType, RuntimeEvent};
use keel_kernel::store::StoreResult;
use sqlx::sqlite::SqliteRow;
use sqlx::{QueryBuilder, Sqlite};

use super::SqliteKernelStore;
use super::rows::{be, from_json, from_micros, get, i64_of, parse, push_in, push_limit, u64_of, uuid};

pub(super) fn event_from_row(r: &SqliteRow) -> StoreResult<RuntimeEvent> {
    Ok(RuntimeEvent {
        id: get(r, "id")?,
        seq: u64_of(get(r, "seq")?)?,
        job_id: uuid(&get::<String>(r, "job_id")?)?,
        tenant: get(r, "tenant")?,
        event_type: parse::<EventType>(&get::<String>(r, "event_type")?)?,
        data: from_json(&get::<String>(r, "data_json")?)?,
        at: from_micros(get(r, "at")?)?,
    })
}

impl SqliteKernelStore {
    /// [`KernelStore::read_events`].
    pub(super) async fn sql_read_events(&self, query: &EventQuery) -> StoreResult<Vec<RuntimeEvent>> {
        let mut qb = QueryBuilder::<Sqlite>::new("SELECT * FROM events WHERE id > ");
        qb.push_bind(query.after_id);
        qb.push(" AND seq > ").push_bind(i64_of(query.after_seq)?);
        if let Some(t) = &query.filter.tenant {
            qb.push(" AND tenant = ").push_bind(t.clone());
        }
        if let Some(j) = query.filter.job_id {
            qb.push(" AND job_id = ").push_bind(j.to_string());
        }
        push_in(
            &mut qb,
            "event_type",
            query.filter.types.iter().map(|v| v.as_str().to_string()),
        );
        qb.push(" ORDER BY id");
        push_limit(&mut qb, query.limit);
        let rows = qb.build().fetch_all(&self.pool).await.map_err(be)?;
        rows.iter().map(event_from_row).collect()
    }
}
