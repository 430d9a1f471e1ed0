//! Building tool projects in any language from source (through keel-build) for the black-box tests.
//!
//! Python and JavaScript components take tens of seconds to build on a small machine, so a built
//! component is cached under `target/keel-build-cache/`, keyed by the sha256 of everything it is
//! built from (the project's files, the SDKs, the WIT contract): a re-run of the tests rebuilds
//! only what changed. Rust projects go through cargo every time (cargo is its own cache) in the
//! guest target dir `target/wasm`, shared with `keel-testutil`, so the host build is never locked.
#![allow(dead_code)] // each test binary uses a different subset

use std::path::{Path, PathBuf};

use keel_build::{BuildError, Lang};
use sha2::{Digest, Sha256};

/// The workspace root.
pub fn root() -> PathBuf {
    keel_testutil::workspace_root()
}

/// Build the project at `project` (relative to the workspace root) written in `lang`; returns the
/// component path. Panics with the build's own message when it fails.
pub fn build(lang: Lang, project: &str) -> PathBuf {
    try_build(lang, project).unwrap_or_else(|e| panic!("building {project} ({lang:?}) failed: {e}"))
}

/// [`build`], returning the build error instead of panicking.
pub fn try_build(lang: Lang, project: &str) -> Result<PathBuf, BuildError> {
    let root = root();
    let dir = root.join(project);
    let cache = root.join("target").join("keel-build-cache");
    std::fs::create_dir_all(&cache)?;
    if lang == Lang::Rust {
        let out = cache.join(format!("{}.wasm", project.replace('/', "_")));
        let options = keel_build::rust::Options {
            target_dir: Some(root.join("target").join("wasm")),
            profile: "guest".into(),
            ..Default::default()
        };
        return keel_build::rust::build_with(&dir, &out, &options);
    }
    let mut hasher = Sha256::new();
    hasher.update(format!("{lang:?}\0").as_bytes());
    // The SDKs and the contract are compiled into keel-build, so they are inputs of every build.
    for (input, whole) in [
        (dir.clone(), true),
        (root.join("sdk"), false),
        (root.join("wit"), true),
        (root.join("host/build/src"), true),
    ] {
        hash_tree(&mut hasher, &root, &input, whole)?;
    }
    let key = hex::encode(&hasher.finalize()[..12]);
    let stem = project.replace('/', "_");
    let out = cache.join(format!("{stem}-{key}.wasm"));
    if out.is_file() {
        return Ok(out);
    }
    // Older builds of the same project are stale: ~20 MB each, so don't let them pile up.
    for entry in std::fs::read_dir(&cache)?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name
            .strip_prefix(&stem)
            .is_some_and(|rest| rest.len() == 30 && rest.starts_with('-'))
        {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    keel_build::build(lang, &dir, &out)
}

/// Feed every file under `dir` (sorted, skipping build output) into `hasher`, with its path.
/// Unless `whole`, also skip what no build reads: `tests` directories and Markdown.
fn hash_tree(hasher: &mut Sha256, root: &Path, dir: &Path, whole: bool) -> std::io::Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = entry.path();
        let name = entry.file_name();
        let build_output = matches!(name.to_str(), Some("target" | "__pycache__" | "node_modules" | ".git"));
        let unread = !whole && (name == "tests" || path.extension().is_some_and(|e| e == "md"));
        let skipped = build_output || unread;
        if skipped {
            continue;
        }
        if entry.file_type()?.is_dir() {
            hash_tree(hasher, root, &path, whole)?;
        } else {
            let rel = path.strip_prefix(root).unwrap_or(&path);
            hasher.update(rel.to_string_lossy().as_bytes());
            hasher.update([0]);
            hasher.update(std::fs::read(&path)?);
            hasher.update([0]);
        }
    }
    Ok(())
}

/// A Keel home for this test binary at `target/tmp/NAME`, emptied on first use except for its
/// precompile cache. The cache is keyed by component hash and engine config and tagged under the
/// home's own key (which stays with it), so a re-run of the tests loads a Python component's
/// native code instead of JIT-compiling CPython again; everything else (database, grants,
/// components) starts fresh. One process per test binary uses it at a time, as cargo runs them.
pub fn reusable_home(name: &str) -> PathBuf {
    let home = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    if let Ok(entries) = std::fs::read_dir(&home) {
        for entry in entries.flatten() {
            if entry.file_name() == "cache" {
                continue;
            }
            let path = entry.path();
            let _ = if entry.file_type().is_ok_and(|t| t.is_dir()) {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
        }
    }
    std::fs::create_dir_all(&home).expect("create the test Keel home");
    prune_artifacts(&home.join("cache"), 6);
    home
}

/// Keep only the `keep` newest precompiled artifacts (~36 MB each for CPython) in `cache`: the
/// others belong to components the tests no longer build.
fn prune_artifacts(cache: &Path, keep: usize) {
    let Ok(entries) = std::fs::read_dir(cache) else {
        return;
    };
    let mut artifacts: Vec<_> = entries
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "cwasm"))
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    artifacts.sort();
    let stale = artifacts.len().saturating_sub(keep);
    for (_, path) in artifacts.into_iter().take(stale) {
        let _ = std::fs::remove_file(path);
    }
}
