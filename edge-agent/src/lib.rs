//! Stagecoach's per-machine agent.
//!
//! [`swap`] performs the crash-safe A/B operating-system swap: a pure state machine
//! ([`swap::machine`]) driven against a [`swap::Platform`] (a simulated machine or a real one
//! with ext4 slots and GRUB). [`fetch`] and [`peers`] move bundles over the mesh; [`daemon`] is
//! `edge-agent serve`, which serves the site's peers and runs fetches and swaps
//! ([`remote_swap`]) when the origin asks. [`negotiate`] reports the node's inventory and
//! holdings and asks the origin what to boot; [`capture`] builds, captures and publishes an
//! image when the origin has none for this node (brief 004). [`state`] is the edge's directory
//! (paths, the operator's configuration, `installed.json`, the running daemon's addresses).
//!
//! [`keys`] keeps the content keys of encrypted bundles the origin gives this node.
//!
//! The modules form layers, each using only those below it: [`state`], [`inventory`] and
//! [`swap`] at the bottom; then [`keys`] and [`peers`]; [`fetch`]; [`negotiate`]; [`capture`] and
//! [`remote_swap`]; and [`daemon`] at the top, which composes them.

pub mod capture;
pub mod daemon;
pub mod fetch;
pub mod inventory;
pub mod keys;
pub mod negotiate;
pub mod peers;
pub mod remote_swap;
pub mod state;
pub mod swap;
