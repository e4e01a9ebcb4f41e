//! `stager serve`: the subscription to the origin, preheating, and serving the site.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use ed25519_dalek::VerifyingKey;
use proto::bundles;
use proto::durable;
use proto::manifest::{BundleId, Manifest};
use proto::metrics::Metrics;
use proto::net::{
    read_frame, send_request, server_endpoint, write_frame, NodeIdentity, PeerIdentity, Role, Site,
};
use proto::retention::Retention;
use proto::retry::{retry, RetryPolicy};
use proto::store::{Store, StoreOptions};
use proto::transfer::fetch::{fetch_manifest, keep_set, FetchError};
use proto::transfer::pace::RateLimit;
use proto::transfer::serve::{serve_blob, spans_to_ranges, ServeOptions};
use proto::transfer::server::{self, RequestHandler};
use proto::transfer::{names, PeerCounters};
use proto::wire::{
    authorize, BundleInfo, ErrorCode, Holding, Request, Response, SitePeer, MAX_FRAME_BYTES,
    MAX_HOLDINGS, MAX_HOLDING_RANGES,
};
use proto::{BlobHash, SignedManifest};
use quinn::{RecvStream, SendStream};

use crate::upstream::{
    FailoverEvent, Fault, Flights, SiblingStatus, Siblings, UpstreamStatus, Upstreams,
};

/// Chunks of one bundle prefetched at once.
pub const PREHEAT_CONCURRENCY: usize = 8;

/// Announcements preheated at once; a further announcement waits for one of them to end (each
/// ends within [`PREHEAT_RETRY`]), so a bundle that cannot be pulled never blocks later ones.
pub const MAX_CONCURRENT_PREHEATS: usize = 2;

/// Attempts at preheating one bundle. Giving up costs nothing lasting: edges that ask for the
/// bundle make the stager pull its chunks on demand.
pub const PREHEAT_RETRY: RetryPolicy = RetryPolicy {
    max_attempts: 8,
    max_elapsed: None,
    base_delay: Duration::from_secs(1),
    max_delay: Duration::from_secs(60),
};

/// Delay before resubscribing after the origin connection drops.
pub const RESUBSCRIBE_DELAY: Duration = Duration::from_millis(500);

/// How often the metrics summary is logged.
pub const METRICS_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// How often the stager asks the origin for its site's keep-set (also after every preheat).
pub const KEEP_SET_REFRESH_INTERVAL: Duration = Duration::from_secs(30);

/// How often the stager tells the origin its traffic figures, when they changed.
pub const STATS_INTERVAL: Duration = Duration::from_secs(5);

/// How often the stager tells the origin where it serves its site, once the origin took it
/// (until then, every [`STATS_INTERVAL`]): a restarted origin learns it again within this.
pub const ADVERTISE_INTERVAL: Duration = Duration::from_secs(30);

/// How often `status.json` is rewritten (when it changed).
pub const STATUS_INTERVAL: Duration = Duration::from_secs(2);

/// The file under the state directory where a running stager says what it does
/// (`stager status` reads it).
pub const STATUS_FILE: &str = "status.json";

/// Default `--cache-gib`: the bound on the stager's store, in GiB.
pub const DEFAULT_CACHE_GIB: &str = "64";

/// How `stager serve` runs.
#[derive(Clone, Debug)]
pub struct StagerConfig {
    /// State directory (identity, store, last sequence number).
    pub dir: PathBuf,
    /// Expected site; must match the certificate.
    pub site: Option<String>,
    /// Origin mesh address (default: from enrollment).
    pub origin: Option<SocketAddr>,
    /// Other origins of the mesh, in order of preference after `origin`: control and data go
    /// to the next one that answers when an origin cannot be reached.
    pub more_origins: Vec<SocketAddr>,
    /// Upstream stagers (a region's), in order of preference; the origin comes after them.
    pub upstreams: Vec<SocketAddr>,
    /// The other stagers of this site.
    pub siblings: Vec<SocketAddr>,
    /// Mesh address for the site's edges.
    pub listen: SocketAddr,
    /// Where the site's edges reach this stager, told to the origin so it can name the site's
    /// stagers to an enrolling edge (default: `listen` as bound, an unspecified address
    /// read as loopback).
    pub advertise: Option<SocketAddr>,
    /// Prometheus metrics address.
    pub metrics_listen: SocketAddr,
    /// Write bound addresses as JSON here once listening.
    pub ready_file: Option<PathBuf>,
    /// Bound on the store, in bytes: bundles outside the site's keep-set are evicted least
    /// recently used beyond it (kept ones never are).
    pub cache_limit_bytes: u64,
    /// Test hook: corrupt every blob part served to edges. The binary's switch for it,
    /// `--test-corrupt-serving`, exists only in a build with the `test-hooks` feature.
    pub test_corrupt_serving: bool,
    /// Upload limit to the site's edges, in bits per second (`None`: as fast as QUIC goes).
    pub upload_limit_bits_per_s: Option<u64>,
}

/// Most edges a stager lists for one site: bounds the registry and the answer frame.
pub const MAX_SITE_PEERS: usize = 4096;

