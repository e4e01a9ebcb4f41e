//! The origin: certificate authority, publisher and the source of every bundle.
//!
//! - [`home`]: the origin's directory (CA, keys, identities, store, catalog).
//! - [`catalog`]: published bundles in order, with sequence numbers for subscribers.
//! - [`tokens`]: one-time enrollment secrets.
//! - [`server`]: `origin serve` (mesh and enrollment endpoints).
//! - [`publish`]: `origin publish` (pack, upload, publish).
//! - [`remote`]: `origin swap` (commands to edge daemons over mutual TLS).
//! - [`policy`]: which bundle a node should run.
//! - [`rollout`]: canary-first rollouts: the pure [`rollout::plan`] (waves, halt rules), the
//!   [`rollout::driver`] that carries one out through a fleet, and the [`rollout::service`]
//!   behind `origin rollout ...` (remote swaps, saved in `rollout.json`).
//! - [`db`]: the control plane's RocksDB (nodes, packages, classes, overrides, policy, audit,
//!   revoked nodes, prepare operations).
//! - [`control`]: node reports, boot negotiation ([`negotiate`]) and the operator's commands,
//!   server side; [`admin`]: the same commands, client side; [`policy_file`]: the TOML policy.
//! - [`keep`]: keep-sets, which bundles each node and each site's stagers must keep.
//! - [`console`]: the web console (`origin serve --console`); [`accounts`]: its accounts'
//!   names, passwords and Argon2id hashes (`origin admin add`).

pub mod accounts;
pub mod admin;
pub mod catalog;
pub mod console;
pub mod control;
pub mod db;
pub mod home;
pub mod join;
pub mod keep;
pub mod keys;
pub mod negotiate;
pub mod policy;
pub mod policy_file;
pub mod publish;
pub mod remote;
pub mod replicate;
pub mod rollout;
pub mod server;
pub mod stagers;
pub mod tokens;
