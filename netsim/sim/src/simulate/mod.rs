//! `netsim simulate`: the fleet in virtual time, on a flow-level network model, with the real
//! download planner (`proto_core::planner`) deciding every request.
//!
//! # The model
//!
//! **Nodes.** One origin; per site its stagers and edges. The bundle is cut into pieces of
//! `bundle.piece_kib` (the last one shorter). Every stager and edge that fetches runs its own
//! `Planner` over those pieces:
//!
//! - `direct`: each edge's only source is the origin (an upstream holding everything). Stagers idle.
//! - `staged`: each stager's source is the origin; each edge's sources are its site's stagers
//!   (upstreams that hold a piece from the moment it arrives at the stager: cut-through at piece
//!   granularity).
//! - `mesh`: as `staged`, plus each edge's peers (other edges of its site, as `Peer` sources,
//!   told of each piece the moment the peer completes it). Each edge knows
//!   `mesh.peers_per_edge` peers (all other edges when the site is smaller): a seeded circulant
//!   graph, so knowing is mutual and every edge has the same number of peers. Real swarms bound
//!   the peer set the same way, and it keeps the cost per completed piece bounded.
//!
//! **Siblings.** The stagers of one site split the WAN: each piece crosses it to exactly one of
//! them, its owner by rendezvous hashing of the piece over the site's stagers
//! ([`fleet::piece_owner`]); the others copy it from the owner over the LAN once the owner holds
//! it (cut-through at piece granularity, as for edges). So a site's WAN carries one copy of the
//! bundle whatever its stagers, and each of `n` stagers pulls about `1/n` of it. Edges fetch from
//! all of the site's stagers.
//!
//! **Regions.** A region's stagers pull from the origin over the region's link and split the
//! pieces among themselves as siblings do. The stagers of a site in a region pull from the
//! region's stagers (any that holds the piece, once it holds it) over the site's WAN, instead of
//! from the origin; in `direct` regions take no part. A region with no sites still pulls, as a
//! subscribed stager does. Everything starts at t = 0, the moment the bundle is published.
//!
//! **Links**, in bytes per second, each one direction: the origin uplink (shared by everything
//! the origin sends); per site a WAN link upstream → site at `wan.mbit × (1 − loss)` (upstream is
//! the origin, or the site's region); per region a link origin → region and one region → its
//! sites, both at the region's `wan` rate (its one link, as fast up as down, shared by its
//! stagers); per node a LAN port up and a LAN port down at the site's LAN rate (`lan.node_mbit`
//! for regional stagers), and per stager a second port down that upstream pulls arrive on. No
//! bundle byte flows towards the origin, so there is no WAN up link. Paths: origin → site node is
//! uplink, site WAN, node's port down; origin → regional stager is uplink, region link, its
//! upstream port; regional stager → site stager is the region's link to its sites, site WAN, the
//! stager's upstream port; node → node (same site or region) is source's LAN up, destination's
//! LAN down. Sites never exchange bytes.
//!
//! **Protocol costs**, calibrated against `netsim emulate` (`tests/emulate.rs`): links are rated
//! in wire bytes, so WAN and uplink capacities carry bundle bytes at [`fleet::wire_efficiency`]
//! (about 95%: IPv4/UDP headers, QUIC framing, bao hashes); a node asks for nothing before
//! [`fleet::SESSION_SETUP_ROUND_TRIPS`] origin round trips (handshake, name, manifest); planners use
//! the settings of the real binaries ([`fleet::planner_config_for`]: a stager pulls 8 chunks at
//! once, an edge 4 per source, with peers 1 at a time from a stager, no endgame duplicates, a 1.5 s
//! upstream fallback), and an edge's peers learn of a piece it completed
//! [`fleet::PEER_ANNOUNCE_DELAY`] later (the tracker's round), where a stager's edges learn at once
//! (they treat it as holding everything and it forwards as groups arrive).
//!
//! **Flows.** Each request is a flow of one piece over its path. It first pays its path's round
//! trip (twice the one-way latencies: WAN plus one LAN hop from the origin, one LAN hop inside a
//! site), moving nothing, then moves bytes at its max-min fair rate (progressive filling, see
//! [`network`]) until the piece is there. Rates are recomputed whenever the set of moving flows
//! changes. Jitter is ignored (its mean is zero).
//!
//! **Loss.** A lossy WAN costs twice: its capacity shrinks to `mbit × (1 − loss)` (retransmitted
//! bytes), and each node's one connection to the origin is capped at the mean rate of a
//! congestion-controlled flow at that loss, shared by the connection's concurrent requests.
//! quinn's default controller is CUBIC, whose mean window is the larger of its cubic response
//! `1.054 × (RTT / loss)^(3/4)` segments (RFC 8312 §5.1, C = 0.4, β = 0.7) and its TCP-friendly
//! (Reno, Mathis et al.) window `sqrt(3/2) / sqrt(loss)`; the rate is that window × 1200-byte
//! segments per round trip. Without loss there is no cap. Inside a site the LAN is lossless.
//!
//! # Making it fast
//!
//! - **Components.** Flows from the origin (the WAN component), flows from one region to its
//!   sites, flows inside one region and flows inside one site (that site's LAN component) never
//!   cross a common link (a stager's upstream port keeps its WAN pulls apart from its siblings'
//!   copies), so a change recomputes only its own component's rates, and each component keeps
//!   one pending "next completion" event. A staged/mesh site's LAN therefore never waits on
//!   other sites' events.
//! - **Folding identical sites.** Sites equal in everything but the name, given the same seeds,
//!   behave identically, so one representative is simulated and its flows count `n` times on the
//!   origin uplink and on their region's link to its sites, the only links sites share. A
//!   regional stager's state does not depend on which member of a class asks it, so it serves
//!   the representative for all of them. Regions equal in everything but the name, holding the
//!   same sites up to names, fold the same way (their flows count once per member on the origin
//!   uplink), and their sites fold together; sites of regions that differ never do (see
//!   `classes`). That is exact for a fleet whose identical sites
//!   share seeds; unfolded runs seed every site differently and land within about 1% (a test
//!   checks 3%). Results say when folding was used; [`SimOptions::fold_identical_sites`] turns
//!   it off.
//! - **Pair groups.** Flows with the same source and destination share a path and so a rate: the
//!   solver sees one weighted flow per pair.
//! - **Batching.** Events at the same nanosecond are applied together before any rate is
//!   recomputed or any planner polled; a planner is polled only when it learnt something it can
//!   act on (a piece arrived, a source gained a piece it lacks and has room for, a wake-up).
//! - **Coarse pieces.** Cost grows with edges × pieces, so large fleets use large `piece_kib`.
//!
//! What is left is the LAN solve in `mesh`, about 100 ns per (source, destination) pair in flight
//! per rate change: a 500-edge mesh site with 64 pieces costs about 3 s on one core. Folded, 200
//! sites in four classes take seconds; unfolded, every distinct site pays its own.

