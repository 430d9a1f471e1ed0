//! The model provider contract: how the agent loop talks to an LLM without knowing its wire format.
//!
//! keel-models implements [`ModelProvider`] for OpenAI-compatible Chat Completions, Anthropic
//! Messages and a scripted provider; a router dispatches `provider:model` names. Messages and tool
//! calls here are provider-neutral; each provider maps them to and from its own JSON.

use futures::future::BoxFuture;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

/// Who wrote a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Instructions.
    System,
    /// The human (or calling agent).
    User,
    /// The model.
    Assistant,
    /// A tool result, answering one tool call.
    Tool,
}

/// A tool call requested by the model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolCall {
    /// Provider-assigned id, echoed back in the tool result message.
    pub id: String,
    /// The model-facing tool name (see [`ToolSpec::name`]).
    pub name: String,
    /// Parsed JSON arguments (an object; malformed model output becomes a string value).
    pub arguments: serde_json::Value,
}

/// One conversation message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    /// Author.
    pub role: Role,
    /// Text content (may be empty for an assistant message that only calls tools).
    #[serde(default)]
    pub content: String,
    /// Tool calls (assistant messages only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// The call this message answers (tool messages only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl Message {
    /// A system message.
    pub fn system(content: impl Into<String>) -> Self {
        Self {
            role: Role::System,
            content: content.into(),
            tool_calls: vec![],
            tool_call_id: None,
        }
    }

    /// A user message.
    pub fn user(content: impl Into<String>) -> Self {
        Self {
            role: Role::User,
            content: content.into(),
            tool_calls: vec![],
            tool_call_id: None,
        }
    }

    /// An assistant message.
    pub fn assistant(content: impl Into<String>, tool_calls: Vec<ToolCall>) -> Self {
        Self {
            role: Role::Assistant,
            content: content.into(),
            tool_calls,
            tool_call_id: None,
        }
    }

    /// A tool result answering `call_id`.
    pub fn tool(call_id: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: Role::Tool,
            content: content.into(),
            tool_calls: vec![],
            tool_call_id: Some(call_id.into()),
        }
    }
}

/// A tool offered to the model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolSpec {
    /// Model-facing name: `[a-zA-Z0-9_-]{1,64}` (providers reject `/`), e.g. `hello__greet` for
    /// the Keel tool `hello/greet`. The agent loop keeps the mapping.
    pub name: String,
    /// Description.
    pub description: String,
    /// JSON Schema of the arguments object.
    pub parameters: serde_json::Value,
}

/// One completion request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelRequest {
    /// Model name as the provider knows it (no `provider:` prefix once routed).
    pub model: String,
    /// The conversation so far.
    pub messages: Vec<Message>,
    /// Tools the model may call.
    #[serde(default)]
    pub tools: Vec<ToolSpec>,
    /// Upper bound on output tokens.
    pub max_tokens: Option<u32>,
    /// Sampling temperature.
    pub temperature: Option<f32>,
}

/// Why the model stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// A final answer.
    Stop,
    /// It wants tool calls run.
    ToolCalls,
    /// It hit `max_tokens`.
    Length,
    /// Refused by the provider's filter.
    ContentFilter,
    /// Anything else.
    Other,
}

/// Tokens used by one completion, and their cost.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TokenUsage {
    /// Prompt tokens.
    pub input_tokens: u64,
    /// Completion tokens.
    pub output_tokens: u64,
    /// Cost from the provider's price table (zero when the model is unpriced).
    pub cost: Decimal,
}

/// A completed model response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelResponse {
    /// The assistant message (text and/or tool calls).
    pub message: Message,
    /// Why it stopped.
    pub finish_reason: FinishReason,
    /// Usage and cost.
    pub usage: TokenUsage,
    /// The model that actually answered, as reported by the provider.
    pub model: String,
}

/// A piece of a streamed response, delivered while the completion runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "text", rename_all = "snake_case")]
pub enum ModelDelta {
    /// Answer text.
    Token(String),
    /// Reasoning text (providers that expose it).
    Reasoning(String),
}

/// Price of a model per million tokens (`[models.prices.MODEL]` in the config file: an unknown key
/// is an error).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelPrice {
    /// Per million input tokens.
    pub input_per_mtok: Decimal,
    /// Per million output tokens.
    pub output_per_mtok: Decimal,
}

impl ModelPrice {
    /// Cost of `input` + `output` tokens.
    pub fn cost(&self, input: u64, output: u64) -> Decimal {
        (self.input_per_mtok * Decimal::from(input) + self.output_per_mtok * Decimal::from(output))
            / Decimal::from(1_000_000u64)
    }
}

/// Why a completion failed. Retries of transient failures happen inside the provider; what
/// reaches the kernel is final.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ModelError {
    /// Missing or rejected API key.
    #[error("authentication failed: {message}")]
    Auth {
        /// Details (never the key).
        message: String,
    },
    /// The provider does not know the model, or no provider matches the name.
    #[error("unknown model `{model}`: {message}")]
    UnknownModel {
        /// The name asked for.
        model: String,
        /// Details.
        message: String,
    },
    /// Still rate-limited after retries.
    #[error("rate limited: {message}")]
    RateLimited {
        /// Details.
        message: String,
    },
    /// No answer in time (after retries).
    #[error("model call timed out: {message}")]
    Timeout {
        /// Details.
        message: String,
    },
    /// The request was rejected as invalid (HTTP 400 and friends).
    #[error("the provider rejected the request: {message}")]
    InvalidRequest {
        /// Details.
        message: String,
    },
    /// Server-side failure after retries, or a transport failure.
    #[error("the provider failed: {message}")]
    Unavailable {
        /// Details.
        message: String,
    },
    /// The response could not be understood.
    #[error("invalid response from the provider: {message}")]
    InvalidResponse {
        /// Details.
        message: String,
    },
}

/// A model provider. Implementations must be cancel-safe: dropping the future abandons the call.
pub trait ModelProvider: Send + Sync {
    /// Run one completion; streamed text is passed to `on_delta` as it arrives.
    fn complete<'a>(
        &'a self,
        request: &'a ModelRequest,
        on_delta: &'a (dyn Fn(ModelDelta) + Send + Sync),
    ) -> BoxFuture<'a, Result<ModelResponse, ModelError>>;

    /// The price of `model`, used to reserve the worst-case cost before a call. `None` = unpriced.
    fn price(&self, model: &str) -> Option<ModelPrice>;

    /// Whether `model` can be called at all (it routes to a provider, which has its credentials),
    /// without calling it: lets a front end refuse a job up front instead of failing it later.
    fn check(&self, model: &str) -> Result<(), ModelError> {
        let _ = model;
        Ok(())
    }
}
