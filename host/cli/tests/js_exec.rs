//! `plugins/js-exec` (a JavaScript engine in a component) against hostile scripts, through the
//! real `keel` binary: each attack ends in one clear error, the host process exits normally, and
//! the next run starts clean.
//!
//! Needs the JS toolchain (`scripts/setup/js-c.sh`). One Keel home and one install for the whole
//! binary (the engine is compiled to native code once); the cases run in order, since they share
//! the plugin's /scratch.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use keel_build::Lang;
use serde_json::{Value, json};

mod common;
mod langs;

const TIMEOUT_MS: u64 = 2000;

/// Run a script; returns the `--json` report and the exit code.
fn run(home: &Path, args: Value) -> (Value, i32, Duration) {
    let started = Instant::now();
    let out = common::run(home, &["call", "js-exec/run", &args.to_string(), "--json"]);
    let elapsed = started.elapsed();
    let report = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{args}: {e}\nstdout: {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "the host panicked: {stderr}");
    (
        report,
        out.status.code().expect("keel exited normally, not by a signal"),
        elapsed,
    )
}

fn code(home: &Path, code: &str) -> (Value, i32, Duration) {
    run(home, json!({"code": code}))
}

/// The run's output (asserting success).
fn ok(home: &Path, args: Value) -> Value {
    let (report, status, _) = run(home, args.clone());
    assert_eq!((report["ok"].clone(), status), (json!(true), 0), "{args}: {report}");
    report["output"].clone()
}

/// A fresh run sees no globals, no files and prints normally.
fn assert_clean(home: &Path) {
    let out = ok(
        home,
        json!({"code": "console.log('fresh'); [typeof leaked, fs.readdirSync().length]"}),
    );
    assert_eq!(
        out,
        json!({"stdout": "fresh\n", "stderr": "", "value": ["undefined", 0], "files": {}, "exit_code": 0})
    );
}

/// Assert a failed run with error `kind`, whose message contains `needle`.
fn assert_error(report: &Value, status: i32, kind: &str, needle: &str) {
    assert_eq!(status, 1, "{report}");
    assert_eq!(report["ok"], false, "{report}");
    assert_eq!(report["error"]["kind"], kind, "{report}");
    let message = report["message"].as_str().unwrap();
    assert!(message.contains(needle), "`{needle}` not in: {message}");
    assert!(!message.contains('\n'), "one line: {message}");
}

