//! The policy engine: may this tool call or model call go ahead?
//!
//! A [`Policy`] is a list of ordered rules loaded from TOML (schema: `docs/policy.md`, example:
//! `examples/policies/default.toml`):
//!
//! - **tool rules** (`[[tool]]`): tool-name globs, optional scope/principal globs and argument
//!   conditions (`[tool.when]`). The first matching rule decides.
//! - **model rules** (`[[model]]`): model-name globs, scope/principal globs, an optional per-request
//!   `max_tokens`. The first matching rule decides.
//! - **constraints** (`[[constraint]]`): per-request token/cost limits, tool calls per turn, turns.
//!   Every constraint in scope applies.
//!
//! The outcome is the most severe of the first matching rule (or the file's `default` when none
//! matches) and every violated constraint: DENY > REQUIRE_APPROVAL > WARN > ALLOW. A
//! REQUIRE_APPROVAL coming from a tool rule becomes ALLOW when the exact call (tool + canonical
//! arguments) was approved for the session of the request's scope ([`SessionApprovalStore`],
//! keyed by [`SessionKey`]: session names are the client's, so unique only within a scope); a session approval never
//! lifts a constraint.
//!
//! Patterns are compiled at load time; a check does not compile or parse anything (p50 well under
//! a microsecond, see `benches/policy.rs`).

mod file;
mod rules;
mod session;
#[cfg(test)]
mod tests;

use std::fmt;

pub use file::PolicyError;
pub use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use serde_json::Value;
pub use session::{SessionApprovalStore, SessionApprovals, SessionKey};

use crate::canonical::call_digest;
use rules::{ConstraintRule, ModelRule, RuleMeta, ToolRule};

/// The rule name reported in `applied_rules` when no tool/model rule matched.
pub const DEFAULT_RULE: &str = "default";
/// The rule name reported in `applied_rules` when a session approval turned REQUIRE_APPROVAL into ALLOW.
pub const SESSION_APPROVAL_RULE: &str = "session-approval";

/// What a policy decides. Ordered by severity: `Allow < Warn < RequireApproval < Deny`.
///
/// Serialized as `ALLOW`, `WARN`, `REQUIRE_APPROVAL`, `DENY`; written in policy files as `allow`,
/// `warn`, `require_approval`, `deny`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Outcome {
    /// Go ahead.
    Allow,
    /// Go ahead, but record/show the reason.
    Warn,
    /// Ask a human first.
    RequireApproval,
    /// Refuse.
    Deny,
}

impl Outcome {
    /// Whether the call may proceed without a human (ALLOW or WARN).
    pub fn is_permitted(self) -> bool {
        matches!(self, Outcome::Allow | Outcome::Warn)
    }

    /// `ALLOW`, `WARN`, `REQUIRE_APPROVAL` or `DENY`.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Allow => "ALLOW",
            Outcome::Warn => "WARN",
            Outcome::RequireApproval => "REQUIRE_APPROVAL",
            Outcome::Deny => "DENY",
        }
    }

    fn verb(self) -> &'static str {
        match self {
            Outcome::Allow => "allowed",
            Outcome::Warn => "allowed with a warning",
            Outcome::RequireApproval => "requires approval",
            Outcome::Deny => "denied",
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// What happens to a tool or model request no rule matches (`default = "deny" | "allow"` at the
/// top of the file). Deny unless the file says otherwise.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DefaultMode {
    /// Unmatched requests are denied.
    #[default]
    Deny,
    /// Unmatched requests are allowed.
    Allow,
}

/// One request to check. Borrowed, so building one costs nothing.
#[derive(Debug, Clone)]
pub enum PolicyRequest<'a> {
    /// A tool call.
    Tool {
        /// `plugin/tool`.
        tool: &'a str,
        /// The call's JSON arguments.
        arguments: &'a Value,
        /// Scope (tenant).
        scope: &'a str,
        /// Who is asking (user or service).
        principal: &'a str,
        /// Session id, used for session approvals (within `scope`); `None` disables them.
        session: Option<&'a str>,
        /// Tool calls already made in this turn, not counting this one.
        tool_calls_this_turn: u32,
        /// 1-based number of the current turn.
        turn: u32,
    },
    /// A model (completion) call.
    Model {
        /// Model name, e.g. `openai/gpt-4o-mini`.
        model: &'a str,
        /// Scope (tenant).
        scope: &'a str,
        /// Who is asking.
        principal: &'a str,
        /// The request's `max_tokens`.
        max_tokens: u64,
        /// Estimated cost of the request.
        estimated_cost: Decimal,
        /// 1-based number of the current turn.
        turn: u32,
    },
}

