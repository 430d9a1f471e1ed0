//! The ledger, budgets and reservations (holds): append-only entries, the serialized reserve
//! transaction, settle and release. What each of those writes is planned by the kernel
//! (`keel_kernel::store::plan_*`); this module only loads and writes rows.

use chrono::{DateTime, Utc};
use keel_kernel::ledger::{
    Budget, BudgetStatus, BudgetWindow, LedgerEvent, LedgerKind, LedgerQuery, NewLedgerEvent, Reservation,
    ReservationState, ReserveOutcome, ReserveRequest, SettleRequest, Usage, UsageQuery, cost_from_nanos,
};
use keel_kernel::store::{
    BudgetEvaluator, ClosePlan, HoldWrite, ReservePlan, StoreError, StoreResult, plan_hold, plan_release, plan_reserve,
    plan_settle,
};
use rusqlite::types::Value;
use rusqlite::{Connection, Row};
use uuid::Uuid;

use super::rows::{
    Query, be, conflict_or, execute, fetch, fetch_optional, from_json, from_micros, get, i64_of, int, json_text,
    micros, nanos, opt_from_micros, opt_uuid, parse, text, to_json, u64_of, uuid,
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
            data: json_text(get(r, "data_json")?)?,
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
        Value::Text(e.data.as_str().to_owned()),
        Value::Integer(micros(e.at)),
    ];
    execute(conn, SQL, &args).map_err(be)?;
    let id = conn.last_insert_rowid();
    if e.kind.counts_as_usage() {
        add_to_budget_totals(conn, e)?;
    }
    Ok(id)
}

/// The start (microseconds) of the window of a budget (`b.window_kind`) that an entry at `$at`
/// falls in: the UTC day or month, 0 for a total budget. Migration `budget_totals` backfilled
/// with the same expression.
macro_rules! window_start_of {
    ($at:literal) => {
        concat!(
            "CASE b.window_kind WHEN 'daily' THEN (",
            $at,
            " / 86400000000) * 86400000000 WHEN 'monthly' THEN unixepoch(strftime('%Y-%m-01', ",
            $at,
            " / 1000000, 'unixepoch')) * 1000000 ELSE 0 END"
        )
    };
}

/// `col = col + excluded.col`, stopping at `i64::MAX` (past it SQLite would store a float, which
/// no check could read back). Usage is never negative, so the subtraction cannot overflow.
macro_rules! saturating_add {
    ($col:literal) => {
        concat!(
            $col,
            " = CASE WHEN ",
            $col,
            " > 9223372036854775807 - excluded.",
            $col,
            " THEN 9223372036854775807 ELSE ",
            $col,
            " + excluded.",
            $col,
            " END"
        )
    };
}

/// Add a usage entry to the running total of every budget it counts against (same tenant,
/// the budget's subject, in the window of its time), in the entry's transaction.
fn add_to_budget_totals(conn: &Connection, e: &NewLedgerEvent) -> StoreResult<()> {
    const SQL: &str = concat!(
        "INSERT INTO budget_totals (budget_id, window_start, tokens, cost_nanos, requests, tool_calls) \
         SELECT b.id, ",
        window_start_of!("?1"),
        ", ?5, ?6, ?7, ?8 FROM budgets b \
         WHERE b.tenant = ?2 AND b.window_kind <> 'per_request' \
         AND (b.principal IS NULL OR b.principal = ?3) AND (b.session IS NULL OR b.session = ?4) \
         ON CONFLICT (budget_id, window_start) DO UPDATE SET ",
        saturating_add!("tokens"),
        ", ",
        saturating_add!("cost_nanos"),
        ", ",
        saturating_add!("requests"),
        ", ",
        saturating_add!("tool_calls")
    );
    let args = [
        Value::Integer(micros(e.at)),
        Value::Text(e.tenant.clone()),
        text(e.principal.as_deref()),
        text(e.session.as_deref()),
        Value::Integer(i64_of(e.usage.tokens)?),
        Value::Integer(nanos(e.usage.cost)?),
        Value::Integer(i64_of(e.usage.requests)?),
        Value::Integer(i64_of(e.usage.tool_calls)?),
    ];
    execute(conn, SQL, &args).map_err(be)?;
    Ok(())
}

