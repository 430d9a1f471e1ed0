//! The textkit example, built from source in all four languages (Rust, Python, JavaScript, C),
//! installed and called through the real `keel` binary: one table of calls, run against every
//! language; identical inputs must give identical outputs and identical error kinds, equal to the
//! expected JSON written here. Needs every guest toolchain (`scripts/setup/{python,js-c}.sh`).
//!
//! The textkit spec (every `examples/<lang>/textkit`):
//! - `word-count` {text} -> {"chars","lines","words"}: chars = Unicode scalar values; words = maximal
//!   runs of non-ASCII-whitespace (space, \t, \n, \r, \x0b, \x0c); lines = number of `\n`, plus 1
//!   when the text is non-empty and does not end with `\n`. Idempotent, no capabilities.
//! - `read-file` {path} -> {"bytes","path","text"}: reads a UTF-8 file under `/data/` (requested
//!   read-only). A relative path, a `..` component or a path not under `/data/` is `denied`
//!   (capability `filesystem`, target = the path), as is any path when `/data` was not granted; a
//!   missing file or invalid UTF-8 is `failed`.

use std::path::Path;

use keel_build::Lang;
use serde_json::{Value, json};

mod common;
mod langs;

/// One language's textkit. Adding a language is one line in [`LANGUAGES`].
struct Language {
    lang: Lang,
    /// Project directory, relative to the workspace root.
    project: &'static str,
    /// The plugin name its `describe` reports.
    plugin: &'static str,
}

/// Every textkit.
const LANGUAGES: &[Language] = &[
    language(Lang::Rust, "examples/rust/textkit", "textkit-rust"),
    language(Lang::Python, "examples/python/textkit", "textkit-python"),
    language(Lang::Js, "examples/js/textkit", "textkit-js"),
    language(Lang::C, "examples/c/textkit", "textkit-c"),
];

const fn language(lang: Lang, project: &'static str, plugin: &'static str) -> Language {
    Language { lang, project, plugin }
}

