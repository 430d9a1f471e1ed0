//! End-to-end agent jobs through the real `keel` binary: a scripted model file, real guest
//! components (hello + fs), SQLite, several `keel` processes on one Keel home (approvals from a
//! second process, cancel, SIGKILL + restart).
//!
//! Every wait is a poll of the CLI/database for a state, bounded by a timeout; no sleep is an assertion.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

mod common;

const MODEL: &str = "scripted:test";
const WAIT: Duration = Duration::from_secs(20);

/// A fresh Keel home with hello and fs installed (fs: `/data` read-only, `/out` read-write).
struct Home {
    dir: tempfile::TempDir,
}

impl Home {
    /// `script`: the scripted model's turns; `policy`: `policy.toml` (none = allow-all);
    /// `agent`: extra `[agent]` keys.
    fn new(script: Value, policy: Option<&str>, agent: &str) -> Self {
        let home = Self {
            dir: tempfile::tempdir().unwrap(),
        };
        let p = home.path();
        std::fs::create_dir_all(p.join("data")).unwrap();
        std::fs::create_dir_all(p.join("out")).unwrap();
        std::fs::write(p.join("data/notes.txt"), "Keel keeps notes in SQLite.\n").unwrap();
        std::fs::write(p.join("script.json"), json!({ "turns": script }).to_string()).unwrap();
        // Output tokens cost 0.001 each, input tokens are free: a turn's cost is exactly predictable.
        let config = format!(
            "[agent]\nlease_ttl_ms = 1000\npoll_ms = 50\n{agent}\n\n\
             [models.providers.scripted]\nkind = \"scripted\"\nscript = \"script.json\"\n\n\
             [models.providers.scripted.prices.test]\ninput_per_mtok = \"0\"\noutput_per_mtok = \"1000\"\n"
        );
        std::fs::write(p.join("config.toml"), config).unwrap();
        if let Some(policy) = policy {
            std::fs::write(p.join("policy.toml"), policy).unwrap();
        }
        home.expect(&["install", &guest("hello")], 0);
        let data = format!("{}::/data", p.join("data").display());
        let out = format!("{}::/out", p.join("out").display());
        home.expect(
            &[
                "install",
                &guest("keel-plugin-fs"),
                "--allow-read",
                &data,
                "--allow-write",
                &out,
            ],
            0,
        );
        home
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = common::keel(self.path(), args);
        c.env_remove("KEEL_DEBUG_MODEL_DELAY_MS").stdin(Stdio::null());
        c
    }

    fn output(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run keel")
    }

    /// Run, expect exit `code`, return stdout.
    fn expect(&self, args: &[&str], code: i32) -> String {
        let out = self.output(args);
        assert_eq!(out.status.code(), Some(code), "keel {args:?}\n{}", show(&out));
        String::from_utf8(out.stdout).unwrap()
    }

    fn json(&self, args: &[&str]) -> Value {
        serde_json::from_str(&self.expect(args, 0)).expect("JSON output")
    }

    /// `keel run PROMPT --json ...` in the background (optionally with a model delay).
    fn spawn_run(&self, extra: &[&str], model_delay_ms: Option<u64>) -> Child {
        let mut args = vec!["run", "do the thing", "--model", MODEL, "--json"];
        args.extend_from_slice(extra);
        let mut c = self.command(&args);
        if let Some(ms) = model_delay_ms {
            c.env("KEEL_DEBUG_MODEL_DELAY_MS", ms.to_string());
        }
        c.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn keel run")
    }

    /// The only job of this home (every test runs one), once it exists.
    fn the_job(&self) -> String {
        poll("a job", || {
            let jobs = self.json(&["jobs", "list", "--json"]);
            jobs.as_array()?.first()?["id"].as_str().map(str::to_string)
        })
    }

    fn job(&self, id: &str) -> Value {
        self.json(&["jobs", "show", id, "--json"])
    }

    /// Wait until the job has an event matching `f`.
    fn wait_event(&self, id: &str, what: &str, f: impl Fn(&Value) -> bool) {
        poll(what, || {
            let shown = self.job(id);
            shown["events"].as_array()?.iter().any(&f).then_some(())
        })
    }

    /// Wait for the job's pending action; returns its id.
    fn pending_action(&self) -> String {
        poll("a pending action", || {
            let actions = self.json(&["actions", "list", "--json"]);
            actions.as_array()?.first()?["id"].as_str().map(str::to_string)
        })
    }

