//! The store conformance suite against the in-memory store, one test per check.
#![cfg(feature = "conformance")]

use std::sync::Arc;

use keel_kernel::memory::MemoryStore;
use keel_kernel::store::KernelStore;

async fn memory_store(_check: &'static str) -> Arc<dyn KernelStore> {
    Arc::new(MemoryStore::new())
}

keel_kernel::conformance_tests!(memory_store);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn run_all_in_sequence() {
    keel_kernel::conformance::run_all(|| memory_store("all")).await;
}

#[tokio::test]
async fn memory_registry_passes_conformance() {
    keel_kernel::conformance::plugin_registry(Arc::new(keel_kernel::memory::MemoryRegistry::new())).await;
}
