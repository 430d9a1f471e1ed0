//! A SQLite VFS that writes a commit's WAL frames with two system calls instead of two per page.
//!
//! SQLite appends every WAL frame as two `pwrite`s (its 24-byte header, then the page), and a
//! governed call's commits write ~13 frames each: ~50 system calls per call, each touching one or
//! two page-cache pages, were a quarter of the call's CPU. This VFS is the default (unix) one
//! except for WAL files, whose contiguous writes it gathers and hands to the real file at once.
//!
//! When the gathered bytes reach the file is what keeps SQLite's guarantees intact:
//! - **at the end of each commit**: a commit frame is the one whose header carries the database
//!   size (non-zero); when that header is written, everything gathered goes out with it, and its
//!   page goes out when written, each inside that `xWrite`, so an error is the commit's error
//!   (SQLite may rewrite that header alone later in the commit: it goes out at once too). SQLite publishes a commit to other connections (the wal-index
//!   header) only after that write returned, and `synchronous = FULL` syncs after it, so a commit
//!   is in the OS (NORMAL) or on disk (FULL) exactly when it was before;
//! - **before anything else touches the file**: a read (this connection reading back frames it
//!   spilled mid-transaction), a write that is not contiguous (SQLite rewriting an earlier frame),
//!   a sync, truncate, size query, file control or close;
//! - past [`MAX_GATHERED`] bytes (a large transaction's spilled frames).
//!
//! Frames gathered but not yet written belong to a transaction that is not committed: losing them
//! in a crash is losing an uncommitted transaction, which the WAL's checksums already handle.

use std::ffi::{CStr, c_char, c_int, c_void};
use std::sync::OnceLock;

use rusqlite::ffi;

/// The name connections open the VFS by.
pub(crate) const NAME: &CStr = c"keel-wal";

/// Gathered bytes past which a WAL file writes them out even without a commit.
const MAX_GATHERED: usize = 1 << 20;

/// The most one real write is given: the unix VFS writes at most 128 KiB per call (and reports a
/// short write as a full disk).
const MAX_WRITE: usize = 64 << 10;

/// The size of a WAL frame header; bytes 4..8 are the database size after a commit, else zero.
const FRAME_HEADER: usize = 24;

/// Register the VFS (once per process) over the default one; its name, or why it could not be.
pub(crate) fn register() -> Result<&'static CStr, String> {
    static REGISTERED: OnceLock<Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            // SAFETY: `sqlite3_vfs_find(NULL)` returns the default VFS, which lives for the
            // process; the registered struct is leaked, as SQLite keeps a pointer to it.
            unsafe {
                let real = ffi::sqlite3_vfs_find(std::ptr::null());
                if real.is_null() {
                    return Err("SQLite has no default VFS".into());
                }
                let vfs = Box::leak(Box::new(ffi::sqlite3_vfs {
                    iVersion: (*real).iVersion.min(2),
                    szOsFile: c_int::try_from(inner_offset()).map_err(|e| e.to_string())? + (*real).szOsFile,
                    mxPathname: (*real).mxPathname,
                    pNext: std::ptr::null_mut(),
                    zName: NAME.as_ptr(),
                    pAppData: real.cast::<c_void>(),
                    xOpen: Some(open),
                    xDelete: Some(delete),
                    xAccess: Some(access),
                    xFullPathname: Some(full_pathname),
                    xDlOpen: Some(dl_open),
                    xDlError: Some(dl_error),
                    xDlSym: Some(dl_sym),
                    xDlClose: Some(dl_close),
                    xRandomness: Some(randomness),
                    xSleep: Some(sleep),
                    xCurrentTime: Some(current_time),
                    xGetLastError: Some(get_last_error),
                    xCurrentTimeInt64: Some(current_time_int64),
                    xSetSystemCall: None,
                    xGetSystemCall: None,
                    xNextSystemCall: None,
                }));
                match ffi::sqlite3_vfs_register(vfs, 0) {
                    ffi::SQLITE_OK => Ok(()),
                    rc => Err(format!("registering the WAL VFS failed ({rc})")),
                }
            }
        })
        .clone()
        .map(|()| NAME)
}

/// An open WAL file: SQLite's file header, then what is gathered, then (at [`inner_offset`]) the
/// real file's own struct.
#[repr(C)]
struct WalFile {
    base: ffi::sqlite3_file,
    inner: *mut ffi::sqlite3_file,
    gathered: Vec<u8>,
    /// File offset of `gathered[0]`.
    at: i64,
    /// The last write was a commit frame's header: its page (the next write) completes the commit.
    commit_page_next: bool,
}

