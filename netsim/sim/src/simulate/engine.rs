//! The event loop: nodes with real planners, flows over links, one global event queue.
//!
//! See the parent module for the model. This file is the mechanics: issuing the planners'
//! requests as flows, finishing flows, and keeping each component's rates and next completion
//! current. [`build`] lays out the (folded) fleet.

mod build;

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::ops::Range;
use std::time::Duration;

use anyhow::{bail, Result};
use proto_core::planner::{Planner, Request};

use super::component::Component;
use super::fleet::piece_owner;
use super::network::{FlowLinks, LinkId, MaxMinSolver};
use crate::topology::Strategy;

/// The origin's node id (and its `SourceId` in every planner).
pub(super) const ORIGIN: u32 = 0;

/// The origin uplink's link id.
const UPLINK: LinkId = 0;

/// The component holding every flow that starts at the origin.
const WAN_COMPONENT: u32 = 0;

/// Nanoseconds per second.
const NS_PER_S: f64 = 1e9;

/// A flow whose remaining bytes would take less than this to send counts as finished, in
/// seconds. Event times are whole nanoseconds, so completions can be up to 1 ns early.
const FINISH_SLACK_S: f64 = 2e-9;

/// Most events one run may process before it is declared stuck.
const MAX_EVENTS: u64 = 20_000_000_000;

/// What a node does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Role {
    Origin,
    /// A regional stager: pulls from the origin, serves the stagers of its region's sites.
    Regional,
    /// A site's stager: pulls from the origin or its site's region, serves the site's edges.
    Stager,
    Edge,
}

/// One simulated site: a representative standing for `multiplicity` identical sites.
pub(super) struct SimSite {
    /// How many identical sites this one stands for (weight on the origin uplink).
    pub multiplicity: u32,
    /// Of those, how many each region of its region class holds (weight on the region's link
    /// to its sites).
    region_multiplicity: u32,
    /// Index in `Engine::regions` of the region the site's stagers pull through.
    region: Option<u32>,
    wan_link: LinkId,
    lan_component: u32,
    /// Node ids of the site's stagers.
    pub stager_nodes: Range<u32>,
    /// Node ids of the site's edges.
    pub edge_nodes: Range<u32>,
    /// Round trip upstream → a node of the site (the origin, or the site's region).
    upstream_rtt_ns: u64,
    lan_rtt_ns: u64,
    /// Loss-limited rate of one upstream → node connection, bytes/s (infinite without loss).
    connection_cap: f64,
    /// Bytes over the site's WAN (partial bytes of cancelled requests included), from the
    /// origin or the site's region.
    pub wan_bytes: f64,
    /// Of `wan_bytes`, those the origin sent.
    pub origin_bytes: f64,
    /// Bytes the site's stagers sent inside the site: to its edges and to each other.
    pub stager_egress_bytes: f64,
    /// Bytes edges sent to edges.
    pub peer_bytes: f64,
    /// Edges holding the whole bundle.
    pub edges_done: u32,
    /// (seconds, fraction of the site's edges complete), one point per completion.
    pub completion: Vec<(f64, f64)>,
    /// When the last edge finished.
    pub done_ns: Option<u64>,
}

/// A region's stagers: a representative standing for `multiplicity` identical regions. A
/// regional stager's state does not depend on which member of a folded class of sites asks it,
/// so each class's flows from it count once per member on the region's link to its sites, as
/// they do on the origin's uplink.
pub(super) struct SimRegion {
    /// How many identical regions this one stands for (weight on the origin uplink).
    pub multiplicity: u32,
    /// Link origin → the region (its `wan`).
    wan_link: LinkId,
    /// Link the region → its sites: the region's link is as fast up as down.
    up_link: LinkId,
    /// Component of the flows region → site stagers.
    downstream_component: u32,
    /// Component of the copies between the region's stagers.
    lan_component: u32,
    origin_rtt_ns: u64,
    lan_rtt_ns: u64,
    /// Loss-limited rate of one origin → regional stager connection, bytes/s.
    connection_cap: f64,
    /// Node ids of the region's stagers.
    pub stager_nodes: Range<u32>,
    /// Sites (folded members counted) whose stagers pull through one region of the class.
    pub sites: u32,
    /// Bytes the origin sent to one region's stagers.
    pub pulled_bytes: f64,
    /// Bytes one region's stagers sent to its sites' stagers (folded members counted).
    pub served_bytes: f64,
}

