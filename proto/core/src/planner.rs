//! Download planner: which piece to request from which source, and when. Pure: no I/O, no clock.
//!
//! A *piece* is an abstract unit of work (the edge maps it to a blob, or to a run of 16 KiB groups
//! of a blob). A *source* is either a peer in the same site ([`SourceKind::Peer`]) or an upstream
//! ([`SourceKind::Upstream`]: the site's stager or the origin). The planner takes events (a source
//! joined, announced a piece, delivered, failed, lied, left) and the current time, and answers
//! with the requests to start. It never blocks, never looks at a clock and never touches a
//! socket, in the style of `quinn-proto`: the edge agent drives it in real time, `netsim` in
//! virtual time, and every run is reproducible from its `seed`.
//!
//! # Policy, and why
//!
//! - **Rarest first within the site.** Edges of a site fetch the same bundle at about the same
//!   time. A piece that few peers hold is the one most likely to become a bottleneck, and
//!   fetching it first raises its replication so that later edges find it at a peer instead of
//!   at an upstream. Ties are broken with the seeded random generator: eight edges starting together
//!   ask the stager for eight different pieces, so the stager's uplink carries each piece about
//!   once and the site trades the rest among itself.
//! - **Peers before upstreams.** A peer's uplink is otherwise idle; the stager's is shared by the
//!   whole site and the origin's costs WAN bytes. Upstreams are sources of last resort: they get the
//!   pieces no peer holds, the pieces that have waited [`PlannerConfig::upstream_fallback_after`]
//!   while every peer holding them was busy or backed off, and endgame duplicates.
//! - **Fast sources first, load spread.** For a chosen piece the source is the one with the
//!   highest estimated throughput (an EWMA of delivered bytes per second) divided by its
//!   requests in flight plus one. A source not yet measured is assumed faster than any real link,
//!   so that each new source is tried once before the measured ones are preferred.
//! - **Endgame.** Once every missing piece is in flight, the last pieces wait on whatever source
//!   has them, and the slowest source sets the finish time. The planner then duplicates in-flight
//!   pieces at other sources (up to [`PlannerConfig::endgame_max_duplicates`] extra requests per
//!   piece, oldest requests first, peers preferred); the first copy to arrive wins and
//!   [`Planner::on_success`] names the others for the caller to cancel.
//! - **Bounded retries.** A transient failure backs its source off exponentially (capped); a
//!   source that fails [`PlannerConfig::max_failures_per_source`] times in a row is dropped (it
//!   may be added again later). Requests that were already in flight when a failure was counted
//!   fail with it (a reset connection takes all of them) and do not count again. A source that
//!   sends data failing verification is banned for the life of the planner.
//!
//! # Driving it
//!
//! Call [`Planner::poll`] after every event and whenever [`Planner::next_wakeup`] comes due;
//! stop when [`Planner::is_done`], or fail when nothing is in flight and
//! [`Planner::unavailable_pieces`] is not empty.
//!
//! ```
//! use std::time::Duration;
//! use proto_core::planner::{Planner, PlannerConfig, SourceKind};
//!
//! let mut planner = Planner::new(vec![1 << 20; 3], &[], PlannerConfig::default(), 7);
//! planner.add_source(1, SourceKind::Upstream);
//! planner.source_has_all(1);
//! let mut now = Duration::ZERO;
//! while !planner.is_done() {
//!     for request in planner.poll(now) {
//!         // ... fetch request.piece from request.source, then:
//!         now += Duration::from_millis(10);
//!         planner.on_success(request.source, request.piece, Duration::from_millis(10), now);
//!     }
//! }
//! assert_eq!(planner.stats().completed, 3);
//! ```
//!
//! # Cost
//!
//! Idle pieces are kept in buckets by rarity and each source counts the idle pieces it holds,
//! so a decision costs O(sources) plus the pieces visited before one fits a free source (about
//! two when sources hold random halves). Nothing scans pieces × sources per decision; adding or
//! removing a source costs O(pieces) once.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

/// Names a source for the life of a planner. Chosen by the caller.
pub type SourceId = u32;

/// Index of a piece: `0..piece_sizes.len()`.
pub type PieceId = u32;

/// Default for [`PlannerConfig::max_in_flight_per_source`], in requests.
const DEFAULT_MAX_IN_FLIGHT_PER_SOURCE: u32 = 4;
/// Default for [`PlannerConfig::endgame_max_duplicates`], in extra requests per piece.
const DEFAULT_ENDGAME_MAX_DUPLICATES: u32 = 1;
/// Default for [`PlannerConfig::upstream_fallback_after`].
const DEFAULT_UPSTREAM_FALLBACK_AFTER: Duration = Duration::from_secs(2);
/// Default for [`PlannerConfig::backoff_base`].
const DEFAULT_BACKOFF_BASE: Duration = Duration::from_millis(200);
/// Default for [`PlannerConfig::backoff_max`].
const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(10);
/// Default for [`PlannerConfig::max_failures_per_source`], in consecutive failures.
const DEFAULT_MAX_FAILURES_PER_SOURCE: u32 = 8;

/// Throughput assumed for a source not yet measured, in bytes per second (10 Gbit/s): above any
/// real link, so every new source is tried before measured ones are preferred.
const UNMEASURED_BYTES_PER_SEC: f64 = 1.25e9;
/// Weight of the newest sample in a source's throughput EWMA (0..=1).
const THROUGHPUT_EWMA_WEIGHT: f64 = 0.25;
/// Shortest time a throughput sample is taken over, so that a zero `elapsed` (possible in
/// virtual time) gives a finite rate.
const MIN_SAMPLE_ELAPSED: Duration = Duration::from_micros(1);

/// Tuning of a [`Planner`]. [`Default`] gives values suited to a site LAN.
#[derive(Clone, Debug)]
pub struct PlannerConfig {
    /// Requests in flight at one source at most (default 4).
    pub max_in_flight_per_source: u32,
    /// Requests in flight at one upstream at most, when lower than `max_in_flight_per_source`
    /// (default: no lower). A site's stager serves every edge: one request per edge keeps it
    /// busy while leaving the edges to trade the rest among themselves.
    pub max_in_flight_per_upstream: Option<u32>,
    /// Extra concurrent requests per piece in endgame (default 1; 0 disables endgame).
    pub endgame_max_duplicates: u32,
    /// A piece held by some peer goes to an upstream only after it has waited this long with no peer
    /// able to take it (default 2 s).
    pub upstream_fallback_after: Duration,
    /// Backoff of a source after a transient failure, doubling per consecutive failure
    /// (default 200 ms).
    pub backoff_base: Duration,
    /// Cap on the backoff (default 10 s).
    pub backoff_max: Duration,
    /// Consecutive transient failures after which a source is dropped, not banned (default 8).
    pub max_failures_per_source: u32,
}

