//! The pieces a command needs, opened from the Keel home: database, component store, sandbox, config.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use keel_sandbox::{CacheKey, ComponentStore, Grants, Limits, PluginInfo, PreparedPlugin, Sandbox, SandboxConfig};
use keel_store::Database;
use keel_store::plugins::PluginRecord;
// The registry is a kernel trait; `Database` implements it.
use keel_kernel::registry::PluginRegistry as _;
use serde::Deserialize;

use crate::error::AppError;

/// `$XDG_DATA_HOME/keel`, else `~/.local/share/keel`, else `./.keel`.
pub fn default_home() -> PathBuf {
    if let Some(data) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(data).join("keel");
    }
    match std::env::var_os("HOME").filter(|v| !v.is_empty()) {
        Some(home) => PathBuf::from(home).join(".local/share/keel"),
        None => PathBuf::from(".keel"),
    }
}

/// `$KEEL_HOME/config.toml`. Every field is optional; unknown keys are errors.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KeelConfig {
    /// Global per-call limits (field names as in `keel_sandbox::Limits`).
    pub limits: Limits,
    /// Engine settings.
    pub sandbox: SandboxSettings,
    /// Model providers and prices (`[models]`, see keel-models); a relative `script` path of a scripted
    /// provider is resolved against the Keel home.
    pub models: keel_models::ModelsConfig,
    /// Agent-loop tunables (`[agent]`: `lease_ttl_ms`, `approval_ttl_secs`, `poll_ms`, ...).
    pub agent: keel_kernel::AgentConfig,
    /// The database (`[store]`: `durability`).
    pub store: StoreSettings,
    /// What the MCP server (`keel mcp`, `/mcp` of `keel serve`) offers (`[mcp]`, see keel-mcp).
    pub mcp: McpSettings,
}

/// Database settings from `[store]`.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreSettings {
    /// `"full"` (default: a commit survives a power loss) or `"normal"` (a commit survives the
    /// process being killed, not a power loss; no fsync per commit). See `keel_store::Durability`.
    pub durability: keel_store::Durability,
}

/// `[mcp]`: which installed tools MCP clients see, and how long a call waits for an approval.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct McpSettings {
    /// `plugin/tool` globs offered to MCP clients (a bare `plugin` means all its tools); empty:
    /// every installed tool.
    pub tools: Vec<String>,
    /// `plugin/tool` globs never offered, even when `tools` matches them.
    pub exclude: Vec<String>,
    /// How long a `tools/call` waiting for an approval that the client cannot give (no
    /// elicitation) keeps the request open before it answers `approval_pending`; the job
    /// itself goes on and finishes when someone approves.
    pub approval_wait_secs: u64,
    /// How often the server checks the plugin registry for installs, upgrades and removals
    /// (`notifications/tools/list_changed`), in milliseconds.
    pub watch_ms: u64,
    /// For MCP clients that support tasks: how long a `tools/call` may run before the server
    /// answers with a task instead of waiting (a call waiting for an approval becomes a task at
    /// once), in milliseconds.
    pub task_after_ms: u64,
}

impl Default for McpSettings {
    fn default() -> Self {
        Self {
            tools: Vec::new(),
            exclude: Vec::new(),
            // Under the 60 s request timeout of common MCP clients.
            approval_wait_secs: 50,
            watch_ms: 500,
            task_after_ms: 1000,
        }
    }
}

/// Engine settings from `[sandbox]`.
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SandboxSettings {
    /// Meter fuel (enables `limits.fuel`).
    pub fuel_metering: bool,
    /// Ceiling on any memory limit, in bytes.
    pub max_memory_bytes: u64,
    /// Concurrent instance slots.
    pub pool_instances: u32,
    /// Wall-clock bound on preparing a plugin (validating, compiling it to native code on first
    /// use, pre-linking, running `describe()`), in milliseconds. Compiling a large component
    /// (CPython is ~19 MB, a JS engine ~12 MB) takes minutes on a small, busy machine, so the
    /// default is generous (10 minutes); compiled code is cached, so only the first prepare pays.
    /// From 1 000 (1 s) to 86 400 000 (a day).
    pub prepare_timeout_ms: u64,
    /// Ready (pre-instantiated) instances kept per plugin tool once it has been called, so a
    /// call starts without instantiating; 0 turns the pool off. See
    /// `keel_sandbox::SandboxConfig::ready_instances`.
    pub ready_instances: usize,
    /// Bytes of each linear memory kept resident (reset in place) when an instance ends, so the
    /// next instance of the same plugin starts on resident pages (16 MiB by default; 0: none).
    /// See `keel_sandbox::SandboxConfig::memory_keep_resident_bytes`.
    pub memory_keep_resident_bytes: usize,
}

