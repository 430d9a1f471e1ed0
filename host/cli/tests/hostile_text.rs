//! Hostile text, hostile `describe()` answers and private files, through the real `keel` binary:
//! terminal escapes a plugin (or a model) produces never reach the terminal raw, a bad describe
//! answer is refused with one clear line, the Keel home is owner-only, a closed stdout pipe
//! ends `keel` quietly, and `keel mcp` survives its client leaving and a plugin that computes.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

mod common;
use common::one_clear_line;

/// The hostile-describe component with its variant marker set to `mode` (see its crate docs).
fn hostile(dir: &Path, mode: &str) -> String {
    const MARKER: &[u8] = b"KEEL-HOSTILE-DESCRIBE-MODE:";
    let mut bytes = keel_testutil::guest_bytes("keel-test-hostile-describe");
    let at: Vec<usize> = bytes
        .windows(MARKER.len())
        .enumerate()
        .filter(|(_, w)| *w == MARKER)
        .map(|(i, _)| i + MARKER.len())
        .collect();
    assert_eq!(at.len(), 1, "the variant marker must occur exactly once");
    assert!(mode.len() <= 8);
    let padded = format!("{mode:_<8}");
    bytes[at[0]..at[0] + 8].copy_from_slice(padded.as_bytes());
    let path = dir.join(format!("hostile-{mode}.wasm"));
    std::fs::write(&path, bytes).unwrap();
    path.to_string_lossy().into_owned()
}

/// Positions of raw terminal control bytes: C0 other than `\n`, DEL, C1 (UTF-8 `C2 80`–`C2 9F`)
/// and the bidi override U+202E (`E2 80 AE`).
fn raw_controls(bytes: &[u8]) -> Vec<usize> {
    let mut found = Vec::new();
    for (i, &b) in bytes.iter().enumerate() {
        let c1 = b == 0xc2 && matches!(bytes.get(i + 1), Some(0x80..=0x9f));
        let bidi = bytes[i..].starts_with(&[0xe2, 0x80, 0xae]);
        if (b < 0x20 && b != b'\n') || b == 0x7f || c1 || bidi {
            found.push(i);
        }
    }
    found
}

/// Assert neither stream of `out` holds a raw control byte, nor a forged capability line.
fn assert_clean(what: &str, out: &Output) {
    for (name, bytes) in [("stdout", &out.stdout), ("stderr", &out.stderr)] {
        let at = raw_controls(bytes);
        assert!(
            at.is_empty(),
            "{what}: raw control bytes in {name} at {at:?}:\n{}",
            String::from_utf8_lossy(bytes).escape_debug()
        );
        let text = String::from_utf8_lossy(bytes);
        let forged = text
            .lines()
            .filter(|l| l.trim_start().starts_with("requests: nothing"))
            .count();
        assert!(forged <= 1, "{what}: a forged `requests:` line in {name}:\n{text}");
    }
    assert_ne!(out.status.code(), Some(101), "{what}: keel panicked");
}

struct Home {
    dir: tempfile::TempDir,
}

impl Home {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn keel(&self, args: &[&str]) -> Command {
        common::keel(self.path(), args)
    }

    fn run(&self, args: &[&str]) -> Output {
        common::run(self.path(), args)
    }

