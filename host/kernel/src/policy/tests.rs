use std::str::FromStr;

use serde_json::{Value, json};

use super::*;

fn policy(text: &str) -> Policy {
    match Policy::from_toml_str(text, "policy.toml") {
        Ok(p) => p,
        Err(e) => panic!("policy should load: {e}"),
    }
}

fn load_err(text: &str) -> (usize, String) {
    match Policy::from_toml_str(text, "policy.toml") {
        Ok(_) => panic!("policy should be rejected"),
        Err(e) => (e.line().expect("invalid error has a line"), e.to_string()),
    }
}

fn tool<'a>(name: &'a str, args: &'a Value) -> PolicyRequest<'a> {
    PolicyRequest::Tool {
        tool: name,
        arguments: args,
        scope: "acme",
        principal: "alice",
        session: Some("s1"),
        tool_calls_this_turn: 0,
        turn: 1,
    }
}

/// The session [`tool`] requests run in.
const S1: SessionKey<'static> = SessionKey {
    tenant: "acme",
    principal: "alice",
    session: "s1",
};

fn model(name: &str, max_tokens: u64, cost: &str) -> PolicyRequest<'static> {
    // Leak is fine in tests: keeps the helper's signature simple.
    let name: &'static str = Box::leak(name.to_owned().into_boxed_str());
    PolicyRequest::Model {
        model: name,
        scope: "acme",
        principal: "alice",
        max_tokens,
        estimated_cost: Decimal::from_str(cost).unwrap(),
        turn: 1,
    }
}

const BASIC: &str = r#"
default = "deny"

[[tool]]
name = "no-etc-writes"
tools = ["fs/write"]
decision = "deny"
reason = "never write under /etc"
[tool.when]
path = { glob = "/etc/**" }

[[tool]]
name = "tmp-writes"
tools = ["fs/write"]
decision = "allow"
[tool.when]
path = { glob = "/tmp/**" }

[[tool]]
name = "other-writes"
tools = ["fs/write"]
decision = "require_approval"

[[tool]]
name = "reads"
tools = ["fs/read*", "fs/list", "fs/stat"]
decision = "allow"

[[tool]]
name = "http"
tools = ["http-fetch/*"]
decision = "warn"
scopes = ["acme"]
principals = ["alice", "svc-*"]

[[model]]
name = "small-models"
models = ["openai/gpt-4o-mini", "anthropic/claude-*-haiku*"]
decision = "allow"
max_tokens = 4096

[[model]]
name = "big-models"
models = ["openai/*", "anthropic/*"]
decision = "require_approval"
"#;

#[test]
fn tool_rules_first_match_wins_in_order() {
    let p = policy(BASIC);
    let etc = json!({"path": "/etc/passwd", "content": "x"});
    let d = p.evaluate(&tool("fs/write", &etc));
    assert_eq!(d.outcome, Outcome::Deny);
    assert_eq!(d.reason, "never write under /etc");
    assert_eq!(d.applied_rules, ["no-etc-writes"]);
    assert_eq!(d.violated_rules, ["no-etc-writes"]);

    let tmp = json!({"path": "/tmp/a/b.txt"});
    let d = p.evaluate(&tool("fs/write", &tmp));
    assert_eq!(d.outcome, Outcome::Allow);
    assert_eq!(d.applied_rules, ["tmp-writes"]);
    assert!(d.violated_rules.is_empty());

    let home = json!({"path": "/home/alice/notes"});
    let d = p.evaluate(&tool("fs/write", &home));
    assert_eq!(d.outcome, Outcome::RequireApproval);
    assert_eq!(d.applied_rules, ["other-writes"]);

    // Prefix pattern and exact pattern in one list.
    let d = p.evaluate(&tool("fs/read_many", &json!({})));
    assert_eq!((d.outcome, d.applied_rules[0].as_str()), (Outcome::Allow, "reads"));
    assert_eq!(p.evaluate(&tool("fs/stat", &json!({}))).outcome, Outcome::Allow);
}

#[test]
fn scopes_and_principals_filter_rules() {
    let p = policy(BASIC);
    let args = json!({"url": "https://example.com"});
    let d = p.evaluate(&tool("http-fetch/get", &args));
    assert_eq!(d.outcome, Outcome::Warn);
    assert_eq!(d.violated_rules, ["http"]);

    let other_scope = PolicyRequest::Tool {
        tool: "http-fetch/get",
        arguments: &args,
        scope: "globex",
        principal: "alice",
        session: None,
        tool_calls_this_turn: 0,
        turn: 1,
    };
    let d = p.evaluate(&other_scope);
    assert_eq!(d.outcome, Outcome::Deny);
    assert_eq!(d.applied_rules, [DEFAULT_RULE]);

    let svc = PolicyRequest::Tool {
        tool: "http-fetch/get",
        arguments: &args,
        scope: "acme",
        principal: "svc-indexer",
        session: None,
        tool_calls_this_turn: 0,
        turn: 1,
    };
    assert_eq!(p.evaluate(&svc).outcome, Outcome::Warn);
    let bob = PolicyRequest::Tool {
        tool: "http-fetch/get",
        arguments: &args,
        scope: "acme",
        principal: "bob",
        session: None,
        tool_calls_this_turn: 0,
        turn: 1,
    };
    assert_eq!(p.evaluate(&bob).outcome, Outcome::Deny);
}

