//! MCP `tools/call` round trips: Keel (`hello/greet`, governed: policy, budget check, job, events,
//! ledger receipt in SQLite, sandboxed WebAssembly call) next to a do-nothing rmcp server (one
//! tool returning a constant: the pipe floor), measured by the same client in the same run, over
//! stdio (a child process each, the rmcp client) and over Streamable HTTP (on 127.0.0.1, one
//! hand-written HTTP/1.1 client; Keel's server is `keel serve`'s, with an API key), plus the
//! governed call alone (`AgentHost::call`, no MCP; back to back, and each call after a 200 µs idle
//! pause, as a server idles between requests), and that call again with an in-memory kernel store
//! (`AgentHost::open_in_memory`: the governance path alone, no durable write).
//!
//! A VM's steal time comes in bursts that would land on whichever scenario runs then, so the floor
//! and Keel are interleaved: both servers run side by side and the client alternates between them
//! in rounds of [`ROUND`] calls (floor first in even rounds, Keel first in odd ones). Besides each
//! scenario's p50/p99 over all its calls, it reports what Keel adds: the difference of the p50s,
//! and, more robust, the median of the per-round differences of the two rounds' medians (a burst
//! shifts one round pair, not the median of them all), with their interquartile range.
//!
//! `cargo bench --bench roundtrip [-- CALLS]` (default 2000 per scenario, after 200 warm-up calls;
//! `cargo test --benches` runs 20 after 5, as a smoke test). On the shared build:
//! `cargo bench --profile dev --bench roundtrip`; with Keel's crates optimised but the dev
//! dependency build reused: `CARGO_PROFILE_DEV_OPT_LEVEL=3 cargo bench --profile dev --bench roundtrip`.
//!
//! `KEEL_MCP_BENCH_POLICY=FILE` makes FILE the home's policy (it must allow `hello/greet`; without
//! it, no policy: allow-all, whose one-line text each job keeps inline; a text past 512 bytes is
//! stored once and each job names it by sha256).
//!
//! `KEEL_MCP_BENCH_ONLY=stdio,stdio-memory,http,inproc` (any of them) runs only those scenarios, e.g. to profile
//! one of them (`perf record` of the whole run then holds nothing else).
//!
//! The same binary is the servers: with `KEEL_MCP_BENCH_ROLE=floor|keel` it serves MCP on stdio.

use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_app::AgentHost;
use keel_app::call::CallRequest;
use keel_app::runtime::PolicyChoice;
use rmcp::model::{CallToolRequestParams, CallToolResult, ContentBlock, ListToolsResult, ServerCapabilities};
use rmcp::model::{InitializeResult, PaginatedRequestParams, ServerConfig, Tool};
use rmcp::service::RequestContext;
use rmcp::transport::{ConfigureCommandExt as _, TokioChildProcess};
use rmcp::{ErrorData, RoleServer, ServerHandler, ServiceExt as _};
use serde_json::{Value, json};

/// The allocator the `keel` binary uses, so the bench measures what ships.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const ROLE: &str = "KEEL_MCP_BENCH_ROLE";

/// The pipe floor: one tool, a constant answer.
#[derive(Clone)]
struct Floor;

impl ServerHandler for Floor {
    fn get_info(&self) -> ServerConfig {
        InitializeResult::new(ServerCapabilities::builder().enable_tools().build())
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        let schema = json!({"type": "object"}).as_object().cloned().unwrap_or_default();
        Ok(ListToolsResult::with_all_items(vec![Tool::new(
            "noop__greet",
            "Answers a constant.",
            Arc::new(schema),
        )]))
    }

