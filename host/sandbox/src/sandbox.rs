//! The sandbox: two engines (chosen by the linear memory a component declares), prepared plugins
//! (validated, precompiled, pre-linked), and calls that each run in a fresh store with only the
//! granted capabilities and the call's limits.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keel_kernel::tool::{Receipt, ToolCallContext, ToolError, ToolOutcome};
use wasmtime::component::{Component, InstancePre, Linker, ResourceTable};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store, Trap, UpdateDeadline};
use wasmtime_wasi::{FsPerms, WasiCtxBuilder};
use wasmtime_wasi_http::WasiHttpCtx;

use crate::cache::{ArtifactCache, CacheOutcome, ComponentStore, sha256_hex};
use crate::config::{DescribeLimits, Limits, SCRATCH_GUEST, SandboxConfig};
use crate::exports::ExportedFunc;
use crate::grants::{FileIdentity, Grants, NetPolicy, Preopen};
use crate::host::bindings::{ToolPre, keel::plugin::types as wit};
use crate::host::{CallDiagnostics, ConnectionBudget, Denial, Limiter, LogRecord, NetHooks, ProgressRecord, State};
use crate::info::{
    Capabilities, FsMode, FsRequest, ImportSummary, NAME_RULE, PluginInfo, ToolInfo, check_guest_path, check_version,
    valid_name,
};
use crate::scratch::Scratch;
use crate::session::{SessionKey, Sessions};
use crate::stdio::{GuestOutput, OutputWriter, StdioMode};

/// How long the output a command wrote before its deadline may still take to reach its writers.
const DRAIN_AFTER_DEADLINE: Duration = Duration::from_secs(1);

/// The WIT package this host implements.
pub const WIT_PACKAGE: &str = "keel:plugin";
/// Its version.
pub const WIT_VERSION: &str = "0.1.0";
const TOOLS_EXPORT: &str = "keel:plugin/tools";
/// The input field that names a session (see [`crate::config::SessionConfig`]).
pub const SESSION_FIELD: &str = "session_id";
/// How often a running call's scratch directory is measured against its cap.
const SCRATCH_WATCH: Duration = Duration::from_millis(20);

/// Why a component could not be prepared or run. Each is one clear sentence.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// Not WebAssembly at all (random or truncated bytes).
    #[error("not a WebAssembly file: {0}")]
    NotWasm(String),
    /// A core module, not a component.
    #[error(
        "this is a core WebAssembly module, not a component; build it for wasm32-wasip2 (or wrap it with `wasm-tools component new`)"
    )]
    CoreModule,
    /// A component that does not implement the tool world.
    #[error("this component does not implement the keel:plugin/tool world: {0}")]
    WrongWorld(String),
    /// Built against another major version of the contract.
    #[error(
        "this plugin was built for {found} but this host implements {WIT_PACKAGE}@{WIT_VERSION}; rebuild it against {WIT_PACKAGE}@{WIT_VERSION}"
    )]
    IncompatibleVersion {
        /// e.g. `keel:plugin@0.2.0`.
        found: String,
    },
    /// Structurally invalid (fails validation / compilation).
    #[error("invalid component: {0}")]
    Invalid(String),
    /// Imports something Keel does not provide.
    #[error("the component imports interfaces Keel does not provide: {0}")]
    UnsupportedImports(String),
    /// `describe` failed or returned nonsense.
    #[error("the plugin's describe() failed: {0}")]
    Describe(String),
    /// A grant cannot be applied (e.g. the directory vanished).
    #[error("cannot apply grants: {0}")]
    Grant(String),
    /// I/O or engine failure in the host.
    #[error("host error: {0}")]
    Host(String),
}

/// A plugin ready to run: validated, compiled (or loaded from cache), pre-linked, described.
pub struct PreparedPlugin {
    /// sha256 of the component bytes.
    pub sha256: String,
    /// What `describe` returned.
    pub info: PluginInfo,
    /// What the component imports.
    pub imports: ImportSummary,
    /// Whether the native code came from the cache.
    pub cache: CacheOutcome,
    /// Time to compile or load.
    pub load_time: Duration,
    kind: Kind,
}

/// How a prepared plugin's tools are called.
enum Kind {
    /// A `keel:plugin/tool` component: `call(ctx, tool, json)`.
    Tool(ToolPre<State>),
    /// Any other component: each offered exported function is a tool, called with converted
    /// values (`exports.rs`); `funcs` is in the order of `info.tools`.
    Plain {
        pre: InstancePre<State>,
        funcs: Vec<ExportedFunc>,
    },
}

/// What [`Sandbox::check_world`] found a component to be.
enum World {
    Tool,
    Plain,
}

impl PreparedPlugin {
    /// The engine that compiled it and runs its calls: [`Sandbox::engine`], unless its core
    /// modules declare more than 4 MiB of initial linear memory (CPython, a JavaScript engine),
    /// which run on a second engine that resets a finished instance's memory in full rather than
    /// page by page.
    pub fn engine(&self) -> &Engine {
        match &self.kind {
            Kind::Tool(pre) => pre.engine(),
            Kind::Plain { pre, .. } => pre.engine(),
        }
    }

    /// Its sha256 and its engine.
    fn id(&self) -> (&str, &Engine) {
        (&self.sha256, self.engine())
    }
}

impl std::fmt::Debug for PreparedPlugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreparedPlugin")
            .field("sha256", &self.sha256)
            .field("name", &self.info.name)
            .finish()
    }
}

/// A tool's successful result.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolOutput {
    /// The tool's JSON output.
    pub output: serde_json::Value,
}

/// Everything one call produced.
#[derive(Debug)]
pub struct CallReport {
    /// The tool's result, or why there is none.
    pub result: Result<ToolOutput, ToolError>,
    /// What the call cost (wall time, fuel, peak memory, bytes): recorded with its ledger entry.
    pub receipt: Receipt,
    /// Lines the plugin logged (capped by `max_log_bytes`).
    pub logs: Vec<LogRecord>,
    /// True when log lines were dropped.
    pub logs_truncated: bool,
    /// Progress reports.
    pub progress: Vec<ProgressRecord>,
    /// Capabilities refused by the host during the call.
    pub denials: Vec<Denial>,
    /// Captured guest stdout (capped).
    pub stdout: Vec<u8>,
    /// Captured guest stderr (capped).
    pub stderr: Vec<u8>,
}

impl CallReport {
    /// A call that never ran, failed with `error`.
    fn unrun(error: ToolError) -> Self {
        Self {
            result: Err(error),
            receipt: Receipt::default(),
            logs: vec![],
            logs_truncated: false,
            progress: vec![],
            denials: vec![],
            stdout: vec![],
            stderr: vec![],
        }
    }

    /// The kernel's view of the call: its result and receipt.
    pub fn into_outcome(self) -> ToolOutcome {
        ToolOutcome {
            result: self.result.map(|o| o.output),
            receipt: self.receipt,
            diagnostics: keel_kernel::tool::Diagnostics {
                logs: self.logs,
                logs_truncated: self.logs_truncated,
                denials: self.denials,
                stdout: String::from_utf8_lossy(&self.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&self.stderr).into_owned(),
            },
        }
    }
}

/// A fresh store plus the handles to what the guest produces during the call.
struct CallStore {
    store: Store<State>,
    journal: Arc<Mutex<CallDiagnostics>>,
    stdout: GuestOutput,
    stderr: GuestOutput,
    /// What each preopen opened to (`None` for a narrowed sub-directory that did not exist): a
    /// ready or session store is reused only while every grant still opens to the same directory
    /// (else a fresh store re-checks and refuses). Taken from the very handles the store holds: a
    /// second open a moment earlier let a rename in between make the record differ from what the
    /// guest sees.
    opened: Vec<Option<FileIdentity>>,
}

/// A store that runs calls: one call's, or a session's for its life. Fields drop in order: the
/// store (and the descriptors it holds) before the scratch directory is removed.
struct Live {
    call: CallStore,
    /// Made by the first call (so instantiation counts against that call's deadline).
    instance: Option<LiveInstance>,
    scratch: Option<Scratch>,
    /// Bytes of stdout and stderr already reported (a session's pipes keep everything).
    stdout_seen: usize,
    stderr_seen: usize,
    /// The plugin and what the store was built from (see [`Sandbox::call`]).
    sha256: String,
    fingerprint: String,
}

/// What each preopen opens to now (`None` for a narrowed sub-directory that does not exist), or
/// `Err` when one cannot be opened as granted.
fn opened_now(preopens: &[Preopen]) -> Result<Vec<Option<FileIdentity>>, ()> {
    preopens
        .iter()
        .map(|p| match crate::preopen::open(p) {
            Ok(Some(fd)) => crate::preopen::identity(&fd).map(Some).map_err(|_| ()),
            Ok(None) => Ok(None),
            Err(_) => Err(()),
        })
        .collect()
}

/// The instance a [`Live`] store holds.
enum LiveInstance {
    Tool(crate::host::bindings::Tool),
    Plain(wasmtime::component::Instance),
}

struct Inner {
    /// Runs components that declare little linear memory (see [`MemoryClass`]).
    small: Runtime,
    /// Runs components that declare much (CPython, a JavaScript engine).
    large: Runtime,
    cache: ArtifactCache,
    config: SandboxConfig,
    egress: Arc<crate::egress::Egress>,
    prepared: Mutex<HashMap<String, Arc<PreparedPlugin>>>,
    sessions: Mutex<Sessions<Live>>,
    ready: Mutex<Ready>,
    freeing: Freeing,
    /// `describe()` calls made (see [`Sandbox::describe_calls`]).
    describes: std::sync::atomic::AtomicU64,
    _ticker: EpochTicker,
}

/// An engine and the linker of Keel's host interfaces for it.
struct Runtime {
    engine: Engine,
    linker: Linker<State>,
}

/// Which of the sandbox's two engines a component runs on. They differ only in how the pooling
/// allocator resets a finished instance's linear memory: for a small one, only the pages the
/// instance dirtied (Linux's `PAGEMAP_SCAN`); for a large one, the first
/// [`SandboxConfig::memory_keep_resident_bytes`] in full. The scan finds at most 32 dirty regions
/// (wasmtime's limit) and decommits everything after them, so a CPython heap, dirtied in hundreds
/// of places, would fault its pages back in at every call: a ready python-exec `print(1)` measured
/// ~1 ms slower with it, while a small tool's reset (~1 MiB `memset` for a Rust guest) shrinks to
/// its few dirty pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MemoryClass {
    Small,
    Large,
}

/// A component whose core modules declare more initial linear memory than this, in all, runs on
/// the large-memory engine. Measured on Keel's guests: Rust and C ~1.1 MiB; componentize-js
/// (StarlingMonkey) ~9 MiB, componentize-py (CPython) ~13–14 MiB.
const SMALL_MEMORY_BYTES: u64 = 4 << 20;

impl MemoryClass {
    /// The class of a component whose core modules declare `bytes` of initial linear memory.
    fn of(bytes: u64) -> Self {
        if bytes > SMALL_MEMORY_BYTES {
            Self::Large
        } else {
            Self::Small
        }
    }
}