#[test]
fn default_deny_and_default_allow() {
    let p = policy(BASIC);
    let d = p.evaluate(&tool("shell/exec", &json!({})));
    assert_eq!(d.outcome, Outcome::Deny);
    assert_eq!(d.applied_rules, [DEFAULT_RULE]);
    assert_eq!(d.violated_rules, [DEFAULT_RULE]);
    assert!(d.reason.contains("no tool rule matches `shell/exec`"), "{}", d.reason);

    // No `default` key at all: deny.
    let p = policy("");
    assert_eq!(p.default_mode(), DefaultMode::Deny);
    assert_eq!(p.evaluate(&tool("x/y", &json!({}))).outcome, Outcome::Deny);
    assert_eq!(p.evaluate(&model("m", 1, "0")).outcome, Outcome::Deny);

    let p = policy(r#"default = "allow""#);
    let d = p.evaluate(&tool("x/y", &json!({})));
    assert_eq!(d.outcome, Outcome::Allow);
    assert!(d.violated_rules.is_empty());
    assert_eq!(
        Policy::allow_all().evaluate(&model("m", 1, "0")).outcome,
        Outcome::Allow
    );
}

#[test]
fn argument_conditions() {
    let p = policy(
        r#"
[[tool]]
name = "exact"
tools = ["t/*"]
decision = "allow"
[tool.when]
mode = { equals = "read" }
"/opts/depth" = { max = 3, min = 1 }

[[tool]]
name = "choice"
tools = ["t/*"]
decision = "warn"
[tool.when]
region = { one_of = ["eu", "us"] }
query = { max_len = 5 }
"#,
    );
    let d = |args: Value| p.evaluate(&tool("t/x", &args)).outcome;
    assert_eq!(d(json!({"mode": "read", "opts": {"depth": 2}})), Outcome::Allow);
    assert_eq!(d(json!({"mode": "read", "opts": {"depth": 3.0}})), Outcome::Allow);
    assert_eq!(d(json!({"mode": "read", "opts": {"depth": 4}})), Outcome::Deny);
    assert_eq!(d(json!({"mode": "read", "opts": {"depth": 0}})), Outcome::Deny);
    assert_eq!(d(json!({"mode": "write", "opts": {"depth": 2}})), Outcome::Deny);
    // A missing argument never matches.
    assert_eq!(d(json!({"mode": "read"})), Outcome::Deny);
    assert_eq!(d(json!({"region": "eu", "query": "abcde"})), Outcome::Warn);
    assert_eq!(d(json!({"region": "eu", "query": "abcdéf"})), Outcome::Deny);
    assert_eq!(d(json!({"region": "asia", "query": "a"})), Outcome::Deny);
    assert_eq!(d(json!({"region": "us", "query": ["a", "b"]})), Outcome::Warn);
}

#[test]
fn argument_glob_has_path_semantics() {
    let p = policy(
        r#"
[[tool]]
name = "tmp-top"
tools = ["fs/write"]
decision = "allow"
when = { path = { glob = "/tmp/*" } }
"#,
    );
    let d = |path: &str| p.evaluate(&tool("fs/write", &json!({"path": path}))).outcome;
    assert_eq!(d("/tmp/a"), Outcome::Allow);
    assert_eq!(d("/tmp/a/b"), Outcome::Deny);
    // Non-string values never match a glob.
    assert_eq!(
        p.evaluate(&tool("fs/write", &json!({"path": 1}))).outcome,
        Outcome::Deny
    );
}

const WORKSPACE: &str = r#"
default = "deny"

[[tool]]
name = "no-secrets"
tools = ["fs/write"]
decision = "deny"
[tool.when]
path = { glob = "/ws/secret/**" }

[[tool]]
name = "out"
tools = ["fs/write"]
decision = "allow"
[tool.when]
path = { glob = "/ws/out/**" }

[[tool]]
name = "relative-out"
tools = ["fs/write"]
decision = "allow"
[tool.when]
path = { glob = "out/**" }

[[tool]]
name = "ask"
tools = ["fs/write"]
decision = "require_approval"
[tool.when]
path = { glob = "/ws/**" }
"#;

#[test]
fn spelling_a_path_differently_never_turns_a_deny_into_an_allow() {
    let p = policy(WORKSPACE);
    let d = |path: &str| p.evaluate(&tool("fs/write", &json!({ "path": path }))).outcome;
    // Ordinary paths: unchanged.
    assert_eq!(d("/ws/out/report.txt"), Outcome::Allow);
    assert_eq!(d("/ws/out/a/b.txt"), Outcome::Allow);
    assert_eq!(d("/ws/secret/key"), Outcome::Deny);
    assert_eq!(d("/ws/other/x"), Outcome::RequireApproval);
    assert_eq!(d("/elsewhere"), Outcome::Deny);
    assert_eq!(d("out/x"), Outcome::Allow);
    // `..` resolves against the component before it.
    assert_eq!(d("/ws/out/../secret/pwned.txt"), Outcome::Deny);
    assert_eq!(d("/ws/out/a/../../secret/pwned.txt"), Outcome::Deny);
    assert_eq!(d("/ws/out/../other/x"), Outcome::RequireApproval);
    assert_eq!(d("/ws/out/a/../b.txt"), Outcome::Allow, "stays inside /ws/out");
    assert_eq!(
        d("out/../../ws/secret/x"),
        Outcome::Deny,
        "climbs above a relative start"
    );
    // `//` and `.` are the same path.
    assert_eq!(d("/ws//secret/pwned.txt"), Outcome::Deny);
    assert_eq!(d("//ws/secret/pwned.txt"), Outcome::Deny);
    assert_eq!(d("/ws/./secret/pwned.txt"), Outcome::Deny);
    assert_eq!(d("/ws/out/./../secret/x"), Outcome::Deny);
    assert_eq!(d("/ws//out/./x"), Outcome::Allow);
    assert_eq!(d("./out/x"), Outcome::Allow);
    // A `..` above the root, or leading a relative path, cannot be placed: never allowed by a
    // glob, and caught by the first deny or require_approval glob.
    assert_eq!(d("/../ws/out/x"), Outcome::Deny);
    assert_eq!(d("/ws/out/../../../ws/out/x"), Outcome::Deny);
    assert_eq!(d("../out/x"), Outcome::Deny);
    assert_eq!(d(".."), Outcome::Deny);
}

#[test]
fn path_spellings() {
    use super::rules::{PathSpelling, path_spelling};
    let resolved = |s: &str| match path_spelling(s) {
        PathSpelling::Resolved(p) => p.into_owned(),
        other => panic!("{s}: {other:?}"),
    };
    for (given, canonical) in [
        ("/ws/out/x", "/ws/out/x"),
        ("/ws/out/../secret/x", "/ws/secret/x"),
        ("//etc//passwd", "/etc/passwd"),
        ("/./etc/./passwd", "/etc/passwd"),
        ("/", "/"),
        ("/x/..", "/"),
        ("a/./b/../c", "a/c"),
        ("./a", "a"),
        ("a/..", "."),
        ("application/json", "application/json"),
        ("", ""),
    ] {
        assert_eq!(resolved(given), canonical, "{given}");
    }
    assert!(matches!(
        path_spelling("/ws/out/x"),
        PathSpelling::Resolved(std::borrow::Cow::Borrowed(_))
    ));
    // A trailing `/` (or `/.`, `/..`) names a directory, but a tool may open a file there.
    for given in ["/etc/.", "/etc/x/..", "/etc/", "/etc//"] {
        assert_eq!(
            path_spelling(given),
            PathSpelling::Several {
                all: vec!["/etc/".into(), "/etc".into()],
                also_caught: None
            },
            "{given}"
        );
    }
    for escaping in [
        "/..",
        "/../etc",
        "/a/../..",
        "..",
        "../a",
        "a/../../b",
        "/x://../../etc",
    ] {
        assert_eq!(path_spelling(escaping), PathSpelling::Escapes, "{escaping}");
    }
}

#[test]
fn url_spellings() {
    use super::rules::{PathSpelling, path_spelling};
    assert_eq!(
        path_spelling("https://api.example.com"),
        PathSpelling::Several {
            all: vec!["https://api.example.com".into()],
            also_caught: Some("https://api.example.com/".into())
        },
        "an empty path is requested as `/`"
    );
    for unchanged in [
        "https://api.example.com/",
        "https://api.example.com/v1/x?q=1#top",
        "https://api.example.com/v1/%2Cx",
        "s3://bucket/key",
    ] {
        assert_eq!(
            path_spelling(unchanged),
            PathSpelling::Resolved(unchanged.into()),
            "{unchanged}"
        );
    }
    assert_eq!(
        path_spelling("HTTPS://API.example.com:443"),
        PathSpelling::Several {
            all: vec!["HTTPS://API.example.com:443".into(), "https://api.example.com".into()],
            also_caught: Some("https://api.example.com/".into())
        }
    );
    // As written, as parsed, and as a server merging slashes or decoding `%2F`/`%5C` serves it.
    for (given, spelled, served) in [
        (
            "https://example.com//a/../b",
            "https://example.com//b",
            "https://example.com/b",
        ),
        (
            "https://api.example.com/v1/%2e%2E/%61dmin%2F",
            "https://api.example.com/admin%2F",
            "https://api.example.com/admin/",
        ),
        (
            "https://api.example.com:8443/v1/..%2f%2Fadmin%5Cx",
            "https://api.example.com:8443/v1/..%2f%2Fadmin%5Cx",
            "https://api.example.com:8443/admin/x",
        ),
    ] {
        let mut all: Vec<String> = vec![given.into(), spelled.into(), served.into()];
        all.dedup();
        assert_eq!(
            path_spelling(given),
            PathSpelling::Several { all, also_caught: None },
            "{given}"
        );
    }
    for (given, spelled) in [
        ("http://h\\a\\..\\b", "http://h/b"),
        ("https://h/../../x", "https://h/x"),
        ("s3://bucket/a/../b", "s3://bucket/b"),
    ] {
        assert_eq!(
            path_spelling(given),
            PathSpelling::Several {
                all: vec![given.into(), spelled.into()],
                also_caught: None
            },
            "{given}"
        );
    }
    for unplaceable in [
        "https://h:99999/",
        "https://a b/",
        "http://[::1/x",
        " https://h/x",
        "\u{a0}https://h/x",
        "\thttps://h/x",
    ] {
        assert_eq!(path_spelling(unplaceable), PathSpelling::Escapes, "{unplaceable}");
    }
}

#[test]
fn url_globs_still_match_urls_as_written() {
    let p = policy(
        r#"
[[tool]]
name = "api"
tools = ["http-fetch/get"]
decision = "allow"
when = { url = { glob = "https://api.example.com/**" } }
"#,
    );
    let d = |url: &str| p.evaluate(&tool("http-fetch/get", &json!({ "url": url }))).outcome;
    assert_eq!(d("https://api.example.com/v1/x"), Outcome::Allow);
    assert_eq!(d("https://evil.example.com/v1/x"), Outcome::Deny);
}

const API: &str = r#"
default = "deny"

[[tool]]
name = "no-admin"
tools = ["http-fetch/get"]
decision = "deny"
when = { url = { glob = "https://api.example.com/v1/admin/**" } }

[[tool]]
name = "ask-billing"
tools = ["http-fetch/get"]
decision = "require_approval"
when = { url = { glob = "https://api.example.com/v1/billing/**" } }

[[tool]]
name = "api"
tools = ["http-fetch/get"]
decision = "allow"
when = { url = { glob = "https://api.example.com/v1/**" } }

[[tool]]
name = "status"
tools = ["http-fetch/get"]
decision = "allow"
when = { url = { glob = "https://status.example.com" } }
"#;

#[test]
fn spelling_a_url_differently_never_turns_a_deny_into_an_allow() {
    let p = policy(API);
    let d = |url: &str| p.evaluate(&tool("http-fetch/get", &json!({ "url": url }))).outcome;
    // Ordinary URLs: unchanged.
    assert_eq!(d("https://api.example.com/v1/public/x"), Outcome::Allow);
    assert_eq!(d("https://api.example.com/v1/admin/users"), Outcome::Deny);
    assert_eq!(d("https://api.example.com/v1/billing/x"), Outcome::RequireApproval);
    assert_eq!(d("https://status.example.com"), Outcome::Allow);
    assert_eq!(
        d("https://status.example.com/"),
        Outcome::Deny,
        "the glob names no path"
    );
    // Every spelling a client or server reads as /v1/admin/... is denied.
    for admin in [
        "https://api.example.com/v1/public/../admin/users",
        "https://api.example.com/v1/public/x/../../admin/users",
        "https://api.example.com/v1/./admin/users",
        "https://api.example.com/v1/%2e%2e/v1/admin/users",
        "https://api.example.com/v1/public/%2E%2e/admin/users",
        "https://api.example.com/v1/public/.%2e/admin/users",
        "https://api.example.com/../v1/admin/users",
        "https://api.example.com/v1/%61dmin/users",
        "https://api.example.com/v1/adm%69n/users",
        "https://api.example.com/v1\\public\\..\\admin\\users",
        "https://API.Example.COM/v1/admin/users",
        "HTTPS://api.example.com/v1/admin/users",
        "https://api.example.com:443/v1/admin/users",
        "https://api.example.com./v1/admin/users",
    ] {
        assert_eq!(d(admin), Outcome::Deny, "{admin}");
    }
    assert_eq!(
        d("https://api.example.com/v1/public/../billing/x"),
        Outcome::RequireApproval
    );
    // A respelling that stays inside the allowed tree is still allowed.
    assert_eq!(d("https://api.example.com/v1/public/a/../b"), Outcome::Allow);
    assert_eq!(d("https://api.example.com/v1/%70ublic/x"), Outcome::Allow);
    // A URL no parser accepts cannot be placed: never allowed, caught by the first deny glob.
    assert_eq!(d("https://api.example.com:99999/v1/public/x"), Outcome::Deny);
    assert_eq!(d("https://api.exa mple.com/v1/public/x"), Outcome::Deny);
}

#[test]
fn a_dotted_path_cannot_escape_a_require_approval() {
    let p = policy(
        r#"
[[tool]]
name = "ask-home"
tools = ["fs/write"]
decision = "require_approval"
when = { path = { glob = "/home/**" } }

[[tool]]
name = "tmp"
tools = ["fs/write"]
decision = "allow"
when = { path = { glob = "/tmp/**" } }

[[tool]]
name = "rest"
tools = ["fs/write"]
decision = "warn"
"#,
    );
    let d = |path: &str| p.evaluate(&tool("fs/write", &json!({ "path": path }))).outcome;
    assert_eq!(d("/tmp/../home/alice/x"), Outcome::RequireApproval);
    assert_eq!(d("/tmp//..//home/alice/x"), Outcome::RequireApproval);
    assert_eq!(d("/../tmp/x"), Outcome::RequireApproval);
    assert_eq!(d("/tmp/x"), Outcome::Allow);
    assert_eq!(d("/var/x"), Outcome::Warn);
}

#[test]
fn example_policy_sees_through_dotted_paths() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/policies/default.toml");
    let text = std::fs::read_to_string(path).expect("the example policy");
    let p = Policy::from_toml_str(&text, path).unwrap_or_else(|e| panic!("{e}"));
    let d = |path: &str| {
        p.evaluate(&tool("fs/write", &json!({ "path": path, "content": "x" })))
            .outcome
    };
    assert_eq!(d("/tmp/../etc/passwd"), Outcome::Deny);
    assert_eq!(d("//etc/passwd"), Outcome::Deny);
    assert_eq!(d("/./etc/passwd"), Outcome::Deny);
    assert_eq!(d("/tmp/../home/alice/x"), Outcome::RequireApproval);
    assert_eq!(d("/etc/passwd"), Outcome::Deny);
    assert_eq!(d("/tmp/out.txt"), Outcome::Allow);
    assert_eq!(d("/home/alice/x"), Outcome::RequireApproval);
}