    fn expect(&self, args: &[&str], code: i32) -> Output {
        common::expect(self.path(), args, code)
    }
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn plugin_text_is_escaped_in_install_show_list_and_call() {
    let home = Home::new();
    let wasm = hostile(home.path(), "text");
    let out = home.expect(&["install", &wasm], 0);
    assert_clean("install", &out);
    let shown = text(&out);
    assert!(shown.contains("\\x1b]52;c;"), "escapes are shown visibly: {shown}");
    assert!(shown.contains("\\u{9b}31m"), "{shown}");
    assert_eq!(
        shown
            .lines()
            .filter(|l| l.trim_start().starts_with("requests:"))
            .count(),
        1,
        "only the real `requests:` line: {shown}"
    );

    for args in [
        &["plugins", "show", "hostile-describe"][..],
        &["plugins", "list"],
        &["plugins", "show", "hostile-describe", "--json"],
        &["plugins", "list", "--json"],
        &["install", &wasm, "--json"],
    ] {
        let out = home.expect(args, 0);
        assert_clean(&format!("{args:?}"), &out);
        if args.contains(&"--json") {
            let value: Value = serde_json::from_slice(&out.stdout).expect("still valid JSON");
            let description = if value.is_array() {
                &value[0]["description"]
            } else {
                &value["description"]
            };
            assert!(
                description.as_str().unwrap().contains("\u{9b}31m"),
                "JSON keeps the exact text, escaped: {value}"
            );
        }
    }

    let out = home.expect(&["call", "hostile-describe/echo"], 0);
    assert_clean("call echo", &out);
    assert!(text(&out).contains("log line\\x1b[2J"), "{}", text(&out));
    // Debug logging prints every plugin log line through `tracing`, which escapes C0 and C1
    // controls itself but not bidi overrides.
    let out = home
        .keel(&["call", "hostile-describe/echo"])
        .env("KEEL_LOG", "debug")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("log line"),
        "{}",
        text(&out)
    );
    assert_clean("call echo with KEEL_LOG=debug", &out);
    let out = home.expect(&["call", "hostile-describe/echo", "--json"], 0);
    assert_clean("call echo --json", &out);
    let value: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(value["output"]["text"], "out\u{1b}[2J\u{9b}31m\u{9b}\u{7f}");
    for tool in ["fail", "deny", "panic"] {
        let out = home.run(&["call", &format!("hostile-describe/{tool}")]);
        assert_eq!(out.status.code(), Some(1), "{tool}: {}", text(&out));
        assert_clean(&format!("call {tool}"), &out);
        // One `error:` line (the panic tool's line says, rightly, that the plugin panicked).
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.lines().count() == 1 && stderr.starts_with("error: "), "{stderr}");
    }
}

#[test]
fn plugin_and_model_text_is_escaped_in_run() {
    let home = Home::new();
    let p = home.path();
    let call = |name: &str| json!({ "name": name, "arguments": {} });
    let usage = json!({ "input_tokens": 1, "output_tokens": 1 });
    let script = json!({ "turns": [
        { "tool_calls": [call("hostile-describe__echo"), call("hostile-describe__fail"), call("hostile-describe__panic")], "usage": usage },
        { "text": "done\u{1b}]0;model-title\u{7}\u{9b}2J\r", "usage": usage },
    ]});
    std::fs::write(p.join("script.json"), script.to_string()).unwrap();
    std::fs::write(
        p.join("config.toml"),
        "[agent]\npoll_ms = 50\n\n[models.providers.scripted]\nkind = \"scripted\"\nscript = \"script.json\"\n",
    )
    .unwrap();
    home.expect(&["install", &hostile(p, "text")], 0);
    for json_lines in [false, true] {
        let mut args = vec!["run", "go", "--tools", "hostile-describe", "--model", "scripted:test"];
        if json_lines {
            args.push("--json");
        }
        let out = home.run(&args);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out));
        assert_clean(&format!("run (json {json_lines})"), &out);
        if !json_lines {
            let shown = text(&out);
            assert!(
                shown.contains("failure\\x1b[2J"),
                "the tool error is shown escaped: {shown}"
            );
            assert!(shown.contains("done\\x1b]0;model-title"), "{shown}");
        }
    }
}

