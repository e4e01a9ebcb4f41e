//! Building the fleet: nodes, links, planners and who announces pieces to whom.

use anyhow::{bail, Result};
use proto_core::planner::{Planner, PlannerConfig, SourceKind};

use super::*;
use crate::simulate::classes::Classes;
use crate::simulate::fleet::{
    loss_limited_rate, mix, peer_graph, planner_config_for, wire_efficiency, Downloader,
    PEER_ANNOUNCE_DELAY, SESSION_SETUP_ROUND_TRIPS,
};
use crate::simulate::{SimOptions, MAX_PIECES};
use crate::topology::{mbit_to_bytes_per_s, Region, Site, Topology};

/// The golden-ratio multiplier that spreads indices before mixing them into seeds.
const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// Mixed into the seed of regional stagers' planners, so they differ from sites' nodes.
const REGION_SEED_SALT: u64 = 0x5245_4749_4f4e;

impl Engine {
    /// Builds the fleet: each class's representative site and region is simulated once,
    /// standing for its members.
    pub fn new(
        topo: &Topology,
        strategy: Strategy,
        bundle_bytes: u64,
        classes: &Classes,
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
            regions: Vec::new(),
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
        engine.push_node(Role::Origin, u32::MAX, UPLINK, UPLINK);
        engine.nodes[ORIGIN as usize].done = true;
        engine.nodes[ORIGIN as usize].holds = Vec::new();
        for (&topo_index, &members) in classes
            .region_representatives
            .iter()
            .zip(&classes.region_members)
        {
            engine.add_region(topo, topo_index, members, &configs, options.seed);
        }
        for (class, &topo_index) in classes.site_representatives.iter().enumerate() {
            let multiplicity = Multiplicity {
                total: classes.site_members[class],
                per_region: classes.site_members_per_region(topo, class),
            };
            let region = topo.sites[topo_index]
                .region
                .as_deref()
                .and_then(|name| topo.regions.iter().position(|r| r.name == name))
                .map(|r| classes.class_of_region[r] as u32);
            engine.add_site(
                topo,
                topo_index,
                region,
                multiplicity,
                &configs,
                options.seed,
            );
        }
        Ok(engine)
    }

    /// Adds a node holding nothing, with its links, and returns its id.
    fn push_node(&mut self, role: Role, site: u32, up_link: LinkId, down_link: LinkId) -> u32 {
        let id = self.nodes.len() as u32;
        self.nodes.push(Node {
            site,
            region: u32::MAX,
            role,
            up_link,
            down_link,
            upstream_link: down_link,
            siblings: 0..0,
            upstream_bytes: 0.0,
            planner: None,
            subscribers: Vec::new(),
            downloads: Vec::new(),
            holds: vec![false; self.piece_sizes.len()],
            needs_poll: false,
            wakeup_ns: u64::MAX,
            done: false,
        });
        id
    }

    /// Adds `count` stagers at a LAN rate of `lan` bytes/s, siblings of each other, each with
    /// its own upstream port; returns their ids.
    fn push_stagers(&mut self, role: Role, site: u32, count: u32, lan: f64) -> Range<u32> {
        let first = self.nodes.len() as u32;
        for _ in 0..count {
            let (up_link, down_link) = (self.add_link(lan), self.add_link(lan));
            let stager = self.push_node(role, site, up_link, down_link);
            self.nodes[stager as usize].upstream_link = self.add_link(lan);
        }
        let stagers = first..self.nodes.len() as u32;
        for stager in stagers.clone() {
            self.nodes[stager as usize].siblings = stagers.clone();
        }
        stagers
    }