/// The identity directory under a stager's state directory.
pub fn identity_dir(dir: &Path) -> PathBuf {
    dir.join("identity")
}

struct Known {
    manifests: HashMap<BundleId, (SignedManifest, Manifest)>,
    chunk_sizes: HashMap<BlobHash, u64>,
    catalog: Vec<BundleInfo>,
}

/// The running stager.
pub struct Stager {
    site: Site,
    store: Store,
    /// Which bundles the store keeps: the site's keep-set from the origin.
    retention: Retention,
    trusted: [VerifyingKey; 1],
    flights: Arc<Flights>,
    known: Mutex<Known>,
    metrics: Arc<Metrics>,
    seq_file: PathBuf,
    corrupt: bool,
    pace: Option<RateLimit>,
    /// The site's edges that asked for the peer list, by node id, with what each holds: the
    /// site's tracker.
    site_peers: Mutex<BTreeMap<String, SitePeer>>,
}

impl Stager {
    fn known(&self) -> std::sync::MutexGuard<'_, Known> {
        match self.known.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    fn request_counter(&self, kind: &'static str) {
        self.metrics
            .counter(names::REQUESTS, "Requests served", &[("kind", kind)])
            .inc();
    }

    /// The verified manifest of `id`: from memory, the store, or the origin.
    async fn manifest(&self, id: BundleId) -> Result<(SignedManifest, Manifest), FetchError> {
        if let Some(found) = self.known().manifests.get(&id) {
            return Ok(found.clone());
        }
        let stored = self.store.get_manifest(&id)?;
        let (signed, manifest) = match stored {
            Some(signed) => {
                let manifest = signed
                    .verify_as(id, &self.trusted)
                    .map_err(|source| FetchError::Manifest { id, source })?;
                (signed, manifest)
            }
            None => {
                let upstreams = self.flights.upstreams();
                let (conn, index) = upstreams.data().await?;
                match fetch_manifest(&conn, id, &self.trusted).await {
                    Ok(found) => found,
                    Err(error) => {
                        if let Some(fault) = Fault::of(&error) {
                            upstreams.fault(index, fault).await;
                        }
                        return Err(error);
                    }
                }
            }
        };
        let mut known = self.known();
        for chunk in &manifest.chunks {
            known.chunk_sizes.insert(chunk.hash, chunk.stored_bytes);
        }
        known
            .manifests
            .insert(id, (signed.clone(), manifest.clone()));
        Ok((signed, manifest))
    }

    /// Pulls every chunk of bundle `info` the site lacks, then records it as held.
    async fn preheat(self: &Arc<Self>, info: &BundleInfo) -> Result<()> {
        let (signed, manifest) = self.manifest(info.id).await?;
        // Pinned before its chunks arrive: the store's limit never evicts a preheat under itself.
        let hold = tokio::task::block_in_place(|| self.retention.hold(info.id, &manifest))?;
        let mut unique: Vec<(BlobHash, u64)> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for chunk in &manifest.chunks {
            if seen.insert(chunk.hash) {
                unique.push((chunk.hash, chunk.stored_bytes));
            }
        }
        let slots = Arc::new(tokio::sync::Semaphore::new(PREHEAT_CONCURRENCY));
        let mut tasks = tokio::task::JoinSet::new();
        for (hash, size) in unique {
            let permit = slots.clone().acquire_owned().await?;
            let flights = self.flights.clone();
            tasks.spawn(async move {
                let _permit = permit;
                flights.fetch(hash, size).await
            });
        }
        let mut missing = 0usize;
        while let Some(done) = tasks.join_next().await {
            if !matches!(done, Ok(true)) {
                missing += 1;
            }
        }
        if missing > 0 {
            bail!("{missing} chunks of {} could not be fetched", info.id);
        }
        tokio::task::block_in_place(|| -> Result<()> {
            bundles::pin_bundle(&self.store, &info.id, &manifest)?;
            self.store.put_manifest(&signed)?;
            Ok(())
        })?;
        drop(hold);
        self.retention.fetched(info.id);
        {
            let mut known = self.known();
            if !known.catalog.iter().any(|b| b.id == info.id) {
                known.catalog.push(info.clone());
            }
        }
        tracing::info!(bundle = %info.id, name = %info.name, version = %info.version, "bundle held by the site");
        // A completed fetch: the keep-set has moved on, collect.
        self.refresh_keep_set().await;
        Ok(())
    }

    /// Asks the origin for the site's keep-set and applies it (pins become exactly the set,
    /// plus what is being fetched), then collects garbage. Without an answer every pin stays.
    async fn refresh_keep_set(&self) {
        let ticket = self.retention.ticket();
        let answer = match self.flights.upstreams().origin().await {
            Ok(conn) => keep_set(&conn, &Request::KeepSet).await,
            Err(error) => Err(FetchError::Net(error)),
        };
        let collected = tokio::task::block_in_place(|| match answer {
            Ok(keep) => self.retention.set_keep_set(ticket, keep.bundles),
            Err(error) => self.retention.keep_set_unavailable(&error),
        });
        if let Err(error) = collected {
            tracing::error!(%error, "garbage collection failed");
        }
    }

