//! A Keel home with the `hello` guest (built from source) installed, an MCP server on it, and
//! rmcp's own client connected to a session of it over an in-process pipe.
#![allow(dead_code)] // each test binary uses a different subset

use std::path::Path;
use std::sync::Arc;

use keel_app::AgentHost;
use keel_app::runtime::PolicyChoice;
use keel_mcp::{Identity, McpServer};
use rmcp::ServiceExt as _;
use rmcp::model::{ClientCapabilities, ClientConfig, Implementation};
use rmcp::service::{RoleClient, RunningService};

/// A home with `hello` installed, `policy.toml` = `policy` and `config.toml` = `config`.
pub async fn home_with_hello(policy: &str, config: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.toml"), config).unwrap();
    let app = keel_app::App::open(dir.path()).await.unwrap();
    let bytes = keel_testutil::guest_bytes("hello");
    app.install_unattended(&bytes, "hello").await.unwrap();
    std::fs::write(dir.path().join("policy.toml"), policy).unwrap();
    dir
}

/// The MCP server of `home`, under `policy` (else the home's).
pub async fn server(home: &Path, policy: Option<&Path>) -> McpServer {
    let choice = PolicyChoice::resolve(home, policy).unwrap();
    let host = AgentHost::open_with(home, None, choice, None, false).await.unwrap();
    McpServer::new(Arc::new(host)).await.unwrap()
}

/// An rmcp client (declaring `capabilities`) connected to a session of `server` in `scope`.
pub async fn connect(
    server: &McpServer,
    scope: &str,
    capabilities: ClientCapabilities,
) -> RunningService<RoleClient, ClientConfig> {
    let client = ClientConfig::new(capabilities, Implementation::new("keel-mcp-test", "1"));
    connect_with(server, scope, client).await
}

/// `client` (an rmcp client handler) connected to a session of `server` in `scope`.
pub async fn connect_with<C: rmcp::ClientHandler>(
    server: &McpServer,
    scope: &str,
    client: C,
) -> RunningService<RoleClient, C> {
    let (ours, theirs) = tokio::io::duplex(1 << 16);
    let session = server.session(Identity::Fixed {
        scope: scope.into(),
        session: format!("test-{scope}"),
    });
    tokio::spawn(async move {
        if let Ok(running) = session.serve(tokio::io::split(theirs)).await {
            let _ = running.waiting().await;
        }
    });
    client.serve(tokio::io::split(ours)).await.expect("initialize")
}
