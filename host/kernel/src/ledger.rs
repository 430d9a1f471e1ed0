//! Ledger and budgets: append-only usage records, budget windows, and reserve -> settle.
//!
//! Costs are `rust_decimal::Decimal`, never floats. Durable stores keep them as integer
//! nano-units ([`cost_to_nanos`]) so sums are exact in SQL; a cost finer than 1e-9 is refused
//! rather than rounded.
//!
//! Reserve -> settle: before a call, its worst-case usage is *held* in one store transaction that
//! also checks every applicable budget against settled usage plus all live holds, so concurrent
//! calls can never overspend. After the call the hold is *settled* with the actual usage (or
//! *released* on failure). Holds expire, and the recovery sweep releases expired ones, so a crash
//! never leaves budget locked forever.

use std::fmt;
use std::ops::{Add, AddAssign};
use std::str::FromStr;

use chrono::{DateTime, Datelike, TimeZone, Utc};
use rust_decimal::Decimal;
use rust_decimal::prelude::ToPrimitive;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::action::string_enum;
use crate::json::JsonText;

/// Decimal places kept for costs by durable stores.
pub const COST_SCALE: u32 = 9;

/// A cost that cannot be stored exactly.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CostError {
    /// Negative costs are not allowed.
    #[error("cost {0} is negative")]
    Negative(Decimal),
    /// More than [`COST_SCALE`] decimal places.
    #[error("cost {0} has more than 9 decimal places")]
    TooPrecise(Decimal),
    /// Does not fit in an i64 of nano-units.
    #[error("cost {0} is too large")]
    TooLarge(Decimal),
}

/// Convert a cost to integer nano-units, exactly.
pub fn cost_to_nanos(cost: Decimal) -> Result<i64, CostError> {
    if cost.is_sign_negative() && !cost.is_zero() {
        return Err(CostError::Negative(cost));
    }
    let scaled = cost
        .checked_mul(Decimal::from(1_000_000_000u64))
        .ok_or(CostError::TooLarge(cost))?;
    if !scaled.fract().is_zero() {
        return Err(CostError::TooPrecise(cost));
    }
    scaled.to_i64().ok_or(CostError::TooLarge(cost))
}

/// Convert integer nano-units back to a (normalized) cost.
pub fn cost_from_nanos(nanos: i64) -> Decimal {
    Decimal::new(nanos, COST_SCALE).normalize()
}

/// An amount of consumption.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Model tokens (input + output).
    pub tokens: u64,
    /// Cost.
    pub cost: Decimal,
    /// Model requests.
    pub requests: u64,
    /// Tool calls.
    pub tool_calls: u64,
}

impl Usage {
    /// The most a counter holds: every store keeps counters as signed 64-bit integers.
    pub const MAX_COUNT: u64 = i64::MAX as u64;

    /// The largest cost a store keeps: `i64::MAX` nano-units.
    pub const MAX_COST: Decimal = Decimal::from_parts(u32::MAX, 0x7FFF_FFFF, 0, false, COST_SCALE);

    /// Nothing.
    pub fn zero() -> Self {
        Self::default()
    }

    /// Just a cost.
    pub fn cost(cost: Decimal) -> Self {
        Self {
            cost,
            ..Self::default()
        }
    }

    /// Check the cost can be stored exactly.
    pub fn validate(&self) -> Result<(), CostError> {
        cost_to_nanos(self.cost).map(|_| ())
    }

    /// This usage as a store keeps it: each counter at most [`Self::MAX_COUNT`] and the cost at
    /// most [`Self::MAX_COST`]. What a model or tool reports is recorded, however large, as "at
    /// least the most a counter holds" rather than refused (the entry would be lost).
    pub fn capped(mut self) -> Self {
        self.tokens = self.tokens.min(Self::MAX_COUNT);
        self.requests = self.requests.min(Self::MAX_COUNT);
        self.tool_calls = self.tool_calls.min(Self::MAX_COUNT);
        self.cost = self.cost.min(Self::MAX_COST);
        self
    }

    /// Whether every metric is zero.
    pub fn is_zero(&self) -> bool {
        self.tokens == 0 && self.cost.is_zero() && self.requests == 0 && self.tool_calls == 0
    }
}

impl Add for Usage {
    type Output = Usage;
    fn add(mut self, rhs: Usage) -> Usage {
        self += rhs;
        self
    }
}