    async fn call_tool(
        &self,
        _request: CallToolRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<rmcp::model::CallToolResponse, ErrorData> {
        let output = json!({"greeting": "Hello, Ada!"});
        let mut result = CallToolResult::success(vec![ContentBlock::text(output.to_string())]);
        result.structured_content = Some(output);
        Ok(result.into())
    }
}

async fn keel_host(home: &std::path::Path) -> Arc<AgentHost> {
    let choice = PolicyChoice::resolve(home, None).expect("policy");
    Arc::new(
        AgentHost::open_with(home, None, choice, None, false)
            .await
            .expect("open the Keel home"),
    )
}

/// Serve as a child process: the floor, or Keel over `KEEL_HOME`.
async fn serve_role(role: &str) {
    match role {
        "floor" => {
            // The same transport as `keel mcp` (non-blocking pipes on the reactor): the difference
            // between the two servers is then the governed call, not how stdio is read.
            let running = Floor.serve(rmcp::transport::stdio_pipes()).await.expect("serve");
            let _ = running.waiting().await;
        }
        _ => {
            let home = std::env::var_os("KEEL_HOME").expect("KEEL_HOME");
            let home = std::path::Path::new(&home);
            let host = if role == "keel-memory" {
                let choice = PolicyChoice::resolve(home, None).expect("policy");
                let app = Arc::new(keel_app::App::open(home).await.expect("open home"));
                Arc::new(AgentHost::open_in_memory(app, choice).await.expect("open in memory"))
            } else {
                keel_host(home).await
            };
            let server = keel_mcp::McpServer::new(host).await.expect("server");
            server.serve_stdio("bench".into()).await.expect("serve");
        }
    }
}

struct Stats {
    p50: Duration,
    p99: Duration,
}

fn stats(mut samples: Vec<Duration>) -> Stats {
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    Stats {
        p50: at(0.50),
        p99: at(0.99),
    }
}

fn line(name: &str, s: &Stats) {
    println!(
        "{name:<48} p50 {:>8.1} µs   p99 {:>8.1} µs",
        s.p50.as_secs_f64() * 1e6,
        s.p99.as_secs_f64() * 1e6
    );
}

/// Calls per scenario in one round of the interleaved measurement.
const ROUND: usize = 50;

/// An MCP client of one server under test.
enum Client {
    /// The rmcp client of a child process serving on stdio.
    Stdio(rmcp::service::RunningService<rmcp::RoleClient, ()>),
    /// The hand-written Streamable HTTP client.
    Http(HttpClient),
}

impl Client {
    /// The rmcp client of this binary serving as `role` on stdio.
    async fn stdio(role: &str, home: &std::path::Path) -> Self {
        let exe = std::env::current_exe().expect("current exe");
        let command = tokio::process::Command::new(exe).configure(|c| {
            c.env(ROLE, role).env("KEEL_HOME", home).env_remove("KEEL_LOG");
        });
        let transport = TokioChildProcess::new(command).expect("spawn the server");
        Self::Stdio(().serve(transport).await.expect("initialize"))
    }

    /// One `tools/call` of `tool` with `{"name": "Ada"}`: how long the round trip took.
    async fn call(&mut self, tool: &str) -> Duration {
        match self {
            Self::Stdio(client) => {
                let args = json!({"name": "Ada"}).as_object().cloned().unwrap_or_default();
                let params = CallToolRequestParams::new(tool.to_string()).with_arguments(args);
                let started = Instant::now();
                let result = client.call_tool(params).await.expect("tools/call");
                let took = started.elapsed();
                assert_eq!(result.is_error, Some(false), "{result:?}");
                took
            }
            Self::Http(client) => {
                let body = json!({"method": "tools/call", "params": {"name": tool, "arguments": {"name": "Ada"}}});
                let started = Instant::now();
                let response = client.request(body).await;
                let took = started.elapsed();
                assert_eq!(response["result"]["isError"], false, "{response}");
                took
            }
        }
    }

