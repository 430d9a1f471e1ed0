//! The kernel facade: [`Kernel`] bundles the job, action and ledger managers and the event bus
//! over one [`KernelStore`], plus the recovery sweeper.
//!
//! Every state change is: read rows -> check the state machine -> commit one [`Batch`] (rows
//! with expected versions + the events they cause) -> publish the committed events. A version
//! conflict means another writer won; the operation re-reads and re-checks, a bounded number of
//! times, so nothing is ever silently overwritten.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::action::{
    Action, ActionFilter, ActionState, ActionType, CreatedAction, NewAction, Resolution, ct_eq_str, generate_token,
    hash_token,
};
use crate::canonical::{call_digest, canonical_json};
use crate::clock::{Clock, SystemClock};
use crate::context::{CancellationToken, ExecutionContext};
use crate::error::{KernelError, KernelResult};
use crate::event::{
    EventBus, EventFilter, EventQuery, EventType, NewEvent, RuntimeEvent, Subscription, SubscriptionError,
};
use crate::job::{Job, JobError, JobFilter, JobState, NewJob};
use crate::ledger::{
    Budget, LedgerEvent, LedgerKind, LedgerQuery, NewLedgerEvent, Reservation, ReserveRequest, SettleRequest, Usage,
    UsageQuery, evaluate_budgets,
};
use crate::store::{ActionWrite, Batch, JobWrite, KernelStore, LeaseClaim, StoreError};

/// Tunables of the kernel core. Names match the `[kernel]` config section and CLI flags; an unknown
/// key is an error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KernelConfig {
    /// Live events buffered per slow subscriber before it lags (and must re-read the store).
    pub event_buffer: usize,
    /// Attempts at an optimistic-concurrency write before giving up with `Contention`.
    pub max_write_attempts: u32,
    /// Rows handled per sweep query.
    pub sweep_batch: u32,
    /// How long a budget hold lives if never settled, in seconds.
    pub hold_ttl_secs: i64,
    /// If set, `wait_for_resolution` also re-reads the store this often (milliseconds). Live
    /// wake-ups are in-process only; set this when *another process* may resolve actions in the
    /// same database (e.g. `keel actions resolve` against a running `keel serve` on SQLite).
    pub action_recheck_ms: Option<u64>,
}

impl Default for KernelConfig {
    fn default() -> Self {
        Self {
            event_buffer: 4096,
            max_write_attempts: 64,
            sweep_batch: 500,
            hold_ttl_secs: 600,
            action_recheck_ms: None,
        }
    }
}

struct Core {
    store: Arc<dyn KernelStore>,
    bus: EventBus,
    clock: Arc<dyn Clock>,
    config: KernelConfig,
    tokens: Mutex<HashMap<Uuid, CancellationToken>>,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core")
            .field("store", &self.store)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// A lost optimistic-concurrency race on a job or action row: re-read and retry. (A `lease` or
/// `journal` conflict from an agent-loop batch is final: retrying cannot succeed.)
fn is_conflict(e: &StoreError) -> bool {
    matches!(
        e,
        StoreError::Conflict {
            entity: "job" | "action",
            ..
        }
    )
}

pub(crate) fn job_event(job: &Job, event_type: EventType, data: serde_json::Value, at: DateTime<Utc>) -> NewEvent {
    NewEvent {
        job_id: job.id,
        tenant: job.tenant.clone(),
        event_type,
        data,
        at,
    }
}

fn action_event(a: &Action, event_type: EventType, at: DateTime<Utc>) -> NewEvent {
    let data = json!({
        "action_id": a.id,
        "action_type": a.action_type,
        "title": a.title,
        "state": a.state,
        "request": a.request,
        "call_digest": a.call_digest,
        "expires_at": a.expires_at,
        "resolution": a.resolution,
    });
    NewEvent {
        job_id: a.job_id,
        tenant: a.tenant.clone(),
        event_type,
        data,
        at,
    }
}

/// The new row for `job` moved to `to` at `now`, or `IllegalTransition`.
pub(crate) fn transition(job: &Job, to: JobState, now: DateTime<Utc>) -> KernelResult<Job> {
    if !job.state.can_transition_to(to) {
        return Err(KernelError::IllegalTransition {
            job_id: job.id,
            from: job.state,
            to,
        });
    }
    let mut next = job.clone();
    next.state = to;
    next.version += 1;
    next.updated_at = now;
    if to == JobState::Running && next.started_at.is_none() {
        next.started_at = Some(now);
    }
    if to.is_terminal() {
        next.finished_at = Some(now);
    }
    Ok(next)
}

/// The event announcing `from -> next`.
pub(crate) fn status_event(from: JobState, next: &Job, extra: serde_json::Value, now: DateTime<Utc>) -> NewEvent {
    let event_type = match (from, next.state) {
        (JobState::Queued, JobState::Running) => EventType::JobStarted,
        (_, JobState::Succeeded) => EventType::JobCompleted,
        (_, JobState::Failed) => EventType::JobFailed,
        (_, JobState::Cancelled) => EventType::JobCancelled,
        _ => EventType::JobStatusChanged,
    };
    let mut data = json!({ "from": from, "to": next.state });
    if let (Some(obj), serde_json::Value::Object(extra)) = (data.as_object_mut(), extra) {
        obj.extend(extra);
    }
    job_event(next, event_type, data, now)
}

impl Core {
    fn now(&self) -> DateTime<Utc> {
        self.clock.now()
    }

