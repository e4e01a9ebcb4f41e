//! How the fleet is laid out: peer graphs, seeds, planner settings, loss-limited rates.

use std::time::Duration;

use proto_core::planner::PlannerConfig;

use crate::topology::Topology;

/// Segment size for the loss-limited rate of one connection (QUIC's minimum datagram), bytes.
const MSS_BYTES: f64 = 1200.0;

/// Reno's (and CUBIC's TCP-friendly) mean window is `sqrt(3/2) / sqrt(loss)` segments
/// (Mathis et al. 1997).
const RENO_WINDOW_FACTOR: f64 = 1.224_744_871_391_589;

/// CUBIC's mean window is `(C (3 + β) / (4 (1 − β)))^(1/4) × (RTT / loss)^(3/4)` segments
/// (RFC 8312 §5.1); with quinn's C = 0.4 and β = 0.7 the factor is 1.054.
const CUBIC_WINDOW_FACTOR: f64 = 1.053_828_931_372_25;

/// The mean rate one CUBIC connection sustains at `loss` over a round trip of `rtt_s`, in
/// bytes/s: the larger of CUBIC's and Reno's mean windows, per round trip. Infinite without loss.
pub(super) fn loss_limited_rate(loss: f64, rtt_s: f64) -> f64 {
    if loss <= 0.0 || rtt_s <= 0.0 {
        return f64::INFINITY;
    }
    let reno = RENO_WINDOW_FACTOR / loss.sqrt();
    let cubic = CUBIC_WINDOW_FACTOR * (rtt_s / loss).powf(0.75);
    reno.max(cubic) * MSS_BYTES / rtt_s
}

/// Largest QUIC datagram quinn sends once path MTU discovery has run (its default upper bound),
/// in bytes of UDP payload.
pub const QUIC_DATAGRAM_BYTES: f64 = 1452.0;

/// QUIC's cost inside each full datagram, in bytes: a short header (1 byte of flags, an 8-byte
/// connection id, a packet number of up to 4 bytes), the 16-byte AEAD tag, and a STREAM frame's
/// header (about 6 bytes).
pub const QUIC_PACKET_OVERHEAD_BYTES: f64 = 35.0;

/// Bytes of bao-tree hashes that travel with each verified 16 KiB group: one parent node (two
/// 32-byte hashes) per group.
pub const BAO_BYTES_PER_GROUP: f64 = 64.0;

/// Bytes of one verification group.
pub const GROUP_BYTES: f64 = 16.0 * 1024.0;

/// Bundle bytes per byte on a WAN link: links are rated in wire bytes (IPv4 + UDP headers
/// included, as netsim's relay and routers count them), and each full datagram also carries
/// QUIC's framing and, per 16 KiB group, its bao hashes. About 0.954.
pub fn wire_efficiency() -> f64 {
    let per_datagram = (QUIC_DATAGRAM_BYTES - QUIC_PACKET_OVERHEAD_BYTES)
        / (QUIC_DATAGRAM_BYTES + crate::IPV4_UDP_HEADER_BYTES as f64);
    per_datagram * GROUP_BYTES / (GROUP_BYTES + BAO_BYTES_PER_GROUP)
}

/// Round trips to the origin before a node's first piece request: the QUIC handshake (TLS 1.3
/// in one round trip), resolving the bundle's name, and fetching its manifest (an edge's comes
/// through its stager from the origin).
pub const SESSION_SETUP_ROUND_TRIPS: u32 = 3;

/// Chunk requests an edge keeps in flight at one source: edge-agent's
/// `peers::download::MAX_IN_FLIGHT_PER_SOURCE`.
pub const EDGE_MAX_IN_FLIGHT_PER_SOURCE: u32 = 4;

/// Chunk requests an edge with peers keeps in flight at a stager: edge-agent's
/// `peers::download::MAX_IN_FLIGHT_PER_STAGER_WITH_PEERS`.
pub const EDGE_MAX_IN_FLIGHT_PER_STAGER_WITH_PEERS: u32 = 1;

/// How long a piece held by busy peers waits before an edge asks a stager: edge-agent's
/// `peers::download::STAGER_FALLBACK_AFTER`.
pub const EDGE_STAGER_FALLBACK_AFTER: Duration = Duration::from_millis(1500);

/// Extra copies of a piece an edge requests in the endgame: none, since edge-agent keeps one
/// writer per blob in its store.
pub const EDGE_ENDGAME_MAX_DUPLICATES: u32 = 0;