/// Recount budget `id`'s totals from the ledger: once, when the budget is created or its
/// tenant, subject or window changes (the only time a budget check reads the ledger).
fn rebuild_budget_totals(conn: &Connection, id: Uuid) -> StoreResult<()> {
    const SQL: &str = concat!(
        "INSERT INTO budget_totals (budget_id, window_start, tokens, cost_nanos, requests, tool_calls) \
         SELECT b.id, ",
        window_start_of!("l.at"),
        " AS window_start, keel_sum(l.tokens), keel_sum(l.cost_nanos), keel_sum(l.requests), keel_sum(l.tool_calls) \
         FROM budgets b JOIN ledger_events l ON l.tenant = b.tenant \
         WHERE b.id = ?1 AND b.window_kind <> 'per_request' \
         AND (b.principal IS NULL OR l.principal = b.principal) AND (b.session IS NULL OR l.session = b.session) \
         AND l.kind IN (SELECT value FROM json_each(?2)) \
         GROUP BY b.id, window_start"
    );
    // The kinds that count are the kernel's call (`LedgerKind::counts_as_usage`), not repeated here.
    let counted: Vec<&str> = LedgerKind::ALL
        .iter()
        .filter(|k| k.counts_as_usage())
        .map(|k| k.as_str())
        .collect();
    let id = Value::Text(id.to_string());
    execute(
        conn,
        "DELETE FROM budget_totals WHERE budget_id = ?",
        std::slice::from_ref(&id),
    )
    .map_err(be)?;
    execute(conn, SQL, &[id, Value::Text(to_json(&counted)?)]).map_err(be)?;
    Ok(())
}

/// Append `entries`, in order.
pub(super) fn insert_ledger_many(conn: &Connection, entries: &[NewLedgerEvent]) -> StoreResult<()> {
    for e in entries {
        insert_ledger(conn, e)?;
    }
    Ok(())
}

const SUMS: &str = "keel_sum(tokens) AS tokens, keel_sum(cost_nanos) AS cost_nanos, \
                    keel_sum(requests) AS requests, keel_sum(tool_calls) AS tool_calls";

/// `keel_sum(x)`: the sum of the integers `x`, stopping at `i64::MAX` (0 over no rows). SQLite's
/// `SUM` fails with "integer overflow" instead, which would fail every budget check and usage
/// report of a tenant whose recorded usage (each entry at most `i64::MAX`, see `Usage::capped`)
/// adds up past it; the kernel's sums stop at the same place (`Usage`'s `AddAssign`).
struct SaturatingSum;

impl rusqlite::functions::Aggregate<i64, i64> for SaturatingSum {
    fn init(&self, _: &mut rusqlite::functions::Context<'_>) -> rusqlite::Result<i64> {
        Ok(0)
    }

    fn step(&self, ctx: &mut rusqlite::functions::Context<'_>, sum: &mut i64) -> rusqlite::Result<()> {
        use rusqlite::types::ValueRef;
        let add = match ctx.get_raw(0) {
            ValueRef::Null => 0,
            ValueRef::Integer(i) => i,
            // A total written before sums saturated, which SQLite turned into a float.
            ValueRef::Real(f) => f as i64,
            _ => return Err(rusqlite::Error::UserFunctionError("keel_sum of a non-number".into())),
        };
        *sum = sum.saturating_add(add);
        Ok(())
    }

    fn finalize(&self, _: &mut rusqlite::functions::Context<'_>, sum: Option<i64>) -> rusqlite::Result<i64> {
        Ok(sum.unwrap_or(0))
    }
}

/// Register the SQL functions the ledger's statements use on `conn`.
pub(super) fn register_functions(conn: &Connection) -> rusqlite::Result<()> {
    use rusqlite::functions::FunctionFlags;
    conn.create_aggregate_function(
        "keel_sum",
        1,
        FunctionFlags::SQLITE_UTF8 | FunctionFlags::SQLITE_DETERMINISTIC,
        SaturatingSum,
    )
}

fn sum_usage(conn: &Connection, q: &Query) -> StoreResult<Usage> {
    let sums = q.fetch(conn, usage_from_row)?;
    Ok(sums.into_iter().next().unwrap_or_else(Usage::zero))
}

