//! The agent loop: [`AgentRuntime::execute`] runs a prompt through model turns and tool calls
//! under policy, budgets, approvals and the journal, as a durable job.
//!
//! - One job per execution (kind [`AGENT_JOB_KIND`]); the [`ExecutionRequest`] is its input.
//! - The host running a job holds a lease on it, renewed by a heartbeat on its own task (so a
//!   busy loop cannot starve it) and extended before every tool call to cover the call's
//!   deadline. Expiry is judged on the store's clock, and every claim bumps the lease's epoch,
//!   which every write of the loop is fenced by. A host that dies stops renewing;
//!   [`AgentRuntime::resume_orphans`] (run by [`AgentRuntime::run_worker`]) claims
//!   QUEUED/RUNNING agent jobs whose lease expired and resumes them from their journal.
//! - A job WAITING_ACTION is never claimed; resolving its action (from any process) moves it back
//!   to RUNNING, and the owner's loop (or, if that host is gone, the next worker pass) continues.

mod direct;
mod request;
mod run;
pub mod schema;
#[cfg(feature = "conformance")]
pub mod testing;

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::stream::BoxStream;
use uuid::Uuid;

pub use request::{AgentConfig, AgentError, DirectCall, ExecutionRequest, ExecutionResult, ExecutionUsage};
pub use run::{attach_policy_text, model_tool_name};

/// Why a call is cancelled when its caller cancels it (its context's cancel token, or a front
/// end cancelling its handle on the caller's behalf, e.g. after Ctrl-C).
pub const CALLER_CANCELLED: &str = "the caller cancelled the call";

use crate::action::{Action, Resolution};
use crate::context::{CancellationToken, ExecutionContext, PolicyRef};
use crate::event::{EventFilter, EventQuery, EventType, RuntimeEvent, Subscription, SubscriptionError};
use crate::job::{Job, NewJob};
use crate::json::JsonText;
use crate::model::ModelProvider;
use crate::policy::{Policy, SessionApprovalStore};
use crate::services::Kernel;
use crate::store::{ClaimRequest, PolicyText};
use crate::tool::ToolHost;

/// The job kind of agent executions (what `resume_orphans` claims).
pub const AGENT_JOB_KIND: &str = "agent";

/// Loads a job's recorded policy given only by reference (see [`AgentRuntime::set_policy_loader`]):
/// the policy, or one sentence saying why it cannot be applied.
pub type PolicyLoader = Arc<dyn Fn(&PolicyRef) -> Result<Policy, String> + Send + Sync>;

/// The job an execution of `request` is stored as (QUEUED, its input the request), for
/// [`AgentRuntime::execute`] and for front ends that queue a job without running it.
pub fn new_job(request: &ExecutionRequest, now: DateTime<Utc>) -> Result<NewJob, AgentError> {
    job_with_trace(request, now, false).map(|(job, _)| job)
}

/// A policy text longer than this is stored apart, once per text ([`PolicyText`]), and the job's
/// input names it by sha256: a real policy is kilobytes, which every job row (one per direct
/// call) would otherwise repeat. A shorter one (allow-all is one line) stays in the input, where
/// it costs less than the statement that stores it.
pub const INLINE_POLICY_TEXT_MAX: usize = 512;

