//! Anthropic Messages (`POST {base_url}/v1/messages`).

use std::collections::BTreeMap;
use std::fmt;

use futures::future::BoxFuture;
use keel_kernel::model::{
    FinishReason, Message, ModelDelta, ModelError, ModelPrice, ModelProvider, ModelRequest, ModelResponse, Role,
    ToolCall,
};
use reqwest::header::{HeaderMap, HeaderValue};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::config::{ANTHROPIC_BASE_URL, ConfigError, KeySource, ProviderConfig};
use crate::http::{self, HttpCore, invalid, parse_arguments, parse_json};
use crate::price::PriceTable;

const LABEL: &str = "anthropic";
const API_VERSION: &str = "2023-06-01";
/// Anthropic requires `max_tokens`; used when the request leaves it open.
pub const DEFAULT_MAX_TOKENS: u32 = 4096;

/// A provider speaking Anthropic's Messages API, authenticated with `x-api-key`.
pub struct AnthropicProvider {
    http: HttpCore,
    url: String,
    key: KeySource,
    prices: PriceTable,
    stream: bool,
}

impl fmt::Debug for AnthropicProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AnthropicProvider")
            .field("url", &self.url)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl AnthropicProvider {
    /// A provider from `config`, reading the key variable (if configured) from the process environment.
    pub fn new(config: &ProviderConfig, prices: PriceTable) -> Result<Self, ConfigError> {
        Self::with_env(config, prices, &|var| std::env::var(var).ok())
    }

    /// Like [`AnthropicProvider::new`], looking environment variables up with `env`.
    pub fn with_env(
        config: &ProviderConfig,
        prices: PriceTable,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let base = config
            .base_url
            .as_deref()
            .unwrap_or(ANTHROPIC_BASE_URL)
            .trim_end_matches('/');
        Ok(Self {
            http: HttpCore::new(config, LABEL)?,
            url: format!("{base}/v1/messages"),
            key: config.resolve_key(env),
            prices: prices.with_overrides(&config.prices),
            stream: config.stream,
        })
    }

    fn headers(&self) -> Result<HeaderMap, ModelError> {
        let key = match &self.key {
            KeySource::Key(key) => key,
            KeySource::MissingEnv(var) => {
                return Err(ModelError::Auth {
                    message: format!("{LABEL}: no API key: set the environment variable {var}"),
                });
            }
            KeySource::None => {
                return Err(ModelError::Auth {
                    message: format!("{LABEL}: no API key configured (api_key or api_key_env)"),
                });
            }
        };
        let mut headers = HeaderMap::new();
        headers.insert("x-api-key", http::secret_header(key.expose())?);
        headers.insert("anthropic-version", HeaderValue::from_static(API_VERSION));
        Ok(headers)
    }

    fn body(&self, request: &ModelRequest) -> Value {
        let system: Vec<&str> = request
            .messages
            .iter()
            .filter(|m| m.role == Role::System)
            .map(|m| m.content.as_str())
            .collect();
        let mut body = json!({
            "model": request.model,
            "max_tokens": request.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS),
            "messages": wire_messages(&request.messages),
        });
        if !system.is_empty() {
            body["system"] = json!(system.join("\n\n"));
        }
        if !request.tools.is_empty() {
            body["tools"] = request
                .tools
                .iter()
                .map(|t| json!({"name": t.name, "description": t.description, "input_schema": t.parameters}))
                .collect();
        }
        if let Some(t) = request.temperature {
            body["temperature"] = json!(t);
        }
        if self.stream {
            body["stream"] = json!(true);
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
            let parsed: MessagesResponse = parse_json(LABEL, "the response", &bytes)?;
            let out = Assembled::from_response(parsed);
            if !out.reasoning.is_empty() {
                on_delta(ModelDelta::Reasoning(out.reasoning.clone()));
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
        // Tool-use blocks by content index: (id, name, concatenated input JSON).
        let mut tools: BTreeMap<usize, (String, String, String)> = BTreeMap::new();
        let mut stopped = false;
        while let Some(event) = events.next().await {
            let event = event?;
            if event.data.trim().is_empty() {
                continue;
            }
            let parsed: StreamEvent = parse_json(LABEL, "a stream event", event.data.as_bytes())?;
            let progress = match &parsed {
                StreamEvent::Ping | StreamEvent::Other => false,
                StreamEvent::ContentBlockDelta { delta, .. } => match delta {
                    BlockDelta::TextDelta { text } => !text.is_empty(),
                    BlockDelta::ThinkingDelta { thinking } => !thinking.is_empty(),
                    BlockDelta::InputJsonDelta { partial_json } => !partial_json.is_empty(),
                    BlockDelta::Other => false,
                },
                _ => true,
            };
            if progress {
                events.progressed();
            }
            match parsed {
                StreamEvent::MessageStart { message } => {
                    out.model = message.model;
                    out.usage.add(&message.usage);
                }
                StreamEvent::ContentBlockStart { index, content_block } => match content_block {
                    Block::ToolUse { id, name, .. } => {
                        tools.insert(index, (id, name, String::new()));
                    }
                    Block::Text { text } if !text.is_empty() => {
                        out.text.push_str(&text);
                        on_delta(ModelDelta::Token(text));
                    }
                    _ => {}
                },
                StreamEvent::ContentBlockDelta { index, delta } => match delta {
                    BlockDelta::TextDelta { text } => {
                        out.text.push_str(&text);
                        on_delta(ModelDelta::Token(text));
                    }
                    BlockDelta::ThinkingDelta { thinking } => {
                        out.reasoning.push_str(&thinking);
                        on_delta(ModelDelta::Reasoning(thinking));
                    }
                    BlockDelta::InputJsonDelta { partial_json } => match tools.get_mut(&index) {
                        Some((_, _, input)) => input.push_str(&partial_json),
                        None => return Err(invalid(LABEL, format!("input_json_delta for unknown block {index}"))),
                    },
                    BlockDelta::Other => {}
                },
                StreamEvent::MessageDelta { delta, usage } => {
                    if let Some(reason) = delta.stop_reason {
                        out.stop_reason = Some(reason);
                    }
                    // message_delta carries cumulative output tokens (and, lately, input tokens too).
                    if let Some(usage) = usage {
                        out.usage.output_tokens = out.usage.output_tokens.max(usage.output_tokens);
                        if usage.input_total() > 0 {
                            out.usage = Usage {
                                output_tokens: out.usage.output_tokens,
                                ..usage
                            };
                        }
                    }
                }
                StreamEvent::MessageStop => {
                    stopped = true;
                    break;
                }
                StreamEvent::Error { error } => {
                    let message = format!("{LABEL}: error in stream: {}", http::error_text(&error.to_string()));
                    return Err(ModelError::Unavailable { message });
                }
                StreamEvent::ContentBlockStop | StreamEvent::Ping | StreamEvent::Other => {}
            }
        }
        if !stopped {
            return Err(invalid(LABEL, "the stream ended before message_stop"));
        }
        out.tool_calls = tools
            .into_values()
            .map(|(id, name, input)| ToolCall {
                id,
                name,
                arguments: parse_arguments(&input),
            })
            .collect();
        Ok(out)
    }
}

impl ModelProvider for AnthropicProvider {
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

/// Kernel messages → Anthropic turns: system messages are lifted out (see `body`), tool results become
/// `tool_result` blocks of a user turn, and consecutive turns of one role merge (Anthropic wants alternation).
fn wire_messages(messages: &[Message]) -> Vec<Value> {
    let mut turns: Vec<(&'static str, Vec<Value>)> = Vec::new();
    for message in messages {
        let (role, blocks) = match message.role {
            Role::System => continue,
            Role::User => ("user", text_block(&message.content)),
            Role::Tool => (
                "user",
                vec![json!({
                    "type": "tool_result",
                    "tool_use_id": message.tool_call_id.as_deref().unwrap_or_default(),
                    "content": message.content,
                })],
            ),
            Role::Assistant => {
                let mut blocks = text_block(&message.content);
                blocks.extend(message.tool_calls.iter().map(|c| {
                    // `input` must be an object; malformed arguments (a string) cannot be sent back as they were.
                    let input = if c.arguments.is_object() {
                        c.arguments.clone()
                    } else {
                        json!({})
                    };
                    json!({"type": "tool_use", "id": c.id, "name": c.name, "input": input})
                }));
                ("assistant", blocks)
            }
        };
        if blocks.is_empty() {
            continue;
        }
        match turns.last_mut() {
            Some((last, existing)) if *last == role => existing.extend(blocks),
            _ => turns.push((role, blocks)),
        }
    }
    turns
        .into_iter()
        .map(|(role, content)| json!({"role": role, "content": content}))
        .collect()
}

/// Anthropic rejects empty text blocks.
fn text_block(text: &str) -> Vec<Value> {
    if text.is_empty() {
        vec![]
    } else {
        vec![json!({"type": "text", "text": text})]
    }
}

fn finish_reason(reason: Option<&str>) -> FinishReason {
    match reason {
        Some("end_turn") | Some("stop_sequence") | None => FinishReason::Stop,
        Some("tool_use") => FinishReason::ToolCalls,
        Some("max_tokens") => FinishReason::Length,
        Some("refusal") => FinishReason::ContentFilter,
        Some(_) => FinishReason::Other,
    }
}

#[derive(Default)]
struct Assembled {
    model: String,
    text: String,
    reasoning: String,
    tool_calls: Vec<ToolCall>,
    stop_reason: Option<String>,
    usage: Usage,
}

impl Assembled {
    fn from_response(response: MessagesResponse) -> Self {
        let mut out = Self {
            model: response.model,
            stop_reason: response.stop_reason,
            ..Self::default()
        };
        out.usage.add(&response.usage);
        for block in response.content {
            match block {
                Block::Text { text } => out.text.push_str(&text),
                Block::Thinking { thinking } => out.reasoning.push_str(&thinking),
                Block::ToolUse { id, name, input } => out.tool_calls.push(ToolCall {
                    id,
                    name,
                    arguments: input,
                }),
                Block::Other => {}
            }
        }
        out
    }

    fn into_response(self, request: &ModelRequest, prices: &PriceTable) -> ModelResponse {
        let mut finish = finish_reason(self.stop_reason.as_deref());
        if finish == FinishReason::Stop && !self.tool_calls.is_empty() {
            finish = FinishReason::ToolCalls;
        }
        let model = if self.model.is_empty() {
            request.model.clone()
        } else {
            self.model
        };
        let priced = if prices.price(&request.model).is_some() {
            &request.model
        } else {
            &model
        };
        ModelResponse {
            message: Message::assistant(self.text, self.tool_calls),
            finish_reason: finish,
            usage: prices.usage(priced, self.usage.input_total(), self.usage.output_tokens),
            model,
        }
    }
}

/// Anthropic usage. Cached prompt tokens count as input (priced at the input rate: an upper bound).
#[derive(Deserialize, Default, Clone, Copy)]
struct Usage {
    #[serde(default)]
    input_tokens: u64,
    #[serde(default)]
    output_tokens: u64,
    #[serde(default)]
    cache_creation_input_tokens: Option<u64>,
    #[serde(default)]
    cache_read_input_tokens: Option<u64>,
}

impl Usage {
    fn input_total(&self) -> u64 {
        // The server's numbers are not trusted to stay small: sums stop at the top.
        self.input_tokens
            .saturating_add(self.cache_creation_input_tokens.unwrap_or(0))
            .saturating_add(self.cache_read_input_tokens.unwrap_or(0))
    }

    fn add(&mut self, other: &Usage) {
        let sum = |a: Option<u64>, b: Option<u64>| Some(a.unwrap_or(0).saturating_add(b.unwrap_or(0)));
        self.input_tokens = self.input_tokens.saturating_add(other.input_tokens);
        self.output_tokens = self.output_tokens.saturating_add(other.output_tokens);
        self.cache_creation_input_tokens = sum(self.cache_creation_input_tokens, other.cache_creation_input_tokens);
        self.cache_read_input_tokens = sum(self.cache_read_input_tokens, other.cache_read_input_tokens);
    }
}

#[derive(Deserialize)]
struct MessagesResponse {
    #[serde(default)]
    model: String,
    #[serde(default)]
    content: Vec<Block>,
    stop_reason: Option<String>,
    #[serde(default)]
    usage: Usage,
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Block {
    Text {
        #[serde(default)]
        text: String,
    },
    Thinking {
        #[serde(default)]
        thinking: String,
    },
    ToolUse {
        id: String,
        name: String,
        #[serde(default)]
        input: Value,
    },
    #[serde(other)]
    Other,
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum BlockDelta {
    TextDelta {
        text: String,
    },
    InputJsonDelta {
        partial_json: String,
    },
    ThinkingDelta {
        thinking: String,
    },
    #[serde(other)]
    Other,
}

#[derive(Deserialize)]
struct StartMessage {
    #[serde(default)]
    model: String,
    #[serde(default)]
    usage: Usage,
}

#[derive(Deserialize, Default)]
struct MessageDeltaBody {
    stop_reason: Option<String>,
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum StreamEvent {
    MessageStart {
        message: StartMessage,
    },
    ContentBlockStart {
        index: usize,
        content_block: Block,
    },
    ContentBlockDelta {
        index: usize,
        delta: BlockDelta,
    },
    ContentBlockStop,
    MessageDelta {
        #[serde(default)]
        delta: MessageDeltaBody,
        usage: Option<Usage>,
    },
    MessageStop,
    Ping,
    Error {
        error: Value,
    },
    #[serde(other)]
    Other,
}
