//! keel-mcp: Keel's installed tools for any MCP client, still under Keel's policy, budgets,
//! approvals and ledger.
//!
//! - [`McpServer`]: one server over one [`AgentHost`] (the kernel runs in this process: the jobs
//!   its calls start are driven here), shared by every MCP session.
//! - [`McpServer::serve_stdio`]: `keel mcp` (stdout carries only JSON-RPC).
//! - [`http_service`]: Streamable HTTP (`/mcp` of `keel serve`), callers authenticated by the
//!   server's own layer, which puts a [`Caller`] in the request's extensions.
//! - `tools/list` ([`catalog`]): installed tools as `plugin__tool` ([`names`]), filtered by `[mcp]`.
//! - `tools/call` ([`call`]): the governed path (`AgentHost::start_call`); every failure is an
//!   `isError` result carrying the error kind, never a protocol error; approvals by elicitation
//!   or by `keel actions approve`.
//! - MCP tasks ([`tasks`]): a client that declares the tasks extension gets a task for a call
//!   that waits for an approval or runs longer than `[mcp] task_after_ms`; the task is the job.
//!
//! Depends on `keel-app` only (plus rmcp and axum for the protocol): no store, sandbox or kernel
//! service is reached except through it.

pub mod call;
pub mod catalog;
pub mod names;
pub mod sessions;
pub mod tasks;

use std::borrow::Cow;
use std::sync::{Arc, Weak};
use std::time::Duration;

use keel_app::tools::RegistryToolHost;
use keel_app::{AgentHost, AppError, Caller};
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CancelTaskParams, GetTaskParams, GetTaskResult, Implementation,
    InitializeRequestParams, InitializeResult, ListToolsResult, PaginatedRequestParams, ProtocolVersion,
    ServerCapabilities, ServerConfig, UpdateTaskParams,
};
use rmcp::service::{NotificationContext, RequestContext};
use rmcp::{ErrorData, RoleServer, ServerHandler, ServiceExt};
use tokio::sync::watch;

use crate::catalog::{Catalog, ToolFilter};

/// The async runtime to run [`McpServer::serve_stdio`] on (`keel mcp`): one worker thread.
///
/// A stdio server answers one client, whose requests come one at a time as a rule; a second
/// worker only added wake-ups (the idle worker woken at every spawned task, tasks moved between
/// cores, each move an inter-processor interrupt on a VM): Keel added ~70 µs more per
/// `tools/call` with two workers on a 2-core machine (`benches/roundtrip.rs`). Calls made at the
/// same time still run together: a guest yields to the runtime at every epoch tick (5 ms), and
/// file and cache work goes to the blocking pool.
pub fn stdio_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
}

/// One MCP server over one Keel home. Cheap to clone; every session (the stdio one, each HTTP
/// session) shares it.
#[derive(Clone)]
pub struct McpServer {
    shared: Arc<Shared>,
}

/// What every session shares.
pub(crate) struct Shared {
    pub(crate) host: Arc<AgentHost>,
    tools: RegistryToolHost,
    filter: ToolFilter,
    /// How long a call waits for an approval the client cannot give before answering
    /// `approval_pending`.
    pub(crate) approval_wait: Duration,
    /// How long a call from a tasks-capable client may run before it becomes a task.
    pub(crate) task_after: Duration,
    /// The tasks of every session.
    pub(crate) tasks: tasks::Tasks,
    /// Bumped whenever the offered tool list changes.
    generation: watch::Sender<u64>,
}

impl McpServer {
    /// A server over `host`, configured by the home's `[mcp]` section. Starts the registry watch
    /// (`notifications/tools/list_changed`) on the current tokio runtime; it stops when the last
    /// clone of the server is dropped.
    pub async fn new(host: Arc<AgentHost>) -> Result<Self, AppError> {
        let settings = host.app.config.mcp.clone();
        let filter = ToolFilter::new(&settings)?;
        let tools = RegistryToolHost::new(host.app.clone(), None).await?;
        let shared = Arc::new(Shared {
            host,
            tools,
            filter,
            approval_wait: Duration::from_secs(settings.approval_wait_secs),
            task_after: Duration::from_millis(settings.task_after_ms),
            tasks: tasks::Tasks::default(),
            generation: watch::channel(0).0,
        });
        let first = shared.registry_fingerprint().await?;
        tokio::spawn(watch_registry(
            Arc::downgrade(&shared),
            first,
            Duration::from_millis(settings.watch_ms.max(50)),
        ));
        Ok(Self { shared })
    }

    /// The host the server calls through.
    pub fn host(&self) -> &Arc<AgentHost> {
        &self.shared.host
    }

    /// The tools offered now.
    pub async fn catalog(&self) -> Result<Catalog, AppError> {
        self.shared.catalog().await
    }

