//! `origin serve`: the mesh endpoint (bundles to stagers, uploads from the publisher) and the
//! enrollment endpoint.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use proto::bundles;
use proto::durable::{write_json_atomic, MODE_READABLE};
use proto::metrics::Metrics;
use proto::net::{
    cert_fingerprint, enroll_endpoint, serve_enrollment, server_endpoint, write_frame,
    EnrollDenied, EnrollGrant, PeerIdentity, Role,
};
use proto::store::Store;
use proto::transfer::serve::{serve_blob, spans_to_ranges, ServeOptions};
use proto::transfer::server::{self, RequestHandler};
use proto::transfer::{names, PeerCounters};
use proto::wire::{
    authorize, BundleInfo, ErrorCode, Refusal, Request, Response, MAX_PUT_BLOB_BYTES,
};
use proto::BlobHash;
use quinn::{RecvStream, SendStream};
use tokio::sync::broadcast;

use crate::catalog::Catalog;
use crate::control::ControlPlane;
use crate::home::{OriginHome, ServeAddrs};
use crate::tokens;

/// Announcements buffered for slow subscribers before they must resubscribe.
pub const ANNOUNCE_QUEUE: usize = 1024;

/// How often the metrics summary is logged.
pub const METRICS_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Where `origin serve` listens.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// Mesh (QUIC, mutual TLS).
    pub listen: SocketAddr,
    /// Enrollment (QUIC, server TLS only).
    pub enroll_listen: SocketAddr,
    /// Prometheus metrics (HTTP).
    pub metrics_listen: SocketAddr,
    /// The web console, with metrics and health beside it (HTTP, loopback only); off when
    /// `None`.
    pub console: Option<SocketAddr>,
    /// The console's TLS (`--console-tls-cert/-key` or `--console-tls-mesh`); plain HTTP
    /// when `None`, which only a loopback console may use.
    pub console_tls: Option<crate::console::tls::TlsSource>,
    /// Also write the bound addresses here (the demo waits for it).
    pub ready_file: Option<std::path::PathBuf>,
    /// The control-plane store (`--store`): the embedded RocksDB in the home, or etcd.
    pub store: crate::db::StoreConfig,
    /// The address other machines reach this origin at (`--advertise`), with the mesh's and
    /// the enrollment endpoint's ports: what it announces to the other origins, puts in its
    /// tokens and tells enrolled nodes. `None`: the listen address (loopback for an
    /// unspecified one).
    pub advertise: Option<std::net::IpAddr>,
    /// Test hook (`--test-corrupt-serving`, only in a `test-hooks` build): every blob part
    /// served is corrupted, as a lying or tampered upstream would send it.
    pub test_corrupt_serving: bool,
}

/// The running origin.
pub struct Origin {
    store: Store,
    catalog: Catalog,
    publisher_key: ed25519_dalek::VerifyingKey,
    announcements: broadcast::Sender<BundleInfo>,
    metrics: Arc<Metrics>,
    control: ControlPlane,
    corrupt: bool,
    stagers: crate::stagers::StagerBook,
    /// This origin's node id, as it announces itself and the bundles it holds.
    node_id: String,
}

impl Origin {
    /// The control plane (node table, audit log, rollouts).
    pub fn control(&self) -> &ControlPlane {
        &self.control
    }

    /// The blob store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The publisher's key, which every manifest must be signed with.
    pub fn publisher_key(&self) -> &ed25519_dalek::VerifyingKey {
        &self.publisher_key
    }

    /// The origin's metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Tells the other origins that this one holds the bundles `ids` (logged when the store
    /// refuses: the bundles are served all the same, and announced again at the next start).
    fn announce_held(&self, ids: &[proto::manifest::BundleId]) {
        if let Err(error) =
            tokio::task::block_in_place(|| self.control.db().announce_held(&self.node_id, ids))
        {
            tracing::warn!(bundles = ids.len(), %error, "cannot tell the store this origin holds its bundles");
        }
    }

    /// Makes a bundle whose blobs are all in the store servable: pins it, stores its manifest,
    /// adds it to the catalog and tells the subscribed stagers (a publish, or a bundle pulled
    /// from another origin). Returns the catalog entry.
    pub fn add_bundle(
        &self,
        signed: proto::SignedManifest,
        manifest: &proto::manifest::Manifest,
        info: BundleInfo,
    ) -> Result<BundleInfo> {
        self.keep_bundle(&signed, manifest)?;
        self.list_bundle(info)
    }

