//! `netsim demo`: the whole mesh on loopback, one bundle, every edge fetching it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::datagen;
use crate::machines;
use crate::mesh::{site_name, Mesh};
use crate::procs::{self, Binaries};

/// How long the whole fan-out may take before the demo gives up.
pub const FANOUT_TIMEOUT: Duration = Duration::from_secs(600);

/// How the edges of a site get the bundle in the demo.
///
/// With `staged` no edge daemons run: each edge does the one-shot `edge-agent fetch` straight
/// from its stager, the stager-only baseline the demo always ran. Daemons with `--peers off`
/// would make the same downloads (the same planner, asking stagers only) through one more
/// process per edge, so they are left out; and since no edge serves anything, `peer_bytes` is
/// exactly 0. With `mesh`, edge daemons (`edge-agent serve --peers on`) start before the
/// fan-out, and each edge's fetch goes through its daemon, which learns of the site's other
/// edges from the stager's tracker and takes pieces from them and from the stager at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DemoStrategy {
    /// Edges fetch from their stager only (no edge daemons).
    Staged,
    /// Edge daemons with peers on: edges fetch from their stager and from each other.
    Mesh,
}

impl DemoStrategy {
    /// The name used on the command line and in the JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            DemoStrategy::Staged => "staged",
            DemoStrategy::Mesh => "mesh",
        }
    }
}

impl std::fmt::Display for DemoStrategy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What to run.
#[derive(Clone, Debug)]
pub struct DemoConfig {
    /// Number of sites.
    pub sites: usize,
    /// Edges per site.
    pub edges_per_site: usize,
    /// Size of the generated bundle tree, in bytes.
    pub bundle_bytes: u64,
    /// Seed of the generated tree.
    pub seed: u64,
    /// Stager only, or stager and peers.
    pub strategy: DemoStrategy,
    /// Upload limit of every stager to its edges, in Mbit/s (`None`: as fast as loopback goes).
    pub stager_upload_mbit: Option<u64>,
    /// End with an OS swap on every edge: each edge has a simulated machine, and the origin
    /// swaps them all to the demo bundle (`origin swap`).
    pub swap: bool,
    /// Where to put state; a temporary directory when `None`.
    pub work_dir: Option<PathBuf>,
    /// Where the binaries live.
    pub binaries: Binaries,
}

/// One site's line of the result.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SiteResult {
    /// Site name.
    pub name: String,
    /// Bytes pulled over the WAN (origin → this site's stager).
    pub wan_bytes: u64,
    /// Bytes served inside the site: `stager_egress_bytes + peer_bytes`.
    pub lan_bytes: u64,
    /// Bytes the site's stager(s) sent to its edges.
    pub stager_egress_bytes: u64,
    /// Bytes edges of the site sent to other edges of the site (0 with `staged`).
    pub peer_bytes: u64,
    /// Edges holding the whole bundle at the end.
    pub edges_done: usize,
    /// Edges in the site.
    pub edges: usize,
    /// Seconds from publish until the last edge of the site held the bundle.
    pub done_s: f64,
}

/// The demo's result, also printed as JSON with `--json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DemoResult {
    /// How edges got the bundle.
    pub strategy: DemoStrategy,
    /// The stagers' upload limit to their edges, in Mbit/s (`None`: unlimited).
    pub stager_upload_mbit: Option<u64>,
    /// The bundle id.
    pub bundle_id: String,
    /// Payload bytes of the generated tree.
    pub tree_bytes: u64,
    /// Stored (compressed) bytes of the bundle: what crosses the network per copy.
    pub bundle_bytes: u64,
    /// Bytes the origin sent in all.
    pub origin_egress_bytes: u64,
    /// Seconds to pack and publish.
    pub publish_s: f64,
    /// Seconds from publish until every edge held the bundle.
    pub all_edges_done_s: f64,
    /// Per site.
    pub sites: Vec<SiteResult>,
    /// The swap at the end, with `--swap`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swap: Option<SwapResult>,
}

/// How the swap at the end of the demo went.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SwapResult {
    /// Edges asked to swap.
    pub edges: usize,
    /// Edges now running the demo bundle from slot A, with the rescue OS in slot B.
    pub done: usize,
    /// Seconds from `origin swap` until every edge answered.
    pub seconds: f64,
    /// One line per edge that did not end on the new OS.
    pub failures: Vec<String>,
}

