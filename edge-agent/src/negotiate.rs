//! Reporting to the origin and boot-time negotiation (brief 002), edge side.
//!
//! At enrollment and at every start the edge reports its [`Inventory`](proto::inventory::Inventory)
//! (with the role, class and features its operator configured), the bundles it has installed
//! and holds, and its daemon's address. At start it also negotiates: the origin answers "boot as
//! you are", the bundles to fetch, or "no image". The edge fetches only the bundles that differ
//! (through the normal verified fetch path), records them as installed in [`INSTALLED_FILE`](crate::state::INSTALLED_FILE),
//! and reports again.
//!
//! Reports go to the site's stagers in order (a stager passes them on with the edge's id from
//! its certificate) and to the origin directly when no stager answers.
//!
//! Test mode keeps its bundles under [`TMP_DIR`](crate::state::TMP_DIR), which every start
//! purges, and never in [`INSTALLED_FILE`](crate::state::INSTALLED_FILE).

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use proto::bundles;
use proto::manifest::BundleId;
use proto::net::{call, connect};
use proto::wire::{
    BootPlan, FetchSummary, NegotiationOutcome, NodeBundle, NodeReport, ReportEvent, Request,
    Response, MAX_FRAME_BYTES, MAX_NODE_BUNDLES,
};

use crate::fetch::{BundleSpec, Node};
use crate::inventory::{self, Configured};
use crate::state::{load_installed, save_installed, NodeConfig};

/// This node's inventory facts, with what its operator configured and its site.
pub fn collect_inventory(
    identity: &proto::net::NodeIdentity,
    config: &NodeConfig,
) -> proto::inventory::Inventory {
    let root = config
        .inventory_root
        .clone()
        .unwrap_or_else(|| PathBuf::from(inventory::HOST_ROOT));
    inventory::collect(
        &root,
        Configured {
            role: config.role.clone(),
            class: config.class.clone(),
            site: Some(identity.site().as_str().to_owned()),
            features: config.features.clone(),
        },
    )
}

/// What this node reports now.
pub fn build_report(
    node: &Node,
    dir: &Path,
    config: &NodeConfig,
    event: ReportEvent,
    data_addr: &str,
) -> Result<NodeReport> {
    let inventory = collect_inventory(&node.identity, config);
    let trusted = [*node.identity.publisher_key()];
    let mut held = Vec::new();
    for signed in node.store.list_manifests()? {
        let id = signed.id();
        if let Ok(manifest) = signed.verify_as(id, &trusted) {
            if bundles::has_all_chunks(&node.store, &manifest) {
                held.push(NodeBundle {
                    name: manifest.name.clone(),
                    version: manifest.version.clone(),
                    id,
                });
            }
        }
    }
    held.sort();
    held.truncate(MAX_NODE_BUNDLES);
    // Only what the store still holds whole counts as installed.
    let installed: Vec<NodeBundle> = load_installed(dir)?
        .into_iter()
        .filter(|bundle| {
            let whole = held.iter().any(|h| h.id == bundle.id);
            if !whole {
                tracing::warn!(bundle = %bundle, id = %bundle.id, "an installed bundle is no longer whole in the store; not reported");
            }
            whole
        })
        .take(MAX_NODE_BUNDLES)
        .collect();
    Ok(NodeReport {
        event,
        inventory,
        installed,
        held,
        data_addr: data_addr.to_owned(),
    })
}

