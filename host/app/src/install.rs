//! Installing a plugin: validate, store by sha256, precompile, describe, check against the record
//! it replaces, grant, record. The front end renders the result and asks the questions (consent to
//! replace, the grants to give).

use std::sync::Arc;

use keel_kernel::registry::PluginRegistry as _;
use keel_sandbox::{Grants, PluginInfo, PreparedPlugin, ScratchConfig};
use keel_store::plugins::PluginRecord;
use serde_json::Value;

use crate::error::AppError;
use crate::home::{App, grants_of};

/// What to install.
#[derive(Debug, Clone)]
pub struct InstallRequest<'a> {
    /// The component's bytes.
    pub bytes: &'a [u8],
    /// The name for a plain component with no name section (e.g. the file's stem).
    pub label: &'a str,
    /// Replace a plugin of the same name installed from another component without asking.
    pub replace: bool,
    /// Keep the replaced plugin's grants (refused if the new one requests more).
    pub keep_grants: bool,
    /// Per-plugin limit overrides (an empty object keeps the previous record's).
    pub limits: Value,
    /// The scope that owns the plugin (installed through the API), recorded with it in one
    /// transaction; `None` keeps the current owner (a new plugin is then home-wide).
    pub owner: Option<&'a str>,
}

/// What was installed.
#[derive(Debug)]
pub struct Installed {
    /// The registry record now stored.
    pub record: PluginRecord,
    /// The prepared component.
    pub plugin: Arc<PreparedPlugin>,
    /// The record it replaced (another component under the same name).
    pub replaced: Option<PluginRecord>,
    /// Things to tell the user (grants not carried over, requests not granted, ...).
    pub notes: Vec<String>,
    /// What the plugin gets without a grant, one sentence each (a fresh scratch directory per
    /// call for a `/scratch` request; see [`provided_without_grant`]).
    pub provided: Vec<String>,
}

impl App {
    /// Install `bytes` as a script (or a test's setup) would, asking nothing: no grant (the
    /// plugin gets only what needs none), default limits, and a plugin of the same name from
    /// another component replaced. `label` names a plain component with no name section.
    pub async fn install_unattended(&self, bytes: &[u8], label: &str) -> Result<Installed, AppError> {
        let request = InstallRequest {
            bytes,
            label,
            replace: false,
            keep_grants: false,
            limits: Value::Object(Default::default()),
            owner: None,
        };
        self.install(request, |_, _| Ok(()), |_, _| Ok(())).await
    }

    /// Install `request`. `confirm` is asked before replacing another component under the same
    /// name (unless `request.replace`); `grant` adds the grants the user gives.
    pub async fn install(
        &self,
        request: InstallRequest<'_>,
        confirm: impl FnOnce(&PluginRecord, &PreparedPlugin) -> Result<(), AppError>,
        grant: impl FnOnce(&App, &mut Grants) -> Result<(), AppError>,
    ) -> Result<Installed, AppError> {
        let plugin = self.sandbox.prepare_as(request.bytes, request.label).await?;
        let sha256 = plugin.sha256.clone();
        let installed = self.install_prepared(request, plugin, confirm, grant).await;
        if installed.is_err() {
            // Refused or failed: neither the component nor its compiled code is kept, unless an
            // installed plugin uses the same one.
            self.drop_component_if_unused(&sha256).await?;
        }
        installed
    }

    /// Delete component `sha256` and everything cached for it, unless an installed plugin uses it
    /// (checked and deleted under the component store's lock: see [`App::lock_components`]).
    pub(crate) async fn drop_component_if_unused(&self, sha256: &str) -> Result<(), AppError> {
        let _lock = self.lock_components().await?;
        if !self.db.component_in_use(sha256).await? {
            let _ = self.components.remove(sha256);
            self.sandbox.forget(sha256);
        }
        Ok(())
    }

