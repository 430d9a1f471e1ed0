//! Crash safety of the durable kernel on a real SQLite file (WAL): a real `keel-debug churn`
//! process is SIGKILLed at random points, then a fresh `keel-debug` recovers and checks the store.
//!
//! What must hold after every kill + `keel-debug recover --advance-secs 120`:
//! - every job the child reported as created (`created KEY ID`, printed after the commit) exists
//!   with that id; keys never name two jobs;
//! - every job is in a legal state consistent with its actions and its event stream
//!   (`keel-debug check` verifies seq numbers, last status event, WAITING_ACTION <=> a pending
//!   action, finished_at, cascades);
//! - ledger usage = sum of the usage rows = sum of settled reservations; no hold is left HELD;
//!   no deny budget is overspent;
//! - every resume token churn reported (on its stdout: tokens never go to a file) still names
//!   its action: a pending one resolves exactly once
//!   (through `keel actions resolve`), anything else is refused as not pending, never unknown.
//!
//! Odd rounds kill two churning processes sharing the file. Set `KEEL_CRASH_SEED` to replay a
//! run's kill schedule.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;
use common::{debug_expect, expect, json, keel_debug};

const ROUNDS: u64 = 12;
const SCOPE: &str = "churn";

/// xorshift64*: the kill schedule, reproducible from the printed seed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n
    }
}

/// The complete lines of `stdout` starting with `prefix`, split at their first space: a line cut
/// by the kill was never fully reported.
fn reported_lines(stdout: &str, prefix: &str) -> Vec<(String, String)> {
    stdout
        .split_inclusive('\n')
        .filter_map(|line| line.strip_suffix('\n')?.strip_prefix(prefix))
        .map(|rest| {
            let (a, b) = rest.split_once(' ').expect("two fields");
            (a.to_string(), b.to_string())
        })
        .collect()
}

/// `created KEY ID` lines.
fn created_lines(stdout: &str) -> Vec<(String, String)> {
    reported_lines(stdout, "created ")
}

/// `token ACTION_ID TOKEN` lines, as (action, token).
fn token_lines(stdout: &str) -> Vec<(String, String)> {
    let tokens = reported_lines(stdout, "token ");
    assert!(tokens.iter().all(|(_, t)| t.len() == 64), "{tokens:?}");
    tokens
}

fn check_store(home: &Path, reported: &HashMap<String, String>, tokens: &[(String, String)]) -> Value {
    // The tokens go to `check` through a pipe, like they came.
    let mut child = keel_debug(home, &["check", "--scope", SCOPE, "--recovered", "--tokens", "--json"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn check");
    let mut stdin = child.stdin.take().unwrap();
    for (action, token) in tokens {
        writeln!(stdin, "{action} {token}").unwrap();
    }
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    let report: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("check printed no JSON ({e}): {}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(
        report["violations"],
        serde_json::json!([]),
        "invariants broken: {report:#}"
    );
    assert_eq!(out.status.code(), Some(0), "{report:#}");
    let checked: u64 = report["tokens"]
        .as_object()
        .unwrap()
        .values()
        .map(|n| n.as_u64().unwrap())
        .sum();
    assert_eq!(
        checked,
        tokens.len() as u64,
        "every reported token was checked: {report:#}"
    );

    // Every reported job is there, under its key, in a legal state.
    let jobs = json(home, &["jobs", "list", "--scope", SCOPE, "--limit", "0", "--json"]);
    let jobs = jobs.as_array().expect("job list");
    let by_key: HashMap<&str, &Value> = jobs
        .iter()
        .filter_map(|j| Some((j["idempotency_key"].as_str()?, j)))
        .collect();
    for (key, id) in reported {
        let job = by_key
            .get(key.as_str())
            .unwrap_or_else(|| panic!("job {key} ({id}) was reported created but is lost"));
        assert_eq!(job["id"].as_str(), Some(id.as_str()), "key {key} names another job");
    }
    for job in jobs {
        let state = job["state"].as_str().unwrap();
        assert!(
            [
                "QUEUED",
                "RUNNING",
                "WAITING_ACTION",
                "SUCCEEDED",
                "FAILED",
                "CANCELLED",
                "TIMED_OUT"
            ]
            .contains(&state),
            "{job}"
        );
    }
    report
}

/// Resolve a few recorded tokens through the CLI: pending ones exactly once, others never.
fn exercise_tokens(home: &Path, tokens: &[(String, String)], rng: &mut Rng) -> (usize, usize) {
    let pending = json(home, &["actions", "list", "--scope", SCOPE, "--json"]);
    let pending: Vec<&str> = pending
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["id"].as_str().unwrap())
        .collect();
    let (mut open, mut closed): (Vec<_>, Vec<_>) = tokens.iter().partition(|(a, _)| pending.contains(&a.as_str()));
    let mut resolved = 0;
    let mut refused = 0;
    for _ in 0..3 {
        if open.is_empty() {
            break;
        }
        let (action, token) = open.swap_remove(rng.below(open.len() as u64) as usize);
        let args = [
            "actions",
            "resolve",
            token.as_str(),
            "--approve",
            "--value",
            "\"ok\"",
            "--json",
        ];
        let first = json(home, &args);
        assert_eq!(first["id"].as_str(), Some(action.as_str()));
        assert_eq!(first["state"], "RESOLVED");
        let again = expect(home, &args, 2);
        let err = String::from_utf8_lossy(&again.stderr);
        assert!(err.contains("RESOLVED, not PENDING"), "second use of a token: {err}");
        resolved += 1;
    }
    for _ in 0..2 {
        if closed.is_empty() {
            break;
        }
        let (action, token) = closed.swap_remove(rng.below(closed.len() as u64) as usize);
        let out = expect(home, &["actions", "resolve", token.as_str(), "--approve"], 2);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&format!("action {action} is ")) && err.contains("not PENDING"),
            "{err}"
        );
        refused += 1;
    }
    (resolved, refused)
}

