//! Loading a policy from TOML: the file schema (serde), then semantic validation, then compilation.
//!
//! Every error carries the 1-based line and column of the offending text: toml's own errors come
//! with a byte span, and the schema wraps names and patterns in [`toml::Spanned`] so semantic
//! errors (bad glob, duplicate name, ...) can point at them too. The schema is documented in
//! `docs/policy.md`.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::ops::Range;

use rust_decimal::Decimal;
use serde::Deserialize;
use toml::Spanned;

use super::rules::{ArgPath, Condition, ConstraintRule, ModelRule, Pattern, Patterns, RuleMeta, ToolRule};
use super::{DefaultMode, Outcome, Policy};

/// Names the engine itself puts in `applied_rules`; a rule may not take them.
const RESERVED_NAMES: &[&str] = &["default", "session-approval"];

/// Why a policy could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The file could not be read (by the front end that read it: the kernel reads no files).
    #[error("{origin}: cannot read policy file: {source}")]
    Io {
        /// The path as given.
        origin: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a valid policy: bad TOML, unknown or mistyped field, or a semantic error.
    #[error("{origin}:{line}:{column}: {message}")]
    Invalid {
        /// The path (or a label such as `<string>`) the text came from.
        origin: String,
        /// 1-based line of the offending text.
        line: usize,
        /// 1-based column (in characters) of the offending text.
        column: usize,
        /// What is wrong, in one sentence.
        message: String,
    },
}

impl PolicyError {
    /// The 1-based line of an [`PolicyError::Invalid`] error.
    pub fn line(&self) -> Option<usize> {
        match self {
            PolicyError::Invalid { line, .. } => Some(*line),
            PolicyError::Io { .. } => None,
        }
    }
}

// ---- File schema ---------------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default)]
    version: Option<Spanned<u32>>,
    #[serde(default)]
    default: Option<DefaultMode>,
    #[serde(default)]
    tool: Vec<Spanned<ToolRuleFile>>,
    #[serde(default)]
    model: Vec<Spanned<ModelRuleFile>>,
    #[serde(default)]
    constraint: Vec<Spanned<ConstraintFile>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ToolRuleFile {
    name: Spanned<String>,
    tools: Spanned<Vec<Spanned<String>>>,
    #[serde(default)]
    scopes: Option<Spanned<Vec<Spanned<String>>>>,
    #[serde(default)]
    principals: Option<Spanned<Vec<Spanned<String>>>>,
    decision: Decision,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    when: BTreeMap<String, Spanned<ConditionFile>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConditionFile {
    #[serde(default)]
    glob: Option<Spanned<String>>,
    #[serde(default)]
    equals: Option<serde_json::Value>,
    #[serde(default)]
    one_of: Option<Vec<serde_json::Value>>,
    #[serde(default)]
    max_len: Option<u64>,
    #[serde(default)]
    max: Option<f64>,
    #[serde(default)]
    min: Option<f64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ModelRuleFile {
    name: Spanned<String>,
    models: Spanned<Vec<Spanned<String>>>,
    #[serde(default)]
    scopes: Option<Spanned<Vec<Spanned<String>>>>,
    #[serde(default)]
    principals: Option<Spanned<Vec<Spanned<String>>>>,
    decision: Decision,
    #[serde(default)]
    max_tokens: Option<u64>,
    #[serde(default)]
    reason: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConstraintFile {
    name: Spanned<String>,
    #[serde(default)]
    scopes: Option<Spanned<Vec<Spanned<String>>>>,
    #[serde(default)]
    principals: Option<Spanned<Vec<Spanned<String>>>>,
    #[serde(default)]
    max_tokens_per_request: Option<u64>,
    #[serde(default)]
    max_cost_per_request: Option<Spanned<CostValue>>,
    #[serde(default)]
    max_tool_calls_per_turn: Option<u32>,
    #[serde(default)]
    max_turns: Option<u32>,
    #[serde(default)]
    on_violation: Option<Spanned<Decision>>,
    #[serde(default)]
    reason: Option<String>,
}

/// A decision as written in a file (lower case, so error messages list exactly what to write).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Decision {
    Allow,
    Warn,
    RequireApproval,
    Deny,
}

impl From<Decision> for Outcome {
    fn from(d: Decision) -> Self {
        match d {
            Decision::Allow => Outcome::Allow,
            Decision::Warn => Outcome::Warn,
            Decision::RequireApproval => Outcome::RequireApproval,
            Decision::Deny => Outcome::Deny,
        }
    }
}

/// A cost written as a string (`"0.50"`, exact: recommended), an integer or a float.
struct CostValue(Decimal);

impl<'de> Deserialize<'de> for CostValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = CostValue;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a decimal amount such as \"0.50\"")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<CostValue, E> {
                s.trim()
                    .parse::<Decimal>()
                    .map(CostValue)
                    .map_err(|_| E::custom(format!("invalid decimal amount `{s}`")))
            }
            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<CostValue, E> {
                Ok(CostValue(Decimal::from(n)))
            }
            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<CostValue, E> {
                Ok(CostValue(Decimal::from(n)))
            }
            fn visit_f64<E: serde::de::Error>(self, n: f64) -> Result<CostValue, E> {
                // Via the shortest decimal representation, so 0.1 becomes 0.1 and not 0.1000000000000000055.
                self.visit_str(&n.to_string())
            }
        }
        d.deserialize_any(V)
    }
}

