//! The kernel store's writer runs on the calling thread but never blocks it waiting for another
//! connection's write lock (`kernel_store/conn.rs`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use keel_kernel::ledger::{Budget, BudgetWindow};
use keel_kernel::store::KernelStore;
use keel_store::Database;

/// On a current-thread runtime the only thread must stay free while a write waits for the lock
/// another process holds: the lock holder here is a task of the same runtime, so a write that
/// blocked the thread would wait for itself until its timeout.
#[tokio::test]
async fn a_write_waits_for_another_writer_without_blocking_the_thread() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keel.db");
    let db = Database::open(&path).await.unwrap();
    let store = db.kernel_store();
    let other = rusqlite::Connection::open(&path).unwrap();
    other.execute_batch("BEGIN IMMEDIATE").unwrap();

    let ticks = Arc::new(AtomicU32::new(0));
    let ticker = tokio::spawn({
        let ticks = ticks.clone();
        async move {
            loop {
                tokio::time::sleep(Duration::from_millis(10)).await;
                ticks.fetch_add(1, Ordering::SeqCst);
            }
        }
    });
    let budget = Budget::new("t", "waits", BudgetWindow::Total);
    let release = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        // The write is still waiting: nothing of it is visible yet.
        assert!(store.list_budgets("t").await.unwrap().is_empty());
        other.execute_batch("COMMIT").unwrap();
    };
    let (written, ()) = tokio::join!(store.put_budget(budget.clone()), release);
    written.expect("the write goes through once the lock is free");
    ticker.abort();
    assert!(
        ticks.load(Ordering::SeqCst) >= 10,
        "the thread was blocked while the write waited ({} ticks in 300 ms)",
        ticks.load(Ordering::SeqCst)
    );
    assert_eq!(store.list_budgets("t").await.unwrap(), vec![budget]);
}
