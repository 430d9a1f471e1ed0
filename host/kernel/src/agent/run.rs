//! The run loop of one job on this host: model -> tool calls -> policy -> (approval) -> budget
//! hold -> tool call -> settle + journal + events -> next turn.
//!
//! Durability: every step's result is journaled in the same transaction as its ledger settlement,
//! its events and the job-row update (guarded by this host's lease). The loop is written as a
//! replay: each step first looks for its journal entry and reuses it, so resuming a job after a
//! crash is just running the loop again over the journal. A tool call journaled as started but
//! not finished is re-run only if the tool is idempotent; otherwise a human is asked.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use rust_decimal::{Decimal, RoundingStrategy};
use serde::Serialize;
use serde_json::{Value, json};
use uuid::Uuid;

use super::request::{ExecutionRequest, ExecutionResult, ExecutionUsage};
use super::{Inner, schema};
use crate::action::{Action, ActionState, ActionType, NewAction, Resolution, ToolCallRef};
use crate::context::PolicyRef;
use crate::error::KernelError;
use crate::event::{EventType, NewEvent};
use crate::job::{Job, JobError, JobState};
use crate::journal::{self, Entry, key};
use crate::json::JsonText;
use crate::ledger::{
    BudgetOutcome, BudgetStatus, LedgerKind, Reservation, ReservationState, SettleRequest, Usage, evaluate_budgets,
};
use crate::model::{Message, ModelDelta, ModelPrice, ModelRequest, ModelResponse, ToolCall, ToolSpec};
use crate::policy::{Outcome, Policy, PolicyRequest, SessionKey, text_digest};
use crate::services::{HoldRequest, SettleDetails, StatusDetail, job_event, retry, status_event, transition};
use crate::store::{Batch, JobWrite, KernelStore, LeaseGuard, NewJournalEntry, StoreError, StoreResult};
use crate::tool::{Receipt, ToolCallContext, ToolDescriptor, ToolError};

/// Why the loop stopped without finishing the job itself.
#[derive(Debug)]
pub(crate) enum Stop {
    /// End the job FAILED with this error.
    Fail(JobError),
    /// The job's deadline passed: end it TIMED_OUT.
    TimedOut,
    /// The job was ended elsewhere (cancelled, timed out, failed): nothing more to write.
    Ended,
    /// Another host owns the job now (lease lost, step already journaled).
    Lost,
    /// The store failed; the job is left for recovery.
    Error(KernelError),
}

/// A journal entry this host cannot read: leave the job for an operator, never guess.
fn corrupt(e: impl std::fmt::Display) -> Stop {
    Stop::Error(KernelError::Store(StoreError::Corrupt(e.to_string())))
}

fn job_error(code: &str, message: impl Into<String>) -> JobError {
    JobError {
        code: code.into(),
        message: message.into(),
    }
}

impl From<KernelError> for Stop {
    fn from(e: KernelError) -> Self {
        match e {
            // From a terminal state: the job was ended elsewhere (cancelled, timed out).
            KernelError::IllegalTransition { from, .. } if from.is_terminal() => Stop::Ended,
            // From a live state it is a bug in the loop's bookkeeping: end the job visibly rather
            // than leave it stuck where no worker would ever claim it.
            e @ KernelError::IllegalTransition { .. } => Stop::Fail(job_error("illegal_transition", e.to_string())),
            KernelError::Store(StoreError::Conflict {
                entity: "lease" | "journal",
                ..
            }) => Stop::Lost,
            e => Stop::Error(e),
        }
    }
}

impl From<StoreError> for Stop {
    fn from(e: StoreError) -> Self {
        Stop::from(KernelError::from(e))
    }
}

#[cfg(test)]
mod stop_tests {
    use super::*;

    /// `complete` from WAITING_ACTION is a bug to surface, not "ended elsewhere" to swallow.
    #[test]
    fn an_illegal_transition_from_a_live_state_fails_the_job() {
        let illegal = |from| KernelError::IllegalTransition {
            job_id: Uuid::nil(),
            from,
            to: JobState::Succeeded,
        };
        match Stop::from(illegal(JobState::WaitingAction)) {
            Stop::Fail(e) => assert_eq!(e.code, "illegal_transition"),
            other => panic!("swallowed: {other:?}"),
        }
        assert!(matches!(Stop::from(illegal(JobState::Cancelled)), Stop::Ended));
    }
}

/// Busy retries (the same write again, with backoff) through the kernel's one retry helper.
async fn retry_busy<T, F, Fut>(write: F) -> StoreResult<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = StoreResult<T>>,
{
    retry::retry_transient(retry::BUSY, write).await
}

/// This host's claim on one job: the fencing guard (owner + epoch) and how long the lease is
/// known to be ours, on this host's monotonic clock (never compared with another machine's).
#[derive(Debug)]
pub(crate) struct LeaseState {
    job_id: Uuid,
    owner: String,
    epoch: AtomicU64,
    /// The lease is ours at least until this instant: a successful renewal's send time + its TTL.
    valid_until: Mutex<Instant>,
}

impl LeaseState {
    /// A lease just claimed under `epoch` for `ttl_ms`.
    pub(crate) fn new(job_id: Uuid, owner: String, epoch: u64, claimed_at: Instant, ttl_ms: u64) -> Self {
        Self {
            job_id,
            owner,
            epoch: AtomicU64::new(epoch),
            valid_until: Mutex::new(claimed_at + Duration::from_millis(ttl_ms)),
        }
    }

    /// The guard every write of this job carries.
    pub(crate) fn guard(&self) -> LeaseGuard {
        LeaseGuard {
            job_id: self.job_id,
            owner: self.owner.clone(),
            epoch: self.epoch.load(Ordering::SeqCst),
        }
    }

    pub(crate) fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    /// This host claimed the job again (its lease had lapsed, nobody else took it meanwhile).
    pub(crate) fn reclaimed(&self, epoch: u64, claimed_at: Instant, ttl_ms: u64) {
        self.epoch.store(epoch, Ordering::SeqCst);
        let mut v = self.valid_until.lock().unwrap_or_else(|e| e.into_inner());
        *v = claimed_at + Duration::from_millis(ttl_ms);
    }

    /// Extend the lease to at least `ttl_ms` from now (store time); whether it is still ours.
    async fn renew(&self, rt: &Inner, ttl_ms: u64) -> StoreResult<bool> {
        let sent = Instant::now();
        let guard = self.guard();
        let ok = rt.kernel.store().renew_lease(&guard, ttl_ms).await?;
        if ok {
            let mut v = self.valid_until.lock().unwrap_or_else(|e| e.into_inner());
            *v = (*v).max(sent + Duration::from_millis(ttl_ms));
        }
        Ok(ok)
    }

    /// How long the lease is known to remain ours.
    fn remaining(&self) -> Duration {
        let v = *self.valid_until.lock().unwrap_or_else(|e| e.into_inner());
        v.saturating_duration_since(Instant::now())
    }
}

/// The holds of a job's in-flight steps.
pub(crate) type Held = Arc<Mutex<HashSet<Uuid>>>;

/// What one step writes besides the job row.
pub(crate) struct Step {
    next: Job,
    events: Vec<NewEvent>,
    journal: Vec<(String, Entry)>,
    settlements: Vec<SettleRequest>,
}

fn bump(job: &Job, now: DateTime<Utc>) -> Job {
    let mut next = job.clone();
    next.version += 1;
    next.updated_at = now;
    next
}

/// Costs are stored in nano-units; round a provider's finer cost up rather than refuse it.
pub(crate) fn round_cost(c: Decimal) -> Decimal {
    c.round_dp_with_strategy(crate::ledger::COST_SCALE, RoundingStrategy::AwayFromZero)
        .normalize()
}

