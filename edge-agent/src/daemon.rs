//! `edge-agent serve`: the edge's daemon. It keeps the node's store open, serves what it holds
//! to the peers of its site (complete chunks, or the verified groups of chunks still arriving),
//! fetches bundles when its own node or the origin asks (from stagers and peers at once), and
//! runs an OS swap when the origin asks. At every start it purges the test-mode area and
//! negotiates with the origin what to boot ([`crate::negotiate`]); a test run the origin asks
//! for lives in that area only.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use proto::manifest::BundleId;
use proto::metrics::Metrics;
use proto::net::{server_endpoint, write_frame, NodeIdentity, PeerIdentity, Role};
use proto::retention::Retention;
use proto::retry::{retry, RetryPolicy};
use proto::transfer::pace::RateLimit;
use proto::transfer::serve::{serve_blob, spans_to_ranges, ServeOptions};
use proto::transfer::server::{self, RequestHandler};
use proto::transfer::{names, PeerCounters};
use proto::wire::{
    authorize, ErrorCode, FetchSummary, NegotiationOutcome, Request, Response, SitePeer,
    TestRunSummary,
};
use quinn::{RecvStream, SendStream};
use tokio::sync::Semaphore;

use crate::fetch::{BundleSpec, Node};
use crate::negotiate::{self, BundleFetcher};
use crate::peers::download::held_ranges;
use crate::peers::{self, Announcer, P2pConfig, PeerBoard, Silent};
use crate::remote_swap::{self, RemoteSwapConfig};
use crate::state::{self, DaemonReady, NodeConfig, DAEMON_FILE};

/// Default cap on uploads to peers served at once.
pub const DEFAULT_MAX_UPLOADS: usize = 8;

/// Least time between two progress frames of one `Fetch` answer.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(250);

/// Start-up negotiations tried before giving up until the next start, with waits of up to 1 s,
/// doubling, and at most 60 s.
const NEGOTIATION_RETRY: RetryPolicy = RetryPolicy {
    max_attempts: 12,
    max_elapsed: None,
    base_delay: Duration::from_secs(1),
    max_delay: Duration::from_secs(60),
};

/// How often the daemon asks for this node's keep-set (also after every negotiation).
pub const KEEP_SET_REFRESH_INTERVAL: Duration = Duration::from_secs(30);

/// Counter of the bytes received for bundles the daemon fetched: a swap or negotiation of a
/// bundle prepared ahead adds 0.
pub const FETCH_BYTES: &str = "stagecoach_fetch_bytes_total";

/// Counter of the fetches the daemon finished, labelled `held="whole"` when the store held
/// every chunk already (no byte received) and `held="partly"` otherwise.
pub const FETCHES: &str = "stagecoach_fetches_total";

/// Default `--cache-gib` of `edge-agent serve`: the bound on the edge's store, in GiB.
pub const DEFAULT_CACHE_GIB: &str = "10";

/// How `edge-agent serve` runs.
#[derive(Clone, Debug)]
pub struct DaemonConfig {
    /// The edge's state directory.
    pub dir: PathBuf,
    /// The site's stagers.
    pub stagers: Vec<SocketAddr>,
    /// Address to serve peers on.
    pub listen: SocketAddr,
    /// Prometheus metrics address.
    pub metrics_listen: SocketAddr,
    /// Fetch from peers of the site too (and serve them).
    pub peers: bool,
    /// Upload limit to peers, in bits per second.
    pub upload_limit_bits_per_s: Option<u64>,
    /// Uploads served at once; more wait their turn.
    pub max_uploads: usize,
    /// Test hook: corrupt every blob part served to peers. The binary's switch for it,
    /// `--test-corrupt-serving`, exists only in a build with the `test-hooks` feature.
    pub test_corrupt_serving: bool,
    /// The machine the origin may ask this daemon to swap; `None` refuses swaps.
    pub swap: Option<RemoteSwapConfig>,
    /// The address the origin and peers reach the mesh endpoint at, when it is not the bound
    /// one (behind NAT or port forwarding); default: the bound address, loopback for an
    /// unspecified one.
    pub advertise: Option<SocketAddr>,
    /// The role, class and features reported with the inventory.
    pub configured: NodeConfig,
    /// Capture an image when the origin has none and allows it (brief 004); `None` never does.
    pub capture: Option<crate::capture::CaptureSetup>,
    /// Bound on the store, in bytes (`--cache-gib`).
    pub cache_limit_bytes: u64,
    /// How often to ask the origin for this node's content keys (also asked at start).
    pub keys_refresh: Duration,
}

