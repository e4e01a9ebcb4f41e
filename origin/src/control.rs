//! The origin's control plane, server side: node reports and boot negotiation, the operator's
//! commands (`origin nodes`, `policy load|check`, `class set`, `override set|clear`, `audit`,
//! `test-run`), and the package table fed by publish.
//!
//! Every change goes through [`Db::commit`] with its audit record. Test runs are the one
//! exception by design: they live in memory only, so a restart of the origin forgets them.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use proto::inventory::Inventory;
use proto::manifest::{BundleId, Manifest};
use proto::net::{connect, read_frame, send_request, PeerIdentity};
use proto::wire::{
    BootPlan, BundleInfo, ControlCommand, ControlReply, NodeBundle, NodeReport, ReportEvent,
    Request, Response, TestRunSummary, MAX_DOCUMENT_BYTES, MAX_FRAME_BYTES,
};
use serde::Serialize;

use crate::catalog::Catalog;
use crate::db::{
    build_store, now_ms, Audit, AuditRecord, Db, DbError, NodeRecord, NodeState, PackageRecord,
    PolicyDoc, Put,
};
use crate::negotiate::{self, Negotiated};
use crate::policy::{self, BundleRef, Requirement};
use crate::policy_file;

/// How long a test run on an edge may take (fetch included).
pub const TEST_RUN_TIMEOUT: Duration = Duration::from_secs(600);

/// A bundle a node runs in test mode (in memory only).
#[derive(Clone, Debug, Serialize)]
pub struct TestRun {
    /// The bundle.
    pub bundle: String,
    /// Its id.
    pub id: String,
    /// Where the edge runs it from.
    pub root: String,
    /// When it started (ms since the Unix epoch).
    pub started_ms: u64,
}

/// The control plane of a running origin.
pub struct ControlPlane {
    db: Db,
    /// Test runs by node id: never written to the database.
    test_runs: Mutex<BTreeMap<String, TestRun>>,
    /// Client endpoint with the origin's certificate (edges accept test runs from it only).
    endpoint: quinn::Endpoint,
    /// Held from the first read to the commit of every change, so two changes (a node's
    /// report and an operator's command, say) never overwrite each other's records.
    changes: Mutex<()>,
    /// `origin rollout ...`: the running rollout and the saved state of the last.
    rollouts: crate::rollouts::Rollouts,
}

/// A row of `origin nodes --json`.
#[derive(Clone, Debug, Serialize)]
pub struct NodeRow {
    /// The record.
    #[serde(flatten)]
    pub record: NodeRecord,
    /// The class in effect (the operator's, else the node's own).
    pub class: Option<String>,
    /// The class the operator set, if any.
    pub assigned_class: Option<String>,
    /// Its test run, if one is live.
    pub test_run: Option<TestRun>,
}

impl ControlPlane {
    /// The control plane over `db`; test runs connect out through `endpoint`.
    pub fn new(db: Db, endpoint: quinn::Endpoint) -> Self {
        // The rollout's file lives beside the database, in the origin's home.
        let home = db
            .path()
            .parent()
            .map(std::path::Path::to_path_buf)
            .unwrap_or_default();
        Self {
            db,
            test_runs: Mutex::new(BTreeMap::new()),
            changes: Mutex::new(()),
            rollouts: crate::rollouts::Rollouts::new(&home, endpoint.clone()),
            endpoint,
        }
    }

    /// The database.
    pub fn db(&self) -> &Db {
        &self.db
    }

    /// What a rollout under way asks its nodes to keep (see [`crate::keep`]).
    pub fn rollout_keep(&self) -> Option<crate::keep::RolloutKeep> {
        self.rollouts.kept()
    }