/// No file under `dir` (the database included: it keeps only hashes) contains any of `tokens`.
fn assert_no_file_holds_a_token(dir: &Path, tokens: &[(String, String)]) {
    assert!(!tokens.is_empty(), "churn reported no token");
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            assert_no_file_holds_a_token(&path, tokens);
            continue;
        }
        let bytes = std::fs::read(&path).unwrap();
        // Every run of 64+ hex digits, lower-cased: where a token written as text would be.
        let runs: Vec<String> = bytes
            .split(|b| !b.is_ascii_hexdigit())
            .filter(|run| run.len() >= 64)
            .map(|run| String::from_utf8_lossy(run).to_ascii_lowercase())
            .collect();
        for (action, token) in tokens {
            assert!(
                !runs.iter().any(|run| run.contains(token.as_str())),
                "{} holds the resume token of action {action} in plain text",
                path.display()
            );
        }
    }
}

#[test]
fn sigkill_at_random_points_loses_nothing() {
    let started = Instant::now();
    let seed = std::env::var("KEEL_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    eprintln!("KEEL_CRASH_SEED={seed}");
    let mut rng = Rng(seed);
    let home = tempfile::tempdir().unwrap();
    let home = home.path();
    let mut reported: HashMap<String, String> = HashMap::new();
    let mut tokens: Vec<(String, String)> = Vec::new();
    let (mut resolved, mut refused, mut kills) = (0, 0, 0);

    for round in 0..ROUNDS {
        // Odd rounds run two churning processes on the same file (two hosts sharing a database).
        let processes = 1 + round % 2;
        let mut children = Vec::new();
        for p in 0..processes {
            let seed_arg = (seed.wrapping_add(round * 2 + p) % 1_000_000).to_string();
            let args = ["churn", "--seed", &seed_arg, "--ops", "1000000", "--workers", "2"];
            let mut child = keel_debug(home, &args)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn churn");
            let mut stdout = child.stdout.take().unwrap();
            let reader = std::thread::spawn(move || {
                let mut text = String::new();
                stdout.read_to_string(&mut text).unwrap();
                text
            });
            children.push((child, reader));
        }
        std::thread::sleep(Duration::from_millis(50 + rng.below(351)));
        for (mut child, reader) in children {
            if let Some(status) = child.try_wait().unwrap() {
                let mut err = String::new();
                child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
                panic!("round {round}: churn ended on its own ({status}): {err}");
            }
            child.kill().expect("SIGKILL churn");
            child.wait().unwrap();
            kills += 1;
            let text = reader.join().unwrap();
            for (key, id) in created_lines(&text) {
                assert!(reported.insert(key.clone(), id).is_none(), "key {key} reported twice");
            }
            tokens.extend(token_lines(&text));
        }

        let out = debug_expect(home, &["recover", "--advance-secs", "120", "--json"], 0);
        let recovery: Value = serde_json::from_slice(&out.stdout).expect("recover --json");
        assert!(recovery["report"].is_object(), "{recovery}");
        let report = check_store(home, &reported, &tokens);
        let (r, f) = exercise_tokens(home, &tokens, &mut rng);
        resolved += r;
        refused += f;
        eprintln!(
            "round {round}: {} jobs reported so far, {} in store, reservations {}, tokens {}",
            reported.len(),
            report["jobs"],
            report["reservations"],
            report["tokens"]
        );
    }

    // After all the crashes, a churn that is left alone finishes cleanly on the same file.
    let out = debug_expect(
        home,
        &["churn", "--seed", "999999999", "--ops", "40", "--workers", "2"],
        0,
    );
    let text = String::from_utf8_lossy(&out.stdout);
    for (key, id) in created_lines(&text) {
        reported.insert(key, id);
    }
    tokens.extend(token_lines(&text));
    debug_expect(home, &["recover", "--advance-secs", "120"], 0);
    let report = check_store(home, &reported, &tokens);
    assert_no_file_holds_a_token(home, &tokens);

    assert_eq!(kills, ROUNDS + ROUNDS / 2);
    assert!(!reported.is_empty(), "churn never got to create a job");
    assert!(report["jobs"].as_u64().unwrap() >= reported.len() as u64);
    eprintln!(
        "{} jobs, {resolved} tokens resolved, {refused} refused, in {:?}",
        reported.len(),
        started.elapsed()
    );
    assert!(
        started.elapsed() < Duration::from_secs(55),
        "took {:?}",
        started.elapsed()
    );
}
