//! The kernel's [`ToolHost`] over the plugin registry of a Keel home.
//!
//! The registry is the record of truth: tools are listed from what each plugin described at
//! install time, under the name it was installed as, and a plugin is loaded only when one of its
//! tools is called. A plugin whose component cannot be loaded, or no longer describes itself as
//! recorded, is reported once on stderr and skipped: its calls fail as tool errors, and every other
//! plugin and job keeps running. Grants and limits are read from the registry at each call, so a
//! revoke takes effect in a running worker.
//!
//! Agents also get the code-execution tools under short names ([`ALIASES`]): `python/run` is
//! `python-exec/run` and `javascript/run` is `js-exec/run` when those plugins are installed (and no
//! plugin is installed under the short name itself). An alias is a tool like any other for the
//! kernel: policy rules name it (`python/run`, `python/*`), and it is called through the same
//! governed path (schema, policy, approvals, budget hold, receipt, journal).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use keel_kernel::tool::{ToolCallContext, ToolDescriptor, ToolError, ToolHost, ToolOutcome};
use keel_sandbox::{Grants, Limits, PluginInfo, PreparedPlugin};
use keel_store::plugins::PluginRecord;
// The registry is a kernel trait; `Database` implements it.
use keel_kernel::registry::PluginRegistry as _;

use crate::error::AppError;
use crate::home::App;

/// Short names for the code-execution plugins' tools: (alias plugin, installed plugin, tool). The
/// alias offers that one tool as `alias/tool`.
pub const ALIASES: &[(&str, &str, &str)] = &[("python", "python-exec", "run"), ("javascript", "js-exec", "run")];

/// The installed plugin and tool an alias `plugin/tool` stands for.
fn alias_target(plugin: &str, tool: &str) -> Option<(&'static str, &'static str)> {
    ALIASES
        .iter()
        .find(|(alias, _, aliased_tool)| *alias == plugin && *aliased_tool == tool)
        .map(|(_, target, tool)| (*target, *tool))
}

/// Serves the tools of the installed plugins whose names match a set of globs.
pub struct RegistryToolHost {
    app: Arc<App>,
    /// Plugin-name globs this host serves; `None`: every installed plugin.
    scope: Option<globset::GlobSet>,
    /// Prepared components by sha256 (a component is read and hashed once per process).
    prepared: Mutex<HashMap<String, Arc<PreparedPlugin>>>,
    /// Load failures already reported (plugin, sha256, message).
    warned: Mutex<HashSet<(String, String, String)>>,
    /// Applied to every plugin's limits (e.g. `keel call --timeout`).
    pub limits: Option<crate::runtime::LimitOverride>,
    /// Where a call's guest stdout/stderr are streamed (e.g. `keel exec --lang`); asked once per
    /// call, `None` (or no sinks) keeps them captured.
    pub stdio: Option<StdioSinks>,
}

/// Chooses, per call (its context and `plugin/tool`), the writers its guest stdout and stderr are
/// streamed to, or `None` to capture them as usual.
pub type StdioSinks = Arc<
    dyn Fn(&ToolCallContext, &str) -> Option<(keel_sandbox::OutputWriter, keel_sandbox::OutputWriter)> + Send + Sync,
>;

impl RegistryToolHost {
    /// A host for the plugins that `patterns` (`plugin`, `plugin/tool` or globs) can reach, or
    /// for every installed plugin when `None`. A pattern naming a plugin that is not installed is a
    /// user error.
    pub async fn new(app: Arc<App>, patterns: Option<&[String]>) -> Result<Self, AppError> {
        let scope = match patterns {
            None => None,
            Some(patterns) => {
                let mut set = globset::GlobSetBuilder::new();
                for p in patterns {
                    let plugin = p.split('/').next().unwrap_or(p);
                    let glob = globset::Glob::new(plugin)
                        .map_err(|e| AppError::user(format!("bad tool pattern {p:?}: {e}")))?;
                    let alias = ALIASES.iter().find(|(alias, _, _)| *alias == plugin);
                    if let Some((_, target, _)) = alias
                        && app.db.get_plugin(plugin).await?.is_none()
                    {
                        // An alias is known when the plugin it stands for is installed.
                        app.record(target).await?;
                    } else if !plugin.contains(['*', '?', '[', '{']) {
                        // Same message as `keel call` for an unknown plugin.
                        app.record(plugin).await?;
                    }
                    set.add(glob);
                }
                Some(
                    set.build()
                        .map_err(|e| AppError::user(format!("bad tool patterns: {e}")))?,
                )
            }
        };
        Ok(Self {
            app,
            scope,
            prepared: Mutex::default(),
            warned: Mutex::default(),
            limits: None,
            stdio: None,
        })
    }

    fn in_scope(&self, plugin: &str) -> bool {
        self.scope.as_ref().is_none_or(|set| set.is_match(plugin))
    }

    /// Load every plugin in scope now, reporting the ones that cannot be loaded (they stay skipped).
    pub async fn warm(&self) -> Result<(), AppError> {
        for record in self.app.db.list_plugins().await? {
            if self.in_scope(&record.name) {
                let _ = self.load(&record).await;
            }
        }
        Ok(())
    }

