//! Runs the Python SDK's own unit tests (`sdk/python/tests`) with the machine's CPython, so that
//! `cargo test` covers the SDK's schema generation and argument checking without building a
//! component. (The components themselves are tested in `host/cli/tests/languages.rs`.)

use std::path::Path;
use std::process::Command;

#[test]
fn python_sdk_unit_tests_pass() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let output = Command::new("python3")
        .args(["-B", "-m", "unittest", "discover", "-s", "sdk/python/tests"])
        .current_dir(&root)
        .output()
        .expect("python3 (3.10 or newer) is needed to test the Python SDK");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "the Python SDK's unit tests failed:\n{stderr}");
    assert!(stderr.contains("OK"), "{stderr}");
}
