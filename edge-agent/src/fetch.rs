//! `edge-agent fetch`: download a bundle from the site's stagers (falling back to a second
//! stager, then the origin), verifying every 16 KiB group, into the local store.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use proto::bundles;
use proto::manifest::{BundleId, Manifest, SignedManifest};
use proto::metrics::Metrics;
use proto::net::{client_endpoint, connect, NodeIdentity, Role};
use proto::store::Store;
use proto::transfer::fetch::{fetch_manifest, resolve, FetchError};
use proto::transfer::PeerCounters;
use quinn::{Connection, Endpoint};

use crate::peers::download::{Download, PeerHave};
use crate::state::{identity_dir, open_store, open_store_with_limit, DaemonReady};

/// What to fetch: a bundle id, or `NAME@VERSION` (or `NAME` for the newest).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BundleSpec {
    /// By id.
    Id(BundleId),
    /// By name and optional version.
    Name {
        /// Bundle name.
        name: String,
        /// Version, or the newest.
        version: Option<String>,
    },
}

/// Why a bundle spec does not parse.
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum BundleSpecError {
    /// 64 hex digits that are not a bundle id.
    #[error(transparent)]
    Id(#[from] proto::hash::ParseHashError),
    /// Nothing given.
    #[error("empty bundle name")]
    Empty,
}

impl std::str::FromStr for BundleSpec {
    type Err = BundleSpecError;

    fn from_str(s: &str) -> Result<Self, BundleSpecError> {
        if s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(BundleSpec::Id(s.parse()?));
        }
        if s.is_empty() {
            return Err(BundleSpecError::Empty);
        }
        Ok(match s.split_once('@') {
            Some((name, version)) => BundleSpec::Name {
                name: name.to_owned(),
                version: Some(version.to_owned()),
            },
            None => BundleSpec::Name {
                name: s.to_owned(),
                version: None,
            },
        })
    }
}

struct Source {
    addr: SocketAddr,
    role: &'static str,
    conn: Option<Connection>,
    down: bool,
    banned: bool,
}

/// The sources of one fetch, in order of preference, with their state.
pub struct Sources {
    endpoint: Endpoint,
    sources: tokio::sync::Mutex<Vec<Source>>,
    metrics: Arc<Metrics>,
}

impl Sources {
    /// Stagers first (the order given is the preference among live connections), then the origin.
    pub fn new(
        endpoint: Endpoint,
        stagers: &[SocketAddr],
        origin: Option<SocketAddr>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let mut sources: Vec<Source> = stagers
            .iter()
            .map(|&addr| Source {
                addr,
                role: "stager",
                conn: None,
                down: false,
                banned: false,
            })
            .collect();
        if let Some(addr) = origin {
            sources.push(Source {
                addr,
                role: "origin",
                conn: None,
                down: false,
                banned: false,
            });
        }
        Self {
            endpoint,
            sources: tokio::sync::Mutex::new(sources),
            metrics,
        }
    }

    /// A usable source not in `tried`: its connection, index and counters. A live connection
    /// is taken first, in order of preference. Otherwise the stagers are dialed at once and
    /// the first to answer is used, so a dead stager costs no handshake timeout; the origin
    /// is dialed only when no stager answers.
    async fn get(&self, tried: &[usize]) -> Option<(usize, Connection, PeerCounters)> {
        let mut sources = self.sources.lock().await;
        let usable = |index: usize, source: &Source| {
            !source.down && !source.banned && !tried.contains(&index)
        };
        for (index, source) in sources.iter().enumerate() {
            if !usable(index, source) {
                continue;
            }
            if let Some(conn) = source.conn.as_ref().filter(|c| c.close_reason().is_none()) {
                let counters = PeerCounters::new(&self.metrics, source.role, "");
                return Some((index, conn.clone(), counters));
            }
        }
        for role in ["stager", "origin"] {
            let mut dials = tokio::task::JoinSet::new();
            for (index, source) in sources.iter().enumerate() {
                if usable(index, source) && source.role == role {
                    let (endpoint, addr) = (self.endpoint.clone(), source.addr);
                    dials.spawn(async move { (index, connect(&endpoint, addr).await) });
                }
            }
            // Dropping the set when one answers abandons the other handshakes.
            while let Some(joined) = dials.join_next().await {
                let Ok((index, dialed)) = joined else {
                    continue;
                };
                let source = &mut sources[index];
                match dialed {
                    Ok(conn) => {
                        tracing::info!(source = %source.addr, role = source.role, "connected");
                        source.conn = Some(conn.clone());
                        let counters = PeerCounters::new(&self.metrics, source.role, "");
                        return Some((index, conn, counters));
                    }
                    Err(error) => {
                        tracing::warn!(source = %source.addr, role = source.role, %error, "source unreachable; trying the next");
                        source.down = true;
                    }
                }
            }
        }
        None
    }

