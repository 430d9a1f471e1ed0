//! Files a user names (a component to install or run, a policy): read whole only when they are a
//! regular file of bounded size. A device such as `/dev/zero` would be read until memory ran out,
//! and opening a FIFO waits for a writer that may never come.

use std::fs::OpenOptions;
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// The most a policy file may hold: policies are a few KiB of TOML.
pub const MAX_POLICY_BYTES: u64 = 4 << 20;

/// Read `path` whole if it is a regular file of at most `max` bytes. Anything else is refused at
/// once: the file is opened non-blocking (so a FIFO's open does not wait) and checked on the
/// descriptor that is then read (so a path swapped after a check cannot slip through). The error
/// says why: `not a regular file (a FIFO)`, `larger than 256 MiB`, or the system's reason.
pub fn read_regular(path: &Path, max: u64) -> io::Result<Vec<u8>> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    let meta = file.metadata()?;
    let kind = meta.file_type();
    let other = if kind.is_file() {
        None
    } else if kind.is_dir() {
        Some("a directory")
    } else if kind.is_fifo() {
        Some("a FIFO")
    } else if kind.is_char_device() || kind.is_block_device() {
        Some("a device")
    } else if kind.is_socket() {
        Some("a socket")
    } else {
        Some("not a file")
    };
    if let Some(other) = other {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("not a regular file ({other})"),
        ));
    }
    if meta.len() > max {
        return Err(too_large(max));
    }
    read_bounded(file, max)
}

/// All of `reader` (e.g. stdin), unless it holds more than `max` bytes.
pub fn read_bounded(reader: impl Read, max: u64) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    reader.take(max.saturating_add(1)).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(too_large(max));
    }
    Ok(bytes)
}

/// A UTF-8 text file read with [`read_regular`].
pub fn read_regular_text(path: &Path, max: u64) -> io::Result<String> {
    String::from_utf8(read_regular(path, max)?)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "not UTF-8 text"))
}

fn too_large(max: u64) -> io::Error {
    let size = if max.is_multiple_of(1 << 20) {
        format!("{} MiB", max >> 20)
    } else {
        format!("{max} bytes")
    };
    io::Error::new(io::ErrorKind::FileTooLarge, format!("larger than {size}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_regular_file_within_the_bound_is_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("f");
        std::fs::write(&file, b"12345").expect("write");
        assert_eq!(read_regular(&file, 5).expect("read"), b"12345");
        let err = read_regular(&file, 4).expect_err("too large");
        assert_eq!(err.to_string(), "larger than 4 bytes");
        let err = read_regular(dir.path(), 5).expect_err("a directory");
        assert_eq!(err.to_string(), "not a regular file (a directory)");
        let err = read_regular(Path::new("/dev/zero"), 5).expect_err("a device");
        assert_eq!(err.to_string(), "not a regular file (a device)");
        assert_eq!(read_bounded(&b"abc"[..], 3).expect("read"), b"abc");
        assert!(read_bounded(&b"abcd"[..], 3).is_err());
    }
}
