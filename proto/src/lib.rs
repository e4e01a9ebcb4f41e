//! Stagecoach core: everything every node links.
//!
//! The pure modules (no tokio, no sockets, no filesystem) live in the `proto-core` crate and are
//! re-exported here under their usual paths: [`hash`], [`codec`], [`manifest`], [`verify`],
//! [`chunking`], [`wire`], [`planner`] (which source to ask for which piece), [`inventory`]
//! (the facts a node reports). [`version`] (the one ordering of bundle versions) is pure too.
//! I/O modules: [`pack`] (reads and writes trees), [`store`] (blob store on disk), [`publish`]
//! (pack, upload and publish with publisher rights), [`durable`] (the one atomic, fsynced file
//! replacement), [`keyring`] (key rings on disk), [`retry`] (the one bounded retry loop with backoff and jitter),
//! [`retention`] (which bundles a store keeps, and the garbage collector).

pub mod bundles;
pub mod durable;
pub mod keyring;
pub mod metrics;
pub mod net;
pub mod pack;
pub mod publish;
pub mod retention;
pub mod retry;
pub mod store;
pub mod transfer;
pub mod version;

pub use proto_core::{
    bounds, chunking, codec, hash, inventory, keys, manifest, planner, role, seal, verify, wire,
};
pub use proto_core::{BlobHash, BundleId, BundleKind, Manifest, SignedManifest};
