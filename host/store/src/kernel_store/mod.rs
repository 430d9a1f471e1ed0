//! SQLite implementation of [`keel_kernel::store::KernelStore`].
//!
//! Every write runs in a `BEGIN IMMEDIATE` transaction: it takes SQLite's write lock up front,
//! so read-modify-write sequences (version checks, per-job sequence numbers, budget sums) are
//! serialized across all connections and processes instead of failing late with SQLITE_BUSY.
//! Reads run outside transactions (WAL gives them a consistent snapshot per statement).
//!
//! The store runs on its own rusqlite connections, each transaction as one closure on the
//! calling thread (`conn.rs` says why); the rest of keel-store (plugins, API keys, migrations)
//! stays on sqlx.

mod actions;
mod batch;
pub(crate) mod conn;
mod events;
mod jobs;
mod journal;
mod leases;
mod ledger;
mod policy_texts;
mod rows;
mod wal_vfs;

use std::sync::Arc;

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
use uuid::Uuid;

use self::conn::Connections;
use crate::sqlite::Database;

pub(crate) use self::rows::be;

/// The kernel store on a [`Database`]. Cheap to clone (shares the connections).
#[derive(Debug, Clone)]
pub struct SqliteKernelStore {
    db: Arc<Connections>,
}

impl SqliteKernelStore {
    /// A store on `db` (whose migrations have already created the tables).
    pub fn new(db: &Database) -> Self {
        Self {
            db: db.kernel_connections(),
        }
    }
}

impl Database {
    /// The kernel store on this database.
    pub fn kernel_store(&self) -> SqliteKernelStore {
        SqliteKernelStore::new(self)
    }
}

/// A read on a reader connection, as a store future.
macro_rules! read {
    ($self:ident, |$c:ident| $body:expr) => {
        Box::pin(async move { $self.db.read(|$c| $body) })
    };
}

/// A write in one transaction on the writer connection, as a store future.
macro_rules! write {
    ($self:ident, |$c:ident| $body:expr) => {
        Box::pin(async move { $self.db.write(|$c| $body).await })
    };
}

