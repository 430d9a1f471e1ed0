//! The storage contract the kernel needs. keel-store implements it on SQLite; [`crate::memory`]
//! implements it in memory for tests; `crate::conformance` (feature `conformance`) is the test
//! suite every implementation must pass.
//!
//! The kernel owns the logic (state machines, budget evaluation); a store owns atomicity. Every
//! state change goes through [`KernelStore::commit`], which applies a [`Batch`] of job and action
//! writes plus the events they cause in one transaction, with optimistic concurrency on each
//! written row.

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

// Defined with the kernel's other errors (a leaf of the module graph); re-exported here, where the
// traits that return it live.
pub use crate::error::StoreError;
// Defined with the policy (a job names one); stored by a batch.
pub use crate::policy::PolicyText;

use crate::action::{Action, ActionFilter};
use crate::event::{EventQuery, NewEvent, RuntimeEvent};
use crate::job::{Job, JobFilter};
use crate::json::JsonText;
use crate::ledger::{
    Budget, BudgetDecision, BudgetOutcome, BudgetStatus, LedgerEvent, LedgerKind, LedgerQuery, NewLedgerEvent,
    Reservation, ReservationState, ReserveOutcome, ReserveRequest, SettleRequest, Usage, UsageQuery,
};

/// Result alias for store calls.
pub type StoreResult<T> = Result<T, StoreError>;

/// What [`KernelStore::commit_or_return`] comes to: the appended events, or the error with the
/// batch handed back, unapplied.
pub type CommitOrReturn = Result<Vec<RuntimeEvent>, (StoreError, Box<Batch>)>;

/// One job write. `expected_version: None` inserts (the job's `version` must be 1); `Some(v)`
/// updates only if the stored version is `v` (the job's `version` must be `v + 1`). An update
/// writes what can change; what is fixed at insert is kept ([`Job::keep_fixed_fields`]).
#[derive(Debug, Clone, PartialEq)]
pub struct JobWrite {
    /// The full new row.
    pub job: Job,
    /// Version expected in the store.
    pub expected_version: Option<u64>,
}

/// One action write, with the same version rules as [`JobWrite`].
#[derive(Debug, Clone, PartialEq)]
pub struct ActionWrite {
    /// The full new row.
    pub action: Action,
    /// Version expected in the store.
    pub expected_version: Option<u64>,
}

/// Writes applied atomically: all or nothing.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Batch {
    /// Job inserts/updates (applied in order).
    pub jobs: Vec<JobWrite>,
    /// Action inserts/updates (applied after jobs).
    pub actions: Vec<ActionWrite>,
    /// Events to append; each gets the next sequence number of its job.
    pub events: Vec<NewEvent>,
    /// Journal entries to append (after jobs and actions). A `(job_id, key)` that is already
    /// journaled fails the whole batch with `Conflict { entity: "journal" }`.
    pub journal: Vec<NewJournalEntry>,
    /// Reservations to settle in the same transaction (same rules as [`KernelStore::settle`]).
    pub settlements: Vec<SettleRequest>,
    /// Fencing: the batch applies only if each named job is not terminal (as it was before the
    /// batch) and its lease is held by the named owner under the named epoch (else
    /// `Conflict { entity: "lease" }`). A host that lost its lease can no longer write, even if
    /// the same owner id claimed the job again since.
    pub leases: Vec<LeaseGuard>,
    /// Leases taken in the same transaction (after jobs are written): a job created already
    /// claimed, so no polling worker can claim it in between. `Conflict { entity: "lease" }` if
    /// the job's lease is held by anyone at `now`. A job inserted by the same batch starts at
    /// epoch 0, so its claim here gets epoch 1 (the caller can fence its next writes without
    /// reading the lease back).
    pub claims: Vec<LeaseClaim>,
    /// Budget holds taken in the same transaction, after jobs and claims and before journal
    /// entries and settlements (which may name them: a hold and its settlement can share one
    /// batch). Each is planned by [`plan_hold`]; a hold whose budgets deny it fails the whole
    /// batch with `Conflict { entity: "budget" }`, with nothing applied (not even the
    /// `budget_check` entry a standalone [`KernelStore::reserve`] would record).
    pub holds: Vec<HoldWrite>,
    /// Leases dropped at the end of the same transaction (the job's last write also frees it),
    /// each only if owner and epoch still match (else nothing, like
    /// [`KernelStore::release_lease`]). The epoch counter is kept.
    pub lease_releases: Vec<LeaseGuard>,
    /// Policy texts the batch's jobs name by sha256 (see [`PolicyText`]), each stored unless a
    /// text of that sha256 already is (applied first).
    pub policy_texts: Vec<PolicyText>,
}

