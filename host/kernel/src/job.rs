//! Jobs: the unit of durable work, and their state machine.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::json::JsonText;

/// Lifecycle state of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum JobState {
    /// Created, not yet picked up.
    Queued,
    /// Being worked on.
    Running,
    /// Blocked on a human action.
    WaitingAction,
    /// Finished successfully (terminal).
    Succeeded,
    /// Finished with an error (terminal).
    Failed,
    /// Cancelled (terminal).
    Cancelled,
    /// Ran past its deadline or its action expired (terminal).
    TimedOut,
}

impl JobState {
    /// All states, in lifecycle order.
    pub const ALL: [JobState; 7] = [
        JobState::Queued,
        JobState::Running,
        JobState::WaitingAction,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Cancelled,
        JobState::TimedOut,
    ];

    /// Whether no transition leaves this state.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled | JobState::TimedOut
        )
    }

    /// The legal-transition table.
    pub fn can_transition_to(self, to: JobState) -> bool {
        use JobState::*;
        matches!(
            (self, to),
            (Queued, Running | Failed | Cancelled | TimedOut)
                | (Running, WaitingAction | Succeeded | Failed | Cancelled | TimedOut)
                | (WaitingAction, Running | Failed | Cancelled | TimedOut)
        )
    }

    /// The stored name, e.g. `WAITING_ACTION`.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "QUEUED",
            JobState::Running => "RUNNING",
            JobState::WaitingAction => "WAITING_ACTION",
            JobState::Succeeded => "SUCCEEDED",
            JobState::Failed => "FAILED",
            JobState::Cancelled => "CANCELLED",
            JobState::TimedOut => "TIMED_OUT",
        }
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // `pad`, not `write_str`: tables give it a width (`{:<14}`).
        f.pad(self.as_str())
    }
}

/// A string that is not a job state.
#[derive(Debug, thiserror::Error)]
#[error("unknown job state {0:?}")]
pub struct UnknownJobState(pub String);

impl FromStr for JobState {
    type Err = UnknownJobState;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        JobState::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| UnknownJobState(s.to_string()))
    }
}

/// Why a job failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobError {
    /// Machine-readable code, e.g. `tool_failed`, `deadline_exceeded`.
    pub code: String,
    /// Human-readable message.
    pub message: String,
}

/// A job as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    /// Unique id (UUIDv7: time-ordered).
    pub id: Uuid,
    /// Tenant scope.
    pub tenant: String,
    /// Principal the job runs for.
    pub principal: Option<String>,
    /// Session the job belongs to.
    pub session: Option<String>,
    /// Run the job belongs to.
    pub run_id: Option<Uuid>,
    /// Parent job, for child jobs.
    pub parent_id: Option<Uuid>,
    /// What kind of work this is (e.g. `agent`, `tool`, an operator name).
    pub kind: String,
    /// Current state.
    pub state: JobState,
    /// Optimistic-concurrency version; incremented by every write.
    pub version: u64,
    /// Idempotency key, unique per tenant.
    pub idempotency_key: Option<String>,
    /// sha256 of the canonical request the idempotency key was first used with: the key attaches
    /// only a request with the same hash (`None` on jobs stored before it was recorded).
    #[serde(default)]
    pub request_hash: Option<String>,
    /// Input of the job (fixed at insert; shared, so copies of the row do not copy it).
    pub input: JsonText,
    /// Progress in `[0, 1]`.
    pub progress: f64,
    /// Last progress message.
    pub progress_message: Option<String>,
    /// Agent turns taken.
    pub turns: u32,
    /// Tool calls the job made that ended with their result (a tool error included). Not
    /// counted: calls refused before they ran (policy, budget, invalid input), and attempts
    /// interrupted (their host died) or stopped (cancelled) mid-call, which the ledger charges as
    /// one tool call each: the ledger is what budgets and `keel ledger usage` count.
    pub tool_calls: u32,
    /// Past this instant the sweeper times the job out.
    pub deadline: Option<DateTime<Utc>>,
    /// Error, once failed or timed out.
    pub error: Option<JobError>,
    /// Reference to the result (artifact id, URI, or inline JSON pointer).
    pub result_ref: Option<String>,
    /// Tags for filtering.
    pub tags: Vec<String>,
    /// Free-form metadata (the serialized execution context lives here under `context`; shared,
    /// so copies of the row do not copy it).
    pub metadata: JsonText,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// Last write.
    pub updated_at: DateTime<Utc>,
    /// When it first ran.
    pub started_at: Option<DateTime<Utc>>,
    /// When it reached a terminal state.
    pub finished_at: Option<DateTime<Utc>>,
}