    /// A stager's planner: its upstream holds the pieces the stager owns among its siblings
    /// (every piece for a lone stager) when `upstream_holds_all`, else it announces them as they
    /// arrive; each sibling is a source of the pieces it owns once it holds them.
    fn stager_planner(
        &self,
        stager: u32,
        upstreams: &[u32],
        upstream_holds_all: bool,
        config: &PlannerConfig,
        seed: u64,
    ) -> Planner {
        let mut planner = Planner::new(self.piece_sizes.clone(), &[], config.clone(), seed);
        let siblings = self.nodes[stager as usize].siblings.clone();
        for &upstream in upstreams {
            planner.add_source(upstream, SourceKind::Upstream);
            if !upstream_holds_all {
                continue;
            }
            if siblings.len() <= 1 {
                planner.source_has_all(upstream);
            } else {
                let rank = stager - siblings.start;
                for piece in 0..self.piece_sizes.len() as u32 {
                    if piece_owner(siblings.len() as u32, piece) == rank {
                        planner.source_has(upstream, piece);
                    }
                }
            }
        }
        for sibling in siblings.filter(|&s| s != stager) {
            planner.add_source(sibling, SourceKind::Upstream);
        }
        planner
    }

    /// Gives `node` its planner, to start once its session is set up (`setup_ns` from t = 0).
    fn start_planner(&mut self, node: u32, planner: Planner, setup_ns: u64) {
        self.nodes[node as usize].planner = Some(planner);
        if setup_ns == 0 {
            self.mark_poll(node);
        } else {
            self.nodes[node as usize].wakeup_ns = setup_ns;
            self.push_event(setup_ns, EventKind::Wakeup { node });
        }
    }

    /// Adds region `index` of the topology: its links, components and stagers. In `direct`
    /// its stagers take no part.
    fn add_region(
        &mut self,
        topo: &Topology,
        index: usize,
        multiplicity: u32,
        configs: &PlannerConfigs,
        seed: u64,
    ) {
        let region: &Region = &topo.regions[index];
        let region_id = self.regions.len() as u32;
        let goodput = mbit_to_bytes_per_s(region.wan.mbit) * (1.0 - region.wan.loss);
        let wan_link = self.add_link(goodput * wire_efficiency());
        let lan = mbit_to_bytes_per_s(topo.lan_node_mbit);
        // What the region's stagers send their sites leaves through their own ports (each at
        // the LAN rate) and crosses each site's WAN link, not the region's link from the
        // origin (which is how `emulate` runs it: the region's relay carries origin → region).
        let up_link = self.add_link(lan * f64::from(region.stagers) * wire_efficiency());
        let downstream_component = self.components.len() as u32;
        self.components.push(Component::default());
        let lan_component = self.components.len() as u32;
        self.components.push(Component::default());
        let stagers = self.push_stagers(Role::Regional, u32::MAX, region.stagers, lan);
        for stager in stagers.clone() {
            let node = &mut self.nodes[stager as usize];
            node.region = region_id;
            node.subscribers = stagers.clone().filter(|&s| s != stager).collect();
        }
        let origin_rtt_s = 2.0 * (region.wan.latency_ms / 1000.0 + topo.lan_latency_s());
        if self.strategy == Strategy::Direct {
            for stager in stagers.clone() {
                self.nodes[stager as usize].done = true;
            }
        } else {
            let region_seed = mix(seed ^ REGION_SEED_SALT ^ (index as u64).wrapping_mul(GOLDEN));
            let setup_ns = u64::from(SESSION_SETUP_ROUND_TRIPS) * seconds_ns(origin_rtt_s);
            for stager in stagers.clone() {
                let planner = self.stager_planner(
                    stager,
                    &[ORIGIN],
                    true,
                    &configs.stager,
                    mix(region_seed ^ u64::from(stager)),
                );
                self.start_planner(stager, planner, setup_ns);
            }
        }
        self.regions.push(SimRegion {
            multiplicity,
            wan_link,
            up_link,
            downstream_component,
            lan_component,
            origin_rtt_ns: seconds_ns(origin_rtt_s),
            lan_rtt_ns: seconds_ns(topo.lan_rtt_s()),
            connection_cap: loss_limited_rate(region.wan.loss, origin_rtt_s),
            stager_nodes: stagers,
            sites: 0,
            pulled_bytes: 0.0,
            served_bytes: 0.0,
        });
    }