/// The running daemon.
pub struct Daemon {
    node: Node,
    site: String,
    peers_enabled: bool,
    board: Arc<Mutex<PeerBoard>>,
    announcer: Arc<dyn Announcer>,
    pace: Option<RateLimit>,
    uploads: Semaphore,
    corrupt: bool,
    metrics: Arc<Metrics>,
    /// Bundles being fetched, so two asks for one bundle share a download.
    fetching: tokio::sync::Mutex<()>,
    /// The machine to swap when the origin asks.
    swap: Option<RemoteSwapConfig>,
    /// Held while a swap runs: one at a time.
    swapping: Arc<tokio::sync::Mutex<()>>,
    /// The site's stagers (the first is the default health check's target).
    stagers: Vec<SocketAddr>,
    /// The address peers reach this daemon at.
    advertised: String,
    /// The edge's state directory.
    dir: PathBuf,
    /// What the operator configured (reported with the inventory).
    configured: NodeConfig,
    /// One negotiation at a time.
    negotiating: tokio::sync::Mutex<()>,
    /// The test-mode store (under the purged temporary area), once a test run opened it.
    test_store: tokio::sync::Mutex<Option<proto::store::Store>>,
    /// How to capture an image when the origin has none (brief 004).
    capture: Option<crate::capture::CaptureSetup>,
    /// Which bundles the store keeps: this node's keep-set, its installed bundles, what it
    /// fetches and swaps.
    retention: Retention,
}

impl Daemon {
    fn count_request(&self, kind: &'static str) {
        self.metrics
            .counter(names::REQUESTS, "Requests served", &[("kind", kind)])
            .inc();
    }

    fn forbidden(&self, peer: &PeerIdentity, what: &str) -> Response {
        self.count_forbidden();
        tracing::warn!(%peer, what, "refused");
        Response::Error {
            code: ErrorCode::Forbidden,
            message: format!("a {} of site {} may not {what}", peer.role, peer.site),
        }
    }

    fn count_forbidden(&self) {
        self.metrics
            .counter(
                names::FORBIDDEN,
                "Requests refused for the peer's role",
                &[],
            )
            .inc();
    }

    /// An edge (the only role the table lets ask for blobs, manifests and peers) of this site.
    fn is_site_peer(&self, peer: &PeerIdentity) -> bool {
        peer.role == Role::Edge && peer.site.as_str() == self.site
    }

    /// The origin, or this node itself (the table lets only those two roles ask for a fetch).
    fn is_self_or_origin(&self, peer: &PeerIdentity) -> bool {
        peer.role == Role::Origin || peer.node_id == self.node.identity.node_id()
    }

    async fn serve_peer_blob(
        &self,
        peer: &PeerIdentity,
        hash: proto::BlobHash,
        groups: &[(u64, u64)],
        send: &mut SendStream,
    ) -> Option<Response> {
        self.count_request("get_blob");
        let ranges = match spans_to_ranges(groups) {
            Ok(ranges) => ranges,
            Err(message) => {
                return Some(Response::Error {
                    code: ErrorCode::BadRequest,
                    message,
                })
            }
        };
        let Ok(_permit) = self.uploads.try_acquire() else {
            self.metrics
                .counter(
                    "stagecoach_uploads_refused_busy_total",
                    "Peer requests refused because every upload slot was taken",
                    &[],
                )
                .inc();
            return Some(Response::Error {
                code: ErrorCode::Busy,
                message: "every upload slot is taken; ask another source".into(),
            });
        };
        let counters = PeerCounters::new(&self.metrics, peer.role.as_str(), peer.site.as_str());
        let options = ServeOptions {
            progress: None,
            corrupt: self.corrupt,
            counters: &counters,
            pace: self.pace.as_ref(),
        };
        if let Err(error) = serve_blob(&self.node.store, send, hash, ranges, options).await {
            tracing::debug!(%peer, blob = %hash, %error, "peer stream ended early");
        }
        None
    }

