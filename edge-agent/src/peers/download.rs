//! A bundle's chunks from many sources at once: the site's stagers, the peers of the
//! site that announced them, and the origin as the last resort. The pure
//! [`proto::planner::Planner`] decides what to ask of whom; this module does the asking, over
//! QUIC, verified group by group into the store.
//!
//! A piece is one distinct chunk of the manifest, numbered in manifest order (first occurrence):
//! every node derives the same numbering from the same signed manifest, so peers can announce
//! what they hold as piece ranges.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use proto::manifest::Manifest;
use proto::metrics::Metrics;
use proto::net::{connect, NetError};
use proto::planner::{PieceId, Planner, PlannerConfig, SourceId, SourceKind};
use proto::store::Store;
use proto::transfer::fetch::{fetch_blob, FetchError};
use proto::transfer::PeerCounters;
use proto::BlobHash;
use quinn::{Connection, Endpoint};
use tokio::sync::mpsc;
use tokio::task::AbortHandle;

/// Chunk requests in flight at one source.
pub const MAX_IN_FLIGHT_PER_SOURCE: u32 = 4;

/// Chunk requests in flight at a stager when peers share the work.
pub const MAX_IN_FLIGHT_PER_STAGER_WITH_PEERS: u32 = 1;

/// How long a piece held by busy peers waits before a stager (or the origin) is asked instead.
pub const STAGER_FALLBACK_AFTER: Duration = Duration::from_millis(1500);

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
    conn: Arc<tokio::sync::Mutex<ConnSlot>>,
    counters: PeerCounters,
}

/// A source's connection, shared by its requests. A source that could not be reached is not
/// dialled again in this download: every request waiting for it fails at once instead of each
/// waiting out its own handshake timeout, and the download drops the source.
#[derive(Default)]
struct ConnSlot {
    conn: Option<Connection>,
    unreachable: bool,
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

/// Outcomes of requests not yet handled by the download loop.
const OUTCOME_QUEUE: usize = 256;

/// The planner's settings for an edge's download, with or without peers.
fn planner_config(with_peers: bool) -> PlannerConfig {
    PlannerConfig {
        max_in_flight_per_source: MAX_IN_FLIGHT_PER_SOURCE,
        // With peers, one request per edge keeps the stager busy and leaves the rest of the
        // site's traffic to the peers; alone, the edge keeps the stager's pipe full.
        max_in_flight_per_upstream: with_peers.then_some(MAX_IN_FLIGHT_PER_STAGER_WITH_PEERS),
        // One writer per blob in the store: duplicates would only wait on each other.
        endgame_max_duplicates: 0,
        upstream_fallback_after: STAGER_FALLBACK_AFTER,
        ..PlannerConfig::default()
    }
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
        let mut run = Run::new(&self, manifest, peers.is_some());
        run.add_first_sources();
        let (done_tx, mut done_rx) = mpsc::channel::<Outcome>(OUTCOME_QUEUE);
        let mut tasks = tokio::task::JoinSet::new();
        while !run.planner.is_done() {
            run.start_requests(&mut tasks, &done_tx);
            if run.planner.in_flight() == 0 && !run.planner.unavailable_pieces().is_empty() {
                run.ask_the_origin()?;
                continue;
            }
            let wakeup = run.next_wakeup();
            tokio::select! {
                outcome = done_rx.recv() => {
                    let Some(outcome) = outcome else { bail!("download tasks vanished") };
                    run.on_outcome(outcome, &mut on_piece).await?;
                }
                have = recv_peer(&mut peers) => {
                    match have {
                        Some(have) => run.on_peer_have(have),
                        None => peers = None,
                    }
                }
                _ = tokio::time::sleep(wakeup) => {}
            }
        }
        tasks.abort_all();
        Ok(run.moved)
    }
}

/// The state of one running download: the pieces, what is held, the planner and the sources
/// it knows, and the requests in flight.
struct Run<'a> {
    download: &'a Download,
    manifest: &'a Manifest,
    pieces: Vec<(BlobHash, u64)>,
    held: Vec<bool>,
    moved: Moved,
    total_bytes: u64,
    done_bytes: u64,
    planner: Planner,
    sources: Vec<Source>,
    by_addr: HashMap<SocketAddr, SourceId>,
    origin_added: bool,
    /// The planner's clock starts here.
    epoch: Instant,
    running: HashMap<(SourceId, PieceId), AbortHandle>,
    /// Sources found unreachable and dropped from this download.
    dropped: HashSet<SourceId>,
}

