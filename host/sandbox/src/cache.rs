//! Content-addressed component storage and the precompiled-artifact cache.
//!
//! Loading a precompiled artifact runs native code produced by Cranelift, so wasmtime marks it
//! `unsafe`: Keel only loads artifacts it wrote itself. Every artifact is stored with an HMAC-SHA256
//! tag under a per-home secret key; a tag mismatch (tampering, truncation, a foreign file) means the
//! artifact is deleted and the component recompiled, never executed.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::io::Write;
use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

type HmacSha256 = Hmac<Sha256>;
const TAG_LEN: usize = 32;

/// Hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Write `bytes` to `path` atomically (temp file + rename) with owner-only permissions.
fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().expect("cache paths have a parent");
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".tmp-{}-{:x}", std::process::id(), rand::random::<u64>()));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let result = (|| {
        let mut file = options.open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Component bytes stored by sha256 under `$KEEL_HOME/components`.
#[derive(Debug, Clone)]
pub struct ComponentStore {
    dir: PathBuf,
}

impl ComponentStore {
    /// A store rooted at `dir` (created on first write).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    fn path(&self, sha256: &str) -> PathBuf {
        self.dir.join(format!("{sha256}.wasm"))
    }

    /// Store `bytes` (a no-op when already present) and return their sha256.
    pub fn put(&self, bytes: &[u8]) -> std::io::Result<String> {
        let sha256 = sha256_hex(bytes);
        let path = self.path(&sha256);
        if !path.exists() {
            write_atomic(&path, bytes)?;
        }
        Ok(sha256)
    }

    /// The bytes stored under `sha256`, verified against it.
    pub fn get(&self, sha256: &str) -> std::io::Result<Vec<u8>> {
        let bytes = std::fs::read(self.path(sha256))?;
        if sha256_hex(&bytes) != sha256 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("stored component {sha256} does not match its hash (modified on disk); reinstall it"),
            ));
        }
        Ok(bytes)
    }

    /// Delete the component `sha256` if stored.
    pub fn remove(&self, sha256: &str) -> std::io::Result<()> {
        match std::fs::remove_file(self.path(sha256)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

/// Outcome of [`ArtifactCache::load_or_compile`], for install output and benchmarks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheOutcome {
    /// Loaded a verified artifact.
    Hit,
    /// Compiled (no artifact, or it failed verification / was for another engine).
    Compiled,
}

/// Precompiled native artifacts keyed by component sha256 + wasmtime version + engine config.
#[derive(Debug, Clone)]
pub struct ArtifactCache {
    dir: PathBuf,
    key: [u8; 32],
    engine_tag: String,
}

impl ArtifactCache {
    /// Open the cache in `dir` for `engine`, creating the directory and its secret key if needed.
    pub fn open(dir: &Path, engine: &Engine) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let key_path = dir.join("artifact.key");
        let key = match std::fs::read(&key_path) {
            Ok(bytes) if bytes.len() == 32 => bytes.try_into().expect("length checked"),
            _ => {
                let mut key = [0u8; 32];
                rand::rng().fill_bytes(&mut key);
                write_atomic(&key_path, &key)?;
                key
            }
        };
        let mut hasher = DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        let engine_tag = format!("wasmtime{}-{:016x}", wasmtime_version(), hasher.finish());
        Ok(Self {
            dir: dir.to_path_buf(),
            key,
            engine_tag,
        })
    }

    fn path(&self, sha256: &str) -> PathBuf {
        self.dir.join(format!("{sha256}-{}.cwasm", self.engine_tag))
    }

    /// The artifact's tag binds the engine, the component it was compiled from (sha256 and
    /// length) and the artifact bytes: a valid artifact of one plugin renamed over another's
    /// fails verification instead of running with the other plugin's grants.
    fn tag(&self, sha256: &str, wasm_len: usize, artifact: &[u8]) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.key).expect("HMAC takes any key length");
        for part in [self.engine_tag.as_bytes(), sha256.as_bytes()] {
            mac.update(&(part.len() as u64).to_le_bytes());
            mac.update(part);
        }
        mac.update(&(wasm_len as u64).to_le_bytes());
        mac.update(artifact);
        mac
    }

    /// Load the verified artifact for `sha256`, or compile `wasm` and cache the result.
    /// `wasm` must be the bytes whose hash is `sha256`. Callers that must check a component before
    /// caching it use [`ArtifactCache::load`], `Component::new` and [`ArtifactCache::store`].
    pub fn load_or_compile(
        &self,
        engine: &Engine,
        sha256: &str,
        wasm: &[u8],
    ) -> wasmtime::Result<(Component, CacheOutcome)> {
        if let Some(component) = self.load(engine, sha256, wasm.len()) {
            return Ok((component, CacheOutcome::Hit));
        }
        let component = Component::new(engine, wasm)?;
        self.store(sha256, wasm.len(), &component);
        Ok((component, CacheOutcome::Compiled))
    }

    /// Cache the compiled `component` of the `wasm_len` bytes whose hash is `sha256`. A cache that
    /// cannot be written only costs time, so failures are logged, not returned.
    pub fn store(&self, sha256: &str, wasm_len: usize, component: &Component) {
        let written = component
            .serialize()
            .map_err(|e| std::io::Error::other(format!("{e:#}")))
            .and_then(|artifact| {
                let mut file = self.tag(sha256, wasm_len, &artifact).finalize().into_bytes().to_vec();
                file.extend_from_slice(&artifact);
                write_atomic(&self.path(sha256), &file)
            });
        if let Err(e) = written {
            tracing::warn!(error = %e, "could not write precompiled artifact");
        }
    }

    /// Load a cached artifact of the `wasm_len` bytes whose hash is `sha256`, if present and its
    /// tag verifies.
    pub fn load(&self, engine: &Engine, sha256: &str, wasm_len: usize) -> Option<Component> {
        let path = self.path(sha256);
        let file = std::fs::read(&path).ok()?;
        if file.len() <= TAG_LEN
            || self
                .tag(sha256, wasm_len, &file[TAG_LEN..])
                .verify_slice(&file[..TAG_LEN])
                .is_err()
        {
            tracing::warn!(path = %path.display(), "precompiled artifact failed verification; recompiling");
            let _ = std::fs::remove_file(&path);
            return None;
        }
        // SAFETY: the bytes were written by `store` in this cache (the HMAC under this home's
        // secret key proves it) for this very component, for an engine with the same version and
        // configuration.
        match unsafe { Component::deserialize(engine, &file[TAG_LEN..]) } {
            Ok(component) => Some(component),
            Err(e) => {
                tracing::warn!(error = %e, "precompiled artifact did not load; recompiling");
                let _ = std::fs::remove_file(&path);
                None
            }
        }
    }
}

/// The wasmtime version this host was built with (part of the cache key).
pub fn wasmtime_version() -> &'static str {
    "48.0.8"
}
