//! Content-addressed component storage and the precompiled-artifact cache.
//!
//! Loading a precompiled artifact runs native code produced by Cranelift, so wasmtime marks it
//! `unsafe`: Keel only loads artifacts it wrote itself. Every artifact has a seal (a sidecar
//! `.seal` file) holding an HMAC-SHA256 tag under a per-home secret key over the artifact's bytes;
//! a tag mismatch (tampering, truncation, a foreign file) means the artifact is deleted and the
//! component recompiled, never executed.
//!
//! # Starting fast without trusting the file system (issue 11, item 8)
//!
//! Hashing a multi-megabyte artifact (and the component it came from) on every process start
//! was most of `keel call`'s cost. Once an artifact's content tag has been verified, the seal also
//! records a second HMAC over the artifact file's identity as `fstat` reports it on the very
//! descriptor that is then mapped: device, inode, size, owner, mode, mtime and ctime (ns). A later
//! start that finds the same identity maps the file (`Component::deserialize_file` through
//! `/proc/self/fd/N`, so exactly the inode that was checked) without reading it.
//!
//! Why this holds against someone who can write into the `components` and `cache` directories
//! but is not this user (the only attacker a cache can stop: one running as this user can read the
//! key, or simply ptrace `keel`):
//! - They cannot forge either HMAC without the key. A Keel home keeps it in its database
//!   ([`CacheKey`], given in [`SandboxConfig::cache_key`](crate::SandboxConfig::cache_key)), not in
//!   the directory it protects: a key file in `cache/` could simply be replaced by whoever can write
//!   there. Only an embedder without a database falls back to `cache/artifact.key` (0600).
//! - Replacing the artifact (rename, unlink + create, hard link) changes the inode or the ctime;
//!   ctime is set by the kernel on every write, chmod, link or `utimes` and cannot be set back.
//!   An inode number reused for a new file comes with a new ctime.
//! - Writing into the existing file needs write permission on it: the file must be owned by this
//!   user and not group/other-writable, or it is refused before anything else.
//! - Timestamps are coarse (a jiffy): a file modified within the same tick as the check would
//!   keep its ctime. Like git's "racy clean" entries, an identity is only recorded once the file's
//!   ctime and mtime are at least [`SETTLE`] old, so such a change always sees a full check.
//! - Another machine, a restored backup or a copy has another inode or ctime: one full check,
//!   then the identity is recorded again.
//!
//! The mapping is `MAP_PRIVATE`: a write to the file after the check by someone who may write it
//! (this user, root) would be visible to this process; that attacker is out of reach anyway.

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
    write_atomic_keep(path, bytes).map(drop)
}

