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
use std::path::{Path, PathBuf};

/// Bytes charged for every entry (file, directory, link) besides its contents: a flood of empty
/// files costs inodes and directory blocks, so it counts against the cap too.
const PER_ENTRY_BYTES: u64 = 512;

/// Entries walked at most when measuring: past it the directory counts as over any cap.
const MAX_ENTRIES: usize = 200_000;

/// Directory levels walked at most when measuring (the walk holds one descriptor per level):
/// a deeper tree counts as over any cap.
const MAX_DEPTH: usize = 128;

/// What a measurable scratch tree is, for error messages.
pub(crate) const MEASURABLE: &str = "at most 200000 entries and 128 levels";

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
    /// [`PER_ENTRY_BYTES`]. Links are not followed. `u64::MAX` (over any cap) when the tree
    /// cannot be measured in full: too many entries, too deep, or a directory that cannot be read.
    pub(crate) fn usage(&self) -> u64 {
        measure(&self.fd).unwrap_or(u64::MAX)
    }
}

/// The bytes under `root`, walked by handle (`openat`/`fstatat` relative to each directory), so a
/// tree whose host paths are longer than `PATH_MAX` is measured like any other; `None` when any
/// of it cannot be. An entry removed while the walk runs is skipped (the guest may delete as it
/// goes).
fn measure(root: &OwnedFd) -> Option<u64> {
    use rustix::fs::{AtFlags, Dir, FileType, Mode, OFlags, openat, statat};
    use rustix::io::Errno;
    let mut total = 0u64;
    let mut entries = 0usize;
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    // Opened afresh for reading (`root` may be an `O_PATH` handle).
    let mut stack = vec![Dir::new(openat(root, c".", flags, Mode::empty()).ok()?).ok()?];
    loop {
        let depth = stack.len();
        let Some(dir) = stack.last_mut() else { break };
        let Some(entry) = dir.next() else {
            stack.pop();
            continue;
        };
        let entry = entry.ok()?;
        let name = entry.file_name();
        if name == c"." || name == c".." {
            continue;
        }
        entries += 1;
        if entries > MAX_ENTRIES {
            return None;
        }
        let at = dir.fd().ok()?;
        let stat = match statat(at, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(stat) => stat,
            Err(Errno::NOENT) => continue,
            Err(_) => return None,
        };
        let size = u64::try_from(stat.st_size).unwrap_or(0);
        let blocks = u64::try_from(stat.st_blocks).unwrap_or(0);
        total = total
            .saturating_add(size.max(blocks.saturating_mul(512)))
            .saturating_add(PER_ENTRY_BYTES);
        if FileType::from_raw_mode(stat.st_mode) != FileType::Directory {
            continue;
        }
        if depth >= MAX_DEPTH {
            return None;
        }
        let sub = match openat(at, name, flags, Mode::empty()) {
            Ok(sub) => sub,
            Err(Errno::NOENT) => continue,
            Err(_) => return None,
        };
        stack.push(Dir::new(sub).ok()?);
    }
    Some(total)
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
    use std::io::Write as _;
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

    /// Directories `depth` levels deep (each name 250 bytes) under the scratch, made by handle as
    /// a guest does (`mkdirat`/`openat`): the host path of the last is far past `PATH_MAX` at
    /// depth 20. Returns the deepest directory, open.
    fn nest(scratch: &Scratch, depth: usize) -> OwnedFd {
        use rustix::fs::{Mode, OFlags, mkdirat, openat};
        let name = "d".repeat(250);
        let mut dir = rustix::io::dup(scratch.fd()).unwrap();
        for _ in 0..depth {
            mkdirat(&dir, name.as_str(), Mode::RWXU).unwrap();
            dir = openat(&dir, name.as_str(), OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty()).unwrap();
        }
        dir
    }

    #[test]
    fn bytes_below_a_path_longer_than_path_max_are_counted() {
        let parent = tempfile::tempdir().unwrap();
        let scratch = Scratch::create(Some(parent.path())).unwrap();
        let deep = nest(&scratch, 20);
        let file = rustix::fs::openat(
            &deep,
            "f",
            rustix::fs::OFlags::WRONLY | rustix::fs::OFlags::CREATE,
            rustix::fs::Mode::RUSR | rustix::fs::Mode::WUSR,
        )
        .unwrap();
        std::fs::File::from(file).write_all(&vec![7u8; 1 << 20]).unwrap();
        let used = scratch.usage();
        assert!(used >= 1 << 20, "1 MiB below a long path counted as {used} bytes");
        drop(scratch);
        assert_eq!(
            std::fs::read_dir(parent.path()).unwrap().count(),
            0,
            "removed, deep tree and all"
        );
    }

    #[test]
    fn the_measurable_tree_is_described_as_counted() {
        assert_eq!(
            MEASURABLE,
            format!("at most {MAX_ENTRIES} entries and {MAX_DEPTH} levels")
        );
    }

    #[test]
    fn a_tree_too_deep_to_measure_is_over_any_cap() {
        let parent = tempfile::tempdir().unwrap();
        let scratch = Scratch::create(Some(parent.path())).unwrap();
        drop(nest(&scratch, MAX_DEPTH + 1));
        assert_eq!(scratch.usage(), u64::MAX);
    }
}