impl DemoResult {
    /// A human-readable table.
    pub fn table(&self) -> String {
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        let times = |b: u64| b as f64 / self.bundle_bytes.max(1) as f64;
        let mut out = String::new();
        out.push_str(&format!(
            "bundle {} — {:.1} MiB tree, {:.1} MiB stored; published in {:.2} s\n",
            &self.bundle_id[..16.min(self.bundle_id.len())],
            mib(self.tree_bytes),
            mib(self.bundle_bytes),
            self.publish_s
        ));
        let limit = match self.stager_upload_mbit {
            Some(mbit) => format!("stager upload {mbit} Mbit/s"),
            None => "stager upload unlimited".to_owned(),
        };
        let how = match self.strategy {
            DemoStrategy::Staged => "edges fetch from their stager only",
            DemoStrategy::Mesh => "edges fetch from their stager and from each other",
        };
        out.push_str(&format!("strategy {}: {how}; {limit}\n\n", self.strategy));
        out.push_str(
            "site     WAN MiB  (× bundle)  stager→edges MiB  (× bundle)  edge→edge MiB  (× bundle)  edges done   done after\n",
        );
        for site in &self.sites {
            out.push_str(&format!(
                "{:<8} {:>7.1}  ({:>6.2}×)  {:>16.1}  ({:>6.2}×)  {:>13.1}  ({:>6.2}×)  {:>5}/{:<5} {:>8.2} s\n",
                site.name,
                mib(site.wan_bytes),
                times(site.wan_bytes),
                mib(site.stager_egress_bytes),
                times(site.stager_egress_bytes),
                mib(site.peer_bytes),
                times(site.peer_bytes),
                site.edges_done,
                site.edges,
                site.done_s
            ));
        }
        out.push_str(&format!(
            "\norigin egress {:.1} MiB ({:.2}× bundle); all edges hold the bundle after {:.2} s\n",
            mib(self.origin_egress_bytes),
            times(self.origin_egress_bytes),
            self.all_edges_done_s
        ));
        if let Some(swap) = &self.swap {
            out.push_str(&format!(
                "OS swap (origin swap, simulated machines): {}/{} edges run the demo bundle from slot A, rescue OS in slot B, after {:.2} s\n",
                swap.done, swap.edges, swap.seconds
            ));
            for failure in &swap.failures {
                out.push_str(&format!("  {failure}\n"));
            }
        }
        out
    }
}

/// The demo was stopped with Ctrl-C (SIGINT); `netsim` exits with 130 for it, as shells do.
#[derive(Debug, thiserror::Error)]
#[error("interrupted")]
pub struct Interrupted;

/// Runs the demo; stops every process it started before returning, on success or failure.
pub async fn run(config: DemoConfig) -> Result<DemoResult> {
    let temp;
    let work = match &config.work_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir)?;
            dir.clone()
        }
        None => {
            temp = tempfile::Builder::new()
                .prefix("stagecoach-demo-")
                .tempdir()
                .context("cannot create a temporary directory")?;
            temp.path().to_path_buf()
        }
    };
    let mut mesh = None;
    let result = tokio::select! {
        result = run_in(&config, &work, &mut mesh) => result,
        _ = tokio::signal::ctrl_c() => Err(Interrupted.into()),
    };
    if let Some(mesh) = mesh.as_mut() {
        mesh.shutdown().await;
    }
    if result.is_err() && config.work_dir.is_some() {
        eprintln!(
            "demo failed; daemon logs are in {}",
            work.join("logs").display()
        );
    }
    result
}

