//! Plugin administration: list, show, grant, revoke, limits, remove. (Install is in
//! [`crate::install`].) The registry is global to a Keel home for now: the caller's role is
//! checked, its scope does not narrow what it sees.

use std::path::Path;

use keel_kernel::registry::PluginRegistry as _;
use keel_sandbox::{FsGrant, FsMode, Grants, ImportSummary, Limits, PluginInfo};
use serde::Serialize;
use serde_json::{Value, json};

pub use keel_kernel::registry::PluginRecord;

use crate::caller::{Caller, Role};
use crate::error::AppError;
use crate::home::{App, grants_of, invalid_limit};
use crate::install::effect_warnings;

/// Grants to add (the `--allow-*` flags of `install`, `plugins grant` and `exec`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GrantRequest {
    /// Read-only directories: `DIR`, or `DIR::GUEST_PATH` to remap.
    pub read: Vec<String>,
    /// Read-write directories: `DIR`, or `DIR::GUEST_PATH`.
    pub write: Vec<String>,
    /// Outbound HTTP hosts: `host`, `*.host`, optionally `:port`.
    pub net: Vec<String>,
    /// Environment variables passed through by name.
    pub env: Vec<String>,
    /// Allow HTTP to loopback/private/link-local/metadata addresses.
    pub allow_private_network: bool,
}

impl GrantRequest {
    /// True when nothing would be granted.
    pub fn is_empty(&self) -> bool {
        self.read.is_empty()
            && self.write.is_empty()
            && self.net.is_empty()
            && self.env.is_empty()
            && !self.allow_private_network
    }

    /// Add these grants to `grants` (validated; duplicates collapse, a write grant upgrades a read
    /// one). No directory grant may reach the Keel home of `app` (see [`App::check_grants`]).
    pub fn apply(&self, app: &App, grants: &mut Grants) -> Result<(), AppError> {
        let specs = self
            .read
            .iter()
            .map(|s| (s, FsMode::Read))
            .chain(self.write.iter().map(|s| (s, FsMode::ReadWrite)));
        for (spec, mode) in specs {
            let grant = FsGrant::parse(spec, mode)?;
            match grants
                .fs
                .iter_mut()
                .find(|g| g.host == grant.host && g.guest == grant.guest)
            {
                Some(existing) => {
                    existing.mode = existing.mode.max(mode);
                    // Granting it again accepts the directory there now.
                    existing.identity = grant.identity;
                }
                None => grants.fs.push(grant),
            }
        }
        for host in &self.net {
            keel_sandbox::grants::validate_host_pattern(host)?;
            if !grants.net.iter().any(|h| h.eq_ignore_ascii_case(host)) {
                grants.net.push(host.to_ascii_lowercase());
            }
        }
        for var in &self.env {
            keel_sandbox::grants::validate_env_name(var)?;
            if !grants.env.contains(var) {
                grants.env.push(var.clone());
            }
        }
        grants.allow_private_network |= self.allow_private_network;
        app.check_grants(grants)
            .map_err(|e| AppError::user(format!("refused grant: {e}")))
    }
}

/// Grants to remove (`plugins revoke`). Each named grant must exist.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RevokeRequest {
    /// Directory grants, by host or guest path.
    pub dirs: Vec<String>,
    /// Network host patterns.
    pub net: Vec<String>,
    /// Environment variables.
    pub env: Vec<String>,
    /// Revoke access to private networks.
    pub private_network: bool,
    /// Revoke everything first.
    pub all: bool,
}

/// Per-call limit overrides (`--memory-mb`, `--timeout-ms`, `--fuel`, `--max-output-bytes`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitOverrides {
    /// Memory cap per call, in MiB.
    pub memory_mb: Option<u64>,
    /// Wall-clock deadline per call, in milliseconds.
    pub timeout_ms: Option<u64>,
    /// Fuel per call.
    pub fuel: Option<u64>,
    /// Maximum tool output size, in bytes.
    pub max_output_bytes: Option<u64>,
}

impl LimitOverrides {
    /// The overrides as stored with a plugin (field names of `keel_sandbox::Limits`).
    pub fn to_map(&self) -> serde_json::Map<String, Value> {
        let mut map = serde_json::Map::new();
        if let Some(mb) = self.memory_mb {
            // Saturating: a shift would wrap 2^44 MiB to a 0-byte cap; the ceiling check refuses this.
            map.insert("memory_bytes".into(), json!(mb.saturating_mul(1 << 20)));
        }
        if let Some(ms) = self.timeout_ms {
            map.insert("timeout_ms".into(), json!(ms));
        }
        if let Some(fuel) = self.fuel {
            map.insert("fuel".into(), json!(fuel));
        }
        if let Some(bytes) = self.max_output_bytes {
            map.insert("max_output_bytes".into(), json!(bytes));
        }
        map
    }