/// [`new_job`], and the trace id of the context it checkpoints. `digest_checked`: the caller
/// has checked the request's policy text against its `version` (no need to hash it again).
pub(crate) fn job_with_trace(
    request: &ExecutionRequest,
    now: DateTime<Utc>,
    digest_checked: bool,
) -> Result<(NewJob, String), AgentError> {
    let mut ctx = ExecutionContext::new(request.scope.clone());
    ctx.principal = request.principal.clone();
    ctx.session = request.session.clone();
    ctx.budget = request.budget.clone();
    // The policy's text is in the input (the request); the context keeps the reference only.
    ctx.policy = PolicyRef {
        source: None,
        ..request.policy.clone()
    };
    ctx.versions.model = Some(request.model.clone());
    ctx.metadata = request.metadata.clone();
    let mut new = NewJob::from_context(&ctx, AGENT_JOB_KIND);
    new.idempotency_key = request.idempotency_key.clone();
    let (recorded, policy_text) = recorded_form(request, digest_checked)?;
    new.input = JsonText::of(&*recorded).map_err(|e| AgentError::Invalid(e.to_string()))?;
    // The idempotency key is bound to the request minus what differs between two attempts of the
    // same request (the session a front end makes up per process, the key itself, metadata).
    // Without a key nothing reads it: no copy of the input is made.
    if new.idempotency_key.is_some() {
        let mut fingerprint = new.input.value();
        if let Some(obj) = fingerprint.as_object_mut() {
            for noise in ["session", "idempotency_key", "metadata"] {
                obj.remove(noise);
            }
            // The whole request, text included, as before texts were stored apart: a key used
            // by an earlier Keel still matches the same request.
            if let (Some(text), Some(policy)) = (&policy_text, obj.get_mut("policy").and_then(|p| p.as_object_mut())) {
                policy.insert("source".into(), text.text().into());
            }
        }
        new.request_fingerprint = Some(fingerprint);
    }
    new.policy_text = policy_text;
    new.deadline = request
        .runtime_limit()
        .map(|d| now + chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX));
    Ok((new, ctx.trace_id))
}

/// `request` as its job records it: a policy text past [`INLINE_POLICY_TEXT_MAX`] is taken out
/// (returned, to be stored with the job) and named by its sha256.
fn recorded_form(
    request: &ExecutionRequest,
    digest_checked: bool,
) -> Result<(Cow<'_, ExecutionRequest>, Option<PolicyText>), AgentError> {
    if request
        .policy
        .source
        .as_ref()
        .is_none_or(|t| t.len() <= INLINE_POLICY_TEXT_MAX)
    {
        return Ok((Cow::Borrowed(request), None));
    }
    let mut recorded = request.clone();
    let text = recorded.policy.source.take().unwrap_or_default();
    let stored = match &request.policy.version {
        Some(pinned) if digest_checked => PolicyText::checked(pinned.clone(), text),
        pinned => {
            let stored = PolicyText::new(text);
            if pinned.as_ref().is_some_and(|p| p != stored.sha256()) {
                return Err(AgentError::Invalid(format!(
                    "the sha256 recorded for policy {} is not its text's",
                    request.policy.name
                )));
            }
            stored
        }
    };
    recorded.policy.version = Some(stored.sha256().to_owned());
    Ok((Cow::Owned(recorded), Some(stored)))
}

pub(crate) struct Inner {
    pub(crate) kernel: Kernel,
    pub(crate) models: Arc<dyn ModelProvider>,
    pub(crate) tools: Arc<dyn ToolHost>,
    pub(crate) policy: Arc<Policy>,
    pub(crate) approvals: Arc<dyn SessionApprovalStore>,
    pub(crate) config: AgentConfig,
    pub(crate) owner: String,
    tasks: Mutex<HashMap<Uuid, LoopTask>>,
    /// Resume tokens of approvals this host created, for in-process listeners only.
    pub(crate) issued_tokens: tokio::sync::broadcast::Sender<IssuedToken>,
    /// Loads recorded policies given by reference only.
    pub(crate) policy_loader: std::sync::OnceLock<PolicyLoader>,
    /// Operator override: `policy` for every job.
    pub(crate) policy_override: std::sync::atomic::AtomicBool,
    /// `config.max_concurrent_jobs`, adjustable (0: no limit).
    max_jobs: std::sync::atomic::AtomicU32,
    /// The last policy text a job recorded, parsed: every call of a front end records the same
    /// text, which is then checked and parsed once instead of at each call.
    pub(crate) recorded_policy: Mutex<Option<(PolicyRef, Arc<Policy>)>>,
}

/// A job's loop on this host and the lease it runs under.
type LoopTask = (tokio::task::JoinHandle<()>, Arc<run::LeaseState>);

/// The resume token of an approval the agent loop created. The kernel stores only its hash, so
/// this in-process notice is the one chance to hand the token to a human (print it, send it);
/// it is never persisted, logged or put in an event.
#[derive(Clone)]
pub struct IssuedToken {
    /// The job waiting for the approval.
    pub job_id: Uuid,
    /// The approval action.
    pub action_id: Uuid,
    /// The secret token (64 hex chars); resolve with `ActionManager::resolve_by_token`.
    pub token: String,
}