    /// The catalog entry of bundle `id` (its sequence number is given when it is listed).
    pub fn bundle_info(
        &self,
        id: proto::manifest::BundleId,
        manifest: &proto::manifest::Manifest,
    ) -> BundleInfo {
        BundleInfo {
            id,
            name: manifest.name.clone(),
            version: manifest.version.clone(),
            kind: manifest.kind,
            chunk_count: manifest.chunks.len() as u64,
            stored_bytes: manifest.total_stored_bytes,
            raw_bytes: self.control.raw_bytes(manifest),
            seq: 0,
        }
    }

    /// Pins a bundle whose chunks are all in the store and keeps its manifest there: nothing
    /// serves or announces it yet ([`Origin::list_bundle`] does).
    fn keep_bundle(
        &self,
        signed: &proto::SignedManifest,
        manifest: &proto::manifest::Manifest,
    ) -> Result<()> {
        let id = signed.id();
        tokio::task::block_in_place(|| -> Result<()> {
            bundles::pin_bundle(&self.store, &id, manifest)?;
            self.store.put_manifest(signed)?;
            Ok(())
        })
    }

    /// Adds a kept bundle to the catalog, announces it in the store and tells the stagers.
    fn list_bundle(&self, info: BundleInfo) -> Result<BundleInfo> {
        let id = info.id;
        let info = self.catalog.append(info)?;
        self.announce_held(&[id]);
        set_newest_bundle_gauges(&self.metrics, &info);
        // No subscriber is fine: they catch up from the catalog when they connect.
        let _ = self.announcements.send(info.clone());
        Ok(info)
    }

    /// The published bundles.
    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    /// The stagers seen since this origin started.
    pub fn stagers(&self) -> Vec<crate::stagers::StagerSeen> {
        self.stagers.list()
    }

    /// Bytes this origin sent to `site`'s stagers since it started: what the site pulled
    /// across its WAN link from this origin.
    pub fn bytes_sent_to_stagers(&self, site: &str) -> u64 {
        self.metrics.value(
            names::BYTES_SENT,
            &[("peer_role", Role::Stager.as_str()), ("peer_site", site)],
        )
    }

    fn counters(&self, peer: &PeerIdentity) -> PeerCounters {
        PeerCounters::new(&self.metrics, peer.role.as_str(), peer.site.as_str())
    }

    fn request_counter(&self, kind: &'static str) {
        self.metrics
            .counter(names::REQUESTS, "Requests served", &[("kind", kind)])
            .inc();
    }

