//! The `origin` subcommands, one module per group; `main` parses the command line and
//! dispatches here.

pub mod bundles;
pub mod control;
pub mod prepare;
pub mod setup;
pub mod store;
pub mod swap;