/// The range [`SandboxSettings::prepare_timeout_ms`] accepts.
const PREPARE_TIMEOUT_MS: std::ops::RangeInclusive<u64> = 1_000..=86_400_000;

impl Default for SandboxSettings {
    fn default() -> Self {
        let defaults = SandboxConfig::new("");
        Self {
            fuel_metering: defaults.fuel_metering,
            max_memory_bytes: defaults.max_memory_bytes,
            pool_instances: defaults.pool_instances,
            prepare_timeout_ms: defaults.describe.prepare_timeout_ms,
            ready_instances: defaults.ready_instances,
            memory_keep_resident_bytes: defaults.memory_keep_resident_bytes,
        }
    }
}

/// Allowed `[sandbox] pool_instances`.
const POOL_INSTANCES: std::ops::RangeInclusive<u32> = 1..=1000;
/// Allowed `[sandbox] max_memory_bytes`.
const MAX_MEMORY_BYTES: std::ops::RangeInclusive<u64> = (1 << 20)..=(4 << 30);

impl SandboxSettings {
    /// Check values a type cannot: one clear sentence naming the key when one is out of range.
    fn check(&self) -> Result<(), String> {
        if !PREPARE_TIMEOUT_MS.contains(&self.prepare_timeout_ms) {
            return Err(format!(
                "[sandbox] `prepare_timeout_ms` is {}; it must be from {} (1 s) to {} (a day) milliseconds",
                self.prepare_timeout_ms,
                PREPARE_TIMEOUT_MS.start(),
                PREPARE_TIMEOUT_MS.end()
            ));
        }
        // What the pooling allocator can reserve: each slot holds two memories of up to 4 GiB
        // (plus guards) in one address space.
        if !POOL_INSTANCES.contains(&self.pool_instances) {
            return Err(format!(
                "[sandbox] `pool_instances` is {}; it must be from {} to {}",
                self.pool_instances,
                POOL_INSTANCES.start(),
                POOL_INSTANCES.end()
            ));
        }
        if !MAX_MEMORY_BYTES.contains(&self.max_memory_bytes) {
            return Err(format!(
                "[sandbox] `max_memory_bytes` is {}; it must be from {} (1 MiB) to {} (4 GiB, a 32-bit memory)",
                self.max_memory_bytes,
                MAX_MEMORY_BYTES.start(),
                MAX_MEMORY_BYTES.end()
            ));
        }
        if self.memory_keep_resident_bytes as u64 > self.max_memory_bytes {
            return Err(format!(
                "[sandbox] `memory_keep_resident_bytes` is {}; it must be at most `max_memory_bytes` ({})",
                self.memory_keep_resident_bytes, self.max_memory_bytes
            ));
        }
        Ok(())
    }
}

impl KeelConfig {
    /// Load `home/config.toml` if it exists.
    pub fn load(home: &Path) -> Result<Self, AppError> {
        let path = home.join("config.toml");
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let mut config: Self = toml::from_str(&text).map_err(|e| {
                    AppError::user(format!(
                        "{}: {}",
                        path.display(),
                        e.to_string().lines().collect::<Vec<_>>().join(" ")
                    ))
                })?;
                config
                    .sandbox
                    .check()
                    .map_err(|e| AppError::user(format!("{}: {e}", path.display())))?;
                config
                    .agent
                    .check()
                    .map_err(|e| AppError::user(format!("{}: [agent] {e}", path.display())))?;
                config
                    .limits
                    .check(config.sandbox.max_memory_bytes)
                    .and_then(|()| unmetered_fuel(&config.limits, &config.sandbox))
                    .map_err(|e| AppError::user(format!("{}: [limits] {e}", path.display())))?;
                // Relative to the config file, not to wherever `keel` happens to be started.
                for provider in config.models.providers.values_mut() {
                    if let Some(script) = provider.script.as_mut().filter(|s| s.is_relative()) {
                        *script = home.join(&*script);
                    }
                }
                Ok(config)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(AppError::internal(format!("cannot read {}: {e}", path.display()))),
        }
    }
}