/// The model-facing name of `plugin/tool`, within `[a-zA-Z0-9_-]{1,64}` and injective: distinct tools
/// never share a name, so no plugin can shadow another's tool.
///
/// A well-formed name keeps the readable form `plugin__tool`: plugin and tool are non-empty, in the
/// model alphabet, free of `__` (install refuses `__` in names), the plugin does not end in `_`, and
/// the whole fits in 64 characters. Such a name decodes back uniquely (split at the first `__`).
/// Anything else (other characters, truncation, no or several `/`) becomes a sanitised prefix plus
/// `__` and 16 hex digits of the sha256 of the qualified name; a readable name never has that shape
/// (one that would is hashed too), so the two forms cannot meet.
pub fn model_tool_name(qualified: &str) -> String {
    const MAX: usize = 64;
    const HASH_HEX: usize = 16;
    let part = |s: &str| {
        !s.is_empty() && !s.contains("__") && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    };
    let looks_hashed = |name: &str| {
        name.len() > HASH_HEX + 2
            && name[..name.len() - HASH_HEX].ends_with("__")
            && name[name.len() - HASH_HEX..]
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    if let Some((plugin, tool)) = qualified.split_once('/')
        && part(plugin)
        && part(tool)
        && !plugin.ends_with('_')
        && plugin.len() + 2 + tool.len() <= MAX
    {
        let name = format!("{plugin}__{tool}");
        if !looks_hashed(&name) {
            return name;
        }
    }
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(qualified.as_bytes());
    let hash: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    let prefix: String = qualified
        .replace('/', "__")
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' })
        .take(MAX - 2 - HASH_HEX)
        .collect();
    format!("{prefix}__{}", &hash[..HASH_HEX])
}

/// A model call that was made: what it is charged if it ends without an answer (it failed, or
/// its loop stopped), since its provider bills what its model generated.
#[derive(Clone)]
struct ModelAttempt {
    model: String,
    turn: u32,
    /// The prompt's estimate, in tokens.
    est_in: u64,
    price: Option<ModelPrice>,
    /// Bytes of text streamed so far.
    streamed: Arc<AtomicU64>,
    started: Instant,
}

impl ModelAttempt {
    /// One request, with the streamed output as an estimate and the prompt's estimate when
    /// anything came back; `data` says why it ended.
    fn charge(&self, mut data: Value) -> (Usage, SettleDetails) {
        let out_tokens = tokens_of_text(self.streamed.load(Ordering::Relaxed));
        let in_tokens = if out_tokens > 0 { self.est_in } else { 0 };
        let usage = Usage {
            tokens: in_tokens.saturating_add(out_tokens),
            cost: round_cost(self.price.map_or(Decimal::ZERO, |p| p.cost(in_tokens, out_tokens))),
            requests: 1,
            tool_calls: 0,
        };
        data["turn"] = json!(self.turn);
        let details = SettleDetails {
            duration_ms: Some(self.started.elapsed().as_millis() as u64),
            model: Some(self.model.clone()),
            tool: None,
            data: data.into(),
        };
        (usage, details)
    }
}

/// An upper bound on the prompt's tokens, used only to size holds: every token of a BPE tokenizer
/// covers at least one byte, so bytes (plus a per-message allowance for role/format tokens) can only
/// over-reserve. An estimate that could be low (e.g. ~4 bytes per token) would let concurrent calls
/// overspend a budget when the actual usage is settled.
/// A response whose server reported no usage (no input tokens for a prompt that is not empty)
/// is charged an estimate instead of nothing: `est_in` for the prompt, its own text and tool
/// calls at ~4 bytes a token for the answer, priced at `price` when the provider priced nothing.
/// Charging nothing would let any number of calls pass token and cost limits. True if estimated.
fn charge_estimate_if_unreported(response: &mut ModelResponse, est_in: u64, price: Option<&ModelPrice>) -> bool {
    let usage = &mut response.usage;
    if usage.input_tokens > 0 || est_in == 0 {
        return false;
    }
    let message = &response.message;
    let out_bytes = message.content.len()
        + message
            .tool_calls
            .iter()
            .map(|c| c.name.len() + c.arguments.to_string().len())
            .sum::<usize>();
    usage.input_tokens = est_in;
    usage.output_tokens = usage.output_tokens.max(tokens_of_text(out_bytes as u64));
    if usage.cost.is_zero()
        && let Some(price) = price
    {
        usage.cost = price.cost(usage.input_tokens, usage.output_tokens);
    }
    true
}

/// The tokens a model's answer of `bytes` bytes is charged when its server reported none: ~4
/// bytes a token. (What was *sent* is charged [`estimate_tokens`], the hold's upper bound.)
fn tokens_of_text(bytes: u64) -> u64 {
    bytes.div_ceil(4)
}

fn estimate_tokens(messages: &[Message], tools: &[ToolSpec]) -> u64 {
    let bytes: usize = messages
        .iter()
        .map(|m| {
            m.content.len()
                + m.tool_calls
                    .iter()
                    .map(|c| c.arguments.to_string().len() + 16)
                    .sum::<usize>()
                + 16
        })
        .sum::<usize>()
        + tools
            .iter()
            .map(|t| t.name.len() + t.description.len() + t.parameters.to_string().len())
            .sum::<usize>();
    bytes as u64 + 16
}

fn resolution_is_session_scoped(r: &Resolution) -> bool {
    r.value.as_str() == Some("session") || r.value.get("scope").and_then(Value::as_str) == Some("session")
}

fn output_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// One job being driven by this host.
pub(crate) struct Runner {
    rt: Arc<Inner>,
    job_id: Uuid,
    tenant: String,
    principal: Option<String>,
    session: Option<String>,
    trace_id: Option<String>,
    req: ExecutionRequest,
    /// key -> entry: the journal read at start plus what this run appended.
    journal: Mutex<HashMap<String, Entry>>,
    /// Reservations held by in-flight steps, released if the loop stops early (shared with the
    /// heartbeat, which keeps them from expiring while their calls run).
    held: Held,
    /// This host's lease on the job (shared with its heartbeat task).
    lease: Arc<LeaseState>,
    /// Model calls made and not yet settled, by hold: a loop stopped mid-call (cancel, deadline)
    /// charges them as it stops ([`Runner::release_all`]).
    models_in_flight: Mutex<HashMap<Uuid, ModelAttempt>>,
    /// Tool calls started so far (for `budget.max_tool_calls`).
    started: AtomicU64,
    /// Serializes this job's writes (step commits, holds): they all write the job row or take
    /// the database's write lock, so concurrent tool calls would otherwise burn retries (job
    /// version conflicts) and SQLite busy-handler sleeps against each other.
    commit_lock: tokio::sync::Mutex<()>,
    /// Set once a `degrade` budget verdict switched this run to `req.degrade_model`.
    degraded: std::sync::atomic::AtomicBool,
    /// The policy this job runs under: the one recorded with it (see [`job_policy`]).
    policy: Arc<Policy>,
}

/// Put back the text of a policy its job names by sha256 only (stored apart, see
/// [`crate::store::PolicyText`]). A reference whose text is not stored (recorded by a Keel that
/// kept only the policy file's path and digest) stays as it is, for the host's policy loader
/// ([`crate::AgentRuntime::set_policy_loader`]).
pub async fn attach_policy_text(store: &dyn KernelStore, policy: &mut PolicyRef) -> Result<(), StoreError> {
    if policy.source.is_none()
        && let Some(sha256) = &policy.version
    {
        policy.source = store.policy_text(sha256).await?;
    }
    Ok(())
}

/// The policy a job runs under: the text recorded with the job (checked against its recorded
/// sha256); for a job recorded by reference only (name + sha256), what the host's loader returns;
/// for a job that recorded none, or under an operator override, the host's policy.
pub(crate) fn job_policy(rt: &Inner, recorded: &PolicyRef) -> Result<Arc<Policy>, Stop> {
    let unavailable = |why: String| Stop::Fail(job_error("policy_unavailable", why));
    if rt.policy_override.load(Ordering::SeqCst) {
        return Ok(rt.policy.clone());
    }
    if let Some(text) = &recorded.source {
        if let Some((known, policy)) = &*rt.recorded_policy.lock().expect("recorded policy lock")
            && known == recorded
        {
            return Ok(policy.clone());
        }
        let digest = text_digest(text);
        if let Some(pinned) = &recorded.version
            && *pinned != digest
        {
            return Err(unavailable(format!(
                "the policy recorded with the job ({}) does not match its recorded sha256 {pinned}; refusing to run it",
                recorded.name
            )));
        }
        let policy = Policy::from_toml_str(text, &recorded.name)
            .map(Arc::new)
            .map_err(|e| unavailable(format!("the policy recorded with the job does not load: {e}")))?;
        *rt.recorded_policy.lock().expect("recorded policy lock") = Some((recorded.clone(), policy.clone()));
        return Ok(policy);
    }
    if recorded.version.is_none() {
        // Nothing pinned (a label at most): the host's policy applies.
        return Ok(rt.policy.clone());
    }
    match rt.policy_loader.get() {
        Some(load) => load(recorded).map(Arc::new).map_err(unavailable),
        None => Err(unavailable(format!(
            "the job's policy {} was recorded without its text and this host cannot load it",
            recorded.name
        ))),
    }
}

impl Runner {
    pub(crate) async fn load(rt: Arc<Inner>, job: &Job, lease: Arc<LeaseState>, held: Held) -> Result<Self, Stop> {
        let mut req = job.input.decode::<ExecutionRequest>().map_err(|e| {
            Stop::Fail(job_error(
                "invalid_request",
                format!("the job input is not a request: {e}"),
            ))
        })?;
        attach_policy_text(rt.kernel.store().as_ref(), &mut req.policy).await?;
        let policy = job_policy(&rt, &req.policy)?;
        if rt.policy_override.load(Ordering::SeqCst) && req.policy != PolicyRef::default() {
            let message = format!(
                "running under this host's policy (operator override), not the job's recorded policy {}",
                req.policy.name
            );
            let _ = rt
                .kernel
                .jobs()
                .emit(job.id, EventType::Progress, json!({ "message": message }))
                .await;
        }
        let entries = rt.kernel.store().read_journal(job.id).await?;
        let entries = journal::decode_all(&entries).map_err(corrupt)?;
        let started = entries
            .iter()
            .filter(|(_, e)| matches!(e, Entry::ToolStarted(_)))
            .count() as u64;
        let journal = entries.into_iter().collect();
        Ok(Self {
            job_id: job.id,
            tenant: job.tenant.clone(),
            principal: job.principal.clone(),
            session: job.session.clone(),
            trace_id: job.context().map(|c| c.trace_id),
            req,
            journal: Mutex::new(journal),
            held,
            lease,
            models_in_flight: Mutex::default(),
            started: AtomicU64::new(started),
            commit_lock: tokio::sync::Mutex::new(()),
            degraded: std::sync::atomic::AtomicBool::new(false),
            policy,
            rt,
        })
    }

    /// This job's principal's session `session`, where its session approvals live.
    fn session_key<'a>(&'a self, session: &'a str) -> SessionKey<'a> {
        SessionKey::new(&self.tenant, self.principal.as_deref().unwrap_or(""), session)
    }

    fn journaled(&self, key: &str) -> Option<Entry> {
        let j = self.journal.lock().unwrap_or_else(|e| e.into_inner());
        j.get(key).cloned()
    }

    fn lease(&self) -> LeaseGuard {
        self.lease.guard()
    }

    /// Before a side effect that may run for `deadline`: make sure no other host can take the job
    /// until it is over, whatever happens to the heartbeat meanwhile (a guest computing inside one
    /// poll can starve every task on its thread). Extends the lease to cover the call's deadline
    /// plus a margin; refuses (`Lost`) if the lease is no longer ours.
    async fn ensure_lease(&self, deadline: Duration) -> Result<(), Stop> {
        let ttl = self.rt.config.lease_ttl_ms.max(3);
        let margin = Duration::from_millis(ttl / 3).max(Duration::from_secs(1));
        let need = deadline + margin;
        if self.lease.remaining() >= need {
            return Ok(());
        }
        let want = u64::try_from(need.as_millis()).unwrap_or(u64::MAX).max(ttl);
        match retry_busy(|| self.lease.renew(&self.rt, want)).await {
            Ok(true) if self.lease.remaining() >= deadline => Ok(()),
            // Renewed, but too slowly to be sure of the whole call: do not start it.
            Ok(true) => Err(Stop::Error(KernelError::Contention(format!(
                "the lease of job {} could not be extended in time for a tool call",
                self.job_id
            )))),
            Ok(false) => Err(self.lost_or_ended().await),
            Err(e) => Err(Stop::Error(e.into())),
        }
    }

    /// After a lease-guarded write was refused: the job ended elsewhere, or another host has it.
    async fn lost_or_ended(&self) -> Stop {
        match self.rt.kernel.store().get_job(self.job_id).await {
            Ok(Some(job)) if job.state.is_terminal() => Stop::Ended,
            _ => Stop::Lost,
        }
    }

    /// Charge a completed call whose step could not be journaled (the store failed, the job ended
    /// elsewhere or another host took it): the usage happened, so it is settled, never released
    /// as unused. Best effort with busy retries; a hold that still cannot be settled is left to
    /// expire rather than released.
    async fn charge_unjournaled(&self, hold: Uuid, kind: LedgerKind, actual: Usage, details: SettleDetails) {
        self.held.lock().unwrap_or_else(|e| e.into_inner()).remove(&hold);
        let ledger = self.rt.kernel.ledger();
        let _ = retry::retry_transient(retry::BUSY, || {
            ledger.settle(hold, kind, actual.clone(), details.clone())
        })
        .await;
    }

    fn event(&self, event_type: EventType, data: impl Into<JsonText>, at: DateTime<Utc>) -> NewEvent {
        NewEvent {
            job_id: self.job_id,
            tenant: self.tenant.clone(),
            event_type,
            data: data.into(),
            at,
        }
    }

    fn entry(&self, key: String, entry: &Entry, at: DateTime<Utc>) -> NewJournalEntry {
        journal::encode(self.job_id, key, entry, at)
    }

    /// Commit one step: the job row (compare-and-set on its version, retried on conflict), the
    /// step's journal entries, settlements and events, under this host's lease. One transaction.
    async fn commit_step<F>(&self, build: F) -> Result<Job, Stop>
    where
        F: Fn(&Job, DateTime<Utc>) -> Result<Step, Stop>,
    {
        let kernel = &self.rt.kernel;
        let _serial = self.commit_lock.lock().await;
        for _ in 0..kernel.config().max_write_attempts {
            let job = kernel
                .store()
                .get_job(self.job_id)
                .await?
                .ok_or(Stop::Error(KernelError::JobNotFound(self.job_id)))?;
            if job.state.is_terminal() {
                return Err(Stop::Ended);
            }
            let now = kernel.clock().now();
            let step = build(&job, now)?;
            let journal: Vec<NewJournalEntry> = step
                .journal
                .iter()
                .map(|(k, e)| self.entry(k.clone(), e, now))
                .collect();
            let batch = Batch {
                jobs: vec![JobWrite {
                    job: step.next.clone(),
                    expected_version: Some(job.version),
                }],
                actions: vec![],
                events: step.events,
                journal,
                settlements: step.settlements,
                leases: vec![self.lease()],
                ..Batch::default()
            };
            match kernel.commit_busy(batch).await.map_err(|(e, _)| e) {
                Ok(_) => {
                    let mut j = self.journal.lock().unwrap_or_else(|e| e.into_inner());
                    for (k, e) in step.journal {
                        j.insert(k, e);
                    }
                    return Ok(step.next);
                }
                Err(StoreError::Conflict { entity: "job", .. }) => continue,
                Err(StoreError::Conflict { entity: "lease", .. }) => return Err(self.lost_or_ended().await),
                Err(e) => return Err(e.into()),
            }
        }
        Err(Stop::Error(KernelError::Contention(format!("job {}", self.job_id))))
    }

    /// Drive the job to its end (or until it must wait/stop).
    pub(crate) async fn drive(&self) -> Result<(), Stop> {
        let job = self
            .rt
            .kernel
            .store()
            .get_job(self.job_id)
            .await?
            .ok_or(Stop::Error(KernelError::JobNotFound(self.job_id)))?;
        if job.state.is_terminal() {
            return Err(Stop::Ended);
        }
        if job.state == JobState::Queued {
            self.commit_step(|job, now| {
                let next = transition(job, JobState::Running, now)?;
                let event = status_event(
                    job.state,
                    &next,
                    StatusDetail {
                        owner: Some(self.rt.owner.as_str()),
                        ..StatusDetail::default()
                    },
                    now,
                );
                Ok(Step {
                    next,
                    events: vec![event],
                    journal: vec![],
                    settlements: vec![],
                })
            })
            .await?;
        }
        if let Some(call) = &self.req.call {
            return self.drive_call(call).await;
        }
        let tools = self.tools().await?;
        let specs: Vec<ToolSpec> = tools
            .iter()
            .map(|t| ToolSpec {
                name: model_tool_name(&t.qualified_name()),
                description: t.description.clone(),
                parameters: t.input_schema.clone(),
            })
            .collect();
        let by_name: HashMap<String, &ToolDescriptor> = tools
            .iter()
            .map(|t| (model_tool_name(&t.qualified_name()), t))
            .collect();
        let mut messages = self.req.initial_messages();
        let max_turns = self.req.turn_limit(&self.rt.config);
        for turn in 1u32.. {
            let response = match self.journaled(&key::model(turn)) {
                Some(Entry::ModelResponse(r)) => r,
                Some(other) => return Err(corrupt(format!("journal {} is a {}", key::model(turn), other.kind()))),
                None => {
                    if turn > max_turns {
                        return Err(Stop::Fail(job_error(
                            "max_turns",
                            format!("the model did not finish within {max_turns} turns"),
                        )));
                    }
                    self.model_step(turn, &messages, &specs).await?
                }
            };
            messages.push(response.message.clone());
            let calls = response.message.tool_calls.clone();
            if calls.is_empty() {
                return self.complete(response.message.content).await;
            }
            let results = futures::future::join_all(
                calls
                    .iter()
                    .enumerate()
                    .map(|(i, c)| self.call_step(turn, i, c, by_name.get(&c.name).copied())),
            )
            .await;
            for (call, result) in calls.iter().zip(results) {
                messages.push(Message::tool(call.id.clone(), result?.content));
            }
        }
        Ok(())
    }

    /// A direct tool call (`keel call`, MCP `tools/call`, the HTTP API): the same governed step as
    /// an agent's call (schema, policy, approval, hold, sandbox, settle with receipt, events,
    /// journal) as the job's only step; the job succeeds with the tool's output or fails with its
    /// error code.
    async fn drive_call(&self, call: &super::request::DirectCall) -> Result<(), Stop> {
        let desc = self
            .rt
            .tools
            .tool(&call.tool, &self.tenant)
            .await
            .map_err(|e| Stop::Fail(job_error("tools_unavailable", format!("listing tools failed: {e}"))))?;
        let model_call = ToolCall {
            id: "c0".into(),
            name: call.tool.clone(),
            arguments: call.arguments.clone(),
        };
        let result = self.call_step(1, 0, &model_call, desc.as_ref()).await?;
        if result.is_error {
            let code = result.code.clone().unwrap_or_else(|| "failed".into());
            return Err(Stop::Fail(job_error(&code, result.reason())));
        }
        self.complete(result.content).await
    }

    async fn tools(&self) -> Result<Vec<ToolDescriptor>, Stop> {
        match self.journaled(key::TOOLS) {
            Some(Entry::Tools(chosen)) => return Ok(chosen.tools),
            Some(other) => return Err(corrupt(format!("journal {} is a {}", key::TOOLS, other.kind()))),
            None => {}
        }
        let mut builder = globset::GlobSetBuilder::new();
        for p in &self.req.tools {
            let glob = globset::Glob::new(p)
                .map_err(|e| Stop::Fail(job_error("invalid_request", format!("tool pattern {p:?}: {e}"))))?;
            builder.add(glob);
        }
        let set = builder
            .build()
            .map_err(|e| Stop::Fail(job_error("invalid_request", e.to_string())))?;
        let chosen: Vec<ToolDescriptor> =
            if self.req.tools.is_empty() {
                vec![]
            } else {
                let all =
                    self.rt.tools.list_tools().await.map_err(|e| {
                        Stop::Fail(job_error("tools_unavailable", format!("listing tools failed: {e}")))
                    })?;
                all.into_iter().filter(|t| set.is_match(t.qualified_name())).collect()
            };
        let entry = Entry::Tools(journal::ToolsChosen { tools: chosen.clone() });
        self.commit_step(|job, now| {
            Ok(Step {
                next: bump(job, now),
                events: vec![],
                journal: vec![(key::TOOLS.into(), entry.clone())],
                settlements: vec![],
            })
        })
        .await?;
        Ok(chosen)
    }

    /// Usage journaled so far (model calls).
    fn usage_so_far(&self) -> ExecutionUsage {
        let j = self.journal.lock().unwrap_or_else(|e| e.into_inner());
        usage_of(j.values())
    }

    /// The model this run uses now: the requested one, or the degrade model after a `degrade` verdict.
    fn current_model(&self) -> String {
        match &self.req.degrade_model {
            Some(fallback) if self.degraded.load(Ordering::SeqCst) => fallback.clone(),
            _ => self.req.model.clone(),
        }
    }

    async fn model_step(&self, turn: u32, messages: &[Message], specs: &[ToolSpec]) -> Result<ModelResponse, Stop> {
        loop {
            let model = self.current_model();
            match self.model_call(turn, messages, specs, model).await? {
                Some(response) => return Ok(response),
                // Switched to the degrade model: plan the call again under its price and policy.
                None => continue,
            }
        }
    }

    /// One model call with `model`; `Ok(None)` when a `degrade` budget verdict switched the run to its
    /// degrade model instead (the hold was released; the caller retries with the new model).
    async fn model_call(
        &self,
        turn: u32,
        messages: &[Message],
        specs: &[ToolSpec],
        model: String,
    ) -> Result<Option<ModelResponse>, Stop> {
        let rt = &self.rt;
        let attempt = self.charge_interrupted_model_calls(turn).await?;
        let est_in = estimate_tokens(messages, specs);
        let mut max_tokens = u64::from(self.req.max_tokens.unwrap_or(rt.config.default_max_tokens));
        let used = self.usage_so_far();
        let price = rt.models.price(&model);
        let exceeded = |what: String| Stop::Fail(job_error("budget_exceeded", what));
        // Per-job limits: shrink this call's output cap to what is left, never overspend.
        if let Some(limit) = self.req.budget.max_tokens {
            let left = limit.saturating_sub(
                used.input_tokens
                    .saturating_add(used.output_tokens)
                    .saturating_add(est_in),
            );
            if left == 0 {
                return Err(exceeded(format!("the job's token budget ({limit}) is used up")));
            }
            max_tokens = max_tokens.min(left);
        }
        // What was charged counts even when this model has no price (an alias the provider
        // prices by the model the server reports): then nothing can be held in advance, but
        // no call starts once the limit is reached.
        if let Some(limit) = self.req.budget.max_cost
            && used.cost >= limit
        {
            return Err(exceeded(format!("the job's cost budget ({limit}) is used up")));
        }
        if let (Some(limit), Some(p)) = (self.req.budget.max_cost, price) {
            let left = limit - used.cost - p.cost(est_in, 0);
            if left <= Decimal::ZERO {
                return Err(exceeded(format!("the job's cost budget ({limit}) is used up")));
            }
            if !p.output_per_mtok.is_zero() {
                let affordable = (left * Decimal::from(1_000_000u64) / p.output_per_mtok).floor();
                let affordable = u64::try_from(affordable).unwrap_or(u64::MAX);
                if affordable == 0 {
                    return Err(exceeded(format!("the job's cost budget ({limit}) is used up")));
                }
                max_tokens = max_tokens.min(affordable);
            }
        }
        let worst = round_cost(price.map_or(Decimal::ZERO, |p| p.cost(est_in, max_tokens)));
        let decision = self.policy.evaluate_with(
            &PolicyRequest::Model {
                model: &model,
                scope: &self.tenant,
                principal: self.principal.as_deref().unwrap_or(""),
                max_tokens,
                estimated_cost: worst,
                turn,
            },
            rt.approvals.as_ref(),
        );
        match decision.outcome {
            Outcome::Allow | Outcome::Warn => {}
            Outcome::Deny => {
                return Err(Stop::Fail(job_error(
                    "policy_denied",
                    format!("model `{model}` {}: {}", decision.outcome, decision.reason),
                )));
            }
            Outcome::RequireApproval => {
                // Bound to the model (not the per-turn token count), so "approve for this
                // session" covers later turns; journaled per turn, so a resume never re-asks.
                let subject = format!("model:{model}");
                let call = ToolCall {
                    id: format!("t{turn}-model"),
                    name: model.clone(),
                    arguments: json!({ "model": model }),
                };
                let session_approved = self.session.as_deref().is_some_and(|s| {
                    rt.approvals
                        .is_call_approved(self.session_key(s), &subject, &call.arguments)
                });
                if !session_approved {
                    let title = format!("Allow a call to model `{model}` (up to {max_tokens} output tokens)?");
                    let key = key::model_approval(turn);
                    if !self.approval(&key, &call, &subject, title, &decision.reason).await? {
                        return Err(Stop::Fail(job_error(
                            "approval_denied",
                            format!("a human declined the call to model `{model}`"),
                        )));
                    }
                }
            }
        }
        let (hold, verdict) = self
            .reserve_verdict(Usage {
                tokens: est_in + max_tokens,
                cost: worst,
                requests: 1,
                tool_calls: 0,
            })
            .await?;
        if verdict == BudgetOutcome::Degrade
            && let Some(fallback) = &self.req.degrade_model
            && *fallback != model
            && !self.degraded.swap(true, Ordering::SeqCst)
        {
            self.release(hold, "budget degrade: switching model").await;
            let message = format!("a budget is exceeded (degrade): switching from `{model}` to `{fallback}`");
            self.progress(json!({ "message": message, "degraded_to": fallback }))
                .await;
            return Ok(None);
        }
        // Journaled before the request goes out: if this host stops before the answer is
        // journaled, the next one finds the attempt and charges it (its provider bills it).
        let started_entry = Entry::ModelStarted(journal::ModelStarted {
            reservation_id: hold,
            model: model.clone(),
            input_tokens: est_in,
        });
        let started_key = key::model_started(turn, attempt);
        if let Err(stop) = self
            .commit_step(|job, now| {
                Ok(Step {
                    next: bump(job, now),
                    events: vec![],
                    journal: vec![(started_key.clone(), started_entry.clone())],
                    settlements: vec![],
                })
            })
            .await
        {
            self.release(hold, "model call not started").await;
            return Err(stop);
        }
        let request = ModelRequest {
            model: model.clone(),
            messages: messages.to_vec(),
            tools: specs.to_vec(),
            max_tokens: Some(u32::try_from(max_tokens).unwrap_or(u32::MAX)),
            temperature: self.req.temperature,
        };
        // Streamed deltas become model.token / model.reasoning events, coalesced per wake-up.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<ModelDelta>();
        let forwarder = {
            let kernel = rt.kernel.clone();
            let lease = self.lease.clone();
            let (job_id, tenant) = (self.job_id, self.tenant.clone());
            tokio::spawn(async move {
                while let Some(first) = rx.recv().await {
                    let mut deltas = vec![first];
                    while let Ok(more) = rx.try_recv() {
                        deltas.push(more);
                    }
                    // Runs of the same kind joined into one event each.
                    let mut runs: Vec<(EventType, String)> = Vec::new();
                    for d in deltas {
                        let (event_type, text) = match d {
                            ModelDelta::Token(t) => (EventType::ModelToken, t),
                            ModelDelta::Reasoning(t) => (EventType::ModelReasoning, t),
                        };
                        match runs.last_mut() {
                            Some((last, joined)) if *last == event_type => joined.push_str(&text),
                            _ => runs.push((event_type, text)),
                        }
                    }
                    let now = kernel.clock().now();
                    let events = runs
                        .into_iter()
                        .map(|(event_type, text)| NewEvent {
                            job_id,
                            tenant: tenant.clone(),
                            event_type,
                            data: json!({ "turn": turn, "text": text }).into(),
                            at: now,
                        })
                        .collect();
                    // Streaming is best-effort: the full answer is journaled with model.done. Guarded
                    // like a step: a host that lost the job, or a job that ended, gets no more events.
                    let _ = kernel
                        .commit(Batch {
                            events,
                            leases: vec![lease.guard()],
                            ..Batch::default()
                        })
                        .await;
                }
            })
        };
        let started = Instant::now();
        let streamed = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let attempt = ModelAttempt {
            model: model.clone(),
            turn,
            est_in,
            price,
            streamed: streamed.clone(),
            started,
        };
        self.models_in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(hold, attempt.clone());
        let result = {
            let streamed = streamed.clone();
            let on_delta = move |d: ModelDelta| {
                let (ModelDelta::Token(text) | ModelDelta::Reasoning(text)) = &d;
                streamed.fetch_add(text.len() as u64, std::sync::atomic::Ordering::Relaxed);
                let _ = tx.send(d);
            };
            rt.models.complete(&request, &on_delta).await
        };
        let _ = forwarder.await;
        self.models_in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&hold);
        let mut response = match result {
            Ok(r) => r,
            Err(e) => {
                // The request was made (a provider bills what its model generated before a
                // stream broke): recorded as one, never released as if not made.
                let (actual, details) = attempt.charge(json!({ "failed": true, "error": e.to_string() }));
                self.charge_unjournaled(hold, LedgerKind::ModelUsage, actual, details)
                    .await;
                return Err(Stop::Fail(job_error("model_error", e.to_string())));
            }
        };
        let estimated = charge_estimate_if_unreported(&mut response, est_in, price.as_ref());
        let actual = Usage {
            tokens: response.usage.input_tokens.saturating_add(response.usage.output_tokens),
            cost: round_cost(response.usage.cost),
            requests: 1,
            tool_calls: 0,
        };
        let mut journaled = response.clone();
        journaled.usage.cost = actual.cost;
        let entry = Entry::ModelResponse(journaled.clone());
        let names: Vec<&str> = response.message.tool_calls.iter().map(|c| c.name.as_str()).collect();
        let mut done = json!({
            "turn": turn,
            "model": response.model,
            "finish_reason": response.finish_reason,
            "usage": journaled.usage,
            "tool_calls": names,
        });
        if estimated {
            done["usage_estimated"] = json!(true);
        }
        let duration_ms = started.elapsed().as_millis() as u64;
        let committed = self
            .commit_step(|job, now| {
                let mut next = bump(job, now);
                next.turns += 1;
                Ok(Step {
                    events: vec![job_event(&next, EventType::ModelDone, done.clone(), now)],
                    next,
                    journal: vec![(key::model(turn), entry.clone())],
                    settlements: vec![SettleRequest {
                        reservation_id: hold,
                        kind: LedgerKind::ModelUsage,
                        actual: actual.clone(),
                        duration_ms: Some(duration_ms),
                        model: Some(model.clone()),
                        tool: None,
                        data: json!({ "turn": turn }).into(),
                        now,
                    }],
                })
            })
            .await;
        if let Err(stop) = committed {
            // The model was called and its provider will bill it: record that, journaled or not.
            let details = SettleDetails {
                duration_ms: Some(duration_ms),
                model: Some(model.clone()),
                tool: None,
                data: json!({ "turn": turn, "journaled": false }).into(),
            };
            self.charge_unjournaled(hold, LedgerKind::ModelUsage, actual, details)
                .await;
            return Err(stop);
        }
        self.held.lock().unwrap_or_else(|e| e.into_inner()).remove(&hold);
        self.after_settle(hold, !journaled.message.tool_calls.is_empty())
            .await?;
        Ok(Some(journaled))
    }

    /// A progress event of this job (best effort: a job that ended meanwhile gets none).
    async fn progress(&self, data: Value) {
        let _ = self.rt.kernel.jobs().emit(self.job_id, EventType::Progress, data).await;
    }

    /// Charge the model calls of `turn` that a host started and never saw answered (it stopped:
    /// a crash, a lost lease), each as one request with its prompt's estimate, and say so with an
    /// event; returns the number of this turn's next attempt. Settling is once: an attempt whose
    /// hold is already settled (charged by an earlier resume) is left as it is; one the sweeper
    /// released is recorded as overage.
    async fn charge_interrupted_model_calls(&self, turn: u32) -> Result<u32, Stop> {
        let mut attempt = 0;
        while let Some(entry) = self.journaled(&key::model_started(turn, attempt)) {
            attempt += 1;
            let Entry::ModelStarted(started) = entry else { continue };
            let price = self.rt.models.price(&started.model);
            let actual = Usage {
                tokens: started.input_tokens,
                cost: round_cost(price.map_or(Decimal::ZERO, |p| p.cost(started.input_tokens, 0))),
                requests: 1,
                tool_calls: 0,
            };
            let details = SettleDetails {
                duration_ms: None,
                model: Some(started.model.clone()),
                tool: None,
                data: json!({ "turn": turn, "attempt": attempt - 1, "interrupted": true, "reason": "host stopped" })
                    .into(),
            };
            let ledger = self.rt.kernel.ledger();
            let settled = ledger
                .settle(started.reservation_id, LedgerKind::ModelUsage, actual, details)
                .await;
            if settled.is_ok() {
                let message = format!(
                    "the model call of turn {turn} was interrupted (its host stopped): charged as one request; asking again"
                );
                self.progress(json!({ "message": message, "turn": turn, "interrupted": true }))
                    .await;
            }
        }
        Ok(attempt)
    }

    /// After a settlement: usage beyond the hold (the store recorded it as `overage`) is shown as
    /// an event, and if the loop would spend more (`continuing`) while a deny budget is now
    /// crossed, the job stops here rather than at its next hold.
    async fn after_settle(&self, hold: Uuid, continuing: bool) -> Result<(), Stop> {
        let ledger = self.rt.kernel.ledger();
        let overage = ledger.reservation(hold).await.map_err(Stop::Error)?.overage();
        if overage.is_zero() {
            return Ok(());
        }
        let message = format!(
            "usage beyond its hold: {} tokens, cost {}, recorded as overage",
            overage.tokens, overage.cost
        );
        self.progress(json!({ "message": message, "overage": overage, "reservation_id": hold }))
            .await;
        if !continuing {
            return Ok(());
        }
        let statuses: Vec<BudgetStatus> = ledger
            .budget_report(&self.tenant)
            .await
            .map_err(Stop::Error)?
            .into_iter()
            .filter(|s| {
                s.budget
                    .applies_to(&self.tenant, self.principal.as_deref(), self.session.as_deref())
            })
            .collect();
        let decision = evaluate_budgets(&Usage::zero(), &statuses);
        if decision.outcome == BudgetOutcome::Deny {
            return Err(Stop::Fail(job_error(
                "budget_exceeded",
                format!("usage beyond its hold crossed a budget: {decision}"),
            )));
        }
        Ok(())
    }

    async fn reserve(&self, amount: Usage) -> Result<Uuid, Stop> {
        self.reserve_verdict(amount).await.map(|(id, _)| id)
    }

    /// Hold `amount` against the budgets; also returns the verdict (allow, warn or degrade).
    async fn reserve_verdict(&self, amount: Usage) -> Result<(Uuid, BudgetOutcome), Stop> {
        let request = HoldRequest {
            tenant: self.tenant.clone(),
            principal: self.principal.clone(),
            session: self.session.clone(),
            job_id: Some(self.job_id),
            amount,
            ttl: None,
        };
        let serial = self.commit_lock.lock().await;
        let reserved = self.rt.kernel.ledger().reserve(request).await;
        drop(serial);
        match reserved {
            Ok(r) => {
                self.held
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(r.reservation.id);
                Ok((r.reservation.id, r.decision.outcome))
            }
            Err(KernelError::BudgetExceeded(d)) => Err(Stop::Fail(job_error("budget_exceeded", d.to_string()))),
            Err(e) => Err(Stop::Error(e)),
        }
    }

    async fn release(&self, id: Uuid, reason: &str) {
        self.held.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
        // Already settled/released (e.g. by the expiry sweep) is fine.
        let _ = self.rt.kernel.ledger().release(id, reason).await;
    }

    /// Settle every hold of steps that did not finish (the loop is stopping). A tool call whose
    /// start is journaled may have had its effects, so it is charged as one call, like a call a
    /// crash interrupted — else stopping jobs mid-call would run calls no budget counts. A model
    /// call cut off mid-answer was made all the same (its provider bills what it generated): it
    /// is charged as one request with estimates, whoever owns the job now (nothing journaled it,
    /// so no new owner will). Every other hold (a call still waiting for approval) is released.
    /// With `lost` (another host owns the job now), the started tool calls are left to the new
    /// owner, which resumes and charges them.
    pub(crate) async fn release_all(&self, lost: bool) {
        let models: HashMap<Uuid, ModelAttempt> =
            std::mem::take(&mut *self.models_in_flight.lock().unwrap_or_else(|e| e.into_inner()));
        for (hold, attempt) in &models {
            let (actual, details) = attempt.charge(json!({ "interrupted": true, "reason": "job stopped" }));
            self.charge_unjournaled(*hold, LedgerKind::ModelUsage, actual, details)
                .await;
        }
        let ids: Vec<Uuid> = self.held.lock().unwrap_or_else(|e| e.into_inner()).drain().collect();
        let started: HashMap<Uuid, (String, journal::ToolStarted)> = {
            let j = self.journal.lock().unwrap_or_else(|e| e.into_inner());
            j.iter()
                .filter_map(|(key, e)| match e {
                    Entry::ToolStarted(s) if ids.contains(&s.reservation_id) => {
                        Some((s.reservation_id, (key.clone(), s.clone())))
                    }
                    _ => None,
                })
                .collect()
        };
        for id in ids {
            match started.get(&id) {
                Some(_) if lost => {}
                Some((at, s)) => {
                    let turn = key::turn_of(at);
                    let data = json!({
                        "turn": turn,
                        "call_id": s.call_id,
                        "attempt": s.attempt,
                        "interrupted": true,
                        "reason": "job stopped",
                    });
                    // Already settled (the result's commit landed as the loop stopped) is fine.
                    let _ = self.charge_started(id, &s.tool, data).await;
                }
                None => {
                    let _ = self.rt.kernel.ledger().release(id, "job stopped").await;
                }
            }
        }
    }

    /// Settle `hold`, the hold of a tool call that started but whose result was never
    /// journaled, as one tool call (`data` says why). A hold the sweeper released is recorded as
    /// overage by the store.
    async fn charge_started(&self, hold: Uuid, tool: &str, data: Value) -> Result<Reservation, KernelError> {
        let details = SettleDetails {
            duration_ms: None,
            model: None,
            tool: Some(tool.to_string()),
            data: data.into(),
        };
        let serial = self.commit_lock.lock().await;
        let settled = self
            .rt
            .kernel
            .ledger()
            .settle(
                hold,
                LedgerKind::ToolUsage,
                Usage {
                    tool_calls: 1,
                    ..Usage::zero()
                },
                details,
            )
            .await;
        drop(serial);
        self.held.lock().unwrap_or_else(|e| e.into_inner()).remove(&hold);
        settled
    }

    /// Journal a call's outcome as the tool message the model will see (no tool ran).
    async fn refuse(
        &self,
        base: &str,
        call: &ToolCall,
        tool: &str,
        code: &str,
        message: String,
    ) -> Result<journal::ToolResult, Stop> {
        let result = journal::ToolResult {
            content: format!("{}{message}", journal::REFUSAL_PREFIX),
            is_error: true,
            code: Some(code.to_string()),
            ran: false,
            tool: tool.to_string(),
            output: None,
            error: None,
            receipt: None,
            diagnostics: Default::default(),
        };
        let entry = Entry::ToolResult(result.clone());
        let data = json!({ "call_id": call.id, "tool": tool, "code": code, "message": message });
        self.commit_step(|job, now| {
            Ok(Step {
                next: bump(job, now),
                events: vec![self.event(EventType::ToolError, data.clone(), now)],
                journal: vec![(key::result(base), entry.clone())],
                settlements: vec![],
            })
        })
        .await?;
        Ok(result)
    }

    async fn call_step(
        &self,
        turn: u32,
        idx: usize,
        call: &ToolCall,
        desc: Option<&ToolDescriptor>,
    ) -> Result<journal::ToolResult, Stop> {
        let base = key::call(turn, idx);
        match self.journaled(&key::result(&base)) {
            Some(Entry::ToolResult(r)) => return Ok(r),
            Some(other) => return Err(corrupt(format!("journal {base}/result is a {}", other.kind()))),
            None => {}
        }
        let Some(desc) = desc else {
            let msg = format!("there is no tool named `{}`", call.name);
            return self.refuse(&base, call, &call.name, "unknown_tool", msg).await;
        };
        let tool = desc.qualified_name();
        let args = &call.arguments;
        // Attempts already started (journaled `started` entries); more than zero means the host
        // stopped while the last one ran and its outcome is unknown.
        let attempt = self.attempts_started(&base);
        if let Err(errors) = schema::validate(&desc.input_schema, args) {
            let msg = format!("invalid input for `{tool}`: {}", errors.join("; "));
            return self.refuse(&base, call, &tool, "invalid_input", msg).await;
        }
        let decision = self.policy.evaluate_tool_with(
            &PolicyRequest::Tool {
                tool: &tool,
                arguments: args,
                scope: &self.tenant,
                principal: self.principal.as_deref().unwrap_or(""),
                session: self.session.as_deref(),
                tool_calls_this_turn: idx as u32,
                turn,
            },
            desc.stands_for.as_deref(),
            self.rt.approvals.as_ref(),
        );
        match decision.outcome {
            Outcome::Allow | Outcome::Warn => {}
            Outcome::Deny => {
                let msg = format!("the call to `{tool}` was denied by policy: {}", decision.reason);
                return self.refuse(&base, call, &tool, "policy_denied", msg).await;
            }
            Outcome::RequireApproval => {
                let title = format!("Allow `{tool}`?");
                if !self
                    .approval(&key::approval(&base), call, &tool, title, &decision.reason)
                    .await?
                {
                    let msg = format!("the call to `{tool}` was denied by a human reviewer");
                    return self.refuse(&base, call, &tool, "approval_denied", msg).await;
                }
            }
        }
        if attempt > 0 {
            // The interrupted attempt may have run: charge it (a lapsed hold is recorded as
            // overage), so the budget check of the re-run below counts it.
            self.charge_interrupted(&base, attempt - 1, turn, call, &tool).await?;
            if !desc.rerun_safe() {
                // Keyed by attempt: a "yes" covers one re-run, never the next interruption.
                let title = format!("The host stopped during `{tool}`; re-run it (attempt {})?", attempt + 1);
                let approved = self
                    .approval(
                        &key::rerun(&base, attempt),
                        call,
                        &tool,
                        title,
                        "the call was interrupted by a host restart",
                    )
                    .await?;
                if !approved {
                    let msg = format!(
                        "the host stopped while `{tool}` was running and a human chose not to re-run it; its effect is unknown"
                    );
                    return self.refuse(&base, call, &tool, "interrupted", msg).await;
                }
            }
        }
        if let Some(limit) = self.req.budget.max_tool_calls
            && self.started.fetch_add(1, Ordering::SeqCst) >= limit
        {
            return Err(Stop::Fail(job_error(
                "budget_exceeded",
                format!("the job's tool-call budget ({limit}) is used up"),
            )));
        }
        // Every attempt, re-runs included, runs under a fresh hold.
        let hold = self
            .reserve(Usage {
                tool_calls: 1,
                ..Usage::zero()
            })
            .await?;
        let entry = Entry::ToolStarted(journal::ToolStarted {
            reservation_id: hold,
            tool: tool.clone(),
            call_id: call.id.clone(),
            attempt,
        });
        let data = data_json(&ToolStartData {
            turn,
            call_id: &call.id,
            tool: &tool,
            attempt,
        });
        let key = key::started(&base, attempt);
        self.commit_step(|job, now| {
            Ok(Step {
                next: bump(job, now),
                events: vec![self.event(EventType::ToolStart, data.clone(), now)],
                journal: vec![(key.clone(), entry.clone())],
                settlements: vec![],
            })
        })
        .await?;
        // A re-run nobody was asked about is safe only because the tool is effect-free.
        let relies_on_effect_free = attempt > 0 && !desc.idempotent && desc.effect_free;
        self.run_tool(turn, &base, call, desc, hold, relies_on_effect_free)
            .await
    }

    /// How many attempts of the call at `base` were started (journaled).
    fn attempts_started(&self, base: &str) -> u32 {
        let mut n = 0;
        while self.journaled(&key::started(base, n)).is_some() {
            n += 1;
        }
        n
    }

    /// Settle the hold of interrupted attempt `attempt` as one tool call (once: a later resume
    /// finds it settled). A hold the sweeper released is recorded as overage by the store.
    async fn charge_interrupted(
        &self,
        base: &str,
        attempt: u32,
        turn: u32,
        call: &ToolCall,
        tool: &str,
    ) -> Result<(), Stop> {
        let key = key::started(base, attempt);
        let hold = match self.journaled(&key) {
            Some(Entry::ToolStarted(s)) => s.reservation_id,
            _ => return Err(corrupt(format!("journal {key} has no started call"))),
        };
        let data = json!({ "turn": turn, "call_id": call.id, "attempt": attempt, "interrupted": true });
        let settled = self.charge_started(hold, tool, data).await;
        match settled {
            Ok(_) => Ok(()),
            // Charged by an earlier resume (that stopped before re-running).
            Err(KernelError::ReservationState {
                state: ReservationState::Settled,
                ..
            }) => Ok(()),
            Err(e) => Err(Stop::Error(e)),
        }
    }

    /// Run the tool under its own timeout, then journal the result + settle (with the call's
    /// receipt) + events at once. With `relies_on_effect_free`, the host refuses the call if the
    /// tool's grants now allow an effect (see [`ToolCallContext::effect_free`]).
    async fn run_tool(
        &self,
        turn: u32,
        base: &str,
        call: &ToolCall,
        desc: &ToolDescriptor,
        hold: Uuid,
        relies_on_effect_free: bool,
    ) -> Result<journal::ToolResult, Stop> {
        let tool = desc.qualified_name();
        let agent_limit = Duration::from_millis(self.rt.config.tool_timeout_ms);
        let timeout = desc.timeout.map_or(agent_limit, |own| own.min(agent_limit));
        let ctx = ToolCallContext {
            call_id: call_key(self.job_id, base),
            job_id: Some(self.job_id.to_string()),
            scope: self.tenant.clone(),
            principal: self.principal.clone(),
            trace_id: self.trace_id.clone(),
            timeout: Some(timeout),
            effect_free: relies_on_effect_free,
        };
        self.ensure_lease(backstop(timeout)).await?;
        let started = Instant::now();
        let call_tool = self.rt.tools.call_tool(&ctx, &tool, &call.arguments);
        let outcome = match tokio::time::timeout(backstop(timeout), call_tool).await {
            Ok(outcome) => outcome,
            Err(_) => timed_out(timeout, started),
        };
        let duration_ms = started.elapsed().as_millis() as u64;
        let (result, event_type, data) = tool_result(outcome, &tool, turn, &call.id, duration_ms);
        let usage_data = data_json(&UsageData {
            turn,
            call_id: &call.id,
            receipt: result.receipt.as_ref(),
        });
        let entry = Entry::ToolResult(result.clone());
        self.commit_step(|job, now| {
            let mut next = bump(job, now);
            next.tool_calls += 1;
            Ok(Step {
                events: vec![job_event(&next, event_type, data.clone(), now)],
                next,
                journal: vec![(key::result(base), entry.clone())],
                settlements: vec![tool_settlement(hold, &tool, duration_ms, usage_data.clone(), now)],
            })
        })
        .await?;
        self.held.lock().unwrap_or_else(|e| e.into_inner()).remove(&hold);
        Ok(result)
    }

    /// Ask a human to approve `tool(call.arguments)`: create (once, journaled with the action)
    /// an approval bound to the exact call, wait, journal the answer. `true` = approved.
    async fn approval(
        &self,
        key: &str,
        call: &ToolCall,
        tool: &str,
        title: String,
        reason: &str,
    ) -> Result<bool, Stop> {
        let resolved_key = key::resolved(key);
        match self.journaled(&resolved_key) {
            Some(Entry::Approval(a)) => return Ok(a.approved),
            Some(other) => return Err(corrupt(format!("journal {resolved_key} is a {}", other.kind()))),
            None => {}
        }
        let action_id = match self.journaled(key) {
            Some(Entry::ApprovalRequested(r)) => r.action_id,
            Some(other) => return Err(corrupt(format!("journal {key} is a {}", other.kind()))),
            None => {
                let new = NewAction {
                    job_id: self.job_id,
                    action_type: ActionType::Approval,
                    title,
                    request: json!({
                        "tool": tool,
                        "arguments": call.arguments,
                        "call_id": call.id,
                        "reason": reason,
                        "step": key,
                    }),
                    call: Some(ToolCallRef {
                        tool: tool.to_string(),
                        arguments: call.arguments.clone(),
                    }),
                    ttl: chrono::Duration::seconds(self.rt.config.approval_ttl_secs),
                };
                self.create_approval(key, new).await?
            }
        };
        let action = self.wait_action(action_id).await?;
        let approved = match action.state {
            ActionState::Resolved => {
                let ok = action.authorizes(tool, &call.arguments);
                if ok
                    && let (Some(session), Some(res)) = (&self.session, &action.resolution)
                    && resolution_is_session_scoped(res)
                {
                    self.rt
                        .approvals
                        .approve_call(self.session_key(session), tool, &call.arguments);
                }
                ok
            }
            // Withdrawn without an answer: treat as a refusal.
            ActionState::Cancelled => false,
            // Expiry times the job out (done by whoever expired it).
            ActionState::Expired | ActionState::Pending => return Err(Stop::Ended),
        };
        let entry = Entry::Approval(journal::ApprovalAnswered {
            action_id: action.id,
            approved,
            session: action.resolution.as_ref().is_some_and(resolution_is_session_scoped),
            resolved_by: action.resolution.as_ref().and_then(|r| r.resolved_by.clone()),
        });
        self.commit_step(|job, now| {
            Ok(Step {
                next: bump(job, now),
                events: vec![],
                journal: vec![(resolved_key.clone(), entry.clone())],
                settlements: vec![],
            })
        })
        .await?;
        Ok(approved)
    }

    async fn create_approval(&self, key: &str, new: NewAction) -> Result<Uuid, Stop> {
        let actions = self.rt.kernel.actions();
        let created = actions
            .create_journaled(new, |action_id, now| Batch {
                journal: vec![self.entry(
                    key.to_string(),
                    &Entry::ApprovalRequested(journal::ApprovalRequested { action_id }),
                    now,
                )],
                leases: vec![self.lease()],
                ..Batch::default()
            })
            .await?;
        let id = created.action.id;
        // No listener is fine: the approval can still be resolved by id by an operator.
        let _ = self.rt.issued_tokens.send(super::IssuedToken {
            job_id: self.job_id,
            action_id: id,
            token: created.token,
        });
        self.journal.lock().unwrap_or_else(|e| e.into_inner()).insert(
            key.to_string(),
            Entry::ApprovalRequested(journal::ApprovalRequested { action_id: id }),
        );
        Ok(id)
    }

    /// Wait for the action to leave PENDING: live wake-up in this process, plus a periodic
    /// re-read for resolutions made by another process.
    async fn wait_action(&self, id: Uuid) -> Result<Action, Stop> {
        let actions = self.rt.kernel.actions();
        let wait = actions.wait_for_resolution(id);
        tokio::pin!(wait);
        let every = Duration::from_millis(self.rt.config.poll_ms.max(1));
        loop {
            tokio::select! {
                r = &mut wait => return r.map_err(Stop::from),
                _ = tokio::time::sleep(every) => {
                    let a = actions.get(&self.tenant, id).await?;
                    if a.state != ActionState::Pending {
                        return Ok(a);
                    }
                }
            }
        }
    }

    async fn complete(&self, content: String) -> Result<(), Stop> {
        let usage = self.usage_so_far();
        let entry = Entry::Final(journal::Final {
            status: JobState::Succeeded,
            content: Some(content.clone()),
            error: None,
        });
        self.commit_step(|job, now| {
            let mut next = transition(job, JobState::Succeeded, now)?;
            next.result_ref = Some("journal:final".into());
            next.progress = 1.0;
            let status = status_event(
                job.state,
                &next,
                StatusDetail {
                    result_ref: next.result_ref.as_deref(),
                    ..StatusDetail::default()
                },
                now,
            );
            let data = FinalResultData {
                content: &content,
                usage: &usage,
                turns: next.turns,
            };
            let fin = job_event(&next, EventType::FinalResult, data_json(&data), now);
            Ok(Step {
                next,
                events: vec![status, fin],
                journal: vec![(key::FINAL.into(), entry.clone())],
                settlements: vec![],
            })
        })
        .await?;
        Ok(())
    }

    /// End the job after the loop stopped with `stop` (FAILED / TIMED_OUT), writing the final
    /// error event and journal entry in the same transaction.
    pub(crate) async fn conclude(&self, stop: &Stop) {
        let (to, error) = match stop {
            Stop::Fail(e) => (JobState::Failed, e.clone()),
            Stop::TimedOut => (
                JobState::TimedOut,
                job_error("deadline_exceeded", "the job ran past its deadline"),
            ),
            Stop::Ended | Stop::Lost | Stop::Error(_) => return,
        };
        let now = self.rt.kernel.clock().now();
        let extra = Batch {
            events: vec![self.event(
                EventType::FinalError,
                json!({ "code": error.code, "message": error.message }),
                now,
            )],
            journal: vec![self.entry(
                key::FINAL.into(),
                &Entry::Final(journal::Final {
                    status: to,
                    content: None,
                    error: Some(error.clone()),
                }),
                now,
            )],
            leases: vec![self.lease()],
            ..Batch::default()
        };
        // Already terminal (cancelled/timed out concurrently) or lease lost: nothing to do.
        let _ = self
            .rt
            .kernel
            .jobs()
            .terminate_with(self.job_id, to, error, &extra)
            .await;
    }
}