    /// `limits` with these overrides applied; an impossible value is the user's error (a memory
    /// cap above the sandbox's ceiling is refused where the ceiling is known: by the [`App`]).
    pub fn apply(&self, limits: &Limits) -> Result<Limits, AppError> {
        let limits = limits
            .overridden_by(&Value::Object(self.to_map()))
            .map_err(|e| invalid_limit(e.to_string()))?;
        limits.check(u64::MAX).map_err(invalid_limit)?;
        Ok(limits)
    }
}

/// One installed plugin as a front end shows it (`plugins list/show --json`, `GET /v1/plugins`).
/// The stored description, imports and grants are passed through as recorded.
#[derive(Debug, Clone, Serialize)]
pub struct PluginView {
    /// Registry name.
    pub name: String,
    /// Version the component described at install.
    pub version: String,
    /// Description.
    pub description: String,
    /// sha256 of the component.
    pub sha256: String,
    /// The tools (name, description, schemas, capability requests).
    pub tools: Value,
    /// The WASI interfaces the component imports (what it could ever reach).
    pub imports: Value,
    /// What the user granted.
    pub grants: Value,
    /// This plugin's own limit overrides.
    pub limit_overrides: Value,
    /// The effective limits (global `[limits]` with the overrides applied).
    pub limits: Option<Limits>,
    /// RFC 3339 time of first install.
    pub installed_at: String,
    /// RFC 3339 time of the last change.
    pub updated_at: String,
    /// The record it was built from (for the typed accessors below).
    #[serde(skip)]
    pub record: PluginRecord,
}

impl PluginView {
    /// The view of `record` under the global `limits`.
    pub fn of(record: &PluginRecord, global: &Limits) -> Self {
        Self {
            name: record.name.clone(),
            version: record.version.clone(),
            description: record.description.clone(),
            sha256: record.sha256.clone(),
            tools: record.info["tools"].clone(),
            imports: record.imports.clone(),
            grants: record.grants.clone(),
            limit_overrides: record.limits.clone(),
            limits: global.overridden_by(&record.limits).ok(),
            installed_at: record.installed_at.clone(),
            updated_at: record.updated_at.clone(),
            record: record.clone(),
        }
    }

    /// The description recorded at install.
    pub fn info(&self) -> Result<PluginInfo, AppError> {
        serde_json::from_value(self.record.info.clone())
            .map_err(|e| AppError::internal(format!("stored description of `{}` is invalid: {e}", self.name)))
    }

    /// The imports recorded at install (none known when unreadable).
    pub fn import_summary(&self) -> ImportSummary {
        serde_json::from_value(self.record.imports.clone()).unwrap_or_default()
    }

    /// The grants.
    pub fn granted(&self) -> Result<Grants, AppError> {
        grants_of(&self.record)
    }

    /// The number of tools.
    pub fn tool_count(&self) -> usize {
        self.tools.as_array().map(Vec::len).unwrap_or(0)
    }
}

/// A plugin's grants after `grant` or `revoke`.
#[derive(Debug, Clone, Serialize)]
#[serde(transparent)]
pub struct GrantsChanged {
    /// The grants now stored.
    pub grants: Grants,
    /// Plugin name.
    #[serde(skip)]
    pub name: String,
    /// Grants that cannot take effect (e.g. network grants for a component without wasi:http).
    #[serde(skip)]
    pub notes: Vec<String>,
}

/// A plugin's limits after `limits`.
#[derive(Debug, Clone, Serialize)]
#[serde(transparent)]
pub struct LimitsChanged {
    /// The effective limits now.
    pub limits: Limits,
    /// Plugin name.
    #[serde(skip)]
    pub name: String,
}

/// What `remove` removed.
#[derive(Debug, Clone, Serialize)]
pub struct Removed {
    /// The removed plugin's name.
    pub removed: String,
}

impl App {
    /// Every installed plugin, by name.
    pub async fn list_plugins(&self, caller: &Caller) -> Result<Vec<PluginView>, AppError> {
        caller.require(Role::Read)?;
        Ok(self
            .db
            .list_plugins()
            .await?
            .iter()
            .map(|r| PluginView::of(r, &self.config.limits))
            .collect())
    }

    /// One installed plugin (a user error listing the installed ones when there is none).
    pub async fn show_plugin(&self, caller: &Caller, name: &str) -> Result<PluginView, AppError> {
        caller.require(Role::Read)?;
        let record = self.record(name).await?;
        Ok(PluginView::of(&record, &self.config.limits))
    }

    /// Add `request`'s grants to plugin `name`.
    pub async fn grant(&self, caller: &Caller, name: &str, request: &GrantRequest) -> Result<GrantsChanged, AppError> {
        caller.require(Role::Admin)?;
        if request.is_empty() {
            return Err(AppError::user(
                "nothing to grant: pass --allow-read, --allow-write, --allow-net or --allow-env",
            ));
        }
        let (record, grants) = self
            .update_record(name, |record| {
                let mut grants = grants_of(record)?;
                request.apply(self, &mut grants)?;
                Ok(grants)
            })
            .await?;
        Ok(self.grants_changed(&record, grants))
    }

