//! [`Kernel`]: the facade bundling the managers and the event bus, and the recovery sweeper.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::clock::{Clock, SystemClock};
use crate::context::CancellationToken;
use crate::error::{KernelError, KernelResult};
use crate::event::{EventBus, EventFilter, EventQuery, RuntimeEvent, Subscription};
use crate::store::{Batch, KernelStore, StoreError};

use super::{ActionManager, Core, JobManager, KernelConfig, Ledger};

/// What one sweep did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SweepReport {
    /// Past-deadline jobs moved to TIMED_OUT.
    pub jobs_timed_out: usize,
    /// Pending actions past expiry moved to EXPIRED (their jobs timed out).
    pub actions_expired: usize,
    /// Expired holds released.
    pub reservations_released: usize,
}

/// The kernel: managers + event bus over one store. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Kernel {
    pub(super) core: Arc<Core>,
    jobs: JobManager,
    actions: ActionManager,
    ledger: Ledger,
}

impl Kernel {
    /// A kernel over `store` with the system clock and default config.
    pub fn new(store: Arc<dyn KernelStore>) -> Self {
        Self::with_clock(store, Arc::new(SystemClock), KernelConfig::default())
    }

    /// A kernel with an explicit clock and config (tests drive time through the clock).
    pub fn with_clock(store: Arc<dyn KernelStore>, clock: Arc<dyn Clock>, config: KernelConfig) -> Self {
        let core = Arc::new(Core {
            store,
            bus: EventBus::new(config.event_buffer),
            clock,
            config,
            tokens: Mutex::new(HashMap::new()),
        });
        Self {
            jobs: JobManager { core: core.clone() },
            actions: ActionManager { core: core.clone() },
            ledger: Ledger { core: core.clone() },
            core,
        }
    }

    /// Jobs.
    pub fn jobs(&self) -> &JobManager {
        &self.jobs
    }

    /// Actions.
    pub fn actions(&self) -> &ActionManager {
        &self.actions
    }

    /// Ledger and budgets.
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// The live event bus.
    pub fn events(&self) -> &EventBus {
        &self.core.bus
    }

    /// Subscribe to live events.
    pub fn subscribe(&self, filter: EventFilter) -> Subscription {
        self.core.bus.subscribe(filter)
    }

    /// Read persisted events (catch-up / SSE resume).
    pub async fn read_events(&self, query: &EventQuery) -> KernelResult<Vec<RuntimeEvent>> {
        Ok(self.core.store.read_events(query).await?)
    }

    /// Commit a batch and publish its events (for the agent loop's step writes).
    pub(crate) async fn commit(&self, batch: Batch) -> Result<Vec<RuntimeEvent>, StoreError> {
        self.core.commit(batch).await
    }

    /// Commit `batch`, repeating it while the store is busy; on failure the unapplied batch comes
    /// back with the error (see `Core::commit_busy`).
    pub(crate) async fn commit_busy(&self, batch: Batch) -> crate::store::CommitOrReturn {
        self.core.commit_busy(batch).await
    }

    /// The kernel's configuration.
    pub fn config(&self) -> &KernelConfig {
        &self.core.config
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn KernelStore> {
        &self.core.store
    }

    /// The clock.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.core.clock
    }

    /// Recovery sweep, run at start-up and periodically: time out non-terminal jobs past their
    /// deadline, expire pending actions past expiry (timing their jobs out), and release
    /// expired budget holds. Idempotent; safe to run concurrently with normal work.
    pub async fn recover_and_sweep(&self, now: DateTime<Utc>) -> KernelResult<SweepReport> {
        let mut report = SweepReport::default();
        let batch = self.core.config.sweep_batch.max(1);
        loop {
            let actions = self.core.store.expired_actions(now, batch).await?;
            let mut progressed = false;
            for a in &actions {
                match self.actions.expire(a.id).await {
                    Ok(_) => {
                        report.actions_expired += 1;
                        progressed = true;
                    }
                    Err(KernelError::ActionNotPending { .. }) => progressed = true,
                    Err(e) => return Err(e),
                }
            }
            if actions.len() < batch as usize || !progressed {
                break;
            }
        }
        loop {
            let jobs = self.core.store.overdue_jobs(now, batch).await?;
            let mut progressed = false;
            for j in &jobs {
                match self.jobs.time_out(j.id, "deadline exceeded").await {
                    Ok(_) => {
                        report.jobs_timed_out += 1;
                        progressed = true;
                    }
                    Err(KernelError::IllegalTransition { .. }) => progressed = true,
                    Err(e) => return Err(e),
                }
            }
            if jobs.len() < batch as usize || !progressed {
                break;
            }
        }
        loop {
            let released = self.core.store.release_expired(now, batch).await?;
            report.reservations_released += released.len();
            if released.len() < batch as usize {
                break;
            }
        }
        Ok(report)
    }

    /// Run [`recover_and_sweep`](Self::recover_and_sweep) every `every` until `stop` is cancelled.
    pub fn spawn_sweeper(&self, every: std::time::Duration, stop: CancellationToken) -> tokio::task::JoinHandle<()> {
        let kernel = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every.max(std::time::Duration::from_millis(1)));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => {
                        let now = kernel.core.now();
                        // A failed sweep is retried on the next tick; it must not kill the task.
                        let _ = kernel.recover_and_sweep(now).await;
                    }
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::event::EventType;
    use crate::job::{JobState, NewJob};
    use crate::memory::MemoryStore;

    #[tokio::test]
    async fn background_sweeper_times_out_jobs_and_stops() {
        let clock = Arc::new(ManualClock::new(Utc::now()));
        let kernel = Kernel::with_clock(Arc::new(MemoryStore::new()), clock.clone(), KernelConfig::default());
        let mut new = NewJob::new("t", "agent");
        new.deadline = Some(clock.now() + chrono::Duration::seconds(5));
        let job = kernel.jobs().create(new).await.unwrap().job;
        let token = kernel.jobs().cancellation_token(job.id);
        let mut sub = kernel.subscribe(EventFilter::job(job.id).with_types([EventType::JobStatusChanged]));
        clock.advance(chrono::Duration::seconds(6));
        let stop = CancellationToken::new();
        let sweeper = kernel.spawn_sweeper(std::time::Duration::from_millis(10), stop.clone());
        let event = sub.recv().await.unwrap();
        assert_eq!(event.data.value()["to"], "TIMED_OUT");
        token.cancelled().await;
        stop.cancel();
        sweeper.await.unwrap();
        assert_eq!(kernel.jobs().get("t", job.id).await.unwrap().state, JobState::TimedOut);
    }
}
