//! The stager's side of the WAN: where chunks come from when the site lacks them.
//!
//! - **Upstreams**, in order of preference: upstream stagers (a region's stagers, `--upstream`),
//!   then the origin, always the last resort. Data (subscription, manifests, chunks) comes from
//!   the most preferred one that answers; one that cannot be reached is skipped for
//!   [`UPSTREAM_DOWN_BACKOFF`], one that sent bytes that did not verify is banned for
//!   [`BAD_DATA_BAN`], and every [`PREFERRED_RETRY_INTERVAL`] a more preferred one is tried
//!   again in the background. Control requests (keep-sets, reports, figures) always go to the
//!   origin ([`Upstreams::origin`]): only it knows the fleet.
//! - **Siblings**: the other stagers of the site (`--sibling`). Each chunk has one owner among
//!   the live stagers of the site, by rendezvous hashing of the chunk over their node ids: the
//!   owner pulls it from upstream, the others copy it from the owner over the LAN, so the site's
//!   WAN carries each chunk once whichever stager an edge asks. A sibling that dies is out of
//!   the hashing within [`proto::net::WATCHED_IDLE_TIMEOUT_MS`]; one that lies is banned.
//! - **Flights**: single-flight chunk fetches, so each chunk is fetched once however many edges
//!   and siblings ask, and they get its groups as they land (cut-through).

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use proto::metrics::Metrics;
use proto::net::{connect, connect_with, peer_identity, read_frame, send_request, NetError, Role};
use proto::retry::{retry, RetryPolicy};
use proto::store::Store;
use proto::transfer::fetch::{fetch_blob, FetchError};
use proto::transfer::PeerCounters;
use proto::wire::{ErrorCode, Request, Response, MAX_FRAME_BYTES};
use proto::BlobHash;
use quinn::{Connection, Endpoint};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// Attempts per chunk before a flight gives up (edges then retry or go elsewhere), with waits
/// of up to 200 ms, 400 ms, 800 ms and 1.6 s between them.
pub const FLIGHT_RETRY: RetryPolicy = RetryPolicy {
    max_attempts: 6,
    max_elapsed: None,
    base_delay: Duration::from_millis(200),
    max_delay: Duration::from_secs(2),
};

/// How long a handshake with an upstream stager or a sibling may take before it counts as down.
pub const STAGER_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// How long an upstream that could not be reached is skipped.
pub const UPSTREAM_DOWN_BACKOFF: Duration = Duration::from_secs(10);

/// How long an upstream stager or sibling that sent bytes that did not verify is banned.
pub const BAD_DATA_BAN: Duration = Duration::from_secs(600);

/// How often a stager using a less preferred upstream tries the more preferred ones again.
pub const PREFERRED_RETRY_INTERVAL: Duration = Duration::from_secs(30);

/// How often a sibling that is not connected is dialed.
pub const SIBLING_DIAL_INTERVAL: Duration = Duration::from_secs(1);

/// Chunks pulled from upstream at once, whoever asked (preheat, edges, siblings): more
/// streams would not fill the WAN any better, and every chunk in flight holds up to one part
/// in memory that a killed stager loses, and its siblings must then pull again.
pub const MAX_UPSTREAM_FLIGHTS: usize = 8;

/// Chunk starts a stager keeps for siblings that follow it and read slowly; one that falls
/// further behind misses some (it copies them when its own preheat gets there).
pub const FLIGHT_EVENTS_BACKLOG: usize = 4096;

/// Failovers kept for `stager status`.
pub const MAX_FAILOVER_EVENTS: usize = 32;

/// Metric: upstream failovers, by reason.
pub const FAILOVERS: &str = "stagecoach_stager_failovers_total";

/// Metric: sources (upstream stagers, siblings) banned for bad data, by kind.
pub const BANS: &str = "stagecoach_stager_bans_total";

/// What an upstream is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamKind {
    /// Another stager (a region's).
    Stager,
    /// The origin.
    Origin,
}

/// Why a source is no longer used.
#[derive(Clone, Debug)]
pub enum Fault {
    /// It could not be reached, or its connection broke.
    Down(String),
    /// It sent bytes that did not verify, or a manifest that did not.
    BadData(String),
}

impl Fault {
    /// The fault of a failed fetch from a source, if the source is to blame.
    pub fn of(error: &FetchError) -> Option<Fault> {
        if error.is_corrupt_source() || matches!(error, FetchError::Manifest { .. }) {
            Some(Fault::BadData(error.to_string()))
        } else if matches!(error, FetchError::Net(_)) {
            Some(Fault::Down(error.to_string()))
        } else {
            None
        }
    }