    /// The component store's lock ([`keel_sandbox::ComponentStore::lock`]; another process may
    /// hold it, so it is waited for on a blocking thread). An install holds it from storing the
    /// component to recording the plugin, a removal from finding a component unused to deleting
    /// it, so that a removal never deletes a component an install has just recorded.
    pub async fn lock_components(&self) -> Result<keel_sandbox::ComponentsLock, AppError> {
        let store = self.components.clone();
        tokio::task::spawn_blocking(move || store.lock())
            .await
            .map_err(|e| AppError::internal(format!("cannot lock the component store: {e}")))?
            .map_err(|e| AppError::internal(format!("cannot lock the component store: {e}")))
    }

    async fn install_prepared(
        &self,
        request: InstallRequest<'_>,
        plugin: Arc<PreparedPlugin>,
        confirm: impl FnOnce(&PluginRecord, &PreparedPlugin) -> Result<(), AppError>,
        grant: impl FnOnce(&App, &mut Grants) -> Result<(), AppError>,
    ) -> Result<Installed, AppError> {
        let name = plugin.info.name.clone();
        let previous = self.db.get_plugin(&name).await?;

        let replacing = previous.as_ref().filter(|old| old.sha256 != plugin.sha256);
        if let Some(old) = replacing
            && !request.replace
        {
            confirm(old, &plugin)?;
        }

        let mut grants = Grants::default();
        let mut notes = Vec::new();
        if let Some(old) = &previous {
            let old_grants = grants_of(old)?;
            if request.keep_grants {
                if let Some(old) = replacing {
                    let old_info: PluginInfo = serde_json::from_value(old.info.clone())
                        .map_err(|e| AppError::internal(format!("stored description of `{name}` is invalid: {e}")))?;
                    let beyond = requests_beyond(&plugin.info.requested(), &old_info.requested());
                    if !beyond.is_empty() {
                        return Err(AppError::user(format!(
                            "--keep-grants refused: {name} {} requests more than the installed {} did ({}); install it without --keep-grants and grant again",
                            plugin.info.version,
                            old.version,
                            beyond.join(", ")
                        )));
                    }
                    let widened = reach_beyond(&plugin.info, &old_info, &old_grants);
                    if !widened.is_empty() {
                        return Err(AppError::user(format!(
                            "--keep-grants refused: with the grants of the installed {}, the tools of {name} {} would reach more than they did ({}): it declares less per tool; install it without --keep-grants and grant again",
                            old.version,
                            plugin.info.version,
                            widened.join(", ")
                        )));
                    }
                }
                grants = old_grants.clone();
            } else if old_grants != Grants::default() {
                notes.push(format!(
                    "previous grants of `{name}` were not carried over (pass --keep-grants to keep them): {}",
                    describe_grants(&old_grants)
                ));
            }
            let beyond = old_grants.missing_for(&plugin.info.requested());
            if old.sha256 != plugin.sha256 && !beyond.is_empty() {
                notes.push(format!(
                    "{name} {} requests more than {} was granted: {}",
                    plugin.info.version,
                    old.version,
                    beyond.join(", ")
                ));
            }
        }
        grant(self, &mut grants)?;
        let empty = request.limits.as_object().is_none_or(|o| o.is_empty());
        let limits = match &previous {
            Some(old) if empty => old.limits.clone(),
            _ => request.limits.clone(),
        };
        let effective = self.settable_limits(self.limits_over(&limits)?)?;

        let lock = self.lock_components().await?;
        let stored = self
            .components
            .put(request.bytes)
            .map_err(|e| AppError::internal(format!("cannot store component: {e}")))?;
        debug_assert_eq!(stored, plugin.sha256);
        let record = PluginRecord {
            name: name.clone(),
            version: plugin.info.version.clone(),
            description: plugin.info.description.clone(),
            sha256: plugin.sha256.clone(),
            info: serde_json::to_value(&plugin.info).expect("info serializes"),
            imports: serde_json::to_value(&plugin.imports).expect("imports serialize"),
            grants: serde_json::to_value(&grants).expect("grants serialize"),
            limits,
            installed_at: String::new(),
            updated_at: String::new(),
        };
        // Written only over the record read above: a grant, revoke, replace or removal made
        // meanwhile (e.g. while the question above was on screen) is not overwritten with what
        // was read before it.
        let expected = previous.as_ref().map(|p| p.updated_at.as_str());
        if !self.db.replace_plugin_if(&record, request.owner, expected).await? {
            return Err(AppError::user(format!(
                "`{name}` changed while this install was under way (installed, granted, revoked, replaced or removed by another command): nothing was installed; run it again"
            )));
        }
        drop(lock);
        let replaced = replacing.cloned();
        if let Some(old) = &replaced {
            self.drop_component_if_unused(&old.sha256).await?;
        }
        let scratch = &self.sandbox.config().scratch;
        notes.extend(reach_warnings(&plugin.info, &plugin.imports, &grants, scratch));
        let provided = provided_without_grant(&plugin.info, &plugin.imports, &grants, scratch, &effective);
        let record = self
            .db
            .get_plugin(&name)
            .await?
            .ok_or_else(|| AppError::internal(format!("`{name}` was stored but cannot be read back")))?;
        Ok(Installed {
            record,
            plugin,
            replaced,
            notes,
            provided,
        })
    }
}