/// Sums stop at the most a store keeps ([`Usage::MAX_COUNT`], [`Usage::MAX_COST`]): a sum that
/// wrapped would let a budget through, and one a store cannot read back would fail every check.
impl AddAssign for Usage {
    fn add_assign(&mut self, rhs: Usage) {
        let count = |a: u64, b: u64| a.saturating_add(b).min(Self::MAX_COUNT);
        self.tokens = count(self.tokens, rhs.tokens);
        self.requests = count(self.requests, rhs.requests);
        self.tool_calls = count(self.tool_calls, rhs.tool_calls);
        self.cost = self
            .cost
            .checked_add(rhs.cost)
            .map_or(Self::MAX_COST, |c| c.min(Self::MAX_COST));
    }
}

string_enum! {
    /// Kind of ledger entry.
    LedgerKind, "ledger kind" {
        /// A model call's actual usage (counts against budgets).
        ModelUsage => "model_usage",
        /// A tool call's actual usage (counts against budgets).
        ToolUsage => "tool_usage",
        /// A budget check that warned, degraded or denied.
        BudgetCheck => "budget_check",
        /// Anything worth an audit trail.
        Audit => "audit",
        /// A reservation was taken.
        Hold => "hold",
        /// A reservation was settled.
        Settle => "settle",
        /// A reservation was released.
        Release => "release",
        /// Usage beyond what its hold covered (a provider reporting more than the estimate, or a
        /// call settled after its hold lapsed). Counts against budgets: it was really spent.
        Overage => "overage",
    }
}

impl LedgerKind {
    /// Whether entries of this kind count as consumption. Holds are counted from the
    /// reservation table instead, so nothing is counted twice.
    pub fn counts_as_usage(self) -> bool {
        matches!(
            self,
            LedgerKind::ModelUsage | LedgerKind::ToolUsage | LedgerKind::Overage
        )
    }
}

/// An entry to append; the store assigns the id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewLedgerEvent {
    /// Kind.
    pub kind: LedgerKind,
    /// Tenant scope.
    pub tenant: String,
    /// Principal.
    pub principal: Option<String>,
    /// Session.
    pub session: Option<String>,
    /// Job.
    pub job_id: Option<Uuid>,
    /// Reservation this entry belongs to.
    pub reservation_id: Option<Uuid>,
    /// Amounts.
    pub usage: Usage,
    /// Duration of the call, in milliseconds.
    pub duration_ms: Option<u64>,
    /// Model used.
    pub model: Option<String>,
    /// Tool called.
    pub tool: Option<String>,
    /// Extra data (JSON: a tool call's receipt, a budget verdict, ...).
    pub data: JsonText,
    /// When.
    pub at: DateTime<Utc>,
}

impl NewLedgerEvent {
    /// An entry of `kind` for `tenant` at `at`, everything else empty.
    pub fn new(kind: LedgerKind, tenant: impl Into<String>, at: DateTime<Utc>) -> Self {
        Self {
            kind,
            tenant: tenant.into(),
            principal: None,
            session: None,
            job_id: None,
            reservation_id: None,
            usage: Usage::zero(),
            duration_ms: None,
            model: None,
            tool: None,
            data: JsonText::null(),
            at,
        }
    }
}

/// A stored ledger entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LedgerEvent {
    /// Store-wide increasing id.
    pub id: i64,
    /// The entry.
    #[serde(flatten)]
    pub entry: NewLedgerEvent,
}

/// Filters for reading the ledger.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LedgerQuery {
    /// Tenant scope.
    pub tenant: String,
    /// Only these kinds (any if empty).
    pub kinds: Vec<LedgerKind>,
    /// Only this principal.
    pub principal: Option<String>,
    /// Only this session.
    pub session: Option<String>,
    /// Only this job.
    pub job_id: Option<Uuid>,
    /// `at >= from`.
    pub from: Option<DateTime<Utc>>,
    /// `at < to`.
    pub to: Option<DateTime<Utc>>,
    /// At most this many (oldest first).
    pub limit: Option<u32>,
}

impl LedgerQuery {
    /// Whether `e` passes (ignores `limit`).
    pub fn matches(&self, e: &NewLedgerEvent) -> bool {
        e.tenant == self.tenant
            && (self.kinds.is_empty() || self.kinds.contains(&e.kind))
            && self.principal.as_ref().is_none_or(|p| e.principal.as_ref() == Some(p))
            && self.session.as_ref().is_none_or(|s| e.session.as_ref() == Some(s))
            && self.job_id.is_none_or(|j| e.job_id == Some(j))
            && self.from.is_none_or(|f| e.at >= f)
            && self.to.is_none_or(|t| e.at < t)
    }
}

