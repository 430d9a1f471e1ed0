//! SQLite implementation of [`keel_kernel::store::KernelStore`].
//!
//! Every write runs in a `BEGIN IMMEDIATE` transaction: it takes SQLite's write lock up front,
//! so read-modify-write sequences (version checks, per-job sequence numbers, budget sums) are
//! serialized across all connections and processes instead of failing late with SQLITE_BUSY.
//! Reads run outside transactions (WAL gives them a consistent snapshot per statement).

mod actions;
mod batch;
mod events;
mod jobs;
mod journal;
mod leases;
mod ledger;
mod rows;

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use keel_kernel::action::{Action, ActionFilter};
use keel_kernel::event::{EventQuery, RuntimeEvent};
use keel_kernel::job::{Job, JobFilter};
use keel_kernel::ledger::{
    Budget, LedgerEvent, LedgerQuery, NewLedgerEvent, Reservation, ReserveOutcome, ReserveRequest, SettleRequest,
    Usage, UsageQuery,
};
use keel_kernel::store::{
    Batch, BudgetEvaluator, ClaimRequest, JournalEntry, KernelStore, Lease, LeaseGuard, StoreResult,
};
use sqlx::{Sqlite, SqlitePool};
use uuid::Uuid;

use crate::sqlite::Database;

pub(crate) use self::rows::be;

/// The kernel store on a [`Database`]. Cheap to clone (shares the pool).
#[derive(Debug, Clone)]
pub struct SqliteKernelStore {
    pool: SqlitePool,
}

impl SqliteKernelStore {
    /// A store on `db` (whose migrations have already created the tables).
    pub fn new(db: &Database) -> Self {
        Self {
            pool: db.pool().clone(),
        }
    }
}

impl Database {
    /// The kernel store on this database.
    pub fn kernel_store(&self) -> SqliteKernelStore {
        SqliteKernelStore::new(self)
    }
}

impl SqliteKernelStore {
    pub(super) async fn begin(&self) -> StoreResult<sqlx::Transaction<'static, Sqlite>> {
        self.pool.begin_with("BEGIN IMMEDIATE").await.map_err(be)
    }
}

