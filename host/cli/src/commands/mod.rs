//! One module per command group.

pub mod plugins;
pub mod policy;