    /// Fetches `bundle`, streaming progress frames on `send` (when given); returns the final
    /// answer.
    async fn fetch(&self, bundle: &str, mut send: Option<&mut SendStream>) -> Response {
        self.count_request("fetch");
        let spec: BundleSpec = match bundle.parse() {
            Ok(spec) => spec,
            Err(error) => {
                return Response::Error {
                    code: ErrorCode::BadRequest,
                    message: error.to_string(),
                }
            }
        };
        let _one_at_a_time = self.fetching.lock().await;
        // Peers announce by bundle id: resolve first, then listen for that id.
        let (signed, manifest) = match self.node.manifest(&spec).await {
            Ok(found) => found,
            Err(error) => {
                return Response::Error {
                    code: ErrorCode::NotFound,
                    message: format!("{error:#}"),
                }
            }
        };
        let id = signed.id();
        // Pinned before its chunks arrive: the store's limit never evicts a fetch under itself.
        let hold = match tokio::task::block_in_place(|| self.retention.hold(id, &manifest)) {
            Ok(hold) => hold,
            Err(error) => {
                return Response::Error {
                    code: ErrorCode::Internal,
                    message: format!("cannot pin bundle {id} in the store: {error}"),
                }
            }
        };
        let id_text = id.to_string();
        let total_bytes = manifest.total_stored_bytes;
        let peers = self.peers_enabled.then(|| {
            self.board
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .subscribe(&id_text)
        });
        let (progress_tx, mut progress_rx) = tokio::sync::watch::channel(0u64);
        let announcer = self.announcer.clone();
        let peers_enabled = self.peers_enabled;
        let by_id = BundleSpec::Id(id);
        let fetch = self.node.fetch(
            &by_id,
            peers,
            |_| {},
            |_, held, done| {
                let _ = progress_tx.send(done);
                if peers_enabled {
                    announcer.announce(&id_text, held_ranges(held), held.iter().all(|h| *h));
                }
            },
        );
        tokio::pin!(fetch);
        let mut last = tokio::time::Instant::now();
        let report = loop {
            tokio::select! {
                report = &mut fetch => break report,
                changed = progress_rx.changed() => {
                    if changed.is_err() { continue; }
                    if last.elapsed() >= PROGRESS_INTERVAL {
                        last = tokio::time::Instant::now();
                        let done_bytes = *progress_rx.borrow();
                        if let Some(send) = send.as_deref_mut() {
                            let _ = write_frame(send, &Response::FetchProgress { done_bytes, total_bytes }).await;
                        }
                    }
                }
            }
        };
        drop(hold);
        if let Ok(report) = &report {
            self.retention.fetched(report.id);
        }
        // A completed fetch may have pushed the store over its limit: collect.
        self.collect_garbage();
        match report {
            Ok(report) => {
                if peers_enabled {
                    let pieces = crate::peers::download::pieces_of(&report.manifest).len() as u32;
                    self.announcer
                        .announce(&report.id.to_string(), vec![(0, pieces)], true);
                }
                self.count_fetched(report.bytes_received, report.bytes_from_peers);
                tracing::info!(bundle = %report.id, name = %report.manifest.name, version = %report.manifest.version, bytes = report.bytes_received, from_peers = report.bytes_from_peers, "fetched");
                Response::Fetched(report.summary())
            }
            Err(error) => Response::Error {
                code: ErrorCode::Internal,
                message: format!("{error:#}"),
            },
        }
    }

    /// Counts a finished fetch: the bytes it received (0 for a bundle already held: prepared,
    /// say), and whether it needed any.
    fn count_fetched(&self, bytes_received: u64, bytes_from_peers: u64) {
        self.metrics
            .counter(
                FETCH_BYTES,
                "Bytes received for bundles this daemon fetched (swaps, negotiations, prepares, fetch commands)",
                &[],
            )
            .add(bytes_received);
        self.metrics
            .counter(
                "stagecoach_fetch_bytes_from_peers_total",
                "Of the fetched bytes, those received from peers of the site",
                &[],
            )
            .add(bytes_from_peers);
        self.metrics
            .counter(
                FETCHES,
                "Bundle fetches this daemon finished, by whether the store already held the bundle whole",
                &[("held", if bytes_received == 0 { "whole" } else { "partly" })],
            )
            .inc();
    }

    async fn answer(
        &self,
        peer: &PeerIdentity,
        request: Request,
        send: &mut SendStream,
    ) -> Option<Response> {
        if let Err(refusal) = authorize(Role::Edge, peer.role, &request) {
            if refusal.is_forbidden() {
                self.count_forbidden();
                tracing::warn!(%peer, request = %refusal.request, "refused: role may not do this");
            }
            return Some(refusal.response());
        }
        // The table checked roles; what needs more of the certificate (site, node id) is here.
        Some(match request {
            Request::GetBlob { hash, groups, .. } => {
                if !self.is_site_peer(peer) {
                    return Some(self.forbidden(peer, "fetch blobs from an edge of another site"));
                }
                return self.serve_peer_blob(peer, hash, &groups, send).await;
            }
            Request::GetManifest { id } => {
                self.count_request("manifest");
                if !self.is_site_peer(peer) {
                    return Some(
                        self.forbidden(peer, "fetch manifests from an edge of another site"),
                    );
                }
                match self.node.store.get_manifest(&id) {
                    Ok(Some(signed)) => Response::Manifest(signed),
                    Ok(None) => Response::Error {
                        code: ErrorCode::NotFound,
                        message: format!("no bundle {id} here"),
                    },
                    Err(error) => Response::Error {
                        code: ErrorCode::Internal,
                        message: error.to_string(),
                    },
                }
            }
            Request::SitePeers { .. } => {
                // A peer that found this edge without the stager's tracker (mDNS, say) asks
                // what it holds; the answer is this edge alone.
                self.count_request("site_peers");
                if !self.is_site_peer(peer) {
                    return Some(self.forbidden(peer, "list an edge of another site"));
                }
                Response::SitePeers(vec![SitePeer {
                    node_id: self.node.identity.node_id().to_string(),
                    data_addr: self.advertised.clone(),
                    p2p_addrs: Vec::new(),
                    have: self.announcer.holdings(),
                }])
            }
            Request::Fetch { bundle } => {
                if !self.is_self_or_origin(peer) {
                    return Some(self.forbidden(peer, "ask this edge to fetch"));
                }
                self.fetch(&bundle, Some(send)).await
            }
            Request::TestRun { bundle } => self.test_run(bundle, send).await,
            Request::Negotiate => {
                if peer.node_id != self.node.identity.node_id() {
                    return Some(self.forbidden(peer, "make this edge negotiate"));
                }
                match self.negotiate_now().await {
                    Ok(outcome) => Response::Negotiated(outcome),
                    Err(error) => Response::Error {
                        code: ErrorCode::Internal,
                        message: format!("{error:#}"),
                    },
                }
            }
            Request::StartSwap { target, rescue } => self.start_swap(target, rescue, send).await,
            Request::SwapStatus { target } => self.swap_status(target).await,
            // `authorize` let through a request this match does not answer: they disagree.
            other => Response::Error {
                code: ErrorCode::Internal,
                message: format!("the edge agent has no answer for {}", other.kind()),
            },
        })
    }

