//! `keel dev`: build + install, then rebuild + reinstall on every change; a broken build leaves
//! the last good version installed; a call in flight finishes on the version it started with;
//! grants survive reinstalls. Uses a C scaffold (builds in ~1 s). Needs the C toolchain.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

mod common;

/// The scaffold's greeting, plus a `wait` mode: with `{"name": "slow"}` the tool creates
/// `/sync/started`, then waits until `/sync/go` exists (the test creates it), so a call can be
/// held in flight across a reinstall.
fn source(greeting: &str) -> String {
    format!(
        r#"#include <stdio.h>
#include <unistd.h>
#include "keel.h"

static bool greet(keel_call *call, const keel_json *args) {{
    size_t len;
    const char *name = keel_arg_string(call, args, "name", &len);
    if (!name) return false;
    if (len == 4 && name[0] == 's' && name[1] == 'l') {{
        FILE *started = fopen("/sync/started", "w");
        if (started) fclose(started);
        while (access("/sync/go", F_OK) != 0) usleep(20000);
    }}
    char text[256];
    int n = snprintf(text, sizeof text, "{greeting}, %.*s!", (int)(len > 200 ? 200 : len), name);
    keel_out_object_begin(call);
    keel_out_key(call, "greeting");
    keel_out_string(call, text, (size_t)n);
    keel_out_object_end(call);
    return true;
}}

static const keel_tool tools[] = {{{{
    .name = "greet",
    .description = "Greet someone by name.",
    .input_schema = "{{\"type\":\"object\",\"properties\":{{\"name\":{{\"type\":\"string\"}}}},\"required\":[\"name\"]}}",
    .handler = greet,
    .writes = KEEL_LIST("/sync"),
}}}};

KEEL_EXPORT_PLUGIN("dev-tool", "0.1.0", "Greets people.", tools);
"#
    )
}

/// `keel dev`'s output lines (stdout and stderr), as they come.
struct Dev {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Dev {
    fn start(home: &Path, dir: &Path) -> Self {
        let mut child = common::keel(home, &["dev", dir.to_str().unwrap(), "--debounce-ms", "200"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, lines) = mpsc::channel();
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    let _ = tx.send(line);
                }
            });
        }
        Self {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Wait for a line containing `text`; returns it.
    fn wait_for(&mut self, text: &str) -> String {
        let end = Instant::now() + Duration::from_secs(120);
        while Instant::now() < end {
            if let Ok(line) = self.lines.recv_timeout(Duration::from_millis(100)) {
                self.seen.push(line.clone());
                if line.contains(text) {
                    return line;
                }
            }
        }
        panic!("keel dev never printed {text:?}; it printed:\n{}", self.seen.join("\n"));
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn greet(home: &Path, name: &str) -> Value {
    let out = common::run(
        home,
        &["call", "dev-tool/greet", &json!({"name": name}).to_string(), "--json"],
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn dev_rebuilds_on_change_keeps_the_last_good_version_and_lets_calls_in_flight_finish() {
    let home = tempfile::tempdir().unwrap();
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("dev-tool");
    let sync = root.path().join("sync");
    std::fs::create_dir(&sync).unwrap();
    common::expect(
        home.path(),
        &["new", "dev-tool", "--lang", "c", "--dir", dir.to_str().unwrap()],
        0,
    );
    let file = dir.join("plugin.c");
    std::fs::write(&file, source("Hello")).unwrap();

    let mut dev = Dev::start(home.path(), &dir);
    dev.wait_for("installed dev-tool 0.1.0");
    dev.wait_for("watching");
    assert_eq!(greet(home.path(), "Ada")["output"], json!({"greeting": "Hello, Ada!"}));
    // A grant given once survives every reinstall.
    let grant = format!("{}::/sync", sync.display());
    common::expect(
        home.path(),
        &["plugins", "grant", "dev-tool", "--allow-write", &grant],
        0,
    );

    // A call that started on the old version...
    let slow = common::keel(home.path(), &["call", "dev-tool/greet", r#"{"name":"slow"}"#, "--json"])
        .arg("--timeout-ms")
        .arg("120000")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // ...is running once the guest says so.
    let end = Instant::now() + Duration::from_secs(60);
    while !sync.join("started").exists() {
        assert!(Instant::now() < end, "the slow call never started");
        std::thread::sleep(Duration::from_millis(50));
    }
    let jobs = common::json(home.path(), &["jobs", "list", "--state", "running", "--json"]);
    assert_eq!(jobs.as_array().map(Vec::len), Some(1), "its job is running: {jobs}");

    // ...an edit is rebuilt and reinstalled while it runs...
    std::fs::write(&file, source("Howdy")).unwrap();
    dev.wait_for("changed: plugin.c");
    let line = dev.wait_for("installed dev-tool 0.1.0");
    assert!(!line.contains("unchanged"), "{line}");
    assert_eq!(greet(home.path(), "Ada")["output"], json!({"greeting": "Howdy, Ada!"}));
    // ...and the call in flight finishes on the version it started with.
    std::fs::write(sync.join("go"), "").unwrap();
    let out = slow.wait_with_output().unwrap();
    let slow: Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(slow["output"], json!({"greeting": "Hello, slow!"}), "{slow}");

    // A broken edit: the error is printed and the last good version stays installed.
    std::fs::write(&file, "this is not C\n").unwrap();
    dev.wait_for("build failed");
    dev.wait_for("stays installed");
    assert_eq!(greet(home.path(), "Ada")["output"], json!({"greeting": "Howdy, Ada!"}));
    // Fixed again: installed again, the grant still there.
    std::fs::write(&file, source("Hi")).unwrap();
    dev.wait_for("installed dev-tool 0.1.0");
    assert_eq!(greet(home.path(), "Ada")["output"], json!({"greeting": "Hi, Ada!"}));
    let shown = common::json(home.path(), &["plugins", "show", "dev-tool", "--json"]);
    assert_eq!(shown["grants"]["fs"][0]["guest"], "/sync", "{shown}");

    // Stopped with Ctrl-C, it exits cleanly.
    assert!(common::signal(dev.child.id(), "INT"));
    let status = common::wait_or_kill(&mut dev.child, Duration::from_secs(10)).expect("keel dev stops on SIGINT");
    assert!(status.success(), "{status:?}");
}