/// A budget hold taken inside a [`Batch`] (see [`Batch::holds`]): the governed call path writes
/// its hold with the call's job, its lease and its `started` journal entry in one transaction.
#[derive(Debug, Clone, PartialEq)]
pub struct HoldWrite {
    /// The reservation's id, chosen by the caller so that rows of the same batch (a journal
    /// entry, a settlement) can name it.
    pub id: Uuid,
    /// What to hold, for whom, until when.
    pub request: ReserveRequest,
    /// Check the budgets that apply (usage in their windows plus live holds, judged by
    /// [`crate::ledger::evaluate_budgets`] inside the transaction) and refuse the batch if the
    /// verdict is deny. `false` records the hold unchecked: only for a call whose caller found no
    /// budget applying just before (an idempotent call that commits once, after it ran, and
    /// whose usage is recorded whatever a budget created meanwhile would say).
    pub check_budgets: bool,
}

impl Batch {
    /// Whether there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty()
            && self.actions.is_empty()
            && self.events.is_empty()
            && self.journal.is_empty()
            && self.settlements.is_empty()
            && self.claims.is_empty()
            && self.holds.is_empty()
            && self.lease_releases.is_empty()
            && self.policy_texts.is_empty()
    }
}

/// One journal entry to append: a non-deterministic input that entered a job (a model response,
/// a tool result, an approval resolution, ...). Recovery and replay read the journal instead of
/// re-executing the step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewJournalEntry {
    /// Job.
    pub job_id: Uuid,
    /// The step this entry records, unique per job (e.g. `t2/c0/result`): a step is journaled once.
    pub key: String,
    /// What it is: `model_response`, `tool_started`, `tool_result`, `approval_requested`,
    /// `approval`, `tools`, `final`, ...
    pub kind: String,
    /// The recorded value (JSON).
    pub payload: crate::json::JsonText,
    /// When.
    pub at: DateTime<Utc>,
}

/// A stored journal entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JournalEntry {
    /// Per-job sequence number: 1, 2, 3, ... in commit order.
    pub seq: u64,
    /// The entry.
    #[serde(flatten)]
    pub entry: NewJournalEntry,
}

/// "Apply this batch only while `owner` holds the lease of `job_id` under `epoch`."
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseGuard {
    /// Job.
    pub job_id: Uuid,
    /// Expected lease owner.
    pub owner: String,
    /// Expected lease epoch (the fencing counter the claim set, see [`Lease::epoch`]).
    pub epoch: u64,
}

/// "Give `owner` the lease of `job_id` for `ttl_ms` from now, on the store's clock, if it is free"
/// (see [`Batch::claims`]). Like a claim, it bumps the job's lease epoch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseClaim {
    /// Job.
    pub job_id: Uuid,
    /// New lease owner.
    pub owner: String,
    /// How long the lease runs, from the store's now.
    pub ttl_ms: u64,
}

/// A job's lease: which host is running it, until when, under which epoch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// Owner (a host/worker id).
    pub owner: String,
    /// The lease is free after this instant, on the store's clock.
    pub until: DateTime<Utc>,
    /// Fencing counter: incremented by every claim of the job, never reused, so a write guarded
    /// by an older claim fails even if the same owner id holds the job again.
    pub epoch: u64,
}