    /// The handler of one session whose callers are `identity`.
    pub fn session(&self, identity: Identity) -> KeelMcp {
        KeelMcp {
            shared: self.shared.clone(),
            identity,
        }
    }

    /// Serve one MCP session on stdin/stdout until the client closes it. Every call is made in
    /// `scope`, on behalf of the client's name from `initialize`, in one Keel session per
    /// connection. Nothing but JSON-RPC is written to stdout.
    pub async fn serve_stdio(&self, scope: String) -> Result<(), AppError> {
        let handler = self.session(Identity::Fixed {
            scope,
            session: format!("mcp-{}", uuid::Uuid::now_v7().simple()),
        });
        // Pipes (as MCP clients start servers) are read and written on the runtime's reactor,
        // reopened so the process's own stdin/stdout stay blocking; anything else falls back to
        // tokio's stdin/stdout, which hand every read and write to a blocking-pool thread (two
        // thread wake-ups per message).
        let running = handler
            .serve(rmcp::transport::stdio_pipes())
            .await
            .map_err(|e| AppError::internal(format!("MCP session failed to start: {e}")))?;
        running
            .waiting()
            .await
            .map_err(|e| AppError::internal(format!("MCP session failed: {e}")))?;
        Ok(())
    }
}

impl Shared {
    async fn catalog(&self) -> Result<Catalog, AppError> {
        Catalog::load(&self.tools, &self.filter).await
    }

    /// What the registry watch compares: the whole catalog and who owns which plugin.
    async fn registry_fingerprint(&self) -> Result<String, AppError> {
        let catalog = self.catalog().await?.fingerprint();
        let owners = self.host.app.db.plugin_owners().await?;
        Ok(format!("{catalog}\n{owners:?}"))
    }

    /// The Keel tool (`plugin/tool`) offered as MCP tool `mcp`, as `tools/list` would name it;
    /// an unknown tool is a protocol error (MCP: invalid params), not a tool result.
    async fn offered(&self, mcp: &str, scope: &str) -> Result<String, ErrorData> {
        // The usual `plugin__tool` name: one lookup of that tool, not the whole catalog.
        if let Some(keel) = names::keel_name(mcp)
            && let Some((plugin, tool)) = keel.split_once('/')
            && names::mcp_name(plugin, tool) == mcp
            && self.filter.allows(&keel)
        {
            // Whether it is served, from a fresh stamp read, without building its descriptor.
            match self.tools.offers(&keel, scope).await {
                Ok(true) => return Ok(keel),
                Ok(false) => {}
                Err(e) => return Err(ErrorData::internal_error(e.to_string(), None)),
            }
        }
        // A long name (shortened with a hash), or one `__` splits another way, is in the catalog.
        let catalog = self
            .catalog()
            .await
            .map_err(|e| ErrorData::internal_error(e.message, None))?;
        let keel = catalog
            .get(mcp)
            .map(|entry| entry.keel.clone())
            .ok_or_else(|| unknown_tool(mcp))?;
        match self.tools.offers(&keel, scope).await {
            Ok(true) => Ok(keel),
            Ok(false) => Err(unknown_tool(mcp)),
            Err(e) => Err(ErrorData::internal_error(e.to_string(), None)),
        }
    }

    /// A fingerprint of what `tools/list` answers `scope` (`None` if the registry cannot be read).
    async fn offered_fingerprint(&self, scope: &str) -> Option<String> {
        let tools = self.catalog_for(scope).await.ok()?;
        serde_json::to_string(&tools).ok()
    }

    /// The tools `tools/list` offers to `scope`: the catalog less the plugins another scope owns
    /// (an alias goes with the plugin it stands for).
    async fn catalog_for(&self, scope: &str) -> Result<Vec<rmcp::model::Tool>, ErrorData> {
        let internal = |message: String| ErrorData::internal_error(message, None);
        let catalog = self.catalog().await.map_err(|e| internal(e.message))?;
        let visible: std::collections::HashSet<String> = keel_app::keys::plugins_visible_in(&self.host.app.db, scope)
            .await
            .map_err(|e| internal(e.message))?
            .into_iter()
            .collect();
        Ok(catalog
            .entries
            .into_iter()
            .filter(|entry| {
                let (plugin, tool) = entry.keel.split_once('/').unwrap_or((&entry.keel, ""));
                let serving = keel_app::tools::alias_target(plugin, tool).map_or(plugin, |(target, _)| target);
                visible.contains(serving)
            })
            .map(|entry| entry.tool)
            .collect())
    }
}

fn unknown_tool(mcp: &str) -> ErrorData {
    ErrorData::invalid_params(format!("Unknown tool: {mcp}"), None)
}