impl std::fmt::Debug for IssuedToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedToken")
            .field("job_id", &self.job_id)
            .field("action_id", &self.action_id)
            .field("token", &"<redacted>")
            .finish()
    }
}

/// The agent runtime of one host: the kernel plus a model provider, a tool host, a policy and
/// the session-approval store. Cheap to clone.
#[derive(Clone)]
pub struct AgentRuntime {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for AgentRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentRuntime")
            .field("owner", &self.inner.owner)
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

impl AgentRuntime {
    /// An agent runtime over `kernel`.
    pub fn new(
        kernel: Kernel,
        models: Arc<dyn ModelProvider>,
        tools: Arc<dyn ToolHost>,
        policy: Arc<Policy>,
        approvals: Arc<dyn SessionApprovalStore>,
        config: AgentConfig,
    ) -> Self {
        let owner = config
            .worker_id
            .clone()
            .unwrap_or_else(|| format!("host-{}", Uuid::now_v7().simple()));
        let max_jobs = config.max_concurrent_jobs;
        Self {
            inner: Arc::new(Inner {
                kernel,
                models,
                tools,
                policy,
                approvals,
                config,
                owner,
                tasks: Mutex::new(HashMap::new()),
                issued_tokens: tokio::sync::broadcast::channel(64).0,
                policy_loader: std::sync::OnceLock::new(),
                policy_override: std::sync::atomic::AtomicBool::new(false),
                max_jobs: std::sync::atomic::AtomicU32::new(max_jobs),
                recorded_policy: Mutex::new(None),
            }),
        }
    }

    /// The kernel underneath.
    pub fn kernel(&self) -> &Kernel {
        &self.inner.kernel
    }

    /// Resume tokens of approvals created by this host's loops from now on (see [`IssuedToken`]).
    pub fn issued_tokens(&self) -> tokio::sync::broadcast::Receiver<IssuedToken> {
        self.inner.issued_tokens.subscribe()
    }

    /// The session approvals this runtime's calls consult ("approve for this session"), for a
    /// policy dry run that answers as a call of the same session would be decided.
    pub fn session_approvals(&self) -> &dyn SessionApprovalStore {
        self.inner.approvals.as_ref()
    }

    /// This host's lease-owner id.
    pub fn owner(&self) -> &str {
        &self.inner.owner
    }

    /// Start an execution as a job and run it on this host. With an idempotency key already used
    /// in the scope, attaches to that job instead (and resumes it here if nobody holds it).
    pub async fn execute(&self, request: ExecutionRequest) -> Result<ExecutionHandle, AgentError> {
        if request.scope.is_empty() {
            return Err(AgentError::Invalid("a request needs a scope".into()));
        }
        if request.call.is_none() {
            if request.model.is_empty() {
                return Err(AgentError::Invalid("a request needs a model".into()));
            }
            if request.prompt.is_none() && request.messages.is_empty() {
                return Err(AgentError::Invalid("a request needs a prompt or messages".into()));
            }
        }
        let now = self.kernel().clock().now();
        let new = new_job(&request, now)?;
        // Created already leased to this host (one transaction): a worker polling for unleased
        // jobs cannot take it in between and run it under its own configuration.
        let ttl = chrono::Duration::milliseconds(self.inner.config.lease_ttl_ms as i64);
        let claimed_at = std::time::Instant::now();
        let created = self
            .kernel()
            .jobs()
            .create_leased(new, Some((self.inner.owner.clone(), ttl)))
            .await?;
        if created.created {
            // The epoch the creating claim set (the job row does not carry it).
            match self.kernel().store().get_lease(created.job.id).await? {
                Some(l) if l.owner == self.inner.owner => self.spawn(created.job.clone(), l.epoch, claimed_at),
                // Cannot happen unless the lease already lapsed and another host took the job.
                _ => {}
            }
        } else {
            // An existing job (same idempotency key): resume it here if nobody holds it.
            self.claim_and_spawn(Some(created.job.id), now).await?;
        }
        Ok(self.handle(created.job))
    }

