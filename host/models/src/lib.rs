//! Model providers for Keel: the [`keel_kernel::model::ModelProvider`] implementations the agent loop calls.
//!
//! - [`OpenAiProvider`]: OpenAI-compatible Chat Completions (OpenAI, vLLM, Ollama, llama.cpp server, LiteLLM, ...).
//! - [`AnthropicProvider`]: Anthropic Messages.
//! - [`ScriptedProvider`]: canned responses from a file, for tests and the demo.
//! - [`ModelRouter`]: dispatches `provider:model` names to the providers above, built from [`ModelsConfig`].
//!
//! HTTP providers stream by default (each text fragment goes to `on_delta`), retry 429/5xx with exponential
//! backoff honouring `Retry-After`, and price usage with a [`PriceTable`].

mod anthropic;
mod config;
mod http;
mod openai;
mod price;
mod router;
mod scripted;

pub use anthropic::AnthropicProvider;
pub use config::{ApiKey, ConfigError, ModelsConfig, ProviderConfig, ProviderKind};
pub use openai::OpenAiProvider;
pub use price::PriceTable;
pub use router::ModelRouter;
pub use scripted::{Script, ScriptedProvider, ScriptedToolCall, ScriptedTurn, ScriptedUsage};

pub use keel_kernel::model::{
    FinishReason, Message, ModelDelta, ModelError, ModelPrice, ModelProvider, ModelRequest, ModelResponse, Role,
    TokenUsage, ToolCall, ToolSpec,
};