/// The policy's answer, with why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyDecision {
    /// The final outcome.
    pub outcome: Outcome,
    /// Why, in one or more sentences (`; `-separated when several rules share the outcome).
    pub reason: String,
    /// Every rule that matched and was evaluated, in evaluation order: the deciding tool/model rule
    /// (or `default`), `session-approval` if one applied, then the constraints in scope.
    pub applied_rules: Vec<String>,
    /// The rules that pushed the outcome away from ALLOW: a matching deny/require-approval/warn
    /// rule, `default` under default deny, an exceeded model `max_tokens`, a violated constraint.
    pub violated_rules: Vec<String>,
}

/// A summary of a loaded policy (for `keel policy check`).
#[derive(Debug, Clone, Serialize)]
pub struct PolicySummary {
    /// The default mode.
    pub default: DefaultMode,
    /// Every rule, in file order within each kind.
    pub rules: Vec<RuleSummary>,
}

/// One rule in a [`PolicySummary`].
#[derive(Debug, Clone, Serialize)]
pub struct RuleSummary {
    /// `tool`, `model` or `constraint`.
    pub kind: &'static str,
    /// The rule's name.
    pub name: String,
    /// 1-based line of the rule's `name` in the file.
    pub line: usize,
    /// The rule's decision (for constraints: the outcome on violation).
    pub decision: Outcome,
}

/// A policy text's identity: its hex sha256, recorded as `PolicyRef::version` and the key it is
/// stored under ([`PolicyText`]).
pub fn text_digest(text: &str) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(text.as_bytes()))
}

/// A policy's text, stored once under its sha256 ([`crate::store::KernelStore::policy_text`]): a job records
/// its policy as a name and that digest, not a copy of the text per job. A stored text is never
/// changed or removed (its key is its content), so any host that runs the job reads the same
/// rules. Built only by hashing the text, so a store never receives a key that is not the
/// digest of its text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyText {
    sha256: String,
    text: String,
}

impl PolicyText {
    /// `text` under its sha256.
    pub fn new(text: String) -> Self {
        Self {
            sha256: text_digest(&text),
            text,
        }
    }

    /// `text` under `sha256`, which the caller has just checked is its digest.
    pub(crate) fn checked(sha256: String, text: String) -> Self {
        Self { sha256, text }
    }

    /// Hex sha256 of the text: its key.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    /// The policy (TOML).
    pub fn text(&self) -> &str {
        &self.text
    }
}

/// A loaded, compiled policy. Cheap to share (`Arc<Policy>`); immutable once loaded.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    default: DefaultMode,
    tool_rules: Vec<ToolRule>,
    model_rules: Vec<ModelRule>,
    constraints: Vec<ConstraintRule>,
}

impl Policy {
    /// Parse policy TOML; `origin` labels error messages (a path, or e.g. `<inline>`). The kernel
    /// reads no files: a front end reads the policy file (bounded, see `keel_app::files`).
    pub fn from_toml_str(text: &str, origin: &str) -> Result<Self, PolicyError> {
        file::parse(text, origin)
    }

    /// A policy with no rules that allows everything (development only).
    pub fn allow_all() -> Self {
        Self {
            default: DefaultMode::Allow,
            ..Self::default()
        }
    }

    /// The default mode.
    pub fn default_mode(&self) -> DefaultMode {
        self.default
    }

    /// A summary of the rules, for display.
    pub fn summary(&self) -> PolicySummary {
        let row = |kind, m: &RuleMeta, decision| RuleSummary {
            kind,
            name: m.name.clone(),
            line: m.line,
            decision,
        };
        let rules = self
            .tool_rules
            .iter()
            .map(|r| row("tool", &r.meta, r.decision))
            .chain(self.model_rules.iter().map(|r| row("model", &r.meta, r.decision)))
            .chain(
                self.constraints
                    .iter()
                    .map(|r| row("constraint", &r.meta, r.on_violation)),
            )
            .collect();
        PolicySummary {
            default: self.default,
            rules,
        }
    }

    /// Decide `request` without session approvals.
    pub fn evaluate(&self, request: &PolicyRequest<'_>) -> PolicyDecision {
        self.evaluate_inner(request, None)
    }

