//! Opening granted directories by handle. A grant's host path is walked from `/` one component at
//! a time without following any symbolic link (a plugin with write access to a parent directory
//! could have planted one), its device and inode are compared with those recorded at grant time,
//! and a tool's narrowed sub-path is walked the same way beneath that handle. The result is an
//! open descriptor of exactly the directory that was checked; wasmtime-wasi is handed that inode
//! (through `/proc/self/fd/N`), never the path.

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Component, Path};

use rustix::fs::{FileType, Mode, OFlags};

use crate::grants::{FileIdentity, GrantError, Preopen};

/// Flags to open one directory component: never follow a link, never an fd the guest inherits.
fn dir_flags() -> OFlags {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    let base = OFlags::PATH;
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let base = OFlags::RDONLY;
    base | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC
}

/// Why a walk stopped.
struct WalkError {
    /// A component does not exist.
    missing: bool,
    /// One clause.
    reason: String,
}

/// Walk `components` down from `start`, refusing symbolic links, `.` and `..`.
fn walk<'a>(
    start: OwnedFd,
    shown_from: &Path,
    components: impl Iterator<Item = &'a OsStr>,
) -> Result<OwnedFd, WalkError> {
    let mut dir = start;
    let mut shown = shown_from.to_path_buf();
    for name in components {
        shown.push(name);
        let fail = |missing: bool, reason: String| WalkError { missing, reason };
        if name == "." || name == ".." || name.is_empty() {
            return Err(fail(false, format!("`{}` is not a plain path", shown.display())));
        }
        let next = rustix::fs::openat(&dir, name, dir_flags(), Mode::empty());
        let kind = match &next {
            Ok(fd) => rustix::fs::fstat(fd).map(|st| FileType::from_raw_mode(st.st_mode)),
            Err(_) => rustix::fs::statat(&dir, name, rustix::fs::AtFlags::SYMLINK_NOFOLLOW)
                .map(|st| FileType::from_raw_mode(st.st_mode)),
        };
        match (next, kind) {
            (Ok(fd), Ok(FileType::Directory)) => dir = fd,
            (_, Ok(FileType::Symlink)) => {
                return Err(fail(
                    false,
                    format!(
                        "`{}` is a symbolic link, and Keel never follows a link a plugin could have written",
                        shown.display()
                    ),
                ));
            }
            (_, Ok(_)) => return Err(fail(false, format!("`{}` is not a directory", shown.display()))),
            (Err(e), Err(_)) | (Ok(_), Err(e)) => {
                let missing = e == rustix::io::Errno::NOENT;
                let reason = if missing {
                    format!("`{}` does not exist", shown.display())
                } else {
                    format!("`{}`: {}", shown.display(), io::Error::from(e))
                };
                return Err(fail(missing, reason));
            }
        }
    }
    Ok(dir)
}

/// Open absolute `path` as a directory without following any symbolic link on the way.
pub(crate) fn open_root(path: &Path) -> io::Result<OwnedFd> {
    let mut names = Vec::new();
    for component in path.components() {
        match component {
            Component::RootDir => {}
            Component::Normal(name) => names.push(name),
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("`{}` is not an absolute, normalised path", path.display()),
                ));
            }
        }
    }
    if !path.has_root() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("`{}` is not absolute", path.display()),
        ));
    }
    let root = rustix::fs::openat(rustix::fs::CWD, "/", dir_flags(), Mode::empty())?;
    walk(root, Path::new("/"), names.into_iter()).map_err(|e| {
        let kind = if e.missing {
            io::ErrorKind::NotFound
        } else {
            io::ErrorKind::Other
        };
        io::Error::new(kind, e.reason)
    })
}

/// Device and inode of an open file.
pub(crate) fn identity(fd: &OwnedFd) -> io::Result<FileIdentity> {
    let st = rustix::fs::fstat(fd)?;
    Ok(FileIdentity {
        dev: st.st_dev,
        ino: st.st_ino,
    })
}

/// Open `preopen`: its grant's root (checked against the recorded identity), then its narrowed
/// sub-path beneath that handle. `Ok(None)` when a narrowed sub-directory does not exist (the tool
/// then gets no preopen for it, as before it was created).
pub(crate) fn open(preopen: &Preopen) -> Result<Option<OwnedFd>, GrantError> {
    let grant = &preopen.grant;
    let unavailable = |reason: String| GrantError::Unavailable {
        guest: grant.guest.clone(),
        host: grant.host.display().to_string(),
        reason,
    };
    let root = open_root(&grant.host).map_err(|e| unavailable(e.to_string()))?;
    if let Some(recorded) = grant.identity {
        let found = identity(&root).map_err(|e| unavailable(e.to_string()))?;
        if found != recorded {
            return Err(unavailable(
                "it is no longer the directory that was granted (it was replaced since); grant it again if that is intended"
                    .into(),
            ));
        }
    }
    if preopen.beneath.is_empty() {
        return Ok(Some(root));
    }
    let names = preopen.beneath.split('/').filter(|n| !n.is_empty()).map(OsStr::new);
    match walk(root, Path::new(""), names) {
        Ok(dir) => Ok(Some(dir)),
        Err(e) if e.missing => Ok(None),
        Err(e) => Err(unavailable(format!(
            "narrowing it to `{}` for this tool: {}",
            preopen.guest, e.reason
        ))),
    }
}

/// The path under which an open descriptor is that very inode, for APIs that take a path.
pub(crate) fn fd_path(fd: &OwnedFd) -> String {
    format!("/proc/self/fd/{}", fd.as_raw_fd())
}

/// The kernel's process and system filesystem `fd` is on, if it is one: procfs (`/proc/self` is
/// the Keel process — its environment holds every secret, its memory the cache key), sysfs,
/// devpts, cgroup, debugfs, tracefs, securityfs, bpf, configfs, efivarfs, pstore or binfmt_misc.
/// A plugin never opens a file there, whatever it was granted.
pub(crate) fn kernel_filesystem(fd: impl std::os::fd::AsFd) -> Option<&'static str> {
    let magic = rustix::fs::fstatfs(fd).ok()?.f_type as u64;
    Some(match magic {
        0x9fa0 => "procfs",
        0x6265_6572 => "sysfs",
        0x1cd1 => "devpts",
        0x0027_e0eb | 0x6367_7270 => "cgroup",
        0x6462_6720 => "debugfs",
        0x7472_6163 => "tracefs",
        0x7363_6673 => "securityfs",
        0xcafe_4a11 => "bpf",
        0x6265_6570 => "configfs",
        0xde5e_81e4 => "efivarfs",
        0x6165_676c => "pstore",
        0x4249_4e4d => "binfmt_misc",
        _ => return None,
    })
}
