//! What the site's peers hold, as this node learned it ([`PeerBoard`]), and where this node
//! says what it holds ([`Announcer`]).

use std::collections::HashMap;

use proto::wire::Holding;
use tokio::sync::mpsc;

use super::download::PeerHave;

/// Queue of announcements waiting for a download, per download.
const PEER_QUEUE: usize = 1024;

/// What the site's peers announced, by bundle, and the downloads listening for more.
#[derive(Default)]
pub struct PeerBoard {
    held: HashMap<(String, String), PeerHave>,
    listeners: HashMap<String, Vec<mpsc::Sender<PeerHave>>>,
}

impl PeerBoard {
    /// Records an announcement for `bundle` and hands it to the downloads of that bundle.
    pub fn record(&mut self, bundle: &str, have: PeerHave) {
        if let Some(listeners) = self.listeners.get_mut(bundle) {
            listeners.retain(|tx| !tx.is_closed());
            for tx in listeners.iter() {
                // A full queue drops this one; the peer announces again.
                let _ = tx.try_send(have.clone());
            }
        }
        self.held
            .insert((bundle.to_owned(), have.node_id.clone()), have);
    }

    /// Forgets a peer that left.
    pub fn forget(&mut self, node_id: &str) {
        self.held.retain(|(_, node), _| node != node_id);
    }

    /// A receiver of every announcement for `bundle`: those known now, then new ones.
    pub fn subscribe(&mut self, bundle: &str) -> mpsc::Receiver<PeerHave> {
        let (tx, rx) = mpsc::channel(PEER_QUEUE);
        for ((b, _), have) in &self.held {
            if b == bundle {
                let _ = tx.try_send(have.clone());
            }
        }
        self.listeners
            .entry(bundle.to_owned())
            .or_default()
            .push(tx);
        rx
    }
}

/// Where this node's own holdings are announced to the site.
pub trait Announcer: Send + Sync + 'static {
    /// This node now holds `pieces` of `bundle` (`complete` when all).
    fn announce(&self, bundle: &str, pieces: Vec<(u32, u32)>, complete: bool);

    /// What this node holds, as announced (newest bundles first, at most
    /// [`proto::wire::MAX_HOLDINGS`]); a peer that found this node without the tracker asks.
    fn holdings(&self) -> Vec<Holding> {
        Vec::new()
    }
}

/// No peers: announcements go nowhere.
pub struct Silent;

impl Announcer for Silent {
    fn announce(&self, _bundle: &str, _pieces: Vec<(u32, u32)>, _complete: bool) {}
}
