//! `plugins/python-exec` (CPython in a component), built from source and driven through the real
//! `keel` binary: it runs code like a REPL, and hostile code ends in a clear error or a clean
//! refusal, with the host alive and the next run clean.
//!
//! One Keel home serves the whole binary, so CPython is JIT-compiled once (or loaded from the
//! reusable cache). The plugin's scratch directory is shared by its calls, so the tests take turns
//! (a mutex) instead of running concurrently.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, OnceLock};

use keel_build::Lang;
use serde_json::{Value, json};

mod common;
mod langs;

/// Per-call wall-clock limit for the tests: long enough for any honest snippet here (a run takes
/// ~20 ms), short enough that the infinite loops do not slow the suite down.
const TIMEOUT_MS: &str = "2000";

struct Fixture {
    home: PathBuf,
    /// Host directory granted as the guest's `/scratch`.
    scratch: PathBuf,
    /// The directory holding `scratch`: nothing may appear in it.
    around: PathBuf,
}

fn fixture() -> MutexGuard<'static, Fixture> {
    static FIXTURE: OnceLock<Mutex<Fixture>> = OnceLock::new();
    FIXTURE
        .get_or_init(|| {
            let component = langs::build(Lang::Python, "plugins/python-exec");
            let home = langs::reusable_home("python-exec-home");
            let around = Path::new(env!("CARGO_TARGET_TMPDIR")).join("python-exec-around");
            let _ = std::fs::remove_dir_all(&around);
            let scratch = around.join("scratch");
            std::fs::create_dir_all(&scratch).unwrap();
            let grant = format!("{}::/scratch", scratch.display());
            let installed = common::json(
                &home,
                &[
                    "install",
                    &component.to_string_lossy(),
                    "--allow-write",
                    &grant,
                    "--json",
                ],
            );
            assert_eq!(installed["name"], "python-exec", "{installed}");
            common::expect(
                &home,
                &["plugins", "limits", "python-exec", "--timeout-ms", TIMEOUT_MS],
                0,
            );
            Mutex::new(Fixture { home, scratch, around })
        })
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Fixture {
    /// `keel call python-exec/run ARGS --json`: the output, or the error object. Panics unless the
    /// binary exited normally with a JSON report (no crash, no panic).
    fn run(&self, arguments: Value) -> Result<Value, Value> {
        let report = self.report(arguments);
        if report["ok"] == true {
            Ok(report["output"].clone())
        } else {
            Err(report["error"].clone())
        }
    }

    /// The whole `--json` report of one call (output or error, logs, ...).
    fn report(&self, arguments: Value) -> Value {
        let out = common::run(
            &self.home,
            &["call", "python-exec/run", &arguments.to_string(), "--json"],
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            matches!(out.status.code(), Some(0 | 1)) && !stderr.contains("panicked"),
            "keel died on {arguments}: {:?}\n{stderr}",
            out.status
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("no JSON report for {arguments} ({e}): {stderr}"))
    }

    fn code(&self, code: &str) -> Result<Value, Value> {
        self.run(json!({ "code": code }))
    }

    /// The host is alive and the next run is clean: fresh interpreter, empty scratch directory.
    fn assert_clean(&self, after: &str) {
        let probe = "import os, sys\n\
                     leaked = [n for n in ('state', 'secret') if n in globals()]\n\
                     print(sorted(os.listdir('/scratch')), leaked, 'json' in sys.modules, print is __builtins__.print)";
        let out = self
            .code(probe)
            .unwrap_or_else(|e| panic!("after {after}: the next run failed: {e}"));
        assert_eq!(out["stdout"], "[] [] True True\n", "after {after}: {out}");
        assert_eq!(out["error"], Value::Null, "after {after}: {out}");
        let around: Vec<_> = std::fs::read_dir(&self.around)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            around,
            ["scratch"],
            "after {after}: something was written next to the scratch dir"
        );
        assert_eq!(
            std::fs::read_dir(&self.scratch).unwrap().count(),
            0,
            "after {after}: scratch not emptied"
        );
    }
}

