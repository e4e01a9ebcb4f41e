//! `netsim demo`: the whole mesh on loopback, one bundle, every edge fetching it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::datagen;
use crate::mesh::{site_name, Mesh};
use crate::procs::{self, Binaries};

/// How long the whole fan-out may take before the demo gives up.
pub const FANOUT_TIMEOUT: Duration = Duration::from_secs(600);

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
    /// Bytes served inside the site (stager → edges).
    pub lan_bytes: u64,
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
}

impl DemoResult {
    /// A human-readable table.
    pub fn table(&self) -> String {
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        let mut out = String::new();
        out.push_str(&format!(
            "bundle {} — {:.1} MiB tree, {:.1} MiB stored; published in {:.2} s\n\n",
            &self.bundle_id[..16.min(self.bundle_id.len())],
            mib(self.tree_bytes),
            mib(self.bundle_bytes),
            self.publish_s
        ));
        out.push_str(
            "site     WAN MiB  (× bundle)  in-site MiB  (× bundle)  edges done   done after\n",
        );
        for site in &self.sites {
            out.push_str(&format!(
                "{:<8} {:>7.1}  ({:>6.2}×)  {:>11.1}  ({:>6.2}×)  {:>5}/{:<5} {:>8.2} s\n",
                site.name,
                mib(site.wan_bytes),
                site.wan_bytes as f64 / self.bundle_bytes.max(1) as f64,
                mib(site.lan_bytes),
                site.lan_bytes as f64 / self.bundle_bytes.max(1) as f64,
                site.edges_done,
                site.edges,
                site.done_s
            ));
        }
        out.push_str(&format!(
            "\norigin egress {:.1} MiB ({:.2}× bundle); all edges hold the bundle after {:.2} s\n",
            mib(self.origin_egress_bytes),
            self.origin_egress_bytes as f64 / self.bundle_bytes.max(1) as f64,
            self.all_edges_done_s
        ));
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
    let mesh = slot.insert(
        Mesh::start(
            config.binaries.clone(),
            work,
            config.sites,
            config.edges_per_site,
            &[],
        )
        .await?,
    );
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
        sites.push(SiteResult {
            wan_bytes: mesh.wan_bytes(&name).await?,
            lan_bytes: mesh.lan_bytes(&name).await?,
            edges_done: site_done.len(),
            edges: config.edges_per_site,
            done_s: site_done.iter().cloned().fold(0.0, f64::max),
            name,
        });
    }
    Ok(DemoResult {
        bundle_id,
        tree_bytes,
        bundle_bytes,
        origin_egress_bytes,
        publish_s,
        all_edges_done_s,
        sites,
    })
}