/// A request to claim jobs for running.
///
/// Expiry is judged on the store's own clock ("database time": SQLite's, PostgreSQL's
/// `now()`, the memory store's [`crate::clock::Clock`]), never on the claimant's, so a host
/// whose clock runs ahead cannot take a job whose owner is alive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimRequest {
    /// New lease owner.
    pub owner: String,
    /// The claimant's time, recorded as the job's `updated_at` (not used for expiry).
    pub now: DateTime<Utc>,
    /// The claimed lease runs this many milliseconds from the store's now.
    pub ttl_ms: u64,
    /// Only jobs of these kinds.
    pub kinds: Vec<String>,
    /// Only this job (claiming one specific job), else any.
    pub job_id: Option<Uuid>,
    /// At most this many.
    pub limit: u32,
}

/// A pure budget verdict function, run by the store inside its reservation transaction.
pub type BudgetEvaluator = fn(&Usage, &[BudgetStatus]) -> BudgetDecision;

/// Durable storage for jobs, actions, events, the ledger, budgets and reservations.
pub trait KernelStore: Send + Sync + std::fmt::Debug {
    // ---- state changes ----

    /// Apply `batch` atomically and return the appended events with their `id` and `seq`.
    /// Fails with `Conflict` / `DuplicateIdempotencyKey` without applying anything.
    fn commit(&self, batch: Batch) -> BoxFuture<'_, StoreResult<Vec<RuntimeEvent>>>;