    /// A swap's two bundles stay kept while it runs (whatever the keep-set says meanwhile).
    async fn start_swap(
        &self,
        target: BundleId,
        rescue: BundleId,
        send: &mut SendStream,
    ) -> Response {
        let answer = self.run_swap(target, rescue, send).await;
        // The swap's bundles are no longer needed for it: the keep-set decides again.
        self.collect_garbage();
        answer
    }

    /// This edge's content keys, refreshed from the origin once when a bundle is sealed with
    /// a generation they lack.
    async fn ring_for(
        &self,
        generation: Option<proto::keys::KeyGeneration>,
    ) -> Result<proto::keys::KeyRing> {
        crate::keys::ring_for(
            &self.node.endpoint,
            &self.node.identity,
            &self.dir,
            generation,
        )
        .await
    }

    /// The content keys to open the stored bundles `ids` with (see [`Self::ring_for`]).
    async fn ring_for_bundles(&self, ids: &[BundleId]) -> Result<proto::keys::KeyRing> {
        let trusted = [*self.node.identity.publisher_key()];
        let mut ring = crate::keys::load(&self.dir)?;
        for id in ids {
            let Some(signed) = self.node.store.get_manifest(id)? else {
                continue;
            };
            let generation = signed.verify(&trusted)?.layout.sealed_generation();
            ring = self.ring_for(generation).await?;
        }
        Ok(ring)
    }

    /// Fetches both bundles (with progress frames), then swaps the machine and answers how it
    /// ended. One swap at a time; a second ask while one runs is refused as busy.
    async fn run_swap(
        &self,
        target: BundleId,
        rescue: BundleId,
        send: &mut SendStream,
    ) -> Response {
        self.count_request("swap");
        let Some(config) = self.swap.clone() else {
            return Response::Error {
                code: ErrorCode::BadRequest,
                message: format!(
                    "this edge has no machine configured for swaps (target {target}, rescue {rescue}); start its daemon with --machine-root or --linux-config"
                ),
            };
        };
        // Owned, and moved into the swap's thread below: a handler dropped mid-swap (its origin
        // went away) must not let a second swap start while the first still runs.
        let Ok(one_at_a_time) = self.swapping.clone().try_lock_owned() else {
            return Response::Error {
                code: ErrorCode::Busy,
                message: "a swap is already running on this edge".into(),
            };
        };
        tracing::info!(%target, %rescue, "swap asked; fetching the bundles");
        self.retention.set_local(SWAP_KEEP_REASON, [target, rescue]);
        let _kept = KeptForSwap(&self.retention);
        for (what, id) in [("rescue", rescue), ("target", target)] {
            match self.fetch(&id.to_string(), Some(send)).await {
                fetched @ Response::Fetched(_) => {
                    // Tells the origin this bundle is here; a lost frame changes nothing.
                    let _ = write_frame(send, &fetched).await;
                }
                Response::Error { code, message } => {
                    return Response::Error {
                        code,
                        message: format!("cannot fetch the {what} bundle {id}: {message}"),
                    }
                }
                other => {
                    return Response::Error {
                        code: ErrorCode::Internal,
                        message: format!("fetching the {what} bundle ended oddly: {other:?}"),
                    }
                }
            }
        }
        let store = self.node.store.clone();
        let publisher = *self.node.identity.publisher_key();
        let stagers = self.stagers.clone();
        let keys = match self.ring_for_bundles(&[rescue, target]).await {
            Ok(keys) => keys,
            Err(error) => {
                return Response::Error {
                    code: ErrorCode::Internal,
                    message: format!("cannot read this edge's content keys: {error:#}"),
                }
            }
        };
        let machine = config.machine.clone();
        let outcome = tokio::task::spawn_blocking(move || {
            let _one_at_a_time = one_at_a_time;
            remote_swap::run(&config, &store, &publisher, &keys, &stagers, target, rescue)
        })
        .await;
        let counter = |outcome: &str| {
            self.metrics
                .counter(
                    "stagecoach_swaps_total",
                    "OS swaps the origin started here, by how they ended",
                    &[("outcome", outcome)],
                )
                .inc();
        };
        match outcome {
            Ok(Ok(remote_swap::SwapProgress::Ended(end))) => {
                if let Err(error) = remote_swap::record_running_os(&self.dir, &machine) {
                    tracing::warn!(
                        error = format!("{error:#}"),
                        "cannot record the OS the machine runs"
                    );
                }
                counter(if end.failure.is_none() {
                    "done"
                } else {
                    "failed"
                });
                match &end.failure {
                    None => tracing::info!(%target, boots = end.boots, "swap done"),
                    Some(why) => {
                        tracing::warn!(%target, outcome = %end.outcome, why, "swap did not end on the new OS")
                    }
                }
                Response::Swapped {
                    outcome: end.outcome,
                    failure: end.failure,
                }
            }
            Ok(Ok(remote_swap::SwapProgress::Rebooting { step })) => {
                counter("rebooting");
                tracing::info!(%target, %step, "swap goes on after this machine's reboot");
                Response::SwapPending { step }
            }
            Ok(Err(error)) => {
                counter("error");
                tracing::error!(%target, error = format!("{error:#}"), "swap failed to run");
                Response::Error {
                    code: ErrorCode::Internal,
                    message: format!("{error:#}"),
                }
            }
            Err(join) => {
                counter("error");
                Response::Error {
                    code: ErrorCode::Internal,
                    message: format!("the swap task failed: {join}"),
                }
            }
        }
    }

