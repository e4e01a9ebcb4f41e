//! `origin prepare` (issue 17), server side: the selected nodes fetch a bundle through their
//! site (stagers and peers, the daemon's normal verified path), verify it and keep it, without
//! swapping; a later swap or negotiation of that bundle then fetches nothing.
//!
//! The operation lives in the `prepares` table (one synced batch per change, with its audit
//! record), so it survives a restart of the origin. The origin asks each online node's daemon
//! with [`Request::Fetch`] (the daemon takes it from the origin's certificate) and reads its
//! progress and its answer on the same stream: `Fetched` moves the node to prepared, an error
//! to failed with the daemon's words. A node whose daemon cannot be reached stays pending: when
//! it reports again (every daemon start does), [`Prepares::kick`] asks it at the address it
//! reported. `origin serve` resumes every unfinished node at start ([`Prepares::resume`]).
//! Progress bytes of fetches under way are kept in memory only.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use proto::net::{connect, read_frame, send_request};
use proto::wire::{BundleInfo, NodeBundle, Request, Response, MAX_FRAME_BYTES};
use serde::{Deserialize, Serialize};

use crate::db::{
    now_ms, Audit, Commit, Db, DbError, NodeRecord, PrepareNode, PrepareRecord, PrepareState, Put,
};

/// Daemons asked to fetch at once, whatever the number of selected nodes.
pub const MAX_ASKS_AT_ONCE: usize = 64;

/// How often nodes still pending are asked again at the address they last reported (besides
/// at every report of theirs): a daemon that was unreachable for a while without restarting.
pub const RETRY_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);

/// How one ask of a node's daemon ended.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Asked {
    /// The daemon holds the bundle; it received this many bytes for it.
    Prepared { bytes_received: u64 },
    /// The daemon answered that it cannot fetch it.
    Failed(String),
    /// The daemon could not be reached, or went away: ask again when it reports.
    Offline(String),
}

/// One site's part of a prepare operation.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteProgress {
    /// Selected nodes of the site.
    pub nodes: usize,
    /// Of those, pending (offline or not asked yet).
    pub pending: usize,
    /// Fetching.
    pub fetching: usize,
    /// Prepared.
    pub prepared: usize,
    /// Failed.
    pub failed: usize,
    /// Not prepared when the operation was cancelled.
    #[serde(default)]
    pub cancelled: usize,
    /// Bytes the site's nodes hold of the bundle (prepared nodes count the whole bundle).
    pub done_bytes: u64,
    /// Bytes the site's prepared nodes received for it (0 for a node that held it already).
    #[serde(default)]
    pub bytes_received: u64,
    /// The bundle's stored size times the site's nodes.
    pub total_bytes: u64,
}

/// Where a prepare operation stands: the answer of `origin prepare` and `prepare status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrepareStatus {
    /// The stored operation, with each node's state.
    pub operation: PrepareRecord,
    /// Bytes each fetching node holds so far, by node id (memory only).
    pub fetching_bytes: BTreeMap<String, u64>,
    /// Site by site.
    pub sites: BTreeMap<String, SiteProgress>,
    /// No node waits for an answer (see [`PrepareRecord::settled`]).
    pub settled: bool,
}

impl PrepareStatus {
    /// The status of `operation` with the progress bytes of fetches under way.
    pub fn new(operation: PrepareRecord, fetching_bytes: BTreeMap<String, u64>) -> Self {
        let sites = Self::sites_of(&operation, &fetching_bytes);
        Self {
            settled: operation.settled(),
            operation,
            fetching_bytes,
            sites,
        }
    }

    /// `operation`'s nodes counted site by site, with `fetching_bytes` (by node id) for the
    /// fetches under way.
    pub fn sites_of(
        operation: &PrepareRecord,
        fetching_bytes: &BTreeMap<String, u64>,
    ) -> BTreeMap<String, SiteProgress> {
        let mut sites: BTreeMap<String, SiteProgress> = BTreeMap::new();
        for (id, node) in &operation.nodes {
            let site = sites.entry(node.site.clone()).or_default();
            site.nodes += 1;
            site.total_bytes += operation.stored_bytes;
            site.bytes_received += node.bytes_received;
            match node.state {
                PrepareState::Pending => site.pending += 1,
                PrepareState::Fetching => {
                    site.fetching += 1;
                    site.done_bytes += fetching_bytes
                        .get(id)
                        .copied()
                        .unwrap_or(0)
                        .min(operation.stored_bytes);
                }
                PrepareState::Prepared => {
                    site.prepared += 1;
                    site.done_bytes += operation.stored_bytes;
                }
                PrepareState::Failed => site.failed += 1,
                PrepareState::Cancelled => site.cancelled += 1,
            }
        }
        sites
    }

