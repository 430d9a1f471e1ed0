//! Building Rust tool projects: a cargo package with `crate-type = ["cdylib"]` depending on
//! `keel-sdk`. `cargo build --target wasm32-wasip2` emits a component directly (no
//! cargo-component); this module runs it and copies the `.wasm` to the requested path.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::BuildError;

/// The target every Keel guest is built for.
pub const TARGET: &str = "wasm32-wasip2";

/// How to run cargo. The default is a plain release build with cargo's own target directory.
#[derive(Debug, Clone)]
pub struct Options {
    /// The cargo executable (`$CARGO` when set, as inside a cargo build script or test, else `cargo`).
    pub cargo: PathBuf,
    /// `--target-dir`; `None` keeps cargo's choice (the workspace's `target/` or `CARGO_TARGET_DIR`).
    pub target_dir: Option<PathBuf>,
    /// The cargo profile (`release`, or a custom one such as the workspace's `guest`).
    pub profile: String,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            cargo: std::env::var_os("CARGO").map_or_else(|| PathBuf::from("cargo"), PathBuf::from),
            target_dir: None,
            profile: "release".into(),
        }
    }
}

/// Build the Rust project in `project` (a directory with a `Cargo.toml`) into a component at `out`.
pub fn build(project: &Path, out: &Path) -> Result<PathBuf, BuildError> {
    build_with(project, out, &Options::default())
}

/// [`build`] with explicit cargo options.
pub fn build_with(project: &Path, out: &Path, options: &Options) -> Result<PathBuf, BuildError> {
    let manifest = project.join("Cargo.toml");
    if !manifest.is_file() {
        return Err(BuildError::Project(format!(
            "{} has no Cargo.toml (a Rust project is a cargo package with crate-type = [\"cdylib\"])",
            project.display()
        )));
    }
    let mut command = Command::new(&options.cargo);
    command
        .args(["build", "--quiet", "--target", TARGET, "--profile", &options.profile])
        .args(["--message-format", "json-render-diagnostics"])
        .arg("--manifest-path")
        .arg(&manifest)
        .current_dir(project)
        // Flags meant for the host build (coverage, sanitizers) break a wasm build.
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS");
    if let Some(dir) = &options.target_dir {
        command.arg("--target-dir").arg(dir);
    }
    let output = command.output().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            BuildError::MissingToolchain {
                tool: format!("cargo ({})", options.cargo.display()),
                install: "install Rust with rustup, then `rustup target add wasm32-wasip2`".into(),
            }
        } else {
            BuildError::Io(e)
        }
    })?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        if stderr.contains(TARGET)
            && (stderr.contains("target may not be installed") || stderr.contains("rustup target add"))
        {
            return Err(BuildError::MissingToolchain {
                tool: format!("the Rust standard library for {TARGET}"),
                install: format!("rustup target add {TARGET}"),
            });
        }
        return Err(BuildError::Failed {
            step: format!("cargo build ({})", project.display()),
            output: stderr.trim().to_string(),
        });
    }
    let wasm = component_path(&String::from_utf8_lossy(&output.stdout), &manifest)?;
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    // Copy then rename: `out` is never seen half-written.
    let partial = out.with_extension("wasm.partial");
    std::fs::copy(&wasm, &partial)?;
    std::fs::rename(&partial, out)?;
    Ok(out.to_path_buf())
}

/// The `.wasm` cargo reported for the package whose manifest is `manifest`, from its JSON messages.
fn component_path(messages: &str, manifest: &Path) -> Result<PathBuf, BuildError> {
    let manifest = std::fs::canonicalize(manifest)?;
    let mut found = None;
    for line in messages.lines() {
        let Ok(message) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if message["reason"] != "compiler-artifact" {
            continue;
        }
        let ours = message["manifest_path"]
            .as_str()
            .and_then(|p| std::fs::canonicalize(p).ok())
            .is_some_and(|p| p == manifest);
        let cdylib = message["target"]["kind"]
            .as_array()
            .is_some_and(|kinds| kinds.iter().any(|k| k == "cdylib"));
        if !(ours && cdylib) {
            continue;
        }
        let wasm = message["filenames"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|f| f.as_str())
            .find(|f| f.ends_with(".wasm"));
        if let Some(wasm) = wasm {
            found = Some(PathBuf::from(wasm));
        }
    }
    found.ok_or_else(|| {
        BuildError::Project(format!(
            "cargo built {} but produced no .wasm: the package needs `[lib] crate-type = [\"cdylib\"]`",
            manifest.display()
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_without_cargo_toml_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = build(dir.path(), &dir.path().join("o.wasm")).unwrap_err();
        assert!(err.to_string().contains("has no Cargo.toml"), "{err}");
    }

    #[test]
    fn missing_cargo_is_a_missing_toolchain() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("Cargo.toml"), "[package]\nname = \"x\"\n").unwrap();
        let options = Options {
            cargo: "/nonexistent/cargo".into(),
            ..Options::default()
        };
        let err = build_with(dir.path(), &dir.path().join("o.wasm"), &options).unwrap_err();
        assert!(matches!(err, BuildError::MissingToolchain { .. }), "{err:?}");
        assert!(err.to_string().contains("rustup"), "{err}");
    }

    #[test]
    fn the_component_is_found_in_cargo_messages() {
        let dir = tempfile::tempdir().unwrap();
        let manifest = dir.path().join("Cargo.toml");
        std::fs::write(&manifest, "").unwrap();
        let manifest_str = manifest.to_string_lossy();
        let messages = [
            serde_json::json!({"reason": "compiler-artifact", "manifest_path": "/elsewhere/Cargo.toml",
                "target": {"kind": ["cdylib"]}, "filenames": ["/t/other.wasm"]}),
            serde_json::json!({"reason": "compiler-artifact", "manifest_path": manifest_str,
                "target": {"kind": ["cdylib"]}, "filenames": ["/t/mine.wasm"]}),
            serde_json::json!({"reason": "build-finished", "success": true}),
        ]
        .map(|m| m.to_string())
        .join("\n");
        assert_eq!(
            component_path(&messages, &manifest).unwrap(),
            PathBuf::from("/t/mine.wasm")
        );
        let err = component_path("", &manifest).unwrap_err();
        assert!(err.to_string().contains("cdylib"), "{err}");
    }
}
