//! Site peer discovery over libp2p: edges, and the site's stagers, find each other.
//!
//! The tracker on the stager (see the parent module) tells who holds what; this module only
//! answers "who of my site is reachable, and where does it serve data". Two ways in:
//!
//! * **mDNS on a LAN.** With [`DiscoveryConfig::mdns`] on, every node answers and sends mDNS
//!   queries on each non-loopback IPv4 interface (libp2p's `mdns`, tokio flavour). A peer found
//!   that way is dialed at once, unless we are already connected or dialing.
//! * **Dials where multicast is off.** Many sites block multicast, or span routed subnets. There
//!   the stager's list of known peers (the [`Discovery::listen_addrs`] each node published) is
//!   fed to [`Discovery::dial`]. It may be called with the whole list on every refresh: a peer
//!   already connected, being dialed, greeted in the last [`REDIAL_AFTER`] or rejected in that
//!   time is not dialed again, nor is an address without `/p2p/` dialed twice in that time.
//!
//! Either way the result is a libp2p connection (TCP, Noise, Yamux), on which both sides run one
//! round of a small request-response protocol, [`HELLO_PROTOCOL`] with a JSON codec: each side
//! sends `Hello { site, node_id, data_addr, p2p_addrs }` as soon as the connection is up and
//! answers the other's request with its own Hello. Only then is a peer reported by
//! [`Discovery::next`], and only if it is of the same site; a peer of another site is logged at
//! debug, counted ([`DiscoveryStats::other_site_rejected`]) and disconnected once it has had our
//! Hello (its answer to ours shows that; else after a 2 s grace), so both sides count it. A peer is reported once per node id, and again only if its
//! data address changed. [`Via::Mdns`] means mDNS saw the peer on this LAN; [`Via::Dial`] means
//! it is known only through a connection, dialed by us or by it (a Hello says whether its sender
//! dialed because mDNS showed the receiver, so both ends of an mDNS-made connection say Mdns).
//!
//! Why a Hello of our own rather than libp2p's `identify`: identify carries neither the site nor
//! the QUIC data address, and the protocol is a few lines; it also keeps the build small.
//! A `data_addr` whose IP is unspecified (a node that serves on `0.0.0.0:port`) is completed
//! with the IP the connection came from.
//!
//! Everything is bounded: at most [`MAX_PEERS`] known peers (the oldest one not connected is
//! forgotten to make room; with none, the newcomer is dropped and counted), Hello messages of at
//! most [`MAX_HELLO_BYTES`], strings of at most [`MAX_FIELD_BYTES`], at most [`MAX_HELLO_ADDRS`]
//! addresses, connection limits, a bounded dial queue and a bounded event queue (an event that
//! does not fit is dropped and counted). A malformed Hello is rejected with a log line and the
//! connection closed; nothing from the network is unwrapped. Dials to ourselves are ignored.
//!
//! The libp2p identity is new at each start: peers are told apart by their `node_id`; the peer
//! id only names the libp2p endpoint. Dropping [`Discovery`] stops the swarm task (listeners and
//! connections close); libp2p-mdns 0.49 leaves its per-interface responder tasks running until
//! the tokio runtime ends, which only matters if nodes are started and dropped many times in
//! one process.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use libp2p::futures::StreamExt;
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{
    connection_limits, mdns, noise, tcp, yamux, Multiaddr, PeerId, StreamProtocol, Swarm,
    SwarmBuilder,
};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{debug, info, trace, warn};

/// The Hello protocol spoken on every new connection.
pub const HELLO_PROTOCOL: &str = "/stagecoach/site-hello/1";
/// Most peers (node ids) remembered at once.
pub const MAX_PEERS: usize = 256;
/// Longest site, node id or address string accepted in a Hello.
pub const MAX_FIELD_BYTES: usize = 256;
/// Most libp2p addresses a Hello may carry.
pub const MAX_HELLO_ADDRS: usize = 8;
/// Largest Hello accepted (request or response), in bytes.
pub const MAX_HELLO_BYTES: u64 = 8 * 1024;
/// A peer greeted or rejected this recently is not dialed again.
pub const REDIAL_AFTER: Duration = Duration::from_secs(300);
/// How long [`Discovery::start`] waits for the listener to report an address.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(5);
/// Timeout of one Hello exchange.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection with nothing in flight is closed after this long.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// A peer of another site is disconnected at the latest this long after it was judged.
const FOREIGN_GRACE: Duration = Duration::from_secs(2);
/// Dials queued by [`Discovery::dial`] and not yet taken by the swarm task.
const DIAL_QUEUE: usize = 1024;
/// Reports not yet taken by [`Discovery::next`].
const EVENT_QUEUE: usize = 1024;
/// Most entries in each of the "recently greeted / rejected / dialed" caches.
const MAX_RECENT: usize = 4 * MAX_PEERS;
/// Most peers remembered from mDNS, and addresses per peer.
const MAX_MDNS_PEERS: usize = 4 * MAX_PEERS;
const MAX_ADDRS_PER_PEER: usize = 16;
/// Most concrete listen addresses kept for this node.
const MAX_LISTEN_ADDRS: usize = 32;

