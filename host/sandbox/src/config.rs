//! Configuration: engine-wide settings and per-call limits. Every limit and default lives here.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Per-call resource limits. Configurable globally ([`SandboxConfig::default_limits`]) and per plugin;
/// the TOML/CLI names are the field names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Linear memory cap per call, in bytes (all memories of the instance together).
    pub memory_bytes: u64,
    /// Wall-clock deadline per call, in milliseconds (epoch interruption in guest code, plus an
    /// async timeout around host calls such as HTTP).
    pub timeout_ms: u64,
    /// Fuel per call, when the engine meters fuel ([`SandboxConfig::fuel_metering`]).
    pub fuel: Option<u64>,
    /// Maximum size of a tool's JSON output, in bytes.
    pub max_output_bytes: u64,
    /// Total bytes of `host.log` messages kept per call; the rest is dropped and counted.
    pub max_log_bytes: u64,
    /// Bytes of guest stdout and of stderr captured per call.
    pub max_stdio_bytes: u64,
    /// Maximum elements per table.
    pub max_table_elements: u64,
    /// Maximum core instances created by one component instantiation.
    pub max_instances: u64,
    /// Maximum tables.
    pub max_tables: u64,
    /// Maximum linear memories.
    pub max_memories: u64,
    /// Maximum handles one call may hold at once: entries of its WASI resource table (each open
    /// file or directory, stream, HTTP request or response), and separately its component-model
    /// handles and its open outgoing HTTP requests. Bounds the host descriptors one call can take.
    pub max_handles: u64,
    /// Bytes a call may leave in its fresh scratch directory (see [`ScratchConfig`]): files'
    /// sizes (or allocated blocks, if larger) plus 512 bytes per entry, checked while the call
    /// runs and once more when it ends. Past it the call fails with limit `scratch`.
    pub max_scratch_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            memory_bytes: 64 << 20,
            timeout_ms: 10_000,
            fuel: None,
            max_output_bytes: 1 << 20,
            max_log_bytes: 64 << 10,
            max_stdio_bytes: 64 << 10,
            max_table_elements: 100_000,
            max_instances: 32,
            max_tables: 32,
            max_memories: 4,
            max_handles: 512,
            max_scratch_bytes: 64 << 20,
        }
    }
}

impl Limits {
    /// The strict limits used to run `describe` at install time.
    pub fn for_describe() -> Self {
        Self {
            memory_bytes: 32 << 20,
            timeout_ms: 2_000,
            max_output_bytes: 1 << 20,
            ..Self::default()
        }
    }

    /// Why no call could run under these limits, if none could: a memory cap or a deadline of 0
    /// would fail every call, and a memory cap above the sandbox's `ceiling`
    /// ([`SandboxConfig::max_memory_bytes`], the size of its memory slots) could not be given.
    pub fn check(&self, ceiling: u64) -> Result<(), String> {
        if self.memory_bytes == 0 {
            return Err("`memory_bytes` is 0: no call could run (a WebAssembly page is 64 KiB)".into());
        }
        if self.memory_bytes > ceiling {
            return Err(format!(
                "`memory_bytes` is {}, above the sandbox's ceiling of {} (`[sandbox] max_memory_bytes`)",
                size(self.memory_bytes),
                size(ceiling)
            ));
        }
        if self.timeout_ms == 0 {
            return Err("`timeout_ms` is 0: no call could run".into());
        }
        Ok(())
    }

    /// The wall-clock deadline as a [`Duration`].
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    /// Apply per-plugin overrides (the JSON object stored with the plugin) on top of `self`.
    pub fn overridden_by(&self, overrides: &serde_json::Value) -> Result<Limits, serde_json::Error> {
        let mut merged = serde_json::to_value(self)?;
        if let (Some(base), Some(over)) = (merged.as_object_mut(), overrides.as_object()) {
            for (key, value) in over {
                base.insert(key.clone(), value.clone());
            }
        }
        serde_json::from_value(merged)
    }
}

/// `bytes` in MiB when it is a whole number of them.
fn size(bytes: u64) -> String {
    if bytes.is_multiple_of(1 << 20) {
        format!("{} MiB", bytes >> 20)
    } else {
        format!("{bytes} bytes")
    }
}