impl PlannerConfig {
    /// Requests in flight allowed at a source of `kind`.
    fn cap(&self, kind: SourceKind) -> usize {
        let per_source = self.max_in_flight_per_source;
        let cap = match (kind, self.max_in_flight_per_upstream) {
            (SourceKind::Upstream, Some(cap)) => cap.clamp(1, per_source.max(1)),
            _ => per_source,
        };
        cap as usize
    }
}

impl Default for PlannerConfig {
    fn default() -> Self {
        PlannerConfig {
            max_in_flight_per_source: DEFAULT_MAX_IN_FLIGHT_PER_SOURCE,
            max_in_flight_per_upstream: None,
            endgame_max_duplicates: DEFAULT_ENDGAME_MAX_DUPLICATES,
            upstream_fallback_after: DEFAULT_UPSTREAM_FALLBACK_AFTER,
            backoff_base: DEFAULT_BACKOFF_BASE,
            backoff_max: DEFAULT_BACKOFF_MAX,
            max_failures_per_source: DEFAULT_MAX_FAILURES_PER_SOURCE,
        }
    }
}

/// What a source is, which decides when the planner may use it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceKind {
    /// An edge in the same site: preferred, counted for rarity.
    Peer,
    /// The site's stager or the origin: used only when no peer can serve (see the module doc).
    Upstream,
}

/// One request to start: fetch `piece` from `source`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Request {
    /// Where to fetch from.
    pub source: SourceId,
    /// What to fetch.
    pub piece: PieceId,
}

/// Counters since the planner was created.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PlannerStats {
    /// Requests returned by [`Planner::poll`], duplicates included.
    pub requests: u64,
    /// Of those, endgame duplicates.
    pub endgame_duplicates: u64,
    /// Transient failures reported for requests in flight.
    pub failures: u64,
    /// Sources banned for bad data.
    pub bans: u64,
    /// Pieces that became held (not counting those held at start).
    pub completed: u64,
    /// Bytes delivered by peers, late duplicates included.
    pub bytes_from_peers: u64,
    /// Bytes delivered by upstreams, late duplicates included.
    pub bytes_from_upstreams: u64,
}

/// The download planner. See the module documentation for the policy.
#[derive(Clone, Debug)]
pub struct Planner {
    config: PlannerConfig,
    pieces: Vec<Piece>,
    /// Idle pieces (missing, not in flight) by rarity: `pool[r]` holds those that exactly `r`
    /// usable peers hold. `pool[0]` is what only upstreams can serve.
    pool: Vec<Vec<PieceId>>,
    /// Pieces in all of `pool`.
    idle_count: usize,
    /// Pieces with at least one request in flight, for endgame.
    in_flight_pieces: Vec<PieceId>,
    /// Pieces not held.
    missing: usize,
    /// Requests in flight, over all sources.
    in_flight: usize,
    sources: Vec<Source>,
    source_index: HashMap<SourceId, usize>,
    /// Indices into `sources` of the usable ones (present, not banned, not dropped).
    active: Vec<usize>,
    /// Pieces that became idle since the last poll, stamped with `now` by the next one.
    newly_idle: Vec<(PieceId, u32)>,
    /// Idle pieces in the order they started waiting, until they become eligible for upstreams.
    waiting: VecDeque<Waiting>,
    /// Idle pieces that waited `upstream_fallback_after`: upstreams may take them, oldest first.
    upstream_ready: VecDeque<(PieceId, u32)>,
    rng: SplitMix64,
    /// The latest `now` seen.
    last_now: Duration,
    /// An event happened since the last poll, so polling may give something new.
    dirty: bool,
    stats: PlannerStats,
    /// Scratch: sources that can take a request in this poll.
    free_peers: Vec<usize>,
    free_upstreams: Vec<usize>,
}

impl Planner {
    /// A planner for pieces of `piece_sizes[i]` bytes, with `have[i]` marking pieces already
    /// verified locally (an empty slice means none). `seed` drives every tie-break: the same
    /// seed and the same events give the same requests.
    ///
    /// # Panics
    ///
    /// If there are more than `u32::MAX` pieces.
    pub fn new(piece_sizes: Vec<u64>, have: &[bool], config: PlannerConfig, seed: u64) -> Planner {
        assert!(
            piece_sizes.len() <= PieceId::MAX as usize,
            "at most u32::MAX pieces"
        );
        debug_assert!(
            have.is_empty() || have.len() == piece_sizes.len(),
            "`have` must be empty or have one entry per piece"
        );
        debug_assert!(
            config.max_in_flight_per_source > 0,
            "max_in_flight_per_source = 0 never requests anything"
        );
        let mut planner = Planner {
            config,
            pieces: Vec::with_capacity(piece_sizes.len()),
            pool: vec![Vec::new()],
            idle_count: 0,
            in_flight_pieces: Vec::new(),
            missing: 0,
            in_flight: 0,
            sources: Vec::new(),
            source_index: HashMap::new(),
            active: Vec::new(),
            newly_idle: Vec::new(),
            waiting: VecDeque::new(),
            upstream_ready: VecDeque::new(),
            rng: SplitMix64::new(seed),
            last_now: Duration::ZERO,
            dirty: true,
            stats: PlannerStats::default(),
            free_peers: Vec::new(),
            free_upstreams: Vec::new(),
        };
        for (index, size_bytes) in piece_sizes.into_iter().enumerate() {
            let held = have.get(index).copied().unwrap_or(false);
            planner.pieces.push(Piece {
                size_bytes,
                state: PieceState::Held,
                rarity: 0,
                slot: 0,
                idle_epoch: 0,
                requests: 0,
                in_flight_since: Duration::ZERO,
            });
            if !held {
                planner.missing += 1;
                planner.enter_pool(index as PieceId);
            }
        }
        planner
    }

    /// Registers a source holding nothing yet. Adding a source that was removed or dropped
    /// brings it back with nothing known held; adding a banned source does nothing.
    pub fn add_source(&mut self, source: SourceId, kind: SourceKind) {
        self.dirty = true;
        let Some(&s) = self.source_index.get(&source) else {
            let s = self.sources.len();
            self.sources.push(Source::new(source, kind));
            self.source_index.insert(source, s);
            self.active.push(s);
            return;
        };
        let src = &mut self.sources[s];
        match src.status {
            SourceStatus::Active => {
                debug_assert_eq!(
                    src.kind, kind,
                    "source {source} added again as another kind"
                )
            }
            SourceStatus::Banned => {}
            SourceStatus::Removed | SourceStatus::Dropped => {
                src.kind = kind;
                src.status = SourceStatus::Active;
                src.consecutive_failures = 0;
                src.backoff_until = Duration::ZERO;
                src.incident += 1;
                self.active.push(s);
            }
        }
    }