/// Poll the registry every `every`; bump the generation when the catalog or a plugin's owner
/// changes (each session then works out whether its own list did). Cheap: a read of the plugins
/// and owners tables, no component is loaded.
async fn watch_registry(shared: Weak<Shared>, mut last: String, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        let Some(shared) = shared.upgrade() else { return };
        match shared.registry_fingerprint().await {
            Ok(now) => {
                if now != last {
                    last = now;
                    shared.generation.send_modify(|g| *g += 1);
                }
            }
            Err(e) => tracing::warn!(error = %e.message, "cannot read the plugin registry"),
        }
    }
}

/// Who the callers of a session are.
#[derive(Debug, Clone)]
pub enum Identity {
    /// One local client (stdio): this scope, this Keel session; the principal is the client's
    /// name from `initialize`.
    Fixed {
        /// Scope (tenant) of every call.
        scope: String,
        /// Keel session of every call ("approve for this session" covers it).
        session: String,
    },
    /// Each HTTP request carries its [`Caller`] (put there by the server's auth layer); the Keel
    /// session is the MCP session (`Mcp-Session-Id`).
    PerRequest,
}

/// The identity one call is made under.
#[derive(Debug, Clone)]
pub(crate) struct CallIdentity {
    pub(crate) scope: String,
    pub(crate) principal: Option<String>,
    pub(crate) session: Option<String>,
}

/// The MCP handler of one session.
#[derive(Clone)]
pub struct KeelMcp {
    shared: Arc<Shared>,
    identity: Identity,
}

impl KeelMcp {
    /// The scope a request is made in (any role may list what it may see).
    fn scope(&self, ctx: &RequestContext<RoleServer>) -> Result<String, ErrorData> {
        match &self.identity {
            Identity::Fixed { scope, .. } => Ok(scope.clone()),
            Identity::PerRequest => ctx
                .extensions
                .get::<http::request::Parts>()
                .and_then(|p| p.extensions.get::<Caller>())
                .map(|caller| caller.scope.clone())
                .ok_or_else(|| ErrorData::invalid_request("no authenticated caller", None)),
        }
    }

    fn identity(&self, ctx: &RequestContext<RoleServer>) -> Result<CallIdentity, ErrorData> {
        match &self.identity {
            Identity::Fixed { scope, session } => Ok(CallIdentity {
                scope: scope.clone(),
                principal: ctx.peer.peer_info().map(|info| info.client_info.name.clone()),
                session: Some(session.clone()),
            }),
            Identity::PerRequest => {
                let parts = ctx.extensions.get::<http::request::Parts>();
                let caller = parts.and_then(|p| p.extensions.get::<Caller>()).ok_or_else(|| {
                    // The HTTP layer refuses such requests first; this is a second line.
                    ErrorData::invalid_request("no authenticated caller", None)
                })?;
                if !caller.role.allows(keel_app::Role::Write) {
                    return Err(ErrorData::invalid_request(
                        "this key may only read: calling tools needs the write role",
                        None,
                    ));
                }
                let session = parts
                    .and_then(|p| p.headers.get("mcp-session-id"))
                    .and_then(|v| v.to_str().ok())
                    .map(|s| format!("mcp-{s}"));
                Ok(CallIdentity {
                    scope: caller.scope.clone(),
                    principal: caller.principal.clone(),
                    session,
                })
            }
        }
    }
}

impl ServerHandler for KeelMcp {
    fn get_info(&self) -> ServerConfig {
        #[allow(deprecated)] // logging carries the "how to approve" notice to clients without elicitation
        let capabilities = ServerCapabilities::builder()
            .enable_tools()
            .enable_tool_list_changed()
            .enable_logging()
            .enable_tasks()
            .build();
        let mut info = InitializeResult::new(capabilities);
        info.server_info = Implementation::new("keel", env!("CARGO_PKG_VERSION"));
        info.instructions = Some(
            "Keel's installed WebAssembly tools, named plugin__tool. Every call is checked against \
             Keel's policy and budgets and recorded in its ledger; a call that needs approval asks \
             for it (elicitation) or waits until someone runs `keel actions approve ID`."
                .into(),
        );
        info
    }

