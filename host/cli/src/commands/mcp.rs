//! `keel mcp`: serve the installed tools to one MCP client over stdio (stdout carries only
//! JSON-RPC; notes and logs go to stderr). Every call runs through Keel's governed path in this
//! process: the jobs it starts are driven here, and approvals are asked of the client
//! (elicitation) or given from another shell (`keel actions approve ID`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use keel_app::AgentHost;
use keel_app::kernel::DEFAULT_SCOPE;
use keel_app::runtime::PolicyChoice;

use crate::output::{CliResult, sanitize_line};

/// Arguments of `keel mcp`.
#[derive(Debug, clap::Args)]
pub struct McpArgs {
    /// Scope (tenant) every call is made in and charged to.
    #[arg(long, default_value = DEFAULT_SCOPE)]
    scope: String,
    /// Policy file [default: `$KEEL_HOME/policy.toml` if present, else allow everything].
    #[arg(long, value_name = "FILE")]
    policy: Option<PathBuf>,
}

/// Run `keel mcp` until the client closes stdin.
pub async fn mcp(home: &Path, args: McpArgs) -> CliResult {
    let choice = PolicyChoice::resolve(home, args.policy.as_deref())?;
    if let Some(note) = &choice.note {
        eprintln!("note: {}", sanitize_line(note));
    }
    let host = Arc::new(AgentHost::open_with(home, None, choice, None, false).await?);
    // Expires approvals nobody answered (their jobs then time out).
    let stop = keel_app::keel_kernel::context::CancellationToken::new();
    let _sweeper = host.kernel.spawn_sweeper(host.poll, stop.clone());
    let server = keel_mcp::McpServer::new(host.clone()).await?;
    let served = server.serve_stdio(args.scope).await;
    // The client is gone: the calls it started still end and are recorded.
    host.finish_calls().await;
    stop.cancel();
    served?;
    Ok(ExitCode::SUCCESS)
}
