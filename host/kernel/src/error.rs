//! Kernel error types.
//!
//! The bottom of the module graph: this module imports only the plain value types its errors
//! report (states, a budget verdict), and none of those modules imports from here, so
//! `action`, `error`, `event`, `job`, `ledger` and `store` form no cycle (checked by a test
//! below). [`ParseEnumError`] lives with the `string_enum!` macro in `action` for that reason.

use uuid::Uuid;

use crate::action::ActionState;
pub use crate::action::ParseEnumError;
use crate::job::JobState;
use crate::ledger::{BudgetDecision, ReservationState};

/// Errors a store reports. Backends map their own errors into `Backend` / `Corrupt`.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Optimistic concurrency: the row's version was not the one expected (or an insert found
    /// the row already there). Nothing in the batch was applied.
    #[error("{entity} {id} was modified concurrently")]
    Conflict {
        /// `job`, `action` or `reservation`.
        entity: &'static str,
        /// Row id.
        id: String,
    },
    /// A job with this idempotency key already exists in the tenant. Nothing was applied.
    #[error("idempotency key {key:?} is already used in tenant {tenant:?}")]
    DuplicateIdempotencyKey {
        /// Tenant.
        tenant: String,
        /// Key.
        key: String,
    },
    /// A referenced row does not exist.
    #[error("{entity} {id} not found")]
    NotFound {
        /// Kind of row.
        entity: &'static str,
        /// Row id.
        id: String,
    },
    /// Stored data did not decode.
    #[error("corrupt stored data: {0}")]
    Corrupt(String),
    /// The backend failed (I/O, connection, ...).
    #[error("store backend error: {0}")]
    Backend(String),
    /// The database was busy (locked by another writer past the busy timeout). Transient:
    /// nothing was applied and the same write may be retried.
    #[error("the database is busy (locked by another writer): {0}")]
    Busy(String),
}

impl StoreError {
    /// Whether retrying the same call may succeed (the database was only busy).
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Busy(_))
    }
}

/// Errors from the kernel's managers.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// The state machine forbids this transition.
    #[error("job {job_id}: illegal transition {from} -> {to}")]
    IllegalTransition {
        /// Job.
        job_id: Uuid,
        /// Current state.
        from: JobState,
        /// Requested state.
        to: JobState,
    },
    /// No such job (in this tenant).
    #[error("job {0} not found")]
    JobNotFound(Uuid),
    /// No such action (in this tenant).
    #[error("action {0} not found")]
    ActionNotFound(Uuid),
    /// The token matches no action.
    #[error("invalid resume token")]
    InvalidToken,
    /// The action was already resolved, expired or cancelled.
    #[error("action {id} is {state}, not PENDING")]
    ActionNotPending {
        /// Action.
        id: Uuid,
        /// Its state.
        state: ActionState,
    },
    /// The action's token has expired.
    #[error("action {0} has expired")]
    ActionExpired(Uuid),
    /// An approval was presented for a different tool call than the one it is bound to.
    #[error("approval {0} is bound to a different tool call")]
    CallDigestMismatch(Uuid),
    /// The budget check refused the reservation.
    #[error("budget exceeded: {0}")]
    BudgetExceeded(BudgetDecision),
    /// No such reservation.
    #[error("reservation {0} not found")]
    ReservationNotFound(Uuid),
    /// The reservation is not in a state that allows this.
    #[error("reservation {id} is {state}")]
    ReservationState {
        /// Reservation.
        id: Uuid,
        /// Its state.
        state: ReservationState,
    },
    /// An idempotency key was reused for a different request.
    #[error(
        "idempotency key {key:?} was already used in scope {tenant:?} for a different request (job {job_id}); use a new key or repeat the same request"
    )]
    IdempotencyKeyReused {
        /// Tenant.
        tenant: String,
        /// Key.
        key: String,
        /// The job created with it.
        job_id: Uuid,
    },
    /// A request was malformed.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// Other writers kept winning the optimistic-concurrency race.
    #[error("{0} was modified concurrently too many times")]
    Contention(String),
    /// The event bus closed.
    #[error("event stream closed")]
    EventsClosed,
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Result alias for kernel operations.
pub type KernelResult<T> = Result<T, KernelError>;

#[cfg(test)]
mod tests {
    /// The domain modules' `crate::` imports (outside their tests) form no cycle: `error` is the
    /// bottom of the graph, so adding an import that closes a loop fails here, not in a review.
    #[test]
    fn domain_modules_import_no_cycle() {
        let sources = [
            ("action", include_str!("action.rs")),
            ("error", include_str!("error.rs")),
            ("event", include_str!("event.rs")),
            ("job", include_str!("job.rs")),
            ("ledger", include_str!("ledger.rs")),
            ("store", include_str!("store.rs")),
        ];
        let imports = |own: &str, source: &str| -> Vec<&'static str> {
            let code = source.split("#[cfg(test)]").next().unwrap_or_default();
            let code: String = code
                .lines()
                .filter(|l| !l.trim_start().starts_with("//"))
                .collect::<Vec<_>>()
                .join("\n");
            sources
                .iter()
                .map(|(name, _)| *name)
                .filter(|name| *name != own && code.contains(&format!("crate::{name}::")))
                .collect()
        };
        let edges: Vec<(&str, Vec<&str>)> = sources.iter().map(|(name, src)| (*name, imports(name, src))).collect();
        // Depth-first search for a path back to the start from each module.
        for (start, _) in &edges {
            let mut stack: Vec<&str> = vec![start];
            let mut seen = std::collections::HashSet::new();
            while let Some(module) = stack.pop() {
                let targets = &edges.iter().find(|(n, _)| *n == module).expect("known module").1;
                for target in targets {
                    assert_ne!(target, start, "import cycle through `{start}` (via `{module}`)");
                    if seen.insert(*target) {
                        stack.push(target);
                    }
                }
            }
        }
        assert!(
            edges.iter().any(|(n, to)| *n == "error" && to.contains(&"job")),
            "the parser sees imports"
        );
    }
}