/// Model text (streamed, and the result) cannot pass for Keel's own lines: each of its lines is
/// marked, so a model told by a page it read to print `✓ fs/write` or a usage line does not forge
/// what the terminal says happened.
#[test]
fn model_text_cannot_pass_for_keel_lines() {
    let home = Home::new();
    let p = home.path();
    let forged = "Done.\n✓ fs/write (1 ms)\n? approval required: nothing to see\nusage: 0 turns, 0 model calls";
    let script = json!({ "turns": [
        { "text": forged, "usage": { "input_tokens": 1, "output_tokens": 1 } },
    ]});
    std::fs::write(p.join("script.json"), script.to_string()).unwrap();
    std::fs::write(
        p.join("config.toml"),
        "[agent]\npoll_ms = 50\n\n[models.providers.scripted]\nkind = \"scripted\"\nscript = \"script.json\"\n",
    )
    .unwrap();
    let out = home.expect(&["run", "go", "--model", "scripted:test"], 0);
    let stdout = String::from_utf8_lossy(&out.stdout);
    for fake in ["✓ fs/write", "? approval required: nothing", "usage: 0 turns"] {
        let lines: Vec<&str> = stdout.lines().filter(|l| l.contains(fake)).collect();
        // Once as it streamed, once in the result: each time marked as the model's.
        assert_eq!(lines.len(), 2, "{fake}: {stdout}");
        for line in lines {
            assert!(
                line.starts_with("│ "),
                "a model line passes for keel's: {line:?} in\n{stdout}"
            );
        }
    }
    assert!(stdout.contains("\nresult: Done.\n│ ✓ fs/write"), "{stdout}");
    assert!(
        stdout.lines().any(|l| l.starts_with("usage: 1 turns")),
        "keel's own usage line: {stdout}"
    );
}

/// A job's principal, session and idempotency key are the client's words (an MCP client's name,
/// an API request's body): `keel jobs show` and `keel budgets show` escape them.
#[test]
fn client_chosen_job_and_budget_names_are_escaped() {
    let home = Home::new();
    home.expect(&["install", &keel_testutil::guest("hello").to_string_lossy()], 0);
    let evil = "evil\u{1b}]0;PWNED\u{7}\u{1b}[2J";
    let called = home.expect(
        &[
            "call",
            "hello/greet",
            r#"{"name":"Ada"}"#,
            "--json",
            "--principal",
            evil,
            "--session",
            evil,
            "--idempotency-key",
            evil,
        ],
        0,
    );
    let job: serde_json::Value = serde_json::from_slice(&called.stdout).unwrap();
    let job = job["job_id"].as_str().expect("the job id");
    let shown = home.expect(&["jobs", "show", job], 0);
    assert_clean("jobs show", &shown);
    assert!(text(&shown).contains("principal  evil"), "{}", text(&shown));
    home.expect(
        &[
            "budgets",
            "set",
            "--scope",
            "default",
            "--name",
            evil,
            "--principal",
            evil,
            "--window",
            "daily",
            "--max-tool-calls",
            "5",
        ],
        0,
    );
    assert_clean(
        "budgets show",
        &home.expect(&["budgets", "show", "--scope", "default"], 0),
    );
}

