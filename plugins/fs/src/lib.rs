//! `fs` — Keel's first-party filesystem plugin.
//!
//! Tools `read`, `write`, `list` and `stat` work on *guest paths* inside the directories the user
//! granted to the plugin (WASI preopens). The plugin discovers those directories at call time with
//! `wasi:filesystem/preopens.get-directories`, resolves every path lexically against them (a `..`
//! that leaves every granted directory is refused before the host is asked), and then lets the host
//! enforce the rest (symlinks, read-only grants). Errors name the granted directories and their modes,
//! and any access error the host returns becomes a `denied` error for the `filesystem` capability.
//!
//! See `README.md` for the capability-request decision.

use keel_sdk::prelude::*;
use wasip2::filesystem::preopens::get_directories;
use wasip2::filesystem::types::{
    Descriptor, DescriptorFlags, DescriptorStat, DescriptorType, ErrorCode, OpenFlags, PathFlags,
};

/// Default number of bytes `read` returns when no `length` is given.
const DEFAULT_READ_BYTES: u64 = 256 * 1024;
/// Largest `length` `read` accepts; the host's output limit (1 MiB by default) applies as well.
const MAX_READ_BYTES: u64 = 4 * 1024 * 1024;
/// Largest number of entries `list` returns.
const MAX_LIST_ENTRIES: usize = 10_000;

/// One granted directory as the guest sees it.
struct Root {
    /// The guest path of the preopen, e.g. `/data`.
    guest: String,
    /// Normalised components of `guest`.
    components: Vec<String>,
    /// The preopened directory.
    dir: Descriptor,
    /// Whether the host lets us create and modify entries in it.
    writable: bool,
}

/// All granted directories.
struct Roots(Vec<Root>);

/// A path resolved to a granted directory and a path relative to it.
struct Resolved<'a> {
    root: &'a Root,
    /// Relative path inside `root`; empty for the root itself.
    rel: String,
}

/// Split `path` into normal components, resolving `.` and `..` lexically.
/// `None` when a `..` climbs above the start of the path.
fn normalize(path: &str) -> Option<Vec<String>> {
    let mut out: Vec<String> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                out.pop()?;
            }
            other => out.push(other.to_string()),
        }
    }
    Some(out)
}

impl Roots {
    fn discover() -> Self {
        let mut roots: Vec<Root> = get_directories()
            .into_iter()
            .map(|(dir, guest)| {
                let writable = dir
                    .get_flags()
                    .map(|f| f.contains(DescriptorFlags::MUTATE_DIRECTORY))
                    .unwrap_or(false);
                let components = normalize(&guest).unwrap_or_default();
                Root {
                    guest,
                    components,
                    dir,
                    writable,
                }
            })
            .collect();
        // Longest prefix first, so nested grants win over their parents.
        roots.sort_by_key(|r| std::cmp::Reverse(r.components.len()));
        Roots(roots)
    }

    /// Human-readable list: `/data (read), /out (read-write)`.
    fn describe(&self) -> String {
        if self.0.is_empty() {
            return "no directories are granted to this plugin".into();
        }
        let mut roots: Vec<&Root> = self.0.iter().collect();
        roots.sort_by(|a, b| a.guest.cmp(&b.guest));
        roots
            .iter()
            .map(|r| format!("{} ({})", r.guest, if r.writable { "read-write" } else { "read" }))
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn outside(&self, path: &str) -> ToolError {
        ToolError::denied(
            "filesystem",
            path,
            format!("`{path}` is outside the granted directories: {}", self.describe()),
        )
    }

    /// Map `path` (a guest path) onto a granted directory.
    fn resolve(&self, path: &str) -> Result<Resolved<'_>, ToolError> {
        if path.is_empty() {
            return Err(ToolError::invalid_input("`path` must not be empty"));
        }
        if path.contains('\0') {
            return Err(ToolError::invalid_input("`path` must not contain NUL bytes"));
        }
        let absolute = path.starts_with('/');
        let Some(components) = normalize(path) else {
            return Err(self.outside(path));
        };
        if !absolute {
            // Not resolved against a granted directory: a policy matches the path as written,
            // so a relative path would reach files its rules name only absolutely.
            return Err(ToolError::invalid_input(format!(
                "`{path}` is relative; use an absolute path inside the granted directories: {}",
                self.describe()
            )));
        }
        for root in &self.0 {
            if components.len() >= root.components.len() && components[..root.components.len()] == root.components[..] {
                return Ok(Resolved {
                    root,
                    rel: components[root.components.len()..].join("/"),
                });
            }
        }
        Err(self.outside(path))
    }

