//! `keel serve`: the HTTP API, SSE event streams and the approvals page over this Keel home,
//! with an in-process worker (created jobs run here, approved jobs resume here).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use keel_server::{Server, ServerConfig};

use crate::output::{CliError, CliResult};

/// `keel serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Address to listen on. Loopback by default: serving other machines is a deliberate choice.
    #[arg(long, default_value = "127.0.0.1:7700")]
    listen: SocketAddr,
    /// Another host name to accept in `Host`/`Origin` (e.g. a reverse proxy's). Repeatable.
    #[arg(long = "allow-host", value_name = "HOST")]
    allow_hosts: Vec<String>,
    /// Requests per second each API key may make on average.
    #[arg(long, default_value_t = 50)]
    rate_limit: u32,
    /// Requests an API key may make at once before the average applies.
    #[arg(long, default_value_t = 100)]
    rate_burst: u32,
    /// Policy file [default: `$KEEL_HOME/policy.toml` if present, else allow everything].
    #[arg(long, value_name = "FILE")]
    policy: Option<PathBuf>,
}

/// Run `keel serve` until Ctrl-C.
pub async fn serve(home: &Path, args: ServeArgs) -> CliResult {
    let allow_hosts = args.allow_hosts.clone();
    let config = ServerConfig {
        listen: args.listen,
        allowed_hosts: allow_hosts.clone(),
        rate_per_second: args.rate_limit,
        rate_burst: args.rate_burst,
        policy: args.policy,
        ..ServerConfig::default()
    };
    let server = Server::open(home, config).await?;
    // MCP over Streamable HTTP at `/mcp`, behind the same Host/Origin check, API keys and rate
    // limit as `/v1`, on the same agent host (its calls are governed like every other).
    let mut mcp_hosts = allow_hosts;
    mcp_hosts.push(args.listen.ip().to_string());
    mcp_hosts.push(args.listen.to_string());
    let host = server.host().clone();
    let mcp = keel_mcp::McpServer::new(host.clone()).await?;
    let server = server.with_protected_routes("/mcp", keel_mcp::http_service_allowing(mcp, &mcp_hosts));
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| CliError::user(format!("cannot listen on {}: {e}", args.listen)))?;
    let local = listener
        .local_addr()
        .map_err(|e| CliError::internal(format!("cannot read the listen address: {e}")))?;
    eprintln!("keel serving on http://{local} (approvals page: http://{local}/; Ctrl-C to stop)");
    if !local.ip().is_loopback() {
        eprintln!("note: listening beyond loopback; use TLS in front (a reverse proxy) for other machines");
    }
    server
        .serve(listener, async {
            let _ = tokio::signal::ctrl_c().await;
            eprintln!("\nstopping; jobs still running here are resumed by the next worker");
        })
        .await
        .map_err(|e| CliError::internal(format!("server failed: {e}")))?;
    // Calls already running end and are recorded before the process exits.
    host.finish_calls().await;
    Ok(ExitCode::SUCCESS)
}
