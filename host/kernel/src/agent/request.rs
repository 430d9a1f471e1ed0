//! What a caller asks the agent loop to do, what it gets back, and the loop's configuration.

use std::collections::BTreeMap;
use std::time::Duration;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::context::{BudgetSpec, PolicyRef};
use crate::error::KernelError;
use crate::job::{JobError, JobState};
use crate::model::Message;

/// One agent execution. Stored as the job's input, so a resumed job runs the same request.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ExecutionRequest {
    /// The user's prompt (appended as a user message after `messages`).
    pub prompt: Option<String>,
    /// Conversation so far (e.g. a system message, earlier turns).
    pub messages: Vec<Message>,
    /// Scope (tenant).
    pub scope: String,
    /// Principal the job runs for.
    pub principal: Option<String>,
    /// Session (also the key of "approve for this session").
    pub session: Option<String>,
    /// Tools the model may call: `plugin/tool` names or glob patterns (`fs/*`, `*`).
    pub tools: Vec<String>,
    /// Model name as the provider (router) knows it, e.g. `openai:gpt-4o-mini`.
    pub model: String,
    /// Policy the run is evaluated under (recorded; the host's loaded policy is applied).
    pub policy: PolicyRef,
    /// Limits of this run: tokens, cost, tool calls (turns and runtime: see below).
    pub budget: BudgetSpec,
    /// Maximum model turns (default: `AgentConfig::default_max_turns`; `budget.max_turns` also applies).
    pub max_turns: Option<u32>,
    /// Output-token cap per model call (default: `AgentConfig::default_max_tokens`).
    pub max_tokens: Option<u32>,
    /// Sampling temperature.
    pub temperature: Option<f32>,
    /// Cheaper model to switch to when a budget with the `degrade` strategy is exceeded (without it,
    /// a degrade verdict only records a warning in the ledger).
    pub degrade_model: Option<String>,
    /// Wall-clock limit of the whole job; past it the job is TIMED_OUT (`budget.max_runtime_ms` also applies).
    pub timeout: Option<Duration>,
    /// Idempotency key: executing again with the same key in the scope attaches to the first job.
    pub idempotency_key: Option<String>,
    /// Free-form metadata, stored with the job.
    pub metadata: BTreeMap<String, serde_json::Value>,
    /// A direct tool call instead of a model conversation: the job's only step is this call,
    /// governed like an agent's (see [`crate::AgentRuntime::call_tool`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub call: Option<DirectCall>,
}

/// One tool call asked for directly (not chosen by a model).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DirectCall {
    /// `plugin/tool`.
    pub tool: String,
    /// The arguments object.
    pub arguments: serde_json::Value,
}

impl ExecutionRequest {
    /// A request to run `prompt` with `model` in `scope`, everything else default.
    pub fn new(scope: impl Into<String>, model: impl Into<String>, prompt: impl Into<String>) -> Self {
        Self {
            scope: scope.into(),
            model: model.into(),
            prompt: Some(prompt.into()),
            ..Self::default()
        }
    }

    /// Allow tools matching `patterns`.
    pub fn with_tools<I, S>(mut self, patterns: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.tools = patterns.into_iter().map(Into::into).collect();
        self
    }

    /// The conversation the first model call sees.
    pub fn initial_messages(&self) -> Vec<Message> {
        let mut messages = self.messages.clone();
        if let Some(p) = &self.prompt {
            messages.push(Message::user(p.clone()));
        }
        messages
    }

    /// The effective turn limit.
    pub fn turn_limit(&self, config: &AgentConfig) -> u32 {
        let mut limit = self.max_turns.unwrap_or(config.default_max_turns);
        if let Some(b) = self.budget.max_turns {
            limit = limit.min(b);
        }
        limit
    }

    /// The effective runtime limit.
    pub fn runtime_limit(&self) -> Option<Duration> {
        let from_budget = self.budget.max_runtime_ms.map(Duration::from_millis);
        match (self.timeout, from_budget) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// Tokens, cost and calls of one execution.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ExecutionUsage {
    /// Prompt tokens over all model calls.
    pub input_tokens: u64,
    /// Completion tokens over all model calls.
    pub output_tokens: u64,
    /// Total model cost.
    pub cost: Decimal,
    /// Model calls.
    pub model_calls: u64,
    /// Tool calls actually executed.
    pub tool_calls: u64,
}

/// The outcome of an execution.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExecutionResult {
    /// Job id.
    pub job_id: uuid::Uuid,
    /// Final state: SUCCEEDED, FAILED, CANCELLED or TIMED_OUT.
    pub status: JobState,
    /// The model's final answer (SUCCEEDED only).
    pub content: Option<String>,
    /// Usage.
    pub usage: ExecutionUsage,
    /// Model turns taken.
    pub turns: u32,
    /// Artifacts produced (references; none are produced by the loop itself yet).
    pub artifacts: Vec<serde_json::Value>,
    /// Why it did not succeed (`budget_exceeded`, `max_turns`, `policy_denied`, `model_error`,
    /// `deadline_exceeded`, `cancelled`, `action_expired`, ...).
    pub error: Option<JobError>,
    /// For a direct tool call: its outcome (output or error, and its receipt).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_result: Option<crate::journal::ToolResult>,
}