impl<'a> Run<'a> {
    /// Step 1: what the store already holds, and a planner for the rest.
    fn new(download: &'a Download, manifest: &'a Manifest, with_peers: bool) -> Self {
        let pieces = pieces_of(manifest);
        let held: Vec<bool> = pieces
            .iter()
            .map(|(hash, _)| download.store.has_blob(hash))
            .collect();
        let moved = Moved {
            pieces_present: held.iter().filter(|h| **h).count() as u64,
            ..Moved::default()
        };
        let total_bytes: u64 = pieces.iter().map(|(_, size)| size).sum();
        let done_bytes: u64 = pieces
            .iter()
            .zip(&held)
            .filter(|(_, h)| **h)
            .map(|((_, size), _)| size)
            .sum();
        let sizes = pieces.iter().map(|(_, size)| *size).collect();
        let planner = Planner::new(sizes, &held, planner_config(with_peers), download.seed);
        Self {
            download,
            manifest,
            pieces,
            held,
            moved,
            total_bytes,
            done_bytes,
            planner,
            sources: Vec::new(),
            by_addr: HashMap::new(),
            origin_added: false,
            epoch: Instant::now(),
            running: HashMap::new(),
            dropped: HashSet::new(),
        }
    }

    /// Step 2: the site's stagers; the origin only when there is no stager.
    fn add_first_sources(&mut self) {
        for &addr in &self.download.stagers {
            self.add_source(addr, SourceRole::Stager);
        }
        if self.download.stagers.is_empty() {
            if let Some(addr) = self.download.origin {
                self.add_source(addr, SourceRole::Origin);
                self.origin_added = true;
            }
        }
    }

    /// A source the planner may ask (once per address): stagers and the origin hold every
    /// piece; a peer holds what it announces.
    fn add_source(&mut self, addr: SocketAddr, role: SourceRole) -> SourceId {
        if let Some(&id) = self.by_addr.get(&addr) {
            return id;
        }
        let id = self.sources.len() as SourceId;
        let site = if role == SourceRole::Origin {
            "origin"
        } else {
            self.download.site.as_str()
        };
        self.sources.push(Source {
            addr,
            role,
            conn: Arc::new(tokio::sync::Mutex::new(ConnSlot::default())),
            counters: PeerCounters::new(&self.download.metrics, role.as_str(), site),
        });
        self.by_addr.insert(addr, id);
        let kind = if role == SourceRole::Peer {
            SourceKind::Peer
        } else {
            SourceKind::Upstream
        };
        self.planner.add_source(id, kind);
        if kind == SourceKind::Upstream {
            self.planner.source_has_all(id);
        }
        id
    }

