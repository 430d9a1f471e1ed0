//! The textkit example in JavaScript and in C, built from source with keel-build, installed and
//! called through the real `keel` binary: every call gives the same result in both languages, and
//! that result is the one written here (the shared textkit spec).
//!
//! Needs the JS and C toolchains (`scripts/setup/js-c.sh`).

use std::path::Path;
use std::time::Instant;

use keel_build::Lang;
use serde_json::{Value, json};

mod common;
mod langs;

/// What a call must give: the compact output JSON, or an error kind (and, for `denied`, the
/// capability and target).
#[derive(Debug, Clone, PartialEq)]
enum Expect {
    Output(&'static str),
    Error(&'static str),
    Denied(&'static str),
}

/// `keel call PLUGIN/TOOL ARGS --json`, reduced to what must agree across languages.
fn call(home: &Path, tool: &str, args: &Value) -> (Value, f64) {
    let started = Instant::now();
    let out = common::run(home, &["call", tool, &args.to_string(), "--json"]);
    let wall = started.elapsed().as_secs_f64() * 1e3;
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "keel call {tool} {args}: {e}\nstdout: {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert_eq!(
        out.status.code(),
        Some(if report["ok"] == true { 0 } else { 1 }),
        "{report}"
    );
    let reduced = if report["ok"] == true {
        json!({"output": serde_json::to_string(&report["output"]).unwrap()})
    } else {
        let error = &report["error"];
        json!({"kind": error["kind"], "capability": error["capability"], "target": error["target"]})
    };
    (reduced, wall)
}

fn expected(expect: &Expect, args: &Value) -> Value {
    match expect {
        Expect::Output(text) => json!({"output": text}),
        Expect::Error(kind) => json!({"kind": kind, "capability": null, "target": null}),
        Expect::Denied(target) => {
            let _ = args;
            json!({"kind": "denied", "capability": "filesystem", "target": target})
        }
    }
}

fn word_count_cases() -> Vec<(Value, Expect)> {
    use Expect::*;
    vec![
        (json!({"text": ""}), Output(r#"{"chars":0,"lines":0,"words":0}"#)),
        (
            json!({"text": "hello world"}),
            Output(r#"{"chars":11,"lines":1,"words":2}"#),
        ),
        (
            json!({"text": "hello world\n"}),
            Output(r#"{"chars":12,"lines":1,"words":2}"#),
        ),
        (
            json!({"text": "one\ntwo\n"}),
            Output(r#"{"chars":8,"lines":2,"words":2}"#),
        ),
        (json!({"text": "a\n\nb"}), Output(r#"{"chars":4,"lines":3,"words":2}"#)),
        (json!({"text": "\n"}), Output(r#"{"chars":1,"lines":1,"words":0}"#)),
        (
            json!({"text": "héllo wörld 日本語 🎉\n"}),
            Output(r#"{"chars":18,"lines":1,"words":4}"#),
        ),
        (
            json!({"text": " \t\r\u{b}\u{c}x  y\t"}),
            Output(r#"{"chars":10,"lines":1,"words":2}"#),
        ),
        // Non-ASCII whitespace (no-break space, ideographic space) is part of a word.
        (
            json!({"text": "a\u{a0}b\u{3000}c"}),
            Output(r#"{"chars":5,"lines":1,"words":1}"#),
        ),
        (json!({}), Error("invalid_input")),
        (json!({"text": 5}), Error("invalid_input")),
        (json!({"text": null}), Error("invalid_input")),
        (json!({"text": "a", "extra": 1}), Error("invalid_input")),
    ]
}

fn read_file_cases() -> Vec<(Value, Expect)> {
    use Expect::*;
    vec![
        (
            json!({"path": "/data/hello.txt"}),
            Output(r#"{"bytes":14,"path":"/data/hello.txt","text":"héllo\nwörld\n"}"#),
        ),
        (
            json!({"path": "/data/sub/empty.txt"}),
            Output(r#"{"bytes":0,"path":"/data/sub/empty.txt","text":""}"#),
        ),
        (
            json!({"path": "/data/escapes.txt"}),
            Output(r#"{"bytes":16,"path":"/data/escapes.txt","text":"tab\t\"q\" \\ \u0001 é\r\n"}"#),
        ),
        (json!({"path": "/data/missing.txt"}), Error("failed")),
        (json!({"path": "/data/sub"}), Error("failed")),
        (json!({"path": "/data/latin1.txt"}), Error("failed")),
        (json!({"path": "/etc/passwd"}), Denied("/etc/passwd")),
        (json!({"path": "/data/../etc/passwd"}), Denied("/data/../etc/passwd")),
        (
            json!({"path": "/data/sub/../hello.txt"}),
            Denied("/data/sub/../hello.txt"),
        ),
        (json!({"path": "data/hello.txt"}), Denied("data/hello.txt")),
        (json!({"path": "/data"}), Denied("/data")),
        (json!({"path": "/database/x"}), Denied("/database/x")),
        (json!({}), Error("invalid_input")),
        (json!({"path": 5}), Error("invalid_input")),
        (json!({"path": "/data/hello.txt", "mode": "w"}), Error("invalid_input")),
    ]
}

#[test]
fn textkit_in_js_and_c_gives_the_same_results() {
    let built: Vec<(&str, std::path::PathBuf)> = vec![
        ("c", langs::build(Lang::C, "examples/c/textkit")),
        ("js", langs::build(Lang::Js, "examples/js/textkit")),
    ];
    // One home for the whole binary: the JS component is compiled to native code once.
    let home = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    std::fs::write(data.path().join("hello.txt"), "héllo\nwörld\n").unwrap();
    std::fs::write(data.path().join("escapes.txt"), "tab\t\"q\" \\ \u{1} é\r\n").unwrap();
    std::fs::write(data.path().join("latin1.txt"), b"caf\xe9\n").unwrap();
    std::fs::create_dir(data.path().join("sub")).unwrap();
    std::fs::write(data.path().join("sub/empty.txt"), "").unwrap();
    let data_dir = std::fs::canonicalize(data.path()).unwrap();
    let grant = format!("{}::/data", data_dir.display());

    for (lang, wasm) in &built {
        let started = Instant::now();
        let out = common::expect(
            home.path(),
            &["install", &wasm.to_string_lossy(), "--allow-read", &grant],
            0,
        );
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(&format!("installed textkit-{lang} 0.1.0")), "{text}");
        eprintln!(
            "textkit-{lang}: {} bytes, keel install {:.0} ms",
            std::fs::metadata(wasm).unwrap().len(),
            started.elapsed().as_secs_f64() * 1e3
        );
        let show = common::json(home.path(), &["plugins", "show", &format!("textkit-{lang}"), "--json"]);
        assert_eq!(show["tools"].as_array().map(Vec::len), Some(2), "{show}");
        // Neither can reach the network: neither imports wasi:http or sockets.
        assert_eq!(show["imports"]["http"], false, "{show}");
        assert_eq!(show["imports"]["sockets"], false, "{show}");
    }

    let mut failures = Vec::new();
    for (tool, cases) in [("word-count", word_count_cases()), ("read-file", read_file_cases())] {
        for (args, expect) in cases {
            let want = expected(&expect, &args);
            let mut walls = Vec::new();
            for (lang, _) in &built {
                let (got, wall) = call(home.path(), &format!("textkit-{lang}/{tool}"), &args);
                walls.push(format!("{lang} {wall:.0} ms"));
                if got != want {
                    failures.push(format!("textkit-{lang}/{tool} {args}: got {got}, want {want}"));
                }
            }
            if tool == "word-count" && args["text"] == "hello world" {
                eprintln!("keel call word-count wall time: {}", walls.join(", "));
            }
        }
    }

    // Installed without the grant (revoked): /data is not there for the guest at all.
    for (lang, _) in &built {
        common::expect(
            home.path(),
            &[
                "plugins",
                "revoke",
                &format!("textkit-{lang}"),
                "--dir",
                &data_dir.to_string_lossy(),
            ],
            0,
        );
        let args = json!({"path": "/data/hello.txt"});
        let (got, _) = call(home.path(), &format!("textkit-{lang}/read-file"), &args);
        let want = expected(&Expect::Denied("/data/hello.txt"), &args);
        if got != want {
            failures.push(format!(
                "textkit-{lang}/read-file without grant: got {got}, want {want}"
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn a_c_project_without_a_plugin_fails_with_the_linker_message() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tool.c"), "int unused;\n").unwrap();
    match keel_build::c::build(dir.path(), &dir.path().join("out.wasm")) {
        Err(keel_build::BuildError::Failed { step, output }) => {
            assert_eq!(step, "clang");
            assert!(output.contains("keel_plugin_definition"), "{output}");
        }
        other => panic!("expected a link failure naming keel_plugin_definition, got {other:?}"),
    }
    assert!(!dir.path().join("out.wasm").exists());
}
