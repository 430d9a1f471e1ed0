//! Actions: requests for a human (confirm, choose, input, approval, ...) that a job waits on.
//!
//! A resume token is 256 random bits handed out once; only its sha256 is stored. Tokens are
//! compared in constant time, are single-use (resolution is a compare-and-set from PENDING), and
//! expire with the action.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use uuid::Uuid;

/// A stored string that names no known enum value.
#[derive(Debug, Clone, thiserror::Error)]
#[error("unknown {kind} {value:?}")]
pub struct ParseEnumError {
    /// Which enum.
    pub kind: &'static str,
    /// The offending string.
    pub value: String,
}

macro_rules! string_enum {
    ($(#[$meta:meta])* $name:ident, $err:literal { $($(#[$vmeta:meta])* $variant:ident => $s:literal),* $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        pub enum $name {
            $($(#[$vmeta])* #[serde(rename = $s)] $variant),*
        }
        impl $name {
            /// All values.
            pub const ALL: &'static [$name] = &[$($name::$variant),*];
            /// The stored name.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $s),* }
            }
        }
        impl fmt::Display for $name {
            // `pad`, not `write_str`: tables give it a width (`{:<9}`).
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result { f.pad(self.as_str()) }
        }
        impl FromStr for $name {
            type Err = crate::action::ParseEnumError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                $name::ALL.iter().copied().find(|v| v.as_str() == s)
                    .ok_or_else(|| crate::action::ParseEnumError { kind: $err, value: s.to_string() })
            }
        }
    };
}
pub(crate) use string_enum;

string_enum! {
    /// What kind of answer the action asks for.
    ActionType, "action type" {
        /// Yes / no.
        Confirm => "confirm",
        /// Pick one of several options.
        Choose => "choose",
        /// Free-form input.
        Input => "input",
        /// Upload a file.
        Upload => "upload",
        /// Re-authenticate.
        Reauth => "reauth",
        /// Review and apply proposed changes.
        ApplyChanges => "apply_changes",
        /// Approve one exact tool call.
        Approval => "approval",
        /// Anything else.
        Custom => "custom",
    }
}

string_enum! {
    /// Lifecycle state of an action.
    ActionState, "action state" {
        /// Waiting for a human.
        Pending => "PENDING",
        /// Answered (terminal).
        Resolved => "RESOLVED",
        /// Nobody answered in time (terminal).
        Expired => "EXPIRED",
        /// Withdrawn (terminal).
        Cancelled => "CANCELLED",
    }
}

/// The human's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Resolution {
    /// For confirm/approval: whether it was approved. Other types may leave it `None`.
    pub approved: Option<bool>,
    /// The answer (chosen option, input text, upload reference, ...).
    pub value: serde_json::Value,
    /// Who resolved it.
    pub resolved_by: Option<String>,
    /// For approvals: the digest of the call the human saw. If given, it must equal the action's.
    pub call_digest: Option<String>,
}

impl Resolution {
    /// An approval (or confirmation) of `approved`.
    pub fn approve(approved: bool) -> Self {
        Self {
            approved: Some(approved),
            value: serde_json::Value::Null,
            resolved_by: None,
            call_digest: None,
        }
    }

    /// A value answer.
    pub fn value(value: serde_json::Value) -> Self {
        Self {
            approved: None,
            value,
            resolved_by: None,
            call_digest: None,
        }
    }
}

/// An action as stored. The token itself is never stored, only its hash.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Action {
    /// Unique id.
    pub id: Uuid,
    /// Job that waits on it.
    pub job_id: Uuid,
    /// Tenant scope (the job's).
    pub tenant: String,
    /// Kind of request.
    pub action_type: ActionType,
    /// State.
    pub state: ActionState,
    /// Optimistic-concurrency version.
    pub version: u64,
    /// Short title for the human.
    pub title: String,
    /// Type-specific request payload (options, schema, diff, ...).
    pub request: serde_json::Value,
    /// For approvals: `canonical::call_digest` of the exact call approved.
    pub call_digest: Option<String>,
    /// Hex sha256 of the resume token.
    pub token_hash: String,
    /// The answer, once resolved.
    pub resolution: Option<Resolution>,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// Expiry: the token stops working and the sweeper times the job out.
    pub expires_at: DateTime<Utc>,
    /// When it left PENDING.
    pub resolved_at: Option<DateTime<Utc>>,
}

impl Action {
    /// Whether this action approves exactly `tool` called with `arguments`.
    pub fn authorizes(&self, tool: &str, arguments: &serde_json::Value) -> bool {
        let Some(digest) = &self.call_digest else {
            return false;
        };
        self.action_type == ActionType::Approval
            && self.state == ActionState::Resolved
            && self.resolution.as_ref().and_then(|r| r.approved) == Some(true)
            && ct_eq_str(digest, &crate::canonical::call_digest(tool, arguments))
    }
}

/// The tool call an approval is bound to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolCallRef {
    /// Qualified tool name, `plugin/tool`.
    pub tool: String,
    /// Arguments.
    pub arguments: serde_json::Value,
}

/// What a caller supplies to create an action.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewAction {
    /// Job that will wait on it (must be RUNNING or already WAITING_ACTION).
    pub job_id: Uuid,
    /// Kind of request.
    pub action_type: ActionType,
    /// Title.
    pub title: String,
    /// Payload.
    pub request: serde_json::Value,
    /// Required for approvals: the exact call.
    pub call: Option<ToolCallRef>,
    /// How long the token stays valid.
    pub ttl: chrono::Duration,
}

/// A freshly created action with its resume token. The token is shown once and never stored.
#[derive(Debug, Clone)]
pub struct CreatedAction {
    /// The stored action.
    pub action: Action,
    /// The resume token (64 hex chars, 256 bits).
    pub token: String,
}

/// Filters for listing actions.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ActionFilter {
    /// Tenant scope.
    pub tenant: String,
    /// Only for this job.
    pub job_id: Option<Uuid>,
    /// Only in these states (any if empty).
    pub states: Vec<ActionState>,
    /// At most this many (oldest first).
    pub limit: Option<u32>,
}

impl ActionFilter {
    /// Whether `action` passes the filter (ignores `limit`).
    pub fn matches(&self, action: &Action) -> bool {
        action.tenant == self.tenant
            && self.job_id.is_none_or(|j| action.job_id == j)
            && (self.states.is_empty() || self.states.contains(&action.state))
    }
}

/// Generate a 256-bit resume token (hex).
pub fn generate_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

/// Hex sha256 of a token, as stored.
pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Constant-time string equality (length is not secret).
pub fn ct_eq_str(a: &str, b: &str) -> bool {
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_and_hashed() {
        let a = generate_token();
        let b = generate_token();
        assert_eq!(a.len(), 64);
        assert_ne!(a, b);
        assert_eq!(hash_token(&a), hash_token(&a));
        assert_ne!(hash_token(&a), a);
        assert!(ct_eq_str(&hash_token(&a), &hash_token(&a)));
        assert!(!ct_eq_str(&hash_token(&a), &hash_token(&b)));
        for t in ActionType::ALL {
            assert_eq!(t.as_str().parse::<ActionType>().unwrap(), *t);
        }
    }
}
