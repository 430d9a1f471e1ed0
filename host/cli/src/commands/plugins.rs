//! `keel install`, `keel plugins ...`, `keel call`, `keel exec`.

use std::io::Read;
use std::path::Path;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use keel_kernel::tool::{ToolCallContext, ToolError};
use keel_sandbox::{FsGrant, FsMode, Grants, Limits, PluginInfo, PreparedPlugin};
use keel_store::plugins::PluginRecord;
use serde_json::{Value, json};

use crate::app::{App, grants_of};
use crate::output::{CliError, CliResult, json_text, print_json, sanitize_line};

/// Capability flags shared by `install`, `plugins grant` and `exec`.
#[derive(Debug, Clone, Default, Args)]
pub struct GrantArgs {
    /// Grant read-only access to a directory (`DIR`, or `DIR::GUEST_PATH` to remap). Repeatable.
    #[arg(long = "allow-read", value_name = "DIR[::GUEST]")]
    read: Vec<String>,
    /// Grant read-write access to a directory (`DIR`, or `DIR::GUEST_PATH`). Repeatable.
    #[arg(long = "allow-write", value_name = "DIR[::GUEST]")]
    write: Vec<String>,
    /// Allow outbound HTTP to a host: `host`, `*.host`, optionally `:port`. Repeatable.
    #[arg(long = "allow-net", value_name = "HOST[:PORT]")]
    net: Vec<String>,
    /// Pass an environment variable through by name. Repeatable.
    #[arg(long = "allow-env", value_name = "VAR")]
    env: Vec<String>,
    /// Allow HTTP to loopback/private/link-local/metadata addresses (off by default).
    #[arg(long)]
    allow_private_network: bool,
}

impl GrantArgs {
    fn is_empty(&self) -> bool {
        self.read.is_empty()
            && self.write.is_empty()
            && self.net.is_empty()
            && self.env.is_empty()
            && !self.allow_private_network
    }

    /// Add these grants to `grants` (validated; duplicates collapse, a write grant upgrades a read one).
    /// No directory grant may reach the Keel home of `app` (see [`App::check_grants`]).
    fn apply(&self, app: &App, grants: &mut Grants) -> Result<(), CliError> {
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
            .map_err(|e| CliError::user(format!("refused grant: {e}")))
    }
}

/// Limit flags shared by `install`, `plugins limits`, `call` and `exec`.
#[derive(Debug, Clone, Default, Args)]
pub struct LimitArgs {
    /// Memory cap per call, in MiB.
    #[arg(long, value_name = "MIB")]
    memory_mb: Option<u64>,
    /// Wall-clock deadline per call, in milliseconds.
    #[arg(long, value_name = "MS")]
    timeout_ms: Option<u64>,
    /// Fuel per call (requires `[sandbox] fuel_metering = true` in config.toml).
    #[arg(long)]
    fuel: Option<u64>,
    /// Maximum tool output size, in bytes.
    #[arg(long, value_name = "BYTES")]
    max_output_bytes: Option<u64>,
}