    fn reason(&self) -> &'static str {
        match self {
            Fault::Down(_) => "down",
            Fault::BadData(_) => "bad_data",
        }
    }

    fn detail(&self) -> &str {
        match self {
            Fault::Down(detail) | Fault::BadData(detail) => detail,
        }
    }
}

/// One change of the upstream in use.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FailoverEvent {
    /// When, in seconds since the Unix epoch.
    pub at_unix_s: f64,
    /// The upstream left (`None` at the first connection).
    pub from: Option<String>,
    /// The upstream now in use.
    pub to: String,
    /// Why: `down`, `bad_data` or `preferred_back`.
    pub reason: String,
    /// The error that caused it, if any.
    pub detail: String,
}

/// One upstream as `stager status` shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct UpstreamStatus {
    /// Mesh address.
    pub addr: String,
    /// Stager or origin.
    pub kind: UpstreamKind,
    /// `in use`, `up`, `down`, `banned` or `not tried`.
    pub state: String,
    /// Payload bytes received from it.
    pub pulled_bytes: u64,
}

/// One sibling as `stager status` shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SiblingStatus {
    /// Mesh address.
    pub addr: String,
    /// Its node id, once connected.
    pub node_id: Option<String>,
    /// `up`, `down` or `banned`.
    pub state: String,
}

fn now_unix_s() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

struct Source {
    addr: SocketAddr,
    kind: UpstreamKind,
    conn: Option<Connection>,
    down_until: Option<Instant>,
    banned_until: Option<Instant>,
    last_fault: Option<Fault>,
    tried: bool,
}

impl Source {
    fn live(&self) -> Option<Connection> {
        self.conn
            .as_ref()
            .filter(|conn| conn.close_reason().is_none())
            .cloned()
    }

    fn banned(&self, now: Instant) -> bool {
        self.banned_until.is_some_and(|until| now < until)
    }

    fn down(&self, now: Instant) -> bool {
        self.down_until.is_some_and(|until| now < until)
    }
}

struct Inner {
    sources: Vec<Source>,
    /// The index last handed out for data.
    current: Option<usize>,
    next_probe: Instant,
    probing: bool,
    events: VecDeque<FailoverEvent>,
}

/// The upstream stagers and the origin, in order of preference.
pub struct Upstreams {
    endpoint: Endpoint,
    watched: quinn::ClientConfig,
    inner: tokio::sync::Mutex<Inner>,
    /// Counters per source, in the same order.
    counters: Vec<PeerCounters>,
    metrics: Arc<Metrics>,
    /// Index of the first origin: the stagers come before it, the other origins after.
    first_origin: usize,
}

impl Upstreams {
    /// Upstreams `stagers` (in order of preference), then the `origins` of the mesh (in order
    /// of preference; at least one), through `endpoint`; `watched` is the client config for
    /// stagers (see [`proto::net::watched_client_config`]).
    pub fn new(
        endpoint: Endpoint,
        watched: quinn::ClientConfig,
        stagers: &[SocketAddr],
        origins: &[SocketAddr],
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        let mut sources: Vec<Source> = stagers
            .iter()
            .filter(|addr| !origins.contains(addr))
            .map(|&addr| Source {
                addr,
                kind: UpstreamKind::Stager,
                conn: None,
                down_until: None,
                banned_until: None,
                last_fault: None,
                tried: false,
            })
            .collect();
        let first_origin = sources.len();
        let mut seen = Vec::new();
        for &addr in origins {
            if seen.contains(&addr) {
                continue;
            }
            seen.push(addr);
            sources.push(Source {
                addr,
                kind: UpstreamKind::Origin,
                conn: None,
                down_until: None,
                banned_until: None,
                last_fault: None,
                tried: false,
            });
        }
        let counters = sources
            .iter()
            .enumerate()
            .map(|(index, source)| match source.kind {
                // The first origin keeps the plain label dashboards know.
                UpstreamKind::Origin if index == first_origin => {
                    PeerCounters::new(&metrics, Role::Origin.as_str(), "origin")
                }
                UpstreamKind::Origin => PeerCounters::new(
                    &metrics,
                    Role::Origin.as_str(),
                    &format!("origin {}", source.addr),
                ),
                UpstreamKind::Stager => PeerCounters::new(
                    &metrics,
                    Role::Stager.as_str(),
                    &format!("upstream {}", source.addr),
                ),
            })
            .collect();
        Arc::new(Self {
            endpoint,
            watched,
            inner: tokio::sync::Mutex::new(Inner {
                sources,
                current: None,
                next_probe: Instant::now() + PREFERRED_RETRY_INTERVAL,
                probing: false,
                events: VecDeque::new(),
            }),
            counters,
            metrics,
            first_origin,
        })
    }

