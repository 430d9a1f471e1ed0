//! OpenAI-compatible Chat Completions: OpenAI, vLLM, Ollama, llama.cpp server, LiteLLM, ...

use std::collections::BTreeMap;
use std::fmt;

use futures::future::BoxFuture;
use keel_kernel::model::{
    FinishReason, Message, ModelDelta, ModelError, ModelPrice, ModelProvider, ModelRequest, ModelResponse, Role,
    ToolCall,
};
use reqwest::header::{AUTHORIZATION, HeaderMap};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::config::{ConfigError, KeySource, OPENAI_BASE_URL, ProviderConfig};
use crate::http::{self, HttpCore, invalid, parse_arguments, parse_json};
use crate::price::PriceTable;

const LABEL: &str = "openai";

/// A provider speaking OpenAI's Chat Completions API (`POST {base_url}/chat/completions`).
///
/// The key (if any) is sent as `Authorization: Bearer`; with no key configured no header is sent, which local
/// servers (Ollama, llama.cpp) accept.
pub struct OpenAiProvider {
    http: HttpCore,
    url: String,
    key: KeySource,
    prices: PriceTable,
    stream: bool,
    max_tokens_field: String,
}

impl fmt::Debug for OpenAiProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenAiProvider")
            .field("url", &self.url)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl OpenAiProvider {
    /// A provider from `config`, reading the key variable (if configured) from the process environment.
    pub fn new(config: &ProviderConfig, prices: PriceTable) -> Result<Self, ConfigError> {
        Self::with_env(config, prices, &|var| std::env::var(var).ok())
    }

    /// Like [`OpenAiProvider::new`], looking environment variables up with `env`.
    pub fn with_env(
        config: &ProviderConfig,
        prices: PriceTable,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let base = config
            .base_url
            .as_deref()
            .unwrap_or(OPENAI_BASE_URL)
            .trim_end_matches('/');
        let max_tokens_field = config.max_tokens_field.clone().unwrap_or_else(|| "max_tokens".into());
        if !matches!(max_tokens_field.as_str(), "max_tokens" | "max_completion_tokens") {
            return Err(ConfigError::Invalid {
                provider: LABEL.into(),
                message: format!(
                    "max_tokens_field must be `max_tokens` or `max_completion_tokens`, not `{max_tokens_field}`"
                ),
            });
        }
        Ok(Self {
            http: HttpCore::new(config, LABEL)?,
            url: format!("{base}/chat/completions"),
            key: config.resolve_key(env),
            prices: prices.with_overrides(&config.prices),
            stream: config.stream,
            max_tokens_field,
        })
    }

    fn headers(&self) -> Result<HeaderMap, ModelError> {
        let mut headers = HeaderMap::new();
        match &self.key {
            KeySource::Key(key) => {
                headers.insert(AUTHORIZATION, http::secret_header(&format!("Bearer {}", key.expose()))?);
            }
            KeySource::MissingEnv(var) => {
                return Err(ModelError::Auth {
                    message: format!("{LABEL}: no API key: set the environment variable {var}"),
                });
            }
            KeySource::None => {}
        }
        Ok(headers)
    }

    fn body(&self, request: &ModelRequest) -> Value {
        let mut body = json!({
            "model": request.model,
            "messages": request.messages.iter().map(wire_message).collect::<Vec<_>>(),
        });
        if !request.tools.is_empty() {
            body["tools"] = request
                .tools
                .iter()
                .map(|t| {
                    json!({"type": "function", "function": {
                        "name": t.name, "description": t.description, "parameters": t.parameters,
                    }})
                })
                .collect();
        }
        if let Some(max) = request.max_tokens {
            body[self.max_tokens_field.as_str()] = json!(max);
        }
        if let Some(t) = request.temperature {
            body["temperature"] = json!(t);
        }
        if self.stream {
            body["stream"] = json!(true);
            body["stream_options"] = json!({"include_usage": true});
        }
        body
    }

    async fn run(
        &self,
        request: &ModelRequest,
        on_delta: &(dyn Fn(ModelDelta) + Send + Sync),
    ) -> Result<ModelResponse, ModelError> {
        let headers = self.headers()?;
        let body = self.body(request);
        let response = self.http.post(&self.url, &headers, &body, &request.model).await?;
        let out = if self.stream && !http::is_json(&response) {
            self.read_stream(response, on_delta).await?
        } else {
            let bytes = self.http.read_body(response).await?;
            let parsed: ChatResponse = parse_json(LABEL, "the response", &bytes)?;
            let out = Assembled::from_response(parsed)?;
            if let Some(r) = out.reasoning.as_ref().filter(|r| !r.is_empty()) {
                on_delta(ModelDelta::Reasoning(r.clone()));
            }
            if !out.text.is_empty() {
                on_delta(ModelDelta::Token(out.text.clone()));
            }
            out
        };
        Ok(out.into_response(request, &self.prices))
    }

    async fn read_stream(
        &self,
        response: reqwest::Response,
        on_delta: &(dyn Fn(ModelDelta) + Send + Sync),
    ) -> Result<Assembled, ModelError> {
        let mut events = self.http.events(response);
        let mut out = Assembled::default();
        let mut calls: BTreeMap<usize, PartialCall> = BTreeMap::new();
        let mut done = false;
        while let Some(event) = events.next().await {
            let data = event?.data;
            let data = data.trim();
            if data == "[DONE]" {
                done = true;
                break;
            }
            if data.is_empty() {
                continue;
            }
            let chunk: Chunk = parse_json(LABEL, "a stream chunk", data.as_bytes())?;
            if let Some(error) = chunk.error {
                return Err(ModelError::Unavailable {
                    message: format!("{LABEL}: error in stream: {}", http::error_text(&error.to_string())),
                });
            }
            if let Some(model) = chunk.model.filter(|m| !m.is_empty()) {
                out.model = model;
            }
            if let Some(usage) = chunk.usage {
                out.usage = Some(usage);
                events.progressed();
            }
            let Some(choice) = chunk.choices.into_iter().next() else {
                continue;
            };
            let delta = &choice.delta;
            if [&delta.content, &delta.reasoning_content, &delta.reasoning]
                .iter()
                .any(|t| t.as_ref().is_some_and(|t| !t.is_empty()))
                || !delta.tool_calls.is_empty()
                || choice.finish_reason.is_some()
            {
                events.progressed();
            }
            if let Some(text) = choice
                .delta
                .reasoning_content
                .or(choice.delta.reasoning)
                .filter(|t| !t.is_empty())
            {
                on_delta(ModelDelta::Reasoning(text));
            }
            if let Some(text) = choice.delta.content.filter(|t| !t.is_empty()) {
                out.text.push_str(&text);
                on_delta(ModelDelta::Token(text));
            }
            for (position, delta) in choice.delta.tool_calls.into_iter().enumerate() {
                // Fragments of one call share an `index`; servers that omit it send whole calls in order.
                let index = delta.index.unwrap_or_else(|| {
                    if delta.id.is_some() || calls.is_empty() {
                        calls.len().max(position)
                    } else {
                        calls.len() - 1
                    }
                });
                let call = calls.entry(index).or_default();
                if let Some(id) = delta.id.filter(|id| !id.is_empty()) {
                    call.id = id;
                }
                if let Some(function) = delta.function {
                    // The name comes whole in the first fragment; arguments come in pieces to concatenate.
                    if let Some(name) = function.name.filter(|n| !n.is_empty())
                        && call.name.is_empty()
                    {
                        call.name = name;
                    }
                    if let Some(args) = function.arguments {
                        call.arguments.push_str(&args);
                    }
                }
            }
            if let Some(reason) = choice.finish_reason {
                out.finish = Some(reason);
            }
        }
        if !done && out.finish.is_none() {
            return Err(invalid(LABEL, "the stream ended before the response was complete"));
        }
        for (index, call) in calls {
            if call.name.is_empty() {
                return Err(invalid(LABEL, format!("streamed tool call {index} has no name")));
            }
            let id = if call.id.is_empty() {
                format!("call_{index}")
            } else {
                call.id
            };
            out.tool_calls.push(ToolCall {
                id,
                name: call.name,
                arguments: parse_arguments(&call.arguments),
            });
        }
        Ok(out)
    }
}

