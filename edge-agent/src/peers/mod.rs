//! Peer caching inside a site: downloads from many sources at once ([`download`]), and the
//! site's control plane that tells who is here and who holds what ([`discovery`] and the
//! stager's tracker).
//!
//! The control plane is a tracker on the site's stager: every edge daemon reports what it holds
//! ([`Request::SitePeers`]) every [`TRACKER_INTERVAL`] and gets the other edges of its site
//! back, with what they hold. Why a tracker rather than gossip: the stager already knows every
//! edge of its site (they are its clients, with certificates naming the site), so the tracker
//! needs no discovery and no extra port, works where multicast is off, and cannot leak another
//! site's peers (the stager only lists edges whose certificate names its site). Its cost is one
//! small request per edge per interval. Announcements are hints: data from a peer is verified
//! like any other, and a peer that lies is banned.
//!
//! Discovery is libp2p ([`discovery`]): every daemon listens for libp2p connections and reports
//! its libp2p addresses to the tracker, so the stager's answer is also the site's list of known
//! peers, which each daemon dials (where multicast is off); with `--mdns`, peers on the LAN find
//! each other without any stager. A discovered peer is asked directly what it holds (the same
//! [`Request::SitePeers`], answered by the peer's daemon with itself alone) whenever no stager
//! answers the tracker request, so a site whose stager is down still shares among its edges.

pub mod board;
pub mod discovery;
pub mod download;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proto::net::{call, client_endpoint, connect, NodeIdentity};
use proto::wire::{Holding, Request, Response, SitePeer, MAX_FRAME_BYTES, MAX_HOLDINGS};
use tokio::sync::{mpsc, oneshot};

pub use board::{Announcer, PeerBoard, Silent};
use discovery::{Discovery, DiscoveryConfig};
use download::PeerHave;

/// How often an edge reports to its stager's tracker and learns what its peers hold.
pub const TRACKER_INTERVAL: Duration = Duration::from_millis(300);

/// Peer discovery settings of the daemon.
#[derive(Clone, Debug)]
pub struct P2pConfig {
    /// libp2p listen address (multiaddr).
    pub listen: String,
    /// Also discover peers with mDNS.
    pub mdns: bool,
}

/// Peers found by libp2p discovery: node id → data address.
type Direct = Arc<Mutex<BTreeMap<String, SocketAddr>>>;

/// How long the tracker waits for a stager's handshake before it asks the peers it discovered.
const TRACKER_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Most libp2p addresses of the stager's list dialed per tracker answer.
const MAX_DIALS_PER_ROUND: usize = 64;

/// This node's holdings, reported to the tracker.
#[derive(Default)]
struct Holdings {
    by_bundle: BTreeMap<String, Vec<(u32, u32)>>,
    order: Vec<String>,
}

impl Holdings {
    fn report(&self) -> Vec<Holding> {
        self.order
            .iter()
            .rev()
            .take(MAX_HOLDINGS)
            .filter_map(|bundle| {
                self.by_bundle.get(bundle).map(|pieces| Holding {
                    bundle: bundle.clone(),
                    pieces: pieces.clone(),
                })
            })
            .collect()
    }
}

struct TrackerAnnouncer {
    holdings: Arc<Mutex<Holdings>>,
}

impl Announcer for TrackerAnnouncer {
    fn announce(&self, bundle: &str, pieces: Vec<(u32, u32)>, _complete: bool) {
        let mut holdings = self.holdings.lock().unwrap_or_else(|e| e.into_inner());
        if !holdings.by_bundle.contains_key(bundle) {
            holdings.order.push(bundle.to_owned());
        }
        holdings.by_bundle.insert(bundle.to_owned(), pieces);
    }

    fn holdings(&self) -> Vec<Holding> {
        self.holdings
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .report()
    }
}

