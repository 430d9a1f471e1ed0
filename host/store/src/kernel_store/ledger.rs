//! The ledger, budgets and reservations (holds): append-only entries, the serialized reserve
//! transaction, settle and release. What each of those writes is planned by the kernel
//! (`keel_kernel::store::plan_*`); this module only loads and writes rows.

use chrono::{DateTime, Utc};
use keel_kernel::ledger::{
    Budget, BudgetStatus, LedgerEvent, LedgerKind, LedgerQuery, NewLedgerEvent, Reservation, ReservationState,
    ReserveOutcome, ReserveRequest, SettleRequest, Usage, UsageQuery, cost_from_nanos,
};
use keel_kernel::store::{
    BudgetEvaluator, ClosePlan, HoldWrite, ReservePlan, StoreError, StoreResult, plan_hold, plan_release, plan_reserve,
    plan_settle,
};
use rusqlite::types::Value;
use rusqlite::{Connection, Row};
use uuid::Uuid;

use super::rows::{
    Query, be, execute, fetch, fetch_optional, from_json, from_micros, get, i64_of, int, is_unique_violation, micros,
    nanos, opt_from_micros, opt_uuid, parse, text, to_json, u64_of, uuid,
};

pub(super) fn usage_from_row(r: &Row<'_>) -> StoreResult<Usage> {
    Ok(Usage {
        tokens: u64_of(get(r, "tokens")?)?,
        cost: cost_from_nanos(get(r, "cost_nanos")?),
        requests: u64_of(get(r, "requests")?)?,
        tool_calls: u64_of(get(r, "tool_calls")?)?,
    })
}

pub(super) fn ledger_from_row(r: &Row<'_>) -> StoreResult<LedgerEvent> {
    Ok(LedgerEvent {
        id: get(r, "id")?,
        entry: NewLedgerEvent {
            kind: parse::<LedgerKind>(&get::<String>(r, "kind")?)?,
            tenant: get(r, "tenant")?,
            principal: get(r, "principal")?,
            session: get(r, "session")?,
            job_id: opt_uuid(get(r, "job_id")?)?,
            reservation_id: opt_uuid(get(r, "reservation_id")?)?,
            usage: usage_from_row(r)?,
            duration_ms: get::<Option<i64>>(r, "duration_ms")?.map(u64_of).transpose()?,
            model: get(r, "model")?,
            tool: get(r, "tool")?,
            data: from_json(&get::<String>(r, "data_json")?)?,
            at: from_micros(get(r, "at")?)?,
        },
    })
}

pub(super) fn reservation_from_row(r: &Row<'_>) -> StoreResult<Reservation> {
    let actual: Option<String> = get(r, "actual_json")?;
    Ok(Reservation {
        id: uuid(&get::<String>(r, "id")?)?,
        tenant: get(r, "tenant")?,
        principal: get(r, "principal")?,
        session: get(r, "session")?,
        job_id: opt_uuid(get(r, "job_id")?)?,
        amount: usage_from_row(r)?,
        state: parse::<ReservationState>(&get::<String>(r, "state")?)?,
        actual: actual.as_deref().map(from_json::<Usage>).transpose()?,
        created_at: from_micros(get(r, "created_at")?)?,
        expires_at: from_micros(get(r, "expires_at")?)?,
        closed_at: opt_from_micros(get(r, "closed_at")?)?,
    })
}

/// Append one ledger entry; its id.
pub(super) fn insert_ledger(conn: &Connection, e: &NewLedgerEvent) -> StoreResult<i64> {
    const SQL: &str = "INSERT INTO ledger_events (kind, tenant, principal, session, job_id, reservation_id, tokens, \
         cost_nanos, requests, tool_calls, duration_ms, model, tool, data_json, at) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)";
    let args = [
        Value::Text(e.kind.as_str().to_owned()),
        Value::Text(e.tenant.clone()),
        text(e.principal.as_deref()),
        text(e.session.as_deref()),
        text(e.job_id.map(|u| u.to_string()).as_deref()),
        text(e.reservation_id.map(|u| u.to_string()).as_deref()),
        Value::Integer(i64_of(e.usage.tokens)?),
        Value::Integer(nanos(e.usage.cost)?),
        Value::Integer(i64_of(e.usage.requests)?),
        Value::Integer(i64_of(e.usage.tool_calls)?),
        int(e.duration_ms.map(i64_of).transpose()?),
        text(e.model.as_deref()),
        text(e.tool.as_deref()),
        Value::Text(to_json(&e.data)?),
        Value::Integer(micros(e.at)),
    ];
    execute(conn, SQL, &args).map_err(be)?;
    Ok(conn.last_insert_rowid())
}

