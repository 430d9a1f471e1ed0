//! `keel exec --lang python|js`: a code step through the installed python-exec / js-exec plugin,
//! as a governed call (it leaves a job and a ledger entry), its output streamed while the code
//! runs, exiting with the code's status. Needs componentize-py (`scripts/setup/python.sh`) and the
//! JS toolchain (`scripts/setup/js-c.sh`).

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use keel_build::Lang;

mod common;
mod langs;

/// A Keel home with the exec plugin at `plugin` installed and a scratch directory granted.
fn exec_home(lang: Lang, plugin: &str, home_name: &str) -> (PathBuf, tempfile::TempDir) {
    let component = langs::build(lang, plugin);
    let home = langs::reusable_home(home_name);
    let scratch = tempfile::tempdir().unwrap();
    let grant = format!("{}::/scratch", scratch.path().display());
    common::expect(
        &home,
        &["install", component.to_str().unwrap(), "--allow-write", &grant],
        0,
    );
    (home, scratch)
}

/// One Keel home with python-exec installed (built once, ~50 s; scratch granted).
fn home() -> &'static (PathBuf, tempfile::TempDir) {
    static HOME: OnceLock<(PathBuf, tempfile::TempDir)> = OnceLock::new();
    HOME.get_or_init(|| exec_home(Lang::Python, "plugins/python-exec", "exec-lang-home"))
}

/// One Keel home with js-exec installed (built once; scratch granted).
fn js_home() -> &'static (PathBuf, tempfile::TempDir) {
    static HOME: OnceLock<(PathBuf, tempfile::TempDir)> = OnceLock::new();
    HOME.get_or_init(|| exec_home(Lang::Js, "plugins/js-exec", "exec-lang-js-home"))
}

/// `keel exec --lang python ARGS` with `stdin`; (exit code, stdout, stderr).
fn exec(home: &Path, args: &[&str], stdin: &str) -> (i32, String, String) {
    exec_lang(home, "python", args, stdin)
}

/// `keel exec --lang LANG ARGS` with `stdin`; (exit code, stdout, stderr).
fn exec_lang(home: &Path, lang: &str, args: &[&str], stdin: &str) -> (i32, String, String) {
    let mut full = vec!["exec", "--lang", lang];
    full.extend_from_slice(args);
    let mut child = common::keel(home, &full)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn code_runs_from_c_or_a_file_with_stdin_and_exits_with_its_status() {
    let (home, _) = home();
    let (code, out, err) = exec(home, &["-c", "print('hello', 6 * 7)"], "");
    assert_eq!((code, out.as_str()), (0, "hello 42\n"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("step.py");
    std::fs::write(
        &file,
        "import sys\ntext = sys.stdin.read()\nprint(text.upper(), end='')\n",
    )
    .unwrap();
    let (code, out, err) = exec(home, &[file.to_str().unwrap(), "--stdin"], "from stdin\n");
    assert_eq!((code, out.as_str()), (0, "FROM STDIN\n"), "{err}");

    let (code, _, err) = exec(
        home,
        &["-c", "import sys\nprint('bye', file=sys.stderr)\nsys.exit(3)"],
        "",
    );
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("bye"), "{err}");

    let (code, _, err) = exec(home, &["-c", "raise ValueError('no good')"], "");
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("ValueError: no good") && err.contains("Traceback"),
        "{err}"
    );

    // Only /scratch exists for the code: the host's files are not there to read.
    let (code, _, err) = exec(home, &["-c", "print(open('/etc/passwd').read())"], "");
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("Error") && err.contains("/etc/passwd"), "{err}");
    assert!(!err.contains("root:"), "{err}");

    // Every step is a governed call: a job of its own, charged in the ledger.
    let jobs = common::json(home, &["jobs", "list", "--json", "--limit", "0"]);
    assert!(jobs.as_array().unwrap().len() >= 5, "{jobs}");
    let usage = common::json(home, &["ledger", "usage", "--json"]);
    assert!(usage["usage"]["tool_calls"].as_u64().unwrap() >= 5, "{usage}");

    // Not installed: the exact command to install it.
    let empty = tempfile::tempdir().unwrap();
    let (code, _, err) = exec(empty.path(), &["-c", "print(1)"], "");
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("keel build plugins/python-exec"), "{err}");
}

#[test]
fn output_streams_while_the_code_runs() {
    let (home, _) = home();
    assert_streams(
        home,
        "python",
        "import time\nprint('first', flush=True)\nend = time.monotonic() + 4\nwhile time.monotonic() < end:\n    pass\nprint('last')",
    );
}