/// How long past a call's deadline the kernel waits for the tool host's own answer before it
/// records a timeout itself. The sandbox stops a call at its deadline and reports what it
/// measured (peak memory, logs) within ~250 ms, or ~1.25 s for a streamed call (it lets queued
/// output drain for up to 1 s); the kernel's timer is a backstop for a host that never answers,
/// and firing first would drop that report from the receipt.
const REPORT_GRACE: Duration = Duration::from_secs(2);

/// When the kernel gives up on a call whose deadline is `timeout` ([`REPORT_GRACE`] later).
pub(crate) fn backstop(timeout: Duration) -> Duration {
    timeout + REPORT_GRACE
}

/// The outcome of a call that ran past `timeout` (started at `started`).
pub(crate) fn timed_out(timeout: Duration, started: Instant) -> crate::tool::ToolOutcome {
    crate::tool::ToolOutcome {
        result: Err(ToolError::TimedOut {
            message: format!("no result within {} ms", timeout.as_millis()),
        }),
        receipt: Receipt {
            wall_us: u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
            ..Receipt::default()
        },
        diagnostics: Default::default(),
    }
}

/// A call's outcome as journaled (`result` entry) and announced (`tool.end` or `tool.error` with
/// its data): the one shape both the runner and the direct call path write.
pub(crate) fn tool_result(
    outcome: crate::tool::ToolOutcome,
    tool: &str,
    turn: u32,
    call_id: &str,
    duration_ms: u64,
) -> (journal::ToolResult, EventType, JsonText) {
    /// `tool.end` / `tool.error` data, serialised at once.
    #[derive(Serialize)]
    struct Ended<'a> {
        turn: u32,
        call_id: &'a str,
        tool: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        code: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        message: Option<String>,
        duration_ms: u64,
        receipt: &'a Receipt,
    }
    let receipt = outcome.receipt;
    let diagnostics = outcome.diagnostics;
    let (result, event_type) = match outcome.result {
        Ok(output) => (
            journal::ToolResult {
                content: output_text(&output),
                is_error: false,
                code: None,
                ran: true,
                tool: tool.to_string(),
                output: Some(output),
                error: None,
                receipt: None,
                diagnostics,
            },
            EventType::ToolEnd,
        ),
        Err(e) => (
            journal::ToolResult {
                content: format!("error ({}): {e}", e.code()),
                is_error: true,
                code: Some(e.code().to_string()),
                ran: true,
                tool: tool.to_string(),
                output: None,
                error: Some(e),
                receipt: None,
                diagnostics,
            },
            EventType::ToolError,
        ),
    };
    let data = data_json(&Ended {
        turn,
        call_id,
        tool,
        code: result.code.as_deref(),
        message: result.error.as_ref().map(ToString::to_string),
        duration_ms,
        receipt: &receipt,
    });
    (
        journal::ToolResult {
            receipt: Some(receipt),
            ..result
        },
        event_type,
        data,
    )
}