    /// The source left or disconnected: its requests in flight go back to the pool and are
    /// returned, for the caller to stop, and it is no longer used. Its ban, if any, stays.
    pub fn remove_source(&mut self, source: SourceId) -> Vec<Request> {
        let Some(&s) = self.source_index.get(&source) else {
            return Vec::new();
        };
        self.dirty = true;
        match self.sources[s].status {
            SourceStatus::Active => {
                self.deactivate(s);
                self.sources[s].status = SourceStatus::Removed;
            }
            SourceStatus::Dropped => self.sources[s].status = SourceStatus::Removed,
            SourceStatus::Removed | SourceStatus::Banned => {}
        }
        let mut ended = Vec::new();
        while let Some(flight) = self.sources[s].flights.last() {
            let piece = flight.piece;
            self.end_flight(s, piece);
            ended.push(Request { source, piece });
        }
        ended
    }

    /// The source announced that it holds `piece`.
    pub fn source_has(&mut self, source: SourceId, piece: PieceId) {
        let Some(s) = self.active_source(source) else {
            return;
        };
        if piece as usize >= self.pieces.len() || self.sources[s].holds(piece) {
            return;
        }
        self.dirty = true;
        let src = &mut self.sources[s];
        let words = self.pieces.len().div_ceil(64);
        if src.has.len() < words {
            src.has.resize(words, 0);
        }
        src.has[piece as usize / 64] |= 1 << (piece % 64);
        let kind = src.kind;
        self.gained_holder(s, kind, piece);
    }

    /// The source announced that it holds every piece.
    pub fn source_has_all(&mut self, source: SourceId) {
        let Some(s) = self.active_source(source) else {
            return;
        };
        if self.sources[s].has_all {
            return;
        }
        self.dirty = true;
        let kind = self.sources[s].kind;
        for piece in 0..self.pieces.len() as PieceId {
            if !self.sources[s].holds(piece) {
                self.gained_holder(s, kind, piece);
            }
        }
        let src = &mut self.sources[s];
        src.has_all = true;
        src.has = Vec::new();
        debug_assert_eq!(src.idle_held, self.idle_count);
    }

    /// The requests to start now (may be empty).
    ///
    /// Never a banned, dropped, removed or backed-off source, never a source that does not hold
    /// the piece, never more than `max_in_flight_per_source` in flight at a source, never a
    /// piece already held or already in flight, except endgame duplicates: once every missing
    /// piece is in flight, up to `endgame_max_duplicates` extra requests per piece, each at a
    /// different source.
    pub fn poll(&mut self, now: Duration) -> Vec<Request> {
        self.last_now = self.last_now.max(now);
        self.dirty = false;
        let mut out = Vec::new();
        if self.missing == 0 {
            return out;
        }
        self.start_waits(now);
        self.expire_waits(now);

        self.collect_free(now, true);
        self.assign_to_peers(now, &mut out);
        self.assign_to_upstreams(now, &mut out);
        if self.idle_count == 0 && self.config.endgame_max_duplicates > 0 {
            self.assign_endgame(now, &mut out);
        }
        out
    }

    /// The piece arrived verified from `source`; `elapsed` is the time since that request
    /// started. The piece counts as held even if the request was no longer tracked (a late
    /// answer from a removed source is still verified data).
    ///
    /// Returns the other requests in flight for the same piece (endgame duplicates): the caller
    /// cancels them; they no longer count as in flight.
    pub fn on_success(
        &mut self,
        source: SourceId,
        piece: PieceId,
        elapsed: Duration,
        now: Duration,
    ) -> Vec<Request> {
        let Some(&s) = self.source_index.get(&source) else {
            return Vec::new();
        };
        if piece as usize >= self.pieces.len() {
            return Vec::new();
        }
        self.dirty = true;
        self.last_now = self.last_now.max(now);
        self.set_held(piece);
        let tracked = self.end_flight(s, piece).is_some();

        let size_bytes = self.pieces[piece as usize].size_bytes;
        let src = &mut self.sources[s];
        match src.kind {
            SourceKind::Peer => {
                self.stats.bytes_from_peers = self.stats.bytes_from_peers.saturating_add(size_bytes)
            }
            SourceKind::Upstream => {
                self.stats.bytes_from_upstreams =
                    self.stats.bytes_from_upstreams.saturating_add(size_bytes)
            }
        }
        src.consecutive_failures = 0;
        if tracked {
            let seconds = elapsed.max(MIN_SAMPLE_ELAPSED).as_secs_f64();
            let sample = size_bytes as f64 / seconds;
            src.bytes_per_sec = Some(match src.bytes_per_sec {
                None => sample,
                Some(estimate) => estimate + THROUGHPUT_EWMA_WEIGHT * (sample - estimate),
            });
        }

        let mut cancel = Vec::new();
        if self.pieces[piece as usize].requests > 0 {
            for other in 0..self.sources.len() {
                if self.end_flight(other, piece).is_some() {
                    cancel.push(Request {
                        source: self.sources[other].id,
                        piece,
                    });
                }
            }
        }
        debug_assert_eq!(self.pieces[piece as usize].requests, 0);
        cancel
    }

    /// Transient failure (timeout, connection reset, not found): the piece goes back to the
    /// pool and the source backs off; after `max_failures_per_source` consecutive failures it is
    /// dropped. Failures of requests started before the last counted failure count with it.
    pub fn on_failure(&mut self, source: SourceId, piece: PieceId, now: Duration) {
        let Some(&s) = self.source_index.get(&source) else {
            return;
        };
        let Some(flight) = self.end_flight(s, piece) else {
            return;
        };
        self.dirty = true;
        self.last_now = self.last_now.max(now);
        self.stats.failures += 1;
        let src = &mut self.sources[s];
        if src.status != SourceStatus::Active || flight.incident != src.incident {
            return;
        }
        src.incident += 1;
        src.consecutive_failures += 1;
        if src.consecutive_failures >= self.config.max_failures_per_source {
            self.deactivate(s);
            self.sources[s].status = SourceStatus::Dropped;
            return;
        }
        let doublings = src.consecutive_failures - 1;
        let backoff = self
            .config
            .backoff_base
            .saturating_mul(2u32.saturating_pow(doublings))
            .min(self.config.backoff_max);
        src.backoff_until = now.saturating_add(backoff);
    }

    /// The source sent data that failed verification: it is banned for good. Returns its other
    /// requests in flight (not the one for `piece`), which the caller cancels; every piece
    /// concerned goes back to the pool.
    pub fn on_bad_data(&mut self, source: SourceId, piece: PieceId) -> Vec<Request> {
        let Some(&s) = self.source_index.get(&source) else {
            return Vec::new();
        };
        self.dirty = true;
        self.end_flight(s, piece);
        if self.sources[s].status == SourceStatus::Banned {
            return Vec::new();
        }
        if self.sources[s].status == SourceStatus::Active {
            self.deactivate(s);
        }
        self.sources[s].status = SourceStatus::Banned;
        self.stats.bans += 1;
        let mut cancel = Vec::new();
        while let Some(flight) = self.sources[s].flights.last() {
            let other = flight.piece;
            self.end_flight(s, other);
            cancel.push(Request {
                source,
                piece: other,
            });
        }
        cancel
    }

