//! In-memory [`KernelStore`]: one mutex around plain collections. For unit tests and for
//! embedding without persistence; it passes the same conformance suite as the SQLite store.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use uuid::Uuid;

use crate::action::{Action, ActionFilter, ActionState};
use crate::clock::{Clock, SystemClock};
use crate::event::{EventQuery, RuntimeEvent};
use crate::job::JobState;
use crate::job::{Job, JobFilter};
use crate::ledger::{
    Budget, BudgetStatus, LedgerEvent, LedgerQuery, NewLedgerEvent, Reservation, ReservationState, ReserveOutcome,
    ReserveRequest, SettleRequest, Usage, UsageQuery,
};
use crate::registry::{PluginRecord, PluginRegistry, plugin_not_found};
use crate::store::{
    Batch, BudgetEvaluator, ClaimRequest, ClosePlan, JournalEntry, KernelStore, Lease, LeaseGuard, StoreError,
    StoreResult, hold_counts_against, plan_hold, plan_release, plan_reserve, plan_settle,
};

/// A map keyed by ids the kernel generates. Hashed with foldhash (seeded per process) rather than
/// SipHash: a governed call makes a few dozen look-ups, and SipHash of a 16-byte id was ~5% of
/// the in-memory call (`agent_memory/governed_call`). Keys a caller chooses (idempotency keys)
/// stay on the standard hasher.
type IdMap<V> = HashMap<Uuid, V, foldhash::fast::RandomState>;

#[derive(Debug, Default)]
struct State {
    jobs: IdMap<Job>,
    job_keys: HashMap<(String, String), Uuid>,
    actions: IdMap<Action>,
    token_hashes: HashMap<String, Uuid>,
    events: Vec<RuntimeEvent>,
    job_seq: IdMap<u64>,
    ledger: Vec<LedgerEvent>,
    budgets: BTreeMap<Uuid, Budget>,
    reservations: IdMap<Reservation>,
    journal: IdMap<Vec<JournalEntry>>,
    leases: IdMap<Lease>,
    /// Last lease epoch per job (kept when a lease is released).
    epochs: IdMap<u64>,
    /// Policy texts by sha256.
    policy_texts: HashMap<String, String>,
}

/// What [`MemoryStore::check`] worked out for applying a batch.
struct Checked {
    /// Idempotency keys of inserted jobs.
    staged_keys: Vec<(String, String)>,
    /// The batch's holds, planned.
    hold_plans: Vec<crate::store::ReservePlan>,
}

impl State {
    fn append_ledger(&mut self, entry: NewLedgerEvent) -> LedgerEvent {
        let event = LedgerEvent {
            id: self.ledger.len() as i64 + 1,
            entry,
        };
        self.ledger.push(event.clone());
        event
    }
}

/// The in-memory store.
#[derive(Debug)]
pub struct MemoryStore {
    state: Mutex<State>,
    /// The store's own time ("database time"): lease expiry is judged on it, never on a caller's.
    clock: Arc<dyn Clock>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::with_clock(Arc::new(SystemClock))
    }
}

