//! What a relay counted: snapshots for anyone ([`RelayStats`]) of the atomic counters its
//! thread writes.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use serde::Serialize;

/// Counters of one direction since the relay started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DirectionStats {
    /// Datagrams that arrived at the relay.
    pub received_datagrams: u64,
    /// Payload bytes that arrived at the relay.
    pub received_bytes: u64,
    /// Datagrams sent on after shaping.
    pub forwarded_datagrams: u64,
    /// Payload bytes sent on after shaping (UDP payload, without headers).
    pub forwarded_bytes: u64,
    /// Datagrams dropped because the queue was full.
    pub dropped_queue_datagrams: u64,
    /// Datagrams dropped by the random loss.
    pub dropped_loss_datagrams: u64,
    /// Datagrams dropped for being larger than a WAN carries ([`super::WAN_MAX_DATAGRAM_BYTES`]):
    /// QUIC's path MTU probes, which tell it to stay at Ethernet's size.
    pub dropped_oversize_datagrams: u64,
    /// Datagrams the relay failed to send (the socket refused them).
    pub send_errors: u64,
}

impl DirectionStats {
    /// Datagrams received but neither forwarded nor dropped yet: in the queue or the delay line.
    pub fn in_flight_datagrams(&self) -> u64 {
        self.received_datagrams.saturating_sub(
            self.forwarded_datagrams
                + self.dropped_queue_datagrams
                + self.dropped_loss_datagrams
                + self.dropped_oversize_datagrams
                + self.send_errors,
        )
    }
}

/// A snapshot of a relay's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RelayStats {
    /// Client → server.
    pub up: DirectionStats,
    /// Server → client.
    pub down: DirectionStats,
    /// Client mappings open now.
    pub active_clients: u64,
    /// Datagrams dropped because no mapping could be opened for their client (see
    /// [`super::MAX_CLIENTS`]).
    pub refused_datagrams: u64,
}

/// The counters behind [`RelayStats`], written by the relay thread and read by anyone.
#[derive(Debug, Default)]
pub(super) struct Counters {
    pub(super) up: Arc<DirectionCounters>,
    pub(super) down: Arc<DirectionCounters>,
    pub(super) active_clients: AtomicU64,
    pub(super) refused_datagrams: AtomicU64,
}

/// The counters of one direction, behind [`DirectionStats`].
#[derive(Debug, Default)]
pub(super) struct DirectionCounters {
    pub(super) received_datagrams: AtomicU64,
    pub(super) received_bytes: AtomicU64,
    pub(super) forwarded_datagrams: AtomicU64,
    pub(super) forwarded_bytes: AtomicU64,
    pub(super) dropped_queue_datagrams: AtomicU64,
    pub(super) dropped_loss_datagrams: AtomicU64,
    pub(super) dropped_oversize_datagrams: AtomicU64,
    pub(super) send_errors: AtomicU64,
}

impl Counters {
    pub(super) fn snapshot(&self) -> RelayStats {
        RelayStats {
            up: self.up.snapshot(),
            down: self.down.snapshot(),
            active_clients: self.active_clients.load(Relaxed),
            refused_datagrams: self.refused_datagrams.load(Relaxed),
        }
    }
}

impl DirectionCounters {
    fn snapshot(&self) -> DirectionStats {
        DirectionStats {
            received_datagrams: self.received_datagrams.load(Relaxed),
            received_bytes: self.received_bytes.load(Relaxed),
            forwarded_datagrams: self.forwarded_datagrams.load(Relaxed),
            forwarded_bytes: self.forwarded_bytes.load(Relaxed),
            dropped_queue_datagrams: self.dropped_queue_datagrams.load(Relaxed),
            dropped_loss_datagrams: self.dropped_loss_datagrams.load(Relaxed),
            dropped_oversize_datagrams: self.dropped_oversize_datagrams.load(Relaxed),
            send_errors: self.send_errors.load(Relaxed),
        }
    }
}