fn inner_offset() -> usize {
    std::mem::size_of::<WalFile>().next_multiple_of(16)
}

static WAL_METHODS: ffi::sqlite3_io_methods = ffi::sqlite3_io_methods {
    iVersion: 1,
    xClose: Some(close),
    xRead: Some(read),
    xWrite: Some(write),
    xTruncate: Some(truncate),
    xSync: Some(sync),
    xFileSize: Some(file_size),
    xLock: Some(lock),
    xUnlock: Some(unlock),
    xCheckReservedLock: Some(check_reserved_lock),
    xFileControl: Some(file_control),
    xSectorSize: Some(sector_size),
    xDeviceCharacteristics: Some(device_characteristics),
    xShmMap: None,
    xShmLock: None,
    xShmBarrier: None,
    xShmUnmap: None,
    xFetch: None,
    xUnfetch: None,
};

/// # Safety
/// `vfs` is the VFS [`register`] made.
unsafe fn real(vfs: *mut ffi::sqlite3_vfs) -> *mut ffi::sqlite3_vfs {
    // SAFETY: `register` stored the default VFS in `pAppData`.
    unsafe { (*vfs).pAppData.cast() }
}

unsafe extern "C" fn open(
    vfs: *mut ffi::sqlite3_vfs,
    name: ffi::sqlite3_filename,
    file: *mut ffi::sqlite3_file,
    flags: c_int,
    out_flags: *mut c_int,
) -> c_int {
    // SAFETY: SQLite passes our VFS and a `szOsFile`-byte (8-aligned) buffer for the file.
    unsafe {
        let real = real(vfs);
        let Some(real_open) = (*real).xOpen else {
            return ffi::SQLITE_ERROR;
        };
        if flags & ffi::SQLITE_OPEN_WAL == 0 {
            // Not a WAL file: the real file fills the buffer and SQLite calls it directly.
            return real_open(real, name, file, flags, out_flags);
        }
        let inner = file.cast::<u8>().add(inner_offset()).cast::<ffi::sqlite3_file>();
        (*file).pMethods = std::ptr::null();
        let rc = real_open(real, name, inner, flags, out_flags);
        if rc != ffi::SQLITE_OK {
            if !(*inner).pMethods.is_null() {
                // SQLite would close a half-open file through our methods; do it here instead.
                if let Some(close) = (*(*inner).pMethods).xClose {
                    close(inner);
                }
            }
            return rc;
        }
        file.cast::<WalFile>().write(WalFile {
            base: ffi::sqlite3_file { pMethods: &WAL_METHODS },
            inner,
            gathered: Vec::new(),
            at: 0,
            commit_page_next: false,
        });
        ffi::SQLITE_OK
    }
}

/// # Safety
/// `file` was opened by [`open`] as a WAL file and not closed.
unsafe fn wal<'a>(file: *mut ffi::sqlite3_file) -> &'a mut WalFile {
    // SAFETY: per the contract; SQLite never calls one file's methods concurrently.
    unsafe { &mut *file.cast::<WalFile>() }
}

/// The real file's methods.
fn methods(w: &WalFile) -> &ffi::sqlite3_io_methods {
    // SAFETY: `inner` was opened successfully, so its methods are set, and outlive it.
    unsafe { &*(*w.inner).pMethods }
}

/// Write out what is gathered, in as few real writes as the real file takes.
fn flush(w: &mut WalFile) -> c_int {
    let Some(real_write) = methods(w).xWrite else {
        return ffi::SQLITE_IOERR_WRITE;
    };
    let mut rc = ffi::SQLITE_OK;
    let mut at = w.at;
    for chunk in w.gathered.chunks(MAX_WRITE) {
        // SAFETY: the chunk is valid for its length (at most MAX_WRITE); the real file is open.
        rc = unsafe { real_write(w.inner, chunk.as_ptr().cast(), chunk.len() as c_int, at) };
        if rc != ffi::SQLITE_OK {
            break;
        }
        at += chunk.len() as i64;
    }
    // Written or failed, these bytes are done with: SQLite sees the failure as this write's.
    w.gathered.clear();
    // A large transaction's buffer is not kept for the small commits after it.
    if w.gathered.capacity() > 4 * MAX_WRITE {
        w.gathered.shrink_to(MAX_WRITE);
    }
    rc
}

