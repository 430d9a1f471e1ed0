//! [`Ledger`]: budgets, holds (reservations), settlements and ledger queries.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::context::ExecutionContext;
use crate::error::{KernelError, KernelResult};
use crate::json::JsonText;
use crate::ledger::{
    Budget, LedgerEvent, LedgerKind, LedgerQuery, NewLedgerEvent, Reservation, ReserveRequest, SettleRequest, Usage,
    UsageQuery, evaluate_budgets,
};
use crate::store::StoreError;

use super::Core;

/// A budget hold request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HoldRequest {
    /// Tenant.
    pub tenant: String,
    /// Principal.
    pub principal: Option<String>,
    /// Session.
    pub session: Option<String>,
    /// Job.
    pub job_id: Option<Uuid>,
    /// Worst-case usage of the call.
    pub amount: Usage,
    /// Hold lifetime (default: `KernelConfig::hold_ttl_secs`).
    pub ttl: Option<chrono::Duration>,
}

impl HoldRequest {
    /// Hold `amount` for the subject of `ctx`.
    pub fn from_context(ctx: &ExecutionContext, amount: Usage) -> Self {
        Self {
            tenant: ctx.tenant.clone(),
            principal: ctx.principal.clone(),
            session: ctx.session.clone(),
            job_id: ctx.job_id,
            amount,
            ttl: None,
        }
    }
}

/// A successful hold.
#[derive(Debug, Clone, PartialEq)]
pub struct Reserved {
    /// The hold.
    pub reservation: Reservation,
    /// The budget verdict (allow, warn or degrade).
    pub decision: crate::ledger::BudgetDecision,
}

/// Details of a settlement.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SettleDetails {
    /// Call duration.
    pub duration_ms: Option<u64>,
    /// Model used.
    pub model: Option<String>,
    /// Tool called.
    pub tool: Option<String>,
    /// Extra data (JSON).
    pub data: JsonText,
}

/// The ledger and budgets.
#[derive(Debug, Clone)]
pub struct Ledger {
    pub(super) core: Arc<Core>,
}

fn invalid_cost(e: crate::ledger::CostError) -> KernelError {
    KernelError::Invalid(e.to_string())
}

impl Ledger {
    /// Create or replace a budget.
    pub async fn put_budget(&self, budget: Budget) -> KernelResult<()> {
        if let Some(c) = budget.limits.max_cost {
            crate::ledger::cost_to_nanos(c).map_err(invalid_cost)?;
        }
        Ok(self.core.store.put_budget(budget).await?)
    }

    /// Budgets of a tenant.
    pub async fn budgets(&self, tenant: &str) -> KernelResult<Vec<Budget>> {
        Ok(self.core.store.list_budgets(tenant).await?)
    }

    /// Delete a budget; whether it existed.
    pub async fn delete_budget(&self, id: Uuid) -> KernelResult<bool> {
        Ok(self.core.store.delete_budget(id).await?)
    }

    /// Hold the worst-case usage of a call against every applicable budget, atomically. Denied
    /// -> `BudgetExceeded` and nothing held.
    pub async fn reserve(&self, mut request: HoldRequest) -> KernelResult<Reserved> {
        request.amount = request.amount.capped();
        request.amount.validate().map_err(invalid_cost)?;
        let now = self.core.now();
        let ttl = request
            .ttl
            .unwrap_or_else(|| chrono::Duration::seconds(self.core.config.hold_ttl_secs));
        let req = ReserveRequest {
            tenant: request.tenant,
            principal: request.principal,
            session: request.session,
            job_id: request.job_id,
            amount: request.amount,
            now,
            expires_at: now + ttl,
        };
        let outcome = self.core.store.reserve(req, evaluate_budgets).await?;
        match outcome.reservation {
            Some(reservation) => Ok(Reserved {
                reservation,
                decision: outcome.decision,
            }),
            None => Err(KernelError::BudgetExceeded(outcome.decision)),
        }
    }

    /// Settle a hold with the actual usage (`kind`: model or tool usage).
    pub async fn settle(
        &self,
        id: Uuid,
        kind: LedgerKind,
        actual: Usage,
        details: SettleDetails,
    ) -> KernelResult<Reservation> {
        if !matches!(kind, LedgerKind::ModelUsage | LedgerKind::ToolUsage) {
            return Err(KernelError::Invalid(format!("settle needs a usage kind, not {kind}")));
        }
        let actual = actual.capped();
        actual.validate().map_err(invalid_cost)?;
        let req = SettleRequest {
            reservation_id: id,
            kind,
            actual,
            duration_ms: details.duration_ms,
            model: details.model,
            tool: details.tool,
            data: details.data,
            now: self.core.now(),
        };
        match self.core.store.settle(req).await {
            Ok(r) => Ok(r),
            Err(e) => Err(self.reservation_error(id, e).await),
        }
    }

    /// Release a hold without usage (the call failed or was not made).
    pub async fn release(&self, id: Uuid, reason: &str) -> KernelResult<Reservation> {
        let r = self.core.store.release(id, self.core.now(), reason.to_string()).await;
        match r {
            Ok(r) => Ok(r),
            Err(e) => Err(self.reservation_error(id, e).await),
        }
    }

    async fn reservation_error(&self, id: Uuid, e: StoreError) -> KernelError {
        match e {
            StoreError::NotFound {
                entity: "reservation", ..
            } => KernelError::ReservationNotFound(id),
            StoreError::Conflict {
                entity: "reservation", ..
            } => match self.core.store.get_reservation(id).await {
                Ok(Some(r)) => KernelError::ReservationState { id, state: r.state },
                Ok(None) => KernelError::ReservationNotFound(id),
                Err(e) => e.into(),
            },
            e => e.into(),
        }
    }

    /// Each budget of `tenant` with its settled usage in the current window (live holds are not
    /// included: this is a report, not a check). For `keel budgets` and dashboards.
    pub async fn budget_report(&self, tenant: &str) -> KernelResult<Vec<crate::ledger::BudgetStatus>> {
        let now = self.core.now();
        let mut out = Vec::new();
        for budget in self.core.store.list_budgets(tenant).await? {
            let used = self.core.store.budget_used(&budget, now).await?;
            out.push(crate::ledger::BudgetStatus { budget, used });
        }
        Ok(out)
    }

    /// A reservation by id.
    pub async fn reservation(&self, id: Uuid) -> KernelResult<Reservation> {
        self.core
            .store
            .get_reservation(id)
            .await?
            .ok_or(KernelError::ReservationNotFound(id))
    }

    /// Append an entry directly (usage outside reserve/settle, audit records).
    pub async fn record(&self, mut entry: NewLedgerEvent) -> KernelResult<LedgerEvent> {
        entry.usage = entry.usage.capped();
        entry.usage.validate().map_err(invalid_cost)?;
        Ok(self.core.store.append_ledger(entry).await?)
    }

    /// Ledger entries.
    pub async fn entries(&self, query: &LedgerQuery) -> KernelResult<Vec<LedgerEvent>> {
        Ok(self.core.store.list_ledger(query).await?)
    }

    /// Summed usage.
    pub async fn usage(&self, query: &UsageQuery) -> KernelResult<Usage> {
        Ok(self.core.store.usage(query).await?)
    }
}