/// [`write_atomic`], returning the written file (still open): its `fstat` is the identity of
/// exactly what was written, whatever the path names later.
fn write_atomic_keep(path: &Path, bytes: &[u8]) -> std::io::Result<std::fs::File> {
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
        std::fs::rename(&tmp, path)?;
        Ok(file)
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

    /// Store `bytes` and return their sha256: a no-op when they are already stored intact; what is
    /// stored under that name otherwise (modified on disk, or not a regular file) is replaced, so
    /// reinstalling repairs it.
    pub fn put(&self, bytes: &[u8]) -> std::io::Result<String> {
        let sha256 = sha256_hex(bytes);
        let path = self.path(&sha256);
        // `get` reads only a regular file, without blocking, and verifies it.
        if self.get(&sha256).is_err() {
            write_atomic(&path, bytes)?;
        }
        Ok(sha256)
    }

    /// The bytes stored under `sha256`, verified against it.
    pub fn get(&self, sha256: &str) -> std::io::Result<Vec<u8>> {
        let bytes = read_regular(&self.path(sha256))?;
        if sha256_hex(&bytes) != sha256 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("stored component {sha256} does not match its hash (modified on disk); reinstall it"),
            ));
        }
        Ok(bytes)
    }

    /// The size of the stored component `sha256` (its bytes are not read or verified: a cached
    /// artifact's seal binds the length and hash it was compiled from).
    pub fn len(&self, sha256: &str) -> std::io::Result<u64> {
        Ok(std::fs::symlink_metadata(self.path(sha256))?.len())
    }

    /// Take the store's lock (exclusive, across processes; blocking until it is free), held until
    /// the guard is dropped. A registry change that stores a component and then records a plugin
    /// using it holds it across both, as does one that checks a component is unused and then
    /// deletes it: otherwise an install could record a plugin on a component that a removal,
    /// having found it unused a moment before, deletes next.
    pub fn lock(&self) -> std::io::Result<ComponentsLock> {
        std::fs::create_dir_all(&self.dir)?;
        let mut options = std::fs::OpenOptions::new();
        options.read(true).write(true).create(true).truncate(false);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options
                .mode(0o600)
                .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32);
        }
        let file = options.open(self.dir.join(".lock"))?;
        file.lock()?;
        Ok(ComponentsLock { _file: file })
    }

    /// Delete the component `sha256` if stored.
    pub fn remove(&self, sha256: &str) -> std::io::Result<()> {
        match std::fs::remove_file(self.path(sha256)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

/// The [`ComponentStore`]'s lock, released when dropped (its file closed).
#[derive(Debug)]
pub struct ComponentsLock {
    _file: std::fs::File,
}

/// Outcome of [`ArtifactCache::load_or_compile`], for install output and benchmarks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheOutcome {
    /// Loaded a verified artifact.
    Hit,
    /// Compiled (no artifact, or it failed verification / was for another engine).
    Compiled,
}

/// A file's identity as `fstat` reports it: changes whenever the file is replaced or written.
struct Identity {
    dev: u64,
    ino: u64,
    size: u64,
    uid: u32,
    mode: u32,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Identity {
    fn of(file: &std::fs::File) -> std::io::Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let m = file.metadata()?;
        Ok(Self {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            uid: m.uid(),
            mode: m.mode(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        })
    }

    fn bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        for n in [self.dev, self.ino, self.size, u64::from(self.uid), u64::from(self.mode)] {
            out.extend_from_slice(&n.to_le_bytes());
        }
        for (s, ns) in [self.mtime, self.ctime] {
            out.extend_from_slice(&s.to_le_bytes());
            out.extend_from_slice(&ns.to_le_bytes());
        }
        out
    }

    /// A regular file of this user that nobody else may write.
    fn owned(&self) -> bool {
        self.mode & 0o170000 == 0o100000 && self.mode & 0o022 == 0 && self.uid == rustix::process::geteuid().as_raw()
    }

    /// Old enough that a change within the same timestamp tick is no longer possible.
    fn settled(&self) -> bool {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        let newest = self.mtime.0.max(self.ctime.0);
        now - newest >= SETTLE.as_secs() as i64
    }
}

/// How old an artifact's timestamps must be before its identity is recorded (see the module docs).
pub const SETTLE: std::time::Duration = std::time::Duration::from_secs(2);

/// The secret key that seals artifacts. Its `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct CacheKey(pub [u8; 32]);

impl std::fmt::Debug for CacheKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CacheKey(..)")
    }
}

/// Precompiled native artifacts keyed by component sha256 + wasmtime version + engine config.
#[derive(Debug, Clone)]
pub struct ArtifactCache {
    dir: PathBuf,
    key: [u8; 32],
    engine_tag: String,
}

