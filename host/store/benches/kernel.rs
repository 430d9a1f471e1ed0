//! Throughput of the durable kernel on a file-backed SQLite database (WAL, the same pragmas as
//! production), against a bare SQLite commit loop on the same file for the ratio.
//!
//! `cargo bench -p keel-store --bench kernel -- --warm-up-time 1 --measurement-time 5`
//!
//! - `kernel/job_create_complete`: create (with an idempotency key) -> start -> complete, i.e.
//!   3 kernel transactions (each a job row + its event).
//! - `kernel/reserve_settle`: reserve against a total budget (reads its running total and sums
//!   the live holds in the transaction) -> settle, i.e. 2 transactions. The ledger grows by 3 rows
//!   per iteration; the check does not read it, so the cost stays flat as it grows (it summed the
//!   window until the budget totals: 4.5 ms per iteration by the end of a run, now 0.36 ms).
//! - `kernel/reserve_settle_unbudgeted`: the same for a tenant without budgets.
//! - `sqlite/bare_commit`: `BEGIN IMMEDIATE; INSERT one row; COMMIT` on the same file: the floor
//!   every kernel transaction pays (dominated by the WAL fsync with `synchronous = FULL`).

#![allow(missing_docs)] // criterion_group! generates an undocumented pub fn.

mod common;

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use criterion::{Criterion, Throughput};
use keel_kernel::Kernel;
use keel_kernel::job::NewJob;
use keel_kernel::ledger::{Budget, BudgetLimits, BudgetWindow, LedgerKind, Usage};
use keel_kernel::services::{HoldRequest, SettleDetails};
use keel_store::Database;
use rust_decimal::Decimal;

/// The allocator the `keel` binary uses, so the bench measures what ships.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let db = rt.block_on(Database::open(&dir.path().join("bench.db"))).unwrap();
    let kernel = Kernel::new(Arc::new(db.kernel_store()));
    let counter = AtomicU64::new(0);

    let mut group = c.benchmark_group("kernel");
    group.throughput(Throughput::Elements(1));
    group.bench_function("job_create_complete", |b| {
        b.to_async(&rt).iter(|| async {
            let n = counter.fetch_add(1, Ordering::Relaxed);
            let mut new = NewJob::new("bench", "bench");
            new.idempotency_key = Some(format!("job-{n}"));
            let job = kernel.jobs().create(new).await.unwrap().job;
            kernel.jobs().start(job.id).await.unwrap();
            black_box(kernel.jobs().complete(job.id, None).await.unwrap());
        })
    });

    group.bench_function("reserve_settle_unbudgeted", |b| {
        b.to_async(&rt).iter(|| reserve_settle(&kernel, "free"))
    });
    rt.block_on(async {
        let mut budget = Budget::new("bench", "bench total", BudgetWindow::Total);
        budget.limits = BudgetLimits {
            max_tokens: Some(u64::MAX / 4),
            ..BudgetLimits::default()
        };
        kernel.ledger().put_budget(budget).await.unwrap();
    });
    group.bench_function("reserve_settle", |b| {
        b.to_async(&rt).iter(|| reserve_settle(&kernel, "bench"))
    });
    group.finish();

    let mut bare = common::BareCommit::open(&dir.path().join("bench.db"), "FULL");
    let mut group = c.benchmark_group("sqlite");
    group.throughput(Throughput::Elements(1));
    group.bench_function("bare_commit", |b| b.iter(|| bare.commit()));
    group.finish();
}

/// Hold 1000 tokens for `tenant`, then settle the same amount.
async fn reserve_settle(kernel: &Kernel, tenant: &str) {
    let amount = Usage {
        tokens: 1000,
        cost: Decimal::new(12, 3),
        requests: 1,
        tool_calls: 0,
    };
    let request = HoldRequest {
        tenant: tenant.into(),
        principal: Some("p".into()),
        session: None,
        job_id: None,
        amount: amount.clone(),
        ttl: None,
    };
    let held = kernel.ledger().reserve(request).await.unwrap();
    let settled = kernel
        .ledger()
        .settle(
            held.reservation.id,
            LedgerKind::ModelUsage,
            amount,
            SettleDetails::default(),
        )
        .await
        .unwrap();
    black_box(settled);
}

criterion::criterion_group!(benches, bench);
criterion::criterion_main!(benches);