    /// The governed tool-call path: call `tool` (`plugin/tool`) with `arguments` on behalf of
    /// `ctx` (scope, principal, session, budget, policy, metadata), as a job whose only step is the
    /// call. The call goes through exactly what an agent's tool call goes through — input schema
    /// check, policy, approval (the job waits in WAITING_ACTION), budget hold, the sandboxed call,
    /// settlement with its receipt, events and journal — and is durable like any job. Every surface
    /// (`keel call`, MCP `tools/call`, the HTTP API, operators) calls tools through here.
    ///
    /// `handle.result().await` gives the outcome: [`ExecutionResult::tool_result`] carries the
    /// output or error and the receipt; a refused or failed call ends the job FAILED with the
    /// error's code. A call allowed at once (no approval to wait for) runs on the caller's task
    /// and has ended when this returns; cancelling `ctx.cancel` stops it (the job ends
    /// CANCELLED). A call that waits for an approval runs on a runner of this host.
    pub async fn call_tool(
        &self,
        ctx: &ExecutionContext,
        tool: &str,
        arguments: serde_json::Value,
        idempotency_key: Option<String>,
    ) -> Result<ExecutionHandle, AgentError> {
        self.call_tool_reporting(ctx, tool, arguments, idempotency_key, None)
            .await
    }

    /// [`call_tool`](Self::call_tool), which also sends the call's handle to `started` as soon as a
    /// call that runs on the caller's task has started (its start committed), before it runs: a
    /// front end that runs this on a task of its own can follow, hand over or cancel a long call
    /// while it runs. `started` is dropped unsent when the call goes to a runner (the returned
    /// handle is then the one) or is refused.
    pub async fn call_tool_reporting(
        &self,
        ctx: &ExecutionContext,
        tool: &str,
        arguments: serde_json::Value,
        idempotency_key: Option<String>,
        started: Option<tokio::sync::oneshot::Sender<ExecutionHandle>>,
    ) -> Result<ExecutionHandle, AgentError> {
        if !tool.contains('/') {
            return Err(AgentError::Invalid(format!(
                "`{tool}` is not a tool name (plugin/tool)"
            )));
        }
        let request = ExecutionRequest {
            scope: ctx.tenant.clone(),
            principal: ctx.principal.clone(),
            session: ctx.session.clone(),
            policy: ctx.policy.clone(),
            budget: ctx.budget.clone(),
            metadata: ctx.metadata.clone(),
            idempotency_key,
            call: Some(DirectCall {
                tool: tool.to_string(),
                arguments,
            }),
            ..ExecutionRequest::default()
        };
        if request.scope.is_empty() {
            return Err(AgentError::Invalid("a request needs a scope".into()));
        }
        // The common case (allowed, valid, no approval to wait for) on the caller's task in one or
        // two commits; everything else on a runner, like an agent's call. Both futures are boxed:
        // inline they made this one 6.6 KB, copied at every level of every front end that awaits it.
        if let Some(handle) = Box::pin(self.direct_call(&request, &ctx.cancel, started)).await? {
            return Ok(handle);
        }
        Box::pin(self.execute(request)).await
    }

    /// Run at most `n` jobs on this host at once (0: no limit); overrides
    /// `AgentConfig::max_concurrent_jobs`. Orphans beyond it are left for other workers.
    pub fn set_max_concurrent_jobs(&self, n: u32) {
        self.inner.max_jobs.store(n, std::sync::atomic::Ordering::SeqCst);
    }

    /// Run every job under this host's policy instead of the policy recorded with the job: an
    /// operator's explicit override (e.g. `keel worker --override-policy`). Each job so run gets a
    /// progress event saying so.
    pub fn override_job_policies(&self, on: bool) {
        self.inner
            .policy_override
            .store(on, std::sync::atomic::Ordering::SeqCst);
    }

    /// How this host loads a job's recorded policy that carries only a reference (a name and
    /// sha256, no text), e.g. by re-reading the file and checking its hash. Without a loader such
    /// a job is refused (failed with `policy_unavailable`). Set once; later calls are ignored.
    pub fn set_policy_loader(&self, loader: PolicyLoader) {
        let _ = self.inner.policy_loader.set(loader);
    }

