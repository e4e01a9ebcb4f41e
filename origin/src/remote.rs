//! Commands the origin sends to edge agents over the mesh's mutual-TLS channel: `origin swap`.
//!
//! The origin connects to each edge's daemon with its own certificate (role `origin`), which
//! is the only role an edge accepts a swap from. The edge fetches both bundles from its site
//! (stagers and peers), verifies them, swaps, and answers how the swap ended.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use proto::manifest::BundleId;
use proto::net::{client_endpoint, connect, read_frame, send_request, NodeIdentity};
use proto::wire::{Request, Response, MAX_FRAME_BYTES};

use crate::home::OriginHome;

/// How one edge's swap ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EdgeSwap {
    /// The edge's daemon address.
    pub edge: SocketAddr,
    /// `Ok((outcome, failure))` as the edge reported it, or why asking failed.
    pub result: Result<(String, Option<String>), String>,
}

impl EdgeSwap {
    /// True when the edge runs the new OS.
    pub fn succeeded(&self) -> bool {
        matches!(&self.result, Ok((_, None)))
    }
}

/// Resolves `spec` (a bundle id, `NAME@VERSION` or `NAME`) against the running origin.
pub async fn resolve_bundle(home: &OriginHome, spec: &str) -> Result<BundleId> {
    if let Ok(id) = spec.parse::<BundleId>() {
        return Ok(id);
    }
    let (name, version) = match spec.split_once('@') {
        Some((name, version)) => (name, Some(version)),
        None => (spec, None),
    };
    let identity = home.publisher_identity()?;
    let endpoint = client_endpoint(&identity)?;
    let conn = connect(&endpoint, home.mesh_addr()?).await.context(
        "cannot reach the running origin to resolve the bundle (is `origin serve` running?)",
    )?;
    let info = proto::transfer::fetch::resolve(&conn, name, version)
        .await
        .with_context(|| format!("cannot resolve {spec}"))?;
    Ok(info.id)
}

/// Asks every edge in `edges` to swap to `target` with `rescue`, all at once, and waits for
/// each to answer. Progress shows per edge unless `show_progress` is off.
pub async fn swap_edges(
    identity: &NodeIdentity,
    edges: &[SocketAddr],
    target: BundleId,
    rescue: BundleId,
    show_progress: bool,
) -> Result<Vec<EdgeSwap>> {
    let endpoint = client_endpoint(identity)?;
    let bars = MultiProgress::new();
    if !show_progress {
        bars.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let style = ProgressStyle::with_template("{prefix:>21} {spinner} {wide_msg}")
        .map_err(|e| anyhow!("bad progress template: {e}"))?;
    let mut tasks = tokio::task::JoinSet::new();
    for &edge in edges {
        let bar = bars.add(ProgressBar::new_spinner());
        bar.set_style(style.clone());
        bar.set_prefix(edge.to_string());
        bar.enable_steady_tick(Duration::from_millis(200));
        let endpoint = endpoint.clone();
        tasks.spawn(async move {
            let result = swap_one(&endpoint, edge, target, rescue, &bar)
                .await
                .map_err(|e| format!("{e:#}"));
            match &result {
                Ok((outcome, None)) => bar.finish_with_message(outcome.clone()),
                Ok((outcome, Some(why))) => bar.finish_with_message(format!("{outcome}: {why}")),
                Err(e) => bar.finish_with_message(format!("error: {e}")),
            }
            EdgeSwap { edge, result }
        });
    }
    let mut results = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        results.push(joined.context("a swap task failed")?);
    }
    results.sort_by_key(|r| r.edge);
    Ok(results)
}

/// Asks one edge to swap to `target` with `rescue` and waits for its answer: `(outcome, None)`
/// when it runs the new OS, `(outcome, Some(why))` when it rolled back.
pub async fn swap_edge(
    endpoint: &quinn::Endpoint,
    edge: SocketAddr,
    target: BundleId,
    rescue: BundleId,
) -> Result<(String, Option<String>)> {
    swap_one(endpoint, edge, target, rescue, &ProgressBar::hidden()).await
}

async fn swap_one(
    endpoint: &quinn::Endpoint,
    edge: SocketAddr,
    target: BundleId,
    rescue: BundleId,
    bar: &ProgressBar,
) -> Result<(String, Option<String>)> {
    bar.set_message("connecting");
    let conn = connect(endpoint, edge)
        .await
        .with_context(|| format!("cannot reach the edge daemon at {edge}"))?;
    let mut recv = send_request(&conn, &Request::StartSwap { target, rescue }).await?;
    bar.set_message("fetching the bundles");
    loop {
        let frame: Option<Response> = read_frame(&mut recv, MAX_FRAME_BYTES).await?;
        match frame {
            Some(Response::FetchProgress {
                done_bytes,
                total_bytes,
            }) => {
                bar.set_message(format!(
                    "fetching: {:.1} of {:.1} MiB",
                    done_bytes as f64 / 1048576.0,
                    total_bytes as f64 / 1048576.0
                ));
            }
            Some(Response::Fetched(summary)) => {
                bar.set_message(format!(
                    "fetched {}@{}; swapping",
                    summary.name, summary.version
                ));
            }
            Some(Response::Swapped { outcome, failure }) => return Ok((outcome, failure)),
            Some(Response::Error { code, message }) => {
                return Err(anyhow!("the edge refused ({code:?}): {message}"))
            }
            Some(other) => return Err(anyhow!("unexpected answer from the edge: {other:?}")),
            None => return Err(anyhow!("the edge closed the stream without an answer")),
        }
    }
}