/// Bytes of initial linear memory component `wasm`'s core modules declare in their memory
/// sections (a memory one module imports is defined, and counted, in another). Unparseable bytes
/// declare none: the compiler rejects them anyway.
fn declared_memory_bytes(wasm: &[u8]) -> u64 {
    let mut declared = 0u64;
    for payload in wasmparser::Parser::new(0).parse_all(wasm) {
        let Ok(payload) = payload else { break };
        if let wasmparser::Payload::MemorySection(memories) = payload {
            for memory in memories.into_iter().flatten() {
                let page = 1u64 << memory.page_size_log2.unwrap_or(16).min(16);
                declared = declared.saturating_add(memory.initial.saturating_mul(page));
            }
        }
    }
    declared
}

/// Instances of finished calls still being freed off the caller's task (see
/// [`Sandbox::free_later`]): a call that finds the pool full meanwhile waits for them.
#[derive(Default)]
struct Freeing {
    pending: std::sync::atomic::AtomicUsize,
    /// Of `pending`, those queued on the housekeeping thread (see [`MAX_HOUSEKEEPING_FREES`]).
    on_housekeeper: std::sync::atomic::AtomicUsize,
    done: tokio::sync::Notify,
}

/// Stores queued on the housekeeping thread beyond which a small store goes to the blocking pool
/// too: the housekeeper is not keeping up, and the stores would otherwise fill the pool until
/// calls wait.
const MAX_HOUSEKEEPING_FREES: usize = 8;

/// The process's housekeeping thread (`keel-housekeeping`, started on first use): a
/// current-thread runtime that frees small finished stores and builds ready instances, off the
/// runtime the calls run on. Done by a task on the caller's runtime, that work made the worker
/// which had just answered a request busy, or woke the other one, when the next request came;
/// here it does neither (stdio MCP bench: Keel adds ~85 µs less, 472–511 → 404–411 µs, three
/// alternating runs). `None` if the thread cannot be started: the caller's runtime does the work.
fn housekeeper() -> Option<&'static tokio::runtime::Handle> {
    static HANDLE: std::sync::OnceLock<Option<tokio::runtime::Handle>> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            let handle = runtime.handle().clone();
            std::thread::Builder::new()
                .name("keel-housekeeping".into())
                .spawn(move || runtime.block_on(std::future::pending::<()>()))
                .ok()?;
            Some(handle)
        })
        .as_ref()
}

/// How long a call waits, each time, for a pool slot being freed.
const FREE_WAIT: Duration = Duration::from_secs(2);

/// How many times a call makes room and retries instantiating on a full pool.
const ROOM_ATTEMPTS: u32 = 16;

/// `$instantiate` (an instantiation future, built anew per attempt), retried while the pool is
/// full but room is coming (see [`Sandbox::room_for_a_call`]).
macro_rules! instantiate_with_room {
    ($sandbox:expr, $instantiate:expr) => {{
        let mut attempts = 0;
        loop {
            match $instantiate.await {
                Err(e) if attempts < ROOM_ATTEMPTS && pool_full(&e) && $sandbox.room_for_a_call().await => {
                    attempts += 1;
                }
                done => break done,
            }
        }
    }};
}

/// Pre-instantiated stores, by plugin and what the store is built from (see [`Sandbox::call`]).
#[derive(Default)]
struct Ready {
    by_key: HashMap<String, ReadyQueue>,
    total: usize,
}

impl Ready {
    /// Set `total` from the queues after instances were taken out of them.
    fn recount(&mut self) {
        self.total = self.by_key.values().map(|q| q.lives.len()).sum();
    }
}

#[derive(Default)]
struct ReadyQueue {
    lives: Vec<(Instant, Live)>,
    /// Refills under way.
    filling: usize,
}

/// Building ready instances, in the background (see [`Sandbox::refill`]).
type Refill = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

/// A ready instance older than this is dropped rather than used: it was built from grants as
/// they were then (a grant's directory is re-checked whenever a store is built).
const READY_MAX_AGE: Duration = Duration::from_secs(60);

/// Bytes of each freed table kept resident (zeroed with `memset`, not `madvise`): 8 KiB entries.
const TABLE_KEEP_RESIDENT: usize = 64 << 10;

/// The component host. Cheap to clone; share one per process.
#[derive(Clone)]
pub struct Sandbox {
    inner: Arc<Inner>,
}

