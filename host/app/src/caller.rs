//! Who is asking: the identity every front end (CLI, HTTP API, MCP) hands to the use cases.

use serde::{Deserialize, Serialize};

use crate::error::AppError;

/// What a caller may do within its scope. Ordered: each role includes the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Read jobs, events, actions, plugins and usage.
    Read,
    /// Also create and cancel jobs, call tools, resolve actions.
    Write,
    /// Also install, grant, revoke and remove plugins, set budgets, manage keys.
    Admin,
}

impl Role {
    /// True when this role includes `needed`.
    pub fn allows(self, needed: Role) -> bool {
        self >= needed
    }
}

/// An authenticated caller: the scope (tenant) every request is confined to, on whose behalf,
/// and with which role. The CLI acts as an admin of the scope it is given; the HTTP and MCP
/// servers derive a caller from the API key (or the stdio session's configuration).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Caller {
    /// The tenant scope: a caller never reads, resolves or learns of anything outside it.
    pub scope: String,
    /// The principal recorded on jobs and ledger entries (e.g. the key's name or an MCP client).
    pub principal: Option<String>,
    /// What the caller may do in its scope.
    pub role: Role,
}

impl Caller {
    /// A local administrator of `scope` (the CLI on its own home).
    pub fn local_admin(scope: impl Into<String>) -> Self {
        Self {
            scope: scope.into(),
            principal: None,
            role: Role::Admin,
        }
    }

    /// Refuse a use case that needs more than this caller's role (deny by default: every use
    /// case names the role it needs).
    pub fn require(&self, needed: Role) -> Result<(), AppError> {
        if self.role.allows(needed) {
            Ok(())
        } else {
            Err(AppError::forbidden(format!(
                "this needs the {} role; the caller has {}",
                needed.name(),
                self.role.name()
            )))
        }
    }
}

impl Role {
    /// The role's name as written in keys and configuration.
    pub fn name(self) -> &'static str {
        match self {
            Role::Read => "read",
            Role::Write => "write",
            Role::Admin => "admin",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_include_the_lower_ones_only() {
        assert!(Role::Admin.allows(Role::Write));
        assert!(Role::Write.allows(Role::Read));
        assert!(!Role::Read.allows(Role::Write));
        assert!(!Role::Write.allows(Role::Admin));
    }
}
