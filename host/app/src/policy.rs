//! Policy files: load, check (a summary of the rules, or the error with its line), and dry-run a
//! decision for one tool or model call. The engine is `keel_kernel::policy`.

use std::path::{Path, PathBuf};

use keel_kernel::policy::{
    Decimal, Policy, PolicyDecision, PolicyError, PolicyRequest, PolicySummary, SessionApprovalStore, SessionApprovals,
    SessionKey,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::error::AppError;

/// Read and compile the policy file at `file`: a regular file of at most
/// [`MAX_POLICY_BYTES`](crate::files::MAX_POLICY_BYTES) (a FIFO or device is refused at once).
fn read_policy(file: &Path) -> Result<Policy, PolicyError> {
    let origin = file.display().to_string();
    let text =
        crate::files::read_regular_text(file, crate::files::MAX_POLICY_BYTES).map_err(|source| PolicyError::Io {
            origin: origin.clone(),
            source,
        })?;
    Policy::from_toml_str(&text, &origin)
}

/// Load a policy file; a missing one is explained.
pub fn load_policy(file: &Path) -> Result<Policy, AppError> {
    read_policy(file).map_err(|e| match e {
        PolicyError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => AppError::user(format!(
            "no policy file at {}; pass --file or create it (see examples/policies/default.toml)",
            file.display()
        )),
        other => AppError::user(other.to_string()),
    })
}

/// What checking a policy file found.
#[derive(Debug)]
pub enum PolicyCheck {
    /// The file is a valid policy.
    Valid {
        /// The file.
        file: PathBuf,
        /// Its rules.
        summary: PolicySummary,
    },
    /// It is not (or cannot be read).
    Invalid {
        /// The file.
        file: PathBuf,
        /// Why, with the line and column when the text is at fault.
        error: PolicyError,
    },
}

impl PolicyCheck {
    /// The check as JSON: the summary with `"valid": true`, or `{"valid": false, "line",
    /// "column", "message", "error"}`.
    pub fn to_json(&self) -> Value {
        match self {
            PolicyCheck::Valid { file, summary } => {
                let mut value = serde_json::to_value(summary).expect("summary serializes");
                value["valid"] = json!(true);
                value["file"] = json!(file.display().to_string());
                value
            }
            PolicyCheck::Invalid { file, error } => error_json(file, error),
        }
    }
}

/// Check a policy file.
pub fn check_policy(file: &Path) -> PolicyCheck {
    match read_policy(file) {
        Ok(policy) => PolicyCheck::Valid {
            file: file.to_path_buf(),
            summary: policy.summary(),
        },
        Err(error) => PolicyCheck::Invalid {
            file: file.to_path_buf(),
            error,
        },
    }
}

fn error_json(file: &Path, error: &PolicyError) -> Value {
    match error {
        PolicyError::Invalid {
            line, column, message, ..
        } => json!({
            "valid": false,
            "file": file.display().to_string(),
            "line": line,
            "column": column,
            "message": message,
            "error": error.to_string(),
        }),
        PolicyError::Io { .. } => json!({
            "valid": false,
            "file": file.display().to_string(),
            "error": error.to_string(),
        }),
    }
}

/// The call a dry run decides on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum DryRunTarget {
    /// A tool call.
    Tool {
        /// `plugin/tool`.
        tool: String,
        /// The arguments object.
        #[serde(default)]
        arguments: Value,
        /// Treat this exact call as already approved for the session.
        #[serde(default)]
        session_approved: bool,
    },
    /// A model call.
    Model {
        /// The model name.
        model: String,
        /// Its max_tokens.
        #[serde(default)]
        max_tokens: u64,
        /// Its estimated cost.
        #[serde(default)]
        cost: Decimal,
    },
}

/// A policy decision to dry-run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DryRunRequest {
    /// The call.
    pub target: DryRunTarget,
    /// Scope (tenant) of the call.
    pub scope: String,
    /// Principal of the call.
    pub principal: String,
    /// Session (session approvals are keyed by it).
    #[serde(default)]
    pub session: Option<String>,
    /// Tool calls already made in this turn.
    #[serde(default)]
    pub tool_calls_this_turn: u32,
    /// 1-based turn number.
    #[serde(default = "first_turn")]
    pub turn: u32,
}

fn first_turn() -> u32 {
    1
}

/// What the policy decided, and why.
#[derive(Debug, Clone)]
pub struct DryRun {
    /// The tool or model name.
    pub target: String,
    /// The policy file.
    pub file: PathBuf,
    /// The decision with the rules applied and violated.
    pub decision: PolicyDecision,
}

impl DryRun {
    /// The decision as JSON, with `target` and `file`.
    pub fn to_json(&self) -> Value {
        let mut value = serde_json::to_value(&self.decision).expect("decision serializes");
        value["target"] = json!(self.target);
        value["file"] = json!(self.file.display().to_string());
        value
    }

    /// True when the call may proceed on its own (ALLOW, WARN).
    pub fn permitted(&self) -> bool {
        self.decision.outcome.is_permitted()
    }
}

/// Dry-run `request` against the policy in `file`: no job, no ledger, nothing recorded.
pub fn dry_run(file: &Path, request: &DryRunRequest) -> Result<DryRun, AppError> {
    let policy = load_policy(file)?;
    let approvals = SessionApprovals::new();
    let (target, decision) = match &request.target {
        DryRunTarget::Tool {
            tool,
            arguments,
            session_approved,
        } => {
            let arguments = if arguments.is_null() {
                json!({})
            } else {
                arguments.clone()
            };
            if *session_approved && let Some(session) = &request.session {
                approvals.approve_call(
                    SessionKey::new(&request.scope, &request.principal, session),
                    tool,
                    &arguments,
                );
            }
            let stands_for = tool
                .split_once('/')
                .and_then(|(plugin, name)| crate::tools::alias_target(plugin, name))
                .map(|(plugin, name)| format!("{plugin}/{name}"));
            let decision = policy.evaluate_tool_with(
                &PolicyRequest::Tool {
                    tool,
                    arguments: &arguments,
                    scope: &request.scope,
                    principal: &request.principal,
                    session: request.session.as_deref(),
                    tool_calls_this_turn: request.tool_calls_this_turn,
                    turn: request.turn,
                },
                stands_for.as_deref(),
                &approvals,
            );
            (tool.clone(), decision)
        }
        DryRunTarget::Model {
            model,
            max_tokens,
            cost,
        } => {
            let decision = policy.evaluate(&PolicyRequest::Model {
                model,
                scope: &request.scope,
                principal: &request.principal,
                max_tokens: *max_tokens,
                estimated_cost: *cost,
                turn: request.turn,
            });
            (model.clone(), decision)
        }
    };
    Ok(DryRun {
        target,
        file: file.to_path_buf(),
        decision,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_json_has_line() {
        let err = Policy::from_toml_str("x = 1\n", "p.toml").unwrap_err();
        let v = error_json(Path::new("p.toml"), &err);
        assert_eq!(v["valid"], false);
        assert_eq!(v["line"], 1);
    }

    #[test]
    fn a_missing_file_is_an_io_error_naming_it() {
        let err = read_policy(Path::new("/nonexistent/policy.toml")).unwrap_err();
        assert!(matches!(err, PolicyError::Io { .. }));
        assert!(
            err.to_string()
                .starts_with("/nonexistent/policy.toml: cannot read policy file"),
            "{err}"
        );
        let err = load_policy(Path::new("/nonexistent/policy.toml")).unwrap_err();
        assert!(
            err.message.starts_with("no policy file at /nonexistent/policy.toml"),
            "{}",
            err.message
        );
    }
}
