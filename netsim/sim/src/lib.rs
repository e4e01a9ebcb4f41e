//! Stagecoach's fleet simulator, in virtual time: [`topology`] (what a fleet is: sites, links,
//! edges, strategies), [`simulate`] (the discrete-event simulation, with the real download
//! planner of `proto_core` deciding every request), [`report`] (results, tables and charts) and
//! [`compare`] (strategies side by side).
//!
//! Cargo enforces what the simulator may need: `proto-core` and plain data crates, never `proto`
//! (RocksDB, quinn) or an async runtime. `netsim` re-exports these modules under its own name
//! and adds what runs real processes.

pub mod compare;
pub mod report;
pub mod simulate;
pub mod topology;

/// Bytes of IPv4 and UDP headers around each datagram: what a link carries beyond the payload.
pub const IPV4_UDP_HEADER_BYTES: usize = 28;
