//! The content keys this edge may read (issue 16), kept in `identity/content-keys.bin`
//! (mode 0600, beside the node's certificate and key, so it lives in the machine's storage
//! area and a swap carries it like the identity).
//!
//! The keys come from the origin only, asked directly over mutual TLS
//! ([`Request::ContentKeys`]), never through a stager: QUIC's TLS ends at every hop, so a
//! relaying stager would see them. [`refresh`] asks and replaces the ring with the answer
//! (only when it changed): generations the origin no longer lists (retired, or the class lost
//! the right) are dropped, and a revoked node drops every key. It runs at enrollment, at every
//! daemon start, every [`DEFAULT_REFRESH_INTERVAL`] (`edge-agent serve --keys-refresh-secs`),
//! and whenever the data path meets a bundle of a generation the ring lacks.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Result};
use proto::keyring::{self, KEYRING_FILE};
use proto::keys::{KeyGeneration, KeyRing};
use proto::net::{call, connect, NodeIdentity};
use proto::wire::{ErrorCode, Request, Response, MAX_FRAME_BYTES};
use quinn::Endpoint;

use crate::state;

/// How often a running daemon asks the origin for its keys.
pub const DEFAULT_REFRESH_INTERVAL: Duration = Duration::from_secs(300);

/// How long one ask may take, connection included.
pub const REFRESH_TIMEOUT: Duration = Duration::from_secs(30);

/// The key ring of the edge whose state directory is `dir`.
pub fn ring_path(dir: &Path) -> PathBuf {
    state::identity_dir(dir).join(KEYRING_FILE)
}

/// The keys this edge holds (an empty ring before the origin gave any).
pub fn load(dir: &Path) -> Result<KeyRing> {
    Ok(keyring::load(&ring_path(dir))?)
}

/// What a refresh changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Refreshed {
    /// Every generation held now, oldest first.
    pub generations: Vec<KeyGeneration>,
    /// Generations the origin gave that were not held.
    pub added: Vec<KeyGeneration>,
    /// Generations held that the origin no longer lists (retired, or no longer readable).
    pub dropped: Vec<KeyGeneration>,
}

impl Refreshed {
    /// Whether the ring on disk changed.
    pub fn changed(&self) -> bool {
        !self.added.is_empty() || !self.dropped.is_empty()
    }
}

/// Asks the origin (directly, with this node's certificate on `endpoint`) for the key
/// generations this node may read, and makes the ring under `dir` exactly that. A revoked node
/// is refused and drops every key it held; any other failure leaves the ring as it was.
pub async fn refresh(
    endpoint: &Endpoint,
    identity: &NodeIdentity,
    dir: &Path,
) -> Result<Refreshed> {
    let origins: Vec<SocketAddr> = identity
        .origin_addrs()
        .iter()
        .filter_map(|addr| addr.parse().ok())
        .collect();
    if origins.is_empty() {
        bail!(
            "this node's identity names no origin address ({:?})",
            identity.origin_addr()
        );
    }
    // The origin enrolled with first, then the others up at enrollment.
    let mut failures = Vec::new();
    let mut answered = None;
    for origin in origins {
        let asked = tokio::time::timeout(REFRESH_TIMEOUT, async {
            let conn = connect(endpoint, origin).await?;
            let answer: Result<Response, proto::net::NetError> =
                call(&conn, &Request::ContentKeys, MAX_FRAME_BYTES).await;
            conn.close(0u32.into(), b"done");
            answer
        })
        .await;
        match asked {
            Ok(Ok(answer)) => {
                answered = Some((origin, answer));
                break;
            }
            Ok(Err(error)) => failures.push(format!("origin {origin}: {error}")),
            Err(_) => failures.push(format!(
                "origin {origin} did not answer within {REFRESH_TIMEOUT:?}"
            )),
        }
    }
    let Some((origin, answer)) = answered else {
        bail!("cannot ask for content keys: {}", failures.join("; "));
    };
    let path = ring_path(dir);
    let held = keyring::load(&path)?;
    let given = match answer {
        Response::ContentKeys { generations } => {
            let mut ring = KeyRing::new();
            for (generation, key) in generations {
                ring.insert(generation, key)?;
            }
            ring
        }
        Response::Error {
            code: ErrorCode::Forbidden,
            message,
        } => {
            if !held.is_empty() {
                keyring::save(&path, &KeyRing::new())?;
                tracing::warn!(
                    dropped = ?held.generations().map(|g| g.0).collect::<Vec<_>>(),
                    "the origin refused content keys; every key held was dropped"
                );
            }
            bail!("the origin {origin} refused content keys: {message}");
        }
        Response::Error { code, message } => {
            bail!("the origin {origin} gave no content keys ({code:?}): {message}")
        }
        other => bail!(
            "the origin {origin} answered a content-key request with {}",
            response_name(&other)
        ),
    };
    let refreshed = Refreshed {
        generations: given.generations().collect(),
        added: given
            .generations()
            .filter(|g| held.get(*g).is_err())
            .collect(),
        dropped: held
            .generations()
            .filter(|g| given.get(*g).is_err())
            .collect(),
    };
    // A key replaced under the same generation counts as a change too.
    if given != held {
        keyring::save(&path, &given)?;
    }
    if refreshed.changed() {
        tracing::info!(
            generations = ?refreshed.generations.iter().map(|g| g.0).collect::<Vec<_>>(),
            added = ?refreshed.added.iter().map(|g| g.0).collect::<Vec<_>>(),
            dropped = ?refreshed.dropped.iter().map(|g| g.0).collect::<Vec<_>>(),
            "content keys refreshed"
        );
    } else if given.is_empty() {
        tracing::debug!(
            "the origin gives this node no content key (its class may not read encrypted bundles)"
        );
    }
    Ok(refreshed)
}

/// The ring to open a bundle sealed with `generation` (`None` for a clear bundle) with: this
/// edge's ring, refreshed once from the origin when it lacks that generation. Whether the key
/// is there after that is for the unpack to say: its error names the generation, and it
/// writes nothing.
pub async fn ring_for(
    endpoint: &Endpoint,
    identity: &NodeIdentity,
    dir: &Path,
    generation: Option<KeyGeneration>,
) -> Result<KeyRing> {
    let ring = load(dir)?;
    let Some(generation) = generation else {
        return Ok(ring);
    };
    if ring.get(generation).is_ok() {
        return Ok(ring);
    }
    if let Err(error) = refresh(endpoint, identity, dir).await {
        tracing::warn!(%generation, error = format!("{error:#}"), "this node lacks a key generation and could not refresh its keys");
    }
    load(dir)
}

/// The variant of an unexpected answer, without its fields (a key must never reach a log).
fn response_name(response: &Response) -> String {
    let shown = format!("{response:?}");
    shown
        .split(|c: char| !c.is_alphanumeric())
        .next()
        .unwrap_or("an unknown answer")
        .to_owned()
}
