//! Bundles replicated between the origins that share a store (issue 14).
//!
//! The package table in the shared store lists every published bundle; an origin that lacks
//! one in its own blob store pulls it from another origin that is up (the origins the store
//! lists as live), with the mesh's verified protocol, as a stager does: the manifest checked
//! against the publisher's key, every 16 KiB group of every blob verified before it is
//! written, and a partial blob resumed. Then it pins the bundle, adds it to its catalog and
//! tells its subscribed stagers, as a publish does. It looks at start (catching up on what was
//! published while it was down) and every [`INTERVAL`].

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use proto::manifest::BundleId;
use proto::metrics::Counter;
use proto::transfer::fetch::{fetch_blob, fetch_manifest, list_bundles};
use proto::transfer::PeerCounters;
use proto::wire::BundleInfo;

use crate::server::Origin;

/// How often an origin looks for bundles it lacks.
pub const INTERVAL: Duration = Duration::from_secs(2);

/// Runs [`replicate_once`] at start and every [`INTERVAL`], for as long as the origin serves.
pub fn spawn(origin: Arc<Origin>, endpoint: quinn::Endpoint, me: String) {
    let replicated = origin.metrics().counter(
        "stagecoach_origin_replicated_bundles_total",
        "Bundles this origin pulled from another origin, verified",
        &[],
    );
    let failures = origin.metrics().counter(
        "stagecoach_origin_replication_failures_total",
        "Attempts to pull a bundle from another origin that failed",
        &[],
    );
    let lacking = origin.metrics().gauge(
        "stagecoach_origin_bundles_lacking",
        "Published bundles (in the package table) this origin does not hold yet: its replication lag",
        &[],
    );
    let counters = PeerCounters::new(origin.metrics(), "origin", "origin");
    tokio::spawn(async move {
        loop {
            let outcome =
                replicate_once(&origin, &endpoint, &me, &counters, &replicated, &lacking).await;
            match outcome {
                Ok(_) => {}
                Err(error) => {
                    failures.inc();
                    tracing::warn!(error = %format!("{error:#}"), "replication: will try again");
                }
            }
            tokio::time::sleep(INTERVAL).await;
        }
    });
}

/// Pulls every bundle of the package table this origin lacks from the other origins up;
/// returns how many it pulled. A bundle no live origin holds is left for the next round.
pub async fn replicate_once(
    origin: &Origin,
    endpoint: &quinn::Endpoint,
    me: &str,
    counters: &PeerCounters,
    replicated: &Counter,
    lacking: &Counter,
) -> Result<usize> {
    let db = origin.control().db();
    // The catalog is what this origin serves (a publish and a pull both end by adding to it).
    let held: HashSet<BundleId> = origin.catalog().all().iter().map(|i| i.id).collect();
    let missing: Vec<BundleId> = tokio::task::block_in_place(|| db.packages())?
        .into_iter()
        .map(|package| package.id)
        .filter(|id| !held.contains(id))
        .collect();
    lacking.set(missing.len() as u64);
    if missing.is_empty() {
        return Ok(0);
    }
    // A publish here whose record committed after its answer (the store timed out, then
    // recovered) left its chunks and manifest in this store: list it from them.
    let mut missing_elsewhere = Vec::new();
    for id in missing {
        match tokio::task::block_in_place(|| adopt_local(origin, &id)) {
            Ok(true) => {
                tracing::info!(bundle = %id, "replication: a recorded bundle whose bytes are here is listed");
            }
            Ok(false) => missing_elsewhere.push(id),
            Err(error) => {
                tracing::warn!(bundle = %id, error = format!("{error:#}"), "replication: cannot list a bundle from this store");
                missing_elsewhere.push(id);
            }
        }
    }
    let missing = missing_elsewhere;
    lacking.set(missing.len() as u64);
    if missing.is_empty() {
        return Ok(0);
    }
    let others: Vec<_> = tokio::task::block_in_place(|| db.origins())?
        .into_iter()
        .filter(|o| o.node_id != me)
        .collect();
    let mut pulled = 0;
    let mut left: Vec<BundleId> = missing;
    for other in others {
        if left.is_empty() {
            break;
        }
        let addr: SocketAddr = match other.mesh.parse() {
            Ok(addr) => addr,
            Err(_) => {
                tracing::warn!(origin = %other.node_id, mesh = %other.mesh, "replication: an origin announced an address that does not parse");
                continue;
            }
        };
        let conn = match proto::net::connect(endpoint, addr).await {
            Ok(conn) => conn,
            Err(error) => {
                tracing::warn!(origin = %other.node_id, %addr, %error, "replication: cannot reach an origin");
                continue;
            }
        };
        let listed: HashMap<BundleId, BundleInfo> = match list_bundles(&conn).await {
            Ok(list) => list.into_iter().map(|info| (info.id, info)).collect(),
            Err(error) => {
                tracing::warn!(origin = %other.node_id, %addr, %error, "replication: cannot list an origin's bundles");
                continue;
            }
        };
        let mut still = Vec::new();
        for id in left {
            let Some(info) = listed.get(&id) else {
                still.push(id);
                continue;
            };
            let started = std::time::Instant::now();
            let bytes = pull(origin, &conn, info, counters)
                .await
                .with_context(|| format!("pull {}@{} from {addr}", info.name, info.version))?;
            replicated.inc();
            pulled += 1;
            lacking.set(lacking.get().saturating_sub(1));
            tracing::info!(bundle = %id, name = %info.name, version = %info.version, from = %addr, bytes, secs = started.elapsed().as_secs_f64(), "replication: bundle pulled from another origin, verified");
        }
        left = still;
    }
    Ok(pulled)
}

/// Lists bundle `id` of the package table from this origin's own store when its manifest
/// (verified against the publisher key) and every chunk are here; `false` when they are not.
fn adopt_local(origin: &Origin, id: &BundleId) -> Result<bool> {
    let Some(signed) = origin.store().get_manifest(id)? else {
        return Ok(false);
    };
    let manifest = signed
        .verify_as(*id, &[*origin.publisher_key()])
        .context("the stored manifest does not verify")?;
    if manifest
        .chunks
        .iter()
        .any(|chunk| !origin.store().has_blob(&chunk.hash))
    {
        return Ok(false);
    }
    let info = origin.bundle_info(*id, &manifest);
    origin.add_bundle(signed, &manifest, info)?;
    Ok(true)
}

/// Pulls one bundle over `conn`: manifest, then every blob the store lacks (verified group by
/// group), then pins it and adds it to the catalog. Returns the bytes received.
async fn pull(
    origin: &Origin,
    conn: &quinn::Connection,
    info: &BundleInfo,
    counters: &PeerCounters,
) -> Result<u64> {
    let (signed, manifest) = fetch_manifest(conn, info.id, &[*origin.publisher_key()]).await?;
    let mut bytes = 0;
    for chunk in &manifest.chunks {
        bytes += fetch_blob(
            conn,
            origin.store(),
            chunk.hash,
            chunk.stored_bytes,
            counters,
            None,
        )
        .await?;
    }
    origin.add_bundle(signed, &manifest, info.clone())?;
    Ok(bytes)
}
