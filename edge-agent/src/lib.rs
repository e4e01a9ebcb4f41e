//! Stagecoach's per-machine agent.
//!
//! [`swap`] performs the crash-safe A/B operating-system swap: a pure state machine
//! ([`swap::machine`]) driven against a [`swap::Platform`] (a simulated machine or a real one
//! with ext4 slots and GRUB). The mesh (enrolment, fetching and serving bundles) comes next.

pub mod daemon;
pub mod fetch;
pub mod inventory;
pub mod peers;
pub mod swap;
