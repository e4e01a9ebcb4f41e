//! What the overview shows, read from the same server-side state the CLI commands read: the
//! node table, the catalog and the rollout service.

// CommandError carries the policy's own errors whole (see `commands`); built once per request.
#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;

use proto::wire::RolloutAction;
use serde::Serialize;

use crate::control::{CommandError, ControlPlane};
use crate::rollout::plan::{Phase, RolloutStatus};
use crate::rollout::service::RolloutServiceError;

/// `GET /api/overview`.
#[derive(Clone, Debug, Serialize)]
pub struct Overview {
    /// Who is looking.
    pub account: AccountView,
    /// Nodes that reported (edges).
    pub nodes: usize,
    /// Per site: its stagers, edges and WAN bytes.
    pub sites: Vec<SiteView>,
    /// Every published bundle version, in publish order.
    pub bundles: Vec<BundleView>,
    /// The rollout under way (running or paused), if any.
    pub rollouts: Vec<RolloutView>,
}

/// The account of the session.
#[derive(Clone, Debug, Serialize)]
pub struct AccountView {
    /// Its name.
    pub name: String,
    /// `admin` or `viewer`.
    pub role: String,
}

/// One site.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SiteView {
    /// Its name.
    pub site: String,
    /// Its stagers up now: connected to this origin, or seen within
    /// [`crate::stagers::UP_WITHIN`].
    pub stagers: usize,
    /// Its stagers seen since this origin started.
    pub stagers_seen: usize,
    /// Its edges (nodes that reported to the node database).
    pub edges: usize,
    /// Bytes this origin sent to the site's stagers since it started (the site's WAN pull).
    pub wan_bytes_from_origin: u64,
    /// Bytes the site's stagers served to its edges, as they last reported.
    pub served_by_stagers: u64,
}

/// One published bundle version.
#[derive(Clone, Debug, Serialize)]
pub struct BundleView {
    /// Name.
    pub name: String,
    /// Version.
    pub version: String,
    /// Bundle id (hex).
    pub id: String,
    /// Kind.
    pub kind: String,
    /// Stored (compressed) bytes.
    pub stored_bytes: u64,
    /// Payload bytes.
    pub raw_bytes: u64,
    /// Catalog sequence number.
    pub seq: u64,
}

/// The rollout under way.
#[derive(Clone, Debug, Serialize)]
pub struct RolloutView {
    /// Its id in the console's URLs: the id of the bundle it installs.
    pub id: String,
    /// Where it stands (as `origin rollout status --json`).
    pub status: RolloutStatus,
}

/// Gathers the overview for `account`.
pub async fn gather(
    origin: &crate::server::Origin,
    account: AccountView,
) -> Result<Overview, CommandError> {
    let control = origin.control();
    let catalog = origin.catalog();
    let nodes = tokio::task::block_in_place(|| control.db().nodes())?;
    let mut sites: BTreeMap<String, SiteView> = BTreeMap::new();
    for node in &nodes {
        site_entry(&mut sites, &node.site).edges += 1;
    }
    for stager in origin.stagers() {
        let view = site_entry(&mut sites, &stager.site);
        view.stagers_seen += 1;
        view.stagers += usize::from(stager.up);
        view.served_by_stagers += stager.stats.map_or(0, |s| s.served_bytes);
    }
    for view in sites.values_mut() {
        view.wan_bytes_from_origin = origin.bytes_sent_to_stagers(&view.site);
    }
    let bundles = catalog
        .all()
        .into_iter()
        .map(|b| BundleView {
            name: b.name,
            version: b.version,
            id: b.id.to_string(),
            kind: b.kind.to_string(),
            stored_bytes: b.stored_bytes,
            raw_bytes: b.raw_bytes,
            seq: b.seq,
        })
        .collect();
    let rollouts = rollout_views(control).await?;
    Ok(Overview {
        account,
        nodes: nodes.len(),
        sites: sites.into_values().collect(),
        bundles,
        rollouts,
    })
}

fn site_entry<'a>(sites: &'a mut BTreeMap<String, SiteView>, name: &str) -> &'a mut SiteView {
    sites.entry(name.to_owned()).or_insert_with(|| SiteView {
        site: name.to_owned(),
        ..SiteView::default()
    })
}

/// The rollout under way (running or paused), with its console id; empty when none.
pub async fn rollout_views(control: &ControlPlane) -> Result<Vec<RolloutView>, CommandError> {
    let Some(kept) = control.rollout_keep() else {
        return Ok(Vec::new());
    };
    match control.rollouts().act(RolloutAction::Status).await {
        Ok(status) if matches!(status.phase, Phase::Running | Phase::Paused) => {
            Ok(vec![RolloutView {
                id: kept.target.to_string(),
                status,
            }])
        }
        Ok(_) | Err(RolloutServiceError::NeverStarted) => Ok(Vec::new()),
        Err(error) => Err(error.into()),
    }
}