    /// Keeps the site's keep-set fresh: the origin's changes when nodes report or a rollout
    /// moves reach the store within [`KEEP_SET_REFRESH_INTERVAL`].
    async fn keep_fresh(self: Arc<Self>) {
        let mut every = tokio::time::interval(KEEP_SET_REFRESH_INTERVAL);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            self.refresh_keep_set().await;
        }
    }

    /// Tells the origin what this stager moved ([`Request::StagerStats`]) every
    /// [`STATS_INTERVAL`] when a figure changed, for the origin's console.
    async fn report_stats(self: Arc<Self>) {
        let mut every = tokio::time::interval(STATS_INTERVAL);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last = None;
        loop {
            every.tick().await;
            let figures = (
                self.metrics
                    .total_where(names::BYTES_SENT, "peer_role", Role::Edge.as_str()),
                self.flights.upstreams().pulled_bytes(),
            );
            if last == Some(figures) {
                continue;
            }
            let request = Request::StagerStats {
                served_bytes: figures.0,
                pulled_bytes: figures.1,
            };
            let answer = match self.flights.upstreams().origin().await {
                Ok(conn) => proto::net::call(&conn, &request, MAX_FRAME_BYTES)
                    .await
                    .map_err(|e| e.to_string()),
                Err(error) => Err(error.to_string()),
            };
            match answer {
                Ok(Response::Ok) => last = Some(figures),
                Ok(other) => {
                    tracing::debug!(?other, "the origin did not take the stager's figures")
                }
                Err(error) => tracing::debug!(%error, "cannot send the stager's figures"),
            }
        }
    }

    /// Tells the origin where the site's edges reach this stager ([`Request::StagerAddress`]),
    /// every [`ADVERTISE_INTERVAL`] (every [`STATS_INTERVAL`] while the origin does not
    /// answer), so it can name the site's stagers to the edges that enroll.
    async fn advertise(self: Arc<Self>, addr: SocketAddr) {
        let request = Request::StagerAddress {
            data_addr: addr.to_string(),
        };
        let mut told = false;
        loop {
            let answer = match self.flights.upstreams().origin().await {
                Ok(conn) => proto::net::call(&conn, &request, MAX_FRAME_BYTES)
                    .await
                    .map_err(|e| e.to_string()),
                Err(error) => Err(error.to_string()),
            };
            let wait = match answer {
                Ok(Response::Ok) => {
                    if !told {
                        tracing::info!(%addr, "the origin knows where this stager serves its site");
                        told = true;
                    }
                    ADVERTISE_INTERVAL
                }
                Ok(other) => {
                    tracing::warn!(?other, %addr, "the origin did not take this stager's address");
                    ADVERTISE_INTERVAL
                }
                Err(error) => {
                    tracing::debug!(%error, "cannot tell the origin this stager's address");
                    STATS_INTERVAL
                }
            };
            tokio::time::sleep(wait).await;
        }
    }

    /// Follows the origin's announcements forever, preheating each bundle in order.
    async fn follow(self: Arc<Self>) {
        loop {
            if let Err(error) = self.follow_once().await {
                tracing::warn!(%error, "upstream subscription ended; resubscribing");
            }
            tokio::time::sleep(RESUBSCRIBE_DELAY).await;
        }
    }

    async fn follow_once(self: &Arc<Self>) -> Result<()> {
        let after_seq = read_seq(&self.seq_file);
        let (conn, _) = self.flights.upstreams().data().await?;
        let mut recv = send_request(&conn, &Request::Subscribe { after_seq }).await?;
        tracing::info!(after_seq, upstream = %conn.remote_address(), "subscribed upstream");
        // Dropped when the subscription ends: unfinished preheats stop, and since the saved
        // sequence number is below them, the next subscription announces them again.
        let mut preheats = tokio::task::JoinSet::new();
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_PREHEATS));
        let progress = Arc::new(Mutex::new(SeqProgress::after(after_seq)));
        while let Some(message) = read_frame::<Response>(&mut recv, MAX_FRAME_BYTES).await? {
            let Response::Announce(info) = message else {
                bail!("unexpected message on the subscription: {message:?}");
            };
            tracing::info!(bundle = %info.id, name = %info.name, version = %info.version, seq = info.seq, "announced");
            let permit = slots.clone().acquire_owned().await?;
            progress
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .started(info.seq);
            let (stager, progress) = (self.clone(), progress.clone());
            preheats.spawn(async move {
                let _permit = permit;
                stager.preheat_with_retries(&info).await;
                let mut progress = progress.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(seq) = progress.finished(info.seq) {
                    if let Err(error) = write_seq(&stager.seq_file, seq) {
                        tracing::error!(
                            seq,
                            error = format!("{error:#}"),
                            "cannot record the last sequence number"
                        );
                    }
                }
            });
            while preheats.try_join_next().is_some() {}
        }
        Ok(())
    }

    /// [`Self::preheat`] under [`PREHEAT_RETRY`]; a bundle given up on is logged and left to be
    /// pulled on demand.
    async fn preheat_with_retries(self: &Arc<Self>, info: &BundleInfo) {
        let what = format!(
            "preheat of bundle {} ({}@{})",
            info.id, info.name, info.version
        );
        // A manifest refused (bad signature) stays refused; anything else may be transient.
        let retryable = |error: &anyhow::Error| {
            !matches!(
                error.downcast_ref::<FetchError>(),
                Some(FetchError::Manifest { .. })
            )
        };
        let preheat = retry(&what, &PREHEAT_RETRY, retryable, |_| self.preheat(info)).await;
        if let Err(error) = preheat {
            tracing::error!(bundle = %info.id, error = format!("{error:#}"), "preheat gave up; edges will pull the bundle on demand");
        }
    }

    async fn answer_blob(
        &self,
        peer: &PeerIdentity,
        hash: BlobHash,
        groups: Vec<(u64, u64)>,
        send: &mut SendStream,
    ) -> Option<Response> {
        self.request_counter("get_blob");
        let ranges = match spans_to_ranges(&groups) {
            Ok(r) => r,
            Err(message) => {
                return Some(Response::Error {
                    code: ErrorCode::BadRequest,
                    message,
                })
            }
        };
        // Only chunks of verified manifests are fetched upstream: an edge cannot make the
        // stager pull arbitrary blobs or trust a size it made up.
        let size = self.known().chunk_sizes.get(&hash).copied();
        // A sibling asks because it takes this stager for the chunk's owner: the chunk comes
        // from upstream, never from another sibling, so two stagers never wait on each other.
        let sibling = peer.role == Role::Stager && peer.site == self.site;
        let progress = match size {
            Some(size) if sibling => match self.flights.join_for_sibling(hash, size) {
                Ok(progress) => progress,
                Err(_busy) => {
                    return Some(Response::Error {
                        code: ErrorCode::Busy,
                        message: format!("chunk {hash} is being fetched from a sibling here"),
                    })
                }
            },
            Some(size) => self.flights.join(hash, size),
            None => None,
        };
        let counters = PeerCounters::new(&self.metrics, peer.role.as_str(), peer.site.as_str());
        let options = ServeOptions {
            progress,
            corrupt: self.corrupt,
            counters: &counters,
            pace: self.pace.as_ref(),
        };
        match serve_blob(&self.store, send, hash, ranges, options).await {
            Ok(served) => {
                tracing::debug!(%peer, blob = %hash, groups = served.groups, complete = served.complete, "served");
            }
            Err(error) => tracing::debug!(%peer, blob = %hash, %error, "blob stream ended early"),
        }
        None
    }

    async fn answer(
        &self,
        peer: &PeerIdentity,
        request: Request,
        send: &mut SendStream,
    ) -> Option<Response> {
        // A stager serves its own site, and data to the stagers below it (a region's stagers
        // serve their sites' stagers): an edge of another site is refused, and so is a stager
        // of another site asking anything but data.
        let data_for_a_stager = peer.role == Role::Stager
            && matches!(
                request,
                Request::ListBundles
                    | Request::Resolve { .. }
                    | Request::GetManifest { .. }
                    | Request::GetBlob { .. }
                    | Request::Subscribe { .. }
            );
        if peer.role != Role::Origin && peer.site != self.site && !data_for_a_stager {
            self.metrics
                .counter(
                    names::FORBIDDEN,
                    "Requests refused for the peer's role",
                    &[],
                )
                .inc();
            return Some(Response::Error {
                code: ErrorCode::Forbidden,
                message: format!(
                    "this stager serves site {}, not a {} of site {}",
                    self.site, peer.role, peer.site
                ),
            });
        }
        if let Err(refusal) = authorize(Role::Stager, peer.role, &request) {
            if refusal.is_forbidden() {
                self.metrics
                    .counter(
                        names::FORBIDDEN,
                        "Requests refused for the peer's role",
                        &[],
                    )
                    .inc();
            }
            return Some(refusal.response());
        }
        Some(match request {
            Request::ListBundles => {
                self.request_counter("list");
                Response::Bundles(self.known().catalog.clone())
            }
            Request::Resolve { name, version } => {
                self.request_counter("resolve");
                let local = {
                    let known = self.known();
                    let named = known.catalog.iter().filter(|b| {
                        b.name == name && version.as_deref().is_none_or(|v| b.version == v)
                    });
                    proto::version::newest_by(named, |b| &b.version).cloned()
                };
                match local {
                    Some(info) => Response::Resolved(info),
                    None => match self.flights.upstreams().data().await {
                        Ok((conn, _)) => {
                            match proto::transfer::fetch::resolve(&conn, &name, version.as_deref())
                                .await
                            {
                                Ok(info) => Response::Resolved(info),
                                Err(error) => error_response(error),
                            }
                        }
                        Err(error) => error_response(FetchError::Net(error)),
                    },
                }
            }
            Request::GetManifest { id } => {
                self.request_counter("manifest");
                match self.manifest(id).await {
                    Ok((signed, _)) => Response::Manifest(signed),
                    Err(error) => error_response(error),
                }
            }
            Request::GetBlob { hash, groups, .. } => {
                return self.answer_blob(peer, hash, groups, send).await;
            }
            Request::Subscribe { after_seq } => {
                self.request_counter("subscribe");
                self.relay_subscription(peer, after_seq, send).await;
                return None;
            }
            Request::SiblingFlights => {
                self.request_counter("sibling_flights");
                self.share_flights(peer, send).await;
                return None;
            }
            Request::SitePeers {
                data_addr,
                p2p_addrs,
                have,
            } => {
                self.request_counter("site_peers");
                Response::SitePeers(self.join_site_peers(peer, data_addr, p2p_addrs, have))
            }
            Request::ReportNode { report, negotiate } => {
                self.request_counter("report_node");
                self.relay_report(peer, report, negotiate).await
            }
            Request::KeepSet => {
                self.request_counter("keep_set");
                self.relay_keep_set(peer).await
            }
            // `authorize` let through a request this match does not answer: they disagree.
            other => Response::Error {
                code: ErrorCode::Internal,
                message: format!("the stager has no answer for {}", other.kind()),
            },
        })
    }
}