/// What the code prints is bounded on the terminal too: `print` stops at python-exec's own
/// 256 KiB with a line saying so, and writes past the plugin to file descriptor 1 stop at the
/// call's output cap (`max_output_bytes`, 1 MiB by default).
#[test]
fn streamed_output_is_bounded_however_the_code_writes_it() {
    let (home, _) = home();
    let (code, out, err) = exec_lang(
        home,
        "python",
        &["-c", "for _ in range(100):\n    print('x' * 10000)"],
        "",
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.len() < 300_000, "{} bytes printed", out.len());
    assert!(
        out.trim_end().ends_with("characters not shown]"),
        "{}",
        &out[out.len() - 100..]
    );

    let (code, out, err) = exec_lang(
        home,
        "python",
        &["-c", "import os\nfor _ in range(100):\n    os.write(1, b'y' * 65536)"],
        "",
    );
    assert!(out.len() <= (1 << 20) + 100, "{} bytes printed", out.len());
    assert!(out.ends_with("(max_output_bytes)]\n"), "{}", &out[out.len() - 100..]);
    assert_ne!(code, 0, "the code's write past the cap failed: {err}");
}

/// On a terminal, control characters the code prints are shown escaped (they would set the
/// window title, write the clipboard, clear the screen); redirected output stays byte for byte.
#[test]
fn control_characters_the_code_prints_reach_a_terminal_escaped() {
    let (home, _) = home();
    let code =
        "import sys; print(chr(27) + ']0;PWNED' + chr(7) + chr(155) + '2J'); print(chr(27) + '[31m', file=sys.stderr)";
    // `script` (util-linux) runs keel on a pseudo-terminal and copies what it shows.
    let shown = Command::new("script")
        .args(["-q", "-e", "-c"])
        .arg(format!(
            "{} exec --lang python -c \"{code}\"",
            env!("CARGO_BIN_EXE_keel")
        ))
        .arg("/dev/null")
        .env("KEEL_HOME", home)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&shown.stdout);
    assert!(shown.status.success(), "{text}");
    assert!(
        !text.contains('\x1b') && !text.contains('\u{9b}'),
        "raw control characters reached the terminal: {text:?}"
    );
    assert!(text.contains("\\x1b]0;PWNED\\x07\\u{9b}2J"), "{text:?}");
    assert!(text.contains("\\x1b[31m"), "stderr: {text:?}");
    // Into a pipe: exactly what the code printed.
    let (code_, out, err) = exec_lang(home, "python", &["-c", code], "");
    assert_eq!((code_, out.as_str()), (0, "\x1b]0;PWNED\x07\u{9b}2J\n"), "{err}");
}

/// A step stopped at its deadline is recorded with what the sandbox measured (its peak memory),
/// not just its wall time: the kernel's own timer is a backstop that waits for the sandbox's
/// report, so code cannot hide what it used by running out the clock.
#[test]
fn a_timed_out_step_is_recorded_with_its_peak_memory() {
    let (home, _) = home();
    let scope = format!("timeout-{}", std::process::id());
    let code = "x = bytearray(40 << 20)\nwhile True:\n    pass";
    let (status, _, err) = exec_lang(
        home,
        "python",
        &["--timeout-ms", "1500", "--scope", &scope, "-c", code],
        "",
    );
    assert_eq!(status, 1, "{err}");
    assert!(err.contains("timed out") || err.contains("no result within"), "{err}");
    let receipt = tool_receipt(home, &scope);
    assert!(receipt["peak_memory_bytes"].as_u64() >= Some(40 << 20), "{receipt}");

    // Streamed output a reader is slow to take: the sandbox lets it drain for a moment after the
    // deadline, and its report still comes before the kernel gives up on it.
    let scope = format!("slow-reader-{}", std::process::id());
    let code = "import os\nx = bytearray(40 << 20)\nwhile True:\n    os.write(1, b'y' * 65536)";
    let mut child = common::keel(
        home,
        &[
            "exec",
            "--lang",
            "python",
            "--timeout-ms",
            "1500",
            "--scope",
            &scope,
            "-c",
            code,
        ],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    std::thread::sleep(Duration::from_secs(5));
    std::io::copy(&mut child.stdout.take().unwrap(), &mut std::io::sink()).unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(1));
    let receipt = tool_receipt(home, &scope);
    assert!(receipt["peak_memory_bytes"].as_u64() >= Some(40 << 20), "{receipt}");
}