    /// Decide `request`, letting session approvals in `approvals` turn a tool rule's
    /// REQUIRE_APPROVAL into ALLOW.
    pub fn evaluate_with(&self, request: &PolicyRequest<'_>, approvals: &dyn SessionApprovalStore) -> PolicyDecision {
        self.evaluate_inner(request, Some(approvals))
    }

    /// Decide a tool call whose tool is also known as `stands_for` (an alias's real name, see
    /// [`crate::tool::ToolDescriptor::stands_for`]): a rule written for either name applies; when
    /// rules match both, the more severe decision wins. Only when no rule matches either name does
    /// the default decide.
    pub fn evaluate_tool_with(
        &self,
        request: &PolicyRequest<'_>,
        stands_for: Option<&str>,
        approvals: &dyn SessionApprovalStore,
    ) -> PolicyDecision {
        let decision = self.evaluate_with(request, approvals);
        let (
            Some(other),
            PolicyRequest::Tool {
                arguments,
                scope,
                principal,
                session,
                tool_calls_this_turn,
                turn,
                ..
            },
        ) = (stands_for, request)
        else {
            return decision;
        };
        let as_other = self.evaluate_with(
            &PolicyRequest::Tool {
                tool: other,
                arguments,
                scope,
                principal,
                session: *session,
                tool_calls_this_turn: *tool_calls_this_turn,
                turn: *turn,
            },
            approvals,
        );
        let by_rule = |d: &PolicyDecision| !d.applied_rules.iter().any(|r| r == DEFAULT_RULE);
        match (by_rule(&decision), by_rule(&as_other)) {
            (false, true) => as_other,
            (true, true) => {
                // A session approval of this very call (under the name it was made by) answers
                // the other name's REQUIRE_APPROVAL too; a DENY under either name still holds.
                let session_approved = decision.applied_rules.iter().any(|r| r == SESSION_APPROVAL_RULE);
                let answered = session_approved && as_other.outcome == Outcome::RequireApproval;
                if as_other.outcome > decision.outcome && !answered {
                    as_other
                } else {
                    decision
                }
            }
            _ => decision,
        }
    }

    fn evaluate_inner(
        &self,
        request: &PolicyRequest<'_>,
        approvals: Option<&dyn SessionApprovalStore>,
    ) -> PolicyDecision {
        let mut acc = Acc::new();
        let (scope, principal, turn) = match *request {
            PolicyRequest::Tool {
                tool,
                arguments,
                scope,
                principal,
                session,
                turn,
                ..
            } => {
                match self
                    .tool_rules
                    .iter()
                    .find(|r| r.matches(tool, scope, principal, arguments))
                {
                    Some(rule) => {
                        let approved = rule.decision == Outcome::RequireApproval
                            && session.zip(approvals).is_some_and(|(s, store)| {
                                // Digest only when it can matter: it hashes the canonical arguments.
                                let key = SessionKey::new(scope, principal, s);
                                store.may_have_approvals(key, tool)
                                    && store.is_approved(key, tool, &call_digest(tool, arguments))
                            });
                        acc.applied.push(rule.meta.name.clone());
                        if approved {
                            acc.applied.push(SESSION_APPROVAL_RULE.to_owned());
                            acc.add(Outcome::Allow, || {
                                format!("approved for this session ({})", rule.reason)
                            });
                        } else {
                            acc.rule(&rule.meta.name, rule.decision, || rule.reason.clone());
                        }
                    }
                    None => self.apply_default(&mut acc, "tool", tool),
                }
                (scope, principal, turn)
            }
            PolicyRequest::Model {
                model,
                scope,
                principal,
                max_tokens,
                turn,
                ..
            } => {
                match self.model_rules.iter().find(|r| r.matches(model, scope, principal)) {
                    Some(rule) => {
                        acc.applied.push(rule.meta.name.clone());
                        acc.rule(&rule.meta.name, rule.decision, || rule.reason.clone());
                        if let Some(limit) = rule.max_tokens
                            && max_tokens > limit
                        {
                            acc.violation(&rule.meta.name, Outcome::Deny, || {
                                format!(
                                    "model rule `{}`: max_tokens {max_tokens} exceeds the limit of {limit}",
                                    rule.meta.name
                                )
                            });
                        }
                    }
                    None => self.apply_default(&mut acc, "model", model),
                }
                (scope, principal, turn)
            }
        };
        for c in &self.constraints {
            if c.meta.in_scope(scope, principal) {
                check_constraint(c, request, turn, &mut acc);
            }
        }
        acc.finish()
    }

