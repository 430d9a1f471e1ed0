//! keel-sandbox: Keel's WebAssembly component host.
//!
//! One shared [`wasmtime::Engine`] with a pooling allocator and copy-on-write memory images;
//! plugins are validated against the `keel:plugin/tool` world (or, for any other component, their
//! exported functions become tools: `exports`), stored by sha256, precompiled once into an
//! HMAC-verified cache (mapped, not re-hashed, on later starts: `cache`), pre-linked
//! (`InstancePre`) once, and every call runs in a fresh `Store` holding only the capabilities
//! granted (filesystem preopens, an HTTP allowlist, named environment variables) under per-call
//! limits (memory, deadline, fuel, output, logs).
//!
//! This crate knows nothing about jobs, policy or budgets: the kernel reaches it through
//! [`keel_kernel::tool::ToolHost`], implemented by [`SandboxToolHost`].

pub mod cache;
pub mod config;
pub mod egress;
mod exports;
pub mod grants;
pub mod host;
pub mod info;
mod open_at;
mod preopen;
mod sandbox;
mod scratch;
mod session;
mod stdio;
mod toolhost;

pub use cache::{ArtifactCache, CacheKey, CacheOutcome, ComponentStore, ComponentsLock};
pub use config::{DescribeLimits, Limits, SCRATCH_GUEST, SandboxConfig, ScratchConfig, SessionConfig};
pub use egress::{Resolver, SystemResolver};
pub use exports::plugin_name_from;
pub use grants::{FileIdentity, FsGrant, GrantError, Grants, Preopen};
pub use host::{Denial, LogLevel, LogRecord, ProgressRecord};
pub use info::{Capabilities, FsMode, FsRequest, ImportSummary, PluginInfo, ToolInfo};
pub use sandbox::{
    CallReport, ExecReport, PreparedPlugin, SESSION_FIELD, Sandbox, SandboxError, ToolOutput, WIT_PACKAGE, WIT_VERSION,
};
pub use scratch::wait_for_scratch_removal;
pub use stdio::{OutputWriter, STREAM_BUDGET};
pub use toolhost::{InstalledTool, SandboxToolHost};