/// The receipt of the (one) tool call recorded in `scope`'s ledger.
fn tool_receipt(home: &Path, scope: &str) -> serde_json::Value {
    let usage = common::json(home, &["ledger", "usage", "--scope", scope, "--json"]);
    usage["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "tool_usage")
        .map(|e| e["data"]["receipt"].clone())
        .unwrap_or_else(|| panic!("no tool usage: {usage}"))
}

/// What a streamed step printed is counted in its receipt (it is not in the step's output).
#[test]
fn the_receipt_counts_what_the_code_printed() {
    let (home, _) = home();
    let scope = format!("printed-{}", std::process::id());
    let code = "import sys\nprint('x' * 99)\nsys.stderr.write('e' * 9)";
    let (status, out, err) = exec_lang(home, "python", &["--scope", &scope, "-c", code], "");
    assert_eq!(status, 0, "{err}");
    assert_eq!(out, format!("{}\n", "x".repeat(99)));
    let receipt = tool_receipt(home, &scope);
    assert_eq!(receipt["stdout_bytes"], 100, "{receipt}");
    assert_eq!(receipt["stderr_bytes"], 9, "{receipt}");
}

#[test]
fn js_output_streams_while_the_script_runs() {
    let (home, _) = js_home();
    assert_streams(
        home,
        "js",
        "console.log('first'); const end = Date.now() + 4000; while (Date.now() < end) {} console.log('last')",
    );
}

/// Ctrl-C stops a code step: the guest stops at once (not at its deadline), the job ends
/// CANCELLED with the attempt charged, and `keel exec` exits 130 (it used to die with the step
/// in flight, its job left RUNNING until a worker took it up).
#[test]
fn ctrl_c_stops_running_code_and_records_it_cancelled() {
    let (home, _) = js_home();
    let scope = "exec-ctrl-c";
    let mut child = common::keel(
        home,
        &[
            "exec",
            "--lang",
            "js",
            "--scope",
            scope,
            "-c",
            "console.log('started'); while (true) {}",
        ],
    )
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert_eq!(line, "started\n");
    let interrupted = Instant::now();
    assert!(common::signal(child.id(), "INT"));
    let status = common::wait_or_kill(&mut child, Duration::from_secs(20)).expect("keel exec ends on Ctrl-C");
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("interrupted: the code was stopped"), "{stderr}");
    assert!(
        interrupted.elapsed() < Duration::from_secs(10),
        "stopped at once, not at its deadline"
    );
    let jobs = common::json(home, &["jobs", "list", "--scope", scope, "--json"]);
    assert_eq!(jobs[0]["state"], "CANCELLED", "{jobs}");
    let usage = common::json(home, &["ledger", "usage", "--scope", scope, "--json"]);
    assert_eq!(usage["usage"]["tool_calls"], 1, "the attempt is charged: {usage}");
}

#[test]
fn js_code_exits_with_its_status_and_prints_as_written() {
    let (home, _) = js_home();
    let (code, out, err) = exec_lang(
        home,
        "js",
        &[
            "-c",
            "console.log('hello', 6 * 7, {a: [1]}); console.log('100%d %s'); console.error('to stderr')",
        ],
        "",
    );
    assert_eq!(
        (code, out.as_str(), err.as_str()),
        (0, "hello 42 {\"a\":[1]}\n100%d %s\n", "to stderr\n")
    );
    // The code's stdin is the global `stdin`.
    let (code, out, err) = exec_lang(home, "js", &["-i", "-c", "console.log(stdin.toUpperCase())"], "abc");
    assert_eq!((code, out.as_str()), (0, "ABC\n"), "{err}");
    // `process.exit(n)` is the status, with what was printed before it.
    let (code, out, err) = exec_lang(
        home,
        "js",
        &["-c", "console.log('before'); process.exit(3); console.log('after')"],
        "",
    );
    assert_eq!((code, out.as_str()), (3, "before\n"), "{err}");
    let (code, _, err) = exec_lang(home, "js", &["-c", "process.exit()"], "");
    assert_eq!(code, 0, "{err}");
    // An uncaught exception is 1, and reported on stderr.
    let (code, out, err) = exec_lang(home, "js", &["-c", "console.log('x'); null.y"], "");
    assert_eq!((code, out.as_str()), (1, "x\n"), "{err}");
    assert!(err.contains("Uncaught TypeError"), "{err}");
    let (code, _, err) = exec_lang(home, "js", &["-c", "throw 'plain'"], "");
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("Uncaught plain"), "{err}");
}

/// Run `code` in `lang` with a long deadline: it prints `first`, runs ~4 s, prints `last`.
/// The first line must be read while keel still runs, seconds before the end.
fn assert_streams(home: &Path, lang: &str, code: &str) {
    let started = Instant::now();
    let mut child = common::keel(home, &["exec", "--lang", lang, "--timeout-ms", "60000", "-c", code])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    assert_eq!(first, "first");
    // The first line arrived while the code was still running.
    assert!(
        child.try_wait().unwrap().is_none(),
        "keel exited before its first line was read"
    );
    let first_at = started.elapsed();
    let last = lines.next().unwrap().unwrap();
    assert_eq!(last, "last");
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(
        started.elapsed() >= first_at + Duration::from_secs(2),
        "the first line came {first_at:?} in, the end {:?}",
        started.elapsed()
    );
}