impl Stager {
    /// Tells a sibling (a stager of this site: the site was checked) each chunk this stager
    /// starts pulling upstream, until the sibling goes away.
    async fn share_flights(&self, peer: &PeerIdentity, send: &mut SendStream) {
        let mut starts = self.flights.upstream_starts();
        tracing::info!(%peer, "a sibling follows this stager's pulls");
        loop {
            match starts.recv().await {
                Ok(hash) => {
                    if write_frame(send, &Response::FlightStarted { hash })
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::debug!(%peer, missed, "a sibling fell behind this stager's pulls");
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
            }
        }
    }

    /// A sibling started pulling `hash` upstream: copy it as it arrives there, if a manifest
    /// this stager verified names it (a sibling's word never makes it fetch anything else).
    fn copy_from_sibling(self: &Arc<Self>, hash: BlobHash) {
        let size = self.known().chunk_sizes.get(&hash).copied();
        if let Some(size) = size {
            // The flight runs on its own; nobody waits for it here.
            let _ = self.flights.join(hash, size);
        }
    }

    /// Relays the announcements of this stager's upstream to a stager below it, from
    /// `after_seq` on (the origin's sequence numbers, so the stager below can resume from
    /// another upstream). Ends when either side does; the stager below then resubscribes.
    async fn relay_subscription(&self, peer: &PeerIdentity, after_seq: u64, send: &mut SendStream) {
        let upstream = match self.flights.upstreams().data().await {
            Ok((conn, _)) => send_request(&conn, &Request::Subscribe { after_seq }).await,
            Err(error) => Err(error),
        };
        let mut recv = match upstream {
            Ok(recv) => recv,
            Err(error) => {
                tracing::warn!(%peer, %error, "cannot subscribe upstream for a stager below");
                let refusal = Response::Error {
                    code: ErrorCode::Internal,
                    message: format!("this stager cannot subscribe upstream: {error}"),
                };
                let _ = write_frame(send, &refusal).await;
                let _ = send.finish();
                return;
            }
        };
        tracing::info!(%peer, after_seq, "relaying announcements to a stager below");
        loop {
            match read_frame::<Response>(&mut recv, MAX_FRAME_BYTES).await {
                Ok(Some(message)) => {
                    if write_frame(send, &message).await.is_err() {
                        break;
                    }
                }
                Ok(None) => break,
                Err(error) => {
                    tracing::warn!(%peer, %error, "upstream subscription ended");
                    break;
                }
            }
        }
        let _ = send.finish();
    }

    /// Passes an edge's report (and negotiation) on to the origin with the edge's node id from
    /// its certificate; the origin takes the site from this stager's certificate. The
    /// origin's answer goes back as it is.
    async fn relay_report(
        &self,
        peer: &PeerIdentity,
        report: proto::wire::NodeReport,
        negotiate: bool,
    ) -> Response {
        let request = Request::RelayReport {
            node_id: peer.node_id.to_string(),
            report,
            negotiate,
        };
        let answer = match self.flights.upstreams().origin().await {
            Ok(conn) => proto::net::call(&conn, &request, MAX_FRAME_BYTES).await,
            Err(error) => Err(error),
        };
        let outcome = if answer.is_ok() { "relayed" } else { "failed" };
        self.metrics
            .counter(
                "stagecoach_reports_relayed_total",
                "Edge reports passed on to the origin, by outcome",
                &[("outcome", outcome)],
            )
            .inc();
        match answer {
            Ok(response) => {
                tracing::info!(%peer, negotiate, "relayed an edge's report to the origin");
                response
            }
            Err(error) => {
                tracing::warn!(%peer, %error, "cannot relay an edge's report to the origin");
                Response::Error {
                    code: ErrorCode::Internal,
                    message: format!("the stager cannot reach the origin: {error}"),
                }
            }
        }
    }

    /// Asks the origin for an edge's keep-set with the edge's node id from its certificate; the
    /// origin checks the edge is of this stager's site. The answer goes back as it is.
    async fn relay_keep_set(&self, peer: &PeerIdentity) -> Response {
        let request = Request::RelayKeepSet {
            node_id: peer.node_id.to_string(),
        };
        let answer = match self.flights.upstreams().origin().await {
            Ok(conn) => proto::net::call(&conn, &request, MAX_FRAME_BYTES).await,
            Err(error) => Err(error),
        };
        match answer {
            Ok(response) => response,
            Err(error) => {
                tracing::warn!(%peer, %error, "cannot ask the origin for an edge's keep-set");
                Response::Error {
                    code: ErrorCode::Internal,
                    message: format!("the stager cannot reach the origin: {error}"),
                }
            }
        }
    }

    /// Records `peer` (an edge of this site) and returns the other edges.
    fn join_site_peers(
        &self,
        peer: &PeerIdentity,
        data_addr: String,
        p2p_addrs: Vec<String>,
        have: Vec<Holding>,
    ) -> Vec<SitePeer> {
        // Bounded: a misbehaving edge cannot grow the registry without limit.
        let have: Vec<Holding> = have
            .into_iter()
            .take(MAX_HOLDINGS)
            .filter(|h| h.pieces.len() <= MAX_HOLDING_RANGES)
            .collect();
        let node_id = peer.node_id.to_string();
        let mut peers = self.site_peers.lock().unwrap_or_else(|e| e.into_inner());
        if peers.len() < MAX_SITE_PEERS || peers.contains_key(&node_id) {
            peers.insert(
                node_id.clone(),
                SitePeer {
                    node_id: node_id.clone(),
                    data_addr,
                    p2p_addrs: p2p_addrs.into_iter().take(8).collect(),
                    have,
                },
            );
        } else {
            tracing::warn!(%peer, limit = MAX_SITE_PEERS, "site peer list full; not recording");
        }
        peers
            .values()
            .filter(|p| p.node_id != node_id)
            .cloned()
            .collect()
    }
}

fn error_response(error: FetchError) -> Response {
    match error {
        FetchError::Refused { code, message } => Response::Error { code, message },
        other => Response::Error {
            code: ErrorCode::Internal,
            message: other.to_string(),
        },
    }
}

impl RequestHandler for Stager {
    async fn handle(
        self: Arc<Self>,
        peer: PeerIdentity,
        request: Request,
        mut send: SendStream,
        _recv: RecvStream,
    ) {
        if let Some(response) = self.answer(&peer, request, &mut send).await {
            if let Ok(bytes) = write_frame(&mut send, &response).await {
                PeerCounters::new(&self.metrics, peer.role.as_str(), peer.site.as_str())
                    .sent
                    .add(bytes as u64);
                let _ = send.finish();
            }
        }
    }
}

/// What `status.json` holds: what a running stager pulls from where.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct StagerStatus {
    /// The stager's process id.
    pub pid: u32,
    /// When the file was written, in seconds since the Unix epoch.
    pub written_unix_s: f64,
    /// The stager's site.
    pub site: String,
    /// Its mesh address.
    pub listen: String,
    /// The upstreams in order of preference (the origin last), with the one in use.
    pub upstreams: Vec<UpstreamStatus>,
    /// The failovers since it started (the latest [`crate::upstream::MAX_FAILOVER_EVENTS`]).
    pub failovers: Vec<FailoverEvent>,
    /// The other stagers of the site.
    pub siblings: Vec<SiblingStatus>,
    /// Bytes received from upstream (stagers and the origin): what crossed the WAN.
    pub pulled_bytes: u64,
    /// Bytes received from siblings.
    pub from_siblings_bytes: u64,
    /// Bytes served to siblings.
    pub served_siblings_bytes: u64,
    /// Bytes served to the site's edges.
    pub served_edges_bytes: u64,
    /// Bytes served to stagers of other sites (as their upstream).
    pub served_stagers_below_bytes: u64,
}