mod classes;
mod component;
mod engine;
pub mod fleet;
pub mod network;

use std::time::Duration;

use anyhow::Result;

use crate::report::{Mode, RegionResult, RunResult, SiteResult, SiteStagers};
use crate::topology::Topology;

pub use crate::topology::Strategy;
pub use network::{max_min_rates, FlowLinks, LinkId, MaxMinSolver};

/// Most pieces one bundle may be cut into for the simulator.
pub const MAX_PIECES: u64 = 1 << 20;

/// Most points kept in a site's completion series.
pub const MAX_COMPLETION_POINTS: usize = 256;

/// Default limit on virtual time: 30 days.
pub const DEFAULT_MAX_VIRTUAL_TIME: Duration = Duration::from_secs(30 * 24 * 3600);

/// How to run a simulation.
#[derive(Clone, Debug)]
pub struct SimOptions {
    /// Seed of every planner and of the peer graphs; equal seeds give equal results.
    pub seed: u64,
    /// Simulate one representative per class of identical sites (exact; much faster).
    pub fold_identical_sites: bool,
    /// Give up (with an error) when virtual time passes this.
    pub max_virtual_time: Duration,
}

impl Default for SimOptions {
    fn default() -> Self {
        SimOptions {
            seed: 1,
            fold_identical_sites: true,
            max_virtual_time: DEFAULT_MAX_VIRTUAL_TIME,
        }
    }
}

/// Simulates `topo` under `strategy` with default options and the given seed, folding identical
/// sites. Returns every edge's completion over time and who moved how many bytes.
pub fn simulate(topo: &Topology, strategy: Strategy, seed: u64) -> Result<RunResult> {
    simulate_with(
        topo,
        strategy,
        &SimOptions {
            seed,
            ..SimOptions::default()
        },
    )
}