/// The data of a tool call's usage entry: where in the job it was, and its receipt.
#[derive(Serialize)]
pub(crate) struct UsageData<'a> {
    pub(crate) turn: u32,
    pub(crate) call_id: &'a str,
    pub(crate) receipt: Option<&'a crate::tool::Receipt>,
}

/// The data of a `tool.start` event (the runner's and the direct call's).
#[derive(Serialize)]
pub(crate) struct ToolStartData<'a> {
    pub(crate) turn: u32,
    pub(crate) call_id: &'a str,
    pub(crate) tool: &'a str,
    pub(crate) attempt: u32,
}

/// The data of a `final.result` event (the runner's and the direct call's).
#[derive(Serialize)]
pub(crate) struct FinalResultData<'a> {
    pub(crate) content: &'a str,
    pub(crate) usage: &'a ExecutionUsage,
    pub(crate) turns: u32,
}

/// The settlement of a tool call's hold `hold`: one call of `tool`, taking `duration_ms`, with
/// `data` (its turn, call id and receipt).
pub(crate) fn tool_settlement(
    hold: Uuid,
    tool: &str,
    duration_ms: u64,
    data: JsonText,
    now: DateTime<Utc>,
) -> SettleRequest {
    SettleRequest {
        reservation_id: hold,
        kind: LedgerKind::ToolUsage,
        actual: Usage {
            tool_calls: 1,
            ..Usage::zero()
        },
        duration_ms: Some(duration_ms),
        model: None,
        tool: Some(tool.to_string()),
        data,
        now,
    }
}