unsafe extern "C" fn write(file: *mut ffi::sqlite3_file, data: *const c_void, amount: c_int, offset: i64) -> c_int {
    // SAFETY: SQLite passes our open WAL file and `amount` readable bytes at `data`.
    let (w, bytes) = unsafe {
        let Ok(len) = usize::try_from(amount) else {
            return ffi::SQLITE_IOERR_WRITE;
        };
        (wal(file), std::slice::from_raw_parts(data.cast::<u8>(), len))
    };
    let end = w.at + w.gathered.len() as i64;
    if !w.gathered.is_empty() && offset != end {
        let rc = flush(w);
        if rc != ffi::SQLITE_OK {
            return rc;
        }
    }
    if w.gathered.is_empty() {
        w.at = offset;
    }
    w.gathered.extend_from_slice(bytes);
    // A commit frame's header goes out at once (with the frames before it): SQLite may rewrite
    // it after its page (new checksums, when the transaction overwrote earlier frames), and
    // nothing else is written after that rewrite. Its page, written next, goes out at once too.
    let commit_header = bytes.len() == FRAME_HEADER && bytes[4..8] != [0; 4];
    let commit_page = std::mem::replace(&mut w.commit_page_next, commit_header);
    if commit_header || commit_page || w.gathered.len() >= MAX_GATHERED {
        return flush(w);
    }
    ffi::SQLITE_OK
}

unsafe extern "C" fn close(file: *mut ffi::sqlite3_file) -> c_int {
    // SAFETY: our open WAL file, closed once: its Rust fields are dropped here, then the real one.
    unsafe {
        let w = wal(file);
        let flushed = flush(w);
        let inner = w.inner;
        let real_close = methods(w).xClose;
        std::ptr::drop_in_place(file.cast::<WalFile>());
        (*file).pMethods = std::ptr::null();
        let closed = real_close.map_or(ffi::SQLITE_OK, |close| close(inner));
        if flushed != ffi::SQLITE_OK { flushed } else { closed }
    }
}

/// Forward a call to the real file after writing out what is gathered.
macro_rules! flushed_then {
    ($name:ident ( $($arg:ident : $ty:ty),* ) => $method:ident) => {
        unsafe extern "C" fn $name(file: *mut ffi::sqlite3_file, $($arg: $ty),*) -> c_int {
            // SAFETY: SQLite passes our open WAL file and arguments valid for the real method.
            unsafe {
                let w = wal(file);
                let rc = flush(w);
                if rc != ffi::SQLITE_OK {
                    return rc;
                }
                match methods(w).$method {
                    Some(f) => f(w.inner, $($arg),*),
                    None => ffi::SQLITE_ERROR,
                }
            }
        }
    };
}

/// Forward a call to the real file as is.
macro_rules! forwarded {
    ($name:ident ( $($arg:ident : $ty:ty),* ) => $method:ident) => {
        unsafe extern "C" fn $name(file: *mut ffi::sqlite3_file, $($arg: $ty),*) -> c_int {
            // SAFETY: SQLite passes our open WAL file and arguments valid for the real method.
            unsafe {
                let w = wal(file);
                match methods(w).$method {
                    Some(f) => f(w.inner, $($arg),*),
                    None => ffi::SQLITE_ERROR,
                }
            }
        }
    };
}

flushed_then!(read(buf: *mut c_void, amount: c_int, offset: i64) => xRead);
flushed_then!(truncate(size: i64) => xTruncate);
flushed_then!(sync(flags: c_int) => xSync);
flushed_then!(file_size(size: *mut i64) => xFileSize);
flushed_then!(file_control(op: c_int, arg: *mut c_void) => xFileControl);
forwarded!(lock(level: c_int) => xLock);
forwarded!(unlock(level: c_int) => xUnlock);
forwarded!(check_reserved_lock(out: *mut c_int) => xCheckReservedLock);
forwarded!(sector_size() => xSectorSize);
forwarded!(device_characteristics() => xDeviceCharacteristics);