impl MemoryStore {
    /// An empty store on the system clock.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty store whose own time (lease expiry) is `clock`.
    pub fn with_clock(clock: Arc<dyn Clock>) -> Self {
        Self {
            state: Mutex::new(State::default()),
            clock,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn conflict(entity: &'static str, id: impl ToString) -> StoreError {
    StoreError::Conflict {
        entity,
        id: id.to_string(),
    }
}

fn ttl(ms: u64) -> chrono::Duration {
    chrono::Duration::milliseconds(i64::try_from(ms).unwrap_or(i64::MAX / 1_000_000))
}

fn limit<T>(items: impl Iterator<Item = T>, limit: Option<u32>) -> Vec<T> {
    items.take(limit.map_or(usize::MAX, |l| l as usize)).collect()
}

impl MemoryStore {
    /// Whether `g` holds its job's lease: same owner and epoch, and the job not ended.
    fn holds(st: &State, g: &LeaseGuard) -> bool {
        st.jobs.get(&g.job_id).is_some_and(|j| !j.state.is_terminal())
            && st
                .leases
                .get(&g.job_id)
                .is_some_and(|l| l.owner == g.owner && l.epoch == g.epoch)
    }

    /// Apply `batch`, or hand it back with the error, nothing applied. It is checked first by
    /// reference ([`Self::check`]) and only then taken apart, so nothing is copied but the events
    /// returned.
    fn commit_sync(&self, batch: Batch) -> crate::store::CommitOrReturn {
        let store_now = self.clock.now();
        let mut st = self.lock();
        let checked = match Self::check(&st, &batch, store_now) {
            Ok(checked) => checked,
            Err(e) => return Err((e, Box::new(batch))),
        };
        match Self::apply(&mut st, batch, checked, store_now) {
            Ok(events) => Ok(events),
            // `check` validated every settlement, so applying cannot fail; if it did, the batch
            // is partly applied and cannot be handed back.
            Err(e) => Err((e, Box::default())),
        }
    }

    /// Validate `batch` against the rows as they are (plus the writes staged before each one),
    /// so a failure applies nothing.
    fn check(st: &State, batch: &Batch, store_now: DateTime<Utc>) -> StoreResult<Checked> {
        let mut staged_jobs: IdMap<&Job> = IdMap::default();
        let mut staged_keys: Vec<(String, String)> = Vec::new();
        for w in &batch.jobs {
            let current = staged_jobs.get(&w.job.id).copied().or_else(|| st.jobs.get(&w.job.id));
            match (w.expected_version, current) {
                (None, Some(_)) => return Err(conflict("job", w.job.id)),
                (None, None) => {
                    if let Some(key) = &w.job.idempotency_key {
                        let k = (w.job.tenant.clone(), key.clone());
                        if st.job_keys.contains_key(&k) || staged_keys.contains(&k) {
                            return Err(StoreError::DuplicateIdempotencyKey { tenant: k.0, key: k.1 });
                        }
                        staged_keys.push(k);
                    }
                }
                (Some(_), None) => {
                    return Err(StoreError::NotFound {
                        entity: "job",
                        id: w.job.id.to_string(),
                    });
                }
                (Some(v), Some(cur)) if cur.version != v => return Err(conflict("job", w.job.id)),
                (Some(_), Some(_)) => {}
            }
            staged_jobs.insert(w.job.id, &w.job);
        }
        let mut staged_actions: IdMap<&Action> = IdMap::default();
        for w in &batch.actions {
            let current = staged_actions
                .get(&w.action.id)
                .copied()
                .or_else(|| st.actions.get(&w.action.id));
            match (w.expected_version, current) {
                (None, Some(_)) => return Err(conflict("action", w.action.id)),
                (None, None) => {
                    if st.token_hashes.contains_key(&w.action.token_hash) {
                        return Err(conflict("action", w.action.id));
                    }
                    if !staged_jobs.contains_key(&w.action.job_id) && !st.jobs.contains_key(&w.action.job_id) {
                        return Err(StoreError::NotFound {
                            entity: "job",
                            id: w.action.job_id.to_string(),
                        });
                    }
                }
                (Some(_), None) => {
                    return Err(StoreError::NotFound {
                        entity: "action",
                        id: w.action.id.to_string(),
                    });
                }
                (Some(v), Some(cur)) if cur.version != v => {
                    return Err(conflict("action", w.action.id));
                }
                (Some(_), Some(_)) => {}
            }
            staged_actions.insert(w.action.id, &w.action);
        }
        for e in &batch.events {
            if !staged_jobs.contains_key(&e.job_id) && !st.jobs.contains_key(&e.job_id) {
                return Err(StoreError::NotFound {
                    entity: "job",
                    id: e.job_id.to_string(),
                });
            }
        }
        for g in &batch.leases {
            if !Self::holds(st, g) {
                return Err(conflict("lease", g.job_id));
            }
        }
        for c in &batch.claims {
            if !staged_jobs.contains_key(&c.job_id) && !st.jobs.contains_key(&c.job_id) {
                return Err(StoreError::NotFound {
                    entity: "job",
                    id: c.job_id.to_string(),
                });
            }
            if st.leases.get(&c.job_id).is_some_and(|l| l.until > store_now) {
                return Err(conflict("lease", c.job_id));
            }
        }
        let mut staged_journal: Vec<(String, Uuid)> = Vec::new();
        for j in &batch.journal {
            if !staged_jobs.contains_key(&j.job_id) && !st.jobs.contains_key(&j.job_id) {
                return Err(StoreError::NotFound {
                    entity: "job",
                    id: j.job_id.to_string(),
                });
            }
            let dup = st
                .journal
                .get(&j.job_id)
                .is_some_and(|entries| entries.iter().any(|e| e.entry.key == j.key));
            let k = (j.key.clone(), j.job_id);
            if dup || staged_journal.contains(&k) {
                return Err(conflict("journal", format!("{}/{}", j.job_id, j.key)));
            }
            staged_journal.push(k);
        }
        // Holds are planned against the rows as they are plus the holds staged before them.
        let mut hold_plans = Vec::with_capacity(batch.holds.len());
        let mut staged_holds: Vec<Reservation> = Vec::new();
        for h in &batch.holds {
            if st.reservations.contains_key(&h.id) || staged_holds.iter().any(|r| r.id == h.id) {
                return Err(conflict("reservation", h.id));
            }
            let statuses: Vec<BudgetStatus> = if h.check_budgets {
                let req = &h.request;
                st.budgets
                    .values()
                    .filter(|b| b.applies_to(&req.tenant, req.principal.as_deref(), req.session.as_deref()))
                    .map(|b| {
                        let mut used = Self::used_against(st, b, req.now);
                        for r in staged_holds.iter().filter(|r| hold_counts_against(b, r, req.now)) {
                            used += r.amount.clone();
                        }
                        BudgetStatus {
                            budget: b.clone(),
                            used,
                        }
                    })
                    .collect()
            } else {
                Vec::new()
            };
            let plan = plan_hold(h, &statuses)?;
            staged_holds.extend(plan.outcome.reservation.clone());
            hold_plans.push(plan);
        }
        for (i, r) in batch.settlements.iter().enumerate() {
            let staged = staged_holds.iter().find(|h| h.id == r.reservation_id);
            match staged.or_else(|| st.reservations.get(&r.reservation_id)) {
                None => {
                    return Err(StoreError::NotFound {
                        entity: "reservation",
                        id: r.reservation_id.to_string(),
                    });
                }
                Some(res) if res.state == ReservationState::Settled => {
                    return Err(conflict("reservation", r.reservation_id));
                }
                Some(_)
                    if batch.settlements[..i]
                        .iter()
                        .any(|o| o.reservation_id == r.reservation_id) =>
                {
                    return Err(conflict("reservation", r.reservation_id));
                }
                Some(_) => {}
            }
        }
        Ok(Checked {
            staged_keys,
            hold_plans,
        })
    }

    /// Apply a batch [`Self::check`] accepted.
    fn apply(
        st: &mut State,
        batch: Batch,
        checked: Checked,
        store_now: DateTime<Utc>,
    ) -> StoreResult<Vec<RuntimeEvent>> {
        let Checked {
            staged_keys,
            hold_plans,
        } = checked;
        for text in batch.policy_texts {
            st.policy_texts
                .entry(text.sha256().to_owned())
                .or_insert_with(|| text.text().to_owned());
        }
        for plan in hold_plans {
            if let Some(r) = plan.outcome.reservation {
                st.reservations.insert(r.id, r);
            }
            for e in plan.entries {
                st.append_ledger(e);
            }
        }
        for req in batch.settlements {
            Self::settle_locked(st, req)?;
        }
        for j in batch.journal {
            let entries = st.journal.entry(j.job_id).or_default();
            let seq = entries.len() as u64 + 1;
            entries.push(JournalEntry { seq, entry: j });
        }
        for k in staged_keys {
            let id = batch
                .jobs
                .iter()
                .find(|w| w.job.tenant == k.0 && w.job.idempotency_key.as_ref() == Some(&k.1))
                .map(|w| w.job.id);
            if let Some(id) = id {
                st.job_keys.insert(k, id);
            }
        }
        // In batch order: a later write of the same job wins, as it did in `check`.
        for w in batch.jobs {
            let mut job = w.job;
            if w.expected_version.is_some()
                && let Some(stored) = st.jobs.remove(&job.id)
            {
                job.keep_fixed_fields(stored);
            }
            st.jobs.insert(job.id, job);
        }
        for c in batch.claims {
            let epoch = st.epochs.entry(c.job_id).or_default();
            *epoch += 1;
            let epoch = *epoch;
            st.leases.insert(
                c.job_id,
                Lease {
                    owner: c.owner,
                    until: store_now + ttl(c.ttl_ms),
                    epoch,
                },
            );
        }
        // The last write of each action wins, as it did in `check`.
        let mut staged_actions: IdMap<Action> = IdMap::default();
        for w in batch.actions {
            staged_actions.insert(w.action.id, w.action);
        }
        for (id, a) in staged_actions {
            st.token_hashes.insert(a.token_hash.clone(), id);
            st.actions.insert(id, a);
        }
        for g in &batch.lease_releases {
            if st
                .leases
                .get(&g.job_id)
                .is_some_and(|l| l.owner == g.owner && l.epoch == g.epoch)
            {
                st.leases.remove(&g.job_id);
            }
        }
        let mut out = Vec::with_capacity(batch.events.len());
        for e in batch.events {
            let seq = st.job_seq.entry(e.job_id).or_insert(0);
            *seq += 1;
            let seq = *seq;
            let event = RuntimeEvent {
                id: st.events.len() as i64 + 1,
                seq,
                job_id: e.job_id,
                tenant: e.tenant,
                event_type: e.event_type,
                data: e.data,
                at: e.at,
            };
            st.events.push(event.clone());
            out.push(event);
        }
        Ok(out)
    }

    fn used_against(st: &State, budget: &Budget, now: DateTime<Utc>) -> Usage {
        let mut used = Usage::zero();
        for e in st.ledger.iter().filter(|e| budget.counts(&e.entry, now)) {
            used += e.entry.usage.clone();
        }
        for r in st.reservations.values() {
            if hold_counts_against(budget, r, now) {
                used += r.amount.clone();
            }
        }
        used
    }

    fn reserve_sync(&self, req: ReserveRequest, evaluate: BudgetEvaluator) -> StoreResult<ReserveOutcome> {
        let mut st = self.lock();
        let statuses: Vec<BudgetStatus> = st
            .budgets
            .values()
            .filter(|b| b.applies_to(&req.tenant, req.principal.as_deref(), req.session.as_deref()))
            .map(|b| BudgetStatus {
                budget: b.clone(),
                used: Self::used_against(&st, b, req.now),
            })
            .collect();
        let plan = plan_reserve(&req, evaluate(&req.amount, &statuses))?;
        if let Some(r) = &plan.outcome.reservation {
            st.reservations.insert(r.id, r.clone());
        }
        for e in plan.entries {
            st.append_ledger(e);
        }
        Ok(plan.outcome)
    }

    fn settle_sync(&self, req: SettleRequest) -> StoreResult<Reservation> {
        Self::settle_locked(&mut self.lock(), req)
    }

    fn settle_locked(st: &mut State, req: SettleRequest) -> StoreResult<Reservation> {
        let r = st
            .reservations
            .get(&req.reservation_id)
            .ok_or_else(|| StoreError::NotFound {
                entity: "reservation",
                id: req.reservation_id.to_string(),
            })?;
        let plan = plan_settle(r, req)?;
        Self::close_locked(st, plan)
    }

    /// Apply a settle or release plan (the state was checked by the plan, under this lock).
    fn close_locked(st: &mut State, plan: ClosePlan) -> StoreResult<Reservation> {
        for e in plan.entries {
            st.append_ledger(e);
        }
        let r = plan.reservation;
        st.reservations.insert(r.id, r.clone());
        Ok(r)
    }

    fn release_locked(st: &mut State, id: Uuid, now: DateTime<Utc>, reason: &str) -> StoreResult<Reservation> {
        let r = st.reservations.get(&id).cloned().ok_or_else(|| StoreError::NotFound {
            entity: "reservation",
            id: id.to_string(),
        })?;
        Self::close_locked(st, plan_release(&r, now, reason)?)
    }
}

impl KernelStore for MemoryStore {
    fn commit(&self, batch: Batch) -> BoxFuture<'_, StoreResult<Vec<RuntimeEvent>>> {
        let r = self.commit_sync(batch).map_err(|(e, _)| e);
        Box::pin(async move { r })
    }

    fn commit_or_return(&self, batch: Batch) -> BoxFuture<'_, crate::store::CommitOrReturn> {
        let r = self.commit_sync(batch);
        Box::pin(async move { r })
    }

    fn get_job(&self, id: Uuid) -> BoxFuture<'_, StoreResult<Option<Job>>> {
        let r = self.lock().jobs.get(&id).cloned();
        Box::pin(async move { Ok(r) })
    }