    /// The classic lifecycle (initialize, server-to-client requests for elicitation,
    /// unsolicited notifications) that every client in use speaks.
    fn supported_protocol_versions(&self) -> Cow<'static, [ProtocolVersion]> {
        Cow::Owned(
            ProtocolVersion::KNOWN_VERSIONS
                .iter()
                .filter(|v| v.as_str() <= ProtocolVersion::LATEST_WITH_INITIALIZE.as_str())
                .cloned()
                .collect(),
        )
    }

    async fn initialize(
        &self,
        request: InitializeRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<InitializeResult, ErrorData> {
        context.peer.set_peer_info(request.clone());
        self.negotiate_initialize(&request)
    }

    async fn on_initialized(&self, context: NotificationContext<RoleServer>) {
        // Tell this client when the tools *it* is offered change, for as long as it is
        // connected: another scope's installs are none of its business (not even that they
        // happened). A session whose scope is unknown here hears of every change.
        let scope = match &self.identity {
            Identity::Fixed { scope, .. } => Some(scope.clone()),
            Identity::PerRequest => context
                .extensions
                .get::<http::request::Parts>()
                .and_then(|p| p.extensions.get::<Caller>())
                .map(|caller| caller.scope.clone()),
        };
        let shared = Arc::downgrade(&self.shared);
        let mut changes = self.shared.generation.subscribe();
        let mut offered = match &scope {
            Some(scope) => self.shared.offered_fingerprint(scope).await,
            None => None,
        };
        let peer = context.peer;
        tokio::spawn(async move {
            while changes.changed().await.is_ok() {
                if let Some(scope) = &scope {
                    let Some(shared) = shared.upgrade() else { return };
                    let now = shared.offered_fingerprint(scope).await;
                    // Unreadable (`None`): tell, and let the client list again.
                    if now.is_some() && now == offered {
                        continue;
                    }
                    offered = now;
                }
                if peer.notify_tool_list_changed().await.is_err() {
                    return;
                }
            }
        });
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        let scope = self.scope(&context)?;
        Ok(ListToolsResult::with_all_items(self.shared.catalog_for(&scope).await?))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let identity = self.identity(&context)?;
        // The check that the tool is offered and the call share one registry read.
        keel_app::tools::one_call(async {
            let keel = self.shared.offered(&request.name, &identity.scope).await?;
            let arguments = serde_json::Value::Object(request.arguments.unwrap_or_default());
            // The client declared the tasks extension (at initialize, or in this request's _meta).
            if context.client_capabilities().is_some_and(|c| c.supports_tasks()) {
                let elicits = context
                    .peer
                    .supported_elicitation_modes()
                    .contains(&rmcp::service::ElicitationMode::Form);
                return Ok(tasks::call(&self.shared, &identity, &keel, arguments, elicits).await);
            }
            let result = call::governed(&self.shared, &identity, &keel, arguments, &context).await;
            Ok(result.into())
        })
        .await
    }

    async fn get_task(
        &self,
        request: GetTaskParams,
        context: RequestContext<RoleServer>,
    ) -> Result<GetTaskResult, ErrorData> {
        let identity = self.identity(&context)?;
        tasks::get(&self.shared, &identity, &request.task_id).await
    }

    async fn update_task(
        &self,
        request: UpdateTaskParams,
        context: RequestContext<RoleServer>,
    ) -> Result<(), ErrorData> {
        let identity = self.identity(&context)?;
        tasks::update(&self.shared, &identity, &request.task_id, request.input_responses).await
    }

    async fn cancel_task(
        &self,
        request: CancelTaskParams,
        context: RequestContext<RoleServer>,
    ) -> Result<(), ErrorData> {
        let identity = self.identity(&context)?;
        tasks::cancel(&self.shared, &identity, &request.task_id).await
    }
}

/// The Streamable HTTP MCP endpoint over `server`, to mount (e.g. at `/mcp`) behind an auth layer
/// that inserts the request's [`Caller`] into its extensions: a request without one is refused
/// with 401. Sessions are kept in memory (rmcp's local session manager); only loopback `Host`
/// headers are accepted (DNS rebinding), as in [`http_service_with`] with the default config.
pub fn http_service(server: McpServer) -> axum::Router {
    http_service_with(server, rmcp::transport::StreamableHttpServerConfig::default())
}

/// [`http_service`] that also accepts the `Host` names `hosts` (beyond loopback), e.g. the
/// address `keel serve` listens on and its `--allow-host` names; the front end in front of it
/// checks `Host` and `Origin` too.
pub fn http_service_allowing(server: McpServer, hosts: &[String]) -> axum::Router {
    let mut config = rmcp::transport::StreamableHttpServerConfig::default();
    config.allowed_hosts.extend(hosts.iter().cloned());
    http_service_with(server, config)
}

/// [`http_service`] with rmcp's transport settings (allowed hosts and origins, keep-alive, ...).
/// Every session belongs to the caller that opened it (see [`sessions`]).
pub fn http_service_with(server: McpServer, config: rmcp::transport::StreamableHttpServerConfig) -> axum::Router {
    use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
    let manager = LocalSessionManager::default();
    let idle = manager.session_config.keep_alive;
    let service = rmcp::transport::StreamableHttpService::new(
        move || Ok(server.session(Identity::PerRequest)),
        Arc::new(manager),
        config,
    );
    let owners = Arc::new(sessions::Owners::new(idle, sessions::MAX_PER_CALLER));
    axum::Router::new()
        .fallback_service(service)
        .layer(axum::middleware::from_fn_with_state(owners, sessions::guard))
}