/// Starts reporting to the site's tracker (the stagers in `stagers`) and learning from it:
/// what the other edges hold is recorded on `board`. Returns the announcer through which this
/// node's downloads say what it now holds, and where to send the address peers reach this
/// node's daemon at; the tracker starts once it arrives.
pub fn spawn_tracker(
    identity: NodeIdentity,
    stagers: Vec<SocketAddr>,
    board: Arc<Mutex<PeerBoard>>,
    p2p: P2pConfig,
) -> (Arc<dyn Announcer>, oneshot::Sender<SocketAddr>) {
    let holdings = Arc::new(Mutex::new(Holdings::default()));
    let (addr_tx, addr_rx) = oneshot::channel::<SocketAddr>();
    tokio::spawn(track(
        identity,
        stagers,
        holdings.clone(),
        board,
        addr_rx,
        p2p,
    ));
    (Arc::new(TrackerAnnouncer { holdings }), addr_tx)
}

/// Starts libp2p discovery and a task that feeds it dials and records what it finds in
/// `direct`. Returns this node's libp2p addresses and where to send addresses to dial; `None`
/// when discovery could not start (the tracker still works).
async fn start_discovery(
    identity: &NodeIdentity,
    p2p: P2pConfig,
    data_addr: SocketAddr,
    direct: Direct,
) -> Option<(Vec<String>, mpsc::Sender<String>)> {
    let config = DiscoveryConfig {
        listen: p2p.listen.clone(),
        mdns: p2p.mdns,
        site: identity.site().as_str().to_owned(),
        node_id: identity.node_id().to_string(),
        data_addr,
    };
    let mut discovery = match Discovery::start(config).await {
        Ok(discovery) => discovery,
        Err(error) => {
            tracing::error!(listen = %p2p.listen, error = format!("{error:#}"), "peer discovery (libp2p) did not start; using the stager's tracker only");
            return None;
        }
    };
    let addrs = discovery.listen_addrs();
    tracing::info!(addrs = ?addrs, mdns = p2p.mdns, "peer discovery listening");
    let (dial_tx, mut dial_rx) = mpsc::channel::<String>(MAX_DIALS_PER_ROUND);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                found = discovery.next() => {
                    let Some(peer) = found else { break };
                    tracing::info!(node = %peer.node_id, data = %peer.data_addr, via = ?peer.via, "discovered a peer of the site");
                    direct.lock().unwrap_or_else(|e| e.into_inner()).insert(peer.node_id, peer.data_addr);
                }
                addr = dial_rx.recv() => {
                    let Some(addr) = addr else { break };
                    if let Err(error) = discovery.dial(&addr) {
                        tracing::debug!(%addr, %error, "cannot dial a listed peer");
                    }
                }
            }
        }
    });
    Some((addrs, dial_tx))
}