    fn ledger(&self, job: &str) -> Value {
        self.json(&["ledger", "usage", "--job", job, "--json"])["usage"].clone()
    }

    fn effects(&self) -> String {
        std::fs::read_to_string(self.path().join("out/effects.txt")).unwrap_or_default()
    }
}

fn guest(name: &str) -> String {
    keel_testutil::guest(name).to_string_lossy().into_owned()
}

fn show(out: &Output) -> String {
    format!(
        "exit: {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Poll `f` until it returns `Some`, for at most [`WAIT`].
fn poll<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < WAIT, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Wait for a child to exit (bounded), returning its output.
fn finish(child: Child) -> Output {
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(WAIT) {
        Ok(out) => out.expect("wait for keel"),
        Err(_) => {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            panic!("keel (pid {pid}) did not finish within {WAIT:?}");
        }
    }
}

/// The JSON lines of `keel run/watch --json`: (events, result).
fn lines(out: &Output) -> (Vec<Value>, Value) {
    let mut events = Vec::new();
    let mut result = Value::Null;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}\n{}", show(out)));
        match v["type"].as_str() {
            Some("event") => events.push(v["event"].clone()),
            Some("result") => result = v["result"].clone(),
            _ => panic!("unexpected line {line}"),
        }
    }
    assert!(!result.is_null(), "no result line\n{}", show(out));
    (events, result)
}

fn has(events: &[Value], event_type: &str, tool: &str) -> bool {
    events
        .iter()
        .any(|e| e["event_type"] == event_type && e["data"]["tool"] == tool)
}

fn call(name: &str, arguments: Value) -> Value {
    json!({ "name": name, "arguments": arguments })
}

fn turn(calls: Vec<Value>, output_tokens: u64) -> Value {
    json!({ "tool_calls": calls, "usage": { "input_tokens": 10, "output_tokens": output_tokens } })
}

fn text(t: &str) -> Value {
    json!({ "text": t, "usage": { "input_tokens": 10, "output_tokens": 5 } })
}

fn append_line() -> Value {
    call(
        "fs__write",
        json!({ "path": "/out/effects.txt", "content": "line\n", "mode": "append" }),
    )
}

const ASK_WRITES: &str = r#"
version = 1
default = "allow"

[[tool]]
name = "ask-before-writing"
tools = ["fs/write"]
decision = "require_approval"
reason = "writes need a human"
"#;

