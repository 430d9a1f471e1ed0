//! Black-box tests of the `keel` binary: install / plugins / call / exec, exit codes, messages.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use serde_json::{Value, json};

mod common;
use common::one_clear_line;

struct Keel {
    home: tempfile::TempDir,
}

impl Keel {
    fn new() -> Self {
        Self {
            home: tempfile::tempdir().unwrap(),
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        common::keel(self.home.path(), args)
    }

    fn run(&self, args: &[&str]) -> Output {
        common::run(self.home.path(), args)
    }

    /// Run, expect exit code `code`, return stdout.
    fn expect(&self, args: &[&str], code: i32) -> String {
        String::from_utf8(common::expect(self.home.path(), args, code).stdout).unwrap()
    }

    /// Run, expect exit code `code`, return stderr.
    fn stderr(&self, args: &[&str], code: i32) -> String {
        String::from_utf8(common::expect(self.home.path(), args, code).stderr).unwrap()
    }

    fn json(&self, args: &[&str]) -> Value {
        common::json(self.home.path(), args)
    }
}

fn guest(name: &str) -> String {
    keel_testutil::guest(name).to_string_lossy().into_owned()
}

fn canonical(path: &Path) -> String {
    std::fs::canonicalize(path).unwrap().to_string_lossy().into_owned()
}

#[test]
fn install_list_show_call_remove() {
    let keel = Keel::new();
    let out = keel.expect(&["install", &guest("hello")], 0);
    assert!(out.contains("installed hello 0.1.0 (compiled"), "{out}");
    assert!(out.contains("hello/greet [idempotent]"), "{out}");
    assert!(out.contains("network (wasi:http) no"), "{out}");

    // Re-installing the same bytes never recompiles.
    let out = keel.expect(&["install", &guest("hello")], 0);
    assert!(out.contains("loaded from cache"), "{out}");

    let list = keel.json(&["plugins", "list", "--json"]);
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["name"], "hello");
    let show = keel.json(&["plugins", "show", "hello", "--json"]);
    assert_eq!(show["tools"][0]["name"], "greet");
    assert_eq!(show["imports"]["http"], false);
    assert_eq!(show["limits"]["memory_bytes"], 64 << 20);

