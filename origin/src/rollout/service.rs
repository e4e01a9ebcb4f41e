//! `origin rollout start|status|pause|resume|abort`, server side: one rollout at a time, kept
//! in the control-plane store (table `rollouts`) and driven by exactly one origin.
//!
//! Every origin sharing the store campaigns in the store's election ([`ROLLOUT_ELECTION`]:
//! etcd's election API under the origin's lease; with the embedded RocksDB the one origin leads
//! at once). The leader takes up the stored rollout: it bumps the record's epoch and names
//! itself its driver in one change, then runs [`super::driver`] over the mesh and saves the
//! rollout after every step with the nodes' outcomes as audit records, each save committing
//! only while the stored epoch is still its own (a deposed driver's save fails and its driver
//! stops). When the leader dies its lease ends within [`crate::db::LIVE_TTL`], another origin
//! is elected and resumes the rollout from the store: nodes that had reported are not offered
//! again, and nodes whose offer was out are asked how their swap stands before anything else
//! ([`crate::remote::resume_swap`]), so no node swaps twice and none is skipped. The canary
//! rule holds because the waves and their states are the stored plan's.
//!
//! `start` commits the new rollout on any origin (the leader takes it up within half a
//! second); `pause`, `resume` and `abort` go to the driving origin ([`RolloutService::act`]
//! says which one when this is not it); `status` reads the store.
//!
//! Installing on a node is the remote OS swap (`StartSwap` to the node's daemon, at the address
//! it last reported): the node fetches the bundle and the rescue OS from its site, swaps, runs
//! its health checks, and rolls itself back when they fail. So a node reported as failed is
//! already back on a bootable OS; the rollout's roll-back step records that and logs it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex as SyncMutex, OnceLock};
use std::time::Duration;

use proto::manifest::BundleId;
use proto::wire::{BundleInfo, RolloutAction};
use tokio::sync::{Mutex, Notify};

use super::driver::{self, Fleet, RolloutHandle, StepError};
use super::plan::RolloutError;
use super::plan::{
    FailureThreshold, NodeReport, NodeState, Phase, Rollout, RolloutOptions, RolloutStatus, Target,
};
use crate::db::{Audit, Commit, Db, DbError, Leadership, NodeRecord, Put, ROLLOUT_ELECTION};
use crate::policy::BundleRef;

/// File name of the rollout as origins before issue 14 saved it in their home; imported into
/// the store at start (and renamed `rollout.json.imported`).
pub const LEGACY_STATE_FILE: &str = "rollout.json";

/// How often the driving origin checks that it still leads, and every origin reads the stored
/// rollout.
pub const LEADER_CHECK: Duration = Duration::from_millis(500);

/// How long one campaign waits before it is made again.
const CAMPAIGN_WAIT: Duration = Duration::from_secs(10);

