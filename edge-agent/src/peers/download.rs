//! A bundle's chunks from many sources at once: the site's stagers (seeds), the peers of the
//! site that announced them, and the origin as the last resort. The pure
//! [`proto::planner::Planner`] decides what to ask of whom; this module does the asking, over
//! QUIC, verified group by group into the store.
//!
//! A piece is one distinct chunk of the manifest, numbered in manifest order (first occurrence):
//! every node derives the same numbering from the same signed manifest, so peers can announce
//! what they hold as piece ranges.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use proto::manifest::Manifest;
use proto::mesh::fetch::{fetch_blob, FetchError};
use proto::mesh::PeerCounters;
use proto::metrics::Metrics;
use proto::net::connect;
use proto::planner::{PieceId, Planner, PlannerConfig, SourceId, SourceKind};
use proto::store::Store;
use proto::BlobHash;
use quinn::{Connection, Endpoint};
use tokio::sync::mpsc;
use tokio::task::AbortHandle;

/// Chunk requests in flight at one source.
pub const MAX_IN_FLIGHT_PER_SOURCE: u32 = 4;

/// Chunk requests in flight at a stager when peers share the work.
pub const MAX_IN_FLIGHT_PER_SEED_WITH_PEERS: u32 = 1;

/// How long a piece held by busy peers waits before a seed (the stager) is asked instead.
pub const SEED_FALLBACK_AFTER: Duration = Duration::from_millis(1500);

/// The distinct chunks of `manifest` in manifest order: the pieces of a download.
pub fn pieces_of(manifest: &Manifest) -> Vec<(BlobHash, u64)> {
    let mut seen = std::collections::HashSet::new();
    manifest
        .chunks
        .iter()
        .filter(|chunk| seen.insert(chunk.hash))
        .map(|chunk| (chunk.hash, chunk.stored_bytes))
        .collect()
}

/// Piece ranges `[start, end)` of the pieces `held` marks.
pub fn held_ranges(held: &[bool]) -> Vec<(u32, u32)> {
    let mut ranges = Vec::new();
    let mut start = None;
    for (i, &h) in held.iter().enumerate() {
        match (h, start) {
            (true, None) => start = Some(i as u32),
            (false, Some(s)) => {
                ranges.push((s, i as u32));
                start = None;
            }
            _ => {}
        }
    }
    if let Some(s) = start {
        ranges.push((s, held.len() as u32));
    }
    ranges
}

/// A peer of the site announcing what it holds of this bundle.
#[derive(Clone, Debug)]
pub struct PeerHave {
    /// The peer's node id.
    pub node_id: String,
    /// Where it serves blobs.
    pub data_addr: SocketAddr,
    /// Held piece ranges `[start, end)`.
    pub pieces: Vec<(u32, u32)>,
}

/// What a source is, for counters and logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceRole {
    /// A stager of the site.
    Stager,
    /// The origin (last resort).
    Origin,
    /// An edge of the site.
    Peer,
}

impl SourceRole {
    fn as_str(self) -> &'static str {
        match self {
            SourceRole::Stager => "stager",
            SourceRole::Origin => "origin",
            SourceRole::Peer => "edge",
        }
    }
}

struct Source {
    addr: SocketAddr,
    role: SourceRole,
    conn: Arc<tokio::sync::Mutex<Option<Connection>>>,
    counters: PeerCounters,
}

/// What a download moved.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Moved {
    /// Bytes received from every source.
    pub bytes_received: u64,
    /// Of those, from peers.
    pub bytes_from_peers: u64,
    /// Pieces that were held before the download started.
    pub pieces_present: u64,
    /// Sources banned for bad data.
    pub banned: Vec<SocketAddr>,
}

/// Everything one download needs.
pub struct Download {
    /// Client endpoint with the node's identity.
    pub endpoint: Endpoint,
    /// The node's store.
    pub store: Store,
    /// The site's stagers.
    pub stagers: Vec<SocketAddr>,
    /// The origin, asked only when no stager can serve.
    pub origin: Option<SocketAddr>,
    /// Where to count bytes by source role.
    pub metrics: Arc<Metrics>,
    /// This node's site, for counters.
    pub site: String,
    /// Seed of the planner's tie-breaking (differs per node so that peers spread).
    pub seed: u64,
}

struct Outcome {
    source: SourceId,
    piece: PieceId,
    started: Instant,
    result: Result<u64, FetchError>,
}