    /// The last source's index (an origin: nothing comes after it).
    fn last_index(&self) -> usize {
        self.counters.len() - 1
    }

    /// The counters of upstream `index`.
    pub fn counters(&self, index: usize) -> &PeerCounters {
        &self.counters[index.min(self.last_index())]
    }

    /// Bytes received from upstream stagers and the origin: what crossed the WAN.
    pub fn pulled_bytes(&self) -> u64 {
        self.counters.iter().map(|c| c.received.get()).sum()
    }

    async fn dial(&self, addr: SocketAddr, kind: UpstreamKind) -> Result<Connection, NetError> {
        match kind {
            // With another origin to go to, a dead one is noticed within the watched idle
            // timeout instead of the default's.
            UpstreamKind::Origin if self.first_origin < self.last_index() => {
                connect_with(
                    &self.endpoint,
                    self.watched.clone(),
                    addr,
                    proto::net::HANDSHAKE_TIMEOUT,
                )
                .await
            }
            UpstreamKind::Origin => connect(&self.endpoint, addr).await,
            UpstreamKind::Stager => {
                connect_with(
                    &self.endpoint,
                    self.watched.clone(),
                    addr,
                    STAGER_CONNECT_TIMEOUT,
                )
                .await
            }
        }
    }

    /// A connection to an origin, for control requests: the one already connected (the most
    /// preferred of them), else the first that answers, in order of preference, so control
    /// goes on through another origin when one dies. The handshakes run without the lock: an
    /// origin that does not answer never holds up data from a live upstream stager.
    pub async fn origin(&self) -> Result<Connection, NetError> {
        let addrs: Vec<(usize, SocketAddr)> = {
            let inner = self.inner.lock().await;
            let origins = &inner.sources[self.first_origin..];
            if let Some(conn) = origins.iter().find_map(Source::live) {
                return Ok(conn);
            }
            origins
                .iter()
                .enumerate()
                .map(|(i, s)| (self.first_origin + i, s.addr))
                .collect()
        };
        let mut error = None;
        for (index, addr) in addrs {
            let conn = match self.dial(addr, UpstreamKind::Origin).await {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::warn!(origin = %addr, error = %e, "origin unreachable");
                    error = Some(e);
                    continue;
                }
            };
            let mut inner = self.inner.lock().await;
            let source = &mut inner.sources[index];
            if let Some(existing) = source.live() {
                // Another request connected meanwhile: keep one connection.
                conn.close(0u32.into(), b"duplicate");
                return Ok(existing);
            }
            tracing::info!(origin = %addr, "connected to the origin");
            source.conn = Some(conn.clone());
            source.tried = true;
            return Ok(conn);
        }
        Err(error.unwrap_or(NetError::Timeout {
            what: "connecting to an origin",
            after_ms: 0,
        }))
    }

    /// The most preferred upstream that answers, with its index: for data. The origin is tried
    /// even when it was down a moment ago, since nothing comes after it.
    pub async fn data(self: &Arc<Self>) -> Result<(Connection, usize), NetError> {
        let mut inner = self.inner.lock().await;
        let now = Instant::now();
        // The current one while it lives; a more preferred one is probed in the background.
        if let Some(index) = inner.current {
            if let Some(conn) = inner.sources[index].live() {
                let preferred = inner.sources[..index]
                    .iter()
                    .position(|s| !s.banned(now) && s.live().is_some());
                if let Some(better) = preferred {
                    let conn = inner.sources[better].live();
                    if let Some(conn) = conn {
                        self.switch(&mut inner, better, "preferred_back", String::new());
                        return Ok((conn, better));
                    }
                }
                if index > 0 && now >= inner.next_probe && !inner.probing {
                    inner.next_probe = now + PREFERRED_RETRY_INTERVAL;
                    inner.probing = true;
                    tokio::spawn(self.clone().probe_preferred(index));
                }
                return Ok((conn, index));
            }
        }
        let last = self.last_index();
        let mut error = None;
        for index in 0..=last {
            let source = &inner.sources[index];
            if index < last && (source.banned(now) || source.down(now)) {
                continue;
            }
            if let Some(conn) = source.live() {
                self.switch(&mut inner, index, "down", String::new());
                return Ok((conn, index));
            }
            let (addr, kind) = (source.addr, source.kind);
            match self.dial(addr, kind).await {
                Ok(conn) => {
                    tracing::info!(upstream = %addr, ?kind, "connected to upstream");
                    let source = &mut inner.sources[index];
                    source.conn = Some(conn.clone());
                    source.tried = true;
                    source.down_until = None;
                    self.switch(&mut inner, index, "down", String::new());
                    return Ok((conn, index));
                }
                Err(e) => {
                    tracing::warn!(upstream = %addr, error = %e, "upstream unreachable");
                    let source = &mut inner.sources[index];
                    source.tried = true;
                    source.down_until = Some(now + UPSTREAM_DOWN_BACKOFF);
                    source.last_fault = Some(Fault::Down(e.to_string()));
                    error = Some(e);
                }
            }
        }
        Err(error.unwrap_or(NetError::Timeout {
            what: "connecting to any upstream",
            after_ms: 0,
        }))
    }

    /// Records that data now comes from `index`; a change is a failover (logged, counted,
    /// kept for `stager status`).
    fn switch(&self, inner: &mut Inner, index: usize, reason: &str, detail: String) {
        let previous = inner.current.replace(index);
        if previous == Some(index) {
            return;
        }
        let to = inner.sources[index].addr.to_string();
        for (i, source) in inner.sources.iter().enumerate() {
            self.metrics
                .gauge(
                    "stagecoach_stager_upstream_in_use",
                    "1 for the upstream data comes from, 0 for the others",
                    &[("upstream", &source.addr.to_string())],
                )
                .set(u64::from(i == index));
        }
        let Some(previous) = previous else {
            tracing::info!(upstream = %to, "pulling from upstream");
            return;
        };
        let from = inner.sources[previous].addr.to_string();
        let (reason, detail) = match &inner.sources[previous].last_fault {
            Some(fault) if reason != "preferred_back" => {
                (fault.reason().to_owned(), fault.detail().to_owned())
            }
            _ => (reason.to_owned(), detail),
        };
        tracing::warn!(%from, %to, %reason, %detail, "upstream failover");
        self.metrics
            .counter(
                FAILOVERS,
                "Changes of the upstream a stager pulls from, by reason",
                &[("reason", &reason)],
            )
            .inc();
        inner.events.push_back(FailoverEvent {
            at_unix_s: now_unix_s(),
            from: Some(from),
            to,
            reason,
            detail,
        });
        while inner.events.len() > MAX_FAILOVER_EVENTS {
            inner.events.pop_front();
        }
    }

    /// Tries the upstreams more preferred than `current`; one that answers is used from the
    /// next request on.
    async fn probe_preferred(self: Arc<Self>, current: usize) {
        let candidates: Vec<(usize, SocketAddr, UpstreamKind)> = {
            let inner = self.inner.lock().await;
            let now = Instant::now();
            inner.sources[..current]
                .iter()
                .enumerate()
                .filter(|(_, s)| !s.banned(now) && s.live().is_none())
                .map(|(i, s)| (i, s.addr, s.kind))
                .collect()
        };
        for (index, addr, kind) in candidates {
            match self.dial(addr, kind).await {
                Ok(conn) => {
                    tracing::info!(upstream = %addr, "a preferred upstream answers again");
                    let mut inner = self.inner.lock().await;
                    let source = &mut inner.sources[index];
                    source.conn = Some(conn);
                    source.down_until = None;
                    source.last_fault = None;
                    break;
                }
                Err(error) => {
                    tracing::debug!(upstream = %addr, %error, "preferred upstream still down")
                }
            }
        }
        self.inner.lock().await.probing = false;
    }

    /// Upstream `index` failed a request: it is skipped for a while (banned, for bad data; the
    /// origin is never banned, as nothing comes after it).
    pub async fn fault(&self, index: usize, fault: Fault) {
        let mut inner = self.inner.lock().await;
        let last = self.last_index();
        let Some(source) = inner.sources.get_mut(index) else {
            return;
        };
        let now = Instant::now();
        match &fault {
            Fault::Down(detail) => {
                if source.banned(now) {
                    // Its connection was closed by the ban: the ban is the reason.
                    return;
                }
                tracing::warn!(upstream = %source.addr, %detail, "upstream failed");
                if index < last {
                    source.down_until = Some(now + UPSTREAM_DOWN_BACKOFF);
                }
            }
            Fault::BadData(detail) => {
                tracing::error!(upstream = %source.addr, %detail, "upstream sent data that did not verify");
                // Origins are never banned: they hold the publisher's bundles.
                if source.kind == UpstreamKind::Stager && !source.banned(now) {
                    tracing::error!(upstream = %source.addr, secs = BAD_DATA_BAN.as_secs(), "upstream stager banned");
                    source.banned_until = Some(now + BAD_DATA_BAN);
                    self.metrics
                        .counter(
                            BANS,
                            "Stagers banned for bad data, by kind",
                            &[("kind", "upstream")],
                        )
                        .inc();
                }
            }
        }
        if index < last {
            if let Some(conn) = source.conn.take() {
                conn.close(0u32.into(), b"upstream failed");
            }
        }
        source.last_fault = Some(fault);
    }

    /// The upstreams and the failovers, for `stager status`.
    pub async fn status(&self) -> (Vec<UpstreamStatus>, Vec<FailoverEvent>) {
        let inner = self.inner.lock().await;
        let now = Instant::now();
        let upstreams = inner
            .sources
            .iter()
            .enumerate()
            .map(|(i, s)| UpstreamStatus {
                addr: s.addr.to_string(),
                kind: s.kind,
                state: if s.banned(now) {
                    "banned"
                } else if inner.current == Some(i) && s.live().is_some() {
                    "in use"
                } else if s.live().is_some() {
                    "up"
                } else if s.down(now) || s.last_fault.is_some() {
                    "down"
                } else if s.tried {
                    "idle"
                } else {
                    "not tried"
                }
                .to_owned(),
                pulled_bytes: self.counters[i].received.get(),
            })
            .collect();
        (upstreams, inner.events.iter().cloned().collect())
    }
}