    /// Turn a WASI error into a tool error naming the path and the granted directories.
    fn error(&self, op: &str, path: &str, code: ErrorCode) -> ToolError {
        match code {
            ErrorCode::Access | ErrorCode::NotPermitted | ErrorCode::ReadOnly => ToolError::denied(
                "filesystem",
                path,
                format!(
                    "the host refused to {op} `{path}` ({}); granted directories: {}",
                    code.name(),
                    self.describe()
                ),
            ),
            ErrorCode::NoEntry => ToolError::failed(format!("cannot {op} `{path}`: no such file or directory")),
            ErrorCode::Exist => ToolError::failed(format!("cannot {op} `{path}`: it already exists")),
            ErrorCode::IsDirectory => ToolError::failed(format!("cannot {op} `{path}`: it is a directory")),
            ErrorCode::NotDirectory => {
                ToolError::failed(format!("cannot {op} `{path}`: a path component is not a directory"))
            }
            other => ToolError::failed(format!("cannot {op} `{path}`: {} ({})", other.message(), other.name())),
        }
    }
}

fn type_name(t: DescriptorType) -> &'static str {
    match t {
        DescriptorType::RegularFile => "file",
        DescriptorType::Directory => "directory",
        DescriptorType::SymbolicLink => "symlink",
        _ => "other",
    }
}

/// Open `resolved` (or re-open its root when the relative path is empty).
fn open(resolved: &Resolved<'_>, open_flags: OpenFlags, flags: DescriptorFlags) -> Result<Descriptor, ErrorCode> {
    let rel = if resolved.rel.is_empty() {
        "."
    } else {
        resolved.rel.as_str()
    };
    resolved
        .root
        .dir
        .open_at(PathFlags::SYMLINK_FOLLOW, rel, open_flags, flags)
}

fn stat_of(resolved: &Resolved<'_>, follow: bool) -> Result<DescriptorStat, ErrorCode> {
    if resolved.rel.is_empty() {
        return resolved.root.dir.stat();
    }
    let flags = if follow {
        PathFlags::SYMLINK_FOLLOW
    } else {
        PathFlags::empty()
    };
    resolved.root.dir.stat_at(flags, &resolved.rel)
}

// ---------------------------------------------------------------------------------------------
// read

/// Arguments of `read`.
#[derive(Deserialize, JsonSchema)]
struct ReadInput {
    /// Guest path of the file, inside a granted directory (e.g. `/data/notes.txt`).
    path: String,
    /// Byte offset to start reading at (default 0).
    #[serde(default)]
    offset: u64,
    /// Maximum number of bytes to read (default 262144, at most 4194304).
    #[serde(default)]
    length: Option<u64>,
}

/// Result of `read`.
#[derive(Serialize, JsonSchema)]
struct ReadOutput {
    /// The path that was read.
    path: String,
    /// The bytes read, as UTF-8 text (invalid sequences replaced by U+FFFD when `lossy` is true).
    content: String,
    /// Offset the read started at.
    offset: u64,
    /// Number of bytes returned.
    bytes_read: u64,
    /// Size of the file in bytes.
    size: u64,
    /// True when the file has more bytes after the ones returned.
    truncated: bool,
    /// True when the bytes were not valid UTF-8 and were converted lossily.
    lossy: bool,
}

fn read(_ctx: &Context, input: ReadInput) -> Result<ReadOutput, ToolError> {
    let roots = Roots::discover();
    let resolved = roots.resolve(&input.path)?;
    let length = input.length.unwrap_or(DEFAULT_READ_BYTES);
    if length > MAX_READ_BYTES {
        return Err(ToolError::invalid_input(format!(
            "`length` must be at most {MAX_READ_BYTES} bytes"
        )));
    }
    let file =
        open(&resolved, OpenFlags::empty(), DescriptorFlags::READ).map_err(|e| roots.error("read", &input.path, e))?;
    let stat = file.stat().map_err(|e| roots.error("read", &input.path, e))?;
    if stat.type_ == DescriptorType::Directory {
        return Err(roots.error("read", &input.path, ErrorCode::IsDirectory));
    }
    let mut bytes = Vec::new();
    let mut eof = false;
    while (bytes.len() as u64) < length {
        let want = length - bytes.len() as u64;
        let (chunk, end) = file
            .read(want, input.offset + bytes.len() as u64)
            .map_err(|e| roots.error("read", &input.path, e))?;
        bytes.extend_from_slice(&chunk);
        if end || chunk.is_empty() {
            eof = true;
            break;
        }
    }
    let bytes_read = bytes.len() as u64;
    let end_offset = input.offset + bytes_read;
    let truncated = !eof && end_offset < stat.size;
    // Don't report a UTF-8 sequence cut by the length cap as invalid: drop the partial tail.
    let (content, lossy) = match String::from_utf8(bytes) {
        Ok(s) => (s, false),
        Err(e) if truncated && e.utf8_error().error_len().is_none() => {
            let valid = e.utf8_error().valid_up_to();
            let mut bytes = e.into_bytes();
            bytes.truncate(valid);
            (String::from_utf8(bytes).unwrap_or_default(), false)
        }
        Err(e) => (String::from_utf8_lossy(e.as_bytes()).into_owned(), true),
    };
    Ok(ReadOutput {
        path: input.path,
        content,
        offset: input.offset,
        bytes_read,
        size: stat.size,
        truncated,
        lossy,
    })
}