impl Download {
    /// Fetches every piece of `manifest` the store lacks. `peers` delivers announcements of
    /// the site's peers (closed or `None` without peers); `on_piece` is called with each piece
    /// completed here and the bytes held so far (for progress and for announcing).
    pub async fn run(
        self,
        manifest: &Manifest,
        mut peers: Option<mpsc::Receiver<PeerHave>>,
        mut on_piece: impl FnMut(PieceId, &[bool], u64),
    ) -> Result<Moved> {
        let pieces = pieces_of(manifest);
        let mut held: Vec<bool> = pieces
            .iter()
            .map(|(hash, _)| self.store.has_blob(hash))
            .collect();
        let mut moved = Moved {
            pieces_present: held.iter().filter(|h| **h).count() as u64,
            ..Moved::default()
        };
        let total: u64 = pieces.iter().map(|(_, size)| size).sum();
        let mut done_bytes: u64 = pieces
            .iter()
            .zip(&held)
            .filter(|(_, h)| **h)
            .map(|((_, size), _)| size)
            .sum();
        let config = PlannerConfig {
            max_in_flight_per_source: MAX_IN_FLIGHT_PER_SOURCE,
            // With peers, one request per edge keeps the stager busy and leaves the rest of the
            // site's traffic to the peers; alone, the edge keeps the stager's pipe full.
            max_in_flight_per_seed: peers.is_some().then_some(MAX_IN_FLIGHT_PER_SEED_WITH_PEERS),
            // One writer per blob in the store: duplicates would only wait on each other.
            endgame_max_duplicates: 0,
            seed_fallback_after: SEED_FALLBACK_AFTER,
            ..PlannerConfig::default()
        };
        let sizes = pieces.iter().map(|(_, size)| *size).collect();
        let mut planner = Planner::new(sizes, &held, config, self.seed);
        let mut sources: Vec<Source> = Vec::new();
        let mut by_addr: HashMap<SocketAddr, SourceId> = HashMap::new();
        let add = |sources: &mut Vec<Source>,
                   by_addr: &mut HashMap<SocketAddr, SourceId>,
                   planner: &mut Planner,
                   addr: SocketAddr,
                   role: SourceRole|
         -> SourceId {
            if let Some(&id) = by_addr.get(&addr) {
                return id;
            }
            let id = sources.len() as SourceId;
            let site = if role == SourceRole::Origin {
                "origin"
            } else {
                self.site.as_str()
            };
            sources.push(Source {
                addr,
                role,
                conn: Arc::new(tokio::sync::Mutex::new(None)),
                counters: PeerCounters::new(&self.metrics, role.as_str(), site),
            });
            by_addr.insert(addr, id);
            let kind = if role == SourceRole::Peer {
                SourceKind::Peer
            } else {
                SourceKind::Seed
            };
            planner.add_source(id, kind);
            if kind == SourceKind::Seed {
                planner.source_has_all(id);
            }
            id
        };
        for &addr in &self.stagers {
            add(
                &mut sources,
                &mut by_addr,
                &mut planner,
                addr,
                SourceRole::Stager,
            );
        }
        let mut origin_added = false;
        if self.stagers.is_empty() {
            if let Some(addr) = self.origin {
                add(
                    &mut sources,
                    &mut by_addr,
                    &mut planner,
                    addr,
                    SourceRole::Origin,
                );
                origin_added = true;
            }
        }

        let epoch = Instant::now();
        let (done_tx, mut done_rx) = mpsc::channel::<Outcome>(256);
        let mut running: HashMap<(SourceId, PieceId), AbortHandle> = HashMap::new();
        let mut tasks = tokio::task::JoinSet::new();
        while !planner.is_done() {
            let now = epoch.elapsed();
            for request in planner.poll(now) {
                let Some(source) = sources.get(request.source as usize) else {
                    planner.on_cancelled(request.source, request.piece);
                    continue;
                };
                let Some(&(hash, size)) = pieces.get(request.piece as usize) else {
                    planner.on_cancelled(request.source, request.piece);
                    continue;
                };
                let (endpoint, store, conn_slot, counters, addr) = (
                    self.endpoint.clone(),
                    self.store.clone(),
                    source.conn.clone(),
                    source.counters.clone(),
                    source.addr,
                );
                let done_tx = done_tx.clone();
                let handle = tasks.spawn(async move {
                    let started = Instant::now();
                    let result = async {
                        let conn = connection(&endpoint, &conn_slot, addr).await?;
                        fetch_blob(&conn, &store, hash, size, &counters, None).await
                    }
                    .await;
                    let _ = done_tx
                        .send(Outcome {
                            source: request.source,
                            piece: request.piece,
                            started,
                            result,
                        })
                        .await;
                });
                running.insert((request.source, request.piece), handle);
            }
            if planner.in_flight() == 0 && !planner.unavailable_pieces().is_empty() {
                // No stager can serve what is left: the origin is the last resort.
                match self.origin {
                    Some(addr) if !origin_added => {
                        tracing::warn!(origin = %addr, "no stager or peer can serve the rest; asking the origin");
                        add(
                            &mut sources,
                            &mut by_addr,
                            &mut planner,
                            addr,
                            SourceRole::Origin,
                        );
                        origin_added = true;
                        continue;
                    }
                    _ => bail!(
                        "no source can provide {} chunks of bundle {}@{} (sources tried: {})",
                        planner.unavailable_pieces().len(),
                        manifest.name,
                        manifest.version,
                        sources
                            .iter()
                            .map(|s| format!("{} {}", s.role.as_str(), s.addr))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                }
            }
            let wakeup = planner
                .next_wakeup()
                .map(|at| at.saturating_sub(epoch.elapsed()))
                .unwrap_or(Duration::from_secs(1))
                .max(Duration::from_millis(1));
            tokio::select! {
                outcome = done_rx.recv() => {
                    let Some(outcome) = outcome else { bail!("download tasks vanished") };
                    running.remove(&(outcome.source, outcome.piece));
                    let now = epoch.elapsed();
                    let source = &sources[outcome.source as usize];
                    match outcome.result {
                        Ok(bytes) => {
                            moved.bytes_received += bytes;
                            if source.role == SourceRole::Peer {
                                moved.bytes_from_peers += bytes;
                            }
                            let cancelled = planner.on_success(outcome.source, outcome.piece, outcome.started.elapsed(), now);
                            for request in cancelled {
                                if let Some(handle) = running.remove(&(request.source, request.piece)) {
                                    handle.abort();
                                }
                            }
                            if let Some(h) = held.get_mut(outcome.piece as usize) {
                                if !*h {
                                    *h = true;
                                    done_bytes += pieces[outcome.piece as usize].1;
                                }
                            }
                            on_piece(outcome.piece, &held, done_bytes.min(total));
                        }
                        Err(error) if error.is_corrupt_source() => {
                            tracing::error!(source = %source.addr, role = source.role.as_str(), %error, "source sent data that did not verify; banned");
                            self.metrics.counter("stagecoach_sources_banned_total", "Sources banned for sending bad data", &[("peer_role", source.role.as_str())]).inc();
                            moved.banned.push(source.addr);
                            for request in planner.on_bad_data(outcome.source, outcome.piece) {
                                if let Some(handle) = running.remove(&(request.source, request.piece)) {
                                    handle.abort();
                                }
                            }
                        }
                        Err(error) if error.is_source_fault() => {
                            tracing::debug!(source = %source.addr, role = source.role.as_str(), %error, "request failed; backing off");
                            if matches!(error, FetchError::Net(_)) {
                                *source.conn.lock().await = None;
                            }
                            planner.on_failure(outcome.source, outcome.piece, now);
                        }
                        Err(error) => {
                            return Err(anyhow::Error::new(error).context("cannot store a verified chunk"));
                        }
                    }
                }
                have = recv_peer(&mut peers) => {
                    match have {
                        Some(have) => {
                            let id = add(&mut sources, &mut by_addr, &mut planner, have.data_addr, SourceRole::Peer);
                            for (start, end) in have.pieces {
                                for piece in start..end.min(pieces.len() as u32) {
                                    planner.source_has(id, piece);
                                }
                            }
                        }
                        None => peers = None,
                    }
                }
                _ = tokio::time::sleep(wakeup) => {}
            }
        }
        tasks.abort_all();
        Ok(moved)
    }
}

async fn recv_peer(peers: &mut Option<mpsc::Receiver<PeerHave>>) -> Option<PeerHave> {
    match peers {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// The source's connection, (re)connecting when there is none or it closed.
async fn connection(
    endpoint: &Endpoint,
    slot: &tokio::sync::Mutex<Option<Connection>>,
    addr: SocketAddr,
) -> Result<Connection, FetchError> {
    let mut slot = slot.lock().await;
    if let Some(conn) = slot.as_ref() {
        if conn.close_reason().is_none() {
            return Ok(conn.clone());
        }
    }
    let conn = connect(endpoint, addr).await?;
    *slot = Some(conn.clone());
    Ok(conn)
}

/// Parses a socket address a peer announced.
pub fn parse_data_addr(text: &str) -> Result<SocketAddr> {
    text.parse()
        .with_context(|| format!("bad peer data address {text:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_ranges_are_runs() {
        assert_eq!(held_ranges(&[]), vec![]);
        assert_eq!(
            held_ranges(&[true, true, false, true]),
            vec![(0, 2), (3, 4)]
        );
        assert_eq!(held_ranges(&[false, true]), vec![(1, 2)]);
    }
}
