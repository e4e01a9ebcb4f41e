//! netsim: runs the real Stagecoach binaries as a mesh and measures it.
//!
//! Today: the local demo ([`demo`]), the process supervision it needs ([`procs`]) and the
//! deterministic trees it publishes ([`datagen`]).

pub mod datagen;
pub mod demo;
pub mod mesh;
pub mod procs;