impl ArtifactCache {
    /// Open the cache in `dir` for `engine` with its key in `dir/artifact.key`, creating both if
    /// needed: for embedders without a database only (see the module docs; a Keel home uses
    /// [`open_with_key`](Self::open_with_key)).
    pub fn open(dir: &Path, engine: &Engine) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let key_path = dir.join("artifact.key");
        let key = match read_regular(&key_path) {
            Ok(bytes) if bytes.len() == 32 => bytes.try_into().expect("length checked"),
            _ => {
                let mut key = [0u8; 32];
                rand::rng().fill_bytes(&mut key);
                write_atomic(&key_path, &key)?;
                key
            }
        };
        Self::open_with_key(dir, engine, &CacheKey(key))
    }

    /// Open the cache in `dir` for `engine`, sealing under `key` (kept elsewhere by the caller;
    /// nothing in `dir` is read for it).
    pub fn open_with_key(dir: &Path, engine: &Engine, key: &CacheKey) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let key = key.0;
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

    fn seal_path(&self, sha256: &str) -> PathBuf {
        self.dir.join(format!("{sha256}-{}.seal", self.engine_tag))
    }

    /// An HMAC over `domain`, the engine, the component (sha256 and length) and `parts`, each
    /// length-prefixed. Binding the component means a valid artifact of one plugin renamed over
    /// another's fails verification instead of running with the other plugin's grants.
    fn mac(&self, domain: &str, sha256: &str, wasm_len: u64, parts: &[&[u8]]) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.key).expect("HMAC takes any key length");
        for part in [domain.as_bytes(), self.engine_tag.as_bytes(), sha256.as_bytes()] {
            mac.update(&(part.len() as u64).to_le_bytes());
            mac.update(part);
        }
        mac.update(&wasm_len.to_le_bytes());
        for part in parts {
            mac.update(&(part.len() as u64).to_le_bytes());
            mac.update(part);
        }
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
                let tag = self
                    .mac("artifact-v2", sha256, wasm_len as u64, &[&artifact])
                    .finalize()
                    .into_bytes();
                // The seal first: a reader that sees the new artifact with an old seal only recompiles.
                write_atomic(&self.seal_path(sha256), &tag)?;
                let file = write_atomic_keep(&self.path(sha256), &artifact)?;
                // The identity of exactly the file written (this descriptor), if already settled.
                self.record_identity(sha256, wasm_len as u64, &file, &tag);
                Ok(())
            });
        if let Err(e) = written {
            tracing::warn!(error = %e, "could not write precompiled artifact");
        }
    }

    /// Rewrite the seal with the identity of `file`, whose content tag `tag` was just verified or
    /// written, when its timestamps are settled.
    fn record_identity(&self, sha256: &str, wasm_len: u64, file: &std::fs::File, tag: &[u8]) {
        let Ok(identity) = Identity::of(file) else { return };
        if !identity.settled() || !identity.owned() {
            return;
        }
        let stat = self
            .mac("identity-v1", sha256, wasm_len, &[tag, &identity.bytes()])
            .finalize()
            .into_bytes();
        let mut seal = tag.to_vec();
        seal.extend_from_slice(&stat);
        if let Err(e) = write_atomic(&self.seal_path(sha256), &seal) {
            tracing::debug!(error = %e, "could not record the artifact's identity");
        }
    }

    fn discard(&self, sha256: &str, why: &str) -> Option<Component> {
        tracing::warn!(path = %self.path(sha256).display(), "precompiled artifact {why}; recompiling");
        let _ = std::fs::remove_file(self.path(sha256));
        let _ = std::fs::remove_file(self.seal_path(sha256));
        None
    }

    /// Load a cached artifact of the `wasm_len` bytes whose hash is `sha256`, if present and
    /// verified: by its recorded identity (mapped, not read), else by its content tag (read and
    /// hashed once, then its identity is recorded). See the module docs.
    pub fn load(&self, engine: &Engine, sha256: &str, wasm_len: usize) -> Option<Component> {
        use rustix::fs::Mode;
        let wasm_len = wasm_len as u64;
        let path = self.path(sha256);
        let fd = rustix::fs::open(&path, regular_flags(), Mode::empty()).ok()?;
        let file = std::fs::File::from(fd);
        if !file.metadata().is_ok_and(|meta| meta.is_file()) {
            return self.discard(sha256, "is not a regular file");
        }
        let identity = match Identity::of(&file) {
            Ok(identity) if identity.owned() => identity,
            Ok(_) => return self.discard(sha256, "is not a file only this user may write"),
            Err(_) => return None,
        };
        let seal = match read_regular(&self.seal_path(sha256)) {
            Ok(seal) if seal.len() == TAG_LEN || seal.len() == 2 * TAG_LEN => seal,
            _ => return self.discard(sha256, "has no seal"),
        };
        let (tag, stat) = seal.split_at(TAG_LEN);
        if !stat.is_empty()
            && self
                .mac("identity-v1", sha256, wasm_len, &[tag, &identity.bytes()])
                .verify_slice(stat)
                .is_ok()
        {
            use std::os::fd::AsRawFd;
            // SAFETY: the seal's identity HMAC (under this home's secret key) proves this inode,
            // unchanged since (same ctime), is the artifact `store` wrote and a full check
            // verified for this very component, for an engine with the same version and
            // configuration. `/proc/self/fd/N` re-opens that inode, not whatever the path names
            // now; only this user (who may write the file) could change it while mapped.
            let mapped = unsafe { Component::deserialize_file(engine, format!("/proc/self/fd/{}", file.as_raw_fd())) };
            match mapped {
                Ok(component) => return Some(component),
                // e.g. no /proc: the full check below still works.
                Err(e) => tracing::debug!(error = %e, "mapping the artifact failed; reading it"),
            }
        }
        let mut artifact = Vec::with_capacity(identity.size as usize);
        std::io::Read::read_to_end(&mut &file, &mut artifact).ok()?;
        if self
            .mac("artifact-v2", sha256, wasm_len, &[&artifact])
            .verify_slice(tag)
            .is_err()
        {
            return self.discard(sha256, "failed verification");
        }
        // SAFETY: the bytes were written by `store` in this cache (the HMAC under this home's
        // secret key proves it) for this very component, for an engine with the same version and
        // configuration; they are in our own memory now, so nothing can change them.
        match unsafe { Component::deserialize(engine, &artifact) } {
            Ok(component) => {
                self.record_identity(sha256, wasm_len, &file, tag);
                Some(component)
            }
            Err(e) => {
                tracing::warn!(error = %e, "precompiled artifact did not load");
                self.discard(sha256, "did not load")
            }
        }
    }

    /// Delete everything kept for component `sha256` (its artifacts for any engine, seals and
    /// notes): its plugin was removed, replaced or refused. Best effort: what cannot be deleted
    /// stays, and is verified like anything else if ever read.
    pub fn forget(&self, sha256: &str) {
        if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return;
        }
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(sha256)) else {
                continue;
            };
            if rest.starts_with('-') || rest.starts_with('.') {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }

    /// Keep a small verified note about component `sha256` (e.g. the metadata read from its
    /// custom sections), so a start that maps the artifact need not read the component.
    pub(crate) fn put_note(&self, sha256: &str, kind: &str, note: &[u8]) {
        let mut file = self.mac(kind, sha256, 0, &[note]).finalize().into_bytes().to_vec();
        file.extend_from_slice(note);
        if let Err(e) = write_atomic(&self.dir.join(format!("{sha256}.{kind}")), &file) {
            tracing::debug!(error = %e, "could not write a note");
        }
    }

    /// The note [`ArtifactCache::put_note`] kept, if its tag verifies.
    pub(crate) fn get_note(&self, sha256: &str, kind: &str) -> Option<Vec<u8>> {
        let file = read_regular(&self.dir.join(format!("{sha256}.{kind}"))).ok()?;
        if file.len() < TAG_LEN {
            return None;
        }
        let (tag, note) = file.split_at(TAG_LEN);
        self.mac(kind, sha256, 0, &[note]).verify_slice(tag).ok()?;
        Some(note.to_vec())
    }
}

