//! Building rust tool projects.

use std::path::{Path, PathBuf};

use crate::{BuildError, Lang};

/// Build the project in `project` into a component at `out`.
pub fn build(_project: &Path, _out: &Path) -> Result<PathBuf, BuildError> {
    Err(BuildError::Unsupported(Lang::Rust))
}