struct Sibling {
    addr: SocketAddr,
    node_id: Option<String>,
    conn: Option<Connection>,
    banned_until: Option<Instant>,
}

impl Sibling {
    fn banned(&self, now: Instant) -> bool {
        self.banned_until.is_some_and(|until| now < until)
    }
}

/// What a stager does with a chunk a sibling started pulling upstream.
pub type OnSiblingFlight = Arc<dyn Fn(BlobHash) + Send + Sync>;

/// The other stagers of this site.
pub struct Siblings {
    on_flight: std::sync::OnceLock<OnSiblingFlight>,
    me: String,
    site: String,
    endpoint: Endpoint,
    watched: quinn::ClientConfig,
    list: Mutex<Vec<Sibling>>,
    counters: PeerCounters,
    metrics: Arc<Metrics>,
}

/// The rendezvous score of `node` for `hash`: the highest score owns the chunk.
fn score(node: &str, hash: &BlobHash) -> u64 {
    let mut hasher = blake3::Hasher::new();
    hasher.update(node.as_bytes());
    hasher.update(&[0]);
    hasher.update(hash.as_bytes());
    let digest = hasher.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest.as_bytes()[..8]);
    u64::from_le_bytes(first)
}

/// Which of `nodes` owns `hash` (rendezvous hashing): the same answer on every stager that
/// sees the same nodes, and a node leaving moves only the chunks it owned.
pub fn owner<'a>(nodes: impl IntoIterator<Item = &'a str>, hash: &BlobHash) -> Option<&'a str> {
    nodes
        .into_iter()
        .max_by_key(|node| (score(node, hash), *node))
}