    async fn answer(&self, peer: &PeerIdentity, request: Request) -> Response {
        match request {
            Request::ListBundles => {
                self.request_counter("list");
                Response::Bundles(self.catalog.all())
            }
            Request::Resolve { name, version } => {
                self.request_counter("resolve");
                match self.catalog.resolve(&name, version.as_deref()) {
                    Some(info) => Response::Resolved(info),
                    None => not_found(format!(
                        "no bundle {name}{}",
                        version.map(|v| format!("@{v}")).unwrap_or_default()
                    )),
                }
            }
            Request::GetManifest { id } => {
                self.request_counter("manifest");
                match self.store.get_manifest(&id) {
                    Ok(Some(signed)) => Response::Manifest(signed),
                    Ok(None) => not_found(format!("no bundle {id}")),
                    Err(error) => internal(error),
                }
            }
            Request::PutBlob { hash, data } => {
                self.request_counter("put_blob");
                if data.len() > MAX_PUT_BLOB_BYTES || BlobHash::of(&data) != hash {
                    return Response::Error {
                        code: ErrorCode::BadRequest,
                        message: format!("uploaded bytes do not hash to {hash} (or exceed {MAX_PUT_BLOB_BYTES} bytes)"),
                    };
                }
                self.counters(peer).received.add(data.len() as u64);
                match tokio::task::block_in_place(|| self.store.put_blob(&data)) {
                    Ok(_) => Response::Ok,
                    Err(error) => internal(error),
                }
            }
            Request::Publish { manifest: signed } => {
                self.request_counter("publish");
                match self.publish(peer, signed) {
                    Ok(info) => {
                        tracing::info!(bundle = %info.id, name = %info.name, version = %info.version, seq = info.seq, "published");
                        Response::Resolved(info)
                    }
                    Err(error) => Response::Error {
                        code: ErrorCode::BadRequest,
                        message: error.to_string(),
                    },
                }
            }
            Request::ReportNode { report, negotiate } => {
                self.request_counter("report_node");
                self.node_report(
                    &peer.node_id.to_string(),
                    peer.site.as_str(),
                    report,
                    negotiate,
                )
            }
            Request::RelayReport {
                node_id,
                report,
                negotiate,
            } => {
                self.request_counter("relay_report");
                if let Err(error) = node_id.parse::<proto::net::NodeId>() {
                    return Response::Error {
                        code: ErrorCode::BadRequest,
                        message: format!("relayed report: {error}"),
                    };
                }
                // The edge's site is the relaying stager's, from its certificate.
                self.node_report(&node_id, peer.site.as_str(), report, negotiate)
            }
            Request::Control { actor, command } => {
                self.request_counter("control");
                tracing::info!(%peer, actor, command = command_name(&command), "control command");
                Response::Control(
                    self.control
                        .command(peer, &actor, command, &self.catalog)
                        .await,
                )
            }
            Request::KeepSet => {
                self.request_counter("keep_set");
                let keep = match peer.role {
                    Role::Stager => tokio::task::block_in_place(|| {
                        crate::keep::for_site(
                            &self.control,
                            peer.site.as_str(),
                            &self.catalog.all(),
                        )
                    }),
                    Role::Edge => tokio::task::block_in_place(|| {
                        crate::keep::for_node(
                            &self.control,
                            &peer.node_id.to_string(),
                            peer.site.as_str(),
                        )
                    }),
                    other => {
                        return Response::Error {
                            code: ErrorCode::Forbidden,
                            message: format!("a {other} does not ask for a keep-set"),
                        }
                    }
                };
                keep_answer(peer, keep)
            }
            Request::StagerStats {
                served_bytes,
                pulled_bytes,
            } => {
                self.request_counter("stager_stats");
                self.stagers.report(peer, served_bytes, pulled_bytes);
                Response::Ok
            }
            Request::StagerAddress { data_addr } => {
                self.request_counter("stager_address");
                if let Err(error) = data_addr.parse::<SocketAddr>() {
                    return Response::Error {
                        code: ErrorCode::BadRequest,
                        message: format!("{data_addr:?} is not a host:port address: {error}"),
                    };
                }
                self.stagers.advertise(peer, data_addr);
                Response::Ok
            }
            Request::ContentKeys => {
                self.request_counter("content_keys");
                self.content_keys(peer)
            }
            Request::RelayKeepSet { node_id } => {
                self.request_counter("relay_keep_set");
                // The edge must be of the relaying stager's site, from its certificate.
                let keep = tokio::task::block_in_place(|| {
                    crate::keep::for_node(&self.control, &node_id, peer.site.as_str())
                });
                keep_answer(peer, keep)
            }
            // `authorize` let it through, but it is answered in `handle` (GetBlob, Subscribe)
            // or the table and this match disagree.
            other => Response::Error {
                code: ErrorCode::Internal,
                message: format!("the origin has no answer for {} here", other.kind()),
            },
        }
    }

    /// Answers an edge's [`Request::ContentKeys`] (the table let only edges through): the
    /// generations its class may read, none to a revoked or unknown node. Never logs a key.
    fn content_keys(&self, peer: &PeerIdentity) -> Response {
        let node_id = peer.node_id.to_string();
        let answer = tokio::task::block_in_place(|| self.control.content_keys_for(&node_id));
        match answer {
            Ok((crate::control::KeysAnswer::Keys(generations), class)) => {
                let shown: Vec<u32> = generations.iter().map(|(g, _)| g.0).collect();
                if generations.is_empty() {
                    tracing::info!(%peer, class = class.as_deref().unwrap_or("-"), "content keys: none, the node's class may not read encrypted bundles");
                } else {
                    tracing::info!(%peer, class = class.as_deref().unwrap_or("-"), generations = ?shown, "content keys given");
                }
                self.metrics
                    .counter(
                        "stagecoach_content_key_answers_total",
                        "Content-key requests answered, by outcome",
                        &[(
                            "outcome",
                            if generations.is_empty() {
                                "none"
                            } else {
                                "keys"
                            },
                        )],
                    )
                    .inc();
                Response::ContentKeys { generations }
            }
            Ok((crate::control::KeysAnswer::Revoked, _)) => {
                tracing::warn!(%peer, "content keys refused: the node is revoked");
                Response::Error {
                    code: ErrorCode::Forbidden,
                    message: format!("node {node_id} is revoked: it gets no content key"),
                }
            }
            Ok((crate::control::KeysAnswer::Unknown, _)) => not_found(format!(
                "node {node_id} has not reported to the origin yet: report (enroll or start) first, then ask for content keys"
            )),
            Err(error) => internal(error),
        }
    }