/// Settings of [`Discovery::start`].
#[derive(Clone, Debug)]
pub struct DiscoveryConfig {
    /// libp2p multiaddr to listen on, e.g. "/ip4/0.0.0.0/tcp/0".
    pub listen: String,
    /// Also discover with mDNS.
    pub mdns: bool,
    /// This node's site; only peers of the same site are reported.
    pub site: String,
    /// This node's id (as it prints: lowercase letters and digits).
    pub node_id: String,
    /// Where this node serves data over QUIC.
    pub data_addr: SocketAddr,
}

/// A peer of this node's site, learned from its Hello.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiscoveredPeer {
    pub node_id: String,
    pub site: String,
    /// Where the peer serves data over QUIC.
    pub data_addr: SocketAddr,
    /// libp2p addresses of the peer, each ending in `/p2p/<peer id>` (what it announced, what
    /// mDNS saw and what we dialed; at most 16).
    pub p2p_addrs: Vec<String>,
    pub via: Via,
}

/// How a peer was learned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// mDNS saw the peer on this LAN.
    Mdns,
    /// Known only through a connection: an address from the stager's list, dialed by us or by
    /// the peer.
    Dial,
}

/// Counters, for logs and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DiscoveryStats {
    /// Peers reported by [`Discovery::next`] (re-reports included).
    pub reported: u64,
    /// Hellos of another site (once per connected peer).
    pub other_site_rejected: u64,
    /// Hellos that failed validation.
    pub malformed_rejected: u64,
    /// Same-site peers dropped because [`MAX_PEERS`] connected peers are known.
    pub over_limit: u64,
    /// Reports dropped because nobody took them from [`Discovery::next`].
    pub events_dropped: u64,
    /// Hello exchanges that failed (timeout, closed, peer does not speak the protocol).
    pub hello_failures: u64,
    /// Dials not made: to ourselves, or to a peer connected, greeted or rejected recently.
    pub dials_skipped: u64,
}

#[derive(Default)]
struct Counters {
    reported: AtomicU64,
    other_site_rejected: AtomicU64,
    malformed_rejected: AtomicU64,
    over_limit: AtomicU64,
    events_dropped: AtomicU64,
    hello_failures: AtomicU64,
    dials_skipped: AtomicU64,
}

impl Counters {
    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn snapshot(&self) -> DiscoveryStats {
        DiscoveryStats {
            reported: self.reported.load(Ordering::Relaxed),
            other_site_rejected: self.other_site_rejected.load(Ordering::Relaxed),
            malformed_rejected: self.malformed_rejected.load(Ordering::Relaxed),
            over_limit: self.over_limit.load(Ordering::Relaxed),
            events_dropped: self.events_dropped.load(Ordering::Relaxed),
            hello_failures: self.hello_failures.load(Ordering::Relaxed),
            dials_skipped: self.dials_skipped.load(Ordering::Relaxed),
        }
    }
}

/// The Hello message, both request and response. Strings on the wire; validated on receipt.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Hello {
    site: String,
    node_id: String,
    data_addr: String,
    #[serde(default)]
    p2p_addrs: Vec<String>,
    /// The sender saw the receiver through mDNS (so they share a LAN).
    #[serde(default)]
    found_by_mdns: bool,
}

/// A Hello that passed validation.
#[derive(Debug, PartialEq, Eq)]
struct ValidHello {
    site: String,
    node_id: String,
    data_addr: SocketAddr,
    p2p_addrs: Vec<Multiaddr>,
    found_by_mdns: bool,
}

#[derive(NetworkBehaviour)]
struct Behaviour {
    limits: connection_limits::Behaviour,
    hello: request_response::json::Behaviour<Hello, Hello>,
    mdns: Toggle<mdns::tokio::Behaviour>,
}

enum Command {
    Dial(Multiaddr),
}