impl ModelProvider for OpenAiProvider {
    fn complete<'a>(
        &'a self,
        request: &'a ModelRequest,
        on_delta: &'a (dyn Fn(ModelDelta) + Send + Sync),
    ) -> BoxFuture<'a, Result<ModelResponse, ModelError>> {
        Box::pin(self.run(request, on_delta))
    }

    fn check(&self, _model: &str) -> Result<(), ModelError> {
        self.headers().map(drop)
    }

    fn price(&self, model: &str) -> Option<ModelPrice> {
        self.prices.price(model)
    }
}

fn wire_message(message: &Message) -> Value {
    match message.role {
        Role::System => json!({"role": "system", "content": message.content}),
        Role::User => json!({"role": "user", "content": message.content}),
        Role::Tool => json!({
            "role": "tool",
            "tool_call_id": message.tool_call_id.as_deref().unwrap_or_default(),
            "content": message.content,
        }),
        Role::Assistant => {
            let mut wire = json!({"role": "assistant", "content": message.content});
            if !message.tool_calls.is_empty() {
                if message.content.is_empty() {
                    wire["content"] = Value::Null;
                }
                wire["tool_calls"] = message
                    .tool_calls
                    .iter()
                    .map(|c| {
                        json!({"id": c.id, "type": "function", "function": {
                            "name": c.name, "arguments": wire_arguments(&c.arguments),
                        }})
                    })
                    .collect();
            }
            wire
        }
    }
}

