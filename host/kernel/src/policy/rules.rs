//! Compiled rules: what a loaded policy file becomes.
//!
//! Everything here is built once at load time (patterns are compiled, values converted), so the check
//! path only compares: no glob compilation, no parsing, no allocation to match (except to
//! rewrite an argument path spelled with `//`, `.` or `..`, or a URL, see [`path_spelling`]).

use std::borrow::Cow;

use globset::{GlobBuilder, GlobMatcher};
use rust_decimal::Decimal;
use serde_json::Value;

use super::Outcome;

/// Characters that make a pattern a glob rather than a literal.
const GLOB_META: &[char] = &['*', '?', '[', ']', '{', '}', '\\'];

/// One compiled pattern. The common shapes (`*`, a literal, `prefix*`, `*suffix`) skip the glob
/// engine entirely: a string comparison is ~10x cheaper than a regex-backed `GlobMatcher`.
#[derive(Debug, Clone)]
pub(crate) enum Pattern {
    /// `*` or `**`: matches everything.
    Any,
    /// No metacharacters: exact string equality.
    Exact(Box<str>),
    /// `literal*`.
    Prefix(Box<str>),
    /// `*literal`.
    Suffix(Box<str>),
    /// Anything else.
    Glob(GlobMatcher),
}

impl Pattern {
    /// Compile `src`. `paths` selects path semantics (`*` stops at `/`, `**` crosses it), used for
    /// argument globs; names (tools, models, scopes, principals) use plain wildcard semantics where
    /// `*` matches any run of characters, `/` included.
    pub(crate) fn compile(src: &str, paths: bool) -> Result<Self, globset::Error> {
        // Always build the glob, even for the fast shapes, so an invalid pattern is rejected.
        let glob = GlobBuilder::new(src)
            .literal_separator(paths)
            .backslash_escape(true)
            .build()?;
        let plain = |s: &str| !s.contains(GLOB_META);
        if plain(src) {
            return Ok(Pattern::Exact(src.into()));
        }
        if !paths {
            if src == "*" || src == "**" {
                return Ok(Pattern::Any);
            }
            if let Some(prefix) = src.strip_suffix('*').filter(|p| plain(p)) {
                return Ok(Pattern::Prefix(prefix.into()));
            }
            if let Some(suffix) = src.strip_prefix('*').filter(|s| plain(s)) {
                return Ok(Pattern::Suffix(suffix.into()));
            }
        }
        Ok(Pattern::Glob(glob.compile_matcher()))
    }

    /// Whether `s` matches.
    #[inline]
    pub(crate) fn matches(&self, s: &str) -> bool {
        match self {
            Pattern::Any => true,
            Pattern::Exact(e) => **e == *s,
            Pattern::Prefix(p) => s.starts_with(&**p),
            Pattern::Suffix(x) => s.ends_with(&**x),
            Pattern::Glob(g) => g.is_match(s),
        }
    }
}

/// A list of patterns: matches when any pattern does.
#[derive(Debug, Clone)]
pub(crate) struct Patterns(pub(crate) Vec<Pattern>);

impl Patterns {
    #[inline]
    pub(crate) fn matches(&self, s: &str) -> bool {
        self.0.iter().any(|p| p.matches(s))
    }
}

/// An optional filter: `None` (the key was absent) matches everything.
#[inline]
fn filter_matches(filter: &Option<Patterns>, s: &str) -> bool {
    filter.as_ref().is_none_or(|p| p.matches(s))
}

/// Where a condition reads its value from in the call's arguments.
#[derive(Debug, Clone)]
pub(crate) enum ArgPath {
    /// A top-level key of the arguments object.
    Key(String),
    /// An RFC 6901 JSON pointer (the key started with `/`).
    Pointer(String),
}