    /// [`commit`](Self::commit), handing `batch` back with the error (nothing was applied), so
    /// a caller that repeats a busy write needs no copy made up front. The default copies the
    /// batch before committing; a store that checks a batch before consuming it (the in-memory
    /// one) overrides this to copy nothing.
    fn commit_or_return(&self, batch: Batch) -> BoxFuture<'_, CommitOrReturn> {
        Box::pin(async move {
            let copy = batch.clone();
            self.commit(batch).await.map_err(|e| (e, Box::new(copy)))
        })
    }

    // ---- jobs ----

    /// A job by id (any tenant; managers enforce tenant scoping).
    fn get_job(&self, id: Uuid) -> BoxFuture<'_, StoreResult<Option<Job>>>;
    /// A job by tenant and idempotency key.
    fn get_job_by_key<'a>(&'a self, tenant: &'a str, key: &'a str) -> BoxFuture<'a, StoreResult<Option<Job>>>;
    /// Jobs matching `filter`, newest first.
    fn list_jobs<'a>(&'a self, filter: &'a JobFilter) -> BoxFuture<'a, StoreResult<Vec<Job>>>;
    /// Number of jobs matching `filter` (ignoring its limit).
    fn count_jobs<'a>(&'a self, filter: &'a JobFilter) -> BoxFuture<'a, StoreResult<u64>>;
    /// Non-terminal jobs (any tenant) whose deadline is `<= now`, oldest deadline first.
    fn overdue_jobs(&self, now: DateTime<Utc>, limit: u32) -> BoxFuture<'_, StoreResult<Vec<Job>>>;

    // ---- actions ----

    /// An action by id.
    fn get_action(&self, id: Uuid) -> BoxFuture<'_, StoreResult<Option<Action>>>;
    /// The action whose token hashes to `token_hash`.
    fn get_action_by_token_hash<'a>(&'a self, token_hash: &'a str) -> BoxFuture<'a, StoreResult<Option<Action>>>;
    /// Actions matching `filter`, oldest first.
    fn list_actions<'a>(&'a self, filter: &'a ActionFilter) -> BoxFuture<'a, StoreResult<Vec<Action>>>;
    /// PENDING actions (any tenant) with `expires_at <= now`, oldest expiry first.
    fn expired_actions(&self, now: DateTime<Utc>, limit: u32) -> BoxFuture<'_, StoreResult<Vec<Action>>>;

    // ---- events ----

    /// Persisted events matching `query`, ordered by `id`.
    fn read_events<'a>(&'a self, query: &'a EventQuery) -> BoxFuture<'a, StoreResult<Vec<RuntimeEvent>>>;

    // ---- ledger, budgets, reservations ----

    /// Append one ledger entry.
    fn append_ledger(&self, entry: NewLedgerEvent) -> BoxFuture<'_, StoreResult<LedgerEvent>>;
    /// Ledger entries matching `query`, oldest first.
    fn list_ledger<'a>(&'a self, query: &'a LedgerQuery) -> BoxFuture<'a, StoreResult<Vec<LedgerEvent>>>;
    /// Summed usage (model and tool usage entries) matching `query`.
    fn usage<'a>(&'a self, query: &'a UsageQuery) -> BoxFuture<'a, StoreResult<Usage>>;
    /// Insert or replace a budget.
    fn put_budget(&self, budget: Budget) -> BoxFuture<'_, StoreResult<()>>;
    /// Budgets of a tenant.
    fn list_budgets<'a>(&'a self, tenant: &'a str) -> BoxFuture<'a, StoreResult<Vec<Budget>>>;
    /// Delete a budget; whether it existed.
    fn delete_budget(&self, id: Uuid) -> BoxFuture<'_, StoreResult<bool>>;
    /// The settled usage that counts against `budget` (a stored one) at `now`: its subject's
    /// usage entries in the window containing `now` (zero for a per-request budget; live holds
    /// not included). By default summed from the ledger; a store that keeps running totals per
    /// budget answers from them.
    fn budget_used<'a>(&'a self, budget: &'a Budget, now: DateTime<Utc>) -> BoxFuture<'a, StoreResult<Usage>> {
        Box::pin(async move {
            if budget.window == crate::ledger::BudgetWindow::PerRequest {
                return Ok(Usage::zero());
            }
            let query = UsageQuery {
                tenant: budget.tenant.clone(),
                principal: budget.principal.clone(),
                session: budget.session.clone(),
                job_id: None,
                from: budget.window.start(now),
                to: None,
            };
            self.usage(&query).await
        })
    }
    /// In ONE serialized transaction: load the budgets applying to the request, compute each
    /// one's usage (usage entries in its window + live holds), call `evaluate`, and if allowed
    /// insert a HELD reservation plus a `hold` ledger entry (and a `budget_check` entry whenever
    /// the outcome is not plain allow).
    fn reserve(&self, request: ReserveRequest, evaluate: BudgetEvaluator)
    -> BoxFuture<'_, StoreResult<ReserveOutcome>>;
    /// A reservation by id.
    fn get_reservation(&self, id: Uuid) -> BoxFuture<'_, StoreResult<Option<Reservation>>>;
    /// Atomically: mark the reservation SETTLED (from HELD, or from RELEASED: a late settle after
    /// an expiry sweep still records usage that really happened) with the actual usage, and append
    /// the usage entry bounded by the hold, an `overage` entry for the rest (per
    /// [`Reservation::settle_plan`]: a lapsed hold covers nothing) and a `settle` entry.
    /// `Conflict` if it was already settled; `NotFound` if absent.
    fn settle(&self, request: SettleRequest) -> BoxFuture<'_, StoreResult<Reservation>>;
    /// Atomically: HELD -> RELEASED plus a `release` entry. `Conflict` if not HELD.
    fn release(&self, id: Uuid, now: DateTime<Utc>, reason: String) -> BoxFuture<'_, StoreResult<Reservation>>;
    /// Release every HELD reservation with `expires_at <= now` (recovery sweep); returns them.
    fn release_expired(&self, now: DateTime<Utc>, limit: u32) -> BoxFuture<'_, StoreResult<Vec<Reservation>>>;
    /// Keep live holds from lapsing while their calls run (the agent loop's heartbeat): every HELD
    /// reservation among `ids` gets `expires_at = max(expires_at, until)`; returns how many.
    fn extend_holds<'a>(&'a self, ids: &'a [Uuid], until: DateTime<Utc>) -> BoxFuture<'a, StoreResult<u64>>;

    // ---- journal and leases (the agent loop's durability) ----

    /// The journal of a job, in `seq` order.
    fn read_journal(&self, job_id: Uuid) -> BoxFuture<'_, StoreResult<Vec<JournalEntry>>>;
    /// Atomically claim QUEUED or RUNNING jobs of `request.kinds` whose lease is absent or expired
    /// (on the store's clock): set the lease (owner, store now + `ttl_ms`, epoch + 1) and bump each
    /// job's `version` (compare-and-set), so of two concurrent claimants exactly one wins each
    /// job, and the previous owner's next versioned or lease-guarded write fails.
    /// Returns the claimed jobs (new versions), oldest first.
    fn claim_jobs(&self, request: ClaimRequest) -> BoxFuture<'_, StoreResult<Vec<Job>>>;
    /// If `guard` (owner and epoch) still holds the lease, extend it to at least store now +
    /// `ttl_ms` (never shortening it); whether it did.
    fn renew_lease<'a>(&'a self, guard: &'a LeaseGuard, ttl_ms: u64) -> BoxFuture<'a, StoreResult<bool>>;
    /// Drop the lease if `guard` (owner and epoch) holds it; whether it did. The epoch counter is
    /// kept, so the next claim gets a higher one.
    fn release_lease<'a>(&'a self, guard: &'a LeaseGuard) -> BoxFuture<'a, StoreResult<bool>>;
    /// The current lease of a job, if any.
    fn get_lease(&self, job_id: Uuid) -> BoxFuture<'_, StoreResult<Option<Lease>>>;

    // ---- policy texts ----

    /// The policy text stored under `sha256` by a batch (see [`Batch::policy_texts`]).
    fn policy_text<'a>(&'a self, sha256: &'a str) -> BoxFuture<'a, StoreResult<Option<String>>>;
}

