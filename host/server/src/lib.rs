//! keel-server: Keel over HTTP (`keel serve`).
//!
//! - [`Server`]: opens a Keel home (an [`AgentHost`] with every installed plugin), runs an
//!   in-process worker (created jobs run here, approved jobs resume here) and serves:
//!   - `/v1/...` (`routes`): jobs, SSE event streams with `Last-Event-ID` resume, actions,
//!     plugins, usage, budgets, policy dry-run, governed tool calls, `/v1/openapi.json`;
//!   - `/` (`web`): the approvals page.
//! - `auth`: every request passes the Host/Origin check (DNS rebinding); every `/v1` request and
//!   every router nested with [`Server::with_protected_routes`] needs an API key (`Authorization:
//!   Bearer`) or a browser session cookie made from one, is rate-limited per key, and carries the
//!   key's [`keel_app::Caller`] in its request extensions. The caller's scope confines everything:
//!   another scope's jobs, actions, plugins and usage answer 404 exactly like missing ones.
//! - `error`: the one error shape, `{"error": {"code", "message"}}`.
//!
//! Handlers only translate HTTP to the use cases of `keel-app` (`keel_app::jobs`, `actions`,
//! `ledger`, `events`, `keys`, the `App` and [`AgentHost`] methods), which check the caller's
//! role and scope; they never call a kernel service themselves (checked by
//! `host/cli/tests/architecture.rs`). Dependencies point `server -> app`.

mod auth;
mod error;
mod routes;
mod sse;
mod web;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use keel_app::AgentHost;
use keel_app::runtime::PolicyChoice;
use keel_kernel::context::CancellationToken;
use keel_kernel::policy::Policy;

pub use error::{ApiError, ApiResult};

/// Everything `keel serve` can be told. The same names are the CLI flags.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Where to listen (`--listen`, default `127.0.0.1:7700`): loopback only unless told otherwise.
    pub listen: SocketAddr,
    /// Host names accepted in `Host` and `Origin` besides the listen address, `localhost` and
    /// `127.0.0.1` (`--allow-host`): e.g. the name of a reverse proxy.
    pub allowed_hosts: Vec<String>,
    /// Requests per second each key may make on average (`--rate-limit`).
    pub rate_per_second: u32,
    /// Requests a key may make at once before the average applies (`--rate-burst`).
    pub rate_burst: u32,
    /// Policy file (`--policy`), else `$KEEL_HOME/policy.toml`, else allow-all.
    pub policy: Option<PathBuf>,
    /// How long a browser session cookie lives.
    pub session_ttl: Duration,
    /// Largest request body (a plugin upload), in bytes.
    pub max_body_bytes: usize,
    /// How long `POST /v1/tools/{plugin}/{tool}/call` waits for the outcome before answering
    /// 202 with the call's job (e.g. while it waits for an approval).
    pub call_wait: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7700)),
            allowed_hosts: Vec::new(),
            rate_per_second: 50,
            rate_burst: 100,
            policy: None,
            session_ttl: Duration::from_secs(8 * 3600),
            max_body_bytes: 64 << 20,
            call_wait: Duration::from_secs(30),
        }
    }
}

/// What every handler shares.
pub(crate) struct Shared {
    /// The Keel home opened for agent work (kernel, tools, models, policy, the `App`).
    pub host: Arc<AgentHost>,
    /// The compiled policy new jobs and calls run under (for dry runs).
    pub policy: Policy,
    pub config: ServerConfig,
    pub auth: auth::Auth,
    /// Serialises installs and removals: ownership is decided and written without a race.
    pub plugin_lock: tokio::sync::Mutex<()>,
    /// Cancelled when the server shuts down: ends the open event streams, which would otherwise
    /// hold a graceful shutdown forever.
    pub stopping: CancellationToken,
}

/// The handlers' state.
pub(crate) type AppState = Arc<Shared>;

/// The HTTP server over one Keel home.
pub struct Server {
    state: AppState,
    protected: Vec<(String, Router)>,
}

impl Server {
    /// Open `home` (creating it if needed) for serving with `config`; prints nothing.
    pub async fn open(home: &Path, config: ServerConfig) -> Result<Self, keel_app::AppError> {
        let choice = PolicyChoice::resolve(home, config.policy.as_deref())?;
        let policy = match &choice.reference.source {
            Some(text) => Policy::from_toml_str(text, &choice.reference.name)
                .map_err(|e| keel_app::AppError::user(format!("invalid policy: {e}")))?,
            None => Policy::allow_all(),
        };
        let host = Arc::new(AgentHost::open(home, None, choice).await?);
        let auth = auth::Auth::new(&config);
        Ok(Self {
            state: Arc::new(Shared {
                host,
                policy,
                config,
                auth,
                plugin_lock: tokio::sync::Mutex::new(()),
                stopping: CancellationToken::new(),
            }),
            protected: Vec::new(),
        })
    }

    /// Serve `router` under `path` behind the same Host/Origin check, authentication and rate
    /// limit as `/v1`: its handlers find the request's [`keel_app::Caller`] and the id of the key
    /// it authenticated with ([`keel_app::keys::KeyId`]) in the request extensions. This is how
    /// `/mcp` (keel-mcp) is mounted.
    pub fn with_protected_routes(mut self, path: impl Into<String>, router: Router) -> Self {
        self.protected.push((path.into(), router));
        self
    }

    /// The agent host the server runs on (e.g. for a nested router that needs it).
    pub fn host(&self) -> &Arc<AgentHost> {
        &self.state.host
    }

    /// The whole application: `/v1`, nested protected routers, the approvals page.
    pub fn router(&self) -> Router {
        let mut protected = routes::api_router().with_state(self.state.clone());
        for (path, router) in &self.protected {
            protected = protected.nest_service(path, router.clone());
        }
        let protected = protected
            .layer(axum::middleware::from_fn_with_state(
                self.state.clone(),
                auth::end_streams_on_revocation,
            ))
            .layer(axum::middleware::from_fn_with_state(
                self.state.clone(),
                auth::authenticate,
            ));
        Router::new()
            .merge(web::router())
            .merge(protected)
            .fallback(routes::no_route)
            .layer(axum::middleware::map_response(error::json_rejections))
            .layer(axum::extract::DefaultBodyLimit::max(self.state.config.max_body_bytes))
            .layer(axum::middleware::from_fn_with_state(
                self.state.clone(),
                auth::check_host,
            ))
    }

    /// Serve on `listener` until `shutdown` completes, with the in-process worker running: queued
    /// jobs start here, approved ones resume here, and the recovery sweep runs.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let stop = CancellationToken::new();
        let worker = self.state.host.rt.spawn_worker(stop.clone());
        let app = self.router();
        let stopping = self.state.stopping.clone();
        let shutdown = async move {
            shutdown.await;
            stopping.cancel();
        };
        // No Nagle delay: a small response (an SSE frame, a JSON-RPC answer) would otherwise wait
        // ~40 ms for the client's delayed ACK.
        use axum::serve::ListenerExt;
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let result = axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>())
            .with_graceful_shutdown(shutdown)
            .await;
        stop.cancel();
        let _ = worker.await;
        result
    }
}
