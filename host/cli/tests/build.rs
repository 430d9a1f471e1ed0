//! `keel build`: a project in any supported language becomes a component `keel install` takes.

use serde_json::{Value, json};

mod common;

#[test]
fn a_c_project_is_built_installed_and_called() {
    let home = tempfile::tempdir().unwrap();
    let out_dir = tempfile::tempdir().unwrap();
    let component = out_dir.path().join("textkit-c.wasm");
    let project = keel_testutil::workspace_root().join("examples/c/textkit");
    // The language is detected from the project's files.
    let built = common::json(
        home.path(),
        &[
            "build",
            project.to_str().unwrap(),
            "-o",
            component.to_str().unwrap(),
            "--json",
        ],
    );
    assert_eq!(built["lang"], "c", "{built}");
    assert!(built["bytes"].as_u64().unwrap() > 1000, "{built}");
    common::expect(home.path(), &["install", component.to_str().unwrap()], 0);
    let out = common::expect(
        home.path(),
        &["call", "textkit-c/word-count", r#"{"text":"one two\nthree"}"#],
        0,
    );
    let value: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(value, json!({"chars": 13, "lines": 2, "words": 3}));
}

#[test]
fn a_directory_of_no_known_language_is_one_clear_error() {
    let home = tempfile::tempdir().unwrap();
    let empty = tempfile::tempdir().unwrap();
    let out = common::expect(home.path(), &["build", empty.path().to_str().unwrap()], 2);
    let stderr = String::from_utf8_lossy(&out.stderr);
    common::one_clear_line(&stderr);
    assert!(stderr.contains("--lang rust|python|js|c"), "{stderr}");
}