// ---- Loading -------------------------------------------------------------------------------------

/// Parse and compile policy TOML; `origin` labels errors (usually the file path).
pub(crate) fn parse(text: &str, origin: &str) -> Result<Policy, PolicyError> {
    let cx = Cx { text, origin };
    let file: PolicyFile = toml::from_str(text).map_err(|e| {
        let at = e.span().map_or(0, |s| s.start);
        let message = e.message().trim_end();
        if message == "invalid type: map, expected a sequence" {
            // The usual cause: `[tool]` where `[[tool]]` was meant.
            return cx.err(
                at..at,
                format!("{message}; rules are arrays of tables: write [[tool]], [[model]], [[constraint]]"),
            );
        }
        cx.err(at..at, message)
    })?;
    compile(file, &cx)
}

/// Error context: turns a byte span into `origin:line:column`.
struct Cx<'a> {
    text: &'a str,
    origin: &'a str,
}

impl Cx<'_> {
    fn err(&self, span: Range<usize>, message: impl Into<String>) -> PolicyError {
        let (line, column) = line_col(self.text, span.start);
        PolicyError::Invalid {
            origin: self.origin.to_owned(),
            line,
            column,
            message: message.into(),
        }
    }
}

/// 1-based line and column (in characters) of byte offset `at`.
pub(crate) fn line_col(text: &str, at: usize) -> (usize, usize) {
    let mut at = at.min(text.len());
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    let before = &text[..at];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, text[line_start..at].chars().count() + 1)
}