    async fn close(self) {
        if let Self::Stdio(client) = self {
            let _ = client.cancel().await;
        }
    }
}

/// The floor's and Keel's round trips, measured interleaved, with what Keel adds per round.
struct Interleaved {
    floor: Stats,
    keel: Stats,
    /// Keel's round median minus the floor's round median, per round, in µs, sorted.
    round_diffs: Vec<f64>,
}

fn median(samples: &mut [Duration]) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

/// `calls` round trips each of `floor_tool` on `floor` and `keel_tool` on `keel`, after `warmup`
/// each, alternating between them in rounds of [`ROUND`] calls.
async fn interleaved(
    (floor, floor_tool): (&mut Client, &str),
    (keel, keel_tool): (&mut Client, &str),
    (warmup, calls): (usize, usize),
) -> Interleaved {
    for _ in 0..warmup {
        floor.call(floor_tool).await;
        keel.call(keel_tool).await;
    }
    let round = ROUND.min(calls).max(1);
    let (mut floor_all, mut keel_all) = (Vec::with_capacity(calls), Vec::with_capacity(calls));
    let mut round_diffs = Vec::new();
    let mut left = calls;
    for r in 0.. {
        if left == 0 {
            break;
        }
        let n = round.min(left);
        left -= n;
        let (mut f, mut k) = (Vec::with_capacity(n), Vec::with_capacity(n));
        // Alternate which goes first, so neither always follows the other's after-effects.
        for keel_turn in [r % 2 == 1, r % 2 == 0] {
            for _ in 0..n {
                if keel_turn {
                    k.push(keel.call(keel_tool).await);
                } else {
                    f.push(floor.call(floor_tool).await);
                }
            }
        }
        round_diffs.push((median(&mut k).as_secs_f64() - median(&mut f).as_secs_f64()) * 1e6);
        floor_all.extend(f);
        keel_all.extend(k);
    }
    round_diffs.sort_by(f64::total_cmp);
    Interleaved {
        floor: stats(floor_all),
        keel: stats(keel_all),
        round_diffs,
    }
}

/// Print an interleaved measurement of `transport`.
fn report(transport: &str, m: &Interleaved) {
    line(&format!("{transport:<6} floor (rmcp, constant tool)"), &m.floor);
    line(&format!("{transport:<6} keel  (hello/greet, governed)"), &m.keel);
    let d = &m.round_diffs;
    let at = |q: f64| d[((d.len() as f64 * q) as usize).min(d.len() - 1)];
    println!(
        "{transport:<6} keel adds: p50 difference {:.1} µs; median of {} per-round differences {:.1} µs (IQR {:.1} to {:.1} µs)",
        (m.keel.p50.as_secs_f64() - m.floor.p50.as_secs_f64()) * 1e6,
        d.len(),
        at(0.5),
        at(0.25),
        at(0.75),
    );
}

/// A minimal Streamable HTTP client: one keep-alive HTTP/1.1 connection, one session.
struct HttpClient {
    sender: hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>,
    session: Option<String>,
    addr: std::net::SocketAddr,
    /// The API key sent as a bearer token, if the server wants one.
    key: Option<String>,
    next_id: u64,
}

impl HttpClient {
    async fn connect(addr: std::net::SocketAddr, key: Option<String>) -> Self {
        let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        let (sender, connection) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .expect("handshake");
        tokio::spawn(connection);
        let mut client = Self {
            sender,
            session: None,
            addr,
            key,
            next_id: 0,
        };
        let init = client
            .request(json!({
                "method": "initialize",
                "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "bench", "version": "0"}}
            }))
            .await;
        assert!(init.get("result").is_some(), "{init}");
        client
            .notify(json!({"jsonrpc": "2.0", "method": "notifications/initialized"}))
            .await;
        client
    }

    fn post(&self, body: &Value) -> http::Request<http_body_util::Full<bytes::Bytes>> {
        let mut request = http::Request::post(format!("http://{}/mcp", self.addr))
            .header("host", self.addr.to_string())
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream")
            .header("mcp-protocol-version", "2025-06-18");
        if let Some(session) = &self.session {
            request = request.header("mcp-session-id", session);
        }
        if let Some(key) = &self.key {
            request = request.header("authorization", format!("Bearer {key}"));
        }
        request
            .body(http_body_util::Full::new(bytes::Bytes::from(body.to_string())))
            .expect("request")
    }

    async fn notify(&mut self, body: Value) {
        use http_body_util::BodyExt as _;
        self.sender.ready().await.expect("connection ready");
        let response = self.sender.send_request(self.post(&body)).await.expect("send");
        let _ = response.into_body().collect().await;
    }

    /// Send one request and return its JSON-RPC response (from JSON or from the SSE stream).
    async fn request(&mut self, mut body: Value) -> Value {
        use http_body_util::BodyExt as _;
        self.next_id += 1;
        body["jsonrpc"] = json!("2.0");
        body["id"] = json!(self.next_id);
        self.sender.ready().await.expect("connection ready");
        let response = self.sender.send_request(self.post(&body)).await.expect("send");
        if let Some(session) = response.headers().get("mcp-session-id") {
            self.session = Some(session.to_str().expect("session id").to_string());
        }
        let bytes = response.into_body().collect().await.expect("body").to_bytes();
        let text = String::from_utf8_lossy(&bytes);
        text.lines()
            .filter_map(|l| l.strip_prefix("data:"))
            .chain(std::iter::once(text.as_ref()))
            .filter_map(|data| serde_json::from_str::<Value>(data.trim()).ok())
            .find(|v| v.get("id") == Some(&json!(self.next_id)))
            .unwrap_or_else(|| panic!("no response in {text}"))
    }
}

async fn serve_http(router: axum::Router) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    // Without TCP_NODELAY the SSE response waits for the client's delayed ACK (~40 ms).
    use axum::serve::ListenerExt as _;
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    tokio::spawn(async move { axum::serve(listener, router).await.expect("serve") });
    addr
}

