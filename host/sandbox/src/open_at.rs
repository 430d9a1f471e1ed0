//! `wasi:filesystem/types` `[method]descriptor.open-at`, shadowed in the linker.
//!
//! wasmtime-wasi opens a path with a blocking `open(2)` on tokio's blocking pool: opening a FIFO
//! (or a device) found in a granted directory blocks that thread until a peer appears, past any
//! call deadline, and no timeout can cancel it. This version opens with `O_NONBLOCK | O_NOCTTY`
//! (an open that cannot block), checks the type of what it opened, and refuses anything that is
//! neither a regular file nor a directory; the descriptor it hands the guest is that very file.
//! Resolution stays beneath the directory handle (`openat2` with `RESOLVE_BENEATH`: no `..`, no
//! absolute path and no symlink leaves it) and the preopen's permissions are enforced exactly as
//! wasmtime-wasi does.

use std::io;
use std::os::fd::OwnedFd;

use rustix::fs::{FileType, Mode, OFlags, ResolveFlags};
use wasmtime::StoreContextMut;
use wasmtime::component::{Linker, Resource};
use wasmtime_wasi::OpenMode;
use wasmtime_wasi::filesystem::{Descriptor, Dir, File};
use wasmtime_wasi::p2::bindings::filesystem::types::{DescriptorFlags, ErrorCode, OpenFlags, PathFlags};

use crate::host::{Denial, State};

/// The interface as wasmtime-wasi 48 registers it (guests importing older 0.2 versions resolve to it).
const INTERFACE: &str = "wasi:filesystem/types@0.2.12";

const METHOD: &str = "[method]descriptor.open-at";

/// Replace wasmtime-wasi's `open-at` in `linker` (which must already hold wasmtime-wasi's p2 linker).
pub(crate) fn add_to_linker(linker: &mut Linker<State>) -> wasmtime::Result<()> {
    // Defining it without shadowing must fail: otherwise wasmtime-wasi registers another version
    // and ours would sit beside its open-at instead of replacing it.
    if linker
        .instance(INTERFACE)?
        .func_wrap_async(METHOD, host_open_at)
        .is_ok()
    {
        wasmtime::bail!("wasmtime-wasi does not define {INTERFACE} {METHOD}; update keel-sandbox's open_at shadow");
    }
    linker.allow_shadowing(true);
    let defined = linker
        .instance(INTERFACE)
        .and_then(|mut types| types.func_wrap_async(METHOD, host_open_at));
    linker.allow_shadowing(false);
    defined
}

type OpenAtParams = (Resource<Descriptor>, PathFlags, String, OpenFlags, DescriptorFlags);
type OpenAtResult = (Result<Resource<Descriptor>, ErrorCode>,);

fn host_open_at(
    mut store: StoreContextMut<'_, State>,
    (fd, path_flags, path, oflags, flags): OpenAtParams,
) -> Box<dyn Future<Output = wasmtime::Result<OpenAtResult>> + Send + '_> {
    Box::new(async move {
        let dir = match store.data().table.get(&fd)? {
            Descriptor::Dir(dir) => dir.clone(),
            Descriptor::File(_) => return Ok((Err(ErrorCode::NotDirectory),)),
        };
        let opened = match open_at(&dir, path_flags, path.clone(), oflags, flags).await {
            Ok(opened) => opened,
            Err(Refused::Code(code)) => return Ok((Err(code),)),
            Err(refused) => {
                let reason = refused.reason();
                let denial = Denial {
                    capability: "filesystem".into(),
                    target: path,
                    reason,
                    grant: None,
                };
                store.data().journal.lock().expect("journal lock").denials.push(denial);
                return Ok((Err(ErrorCode::Access),));
            }
        };
        // A full table traps: the call has hit `Limits::max_handles`.
        let handle = store.data_mut().table.push(opened)?;
        Ok((Ok(handle),))
    })
}