    /// How the machine's last swap to `target` stands, from its journal.
    async fn swap_status(&self, target: BundleId) -> Response {
        self.count_request("swap-status");
        let Some(config) = self.swap.clone() else {
            return Response::Error {
                code: ErrorCode::NotFound,
                message: "this edge has no machine configured for swaps".into(),
            };
        };
        let answer = tokio::task::spawn_blocking(move || {
            remote_swap::journal_answer(&config.machine, target)
        })
        .await;
        match answer {
            Ok(Ok(remote_swap::JournalAnswer::Ended(end))) => Response::Swapped {
                outcome: end.outcome,
                failure: end.failure,
            },
            Ok(Ok(remote_swap::JournalAnswer::Running { step })) => Response::SwapPending { step },
            Ok(Err(error)) => Response::Error {
                code: ErrorCode::NotFound,
                message: format!("{error:#}"),
            },
            Err(join) => Response::Error {
                code: ErrorCode::Internal,
                message: format!("the status task failed: {join}"),
            },
        }
    }
}

/// Reason under which a running swap's bundles are kept.
const SWAP_KEEP_REASON: &str = "swap";

/// Reason under which the bundles of `installed.json` are kept.
const INSTALLED_KEEP_REASON: &str = "installed";

/// Drops a swap's bundles from the node's own needs on every exit path of the swap.
struct KeptForSwap<'a>(&'a Retention);

impl Drop for KeptForSwap<'_> {
    fn drop(&mut self) {
        self.0.set_local(SWAP_KEEP_REASON, []);
    }
}

/// The daemon's fetches (stagers and peers at once) for a negotiation.
struct DaemonFetcher<'a>(&'a Daemon);

impl BundleFetcher for DaemonFetcher<'_> {
    async fn fetch_bundle(&self, id: BundleId) -> Result<FetchSummary> {
        match self.0.fetch(&id.to_string(), None).await {
            Response::Fetched(summary) => Ok(summary),
            Response::Error { code, message } => {
                Err(anyhow::anyhow!("cannot fetch {id} ({code:?}): {message}"))
            }
            other => Err(anyhow::anyhow!("fetching {id} ended oddly: {other:?}")),
        }
    }
}

impl Daemon {
    /// Captures an image published as `name` (the origin allowed it: brief 004), then
    /// negotiates again, which now names the captured image.
    pub async fn capture_then_negotiate(&self, name: &str) -> Result<NegotiationOutcome> {
        let Some(setup) = &self.capture else {
            anyhow::bail!("this daemon was started without --capture-script; it does not capture");
        };
        let captured =
            crate::capture::capture(&self.node.identity, &self.configured, &setup.options(name))
                .await;
        let answer = if captured.is_ok() {
            "captured"
        } else {
            "failed"
        };
        self.metrics
            .counter(
                "stagecoach_captures_total",
                "Images captured and published when the origin had none, by outcome",
                &[("outcome", answer)],
            )
            .inc();
        let captured = captured?;
        tracing::info!(bundle = %captured.info.id, name = %captured.info.name, version = %captured.info.version, slot = %captured.slot, "captured; negotiating again");
        self.negotiate_now().await
    }

    /// Negotiates with the origin (through the site's stagers) and fetches what differs; one
    /// at a time. Counted in `stagecoach_negotiations_total` by answer.
    pub async fn negotiate_now(&self) -> Result<NegotiationOutcome> {
        let _one_at_a_time = self.negotiating.lock().await;
        self.count_request("negotiate");
        let result = negotiate::negotiate(
            &self.node,
            &self.dir,
            &self.configured,
            &self.advertised,
            &DaemonFetcher(self),
        )
        .await;
        let answer = match &result {
            Ok(outcome) => match &outcome.plan {
                proto::wire::BootPlan::BootAsYouAre { .. } => "boot-as-you-are",
                proto::wire::BootPlan::Fetch { .. } => "fetched",
                proto::wire::BootPlan::NoImage { .. } => "no-image",
                proto::wire::BootPlan::PolicyError { .. } => "policy-error",
                proto::wire::BootPlan::NoImageCapture { .. } => "no-image-capture",
            },
            Err(_) => "error",
        };
        self.metrics
            .counter(
                "stagecoach_negotiations_total",
                "Boot negotiations with the origin, by answer",
                &[("answer", answer)],
            )
            .inc();
        if let Ok(outcome) = &result {
            let bytes: u64 = outcome.fetched.iter().map(|f| f.bytes_received).sum();
            self.metrics
                .counter(
                    "stagecoach_negotiation_bytes_total",
                    "Bytes received for bundles a negotiation asked for",
                    &[],
                )
                .add(bytes);
            self.metrics
                .counter(
                    "stagecoach_negotiation_bundles_fetched_total",
                    "Bundles fetched because a negotiation asked for them",
                    &[],
                )
                .add(outcome.fetched.len() as u64);
        }
        // The origin now knows what this node runs and should run: its keep-set moved.
        self.refresh_keep_set().await;
        result
    }