async fn driver((warmup, calls): (usize, usize)) {
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path();
    // The durability the goal names: a receipt that survives `kill -9` of the host
    // (`KEEL_BENCH_DURABILITY=full` measures the default, which also survives a power loss).
    let durability = std::env::var("KEEL_BENCH_DURABILITY").unwrap_or_else(|_| "normal".into());
    std::fs::create_dir_all(home).expect("home");
    std::fs::write(
        home.join("config.toml"),
        format!("[store]\ndurability = \"{durability}\"\n"),
    )
    .expect("config");
    // The home's policy (`KEEL_MCP_BENCH_POLICY=FILE`; it must allow `hello/greet`), else none:
    // allow-all. A real policy adds its rules' evaluation and, once, its stored text.
    let policy = std::env::var_os("KEEL_MCP_BENCH_POLICY");
    if let Some(file) = &policy {
        std::fs::copy(file, home.join(keel_app::runtime::DEFAULT_POLICY_FILE)).expect("copy the policy");
    }
    {
        let app = keel_app::App::open(home).await.expect("open home");
        let bytes = keel_testutil::guest_bytes("hello");
        app.install_unattended(&bytes, "hello").await.expect("install hello");
    }
    println!(
        "tools/call round trips, {calls} calls each after {warmup} warm-up calls (floor and Keel interleaved in rounds of {ROUND}), durability {durability}, policy {}",
        policy.as_ref().map_or("allow-all".into(), |p| p.to_string_lossy())
    );

    let only = std::env::var("KEEL_MCP_BENCH_ONLY").unwrap_or_default();
    let runs = |scenario: &str| only.is_empty() || only.split(',').any(|s| s.trim() == scenario);

    let stdio = if runs("stdio") {
        Some(stdio_scenario(home, "keel", "stdio", (warmup, calls)).await)
    } else {
        None
    };
    let stdio_memory = if runs("stdio-memory") {
        Some(stdio_scenario(home, "keel-memory", "stdio, in-memory store", (warmup, calls)).await)
    } else {
        None
    };

    let mut http = None;
    if runs("http") {
        http = Some(http_scenario(home, (warmup, calls)).await);
    }
    let host = keel_host(home).await;
    let (mut governed, mut in_memory) = (None, None);
    if runs("inproc") {
        let (g, m) = in_process(home, &host, (warmup, calls)).await;
        (governed, in_memory) = (Some(g), Some(m));
    }
    let round_median =
        |m: &Option<Interleaved>| m.as_ref().map_or(f64::NAN, |m| m.round_diffs[m.round_diffs.len() / 2]);
    let p50 = |s: &Option<Stats>| s.as_ref().map_or(f64::NAN, |s| s.p50.as_secs_f64() * 1e6);
    println!(
        "keel over the floor, median of per-round p50 differences: stdio {:.1} µs (in-memory store {:.1} µs), http {:.1} µs (the governed call itself: {:.1} µs with SQLite, {:.1} µs in memory)",
        round_median(&stdio),
        round_median(&stdio_memory),
        round_median(&http),
        p50(&governed),
        p50(&in_memory)
    );
}

/// The floor and Keel's server in `role` (`keel`, or `keel-memory` for the in-memory store), both
/// over stdio, measured in turn and reported as `label`.
async fn stdio_scenario(
    home: &std::path::Path,
    role: &str,
    label: &str,
    (warmup, calls): (usize, usize),
) -> Interleaved {
    let (mut floor, mut keel) = (Client::stdio("floor", home).await, Client::stdio(role, home).await);
    let m = interleaved(
        (&mut floor, "noop__greet"),
        (&mut keel, "hello__greet"),
        (warmup, calls),
    )
    .await;
    floor.close().await;
    keel.close().await;
    report(label, &m);
    m
}

