//! How the fleet is laid out: peer graphs, seeds, planner settings, loss-limited rates.

use std::time::Duration;

use proto::planner::PlannerConfig;

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

/// proto's planner defaults with the topology's overrides.
pub(super) fn planner_config(topo: &Topology) -> PlannerConfig {
    let mut config = PlannerConfig::default();
    if let Some(n) = topo.planner.max_in_flight_per_source {
        config.max_in_flight_per_source = n;
    }
    if let Some(n) = topo.planner.endgame_max_duplicates {
        config.endgame_max_duplicates = n;
    }
    if let Some(ms) = topo.planner.seed_fallback_ms {
        config.seed_fallback_after = Duration::from_secs_f64(ms / 1000.0);
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

/// SplitMix64's finaliser: a well-spread 64-bit hash.
pub(super) fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}