/// Reports to the first stager that answers, every [`TRACKER_INTERVAL`], and records what the
/// other edges of the site hold; dials the libp2p addresses the stager lists. When no stager
/// answers, asks the peers discovery found directly.
async fn track(
    identity: NodeIdentity,
    stagers: Vec<SocketAddr>,
    holdings: Arc<Mutex<Holdings>>,
    board: Arc<Mutex<PeerBoard>>,
    data_addr: oneshot::Receiver<SocketAddr>,
    p2p: P2pConfig,
) {
    let Ok(data_addr) = data_addr.await else {
        return;
    };
    let endpoint = match client_endpoint(&identity) {
        Ok(endpoint) => endpoint,
        Err(error) => {
            tracing::error!(%error, "cannot start the tracker client; peers are off");
            return;
        }
    };
    let direct: Direct = Arc::default();
    let (p2p_addrs, dials) = match start_discovery(&identity, p2p, data_addr, direct.clone()).await
    {
        Some((addrs, dials)) => (addrs, Some(dials)),
        None => (Vec::new(), None),
    };
    let own_id = identity.node_id().to_string();
    let mut conn: Option<quinn::Connection> = None;
    let mut peer_conns: BTreeMap<SocketAddr, quinn::Connection> = BTreeMap::new();
    let mut ticker = tokio::time::interval(TRACKER_INTERVAL);
    loop {
        ticker.tick().await;
        let have = holdings.lock().unwrap_or_else(|e| e.into_inner()).report();
        let request = Request::SitePeers {
            data_addr: data_addr.to_string(),
            p2p_addrs: p2p_addrs.clone(),
            have,
        };
        let mut answered = false;
        for &stager in &stagers {
            let current = match conn.as_ref().filter(|c| c.close_reason().is_none()) {
                Some(c) => c.clone(),
                None => {
                    match tokio::time::timeout(TRACKER_CONNECT_TIMEOUT, connect(&endpoint, stager))
                        .await
                    {
                        Ok(Ok(c)) => {
                            conn = Some(c.clone());
                            c
                        }
                        Ok(Err(error)) => {
                            tracing::debug!(%stager, %error, "tracker unreachable here");
                            continue;
                        }
                        Err(_) => {
                            tracing::debug!(%stager, "tracker did not answer in time");
                            continue;
                        }
                    }
                }
            };
            match call(&current, &request, MAX_FRAME_BYTES).await {
                Ok(Response::SitePeers(peers)) => {
                    if let Some(dials) = &dials {
                        for addr in peers
                            .iter()
                            .flat_map(|p| &p.p2p_addrs)
                            .take(MAX_DIALS_PER_ROUND)
                        {
                            // A full queue skips this round's rest; the next answer lists them again.
                            if dials.try_send(addr.clone()).is_err() {
                                break;
                            }
                        }
                    }
                    record(&board, peers, &own_id);
                    answered = true;
                    break;
                }
                Ok(other) => {
                    tracing::debug!(%stager, answer = ?other, "tracker refused");
                    conn = None;
                }
                Err(error) => {
                    tracing::debug!(%stager, %error, "tracker request failed");
                    conn = None;
                }
            }
        }
        if !answered {
            tracing::debug!("no stager answered the tracker request; asking discovered peers");
            let peers: Vec<SocketAddr> = direct
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .values()
                .copied()
                .collect();
            for addr in peers {
                ask_peer(&endpoint, &mut peer_conns, addr, &request, &board, &own_id).await;
            }
        }
    }
}

/// Asks one discovered peer what it holds (its daemon answers with itself alone).
async fn ask_peer(
    endpoint: &quinn::Endpoint,
    conns: &mut BTreeMap<SocketAddr, quinn::Connection>,
    addr: SocketAddr,
    request: &Request,
    board: &Arc<Mutex<PeerBoard>>,
    own_id: &str,
) {
    let conn = match conns.get(&addr).filter(|c| c.close_reason().is_none()) {
        Some(c) => c.clone(),
        None => {
            match tokio::time::timeout(TRACKER_CONNECT_TIMEOUT, connect(endpoint, addr)).await {
                Ok(Ok(c)) => {
                    conns.insert(addr, c.clone());
                    c
                }
                Ok(Err(error)) => {
                    tracing::debug!(peer = %addr, %error, "discovered peer unreachable");
                    return;
                }
                Err(_) => {
                    tracing::debug!(peer = %addr, "discovered peer did not answer in time");
                    return;
                }
            }
        }
    };
    match call(&conn, request, MAX_FRAME_BYTES).await {
        Ok(Response::SitePeers(peers)) => record(board, peers, own_id),
        Ok(other) => tracing::debug!(peer = %addr, answer = ?other, "peer refused to list itself"),
        Err(error) => {
            tracing::debug!(peer = %addr, %error, "peer request failed");
            conns.remove(&addr);
        }
    }
}

/// Records what `peers` hold on the board (never this node itself).
fn record(board: &Arc<Mutex<PeerBoard>>, peers: Vec<SitePeer>, own_id: &str) {
    let mut board = board.lock().unwrap_or_else(|e| e.into_inner());
    for peer in peers.into_iter().filter(|p| p.node_id != own_id) {
        let Ok(addr) = peer.data_addr.parse::<SocketAddr>() else {
            tracing::debug!(node = %peer.node_id, addr = %peer.data_addr, "peer with a bad address ignored");
            continue;
        };
        for holding in peer.have {
            board.record(
                &holding.bundle,
                PeerHave {
                    node_id: peer.node_id.clone(),
                    data_addr: addr,
                    pieces: holding.pieces,
                },
            );
        }
    }
}