// ---------------------------------------------------------------------------------------------
// write

/// How `write` treats an existing file.
#[derive(Deserialize, JsonSchema, Default, Clone, Copy, PartialEq)]
#[serde(rename_all = "snake_case")]
enum WriteMode {
    /// Create a new file; fail if it exists.
    Create,
    /// Create the file or replace its contents (default).
    #[default]
    Overwrite,
    /// Create the file or add to its end.
    Append,
}

/// Arguments of `write`.
#[derive(Deserialize, JsonSchema)]
struct WriteInput {
    /// Guest path of the file, inside a directory granted read-write (e.g. `/out/report.md`).
    path: String,
    /// Text to write (UTF-8).
    content: String,
    /// `create` (fail if the file exists), `overwrite` (default) or `append`.
    #[serde(default)]
    mode: WriteMode,
    /// Create missing parent directories (default false).
    #[serde(default)]
    create_parents: bool,
}

/// Result of `write`.
#[derive(Serialize, JsonSchema)]
struct WriteOutput {
    /// The path written.
    path: String,
    /// Bytes written by this call.
    bytes_written: u64,
    /// Size of the file afterwards.
    size: u64,
}

fn write(_ctx: &Context, input: WriteInput) -> Result<WriteOutput, ToolError> {
    let roots = Roots::discover();
    let resolved = roots.resolve(&input.path)?;
    if resolved.rel.is_empty() {
        return Err(roots.error("write", &input.path, ErrorCode::IsDirectory));
    }
    if input.create_parents {
        let parts: Vec<&str> = resolved.rel.split('/').collect();
        for i in 1..parts.len() {
            let parent = parts[..i].join("/");
            match resolved.root.dir.create_directory_at(&parent) {
                Ok(()) | Err(ErrorCode::Exist) => {}
                Err(e) => return Err(roots.error("create directory", &input.path, e)),
            }
        }
    }
    let open_flags = match input.mode {
        WriteMode::Create => OpenFlags::CREATE | OpenFlags::EXCLUSIVE,
        WriteMode::Overwrite => OpenFlags::CREATE | OpenFlags::TRUNCATE,
        WriteMode::Append => OpenFlags::CREATE,
    };
    let file = open(&resolved, open_flags, DescriptorFlags::WRITE | DescriptorFlags::READ)
        .map_err(|e| roots.error("write", &input.path, e))?;
    let start = match input.mode {
        WriteMode::Append => file.stat().map_err(|e| roots.error("write", &input.path, e))?.size,
        _ => 0,
    };
    let data = input.content.as_bytes();
    let mut written = 0usize;
    while written < data.len() {
        let n = file
            .write(&data[written..], start + written as u64)
            .map_err(|e| roots.error("write", &input.path, e))?;
        if n == 0 {
            return Err(ToolError::failed(format!("writing `{}` made no progress", input.path)));
        }
        written += n as usize;
    }
    let size = file.stat().map(|s| s.size).unwrap_or(start + written as u64);
    Ok(WriteOutput {
        path: input.path,
        bytes_written: written as u64,
        size,
    })
}

// ---------------------------------------------------------------------------------------------
// list

/// Arguments of `list`.
#[derive(Deserialize, JsonSchema)]
struct ListInput {
    /// Guest path of a directory inside a granted directory (e.g. `/data`).
    path: String,
}