    let out = keel.expect(&["call", "hello/greet", r#"{"name":"Ada"}"#], 0);
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap(),
        json!({"greeting": "Hello, Ada!"})
    );
    let report = keel.json(&["call", "hello/greet", r#"{"name":"Ada"}"#, "--json"]);
    assert_eq!(report["ok"], true);
    assert_eq!(report["output"]["greeting"], "Hello, Ada!");

    // Arguments from stdin.
    let mut child = keel
        .command(&["call", "hello/greet", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(br#"{"name":"Stdin"}"#).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("Hello, Stdin!"));

    keel.expect(&["plugins", "remove", "hello"], 0);
    assert_eq!(keel.json(&["plugins", "list", "--json"]), json!([]));
    one_clear_line(&keel.stderr(&["call", "hello/greet", "{}"], 2));
}

#[test]
fn user_errors_and_plugin_failures_have_distinct_exit_codes() {
    let keel = Keel::new();
    keel.expect(&["install", &guest("hello")], 0);
    one_clear_line(&keel.stderr(&["call", "hello/greet", "{not json"], 2));
    one_clear_line(&keel.stderr(&["call", "hello/nope", "{}"], 2));
    one_clear_line(&keel.stderr(&["call", "ghost/greet", "{}"], 2));
    one_clear_line(&keel.stderr(&["call", "hello", "{}"], 2));
    let err = keel.stderr(&["call", "hello/greet", r#"{"name":""}"#], 2);
    assert!(err.contains("must not be empty"), "{err}");
    one_clear_line(&keel.stderr(&["plugins", "show", "ghost"], 2));

    keel.expect(&["install", &guest("keel-test-hostile"), "--timeout-ms", "300"], 0);
    let err = keel.stderr(&["call", "hostile/infinite_loop", "{}"], 1);
    one_clear_line(&err);
    assert!(err.contains("timed out"), "{err}");
    let report = keel.run(&["call", "hostile/panic", "{}", "--json"]);
    assert_eq!(report.status.code(), Some(1));
    let report: Value = serde_json::from_slice(&report.stdout).unwrap();
    assert_eq!(report["ok"], false);
    assert_eq!(report["error"]["kind"], "trapped");
}

#[test]
fn malformed_components_are_refused_and_nothing_is_stored() {
    let keel = Keel::new();
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, bytes: &[u8]| {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        path.to_string_lossy().into_owned()
    };
    let hello = std::fs::read(guest("hello")).unwrap();
    let cases = [
        (write("random.wasm", &[0x5a; 1000]), "not a WebAssembly file"),
        (write("empty.wasm", b""), "not a WebAssembly file"),
        (
            write("core.wasm", b"\0asm\x01\0\0\0"),
            "core WebAssembly module, not a component",
        ),
        (write("truncated.wasm", &hello[..hello.len() / 3]), "invalid component"),
        (guest("keel-test-cmd"), "WASI command"),
        (
            guest("keel-test-wrong-version"),
            "built for keel:plugin@0.2.0 but this host implements keel:plugin@0.1.0",
        ),
        ("/nonexistent/x.wasm".to_string(), "cannot read"),
    ];
    for (path, expected) in cases {
        let err = keel.stderr(&["install", &path], 2);
        one_clear_line(&err);
        assert!(err.contains(expected), "{path}: expected `{expected}` in {err}");
    }
    assert_eq!(keel.json(&["plugins", "list", "--json"]), json!([]));
    let stored = std::fs::read_dir(keel.home.path().join("components"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(stored, 0, "no component bytes may be stored for a refused install");
}

/// What `keel install`, `keel exec` and a policy flag read is a regular file of bounded size (or
/// stdin, bounded too): a device (`/dev/zero`) was read until memory ran out and a FIFO blocked
/// the open forever.
#[test]
fn inputs_that_are_not_regular_files_or_are_too_large_are_refused_at_once() {
    let keel = Keel::new();
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("plugin.wasm");
    assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let huge = dir.path().join("huge.wasm");
    std::fs::File::create(&huge).unwrap().set_len(300 << 20).unwrap();
    let fifo = fifo.to_str().unwrap();
    let zero = Path::new("/dev/zero");
    // (arguments, what stdin reads, what the one error line says)
    let cases: [(Vec<&str>, Option<&Path>, &str); 11] = [
        (vec!["install", "/dev/zero"], None, "not a regular file"),
        (vec!["install", fifo], None, "not a regular file"),
        (vec!["exec", fifo], None, "not a regular file"),
        (vec!["install", huge.to_str().unwrap()], None, "larger than 256 MiB"),
        (vec!["install", "-"], Some(&huge), "larger than 256 MiB"),
        (vec!["policy", "check", "/dev/zero"], None, "not a regular file"),
        (vec!["policy", "check", fifo], None, "not a regular file"),
        (
            vec!["call", "hello/greet", "{}", "--policy", fifo],
            None,
            "not a regular file",
        ),
        (vec!["actions", "resolve", "-"], Some(zero), "larger than 4096 bytes"),
        (vec!["call", "hello/greet", "-"], Some(zero), "larger than 256 MiB"),
        (
            vec!["exec", "--lang", "python", "-c", "print(input())", "--stdin"],
            Some(zero),
            "larger than 256 MiB",
        ),
    ];
    for (args, stdin, expected) in cases {
        let mut command = keel.command(&args);
        if let Some(path) = stdin {
            command.stdin(std::fs::File::open(path).unwrap());
        }
        let mut child = command.stderr(Stdio::piped()).spawn().unwrap();
        let status = common::wait_or_kill(&mut child, std::time::Duration::from_secs(30));
        let mut err = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
        assert_eq!(
            status.and_then(|s| s.code()),
            Some(2),
            "{args:?} ends at once with a user error: {err}"
        );
        one_clear_line(&err);
        assert!(err.contains(expected), "{args:?}: expected `{expected}` in {err}");
    }
}

#[test]
fn a_refused_request_names_the_grant_that_would_allow_it() {
    let keel = Keel::new();
    keel.expect(
        &[
            "install",
            &guest("keel-plugin-http-fetch"),
            "--allow-net",
            "localhost:9",
        ],
        0,
    );
    // The granted host resolves to loopback: granting it again would change nothing.
    let err = keel.stderr(&["call", "http-fetch/get", r#"{"url":"http://localhost:9/"}"#], 1);
    assert!(
        err.contains("grant with `keel plugins grant http-fetch --allow-private-network`"),
        "{err}"
    );
    assert!(!err.contains("--allow-net"), "{err}");
    // A host that is not granted: the hint names it.
    let err = keel.stderr(
        &["call", "http-fetch/get", r#"{"url":"http://example.invalid:8080/"}"#],
        1,
    );
    assert!(
        err.contains("grant with `keel plugins grant http-fetch --allow-net example.invalid:8080`"),
        "{err}"
    );
}

#[test]
fn install_from_stdin() {
    let keel = Keel::new();
    let mut child = keel
        .command(&["install", "-", "--json"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(&std::fs::read(guest("hello")).unwrap())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let value: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(value["name"], "hello");
}

#[test]
fn fs_plugin_grants_and_revocation() {
    let keel = Keel::new();
    let data = tempfile::tempdir().unwrap();
    let out_dir = tempfile::tempdir().unwrap();
    std::fs::write(data.path().join("in.txt"), "from the host").unwrap();
    let data_path = canonical(data.path());
    let out_path = canonical(out_dir.path());
    let install = keel.json(&[
        "install",
        &guest("keel-plugin-fs"),
        "--allow-read",
        &data_path,
        "--allow-write",
        &out_path,
        "--json",
    ]);
    assert_eq!(install["grants"]["fs"].as_array().unwrap().len(), 2);

    let read = keel.json(&["call", "fs/read", &format!(r#"{{"path":"{data_path}/in.txt"}}"#)]);
    assert_eq!(read["content"], "from the host");
    keel.expect(
        &[
            "call",
            "fs/write",
            &format!(r#"{{"path":"{out_path}/new.txt","content":"written"}}"#),
        ],
        0,
    );
    assert_eq!(
        std::fs::read_to_string(out_dir.path().join("new.txt")).unwrap(),
        "written"
    );

    // Writing into the read-only grant is denied and names the capability.
    let err = keel.stderr(
        &[
            "call",
            "fs/write",
            &format!(r#"{{"path":"{data_path}/x.txt","content":"no"}}"#),
        ],
        1,
    );
    assert!(err.contains("filesystem"), "{err}");
    assert!(!data.path().join("x.txt").exists());
    // Outside every grant: denied, listing the allowed roots.
    let err = keel.stderr(&["call", "fs/read", r#"{"path":"/etc/passwd"}"#], 1);
    assert!(err.contains(&data_path), "error lists the allowed roots: {err}");

    keel.expect(&["plugins", "revoke", "fs", "--dir", &data_path], 0);
    let err = keel.stderr(&["call", "fs/read", &format!(r#"{{"path":"{data_path}/in.txt"}}"#)], 1);
    assert!(err.contains("filesystem"), "{err}");
    one_clear_line(&keel.stderr(&["plugins", "revoke", "fs", "--dir", &data_path], 2));

    // Remapping HOST::GUEST.
    keel.expect(
        &["plugins", "grant", "fs", "--allow-read", &format!("{data_path}::/data")],
        0,
    );
    let read = keel.json(&["call", "fs/read", r#"{"path":"/data/in.txt"}"#]);
    assert_eq!(read["content"], "from the host");
}

#[test]
fn reinstalling_a_newer_version_shows_new_requests_and_does_not_carry_grants() {
    let keel = Keel::new();
    let dir = tempfile::tempdir().unwrap();
    keel.expect(
        &[
            "install",
            &guest("hello"),
            "--allow-env",
            "USER",
            "--allow-read",
            &canonical(dir.path()),
        ],
        0,
    );
    let out = keel.expect(&["install", &guest("keel-test-hello-v2"), "--replace"], 0);
    assert!(out.contains("installed hello 0.2.0"), "{out}");
    assert!(out.contains("requests more than 0.1.0 was granted"), "{out}");
    assert!(
        out.contains("env GREETING") && out.contains("network greetings.example.com"),
        "{out}"
    );
    assert!(out.contains("were not carried over"), "{out}");
    let show = keel.json(&["plugins", "show", "hello", "--json"]);
    assert_eq!(show["version"], "0.2.0");
    assert_eq!(show["grants"]["env"], json!([]));
    assert_eq!(show["grants"]["fs"], json!([]));

    // The env var is visible only once granted.
    let out = keel
        .command(&["call", "hello/greet", r#"{"name":"Ada"}"#])
        .env("GREETING", "Ahoy")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("Hello, Ada!"));
    keel.expect(&["plugins", "grant", "hello", "--allow-env", "GREETING"], 0);
    let out = keel
        .command(&["call", "hello/greet", r#"{"name":"Ada"}"#])
        .env("GREETING", "Ahoy")
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("Ahoy, Ada!"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // --keep-grants carries them over explicitly.
    let out = keel.expect(&["install", &guest("hello"), "--replace", "--keep-grants"], 0);
    assert!(out.contains("env GREETING"), "{out}");
}

#[test]
fn per_plugin_limits_apply() {
    let keel = Keel::new();
    keel.expect(&["install", &guest("keel-test-hostile")], 0);
    let limits = keel.json(&[
        "plugins",
        "limits",
        "hostile",
        "--timeout-ms",
        "300",
        "--memory-mb",
        "8",
        "--json",
    ]);
    assert_eq!(limits["memory_bytes"], 8 << 20);
    assert_eq!(limits["timeout_ms"], 300);
    let show = keel.json(&["plugins", "show", "hostile", "--json"]);
    assert_eq!(show["limits"]["timeout_ms"], 300);
    let err = keel.stderr(&["call", "hostile/infinite_loop", "{}"], 1);
    assert!(err.contains("timed out"), "{err}");
    keel.expect(&["call", "hostile/ok", "{}"], 0);
    let limits = keel.json(&["plugins", "limits", "hostile", "--reset", "--json"]);
    assert_eq!(limits["timeout_ms"], 10_000);
}

/// A limit no call could run under is refused where it is given, naming it, and nothing changes:
/// `--memory-mb 17592186044416` (2^44) wrapped to a 0-byte cap that failed every later call, and
/// a cap above the sandbox's ceiling was shown as set but silently lowered to the ceiling.
#[test]
fn limits_no_call_could_run_under_are_refused_where_they_are_given() {
    let keel = Keel::new();
    keel.expect(&["install", &guest("hello")], 0);
    let before = keel.json(&["plugins", "show", "hello", "--json"])["limits"].clone();
    for (flags, expected) in [
        (
            vec!["--memory-mb", "17592186044416"],
            "above the sandbox's ceiling of 1024 MiB",
        ),
        (
            vec!["--memory-mb", "18446744073709551615"],
            "above the sandbox's ceiling of 1024 MiB",
        ),
        (vec!["--memory-mb", "2048"], "above the sandbox's ceiling of 1024 MiB"),
        (vec!["--memory-mb", "0"], "`memory_bytes` is 0"),
        (vec!["--timeout-ms", "0"], "`timeout_ms` is 0"),
    ] {
        let mut args = vec!["plugins", "limits", "hello"];
        args.extend(&flags);
        let err = keel.stderr(&args, 2);
        one_clear_line(&err);
        assert!(err.contains(expected), "{flags:?}: expected `{expected}` in {err}");
        let mut call = vec!["call", "hello/greet", r#"{"name":"Ada"}"#];
        call.extend(&flags);
        let err = keel.stderr(&call, 2);
        assert!(
            err.contains(expected),
            "keel call {flags:?}: expected `{expected}` in {err}"
        );
    }
    assert_eq!(
        keel.json(&["plugins", "show", "hello", "--json"])["limits"],
        before,
        "nothing was stored"
    );
    let jobs = keel.json(&["jobs", "list", "--json"]);
    assert_eq!(
        jobs.as_array().map(Vec::len),
        Some(0),
        "no refused call became a job: {jobs}"
    );
    let err = keel.stderr(&["exec", &guest("keel-test-cmd"), "--memory-mb", "2048"], 2);
    assert!(
        err.contains("above the sandbox's ceiling of 1024 MiB"),
        "keel exec: {err}"
    );
    let err = keel.stderr(
        &["exec", "--lang", "python", "-c", "print(1)", "--memory-mb", "2048"],
        2,
    );
    assert!(
        err.contains("above the sandbox's ceiling of 1024 MiB"),
        "keel exec --lang: {err}"
    );
    keel.expect(&["call", "hello/greet", r#"{"name":"Ada"}"#], 0);
    std::fs::write(keel.home.path().join("config.toml"), "[limits]\nmemory_bytes = 0\n").unwrap();
    let err = keel.stderr(&["plugins", "list"], 2);
    assert!(err.contains("`memory_bytes` is 0"), "{err}");
    std::fs::write(
        keel.home.path().join("config.toml"),
        "[limits]\nmemory_bytes = 2147483648\n[sandbox]\nmax_memory_bytes = 1073741824\n",
    )
    .unwrap();
    let err = keel.stderr(&["plugins", "list"], 2);
    assert!(err.contains("above the sandbox's ceiling of 1024 MiB"), "{err}");
}

/// A fuel limit is refused where it is given while fuel is not metered (it would be shown as in
/// force and never apply): on a plugin, on a call, and in `config.toml`; with metering on, it holds.
#[test]
fn a_fuel_limit_without_fuel_metering_is_refused() {
    let keel = Keel::new();
    keel.expect(&["install", &guest("hello")], 0);
    let expected = "fuel_metering = true";
    for args in [
        vec!["plugins", "limits", "hello", "--fuel", "1"],
        vec!["call", "hello/greet", r#"{"name":"Ada"}"#, "--fuel", "1"],
    ] {
        let err = keel.stderr(&args, 2);
        one_clear_line(&err);
        assert!(err.contains(expected), "{args:?}: {err}");
    }
    assert_eq!(
        keel.json(&["plugins", "show", "hello", "--json"])["limits"]["fuel"],
        Value::Null
    );
    std::fs::write(keel.home.path().join("config.toml"), "[limits]\nfuel = 5\n").unwrap();
    let err = keel.stderr(&["plugins", "list"], 2);
    assert!(err.contains("config.toml") && err.contains(expected), "{err}");

    std::fs::write(
        keel.home.path().join("config.toml"),
        "[sandbox]\nfuel_metering = true\n",
    )
    .unwrap();
    keel.expect(&["plugins", "limits", "hello", "--fuel", "1"], 0);
    let err = keel.stderr(&["call", "hello/greet", r#"{"name":"Ada"}"#], 1);
    assert!(err.contains("fuel"), "the limit applies: {err}");
    // A limit stored earlier is not what refuses a call: the plugin keeps working.
    std::fs::write(keel.home.path().join("config.toml"), "").unwrap();
    keel.expect(&["call", "hello/greet", r#"{"name":"Ada"}"#], 0);
}

#[test]
fn exec_runs_wasi_commands_under_grants() {
    let keel = Keel::new();
    let cmd = guest("keel-test-cmd");
    let out = keel.expect(&["exec", &cmd, "--", "hello", "world"], 0);
    assert_eq!(out.trim(), "args: hello world");
    // WASI 0.2 `exit` carries success or failure only (exit-with-code is unstable): any failure is 1.
    let out = keel.run(&["exec", &cmd, "--", "exit", "7"]);
    assert_eq!(out.status.code(), Some(1));

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("f.txt"), "granted text").unwrap();
    let root = canonical(dir.path());
    let file = format!("{root}/f.txt");
    let out = keel.run(&["exec", &cmd, "--", "cat", &file]);
    assert_eq!(out.status.code(), Some(1), "no grant, no read");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cat "),
        "the program's stderr is passed through"
    );
    let out = keel.expect(&["exec", &cmd, "--allow-read", &root, "--", "cat", &file], 0);
    assert_eq!(out, "granted text");
    let out = keel.run(&["exec", &cmd, "--allow-read", &root, "--", "write", &file, "x"]);
    assert_eq!(out.status.code(), Some(1), "a read-only grant refuses writes");
    assert!(String::from_utf8_lossy(&out.stderr).contains("write "));
    assert_eq!(
        std::fs::read_to_string(dir.path().join("f.txt")).unwrap(),
        "granted text"
    );

    let out = keel
        .command(&["exec", &cmd, "--", "env", "SECRET_TOKEN"])
        .env("SECRET_TOKEN", "s3cr3t")
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "<unset>");
    let out = keel
        .command(&["exec", &cmd, "--allow-env", "SECRET_TOKEN", "--", "env", "SECRET_TOKEN"])
        .env("SECRET_TOKEN", "s3cr3t")
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "s3cr3t");

    one_clear_line(&keel.stderr(&["exec", &guest("hello")], 2));
}

/// `[agent]` values outside what the loop can work with are refused at load, naming the key: an
/// approval TTL of 0 made every approval-gated call hang (no action could be created, the job
/// retried for ever), a huge one or a huge lease panicked the runner.
#[test]
fn agent_settings_out_of_range_are_refused_naming_the_key() {
    for (config, key) in [
        ("[agent]\napproval_ttl_secs = 0\n", "approval_ttl_secs"),
        ("[agent]\napproval_ttl_secs = -30\n", "approval_ttl_secs"),
        (
            "[agent]\napproval_ttl_secs = 9223372036854775807\n",
            "approval_ttl_secs",
        ),
        ("[agent]\nlease_ttl_ms = 0\n", "lease_ttl_ms"),
        ("[agent]\nlease_ttl_ms = 9223372036854775807\n", "lease_ttl_ms"),
        ("[agent]\npoll_ms = 0\n", "poll_ms"),
        ("[agent]\ntool_timeout_ms = 0\n", "tool_timeout_ms"),
        ("[agent]\ntool_timeout_ms = 18446744073709551615\n", "tool_timeout_ms"),
        ("[agent]\ndefault_max_turns = 0\n", "default_max_turns"),
    ] {
        let keel = Keel::new();
        std::fs::write(keel.home.path().join("config.toml"), config).unwrap();
        let err = keel.stderr(&["plugins", "list"], 2);
        one_clear_line(&err);
        assert!(err.contains("config.toml") && err.contains(key), "{config}: {err}");
    }
}

#[test]
fn config_typos_are_errors_naming_the_key() {
    let cases = [
        ("[agnet]\npoll_ms = 10\n", "agnet"),
        ("[agent]\nlease_tll_ms = 10\n", "lease_tll_ms"),
        ("[limits]\nmemroy_bytes = 10\n", "memroy_bytes"),
        ("[sandbox]\nfuel_meter = true\n", "fuel_meter"),
        ("[models]\nprovders = {}\n", "provders"),
        (
            "[models.providers.local]\nkind = \"openai\"\nbase_ulr = \"http://x\"\n",
            "base_ulr",
        ),
        (
            "[models.prices.m]\ninput_per_mtok = \"1\"\noutput_per_mtok = \"1\"\ncahced_per_mtok = \"1\"\n",
            "cahced_per_mtok",
        ),
        (
            "[models.providers.local]\nkind = \"openai\"\n[models.providers.local.prices.m]\ninput_per_mtok = \"1\"\noutput_per_mtok = \"1\"\nouptut = \"1\"\n",
            "ouptut",
        ),
    ];
    for (config, key) in cases {
        let keel = Keel::new();
        std::fs::write(keel.home.path().join("config.toml"), config).unwrap();
        let err = keel.stderr(&["plugins", "list"], 2);
        one_clear_line(&err);
        assert!(err.contains("config.toml"), "{config}: {err}");
        assert!(err.contains(&format!("`{key}`")), "{config}: {err}");
    }
    // The same keys, spelt right, are accepted.
    let keel = Keel::new();
    std::fs::write(
        keel.home.path().join("config.toml"),
        "[agent]\nlease_ttl_ms = 10\n[limits]\nmemory_bytes = 1048576\n[sandbox]\nfuel_metering = true\n\
         [models.prices.m]\ninput_per_mtok = \"1\"\noutput_per_mtok = \"1\"\n",
    )
    .unwrap();
    keel.expect(&["plugins", "list"], 0);
}

/// Reap `child` with `wait4`: its exit code and peak resident memory in KiB.
fn wait_with_peak_rss(child: std::process::Child) -> (Option<i32>, i64) {
    let mut status = 0;
    // SAFETY: an all-zero `rusage` is a valid value; `wait4` writes into both out-parameters.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `child` is our own unreaped child; the pointers are valid for the call.
    let pid = unsafe { libc::wait4(child.id() as libc::pid_t, &mut status, 0, &mut usage) };
    assert_eq!(pid, child.id() as libc::pid_t, "wait4");
    let code = libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status));
    (code, usage.ru_maxrss)
}

/// Count the bytes of `reader` on a thread of its own.
fn count_bytes(mut reader: impl std::io::Read + Send + 'static) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 16];
        let mut total = 0u64;
        loop {
            match reader.read(&mut buf) {
                Ok(0) => return total,
                Ok(n) => total += n as u64,
                Err(e) => panic!("read: {e}"),
            }
        }
    })
}

#[test]
fn exec_streams_output_past_any_capture_cap_in_bounded_memory() {
    let keel = Keel::new();
    let cmd = guest("keel-test-cmd");
    // Bytes on stdout and stderr, exit code, peak RSS (KiB) of `keel exec cmd -- spew BYTES STREAM`.
    let spew = |bytes: u64, stream: &str| {
        let mut child = keel
            .command(&[
                "exec",
                &cmd,
                "--timeout-ms",
                "300000",
                "--",
                "spew",
                &bytes.to_string(),
                stream,
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let out = count_bytes(child.stdout.take().unwrap());
        let err = count_bytes(child.stderr.take().unwrap());
        let (code, rss) = wait_with_peak_rss(child);
        (out.join().unwrap(), err.join().unwrap(), code, rss)
    };
    let (out, err, code, small_rss) = spew(1024, "out");
    assert_eq!((out, err, code), (1024, 0, Some(0)));

    // Far more than the 16 MiB a captured run keeps, all of it, in about the memory of 1 KiB.
    let big = 256 << 20;
    let (out, err, code, big_rss) = spew(big, "out");
    assert_eq!((out, err, code), (big, 0, Some(0)), "every byte arrives, exit 0");
    assert!(
        big_rss < small_rss + 32 * 1024,
        "streaming {big} bytes took {big_rss} KiB peak RSS, 1 KiB took {small_rss} KiB"
    );
    let (out, err, code, _) = spew(32 << 20, "err");
    assert_eq!((out, err, code), (0, 32 << 20, Some(0)), "stderr streams too");
}

#[test]
fn exec_output_appears_while_the_program_runs() {
    use std::io::BufRead;
    let keel = Keel::new();
    let cmd = guest("keel-test-cmd");
    let started = std::time::Instant::now();
    let mut child = keel
        .command(&["exec", &cmd, "--", "line-sleep", "3000"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    let first = started.elapsed();
    assert_eq!(line, "first line\n");
    assert!(
        child.try_wait().unwrap().is_none(),
        "the first line arrived before the program ended"
    );
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
    let status = child.wait().unwrap();
    let ended = started.elapsed();
    assert_eq!(rest, "last line\n");
    assert_eq!(status.code(), Some(0));
    assert!(
        ended - first >= std::time::Duration::from_millis(2000),
        "first line at {first:?}, exit at {ended:?}: the program sleeps 3 s between them"
    );

    // The program's exit status is keel's (WASI 0.2 carries success or failure only).
    assert_eq!(keel.run(&["exec", &cmd, "--", "exit", "0"]).status.code(), Some(0));
    assert_eq!(keel.run(&["exec", &cmd, "--", "exit", "3"]).status.code(), Some(1));
}

/// `keel worker --auto-approve` is refused, saying why: a worker answers no approvals, and the
/// flag was accepted and silently ignored.
#[test]
fn a_worker_refuses_auto_approve() {
    let keel = Keel::new();
    let err = keel.stderr(&["worker", "--auto-approve", "--until-idle"], 2);
    one_clear_line(&err);
    assert!(err.contains("does not answer approvals"), "{err}");
}
