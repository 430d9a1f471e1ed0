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
    /// Whether re-running an interrupted call is safe, as the plugin claims.
    pub idempotent: bool,
    /// Whether the tool's grants let a call change nothing outside its sandbox: no writable
    /// directory (a fresh per-call scratch directory is not one) and no network. The host sets
    /// it from what the user granted; a plugin cannot claim it. A call that cannot change
    /// anything cannot repeat an effect when it is run again, so the kernel treats it as
    /// idempotent ([`rerun_safe`](Self::rerun_safe)) and need not put its start on disk before it
    /// runs; it then sets [`ToolCallContext::effect_free`], and the host refuses the call if the
    /// grants changed since.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub effect_free: bool,
    /// The tool host's own deadline for one call, when it has one shorter than the agent's
    /// `tool_timeout_ms` (e.g. a plugin's sandbox limit). The loop bounds the call by the shorter
    /// of the two and extends its lease only for that, so a host that dies mid-call frees the job
    /// after the real deadline rather than the agent-wide maximum.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "opt_millis")]
    pub timeout: Option<std::time::Duration>,
    /// For a tool offered under an alias (`python/run`), the `plugin/tool` it stands for
    /// (`python-exec/run`): policy rules on either name apply to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stands_for: Option<String>,
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
    /// Whether a call interrupted by a host's death may be run again without asking anyone:
    /// the plugin says so, or its grants let it change nothing.
    pub fn rerun_safe(&self) -> bool {
        self.idempotent || self.effect_free
    }

    /// The fully-qualified name, `plugin/tool`.
    pub fn qualified_name(&self) -> String {
        format!("{}/{}", self.plugin, self.name)
    }

    /// Whether `qualified` (`plugin/tool`) names this tool (without building its qualified name).
    pub fn is_named(&self, qualified: &str) -> bool {
        qualified
            .strip_prefix(self.plugin.as_str())
            .and_then(|rest| rest.strip_prefix('/'))
            .is_some_and(|name| name == self.name)
    }
}

/// Why a host refuses a call that relied on the tool being effect-free
/// ([`ToolCallContext::effect_free`]) when its grants now allow an effect.
pub const GRANTS_CHANGED: &str =
    "the plugin's grants changed while the call was starting (it may now have effects): call it again";

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
    /// The caller relied on the tool being [effect-free](ToolDescriptor::effect_free) (it did
    /// not put the call's start on disk first, or it re-runs an interrupted call without
    /// asking): the host must refuse to run the call under grants that allow an effect, as they
    /// do when they changed since the tool was described.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub effect_free: bool,
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
            effect_free: false,
        }
    }
}

/// What one tool call cost, measured by the tool host: the per-call receipt recorded with the
/// call's ledger entry (`data.receipt`), shown by `keel call --json` and `keel ledger usage --json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    /// Wall-clock time of the call inside the tool host, in microseconds.
    pub wall_us: u64,
    /// Fuel consumed, when fuel metering is on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fuel: Option<u64>,
    /// Peak linear memory of the call (all its memories together), in bytes.
    pub peak_memory_bytes: u64,
    /// Bytes of the tool's JSON output.
    pub output_bytes: u64,
    /// Bytes the tool logged (kept lines).
    pub log_bytes: u64,
    /// Bytes written to granted HTTP connections (headers, bodies and TLS, as on the socket).
    pub http_bytes_sent: u64,
    /// Bytes read from granted HTTP connections.
    pub http_bytes_received: u64,
    /// Bytes of the guest's stdout the host took: kept (up to `max_stdio_bytes`), or streamed
    /// to the caller (up to `max_output_bytes`).
    #[serde(default)]
    pub stdout_bytes: u64,
    /// Bytes of the guest's stderr the host took, as [`stdout_bytes`](Self::stdout_bytes).
    #[serde(default)]
    pub stderr_bytes: u64,
}

/// The outcome of one tool call: its result and its receipt (a failed call has a receipt too).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolOutcome {
    /// The tool's JSON result, or why there is none.
    pub result: Result<serde_json::Value, ToolError>,
    /// What the call cost.
    pub receipt: Receipt,
    /// What the tool said on the side (logs, refused capabilities, stderr).
    pub diagnostics: Diagnostics,
}

