//! The direct governed call, driven by the caller's own task in at most two commits.
//!
//! [`AgentRuntime::call_tool`] first tries this path. It writes exactly the rows the runner
//! (`run.rs`, `drive_call` → `call_step`) would write for the same call — the same job input, the
//! same journal keys and entries, the same events and ledger entries — but merges them:
//!
//! 1. **before the side effect**, one transaction: the job inserted RUNNING and leased to this host
//!    (for the whole call: no heartbeat, no renewal), the budget hold (checked against the budgets
//!    inside the transaction), the `started` journal entry and the `tool.start` event;
//! 2. the sandboxed call, on the caller's task (no spawned loop, no polling);
//! 3. **after**, one transaction, fenced by the lease epoch: the settlement with the receipt, the
//!    `tool.end` / `tool.error` event, the `result` and `final` journal entries, the job
//!    SUCCEEDED or FAILED and the lease released.
//!
//! Its [`ExecutionHandle`] is also sent to the caller's `started` channel once (1) is committed
//! (or, in one commit, before the call): a front end running the call on a task of its own (as
//! `keel-app` does, so that a caller that stops waiting does not stop it midway) can follow a
//! long call, hand it to an MCP task or cancel it while it runs ([`ExecutionHandle::cancel`], or
//! the request's [`ExecutionContext::cancel`](crate::context::ExecutionContext::cancel)). A
//! cancelled call stops its guest at once and ends the job CANCELLED, its attempt charged.
//!
//! A tool that is safe to re-run may skip (1) when no budget applies to the caller: the call runs
//! first and everything, the hold included, is committed once after it (a crash mid-call leaves
//! nothing; the caller may simply call again). Safe to re-run is idempotent, or
//! [effect-free](ToolDescriptor::effect_free): granted no writable directory and no network, so
//! that a call run twice cannot change anything twice (the host refuses it if the grants changed
//! since the tool was described).
//!
//! A one-commit call's job is stored when it ends, or, if it is still running after
//! [`AgentConfig::store_running_call_after_ms`](super::AgentConfig::store_running_call_after_ms),
//! then (its commit (1), made while the call runs; it then ends like a two-commit call): a long
//! call is visible to other processes (`keel jobs list`, the HTTP API) and cancellable by id,
//! while a short one keeps its single commit. Until it is stored, its handle reports it RUNNING.
//!
//! Anything else — an approval to wait for, a refusal (unknown tool, invalid input, policy deny,
//! budget deny), an idempotency key, a runtime limit, a policy recorded by reference — is left to
//! the runner, which handles every case; this path only makes the common one cheap. If the host
//! dies between (1) and (3), the job is RUNNING with a journaled `started` entry and a lease that
//! lapses after the call's deadline: a worker resumes it like any interrupted call (charge the
//! attempt, ask before re-running a non-idempotent tool).

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde_json::json;
use uuid::Uuid;

use super::request::{ExecutionRequest, ExecutionResult, ExecutionUsage};
use super::run::{self, call_key, job_policy};
use super::{AgentError, AgentRuntime, ExecutionHandle, Inner, job_with_trace, schema};
use crate::context::CancellationToken;
use crate::event::{EventType, NewEvent};
use crate::job::{Job, JobError, JobState};
use crate::journal::{self, Entry, key};
use crate::json::JsonText;
use crate::ledger::{LedgerKind, ReserveRequest, SettleRequest, Usage};
use crate::policy::{Outcome, PolicyRequest};
use crate::services::{SettleDetails, StatusDetail, job_event, retry, status_event};
use crate::store::{Batch, HoldWrite, JobWrite, LeaseClaim, LeaseGuard, NewJournalEntry, PolicyText, StoreError};
use crate::tool::{ToolCallContext, ToolDescriptor};

/// The step key of a direct call (its only call: turn 1, call 0), as the runner names it.
fn base() -> String {
    key::call(1, 0)
}

/// The model-facing id of a direct call, as the runner names it.
const CALL_ID: &str = "c0";