    /// Fetches `id` into the test-mode store (under the temporary area every start purges),
    /// unpacks it there and answers where it runs from. Nothing is recorded as installed.
    async fn test_run(&self, id: BundleId, send: &mut SendStream) -> Response {
        self.count_request("test_run");
        let area = self.dir.join(state::TMP_DIR).join("test-run");
        let mut guard = self.test_store.lock().await;
        let store = match guard.as_ref() {
            Some(store) => store.clone(),
            None => {
                let opened = std::fs::create_dir_all(&area)
                    .map_err(anyhow::Error::from)
                    .and_then(|()| {
                        proto::store::Store::open(
                            area.join("store"),
                            proto::store::StoreOptions::default(),
                        )
                        .map_err(anyhow::Error::from)
                    });
                match opened {
                    Ok(store) => {
                        *guard = Some(store.clone());
                        store
                    }
                    Err(error) => {
                        return Response::Error {
                            code: ErrorCode::Internal,
                            message: format!(
                                "cannot open the test-mode store in {}: {error:#}",
                                area.display()
                            ),
                        }
                    }
                }
            }
        };
        let node = Node {
            store: store.clone(),
            ..self.node.clone()
        };
        let (progress_tx, mut progress_rx) = tokio::sync::watch::channel((0u64, 0u64));
        let spec = BundleSpec::Id(id);
        let fetch = node.fetch(
            &spec,
            None,
            |manifest| {
                let _ = progress_tx.send((0, manifest.total_stored_bytes));
            },
            |_, _, done| {
                progress_tx.send_modify(|p| p.0 = done);
            },
        );
        tokio::pin!(fetch);
        let report = loop {
            tokio::select! {
                report = &mut fetch => break report,
                changed = progress_rx.changed() => {
                    if changed.is_ok() {
                        let (done_bytes, total_bytes) = *progress_rx.borrow();
                        let _ = write_frame(send, &Response::FetchProgress { done_bytes, total_bytes }).await;
                    }
                }
            }
        };
        let report = match report {
            Ok(report) => report,
            Err(error) => {
                return Response::Error {
                    code: ErrorCode::Internal,
                    message: format!("test run: cannot fetch {id}: {error:#}"),
                }
            }
        };
        let root = area.join("root").join(id.to_string());
        let generation = report.manifest.layout.sealed_generation();
        let keys = match self.ring_for(generation).await {
            Ok(keys) => keys,
            Err(error) => {
                return Response::Error {
                    code: ErrorCode::Internal,
                    message: format!("test run: cannot read this edge's content keys: {error:#}"),
                }
            }
        };
        let unpacked = tokio::task::block_in_place(|| -> Result<()> {
            if root.exists() {
                std::fs::remove_dir_all(&root)?;
            }
            proto::pack::unpack_with(&report.manifest, &keys, &store, &root, &mut |_| {})?;
            Ok(())
        });
        if let Err(error) = unpacked {
            return Response::Error {
                code: ErrorCode::Internal,
                message: format!("test run: cannot unpack {id}: {error:#}"),
            };
        }
        self.metrics
            .counter(
                "stagecoach_test_runs_total",
                "Bundles run in test mode (not persisted)",
                &[],
            )
            .inc();
        tracing::info!(bundle = %id, name = %report.manifest.name, version = %report.manifest.version, root = %root.display(), bytes = report.bytes_received, "test run: running a bundle without persisting it");
        Response::TestRunning(TestRunSummary {
            fetch: report.summary(),
            root: root.display().to_string(),
        })
    }

    /// Runs the garbage collector (after a completed fetch or a swap), logging a failure.
    fn collect_garbage(&self) {
        if let Err(error) = tokio::task::block_in_place(|| self.retention.collect()) {
            tracing::error!(%error, "garbage collection failed");
        }
    }

    /// Asks for this node's keep-set (through its stagers, else the origin) and applies it with
    /// the installed bundles; without an answer every pin stays.
    async fn refresh_keep_set(&self) {
        match state::load_installed(&self.dir) {
            Ok(installed) => self
                .retention
                .set_local(INSTALLED_KEEP_REASON, installed.iter().map(|b| b.id)),
            Err(error) => {
                // Then the last known installed bundles stay kept.
                tracing::warn!(
                    error = format!("{error:#}"),
                    "cannot read the installed bundles"
                );
            }
        }
        let ticket = self.retention.ticket();
        let answer = negotiate::fetch_keep_set(&self.node).await;
        let collected = tokio::task::block_in_place(|| match answer {
            Ok(keep) => self.retention.set_keep_set(ticket, keep.bundles),
            Err(error) => self.retention.keep_set_unavailable(&format!("{error:#}")),
        });
        if let Err(error) = collected {
            tracing::error!(%error, "garbage collection failed");
        }
    }