    fn add_site(
        &mut self,
        topo: &Topology,
        topo_index: usize,
        region: Option<u32>,
        multiplicity: Multiplicity,
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
        let stagers = self.push_stagers(Role::Stager, site_id, site.stagers, lan);
        let first_edge = self.nodes.len() as u32;
        for _ in 0..site.edges {
            let (up_link, down_link) = (self.add_link(lan), self.add_link(lan));
            self.push_node(Role::Edge, site_id, up_link, down_link);
        }
        let edges = first_edge..self.nodes.len() as u32;
        self.edges_left += u64::from(site.edges);

        // Seeds differ per site and node so sites do not move in lockstep; a folded class uses
        // its representative's.
        let site_seed = mix(seed ^ (topo_index as u64).wrapping_mul(GOLDEN));
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
                // A site in a region pulls from the region's stagers, which announce pieces as
                // they get them; the origin holds everything from the start.
                let upstreams: Vec<u32> = match region {
                    Some(r) => self.regions[r as usize].stager_nodes.clone().collect(),
                    None => vec![ORIGIN],
                };
                for stager in stagers.clone() {
                    let planner = self.stager_planner(
                        stager,
                        &upstreams,
                        region.is_none(),
                        &configs.stager,
                        mix(site_seed ^ u64::from(stager)),
                    );
                    planners.push((stager, planner));
                }
                if let Some(r) = region {
                    for regional in self.regions[r as usize].stager_nodes.clone() {
                        self.nodes[regional as usize]
                            .subscribers
                            .extend(stagers.clone());
                    }
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
                    // Edges first, then siblings (which take only the pieces it owns).
                    let siblings = stagers.clone().filter(|&s| s != stager);
                    self.nodes[stager as usize].subscribers =
                        edges.clone().chain(siblings).collect();
                }
                for (i, edge) in edges.clone().enumerate() {
                    self.nodes[edge as usize].subscribers =
                        neighbours[i].iter().map(|&p| first_edge + p).collect();
                }
            }
        }
        // Nothing is requested before the session is set up.
        let setup_ns = u64::from(SESSION_SETUP_ROUND_TRIPS) * seconds_ns(origin_rtt_s);
        for (node, planner) in planners {
            self.start_planner(node, planner, setup_ns);
        }
        if self.strategy == Strategy::Direct {
            // Stagers take no part; they count as done so nothing waits on them.
            for stager in stagers.clone() {
                self.nodes[stager as usize].done = true;
            }
        }
        if let Some(r) = region {
            self.regions[r as usize].sites += multiplicity.per_region;
        }
        self.sites.push(SimSite {
            multiplicity: multiplicity.total,
            region_multiplicity: multiplicity.per_region,
            region,
            wan_link,
            lan_component,
            stager_nodes: stagers,
            edge_nodes: edges,
            upstream_rtt_ns: seconds_ns(origin_rtt_s),
            lan_rtt_ns: seconds_ns(topo.lan_rtt_s()),
            connection_cap,
            wan_bytes: 0.0,
            origin_bytes: 0.0,
            stager_egress_bytes: 0.0,
            peer_bytes: 0.0,
            edges_done: 0,
            completion: vec![(0.0, 0.0)],
            done_ns: None,
        });
    }
}

/// How many sites a simulated site stands for.
#[derive(Clone, Copy)]
struct Multiplicity {
    /// In the whole topology (its weight on the origin's uplink).
    total: u32,
    /// In each region of its region class (its weight on its region's link to its sites).
    per_region: u32,
}

/// The planner settings of each kind of downloader in one run.
struct PlannerConfigs {
    stager: PlannerConfig,
    edge: PlannerConfig,
}
