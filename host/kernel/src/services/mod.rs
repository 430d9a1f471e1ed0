//! The kernel facade: [`Kernel`] bundles the job, action and ledger managers and the event bus
//! over one [`KernelStore`], plus the recovery sweeper.
//!
//! Every state change is: read rows -> check the state machine -> commit one [`Batch`] (rows
//! with expected versions + the events they cause) -> publish the committed events. A version
//! conflict means another writer won; the operation re-reads and re-checks, a bounded number of
//! times, so nothing is ever silently overwritten.
//!
//! One file per manager: `jobs` ([`JobManager`]), `actions` ([`ActionManager`]), `ledger`
//! ([`Ledger`], holds and budgets), `events` (the events the managers emit), `kernel` (the
//! [`Kernel`] facade and the sweeper) and [`retry`], the one retry helper every write loop uses.

mod actions;
mod events;
mod jobs;
mod kernel;
mod ledger;
pub mod retry;

pub use actions::ActionManager;
pub(crate) use events::{StatusDetail, action_event, job_event, status_event};
pub use jobs::CreatedJob;
pub use jobs::JobManager;
pub(crate) use jobs::transition;
pub use kernel::{Kernel, SweepReport};
pub use ledger::{HoldRequest, Ledger, Reserved, SettleDetails};

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::action::{Action, ActionFilter, ActionState};
use crate::clock::Clock;
use crate::context::CancellationToken;
use crate::error::{KernelError, KernelResult};
use crate::event::{EventBus, RuntimeEvent};
use crate::job::Job;
use crate::store::{Batch, KernelStore, StoreError};

/// Tunables of the kernel core. Names match the `[kernel]` config section and CLI flags; an unknown
/// key is an error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KernelConfig {
    /// Live events buffered per slow subscriber before it lags (and must re-read the store).
    pub event_buffer: usize,
    /// Attempts at an optimistic-concurrency write before giving up with `Contention`.
    pub max_write_attempts: u32,
    /// Rows handled per sweep query.
    pub sweep_batch: u32,
    /// How long a budget hold lives if never settled, in seconds.
    pub hold_ttl_secs: i64,
    /// If set, `wait_for_resolution` also re-reads the store this often (milliseconds). Live
    /// wake-ups are in-process only; set this when *another process* may resolve actions in the
    /// same database (e.g. `keel actions resolve` against a running `keel serve` on SQLite).
    pub action_recheck_ms: Option<u64>,
}

impl Default for KernelConfig {
    fn default() -> Self {
        Self {
            event_buffer: 4096,
            max_write_attempts: 64,
            sweep_batch: 500,
            hold_ttl_secs: 600,
            action_recheck_ms: None,
        }
    }
}

struct Core {
    store: Arc<dyn KernelStore>,
    bus: EventBus,
    clock: Arc<dyn Clock>,
    config: KernelConfig,
    tokens: Mutex<HashMap<Uuid, CancellationToken>>,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core")
            .field("store", &self.store)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Core {
    pub(super) fn now(&self) -> DateTime<Utc> {
        self.clock.now()
    }

    async fn commit(&self, batch: Batch) -> Result<Vec<RuntimeEvent>, StoreError> {
        let events = self.store.commit(batch).await?;
        self.publish(&events);
        Ok(events)
    }

    /// Commit `batch`, repeating it while the store is only busy (with [`retry::BUSY`]'s
    /// backoff), without copying it up front (see [`KernelStore::commit_or_return`]). On failure
    /// the batch comes back, unapplied, with the error.
    async fn commit_busy(&self, mut batch: Batch) -> crate::store::CommitOrReturn {
        let backoff = retry::BUSY;
        let mut wait = backoff.first_wait;
        let mut attempt = 1;
        loop {
            match self.store.commit_or_return(batch).await {
                Ok(events) => {
                    self.publish(&events);
                    return Ok(events);
                }
                Err((e, back)) if e.is_transient() && attempt < backoff.attempts => {
                    batch = *back;
                    tokio::time::sleep(wait).await;
                    wait *= 2;
                    attempt += 1;
                }
                Err(failed) => return Err(failed),
            }
        }
    }

    /// Hand committed events to in-process subscribers (copies only when there are any).
    fn publish(&self, events: &[RuntimeEvent]) {
        if self.bus.has_subscribers() {
            self.bus.publish(events.iter().cloned());
        }
    }

    async fn load_job(&self, id: Uuid) -> KernelResult<Job> {
        self.store.get_job(id).await?.ok_or(KernelError::JobNotFound(id))
    }

    async fn load_action(&self, id: Uuid) -> KernelResult<Action> {
        self.store.get_action(id).await?.ok_or(KernelError::ActionNotFound(id))
    }

    async fn pending_actions(&self, job: &Job) -> KernelResult<Vec<Action>> {
        let filter = ActionFilter {
            tenant: job.tenant.clone(),
            job_id: Some(job.id),
            states: vec![ActionState::Pending],
            limit: None,
        };
        Ok(self.store.list_actions(&filter).await?)
    }

    fn fire_tokens(&self, ids: &[Uuid]) {
        let mut tokens = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        for id in ids {
            if let Some(t) = tokens.remove(id) {
                t.cancel();
            }
        }
    }

    fn forget_token(&self, id: Uuid) {
        self.tokens.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
    }
}