/// A running discovery node. See the module docs.
pub struct Discovery {
    peer_id: PeerId,
    listen_addrs: Arc<Mutex<Vec<Multiaddr>>>,
    commands: mpsc::Sender<Command>,
    events: mpsc::Receiver<DiscoveredPeer>,
    counters: Arc<Counters>,
    task: JoinHandle<()>,
}

impl Discovery {
    /// Starts the swarm and returns once it listens (at most 5 s), with a clear error for a bad
    /// listen address or one that cannot be bound.
    pub async fn start(config: DiscoveryConfig) -> Result<Discovery> {
        check_field("site", &config.site).map_err(|e| anyhow!("discovery config: {e}"))?;
        check_node_id(&config.node_id).map_err(|e| anyhow!("discovery config: {e}"))?;
        if config.data_addr.port() == 0 {
            bail!(
                "discovery config: data_addr {} has port 0",
                config.data_addr
            );
        }
        let listen: Multiaddr = config
            .listen
            .trim()
            .parse()
            .with_context(|| format!("invalid listen multiaddr {:?}", config.listen))?;
        check_tcp_addr(&listen)
            .with_context(|| format!("unsupported listen multiaddr {:?}", config.listen))?;

        let mut swarm = build_swarm(config.mdns)?;
        let peer_id = *swarm.local_peer_id();
        swarm
            .listen_on(listen.clone())
            .map_err(|e| anyhow!("cannot listen on {listen}: {e}"))?;

        let (commands, command_rx) = mpsc::channel(DIAL_QUEUE);
        let (event_tx, events) = mpsc::channel(EVENT_QUEUE);
        let listen_addrs = Arc::new(Mutex::new(Vec::new()));
        let counters = Arc::new(Counters::default());
        let mut worker = Worker {
            swarm,
            config,
            listen_addrs: listen_addrs.clone(),
            counters: counters.clone(),
            events: event_tx,
            connected: HashMap::new(),
            known: HashMap::new(),
            mdns_peers: HashMap::new(),
            greeted: HashMap::new(),
            foreign: HashMap::new(),
            recent_dials: HashMap::new(),
        };

        // Bounded wait for the first concrete listen address; events seen meanwhile are handled
        // as usual.
        let deadline = tokio::time::Instant::now() + LISTEN_TIMEOUT;
        while lock(&worker.listen_addrs).is_empty() {
            let event = match tokio::time::timeout_at(deadline, worker.swarm.next()).await {
                Err(_) => bail!("listening on {listen} did not start within {LISTEN_TIMEOUT:?}"),
                Ok(None) => bail!("listening on {listen}: the swarm stopped"),
                Ok(Some(event)) => event,
            };
            match &event {
                SwarmEvent::ListenerClosed { reason, .. } => {
                    let why = match reason {
                        Ok(()) => "closed".to_owned(),
                        Err(e) => e.to_string(),
                    };
                    bail!("cannot listen on {listen}: {why}");
                }
                SwarmEvent::ListenerError { error, .. } => {
                    bail!("cannot listen on {listen}: {error}")
                }
                _ => {}
            }
            worker.on_swarm_event(event);
        }
        info!(%peer_id, addrs = ?lock(&worker.listen_addrs), mdns = worker.config.mdns, "discovery listening");

        let task = tokio::spawn(worker.run(command_rx));
        Ok(Discovery {
            peer_id,
            listen_addrs,
            commands,
            events,
            counters,
            task,
        })
    }

    /// Dialable addresses of this node, each ending in `/p2p/<peer id>`; concrete addresses as
    /// the listener reports them, never `0.0.0.0`.
    pub fn listen_addrs(&self) -> Vec<String> {
        lock(&self.listen_addrs)
            .iter()
            .map(|a| with_p2p(a.clone(), self.peer_id).to_string())
            .collect()
    }

    /// Queues a dial of an address learned elsewhere (the stager's list of known peers). An
    /// unparsable or non-TCP multiaddr is an error; a dial to ourselves is ignored. Never blocks.
    pub fn dial(&self, addr: &str) -> Result<()> {
        if addr.len() > MAX_FIELD_BYTES {
            bail!("peer multiaddr longer than {MAX_FIELD_BYTES} bytes");
        }
        let parsed: Multiaddr = addr
            .trim()
            .parse()
            .with_context(|| format!("invalid peer multiaddr {addr:?}"))?;
        check_tcp_addr(&parsed).with_context(|| format!("unsupported peer multiaddr {addr:?}"))?;
        if peer_of(&parsed) == Some(self.peer_id) {
            debug!(%parsed, "ignoring a dial to ourselves");
            Counters::bump(&self.counters.dials_skipped);
            return Ok(());
        }
        self.commands
            .try_send(Command::Dial(parsed))
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => {
                    anyhow!("dial queue full ({DIAL_QUEUE} dials pending)")
                }
                mpsc::error::TrySendError::Closed(_) => anyhow!("discovery has stopped"),
            })
    }

    /// The next peer of this site (new, or with a changed data address). `None` once the swarm
    /// task has stopped.
    pub async fn next(&mut self) -> Option<DiscoveredPeer> {
        self.events.recv().await
    }

    /// This node's libp2p peer id.
    pub fn peer_id(&self) -> String {
        self.peer_id.to_string()
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> DiscoveryStats {
        self.counters.snapshot()
    }
}