impl Stager {
    async fn status(&self, listen: SocketAddr) -> StagerStatus {
        let (upstreams, failovers) = self.flights.upstreams().status().await;
        let siblings = self.flights.siblings();
        let to_stagers =
            self.metrics
                .total_where(names::BYTES_SENT, "peer_role", Role::Stager.as_str());
        let served_siblings_bytes = siblings.counters().sent.get();
        StagerStatus {
            pid: std::process::id(),
            written_unix_s: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
            site: self.site.to_string(),
            listen: listen.to_string(),
            upstreams,
            failovers,
            siblings: siblings.status(),
            pulled_bytes: self.flights.upstreams().pulled_bytes(),
            from_siblings_bytes: siblings.counters().received.get(),
            served_siblings_bytes,
            served_edges_bytes: self.metrics.total_where(
                names::BYTES_SENT,
                "peer_role",
                Role::Edge.as_str(),
            ),
            served_stagers_below_bytes: to_stagers.saturating_sub(served_siblings_bytes),
        }
    }

    /// Rewrites `status.json` every [`STATUS_INTERVAL`] when something in it changed.
    async fn write_status(self: Arc<Self>, path: PathBuf, listen: SocketAddr) {
        let mut every = tokio::time::interval(STATUS_INTERVAL);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last = String::new();
        loop {
            every.tick().await;
            let mut status = self.status(listen).await;
            let written = status.written_unix_s;
            status.written_unix_s = 0.0;
            let unchanged = serde_json::to_string(&status).unwrap_or_default();
            if unchanged == last {
                continue;
            }
            status.written_unix_s = written;
            if let Err(error) = durable::write_json_atomic(&path, &status, durable::MODE_READABLE) {
                tracing::warn!(path = %path.display(), %error, "cannot write the status file");
                continue;
            }
            last = unchanged;
        }
    }
}

