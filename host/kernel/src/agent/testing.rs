//! Test doubles for the agent loop (feature `conformance`): a scripted [`ModelProvider`] and an
//! in-memory [`ToolHost`] built from closures, with call counters. Used by keel-kernel's and
//! keel-store's agent tests and benches.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use rust_decimal::Decimal;
use serde_json::{Value, json};

use crate::model::{
    FinishReason, Message, ModelDelta, ModelError, ModelPrice, ModelProvider, ModelRequest, ModelResponse, Role,
    TokenUsage, ToolCall,
};
use crate::tool::{Receipt, ToolCallContext, ToolDescriptor, ToolError, ToolHost, ToolOutcome};

/// A model that answers by turn: the response for a request is `script[n]`, where `n` is the
/// number of assistant messages already in the conversation. Stateless across restarts, so a
/// resumed job gets the same answers. Past the end of the script it answers "done".
#[derive(Default)]
pub struct ScriptedModel {
    script: Vec<Message>,
    /// Every request seen, in order.
    pub requests: Mutex<Vec<ModelRequest>>,
    price: Option<ModelPrice>,
    delay: Option<Duration>,
}

impl ScriptedModel {
    /// A model answering `script` turn by turn.
    pub fn new(script: Vec<Message>) -> Self {
        Self {
            script,
            ..Self::default()
        }
    }

    /// Price every model at `input` / `output` per million tokens.
    pub fn with_price(mut self, input: Decimal, output: Decimal) -> Self {
        self.price = Some(ModelPrice {
            input_per_mtok: input,
            output_per_mtok: output,
        });
        self
    }

    /// Wait `d` before answering.
    pub fn with_delay(mut self, d: Duration) -> Self {
        self.delay = Some(d);
        self
    }

    /// Number of completions served.
    pub fn calls(&self) -> usize {
        self.requests.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// The last request seen.
    pub fn last_request(&self) -> Option<ModelRequest> {
        self.requests.lock().unwrap_or_else(|e| e.into_inner()).last().cloned()
    }
}

/// An assistant message calling `calls` (`(model-facing tool name, arguments)`), ids `call-<turn>-<i>`.
pub fn calls(turn: usize, calls: &[(&str, Value)]) -> Message {
    Message::assistant(
        "",
        calls
            .iter()
            .enumerate()
            .map(|(i, (name, args))| ToolCall {
                id: format!("call-{turn}-{i}"),
                name: name.to_string(),
                arguments: args.clone(),
            })
            .collect(),
    )
}

impl ModelProvider for ScriptedModel {
    fn complete<'a>(
        &'a self,
        request: &'a ModelRequest,
        on_delta: &'a (dyn Fn(ModelDelta) + Send + Sync),
    ) -> BoxFuture<'a, Result<ModelResponse, ModelError>> {
        Box::pin(async move {
            self.requests
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(request.clone());
            if let Some(d) = self.delay {
                tokio::time::sleep(d).await;
            }
            let turn = request.messages.iter().filter(|m| m.role == Role::Assistant).count();
            let message = self
                .script
                .get(turn)
                .cloned()
                .unwrap_or_else(|| Message::assistant("done", vec![]));
            if !message.content.is_empty() {
                on_delta(ModelDelta::Token(message.content.clone()));
            }
            let input_tokens = request
                .messages
                .iter()
                .map(|m| m.content.len() as u64 / 4 + 1)
                .sum::<u64>();
            let output_tokens = message.content.len() as u64 / 4 + 1 + 10 * message.tool_calls.len() as u64;
            let cost = self
                .price
                .map_or(Decimal::ZERO, |p| p.cost(input_tokens, output_tokens));
            Ok(ModelResponse {
                finish_reason: if message.tool_calls.is_empty() {
                    FinishReason::Stop
                } else {
                    FinishReason::ToolCalls
                },
                message,
                usage: TokenUsage {
                    input_tokens,
                    output_tokens,
                    cost,
                },
                model: request.model.clone(),
            })
        })
    }

    fn price(&self, _model: &str) -> Option<ModelPrice> {
        self.price
    }
}

/// A tool implementation.
pub type ToolFn = Arc<dyn Fn(Value) -> BoxFuture<'static, Result<Value, ToolError>> + Send + Sync>;

/// An in-memory tool host: tools are closures; every call is counted per `plugin/tool`.
#[derive(Default, Clone)]
pub struct FakeTools {
    tools: Arc<Mutex<Vec<(ToolDescriptor, ToolFn)>>>,
    counts: Arc<Mutex<HashMap<String, usize>>>,
    total: Arc<AtomicUsize>,
    contexts: Arc<Mutex<Vec<ToolCallContext>>>,
}

impl FakeTools {
    /// No tools.
    pub fn new() -> Self {
        Self::default()
    }

