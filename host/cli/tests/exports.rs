//! Black-box: `keel install` accepts a component that exports ordinary WIT functions (no
//! `keel:plugin` world), names it after its file, and `keel call` calls its functions as tools
//! (issue 11, item 3).

use serde_json::{Value, json};

mod common;
use common::{expect, json, one_clear_line};

#[test]
fn a_plain_component_is_installed_from_its_file_and_its_exports_are_called() {
    let home = tempfile::tempdir().unwrap();
    let home = home.path();
    let files = tempfile::tempdir().unwrap();
    // The plugin's name comes from the file name (the component has no name section).
    let file = files.path().join("Text Tools.wasm");
    std::fs::copy(keel_testutil::guest("keel-test-plain-exports"), &file).unwrap();
    let installed = json(home, &["install", file.to_str().unwrap(), "--json"]);
    assert_eq!(installed["name"], "text-tools", "{installed}");
    assert_eq!(installed["version"], "0.0.0");
    assert!(
        installed["description"].as_str().unwrap().contains("make-counter"),
        "what is not offered is said: {installed}"
    );

    let call = |tool: &str, args: Value| -> Value {
        let args = args.to_string();
        let out = common::run(home, &["call", tool, &args, "--json"]);
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "{tool}: {e}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        })
    };
    // Each call is a new process: the second and later start from the cached artifact.
    let greeted = call("text-tools/greet", json!({"name": "Ada"}));
    assert_eq!(greeted["output"], "Hello, Ada!", "{greeted}");
    let point = call("text-tools/shapes-echo-point", json!({"p": {"x": 1, "y": -2}}));
    assert_eq!(point["output"], json!({"x": 1, "y": -2, "label": null}), "{point}");
    let shape = call("text-tools/shapes-echo-shape", json!({"s": {"rect": [2, 3]}}));
    assert_eq!(shape["output"], json!({"rect": [2, 3]}), "{shape}");

    // An `err` result is the tool's failure (exit 1), its value as JSON text.
    let failed = call("text-tools/checked-div", json!({"a": 1, "b": 0}));
    assert_eq!(failed["ok"], false);
    assert_eq!(failed["error"]["kind"], "failed", "{failed}");
    assert_eq!(failed["error"]["message"], "\"cannot divide 1 by 0\"", "{failed}");
    let out = expect(home, &["call", "text-tools/checked-div", r#"{"a":1,"b":0}"#], 1);
    one_clear_line(&String::from_utf8_lossy(&out.stderr));

    // Bad arguments are the caller's error (exit 2), one line.
    let out = expect(home, &["call", "text-tools/shapes-next-color", r#"{"c":"purple"}"#], 2);
    let err = String::from_utf8_lossy(&out.stderr);
    one_clear_line(&err);
    assert!(err.contains("invalid input"), "{err}");
    let out = expect(home, &["call", "text-tools/shapes-make-counter", "{}"], 2);
    one_clear_line(&String::from_utf8_lossy(&out.stderr));

    // A trap is a clear error, and the next call works.
    let crashed = call("text-tools/crash", json!({"message": "boom"}));
    assert_eq!(crashed["error"]["kind"], "trapped", "{crashed}");
    assert_eq!(call("text-tools/negate", json!({"b": false}))["output"], true);
}
