//! Jobs: list (filters, pages by cursor), show, cancel; start an agent job (run, `--detach`
//! enqueue), keep it running in this process, resume an orphan, run a worker until idle.
//!
//! Every read is confined to the caller's scope: another scope's job is reported exactly like a
//! job that does not exist.

use std::time::Duration;

use chrono::{DateTime, Utc};
use keel_kernel::agent::{AGENT_JOB_KIND, attach_policy_text};
use keel_kernel::context::CancellationToken;
use keel_kernel::event::{EventFilter, EventQuery, RuntimeEvent};
use keel_kernel::job::{Job, JobFilter, JobState};
use keel_kernel::{ExecutionHandle, ExecutionRequest, ExecutionResult, Kernel};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::caller::{Caller, Role};
use crate::error::AppError;
use crate::runtime::{AgentHost, agent_error, tool_patterns};

/// Which jobs to list, newest first.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JobQuery {
    /// Only jobs in these states (any if empty).
    pub states: Vec<JobState>,
    /// Only jobs of this principal.
    pub principal: Option<String>,
    /// Only jobs of this session.
    pub session: Option<String>,
    /// Only jobs of this kind (`agent`, ...).
    pub kind: Option<String>,
    /// At most this many, at least 1 (all when `None`).
    pub limit: Option<u32>,
    /// Continue after the page that returned this cursor ([`JobPage::next_cursor`]).
    pub cursor: Option<String>,
}

/// One page of jobs.
#[derive(Debug, Clone, Serialize)]
pub struct JobPage {
    /// The jobs, newest first.
    pub jobs: Vec<Job>,
    /// Pass as [`JobQuery::cursor`] for the next page; `None` on the last page.
    pub next_cursor: Option<String>,
}

/// A cursor: the position (creation time, id) of the last job of a page. Jobs are listed by
/// `created_at DESC, id DESC`, so the next page holds the jobs strictly after it in that order,
/// whatever was created or deleted meanwhile.
fn encode_cursor(job: &Job) -> String {
    format!("{}.{}", job.created_at.timestamp_micros(), job.id.simple())
}

fn decode_cursor(cursor: &str) -> Result<(DateTime<Utc>, Uuid), AppError> {
    let invalid = || AppError::user(format!("{cursor:?} is not a job list cursor"));
    let (micros, id) = cursor.split_once('.').ok_or_else(invalid)?;
    let at = micros
        .parse::<i64>()
        .ok()
        .and_then(DateTime::from_timestamp_micros)
        .ok_or_else(invalid)?;
    let id = Uuid::parse_str(id).map_err(|_| invalid())?;
    Ok((at, id))
}

/// A job with its events.
#[derive(Debug, Clone, Serialize)]
pub struct JobView {
    /// The job.
    pub job: Job,
    /// Its events, in order.
    pub events: Vec<RuntimeEvent>,
}

/// List the caller's jobs matching `query`.
pub async fn list_jobs(kernel: &Kernel, caller: &Caller, query: &JobQuery) -> Result<JobPage, AppError> {
    caller.require(Role::Read)?;
    if query.limit == Some(0) {
        return Err(AppError::user("a page holds at least one job (limit 0)"));
    }
    let after = query.cursor.as_deref().map(decode_cursor).transpose()?;
    let mut filter = JobFilter {
        states: query.states.clone(),
        principal: query.principal.clone(),
        session: query.session.clone(),
        kind: query.kind.clone(),
        ..JobFilter::tenant(caller.scope.clone())
    };
    // One more than asked tells whether another page follows; the store seeks to the cursor.
    filter.limit = query.limit.map(|n| n.saturating_add(1));
    filter.before = after;
    let mut jobs = kernel.jobs().list(&filter).await?;
    let mut next_cursor = None;
    if let Some(limit) = query.limit
        && jobs.len() > limit as usize
    {
        jobs.truncate(limit as usize);
        next_cursor = jobs.last().map(encode_cursor);
    }
    Ok(JobPage { jobs, next_cursor })
}

/// One of the caller's jobs.
pub async fn get_job(kernel: &Kernel, caller: &Caller, id: Uuid) -> Result<Job, AppError> {
    caller.require(Role::Read)?;
    Ok(kernel.jobs().get(&caller.scope, id).await?)
}

/// One of the caller's jobs with all its events.
pub async fn show_job(kernel: &Kernel, caller: &Caller, id: Uuid) -> Result<JobView, AppError> {
    let job = get_job(kernel, caller, id).await?;
    let events = kernel
        .read_events(&EventQuery {
            filter: EventFilter::job(id),
            ..EventQuery::default()
        })
        .await?;
    Ok(JobView { job, events })
}

/// Cancel one of the caller's jobs (its unfinished children and pending actions too); a job
/// that already finished is the user's error.
pub async fn cancel_job(kernel: &Kernel, caller: &Caller, id: Uuid, reason: &str) -> Result<Job, AppError> {
    caller.require(Role::Write)?;
    // Tenant check first: the manager's mutating calls take bare ids.
    let job = kernel.jobs().get(&caller.scope, id).await?;
    if job.state.is_terminal() {
        return Err(AppError::user(format!("job {id} already finished ({})", job.state)));
    }
    Ok(kernel.jobs().cancel(id, reason).await?)
}

