//! The operator's commands, server side: `origin nodes`, `policy load|check`, `class set`,
//! `override set|clear`, `audit` and `rollout ...`; each answer is bounded to what a frame can
//! carry.

// CommandError carries the policy's own errors whole so the operator sees every detail; a
// command's error is built once per command, so its size costs nothing that matters.
#![allow(clippy::result_large_err)]

use proto::manifest::BundleId;
use proto::net::PeerIdentity;
use proto::wire::{BundleInfo, ControlCommand, ControlReply, MAX_DOCUMENT_BYTES};
use serde::Serialize;

use super::{list, render_table, utc, Change, CommandError, ControlPlane, TestRun};
use crate::catalog::Catalog;
use crate::db::{now_ms, Audit, AuditRecord, Commit, DbError, NodeRecord, Put};
use crate::policy::{self, BundleRef};
use crate::policy_file;
use crate::rollout::service::{Driver, RolloutServiceError};

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
    /// Whether an operator revoked it (`origin nodes revoke`).
    pub revoked: bool,
}

impl ControlPlane {
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
            ControlCommand::Rollout { action } => match self.rollout_act(action, &who).await {
                // Another origin drives the rollout: it answers, and audits, the request.
                Err(CommandError::Rollout(RolloutServiceError::DrivenElsewhere(driver))) => {
                    self.forward(&driver, actor, ControlCommand::Rollout { action })
                        .await
                }
                other => other,
            },
            ControlCommand::KeysRotate => tokio::task::block_in_place(|| self.keys_rotate(who, "")),
            ControlCommand::KeysList => tokio::task::block_in_place(|| self.keys_list()),
            ControlCommand::KeysRetire { generation, force } => {
                tokio::task::block_in_place(|| self.keys_retire(generation, force, who))
            }
            ControlCommand::NodeRevoke { node } => {
                tokio::task::block_in_place(|| self.node_revoke(&node, who))
            }
            ControlCommand::Prepare { bundle, selector } => tokio::task::block_in_place(|| {
                self.prepare_start(&bundle, &selector, catalog, actor, who)
            }),
            ControlCommand::PrepareStatus { id } => {
                tokio::task::block_in_place(|| self.prepare_status(id))
            }
            ControlCommand::PrepareCancel { id } => tokio::task::block_in_place(|| {
                let status = self.prepares.cancel(id, actor, who)?;
                Ok(prepare_reply(&status))
            }),
            ControlCommand::AccountAdd {
                name,
                role,
                password_hash,
            } => tokio::task::block_in_place(|| {
                self.account_add(peer, &name, &role, &password_hash, who)
            }),
            ControlCommand::AccountList => tokio::task::block_in_place(|| self.account_list(peer)),
            ControlCommand::Status => tokio::task::block_in_place(|| self.status()),
            ControlCommand::BundleHolders { id } => {
                tokio::task::block_in_place(|| self.bundle_holders(&id))
            }
            ControlCommand::AccountRemove { name } => {
                tokio::task::block_in_place(|| self.account_remove(peer, &name, who))
            }
            ControlCommand::EnrollToken { role, site } => {
                tokio::task::block_in_place(|| self.enroll_token(peer, &role, &site, who))
            }
        };
        match result {
            Ok(reply) => bounded(reply),
            Err(error) => ControlReply {
                success: false,
                text: error.to_string(),
                json: "null".into(),
            },
        }
    }

    /// Finds a node by id or unique id prefix.
    pub(super) fn find_node(&self, node: &str) -> Result<NodeRecord, CommandError> {
        let nodes = self.db.nodes()?;
        if let Some(exact) = nodes.iter().find(|n| n.id == node) {
            return Ok(exact.clone());
        }
        let matching: Vec<&NodeRecord> = nodes
            .iter()
            .filter(|n| !node.is_empty() && n.id.starts_with(node))
            .collect();
        match matching.as_slice() {
            [one] => Ok((*one).clone()),
            [] => Err(CommandError::NoSuchNode(node.to_owned())),
            many => Err(CommandError::AmbiguousNode {
                prefix: node.to_owned(),
                count: many.len(),
            }),
        }
    }

    fn rows(&self) -> Result<Vec<NodeRow>, CommandError> {
        let nodes = self.db.nodes()?;
        let classes = self.db.classes()?;
        let runs = self.test_runs().clone();
        nodes
            .into_iter()
            .map(|record| {
                let assigned_class = classes.get(&record.id).cloned();
                Ok(NodeRow {
                    revoked: self.is_revoked(&record.id)?,
                    class: assigned_class
                        .clone()
                        .or_else(|| record.inventory.class.clone()),
                    assigned_class,
                    test_run: runs.get(&record.id).cloned(),
                    record,
                })
            })
            .collect()
    }

    fn nodes(&self) -> Result<ControlReply, CommandError> {
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
            let state = if row.revoked {
                format!("{state} (revoked)")
            } else {
                state
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
    ) -> Result<ControlReply, CommandError> {
        let doc = policy_file::parse(source, toml)?;
        let (detail, changed_nodes, warnings) = self.db.change(|| {
            let packages = self.package_map()?;
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
            let mut puts = self.refreshed(&Change {
                doc: Some(doc.clone()),
                ..Change::default()
            })?;
            let changed_nodes = puts.len();
            puts.insert(0, Put::Policy(Box::new(doc.clone())));
            let audit = who("policy.load", detail.clone());
            Ok::<_, CommandError>(Commit::new(
                puts,
                Some(audit),
                (detail, changed_nodes, warnings),
            ))
        })?;
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

    fn policy_check(&self) -> Result<ControlReply, CommandError> {
        let store = self.db.policy_store()?;
        let mut nodes = Vec::new();
        for record in self.db.nodes()? {
            let inventory = self.effective_inventory(&record)?;
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
    ) -> Result<ControlReply, CommandError> {
        if class.is_empty() {
            return Err(CommandError::EmptyClass);
        }
        let detail = self.db.change(|| {
            let record = self.find_node(node)?;
            let before = self.db.classes()?.remove(&record.id);
            let detail = format!(
                "node {}: class {} -> {class}",
                record.id,
                before
                    .or(record.inventory.class.clone())
                    .unwrap_or_else(|| "-".into())
            );
            let mut classes = self.db.classes()?;
            classes.insert(record.id.clone(), class.to_owned());
            let mut puts = vec![Put::Class {
                node: record.id.clone(),
                class: Some(class.to_owned()),
            }];
            puts.extend(self.refreshed(&Change {
                classes: Some(classes),
                ..Change::default()
            })?);
            let audit = who("class.set", detail.clone());
            Ok::<_, CommandError>(Commit::new(puts, Some(audit), detail))
        })?;
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
    ) -> Result<ControlReply, CommandError> {
        let pinned = policy_file::exact_bundle(bundle)?;
        let detail = self.db.change(|| {
            let record = self.find_node(node)?;
            if self.db.package(&pinned.name, &pinned.version)?.is_none() {
                return Err(CommandError::NeverPublished(pinned.clone()));
            }
            let mut overrides = self.db.overrides()?.remove(&record.id).unwrap_or_default();
            overrides.retain(|b| b.name != pinned.name);
            overrides.push(pinned.clone());
            let detail = format!(
                "node {}: pin {pinned} (overrides now {})",
                record.id,
                refs(&overrides)
            );
            let puts = self.override_puts(&record.id, overrides)?;
            let audit = who("override.set", detail.clone());
            Ok::<_, CommandError>(Commit::new(puts, Some(audit), detail))
        })?;
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
    ) -> Result<ControlReply, CommandError> {
        let outcome = self.db.change(|| {
            let record = self.find_node(node)?;
            let before = self.db.overrides()?.remove(&record.id).unwrap_or_default();
            let after: Vec<BundleRef> = match name {
                Some(name) => before.iter().filter(|b| b.name != name).cloned().collect(),
                None => Vec::new(),
            };
            if after.len() == before.len() {
                return Ok(Commit::none(Err(record.id)));
            }
            let detail = format!(
                "node {}: overrides {} -> {}",
                record.id,
                refs(&before),
                refs(&after)
            );
            let puts = self.override_puts(&record.id, after)?;
            let audit = who("override.clear", detail.clone());
            Ok::<_, CommandError>(Commit::new(puts, Some(audit), Ok(detail)))
        })?;
        let detail = match outcome {
            Ok(detail) => detail,
            Err(node) => {
                return Ok(ControlReply {
                    success: true,
                    text: format!("node {node} has no such override; nothing changed\n"),
                    json: "null".into(),
                })
            }
        };
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

    /// `origin status`: the store, its members' health, the origins up with how many
    /// published bundles each still lacks (its replication lag), and the one that drives
    /// rollouts.
    fn status(&self) -> Result<ControlReply, CommandError> {
        let config = self.db.config();
        let health = self.db.health()?;
        let origins = self.db.origins()?;
        let published: std::collections::BTreeSet<String> = self
            .db
            .packages()?
            .into_iter()
            .map(|p| p.id.to_string())
            .collect();
        let mut held: std::collections::BTreeMap<String, usize> = Default::default();
        for (id, node) in self.db.held()? {
            if published.contains(&id) {
                *held.entry(node).or_default() += 1;
            }
        }
        let lacking = |node: &str| {
            published
                .len()
                .saturating_sub(held.get(node).copied().unwrap_or(0))
        };
        let driver = self.rollouts.leader()?;
        let mut text = format!("store: {} ({})\n", config.backend(), config);
        for line in &health {
            text.push_str(&format!("  {line}\n"));
        }
        let mut table = vec![[
            "ORIGIN", "MESH", "ENROLL", "METRICS", "UP SINCE", "VERSION", "LACKS", "ROLLOUTS",
        ]
        .map(str::to_owned)];
        for o in &origins {
            table.push([
                short(&o.node_id),
                o.mesh.clone(),
                o.enroll.clone(),
                o.metrics.clone(),
                utc(o.started_ms),
                o.version.clone(),
                format!("{} of {}", lacking(&o.node_id), published.len()),
                if driver.as_ref().is_some_and(|d| d.node_id == o.node_id) {
                    "drives".into()
                } else {
                    String::new()
                },
            ]);
        }
        text.push_str(&format!("origins up: {}\n", origins.len()));
        text.push_str(&render_table(&table));
        match &driver {
            Some(d) => text.push_str(&format!("rollouts driven by {}\n", d.node_id)),
            None => text.push_str("rollouts driven by: none elected\n"),
        }
        #[derive(serde::Serialize)]
        struct OriginRow<'a> {
            #[serde(flatten)]
            record: &'a crate::db::OriginRecord,
            /// Published bundles it does not hold yet.
            lacks: usize,
        }
        #[derive(serde::Serialize)]
        struct Status<'a> {
            backend: &'a str,
            store: String,
            members: &'a [String],
            origins: Vec<OriginRow<'a>>,
            published: usize,
            rollout_driver: Option<Driver>,
        }
        Ok(ControlReply {
            success: true,
            text,
            json: to_json(&Status {
                backend: config.backend(),
                store: config.to_string(),
                members: &health,
                origins: origins
                    .iter()
                    .map(|record| OriginRow {
                        record,
                        lacks: lacking(&record.node_id),
                    })
                    .collect(),
                published: published.len(),
                rollout_driver: driver,
            }),
        })
    }

    /// Which origins up hold bundle `id`: JSON `{"holders": [...], "up": [...]}` (node ids).
    fn bundle_holders(&self, id: &proto::manifest::BundleId) -> Result<ControlReply, CommandError> {
        let holders = self.db.holders(id)?;
        let up: Vec<String> = self.db.origins()?.into_iter().map(|o| o.node_id).collect();
        Ok(ControlReply {
            success: true,
            text: format!(
                "{id}: held by {} of the {} origins up",
                holders.len(),
                up.len()
            ),
            json: to_json(&serde_json::json!({ "holders": holders, "up": up })),
        })
    }

    fn audit(&self, limit: usize) -> Result<ControlReply, CommandError> {
        let records = self.db.audit(limit)?;
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
    ) -> Result<ControlReply, CommandError> {
        let target = find_bundle(catalog, bundle)?;
        let rescue = find_bundle(catalog, rescue)?;
        let nodes = tokio::task::block_in_place(|| self.db.nodes())?;
        tokio::task::block_in_place(|| {
            self.refuse_plain_rollout(&nodes, selector, &[&target, &rescue])
        })?;
        let audit = |status: &crate::rollout::plan::RolloutStatus| {
            who(
                "rollout.start",
                format!(
                    "{}@{} (rescue {}@{}) to `{selector}`: {} waves, at most {max_failures} failures outside canaries",
                    target.name,
                    target.version,
                    rescue.name,
                    rescue.version,
                    status.waves.len()
                ),
            )
        };
        let status = self
            .rollouts
            .start(
                &nodes,
                &target,
                &rescue,
                selector,
                max_failures,
                downgrade,
                audit,
            )
            .await?;
        Ok(rollout_reply(&status))
    }

    /// `origin prepare BUNDLE --to SELECTOR`: stores the operation and asks the online nodes.
    fn prepare_start(
        &self,
        bundle: &str,
        selector: &str,
        catalog: &Catalog,
        actor: &str,
        who: impl Fn(&str, String) -> Audit,
    ) -> Result<ControlReply, CommandError> {
        let target = find_bundle(catalog, bundle)?;
        let nodes = self.db.nodes()?;
        let picked = crate::rollout::service::select(&nodes, selector)
            .map_err(crate::rollout::service::RolloutServiceError::from)?;
        self.refuse_plain_rollout(&nodes, selector, &[&target])?;
        let status = self
            .prepares
            .start(&target, selector, &picked, who, actor)?;
        Ok(prepare_reply(&status))
    }

    /// `origin prepare status [ID]`.
    fn prepare_status(&self, id: Option<u64>) -> Result<ControlReply, CommandError> {
        let status = self.prepares.status(id)?.ok_or(match id {
            Some(id) => CommandError::NoSuchPrepare(id),
            None => CommandError::NoPrepare,
        })?;
        Ok(prepare_reply(&status))
    }

    /// Status, pause, resume or abort of the rollout, audited with `who` (the CLI's operator
    /// or a console account).
    pub(crate) async fn rollout_act(
        &self,
        action: proto::wire::RolloutAction,
        who: &impl Fn(&str, String) -> Audit,
    ) -> Result<ControlReply, CommandError> {
        use proto::wire::RolloutAction;
        let status = self.rollouts.act(action).await?;
        let audited = match action {
            RolloutAction::Status => None,
            RolloutAction::Pause => Some("rollout.pause"),
            RolloutAction::Resume => Some("rollout.resume"),
            RolloutAction::Abort => Some("rollout.abort"),
        };
        if let Some(what) = audited {
            self.rollout_changed.notify_one();
            let detail = format!("{}: {}", status.bundle, status.phase);
            tokio::task::block_in_place(|| self.db.commit(&[], Some(who(what, detail))))?;
        }
        Ok(rollout_reply(&status))
    }
}

impl ControlPlane {
    /// Asks the origin that drives the rollout to run `command` for `actor`, with this
    /// origin's certificate, and returns its answer.
    async fn forward(
        &self,
        driver: &Driver,
        actor: &str,
        command: ControlCommand,
    ) -> Result<ControlReply, CommandError> {
        let asked = async {
            let addr: std::net::SocketAddr = driver.mesh.parse()?;
            let conn = proto::net::connect(&self.endpoint, addr).await?;
            crate::admin::ask(&conn, actor, command).await
        };
        asked.await.map_err(|error| {
            CommandError::Forward(format!(
                "origin {} at {} drives the rollout: {error:#}; if it died, another origin takes over within {} s: try again",
                driver.node_id,
                driver.mesh,
                crate::db::LIVE_TTL.as_secs()
            ))
        })
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

pub(super) fn to_json<T: Serialize + ?Sized>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
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

/// A published bundle by id, `NAME@VERSION` or `NAME` (the newest).
pub(super) fn find_bundle(catalog: &Catalog, spec: &str) -> Result<BundleInfo, CommandError> {
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
    .ok_or_else(|| CommandError::NoSuchBundle(spec.to_owned()))
}

/// A prepare operation's status as a command's answer.
fn prepare_reply(status: &super::PrepareStatus) -> ControlReply {
    ControlReply {
        success: true,
        text: status.render(),
        json: to_json(status),
    }
}

/// A rollout's status as a command's answer: the table for people, the JSON for machines.
fn rollout_reply(status: &crate::rollout::plan::RolloutStatus) -> ControlReply {
    ControlReply {
        success: true,
        text: status.to_string(),
        json: serde_json::to_string(status).unwrap_or_else(|_| "null".into()),
    }
}