    async fn mark(&self, index: usize, error: &FetchError) {
        let mut sources = self.sources.lock().await;
        let Some(source) = sources.get_mut(index) else {
            return;
        };
        if error.is_corrupt_source() {
            tracing::error!(source = %source.addr, role = source.role, %error, "source sent data that did not verify; banned for this fetch");
            self.metrics
                .counter(
                    "stagecoach_sources_banned_total",
                    "Sources banned for sending bad data",
                    &[],
                )
                .inc();
            source.banned = true;
        } else if matches!(error, FetchError::Net(_)) {
            source.down = true;
        }
    }

    /// Runs `op` against the sources ([`Sources::get`]) until one succeeds, each at most once.
    async fn with_source<T, F, Fut>(&self, what: &str, mut op: F) -> Result<T>
    where
        F: FnMut(Connection, PeerCounters) -> Fut,
        Fut: std::future::Future<Output = Result<T, FetchError>>,
    {
        let mut tried = Vec::new();
        let mut last_error = None;
        while let Some((index, conn, counters)) = self.get(&tried).await {
            match op(conn, counters).await {
                Ok(value) => return Ok(value),
                Err(error) if error.is_source_fault() => {
                    tracing::warn!(%error, what, "source failed; trying the next");
                    self.mark(index, &error).await;
                    last_error = Some(error);
                    tried.push(index);
                }
                Err(error) => return Err(error.into()),
            }
        }
        match last_error {
            Some(error) => {
                Err(anyhow::Error::new(error).context(format!("no source could provide {what}")))
            }
            None => bail!("no source reachable for {what}"),
        }
    }
}

/// What a finished fetch reports.
#[derive(Debug, Clone)]
pub struct FetchReport {
    /// The bundle.
    pub id: BundleId,
    /// Its manifest.
    pub manifest: Manifest,
    /// Bytes received from all sources.
    pub bytes_received: u64,
    /// Of those, bytes received from peers of the site.
    pub bytes_from_peers: u64,
    /// Chunks that were already in the store.
    pub chunks_present: usize,
}

impl FetchReport {
    /// The report as the wire's [`proto::wire::FetchSummary`].
    pub fn summary(&self) -> proto::wire::FetchSummary {
        proto::wire::FetchSummary {
            id: self.id,
            name: self.manifest.name.clone(),
            version: self.manifest.version.clone(),
            bytes_received: self.bytes_received,
            bytes_from_peers: self.bytes_from_peers,
            chunks_present: self.chunks_present as u64,
            chunks: self.manifest.chunks.len() as u64,
        }
    }
}

/// An edge node's means to fetch: identity, store, client endpoint, sources and metrics. The
/// one-shot `edge-agent fetch` builds one; the daemon keeps one.
#[derive(Clone)]
pub struct Node {
    /// The node's identity.
    pub identity: NodeIdentity,
    /// The node's store.
    pub store: Store,
    /// Client endpoint with the node's certificate.
    pub endpoint: Endpoint,
    /// The site's stagers, in order of preference.
    pub stagers: Vec<SocketAddr>,
    /// Where bytes are counted.
    pub metrics: Arc<Metrics>,
}

impl Node {
    /// Loads the edge under `dir` (identity and store, with the default store limit).
    pub fn open(dir: &Path, stagers: &[SocketAddr], metrics: Arc<Metrics>) -> Result<Self> {
        Self::open_with_limit(
            dir,
            stagers,
            metrics,
            proto::store::DEFAULT_CACHE_LIMIT_BYTES,
        )
    }

    /// Loads the edge under `dir`, its store bounded at `limit_bytes`.
    pub fn open_with_limit(
        dir: &Path,
        stagers: &[SocketAddr],
        metrics: Arc<Metrics>,
        limit_bytes: u64,
    ) -> Result<Self> {
        let identity = NodeIdentity::load(&identity_dir(dir))?;
        if identity.role() != Role::Edge {
            bail!(
                "{} holds a {} identity, not an edge's",
                dir.display(),
                identity.role()
            );
        }
        let store = open_store_with_limit(dir, limit_bytes)?;
        let endpoint = client_endpoint(&identity)?;
        Ok(Self {
            stagers: site_stagers(stagers, &identity),
            identity,
            store,
            endpoint,
            metrics,
        })
    }

