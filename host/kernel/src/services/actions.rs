//! [`ActionManager`]: human-in-the-loop actions, their resolution and expiry.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::action::{
    Action, ActionFilter, ActionState, ActionType, CreatedAction, NewAction, Resolution, ct_eq_str, generate_token,
    hash_token,
};
use crate::canonical::call_digest;
use crate::error::{KernelError, KernelResult};
use crate::event::{EventFilter, EventType, Subscription, SubscriptionError};
use crate::job::{JobError, JobState};
use crate::store::{ActionWrite, Batch, JobWrite};

use super::retry::{Attempt, on_conflict, optimistic};
use super::{Core, StatusDetail, action_event, status_event, transition};

impl Core {
    /// Take `action` (PENDING) to `state`, with the job effect that implies, in one transaction.
    /// RESOLVED / CANCELLED resume a WAITING_ACTION job when no other action is pending;
    /// EXPIRED times the job out.
    pub(super) async fn finish_action(
        &self,
        action_id: Uuid,
        state: ActionState,
        resolution: Option<Resolution>,
    ) -> KernelResult<Action> {
        let resolution = &resolution;
        let attempt = || async move {
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
                    return Ok(on_conflict(self.commit(batch).await)?.map(|_| a));
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
                    Ok(_) => return self.load_action(action_id).await.map(Attempt::Done),
                    Err(KernelError::IllegalTransition { .. }) => return Ok(Attempt::Retry),
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
                    batch.events.push(status_event(
                        job.state,
                        &next,
                        StatusDetail {
                            action_id: Some(action.id),
                            ..StatusDetail::default()
                        },
                        now,
                    ));
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
            // Lost the race: the next pass re-reads and reports why (already resolved, ...).
            Ok(on_conflict(self.commit(batch).await)?.map(|_| a))
        };
        optimistic(self.config.max_write_attempts, attempt, || {
            KernelError::Contention(format!("action {action_id}"))
        })
        .await
    }
}

/// Human-in-the-loop actions.
#[derive(Debug, Clone)]
pub struct ActionManager {
    pub(super) core: Arc<Core>,
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
        let (new, digest, token_hash, token, extra) = (&new, &digest, &token_hash, &token, &extra);
        let attempt = || async move {
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
                    batch.events.push(status_event(
                        job.state,
                        &next,
                        StatusDetail {
                            action_id: Some(action_id),
                            ..StatusDetail::default()
                        },
                        now,
                    ));
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
            Ok(on_conflict(self.core.commit(batch).await)?.map(|_| CreatedAction {
                action,
                token: token.clone(),
            }))
        };
        optimistic(self.core.config.max_write_attempts, attempt, || {
            KernelError::Contention(format!("job {}", new.job_id))
        })
        .await
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
                        Ok(e) if e.data.field("action_id").as_ref().and_then(|v| v.as_str()) == Some(id.to_string().as_str()) => break,
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