/// Arguments go on the wire as a JSON string; malformed ones (kept as a string value) go back verbatim.
fn wire_arguments(arguments: &Value) -> String {
    match arguments {
        Value::String(raw) => raw.clone(),
        other => other.to_string(),
    }
}

fn finish_reason(reason: Option<&str>) -> FinishReason {
    match reason {
        Some("stop") | None => FinishReason::Stop,
        Some("tool_calls") | Some("function_call") => FinishReason::ToolCalls,
        Some("length") => FinishReason::Length,
        Some("content_filter") => FinishReason::ContentFilter,
        Some(_) => FinishReason::Other,
    }
}

/// A response put together from either wire shape.
#[derive(Default)]
struct Assembled {
    model: String,
    text: String,
    reasoning: Option<String>,
    tool_calls: Vec<ToolCall>,
    finish: Option<String>,
    usage: Option<Usage>,
}

impl Assembled {
    fn from_response(response: ChatResponse) -> Result<Self, ModelError> {
        let choice = response
            .choices
            .into_iter()
            .next()
            .ok_or_else(|| invalid(LABEL, "the response has no choices"))?;
        let text = match choice.message.content {
            Some(Value::String(s)) => s,
            // Content-part arrays: keep the text parts.
            Some(Value::Array(parts)) => parts
                .iter()
                .filter_map(|p| p.get("text").and_then(|t| t.as_str()))
                .collect::<Vec<_>>()
                .concat(),
            _ => String::new(),
        };
        let tool_calls = choice
            .message
            .tool_calls
            .into_iter()
            .enumerate()
            .map(|(i, c)| ToolCall {
                id: c.id.filter(|id| !id.is_empty()).unwrap_or_else(|| format!("call_{i}")),
                name: c.function.name,
                arguments: match c.function.arguments {
                    Some(Value::String(raw)) => parse_arguments(&raw),
                    Some(Value::Null) | None => json!({}),
                    Some(other) => other,
                },
            })
            .collect();
        Ok(Self {
            model: response.model,
            text,
            reasoning: choice.message.reasoning_content.or(choice.message.reasoning),
            tool_calls,
            finish: choice.finish_reason,
            usage: response.usage,
        })
    }

    fn into_response(self, request: &ModelRequest, prices: &PriceTable) -> ModelResponse {
        let mut finish = finish_reason(self.finish.as_deref());
        // Some compatible servers say "stop" even when they call tools; the calls are what matter.
        if finish == FinishReason::Stop && !self.tool_calls.is_empty() {
            finish = FinishReason::ToolCalls;
        }
        let model = if self.model.is_empty() {
            request.model.clone()
        } else {
            self.model
        };
        let usage = self.usage.unwrap_or_default();
        let priced = if prices.price(&request.model).is_some() {
            &request.model
        } else {
            &model
        };
        ModelResponse {
            message: Message::assistant(self.text, self.tool_calls),
            finish_reason: finish,
            usage: prices.usage(priced, usage.prompt_tokens, usage.completion_tokens),
            model,
        }
    }
}

#[derive(Default)]
struct PartialCall {
    id: String,
    name: String,
    arguments: String,
}

#[derive(Deserialize, Default, Clone, Copy)]
struct Usage {
    #[serde(default)]
    prompt_tokens: u64,
    #[serde(default)]
    completion_tokens: u64,
}

#[derive(Deserialize)]
struct ChatResponse {
    #[serde(default)]
    model: String,
    #[serde(default)]
    choices: Vec<Choice>,
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct Choice {
    message: ResponseMessage,
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct ResponseMessage {
    content: Option<Value>,
    #[serde(default)]
    tool_calls: Vec<ResponseToolCall>,
    reasoning_content: Option<String>,
    reasoning: Option<String>,
}

#[derive(Deserialize)]
struct ResponseToolCall {
    id: Option<String>,
    function: ResponseFunction,
}

#[derive(Deserialize)]
struct ResponseFunction {
    name: String,
    arguments: Option<Value>,
}

#[derive(Deserialize)]
struct Chunk {
    model: Option<String>,
    #[serde(default)]
    choices: Vec<ChunkChoice>,
    usage: Option<Usage>,
    error: Option<Value>,
}

#[derive(Deserialize)]
struct ChunkChoice {
    #[serde(default)]
    delta: Delta,
    finish_reason: Option<String>,
}

#[derive(Deserialize, Default)]
struct Delta {
    content: Option<String>,
    reasoning_content: Option<String>,
    reasoning: Option<String>,
    #[serde(default)]
    tool_calls: Vec<DeltaToolCall>,
}

#[derive(Deserialize)]
struct DeltaToolCall {
    index: Option<usize>,
    id: Option<String>,
    function: Option<DeltaFunction>,
}

#[derive(Deserialize)]
struct DeltaFunction {
    name: Option<String>,
    arguments: Option<String>,
}
