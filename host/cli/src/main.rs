//! `keel`: install and run sandboxed WebAssembly tool plugins; govern agent jobs.
//!
//! Exit codes: 0 success, 1 the plugin/tool failed (or a policy denied), 2 user error (bad arguments,
//! missing or invalid file, unknown plugin), 3 internal host error.

mod commands;
mod output;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::output::CliError;

/// mimalloc rather than glibc's malloc: a governed call allocates hundreds of small, short-lived
/// JSON values; glibc's malloc and free (with its free-list consolidation) were about half of the
/// in-memory governed call's samples, and mimalloc makes that call about a third faster (agent
/// bench `agent_memory/governed_call`, ~30 → ~20 µs).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Keel: a WebAssembly plugin host runtime for AI agents.
#[derive(Debug, Parser)]
#[command(name = "keel", version, about, propagate_version = true)]
struct Cli {
    /// Keel home directory (database, components, compiled cache).
    #[arg(long, global = true, env = "KEEL_HOME")]
    home: Option<std::path::PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Install a plugin component (a path, or `-` for stdin): validate, store, precompile, describe.
    Install(commands::plugins::InstallArgs),
    /// List, inspect, grant, revoke, limit and remove installed plugins.
    #[command(subcommand)]
    Plugins(commands::plugins::PluginsCommand),
    /// Call a tool (`plugin/tool`) with JSON arguments in a fresh sandbox and print its output.
    Call(commands::plugins::CallArgs),
    /// Run a WASI command component (wasi:cli/run) under the same kind of grants and limits, or
    /// (`--lang python|js`) a code step through the installed python-exec / js-exec plugin.
    Exec(commands::exec::ExecArgs),
    /// Build a tool project (Rust, Python, JavaScript or C) into a component.
    Build(commands::build::BuildArgs),
    /// Create a tool project (Rust, Python, JavaScript or C) with one example tool, a README and a test.
    New(commands::new::NewArgs),
    /// Build and install a tool project, then rebuild and reinstall it on every change (Ctrl-C stops).
    Dev(commands::dev::DevArgs),
    /// Validate a policy file or dry-run a policy decision.
    #[command(subcommand)]
    Policy(commands::policy::PolicyCommand),
    /// Run an agent job: the model calls installed tools under policy, budgets and approvals.
    Run(commands::run::RunArgs),
    /// Run a complete offline agent job (scripted model, example plugins; in --home/KEEL_HOME, else a fresh temporary home).
    Demo(commands::demo::DemoArgs),
    /// Run queued (`keel run --detach`) and orphaned agent jobs of this Keel home until stopped.
    Worker(commands::worker::WorkerArgs),
    /// List, inspect, watch (follow and resume) and cancel durable jobs.
    #[command(subcommand)]
    Jobs(commands::jobs::JobsCommand),
    /// List and answer human-in-the-loop actions (approve/deny by id, or resolve a resume token).
    #[command(subcommand)]
    Actions(commands::actions::ActionsCommand),
    /// Read the usage ledger.
    #[command(subcommand)]
    Ledger(commands::ledger::LedgerCommand),
    /// Set and show budgets.
    #[command(subcommand)]
    Budgets(commands::budgets::BudgetsCommand),
    /// Serve the installed tools to an MCP client over stdio, under policy, budgets and approvals.
    Mcp(commands::mcp::McpArgs),
    /// Serve the HTTP API, SSE event streams and the approvals page (runs a worker too).
    Serve(commands::serve::ServeArgs),
    /// Create, list and revoke API keys for `keel serve`.
    #[command(subcommand)]
    Keys(commands::keys::KeysCommand),
}

fn main() -> ExitCode {
    output::default_sigpipe();
    let cli = Cli::parse();
    if matches!(cli.command, Command::Mcp(_) | Command::Serve(_) | Command::Worker(_)) {
        // A server outlives its peers: a client that stops reading must end its session (its
        // calls finished and recorded), not the process with calls in flight.
        output::ignore_sigpipe();
    }
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("KEEL_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        // Colours only for a terminal: escape sequences in a log file or a pipe are noise.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = if matches!(cli.command, Command::Mcp(_)) {
        keel_mcp::stdio_runtime()
    } else {
        tokio::runtime::Builder::new_multi_thread().enable_all().build()
    };
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(e) => return output::report(CliError::internal(format!("cannot start the async runtime: {e}"))),
    };
    // `keel demo` runs in a fresh temporary home unless one was named.
    let named_home = cli.home.clone();
    let home = cli.home.unwrap_or_else(keel_app::home::default_home);
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Install(args) => commands::plugins::install(&home, args).await,
            Command::Plugins(cmd) => commands::plugins::plugins(&home, cmd).await,
            Command::Call(args) => commands::plugins::call(&home, args).await,
            Command::Exec(args) => commands::exec::exec(&home, args).await,
            Command::Build(args) => commands::build::build(args),
            Command::New(args) => commands::new::new(args),
            Command::Dev(args) => commands::dev::dev(&home, args).await,
            Command::Policy(cmd) => commands::policy::run(&home, cmd),
            Command::Run(args) => commands::run::run(&home, args).await,
            Command::Demo(args) => commands::demo::demo(named_home.as_deref(), args).await,
            Command::Worker(args) => commands::worker::worker(&home, args).await,
            Command::Jobs(cmd) => commands::jobs::run(&home, cmd).await,
            Command::Actions(cmd) => commands::actions::run(&home, cmd).await,
            Command::Ledger(cmd) => commands::ledger::run(&home, cmd).await,
            Command::Budgets(cmd) => commands::budgets::run(&home, cmd).await,
            Command::Mcp(args) => commands::mcp::mcp(&home, args).await,
            Command::Serve(args) => commands::serve::serve(&home, args).await,
            Command::Keys(cmd) => commands::keys::run(&home, cmd).await,
        }
    });
    let code = match result {
        Ok(code) => code,
        Err(error) => output::report(error),
    };
    // Dropping a runtime waits for every blocking-pool thread, and a thread stuck in a system call
    // (a plugin's file I/O past its deadline) never returns: exit after a bounded wait instead.
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    // A big scratch directory is removed on a blocking thread after its call: let that finish
    // (an exit now would leave it on disk until the next Keel process sweeps it).
    if !keel_app::exec::wait_for_scratch_removal(std::time::Duration::from_secs(30)) {
        eprintln!("note: a scratch directory is still being removed; the next keel process removes what is left");
    }
    code
}
