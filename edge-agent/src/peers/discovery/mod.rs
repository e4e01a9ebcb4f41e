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
//!
//! The parts: `hello` (the message and its validation), `worker` (the swarm task: dials,
//! connections, mDNS and Hello events, bounded caches), `addr` (the multiaddrs this transport
//! dials).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _, Result};
use libp2p::futures::StreamExt;
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{
    connection_limits, mdns, noise, tcp, yamux, Multiaddr, PeerId, StreamProtocol, Swarm,
    SwarmBuilder,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{debug, info};

use addr::{check_tcp_addr, peer_of, with_p2p};
use hello::{check_field, check_node_id, Hello};
use worker::Worker;

mod addr;
mod hello;
#[cfg(test)]
mod tests;
mod worker;

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

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
