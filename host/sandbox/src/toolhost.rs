//! [`ToolHost`] over the sandbox: the kernel's view of installed plugins.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::future::BoxFuture;
use keel_kernel::tool::{ToolCallContext, ToolDescriptor, ToolError, ToolHost, ToolOutcome};

use crate::{Grants, Limits, PreparedPlugin, Sandbox};

/// One installed plugin with its grants and limits.
#[derive(Debug, Clone)]
pub struct InstalledTool {
    /// The prepared component.
    pub plugin: Arc<PreparedPlugin>,
    /// What the user granted.
    pub grants: Grants,
    /// Effective limits (global defaults with per-plugin overrides applied).
    pub limits: Limits,
}

/// A [`ToolHost`] serving a fixed set of installed plugins from one [`Sandbox`].
#[derive(Clone)]
pub struct SandboxToolHost {
    sandbox: Sandbox,
    plugins: Arc<BTreeMap<String, InstalledTool>>,
}

impl SandboxToolHost {
    /// Serve `plugins` (keyed by plugin name).
    pub fn new(sandbox: Sandbox, plugins: impl IntoIterator<Item = InstalledTool>) -> Self {
        let plugins = plugins.into_iter().map(|p| (p.plugin.info.name.clone(), p)).collect();
        Self {
            sandbox,
            plugins: Arc::new(plugins),
        }
    }

    /// Split `plugin/tool`.
    fn resolve(&self, qualified: &str) -> Result<(&InstalledTool, String), ToolError> {
        let unknown = || ToolError::UnknownTool {
            tool: qualified.to_string(),
        };
        let (plugin, tool) = qualified.split_once('/').ok_or_else(unknown)?;
        let installed = self.plugins.get(plugin).ok_or_else(unknown)?;
        installed.plugin.info.tool(tool).ok_or_else(unknown)?;
        Ok((installed, tool.to_string()))
    }
}

impl ToolHost for SandboxToolHost {
    fn list_tools(&self) -> BoxFuture<'_, Result<Vec<ToolDescriptor>, ToolError>> {
        Box::pin(async move {
            Ok(self
                .plugins
                .values()
                .flat_map(|installed| {
                    installed.plugin.info.tools.iter().map(|tool| ToolDescriptor {
                        plugin: installed.plugin.info.name.clone(),
                        name: tool.name.clone(),
                        description: tool.description.clone(),
                        input_schema: tool.input_schema.clone(),
                        output_schema: tool.output_schema.clone(),
                        idempotent: tool.idempotent,
                        effect_free: installed.grants.effect_free_for(tool, &installed.plugin.info.tools),
                        timeout: Some(installed.limits.timeout()),
                        stands_for: None,
                    })
                })
                .collect())
        })
    }

    fn call_tool<'a>(
        &'a self,
        ctx: &'a ToolCallContext,
        tool: &'a str,
        arguments: &'a serde_json::Value,
    ) -> BoxFuture<'a, ToolOutcome> {
        Box::pin(async move {
            let (installed, tool) = match self.resolve(tool) {
                Ok(found) => found,
                Err(e) => return ToolOutcome::unrun(e),
            };
            let report = self
                .sandbox
                .call(
                    &installed.plugin,
                    &installed.grants,
                    &installed.limits,
                    ctx,
                    &tool,
                    arguments,
                )
                .await;
            report.into_outcome()
        })
    }
}