/// Advances the engine epoch on a background thread; stops when dropped.
struct EpochTicker {
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl EpochTicker {
    fn start(engines: Vec<Engine>, tick: Duration) -> Self {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        std::thread::Builder::new()
            .name("keel-epoch".into())
            .spawn(move || {
                while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                    std::thread::sleep(tick);
                    for engine in &engines {
                        engine.increment_epoch();
                    }
                }
            })
            .expect("spawn epoch thread");
        Self { stop }
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Build the configuration of the engine for `class`. Only the features Keel uses are compiled in
/// (see Cargo.toml).
fn engine_config(config: &SandboxConfig, class: MemoryClass) -> Config {
    let mut wasm = Config::new();
    wasm.wasm_component_model(true)
        .epoch_interruption(true)
        .consume_fuel(config.fuel_metering)
        .max_wasm_stack(config.max_wasm_stack)
        .memory_init_cow(true)
        .parallel_compilation(true);
    // Diagnostics: `KEEL_PERFMAP=1` writes /tmp/perf-PID.map, so `perf report` names guest
    // functions (e.g. CPython's) instead of bare JIT addresses. Not part of compiled code.
    if std::env::var_os("KEEL_PERFMAP").is_some_and(|v| v == "1") {
        wasm.profiler(wasmtime::ProfilingStrategy::PerfMap);
    }
    let instances = config.pool_instances;
    let mut pool = PoolingAllocationConfig::new();
    pool.total_component_instances(instances)
        .total_core_instances(instances * 8)
        .total_memories(instances * 2)
        .total_tables(instances * 8)
        .total_stacks(instances)
        .max_core_instances_per_component(32)
        .max_memories_per_component(4)
        .max_tables_per_component(32)
        .table_elements(100_000)
        .max_memory_size(config.max_memory_bytes as usize)
        .max_component_instance_size(4 << 20)
        .max_core_instance_size(4 << 20)
        .linear_memory_keep_resident(config.memory_keep_resident_bytes)
        // A freed table is zeroed in place rather than given back with `madvise`: the next
        // instance's lazily initialised function references (filled in as the guest makes
        // indirect calls) then write to resident pages instead of taking a page fault and a TLB
        // shoot-down each, which cost ~15% of a small call (perf, `warm_call/keel`).
        .table_keep_resident(TABLE_KEEP_RESIDENT)
        // PAGEMAP_SCAN (Linux 6.7+; elsewhere wasmtime resets as usual) for small memories only:
        // it saves ~8 µs of a small call (`warm_call/keel` 48 → 40 µs) but costs ~1 ms of a
        // python-exec run (ready + resident `print(1)` median 1.7–1.9 ms without it, 2.7–3.3 ms
        // with it; `EXEC_BENCH_PROFILE=python` of the exec bench). See [`MemoryClass`].
        .pagemap_scan(match class {
            MemoryClass::Small => wasmtime::Enabled::Auto,
            MemoryClass::Large => wasmtime::Enabled::No,
        });
    wasm.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    wasm
}

/// Create `component`'s copy-on-write memory images now, once, rather than in its first
/// instantiation: wasmtime seals each fresh image memfd (`F_SEAL_WRITE`), which Linux refuses with
/// `EBUSY` while it briefly holds an extra reference to the file's pages (THP collapse, page
/// migration), and that made a plugin's first `describe()` fail now and then. Retried a few
/// times; any other failure is left to instantiation to report (it creates the images lazily).
fn initialize_memory_images(component: &Component) {
    for attempt in 0..5 {
        match component.initialize_copy_on_write_image() {
            Err(e)
                if e.chain().any(|cause| {
                    cause
                        .downcast_ref::<std::io::Error>()
                        .is_some_and(|io| io.kind() == std::io::ErrorKind::ResourceBusy)
                }) =>
            {
                std::thread::sleep(Duration::from_millis(1 << attempt));
            }
            _ => return,
        }
    }
}

impl Runtime {
    fn new(config: &SandboxConfig, class: MemoryClass) -> Result<Self, SandboxError> {
        let engine = Engine::new(&engine_config(config, class)).map_err(|e| SandboxError::Host(format!("{e:#}")))?;
        let mut linker = Linker::new(&engine);
        crate::host::add_to_linker(&mut linker).map_err(|e| SandboxError::Host(format!("{e:#}")))?;
        crate::open_at::add_to_linker(&mut linker).map_err(|e| SandboxError::Host(format!("{e:#}")))?;
        Ok(Self { engine, linker })
    }
}

impl Sandbox {
    /// Create the engines, linkers, epoch ticker and artifact cache.
    pub fn new(config: SandboxConfig) -> Result<Self, SandboxError> {
        let small = Runtime::new(&config, MemoryClass::Small)?;
        let large = Runtime::new(&config, MemoryClass::Large)?;
        // One artifact cache serves both: their compiled code is the same.
        if compatibility(&small.engine) != compatibility(&large.engine) {
            return Err(SandboxError::Host("the two engines compile differently".into()));
        }
        raise_open_file_limit();
        if config.scratch.enabled {
            // Leftovers of Keel processes that died (or exited) before removing their scratch
            // directories; off the caller's thread, as the temporary directory may be large.
            let parent = config.scratch.dir.clone().unwrap_or_else(std::env::temp_dir);
            let _ = std::thread::Builder::new()
                .name("keel-scratch-sweep".into())
                .spawn(move || crate::scratch::sweep_orphans(&parent));
        }
        let cache = match &config.cache_key {
            Some(key) => ArtifactCache::open_with_key(&config.cache_dir, &small.engine, key),
            None => ArtifactCache::open(&config.cache_dir, &small.engine),
        }
        .map_err(|e| SandboxError::Host(format!("cache directory {}: {e}", config.cache_dir.display())))?;
        let egress = Arc::new(crate::egress::Egress::new(&config).map_err(SandboxError::Host)?);
        let ticker = EpochTicker::start(vec![small.engine.clone(), large.engine.clone()], config.epoch_tick);
        let sessions = Mutex::new(Sessions::new(config.sessions.clone()));
        Ok(Self {
            inner: Arc::new(Inner {
                small,
                large,
                cache,
                config,
                egress,
                prepared: Mutex::default(),
                sessions,
                ready: Mutex::default(),
                freeing: Freeing::default(),
                describes: std::sync::atomic::AtomicU64::new(0),
                _ticker: ticker,
            }),
        })
    }

    /// The engine of components with little linear memory (for benchmarks and advanced
    /// embedding; a component that declares much runs on a second one).
    pub fn engine(&self) -> &Engine {
        &self.inner.small.engine
    }

    fn runtime(&self, class: MemoryClass) -> &Runtime {
        match class {
            MemoryClass::Small => &self.inner.small,
            MemoryClass::Large => &self.inner.large,
        }
    }

    /// The [`MemoryClass`] of component `sha256`, whose bytes are `wasm`: from its kept note, else
    /// read from `wasm` (and noted, for the starts that never read the component).
    fn class_of(&self, sha256: &str, wasm: &[u8]) -> MemoryClass {
        if let Some(class) = self.noted_class(sha256) {
            return class;
        }
        let declared = declared_memory_bytes(wasm);
        self.inner.cache.put_note(sha256, MEMORY_NOTE, &declared.to_le_bytes());
        MemoryClass::of(declared)
    }

    /// The [`MemoryClass`] of component `sha256` from its kept note, if there is one.
    fn noted_class(&self, sha256: &str) -> Option<MemoryClass> {
        let note = self.inner.cache.get_note(sha256, MEMORY_NOTE)?;
        Some(MemoryClass::of(u64::from_le_bytes(note.try_into().ok()?)))
    }

    /// The linker for components compiled by `engine`.
    fn linker_for(&self, engine: &Engine) -> &Linker<State> {
        if Engine::same(engine, &self.inner.large.engine) {
            &self.inner.large.linker
        } else {
            &self.inner.small.linker
        }
    }

    /// The configuration.
    pub fn config(&self) -> &SandboxConfig {
        &self.inner.config
    }

    /// Validate, compile (or load from the verified cache), pre-link and describe a component.
    /// Prepared plugins are memoised by sha256 for the life of the sandbox.
    /// The whole step is bounded by [`DescribeLimits::prepare_timeout_ms`].
    ///
    /// A component that does not implement the `keel:plugin/tool` world but exports ordinary
    /// functions is prepared too, each function a tool (see the README's "Plain components");
    /// its name must then come from its `component-name` section: use [`Sandbox::prepare_as`]
    /// to name it after the file it was installed from otherwise.
    pub async fn prepare(&self, wasm: &[u8]) -> Result<Arc<PreparedPlugin>, SandboxError> {
        self.bounded(self.prepare_bytes(wasm, None, None)).await
    }

    /// [`Sandbox::prepare`], naming a plain component (one that does not implement the tool world
    /// and has no `component-name` section) after `label`, e.g. the file name it is installed
    /// from (normalised to `[a-z0-9_-]`). Tool-world plugins name themselves; `label` is unused.
    pub async fn prepare_as(&self, wasm: &[u8], label: &str) -> Result<Arc<PreparedPlugin>, SandboxError> {
        self.bounded(self.prepare_bytes(wasm, None, Some(label))).await
    }

    /// Prepare the component `sha256` of `store`, installed as `name`: the fast start of an
    /// installed plugin. When the verified artifact is cached it is mapped, and the component is
    /// neither read nor hashed (the content-addressed store verified it at install, and the
    /// artifact's seal binds that hash); otherwise the component is read, checked against its
    /// hash and prepared as [`Sandbox::prepare_as`] does, with `name` as the label.
    pub async fn prepare_stored(
        &self,
        store: &ComponentStore,
        sha256: &str,
        name: &str,
    ) -> Result<Arc<PreparedPlugin>, SandboxError> {
        self.bounded(self.prepare_stored_unbounded(store, sha256, name)).await
    }

    async fn bounded(
        &self,
        work: impl Future<Output = Result<Arc<PreparedPlugin>, SandboxError>>,
    ) -> Result<Arc<PreparedPlugin>, SandboxError> {
        let bound = Duration::from_millis(self.inner.config.describe.prepare_timeout_ms);
        tokio::time::timeout(bound, work).await.unwrap_or_else(|_| {
            Err(SandboxError::Invalid(format!(
                "preparing the plugin (compile and describe) took longer than {} ms",
                bound.as_millis()
            )))
        })
    }

    /// Forget component `sha256`: its prepared plugins in this process and everything the
    /// artifact cache keeps for it (its plugin was removed, replaced or refused at install).
    pub fn forget(&self, sha256: &str) {
        let prefix = format!("{sha256}/");
        self.inner
            .prepared
            .lock()
            .expect("prepared lock")
            .retain(|key, _| !key.starts_with(&prefix));
        self.inner.cache.forget(sha256);
    }

    fn memo_key(sha256: &str, label: Option<&str>) -> String {
        format!("{sha256}/{}", label.unwrap_or_default())
    }

    async fn prepare_stored_unbounded(
        &self,
        store: &ComponentStore,
        sha256: &str,
        name: &str,
    ) -> Result<Arc<PreparedPlugin>, SandboxError> {
        let key = Self::memo_key(sha256, Some(name));
        if let Some(found) = self.inner.prepared.lock().expect("prepared lock").get(&key) {
            return Ok(found.clone());
        }
        let started = Instant::now();
        let wasm_len = store
            .len(sha256)
            .map_err(|e| SandboxError::Host(format!("the stored component {sha256}: {e}")))?;
        // Which engine loads the artifact was noted when the component was first prepared;
        // without the note, the component is read.
        let cached = match self.noted_class(sha256) {
            Some(class) => {
                let (inner, engine, sha) = (
                    self.inner.clone(),
                    self.runtime(class).engine.clone(),
                    sha256.to_string(),
                );
                tokio::task::spawn_blocking(move || inner.cache.load(&engine, &sha, wasm_len as usize))
                    .await
                    .map_err(|e| SandboxError::Host(e.to_string()))?
            }
            None => None,
        };
        if let Some(component) = cached {
            let load_time = started.elapsed();
            // A plain component's own metadata was kept, verified, when it was first prepared.
            let metadata = self
                .inner
                .cache
                .get_note(sha256, "meta")
                .and_then(|note| crate::exports::Metadata::decode(&note));
            if let Some(plugin) = self
                .finish(
                    sha256,
                    wasm_len as usize,
                    component,
                    CacheOutcome::Hit,
                    load_time,
                    metadata,
                    Some(name),
                )
                .await
                .transpose()
            {
                let plugin = plugin?;
                self.inner
                    .prepared
                    .lock()
                    .expect("prepared lock")
                    .insert(key, plugin.clone());
                return Ok(plugin);
            }
        }
        let wasm = store
            .get(sha256)
            .map_err(|e| SandboxError::Host(format!("cannot read the stored component {sha256}: {e}")))?;
        self.prepare_bytes(&wasm, Some(sha256), Some(name)).await
    }

    async fn prepare_bytes(
        &self,
        wasm: &[u8],
        known_sha256: Option<&str>,
        label: Option<&str>,
    ) -> Result<Arc<PreparedPlugin>, SandboxError> {
        check_header(wasm)?;
        let sha256 = known_sha256.map_or_else(|| sha256_hex(wasm), str::to_string);
        let key = Self::memo_key(&sha256, label);
        if let Some(found) = self.inner.prepared.lock().expect("prepared lock").get(&key) {
            return Ok(found.clone());
        }
        let started = Instant::now();
        let (component, cache) = self.load_or_compile(&sha256, wasm).await?;
        let load_time = started.elapsed();
        let metadata = crate::exports::read_metadata(wasm);
        let prepared = self
            .finish(
                &sha256,
                wasm.len(),
                component,
                cache,
                load_time,
                Some(metadata.clone()),
                label,
            )
            .await?
            .expect("metadata was given");
        if matches!(prepared.kind, Kind::Plain { .. }) {
            // Kept (verified) for the starts that only map the artifact and never read the component.
            self.inner.cache.put_note(&sha256, "meta", &metadata.encode());
        }
        self.inner
            .prepared
            .lock()
            .expect("prepared lock")
            .insert(key, prepared.clone());
        Ok(prepared)
    }

    /// Check the world, pre-link and describe a loaded component; cache a freshly compiled one
    /// once it passed. `None` when the component is a plain one and its `metadata` is unknown
    /// (the caller then reads the component).
    #[allow(clippy::too_many_arguments)]
    async fn finish(
        &self,
        sha256: &str,
        wasm_len: usize,
        component: Component,
        cache: CacheOutcome,
        load_time: Duration,
        metadata: Option<crate::exports::Metadata>,
        label: Option<&str>,
    ) -> Result<Option<Arc<PreparedPlugin>>, SandboxError> {
        let (imports, world) = self.check_world(&component)?;
        let instance_pre = self.instantiate_pre(&component)?;
        let (info, kind) = match world {
            World::Tool => {
                let pre = ToolPre::new(instance_pre).map_err(|e| SandboxError::WrongWorld(format!("{e:#}")))?;
                // A verified artifact's component already answered `describe()` and passed the
                // checks: its kept answer spares every process start a second instantiation.
                let noted = (cache == CacheOutcome::Hit)
                    .then(|| self.noted_description(sha256))
                    .flatten();
                let info = match noted {
                    Some(info) => info,
                    None => {
                        let info = self.describe(&pre).await?;
                        self.note_description(sha256, &info);
                        info
                    }
                };
                (info, Kind::Tool(pre))
            }
            World::Plain => {
                let Some(metadata) = metadata else {
                    return Ok(None);
                };
                let limits = &self.inner.config.describe;
                let found = crate::exports::discover(component.engine(), &component, limits)
                    .map_err(SandboxError::WrongWorld)?;
                let info =
                    crate::exports::plugin_info(&metadata, label, &found, limits).map_err(SandboxError::WrongWorld)?;
                (
                    info,
                    Kind::Plain {
                        pre: instance_pre,
                        funcs: found.funcs,
                    },
                )
            }
        };
        // Only a component that passed every check is cached.
        self.store_artifact(cache, sha256, wasm_len, &component).await;
        Ok(Some(Arc::new(PreparedPlugin {
            sha256: sha256.to_string(),
            info,
            imports,
            cache,
            load_time,
            kind,
        })))
    }

    /// The verified cached artifact of `wasm`, or `wasm` compiled (not yet cached: see
    /// [`Sandbox::store_artifact`]).
    async fn load_or_compile(&self, sha256: &str, wasm: &[u8]) -> Result<(Component, CacheOutcome), SandboxError> {
        let engine = self.runtime(self.class_of(sha256, wasm)).engine.clone();
        let inner = self.inner.clone();
        let sha = sha256.to_string();
        let bytes = wasm.to_vec();
        tokio::task::spawn_blocking(move || match inner.cache.load(&engine, &sha, bytes.len()) {
            Some(component) => Ok((component, CacheOutcome::Hit)),
            None => Component::new(&engine, &bytes).map(|c| (c, CacheOutcome::Compiled)),
        })
        .await
        .map_err(|e| SandboxError::Host(e.to_string()))?
        .map_err(|e| SandboxError::Invalid(first_line(&format!("{e:#}"))))
    }

    /// Cache a freshly compiled component once it passed its checks.
    async fn store_artifact(&self, outcome: CacheOutcome, sha256: &str, wasm_len: usize, component: &Component) {
        if outcome == CacheOutcome::Compiled {
            let (inner, sha, component) = (self.inner.clone(), sha256.to_string(), component.clone());
            let _ = tokio::task::spawn_blocking(move || inner.cache.store(&sha, wasm_len, &component)).await;
        }
    }

    fn instantiate_pre(&self, component: &Component) -> Result<InstancePre<State>, SandboxError> {
        initialize_memory_images(component);
        self.linker_for(component.engine())
            .instantiate_pre(component)
            .map_err(|e| {
                let message = format!("{e:#}");
                if message.contains("matching implementation was not found") || message.contains("import") {
                    SandboxError::UnsupportedImports(first_line(&message))
                } else {
                    SandboxError::Invalid(first_line(&message))
                }
            })
    }

    /// Check exports against the tool world (naming the version on a mismatch) and list imports.
    /// A component that exports no `keel:plugin/tools` at all is a plain one (its functions are
    /// the tools), unless all it exports is a WASI command.
    fn check_world(&self, component: &Component) -> Result<(ImportSummary, World), SandboxError> {
        let engine = component.engine();
        let ty = component.component_type();
        let exports: Vec<String> = ty.exports(engine).map(|(name, _)| name.to_string()).collect();
        let wanted = format!("{TOOLS_EXPORT}@{WIT_VERSION}");
        let mut world = World::Tool;
        if !exports.contains(&wanted) {
            if let Some(other) = exports.iter().find(|e| e.starts_with(&format!("{TOOLS_EXPORT}@"))) {
                let version = other.rsplit('@').next().unwrap_or_default();
                if !semver_compatible(version, WIT_VERSION) {
                    return Err(SandboxError::IncompatibleVersion {
                        found: format!("{WIT_PACKAGE}@{version}"),
                    });
                }
                // A compatible (newer patch/minor) export name is resolved by the linker's semver rules.
            } else if !exports.is_empty() && exports.iter().all(|e| e.starts_with("wasi:cli/run@")) {
                return Err(SandboxError::WrongWorld(
                    "it is a WASI command (exports wasi:cli/run); run it with `keel exec`".into(),
                ));
            } else if exports.is_empty() {
                return Err(SandboxError::WrongWorld(format!(
                    "it exports nothing: neither {wanted} nor functions to offer as tools"
                )));
            } else {
                world = World::Plain;
            }
        }
        let mut interfaces = Vec::new();
        for (name, _) in ty.imports(engine) {
            if let Some(other) = name.strip_prefix("keel:plugin/") {
                let version = other.rsplit('@').next().unwrap_or_default();
                if !semver_compatible(version, WIT_VERSION) {
                    return Err(SandboxError::IncompatibleVersion {
                        found: format!("{WIT_PACKAGE}@{version}"),
                    });
                }
            }
            if name.contains(':') {
                interfaces.push(name.to_string());
            }
        }
        Ok((ImportSummary::from_interfaces(interfaces), world))
    }

    /// Keep `info`, the checked answer of component `sha256`'s `describe()`, as a sealed note
    /// (see [`DescriptionNote`]).
    fn note_description(&self, sha256: &str, info: &PluginInfo) {
        let note = DescriptionNote {
            limits: DescriptionNote::checked_under(&self.inner.config.describe),
            info: info.clone(),
        };
        if let Ok(bytes) = serde_json::to_vec(&note) {
            self.inner.cache.put_note(sha256, DESCRIPTION_NOTE, &bytes);
        }
    }

    /// The kept `describe()` answer of component `sha256`, if its seal verifies and it was
    /// checked under the bounds in force now.
    fn noted_description(&self, sha256: &str) -> Option<PluginInfo> {
        let bytes = self.inner.cache.get_note(sha256, DESCRIPTION_NOTE)?;
        let note: DescriptionNote = serde_json::from_slice(&bytes).ok()?;
        (note.limits == DescriptionNote::checked_under(&self.inner.config.describe)).then_some(note.info)
    }

    async fn describe(&self, pre: &ToolPre<State>) -> Result<PluginInfo, SandboxError> {
        self.inner.describes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let limits = Limits::for_describe();
        let CallStore {
            mut store,
            journal,
            stderr,
            ..
        } = self
            .new_store(
                pre.engine(),
                &Grants::default(),
                &[],
                &limits,
                None,
                StdioMode::Capture(limits.max_stdio_bytes as usize),
                None,
            )
            .map_err(|e| SandboxError::Host(e.to_string()))?;
        let run = async {
            let tool = instantiate_with_room!(self, pre.instantiate_async(&mut store))?;
            tool.keel_plugin_tools().call_describe(&mut store).await
        };
        let outcome = tokio::time::timeout(limits.timeout() + Duration::from_millis(500), run).await;
        let raw = match outcome {
            Ok(Ok(info)) => info,
            Ok(Err(e)) => {
                let error = classify_error(e, &store, &stderr.captured());
                return Err(SandboxError::Describe(error.to_string()));
            }
            Err(_) => return Err(SandboxError::Describe("timed out".into())),
        };
        drop(journal);
        convert_info(raw, &self.inner.config.describe)
    }

    /// Build a fresh store of `engine` holding only `preopens` and the network and environment of
    /// `grants`, under `limits`, its stdout and stderr handled as `stdio` says.
    #[allow(clippy::too_many_arguments)]
    fn new_store(
        &self,
        engine: &Engine,
        grants: &Grants,
        preopens: &[Preopen],
        limits: &Limits,
        args: Option<&[String]>,
        stdio: StdioMode,
        scratch: Option<&Scratch>,
    ) -> Result<CallStore, SandboxError> {
        let mut wasi = WasiCtxBuilder::new();
        let (stdout, stderr) = stdio.attach(&mut wasi);
        if let Some(args) = args {
            wasi.args(args);
        }
        let mut opened = Vec::with_capacity(preopens.len());
        for preopen in preopens {
            let perms = match preopen.mode {
                FsMode::Read => FsPerms::ReadOnly,
                FsMode::ReadWrite => FsPerms::ReadWrite,
            };
            // Opened by handle and verified; wasmtime-wasi gets exactly that inode.
            let Some(dir) = crate::preopen::open(preopen).map_err(|e| SandboxError::Grant(e.to_string()))? else {
                opened.push(None);
                continue;
            };
            let identity =
                crate::preopen::identity(&dir).map_err(|e| SandboxError::Grant(format!("{}: {e}", preopen.guest)))?;
            opened.push(Some(identity));
            wasi.preopened_dir(crate::preopen::fd_path(&dir), &preopen.guest, perms)
                .map_err(|e| SandboxError::Grant(format!("{}: {e}", preopen.guest)))?;
        }
        if let Some(scratch) = scratch {
            wasi.preopened_dir(crate::preopen::fd_path(scratch.fd()), SCRATCH_GUEST, FsPerms::ReadWrite)
                .map_err(|e| SandboxError::Grant(format!("{SCRATCH_GUEST}: {e}")))?;
        }
        for name in &grants.env {
            if let Ok(value) = std::env::var(name) {
                wasi.env(name, value);
            }
        }
        let journal = Arc::new(Mutex::new(CallDiagnostics::default()));
        // Every open file, directory, stream and HTTP request is a table entry: this caps them.
        let handles = usize::try_from(limits.max_handles).unwrap_or(usize::MAX);
        let mut table = ResourceTable::new();
        table.set_max_capacity(handles);
        let state = State {
            wasi: wasi.build(),
            http: WasiHttpCtx::new(),
            hooks: NetHooks {
                policy: Arc::new(NetPolicy::new(grants)),
                journal: journal.clone(),
                connections: ConnectionBudget::new(handles),
                egress: self.inner.egress.clone(),
            },
            table,
            limiter: Limiter {
                memory_bytes: limits.memory_bytes.min(self.inner.config.max_memory_bytes) as usize,
                memory_used: 0,
                table_elements: limits.max_table_elements as usize,
                instances: limits.max_instances as usize,
                tables: limits.max_tables as usize,
                memories: limits.max_memories as usize,
                hit: None,
            },
            journal: journal.clone(),
            max_log_bytes: limits.max_log_bytes,
        };
        let mut store = Store::new(engine, state);
        store.limiter(|state| &mut state.limiter);
        // The guest's own handle tables hold one handle per host resource it keeps, plus lends.
        store.set_max_component_handles(handles.saturating_mul(2));
        self.arm(&mut store, limits)?;
        Ok(CallStore {
            store,
            journal,
            stdout,
            stderr,
            opened,
        })
    }

    /// Run `tool` of `plugin` with JSON `arguments` in a fresh store holding only `grants`
    /// (narrowed to what the tool declares), under `limits`.
    ///
    /// A tool that requests `/scratch` read-write gets a fresh private scratch directory for the
    /// call ([`crate::config::ScratchConfig`]), made inside the directory granted at `/scratch`
    /// if there is one. When the tool's
    /// input schema has a `session_id` property and `arguments` give one, the call runs in the
    /// instance kept for that session of the caller's scope and principal
    /// ([`crate::config::SessionConfig`]), created on first use.
    pub async fn call(
        &self,
        plugin: &PreparedPlugin,
        grants: &Grants,
        limits: &Limits,
        ctx: &ToolCallContext,
        tool: &str,
        arguments: &serde_json::Value,
    ) -> CallReport {
        self.call_with(plugin, grants, limits, ctx, tool, arguments, None).await
    }

    /// [`Sandbox::call`], with the guest's stdout and stderr streamed to `stdout` and `stderr` as
    /// it writes them (at most [`crate::STREAM_BUDGET`] bytes in flight per stream: a writer that
    /// does not keep up makes the guest wait, within its deadline) instead of captured. Returns
    /// once everything written has reached the writers; the report's `stdout`/`stderr` are empty.
    /// Each stream stops at `limits.max_output_bytes` with a line saying so, and the guest's
    /// later writes to it fail.
    /// A streamed call always runs in a fresh instance (never a ready one, never a session's):
    /// its pipes are wired when the store is built.
    #[allow(clippy::too_many_arguments)]
    pub async fn call_streaming(
        &self,
        plugin: &PreparedPlugin,
        grants: &Grants,
        limits: &Limits,
        ctx: &ToolCallContext,
        tool: &str,
        arguments: &serde_json::Value,
        stdout: OutputWriter,
        stderr: OutputWriter,
    ) -> CallReport {
        self.call_with(plugin, grants, limits, ctx, tool, arguments, Some((stdout, stderr)))
            .await
    }

    #[allow(clippy::too_many_arguments)]
    async fn call_with(
        &self,
        plugin: &PreparedPlugin,
        grants: &Grants,
        limits: &Limits,
        ctx: &ToolCallContext,
        tool: &str,
        arguments: &serde_json::Value,
        streams: Option<(OutputWriter, OutputWriter)>,
    ) -> CallReport {
        let Some(tool_info) = plugin.info.tool(tool) else {
            return CallReport::unrun(ToolError::UnknownTool {
                tool: format!("{}/{tool}", plugin.info.name),
            });
        };
        let mut limits = limits.clone();
        if let Some(timeout) = ctx.timeout {
            limits.timeout_ms = limits.timeout_ms.min(timeout.as_millis() as u64);
        }
        let preopens = grants.preopens_for(tool_info, &plugin.info.tools);
        let grants = grants.narrow_for(tool_info, &plugin.info.tools);
        if ctx.effect_free && (tool_info.takes_session() || !grants.effect_free()) {
            // The caller did not put the call's start on disk, or re-runs it without asking,
            // because the tool was described as effect-free: its grants changed since.
            return CallReport::unrun(ToolError::Host {
                message: keel_kernel::tool::GRANTS_CHANGED.into(),
            });
        }
        // What the store is built from: a session's store is reused only while these are unchanged
        // (a revoke or a new limit takes effect at the next call).
        let fingerprint = format!(
            "{preopens:?}{grants:?}{:?}",
            Limits {
                timeout_ms: 0,
                ..limits.clone()
            }
        );
        if let Some((stdout, stderr)) = streams {
            // Streaming changes where a call's output goes, not how much it may print.
            let cap = usize::try_from(limits.max_output_bytes).unwrap_or(usize::MAX);
            let (stdout_bytes, stderr_bytes) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
            let stdio = StdioMode::Stream(
                Box::new(crate::stdio::Capped::new(stdout, cap, stdout_bytes.clone())),
                Box::new(crate::stdio::Capped::new(stderr, cap, stderr_bytes.clone())),
            );
            let mut live = match self.live_for(plugin.id(), tool_info, &grants, &preopens, &limits, fingerprint, stdio)
            {
                Ok(live) => live,
                Err(e) => return CallReport::unrun(ToolError::Host { message: e.to_string() }),
            };
            let mut report = self.run_in(&mut live, plugin, &limits, ctx, tool, arguments).await.0;
            // Streamed output: wait until it has all reached the writers (a call past its
            // deadline gets only a moment more).
            let drain = async {
                live.call.stdout.drain().await;
                live.call.stderr.drain().await;
            };
            if matches!(report.result, Err(ToolError::TimedOut { .. })) {
                let _ = tokio::time::timeout(DRAIN_AFTER_DEADLINE, drain).await;
            } else {
                drain.await;
            }
            report.receipt.stdout_bytes = stdout_bytes.load(Ordering::Relaxed);
            report.receipt.stderr_bytes = stderr_bytes.load(Ordering::Relaxed);
            self.free_later(live);
            return report;
        }
        let session = match self.session_key(plugin, tool_info, ctx, arguments) {
            Ok(session) => session,
            Err(e) => return CallReport::unrun(e),
        };
        let now = Instant::now();
        let Some(key) = session else {
            if self.inner.sessions.lock().expect("sessions lock").len() > 0 {
                self.inner.sessions.lock().expect("sessions lock").expire(now);
            }
            let ready_key = format!("{}/{tool}/{fingerprint}", plugin.sha256);
            let taken = self
                .take_ready(&ready_key)
                .filter(|live| opened_now(&preopens).is_ok_and(|now| now == live.call.opened));
            let mut live = match taken {
                Some(live) => live,
                None => match self.live(plugin, tool_info, &grants, &preopens, &limits, fingerprint.clone()) {
                    Ok(live) => live,
                    Err(e) => return CallReport::unrun(ToolError::Host { message: e.to_string() }),
                },
            };
            let report = self.run_in(&mut live, plugin, &limits, ctx, tool, arguments).await.0;
            // Refilled after the call, so building the next instances never competes with it.
            let refill = self.refill(plugin, tool_info, &grants, &preopens, &limits, &fingerprint, &ready_key);
            self.free_then(live, refill);
            return report;
        };
        let slot = match self.inner.sessions.lock().expect("sessions lock").slot(&key, now) {
            Ok(slot) => slot,
            Err(message) => {
                return CallReport::unrun(ToolError::LimitExceeded {
                    limit: "sessions".into(),
                    message,
                });
            }
        };
        let mut held = slot.lock().await;
        let mut live = match held.take() {
            Some(live)
                if live.fingerprint == fingerprint
                    && live.sha256 == plugin.sha256
                    && opened_now(&preopens).is_ok_and(|now| now == live.call.opened) =>
            {
                live
            }
            _ => match self.live(plugin, tool_info, &grants, &preopens, &limits, fingerprint) {
                Ok(live) => live,
                Err(e) => {
                    drop(held);
                    self.inner.sessions.lock().expect("sessions lock").remove(&key, &slot);
                    return CallReport::unrun(ToolError::Host { message: e.to_string() });
                }
            },
        };
        let (report, usable) = self.run_in(&mut live, plugin, &limits, ctx, tool, arguments).await;
        if usable {
            *held = Some(live);
            drop(held);
            self.inner
                .sessions
                .lock()
                .expect("sessions lock")
                .touch(&key, Instant::now());
        } else {
            // A trap, a timeout or a full scratch directory leaves the instance unusable: the
            // session ends, and the next call with its id starts a new one.
            drop(held);
            self.inner.sessions.lock().expect("sessions lock").remove(&key, &slot);
            drop(live);
        }
        report
    }

    /// Free `live` after the call, off the caller's path: its pool slots stay taken until then,
    /// and a call that needs them waits ([`Sandbox::room_for_a_call`]). A small store (all its
    /// memories within [`SandboxConfig::housekeeping_free_bytes`], no scratch directory to
    /// remove; ~1 MiB of memory reset, ~50 µs) is freed on the [`housekeeper`] thread, which is
    /// always running: it waits neither for a blocking-pool thread to wake (which cost more than
    /// the free itself) nor for the caller to yield. A big one (CPython's 16+ MiB, a scratch
    /// directory) goes to the blocking pool, so it never holds up the small ones; so does a small
    /// one while [`MAX_HOUSEKEEPING_FREES`] are already queued on a housekeeper not keeping up.
    fn free_later(&self, live: Live) {
        self.free_then(live, None);
    }

    /// [`Sandbox::free_later`], then `refill` in the background. A store freed by the
    /// housekeeper and the refill share one task (freed first, so its slot can be the new
    /// instance's): one task queued per call rather than two.
    fn free_then(&self, live: Live, refill: Option<Refill>) {
        use std::sync::atomic::Ordering::SeqCst;
        let housekeeping = self.frees_on_housekeeper(&live);
        let inner = self.inner.clone();
        inner.freeing.pending.fetch_add(1, SeqCst);
        if housekeeping {
            inner.freeing.on_housekeeper.fetch_add(1, SeqCst);
        }
        let free = move || {
            drop(live);
            if housekeeping {
                inner.freeing.on_housekeeper.fetch_sub(1, SeqCst);
            }
            inner.freeing.pending.fetch_sub(1, SeqCst);
            inner.freeing.done.notify_waiters();
        };
        if housekeeping {
            let task = async move {
                free();
                if let Some(refill) = refill {
                    refill.await;
                }
            };
            match housekeeper() {
                Some(housekeeper) => {
                    housekeeper.spawn(task);
                }
                None => {
                    tokio::spawn(task);
                }
            }
        } else {
            if let Some(refill) = refill {
                tokio::spawn(refill);
            }
            tokio::task::spawn_blocking(free);
        }
    }

    /// Whether freeing `live` is small enough for the housekeeping thread (see
    /// [`Sandbox::free_later`]), and it is keeping up with those already queued
    /// ([`MAX_HOUSEKEEPING_FREES`]).
    fn frees_on_housekeeper(&self, live: &Live) -> bool {
        live.scratch.is_none()
            && live.call.store.data().limiter.memory_used <= self.inner.config.housekeeping_free_bytes
            && self
                .inner
                .freeing
                .on_housekeeper
                .load(std::sync::atomic::Ordering::SeqCst)
                < MAX_HOUSEKEEPING_FREES
    }

    /// Instantiating failed on a full pool: make room if any can be had — drop a ready instance
    /// (a call needs the slot more), else wait (bounded) for an earlier call's instance being
    /// freed. `false` when neither: the pool is full of calls in flight.
    async fn room_for_a_call(&self) -> bool {
        let evicted = {
            let mut ready = self.inner.ready.lock().expect("ready lock");
            let live = ready
                .by_key
                .values_mut()
                .find_map(|q| q.lives.pop())
                .map(|(_, live)| live);
            ready.recount();
            live
        };
        if let Some(live) = evicted {
            drop(live);
            return true;
        }
        let freeing = &self.inner.freeing;
        let done = freeing.done.notified();
        tokio::pin!(done);
        // Registered before the check, so a free finishing in between still wakes us.
        done.as_mut().enable();
        if freeing.pending.load(std::sync::atomic::Ordering::SeqCst) == 0 {
            return false;
        }
        tokio::time::timeout(FREE_WAIT, done).await.is_ok()
    }

    /// A ready instance for `key`, if one is kept.
    fn take_ready(&self, key: &str) -> Option<Live> {
        let mut ready = self.inner.ready.lock().expect("ready lock");
        let queue = ready.by_key.get_mut(key)?;
        let mut found = None;
        while let Some((made, live)) = queue.lives.pop() {
            if made.elapsed() < READY_MAX_AGE {
                found = Some(live);
                break;
            }
        }
        let left = queue.lives.len();
        ready.recount();
        tracing::trace!(key, left, hit = found.is_some(), "ready instance");
        found
    }

    /// The work of building ready instances for `key`, up to [`SandboxConfig::ready_instances`]
    /// (and the total cap), to run in the background; `None` when none are wanted. Only
    /// tool-world plugins.
    #[allow(clippy::too_many_arguments)]
    fn refill(
        &self,
        plugin: &PreparedPlugin,
        tool: &ToolInfo,
        grants: &Grants,
        preopens: &[Preopen],
        limits: &Limits,
        fingerprint: &str,
        key: &str,
    ) -> Option<Refill> {
        let config = &self.inner.config;
        let Kind::Tool(pre) = &plugin.kind else { return None };
        let wanted = {
            let mut ready = self.inner.ready.lock().expect("ready lock");
            let total = ready.total;
            let queue = ready.by_key.entry(key.to_string()).or_default();
            let have = queue.lives.len() + queue.filling;
            // Ready instances hold pool slots: they never take more than a quarter of the pool,
            // so calls always find a slot (a small pool keeps few or none).
            let cap = config.max_ready_instances.min(config.pool_instances as usize / 4);
            let room = cap.saturating_sub(total + queue.filling);
            let wanted = config.ready_instances.saturating_sub(have).min(room);
            queue.filling += wanted;
            wanted
        };
        if wanted == 0 {
            return None;
        }
        let this = self.clone();
        let pre = pre.clone();
        let (tool, grants, preopens) = (tool.clone(), grants.clone(), preopens.to_vec());
        let (limits, fingerprint, key) = (limits.clone(), fingerprint.to_string(), key.to_string());
        let sha256 = plugin.sha256.clone();
        Some(Box::pin(async move {
            for _ in 0..wanted {
                let made = async {
                    let mut live = this
                        .live_for(
                            (&sha256, pre.engine()),
                            &tool,
                            &grants,
                            &preopens,
                            &limits,
                            fingerprint.clone(),
                            StdioMode::Capture(limits.max_stdio_bytes as usize),
                        )
                        .ok()?;
                    let instance = pre.instantiate_async(&mut live.call.store).await.ok()?;
                    live.instance = Some(LiveInstance::Tool(instance));
                    Some(live)
                };
                let made = tokio::time::timeout(limits.timeout(), made).await.ok().flatten();
                let mut ready = this.inner.ready.lock().expect("ready lock");
                let queue = ready.by_key.entry(key.clone()).or_default();
                queue.filling = queue.filling.saturating_sub(1);
                if let Some(live) = made {
                    queue.lives.push((Instant::now(), live));
                    ready.total += 1;
                }
            }
        }))
    }

    /// How many times a component was instantiated to ask its `describe()` (for tests and
    /// metrics: a start from a verified artifact with a kept answer asks none).
    pub fn describe_calls(&self) -> u64 {
        self.inner.describes.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// How many finished calls' stores are queued to be freed by the housekeeping thread (for
    /// tests and metrics; at most a few, see `Sandbox::free_later`).
    pub fn frees_queued_on_housekeeper(&self) -> usize {
        self.inner
            .freeing
            .on_housekeeper
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// How many ready instances are kept (for tests and metrics).
    pub fn ready_instances(&self) -> usize {
        let ready = self.inner.ready.lock().expect("ready lock");
        ready.by_key.values().map(|q| q.lives.len()).sum()
    }

    /// How many sessions are live (for tests and metrics).
    pub fn live_sessions(&self) -> usize {
        self.inner.sessions.lock().expect("sessions lock").len()
    }

    /// The session a call asks for: `Some` when the tool's input schema has a `session_id`
    /// property and the arguments give a string for it.
    fn session_key(
        &self,
        plugin: &PreparedPlugin,
        tool: &ToolInfo,
        ctx: &ToolCallContext,
        arguments: &serde_json::Value,
    ) -> Result<Option<SessionKey>, ToolError> {
        if !tool.takes_session() {
            return Ok(None);
        }
        let id = match arguments.get(SESSION_FIELD) {
            None | Some(serde_json::Value::Null) => return Ok(None),
            Some(serde_json::Value::String(id)) => id,
            Some(_) => {
                return Err(ToolError::InvalidInput {
                    message: format!("`{SESSION_FIELD}` must be a string"),
                });
            }
        };
        let max = self.inner.config.sessions.max_id_bytes;
        if id.is_empty() || id.len() > max || id.chars().any(char::is_control) {
            return Err(ToolError::InvalidInput {
                message: format!("`{SESSION_FIELD}` must be 1 to {max} bytes without control characters"),
            });
        }
        Ok(Some(SessionKey {
            plugin: format!("{}/{}", plugin.sha256, plugin.info.name),
            scope: ctx.scope.clone(),
            principal: ctx.principal.clone(),
            id: id.clone(),
        }))
    }

    /// A new store for calls of `tool`, with a fresh scratch directory when the tool gets one.
    fn live(
        &self,
        plugin: &PreparedPlugin,
        tool: &ToolInfo,
        grants: &Grants,
        preopens: &[Preopen],
        limits: &Limits,
        fingerprint: String,
    ) -> Result<Live, SandboxError> {
        let stdio = StdioMode::Capture(limits.max_stdio_bytes as usize);
        self.live_for(plugin.id(), tool, grants, preopens, limits, fingerprint, stdio)
    }

    /// [`Sandbox::live`] for the plugin `sha256` compiled by `engine`, its stdout and stderr
    /// handled as `stdio` says.
    #[allow(clippy::too_many_arguments)]
    fn live_for(
        &self,
        (sha256, engine): (&str, &Engine),
        tool: &ToolInfo,
        grants: &Grants,
        preopens: &[Preopen],
        limits: &Limits,
        fingerprint: String,
        stdio: StdioMode,
    ) -> Result<Live, SandboxError> {
        let config = &self.inner.config.scratch;
        let wants_scratch = tool.capabilities.filesystem.iter().any(|r| config.provides(r));
        let failed = |e: std::io::Error| SandboxError::Host(format!("cannot create a scratch directory: {e}"));
        // A directory granted read-write at `/scratch` itself is where this tool's scratch
        // directories are made: each call still gets a fresh, private, capped one, never a
        // directory that calls (of any scope) share.
        let scratch_grant = preopens
            .iter()
            .position(|p| p.guest == SCRATCH_GUEST && p.mode == FsMode::ReadWrite)
            .filter(|_| wants_scratch);
        let mut others = std::borrow::Cow::Borrowed(preopens);
        let scratch = if let Some(at) = scratch_grant {
            let parent = crate::preopen::open(&preopens[at])
                .map_err(|e| SandboxError::Grant(e.to_string()))?
                .ok_or_else(|| SandboxError::Grant(format!("{SCRATCH_GUEST}: the granted directory is missing")))?;
            others.to_mut().remove(at);
            Some(Scratch::create_in(parent).map_err(failed)?)
        } else {
            // Another grant that contains `/scratch` (at `/` or a parent) is the user's choice.
            let granted = preopens.iter().any(|p| {
                p.guest == "/" || p.guest == SCRATCH_GUEST || SCRATCH_GUEST.starts_with(&format!("{}/", p.guest))
            });
            if wants_scratch && !granted {
                Some(Scratch::create(config.dir.as_deref()).map_err(failed)?)
            } else {
                None
            }
        };
        let call = self.new_store(engine, grants, &others, limits, None, stdio, scratch.as_ref())?;
        Ok(Live {
            call,
            instance: None,
            scratch,
            stdout_seen: 0,
            stderr_seen: 0,
            sha256: sha256.to_string(),
            fingerprint,
        })
    }

    /// Run one call in `live` (instantiating it on its first call) under `limits`. Returns the
    /// report and whether the instance can take another call (no trap, no timeout, scratch within
    /// its cap).
    async fn run_in(
        &self,
        live: &mut Live,
        plugin: &PreparedPlugin,
        limits: &Limits,
        ctx: &ToolCallContext,
        tool: &str,
        arguments: &serde_json::Value,
    ) -> (CallReport, bool) {
        if let Err(e) = self.arm(&mut live.call.store, limits) {
            return (CallReport::unrun(ToolError::Host { message: e.to_string() }), false);
        }
        let Live {
            call,
            instance,
            scratch,
            ..
        } = live;
        let store = &mut call.store;
        let started = Instant::now();
        // A scratch directory over its cap ends the call: watched while it runs (every write is
        // a host call, so the watcher gets its turn), checked once more at the end.
        let cap = limits.max_scratch_bytes;
        let watch = async {
            match scratch.as_ref() {
                None => std::future::pending::<()>().await,
                Some(dir) => dir.over_cap(cap, SCRATCH_WATCH).await,
            }
        };
        let outcome = match &plugin.kind {
            Kind::Tool(pre) => {
                let wit_ctx = wit::CallContext {
                    call_id: ctx.call_id.clone(),
                    job_id: ctx.job_id.clone(),
                    scope: ctx.scope.clone(),
                    principal: ctx.principal.clone(),
                    trace_id: ctx.trace_id.clone(),
                    deadline_ms: limits.timeout_ms,
                };
                let arguments = arguments.to_string();
                let run = async {
                    if instance.is_none() {
                        let made = instantiate_with_room!(self, pre.instantiate_async(&mut *store))?;
                        *instance = Some(LiveInstance::Tool(made));
                    }
                    let Some(LiveInstance::Tool(tool_instance)) = instance.as_ref() else {
                        return Err(wasmtime::Error::msg("the kept instance is not a tool instance"));
                    };
                    tool_instance
                        .keel_plugin_tools()
                        .call_call(&mut *store, &wit_ctx, tool, &arguments)
                        .await
                };
                // Epoch interruption stops guest code; this timeout also stops a guest parked in a host call.
                let run = tokio::time::timeout(limits.timeout() + Duration::from_millis(250), run);
                tokio::select! {
                    done = run => Some(match done {
                        Err(_) => Err(()),
                        Ok(Err(e)) => Ok(Err(e)),
                        Ok(Ok(Err(error))) => Ok(Ok(Err(convert_tool_error(error)))),
                        Ok(Ok(Ok(output))) => Ok(Ok(Ok(output.json))),
                    }),
                    () = watch => None,
                }
            }
            Kind::Plain { pre, funcs } => {
                let index = plugin
                    .info
                    .tools
                    .iter()
                    .position(|t| t.name == tool)
                    .expect("tool found by the caller");
                let func = &funcs[index];
                let params = match crate::exports::arguments(func, arguments) {
                    Ok(params) => params,
                    Err(message) => return (CallReport::unrun(ToolError::InvalidInput { message }), true),
                };
                let run = async {
                    if instance.is_none() {
                        let made = instantiate_with_room!(self, pre.instantiate_async(&mut *store))?;
                        *instance = Some(LiveInstance::Plain(made));
                    }
                    let Some(LiveInstance::Plain(plain)) = instance.as_ref() else {
                        return Err(wasmtime::Error::msg("the kept instance is not a plain instance"));
                    };
                    let f = plain
                        .get_func(&mut *store, func.index)
                        .ok_or_else(|| wasmtime::Error::msg("the exported function is missing"))?;
                    let mut results = vec![wasmtime::component::Val::Bool(false); func.result.iter().count()];
                    f.call_async(&mut *store, &params, &mut results).await?;
                    Ok::<_, wasmtime::Error>(results)
                };
                let run = tokio::time::timeout(limits.timeout() + Duration::from_millis(250), run);
                tokio::select! {
                    done = run => Some(match done {
                        Err(_) => Err(()),
                        Ok(Err(e)) => Ok(Err(e)),
                        // An `err` of a top-level `result` is the tool's failure, its value as JSON text.
                        Ok(Ok(results)) => Ok(Ok(match crate::exports::output(func, &results) {
                            Ok(value) => Ok(value.to_string()),
                            Err(message) => Err(ToolError::Failed { message }),
                        })),
                    }),
                    () = watch => None,
                }
            }
        };
        let duration = started.elapsed();
        let store = &mut call.store;
        let fuel_consumed = match (self.inner.config.fuel_metering, store.get_fuel()) {
            (true, Ok(left)) => Some(limits.fuel.unwrap_or(u64::MAX) - left),
            _ => None,
        };
        let scratch_used = scratch.as_ref().map_or(0, Scratch::usage);
        let outcome = if scratch_used > cap { None } else { outcome };
        let usable = matches!(outcome, Some(Ok(Ok(_))));
        let outcome_bytes = match &outcome {
            Some(Ok(Ok(Ok(json)))) => Some(json.len() as u64),
            _ => None,
        };
        let result = match outcome {
            None => Err(ToolError::LimitExceeded {
                limit: "scratch".into(),
                message: if scratch_used == u64::MAX {
                    format!(
                        "the code made a tree in {SCRATCH_GUEST} too large or too deep to measure ({})",
                        crate::scratch::MEASURABLE
                    )
                } else {
                    format!("the code wrote more than {cap} bytes to {SCRATCH_GUEST} (the limit is max_scratch_bytes)")
                },
            }),
            Some(Err(())) => Err(ToolError::TimedOut {
                message: format!("the call did not finish within {} ms", limits.timeout_ms),
            }),
            Some(Ok(Err(e))) => Err(classify_error(e, store, &call.stderr.captured())),
            Some(Ok(Ok(Err(error)))) => {
                let error = cap_error(error, limits.max_output_bytes);
                Err(memory_refusal_named(
                    error,
                    store.data().limiter.hit,
                    store.data().limiter.memory_bytes,
                ))
            }
            Some(Ok(Ok(Ok(json)))) => {
                if json.len() as u64 > limits.max_output_bytes {
                    Err(ToolError::LimitExceeded {
                        limit: "output".into(),
                        message: format!(
                            "the tool returned {} bytes of output; the limit is {} bytes",
                            json.len(),
                            limits.max_output_bytes
                        ),
                    })
                } else {
                    match serde_json::from_str(&json) {
                        Ok(value) => Ok(ToolOutput { output: value }),
                        Err(e) => Err(ToolError::Failed {
                            message: format!("the tool returned invalid JSON: {e}"),
                        }),
                    }
                }
            }
        };
        let output_bytes = outcome_bytes.unwrap_or(0);
        let peak_memory_bytes = store.data().limiter.memory_used as u64;
        let journal = std::mem::take(&mut *call.journal.lock().expect("journal lock"));
        // A session's pipes hold everything it printed: report only this call's part.
        let (stdout, stderr) = (call.stdout.captured(), call.stderr.captured());
        let stdout = stdout.get(live.stdout_seen..).unwrap_or_default();
        let stderr = stderr.get(live.stderr_seen..).unwrap_or_default();
        let receipt = Receipt {
            wall_us: u64::try_from(duration.as_micros()).unwrap_or(u64::MAX),
            fuel: fuel_consumed,
            peak_memory_bytes,
            output_bytes,
            log_bytes: journal.log_bytes,
            http_bytes_sent: journal.traffic.sent(),
            http_bytes_received: journal.traffic.received(),
            stdout_bytes: stdout.len() as u64,
            stderr_bytes: stderr.len() as u64,
        };
        let report = CallReport {
            result,
            receipt,
            logs: journal.logs,
            logs_truncated: journal.logs_dropped > 0,
            progress: journal.progress,
            denials: journal.denials,
            stdout: stdout.to_vec(),
            stderr: stderr.to_vec(),
        };
        live.stdout_seen += stdout.len();
        live.stderr_seen += stderr.len();
        (report, usable)
    }

    /// Set a store's per-call state: the deadline, the fuel, and a clear limiter verdict (a kept
    /// store's memory use stays counted: a session's memory is capped for its whole life).
    fn arm(&self, store: &mut Store<State>, limits: &Limits) -> Result<(), SandboxError> {
        store.data_mut().limiter.hit = None;
        // At every epoch tick the guest yields to the async runtime until its deadline, then
        // traps (`Trap::Interrupt`): a guest spinning until its deadline otherwise held the
        // caller's thread for all of it (a server's worker; every other task of a
        // single-threaded runtime). A new store's deadline is 0 (at once): always set it.
        let deadline = Instant::now() + Duration::from_millis(limits.timeout_ms);
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(move |_| {
            Ok(if Instant::now() >= deadline {
                UpdateDeadline::Interrupt
            } else {
                UpdateDeadline::Yield(1)
            })
        });
        if self.inner.config.fuel_metering {
            store
                .set_fuel(limits.fuel.unwrap_or(u64::MAX))
                .map_err(|e| SandboxError::Host(e.to_string()))?;
        }
        Ok(())
    }

    /// Run a WASI command component (`wasi:cli/run`) under `grants` and `limits`, with `args`
    /// (`args[0]` is the program name), capturing its stdout and stderr: at most
    /// `limits.max_stdio_bytes` of each. A program that writes more is not cut silently: its
    /// status is [`ToolError::LimitExceeded`] (limit `stdout` or `stderr`), whatever it exited with.
    pub async fn exec(
        &self,
        wasm: &[u8],
        grants: &Grants,
        limits: &Limits,
        args: &[String],
    ) -> Result<ExecReport, SandboxError> {
        let cap = usize::try_from(limits.max_stdio_bytes).unwrap_or(usize::MAX);
        // One byte past the cap tells "wrote exactly the cap" from "wrote more".
        let (mut status, stdout, stderr) = self
            .run_command(wasm, grants, limits, args, StdioMode::Capture(cap.saturating_add(1)))
            .await?;
        let (mut stdout, mut stderr) = (stdout.captured(), stderr.captured());
        for (name, bytes) in [("stdout", &mut stdout), ("stderr", &mut stderr)] {
            if bytes.len() > cap {
                bytes.truncate(cap);
                if !matches!(status, Err(ToolError::LimitExceeded { .. })) {
                    status = Err(ToolError::LimitExceeded {
                        limit: name.into(),
                        message: format!(
                            "the program wrote more than {cap} bytes to {name}; captured output is capped there"
                        ),
                    });
                }
            }
        }
        Ok(ExecReport { status, stdout, stderr })
    }

    /// Run a WASI command component like [`Sandbox::exec`], but stream its stdout and stderr to
    /// `stdout` and `stderr` as it writes them, nothing kept: all of it arrives, in bounded host
    /// memory (a writer that does not keep up makes the program wait, within its deadline). Returns
    /// once everything written has reached the writers (and they are flushed); the report's
    /// `stdout` and `stderr` are empty.
    pub async fn exec_streaming(
        &self,
        wasm: &[u8],
        grants: &Grants,
        limits: &Limits,
        args: &[String],
        stdout: OutputWriter,
        stderr: OutputWriter,
    ) -> Result<ExecReport, SandboxError> {
        let (status, mut out, mut err) = self
            .run_command(wasm, grants, limits, args, StdioMode::Stream(stdout, stderr))
            .await?;
        let drain = async {
            out.drain().await;
            err.drain().await;
        };
        if matches!(status, Err(ToolError::TimedOut { .. })) {
            // A program past its deadline gets only a moment more to have its output written.
            let _ = tokio::time::timeout(DRAIN_AFTER_DEADLINE, drain).await;
        } else {
            drain.await;
        }
        Ok(ExecReport {
            status,
            stdout: Vec::new(),
            stderr: Vec::new(),
        })
    }

    /// Instantiate and run a command; its exit status (or why it did not exit) and its outputs.
    async fn run_command(
        &self,
        wasm: &[u8],
        grants: &Grants,
        limits: &Limits,
        args: &[String],
        stdio: StdioMode,
    ) -> Result<(Result<i32, ToolError>, GuestOutput, GuestOutput), SandboxError> {
        check_header(wasm)?;
        let sha256 = sha256_hex(wasm);
        let (component, cache) = self.load_or_compile(&sha256, wasm).await?;
        let pre = self.instantiate_pre(&component)?;
        let pre = wasmtime_wasi::p2::bindings::CommandPre::new(pre).map_err(|_| {
            SandboxError::WrongWorld("`keel exec` runs WASI commands (components exporting wasi:cli/run)".into())
        })?;
        // Only a component that is a command Keel can link is cached.
        self.store_artifact(cache, &sha256, wasm.len(), &component).await;
        let CallStore {
            mut store,
            stdout,
            stderr,
            ..
        } = self.new_store(
            pre.engine(),
            grants,
            &grants.fs.iter().cloned().map(Preopen::whole).collect::<Vec<_>>(),
            limits,
            Some(args),
            stdio,
            None,
        )?;
        let run = async {
            let command = instantiate_with_room!(self, pre.instantiate_async(&mut store))?;
            command.wasi_cli_run().call_run(&mut store).await
        };
        let outcome = tokio::time::timeout(limits.timeout() + Duration::from_millis(250), run).await;
        let status = match outcome {
            Err(_) => Err(ToolError::TimedOut {
                message: format!("did not finish within {} ms", limits.timeout_ms),
            }),
            Ok(Ok(Ok(()))) => Ok(0),
            Ok(Ok(Err(()))) => Ok(1),
            Ok(Err(e)) => match e.downcast_ref::<wasmtime_wasi::I32Exit>() {
                Some(exit) => Ok(exit.0),
                None => Err(classify_error(e, &store, &stderr.captured())),
            },
        };
        drop(store);
        Ok((status, stdout, stderr))
    }
}

/// Result of [`Sandbox::exec`].
#[derive(Debug)]
pub struct ExecReport {
    /// Exit code, or why the program did not exit normally.
    pub status: Result<i32, ToolError>,
    /// Captured stdout (capped; empty when streamed).
    pub stdout: Vec<u8>,
    /// Captured stderr (capped; empty when streamed).
    pub stderr: Vec<u8>,
}

/// Raise the soft limit on open files to the hard limit, once per process: calls are capped by
/// `Limits::max_handles`, and the process as a whole should not run out first.
fn raise_open_file_limit() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
        let limit = getrlimit(Resource::Nofile);
        // Some hard limits are "unlimited" or ~2^30: a million descriptors is plenty.
        let wanted = limit.maximum.unwrap_or(u64::MAX).min(1 << 20);
        if let Some(current) = limit.current
            && current < wanted
            && let Err(e) = setrlimit(
                Resource::Nofile,
                Rlimit {
                    current: Some(wanted),
                    maximum: limit.maximum,
                },
            )
        {
            tracing::debug!("cannot raise the open-file limit from {current} to {wanted}: {e}");
        }
    });
}

/// What decides whether `engine` can run code compiled by another engine.
fn compatibility(engine: &Engine) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut hasher);
    hasher.finish()
}