string_enum! {
    /// The window a budget limits.
    BudgetWindow, "budget window" {
        /// Each single request on its own.
        PerRequest => "per_request",
        /// The current UTC day.
        Daily => "daily",
        /// The current UTC month.
        Monthly => "monthly",
        /// All time.
        Total => "total",
    }
}

impl BudgetWindow {
    /// Start of the window containing `now` (`None` for total and per-request).
    pub fn start(self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self {
            BudgetWindow::PerRequest | BudgetWindow::Total => None,
            BudgetWindow::Daily => Utc
                .with_ymd_and_hms(now.year(), now.month(), now.day(), 0, 0, 0)
                .single(),
            BudgetWindow::Monthly => Utc.with_ymd_and_hms(now.year(), now.month(), 1, 0, 0, 0).single(),
        }
    }
}

string_enum! {
    /// What happens when a budget would be exceeded.
    ExceedStrategy, "exceed strategy" {
        /// Allow, with a warning.
        Warn => "warn",
        /// Refuse.
        Deny => "deny",
        /// Allow, but tell the caller to degrade (cheaper model, fewer tools).
        Degrade => "degrade",
    }
}

/// Limits of one budget; `None` = unlimited.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BudgetLimits {
    /// Tokens.
    pub max_tokens: Option<u64>,
    /// Cost.
    pub max_cost: Option<Decimal>,
    /// Model requests.
    pub max_requests: Option<u64>,
    /// Tool calls.
    pub max_tool_calls: Option<u64>,
}

/// A budget over one window for a tenant, a principal or a session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Budget {
    /// Id.
    pub id: Uuid,
    /// Tenant scope.
    pub tenant: String,
    /// If set, only usage by this principal counts and only its requests are checked.
    pub principal: Option<String>,
    /// If set, only usage in this session counts and only its requests are checked.
    pub session: Option<String>,
    /// Name for humans.
    pub name: String,
    /// Window.
    pub window: BudgetWindow,
    /// Limits.
    pub limits: BudgetLimits,
    /// Warn once projected usage reaches this fraction of a limit (e.g. 0.8).
    pub warn_ratio: Decimal,
    /// What to do when a limit would be exceeded.
    pub strategy: ExceedStrategy,
}

impl Budget {
    /// A tenant-wide deny budget over `window` with no limits yet.
    pub fn new(tenant: impl Into<String>, name: impl Into<String>, window: BudgetWindow) -> Self {
        Self {
            id: Uuid::now_v7(),
            tenant: tenant.into(),
            principal: None,
            session: None,
            name: name.into(),
            window,
            limits: BudgetLimits::default(),
            warn_ratio: Decimal::new(8, 1),
            strategy: ExceedStrategy::Deny,
        }
    }

    /// Whether the budget governs a request by `principal` in `session` of `tenant`.
    pub fn applies_to(&self, tenant: &str, principal: Option<&str>, session: Option<&str>) -> bool {
        self.tenant == tenant
            && self.principal.as_deref().is_none_or(|p| principal == Some(p))
            && self.session.as_deref().is_none_or(|s| session == Some(s))
    }

    /// Whether an entry counts against this budget (same subject, inside the window).
    pub fn counts(&self, e: &NewLedgerEvent, now: DateTime<Utc>) -> bool {
        e.kind.counts_as_usage()
            && self.applies_to(&e.tenant, e.principal.as_deref(), e.session.as_deref())
            && self.window.start(now).is_none_or(|s| e.at >= s)
    }
}

/// A budget and what currently counts against it (settled usage in the window + live holds).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BudgetStatus {
    /// The budget.
    pub budget: Budget,
    /// Usage counted against it.
    pub used: Usage,
}

string_enum! {
    /// Result of a budget check, ordered by severity.
    BudgetOutcome, "budget outcome" {
        /// Within all budgets.
        Allow => "allow",
        /// Allowed; a warning threshold was crossed or a warn-budget exceeded.
        Warn => "warn",
        /// Allowed; the caller should degrade.
        Degrade => "degrade",
        /// Refused.
        Deny => "deny",
    }
}