    /// The caller cancelled this request on its own: forget it (the piece goes back to the pool
    /// unless held or in flight elsewhere). Cancelling a request that is not in flight, such as
    /// one already returned by [`Planner::on_success`], does nothing.
    pub fn on_cancelled(&mut self, source: SourceId, piece: PieceId) {
        let Some(&s) = self.source_index.get(&source) else {
            return;
        };
        if self.end_flight(s, piece).is_some() {
            self.dirty = true;
        }
    }

    /// When to poll next if no other event comes: the earliest time at which a backoff or the
    /// upstream fallback expires, or the latest `now` seen if an event since the last
    /// [`Planner::poll`] may have made work (poll right away). `None` when only a new event can
    /// change anything.
    pub fn next_wakeup(&self) -> Option<Duration> {
        if self.missing == 0 {
            return None;
        }
        if self.dirty {
            return Some(self.last_now);
        }
        let mut next: Option<Duration> = None;
        let mut any_upstream = false;
        for &s in &self.active {
            let src = &self.sources[s];
            any_upstream |= src.kind == SourceKind::Upstream;
            if src.flights.len() < self.config.cap(src.kind) && src.backoff_until > self.last_now {
                next = Some(next.map_or(src.backoff_until, |t| t.min(src.backoff_until)));
            }
        }
        if any_upstream {
            let first_waiting = self
                .waiting
                .iter()
                .find(|w| self.is_idle_since(w.piece, w.epoch));
            if let Some(w) = first_waiting {
                let due = w.since.saturating_add(self.config.upstream_fallback_after);
                next = Some(next.map_or(due, |t| t.min(due)));
            }
        }
        next
    }

    /// Every piece is held.
    pub fn is_done(&self) -> bool {
        self.missing == 0
    }

    /// Missing pieces that no usable source holds and that are not in flight: nothing can
    /// deliver them. When this is not empty and nothing is in flight, the caller should fail
    /// with this list (in piece order).
    pub fn unavailable_pieces(&self) -> Vec<PieceId> {
        let upstreams: Vec<&Source> = self
            .active
            .iter()
            .map(|&s| &self.sources[s])
            .filter(|src| src.kind == SourceKind::Upstream)
            .collect();
        if upstreams.iter().any(|src| src.has_all) {
            return Vec::new();
        }
        (0..self.pieces.len() as PieceId)
            .filter(|&p| {
                let piece = &self.pieces[p as usize];
                piece.state == PieceState::Idle
                    && piece.rarity == 0
                    && !upstreams.iter().any(|src| src.holds(p))
            })
            .collect()
    }

    /// The source sent bad data and will never be asked again.
    pub fn is_banned(&self, source: SourceId) -> bool {
        self.source_index
            .get(&source)
            .is_some_and(|&s| self.sources[s].status == SourceStatus::Banned)
    }

    /// Requests in flight, over all sources.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Pieces not held yet.
    pub fn missing(&self) -> usize {
        self.missing
    }

    /// Counters since the planner was created.
    pub fn stats(&self) -> &PlannerStats {
        &self.stats
    }

    // ---- assignment ----

    /// Fills the free lists with the usable sources that have room and are not backed off;
    /// with `need_idle`, only those holding some idle piece.
    fn collect_free(&mut self, now: Duration, need_idle: bool) {
        self.free_peers.clear();
        self.free_upstreams.clear();
        for &s in &self.active {
            let src = &self.sources[s];
            if src.flights.len() < self.config.cap(src.kind)
                && src.backoff_until <= now
                && (!need_idle || src.idle_held > 0)
            {
                match src.kind {
                    SourceKind::Peer => self.free_peers.push(s),
                    SourceKind::Upstream => self.free_upstreams.push(s),
                }
            }
        }
    }

    fn free_list(&self, kind: SourceKind) -> &[usize] {
        match kind {
            SourceKind::Peer => &self.free_peers,
            SourceKind::Upstream => &self.free_upstreams,
        }
    }

    /// Drops from the free lists the sources that filled up or ran out of idle pieces.
    fn prune_free(&mut self, need_idle: bool) {
        let sources = &self.sources;
        let config = &self.config;
        let keep = |&s: &usize| {
            sources[s].flights.len() < config.cap(sources[s].kind)
                && (!need_idle || sources[s].idle_held > 0)
        };
        self.free_peers.retain(keep);
        self.free_upstreams.retain(keep);
    }

    /// Rarest first: visits idle pieces held by peers, rarity by rarity, in random order within
    /// a rarity, giving each to its best free peer.
    fn assign_to_peers(&mut self, now: Duration, out: &mut Vec<Request>) {
        let mut rarity = 1;
        while rarity < self.pool.len() && !self.free_peers.is_empty() {
            self.scan_pool(rarity, SourceKind::Peer, now, out);
            rarity += 1;
        }
    }

    /// Seeds take the pieces no peer holds (random order), then those that waited
    /// `upstream_fallback_after` (oldest first).
    fn assign_to_upstreams(&mut self, now: Duration, out: &mut Vec<Request>) {
        if self.free_upstreams.is_empty() {
            return;
        }
        self.scan_pool(0, SourceKind::Upstream, now, out);

        while let Some(&(piece, epoch)) = self.upstream_ready.front() {
            if self.is_idle_since(piece, epoch) {
                break;
            }
            self.upstream_ready.pop_front();
        }
        let mut index = 0;
        while index < self.upstream_ready.len() && !self.free_upstreams.is_empty() {
            let (piece, epoch) = self.upstream_ready[index];
            index += 1;
            if !self.is_idle_since(piece, epoch) {
                continue;
            }
            if let Some(k) = best_holder(&self.sources, &self.free_upstreams, piece, false) {
                let s = self.free_upstreams[k];
                self.start_request(s, piece, now, false, out);
                self.prune_free(true);
            }
        }
        // Stale entries behind a valid front are normally popped as they reach the front; keep
        // the queue bounded anyway if a partial upstream leaves valid entries in front of them.
        if self.upstream_ready.len() > 2 * self.idle_count + self.pieces.len().min(1024) {
            let pieces = &self.pieces;
            self.upstream_ready
                .retain(|&(p, e)| is_idle_since(pieces, p, e));
        }
    }