/// `stager status`: what the stager whose state directory is `dir` reports in its status file,
/// as text.
pub fn render_status(dir: &Path) -> Result<String> {
    use std::fmt::Write as _;
    let path = dir.join(STATUS_FILE);
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "cannot read {}: is a stager running with --dir {}?",
            path.display(),
            dir.display()
        )
    })?;
    let status: StagerStatus = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a stager status file", path.display()))?;
    let running = Path::new(&format!("/proc/{}", status.pid)).exists();
    let mib = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "stager of site {} at {} (pid {}{})",
        status.site,
        status.listen,
        status.pid,
        if running {
            ""
        } else {
            ", NOT RUNNING: figures as it last wrote them"
        }
    );
    let _ = writeln!(out, "upstreams, in order of preference:");
    for upstream in &status.upstreams {
        let _ = writeln!(
            out,
            "  {:<22} {:<7} {:<9} pulled {:>10.1} MiB",
            upstream.addr,
            match upstream.kind {
                crate::upstream::UpstreamKind::Stager => "stager",
                crate::upstream::UpstreamKind::Origin => "origin",
            },
            upstream.state,
            mib(upstream.pulled_bytes)
        );
    }
    if status.siblings.is_empty() {
        let _ = writeln!(out, "siblings: none");
    } else {
        let _ = writeln!(out, "siblings (the site's other stagers):");
        for sibling in &status.siblings {
            let _ = writeln!(
                out,
                "  {:<22} {:<7} {}",
                sibling.addr,
                sibling.state,
                sibling.node_id.as_deref().unwrap_or("(not connected yet)")
            );
        }
    }
    let _ = writeln!(
        out,
        "pulled over the WAN {:.1} MiB; from siblings {:.1} MiB; served to siblings {:.1} MiB, to edges {:.1} MiB, to stagers below {:.1} MiB",
        mib(status.pulled_bytes),
        mib(status.from_siblings_bytes),
        mib(status.served_siblings_bytes),
        mib(status.served_edges_bytes),
        mib(status.served_stagers_below_bytes)
    );
    if status.failovers.is_empty() {
        let _ = writeln!(out, "failovers: none");
    } else {
        let _ = writeln!(out, "failovers:");
        for event in &status.failovers {
            let _ = writeln!(
                out,
                "  at {:.1}: {} -> {} ({}{}{})",
                event.at_unix_s,
                event.from.as_deref().unwrap_or("-"),
                event.to,
                event.reason,
                if event.detail.is_empty() { "" } else { ": " },
                event.detail
            );
        }
    }
    Ok(out)
}