/// Append `entries`, in order.
pub(super) fn insert_ledger_many(conn: &Connection, entries: &[NewLedgerEvent]) -> StoreResult<()> {
    for e in entries {
        insert_ledger(conn, e)?;
    }
    Ok(())
}

const SUMS: &str = "COALESCE(SUM(tokens), 0) AS tokens, COALESCE(SUM(cost_nanos), 0) AS cost_nanos, \
                    COALESCE(SUM(requests), 0) AS requests, COALESCE(SUM(tool_calls), 0) AS tool_calls";

fn sum_usage(conn: &Connection, q: &Query) -> StoreResult<Usage> {
    let sums = q.fetch(conn, usage_from_row)?;
    Ok(sums.into_iter().next().unwrap_or_else(Usage::zero))
}

pub(super) fn budget_usage(conn: &Connection, budget: &Budget, now: DateTime<Utc>) -> StoreResult<Usage> {
    let mut q = Query::new(format!("SELECT {SUMS} FROM ledger_events WHERE tenant = "));
    q.bind(budget.tenant.clone());
    // The kinds that count are the kernel's call (`LedgerKind::counts_as_usage`), not repeated here.
    let counted = LedgerKind::ALL.iter().filter(|k| k.counts_as_usage());
    q.push_in("kind", counted.map(|k| k.as_str().to_string()));
    q.push_subject(budget.principal.as_deref(), budget.session.as_deref());
    if let Some(start) = budget.window.start(now) {
        q.push(" AND at >= ").bind(micros(start));
    }
    let settled = sum_usage(conn, &q)?;

    // Live holds count whatever the window: they are about to be spent now.
    let mut q = Query::new(format!(
        "SELECT {SUMS} FROM reservations WHERE state = 'HELD' AND tenant = "
    ));
    q.bind(budget.tenant.clone());
    q.push(" AND expires_at > ").bind(micros(now));
    q.push_subject(budget.principal.as_deref(), budget.session.as_deref());
    let held = sum_usage(conn, &q)?;
    Ok(settled + held)
}

/// The budgets that apply to `req`, each with its usage (settled in its window plus live holds),
/// read inside the caller's transaction.
pub(super) fn budget_statuses(conn: &Connection, req: &ReserveRequest) -> StoreResult<Vec<BudgetStatus>> {
    let mut statuses = Vec::new();
    for budget in list_budgets(conn, &req.tenant)? {
        if budget.applies_to(&req.tenant, req.principal.as_deref(), req.session.as_deref()) {
            let used = budget_usage(conn, &budget, req.now)?;
            statuses.push(BudgetStatus { budget, used });
        }
    }
    Ok(statuses)
}

/// Write what a reserve plan says: the HELD row (if allowed), then its ledger entries.
pub(super) fn write_reserve_plan(conn: &Connection, plan: &ReservePlan) -> StoreResult<()> {
    if let Some(r) = &plan.outcome.reservation {
        const SQL: &str = "INSERT INTO reservations (id, tenant, principal, session, job_id, tokens, cost_nanos, \
             requests, tool_calls, state, actual_json, created_at, expires_at, closed_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, ?, ?, NULL)";
        let args = [
            Value::Text(r.id.to_string()),
            Value::Text(r.tenant.clone()),
            text(r.principal.as_deref()),
            text(r.session.as_deref()),
            text(r.job_id.map(|u| u.to_string()).as_deref()),
            Value::Integer(i64_of(r.amount.tokens)?),
            Value::Integer(nanos(r.amount.cost)?),
            Value::Integer(i64_of(r.amount.requests)?),
            Value::Integer(i64_of(r.amount.tool_calls)?),
            Value::Text(r.state.as_str().to_owned()),
            Value::Integer(micros(r.created_at)),
            Value::Integer(micros(r.expires_at)),
        ];
        execute(conn, SQL, &args).map_err(|e| {
            if is_unique_violation(&e) {
                StoreError::Conflict {
                    entity: "reservation",
                    id: r.id.to_string(),
                }
            } else {
                be(e)
            }
        })?;
    }
    insert_ledger_many(conn, &plan.entries)
}

