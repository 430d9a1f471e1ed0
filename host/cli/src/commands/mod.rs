//! One module per command group.

pub mod actions;
pub mod budgets;
pub mod build;
pub mod demo;
pub mod dev;
pub mod exec;
pub mod jobs;
pub mod keys;
pub mod ledger;
pub mod mcp;
pub mod new;
pub mod plugins;
pub mod policy;
pub mod run;
pub mod serve;
pub mod watch;
pub mod worker;