/// One argument condition. Every check that is set must hold; a missing argument never matches.
#[derive(Debug, Clone)]
pub(crate) struct Condition {
    pub(crate) path: ArgPath,
    pub(crate) glob: Option<Pattern>,
    pub(crate) equals: Option<Value>,
    pub(crate) one_of: Option<Vec<Value>>,
    pub(crate) max_len: Option<u64>,
    pub(crate) max: Option<f64>,
    pub(crate) min: Option<f64>,
}

impl Condition {
    fn lookup<'v>(&self, args: &'v Value) -> Option<&'v Value> {
        match &self.path {
            ArgPath::Key(k) => args.get(k.as_str()),
            ArgPath::Pointer(p) => args.pointer(p),
        }
    }

    /// Whether the condition holds for `args` in a rule that `permits` (ALLOW or WARN) or not
    /// (DENY, REQUIRE_APPROVAL): a path whose `..` escapes never satisfies the glob of a
    /// permitting rule and always satisfies the glob of any other.
    pub(crate) fn holds(&self, args: &Value, permits: bool) -> bool {
        let Some(v) = self.lookup(args) else {
            return false;
        };
        if let Some(g) = &self.glob {
            let matched = v.as_str().is_some_and(|s| match path_spelling(s) {
                PathSpelling::Resolved(path) => g.matches(&path),
                // Every spelling must be allowed; any one is caught.
                PathSpelling::Several { all, .. } if permits => all.iter().all(|one| g.matches(one)),
                PathSpelling::Several { all, also_caught } => all.iter().chain(&also_caught).any(|one| g.matches(one)),
                PathSpelling::Escapes => !permits,
            });
            if !matched {
                return false;
            }
        }
        if let Some(e) = &self.equals
            && !json_eq(v, e)
        {
            return false;
        }
        if let Some(set) = &self.one_of
            && !set.iter().any(|e| json_eq(v, e))
        {
            return false;
        }
        if let Some(max_len) = self.max_len {
            let len = match v {
                Value::String(s) => s.chars().count(),
                Value::Array(a) => a.len(),
                Value::Object(o) => o.len(),
                _ => return false,
            };
            if len as u64 > max_len {
                return false;
            }
        }
        if self.max.is_some() || self.min.is_some() {
            let Some(n) = v.as_f64() else {
                return false;
            };
            if self.max.is_some_and(|m| n > m) || self.min.is_some_and(|m| n < m) {
                return false;
            }
        }
        true
    }
}

/// How a glob condition sees a string argument (see `docs/policy.md`, "Paths").
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum PathSpelling<'a> {
    /// The canonical spelling: `//` collapsed, `.` dropped, `..` resolved against the component
    /// before it (borrowed when already canonical, the usual case).
    Resolved(Cow<'a, str>),
    /// Spellings a tool may act on for one value, e.g. a URL as written and as an HTTP client
    /// sends it (a policy's own URLs may be spelled either way: `HTTPS://Host:443`), a path
    /// naming a directory with and without its trailing `/` (`key.txt/.` opens the file
    /// `key.txt`): a glob that allows must match every one in `all`, a glob that denies or asks
    /// any one, or `also_caught`: `https://host/` for `https://host` (the request goes to `/`,
    /// so `https://host/**` catches it, while an allow of `https://host` still allows it).
    Several {
        all: Vec<String>,
        also_caught: Option<String>,
    },
    /// A `..` climbs above the root (or above the start of a relative path), or a URL no parser
    /// accepts: where it lands is unknown, so no glob may allow it and every deny or
    /// require-approval glob catches it.
    Escapes,
}

