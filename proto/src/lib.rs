//! Stagecoach core: everything every node links.
//!
//! Pure modules (no tokio, no sockets, no filesystem): [`hash`], [`codec`], [`manifest`],
//! [`verify`], [`chunking`], [`wire`], [`planner`] (which source to ask for which piece),
//! [`inventory`] (the facts a node reports), [`version`] (the one ordering of bundle versions).
//! I/O modules: [`pack`] (reads and writes trees), [`store`] (blob store on disk), [`publish`]
//! (pack, upload and publish with publisher rights), [`durable`] (the one atomic, fsynced file
//! replacement), [`retry`] (the one bounded retry loop with backoff and jitter),
//! [`retention`] (which bundles a store keeps, and the garbage collector).

pub mod bundles;
pub mod chunking;
pub mod codec;
pub mod durable;
pub mod hash;
pub mod inventory;
pub mod manifest;
pub mod mesh;
pub mod metrics;
pub mod net;
pub mod pack;
pub mod planner;
pub mod publish;
pub mod retry;
pub mod retention;
pub mod store;
pub mod verify;
pub mod version;
pub mod wire;

pub use hash::BlobHash;
pub use manifest::{BundleId, BundleKind, Manifest, SignedManifest};
