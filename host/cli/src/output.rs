//! Errors and exit codes at the CLI edge: one clear sentence, no backtraces.

use std::process::ExitCode;

/// How a command failed, which decides the exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The tool or plugin failed (exit 1).
    Plugin,
    /// The user asked for something impossible (exit 2).
    User,
    /// Keel itself failed (exit 3).
    Internal,
}

/// A failed command.
#[derive(Debug)]
pub struct CliError {
    /// Which kind of failure.
    pub kind: ErrorKind,
    /// One sentence.
    pub message: String,
}

impl CliError {
    /// A user error (exit 2).
    pub fn user(message: impl Into<String>) -> Self {
        Self {
            kind: ErrorKind::User,
            message: message.into(),
        }
    }

    /// A plugin failure (exit 1).
    pub fn plugin(message: impl Into<String>) -> Self {
        Self {
            kind: ErrorKind::Plugin,
            message: message.into(),
        }
    }

    /// An internal failure (exit 3).
    pub fn internal(message: impl Into<String>) -> Self {
        Self {
            kind: ErrorKind::Internal,
            message: message.into(),
        }
    }

    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self.kind {
            ErrorKind::Plugin => 1,
            ErrorKind::User => 2,
            ErrorKind::Internal => 3,
        }
    }

    /// Print to stderr and return the exit code.
    pub fn report(self) -> ExitCode {
        eprintln!("error: {}", self.message);
        ExitCode::from(self.exit_code())
    }
}

impl From<keel_store::StoreError> for CliError {
    fn from(error: keel_store::StoreError) -> Self {
        match error {
            keel_store::StoreError::NotFound(what) => CliError::user(format!("{what} not found")),
            other => CliError::internal(other.to_string()),
        }
    }
}

impl From<keel_sandbox::SandboxError> for CliError {
    fn from(error: keel_sandbox::SandboxError) -> Self {
        use keel_sandbox::SandboxError as E;
        match error {
            E::Host(_) => CliError::internal(error.to_string()),
            E::Describe(_) => CliError::plugin(error.to_string()),
            _ => CliError::user(error.to_string()),
        }
    }
}

impl From<keel_sandbox::GrantError> for CliError {
    fn from(error: keel_sandbox::GrantError) -> Self {
        CliError::user(error.to_string())
    }
}

/// Print `value` as pretty JSON on stdout.
pub fn print_json(value: &impl serde::Serialize) {
    println!("{}", serde_json::to_string_pretty(value).expect("CLI values serialize"));
}

/// Result of a command.
pub type CliResult = Result<ExitCode, CliError>;