impl AgentRuntime {
    /// Run `request` (a direct call) on this path if it qualifies (see the module docs); `None`
    /// when the runner must take it.
    pub(super) async fn direct_call(
        &self,
        request: &ExecutionRequest,
        stop: &CancellationToken,
        started: Option<tokio::sync::oneshot::Sender<ExecutionHandle>>,
    ) -> Result<Option<ExecutionHandle>, AgentError> {
        let inner = &self.inner;
        let Some(call) = &request.call else { return Ok(None) };
        if request.idempotency_key.is_some()
            || request.runtime_limit().is_some()
            || request.budget.max_tool_calls == Some(0)
        {
            return Ok(None);
        }
        let Ok(policy) = job_policy(inner, &request.policy) else {
            return Ok(None);
        };
        if inner.policy_override.load(std::sync::atomic::Ordering::SeqCst) && request.policy != Default::default() {
            // The runner announces the override with a progress event.
            return Ok(None);
        }
        let Ok(Some(desc)) = inner.tools.tool(&call.tool, &request.scope).await else {
            return Ok(None);
        };
        if schema::validate(&desc.input_schema, &call.arguments).is_err() {
            return Ok(None);
        }
        let decision = policy.evaluate_tool_with(
            &PolicyRequest::Tool {
                tool: &call.tool,
                arguments: &call.arguments,
                scope: &request.scope,
                principal: request.principal.as_deref().unwrap_or(""),
                session: request.session.as_deref(),
                tool_calls_this_turn: 0,
                turn: 1,
            },
            desc.stands_for.as_deref(),
            inner.approvals.as_ref(),
        );
        if !matches!(decision.outcome, Outcome::Allow | Outcome::Warn) {
            return Ok(None);
        }
        let arguments = &call.arguments;
        // One commit for a tool that is safe to re-run when no budget could refuse it; else two.
        let once = desc.rerun_safe() && !self.budgets_apply(request).await?;
        let call = DirectCall::new(inner, request, &desc, once)?;
        let running = Arc::new(RunningCall::new(call.job.clone(), stop.child()));
        let handle = ExecutionHandle {
            rt: self.clone(),
            job_id: call.job.id,
            tenant: call.job.tenant.clone(),
            finished: None,
            running: Some(running.clone()),
        };
        // The steps' futures are boxed so this one stays small (see `call_tool`).
        if !once {
            match Box::pin(call.commit_started(inner)).await {
                Ok(()) => {}
                // A budget refused the hold (nothing was written): the runner records the verdict
                // and fails the job the usual way.
                Err(StoreError::Conflict { entity: "budget", .. }) => return Ok(None),
                Err(e) => return Err(e.into()),
            }
        }
        if let Some(started) = started {
            let _ = started.send(handle.clone());
        }
        let store_after = once.then(|| Duration::from_millis(inner.config.store_running_call_after_ms));
        let ran = Box::pin(call.run(inner, arguments, &running.stop, store_after)).await;
        // A long one-commit call whose start was committed meanwhile ends like a two-commit one.
        let once = once && !ran.stored;
        let finished = match ran.outcome {
            Some(outcome) => Box::pin(call.commit_result(inner, outcome, ran.duration_ms, once)).await,
            None => Box::pin(call.commit_stopped(inner, &running, ran.duration_ms, once)).await,
        };
        let finished = finished.map(|result| result.map(Arc::new));
        running.finish(match &finished {
            Ok(Some(result)) => Finished::Result(result.clone()),
            Ok(None) => Finished::Stored,
            Err(e) => Finished::Failed(e.to_string()),
        });
        finished?;
        Ok(Some(handle))
    }

    /// Whether any budget of the request's tenant applies to its principal and session.
    async fn budgets_apply(&self, request: &ExecutionRequest) -> Result<bool, AgentError> {
        let budgets = self.kernel().store().list_budgets(&request.scope).await?;
        Ok(budgets
            .iter()
            .any(|b| b.applies_to(&request.scope, request.principal.as_deref(), request.session.as_deref())))
    }
}

