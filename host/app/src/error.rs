//! Errors of the use cases: one clear sentence and a kind that decides a front end's answer
//! (exit code, HTTP status, MCP error).

/// How a command failed, which decides the exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The tool or plugin failed (exit 1).
    Plugin,
    /// The user asked for something impossible (exit 2).
    User,
    /// Keel itself failed (exit 3).
    Internal,
    /// The thing asked for does not exist in the caller's scope (exit 2; HTTP 404). Another
    /// scope's job or action is reported exactly like a missing one.
    NotFound,
    /// The caller's role does not allow this use case (exit 2; HTTP 403).
    Forbidden,
}

/// A failed use case.
#[derive(Debug)]
pub struct AppError {
    /// Which kind of failure.
    pub kind: ErrorKind,
    /// One sentence.
    pub message: String,
    /// A stable name of the refusal, when the kernel gave one (`action_not_pending`,
    /// `action_expired`, `illegal_transition`, `idempotency_key_reused`, `budget_exceeded`): the
    /// HTTP API's error `code` and status come from it.
    pub code: Option<&'static str>,
}

impl AppError {
    /// A user error (exit 2).
    pub fn user(message: impl Into<String>) -> Self {
        Self {
            kind: ErrorKind::User,
            message: message.into(),
            code: None,
        }
    }

    /// A plugin failure (exit 1).
    pub fn plugin(message: impl Into<String>) -> Self {
        Self {
            kind: ErrorKind::Plugin,
            message: message.into(),
            code: None,
        }
    }

    /// An internal failure (exit 3).
    pub fn internal(message: impl Into<String>) -> Self {
        Self {
            kind: ErrorKind::Internal,
            message: message.into(),
            code: None,
        }
    }

    /// Nothing by that name or id in the caller's scope.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self {
            kind: ErrorKind::NotFound,
            message: message.into(),
            code: None,
        }
    }

    /// The caller's role is not enough.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self {
            kind: ErrorKind::Forbidden,
            message: message.into(),
            code: None,
        }
    }

    /// The same error with a stable `code`.
    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self.kind {
            ErrorKind::Plugin => 1,
            ErrorKind::User | ErrorKind::NotFound | ErrorKind::Forbidden => 2,
            ErrorKind::Internal => 3,
        }
    }
}

impl From<keel_store::StoreError> for AppError {
    fn from(error: keel_store::StoreError) -> Self {
        match error {
            keel_store::StoreError::NotFound(what) => AppError::not_found(format!("{what} not found")),
            other => AppError::internal(other.to_string()),
        }
    }
}

/// The kernel's store errors (the plugin registry reports these): a missing row is the user's
/// mistake, anything else is Keel's.
impl From<keel_kernel::store::StoreError> for AppError {
    fn from(error: keel_kernel::store::StoreError) -> Self {
        match error {
            keel_kernel::store::StoreError::NotFound { .. } => AppError::not_found(error.to_string()),
            other => AppError::internal(other.to_string()),
        }
    }
}

impl From<keel_sandbox::SandboxError> for AppError {
    fn from(error: keel_sandbox::SandboxError) -> Self {
        use keel_sandbox::SandboxError as E;
        match error {
            E::Host(_) => AppError::internal(error.to_string()),
            E::Describe(_) => AppError::plugin(error.to_string()),
            _ => AppError::user(error.to_string()),
        }
    }
}

impl From<keel_sandbox::GrantError> for AppError {
    fn from(error: keel_sandbox::GrantError) -> Self {
        AppError::user(error.to_string())
    }
}

impl From<keel_kernel::KernelError> for AppError {
    fn from(error: keel_kernel::KernelError) -> Self {
        use keel_kernel::KernelError as E;
        match error {
            // Not in the caller's scope (or nowhere): the same answer either way.
            E::JobNotFound(_) | E::ActionNotFound(_) | E::InvalidToken => AppError::not_found(error.to_string()),
            // The caller named something that cannot take this step.
            E::ActionNotPending { .. } => AppError::user(error.to_string()).with_code("action_not_pending"),
            E::ActionExpired(_) => AppError::user(error.to_string()).with_code("action_expired"),
            E::IdempotencyKeyReused { .. } => AppError::user(error.to_string()).with_code("idempotency_key_reused"),
            E::IllegalTransition { .. } | E::ReservationState { .. } => {
                AppError::user(error.to_string()).with_code("illegal_transition")
            }
            E::CallDigestMismatch(_) | E::ReservationNotFound(_) | E::Invalid(_) => AppError::user(error.to_string()),
            // A budget refusal is a policy failure, like a denied tool call.
            E::BudgetExceeded(_) => AppError::plugin(error.to_string()).with_code("budget_exceeded"),
            E::Contention(_) | E::EventsClosed | E::Store(_) => AppError::internal(error.to_string()),
        }
    }
}
