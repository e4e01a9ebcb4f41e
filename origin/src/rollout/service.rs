//! `origin rollout start|status|pause|resume|abort`, server side: one rollout at a time, run by
//! [`super::driver`] over the mesh, saved to `rollout.json` in the origin's home after
//! every step and resumed from there when `origin serve` restarts.
//!
//! Installing on a node is the remote OS swap (`StartSwap` to the node's daemon, at the address
//! it last reported): the node fetches the bundle and the rescue OS from its site, swaps, runs
//! its health checks, and rolls itself back when they fail. So a node reported as failed is
//! already back on a bootable OS; the rollout's roll-back step records that and logs it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use proto::durable::{write_json_atomic, MODE_PRIVATE};
use proto::manifest::BundleId;
use proto::wire::{BundleInfo, RolloutAction};
use tokio::sync::Mutex;

use super::driver::{self, Fleet, RolloutHandle, StepError};
use super::plan::RolloutError;
use super::plan::{
    FailureThreshold, NodeReport, Phase, Rollout, RolloutOptions, RolloutStatus, Target,
};
use crate::db::NodeRecord;
use crate::policy::BundleRef;

/// File name of the saved rollout, in the origin's home.
pub const STATE_FILE: &str = "rollout.json";

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
    /// The saved rollout cannot be read.
    #[error("{}: {error}", path.display())]
    Read {
        /// The state file.
        path: PathBuf,
        /// Why.
        error: std::io::Error,
    },
    /// The saved rollout does not decode.
    #[error("{}: {error}", path.display())]
    Decode {
        /// The state file.
        path: PathBuf,
        /// Why.
        error: serde_json::Error,
    },
    /// The rollout cannot be saved.
    #[error(transparent)]
    Save(#[from] proto::durable::DurableError),
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

/// What the saved file holds: the rollout and what its fleet needs to go on after a restart.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
struct Saved {
    rollout: Rollout,
    target: BundleId,
    rescue: BundleId,
    /// Node id → daemon address, as reported when the rollout started.
    addrs: BTreeMap<String, String>,
}

/// The fleet over the mesh: installs are remote swaps.
struct MeshFleet {
    endpoint: quinn::Endpoint,
    target: BundleId,
    rescue: BundleId,
    addrs: BTreeMap<String, String>,
}

impl Fleet for MeshFleet {
    async fn install(&self, node: &str, _bundle: &BundleRef) -> NodeReport {
        let Some(addr) = self
            .addrs
            .get(node)
            .and_then(|a| a.parse::<SocketAddr>().ok())
        else {
            return NodeReport::Failed {
                reason: "the node reported no daemon address".into(),
            };
        };
        match crate::remote::swap_edge(&self.endpoint, addr, self.target, self.rescue).await {
            Ok((_, None)) => NodeReport::Healthy,
            Ok((outcome, Some(why))) => NodeReport::Failed {
                reason: format!("{outcome}: {why}"),
            },
            Err(error) => NodeReport::Failed {
                reason: format!("{error:#}"),
            },
        }
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

struct Running {
    handle: RolloutHandle,
    task: tokio::task::JoinHandle<Rollout>,
}

/// The origin's rollouts: the running one, and the saved state of the last.
pub struct RolloutService {
    state_file: PathBuf,
    endpoint: quinn::Endpoint,
    running: Mutex<Option<Running>>,
}

impl RolloutService {
    /// Rollouts saved under `home_dir`; `endpoint` carries the origin's certificate (the only
    /// one edges take a swap from). A saved rollout that was running or paused goes on.
    pub fn new(home_dir: &Path, endpoint: quinn::Endpoint) -> Self {
        let rollouts = Self {
            state_file: home_dir.join(STATE_FILE),
            endpoint,
            running: Mutex::new(None),
        };
        match rollouts.load() {
            Ok(Some(saved)) if matches!(saved.rollout.phase(), Phase::Running | Phase::Paused) => {
                if tokio::runtime::Handle::try_current().is_ok() {
                    tracing::info!(bundle = %saved.rollout.bundle(), "resuming the saved rollout");
                    let running = rollouts.spawn(saved);
                    if let Ok(mut slot) = rollouts.running.try_lock() {
                        *slot = Some(running);
                    }
                }
            }
            Ok(_) => {}
            Err(error) => tracing::error!(%error, "cannot read the saved rollout; ignoring it"),
        }
        rollouts
    }

    /// What the saved rollout asks its nodes to keep while it runs or is paused: its target
    /// and rescue. `None` when no rollout is under way (or its file cannot be read).
    pub fn kept(&self) -> Option<crate::keep::RolloutKeep> {
        let saved = self.load().ok().flatten()?;
        if !matches!(saved.rollout.phase(), Phase::Running | Phase::Paused) {
            return None;
        }
        Some(crate::keep::RolloutKeep {
            target: saved.target,
            rescue: saved.rescue,
            nodes: saved.addrs.keys().cloned().collect(),
        })
    }

    /// The last rollout's status as saved (the driver saves every change), read without
    /// asking the running driver; `None` before the first rollout or when the file cannot be
    /// read.
    pub fn saved_status(&self) -> Option<crate::rollout::plan::RolloutStatus> {
        Some(self.load().ok().flatten()?.rollout.status())
    }

    fn load(&self) -> Result<Option<Saved>, RolloutServiceError> {
        match std::fs::read(&self.state_file) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|error| {
                RolloutServiceError::Decode {
                    path: self.state_file.clone(),
                    error,
                }
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(RolloutServiceError::Read {
                path: self.state_file.clone(),
                error,
            }),
        }
    }

    fn spawn(&self, saved: Saved) -> Running {
        let fleet = Arc::new(MeshFleet {
            endpoint: self.endpoint.clone(),
            target: saved.target,
            rescue: saved.rescue,
            addrs: saved.addrs.clone(),
        });
        let file = self.state_file.clone();
        let mut saved_meta = saved.clone();
        let save = move |rollout: &Rollout| -> Result<(), StepError> {
            saved_meta.rollout = rollout.clone();
            write_json_atomic(&file, &saved_meta, MODE_PRIVATE).map_err(StepError::from)
        };
        let (handle, task) = driver::spawn(saved.rollout, fleet, save);
        Running { handle, task }
    }

    /// Starts a rollout of `target` (with `rescue`) to the `nodes` that `selector` picks.
    pub async fn start(
        &self,
        nodes: &[NodeRecord],
        target: &BundleInfo,
        rescue: &BundleInfo,
        selector: &str,
        max_failures: u32,
        downgrade: bool,
    ) -> Result<RolloutStatus, RolloutServiceError> {
        let mut running = self.running.lock().await;
        if let Some(current) = running.as_ref() {
            if !current.task.is_finished() {
                return Err(RolloutServiceError::AlreadyRunning);
            }
        }
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
        let saved = Saved {
            rollout,
            target: target.id,
            rescue: rescue.id,
            addrs: picked
                .iter()
                .map(|n| (n.id.clone(), n.data_addr.clone()))
                .collect(),
        };
        write_json_atomic(&self.state_file, &saved, MODE_PRIVATE)?;
        *running = Some(self.spawn(saved));
        Ok(status)
    }

    /// Status, pause, resume or abort; the status of a finished rollout comes from its file.
    pub async fn act(&self, action: RolloutAction) -> Result<RolloutStatus, RolloutServiceError> {
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
        let saved = self.load()?.ok_or(RolloutServiceError::NeverStarted)?;
        match action {
            RolloutAction::Status => Ok(saved.rollout.status()),
            _ => Err(RolloutServiceError::NotRunning(
                saved.rollout.phase().clone(),
            )),
        }
    }
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
