//! Building the fleet: nodes, links, planners and who announces pieces to whom.

use anyhow::{bail, Result};
use proto_core::planner::{Planner, PlannerConfig, SourceKind};

use super::*;
use crate::simulate::fleet::{
    loss_limited_rate, mix, peer_graph, planner_config_for, wire_efficiency, Downloader,
    PEER_ANNOUNCE_DELAY, SESSION_SETUP_ROUND_TRIPS,
};
use crate::simulate::{SimOptions, MAX_PIECES};
use crate::topology::{Site, Topology};

impl Engine {
    /// Builds the fleet: `representatives[i]` is simulated once, standing for
    /// `multiplicities[i]` identical sites.
    pub fn new(
        topo: &Topology,
        strategy: Strategy,
        bundle_bytes: u64,
        representatives: &[usize],
        multiplicities: &[u32],
        options: &SimOptions,
    ) -> Result<Engine> {
        let piece_bytes = topo.bundle.piece_bytes;
        let pieces = bundle_bytes.div_ceil(piece_bytes);
        if pieces > MAX_PIECES {
            bail!(
                "the bundle has {pieces} pieces of {} KiB, more than the simulator's limit of {}: \
                 raise bundle.piece_kib",
                piece_bytes / 1024,
                MAX_PIECES
            );
        }
        let piece_sizes: Vec<u64> = (0..pieces)
            .map(|p| piece_bytes.min(bundle_bytes - p * piece_bytes))
            .collect();
        let configs = PlannerConfigs {
            stager: planner_config_for(topo, Downloader::Stager),
            edge: planner_config_for(
                topo,
                Downloader::Edge {
                    with_peers: strategy == Strategy::Mesh,
                },
            ),
        };
        // The most any planner keeps in flight at one source: gates re-polls on announcements.
        let max_in_flight_per_source = configs
            .stager
            .max_in_flight_per_source
            .max(configs.edge.max_in_flight_per_source);

        let mut engine = Engine {
            strategy,
            piece_sizes,
            max_in_flight_per_source,
            now_ns: 0,
            max_ns: duration_ns(options.max_virtual_time),
            nodes: Vec::new(),
            sites: Vec::new(),
            capacities: vec![topo.origin_uplink_bytes_per_s() * wire_efficiency()],
            components: vec![Component::default()],
            flows: Vec::new(),
            free_flows: Vec::new(),
            events: BinaryHeap::new(),
            seq: 0,
            events_handled: 0,
            dirty: Vec::new(),
            to_poll: Vec::new(),
            edges_left: 0,
            solver: MaxMinSolver::default(),
            solver_flows: Vec::new(),
            rates: Vec::new(),
            peer_announce_delay_ns: duration_ns(PEER_ANNOUNCE_DELAY),
        };
        engine.nodes.push(Node {
            site: u32::MAX,
            role: Role::Origin,
            up_link: UPLINK,
            down_link: UPLINK,
            planner: None,
            subscribers: Vec::new(),
            downloads: Vec::new(),
            holds: Vec::new(),
            needs_poll: false,
            wakeup_ns: u64::MAX,
            done: true,
        });
        for (&topo_index, &multiplicity) in representatives.iter().zip(multiplicities) {
            engine.add_site(topo, topo_index, multiplicity, &configs, options.seed);
        }
        Ok(engine)
    }

