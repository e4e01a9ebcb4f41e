//! The origin's control plane, server side: node reports and boot negotiation, the operator's
//! commands (`origin nodes`, `policy load|check`, `class set`, `override set|clear`, `audit`,
//! `test-run`, `prepare`), and the package table fed by publish.
//!
//! Every change goes through [`Db::commit`] with its audit record. Test runs are the one
//! exception by design: they live in memory only, so a restart of the origin forgets them.
//!
//! Here: node reports, the boot negotiation and the package table. The operator's commands are
//! in `commands`, test runs in `test_run`, prepare operations in `prepare`, tables and times for
//! people in `render`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use proto::inventory::Inventory;
use proto::manifest::Manifest;
use proto::net::PeerIdentity;
use proto::wire::{BootPlan, BundleInfo, NodeBundle, NodeReport, ReportEvent};

use crate::db::{
    build_store, now_ms, Audit, Commit, Db, DbError, NodeRecord, NodeState, PackageRecord,
    PolicyDoc, Put,
};
use crate::negotiate::{self, Negotiated};
use crate::policy::{self, BundleRef, Requirement};
use crate::policy_file;

mod accounts;
mod commands;
mod keys;
mod prepare;
mod render;
mod test_run;
mod tokens;

pub use commands::NodeRow;
pub use keys::KeysAnswer;
pub use prepare::{
    CancelError, PrepareStatus, Prepares, SiteProgress, MAX_ASKS_AT_ONCE, RETRY_INTERVAL,
};
pub use render::{render_table, utc};
pub use test_run::{TestRun, TestRunError, TEST_RUN_TIMEOUT};
pub use tokens::Enrollment;