    /// The plugin of `record`, verified against it, with its grants and limits; on failure the
    /// reason, reported on stderr once.
    async fn load(&self, record: &PluginRecord) -> Result<(Arc<PreparedPlugin>, Grants, Limits), String> {
        let cached = self
            .prepared
            .lock()
            .expect("prepared lock")
            .get(&record.sha256)
            .cloned();
        let loaded = match cached {
            Some(plugin) => self.app.verify(record, &plugin),
            None => match self.app.prepare_record(record).await {
                Ok(plugin) => {
                    self.prepared
                        .lock()
                        .expect("prepared lock")
                        .insert(record.sha256.clone(), plugin.clone());
                    self.app.verify(record, &plugin)
                }
                Err(e) => Err(e),
            },
        };
        loaded.map_err(|e| {
            let key = (record.name.clone(), record.sha256.clone(), e.message.clone());
            if self.warned.lock().expect("warned lock").insert(key) {
                tracing::warn!(plugin = %record.name, error = %e.message, "plugin skipped");
                eprintln!(
                    "warning: plugin `{}` cannot be loaded and is skipped (its tools fail): {}",
                    record.name, e.message
                );
            }
            e.message
        })
    }
}

/// The tools of `info`, addressed by the registry's `plugin` name.
fn descriptors(
    plugin: &str,
    info: &PluginInfo,
    timeout: Option<std::time::Duration>,
) -> impl Iterator<Item = ToolDescriptor> {
    info.tools.iter().map(move |tool| ToolDescriptor {
        plugin: plugin.to_string(),
        name: tool.name.clone(),
        description: tool.description.clone(),
        input_schema: tool.input_schema.clone(),
        output_schema: tool.output_schema.clone(),
        idempotent: tool.idempotent,
        timeout,
    })
}

fn host_error(e: impl std::fmt::Display) -> ToolError {
    ToolError::Host { message: e.to_string() }
}

impl ToolHost for RegistryToolHost {
    fn list_tools(&self) -> BoxFuture<'_, Result<Vec<ToolDescriptor>, ToolError>> {
        Box::pin(async move {
            let mut tools = Vec::new();
            let records = self.app.db.list_plugins().await.map_err(host_error)?;
            let installed: HashSet<&str> = records.iter().map(|r| r.name.as_str()).collect();
            for record in &records {
                let aliases = ALIASES
                    .iter()
                    .filter(|(alias, target, _)| {
                        *target == record.name && !installed.contains(alias) && self.in_scope(alias)
                    })
                    .collect::<Vec<_>>();
                if !self.in_scope(&record.name) && aliases.is_empty() {
                    continue;
                }
                match serde_json::from_value::<PluginInfo>(record.info.clone()) {
                    Ok(info) => {
                        // The plugin's own deadline (its limits over the global ones), which the
                        // sandbox enforces; the agent loop leases the job only for that long.
                        let limits = self.app.limits_of(record).ok().and_then(|l| match &self.limits {
                            Some(change) => change(&l).ok(),
                            None => Some(l),
                        });
                        let timeout = limits.map(|l| l.timeout());
                        if self.in_scope(&record.name) {
                            tools.extend(descriptors(&record.name, &info, timeout));
                        }
                        for (alias, _, tool) in aliases {
                            tools.extend(descriptors(alias, &info, timeout).filter(|d| d.name == *tool).map(
                                |mut d| {
                                    d.description = format!("{} (alias of {}/{tool})", d.description, record.name);
                                    d
                                },
                            ));
                        }
                    }
                    Err(e) => eprintln!(
                        "warning: plugin `{}` is skipped: its stored description is invalid: {e}",
                        record.name
                    ),
                }
            }
            Ok(tools)
        })
    }

    fn call_tool<'a>(
        &'a self,
        ctx: &'a ToolCallContext,
        tool: &'a str,
        arguments: &'a serde_json::Value,
    ) -> BoxFuture<'a, ToolOutcome> {
        Box::pin(async move {
            match self.resolve(tool).await {
                Ok((prepared, grants, limits, name)) => {
                    let sandbox = &self.app.sandbox;
                    match self.stdio.as_ref().and_then(|sinks| sinks(ctx, tool)) {
                        Some((out, err)) => {
                            sandbox
                                .call_streaming(&prepared, &grants, &limits, ctx, &name, arguments, out, err)
                                .await
                        }
                        None => sandbox.call(&prepared, &grants, &limits, ctx, &name, arguments).await,
                    }
                    .into_outcome()
                }
                Err(e) => ToolOutcome::unrun(e),
            }
        })
    }
}

impl RegistryToolHost {
    /// The loaded plugin serving `tool` (`plugin/tool`), with its grants, limits and tool name.
    async fn resolve(&self, tool: &str) -> Result<(Arc<PreparedPlugin>, Grants, Limits, String), ToolError> {
        let unknown = || ToolError::UnknownTool { tool: tool.to_string() };
        let (plugin, name) = tool.split_once('/').ok_or_else(unknown)?;
        if !self.in_scope(plugin) {
            return Err(unknown());
        }
        let record = match self.app.db.get_plugin(plugin).await.map_err(host_error)? {
            Some(record) => record,
            // An alias: the plugin it stands for, whatever the scope says of that plugin's own name.
            None => {
                let (target, _) = alias_target(plugin, name).ok_or_else(unknown)?;
                self.app
                    .db
                    .get_plugin(target)
                    .await
                    .map_err(host_error)?
                    .ok_or_else(unknown)?
            }
        };
        let plugin = record.name.as_str();
        let known = record.info["tools"]
            .as_array()
            .is_some_and(|tools| tools.iter().any(|t| t["name"] == name));
        if !known {
            return Err(unknown());
        }
        let (prepared, grants, limits) = self
            .load(&record)
            .await
            .map_err(|why| host_error(format!("plugin `{plugin}` cannot be loaded: {why}")))?;
        let limits = match &self.limits {
            Some(change) => change(&limits).map_err(|why| ToolError::InvalidInput { message: why })?,
            None => limits,
        };
        Ok((prepared, grants, limits, name.to_string()))
    }
}
