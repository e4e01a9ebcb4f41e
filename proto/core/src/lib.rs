//! Stagecoach's pure core: the modules every node and the simulator share, with no I/O.
//!
//! Nothing here touches a file, a socket, a clock or an async runtime: every function takes
//! bytes or values and returns bytes or values, so tests and `netsim`'s simulator can drive it
//! in virtual time. Cargo enforces the line: this crate depends on no tokio, quinn, rustls,
//! rocksdb or libc, and `tests/purity.rs` refuses `std::fs`, `std::net` and `File::` in its
//! source.
//!
//! - [`hash`]: [`BlobHash`], the BLAKE3 name of every blob.
//! - [`codec`]: the only module that knows bincode; bounded decoding.
//! - [`manifest`]: bundle manifests, signatures and ids.
//! - [`verify`]: bao-tree outboards, range encoding and a sans-IO streaming decoder.
//! - [`chunking`]: FastCDC parameters and a push-style chunker.
//! - [`wire`]: request/response messages and length-prefixed frames.
//! - [`planner`]: which source to ask for which piece.
//! - [`inventory`]: the facts a node reports.
//! - [`keys`]: content keys of encrypted bundles, by generation ([`keys::KeyRing`]).
//! - [`role`]: what a node does in the mesh ([`Role`]), as its certificate says.
//! - [`bounds`]: bounded deserializers for the variable-length fields of untrusted messages; a
//!   leaf that [`wire`] and [`inventory`] share.

pub mod bounds;
pub mod chunking;
pub mod codec;
pub mod hash;
pub mod inventory;
pub mod keys;
pub mod manifest;
pub mod planner;
pub mod role;
pub mod seal;
pub mod verify;
pub mod wire;

pub use hash::BlobHash;
pub use manifest::{BundleId, BundleKind, Manifest, SignedManifest};
pub use role::Role;
