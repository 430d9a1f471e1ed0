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

/// A JavaScript tool may be async (`fetch` returns a Promise): the component runs its event loop
/// until the handler's Promise settles, so a granted `fetch` gives the tool its response, and a
/// rejected Promise is the tool's error. A tool whose result is `null` prints `null`.
#[test]
fn a_javascript_tool_awaits_fetch_and_null_is_an_output() {
    // A one-page HTTP server on loopback.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            use std::io::{BufRead as _, Write as _};
            let mut reader = std::io::BufReader::new(&stream);
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                line.clear();
            }
            let body = "fetched by keel";
            let _ = write!(
                &stream,
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });

    let project = tempfile::tempdir().unwrap();
    std::fs::write(
        project.path().join("package.json"),
        r#"{"name": "netjs", "type": "module", "main": "tool.js", "keel": {"http": true}}"#,
    )
    .unwrap();
    let tool = r#"
import { Plugin, Failed, schema } from '@keel/sdk';
const plugin = new Plugin({ name: 'netjs', version: '0.1.0', description: 'async tools' });
plugin.tool(
  { name: 'fetch', description: 'GET a URL', connects: ['127.0.0.1:PORT'], input: schema.object({ url: schema.string() }) },
  async ({ url }) => {
    const response = await fetch(url);
    return { status: response.status, text: await response.text() };
  },
);
plugin.tool({ name: 'reject', description: 'fails later', input: schema.object({}) }, async () => {
  await null;
  throw new Failed('no luck');
});
plugin.tool({ name: 'nothing', description: 'returns null', input: schema.object({}) }, () => null);
plugin.tool({ name: 'big', description: 'a long string', input: schema.object({ n: schema.integer() }) }, ({ n }) => 'x'.repeat(n));
export const tools = plugin.exports();
"#
    .replace("PORT", &port.to_string());
    std::fs::write(project.path().join("tool.js"), tool).unwrap();

    let home = tempfile::tempdir().unwrap();
    let component = build_into(home.path(), project.path(), "netjs");
    let allow = format!("127.0.0.1:{port}");
    common::expect(
        home.path(),
        &[
            "install",
            component.to_str().unwrap(),
            "--allow-net",
            &allow,
            "--allow-private-network",
        ],
        0,
    );
    let url = json!({ "url": format!("http://127.0.0.1:{port}/page") }).to_string();
    let out = common::expect(home.path(), &["call", "netjs/fetch", &url], 0);
    let value: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(value, json!({"status": 200, "text": "fetched by keel"}));

    let out = common::expect(home.path(), &["call", "netjs/reject", "{}", "--json"], 1);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["ok"], false, "{report}");
    assert_eq!(report["error"]["kind"], "failed", "{report}");
    assert!(
        report["error"]["message"].as_str().unwrap().contains("no luck"),
        "{report}"
    );

    let out = common::expect(home.path(), &["call", "netjs/nothing", "{}"], 0);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "null");

    // The engine reports its own "out of memory"; the host says which limit it met.
    let out = common::expect(home.path(), &["call", "netjs/big", r#"{"n":100000000}"#, "--json"], 1);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let message = report["error"]["message"].as_str().unwrap();
    assert!(message.contains("memory limit is 67108864 bytes"), "{report}");
    assert!(message.contains("--memory-mb"), "{report}");
}

/// A C tool's text is whatever bytes it has: bytes that are not UTF-8 (a latin-1 file, a bad log
/// line) become U+FFFD in its output, logs and error, instead of crashing the call.
#[test]
fn a_c_tool_with_bytes_that_are_not_utf8_still_answers() {
    let project = tempfile::tempdir().unwrap();
    std::fs::write(
        project.path().join("bytes.c"),
        r#"#include <stdio.h>

#include "keel.h"

static bool latin1(keel_call *call, const keel_json *args) {
    (void)args;
    printf("printed\n");
    fflush(stdout);
    fprintf(stderr, "warned\n");
    keel_log(call, KEEL_WARN, "caf\xe9 log");
    keel_out_object_begin(call);
    keel_out_key(call, "text");
    keel_out_string(call, "caf\xe9 \xff\xfe ok", 10);
    keel_out_object_end(call);
    return true;
}

static bool fails(keel_call *call, const keel_json *args) {
    size_t len;
    const char *suffix = keel_arg_string_opt(call, args, "suffix", &len);
    if (!suffix) suffix = "";
    return keel_failed(call, "bad \xff byte%s", suffix);
}

static const keel_tool tools[] = {
    {.name = "latin1", .description = "Bytes that are not UTF-8.", .input_schema = "{\"type\":\"object\"}", .handler = latin1},
    {.name = "fails", .description = "An error that is not UTF-8.", .input_schema = "{\"type\":\"object\"}", .handler = fails},
};

KEEL_EXPORT_PLUGIN("bytesc", "0.1.0", "Bytes that are not UTF-8.", tools);
"#,
    )
    .unwrap();
    let home = tempfile::tempdir().unwrap();
    let component = build_into(home.path(), project.path(), "bytesc");
    common::expect(home.path(), &["install", component.to_str().unwrap()], 0);
    let report = common::json(home.path(), &["call", "bytesc/latin1", "{}", "--json"]);
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["output"]["text"], "caf\u{fffd} \u{fffd}\u{fffd} ok", "{report}");
    assert_eq!(report["logs"][0]["message"], "caf\u{fffd} log", "{report}");
    // What a tool prints is shown beside its result (print-debugging), never mixed into it.
    assert_eq!(report["stdout"], "printed\n", "{report}");
    assert_eq!(report["stderr"], "warned\n", "{report}");
    let out = common::expect(home.path(), &["call", "bytesc/latin1", "{}"], 0);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("[bytesc] stdout: printed"), "{stderr}");
    assert!(stderr.contains("[bytesc] stderr: warned"), "{stderr}");
    let value: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(value["text"], "caf\u{fffd} \u{fffd}\u{fffd} ok");
    let out = common::expect(home.path(), &["call", "bytesc/fails", "{}", "--json"], 1);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["error"]["kind"], "failed", "{report}");
    assert_eq!(report["error"]["message"], "bad \u{fffd} byte", "{report}");
    // An optional argument, absent: no error recorded in the way of the tool's own.
    let out = common::expect(home.path(), &["call", "bytesc/fails", r#"{"suffix":"!"}"#, "--json"], 1);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["error"]["message"], "bad \u{fffd} byte!", "{report}");
}

/// A compiler's errors are shown on their own lines, as the compiler wrote them (they were one
/// line with literal `\n`s), then one `error:` line; `--json` says the same as JSON.
#[test]
fn compiler_errors_keep_their_lines() {
    let project = tempfile::tempdir().unwrap();
    std::fs::write(project.path().join("broken.c"), "#include \"keel.h\"\nthis is not C;\n").unwrap();
    let home = tempfile::tempdir().unwrap();
    let out = common::expect(home.path(), &["build", project.path().to_str().unwrap()], 1);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("\\n"), "{stderr}");
    assert!(stderr.lines().count() > 2, "{stderr}");
    assert!(stderr.lines().any(|l| l.contains("broken.c:2")), "{stderr}");
    assert!(stderr.lines().last().unwrap().starts_with("error: "), "{stderr}");
    let out = common::expect(home.path(), &["build", project.path().to_str().unwrap(), "--json"], 1);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["ok"], false, "{report}");
    assert!(report["output"].as_str().unwrap().contains("broken.c:2"), "{report}");
}

/// `keel build PROJECT -o PROJECT/NAME.wasm` with `home`; the component's path.
fn build_into(home: &std::path::Path, project: &std::path::Path, name: &str) -> std::path::PathBuf {
    let component = project.join(format!("{name}.wasm"));
    common::expect(
        home,
        &["build", project.to_str().unwrap(), "-o", component.to_str().unwrap()],
        0,
    );
    component
}
