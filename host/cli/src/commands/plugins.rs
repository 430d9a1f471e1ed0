//! `keel install`, `keel plugins ...`, `keel call`.

use std::io::IsTerminal;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, Subcommand};
use keel_app::plugin_types::{Grants, Limits, PluginInfo, PreparedPlugin};
use keel_kernel::tool::{Denial, ToolError};
use serde_json::{Value, json};

use keel_app::Caller;
use keel_app::call::{CallOutcome, CallRequest};
use keel_app::files;
use keel_app::home::{App, grants_of};
use keel_app::install::{InstallRequest, Installed, describe_grants};
use keel_app::kernel::DEFAULT_SCOPE;
use keel_app::plugins::{GrantRequest, GrantsChanged, LimitOverrides, PluginRecord, PluginView, RevokeRequest};
use keel_app::runtime::{AgentHost, PolicyChoice, agent_error};

use crate::commands::run::{AgentArgs, FollowOptions, follow_to_end};
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
    /// The grants these flags ask for.
    fn request(&self) -> GrantRequest {
        GrantRequest {
            read: self.read.clone(),
            write: self.write.clone(),
            net: self.net.clone(),
            env: self.env.clone(),
            allow_private_network: self.allow_private_network,
        }
    }

    /// True when no grant flag was given.
    pub(crate) fn is_empty(&self) -> bool {
        self.read.is_empty()
            && self.write.is_empty()
            && self.net.is_empty()
            && self.env.is_empty()
            && !self.allow_private_network
    }

    /// Add these grants to `grants` (see [`GrantRequest::apply`]).
    pub(crate) fn apply(&self, app: &App, grants: &mut Grants) -> Result<(), CliError> {
        self.request().apply(app, grants)
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
    /// The overrides these flags ask for.
    fn request(&self) -> LimitOverrides {
        LimitOverrides {
            memory_mb: self.memory_mb,
            timeout_ms: self.timeout_ms,
            fuel: self.fuel,
            max_output_bytes: self.max_output_bytes,
        }
    }

    pub(crate) fn overrides(&self) -> serde_json::Map<String, Value> {
        self.request().to_map()
    }

    pub(crate) fn apply(&self, limits: &Limits) -> Result<Limits, CliError> {
        self.request().apply(limits)
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
    /// Scope, policy, approvals and JSON output (`--json` prints the outcome: output or error,
    /// receipt, logs, denials, job id).
    #[command(flatten)]
    agent: AgentArgs,
    /// Principal the call runs for.
    #[arg(long)]
    principal: Option<String>,
    /// Session (the key of "approve for this session"; default: a new one).
    #[arg(long)]
    session: Option<String>,
    /// Calling again with the same key in the scope returns the first call's outcome.
    #[arg(long)]
    idempotency_key: Option<String>,
}

/// The most [`read_input`] reads: far above any real component (CPython's is ~20 MiB), far below
/// what reading a device such as `/dev/zero` would take before memory ran out.
const MAX_INPUT_BYTES: u64 = 256 << 20;

/// Read `file` (`-`: stdin) whole: a regular file (see [`files::read_regular`]) or stdin, of at
/// most [`MAX_INPUT_BYTES`].
pub(crate) fn read_input(file: &str) -> Result<Vec<u8>, CliError> {
    let read = if file == "-" {
        files::read_bounded(std::io::stdin().lock(), MAX_INPUT_BYTES)
    } else {
        files::read_regular(Path::new(file), MAX_INPUT_BYTES)
    };
    let name = if file == "-" { "stdin" } else { file };
    read.map_err(|e| CliError::user(format!("cannot read {name}: {e}")))
}

/// `keel install`.
pub async fn install(home: &Path, args: InstallArgs) -> CliResult {
    let bytes = read_input(&args.file)?;
    let app = App::open(home).await?;
    // A plain component (exported functions, no keel:plugin world) without a name section is
    // named after its file.
    let label = Path::new(&args.file)
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or_default();
    let request = InstallRequest {
        bytes: &bytes,
        label,
        replace: args.replace,
        keep_grants: args.keep_grants,
        limits: Value::Object(args.limits.overrides()),
        owner: None,
    };
    let installed = app
        .install(
            request,
            |old, new| confirm_replace(old, new, args.json),
            |app, grants| args.grants.apply(app, grants),
        )
        .await?;
    let Installed {
        record,
        plugin,
        replaced,
        notes,
        provided,
    } = installed;
    let name = &record.name;
    let grants = grants_of(&record)?;
    if args.json {
        let mut value = plugin_json(&PluginView::of(&record, &app.config.limits));
        value["compiled"] = json!(plugin.cache == keel_app::plugin_types::CacheOutcome::Compiled);
        value["load_ms"] = json!(plugin.load_time.as_secs_f64() * 1e3);
        value["notes"] = json!(notes);
        value["provided"] = json!(provided);
        value["replaced"] = json!(replaced.map(|old| json!({"version": old.version, "sha256": old.sha256})));
        print_json(&value);
    } else {
        let how = match plugin.cache {
            keel_app::plugin_types::CacheOutcome::Compiled => "compiled",
            keel_app::plugin_types::CacheOutcome::Hit => "loaded from cache",
        };
        println!(
            "installed {name} {} ({how} in {:.0} ms, sha256 {})",
            sanitize_line(&plugin.info.version),
            plugin.load_time.as_secs_f64() * 1e3,
            &plugin.sha256[..12]
        );
        if let Some(old) = replaced {
            println!(
                "  replaced {name} {} (sha256 {}) with {} (sha256 {})",
                old.version, old.sha256, plugin.info.version, plugin.sha256
            );
        }
        print_plugin(&plugin.info, &plugin.imports, &grants);
        for what in &provided {
            println!("  provided without a grant: {}", sanitize_line(what));
        }
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

fn describe_capabilities(caps: &keel_app::plugin_types::Capabilities) -> String {
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

fn print_plugin(info: &PluginInfo, imports: &keel_app::plugin_types::ImportSummary, grants: &Grants) {
    println!("  {}", sanitize_line(&info.description));
    println!(
        "  can reach: filesystem {}, network (wasi:http) {}, sockets {}, environment {}",
        yes_no(imports.filesystem),
        yes_no(imports.http),
        yes_no(imports.sockets),
        yes_no(imports.environment)
    );
    println!("  requests: {}", describe_capabilities(&info.requested()));
    println!("  granted:  {}", sanitize_line(&describe_grants(grants)));
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

/// A plugin as JSON (keys in order, as the JSON object of every other command).
fn plugin_json(view: &PluginView) -> Value {
    serde_json::to_value(view).expect("plugin view serializes")
}

/// `keel plugins ...`.
pub async fn plugins(home: &Path, command: PluginsCommand) -> CliResult {
    let app = App::open(home).await?;
    // The registry is the home's, not a scope's: the local user administers it.
    let caller = Caller::local_admin(DEFAULT_SCOPE);
    match command {
        PluginsCommand::List { json } => {
            let plugins = app.list_plugins(&caller).await?;
            if json {
                print_json(&plugins.iter().map(plugin_json).collect::<Vec<_>>());
            } else if plugins.is_empty() {
                println!("no plugins installed (use `keel install FILE.wasm`)");
            } else {
                for plugin in plugins {
                    println!(
                        "{:<20} {:<10} {:>2} tool(s)  granted: {}",
                        sanitize_line(&plugin.name),
                        sanitize_line(&plugin.version),
                        plugin.tool_count(),
                        sanitize_line(&describe_grants(&plugin.granted()?))
                    );
                }
            }
        }
        PluginsCommand::Show { name, json } => {
            let plugin = app.show_plugin(&caller, &name).await?;
            if json {
                print_json(&plugin_json(&plugin));
            } else {
                let info = plugin.info()?;
                println!(
                    "{} {} (sha256 {})",
                    sanitize_line(&plugin.name),
                    sanitize_line(&plugin.version),
                    plugin.sha256
                );
                print_plugin(&info, &plugin.import_summary(), &plugin.granted()?);
                let limits = plugin.limits.clone().unwrap_or_default();
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
            let changed = app.grant(&caller, &name, &args.request()).await?;
            print_grants(&changed, json);
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
            let request = RevokeRequest {
                dirs,
                net,
                env,
                private_network,
                all,
            };
            let changed = app.revoke(&caller, &name, &request).await?;
            print_grants(&changed, json);
        }
        PluginsCommand::Limits {
            name,
            limits,
            reset,
            json,
        } => {
            let changed = app.set_limits(&caller, &name, &limits.request(), reset).await?;
            let effective = &changed.limits;
            if json {
                print_json(effective);
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
            let removed = app.remove_plugin(&caller, &name).await?;
            if json {
                print_json(&removed);
            } else {
                println!("removed {}", removed.removed);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_grants(changed: &GrantsChanged, json: bool) {
    if json {
        print_json(&changed.grants);
    } else {
        println!(
            "{} granted: {}",
            sanitize_line(&changed.name),
            sanitize_line(&describe_grants(&changed.grants))
        );
        for note in &changed.notes {
            println!("note: {}", sanitize_line(note));
        }
    }
}

/// `keel call`: one governed tool call (policy, approval, budget hold, sandbox, ledger entry
/// with its receipt, events, journal), recorded as a job like any agent's call.
pub async fn call(home: &Path, args: CallArgs) -> CliResult {
    let Some((plugin_name, _)) = args.tool.split_once('/') else {
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
    // Flags are checked before anything is opened.
    args.limits.apply(&Limits::default())?;
    let choice = PolicyChoice::resolve(home, args.agent.policy.as_deref())?;
    let note = choice.note.clone();
    let overrides = Value::Object(args.limits.overrides());
    let limit_override: keel_app::runtime::LimitOverride = Arc::new(move |limits: &Limits| {
        limits
            .overridden_by(&overrides)
            .map_err(|e| format!("invalid limit: {e}"))
    });
    let patterns = [args.tool.clone()];
    // One call, then the process exits: no ready instances, no memory kept resident.
    let app = Arc::new(App::open_for_one_call(home).await?);
    // The flags against this home's ceiling, before the call's job exists.
    app.limits_over(&Value::Object(args.limits.overrides()))?;
    let host = AgentHost::open_app_with_stdio(app, Some(&patterns), choice, Some(limit_override), false, None).await?;
    host.check_tool(&args.tool).await?;
    // "No policy: allowing everything" is said to a person at a terminal (and in `--json`);
    // a script's stderr keeps its one `error:` line.
    if let Some(note) = &note
        && !args.agent.json
        && std::io::stderr().is_terminal()
    {
        eprintln!("note: {}", sanitize_line(note));
    }
    let mut request = CallRequest::new(args.agent.scope.clone(), args.tool.clone(), arguments);
    request.principal = args.principal.clone();
    request.session = Some(
        args.session
            .clone()
            .unwrap_or_else(|| format!("cli-{}", uuid::Uuid::now_v7().simple())),
    );
    request.idempotency_key = args.idempotency_key.clone();
    let interrupt = crate::output::cancel_on_interrupt()?;
    request.cancel = interrupt.clone();
    let stop = keel_kernel::context::CancellationToken::new();
    let _sweeper = host.kernel.spawn_sweeper(host.poll, stop.clone());
    let tokens = host.rt.issued_tokens();
    let handle = host.start_call(&request).await?;
    let mut opts = FollowOptions::from_args(&args.agent, 0);
    opts.quiet = true;
    let result = if handle.is_direct() {
        // Allowed at once: nothing to follow (no approval), its result comes with its end; Ctrl-C
        // stops it (`request.cancel`).
        handle.result().await.map_err(agent_error)
    } else {
        tokio::select! {
            result = follow_to_end(&host, &args.agent.scope, handle.job_id(), &opts, tokens) => result,
            () = interrupt.cancelled() => {
                let _ = handle.cancel(keel_app::call::CALLER_CANCELLED).await;
                stop.cancel();
                eprintln!("\ninterrupted: the call was cancelled (job {})", handle.job_id());
                // An approval prompt may be reading stdin on a blocking thread, which the
                // runtime's shutdown would wait for; everything is recorded.
                std::process::exit(i32::from(crate::output::INTERRUPTED));
            }
        }
    };
    stop.cancel();
    let outcome = CallOutcome::from_result(result?);
    if interrupt.is_cancelled() && outcome.status == keel_kernel::job::JobState::Cancelled {
        eprintln!("\ninterrupted: the call was cancelled (job {})", outcome.job_id);
        return Ok(ExitCode::from(crate::output::INTERRUPTED));
    }
    let tool_result = outcome.tool_result.as_ref();
    if args.agent.json {
        let mut value = json!({
            "ok": outcome.succeeded(),
            "tool": args.tool,
            "job_id": outcome.job_id,
            "status": outcome.status,
        });
        if let Some(note) = &note {
            value["note"] = json!(note);
        }
        let obj = value.as_object_mut().expect("object");
        if let Some(r) = tool_result {
            obj.insert("output".into(), json!(r.output));
            obj.insert("receipt".into(), json!(r.receipt));
            obj.insert("logs".into(), json!(r.diagnostics.logs));
            obj.insert("logs_truncated".into(), json!(r.diagnostics.logs_truncated));
            obj.insert("denials".into(), json!(r.diagnostics.denials));
            obj.insert("stdout".into(), json!(r.diagnostics.stdout));
            obj.insert("stderr".into(), json!(r.diagnostics.stderr));
            if let Some(error) = &r.error {
                obj.insert("error".into(), json!(error));
            }
        }
        if let Some(e) = &outcome.error {
            obj.insert("message".into(), json!(e.message));
            obj.insert("code".into(), json!(e.code));
            // Refused before the tool ran (policy, approval, schema, budget): the same shape as a
            // tool's own error, its kind the refusal's code.
            obj.entry("error")
                .or_insert_with(|| json!({ "kind": e.code, "message": e.message }));
        }
        print_json(&value);
        return Ok(if outcome.succeeded() {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        });
    }
    if let Some(r) = tool_result {
        for log in &r.diagnostics.logs {
            eprintln!("[{plugin_name}] {:?}: {}", log.level, sanitize_line(&log.message));
        }
        if r.diagnostics.logs_truncated {
            eprintln!("[{plugin_name}] (further log lines dropped: log limit reached)");
        }
        // What the tool printed (print-debugging), apart from its result on stdout. A trap's
        // stderr (a panic message) is already in its error.
        let trapped = matches!(r.error, Some(ToolError::Trapped { .. }));
        let stderr = if trapped { "" } else { r.diagnostics.stderr.as_str() };
        for (stream, text) in [("stdout", r.diagnostics.stdout.as_str()), ("stderr", stderr)] {
            for line in text.lines() {
                eprintln!("[{plugin_name}] {stream}: {}", sanitize_line(line));
            }
        }
        // A denial the plugin already reported as its error is not repeated.
        let reported = matches!(r.error, Some(ToolError::Denied { .. }));
        for denial in r.diagnostics.denials.iter().filter(|_| !reported) {
            let hint = denial
                .grant
                .as_deref()
                .map(|flag| {
                    format!(
                        " (grant with `keel plugins grant {plugin_name} {}`)",
                        sanitize_line(flag)
                    )
                })
                .unwrap_or_default();
            eprintln!(
                "denied: {} {} — {}{hint}",
                sanitize_line(&denial.capability),
                sanitize_line(&denial.target),
                sanitize_line(&denial.reason)
            );
        }
        if let Some(output) = &r.output {
            println!("{}", json_text(output, true));
            return Ok(ExitCode::SUCCESS);
        }
        if let Some(error) = &r.error {
            return Err(tool_error(plugin_name, error.clone(), &r.diagnostics.denials));
        }
    }
    let Some(e) = outcome.error else {
        return Err(CliError::plugin(format!("the call ended {}", outcome.status)));
    };
    let message = format!("{} ({})", e.message, e.code);
    // Arguments the tool's schema refuses are the caller's mistake, as when the tool refuses them.
    Err(match e.code.as_str() {
        "invalid_input" | "unknown_tool" => CliError::user(message),
        _ => CliError::plugin(message),
    })
}

/// The error for a tool's own `error`. A denial's hint comes from what the host recorded refusing
/// in the call (it knows why: a host not granted, a private address, a limit); only when the host
/// refused nothing of that kind (a filesystem path, refused inside WASI) from the plugin's word.
fn tool_error(plugin: &str, error: ToolError, refused: &[Denial]) -> CliError {
    let message = match &error {
        ToolError::Denied {
            capability,
            target,
            message,
        } => {
            let recorded: Vec<&Denial> = refused.iter().filter(|d| &d.capability == capability).collect();
            let flag = if recorded.is_empty() {
                Some(match capability.as_str() {
                    "network" => "--allow-net HOST".to_string(),
                    "environment" => "--allow-env VAR".to_string(),
                    _ => "--allow-read DIR / --allow-write DIR".to_string(),
                })
            } else {
                recorded.iter().find_map(|d| d.grant.clone())
            };
            match flag {
                Some(flag) => format!(
                    "{message} (missing {capability} capability for `{target}`; grant with `keel plugins grant {plugin} {}`)",
                    sanitize_line(&flag)
                ),
                None => message.clone(),
            }
        }
        other => other.to_string(),
    };
    match error {
        ToolError::UnknownTool { .. } | ToolError::InvalidInput { .. } => CliError::user(message),
        ToolError::Host { .. } => CliError::internal(message),
        _ => CliError::plugin(message),
    }
}
