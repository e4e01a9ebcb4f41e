//! netsim: runs the real Stagecoach binaries as a mesh and measures it.
//!
//! The local demo ([`demo`]) of real processes ([`mesh`], [`procs`], [`datagen`]), with
//! simulated machines behind the edges ([`machines`]); the WAN
//! relay ([`relay`]); topologies run by the real binaries behind relays ([`emulate`]); and
//! fleet-scale simulation in virtual time ([`topology`], [`simulate`], [`report`],
//! [`compare`]). What every run of real processes shares, its work directory and Ctrl-C
//! ([`run`]) and its progress display ([`progress`]), sits in leaf modules, so [`demo`] builds
//! on [`emulate`] and nothing in [`emulate`] depends on [`demo`].

pub mod compare;
pub mod datagen;
pub mod demo;
pub mod emulate;
pub mod machines;
pub mod procs;
pub mod progress;
pub mod relay;
pub mod report;
pub mod run;
pub mod simulate;
pub mod testbed;
pub mod topology;
