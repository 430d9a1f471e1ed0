//! The `keel` package is the `keel` command (`src/main.rs`); it has no library API.
//!
//! This empty library exists for one reason: the package's tests enable its `testing` feature
//! (the `keel-debug` binary and test hooks) through a dev-dependency on the package itself, and
//! cargo only honours a dependency on a package that has a library target.
