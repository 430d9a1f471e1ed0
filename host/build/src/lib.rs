//! keel-build: turns a tool project in any supported language into a `keel:plugin` component.
//!
//! One entry point, [`build`], used by `keel build` / `keel dev` and by the tests that build the
//! examples from source. Each language lives in its own module.

use std::path::{Path, PathBuf};

pub mod c;
pub mod js;
pub mod new;
pub mod python;
pub mod rust;

/// A language Keel can build tools from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Lang {
    /// Rust with `keel-sdk` (cargo, `wasm32-wasip2`).
    Rust,
    /// Python with `sdk/python` (componentize-py).
    Python,
    /// JavaScript with `sdk/js` (componentize-js).
    Js,
    /// C with `sdk/c` (clang + wasi-libc, componentized in-process).
    C,
}

/// Why a build failed.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// A toolchain the language needs is not installed; the message says how to install it.
    #[error("{tool} is not installed: {install}")]
    MissingToolchain {
        /// The missing program or package.
        tool: String,
        /// One line: how to install it.
        install: String,
    },
    /// The language is not supported by this build of Keel yet.
    #[error("building {0:?} projects is not supported yet")]
    Unsupported(Lang),
    /// The project is malformed (no manifest, no entry file, ...).
    #[error("{0}")]
    Project(String),
    /// The compiler or componentizer failed; `output` is its stderr.
    #[error("{step} failed:\n{output}")]
    Failed {
        /// Which step failed.
        step: String,
        /// What it printed.
        output: String,
    },
    /// I/O on the project or output files.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Build the project in `project` (written in `lang`) into a component at `out`; returns `out`.
/// Relative paths are resolved against the current directory first: some builders run their
/// tools in another directory (componentize-py runs in a copy of the project).
pub fn build(lang: Lang, project: &Path, out: &Path) -> Result<PathBuf, BuildError> {
    let project = &std::path::absolute(project)?;
    let out = &std::path::absolute(out)?;
    match lang {
        Lang::Rust => rust::build(project, out),
        Lang::Python => python::build(project, out),
        Lang::Js => js::build(project, out),
        Lang::C => c::build(project, out),
    }
}