    /// The origin's mesh address, from enrollment.
    fn origin(&self) -> Option<SocketAddr> {
        self.identity.origin_addr().parse().ok()
    }

    /// Resolves `spec` and fetches the bundle's verified manifest from the stagers (then the
    /// origin).
    pub async fn manifest(&self, spec: &BundleSpec) -> Result<(SignedManifest, Manifest)> {
        let sources = Sources::new(
            self.endpoint.clone(),
            &self.stagers,
            self.origin(),
            self.metrics.clone(),
        );
        let trusted = [*self.identity.publisher_key()];
        if let BundleSpec::Id(id) = spec {
            // A bundle already held (prepared ahead of a swap, say) needs no source: its
            // stored manifest, verified again, and the download then finds every chunk here.
            if let Some(held) = self.held_manifest(id, &trusted) {
                return Ok(held);
            }
        }
        let id = match spec {
            BundleSpec::Id(id) => *id,
            BundleSpec::Name { name, version } => {
                sources
                    .with_source("the bundle name", |conn, _| {
                        let (name, version) = (name.clone(), version.clone());
                        async move { resolve(&conn, &name, version.as_deref()).await }
                    })
                    .await?
                    .id
            }
        };
        sources
            .with_source("the manifest", |conn, _| async move {
                fetch_manifest(&conn, id, &trusted).await
            })
            .await
    }

    /// The manifest of bundle `id` from this node's store, when it is there and verifies.
    fn held_manifest(
        &self,
        id: &BundleId,
        trusted: &[ed25519_dalek::VerifyingKey],
    ) -> Option<(SignedManifest, Manifest)> {
        let signed = match self.store.get_manifest(id) {
            Ok(found) => found?,
            Err(error) => {
                tracing::warn!(bundle = %id, %error, "cannot read a stored manifest; asking a source");
                return None;
            }
        };
        match signed.verify_as(*id, trusted) {
            Ok(manifest) => Some((signed, manifest)),
            Err(error) => {
                tracing::warn!(bundle = %id, %error, "a stored manifest does not verify; asking a source");
                None
            }
        }
    }

    /// Fetches bundle `spec` into the store: chunks from the stagers, from `peers` when given
    /// (announcements of the site's edges), and from the origin when nothing else can serve.
    /// `on_piece` sees each chunk completed (for progress and announcements). The bundle is
    /// pinned and its manifest stored at the end.
    pub async fn fetch(
        &self,
        spec: &BundleSpec,
        peers: Option<tokio::sync::mpsc::Receiver<PeerHave>>,
        on_manifest: impl FnOnce(&Manifest),
        on_piece: impl FnMut(u32, &[bool], u64),
    ) -> Result<FetchReport> {
        let (signed, manifest) = self.manifest(spec).await?;
        let id = signed.id();
        on_manifest(&manifest);
        let download = Download {
            endpoint: self.endpoint.clone(),
            store: self.store.clone(),
            stagers: self.stagers.clone(),
            origin: self.origin(),
            metrics: self.metrics.clone(),
            site: self.identity.site().as_str().to_owned(),
            seed: u64::from_le_bytes(
                self.identity.node_id().as_bytes()[..8]
                    .try_into()
                    .unwrap_or([0; 8]),
            ),
        };
        let moved = download.run(&manifest, peers, on_piece).await?;
        let store = self.store.clone();
        tokio::task::block_in_place(|| -> Result<()> {
            bundles::pin_bundle(&store, &id, &manifest)?;
            store.put_manifest(&signed)?;
            Ok(())
        })?;
        Ok(FetchReport {
            id,
            manifest,
            bytes_received: moved.bytes_received,
            bytes_from_peers: moved.bytes_from_peers,
            chunks_present: moved.pieces_present as usize,
        })
    }
}

/// The site's stagers an edge uses: the `configured` ones (`--stager`) first, then those the
/// origin named at enrollment that are not among them. An enrolled address that does not
/// parse is left out with a warning.
pub fn site_stagers(configured: &[SocketAddr], identity: &NodeIdentity) -> Vec<SocketAddr> {
    let mut stagers = configured.to_vec();
    for text in identity.stagers() {
        match text.parse::<SocketAddr>() {
            Ok(addr) if !stagers.contains(&addr) => stagers.push(addr),
            Ok(_) => {}
            Err(error) => tracing::warn!(
                stager = %text,
                %error,
                "a stager named at enrollment is not a host:port address; left out"
            ),
        }
    }
    stagers
}

