//! keel-kernel: Keel's domain logic.
//!
//! Pure Rust + tokio: no wasmtime, no database, no HTTP. The crates that talk to the outside
//! world (keel-sandbox, keel-store, keel-models) implement the traits defined here.

pub mod action;
pub mod agent;
pub mod canonical;
pub mod clock;
#[cfg(feature = "conformance")]
pub mod conformance;
pub mod context;
pub mod error;
pub mod event;
pub mod job;
pub mod journal;
pub mod json;
pub mod ledger;
pub mod memory;
pub mod model;
pub mod policy;
pub mod registry;
pub mod services;
pub mod store;
pub mod tool;

pub use agent::{AgentConfig, AgentRuntime, ExecutionHandle, ExecutionRequest, ExecutionResult, IssuedToken};
pub use error::{KernelError, KernelResult};
pub use services::{Kernel, KernelConfig};
