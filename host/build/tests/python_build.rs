//! keel-build's Python path against the real componentize-py (`scripts/setup/python.sh`): a
//! declaration the SDK cannot describe fails the build with the app's own traceback, because
//! componentize-py runs the app's top level while snapshotting it. Successful builds are covered
//! by the black-box tests that install and call what they build (`host/cli/tests/languages.rs`).

use keel_build::{BuildError, Lang};

#[test]
fn a_bad_tool_declaration_fails_the_build_with_a_clear_message() {
    let project = tempfile::tempdir().unwrap();
    std::fs::write(
        project.path().join("app.py"),
        "import keel\n\nkeel.plugin('bad', '0.1.0', 'x')\n\n@keel.tool\ndef f(x: set[int]) -> int:\n    return 1\n",
    )
    .unwrap();
    let out = project.path().join("bad.wasm");
    let err = keel_build::build(Lang::Python, project.path(), &out).unwrap_err();
    let BuildError::Failed { step, output } = &err else {
        panic!("expected a failed build, got {err:?}");
    };
    assert!(step.contains("componentize-py"), "{step}");
    assert!(
        output.contains("tool f: parameter `x`: type set[int] has no JSON Schema form"),
        "{output}"
    );
    assert!(!output.contains("Stack backtrace"), "{output}");
    assert!(!out.exists() && !out.with_extension("wasm.partial").exists());
    // The sources were built from a copy: no bytecode caches next to them.
    assert!(!project.path().join("__pycache__").exists());
}
