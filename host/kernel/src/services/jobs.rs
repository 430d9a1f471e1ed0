//! [`JobManager`]: create jobs, drive them through the state machine, query them.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde_json::json;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::action::ActionState;
use crate::canonical::canonical_json;
use crate::context::{CancellationToken, ExecutionContext};
use crate::error::{KernelError, KernelResult};
use crate::event::{EventType, NewEvent, RuntimeEvent};
use crate::job::{Job, JobError, JobFilter, JobState, NewJob};
use crate::store::{ActionWrite, Batch, JobWrite, LeaseClaim, StoreError};

use super::retry::{Attempt, on_conflict, optimistic};
use super::{Core, StatusDetail, action_event, job_event, status_event};

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

impl Core {
    /// Read-check-write on one job with retries. `build` turns the current row into the new row
    /// plus its events; `None` from `build` means "nothing to do".
    pub(super) async fn mutate_job<F>(&self, id: Uuid, build: F) -> KernelResult<Job>
    where
        F: Fn(&Job, DateTime<Utc>) -> KernelResult<Option<(Job, Vec<NewEvent>)>>,
    {
        let build = &build;
        let attempt = || async move {
            let job = self.load_job(id).await?;
            let Some((next, events)) = build(&job, self.now())? else {
                return Ok(Attempt::Done(job));
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
            Ok(on_conflict(self.commit(batch).await)?.map(|_| next))
        };
        optimistic(self.config.max_write_attempts, attempt, || {
            KernelError::Contention(format!("job {id}"))
        })
        .await
    }

    /// Move `root` to the terminal state `to` (FAILED, CANCELLED or TIMED_OUT), cancel every non-terminal
    /// descendant and every pending action of all of them, in one transaction. If
    /// `expired_action` is given, that action becomes EXPIRED instead of CANCELLED.
    pub(super) async fn terminate(
        &self,
        root: Uuid,
        to: JobState,
        error: Option<JobError>,
        reason: &str,
        expired_action: Option<Uuid>,
        extra: &Batch,
    ) -> KernelResult<Job> {
        let error = &error;
        let attempt = || async move {
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
                batch.events.push(status_event(
                    job.state,
                    &next,
                    StatusDetail {
                        reason: Some(reason),
                        ..StatusDetail::default()
                    },
                    now,
                ));
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
            match on_conflict(self.commit(batch).await)? {
                Attempt::Retry => Ok(Attempt::Retry),
                Attempt::Done(_) => {
                    self.fire_tokens(&ids);
                    self.load_job(root).await.map(Attempt::Done)
                }
            }
        };
        optimistic(self.config.max_write_attempts, attempt, || {
            KernelError::Contention(format!("job {root}"))
        })
        .await
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
    pub(super) core: Arc<Core>,
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
        mut new: NewJob,
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
        let policy_texts: Vec<_> = new.policy_text.take().into_iter().collect();
        let job = Job::queued(new, request_hash.clone(), now);
        let event = job_event(
            &job,
            EventType::JobStatusChanged,
            json!({ "from": null, "to": JobState::Queued }),
            now,
        );
        let (job, event, lease, same_request, policy_texts) = (&job, &event, &lease, &same_request, &policy_texts);
        let attempt = || async move {
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
                policy_texts: policy_texts.clone(),
                ..Batch::default()
            };
            match self.core.commit(batch).await {
                Ok(_) => Ok(Attempt::Done(CreatedJob {
                    job: job.clone(),
                    created: true,
                })),
                Err(StoreError::DuplicateIdempotencyKey { tenant, key }) => {
                    let job = self.core.store.get_job_by_key(&tenant, &key).await?.ok_or_else(|| {
                        KernelError::Store(StoreError::Corrupt(format!(
                            "idempotency key {key:?} conflicts but no job holds it"
                        )))
                    })?;
                    same_request(job).map(Attempt::Done)
                }
                Err(e) => on_conflict(Err(e)),
            }
        };
        optimistic(self.core.config.max_write_attempts, attempt, || {
            KernelError::Contention(format!("creating a child of {:?}", job.parent_id))
        })
        .await
    }

    async fn move_to(
        &self,
        id: Uuid,
        to: JobState,
        edit: impl Fn(&mut Job) + Send,
        detail: StatusDetail<'_>,
    ) -> KernelResult<Job> {
        self.core
            .mutate_job(id, |job, now| {
                let mut next = transition(job, to, now)?;
                edit(&mut next);
                let event = status_event(job.state, &next, detail, now);
                Ok(Some((next, vec![event])))
            })
            .await
    }

    /// QUEUED -> RUNNING.
    pub async fn start(&self, id: Uuid) -> KernelResult<Job> {
        self.move_to(id, JobState::Running, |_| {}, StatusDetail::default())
            .await
    }

    /// RUNNING -> WAITING_ACTION (creating an action does this itself).
    pub async fn wait_for_action(&self, id: Uuid) -> KernelResult<Job> {
        self.move_to(id, JobState::WaitingAction, |_| {}, StatusDetail::default())
            .await
    }

    /// WAITING_ACTION -> RUNNING (resolving the last pending action does this itself).
    pub async fn resume(&self, id: Uuid) -> KernelResult<Job> {
        self.move_to(id, JobState::Running, |_| {}, StatusDetail::default())
            .await
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
                StatusDetail {
                    result_ref: result_ref.as_deref(),
                    ..StatusDetail::default()
                },
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