#[test]
fn runs_code_like_a_repl() {
    let keel = fixture();
    let out = keel.code("x = 6 * 7\nprint('x is', x)\nx").unwrap();
    assert_eq!(out["stdout"], "x is 42\n");
    assert_eq!(out["value"], "42");
    assert_eq!(out["error"], Value::Null);
    assert_eq!(out["truncated"], false);

    // No final expression (or a None one): no value, as in a REPL.
    assert_eq!(keel.code("y = 1").unwrap()["value"], Value::Null);
    assert_eq!(keel.code("print('hi')").unwrap()["value"], Value::Null);
    assert_eq!(keel.code("'a' + 'b'").unwrap()["value"], "'ab'");

    // stdin, and files in and out of the working directory.
    let out = keel
        .run(json!({
            "code": "import sys, os\n\
                     data = open('in/data.txt').read()\n\
                     open('out.txt', 'w').write(data.upper() + sys.stdin.read())\n\
                     os.getcwd()",
            "stdin": "from stdin",
            "files": {"in/data.txt": "héllo "},
        }))
        .unwrap();
    assert_eq!(out["value"], "'/scratch'");
    assert_eq!(
        out["files"],
        json!({"in/data.txt": "héllo ", "out.txt": "HÉLLO from stdin"})
    );
    // Files that are not UTF-8 text are named, not returned.
    let out = keel.code("open('bin', 'wb').write(b'\\xff')").unwrap();
    assert_eq!((&out["files"], &out["omitted_files"]), (&json!({}), &json!(["bin"])));

    // The SDK's context reaches the host log.
    let report = keel.report(json!({"code": "1/0"}));
    assert_eq!(
        report["logs"],
        json!([{"level": "debug", "message": "ran 3 characters of code: ZeroDivisionError: division by zero"}]),
        "{report}"
    );

    // An exception is a result (the traceback in stderr, a one-line summary in error), not a crash.
    let out = keel.code("def f():\n    return 1 / 0\nf()").unwrap();
    assert_eq!(out["error"], "ZeroDivisionError: division by zero");
    let stderr = out["stderr"].as_str().unwrap();
    assert!(
        stderr.contains("Traceback") && stderr.contains("line 2, in f"),
        "{stderr}"
    );
    assert_eq!(keel.code("import sys\nsys.exit(3)").unwrap()["error"], "SystemExit: 3");
    assert_eq!(keel.code("import sys\nsys.exit(0)").unwrap()["error"], Value::Null);
    let out = keel.code("def (").unwrap();
    assert!(out["error"].as_str().unwrap().starts_with("SyntaxError"), "{out}");

    // The standard library is there.
    let out = keel.code(
        "import json, math, statistics\njson.dumps({'m': statistics.median([3, 1, 2]), 'f': math.factorial(20)})",
    );
    assert_eq!(out.unwrap()["value"], r#"'{"m": 2, "f": 2432902008176640000}'"#);

    // Input files must stay inside the working directory.
    for name in ["/etc/x", "../x", "a/../../x", ""] {
        let err = keel.run(json!({"code": "1", "files": {name: "x"}})).unwrap_err();
        assert_eq!(err["kind"], "invalid_input", "{name}: {err}");
    }
    keel.assert_clean("runs_code_like_a_repl");
}

#[test]
fn asks_only_for_a_scratch_directory_and_no_network() {
    let keel = fixture();
    let show = common::json(&keel.home, &["plugins", "show", "python-exec", "--json"]);
    assert_eq!(show["imports"]["http"], false, "{show}");
    let tools = show["tools"].as_array().unwrap();
    assert_eq!(tools.len(), 1);
    assert_eq!(tools[0]["name"], "run");
    assert_eq!(
        tools[0]["capabilities"],
        json!({"environment": [], "filesystem": [{"mode": "read-write", "path": "/scratch"}], "network": []})
    );
    assert_eq!(tools[0]["input_schema"]["required"], json!(["code"]));
}

/// A run that touches no file skips reading `/scratch` at its end (its audit hook saw no file
/// event); every way of making a file must still count, so each file comes back.
#[test]
fn files_made_any_way_come_back() {
    let keel = fixture();
    let out = keel
        .code(
            "import io, os, shutil\n\
             fd = os.open('by_os_open', os.O_WRONLY | os.O_CREAT)\n\
             os.write(fd, b'a')\n\
             os.close(fd)\n\
             with io.FileIO('by_fileio', 'w') as f:\n\
             \x20   f.write(b'b')\n\
             shutil.copy('by_fileio', 'by_copy')\n\
             os.rename('by_copy', 'renamed')\n\
             os.mkdir('d')\n\
             with open('d/x', 'w') as f:\n\
             \x20   f.write('c')\n\
             os.replace('d/x', 'd/temp')",
        )
        .unwrap();
    assert_eq!(out["error"], Value::Null, "{out}");
    assert_eq!(
        out["files"],
        json!({"by_fileio": "b", "by_os_open": "a", "d/temp": "c", "renamed": "b"}),
        "{out}"
    );
    // A link makes no file to open: it is named all the same.
    let out = keel.code("import os\nos.symlink('nowhere', 'link')").unwrap();
    assert_eq!(
        (&out["files"], &out["omitted_files"]),
        (&json!({}), &json!(["link"])),
        "{out}"
    );
    keel.assert_clean("files made any way");
}

#[test]
fn every_run_starts_clean() {
    let keel = fixture();
    // Leave every kind of state behind: globals, a poisoned module cache and builtins, files in
    // the working directory and beside it, a changed working directory.
    let out = keel
        .code(
            "import sys, builtins, os\n\
             state = 'left over'\n\
             secret = 42\n\
             sys.modules['json'] = None\n\
             builtins.print = None\n\
             open('left.txt', 'w').write('x')\n\
             os.makedirs('/scratch/deep/er')\n\
             open('/scratch/deep/er/f', 'w').write('y')\n\
             os.chdir('/scratch/deep')\n\
             import random\n\
             random.random()",
        )
        .unwrap();
    assert_eq!(out["error"], Value::Null, "{out}");
    let first_random = out["value"].clone();
    keel.assert_clean("leaving state behind");

    // Each run is a fresh instance, but the PRNG is not the snapshot's fixed one.
    let second = keel.code("import random\nrandom.random()").unwrap()["value"].clone();
    assert_ne!(first_random, second, "random numbers repeat across runs");

    // A run that is killed mid-way (timeout) cannot leave files for the next one either.
    let err = keel
        .code("open('/scratch/orphan', 'w').write('x')\nwhile True: pass")
        .unwrap_err();
    assert_eq!(err["kind"], "timed_out", "{err}");
    keel.assert_clean("a killed run that left a file");
}

/// `sys.modules` of a `print(1)` run before python-exec warmed its interpreter up at build time
/// (componentize-py 0.25.1, CPython 3.14): the modules the plugin itself imports. The warm-up must
/// not add any (a run could see them); a new import in `app.py` or the SDK is a deliberate change
/// of this list.
const COLD_MODULES: &[&str] = &[
    "__future__",
    "__main__",
    "_abc",
    "_ast",
    "_bisect",
    "_codecs",
    "_collections",
    "_collections_abc",
    "_colorize",
    "_contextvars",
    "_datetime",
    "_decimal",
    "_frozen_importlib",
    "_frozen_importlib_external",
    "_functools",
    "_imp",
    "_io",
    "_json",
    "_opcode",
    "_opcode_metadata",
    "_operator",
    "_py_warnings",
    "_random",
    "_sitebuiltins",
    "_sre",
    "_stat",
    "_statistics",
    "_string",
    "_thread",
    "_tokenize",
    "_types",
    "_typing",
    "_warnings",
    "_weakref",
    "_weakrefset",
    "abc",
    "annotationlib",
    "app",
    "ast",
    "bisect",
    "builtins",
    "codecs",
    "codeop",
    "collections",
    "collections.abc",
    "componentize_py_runtime",
    "componentize_py_types",
    "compression",
    "compression._common",
    "compression._common._streams",
    "contextlib",
    "copy",
    "copyreg",
    "dataclasses",
    "datetime",
    "decimal",
    "dis",
    "encodings",
    "encodings.aliases",
    "encodings.utf_8",
    "enum",
    "errno",
    "fnmatch",
    "fractions",
    "functools",
    "genericpath",
    "importlib",
    "importlib._bootstrap",
    "importlib._bootstrap_external",
    "importlib.machinery",
    "inspect",
    "io",
    "itertools",
    "json",
    "json.decoder",
    "json.encoder",
    "json.scanner",
    "keel",
    "keel._docstring",
    "keel._export",
    "keel._schema",
    "keel_entry",
    "keyword",
    "linecache",
    "marshal",
    "math",
    "numbers",
    "opcode",
    "operator",
    "os",
    "os.path",
    "posix",
    "posixpath",
    "random",
    "re",
    "re._casefix",
    "re._compiler",
    "re._constants",
    "re._parser",
    "reprlib",
    "shutil",
    "site",
    "stat",
    "statistics",
    "string",
    "sys",
    "textwrap",
    "time",
    "token",
    "tokenize",
    "traceback",
    "types",
    "typing",
    "warnings",
    "weakref",
    "wit_world",
    "wit_world.exports",
    "wit_world.imports",
    "wit_world.imports.host",
    "wit_world.imports.types",
    "zipimport",
    "zlib",
];

#[test]
fn the_build_time_warm_up_is_invisible_to_runs() {
    let keel = fixture();
    // The first thing a run sees: its own globals only, no module beyond what the plugin imports,
    // no traceback source or exception left by the warm-up's error path, empty capture buffers
    // and an empty scratch directory.
    let probe = "g = sorted(globals())\n\
                 import sys, os, linecache, json\n\
                 state = [g, sorted(sys.modules), sorted(linecache.cache), hasattr(sys, 'last_exc'),\n\
                 \x20   sorted(os.listdir('/scratch')), sys.stdout.text(), sys.stderr.text()]\n\
                 print(json.dumps(state))";
    let out = keel.code(probe).unwrap();
    assert_eq!(out["error"], Value::Null, "{out}");
    let state: Value = serde_json::from_str(out["stdout"].as_str().unwrap()).unwrap();
    assert_eq!(state[0], json!(["__builtins__", "__name__"]), "a run's globals");
    let modules: Vec<&str> = state[1]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap())
        .collect();
    let extra: Vec<_> = modules
        .iter()
        .filter(|m| !COLD_MODULES.contains(m) && !["linecache", "os", "sys"].contains(m))
        .collect();
    assert!(extra.is_empty(), "modules a cold interpreter did not have: {extra:?}");
    assert!(modules.contains(&"app"), "{modules:?}");
    assert_eq!(state[2], json!(["<code>"]), "linecache holds only this run's source");
    assert_eq!(state[3], false, "an exception of the warm-up is left in sys.last_exc");
    assert_eq!(state[4], json!([]), "scratch is empty");
    assert_eq!(state[5], "", "stdout buffer at the start of a run");
    assert_eq!(state[6], "", "stderr buffer at the start of a run");
}