/// Lexically normalise `s` as a path. Lexical on purpose: the policy cannot see symlinks (the
/// sandbox's grants are the hard boundary); what it guarantees is that two spellings of one path
/// get one decision. URLs (`scheme://...`) are spelled as a URL parser would, see [`url_spelling`].
pub(crate) fn path_spelling(s: &str) -> PathSpelling<'_> {
    if is_url(s) {
        return url_spelling(s);
    }
    // A URL behind whitespace is no URL to this parser, but one to a tool that trims first.
    let trimmed = s.trim();
    if trimmed.len() != s.len() && is_url(trimmed) {
        return PathSpelling::Escapes;
    }
    let dotted = s.split('/').any(|seg| seg == "." || seg == "..");
    if !dotted && !s.contains("//") {
        return match s.strip_suffix('/') {
            Some(file) if !file.is_empty() => PathSpelling::Several {
                all: vec![s.to_string(), file.to_string()],
                also_caught: None,
            },
            _ => PathSpelling::Resolved(Cow::Borrowed(s)),
        };
    }
    let absolute = s.starts_with('/');
    let mut kept: Vec<&str> = Vec::new();
    for seg in s.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                if kept.pop().is_none() {
                    return PathSpelling::Escapes;
                }
            }
            name => kept.push(name),
        }
    }
    // A path ending in `/`, `/.` or `/..` names a directory as `dir/`, but a tool may open
    // whatever is there, a file too: both spellings, as for the plain spelling `dir/`.
    let dir = s.ends_with('/') || s.ends_with("/.") || s.ends_with("/..");
    let mut out = String::with_capacity(s.len() + 1);
    if absolute {
        out.push('/');
    }
    out.push_str(&kept.join("/"));
    if kept.is_empty() {
        if !absolute {
            out.push('.');
        }
    } else if dir {
        let file = out.clone();
        out.push('/');
        return PathSpelling::Several {
            all: vec![out, file],
            also_caught: None,
        };
    }
    PathSpelling::Resolved(Cow::Owned(out))
}

/// The URL `s` as a WHATWG parser (browsers, `reqwest`, most HTTP stacks) spells it: scheme and
/// host lower-cased, a default port dropped, `\` read as `/` in `http(s)`, `.`/`..` and their
/// percent-encoded forms resolved (clamped at the root, as servers do), and percent-escapes of
/// unreserved characters decoded in the path (RFC 3986 §6.2.2.2: `%61dmin` is `admin` to the
/// server). A URL with an empty path is spelled both ways (`https://host` and `https://host/`):
/// the request goes to `/`, but a policy may have written either. A path with `//`, `%2F` or
/// `%5C` is also spelled as the many servers that merge slashes (nginx by default) or decode
/// those escapes before routing see it ([`served_path`]).
fn url_spelling(s: &str) -> PathSpelling<'_> {
    let Ok(mut url) = url::Url::parse(s) else {
        return PathSpelling::Escapes;
    };
    if url.path().contains('%') {
        let decoded = decode_unreserved(url.path());
        url.set_path(&decoded);
    }
    let served = served_path(url.path()).map(|path| {
        let mut served = url.clone();
        served.set_path(&path);
        String::from(served)
    });
    let mut spelled: String = url.into();
    let authority_only = s
        .split_once("://")
        .is_some_and(|(_, rest)| !rest.contains(['/', '\\', '?', '#']));
    let mut also_caught = None;
    if authority_only && spelled.ends_with('/') {
        also_caught = Some(spelled.clone());
        spelled.pop();
    }
    let mut all = Vec::with_capacity(3);
    if spelled != s {
        all.push(s.to_string());
    }
    all.push(spelled);
    all.extend(served.filter(|served| !all.contains(served)));
    match (all.as_slice(), also_caught) {
        ([one], None) if one == s => PathSpelling::Resolved(Cow::Borrowed(s)),
        (_, also_caught) => PathSpelling::Several { all, also_caught },
    }
}

/// `path` (a parsed URL's) as a server that decodes `%2F` and `%5C` and merges repeated slashes
/// before routing serves it, when that differs; the caller re-parses it, which resolves the `..`
/// such decoding may bring out (`/public/..%2Fsecret` is `/secret` there).
fn served_path(path: &str) -> Option<String> {
    if !path.contains("//") && !path.contains('%') {
        return None;
    }
    let decoded = decode_escapes(path, |b| matches!(b, b'/' | b'\\').then_some('/'));
    let mut merged = String::with_capacity(decoded.len());
    for c in decoded.chars() {
        if !(c == '/' && merged.ends_with('/')) {
            merged.push(c);
        }
    }
    (merged != path).then_some(merged)
}