/// One directory entry.
#[derive(Serialize, JsonSchema)]
struct Entry {
    /// File name.
    name: String,
    /// `file`, `directory`, `symlink` or `other`.
    #[serde(rename = "type")]
    kind: String,
    /// Size in bytes, when known.
    size: Option<u64>,
}

/// Result of `list`.
#[derive(Serialize, JsonSchema)]
struct ListOutput {
    /// The directory listed.
    path: String,
    /// Entries sorted by name (at most 10000).
    entries: Vec<Entry>,
    /// True when the directory had more entries than returned.
    truncated: bool,
}

fn list(_ctx: &Context, input: ListInput) -> Result<ListOutput, ToolError> {
    let roots = Roots::discover();
    let resolved = roots.resolve(&input.path)?;
    let opened;
    let dir = if resolved.rel.is_empty() {
        &resolved.root.dir
    } else {
        opened = open(&resolved, OpenFlags::DIRECTORY, DescriptorFlags::READ)
            .map_err(|e| roots.error("list", &input.path, e))?;
        &opened
    };
    let stream = dir.read_directory().map_err(|e| roots.error("list", &input.path, e))?;
    let mut entries = Vec::new();
    let mut truncated = false;
    while let Some(entry) = stream
        .read_directory_entry()
        .map_err(|e| roots.error("list", &input.path, e))?
    {
        if entries.len() == MAX_LIST_ENTRIES {
            truncated = true;
            break;
        }
        let size = match entry.type_ {
            DescriptorType::RegularFile => dir.stat_at(PathFlags::empty(), &entry.name).ok().map(|s| s.size),
            _ => None,
        };
        entries.push(Entry {
            name: entry.name,
            kind: type_name(entry.type_).into(),
            size,
        });
    }
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(ListOutput {
        path: input.path,
        entries,
        truncated,
    })
}

// ---------------------------------------------------------------------------------------------
// stat

/// Arguments of `stat`.
#[derive(Deserialize, JsonSchema)]
struct StatInput {
    /// Guest path inside a granted directory.
    path: String,
    /// Describe the symlink's target rather than the link itself (default true).
    #[serde(default = "yes")]
    follow_symlinks: bool,
}

fn yes() -> bool {
    true
}

/// Result of `stat`.
#[derive(Serialize, JsonSchema)]
struct StatOutput {
    /// The path described.
    path: String,
    /// `file`, `directory`, `symlink` or `other`.
    #[serde(rename = "type")]
    kind: String,
    /// Size in bytes.
    size: u64,
    /// Number of hard links.
    link_count: u64,
    /// Last modification time, seconds since the Unix epoch, when known.
    modified: Option<u64>,
    /// Whether the containing granted directory is writable.
    writable: bool,
}

fn stat(_ctx: &Context, input: StatInput) -> Result<StatOutput, ToolError> {
    let roots = Roots::discover();
    let resolved = roots.resolve(&input.path)?;
    let st = stat_of(&resolved, input.follow_symlinks).map_err(|e| roots.error("stat", &input.path, e))?;
    Ok(StatOutput {
        path: input.path,
        kind: type_name(st.type_).into(),
        size: st.size,
        link_count: st.link_count,
        modified: st.data_modification_timestamp.map(|t| t.seconds),
        writable: resolved.root.writable,
    })
}

// ---------------------------------------------------------------------------------------------

struct Fs;

impl Plugin for Fs {
    fn meta() -> PluginMeta {
        PluginMeta::new(
            "fs",
            env!("CARGO_PKG_VERSION"),
            "Read, write, list and inspect files inside the directories the user granted to this plugin. \
             Paths are absolute guest paths such as /data/notes.txt; nothing outside the granted directories \
             is reachable.",
        )
    }

    fn tools() -> Vec<Tool> {
        vec![
            Tool::new(
                "read",
                "Read a text file inside a granted directory; optional byte `offset` and `length` \
                 (default 256 KiB, at most 4 MiB). Reports `truncated` when more data follows.",
                read,
            )
            .idempotent(),
            Tool::new(
                "write",
                "Write text to a file inside a directory granted read-write: mode `create` (fail if it exists), \
                 `overwrite` (default) or `append`; `create_parents` makes missing directories.",
                write,
            ),
            Tool::new(
                "list",
                "List a directory inside a granted directory: each entry's name, type and size.",
                list,
            )
            .idempotent(),
            Tool::new(
                "stat",
                "Describe a path inside a granted directory: type, size, link count, modification time.",
                stat,
            )
            .idempotent(),
        ]
    }
}

keel_sdk::export_plugin!(Fs);