/// How the cache and the store open what they read: never through a final symbolic link, and
/// without waiting (a FIFO put in a file's place would block an ordinary open until a writer
/// comes; regular files ignore `O_NONBLOCK`).
fn regular_flags() -> rustix::fs::OFlags {
    use rustix::fs::OFlags;
    OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC
}

/// The bytes of the regular file at `path`; anything else (a FIFO, a device, a link) is an error.
fn read_regular(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut file = std::fs::File::from(rustix::fs::open(path, regular_flags(), rustix::fs::Mode::empty())?);
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{} is not a regular file", path.display()),
        ));
    }
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut file, &mut bytes)?;
    Ok(bytes)
}

/// The wasmtime version this host was built with (part of the cache key).
pub fn wasmtime_version() -> &'static str {
    "48.0.8"
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fifo(path: &Path) {
        let _ = std::fs::remove_file(path);
        rustix::fs::mknodat(
            rustix::fs::CWD,
            path,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::RUSR | rustix::fs::Mode::WUSR,
            0,
        )
        .unwrap();
    }

    /// A FIFO in place of an artifact, its seal or a stored component is refused at once (reading
    /// one would wait for a writer that never comes, and hang every call of the plugin).
    #[test]
    fn a_fifo_in_the_cache_or_the_store_is_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let (done, finished) = std::sync::mpsc::channel();
        let root = dir.path().to_path_buf();
        std::thread::spawn(move || {
            let engine = Engine::default();
            let cache = ArtifactCache::open(&root.join("cache"), &engine).unwrap();
            let sha = "ab".repeat(32);
            fifo(&cache.path(&sha));
            let loaded = cache.load(&engine, &sha, 8).is_some();
            std::fs::write(cache.path(&sha), b"not an artifact").unwrap();
            fifo(&cache.seal_path(&sha));
            let sealed = cache.load(&engine, &sha, 8).is_some();
            let store = ComponentStore::new(root.join("components"));
            std::fs::create_dir_all(root.join("components")).unwrap();
            fifo(&store.path(&sha));
            let read = store.get(&sha).is_ok();
            let _ = done.send((loaded, sealed, read));
        });
        let got = finished
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("blocked on a FIFO");
        assert_eq!(got, (false, false, false));
    }

    /// Reinstalling repairs a stored component that was modified on disk (or replaced by something
    /// that is not a file): the error of a call says "reinstall it", so a reinstall must rewrite it.
    #[test]
    fn putting_the_same_bytes_again_repairs_what_is_stored() {
        let dir = tempfile::tempdir().unwrap();
        let store = ComponentStore::new(dir.path().join("components"));
        let bytes = b"\0asm component bytes".to_vec();
        let sha = store.put(&bytes).unwrap();
        std::fs::write(store.path(&sha), b"tampered").unwrap();
        assert!(store.get(&sha).is_err());
        assert_eq!(store.put(&bytes).unwrap(), sha);
        assert_eq!(store.get(&sha).unwrap(), bytes, "a reinstall did not repair it");
        // A FIFO in its place is replaced without being opened (opening one would block).
        fifo(&store.path(&sha));
        assert_eq!(store.put(&bytes).unwrap(), sha);
        assert_eq!(store.get(&sha).unwrap(), bytes);
    }
}