/// Event or ledger data (strings, numbers, plain structs: serialising cannot fail) as JSON text.
pub(crate) fn data_json(data: &impl Serialize) -> JsonText {
    JsonText::of(data).expect("event and ledger data serialise")
}

/// Usage summed over journal entries.
pub(crate) fn usage_of<'a>(entries: impl Iterator<Item = &'a Entry>) -> ExecutionUsage {
    let mut u = ExecutionUsage::default();
    for entry in entries {
        match entry {
            Entry::ModelResponse(r) => {
                u.model_calls += 1;
                // A model's report is not trusted to stay small: sums stop at the top.
                u.input_tokens = u.input_tokens.saturating_add(r.usage.input_tokens);
                u.output_tokens = u.output_tokens.saturating_add(r.usage.output_tokens);
                u.cost += r.usage.cost;
            }
            Entry::ToolResult(r) if r.ran => u.tool_calls += 1,
            _ => {}
        }
    }
    u
}

/// The result of a finished (or still running) job, rebuilt from its row and journal.
pub(crate) async fn build_result(rt: &Inner, job: &Job) -> Result<ExecutionResult, KernelError> {
    let stored = rt.kernel.store().read_journal(job.id).await?;
    let journal = journal::decode_all(&stored).map_err(|e| KernelError::Store(StoreError::Corrupt(e.to_string())))?;
    let usage = usage_of(journal.iter().map(|(_, e)| e));
    let content = journal.iter().find_map(|(_, e)| match e {
        Entry::Final(f) => f.content.clone(),
        _ => None,
    });
    // A direct tool call's outcome (its only call, `t1/c0`).
    let direct = job.input.field("call").is_some_and(|c| !c.is_null());
    let tool_result = journal.iter().find_map(|(k, e)| match e {
        Entry::ToolResult(r) if direct && *k == key::result(&key::call(1, 0)) => Some(r.clone()),
        _ => None,
    });
    Ok(ExecutionResult {
        job_id: job.id,
        status: job.state,
        content,
        usage,
        turns: job.turns,
        artifacts: vec![],
        error: job.error.clone(),
        tool_result,
    })
}