    /// Re-attach to an existing job of `tenant` (e.g. for `keel jobs watch`).
    pub async fn attach(&self, tenant: &str, job_id: Uuid) -> Result<ExecutionHandle, AgentError> {
        let job = self.kernel().jobs().get(tenant, job_id).await?;
        Ok(self.handle(job))
    }

    fn handle(&self, job: Job) -> ExecutionHandle {
        ExecutionHandle {
            rt: self.clone(),
            job_id: job.id,
            tenant: job.tenant,
            finished: None,
            running: None,
        }
    }

    async fn claim_and_spawn(&self, job_id: Option<Uuid>, now: DateTime<Utc>) -> Result<Vec<Uuid>, AgentError> {
        let limit = match job_id {
            Some(_) => 1,
            None => {
                let cap = self.inner.max_jobs.load(std::sync::atomic::Ordering::SeqCst);
                let room = match cap {
                    0 => u32::MAX,
                    cap => cap.saturating_sub(self.running_jobs().len() as u32),
                };
                self.inner.config.claim_batch.max(1).min(room)
            }
        };
        if limit == 0 {
            return Ok(vec![]);
        }
        let claimed_at = std::time::Instant::now();
        let claimed = self
            .kernel()
            .store()
            .claim_jobs(ClaimRequest {
                owner: self.inner.owner.clone(),
                now,
                ttl_ms: self.inner.config.lease_ttl_ms,
                kinds: vec![AGENT_JOB_KIND.to_string()],
                job_id,
                limit,
            })
            .await?;
        let mut ids = Vec::with_capacity(claimed.len());
        for job in claimed {
            // The claim's fencing epoch (the claim itself returns only the job row).
            match self.kernel().store().get_lease(job.id).await? {
                Some(l) if l.owner == self.inner.owner => {
                    ids.push(job.id);
                    self.spawn(job, l.epoch, claimed_at);
                }
                // Lapsed and taken by another host already: not ours.
                _ => {}
            }
        }
        Ok(ids)
    }

    fn spawn(&self, job: Job, epoch: u64, claimed_at: std::time::Instant) {
        let ttl = self.inner.config.lease_ttl_ms;
        let mut tasks = self.inner.tasks.lock().unwrap_or_else(|e| e.into_inner());
        tasks.retain(|_, (h, _)| !h.is_finished());
        if let Some((handle, lease)) = tasks.get(&job.id) {
            if epoch == lease.epoch() + 1 {
                // Our own lease lapsed and we claimed it back with nobody in between: the running
                // loop carries on under the new epoch.
                lease.reclaimed(epoch, claimed_at, ttl);
                return;
            }
            // Someone else ran the job meanwhile: the old loop's view is stale.
            handle.abort();
        }
        let lease = Arc::new(run::LeaseState::new(
            job.id,
            self.inner.owner.clone(),
            epoch,
            claimed_at,
            ttl,
        ));
        let handle = tokio::spawn(run_job(self.inner.clone(), job.clone(), lease.clone()));
        tasks.insert(job.id, (handle, lease));
    }

    /// Resume job `job_id` on this host if nobody holds its lease (e.g. this host's own loop stopped
    /// on a store error and left it for recovery); whether it now runs here.
    pub async fn resume_job(&self, job_id: Uuid) -> Result<bool, AgentError> {
        let now = self.kernel().clock().now();
        Ok(!self.claim_and_spawn(Some(job_id), now).await?.is_empty())
    }

    /// Claim agent jobs whose lease expired (their host died or released them; judged on the
    /// store's clock, `now` only stamps the claim) and
    /// resume them on this host from their journal. Returns the claimed job ids.
    pub async fn resume_orphans(&self, now: DateTime<Utc>) -> Result<Vec<Uuid>, AgentError> {
        self.claim_and_spawn(None, now).await
    }

    /// The host worker: until `stop` fires, periodically (every `poll_ms`, and at once when an
    /// action is resolved in this process) run the kernel's recovery sweep (deadlines, expired
    /// actions and holds) and [`resume_orphans`](Self::resume_orphans) — which also picks up
    /// WAITING_ACTION jobs of dead hosts once another process resolved their action.
    pub async fn run_worker(&self, stop: CancellationToken) -> Result<(), AgentError> {
        let every = Duration::from_millis(self.inner.config.poll_ms.max(1));
        let mut sub = self
            .kernel()
            .subscribe(EventFilter::default().with_types([EventType::ActionResolved, EventType::ActionCancelled]));
        loop {
            let now = self.kernel().clock().now();
            // Errors are retried on the next pass; a worker must outlive a busy database.
            let _ = self.kernel().recover_and_sweep(now).await;
            let _ = self.resume_orphans(now).await;
            tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                _ = tokio::time::sleep(every) => {}
                _ = sub.recv() => {}
            }
        }
    }