    /// Step 3: starts each request the planner wants now, as a task that reports its outcome
    /// on `done_tx`.
    fn start_requests(
        &mut self,
        tasks: &mut tokio::task::JoinSet<()>,
        done_tx: &mpsc::Sender<Outcome>,
    ) {
        let now = self.epoch.elapsed();
        for request in self.planner.poll(now) {
            let Some(source) = self.sources.get(request.source as usize) else {
                self.planner.on_cancelled(request.source, request.piece);
                continue;
            };
            let Some(&(hash, size)) = self.pieces.get(request.piece as usize) else {
                self.planner.on_cancelled(request.source, request.piece);
                continue;
            };
            let (endpoint, store, conn_slot, counters, addr) = (
                self.download.endpoint.clone(),
                self.download.store.clone(),
                source.conn.clone(),
                source.counters.clone(),
                source.addr,
            );
            let lan = source.role != SourceRole::Origin;
            let done_tx = done_tx.clone();
            let handle = tasks.spawn(async move {
                let started = Instant::now();
                let result = async {
                    let conn = connection(&endpoint, &conn_slot, addr, lan).await?;
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
            self.running.insert((request.source, request.piece), handle);
        }
    }

    /// Step 4, when nothing is in flight and pieces are left that no source has: the origin is
    /// the last resort; once it was asked, the download fails.
    fn ask_the_origin(&mut self) -> Result<()> {
        match self.download.origin {
            Some(addr) if !self.origin_added => {
                tracing::warn!(origin = %addr, "no stager or peer can serve the rest; asking the origin");
                self.add_source(addr, SourceRole::Origin);
                self.origin_added = true;
                Ok(())
            }
            _ => bail!(
                "no source can provide {} chunks of bundle {}@{} (sources tried: {})",
                self.planner.unavailable_pieces().len(),
                self.manifest.name,
                self.manifest.version,
                self.sources
                    .iter()
                    .map(|s| format!("{} {}", s.role.as_str(), s.addr))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }

    /// How long to wait for an outcome or an announcement before polling the planner again.
    fn next_wakeup(&self) -> Duration {
        self.planner
            .next_wakeup()
            .map(|at| at.saturating_sub(self.epoch.elapsed()))
            .unwrap_or(Duration::from_secs(1))
            .max(Duration::from_millis(1))
    }

    /// Step 5: a request ended. A piece done is marked held (and duplicates of it stopped); a
    /// source that sent bad data is banned; one that failed otherwise backs off. A store that
    /// cannot take a verified chunk ends the download.
    async fn on_outcome(
        &mut self,
        outcome: Outcome,
        on_piece: &mut impl FnMut(PieceId, &[bool], u64),
    ) -> Result<()> {
        self.running.remove(&(outcome.source, outcome.piece));
        let now = self.epoch.elapsed();
        let source = &self.sources[outcome.source as usize];
        match outcome.result {
            Ok(bytes) => {
                self.moved.bytes_received += bytes;
                if source.role == SourceRole::Peer {
                    self.moved.bytes_from_peers += bytes;
                }
                let cancelled = self.planner.on_success(
                    outcome.source,
                    outcome.piece,
                    outcome.started.elapsed(),
                    now,
                );
                self.stop_requests(cancelled);
                if let Some(h) = self.held.get_mut(outcome.piece as usize) {
                    if !*h {
                        *h = true;
                        self.done_bytes += self.pieces[outcome.piece as usize].1;
                    }
                }
                on_piece(
                    outcome.piece,
                    &self.held,
                    self.done_bytes.min(self.total_bytes),
                );
            }
            Err(error) if error.is_corrupt_source() => {
                tracing::error!(source = %source.addr, role = source.role.as_str(), %error, "source sent data that did not verify; banned");
                self.download
                    .metrics
                    .counter(
                        "stagecoach_sources_banned_total",
                        "Sources banned for sending bad data",
                        &[("peer_role", source.role.as_str())],
                    )
                    .inc();
                self.moved.banned.push(source.addr);
                let cancelled = self.planner.on_bad_data(outcome.source, outcome.piece);
                self.stop_requests(cancelled);
            }
            Err(error) if error.is_source_fault() => {
                let unreachable = {
                    let mut slot = source.conn.lock().await;
                    if matches!(error, FetchError::Net(_)) {
                        slot.conn = None;
                    }
                    slot.unreachable
                };
                if unreachable {
                    // Not dialled again: its requests go back to the pool for the other sources
                    // (the origin comes in when no source is left).
                    if self.dropped.insert(outcome.source) {
                        tracing::warn!(source = %source.addr, role = source.role.as_str(), %error, "source unreachable; dropped for this download");
                        let ended = self.planner.remove_source(outcome.source);
                        self.stop_requests(ended);
                    }
                } else {
                    tracing::debug!(source = %source.addr, role = source.role.as_str(), %error, "request failed; backing off");
                    self.planner.on_failure(outcome.source, outcome.piece, now);
                }
            }
            Err(error) => {
                return Err(anyhow::Error::new(error).context("cannot store a verified chunk"));
            }
        }
        Ok(())
    }

    /// Aborts the tasks of requests the planner no longer wants.
    fn stop_requests(&mut self, requests: Vec<proto::planner::Request>) {
        for request in requests {
            if let Some(handle) = self.running.remove(&(request.source, request.piece)) {
                handle.abort();
            }
        }
    }

    /// Step 6: a peer announced pieces: it becomes a source of those.
    fn on_peer_have(&mut self, have: PeerHave) {
        let id = self.add_source(have.data_addr, SourceRole::Peer);
        for (start, end) in have.pieces {
            for piece in start..end.min(self.pieces.len() as u32) {
                self.planner.source_has(id, piece);
            }
        }
    }
}

async fn recv_peer(peers: &mut Option<mpsc::Receiver<PeerHave>>) -> Option<PeerHave> {
    match peers {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// The source's connection, (re)connecting when there is none or it closed. A source on the
/// site's LAN (`lan`: a stager or a peer) gets [`proto::net::LAN_HANDSHAKE_TIMEOUT`] to answer.
async fn connection(
    endpoint: &Endpoint,
    slot: &tokio::sync::Mutex<ConnSlot>,
    addr: SocketAddr,
    lan: bool,
) -> Result<Connection, FetchError> {
    let mut slot = slot.lock().await;
    if slot.unreachable {
        return Err(FetchError::Net(NetError::Connect {
            addr,
            reason: "unreachable earlier in this download".into(),
        }));
    }
    if let Some(conn) = slot.conn.as_ref() {
        if conn.close_reason().is_none() {
            return Ok(conn.clone());
        }
    }
    let dialed = if lan {
        proto::net::connect_within_lan(endpoint, addr).await
    } else {
        connect(endpoint, addr).await
    };
    match dialed {
        Ok(conn) => {
            slot.conn = Some(conn.clone());
            Ok(conn)
        }
        Err(error) => {
            slot.unreachable = true;
            Err(FetchError::Net(error))
        }
    }
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