/// Why an `origin rollout ...` command failed; the message is the operator's answer.
#[derive(Debug, thiserror::Error)]
pub enum RolloutServiceError {
    /// One rollout at a time.
    #[error("a rollout is already running; `origin rollout status` shows it, `abort` ends it")]
    AlreadyRunning,
    /// The selector is malformed or picks no node.
    #[error(transparent)]
    Select(#[from] SelectError),
    /// The rollout refused the request (see [`RolloutError`]).
    #[error(transparent)]
    Rollout(#[from] RolloutError),
    /// No rollout was ever started here.
    #[error("no rollout has been started on this origin")]
    NeverStarted,
    /// The last rollout ended; only its status can be asked.
    #[error("the rollout is no longer running ({0})")]
    NotRunning(Phase),
    /// Another origin drives the rollout: the request must go there.
    #[error("origin {} at {} drives the rollout", .0.node_id, .0.mesh)]
    DrivenElsewhere(Driver),
    /// No origin drives the rollout right now (the last driver died and the next is not
    /// elected yet, or it has not taken the rollout up yet).
    #[error("no origin drives the rollout right now (the next takes it up within {} s of the last one's death): try again", crate::db::LIVE_TTL.as_secs())]
    NoDriver,
    /// The store refused or did not answer.
    #[error(transparent)]
    Store(#[from] DbError),
    /// The legacy rollout file cannot be read.
    #[error("{}: {error}", path.display())]
    Legacy {
        /// The file.
        path: PathBuf,
        /// Why.
        error: String,
    },
}

/// A selector that picks no node, or that does not parse.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum SelectError {
    /// A term without `=`.
    #[error("selector term `{0}` is not KEY=VALUE (or use `all`)")]
    NotKeyValue(String),
    /// A key other than site, class, role, node.
    #[error("unknown selector key `{0}`: use site, class, role or node")]
    UnknownKey(String),
    /// Nothing matches.
    #[error("selector `{selector}` matches none of the {nodes} nodes that reported")]
    NoMatch {
        /// The selector as given.
        selector: String,
        /// How many nodes reported.
        nodes: usize,
    },
}

/// The rollout as the store keeps it: the plan's state, what its fleet needs to go on, and
/// which origin drives it.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RolloutRecord {
    /// The plan and every node's state.
    pub rollout: Rollout,
    /// The bundle installed.
    pub target: BundleId,
    /// The rescue OS every swap keeps.
    pub rescue: BundleId,
    /// Node id → daemon address, as reported when the rollout started.
    pub addrs: BTreeMap<String, String>,
    /// The node id of the origin that drives it; empty until one took it up.
    #[serde(default)]
    pub driver: String,
    /// Raised by each start and each takeover: a driver's save commits only while the stored
    /// epoch is the one it took the rollout at.
    #[serde(default)]
    pub epoch: u64,
}

/// The origin that drives rollouts, as it campaigned.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Driver {
    /// Its node id.
    pub node_id: String,
    /// Its mesh address (control requests go there).
    pub mesh: String,
}

/// The fleet over the mesh: installs are remote swaps.
struct MeshFleet {
    endpoint: quinn::Endpoint,
    target: BundleId,
    rescue: BundleId,
    addrs: BTreeMap<String, String>,
}

impl MeshFleet {
    fn addr(&self, node: &str) -> Option<SocketAddr> {
        self.addrs.get(node).and_then(|a| a.parse().ok())
    }
}

fn report(result: anyhow::Result<(String, Option<String>)>) -> NodeReport {
    match result {
        Ok((_, None)) => NodeReport::Healthy,
        Ok((outcome, Some(why))) => NodeReport::Failed {
            reason: format!("{outcome}: {why}"),
        },
        Err(error) => NodeReport::Failed {
            reason: format!("{error:#}"),
        },
    }
}

fn no_address() -> NodeReport {
    NodeReport::Failed {
        reason: "the node reported no daemon address".into(),
    }
}

impl Fleet for MeshFleet {
    async fn install(&self, node: &str, _bundle: &BundleRef) -> NodeReport {
        let Some(addr) = self.addr(node) else {
            return no_address();
        };
        report(crate::remote::swap_edge(&self.endpoint, addr, self.target, self.rescue).await)
    }

    async fn resume_install(&self, node: &str, _bundle: &BundleRef) -> NodeReport {
        let Some(addr) = self.addr(node) else {
            return no_address();
        };
        report(crate::remote::resume_swap(&self.endpoint, addr, self.target, self.rescue).await)
    }

    async fn roll_back(
        &self,
        node: &str,
        bundle: &BundleRef,
        to_version: Option<&str>,
    ) -> Result<(), StepError> {
        // The node's swap already reverted to a bootable OS when its health check failed.
        tracing::warn!(
            %node,
            %bundle,
            to = to_version.unwrap_or("its rescue OS"),
            "rollout: node rolled back (its swap reverted itself)"
        );
        Ok(())
    }
}