#[test]
fn multi_turn_job_with_two_tools() {
    let home = Home::new(
        json!([
            turn(
                vec![
                    call("hello__greet", json!({ "name": "Ada" })),
                    call("fs__read", json!({ "path": "/data/notes.txt" }))
                ],
                5
            ),
            turn(vec![append_line()], 5),
            text("All done."),
        ]),
        None,
        "",
    );
    let out = home.output(&[
        "run",
        "greet, read, write",
        "--tools",
        "hello,fs",
        "--model",
        MODEL,
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("every tool and model call is allowed"),
        "no-policy note missing\n{}",
        show(&out)
    );
    let (events, result) = lines(&out);
    assert_eq!(result["status"], "SUCCEEDED");
    assert_eq!(result["content"], "All done.");
    assert_eq!(result["usage"]["model_calls"], 3);
    assert_eq!(result["usage"]["tool_calls"], 3);
    for tool in ["hello/greet", "fs/read", "fs/write"] {
        assert!(has(&events, "tool.end", tool), "{tool} did not run\n{}", show(&out));
    }
    assert_eq!(home.effects(), "line\n");
    let job = result["job_id"].as_str().unwrap();
    let usage = home.ledger(job);
    assert_eq!(usage["requests"], 3, "{usage}");
    assert_eq!(usage["tool_calls"], 3, "{usage}");

    // Human output of the same kind of job: streamed text, tool lines, result and usage.
    let human = home.expect(&["run", "again", "--tools", "hello,fs", "--model", MODEL], 0);
    assert!(human.contains("✓ hello/greet"), "{human}");
    assert!(human.contains("result: All done."), "{human}");
    assert!(human.contains("usage: 3 turns"), "{human}");
}

#[test]
fn denied_tool_is_reported_to_the_model_and_the_job_finishes() {
    let policy = r#"
version = 1
default = "allow"

[[tool]]
name = "no-writes"
tools = ["fs/write"]
decision = "deny"
reason = "read-only agent"
"#;
    let home = Home::new(
        json!([turn(vec![append_line()], 5), text("Could not write.")]),
        Some(policy),
        "",
    );
    let out = home.output(&["run", "write it", "--tools", "fs", "--model", MODEL, "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let (events, result) = lines(&out);
    assert_eq!(result["status"], "SUCCEEDED");
    assert_eq!(result["usage"]["tool_calls"], 0);
    let denied = events
        .iter()
        .find(|e| e["event_type"] == "tool.error")
        .unwrap_or_else(|| panic!("no tool.error\n{}", show(&out)));
    assert_eq!(denied["data"]["code"], "policy_denied");
    assert!(
        denied["data"]["message"].as_str().unwrap().contains("denied by policy"),
        "{denied}"
    );
    assert_eq!(home.effects(), "");
}

#[test]
fn approval_from_a_second_process() {
    let home = Home::new(
        json!([turn(vec![append_line()], 5), text("Written.")]),
        Some(ASK_WRITES),
        "",
    );
    let run = home.spawn_run(&["--tools", "fs"], None);
    let action = home.pending_action();
    assert_eq!(home.effects(), "", "nothing runs before the approval");
    // The approver sees what is to be approved, not only which tool.
    let listed = home.expect(&["actions", "list"], 0);
    assert!(
        listed.contains(r#"arguments: {"content":"line\n","mode":"append","path":"/out/effects.txt"}"#),
        "{listed}"
    );
    let approved = home.expect(&["actions", "approve", &action], 0);
    assert!(approved.contains("/out/effects.txt"), "{approved}");
    let out = finish(run);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("keel actions approve {action}")),
        "the waiting process says how to approve\n{stderr}"
    );
    let (events, result) = lines(&out);
    assert_eq!(result["status"], "SUCCEEDED");
    assert!(has(&events, "tool.end", "fs/write"));
    assert_eq!(home.effects(), "line\n");
}

#[test]
fn approval_by_resume_token_from_a_second_process() {
    use std::io::BufRead;
    let home = Home::new(
        json!([turn(vec![append_line()], 5), text("Written.")]),
        Some(ASK_WRITES),
        "",
    );
    let mut run = home.spawn_run(&["--tools", "fs"], None);
    // The waiting process prints the one-time token (only it ever sees the token: the kernel
    // stores a hash); read it from its stderr while it waits.
    let stderr = run.stderr.take().expect("piped stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(rest) = line.split("keel actions resolve ").nth(1) {
                let _ = tx.send(rest.split_whitespace().next().unwrap_or_default().to_string());
            }
        }
    });
    let token = rx
        .recv_timeout(WAIT)
        .expect("the waiting process prints a resume token");
    assert_eq!(token.len(), 64, "256-bit hex token: {token}");
    assert_eq!(home.effects(), "", "nothing runs before the approval");
    home.expect(&["actions", "resolve", &token, "--approve"], 0);
    let again = home.output(&["actions", "resolve", &token, "--approve"]);
    assert_ne!(again.status.code(), Some(0), "a token is single-use");
    let out = finish(run);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let (events, result) = lines(&out);
    assert_eq!(result["status"], "SUCCEEDED");
    assert!(has(&events, "tool.end", "fs/write"));
    assert_eq!(home.effects(), "line\n");
}

#[test]
fn a_resume_token_is_never_written_to_a_file() {
    let home = Home::new(
        json!([turn(vec![append_line()], 5), text("Written.")]),
        Some(ASK_WRITES),
        "",
    );
    // stderr redirected to a file (a log): the waiting process says how to answer, without the token.
    let log = home.path().join("run.log");
    let run = home
        .command(&["run", "do the thing", "--model", MODEL, "--json", "--tools", "fs"])
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("spawn keel run");
    let action = home.pending_action();
    let text = poll("the approval note in the log", || {
        let text = std::fs::read_to_string(&log).ok()?;
        text.contains("keel actions approve").then_some(text)
    });
    assert!(text.contains(&action), "{text}");
    assert!(!text.contains("keel actions resolve"), "{text}");
    let hex_runs = text
        .split(|c: char| !c.is_ascii_hexdigit())
        .filter(|run| run.len() >= 64)
        .count();
    assert_eq!(hex_runs, 0, "a token-like secret reached the log: {text}");
    home.expect(&["actions", "approve", &action], 0);
    let out = finish(run);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_eq!(home.effects(), "line\n");
}