/// What `new` requests that `old` did not: a directory not at or below an old request with at
/// least its mode, a host or an environment variable not requested before.
pub fn requests_beyond(new: &keel_sandbox::Capabilities, old: &keel_sandbox::Capabilities) -> Vec<String> {
    let within = |path: &str, base: &str| {
        base == "/" || path == base || path.strip_prefix(base).is_some_and(|rest| rest.starts_with('/'))
    };
    let mut beyond: Vec<String> = new
        .filesystem
        .iter()
        .filter(|f| {
            !old.filesystem
                .iter()
                .any(|o| o.mode >= f.mode && within(&f.path, &o.path))
        })
        .map(|f| format!("{} ({})", f.path, f.mode))
        .collect();
    beyond.extend(
        new.network
            .iter()
            .filter(|h| !old.network.iter().any(|o| o.eq_ignore_ascii_case(h)))
            .map(|h| format!("net {h}")),
    );
    beyond.extend(
        new.environment
            .iter()
            .filter(|v| !old.environment.contains(v))
            .map(|v| format!("env {v}")),
    );
    beyond
}

/// What the tools of `new` would reach with `grants` that the same tools of `old` did not, one
/// `tool NAME: WHAT` each. Grants are narrowed per tool (see [`Grants::narrow_for`]): where no
/// tool of a version declares a kind of capability, every tool gets the whole grant of that
/// kind, so a version that stops declaring hands every tool what one tool was narrowed to,
/// though it *requests* nothing beyond the old one. A tool `old` did not have is measured
/// against what any tool of `old` reached.
pub fn reach_beyond(new: &PluginInfo, old: &PluginInfo, grants: &Grants) -> Vec<String> {
    let reach = |tool: &keel_sandbox::ToolInfo, of: &PluginInfo| grants.narrow_for(tool, &of.tools);
    let any_old = || {
        old.tools
            .iter()
            .map(|t| reach(t, old))
            .fold(Grants::default(), |mut all, g| {
                all.fs.extend(g.fs);
                all.net.extend(g.net);
                all.env.extend(g.env);
                all
            })
    };
    let mut beyond = Vec::new();
    for tool in &new.tools {
        let now = reach(tool, new);
        let before = old.tool(&tool.name).map_or_else(any_old, |t| reach(t, old));
        let name = &tool.name;
        for fs in &now.fs {
            if !before
                .fs
                .iter()
                .any(|b| b.mode >= fs.mode && fs.host.starts_with(&b.host))
            {
                beyond.push(format!("tool {name}: {} ({})", fs.guest, fs.mode));
            }
        }
        for host in now.net.iter().filter(|h| !before.net.contains(h)) {
            beyond.push(format!("tool {name}: net {host}"));
        }
        for var in now.env.iter().filter(|v| !before.env.contains(v)) {
            beyond.push(format!("tool {name}: env {var}"));
        }
    }
    beyond
}