impl KernelStore for SqliteKernelStore {
    fn commit(&self, batch: Batch) -> BoxFuture<'_, StoreResult<Vec<RuntimeEvent>>> {
        if batch.is_empty() {
            return Box::pin(async { Ok(vec![]) });
        }
        write!(self, |c| batch::commit(c, batch))
    }

    fn get_job(&self, id: Uuid) -> BoxFuture<'_, StoreResult<Option<Job>>> {
        read!(self, |c| jobs::get_job(c, id))
    }

    fn get_job_by_key<'a>(&'a self, tenant: &'a str, key: &'a str) -> BoxFuture<'a, StoreResult<Option<Job>>> {
        read!(self, |c| jobs::get_job_by_key(c, tenant, key))
    }

    fn list_jobs<'a>(&'a self, filter: &'a JobFilter) -> BoxFuture<'a, StoreResult<Vec<Job>>> {
        read!(self, |c| jobs::list_jobs(c, filter))
    }

    fn count_jobs<'a>(&'a self, filter: &'a JobFilter) -> BoxFuture<'a, StoreResult<u64>> {
        read!(self, |c| jobs::count_jobs(c, filter))
    }

    fn overdue_jobs(&self, now: DateTime<Utc>, limit: u32) -> BoxFuture<'_, StoreResult<Vec<Job>>> {
        read!(self, |c| jobs::overdue_jobs(c, now, limit))
    }

    fn get_action(&self, id: Uuid) -> BoxFuture<'_, StoreResult<Option<Action>>> {
        read!(self, |c| actions::get_action(c, id))
    }

    fn get_action_by_token_hash<'a>(&'a self, token_hash: &'a str) -> BoxFuture<'a, StoreResult<Option<Action>>> {
        read!(self, |c| actions::get_action_by_token_hash(c, token_hash))
    }

    fn list_actions<'a>(&'a self, filter: &'a ActionFilter) -> BoxFuture<'a, StoreResult<Vec<Action>>> {
        read!(self, |c| actions::list_actions(c, filter))
    }

    fn expired_actions(&self, now: DateTime<Utc>, limit: u32) -> BoxFuture<'_, StoreResult<Vec<Action>>> {
        read!(self, |c| actions::expired_actions(c, now, limit))
    }

    fn read_events<'a>(&'a self, query: &'a EventQuery) -> BoxFuture<'a, StoreResult<Vec<RuntimeEvent>>> {
        read!(self, |c| events::read_events(c, query))
    }

    fn append_ledger(&self, entry: NewLedgerEvent) -> BoxFuture<'_, StoreResult<LedgerEvent>> {
        write!(self, |c| {
            let id = ledger::insert_ledger(c, &entry)?;
            Ok(LedgerEvent { id, entry })
        })
    }

    fn list_ledger<'a>(&'a self, query: &'a LedgerQuery) -> BoxFuture<'a, StoreResult<Vec<LedgerEvent>>> {
        read!(self, |c| ledger::list_ledger(c, query))
    }

    fn usage<'a>(&'a self, query: &'a UsageQuery) -> BoxFuture<'a, StoreResult<Usage>> {
        read!(self, |c| ledger::usage(c, query))
    }

    fn put_budget(&self, budget: Budget) -> BoxFuture<'_, StoreResult<()>> {
        write!(self, |c| ledger::put_budget(c, &budget))
    }

    fn list_budgets<'a>(&'a self, tenant: &'a str) -> BoxFuture<'a, StoreResult<Vec<Budget>>> {
        // On every governed call's path (does a budget apply?): a tenant has a few budgets, read
        // by index, where a reader's emptied page cache cost several system calls.
        Box::pin(async move { self.db.read_point(|c| ledger::list_budgets(c, tenant)) })
    }

    fn budget_used<'a>(&'a self, budget: &'a Budget, now: DateTime<Utc>) -> BoxFuture<'a, StoreResult<Usage>> {
        read!(self, |c| ledger::budget_settled(c, budget, now))
    }

    fn delete_budget(&self, id: Uuid) -> BoxFuture<'_, StoreResult<bool>> {
        write!(self, |c| ledger::delete_budget(c, id))
    }

    fn reserve(
        &self,
        request: ReserveRequest,
        evaluate: BudgetEvaluator,
    ) -> BoxFuture<'_, StoreResult<ReserveOutcome>> {
        write!(self, |c| ledger::reserve(c, &request, evaluate))
    }

    fn get_reservation(&self, id: Uuid) -> BoxFuture<'_, StoreResult<Option<Reservation>>> {
        read!(self, |c| ledger::get_reservation(c, id))
    }

    fn settle(&self, request: SettleRequest) -> BoxFuture<'_, StoreResult<Reservation>> {
        write!(self, |c| ledger::settle_in(c, request))
    }

    fn release(&self, id: Uuid, now: DateTime<Utc>, reason: String) -> BoxFuture<'_, StoreResult<Reservation>> {
        write!(self, |c| ledger::release_in(c, id, now, &reason))
    }

    fn release_expired(&self, now: DateTime<Utc>, limit: u32) -> BoxFuture<'_, StoreResult<Vec<Reservation>>> {
        write!(self, |c| ledger::release_expired(c, now, limit))
    }

    fn read_journal(&self, job_id: Uuid) -> BoxFuture<'_, StoreResult<Vec<JournalEntry>>> {
        read!(self, |c| journal::read_journal(c, job_id))
    }

    fn extend_holds<'a>(&'a self, ids: &'a [Uuid], until: DateTime<Utc>) -> BoxFuture<'a, StoreResult<u64>> {
        write!(self, |c| ledger::extend_holds(c, ids, until))
    }

    fn claim_jobs(&self, request: ClaimRequest) -> BoxFuture<'_, StoreResult<Vec<Job>>> {
        if request.kinds.is_empty() || request.limit == 0 {
            return Box::pin(async { Ok(vec![]) });
        }
        write!(self, |c| leases::claim(c, &request))
    }

    fn renew_lease<'a>(&'a self, guard: &'a LeaseGuard, ttl_ms: u64) -> BoxFuture<'a, StoreResult<bool>> {
        write!(self, |c| leases::renew_lease(c, guard, ttl_ms))
    }

    fn release_lease<'a>(&'a self, guard: &'a LeaseGuard) -> BoxFuture<'a, StoreResult<bool>> {
        write!(self, |c| leases::release_lease(c, guard))
    }

    fn get_lease(&self, job_id: Uuid) -> BoxFuture<'_, StoreResult<Option<Lease>>> {
        read!(self, |c| leases::get_lease(c, job_id))
    }

    fn policy_text<'a>(&'a self, sha256: &'a str) -> BoxFuture<'a, StoreResult<Option<String>>> {
        read!(self, |c| policy_texts::policy_text(c, sha256))
    }
}
