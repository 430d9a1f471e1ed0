//! The tool host: how the kernel lists and calls tools without knowing they run in WebAssembly.
//!
//! keel-sandbox implements [`ToolHost`]; the kernel's agent loop only ever sees this trait.

use std::time::Duration;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

/// A tool as the kernel sees it: addressable as `plugin/tool`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolDescriptor {
    /// Plugin that offers the tool.
    pub plugin: String,
    /// Tool name within the plugin.
    pub name: String,
    /// What the tool does (shown to models and humans).
    pub description: String,
    /// JSON Schema of the arguments object.
    pub input_schema: serde_json::Value,
    /// JSON Schema of the output, when published.
    pub output_schema: Option<serde_json::Value>,
    /// Whether re-running an interrupted call is safe.
    pub idempotent: bool,
    /// The tool host's own deadline for one call, when it has one shorter than the agent's
    /// `tool_timeout_ms` (e.g. a plugin's sandbox limit). The loop bounds the call by the shorter
    /// of the two and extends its lease only for that, so a host that dies mid-call frees the job
    /// after the real deadline rather than the agent-wide maximum.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "opt_millis")]
    pub timeout: Option<std::time::Duration>,
}

/// `Option<Duration>` as whole milliseconds.
mod opt_millis {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&(d.as_millis() as u64)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Ok(Option::<u64>::deserialize(d)?.map(Duration::from_millis))
    }
}

impl ToolDescriptor {
    /// The fully-qualified name, `plugin/tool`.
    pub fn qualified_name(&self) -> String {
        format!("{}/{}", self.plugin, self.name)
    }
}

/// Who is calling a tool and under which deadline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolCallContext {
    /// Id of this call, and its idempotency key: in a job it is `<job id>/<step>`, the same for
    /// every (re-)run of one logical call (see the WIT `call-context.call-id`); outside a job it
    /// is unique per call.
    pub call_id: String,
    /// Job the call belongs to, if any.
    pub job_id: Option<String>,
    /// Tenant scope.
    pub scope: String,
    /// Principal on whose behalf the call runs.
    pub principal: Option<String>,
    /// Trace id for correlation.
    pub trace_id: Option<String>,
    /// Wall-clock budget for the call; the host may clamp it to its own maximum.
    pub timeout: Option<Duration>,
}

impl ToolCallContext {
    /// A context for a call outside any job (e.g. `keel call`).
    pub fn ad_hoc(scope: impl Into<String>) -> Self {
        Self {
            call_id: format!("call-{}", uuid::Uuid::now_v7().simple()),
            job_id: None,
            scope: scope.into(),
            principal: None,
            trace_id: None,
            timeout: None,
        }
    }
}

/// What a successful call returned, plus what it cost.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolOutput {
    /// The tool's JSON result.
    pub output: serde_json::Value,
    /// Wall-clock time of the call inside the host.
    pub duration: Duration,
    /// Fuel consumed, when fuel metering is on.
    pub fuel_consumed: Option<u64>,
}

/// Why a tool call failed. Every variant is something the kernel can act on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ToolError {
    /// Arguments rejected by the tool or by its schema.
    #[error("invalid input: {message}")]
    InvalidInput {
        /// Why.
        message: String,
    },
    /// The tool needed a capability that was not granted.
    #[error("denied: {message} (missing {capability} capability for `{target}`)")]
    Denied {
        /// `filesystem`, `network` or `environment`.
        capability: String,
        /// Path, host or variable.
        target: String,
        /// One sentence for a human.
        message: String,
    },
    /// The tool ran and reported failure.
    #[error("tool failed: {message}")]
    Failed {
        /// Why.
        message: String,
    },
    /// The call exceeded its deadline (the tool gave up, or the host interrupted it).
    #[error("timed out: {message}")]
    TimedOut {
        /// Details.
        message: String,
    },
    /// A resource limit was hit (memory, fuel, output size, table elements, ...).
    #[error("limit exceeded: {message}")]
    LimitExceeded {
        /// Which limit.
        limit: String,
        /// Details.
        message: String,
    },
    /// The guest trapped or panicked.
    #[error("plugin crashed: {message}")]
    Trapped {
        /// Trap description.
        message: String,
    },
    /// No such plugin or tool.
    #[error("unknown tool `{tool}`")]
    UnknownTool {
        /// The name that was asked for.
        tool: String,
    },
    /// The host itself failed (I/O, cache, ...).
    #[error("host error: {message}")]
    Host {
        /// Details.
        message: String,
    },
}

impl ToolError {
    /// Stable machine-readable code for ledgers, events and exit codes.
    pub fn code(&self) -> &'static str {
        match self {
            ToolError::InvalidInput { .. } => "invalid_input",
            ToolError::Denied { .. } => "denied",
            ToolError::Failed { .. } => "failed",
            ToolError::TimedOut { .. } => "timed_out",
            ToolError::LimitExceeded { .. } => "limit_exceeded",
            ToolError::Trapped { .. } => "trapped",
            ToolError::UnknownTool { .. } => "unknown_tool",
            ToolError::Host { .. } => "host",
        }
    }
}

/// Lists and calls tools. Implemented by keel-sandbox; tests may implement it in memory.
pub trait ToolHost: Send + Sync {
    /// Every tool currently callable, across all installed plugins.
    fn list_tools(&self) -> BoxFuture<'_, Result<Vec<ToolDescriptor>, ToolError>>;

    /// Call `tool` (`plugin/tool`) with JSON `arguments` in a fresh sandbox.
    fn call_tool<'a>(
        &'a self,
        ctx: &'a ToolCallContext,
        tool: &'a str,
        arguments: &'a serde_json::Value,
    ) -> BoxFuture<'a, Result<ToolOutput, ToolError>>;
}