/// How a hostile snippet must end.
enum Ends {
    /// Refused by the host: the call fails with this error kind.
    Host(&'static str),
    /// A Python exception inside the sandbox, reported in `error` (prefix).
    Python(&'static str),
}

#[test]
fn hostile_code_is_contained() {
    let keel = fixture();
    let cases: &[(&str, &str, Ends)] = &[
        ("infinite loop", "while True: pass", Ends::Host("timed_out")),
        (
            "sleeping past the deadline",
            "import time\ntime.sleep(60)",
            Ends::Host("timed_out"),
        ),
        (
            "one huge allocation",
            "x = bytearray(1 << 30)",
            Ends::Python("MemoryError"),
        ),
        (
            "growing until memory runs out",
            "x = []\nwhile True: x.append(bytearray(1 << 20))",
            Ends::Python("MemoryError"),
        ),
        (
            "deep recursion",
            "def f(n): return f(n + 1)\nf(0)",
            Ends::Python("RecursionError"),
        ),
        (
            "deep recursion past the C stack",
            "import sys\nsys.setrecursionlimit(10**6)\ndef f(n): return f(n + 1)\nf(0)",
            Ends::Host("limit_exceeded"),
        ),
        (
            "reading /etc/passwd",
            "open('/etc/passwd').read()",
            Ends::Python("FileNotFoundError"),
        ),
        (
            "listing the root",
            "import os\nos.listdir('/')",
            Ends::Python("FileNotFoundError"),
        ),
        ("import socket", "import socket", Ends::Python("ModuleNotFoundError")),
        (
            "os.system",
            "import os\nos.system('id')",
            Ends::Python("AttributeError"),
        ),
        (
            "subprocess",
            "import subprocess\nsubprocess.run(['id'])",
            Ends::Python("ModuleNotFoundError"),
        ),
        ("import ctypes", "import ctypes", Ends::Python("ModuleNotFoundError")),
        (
            "fork bomb",
            "import os\nwhile True: os.fork()",
            Ends::Python("AttributeError"),
        ),
        (
            "writing /etc",
            "open('/etc/evil', 'w').write('x')",
            Ends::Python("FileNotFoundError"),
        ),
        (
            "writing /tmp",
            "open('/tmp/evil', 'w').write('x')",
            Ends::Python("FileNotFoundError"),
        ),
        (
            "climbing out of scratch",
            "open('/scratch/../escape.txt', 'w').write('x')",
            Ends::Python("PermissionError"),
        ),
        (
            "a symlink out of scratch",
            "import os\nos.symlink('/etc/passwd', 'p')\nopen('p').read()",
            Ends::Python(""),
        ),
        (
            "printing 1 GB at once",
            "print('x' * (1 << 30))",
            Ends::Python("MemoryError"),
        ),
        (
            "writing to the real stdout past the host's cap",
            "import os\nfor _ in range(1024): os.write(1, b'x' * (1 << 20))",
            Ends::Python("BrokenPipeError"),
        ),
    ];
    for (name, code, ends) in cases {
        let result = keel.code(code);
        match (ends, &result) {
            (Ends::Host(kind), Err(error)) => assert_eq!(error["kind"], *kind, "{name}: {error}"),
            (Ends::Python(prefix), Ok(out)) => {
                let error = out["error"]
                    .as_str()
                    .unwrap_or_else(|| panic!("{name}: no error: {out}"));
                assert!(error.starts_with(prefix), "{name}: {error}");
                assert!(out["stderr"].as_str().unwrap().contains("Traceback"), "{name}: {out}");
            }
            (_, other) => panic!("{name}: unexpected {other:?}"),
        }
        keel.assert_clean(name);
    }

    // Printing 1 GiB in pieces is bounded: the first 256 KiB are kept, the rest counted.
    let out = keel
        .code("import sys\nfor _ in range(1024): sys.stdout.write('x' * (1 << 20))")
        .unwrap();
    assert_eq!(out["truncated"], true);
    let stdout = out["stdout"].as_str().unwrap();
    assert!(stdout.len() < 300 << 10, "{} bytes returned", stdout.len());
    assert!(
        stdout.ends_with("[... 1073479680 more characters not shown]"),
        "{}",
        &stdout[stdout.len() - 80..]
    );
    keel.assert_clean("printing 1 GiB");
}
