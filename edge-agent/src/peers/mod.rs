//! Peer caching inside a site: downloads from many sources at once ([`download`]), and the
//! site's control plane that tells who is here and who holds what.
//!
//! The control plane is a tracker on the site's stager: every edge daemon reports what it holds
//! ([`Request::SitePeers`]) every [`TRACKER_INTERVAL`] and gets the other edges of its site
//! back, with what they hold. Why a tracker rather than gossip: the stager already knows every
//! edge of its site (they are its clients, with certificates naming the site), so the tracker
//! needs no discovery and no extra port, works where multicast is off, and cannot leak another
//! site's peers (the stager only lists edges whose certificate names its site). Its cost is one
//! small request per edge per interval. Announcements are hints: data from a peer is verified
//! like any other, and a peer that lies is banned.

pub mod download;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use proto::net::{call, client_endpoint, connect, NodeIdentity};
use proto::wire::{Holding, Request, Response, MAX_FRAME_BYTES, MAX_HOLDINGS};

use crate::daemon::{self, Announcer, DaemonConfig, DaemonReady, PeerBoard, Silent};
use crate::fetch::identity_dir;
use download::PeerHave;

/// How often an edge reports to its stager's tracker and learns what its peers hold.
pub const TRACKER_INTERVAL: Duration = Duration::from_millis(300);

/// Peer discovery settings of the daemon.
#[derive(Clone, Debug)]
pub struct P2pConfig {
    /// libp2p listen address (multiaddr), for discovery beyond the tracker (not yet used).
    pub listen: String,
    /// Also discover peers with mDNS (not yet used).
    pub mdns: bool,
}

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
}

/// Runs the daemon; with `config.peers` on, it reports to and learns from the stager's
/// tracker, and its downloads use the peers it learns of.
pub async fn serve_with_peers(
    config: DaemonConfig,
    p2p: P2pConfig,
    ready: impl FnOnce(&DaemonReady) -> Result<()> + Send + 'static,
) -> Result<()> {
    let board = Arc::new(Mutex::new(PeerBoard::default()));
    if !config.peers {
        return daemon::serve(config, board, Arc::new(Silent), ready).await;
    }
    if p2p.mdns {
        tracing::warn!("mDNS discovery is not built yet; using the stager's tracker only");
    }
    let identity = NodeIdentity::load(&identity_dir(&config.dir))?;
    let holdings = Arc::new(Mutex::new(Holdings::default()));
    let (addr_tx, addr_rx) = tokio::sync::oneshot::channel::<SocketAddr>();
    tokio::spawn(track(
        identity,
        config.stagers.clone(),
        holdings.clone(),
        board.clone(),
        addr_rx,
    ));
    let announcer = Arc::new(TrackerAnnouncer { holdings });
    daemon::serve(config, board, announcer, move |info| {
        if let Ok(addr) = info.mesh.parse::<SocketAddr>() {
            let _ = addr_tx.send(advertised(addr));
        }
        ready(info)
    })
    .await
}

/// Reports to the first stager that answers, every [`TRACKER_INTERVAL`], and records what the
/// other edges of the site hold.
async fn track(
    identity: NodeIdentity,
    stagers: Vec<SocketAddr>,
    holdings: Arc<Mutex<Holdings>>,
    board: Arc<Mutex<PeerBoard>>,
    data_addr: tokio::sync::oneshot::Receiver<SocketAddr>,
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
    let mut conn: Option<quinn::Connection> = None;
    let mut ticker = tokio::time::interval(TRACKER_INTERVAL);
    loop {
        ticker.tick().await;
        let have = holdings.lock().unwrap_or_else(|e| e.into_inner()).report();
        let request = Request::SitePeers {
            data_addr: data_addr.to_string(),
            p2p_addrs: Vec::new(),
            have,
        };
        let mut answered = false;
        for &stager in &stagers {
            let current = match conn.as_ref().filter(|c| c.close_reason().is_none()) {
                Some(c) => c.clone(),
                None => match connect(&endpoint, stager).await {
                    Ok(c) => {
                        conn = Some(c.clone());
                        c
                    }
                    Err(error) => {
                        tracing::debug!(%stager, %error, "tracker unreachable here");
                        continue;
                    }
                },
            };
            match call(&current, &request, MAX_FRAME_BYTES).await {
                Ok(Response::SitePeers(peers)) => {
                    let mut board = board.lock().unwrap_or_else(|e| e.into_inner());
                    for peer in peers {
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
            tracing::debug!("no stager answered the tracker request");
        }
    }
}

/// The address peers should use: an unspecified bind address is advertised as loopback.
fn advertised(addr: SocketAddr) -> SocketAddr {
    if addr.ip().is_unspecified() {
        SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), addr.port())
    } else {
        addr
    }
}
