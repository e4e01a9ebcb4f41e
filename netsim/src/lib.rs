//! netsim: runs the real Stagecoach binaries as a mesh and measures it.
//!
//! The local demo ([`demo`]) of real processes ([`testbed`], [`procs`], [`datagen`]), with
//! simulated machines behind the edges ([`machines`]) and the plaintext checks of encrypted
//! bundles ([`plaintext`]); the WAN
//! relay ([`relay`]); topologies run by the real binaries behind relays ([`emulate`]); and
//! fleet-scale simulation in virtual time ([`topology`], [`simulate`], [`report`],
//! [`compare`], from the `netsim-sim` crate, which links no RocksDB). What every run of real processes shares, its work directory and Ctrl-C
//! ([`run`]), its progress display ([`progress`]) and its CPU accounting ([`cpu`]), sits in leaf
//! modules, so [`demo`] builds
//! on [`emulate`] and nothing in [`emulate`] depends on [`demo`].

pub mod console;
pub mod cpu;
pub mod datagen;
pub mod demo;
pub mod emulate;
pub mod http;
pub mod machines;
pub mod plaintext;
pub mod procs;
pub mod progress;
pub mod relay;
pub mod run;
pub mod sse;
pub mod testbed;
pub mod vm;
pub mod vmnet;

// The simulator is its own crate, so Cargo keeps RocksDB and sockets out of it.
pub use netsim_sim::{compare, report, simulate, topology};
