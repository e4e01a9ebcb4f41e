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
    // Once both bundles are fetched the machine may reboot: a stream that breaks from then on
    // is the machine going down, and the answer comes from its journal after the boot.
    let mut fetched = 0;
    loop {
        let frame: Option<Response> = match read_frame(&mut recv, MAX_FRAME_BYTES).await {
            Ok(frame) => frame,
            Err(error) if fetched >= 2 => {
                tracing::info!(%edge, error = %error, "the edge went away during its swap; asking its journal after the reboot");
                return await_rebooted_swap(endpoint, edge, target, bar, "swapping").await;
            }
            Err(error) => return Err(error.into()),
        };
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
                fetched += 1;
                bar.set_message(format!(
                    "fetched {}@{}; swapping",
                    summary.name, summary.version
                ));
            }
            Some(Response::Swapped { outcome, failure }) => return Ok((outcome, failure)),
            Some(Response::SwapPending { step }) => {
                return await_rebooted_swap(endpoint, edge, target, bar, &step).await
            }
            Some(Response::Error {
                code: proto::wire::ErrorCode::Busy,
                message,
            }) => return Err(EdgeBusy(message).into()),
            Some(Response::Error { code, message }) => {
                return Err(anyhow!("the edge refused ({code:?}): {message}"))
            }
            Some(other) => return Err(anyhow!("unexpected answer from the edge: {other:?}")),
            None if fetched >= 2 => {
                return await_rebooted_swap(endpoint, edge, target, bar, "swapping").await
            }
            None => return Err(anyhow!("the edge closed the stream without an answer")),
        }
    }
}

/// The edge refused a swap because another one runs there.
#[derive(Debug, thiserror::Error)]
#[error("the edge refused: {0}")]
pub struct EdgeBusy(pub String);

/// Goes on with a swap to `target` that another origin may have asked for before it died
/// (a rollout taken over): the edge's journal answers first, so a swap that ended is not run
/// again and one under way is waited for; only an edge with no swap to `target` on record is
/// asked to swap. An edge busy with a swap (one still fetching its bundles for the dead
/// origin) is asked again until its journal shows it.
pub async fn resume_swap(
    endpoint: &quinn::Endpoint,
    edge: SocketAddr,
    target: BundleId,
    rescue: BundleId,
) -> Result<(String, Option<String>)> {
    let started = std::time::Instant::now();
    let mut last = String::from("no answer yet");
    while started.elapsed() < SWAP_REBOOT_DEADLINE {
        match ask_swap_status(endpoint, edge, target).await {
            Ok(Response::Swapped { outcome, failure }) => {
                tracing::info!(%edge, %target, %outcome, "the edge's swap ended under the previous driver; not swapping again");
                return Ok((outcome, failure));
            }
            Ok(Response::SwapPending { step }) => last = format!("swapping ({step})"),
            // No swap to `target` on record: it never started.
            Ok(Response::Error { .. }) => {
                match swap_one(endpoint, edge, target, rescue, &ProgressBar::hidden()).await {
                    Err(error) if error.downcast_ref::<EdgeBusy>().is_some() => {
                        last = format!("{error:#}")
                    }
                    other => return other,
                }
            }
            Ok(other) => return Err(anyhow!("unexpected answer from the edge: {other:?}")),
            Err(error) => last = format!("{error:#}"),
        }
        tokio::time::sleep(SWAP_STATUS_POLL).await;
    }
    Err(anyhow!(
        "the swap under way when the rollout changed hands did not end within {} s ({last})",
        SWAP_REBOOT_DEADLINE.as_secs()
    ))
}

/// How often a rebooting machine's daemon is asked how its swap stands.
pub const SWAP_STATUS_POLL: Duration = Duration::from_secs(2);

/// Longest a machine may take to finish a swap once it rebooted (its reboots, unpacking on
/// slow disks, every trial boot): past it, the swap counts as failed for the rollout.
pub const SWAP_REBOOT_DEADLINE: Duration = Duration::from_secs(30 * 60);

/// Waits for a machine that reboots during its swap: asks its daemon, once it is back, how
/// the swap to `target` stands ([`Request::SwapStatus`]) until the journal reached an end.
async fn await_rebooted_swap(
    endpoint: &quinn::Endpoint,
    edge: SocketAddr,
    target: BundleId,
    bar: &ProgressBar,
    step: &str,
) -> Result<(String, Option<String>)> {
    let started = std::time::Instant::now();
    let mut step = step.to_owned();
    let mut last_error = String::from("no answer yet");
    loop {
        bar.set_message(format!(
            "rebooting ({step}), {:.0} s",
            started.elapsed().as_secs_f64()
        ));
        if started.elapsed() > SWAP_REBOOT_DEADLINE {
            return Err(anyhow!(
                "the machine did not finish its swap within {} s of rebooting (last: {step}; {last_error})",
                SWAP_REBOOT_DEADLINE.as_secs()
            ));
        }
        match ask_swap_status(endpoint, edge, target).await {
            Ok(Response::Swapped { outcome, failure }) => return Ok((outcome, failure)),
            Ok(Response::SwapPending { step: now }) => step = now,
            Ok(Response::Error { code, message }) => {
                return Err(anyhow!(
                    "the edge answered about its swap after the reboot ({code:?}): {message}"
                ))
            }
            Ok(other) => return Err(anyhow!("unexpected answer from the edge: {other:?}")),
            // Down, booting, or its daemon not started yet: ask again.
            Err(error) => last_error = format!("{error:#}"),
        }
        tokio::time::sleep(SWAP_STATUS_POLL).await;
    }
}

async fn ask_swap_status(
    endpoint: &quinn::Endpoint,
    edge: SocketAddr,
    target: BundleId,
) -> Result<Response> {
    let conn = connect(endpoint, edge).await?;
    let mut recv = send_request(&conn, &Request::SwapStatus { target }).await?;
    read_frame::<Response>(&mut recv, MAX_FRAME_BYTES)
        .await?
        .ok_or_else(|| anyhow!("the edge closed the stream without an answer"))
}