/// One direct call in flight.
struct DirectCall {
    /// The job as inserted (RUNNING, version 1).
    job: Job,
    tool: String,
    hold: HoldWrite,
    /// The call's own deadline (the tool's, bounded by the agent's).
    timeout: Duration,
    /// How long the lease is taken for: the whole call plus a margin.
    lease_ms: u64,
    owner: String,
    /// The trace id of the context checkpointed in the job's metadata.
    trace_id: String,
    /// Whether this call is made in one commit only because the tool is effect-free (not
    /// idempotent): the host must refuse it if its grants changed since (see
    /// [`ToolCallContext::effect_free`]).
    relies_on_effect_free: bool,
    /// The policy text the job names by sha256, stored by the commit that inserts the job.
    policy_text: Option<PolicyText>,
}

impl DirectCall {
    fn new(inner: &Inner, request: &ExecutionRequest, desc: &ToolDescriptor, once: bool) -> Result<Self, AgentError> {
        let now = inner.kernel.clock().now();
        // `direct_call` has applied the request's policy: `job_policy` checked its text against
        // its sha256.
        let (mut new, trace_id) = job_with_trace(request, now, true)?;
        let policy_text = new.policy_text.take();
        let mut job = Job::queued(new, None, now);
        job.state = JobState::Running;
        job.started_at = Some(now);
        let agent_limit = Duration::from_millis(inner.config.tool_timeout_ms);
        let timeout = desc.timeout.map_or(agent_limit, |own| own.min(agent_limit));
        // As `ensure_lease` would extend it before the call: the deadline plus a margin.
        let ttl = inner.config.lease_ttl_ms.max(3);
        let margin = Duration::from_millis(ttl / 3).max(Duration::from_secs(1));
        let lease_ms = u64::try_from((run::backstop(timeout) + margin).as_millis())
            .unwrap_or(u64::MAX)
            .max(ttl);
        let hold_ttl = chrono::Duration::seconds(inner.kernel.config().hold_ttl_secs).max(
            chrono::Duration::milliseconds(i64::try_from(lease_ms).unwrap_or(i64::MAX)),
        );
        let hold = HoldWrite {
            id: Uuid::now_v7(),
            request: ReserveRequest {
                tenant: job.tenant.clone(),
                principal: job.principal.clone(),
                session: job.session.clone(),
                job_id: Some(job.id),
                amount: Usage {
                    tool_calls: 1,
                    ..Usage::zero()
                },
                now,
                expires_at: now + hold_ttl,
            },
            check_budgets: true,
        };
        Ok(Self {
            // Only its grants make a one-commit call of a non-idempotent tool safe to re-run.
            relies_on_effect_free: once && !desc.idempotent,
            tool: desc.qualified_name(),
            job,
            hold,
            timeout,
            lease_ms,
            owner: inner.owner.clone(),
            trace_id,
            policy_text,
        })
    }

    /// The guard of the lease the first commit took: a job claimed by the batch that inserts it
    /// gets epoch 1 (see `Batch::claims`).
    fn guard(&self) -> LeaseGuard {
        LeaseGuard {
            job_id: self.job.id,
            owner: self.owner.clone(),
            epoch: 1,
        }
    }

    fn entry(&self, key: String, entry: &Entry, at: DateTime<Utc>) -> NewJournalEntry {
        journal::encode(self.job.id, key, entry, at)
    }

    fn event(&self, event_type: EventType, data: impl Into<JsonText>, at: DateTime<Utc>) -> NewEvent {
        job_event(&self.job, event_type, data, at)
    }