impl Drop for Discovery {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn build_swarm(with_mdns: bool) -> Result<Swarm<Behaviour>> {
    let swarm = SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            tcp::Config::default(),
            noise::Config::new,
            yamux::Config::default,
        )
        .context("setting up the libp2p transport")?
        .with_behaviour(
            |key| -> std::result::Result<Behaviour, Box<dyn std::error::Error + Send + Sync>> {
                let limits = connection_limits::ConnectionLimits::default()
                    .with_max_pending_incoming(Some(64))
                    .with_max_pending_outgoing(Some(64))
                    .with_max_established(Some(2 * MAX_PEERS as u32))
                    .with_max_established_per_peer(Some(2));
                let codec = request_response::json::codec::Codec::<Hello, Hello>::default()
                    .set_request_size_maximum(MAX_HELLO_BYTES)
                    .set_response_size_maximum(MAX_HELLO_BYTES);
                let hello = request_response::Behaviour::with_codec(
                    codec,
                    [(StreamProtocol::new(HELLO_PROTOCOL), ProtocolSupport::Full)],
                    request_response::Config::default()
                        .with_request_timeout(HELLO_TIMEOUT)
                        .with_max_concurrent_streams(8),
                );
                let mdns = if with_mdns {
                    let behaviour = mdns::tokio::Behaviour::new(
                        mdns::Config::default(),
                        key.public().to_peer_id(),
                    )
                    .map_err(|e| format!("cannot start mDNS: {e}"))?;
                    Some(behaviour)
                } else {
                    None
                };
                Ok(Behaviour {
                    limits: connection_limits::Behaviour::new(limits),
                    hello,
                    mdns: Toggle::from(mdns),
                })
            },
        )
        .map_err(|e| anyhow!("setting up libp2p: {e}"))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(IDLE_TIMEOUT))
        .build();
    Ok(swarm)
}

