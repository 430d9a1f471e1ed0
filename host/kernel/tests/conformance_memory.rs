//! The store conformance suite against the in-memory store.
#![cfg(feature = "conformance")]

use std::sync::Arc;

use keel_kernel::memory::MemoryStore;
use keel_kernel::store::KernelStore;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_store_passes_conformance() {
    keel_kernel::conformance::run_all(|| async {
        Arc::new(MemoryStore::new()) as Arc<dyn KernelStore>
    })
    .await;
}