    /// What the first commit writes (the job is created, started and its call started), with
    /// `job` as the inserted row (the job as started, or with `once` as it ended).
    fn started_rows(&self, owner: &str, job: Job) -> Batch {
        let now = self.job.created_at;
        let queued = self.event(
            EventType::JobStatusChanged,
            json!({ "from": null, "to": JobState::Queued }),
            now,
        );
        let started = status_event(
            JobState::Queued,
            &self.job,
            StatusDetail {
                owner: Some(owner),
                ..StatusDetail::default()
            },
            now,
        );
        let tool_start = run::data_json(&run::ToolStartData {
            turn: 1,
            call_id: CALL_ID,
            tool: &self.tool,
            attempt: 0,
        });
        let tool_start = self.event(EventType::ToolStart, tool_start, now);
        let entry = Entry::ToolStarted(journal::ToolStarted {
            reservation_id: self.hold.id,
            tool: self.tool.clone(),
            call_id: CALL_ID.into(),
            attempt: 0,
        });
        Batch {
            jobs: vec![JobWrite {
                job,
                expected_version: None,
            }],
            events: vec![queued, started, tool_start],
            journal: vec![self.entry(key::started(&base(), 0), &entry, now)],
            holds: vec![self.hold.clone()],
            policy_texts: self.policy_text.iter().cloned().collect(),
            ..Batch::default()
        }
    }

    /// Commit (1): the job RUNNING and leased for the whole call, the hold, `started`, `tool.start`.
    async fn commit_started(&self, inner: &Inner) -> Result<(), StoreError> {
        let mut batch = self.started_rows(&self.owner, self.job.clone());
        batch.claims.push(LeaseClaim {
            job_id: self.job.id,
            owner: self.owner.clone(),
            ttl_ms: self.lease_ms,
        });
        inner.kernel.commit_busy(batch).await.map_err(|(e, _)| e)?;
        Ok(())
    }

    /// The sandboxed call, under its deadline, the job's cancellation and `stop` (the caller's).
    /// A cancel in this process is seen at once; one by another process (`keel jobs cancel`, the
    /// HTTP API) by reading the job every `poll_ms` while it is stored (a direct call has no
    /// heartbeat to notice it). With `store_after`, a call still running then has its start
    /// committed (commit 1) meanwhile: the job becomes visible to other processes and from then on
    /// is written like a two-commit call's.
    async fn run(
        &self,
        inner: &Inner,
        arguments: &serde_json::Value,
        stop: &CancellationToken,
        store_after: Option<Duration>,
    ) -> Ran {
        let ctx = ToolCallContext {
            call_id: call_key(self.job.id, &base()),
            job_id: Some(self.job.id.to_string()),
            scope: self.job.tenant.clone(),
            principal: self.job.principal.clone(),
            trace_id: Some(self.trace_id.clone()),
            timeout: Some(self.timeout),
            effect_free: self.relies_on_effect_free,
        };
        let cancel = inner.kernel.jobs().cancellation_token(self.job.id);
        let started = Instant::now();
        let call = tokio::time::timeout(
            run::backstop(self.timeout),
            inner.tools.call_tool(&ctx, &self.tool, arguments),
        );
        tokio::pin!(call);
        let mut store_at = store_after.map(|after| Box::pin(tokio::time::sleep(after)));
        let mut stored = false;
        let poll = Duration::from_millis(inner.config.poll_ms.max(1));
        let mut reread = tokio::time::interval_at(tokio::time::Instant::now() + poll, poll);
        reread.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let outcome = loop {
            tokio::select! {
                r = &mut call => break Some(match r {
                    Ok(outcome) => outcome,
                    Err(_) => run::timed_out(self.timeout, started),
                }),
                _ = cancel.cancelled() => break None,
                _ = stop.cancelled() => break None,
                () = async { if let Some(at) = store_at.as_mut() { at.await } }, if store_at.is_some() => {
                    store_at = None;
                    // The guest waits for this commit (~1 ms; it is not polled meanwhile). If it
                    // fails, the call is still written in one commit when it ends.
                    stored = Box::pin(self.commit_started(inner)).await.is_ok();
                }
                _ = reread.tick(), if store_after.is_none() || stored => {
                    if let Ok(Some(job)) = inner.kernel.store().get_job(self.job.id).await
                        && job.state.is_terminal()
                    {
                        break None;
                    }
                }
            }
        };
        inner.kernel.jobs().forget_token(self.job.id);
        Ran {
            outcome,
            duration_ms: started.elapsed().as_millis() as u64,
            stored,
        }
    }