    /// Visits `pool[rarity]` in random order (an incremental Fisher–Yates shuffle: the visited
    /// pieces collect at the end, so taking one out with `swap_remove` never skips or repeats
    /// one), giving each piece to its best free source of `kind`, until no such source is free.
    fn scan_pool(
        &mut self,
        rarity: usize,
        kind: SourceKind,
        now: Duration,
        out: &mut Vec<Request>,
    ) {
        let mut unvisited = self.pool[rarity].len();
        while unvisited > 0 {
            if self.free_list(kind).is_empty() {
                return;
            }
            let pick = self.rng.below(unvisited);
            unvisited -= 1;
            self.pool_swap(rarity, pick, unvisited);
            let piece = self.pool[rarity][unvisited];
            let free = self.free_list(kind);
            if let Some(k) = best_holder(&self.sources, free, piece, false) {
                let s = free[k];
                self.start_request(s, piece, now, false, out);
                self.prune_free(true);
            }
        }
    }

    /// Every missing piece is in flight: duplicates the oldest requests at other free sources,
    /// one more copy per piece per round, peers before upstreams.
    fn assign_endgame(&mut self, now: Duration, out: &mut Vec<Request>) {
        self.collect_free(now, false);
        if self.free_peers.is_empty() && self.free_upstreams.is_empty() {
            return;
        }
        let mut candidates = self.in_flight_pieces.clone();
        let pieces = &self.pieces;
        candidates.sort_unstable_by_key(|&p| (pieces[p as usize].in_flight_since, p));
        let most_requests = 1 + self.config.endgame_max_duplicates;
        for round in 1..most_requests {
            for &piece in &candidates {
                if self.free_peers.is_empty() && self.free_upstreams.is_empty() {
                    return;
                }
                if self.pieces[piece as usize].requests > round {
                    continue;
                }
                let chosen = best_holder(&self.sources, &self.free_peers, piece, true)
                    .map(|k| self.free_peers[k])
                    .or_else(|| {
                        best_holder(&self.sources, &self.free_upstreams, piece, true)
                            .map(|k| self.free_upstreams[k])
                    });
                if let Some(s) = chosen {
                    self.start_request(s, piece, now, true, out);
                    self.prune_free(false);
                }
            }
        }
    }

    /// Records a new request of `piece` at source index `s` and appends it to `out`.
    fn start_request(
        &mut self,
        s: usize,
        piece: PieceId,
        now: Duration,
        duplicate: bool,
        out: &mut Vec<Request>,
    ) {
        debug_assert!(self.sources[s].holds(piece));
        debug_assert!(self.sources[s].status == SourceStatus::Active);
        debug_assert!(!self.sources[s].flights.iter().any(|f| f.piece == piece));
        match self.pieces[piece as usize].state {
            PieceState::Idle => {
                debug_assert!(!duplicate);
                self.leave_pool(piece);
                let entry = &mut self.pieces[piece as usize];
                entry.state = PieceState::InFlight;
                entry.in_flight_since = now;
                entry.slot = self.in_flight_pieces.len() as u32;
                self.in_flight_pieces.push(piece);
            }
            PieceState::InFlight => debug_assert!(duplicate),
            PieceState::Held => {
                debug_assert!(false, "requesting a held piece");
                return;
            }
        }
        self.pieces[piece as usize].requests += 1;
        let src = &mut self.sources[s];
        src.flights.push(Flight {
            piece,
            incident: src.incident,
        });
        self.in_flight += 1;
        self.stats.requests += 1;
        if duplicate {
            self.stats.endgame_duplicates += 1;
        }
        out.push(Request {
            source: src.id,
            piece,
        });
    }

    // ---- upstream fallback timing ----

    /// Stamps the pieces that became idle since the last poll with `now`.
    fn start_waits(&mut self, now: Duration) {
        for (piece, epoch) in std::mem::take(&mut self.newly_idle) {
            if self.is_idle_since(piece, epoch) {
                self.waiting.push_back(Waiting {
                    since: now,
                    piece,
                    epoch,
                });
            }
        }
    }

    /// Moves the pieces that have waited `upstream_fallback_after` to the upstreams' queue.
    fn expire_waits(&mut self, now: Duration) {
        while let Some(w) = self.waiting.front() {
            let (piece, epoch) = (w.piece, w.epoch);
            if self.is_idle_since(piece, epoch) {
                if w.since.saturating_add(self.config.upstream_fallback_after) > now {
                    return;
                }
                self.upstream_ready.push_back((piece, epoch));
            }
            self.waiting.pop_front();
        }
    }

    fn is_idle_since(&self, piece: PieceId, epoch: u32) -> bool {
        is_idle_since(&self.pieces, piece, epoch)
    }

    // ---- piece and source state ----

    fn active_source(&self, source: SourceId) -> Option<usize> {
        let &s = self.source_index.get(&source)?;
        (self.sources[s].status == SourceStatus::Active).then_some(s)
    }

    /// Active source `s` (of `kind`) now holds `piece`; updates rarity and idle counts.
    fn gained_holder(&mut self, s: usize, kind: SourceKind, piece: PieceId) {
        let state = self.pieces[piece as usize].state;
        if state == PieceState::Held {
            return;
        }
        if kind == SourceKind::Peer {
            let rarity = self.pieces[piece as usize].rarity + 1;
            self.set_rarity(piece, rarity);
        }
        if state == PieceState::Idle {
            self.sources[s].idle_held += 1;
        }
    }

    /// Source `s` stops being usable: it leaves `active`, and the rarity of what it held drops.
    fn deactivate(&mut self, s: usize) {
        if let Some(position) = self.active.iter().position(|&a| a == s) {
            self.active.swap_remove(position);
        }
        let src = &mut self.sources[s];
        let has = std::mem::take(&mut src.has);
        let has_all = std::mem::replace(&mut src.has_all, false);
        src.idle_held = 0;
        if src.kind != SourceKind::Peer {
            return;
        }
        let holds = |p: usize| has_all || has.get(p / 64).is_some_and(|w| w >> (p % 64) & 1 == 1);
        for p in 0..self.pieces.len() {
            if holds(p) && self.pieces[p].state != PieceState::Held {
                let rarity = self.pieces[p].rarity - 1;
                self.set_rarity(p as PieceId, rarity);
            }
        }
    }

    /// Marks `piece` held (if it was missing), taking it out of the pool or the in-flight list.
    fn set_held(&mut self, piece: PieceId) {
        match self.pieces[piece as usize].state {
            PieceState::Held => return,
            PieceState::Idle => self.leave_pool(piece),
            PieceState::InFlight => self.in_flight_remove(piece),
        }
        self.pieces[piece as usize].state = PieceState::Held;
        self.missing -= 1;
        self.stats.completed += 1;
    }