    /// [`run_worker`](Self::run_worker) on a background task.
    pub fn spawn_worker(&self, stop: CancellationToken) -> tokio::task::JoinHandle<Result<(), AgentError>> {
        let rt = self.clone();
        tokio::spawn(async move { rt.run_worker(stop).await })
    }

    /// Jobs whose loop runs on this host right now.
    pub fn running_jobs(&self) -> Vec<Uuid> {
        let tasks = self.inner.tasks.lock().unwrap_or_else(|e| e.into_inner());
        tasks
            .iter()
            .filter(|(_, (h, _))| !h.is_finished())
            .map(|(id, _)| *id)
            .collect()
    }

    /// Abort every loop task at once, without any cleanup — leases are kept until they expire,
    /// holds until the sweeper releases them. This is what a crash looks like to the other
    /// hosts; tests use it to simulate one, and a host may use it on a hard shutdown.
    pub fn abort_all(&self) {
        let mut tasks = self.inner.tasks.lock().unwrap_or_else(|e| e.into_inner());
        for (_, (h, _)) in tasks.drain() {
            h.abort();
        }
    }
}

/// Aborts a task when dropped: the heartbeat dies with its loop (also when the loop's own task is
/// aborted, as on a simulated crash), so a dead loop never keeps its lease alive.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn run_job(inner: Arc<Inner>, job: Job, lease: Arc<run::LeaseState>) {
    let job_id = job.id;
    let (beat_tx, beat_rx) = tokio::sync::oneshot::channel();
    let held = run::Held::default();
    let heartbeat = AbortOnDrop(tokio::spawn(run::heartbeat(
        inner.clone(),
        lease.clone(),
        held.clone(),
        beat_tx,
    )));
    let runner = match run::Runner::load(inner.clone(), &job, lease.clone(), held).await {
        Ok(r) => r,
        Err(run::Stop::Fail(e)) => {
            let _ = inner.kernel.jobs().fail(job_id, e).await;
            let _ = inner.kernel.store().release_lease(&lease.guard()).await;
            return;
        }
        Err(_) => {
            let _ = inner.kernel.store().release_lease(&lease.guard()).await;
            return;
        }
    };
    let cancel = inner.kernel.jobs().cancellation_token(job_id);
    let clock = inner.kernel.clock().clone();
    let poll = Duration::from_millis(inner.config.poll_ms.max(1));
    let deadline = async {
        let Some(d) = job.deadline else {
            return std::future::pending().await;
        };
        // Re-read the clock in steps so a test clock (or clock adjustments) is honoured.
        loop {
            match (d - clock.now()).to_std() {
                Ok(left) if !left.is_zero() => tokio::time::sleep(left.min(poll)).await,
                _ => return,
            }
        }
    };
    let outcome = tokio::select! {
        r = runner.drive() => r,
        _ = cancel.cancelled() => Err(run::Stop::Ended),
        // Ended elsewhere (holds are released below) vs taken by another host (they are its).
        beat = beat_rx => Err(match beat {
            Ok(run::Beat::Ended) => run::Stop::Ended,
            Ok(run::Beat::Lost) | Err(_) => run::Stop::Lost,
        }),
        _ = deadline => Err(run::Stop::TimedOut),
    };
    drop(heartbeat);
    if let Err(stop) = &outcome {
        runner.conclude(stop).await;
    }
    if let Err(run::Stop::Error(e)) = &outcome {
        // Left RUNNING with its lease released: the next worker pass (or `keel run` itself)
        // resumes it from the journal.
        let message = format!("the loop stopped on a store error and will be resumed: {e}");
        let _ = inner
            .kernel
            .jobs()
            .emit(job_id, EventType::Progress, serde_json::json!({ "message": message }))
            .await;
    }
    // A host that lost the job leaves the holds of started tool calls to the new owner.
    runner.release_all(matches!(outcome, Err(run::Stop::Lost))).await;
    let _ = inner.kernel.store().release_lease(&lease.guard()).await;
    if !matches!(outcome, Err(run::Stop::Error(_)) | Err(run::Stop::Lost)) {
        inner.kernel.jobs().forget_token(job_id);
    }
}