/// The floor and Keel over Streamable HTTP, interleaved. Keel is `keel serve`'s router, as the
/// CLI assembles it: `/mcp` behind the Host/Origin check, API-key authentication and the per-key
/// rate limit (set high enough not to throttle the bench), with the server's in-process worker
/// running; the client sends its key with every request.
async fn http_scenario(home: &std::path::Path, (warmup, calls): (usize, usize)) -> Interleaved {
    use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
    let floor_router = axum::Router::new().nest_service(
        "/mcp",
        rmcp::transport::StreamableHttpService::new(
            || Ok(Floor),
            Arc::new(LocalSessionManager::default()),
            Default::default(),
        ),
    );
    let mut floor = Client::Http(HttpClient::connect(serve_http(floor_router).await, None).await);

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let config = keel_server::ServerConfig {
        listen: addr,
        rate_per_second: 1_000_000,
        rate_burst: 1_000_000,
        ..keel_server::ServerConfig::default()
    };
    let server = keel_server::Server::open(home, config).await.expect("open the server");
    // On the server's own database: a second handle would run a checkpointer of its own on the
    // file while the calls are measured.
    let key = keel_app::keys::create_key(&server.host().app.db, "bench", keel_app::Role::Write, None)
        .await
        .expect("API key")
        .key;
    let mcp = keel_mcp::McpServer::new(server.host().clone())
        .await
        .expect("MCP server");
    let server = server.with_protected_routes(
        "/mcp",
        keel_mcp::http_service_allowing(mcp, &[addr.ip().to_string(), addr.to_string()]),
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(server.serve(listener, async {
        let _ = stopped.await;
    }));
    let mut keel = Client::Http(HttpClient::connect(addr, Some(key)).await);

    let http = interleaved(
        (&mut floor, "noop__greet"),
        (&mut keel, "hello__greet"),
        (warmup, calls),
    )
    .await;
    report("http (keel serve)", &http);
    drop(keel);
    let _ = stop.send(());
    serving.await.expect("server task").expect("serve");
    http
}

/// How long the in-process call's thread idles before each call in the "after idle" scenario:
/// about what a stdio server idles between requests here (the client reading the response and
/// sending the next one).
const IDLE_BETWEEN_CALLS: Duration = Duration::from_micros(200);

/// The governed call in this process, no MCP: on SQLite (back to back, then each call after an
/// idle pause), then with the in-memory kernel store.
///
/// The idle scenario shows what a server pays that a loop does not: a thread that sleeps between
/// requests finds its CPU cold (on a VM, its vCPU halted and caches shared with other guests),
/// and the same call costs more. Spinning instead of sleeping through the same pause keeps it
/// close to the back-to-back figure (measured for a 400 µs pause: 216–218 µs p50 spinning,
/// 341–361 µs sleeping, 204 µs back to back).
async fn in_process(home: &std::path::Path, host: &Arc<AgentHost>, (warmup, calls): (usize, usize)) -> (Stats, Stats) {
    let governed = call_loop(host, (warmup, calls), None).await;
    line("in-process AgentHost::call (no MCP)", &governed);
    let idle = call_loop(host, (warmup, calls), Some(IDLE_BETWEEN_CALLS)).await;
    line("in-process, each call after 200 µs idle", &idle);

    // The governance path alone: the same call with the jobs, events, ledger and journal in
    // the kernel's in-memory store (no durable write).
    let choice = PolicyChoice::resolve(home, None).expect("policy");
    let app = Arc::new(keel_app::App::open(home).await.expect("open home"));
    let memory = Arc::new(AgentHost::open_in_memory(app, choice).await.expect("open in memory"));
    let in_memory = call_loop(&memory, (warmup, calls), None).await;
    line("in-process, in-memory store (no durable write)", &in_memory);
    (governed, in_memory)
}

/// `hello/greet` called `warmup + calls` times on `host`, each after `idle` (the thread sleeping).
///
/// The loop runs on a worker of the runtime, as a server's request handler does: `start_call`
/// runs the call on a task of its own, which a loop on the `block_on` thread would hand to another
/// thread and wait for (two thread wake-ups per call that no front end pays).
async fn call_loop(host: &Arc<AgentHost>, (warmup, calls): (usize, usize), idle: Option<Duration>) -> Stats {
    let host = host.clone();
    let samples = tokio::spawn(async move {
        let mut samples = Vec::with_capacity(calls);
        for i in 0..warmup + calls {
            if let Some(idle) = idle {
                std::thread::sleep(idle);
            }
            let request = CallRequest::new("bench", "hello/greet", json!({"name": "Ada"}));
            let started = Instant::now();
            let outcome = host.call(&request).await.expect("call");
            let took = started.elapsed();
            assert!(outcome.succeeded(), "{outcome:?}");
            if i >= warmup {
                samples.push(took);
            }
        }
        samples
    })
    .await
    .expect("the call loop");
    stats(samples)
}

fn main() {
    if let Ok(role) = std::env::var(ROLE) {
        // As `keel mcp` runs.
        let runtime = keel_mcp::stdio_runtime().expect("runtime");
        runtime.block_on(serve_role(&role));
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    // `cargo bench` passes `--bench`; `cargo test --benches` runs this once, quickly.
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let smoke = !std::env::args().any(|a| a == "--bench");
    let calls = args
        .first()
        .and_then(|a| a.parse().ok())
        .unwrap_or(if smoke { 20 } else { 2000 });
    let warmup = if smoke { 5 } else { 200 };
    runtime.block_on(driver((warmup, calls)));
}