impl Job {
    /// Take from `stored` (this job's row before an update) what an update never changes: its
    /// tenant, principal, session, run, parent, kind, idempotency key and request hash, input and
    /// creation time, which are fixed when the job is inserted. Stores write only the rest (its
    /// state, progress, counters, deadline, outcome, tags, metadata and times).
    pub fn keep_fixed_fields(&mut self, stored: Job) {
        self.tenant = stored.tenant;
        self.principal = stored.principal;
        self.session = stored.session;
        self.run_id = stored.run_id;
        self.parent_id = stored.parent_id;
        self.kind = stored.kind;
        self.idempotency_key = stored.idempotency_key;
        self.request_hash = stored.request_hash;
        self.input = stored.input;
        self.created_at = stored.created_at;
    }

    /// The row of a new QUEUED job (version 1, a fresh id) for `new`; `request_hash` is the hash
    /// of the request behind its idempotency key, if it has one.
    pub fn queued(new: NewJob, request_hash: Option<String>, now: DateTime<Utc>) -> Job {
        Job {
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
            request_hash,
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
        }
    }

    /// The execution context checkpointed by [`NewJob::from_context`], bound to this job (with
    /// a fresh cancellation token), if there is one.
    pub fn context(&self) -> Option<crate::context::ExecutionContext> {
        #[derive(Deserialize)]
        struct Checkpoint {
            context: Option<crate::context::ExecutionContext>,
        }
        let ctx = self.metadata.decode::<Checkpoint>().ok()?.context?;
        Some(ctx.with_job(self.id))
    }
}

/// What a caller supplies to create a job.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NewJob {
    /// Tenant scope.
    pub tenant: String,
    /// Principal.
    pub principal: Option<String>,
    /// Session.
    pub session: Option<String>,
    /// Run.
    pub run_id: Option<Uuid>,
    /// Parent job.
    pub parent_id: Option<Uuid>,
    /// Kind of work.
    pub kind: String,
    /// Idempotency key: creating twice with the same key returns the first job (if the request
    /// is the same; a different request with a used key is an error).
    pub idempotency_key: Option<String>,
    /// What identifies the request behind the key (hashed and stored with the job); default:
    /// kind, principal, parent and input. Callers whose input carries per-attempt noise (a fresh
    /// session id) set their own.
    pub request_fingerprint: Option<serde_json::Value>,
    /// Input.
    pub input: JsonText,
    /// Deadline.
    pub deadline: Option<DateTime<Utc>>,
    /// Tags.
    pub tags: Vec<String>,
    /// Metadata.
    pub metadata: JsonText,
    /// The policy text `input` names by sha256 instead of carrying it, stored with the job (see
    /// [`crate::policy::PolicyText`]).
    #[serde(skip)]
    pub policy_text: Option<crate::policy::PolicyText>,
}

impl NewJob {
    /// A job of `kind` in `tenant`, everything else empty.
    pub fn new(tenant: impl Into<String>, kind: impl Into<String>) -> Self {
        Self {
            tenant: tenant.into(),
            kind: kind.into(),
            ..Default::default()
        }
    }