struct Node {
    /// The node's site; `u32::MAX` for the origin and regional stagers.
    site: u32,
    /// A regional stager's region; `u32::MAX` for every other node.
    region: u32,
    role: Role,
    up_link: LinkId,
    /// The LAN port down: copies from peers and sibling stagers arrive on it.
    down_link: LinkId,
    /// The port upstream pulls arrive on: `down_link` for an edge, a second link at the same
    /// rate for a stager, whose `down_link` carries its siblings' copies in another component.
    /// A stager's total inflow is at most its site's WAN rate (siblings forward only what crossed
    /// it), so the split binds only where the WAN is faster than the LAN.
    upstream_link: LinkId,
    /// A stager's siblings, itself included (the stagers of its site or region): each piece
    /// crosses the WAN to exactly one of them. Empty for the origin and edges.
    siblings: Range<u32>,
    /// Bytes received from upstream (the origin, or a regional stager).
    upstream_bytes: f64,
    planner: Option<Planner>,
    /// Nodes whose planners list this node as a source.
    subscribers: Vec<u32>,
    /// Flows in flight to this node (waiting or active).
    downloads: Vec<u32>,
    /// Pieces this node holds.
    holds: Vec<bool>,
    needs_poll: bool,
    /// The wake-up currently scheduled, `u64::MAX` for none.
    wakeup_ns: u64,
    done: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum FlowState {
    Free,
    /// Paying its round trip before it moves bytes.
    Waiting,
    Active,
}

struct Flow {
    state: FlowState,
    generation: u32,
    src: u32,
    dst: u32,
    piece: u32,
    size: f64,
    remaining: f64,
    rate: f64,
    component: u32,
    /// Its pair group in the component while active.
    group: u32,
    requested_ns: u64,
    /// Index in its component's `active` list while active.
    slot: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum EventKind {
    Activate {
        flow: u32,
        generation: u32,
    },
    ComponentDone {
        component: u32,
        version: u64,
    },
    Wakeup {
        node: u32,
    },
    /// An edge's peers learn that it holds `piece` (through the stager's tracker).
    Announce {
        node: u32,
        piece: u32,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Event {
    at_ns: u64,
    seq: u64,
    kind: EventKind,
}

pub(super) struct Engine {
    strategy: Strategy,
    piece_sizes: Vec<u64>,
    max_in_flight_per_source: u32,
    now_ns: u64,
    max_ns: u64,
    nodes: Vec<Node>,
    pub sites: Vec<SimSite>,
    pub regions: Vec<SimRegion>,
    capacities: Vec<f64>,
    components: Vec<Component>,
    flows: Vec<Flow>,
    free_flows: Vec<u32>,
    events: BinaryHeap<Reverse<Event>>,
    seq: u64,
    events_handled: u64,
    dirty: Vec<u32>,
    to_poll: Vec<u32>,
    edges_left: u64,
    solver: MaxMinSolver,
    solver_flows: Vec<FlowLinks>,
    rates: Vec<f64>,
    /// How long after an edge completes a piece its peers know it (the tracker's round).
    peer_announce_delay_ns: u64,
}

impl Engine {
    fn add_link(&mut self, capacity: f64) -> LinkId {
        self.capacities.push(capacity);
        (self.capacities.len() - 1) as LinkId
    }

    /// Bytes each of `nodes` received from upstream, rounded.
    pub fn upstream_bytes(&self, nodes: Range<u32>) -> Vec<u64> {
        nodes
            .map(|node| self.nodes[node as usize].upstream_bytes.round() as u64)
            .collect()
    }

    /// Runs until every edge holds the bundle. Returns the virtual time then, in ns.
    pub fn run(&mut self) -> Result<u64> {
        loop {
            self.poll_marked()?;
            self.recompute_dirty();
            if self.edges_left == 0 {
                break;
            }
            let Some(Reverse(event)) = self.events.pop() else {
                bail!("{}", self.stuck_message("nothing left to happen"));
            };
            if event.at_ns > self.max_ns {
                bail!(
                    "{}",
                    self.stuck_message(&format!(
                        "virtual time passed the limit of {} s",
                        self.max_ns as f64 / NS_PER_S
                    ))
                );
            }
            self.now_ns = event.at_ns;
            self.handle(event.kind)?;
            while let Some(Reverse(next)) = self.events.peek() {
                if next.at_ns != self.now_ns {
                    break;
                }
                let kind = next.kind;
                self.events.pop();
                self.handle(kind)?;
            }
        }
        self.settle_leftovers();
        Ok(self.now_ns)
    }

    fn handle(&mut self, kind: EventKind) -> Result<()> {
        self.events_handled += 1;
        if self.events_handled > MAX_EVENTS {
            bail!("{}", self.stuck_message("too many events"));
        }
        match kind {
            EventKind::Activate { flow, generation } => {
                let f = &self.flows[flow as usize];
                if f.generation == generation && f.state == FlowState::Waiting {
                    self.activate(flow);
                }
            }
            EventKind::ComponentDone { component, version } => {
                if self.components[component as usize].version == version {
                    self.finish_due(component)?;
                }
            }
            EventKind::Wakeup { node } => {
                if self.nodes[node as usize].wakeup_ns == self.now_ns {
                    self.nodes[node as usize].wakeup_ns = u64::MAX;
                    self.mark_poll(node);
                }
            }
            EventKind::Announce { node, piece } => self.announce(node, piece),
        }
        Ok(())
    }

    fn push_event(&mut self, at_ns: u64, kind: EventKind) {
        self.seq += 1;
        self.events.push(Reverse(Event {
            at_ns,
            seq: self.seq,
            kind,
        }));
    }

    fn mark_poll(&mut self, node: u32) {
        let n = &mut self.nodes[node as usize];
        if !n.needs_poll && !n.done {
            n.needs_poll = true;
            self.to_poll.push(node);
        }
    }

    fn mark_dirty(&mut self, component: u32) {
        let c = &mut self.components[component as usize];
        if !c.dirty {
            c.dirty = true;
            self.dirty.push(component);
        }
    }

    /// Asks every marked planner what to request now, and starts those requests.
    fn poll_marked(&mut self) -> Result<()> {
        let now = Duration::from_nanos(self.now_ns);
        let mut queue = std::mem::take(&mut self.to_poll);
        for &node in &queue {
            let n = &mut self.nodes[node as usize];
            n.needs_poll = false;
            if n.done {
                continue;
            }
            let Some(planner) = n.planner.as_mut() else {
                continue;
            };
            let requests = planner.poll(now);
            let wakeup = planner.next_wakeup();
            for request in requests {
                self.start_request(node, request)?;
            }
            if let Some(wakeup) = wakeup {
                let at_ns = duration_ns(wakeup).max(self.now_ns + 1);
                let n = &mut self.nodes[node as usize];
                if at_ns != n.wakeup_ns {
                    n.wakeup_ns = at_ns;
                    self.push_event(at_ns, EventKind::Wakeup { node });
                }
            }
        }
        queue.clear();
        if self.to_poll.is_empty() {
            self.to_poll = queue;
        }
        Ok(())
    }

    fn start_request(&mut self, dst: u32, request: Request) -> Result<()> {
        let src = request.source;
        let piece = request.piece;
        let Some(&size) = self.piece_sizes.get(piece as usize) else {
            bail!("node {dst}'s planner asked for piece {piece}, which does not exist");
        };
        if src as usize >= self.nodes.len() || src == dst {
            bail!("node {dst}'s planner asked unknown source {src} for piece {piece}");
        }
        let Some((component, rtt_ns)) = self.route(src, dst) else {
            bail!("node {dst}'s planner asked node {src}, which it has no path from");
        };
        let flow = Flow {
            state: FlowState::Waiting,
            generation: 0,
            src,
            dst,
            piece,
            size: size as f64,
            remaining: size as f64,
            rate: 0.0,
            component,
            group: u32::MAX,
            requested_ns: self.now_ns,
            slot: u32::MAX,
        };
        let id = match self.free_flows.pop() {
            Some(id) => {
                let generation = self.flows[id as usize].generation;
                self.flows[id as usize] = Flow { generation, ..flow };
                id
            }
            None => {
                self.flows.push(flow);
                (self.flows.len() - 1) as u32
            }
        };
        self.nodes[dst as usize].downloads.push(id);
        if rtt_ns == 0 {
            self.activate(id);
        } else {
            let generation = self.flows[id as usize].generation;
            self.push_event(
                self.now_ns + rtt_ns,
                EventKind::Activate {
                    flow: id,
                    generation,
                },
            );
        }
        Ok(())
    }

    /// The component a flow `src` → `dst` belongs to, and its round trip in ns; `None` when no
    /// path joins them (another site, another region).
    fn route(&self, src: u32, dst: u32) -> Option<(u32, u64)> {
        let (s, d) = (&self.nodes[src as usize], &self.nodes[dst as usize]);
        match (s.role, d.role) {
            (Role::Origin, Role::Regional) => {
                Some((WAN_COMPONENT, self.regions[d.region as usize].origin_rtt_ns))
            }
            (Role::Origin, _) => Some((WAN_COMPONENT, self.sites[d.site as usize].upstream_rtt_ns)),
            (Role::Regional, Role::Regional) if s.region == d.region => {
                let region = &self.regions[s.region as usize];
                Some((region.lan_component, region.lan_rtt_ns))
            }
            (Role::Regional, Role::Stager)
                if self.sites[d.site as usize].region == Some(s.region) =>
            {
                Some((
                    self.regions[s.region as usize].downstream_component,
                    self.sites[d.site as usize].upstream_rtt_ns,
                ))
            }
            (Role::Stager | Role::Edge, Role::Stager | Role::Edge) if s.site == d.site => {
                let site = &self.sites[d.site as usize];
                Some((site.lan_component, site.lan_rtt_ns))
            }
            _ => None,
        }
    }

    /// The flow's round trip is paid: it starts moving bytes.
    fn activate(&mut self, id: u32) {
        let component = self.flows[id as usize].component;
        self.advance(component);
        let c = &mut self.components[component as usize];
        let slot = c.active.len() as u32;
        c.active.push(id);
        let f = &mut self.flows[id as usize];
        f.state = FlowState::Active;
        f.slot = slot;
        f.group = c.join_group(f.src, f.dst);
        self.mark_dirty(component);
    }

    /// Brings a component's flows' remaining bytes up to now at their current rates.
    fn advance(&mut self, component: u32) {
        let c = &mut self.components[component as usize];
        if c.last_ns == self.now_ns {
            return;
        }
        let dt = (self.now_ns - c.last_ns) as f64 / NS_PER_S;
        c.last_ns = self.now_ns;
        for &id in &c.active {
            let f = &mut self.flows[id as usize];
            f.remaining = (f.remaining - f.rate * dt).max(0.0);
        }
    }

    /// Takes an active flow out of its component (its bytes so far already advanced).
    fn deactivate(&mut self, id: u32) {
        let (component, slot, group) = {
            let f = &self.flows[id as usize];
            (f.component, f.slot as usize, f.group)
        };
        let c = &mut self.components[component as usize];
        c.leave_group(group);
        c.active.swap_remove(slot);
        if let Some(&moved) = c.active.get(slot) {
            self.flows[moved as usize].slot = slot as u32;
        }
        self.mark_dirty(component);
    }

    /// Completes every flow of `component` that is done by now.
    fn finish_due(&mut self, component: u32) -> Result<()> {
        self.advance(component);
        let mut finished = Vec::new();
        for &id in &self.components[component as usize].active {
            let f = &self.flows[id as usize];
            if f.remaining <= f.rate * FINISH_SLACK_S {
                finished.push((id, f.generation));
            }
        }
        // Whatever finished, the set changed or the schedule needs renewing.
        self.mark_dirty(component);
        for (id, generation) in finished {
            // An earlier completion may have cancelled this one as its duplicate.
            let f = &self.flows[id as usize];
            if f.generation != generation || f.state != FlowState::Active {
                continue;
            }
            self.deactivate(id);
            self.flows[id as usize].remaining = 0.0;
            self.complete(id)?;
        }
        Ok(())
    }

    /// A flow delivered its whole piece.
    fn complete(&mut self, id: u32) -> Result<()> {
        let (src, dst, piece, requested_ns) = {
            let f = &self.flows[id as usize];
            (f.src, f.dst, f.piece, f.requested_ns)
        };
        self.release(id);
        let now = Duration::from_nanos(self.now_ns);
        let elapsed = Duration::from_nanos(self.now_ns - requested_ns);
        let duplicates = match self.nodes[dst as usize].planner.as_mut() {
            Some(planner) => planner.on_success(src, piece, elapsed, now),
            None => bail!("node {dst} received a piece but has no planner"),
        };
        // The planner no longer counts these as in flight; stop their flows.
        for duplicate in duplicates {
            self.cancel(dst, duplicate);
        }
        self.got_piece(dst, piece);
        Ok(())
    }

    /// Stops the flow for `request` to `dst`, if there is one.
    fn cancel(&mut self, dst: u32, request: Request) {
        let found = self.nodes[dst as usize]
            .downloads
            .iter()
            .copied()
            .find(|&id| {
                let f = &self.flows[id as usize];
                f.src == request.source && f.piece == request.piece
            });
        if let Some(id) = found {
            if self.flows[id as usize].state == FlowState::Active {
                let component = self.flows[id as usize].component;
                self.advance(component);
                self.deactivate(id);
            }
            self.release(id);
        }
    }

    /// Counts a flow's bytes and frees its slot.
    fn release(&mut self, id: u32) {
        let f = &mut self.flows[id as usize];
        let bytes = f.size - f.remaining;
        let (src, dst) = (f.src, f.dst);
        f.state = FlowState::Free;
        f.generation = f.generation.wrapping_add(1);
        self.free_flows.push(id);
        let downloads = &mut self.nodes[dst as usize].downloads;
        if let Some(pos) = downloads.iter().position(|&d| d == id) {
            downloads.swap_remove(pos);
        }
        let (src_role, dst_role) = (self.nodes[src as usize].role, self.nodes[dst as usize].role);
        if dst_role == Role::Regional {
            let region = &mut self.regions[self.nodes[dst as usize].region as usize];
            if src_role == Role::Origin {
                region.pulled_bytes += bytes;
                self.nodes[dst as usize].upstream_bytes += bytes;
            }
            return;
        }
        let site = &mut self.sites[self.nodes[dst as usize].site as usize];
        match src_role {
            Role::Origin => {
                site.wan_bytes += bytes;
                site.origin_bytes += bytes;
                self.nodes[dst as usize].upstream_bytes += bytes;
            }
            Role::Regional => {
                site.wan_bytes += bytes;
                let served = bytes * f64::from(site.region_multiplicity);
                self.regions[self.nodes[src as usize].region as usize].served_bytes += served;
                self.nodes[dst as usize].upstream_bytes += bytes;
            }
            Role::Stager => site.stager_egress_bytes += bytes,
            Role::Edge => site.peer_bytes += bytes,
        }
    }

    /// `node` now holds `piece`: tell whoever lists it as a source (a stager's edges at once,
    /// an edge's peers after the tracker's round), and check if it is done.
    fn got_piece(&mut self, node: u32, piece: u32) {
        let n = &mut self.nodes[node as usize];
        if n.holds[piece as usize] {
            return;
        }
        n.holds[piece as usize] = true;
        if n.role == Role::Edge && self.peer_announce_delay_ns > 0 {
            if !n.subscribers.is_empty() {
                self.push_event(
                    self.now_ns + self.peer_announce_delay_ns,
                    EventKind::Announce { node, piece },
                );
            }
        } else {
            self.announce(node, piece);
        }
        self.check_done(node);
    }

    /// Tells every node that lists `node` as a source that it holds `piece`.
    fn announce(&mut self, node: u32, piece: u32) {
        let subscribers = std::mem::take(&mut self.nodes[node as usize].subscribers);
        for &sub in &subscribers {
            if !self.takes_piece_from(node, sub, piece) {
                continue;
            }
            let wants = {
                let s = &mut self.nodes[sub as usize];
                if let Some(planner) = s.planner.as_mut() {
                    planner.source_has(node, piece);
                }
                !s.done && !s.holds[piece as usize]
            };
            // A poll can only add requests to `node`, and only below the in-flight limit.
            if wants && self.in_flight_between(node, sub) < self.max_in_flight_per_source {
                self.mark_poll(sub);
            }
        }
        self.nodes[node as usize].subscribers = subscribers;
    }

    /// Whether `sub` fetches `piece` from `src`: an edge takes any piece from any source; a
    /// stager takes a piece from its upstream only when it owns it among its siblings, and
    /// from a sibling only when that sibling owns it (it crossed the WAN there).
    fn takes_piece_from(&self, src: u32, sub: u32, piece: u32) -> bool {
        let siblings = &self.nodes[sub as usize].siblings;
        if siblings.len() <= 1 {
            return true;
        }
        let owner = siblings.start + piece_owner(siblings.len() as u32, piece);
        if siblings.contains(&src) {
            owner == src
        } else {
            owner == sub
        }
    }

    /// Marks `node` done when its planner is, or polls it again.
    fn check_done(&mut self, node: u32) {
        let n = &mut self.nodes[node as usize];
        let done = n.planner.as_ref().is_some_and(|p| p.is_done());
        if done && !n.done {
            n.done = true;
            let (role, site) = (n.role, n.site);
            if role == Role::Edge {
                self.edges_left -= 1;
                let now_s = self.now_ns as f64 / NS_PER_S;
                let site = &mut self.sites[site as usize];
                site.edges_done += 1;
                let edges = site.edge_nodes.len() as f64;
                site.completion
                    .push((now_s, f64::from(site.edges_done) / edges));
                if site.edges_done as usize == site.edge_nodes.len() {
                    site.done_ns = Some(self.now_ns);
                }
            }
        } else if !done {
            self.mark_poll(node);
        }
    }

    fn in_flight_between(&self, src: u32, dst: u32) -> u32 {
        self.nodes[dst as usize]
            .downloads
            .iter()
            .filter(|&&id| self.flows[id as usize].src == src)
            .count() as u32
    }

    /// Recomputes the rates of every component whose flow set changed, and schedules each one's
    /// next completion.
    fn recompute_dirty(&mut self) {
        let dirty = std::mem::take(&mut self.dirty);
        for &component in &dirty {
            self.components[component as usize].dirty = false;
            self.recompute(component);
        }
        if self.dirty.is_empty() {
            self.dirty = dirty;
            self.dirty.clear();
        }
    }

    fn recompute(&mut self, component: u32) {
        self.advance(component);
        let c = &mut self.components[component as usize];
        c.version += 1;
        let version = c.version;
        if c.active.is_empty() {
            return;
        }
        self.solver_flows.clear();
        for &g in &c.live_groups {
            let group = &c.groups[g as usize];
            let count = f64::from(group.flows);
            let (src, dst) = (
                &self.nodes[group.src as usize],
                &self.nodes[group.dst as usize],
            );
            // Upstream paths: the sender's shared link (counted once per folded member), the
            // receiving site's or region's WAN, the receiver's upstream port.
            let upstream = match (src.role, dst.role) {
                (Role::Origin, Role::Regional) => {
                    let region = &self.regions[dst.region as usize];
                    Some((
                        UPLINK,
                        region.wan_link,
                        region.multiplicity,
                        region.connection_cap,
                    ))
                }
                (Role::Origin, _) => {
                    let site = &self.sites[dst.site as usize];
                    Some((
                        UPLINK,
                        site.wan_link,
                        site.multiplicity,
                        site.connection_cap,
                    ))
                }
                (Role::Regional, Role::Stager) => {
                    let site = &self.sites[dst.site as usize];
                    let region = &self.regions[src.region as usize];
                    Some((
                        region.up_link,
                        site.wan_link,
                        site.region_multiplicity,
                        site.connection_cap,
                    ))
                }
                _ => None,
            };
            let links = match upstream {
                Some((sender_link, wan_link, multiplicity, connection_cap)) => {
                    let mut links = FlowLinks::new(&[sender_link, wan_link, dst.upstream_link])
                        .with_weight(0, count * f64::from(multiplicity))
                        .with_weight(1, count)
                        .with_weight(2, count);
                    if connection_cap.is_finite() {
                        // The group is the node's one connection to that upstream.
                        links = links.with_cap(connection_cap / count);
                    }
                    links
                }
                None => FlowLinks::new(&[src.up_link, dst.down_link])
                    .with_weight(0, count)
                    .with_weight(1, count),
            };
            self.solver_flows.push(links);
        }
        self.solver
            .solve(&self.capacities, &self.solver_flows, &mut self.rates);
        for (&g, &rate) in c.live_groups.iter().zip(&self.rates) {
            c.groups[g as usize].rate = rate;
        }
        let mut next_s = f64::INFINITY;
        for &id in &c.active {
            let f = &mut self.flows[id as usize];
            f.rate = c.groups[f.group as usize].rate;
            if f.rate > 0.0 {
                next_s = next_s.min(f.remaining / f.rate);
            }
        }
        if next_s.is_finite() {
            let at_ns = self.now_ns + (next_s * NS_PER_S).ceil() as u64;
            self.push_event(at_ns, EventKind::ComponentDone { component, version });
        }
    }

    /// Counts the bytes of flows still moving when the last edge finished (endgame leftovers).
    fn settle_leftovers(&mut self) {
        for component in 0..self.components.len() as u32 {
            self.advance(component);
            let active = std::mem::take(&mut self.components[component as usize].active);
            for id in active {
                self.release(id);
            }
        }
    }

    fn stuck_message(&self, why: &str) -> String {
        let waiting: Vec<String> = self
            .nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| n.role == Role::Edge && !n.done)
            .take(3)
            .map(|(id, n)| {
                let (missing, in_flight, unavailable) = n.planner.as_ref().map_or((0, 0, 0), |p| {
                    (p.missing(), p.in_flight(), p.unavailable_pieces().len())
                });
                format!(
                    "node {id}: {missing} pieces missing, {in_flight} in flight, \
                     {unavailable} unavailable"
                )
            })
            .collect();
        format!(
            "simulation stuck at {:.3} s ({why}) with {} edges unfinished; e.g. {}",
            self.now_ns as f64 / NS_PER_S,
            self.edges_left,
            waiting.join("; ")
        )
    }
}

fn seconds_ns(seconds: f64) -> u64 {
    (seconds * NS_PER_S).round() as u64
}

fn duration_ns(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}