    /// Announces what the store already holds (after a restart, say): each bundle whose
    /// manifest is here and verifies, with the pieces present.
    fn announce_store(&self) {
        let manifests = match self.node.store.list_manifests() {
            Ok(manifests) => manifests,
            Err(error) => {
                tracing::warn!(%error, "cannot list the bundles held here; announcing none");
                return;
            }
        };
        let trusted = [*self.node.identity.publisher_key()];
        for signed in manifests {
            let id = signed.id();
            let Ok(manifest) = signed.verify_as(id, &trusted) else {
                tracing::debug!(bundle = %id, "a stored manifest does not verify; not announced");
                continue;
            };
            let held: Vec<bool> = crate::peers::download::pieces_of(&manifest)
                .iter()
                .map(|(hash, _)| self.node.store.has_blob(hash))
                .collect();
            if held.iter().any(|h| *h) {
                self.announcer.announce(
                    &id.to_string(),
                    held_ranges(&held),
                    held.iter().all(|h| *h),
                );
            }
        }
    }
}

impl RequestHandler for Daemon {
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

/// Runs `edge-agent serve`; with `config.peers` on, it reports to and learns from the stager's
/// tracker, and its downloads use the peers it learns of.
pub async fn serve_with_peers(
    config: DaemonConfig,
    p2p: P2pConfig,
    ready: impl FnOnce(&DaemonReady) -> Result<()> + Send + 'static,
) -> Result<()> {
    let board = Arc::new(Mutex::new(PeerBoard::default()));
    if !config.peers {
        return serve(config, board, Arc::new(Silent), ready).await;
    }
    let identity = NodeIdentity::load(&state::identity_dir(&config.dir))?;
    let stagers = crate::fetch::site_stagers(&config.stagers, &identity);
    let (announcer, addr_tx) = peers::spawn_tracker(identity, stagers, board.clone(), p2p);
    serve(config, board, announcer, move |info| {
        if let Ok(addr) = info.mesh.parse::<SocketAddr>() {
            let _ = addr_tx.send(proto::net::advertised(addr));
        }
        ready(info)
    })
    .await
}

/// Runs `edge-agent serve` until Ctrl-C or SIGTERM. `ready` gets the bound addresses.
pub async fn serve(
    config: DaemonConfig,
    board: Arc<Mutex<PeerBoard>>,
    announcer: Arc<dyn Announcer>,
    ready: impl FnOnce(&DaemonReady) -> Result<()>,
) -> Result<()> {
    if let Some(swap) = &config.swap {
        remote_swap::check_machine(&swap.machine)?;
        // After a swap (or any boot) the edge reports the OS it runs: the running slot's.
        remote_swap::record_running_os(&config.dir, &swap.machine)?;
    }
    if state::purge_tmp(&config.dir)? {
        tracing::info!(dir = %config.dir.join(state::TMP_DIR).display(), "purged the test-mode area of the last run");
    }
    let metrics = Metrics::new();
    let node = Node::open_with_limit(
        &config.dir,
        &config.stagers,
        metrics.clone(),
        config.cache_limit_bytes,
    )?;
    let retention = Retention::with_metrics(
        node.store.clone(),
        vec![*node.identity.publisher_key()],
        metrics.clone(),
    );
    // Until the origin answers, what is pinned stays; installed bundles are kept in any case.
    retention.set_local(
        INSTALLED_KEEP_REASON,
        state::load_installed(&config.dir)?.iter().map(|b| b.id),
    );
    tracing::info!(
        limit_bytes = config.cache_limit_bytes,
        stored_bytes = node.store.usage().stored_bytes(),
        "store open"
    );
    let endpoint = server_endpoint(config.listen, &node.identity)
        .context("cannot start the edge's mesh endpoint")?;
    let listen = endpoint.local_addr()?;
    let metrics_addr = proto::metrics::serve(config.metrics_listen, metrics.clone()).await?;
    let site = node.identity.site().as_str().to_owned();
    let stagers = node.stagers.clone();
    let daemon = Arc::new(Daemon {
        node,
        site,
        peers_enabled: config.peers,
        board,
        announcer,
        pace: config
            .upload_limit_bits_per_s
            .map(RateLimit::from_bits_per_s),
        uploads: Semaphore::new(config.max_uploads.max(1)),
        corrupt: config.test_corrupt_serving,
        metrics: metrics.clone(),
        fetching: tokio::sync::Mutex::new(()),
        swap: config.swap.clone(),
        swapping: Arc::new(tokio::sync::Mutex::new(())),
        stagers,
        advertised: config
            .advertise
            .unwrap_or_else(|| proto::net::advertised(listen))
            .to_string(),
        dir: config.dir.clone(),
        configured: config.configured.clone(),
        negotiating: tokio::sync::Mutex::new(()),
        test_store: tokio::sync::Mutex::new(None),
        capture: config.capture.clone(),
        retention,
    });
    if config.peers {
        daemon.announce_store();
    }
    if config.test_corrupt_serving {
        tracing::warn!("TEST HOOK: every blob part served to peers will be corrupted");
    }
    let ready_info = DaemonReady {
        mesh: listen.to_string(),
        metrics: metrics_addr.to_string(),
        pid: Some(std::process::id()),
    };
    proto::durable::write_json_atomic(
        &config.dir.join(DAEMON_FILE),
        &ready_info,
        proto::durable::MODE_READABLE,
    )?;
    ready(&ready_info)?;
    tracing::info!(mesh = %listen, metrics = %metrics_addr, peers = config.peers, "edge agent serving");
    proto::metrics::spawn_log_summary(metrics.clone(), Duration::from_secs(10), "edge-agent");
    let accept = tokio::spawn(server::run(endpoint.clone(), daemon.clone(), metrics));
    spawn_startup_negotiation(daemon.clone());
    spawn_keys_fresh(daemon.clone(), config.keys_refresh);
    spawn_keep_fresh(daemon);
    server::shutdown_signal().await;
    tracing::info!("shutting down");
    let _ = std::fs::remove_file(config.dir.join(DAEMON_FILE));
    endpoint.close(0u32.into(), b"shutdown");
    accept.abort();
    Ok(())
}

/// Keeps this node's content keys in step with the origin: asked at start (again every few
/// seconds until the origin knows the node, which the start-up report makes it), then every
/// `interval`.
fn spawn_keys_fresh(daemon: Arc<Daemon>, interval: Duration) {
    tokio::spawn(async move {
        let mut wait = KEYS_FIRST_RETRY;
        loop {
            let node = &daemon.node;
            match crate::keys::refresh(&node.endpoint, &node.identity, &daemon.dir).await {
                Ok(_) => wait = interval,
                Err(error) => {
                    tracing::warn!(
                        error = format!("{error:#}"),
                        retry_s = wait.as_secs(),
                        "content keys not refreshed; the ring stays as it was"
                    );
                    let next = wait.saturating_mul(2).min(interval);
                    tokio::time::sleep(wait).await;
                    wait = next;
                    continue;
                }
            }
            tokio::time::sleep(wait).await;
        }
    });
}

/// The first wait after a failed key refresh (doubling up to the refresh interval).
const KEYS_FIRST_RETRY: Duration = Duration::from_secs(1);

/// Keeps this node's keep-set fresh: the origin's changes (a new desired bundle, a rollout)
/// reach the store within [`KEEP_SET_REFRESH_INTERVAL`].
fn spawn_keep_fresh(daemon: Arc<Daemon>) {
    tokio::spawn(async move {
        // The start-up negotiation asks first; then every interval.
        let mut every = tokio::time::interval_at(
            tokio::time::Instant::now() + KEEP_SET_REFRESH_INTERVAL,
            KEEP_SET_REFRESH_INTERVAL,
        );
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            daemon.refresh_keep_set().await;
        }
    });
}

