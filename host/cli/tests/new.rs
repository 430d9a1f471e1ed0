//! `keel new`: a scaffold in every language builds (with `keel build`, or keel-build's cached
//! build for the slow Python/JS ones), installs and answers `keel call`; bad names and non-empty
//! directories are refused; a missing toolchain is one line naming how to install it.
//!
//! Needs every guest toolchain (`scripts/setup/{python,js-c}.sh`, the wasm32-wasip2 target).

use std::path::{Path, PathBuf};

use keel_build::Lang;
use serde_json::{Value, json};

mod common;
mod langs;

/// `keel new NAME --lang LANG` into `target/tmp/new-scaffolds/NAME` (a fixed place, so the build
/// cache of `langs` recognises an unchanged scaffold); returns its path relative to the workspace root.
fn scaffold(lang: &str, name: &str) -> String {
    let rel = format!("target/tmp/new-scaffolds/{name}");
    let dir = langs::root().join(&rel);
    let _ = std::fs::remove_dir_all(&dir);
    let home = tempfile::tempdir().unwrap();
    let out = common::expect(
        home.path(),
        &["new", name, "--lang", lang, "--dir", dir.to_str().unwrap()],
        0,
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains(&format!("keel call {name}/greet")), "{stdout}");
    rel
}

/// `keel build DIR -o OUT` through the CLI; returns OUT.
fn keel_build(dir: &Path, out: &Path) -> PathBuf {
    let home = tempfile::tempdir().unwrap();
    let built = common::keel(
        home.path(),
        &["build", dir.to_str().unwrap(), "-o", out.to_str().unwrap(), "--json"],
    )
    // One target dir for every run of this test: the scaffold's dependencies compile once.
    .env("CARGO_TARGET_DIR", langs::root().join("target/wasm-scaffold"))
    .output()
    .unwrap();
    assert!(
        built.status.success(),
        "keel build {}: {}",
        dir.display(),
        String::from_utf8_lossy(&built.stderr)
    );
    out.to_path_buf()
}

fn greet(home: &Path, name: &str, who: &str) -> Value {
    let out = common::run(
        home,
        &[
            "call",
            &format!("{name}/greet"),
            &json!({"name": who}).to_string(),
            "--json",
        ],
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn a_scaffold_in_every_language_builds_installs_and_answers() {
    let home = langs::reusable_home("new");
    let outs = tempfile::tempdir().unwrap();
    for (lang, name) in [
        (Lang::C, "new-c"),
        (Lang::Rust, "new-rust"),
        (Lang::Python, "new-python"),
        (Lang::Js, "new-js"),
    ] {
        let flag = format!("{lang:?}").to_lowercase();
        let rel = scaffold(&flag, name);
        let dir = langs::root().join(&rel);
        let component = match lang {
            // Fast builds go through the real `keel build`.
            Lang::C | Lang::Rust => keel_build(&dir, &outs.path().join(format!("{name}.wasm"))),
            // As the README says: `keel build` in the project, the component next to it (a
            // relative output path, which componentize-py, running elsewhere, once lost).
            Lang::Python => {
                let home = tempfile::tempdir().unwrap();
                let out = common::keel(home.path(), &["build"])
                    .current_dir(&dir)
                    .output()
                    .unwrap();
                assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
                dir.join(format!("{name}.wasm"))
            }
            // ~50 s: keel-build's own build, cached by content across runs.
            Lang::Js => langs::build(lang, &rel),
        };
        common::expect(&home, &["install", component.to_str().unwrap()], 0);
        let ok = greet(&home, name, " Ada ");
        assert_eq!(ok["output"], json!({"greeting": "Hello, Ada!"}), "{lang:?}: {ok}");
        let bad = greet(&home, name, "  ");
        assert_eq!(bad["error"]["kind"], "invalid_input", "{lang:?}: {bad}");
    }
    // The smoke script a C scaffold ships passes as written (it runs `keel` from PATH).
    let keel_dir = Path::new(env!("CARGO_BIN_EXE_keel")).parent().unwrap();
    let path = format!("{}:{}", keel_dir.display(), std::env::var("PATH").unwrap_or_default());
    let script = langs::root().join("target/tmp/new-scaffolds/new-c/test.sh");
    let out = std::process::Command::new(&script).env("PATH", path).output().unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok: new-c/greet"));
}

#[test]
fn bad_names_and_non_empty_directories_are_refused() {
    let home = tempfile::tempdir().unwrap();
    let root = tempfile::tempdir().unwrap();
    for bad in ["My-Tool", "a__b", "../up", "9lives"] {
        let dir = root.path().join("x");
        let out = common::expect(
            home.path(),
            &["new", bad, "--lang", "c", "--dir", dir.to_str().unwrap()],
            2,
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        common::one_clear_line(&stderr);
        assert!(stderr.contains("not a valid tool name"), "{stderr}");
        assert!(!dir.exists());
    }
    std::fs::write(root.path().join("keep.txt"), "mine").unwrap();
    let out = common::expect(
        home.path(),
        &["new", "ok", "--lang", "python", "--dir", root.path().to_str().unwrap()],
        2,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    common::one_clear_line(&stderr);
    assert!(stderr.contains("not empty"), "{stderr}");
    assert!(!root.path().join("app.py").exists());
    let out = common::expect(home.path(), &["new", "ok", "--lang", "cobol"], 2);
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown language"));
}

#[test]
fn a_missing_toolchain_is_one_line_naming_how_to_install_it() {
    let home = tempfile::tempdir().unwrap();
    let root = tempfile::tempdir().unwrap();
    for (lang, install) in [
        ("c", "apt-get install clang lld wasi-libc"),
        ("rust", "rustup"),
        ("python", "pip install componentize-py==0.25.1"),
        ("js", "Node.js"),
    ] {
        let dir = root.path().join(lang);
        common::expect(
            home.path(),
            &["new", "t", "--lang", lang, "--dir", dir.to_str().unwrap()],
            0,
        );
        // A PATH with none of the toolchains (and no $CARGO, as outside a cargo build).
        let out = common::keel(home.path(), &["build", dir.to_str().unwrap(), "-o", "/dev/null"])
            .env("PATH", root.path())
            .env_remove("CARGO")
            .env_remove("KEEL_CLANG")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{lang}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        common::one_clear_line(&stderr);
        assert!(
            stderr.contains("is not installed") && stderr.contains(install),
            "{lang}: {stderr}"
        );
    }
}
