//! The swarm task behind a [`Discovery`](super::Discovery): dials, connections, mDNS events
//! and Hello exchanges, and the bounded caches that keep it from dialing the same peer again.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use libp2p::futures::StreamExt;
use libp2p::request_response;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::SwarmEvent;
use libp2p::{mdns, Multiaddr, PeerId, Swarm};
use tokio::sync::mpsc;
use tracing::{debug, info, trace, warn};

use super::addr::{ip_of, is_concrete, peer_of, with_p2p};
use super::hello::{validate_hello, Hello};
use super::{
    lock, Behaviour, BehaviourEvent, Command, Counters, DiscoveredPeer, DiscoveryConfig, Via,
    FOREIGN_GRACE, MAX_ADDRS_PER_PEER, MAX_FIELD_BYTES, MAX_HELLO_ADDRS, MAX_LISTEN_ADDRS,
    MAX_MDNS_PEERS, MAX_PEERS, MAX_RECENT, REDIAL_AFTER,
};

/// State of a connected peer (over all its connections).
#[derive(Default)]
pub(super) struct PeerConn {
    /// IP the connection came from or went to: completes an unspecified `data_addr`.
    remote_ip: Option<IpAddr>,
    /// Addresses we dialed it on.
    dialed: Vec<Multiaddr>,
    /// Its Hello was judged (so it is counted once).
    judged: bool,
    /// Of another site: disconnect at this time, or as soon as it answers our Hello.
    close_at: Option<Instant>,
}

/// A reported peer.
pub(super) struct Known {
    peer: PeerId,
    data_addr: SocketAddr,
    since: Instant,
}

enum Verdict {
    Malformed,
    OurSelf,
    OtherSite,
    SameSite,
}

pub(super) struct Worker {
    pub(super) swarm: Swarm<Behaviour>,
    pub(super) config: DiscoveryConfig,
    pub(super) listen_addrs: Arc<Mutex<Vec<Multiaddr>>>,
    pub(super) counters: Arc<Counters>,
    pub(super) events: mpsc::Sender<DiscoveredPeer>,
    pub(super) connected: HashMap<PeerId, PeerConn>,
    /// Reported peers by node id.
    pub(super) known: HashMap<String, Known>,
    /// Peers seen by mDNS and their addresses.
    pub(super) mdns_peers: HashMap<PeerId, Vec<Multiaddr>>,
    /// Same-site peers whose Hello we had, and when.
    pub(super) greeted: HashMap<PeerId, Instant>,
    /// Peers of another site, and when they were rejected.
    pub(super) foreign: HashMap<PeerId, Instant>,
    /// Addresses without a peer id that were dialed, and when.
    pub(super) recent_dials: HashMap<Multiaddr, Instant>,
}