#[test]
fn approval_denied_from_a_second_process() {
    let home = Home::new(
        json!([turn(vec![append_line()], 5), text("Not written.")]),
        Some(ASK_WRITES),
        "",
    );
    let run = home.spawn_run(&["--tools", "fs"], None);
    let action = home.pending_action();
    home.expect(&["actions", "deny", &action], 0);
    let out = finish(run);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let (events, result) = lines(&out);
    assert_eq!(result["status"], "SUCCEEDED");
    assert_eq!(result["content"], "Not written.");
    let refused = events
        .iter()
        .find(|e| e["event_type"] == "tool.error")
        .expect("tool.error");
    assert_eq!(refused["data"]["code"], "approval_denied");
    assert_eq!(home.effects(), "");
}

#[test]
fn unanswered_approval_expires_and_times_the_job_out() {
    let home = Home::new(
        json!([turn(vec![append_line()], 5), text("Written.")]),
        Some(ASK_WRITES),
        "approval_ttl_secs = 1",
    );
    let out = finish(home.spawn_run(&["--tools", "fs"], None));
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let (events, result) = lines(&out);
    assert_eq!(result["status"], "TIMED_OUT", "{}", show(&out));
    assert!(events.iter().any(|e| e["event_type"] == "action.expired"));
    assert_eq!(home.effects(), "");
}

