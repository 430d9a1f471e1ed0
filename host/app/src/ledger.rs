//! Usage from the append-only ledger, and budgets (set, list, delete, report), all within the
//! caller's scope.

use chrono::{DateTime, Utc};
use keel_kernel::Kernel;
use keel_kernel::ledger::{
    Budget, BudgetLimits, BudgetStatus, BudgetWindow, ExceedStrategy, LedgerEvent, LedgerQuery, Usage, UsageQuery,
};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::caller::{Caller, Role};
use crate::error::AppError;

/// Whose usage, over which range.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UsageRequest {
    /// Only this principal.
    pub principal: Option<String>,
    /// Only this session.
    pub session: Option<String>,
    /// Only this job.
    pub job_id: Option<Uuid>,
    /// `at >= since`.
    pub since: Option<DateTime<Utc>>,
    /// `at < until`.
    pub until: Option<DateTime<Utc>>,
    /// Also return every entry in the range (each tool call's with its receipt in `data.receipt`).
    pub entries: bool,
}

/// Summed usage, and the entries when asked for.
#[derive(Debug, Clone, Serialize)]
pub struct UsageReport {
    /// The scope.
    pub scope: String,
    /// The principal filter.
    pub principal: Option<String>,
    /// The session filter.
    pub session: Option<String>,
    /// The job filter.
    pub job_id: Option<Uuid>,
    /// Range start.
    pub since: Option<DateTime<Utc>>,
    /// Range end (exclusive).
    pub until: Option<DateTime<Utc>>,
    /// Tokens, cost, model requests and tool calls of settled calls.
    pub usage: Usage,
    /// The entries, oldest first (only when [`UsageRequest::entries`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entries: Option<Vec<LedgerEvent>>,
}

/// The caller's usage.
pub async fn usage(kernel: &Kernel, caller: &Caller, request: &UsageRequest) -> Result<UsageReport, AppError> {
    caller.require(Role::Read)?;
    if let (Some(from), Some(to)) = (request.since, request.until)
        && from >= to
    {
        return Err(AppError::user(format!(
            "--since ({from}) must be before --until ({to})"
        )));
    }
    let query = UsageQuery {
        tenant: caller.scope.clone(),
        principal: request.principal.clone(),
        session: request.session.clone(),
        job_id: request.job_id,
        from: request.since,
        to: request.until,
    };
    let usage = kernel.ledger().usage(&query).await?;
    let entries = if request.entries {
        Some(
            kernel
                .ledger()
                .entries(&LedgerQuery {
                    tenant: caller.scope.clone(),
                    principal: query.principal.clone(),
                    session: query.session.clone(),
                    job_id: query.job_id,
                    from: query.from,
                    to: query.to,
                    ..LedgerQuery::default()
                })
                .await?,
        )
    } else {
        None
    };
    Ok(UsageReport {
        scope: caller.scope.clone(),
        principal: query.principal,
        session: query.session,
        job_id: query.job_id,
        since: query.from,
        until: query.to,
        usage,
        entries,
    })
}

/// A budget to create, or to replace the one with the same principal, session and window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetRequest {
    /// Only usage by this principal counts (and only its calls are checked).
    #[serde(default)]
    pub principal: Option<String>,
    /// Only usage in this session counts.
    #[serde(default)]
    pub session: Option<String>,
    /// The window.
    pub window: BudgetWindow,
    /// The limits (at least one).
    pub limits: BudgetLimits,
    /// Warn once usage reaches this fraction of a limit, in (0, 1].
    #[serde(default = "default_warn_at")]
    pub warn_at: Decimal,
    /// What happens past a limit.
    #[serde(default = "default_strategy")]
    pub on_exceed: ExceedStrategy,
    /// Name for humans (default: derived from the subject and window).
    #[serde(default)]
    pub name: Option<String>,
}

fn default_warn_at() -> Decimal {
    Decimal::new(8, 1)
}

fn default_strategy() -> ExceedStrategy {
    ExceedStrategy::Deny
}

/// A window's name as the CLI and API spell it (`request` for per-request).
pub fn window_name(w: BudgetWindow) -> &'static str {
    match w {
        BudgetWindow::PerRequest => "request",
        other => other.as_str(),
    }
}

/// Create or replace a budget of the caller's scope. "Set" is idempotent per subject and
/// window: it replaces rather than stacks budgets.
pub async fn set_budget(kernel: &Kernel, caller: &Caller, request: BudgetRequest) -> Result<Budget, AppError> {
    caller.require(Role::Admin)?;
    if request.limits == BudgetLimits::default() {
        return Err(AppError::user(
            "a budget needs at least one of --max-tokens, --max-cost, --max-requests, --max-tool-calls",
        ));
    }
    let warn_at = request.warn_at;
    if warn_at.is_zero() || warn_at.is_sign_negative() || warn_at > Decimal::ONE {
        return Err(AppError::user(format!("--warn-at {warn_at} must be in (0, 1]")));
    }
    let scope = &caller.scope;
    if scope.trim().is_empty() {
        return Err(AppError::user("--scope must not be empty"));
    }
    let BudgetRequest {
        principal,
        session,
        window,
        ..
    } = request;
    let existing = kernel
        .ledger()
        .budgets(scope)
        .await?
        .into_iter()
        .find(|b| b.principal == principal && b.session == session && b.window == window);
    let mut budget = existing.unwrap_or_else(|| Budget::new(scope.clone(), String::new(), window));
    budget.name = request.name.unwrap_or_else(|| {
        let subject = match (&principal, &session) {
            (Some(p), Some(s)) => format!("{p}@{s}"),
            (Some(p), None) => p.clone(),
            (None, Some(s)) => format!("session {s}"),
            (None, None) => scope.clone(),
        };
        format!("{subject} {}", window_name(window))
    });
    budget.principal = principal;
    budget.session = session;
    budget.limits = request.limits;
    budget.warn_ratio = warn_at;
    budget.strategy = request.on_exceed;
    kernel.ledger().put_budget(budget.clone()).await?;
    Ok(budget)
}

/// The caller's budgets.
pub async fn list_budgets(kernel: &Kernel, caller: &Caller) -> Result<Vec<Budget>, AppError> {
    caller.require(Role::Read)?;
    Ok(kernel.ledger().budgets(&caller.scope).await?)
}

/// Delete one of the caller's budgets and return it.
pub async fn delete_budget(kernel: &Kernel, caller: &Caller, id: Uuid) -> Result<Budget, AppError> {
    caller.require(Role::Admin)?;
    // The store deletes by bare id: find it in the caller's scope first so scopes stay isolated.
    let scope = &caller.scope;
    let budget = kernel
        .ledger()
        .budgets(scope)
        .await?
        .into_iter()
        .find(|b| b.id == id)
        .ok_or_else(|| AppError::not_found(format!("budget {id} not found in scope {scope}")))?;
    kernel.ledger().delete_budget(id).await?;
    Ok(budget)
}

/// The caller's budgets with their usage in the current window.
pub async fn budget_report(kernel: &Kernel, caller: &Caller) -> Result<Vec<BudgetStatus>, AppError> {
    caller.require(Role::Read)?;
    Ok(kernel.ledger().budget_report(&caller.scope).await?)
}
