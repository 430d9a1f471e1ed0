//! A provider that replays canned responses: for tests and the demo, no network.

use std::path::Path;

use futures::future::BoxFuture;
use keel_kernel::model::{
    FinishReason, Message, ModelDelta, ModelError, ModelPrice, ModelProvider, ModelRequest, ModelResponse, Role,
    ToolCall,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::{ConfigError, ProviderConfig};
use crate::price::PriceTable;

/// A script: the model's answer for each turn, in order.
///
/// JSON (`{"turns": [...]}` or just the array) or TOML (`[[turns]]`):
///
/// ```json
/// {"turns": [
///   {"tool_calls": [{"name": "fs__read", "arguments": {"path": "notes.txt"}}]},
///   {"text": "The notes say hello.", "usage": {"input_tokens": 120, "output_tokens": 6}}
/// ]}
/// ```
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Script {
    /// One entry per assistant turn.
    pub turns: Vec<ScriptedTurn>,
}

/// The model's answer for one turn: text, tool calls, or both.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScriptedTurn {
    /// Answer text, streamed word by word to `on_delta`.
    #[serde(default)]
    pub text: String,
    /// Tool calls to request.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ScriptedToolCall>,
    /// Reported usage. Default: an estimate of ~4 characters per token, so budgets still move.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<ScriptedUsage>,
    /// Default: `tool_calls` when there are tool calls, else `stop`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finish_reason: Option<FinishReason>,
}

impl ScriptedTurn {
    /// A final text answer.
    pub fn text(text: impl Into<String>) -> Self {
        Self {
            text: text.into(),
            ..Self::default()
        }
    }

    /// One tool call.
    pub fn tool_call(name: impl Into<String>, arguments: Value) -> Self {
        Self {
            tool_calls: vec![ScriptedToolCall {
                id: None,
                name: name.into(),
                arguments,
            }],
            ..Self::default()
        }
    }

    /// Sets the reported usage.
    pub fn with_usage(mut self, input_tokens: u64, output_tokens: u64) -> Self {
        self.usage = Some(ScriptedUsage {
            input_tokens,
            output_tokens,
        });
        self
    }
}

/// A scripted tool call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScriptedToolCall {
    /// Call id. Default: `call_{turn}_{position}`, stable across runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Model-facing tool name.
    pub name: String,
    /// Arguments (default `{}`).
    #[serde(default = "empty_object")]
    pub arguments: Value,
}

fn empty_object() -> Value {
    Value::Object(Default::default())
}

/// Scripted token counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScriptedUsage {
    /// Prompt tokens.
    pub input_tokens: u64,
    /// Completion tokens.
    pub output_tokens: u64,
}

/// Answers from a [`Script`].
///
/// The turn is chosen by the number of assistant messages already in the request, not by internal state: the
/// same conversation always gets the same answer, so a job restarted or replayed mid-conversation continues where
/// it was. The model name is ignored (any `scripted:NAME` plays the same script) and echoed back.
#[derive(Debug, Clone)]
pub struct ScriptedProvider {
    turns: Vec<ScriptedTurn>,
    prices: PriceTable,
}

impl ScriptedProvider {
    /// A provider playing `turns`, unpriced.
    pub fn new(turns: Vec<ScriptedTurn>) -> Self {
        Self {
            turns,
            prices: PriceTable::empty(),
        }
    }

    /// Prices usage with `prices` (by the requested model name).
    pub fn with_prices(mut self, prices: PriceTable) -> Self {
        self.prices = prices;
        self
    }

    /// Reads a script file: TOML if it ends in `.toml`, else JSON.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let err = |message: String| ConfigError::Script {
            path: path.to_path_buf(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let script = if path.extension().is_some_and(|e| e == "toml") {
            toml::from_str::<Script>(&text).map_err(|e| err(e.to_string()))?
        } else {
            Self::parse_json(&text).map_err(|e| err(e.to_string()))?
        };
        Ok(Self::new(script.turns))
    }

    /// The provider a `kind = "scripted"` config describes.
    pub fn from_config(config: &ProviderConfig, prices: PriceTable) -> Result<Self, ConfigError> {
        let path = config.script.as_ref().ok_or_else(|| ConfigError::Invalid {
            provider: "scripted".into(),
            message: "`script` (a JSON or TOML file) is required".into(),
        })?;
        Ok(Self::from_file(path)?.with_prices(prices.with_overrides(&config.prices)))
    }

    fn parse_json(text: &str) -> Result<Script, serde_json::Error> {
        let value: Value = serde_json::from_str(text)?;
        if value.is_array() {
            Ok(Script {
                turns: serde_json::from_value(value)?,
            })
        } else {
            serde_json::from_value(value)
        }
    }

    fn answer(
        &self,
        request: &ModelRequest,
        on_delta: &(dyn Fn(ModelDelta) + Send + Sync),
    ) -> Result<ModelResponse, ModelError> {
        let turn = request.messages.iter().filter(|m| m.role == Role::Assistant).count();
        let script = self.turns.get(turn).ok_or_else(|| ModelError::InvalidRequest {
            message: format!(
                "scripted model has no response for turn {} (the script has {} turns)",
                turn + 1,
                self.turns.len()
            ),
        })?;
        let tool_calls: Vec<ToolCall> = script
            .tool_calls
            .iter()
            .enumerate()
            .map(|(i, c)| ToolCall {
                id: c.id.clone().unwrap_or_else(|| format!("call_{turn}_{i}")),
                name: c.name.clone(),
                arguments: c.arguments.clone(),
            })
            .collect();
        for word in script.text.split_inclusive(char::is_whitespace) {
            on_delta(ModelDelta::Token(word.to_string()));
        }
        let usage = script.usage.unwrap_or_else(|| {
            let input: usize = request.messages.iter().map(|m| m.content.len()).sum();
            let output = script.text.len() + tool_calls.iter().map(|c| c.arguments.to_string().len()).sum::<usize>();
            ScriptedUsage {
                input_tokens: input.div_ceil(4) as u64,
                output_tokens: output.div_ceil(4) as u64,
            }
        });
        let finish_reason = script.finish_reason.unwrap_or(if tool_calls.is_empty() {
            FinishReason::Stop
        } else {
            FinishReason::ToolCalls
        });
        Ok(ModelResponse {
            message: Message::assistant(script.text.clone(), tool_calls),
            finish_reason,
            usage: self
                .prices
                .usage(&request.model, usage.input_tokens, usage.output_tokens),
            model: request.model.clone(),
        })
    }
}

impl ModelProvider for ScriptedProvider {
    fn complete<'a>(
        &'a self,
        request: &'a ModelRequest,
        on_delta: &'a (dyn Fn(ModelDelta) + Send + Sync),
    ) -> BoxFuture<'a, Result<ModelResponse, ModelError>> {
        Box::pin(async move { self.answer(request, on_delta) })
    }

    fn price(&self, model: &str) -> Option<ModelPrice> {
        self.prices.price(model)
    }
}