    /// Change plugin `name`'s record with `change` (given the current record, it returns the
    /// grants to store) and write it, as one compare-and-set on the record's `updated_at`: if
    /// another command changed the record in between, `change` is applied again to the new one,
    /// so a concurrent grant, revoke or limit change is never overwritten with what was read
    /// before it. Returns the record written and the grants.
    async fn update_record(
        &self,
        name: &str,
        change: impl Fn(&mut PluginRecord) -> Result<Grants, AppError>,
    ) -> Result<(PluginRecord, Grants), AppError> {
        const ATTEMPTS: usize = 32;
        for _ in 0..ATTEMPTS {
            let read = self.record(name).await?;
            let mut record = read.clone();
            let grants = change(&mut record)?;
            record.grants = serde_json::to_value(&grants).expect("grants serialize");
            if self.db.replace_plugin_if(&record, None, Some(&read.updated_at)).await? {
                return Ok((record, grants));
            }
            tokio::task::yield_now().await;
        }
        Err(AppError::internal(format!(
            "`{name}` kept changing while this change was applied ({ATTEMPTS} attempts); try again"
        )))
    }

    /// Remove `request`'s grants from plugin `name`; naming a grant it does not have is an error
    /// (and nothing is changed).
    pub async fn revoke(
        &self,
        caller: &Caller,
        name: &str,
        request: &RevokeRequest,
    ) -> Result<GrantsChanged, AppError> {
        caller.require(Role::Admin)?;
        let (record, grants) = self.update_record(name, |record| revoked(record, request)).await?;
        Ok(self.grants_changed(&record, grants))
    }

    fn grants_changed(&self, record: &PluginRecord, grants: Grants) -> GrantsChanged {
        // Only grants that cannot take effect: what is still not granted is the user's choice,
        // made now.
        let notes = match serde_json::from_value::<ImportSummary>(record.imports.clone()) {
            Ok(imports) => effect_warnings(&imports, &grants),
            Err(_) => Vec::new(),
        };
        GrantsChanged {
            grants,
            name: record.name.clone(),
            notes,
        }
    }

    /// Set plugin `name`'s limit overrides (`reset` drops the previous ones first) and return
    /// the effective limits.
    pub async fn set_limits(
        &self,
        caller: &Caller,
        name: &str,
        overrides: &LimitOverrides,
        reset: bool,
    ) -> Result<LimitsChanged, AppError> {
        caller.require(Role::Admin)?;
        let (record, _) = self
            .update_record(name, |record| {
                let mut map = if reset {
                    serde_json::Map::new()
                } else {
                    record.limits.as_object().cloned().unwrap_or_default()
                };
                map.extend(overrides.to_map());
                record.limits = Value::Object(map);
                // Refused here, before anything is written, if no call could run under them.
                self.settable_limits(self.limits_of(record)?)?;
                grants_of(record)
            })
            .await?;
        let limits = self.limits_of(&record)?;
        Ok(LimitsChanged {
            limits,
            name: name.to_string(),
        })
    }

    /// Uninstall plugin `name`; its component is deleted unless another plugin uses it.
    pub async fn remove_plugin(&self, caller: &Caller, name: &str) -> Result<Removed, AppError> {
        caller.require(Role::Admin)?;
        let record = self.record(name).await?;
        self.db.remove_plugin(name).await?;
        self.drop_component_if_unused(&record.sha256).await?;
        Ok(Removed {
            removed: name.to_string(),
        })
    }
}

/// `record`'s grants with `request`'s revoked; naming a grant it does not have is an error.
fn revoked(record: &PluginRecord, request: &RevokeRequest) -> Result<Grants, AppError> {
    let name = &record.name;
    let mut grants = grants_of(record)?;
    if request.all {
        grants = Grants::default();
    }
    for dir in &request.dirs {
        let canonical = std::fs::canonicalize(dir).ok();
        let before = grants.fs.len();
        grants
            .fs
            .retain(|g| g.guest != *dir && Some(&g.host) != canonical.as_ref() && g.host != Path::new(dir));
        if grants.fs.len() == before {
            return Err(AppError::user(format!("`{name}` has no grant for directory {dir}")));
        }
    }
    for host in &request.net {
        let before = grants.net.len();
        grants.net.retain(|h| !h.eq_ignore_ascii_case(host));
        if grants.net.len() == before {
            return Err(AppError::user(format!("`{name}` has no network grant for {host}")));
        }
    }
    for var in &request.env {
        let before = grants.env.len();
        grants.env.retain(|v| v != var);
        if grants.env.len() == before {
            return Err(AppError::user(format!(
                "`{name}` has no grant for environment variable {var}"
            )));
        }
    }
    if request.private_network {
        grants.allow_private_network = false;
    }
    Ok(grants)
}
