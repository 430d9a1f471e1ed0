//! Fresh scratch directories (see [`crate::config::ScratchConfig`]): one new, private, empty host
//! directory per call (or per session), mounted at the guest's `/scratch`, measured while the call
//! runs and removed when it ends.
//!
//! The directory is made with `mkdtemp` semantics (a random name created atomically, mode 0700),
//! so no other user can enter it and no one can have prepared it. The guest can create files,
//! directories and symbolic links inside it but cannot replace the directory itself (it is the
//! preopen's root), so walking it without following links, and removing it the same way, stays
//! inside it.

use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

/// Bytes charged for every entry (file, directory, link) besides its contents: a flood of empty
/// files costs inodes and directory blocks, so it counts against the cap too.
const PER_ENTRY_BYTES: u64 = 512;

/// Entries walked at most when measuring: past it the directory counts as over any cap.
const MAX_ENTRIES: usize = 200_000;

/// One scratch directory, removed (with everything in it) when dropped.
#[derive(Debug)]
pub(crate) struct Scratch {
    path: PathBuf,
    /// The directory opened by handle, so the preopen is that very inode.
    fd: OwnedFd,
}

impl Scratch {
    /// Create a fresh private directory under `parent` (the system temporary directory if `None`).
    pub(crate) fn create(parent: Option<&Path>) -> std::io::Result<Self> {
        let parent = parent.map_or_else(std::env::temp_dir, Path::to_path_buf);
        std::fs::create_dir_all(&parent)?;
        for _ in 0..16 {
            let name = format!("keel-scratch-{:016x}", rand::random::<u64>());
            let path = parent.join(name);
            // `mkdir` fails if anything (a link included) already has the name: no one else's
            // directory is ever used.
            match rustix::fs::mkdir(&path, rustix::fs::Mode::RWXU) {
                Ok(()) => {
                    let fd = crate::preopen::open_root(&path)?;
                    return Ok(Self { path, fd });
                }
                Err(rustix::io::Errno::EXIST) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(std::io::Error::other("cannot find a free scratch directory name"))
    }

    /// The open directory (its `/proc/self/fd/N` path is what the guest is given).
    pub(crate) fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    /// The host path.
    #[cfg(test)]
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes the directory holds, as charged against [`crate::Limits::max_scratch_bytes`]: for
    /// each entry its size or its allocated blocks, whichever is larger, plus
    /// [`PER_ENTRY_BYTES`]. Links are not followed. `u64::MAX` when there are too many entries to
    /// count.
    pub(crate) fn usage(&self) -> u64 {
        let mut total = 0u64;
        let mut entries = 0usize;
        let mut stack = vec![self.path.clone()];
        while let Some(dir) = stack.pop() {
            let Ok(listing) = std::fs::read_dir(&dir) else { continue };
            for entry in listing.flatten() {
                entries += 1;
                if entries > MAX_ENTRIES {
                    return u64::MAX;
                }
                // `DirEntry::metadata` does not follow a final symbolic link.
                let Ok(meta) = entry.metadata() else { continue };
                let bytes = meta.len().max(meta.blocks().saturating_mul(512));
                total = total.saturating_add(bytes).saturating_add(PER_ENTRY_BYTES);
                if meta.is_dir() {
                    stack.push(entry.path());
                }
            }
        }
        total
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        // `remove_dir_all` removes links without following them.
        if let Err(e) = std::fs::remove_dir_all(&self.path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot remove a scratch directory");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn private_measured_and_removed() {
        let parent = tempfile::tempdir().unwrap();
        let scratch = Scratch::create(Some(parent.path())).unwrap();
        let path = scratch.path().to_path_buf();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        assert_eq!(scratch.usage(), 0);
        std::fs::create_dir(path.join("d")).unwrap();
        std::fs::write(path.join("d/f"), vec![1u8; 10_000]).unwrap();
        std::os::unix::fs::symlink("/etc", path.join("link")).unwrap();
        let used = scratch.usage();
        assert!((10_000 + 3 * PER_ENTRY_BYTES..100_000).contains(&used), "{used}");
        let other = Scratch::create(Some(parent.path())).unwrap();
        assert_ne!(other.path(), scratch.path());
        drop(scratch);
        assert!(!path.exists());
        assert!(
            std::path::Path::new("/etc/passwd").exists(),
            "the link was not followed"
        );
    }
}
