//! Building guest projects from source with keel-build, cached by content across test runs.
#![allow(dead_code)] // each test binary uses a different subset

use std::path::{Path, PathBuf};

use keel_build::Lang;
use sha2::{Digest, Sha256};

/// The repository root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn hash_tree(hasher: &mut Sha256, dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();
    for path in paths {
        let name = path.file_name().unwrap_or_default().to_string_lossy().into_owned();
        if name == "node_modules" || name.starts_with('.') {
            continue;
        }
        if path.is_dir() {
            hash_tree(hasher, &path);
        } else if let Ok(bytes) = std::fs::read(&path) {
            hasher.update(name.as_bytes());
            hasher.update((bytes.len() as u64).to_le_bytes());
            hasher.update(&bytes);
        }
    }
}

/// Build `project` (relative to the repository root) as `lang` and return the component's path.
/// The result is kept in the cargo target dir, keyed by the sha256 of the project, the language's
/// SDK and the WIT, so each component is built once, not once per test or per run.
pub fn build(lang: Lang, project: &str) -> PathBuf {
    let root = root();
    let sdk = match lang {
        Lang::Js => "sdk/js",
        Lang::C => "sdk/c",
        Lang::Rust => "sdk/rust",
        Lang::Python => "sdk/python",
    };
    let mut hasher = Sha256::new();
    for dir in [project, sdk, "wit", "host/build/src"] {
        hasher.update(dir.as_bytes());
        hash_tree(&mut hasher, &root.join(dir));
    }
    let key = hex::encode(&hasher.finalize()[..12]);
    let cache = Path::new(env!("CARGO_TARGET_TMPDIR")).join("keel-build-cache");
    std::fs::create_dir_all(&cache).unwrap();
    let name = project.replace('/', "-");
    let out = cache.join(format!("{name}-{key}.wasm"));
    if !out.is_file() {
        let partial = cache.join(format!("{name}-{key}.{}.partial", std::process::id()));
        let started = std::time::Instant::now();
        if let Err(e) = keel_build::build(lang, &root.join(project), &partial) {
            panic!("building {project} failed: {e}");
        }
        eprintln!(
            "built {project} ({lang:?}) in {:.1} s: {} bytes",
            started.elapsed().as_secs_f64(),
            std::fs::metadata(&partial).unwrap().len()
        );
        std::fs::rename(&partial, &out).unwrap();
    }
    out
}
