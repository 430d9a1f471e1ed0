//! Black-box tests of `keel jobs`, `actions`, `ledger` and `budgets` on a real SQLite file.
//! The test seeds state through the kernel API on the same `$KEEL_HOME/keel.db` (as a host
//! process would), then drives the real binary.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;

use chrono::{Duration, Utc};
use keel_kernel::Kernel;
use keel_kernel::action::{ActionType, NewAction, ToolCallRef};
use keel_kernel::job::NewJob;
use keel_kernel::ledger::LedgerKind;
use keel_kernel::ledger::Usage;
use keel_kernel::services::{HoldRequest, SettleDetails};
use rust_decimal::Decimal;
use serde_json::{Value, json};

mod common;

struct Keel {
    home: tempfile::TempDir,
    rt: tokio::runtime::Runtime,
    kernel: Kernel,
}

impl Keel {
    fn new() -> Self {
        let home = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap();
        let db = rt
            .block_on(keel_store::Database::open(&home.path().join("keel.db")))
            .unwrap();
        let kernel = Kernel::new(Arc::new(db.kernel_store()));
        Self { home, rt, kernel }
    }

    fn home(&self) -> &Path {
        self.home.path()
    }

    fn command(&self, args: &[&str]) -> Command {
        common::keel(self.home(), args)
    }

    fn run(&self, args: &[&str]) -> Output {
        common::run(self.home(), args)
    }

    /// Run, expect exit code `code`, return stdout.
    fn expect(&self, args: &[&str], code: i32) -> String {
        String::from_utf8(common::expect(self.home(), args, code).stdout).unwrap()
    }

    /// Run, expect exit code `code` with exactly one `error: ...` line on stderr; return it.
    fn error(&self, args: &[&str], code: i32) -> String {
        let stderr = String::from_utf8(common::expect(self.home(), args, code).stderr).unwrap();
        common::one_clear_line(&stderr);
        stderr
    }

    /// An argument clap itself rejects: exit 2 and a message naming `what`.
    fn rejected(&self, args: &[&str], what: &str) {
        let out = self.run(args);
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert_eq!(out.status.code(), Some(2), "keel {args:?}: {stderr}");
        assert!(stderr.starts_with("error: ") && stderr.contains(what), "{stderr}");
    }

    fn json(&self, args: &[&str]) -> Value {
        serde_json::from_str(&self.expect(args, 0)).expect("JSON output")
    }

    fn job(&self, scope: &str, key: &str, start: bool) -> String {
        self.rt.block_on(async {
            let mut new = NewJob::new(scope, "agent");
            new.idempotency_key = Some(key.into());
            let job = self.kernel.jobs().create(new).await.unwrap().job;
            if start {
                self.kernel.jobs().start(job.id).await.unwrap();
            }
            job.id.to_string()
        })
    }

    fn action(&self, job: &str, action_type: ActionType) -> (String, String) {
        self.rt.block_on(async {
            let call = (action_type == ActionType::Approval).then(|| ToolCallRef {
                tool: "fs/write".into(),
                arguments: json!({"path": "/tmp/x"}),
            });
            let created = self
                .kernel
                .actions()
                .create(NewAction {
                    job_id: job.parse().unwrap(),
                    action_type,
                    title: format!("please {action_type}"),
                    request: json!({}),
                    call,
                    ttl: Duration::hours(1),
                })
                .await
                .unwrap();
            (created.action.id.to_string(), created.token)
        })
    }
}