    /// Forgets the request of `piece` at source index `s`, if there is one. A missing piece
    /// left with no request goes back to the pool.
    fn end_flight(&mut self, s: usize, piece: PieceId) -> Option<Flight> {
        let flights = &mut self.sources.get_mut(s)?.flights;
        let position = flights.iter().position(|f| f.piece == piece)?;
        let flight = flights.swap_remove(position);
        self.in_flight -= 1;
        let entry = &mut self.pieces[piece as usize];
        entry.requests -= 1;
        if entry.requests == 0 && entry.state == PieceState::InFlight {
            self.in_flight_remove(piece);
            self.enter_pool(piece);
        }
        Some(flight)
    }

    /// `piece` becomes idle: into its rarity bucket, counted by every active source holding it,
    /// and queued to start waiting for the upstream fallback.
    fn enter_pool(&mut self, piece: PieceId) {
        let entry = &mut self.pieces[piece as usize];
        entry.state = PieceState::Idle;
        entry.idle_epoch = entry.idle_epoch.wrapping_add(1);
        self.newly_idle.push((piece, entry.idle_epoch));
        self.pool_insert(piece);
        for &s in &self.active {
            if self.sources[s].holds(piece) {
                self.sources[s].idle_held += 1;
            }
        }
    }

    /// `piece` stops being idle: out of its bucket and the active sources' idle counts.
    fn leave_pool(&mut self, piece: PieceId) {
        self.pool_remove(piece);
        for &s in &self.active {
            if self.sources[s].holds(piece) {
                self.sources[s].idle_held -= 1;
            }
        }
    }

    fn set_rarity(&mut self, piece: PieceId, rarity: u32) {
        let idle = self.pieces[piece as usize].state == PieceState::Idle;
        if idle {
            self.pool_remove(piece);
        }
        self.pieces[piece as usize].rarity = rarity;
        if idle {
            self.pool_insert(piece);
        }
    }

    fn pool_insert(&mut self, piece: PieceId) {
        let rarity = self.pieces[piece as usize].rarity as usize;
        if self.pool.len() <= rarity {
            self.pool.resize_with(rarity + 1, Vec::new);
        }
        self.pieces[piece as usize].slot = self.pool[rarity].len() as u32;
        self.pool[rarity].push(piece);
        self.idle_count += 1;
    }

    fn pool_remove(&mut self, piece: PieceId) {
        let entry = &self.pieces[piece as usize];
        let (rarity, slot) = (entry.rarity as usize, entry.slot as usize);
        let bucket = &mut self.pool[rarity];
        debug_assert_eq!(bucket[slot], piece);
        bucket.swap_remove(slot);
        if let Some(&moved) = bucket.get(slot) {
            self.pieces[moved as usize].slot = slot as u32;
        }
        self.idle_count -= 1;
    }

    fn pool_swap(&mut self, rarity: usize, a: usize, b: usize) {
        let bucket = &mut self.pool[rarity];
        bucket.swap(a, b);
        let (piece_a, piece_b) = (bucket[a], bucket[b]);
        self.pieces[piece_a as usize].slot = a as u32;
        self.pieces[piece_b as usize].slot = b as u32;
    }

    fn in_flight_remove(&mut self, piece: PieceId) {
        let slot = self.pieces[piece as usize].slot as usize;
        debug_assert_eq!(self.in_flight_pieces[slot], piece);
        self.in_flight_pieces.swap_remove(slot);
        if let Some(&moved) = self.in_flight_pieces.get(slot) {
            self.pieces[moved as usize].slot = slot as u32;
        }
    }
}

/// The index into `candidates` of the best source for `piece`: one that holds it (and, with
/// `skip_flying`, is not already fetching it), with the highest estimated throughput per
/// request in flight. Ties go to the earlier candidate.
fn best_holder(
    sources: &[Source],
    candidates: &[usize],
    piece: PieceId,
    skip_flying: bool,
) -> Option<usize> {
    let mut best: Option<(usize, f64)> = None;
    for (k, &s) in candidates.iter().enumerate() {
        let src = &sources[s];
        if !src.holds(piece) || (skip_flying && src.flights.iter().any(|f| f.piece == piece)) {
            continue;
        }
        let score =
            src.bytes_per_sec.unwrap_or(UNMEASURED_BYTES_PER_SEC) / (src.flights.len() + 1) as f64;
        if best.is_none_or(|(_, top)| score > top) {
            best = Some((k, score));
        }
    }
    best.map(|(k, _)| k)
}