/// A running (or finished) execution: its events, its result, its pending actions.
#[derive(Debug, Clone)]
pub struct ExecutionHandle {
    rt: AgentRuntime,
    job_id: Uuid,
    tenant: String,
    /// The result, when the job ended before the handle was returned: [`result`](Self::result)
    /// needs no store read then.
    finished: Option<Arc<ExecutionResult>>,
    /// A direct call running on this host: its result needs no store read either, and it is
    /// stopped (not its stored job cancelled) by [`cancel`](Self::cancel).
    running: Option<Arc<direct::RunningCall>>,
}

struct EventCursor {
    kernel: Kernel,
    job_id: Uuid,
    sub: Subscription,
    last_seq: u64,
    buf: VecDeque<RuntimeEvent>,
    catch_up: bool,
    ending: bool,
    done: bool,
}

impl EventCursor {
    async fn read_store(&mut self) -> bool {
        let q = EventQuery {
            filter: EventFilter::job(self.job_id),
            after_seq: self.last_seq,
            ..Default::default()
        };
        match self.kernel.read_events(&q).await {
            Ok(events) => {
                self.buf.extend(events);
                true
            }
            Err(_) => false,
        }
    }

    async fn next(&mut self) -> Option<RuntimeEvent> {
        loop {
            if let Some(e) = self.buf.pop_front() {
                if e.seq <= self.last_seq {
                    continue;
                }
                self.last_seq = e.seq;
                if e.ends_job() {
                    self.ending = true;
                }
                return Some(e);
            }
            if self.done {
                return None;
            }
            if self.ending {
                // Drain what was committed together with the terminal event, then stop.
                self.done = true;
                self.read_store().await;
                continue;
            }
            if self.catch_up {
                self.catch_up = false;
                if !self.read_store().await {
                    return None;
                }
                continue;
            }
            match self.sub.recv().await {
                Ok(e) if e.seq == self.last_seq + 1 => self.buf.push_back(e),
                Ok(e) if e.seq <= self.last_seq => {}
                // A gap (lag, or events committed by another process): re-read the store.
                Ok(_) | Err(SubscriptionError::Lagged(_)) => self.catch_up = true,
                Err(SubscriptionError::Closed) => return None,
            }
        }
    }
}

impl ExecutionHandle {
    /// The job id.
    pub fn job_id(&self) -> Uuid {
        self.job_id
    }

    /// Whether the job has ended and its result is at hand without a store read (a direct call
    /// that has ended).
    pub fn is_finished(&self) -> bool {
        self.finished.is_some()
            || self
                .running
                .as_ref()
                .is_some_and(|r| matches!(r.finished(), Some(direct::Finished::Result(_))))
    }

    /// Whether this is a direct call run by this host (see [`AgentRuntime::call_tool`]): it never
    /// waits for an approval, [`result`](Self::result) needs no store read, and its job may not
    /// be stored until it ends ([`job`](Self::job) reports it RUNNING meanwhile).
    pub fn is_direct(&self) -> bool {
        self.running.is_some()
    }

    /// The tenant (scope).
    pub fn tenant(&self) -> &str {
        &self.tenant
    }