    fn get_job_by_key<'a>(&'a self, tenant: &'a str, key: &'a str) -> BoxFuture<'a, StoreResult<Option<Job>>> {
        let st = self.lock();
        let r = st
            .job_keys
            .get(&(tenant.to_string(), key.to_string()))
            .and_then(|id| st.jobs.get(id))
            .cloned();
        Box::pin(async move { Ok(r) })
    }

    fn list_jobs<'a>(&'a self, filter: &'a JobFilter) -> BoxFuture<'a, StoreResult<Vec<Job>>> {
        let st = self.lock();
        let mut jobs: Vec<Job> = st.jobs.values().filter(|j| filter.matches(j)).cloned().collect();
        jobs.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(b.id.cmp(&a.id)));
        let r = limit(jobs.into_iter(), filter.limit);
        Box::pin(async move { Ok(r) })
    }

    fn count_jobs<'a>(&'a self, filter: &'a JobFilter) -> BoxFuture<'a, StoreResult<u64>> {
        let r = self.lock().jobs.values().filter(|j| filter.matches(j)).count() as u64;
        Box::pin(async move { Ok(r) })
    }

    fn overdue_jobs(&self, now: DateTime<Utc>, limit_n: u32) -> BoxFuture<'_, StoreResult<Vec<Job>>> {
        let st = self.lock();
        let mut jobs: Vec<Job> = st
            .jobs
            .values()
            .filter(|j| !j.state.is_terminal() && j.deadline.is_some_and(|d| d <= now))
            .cloned()
            .collect();
        jobs.sort_by_key(|j| (j.deadline, j.id));
        let r = limit(jobs.into_iter(), Some(limit_n));
        Box::pin(async move { Ok(r) })
    }

    fn get_action(&self, id: Uuid) -> BoxFuture<'_, StoreResult<Option<Action>>> {
        let r = self.lock().actions.get(&id).cloned();
        Box::pin(async move { Ok(r) })
    }

    fn get_action_by_token_hash<'a>(&'a self, token_hash: &'a str) -> BoxFuture<'a, StoreResult<Option<Action>>> {
        let st = self.lock();
        let r = st
            .token_hashes
            .get(token_hash)
            .and_then(|id| st.actions.get(id))
            .cloned();
        Box::pin(async move { Ok(r) })
    }

    fn list_actions<'a>(&'a self, filter: &'a ActionFilter) -> BoxFuture<'a, StoreResult<Vec<Action>>> {
        let st = self.lock();
        let mut actions: Vec<Action> = st.actions.values().filter(|a| filter.matches(a)).cloned().collect();
        actions.sort_by_key(|a| (a.created_at, a.id));
        let r = limit(actions.into_iter(), filter.limit);
        Box::pin(async move { Ok(r) })
    }

    fn expired_actions(&self, now: DateTime<Utc>, limit_n: u32) -> BoxFuture<'_, StoreResult<Vec<Action>>> {
        let st = self.lock();
        let mut actions: Vec<Action> = st
            .actions
            .values()
            .filter(|a| a.state == ActionState::Pending && a.expires_at <= now)
            .cloned()
            .collect();
        actions.sort_by_key(|a| (a.expires_at, a.id));
        let r = limit(actions.into_iter(), Some(limit_n));
        Box::pin(async move { Ok(r) })
    }

    fn read_events<'a>(&'a self, query: &'a EventQuery) -> BoxFuture<'a, StoreResult<Vec<RuntimeEvent>>> {
        let st = self.lock();
        let it = st
            .events
            .iter()
            .filter(|e| query.filter.matches(e) && e.seq > query.after_seq && e.id > query.after_id)
            .cloned();
        let r = limit(it, query.limit);
        Box::pin(async move { Ok(r) })
    }

    fn append_ledger(&self, entry: NewLedgerEvent) -> BoxFuture<'_, StoreResult<LedgerEvent>> {
        let r = self.lock().append_ledger(entry);
        Box::pin(async move { Ok(r) })
    }

    fn list_ledger<'a>(&'a self, query: &'a LedgerQuery) -> BoxFuture<'a, StoreResult<Vec<LedgerEvent>>> {
        let st = self.lock();
        let r = limit(
            st.ledger.iter().filter(|e| query.matches(&e.entry)).cloned(),
            query.limit,
        );
        Box::pin(async move { Ok(r) })
    }

    fn usage<'a>(&'a self, query: &'a UsageQuery) -> BoxFuture<'a, StoreResult<Usage>> {
        let q = query.as_ledger_query();
        let mut total = Usage::zero();
        for e in self.lock().ledger.iter().filter(|e| q.matches(&e.entry)) {
            total += e.entry.usage.clone();
        }
        Box::pin(async move { Ok(total) })
    }

    fn put_budget(&self, budget: Budget) -> BoxFuture<'_, StoreResult<()>> {
        self.lock().budgets.insert(budget.id, budget);
        Box::pin(async move { Ok(()) })
    }

    fn list_budgets<'a>(&'a self, tenant: &'a str) -> BoxFuture<'a, StoreResult<Vec<Budget>>> {
        let r = self
            .lock()
            .budgets
            .values()
            .filter(|b| b.tenant == tenant)
            .cloned()
            .collect();
        Box::pin(async move { Ok(r) })
    }

    fn delete_budget(&self, id: Uuid) -> BoxFuture<'_, StoreResult<bool>> {
        let r = self.lock().budgets.remove(&id).is_some();
        Box::pin(async move { Ok(r) })
    }

    fn reserve(
        &self,
        request: ReserveRequest,
        evaluate: BudgetEvaluator,
    ) -> BoxFuture<'_, StoreResult<ReserveOutcome>> {
        let r = self.reserve_sync(request, evaluate);
        Box::pin(async move { r })
    }

    fn get_reservation(&self, id: Uuid) -> BoxFuture<'_, StoreResult<Option<Reservation>>> {
        let r = self.lock().reservations.get(&id).cloned();
        Box::pin(async move { Ok(r) })
    }

    fn settle(&self, request: SettleRequest) -> BoxFuture<'_, StoreResult<Reservation>> {
        let r = self.settle_sync(request);
        Box::pin(async move { r })
    }

    fn release(&self, id: Uuid, now: DateTime<Utc>, reason: String) -> BoxFuture<'_, StoreResult<Reservation>> {
        let r = Self::release_locked(&mut self.lock(), id, now, &reason);
        Box::pin(async move { r })
    }

    fn release_expired(&self, now: DateTime<Utc>, limit_n: u32) -> BoxFuture<'_, StoreResult<Vec<Reservation>>> {
        let mut st = self.lock();
        let mut due: Vec<(DateTime<Utc>, Uuid)> = st
            .reservations
            .values()
            .filter(|r| r.state == ReservationState::Held && r.expires_at <= now)
            .map(|r| (r.expires_at, r.id))
            .collect();
        due.sort();
        let mut out = Vec::new();
        for (_, id) in due.into_iter().take(limit_n as usize) {
            if let Ok(r) = Self::release_locked(&mut st, id, now, "expired") {
                out.push(r);
            }
        }
        Box::pin(async move { Ok(out) })
    }

    fn extend_holds<'a>(&'a self, ids: &'a [Uuid], until: DateTime<Utc>) -> BoxFuture<'a, StoreResult<u64>> {
        let mut st = self.lock();
        let mut n = 0;
        for id in ids {
            if let Some(r) = st.reservations.get_mut(id)
                && r.state == ReservationState::Held
            {
                r.expires_at = r.expires_at.max(until);
                n += 1;
            }
        }
        Box::pin(async move { Ok(n) })
    }

    fn read_journal(&self, job_id: Uuid) -> BoxFuture<'_, StoreResult<Vec<JournalEntry>>> {
        let r = self.lock().journal.get(&job_id).cloned().unwrap_or_default();
        Box::pin(async move { Ok(r) })
    }

    fn claim_jobs(&self, req: ClaimRequest) -> BoxFuture<'_, StoreResult<Vec<Job>>> {
        let store_now = self.clock.now();
        let mut st = self.lock();
        // Claiming one job by id is a lookup, not a scan.
        let pool: Box<dyn Iterator<Item = &Job>> = match req.job_id {
            Some(id) => Box::new(st.jobs.get(&id).into_iter()),
            None => Box::new(st.jobs.values()),
        };
        let mut candidates: Vec<Job> = pool
            .filter(|j| {
                matches!(j.state, JobState::Queued | JobState::Running)
                    && req.kinds.contains(&j.kind)
                    && req.job_id.is_none_or(|id| id == j.id)
                    && st.leases.get(&j.id).is_none_or(|l| l.until <= store_now)
            })
            .cloned()
            .collect();
        candidates.sort_by_key(|j| (j.created_at, j.id));
        candidates.truncate(req.limit as usize);
        let mut out = Vec::with_capacity(candidates.len());
        for mut job in candidates {
            job.version += 1;
            job.updated_at = req.now;
            let epoch = st.epochs.entry(job.id).or_default();
            *epoch += 1;
            let epoch = *epoch;
            st.leases.insert(
                job.id,
                Lease {
                    owner: req.owner.clone(),
                    until: store_now + ttl(req.ttl_ms),
                    epoch,
                },
            );
            st.jobs.insert(job.id, job.clone());
            out.push(job);
        }
        Box::pin(async move { Ok(out) })
    }

    fn renew_lease<'a>(&'a self, guard: &'a LeaseGuard, ttl_ms: u64) -> BoxFuture<'a, StoreResult<bool>> {
        let until = self.clock.now() + ttl(ttl_ms);
        let mut st = self.lock();
        let r = match st.leases.get_mut(&guard.job_id) {
            Some(l) if l.owner == guard.owner && l.epoch == guard.epoch => {
                l.until = l.until.max(until);
                true
            }
            _ => false,
        };
        Box::pin(async move { Ok(r) })
    }

    fn release_lease<'a>(&'a self, guard: &'a LeaseGuard) -> BoxFuture<'a, StoreResult<bool>> {
        let mut st = self.lock();
        let r = if st
            .leases
            .get(&guard.job_id)
            .is_some_and(|l| l.owner == guard.owner && l.epoch == guard.epoch)
        {
            st.leases.remove(&guard.job_id);
            true
        } else {
            false
        };
        Box::pin(async move { Ok(r) })
    }

    fn get_lease(&self, job_id: Uuid) -> BoxFuture<'_, StoreResult<Option<Lease>>> {
        let r = self.lock().leases.get(&job_id).cloned();
        Box::pin(async move { Ok(r) })
    }

    fn policy_text<'a>(&'a self, sha256: &'a str) -> BoxFuture<'a, StoreResult<Option<String>>> {
        let r = self.lock().policy_texts.get(sha256).cloned();
        Box::pin(async move { Ok(r) })
    }
}

