//! `provider:model` dispatch.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use futures::future::BoxFuture;
use keel_kernel::model::{ModelDelta, ModelError, ModelPrice, ModelProvider, ModelRequest, ModelResponse};

use crate::anthropic::AnthropicProvider;
use crate::config::{ConfigError, ModelsConfig, ProviderConfig, ProviderKind};
use crate::openai::OpenAiProvider;
use crate::price::PriceTable;
use crate::scripted::ScriptedProvider;

/// A [`ModelProvider`] that routes `provider:model` (e.g. `openai:gpt-4o-mini`, `ollama:llama3:8b`) to the
/// provider registered under `provider`, passing it `model` (everything after the first `:`).
#[derive(Clone, Default)]
pub struct ModelRouter {
    providers: BTreeMap<String, Arc<dyn ModelProvider>>,
}

impl fmt::Debug for ModelRouter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ModelRouter")
            .field("providers", &self.providers.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl ModelRouter {
    /// A router with no providers.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers (or replaces) `name`.
    pub fn with_provider(mut self, name: impl Into<String>, provider: Arc<dyn ModelProvider>) -> Self {
        self.insert(name, provider);
        self
    }

    /// Registers (or replaces) `name`.
    pub fn insert(&mut self, name: impl Into<String>, provider: Arc<dyn ModelProvider>) {
        self.providers.insert(name.into(), provider);
    }

    /// Registered provider names, sorted.
    pub fn provider_names(&self) -> Vec<&str> {
        self.providers.keys().map(String::as_str).collect()
    }

    /// The providers `config` describes, keys from the process environment. `openai` and `anthropic` are always
    /// present (with their vendor defaults) unless the config defines them itself.
    pub fn from_config(config: &ModelsConfig) -> Result<Self, ConfigError> {
        Self::from_config_with_env(config, &|var| std::env::var(var).ok())
    }

    /// Like [`ModelRouter::from_config`], looking environment variables up with `env`.
    pub fn from_config_with_env(
        config: &ModelsConfig,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let prices = PriceTable::builtin().with_overrides(&config.prices);
        let mut providers = config.providers.clone();
        providers.entry("openai".into()).or_insert_with(ProviderConfig::openai);
        providers
            .entry("anthropic".into())
            .or_insert_with(ProviderConfig::anthropic);
        let mut router = Self::new();
        for (name, mut provider) in providers {
            if name.is_empty() || name.contains(':') {
                return Err(ConfigError::Invalid {
                    provider: name,
                    message: "names must be non-empty, without `:`".into(),
                });
            }
            // The vendor key variables are implied only for the providers named after the vendor.
            if provider.api_key.is_none() && provider.api_key_env.is_none() {
                match (name.as_str(), provider.kind) {
                    ("openai", ProviderKind::Openai) => provider.api_key_env = Some("OPENAI_API_KEY".into()),
                    ("anthropic", ProviderKind::Anthropic) => provider.api_key_env = Some("ANTHROPIC_API_KEY".into()),
                    _ => {}
                }
            }
            let built: Result<Arc<dyn ModelProvider>, ConfigError> = match provider.kind {
                ProviderKind::Openai => {
                    OpenAiProvider::with_env(&provider, prices.clone(), env).map(|p| Arc::new(p) as Arc<_>)
                }
                ProviderKind::Anthropic => {
                    AnthropicProvider::with_env(&provider, prices.clone(), env).map(|p| Arc::new(p) as Arc<_>)
                }
                ProviderKind::Scripted => {
                    ScriptedProvider::from_config(&provider, prices.clone()).map(|p| Arc::new(p) as Arc<_>)
                }
            };
            // Providers name themselves by kind; the error should name the config entry.
            let built = built.map_err(|e| match e {
                ConfigError::Invalid { message, .. } => ConfigError::Invalid {
                    provider: name.clone(),
                    message,
                },
                other => other,
            })?;
            router.insert(name, built);
        }
        Ok(router)
    }

    fn route<'m>(&self, model: &'m str) -> Result<(&Arc<dyn ModelProvider>, &'m str), ModelError> {
        let configured = || self.provider_names().join(", ");
        let Some((provider, name)) = model.split_once(':') else {
            return Err(ModelError::UnknownModel {
                model: model.to_string(),
                message: format!(
                    "model names are `provider:model`; configured providers: {}",
                    configured()
                ),
            });
        };
        match self.providers.get(provider) {
            Some(p) => Ok((p, name)),
            None => Err(ModelError::UnknownModel {
                model: model.to_string(),
                message: format!("no model provider `{provider}`; configured providers: {}", configured()),
            }),
        }
    }
}

impl ModelProvider for ModelRouter {
    fn complete<'a>(
        &'a self,
        request: &'a ModelRequest,
        on_delta: &'a (dyn Fn(ModelDelta) + Send + Sync),
    ) -> BoxFuture<'a, Result<ModelResponse, ModelError>> {
        Box::pin(async move {
            let (provider, model) = self.route(&request.model)?;
            let routed = ModelRequest {
                model: model.to_string(),
                ..request.clone()
            };
            provider.complete(&routed, on_delta).await
        })
    }

    fn price(&self, model: &str) -> Option<ModelPrice> {
        let (provider, name) = self.route(model).ok()?;
        provider.price(name)
    }

    fn check(&self, model: &str) -> Result<(), ModelError> {
        let (provider, name) = self.route(model)?;
        provider.check(name)
    }
}