#[test]
fn model_rules_and_max_tokens() {
    let p = policy(BASIC);
    let d = p.evaluate(&model("openai/gpt-4o-mini", 1000, "0.01"));
    assert_eq!(d.outcome, Outcome::Allow);
    assert_eq!(d.applied_rules, ["small-models"]);

    let d = p.evaluate(&model("anthropic/claude-3-5-haiku-latest", 8000, "0.01"));
    assert_eq!(d.outcome, Outcome::Deny);
    assert_eq!(d.violated_rules, ["small-models"]);
    assert!(
        d.reason.contains("max_tokens 8000 exceeds the limit of 4096"),
        "{}",
        d.reason
    );

    let d = p.evaluate(&model("openai/gpt-5", 1000, "0.01"));
    assert_eq!(d.outcome, Outcome::RequireApproval);
    assert_eq!(d.applied_rules, ["big-models"]);

    let d = p.evaluate(&model("local/llama", 1000, "0"));
    assert_eq!(d.outcome, Outcome::Deny);
    assert!(d.reason.contains("no model rule matches `local/llama`"));
}

const CONSTRAINTS: &str = r#"
default = "allow"

[[constraint]]
name = "request-size"
max_tokens_per_request = 8000
max_cost_per_request = "0.50"

[[constraint]]
name = "turn-limits"
max_tool_calls_per_turn = 3
max_turns = 10
on_violation = "require_approval"