/// Bounds on what a plugin's `describe()` may declare, checked at install and at every load. They
/// bound the host's own work on the plugin's behalf: a description is checked, stored and printed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DescribeLimits {
    /// Tools per plugin.
    pub max_tools: usize,
    /// Bytes of the plugin's description and of each tool's description.
    pub max_description_bytes: usize,
    /// Bytes of each tool's input and output JSON Schema.
    pub max_schema_bytes: usize,
    /// Bytes of the version string (which must be semver, e.g. `1.2.3` or `0.1.0-beta.1`).
    pub max_version_bytes: usize,
    /// Bytes of each requested filesystem path (absolute and normalised).
    pub max_path_bytes: usize,
    /// Capability requests (paths, hosts and variables together) per tool.
    pub max_requests_per_tool: usize,
    /// Wall-clock bound on preparing a plugin: validating, compiling (or loading the cached
    /// artifact), pre-linking, running `describe()` and checking its answer, in milliseconds.
    /// Default 10 minutes: compiling a CPython (~19 MB) or JS engine (~12 MB) component on a small,
    /// loaded machine takes minutes, and only the first prepare compiles (the artifact is cached).
    /// `[sandbox] prepare_timeout_ms` in `config.toml`.
    pub prepare_timeout_ms: u64,
}

impl Default for DescribeLimits {
    fn default() -> Self {
        Self {
            max_tools: 1_000,
            max_description_bytes: 4 << 10,
            max_schema_bytes: 64 << 10,
            max_version_bytes: 64,
            max_path_bytes: 1_024,
            max_requests_per_tool: 64,
            prepare_timeout_ms: 600_000,
        }
    }
}

/// Engine-wide configuration.
#[derive(Debug, Clone)]
pub struct SandboxConfig {
    /// Directory for precompiled artifacts (`$KEEL_HOME/cache`).
    pub cache_dir: PathBuf,
    /// The key that seals them, kept outside `cache_dir` by the caller (a Keel home keeps it in
    /// its database); `None` keeps it in `cache_dir/artifact.key`, for embedders without one.
    pub cache_key: Option<crate::cache::CacheKey>,
    /// Limits used when a call does not specify its own.
    pub default_limits: Limits,
    /// Hard ceiling on any memory limit; sizes the pooling allocator's slots.
    pub max_memory_bytes: u64,
    /// Instances the pooling allocator keeps slots for (concurrent calls).
    pub pool_instances: u32,
    /// Meter fuel (changes compiled code, so it is part of the cache key).
    pub fuel_metering: bool,
    /// Epoch tick length: the resolution of call deadlines.
    pub epoch_tick: Duration,
    /// Maximum guest stack, in bytes (deep recursion traps cleanly past it).
    pub max_wasm_stack: usize,
    /// Resolves the host names of plugins' outgoing HTTP requests. The addresses it returns are
    /// the ones checked against the private-network rule *and* the ones connected to (with the
    /// request's port). Default: the system resolver ([`SystemResolver`](crate::egress::SystemResolver)).
    /// An embedding or test seam, not a TOML/CLI setting.
    pub resolver: Arc<dyn crate::egress::Resolver>,
    /// Extra trusted root certificates (DER) for plugins' HTTPS requests, added to the built-in
    /// Mozilla roots (`webpki-roots`). Default: none. For tests and private CAs.
    pub extra_tls_roots: Vec<Vec<u8>>,
    /// Bounds on `describe()`'s answer and on the whole prepare step.
    pub describe: DescribeLimits,
    /// Fresh per-call scratch directories.
    pub scratch: ScratchConfig,
    /// Sessions: instances kept alive between calls that name the same `session_id`.
    pub sessions: SessionConfig,
    /// Ready instances kept per plugin tool (and grants and limits) once it has been called:
    /// instantiated in the background, each taken by one call and discarded after it (never
    /// reused), so a call starts without instantiating. 0 turns the pool off.
    pub ready_instances: usize,
    /// Ready instances kept in all, across plugins (and never more than a quarter of
    /// [`SandboxConfig::pool_instances`]: they hold pool slots that calls need).
    pub max_ready_instances: usize,
    /// Bytes of each linear memory the pooling allocator keeps resident when an instance ends,
    /// reset in place rather than unmapped, so the next instance in that slot (the allocator
    /// prefers a slot the same component used) starts on resident pages instead of faulting in
    /// its heap snapshot page by page: a ready python-exec `print(1)` measured ~5.9 ms with 0,
    /// ~3.7 ms with 16 MiB (what one CPython run touches; 32 and 64 MiB gain nothing more;
    /// `host/cli/benches/exec.rs`). Costs up to this much resident memory per memory slot once
    /// used (a slot is reused, not multiplied, by later calls). Default 16 MiB; 0: unmapped as
    /// usual. `[sandbox] memory_keep_resident_bytes` in `config.toml`.
    pub memory_keep_resident_bytes: usize,
    /// A finished call's store whose linear memories hold at most this many bytes in all (and
    /// that has no scratch directory) is freed by Keel's housekeeping thread, with the refill of
    /// ready instances; a bigger one on the blocking pool, so that resetting its memory never
    /// holds up the small ones. Freeing a small store (~1 MiB reset, ~50 µs) costs less than
    /// waking a blocking thread for it. Default 2 MiB; 0: every store on the blocking pool.
    pub housekeeping_free_bytes: usize,
}