/// Reject non-wasm and core modules with a precise message before handing bytes to the compiler.
fn check_header(wasm: &[u8]) -> Result<(), SandboxError> {
    if wasm.len() < 8 || &wasm[..4] != b"\0asm" {
        let what = if wasm.is_empty() {
            "the file is empty".to_string()
        } else {
            "missing the `\\0asm` magic number".into()
        };
        return Err(SandboxError::NotWasm(what));
    }
    if wasmparser::Parser::is_core_wasm(wasm) {
        return Err(SandboxError::CoreModule);
    }
    if !wasmparser::Parser::is_component(wasm) {
        return Err(SandboxError::NotWasm(
            "unknown WebAssembly binary version or layer".into(),
        ));
    }
    Ok(())
}

/// `0.x` versions are compatible within a minor version; `>=1` within a major version.
fn semver_compatible(found: &str, ours: &str) -> bool {
    let parse = |v: &str| -> Option<(u64, u64)> {
        let mut parts = v.split(['.', '-', '+']);
        Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
    };
    match (parse(found), parse(ours)) {
        (Some((0, a)), Some((0, b))) => a == b,
        (Some((a, _)), Some((b, _))) => a == b,
        _ => false,
    }
}

fn first_line(message: &str) -> String {
    message
        .lines()
        .next()
        .unwrap_or(message)
        .trim_end_matches(':')
        .to_string()
}