/// Refuse a fuel limit the sandbox would not enforce: without fuel metering it would be shown as in
/// force and never apply.
fn unmetered_fuel(limits: &Limits, sandbox: &SandboxSettings) -> Result<(), String> {
    match limits.fuel {
        Some(fuel) if !sandbox.fuel_metering => Err(format!(
            "a fuel limit ({fuel}) needs fuel metering, which is off: set `fuel_metering = true` under \
             [sandbox] in config.toml, or give no fuel limit"
        )),
        _ => Ok(()),
    }
}

/// Create the Keel home, or tighten an existing one, so only its owner can enter it: the home,
/// `cache/` and `components/` are made owner-only (0700), whatever the umask (the database, its
/// grants and its job history are private). Called by every command before it opens the database.
pub fn prepare_home(home: &Path) -> Result<(), AppError> {
    check_is_a_home(home)?;
    if let Some(parent) = home.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .map_err(|e| AppError::user(format!("cannot create Keel home {}: {e}", home.display())))?;
    }
    let own = !someone_elses_directory(home);
    let dirs = [home.to_path_buf(), home.join("cache"), home.join("components")];
    for dir in dirs.iter().skip(usize::from(!own)) {
        private_dir(dir).map_err(|e| AppError::user(format!("cannot create Keel home {}: {e}", dir.display())))?;
    }
    Ok(())
}

/// Refuse a directory that cannot be a Keel home: another user's, or a shared one (sticky bit,
/// like `/tmp`), which making owner-only would break for everyone else.
fn check_is_a_home(home: &Path) -> Result<(), AppError> {
    let Ok(meta) = std::fs::metadata(home) else {
        return Ok(());
    };
    let refuse = |why: &str| {
        Err(AppError::user(format!(
            "{} is not a Keel home ({why}); name a new or empty directory with --home or KEEL_HOME",
            home.display()
        )))
    };
    if !meta.is_dir() {
        return refuse("not a directory");
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt as _;
        // SAFETY: geteuid has no preconditions and cannot fail.
        let me = unsafe { libc::geteuid() };
        if meta.uid() != me {
            return refuse("it belongs to another user");
        }
        if meta.mode() & 0o1000 != 0 {
            return refuse("it is a shared directory: its sticky bit is set");
        }
    }
    Ok(())
}

/// What Keel itself keeps in a home (and what a person or `keel demo` puts there for it).
const HOME_ENTRIES: &[&str] = &[
    "keel.db",
    "keel.db-wal",
    "keel.db-shm",
    "cache",
    "components",
    "config.toml",
    "policy.toml",
    "demo-script.json",
    "work",
];

/// Whether `home` holds anything Keel does not keep there (a project or `$HOME` named as the
/// home): Keel keeps its own files in it private but leaves the directory's mode alone.
fn someone_elses_directory(home: &Path) -> bool {
    std::fs::read_dir(home).is_ok_and(|entries| {
        entries
            .flatten()
            .any(|e| e.file_name().to_str().is_none_or(|name| !HOME_ENTRIES.contains(&name)))
    })
}

/// Create `dir` with mode 0700, or set an existing directory's mode to 0700 if others have any access.
fn private_dir(dir: &Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    match builder.create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => {}
        Err(e) => return Err(e),
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir)?.permissions().mode();
        if mode & 0o077 != 0 {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode & 0o700 | 0o700))?;
        }
    }
    Ok(())
}

/// The key sealing the home's precompiled artifacts, kept in its database (see
/// `keel_sandbox::cache`). A key file a Keel before this one kept in `cache/` is removed: it is
/// not trusted, and the artifacts it sealed are recompiled once.
async fn artifact_key(db: &Database, home: &Path) -> Result<CacheKey, AppError> {
    let mut candidate = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut candidate);
    let key = db.artifact_key(candidate).await?;
    match std::fs::remove_file(home.join("cache").join("artifact.key")) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::debug!(error = %e, "could not remove the old cache/artifact.key"),
    }
    Ok(CacheKey(key))
}