fn compile(file: PolicyFile, cx: &Cx<'_>) -> Result<Policy, PolicyError> {
    if let Some(v) = &file.version
        && *v.get_ref() != 1
    {
        return Err(cx.err(
            v.span(),
            format!("unsupported policy version {}; this Keel reads version 1", v.get_ref()),
        ));
    }
    let mut names = HashSet::new();
    let mut tool_rules = Vec::with_capacity(file.tool.len());
    for rule in file.tool {
        let rule = rule.into_inner();
        let meta = meta(cx, &mut names, rule.name, rule.scopes, rule.principals, rule.reason)?;
        let tools = patterns(cx, rule.tools, "tools", false)?;
        let mut when = Vec::with_capacity(rule.when.len());
        for (key, cond) in rule.when {
            when.push(condition(cx, &meta.name, key, cond)?);
        }
        let reason = meta
            .reason
            .clone()
            .unwrap_or_else(|| format!("tool rule `{}`: {}", meta.name, Outcome::from(rule.decision).verb()));
        tool_rules.push(ToolRule {
            meta,
            tools,
            when,
            decision: rule.decision.into(),
            reason,
        });
    }
    let mut model_rules = Vec::with_capacity(file.model.len());
    for rule in file.model {
        let rule = rule.into_inner();
        let meta = meta(cx, &mut names, rule.name, rule.scopes, rule.principals, rule.reason)?;
        let models = patterns(cx, rule.models, "models", false)?;
        let reason = meta
            .reason
            .clone()
            .unwrap_or_else(|| format!("model rule `{}`: {}", meta.name, Outcome::from(rule.decision).verb()));
        model_rules.push(ModelRule {
            meta,
            models,
            decision: rule.decision.into(),
            max_tokens: rule.max_tokens,
            reason,
        });
    }
    let mut constraints = Vec::with_capacity(file.constraint.len());
    for rule in file.constraint {
        let span = rule.span();
        let rule = rule.into_inner();
        let meta = meta(cx, &mut names, rule.name, rule.scopes, rule.principals, rule.reason)?;
        if rule.max_tokens_per_request.is_none()
            && rule.max_cost_per_request.is_none()
            && rule.max_tool_calls_per_turn.is_none()
            && rule.max_turns.is_none()
        {
            return Err(cx.err(
                span,
                format!(
                    "constraint `{}` sets no limit; set at least one of max_tokens_per_request, \
                     max_cost_per_request, max_tool_calls_per_turn, max_turns",
                    meta.name
                ),
            ));
        }
        let on_violation = match rule.on_violation {
            None => Outcome::Deny,
            Some(o) if *o.get_ref() == Decision::Allow => {
                return Err(cx.err(
                    o.span(),
                    format!(
                        "constraint `{}`: on_violation must be deny, require_approval or warn",
                        meta.name
                    ),
                ));
            }
            Some(o) => o.into_inner().into(),
        };
        let max_cost_per_request = match rule.max_cost_per_request {
            Some(c) if c.get_ref().0.is_sign_negative() => {
                return Err(cx.err(c.span(), "max_cost_per_request must not be negative"));
            }
            c => c.map(|c| c.into_inner().0),
        };
        constraints.push(ConstraintRule {
            meta,
            max_tokens_per_request: rule.max_tokens_per_request,
            max_cost_per_request,
            max_tool_calls_per_turn: rule.max_tool_calls_per_turn,
            max_turns: rule.max_turns,
            on_violation,
        });
    }
    Ok(Policy {
        default: file.default.unwrap_or_default(),
        tool_rules,
        model_rules,
        constraints,
    })
}

/// Validate the name (non-empty, unique, not reserved) and compile the scope/principal filters.
fn meta(
    cx: &Cx<'_>,
    names: &mut HashSet<String>,
    name: Spanned<String>,
    scopes: Option<Spanned<Vec<Spanned<String>>>>,
    principals: Option<Spanned<Vec<Spanned<String>>>>,
    reason: Option<String>,
) -> Result<RuleMeta, PolicyError> {
    let span = name.span();
    let name = name.into_inner();
    if name.trim().is_empty() {
        return Err(cx.err(span, "rule name must not be empty"));
    }
    if RESERVED_NAMES.contains(&name.as_str()) {
        return Err(cx.err(span, format!("rule name `{name}` is reserved")));
    }
    if !names.insert(name.clone()) {
        return Err(cx.err(span, format!("duplicate rule name `{name}`")));
    }
    let scopes = scopes.map(|s| patterns(cx, s, "scopes", false)).transpose()?;
    let principals = principals.map(|p| patterns(cx, p, "principals", false)).transpose()?;
    Ok(RuleMeta {
        name,
        line: line_col(cx.text, span.start).0,
        scopes,
        principals,
        reason,
    })
}