/// Turn a wasmtime error from instantiation or a call into a structured tool error.
/// Whether instantiating failed because the instance pool is full.
fn pool_full(error: &wasmtime::Error) -> bool {
    pool_full_text(&format!("{error:#}"))
}

fn pool_full_text(text: &str) -> bool {
    text.contains("maximum concurrent") || text.contains("pooling allocator")
}

fn classify_error(error: wasmtime::Error, store: &Store<State>, stderr: &[u8]) -> ToolError {
    let limiter_hit = store.data().limiter.hit;
    if let Some(trap) = error.downcast_ref::<Trap>() {
        match trap {
            Trap::Interrupt => {
                return ToolError::TimedOut {
                    message: "the plugin ran past its deadline and was interrupted".into(),
                };
            }
            Trap::OutOfFuel => {
                return ToolError::LimitExceeded {
                    limit: "fuel".into(),
                    message: "the plugin ran out of fuel".into(),
                };
            }
            Trap::StackOverflow => {
                return ToolError::LimitExceeded {
                    limit: "stack".into(),
                    message: "the plugin overflowed its stack (too deep recursion)".into(),
                };
            }
            _ => {}
        }
    }
    if let Some(limit) = limiter_hit {
        let message = match limit {
            "memory" => format!(
                "the plugin tried to use more than {} bytes of memory",
                store.data().limiter.memory_bytes
            ),
            other => format!("the plugin exceeded its {other} limit"),
        };
        return ToolError::LimitExceeded {
            limit: limit.into(),
            message,
        };
    }
    let text = format!("{error:#}");
    if text.contains("resource table has no free keys") || text.contains("handle limit exceeded") {
        return ToolError::LimitExceeded {
            limit: "handles".into(),
            message: format!(
                "the plugin held more than {} handles at once (open files and directories, streams, HTTP requests); the limit is max_handles",
                store.data().table.max_capacity()
            ),
        };
    }
    if pool_full_text(&text) {
        return ToolError::LimitExceeded {
            limit: "instances".into(),
            message: "too many concurrent plugin calls; try again".into(),
        };
    }
    let message = match (error.downcast_ref::<Trap>(), panic_message(stderr)) {
        (_, Some(panic)) => format!("the plugin panicked: {panic}"),
        (Some(Trap::MemoryOutOfBounds), None) => format!(
            "the plugin trapped: {} (a guest stack overflow from deep recursion also ends this way)",
            Trap::MemoryOutOfBounds
        ),
        (Some(trap), None) => format!("the plugin trapped: {trap}"),
        // Not a trap: the root cause names the problem (e.g. a string out of bounds of memory);
        // the outer context is only "error while executing at wasm backtrace".
        (None, None) => format!("the plugin failed: {}", first_line(&error.root_cause().to_string())),
    };
    ToolError::Trapped { message }
}

