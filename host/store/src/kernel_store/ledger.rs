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
use sqlx::sqlite::{SqliteConnection, SqliteRow};
use sqlx::{QueryBuilder, Sqlite};
use uuid::Uuid;

use super::SqliteKernelStore;
use super::rows::{
    be, from_json, from_micros, get, i64_of, micros, nanos, opt_from_micros, opt_uuid, parse, push_in, push_limit,
    push_subject, to_json, u64_of, uuid,
};

pub(super) fn usage_from_row(r: &SqliteRow) -> StoreResult<Usage> {
    Ok(Usage {
        tokens: u64_of(get(r, "tokens")?)?,
        cost: cost_from_nanos(get(r, "cost_nanos")?),
        requests: u64_of(get(r, "requests")?)?,
        tool_calls: u64_of(get(r, "tool_calls")?)?,
    })
}

pub(super) fn ledger_from_row(r: &SqliteRow) -> StoreResult<LedgerEvent> {
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

pub(super) fn reservation_from_row(r: &SqliteRow) -> StoreResult<Reservation> {
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

pub(super) async fn insert_ledger(conn: &mut SqliteConnection, e: &NewLedgerEvent) -> StoreResult<i64> {
    let sql = "INSERT INTO ledger_events (kind, tenant, principal, session, job_id, reservation_id, tokens, \
         cost_nanos, requests, tool_calls, duration_ms, model, tool, data_json, at) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id";
    let row = sqlx::query(sql)
        .bind(e.kind.as_str())
        .bind(e.tenant.clone())
        .bind(e.principal.clone())
        .bind(e.session.clone())
        .bind(e.job_id.map(|u| u.to_string()))
        .bind(e.reservation_id.map(|u| u.to_string()))
        .bind(i64_of(e.usage.tokens)?)
        .bind(nanos(e.usage.cost)?)
        .bind(i64_of(e.usage.requests)?)
        .bind(i64_of(e.usage.tool_calls)?)
        .bind(e.duration_ms.map(i64_of).transpose()?)
        .bind(e.model.clone())
        .bind(e.tool.clone())
        .bind(to_json(&e.data)?)
        .bind(micros(e.at))
        .fetch_one(&mut *conn)
        .await
        .map_err(be)?;
    get(&row, "id")
}

/// Append `entries` in one statement (one round trip to the database thread, whatever their
/// number), in order.
pub(super) async fn insert_ledger_many(conn: &mut SqliteConnection, entries: &[NewLedgerEvent]) -> StoreResult<()> {
    match entries {
        [] => return Ok(()),
        [one] => return insert_ledger(conn, one).await.map(|_| ()),
        _ => {}
    }
    let mut qb = QueryBuilder::<Sqlite>::new(
        "INSERT INTO ledger_events (kind, tenant, principal, session, job_id, reservation_id, tokens, \
         cost_nanos, requests, tool_calls, duration_ms, model, tool, data_json, at) ",
    );
    let mut rows = Vec::with_capacity(entries.len());
    for e in entries {
        rows.push((
            e,
            i64_of(e.usage.tokens)?,
            nanos(e.usage.cost)?,
            i64_of(e.usage.requests)?,
            i64_of(e.usage.tool_calls)?,
            e.duration_ms.map(i64_of).transpose()?,
            to_json(&e.data)?,
        ));
    }
    qb.push_values(
        rows,
        |mut b, (e, tokens, cost, requests, tool_calls, duration, data)| {
            b.push_bind(e.kind.as_str())
                .push_bind(e.tenant.clone())
                .push_bind(e.principal.clone())
                .push_bind(e.session.clone())
                .push_bind(e.job_id.map(|u| u.to_string()))
                .push_bind(e.reservation_id.map(|u| u.to_string()))
                .push_bind(tokens)
                .push_bind(cost)
                .push_bind(requests)
                .push_bind(tool_calls)
                .push_bind(duration)
                .push_bind(e.model.clone())
                .push_bind(e.tool.clone())
                .push_bind(data)
                .push_bind(micros(e.at));
        },
    );
    qb.build().execute(&mut *conn).await.map_err(be)?;
    Ok(())
}

pub(super) async fn budget_usage(
    conn: &mut SqliteConnection,
    budget: &Budget,
    now: DateTime<Utc>,
) -> StoreResult<Usage> {
    let sums = "COALESCE(SUM(tokens), 0) AS tokens, COALESCE(SUM(cost_nanos), 0) AS cost_nanos, \
                COALESCE(SUM(requests), 0) AS requests, COALESCE(SUM(tool_calls), 0) AS tool_calls";
    let mut qb = QueryBuilder::<Sqlite>::new(format!("SELECT {sums} FROM ledger_events WHERE tenant = "));
    qb.push_bind(budget.tenant.clone());
    // The kinds that count are the kernel's call (`LedgerKind::counts_as_usage`), not repeated here.
    let counted = LedgerKind::ALL.iter().filter(|k| k.counts_as_usage());
    push_in(&mut qb, "kind", counted.map(|k| k.as_str().to_string()));
    push_subject(&mut qb, budget.principal.as_deref(), budget.session.as_deref());
    if let Some(start) = budget.window.start(now) {
        qb.push(" AND at >= ").push_bind(micros(start));
    }
    let settled = usage_from_row(&qb.build().fetch_one(&mut *conn).await.map_err(be)?)?;

    // Live holds count whatever the window: they are about to be spent now.
    let mut qb = QueryBuilder::<Sqlite>::new(format!(
        "SELECT {sums} FROM reservations WHERE state = 'HELD' AND tenant = "
    ));
    qb.push_bind(budget.tenant.clone());
    qb.push(" AND expires_at > ").push_bind(micros(now));
    push_subject(&mut qb, budget.principal.as_deref(), budget.session.as_deref());
    let held = usage_from_row(&qb.build().fetch_one(&mut *conn).await.map_err(be)?)?;
    Ok(settled + held)
}

/// The budgets that apply to `req`, each with its usage (settled in its window plus live holds),
/// read inside the caller's transaction.
pub(super) async fn budget_statuses(
    conn: &mut SqliteConnection,
    req: &ReserveRequest,
) -> StoreResult<Vec<BudgetStatus>> {
    let rows = sqlx::query("SELECT budget_json FROM budgets WHERE tenant = ? ORDER BY id")
        .bind(req.tenant.clone())
        .fetch_all(&mut *conn)
        .await
        .map_err(be)?;
    let mut statuses = Vec::new();
    for row in rows {
        let budget: Budget = from_json(&get::<String>(&row, "budget_json")?)?;
        if budget.applies_to(&req.tenant, req.principal.as_deref(), req.session.as_deref()) {
            let used = budget_usage(conn, &budget, req.now).await?;
            statuses.push(BudgetStatus { budget, used });
        }
    }
    Ok(statuses)
}

/// Write what a reserve plan says: the HELD row (if allowed), then its ledger entries.
pub(super) async fn write_reserve_plan(conn: &mut SqliteConnection, plan: &ReservePlan) -> StoreResult<()> {
    if let Some(r) = &plan.outcome.reservation {
        sqlx::query(
            "INSERT INTO reservations (id, tenant, principal, session, job_id, tokens, cost_nanos, requests, \
             tool_calls, state, actual_json, created_at, expires_at, closed_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, ?, ?, NULL)",
        )
        .bind(r.id.to_string())
        .bind(r.tenant.clone())
        .bind(r.principal.clone())
        .bind(r.session.clone())
        .bind(r.job_id.map(|u| u.to_string()))
        .bind(i64_of(r.amount.tokens)?)
        .bind(nanos(r.amount.cost)?)
        .bind(i64_of(r.amount.requests)?)
        .bind(i64_of(r.amount.tool_calls)?)
        .bind(r.state.as_str())
        .bind(micros(r.created_at))
        .bind(micros(r.expires_at))
        .execute(&mut *conn)
        .await
        .map_err(|e| match &e {
            sqlx::Error::Database(d) if d.is_unique_violation() => StoreError::Conflict {
                entity: "reservation",
                id: r.id.to_string(),
            },
            _ => be(e),
        })?;
    }
    insert_ledger_many(conn, &plan.entries).await
}

/// One [`keel_kernel::store::Batch::holds`] entry inside the batch's transaction.
pub(super) async fn hold_in(conn: &mut SqliteConnection, hold: &HoldWrite) -> StoreResult<()> {
    let statuses = if hold.check_budgets {
        budget_statuses(conn, &hold.request).await?
    } else {
        Vec::new()
    };
    write_reserve_plan(conn, &plan_hold(hold, &statuses)?).await
}

pub(super) async fn load_reservation(conn: &mut SqliteConnection, id: Uuid) -> StoreResult<Reservation> {
    let row = sqlx::query("SELECT * FROM reservations WHERE id = ?")
        .bind(id.to_string())
        .fetch_optional(&mut *conn)
        .await
        .map_err(be)?
        .ok_or_else(|| StoreError::NotFound {
            entity: "reservation",
            id: id.to_string(),
        })?;
    reservation_from_row(&row)
}

pub(super) async fn close_reservation(
    conn: &mut SqliteConnection,
    r: &Reservation,
    state: ReservationState,
    actual: Option<&Usage>,
    now: DateTime<Utc>,
) -> StoreResult<()> {
    let res =
        sqlx::query("UPDATE reservations SET state = ?, actual_json = ?, closed_at = ? WHERE id = ? AND state = ?")
            .bind(state.as_str())
            .bind(actual.map(to_json).transpose()?)
            .bind(micros(now))
            .bind(r.id.to_string())
            .bind(r.state.as_str())
            .execute(&mut *conn)
            .await
            .map_err(be)?;
    if res.rows_affected() == 0 {
        return Err(StoreError::Conflict {
            entity: "reservation",
            id: r.id.to_string(),
        });
    }
    Ok(())
}

pub(super) async fn release_in(
    conn: &mut SqliteConnection,
    id: Uuid,
    now: DateTime<Utc>,
    reason: &str,
) -> StoreResult<Reservation> {
    let r = load_reservation(conn, id).await?;
    close_in(conn, &r, plan_release(&r, now, reason)?).await
}

/// Write a settle or release plan: compare-and-set the row from the state it was planned from,
/// then append the plan's entries.
async fn close_in(conn: &mut SqliteConnection, r: &Reservation, plan: ClosePlan) -> StoreResult<Reservation> {
    let next = plan.reservation;
    let closed_at = next.closed_at.unwrap_or_default();
    close_reservation(conn, r, next.state, next.actual.as_ref(), closed_at).await?;
    insert_ledger_many(conn, &plan.entries).await?;
    Ok(next)
}

pub(super) async fn settle_in(conn: &mut SqliteConnection, req: SettleRequest) -> StoreResult<Reservation> {
    let r = load_reservation(conn, req.reservation_id).await?;
    // Bounded by the hold (a lapsed hold covers nothing): the excess is an `overage` entry.
    close_in(conn, &r, plan_settle(&r, req)?).await
}

/// Binds the tenant (the builder ends in `tenant = `) and the rest of a ledger query.
pub(super) fn push_ledger_filter(qb: &mut QueryBuilder<Sqlite>, q: &LedgerQuery) -> StoreResult<()> {
    qb.push_bind(q.tenant.clone());
    push_in(qb, "kind", q.kinds.iter().map(|v| v.as_str().to_string()));
    push_subject(qb, q.principal.as_deref(), q.session.as_deref());
    if let Some(j) = q.job_id {
        qb.push(" AND job_id = ").push_bind(j.to_string());
    }
    if let Some(f) = q.from {
        qb.push(" AND at >= ").push_bind(micros(f));
    }
    if let Some(t) = q.to {
        qb.push(" AND at < ").push_bind(micros(t));
    }
    Ok(())
}

impl SqliteKernelStore {
    pub(super) async fn reserve_tx(
        &self,
        req: ReserveRequest,
        evaluate: BudgetEvaluator,
    ) -> StoreResult<ReserveOutcome> {
        let mut tx = self.begin().await?;
        let statuses = budget_statuses(&mut tx, &req).await?;
        let plan = plan_reserve(&req, evaluate(&req.amount, &statuses))?;
        // A refused reservation still records its budget check; nothing is held.
        write_reserve_plan(&mut tx, &plan).await?;
        tx.commit().await.map_err(be)?;
        Ok(plan.outcome)
    }

    pub(super) async fn settle_tx(&self, req: SettleRequest) -> StoreResult<Reservation> {
        let mut tx = self.begin().await?;
        let r = settle_in(&mut tx, req).await?;
        tx.commit().await.map_err(be)?;
        Ok(r)
    }

    pub(super) async fn release_tx(&self, id: Uuid, now: DateTime<Utc>, reason: String) -> StoreResult<Reservation> {
        let mut tx = self.begin().await?;
        let r = release_in(&mut tx, id, now, &reason).await?;
        tx.commit().await.map_err(be)?;
        Ok(r)
    }

    pub(super) async fn release_expired_tx(&self, now: DateTime<Utc>, limit: u32) -> StoreResult<Vec<Reservation>> {
        let mut tx = self.begin().await?;
        let rows = sqlx::query(
            "SELECT id FROM reservations WHERE state = 'HELD' AND expires_at <= ? ORDER BY expires_at, id LIMIT ?",
        )
        .bind(micros(now))
        .bind(i64::from(limit))
        .fetch_all(&mut *tx)
        .await
        .map_err(be)?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let id = uuid(&get::<String>(&row, "id")?)?;
            out.push(release_in(&mut tx, id, now, "expired").await?);
        }
        tx.commit().await.map_err(be)?;
        Ok(out)
    }

    /// [`KernelStore::append_ledger`].
    pub(super) async fn sql_append_ledger(&self, entry: NewLedgerEvent) -> StoreResult<LedgerEvent> {
        let mut conn = self.pool.acquire().await.map_err(be)?;
        let id = insert_ledger(&mut conn, &entry).await?;
        Ok(LedgerEvent { id, entry })
    }

    /// [`KernelStore::list_ledger`].
    pub(super) async fn sql_list_ledger(&self, query: &LedgerQuery) -> StoreResult<Vec<LedgerEvent>> {
        let mut qb = QueryBuilder::<Sqlite>::new("SELECT * FROM ledger_events WHERE tenant = ");
        push_ledger_filter(&mut qb, query)?;
        qb.push(" ORDER BY id");
        push_limit(&mut qb, query.limit);
        let rows = qb.build().fetch_all(&self.pool).await.map_err(be)?;
        rows.iter().map(ledger_from_row).collect()
    }

    /// [`KernelStore::usage`].
    pub(super) async fn sql_usage(&self, query: &UsageQuery) -> StoreResult<Usage> {
        let mut qb = QueryBuilder::<Sqlite>::new(
            "SELECT COALESCE(SUM(tokens), 0) AS tokens, COALESCE(SUM(cost_nanos), 0) AS cost_nanos, \
             COALESCE(SUM(requests), 0) AS requests, COALESCE(SUM(tool_calls), 0) AS tool_calls \
             FROM ledger_events WHERE tenant = ",
        );
        push_ledger_filter(&mut qb, &query.as_ledger_query())?;
        usage_from_row(&qb.build().fetch_one(&self.pool).await.map_err(be)?)
    }

    /// [`KernelStore::put_budget`].
    pub(super) async fn sql_put_budget(&self, budget: Budget) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO budgets (id, tenant, budget_json) VALUES (?, ?, ?) \
             ON CONFLICT (id) DO UPDATE SET tenant = excluded.tenant, budget_json = excluded.budget_json",
        )
        .bind(budget.id.to_string())
        .bind(budget.tenant.clone())
        .bind(to_json(&budget)?)
        .execute(&self.pool)
        .await
        .map_err(be)?;
        Ok(())
    }

    /// [`KernelStore::list_budgets`].
    pub(super) async fn sql_list_budgets(&self, tenant: &str) -> StoreResult<Vec<Budget>> {
        let rows = sqlx::query("SELECT budget_json FROM budgets WHERE tenant = ? ORDER BY id")
            .bind(tenant.to_string())
            .fetch_all(&self.pool)
            .await
            .map_err(be)?;
        rows.iter()
            .map(|r| from_json(&get::<String>(r, "budget_json")?))
            .collect()
    }

    /// [`KernelStore::delete_budget`].
    pub(super) async fn sql_delete_budget(&self, id: Uuid) -> StoreResult<bool> {
        let res = sqlx::query("DELETE FROM budgets WHERE id = ?")
            .bind(id.to_string())
            .execute(&self.pool)
            .await
            .map_err(be)?;
        Ok(res.rows_affected() > 0)
    }

    /// [`KernelStore::get_reservation`].
    pub(super) async fn sql_get_reservation(&self, id: Uuid) -> StoreResult<Option<Reservation>> {
        let row = sqlx::query("SELECT * FROM reservations WHERE id = ?")
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await
            .map_err(be)?;
        row.as_ref().map(reservation_from_row).transpose()
    }

    /// [`KernelStore::extend_holds`].
    pub(super) async fn sql_extend_holds(&self, ids: &[Uuid], until: DateTime<Utc>) -> StoreResult<u64> {
        if ids.is_empty() {
            return Ok(0);
        }
        let mut qb = QueryBuilder::<Sqlite>::new("UPDATE reservations SET expires_at = MAX(expires_at, ");
        qb.push_bind(micros(until)).push(") WHERE state = 'HELD'");
        push_in(&mut qb, "id", ids.iter().map(Uuid::to_string));
        let res = qb.build().execute(&self.pool).await.map_err(be)?;
        Ok(res.rows_affected())
    }
}