#[test]
fn bad_describe_answers_are_refused_with_one_clear_line() {
    let home = Home::new();
    for (mode, says) in [
        ("version", "the version `1.0.0\\x1b[2J"),
        ("path-e", "\"é\", which is not absolute"),
        ("path-rel", "\"relative\", which is not absolute"),
        ("path-dot", "\"/a/../b\", which is not normalised"),
        ("path-esc", "contains control characters"),
        ("host-esc", "is not a host name"),
        // Refused at install, not as every caller's `invalid_input` later.
        ("schema", "tool `echo` input schema is not a valid JSON Schema"),
        ("oschema", "tool `echo` output schema is not a valid JSON Schema"),
    ] {
        let out = home.run(&["install", &hostile(home.path(), mode)]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{mode}: {}", text(&out));
        assert_clean(mode, &out);
        one_clear_line(&stderr);
        assert!(stderr.contains(says), "{mode}: {stderr}");
    }
    let list = home.expect(&["plugins", "list", "--json"], 0);
    assert_eq!(serde_json::from_slice::<Value>(&list.stdout).unwrap(), json!([]));
}

#[test]
fn a_hundred_thousand_tools_are_refused_quickly() {
    let home = Home::new();
    let wasm = hostile(home.path(), "many");
    // Compile once first, so the timing below is the describe step and its checks.
    let _ = home.run(&["install", &hostile(home.path(), "text")]);
    let started = Instant::now();
    let out = home.run(&["install", &wasm]);
    let took = started.elapsed();
    eprintln!("install of a 100,000-tool plugin refused in {took:?}");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    one_clear_line(&stderr);
    assert!(stderr.contains("100000 tools, more than the limit of 1000"), "{stderr}");
    assert!(took < Duration::from_secs(10), "took {took:?}");
}

#[cfg(unix)]
fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[cfg(unix)]
fn assert_private(home: &Path) {
    for dir in ["", "cache", "components"] {
        let path = home.join(dir);
        assert_eq!(mode(&path), 0o700, "{}", path.display());
    }
    assert_eq!(mode(&home.join("keel.db")), 0o600);
    for file in ["keel.db-wal", "keel.db-shm"] {
        let path = home.join(file);
        if path.exists() {
            assert_eq!(mode(&path), 0o600, "{}", path.display());
        }
    }
}

#[cfg(unix)]
#[test]
fn the_keel_home_and_database_are_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let base = tempfile::tempdir().unwrap();
    let home: PathBuf = base.path().join("fresh/keel");
    let wasm = keel_testutil::guest("hello");
    common::expect(&home, &["install", wasm.to_str().unwrap()], 0);
    assert_private(&home);

    common::expect(&home, &["jobs", "list"], 0);
    assert_private(&home);

    // An existing home from an older Keel (0755, database 0644) is tightened on first use.
    for (path, mode) in [("", 0o755), ("cache", 0o755), ("components", 0o755), ("keel.db", 0o644)] {
        std::fs::set_permissions(home.join(path), std::fs::Permissions::from_mode(mode)).unwrap();
    }
    common::expect(&home, &["plugins", "list"], 0);
    assert_private(&home);
    // ... also by the commands that open only the database.
    std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(home.join("keel.db"), std::fs::Permissions::from_mode(0o644)).unwrap();
    common::expect(&home, &["jobs", "list"], 0);
    assert_private(&home);
}

/// Grants are shown terminal-safe: a granted directory's name (or a network pattern stored by an
/// older Keel) cannot set the window title or rewrite the listing.
#[test]
fn grants_are_listed_with_control_characters_escaped() {
    let base = tempfile::tempdir().unwrap();
    let home = base.path().join("home");
    let odd = base.path().join("data\x1b]0;pwned\x07");
    std::fs::create_dir(&odd).unwrap();
    let fs = keel_testutil::guest("keel-plugin-fs");
    let allow = odd.display().to_string();
    let installed = common::expect(&home, &["install", fs.to_str().unwrap(), "--allow-read", &allow], 0);
    let granted = common::expect(&home, &["plugins", "grant", "fs", "--allow-write", &allow], 0);
    for out in [
        installed,
        granted,
        common::expect(&home, &["plugins", "list"], 0),
        common::expect(&home, &["plugins", "show", "fs"], 0),
    ] {
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            !text.contains('\x1b') && !text.contains('\x07'),
            "raw control characters: {text:?}"
        );
    }
    let refused = common::expect(&home, &["plugins", "grant", "fs", "--allow-net", "\x1b[31mevil.com"], 2);
    assert!(!String::from_utf8_lossy(&refused.stderr).contains('\x1b'));
}