/// `path` with every `%XX` escape of an unreserved character (`A-Z a-z 0-9 - . _ ~`) decoded;
/// other escapes (`%2F`, `%20`, ...) stay as written, upper-cased hex is not imposed.
fn decode_unreserved(path: &str) -> String {
    decode_escapes(path, |b| {
        (b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')).then_some(char::from(b))
    })
}

/// `path` with each `%XX` escape whose byte `decode` maps to a character replaced by it; every
/// other escape and character as written.
fn decode_escapes(path: &str, decode: impl Fn(u8) -> Option<char>) -> String {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(hex) = path.get(i + 1..i + 3)
            && let Ok(b) = u8::from_str_radix(hex, 16)
            && let Some(c) = decode(b)
        {
            out.push(c);
            i += 3;
            continue;
        }
        let c = path[i..].chars().next().expect("i is at a char boundary");
        out.push(c);
        i += c.len_utf8();
    }
    out
}

/// `scheme://`, the scheme as RFC 3986 spells it.
fn is_url(s: &str) -> bool {
    let Some((scheme, _)) = s.split_once("://") else {
        return false;
    };
    let mut chars = scheme.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
}

/// JSON equality where numbers compare by value (`3` equals `3.0`): TOML integers and JSON floats
/// would otherwise never be equal.
fn json_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x == y || x.as_f64() == y.as_f64(),
        _ => a == b,
    }
}

/// Fields shared by every rule kind.
#[derive(Debug, Clone)]
pub(crate) struct RuleMeta {
    pub(crate) name: String,
    /// 1-based line of the rule's `name` in the policy file (0 for rules built in code).
    pub(crate) line: usize,
    pub(crate) scopes: Option<Patterns>,
    pub(crate) principals: Option<Patterns>,
    /// The rule's own reason, if the file gave one.
    pub(crate) reason: Option<String>,
}

impl RuleMeta {
    #[inline]
    pub(crate) fn in_scope(&self, scope: &str, principal: &str) -> bool {
        filter_matches(&self.scopes, scope) && filter_matches(&self.principals, principal)
    }
}

/// `[[tool]]`: first match wins.
#[derive(Debug, Clone)]
pub(crate) struct ToolRule {
    pub(crate) meta: RuleMeta,
    pub(crate) tools: Patterns,
    pub(crate) when: Vec<Condition>,
    pub(crate) decision: Outcome,
    /// Precomputed reason, cloned into decisions.
    pub(crate) reason: String,
}

impl ToolRule {
    #[inline]
    pub(crate) fn matches(&self, tool: &str, scope: &str, principal: &str, args: &Value) -> bool {
        self.tools.matches(tool) && self.meta.in_scope(scope, principal) && {
            let permits = self.decision.is_permitted();
            self.when.iter().all(|c| c.holds(args, permits))
        }
    }
}

/// `[[model]]`: first match wins.
#[derive(Debug, Clone)]
pub(crate) struct ModelRule {
    pub(crate) meta: RuleMeta,
    pub(crate) models: Patterns,
    pub(crate) decision: Outcome,
    pub(crate) max_tokens: Option<u64>,
    /// Precomputed reason, cloned into decisions.
    pub(crate) reason: String,
}

impl ModelRule {
    #[inline]
    pub(crate) fn matches(&self, model: &str, scope: &str, principal: &str) -> bool {
        self.models.matches(model) && self.meta.in_scope(scope, principal)
    }
}

/// `[[constraint]]`: every constraint in scope applies.
#[derive(Debug, Clone)]
pub(crate) struct ConstraintRule {
    pub(crate) meta: RuleMeta,
    pub(crate) max_tokens_per_request: Option<u64>,
    pub(crate) max_cost_per_request: Option<Decimal>,
    pub(crate) max_tool_calls_per_turn: Option<u32>,
    pub(crate) max_turns: Option<u32>,
    pub(crate) on_violation: Outcome,
}