impl LimitArgs {
    fn overrides(&self) -> serde_json::Map<String, Value> {
        let mut map = serde_json::Map::new();
        if let Some(mb) = self.memory_mb {
            map.insert("memory_bytes".into(), json!(mb << 20));
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

    fn apply(&self, limits: &Limits) -> Result<Limits, CliError> {
        limits
            .overridden_by(&Value::Object(self.overrides()))
            .map_err(|e| CliError::user(format!("invalid limit: {e}")))
    }
}

/// `keel install`.
#[derive(Debug, Args)]
pub struct InstallArgs {
    /// Component file, or `-` to read it from stdin.
    file: String,
    #[command(flatten)]
    grants: GrantArgs,
    #[command(flatten)]
    limits: LimitArgs,
    /// Replace an installed plugin of the same name that came from another component (without it,
    /// `install` asks on a terminal and refuses otherwise).
    #[arg(long)]
    replace: bool,
    /// When replacing an installed plugin of the same name, keep its previous grants (only if the
    /// new component requests nothing the old one did not).
    #[arg(long)]
    keep_grants: bool,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

/// `keel plugins ...`.
#[derive(Debug, Subcommand)]
pub enum PluginsCommand {
    /// List installed plugins.
    List {
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show a plugin: tools, requested capabilities, what it can reach, grants and limits.
    Show {
        /// Plugin name.
        name: String,
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Add grants to a plugin.
    Grant {
        /// Plugin name.
        name: String,
        #[command(flatten)]
        grants: GrantArgs,
        /// Print the resulting grants as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove grants from a plugin.
    Revoke {
        /// Plugin name.
        name: String,
        /// Revoke a directory grant (host or guest path). Repeatable.
        #[arg(long = "dir", value_name = "DIR")]
        dirs: Vec<String>,
        /// Revoke a network host pattern. Repeatable.
        #[arg(long = "net", value_name = "HOST")]
        net: Vec<String>,
        /// Revoke an environment variable. Repeatable.
        #[arg(long = "env", value_name = "VAR")]
        env: Vec<String>,
        /// Revoke access to private networks.
        #[arg(long)]
        private_network: bool,
        /// Revoke everything.
        #[arg(long)]
        all: bool,
        /// Print the resulting grants as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Set per-plugin limits (overriding the global defaults).
    Limits {
        /// Plugin name.
        name: String,
        #[command(flatten)]
        limits: LimitArgs,
        /// Drop all per-plugin overrides.
        #[arg(long)]
        reset: bool,
        /// Print the effective limits as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Uninstall a plugin.
    Remove {
        /// Plugin name.
        name: String,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `keel call`.
#[derive(Debug, Args)]
pub struct CallArgs {
    /// `plugin/tool`.
    tool: String,
    /// JSON arguments (default `{}`; `-` reads them from stdin).
    arguments: Option<String>,
    #[command(flatten)]
    limits: LimitArgs,
    /// Print the whole call report (output or error, logs, denials) as JSON.
    #[arg(long)]
    json: bool,
}

/// `keel exec`.
#[derive(Debug, Args)]
pub struct ExecArgs {
    /// WASI command component to run.
    file: String,
    #[command(flatten)]
    grants: GrantArgs,
    #[command(flatten)]
    limits: LimitArgs,
    /// Arguments passed to the program (after `--`).
    #[arg(last = true)]
    args: Vec<String>,
}

fn read_input(file: &str) -> Result<Vec<u8>, CliError> {
    if file == "-" {
        let mut bytes = Vec::new();
        std::io::stdin()
            .read_to_end(&mut bytes)
            .map_err(|e| CliError::user(format!("cannot read stdin: {e}")))?;
        return Ok(bytes);
    }
    std::fs::read(file).map_err(|e| CliError::user(format!("cannot read {file}: {e}")))
}

/// `keel install`.
pub async fn install(home: &Path, args: InstallArgs) -> CliResult {
    let bytes = read_input(&args.file)?;
    let app = App::open(home).await?;
    let plugin = app.sandbox.prepare(&bytes).await?;
    let name = plugin.info.name.clone();
    let previous = app.db.get_plugin(&name).await?;

    let replacing = previous.as_ref().filter(|old| old.sha256 != plugin.sha256);
    if let Some(old) = replacing
        && !args.replace
    {
        confirm_replace(old, &plugin, args.json)?;
    }

    let mut grants = Grants::default();
    let mut notes = Vec::new();
    if let Some(old) = &previous {
        let old_grants = grants_of(old)?;
        if args.keep_grants {
            if let Some(old) = replacing {
                let old_info: PluginInfo = serde_json::from_value(old.info.clone())
                    .map_err(|e| CliError::internal(format!("stored description of `{name}` is invalid: {e}")))?;
                let beyond = requests_beyond(&plugin.info.requested(), &old_info.requested());
                if !beyond.is_empty() {
                    return Err(CliError::user(format!(
                        "--keep-grants refused: {name} {} requests more than the installed {} did ({}); install it without --keep-grants and grant again",
                        plugin.info.version,
                        old.version,
                        beyond.join(", ")
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
    args.grants.apply(&app, &mut grants)?;
    let limits = match &previous {
        Some(old) if args.limits.overrides().is_empty() => old.limits.clone(),
        _ => Value::Object(args.limits.overrides()),
    };
    app.config
        .limits
        .overridden_by(&limits)
        .map_err(|e| CliError::user(format!("invalid limit: {e}")))?;

    let stored = app
        .components
        .put(&bytes)
        .map_err(|e| CliError::internal(format!("cannot store component: {e}")))?;
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
    app.db.upsert_plugin(&record).await?;
    if let Some(old) = replacing
        && !app.db.component_in_use(&old.sha256).await?
    {
        let _ = app.components.remove(&old.sha256);
    }
    notes.extend(reach_warnings(&plugin.info, &plugin.imports, &grants));

    if args.json {
        let mut value = record_json(
            &app.db.get_plugin(&name).await?.expect("just stored"),
            &app.config.limits,
        );
        value["compiled"] = json!(plugin.cache == keel_sandbox::CacheOutcome::Compiled);
        value["load_ms"] = json!(plugin.load_time.as_secs_f64() * 1e3);
        value["notes"] = json!(notes);
        value["replaced"] = json!(replacing.map(|old| json!({"version": old.version, "sha256": old.sha256})));
        print_json(&value);
    } else {
        let how = match plugin.cache {
            keel_sandbox::CacheOutcome::Compiled => "compiled",
            keel_sandbox::CacheOutcome::Hit => "loaded from cache",
        };
        println!(
            "installed {name} {} ({how} in {:.0} ms, sha256 {})",
            sanitize_line(&plugin.info.version),
            plugin.load_time.as_secs_f64() * 1e3,
            &plugin.sha256[..12]
        );
        if let Some(old) = replacing {
            println!(
                "  replaced {name} {} (sha256 {}) with {} (sha256 {})",
                old.version, old.sha256, plugin.info.version, plugin.sha256
            );
        }
        print_plugin(&plugin.info, &plugin.imports, &grants);
        for note in notes {
            println!("note: {}", sanitize_line(&note));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Installing another component under a taken name replaces that plugin: only with `--replace`,
/// or a yes on a terminal. Both hashes are shown so the user can tell what replaces what.
fn confirm_replace(old: &PluginRecord, new: &PreparedPlugin, json: bool) -> Result<(), CliError> {
    use std::io::{BufRead, IsTerminal, Write};
    let name = &old.name;
    let what = format!(
        "`{name}` is already installed from another component ({} sha256 {}); this one is {} sha256 {}",
        old.version, old.sha256, new.info.version, new.sha256
    );
    if json || !std::io::stdin().is_terminal() || !std::io::stderr().is_terminal() {
        return Err(CliError::user(format!("{what}; pass --replace to replace it")));
    }
    eprint!("{what}.\nReplace it? [y/N] ");
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    let _ = std::io::stdin().lock().read_line(&mut answer);
    match answer.trim().to_ascii_lowercase().as_str() {
        "y" | "yes" => Ok(()),
        _ => Err(CliError::user(format!("`{name}` was not replaced"))),
    }
}

/// What `new` requests that `old` did not: a directory not at or below an old request with at
/// least its mode, a host or an environment variable not requested before.
fn requests_beyond(new: &keel_sandbox::Capabilities, old: &keel_sandbox::Capabilities) -> Vec<String> {
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

/// Warnings about requests not granted and grants that cannot take effect.
fn reach_warnings(info: &PluginInfo, imports: &keel_sandbox::ImportSummary, grants: &Grants) -> Vec<String> {
    let mut notes = Vec::new();
    let missing = grants.missing_for(&info.requested());
    if !missing.is_empty() {
        notes.push(format!(
            "requested but not granted: {} (grant with `keel plugins grant {} --allow-read/--allow-write/--allow-net/--allow-env ...`)",
            missing.join(", "),
            info.name
        ));
    }
    if !grants.net.is_empty() && !imports.http {
        notes.push("network grants have no effect: the component does not import wasi:http".into());
    }
    if !grants.fs.is_empty() && !imports.filesystem {
        notes.push("filesystem grants have no effect: the component does not import wasi:filesystem".into());
    }
    notes
}

fn describe_grants(grants: &Grants) -> String {
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

fn describe_capabilities(caps: &keel_sandbox::Capabilities) -> String {
    if caps.is_empty() {
        return "nothing".into();
    }
    let mut parts: Vec<String> = caps
        .filesystem
        .iter()
        .map(|f| format!("{} ({})", sanitize_line(&f.path), f.mode))
        .collect();
    parts.extend(caps.network.iter().map(|h| format!("net {}", sanitize_line(h))));
    parts.extend(caps.environment.iter().map(|v| format!("env {}", sanitize_line(v))));
    parts.join(", ")
}

fn yes_no(flag: bool) -> &'static str {
    if flag { "yes" } else { "no" }
}

fn print_plugin(info: &PluginInfo, imports: &keel_sandbox::ImportSummary, grants: &Grants) {
    println!("  {}", sanitize_line(&info.description));
    println!(
        "  can reach: filesystem {}, network (wasi:http) {}, sockets {}, environment {}",
        yes_no(imports.filesystem),
        yes_no(imports.http),
        yes_no(imports.sockets),
        yes_no(imports.environment)
    );
    println!("  requests: {}", describe_capabilities(&info.requested()));
    println!("  granted:  {}", describe_grants(grants));
    println!("  tools:");
    for tool in &info.tools {
        let flags = if tool.idempotent { " [idempotent]" } else { "" };
        println!(
            "    {}/{}{flags} — {}",
            sanitize_line(&info.name),
            sanitize_line(&tool.name),
            sanitize_line(&tool.description)
        );
        if !tool.capabilities.is_empty() {
            println!("      requests: {}", describe_capabilities(&tool.capabilities));
        }
    }
}

fn record_json(record: &PluginRecord, global: &Limits) -> Value {
    json!({
        "name": record.name,
        "version": record.version,
        "description": record.description,
        "sha256": record.sha256,
        "tools": record.info["tools"],
        "imports": record.imports,
        "grants": record.grants,
        "limit_overrides": record.limits,
        "limits": global.overridden_by(&record.limits).ok(),
        "installed_at": record.installed_at,
        "updated_at": record.updated_at,
    })
}

/// `keel plugins ...`.
pub async fn plugins(home: &Path, command: PluginsCommand) -> CliResult {
    let app = App::open(home).await?;
    match command {
        PluginsCommand::List { json } => {
            let records = app.db.list_plugins().await?;
            if json {
                print_json(
                    &records
                        .iter()
                        .map(|r| record_json(r, &app.config.limits))
                        .collect::<Vec<_>>(),
                );
            } else if records.is_empty() {
                println!("no plugins installed (use `keel install FILE.wasm`)");
            } else {
                for record in records {
                    let tools = record.info["tools"].as_array().map(Vec::len).unwrap_or(0);
                    println!(
                        "{:<20} {:<10} {:>2} tool(s)  granted: {}",
                        sanitize_line(&record.name),
                        sanitize_line(&record.version),
                        tools,
                        describe_grants(&grants_of(&record)?)
                    );
                }
            }
        }
        PluginsCommand::Show { name, json } => {
            let record = app.record(&name).await?;
            if json {
                print_json(&record_json(&record, &app.config.limits));
            } else {
                let info: PluginInfo = serde_json::from_value(record.info.clone())
                    .map_err(|e| CliError::internal(format!("stored description of `{name}` is invalid: {e}")))?;
                let imports = serde_json::from_value(record.imports.clone()).unwrap_or_default();
                println!(
                    "{} {} (sha256 {})",
                    sanitize_line(&record.name),
                    sanitize_line(&record.version),
                    record.sha256
                );
                print_plugin(&info, &imports, &grants_of(&record)?);
                let limits = app.limits_of(&record).unwrap_or_default();
                println!(
                    "  limits:   memory {} MiB, timeout {} ms, output {} bytes{}",
                    limits.memory_bytes >> 20,
                    limits.timeout_ms,
                    limits.max_output_bytes,
                    limits.fuel.map(|f| format!(", fuel {f}")).unwrap_or_default()
                );
            }
        }
        PluginsCommand::Grant {
            name,
            grants: args,
            json,
        } => {
            let record = app.record(&name).await?;
            if args.is_empty() {
                return Err(CliError::user(
                    "nothing to grant: pass --allow-read, --allow-write, --allow-net or --allow-env",
                ));
            }
            let mut grants = grants_of(&record)?;
            args.apply(&app, &mut grants)?;
            save_grants(&app, &record, &grants, json).await?;
        }
        PluginsCommand::Revoke {
            name,
            dirs,
            net,
            env,
            private_network,
            all,
            json,
        } => {
            let record = app.record(&name).await?;
            let mut grants = grants_of(&record)?;
            if all {
                grants = Grants::default();
            }
            for dir in &dirs {
                let canonical = std::fs::canonicalize(dir).ok();
                let before = grants.fs.len();
                grants
                    .fs
                    .retain(|g| g.guest != *dir && Some(&g.host) != canonical.as_ref() && g.host != Path::new(dir));
                if grants.fs.len() == before {
                    return Err(CliError::user(format!("`{name}` has no grant for directory {dir}")));
                }
            }
            for host in &net {
                let before = grants.net.len();
                grants.net.retain(|h| !h.eq_ignore_ascii_case(host));
                if grants.net.len() == before {
                    return Err(CliError::user(format!("`{name}` has no network grant for {host}")));
                }
            }
            for var in &env {
                let before = grants.env.len();
                grants.env.retain(|v| v != var);
                if grants.env.len() == before {
                    return Err(CliError::user(format!(
                        "`{name}` has no grant for environment variable {var}"
                    )));
                }
            }
            if private_network {
                grants.allow_private_network = false;
            }
            save_grants(&app, &record, &grants, json).await?;
        }
        PluginsCommand::Limits {
            name,
            limits,
            reset,
            json,
        } => {
            let mut record = app.record(&name).await?;
            let mut overrides = if reset {
                serde_json::Map::new()
            } else {
                record.limits.as_object().cloned().unwrap_or_default()
            };
            overrides.extend(limits.overrides());
            record.limits = Value::Object(overrides);
            let effective = app
                .config
                .limits
                .overridden_by(&record.limits)
                .map_err(|e| CliError::user(format!("invalid limit: {e}")))?;
            app.db.upsert_plugin(&record).await?;
            if json {
                print_json(&effective);
            } else {
                println!(
                    "{name}: memory {} MiB, timeout {} ms, output {} bytes{}",
                    effective.memory_bytes >> 20,
                    effective.timeout_ms,
                    effective.max_output_bytes,
                    effective.fuel.map(|f| format!(", fuel {f}")).unwrap_or_default()
                );
            }
        }
        PluginsCommand::Remove { name, json } => {
            let record = app.record(&name).await?;
            app.db.remove_plugin(&name).await?;
            if !app.db.component_in_use(&record.sha256).await? {
                let _ = app.components.remove(&record.sha256);
            }
            if json {
                print_json(&json!({"removed": name}));
            } else {
                println!("removed {name}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn save_grants(app: &App, record: &PluginRecord, grants: &Grants, json: bool) -> Result<(), CliError> {
    app.db
        .set_plugin_grants(&record.name, &serde_json::to_value(grants).expect("grants serialize"))
        .await?;
    if json {
        print_json(grants);
    } else {
        println!("{} granted: {}", record.name, describe_grants(grants));
        let imports = serde_json::from_value::<keel_sandbox::ImportSummary>(record.imports.clone());
        let info = serde_json::from_value::<PluginInfo>(record.info.clone());
        if let (Ok(imports), Ok(info)) = (imports, info) {
            // Skip the "requested but not granted" note: the user is granting right now.
            for note in reach_warnings(&info, &imports, grants).into_iter().skip(1) {
                println!("note: {}", sanitize_line(&note));
            }
        }
    }
    Ok(())
}

/// `keel call`.
pub async fn call(home: &Path, args: CallArgs) -> CliResult {
    let Some((plugin_name, tool)) = args.tool.split_once('/') else {
        return Err(CliError::user(format!("`{}` is not `plugin/tool`", args.tool)));
    };
    let text = match args.arguments.as_deref() {
        None => "{}".to_string(),
        Some("-") => {
            String::from_utf8(read_input("-")?).map_err(|_| CliError::user("arguments on stdin are not UTF-8"))?
        }
        Some(text) => text.to_string(),
    };
    let arguments: Value =
        serde_json::from_str(&text).map_err(|e| CliError::user(format!("arguments are not valid JSON: {e}")))?;
    let app = App::open(home).await?;
    let record = app.record(plugin_name).await?;
    let (plugin, grants, limits) = app.load(&record).await?;
    if plugin.info.tool(tool).is_none() {
        let tools: Vec<&str> = plugin.info.tools.iter().map(|t| t.name.as_str()).collect();
        return Err(CliError::user(format!(
            "plugin `{plugin_name}` has no tool `{tool}` (tools: {})",
            tools.join(", ")
        )));
    }
    let limits = args.limits.apply(&limits)?;
    let report = run_call(&app, &plugin, &grants, &limits, tool, &arguments).await;
    if args.json {
        let (ok, body) = match &report.result {
            Ok(out) => (
                true,
                json!({"output": out.output, "duration_ms": out.duration.as_secs_f64() * 1e3}),
            ),
            Err(e) => (false, json!({"error": e, "message": e.to_string()})),
        };
        let mut value = json!({"ok": ok, "tool": args.tool, "logs": report.logs, "logs_truncated": report.logs_truncated,
            "denials": report.denials, "stderr": String::from_utf8_lossy(&report.stderr)});
        value
            .as_object_mut()
            .expect("object")
            .extend(body.as_object().expect("object").clone());
        print_json(&value);
        return Ok(if ok { ExitCode::SUCCESS } else { ExitCode::from(1) });
    }
    for log in &report.logs {
        eprintln!("[{plugin_name}] {:?}: {}", log.level, sanitize_line(&log.message));
    }
    if report.logs_truncated {
        eprintln!("[{plugin_name}] (further log lines dropped: log limit reached)");
    }
    // A denial the plugin already reported as its error is not repeated.
    let reported = matches!(report.result, Err(ToolError::Denied { .. }));
    for denial in report.denials.iter().filter(|_| !reported) {
        eprintln!(
            "denied: {} {} — {} (grant with `keel plugins grant {plugin_name} --allow-net HOST`)",
            sanitize_line(&denial.capability),
            sanitize_line(&denial.target),
            sanitize_line(&denial.reason)
        );
    }
    match report.result {
        Ok(out) => {
            println!("{}", json_text(&out.output, true));
            Ok(ExitCode::SUCCESS)
        }
        Err(error) => Err(tool_error(plugin_name, error)),
    }
}

async fn run_call(
    app: &App,
    plugin: &PreparedPlugin,
    grants: &Grants,
    limits: &Limits,
    tool: &str,
    arguments: &Value,
) -> keel_sandbox::CallReport {
    let ctx = ToolCallContext::ad_hoc("default");
    app.sandbox.call(plugin, grants, limits, &ctx, tool, arguments).await
}

fn tool_error(plugin: &str, error: ToolError) -> CliError {
    let message = match &error {
        ToolError::Denied {
            capability,
            target,
            message,
        } => {
            let flag = match capability.as_str() {
                "network" => "--allow-net HOST",
                "environment" => "--allow-env VAR",
                _ => "--allow-read DIR / --allow-write DIR",
            };
            format!(
                "{message} (missing {capability} capability for `{target}`; grant with `keel plugins grant {plugin} {flag}`)"
            )
        }
        other => other.to_string(),
    };
    match error {
        ToolError::UnknownTool { .. } | ToolError::InvalidInput { .. } => CliError::user(message),
        ToolError::Host { .. } => CliError::internal(message),
        _ => CliError::plugin(message),
    }
}

/// `keel exec`.
pub async fn exec(home: &Path, args: ExecArgs) -> CliResult {
    let bytes = read_input(&args.file)?;
    let app = App::open(home).await?;
    let mut grants = Grants::default();
    args.grants.apply(&app, &mut grants)?;
    let limits = args.limits.apply(&app.config.limits)?;
    let program = Path::new(&args.file)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let argv: Vec<String> = std::iter::once(program).chain(args.args).collect();
    // A command's output is its product: streamed as it is written, all of it, never capped.
    let report = app
        .sandbox
        .exec_streaming(
            &bytes,
            &grants,
            &limits,
            &argv,
            Box::new(tokio::io::stdout()),
            Box::new(tokio::io::stderr()),
        )
        .await?;
    match report.status {
        Ok(code) => Ok(ExitCode::from(code.clamp(0, 255) as u8)),
        Err(error) => Err(CliError::plugin(error.to_string())),
    }
}