impl BudgetOutcome {
    fn severity(self) -> u8 {
        match self {
            BudgetOutcome::Allow => 0,
            BudgetOutcome::Warn => 1,
            BudgetOutcome::Degrade => 2,
            BudgetOutcome::Deny => 3,
        }
    }

    /// Whether the call may proceed.
    pub fn is_allowed(self) -> bool {
        self != BudgetOutcome::Deny
    }
}

/// One limit that was crossed or approached.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BudgetFinding {
    /// Budget id.
    pub budget_id: Uuid,
    /// Budget name.
    pub budget_name: String,
    /// Window.
    pub window: BudgetWindow,
    /// `tokens`, `cost`, `requests` or `tool_calls`.
    pub metric: String,
    /// The limit.
    pub limit: Decimal,
    /// Usage including this request.
    pub projected: Decimal,
    /// Whether the limit is exceeded (else only the warning threshold).
    pub exceeded: bool,
}

/// The verdict of a budget check.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BudgetDecision {
    /// Most severe outcome.
    pub outcome: BudgetOutcome,
    /// Every limit crossed or approached.
    pub findings: Vec<BudgetFinding>,
}

impl fmt::Display for BudgetDecision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.outcome)?;
        for x in &self.findings {
            write!(
                f,
                "; {} ({}) {} {} of {}{}",
                x.budget_name,
                x.window,
                x.metric,
                x.projected,
                x.limit,
                if x.exceeded { " exceeded" } else { "" }
            )?;
        }
        Ok(())
    }
}

/// Decide whether `requested` fits in every budget of `statuses`. Pure; both stores call it
/// inside their reservation transaction.
pub fn evaluate_budgets(requested: &Usage, statuses: &[BudgetStatus]) -> BudgetDecision {
    let mut outcome = BudgetOutcome::Allow;
    let mut findings = Vec::new();
    for status in statuses {
        let b = &status.budget;
        let projected = if b.window == BudgetWindow::PerRequest {
            requested.clone()
        } else {
            status.used.clone() + requested.clone()
        };
        let metrics = [
            (
                "tokens",
                b.limits.max_tokens.map(Decimal::from),
                Decimal::from(projected.tokens),
            ),
            ("cost", b.limits.max_cost, projected.cost),
            (
                "requests",
                b.limits.max_requests.map(Decimal::from),
                Decimal::from(projected.requests),
            ),
            (
                "tool_calls",
                b.limits.max_tool_calls.map(Decimal::from),
                Decimal::from(projected.tool_calls),
            ),
        ];
        for (metric, limit, value) in metrics {
            let Some(limit) = limit else { continue };
            let exceeded = value > limit;
            let this = if exceeded {
                match b.strategy {
                    ExceedStrategy::Warn => BudgetOutcome::Warn,
                    ExceedStrategy::Deny => BudgetOutcome::Deny,
                    ExceedStrategy::Degrade => BudgetOutcome::Degrade,
                }
            } else if value >= limit * b.warn_ratio && !value.is_zero() {
                BudgetOutcome::Warn
            } else {
                continue;
            };
            if this.severity() > outcome.severity() {
                outcome = this;
            }
            findings.push(BudgetFinding {
                budget_id: b.id,
                budget_name: b.name.clone(),
                window: b.window,
                metric: metric.to_string(),
                limit,
                projected: value,
                exceeded,
            });
        }
    }
    BudgetDecision { outcome, findings }
}

string_enum! {
    /// Lifecycle of a reservation.
    ReservationState, "reservation state" {
        /// Holding budget.
        Held => "HELD",
        /// Settled with actual usage (terminal).
        Settled => "SETTLED",
        /// Released without usage (terminal).
        Released => "RELEASED",
    }
}

/// A request to hold budget.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReserveRequest {
    /// Tenant.
    pub tenant: String,
    /// Principal.
    pub principal: Option<String>,
    /// Session.
    pub session: Option<String>,
    /// Job.
    pub job_id: Option<Uuid>,
    /// Worst-case usage.
    pub amount: Usage,
    /// Now (window boundaries and live-hold cut-off).
    pub now: DateTime<Utc>,
    /// When the hold lapses if never settled.
    pub expires_at: DateTime<Utc>,
}

