//! The stagers this origin has seen, for the console's overview and sites pages. Stagers do
//! not report to the node database as edges do; the origin knows them from their connections:
//! every request a stager's certificate makes marks it seen, and the announcement stream each
//! stager keeps open marks it connected. Kept in memory: after a restart the book fills again
//! as the stagers reconnect, which they do within seconds.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use proto::net::{NodeId, PeerIdentity};
use serde::Serialize;

/// A stager counts as up while its announcement stream is open, or for this long after its
/// last request.
pub const UP_WITHIN: Duration = Duration::from_secs(120);

/// Most stagers the book keeps; when full, the one seen longest ago makes room.
pub const MAX_STAGERS: usize = 100_000;

/// What the console shows of one stager.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct StagerSeen {
    /// Its node id (public key).
    pub id: String,
    /// Its site, from its certificate.
    pub site: String,
    /// Connected now, or seen within [`UP_WITHIN`].
    pub up: bool,
    /// Its announcement streams open now.
    pub subscriptions: usize,
    /// When it was first seen since this origin started (ms since the Unix epoch).
    pub first_seen_ms: u64,
    /// When it last made a request (ms since the Unix epoch).
    pub last_seen_ms: u64,
    /// What it last reported ([`proto::wire::Request::StagerStats`]), if it did.
    pub stats: Option<StagerStats>,
    /// Where its site's edges reach it ([`proto::wire::Request::StagerAddress`]), if it said.
    pub addr: Option<String>,
}

/// A stager's own figures, as it last reported them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct StagerStats {
    /// Payload bytes it served to its site's edges since it started.
    pub served_bytes: u64,
    /// Payload bytes it received from upstream since it started.
    pub pulled_bytes: u64,
    /// When it reported them (ms since the Unix epoch).
    pub reported_ms: u64,
}

#[derive(Debug)]
struct Entry {
    site: String,
    stats: Option<StagerStats>,
    addr: Option<String>,
    subscriptions: usize,
    first_seen_ms: u64,
    last_seen_ms: u64,
    last_seen: Instant,
}

/// The stagers seen since this origin started. Clones share the book.
#[derive(Clone, Debug, Default)]
pub struct StagerBook {
    entries: Arc<Mutex<BTreeMap<NodeId, Entry>>>,
}

/// Marks a stager's announcement stream open until dropped.
pub struct Subscribed {
    entries: Arc<Mutex<BTreeMap<NodeId, Entry>>>,
    id: NodeId,
}

impl Drop for Subscribed {
    fn drop(&mut self) {
        let mut entries = lock(&self.entries);
        if let Some(entry) = entries.get_mut(&self.id) {
            entry.subscriptions = entry.subscriptions.saturating_sub(1);
            entry.last_seen = Instant::now();
            entry.last_seen_ms = now_ms();
        }
    }
}

impl Entry {
    fn is_up(&self, now: Instant) -> bool {
        self.subscriptions > 0 || now.duration_since(self.last_seen) <= UP_WITHIN
    }
}