pub(super) fn budget_usage(conn: &Connection, budget: &Budget, now: DateTime<Utc>) -> StoreResult<Usage> {
    if budget.window == BudgetWindow::PerRequest {
        // Each request is judged alone (`evaluate_budgets`): nothing before it counts.
        return Ok(Usage::zero());
    }
    let settled = budget_settled(conn, budget, now)?;

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

/// [`KernelStore::budget_used`](keel_kernel::store::KernelStore::budget_used): the running totals
/// of the window containing `now` (and of any later one, for entries stamped ahead of this host's
/// clock): one or two rows, however long the ledger.
pub(super) fn budget_settled(conn: &Connection, budget: &Budget, now: DateTime<Utc>) -> StoreResult<Usage> {
    if budget.window == BudgetWindow::PerRequest {
        return Ok(Usage::zero());
    }
    let mut q = Query::new(format!("SELECT {SUMS} FROM budget_totals WHERE budget_id = "));
    q.bind(budget.id.to_string());
    q.push(" AND window_start >= ")
        .bind(budget.window.start(now).map_or(0, micros));
    sum_usage(conn, &q)
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
        insert_reservation(conn, r)?;
    }
    insert_ledger_many(conn, &plan.entries)
}

/// Insert reservation `r` as it is (HELD, or already closed: see [`hold_in`]).
fn insert_reservation(conn: &Connection, r: &Reservation) -> StoreResult<()> {
    const SQL: &str = "INSERT INTO reservations (id, tenant, principal, session, job_id, tokens, cost_nanos, \
         requests, tool_calls, state, actual_json, created_at, expires_at, closed_at) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)";
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
        text(r.actual.as_ref().map(to_json).transpose()?.as_deref()),
        Value::Integer(micros(r.created_at)),
        Value::Integer(micros(r.expires_at)),
        int(r.closed_at.map(micros)),
    ];
    execute(conn, SQL, &args).map_err(|e| conflict_or(e, "reservation", r.id, be))?;
    Ok(())
}