    /// Take tenant, principal, session and run from a context, and checkpoint the context
    /// itself in `metadata.context` (read it back with [`Job::context`]).
    pub fn from_context(ctx: &crate::context::ExecutionContext, kind: impl Into<String>) -> Self {
        Self {
            tenant: ctx.tenant.clone(),
            principal: ctx.principal.clone(),
            session: ctx.session.clone(),
            run_id: Some(ctx.run_id),
            kind: kind.into(),
            metadata: context_metadata(ctx),
            ..Default::default()
        }
    }
}

/// `{"context": ctx}`: the metadata [`NewJob::from_context`] checkpoints, serialised once.
fn context_metadata(ctx: &crate::context::ExecutionContext) -> JsonText {
    #[derive(Serialize)]
    struct Checkpoint<'a> {
        context: &'a crate::context::ExecutionContext,
    }
    JsonText::of(&Checkpoint { context: ctx }).expect("an execution context serialises")
}

/// Filters for listing and counting jobs. The tenant is mandatory: tenants never see each other.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct JobFilter {
    /// Tenant scope.
    pub tenant: String,
    /// Only these states (any if empty).
    pub states: Vec<JobState>,
    /// Only this principal.
    pub principal: Option<String>,
    /// Only this session.
    pub session: Option<String>,
    /// Only children of this job.
    pub parent_id: Option<Uuid>,
    /// Only this kind.
    pub kind: Option<String>,
    /// Only jobs carrying this tag.
    pub tag: Option<String>,
    /// At most this many (list only; newest first).
    pub limit: Option<u32>,
    /// Only jobs that come after this position in the newest-first order, i.e. created before
    /// `(created_at, id)`: the seek position of a page (a cursor names the last job it showed).
    pub before: Option<(DateTime<Utc>, Uuid)>,
}

impl JobFilter {
    /// All jobs of `tenant`.
    pub fn tenant(tenant: impl Into<String>) -> Self {
        Self {
            tenant: tenant.into(),
            ..Default::default()
        }
    }

    /// Whether `job` passes the filter (ignores `limit`). In-memory stores use this directly.
    pub fn matches(&self, job: &Job) -> bool {
        job.tenant == self.tenant
            && (self.states.is_empty() || self.states.contains(&job.state))
            && self
                .principal
                .as_ref()
                .is_none_or(|p| job.principal.as_ref() == Some(p))
            && self.session.as_ref().is_none_or(|s| job.session.as_ref() == Some(s))
            && self.parent_id.is_none_or(|p| job.parent_id == Some(p))
            && self.kind.as_ref().is_none_or(|k| &job.kind == k)
            && self.tag.as_ref().is_none_or(|t| job.tags.contains(t))
            && self.before.is_none_or(|before| (job.created_at, job.id) < before)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A state is printed in tables (`keel jobs list`): `{:<14}` must pad it.
    #[test]
    fn a_state_honours_width_and_alignment() {
        assert_eq!(format!("{:<10}|", JobState::Failed), "FAILED    |");
        assert_eq!(format!("{:>10}|", JobState::Running), "   RUNNING|");
        let action = crate::action::ActionState::Pending;
        assert_eq!(format!("{action:<9}|"), "PENDING  |");
        let kind = crate::action::ActionType::Approval;
        assert_eq!(format!("{kind:<13}|").len(), 14);
    }

    #[test]
    fn transition_table() {
        use JobState::*;
        assert!(Queued.can_transition_to(Running));
        assert!(Running.can_transition_to(WaitingAction));
        assert!(WaitingAction.can_transition_to(Running));
        assert!(!Queued.can_transition_to(Succeeded));
        assert!(!Queued.can_transition_to(WaitingAction));
        for terminal in [Succeeded, Failed, Cancelled, TimedOut] {
            assert!(terminal.is_terminal());
            for to in JobState::ALL {
                assert!(!terminal.can_transition_to(to), "{terminal} -> {to}");
            }
        }
        for st in JobState::ALL {
            assert_eq!(st.as_str().parse::<JobState>().unwrap(), st);
            assert!(!st.can_transition_to(st), "self-transition {st}");
        }
    }
}