fn read_seq(path: &Path) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// Which announcements are done (preheated or given up on), so the saved sequence number never
/// passes one still being preheated: a restart resubscribes from the first unfinished one.
#[derive(Debug)]
struct SeqProgress {
    running: std::collections::BTreeSet<u64>,
    highest_started: u64,
    saved: u64,
}

impl SeqProgress {
    fn after(saved: u64) -> Self {
        Self {
            running: std::collections::BTreeSet::new(),
            highest_started: saved,
            saved,
        }
    }

    fn started(&mut self, seq: u64) {
        self.running.insert(seq);
        self.highest_started = self.highest_started.max(seq);
    }

    /// Marks `seq` done; the sequence number to save when it moved forward.
    fn finished(&mut self, seq: u64) -> Option<u64> {
        self.running.remove(&seq);
        let done_through = match self.running.first() {
            Some(&first) => first.saturating_sub(1),
            None => self.highest_started,
        };
        (done_through > self.saved).then(|| {
            self.saved = done_through;
            done_through
        })
    }
}

fn write_seq(path: &Path, seq: u64) -> Result<()> {
    durable::write_atomic(path, seq.to_string().as_bytes(), durable::MODE_READABLE)?;
    Ok(())
}

/// Runs `stager serve` until Ctrl-C or SIGTERM.
pub async fn serve(config: StagerConfig) -> Result<()> {
    let identity = NodeIdentity::load(&identity_dir(&config.dir))?;
    if identity.role() != Role::Stager {
        bail!(
            "{} holds a {} identity, not a stager's",
            config.dir.display(),
            identity.role()
        );
    }
    if let Some(site) = &config.site {
        if site != identity.site().as_str() {
            bail!(
                "--site {site} does not match the certificate's site {}; enroll with a token for {site}",
                identity.site()
            );
        }
    }
    let origin = match config.origin {
        Some(addr) => addr,
        None => identity.origin_addr().parse().with_context(|| {
            format!(
                "bad origin address {:?} from enrollment; pass --origin",
                identity.origin_addr()
            )
        })?,
    };
    let store = Store::open(
        config.dir.join("store"),
        StoreOptions {
            cache_limit_bytes: config.cache_limit_bytes,
            ..StoreOptions::default()
        },
    )
    .context("cannot open the stager's store")?;
    let metrics = Metrics::new();
    let retention = Retention::with_metrics(
        store.clone(),
        vec![*identity.publisher_key()],
        metrics.clone(),
    );
    tracing::info!(
        limit_bytes = config.cache_limit_bytes,
        stored_bytes = store.usage().stored_bytes(),
        "store open"
    );
    let endpoint =
        server_endpoint(config.listen, &identity).context("cannot start the mesh endpoint")?;
    let listen = endpoint.local_addr()?;
    let watched = proto::net::watched_client_config(&identity)?;
    let upstreams = Upstreams::new(
        endpoint.clone(),
        watched.clone(),
        &config.upstreams,
        &origins_in_order(origin, &config.more_origins, &identity),
        metrics.clone(),
    );
    let siblings = Siblings::new(
        identity.node_id().to_string(),
        identity.site().to_string(),
        endpoint.clone(),
        watched,
        &config.siblings,
        metrics.clone(),
    );
    let flights = Flights::new(upstreams, siblings.clone(), store.clone());
    let stager = Arc::new(Stager {
        site: identity.site().clone(),
        store,
        retention,
        trusted: [*identity.publisher_key()],
        flights,
        known: Mutex::new(Known {
            manifests: HashMap::new(),
            chunk_sizes: HashMap::new(),
            catalog: Vec::new(),
        }),
        metrics: metrics.clone(),
        seq_file: config.dir.join("last_seq"),
        corrupt: config.test_corrupt_serving,
        pace: config
            .upload_limit_bits_per_s
            .map(RateLimit::from_bits_per_s),
        site_peers: Mutex::new(BTreeMap::new()),
    });
    if config.test_corrupt_serving {
        tracing::warn!("TEST HOOK: every blob part served will be corrupted");
    }
    let metrics_addr = proto::metrics::serve(config.metrics_listen, metrics.clone()).await?;
    proto::metrics::spawn_log_summary(metrics.clone(), METRICS_LOG_INTERVAL, "stager");
    // Logged before any task starts, so every line of this run comes after it (tests read the
    // log from the last such line on).
    tracing::info!(site = %stager.site, %listen, metrics = %metrics_addr, %origin, more_origins = ?config.more_origins, upstreams = ?config.upstreams, siblings = ?config.siblings, "stager serving");
    tokio::spawn(server::run(endpoint.clone(), stager.clone(), metrics));
    tokio::spawn(stager.clone().follow());
    tokio::spawn(stager.clone().keep_fresh());
    tokio::spawn(stager.clone().report_stats());
    let advertised = config
        .advertise
        .unwrap_or_else(|| proto::net::advertised(listen));
    if advertised.ip().is_loopback() && !origin.ip().is_loopback() {
        tracing::warn!(%advertised, "this stager tells the origin a loopback address, which edges on other machines cannot reach: pass --advertise HOST:PORT");
    }
    tokio::spawn(stager.clone().advertise(advertised));
    let weak = Arc::downgrade(&stager);
    siblings.on_flight(Arc::new(move |hash| {
        if let Some(stager) = weak.upgrade() {
            stager.copy_from_sibling(hash);
        }
    }));
    tokio::spawn(siblings.maintain());
    tokio::spawn(
        stager
            .clone()
            .write_status(config.dir.join(STATUS_FILE), listen),
    );
    if let Some(path) = &config.ready_file {
        let ready = serde_json::json!({
            "mesh": listen.to_string(),
            "metrics": metrics_addr.to_string(),
        });
        durable::write_json_atomic(path, &ready, durable::MODE_READABLE)?;
    }
    server::shutdown_signal().await;
    endpoint.close(0u32.into(), b"stager stopping");
    Ok(())
}