fn lock(entries: &Mutex<BTreeMap<NodeId, Entry>>) -> MutexGuard<'_, BTreeMap<NodeId, Entry>> {
    // A panic while holding the lock leaves a map that is still whole.
    entries
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl StagerBook {
    /// Marks `peer` (a stager) seen now. On every stager request: one lock, no allocation
    /// once the stager is known.
    pub fn touch(&self, peer: &PeerIdentity) {
        self.seen(peer.node_id, peer.site.as_str(), Instant::now(), |_| {});
    }

    /// Records the figures `peer` (a stager) reported.
    pub fn report(&self, peer: &PeerIdentity, served_bytes: u64, pulled_bytes: u64) {
        self.seen(peer.node_id, peer.site.as_str(), Instant::now(), |entry| {
            entry.stats = Some(StagerStats {
                served_bytes,
                pulled_bytes,
                reported_ms: now_ms(),
            });
        });
    }

    /// Records where `peer` (a stager) serves its site's edges.
    pub fn advertise(&self, peer: &PeerIdentity, addr: String) {
        self.seen(peer.node_id, peer.site.as_str(), Instant::now(), |entry| {
            entry.addr = Some(addr);
        });
    }

    /// The addresses of `site`'s stagers that are up and said where they serve, ordered by
    /// node id: what an enrolling node of `site` is given.
    pub fn site_addrs(&self, site: &str) -> Vec<String> {
        let now = Instant::now();
        lock(&self.entries)
            .values()
            .filter(|e| e.site == site && e.is_up(now))
            .filter_map(|e| e.addr.clone())
            .take(proto::bounds::MAX_SITE_STAGERS)
            .collect()
    }

    /// Marks `peer`'s announcement stream open until the guard is dropped.
    pub fn subscribed(&self, peer: &PeerIdentity) -> Subscribed {
        self.seen(peer.node_id, peer.site.as_str(), Instant::now(), |entry| {
            entry.subscriptions += 1;
        });
        Subscribed {
            entries: self.entries.clone(),
            id: peer.node_id,
        }
    }

    /// Marks stager `id` of `site` (from its certificate, so it never changes) seen at `now`
    /// and applies `change` to its entry. When the book is full, the stager seen longest ago
    /// without an open stream makes room; with none, the newcomer is not recorded.
    fn seen(&self, id: NodeId, site: &str, now: Instant, change: impl FnOnce(&mut Entry)) {
        let mut entries = lock(&self.entries);
        let ms = now_ms();
        if !entries.contains_key(&id) && entries.len() >= MAX_STAGERS {
            let oldest = entries
                .iter()
                .filter(|(_, e)| e.subscriptions == 0)
                .min_by_key(|(_, e)| e.last_seen)
                .map(|(id, _)| *id);
            match oldest {
                Some(oldest) => {
                    entries.remove(&oldest);
                }
                None => return,
            }
        }
        let entry = entries.entry(id).or_insert_with(|| Entry {
            site: site.to_owned(),
            stats: None,
            addr: None,
            subscriptions: 0,
            first_seen_ms: ms,
            last_seen_ms: ms,
            last_seen: now,
        });
        entry.last_seen = now;
        entry.last_seen_ms = ms;
        change(entry);
    }

    /// Every stager seen, by site then id.
    pub fn list(&self) -> Vec<StagerSeen> {
        let now = Instant::now();
        let mut list: Vec<StagerSeen> = lock(&self.entries)
            .iter()
            .map(|(id, e)| StagerSeen {
                id: id.to_string(),
                site: e.site.clone(),
                up: e.is_up(now),
                subscriptions: e.subscriptions,
                first_seen_ms: e.first_seen_ms,
                last_seen_ms: e.last_seen_ms,
                stats: e.stats,
                addr: e.addr.clone(),
            })
            .collect();
        list.sort_by(|a, b| (&a.site, &a.id).cmp(&(&b.site, &b.id)));
        list
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stager_is_up_while_subscribed_or_recently_seen() {
        let book = StagerBook::default();
        let (s1, s2) = (NodeId([1; 32]), NodeId([2; 32]));
        let long_ago = Instant::now() - UP_WITHIN - Duration::from_secs(1);
        book.seen(s1, "west", long_ago, |_| {});
        book.seen(s2, "east", Instant::now(), |_| {});
        let list = book.list();
        assert_eq!(list.len(), 2);
        assert_eq!((list[0].id.clone(), list[0].up), (s2.to_string(), true));
        assert_eq!((list[1].id.clone(), list[1].up), (s1.to_string(), false));
        {
            let entries = book.entries.clone();
            lock(&entries).get_mut(&s1).expect("s1").subscriptions = 1;
            let guard = Subscribed { entries, id: s1 };
            assert!(book.list()[1].up, "an open stream keeps it up");
            drop(guard);
        }
        let seen = book
            .list()
            .into_iter()
            .find(|s| s.id == s1.to_string())
            .expect("s1");
        assert_eq!(seen.subscriptions, 0);
        assert!(seen.up, "the stream's end counts as seen");
    }

    #[test]
    fn an_enrolling_node_gets_the_up_stagers_of_its_site_that_said_where_they_serve() {
        let book = StagerBook::default();
        let peer = |id: u8, site: &str| PeerIdentity {
            node_id: NodeId([id; 32]),
            role: proto::net::Role::Stager,
            site: site.parse().expect("site"),
        };
        book.advertise(&peer(2, "west"), "10.0.0.2:7410".into());
        book.advertise(&peer(1, "west"), "10.0.0.1:7410".into());
        book.advertise(&peer(3, "east"), "10.0.1.1:7410".into());
        book.touch(&peer(4, "west"));
        let long_ago = Instant::now() - UP_WITHIN - Duration::from_secs(1);
        book.seen(NodeId([5; 32]), "west", long_ago, |e| {
            e.addr = Some("10.0.0.5:7410".into())
        });
        assert_eq!(
            book.site_addrs("west"),
            ["10.0.0.1:7410", "10.0.0.2:7410"],
            "up, with an address, of the site, by node id"
        );
        assert_eq!(book.site_addrs("north"), Vec::<String>::new());
    }
}