/// Forward a VFS method to the real VFS.
macro_rules! vfs_forwarded {
    ($name:ident ( $($arg:ident : $ty:ty),* ) -> $ret:ty => $method:ident, $missing:expr) => {
        unsafe extern "C" fn $name(vfs: *mut ffi::sqlite3_vfs, $($arg: $ty),*) -> $ret {
            // SAFETY: our VFS; the real one's method gets the real VFS and the same arguments.
            unsafe {
                let real = real(vfs);
                match (*real).$method {
                    Some(f) => f(real, $($arg),*),
                    None => $missing,
                }
            }
        }
    };
}

vfs_forwarded!(delete(name: *const c_char, sync_dir: c_int) -> c_int => xDelete, ffi::SQLITE_ERROR);
vfs_forwarded!(access(name: *const c_char, flags: c_int, out: *mut c_int) -> c_int => xAccess, ffi::SQLITE_ERROR);
vfs_forwarded!(full_pathname(name: *const c_char, n: c_int, out: *mut c_char) -> c_int => xFullPathname, ffi::SQLITE_ERROR);
vfs_forwarded!(dl_open(name: *const c_char) -> *mut c_void => xDlOpen, std::ptr::null_mut());
vfs_forwarded!(dl_error(n: c_int, out: *mut c_char) -> () => xDlError, ());
vfs_forwarded!(dl_sym(handle: *mut c_void, symbol: *const c_char) -> Option<unsafe extern "C" fn(*mut ffi::sqlite3_vfs, *mut c_void, *const c_char)> => xDlSym, None);
vfs_forwarded!(dl_close(handle: *mut c_void) -> () => xDlClose, ());
vfs_forwarded!(randomness(n: c_int, out: *mut c_char) -> c_int => xRandomness, 0);
vfs_forwarded!(sleep(micros: c_int) -> c_int => xSleep, 0);
vfs_forwarded!(current_time(out: *mut f64) -> c_int => xCurrentTime, ffi::SQLITE_ERROR);
vfs_forwarded!(get_last_error(n: c_int, out: *mut c_char) -> c_int => xGetLastError, 0);
vfs_forwarded!(current_time_int64(out: *mut i64) -> c_int => xCurrentTimeInt64, ffi::SQLITE_ERROR);

#[cfg(test)]
mod tests {
    use std::path::Path;

    use rusqlite::{Connection, OpenFlags};

    use super::*;

    /// Write system calls made by this thread so far.
    fn thread_writes() -> u64 {
        let io = std::fs::read_to_string("/proc/thread-self/io").expect("/proc/thread-self/io");
        io.lines()
            .find_map(|l| l.strip_prefix("syscw: "))
            .and_then(|n| n.trim().parse().ok())
            .expect("syscw")
    }

    fn open(path: &Path, vfs: Option<&CStr>) -> Connection {
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = match vfs {
            Some(vfs) => Connection::open_with_flags_and_vfs(path, flags, vfs),
            None => Connection::open_with_flags(path, flags),
        }
        .expect("open");
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .expect("busy timeout");
        conn.query_row("PRAGMA journal_mode = WAL", [], |_| Ok(()))
            .expect("wal");
        conn.pragma_update(None, "synchronous", "NORMAL").expect("synchronous");
        conn
    }