/// An agent job to start: the prompt, the tools and model, its limits.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunRequest {
    /// What to ask the agent.
    pub prompt: String,
    /// Tools the model may use: a plugin name (all its tools), `plugin/tool`, or a glob.
    pub tools: Vec<String>,
    /// `provider:model`.
    pub model: String,
    /// Maximum model turns.
    pub max_turns: Option<u32>,
    /// Wall-clock limit of the whole job.
    pub timeout: Option<Duration>,
    /// Maximum model cost of the job.
    pub max_cost: Option<Decimal>,
    /// Maximum tool calls of the job.
    pub max_tool_calls: Option<u64>,
    /// Model to switch to when a `degrade` budget is exceeded.
    pub degrade_model: Option<String>,
    /// Starting again with the same key in the scope attaches to the first job (default: a new key).
    pub idempotency_key: Option<String>,
    /// Session ("approve for this session" is remembered per session; default: a new one).
    pub session: Option<String>,
}

/// A job created by [`AgentHost::enqueue`].
#[derive(Debug, Clone, Serialize)]
pub struct Enqueued {
    /// The job.
    pub job_id: Uuid,
    /// False when a job with the same idempotency key already existed (that job is returned).
    pub created: bool,
}

impl AgentHost {
    /// Check `run` (the model must be `provider:model` of a configured provider that can be
    /// called) and build the job's request for `caller`, under this host's policy. Nothing is
    /// created yet: a model no provider serves is refused before a job exists.
    pub fn run_request(&self, caller: &Caller, run: &RunRequest) -> Result<ExecutionRequest, AppError> {
        caller.require(Role::Write)?;
        match run.model.split_once(':') {
            Some((provider, model)) if !model.is_empty() && self.providers.iter().any(|p| p == provider) => {}
            _ => {
                return Err(AppError::user(format!(
                    "--model {:?} is not `provider:model` with a configured provider ({}; add others under [models.providers] in config.toml)",
                    run.model,
                    self.providers.join(", ")
                )));
            }
        }
        // ... or one whose provider cannot be called (e.g. no API key).
        for model in std::iter::once(&run.model).chain(&run.degrade_model) {
            self.models
                .check(model)
                .map_err(|e| AppError::user(format!("--model {model:?}: {e}")))?;
        }
        let mut request = ExecutionRequest::new(caller.scope.clone(), run.model.clone(), run.prompt.clone())
            .with_tools(tool_patterns(&run.tools));
        request.principal = caller.principal.clone();
        request.session = Some(
            run.session
                .clone()
                .unwrap_or_else(|| format!("run-{}", Uuid::now_v7().simple())),
        );
        request.max_turns = run.max_turns;
        request.timeout = run.timeout;
        request.budget.max_cost = run.max_cost;
        request.budget.max_tool_calls = run.max_tool_calls;
        request.degrade_model = run.degrade_model.clone();
        request.policy = self.policy.clone();
        // Every job gets a key: a watcher re-attaches through it and resumes exactly that job.
        request.idempotency_key = Some(
            run.idempotency_key
                .clone()
                .unwrap_or_else(|| format!("run-{}", Uuid::now_v7().simple())),
        );
        Ok(request)
    }

    /// Create `request` as a QUEUED job without running it here (`--detach`): the next worker
    /// claims it at once, since no lease is held.
    pub async fn enqueue(&self, request: &ExecutionRequest) -> Result<Enqueued, AppError> {
        let (job_id, created) = crate::runtime::enqueue(&self.kernel, request).await?;
        Ok(Enqueued { job_id, created })
    }

    /// Create `request` as a job and claim it here at once when it is free (the HTTP API's
    /// `POST /v1/jobs`: the job runs on this server's worker). A job that already existed under
    /// the same idempotency key is claimed only if nobody holds it (it may be running elsewhere).
    pub async fn submit(&self, request: &ExecutionRequest) -> Result<Enqueued, AppError> {
        let enqueued = self.enqueue(request).await?;
        let job = self.kernel.jobs().get(&request.scope, enqueued.job_id).await?;
        if !job.state.is_terminal() {
            self.rt.resume_job(enqueued.job_id).await.map_err(agent_error)?;
        }
        Ok(enqueued)
    }

    /// The result of one of the caller's jobs once it has ended (output, tool result, usage,
    /// error); `None` while it runs. Another scope's job is "not found".
    pub async fn job_result(&self, caller: &Caller, id: Uuid) -> Result<Option<ExecutionResult>, AppError> {
        let job = get_job(&self.kernel, caller, id).await?;
        if !job.state.is_terminal() {
            return Ok(None);
        }
        let handle = self.rt.attach(&caller.scope, id).await.map_err(agent_error)?;
        Ok(Some(handle.snapshot().await.map_err(agent_error)?))
    }

