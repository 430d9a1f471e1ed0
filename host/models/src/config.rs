//! Configuration: the `[models]` table of the Keel config file.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use keel_kernel::model::ModelPrice;
use serde::{Deserialize, Serialize};

/// An API key. `Debug` and `Display` never show it; it is only read when building a request header.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct ApiKey(String);

impl ApiKey {
    /// Wraps a key.
    pub fn new(key: impl Into<String>) -> Self {
        Self(key.into())
    }

    /// The secret itself: for building the auth header only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

impl Serialize for ApiKey {
    // Serialising a config (e.g. `keel config show`) must not leak the key either.
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str("<redacted>")
    }
}

/// Which wire format a provider speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProviderKind {
    /// OpenAI-compatible Chat Completions (`POST {base_url}/chat/completions`).
    Openai,
    /// Anthropic Messages (`POST {base_url}/v1/messages`).
    Anthropic,
    /// Canned responses from a script file ([`crate::ScriptedProvider`]).
    Scripted,
}

/// The `[models]` table.
///
/// ```toml
/// [models.prices."my-finetune"]          # overrides / extends the built-in price table (USD per 1M tokens)
/// input_per_mtok = "0.30"
/// output_per_mtok = "1.20"
///
/// [models.providers.openai]              # `openai` and `anthropic` exist by default (keys from env)
/// kind = "openai"
/// timeout_ms = 60000
///
/// [models.providers.ollama]              # any OpenAI-compatible server: use as `ollama:llama3`
/// kind = "openai"
/// base_url = "http://localhost:11434/v1"
///
/// [models.providers.scripted]            # `scripted:demo`
/// kind = "scripted"
/// script = "demo/script.json"
/// ```
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelsConfig {
    /// Providers by name: the `provider` in `provider:model`.
    pub providers: BTreeMap<String, ProviderConfig>,
    /// Prices merged over the built-in table, for every provider.
    pub prices: BTreeMap<String, ModelPrice>,
}

/// One provider: `[models.providers.NAME]`. Fields that do not apply to the `kind` are ignored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    /// Wire format.
    pub kind: ProviderKind,
    /// API root. Default: `https://api.openai.com/v1` (openai), `https://api.anthropic.com` (anthropic).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_url: Option<String>,
    /// The key itself (prefer `api_key_env`: config files get shared).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key: Option<ApiKey>,
    /// Environment variable holding the key. Default `OPENAI_API_KEY` / `ANTHROPIC_API_KEY` only for the providers
    /// named `openai` / `anthropic`: a custom endpoint never receives a vendor key unless told to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_env: Option<String>,
    /// Longest wait for the response to start, and longest silence between streamed chunks (per attempt).
    #[serde(default = "defaults::timeout_ms")]
    pub timeout_ms: u64,
    /// TCP/TLS connect timeout.
    #[serde(default = "defaults::connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Retries after a 429, 5xx, timeout or connection failure (so up to `max_retries + 1` attempts).
    #[serde(default = "defaults::max_retries")]
    pub max_retries: u32,
    /// First backoff delay; doubles each retry (with jitter).
    #[serde(default = "defaults::retry_base_delay_ms")]
    pub retry_base_delay_ms: u64,
    /// Longest single backoff delay. A `Retry-After` longer than this ends the retries at once.
    #[serde(default = "defaults::max_retry_delay_ms")]
    pub max_retry_delay_ms: u64,
    /// Stream responses (text fragments go to `on_delta` as they arrive). When false the whole text is passed to
    /// `on_delta` once, at the end.
    #[serde(default = "defaults::stream")]
    pub stream: bool,
    /// The most bytes one response may have (its body, or its whole event stream, framing included): past it the
    /// call fails with `InvalidResponse`. Bounds what a broken or hostile server can make the host hold and record.
    #[serde(default = "defaults::max_response_bytes")]
    pub max_response_bytes: u64,
    /// OpenAI only: the request field carrying `max_tokens`. `max_tokens` (default; what most compatible servers
    /// accept) or `max_completion_tokens` (required by OpenAI's reasoning models).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens_field: Option<String>,
    /// Scripted only: the script file (JSON, or TOML by extension).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub script: Option<PathBuf>,
    /// Prices for this provider only, merged over `[models.prices]`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub prices: BTreeMap<String, ModelPrice>,
}

mod defaults {
    pub fn timeout_ms() -> u64 {
        120_000
    }
    pub fn connect_timeout_ms() -> u64 {
        10_000
    }
    pub fn max_retries() -> u32 {
        3
    }
    pub fn retry_base_delay_ms() -> u64 {
        500
    }
    pub fn max_retry_delay_ms() -> u64 {
        30_000
    }
    pub fn stream() -> bool {
        true
    }
    pub fn max_response_bytes() -> u64 {
        64 << 20
    }
}

/// Default OpenAI API root.
pub(crate) const OPENAI_BASE_URL: &str = "https://api.openai.com/v1";
/// Default Anthropic API root.
pub(crate) const ANTHROPIC_BASE_URL: &str = "https://api.anthropic.com";

