//! netsim: runs the real Stagecoach binaries as a mesh and measures it.
//!
//! The local demo ([`demo`]) of real processes ([`mesh`], [`procs`], [`datagen`]), with
//! simulated machines behind the edges ([`machines`]); the WAN
//! relay ([`relay`]); topologies run by the real binaries behind relays ([`emulate`]); and
//! fleet-scale simulation in virtual time ([`topology`], [`simulate`], [`report`],
//! [`compare`]).

pub mod compare;
pub mod datagen;
pub mod demo;
pub mod emulate;
pub mod machines;
pub mod mesh;
pub mod procs;
pub mod relay;
pub mod report;
pub mod simulate;
pub mod topology;