/// Sends `report` to the first stager that takes it, else to the origin. Returns the answer
/// and who gave it.
pub async fn send_report(
    node: &Node,
    report: &NodeReport,
    negotiate: bool,
) -> Result<(Response, String)> {
    let request = Request::ReportNode {
        report: report.clone(),
        negotiate,
    };
    let sources = upstreams(node);
    let mut errors = Vec::new();
    for (addr, role) in sources {
        let conn = match connect(&node.endpoint, addr).await {
            Ok(conn) => conn,
            Err(error) => {
                tracing::warn!(%addr, role, %error, "cannot reach; reporting elsewhere");
                errors.push(format!("{role} {addr}: {error}"));
                continue;
            }
        };
        let answer = call(&conn, &request, MAX_FRAME_BYTES).await;
        match answer {
            Ok(Response::Error { code, message }) => {
                tracing::warn!(%addr, role, ?code, message, "report refused; reporting elsewhere");
                errors.push(format!("{role} {addr}: {code:?}: {message}"));
            }
            Ok(response) => return Ok((response, format!("{role} {addr}"))),
            Err(error) => {
                tracing::warn!(%addr, role, %error, "report failed; reporting elsewhere");
                errors.push(format!("{role} {addr}: {error}"));
            }
        }
    }
    bail!(
        "no stager and not the origin took the report: {}",
        if errors.is_empty() {
            "no stager given and no origin address".to_owned()
        } else {
            errors.join("; ")
        }
    )
}

