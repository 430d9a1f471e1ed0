//! The plugin registry contract: which plugins are installed, what they offer, what they were
//! granted. keel-store implements it on SQLite, [`crate::memory::MemoryRegistry`] in memory, and
//! `conformance::plugin_registry` (feature `conformance`) is the behaviour both pass.
//!
//! The record is plain data: what belongs to keel-sandbox (the `describe` result, the grants, the
//! limits) is JSON here, so neither the kernel nor a store depends on the sandbox; the layer
//! above both (the application) decodes it with the sandbox's types.

use futures::future::BoxFuture;
use serde_json::Value;

use crate::store::StoreResult;

/// One installed plugin. Its identity is this record (name + sha256), never what the component
/// says about itself later.
#[derive(Debug, Clone, PartialEq)]
pub struct PluginRecord {
    /// Plugin name (unique).
    pub name: String,
    /// Plugin version as described by the plugin.
    pub version: String,
    /// Plugin description.
    pub description: String,
    /// sha256 of the component bytes (hex).
    pub sha256: String,
    /// The `describe` result.
    pub info: Value,
    /// The WASI / host interfaces the component imports.
    pub imports: Value,
    /// Capabilities granted by the user.
    pub grants: Value,
    /// Per-plugin limits overriding the global defaults.
    pub limits: Value,
    /// RFC 3339 time of first install (set by the registry).
    pub installed_at: String,
    /// RFC 3339 time of the last change (set by the registry).
    pub updated_at: String,
}

/// What identifies one state of a plugin's record: it changes whenever the record does (install,
/// upgrade, grant, revoke, new limits), so a caller that keeps what it derived from a record can
/// check it is current with one short read ([`PluginRegistry::plugin_stamp`]) instead of reading
/// and decoding the whole record on every call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginStamp {
    /// The component (a new component is a new record).
    pub sha256: String,
    /// The registry's time of the last change.
    pub updated_at: String,
    /// The grants, as stored (compared as text: a change of grants is a change of stamp even
    /// within one clock tick).
    pub grants: String,
    /// The per-plugin limits, as stored.
    pub limits: String,
    /// The scope (tenant) that owns the plugin, which alone may see and call it; `None`: the
    /// home's, visible to every scope (and always `None` from a registry that records no owners).
    pub owner: Option<String>,
}

impl PluginStamp {
    /// The stamp of `record`.
    pub fn of(record: &PluginRecord) -> Self {
        Self {
            sha256: record.sha256.clone(),
            updated_at: record.updated_at.clone(),
            grants: record.grants.to_string(),
            limits: record.limits.to_string(),
            owner: None,
        }
    }
}

/// Durable storage for the installed plugins.
pub trait PluginRegistry: Send + Sync + std::fmt::Debug {
    /// Insert or replace the plugin named `record.name`, keeping its original install time
    /// (`installed_at` / `updated_at` in `record` are ignored: the registry sets them).
    fn upsert_plugin<'a>(&'a self, record: &'a PluginRecord) -> BoxFuture<'a, StoreResult<()>>;
    /// The plugin named `name`, if installed.
    fn get_plugin<'a>(&'a self, name: &'a str) -> BoxFuture<'a, StoreResult<Option<PluginRecord>>>;
    /// All installed plugins, by name.
    fn list_plugins(&self) -> BoxFuture<'_, StoreResult<Vec<PluginRecord>>>;
    /// The [`PluginStamp`] of plugin `name`, if installed: one short read that tells a caller
    /// whether what it derived from the record (a prepared component, parsed grants and limits)
    /// is still current. The default reads the whole record; a store should read only the stamp.
    fn plugin_stamp<'a>(&'a self, name: &'a str) -> BoxFuture<'a, StoreResult<Option<PluginStamp>>> {
        Box::pin(async move { Ok(self.get_plugin(name).await?.as_ref().map(PluginStamp::of)) })
    }
    /// Replace the grants of plugin `name`; `NotFound { entity: "plugin" }` if it is not installed.
    fn set_plugin_grants<'a>(&'a self, name: &'a str, grants: &'a Value) -> BoxFuture<'a, StoreResult<()>>;
    /// Remove plugin `name`; whether it existed.
    fn remove_plugin<'a>(&'a self, name: &'a str) -> BoxFuture<'a, StoreResult<bool>>;
    /// Whether any installed plugin still references the component `sha256` (before deleting
    /// the component's bytes).
    fn component_in_use<'a>(&'a self, sha256: &'a str) -> BoxFuture<'a, StoreResult<bool>>;
}

/// The `NotFound` a registry reports for plugin `name` ("plugin `name` not found").
pub fn plugin_not_found(name: &str) -> crate::store::StoreError {
    crate::store::StoreError::NotFound {
        entity: "plugin",
        id: format!("`{name}`"),
    }
}