/// One [`keel_kernel::store::Batch::holds`] entry inside the batch's transaction.
pub(super) fn hold_in(conn: &Connection, hold: &HoldWrite) -> StoreResult<()> {
    let statuses = if hold.check_budgets {
        budget_statuses(conn, &hold.request)?
    } else {
        Vec::new()
    };
    write_reserve_plan(conn, &plan_hold(hold, &statuses)?)
}

/// [`KernelStore::get_reservation`](keel_kernel::store::KernelStore::get_reservation).
pub(super) fn get_reservation(conn: &Connection, id: Uuid) -> StoreResult<Option<Reservation>> {
    fetch_optional(
        conn,
        "SELECT * FROM reservations WHERE id = ?",
        &[Value::Text(id.to_string())],
        reservation_from_row,
    )
}

fn load_reservation(conn: &Connection, id: Uuid) -> StoreResult<Reservation> {
    get_reservation(conn, id)?.ok_or_else(|| StoreError::NotFound {
        entity: "reservation",
        id: id.to_string(),
    })
}

/// Write a settle or release plan: compare-and-set the row from the state it was planned from,
/// then append the plan's entries.
fn close_in(conn: &Connection, r: &Reservation, plan: ClosePlan) -> StoreResult<Reservation> {
    let next = plan.reservation;
    let closed_at = next.closed_at.unwrap_or_default();
    let args = [
        Value::Text(next.state.as_str().to_owned()),
        text(next.actual.as_ref().map(to_json).transpose()?.as_deref()),
        Value::Integer(micros(closed_at)),
        Value::Text(r.id.to_string()),
        Value::Text(r.state.as_str().to_owned()),
    ];
    let changed = execute(
        conn,
        "UPDATE reservations SET state = ?, actual_json = ?, closed_at = ? WHERE id = ? AND state = ?",
        &args,
    )
    .map_err(be)?;
    if changed == 0 {
        return Err(StoreError::Conflict {
            entity: "reservation",
            id: r.id.to_string(),
        });
    }
    insert_ledger_many(conn, &plan.entries)?;
    Ok(next)
}

/// Release hold `id` (inside a transaction).
pub(super) fn release_in(conn: &Connection, id: Uuid, now: DateTime<Utc>, reason: &str) -> StoreResult<Reservation> {
    let r = load_reservation(conn, id)?;
    close_in(conn, &r, plan_release(&r, now, reason)?)
}

/// Settle a hold (inside a transaction).
pub(super) fn settle_in(conn: &Connection, req: SettleRequest) -> StoreResult<Reservation> {
    let r = load_reservation(conn, req.reservation_id)?;
    // Bounded by the hold (a lapsed hold covers nothing): the excess is an `overage` entry.
    close_in(conn, &r, plan_settle(&r, req)?)
}

/// [`KernelStore::reserve`](keel_kernel::store::KernelStore::reserve), inside a transaction.
pub(super) fn reserve(
    conn: &Connection,
    req: &ReserveRequest,
    evaluate: BudgetEvaluator,
) -> StoreResult<ReserveOutcome> {
    let statuses = budget_statuses(conn, req)?;
    let plan = plan_reserve(req, evaluate(&req.amount, &statuses))?;
    // A refused reservation still records its budget check; nothing is held.
    write_reserve_plan(conn, &plan)?;
    Ok(plan.outcome)
}