    fn one_change(&self) -> std::sync::MutexGuard<'_, ()> {
        self.changes.lock().unwrap_or_else(|e| e.into_inner())
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
        let _one_change = self.one_change();
        if let Some(existing) = self.db.package(&info.name, &info.version)? {
            if existing.id == info.id {
                return Ok(());
            }
        }
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
        };
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
        let mut packages = self.db.packages()?;
        packages.retain(|p| !(p.name == record.name && p.version == record.version));
        packages.push(record.clone());
        let mut puts = vec![Put::Package(Box::new(record))];
        // A captured image (seed 004) becomes the image of the nodes with the capturing
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
        self.db.commit(
            &puts,
            Some(Audit::new(
                actor.node_id.to_string(),
                actor.role.as_str(),
                action,
                format!(
                    "{}@{} ({}){deps}{captured}",
                    info.name, info.version, info.id
                ),
            )),
        )?;
        Ok(())
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
        let _one_change = self.one_change();
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
        if report.event == ReportEvent::Started {
            // A node that restarted runs nothing in test mode any more.
            if self.test_runs().remove(node_id).is_some() {
                tracing::info!(node = node_id, "test run ended with the node's restart");
            }
        }
        let plan = if negotiate {
            let store = self.db.policy_store()?;
            let inventory = self.effective_inventory(&record)?;
            let resolution = policy::resolve(&store, node_id, &inventory);
            let packages = self.package_map()?;
            let Negotiated {
                plan,
                desired,
                state,
                detail,
            } = negotiate::offer_capture(
                negotiate::plan(&resolution, &record.installed, &packages),
                self.db.policy()?.capture.as_ref(),
                inventory.class.as_deref(),
            );
            record.desired = desired;
            record.state = state;
            record.state_detail = detail;
            Some(plan)
        } else {
            if !record.desired.is_empty() {
                record.state = negotiate::state_after_update(&record.installed, &record.desired);
            }
            None
        };
        let audit = node_audit(existing.as_ref(), &record);
        self.db.commit(&[Put::Node(Box::new(record))], audit)?;
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
            let negotiated = negotiate::plan(&resolution, &record.installed, &by_version);
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

    /// Runs an operator's command.
    pub async fn command(
        &self,
        peer: &PeerIdentity,
        actor: &str,
        command: ControlCommand,
        catalog: &Catalog,
    ) -> ControlReply {
        let who =
            |action: &str, detail: String| Audit::new(actor, peer.role.as_str(), action, detail);
        let result = match command {
            ControlCommand::Nodes => tokio::task::block_in_place(|| self.nodes()),
            ControlCommand::PolicyLoad { source, toml } => {
                tokio::task::block_in_place(|| self.policy_load(&source, &toml, who))
            }
            ControlCommand::PolicyCheck => tokio::task::block_in_place(|| self.policy_check()),
            ControlCommand::ClassSet { node, class } => {
                tokio::task::block_in_place(|| self.class_set(&node, &class, who))
            }
            ControlCommand::OverrideSet { node, bundle } => {
                tokio::task::block_in_place(|| self.override_set(&node, &bundle, who))
            }
            ControlCommand::OverrideClear { node, name } => {
                tokio::task::block_in_place(|| self.override_clear(&node, name.as_deref(), who))
            }
            ControlCommand::Audit { limit } => {
                tokio::task::block_in_place(|| self.audit(limit as usize))
            }
            ControlCommand::TestRun { node, bundle } => {
                self.test_run(&node, &bundle, catalog).await
            }
            ControlCommand::RolloutStart {
                bundle,
                rescue,
                selector,
                max_failures,
                downgrade,
            } => {
                self.rollout_start(
                    &bundle,
                    &rescue,
                    &selector,
                    max_failures,
                    downgrade,
                    catalog,
                    who,
                )
                .await
            }
            ControlCommand::Rollout { action } => self.rollout_act(action, who).await,
        };
        match result {
            Ok(reply) => bounded(reply),
            Err(message) => ControlReply {
                success: false,
                text: message,
                json: "null".into(),
            },
        }
    }

    /// Finds a node by id or unique id prefix.
    fn find_node(&self, node: &str) -> Result<NodeRecord, String> {
        let nodes = self.db.nodes().map_err(|e| e.to_string())?;
        if let Some(exact) = nodes.iter().find(|n| n.id == node) {
            return Ok(exact.clone());
        }
        let matching: Vec<&NodeRecord> = nodes
            .iter()
            .filter(|n| !node.is_empty() && n.id.starts_with(node))
            .collect();
        match matching.as_slice() {
            [one] => Ok((*one).clone()),
            [] => Err(format!(
                "no node `{node}` has reported to this origin; `origin nodes` lists them"
            )),
            many => Err(format!(
                "`{node}` is a prefix of {} node ids; give more of it",
                many.len()
            )),
        }
    }

    fn rows(&self) -> Result<Vec<NodeRow>, String> {
        let nodes = self.db.nodes().map_err(|e| e.to_string())?;
        let classes = self.db.classes().map_err(|e| e.to_string())?;
        let runs = self.test_runs().clone();
        Ok(nodes
            .into_iter()
            .map(|record| {
                let assigned_class = classes.get(&record.id).cloned();
                NodeRow {
                    class: assigned_class
                        .clone()
                        .or_else(|| record.inventory.class.clone()),
                    assigned_class,
                    test_run: runs.get(&record.id).cloned(),
                    record,
                }
            })
            .collect())
    }

    fn nodes(&self) -> Result<ControlReply, String> {
        let rows = self.rows()?;
        let now = now_ms();
        let mut table = vec![[
            "ID",
            "SITE",
            "CLASS",
            "ROLE",
            "INSTALLED",
            "DESIRED",
            "STATE",
            "LAST SEEN",
        ]
        .map(str::to_owned)];
        for row in &rows {
            let r = &row.record;
            let state = match &row.test_run {
                Some(run) => format!("{} (test-run {})", r.state.name(), run.bundle),
                None => r.state.name().to_owned(),
            };
            table.push([
                r.id.clone(),
                r.site.clone(),
                row.class.clone().unwrap_or_else(|| "-".into()),
                r.role().unwrap_or("-").to_owned(),
                list(&r.installed),
                list(&r.desired),
                state,
                format!(
                    "{} ({}s ago, {})",
                    utc(r.last_seen_ms),
                    now.saturating_sub(r.last_seen_ms) / 1000,
                    r.last_event.name()
                ),
            ]);
        }
        let mut text = render_table(&table);
        if rows.is_empty() {
            text.push_str("no node has reported yet\n");
        }
        Ok(ControlReply {
            success: true,
            text,
            json: to_json(&rows),
        })
    }

    fn policy_load(
        &self,
        source: &str,
        toml: &str,
        who: impl Fn(&str, String) -> Audit,
    ) -> Result<ControlReply, String> {
        let _one_change = self.one_change();
        let doc = policy_file::parse(source, toml)?;
        let packages = self.package_map().map_err(|e| e.to_string())?;
        let mut warnings = Vec::new();
        for rule in &doc.rules {
            for bundle in &rule.bundles {
                if !packages.contains_key(&(bundle.name.clone(), bundle.version.clone())) {
                    warnings.push(format!(
                        "warning: rule `{}` names {bundle}, which was never published",
                        rule.id
                    ));
                }
            }
        }
        let detail = format!(
            "{source}: {} rules, {} features, precedence {}",
            doc.rules.len(),
            doc.features.len(),
            doc.precedence
                .iter()
                .map(|k| k.name())
                .collect::<Vec<_>>()
                .join(" > ")
        );
        let mut puts = self
            .refreshed(&Change {
                doc: Some(doc.clone()),
                ..Change::default()
            })
            .map_err(|e| e.to_string())?;
        let changed_nodes = puts.len();
        puts.insert(0, Put::Policy(Box::new(doc)));
        self.db
            .commit(&puts, Some(who("policy.load", detail.clone())))
            .map_err(|e| e.to_string())?;
        let check = self.policy_check()?;
        let mut text = format!(
            "loaded {detail}\n{changed_nodes} node(s) now have other desired bundles or state\n"
        );
        for warning in warnings {
            text.push_str(&warning);
            text.push('\n');
        }
        if !check.success {
            text.push_str("the policy does not resolve every node; see `origin policy check`\n");
        }
        Ok(ControlReply {
            success: true,
            text,
            json: "null".into(),
        })
    }

    fn policy_check(&self) -> Result<ControlReply, String> {
        let store = self.db.policy_store().map_err(|e| e.to_string())?;
        let mut nodes = Vec::new();
        for record in self.db.nodes().map_err(|e| e.to_string())? {
            let inventory = self
                .effective_inventory(&record)
                .map_err(|e| e.to_string())?;
            nodes.push((record.id, inventory));
        }
        let report = policy::check(&store, &nodes);
        let success = report.is_clean() && report.conflicts.is_empty();
        let mut text = report.to_string();
        if let Err(error) = store.validate() {
            text.push_str(&format!("the policy itself is invalid: {error}\n"));
        }
        Ok(ControlReply {
            success: success && store.validate().is_ok(),
            text,
            json: to_json(&report),
        })
    }

    fn class_set(
        &self,
        node: &str,
        class: &str,
        who: impl Fn(&str, String) -> Audit,
    ) -> Result<ControlReply, String> {
        let _one_change = self.one_change();
        let record = self.find_node(node)?;
        if class.is_empty() {
            return Err("the class is empty".into());
        }
        let before = self
            .db
            .classes()
            .map_err(|e| e.to_string())?
            .remove(&record.id);
        let detail = format!(
            "node {}: class {} -> {class}",
            record.id,
            before
                .or(record.inventory.class.clone())
                .unwrap_or_else(|| "-".into())
        );
        let mut classes = self.db.classes().map_err(|e| e.to_string())?;
        classes.insert(record.id.clone(), class.to_owned());
        let mut puts = vec![Put::Class {
            node: record.id.clone(),
            class: Some(class.to_owned()),
        }];
        puts.extend(
            self.refreshed(&Change {
                classes: Some(classes),
                ..Change::default()
            })
            .map_err(|e| e.to_string())?,
        );
        self.db
            .commit(&puts, Some(who("class.set", detail.clone())))
            .map_err(|e| e.to_string())?;
        Ok(ControlReply {
            success: true,
            text: format!("{detail}\n"),
            json: "null".into(),
        })
    }

    fn override_set(
        &self,
        node: &str,
        bundle: &str,
        who: impl Fn(&str, String) -> Audit,
    ) -> Result<ControlReply, String> {
        let _one_change = self.one_change();
        let record = self.find_node(node)?;
        let pinned = policy_file::exact_bundle(bundle)?;
        if self
            .db
            .package(&pinned.name, &pinned.version)
            .map_err(|e| e.to_string())?
            .is_none()
        {
            return Err(format!(
                "{pinned} was never published; publish it first (`origin publish`)"
            ));
        }
        let mut overrides = self
            .db
            .overrides()
            .map_err(|e| e.to_string())?
            .remove(&record.id)
            .unwrap_or_default();
        overrides.retain(|b| b.name != pinned.name);
        overrides.push(pinned.clone());
        let detail = format!(
            "node {}: pin {pinned} (overrides now {})",
            record.id,
            refs(&overrides)
        );
        let puts = self
            .override_puts(&record.id, overrides)
            .map_err(|e| e.to_string())?;
        self.db
            .commit(&puts, Some(who("override.set", detail.clone())))
            .map_err(|e| e.to_string())?;
        Ok(ControlReply {
            success: true,
            text: format!("{detail}\n"),
            json: "null".into(),
        })
    }

    fn override_clear(
        &self,
        node: &str,
        name: Option<&str>,
        who: impl Fn(&str, String) -> Audit,
    ) -> Result<ControlReply, String> {
        let _one_change = self.one_change();
        let record = self.find_node(node)?;
        let before = self
            .db
            .overrides()
            .map_err(|e| e.to_string())?
            .remove(&record.id)
            .unwrap_or_default();
        let after: Vec<BundleRef> = match name {
            Some(name) => before.iter().filter(|b| b.name != name).cloned().collect(),
            None => Vec::new(),
        };
        if after.len() == before.len() {
            return Ok(ControlReply {
                success: true,
                text: format!("node {} has no such override; nothing changed\n", record.id),
                json: "null".into(),
            });
        }
        let detail = format!(
            "node {}: overrides {} -> {}",
            record.id,
            refs(&before),
            refs(&after)
        );
        let puts = self
            .override_puts(&record.id, after)
            .map_err(|e| e.to_string())?;
        self.db
            .commit(&puts, Some(who("override.clear", detail.clone())))
            .map_err(|e| e.to_string())?;
        Ok(ControlReply {
            success: true,
            text: format!("{detail}\n"),
            json: "null".into(),
        })
    }

    /// The puts that replace `node`'s overrides with `bundles`, and refresh the nodes.
    fn override_puts(&self, node: &str, bundles: Vec<BundleRef>) -> Result<Vec<Put>, DbError> {
        let mut overrides = self.db.overrides()?;
        overrides.insert(node.to_owned(), bundles.clone());
        let mut puts = vec![Put::Overrides {
            node: node.to_owned(),
            bundles,
        }];
        puts.extend(self.refreshed(&Change {
            overrides: Some(overrides),
            ..Change::default()
        })?);
        Ok(puts)
    }

    fn audit(&self, limit: usize) -> Result<ControlReply, String> {
        let records = self.db.audit(limit).map_err(|e| e.to_string())?;
        let mut table =
            vec![["SEQ", "WHEN", "ACTOR", "ROLE", "ACTION", "DETAIL"].map(str::to_owned)];
        for r in &records {
            table.push([
                r.seq.to_string(),
                utc(r.at_ms),
                short(&r.actor),
                r.role.clone(),
                r.action.clone(),
                r.detail.clone(),
            ]);
        }
        Ok(ControlReply {
            success: true,
            text: render_table(&table),
            json: to_json::<Vec<AuditRecord>>(&records),
        })
    }

    #[allow(clippy::too_many_arguments)]
    async fn rollout_start(
        &self,
        bundle: &str,
        rescue: &str,
        selector: &str,
        max_failures: u32,
        downgrade: bool,
        catalog: &Catalog,
        who: impl Fn(&str, String) -> Audit,
    ) -> Result<ControlReply, String> {
        let target = find_bundle(catalog, bundle)?;
        let rescue = find_bundle(catalog, rescue)?;
        let nodes = tokio::task::block_in_place(|| self.db.nodes()).map_err(|e| e.to_string())?;
        let status = self
            .rollouts
            .start(&nodes, &target, &rescue, selector, max_failures, downgrade)
            .await?;
        let detail = format!(
            "{}@{} (rescue {}@{}) to `{selector}`: {} waves, at most {max_failures} failures outside canaries",
            target.name,
            target.version,
            rescue.name,
            rescue.version,
            status.waves.len()
        );
        tokio::task::block_in_place(|| self.db.commit(&[], Some(who("rollout.start", detail))))
            .map_err(|e| e.to_string())?;
        Ok(rollout_reply(&status))
    }

    async fn rollout_act(
        &self,
        action: proto::wire::RolloutAction,
        who: impl Fn(&str, String) -> Audit,
    ) -> Result<ControlReply, String> {
        use proto::wire::RolloutAction;
        let status = self.rollouts.act(action).await?;
        let audited = match action {
            RolloutAction::Status => None,
            RolloutAction::Pause => Some("rollout.pause"),
            RolloutAction::Resume => Some("rollout.resume"),
            RolloutAction::Abort => Some("rollout.abort"),
        };
        if let Some(what) = audited {
            let detail = format!("{}: {}", status.bundle, status.phase);
            tokio::task::block_in_place(|| self.db.commit(&[], Some(who(what, detail))))
                .map_err(|e| e.to_string())?;
        }
        Ok(rollout_reply(&status))
    }

    async fn test_run(
        &self,
        node: &str,
        bundle: &str,
        catalog: &Catalog,
    ) -> Result<ControlReply, String> {
        let record = tokio::task::block_in_place(|| self.find_node(node))?;
        let info = find_bundle(catalog, bundle)?;
        let addr: SocketAddr = record.data_addr.parse().map_err(|_| {
            format!(
                "node {} reported no daemon address; start `edge-agent serve` on it",
                record.id
            )
        })?;
        let summary = tokio::time::timeout(TEST_RUN_TIMEOUT, self.ask_test_run(addr, info.id))
            .await
            .map_err(|_| {
                format!(
                    "node {} did not finish within {TEST_RUN_TIMEOUT:?}",
                    record.id
                )
            })??;
        let run = TestRun {
            bundle: format!("{}@{}", info.name, info.version),
            id: info.id.to_string(),
            root: summary.root.clone(),
            started_ms: now_ms(),
        };
        tracing::info!(node = %record.id, bundle = %run.bundle, root = %run.root, "test run started (in memory only)");
        self.test_runs().insert(record.id.clone(), run.clone());
        Ok(ControlReply {
            success: true,
            text: format!(
                "node {} runs {} in test mode from {} ({} bytes fetched); not persisted: a restart of the node or the origin forgets it\n",
                record.id, run.bundle, run.root, summary.fetch.bytes_received
            ),
            json: to_json(&run),
        })
    }

    async fn ask_test_run(&self, addr: SocketAddr, id: BundleId) -> Result<TestRunSummary, String> {
        let conn = connect(&self.endpoint, addr)
            .await
            .map_err(|e| format!("cannot reach the node's daemon at {addr}: {e}"))?;
        let mut recv = send_request(&conn, &Request::TestRun { bundle: id })
            .await
            .map_err(|e| e.to_string())?;
        let answer = loop {
            let frame: Option<Response> = read_frame(&mut recv, MAX_FRAME_BYTES)
                .await
                .map_err(|e| e.to_string())?;
            match frame {
                Some(Response::FetchProgress { .. }) => continue,
                Some(Response::TestRunning(summary)) => break Ok(summary),
                Some(Response::Error { code, message }) => {
                    break Err(format!("the node refused ({code:?}): {message}"))
                }
                Some(other) => break Err(format!("unexpected answer from the node: {other:?}")),
                None => break Err("the node closed the stream without an answer".into()),
            }
        };
        conn.close(0u32.into(), b"done");
        answer
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

fn bounded(mut reply: ControlReply) -> ControlReply {
    for field in [&mut reply.text, &mut reply.json] {
        if field.len() > MAX_DOCUMENT_BYTES {
            let mut cut = MAX_DOCUMENT_BYTES - 64;
            while !field.is_char_boundary(cut) {
                cut -= 1;
            }
            field.truncate(cut);
            field.push_str("\n... (cut: answer too long)\n");
        }
    }
    reply
}

fn to_json<T: Serialize + ?Sized>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
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

fn refs(bundles: &[BundleRef]) -> String {
    if bundles.is_empty() {
        return "none".into();
    }
    bundles
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

fn short(actor: &str) -> String {
    if actor.len() > 20 && actor.is_ascii() {
        format!("{}…", &actor[..16])
    } else {
        actor.to_owned()
    }
}

/// Rows as left-aligned columns; the last column is not padded.
pub fn render_table<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0usize; N];
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (column, cell) in row.iter().enumerate() {
            line.push_str(cell);
            if column + 1 < N {
                let pad = widths[column] - cell.chars().count() + 2;
                line.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `ms` since the Unix epoch as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil-from-days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

/// A published bundle by id, `NAME@VERSION` or `NAME` (the newest).
fn find_bundle(catalog: &Catalog, spec: &str) -> Result<BundleInfo, String> {
    match spec.parse::<BundleId>() {
        Ok(id) => catalog.all().into_iter().find(|b| b.id == id),
        Err(_) => {
            let (name, version) = match spec.split_once('@') {
                Some((name, version)) => (name, Some(version)),
                None => (spec, None),
            };
            catalog.resolve(name, version)
        }
    }
    .ok_or_else(|| format!("no published bundle {spec}"))
}

/// A rollout's status as a command's answer: the table for people, the JSON for machines.
fn rollout_reply(status: &crate::rollout::RolloutStatus) -> ControlReply {
    ControlReply {
        success: true,
        text: status.to_string(),
        json: serde_json::to_string(status).unwrap_or_else(|_| "null".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::utc;

    #[test]
    fn utc_times_print_as_iso_8601() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(1_709_210_096_000), "2024-02-29T12:34:56Z");
    }
}