[[constraint]]
name = "soft-cost"
max_cost_per_request = 0.10
on_violation = "warn"
reason = "unusually expensive call"

[[constraint]]
name = "interns"
principals = ["intern-*"]
max_tool_calls_per_turn = 1
"#;

#[test]
fn constraints_all_apply_and_most_severe_wins() {
    let p = policy(CONSTRAINTS);
    let d = p.evaluate(&model("m", 1000, "0.05"));
    assert_eq!(d.outcome, Outcome::Allow);
    assert_eq!(
        d.applied_rules,
        [DEFAULT_RULE, "request-size", "turn-limits", "soft-cost"]
    );
    assert!(d.violated_rules.is_empty());

    let d = p.evaluate(&model("m", 1000, "0.20"));
    assert_eq!(d.outcome, Outcome::Warn);
    assert_eq!(d.violated_rules, ["soft-cost"]);
    assert_eq!(
        d.reason,
        "constraint `soft-cost`: estimated cost 0.20 exceeds max_cost_per_request 0.1 (unusually expensive call)"
    );

    // Over both cost limits: deny wins over warn.
    let d = p.evaluate(&model("m", 1000, "0.75"));
    assert_eq!(d.outcome, Outcome::Deny);
    assert_eq!(d.violated_rules, ["request-size", "soft-cost"]);
    assert!(d.reason.starts_with("constraint `request-size`"), "{}", d.reason);

    let d = p.evaluate(&model("m", 9000, "0.01"));
    assert_eq!(d.outcome, Outcome::Deny);
    assert!(d.reason.contains("max_tokens 9000 exceeds max_tokens_per_request 8000"));
}