/// Budget held for one call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reservation {
    /// Id.
    pub id: Uuid,
    /// Tenant.
    pub tenant: String,
    /// Principal.
    pub principal: Option<String>,
    /// Session.
    pub session: Option<String>,
    /// Job.
    pub job_id: Option<Uuid>,
    /// Amount held.
    pub amount: Usage,
    /// State.
    pub state: ReservationState,
    /// Actual usage, once settled.
    pub actual: Option<Usage>,
    /// When taken.
    pub created_at: DateTime<Utc>,
    /// When it lapses.
    pub expires_at: DateTime<Utc>,
    /// When settled or released.
    pub closed_at: Option<DateTime<Utc>>,
}

impl Reservation {
    /// A new HELD reservation for `req` (what every store inserts once the budget check passed).
    pub fn held(req: &ReserveRequest) -> Self {
        Self {
            id: Uuid::now_v7(),
            tenant: req.tenant.clone(),
            principal: req.principal.clone(),
            session: req.session.clone(),
            job_id: req.job_id,
            amount: req.amount.clone(),
            state: ReservationState::Held,
            actual: None,
            created_at: req.now,
            expires_at: req.expires_at,
            closed_at: None,
        }
    }

    /// Whether it still holds budget at `now`.
    pub fn is_live(&self, now: DateTime<Utc>) -> bool {
        self.state == ReservationState::Held && self.expires_at > now
    }

    /// How settling it with `actual` at `now` splits. A live hold covers its amount; a hold that
    /// lapsed (expired, or released by the sweep) covers nothing, since other calls may have
    /// been granted that room since. The one place both stores take the arithmetic from.
    pub fn settle_plan(&self, actual: &Usage, now: DateTime<Utc>) -> SettlePlan {
        let covered = if self.is_live(now) {
            self.amount.clone()
        } else {
            Usage::zero()
        };
        let charged = Usage {
            tokens: actual.tokens.min(covered.tokens),
            cost: actual.cost.min(covered.cost).max(Decimal::ZERO),
            requests: actual.requests.min(covered.requests),
            tool_calls: actual.tool_calls.min(covered.tool_calls),
        };
        let overage = Usage {
            tokens: actual.tokens - charged.tokens,
            cost: (actual.cost - charged.cost).max(Decimal::ZERO),
            requests: actual.requests - charged.requests,
            tool_calls: actual.tool_calls - charged.tool_calls,
        };
        // Only an overage entry carries it: the common settlement builds none.
        let data = if overage.is_zero() {
            JsonText::null()
        } else {
            serde_json::json!({
                "held": covered,
                "actual": actual,
                "lapsed": !self.is_live(now),
            })
            .into()
        };
        SettlePlan { charged, overage, data }
    }
}

impl Reservation {
    /// For a settled reservation: the usage recorded beyond its hold (as [`settle_plan`](Self::settle_plan)
    /// split it when it was settled); zero otherwise.
    pub fn overage(&self) -> Usage {
        match (&self.actual, self.closed_at) {
            (Some(actual), Some(at)) if self.state == ReservationState::Settled => {
                let held = Reservation {
                    state: ReservationState::Held,
                    ..self.clone()
                };
                held.settle_plan(actual, at).overage
            }
            _ => Usage::zero(),
        }
    }
}

/// How a settlement is recorded (see [`Reservation::settle_plan`]).
#[derive(Debug, Clone, PartialEq)]
pub struct SettlePlan {
    /// The usage entry: the part of the actual usage the hold covered.
    pub charged: Usage,
    /// Usage beyond the hold: an [`LedgerKind::Overage`] entry when not zero. It counts against
    /// budgets like any usage (it was spent); the caller stops spending if a budget is crossed.
    pub overage: Usage,
    /// The overage entry's data: what was held, what was reported, whether the hold had lapsed
    /// (`null` when there is no overage).
    pub data: JsonText,
}

/// What a store's reserve returns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReserveOutcome {
    /// The budget verdict.
    pub decision: BudgetDecision,
    /// The hold, unless denied.
    pub reservation: Option<Reservation>,
}

/// Actual usage reported for a held call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SettleRequest {
    /// Reservation to settle.
    pub reservation_id: Uuid,
    /// `ModelUsage` or `ToolUsage`.
    pub kind: LedgerKind,
    /// Actual usage.
    pub actual: Usage,
    /// Call duration.
    pub duration_ms: Option<u64>,
    /// Model used.
    pub model: Option<String>,
    /// Tool called.
    pub tool: Option<String>,
    /// Extra data (JSON), recorded with the usage entry.
    pub data: JsonText,
    /// Now.
    pub now: DateTime<Utc>,
}