async fn run_in(config: &DemoConfig, work: &Path, slot: &mut Option<Mesh>) -> Result<DemoResult> {
    let tree = work.join("tree");
    datagen::generate_tree(&tree, config.bundle_bytes, config.seed)?;
    let stager_args: Vec<String> = config
        .stager_upload_mbit
        .map(|mbit| vec!["--upload-limit-mbit".to_owned(), mbit.to_string()])
        .unwrap_or_default();
    let mesh = slot.insert(
        Mesh::start(
            config.binaries.clone(),
            work,
            config.sites,
            config.edges_per_site,
            &stager_args,
        )
        .await?,
    );
    let base = if config.swap {
        // Every edge gets a machine running a small factory OS before the demo starts.
        let base = machines::prepare(mesh, work, config.seed).await?;
        let flags: HashMap<String, Vec<String>> = mesh
            .edges
            .iter()
            .map(|edge| {
                let checks = machines::reach_stager_check(mesh, edge);
                (edge.name.clone(), machines::daemon_flags(edge, &checks))
            })
            .collect();
        // The origin asks the daemons to swap, so every edge runs one (peers off if `staged`).
        mesh.start_edge_daemons_with(config.strategy == DemoStrategy::Mesh, &[], |edge| {
            flags.get(&edge.name).cloned().unwrap_or_default()
        })
        .await?;
        Some(base)
    } else {
        if config.strategy == DemoStrategy::Mesh {
            mesh.start_edge_daemons(true, &[]).await?;
        }
        None
    };
    let publish_start = Instant::now();
    let bundle_id = mesh.publish(&tree, "demo-os", "1.0.0").await?;
    let publish_s = publish_start.elapsed().as_secs_f64();
    let fanout_start = Instant::now();
    let edges = mesh.edges.clone();
    let fetches = tokio::time::timeout(FANOUT_TIMEOUT, mesh.fetch_all(&edges, &bundle_id))
        .await
        .context("edges did not finish in time")??;
    let all_edges_done_s = fanout_start.elapsed().as_secs_f64();
    if let Some(failed) = fetches.iter().find(|f| !f.ok) {
        let log = std::fs::read_to_string(&failed.log).unwrap_or_default();
        bail!(
            "{} failed to fetch the bundle:\n{}",
            failed.edge.name,
            log.trim()
        );
    }

    let origin_metrics = mesh.origin_metrics().await?;
    let origin_egress_bytes = procs::metric_sum(
        &origin_metrics,
        "stagecoach_bytes_sent_total",
        &[("peer_role", "stager")],
    );
    let bundle_bytes = procs::metric_sum(&origin_metrics, "stagecoach_bundle_stored_bytes", &[]);
    let tree_bytes = procs::metric_sum(&origin_metrics, "stagecoach_bundle_raw_bytes", &[]);
    let mut sites = Vec::new();
    for i in 0..config.sites {
        let name = site_name(i);
        let site_done: Vec<f64> = fetches
            .iter()
            .filter(|f| f.edge.site == name && f.ok)
            .map(|f| f.done_s)
            .collect();
        let stager_egress_bytes = mesh.stager_egress_bytes(&name).await?;
        // Edges without a daemon (`staged`) serve nobody and count nothing.
        let (peer_bytes, _other_sites) = mesh.peer_bytes(&name).await?;
        sites.push(SiteResult {
            wan_bytes: mesh.wan_bytes(&name).await?,
            lan_bytes: stager_egress_bytes + peer_bytes,
            stager_egress_bytes,
            peer_bytes,
            edges_done: site_done.len(),
            edges: config.edges_per_site,
            done_s: site_done.iter().cloned().fold(0.0, f64::max),
            name,
        });
    }
    let swap = match base {
        Some(base) => Some(swap_every_edge(mesh, &bundle_id, &base.rescue).await?),
        None => None,
    };
    Ok(DemoResult {
        swap,
        strategy: config.strategy,
        stager_upload_mbit: config.stager_upload_mbit,
        bundle_id,
        tree_bytes,
        bundle_bytes,
        origin_egress_bytes,
        publish_s,
        all_edges_done_s,
        sites,
    })
}

/// Runs `origin swap` on every edge: the demo bundle to slot A, the rescue OS to slot B.
async fn swap_every_edge(mesh: &Mesh, target: &str, rescue: &str) -> Result<SwapResult> {
    let started = Instant::now();
    let edges = mesh.edges.clone();
    let run = machines::swap_all(mesh, &edges, target, rescue).await?;
    let done = run.lines.iter().filter(|l| l.outcome == "done").count();
    if run.lines.len() != edges.len() {
        bail!("origin swap did not report every edge:\n{}", run.output);
    }
    Ok(SwapResult {
        edges: edges.len(),
        done,
        seconds: started.elapsed().as_secs_f64(),
        failures: run
            .lines
            .iter()
            .filter(|l| l.outcome != "done")
            .map(|l| format!("{}: {} {}", l.edge, l.outcome, l.detail))
            .collect(),
    })
}