impl Siblings {
    /// The siblings at `addrs` of the stager `me` (its node id) of `site`.
    pub fn new(
        me: String,
        site: String,
        endpoint: Endpoint,
        watched: quinn::ClientConfig,
        addrs: &[SocketAddr],
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        let counters = PeerCounters::new(&metrics, Role::Stager.as_str(), &site);
        Arc::new(Self {
            on_flight: std::sync::OnceLock::new(),
            me,
            site,
            endpoint,
            watched,
            list: Mutex::new(
                addrs
                    .iter()
                    .map(|&addr| Sibling {
                        addr,
                        node_id: None,
                        conn: None,
                        banned_until: None,
                    })
                    .collect(),
            ),
            counters,
            metrics,
        })
    }

    fn list(&self) -> std::sync::MutexGuard<'_, Vec<Sibling>> {
        self.list.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets what to do when a sibling says it started pulling a chunk upstream (once).
    pub fn on_flight(&self, action: OnSiblingFlight) {
        let _ = self.on_flight.set(action);
    }

    /// Follows a sibling's upstream pulls ([`Request::SiblingFlights`]) until the stream or
    /// its connection ends.
    async fn follow(self: Arc<Self>, addr: SocketAddr, conn: Connection) {
        let mut recv = match send_request(&conn, &Request::SiblingFlights).await {
            Ok(recv) => recv,
            Err(error) => {
                tracing::debug!(sibling = %addr, %error, "cannot follow the sibling's pulls");
                return;
            }
        };
        loop {
            match read_frame::<Response>(&mut recv, MAX_FRAME_BYTES).await {
                Ok(Some(Response::FlightStarted { hash })) => {
                    if let Some(action) = self.on_flight.get() {
                        action(hash);
                    }
                }
                Ok(Some(other)) => {
                    tracing::warn!(sibling = %addr, answer = ?other, "sibling does not share its pulls");
                    return;
                }
                Ok(None) => return,
                Err(error) => {
                    tracing::debug!(sibling = %addr, %error, "stopped following the sibling's pulls");
                    return;
                }
            }
        }
    }

