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
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use rustix::fs::{FlockOperation, Mode, OFlags};

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

/// The prefix of every scratch directory's name, followed by the creating process's id and a
/// random part: `keel-scratch-<pid>-<16 hex digits>`.
const PREFIX: &str = "keel-scratch-";

/// Scratch directories this process has made and not yet removed.
static LIVE: Mutex<usize> = Mutex::new(0);
/// Signalled whenever [`LIVE`] falls.
static REMOVED: Condvar = Condvar::new();

/// Wait (blocking the thread) until every scratch directory this process made has been removed,
/// for at most `within`; `false` if some remain. A one-call process (`keel call`, `keel exec`)
/// calls it before it exits: a big scratch directory is removed on a blocking thread after the
/// call, and exiting first would leave it behind (the next Keel process with scratch
/// directories in the same place sweeps such leftovers).
pub fn wait_for_scratch_removal(within: Duration) -> bool {
    let deadline = Instant::now() + within;
    let mut live = LIVE.lock().unwrap_or_else(|e| e.into_inner());
    while *live > 0 {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        live = REMOVED.wait_timeout(live, left).unwrap_or_else(|e| e.into_inner()).0;
    }
    true
}

/// A shared lock on `dir` (a scratch directory), held while the returned descriptor is open:
/// it tells [`sweep_orphans`] of any process that the directory is in use.
fn lock(dir: &OwnedFd) -> std::io::Result<OwnedFd> {
    let held = rustix::fs::openat(dir, c".", DIRECTORY, Mode::empty())?;
    rustix::fs::flock(&held, FlockOperation::LockShared)?;
    Ok(held)
}

/// Remove the scratch directories under `parent` left by processes that no longer run (one killed,
/// or one that exited before its removal finished): the directories of this user named
/// `keel-scratch-<pid>-<hex>` whose process is gone. Returns how many it removed.
pub(crate) fn sweep_orphans(parent: &Path) -> usize {
    let Ok(listing) = std::fs::read_dir(parent) else {
        return 0;
    };
    let me = rustix::process::geteuid().as_raw();
    let mut removed = 0;
    for entry in listing.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(orphan_pid) else {
            continue;
        };
        let alive = rustix::process::Pid::from_raw(pid)
            .is_none_or(|pid| rustix::process::test_kill_process(pid) != Err(rustix::io::Errno::SRCH));
        // Not followed if a link; only this user's own directories.
        let ours = std::fs::symlink_metadata(entry.path())
            .is_ok_and(|meta| meta.is_dir() && std::os::unix::fs::MetadataExt::uid(&meta) == me);
        if alive || !ours {
            continue;
        }
        // A process in another PID namespace sharing this directory looks gone from here: its
        // live scratch directory holds a shared lock (see `Scratch::lock`), so only a directory
        // this sweep can lock exclusively is left over. The lock is held while it is removed.
        let Ok(dir) = rustix::fs::openat(rustix::fs::CWD, entry.path().as_path(), DIRECTORY, Mode::empty()) else {
            continue;
        };
        if rustix::fs::flock(&dir, FlockOperation::NonBlockingLockExclusive).is_ok()
            && std::fs::remove_dir_all(entry.path()).is_ok()
        {
            removed += 1;
        }
    }
    removed
}

/// The process id in a scratch directory's name (`keel-scratch-<pid>-<16 hex digits>`).
fn orphan_pid(name: &str) -> Option<i32> {
    let (pid, random) = name.strip_prefix(PREFIX)?.split_once('-')?;
    let hex = random.len() == 16 && random.bytes().all(|b| b.is_ascii_hexdigit());
    hex.then(|| pid.parse().ok()).flatten().filter(|pid| *pid > 0)
}

/// One scratch directory, removed (with everything in it) when dropped.
#[derive(Debug)]
pub(crate) struct Scratch {
    /// Where it is removed from: its host path, or its name under the open parent's
    /// `/proc/self/fd/N` path.
    path: PathBuf,
    /// The directory opened by handle, so the preopen is that very inode.
    fd: OwnedFd,
    /// The granted directory it was made in, held open while it exists (see [`Scratch::create_in`]).
    _parent: Option<OwnedFd>,
    /// Its real path, as `/proc/self/fd` links name the files in it (`None` if unknown: then it
    /// counts as over any cap).
    real: Option<PathBuf>,
    /// A shared lock on it, held while it exists: no sweep of any process removes it.
    _lock: OwnedFd,
}