/// The driver this origin runs, at the epoch it took the rollout at.
struct Running {
    handle: RolloutHandle,
    task: tokio::task::JoinHandle<Rollout>,
    epoch: u64,
}

/// The rollouts of an origin: the one it drives while it leads, and the stored state.
pub struct RolloutService {
    db: Arc<Db>,
    endpoint: quinn::Endpoint,
    running: Mutex<Option<Running>>,
    /// This origin, once it campaigns ([`RolloutService::lead`]).
    me: OnceLock<Driver>,
    /// The stored rollout as last read or saved here (what keep-sets and status read).
    cached: Arc<SyncMutex<Option<RolloutRecord>>>,
    /// Woken when a rollout was started here, so the leader takes it up at once.
    wake: Notify,
}

impl RolloutService {
    /// Rollouts kept in `db`; `endpoint` carries the origin's certificate (the only one edges
    /// take a swap from). A rollout saved in `home_dir` by an origin before the store kept
    /// rollouts is imported once. Nothing is driven until [`RolloutService::lead`].
    pub fn new(db: Arc<Db>, home_dir: &Path, endpoint: quinn::Endpoint) -> Self {
        let rollouts = Self {
            db,
            endpoint,
            running: Mutex::new(None),
            me: OnceLock::new(),
            cached: Arc::default(),
            wake: Notify::new(),
        };
        if let Err(error) = rollouts.import_legacy(&home_dir.join(LEGACY_STATE_FILE)) {
            tracing::error!(%error, "cannot import the rollout saved by an older origin; ignoring it");
        }
        rollouts.refresh();
        rollouts
    }