#[test]
fn js_exec_runs_scripts_and_survives_hostile_ones() {
    let wasm = langs::build(Lang::Js, "plugins/js-exec");
    let home = tempfile::tempdir().unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let grant = format!("{}::/scratch", std::fs::canonicalize(scratch.path()).unwrap().display());
    let started = Instant::now();
    common::expect(
        home.path(),
        &[
            "install",
            &wasm.to_string_lossy(),
            "--allow-write",
            &grant,
            "--timeout-ms",
            &TIMEOUT_MS.to_string(),
            "--memory-mb",
            "64",
        ],
        0,
    );
    eprintln!(
        "js-exec: {} bytes, keel install {:.0} ms",
        std::fs::metadata(&wasm).unwrap().len(),
        started.elapsed().as_secs_f64() * 1e3
    );
    let show = common::json(home.path(), &["plugins", "show", "js-exec", "--json"]);
    // No network and no environment, whatever a grant says: the component does not import them.
    let imports = &show["imports"];
    assert_eq!(
        (&imports["http"], &imports["sockets"], &imports["environment"]),
        (&json!(false), &json!(false), &json!(false)),
        "{show}"
    );

    // The basics: stdout, stderr, completion value, stdin, files in and out.
    let out = ok(
        home.path(),
        json!({"code": "console.log('hi', 1, {a: [2]}); console.error('warn'); ({sum: 1 + 2})"}),
    );
    assert_eq!(
        out,
        json!({"stdout": "hi 1 {\"a\":[2]}\n", "stderr": "warn\n", "value": {"sum": 3}, "files": {}, "exit_code": 0})
    );
    let out = ok(
        home.path(),
        json!({"code": "const n = fs.readFileSync('in/data.txt', 'utf8').length; fs.writeFileSync('out.txt', stdin.toUpperCase()); n",
               "stdin": "abc", "files": {"in/data.txt": "12345"}}),
    );
    assert_eq!(
        out,
        json!({"stdout": "", "stderr": "", "value": 5,
               "files": {"/scratch/in/data.txt": "12345", "/scratch/out.txt": "ABC"}, "exit_code": 0})
    );
    // A script's own exception is its result, with what it printed before.
    let out = ok(home.path(), json!({"code": "console.log('before'); null.x"}));
    assert_eq!((&out["stdout"], &out["exit_code"]), (&json!("before\n"), &json!(1)));
    assert!(out["error"].as_str().unwrap().starts_with("TypeError"), "{out}");
    assert!(
        out["stderr"].as_str().unwrap().starts_with("Uncaught TypeError"),
        "{out}"
    );
    // `process.exit(n)` ends the script with status n; what it printed stays.
    let out = ok(
        home.path(),
        json!({"code": "console.log('a'); process.exit(7); console.log('b')"}),
    );
    assert_eq!((&out["stdout"], &out["exit_code"]), (&json!("a\n"), &json!(7)), "{out}");
    let out = ok(home.path(), json!({"code": "syntax error here"}));
    assert!(out["error"].as_str().unwrap().starts_with("SyntaxError"), "{out}");

    // State left behind: globals and files. The next run sees neither.
    ok(
        home.path(),
        json!({"code": "globalThis.leaked = 1; fs.writeFileSync('left.txt', 'x'); fs.mkdirSync('d'); fs.writeFileSync('d/y', 'y')"}),
    );
    assert_clean(home.path());

    // Spinning forever: interrupted at the deadline.
    let (report, status, elapsed) = code(home.path(), "while (true) {}");
    assert_error(&report, status, "timed_out", "deadline");
    assert!(elapsed < Duration::from_millis(TIMEOUT_MS + 5000), "{elapsed:?}");
    assert_clean(home.path());

    // Memory bombs: the engine runs out of memory under the cap and says so, or the host stops
    // the call (memory limit, or the deadline when growing is slow on a loaded machine).
    for bomb in [
        "const a = []; for (;;) a.push(new Array(1e6).fill(1.5))",
        "let s = 'x'; for (;;) s += s",
    ] {
        let (report, status, _) = code(home.path(), bomb);
        if status == 0 {
            let error = report["output"]["error"].as_str().unwrap_or_default();
            assert!(
                error.contains("out of memory") || error.contains("allocation size overflow"),
                "{bomb}: {report}"
            );
        } else {
            let kind = report["error"]["kind"].as_str().unwrap();
            assert!(
                ["limit_exceeded", "trapped", "timed_out"].contains(&kind),
                "{bomb}: {report}"
            );
        }
        assert_clean(home.path());
    }

    // Deep recursion: a catchable error from the engine, not a crash of the host.
    let (report, status, _) = code(home.path(), "function f(n) { return f(n + 1) + 1 } f(0)");
    if status == 0 {
        assert_eq!(
            report["output"]["error"], "InternalError: too much recursion",
            "{report}"
        );
    } else {
        assert_eq!(report["error"]["kind"], "trapped", "{report}");
    }
    assert_clean(home.path());

    // Reading outside /scratch: the only directory there is.
    let (report, status, _) = code(home.path(), "fs.readFileSync('/etc/passwd', 'utf8')");
    assert_error(&report, status, "denied", "/etc/passwd");
    assert_eq!(report["error"]["capability"], "filesystem");
    // Writing outside /scratch, directly or by `..`.
    let target = outside.path().join("escaped.txt");
    for path in [
        target.to_string_lossy().into_owned(),
        "../escaped.txt".into(),
        "/scratch/../x".into(),
    ] {
        let (report, status, _) = code(home.path(), &format!("fs.writeFileSync({path:?}, 'x')"));
        assert_error(&report, status, "denied", "filesystem");
    }
    assert!(!target.exists());
    // A script may catch the denial and go on.
    let out = ok(
        home.path(),
        json!({"code": "try { fs.readFileSync('/etc/passwd') } catch (e) { e.name }"}),
    );
    assert_eq!(out["value"], "Denied");
    // The files input cannot name a path outside /scratch either.
    let (report, status, _) = run(home.path(), json!({"code": "1", "files": {"../../x": "y"}}));
    assert_error(&report, status, "invalid_input", "relative to /scratch");
    assert_clean(home.path());

    // Printing 1 GB: stopped at the output cap long before.
    let started = Instant::now();
    let (report, status, _) = code(
        home.path(),
        "const mb = 'x'.repeat(1 << 20); for (let i = 0; i < 1024; i++) console.log(mb)",
    );
    assert_error(&report, status, "failed", "printed more than");
    assert!(started.elapsed() < Duration::from_secs(30));
    assert_clean(home.path());

    // No network: there is no fetch at all.
    let out = ok(home.path(), json!({"code": "typeof fetch"}));
    assert_eq!(out["value"], "undefined");
    let out = ok(home.path(), json!({"code": "fetch('http://127.0.0.1:9/')"}));
    assert!(out["error"].as_str().unwrap().starts_with("ReferenceError"), "{out}");

    // Timing: js-exec `console.log(1)` against native node, in the same run.
    let mut sandboxed = Vec::new();
    for _ in 0..5 {
        let (report, _, elapsed) = code(home.path(), "console.log(1)");
        assert_eq!(report["output"]["stdout"], "1\n");
        sandboxed.push(elapsed.as_secs_f64() * 1e3);
    }
    let mut native = Vec::new();
    for _ in 0..5 {
        let started = Instant::now();
        match Command::new("node").args(["-e", "console.log(1)"]).output() {
            Ok(out) if out.status.success() => native.push(started.elapsed().as_secs_f64() * 1e3),
            _ => break,
        }
    }
    sandboxed.sort_by(f64::total_cmp);
    native.sort_by(f64::total_cmp);
    eprintln!(
        "console.log(1): keel call js-exec/run median {:.0} ms; node -e median {}",
        sandboxed[sandboxed.len() / 2],
        native
            .get(native.len() / 2)
            .map_or("n/a (no node)".to_string(), |ms| format!("{ms:.0} ms"))
    );
}