fn patterns(
    cx: &Cx<'_>,
    list: Spanned<Vec<Spanned<String>>>,
    field: &str,
    paths: bool,
) -> Result<Patterns, PolicyError> {
    let span = list.span();
    let list = list.into_inner();
    if list.is_empty() {
        return Err(cx.err(span, format!("`{field}` must list at least one pattern")));
    }
    list.into_iter()
        .map(|p| pattern(cx, p, paths))
        .collect::<Result<_, _>>()
        .map(Patterns)
}

fn pattern(cx: &Cx<'_>, p: Spanned<String>, paths: bool) -> Result<Pattern, PolicyError> {
    if p.get_ref().is_empty() {
        return Err(cx.err(p.span(), "empty pattern"));
    }
    if p.get_ref().trim() != p.get_ref() {
        // ` fs/read` never matches a tool name: a deny rule written so would be dead.
        return Err(cx.err(
            p.span(),
            format!("pattern {:?} has leading or trailing whitespace", p.get_ref()),
        ));
    }
    Pattern::compile(p.get_ref(), paths)
        .map_err(|e| cx.err(p.span(), format!("invalid pattern `{}`: {}", p.get_ref(), e.kind())))
}

fn condition(cx: &Cx<'_>, rule: &str, key: String, cond: Spanned<ConditionFile>) -> Result<Condition, PolicyError> {
    let span = cond.span();
    let c = cond.into_inner();
    if c.glob.is_none()
        && c.equals.is_none()
        && c.one_of.is_none()
        && c.max_len.is_none()
        && c.max.is_none()
        && c.min.is_none()
    {
        return Err(cx.err(
            span,
            format!(
                "rule `{rule}`: condition on `{key}` has no test; use glob, equals, one_of, \
                 max_len, max or min"
            ),
        ));
    }
    // Values that would quietly change what the rule means: it could never hold, or bound nothing.
    let refuse = |why: String| Err(cx.err(span.clone(), format!("rule `{rule}`: condition on `{key}`: {why}")));
    for (name, bound) in [("max", c.max), ("min", c.min)] {
        if bound.is_some_and(|b| !b.is_finite()) {
            return refuse(format!("`{name}` is not a finite number"));
        }
    }
    if let (Some(min), Some(max)) = (c.min, c.max)
        && min > max
    {
        return refuse(format!("`min` ({min}) is above `max` ({max}): it could never hold"));
    }
    // TOML has no null: a null here was a `nan` or `inf`, which JSON cannot hold.
    if c.equals.as_ref().is_some_and(has_null) || c.one_of.as_ref().is_some_and(|set| set.iter().any(has_null)) {
        return refuse("a value in `equals` or `one_of` is not a finite number".into());
    }
    if key.starts_with('/') && !valid_pointer(&key) {
        return refuse("invalid JSON pointer: `~` must be followed by 0 or 1 (RFC 6901)".into());
    }
    let path = if key.starts_with('/') {
        ArgPath::Pointer(key)
    } else if key.is_empty() {
        return Err(cx.err(span, format!("rule `{rule}`: empty argument name in `when`")));
    } else {
        ArgPath::Key(key)
    };
    let glob = c.glob.map(|g| pattern(cx, g, true)).transpose()?;
    Ok(Condition {
        path,
        glob,
        equals: c.equals,
        one_of: c.one_of,
        max_len: c.max_len,
        max: c.max,
        min: c.min,
    })
}

/// Whether `v` holds a null anywhere.
fn has_null(v: &serde_json::Value) -> bool {
    use serde_json::Value;
    match v {
        Value::Null => true,
        Value::Array(items) => items.iter().any(has_null),
        Value::Object(map) => map.values().any(has_null),
        _ => false,
    }
}

/// Whether every `~` in `pointer` starts an RFC 6901 escape (`~0` or `~1`).
fn valid_pointer(pointer: &str) -> bool {
    let mut chars = pointer.chars();
    while let Some(c) = chars.next() {
        if c == '~' && !matches!(chars.next(), Some('0' | '1')) {
            return false;
        }
    }
    true
}