/// Why an open was refused.
enum Refused {
    /// An ordinary WASI error.
    Code(ErrorCode),
    /// Not a regular file or directory (named for the journal).
    Special(&'static str),
    /// On the kernel's process or system filesystem (named), e.g. `/proc` under a grant of `/`.
    Kernel(&'static str),
}

impl Refused {
    /// Why, for the denial the journal records (an ordinary WASI error is not a denial).
    fn reason(&self) -> String {
        match self {
            Refused::Code(code) => format!("{code:?}"),
            Refused::Special(kind) => format!("it is a {kind}; plugins may open only regular files and directories"),
            Refused::Kernel(filesystem) => format!(
                "it is on the kernel's {filesystem} filesystem (the host's processes and system); no grant reaches it"
            ),
        }
    }
}

impl From<io::Error> for Refused {
    fn from(error: io::Error) -> Self {
        // An escape from the directory (`RESOLVE_BENEATH`) is refused like wasmtime-wasi refuses it.
        if error.raw_os_error() == Some(rustix::io::Errno::XDEV.raw_os_error()) {
            return Refused::Code(ErrorCode::NotPermitted);
        }
        Refused::Code(ErrorCode::from(error))
    }
}

enum Opened {
    Dir(OwnedFd),
    File(OwnedFd),
}

/// The flag and permission logic of wasmtime-wasi 48's `Dir::open_at`, with a non-blocking open.
async fn open_at(
    dir: &Dir,
    path_flags: PathFlags,
    path: String,
    oflags: OpenFlags,
    flags: DescriptorFlags,
) -> Result<Descriptor, Refused> {
    let code = |code| Err(Refused::Code(code));
    let mut open_mode = OpenMode::empty();
    let mut os = OFlags::CLOEXEC | OFlags::NONBLOCK | OFlags::NOCTTY;
    let mut create = false;
    if oflags.contains(OpenFlags::CREATE) {
        os |= OFlags::CREATE;
        if oflags.contains(OpenFlags::EXCLUSIVE) {
            os |= OFlags::EXCL;
        }
        create = true;
        open_mode |= OpenMode::WRITE;
    }
    if oflags.contains(OpenFlags::TRUNCATE) {
        os |= OFlags::TRUNC;
        open_mode |= OpenMode::WRITE;
    }
    // Not opened for writing means opened for reading: the OS lets it open, perms judge later.
    if flags.contains(DescriptorFlags::READ) || !flags.contains(DescriptorFlags::WRITE) {
        open_mode |= OpenMode::READ;
    }
    if flags.contains(DescriptorFlags::WRITE) {
        open_mode |= OpenMode::WRITE;
    }
    os |= match (open_mode.contains(OpenMode::READ), open_mode.contains(OpenMode::WRITE)) {
        (true, true) => OFlags::RDWR,
        (false, true) => OFlags::WRONLY,
        _ => OFlags::RDONLY,
    };
    if !path_flags.contains(PathFlags::SYMLINK_FOLLOW) {
        os |= OFlags::NOFOLLOW;
    }
    if flags.contains(DescriptorFlags::FILE_INTEGRITY_SYNC)
        || flags.contains(DescriptorFlags::DATA_INTEGRITY_SYNC)
        || flags.contains(DescriptorFlags::REQUESTED_WRITE_SYNC)
    {
        return code(ErrorCode::Unsupported);
    }
    let directory = oflags.contains(OpenFlags::DIRECTORY);
    if directory
        && (oflags.contains(OpenFlags::CREATE)
            || oflags.contains(OpenFlags::EXCLUSIVE)
            || oflags.contains(OpenFlags::TRUNCATE))
    {
        return code(ErrorCode::Invalid);
    }
    if dir.perms.write_not_permitted() && (create || open_mode.contains(OpenMode::WRITE)) {
        return code(ErrorCode::NotPermitted);
    }

    let parent = dir.dir.clone();
    let opened = tokio::task::spawn_blocking(move || -> Result<Opened, Refused> {
        let fd = loop {
            match rustix::fs::openat2(
                &*parent,
                path.as_str(),
                os,
                // openat2 refuses a mode without O_CREAT.
                if create {
                    Mode::from_bits_truncate(0o666)
                } else {
                    Mode::empty()
                },
                ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS,
            ) {
                // The kernel saw a concurrent rename during resolution: resolve again.
                Err(rustix::io::Errno::AGAIN) => continue,
                other => break other.map_err(io::Error::from)?,
            }
        };
        let stat = rustix::fs::fstat(&fd).map_err(io::Error::from)?;
        if let Some(filesystem) = crate::preopen::kernel_filesystem(&fd) {
            return Err(Refused::Kernel(filesystem));
        }
        match FileType::from_raw_mode(stat.st_mode) {
            FileType::Directory => Ok(Opened::Dir(fd)),
            _ if directory => Err(Refused::Code(ErrorCode::NotDirectory)),
            FileType::RegularFile => {
                // Regular files ignore O_NONBLOCK; drop it anyway so the descriptor is ordinary.
                let fl = rustix::fs::fcntl_getfl(&fd).map_err(io::Error::from)?;
                rustix::fs::fcntl_setfl(&fd, fl - OFlags::NONBLOCK).map_err(io::Error::from)?;
                Ok(Opened::File(fd))
            }
            FileType::Fifo => Err(Refused::Special("FIFO (named pipe)")),
            FileType::Socket => Err(Refused::Special("socket")),
            FileType::CharacterDevice => Err(Refused::Special("character device")),
            FileType::BlockDevice => Err(Refused::Special("block device")),
            _ => Err(Refused::Special("special file")),
        }
    })
    .await
    .map_err(|_| Refused::Code(ErrorCode::Io))??;
    Ok(match opened {
        Opened::Dir(fd) => Descriptor::Dir(Dir::new(std::fs::File::from(fd), dir.perms, open_mode, false)),
        Opened::File(fd) => Descriptor::File(File::new(std::fs::File::from(fd), dir.perms, open_mode, false)),
    })
}
