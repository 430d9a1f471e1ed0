//! `keel call` goes through the kernel's one governed path: it is checked against the policy, can
//! wait for an approval, is charged to the scope's budget, leaves a ledger entry with a receipt,
//! and is recorded as a job with events.

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

mod common;

struct Home {
    dir: tempfile::TempDir,
}

impl Home {
    fn with_hello() -> Self {
        let home = Self {
            dir: tempfile::tempdir().unwrap(),
        };
        let hello = keel_testutil::guest("hello");
        common::expect(home.path(), &["install", hello.to_str().unwrap()], 0);
        home
    }

    fn path(&self) -> &std::path::Path {
        self.dir.path()
    }

    fn json(&self, args: &[&str]) -> Value {
        common::json(self.path(), args)
    }

    /// `--json` output of a command that must exit with `code`.
    fn json_exit(&self, args: &[&str], code: i32) -> Value {
        let out = common::expect(self.path(), args, code);
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn policy(&self, text: &str) -> String {
        let path = self.path().join("call-policy.toml");
        std::fs::write(&path, text).unwrap();
        path.to_string_lossy().into_owned()
    }
}

#[test]
fn a_call_leaves_a_ledger_entry_with_its_receipt_and_a_job_with_events() {
    let home = Home::with_hello();
    let report = home.json(&["call", "hello/greet", r#"{"name":"Ada"}"#, "--json"]);
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["output"], json!({"greeting": "Hello, Ada!"}));
    let receipt = &report["receipt"];
    assert!(receipt["wall_us"].as_u64().unwrap() > 0, "{receipt}");
    assert!(receipt["peak_memory_bytes"].as_u64().unwrap() > 0, "{receipt}");
    assert_eq!(
        receipt["output_bytes"],
        json!(r#"{"greeting":"Hello, Ada!"}"#.len()),
        "{receipt}"
    );
    assert_eq!(receipt["http_bytes_sent"], 0);
    let job_id = report["job_id"].as_str().unwrap().to_string();

    // The ledger: one tool-usage entry, charged to the default scope, carrying the same receipt.
    let usage = home.json(&["ledger", "usage", "--json"]);
    assert_eq!(usage["usage"]["tool_calls"], 1, "{usage}");
    let entries = usage["entries"].as_array().unwrap();
    let tool_entries: Vec<&Value> = entries.iter().filter(|e| e["tool"] == "hello/greet").collect();
    assert_eq!(tool_entries.len(), 1, "{usage}");
    assert_eq!(tool_entries[0]["job_id"], json!(job_id));
    assert_eq!(&tool_entries[0]["data"]["receipt"], receipt, "{usage}");

    // The job and its events: started, the tool's start and end, done.
    let shown = home.json(&["jobs", "show", &job_id, "--json"]);
    assert_eq!(shown["job"]["state"], "SUCCEEDED", "{shown}");
    let types: Vec<&str> = shown["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event_type"].as_str().unwrap())
        .collect();
    assert!(
        types.contains(&"tool.start") && types.contains(&"tool.end"),
        "{types:?}"
    );
}

#[test]
fn a_call_the_policy_denies_never_runs_and_is_not_charged() {
    let home = Home::with_hello();
    let policy = home.policy("version = 1\ndefault = \"deny\"\n");
    let out = common::expect(
        home.path(),
        &["call", "hello/greet", r#"{"name":"Ada"}"#, "--policy", &policy],
        1,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("denied by policy"), "{stderr}");
    let report = home.json_exit(
        &[
            "call",
            "hello/greet",
            r#"{"name":"Ada"}"#,
            "--policy",
            &policy,
            "--json",
        ],
        1,
    );
    assert_eq!(report["ok"], false);
    assert_eq!(report["error"]["kind"], "policy_denied", "{report}");
    let usage = home.json(&["ledger", "usage", "--json"]);
    assert_eq!(usage["usage"]["tool_calls"], 0, "{usage}");

    // The home's policy applies without --policy.
    std::fs::copy(&policy, home.path().join("policy.toml")).unwrap();
    common::expect(home.path(), &["call", "hello/greet", r#"{"name":"Ada"}"#], 1);
}

#[test]
fn invalid_arguments_are_refused_by_the_schema_before_the_tool_runs() {
    let home = Home::with_hello();
    let report = home.json_exit(&["call", "hello/greet", r#"{"name":5}"#, "--json"], 1);
    assert_eq!(report["ok"], false);
    assert_eq!(report["error"]["kind"], "invalid_input", "{report}");
    assert!(report["receipt"].is_null(), "the tool never ran: {report}");
}

#[test]
fn a_call_that_needs_approval_waits_for_a_human_in_another_process() {
    let home = Home::with_hello();
    let policy = home.policy(
        "version = 1\ndefault = \"deny\"\n[[tool]]\nname = \"ask\"\ntools = [\"hello/*\"]\ndecision = \"require_approval\"\n",
    );
    let mut child = common::keel(
        home.path(),
        &["call", "hello/greet", r#"{"name":"Bo"}"#, "--policy", &policy],
    )
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    // It says how to approve (on stderr) and waits.
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut said = String::new();
    let until = Instant::now() + Duration::from_secs(120);
    while !said.contains("keel actions approve") && Instant::now() < until {
        let mut line = String::new();
        if stderr.read_line(&mut line).unwrap() == 0 {
            break;
        }
        said.push_str(&line);
    }
    assert!(said.contains("approval required for `hello/greet`"), "{said}");
    let pending = home.json(&["actions", "list", "--json"]);
    let id = pending[0]["id"].as_str().unwrap().to_string();
    common::expect(home.path(), &["actions", "approve", &id], 0);
    let status = common::wait_or_kill(&mut child, Duration::from_secs(120)).expect("the call finishes");
    let mut out = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut out).unwrap();
    assert!(status.success(), "{out}");
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap(),
        json!({"greeting": "Hello, Bo!"})
    );
    let usage = home.json(&["ledger", "usage", "--json"]);
    assert_eq!(usage["usage"]["tool_calls"], 1, "{usage}");
}

#[test]
fn a_call_over_the_scope_budget_is_refused() {
    let home = Home::with_hello();
    common::expect(
        home.path(),
        &[
            "budgets",
            "set",
            "--scope",
            "default",
            "--window",
            "total",
            "--max-tool-calls",
            "1",
            "--on-exceed",
            "deny",
        ],
        0,
    );
    common::expect(home.path(), &["call", "hello/greet", r#"{"name":"A"}"#], 0);
    let report = home.json_exit(&["call", "hello/greet", r#"{"name":"B"}"#, "--json"], 1);
    assert_eq!(report["ok"], false, "{report}");
    assert_eq!(report["error"]["kind"], "budget_exceeded", "{report}");
    let usage = home.json(&["ledger", "usage", "--json"]);
    assert_eq!(usage["usage"]["tool_calls"], 1, "{usage}");
}

/// A home's `policy.toml` that cannot be read (here a symbolic link whose target was moved
/// away) fails closed: the call is refused, never run under allow-all.
#[test]
fn an_unreadable_home_policy_refuses_the_call() {
    let home = Home::with_hello();
    let target = home.path().join("kept-elsewhere.toml");
    std::fs::write(&target, "default = \"deny\"\n").unwrap();
    std::os::unix::fs::symlink(&target, home.path().join("policy.toml")).unwrap();
    let err = common::expect(home.path(), &["call", "hello/greet", r#"{"name":"Ada"}"#], 1);
    assert!(
        String::from_utf8_lossy(&err.stderr).contains("denied"),
        "the policy applies"
    );
    std::fs::remove_file(&target).unwrap();
    let out = common::expect(home.path(), &["call", "hello/greet", r#"{"name":"Ada"}"#], 2);
    let stderr = String::from_utf8_lossy(&out.stderr);
    common::one_clear_line(&stderr);
    assert!(stderr.contains("policy"), "{stderr}");
    assert!(
        out.stdout.is_empty(),
        "nothing ran: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// `keel policy eval` decides what `keel call` would, with the same defaults: no principal
/// unless one is given (it assumed `cli`, so a rule on principal `cli` was reported as denying
/// calls that ran).
#[test]
fn policy_eval_decides_what_a_call_with_the_same_defaults_gets() {
    let home = Home::with_hello();
    let policy = home.policy(
        "default = \"allow\"\n\n[[tool]]\nname = \"no-cli\"\ntools = [\"hello/*\"]\nprincipals = [\"cli\"]\ndecision = \"deny\"\n",
    );
    let args = r#"{"name":"Ada"}"#;
    // The decision, whatever the exit code says about it.
    let eval = |extra: &[&str]| -> Value {
        let mut command = vec![
            "policy",
            "eval",
            "--file",
            &policy,
            "--tool",
            "hello/greet",
            "--args",
            args,
            "--json",
        ];
        command.extend(extra);
        serde_json::from_slice(&common::run(home.path(), &command).stdout).unwrap()
    };
    let allowed = eval(&[]);
    assert_eq!(allowed["outcome"], "ALLOW", "{allowed}");
    common::expect(home.path(), &["call", "--policy", &policy, "hello/greet", args], 0);
    let eval = eval(&["--principal", "cli"]);
    assert_eq!(eval["outcome"], "DENY", "{eval}");
    common::expect(
        home.path(),
        &["call", "--policy", &policy, "--principal", "cli", "hello/greet", args],
        1,
    );
}

/// Ctrl-C stops a call in flight and records it: the guest stops (not at its deadline), the job
/// ends CANCELLED, the attempt is charged, and `keel call` exits 130. (Before, the process died
/// with the call in flight: an effect-free call's job, stored once it had run a second, was left
/// RUNNING for a worker to run again.)
#[test]
fn ctrl_c_stops_a_call_in_flight_and_records_it_cancelled() {
    let home = Home::with_hello();
    let hostile = keel_testutil::guest("keel-test-hostile");
    common::expect(home.path(), &["install", hostile.to_str().unwrap()], 0);
    let started = Instant::now();
    let mut child = common::keel(home.path(), &["call", "hostile/infinite_loop", "{}"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Stored RUNNING once it has run for a second (`store_running_call_after_ms`).
    let running = loop {
        let jobs = home.json(&["jobs", "list", "--json"]);
        if let Some(job) = jobs.as_array().unwrap().first() {
            break job.clone();
        }
        assert!(started.elapsed() < Duration::from_secs(30), "the call never showed up");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(running["state"], "RUNNING", "{running}");
    assert!(common::signal(child.id(), "INT"));
    let status = common::wait_or_kill(&mut child, Duration::from_secs(20)).expect("keel call ends on Ctrl-C");
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("interrupted: the call was cancelled"), "{stderr}");
    assert!(
        started.elapsed() < Duration::from_secs(50),
        "stopped well before its 60 s deadline"
    );
    let jobs = home.json(&["jobs", "list", "--json"]);
    let job = &jobs.as_array().unwrap()[0];
    assert_eq!(job["state"], "CANCELLED", "{job}");
    assert_eq!(job["id"], running["id"]);
    let usage = home.json(&["ledger", "usage", "--json"]);
    assert_eq!(usage["usage"]["tool_calls"], 1, "the attempt is charged: {usage}");
}
