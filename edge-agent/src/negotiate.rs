//! Reporting to the origin and boot-time negotiation (seed 002), edge side.
//!
//! At enrollment and at every start the edge reports its [`Inventory`](proto::inventory::Inventory)
//! (with the role, class and features its operator configured), the bundles it has installed
//! and holds, and its daemon's address. At start it also negotiates: the origin answers "boot as
//! you are", the bundles to fetch, or "no image". The edge fetches only the bundles that differ
//! (through the normal verified fetch path), records them as installed in [`INSTALLED_FILE`],
//! and reports again.
//!
//! Reports go to the site's stagers in order (a stager passes them on with the edge's id from
//! its certificate) and to the origin directly when no stager answers.
//!
//! Test mode keeps its bundles under [`TMP_DIR`], which every start purges, and never in
//! [`INSTALLED_FILE`].

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
use serde::{Deserialize, Serialize};

use crate::fetch::{BundleSpec, Node};
use crate::inventory::{self, Configured};

/// What the operator configured for this node, kept in the edge's directory.
pub const CONFIG_FILE: &str = "node.json";

/// The bundles this node has installed (what it boots with).
pub const INSTALLED_FILE: &str = "installed.json";

/// Temporary area (test mode); purged at every start.
pub const TMP_DIR: &str = "tmp";

/// What an operator configured: the role, class and features reported with the inventory,
/// and where `/proc` and `/sys` are read (`/` on a real machine).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct NodeConfig {
    /// Role, e.g. `web`.
    pub role: Option<String>,
    /// Class, e.g. `edge-cache`.
    pub class: Option<String>,
    /// Features the node asks for (seed 002).
    pub features: Vec<String>,
    /// Root of `/proc` and `/sys` (default `/`).
    pub inventory_root: Option<PathBuf>,
}

impl NodeConfig {
    /// The configuration saved under `dir` (the default when none is).
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join(CONFIG_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .with_context(|| format!("{} is malformed; fix or remove it", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
        }
    }

    /// The saved configuration with what was given on the command line on top; saved back
    /// when anything was given, so later starts report the same.
    pub fn load_with(dir: &Path, given: NodeConfig) -> Result<Self> {
        let mut config = Self::load(dir)?;
        let mut changed = false;
        if given.role.is_some() {
            config.role = given.role;
            changed = true;
        }
        if given.class.is_some() {
            config.class = given.class;
            changed = true;
        }
        if !given.features.is_empty() {
            config.features = given.features;
            changed = true;
        }
        if given.inventory_root.is_some() {
            config.inventory_root = given.inventory_root;
            changed = true;
        }
        if changed {
            crate::daemon::write_json_atomically(&dir.join(CONFIG_FILE), &config)?;
        }
        Ok(config)
    }
}

/// The installed bundles recorded under `dir`.
pub fn load_installed(dir: &Path) -> Result<Vec<NodeBundle>> {
    let path = dir.join(INSTALLED_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .with_context(|| format!("{} is malformed; fix or remove it", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// Records `installed` under `dir` (written whole, then renamed, then the directory synced).
pub fn save_installed(dir: &Path, installed: &[NodeBundle]) -> Result<()> {
    let path = dir.join(INSTALLED_FILE);
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(installed)?)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, &path).with_context(|| format!("cannot write {}", path.display()))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Removes the temporary area (test mode) under `dir`; returns true when there was one.
pub fn purge_tmp(dir: &Path) -> Result<bool> {
    let tmp = dir.join(TMP_DIR);
    match std::fs::remove_dir_all(&tmp) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e).with_context(|| format!("cannot purge {}", tmp.display())),
    }
}

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
    let mut sources: Vec<(SocketAddr, &str)> =
        node.stagers.iter().map(|addr| (*addr, "stager")).collect();
    if let Ok(origin) = node.identity.origin_addr().parse::<SocketAddr>() {
        sources.push((origin, "origin"));
    }
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

/// Asks the first stager that answers (it asks the origin), else the origin, which bundles
/// this node must keep. An error when none answers: the caller then keeps every pin it has.
pub async fn fetch_keep_set(node: &Node) -> Result<proto::wire::KeepSet> {
    let mut sources: Vec<(SocketAddr, &str)> =
        node.stagers.iter().map(|addr| (*addr, "stager")).collect();
    if let Ok(origin) = node.identity.origin_addr().parse::<SocketAddr>() {
        sources.push((origin, "origin"));
    }
    let mut errors = Vec::new();
    for (addr, role) in sources {
        let conn = match connect(&node.endpoint, addr).await {
            Ok(conn) => conn,
            Err(error) => {
                errors.push(format!("{role} {addr}: {error}"));
                continue;
            }
        };
        match proto::mesh::fetch::keep_set(&conn, &Request::KeepSet).await {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn installed_bundles_and_configuration_round_trip() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(load_installed(dir.path()).expect("none").is_empty());
        let list = vec![NodeBundle {
            name: "os".into(),
            version: "1".into(),
            id: proto::BlobHash::of(b"os"),
        }];
        save_installed(dir.path(), &list).expect("save");
        assert_eq!(load_installed(dir.path()).expect("load"), list);

        let given = NodeConfig {
            role: Some("web".into()),
            ..NodeConfig::default()
        };
        let config = NodeConfig::load_with(dir.path(), given).expect("config");
        assert_eq!(config.role.as_deref(), Some("web"));
        // A later start without flags keeps it; a flag replaces one field only.
        let later = NodeConfig::load_with(
            dir.path(),
            NodeConfig {
                class: Some("canary".into()),
                ..NodeConfig::default()
            },
        )
        .expect("later");
        assert_eq!(later.role.as_deref(), Some("web"));
        assert_eq!(later.class.as_deref(), Some("canary"));

        std::fs::create_dir_all(dir.path().join(TMP_DIR).join("x")).expect("tmp");
        assert!(purge_tmp(dir.path()).expect("purge"));
        assert!(!dir.path().join(TMP_DIR).exists());
        assert!(!purge_tmp(dir.path()).expect("again"));
    }
}