    /// Counters of the bytes exchanged with siblings.
    pub fn counters(&self) -> &PeerCounters {
        &self.counters
    }

    /// The sibling that owns `hash`, with its connection; `None` when this stager owns it.
    pub fn owner(&self, hash: &BlobHash) -> Option<(usize, Connection)> {
        let list = self.list();
        let now = Instant::now();
        let live: Vec<(usize, &str, Connection)> = list
            .iter()
            .enumerate()
            .filter(|(_, s)| !s.banned(now))
            .filter_map(|(i, s)| {
                let conn = s.conn.as_ref().filter(|c| c.close_reason().is_none())?;
                Some((i, s.node_id.as_deref()?, conn.clone()))
            })
            .collect();
        let chosen = owner(
            std::iter::once(self.me.as_str()).chain(live.iter().map(|(_, id, _)| *id)),
            hash,
        )?;
        live.into_iter()
            .find(|(_, id, _)| *id == chosen)
            .map(|(i, _, conn)| (i, conn))
    }

    /// Sibling `index` failed a request: down until it is dialed again, banned for bad data.
    pub fn fault(&self, index: usize, fault: &Fault) {
        let mut list = self.list();
        let Some(sibling) = list.get_mut(index) else {
            return;
        };
        match fault {
            Fault::Down(detail) => {
                tracing::warn!(sibling = %sibling.addr, %detail, "sibling stager failed; its chunks go to the others");
            }
            Fault::BadData(_) if sibling.banned(Instant::now()) => {}
            Fault::BadData(detail) => {
                tracing::error!(sibling = %sibling.addr, %detail, secs = BAD_DATA_BAN.as_secs(), "sibling stager sent data that did not verify; banned");
                sibling.banned_until = Some(Instant::now() + BAD_DATA_BAN);
                self.metrics
                    .counter(
                        BANS,
                        "Stagers banned for bad data, by kind",
                        &[("kind", "sibling")],
                    )
                    .inc();
            }
        }
        if let Some(conn) = sibling.conn.take() {
            conn.close(0u32.into(), b"sibling failed");
        }
    }