    async fn commit(&self, batch: Batch) -> Result<Vec<RuntimeEvent>, StoreError> {
        let events = self.store.commit(batch).await?;
        self.bus.publish(events.iter().cloned());
        Ok(events)
    }

    async fn load_job(&self, id: Uuid) -> KernelResult<Job> {
        self.store.get_job(id).await?.ok_or(KernelError::JobNotFound(id))
    }

    async fn load_action(&self, id: Uuid) -> KernelResult<Action> {
        self.store.get_action(id).await?.ok_or(KernelError::ActionNotFound(id))
    }

    async fn pending_actions(&self, job: &Job) -> KernelResult<Vec<Action>> {
        let filter = ActionFilter {
            tenant: job.tenant.clone(),
            job_id: Some(job.id),
            states: vec![ActionState::Pending],
            limit: None,
        };
        Ok(self.store.list_actions(&filter).await?)
    }

    /// Read-check-write on one job with retries. `build` turns the current row into the new row
    /// plus its events; `None` from `build` means "nothing to do".
    async fn mutate_job<F>(&self, id: Uuid, build: F) -> KernelResult<Job>
    where
        F: Fn(&Job, DateTime<Utc>) -> KernelResult<Option<(Job, Vec<NewEvent>)>>,
    {
        for _ in 0..self.config.max_write_attempts {
            let job = self.load_job(id).await?;
            let Some((next, events)) = build(&job, self.now())? else {
                return Ok(job);
            };
            let batch = Batch {
                jobs: vec![JobWrite {
                    job: next.clone(),
                    expected_version: Some(job.version),
                }],
                actions: vec![],
                events,
                ..Batch::default()
            };
            match self.commit(batch).await {
                Ok(_) => return Ok(next),
                Err(e) if is_conflict(&e) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(KernelError::Contention(format!("job {id}")))
    }

    /// Move `root` to the terminal state `to` (FAILED, CANCELLED or TIMED_OUT), cancel every non-terminal
    /// descendant and every pending action of all of them, in one transaction. If
    /// `expired_action` is given, that action becomes EXPIRED instead of CANCELLED.
    async fn terminate(
        &self,
        root: Uuid,
        to: JobState,
        error: Option<JobError>,
        reason: &str,
        expired_action: Option<Uuid>,
        extra: &Batch,
    ) -> KernelResult<Job> {
        for _ in 0..self.config.max_write_attempts {
            let now = self.now();
            let root_job = self.load_job(root).await?;
            let root_next = transition(&root_job, to, now)?;
            let mut batch = Batch::default();
            let mut doomed = vec![(root_job.clone(), root_next)];
            // Walk the whole tree: a finished child may still have running grandchildren.
            let mut queue = VecDeque::from([root_job.clone()]);
            let mut seen = HashSet::from([root_job.id]);
            while let Some(parent) = queue.pop_front() {
                let filter = JobFilter {
                    parent_id: Some(parent.id),
                    ..JobFilter::tenant(parent.tenant.clone())
                };
                for child in self.store.list_jobs(&filter).await? {
                    if !seen.insert(child.id) {
                        continue;
                    }
                    if !child.state.is_terminal() {
                        let next = transition(&child, JobState::Cancelled, now)?;
                        doomed.push((child.clone(), next));
                    }
                    queue.push_back(child);
                }
            }
            for (job, mut next) in doomed {
                let is_root = job.id == root;
                if is_root {
                    next.error = error.clone();
                } else {
                    next.error = Some(JobError {
                        code: "parent_terminated".into(),
                        message: format!("parent job {root} ended: {reason}"),
                    });
                }
                batch
                    .events
                    .push(status_event(job.state, &next, json!({ "reason": reason }), now));
                for action in self.pending_actions(&job).await? {
                    let state = if Some(action.id) == expired_action {
                        ActionState::Expired
                    } else {
                        ActionState::Cancelled
                    };
                    let mut a = action.clone();
                    a.state = state;
                    a.version += 1;
                    a.resolved_at = Some(now);
                    let et = if state == ActionState::Expired {
                        EventType::ActionExpired
                    } else {
                        EventType::ActionCancelled
                    };
                    batch.events.push(action_event(&a, et, now));
                    batch.actions.push(ActionWrite {
                        action: a,
                        expected_version: Some(action.version),
                    });
                }
                batch.jobs.push(JobWrite {
                    job: next,
                    expected_version: Some(job.version),
                });
            }
            // Extra rows written with the transition (the agent loop's final event and journal entry).
            batch.events.extend(extra.events.iter().cloned());
            batch.journal.extend(extra.journal.iter().cloned());
            batch.settlements.extend(extra.settlements.iter().cloned());
            batch.leases.extend(extra.leases.iter().cloned());
            let ids: Vec<Uuid> = batch.jobs.iter().map(|w| w.job.id).collect();
            match self.commit(batch).await {
                Ok(_) => {
                    self.fire_tokens(&ids);
                    return self.load_job(root).await;
                }
                Err(e) if is_conflict(&e) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(KernelError::Contention(format!("job {root}")))
    }

    fn fire_tokens(&self, ids: &[Uuid]) {
        let mut tokens = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        for id in ids {
            if let Some(t) = tokens.remove(id) {
                t.cancel();
            }
        }
    }

    fn forget_token(&self, id: Uuid) {
        self.tokens.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
    }

    /// Take `action` (PENDING) to `state`, with the job effect that implies, in one transaction.
    /// RESOLVED / CANCELLED resume a WAITING_ACTION job when no other action is pending;
    /// EXPIRED times the job out.
    async fn finish_action(
        &self,
        action_id: Uuid,
        state: ActionState,
        resolution: Option<Resolution>,
    ) -> KernelResult<Action> {
        for _ in 0..self.config.max_write_attempts {
            let now = self.now();
            let action = self.load_action(action_id).await?;
            if action.state != ActionState::Pending {
                return Err(KernelError::ActionNotPending {
                    id: action.id,
                    state: action.state,
                });
            }
            if state == ActionState::Resolved && action.expires_at <= now {
                // Too late: expire it now rather than wait for the sweeper.
                match Box::pin(self.finish_action(action_id, ActionState::Expired, None)).await {
                    Ok(_) | Err(KernelError::ActionNotPending { .. }) => {}
                    Err(e) => return Err(e),
                }
                return Err(KernelError::ActionExpired(action_id));
            }
            let job = self.load_job(action.job_id).await?;
            if state == ActionState::Expired {
                if job.state.is_terminal() {
                    // Nothing to time out; just expire the action.
                    let mut a = action.clone();
                    a.state = ActionState::Expired;
                    a.version += 1;
                    a.resolved_at = Some(now);
                    let batch = Batch {
                        jobs: vec![],
                        events: vec![action_event(&a, EventType::ActionExpired, now)],
                        actions: vec![ActionWrite {
                            action: a.clone(),
                            expected_version: Some(action.version),
                        }],
                        ..Batch::default()
                    };
                    match self.commit(batch).await {
                        Ok(_) => return Ok(a),
                        Err(e) if is_conflict(&e) => continue,
                        Err(e) => return Err(e.into()),
                    }
                }
                let error = JobError {
                    code: "action_expired".into(),
                    message: format!("action {} expired", action.id),
                };
                match self
                    .terminate(
                        job.id,
                        JobState::TimedOut,
                        Some(error),
                        "action expired",
                        Some(action.id),
                        &Batch::default(),
                    )
                    .await
                {
                    Ok(_) => return self.load_action(action_id).await,
                    Err(KernelError::IllegalTransition { .. }) => continue,
                    Err(e) => return Err(e),
                }
            }
            let mut a = action.clone();
            a.state = state;
            a.version += 1;
            a.resolved_at = Some(now);
            a.resolution = resolution.clone();
            let event_type = if state == ActionState::Resolved {
                EventType::ActionResolved
            } else {
                EventType::ActionCancelled
            };
            let mut batch = Batch {
                jobs: vec![],
                events: vec![action_event(&a, event_type, now)],
                actions: vec![ActionWrite {
                    action: a.clone(),
                    expected_version: Some(action.version),
                }],
                ..Batch::default()
            };
            // Decided inside the write: every resolve (and every action creation) writes the job
            // row, so if another action was resolved or created after `job` was read, this commit
            // conflicts and the next pass re-reads what is pending. Without it, two concurrent
            // resolves could each see the other still pending and leave the job WAITING_ACTION
            // with nothing left to resolve.
            let others_pending = self.pending_actions(&job).await?.iter().any(|p| p.id != action.id);
            if !job.state.is_terminal() {
                let next = if job.state == JobState::WaitingAction && !others_pending {
                    let next = transition(&job, JobState::Running, now)?;
                    batch
                        .events
                        .push(status_event(job.state, &next, json!({ "action_id": action.id }), now));
                    next
                } else {
                    let mut same = job.clone();
                    same.version += 1;
                    same.updated_at = now;
                    same
                };
                batch.jobs.push(JobWrite {
                    job: next,
                    expected_version: Some(job.version),
                });
            }
            match self.commit(batch).await {
                Ok(_) => return Ok(a),
                // Lost the race: the next pass re-reads and reports why (already resolved, ...).
                Err(e) if is_conflict(&e) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(KernelError::Contention(format!("action {action_id}")))
    }
}

/// Result of [`JobManager::create`].
#[derive(Debug, Clone, PartialEq)]
pub struct CreatedJob {
    /// The job (the existing one if the idempotency key was already used).
    pub job: Job,
    /// Whether this call created it.
    pub created: bool,
}

/// Jobs: create, drive through the state machine, query.
#[derive(Debug, Clone)]
pub struct JobManager {
    core: Arc<Core>,
}

impl JobManager {
    /// Create a QUEUED job. With an idempotency key already used in the tenant for the same
    /// request, returns the existing job (`created: false`); the store's unique constraint makes
    /// this race-free. The same key with a different request is `IdempotencyKeyReused`.
    pub async fn create(&self, new: NewJob) -> KernelResult<CreatedJob> {
        self.create_leased(new, None).await
    }

    /// [`create`](Self::create), and if `lease` is `(owner, ttl)` give `owner` the new job's lease
    /// in the same transaction, so no worker polling for unleased jobs can claim it in between.
    /// (An existing job found by idempotency key is returned as it is, unclaimed.)
    pub async fn create_leased(
        &self,
        new: NewJob,
        lease: Option<(String, chrono::Duration)>,
    ) -> KernelResult<CreatedJob> {
        if new.tenant.is_empty() || new.kind.is_empty() {
            return Err(KernelError::Invalid("a job needs a tenant and a kind".into()));
        }
        let request_hash = new.idempotency_key.as_ref().map(|_| {
            let fingerprint = new
                .request_fingerprint
                .clone()
                .unwrap_or_else(|| json!({ "kind": new.kind, "principal": new.principal, "input": new.input }));
            hex::encode(Sha256::digest(canonical_json(&fingerprint).as_bytes()))
        });
        let same_request = |job: Job| -> KernelResult<CreatedJob> {
            match (&job.request_hash, &request_hash) {
                (Some(first), Some(now)) if first != now => Err(KernelError::IdempotencyKeyReused {
                    tenant: job.tenant.clone(),
                    key: job.idempotency_key.clone().unwrap_or_default(),
                    job_id: job.id,
                }),
                _ => Ok(CreatedJob { job, created: false }),
            }
        };
        if let Some(key) = &new.idempotency_key
            && let Some(job) = self.core.store.get_job_by_key(&new.tenant, key).await?
        {
            return same_request(job);
        }
        let now = self.core.now();
        let job = Job {
            id: Uuid::now_v7(),
            tenant: new.tenant,
            principal: new.principal,
            session: new.session,
            run_id: new.run_id,
            parent_id: new.parent_id,
            kind: new.kind,
            state: JobState::Queued,
            version: 1,
            idempotency_key: new.idempotency_key,
            request_hash: request_hash.clone(),
            input: new.input,
            progress: 0.0,
            progress_message: None,
            turns: 0,
            tool_calls: 0,
            deadline: new.deadline,
            error: None,
            result_ref: None,
            tags: new.tags,
            metadata: new.metadata,
            created_at: now,
            updated_at: now,
            started_at: None,
            finished_at: None,
        };
        let event = job_event(
            &job,
            EventType::JobStatusChanged,
            json!({ "from": null, "to": JobState::Queued }),
            now,
        );
        for _ in 0..self.core.config.max_write_attempts {
            let mut jobs = vec![JobWrite {
                job: job.clone(),
                expected_version: None,
            }];
            if let Some(parent_id) = job.parent_id {
                let parent = self.core.load_job(parent_id).await?;
                if parent.tenant != job.tenant {
                    return Err(KernelError::JobNotFound(parent_id));
                }
                if parent.state.is_terminal() {
                    return Err(KernelError::Invalid(format!(
                        "parent job {parent_id} is {:?}: a finished job cannot get children",
                        parent.state
                    )));
                }
                // Bump the parent's version in the same transaction: a cancel of the parent that
                // read its children before this insert then conflicts and re-reads them, so a
                // child can never slip in under a parent that is being (or has been) cancelled.
                let mut guard = parent.clone();
                guard.version += 1;
                guard.updated_at = now;
                jobs.push(JobWrite {
                    job: guard,
                    expected_version: Some(parent.version),
                });
            }
            let claims = lease
                .iter()
                .map(|(owner, ttl)| LeaseClaim {
                    job_id: job.id,
                    owner: owner.clone(),
                    ttl_ms: u64::try_from(ttl.num_milliseconds()).unwrap_or(0),
                })
                .collect();
            let batch = Batch {
                jobs,
                actions: vec![],
                events: vec![event.clone()],
                claims,
                ..Batch::default()
            };
            match self.core.commit(batch).await {
                Ok(_) => return Ok(CreatedJob { job, created: true }),
                Err(StoreError::DuplicateIdempotencyKey { tenant, key }) => {
                    let job = self.core.store.get_job_by_key(&tenant, &key).await?.ok_or_else(|| {
                        KernelError::Store(StoreError::Corrupt(format!(
                            "idempotency key {key:?} conflicts but no job holds it"
                        )))
                    })?;
                    return same_request(job);
                }
                Err(e) if is_conflict(&e) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(KernelError::Contention(format!(
            "creating a child of {:?}",
            job.parent_id
        )))
    }

    async fn move_to(
        &self,
        id: Uuid,
        to: JobState,
        edit: impl Fn(&mut Job) + Send,
        extra: serde_json::Value,
    ) -> KernelResult<Job> {
        self.core
            .mutate_job(id, |job, now| {
                let mut next = transition(job, to, now)?;
                edit(&mut next);
                let event = status_event(job.state, &next, extra.clone(), now);
                Ok(Some((next, vec![event])))
            })
            .await
    }

    /// QUEUED -> RUNNING.
    pub async fn start(&self, id: Uuid) -> KernelResult<Job> {
        self.move_to(id, JobState::Running, |_| {}, json!({})).await
    }

    /// RUNNING -> WAITING_ACTION (creating an action does this itself).
    pub async fn wait_for_action(&self, id: Uuid) -> KernelResult<Job> {
        self.move_to(id, JobState::WaitingAction, |_| {}, json!({})).await
    }

    /// WAITING_ACTION -> RUNNING (resolving the last pending action does this itself).
    pub async fn resume(&self, id: Uuid) -> KernelResult<Job> {
        self.move_to(id, JobState::Running, |_| {}, json!({})).await
    }

    /// RUNNING -> SUCCEEDED, recording where the result is.
    pub async fn complete(&self, id: Uuid, result_ref: Option<String>) -> KernelResult<Job> {
        let r = result_ref.clone();
        let job = self
            .move_to(
                id,
                JobState::Succeeded,
                move |j| {
                    j.result_ref = r.clone();
                    j.progress = 1.0;
                },
                json!({ "result_ref": result_ref }),
            )
            .await?;
        self.core.forget_token(id);
        Ok(job)
    }

    /// Any non-terminal state -> FAILED with `error`. Like [`cancel`](Self::cancel), this also
    /// cancels the job's non-terminal descendants and pending actions in the same transaction,
    /// so no token of a failed job can still be resolved.
    pub async fn fail(&self, id: Uuid, error: JobError) -> KernelResult<Job> {
        let reason = format!("{}: {}", error.code, error.message);
        self.core
            .terminate(id, JobState::Failed, Some(error), &reason, None, &Batch::default())
            .await
    }

    /// Cancel the job, all its non-terminal descendants and their pending actions, atomically,
    /// and fire their in-process cancellation tokens.
    pub async fn cancel(&self, id: Uuid, reason: &str) -> KernelResult<Job> {
        let error = JobError {
            code: "cancelled".into(),
            message: reason.to_string(),
        };
        self.core
            .terminate(id, JobState::Cancelled, Some(error), reason, None, &Batch::default())
            .await
    }

    /// Time the job out now (the sweeper does this for past-deadline jobs).
    pub async fn time_out(&self, id: Uuid, reason: &str) -> KernelResult<Job> {
        let error = JobError {
            code: "deadline_exceeded".into(),
            message: reason.to_string(),
        };
        self.core
            .terminate(id, JobState::TimedOut, Some(error), reason, None, &Batch::default())
            .await
    }

    /// Record progress (`fraction` clamped to `[0, 1]`) on a non-terminal job, with a progress event.
    pub async fn progress(&self, id: Uuid, fraction: f64, message: Option<String>) -> KernelResult<Job> {
        let fraction = if fraction.is_finite() {
            fraction.clamp(0.0, 1.0)
        } else {
            0.0
        };
        self.core
            .mutate_job(id, |job, now| {
                if job.state.is_terminal() {
                    return Err(KernelError::IllegalTransition {
                        job_id: job.id,
                        from: job.state,
                        to: job.state,
                    });
                }
                let mut next = job.clone();
                next.version += 1;
                next.updated_at = now;
                next.progress = fraction;
                next.progress_message = message.clone();
                let event = job_event(
                    &next,
                    EventType::Progress,
                    json!({ "progress": fraction, "message": message }),
                    now,
                );
                Ok(Some((next, vec![event])))
            })
            .await
    }

    /// Count one agent turn and `tool_calls` tool calls on a non-terminal job.
    pub async fn record_turn(&self, id: Uuid, tool_calls: u32) -> KernelResult<Job> {
        self.core
            .mutate_job(id, |job, now| {
                if job.state.is_terminal() {
                    return Err(KernelError::IllegalTransition {
                        job_id: job.id,
                        from: job.state,
                        to: job.state,
                    });
                }
                let mut next = job.clone();
                next.version += 1;
                next.updated_at = now;
                next.turns += 1;
                next.tool_calls += tool_calls;
                Ok(Some((next, vec![])))
            })
            .await
    }

    /// Append an event to a job's stream (model tokens, tool calls, artifacts, final result...).
    pub async fn emit(&self, id: Uuid, event_type: EventType, data: serde_json::Value) -> KernelResult<RuntimeEvent> {
        let job = self.core.load_job(id).await?;
        let event = job_event(&job, event_type, data, self.core.now());
        let mut events = self
            .core
            .commit(Batch {
                events: vec![event],
                ..Batch::default()
            })
            .await?;
        events
            .pop()
            .ok_or_else(|| KernelError::Store(StoreError::Backend("commit returned no event".into())))
    }

    /// A job of `tenant` (another tenant's job is "not found").
    pub async fn get(&self, tenant: &str, id: Uuid) -> KernelResult<Job> {
        match self.core.store.get_job(id).await? {
            Some(job) if job.tenant == tenant => Ok(job),
            _ => Err(KernelError::JobNotFound(id)),
        }
    }

    /// Jobs matching `filter`, newest first.
    pub async fn list(&self, filter: &JobFilter) -> KernelResult<Vec<Job>> {
        Ok(self.core.store.list_jobs(filter).await?)
    }

    /// Number of jobs matching `filter`.
    pub async fn count(&self, filter: &JobFilter) -> KernelResult<u64> {
        Ok(self.core.store.count_jobs(filter).await?)
    }

    /// The job created with `key` in `tenant`, if any.
    pub async fn by_idempotency_key(&self, tenant: &str, key: &str) -> KernelResult<Option<Job>> {
        Ok(self.core.store.get_job_by_key(tenant, key).await?)
    }

    /// The in-process cancellation token of a job, fired when the job is cancelled or times out
    /// through this kernel. Derive the job's [`ExecutionContext`] token from it.
    pub fn cancellation_token(&self, id: Uuid) -> CancellationToken {
        self.core
            .tokens
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(id)
            .or_default()
            .clone()
    }

    /// Move the job to the terminal state `to` like [`fail`](Self::fail) (cascading to children and
    /// pending actions), writing `extra` (events, journal, lease guards) in the same transaction.
    pub(crate) async fn terminate_with(
        &self,
        id: Uuid,
        to: JobState,
        error: JobError,
        extra: &Batch,
    ) -> KernelResult<Job> {
        let reason = format!("{}: {}", error.code, error.message);
        self.core.terminate(id, to, Some(error), &reason, None, extra).await
    }

    /// Drop the in-process cancellation token of a finished job.
    pub(crate) fn forget_token(&self, id: Uuid) {
        self.core.forget_token(id);
    }

    /// Attach the job's cancellation token to `ctx` (and set its job id).
    pub fn bind_context(&self, ctx: ExecutionContext, id: Uuid) -> ExecutionContext {
        let token = self.cancellation_token(id);
        let mut ctx = ctx.with_job(id);
        ctx.cancel = token;
        ctx
    }
}

/// Human-in-the-loop actions.
#[derive(Debug, Clone)]
pub struct ActionManager {
    core: Arc<Core>,
}

impl ActionManager {
    /// Create a PENDING action and move its job RUNNING -> WAITING_ACTION in the same
    /// transaction. Returns the resume token, which is never stored.
    pub async fn create(&self, new: NewAction) -> KernelResult<CreatedAction> {
        self.create_journaled(new, |_, _| Batch::default()).await
    }

    /// [`create`](Self::create), also writing `extra(action_id, now)` (journal entries, lease
    /// guards, events) in the same transaction.
    pub(crate) async fn create_journaled<F>(&self, new: NewAction, extra: F) -> KernelResult<CreatedAction>
    where
        F: Fn(Uuid, DateTime<Utc>) -> Batch,
    {
        let digest = match (&new.call, new.action_type) {
            (Some(call), _) => Some(call_digest(&call.tool, &call.arguments)),
            (None, ActionType::Approval) => {
                return Err(KernelError::Invalid(
                    "an approval must name the exact tool call it approves".into(),
                ));
            }
            (None, _) => None,
        };
        if new.ttl <= chrono::Duration::zero() {
            return Err(KernelError::Invalid("an action needs a positive ttl".into()));
        }
        let token = generate_token();
        let token_hash = hash_token(&token);
        let action_id = Uuid::now_v7();
        for _ in 0..self.core.config.max_write_attempts {
            let now = self.core.now();
            let job = self.core.load_job(new.job_id).await?;
            let action = Action {
                id: action_id,
                job_id: job.id,
                tenant: job.tenant.clone(),
                action_type: new.action_type,
                state: ActionState::Pending,
                version: 1,
                title: new.title.clone(),
                request: new.request.clone(),
                call_digest: digest.clone(),
                token_hash: token_hash.clone(),
                resolution: None,
                created_at: now,
                expires_at: now + new.ttl,
                resolved_at: None,
            };
            let mut batch = Batch::default();
            match job.state {
                JobState::WaitingAction => {}
                _ => {
                    let next = transition(&job, JobState::WaitingAction, now)?;
                    batch
                        .events
                        .push(status_event(job.state, &next, json!({ "action_id": action_id }), now));
                    batch.jobs.push(JobWrite {
                        job: next,
                        expected_version: Some(job.version),
                    });
                }
            }
            if batch.jobs.is_empty() {
                // Still guard against a concurrent terminal transition of the job.
                let mut same = job.clone();
                same.version += 1;
                same.updated_at = now;
                batch.jobs.push(JobWrite {
                    job: same,
                    expected_version: Some(job.version),
                });
            }
            batch.events.push(action_event(&action, EventType::ActionRequired, now));
            batch.actions.push(ActionWrite {
                action: action.clone(),
                expected_version: None,
            });
            let extra = extra(action_id, now);
            batch.events.extend(extra.events);
            batch.journal.extend(extra.journal);
            batch.leases.extend(extra.leases);
            match self.core.commit(batch).await {
                Ok(_) => return Ok(CreatedAction { action, token }),
                Err(e) if is_conflict(&e) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(KernelError::Contention(format!("job {}", new.job_id)))
    }

    /// Resolve the action a resume token belongs to. Single-use: exactly one of any number of
    /// concurrent callers succeeds; the others get `ActionNotPending`. An expired token gets
    /// `ActionExpired`, an unknown one `InvalidToken`.
    pub async fn resolve_by_token(&self, token: &str, resolution: Resolution) -> KernelResult<Action> {
        let hash = hash_token(token);
        let action = self
            .core
            .store
            .get_action_by_token_hash(&hash)
            .await?
            .ok_or(KernelError::InvalidToken)?;
        // The lookup is by hash; compare again in constant time so no backend's index
        // semantics (collation, prefix matching) can ever accept a different token.
        if !ct_eq_str(&action.token_hash, &hash) {
            return Err(KernelError::InvalidToken);
        }
        self.resolve_checked(action, resolution).await
    }

    /// Resolve an action by id, for trusted callers (CLI, authenticated API) in `tenant`.
    pub async fn resolve(&self, tenant: &str, id: Uuid, resolution: Resolution) -> KernelResult<Action> {
        let action = self.get(tenant, id).await?;
        self.resolve_checked(action, resolution).await
    }

    async fn resolve_checked(&self, action: Action, resolution: Resolution) -> KernelResult<Action> {
        if matches!(action.action_type, ActionType::Approval | ActionType::Confirm) && resolution.approved.is_none() {
            return Err(KernelError::Invalid(format!(
                "a {} needs approved = true or false",
                action.action_type
            )));
        }
        if let (Some(seen), Some(bound)) = (&resolution.call_digest, &action.call_digest)
            && !ct_eq_str(seen, bound)
        {
            return Err(KernelError::CallDigestMismatch(action.id));
        }
        self.core
            .finish_action(action.id, ActionState::Resolved, Some(resolution))
            .await
    }

    /// Withdraw a pending action; its job resumes if nothing else is pending.
    pub async fn cancel(&self, tenant: &str, id: Uuid) -> KernelResult<Action> {
        self.get(tenant, id).await?;
        self.core.finish_action(id, ActionState::Cancelled, None).await
    }

    /// Expire a pending action now and time its job out (the sweeper does this at expiry).
    pub async fn expire(&self, id: Uuid) -> KernelResult<Action> {
        self.core.finish_action(id, ActionState::Expired, None).await
    }

    /// Check that action `id` of `tenant` is a resolved, approved approval of exactly
    /// `tool(arguments)`; `CallDigestMismatch` for any other call.
    pub async fn verify_approval(
        &self,
        tenant: &str,
        id: Uuid,
        tool: &str,
        arguments: &serde_json::Value,
    ) -> KernelResult<Action> {
        let action = self.get(tenant, id).await?;
        if action.state != ActionState::Resolved {
            return Err(KernelError::ActionNotPending {
                id,
                state: action.state,
            });
        }
        if !action.authorizes(tool, arguments) {
            return Err(KernelError::CallDigestMismatch(id));
        }
        Ok(action)
    }

    /// An action of `tenant`.
    pub async fn get(&self, tenant: &str, id: Uuid) -> KernelResult<Action> {
        match self.core.store.get_action(id).await? {
            Some(a) if a.tenant == tenant => Ok(a),
            _ => Err(KernelError::ActionNotFound(id)),
        }
    }

    /// Actions matching `filter`, oldest first.
    pub async fn list(&self, filter: &ActionFilter) -> KernelResult<Vec<Action>> {
        Ok(self.core.store.list_actions(filter).await?)
    }

    /// Pending actions of a tenant, or of one job.
    pub async fn list_pending(&self, tenant: &str, job_id: Option<Uuid>) -> KernelResult<Vec<Action>> {
        let filter = ActionFilter {
            tenant: tenant.to_string(),
            job_id,
            states: vec![ActionState::Pending],
            limit: None,
        };
        self.list(&filter).await
    }

    /// Wait until the action leaves PENDING and return it. Wakes on the committed event (no
    /// polling); re-reads the store on every wake-up, so it works for an action created before a
    /// restart; and expires the action itself when its deadline passes.
    pub async fn wait_for_resolution(&self, id: Uuid) -> KernelResult<Action> {
        loop {
            let action = self.core.load_action(id).await?;
            // Subscribe before re-reading so a resolution in between is not missed.
            let filter = EventFilter::job(action.job_id).with_types([
                EventType::ActionResolved,
                EventType::ActionExpired,
                EventType::ActionCancelled,
            ]);
            let mut sub: Subscription = self.core.bus.subscribe(filter);
            let action = self.core.load_action(id).await?;
            if action.state != ActionState::Pending {
                return Ok(action);
            }
            let remaining = (action.expires_at - self.core.now()).to_std().unwrap_or_default();
            let expiry = tokio::time::sleep(remaining);
            tokio::pin!(expiry);
            let recheck = async {
                match self.core.config.action_recheck_ms {
                    Some(ms) => tokio::time::sleep(std::time::Duration::from_millis(ms.max(1))).await,
                    None => std::future::pending().await,
                }
            };
            tokio::pin!(recheck);
            loop {
                tokio::select! {
                    _ = &mut recheck => break,
                    event = sub.recv() => match event {
                        Ok(e) if e.data.get("action_id").and_then(|v| v.as_str()) == Some(id.to_string().as_str()) => break,
                        Ok(_) => continue,
                        Err(SubscriptionError::Lagged(_)) => break,
                        Err(SubscriptionError::Closed) => return Err(KernelError::EventsClosed),
                    },
                    _ = &mut expiry => {
                        match self.expire(id).await {
                            Ok(a) => return Ok(a),
                            Err(KernelError::ActionNotPending { .. }) => break,
                            Err(e) => return Err(e),
                        }
                    }
                }
            }
        }
    }
}

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
    /// Extra data.
    pub data: serde_json::Value,
}

/// The ledger and budgets.
#[derive(Debug, Clone)]
pub struct Ledger {
    core: Arc<Core>,
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
    pub async fn reserve(&self, request: HoldRequest) -> KernelResult<Reserved> {
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
            let query = UsageQuery {
                tenant: budget.tenant.clone(),
                principal: budget.principal.clone(),
                session: budget.session.clone(),
                job_id: None,
                from: budget.window.start(now),
                to: None,
            };
            let used = if budget.window == crate::ledger::BudgetWindow::PerRequest {
                Usage::zero()
            } else {
                self.core.store.usage(&query).await?
            };
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
    pub async fn record(&self, entry: NewLedgerEvent) -> KernelResult<LedgerEvent> {
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

/// What one sweep did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SweepReport {
    /// Past-deadline jobs moved to TIMED_OUT.
    pub jobs_timed_out: usize,
    /// Pending actions past expiry moved to EXPIRED (their jobs timed out).
    pub actions_expired: usize,
    /// Expired holds released.
    pub reservations_released: usize,
}

/// The kernel: managers + event bus over one store. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Kernel {
    core: Arc<Core>,
    jobs: JobManager,
    actions: ActionManager,
    ledger: Ledger,
}

impl Kernel {
    /// A kernel over `store` with the system clock and default config.
    pub fn new(store: Arc<dyn KernelStore>) -> Self {
        Self::with_clock(store, Arc::new(SystemClock), KernelConfig::default())
    }

    /// A kernel with an explicit clock and config (tests drive time through the clock).
    pub fn with_clock(store: Arc<dyn KernelStore>, clock: Arc<dyn Clock>, config: KernelConfig) -> Self {
        let core = Arc::new(Core {
            store,
            bus: EventBus::new(config.event_buffer),
            clock,
            config,
            tokens: Mutex::new(HashMap::new()),
        });
        Self {
            jobs: JobManager { core: core.clone() },
            actions: ActionManager { core: core.clone() },
            ledger: Ledger { core: core.clone() },
            core,
        }
    }

    /// Jobs.
    pub fn jobs(&self) -> &JobManager {
        &self.jobs
    }

    /// Actions.
    pub fn actions(&self) -> &ActionManager {
        &self.actions
    }

    /// Ledger and budgets.
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// The live event bus.
    pub fn events(&self) -> &EventBus {
        &self.core.bus
    }

    /// Subscribe to live events.
    pub fn subscribe(&self, filter: EventFilter) -> Subscription {
        self.core.bus.subscribe(filter)
    }

    /// Read persisted events (catch-up / SSE resume).
    pub async fn read_events(&self, query: &EventQuery) -> KernelResult<Vec<RuntimeEvent>> {
        Ok(self.core.store.read_events(query).await?)
    }

    /// Commit a batch and publish its events (for the agent loop's step writes).
    pub(crate) async fn commit(&self, batch: Batch) -> Result<Vec<RuntimeEvent>, StoreError> {
        self.core.commit(batch).await
    }

    /// The kernel's configuration.
    pub fn config(&self) -> &KernelConfig {
        &self.core.config
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn KernelStore> {
        &self.core.store
    }

    /// The clock.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.core.clock
    }

    /// Recovery sweep, run at start-up and periodically: time out non-terminal jobs past their
    /// deadline, expire pending actions past expiry (timing their jobs out), and release
    /// expired budget holds. Idempotent; safe to run concurrently with normal work.
    pub async fn recover_and_sweep(&self, now: DateTime<Utc>) -> KernelResult<SweepReport> {
        let mut report = SweepReport::default();
        let batch = self.core.config.sweep_batch.max(1);
        loop {
            let actions = self.core.store.expired_actions(now, batch).await?;
            let mut progressed = false;
            for a in &actions {
                match self.actions.expire(a.id).await {
                    Ok(_) => {
                        report.actions_expired += 1;
                        progressed = true;
                    }
                    Err(KernelError::ActionNotPending { .. }) => progressed = true,
                    Err(e) => return Err(e),
                }
            }
            if actions.len() < batch as usize || !progressed {
                break;
            }
        }
        loop {
            let jobs = self.core.store.overdue_jobs(now, batch).await?;
            let mut progressed = false;
            for j in &jobs {
                match self.jobs.time_out(j.id, "deadline exceeded").await {
                    Ok(_) => {
                        report.jobs_timed_out += 1;
                        progressed = true;
                    }
                    Err(KernelError::IllegalTransition { .. }) => progressed = true,
                    Err(e) => return Err(e),
                }
            }
            if jobs.len() < batch as usize || !progressed {
                break;
            }
        }
        loop {
            let released = self.core.store.release_expired(now, batch).await?;
            report.reservations_released += released.len();
            if released.len() < batch as usize {
                break;
            }
        }
        Ok(report)
    }

    /// Run [`recover_and_sweep`](Self::recover_and_sweep) every `every` until `stop` is cancelled.
    pub fn spawn_sweeper(&self, every: std::time::Duration, stop: CancellationToken) -> tokio::task::JoinHandle<()> {
        let kernel = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every.max(std::time::Duration::from_millis(1)));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => {
                        let now = kernel.core.now();
                        // A failed sweep is retried on the next tick; it must not kill the task.
                        let _ = kernel.recover_and_sweep(now).await;
                    }
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::memory::MemoryStore;

    #[tokio::test]
    async fn background_sweeper_times_out_jobs_and_stops() {
        let clock = Arc::new(ManualClock::new(Utc::now()));
        let kernel = Kernel::with_clock(Arc::new(MemoryStore::new()), clock.clone(), KernelConfig::default());
        let mut new = NewJob::new("t", "agent");
        new.deadline = Some(clock.now() + chrono::Duration::seconds(5));
        let job = kernel.jobs().create(new).await.unwrap().job;
        let token = kernel.jobs().cancellation_token(job.id);
        let mut sub = kernel.subscribe(EventFilter::job(job.id).with_types([EventType::JobStatusChanged]));
        clock.advance(chrono::Duration::seconds(6));
        let stop = CancellationToken::new();
        let sweeper = kernel.spawn_sweeper(std::time::Duration::from_millis(10), stop.clone());
        let event = sub.recv().await.unwrap();
        assert_eq!(event.data["to"], "TIMED_OUT");
        token.cancelled().await;
        stop.cancel();
        sweeper.await.unwrap();
        assert_eq!(kernel.jobs().get("t", job.id).await.unwrap().state, JobState::TimedOut);
    }
}
