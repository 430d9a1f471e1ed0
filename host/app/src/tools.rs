//! The kernel's [`ToolHost`] over the plugin registry of a Keel home.
//!
//! The registry is the record of truth: tools are listed from what each plugin described at
//! install time, under the name it was installed as, and a plugin is loaded only when one of its
//! tools is called. A plugin whose component cannot be loaded, or no longer describes itself as
//! recorded, is reported once on stderr and skipped: its calls fail as tool errors, and every other
//! plugin and job keeps running. Each call reads the plugin's registry stamp (one short row) and
//! re-reads the record only when it moved, so a grant, revoke, upgrade or removal takes effect at
//! the next call in a running worker. Within one governed call ([`one_call`]) the stamp is read
//! once, when the call first asks, and its later steps reuse that read.
//!
//! Agents also get the code-execution tools under short names ([`ALIASES`]): `python/run` is
//! `python-exec/run` and `javascript/run` is `js-exec/run` when those plugins are installed (and no
//! plugin is installed under the short name itself). An alias is a tool like any other for the
//! kernel: policy rules name it (`python/run`, `python/*`), and it is called through the same
//! governed path (schema, policy, approvals, budget hold, receipt, journal).

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use keel_kernel::registry::PluginStamp;
use keel_kernel::tool::{ToolCallContext, ToolDescriptor, ToolError, ToolHost, ToolOutcome};
use keel_sandbox::{Grants, Limits, PluginInfo, PreparedPlugin, ToolInfo};
use keel_store::plugins::PluginRecord;
// The registry is a kernel trait; `Database` implements it.
use keel_kernel::registry::PluginRegistry as _;

use crate::error::AppError;
use crate::home::App;

/// Short names for the code-execution plugins' tools: (alias plugin, installed plugin, tool). The
/// alias offers that one tool as `alias/tool`.
pub const ALIASES: &[(&str, &str, &str)] = &[("python", "python-exec", "run"), ("javascript", "js-exec", "run")];

/// The installed plugin and tool an alias `plugin/tool` stands for.
pub fn alias_target(plugin: &str, tool: &str) -> Option<(&'static str, &'static str)> {
    ALIASES
        .iter()
        .find(|(alias, _, aliased_tool)| *alias == plugin && *aliased_tool == tool)
        .map(|(_, target, tool)| (*target, *tool))
}

tokio::task_local! {
    /// The registry stamps read so far by the one call running on this task ([`one_call`]), by
    /// plugin name (`None`: not installed).
    static CALL_STAMPS: RefCell<HashMap<String, Option<PluginStamp>>>;
}

/// Run `call`, one governed call from its start, with its registry reads shared: the first read
/// of a plugin's stamp in it is kept, and its later steps (a front end's check that the tool is
/// offered, the kernel's lookup of the tool, the sandboxed call) reuse it instead of reading the
/// same row again, each a few µs after the last. Every read is made after the call started, so a
/// grant, revoke, upgrade or removal committed before that is seen; one committed while the call
/// runs applies from the next call, as it would if it had come a moment later. Only this task shares the reads: work
/// the call hands to another task (a runner that takes the call after an approval) reads afresh.
/// Inside another `one_call`, `call` shares that call's reads.
pub async fn one_call<F: Future>(call: F) -> F::Output {
    if CALL_STAMPS.try_with(|_| ()).is_ok() {
        call.await
    } else {
        CALL_STAMPS.scope(RefCell::default(), call).await
    }
}