impl KernelStore for SqliteKernelStore {
    fn commit(&self, batch: Batch) -> BoxFuture<'_, StoreResult<Vec<RuntimeEvent>>> {
        Box::pin(self.commit_batch(batch))
    }

    fn get_job(&self, id: Uuid) -> BoxFuture<'_, StoreResult<Option<Job>>> {
        Box::pin(self.sql_get_job(id))
    }

    fn get_job_by_key<'a>(&'a self, tenant: &'a str, key: &'a str) -> BoxFuture<'a, StoreResult<Option<Job>>> {
        Box::pin(self.sql_get_job_by_key(tenant, key))
    }

    fn list_jobs<'a>(&'a self, filter: &'a JobFilter) -> BoxFuture<'a, StoreResult<Vec<Job>>> {
        Box::pin(self.sql_list_jobs(filter))
    }

    fn count_jobs<'a>(&'a self, filter: &'a JobFilter) -> BoxFuture<'a, StoreResult<u64>> {
        Box::pin(self.sql_count_jobs(filter))
    }

    fn overdue_jobs(&self, now: DateTime<Utc>, limit: u32) -> BoxFuture<'_, StoreResult<Vec<Job>>> {
        Box::pin(self.sql_overdue_jobs(now, limit))
    }

    fn get_action(&self, id: Uuid) -> BoxFuture<'_, StoreResult<Option<Action>>> {
        Box::pin(self.sql_get_action(id))
    }

    fn get_action_by_token_hash<'a>(&'a self, token_hash: &'a str) -> BoxFuture<'a, StoreResult<Option<Action>>> {
        Box::pin(self.sql_get_action_by_token_hash(token_hash))
    }

    fn list_actions<'a>(&'a self, filter: &'a ActionFilter) -> BoxFuture<'a, StoreResult<Vec<Action>>> {
        Box::pin(self.sql_list_actions(filter))
    }

    fn expired_actions(&self, now: DateTime<Utc>, limit: u32) -> BoxFuture<'_, StoreResult<Vec<Action>>> {
        Box::pin(self.sql_expired_actions(now, limit))
    }

    fn read_events<'a>(&'a self, query: &'a EventQuery) -> BoxFuture<'a, StoreResult<Vec<RuntimeEvent>>> {
        Box::pin(self.sql_read_events(query))
    }

    fn append_ledger(&self, entry: NewLedgerEvent) -> BoxFuture<'_, StoreResult<LedgerEvent>> {
        Box::pin(self.sql_append_ledger(entry))
    }

    fn list_ledger<'a>(&'a self, query: &'a LedgerQuery) -> BoxFuture<'a, StoreResult<Vec<LedgerEvent>>> {
        Box::pin(self.sql_list_ledger(query))
    }

    fn usage<'a>(&'a self, query: &'a UsageQuery) -> BoxFuture<'a, StoreResult<Usage>> {
        Box::pin(self.sql_usage(query))
    }

    fn put_budget(&self, budget: Budget) -> BoxFuture<'_, StoreResult<()>> {
        Box::pin(self.sql_put_budget(budget))
    }

    fn list_budgets<'a>(&'a self, tenant: &'a str) -> BoxFuture<'a, StoreResult<Vec<Budget>>> {
        Box::pin(self.sql_list_budgets(tenant))
    }

    fn delete_budget(&self, id: Uuid) -> BoxFuture<'_, StoreResult<bool>> {
        Box::pin(self.sql_delete_budget(id))
    }

    fn reserve(
        &self,
        request: ReserveRequest,
        evaluate: BudgetEvaluator,
    ) -> BoxFuture<'_, StoreResult<ReserveOutcome>> {
        Box::pin(self.reserve_tx(request, evaluate))
    }

    fn get_reservation(&self, id: Uuid) -> BoxFuture<'_, StoreResult<Option<Reservation>>> {
        Box::pin(self.sql_get_reservation(id))
    }

    fn settle(&self, request: SettleRequest) -> BoxFuture<'_, StoreResult<Reservation>> {
        Box::pin(self.settle_tx(request))
    }

    fn release(&self, id: Uuid, now: DateTime<Utc>, reason: String) -> BoxFuture<'_, StoreResult<Reservation>> {
        Box::pin(self.release_tx(id, now, reason))
    }

    fn release_expired(&self, now: DateTime<Utc>, limit: u32) -> BoxFuture<'_, StoreResult<Vec<Reservation>>> {
        Box::pin(self.release_expired_tx(now, limit))
    }

    fn read_journal(&self, job_id: Uuid) -> BoxFuture<'_, StoreResult<Vec<JournalEntry>>> {
        Box::pin(self.sql_read_journal(job_id))
    }

    fn extend_holds<'a>(&'a self, ids: &'a [Uuid], until: DateTime<Utc>) -> BoxFuture<'a, StoreResult<u64>> {
        Box::pin(self.sql_extend_holds(ids, until))
    }

    fn claim_jobs(&self, request: ClaimRequest) -> BoxFuture<'_, StoreResult<Vec<Job>>> {
        Box::pin(self.claim_tx(request))
    }

    fn renew_lease<'a>(&'a self, guard: &'a LeaseGuard, ttl_ms: u64) -> BoxFuture<'a, StoreResult<bool>> {
        Box::pin(self.sql_renew_lease(guard, ttl_ms))
    }

    fn release_lease<'a>(&'a self, guard: &'a LeaseGuard) -> BoxFuture<'a, StoreResult<bool>> {
        Box::pin(self.sql_release_lease(guard))
    }

    fn get_lease(&self, job_id: Uuid) -> BoxFuture<'_, StoreResult<Option<Lease>>> {
        Box::pin(self.sql_get_lease(job_id))
    }
}