/// The in-memory [`PluginRegistry`]: for tests and for embedding without persistence; it passes
/// the same conformance check as the SQLite registry.
#[derive(Debug, Default)]
pub struct MemoryRegistry {
    plugins: Mutex<BTreeMap<String, PluginRecord>>,
}

impl MemoryRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, PluginRecord>> {
        self.plugins.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl PluginRegistry for MemoryRegistry {
    fn upsert_plugin<'a>(&'a self, record: &'a PluginRecord) -> BoxFuture<'a, StoreResult<()>> {
        let now = Utc::now().to_rfc3339();
        let mut plugins = self.lock();
        let installed_at = plugins
            .get(&record.name)
            .map_or_else(|| now.clone(), |p| p.installed_at.clone());
        plugins.insert(
            record.name.clone(),
            PluginRecord {
                installed_at,
                updated_at: now,
                ..record.clone()
            },
        );
        Box::pin(async { Ok(()) })
    }

    fn get_plugin<'a>(&'a self, name: &'a str) -> BoxFuture<'a, StoreResult<Option<PluginRecord>>> {
        let p = self.lock().get(name).cloned();
        Box::pin(async move { Ok(p) })
    }

    fn list_plugins(&self) -> BoxFuture<'_, StoreResult<Vec<PluginRecord>>> {
        let all = self.lock().values().cloned().collect();
        Box::pin(async move { Ok(all) })
    }