impl ProviderConfig {
    /// Defaults for `kind`, with no key source.
    pub fn new(kind: ProviderKind) -> Self {
        Self {
            kind,
            base_url: None,
            api_key: None,
            api_key_env: None,
            timeout_ms: defaults::timeout_ms(),
            connect_timeout_ms: defaults::connect_timeout_ms(),
            max_retries: defaults::max_retries(),
            retry_base_delay_ms: defaults::retry_base_delay_ms(),
            max_retry_delay_ms: defaults::max_retry_delay_ms(),
            stream: defaults::stream(),
            max_response_bytes: defaults::max_response_bytes(),
            max_tokens_field: None,
            script: None,
            prices: BTreeMap::new(),
        }
    }

    /// OpenAI itself: key from `OPENAI_API_KEY`.
    pub fn openai() -> Self {
        Self::new(ProviderKind::Openai).with_api_key_env("OPENAI_API_KEY")
    }

    /// Anthropic itself: key from `ANTHROPIC_API_KEY`.
    pub fn anthropic() -> Self {
        Self::new(ProviderKind::Anthropic).with_api_key_env("ANTHROPIC_API_KEY")
    }

    /// A scripted provider reading `path`.
    pub fn scripted(path: impl Into<PathBuf>) -> Self {
        Self {
            script: Some(path.into()),
            ..Self::new(ProviderKind::Scripted)
        }
    }

    /// Sets the API root.
    pub fn with_base_url(mut self, url: impl Into<String>) -> Self {
        self.base_url = Some(url.into());
        self
    }

    /// Sets the key.
    pub fn with_api_key(mut self, key: impl Into<String>) -> Self {
        self.api_key = Some(ApiKey::new(key));
        self
    }

    /// Sets the environment variable holding the key.
    pub fn with_api_key_env(mut self, var: impl Into<String>) -> Self {
        self.api_key_env = Some(var.into());
        self
    }

    /// Sets the per-attempt timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout_ms = timeout.as_millis() as u64;
        self
    }

    /// Sets the retry budget and backoff delays.
    pub fn with_retries(mut self, max_retries: u32, base_delay: Duration, max_delay: Duration) -> Self {
        self.max_retries = max_retries;
        self.retry_base_delay_ms = base_delay.as_millis() as u64;
        self.max_retry_delay_ms = max_delay.as_millis() as u64;
        self
    }

    /// Turns streaming on or off.
    pub fn with_stream(mut self, stream: bool) -> Self {
        self.stream = stream;
        self
    }

    /// Adds a price for this provider only.
    pub fn with_price(mut self, model: impl Into<String>, price: ModelPrice) -> Self {
        self.prices.insert(model.into(), price);
        self
    }

    /// The key: `api_key`, else the variable named by `api_key_env` (looked up with `env`). `Err` names a variable
    /// that is configured but unset.
    pub(crate) fn resolve_key(&self, env: &dyn Fn(&str) -> Option<String>) -> KeySource {
        if let Some(key) = &self.api_key {
            return KeySource::Key(key.clone());
        }
        match &self.api_key_env {
            Some(var) => match env(var).filter(|v| !v.trim().is_empty()) {
                Some(v) => KeySource::Key(ApiKey::new(v.trim())),
                None => KeySource::MissingEnv(var.clone()),
            },
            None => KeySource::None,
        }
    }
}

/// Where a provider's key came from.
#[derive(Debug, Clone)]
pub(crate) enum KeySource {
    /// A key.
    Key(ApiKey),
    /// `api_key_env` names this variable, which is unset: calls fail with `Auth`.
    MissingEnv(String),
    /// No key configured (fine for local OpenAI-compatible servers).
    None,
}

/// A configuration that cannot be turned into providers.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A provider's settings are inconsistent.
    #[error("model provider `{provider}`: {message}")]
    Invalid {
        /// Provider name.
        provider: String,
        /// What is wrong.
        message: String,
    },
    /// The scripted provider's file could not be read or parsed.
    #[error("model script {path}: {message}")]
    Script {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The HTTP client could not be built (TLS setup).
    #[error("model provider HTTP client: {0}")]
    Client(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_redacted_everywhere() {
        let config = ProviderConfig::openai().with_api_key("sk-very-secret");
        assert!(!format!("{config:?}").contains("sk-very-secret"));
        let mut models = ModelsConfig::default();
        models.providers.insert("openai".into(), config.clone());
        assert!(!toml::to_string(&models).unwrap().contains("sk-very-secret"));
        assert!(!serde_json::to_string(&models).unwrap().contains("sk-very-secret"));
        assert!(matches!(config.resolve_key(&|_| None), KeySource::Key(k) if k.expose() == "sk-very-secret"));
    }

    #[test]
    fn key_from_env() {
        let config = ProviderConfig::openai();
        let env = |v: &str| (v == "OPENAI_API_KEY").then(|| " sk-env \n".to_string());
        assert!(matches!(config.resolve_key(&env), KeySource::Key(k) if k.expose() == "sk-env"));
        assert!(matches!(config.resolve_key(&|_| None), KeySource::MissingEnv(v) if v == "OPENAI_API_KEY"));
        assert!(matches!(
            ProviderConfig::new(ProviderKind::Openai).resolve_key(&|_| None),
            KeySource::None
        ));
    }
}