impl Worker {
    pub(super) async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                command = commands.recv() => match command {
                    Some(Command::Dial(addr)) => self.dial(addr),
                    None => break,
                },
                _ = tick.tick() => self.on_tick(),
            }
        }
        debug!("discovery stopped");
    }

    fn on_tick(&mut self) {
        let now = Instant::now();
        let due: Vec<PeerId> = self
            .connected
            .iter()
            .filter(|(_, c)| c.close_at.is_some_and(|t| t <= now))
            .map(|(p, _)| *p)
            .collect();
        for peer in due {
            if let Some(c) = self.connected.get_mut(&peer) {
                c.close_at = None;
            }
            let _ = self.swarm.disconnect_peer_id(peer);
        }
    }

    fn dial(&mut self, addr: Multiaddr) {
        let local = *self.swarm.local_peer_id();
        let opts = match peer_of(&addr) {
            Some(peer) if peer == local => {
                Counters::bump(&self.counters.dials_skipped);
                return;
            }
            Some(peer) => {
                if self.swarm.is_connected(&peer)
                    || recent(&self.greeted, &peer)
                    || recent(&self.foreign, &peer)
                {
                    trace!(%addr, "not dialing: connected, greeted or rejected recently");
                    Counters::bump(&self.counters.dials_skipped);
                    return;
                }
                DialOpts::peer_id(peer)
                    .addresses(vec![addr.clone()])
                    .condition(PeerCondition::DisconnectedAndNotDialing)
                    .build()
            }
            None => {
                if recent(&self.recent_dials, &addr) {
                    trace!(%addr, "not dialing: dialed recently");
                    Counters::bump(&self.counters.dials_skipped);
                    return;
                }
                remember(&mut self.recent_dials, addr.clone());
                DialOpts::unknown_peer_id().address(addr.clone()).build()
            }
        };
        match self.swarm.dial(opts) {
            Ok(()) => debug!(%addr, "dialing"),
            Err(e) => debug!(%addr, "not dialing: {e}"),
        }
    }

    pub(super) fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                let mut addrs = lock(&self.listen_addrs);
                if is_concrete(&address)
                    && !addrs.contains(&address)
                    && addrs.len() < MAX_LISTEN_ADDRS
                {
                    debug!(%address, "listening");
                    addrs.push(address);
                }
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                lock(&self.listen_addrs).retain(|a| a != &address);
            }
            SwarmEvent::ListenerClosed {
                addresses, reason, ..
            } => {
                warn!(?reason, "libp2p listener closed");
                lock(&self.listen_addrs).retain(|a| !addresses.contains(a));
            }
            SwarmEvent::ListenerError { error, .. } => warn!("libp2p listener error: {error}"),
            SwarmEvent::ConnectionEstablished {
                peer_id,
                endpoint,
                num_established,
                ..
            } => {
                let remote = endpoint.get_remote_address().clone();
                debug!(peer = %peer_id, %remote, dialer = endpoint.is_dialer(), "connected");
                let conn = self.connected.entry(peer_id).or_default();
                if conn.remote_ip.is_none() {
                    conn.remote_ip = ip_of(&remote);
                }
                if endpoint.is_dialer() && conn.dialed.len() < 4 && !conn.dialed.contains(&remote) {
                    conn.dialed.push(remote);
                }
                if num_established.get() == 1 {
                    let hello = self.own_hello(peer_id);
                    self.swarm
                        .behaviour_mut()
                        .hello
                        .send_request(&peer_id, hello);
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established,
                cause,
                ..
            } => {
                debug!(peer = %peer_id, ?cause, "connection closed");
                if num_established == 0 {
                    self.connected.remove(&peer_id);
                }
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                debug!(peer = ?peer_id, "dial failed: {error}");
            }
            SwarmEvent::IncomingConnectionError {
                send_back_addr,
                error,
                ..
            } => {
                debug!(%send_back_addr, "incoming connection failed: {error}");
            }
            SwarmEvent::Behaviour(BehaviourEvent::Hello(event)) => self.on_hello_event(event),
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(event)) => self.on_mdns_event(event),
            SwarmEvent::Behaviour(BehaviourEvent::Limits(never)) => match never {},
            _ => {}
        }
    }

    fn on_mdns_event(&mut self, event: mdns::Event) {
        match event {
            mdns::Event::Discovered(list) => {
                let mut to_dial: HashSet<PeerId> = HashSet::new();
                for (peer, addr) in list {
                    if !self.mdns_peers.contains_key(&peer)
                        && self.mdns_peers.len() >= MAX_MDNS_PEERS
                    {
                        debug!(%peer, "mDNS: too many peers, ignoring");
                        continue;
                    }
                    debug!(%peer, %addr, "mDNS: discovered");
                    let addrs = self.mdns_peers.entry(peer).or_default();
                    if !addrs.contains(&addr) && addrs.len() < MAX_ADDRS_PER_PEER {
                        addrs.push(addr);
                    }
                    to_dial.insert(peer);
                }
                for peer in to_dial {
                    if self.swarm.is_connected(&peer)
                        || recent(&self.greeted, &peer)
                        || recent(&self.foreign, &peer)
                    {
                        continue;
                    }
                    let addrs = self.mdns_peers.get(&peer).cloned().unwrap_or_default();
                    let opts = DialOpts::peer_id(peer)
                        .addresses(addrs)
                        .condition(PeerCondition::DisconnectedAndNotDialing)
                        .build();
                    if let Err(e) = self.swarm.dial(opts) {
                        trace!(%peer, "mDNS: not dialing: {e}");
                    }
                }
            }
            mdns::Event::Expired(list) => {
                for (peer, addr) in list {
                    if let Some(addrs) = self.mdns_peers.get_mut(&peer) {
                        addrs.retain(|a| a != &addr);
                        if addrs.is_empty() {
                            self.mdns_peers.remove(&peer);
                        }
                    }
                }
            }
        }
    }

    fn on_hello_event(&mut self, event: request_response::Event<Hello, Hello>) {
        match event {
            request_response::Event::Message { peer, message, .. } => match message {
                request_response::Message::Request {
                    request, channel, ..
                } => match self.on_hello(peer, request) {
                    Verdict::Malformed => {
                        drop(channel);
                        let _ = self.swarm.disconnect_peer_id(peer);
                    }
                    Verdict::OurSelf | Verdict::OtherSite | Verdict::SameSite => {
                        let own = self.own_hello(peer);
                        if self
                            .swarm
                            .behaviour_mut()
                            .hello
                            .send_response(channel, own)
                            .is_err()
                        {
                            debug!(%peer, "could not answer Hello: connection gone");
                        }
                    }
                },
                request_response::Message::Response { response, .. } => {
                    match self.on_hello(peer, response) {
                        // It answered, so it had our Hello and judged us too: close now.
                        Verdict::Malformed | Verdict::OtherSite => {
                            let _ = self.swarm.disconnect_peer_id(peer);
                        }
                        Verdict::OurSelf | Verdict::SameSite => {}
                    }
                }
            },
            request_response::Event::ResponseSent { .. } => {}
            request_response::Event::OutboundFailure { peer, error, .. } => {
                Counters::bump(&self.counters.hello_failures);
                debug!(%peer, "Hello to peer failed: {error}");
                let judged = self.connected.get(&peer).is_some_and(|c| c.judged);
                if !judged {
                    // It does not answer our protocol: nothing to learn from it.
                    let _ = self.swarm.disconnect_peer_id(peer);
                }
            }
            request_response::Event::InboundFailure { peer, error, .. } => {
                debug!(%peer, "Hello from peer failed: {error}");
                if matches!(error, request_response::InboundFailure::Io(_)) {
                    // Typically a message over the size limit, or not JSON.
                    Counters::bump(&self.counters.malformed_rejected);
                    warn!(%peer, "rejecting unreadable Hello: {error}");
                    let _ = self.swarm.disconnect_peer_id(peer);
                }
            }
        }
    }

    /// Judges a Hello from `peer`, reporting it if it is new and of our site.
    fn on_hello(&mut self, peer: PeerId, hello: Hello) -> Verdict {
        let remote_ip = self.connected.get(&peer).and_then(|c| c.remote_ip);
        let hello = match validate_hello(&hello, peer, remote_ip) {
            Ok(hello) => hello,
            Err(reason) => {
                Counters::bump(&self.counters.malformed_rejected);
                warn!(%peer, "rejecting malformed Hello: {reason}");
                return Verdict::Malformed;
            }
        };
        if hello.node_id == self.config.node_id {
            debug!(%peer, "ignoring a Hello with our own node id");
            return Verdict::OurSelf;
        }
        let first = match self.connected.get_mut(&peer) {
            Some(c) => !std::mem::replace(&mut c.judged, true),
            None => true,
        };
        if hello.site != self.config.site {
            if first {
                Counters::bump(&self.counters.other_site_rejected);
                debug!(%peer, site = %hello.site, node = %hello.node_id, "peer of another site: disconnecting");
            }
            remember(&mut self.foreign, peer);
            if let Some(c) = self.connected.get_mut(&peer) {
                c.close_at.get_or_insert(Instant::now() + FOREIGN_GRACE);
            }
            return Verdict::OtherSite;
        }
        remember(&mut self.greeted, peer);

        if let Some(known) = self.known.get_mut(&hello.node_id) {
            let unchanged = known.data_addr == hello.data_addr;
            known.peer = peer;
            if unchanged {
                return Verdict::SameSite;
            }
            known.data_addr = hello.data_addr;
        } else {
            if self.known.len() >= MAX_PEERS && !self.make_room() {
                Counters::bump(&self.counters.over_limit);
                warn!(%peer, node = %hello.node_id, "{MAX_PEERS} connected peers known: ignoring one more");
                return Verdict::SameSite;
            }
            self.known.insert(
                hello.node_id.clone(),
                Known {
                    peer,
                    data_addr: hello.data_addr,
                    since: Instant::now(),
                },
            );
        }

        let via = if hello.found_by_mdns || self.mdns_peers.contains_key(&peer) {
            Via::Mdns
        } else {
            Via::Dial
        };
        let discovered = DiscoveredPeer {
            node_id: hello.node_id,
            site: hello.site,
            data_addr: hello.data_addr,
            p2p_addrs: self.peer_addrs(peer, hello.p2p_addrs),
            via,
        };
        info!(%peer, node = %discovered.node_id, data = %discovered.data_addr, ?via, "site peer discovered");
        match self.events.try_send(discovered) {
            Ok(()) => Counters::bump(&self.counters.reported),
            Err(mpsc::error::TrySendError::Full(_)) => {
                Counters::bump(&self.counters.events_dropped);
                warn!(%peer, "discovery events not taken: dropping one");
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
        Verdict::SameSite
    }

    /// Forgets the oldest known peer that is not connected; false if all are connected.
    fn make_room(&mut self) -> bool {
        let oldest = self
            .known
            .iter()
            .filter(|(_, k)| !self.swarm.is_connected(&k.peer))
            .min_by_key(|(_, k)| k.since)
            .map(|(node, _)| node.clone());
        match oldest {
            Some(node) => {
                self.known.remove(&node);
                true
            }
            None => false,
        }
    }

    /// The peer's addresses: announced, seen by mDNS, dialed; deduplicated, at most 16.
    fn peer_addrs(&self, peer: PeerId, announced: Vec<Multiaddr>) -> Vec<String> {
        let mdns = self.mdns_peers.get(&peer).into_iter().flatten().cloned();
        let dialed = self
            .connected
            .get(&peer)
            .into_iter()
            .flat_map(|c| c.dialed.iter().cloned());
        let mut out: Vec<String> = Vec::new();
        for addr in announced.into_iter().chain(mdns).chain(dialed) {
            if !is_concrete(&addr) {
                continue;
            }
            let addr = with_p2p(addr, peer).to_string();
            if !out.contains(&addr) && out.len() < MAX_ADDRS_PER_PEER {
                out.push(addr);
            }
        }
        out
    }

    fn own_hello(&self, to: PeerId) -> Hello {
        let local = *self.swarm.local_peer_id();
        let mut addrs: Vec<Multiaddr> = lock(&self.listen_addrs).clone();
        // Non-loopback first: they are the useful ones for other machines.
        addrs.sort_by_key(|a| ip_of(a).is_some_and(|ip| ip.is_loopback()));
        let p2p_addrs = addrs
            .into_iter()
            .map(|a| with_p2p(a, local).to_string())
            .filter(|a| a.len() <= MAX_FIELD_BYTES)
            .take(MAX_HELLO_ADDRS)
            .collect();
        Hello {
            site: self.config.site.clone(),
            node_id: self.config.node_id.clone(),
            data_addr: self.config.data_addr.to_string(),
            p2p_addrs,
            found_by_mdns: self.mdns_peers.contains_key(&to),
        }
    }
}

fn recent<K: std::hash::Hash + Eq>(map: &HashMap<K, Instant>, key: &K) -> bool {
    map.get(key).is_some_and(|t| t.elapsed() < REDIAL_AFTER)
}

/// Records `key` now in a bounded cache of recent events.
fn remember<K: std::hash::Hash + Eq>(map: &mut HashMap<K, Instant>, key: K) {
    if map.len() >= MAX_RECENT && !map.contains_key(&key) {
        map.retain(|_, t| t.elapsed() < REDIAL_AFTER);
        if map.len() >= MAX_RECENT {
            map.clear();
        }
    }
    map.insert(key, Instant::now());
}