/// [`KernelStore::release_expired`](keel_kernel::store::KernelStore::release_expired), inside a transaction.
pub(super) fn release_expired(conn: &Connection, now: DateTime<Utc>, limit: u32) -> StoreResult<Vec<Reservation>> {
    let ids = fetch(
        conn,
        "SELECT id FROM reservations WHERE state = 'HELD' AND expires_at <= ? ORDER BY expires_at, id LIMIT ?",
        &[Value::Integer(micros(now)), Value::Integer(i64::from(limit))],
        |r| uuid(&get::<String>(r, "id")?),
    )?;
    ids.into_iter().map(|id| release_in(conn, id, now, "expired")).collect()
}

/// Binds the tenant (the query ends in `tenant = `) and the rest of a ledger query.
fn push_ledger_filter(q: &mut Query, l: &LedgerQuery) {
    q.bind(l.tenant.clone());
    q.push_in("kind", l.kinds.iter().map(|v| v.as_str().to_string()));
    q.push_subject(l.principal.as_deref(), l.session.as_deref());
    if let Some(j) = l.job_id {
        q.push(" AND job_id = ").bind(j.to_string());
    }
    if let Some(f) = l.from {
        q.push(" AND at >= ").bind(micros(f));
    }
    if let Some(t) = l.to {
        q.push(" AND at < ").bind(micros(t));
    }
}

/// [`KernelStore::list_ledger`](keel_kernel::store::KernelStore::list_ledger).
pub(super) fn list_ledger(conn: &Connection, query: &LedgerQuery) -> StoreResult<Vec<LedgerEvent>> {
    let mut q = Query::new("SELECT * FROM ledger_events WHERE tenant = ");
    push_ledger_filter(&mut q, query);
    q.push(" ORDER BY id");
    q.push_limit(query.limit);
    q.fetch(conn, ledger_from_row)
}

/// [`KernelStore::usage`](keel_kernel::store::KernelStore::usage).
pub(super) fn usage(conn: &Connection, query: &UsageQuery) -> StoreResult<Usage> {
    let mut q = Query::new(format!("SELECT {SUMS} FROM ledger_events WHERE tenant = "));
    push_ledger_filter(&mut q, &query.as_ledger_query());
    sum_usage(conn, &q)
}

/// [`KernelStore::put_budget`](keel_kernel::store::KernelStore::put_budget).
pub(super) fn put_budget(conn: &Connection, budget: &Budget) -> StoreResult<()> {
    execute(
        conn,
        "INSERT INTO budgets (id, tenant, budget_json) VALUES (?, ?, ?) \
         ON CONFLICT (id) DO UPDATE SET tenant = excluded.tenant, budget_json = excluded.budget_json",
        &[
            Value::Text(budget.id.to_string()),
            Value::Text(budget.tenant.clone()),
            Value::Text(to_json(budget)?),
        ],
    )
    .map_err(be)?;
    Ok(())
}

/// [`KernelStore::list_budgets`](keel_kernel::store::KernelStore::list_budgets).
pub(super) fn list_budgets(conn: &Connection, tenant: &str) -> StoreResult<Vec<Budget>> {
    fetch(
        conn,
        "SELECT budget_json FROM budgets WHERE tenant = ? ORDER BY id",
        &[Value::Text(tenant.to_owned())],
        |r| from_json(&get::<String>(r, "budget_json")?),
    )
}

/// [`KernelStore::delete_budget`](keel_kernel::store::KernelStore::delete_budget).
pub(super) fn delete_budget(conn: &Connection, id: Uuid) -> StoreResult<bool> {
    let changed = execute(conn, "DELETE FROM budgets WHERE id = ?", &[Value::Text(id.to_string())]).map_err(be)?;
    Ok(changed > 0)
}

/// [`KernelStore::extend_holds`](keel_kernel::store::KernelStore::extend_holds).
pub(super) fn extend_holds(conn: &Connection, ids: &[Uuid], until: DateTime<Utc>) -> StoreResult<u64> {
    if ids.is_empty() {
        return Ok(0);
    }
    let mut q = Query::new("UPDATE reservations SET expires_at = MAX(expires_at, ");
    q.bind(micros(until)).push(") WHERE state = 'HELD'");
    q.push_in("id", ids.iter().map(Uuid::to_string));
    Ok(q.execute(conn)? as u64)
}
