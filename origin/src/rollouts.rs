//! `origin rollout start|status|pause|resume|abort`, server side: one rollout at a time, run by
//! [`crate::rollout_run`] over the mesh, saved to `rollout.json` in the origin's home after
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

use proto::manifest::BundleId;
use proto::wire::{BundleInfo, RolloutAction};
use tokio::sync::Mutex;

use crate::db::NodeRecord;
use crate::policy::BundleRef;
use crate::rollout::{
    FailureThreshold, NodeReport, Phase, Rollout, RolloutOptions, RolloutStatus, Target,
};
use crate::rollout_run::{self, Fleet, RolloutHandle};

/// File name of the saved rollout, in the origin's home.
pub const STATE_FILE: &str = "rollout.json";

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
    ) -> Result<(), String> {
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
pub struct Rollouts {
    state_file: PathBuf,
    endpoint: quinn::Endpoint,
    running: Mutex<Option<Running>>,
}

impl Rollouts {
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

    fn load(&self) -> Result<Option<Saved>, String> {
        match std::fs::read(&self.state_file) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| format!("{}: {e}", self.state_file.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("{}: {e}", self.state_file.display())),
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
        let save = move |rollout: &Rollout| -> Result<(), String> {
            saved_meta.rollout = rollout.clone();
            write_atomically(&file, &saved_meta)
        };
        let (handle, task) = rollout_run::spawn(saved.rollout, fleet, save);
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
    ) -> Result<RolloutStatus, String> {
        let mut running = self.running.lock().await;
        if let Some(current) = running.as_ref() {
            if !current.task.is_finished() {
                return Err(
                    "a rollout is already running; `origin rollout status` shows it, `abort` ends it"
                        .into(),
                );
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
        )
        .map_err(|e| e.to_string())?;
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
        write_atomically(&self.state_file, &saved)?;
        *running = Some(self.spawn(saved));
        Ok(status)
    }

    /// Status, pause, resume or abort; the status of a finished rollout comes from its file.
    pub async fn act(&self, action: RolloutAction) -> Result<RolloutStatus, String> {
        let running = self.running.lock().await;
        if let Some(current) = running.as_ref() {
            let answer = match action {
                RolloutAction::Status => current.handle.status().await.map(Ok),
                RolloutAction::Pause => current.handle.pause().await,
                RolloutAction::Resume => current.handle.resume().await,
                RolloutAction::Abort => current.handle.abort().await,
            };
            if let Ok(result) = answer {
                return result.map_err(|e| e.to_string());
            }
        }
        let saved = self
            .load()?
            .ok_or_else(|| "no rollout has been started on this origin".to_owned())?;
        match action {
            RolloutAction::Status => Ok(saved.rollout.status()),
            _ => Err(format!(
                "the rollout is no longer running ({})",
                saved.rollout.phase()
            )),
        }
    }
}

/// The nodes `selector` picks, in site order then node id: `all`, or comma-separated
/// `KEY=VALUE` terms (site, class, role, node — a node id or unique prefix) that must all match.
pub fn select<'a>(nodes: &'a [NodeRecord], selector: &str) -> Result<Vec<&'a NodeRecord>, String> {
    let mut terms = Vec::new();
    if selector.trim() != "all" {
        for term in selector.split(',') {
            let (key, value) = term
                .split_once('=')
                .ok_or_else(|| format!("selector term `{term}` is not KEY=VALUE (or use `all`)"))?;
            let key = key.trim();
            if !matches!(key, "site" | "class" | "role" | "node") {
                return Err(format!(
                    "unknown selector key `{key}`: use site, class, role or node"
                ));
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
        return Err(format!(
            "selector `{selector}` matches none of the {} nodes that reported",
            nodes.len()
        ));
    }
    picked.sort_by(|a, b| (&a.site, &a.id).cmp(&(&b.site, &b.id)));
    Ok(picked)
}

fn write_atomically<T: serde::Serialize>(path: &Path, value: &T) -> Result<(), String> {
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| e.to_string())?;
    let temp = path.with_extension("json.tmp");
    let write = || -> std::io::Result<()> {
        use std::io::Write;
        let mut file = std::fs::File::create(&temp)?;
        file.write_all(&bytes)?;
        file.sync_all()?;
        std::fs::rename(&temp, path)
    };
    write().map_err(|e| format!("cannot save {}: {e}", path.display()))
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