/// `keel call PLUGIN/TOOL ARGS --json`: `Ok(output)` or `Err(error object)`.
fn call(home: &Path, plugin: &str, tool: &str, arguments: &Value) -> Result<Value, Value> {
    let out = common::run(
        home,
        &["call", &format!("{plugin}/{tool}"), &arguments.to_string(), "--json"],
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{plugin}/{tool} {arguments}: no JSON report ({e})\nstdout: {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    if report["ok"] == true {
        assert_eq!(out.status.code(), Some(0), "{report}");
        Ok(report["output"].clone())
    } else {
        assert_ne!(out.status.code(), Some(0), "{report}");
        Err(report["error"].clone())
    }
}

/// What a call must produce: an exact output, or an error kind (and for `denied`, its target).
#[derive(Debug)]
enum Expect {
    Output(Value),
    Error(&'static str),
    Denied(String),
}

fn check(lang: &str, tool: &str, arguments: &Value, expected: &Expect, got: &Result<Value, Value>) {
    let context = format!("{lang}: {tool} {arguments}");
    match (expected, got) {
        (Expect::Output(want), Ok(out)) => assert_eq!(out, want, "{context}"),
        (Expect::Error(kind), Err(error)) => assert_eq!(error["kind"], *kind, "{context}: {error}"),
        (Expect::Denied(target), Err(error)) => {
            assert_eq!(error["kind"], "denied", "{context}: {error}");
            assert_eq!(error["capability"], "filesystem", "{context}: {error}");
            assert_eq!(error["target"], target.as_str(), "{context}: {error}");
        }
        (want, got) => panic!("{context}: expected {want:?}, got {got:?}"),
    }
}

fn word_count_cases() -> Vec<(Value, Expect)> {
    let counts =
        |chars: u64, lines: u64, words: u64| Expect::Output(json!({"chars": chars, "lines": lines, "words": words}));
    vec![
        (json!({"text": "hello world"}), counts(11, 1, 2)),
        (json!({"text": ""}), counts(0, 0, 0)),
        (json!({"text": "\n"}), counts(1, 1, 0)),
        (json!({"text": "one line\n"}), counts(9, 1, 2)),
        (json!({"text": "two\nlines"}), counts(9, 2, 2)),
        (json!({"text": "hello world\n"}), counts(12, 1, 2)),
        (json!({"text": "a\n\nb"}), counts(4, 3, 2)),
        (json!({"text": " \t\r\u{b}\u{c}x  y\t"}), counts(10, 1, 2)),
        (json!({"text": "ends\n\n"}), counts(6, 2, 1)),
        // Every ASCII whitespace separates words, \x0b included; nothing else does.
        (json!({"text": "\t a \u{b} b\u{c}\r\n\n"}), counts(11, 2, 2)),
        (json!({"text": "a\u{a0}b\u{3000}c"}), counts(5, 1, 1)),
        // Characters are Unicode scalar values, not bytes or UTF-16 units.
        (json!({"text": "héllo wörld 🦀\n日本語 テキスト"}), counts(22, 2, 5)),
        (json!({"text": "🦀🦀🦀"}), counts(3, 1, 1)),
        (json!({}), Expect::Error("invalid_input")),
        (json!({"text": 5}), Expect::Error("invalid_input")),
        (json!({"text": null}), Expect::Error("invalid_input")),
        (json!({"text": "x", "extra": 1}), Expect::Error("invalid_input")),
    ]
}

fn read_file_cases() -> Vec<(Value, Expect)> {
    let file = |path: &str, bytes: u64, text: &str| {
        (
            json!({"path": path}),
            Expect::Output(json!({"bytes": bytes, "path": path, "text": text})),
        )
    };
    let denied = |path: &str| (json!({"path": path}), Expect::Denied(path.to_string()));
    vec![
        file("/data/hello.txt", 13, "héllo\nworld\n"),
        file("/data/sub/nested.txt", 6, "nested"),
        file("/data/empty.txt", 0, ""),
        // JSON string escapes: control characters, quotes, backslash, CRLF.
        file("/data/escapes.txt", 16, "tab\t\"q\" \\ \u{1} é\r\n"),
        (json!({"path": "/data/missing.txt"}), Expect::Error("failed")),
        (json!({"path": "/data/latin1.txt"}), Expect::Error("failed")),
        (json!({"path": "/data/sub"}), Expect::Error("failed")),
        denied("/etc/passwd"),
        denied("hello.txt"),
        denied("data/hello.txt"),
        denied("/data"),
        denied("/data/../etc/passwd"),
        denied("/data/sub/../hello.txt"),
        denied("/database/x"),
        (json!({}), Expect::Error("invalid_input")),
        (json!({"path": 5}), Expect::Error("invalid_input")),
        (
            json!({"path": "/data/hello.txt", "mode": "w"}),
            Expect::Error("invalid_input"),
        ),
    ]
}

#[test]
fn textkit_is_identical_in_every_language() {
    // Reusing the precompile cache across runs: the Python (and JS) components take long to JIT.
    let home = &langs::reusable_home("languages-home");
    let data = tempfile::tempdir().unwrap();
    std::fs::write(data.path().join("hello.txt"), "héllo\nworld\n").unwrap();
    std::fs::write(data.path().join("empty.txt"), "").unwrap();
    std::fs::write(data.path().join("latin1.txt"), b"caf\xe9\n").unwrap();
    std::fs::write(data.path().join("escapes.txt"), "tab\t\"q\" \\ \u{1} é\r\n").unwrap();
    std::fs::create_dir(data.path().join("sub")).unwrap();
    std::fs::write(data.path().join("sub/nested.txt"), "nested").unwrap();
    let data_dir = std::fs::canonicalize(data.path())
        .unwrap()
        .to_string_lossy()
        .into_owned();

    let mut present = Vec::new();
    for language in LANGUAGES {
        let component = langs::build(language.lang, language.project);
        let started = std::time::Instant::now();
        let installed = common::json(
            home,
            &[
                "install",
                &component.to_string_lossy(),
                "--allow-read",
                &format!("{data_dir}::/data"),
                "--json",
            ],
        );
        eprintln!(
            "{}: {} bytes, keel install {:.0} ms",
            language.plugin,
            std::fs::metadata(&component).unwrap().len(),
            started.elapsed().as_secs_f64() * 1e3
        );
        assert_eq!(installed["name"], language.plugin, "{installed}");
        // None of them imports wasi:http; the JS and C ones not even wasi:sockets (Rust's std
        // and CPython import it, and get no socket unless granted).
        assert_eq!(installed["imports"]["http"], false, "{installed}");
        if matches!(language.lang, Lang::Js | Lang::C) {
            assert_eq!(installed["imports"]["sockets"], false, "{installed}");
        }
        present.push(language);
    }

    // Same self-description: tools, flags, requests, and the input schema's meaning.
    let mut described = Vec::new();
    for language in &present {
        let show = common::json(home, &["plugins", "show", language.plugin, "--json"]);
        assert_eq!(show["version"], "0.1.0", "{}", language.plugin);
        let tools: Vec<Value> = show["tools"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| {
                let schema = &t["input_schema"];
                let properties: Vec<&String> = schema["properties"].as_object().unwrap().keys().collect();
                json!({
                    "name": t["name"],
                    "idempotent": t["idempotent"],
                    "capabilities": t["capabilities"],
                    "type": schema["type"],
                    "properties": properties,
                    "required": schema["required"],
                    "additionalProperties": schema["additionalProperties"],
                    "property_types": schema["properties"].as_object().unwrap().values().map(|p| p["type"].clone()).collect::<Vec<_>>(),
                })
            })
            .collect();
        described.push((language.plugin, tools));
    }
    let expected_tools = json!([
        {"name": "word-count", "idempotent": true,
         "capabilities": {"environment": [], "filesystem": [], "network": []},
         "type": "object", "properties": ["text"], "required": ["text"], "additionalProperties": false,
         "property_types": ["string"]},
        {"name": "read-file", "idempotent": true,
         "capabilities": {"environment": [], "filesystem": [{"mode": "read", "path": "/data"}], "network": []},
         "type": "object", "properties": ["path"], "required": ["path"], "additionalProperties": false,
         "property_types": ["string"]},
    ]);
    for (plugin, tools) in &described {
        assert_eq!(
            &Value::from(tools.clone()),
            &expected_tools,
            "{plugin} describes itself differently"
        );
    }

    // Every case, every language: equal to the expected value, hence to each other.
    let mut calls = 0;
    for (tool, cases) in [("word-count", word_count_cases()), ("read-file", read_file_cases())] {
        for (arguments, expected) in &cases {
            let results: Vec<_> = present
                .iter()
                .map(|l| (l, call(home, l.plugin, tool, arguments)))
                .collect();
            for (language, got) in &results {
                check(language.plugin, tool, arguments, expected, got);
                calls += 1;
            }
            // Same error kind (and denied details) across languages, not only the expected kind.
            let shapes: Vec<Value> = results
                .iter()
                .map(|(_, r)| match r {
                    Ok(out) => json!({"ok": out}),
                    Err(e) => json!({"kind": e["kind"], "capability": e["capability"], "target": e["target"]}),
                })
                .collect();
            assert!(
                shapes.windows(2).all(|w| w[0] == w[1]),
                "{tool} {arguments}: {shapes:?}"
            );
        }
    }

    // Without the grant, /data does not exist for the plugin: denied, naming the path.
    for language in &present {
        common::expect(home, &["plugins", "revoke", language.plugin, "--all"], 0);
        let arguments = json!({"path": "/data/hello.txt"});
        let got = call(home, language.plugin, "read-file", &arguments);
        check(
            language.plugin,
            "read-file",
            &arguments,
            &Expect::Denied("/data/hello.txt".into()),
            &got,
        );
        // word-count needs nothing, so it still works.
        let got = call(home, language.plugin, "word-count", &json!({"text": "still works"}));
        assert_eq!(
            got,
            Ok(json!({"chars": 11, "lines": 1, "words": 2})),
            "{}",
            language.plugin
        );
        calls += 2;
    }
    eprintln!("{calls} calls across {} languages agreed", present.len());
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