    const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, a TEXT, b TEXT, c TEXT);
                          CREATE INDEX IF NOT EXISTS ta ON t (a);
                          CREATE INDEX IF NOT EXISTS tb ON t (b);
                          CREATE INDEX IF NOT EXISTS tc ON t (c);";

    /// Insert `rows` rows of ~`size`-byte values (scattered over the indexes) in one transaction.
    fn insert(conn: &mut Connection, round: usize, rows: usize, size: usize) {
        let tx = conn.transaction().expect("begin");
        for i in 0..rows {
            let v = format!("{:x}", (round * 7919 + i * 104_729) % 1_000_003).repeat(size / 6 + 1);
            tx.execute("INSERT INTO t (a, b, c) VALUES (?1, ?1 || 'b', 'c' || ?1)", [&v])
                .expect("insert");
        }
        tx.commit().expect("commit");
    }

    fn count(conn: &Connection) -> i64 {
        conn.query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .expect("count")
    }

    /// Write calls one 4-index, several-page commit takes through `vfs`, and that every reader
    /// (through the default VFS and through `vfs`) sees each commit at once.
    fn commit_writes(vfs: Option<&CStr>) -> u64 {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("t.db");
        let mut writer = open(&path, vfs);
        writer.execute_batch(SCHEMA).expect("schema");
        let readers = [open(&path, None), open(&path, Some(register().expect("vfs")))];
        let mut most = 0;
        for round in 0..30 {
            let before = thread_writes();
            insert(&mut writer, round, 4, 100);
            most = most.max(thread_writes() - before);
            for reader in &readers {
                assert_eq!(count(reader), (round as i64 + 1) * 4, "round {round}");
            }
        }
        most
    }

    #[test]
    fn a_commit_goes_to_the_wal_in_two_writes_and_every_connection_sees_it() {
        let gathered = commit_writes(Some(register().expect("vfs")));
        let default = commit_writes(None);
        // Two writes per frame through the default VFS (a page of each of four b-trees at least);
        // gathered, one per 64 KiB of frames (a commit here is under that, or just over it when
        // pages split).
        assert!(default >= 8, "the default VFS wrote a commit in {default} calls");
        assert!(
            gathered <= 2,
            "a commit took {gathered} write calls (default VFS: {default})"
        );
    }

    /// What a process killed right now would leave: the database and its WAL as the OS has them,
    /// opened afresh elsewhere (recovery rebuilds the WAL index from the WAL's checksums).
    fn after_a_crash(path: &Path) -> (tempfile::TempDir, Connection) {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::copy(path, dir.path().join("t.db")).expect("copy db");
        let wal = path.with_extension("db-wal");
        std::fs::copy(wal, dir.path().join("t.db-wal")).expect("copy wal");
        let conn = open(&dir.path().join("t.db"), None);
        (dir, conn)
    }

    #[test]
    fn a_large_spilled_transaction_is_in_the_os_when_its_commit_returns() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("t.db");
        let mut writer = open(&path, Some(register().expect("vfs")));
        writer.execute_batch(SCHEMA).expect("schema");
        insert(&mut writer, 0, 50, 100);
        // A tiny page cache: pages spill to the WAL before the commit and are spilled again after
        // changing, which makes SQLite rewrite the checksums of the frames from the first
        // rewritten one to the commit frame, after the commit frame was written.
        writer.pragma_update(None, "cache_size", 8).expect("cache_size");
        {
            let tx = writer.transaction().expect("begin");
            for round in 0..20 {
                tx.execute(
                    "UPDATE t SET b = b || ?1 WHERE id % 7 = ?2",
                    (round.to_string(), round % 7),
                )
                .expect("update");
                tx.execute(
                    "INSERT INTO t (a, b, c) SELECT a || ?1, b, c FROM t WHERE id % 50 = 0",
                    [round],
                )
                .expect("insert");
            }
            tx.commit().expect("commit");
        }
        let expected = count(&writer);
        let (_copy, crashed) = after_a_crash(&path);
        assert_eq!(
            count(&crashed),
            expected,
            "the committed transaction survives the process"
        );
    }

    #[test]
    fn spilled_rewritten_rolled_back_and_checkpointed_transactions_keep_the_database_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("t.db");
        let vfs = register().expect("vfs");
        let mut writer = open(&path, Some(vfs));
        writer.execute_batch(SCHEMA).expect("schema");
        // A tiny page cache: a large transaction spills uncommitted frames to the WAL, reads them
        // back and rewrites some in place; more than MAX_GATHERED bytes go out unasked.
        writer.pragma_update(None, "cache_size", 8).expect("cache_size");
        insert(&mut writer, 1, 3000, 1000);
        {
            let tx = writer.transaction().expect("begin");
            tx.execute("UPDATE t SET b = b || 'x' WHERE id % 3 = 0", [])
                .expect("update");
            tx.execute("DELETE FROM t WHERE id % 5 = 0", []).expect("delete");
            tx.execute("INSERT INTO t (a, b, c) SELECT a, b, c FROM t", [])
                .expect("copy");
            // Dropped: rolled back.
        }
        let reader = open(&path, Some(vfs));
        assert_eq!(count(&reader), 3000);
        reader
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .expect("checkpoint");
        insert(&mut writer, 2, 500, 1000);
        writer.execute("DELETE FROM t WHERE id % 2 = 0", []).expect("delete");
        let expected = count(&reader);
        assert_eq!(expected, count(&writer));
        drop((writer, reader));

        // A fresh connection through the default VFS finds the same rows and a sound file.
        let fresh = open(&path, None);
        assert_eq!(count(&fresh), expected);
        let check: String = fresh
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .expect("integrity_check");
        assert_eq!(check, "ok");
    }
}