    /// Commit (3) — or, with `once`, (1) and (3) together. Returns the job's result when this
    /// host wrote it; `None` when the job was ended elsewhere (cancelled) or taken by another
    /// host meanwhile (its usage is charged all the same).
    async fn commit_result(
        &self,
        inner: &Inner,
        outcome: crate::tool::ToolOutcome,
        duration_ms: u64,
        once: bool,
    ) -> Result<Option<ExecutionResult>, AgentError> {
        let (result, event_type, data) = run::tool_result(outcome, &self.tool, 1, CALL_ID, duration_ms);
        let now = inner.kernel.clock().now();
        let usage = run::data_json(&run::UsageData {
            turn: 1,
            call_id: CALL_ID,
            receipt: result.receipt.as_ref(),
        });
        let settle = self.settlement(duration_ms, usage, now);
        let mut next = self.job.clone();
        next.version += 1;
        next.updated_at = now;
        next.finished_at = Some(now);
        next.tool_calls += 1;
        let (end_events, fin) = if result.is_error {
            let error = JobError {
                code: result.code.clone().unwrap_or_else(|| "failed".into()),
                message: result.reason(),
            };
            next.state = JobState::Failed;
            next.error = Some(error.clone());
            let status = ended_by(&next, &error, now);
            let fin = self.event(
                EventType::FinalError,
                json!({ "code": error.code, "message": error.message }),
                now,
            );
            let entry = journal::Final {
                status: JobState::Failed,
                content: None,
                error: Some(error),
            };
            (vec![status, fin], entry)
        } else {
            next.state = JobState::Succeeded;
            next.result_ref = Some("journal:final".into());
            next.progress = 1.0;
            let status = status_event(
                JobState::Running,
                &next,
                StatusDetail {
                    result_ref: next.result_ref.as_deref(),
                    ..StatusDetail::default()
                },
                now,
            );
            let usage = ExecutionUsage {
                tool_calls: 1,
                ..ExecutionUsage::default()
            };
            let data = run::FinalResultData {
                content: &result.content,
                usage: &usage,
                turns: 0,
            };
            let fin = self.event(EventType::FinalResult, run::data_json(&data), now);
            let entry = journal::Final {
                status: JobState::Succeeded,
                content: Some(result.content.clone()),
                error: None,
            };
            (vec![status, fin], entry)
        };
        let tool_event = self.event(event_type, data, now);
        // Encoded from the entries themselves, which are then taken back (no copy of the output).
        let result_entry = Entry::ToolResult(result);
        let final_entry = Entry::Final(fin);
        let journal = vec![
            self.entry(key::result(&base()), &result_entry, now),
            self.entry(key::FINAL.into(), &final_entry, now),
        ];
        let (Entry::ToolResult(result), Entry::Final(fin)) = (result_entry, final_entry) else {
            unreachable!("built just above")
        };
        // What the result reports of the job as written (the write itself is moved into the batch).
        let (state, turns, error) = (next.state, next.turns, next.error.clone());
        if once {
            // The job is inserted in its final state: nobody can claim it, so no lease is taken.
            // Inserted, so at version 1 (an insert's version), in its final state.
            next.version = 1;
            let mut batch = self.started_rows(&self.owner, next);
            batch.holds[0].check_budgets = false;
            batch.events.push(tool_event);
            batch.events.extend(end_events);
            batch.journal.extend(journal);
            batch.settlements.push(settle);
            inner.kernel.commit_busy(batch).await.map_err(|(e, _)| e)?;
        } else {
            let guard = self.guard();
            let mut events = Vec::with_capacity(1 + end_events.len());
            events.push(tool_event);
            events.extend(end_events);
            let mut batch = Batch {
                jobs: vec![JobWrite {
                    job: next,
                    expected_version: Some(self.job.version),
                }],
                events,
                journal,
                settlements: vec![settle],
                leases: vec![guard.clone()],
                lease_releases: vec![guard],
                ..Batch::default()
            };
            let mut attempts = inner.kernel.config().max_write_attempts;
            loop {
                match inner.kernel.commit_busy(batch).await {
                    Ok(_) => break,
                    // Another writer bumped the row (nothing of ours does while we hold the
                    // lease, but the contract allows it): write over its version, once re-read.
                    Err((StoreError::Conflict { entity: "job", .. }, back)) if attempts > 1 => {
                        attempts -= 1;
                        batch = *back;
                        match inner.kernel.store().get_job(self.job.id).await? {
                            Some(current) if !current.state.is_terminal() => {
                                let w = &mut batch.jobs[0];
                                w.expected_version = Some(current.version);
                                w.job.version = current.version + 1;
                            }
                            _ => {
                                self.charge_unjournaled(inner, duration_ms).await;
                                return Ok(None);
                            }
                        }
                    }
                    // The job was ended elsewhere (cancelled) or another host took it after the
                    // lease lapsed: the call ran, so it is charged; the job's outcome is whatever
                    // its row says.
                    Err((StoreError::Conflict { entity: "lease", .. }, _)) => {
                        self.charge_unjournaled(inner, duration_ms).await;
                        return Ok(None);
                    }
                    Err((e, _)) => {
                        self.charge_unjournaled(inner, duration_ms).await;
                        return Err(e.into());
                    }
                }
            }
        }
        Ok(Some(ExecutionResult {
            job_id: self.job.id,
            status: state,
            content: fin.content,
            usage: ExecutionUsage {
                tool_calls: u64::from(result.ran),
                ..ExecutionUsage::default()
            },
            turns,
            artifacts: vec![],
            error,
            tool_result: Some(result),
        }))
    }

