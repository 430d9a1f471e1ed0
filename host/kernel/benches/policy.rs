//! Policy check latency for a ~20-rule policy.
//!
//! `cargo bench -p keel-kernel --bench policy -- --quick`. Criterion reports the mean; the
//! `policy/p50` lines printed at the end are the medians of single-check timings, which is the
//! number the design tracks (a check must cost around a microsecond or less).

use std::hint::black_box;
use std::time::Instant;

use criterion::Criterion;
use keel_kernel::policy::{
    Decimal, Outcome, Policy, PolicyRequest, SessionApprovalStore, SessionApprovals, SessionKey,
};
use serde_json::{Value, json};

/// 14 tool rules, 3 model rules, 3 constraints.
const POLICY: &str = r#"
default = "deny"

[[tool]]
name = "no-system-writes"
tools = ["fs/write"]
decision = "deny"
[tool.when]
path = { glob = "/{etc,usr,bin,boot,dev,proc,sys}/**" }

[[tool]]
name = "scratch-writes"
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
tools = ["fs/read", "fs/list", "fs/stat"]
decision = "allow"

[[tool]]
name = "http-get"
tools = ["http-fetch/get"]
scopes = ["dev", "research-*"]
decision = "warn"
[tool.when]
url = { glob = "https://api.example.com/**" }

[[tool]]
name = "http-post"
tools = ["http-fetch/post"]
scopes = ["dev"]
decision = "require_approval"

[[tool]]
name = "shell"
tools = ["shell/*"]
decision = "deny"

[[tool]]
name = "python"
tools = ["python-exec/run"]
principals = ["alice", "svc-*"]
decision = "require_approval"

[[tool]]
name = "js"
tools = ["js-exec/*"]
decision = "require_approval"

[[tool]]
name = "search"
tools = ["search/{web,news}"]
decision = "allow"

[[tool]]
name = "mail-internal"
tools = ["mail/send"]
decision = "allow"
[tool.when]
to = { glob = "*@acme.example" }

[[tool]]
name = "mail"
tools = ["mail/*"]
decision = "require_approval"

[[tool]]
name = "calendar"
tools = ["calendar/*"]
decision = "warn"

[[tool]]
name = "kv"
tools = ["kv/get", "kv/put"]
decision = "allow"
[tool.when]
key = { max_len = 256 }

[[model]]
name = "small-models"
models = ["openai/gpt-4o-mini", "anthropic/claude-*haiku*", "local/*"]
decision = "allow"
max_tokens = 8192

[[model]]
name = "frontier-models"
models = ["openai/*", "anthropic/*"]
decision = "require_approval"

[[model]]
name = "experimental"
models = ["*-preview"]
decision = "deny"

[[constraint]]
name = "request-limits"
max_tokens_per_request = 16000
max_cost_per_request = "0.50"

[[constraint]]
name = "soft-cost"
max_cost_per_request = "0.10"
on_violation = "warn"

[[constraint]]
name = "loop-limits"
max_tool_calls_per_turn = 16
max_turns = 50
on_violation = "require_approval"
"#;

fn tool<'a>(name: &'a str, args: &'a Value) -> PolicyRequest<'a> {
    PolicyRequest::Tool {
        tool: name,
        arguments: args,
        scope: "dev",
        principal: "alice",
        session: Some("session-1"),
        tool_calls_this_turn: 3,
        turn: 2,
    }
}

struct Case {
    name: &'static str,
    expect: Outcome,
    run: Box<dyn Fn() -> Outcome>,
}

fn cases() -> Vec<Case> {
    let policy: &'static Policy = Box::leak(Box::new(Policy::from_toml_str(POLICY, "bench").unwrap()));
    let approvals: &'static SessionApprovals = Box::leak(Box::new(SessionApprovals::new()));
    let leak = |v: Value| -> &'static Value { Box::leak(Box::new(v)) };
    let read = leak(json!({"path": "/work/notes.md"}));
    let shell = leak(json!({"cmd": "rm -rf /"}));
    let write = leak(json!({"path": "/home/alice/report.md", "content": "hello"}));
    let kv = leak(json!({"key": "k1", "value": 1}));
    let url = leak(json!({"url": "https://api.example.com/v1/items?page=2"}));
    let respelled = leak(json!({"url": "https://api.example.com/v1/x/../%69tems"}));
    approvals.approve_call(SessionKey::new("dev", "alice", "session-1"), "fs/write", write);
    let cost = Decimal::new(2, 2);
    vec![
        Case {
            name: "tool_allow",
            expect: Outcome::Allow,
            run: Box::new(move || policy.evaluate_with(&tool("fs/read", read), approvals).outcome),
        },
        Case {
            name: "tool_allow_late_rule",
            expect: Outcome::Allow,
            run: Box::new(move || policy.evaluate_with(&tool("kv/get", kv), approvals).outcome),
        },
        Case {
            name: "tool_deny",
            expect: Outcome::Deny,
            run: Box::new(move || policy.evaluate_with(&tool("shell/exec", shell), approvals).outcome),
        },
        Case {
            name: "tool_default_deny",
            expect: Outcome::Deny,
            run: Box::new(move || policy.evaluate_with(&tool("unknown/tool", read), approvals).outcome),
        },
        Case {
            name: "tool_url_glob",
            expect: Outcome::Warn,
            run: Box::new(move || policy.evaluate_with(&tool("http-fetch/get", url), approvals).outcome),
        },
        Case {
            name: "tool_url_glob_respelled",
            expect: Outcome::Warn,
            run: Box::new(move || {
                policy
                    .evaluate_with(&tool("http-fetch/get", respelled), approvals)
                    .outcome
            }),
        },
        Case {
            name: "tool_session_approval_hit",
            expect: Outcome::Allow,
            run: Box::new(move || policy.evaluate_with(&tool("fs/write", write), approvals).outcome),
        },
        Case {
            name: "tool_require_approval_miss",
            expect: Outcome::RequireApproval,
            run: Box::new(move || policy.evaluate_with(&tool("js-exec/run", read), approvals).outcome),
        },
        Case {
            name: "model_allow",
            expect: Outcome::Allow,
            run: Box::new(move || {
                policy
                    .evaluate(&PolicyRequest::Model {
                        model: "anthropic/claude-3-5-haiku-latest",
                        scope: "dev",
                        principal: "alice",
                        max_tokens: 4096,
                        estimated_cost: cost,
                        turn: 2,
                    })
                    .outcome
            }),
        },
    ]
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("policy");
    for case in cases() {
        assert_eq!((case.run)(), case.expect, "{}", case.name);
        group.bench_function(case.name, |b| b.iter(|| black_box((case.run)())));
    }
    group.finish();
}

/// Median of single-check wall times (after warm-up), in nanoseconds.
fn p50_report() {
    const N: usize = 20_000;
    for case in cases() {
        for _ in 0..1_000 {
            black_box((case.run)());
        }
        let mut samples: Vec<u128> = (0..N)
            .map(|_| {
                let t = Instant::now();
                black_box((case.run)());
                t.elapsed().as_nanos()
            })
            .collect();
        samples.sort_unstable();
        println!(
            "policy/p50 {:<28} {:>6} ns   (p99 {} ns)",
            case.name,
            samples[N / 2],
            samples[N * 99 / 100]
        );
    }
}

fn main() {
    // By hand rather than `criterion_group!`, whose generated fn has no doc comment.
    let mut c = Criterion::default().configure_from_args();
    bench(&mut c);
    c.final_summary();
    p50_report();
}