/// Everything a plugin command needs.
pub struct App {
    /// The Keel home (canonical).
    pub home: PathBuf,
    /// The database.
    pub db: Database,
    /// The sandbox.
    pub sandbox: Sandbox,
    /// Component bytes by sha256.
    pub components: ComponentStore,
    /// Global configuration.
    pub config: KeelConfig,
}

impl App {
    /// Open (creating if needed) the Keel home.
    pub async fn open(home: &Path) -> Result<Self, AppError> {
        Self::open_tuned(home, |_| {}).await
    }

    /// [`App::open`] for a process that makes one tool call and exits (`keel call`, `keel exec`): no
    /// ready instances (nothing would take them) and no linear memory kept resident when an
    /// instance ends (no later instance would start on it; keeping 16 MiB resident is a memset
    /// that faults in every page of it: `keel exec --lang python -c 'print(1)'` took 61.2 ms with
    /// it and 42.4 ms without, CPU 54.6 -> 37.7 ms, same binary, load 3.5). Limits, grants and
    /// the pool's bounds are the home's.
    pub async fn open_for_one_call(home: &Path) -> Result<Self, AppError> {
        Self::open_tuned(home, |sandbox| {
            sandbox.ready_instances = 0;
            sandbox.memory_keep_resident_bytes = 0;
        })
        .await
    }

    async fn open_tuned(home: &Path, tune: impl FnOnce(&mut SandboxConfig)) -> Result<Self, AppError> {
        prepare_home(home)?;
        let home = &std::fs::canonicalize(home)
            .map_err(|e| AppError::user(format!("cannot open Keel home {}: {e}", home.display())))?;
        let config = KeelConfig::load(home)?;
        let db = Database::open_with(&home.join("keel.db"), config.store.durability).await?;
        let mut sandbox_config = SandboxConfig::new(home.join("cache"));
        sandbox_config.cache_key = Some(artifact_key(&db, home).await?);
        sandbox_config.default_limits = config.limits.clone();
        sandbox_config.fuel_metering = config.sandbox.fuel_metering;
        sandbox_config.max_memory_bytes = config.sandbox.max_memory_bytes;
        sandbox_config.pool_instances = config.sandbox.pool_instances;
        sandbox_config.describe.prepare_timeout_ms = config.sandbox.prepare_timeout_ms;
        sandbox_config.ready_instances = config.sandbox.ready_instances;
        sandbox_config.memory_keep_resident_bytes = config.sandbox.memory_keep_resident_bytes;
        tune(&mut sandbox_config);
        let sandbox = Sandbox::new(sandbox_config)?;
        Ok(Self {
            home: home.clone(),
            db,
            sandbox,
            components: ComponentStore::new(home.join("components")),
            config,
        })
    }

    /// The record of installed plugin `name`, or a user error listing what is installed.
    pub async fn record(&self, name: &str) -> Result<PluginRecord, AppError> {
        match self.db.get_plugin(name).await? {
            Some(record) => Ok(record),
            None => {
                let installed: Vec<String> = self.db.list_plugins().await?.into_iter().map(|p| p.name).collect();
                let hint = if installed.is_empty() {
                    "no plugins are installed; use `keel install FILE.wasm`".to_string()
                } else {
                    format!("installed: {}", installed.join(", "))
                };
                Err(AppError::user(format!("no plugin named `{name}` ({hint})")))
            }
        }
    }

    /// Prepare an installed plugin for calls, with its grants and effective limits. Refused when
    /// the component no longer describes itself as the registry recorded it at install time, or
    /// when its grants reach the Keel home.
    pub async fn load(&self, record: &PluginRecord) -> Result<(Arc<PreparedPlugin>, Grants, Limits), AppError> {
        let plugin = self.prepare_record(record).await?;
        self.verify(record, &plugin)
    }

    /// Prepare the stored component of `record`: its verified precompiled artifact is mapped
    /// without reading or re-hashing the component (the store checked it at install); without one,
    /// the component is read, checked against its hash and compiled. Its identity is not checked
    /// yet: see [`App::verify`].
    pub async fn prepare_record(&self, record: &PluginRecord) -> Result<Arc<PreparedPlugin>, AppError> {
        Ok(self
            .sandbox
            .prepare_stored(&self.components, &record.sha256, &record.name)
            .await?)
    }