    /// The settlement of this call's hold: one tool call, taking `duration_ms`.
    fn settlement(&self, duration_ms: u64, data: JsonText, now: DateTime<Utc>) -> SettleRequest {
        run::tool_settlement(self.hold.id, &self.tool, duration_ms, data, now)
    }

    /// Record a call stopped while it ran (its caller cancelled it, or the job was cancelled in
    /// this process): the job CANCELLED, the attempt charged (the guest ran, however briefly).
    /// With `once` nothing was written yet: the job is inserted as it ended, in one commit.
    async fn commit_stopped(
        &self,
        inner: &Inner,
        running: &RunningCall,
        duration_ms: u64,
        once: bool,
    ) -> Result<Option<ExecutionResult>, AgentError> {
        let error = JobError {
            code: "cancelled".into(),
            message: running.reason(),
        };
        let now = inner.kernel.clock().now();
        let settle = self.settlement(duration_ms, unjournaled(), now);
        if !once {
            let extra = Batch {
                settlements: vec![settle],
                ..Batch::default()
            };
            // The job's own cancel (`keel jobs cancel`) may have ended it first: then only the
            // attempt is left to charge.
            let cancelled = retry::retry_transient(retry::BUSY, || {
                inner
                    .kernel
                    .jobs()
                    .terminate_with(self.job.id, JobState::Cancelled, error.clone(), &extra)
            })
            .await;
            if cancelled.is_err() {
                self.charge_unjournaled(inner, duration_ms).await;
            }
            return Ok(None);
        }
        let mut next = crate::services::transition(&self.job, JobState::Cancelled, now)?;
        // Inserted in its final state, so at version 1 (an insert's version); nobody can claim it.
        next.version = 1;
        let status = ended_by(&next, &error, now);
        next.error = Some(error);
        let mut batch = self.started_rows(&self.owner, next);
        batch.holds[0].check_budgets = false;
        batch.events.push(status);
        batch.settlements.push(settle);
        inner.kernel.commit_busy(batch).await.map_err(|(e, _)| e)?;
        Ok(None)
    }