/// One [`keel_kernel::store::Batch::holds`] entry inside the batch's transaction. With
/// `settlement`, the same batch's settlement of this hold (a call committed once, after it ran):
/// the reservation is inserted already settled instead of inserted HELD and updated, and the
/// settlement's ledger entries are returned for the caller to append where the batch settles
/// (the ledger then reads exactly as if the two had been written one after the other).
pub(super) fn hold_in(
    conn: &Connection,
    hold: &HoldWrite,
    settlement: Option<SettleRequest>,
) -> StoreResult<Vec<NewLedgerEvent>> {
    let statuses = if hold.check_budgets {
        budget_statuses(conn, &hold.request)?
    } else {
        Vec::new()
    };
    let mut plan = plan_hold(hold, &statuses)?;
    let Some(settlement) = settlement else {
        write_reserve_plan(conn, &plan)?;
        return Ok(Vec::new());
    };
    let held = plan
        .outcome
        .reservation
        .take()
        .expect("plan_hold refuses a hold it does not grant");
    let settled = plan_settle(&held, settlement)?;
    insert_reservation(conn, &settled.reservation)?;
    insert_ledger_many(conn, &plan.entries)?;
    Ok(settled.entries)
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

/// [`KernelStore::put_budget`](keel_kernel::store::KernelStore::put_budget): insert or replace it;
/// its running totals are recounted when it is new or what it counts changed.
pub(super) fn put_budget(conn: &Connection, budget: &Budget) -> StoreResult<()> {
    let id = Value::Text(budget.id.to_string());
    let counted = [
        Value::Text(budget.tenant.clone()),
        text(budget.principal.as_deref()),
        text(budget.session.as_deref()),
        Value::Text(budget.window.as_str().to_owned()),
    ];
    let before = fetch_optional(
        conn,
        "SELECT tenant, principal, session, window_kind FROM budgets WHERE id = ?",
        std::slice::from_ref(&id),
        |r| {
            Ok([
                Value::Text(get(r, "tenant")?),
                text(get::<Option<String>>(r, "principal")?.as_deref()),
                text(get::<Option<String>>(r, "session")?.as_deref()),
                Value::Text(get(r, "window_kind")?),
            ])
        },
    )?;
    let mut args = vec![id, Value::Text(to_json(budget)?)];
    args.extend(counted.iter().cloned());
    execute(
        conn,
        "INSERT INTO budgets (id, budget_json, tenant, principal, session, window_kind) VALUES (?, ?, ?, ?, ?, ?) \
         ON CONFLICT (id) DO UPDATE SET tenant = excluded.tenant, budget_json = excluded.budget_json, \
         principal = excluded.principal, session = excluded.session, window_kind = excluded.window_kind",
        &args,
    )
    .map_err(be)?;
    if before.as_ref() != Some(&counted) {
        rebuild_budget_totals(conn, budget.id)?;
    }
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
    // Its totals go with it (`ON DELETE CASCADE`).
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

#[cfg(test)]
mod tests {
    use std::ffi::{c_int, c_void};

    use chrono::TimeZone;
    use rusqlite::{Connection, TransactionBehavior};

    use super::*;

    /// SQLite virtual-machine operations run by `f` on `conn`: the work a statement does, which
    /// grows with every row it reads (a scan) and not with the rows it could have skipped.
    fn vm_ops<T>(conn: &Connection, f: impl FnOnce() -> T) -> (T, u64) {
        unsafe extern "C" fn count(counter: *mut c_void) -> c_int {
            // SAFETY: the pointer is the `u64` below, alive until the handler is removed.
            unsafe { *counter.cast::<u64>() += 1 };
            0
        }
        let mut ops = 0u64;
        // SAFETY: the handler is removed before `ops` goes out of scope; `conn` is not shared.
        unsafe {
            rusqlite::ffi::sqlite3_progress_handler(conn.handle(), 1, Some(count), (&raw mut ops).cast());
        }
        let out = f();
        unsafe { rusqlite::ffi::sqlite3_progress_handler(conn.handle(), 0, None, std::ptr::null_mut()) };
        (out, ops)
    }

    fn usage_entry(at: DateTime<Utc>) -> NewLedgerEvent {
        NewLedgerEvent {
            kind: LedgerKind::ToolUsage,
            tenant: "t1".into(),
            principal: Some("alice".into()),
            session: None,
            job_id: None,
            reservation_id: None,
            usage: Usage {
                tool_calls: 1,
                ..Usage::zero()
            },
            duration_ms: None,
            model: None,
            tool: Some("p/t".into()),
            data: keel_kernel::json::JsonText::null(),
            at,
        }
    }

    /// A budget-checked hold of one tool call for alice at `now`, rolled back: its VM operations.
    fn hold_ops(conn: &mut Connection, now: DateTime<Utc>) -> u64 {
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .expect("begin");
        let hold = HoldWrite {
            id: Uuid::now_v7(),
            request: ReserveRequest {
                tenant: "t1".into(),
                principal: Some("alice".into()),
                session: None,
                job_id: None,
                amount: Usage {
                    tool_calls: 1,
                    ..Usage::zero()
                },
                now,
                expires_at: now + chrono::Duration::minutes(5),
            },
            check_budgets: true,
        };
        let (held, ops) = vm_ops(&tx, || hold_in(&tx, &hold, None));
        held.expect("hold within the budget");
        tx.rollback().expect("rollback");
        ops
    }

    /// Checking a budget must not read the ledger: a hold with a budget in force did as much work
    /// with 20,000 usage entries behind it as with 20 (it summed the window on every hold, so a
    /// governed call got slower with every call before it).
    #[tokio::test]
    async fn a_budget_check_does_not_grow_with_the_ledger() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("keel.db");
        drop(crate::Database::open(&path).await.expect("create"));
        let mut conn = Connection::open(&path).expect("open");
        register_functions(&conn).expect("functions");
        let now = Utc.with_ymd_and_hms(2026, 12, 2, 12, 0, 0).single().expect("now");
        for window in [BudgetWindow::Total, BudgetWindow::Daily, BudgetWindow::Monthly] {
            let mut budget = Budget::new("t1", format!("{window}"), window);
            budget.limits.max_tool_calls = Some(1_000_000);
            put_budget(&conn, &budget).expect("budget");
        }
        let append = |conn: &mut Connection, n: usize| {
            let tx = conn.transaction().expect("begin");
            for i in 0..n {
                insert_ledger(&tx, &usage_entry(now - chrono::Duration::seconds(i as i64))).expect("entry");
            }
            tx.commit().expect("commit");
        };
        append(&mut conn, 20);
        let few = hold_ops(&mut conn, now);
        append(&mut conn, 20_000);
        let many = hold_ops(&mut conn, now);
        assert!(
            many <= few + few / 4,
            "a hold ran {few} VM operations with 20 ledger entries and {many} with 20,020"
        );
    }
}