/// The panic line a Rust guest printed to stderr (`thread '..' panicked at file:line:`) together
/// with its message, which Rust prints on the following line.
fn panic_message(stderr: &[u8]) -> Option<String> {
    let stderr = String::from_utf8_lossy(stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    let at = lines.iter().rposition(|l| l.contains("panicked"))?;
    let mut message = lines[at].trim().to_string();
    if let Some(next) = lines
        .get(at + 1)
        .filter(|l| !l.trim().is_empty() && !l.starts_with("note:"))
    {
        message.push(' ');
        message.push_str(next.trim());
    }
    Some(message)
}

/// A `failed` error's message is plugin text of any size (a plain component's `err` value): it
/// counts against the output cap like an output would.
/// A tool's own `failed` after the host refused it memory (a JavaScript engine's "out of memory",
/// Python's `MemoryError`) says which limit it met and how to raise it: the engine's text names
/// neither.
fn memory_refusal_named(error: ToolError, hit: Option<&'static str>, memory_bytes: usize) -> ToolError {
    match error {
        ToolError::Failed { message } if hit == Some("memory") => ToolError::Failed {
            message: format!(
                "{message} (the host refused it more memory: the plugin's memory limit is {memory_bytes} bytes; \
                 `--memory-mb` or `keel plugins limits` raises it)"
            ),
        },
        other => other,
    }
}

fn cap_error(error: ToolError, max_output_bytes: u64) -> ToolError {
    match error {
        ToolError::Failed { message } if message.len() as u64 > max_output_bytes => ToolError::LimitExceeded {
            limit: "output".into(),
            message: format!(
                "the tool failed with a {}-byte error; the limit is {} bytes",
                message.len(),
                max_output_bytes
            ),
        },
        other => other,
    }
}

fn convert_tool_error(error: wit::ToolError) -> ToolError {
    match error {
        wit::ToolError::InvalidInput(message) => ToolError::InvalidInput { message },
        wit::ToolError::Denied(d) => ToolError::Denied {
            capability: d.capability,
            target: d.target,
            message: d.message,
        },
        wit::ToolError::Failed(message) => ToolError::Failed { message },
        wit::ToolError::TimedOut(message) => ToolError::TimedOut { message },
        wit::ToolError::UnknownTool(tool) => ToolError::UnknownTool { tool },
    }
}

/// The kind (and file suffix) of the cache note holding a component's checked `describe()` answer.
const DESCRIPTION_NOTE: &str = "describe-v1";
/// The note of a component's declared initial memory (see [`Sandbox::class_of`]).
const MEMORY_NOTE: &str = "memory-v1";

/// What a tool-world component's `describe()` answered, after [`convert_info`] checked it, kept
/// next to its precompiled artifact under the cache's HMAC (`ArtifactCache::put_note`, bound to
/// the component's sha256). A start that maps the verified artifact takes the answer from here
/// instead of instantiating the component once more only to ask it again: for python-exec that
/// was a whole extra CPython instance in every `keel exec --lang python` process. Still checked
/// at every load: the answer against the registry record (the plugin's identity, which is what
/// grants and per-tool narrowing use anyway), and its bounds, since a note checked under other
/// [`DescribeLimits`] is ignored and the component asked again.
#[derive(serde::Serialize, serde::Deserialize)]
struct DescriptionNote {
    /// The bounds the answer was checked under (without the time bound, which is not about it).
    limits: DescribeLimits,
    info: PluginInfo,
}

impl DescriptionNote {
    fn checked_under(limits: &DescribeLimits) -> DescribeLimits {
        DescribeLimits {
            prepare_timeout_ms: 0,
            ..limits.clone()
        }
    }
}

/// Check `describe()`'s answer and convert it. Every check is linear in the answer's size and the
/// answer is bounded by `limits` before anything is parsed, so a hostile answer costs little.
fn convert_info(raw: wit::PluginInfo, limits: &DescribeLimits) -> Result<PluginInfo, SandboxError> {
    let bad = |m: String| SandboxError::Describe(m);
    if !valid_name(&raw.name) {
        return Err(bad(format!("plugin name `{}` must match {NAME_RULE}", raw.name)));
    }
    check_version(&raw.version, limits.max_version_bytes)
        .map_err(|e| bad(format!("the version `{}` {e}", raw.version)))?;
    if raw.description.len() > limits.max_description_bytes {
        return Err(bad(format!(
            "the plugin description is {} bytes, more than the limit of {}",
            raw.description.len(),
            limits.max_description_bytes
        )));
    }
    if raw.tools.len() > limits.max_tools {
        return Err(bad(format!(
            "it declares {} tools, more than the limit of {} per plugin",
            raw.tools.len(),
            limits.max_tools
        )));
    }
    let mut names = HashSet::with_capacity(raw.tools.len());
    let mut tools: Vec<ToolInfo> = Vec::with_capacity(raw.tools.len());
    for tool in raw.tools {
        if !valid_name(&tool.name) {
            return Err(bad(format!("tool name `{}` must match {NAME_RULE}", tool.name)));
        }
        if !names.insert(tool.name.clone()) {
            return Err(bad(format!("tool `{}` is declared twice", tool.name)));
        }
        if tool.description.len() > limits.max_description_bytes {
            return Err(bad(format!(
                "the description of tool `{}` is {} bytes, more than the limit of {}",
                tool.name,
                tool.description.len(),
                limits.max_description_bytes
            )));
        }
        let schema = |text: &str, what: &str| {
            if text.len() > limits.max_schema_bytes {
                return Err(bad(format!(
                    "tool `{}` {what} schema is {} bytes, more than the limit of {}",
                    tool.name,
                    text.len(),
                    limits.max_schema_bytes
                )));
            }
            let schema = serde_json::from_str::<serde_json::Value>(text)
                .map_err(|e| bad(format!("tool `{}` {what} schema is not JSON: {e}", tool.name)))?;
            keel_kernel::agent::schema::check(&schema).map_err(|e| {
                bad(format!(
                    "tool `{}` {what} schema is not a valid JSON Schema: {e}",
                    tool.name
                ))
            })?;
            Ok(schema)
        };
        let input_schema = schema(&tool.input_schema, "input")?;
        let output_schema = tool.output_schema.as_deref().map(|s| schema(s, "output")).transpose()?;
        let caps = tool.capabilities;
        let requests = caps.filesystem.len() + caps.network.len() + caps.environment.len();
        if requests > limits.max_requests_per_tool {
            return Err(bad(format!(
                "tool `{}` makes {requests} capability requests, more than the limit of {}",
                tool.name, limits.max_requests_per_tool
            )));
        }
        for fs in &caps.filesystem {
            check_guest_path(&fs.path, limits.max_path_bytes).map_err(|e| {
                bad(format!(
                    "tool `{}` requests the path {:?}, which {e}",
                    tool.name, fs.path
                ))
            })?;
        }
        for host in &caps.network {
            // Host names are ASCII (IDNs in punycode); this also keeps control characters out.
            if host.len() > 261 || !host.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(bad(format!(
                    "tool `{}` requests the network host {host:?}, which is not a host name",
                    tool.name
                )));
            }
            crate::grants::validate_host_pattern(host).map_err(|e| bad(format!("tool `{}`: {e}", tool.name)))?;
        }
        for var in &caps.environment {
            if var.len() > 256 {
                return Err(bad(format!(
                    "tool `{}` requests an environment variable name longer than 256 bytes",
                    tool.name
                )));
            }
            crate::grants::validate_env_name(var).map_err(|e| bad(format!("tool `{}`: {e}", tool.name)))?;
        }
        tools.push(ToolInfo {
            name: tool.name,
            description: tool.description,
            input_schema,
            output_schema,
            capabilities: Capabilities {
                filesystem: caps
                    .filesystem
                    .into_iter()
                    .map(|f| FsRequest {
                        path: f.path,
                        mode: match f.mode {
                            wit::FsMode::Read => FsMode::Read,
                            wit::FsMode::ReadWrite => FsMode::ReadWrite,
                        },
                    })
                    .collect(),
                network: caps.network,
                environment: caps.environment,
            },
            idempotent: tool.idempotent,
        });
    }
    Ok(PluginInfo {
        name: raw.name,
        version: raw.version,
        description: raw.description,
        tools,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_checks() {
        assert!(matches!(check_header(b""), Err(SandboxError::NotWasm(_))));
        assert!(matches!(
            check_header(b"hello world, not wasm"),
            Err(SandboxError::NotWasm(_))
        ));
        assert!(matches!(
            check_header(b"\0asm\x01\0\0\0"),
            Err(SandboxError::CoreModule)
        ));
        assert!(matches!(check_header(b"\0asm\x0d\0\x01\0"), Ok(())));
        assert!(matches!(
            check_header(b"\0asm\x0d\0\x02\0"),
            Err(SandboxError::NotWasm(_))
        ));
    }

    #[test]
    fn versions() {
        assert!(semver_compatible("0.1.0", "0.1.0"));
        assert!(semver_compatible("0.1.3", "0.1.0"));
        assert!(!semver_compatible("0.2.0", "0.1.0"));
        assert!(!semver_compatible("1.0.0", "0.1.0"));
        assert!(semver_compatible("1.4.0", "1.0.0"));
        assert!(!semver_compatible("garbage", "0.1.0"));
    }

    #[test]
    fn panic_messages_keep_their_text() {
        let stderr = b"thread '<unnamed>' (1) panicked at src/lib.rs:9:5:\nboom went the plugin\nnote: run with RUST_BACKTRACE=1\n";
        assert_eq!(
            panic_message(stderr).unwrap(),
            "thread '<unnamed>' (1) panicked at src/lib.rs:9:5: boom went the plugin"
        );
        assert_eq!(panic_message(b"just some output\n"), None);
    }
}