/// Negotiates while the daemon already serves (peers may fetch from this edge meanwhile). When
/// neither a stager nor the origin answers, the node runs as it is and tries again later.
fn spawn_startup_negotiation(daemon: Arc<Daemon>) {
    tokio::spawn(async move {
        let what = "start-up negotiation (the node runs as it is meanwhile)";
        let negotiated = retry(
            what,
            &NEGOTIATION_RETRY,
            |_| true,
            |_| daemon.negotiate_now(),
        )
        .await;
        match negotiated {
            Ok(outcome) => {
                let answer = negotiate::describe(&outcome);
                let answer = answer.trim_end();
                match &outcome.plan {
                    proto::wire::BootPlan::NoImageCapture { name, .. }
                        if daemon.capture.is_some() =>
                    {
                        tracing::warn!(answer, "start-up negotiation: no image; capturing one");
                        match daemon.capture_then_negotiate(name).await {
                            Ok(after) => tracing::info!(
                                answer = negotiate::describe(&after).trim_end(),
                                "negotiated after the capture"
                            ),
                            Err(error) => tracing::error!(
                                error = format!("{error:#}"),
                                "capture failed; the node has no image"
                            ),
                        }
                    }
                    proto::wire::BootPlan::NoImage { .. }
                    | proto::wire::BootPlan::NoImageCapture { .. } => {
                        tracing::warn!(answer, "start-up negotiation: this node has no image")
                    }
                    proto::wire::BootPlan::PolicyError { .. } => tracing::error!(
                        answer,
                        "start-up negotiation: the origin cannot decide for this node"
                    ),
                    _ => tracing::info!(answer, "start-up negotiation done"),
                }
            }
            Err(error) => tracing::error!(
                error = format!("{error:#}"),
                "start-up negotiation gave up; `edge-agent negotiate` tries again"
            ),
        }
    });
}
