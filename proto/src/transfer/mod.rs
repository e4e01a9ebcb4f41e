//! The mesh protocol on top of [`crate::net`]: serving blobs from a [`Store`] and fetching them
//! into one, verified group by group. Shared by the origin, the stager and the edge agent.
//!
//! - [`serve`]: answering `GetBlob` from a store, including the cut-through case where the blob
//!   is still arriving from upstream.
//! - [`pace`]: the upload rate limit shared by every answer of a node.
//! - [`fetch`]: asking a connection for manifests and blobs and writing only verified groups.

pub mod fetch;
pub mod pace;
pub mod serve;
pub mod server;

use std::sync::Arc;

use crate::metrics::{Counter, Metrics};

/// Counter names shared by every daemon.
pub mod names {
    /// Bytes sent, labelled by `peer_role` and `peer_site`.
    pub const BYTES_SENT: &str = "stagecoach_bytes_sent_total";
    /// Bytes received, labelled by `peer_role` and `peer_site`.
    pub const BYTES_RECEIVED: &str = "stagecoach_bytes_received_total";
    /// Requests served, labelled by `kind`.
    pub const REQUESTS: &str = "stagecoach_requests_total";
    /// Streams whose data failed verification, labelled by `peer_role`.
    pub const VERIFY_FAILURES: &str = "stagecoach_verify_failures_total";
    /// Streams refused for malformed or oversized frames.
    pub const BAD_FRAMES: &str = "stagecoach_bad_frames_total";
    /// Requests refused because the peer's role may not make them.
    pub const FORBIDDEN: &str = "stagecoach_forbidden_total";
}

/// Byte counters for one direction of traffic with one kind of peer.
#[derive(Clone, Debug)]
pub struct PeerCounters {
    /// Bytes sent to the peer.
    pub sent: Counter,
    /// Bytes received from the peer.
    pub received: Counter,
    /// Verification failures on data from the peer.
    pub verify_failures: Counter,
}

impl PeerCounters {
    /// The counters for peers of `role` in `site`.
    pub fn new(metrics: &Arc<Metrics>, role: &str, site: &str) -> Self {
        let labels = [("peer_role", role), ("peer_site", site)];
        PeerCounters {
            sent: metrics.counter(names::BYTES_SENT, "Bytes sent to peers", &labels),
            received: metrics.counter(names::BYTES_RECEIVED, "Bytes received from peers", &labels),
            verify_failures: metrics.counter(
                names::VERIFY_FAILURES,
                "Responses rejected because a 16 KiB group or tree entry did not verify",
                &[("peer_role", role)],
            ),
        }
    }

    /// Counters that count nowhere (for tools that keep no metrics).
    pub fn detached() -> Self {
        PeerCounters {
            sent: Counter::default(),
            received: Counter::default(),
            verify_failures: Counter::default(),
        }
    }
}