    /// Every event of the job from the beginning (persisted ones first, then live), ending after
    /// the job's terminal event. In-process live delivery; events committed by another process
    /// are picked up from the store when a gap is noticed.
    pub fn events(&self) -> BoxStream<'static, RuntimeEvent> {
        let kernel = self.rt.kernel().clone();
        let cursor = EventCursor {
            sub: kernel.subscribe(EventFilter::job(self.job_id)),
            kernel,
            job_id: self.job_id,
            last_seq: 0,
            buf: VecDeque::new(),
            catch_up: true,
            ending: false,
            done: false,
        };
        Box::pin(futures::stream::unfold(cursor, |mut c| async move {
            let e = c.next().await?;
            Some((e, c))
        }))
    }

    /// The job as stored now; a direct call's job that is not stored yet (made in one commit, when
    /// it ends) as it started: RUNNING.
    pub async fn job(&self) -> Result<Job, AgentError> {
        let stored = self.rt.kernel().jobs().get(&self.tenant, self.job_id).await;
        match (stored, &self.running) {
            (Err(crate::error::KernelError::JobNotFound(_)), Some(running)) => match running.finished() {
                None => Ok(running.job.clone()),
                // Stored since the read above.
                Some(_) => Ok(self.rt.kernel().jobs().get(&self.tenant, self.job_id).await?),
            },
            (stored, _) => Ok(stored?),
        }
    }

    /// The result of a direct call once its task has ended, when the task has it (else the
    /// stored job has it).
    async fn direct_result(&self) -> Option<Result<ExecutionResult, AgentError>> {
        let running = self.running.as_ref()?;
        match running.wait().await {
            direct::Finished::Result(result) => Some(Ok(result.as_ref().clone())),
            direct::Finished::Stored => None,
            direct::Finished::Failed(e) => Some(Err(crate::store::StoreError::Backend(e).into())),
        }
    }

    /// Wait for the job to end and return its result.
    pub async fn result(&self) -> Result<ExecutionResult, AgentError> {
        if let Some(done) = &self.finished {
            return Ok(done.as_ref().clone());
        }
        if let Some(result) = self.direct_result().await {
            return result;
        }
        let every = Duration::from_millis(self.rt.inner.config.poll_ms.max(1));
        loop {
            let mut sub = self.rt.kernel().subscribe(EventFilter::job(self.job_id));
            let job = self.job().await?;
            if job.state.is_terminal() {
                return Ok(run::build_result(&self.rt.inner, &job).await?);
            }
            let wait = async {
                loop {
                    match sub.recv().await {
                        Ok(e) if e.ends_job() => return,
                        Ok(_) => continue,
                        Err(_) => return,
                    }
                }
            };
            tokio::select! {
                _ = wait => {}
                _ = tokio::time::sleep(every) => {}
            }
        }
    }

    /// The current result without waiting (status may still be running).
    pub async fn snapshot(&self) -> Result<ExecutionResult, AgentError> {
        if let Some(done) = &self.finished {
            return Ok(done.as_ref().clone());
        }
        if let Some(direct::Finished::Result(done)) = self.running.as_ref().and_then(|r| r.finished()) {
            return Ok(done.as_ref().clone());
        }
        let job = self.job().await?;
        Ok(run::build_result(&self.rt.inner, &job).await?)
    }

    /// Cancel the job (and its children and pending actions); its loop stops promptly. A direct
    /// call running on this host is stopped, and its job recorded CANCELLED, before this returns
    /// (its guest stops at once, whether or not its job is stored yet).
    pub async fn cancel(&self, reason: &str) -> Result<Job, AgentError> {
        if let Some(running) = &self.running
            && running.finished().is_none()
        {
            running.stop(reason);
            running.wait().await;
            let job = self.job().await?;
            if job.state.is_terminal() {
                return Ok(job);
            }
        }
        Ok(self.rt.kernel().jobs().cancel(self.job_id, reason).await?)
    }

    /// Actions the job is waiting on.
    pub async fn pending_actions(&self) -> Result<Vec<Action>, AgentError> {
        Ok(self
            .rt
            .kernel()
            .actions()
            .list_pending(&self.tenant, Some(self.job_id))
            .await?)
    }

    /// Resolve one of the job's actions (trusted caller). For approvals, `approved` decides;
    /// `value: "session"` (or `{"scope": "session"}`) also approves the same call for the rest
    /// of the session.
    pub async fn resolve_action(&self, action_id: Uuid, resolution: Resolution) -> Result<Action, AgentError> {
        let action = self.rt.kernel().actions().get(&self.tenant, action_id).await?;
        if action.job_id != self.job_id {
            return Err(AgentError::Kernel(crate::error::KernelError::ActionNotFound(action_id)));
        }
        Ok(self
            .rt
            .kernel()
            .actions()
            .resolve(&self.tenant, action_id, resolution)
            .await?)
    }
}
