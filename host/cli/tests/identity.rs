//! Plugin identity and install integrity through the real `keel` binary (issue 7, items 3, 8, 12, 13):
//! a plugin is what the registry recorded at install time (name + sha256), never what its
//! `describe()` answers later; one plugin that cannot be loaded never stops a host; re-installing
//! under a taken name needs `--replace`; no grant may reach the Keel home.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use keel_kernel::registry::PluginRegistry as _;
use serde_json::{Value, json};

mod common;

const MODEL: &str = "scripted:test";
const WAIT: Duration = Duration::from_secs(20);

fn guest(name: &str) -> String {
    keel_testutil::guest(name).to_string_lossy().into_owned()
}

fn show(out: &Output) -> String {
    format!(
        "exit: {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A Keel home with a scripted model; `fs` installed with `/out` read-write (host `out/`).
struct Home {
    dir: tempfile::TempDir,
}

impl Home {
    fn new(script: Value) -> Self {
        let home = Self {
            dir: tempfile::tempdir().unwrap(),
        };
        let p = home.path();
        std::fs::create_dir_all(p.join("out")).unwrap();
        std::fs::create_dir_all(p.join("evil")).unwrap();
        std::fs::write(p.join("script.json"), json!({ "turns": script }).to_string()).unwrap();
        std::fs::write(
            p.join("config.toml"),
            "[agent]\nlease_ttl_ms = 1000\npoll_ms = 50\n\n\
             [models.providers.scripted]\nkind = \"scripted\"\nscript = \"script.json\"\n",
        )
        .unwrap();
        let out = format!("{}::/out", p.join("out").display());
        home.expect(&["install", &guest("keel-plugin-fs"), "--allow-write", &out], 0);
        home
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = common::keel(self.path(), args);
        c.env_remove("KEEL_DEBUG_MODEL_DELAY_MS").stdin(Stdio::null());
        c
    }

    fn output(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run keel")
    }

    fn expect(&self, args: &[&str], code: i32) -> String {
        let out = self.output(args);
        assert_eq!(out.status.code(), Some(code), "keel {args:?}\n{}", show(&out));
        String::from_utf8(out.stdout).unwrap()
    }

    fn json(&self, args: &[&str]) -> Value {
        serde_json::from_str(&self.expect(args, 0)).expect("JSON output")
    }

    /// Plant a registry record `name` for the component of the installed plugin `of`, as if
    /// `describe()` had answered `name` at install time, with `grants`. The component still
    /// describes itself as `of`: exactly a plugin whose `describe()` answer changed after install.
    fn plant_impostor(&self, name: &str, of: &str, grants: Value) {
        let db_path = self.path().join("keel.db");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let db = keel_store::Database::open(&db_path).await.unwrap();
            let mut record = db.get_plugin(of).await.unwrap().expect("installed");
            record.name = name.to_string();
            record.info["name"] = json!(name);
            record.grants = grants;
            db.upsert_plugin(&record).await.unwrap();
        });
    }

    fn file(&self, rel: &str) -> String {
        std::fs::read_to_string(self.path().join(rel)).unwrap_or_default()
    }

    fn job(&self, id: &str) -> Value {
        self.json(&["jobs", "show", id, "--json"])
    }
}

/// Wait for a child to exit (bounded), returning its output.
fn finish(child: Child) -> Output {
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(WAIT) {
        Ok(out) => out.expect("wait for keel"),
        Err(_) => {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            panic!("keel (pid {pid}) did not finish within {WAIT:?}");
        }
    }
}

fn write_effect() -> Value {
    json!({
        "tool_calls": [{ "name": "fs__write", "arguments": { "path": "/out/effects.txt", "content": "line\n", "mode": "append" } }],
        "usage": { "input_tokens": 10, "output_tokens": 5 }
    })
}

fn done() -> Value {
    json!({ "text": "Done.", "usage": { "input_tokens": 10, "output_tokens": 5 } })
}

fn evil_grants(home: &Home) -> Value {
    json!({ "fs": [{ "host": home.path().join("evil").canonicalize().unwrap(), "guest": "/out", "mode": "read-write" }] })
}