/// The tool-call context's `call_id`: `<job id>/<step>` (e.g. `…/t2/c0`), the same for every
/// (re-)run of one logical call and unique to the job, so a tool can pass it on as an idempotency
/// key (`http-fetch` sends it as `Idempotency-Key`).
pub(crate) fn call_key(job_id: Uuid, base: &str) -> String {
    format!("{job_id}/{base}")
}

/// Why the heartbeat stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Beat {
    /// The job was ended by another process (cancel, timeout, ...): this host releases its holds.
    Ended,
    /// Another host holds the lease now: this host leaves the job to it.
    Lost,
}

/// Keep renewing this host's lease on the job while its loop runs; run it on its own task, so a
/// loop busy inside one poll (a guest computing) does not starve it. Reports once the job was
/// ended by another process ([`Beat::Ended`], e.g. `keel jobs cancel`) or the lease went to
/// another host ([`Beat::Lost`]), so a loop stuck in a long call stops within a third of the
/// lease. A store error is retried at the next tick (the lease has slack, and a tool call never
/// starts without a lease that covers it, see `ensure_lease`).
///
/// It also keeps the job's live holds from expiring under a call that outlasts their TTL: every
/// half hold-TTL it extends them by a full one (the sweeper would otherwise release a hold whose
/// call is still running, and its budget would no longer be reserved).
pub(crate) async fn heartbeat(
    rt: Arc<Inner>,
    lease: Arc<LeaseState>,
    held: Held,
    report: tokio::sync::oneshot::Sender<Beat>,
) {
    let ttl = rt.config.lease_ttl_ms.max(3);
    let mut tick = tokio::time::interval(Duration::from_millis(ttl / 3));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let hold_ttl = chrono::Duration::seconds(rt.kernel.config().hold_ttl_secs.max(1));
    let extend_every = hold_ttl.to_std().unwrap_or(Duration::from_secs(1)) / 2;
    let mut extended = Instant::now();
    loop {
        tick.tick().await;
        if let Ok(Some(job)) = rt.kernel.store().get_job(lease.job_id).await
            && job.state.is_terminal()
        {
            let _ = report.send(Beat::Ended);
            return;
        }
        match lease.renew(&rt, ttl).await {
            Ok(true) => {
                if extended.elapsed() >= extend_every {
                    let ids: Vec<Uuid> = held.lock().unwrap_or_else(|e| e.into_inner()).iter().copied().collect();
                    let until = rt.kernel.clock().now() + hold_ttl;
                    if ids.is_empty() || rt.kernel.store().extend_holds(&ids, until).await.is_ok() {
                        extended = Instant::now();
                    }
                }
            }
            Ok(false) => {
                // Refused: the job may have ended between the two reads.
                let beat = match rt.kernel.store().get_job(lease.job_id).await {
                    Ok(Some(job)) if job.state.is_terminal() => Beat::Ended,
                    _ => Beat::Lost,
                };
                let _ = report.send(beat);
                return;
            }
            Err(_) => {}
        }
    }
}