    /// Start `request` in this process (the job is leased to it). Pair with
    /// [`AgentHost::keep_running`] when nobody else may run a worker.
    pub async fn start(&self, request: ExecutionRequest) -> Result<ExecutionHandle, AppError> {
        self.rt.execute(request).await.map_err(agent_error)
    }

    /// Until `stop` or the job ends: whenever this process's loop for job `job_id` of `scope`
    /// is not running (it stopped on a store error, e.g. a database that stayed locked, and left
    /// the job RUNNING for recovery), claim the job again here once its lease is free.
    pub fn keep_running(&self, scope: &str, job_id: Uuid, stop: CancellationToken) -> tokio::task::JoinHandle<()> {
        let (rt, poll, scope) = (self.rt.clone(), self.poll, scope.to_string());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(poll) => {}
                }
                if rt.running_jobs().contains(&job_id) {
                    continue;
                }
                match rt.kernel().jobs().get(&scope, job_id).await {
                    Ok(job) if job.state.is_terminal() => return,
                    // Claimed only if its lease is free; a busy database is retried next time.
                    Ok(_) => {
                        let _ = rt.resume_job(job_id).await;
                    }
                    Err(_) => {}
                }
            }
        })
    }

    /// Wait (at most `within`) for this process's loop of `job_id` to finish, so it releases its
    /// budget holds before the process exits (a loop notices its job ended within a third of its
    /// lease).
    pub async fn wait_released(&self, job_id: Uuid, within: Duration) {
        let until = tokio::time::Instant::now() + within;
        while self.rt.running_jobs().contains(&job_id) && tokio::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Until `stop` or the job ends: keep trying to claim agent job `job_id` of `request.scope`
    /// and resume it from its journal here. Its lease frees up when a dead host's lapses, and a
    /// job waiting for an approval becomes claimable once someone answers. `note` hears what
    /// happened ("cannot resume yet: ...", "resumed in this process").
    pub fn resume_when_free(
        &self,
        job_id: Uuid,
        request: ExecutionRequest,
        stop: CancellationToken,
        note: impl Fn(ResumeNote) + Send + 'static,
    ) -> tokio::task::JoinHandle<()> {
        let (rt, poll) = (self.rt.clone(), self.poll);
        tokio::spawn(async move {
            let mut said = false;
            loop {
                if !rt.running_jobs().contains(&job_id) {
                    match rt.kernel().jobs().get(&request.scope, job_id).await {
                        Ok(j) if j.state.is_terminal() => return,
                        Ok(_) => {
                            let r = match request.idempotency_key {
                                // The key names exactly this job: no other orphan is claimed.
                                Some(_) => rt.execute(request.clone()).await.map(|_| ()),
                                None => rt.resume_orphans(rt.kernel().clock().now()).await.map(|_| ()),
                            };
                            if let Err(e) = r {
                                note(ResumeNote::NotYet(agent_error(e).message));
                            } else if rt.running_jobs().contains(&job_id) && !said {
                                note(ResumeNote::Resumed);
                                said = true;
                            }
                        }
                        Err(_) => {}
                    }
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(poll) => {}
                }
            }
        })
    }

    /// Resolves when no job of `scope` is queued, running or waiting for an approval, and this
    /// process runs none (`keel worker --until-idle`).
    pub async fn wait_idle(&self, scope: &str) {
        let filter = JobFilter {
            states: vec![JobState::Queued, JobState::Running, JobState::WaitingAction],
            ..JobFilter::tenant(scope.to_string())
        };
        loop {
            tokio::time::sleep(self.poll).await;
            if matches!(self.kernel.jobs().count(&filter).await, Ok(0)) && self.rt.running_jobs().is_empty() {
                return;
            }
        }
    }
}

/// What [`AgentHost::resume_when_free`] reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResumeNote {
    /// The job cannot be claimed yet (one sentence why).
    NotYet(String),
    /// The job now runs in this process.
    Resumed,
}

/// The agent request recorded with an agent job, its policy's text included (`None` for other
/// kinds, or an unreadable one).
pub async fn recorded_request(kernel: &Kernel, job: &Job) -> Result<Option<ExecutionRequest>, AppError> {
    let Some(mut request) = (job.kind == AGENT_JOB_KIND)
        .then(|| job.input.decode::<ExecutionRequest>().ok())
        .flatten()
    else {
        return Ok(None);
    };
    attach_policy_text(kernel.store().as_ref(), &mut request.policy)
        .await
        .map_err(AppError::from)?;
    Ok(Some(request))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_cursors_are_refused() {
        let id = Uuid::now_v7();
        let good = format!("1800000000123456.{}", id.simple());
        assert_eq!(
            decode_cursor(&good).unwrap(),
            (DateTime::from_timestamp_micros(1_800_000_000_123_456).unwrap(), id)
        );
        for bad in ["", "x", "1.", "1.not-a-uuid", "abc.0190"] {
            assert_eq!(decode_cursor(bad).unwrap_err().kind, crate::ErrorKind::User, "{bad}");
        }
    }
}