    /// Keeps a connection to every sibling: dials the ones not connected every
    /// [`SIBLING_DIAL_INTERVAL`], and checks each is a stager of this site.
    pub async fn maintain(self: Arc<Self>) {
        let mut every = tokio::time::interval(SIBLING_DIAL_INTERVAL);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            let now = Instant::now();
            let to_dial: Vec<(usize, SocketAddr)> = self
                .list()
                .iter()
                .enumerate()
                .filter(|(_, s)| !s.banned(now))
                .filter(|(_, s)| s.conn.as_ref().is_none_or(|c| c.close_reason().is_some()))
                .map(|(i, s)| (i, s.addr))
                .collect();
            for (index, addr) in to_dial {
                let dialed = connect_with(
                    &self.endpoint,
                    self.watched.clone(),
                    addr,
                    STAGER_CONNECT_TIMEOUT,
                )
                .await;
                let conn = match dialed {
                    Ok(conn) => conn,
                    Err(error) => {
                        tracing::debug!(sibling = %addr, %error, "sibling stager not reachable");
                        continue;
                    }
                };
                let who = match peer_identity(&conn) {
                    Ok(who) => who,
                    Err(error) => {
                        tracing::error!(sibling = %addr, %error, "sibling without a usable certificate");
                        continue;
                    }
                };
                if who.role != Role::Stager || who.site.as_str() != self.site {
                    tracing::error!(sibling = %addr, peer = %who, site = %self.site, "--sibling names a node that is not a stager of this site; ignoring it");
                    conn.close(0u32.into(), b"not a sibling");
                    let mut list = self.list();
                    if let Some(sibling) = list.get_mut(index) {
                        sibling.banned_until = Some(Instant::now() + BAD_DATA_BAN);
                    }
                    continue;
                }
                tracing::info!(sibling = %addr, node = %who.node_id, "sibling stager connected");
                tokio::spawn(self.clone().follow(addr, conn.clone()));
                let mut list = self.list();
                if let Some(sibling) = list.get_mut(index) {
                    sibling.node_id = Some(who.node_id.to_string());
                    sibling.conn = Some(conn);
                }
            }
        }
    }

    /// The siblings, for `stager status`.
    pub fn status(&self) -> Vec<SiblingStatus> {
        let now = Instant::now();
        self.list()
            .iter()
            .map(|s| SiblingStatus {
                addr: s.addr.to_string(),
                node_id: s.node_id.clone(),
                state: if s.banned(now) {
                    "banned"
                } else if s.conn.as_ref().is_some_and(|c| c.close_reason().is_none()) {
                    "up"
                } else {
                    "down"
                }
                .to_owned(),
            })
            .collect()
    }
}

struct Flight {
    progress: watch::Receiver<u64>,
    /// True while the flight fetches from a sibling (then a sibling asking for the chunk is
    /// told `Busy` rather than joining: two stagers must never wait on each other).
    via_sibling: Arc<AtomicBool>,
}

/// Chunk fetches in progress, by hash. A receiver changes whenever a group lands and closes when
/// the fetch ends.
pub struct Flights {
    upstreams: Arc<Upstreams>,
    siblings: Arc<Siblings>,
    store: Store,
    inflight: Mutex<HashMap<BlobHash, Flight>>,
    /// Each chunk as a flight starts pulling it upstream, for siblings that follow.
    started: tokio::sync::broadcast::Sender<BlobHash>,
    /// [`MAX_UPSTREAM_FLIGHTS`].
    upstream_slots: tokio::sync::Semaphore,
}

/// Why a sibling's request for a chunk is not joined.
#[derive(Debug)]
pub struct SiblingBusy;

impl Flights {
    /// Flights through `upstreams` and `siblings` into `store`.
    pub fn new(upstreams: Arc<Upstreams>, siblings: Arc<Siblings>, store: Store) -> Arc<Self> {
        Arc::new(Self {
            upstreams,
            siblings,
            store,
            inflight: Mutex::new(HashMap::new()),
            started: tokio::sync::broadcast::channel(FLIGHT_EVENTS_BACKLOG).0,
            upstream_slots: tokio::sync::Semaphore::new(MAX_UPSTREAM_FLIGHTS),
        })
    }

    /// The upstreams.
    pub fn upstreams(&self) -> &Arc<Upstreams> {
        &self.upstreams
    }

    /// The siblings.
    pub fn siblings(&self) -> &Arc<Siblings> {
        &self.siblings
    }

    /// The chunks this stager starts pulling upstream from now on.
    pub fn upstream_starts(&self) -> tokio::sync::broadcast::Receiver<BlobHash> {
        self.started.subscribe()
    }

    /// Joins the fetch of `hash` (`size` bytes, from a verified manifest), starting it if none
    /// runs. `None` if the blob is already complete.
    pub fn join(self: &Arc<Self>, hash: BlobHash, size: u64) -> Option<watch::Receiver<u64>> {
        self.join_as(hash, size, false).ok().flatten()
    }

    /// [`Self::join`] for a sibling, which asks because it takes this stager for the chunk's
    /// owner: a new flight goes upstream, never to a sibling, and a flight already fetching
    /// from a sibling is not joined ([`SiblingBusy`]: the sibling then pulls it itself).
    pub fn join_for_sibling(
        self: &Arc<Self>,
        hash: BlobHash,
        size: u64,
    ) -> Result<Option<watch::Receiver<u64>>, SiblingBusy> {
        self.join_as(hash, size, true)
    }