/// Item 3: `helper`, whose component now describes itself as `fs`, never takes over `fs/write`
/// (with its own grants: `/out` mapped to `evil/`), in `keel call`, `keel run` or `keel worker`.
#[test]
fn a_plugin_whose_describe_changes_never_takes_over_another() {
    let home = Home::new(json!([write_effect(), done()]));
    home.plant_impostor("helper", "fs", evil_grants(&home));

    // keel call: the registry name decides; the impostor is refused with one clear line.
    let out = home.output(&[
        "call",
        "helper/write",
        r#"{"path":"/out/x.txt","content":"x","mode":"create"}"#,
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    common::one_clear_line(&String::from_utf8_lossy(&out.stderr));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("describes itself as `fs`"),
        "{}",
        show(&out)
    );
    assert_eq!(home.file("evil/x.txt"), "", "the impostor ran");

    // keel run with both: fs/write is the real fs; helper is reported and skipped.
    let out = home.output(&["run", "write", "--tools", "fs,helper", "--model", MODEL, "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("helper"),
        "no warning about helper\n{}",
        show(&out)
    );
    assert_eq!(home.file("out/effects.txt"), "line\n", "{}", show(&out));
    assert_eq!(home.file("evil/effects.txt"), "", "the impostor took over fs/write");

    // keel worker: a job that named only `fs` reaches only the real fs.
    let id = home
        .expect(&["run", "write", "--tools", "fs", "--model", MODEL, "--detach"], 0)
        .trim()
        .to_string();
    let worker = home
        .command(&["worker", "--until-idle"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = finish(worker);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_eq!(home.job(&id)["job"]["state"], "SUCCEEDED");
    assert_eq!(home.file("out/effects.txt"), "line\nline\n", "{}", show(&out));
    assert_eq!(
        home.file("evil/effects.txt"),
        "",
        "the impostor took over fs/write in the worker"
    );
}

/// Item 8: a plugin whose component cannot be loaded is reported and skipped; `keel worker` and
/// `keel run` still run the queued jobs.
#[test]
fn a_plugin_that_fails_to_load_never_stops_the_host() {
    let home = Home::new(json!([write_effect(), done()]));
    home.expect(&["install", &guest("hello")], 0);
    let sha = home.json(&["plugins", "show", "hello", "--json"])["sha256"]
        .as_str()
        .unwrap()
        .to_string();
    std::fs::remove_file(home.path().join(format!("components/{sha}.wasm"))).unwrap();

    let id = home
        .expect(&["run", "write", "--tools", "fs", "--model", MODEL, "--detach"], 0)
        .trim()
        .to_string();
    let worker = home
        .command(&["worker", "--until-idle"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = finish(worker);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_eq!(home.job(&id)["job"]["state"], "SUCCEEDED", "{}", show(&out));
    assert_eq!(home.file("out/effects.txt"), "line\n");

    // keel run naming the broken plugin too: a warning, and the job still runs.
    let out = home.output(&["run", "write", "--tools", "fs,hello", "--model", MODEL, "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("warning: plugin `hello` cannot be loaded"),
        "{}",
        show(&out)
    );
    assert_eq!(home.file("out/effects.txt"), "line\nline\n");

    // Its calls fail as tool errors, clearly.
    let out = home.output(&["call", "hello/greet", r#"{"name":"Ada"}"#]);
    assert_ne!(out.status.code(), Some(0), "{}", show(&out));
    common::one_clear_line(&String::from_utf8_lossy(&out.stderr));
}

/// Item 13: a different component under a taken name needs `--replace`; old and new sha256 are
/// printed; `--keep-grants` keeps grants only when the newcomer requests no more than the old one.
#[test]
fn replacing_a_plugin_needs_replace_and_keeps_grants_only_within_old_requests() {
    let keel = tempfile::tempdir().unwrap();
    let k = keel.path();
    let data = tempfile::tempdir().unwrap();
    let data = data.path().canonicalize().unwrap();
    let data = data.to_str().unwrap();
    common::expect(k, &["install", &guest("hello"), "--allow-read", data], 0);
    let v1 = common::json(k, &["plugins", "show", "hello", "--json"])["sha256"]
        .as_str()
        .unwrap()
        .to_string();

    // Same bytes again: nothing is replaced, no flag needed.
    common::expect(k, &["install", &guest("hello")], 0);

    // Another component naming itself `hello`: refused, nothing changes.
    let out = common::expect(k, &["install", &guest("keel-test-hello-v2")], 2);
    let err = String::from_utf8_lossy(&out.stderr);
    common::one_clear_line(&err);
    assert!(err.contains("--replace") && err.contains(&v1), "{err}");
    let shown = common::json(k, &["plugins", "show", "hello", "--json"]);
    assert_eq!(shown["sha256"], v1.as_str());
    assert_eq!(shown["version"], "0.1.0");

    // --keep-grants for a newcomer that requests more than the old one: refused.
    let out = common::expect(
        k,
        &["install", &guest("keel-test-hello-v2"), "--replace", "--keep-grants"],
        2,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    common::one_clear_line(&err);
    assert!(err.contains("env GREETING"), "{err}");
    assert_eq!(
        common::json(k, &["plugins", "show", "hello", "--json"])["version"],
        "0.1.0"
    );

    // --replace: done, both hashes printed, grants not carried over.
    let out = String::from_utf8(common::expect(k, &["install", &guest("keel-test-hello-v2"), "--replace"], 0).stdout)
        .unwrap();
    let v2 = common::json(k, &["plugins", "show", "hello", "--json"])["sha256"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(out.contains(&v1) && out.contains(&v2), "{out}");
    assert_eq!(
        common::json(k, &["plugins", "show", "hello", "--json"])["grants"]["fs"],
        json!([])
    );

    // Back to 0.1.0, which requests less than 0.2.0: --keep-grants keeps what 0.2.0 was granted.
    common::expect(k, &["plugins", "grant", "hello", "--allow-env", "GREETING"], 0);
    common::expect(k, &["install", &guest("hello"), "--replace", "--keep-grants"], 0);
    let shown = common::json(k, &["plugins", "show", "hello", "--json"]);
    assert_eq!(shown["sha256"], v1.as_str());
    assert_eq!(shown["grants"]["env"], json!(["GREETING"]));
}

/// Item 12: no grant may contain the Keel home (or reach into its components or cache).
#[test]
fn grants_that_reach_the_keel_home_are_refused() {
    let parent = tempfile::tempdir().unwrap();
    let home: PathBuf = parent.path().join("keel-home");
    std::fs::create_dir_all(&home).unwrap();
    common::expect(&home, &["install", &guest("hello")], 0);
    let parent_dir = parent.path().canonicalize().unwrap();
    let home_dir = home.canonicalize().unwrap();
    let components = home_dir.join("components");
    let mapped = format!("{}::/data", parent_dir.display());
    let cases: Vec<Vec<String>> = vec![
        vec![
            "plugins".into(),
            "grant".into(),
            "hello".into(),
            "--allow-write".into(),
            home_dir.display().to_string(),
        ],
        vec![
            "plugins".into(),
            "grant".into(),
            "hello".into(),
            "--allow-read".into(),
            mapped.clone(),
        ],
        vec![
            "plugins".into(),
            "grant".into(),
            "hello".into(),
            "--allow-write".into(),
            components.display().to_string(),
        ],
        vec![
            "install".into(),
            guest("hello"),
            "--allow-write".into(),
            parent_dir.display().to_string(),
        ],
        vec!["exec".into(), guest("keel-test-cmd"), "--allow-write".into(), mapped],
    ];
    for args in &cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = common::expect(&home, &args, 2);
        let err = String::from_utf8_lossy(&out.stderr);
        common::one_clear_line(&err);
        assert!(err.contains("Keel home"), "{args:?}: {err}");
    }
    let shown = common::json(&home, &["plugins", "show", "hello", "--json"]);
    assert_eq!(shown["grants"]["fs"], json!([]));

    // A directory beside the home (or inside it but not Keel's own) is fine.
    let beside = parent_dir.join("data");
    std::fs::create_dir_all(&beside).unwrap();
    common::expect(
        &home,
        &["plugins", "grant", "hello", "--allow-read", beside.to_str().unwrap()],
        0,
    );
}
