//! A plugin cannot keep `keel call` alive past its deadline with blocking host I/O (issue 7, item 9):
//! opening a FIFO in a granted directory is refused at once, and the process exits promptly.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

mod common;

fn mkfifo(path: &Path) {
    let status = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .expect("run mkfifo");
    assert!(status.success(), "mkfifo {}", path.display());
}

#[test]
fn call_opening_a_fifo_exits_promptly() {
    let home = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().canonicalize().unwrap();
    mkfifo(&dir.join("fifo"));
    let hostile = keel_testutil::guest("keel-test-hostile");
    let dir_text = dir.to_string_lossy().into_owned();
    common::expect(
        home.path(),
        &[
            "install",
            &hostile.to_string_lossy(),
            "--allow-read",
            &dir_text,
            "--timeout-ms",
            "1000",
        ],
        0,
    );
    let args = serde_json::json!({"dir": dir_text, "path": "fifo"}).to_string();
    let started = Instant::now();
    let mut child = common::keel(home.path(), &["call", "hostile/open_path", &args])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn keel");
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if started.elapsed() > Duration::from_secs(10) {
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let took = started.elapsed();
    let Some(status) = status else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("`keel call` on a tool opening a FIFO still ran after {took:?}");
    };
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(status.code(), Some(1), "stderr: {stderr}");
    assert!(took < Duration::from_secs(5), "exited after {took:?}: {stderr}");
    assert!(stderr.contains("fifo"), "the error names the path: {stderr}");
}