/// Serves the tools of the installed plugins whose names match a set of globs.
pub struct RegistryToolHost {
    app: Arc<App>,
    /// Plugin-name globs this host serves; `None`: every installed plugin.
    scope: Option<globset::GlobSet>,
    /// Prepared components by sha256 (a component is read and hashed once per process).
    prepared: Mutex<HashMap<String, Arc<PreparedPlugin>>>,
    /// What each plugin's record resolved to, by plugin name, kept while its stamp is unchanged:
    /// a call reads the stamp (one short row) instead of reading, decoding and re-verifying the
    /// whole record, and a grant, revoke, upgrade or removal still takes effect at the next call.
    described: Mutex<HashMap<String, Arc<Described>>>,
    /// Load failures already reported (plugin, sha256, message).
    warned: Mutex<HashSet<(String, String, String)>>,
    /// Applied to every plugin's limits (e.g. `keel call --timeout`). Set only by
    /// [`with_limits`](Self::with_limits), before any call: a plugin's deadline is worked out
    /// once per registry stamp and kept.
    limits: Option<crate::runtime::LimitOverride>,
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
            described: Mutex::default(),
            warned: Mutex::default(),
            limits: None,
            stdio: None,
        })
    }

    /// This host with `limits` applied to every plugin's limits. Taking the host by value, before
    /// it serves a call, keeps every deadline worked out from the final limits.
    pub fn with_limits(mut self, limits: Option<crate::runtime::LimitOverride>) -> Self {
        self.limits = limits;
        self
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

/// One state of an installed plugin's record (its [`PluginStamp`]), decoded once.
struct Described {
    stamp: PluginStamp,
    record: PluginRecord,
    /// The description recorded at install (`None`: the stored one does not decode).
    info: Option<PluginInfo>,
    /// The tools its recorded grants make effect-free, worked out once per stamp (none when the
    /// stored grants do not decode; loading the plugin reports it).
    effect_free: HashSet<String>,
    /// The plugin's deadline ([`RegistryToolHost::timeout_of`] of `record`), worked out once per
    /// stamp: merging the limits goes through JSON, which cost a few µs on every call.
    timeout: Option<std::time::Duration>,
    /// The component prepared and verified against this record, with its grants and limits
    /// (set by the first call that loads it; a failure is not kept, so the next call retries).
    loaded: Mutex<Option<(Arc<PreparedPlugin>, Grants, Limits)>>,
}

impl Described {
    fn knows(&self, tool: &str) -> bool {
        self.info.as_ref().is_some_and(|info| info.tool(tool).is_some())
    }

    /// Whether `scope` may see and call the plugin: the home's are every scope's, one installed
    /// through the API is its owner's alone (as [`crate::keys::may_see`] says).
    fn visible_to(&self, scope: &str) -> bool {
        self.stamp.owner.as_deref().is_none_or(|owner| owner == scope)
    }
}

/// The tools of `info` that `grants` (the plugin's, `None` when they do not decode) make
/// effect-free.
fn effect_free_tools(info: &PluginInfo, grants: Option<&Grants>) -> HashSet<String> {
    let Some(grants) = grants else { return HashSet::new() };
    info.tools
        .iter()
        .filter(|t| grants.effect_free_for(t, &info.tools))
        .map(|t| t.name.clone())
        .collect()
}

/// Tool `tool`, addressed by the registry's `plugin` name.
fn descriptor(
    plugin: &str,
    tool: &ToolInfo,
    effect_free: bool,
    timeout: Option<std::time::Duration>,
) -> ToolDescriptor {
    ToolDescriptor {
        effect_free,
        plugin: plugin.to_string(),
        name: tool.name.clone(),
        description: tool.description.clone(),
        input_schema: tool.input_schema.clone(),
        output_schema: tool.output_schema.clone(),
        idempotent: tool.idempotent,
        timeout,
        stands_for: None,
    }
}

/// `descriptor` offered under an alias of plugin `target`'s tool.
fn aliased(mut descriptor: ToolDescriptor, target: &str) -> ToolDescriptor {
    descriptor.description = format!("{} (alias of {target}/{})", descriptor.description, descriptor.name);
    descriptor.stands_for = Some(format!("{target}/{}", descriptor.name));
    descriptor
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
                        // The agent loop leases the job only for the plugin's own deadline.
                        let timeout = self.timeout_of(record);
                        let effect_free = effect_free_tools(&info, crate::home::grants_of(record).ok().as_ref());
                        let describe =
                            |plugin: &str, t: &ToolInfo| descriptor(plugin, t, effect_free.contains(&t.name), timeout);
                        if self.in_scope(&record.name) {
                            tools.extend(info.tools.iter().map(|t| describe(&record.name, t)));
                        }
                        for (alias, _, tool) in aliases {
                            tools.extend(info.tool(tool).map(|t| aliased(describe(alias, t), &record.name)));
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

    fn tool<'a>(&'a self, tool: &'a str, scope: &'a str) -> BoxFuture<'a, Result<Option<ToolDescriptor>, ToolError>> {
        Box::pin(async move {
            let (described, name, alias) = match self.record_of(tool).await {
                Ok(found) => found,
                Err(ToolError::UnknownTool { .. }) => return Ok(None),
                Err(e) => return Err(e),
            };
            // Another scope's plugin: no tool here, as in `call_tool`.
            if !described.visible_to(scope) {
                return Ok(None);
            }
            let Some(info) = &described.info else { return Ok(None) };
            let plugin = tool.split_once('/').map_or(tool, |(plugin, _)| plugin);
            let timeout = described.timeout;
            Ok(info.tool(&name).map(|t| {
                let d = descriptor(plugin, t, described.effect_free.contains(&t.name), timeout);
                if alias { aliased(d, &described.record.name) } else { d }
            }))
        })
    }

    fn call_tool<'a>(
        &'a self,
        ctx: &'a ToolCallContext,
        tool: &'a str,
        arguments: &'a serde_json::Value,
    ) -> BoxFuture<'a, ToolOutcome> {
        Box::pin(async move {
            match self.resolve(tool, &ctx.scope).await {
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
    /// The current record of plugin `name`, decoded (from the cache while its stamp is unchanged);
    /// `None` if it is not installed.
    async fn described(&self, name: &str) -> Result<Option<Arc<Described>>, ToolError> {
        let kept = CALL_STAMPS
            .try_with(|stamps| stamps.borrow().get(name).cloned())
            .ok()
            .flatten();
        let stamp = match kept {
            Some(stamp) => stamp,
            None => {
                let stamp = self.app.db.plugin_stamp(name).await.map_err(host_error)?;
                // Kept for the rest of this call, if it runs in `one_call`.
                let _ = CALL_STAMPS.try_with(|stamps| stamps.borrow_mut().insert(name.to_string(), stamp.clone()));
                stamp
            }
        };
        let Some(stamp) = stamp else {
            return Ok(None);
        };
        if let Some(hit) = self.described.lock().expect("described lock").get(name)
            && hit.stamp == stamp
        {
            return Ok(Some(hit.clone()));
        }
        let Some(record) = self.app.db.get_plugin(name).await.map_err(host_error)? else {
            return Ok(None);
        };
        // Kept under the stamp read first: if the record changed in between, the next call sees
        // a different stamp and decodes it again.
        let info: Option<PluginInfo> = serde_json::from_value(record.info.clone()).ok();
        let effect_free = info.as_ref().map_or_else(HashSet::new, |info| {
            effect_free_tools(info, crate::home::grants_of(&record).ok().as_ref())
        });
        let described = Arc::new(Described {
            stamp,
            info,
            effect_free,
            timeout: self.timeout_of(&record),
            record,
            loaded: Mutex::default(),
        });
        self.described
            .lock()
            .expect("described lock")
            .insert(name.to_string(), described.clone());
        Ok(Some(described))
    }

    /// Whether `tool` (`plugin/tool`) is served here now to `scope`: what [`ToolHost::tool`]
    /// answers with `Some`, from the same fresh stamp read, without building its descriptor, for a
    /// plugin `scope` may see (MCP checks every called name this way before the kernel looks the
    /// tool up itself).
    pub async fn offers(&self, tool: &str, scope: &str) -> Result<bool, ToolError> {
        match self.record_of(tool).await {
            Ok((described, ..)) => Ok(described.visible_to(scope)),
            Err(ToolError::UnknownTool { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The record serving `tool` (`plugin/tool`): the plugin's own, or for an alias the plugin
    /// it stands for, with whether it is the alias; `UnknownTool` when nothing serves it here.
    async fn record_of(&self, tool: &str) -> Result<(Arc<Described>, String, bool), ToolError> {
        let unknown = || ToolError::UnknownTool { tool: tool.to_string() };
        let (plugin, name) = tool.split_once('/').ok_or_else(unknown)?;
        if !self.in_scope(plugin) {
            return Err(unknown());
        }
        let (described, alias) = match self.described(plugin).await? {
            Some(described) => (described, false),
            // An alias: the plugin it stands for, whatever the scope says of that plugin's own name.
            None => {
                let (target, _) = alias_target(plugin, name).ok_or_else(unknown)?;
                (self.described(target).await?.ok_or_else(unknown)?, true)
            }
        };
        if !described.knows(name) {
            return Err(unknown());
        }
        Ok((described, name.to_string(), alias))
    }

    /// The loaded plugin serving `tool` (`plugin/tool`) to `scope`, with its grants, limits and
    /// tool name. A plugin another scope owns is an unknown tool here, whichever front end let
    /// the call through.
    async fn resolve(
        &self,
        tool: &str,
        scope: &str,
    ) -> Result<(Arc<PreparedPlugin>, Grants, Limits, String), ToolError> {
        let (described, name, _) = self.record_of(tool).await?;
        if !described.visible_to(scope) {
            return Err(ToolError::UnknownTool { tool: tool.to_string() });
        }
        let cached = described.loaded.lock().expect("loaded lock").clone();
        let (prepared, grants, limits) = match cached {
            Some(loaded) => loaded,
            None => {
                let plugin = &described.record.name;
                let loaded = self
                    .load(&described.record)
                    .await
                    .map_err(|why| host_error(format!("plugin `{plugin}` cannot be loaded: {why}")))?;
                *described.loaded.lock().expect("loaded lock") = Some(loaded.clone());
                loaded
            }
        };
        let limits = match &self.limits {
            Some(change) => {
                let invalid = |message: String| ToolError::InvalidInput { message };
                let changed = change(&limits).map_err(invalid)?;
                // A fuel limit given now must be one this home enforces; a stored one is as it was.
                let checked = if changed.fuel == limits.fuel {
                    self.app.checked_limits(changed)
                } else {
                    self.app.settable_limits(changed)
                };
                checked.map_err(|e| invalid(e.message))?
            }
            None => limits,
        };
        Ok((prepared, grants, limits, name))
    }

    /// The plugin's own deadline (its limits over the global ones, then this host's override),
    /// which the sandbox enforces; `None` when its stored limits do not decode.
    fn timeout_of(&self, record: &PluginRecord) -> Option<std::time::Duration> {
        let limits = self.app.limits_of(record).ok().and_then(|l| match &self.limits {
            Some(change) => change(&l).ok(),
            None => Some(l),
        });
        limits.map(|l| l.timeout())
    }
}