/// Fresh scratch directories: a tool that requests the guest path [`SCRATCH_GUEST`] read-write,
/// and was granted no directory there, gets a new, private (0700), empty host directory mounted at
/// that path for each call (or for each session), removed when the call (or session) ends, and
/// capped by [`Limits::max_scratch_bytes`]. Concurrent calls never share it. A directory granted
/// read-write at [`SCRATCH_GUEST`] itself only moves where these are made (inside it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScratchConfig {
    /// Give scratch directories by default. Off: a tool gets `/scratch` only from an explicit
    /// filesystem grant.
    pub enabled: bool,
    /// Where scratch directories are created; `None`: the system temporary directory.
    pub dir: Option<PathBuf>,
}

/// The guest path that gets a fresh scratch directory (see [`ScratchConfig`]).
pub const SCRATCH_GUEST: &str = "/scratch";

impl ScratchConfig {
    /// Whether a tool's filesystem request is served by a fresh scratch directory for each call
    /// (when nothing is granted at that path): it asks for [`SCRATCH_GUEST`] read-write and
    /// scratch directories are enabled. Such a request needs no grant.
    pub fn provides(&self, request: &crate::info::FsRequest) -> bool {
        self.enabled
            && request.mode == crate::info::FsMode::ReadWrite
            && request.path.trim_end_matches('/') == SCRATCH_GUEST
    }
}

impl Default for ScratchConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            dir: None,
        }
    }
}

/// Sessions (see the README's "Sessions"): a call whose tool's input schema has a `session_id`
/// property and whose arguments give one as a string runs in the instance (and scratch
/// directory) kept for that id, within the caller's scope and principal. The instance's memory
/// stays capped by the call limits' `memory_bytes` for its whole life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionConfig {
    /// Idle time after which a session is dropped.
    pub ttl: Duration,
    /// Live sessions kept at most; past it the least recently used idle one is dropped.
    pub max_live: usize,
    /// Longest `session_id` accepted, in bytes.
    pub max_id_bytes: usize,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(600),
            max_live: 16,
            max_id_bytes: 128,
        }
    }
}

impl SandboxConfig {
    /// Defaults with artifacts cached under `cache_dir`.
    pub fn new(cache_dir: impl Into<PathBuf>) -> Self {
        Self {
            cache_dir: cache_dir.into(),
            cache_key: None,
            default_limits: Limits::default(),
            max_memory_bytes: 1 << 30,
            pool_instances: 128,
            fuel_metering: false,
            epoch_tick: Duration::from_millis(5),
            max_wasm_stack: 1 << 20,
            resolver: Arc::new(crate::egress::SystemResolver),
            extra_tls_roots: Vec::new(),
            describe: DescribeLimits::default(),
            scratch: ScratchConfig::default(),
            sessions: SessionConfig::default(),
            ready_instances: 2,
            max_ready_instances: 16,
            memory_keep_resident_bytes: 16 << 20,
            housekeeping_free_bytes: 2 << 20,
        }
    }
}
