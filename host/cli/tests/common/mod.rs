//! Shared harness for the black-box tests: run the real `keel` binary against a Keel home.
#![allow(dead_code)] // each test binary uses a different subset

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

/// `keel ARGS` with `KEEL_HOME=home` and no inherited log filter.
pub fn keel(home: &Path, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_keel"));
    command.args(args).env("KEEL_HOME", home).env_remove("KEEL_LOG");
    command
}

/// `keel-debug ARGS` (the test-only kernel tools: `churn`, `recover`, `check`) with
/// `KEEL_HOME=home`.
pub fn keel_debug(home: &Path, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_keel-debug"));
    command.args(args).env("KEEL_HOME", home).env_remove("KEEL_LOG");
    command
}

/// Run `keel-debug ARGS` to completion, expecting exit `code`.
pub fn debug_expect(home: &Path, args: &[&str], code: i32) -> Output {
    let out = keel_debug(home, args).output().expect("run keel-debug");
    assert_eq!(
        out.status.code(),
        Some(code),
        "keel-debug {args:?}\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Run `keel ARGS` to completion.
pub fn run(home: &Path, args: &[&str]) -> Output {
    keel(home, args).output().expect("run keel")
}

/// Run and assert the exit code, showing both streams when it differs.
pub fn expect(home: &Path, args: &[&str], code: i32) -> Output {
    let out = run(home, args);
    assert_eq!(
        out.status.code(),
        Some(code),
        "keel {args:?}\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Run, expect success, parse stdout as JSON.
pub fn json(home: &Path, args: &[&str]) -> Value {
    serde_json::from_slice(&expect(home, args, 0).stdout).expect("JSON output")
}

/// Assert `stderr` is exactly one `error: ...` sentence: no panic, no backtrace.
pub fn one_clear_line(stderr: &str) {
    let lines: Vec<_> = stderr.lines().collect();
    assert!(
        lines.len() == 1 && lines[0].starts_with("error: "),
        "one clear line expected: {stderr}"
    );
    assert!(
        !stderr.contains("panicked") && !stderr.contains("backtrace"),
        "{stderr}"
    );
}

/// Send `signal` (a name as `kill -s` takes it: `STOP`, `CONT`, `KILL`) to process `pid`.
pub fn signal(pid: u32, signal: &str) -> bool {
    Command::new("kill")
        .args(["-s", signal, &pid.to_string()])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Wait at most `timeout` for `child` to exit; SIGKILL it past that (then `None`).
pub fn wait_or_kill(child: &mut std::process::Child, timeout: std::time::Duration) -> Option<std::process::ExitStatus> {
    let end = std::time::Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if std::time::Instant::now() >= end {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