/// A directory named as the home by mistake is not taken over: a shared one (sticky bit, like
/// `/tmp`) is refused untouched, and one that holds other files and no Keel database (a project,
/// `$HOME`) keeps its mode (Keel's own files in it are still private).
#[cfg(unix)]
#[test]
fn a_directory_that_is_not_a_keel_home_keeps_its_mode() {
    use std::os::unix::fs::PermissionsExt;
    let full_mode = |path: &Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o7777;
    let base = tempfile::tempdir().unwrap();
    let shared = base.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
    for args in [&["plugins", "list"][..], &["jobs", "list"][..]] {
        let out = common::expect(&shared, args, 2);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("not a Keel home") && err.contains("sticky"), "{err}");
        assert_eq!(full_mode(&shared), 0o1777, "the shared directory was changed");
        assert_eq!(
            std::fs::read_dir(&shared).unwrap().count(),
            0,
            "files were written into it"
        );
    }
    let project = base.path().join("project");
    std::fs::create_dir(&project).unwrap();
    std::fs::write(project.join("README"), "mine").unwrap();
    std::fs::set_permissions(&project, std::fs::Permissions::from_mode(0o755)).unwrap();
    for _ in 0..2 {
        common::expect(&project, &["plugins", "list"], 0);
        assert_eq!(full_mode(&project), 0o755, "the project's mode was changed");
    }
    assert_eq!(mode(&project.join("keel.db")), 0o600);
    assert_eq!(mode(&project.join("cache")), 0o700);
}

#[cfg(unix)]
#[test]
fn a_closed_stdout_ends_keel_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let home = Home::new();
    let hello = keel_testutil::guest("hello");
    for args in [vec!["install", hello.to_str().unwrap()], vec!["plugins", "list"]] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = home
            .keel(&args)
            .stdout(Stdio::from(writer))
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.code().is_none() && out.status.signal() == Some(libc_sigpipe()),
            "{args:?}: ended by SIGPIPE, not {:?}: {stderr}",
            out.status
        );
        assert!(stderr.is_empty(), "{args:?}: nothing on stderr: {stderr}");
    }
    // The install completed before the write failed.
    let list: Value = serde_json::from_slice(&home.expect(&["plugins", "list", "--json"], 0).stdout).unwrap();
    assert_eq!(list[0]["name"], "hello");
}

/// `keel mcp` on `home`, initialized by a raw JSON-RPC client: its stdin, its stdout and the child.
fn keel_mcp_session(
    home: &Home,
) -> (
    std::process::ChildStdin,
    std::io::BufReader<std::process::ChildStdout>,
    std::process::Child,
) {
    use std::io::{BufRead as _, BufReader};
    let mut child = home
        .keel(&["mcp"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    send(
        &mut stdin,
        json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}),
    )
    .unwrap();
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert!(line.contains("\"result\""), "{line}");
    send(
        &mut stdin,
        json!({"jsonrpc": "2.0", "method": "notifications/initialized"}),
    )
    .unwrap();
    (stdin, stdout, child)
}

/// Send one JSON-RPC message on a `keel mcp` session's stdin.
fn send(stdin: &mut std::process::ChildStdin, message: Value) -> std::io::Result<()> {
    use std::io::Write as _;
    writeln!(stdin, "{message}").and_then(|()| stdin.flush())
}

/// `hostile/spin_ms` granted a writable directory (`/marks`), as two `keel mcp` tests call it.
fn install_spinner(home: &Home, marks: &Path) {
    let hostile = keel_testutil::guest("keel-test-hostile");
    let grant = format!("{}::/marks", marks.display());
    home.expect(&["install", hostile.to_str().unwrap(), "--allow-write", &grant], 0);
}