/// Warnings about requests not granted and grants that cannot take effect. A request the host
/// serves without a grant (a fresh scratch directory, see [`provided_without_grant`]) is not
/// "not granted".
pub fn reach_warnings(
    info: &PluginInfo,
    imports: &keel_sandbox::ImportSummary,
    grants: &Grants,
    scratch: &ScratchConfig,
) -> Vec<String> {
    let mut notes = Vec::new();
    let mut requested = info.requested();
    if imports.filesystem {
        requested.filesystem.retain(|r| !scratch.provides(r));
    }
    let missing = grants.missing_for(&requested);
    if !missing.is_empty() {
        notes.push(format!(
            "requested but not granted: {} (grant with `keel plugins grant {} --allow-read/--allow-write/--allow-net/--allow-env ...`)",
            missing.join(", "),
            info.name
        ));
    }
    notes.extend(effect_warnings(imports, grants));
    notes
}

/// Warnings about grants that cannot take effect (the component does not import what they open).
pub fn effect_warnings(imports: &keel_sandbox::ImportSummary, grants: &Grants) -> Vec<String> {
    let mut notes = Vec::new();
    if !grants.net.is_empty() && !imports.http {
        notes.push("network grants have no effect: the component does not import wasi:http".into());
    }
    if !grants.fs.is_empty() && !imports.filesystem {
        notes.push("filesystem grants have no effect: the component does not import wasi:filesystem".into());
    }
    notes
}

/// What the plugin gets from the host without a grant, one sentence each: for a read-write
/// request of `/scratch` with no directory granted there, a fresh, private, empty directory for
/// each call (or session), removed after it and capped by `limits.max_scratch_bytes`.
pub fn provided_without_grant(
    info: &PluginInfo,
    imports: &keel_sandbox::ImportSummary,
    grants: &Grants,
    scratch: &ScratchConfig,
    limits: &keel_sandbox::Limits,
) -> Vec<String> {
    if !imports.filesystem {
        return Vec::new();
    }
    let mut provided: Vec<String> = Vec::new();
    for request in info.requested().filesystem {
        let granted = grants
            .missing_for(&keel_sandbox::Capabilities {
                filesystem: vec![request.clone()],
                ..Default::default()
            })
            .is_empty();
        if scratch.provides(&request) && !granted {
            let text = format!(
                "{} ({}): a fresh, private, empty directory for each call (or session), removed after it, at most {} (max_scratch_bytes)",
                request.path,
                request.mode,
                human_bytes(limits.max_scratch_bytes)
            );
            if !provided.contains(&text) {
                provided.push(text);
            }
        }
    }
    provided
}

/// `n` bytes as `64 MiB`, `512 KiB` or `100 bytes` (exact binary units only).
fn human_bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 20 && n % (1 << 20) == 0 => format!("{} MiB", n >> 20),
        n if n >= 1 << 10 && n % (1 << 10) == 0 => format!("{} KiB", n >> 10),
        n => format!("{n} bytes"),
    }
}