/// A usage total query.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct UsageQuery {
    /// Tenant.
    pub tenant: String,
    /// Only this principal.
    pub principal: Option<String>,
    /// Only this session.
    pub session: Option<String>,
    /// Only this job.
    pub job_id: Option<Uuid>,
    /// `at >= from`.
    pub from: Option<DateTime<Utc>>,
    /// `at < to`.
    pub to: Option<DateTime<Utc>>,
}

impl UsageQuery {
    /// The equivalent ledger query over usage kinds.
    pub fn as_ledger_query(&self) -> LedgerQuery {
        LedgerQuery {
            tenant: self.tenant.clone(),
            kinds: vec![LedgerKind::ModelUsage, LedgerKind::ToolUsage, LedgerKind::Overage],
            principal: self.principal.clone(),
            session: self.session.clone(),
            job_id: self.job_id,
            from: self.from,
            to: self.to,
            limit: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nanos_are_exact() {
        let c = Decimal::from_str("0.000000001").unwrap();
        assert_eq!(cost_to_nanos(c).unwrap(), 1);
        assert_eq!(cost_from_nanos(1), c);
        assert_eq!(
            cost_from_nanos(cost_to_nanos(Decimal::from_str("12.5").unwrap()).unwrap()).to_string(),
            "12.5"
        );
        assert!(matches!(
            cost_to_nanos(Decimal::from_str("0.0000000001").unwrap()),
            Err(CostError::TooPrecise(_))
        ));
        assert!(matches!(cost_to_nanos(Decimal::from(-1)), Err(CostError::Negative(_))));
        // The largest cost a store keeps is exactly `i64::MAX` nano-units.
        assert_eq!(cost_to_nanos(Usage::MAX_COST).unwrap(), i64::MAX);
        assert_eq!(cost_from_nanos(i64::MAX), Usage::MAX_COST);
    }

    #[test]
    fn sums_stop_at_what_a_store_keeps() {
        let top = Usage {
            tokens: u64::MAX,
            cost: Decimal::MAX,
            requests: Usage::MAX_COUNT,
            tool_calls: 1,
        };
        let sum = top.clone() + top.clone();
        assert_eq!(
            (sum.tokens, sum.requests, sum.tool_calls),
            (Usage::MAX_COUNT, Usage::MAX_COUNT, 2)
        );
        assert_eq!(sum.cost, Usage::MAX_COST);
        assert_eq!(top.capped().tokens, Usage::MAX_COUNT);
    }

    #[test]
    fn windows_and_evaluation() {
        let now = Utc.with_ymd_and_hms(2026, 3, 15, 13, 4, 5).unwrap();
        assert_eq!(
            BudgetWindow::Daily.start(now),
            Utc.with_ymd_and_hms(2026, 3, 15, 0, 0, 0).single()
        );
        assert_eq!(
            BudgetWindow::Monthly.start(now),
            Utc.with_ymd_and_hms(2026, 3, 1, 0, 0, 0).single()
        );

        let mut b = Budget::new("t", "daily", BudgetWindow::Daily);
        b.limits.max_cost = Some(Decimal::from(10));
        let status = |b: &Budget, used: i64| BudgetStatus {
            budget: b.clone(),
            used: Usage::cost(Decimal::from(used)),
        };
        let req = Usage::cost(Decimal::from(1));
        assert_eq!(evaluate_budgets(&req, &[status(&b, 1)]).outcome, BudgetOutcome::Allow);
        assert_eq!(evaluate_budgets(&req, &[status(&b, 7)]).outcome, BudgetOutcome::Warn);
        assert_eq!(
            evaluate_budgets(&req, &[status(&b, 9)]).outcome,
            BudgetOutcome::Warn,
            "exactly at the limit is allowed"
        );
        let denied = evaluate_budgets(&req, &[status(&b, 10)]);
        assert_eq!(denied.outcome, BudgetOutcome::Deny);
        assert!(denied.findings[0].exceeded);
        b.strategy = ExceedStrategy::Degrade;
        assert_eq!(
            evaluate_budgets(&req, &[status(&b, 10)]).outcome,
            BudgetOutcome::Degrade
        );
        b.window = BudgetWindow::PerRequest;
        assert_eq!(evaluate_budgets(&req, &[status(&b, 100)]).outcome, BudgetOutcome::Allow);
    }
}