    /// The refusal of a request from (or relayed for) a revoked node, if it is one.
    fn refuse_revoked(&self, peer: &PeerIdentity, request: &Request) -> Option<Response> {
        let relayed = match request {
            Request::RelayReport { node_id, .. } | Request::RelayKeepSet { node_id } => {
                Some(node_id.as_str())
            }
            _ => None,
        };
        let own = peer.node_id.to_string();
        for id in [Some(own.as_str()), relayed].into_iter().flatten() {
            if self.control.is_revoked_recently(id) {
                tracing::warn!(%peer, node = id, request = %request.kind(), "refused: the node is revoked");
                return Some(Response::Error {
                    code: ErrorCode::Forbidden,
                    message: format!("node {id} is revoked"),
                });
            }
        }
        None
    }

    /// Answers a request the authorization table refused.
    fn refuse(&self, peer: &PeerIdentity, refusal: &Refusal) -> Response {
        if refusal.is_forbidden() {
            self.metrics
                .counter(
                    names::FORBIDDEN,
                    "Requests refused for the peer's role",
                    &[],
                )
                .inc();
            tracing::warn!(%peer, request = %refusal.request, "refused: role may not do this");
        }
        refusal.response()
    }

    /// Records a node's report and answers its negotiation.
    fn node_report(
        &self,
        node_id: &str,
        site: &str,
        report: proto::wire::NodeReport,
        negotiate: bool,
    ) -> Response {
        let event = report.event;
        match tokio::task::block_in_place(|| self.control.report(node_id, site, report, negotiate))
        {
            Ok(Some(plan)) => {
                let answer = match &plan {
                    proto::wire::BootPlan::BootAsYouAre { .. } => "boot-as-you-are",
                    proto::wire::BootPlan::Fetch { .. } => "fetch",
                    proto::wire::BootPlan::NoImage { .. } => "no-image",
                    proto::wire::BootPlan::PolicyError { .. } => "policy-error",
                    proto::wire::BootPlan::NoImageCapture { .. } => "no-image-capture",
                };
                self.metrics
                    .counter(
                        "stagecoach_negotiations_total",
                        "Boot negotiations answered, by answer",
                        &[("answer", answer)],
                    )
                    .inc();
                tracing::info!(node = node_id, site, answer, "negotiated");
                Response::BootPlan(plan)
            }
            Ok(None) => {
                self.metrics
                    .counter(
                        "stagecoach_node_reports_total",
                        "Node reports recorded, by event",
                        &[("event", event.name())],
                    )
                    .inc();
                tracing::info!(node = node_id, site, event = event.name(), "node reported");
                Response::Ok
            }
            Err(error) => internal(error),
        }
    }

    fn publish(
        &self,
        peer: &PeerIdentity,
        signed: proto::SignedManifest,
    ) -> std::result::Result<BundleInfo, PublishError> {
        let manifest = signed.verify(&[self.publisher_key])?;
        let missing = manifest
            .chunks
            .iter()
            .filter(|c| !self.store.has_blob(&c.hash))
            .count();
        if missing > 0 {
            return Err(PublishError::NotUploaded(missing));
        }
        let info = self.bundle_info(signed.id(), &manifest);
        // The package table first: a publish the store did not record is served by no one
        // (its chunks and manifest stay here, pinned; should a write that timed out commit
        // later, replication lists the bundle from them).
        self.keep_bundle(&signed, &manifest)
            .map_err(PublishError::Catalog)?;
        tokio::task::block_in_place(|| {
            self.control
                .record_package(&info, &manifest, peer, "package.publish")
        })
        .map_err(PublishError::PackageTable)?;
        let info = self.list_bundle(info).map_err(PublishError::Catalog)?;
        Ok(info)
    }