    /// Check a prepared component against its registry record (the record is the plugin's
    /// identity; `describe()` may answer differently now), and return its grants and limits.
    pub fn verify(
        &self,
        record: &PluginRecord,
        plugin: &Arc<PreparedPlugin>,
    ) -> Result<(Arc<PreparedPlugin>, Grants, Limits), AppError> {
        let recorded: PluginInfo = serde_json::from_value(record.info.clone())
            .map_err(|e| AppError::internal(format!("stored description of `{}` is invalid: {e}", record.name)))?;
        if plugin.sha256 != record.sha256 {
            return Err(AppError::internal(format!(
                "the component loaded for `{}` is not the one installed",
                record.name
            )));
        }
        identity_mismatch(&record.name, &recorded, &plugin.info).map_or(Ok(()), |why| {
            Err(AppError::user(format!(
                "plugin `{}` is refused: {why}; reinstall it (`keel install FILE --replace`) if you trust it",
                record.name
            )))
        })?;
        let grants = grants_of(record)?;
        self.check_grants(&grants)
            .map_err(|e| AppError::user(format!("plugin `{}` is refused: {e}", record.name)))?;
        let limits = self.limits_of(record).map_err(|e| {
            AppError::user(format!(
                "plugin `{}`: {}; change it with `keel plugins limits {}`",
                record.name, e.message, record.name
            ))
        })?;
        Ok((plugin.clone(), grants, limits))
    }

    /// The limits a plugin's calls run under: the global `[limits]` with its own overrides
    /// applied; a user error when no call could run under them (see [`Limits::check`]).
    pub fn limits_of(&self, record: &PluginRecord) -> Result<Limits, AppError> {
        self.limits_over(&record.limits)
    }

    /// The global `[limits]` with `overrides` applied (a plugin's stored ones, or a call's flags
    /// as `keel_sandbox::Limits` field names); a user error when no call could run under them.
    pub fn limits_over(&self, overrides: &serde_json::Value) -> Result<Limits, AppError> {
        let limits = self
            .config
            .limits
            .overridden_by(overrides)
            .map_err(|e| invalid_limit(e.to_string()))?;
        self.checked_limits(limits)
    }

    /// `limits`, if a call could run under them in this home's sandbox (see [`Limits::check`]).
    pub fn checked_limits(&self, limits: Limits) -> Result<Limits, AppError> {
        limits
            .check(self.config.sandbox.max_memory_bytes)
            .map_err(invalid_limit)?;
        Ok(limits)
    }

    /// [`checked_limits`](Self::checked_limits) for limits being given now (a flag, `keel plugins
    /// limits`, an install): also refused when they hold a fuel limit this home would not
    /// enforce. Not checked when a stored record is loaded, so a plugin whose limits were set
    /// before this check keeps working.
    pub fn settable_limits(&self, limits: Limits) -> Result<Limits, AppError> {
        let limits = self.checked_limits(limits)?;
        unmetered_fuel(&limits, &self.config.sandbox).map_err(invalid_limit)?;
        Ok(limits)
    }

    /// Refuse any directory grant that contains the Keel home, or lies in its `components` or
    /// `cache` directory: a plugin with it could read or rewrite the database, components and
    /// precompiled code of every plugin. Compared by path and by identity (device and inode), so
    /// another name for the same directory (a bind mount of the home or of an ancestor, the same
    /// volume mounted twice) is refused too.
    pub fn check_grants(&self, grants: &Grants) -> Result<(), String> {
        if grants.fs.is_empty() {
            return Ok(());
        }
        let home_chain: Vec<Identity> = self.home.ancestors().filter_map(identity).collect();
        let home_id = home_chain.first().copied();
        for grant in &grants.fs {
            let dir = &grant.host;
            if self.home.starts_with(dir) || identity(dir).is_some_and(|id| home_chain.contains(&id)) {
                return Err(format!(
                    "the directory {} contains the Keel home {} (its database, components and cache); grant a directory that does not",
                    dir.display(),
                    self.home.display()
                ));
            }
            // Where `dir` lies in the home, if one of its ancestors is the home by any name.
            let in_home = dir.strip_prefix(&self.home).ok().or_else(|| {
                dir.ancestors()
                    .find(|a| home_id.is_some() && identity(a) == home_id)
                    .and_then(|alias| dir.strip_prefix(alias).ok())
            });
            for own in ["components", "cache"] {
                if in_home.is_some_and(|rest| rest.starts_with(own)) {
                    return Err(format!(
                        "the directory {} is inside the Keel home's `{own}` directory, which only Keel may touch",
                        dir.display()
                    ));
                }
            }
        }
        Ok(())
    }
}