#[test]
fn turn_constraints() {
    let p = policy(CONSTRAINTS);
    let args = json!({});
    let call = |calls: u32, turn: u32, principal: &'static str| PolicyRequest::Tool {
        tool: "fs/read",
        arguments: Box::leak(Box::new(args.clone())),
        scope: "acme",
        principal,
        session: None,
        tool_calls_this_turn: calls,
        turn,
    };
    let d = p.evaluate(&call(2, 1, "alice"));
    assert_eq!(d.outcome, Outcome::Allow);
    // Constraints without a tool-relevant limit are not applied to tool calls.
    assert_eq!(d.applied_rules, [DEFAULT_RULE, "turn-limits"]);

    let d = p.evaluate(&call(3, 1, "alice"));
    assert_eq!(d.outcome, Outcome::RequireApproval);
    assert_eq!(d.violated_rules, ["turn-limits"]);
    assert!(d.reason.contains("tool call 4 of the turn"), "{}", d.reason);

    let d = p.evaluate(&call(0, 11, "alice"));
    assert_eq!(d.outcome, Outcome::RequireApproval);
    assert!(d.reason.contains("turn 11 exceeds max_turns 10"));

    let d = p.evaluate(&call(1, 1, "intern-joe"));
    assert_eq!(d.outcome, Outcome::Deny);
    assert_eq!(d.violated_rules, ["interns"]);
}

#[test]
fn session_approvals_turn_require_approval_into_allow() {
    let p = policy(BASIC);
    let approvals = SessionApprovals::new();
    let args = json!({"path": "/home/alice/notes", "content": "hi"});
    assert_eq!(
        p.evaluate_with(&tool("fs/write", &args), &approvals).outcome,
        Outcome::RequireApproval
    );

    // Same call, keys in another order: approved.
    approvals.approve_call(S1, "fs/write", &json!({"content": "hi", "path": "/home/alice/notes"}));
    let d = p.evaluate_with(&tool("fs/write", &args), &approvals);
    assert_eq!(d.outcome, Outcome::Allow);
    assert_eq!(d.applied_rules, ["other-writes", SESSION_APPROVAL_RULE]);
    assert!(d.violated_rules.is_empty());
    assert!(d.reason.starts_with("approved for this session"));

    // Different arguments, different session, or no session: still needs approval.
    let other = json!({"path": "/home/alice/other", "content": "hi"});
    assert_eq!(
        p.evaluate_with(&tool("fs/write", &other), &approvals).outcome,
        Outcome::RequireApproval
    );
    let other_session = PolicyRequest::Tool {
        tool: "fs/write",
        arguments: &args,
        scope: "acme",
        principal: "alice",
        session: Some("s2"),
        tool_calls_this_turn: 0,
        turn: 1,
    };
    assert_eq!(
        p.evaluate_with(&other_session, &approvals).outcome,
        Outcome::RequireApproval
    );
    let no_session = PolicyRequest::Tool {
        tool: "fs/write",
        arguments: &args,
        scope: "acme",
        principal: "alice",
        session: None,
        tool_calls_this_turn: 0,
        turn: 1,
    };
    assert_eq!(
        p.evaluate_with(&no_session, &approvals).outcome,
        Outcome::RequireApproval
    );
    // Without a store, approvals are not consulted.
    assert_eq!(p.evaluate(&tool("fs/write", &args)).outcome, Outcome::RequireApproval);

    approvals.revoke_session(S1);
    assert!(approvals.is_empty());
    assert_eq!(
        p.evaluate_with(&tool("fs/write", &args), &approvals).outcome,
        Outcome::RequireApproval
    );
}

#[test]
fn a_session_approval_belongs_to_its_tenant() {
    let p = policy(BASIC);
    let approvals = SessionApprovals::new();
    let args = json!({"path": "/home/alice/notes", "content": "hi"});
    let in_scope = |scope| PolicyRequest::Tool {
        tool: "fs/write",
        arguments: &args,
        scope,
        principal: "alice",
        session: Some("main"),
        tool_calls_this_turn: 0,
        turn: 1,
    };
    approvals.approve_call(SessionKey::new("tenant-a", "alice", "main"), "fs/write", &args);
    // Another tenant's session of the same name: still asks.
    assert_eq!(
        p.evaluate_with(&in_scope("tenant-b"), &approvals).outcome,
        Outcome::RequireApproval
    );
    assert!(!approvals.is_call_approved(SessionKey::new("tenant-b", "alice", "main"), "fs/write", &args));
    assert!(!approvals.may_have_approvals(SessionKey::new("tenant-b", "alice", "main"), "fs/write"));
    // The approving tenant's session: approved.
    assert_eq!(
        p.evaluate_with(&in_scope("tenant-a"), &approvals).outcome,
        Outcome::Allow
    );

    // Revoking tenant-b's "main" leaves tenant-a's alone.
    approvals.revoke_session(SessionKey::new("tenant-b", "alice", "main"));
    assert_eq!(
        p.evaluate_with(&in_scope("tenant-a"), &approvals).outcome,
        Outcome::Allow
    );
    approvals.revoke_session(SessionKey::new("tenant-a", "alice", "main"));
    assert!(approvals.is_empty());
}

/// A session name is the client's choice: another principal of the same tenant naming the same
/// session does not get what a human approved for the first one's session.
#[test]
fn a_session_approval_belongs_to_its_principal() {
    let p = policy(BASIC);
    let approvals = SessionApprovals::new();
    let args = json!({"path": "/home/alice/notes", "content": "hi"});
    let as_principal = |principal| PolicyRequest::Tool {
        tool: "fs/write",
        arguments: &args,
        scope: "acme",
        principal,
        session: Some("main"),
        tool_calls_this_turn: 0,
        turn: 1,
    };
    approvals.approve_call(SessionKey::new("acme", "alice", "main"), "fs/write", &args);
    assert_eq!(
        p.evaluate_with(&as_principal("mallory"), &approvals).outcome,
        Outcome::RequireApproval,
        "another principal's session of the same name still asks"
    );
    assert_eq!(
        p.evaluate_with(&as_principal(""), &approvals).outcome,
        Outcome::RequireApproval,
        "nor does a call naming no principal"
    );
    assert_eq!(
        p.evaluate_with(&as_principal("alice"), &approvals).outcome,
        Outcome::Allow,
        "the approving principal's session: approved"
    );
    approvals.revoke_session(SessionKey::new("acme", "mallory", "main"));
    assert_eq!(approvals.len(), 1, "revoking Mallory's leaves Alice's");
    approvals.revoke_session(SessionKey::new("acme", "alice", "main"));
    assert!(approvals.is_empty());
}