    /// Answers a `GetBlob` with the blob's verified stream; only complete blobs live here.
    async fn serve_blob(
        &self,
        peer: &PeerIdentity,
        hash: BlobHash,
        groups: &[(u64, u64)],
        send: &mut SendStream,
    ) {
        self.request_counter("get_blob");
        let counters = self.counters(peer);
        let ranges = match spans_to_ranges(groups) {
            Ok(ranges) => ranges,
            Err(message) => {
                let answer = Response::Error {
                    code: ErrorCode::BadRequest,
                    message,
                };
                if let Ok(bytes) = write_frame(send, &answer).await {
                    counters.sent.add(bytes as u64);
                }
                let _ = send.finish();
                return;
            }
        };
        let options = ServeOptions {
            progress: None,
            corrupt: self.corrupt,
            counters: &counters,
            pace: None,
        };
        if let Err(error) = serve_blob(&self.store, send, hash, ranges, options).await {
            tracing::debug!(%peer, blob = %hash, %error, "blob stream ended early");
        }
    }

    async fn subscribe(&self, peer: &PeerIdentity, after_seq: u64, send: &mut SendStream) {
        self.request_counter("subscribe");
        let _connected = (peer.role == Role::Stager).then(|| self.stagers.subscribed(peer));
        // Subscribe before reading the backlog so nothing published in between is lost.
        let mut live = self.announcements.subscribe();
        let mut last = after_seq;
        for info in self.catalog.after(after_seq) {
            last = info.seq;
            if write_frame(send, &Response::Announce(info)).await.is_err() {
                return;
            }
        }
        tracing::info!(%peer, after_seq, "subscriber caught up");
        loop {
            match live.recv().await {
                Ok(info) if info.seq > last => {
                    last = info.seq;
                    if write_frame(send, &Response::Announce(info)).await.is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    for info in self.catalog.after(last) {
                        last = info.seq;
                        if write_frame(send, &Response::Announce(info)).await.is_err() {
                            return;
                        }
                    }
                }
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    }
}

impl RequestHandler for Origin {
    async fn handle(
        self: Arc<Self>,
        peer: PeerIdentity,
        request: Request,
        mut send: SendStream,
        _recv: RecvStream,
    ) {
        if peer.role == Role::Stager {
            self.stagers.touch(&peer);
        }
        let response = match authorize(Role::Origin, peer.role, &request) {
            Err(refusal) => self.refuse(&peer, &refusal),
            Ok(()) => match self.refuse_revoked(&peer, &request) {
                Some(refused) => refused,
                None => match request {
                    Request::Subscribe { after_seq } => {
                        return self.subscribe(&peer, after_seq, &mut send).await
                    }
                    Request::GetBlob { hash, groups, .. } => {
                        return self.serve_blob(&peer, hash, &groups, &mut send).await
                    }
                    request => self.answer(&peer, request).await,
                },
            },
        };
        if let Ok(bytes) = write_frame(&mut send, &response).await {
            self.counters(&peer).sent.add(bytes as u64);
            let _ = send.finish();
        }
    }
}

/// A control command's name for logs (a policy document is too long to log).
fn command_name(command: &proto::wire::ControlCommand) -> &'static str {
    use proto::wire::ControlCommand as C;
    match command {
        C::Nodes => "nodes",
        C::PolicyLoad { .. } => "policy load",
        C::PolicyCheck => "policy check",
        C::ClassSet { .. } => "class set",
        C::OverrideSet { .. } => "override set",
        C::OverrideClear { .. } => "override clear",
        C::Audit { .. } => "audit",
        C::TestRun { .. } => "test-run",
        C::RolloutStart { .. } => "rollout-start",
        C::Rollout { .. } => "rollout",
        C::KeysRotate => "keys rotate",
        C::KeysList => "keys list",
        C::KeysRetire { .. } => "keys retire",
        C::NodeRevoke { .. } => "nodes revoke",
        C::Prepare { .. } => "prepare",
        C::PrepareStatus { .. } => "prepare status",
        C::PrepareCancel { .. } => "prepare cancel",
        C::AccountAdd { .. } => "admin add",
        C::AccountList => "admin list",
        C::AccountRemove { .. } => "admin remove",
        C::Status => "status",
        C::BundleHolders { .. } => "bundle holders",
        C::EnrollToken { .. } => "enroll",
    }
}

/// Sizes of the newest bundle, which the demo reads to express traffic as multiples of it.
fn set_newest_bundle_gauges(metrics: &Metrics, info: &BundleInfo) {
    metrics
        .gauge(
            "stagecoach_bundle_stored_bytes",
            "Stored bytes of the newest bundle",
            &[],
        )
        .set(info.stored_bytes);
    metrics
        .gauge(
            "stagecoach_bundle_raw_bytes",
            "Payload bytes of the newest bundle",
            &[],
        )
        .set(info.raw_bytes);
}

/// The answer to a keep-set request: the set, or why none can be given (the asker then keeps
/// what it has).
fn keep_answer(
    peer: &PeerIdentity,
    keep: Result<proto::wire::KeepSet, crate::keep::KeepError>,
) -> Response {
    match keep {
        Ok(keep) => {
            tracing::debug!(%peer, bundles = keep.bundles.len(), "keep-set sent");
            Response::KeepSet(keep)
        }
        Err(error @ crate::keep::KeepError::UnknownNode(_)) => not_found(error.to_string()),
        Err(error @ crate::keep::KeepError::OtherSite { .. }) => {
            tracing::warn!(%peer, %error, "refused a keep-set");
            Response::Error {
                code: ErrorCode::Forbidden,
                message: error.to_string(),
            }
        }
        Err(error) => {
            tracing::warn!(%peer, %error, "cannot give a keep-set");
            internal(error)
        }
    }
}

fn not_found(message: String) -> Response {
    Response::Error {
        code: ErrorCode::NotFound,
        message,
    }
}

/// Why a publish was refused or did not complete.
#[derive(Debug, thiserror::Error)]
enum PublishError {
    /// The manifest does not verify against the publisher's key.
    #[error(transparent)]
    Manifest(#[from] proto::manifest::ManifestError),
    /// Chunks the manifest names are not in the store.
    #[error("{0} chunks of the bundle were not uploaded")]
    NotUploaded(usize),
    /// The store cannot pin the bundle or keep its manifest, or the catalog cannot record it.
    #[error("{0:#}")]
    Catalog(anyhow::Error),
    /// The control plane did not record the package: nothing was published.
    #[error("not published: the package table was not updated ({0}); publish again")]
    PackageTable(crate::db::DbError),
}

fn internal(error: impl std::fmt::Display) -> Response {
    tracing::error!(%error, "request failed");
    Response::Error {
        code: ErrorCode::Internal,
        message: error.to_string(),
    }
}

/// Puts every catalog entry the package table lacks into it (bundles published before the
/// table existed).
fn import_catalog(
    control: &ControlPlane,
    catalog: &Catalog,
    store: &Store,
    identity: &proto::net::NodeIdentity,
) -> Result<()> {
    let trusted = [*identity.publisher_key()];
    for info in catalog.all() {
        if control.db().package(&info.name, &info.version)?.is_some() {
            continue;
        }
        let Some(signed) = store.get_manifest(&info.id)? else {
            tracing::warn!(bundle = %info.id, "a catalog entry has no manifest in the store; not in the package table");
            continue;
        };
        let manifest = signed
            .verify_as(info.id, &trusted)
            .with_context(|| format!("the stored manifest of {} does not verify", info.id))?;
        control.record_package(&info, &manifest, identity.identity(), "package.import")?;
    }
    Ok(())
}

/// How long a stopping origin waits for its peers to learn that it closed their connections.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// Runs `origin serve` until Ctrl-C or SIGTERM.
pub async fn serve(home: OriginHome, config: ServeConfig) -> Result<()> {
    if let Some(addr) = config.console {
        crate::console::check_listen(addr, config.console_tls.is_some())?;
    }
    let identity = home.origin_identity()?;
    let ca = Arc::new(home.ca()?);
    let store = home.store()?;
    let catalog = Catalog::open(&home.catalog_path())?;
    let metrics = Metrics::new();
    if let Some(info) = catalog.all().last() {
        set_newest_bundle_gauges(&metrics, info);
    }
    let mesh =
        server_endpoint(config.listen, &identity).context("cannot start the mesh endpoint")?;
    let mesh_addr = mesh.local_addr()?;
    let enroll = enroll_endpoint(config.enroll_listen, &identity)
        .context("cannot start the enrollment endpoint")?;
    let enroll_addr = enroll.local_addr()?;
    let metrics_addr = proto::metrics::serve(config.metrics_listen, metrics.clone())
        .await
        .context("cannot start the metrics endpoint")?;
    let (announcements, _) = broadcast::channel(ANNOUNCE_QUEUE);
    home.require_init()?;
    let db = crate::db::Db::open_store(&config.store)
        .with_context(|| format!("cannot open the control-plane store ({})", config.store))?;
    tracing::info!(store = %config.store, "control-plane store open");
    metrics
        .gauge(
            "stagecoach_origin_store_info",
            "The control-plane store's backend (1 for the one in use)",
            &[("backend", config.store.backend())],
        )
        .set(1);
    let keys = crate::keys::OriginKeys::open(home.dir())?;
    let control = ControlPlane::new(
        db,
        home.dir(),
        proto::net::client_endpoint(&identity)
            .context("cannot start the origin's client endpoint")?,
        keys,
    );
    // The origins sharing the store share the content keys, sealed with a key derived from
    // the publisher's signing key (which the store never holds).
    control.share_keys(
        crate::keys::ring_seal_key(&home.signing_key()?),
        &identity.node_id().to_string(),
    )?;
    import_catalog(&control, &catalog, &store, &identity)?;
    // Prepare operations an earlier run left unfinished go on; nodes still pending are asked
    // again now and then.
    control.prepares().spawn_retries()?;
    let origin = Arc::new(Origin {
        store,
        catalog,
        publisher_key: *identity.publisher_key(),
        announcements,
        metrics: metrics.clone(),
        control,
        corrupt: config.test_corrupt_serving,
        stagers: crate::stagers::StagerBook::default(),
        node_id: identity.node_id().to_string(),
    });
    if config.test_corrupt_serving {
        tracing::warn!("TEST HOOK: every blob part served will be corrupted");
    }
    let console_addr = match config.console {
        Some(addr) => {
            let tls = match &config.console_tls {
                Some(source) => Some(
                    crate::console::tls::server_config(source, &home.dir().join("identity"))
                        .context("cannot set up the console's TLS")?,
                ),
                None => None,
            };
            let console = tokio::task::block_in_place(|| {
                crate::console::Console::new(origin.clone(), tls.is_some())
            })?;
            let router =
                crate::console::router(console).merge(proto::metrics::router(metrics.clone()));
            let (bound, scheme) = match tls {
                Some(tls) => (crate::console::tls::serve(addr, router, tls).await, "https"),
                None => (proto::metrics::serve_router(addr, router).await, "http"),
            };
            let bound = bound.with_context(|| format!("cannot start the console on {addr}"))?;
            tracing::info!(console = %format!("{scheme}://{bound}/"), "console serving");
            Some(bound.to_string())
        }
        None => None,
    };
    let addrs = ServeAddrs {
        mesh: mesh_addr.to_string(),
        enroll: enroll_addr.to_string(),
        metrics: metrics_addr.to_string(),
        console: console_addr,
    };
    write_json_atomic(&home.serve_file(), &addrs, MODE_READABLE)?;
    // What other machines dial: the advertised address, else the bound one.
    let public = |bound: SocketAddr| match config.advertise {
        Some(ip) => SocketAddr::new(ip, bound.port()),
        None => proto::net::advertised(bound),
    };
    let (public_mesh, public_enroll) = (public(mesh_addr), public(enroll_addr));
    if config.advertise.is_none() && mesh_addr.ip().is_unspecified() {
        tracing::warn!(
            told = %public_mesh,
            "listening on every address, but other origins and enrolled nodes are told a loopback address: pass --advertise with the address they reach this machine at"
        );
    }
    // The other origins sharing the store see this one for as long as it runs.
    let me = crate::db::OriginRecord {
        node_id: identity.node_id().to_string(),
        mesh: public_mesh.to_string(),
        enroll: public_enroll.to_string(),
        metrics: addrs.metrics.clone(),
        started_ms: crate::db::now_ms(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
    };
    tokio::task::block_in_place(|| origin.control.db().announce_origin(&me))
        .context("cannot announce this origin in the store")?;
    // One transaction per hundred bundles, not one request each.
    let held: Vec<_> = origin.catalog.all().iter().map(|info| info.id).collect();
    origin.announce_held(&held);
    // Exactly one origin sharing the store drives the rollout: the one elected.
    origin.control.rollouts().lead(
        me.node_id.clone(),
        me.mesh.clone(),
        origin.metrics().gauge(
            "stagecoach_origin_drives_rollouts",
            "1 while this origin is the one elected to drive rollouts",
            &[],
        ),
    );
    if matches!(config.store, crate::db::StoreConfig::Etcd(_)) {
        // Other origins share the store: pull what they published.
        crate::replicate::spawn(
            origin.clone(),
            proto::net::client_endpoint(&identity)
                .context("cannot start the replication's client endpoint")?,
            me.node_id.clone(),
        );
    }
    // Tokens printed by an older origin (files) still enroll: they move into the store.
    tokio::task::block_in_place(|| tokens::import_files(&home.tokens_dir(), origin.control.db()))
        .context("cannot move the old enrollment token files into the store")?;
    origin.control.set_enrollment(crate::control::Enrollment {
        addr: public_enroll,
        ca_fingerprint: cert_fingerprint(identity.ca_cert_der()),
        node_id: me.node_id.clone(),
    });
    let publisher_key = *identity.publisher_key();
    let origin_addr = public_mesh.to_string();
    let enrolled = metrics.counter("stagecoach_enrollments_total", "Nodes enrolled", &[]);
    let stager_book = origin.stagers.clone();
    let enrolling_origin = origin.clone();
    tokio::spawn(serve_enrollment(enroll, move |request| {
        let ca = ca.clone();
        let stager_book = stager_book.clone();
        let this = enrolling_origin.clone();
        let origin_addr = origin_addr.clone();
        let enrolled = enrolled.clone();
        async move {
            let (role, site) = tokio::task::block_in_place(|| {
                tokens::redeem(
                    this.control().db(),
                    &request.secret,
                    &this.node_id,
                    request.remote,
                )
            })
            .map_err(|e| match e {
                tokens::TokenError::Store(_) => EnrollDenied::internal(e.to_string()),
                other => EnrollDenied::forbidden(other.to_string()),
            })?;
            let mut grant = EnrollGrant::issue(
                &ca,
                &request.csr_pem,
                role,
                &site,
                &publisher_key,
                origin_addr,
            )?;
            grant.stagers = stager_book.site_addrs(site.as_str());
            // Every origin up, so the node can turn to another when this one is gone.
            grant.origins = match tokio::task::block_in_place(|| this.control().db().origins()) {
                Ok(origins) => origins.into_iter().map(|o| o.mesh).collect(),
                Err(error) => {
                    tracing::warn!(%error, "cannot list the origins up; the node learns only this one");
                    Vec::new()
                }
            };
            enrolled.inc();
            tracing::info!(%role, %site, remote = %request.remote, stagers = ?grant.stagers, origins = ?grant.origins, "enrolled a node");
            Ok(grant)
        }
    }));
    proto::metrics::spawn_log_summary(metrics.clone(), METRICS_LOG_INTERVAL, "origin");
    tokio::spawn(server::run(mesh.clone(), origin, metrics));
    if let Some(path) = &config.ready_file {
        write_json_atomic(path, &addrs, MODE_READABLE)?;
    }
    tracing::info!(mesh = %mesh_addr, enroll = %enroll_addr, metrics = %metrics_addr, "origin serving");
    server::shutdown_signal().await;
    tracing::info!("origin stopping");
    mesh.close(0u32.into(), b"origin stopping");
    // Let the close reach the stagers and edges, so they reconnect to the next origin at once
    // instead of waiting out the idle timeout.
    if tokio::time::timeout(CLOSE_GRACE, mesh.wait_idle())
        .await
        .is_err()
    {
        tracing::warn!("some connections did not acknowledge the close");
    }
    Ok(())
}
