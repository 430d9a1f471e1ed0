//! Per-call store state: WASI context, HTTP hooks enforcing the allowlist, the resource limiter,
//! and the `keel:plugin/host` functions (log, progress).

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use wasmtime::component::{HasSelf, Linker, ResourceTable};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpHooks, WasiHttpView};

use crate::grants::NetPolicy;

/// Generated bindings for `keel:plugin/tool`.
#[allow(missing_docs)]
pub mod bindings {
    wasmtime::component::bindgen!({
        world: "tool",
        path: "../../wit",
        exports: { default: async },
    });
}

use bindings::keel::plugin::host::LogLevel as WitLogLevel;

/// Longest single log line kept; the rest is cut.
const MAX_LOG_LINE: usize = 4096;

pub use keel_kernel::tool::{Denial, LogLevel, LogRecord};

/// A progress report from a plugin.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProgressRecord {
    /// Fraction done, if known.
    pub fraction: Option<f32>,
    /// Message.
    pub message: String,
}

/// What the host collected during one call, shared with the HTTP hooks (which run in their own tasks).
#[derive(Debug, Default)]
pub struct CallDiagnostics {
    /// Logged lines kept.
    pub logs: Vec<LogRecord>,
    /// Bytes of log messages kept so far.
    pub log_bytes: u64,
    /// Log lines dropped because of the byte cap.
    pub logs_dropped: u64,
    /// Progress reports (the last 64).
    pub progress: Vec<ProgressRecord>,
    /// Network refusals.
    pub denials: Vec<Denial>,
    /// Bytes over the call's HTTP connections (shared with their I/O tasks).
    pub traffic: Arc<Traffic>,
}

/// Bytes written to and read from one call's network connections, counted on the socket.
#[derive(Debug, Default)]
pub struct Traffic {
    sent: std::sync::atomic::AtomicU64,
    received: std::sync::atomic::AtomicU64,
}

impl Traffic {
    /// Bytes written so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Bytes read so far.
    pub fn received(&self) -> u64 {
        self.received.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub(crate) fn add_sent(&self, n: usize) {
        self.sent.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
    }

    pub(crate) fn add_received(&self, n: usize) {
        self.received.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Resource limiter that remembers which limit stopped the guest, so a trap after a refused
/// `memory.grow` is reported as a memory limit rather than a generic crash.
#[derive(Debug)]
pub struct Limiter {
    /// Memory cap in bytes, for all the call's linear memories together.
    pub memory_bytes: usize,
    /// Bytes of all linear memories of the call so far (a store holds one call).
    pub memory_used: usize,
    /// Table elements cap.
    pub table_elements: usize,
    /// Core instances cap.
    pub instances: usize,
    /// Tables cap.
    pub tables: usize,
    /// Memories cap.
    pub memories: usize,
    /// Set when a growth was refused.
    pub hit: Option<&'static str>,
}

impl wasmtime::ResourceLimiter for Limiter {
    fn memory_growing(&mut self, current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        // Called per memory (with `current` 0 when one is created): keep the sum across them. A
        // growth that fails after this approved it stays counted, which only errs towards less.
        let total = self.memory_used.saturating_sub(current).saturating_add(desired);
        let ok = total <= self.memory_bytes;
        if ok {
            self.memory_used = total;
        } else {
            self.hit = Some("memory");
        }
        Ok(ok)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        let ok = desired <= self.table_elements;
        if !ok {
            self.hit = Some("table_elements");
        }
        Ok(ok)
    }

    fn instances(&self) -> usize {
        self.instances
    }

    fn tables(&self) -> usize {
        self.tables
    }

    fn memories(&self) -> usize {
        self.memories
    }
}

/// The data of one call's `Store`.
pub struct State {
    pub(crate) wasi: WasiCtx,
    pub(crate) http: WasiHttpCtx,
    pub(crate) hooks: NetHooks,
    pub(crate) table: ResourceTable,
    pub(crate) limiter: Limiter,
    pub(crate) journal: Arc<Mutex<CallDiagnostics>>,
    pub(crate) max_log_bytes: u64,
}

impl WasiView for State {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for State {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.hooks,
        }
    }
}

impl bindings::keel::plugin::types::Host for State {}

impl bindings::keel::plugin::host::Host for State {
    fn log(&mut self, level: WitLogLevel, message: String) {
        let level = match level {
            WitLogLevel::Trace => LogLevel::Trace,
            WitLogLevel::Debug => LogLevel::Debug,
            WitLogLevel::Info => LogLevel::Info,
            WitLogLevel::Warn => LogLevel::Warn,
            WitLogLevel::Error => LogLevel::Error,
        };
        let message = truncate(message, MAX_LOG_LINE);
        let mut journal = self.journal.lock().expect("journal lock");
        if journal.log_bytes + message.len() as u64 > self.max_log_bytes {
            journal.logs_dropped += 1;
            return;
        }
        journal.log_bytes += message.len() as u64;
        // `?message`: Debug escapes what `tracing` lets through (line breaks, bidi overrides).
        tracing::debug!(target: "keel::plugin", ?level, ?message);
        journal.logs.push(LogRecord { level, message });
    }

    fn progress(&mut self, fraction: Option<f32>, message: String) {
        let fraction = fraction.filter(|f| f.is_finite()).map(|f| f.clamp(0.0, 1.0));
        let mut journal = self.journal.lock().expect("journal lock");
        if journal.progress.len() >= 64 {
            journal.progress.remove(0);
        }
        journal.progress.push(ProgressRecord {
            fraction,
            message: truncate(message, MAX_LOG_LINE),
        });
    }
}

fn truncate(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut cut = max;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push('…');
    }
    text
}

/// Register every interface Keel offers guests: WASI p2 (gated per call by the `WasiCtx`),
/// `wasi:http` (gated by [`NetHooks`]) and `keel:plugin/host`.
pub fn add_to_linker(linker: &mut Linker<State>) -> wasmtime::Result<()> {
    wasmtime_wasi::p2::add_to_linker_async(linker)?;
    wasmtime_wasi_http::p2::add_only_http_to_linker_async(linker)?;
    bindings::keel::plugin::host::add_to_linker::<State, HasSelf<State>>(linker, |state| state)?;
    bindings::keel::plugin::types::add_to_linker::<State, HasSelf<State>>(linker, |state| state)?;
    Ok(())
}

/// `wasi:http` hooks: every outgoing request (including each redirect hop, which the guest sends
/// as a new request) must match the allowlist, and every address its host resolves to must be
/// public unless private networks were granted (see [`crate::egress`]).
pub struct NetHooks {
    pub(crate) policy: Arc<NetPolicy>,
    pub(crate) journal: Arc<Mutex<CallDiagnostics>>,
    pub(crate) connections: ConnectionBudget,
    pub(crate) egress: Arc<crate::egress::Egress>,
}

/// Outgoing HTTP requests of one call still open (each holds a connection until its response is
/// done), capped by [`crate::Limits::max_handles`].
#[derive(Debug, Clone)]
pub struct ConnectionBudget {
    live: Arc<std::sync::atomic::AtomicUsize>,
    max: usize,
}

/// One open request; gives its place back when dropped.
struct ConnectionPermit(Arc<std::sync::atomic::AtomicUsize>);

impl ConnectionBudget {
    /// Allow at most `max` requests open at once.
    pub fn new(max: usize) -> Self {
        Self {
            live: Arc::default(),
            max,
        }
    }