/// Tunables of the agent loop. Names match the `[agent]` config section and CLI flags; an unknown
/// key is an error (a typo must not silently leave the default in force).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    /// This host's lease-owner id (default: `host-<random>`). Must differ between processes.
    pub worker_id: Option<String>,
    /// Job lease lifetime in milliseconds; renewed every third of it while the job runs here.
    /// A crashed host's jobs are resumed elsewhere once it lapses.
    pub lease_ttl_ms: u64,
    /// Turn limit when the request sets none.
    pub default_max_turns: u32,
    /// Output-token cap per model call when the request sets none.
    pub default_max_tokens: u32,
    /// Per-tool-call wall-clock limit in milliseconds (the tool host may clamp it further).
    pub tool_timeout_ms: u64,
    /// A direct call made in one commit (a tool safe to re-run, no budget in force), whose job is
    /// otherwise stored only when it ends, that is still running after this many milliseconds
    /// has its start committed then: `keel jobs list`, the HTTP API and other processes see it
    /// RUNNING, and `keel jobs cancel` can end it. Short calls keep their single commit.
    pub store_running_call_after_ms: u64,
    /// How long an approval request stays valid, in seconds.
    pub approval_ttl_secs: i64,
    /// How often waiting approvals, the worker and `result()` re-read the store, in milliseconds
    /// (catches resolutions made by another process on the same database).
    pub poll_ms: u64,
    /// Jobs claimed per `resume_orphans` pass.
    pub claim_batch: u32,
    /// At most this many jobs run on this host at once (0: no limit); `resume_orphans` claims
    /// only up to it. `keel worker --max-jobs` overrides it.
    pub max_concurrent_jobs: u32,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            worker_id: None,
            lease_ttl_ms: 30_000,
            default_max_turns: 16,
            default_max_tokens: 1024,
            tool_timeout_ms: 60_000,
            store_running_call_after_ms: 1000,
            approval_ttl_secs: 24 * 3600,
            poll_ms: 500,
            claim_batch: 64,
            max_concurrent_jobs: 0,
        }
    }
}

impl AgentConfig {
    /// Longest lease, tool deadline and poll interval accepted: a day.
    pub const MAX_MS: u64 = 86_400_000;
    /// Longest approval validity accepted: ten years.
    pub const MAX_APPROVAL_TTL_SECS: i64 = 10 * 365 * 86_400;

    /// Why these values cannot work, naming the key (`[agent]` in `config.toml`); checked where
    /// they are read, since a value outside these ranges fails later and far from its cause (an
    /// approval TTL of 0 creates no action, so a gated call waits for ever; a huge one overflows
    /// the clock arithmetic).
    pub fn check(&self) -> Result<(), String> {
        for (key, value) in [
            ("lease_ttl_ms", self.lease_ttl_ms),
            ("tool_timeout_ms", self.tool_timeout_ms),
            ("poll_ms", self.poll_ms),
            ("store_running_call_after_ms", self.store_running_call_after_ms),
        ] {
            if !(1..=Self::MAX_MS).contains(&value) {
                return Err(format!(
                    "`{key}` is {value}: it must be from 1 to {} (a day)",
                    Self::MAX_MS
                ));
            }
        }
        if !(1..=Self::MAX_APPROVAL_TTL_SECS).contains(&self.approval_ttl_secs) {
            return Err(format!(
                "`approval_ttl_secs` is {}: it must be from 1 to {} (ten years)",
                self.approval_ttl_secs,
                Self::MAX_APPROVAL_TTL_SECS
            ));
        }
        if self.default_max_turns == 0 {
            return Err("`default_max_turns` is 0: no job could make a model call".into());
        }
        Ok(())
    }
}

/// Errors of the agent API (the loop's own failures end the job instead; see [`ExecutionResult::error`]).
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The request is malformed.
    #[error("invalid execution request: {0}")]
    Invalid(String),
    /// A kernel operation failed.
    #[error(transparent)]
    Kernel(#[from] KernelError),
}

impl From<crate::store::StoreError> for AgentError {
    fn from(e: crate::store::StoreError) -> Self {
        AgentError::Kernel(e.into())
    }
}

#[cfg(test)]
mod tests {
    use super::AgentConfig;
    use crate::KernelConfig;
    use crate::model::ModelPrice;

    /// A typo in a config section is an error naming the key, never a silently kept default.
    #[test]
    fn config_sections_refuse_unknown_keys() {
        let agent = toml::from_str::<AgentConfig>("lease_tll_ms = 5")
            .unwrap_err()
            .to_string();
        assert!(agent.contains("`lease_tll_ms`"), "{agent}");
        let kernel = toml::from_str::<KernelConfig>("hold_ttl = 5").unwrap_err().to_string();
        assert!(kernel.contains("`hold_ttl`"), "{kernel}");
        let price = toml::from_str::<ModelPrice>("input_per_mtok = \"1\"\noutput_per_mtok = \"1\"\ncached = \"1\"")
            .unwrap_err()
            .to_string();
        assert!(price.contains("`cached`"), "{price}");
        let agent: AgentConfig = toml::from_str("lease_ttl_ms = 5").unwrap();
        assert_eq!(agent.lease_ttl_ms, 5);
        let kernel: KernelConfig = toml::from_str("hold_ttl_secs = 5").unwrap();
        assert_eq!(kernel.hold_ttl_secs, 5);
    }
}