    fn add_site(
        &mut self,
        topo: &Topology,
        topo_index: usize,
        multiplicity: u32,
        configs: &PlannerConfigs,
        seed: u64,
    ) {
        let site: &Site = &topo.sites[topo_index];
        let site_id = self.sites.len() as u32;
        let wan_link = self.add_link(site.wan_goodput_bytes_per_s() * wire_efficiency());
        let lan_component = self.components.len() as u32;
        self.components.push(Component::default());
        let lan = site.lan_bytes_per_s();
        let origin_rtt_s = topo.origin_rtt_s(site);
        let connection_cap = loss_limited_rate(site.wan.loss, origin_rtt_s);
        let pieces = self.piece_sizes.len();
        let new_node = |engine: &mut Engine, role: Role| -> u32 {
            let up_link = engine.add_link(lan);
            let down_link = engine.add_link(lan);
            let id = engine.nodes.len() as u32;
            engine.nodes.push(Node {
                site: site_id,
                role,
                up_link,
                down_link,
                planner: None,
                subscribers: Vec::new(),
                downloads: Vec::new(),
                holds: vec![false; pieces],
                needs_poll: false,
                wakeup_ns: u64::MAX,
                done: false,
            });
            id
        };
        let first_stager = self.nodes.len() as u32;
        for _ in 0..site.stagers {
            new_node(self, Role::Stager);
        }
        let first_edge = self.nodes.len() as u32;
        for _ in 0..site.edges {
            new_node(self, Role::Edge);
        }
        let stagers = first_stager..first_edge;
        let edges = first_edge..self.nodes.len() as u32;
        self.edges_left += u64::from(site.edges);

        // Seeds differ per site and node so sites do not move in lockstep; a folded class uses
        // its representative's.
        let site_seed = mix(seed ^ (topo_index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let planner_for = |node: u32, config: &PlannerConfig| {
            Planner::new(
                self.piece_sizes.clone(),
                &[],
                config.clone(),
                mix(site_seed ^ u64::from(node)),
            )
        };
        let mut planners: Vec<(u32, Planner)> = Vec::new();
        match self.strategy {
            Strategy::Direct => {
                for edge in edges.clone() {
                    let mut planner = planner_for(edge, &configs.edge);
                    planner.add_source(ORIGIN, SourceKind::Upstream);
                    planner.source_has_all(ORIGIN);
                    planners.push((edge, planner));
                }
            }
            Strategy::Staged | Strategy::Mesh => {
                for stager in stagers.clone() {
                    let mut planner = planner_for(stager, &configs.stager);
                    planner.add_source(ORIGIN, SourceKind::Upstream);
                    planner.source_has_all(ORIGIN);
                    planners.push((stager, planner));
                }
                let neighbours = if self.strategy == Strategy::Mesh {
                    peer_graph(site.edges, topo.peers_per_edge, site_seed)
                } else {
                    vec![Vec::new(); site.edges as usize]
                };
                for (i, edge) in edges.clone().enumerate() {
                    let mut planner = planner_for(edge, &configs.edge);
                    for stager in stagers.clone() {
                        planner.add_source(stager, SourceKind::Upstream);
                    }
                    for &peer in &neighbours[i] {
                        planner.add_source(first_edge + peer, SourceKind::Peer);
                    }
                    planners.push((edge, planner));
                }
                for stager in stagers.clone() {
                    self.nodes[stager as usize].subscribers = edges.clone().collect();
                }
                for (i, edge) in edges.clone().enumerate() {
                    self.nodes[edge as usize].subscribers =
                        neighbours[i].iter().map(|&p| first_edge + p).collect();
                }
            }
        }
        for (node, planner) in planners {
            self.nodes[node as usize].planner = Some(planner);
            // Nothing is requested before the session is set up.
            let setup_ns = u64::from(SESSION_SETUP_ROUND_TRIPS) * seconds_ns(origin_rtt_s);
            if setup_ns == 0 {
                self.mark_poll(node);
            } else {
                self.nodes[node as usize].wakeup_ns = setup_ns;
                self.push_event(setup_ns, EventKind::Wakeup { node });
            }
        }
        if self.strategy == Strategy::Direct {
            // Stagers take no part; they count as done so nothing waits on them.
            for stager in stagers.clone() {
                self.nodes[stager as usize].done = true;
            }
        }
        self.sites.push(SimSite {
            multiplicity,
            wan_link,
            lan_component,
            edge_nodes: edges,
            origin_rtt_ns: seconds_ns(origin_rtt_s),
            lan_rtt_ns: seconds_ns(topo.lan_rtt_s()),
            connection_cap,
            wan_bytes: 0.0,
            stager_egress_bytes: 0.0,
            peer_bytes: 0.0,
            edges_done: 0,
            completion: vec![(0.0, 0.0)],
            done_ns: None,
        });
    }
}

/// The planner settings of each kind of downloader in one run.
struct PlannerConfigs {
    stager: PlannerConfig,
    edge: PlannerConfig,
}