#[test]
fn session_approval_does_not_lift_constraints_or_deny() {
    let text = format!("{BASIC}\n[[constraint]]\nname = \"calls\"\nmax_tool_calls_per_turn = 2\n");
    let p = policy(&text);
    let approvals = SessionApprovals::new();
    let args = json!({"path": "/home/x"});
    approvals.approve_call(S1, "fs/write", &args);
    let req = PolicyRequest::Tool {
        tool: "fs/write",
        arguments: &args,
        scope: "acme",
        principal: "alice",
        session: Some("s1"),
        tool_calls_this_turn: 2,
        turn: 1,
    };
    let d = p.evaluate_with(&req, &approvals);
    assert_eq!(d.outcome, Outcome::Deny);
    assert_eq!(d.applied_rules, ["other-writes", SESSION_APPROVAL_RULE, "calls"]);
    assert_eq!(d.violated_rules, ["calls"]);

    // Approving a denied call changes nothing.
    let etc = json!({"path": "/etc/passwd"});
    approvals.approve_call(S1, "fs/write", &etc);
    assert_eq!(
        p.evaluate_with(&tool("fs/write", &etc), &approvals).outcome,
        Outcome::Deny
    );
}

#[test]
fn session_approvals_are_thread_safe() {
    let approvals = std::sync::Arc::new(SessionApprovals::new());
    let handles: Vec<_> = (0..4)
        .map(|i| {
            let a = approvals.clone();
            std::thread::spawn(move || {
                for j in 0..50 {
                    a.approve_call(
                        SessionKey::new("acme", "alice", &format!("s{i}")),
                        "t/x",
                        &json!({ "n": j }),
                    );
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    assert_eq!(approvals.len(), 200);
    assert!(approvals.is_call_approved(SessionKey::new("acme", "alice", "s3"), "t/x", &json!({"n": 49})));
    assert!(!approvals.is_call_approved(SessionKey::new("acme", "alice", "s3"), "t/y", &json!({"n": 49})));
}

#[test]
fn decision_serializes_with_upper_case_outcome() {
    let p = policy(BASIC);
    let d = p.evaluate(&tool("fs/write", &json!({"path": "/etc/x"})));
    let v = serde_json::to_value(&d).unwrap();
    assert_eq!(v["outcome"], "DENY");
    assert_eq!(v["violated_rules"], json!(["no-etc-writes"]));
    let back: PolicyDecision = serde_json::from_value(v).unwrap();
    assert_eq!(back, d);
}

#[test]
fn summary_lists_rules_with_lines() {
    let p = policy(BASIC);
    let s = p.summary();
    assert_eq!(s.default, DefaultMode::Deny);
    assert_eq!(s.rules.len(), 7);
    assert_eq!(s.rules[0].name, "no-etc-writes");
    assert_eq!(s.rules[0].line, 5);
    assert_eq!(s.rules[0].kind, "tool");
    assert_eq!(s.rules[5].kind, "model");
    assert_eq!(s.rules[5].decision, Outcome::Allow);
}

#[test]
fn example_policy_loads() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/policies/default.toml");
    let text = std::fs::read_to_string(path).expect("the example policy");
    let p = Policy::from_toml_str(&text, path).unwrap_or_else(|e| panic!("{e}"));
    assert!(!p.summary().rules.is_empty());
}

// ---- Bad files: each error names the line. -----------------------------------------------------

#[test]
fn unknown_field_is_rejected_with_line() {
    let (line, msg) = load_err("default = \"deny\"\n\n[[tool]]\nname = \"a\"\ntoool = [\"x\"]\ndecision = \"allow\"\n");
    assert_eq!(line, 5, "{msg}");
    assert!(
        msg.starts_with("policy.toml:5:1: unknown field `toool`, expected one of"),
        "{msg}"
    );
}

#[test]
fn toml_syntax_error_has_line() {
    let (line, msg) = load_err("default = \"deny\"\n[[tool]\nname = \"a\"\n");
    assert_eq!(line, 2, "{msg}");
}

#[test]
fn bad_decision_and_default_values() {
    let (line, msg) = load_err("[[tool]]\nname = \"a\"\ntools = [\"x\"]\ndecision = \"maybe\"\n");
    assert_eq!(line, 4, "{msg}");
    assert!(
        msg.contains("unknown variant `maybe`, expected one of `allow`, `warn`, `require_approval`, `deny`"),
        "{msg}"
    );
    let (line, msg) = load_err("\ndefault = \"sometimes\"\n");
    assert_eq!(line, 2, "{msg}");
}

#[test]
fn missing_required_field() {
    let (line, msg) = load_err("\n\n[[tool]]\nname = \"a\"\ndecision = \"allow\"\n");
    assert!(msg.contains("missing field `tools`"), "{msg}");
    assert!((3..=5).contains(&line), "{msg}");
}

#[test]
fn bad_glob_points_at_pattern() {
    let (line, msg) =
        load_err("[[tool]]\nname = \"a\"\ndecision = \"allow\"\ntools = [\n  \"fs/*\",\n  \"fs/[oops\",\n]\n");
    assert_eq!(line, 6, "{msg}");
    assert!(msg.contains("invalid pattern `fs/[oops`"), "{msg}");
    assert!(msg.starts_with("policy.toml:6:3:"), "{msg}");
}

#[test]
fn bad_argument_glob_points_at_pattern() {
    let (line, msg) = load_err(
        "[[tool]]\nname = \"a\"\ntools = [\"x\"]\ndecision = \"allow\"\n[tool.when]\npath = { glob = \"{a\" }\n",
    );
    assert_eq!(line, 6, "{msg}");
}

#[test]
fn empty_and_duplicate_and_reserved_names() {
    let (line, msg) = load_err("[[tool]]\nname = \" \"\ntools = [\"x\"]\ndecision = \"allow\"\n");
    assert_eq!(line, 2, "{msg}");
    assert!(msg.contains("rule name must not be empty"), "{msg}");

    let (line, msg) = load_err(
        "[[tool]]\nname = \"a\"\ntools = [\"x\"]\ndecision = \"allow\"\n\n[[model]]\nname = \"a\"\nmodels = [\"m\"]\ndecision = \"allow\"\n",
    );
    assert_eq!(line, 7, "{msg}");
    assert!(msg.contains("duplicate rule name `a`"), "{msg}");

    let (line, msg) = load_err("[[tool]]\nname = \"default\"\ntools = [\"x\"]\ndecision = \"allow\"\n");
    assert_eq!(line, 2, "{msg}");
    assert!(msg.contains("reserved"), "{msg}");
}

#[test]
fn empty_pattern_lists_and_conditions() {
    let (line, msg) = load_err("[[tool]]\nname = \"a\"\ntools = []\ndecision = \"allow\"\n");
    assert_eq!(line, 3, "{msg}");
    assert!(msg.contains("`tools` must list at least one pattern"), "{msg}");

    let (line, msg) =
        load_err("[[tool]]\nname = \"a\"\ntools = [\"x\"]\ndecision = \"allow\"\n[tool.when]\npath = {}\n");
    assert_eq!(line, 6, "{msg}");
    assert!(msg.contains("has no test"), "{msg}");

    let (line, msg) = load_err(
        "[[tool]]\nname = \"a\"\ntools = [\"x\"]\ndecision = \"allow\"\n[tool.when]\npath = { globb = \"x\" }\n",
    );
    assert_eq!(line, 6, "{msg}");
    assert!(msg.contains("unknown field `globb`"), "{msg}");
}

#[test]
fn bad_constraints() {
    let (line, msg) = load_err("\n[[constraint]]\nname = \"c\"\n");
    assert!(msg.contains("sets no limit"), "{msg}");
    assert!((2..=3).contains(&line), "{msg}");

    let (line, msg) = load_err("[[constraint]]\nname = \"c\"\nmax_turns = 3\non_violation = \"allow\"\n");
    assert_eq!(line, 4, "{msg}");

    let (line, msg) = load_err("[[constraint]]\nname = \"c\"\nmax_cost_per_request = \"cheap\"\n");
    assert_eq!(line, 3, "{msg}");
    assert!(msg.contains("invalid decimal amount `cheap`"), "{msg}");

    let (line, msg) = load_err("[[constraint]]\nname = \"c\"\nmax_turns = -1\n");
    assert_eq!(line, 3, "{msg}");
}

#[test]
fn unsupported_version() {
    let (line, msg) = load_err("version = 2\n");
    assert_eq!(line, 1, "{msg}");
    assert!(msg.contains("unsupported policy version 2"), "{msg}");
    policy("version = 1");
}

#[test]
fn line_col_counts_characters() {
    assert_eq!(file::line_col("ab\ncdé f", 0), (1, 1));
    assert_eq!(file::line_col("ab\ncdé f", 3), (2, 1));
    assert_eq!(file::line_col("ab\ncdé f", 7), (2, 4));
    assert_eq!(file::line_col("ab", 99), (1, 3));
}

#[test]
fn fast_pattern_shapes_agree_with_globset() {
    use rules::Pattern;
    let names = [
        "fs/read",
        "fs/read_many",
        "fs",
        "xfs/read",
        "http-fetch/get",
        "",
        "a*b",
        "fs/read/x",
    ];
    for src in [
        "*",
        "**",
        "fs/read",
        "fs/*",
        "*/read",
        "fs/read*",
        "*read",
        "fs/r?ad",
        "{fs,http-fetch}/*",
        "a\\*b",
    ] {
        let fast = Pattern::compile(src, false).unwrap();
        let glob = globset::GlobBuilder::new(src)
            .backslash_escape(true)
            .build()
            .unwrap()
            .compile_matcher();
        for name in names {
            assert_eq!(fast.matches(name), glob.is_match(name), "pattern {src:?} on {name:?}");
        }
    }
}

#[test]
fn policy_is_shareable_across_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Policy>();
    assert_send_sync::<SessionApprovals>();
}

#[test]
fn single_bracket_rule_table_gets_a_hint() {
    let (line, msg) = load_err("default = \"deny\"\n[tool]\nname = \"a\"\n");
    assert_eq!(line, 2, "{msg}");
    assert!(msg.contains("write [[tool]]"), "{msg}");
}

/// A trailing `/`, `/.` or `/x/..` after a file's name opens that file in most tools: a deny of
/// the file (exactly or by a wildcard) still holds, and an allow must hold for both spellings.
#[test]
fn a_trailing_slash_or_dot_does_not_get_past_a_path_deny() {
    let p = policy(
        r#"
default = "allow"

[[tool]]
name = "no-key"
tools = ["fs/*"]
decision = "deny"
when = { path = { glob = "/data/secret/key.txt" } }

[[tool]]
name = "no-txt"
tools = ["fs/write"]
decision = "deny"
when = { path = { glob = "/data/**/*.txt" } }
"#,
    );
    let d = |tool_name: &str, path: &str| p.evaluate(&tool(tool_name, &json!({ "path": path }))).outcome;
    for path in [
        "/data/secret/key.txt",
        "/data/secret/key.txt/",
        "/data/secret/key.txt/.",
        "/data/secret/key.txt/x/..",
        "/data/secret//key.txt//",
    ] {
        assert_eq!(d("fs/read", path), Outcome::Deny, "{path}");
    }
    for path in ["/data/public.txt/", "/data/public.txt/."] {
        assert_eq!(d("fs/write", path), Outcome::Deny, "{path}");
    }
    assert_eq!(d("fs/write", "/data/public.md"), Outcome::Allow);
}

/// Whitespace before a URL makes it no URL to the policy's parser but a URL to a tool that
/// trims: it is caught by deny and approval globs and allowed by none. A URL with an empty path
/// is requested as `/`, so a `https://host/**` glob covers it.
#[test]
fn url_spellings_a_tool_may_fetch_are_caught() {
    let p = policy(
        r#"
default = "allow"

[[tool]]
name = "no-secret"
tools = ["http-fetch/*"]
decision = "deny"
when = { url = { glob = "http://127.0.0.1:18931/secret/**" } }

[[tool]]
name = "ask-internal"
tools = ["http-fetch/*"]
decision = "require_approval"
when = { url = { glob = "http://internal.example/**" } }

[[tool]]
name = "only-api"
tools = ["http-fetch/post"]
decision = "allow"
when = { url = { glob = "https://api.example.com/**" } }

[[tool]]
name = "no-other-posts"
tools = ["http-fetch/post"]
decision = "deny"

[[tool]]
name = "public-puts"
tools = ["http-fetch/put"]
decision = "allow"
when = { url = { glob = "https://files.example.com/public/*" } }

[[tool]]
name = "no-other-puts"
tools = ["http-fetch/put"]
decision = "deny"
"#,
    );
    let d = |tool_name: &str, url: &str| p.evaluate(&tool(tool_name, &json!({ "url": url }))).outcome;
    for url in [
        "http://127.0.0.1:18931/secret/key.txt",
        // Servers that merge slashes (nginx by default) or decode `%2F` serve these as the
        // denied path.
        "http://127.0.0.1:18931//secret/key.txt",
        "http://127.0.0.1:18931/secret//key.txt",
        "http://127.0.0.1:18931/secret%2Fkey.txt",
        "http://127.0.0.1:18931/secret%2fkey.txt",
        "http://127.0.0.1:18931/public%2F..%2Fsecret/key.txt",
        "http://127.0.0.1:18931/secret%5Ckey.txt",
        " http://127.0.0.1:18931/secret/key.txt",
        "\u{a0}http://127.0.0.1:18931/secret/key.txt",
        "\thttp://127.0.0.1:18931/secret/key.txt",
        "\u{3000}http://127.0.0.1:18931/secret/key.txt",
    ] {
        assert_eq!(d("http-fetch/get", url), Outcome::Deny, "{url:?}");
    }
    for url in [
        "http://internal.example",
        "HTTP://internal.example",
        "http://internal.example/",
    ] {
        assert_eq!(d("http-fetch/get", url), Outcome::RequireApproval, "{url}");
    }
    assert_eq!(d("http-fetch/post", "https://api.example.com/v1"), Outcome::Allow);
    assert_eq!(d("http-fetch/post", " https://api.example.com/v1"), Outcome::Deny);
    assert_eq!(
        d("http-fetch/put", "https://files.example.com/public/a.txt"),
        Outcome::Allow
    );
    // One segment as written, but `/secret` to a server that decodes `%2F` or merges slashes.
    for url in [
        "https://files.example.com/public/..%2Fsecret",
        "https://files.example.com/public/a%2Fb",
        "https://files.example.com//public/a.txt",
    ] {
        assert_eq!(d("http-fetch/put", url), Outcome::Deny, "{url}");
    }
}

/// A tool offered under an alias (`python/run` for `python-exec/run`) is governed by rules on
/// either name, the more severe winning; a session approval of the call as made answers an
/// approval rule on the other name, never a deny.
#[test]
fn rules_on_an_aliased_tools_real_name_apply() {
    let p = policy(
        r#"
default = "allow"

[[tool]]
name = "ask-code"
tools = ["python-exec/*"]
decision = "require_approval"

[[tool]]
name = "no-js"
tools = ["js-exec/*"]
decision = "deny"
"#,
    );
    let args = json!({ "code": "print(1)" });
    let request = |tool: &'static str| PolicyRequest::Tool {
        tool,
        arguments: &args,
        scope: "s",
        principal: "p",
        session: Some("sess"),
        tool_calls_this_turn: 0,
        turn: 1,
    };
    let approvals = SessionApprovals::new();
    let decide = |tool: &'static str, real: &str| p.evaluate_tool_with(&request(tool), Some(real), &approvals).outcome;
    assert_eq!(
        p.evaluate(&request("python/run")).outcome,
        Outcome::Allow,
        "by its alias alone"
    );
    assert_eq!(decide("python/run", "python-exec/run"), Outcome::RequireApproval);
    assert_eq!(decide("javascript/run", "js-exec/run"), Outcome::Deny);
    // A rule on either name decides when the other has none (the default does not count).
    let only = |tools: &str| {
        policy(&format!(
            "default = \"deny\"\n\n[[tool]]\nname = \"py\"\ntools = [\"{tools}\"]\ndecision = \"allow\"\n"
        ))
    };
    for tools in ["python/*", "python-exec/*"] {
        let outcome = only(tools)
            .evaluate_tool_with(&request("python/run"), Some("python-exec/run"), &approvals)
            .outcome;
        assert_eq!(outcome, Outcome::Allow, "{tools}");
    }

    approvals.approve_call(SessionKey::new("s", "p", "sess"), "python/run", &args);
    let p2 = policy(
        r#"
default = "allow"

[[tool]]
name = "ask-both"
tools = ["python-exec/*", "python/*"]
decision = "require_approval"
"#,
    );
    assert_eq!(
        p2.evaluate_tool_with(&request("python/run"), Some("python-exec/run"), &approvals)
            .outcome,
        Outcome::Allow,
        "approved for the session as made"
    );
}

/// Values that would silently change what a rule means are refused at load, naming them: a bound
/// that is not a finite number (bounds nothing), `min` above `max` (never holds), a non-finite
/// `equals`/`one_of` value (TOML `nan` read as JSON null), a pattern with surrounding whitespace
/// (never matches a tool name) and a JSON pointer with an invalid escape (never matches).
#[test]
fn meaningless_conditions_and_patterns_are_refused() {
    let rule = |when: &str, tools: &str| {
        format!(
            "default = \"allow\"\n\n[[tool]]\nname = \"r\"\ntools = [{tools}]\ndecision = \"deny\"\nwhen = {{ {when} }}\n"
        )
    };
    for (when, tools, expected) in [
        ("length = { max = nan }", "\"fs/read\"", "finite"),
        ("length = { min = inf }", "\"fs/read\"", "finite"),
        ("length = { min = 10, max = 1 }", "\"fs/read\"", "min"),
        ("length = { equals = nan }", "\"fs/read\"", "finite"),
        ("length = { one_of = [1, nan] }", "\"fs/read\"", "finite"),
        ("path = { glob = \"/x\" }", "\" fs/read\"", "whitespace"),
        ("path = { glob = \"/x \" }", "\"fs/read\"", "whitespace"),
        ("\"/a~2b\" = { equals = 1 }", "\"fs/read\"", "pointer"),
        ("\"/a~\" = { equals = 1 }", "\"fs/read\"", "pointer"),
    ] {
        let (line, msg) = load_err(&rule(when, tools));
        assert!(line > 0, "{when}");
        assert!(msg.contains(expected), "{when} {tools}: {msg}");
    }
    policy(&rule("\"/a~1b~0c\" = { equals = 1 }", "\"fs/read\""));
    policy(&rule("length = { min = 1, max = 1 }", "\"fs/read\""));
}