/// State of a connected peer (over all its connections).
#[derive(Default)]
struct PeerConn {
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
struct Known {
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

struct Worker {
    swarm: Swarm<Behaviour>,
    config: DiscoveryConfig,
    listen_addrs: Arc<Mutex<Vec<Multiaddr>>>,
    counters: Arc<Counters>,
    events: mpsc::Sender<DiscoveredPeer>,
    connected: HashMap<PeerId, PeerConn>,
    /// Reported peers by node id.
    known: HashMap<String, Known>,
    /// Peers seen by mDNS and their addresses.
    mdns_peers: HashMap<PeerId, Vec<Multiaddr>>,
    /// Same-site peers whose Hello we had, and when.
    greeted: HashMap<PeerId, Instant>,
    /// Peers of another site, and when they were rejected.
    foreign: HashMap<PeerId, Instant>,
    /// Addresses without a peer id that were dialed, and when.
    recent_dials: HashMap<Multiaddr, Instant>,
}

impl Worker {
    async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
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

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
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

/// Checks a Hello from `peer`; `remote_ip` completes an unspecified data address.
fn validate_hello(
    hello: &Hello,
    peer: PeerId,
    remote_ip: Option<IpAddr>,
) -> std::result::Result<ValidHello, String> {
    check_field("site", &hello.site)?;
    check_node_id(&hello.node_id)?;
    check_field("data_addr", &hello.data_addr)?;
    let mut data_addr: SocketAddr = hello
        .data_addr
        .parse()
        .map_err(|_| format!("data_addr {:?} is not an address", hello.data_addr))?;
    if data_addr.port() == 0 {
        return Err(format!("data_addr {data_addr} has port 0"));
    }
    if data_addr.ip().is_multicast() {
        return Err(format!("data_addr {data_addr} is multicast"));
    }
    if data_addr.ip().is_unspecified() {
        match remote_ip {
            Some(ip) => data_addr.set_ip(ip),
            None => return Err(format!("data_addr {data_addr} is unspecified")),
        }
    }
    if hello.p2p_addrs.len() > MAX_HELLO_ADDRS {
        return Err(format!(
            "{} p2p addresses, more than {MAX_HELLO_ADDRS}",
            hello.p2p_addrs.len()
        ));
    }
    let mut p2p_addrs = Vec::new();
    for addr in &hello.p2p_addrs {
        check_field("p2p address", addr)?;
        let parsed: Multiaddr = addr
            .parse()
            .map_err(|_| format!("p2p address {addr:?} is not a multiaddr"))?;
        match peer_of(&parsed) {
            Some(p) if p != peer => {
                return Err(format!("p2p address {addr:?} names another peer"));
            }
            _ => {}
        }
        if is_concrete(&parsed) {
            p2p_addrs.push(parsed);
        }
    }
    Ok(ValidHello {
        site: hello.site.clone(),
        node_id: hello.node_id.clone(),
        data_addr,
        p2p_addrs,
        found_by_mdns: hello.found_by_mdns,
    })
}

fn check_field(name: &str, value: &str) -> std::result::Result<(), String> {
    if value.is_empty() {
        return Err(format!("{name} is empty"));
    }
    if value.len() > MAX_FIELD_BYTES {
        return Err(format!(
            "{name} is {} bytes, more than {MAX_FIELD_BYTES}",
            value.len()
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(format!("{name} has control characters"));
    }
    Ok(())
}

fn check_node_id(value: &str) -> std::result::Result<(), String> {
    check_field("node_id", value)?;
    // Node ids print as lowercase base32 (DNSSEC alphabet) or hex: letters and digits only.
    if !value
        .bytes()
        .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase())
    {
        return Err(format!(
            "node_id {value:?} is not lowercase letters and digits"
        ));
    }
    Ok(())
}

/// Accepts `/ip4|ip6/<ip>/tcp/<port>[/p2p/<peer id>]`, the only addresses this transport has.
fn check_tcp_addr(addr: &Multiaddr) -> Result<()> {
    let mut parts = addr.iter();
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (
            Some(Protocol::Ip4(_) | Protocol::Ip6(_)),
            Some(Protocol::Tcp(_)),
            None | Some(Protocol::P2p(_)),
            None,
        ) => Ok(()),
        _ => bail!("expected /ip4|ip6/<address>/tcp/<port>[/p2p/<peer id>]"),
    }
}

fn peer_of(addr: &Multiaddr) -> Option<PeerId> {
    match addr.iter().last() {
        Some(Protocol::P2p(peer)) => Some(peer),
        _ => None,
    }
}

fn with_p2p(addr: Multiaddr, peer: PeerId) -> Multiaddr {
    if peer_of(&addr).is_some() {
        addr
    } else {
        addr.with(Protocol::P2p(peer))
    }
}

fn ip_of(addr: &Multiaddr) -> Option<IpAddr> {
    match addr.iter().next() {
        Some(Protocol::Ip4(ip)) => Some(IpAddr::V4(ip)),
        Some(Protocol::Ip6(ip)) => Some(IpAddr::V6(ip)),
        _ => None,
    }
}

/// An address someone else could dial: a concrete IP (not 0.0.0.0 / ::) and a port.
fn is_concrete(addr: &Multiaddr) -> bool {
    ip_of(addr).is_some_and(|ip| !ip.is_unspecified())
        && addr
            .iter()
            .any(|p| matches!(p, Protocol::Tcp(port) if port != 0))
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

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::timeout;

    fn config(site: &str, node_id: &str, data_port: u16) -> DiscoveryConfig {
        DiscoveryConfig {
            listen: "/ip4/127.0.0.1/tcp/0".to_owned(),
            mdns: false,
            site: site.to_owned(),
            node_id: node_id.to_owned(),
            data_addr: SocketAddr::from(([127, 0, 0, 1], data_port)),
        }
    }

    async fn next_within(d: &mut Discovery, secs: u64) -> Option<DiscoveredPeer> {
        timeout(Duration::from_secs(secs), d.next())
            .await
            .ok()
            .flatten()
    }

    async fn wait_for(secs: u64, mut done: impl FnMut() -> bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < deadline {
            if done() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        done()
    }

    #[tokio::test]
    async fn same_site_dial_reports_both_sides() {
        let mut a = Discovery::start(config("a", "aa01", 7001)).await.unwrap();
        let mut b = Discovery::start(config("a", "bb02", 7002)).await.unwrap();
        let a_addrs = a.listen_addrs();
        assert!(!a_addrs.is_empty());
        for addr in &a_addrs {
            assert!(addr.ends_with(&format!("/p2p/{}", a.peer_id())), "{addr}");
            assert!(!addr.contains("0.0.0.0"), "{addr}");
        }
        b.dial(&a_addrs[0]).unwrap();
        let (seen_by_a, seen_by_b) = tokio::join!(next_within(&mut a, 10), next_within(&mut b, 10));
        let seen_by_a = seen_by_a.expect("A reports B within 10 s");
        let seen_by_b = seen_by_b.expect("B reports A within 10 s");
        assert_eq!(seen_by_a.node_id, "bb02");
        assert_eq!(seen_by_a.site, "a");
        assert_eq!(seen_by_a.data_addr, "127.0.0.1:7002".parse().unwrap());
        assert_eq!(seen_by_a.via, Via::Dial);
        assert!(seen_by_a
            .p2p_addrs
            .iter()
            .all(|x| x.ends_with(&b.peer_id())));
        assert!(seen_by_a.p2p_addrs.contains(&b.listen_addrs()[0]));
        assert_eq!(seen_by_b.node_id, "aa01");
        assert_eq!(seen_by_b.data_addr, "127.0.0.1:7001".parse().unwrap());
        assert_eq!(seen_by_b.via, Via::Dial);
        assert!(seen_by_b.p2p_addrs.contains(&a_addrs[0]));

        // Reported once: dialing again (the stager's list comes back often) reports nothing.
        b.dial(&a_addrs[0]).unwrap();
        a.dial(&b.listen_addrs()[0]).unwrap();
        assert_eq!(next_within(&mut a, 1).await, None);
        assert_eq!(next_within(&mut b, 1).await, None);
        assert_eq!(a.stats().reported, 1);
        assert_eq!(a.stats().other_site_rejected, 0);
    }

    #[tokio::test]
    async fn changed_data_addr_is_reported_again() {
        let mut a = Discovery::start(config("a", "aa01", 7001)).await.unwrap();
        let target = a.listen_addrs()[0].clone();

        let b1 = Discovery::start(config("a", "bb02", 7002)).await.unwrap();
        b1.dial(&target).unwrap();
        let first = next_within(&mut a, 10).await.expect("first report");
        assert_eq!(first.data_addr, "127.0.0.1:7002".parse().unwrap());
        drop(b1);

        // Same node restarted with another data address: reported again.
        let b2 = Discovery::start(config("a", "bb02", 7003)).await.unwrap();
        b2.dial(&target).unwrap();
        let second = next_within(&mut a, 10).await.expect("second report");
        assert_eq!(second.node_id, "bb02");
        assert_eq!(second.data_addr, "127.0.0.1:7003".parse().unwrap());
        drop(b2);

        // Restarted again with the same data address: not reported.
        let b3 = Discovery::start(config("a", "bb02", 7003)).await.unwrap();
        b3.dial(&target).unwrap();
        assert_eq!(next_within(&mut a, 2).await, None);
        assert_eq!(a.stats().reported, 2);
    }

    #[tokio::test]
    async fn other_site_is_rejected_and_counted() {
        let mut a = Discovery::start(config("a", "aa01", 7001)).await.unwrap();
        let mut b = Discovery::start(config("b", "bb02", 7002)).await.unwrap();
        b.dial(&a.listen_addrs()[0]).unwrap();
        let counted = wait_for(10, || {
            a.stats().other_site_rejected >= 1 && b.stats().other_site_rejected >= 1
        })
        .await;
        assert!(counted, "a: {:?}, b: {:?}", a.stats(), b.stats());
        let (seen_by_a, seen_by_b) = tokio::join!(next_within(&mut a, 3), next_within(&mut b, 3));
        assert_eq!(seen_by_a, None);
        assert_eq!(seen_by_b, None);
        assert_eq!(a.stats().reported, 0);
        assert_eq!(b.stats().reported, 0);
        assert_eq!(a.stats().other_site_rejected, 1);
    }

    #[tokio::test]
    async fn dial_to_self_is_ignored() {
        let mut a = Discovery::start(config("a", "aa01", 7001)).await.unwrap();
        for addr in a.listen_addrs() {
            a.dial(&addr).unwrap();
        }
        assert_eq!(next_within(&mut a, 1).await, None);
        assert!(a.stats().dials_skipped >= 1);
    }

    #[tokio::test]
    async fn bad_addresses_are_errors() {
        let a = Discovery::start(config("a", "aa01", 7001)).await.unwrap();
        for bad in [
            "",
            "not a multiaddr",
            "/ip4/127.0.0.1/tcp/notaport",
            "/dns4/example.com/tcp/1",
            "/ip4/127.0.0.1/udp/1",
            "/ip4/127.0.0.1/tcp/1/p2p/notapeerid",
        ] {
            assert!(a.dial(bad).is_err(), "dial({bad:?}) should fail");
        }
        assert!(a.dial(&"/ip4/127.0.0.1/tcp/1".repeat(20)).is_err());
        // An address without a peer id is fine (nothing listens there; the dial just fails).
        a.dial("/ip4/127.0.0.1/tcp/1").unwrap();

        for (listen, expect) in [
            ("garbage", "invalid listen multiaddr"),
            ("/ip4/127.0.0.1/udp/0", "unsupported listen multiaddr"),
            ("/ip4/203.0.113.7/tcp/0", "cannot listen on"),
        ] {
            let mut c = config("a", "cc03", 7003);
            c.listen = listen.to_owned();
            let err = match Discovery::start(c).await {
                Ok(_) => panic!("start with listen {listen:?} should fail"),
                Err(e) => format!("{e:#}"),
            };
            assert!(err.contains(expect), "{listen:?}: {err}");
        }

        let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut c = config("a", "cc03", 7003);
        c.listen = format!("/ip4/127.0.0.1/tcp/{}", held.local_addr().unwrap().port());
        let err = Discovery::start(c).await.err().expect("port in use");
        assert!(format!("{err:#}").contains("cannot listen on"), "{err:#}");

        let mut c = config("a", "not hex!", 7003);
        assert!(Discovery::start(c.clone()).await.is_err());
        c.node_id = "cc03".to_owned();
        c.site = String::new();
        assert!(Discovery::start(c).await.is_err());
    }

    #[test]
    fn malformed_hellos_are_rejected() {
        let peer = PeerId::random();
        let other = PeerId::random();
        let good = Hello {
            site: "a".into(),
            node_id: "ab12".into(),
            data_addr: "10.1.2.3:4433".into(),
            p2p_addrs: vec![format!("/ip4/10.1.2.3/tcp/4001/p2p/{peer}")],
            found_by_mdns: false,
        };
        let valid = validate_hello(&good, peer, None).unwrap();
        assert_eq!(valid.data_addr, "10.1.2.3:4433".parse().unwrap());
        assert_eq!(valid.p2p_addrs.len(), 1);

        let long = "a".repeat(MAX_FIELD_BYTES + 1);
        let cases: Vec<(&str, Hello)> = vec![
            (
                "long site",
                Hello {
                    site: long.clone(),
                    ..good.clone()
                },
            ),
            (
                "empty site",
                Hello {
                    site: String::new(),
                    ..good.clone()
                },
            ),
            (
                "long node id",
                Hello {
                    node_id: long.clone(),
                    ..good.clone()
                },
            ),
            (
                "node id with other characters",
                Hello {
                    node_id: "XY/z".into(),
                    ..good.clone()
                },
            ),
            (
                "bad addr",
                Hello {
                    data_addr: "nowhere".into(),
                    ..good.clone()
                },
            ),
            (
                "port 0",
                Hello {
                    data_addr: "10.1.2.3:0".into(),
                    ..good.clone()
                },
            ),
            (
                "long addr",
                Hello {
                    data_addr: long.clone(),
                    ..good.clone()
                },
            ),
            (
                "unspecified, no remote",
                Hello {
                    data_addr: "0.0.0.0:1".into(),
                    ..good.clone()
                },
            ),
            (
                "control chars",
                Hello {
                    site: "a\nb".into(),
                    ..good.clone()
                },
            ),
            (
                "too many addrs",
                Hello {
                    p2p_addrs: vec![good.p2p_addrs[0].clone(); MAX_HELLO_ADDRS + 1],
                    ..good.clone()
                },
            ),
            (
                "bad p2p addr",
                Hello {
                    p2p_addrs: vec!["junk".into()],
                    ..good.clone()
                },
            ),
            (
                "long p2p addr",
                Hello {
                    p2p_addrs: vec![long.clone()],
                    ..good.clone()
                },
            ),
            (
                "p2p addr of another peer",
                Hello {
                    p2p_addrs: vec![format!("/ip4/10.1.2.3/tcp/4001/p2p/{other}")],
                    ..good.clone()
                },
            ),
        ];
        for (what, hello) in cases {
            assert!(
                validate_hello(&hello, peer, None).is_err(),
                "{what} accepted"
            );
        }

        // An unspecified data address is completed with the connection's IP.
        let any = Hello {
            data_addr: "0.0.0.0:4433".into(),
            ..good.clone()
        };
        let remote = Some("192.0.2.9".parse().unwrap());
        let valid = validate_hello(&any, peer, remote).unwrap();
        assert_eq!(valid.data_addr, "192.0.2.9:4433".parse().unwrap());

        // Oversized or non-JSON bytes never reach validation: the codec refuses them.
        let json = serde_json::to_vec(&good).unwrap();
        assert!((json.len() as u64) < MAX_HELLO_BYTES);
        assert!(serde_json::from_slice::<Hello>(b"{\"site\":1}").is_err());
    }

    /// Set in the child process that runs the mDNS test inside a private network namespace.
    const NETNS_ENV: &str = "STAGECOACH_DISCOVERY_NETNS";

    #[tokio::test]
    async fn mdns_finds_peers_without_dialing() {
        if std::env::var_os(NETNS_ENV).is_some() {
            return mdns_in_namespace().await;
        }
        // mDNS needs a multicast interface and skips loopback. The host's interfaces lead to a
        // real network, which tests must not send to, so the test re-runs itself in a private
        // network namespace with a veth pair that reaches nothing but this process.
        let module = module_path!();
        let test_name = format!(
            "{}::mdns_finds_peers_without_dialing",
            module.split_once("::").map_or(module, |(_, rest)| rest)
        );
        if !stagecoach_testing::can_run(
            &test_name,
            &[stagecoach_testing::need::network_namespaces()],
        ) {
            return;
        }
        let exe = std::env::current_exe().expect("the test executable's path");
        let script = "set -e; ip link set lo up; \
            ip link add scdisc0 type veth peer name scdisc1; \
            ip addr add 10.233.0.1/24 dev scdisc0; \
            ip link set scdisc0 multicast on up; ip link set scdisc1 up; \
            ip route add 224.0.0.0/4 dev scdisc0; \
            echo STAGECOACH_NETNS_READY; exec \"$0\" \"$@\"";
        let output = tokio::process::Command::new("unshare")
            .args(["--net", "sh", "-c", script])
            .arg(&exe)
            .args([
                test_name.as_str(),
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(NETNS_ENV, "1")
            .kill_on_drop(true)
            .output();
        let output = match timeout(Duration::from_secs(60), output).await {
            Err(_) => panic!("mDNS test in a network namespace did not finish in 60 s"),
            Ok(Err(e)) => panic!("cannot run unshare for the mDNS test: {e}"),
            Ok(Ok(output)) => output,
        };
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        if !stdout.contains("STAGECOACH_NETNS_READY") {
            let reason = format!(
                "cannot give a private network namespace a multicast veth interface: {}",
                stderr.trim()
            );
            return stagecoach_testing::skip_or_fail(&test_name, &reason);
        }
        print!("{stdout}");
        assert!(
            output.status.success() && stdout.contains("1 passed"),
            "mDNS test in a network namespace failed:\n{stdout}\n{stderr}"
        );
        println!("mDNS test ran for real in a private network namespace");
    }

    async fn mdns_in_namespace() {
        let mdns_config = |node: &str, port| DiscoveryConfig {
            listen: "/ip4/0.0.0.0/tcp/0".to_owned(),
            mdns: true,
            ..config("a", node, port)
        };
        let mut a = Discovery::start(mdns_config("aa01", 7001)).await.unwrap();
        let mut b = Discovery::start(mdns_config("bb02", 7002)).await.unwrap();
        let (seen_by_a, seen_by_b) = tokio::join!(next_within(&mut a, 15), next_within(&mut b, 15));
        let seen_by_a = seen_by_a.expect("A finds B by mDNS within 15 s");
        let seen_by_b = seen_by_b.expect("B finds A by mDNS within 15 s");
        assert_eq!(seen_by_a.node_id, "bb02");
        assert_eq!(seen_by_a.data_addr, "127.0.0.1:7002".parse().unwrap());
        assert_eq!(seen_by_b.node_id, "aa01");
        assert_eq!(seen_by_b.data_addr, "127.0.0.1:7001".parse().unwrap());
        // Whoever dialed first did so because of mDNS, and says so in its Hello.
        assert_eq!(seen_by_a.via, Via::Mdns);
        assert_eq!(seen_by_b.via, Via::Mdns);
        assert_eq!(a.stats().dials_skipped, 0);
        println!("mDNS: A and B found each other");
    }
}