    fn apply_default(&self, acc: &mut Acc, kind: &str, name: &str) {
        acc.applied.push(DEFAULT_RULE.to_owned());
        let outcome = match self.default {
            DefaultMode::Allow => Outcome::Allow,
            DefaultMode::Deny => Outcome::Deny,
        };
        acc.rule(DEFAULT_RULE, outcome, || {
            format!(
                "no {kind} rule matches `{name}`; default is {}",
                outcome.as_str().to_ascii_lowercase()
            )
        });
    }
}

/// Check one in-scope constraint against `request`.
fn check_constraint(c: &ConstraintRule, request: &PolicyRequest<'_>, turn: u32, acc: &mut Acc) {
    let name = &c.meta.name;
    let mut relevant = false;
    // Each limit yields at most one violation sentence; several are joined.
    let mut violations: Vec<String> = Vec::new();
    if let Some(max) = c.max_turns {
        relevant = true;
        if turn > max {
            violations.push(format!("turn {turn} exceeds max_turns {max}"));
        }
    }
    match *request {
        PolicyRequest::Tool {
            tool_calls_this_turn, ..
        } => {
            if let Some(max) = c.max_tool_calls_per_turn {
                relevant = true;
                if tool_calls_this_turn >= max {
                    violations.push(format!(
                        "this would be tool call {} of the turn; max_tool_calls_per_turn is {max}",
                        u64::from(tool_calls_this_turn) + 1
                    ));
                }
            }
        }
        PolicyRequest::Model {
            max_tokens,
            estimated_cost,
            ..
        } => {
            if let Some(max) = c.max_tokens_per_request {
                relevant = true;
                if max_tokens > max {
                    violations.push(format!("max_tokens {max_tokens} exceeds max_tokens_per_request {max}"));
                }
            }
            if let Some(max) = c.max_cost_per_request {
                relevant = true;
                if estimated_cost > max {
                    violations.push(format!(
                        "estimated cost {estimated_cost} exceeds max_cost_per_request {max}"
                    ));
                }
            }
        }
    }
    if !relevant {
        return;
    }
    acc.applied.push(name.clone());
    if !violations.is_empty() {
        acc.violation(name, c.on_violation, || {
            let what = violations.join("; ");
            match &c.meta.reason {
                Some(r) => format!("constraint `{name}`: {what} ({r})"),
                None => format!("constraint `{name}`: {what}"),
            }
        });
    }
}

/// Accumulates a decision: the most severe outcome wins, and its reasons are kept.
struct Acc {
    outcome: Outcome,
    reasons: Vec<String>,
    applied: Vec<String>,
    violated: Vec<String>,
}

impl Acc {
    fn new() -> Self {
        Self {
            outcome: Outcome::Allow,
            reasons: Vec::new(),
            applied: Vec::new(),
            violated: Vec::new(),
        }
    }

    /// A contribution of `outcome`; the reason is only built if it can appear in the result.
    fn add(&mut self, outcome: Outcome, reason: impl FnOnce() -> String) {
        if outcome > self.outcome || self.reasons.is_empty() {
            self.outcome = outcome.max(self.outcome);
            self.reasons.clear();
            self.reasons.push(reason());
        } else if outcome == self.outcome {
            self.reasons.push(reason());
        }
    }

    /// The deciding rule's outcome: a non-ALLOW outcome makes the rule a violated one.
    fn rule(&mut self, name: &str, outcome: Outcome, reason: impl FnOnce() -> String) {
        if outcome != Outcome::Allow {
            self.violated.push(name.to_owned());
        }
        self.add(outcome, reason);
    }

    /// An exceeded limit.
    fn violation(&mut self, name: &str, outcome: Outcome, reason: impl FnOnce() -> String) {
        if !self.violated.iter().any(|v| v == name) {
            self.violated.push(name.to_owned());
        }
        self.add(outcome, reason);
    }

    fn finish(mut self) -> PolicyDecision {
        let reason = if self.reasons.len() == 1 {
            self.reasons.pop().unwrap_or_default()
        } else {
            self.reasons.join("; ")
        };
        PolicyDecision {
            outcome: self.outcome,
            reason,
            applied_rules: self.applied,
            violated_rules: self.violated,
        }
    }
}