// ---- reservation arithmetic, shared by every backend ----
//
// A store owns atomicity; what a reserve, settle or release writes is decided here once, so the
// SQLite and memory stores (and any later backend) cannot drift apart. A store loads the rows,
// calls the plan inside its transaction and writes exactly what the plan says.

/// What one reservation transaction writes once the budget verdict is known.
#[derive(Debug, Clone, PartialEq)]
pub struct ReservePlan {
    /// Ledger entries to append, in order: a `budget_check` entry when the outcome is not plain
    /// allow, then the `hold` entry when it is allowed.
    pub entries: Vec<NewLedgerEvent>,
    /// What [`KernelStore::reserve`] returns. Its `reservation`, if any, is the HELD row to insert
    /// (before the entries: the `hold` entry references it).
    pub outcome: ReserveOutcome,
}

/// The plan for [`KernelStore::reserve`] given the verdict of the evaluator on `request`.
pub fn plan_reserve(request: &ReserveRequest, decision: BudgetDecision) -> StoreResult<ReservePlan> {
    // What is held and recorded is what a store keeps (a batch's hold reaches here unchecked).
    let amount = request.amount.clone().capped();
    let entry = |kind: LedgerKind, reservation_id: Option<Uuid>, data: JsonText| NewLedgerEvent {
        kind,
        tenant: request.tenant.clone(),
        principal: request.principal.clone(),
        session: request.session.clone(),
        job_id: request.job_id,
        reservation_id,
        usage: amount.clone(),
        duration_ms: None,
        model: None,
        tool: None,
        data,
        at: request.now,
    };
    let mut entries = Vec::new();
    if decision.outcome != BudgetOutcome::Allow {
        let data = JsonText::of(&decision).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        entries.push(entry(LedgerKind::BudgetCheck, None, data));
    }
    let reservation = decision.outcome.is_allowed().then(|| Reservation {
        amount: amount.clone(),
        ..Reservation::held(request)
    });
    if let Some(r) = &reservation {
        entries.push(entry(LedgerKind::Hold, Some(r.id), JsonText::null()));
    }
    Ok(ReservePlan {
        entries,
        outcome: ReserveOutcome { decision, reservation },
    })
}

/// The plan for one [`Batch::holds`] entry given the budgets that apply to it with their usage
/// (`statuses`, loaded inside the transaction; ignored unless `hold.check_budgets`): the
/// reservation gets the caller's id. `Conflict { entity: "budget" }` when the verdict is deny.
pub fn plan_hold(hold: &HoldWrite, statuses: &[BudgetStatus]) -> StoreResult<ReservePlan> {
    let decision = if hold.check_budgets {
        crate::ledger::evaluate_budgets(&hold.request.amount, statuses)
    } else {
        crate::ledger::evaluate_budgets(&hold.request.amount, &[])
    };
    let mut plan = plan_reserve(&hold.request, decision)?;
    let Some(r) = plan.outcome.reservation.as_mut() else {
        return Err(StoreError::Conflict {
            entity: "budget",
            id: hold.id.to_string(),
        });
    };
    let planned = r.id;
    r.id = hold.id;
    for e in &mut plan.entries {
        if e.reservation_id == Some(planned) {
            e.reservation_id = Some(hold.id);
        }
    }
    Ok(plan)
}