/// Where a node asks the control plane, in order: its stagers (which pass requests on), then
/// the origin it enrolled with, then the other origins up at its enrollment.
fn upstreams(node: &Node) -> Vec<(SocketAddr, &'static str)> {
    let mut sources: Vec<(SocketAddr, &'static str)> =
        node.stagers.iter().map(|addr| (*addr, "stager")).collect();
    for origin in node.identity.origin_addrs() {
        if let Ok(origin) = origin.parse::<SocketAddr>() {
            sources.push((origin, "origin"));
        }
    }
    sources
}

/// Asks the first stager that answers (it asks the origin), else the origin, which bundles
/// this node must keep. An error when none answers: the caller then keeps every pin it has.
pub async fn fetch_keep_set(node: &Node) -> Result<proto::wire::KeepSet> {
    let sources = upstreams(node);
    let mut errors = Vec::new();
    for (addr, role) in sources {
        let conn = match connect(&node.endpoint, addr).await {
            Ok(conn) => conn,
            Err(error) => {
                errors.push(format!("{role} {addr}: {error}"));
                continue;
            }
        };
        match proto::transfer::fetch::keep_set(&conn, &Request::KeepSet).await {
            Ok(keep) => return Ok(keep),
            Err(error) => errors.push(format!("{role} {addr}: {error}")),
        }
    }
    bail!(
        "no keep-set from a stager or the origin: {}",
        if errors.is_empty() {
            "no stager given and no origin address".to_owned()
        } else {
            errors.join("; ")
        }
    )
}

/// Reports without negotiating (at enrollment).
pub async fn report_only(node: &Node, report: &NodeReport) -> Result<String> {
    match send_report(node, report, false).await? {
        (Response::Ok, via) => Ok(via),
        (other, via) => Err(anyhow!("unexpected answer from {via}: {other:?}")),
    }
}

/// Fetches one bundle through the node's verified fetch path.
pub trait BundleFetcher {
    /// Fetches bundle `id` into the node's store.
    fn fetch_bundle(&self, id: BundleId) -> impl Future<Output = Result<FetchSummary>> + Send;
}

impl BundleFetcher for Node {
    async fn fetch_bundle(&self, id: BundleId) -> Result<FetchSummary> {
        let report = self
            .fetch(&BundleSpec::Id(id), None, |_| {}, |_, _, _| {})
            .await?;
        Ok(report.summary())
    }
}

/// Negotiates: reports (event `Started`), fetches what the origin's plan asks for, records it
/// as installed and reports again (`Updated`).
pub async fn negotiate(
    node: &Node,
    dir: &Path,
    config: &NodeConfig,
    data_addr: &str,
    fetcher: &impl BundleFetcher,
) -> Result<NegotiationOutcome> {
    let report = build_report(node, dir, config, ReportEvent::Started, data_addr)?;
    let (answer, via) = send_report(node, &report, true).await?;
    let plan = match answer {
        Response::BootPlan(plan) => plan,
        other => bail!("unexpected answer to the negotiation from {via}: {other:?}"),
    };
    let mut fetched = Vec::new();
    match &plan {
        BootPlan::BootAsYouAre { bundles } => {
            tracing::info!(via, bundles = %names(bundles), "negotiated: boot as you are");
        }
        BootPlan::NoImage { facts } => {
            tracing::warn!(via, facts = %facts.join(" "), "negotiated: no image matches this node (no rule for these facts)");
        }
        BootPlan::NoImageCapture { facts, name } => {
            tracing::warn!(via, facts = %facts.join(" "), name, "negotiated: no image matches this node; its class may capture one");
        }
        BootPlan::PolicyError { message } => {
            tracing::error!(
                via,
                message,
                "negotiated: the origin's policy cannot decide for this node"
            );
        }
        BootPlan::Fetch { fetch, keep, drop } => {
            tracing::info!(
                via,
                fetch = %fetch.iter().map(|p| format!("{} ({})", p.bundle, p.reason)).collect::<Vec<_>>().join(", "),
                keep = %names(keep),
                drop = %names(drop),
                "negotiated: fetching the bundles that differ"
            );
            let mut installed = keep.clone();
            for planned in fetch {
                let summary = fetcher
                    .fetch_bundle(planned.bundle.id)
                    .await
                    .with_context(|| {
                        format!("cannot fetch {} ({})", planned.bundle, planned.bundle.id)
                    })?;
                if summary.id != planned.bundle.id {
                    bail!(
                        "fetched {} but the origin named {}",
                        summary.id,
                        planned.bundle.id
                    );
                }
                tracing::info!(bundle = %planned.bundle, bytes = summary.bytes_received, "installed");
                installed.push(planned.bundle.clone());
                fetched.push(summary);
            }
            save_installed(dir, &installed)?;
            let after = build_report(node, dir, config, ReportEvent::Updated, data_addr)?;
            if let Err(error) = report_only(node, &after).await {
                tracing::warn!(
                    error = format!("{error:#}"),
                    "cannot report the installed bundles; the next start will"
                );
            }
        }
    }
    Ok(NegotiationOutcome { plan, fetched })
}

/// A human summary of a negotiation, for `edge-agent negotiate`.
pub fn describe(outcome: &NegotiationOutcome) -> String {
    let mut out = String::new();
    match &outcome.plan {
        BootPlan::BootAsYouAre { bundles } => {
            out.push_str(&format!("boot as you are: {}\n", names(bundles)));
        }
        BootPlan::NoImage { facts } => {
            out.push_str(&format!(
                "no image: no rule of the origin's policy matches this node (tried {})\n",
                facts.join(" ")
            ));
        }
        BootPlan::PolicyError { message } => {
            out.push_str(&format!(
                "the origin cannot decide for this node: {message}\n"
            ));
        }
        BootPlan::NoImageCapture { facts, name } => {
            out.push_str(&format!(
                "no image: no rule of the origin's policy matches this node (tried {}); its class may capture one as {name} (edge-agent capture)\n",
                facts.join(" ")
            ));
        }
        BootPlan::Fetch { fetch, keep, drop } => {
            out.push_str(&format!(
                "fetch {} bundle(s); keep {}; drop {}\n",
                fetch.len(),
                names(keep),
                names(drop)
            ));
            for planned in fetch {
                let got = outcome.fetched.iter().find(|f| f.id == planned.bundle.id);
                out.push_str(&format!(
                    "  {} ({}) {}: {}\n",
                    planned.bundle,
                    planned.bundle.id,
                    planned.reason,
                    match got {
                        Some(f) => format!(
                            "fetched, {} bytes received, {} of {} chunks already here",
                            f.bytes_received, f.chunks_present, f.chunks
                        ),
                        None => "not fetched".to_owned(),
                    }
                ));
            }
        }
    }
    out
}

/// True when the plan could not give the node an image.
pub fn is_failure(plan: &BootPlan) -> bool {
    matches!(
        plan,
        BootPlan::NoImage { .. } | BootPlan::PolicyError { .. } | BootPlan::NoImageCapture { .. }
    )
}

fn names(bundles: &[NodeBundle]) -> String {
    if bundles.is_empty() {
        return "none".into();
    }
    bundles
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}