    fn acquire(&self) -> Option<ConnectionPermit> {
        use std::sync::atomic::Ordering;
        self.live
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| (n < self.max).then_some(n + 1))
            .ok()
            .map(|_| ConnectionPermit(self.live.clone()))
    }
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Hold `permit` until the request fails or its connection is done.
fn holding(permit: ConnectionPermit, send: SendFuture) -> SendFuture {
    Box::new(async move {
        let (response, io) = Box::into_pin(send).await?;
        let io = async move {
            let _permit = permit;
            Box::into_pin(io).await
        };
        Ok((
            response,
            Box::new(io) as Box<dyn Future<Output = wasmtime_wasi_http::Result<()>> + Send>,
        ))
    })
}

type SendFuture = Box<dyn Future<Output = wasmtime_wasi_http::Result<crate::egress::Sent>> + Send>;

impl WasiHttpHooks for NetHooks {
    fn send_request(
        &mut self,
        request: http::Request<wasmtime_wasi_http::WasiBody>,
        options: Option<wasmtime_wasi_http::RequestOptions>,
        _fut: Box<dyn Future<Output = wasmtime_wasi_http::Result<()>> + Send>,
    ) -> SendFuture {
        let Some(permit) = self.connections.acquire() else {
            self.journal.lock().expect("journal lock").denials.push(Denial {
                capability: "network".into(),
                target: request.uri().authority().map(|a| a.to_string()).unwrap_or_default(),
                reason: format!(
                    "the call already has {} HTTP requests open (limit max_handles)",
                    self.connections.max
                ),
                grant: None,
            });
            return Box::new(async { Err(wasmtime_wasi_http::Error::ConnectionLimitReached) });
        };
        let send: SendFuture = Box::new(crate::egress::send(
            self.egress.clone(),
            self.policy.clone(),
            self.journal.clone(),
            request,
            options,
        ));
        holding(permit, send)
    }
}