    /// Settle the hold of a call whose result could not be journaled: the usage happened.
    async fn charge_unjournaled(&self, inner: &Inner, duration_ms: u64) {
        let details = SettleDetails {
            duration_ms: Some(duration_ms),
            model: None,
            tool: Some(self.tool.clone()),
            data: unjournaled(),
        };
        let ledger = inner.kernel.ledger();
        let actual = Usage {
            tool_calls: 1,
            ..Usage::zero()
        };
        let _ = retry::retry_transient(retry::BUSY, || {
            ledger.settle(self.hold.id, LedgerKind::ToolUsage, actual.clone(), details.clone())
        })
        .await;
    }
}

/// The status event of `next`, a job that left RUNNING because of `error`.
fn ended_by(next: &Job, error: &JobError, now: DateTime<Utc>) -> NewEvent {
    let reason = format!("{}: {}", error.code, error.message);
    status_event(
        JobState::Running,
        next,
        StatusDetail {
            reason: Some(reason.as_str()),
            ..StatusDetail::default()
        },
        now,
    )
}

/// The ledger data of a call whose result is not journaled (it was stopped, or its job was ended
/// elsewhere).
fn unjournaled() -> JsonText {
    json!({ "turn": 1, "call_id": CALL_ID, "journaled": false }).into()
}

/// A direct call running on its task: what its [`ExecutionHandle`] knows of it before its job is
/// stored as ended.
#[derive(Debug)]
pub(super) struct RunningCall {
    /// The job as it started (RUNNING): a one-commit call's row is written only when it ends.
    pub(super) job: Job,
    /// Stops the call (its caller's cancel, or the handle's).
    stop: CancellationToken,
    /// Why it was stopped, from the handle's cancel (else the caller cancelled).
    reason: std::sync::OnceLock<String>,
    done: tokio::sync::watch::Sender<Option<Finished>>,
}

/// How a direct call's task ended.
#[derive(Debug, Clone)]
pub(super) enum Finished {
    /// It wrote the job's result.
    Result(Arc<ExecutionResult>),
    /// The job's row says how it ended (stopped, or ended elsewhere).
    Stored,
    /// Its last commit failed (the job stays RUNNING until its lease lapses and a worker
    /// resumes it).
    Failed(String),
}

impl RunningCall {
    fn new(job: Job, stop: CancellationToken) -> Self {
        Self {
            job,
            stop,
            reason: std::sync::OnceLock::new(),
            done: tokio::sync::watch::channel(None).0,
        }
    }

    fn finish(&self, finished: Finished) {
        self.done.send_replace(Some(finished));
    }

    fn reason(&self) -> String {
        self.reason
            .get()
            .cloned()
            .unwrap_or_else(|| super::CALLER_CANCELLED.into())
    }

    /// How it ended, if it has.
    pub(super) fn finished(&self) -> Option<Finished> {
        self.done.borrow().clone()
    }

    /// Wait until it has ended.
    pub(super) async fn wait(&self) -> Finished {
        let mut done = self.done.subscribe();
        // The sender lives in `self`: the channel cannot close while this waits.
        match done.wait_for(Option::is_some).await {
            Ok(finished) => finished.clone().expect("waited for Some"),
            Err(_) => Finished::Stored,
        }
    }

    /// Stop it (a no-op once it has ended), for `reason`.
    pub(super) fn stop(&self, reason: &str) {
        let _ = self.reason.set(reason.to_string());
        self.stop.cancel();
    }
}

/// What the sandboxed call came to: its outcome (`None`: cancelled while it ran), how long it
/// took, and whether its start was committed while it ran (see [`DirectCall::run`]).
struct Ran {
    outcome: Option<crate::tool::ToolOutcome>,
    duration_ms: u64,
    stored: bool,
}
