//! Filesystem and resource-exhaustion attacks of issue 7 (items 2, 6 and 9), with raw
//! `wasi:filesystem` calls on the preopened descriptors.
//!
//! - `open_many` — opens `path` in preopen `dir` `count` times and holds every descriptor.
//! - `open_path` — opens `path` for reading (e.g. a FIFO the test made) and reads what is there.
//! - `replace_with_symlink` — renames directory `name` in `dir` away and puts a symlink to `target`
//!   in its place (a nested grant swapped for a way out).
//! - `list` — lists the entries of preopen `dir` (its guest path as given).

use keel_sdk::prelude::*;
use wasip2::filesystem::types::{DescriptorFlags, OpenFlags, PathFlags};

use crate::{preopen, read_all};

/// Arguments of `open_many`.
#[derive(Deserialize, JsonSchema)]
pub struct OpenMany {
    /// Preopen to open from.
    dir: String,
    /// File inside it.
    path: String,
    /// How many descriptors to open and hold.
    count: u32,
}

pub fn open_many(_: &Context, i: OpenMany) -> Result<Value, ToolError> {
    let d = preopen(&i.dir)?;
    let mut held = Vec::new();
    for n in 0..i.count {
        match d.open_at(PathFlags::empty(), &i.path, OpenFlags::empty(), DescriptorFlags::READ) {
            Ok(f) => held.push(f),
            Err(code) => {
                return Err(ToolError::failed(format!(
                    "open #{n} of {} failed: {}",
                    i.path,
                    code.name()
                )));
            }
        }
    }
    Ok(json!({ "opened": held.len() }))
}

/// Arguments of `open_path` and `list`.
#[derive(Deserialize, JsonSchema)]
pub struct DirPath {
    /// Preopen to start from.
    dir: String,
    /// Path inside it (`.` for the preopen itself).
    #[serde(default)]
    path: Option<String>,
}

pub fn open_path(_: &Context, i: DirPath) -> Result<Value, ToolError> {
    let d = preopen(&i.dir)?;
    let path = i.path.unwrap_or_else(|| ".".into());
    let f = d
        .open_at(PathFlags::empty(), &path, OpenFlags::empty(), DescriptorFlags::READ)
        .map_err(|code| ToolError::failed(format!("open_at({path}): {}", code.name())))?;
    let content = read_all(&f).map_err(|code| ToolError::failed(format!("read({path}): {}", code.name())))?;
    Ok(json!({ "content": content }))
}

pub fn list(_: &Context, i: DirPath) -> Result<Value, ToolError> {
    let d = preopen(&i.dir)?;
    let stream = d
        .read_directory()
        .map_err(|code| ToolError::failed(format!("read_directory: {}", code.name())))?;
    let mut names = Vec::new();
    while let Ok(Some(entry)) = stream.read_directory_entry() {
        names.push(entry.name);
    }
    names.sort();
    Ok(json!({ "names": names }))
}

/// Arguments of `replace_with_symlink`.
#[derive(Deserialize, JsonSchema)]
pub struct Replace {
    /// Writable preopen holding `name`.
    dir: String,
    /// Directory entry to replace.
    name: String,
    /// Target of the symlink put in its place (e.g. `../../..`).
    target: String,
}

pub fn replace_with_symlink(_: &Context, i: Replace) -> Result<Value, ToolError> {
    let d = preopen(&i.dir)?;
    let aside = format!("{}.moved", i.name);
    d.rename_at(&i.name, &d, &aside)
        .map_err(|code| ToolError::failed(format!("rename_at({}): {}", i.name, code.name())))?;
    d.symlink_at(&i.target, &i.name)
        .map_err(|code| ToolError::failed(format!("symlink_at({}): {}", i.target, code.name())))?;
    Ok(json!({ "replaced": i.name }))
}