/// Simulates `topo` under `strategy` with explicit options.
pub fn simulate_with(
    topo: &Topology,
    strategy: Strategy,
    options: &SimOptions,
) -> Result<RunResult> {
    let bundle_bytes = topo.bundle_bytes()?;
    anyhow::ensure!(bundle_bytes > 0, "the bundle is empty: nothing to simulate");

    let classes = classes::Classes::new(topo, options.fold_identical_sites);
    let mut engine = engine::Engine::new(topo, strategy, bundle_bytes, &classes, options)?;
    let end_ns = engine.run()?;

    let mut notes = Vec::new();
    if classes.site_representatives.len() < topo.sites.len() {
        let count = classes.site_representatives.len();
        notes.push(format!(
            "{} sites simulated as {count} {} of identical sites (exact: identical sites behave \
             identically; each class's flows count once per member on the origin uplink)",
            topo.sites.len(),
            if count == 1 { "class" } else { "classes" },
        ));
    }
    if classes.region_representatives.len() < topo.regions.len() {
        let count = classes.region_representatives.len();
        notes.push(format!(
            "{} regions simulated as {count} {} of identical regions (same stagers, link and \
             sites; each class's flows count once per member on the origin uplink)",
            topo.regions.len(),
            if count == 1 { "class" } else { "classes" },
        ));
    }
    if strategy == Strategy::Mesh {
        let capped = topo
            .sites
            .iter()
            .any(|s| s.edges.saturating_sub(1) > topo.peers_per_edge);
        if capped {
            notes.push(format!(
                "each edge knows {} peers in sites larger than that (mesh.peers_per_edge)",
                topo.peers_per_edge
            ));
        }
    }
    if topo.sites.iter().any(|s| s.wan.loss > 0.0) {
        notes.push(
            "WAN loss modelled as capacity × (1 − loss) and a CUBIC/Reno loss-limited rate per origin connection"
                .to_string(),
        );
    }
    let pieces = bundle_bytes.div_ceil(topo.bundle.piece_bytes);
    notes.push(format!(
        "{pieces} pieces of {} KiB",
        topo.bundle.piece_bytes / 1024
    ));

    let mut sites = Vec::with_capacity(topo.sites.len());
    let mut site_stagers = Vec::new();
    let mut origin_egress = 0.0;
    for sim in &engine.sites {
        origin_egress += sim.origin_bytes * f64::from(sim.multiplicity);
    }
    for region in &engine.regions {
        origin_egress += region.pulled_bytes * f64::from(region.multiplicity);
    }
    let regions = topo
        .regions
        .iter()
        .zip(&classes.class_of_region)
        .map(|(topo_region, &class)| (topo_region, &engine.regions[class]))
        .map(|(topo_region, region)| RegionResult {
            name: topo_region.name.clone(),
            sites: region.sites,
            pulled_bytes: region.pulled_bytes.round() as u64,
            stager_pulled_bytes: engine.upstream_bytes(region.stager_nodes.clone()),
            served_bytes: region.served_bytes.round() as u64,
        })
        .collect();
    for (i, site) in topo.sites.iter().enumerate() {
        let sim = &engine.sites[classes.class_of_site[i]];
        if sim.stager_nodes.len() > 1 {
            site_stagers.push(SiteStagers {
                site: site.name.clone(),
                pulled_bytes: engine.upstream_bytes(sim.stager_nodes.clone()),
            });
        }
        sites.push(SiteResult {
            name: site.name.clone(),
            edges: site.edges,
            wan_bytes: sim.wan_bytes.round() as u64,
            lan_bytes: (sim.stager_egress_bytes + sim.peer_bytes).round() as u64,
            stager_egress_bytes: sim.stager_egress_bytes.round() as u64,
            peer_bytes: sim.peer_bytes.round() as u64,
            edges_done: sim.edges_done,
            done_s: sim.done_ns.map(|ns| ns as f64 / 1e9),
            completion: downsample(&sim.completion, MAX_COMPLETION_POINTS),
            edge_done_s: Vec::new(),
        });
    }
    Ok(RunResult {
        topology: topo.name.clone(),
        strategy,
        mode: Mode::Simulate,
        bundle_bytes,
        all_edges_done_s: Some(end_ns as f64 / 1e9),
        line_rate_floor_s: topo.line_rate_floor_s(bundle_bytes),
        origin_egress_bytes: origin_egress.round() as u64,
        sites,
        regions,
        site_stagers,
        notes,
    })
}

