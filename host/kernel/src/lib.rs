//! keel-kernel: Keel's domain logic.
//!
//! Pure Rust + tokio: no wasmtime, no database, no HTTP. The crates that talk to the outside
//! world (keel-sandbox, keel-store, keel-models) implement the traits defined here.

pub mod canonical;
pub mod tool;
