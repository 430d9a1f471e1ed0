//! Kernel error types.

use uuid::Uuid;

use crate::action::ActionState;
use crate::job::JobState;
use crate::ledger::{BudgetDecision, ReservationState};
use crate::store::StoreError;

/// A stored string that names no known enum value.
#[derive(Debug, Clone, thiserror::Error)]
#[error("unknown {kind} {value:?}")]
pub struct ParseEnumError {
    /// Which enum.
    pub kind: &'static str,
    /// The offending string.
    pub value: String,
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