/// Chunks a stager pulls from the origin at once: stager's `node::PREHEAT_CONCURRENCY`.
pub const STAGER_UPSTREAM_CONCURRENCY: u32 = 8;

/// How long after an edge completes a piece its peers know it: edge-agent reports its holdings
/// to the stager's tracker and learns the site's once per `peers::TRACKER_INTERVAL` (300 ms),
/// so a holder's report waits half an interval on average and the learner's poll another half.
pub const PEER_ANNOUNCE_DELAY: Duration = Duration::from_millis(300);

/// Which node a planner runs on, for [`planner_config_for`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Downloader {
    /// A stager pulling from the origin.
    Stager,
    /// An edge; `with_peers` in `mesh`.
    Edge { with_peers: bool },
}

/// The planner settings the real binaries use for `who`, with the topology's overrides on top.
pub fn planner_config_for(topo: &Topology, who: Downloader) -> PlannerConfig {
    let mut config = PlannerConfig::default();
    match who {
        Downloader::Stager => {
            config.max_in_flight_per_source = STAGER_UPSTREAM_CONCURRENCY;
        }
        Downloader::Edge { with_peers } => {
            config.max_in_flight_per_source = EDGE_MAX_IN_FLIGHT_PER_SOURCE;
            config.max_in_flight_per_upstream =
                with_peers.then_some(EDGE_MAX_IN_FLIGHT_PER_STAGER_WITH_PEERS);
            config.endgame_max_duplicates = EDGE_ENDGAME_MAX_DUPLICATES;
            config.upstream_fallback_after = EDGE_STAGER_FALLBACK_AFTER;
        }
    }
    apply_overrides(topo, config)
}

fn apply_overrides(topo: &Topology, mut config: PlannerConfig) -> PlannerConfig {
    if let Some(n) = topo.planner.max_in_flight_per_source {
        config.max_in_flight_per_source = n;
    }
    if let Some(n) = topo.planner.endgame_max_duplicates {
        config.endgame_max_duplicates = n;
    }
    if let Some(ms) = topo.planner.upstream_fallback_ms {
        config.upstream_fallback_after = Duration::from_secs_f64(ms / 1000.0);
    }
    config
}

/// Each edge's peers (indices within the site): a circulant graph over a seeded shuffle, so
/// every edge has the same number of peers and knowing is mutual. With `peers_per_edge` at least
/// `edges - 1` every edge knows every other; otherwise each knows its `peers_per_edge / 2`
/// neighbours on either side of the shuffled ring (plus the opposite one when the count is odd
/// and the ring even).
pub(super) fn peer_graph(edges: u32, peers_per_edge: u32, seed: u64) -> Vec<Vec<u32>> {
    let n = edges as usize;
    if peers_per_edge as usize >= n.saturating_sub(1) {
        return (0..edges)
            .map(|i| (0..edges).filter(|&j| j != i).collect())
            .collect();
    }
    let mut ring: Vec<u32> = (0..edges).collect();
    let mut state = seed;
    for i in (1..n).rev() {
        state = mix(state.wrapping_add(i as u64));
        ring.swap(i, (state % (i as u64 + 1)) as usize);
    }
    let half = peers_per_edge as usize / 2;
    let opposite = peers_per_edge % 2 == 1 && n.is_multiple_of(2);
    let mut peers = vec![Vec::with_capacity(peers_per_edge as usize); n];
    for pos in 0..n {
        let me = ring[pos] as usize;
        for offset in 1..=half {
            peers[me].push(ring[(pos + offset) % n]);
            peers[me].push(ring[(pos + n - offset) % n]);
        }
        if opposite {
            peers[me].push(ring[(pos + n / 2) % n]);
        }
    }
    peers
}

/// Which of `stagers` siblings (by rank, `0..stagers`) pulls `piece` across the WAN:
/// rendezvous hashing, the highest score of (piece, rank) wins. Each piece has exactly one
/// owner, pieces spread evenly, and losing a sibling moves only the pieces it owned.
pub fn piece_owner(stagers: u32, piece: u32) -> u32 {
    if stagers <= 1 {
        return 0;
    }
    let score = |rank: u32| mix((u64::from(piece) << 32) | u64::from(rank));
    (0..stagers).max_by_key(|&rank| score(rank)).unwrap_or(0)
}

/// SplitMix64's finaliser: a well-spread 64-bit hash.
pub(super) fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}