/// Keeps at most about `max_points` points of a completion series: the first point at or past
/// each `1 / max_points` step of the fraction, and always the last point.
fn downsample(points: &[(f64, f64)], max_points: usize) -> Vec<(f64, f64)> {
    if points.len() <= max_points {
        return points.to_vec();
    }
    let steps = (max_points - 1) as f64;
    let mut out = Vec::with_capacity(max_points + 1);
    let mut last_bucket = -1.0;
    for (i, &(t, fraction)) in points.iter().enumerate() {
        let bucket = (fraction * steps).floor();
        if bucket > last_bucket || i + 1 == points.len() {
            out.push((t, fraction));
            last_bucket = bucket;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::fleet::{loss_limited_rate, peer_graph};
    use super::*;

    #[test]
    fn peer_graph_is_mutual_and_regular() {
        for (edges, k) in [(10, 4), (11, 5), (12, 5), (500, 16), (4, 16), (2, 1)] {
            let graph = peer_graph(edges, k, 7);
            let expected = if k >= edges - 1 {
                edges - 1
            } else if k % 2 == 1 && edges % 2 == 1 {
                k - 1
            } else {
                k
            };
            for (i, peers) in graph.iter().enumerate() {
                assert_eq!(peers.len() as u32, expected, "edges {edges}, k {k}");
                for &p in peers {
                    assert_ne!(p as usize, i);
                    assert!(graph[p as usize].contains(&(i as u32)));
                }
                let mut unique = peers.clone();
                unique.sort_unstable();
                unique.dedup();
                assert_eq!(unique.len(), peers.len());
            }
        }
    }

    #[test]
    fn piece_owners_spread_evenly_and_move_only_when_their_stager_leaves() {
        use super::fleet::piece_owner;
        let pieces = 4096u32;
        for stagers in 2..=5u32 {
            let mut owned = vec![0u32; stagers as usize];
            for piece in 0..pieces {
                let owner = piece_owner(stagers, piece);
                owned[owner as usize] += 1;
                // Without the last stager, its pieces move and no other piece does.
                let without_last = piece_owner(stagers - 1, piece);
                if owner != stagers - 1 {
                    assert_eq!(without_last, owner, "{stagers} stagers, piece {piece}");
                }
            }
            let fair = f64::from(pieces) / f64::from(stagers);
            for &count in &owned {
                assert!((f64::from(count) - fair).abs() < 0.1 * fair, "{owned:?}");
            }
        }
        assert!((0..pieces).all(|piece| piece_owner(1, piece) == 0));
    }

    #[test]
    fn loss_limited_rate_is_cubic_on_long_paths_and_reno_on_short_ones() {
        assert_eq!(loss_limited_rate(0.0, 0.1), f64::INFINITY);
        // 240 ms, 1e-4: CUBIC's window 1.054 × 2400^0.75 ≈ 363 segments beats Reno's 122.
        let long = loss_limited_rate(1e-4, 0.24);
        assert!((long - 363.4 * 1200.0 / 0.24).abs() < 0.01 * long, "{long}");
        // 2 ms, 1e-2: Reno's 12.2 segments beat CUBIC's 0.6.
        let short = loss_limited_rate(1e-2, 0.002);
        assert!(
            (short - 12.247 * 1200.0 / 0.002).abs() < 0.01 * short,
            "{short}"
        );
    }

    #[test]
    fn downsample_keeps_ends() {
        let points: Vec<(f64, f64)> = (0..=1000).map(|i| (i as f64, i as f64 / 1000.0)).collect();
        let out = downsample(&points, 100);
        assert!(out.len() <= 101);
        assert_eq!(out.first(), points.first());
        assert_eq!(out.last(), points.last());
    }

    #[test]
    fn the_simulator_crate_depends_on_no_io_crate() {
        // Cargo keeps `proto` (RocksDB, quinn) and any runtime out of this crate as long as its
        // manifest does not name them; this test fails the day someone adds one.
        let manifest = include_str!("../../Cargo.toml");
        let dependencies = manifest
            .split("[dependencies]")
            .nth(1)
            .and_then(|rest| rest.split("\n[").next())
            .unwrap_or_default();
        for forbidden in [
            "proto.", "proto =", "rocksdb", "tokio", "quinn", "libc", "netsim",
        ] {
            let named = dependencies
                .lines()
                .map(str::trim_start)
                .any(|line| line.starts_with(forbidden));
            assert!(!named, "netsim-sim must not depend on {forbidden}");
        }
        assert!(dependencies.contains("proto-core"), "{dependencies}");
    }
}