/// The grants, in one line for a human.
pub fn describe_grants(grants: &Grants) -> String {
    let mut parts: Vec<String> = grants
        .fs
        .iter()
        .map(|g| {
            let host = g.host.display().to_string();
            let place = if host == g.guest {
                host
            } else {
                format!("{host} as {}", g.guest)
            };
            format!("{place} ({})", g.mode)
        })
        .collect();
    parts.extend(grants.net.iter().map(|h| format!("net {h}")));
    parts.extend(grants.env.iter().map(|v| format!("env {v}")));
    if grants.allow_private_network {
        parts.push("private networks".into());
    }
    if parts.is_empty() {
        "nothing".into()
    } else {
        parts.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use keel_sandbox::{Capabilities, FsGrant, FsMode, FsRequest, ToolInfo};

    use super::*;

    fn tool(name: &str, capabilities: Capabilities) -> ToolInfo {
        ToolInfo {
            name: name.into(),
            description: String::new(),
            input_schema: serde_json::json!({"type": "object"}),
            output_schema: None,
            capabilities,
            idempotent: false,
        }
    }

    fn plugin(version: &str, tools: Vec<ToolInfo>) -> PluginInfo {
        PluginInfo {
            name: "p".into(),
            version: version.into(),
            description: String::new(),
            tools,
        }
    }

    fn net(host: &str) -> Capabilities {
        Capabilities {
            network: vec![host.into()],
            ..Default::default()
        }
    }

    fn granted() -> Grants {
        Grants {
            fs: vec![FsGrant {
                host: "/srv/data".into(),
                guest: "/data".into(),
                mode: FsMode::ReadWrite,
                identity: None,
            }],
            net: vec!["api.example.com".into()],
            env: vec!["TOKEN".into()],
            allow_private_network: false,
        }
    }

    /// 1.0 narrows its grants per tool (only `fetch` may reach the API, only `save` write /data);
    /// 1.1 declares nothing, so every tool would get every grant.
    fn narrowed_then_undeclared() -> (PluginInfo, PluginInfo) {
        let writes = Capabilities {
            filesystem: vec![FsRequest {
                path: "/data".into(),
                mode: FsMode::ReadWrite,
            }],
            environment: vec!["TOKEN".into()],
            ..Default::default()
        };
        let old = plugin(
            "1.0",
            vec![
                tool("fetch", net("api.example.com")),
                tool("save", writes),
                tool("format", Capabilities::default()),
            ],
        );
        let new = plugin(
            "1.1",
            vec![
                tool("fetch", Capabilities::default()),
                tool("save", Capabilities::default()),
                tool("format", Capabilities::default()),
            ],
        );
        (old, new)
    }

    #[test]
    fn a_version_that_stops_declaring_would_widen_every_tool() {
        let (old, new) = narrowed_then_undeclared();
        // It requests nothing, so nothing "beyond" what 1.0 requested...
        assert!(requests_beyond(&new.requested(), &old.requested()).is_empty());
        // ...but with the same grants its tools reach more than 1.0's did.
        let beyond = reach_beyond(&new, &old, &granted());
        assert!(
            beyond.iter().any(|b| b == "tool format: net api.example.com"),
            "{beyond:?}"
        );
        assert!(beyond.iter().any(|b| b == "tool format: env TOKEN"), "{beyond:?}");
        assert!(
            beyond.iter().any(|b| b == "tool format: /data (read-write)"),
            "{beyond:?}"
        );
        assert!(
            beyond.iter().any(|b| b == "tool fetch: /data (read-write)"),
            "{beyond:?}"
        );
        assert!(
            beyond.iter().any(|b| b == "tool save: net api.example.com"),
            "{beyond:?}"
        );
        assert!(
            !beyond.iter().any(|b| b == "tool fetch: net api.example.com"),
            "{beyond:?}"
        );
    }

    #[test]
    fn the_same_reach_or_less_is_not_beyond() {
        let (old, new) = narrowed_then_undeclared();
        let grants = granted();
        assert!(reach_beyond(&old, &old, &grants).is_empty());
        // Going the other way narrows every tool.
        assert!(reach_beyond(&old, &new, &grants).is_empty());
        // A new tool reaching only what an old tool reached is within.
        let mut more = old.clone();
        more.tools.push(tool("fetch2", net("api.example.com")));
        assert!(reach_beyond(&more, &old, &grants).is_empty());
        // A tool narrowed to a sub-directory of what it had is within.
        let mut sub = old.clone();
        sub.tools[1].capabilities.filesystem[0].path = "/data/sub".into();
        assert!(reach_beyond(&sub, &old, &grants).is_empty());
        // Nothing granted: nothing to reach.
        assert!(reach_beyond(&new, &old, &Grants::default()).is_empty());
    }
}