/// A server outlives its client: `keel mcp` whose client stops reading with a call in flight ends
/// the session with that call ended and recorded, not by SIGPIPE with its job left running (and
/// its budget hold held). The call is cancelled (the client is gone: nobody can read its result),
/// its guest stopped and its attempt charged. When that happens depends on rmcp: after stdin ends
/// it lets handlers in flight finish for up to 5 s (a client may close stdin and still read), and
/// cancels them at once only if an answer fails to write in that time (here the `tools/list` answer,
/// unless it was written, and failed, before stdin's end was read). So the call outlasts 5 s.
#[test]
fn keel_mcp_finishes_its_calls_when_the_client_stops_reading() {
    use std::os::unix::process::ExitStatusExt;
    let home = Home::new();
    let marks = tempfile::tempdir().unwrap();
    install_spinner(&home, marks.path());
    let (mut stdin, stdout, mut child) = keel_mcp_session(&home);
    send(
        &mut stdin,
        json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
        "params": {"name": "hostile__spin_ms", "arguments": {"dir": "/marks", "ms": 9000}}}),
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    drop(stdout);
    let _ = send(&mut stdin, json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}));
    // The client is gone: its end of stdin closes too.
    drop(stdin);
    let status = common::wait_or_kill(&mut child, Duration::from_secs(30));
    let status = status.expect("keel mcp ends once its client is gone");
    assert_ne!(status.signal(), Some(libc_sigpipe()), "keel mcp was killed by SIGPIPE");
    let jobs: Value = serde_json::from_slice(&home.expect(&["jobs", "list", "--json"], 0).stdout).unwrap();
    let jobs = jobs.as_array().unwrap();
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    assert_eq!(jobs[0]["state"], "CANCELLED", "the call in flight was ended: {jobs:?}");
    let usage = common::json(home.path(), &["ledger", "usage", "--json"]);
    assert_eq!(usage["usage"]["tool_calls"], 1, "the attempt is charged: {usage}");
}

/// `keel mcp` runs on one worker thread: a plugin that computes without pause must not hold it.
/// A short call made while a long one spins is answered first, and so is a `ping`.
#[test]
fn keel_mcp_answers_while_a_plugin_computes() {
    use std::io::BufRead as _;
    let home = Home::new();
    let marks = tempfile::tempdir().unwrap();
    install_spinner(&home, marks.path());
    let (mut stdin, mut stdout, mut child) = keel_mcp_session(&home);
    let spin = |id: u64, ms: u64| {
        json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
            "params": {"name": "hostile__spin_ms", "arguments": {"dir": "/marks", "ms": ms}}})
    };
    send(&mut stdin, spin(1, 4000)).unwrap();
    // The long call is computing (its marker is written before it spins).
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::fs::read_dir(marks.path()).unwrap().next().is_none() {
        assert!(Instant::now() < deadline, "the long call never started");
        std::thread::sleep(Duration::from_millis(10));
    }
    send(&mut stdin, json!({"jsonrpc": "2.0", "id": 2, "method": "ping"})).unwrap();
    send(&mut stdin, spin(3, 10)).unwrap();
    let mut answered = Vec::new();
    for _ in 0..3 {
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        let answer: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(answer.get("error").is_none(), "{answer}");
        answered.push(answer["id"].as_u64().unwrap());
    }
    assert_eq!(
        answered,
        [2, 3, 1],
        "the ping and the short call are answered while the long one spins"
    );
    drop(stdin);
    common::wait_or_kill(&mut child, Duration::from_secs(30)).expect("keel mcp ends with its client");
}

/// SIGPIPE is 13 on every Unix Keel builds for.
fn libc_sigpipe() -> i32 {
    13
}

#[test]
fn exec_keeps_program_failure_apart_from_keel_errors() {
    let home = Home::new();
    let cmd = keel_testutil::guest("keel-test-cmd");
    let cmd = cmd.to_str().unwrap();
    for code in ["1", "2", "3", "7"] {
        let out = home.run(&["exec", cmd, "--", "exit", code]);
        assert_eq!(out.status.code(), Some(1), "a failing program is 1: {}", text(&out));
        assert!(out.stderr.is_empty(), "{}", text(&out));
    }
    one_clear_line(&String::from_utf8_lossy(
        &home.expect(&["exec", "/nonexistent.wasm"], 2).stderr,
    ));
}