/// A directory's device and inode (symbolic links followed), if it can be read.
type Identity = (u64, u64);

fn identity(path: &Path) -> Option<Identity> {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// Why `described` (what the component's `describe()` answers now) is not the plugin the registry
/// recorded as `name` at install time, or `None` when it is. Name and tools (names, schemas,
/// descriptions, capability requests) must be identical.
pub fn identity_mismatch(name: &str, recorded: &PluginInfo, described: &PluginInfo) -> Option<String> {
    if described.name != name {
        return Some(format!(
            "its component now describes itself as `{}`, but it was installed as `{name}`",
            described.name
        ));
    }
    let names = |info: &PluginInfo| info.tools.iter().map(|t| t.name.clone()).collect::<Vec<_>>();
    if names(recorded) != names(described) {
        return Some(format!(
            "its component now offers the tools [{}], but it was installed with [{}]",
            names(described).join(", "),
            names(recorded).join(", ")
        ));
    }
    for (old, new) in recorded.tools.iter().zip(&described.tools) {
        if old.capabilities != new.capabilities {
            return Some(format!(
                "tool `{}` now requests other capabilities than it did at install",
                old.name
            ));
        }
        if old != new {
            return Some(format!(
                "tool `{}` now describes itself differently than at install",
                old.name
            ));
        }
    }
    None
}

/// Decode a record's stored grants.
pub fn grants_of(record: &PluginRecord) -> Result<Grants, AppError> {
    serde_json::from_value(record.grants.clone())
        .map_err(|e| AppError::internal(format!("stored grants of `{}` are invalid: {e}", record.name)))
}

/// A limit no call could run under, as the user's error.
pub(crate) fn invalid_limit(why: String) -> AppError {
    AppError::user(format!("invalid limit: {why}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `config.toml` with `text` loaded from a fresh home: the config, or the error's sentence.
    fn load(text: &str) -> Result<KeelConfig, String> {
        let home = tempfile::tempdir().unwrap();
        std::fs::write(home.path().join("config.toml"), text).unwrap();
        KeelConfig::load(home.path()).map_err(|e| e.message)
    }

    #[test]
    fn the_prepare_limit_is_a_checked_sandbox_setting() {
        // Default: generous enough to compile CPython on a loaded machine.
        assert_eq!(load("").unwrap().sandbox.prepare_timeout_ms, 600_000);
        assert_eq!(
            load("[sandbox]\nprepare_timeout_ms = 1800000\n")
                .unwrap()
                .sandbox
                .prepare_timeout_ms,
            1_800_000
        );
        // A misspelt key, a value of the wrong type and one out of range: one clear line each,
        // naming the file and the key.
        for (text, needle) in [
            (
                "[sandbox]\nprepare_timout_ms = 1000\n",
                "unknown field `prepare_timout_ms`",
            ),
            ("[sandbox]\nprepare_timeout_ms = \"10m\"\n", "prepare_timeout_ms"),
            ("[sandbox]\nprepare_timeout_ms = -1\n", "prepare_timeout_ms"),
            (
                "[sandbox]\nprepare_timeout_ms = 0\n",
                "`prepare_timeout_ms` is 0; it must be from 1000",
            ),
            (
                "[sandbox]\nprepare_timeout_ms = 100000000\n",
                "must be from 1000 (1 s) to 86400000",
            ),
            (
                "[sandbox]\nmax_memory_bytes = 1048576\nmemory_keep_resident_bytes = 2097152\n",
                "must be at most `max_memory_bytes` (1048576)",
            ),
        ] {
            let error = load(text).err().unwrap_or_else(|| panic!("accepted: {text}"));
            assert!(
                error.contains("config.toml") && error.contains(needle),
                "{text}: {error}"
            );
            assert!(!error.contains('\n'), "one line: {error}");
        }
    }
}