#[test]
fn budget_runs_out_mid_job() {
    // Each turn costs exactly 0.5 (500 output tokens at 0.001): the second turn is refused.
    let home = Home::new(
        json!([
            turn(vec![call("hello__greet", json!({ "name": "Ada" }))], 500),
            turn(vec![call("hello__greet", json!({ "name": "Bob" }))], 500),
            text("Greeted both."),
        ]),
        None,
        "",
    );
    let out = home.output(&[
        "run",
        "greet",
        "--tools",
        "hello",
        "--model",
        MODEL,
        "--max-cost",
        "0.5",
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let (_, result) = lines(&out);
    assert_eq!(result["status"], "FAILED");
    assert_eq!(result["error"]["code"], "budget_exceeded", "{result}");
    assert_eq!(result["usage"]["model_calls"], 1);
    assert_eq!(result["usage"]["tool_calls"], 1);
    let usage = home.ledger(result["job_id"].as_str().unwrap());
    assert_eq!(usage["requests"], 1, "{usage}");
    assert_eq!(usage["cost"], "0.5", "never more than --max-cost: {usage}");
}

#[test]
fn cancel_from_another_process_mid_job() {
    let home = Home::new(
        json!([
            turn(vec![call("hello__greet", json!({ "name": "Ada" }))], 5),
            turn(vec![call("hello__greet", json!({ "name": "Bob" }))], 5),
            text("Greeted both."),
        ]),
        None,
        "",
    );
    // Each model call takes 2 s in the running process: the cancel lands during turn 2.
    let run = home.spawn_run(&["--tools", "hello"], Some(2000));
    let job = home.the_job();
    home.wait_event(&job, "the first tool call", |e| e["event_type"] == "tool.end");
    home.expect(&["jobs", "cancel", &job], 0);
    let out = finish(run);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let (_, result) = lines(&out);
    assert_eq!(result["status"], "CANCELLED");
    assert_eq!(home.job(&job)["job"]["state"], "CANCELLED");
    let usage = home.ledger(&job);
    assert_eq!(
        usage["requests"], 2,
        "the model call the cancel cut off was made, and is charged as one request: {usage}"
    );
    assert_eq!(usage["tool_calls"], 1, "{usage}");
}

#[test]
fn sigkill_mid_turn_then_watch_resumes_without_rerunning_or_recharging() {
    let home = Home::new(json!([turn(vec![append_line()], 5), text("Written once.")]), None, "");
    // Slow model calls: the host is killed while turn 2's model call is in flight.
    let mut run = home.spawn_run(&["--tools", "fs"], Some(1500));
    let job = home.the_job();
    home.wait_event(&job, "fs/write to finish", |e| {
        e["event_type"] == "tool.end" && e["data"]["tool"] == "fs/write"
    });
    run.kill().expect("SIGKILL keel run");
    run.wait().unwrap();
    assert_eq!(home.job(&job)["job"]["state"], "RUNNING");

    let out = finish(
        home.command(&["jobs", "watch", &job, "--json"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let (_, result) = lines(&out);
    assert_eq!(result["status"], "SUCCEEDED");
    assert_eq!(result["content"], "Written once.");
    assert_eq!(home.effects(), "line\n", "the completed write is not re-run");
    let usage = home.ledger(&job);
    assert_eq!(
        usage["requests"], 3,
        "each answered turn once, and the request the kill cut off (charged on resume): {usage}"
    );
    assert_eq!(usage["tool_calls"], 1, "{usage}");
    assert_eq!(usage["cost"], "0.01", "{usage}");
}

#[test]
fn sigkill_mid_approval_then_approve_and_a_worker_finishes() {
    let home = Home::new(
        json!([turn(vec![append_line()], 5), text("Written once.")]),
        Some(ASK_WRITES),
        "",
    );
    let mut run = home.spawn_run(&["--tools", "fs"], None);
    let action = home.pending_action();
    let job = home.the_job();
    run.kill().expect("SIGKILL keel run");
    run.wait().unwrap();
    assert_eq!(home.job(&job)["job"]["state"], "WAITING_ACTION");
    home.expect(&["actions", "approve", &action], 0);

    let worker = home
        .command(&["worker", "--until-idle"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = finish(worker);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let shown = home.job(&job);
    assert_eq!(shown["job"]["state"], "SUCCEEDED", "{shown}");
    assert_eq!(home.effects(), "line\n", "the approved write ran exactly once");
    let usage = home.ledger(&job);
    assert_eq!(usage["requests"], 2, "{usage}");
    assert_eq!(usage["tool_calls"], 1, "{usage}");
}

#[test]
fn detached_job_runs_when_watched() {
    let home = Home::new(
        json!([
            turn(vec![call("hello__greet", json!({ "name": "Ada" }))], 5),
            text("Hi.")
        ]),
        None,
        "",
    );
    let out = home.expect(&["run", "greet", "--tools", "hello", "--model", MODEL, "--detach"], 0);
    let job = out.trim().to_string();
    assert_eq!(home.job(&job)["job"]["state"], "QUEUED");
    let out = home.output(&["jobs", "watch", &job, "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let (events, result) = lines(&out);
    assert_eq!(result["status"], "SUCCEEDED");
    assert_eq!(events.first().unwrap()["seq"], 1, "watch replays from the first event");
    // Watching a finished job from a sequence number replays only the rest.
    let again = home.output(&["jobs", "watch", &job, "--from", "3", "--json"]);
    let (later, _) = lines(&again);
    assert!(later.iter().all(|e| e["seq"].as_u64().unwrap() > 3));
    assert_eq!(later.len() + 3, events.len());
}

/// `keel demo` with `env` (and `args` before `--plugins`); `tmp` is its TMPDIR.
fn demo(args: &[&str], env: Option<&Path>, tmp: &Path) -> Output {
    let dir: PathBuf = keel_testutil::guest("hello").parent().unwrap().to_path_buf();
    keel_testutil::guest("keel-plugin-fs");
    let mut command = Command::new(env!("CARGO_BIN_EXE_keel"));
    command
        .arg("demo")
        .args(args)
        .arg("--plugins")
        .arg(&dir)
        .env_remove("KEEL_HOME")
        .env_remove("KEEL_LOG")
        .env("TMPDIR", tmp)
        .stdin(Stdio::null());
    if let Some(home) = env {
        command.env("KEEL_HOME", home);
    }
    let out = command.output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("auto-approving `fs/write`"), "{stdout}");
    assert!(stdout.contains("result: Done"), "{stdout}");
    assert!(stdout.contains("Hello, Ada! Summary"), "{stdout}");
    out
}

/// The demo's job, plugins and ledger are in `home`.
fn assert_demo_lives_in(home: &Path) {
    let jobs = common::json(home, &["jobs", "list", "--json"]);
    let jobs = jobs.as_array().unwrap();
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    assert_eq!(jobs[0]["state"], "SUCCEEDED", "{jobs:?}");
    let plugins = common::json(home, &["plugins", "list", "--json"]);
    let mut names: Vec<&str> = plugins
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["fs", "hello"]);
    let usage = common::json(home, &["ledger", "usage", "--json"]);
    assert!(usage["usage"]["tokens"].as_u64().unwrap() > 0, "{usage}");
    assert!(usage["usage"]["tool_calls"].as_u64().unwrap() >= 3, "{usage}");
}

fn entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn demo_runs_offline_in_the_home_it_is_given() {
    let tmp = tempfile::tempdir().unwrap();

    // KEEL_HOME: the demo lives there, not in a temporary home.
    let home = tempfile::tempdir().unwrap();
    let out = demo(&[], Some(home.path()), tmp.path());
    assert_demo_lives_in(home.path());
    #[cfg(unix)]
    for written in [
        "config.toml",
        "policy.toml",
        "demo-script.json",
        "work",
        "work/data/notes.txt",
    ] {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(home.path().join(written))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "{written} is {mode:o}: the home is private");
    }
    assert!(entries(tmp.path()).is_empty(), "{:?}", entries(tmp.path()));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&home.path().display().to_string()), "{stderr}");

    // --home DIR, a directory that does not exist yet: the same.
    let other = tempfile::tempdir().unwrap();
    let flagged = other.path().join("demo-home");
    demo(&["--home", flagged.to_str().unwrap()], None, tmp.path());
    assert_demo_lives_in(&flagged);
    assert!(entries(tmp.path()).is_empty(), "{:?}", entries(tmp.path()));

    // Neither: a fresh temporary home.
    let out = demo(&[], None, tmp.path());
    let made = entries(tmp.path());
    assert!(made.len() == 1 && made[0].starts_with("keel-demo-"), "{made:?}");
    assert_demo_lives_in(&tmp.path().join(&made[0]));
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains(&format!("export KEEL_HOME={}", tmp.path().join(&made[0]).display()))
    );

    // A home whose own config.toml is not the demo's is refused, not overwritten.
    let taken = tempfile::tempdir().unwrap();
    std::fs::write(taken.path().join("config.toml"), "[agent]\npoll_ms = 10\n").unwrap();
    let dir: PathBuf = keel_testutil::guest("hello").parent().unwrap().to_path_buf();
    let refused = common::keel(taken.path(), &["demo", "--plugins", dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(2), "{}", show(&refused));
    common::one_clear_line(&String::from_utf8_lossy(&refused.stderr));
    assert_eq!(
        std::fs::read_to_string(taken.path().join("config.toml")).unwrap(),
        "[agent]\npoll_ms = 10\n"
    );

    // A home with the user's own plugins is refused too: the demo would replace their grants.
    let used = tempfile::tempdir().unwrap();
    let docs = tempfile::tempdir().unwrap();
    let fs = keel_testutil::guest("keel-plugin-fs");
    let allow = docs.path().display().to_string();
    common::expect(
        used.path(),
        &["install", fs.to_str().unwrap(), "--allow-write", &allow],
        0,
    );
    let grants_before = common::json(used.path(), &["plugins", "show", "fs", "--json"])["grants"].clone();
    let refused = common::keel(used.path(), &["demo", "--plugins", dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(2), "{}", show(&refused));
    common::one_clear_line(&String::from_utf8_lossy(&refused.stderr));
    let grants_after = common::json(used.path(), &["plugins", "show", "fs", "--json"])["grants"].clone();
    assert_eq!(grants_after, grants_before, "the user's grants were replaced");
    assert!(
        !used.path().join("config.toml").exists(),
        "the demo wrote into a refused home"
    );

    let missing = Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(["demo", "--plugins", "/nonexistent"])
        .env("KEEL_HOME", home.path())
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("scripts/build-guests"));
}

#[test]
fn run_refuses_bad_requests_with_one_clear_line() {
    let home = Home::new(json!([text("unused")]), None, "");
    let cases: [(&[&str], &str); 4] = [
        (
            &["run", "x", "--tools", "nope", "--model", MODEL],
            "no plugin named `nope`",
        ),
        (
            &["run", "x", "--tools", "hello", "--model", "nowhere:m"],
            "configured provider",
        ),
        (
            &[
                "run",
                "x",
                "--tools",
                "hello",
                "--model",
                MODEL,
                "--timeout",
                "5 parsecs",
            ],
            "duration",
        ),
        (
            &[
                "run",
                "x",
                "--tools",
                "hello",
                "--model",
                MODEL,
                "--policy",
                "/nonexistent.toml",
            ],
            "policy",
        ),
    ];
    for (args, says) in cases {
        let out = home.output(args);
        assert_eq!(out.status.code(), Some(2), "keel {args:?}\n{}", show(&out));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(says), "keel {args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    // A configured provider without its API key is refused up front too.
    let out = home
        .command(&["run", "x", "--tools", "hello", "--model", "openai:gpt-4o-mini"])
        .env_remove("OPENAI_API_KEY")
        .output()
        .expect("run keel");
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("OPENAI_API_KEY"),
        "{}",
        show(&out)
    );
    let jobs = home.json(&["jobs", "list", "--json"]);
    assert_eq!(jobs.as_array().unwrap().len(), 0, "no job was created: {jobs}");
}

/// On a terminal, `keel run` asks; "s" approves this exact call for the rest of the session, so the
/// identical second call is not asked again. Needs util-linux `script` for a pseudo-terminal.
#[test]
fn terminal_prompt_approves_for_the_session() {
    if Command::new("script").arg("--version").output().is_err() {
        eprintln!("skipped: no `script` command for a pseudo-terminal");
        return;
    }
    let home = Home::new(
        json!([
            turn(vec![append_line()], 5),
            turn(vec![append_line()], 5),
            text("Twice.")
        ]),
        Some(ASK_WRITES),
        "",
    );
    let keel = env!("CARGO_BIN_EXE_keel");
    let cmd = format!("{keel} run 'append twice' --tools fs --model {MODEL} --session s1");
    let mut child = Command::new("script")
        .args(["-qfec", &cmd, "/dev/null"])
        .env("KEEL_HOME", home.path())
        .env_remove("KEEL_LOG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Typed ahead: the terminal holds the line until the prompt reads it. Kept open until exit.
    let mut stdin = child.stdin.take().unwrap();
    std::io::Write::write_all(&mut stdin, b"s\n").unwrap();
    let out = finish(child);
    drop(stdin);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("[s]ession"), "{stdout}");
    assert!(stdout.contains("action approved by terminal"), "{stdout}");
    assert!(stdout.contains("result: Twice."), "{stdout}");
    assert_eq!(home.effects(), "line\nline\n");
    let actions = home.json(&["actions", "list", "--all", "--json"]);
    assert_eq!(actions.as_array().unwrap().len(), 1, "asked once: {actions}");
}

/// A home whose scripted model asks for one write, and a job of it run `--detach` under
/// `strict.toml`: a policy denying `fs/write`, as long as a real one (past the length a job keeps
/// inline, so the job names it by sha256). The home, the policy's path and the job's id.
fn detached_read_only_job() -> (Home, String, String) {
    let home = Home::new(
        json!([turn(vec![append_line()], 5), text("Could not write.")]),
        None,
        "",
    );
    let strict = home.path().join("strict.toml");
    let comments = "# Jobs run from this file may read but never write: reviewed 2026-12-04.\n".repeat(12);
    std::fs::write(
        &strict,
        format!("{comments}version = 1\ndefault = \"allow\"\n\n[[tool]]\nname = \"no-writes\"\ntools = [\"fs/write\"]\ndecision = \"deny\"\nreason = \"read-only job\"\n"),
    )
    .unwrap();
    let strict = strict.display().to_string();
    let out = home.expect(
        &[
            "run", "write it", "--tools", "fs", "--model", MODEL, "--detach", "--policy", &strict,
        ],
        0,
    );
    let job = out.trim().to_string();
    (home, strict, job)
}

/// `keel run --detach --policy strict.toml` then `keel worker` (allow-all here): the worker runs
/// the job under the policy recorded with it, so the write is denied. The policy is long, like a
/// real one: the job names it by sha256 and the worker reads its text from the database.
#[test]
fn a_worker_applies_the_policy_recorded_with_a_detached_job() {
    let (home, _, job) = detached_read_only_job();
    let recorded = &home.job(&job)["job"]["input"]["policy"];
    assert!(recorded.get("source").is_none(), "stored apart: {recorded}");
    let worker = home.output(&["worker", "--until-idle"]);
    assert_eq!(worker.status.code(), Some(0), "{}", show(&worker));
    let shown = home.job(&job);
    assert_eq!(shown["job"]["state"], "SUCCEEDED", "{shown}");
    assert_eq!(home.effects(), "", "the worker ran a write the job's policy denies");
    let denied = shown["events"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["event_type"] == "tool.error" && e["data"]["code"] == "policy_denied");
    assert!(denied, "{shown}");
}

/// `keel jobs watch` resumes a detached job under the policy recorded with it, read from the
/// database: the policy file being gone since changes nothing.
#[test]
fn a_watched_job_runs_under_its_recorded_policy_after_the_file_is_gone() {
    let (home, strict, job) = detached_read_only_job();
    std::fs::remove_file(&strict).unwrap();
    let out = home.output(&["jobs", "watch", &job, "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let (events, result) = lines(&out);
    assert_eq!(result["status"], "SUCCEEDED", "{}", show(&out));
    assert_eq!(home.effects(), "", "the watcher ran a write the job's policy denies");
    assert!(
        events
            .iter()
            .any(|e| e["event_type"] == "tool.error" && e["data"]["code"] == "policy_denied"),
        "{}",
        show(&out)
    );
}

/// Issue 8 item 7: a job cancelled by another process settles its holds at once: with a budget of
/// three model requests, the cancelled job used one and the request the cancel cut off is charged
/// (two); the next job is admitted (a leaked hold would have been counted as well).
#[test]
fn a_cancel_from_another_process_frees_the_budget_for_the_next_job() {
    let home = Home::new(
        json!([
            turn(vec![call("hello__greet", json!({ "name": "Ada" }))], 5),
            text("Greeted."),
        ]),
        None,
        "",
    );
    home.expect(
        &[
            "budgets",
            "set",
            "--scope",
            "default",
            "--window",
            "total",
            "--max-requests",
            "3",
        ],
        0,
    );
    // Each model call takes 2 s: the cancel lands during turn 2, whose request is held.
    let run = home.spawn_run(&["--tools", "hello"], Some(2000));
    let job = home.the_job();
    home.wait_event(&job, "the first tool call", |e| e["event_type"] == "tool.end");
    home.expect(&["jobs", "cancel", &job], 0);
    let out = finish(run);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert_eq!(home.ledger(&job)["requests"], 2);
    // The next job's first model call fits (2 used + 1 asked <= 3) unless the cancelled job's hold leaked.
    let out = home.output(&["run", "again", "--model", MODEL, "--json", "--tools", "hello"]);
    let (events, result) = lines(&out);
    let next = result["job_id"].as_str().expect("job id").to_string();
    assert_eq!(
        home.ledger(&next)["requests"],
        1,
        "the next job was refused its first call: {result}\n{events:#?}"
    );
}

/// Issue 8 item 1: a guest computing for three lease lifetimes inside one call (a CPU-bound tool,
/// stopped by its 3 s deadline) does not lose its host the job: a `keel worker` polling the same
/// database meanwhile never takes it over, the call runs once and no "re-run it?" question is asked.
#[test]
fn a_cpu_bound_call_longer_than_the_lease_is_not_taken_over_by_a_worker() {
    let home = Home::new(
        json!([
            turn(vec![call("hostile__infinite_loop", json!({}))], 5),
            text("Gave up on the loop."),
        ]),
        None,
        "",
    );
    home.expect(&["install", &guest("keel-test-hostile"), "--timeout-ms", "3000"], 0);
    let run = home.spawn_run(&["--tools", "hostile"], None);
    let job = home.the_job();
    home.wait_event(&job, "the call to start", |e| e["event_type"] == "tool.start");
    let mut worker = home
        .command(&["worker"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn worker");
    let out = finish(run);
    let _ = worker.kill();
    let _ = worker.wait();
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let (_, result) = lines(&out);
    assert_eq!(result["status"], "SUCCEEDED", "{result}");
    let events = home.job(&job)["events"].as_array().cloned().unwrap_or_default();
    let starts = events.iter().filter(|e| e["event_type"] == "tool.start").count();
    assert_eq!(starts, 1, "the call ran once: {events:#?}");
    let actions = home.json(&["actions", "list", "--all", "--json"]);
    assert_eq!(
        actions.as_array().map(Vec::len),
        Some(0),
        "no re-run question: {actions}"
    );
}