/// Why an operator's command failed; the message is the command's answer.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The database cannot be read or written.
    #[error(transparent)]
    Db(#[from] DbError),
    /// The policy file was refused.
    #[error(transparent)]
    PolicyFile(#[from] policy_file::PolicyFileError),
    /// A bundle that should be `NAME@VERSION` is not.
    #[error(transparent)]
    ExactBundle(#[from] policy_file::ExactBundleError),
    /// The rollout service refused.
    #[error(transparent)]
    Rollout(#[from] crate::rollout::service::RolloutServiceError),
    /// A rollout request for the driving origin could not be passed on.
    #[error("{0}")]
    Forward(String),
    /// No node has that id or id prefix.
    #[error("no node `{0}` has reported to this origin; `origin nodes` lists them")]
    NoSuchNode(String),
    /// An id prefix that several nodes share.
    #[error("`{prefix}` is a prefix of {count} node ids; give more of it")]
    AmbiguousNode {
        /// The prefix given.
        prefix: String,
        /// How many node ids start with it.
        count: usize,
    },
    /// No published bundle by that id or name.
    #[error("no published bundle {0}")]
    NoSuchBundle(String),
    /// A bundle pinned that was never published.
    #[error("{0} was never published; publish it first (`origin publish`)")]
    NeverPublished(BundleRef),
    /// `origin class set` with an empty class.
    #[error("the class is empty")]
    EmptyClass,
    /// A test run that did not start.
    #[error(transparent)]
    TestRun(#[from] test_run::TestRunError),
    /// A rollout of an unencrypted bundle to a class that requires encryption.
    #[error("refused: {bundle} is not encrypted, and node {node} of the rollout is of class `{class}`, which may run encrypted bundles only ([encryption] require_classes); publish it with `origin publish --encrypt`")]
    PlainRollout {
        /// The bundle, `NAME@VERSION`.
        bundle: String,
        /// A node the rollout would include.
        node: String,
        /// Its class.
        class: String,
    },
    /// `origin keys retire` of a generation nodes still need.
    #[error("{generation} is still needed: {count} node(s) run or should run a bundle sealed with it ({nodes}); move them to newer bundles first, or pass --force (they can then no longer read those bundles)")]
    GenerationInUse {
        /// The generation.
        generation: proto::keys::KeyGeneration,
        /// How many nodes need it.
        count: usize,
        /// The first few node ids.
        nodes: String,
    },
    /// A content-key command failed.
    #[error(transparent)]
    Keys(#[from] crate::keys::KeysError),
    /// `origin prepare status` of an operation that does not exist.
    #[error("no prepare operation {0} on this origin; `origin prepare status` shows the newest")]
    NoSuchPrepare(u64),
    /// `origin prepare status` before any `origin prepare`.
    #[error("no prepare operation has been started on this origin")]
    NoPrepare,
    /// `origin prepare cancel` refused.
    #[error(transparent)]
    PrepareCancel(#[from] CancelError),
    /// A console account's name, password hash or role was refused.
    #[error(transparent)]
    Account(#[from] crate::accounts::AccountError),
    /// A console account's role other than admin or viewer.
    #[error("{0}")]
    BadRole(String),
    /// Console accounts asked with another certificate than the origin's own.
    #[error("only the origin's own certificate (`origin admin` on the origin's machine) may manage console accounts")]
    AccountsNeedOrigin,
    /// No console account of this name.
    #[error("no console account `{0}`; `origin admin list` shows them")]
    NoSuchAccount(String),
    /// Enrollment tokens asked with another certificate than an origin's.
    #[error("only an origin's own certificate (`origin enroll` on an origin's machine) may issue enrollment tokens")]
    TokensNeedOrigin,
    /// An enrollment token cannot be issued.
    #[error("cannot issue an enrollment token: {0}")]
    Token(String),
}

/// The control plane of a running origin.
pub struct ControlPlane {
    db: Arc<Db>,
    /// Test runs by node id: never written to the database.
    test_runs: Mutex<BTreeMap<String, TestRun>>,
    /// Client endpoint with the origin's certificate (edges accept test runs from it only).
    endpoint: quinn::Endpoint,
    /// Held through every content-key operation (rotate, retire, the first generation), whose
    /// files live beside the origin; the store's own changes are serialized by [`Db::change`].
    key_changes: Mutex<()>,
    /// `origin rollout ...`: the running rollout and the saved state of the last.
    rollouts: Arc<crate::rollout::service::RolloutService>,
    /// The content keys (`origin keys ...`).
    keys: Arc<crate::keys::OriginKeys>,
    /// The key that seals the ring in the store, once it is shared there
    /// ([`ControlPlane::share_keys`]).
    ring_seal: std::sync::OnceLock<zeroize::Zeroizing<[u8; 32]>>,
    /// `origin prepare`: the stored operations and the asks under way.
    prepares: Arc<Prepares>,
    /// Woken when an operator changes a rollout (CLI or console), so the console's live
    /// pages read the state at once instead of at their next tick.
    rollout_changed: Arc<tokio::sync::Notify>,
    /// The revoked nodes, read from the store every [`REVOKED_REFRESH`].
    revoked: Arc<RevokedSet>,
    /// Where this origin enrolls, for `origin enroll` (set once its endpoint listens).
    enrollment: std::sync::OnceLock<tokens::Enrollment>,
}

/// How often the set of revoked nodes is read from the store (other origins may revoke).
pub const REVOKED_REFRESH: std::time::Duration = std::time::Duration::from_secs(1);

/// The revoked nodes as last read.
#[derive(Default)]
struct RevokedSet {
    ids: std::sync::RwLock<std::collections::HashSet<String>>,
}

impl RevokedSet {
    /// Reads the set now and then every [`REVOKED_REFRESH`] on a thread of its own, until `db`
    /// is dropped; a read that fails keeps the last set (logged once per outage).
    fn watch(db: &Arc<Db>) -> Arc<Self> {
        let set = Arc::new(Self::default());
        let read = |db: &Db, set: &RevokedSet, failing: &mut bool| match db.revoked_ids() {
            Ok(ids) => {
                if *failing {
                    tracing::info!("the revoked nodes can be read from the store again");
                }
                *failing = false;
                *set.ids.write().unwrap_or_else(|e| e.into_inner()) = ids;
            }
            Err(error) => {
                if !*failing {
                    tracing::warn!(%error, "cannot read the revoked nodes; the last set read stays in force");
                }
                *failing = true;
            }
        };
        let mut failing = false;
        read(db, &set, &mut failing);
        let (weak, shared) = (Arc::downgrade(db), set.clone());
        let spawned = std::thread::Builder::new()
            .name("revoked-nodes".into())
            .spawn(move || loop {
                std::thread::sleep(REVOKED_REFRESH);
                let Some(db) = weak.upgrade() else {
                    return;
                };
                read(&db, &shared, &mut failing);
            });
        if let Err(error) = spawned {
            tracing::error!(%error, "cannot start the thread that reads the revoked nodes");
        }
        set
    }
}

impl ControlPlane {
    /// The control plane over `db` and the content keys `keys`, for the origin whose home is
    /// `home` (the rollout's file lives there); test runs connect out through `endpoint`.
    pub fn new(
        db: Db,
        home: &std::path::Path,
        endpoint: quinn::Endpoint,
        keys: crate::keys::OriginKeys,
    ) -> Self {
        let db = Arc::new(db);
        let revoked = RevokedSet::watch(&db);
        let rollouts = Arc::new(crate::rollout::service::RolloutService::new(
            db.clone(),
            home,
            endpoint.clone(),
        ));
        Self {
            prepares: Prepares::new(db.clone(), endpoint.clone()),
            db,
            test_runs: Mutex::new(BTreeMap::new()),
            key_changes: Mutex::new(()),
            rollouts,
            endpoint,
            keys: Arc::new(keys),
            ring_seal: std::sync::OnceLock::new(),
            rollout_changed: Arc::new(tokio::sync::Notify::new()),
            revoked,
            enrollment: std::sync::OnceLock::new(),
        }
    }

    /// Woken each time an operator paused, resumed or aborted a rollout.
    pub fn rollout_changed(&self) -> Arc<tokio::sync::Notify> {
        self.rollout_changed.clone()
    }

    /// The database.
    pub fn db(&self) -> &Db {
        &self.db
    }

    /// `origin prepare` operations.
    pub fn prepares(&self) -> &Arc<Prepares> {
        &self.prepares
    }

    /// The rollouts (`origin rollout ...`, the console's rollout actions).
    pub fn rollouts(&self) -> &Arc<crate::rollout::service::RolloutService> {
        &self.rollouts
    }

    /// What a rollout under way asks its nodes to keep (see [`crate::keep`]).
    pub fn rollout_keep(&self) -> Option<crate::keep::RolloutKeep> {
        self.rollouts.kept()
    }

    fn one_key_change(&self) -> std::sync::MutexGuard<'_, ()> {
        self.key_changes.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn test_runs(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, TestRun>> {
        self.test_runs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a published bundle in the package table (once per id), with its audit record.
    pub fn record_package(
        &self,
        info: &BundleInfo,
        manifest: &Manifest,
        actor: &PeerIdentity,
        action: &str,
    ) -> Result<(), DbError> {
        let depends: Vec<Requirement> = manifest
            .dependencies
            .iter()
            .filter_map(|dep| {
                let text = if dep.version == "*" {
                    dep.name.clone()
                } else {
                    format!("{}@{}", dep.name, dep.version)
                };
                match text.parse::<Requirement>() {
                    Ok(requirement) => Some(requirement),
                    Err(error) => {
                        tracing::warn!(bundle = %info.id, %error, "a dependency is not a valid requirement; left out");
                        None
                    }
                }
            })
            .collect();
        let deps = if depends.is_empty() {
            String::new()
        } else {
            format!(
                " depends {}",
                depends
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        self.db.change(|| {
            if let Some(existing) = self.db.package(&info.name, &info.version)? {
                if existing.id == info.id {
                    return Ok(Commit::none(()));
                }
            }
        let record = PackageRecord {
            name: info.name.clone(),
            version: info.version.clone(),
            id: info.id,
            kind: info.kind.to_string(),
            depends: depends.clone(),
            stored_bytes: info.stored_bytes,
            raw_bytes: info.raw_bytes,
            seq: info.seq,
            published_ms: if action == "package.publish" {
                now_ms()
            } else {
                0
            },
            encrypted: crate::keys::is_encrypted(manifest),
            key_generation: crate::keys::key_generation(manifest).map(|g| g.0),
        };
        let mut packages = self.db.packages()?;
        packages.retain(|p| !(p.name == record.name && p.version == record.version));
        packages.push(record.clone());
        let mut puts = vec![Put::Package(Box::new(record))];
        // A captured image (brief 004) becomes the image of the nodes with the capturing
        // node's facts, in the same batch as the package.
        let mut captured = String::new();
        let mut doc = None;
        let current = self.db.policy()?;
        if let Some(rule) = policy::captured_rule(
            &manifest.metadata,
            &current.precedence,
            BundleRef::new(info.name.clone(), info.version.clone()),
        ) {
            let mut next = current;
            next.rules.retain(|r| r.id != rule.id);
            captured = format!(
                "; captured by node {}: rule {} ({} {})",
                manifest
                    .metadata
                    .get(policy::capture_keys::NODE)
                    .map_or("-", String::as_str),
                rule.id,
                rule.matcher.kind().name(),
                rule.matcher.value(),
            );
            tracing::info!(rule = %rule.id, bundle = %info.id, "a captured image becomes the image of nodes with its facts");
            next.rules.push(rule);
            puts.push(Put::Policy(Box::new(next.clone())));
            doc = Some(next);
        } else if manifest.metadata.contains_key(policy::capture_keys::NODE) {
            tracing::warn!(bundle = %info.id, "a captured image names no model, manufacturer or class the precedence consults; no rule added");
        }
        puts.extend(self.refreshed(&Change {
            packages: Some(packages),
            doc,
            ..Change::default()
        })?);
        let audit = Audit::new(
            actor.node_id.to_string(),
            actor.role.as_str(),
            action,
            format!(
                "{}@{} ({}){deps}{captured}",
                info.name, info.version, info.id
            ),
        );
        Ok(Commit::new(puts, Some(audit), ()))
        })
    }

    /// Records a node's report (id and site from its certificate) and, with `negotiate`,
    /// answers what it should boot.
    pub fn report(
        &self,
        node_id: &str,
        site: &str,
        report: NodeReport,
        negotiate: bool,
    ) -> Result<Option<BootPlan>, DbError> {
        if report.event == ReportEvent::Started {
            // A node that restarted runs nothing in test mode any more.
            if self.test_runs().remove(node_id).is_some() {
                tracing::info!(node = node_id, "test run ended with the node's restart");
            }
        }
        let (plan, data_addr) = self.db.change(|| {
            let report = report.clone();
            let now = now_ms();
            let existing = self.db.node(node_id)?;
            let mut record = existing.clone().unwrap_or_else(|| NodeRecord {
                id: node_id.to_owned(),
                site: site.to_owned(),
                inventory: Inventory::default(),
                installed: Vec::new(),
                held: Vec::new(),
                desired: Vec::new(),
                state: NodeState::Reported,
                state_detail: String::new(),
                data_addr: String::new(),
                first_seen_ms: now,
                last_seen_ms: now,
                last_event: report.event,
                reports: 0,
            });
            record.site = site.to_owned();
            // The site comes from the certificate, whatever the node configured.
            record.inventory = Inventory {
                site: Some(site.to_owned()),
                ..report.inventory
            };
            record.installed = report.installed;
            record.held = report.held;
            if !report.data_addr.is_empty() || report.event == ReportEvent::Started {
                record.data_addr = report.data_addr;
            }
            record.last_seen_ms = now.max(record.last_seen_ms);
            record.last_event = report.event;
            record.reports += 1;
            let plan = if negotiate {
                let store = self.db.policy_store()?;
                let inventory = self.effective_inventory(&record)?;
                let resolution = policy::resolve(&store, node_id, &inventory);
                let packages = self.package_map()?;
                let doc = self.db.policy()?;
                let Negotiated {
                    plan,
                    desired,
                    state,
                    detail,
                } = negotiate::offer_capture(
                    negotiate::require_encrypted(
                        negotiate::plan(&resolution, &record.installed, &packages),
                        doc.encryption.requires(inventory.class.as_deref()),
                        &packages,
                    ),
                    doc.capture.as_ref(),
                    inventory.class.as_deref(),
                );
                record.desired = desired;
                record.state = state;
                record.state_detail = detail;
                Some(plan)
            } else {
                if !record.desired.is_empty() {
                    record.state =
                        negotiate::state_after_update(&record.installed, &record.desired);
                }
                None
            };
            let audit = node_audit(existing.as_ref(), &record);
            let data_addr = record.data_addr.clone();
            Ok::<_, DbError>(Commit::new(
                vec![Put::Node(Box::new(record))],
                audit,
                (plan, data_addr),
            ))
        })?;
        // A node that was offline during a prepare prepares now that its daemon reports.
        self.prepares.kick(node_id, &data_addr);
        Ok(plan)
    }

    /// Every node whose desired bundles or state differ under the policy as `change` leaves
    /// it, as puts to commit with the change: the node table always says what each node
    /// should run now.
    fn refreshed(&self, change: &Change) -> Result<Vec<Put>, DbError> {
        let doc = match &change.doc {
            Some(doc) => doc.clone(),
            None => self.db.policy()?,
        };
        let overrides = match &change.overrides {
            Some(overrides) => overrides.clone(),
            None => self.db.overrides()?,
        };
        let packages = match &change.packages {
            Some(packages) => packages.clone(),
            None => self.db.packages()?,
        };
        let classes = match &change.classes {
            Some(classes) => classes.clone(),
            None => self.db.classes()?,
        };
        let encryption = doc.encryption.clone();
        let store = build_store(doc, &overrides, &packages);
        let by_version: BTreeMap<(String, String), PackageRecord> = packages
            .into_iter()
            .map(|p| ((p.name.clone(), p.version.clone()), p))
            .collect();
        let mut puts = Vec::new();
        for mut record in self.db.nodes()? {
            let mut inventory = record.inventory.clone();
            if let Some(class) = classes.get(&record.id) {
                inventory.class = Some(class.clone());
            }
            let resolution = policy::resolve(&store, &record.id, &inventory);
            let negotiated = negotiate::require_encrypted(
                negotiate::plan(&resolution, &record.installed, &by_version),
                encryption.requires(inventory.class.as_deref()),
                &by_version,
            );
            let state = match negotiated.state {
                NodeState::Updating => NodeState::Outdated,
                other => other,
            };
            if negotiated.desired != record.desired
                || state != record.state
                || negotiated.detail != record.state_detail
            {
                record.desired = negotiated.desired;
                record.state = state;
                record.state_detail = negotiated.detail;
                puts.push(Put::Node(Box::new(record)));
            }
        }
        Ok(puts)
    }

    fn package_map(&self) -> Result<BTreeMap<(String, String), PackageRecord>, DbError> {
        Ok(self
            .db
            .packages()?
            .into_iter()
            .map(|p| ((p.name.clone(), p.version.clone()), p))
            .collect())
    }

    /// The node's inventory with the class the operator set, if any.
    fn effective_inventory(&self, record: &NodeRecord) -> Result<Inventory, DbError> {
        let mut inventory = record.inventory.clone();
        if let Some(class) = self.db.classes()?.remove(&record.id) {
            inventory.class = Some(class);
        }
        Ok(inventory)
    }
}

/// A change not yet committed: the parts of the policy it replaces.
#[derive(Default)]
struct Change {
    doc: Option<PolicyDoc>,
    overrides: Option<BTreeMap<String, Vec<BundleRef>>>,
    packages: Option<Vec<PackageRecord>>,
    classes: Option<BTreeMap<String, String>>,
}

/// The audit record a node report writes: its first report, and changes of what it holds or
/// should run (not every heartbeat).
fn node_audit(before: Option<&NodeRecord>, after: &NodeRecord) -> Option<Audit> {
    let actor = after.id.clone();
    match before {
        None => Some(Audit::new(
            actor,
            "edge",
            "node.first-report",
            format!(
                "site {}, role {}, class {}, {} ({})",
                after.site,
                after.role().unwrap_or("-"),
                after.inventory.class.as_deref().unwrap_or("-"),
                after.last_event.name(),
                after.inventory.model.as_deref().unwrap_or("unknown model")
            ),
        )),
        Some(before) if before.installed != after.installed => Some(Audit::new(
            actor,
            "edge",
            "node.installed",
            format!("{} -> {}", list(&before.installed), list(&after.installed)),
        )),
        Some(before) if before.desired != after.desired => Some(Audit::new(
            actor,
            "edge",
            "node.desired",
            format!("{} -> {}", list(&before.desired), list(&after.desired)),
        )),
        Some(_) => None,
    }
}

fn list(bundles: &[NodeBundle]) -> String {
    if bundles.is_empty() {
        return "-".into();
    }
    bundles
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}