fn is_idle_since(pieces: &[Piece], piece: PieceId, epoch: u32) -> bool {
    let entry = &pieces[piece as usize];
    entry.state == PieceState::Idle && entry.idle_epoch == epoch
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PieceState {
    /// Verified locally.
    Held,
    /// Missing, no request in flight: in `pool`.
    Idle,
    /// Missing, at least one request in flight: in `in_flight_pieces`.
    InFlight,
}

#[derive(Clone, Debug)]
struct Piece {
    size_bytes: u64,
    state: PieceState,
    /// Active peers holding it (kept for missing pieces only).
    rarity: u32,
    /// Position in `pool[rarity]` when idle, in `in_flight_pieces` when in flight.
    slot: u32,
    /// Bumped each time the piece becomes idle, so stale queue entries can be told apart.
    idle_epoch: u32,
    /// Requests in flight.
    requests: u32,
    /// When it last went from idle to in flight: endgame duplicates the oldest first.
    in_flight_since: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SourceStatus {
    /// Usable.
    Active,
    /// Removed by the caller; may be added again.
    Removed,
    /// Too many consecutive failures; may be added again.
    Dropped,
    /// Sent bad data; never used again.
    Banned,
}

#[derive(Clone, Debug)]
struct Source {
    id: SourceId,
    kind: SourceKind,
    status: SourceStatus,
    has_all: bool,
    /// Bitset of held pieces (unless `has_all`), grown on first use.
    has: Vec<u64>,
    /// Requests in flight here (at most `max_in_flight_per_source`, so a short list).
    flights: Vec<Flight>,
    /// Idle pieces this source holds (kept while active).
    idle_held: usize,
    consecutive_failures: u32,
    /// Counts failures that were counted; a request remembers the value it started under.
    incident: u64,
    backoff_until: Duration,
    /// Throughput EWMA, `None` until the first delivery.
    bytes_per_sec: Option<f64>,
}

impl Source {
    fn new(id: SourceId, kind: SourceKind) -> Source {
        Source {
            id,
            kind,
            status: SourceStatus::Active,
            has_all: false,
            has: Vec::new(),
            flights: Vec::new(),
            idle_held: 0,
            consecutive_failures: 0,
            incident: 0,
            backoff_until: Duration::ZERO,
            bytes_per_sec: None,
        }
    }

    fn holds(&self, piece: PieceId) -> bool {
        self.has_all
            || self
                .has
                .get(piece as usize / 64)
                .is_some_and(|word| word >> (piece % 64) & 1 == 1)
    }
}

#[derive(Clone, Copy, Debug)]
struct Flight {
    piece: PieceId,
    /// The source's `incident` when this request started.
    incident: u64,
}

#[derive(Clone, Copy, Debug)]
struct Waiting {
    since: Duration,
    piece: PieceId,
    epoch: u32,
}

/// SplitMix64 (Steele, Lea, Flood 2014): tiny, fast, and plenty for tie-breaking.
#[derive(Clone, Debug)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform-enough in `0..n` (Lemire's multiply-shift; `n > 0`).
    fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn planner(pieces: usize) -> Planner {
        Planner::new(vec![1000; pieces], &[], PlannerConfig::default(), 1)
    }

    fn peer_with(planner: &mut Planner, id: SourceId, pieces: &[PieceId]) {
        planner.add_source(id, SourceKind::Peer);
        for &p in pieces {
            planner.source_has(id, p);
        }
    }

    fn upstream(planner: &mut Planner, id: SourceId) {
        planner.add_source(id, SourceKind::Upstream);
        planner.source_has_all(id);
    }

    #[test]
    fn rarest_piece_first() {
        let config = PlannerConfig {
            max_in_flight_per_source: 1,
            ..PlannerConfig::default()
        };
        let mut planner = Planner::new(vec![1000; 3], &[], config, 9);
        peer_with(&mut planner, 1, &[0, 1, 2]);
        peer_with(&mut planner, 2, &[0, 1]);
        peer_with(&mut planner, 3, &[0]);
        // Piece 2 is held by one peer, 1 by two, 0 by three: 2, then 1, then 0.
        let requests = planner.poll(Duration::ZERO);
        let mut pieces: Vec<_> = requests.iter().map(|r| (r.piece, r.source)).collect();
        pieces.sort();
        assert_eq!(pieces, vec![(0, 3), (1, 2), (2, 1)]);
    }

    #[test]
    fn peers_before_upstreams_and_fallback_after_waiting() {
        let config = PlannerConfig {
            max_in_flight_per_source: 1,
            ..PlannerConfig::default()
        };
        let fallback = config.upstream_fallback_after;
        let mut planner = Planner::new(vec![1000; 3], &[], config, 3);
        peer_with(&mut planner, 1, &[0, 1]);
        upstream(&mut planner, 9);
        let t0 = Duration::from_secs(100);
        let mut requests = planner.poll(t0);
        requests.sort_by_key(|r| r.piece);
        // Piece 2 has no peer: the upstream takes it at once. One of 0 and 1 goes to the peer; the
        // other waits, since the peer holds it.
        assert_eq!(requests.len(), 2);
        assert_eq!(
            requests[1],
            Request {
                source: 9,
                piece: 2
            }
        );
        assert_eq!(requests[0].source, 1);
        let waiting = 1 - requests[0].piece;
        planner.on_success(9, 2, MS, t0 + MS);
        assert!(planner.poll(t0 + MS).is_empty());
        assert_eq!(planner.next_wakeup(), Some(t0 + fallback));
        assert!(planner.poll(t0 + fallback - MS).is_empty());
        assert_eq!(
            planner.poll(t0 + fallback),
            vec![Request {
                source: 9,
                piece: waiting
            }]
        );
    }

    #[test]
    fn fastest_peer_per_request_in_flight() {
        let mut planner = planner(40);
        let all: Vec<PieceId> = (0..40).collect();
        peer_with(&mut planner, 1, &all);
        peer_with(&mut planner, 2, &all);
        // Measure both: 1 is ten times faster than 2.
        let first = planner.poll(Duration::ZERO);
        for r in &first {
            let elapsed = if r.source == 1 { MS } else { 10 * MS };
            planner.on_success(r.source, r.piece, elapsed, 10 * MS);
        }
        let next = planner.poll(10 * MS);
        // 1 is faster per request even with 3 in flight: it fills up first, then 2 gets the rest.
        let sources: Vec<SourceId> = next.iter().map(|r| r.source).collect();
        assert_eq!(sources, vec![1, 1, 1, 1, 2, 2, 2, 2]);
    }

    #[test]
    fn in_flight_bound_per_source() {
        let mut planner = planner(100);
        upstream(&mut planner, 7);
        let requests = planner.poll(Duration::ZERO);
        assert_eq!(requests.len(), 4);
        assert!(planner.poll(Duration::ZERO).is_empty());
        assert_eq!(planner.in_flight(), 4);
    }

    #[test]
    fn endgame_duplicates_and_cancels() {
        let mut planner = planner(2);
        peer_with(&mut planner, 1, &[0, 1]);
        peer_with(&mut planner, 2, &[0, 1]);
        let config = PlannerConfig::default();
        let requests = planner.poll(Duration::ZERO);
        // Two pieces, eight free slots: both pieces get a copy at each peer (1 duplicate each).
        assert_eq!(requests.len(), 4);
        assert_eq!(planner.stats().endgame_duplicates, 2);
        assert_eq!(config.endgame_max_duplicates, 1);
        let first = requests[0];
        let cancel = planner.on_success(first.source, first.piece, MS, MS);
        assert_eq!(cancel.len(), 1);
        assert_eq!(cancel[0].piece, first.piece);
        assert_ne!(cancel[0].source, first.source);
        assert_eq!(planner.in_flight(), 2);
        // Cancelling what on_success already forgot is harmless.
        planner.on_cancelled(cancel[0].source, cancel[0].piece);
        assert_eq!(planner.in_flight(), 2);
        assert!(planner.poll(MS).is_empty());
    }

    #[test]
    fn no_duplicates_while_pieces_wait() {
        let config = PlannerConfig {
            max_in_flight_per_source: 1,
            ..PlannerConfig::default()
        };
        let mut planner = Planner::new(vec![1000; 3], &[], config, 5);
        peer_with(&mut planner, 1, &[0, 1, 2]);
        peer_with(&mut planner, 2, &[0]);
        planner.poll(Duration::ZERO);
        // Piece 0 may be at 2 and another at 1, one piece left idle: not endgame.
        assert_eq!(planner.stats().endgame_duplicates, 0);
        assert_eq!(planner.in_flight(), 2);
    }

    #[test]
    fn backoff_doubles_then_drops() {
        let config = PlannerConfig {
            max_failures_per_source: 3,
            ..PlannerConfig::default()
        };
        let base = config.backoff_base;
        let mut planner = Planner::new(vec![1000; 1], &[], config, 2);
        peer_with(&mut planner, 1, &[0]);
        let mut now = Duration::from_secs(1);
        for failure in 1..=2u32 {
            assert_eq!(
                planner.poll(now),
                vec![Request {
                    source: 1,
                    piece: 0
                }]
            );
            planner.on_failure(1, 0, now);
            assert!(planner.poll(now).is_empty());
            let backoff = base * 2u32.pow(failure - 1);
            assert_eq!(planner.next_wakeup(), Some(now + backoff));
            now += backoff;
        }
        assert_eq!(planner.poll(now).len(), 1);
        planner.on_failure(1, 0, now);
        // Third failure: dropped, not banned; nothing else holds piece 0.
        assert!(!planner.is_banned(1));
        assert!(planner.poll(now + Duration::from_secs(60)).is_empty());
        assert_eq!(planner.next_wakeup(), None);
        assert_eq!(planner.unavailable_pieces(), vec![0]);
        // Added again, it is used again.
        peer_with(&mut planner, 1, &[0]);
        assert_eq!(planner.poll(now + Duration::from_secs(61)).len(), 1);
    }

    #[test]
    fn simultaneous_failures_count_once() {
        let config = PlannerConfig {
            max_failures_per_source: 2,
            ..PlannerConfig::default()
        };
        let mut planner = Planner::new(vec![1000; 8], &[], config, 2);
        upstream(&mut planner, 1);
        let requests = planner.poll(Duration::ZERO);
        assert_eq!(requests.len(), 4);
        // A reset connection fails all four at once: one failure, so a backoff, not a drop.
        for r in &requests {
            planner.on_failure(r.source, r.piece, MS);
        }
        assert_eq!(planner.stats().failures, 4);
        assert_eq!(planner.poll(MS + DEFAULT_BACKOFF_BASE).len(), 4);
    }

    #[test]
    fn bad_data_bans_and_returns_other_requests() {
        let mut planner = planner(4);
        peer_with(&mut planner, 1, &[0, 1, 2, 3]);
        let requests = planner.poll(Duration::ZERO);
        assert_eq!(requests.len(), 4);
        let liar_piece = requests[0].piece;
        let mut cancel = planner.on_bad_data(1, liar_piece);
        cancel.sort_by_key(|r| r.piece);
        let mut expected: Vec<Request> = requests[1..].to_vec();
        expected.sort_by_key(|r| r.piece);
        assert_eq!(cancel, expected);
        assert!(planner.is_banned(1));
        assert_eq!(planner.in_flight(), 0);
        assert_eq!(planner.stats().bans, 1);
        // Never asked again, even if added again.
        peer_with(&mut planner, 1, &[0, 1, 2, 3]);
        assert!(planner.poll(MS).is_empty());
        assert_eq!(planner.unavailable_pieces(), vec![0, 1, 2, 3]);
        upstream(&mut planner, 2);
        assert!(planner.poll(MS).iter().all(|r| r.source == 2));
    }

    #[test]
    fn removed_source_returns_its_pieces() {
        let mut planner = planner(2);
        peer_with(&mut planner, 1, &[0]);
        peer_with(&mut planner, 2, &[1]);
        assert_eq!(planner.poll(Duration::ZERO).len(), 2);
        assert_eq!(
            planner.remove_source(1),
            vec![Request {
                source: 1,
                piece: 0
            }]
        );
        assert_eq!(planner.in_flight(), 1);
        assert!(planner.poll(MS).is_empty());
        assert_eq!(planner.unavailable_pieces(), vec![0]);
        peer_with(&mut planner, 3, &[0]);
        assert_eq!(
            planner.poll(MS),
            vec![Request {
                source: 3,
                piece: 0
            }]
        );
        // A late answer from the removed source is still verified data.
        let cancel = planner.on_success(1, 0, MS, 2 * MS);
        assert_eq!(
            cancel,
            vec![Request {
                source: 3,
                piece: 0
            }]
        );
        assert_eq!(planner.missing(), 1);
    }

    #[test]
    fn resume_skips_held_pieces() {
        let have = [true, false, true];
        let mut planner = Planner::new(vec![10; 3], &have, PlannerConfig::default(), 4);
        upstream(&mut planner, 1);
        assert_eq!(planner.missing(), 1);
        assert_eq!(
            planner.poll(Duration::ZERO),
            vec![Request {
                source: 1,
                piece: 1
            }]
        );
        planner.on_success(1, 1, MS, MS);
        assert!(planner.is_done());
        assert_eq!(planner.next_wakeup(), None);
        assert_eq!(planner.stats().completed, 1);
        assert_eq!(planner.stats().bytes_from_upstreams, 10);
    }

    #[test]
    fn unknown_ids_are_ignored() {
        let mut planner = planner(2);
        planner.source_has(5, 0);
        planner.source_has_all(5);
        assert!(planner.remove_source(5).is_empty());
        assert!(planner.on_success(5, 0, MS, MS).is_empty());
        planner.on_failure(5, 0, MS);
        assert!(planner.on_bad_data(5, 0).is_empty());
        planner.on_cancelled(5, 0);
        upstream(&mut planner, 1);
        planner.source_has(1, 99);
        planner.on_failure(1, 99, MS);
        planner.on_cancelled(1, 99);
        assert!(planner.on_success(1, 99, MS, MS).is_empty());
        assert!(planner.on_bad_data(1, 99).is_empty());
        assert!(
            planner.is_banned(1),
            "bad data bans even for an unknown piece"
        );
        assert!(!planner.is_banned(5));
        assert_eq!(planner.missing(), 2);
    }

    #[test]
    fn seeds_spread_over_edges_starting_together() {
        // Eight edges with different seeds ask the stager for different first pieces.
        let mut firsts = Vec::new();
        for edge in 0..8u64 {
            let mut planner = Planner::new(vec![1000; 1000], &[], PlannerConfig::default(), edge);
            upstream(&mut planner, 1);
            firsts.extend(planner.poll(Duration::ZERO).into_iter().map(|r| r.piece));
        }
        firsts.sort();
        firsts.dedup();
        assert!(firsts.len() >= 30, "{} distinct of 32", firsts.len());
    }

    #[test]
    fn same_seed_same_plan() {
        let run = |seed_value| {
            let mut planner =
                Planner::new(vec![1000; 500], &[], PlannerConfig::default(), seed_value);
            upstream(&mut planner, 1);
            for id in 2..6 {
                peer_with(
                    &mut planner,
                    id,
                    &(0..500).filter(|p| p % id == 0).collect::<Vec<_>>(),
                );
            }
            planner.poll(Duration::ZERO)
        };
        assert_eq!(run(11), run(11));
        assert_ne!(run(11), run(12));
    }

    #[test]
    fn dirty_planner_asks_for_a_poll() {
        let mut planner = planner(1);
        assert_eq!(planner.next_wakeup(), Some(Duration::ZERO));
        planner.poll(Duration::from_secs(5));
        assert_eq!(planner.next_wakeup(), None);
        upstream(&mut planner, 1);
        assert_eq!(planner.next_wakeup(), Some(Duration::from_secs(5)));
    }
}