/// Whether the live hold `r` counts against `budget` at `now` (holds count whatever the budget's
/// window: they are about to be spent). Settled usage counts per [`Budget::counts`].
pub fn hold_counts_against(budget: &Budget, r: &Reservation, now: DateTime<Utc>) -> bool {
    r.is_live(now) && budget.applies_to(&r.tenant, r.principal.as_deref(), r.session.as_deref())
}

/// What closing (settling or releasing) one reservation writes.
#[derive(Debug, Clone, PartialEq)]
pub struct ClosePlan {
    /// The reservation's new row. A store updates it only if the stored state is still the one
    /// it planned from (compare-and-set), else `Conflict { entity: "reservation" }`.
    pub reservation: Reservation,
    /// Ledger entries to append, in order.
    pub entries: Vec<NewLedgerEvent>,
}

fn reservation_entry(r: &Reservation, kind: LedgerKind, usage: Usage, at: DateTime<Utc>) -> NewLedgerEvent {
    NewLedgerEvent {
        kind,
        tenant: r.tenant.clone(),
        principal: r.principal.clone(),
        session: r.session.clone(),
        job_id: r.job_id,
        reservation_id: Some(r.id),
        usage,
        duration_ms: None,
        model: None,
        tool: None,
        data: JsonText::null(),
        at,
    }
}

fn reservation_conflict(r: &Reservation) -> StoreError {
    StoreError::Conflict {
        entity: "reservation",
        id: r.id.to_string(),
    }
}

/// The plan for [`KernelStore::settle`] of `r` (loaded in the same transaction): the usage entry
/// bounded by the hold, an `overage` entry for the rest (per [`Reservation::settle_plan`]) and a
/// `settle` entry. `Conflict` if it is already settled.
pub fn plan_settle(r: &Reservation, request: SettleRequest) -> StoreResult<ClosePlan> {
    if r.state == ReservationState::Settled {
        return Err(reservation_conflict(r));
    }
    // What is recorded is what a store keeps (a batch's settlement reaches here unchecked).
    let request = SettleRequest {
        actual: request.actual.capped(),
        ..request
    };
    let plan = r.settle_plan(&request.actual, request.now);
    let mut usage = reservation_entry(r, request.kind, plan.charged.clone(), request.now);
    usage.duration_ms = request.duration_ms;
    usage.model = request.model;
    usage.tool = request.tool;
    usage.data = request.data;
    let overage = (!plan.overage.is_zero()).then(|| NewLedgerEvent {
        kind: LedgerKind::Overage,
        usage: plan.overage,
        data: plan.data,
        ..usage.clone()
    });
    let mut entries = vec![usage];
    entries.extend(overage);
    entries.push(reservation_entry(
        r,
        LedgerKind::Settle,
        request.actual.clone(),
        request.now,
    ));
    Ok(ClosePlan {
        reservation: Reservation {
            state: ReservationState::Settled,
            actual: Some(request.actual),
            closed_at: Some(request.now),
            ..r.clone()
        },
        entries,
    })
}

/// The plan for [`KernelStore::release`] of `r`: HELD -> RELEASED plus a `release` entry with
/// `reason`. `Conflict` if it is not HELD.
pub fn plan_release(r: &Reservation, now: DateTime<Utc>, reason: &str) -> StoreResult<ClosePlan> {
    if r.state != ReservationState::Held {
        return Err(reservation_conflict(r));
    }
    let mut release = reservation_entry(r, LedgerKind::Release, r.amount.clone(), now);
    release.data = serde_json::json!({ "reason": reason }).into();
    Ok(ClosePlan {
        reservation: Reservation {
            state: ReservationState::Released,
            closed_at: Some(now),
            ..r.clone()
        },
        entries: vec![release],
    })
}