/// The origins a stager turns to, in order: `origin`, the `--also-origin`s, then the other
/// origins up when it enrolled (from its identity), each once.
fn origins_in_order(
    origin: SocketAddr,
    more: &[SocketAddr],
    identity: &proto::net::NodeIdentity,
) -> Vec<SocketAddr> {
    let mut all = vec![origin];
    let enrolled = identity
        .origin_addrs()
        .into_iter()
        .filter_map(|addr| addr.parse::<SocketAddr>().ok());
    for addr in more.iter().copied().chain(enrolled) {
        if !all.contains(&addr) {
            all.push(addr);
        }
    }
    all
}

#[cfg(test)]
mod tests {
    use super::SeqProgress;

    #[test]
    fn the_saved_sequence_never_passes_an_unfinished_preheat() {
        let mut progress = SeqProgress::after(10);
        for seq in [11, 12, 13] {
            progress.started(seq);
        }
        // 12 and 13 finish first: 11 still runs, so a restart must announce it again.
        assert_eq!(progress.finished(12), None);
        assert_eq!(progress.finished(13), None);
        assert_eq!(progress.finished(11), Some(13));
        progress.started(14);
        progress.started(15);
        assert_eq!(progress.finished(14), Some(14));
        assert_eq!(progress.finished(15), Some(15));
        // A sequence number at or below the saved one changes nothing.
        progress.started(9);
        assert_eq!(progress.finished(9), None);
    }
}
