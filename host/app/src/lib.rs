//! keel-app: Keel's use cases over one [`App`] (home, config, store, sandbox, models).
//!
//! Install, grant, call, exec, run/resume/watch a job, resolve an action, usage: every front end
//! (the `keel` CLI, the HTTP server, the MCP server) calls these functions and only parses
//! arguments and renders results itself. Dependencies point one way:
//! `{cli, server, mcp} -> app -> {sandbox, store, models} -> kernel`.

pub mod actions;
pub mod call;
pub mod caller;
pub mod error;
pub mod events;
pub mod exec;
pub mod files;
pub mod home;
pub mod install;
pub mod jobs;
pub mod kernel;
pub mod keys;
pub mod ledger;
pub mod plugins;
pub mod policy;
pub mod runtime;
pub mod tools;

pub use caller::{Caller, Role};
pub use error::{AppError, ErrorKind};
pub use home::App;
/// The domain types (jobs, actions, events, tool errors) the use cases take and return, for front
/// ends that depend on `keel-app` alone (`keel-mcp`).
pub use keel_kernel;

/// The sandbox's descriptions of plugins and grants, which front ends render. Front ends never
/// call the sandbox: they see these types only through the use cases.
pub mod plugin_types {
    pub use keel_sandbox::{CacheOutcome, Capabilities, Grants, ImportSummary, Limits, PluginInfo, PreparedPlugin};
}
pub use runtime::AgentHost;