    fn import_legacy(&self, file: &Path) -> Result<(), RolloutServiceError> {
        let legacy = |error: String| RolloutServiceError::Legacy {
            path: file.to_owned(),
            error,
        };
        let bytes = match std::fs::read(file) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(legacy(e.to_string())),
        };
        let record: RolloutRecord =
            serde_json::from_slice(&bytes).map_err(|e| legacy(e.to_string()))?;
        let imported = self.db.change(|| {
            if self.db.rollout()?.is_some() {
                return Ok::<_, DbError>(Commit::none(false));
            }
            Ok(Commit::new(
                vec![Put::Rollout(Box::new(record.clone()))],
                None,
                true,
            ))
        })?;
        let done = file.with_extension("json.imported");
        std::fs::rename(file, &done).map_err(|e| legacy(e.to_string()))?;
        if imported {
            tracing::info!(file = %file.display(), "imported the saved rollout into the store");
        }
        Ok(())
    }

    /// Reads the stored rollout into the cache; a store that does not answer keeps the last.
    fn refresh(&self) -> Option<RolloutRecord> {
        match self.db.rollout() {
            Ok(record) => {
                *self.cached.lock().unwrap_or_else(|e| e.into_inner()) = record.clone();
                record
            }
            Err(error) => {
                tracing::debug!(%error, "cannot read the stored rollout");
                self.cached
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone()
            }
        }
    }

    fn cached(&self) -> Option<RolloutRecord> {
        self.cached
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Starts campaigning to drive rollouts as origin `node_id` at mesh address `mesh`, and
    /// drives the stored rollout whenever this origin leads.
    /// `driving` (a gauge) is 1 while it does.
    pub fn lead(self: &Arc<Self>, node_id: String, mesh: String, driving: proto::metrics::Counter) {
        if self.me.set(Driver { node_id, mesh }).is_err() {
            return;
        }
        tokio::spawn(self.clone().leadership(driving));
        // Every origin, driving or not, keeps its view of the stored rollout fresh.
        let this = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(LEADER_CHECK).await;
                let Some(this) = this.upgrade() else {
                    return;
                };
                if tokio::task::spawn_blocking(move || this.refresh())
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
    }

    /// The origin that drives rollouts now, if another than this one (`None` when this one
    /// does, or none is elected).
    pub fn driven_elsewhere(&self) -> Option<Driver> {
        let me = self.me.get()?;
        let leader = self.leader().ok().flatten()?;
        (leader.node_id != me.node_id).then_some(leader)
    }

    /// The origin that leads the election (this one or another), for `origin status`.
    pub fn leader(&self) -> Result<Option<Driver>, DbError> {
        Ok(self
            .db
            .leader(ROLLOUT_ELECTION)?
            .and_then(|(_, value)| serde_json::from_slice(&value).ok()))
    }

    async fn leadership(self: Arc<Self>, driving: proto::metrics::Counter) {
        let Some(me) = self.me.get().cloned() else {
            return;
        };
        let value = serde_json::to_vec(&me).unwrap_or_default();
        loop {
            let (db, value2) = (self.db.clone(), value.clone());
            let won = tokio::task::spawn_blocking(move || {
                db.campaign(ROLLOUT_ELECTION, &value2, CAMPAIGN_WAIT)
            })
            .await;
            let leadership = match won {
                Ok(Ok(Some(leadership))) => leadership,
                Ok(Ok(None)) => continue,
                Ok(Err(error)) => {
                    tracing::warn!(%error, "cannot campaign to drive rollouts; trying again");
                    tokio::time::sleep(LEADER_CHECK * 4).await;
                    continue;
                }
                Err(join) => {
                    tracing::error!(%join, "the campaign task failed");
                    tokio::time::sleep(LEADER_CHECK * 4).await;
                    continue;
                }
            };
            tracing::info!(origin = %me.node_id, "this origin now drives rollouts");
            driving.set(1);
            self.hold(&me, &leadership).await;
            driving.set(0);
            tracing::warn!(origin = %me.node_id, "this origin no longer drives rollouts");
            if let Some(running) = self.running.lock().await.take() {
                running.task.abort();
            }
        }
    }

    /// While this origin leads: takes up the stored rollout whenever it needs a driver, and
    /// returns once the leadership cannot be confirmed (lost, or the store does not answer).
    async fn hold(&self, me: &Driver, leadership: &Leadership) {
        loop {
            if let Err(error) = self.take_up(me).await {
                tracing::warn!(%error, "cannot take up the stored rollout yet");
            }
            tokio::select! {
                () = tokio::time::sleep(LEADER_CHECK) => {}
                () = self.wake.notified() => {}
            }
            let db = self.db.clone();
            let leader = tokio::task::spawn_blocking(move || db.leader(ROLLOUT_ELECTION)).await;
            match leader {
                Ok(Ok(Some((current, _)))) if current == *leadership => {}
                Ok(Ok(other)) => {
                    tracing::warn!(leader = ?other.map(|(l, _)| String::from_utf8_lossy(&l.key).into_owned()), "the rollout election has another leader");
                    return;
                }
                Ok(Err(error)) => {
                    tracing::warn!(%error, "cannot confirm this origin still leads; it stops driving");
                    return;
                }
                Err(_) => return,
            }
        }
    }

    /// Drives the stored rollout if it needs a driver and this origin does not drive it yet.
    async fn take_up(&self, me: &Driver) -> Result<(), RolloutServiceError> {
        // The refresher keeps the cache within [`LEADER_CHECK`] of the store (a start here sets
        // it at once); the takeover below reads the store itself.
        let stored = self.cached();
        let mut running = self.running.lock().await;
        let Some(stored) = stored else {
            return Ok(());
        };
        if let Some(current) = running.as_ref() {
            if current.epoch == stored.epoch && !current.task.is_finished() {
                return Ok(());
            }
        }
        if !stored.rollout.active() {
            *running = None;
            return Ok(());
        }
        let taken = tokio::task::block_in_place(|| {
            self.db.change(|| {
                let Some(mut record) = self.db.rollout()? else {
                    return Ok::<_, DbError>(Commit::none(None));
                };
                if !record.rollout.active() {
                    return Ok(Commit::none(None));
                }
                let previous = std::mem::replace(&mut record.driver, me.node_id.clone());
                record.epoch += 1;
                let in_flight = record.rollout.in_flight();
                let audit = (!previous.is_empty()).then(|| {
                    Audit::new(
                        me.node_id.clone(),
                        "origin",
                        "rollout.takeover",
                        format!(
                            "{}: driven by origin {} from epoch {} (was {previous}); {} offers out: {}",
                            record.rollout.bundle(),
                            me.node_id,
                            record.epoch,
                            in_flight.len(),
                            in_flight.join(", ")
                        ),
                    )
                });
                Ok(Commit::new(
                    vec![Put::Rollout(Box::new(record.clone()))],
                    audit,
                    Some(record),
                ))
            })
        })?;
        let Some(record) = taken else {
            return Ok(());
        };
        tracing::info!(bundle = %record.rollout.bundle(), epoch = record.epoch, "driving the stored rollout");
        *self.cached.lock().unwrap_or_else(|e| e.into_inner()) = Some(record.clone());
        if let Some(old) = running.take() {
            old.task.abort();
        }
        *running = Some(self.spawn(record, me.node_id.clone()));
        Ok(())
    }

    /// What the rollout asks its nodes to keep while it runs or is paused: its target and
    /// rescue. `None` when no rollout is under way.
    pub fn kept(&self) -> Option<crate::keep::RolloutKeep> {
        let saved = self.cached()?;
        if !matches!(saved.rollout.phase(), Phase::Running | Phase::Paused) {
            return None;
        }
        Some(crate::keep::RolloutKeep {
            target: saved.target,
            rescue: saved.rescue,
            nodes: saved.addrs.keys().cloned().collect(),
        })
    }

    /// The rollout's status as last stored (its driver saves every change), read without
    /// asking the driver; `None` before the first rollout.
    pub fn saved_status(&self) -> Option<RolloutStatus> {
        Some(self.cached()?.rollout.status())
    }

    fn spawn(&self, record: RolloutRecord, me: String) -> Running {
        let fleet = Arc::new(MeshFleet {
            endpoint: self.endpoint.clone(),
            target: record.target,
            rescue: record.rescue,
            addrs: record.addrs.clone(),
        });
        let epoch = record.epoch;
        let db = self.db.clone();
        let stop: Arc<OnceLock<tokio::task::AbortHandle>> = Arc::default();
        let stop_on_loss = stop.clone();
        let mut last = record.clone();
        let cached = self.cached.clone();
        let save = move |rollout: &Rollout| -> Result<(), StepError> {
            if last.rollout == *rollout {
                return Ok(());
            }
            let mut next = last.clone();
            next.rollout = rollout.clone();
            let audit = steps(&last.rollout, rollout, &me);
            let saved = tokio::task::block_in_place(|| {
                db.change(|| {
                    let stored = db.rollout()?;
                    if stored.as_ref().map(|r| (r.epoch, r.driver.as_str()))
                        != Some((epoch, me.as_str()))
                    {
                        return Ok::<_, DbError>(Commit::none(false));
                    }
                    Ok(Commit::new(
                        vec![Put::Rollout(Box::new(next.clone()))],
                        audit.clone(),
                        true,
                    ))
                })
            })?;
            if !saved {
                // Another origin took the rollout over: this driver must not act again.
                if let Some(handle) = stop_on_loss.get() {
                    handle.abort();
                }
                return Err(format!(
                    "another origin drives the rollout now (this origin's epoch {epoch} is over); this driver stops"
                )
                .into());
            }
            *cached.lock().unwrap_or_else(|e| e.into_inner()) = Some(next.clone());
            last = next;
            Ok(())
        };
        let (handle, task) = driver::spawn(record.rollout, fleet, save);
        let _ = stop.set(task.abort_handle());
        Running {
            handle,
            task,
            epoch,
        }
    }

    /// Starts a rollout of `target` (with `rescue`) to the `nodes` that `selector` picks,
    /// committed with `audit`; the driving origin takes it up.
    #[allow(clippy::too_many_arguments)]
    pub async fn start(
        &self,
        nodes: &[NodeRecord],
        target: &BundleInfo,
        rescue: &BundleInfo,
        selector: &str,
        max_failures: u32,
        downgrade: bool,
        audit: impl Fn(&RolloutStatus) -> Audit,
    ) -> Result<RolloutStatus, RolloutServiceError> {
        let picked = select(nodes, selector)?;
        let targets: Vec<Target> = picked
            .iter()
            .map(|n| Target::new(n.id.clone(), n.site.clone()))
            .collect();
        let current: BTreeMap<String, String> = picked
            .iter()
            .filter_map(|n| {
                n.installed
                    .iter()
                    .find(|b| b.name == target.name)
                    .map(|b| (n.id.clone(), b.version.clone()))
            })
            .collect();
        let rollout = Rollout::new(
            BundleRef::new(target.name.clone(), target.version.clone()),
            targets,
            &current,
            RolloutOptions {
                failure_threshold: FailureThreshold::Count(max_failures),
                downgrade,
            },
        )?;
        let status = rollout.status();
        let audit = audit(&status);
        let mut record = RolloutRecord {
            rollout,
            target: target.id,
            rescue: rescue.id,
            addrs: picked
                .iter()
                .map(|n| (n.id.clone(), n.data_addr.clone()))
                .collect(),
            driver: String::new(),
            epoch: 0,
        };
        let record = tokio::task::block_in_place(|| {
            self.db.change(|| {
                let stored = self.db.rollout()?;
                if stored.as_ref().is_some_and(|r| r.rollout.active()) {
                    return Err(RolloutServiceError::AlreadyRunning);
                }
                record.epoch = stored.map_or(0, |r| r.epoch) + 1;
                Ok(Commit::new(
                    vec![Put::Rollout(Box::new(record.clone()))],
                    Some(audit.clone()),
                    record.clone(),
                ))
            })
        })?;
        *self.cached.lock().unwrap_or_else(|e| e.into_inner()) = Some(record);
        self.wake.notify_one();
        Ok(status)
    }

    /// Status, pause, resume or abort. The status comes from the driver when this origin
    /// drives, else from the store; the others only the driving origin answers
    /// ([`RolloutServiceError::DrivenElsewhere`] names it).
    pub async fn act(&self, action: RolloutAction) -> Result<RolloutStatus, RolloutServiceError> {
        // A rollout just started here is taken up by this origin's driver within moments.
        for _ in 0..20 {
            {
                let running = self.running.lock().await;
                if let Some(current) = running.as_ref() {
                    let answer = match action {
                        RolloutAction::Status => current.handle.status().await.map(Ok),
                        RolloutAction::Pause => current.handle.pause().await,
                        RolloutAction::Resume => current.handle.resume().await,
                        RolloutAction::Abort => current.handle.abort().await,
                    };
                    if let Ok(result) = answer {
                        return result.map_err(RolloutServiceError::from);
                    }
                }
            }
            let saved = tokio::task::block_in_place(|| self.refresh())
                .ok_or(RolloutServiceError::NeverStarted)?;
            match action {
                RolloutAction::Status => return Ok(saved.rollout.status()),
                _ if !matches!(saved.rollout.phase(), Phase::Running | Phase::Paused) => {
                    return Err(RolloutServiceError::NotRunning(
                        saved.rollout.phase().clone(),
                    ))
                }
                _ => {
                    if let Some(driver) = tokio::task::block_in_place(|| self.driven_elsewhere()) {
                        return Err(RolloutServiceError::DrivenElsewhere(driver));
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(RolloutServiceError::NoDriver)
    }
}

/// The audit record of a save: the nodes whose state changed (offered, healthy, failed) and
/// the end of the rollout, or `None` when only the wave pointer moved.
fn steps(before: &Rollout, after: &Rollout, me: &str) -> Option<Audit> {
    let (old, new) = (before.status(), after.status());
    let mut changes = Vec::new();
    for node in new.waves.iter().flat_map(|w| &w.nodes) {
        let was = old.node(&node.node).map(|n| &n.state);
        if was != Some(&node.state) && !matches!(node.state, NodeState::Pending) {
            changes.push(format!("{} {}", node.node, node.state));
        }
    }
    if old.phase != new.phase && matches!(new.phase, Phase::Done | Phase::Halted { .. }) {
        changes.push(format!("rollout {}", new.phase));
    }
    (!changes.is_empty()).then(|| {
        Audit::new(
            me,
            "origin",
            "rollout.step",
            format!("{}: {}", new.bundle, changes.join("; ")),
        )
    })
}

/// The nodes `selector` picks, in site order then node id: `all`, or comma-separated
/// `KEY=VALUE` terms (site, class, role, node — a node id or unique prefix) that must all match.
pub fn select<'a>(
    nodes: &'a [NodeRecord],
    selector: &str,
) -> Result<Vec<&'a NodeRecord>, SelectError> {
    let mut terms = Vec::new();
    if selector.trim() != "all" {
        for term in selector.split(',') {
            let (key, value) = term
                .split_once('=')
                .ok_or_else(|| SelectError::NotKeyValue(term.to_owned()))?;
            let key = key.trim();
            if !matches!(key, "site" | "class" | "role" | "node") {
                return Err(SelectError::UnknownKey(key.to_owned()));
            }
            terms.push((key.to_owned(), value.trim().to_owned()));
        }
    }
    let mut picked: Vec<&NodeRecord> = nodes
        .iter()
        .filter(|n| {
            terms.iter().all(|(key, value)| match key.as_str() {
                "site" => n.site == *value,
                "class" => n.inventory.class.as_deref() == Some(value),
                "role" => n.role() == Some(value),
                _ => n.id.starts_with(value.as_str()),
            })
        })
        .collect();
    if picked.is_empty() {
        return Err(SelectError::NoMatch {
            selector: selector.to_owned(),
            nodes: nodes.len(),
        });
    }
    picked.sort_by(|a, b| (&a.site, &a.id).cmp(&(&b.site, &b.id)));
    Ok(picked)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::NodeState;
    use proto::inventory::Inventory;
    use proto::wire::ReportEvent;

    fn node(id: &str, site: &str, role: &str) -> NodeRecord {
        NodeRecord {
            id: id.into(),
            site: site.into(),
            inventory: Inventory {
                role: Some(role.into()),
                ..Inventory::default()
            },
            installed: vec![],
            held: vec![],
            desired: vec![],
            state: NodeState::Reported,
            state_detail: String::new(),
            data_addr: String::new(),
            first_seen_ms: 0,
            last_seen_ms: 0,
            last_event: ReportEvent::Started,
            reports: 1,
        }
    }

    #[test]
    fn selectors_pick_in_site_then_id_order_and_refuse_nonsense() {
        let nodes = vec![
            node("b2", "west", "web"),
            node("a1", "east", "db"),
            node("b1", "west", "web"),
            node("a2", "east", "web"),
        ];
        let ids = |sel: &str| -> Vec<String> {
            select(&nodes, sel)
                .expect("selects")
                .iter()
                .map(|n| n.id.clone())
                .collect()
        };
        assert_eq!(ids("all"), ["a1", "a2", "b1", "b2"]);
        assert_eq!(ids("site=west"), ["b1", "b2"]);
        assert_eq!(ids("role=web"), ["a2", "b1", "b2"]);
        assert_eq!(ids("role=web,site=east"), ["a2"]);
        assert_eq!(ids("node=b"), ["b1", "b2"]);
        assert!(select(&nodes, "site=north").is_err());
        assert!(select(&nodes, "colour=red").is_err());
        assert!(select(&nodes, "west").is_err());
    }
}
