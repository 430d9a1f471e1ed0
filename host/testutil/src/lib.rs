//! Test support shared by the host crates: building guest components from source.
//!
//! Guests are workspace members that are not default members; they are built for `wasm32-wasip2`
//! with the `guest` profile into `target/wasm`, a target dir of their own, so building them never
//! invalidates (or waits on) the host build. Cargo's own lock makes concurrent test binaries safe.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("host/testutil is two levels down")
        .to_path_buf()
}

/// Build the guest package `package` (e.g. `hello`, `keel-plugin-fs`) and return the component path.
/// Each package is built at most once per process.
pub fn guest(package: &str) -> PathBuf {
    static BUILT: OnceLock<Mutex<HashMap<String, PathBuf>>> = OnceLock::new();
    let built = BUILT.get_or_init(Default::default);
    let mut built = built.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(path) = built.get(package) {
        return path.clone();
    }
    let root = workspace_root();
    let target_dir = root.join("target").join("wasm");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let output = Command::new(&cargo)
        .current_dir(&root)
        .args([
            "build",
            "--quiet",
            "--target",
            "wasm32-wasip2",
            "--profile",
            "guest",
            "-p",
            package,
        ])
        .arg("--target-dir")
        .arg(&target_dir)
        // Don't inherit the host build's flags (coverage, sanitizers) into the guest build.
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "failed to run `{cargo}` in {} to build guest `{package}`: {e}",
                root.display()
            )
        });
    assert!(
        output.status.success(),
        "building guest `{package}` failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let path = target_dir
        .join("wasm32-wasip2")
        .join("guest")
        .join(format!("{}.wasm", package.replace('-', "_")));
    assert!(
        path.exists(),
        "guest `{package}` built but {} is missing",
        path.display()
    );
    built.insert(package.to_string(), path.clone());
    path
}

/// Read the built component bytes of `package`.
pub fn guest_bytes(package: &str) -> Vec<u8> {
    std::fs::read(guest(package)).expect("read built guest")
}