/// What a tool said besides its result. Plugin text: hostile when printed (escape it).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Diagnostics {
    /// Lines the plugin logged (capped by its limits).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub logs: Vec<LogRecord>,
    /// True when log lines were dropped.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub logs_truncated: bool,
    /// Capabilities the host refused during the call.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub denials: Vec<Denial>,
    /// The guest's stdout (capped), lossily decoded: what a tool printed besides its result.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub stdout: String,
    /// The guest's stderr (capped), lossily decoded.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub stderr: String,
}

impl Diagnostics {
    /// Nothing was said.
    pub fn is_empty(&self) -> bool {
        self.logs.is_empty()
            && !self.logs_truncated
            && self.denials.is_empty()
            && self.stdout.is_empty()
            && self.stderr.is_empty()
    }
}

/// Severity of a plugin log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    /// Trace.
    Trace,
    /// Debug.
    Debug,
    /// Info.
    Info,
    /// Warn.
    Warn,
    /// Error.
    Error,
}

/// One line a plugin logged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogRecord {
    /// Severity.
    pub level: LogLevel,
    /// Message (truncated to 4 KiB).
    pub message: String,
}

/// A capability the host refused during a call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Denial {
    /// `network` (filesystem refusals happen inside WASI and reach the guest as error codes).
    pub capability: String,
    /// The host (and port) that was refused.
    pub target: String,
    /// Why.
    pub reason: String,
    /// The `keel plugins grant` flag that would allow it (`--allow-net HOST:PORT`,
    /// `--allow-private-network`), decided by the host that refused; `None` when no grant would
    /// (a limit, a special file). Absent in records written before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant: Option<String>,
}

impl ToolOutcome {
    /// An outcome with no measured cost (the call never reached a sandbox).
    pub fn unrun(error: ToolError) -> Self {
        Self {
            result: Err(error),
            receipt: Receipt::default(),
            diagnostics: Diagnostics::default(),
        }
    }
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

    /// The descriptor of `tool` (`plugin/tool`) as tenant `scope` sees it, `None` if no such tool
    /// is callable by that scope (a host whose plugins belong to scopes refuses another scope's
    /// here, before the kernel validates arguments, checks policy or asks for an approval). The
    /// governed call path asks this once per call; the default lists every tool and keeps the
    /// one, so a host that can look a tool up by name should say so here.
    fn tool<'a>(&'a self, tool: &'a str, scope: &'a str) -> BoxFuture<'a, Result<Option<ToolDescriptor>, ToolError>> {
        let _ = scope;
        Box::pin(async move {
            let tools = self.list_tools().await?;
            Ok(tools.into_iter().find(|t| t.is_named(tool)))
        })
    }

    /// Call `tool` (`plugin/tool`) with JSON `arguments` in a fresh sandbox.
    fn call_tool<'a>(
        &'a self,
        ctx: &'a ToolCallContext,
        tool: &'a str,
        arguments: &'a serde_json::Value,
    ) -> BoxFuture<'a, ToolOutcome>;
}

#[cfg(test)]
mod tests {
    use super::ToolDescriptor;

    fn desc(plugin: &str, name: &str) -> ToolDescriptor {
        ToolDescriptor {
            plugin: plugin.into(),
            name: name.into(),
            description: String::new(),
            input_schema: serde_json::json!({}),
            output_schema: None,
            idempotent: false,
            effect_free: false,
            timeout: None,
            stands_for: None,
        }
    }

    /// `is_named` agrees with comparing `qualified_name()`, which it replaces on the call path.
    #[test]
    fn is_named_is_qualified_name_equality() {
        let cases = [("p", "echo"), ("a/b", "c"), ("a", "b/c"), ("", "x"), ("p", "")];
        let names = [
            "p/echo", "p/ech", "p/echo2", "pecho", "a/b/c", "a/b", "/x", "x", "p/", "p",
        ];
        for (plugin, name) in cases {
            let d = desc(plugin, name);
            for q in names {
                assert_eq!(d.is_named(q), d.qualified_name() == q, "{plugin:?} {name:?} vs {q:?}");
            }
        }
    }
}
