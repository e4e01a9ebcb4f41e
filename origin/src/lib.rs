//! The origin: certificate authority, publisher and the source of every bundle.
//!
//! - [`home`]: the origin's directory (CA, keys, identities, store, catalog).
//! - [`catalog`]: published bundles in order, with sequence numbers for subscribers.
//! - [`tokens`]: one-time enrollment secrets.
//! - [`server`]: `origin serve` (mesh and enrollment endpoints).
//! - [`publish`]: `origin publish` (pack, upload, publish).
//! - [`remote`]: `origin swap` (commands to edge daemons over mutual TLS).
//! - [`policy`], [`rollout`]: which bundle a node should run, and waves of a rollout.

pub mod catalog;
pub mod home;
pub mod policy;
pub mod publish;
pub mod remote;
pub mod rollout;
pub mod server;
pub mod tokens;
