//! Keep-sets (retention): which bundles each node and each site's stagers must keep. A node's:
//! its installed (current) and desired (target) bundles, the bundles `origin prepare` prepared
//! (or is preparing) for it until it runs that version or a newer one, and while a rollout
//! covering it runs, the rollout's target (prepared for the swap) and rescue. A site's: the union of its nodes'
//! sets, plus the newest published version of every bundle (what its stagers preheat). The
//! sets are computed here (pure); [`for_node`] and [`for_site`] read the node table.

use std::collections::{BTreeMap, BTreeSet};

use proto::manifest::BundleId;
use proto::wire::{BundleInfo, KeepSet, MAX_KEEP_BUNDLES};

use crate::control::ControlPlane;
use crate::db::{DbError, NodeRecord, PrepareRecord, PrepareState};

/// Bundles prepare operations ask nodes to keep, by node id.
pub type Prepared = BTreeMap<String, BTreeSet<BundleId>>;

/// What a rollout under way (running or paused) asks its nodes to keep.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RolloutKeep {
    /// The bundle it installs (prepared on each node before the swap).
    pub target: BundleId,
    /// The rescue OS every swap keeps.
    pub rescue: BundleId,
    /// The nodes it covers.
    pub nodes: BTreeSet<String>,
}

/// Why no keep-set can be given; the asker then keeps every pin it has.
#[derive(Debug, thiserror::Error)]
pub enum KeepError {
    /// The node never reported.
    #[error("node {0} has not reported to the origin; it keeps what it has")]
    UnknownNode(String),
    /// The node belongs to another site than the one asking for it.
    #[error("node {node} belongs to site {node_site}, not {asked}")]
    OtherSite {
        /// The node.
        node: String,
        /// Its site.
        node_site: String,
        /// The site that asked.
        asked: String,
    },
    /// The set would exceed the wire's bound.
    #[error("the keep-set names {count} bundles, more than the {MAX_KEEP_BUNDLES} one answer may; the node keeps what it has")]
    TooLarge {
        /// Bundles in the set.
        count: usize,
    },
    /// The node table could not be read.
    #[error(transparent)]
    Db(#[from] DbError),
}

/// The bundles prepare operations ask each node to keep: every bundle of an operation not
/// cancelled in which the node did not fail, until the node runs a newer version of that bundle's name (then the
/// preparation is spent; the version it runs is kept as installed).
pub fn prepared_bundles(prepares: &[PrepareRecord], nodes: &[NodeRecord]) -> Prepared {
    let by_id: BTreeMap<&str, &NodeRecord> = nodes.iter().map(|n| (n.id.as_str(), n)).collect();
    let mut prepared = Prepared::new();
    for op in prepares.iter().filter(|op| op.cancelled.is_none()) {
        for (node, entry) in &op.nodes {
            if matches!(entry.state, PrepareState::Failed | PrepareState::Cancelled) {
                continue;
            }
            let superseded = by_id.get(node.as_str()).is_some_and(|n| {
                n.installed.iter().any(|b| {
                    b.name == op.bundle.name
                        && proto::version::compare_versions(&b.version, &op.bundle.version)
                            == std::cmp::Ordering::Greater
                })
            });
            if !superseded {
                prepared
                    .entry(node.clone())
                    .or_default()
                    .insert(op.bundle.id);
            }
        }
    }
    prepared
}

/// The bundles `node` must keep.
pub fn node_keep_set(
    node: &NodeRecord,
    rollout: Option<&RolloutKeep>,
    prepared: &Prepared,
) -> BTreeSet<BundleId> {
    let mut keep: BTreeSet<BundleId> = node
        .installed
        .iter()
        .chain(&node.desired)
        .map(|b| b.id)
        .collect();
    if let Some(bundles) = prepared.get(&node.id) {
        keep.extend(bundles);
    }
    if let Some(rollout) = rollout.filter(|r| r.nodes.contains(&node.id)) {
        keep.insert(rollout.target);
        keep.insert(rollout.rescue);
    }
    keep
}

/// The newest published version (highest sequence number) of every bundle name.
pub fn newest_published(catalog: &[BundleInfo]) -> BTreeSet<BundleId> {
    let mut newest: BTreeMap<&str, &BundleInfo> = BTreeMap::new();
    for info in catalog {
        let entry = newest.entry(info.name.as_str()).or_insert(info);
        if info.seq > entry.seq {
            *entry = info;
        }
    }
    newest.values().map(|info| info.id).collect()
}

/// The bundles the stagers of `site` must keep.
pub fn site_keep_set(
    site: &str,
    nodes: &[NodeRecord],
    catalog: &[BundleInfo],
    rollout: Option<&RolloutKeep>,
    prepared: &Prepared,
) -> BTreeSet<BundleId> {
    let mut keep = newest_published(catalog);
    for node in nodes.iter().filter(|n| n.site == site) {
        keep.extend(node_keep_set(node, rollout, prepared));
    }
    keep
}

/// The keep-set of node `node_id`, asked for by (or for) a node of `site`.
pub fn for_node(control: &ControlPlane, node_id: &str, site: &str) -> Result<KeepSet, KeepError> {
    let node = control
        .db()
        .node(node_id)?
        .ok_or_else(|| KeepError::UnknownNode(node_id.to_owned()))?;
    if node.site != site {
        return Err(KeepError::OtherSite {
            node: node_id.to_owned(),
            node_site: node.site,
            asked: site.to_owned(),
        });
    }
    let prepared = prepared_bundles(&control.db().all_prepares()?, std::slice::from_ref(&node));
    bounded(node_keep_set(
        &node,
        control.rollout_keep().as_ref(),
        &prepared,
    ))
}

/// The keep-set of the stagers of `site`.
pub fn for_site(
    control: &ControlPlane,
    site: &str,
    catalog: &[BundleInfo],
) -> Result<KeepSet, KeepError> {
    let nodes = control.db().nodes()?;
    let prepared = prepared_bundles(&control.db().all_prepares()?, &nodes);
    bounded(site_keep_set(
        site,
        &nodes,
        catalog,
        control.rollout_keep().as_ref(),
        &prepared,
    ))
}

fn bounded(keep: BTreeSet<BundleId>) -> Result<KeepSet, KeepError> {
    if keep.len() > MAX_KEEP_BUNDLES {
        return Err(KeepError::TooLarge { count: keep.len() });
    }
    Ok(KeepSet {
        bundles: keep.into_iter().collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::inventory::Inventory;
    use proto::manifest::BundleKind;
    use proto::wire::{NodeBundle, ReportEvent};

    fn id(name: &str) -> BundleId {
        proto::BlobHash::of(name.as_bytes())
    }

    fn bundle(name: &str) -> NodeBundle {
        NodeBundle {
            name: name.into(),
            version: "1".into(),
            id: id(name),
        }
    }

    fn node(id: &str, site: &str, installed: &[&str], desired: &[&str]) -> NodeRecord {
        NodeRecord {
            id: id.into(),
            site: site.into(),
            inventory: Inventory::default(),
            installed: installed.iter().map(|n| bundle(n)).collect(),
            held: Vec::new(),
            desired: desired.iter().map(|n| bundle(n)).collect(),
            state: crate::db::NodeState::InSync,
            state_detail: String::new(),
            data_addr: String::new(),
            first_seen_ms: 0,
            last_seen_ms: 0,
            last_event: ReportEvent::Started,
            reports: 1,
        }
    }

    fn info(name: &str, version: &str, seq: u64) -> BundleInfo {
        BundleInfo {
            id: id(&format!("{name}@{version}")),
            name: name.into(),
            version: version.into(),
            kind: BundleKind::Package,
            chunk_count: 1,
            stored_bytes: 1,
            raw_bytes: 1,
            seq,
        }
    }

    #[test]
    fn a_node_keeps_current_target_and_its_rollouts_bundles() {
        let n = node("n1", "a", &["os-1"], &["os-2"]);
        assert_eq!(
            node_keep_set(&n, None, &Prepared::new()),
            [id("os-1"), id("os-2")].into_iter().collect()
        );
        let rollout = RolloutKeep {
            target: id("os-3"),
            rescue: id("rescue"),
            nodes: ["n1".to_owned()].into_iter().collect(),
        };
        let kept = node_keep_set(&n, Some(&rollout), &Prepared::new());
        assert!(kept.contains(&id("os-3")) && kept.contains(&id("rescue")));
        let other = node("n2", "a", &["os-1"], &[]);
        assert_eq!(
            node_keep_set(&other, Some(&rollout), &Prepared::new()).len(),
            1
        );
    }

    #[test]
    fn a_site_keeps_its_nodes_sets_and_the_newest_of_each_bundle() {
        let nodes = [
            node("n1", "a", &["os-1"], &["os-2"]),
            node("n2", "a", &["app-1"], &[]),
            node("n3", "b", &["elsewhere"], &[]),
        ];
        let catalog = [
            info("os", "1", 1),
            info("os", "2", 2),
            info("os", "3", 5),
            info("app", "1", 3),
        ];
        let kept = site_keep_set("a", &nodes, &catalog, None, &Prepared::new());
        let expected: BTreeSet<BundleId> =
            [id("os-1"), id("os-2"), id("app-1"), id("os@3"), id("app@1")]
                .into_iter()
                .collect();
        assert_eq!(kept, expected);
        assert!(!kept.contains(&id("elsewhere")));
        assert!(
            !kept.contains(&id("os@1")),
            "an old version no node runs is not kept"
        );
    }

    fn prepare(bundle: NodeBundle, nodes: &[(&str, PrepareState)]) -> PrepareRecord {
        PrepareRecord {
            id: 1,
            bundle,
            stored_bytes: 1,
            selector: "all".into(),
            actor: "op".into(),
            created_ms: 0,
            nodes: nodes
                .iter()
                .map(|(id, state)| {
                    let entry = crate::db::PrepareNode {
                        site: "a".into(),
                        state: *state,
                        detail: String::new(),
                        attempts: 1,
                        bytes_received: 0,
                        updated_ms: 0,
                    };
                    ((*id).to_owned(), entry)
                })
                .collect(),
            cancelled: None,
        }
    }

    #[test]
    fn prepared_bundles_are_kept_by_the_node_and_its_site_until_a_newer_version_runs() {
        let os2 = NodeBundle {
            name: "os".into(),
            version: "2".into(),
            id: id("os@2"),
        };
        let op = prepare(
            os2.clone(),
            &[
                ("n1", PrepareState::Prepared),
                ("n2", PrepareState::Pending),
                ("n3", PrepareState::Failed),
                ("n4", PrepareState::Prepared),
            ],
        );
        let mut n4 = node("n4", "a", &[], &[]);
        n4.installed = vec![NodeBundle {
            name: "os".into(),
            version: "3".into(),
            id: id("os@3"),
        }];
        let nodes = [
            node("n1", "a", &["os-1"], &[]),
            node("n2", "a", &["os-1"], &[]),
            node("n3", "b", &["os-1"], &[]),
            n4,
        ];
        let prepared = prepared_bundles(&[op], &nodes);
        // Prepared and still pending nodes keep it; a failed one and one past it do not.
        assert!(node_keep_set(&nodes[0], None, &prepared).contains(&os2.id));
        assert!(node_keep_set(&nodes[1], None, &prepared).contains(&os2.id));
        assert!(!node_keep_set(&nodes[2], None, &prepared).contains(&os2.id));
        assert!(!node_keep_set(&nodes[3], None, &prepared).contains(&os2.id));
        assert!(site_keep_set("a", &nodes, &[], None, &prepared).contains(&os2.id));
        assert!(!site_keep_set("b", &nodes, &[], None, &prepared).contains(&os2.id));
    }
}