    fn set_plugin_grants<'a>(&'a self, name: &'a str, grants: &'a serde_json::Value) -> BoxFuture<'a, StoreResult<()>> {
        let done = match self.lock().get_mut(name) {
            Some(p) => {
                p.grants = grants.clone();
                p.updated_at = Utc::now().to_rfc3339();
                Ok(())
            }
            None => Err(plugin_not_found(name)),
        };
        Box::pin(async move { done })
    }

    fn remove_plugin<'a>(&'a self, name: &'a str) -> BoxFuture<'a, StoreResult<bool>> {
        let existed = self.lock().remove(name).is_some();
        Box::pin(async move { Ok(existed) })
    }

    fn component_in_use<'a>(&'a self, sha256: &'a str) -> BoxFuture<'a, StoreResult<bool>> {
        let used = self.lock().values().any(|p| p.sha256 == sha256);
        Box::pin(async move { Ok(used) })
    }
}

#[cfg(test)]
mod tests {
    use chrono::Utc;

    use super::MemoryStore;
    use crate::job::{Job, NewJob};
    use crate::store::{Batch, JobWrite, KernelStore, StoreError};

    /// A refused batch comes back whole with its error and nothing of it is applied: a caller
    /// repeating a busy write needs no copy made up front.
    #[tokio::test]
    async fn a_refused_batch_is_handed_back_unapplied() {
        let store = MemoryStore::new();
        let job = Job::queued(
            NewJob {
                tenant: "t".into(),
                kind: "k".into(),
                ..NewJob::default()
            },
            None,
            Utc::now(),
        );
        let insert = |job: &Job| Batch {
            jobs: vec![JobWrite {
                job: job.clone(),
                expected_version: None,
            }],
            ..Batch::default()
        };
        store.commit_or_return(insert(&job)).await.expect("first insert");
        // The same insert again conflicts; so does an update at a stale version, and an event
        // of that batch must not be appended.
        let (e, back) = store.commit_or_return(insert(&job)).await.unwrap_err();
        assert!(matches!(e, StoreError::Conflict { entity: "job", .. }), "{e:?}");
        assert_eq!(*back, insert(&job));
        let mut stale = insert(&job);
        stale.jobs[0].expected_version = Some(7);
        stale.events.push(crate::services::job_event(
            &job,
            crate::event::EventType::Progress,
            serde_json::json!({}),
            Utc::now(),
        ));
        let (e, back) = store.commit_or_return(stale.clone()).await.unwrap_err();
        assert!(matches!(e, StoreError::Conflict { entity: "job", .. }), "{e:?}");
        assert_eq!(*back, stale);
        let events = store
            .read_events(&crate::event::EventQuery {
                filter: crate::event::EventFilter::job(job.id),
                ..Default::default()
            })
            .await
            .expect("events");
        assert!(events.is_empty(), "{events:?}");
        // A fresh version applies (the handed-back batch, fixed up, is usable as it is).
        let mut update = *back;
        update.jobs[0].expected_version = Some(1);
        update.jobs[0].job.version = 2;
        let events = store.commit_or_return(update).await.expect("update");
        assert_eq!(events.len(), 1);
        assert_eq!(store.get_job(job.id).await.unwrap().unwrap().version, 2);
    }
}