/// Fetches `spec` into the store under `dir` from `stagers`, then the origin (no peers).
pub async fn fetch(
    dir: &Path,
    spec: &BundleSpec,
    stagers: &[SocketAddr],
    show_progress: bool,
) -> Result<FetchReport> {
    let node = Node::open(dir, stagers, Metrics::new())?;
    let bar = if show_progress {
        progress_bar(0)
    } else {
        ProgressBar::hidden()
    };
    let report = node
        .fetch(
            spec,
            None,
            |manifest| {
                bar.set_length(manifest.total_stored_bytes);
                bar.set_message(format!("{}@{}", manifest.name, manifest.version));
            },
            |_, _, done| bar.set_position(done),
        )
        .await?;
    bar.finish_and_clear();
    node.endpoint.close(0u32.into(), b"done");
    Ok(report)
}

/// Asks this edge's daemon to fetch `bundle` and shows its progress. `Ok(None)` when the
/// daemon does not answer (it left its address file behind when it died).
pub async fn fetch_via_daemon(
    dir: &Path,
    daemon: &DaemonReady,
    bundle: &str,
    show_progress: bool,
) -> Result<Option<proto::wire::FetchSummary>> {
    use proto::wire::{Request, Response};
    let identity = NodeIdentity::load(&identity_dir(dir))?;
    let addr: SocketAddr = daemon
        .mesh
        .parse()
        .with_context(|| format!("bad daemon address {:?}", daemon.mesh))?;
    let endpoint = client_endpoint(&identity)?;
    let conn = match connect(&endpoint, addr).await {
        Ok(conn) => conn,
        Err(error) => {
            tracing::warn!(daemon = %addr, %error, "the daemon does not answer; fetching without it");
            return Ok(None);
        }
    };
    let mut recv = proto::net::send_request(
        &conn,
        &Request::Fetch {
            bundle: bundle.to_owned(),
        },
    )
    .await?;
    let bar = if show_progress {
        progress_bar(0)
    } else {
        ProgressBar::hidden()
    };
    let result = loop {
        let frame: Option<Response> =
            proto::net::read_frame(&mut recv, proto::wire::MAX_FRAME_BYTES).await?;
        match frame {
            Some(Response::FetchProgress {
                done_bytes,
                total_bytes,
            }) => {
                bar.set_length(total_bytes);
                bar.set_position(done_bytes);
            }
            Some(Response::Fetched(summary)) => break Ok(summary),
            Some(Response::Error { code, message }) => {
                break Err(anyhow::anyhow!(
                    "the daemon could not fetch {bundle} ({code:?}): {message}"
                ))
            }
            Some(other) => {
                break Err(anyhow::anyhow!(
                    "unexpected answer from the daemon: {other:?}"
                ))
            }
            None => {
                break Err(anyhow::anyhow!(
                    "the daemon closed the stream without an answer"
                ))
            }
        }
    };
    bar.finish_and_clear();
    conn.close(0u32.into(), b"done");
    endpoint.close(0u32.into(), b"done");
    result.map(Some)
}

/// A byte progress bar for a download of `total` bytes.
pub fn progress_bar(total: u64) -> ProgressBar {
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar
}

/// Unpacks bundle `manifest` from the store under `dir` into `to`.
pub fn unpack_to(dir: &Path, manifest: &Manifest, to: &Path, show_progress: bool) -> Result<()> {
    let store = open_store(dir)?;
    let keys = crate::keys::load(dir)?;
    // A missing or wrong key fails here, before `to` is created.
    let unsealed = proto::pack::unseal(manifest, &keys)
        .with_context(|| format!("cannot unpack into {}", to.display()))?;
    let total = proto::pack::raw_bytes_total(manifest, unsealed.as_ref());
    let bar = if show_progress {
        ProgressBar::new(total)
    } else {
        ProgressBar::hidden()
    };
    proto::pack::unpack_with(manifest, &keys, &store, to, &mut |p| {
        bar.set_position(p.raw_bytes_done)
    })
    .with_context(|| format!("cannot unpack into {}", to.display()))?;
    bar.finish_and_clear();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundle_specs_parse() {
        let id = proto::BlobHash::of(b"x");
        assert_eq!(id.to_string().parse::<BundleSpec>(), Ok(BundleSpec::Id(id)));
        assert_eq!(
            "base@1.2".parse::<BundleSpec>(),
            Ok(BundleSpec::Name {
                name: "base".into(),
                version: Some("1.2".into())
            })
        );
        assert_eq!(
            "base".parse::<BundleSpec>(),
            Ok(BundleSpec::Name {
                name: "base".into(),
                version: None
            })
        );
        assert!("".parse::<BundleSpec>().is_err());
    }
}