/// How a scratch directory (or one inside it) is opened: for reading, never through a link.
const DIRECTORY: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);

/// Make a fresh directory in the open directory `parent`, with a random name nobody else can
/// have prepared (`mkdirat` fails if anything, a link included, already has it): its name, an
/// open handle on it, and a shared lock on it ([`lock`]).
fn make_in(parent: &OwnedFd) -> std::io::Result<(String, OwnedFd, OwnedFd)> {
    use rustix::fs::{mkdirat, openat};
    for _ in 0..16 {
        let name = format!("{PREFIX}{}-{:016x}", std::process::id(), rand::random::<u64>());
        match mkdirat(parent, name.as_str(), Mode::RWXU) {
            Ok(()) => {
                let opened = openat(parent, name.as_str(), DIRECTORY, Mode::empty())
                    .map_err(std::io::Error::from)
                    .and_then(|fd| Ok((lock(&fd)?, fd)));
                return match opened {
                    Ok((held, fd)) => Ok((name, fd, held)),
                    Err(e) => {
                        let _ = rustix::fs::unlinkat(parent, name.as_str(), rustix::fs::AtFlags::REMOVEDIR);
                        Err(e)
                    }
                };
            }
            Err(rustix::io::Errno::EXIST) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(std::io::Error::other("cannot find a free scratch directory name"))
}

/// The real path of the open directory `fd`.
fn real_path(fd: &OwnedFd) -> Option<PathBuf> {
    std::fs::read_link(crate::preopen::fd_path(fd)).ok()
}

impl Scratch {
    /// Create a fresh private directory under `parent` (the system temporary directory if `None`).
    pub(crate) fn create(parent: Option<&Path>) -> std::io::Result<Self> {
        let parent = parent.map_or_else(std::env::temp_dir, Path::to_path_buf);
        std::fs::create_dir_all(&parent)?;
        let (name, fd, held) = make_in(&crate::preopen::open_root(&parent)?)?;
        Ok(Self::new(parent.join(name), fd, held, None))
    }

    /// Create a fresh private directory inside `parent`, an open directory granted at the guest's
    /// `/scratch` (made and removed relative to that handle, so it stays inside that very
    /// directory). Leftovers of processes that are gone are swept from `parent` first.
    pub(crate) fn create_in(parent: OwnedFd) -> std::io::Result<Self> {
        let parent_path = PathBuf::from(crate::preopen::fd_path(&parent));
        sweep_orphans(&parent_path);
        let (name, fd, held) = make_in(&parent)?;
        Ok(Self::new(parent_path.join(name), fd, held, Some(parent)))
    }

    /// The scratch directory `fd` (removed from `path`), locked by `held`, counted as live.
    fn new(path: PathBuf, fd: OwnedFd, held: OwnedFd, parent: Option<OwnedFd>) -> Self {
        *LIVE.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        Self {
            path,
            real: real_path(&fd),
            fd,
            _parent: parent,
            _lock: held,
        }
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
        usage_of(&self.fd, self.real.as_deref())
    }

    /// Resolve once the directory holds more than `cap` bytes (see [`usage`](Self::usage)),
    /// measured every `every`. Each walk runs on the blocking pool: a tree of many entries takes
    /// milliseconds to walk, and the thread polling this future runs the host's other calls
    /// meanwhile (`keel mcp` has one such thread).
    pub(crate) async fn over_cap(&self, cap: u64, every: Duration) {
        self.over_cap_with(cap, every, Meter::usage).await;
    }

    async fn over_cap_with(&self, cap: u64, every: Duration, measure: fn(&Meter) -> u64) {
        let meter = match self.fd.try_clone() {
            Ok(fd) => std::sync::Arc::new(Meter {
                fd,
                real: self.real.clone(),
            }),
            // No descriptor to spare for the walks: measured here.
            Err(_) => loop {
                tokio::time::sleep(every).await;
                if self.usage() > cap {
                    return;
                }
            },
        };
        loop {
            tokio::time::sleep(every).await;
            let meter = meter.clone();
            match tokio::task::spawn_blocking(move || measure(&meter)).await {
                Ok(used) if used <= cap => {}
                // Over the cap, or the walk did not finish (as unmeasurable: over any cap).
                _ => return,
            }
        }
    }
}

/// What a walk of a scratch directory needs, owned (its descriptor duplicated), so that it can
/// run on another thread while the call goes on.
struct Meter {
    fd: OwnedFd,
    real: Option<PathBuf>,
}

impl Meter {
    fn usage(&self) -> u64 {
        usage_of(&self.fd, self.real.as_deref())
    }
}

/// See [`Scratch::usage`]: the directory open as `fd`, whose real path is `real`.
fn usage_of(fd: &OwnedFd, real: Option<&Path>) -> u64 {
    let named = measure(fd);
    let unlinked = real.and_then(unlinked_open_bytes);
    match (named, unlinked) {
        (Some(named), Some(unlinked)) => named.saturating_add(unlinked),
        _ => u64::MAX,
    }
}

/// The bytes of files under `dir` (a scratch directory's real path) that are unlinked but still
/// open in this process: a guest can delete a file and go on writing through its descriptor,
/// and the blocks stay allocated while no walk of the tree can see them. Found through
/// `/proc/self/fd` (each descriptor's link names its file, with ` (deleted)` once unlinked);
/// `None` if that cannot be read.
fn unlinked_open_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt as _;
    use std::os::unix::fs::MetadataExt as _;
    let mut prefix = dir.as_os_str().as_bytes().to_vec();
    prefix.push(b'/');
    let mut total = 0u64;
    for entry in std::fs::read_dir("/proc/self/fd").ok()?.flatten() {
        // Descriptors close while this runs: one that is gone is skipped.
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        let target = target.as_os_str().as_bytes();
        if !(target.starts_with(&prefix) && target.ends_with(b" (deleted)")) {
            continue;
        }
        // `stat` of the descriptor's link is the open file itself.
        let Ok(meta) = std::fs::metadata(entry.path()) else {
            continue;
        };
        if meta.is_file() && meta.nlink() == 0 {
            total = total.saturating_add(meta.len().max(meta.blocks().saturating_mul(512)));
        }
    }
    Some(total)
}

/// The bytes under `root`, walked by handle (`openat`/`fstatat` relative to each directory), so a
/// tree whose host paths are longer than `PATH_MAX` is measured like any other; `None` when any
/// of it cannot be. An entry removed while the walk runs is skipped (the guest may delete as it
/// goes).
fn measure(root: &OwnedFd) -> Option<u64> {
    use rustix::fs::{AtFlags, Dir, FileType, openat, statat};
    use rustix::io::Errno;
    let mut total = 0u64;
    let mut entries = 0usize;
    // Opened afresh for reading (`root` may be an `O_PATH` handle).
    let mut stack = vec![Dir::new(openat(root, c".", DIRECTORY, Mode::empty()).ok()?).ok()?];
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
        let sub = match openat(at, name, DIRECTORY, Mode::empty()) {
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
        let mut live = LIVE.lock().unwrap_or_else(|e| e.into_inner());
        *live = live.saturating_sub(1);
        REMOVED.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;
    use std::os::unix::fs::PermissionsExt as _;

    /// The threads the recording meter walked on.
    static WALKED_ON: Mutex<Vec<std::thread::ThreadId>> = Mutex::new(Vec::new());

    fn recording_usage(meter: &Meter) -> u64 {
        WALKED_ON.lock().unwrap().push(std::thread::current().id());
        meter.usage()
    }

    /// The cap is watched by walks on other threads than the one awaiting the watch (on a
    /// single-threaded runtime, a walk there stalls every other task), and a directory over its
    /// cap is noticed.
    #[tokio::test(flavor = "current_thread")]
    async fn the_cap_is_watched_off_the_awaiting_thread() {
        let parent = tempfile::tempdir().unwrap();
        let scratch = Scratch::create(Some(parent.path())).unwrap();
        std::fs::File::create(scratch.path().join("f"))
            .unwrap()
            .write_all(&vec![7u8; 64 << 10])
            .unwrap();
        let watched = scratch.over_cap_with(32 << 10, Duration::from_millis(1), recording_usage);
        tokio::time::timeout(Duration::from_secs(10), watched)
            .await
            .expect("a directory over its cap is noticed");
        let here = std::thread::current().id();
        let walked = WALKED_ON.lock().unwrap().clone();
        assert!(!walked.is_empty(), "measured");
        assert!(walked.iter().all(|t| *t != here), "measured on the awaiting thread");
    }

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
        use rustix::fs::{mkdirat, openat};
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
    fn leftovers_of_processes_that_are_gone_are_swept_and_nothing_else() {
        let parent = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let gone = child.id();
        child.wait().unwrap();
        let dir = |name: String| {
            let path = parent.path().join(name);
            std::fs::create_dir_all(path.join("sub")).unwrap();
            std::fs::write(path.join("sub/f"), b"left").unwrap();
            path
        };
        let orphan = dir(format!("{PREFIX}{gone}-0123456789abcdef"));
        let mine = Scratch::create(Some(parent.path())).unwrap();
        let kept = [
            dir(format!("{PREFIX}{}-0123456789abcdef", std::process::id())),
            dir(format!("{PREFIX}{gone}-not-hex")),
            dir(format!("{PREFIX}0123456789abcdef")),
            dir("unrelated".into()),
        ];
        std::os::unix::fs::symlink(&kept[3], parent.path().join(format!("{PREFIX}{gone}-fedcba9876543210"))).unwrap();

        assert_eq!(sweep_orphans(parent.path()), 1);
        assert!(!orphan.exists(), "the leftover of a process that is gone is removed");
        assert!(mine.path().exists(), "a live scratch directory is kept");
        for path in &kept {
            assert!(path.join("sub/f").exists(), "{} is kept", path.display());
        }
    }

    /// A process in another PID namespace sharing the temporary directory looks gone from here:
    /// the lock its live scratch directory holds keeps the sweep away.
    #[test]
    fn a_locked_directory_is_never_swept() {
        let parent = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let gone = child.id();
        child.wait().unwrap();
        let live = parent.path().join(format!("{PREFIX}{gone}-0123456789abcdef"));
        std::fs::create_dir(&live).unwrap();
        let held = std::fs::File::open(&live).unwrap();
        rustix::fs::flock(&held, rustix::fs::FlockOperation::LockShared).unwrap();
        assert_eq!(sweep_orphans(parent.path()), 0);
        assert!(live.exists(), "a locked directory was swept");
        drop(held);
        assert_eq!(sweep_orphans(parent.path()), 1);
        assert!(!live.exists());
    }

    #[test]
    fn a_process_can_wait_for_its_scratch_directories_to_be_removed() {
        let parent = tempfile::tempdir().unwrap();
        let scratch = Scratch::create(Some(parent.path())).unwrap();
        let path = scratch.path().to_path_buf();
        let started = Instant::now();
        let freeing = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            drop(scratch);
        });
        assert!(wait_for_scratch_removal(Duration::from_secs(20)));
        assert!(
            started.elapsed() >= Duration::from_millis(250),
            "returned before the removal"
        );
        assert!(!path.exists());
        freeing.join().unwrap();
    }

    #[test]
    fn the_measurable_tree_is_described_as_counted() {
        assert_eq!(
            MEASURABLE,
            format!("at most {MAX_ENTRIES} entries and {MAX_DEPTH} levels")
        );
    }

    #[test]
    fn a_file_unlinked_while_open_still_counts() {
        let parent = tempfile::tempdir().unwrap();
        let scratch = Scratch::create(Some(parent.path())).unwrap();
        let mut file = std::fs::File::create(scratch.path().join("big")).unwrap();
        std::fs::remove_file(scratch.path().join("big")).unwrap();
        file.write_all(&vec![7u8; 1 << 20]).unwrap();
        let used = scratch.usage();
        assert!(
            used >= 1 << 20,
            "1 MiB in an unlinked, open file counted as {used} bytes"
        );
        drop(file);
        assert!(scratch.usage() < 1 << 20, "closed, it is gone");
    }

    #[test]
    fn a_tree_too_deep_to_measure_is_over_any_cap() {
        let parent = tempfile::tempdir().unwrap();
        let scratch = Scratch::create(Some(parent.path())).unwrap();
        drop(nest(&scratch, MAX_DEPTH + 1));
        assert_eq!(scratch.usage(), u64::MAX);
    }
}
