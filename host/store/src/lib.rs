//! keel-store: durable storage for Keel on SQLite (the embedded default).
//!
//! Opens the database with WAL, a busy timeout and embedded migrations, and implements the
//! plugin registry plus the kernel's store traits.

pub mod api_keys;
pub mod kernel_store;
pub mod plugins;
pub mod secrets;
pub mod sqlite;

pub use kernel_store::SqliteKernelStore;
pub use sqlite::{Database, Durability, StoreError};