#[test]
fn jobs_list_show_cancel() {
    let keel = Keel::new();
    let queued = keel.job("acme", "k1", false);
    let parent = keel.job("acme", "k2", true);
    let child = keel.rt.block_on(async {
        let mut new = NewJob::new("acme", "child");
        new.parent_id = Some(parent.parse().unwrap());
        let job = keel.kernel.jobs().create(new).await.unwrap().job;
        keel.kernel.jobs().start(job.id).await.unwrap();
        keel.kernel
            .jobs()
            .progress(job.id, 0.5, Some("halfway".into()))
            .await
            .unwrap();
        job.id.to_string()
    });
    keel.job("other", "k1", false);

    let all = keel.json(&["jobs", "list", "--scope", "acme", "--json"]);
    assert_eq!(all.as_array().unwrap().len(), 3, "{all}");
    let running = keel.json(&["jobs", "list", "--scope", "acme", "--state", "running", "--json"]);
    let ids: Vec<&str> = running
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 2);
    assert!(ids.contains(&parent.as_str()) && ids.contains(&child.as_str()));
    let queued_list = keel.json(&["jobs", "list", "--scope", "acme", "--state", "QUEUED", "--json"]);
    assert_eq!(queued_list[0]["id"], queued.as_str());
    assert!(keel.expect(&["jobs", "list"], 0).contains("no jobs in scope default"));
    let table = keel.expect(&["jobs", "list", "--scope", "acme"], 0);
    assert!(
        table.contains(&child) && table.contains("RUNNING") && table.contains("50%"),
        "{table}"
    );
    keel.rejected(
        &["jobs", "list", "--state", "sleeping"],
        "unknown job state \"sleeping\"",
    );

    let shown = keel.json(&["jobs", "show", &child, "--scope", "acme", "--json"]);
    assert_eq!(shown["job"]["state"], "RUNNING");
    assert_eq!(shown["job"]["progress_message"], "halfway");
    let seqs: Vec<u64> = shown["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, vec![1, 2, 3], "{shown}");
    assert_eq!(shown["events"][2]["event_type"], "progress");
    let human = keel.expect(&["jobs", "show", &child, "--scope", "acme"], 0);
    assert!(
        human.contains("progress   50% (halfway)") && human.contains("job.started"),
        "{human}"
    );
    // Other tenants' jobs do not exist for this scope.
    assert!(
        keel.error(&["jobs", "show", &child, "--scope", "other"], 2)
            .contains("not found")
    );
    assert!(
        keel.error(&["jobs", "show", "not-a-uuid"], 2)
            .contains("not a valid job id")
    );

    // Cancelling the parent cancels the child too.
    let cancelled = keel.json(&[
        "jobs",
        "cancel",
        &parent,
        "--scope",
        "acme",
        "--reason",
        "operator said so",
        "--json",
    ]);
    assert_eq!(cancelled["state"], "CANCELLED");
    assert_eq!(cancelled["error"]["message"], "operator said so");
    let shown = keel.json(&["jobs", "show", &child, "--scope", "acme", "--json"]);
    assert_eq!(shown["job"]["state"], "CANCELLED");
    assert!(
        keel.error(&["jobs", "cancel", &parent, "--scope", "acme"], 2)
            .contains("already finished (CANCELLED)")
    );
    assert!(
        keel.error(&["jobs", "cancel", &queued, "--scope", "other"], 2)
            .contains("not found")
    );
    assert!(
        keel.expect(&["jobs", "cancel", &queued, "--scope", "acme"], 0)
            .contains("cancelled job")
    );
}