    /// Nodes in `state`.
    pub fn count(&self, state: PrepareState) -> usize {
        self.operation
            .nodes
            .values()
            .filter(|n| n.state == state)
            .count()
    }

    /// The tables for people: one line per site, then one per node.
    pub fn render(&self) -> String {
        let op = &self.operation;
        let mut text = format!(
            "prepare {}: {} ({}) to `{}`, {} each; started {} by {}\n",
            op.id,
            op.bundle,
            op.bundle.id,
            op.selector,
            mib(op.stored_bytes),
            super::utc(op.created_ms),
            op.actor
        );
        if let Some(cancel) = &op.cancelled {
            text.push_str(&format!(
                "cancelled {} by {}: no node is asked any more, and none keeps the bundle for it\n",
                super::utc(cancel.at_ms),
                cancel.actor
            ));
        }
        let mut sites = vec![[
            "SITE",
            "NODES",
            "PREPARED",
            "FETCHING",
            "PENDING",
            "FAILED",
            "CANCELLED",
            "BYTES",
        ]
        .map(str::to_owned)];
        for (name, site) in &self.sites {
            sites.push([
                name.clone(),
                site.nodes.to_string(),
                site.prepared.to_string(),
                site.fetching.to_string(),
                site.pending.to_string(),
                site.failed.to_string(),
                site.cancelled.to_string(),
                format!("{} of {}", mib(site.done_bytes), mib(site.total_bytes)),
            ]);
        }
        text.push_str(&super::render_table(&sites));
        text.push('\n');
        let mut nodes = vec![["NODE", "SITE", "STATE", "RECEIVED", "DETAIL"].map(str::to_owned)];
        for (id, node) in &op.nodes {
            let received = match node.state {
                PrepareState::Prepared => mib(node.bytes_received),
                PrepareState::Fetching => format!(
                    "{} so far",
                    mib(self.fetching_bytes.get(id).copied().unwrap_or(0))
                ),
                _ => "-".to_owned(),
            };
            nodes.push([
                id.clone(),
                node.site.clone(),
                node.state.name().to_owned(),
                received,
                node.detail.clone(),
            ]);
        }
        text.push_str(&super::render_table(&nodes));
        let offline = self
            .operation
            .nodes
            .values()
            .filter(|n| n.state == PrepareState::Pending && n.attempts > 0)
            .count();
        if offline > 0 {
            text.push_str(&format!(
                "{offline} node(s) pending: offline now, they prepare when their daemon reports again\n"
            ));
        }
        text
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// Why a prepare operation was not cancelled.
#[derive(Debug, thiserror::Error)]
pub enum CancelError {
    /// No such operation.
    #[error("no prepare operation {0} on this origin; `origin prepare status` shows the newest")]
    NoSuch(u64),
    /// Cancelled before.
    #[error("prepare {id} was cancelled already, by {by}")]
    Already {
        /// The operation.
        id: u64,
        /// Who cancelled it.
        by: String,
    },
    /// The database failed.
    #[error(transparent)]
    Db(#[from] DbError),
}

/// The origin's prepare operations and the asks under way.
pub struct Prepares {
    db: Arc<Db>,
    /// Client endpoint with the origin's certificate (daemons take a fetch from it).
    endpoint: quinn::Endpoint,
    /// Bytes held so far by each fetching node: (operation, node) → bytes. Memory only.
    progress: Mutex<HashMap<(u64, String), u64>>,
    /// Asks under way, by (operation, node); the value is a newer address the node reported
    /// meanwhile, to ask again at if this ask finds the daemon gone.
    asking: Mutex<HashMap<(u64, String), Option<String>>>,
    /// Bounds the asks at once ([`MAX_ASKS_AT_ONCE`]).
    permits: Arc<tokio::sync::Semaphore>,
}

impl Prepares {
    /// Prepare operations stored in `db`; daemons are asked through `endpoint`.
    pub fn new(db: Arc<Db>, endpoint: quinn::Endpoint) -> Arc<Self> {
        Arc::new(Self {
            db,
            endpoint,
            progress: Mutex::new(HashMap::new()),
            asking: Mutex::new(HashMap::new()),
            permits: Arc::new(tokio::sync::Semaphore::new(MAX_ASKS_AT_ONCE)),
        })
    }

    /// Stores a new operation for `picked` (already selected, in site order) and asks every
    /// node with a daemon address at once. Returns its status (every node pending).
    pub fn start(
        self: &Arc<Self>,
        bundle: &BundleInfo,
        selector: &str,
        picked: &[&NodeRecord],
        audit: impl Fn(&str, String) -> Audit,
        actor: &str,
    ) -> Result<PrepareStatus, DbError> {
        let now = now_ms();
        let record = self.db.change(|| {
            let id = self.db.prepares(1)?.first().map_or(1, |p| p.id + 1);
            let nodes = picked
                .iter()
                .map(|n| {
                    let (attempts, detail) = if n.data_addr.is_empty() {
                        (
                            1,
                            "offline: its daemon reported no address; it prepares when its daemon reports"
                                .to_owned(),
                        )
                    } else {
                        (0, String::new())
                    };
                    let node = PrepareNode {
                        site: n.site.clone(),
                        state: PrepareState::Pending,
                        detail,
                        attempts,
                        bytes_received: 0,
                        updated_ms: now,
                    };
                    (n.id.clone(), node)
                })
                .collect();
            let record = PrepareRecord {
                id,
                bundle: NodeBundle {
                    name: bundle.name.clone(),
                    version: bundle.version.clone(),
                    id: bundle.id,
                },
                stored_bytes: bundle.stored_bytes,
                selector: selector.to_owned(),
                actor: actor.to_owned(),
                created_ms: now,
                nodes,
                cancelled: None,
            };
            let detail = format!(
                "prepare {id}: {}@{} ({}) to `{selector}`: {} node(s)",
                bundle.name,
                bundle.version,
                bundle.id,
                picked.len()
            );
            Ok::<_, DbError>(Commit::new(
                vec![Put::Prepare(Box::new(record.clone()))],
                Some(audit("prepare.start", detail)),
                record,
            ))
        })?;
        for node in picked.iter().filter(|n| !n.data_addr.is_empty()) {
            self.spawn_ask(record.id, &node.id, &node.data_addr);
        }
        Ok(PrepareStatus::new(record, BTreeMap::new()))
    }

    /// Cancels operation `id`: its nodes that have not prepared become cancelled and are not
    /// asked again, and no node keeps the bundle for it any more (nodes that prepared keep it
    /// only if something else asks them to; their stores collect it otherwise). A fetch under
    /// way on a daemon runs to its end, and its answer is ignored.
    pub fn cancel(
        &self,
        id: u64,
        actor: &str,
        audit: impl Fn(&str, String) -> Audit,
    ) -> Result<PrepareStatus, CancelError> {
        let record = self.db.change(|| {
            let mut record = self.db.prepare(id)?.ok_or(CancelError::NoSuch(id))?;
            if let Some(done) = &record.cancelled {
                return Err(CancelError::Already {
                    id,
                    by: done.actor.clone(),
                });
            }
            let now = now_ms();
            let mut cancelled = 0;
            for node in record.nodes.values_mut() {
                if matches!(node.state, PrepareState::Pending | PrepareState::Fetching) {
                    node.state = PrepareState::Cancelled;
                    node.detail = format!("cancelled by {actor}");
                    node.updated_ms = now;
                    cancelled += 1;
                }
            }
            record.cancelled = Some(crate::db::PrepareCancel {
                at_ms: now,
                actor: actor.to_owned(),
            });
            let detail = format!(
                "prepare {id}: {} cancelled; {cancelled} of {} node(s) had not prepared",
                record.bundle,
                record.nodes.len()
            );
            Ok(Commit::new(
                vec![Put::Prepare(Box::new(record.clone()))],
                Some(audit("prepare.cancel", detail)),
                record,
            ))
        })?;
        self.progress
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(op, _), _| *op != id);
        Ok(PrepareStatus::new(record, BTreeMap::new()))
    }

    /// The status of operation `id`, or of the newest when `None`.
    pub fn status(&self, id: Option<u64>) -> Result<Option<PrepareStatus>, DbError> {
        let record = match id {
            Some(id) => self.db.prepare(id)?,
            None => self.db.prepares(1)?.into_iter().next(),
        };
        Ok(record.map(|record| {
            let progress = self.progress.lock().unwrap_or_else(|e| e.into_inner());
            let fetching = record
                .nodes
                .iter()
                .filter(|(_, n)| n.state == PrepareState::Fetching)
                .filter_map(|(node, _)| {
                    progress
                        .get(&(record.id, node.clone()))
                        .map(|b| (node.clone(), *b))
                })
                .collect();
            PrepareStatus::new(record, fetching)
        }))
    }

    /// Node `node_id` reported with its daemon at `data_addr`: ask it for every operation in
    /// which it is still pending (it was offline) or fetching (the origin restarted meanwhile).
    pub fn kick(self: &Arc<Self>, node_id: &str, data_addr: &str) {
        if data_addr.is_empty() || tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        let prepares = match self.db.all_prepares() {
            Ok(prepares) => prepares,
            Err(error) => {
                tracing::error!(%error, node = node_id, "cannot read the prepare operations");
                return;
            }
        };
        for op in prepares {
            let waiting = op
                .nodes
                .get(node_id)
                .is_some_and(|n| matches!(n.state, PrepareState::Pending | PrepareState::Fetching));
            if waiting {
                tracing::info!(
                    prepare = op.id,
                    node = node_id,
                    "node reported: asking it to prepare"
                );
                self.spawn_ask(op.id, node_id, data_addr);
            }
        }
    }

    /// At `origin serve` start: asks every node still pending or fetching, at the address it
    /// last reported.
    pub fn resume(self: &Arc<Self>) -> Result<(), DbError> {
        let prepares = self.db.all_prepares()?;
        if prepares.is_empty() {
            return Ok(());
        }
        let addrs: HashMap<String, String> = self
            .db
            .nodes()?
            .into_iter()
            .map(|n| (n.id, n.data_addr))
            .collect();
        for op in prepares {
            for (node, state) in &op.nodes {
                if !matches!(state.state, PrepareState::Pending | PrepareState::Fetching) {
                    continue;
                }
                if let Some(addr) = addrs.get(node).filter(|a| !a.is_empty()) {
                    self.spawn_ask(op.id, node, addr);
                }
            }
        }
        Ok(())
    }

    /// Resumes now ([`Prepares::resume`]), then asks the nodes still waiting again every
    /// [`RETRY_INTERVAL`].
    pub fn spawn_retries(self: &Arc<Self>) -> Result<(), DbError> {
        self.resume()?;
        let this = self.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval_at(
                tokio::time::Instant::now() + RETRY_INTERVAL,
                RETRY_INTERVAL,
            );
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                if let Err(error) = this.resume() {
                    tracing::error!(%error, "cannot read the prepare operations to retry them");
                }
            }
        });
        Ok(())
    }

    /// Asks `node`'s daemon at `addr` to fetch operation `op`'s bundle, unless an ask is under
    /// way already (then `addr` is tried after it, should that one find the daemon gone).
    fn spawn_ask(self: &Arc<Self>, op: u64, node: &str, addr: &str) {
        {
            let mut asking = self.asking.lock().unwrap_or_else(|e| e.into_inner());
            let key = (op, node.to_owned());
            if let Some(next) = asking.get_mut(&key) {
                *next = Some(addr.to_owned());
                return;
            }
            asking.insert(key, None);
        }
        let this = self.clone();
        let (node, addr) = (node.to_owned(), addr.to_owned());
        tokio::spawn(async move {
            let mut addr = addr;
            loop {
                let asked = match this.permits.clone().acquire_owned().await {
                    Ok(_permit) => this.ask(op, &node, &addr).await,
                    Err(_) => return,
                };
                let again = {
                    let mut asking = this.asking.lock().unwrap_or_else(|e| e.into_inner());
                    let key = (op, node.clone());
                    match (&asked, asking.get_mut(&key).and_then(Option::take)) {
                        (Asked::Offline(_), Some(next)) => Some(next),
                        _ => {
                            asking.remove(&key);
                            None
                        }
                    }
                };
                this.progress
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&(op, node.clone()));
                if let Err(error) = this.record(op, &node, &asked) {
                    tracing::error!(%error, prepare = op, %node, "cannot record how a prepare ended");
                }
                match again {
                    Some(next) => addr = next,
                    None => return,
                }
            }
        });
    }

    /// One ask: connect, send the fetch, follow its progress to the answer.
    async fn ask(&self, op: u64, node: &str, addr: &str) -> Asked {
        let Some(record) = self.db.prepare(op).ok().flatten() else {
            return Asked::Failed(format!("prepare {op} is no longer stored"));
        };
        let bundle = record.bundle.id;
        let Ok(socket) = addr.parse::<SocketAddr>() else {
            return Asked::Offline(format!("its daemon reported a bad address {addr:?}"));
        };
        let conn = match connect(&self.endpoint, socket).await {
            Ok(conn) => conn,
            Err(error) => {
                return Asked::Offline(format!("cannot reach its daemon at {addr}: {error}"))
            }
        };
        let request = Request::Fetch {
            bundle: bundle.to_string(),
        };
        let mut recv = match send_request(&conn, &request).await {
            Ok(recv) => recv,
            Err(error) => {
                return Asked::Offline(format!("its daemon at {addr} took no request: {error}"))
            }
        };
        if let Err(error) = self.update(op, node, |n| {
            n.state = PrepareState::Fetching;
            n.attempts += 1;
            n.detail = format!("its daemon at {addr} is fetching");
        }) {
            tracing::error!(%error, prepare = op, node, "cannot record a fetch under way");
        }
        tracing::info!(prepare = op, node, %addr, %bundle, "asked a daemon to prepare");
        let asked = loop {
            match read_frame::<Response>(&mut recv, MAX_FRAME_BYTES).await {
                Ok(Some(Response::FetchProgress { done_bytes, .. })) => {
                    self.progress
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert((op, node.to_owned()), done_bytes);
                }
                Ok(Some(Response::Fetched(summary))) if summary.id == bundle => {
                    break Asked::Prepared {
                        bytes_received: summary.bytes_received,
                    }
                }
                Ok(Some(Response::Fetched(summary))) => {
                    break Asked::Failed(format!(
                        "its daemon fetched {} instead of {bundle}",
                        summary.id
                    ))
                }
                Ok(Some(Response::Error { code, message })) => {
                    break Asked::Failed(format!(
                        "its daemon could not fetch ({code:?}): {message}"
                    ))
                }
                Ok(Some(other)) => {
                    break Asked::Failed(format!("unexpected answer from its daemon: {other:?}"))
                }
                Ok(None) => {
                    break Asked::Offline(format!(
                        "its daemon at {addr} closed the stream without an answer"
                    ))
                }
                Err(error) => {
                    break Asked::Offline(format!(
                        "lost its daemon at {addr} while fetching: {error}"
                    ))
                }
            }
        };
        conn.close(0u32.into(), b"done");
        asked
    }

    /// Stores how an ask ended.
    fn record(&self, op: u64, node: &str, asked: &Asked) -> Result<(), DbError> {
        match asked {
            Asked::Prepared { bytes_received } => {
                tracing::info!(prepare = op, node, bytes_received, "node prepared");
                self.update(op, node, |n| {
                    n.state = PrepareState::Prepared;
                    n.bytes_received = *bytes_received;
                    n.detail = String::new();
                })
            }
            Asked::Failed(why) => {
                tracing::warn!(prepare = op, node, why, "node could not prepare");
                self.update(op, node, |n| {
                    n.state = PrepareState::Failed;
                    n.detail = why.clone();
                })
            }
            Asked::Offline(why) => {
                tracing::info!(
                    prepare = op,
                    node,
                    why,
                    "node offline; it prepares when it reports again"
                );
                self.update(op, node, |n| {
                    if n.state != PrepareState::Fetching {
                        n.attempts += 1;
                    }
                    n.state = PrepareState::Pending;
                    n.detail = format!("offline: {why}; it prepares when its daemon reports again");
                })
            }
        }
    }

    /// Changes `node`'s entry of operation `op` with `change`, committing it with its audit
    /// record when it changed anything.
    fn update(
        &self,
        op: u64,
        node: &str,
        change: impl Fn(&mut PrepareNode),
    ) -> Result<(), DbError> {
        self.db.change(|| {
            let Some(mut record) = self.db.prepare(op)? else {
                return Ok(Commit::none(()));
            };
            if record.cancelled.is_some() {
                // An ask that ends after the cancel changes nothing: the operation is over.
                return Ok(Commit::none(()));
            }
            let Some(entry) = record.nodes.get_mut(node) else {
                return Ok(Commit::none(()));
            };
            let before = entry.clone();
            change(entry);
            if *entry == before {
                return Ok(Commit::none(()));
            }
            entry.updated_ms = now_ms();
            let detail = format!(
                "prepare {op}: {} {} -> {}{}",
                record.bundle,
                before.state.name(),
                entry.state.name(),
                match entry.state {
                    PrepareState::Prepared => format!(" ({} bytes received)", entry.bytes_received),
                    PrepareState::Failed | PrepareState::Pending => format!(": {}", entry.detail),
                    PrepareState::Fetching | PrepareState::Cancelled => String::new(),
                }
            );
            let audit = Audit::new(node, "edge", "prepare.node", detail);
            Ok(Commit::new(
                vec![Put::Prepare(Box::new(record))],
                Some(audit),
                (),
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(site: &str, state: PrepareState, attempts: u32) -> PrepareNode {
        PrepareNode {
            site: site.into(),
            state,
            detail: if attempts > 0 && state == PrepareState::Pending {
                "offline: cannot reach its daemon".into()
            } else {
                String::new()
            },
            attempts,
            bytes_received: 0,
            updated_ms: 0,
        }
    }

    #[test]
    fn status_sums_sites_and_reports_offline_nodes_as_pending() {
        let mib = 1024 * 1024;
        let operation = PrepareRecord {
            id: 4,
            bundle: NodeBundle {
                name: "os".into(),
                version: "2".into(),
                id: proto::BlobHash::of(b"os@2"),
            },
            stored_bytes: 10 * mib,
            selector: "all".into(),
            actor: "alice".into(),
            created_ms: 0,
            nodes: [
                ("a1", entry("a", PrepareState::Prepared, 1)),
                ("a2", entry("a", PrepareState::Fetching, 1)),
                ("b1", entry("b", PrepareState::Pending, 1)),
                ("b2", entry("b", PrepareState::Failed, 1)),
            ]
            .into_iter()
            .map(|(id, n)| (id.to_owned(), n))
            .collect(),
            cancelled: None,
        };
        let fetching = [("a2".to_owned(), 4 * mib)].into_iter().collect();
        let status = PrepareStatus::new(operation, fetching);
        let a = &status.sites["a"];
        assert_eq!((a.nodes, a.prepared, a.fetching), (2, 1, 1));
        assert_eq!((a.done_bytes, a.total_bytes), (14 * mib, 20 * mib));
        let b = &status.sites["b"];
        assert_eq!((b.pending, b.failed, b.done_bytes), (1, 1, 0));
        assert!(!status.settled, "a node is still fetching");
        let text = status.render();
        assert!(text.contains("prepare 4: os@2"), "{text}");
        assert!(text.contains("4.0 MiB so far"), "{text}");
        assert!(text.contains("1 node(s) pending: offline"), "{text}");
        // The JSON answer decodes back (the CLI's `--wait` reads it).
        let json = serde_json::to_string(&status).expect("json");
        let back: PrepareStatus = serde_json::from_str(&json).expect("decode");
        assert_eq!(back, status);
    }
}