    fn join_as(
        self: &Arc<Self>,
        hash: BlobHash,
        size: u64,
        for_sibling: bool,
    ) -> Result<Option<watch::Receiver<u64>>, SiblingBusy> {
        if self.store.has_blob(&hash) {
            return Ok(None);
        }
        let mut inflight = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(flight) = inflight.get(&hash) {
            if for_sibling && flight.via_sibling.load(Ordering::Acquire) {
                return Err(SiblingBusy);
            }
            return Ok(Some(flight.progress.clone()));
        }
        let (tx, rx) = watch::channel(0u64);
        let via_sibling = Arc::new(AtomicBool::new(false));
        inflight.insert(
            hash,
            Flight {
                progress: rx.clone(),
                via_sibling: via_sibling.clone(),
            },
        );
        let flights = self.clone();
        tokio::spawn(async move {
            flights.fly(hash, size, tx, via_sibling, for_sibling).await;
            if let Ok(mut inflight) = flights.inflight.lock() {
                inflight.remove(&hash);
            }
        });
        Ok(Some(rx))
    }

    /// Fetches `hash` if needed and waits until the fetch ends; true if the blob is complete.
    pub async fn fetch(self: &Arc<Self>, hash: BlobHash, size: u64) -> bool {
        if let Some(mut rx) = self.join(hash, size) {
            while rx.changed().await.is_ok() {}
        }
        self.store.has_blob(&hash)
    }

    async fn fly(
        &self,
        hash: BlobHash,
        size: u64,
        tx: watch::Sender<u64>,
        via_sibling: Arc<AtomicBool>,
        upstream_only: bool,
    ) {
        let what = format!("fetch of chunk {hash}");
        let (tx, via_sibling) = (&tx, &via_sibling);
        // Set once a sibling said `Busy`: this flight then goes upstream.
        let skip_siblings = &AtomicBool::new(upstream_only);
        let fetched = retry(
            &what,
            &FLIGHT_RETRY,
            |error: &FetchError| !matches!(error, FetchError::Store(_)),
            |_| async move {
                if !skip_siblings.load(Ordering::Acquire) {
                    if let Some((index, conn)) = self.siblings.owner(&hash) {
                        via_sibling.store(true, Ordering::Release);
                        let counters = self.siblings.counters();
                        let fetched =
                            fetch_blob(&conn, &self.store, hash, size, counters, Some(tx)).await;
                        via_sibling.store(false, Ordering::Release);
                        match &fetched {
                            Err(FetchError::Refused {
                                code: ErrorCode::Busy,
                                ..
                            }) => skip_siblings.store(true, Ordering::Release),
                            Err(error) => {
                                if let Some(fault) = Fault::of(error) {
                                    self.siblings.fault(index, &fault);
                                }
                            }
                            Ok(_) => {}
                        }
                        return fetched;
                    }
                }
                let _slot = self
                    .upstream_slots
                    .acquire()
                    .await
                    .map_err(|_| FetchError::Protocol("the stager is stopping".to_owned()))?;
                let (conn, index) = self.upstreams.data().await?;
                // Nobody may be following: that is no error.
                let _ = self.started.send(hash);
                let counters = self.upstreams.counters(index);
                let fetched = fetch_blob(&conn, &self.store, hash, size, counters, Some(tx)).await;
                if let Err(error) = &fetched {
                    if let Some(fault) = Fault::of(error) {
                        self.upstreams.fault(index, fault).await;
                    }
                }
                fetched
            },
        )
        .await;
        match fetched {
            Ok(bytes) => tracing::debug!(blob = %hash, bytes, "chunk fetched"),
            Err(error) => tracing::error!(blob = %hash, %error, "giving up on chunk for now"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::owner;
    use proto::BlobHash;

    #[test]
    fn rendezvous_splits_chunks_and_moves_only_a_leavers() {
        let hashes: Vec<BlobHash> = (0u32..2000)
            .map(|i| BlobHash::of(&i.to_le_bytes()))
            .collect();
        let two = ["node-a", "node-b"];
        let three = ["node-a", "node-b", "node-c"];
        let owned_by_a = hashes
            .iter()
            .filter(|h| owner(two, h) == Some("node-a"))
            .count();
        // About half each.
        assert!((850..1150).contains(&owned_by_a), "{owned_by_a}");
        // The order the nodes are listed in changes nothing.
        for h in &hashes {
            assert_eq!(owner(two, h), owner(["node-b", "node-a"], h));
        }
        // When c leaves, only c's chunks move.
        for h in &hashes {
            let with_c = owner(three, h);
            if with_c != Some("node-c") {
                assert_eq!(owner(two, h), with_c);
            }
        }
        assert_eq!(owner(std::iter::empty(), &hashes[0]), None);
    }
}