#[test]
fn actions_approve_deny_resolve() {
    let keel = Keel::new();
    let j1 = keel.job("default", "j1", true);
    let j2 = keel.job("default", "j2", true);
    let j3 = keel.job("default", "j3", true);
    let (approval, approval_token) = keel.action(&j1, ActionType::Approval);
    let (input, input_token) = keel.action(&j2, ActionType::Input);
    let (confirm, confirm_token) = keel.action(&j3, ActionType::Confirm);

    let pending = keel.json(&["actions", "list", "--json"]);
    assert_eq!(pending.as_array().unwrap().len(), 3);
    let of_j1 = keel.json(&["actions", "list", "--job", &j1, "--json"]);
    assert_eq!(of_j1.as_array().unwrap().len(), 1);
    assert_eq!(of_j1[0]["id"], approval.as_str());
    assert!(of_j1[0].get("token").is_none() && !of_j1.to_string().contains(&approval_token));
    assert!(
        keel.expect(&["actions", "list", "--scope", "elsewhere"], 0)
            .contains("no matching actions")
    );

    // Operator approval by id; the job resumes; a second decision is refused.
    assert!(
        keel.error(&["actions", "approve", &approval, "--scope", "elsewhere"], 2)
            .contains("not found")
    );
    let approved = keel.json(&["actions", "approve", &approval, "--by", "alice", "--json"]);
    assert_eq!(approved["state"], "RESOLVED");
    assert_eq!(approved["resolution"]["approved"], true);
    assert_eq!(approved["resolution"]["resolved_by"], "alice");
    assert_eq!(keel.json(&["jobs", "show", &j1, "--json"])["job"]["state"], "RUNNING");
    assert!(
        keel.error(&["actions", "deny", &approval], 2)
            .contains("RESOLVED, not PENDING")
    );
    // ... and its token is spent too.
    assert!(
        keel.error(&["actions", "resolve", &approval_token, "--approve"], 2)
            .contains("not PENDING")
    );

    let denied = keel.expect(&["actions", "deny", &confirm], 0);
    assert!(denied.contains(&format!("denied action {confirm}")), "{denied}");

    // A token resolves once, from the command line or stdin.
    assert!(
        keel.error(&["actions", "resolve", &input_token, "--value", "{not json"], 2)
            .contains("--value is not valid JSON")
    );
    let mut child = keel
        .command(&["actions", "resolve", "-", "--value", r#"{"text":"hi"}"#, "--json"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{input_token}\n").as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let resolved: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(resolved["id"], input.as_str());
    assert_eq!(resolved["resolution"]["value"]["text"], "hi");
    assert!(
        keel.error(&["actions", "resolve", &input_token], 2)
            .contains("not PENDING")
    );
    assert!(
        keel.error(&["actions", "resolve", &"0".repeat(64)], 2)
            .contains("invalid resume token")
    );
    let _ = confirm_token;

    let none = keel.json(&["actions", "list", "--json"]);
    assert_eq!(none, json!([]));
    let all = keel.json(&["actions", "list", "--all", "--json"]);
    assert_eq!(all.as_array().unwrap().len(), 3);
    let resolved = keel.json(&["actions", "list", "--state", "resolved", "--json"]);
    assert_eq!(resolved.as_array().unwrap().len(), 3);

    // An approval needs a verdict.
    let j4 = keel.job("default", "j4", true);
    let (_, token) = keel.action(&j4, ActionType::Approval);
    assert!(
        keel.error(&["actions", "resolve", &token], 2)
            .contains("needs approved")
    );
    let out = keel.expect(&["actions", "resolve", &token, "--deny"], 0);
    assert!(out.contains("denied action"), "{out}");
}

#[test]
fn budgets_and_ledger_usage() {
    let keel = Keel::new();
    assert!(
        keel.expect(&["budgets", "show", "--scope", "acme"], 0)
            .contains("no budgets in scope acme")
    );
    assert!(
        keel.error(&["budgets", "set", "--scope", "acme", "--window", "daily"], 2)
            .contains("at least one of")
    );
    keel.rejected(
        &[
            "budgets",
            "set",
            "--scope",
            "acme",
            "--window",
            "weekly",
            "--max-tokens",
            "5",
        ],
        "unknown window \"weekly\"",
    );
    keel.rejected(
        &[
            "budgets",
            "set",
            "--scope",
            "acme",
            "--window",
            "daily",
            "--max-cost=-1",
        ],
        "is negative",
    );
    assert!(
        keel.error(
            &[
                "budgets",
                "set",
                "--scope",
                "acme",
                "--window",
                "daily",
                "--max-cost",
                "0.0000000001"
            ],
            2
        )
        .contains("more than 9 decimal places")
    );
    keel.error(
        &[
            "budgets",
            "set",
            "--scope",
            "acme",
            "--window",
            "daily",
            "--max-tokens",
            "5",
            "--warn-at",
            "1.5",
        ],
        2,
    );

    let first = keel.json(&[
        "budgets",
        "set",
        "--scope",
        "acme",
        "--window",
        "daily",
        "--max-tokens",
        "1000",
        "--json",
    ]);
    let again = keel.json(&[
        "budgets",
        "set",
        "--scope",
        "acme",
        "--window",
        "daily",
        "--max-tokens",
        "2000",
        "--max-cost",
        "1.50",
        "--on-exceed",
        "warn",
        "--json",
    ]);
    assert_eq!(
        first["id"], again["id"],
        "set replaces the budget of the same subject and window"
    );
    let alice = keel.json(&[
        "budgets",
        "set",
        "--scope",
        "acme",
        "--principal",
        "alice",
        "--window",
        "request",
        "--max-tokens",
        "500",
        "--json",
    ]);
    assert_eq!(alice["window"], "per_request");
    assert_ne!(alice["id"], first["id"]);

    // Usage through reserve -> settle (as the agent loop does), one call by alice, one by bob.
    keel.rt.block_on(async {
        for (who, tokens, cost) in [("alice", 300, "0.25"), ("bob", 100, "0.05")] {
            let amount = Usage {
                tokens,
                cost: cost.parse::<Decimal>().unwrap(),
                requests: 1,
                tool_calls: 0,
            };
            let mut hold = HoldRequest {
                tenant: "acme".into(),
                principal: Some(who.into()),
                session: None,
                job_id: None,
                amount: amount.clone(),
                ttl: None,
            };
            let held = keel.kernel.ledger().reserve(hold.clone()).await.unwrap();
            keel.kernel
                .ledger()
                .settle(
                    held.reservation.id,
                    LedgerKind::ModelUsage,
                    amount,
                    SettleDetails::default(),
                )
                .await
                .unwrap();
            // alice's per-request budget refuses a call over 500 tokens.
            hold.amount.tokens = 501;
            assert_eq!(keel.kernel.ledger().reserve(hold).await.is_err(), who == "alice");
        }
    });

    let report = keel.json(&["budgets", "show", "--scope", "acme", "--json"]);
    let daily = report
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["budget"]["window"] == "daily")
        .unwrap();
    assert_eq!(daily["used"]["tokens"], 400);
    assert_eq!(daily["used"]["cost"], "0.3");
    assert_eq!(daily["budget"]["strategy"], "warn");
    let human = keel.expect(&["budgets", "show", "--scope", "acme"], 0);
    assert!(human.contains("tokens      400 of 2000 (20.0%)"), "{human}");
    assert!(
        human.contains("limit 500 per request") && human.contains("principal alice"),
        "{human}"
    );

    let usage = keel.json(&["ledger", "usage", "--scope", "acme", "--json"]);
    assert_eq!(usage["usage"]["tokens"], 400);
    assert_eq!(usage["usage"]["requests"], 2);
    let alice_usage = keel.json(&["ledger", "usage", "--scope", "acme", "--principal", "alice", "--json"]);
    assert_eq!(alice_usage["usage"]["tokens"], 300);
    assert_eq!(alice_usage["usage"]["cost"], "0.25");
    let today = Utc::now().date_naive().to_string();
    let tomorrow = (Utc::now().date_naive() + Duration::days(1)).to_string();
    let yesterday = (Utc::now().date_naive() - Duration::days(1)).to_string();
    let day = keel.json(&[
        "ledger", "usage", "--scope", "acme", "--since", &today, "--until", &today, "--json",
    ]);
    assert_eq!(day["usage"]["tokens"], 400, "--until DAY includes that whole day");
    let later = keel.json(&["ledger", "usage", "--scope", "acme", "--since", &tomorrow, "--json"]);
    assert_eq!(later["usage"]["tokens"], 0);
    let earlier = keel.json(&["ledger", "usage", "--scope", "acme", "--until", &yesterday, "--json"]);
    assert_eq!(earlier["usage"]["tokens"], 0);
    let rfc = keel.json(&[
        "ledger",
        "usage",
        "--scope",
        "acme",
        "--since",
        "2000-01-01T00:00:00Z",
        "--json",
    ]);
    assert_eq!(rfc["usage"]["tokens"], 400);
    assert!(
        keel.error(&["ledger", "usage", "--since", "last tuesday"], 2)
            .contains("RFC 3339")
    );
    assert!(
        keel.error(&["ledger", "usage", "--since", &today, "--until", &yesterday], 2)
            .contains("must be before")
    );
    let alice_id = alice["id"].as_str().unwrap();
    assert!(
        keel.error(&["budgets", "remove", alice_id], 2)
            .contains("not found in scope default")
    );
    let removed = keel.json(&["budgets", "remove", alice_id, "--scope", "acme", "--json"]);
    assert_eq!(removed["principal"], "alice");
    let left = keel.json(&["budgets", "show", "--scope", "acme", "--json"]);
    assert_eq!(left.as_array().unwrap().len(), 1);
    assert_eq!(left[0]["budget"]["id"], first["id"]);
    let text = keel.expect(&["ledger", "usage", "--scope", "acme", "--principal", "bob"], 0);
    assert!(
        text.contains("tokens      100") && text.contains("cost        0.05"),
        "{text}"
    );
}

#[test]
fn kernel_commands_are_listed_and_keel_has_no_debug_command() {
    let keel = Keel::new();
    let help = keel.expect(&["--help"], 0);
    for command in ["jobs", "actions", "ledger", "budgets"] {
        assert!(help.contains(command), "{help}");
    }
    assert!(!help.contains("debug"), "{help}");
    // Not hidden: gone. The kernel tools are a separate, test-only binary.
    let out = keel.run(&["debug", "check", "--scope", "nothing"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("unrecognized subcommand 'debug'"));
    let out = common::debug_expect(keel.home.path(), &["check", "--scope", "nothing"], 0);
    assert!(String::from_utf8_lossy(&out.stdout).contains("0 violations"));
}