    /// Add `plugin/name` with an input schema, an idempotency flag and an implementation.
    pub fn add<F, Fut>(&self, qualified: &str, schema: Value, idempotent: bool, f: F) -> &Self
    where
        F: Fn(Value) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<Value, ToolError>> + Send + 'static,
    {
        let (plugin, name) = qualified.split_once('/').unwrap_or(("test", qualified));
        let desc = ToolDescriptor {
            plugin: plugin.into(),
            name: name.into(),
            description: format!("test tool {qualified}"),
            input_schema: schema,
            output_schema: None,
            idempotent,
            effect_free: false,
            timeout: None,
            stands_for: None,
        };
        let f: ToolFn = Arc::new(move |args| Box::pin(f(args)));
        self.tools.lock().unwrap_or_else(|e| e.into_inner()).push((desc, f));
        self
    }

    /// Add a tool that echoes its arguments (`{"echo": args}`), accepting any object.
    pub fn add_echo(&self, qualified: &str, idempotent: bool) -> &Self {
        self.add(qualified, json!({"type": "object"}), idempotent, |args| async move {
            Ok(json!({ "echo": args }))
        })
    }

    /// Describe `plugin/tool` as [effect-free](ToolDescriptor::effect_free) or not, as a real host
    /// does from the plugin's grants (which may change between two calls). A call that relies on
    /// it ([`ToolCallContext::effect_free`]) while the tool is not is refused, as a real host
    /// refuses it.
    pub fn set_effect_free(&self, qualified: &str, effect_free: bool) -> &Self {
        let mut tools = self.tools.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((desc, _)) = tools.iter_mut().find(|(d, _)| d.is_named(qualified)) {
            desc.effect_free = effect_free;
        }
        self
    }

    /// Calls of `plugin/tool` so far (including calls that were interrupted).
    pub fn count(&self, qualified: &str) -> usize {
        self.counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(qualified)
            .copied()
            .unwrap_or(0)
    }

    /// All calls so far.
    pub fn total(&self) -> usize {
        self.total.load(Ordering::SeqCst)
    }

    /// The `call_id` (idempotency key) of every call so far, in call order.
    pub fn call_ids(&self) -> Vec<String> {
        self.contexts().into_iter().map(|c| c.call_id).collect()
    }

    /// The context of every call so far, in call order.
    pub fn contexts(&self) -> Vec<ToolCallContext> {
        self.contexts.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl ToolHost for FakeTools {
    fn list_tools(&self) -> BoxFuture<'_, Result<Vec<ToolDescriptor>, ToolError>> {
        let list = self
            .tools
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(d, _)| d.clone())
            .collect();
        Box::pin(async move { Ok(list) })
    }

    fn tool<'a>(&'a self, tool: &'a str, _scope: &'a str) -> BoxFuture<'a, Result<Option<ToolDescriptor>, ToolError>> {
        let found = self
            .tools
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|(d, _)| d.is_named(tool))
            .map(|(d, _)| d.clone());
        Box::pin(async move { Ok(found) })
    }

    fn call_tool<'a>(
        &'a self,
        ctx: &'a ToolCallContext,
        tool: &'a str,
        arguments: &'a Value,
    ) -> BoxFuture<'a, ToolOutcome> {
        let found = self
            .tools
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|(d, _)| d.is_named(tool))
            .map(|(d, f)| (d.effect_free, f.clone()));
        *self
            .counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(tool.to_string())
            .or_default() += 1;
        self.total.fetch_add(1, Ordering::SeqCst);
        self.contexts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(ctx.clone());
        let args = arguments.clone();
        Box::pin(async move {
            let Some((effect_free, f)) = found else {
                return ToolOutcome::unrun(ToolError::UnknownTool { tool: tool.to_string() });
            };
            if ctx.effect_free && !effect_free {
                return ToolOutcome::unrun(crate::tool::ToolError::Host {
                    message: crate::tool::GRANTS_CHANGED.into(),
                });
            }
            let started = std::time::Instant::now();
            let result = f(args).await;
            let output_bytes = result.as_ref().map_or(0, |v| v.to_string().len() as u64);
            ToolOutcome {
                result,
                receipt: Receipt {
                    wall_us: u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
                    output_bytes,
                    ..Receipt::default()
                },
                diagnostics: Default::default(),
            }
        })
    }
}

/// A runtime over `kernel` for tests and benches: a model following `script`, `tools`, the
/// allow-all policy, fresh session approvals and `config`.
pub fn scripted_runtime(
    kernel: crate::Kernel,
    script: Vec<Message>,
    tools: &FakeTools,
    config: crate::AgentConfig,
) -> crate::AgentRuntime {
    crate::AgentRuntime::new(
        kernel,
        Arc::new(ScriptedModel::new(script)),
        Arc::new(tools.clone()),
        Arc::new(crate::policy::Policy::allow_all()),
        Arc::new(crate::policy::SessionApprovals::new()),
        config,
    )
}
