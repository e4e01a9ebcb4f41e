//! `netsim demo`: the whole mesh on loopback, one bundle, every edge fetching it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::datagen;
use crate::procs::{self, Binaries, Fleet};

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

/// Addresses a daemon writes to its ready file once it listens.
#[derive(Clone, Debug, Deserialize)]
pub struct Ready {
    /// The QUIC mesh endpoint.
    pub mesh: String,
    /// The enrollment endpoint (origin only).
    #[serde(default)]
    pub enroll: Option<String>,
    /// The Prometheus metrics endpoint.
    pub metrics: String,
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
        out.push_str("site     WAN MiB  (× bundle)  in-site MiB  (× bundle)  edges done   done after\n");
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

fn s(x: impl AsRef<str>) -> String {
    x.as_ref().to_owned()
}

fn path_arg(p: &Path) -> String {
    p.display().to_string()
}

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
    let mut fleet = Fleet::default();
    let result = tokio::select! {
        result = run_in(&config, &work, &mut fleet) => result,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    fleet.shutdown().await;
    if result.is_err() {
        eprintln!("demo failed; daemon logs were in {}", work.display());
    }
    result
}

async fn run_in(config: &DemoConfig, work: &Path, fleet: &mut Fleet) -> Result<DemoResult> {
    let bins = &config.binaries;
    let origin_bin = bins.path("origin");
    let stager_bin = bins.path("stager");
    let edge_bin = bins.path("edge-agent");
    let logs = work.join("logs");
    std::fs::create_dir_all(&logs)?;

    // Origin.
    let origin_dir = work.join("origin");
    procs::run_to_end(&origin_bin, &[s("init"), s("--dir"), path_arg(&origin_dir)]).await?;
    let origin_ready_file = work.join("origin.ready.json");
    let cmd = procs::command(
        &origin_bin,
        &[
            s("serve"),
            s("--dir"),
            path_arg(&origin_dir),
            s("--listen"),
            s("127.0.0.1:0"),
            s("--enroll-listen"),
            s("127.0.0.1:0"),
            s("--metrics-listen"),
            s("127.0.0.1:0"),
            s("--ready-file"),
            path_arg(&origin_ready_file),
        ],
        &logs.join("origin.log"),
    )?;
    fleet.spawn("origin", cmd)?;
    let origin: Ready = procs::wait_ready(&origin_ready_file, fleet).await?;
    tracing::info!(mesh = %origin.mesh, "origin up");

    // Stagers, one per site.
    let site_names: Vec<String> = (0..config.sites)
        .map(|i| format!("site-{}", (b'a' + i as u8) as char))
        .collect();
    let mut stagers = Vec::new();
    for site in &site_names {
        let dir = work.join(format!("stager-{site}"));
        let token = enroll_token(&origin_bin, &origin_dir, "stager", site).await?;
        procs::run_to_end(&stager_bin, &[s("enroll"), token, s("--dir"), path_arg(&dir)]).await?;
        let ready_file = work.join(format!("stager-{site}.ready.json"));
        let cmd = procs::command(
            &stager_bin,
            &[
                s("serve"),
                s("--dir"),
                path_arg(&dir),
                s("--site"),
                site.clone(),
                s("--origin"),
                origin.mesh.clone(),
                s("--listen"),
                s("127.0.0.1:0"),
                s("--metrics-listen"),
                s("127.0.0.1:0"),
                s("--ready-file"),
                path_arg(&ready_file),
            ],
            &logs.join(format!("stager-{site}.log")),
        )?;
        fleet.spawn(&format!("stager-{site}"), cmd)?;
        let ready: Ready = procs::wait_ready(&ready_file, fleet).await?;
        stagers.push(ready);
    }

    // Edges: enrolled now, started after the publish.
    let mut edges = Vec::new();
    for site in &site_names {
        for e in 0..config.edges_per_site {
            let dir = work.join(format!("edge-{site}-{e}"));
            let token = enroll_token(&origin_bin, &origin_dir, "edge", site).await?;
            procs::run_to_end(&edge_bin, &[s("enroll"), token, s("--dir"), path_arg(&dir)])
                .await?;
            edges.push((site.clone(), e, dir));
        }
    }

    // The bundle.
    let tree = work.join("tree");
    datagen::generate_tree(&tree, config.bundle_bytes, config.seed)?;
    let publish_start = Instant::now();
    let published = procs::run_to_end(
        &origin_bin,
        &[
            s("publish"),
            path_arg(&tree),
            s("--dir"),
            path_arg(&origin_dir),
            s("--name"),
            s("demo-os"),
            s("--version"),
            s("1.0.0"),
            s("--kind"),
            s("os-image"),
            s("--no-progress"),
        ],
    )
    .await?;
    let publish_s = publish_start.elapsed().as_secs_f64();
    let bundle_id = published
        .lines()
        .find_map(|l| l.strip_prefix("bundle "))
        .map(|rest| rest.split_whitespace().next().unwrap_or_default().to_owned())
        .context("origin publish did not print the bundle id")?;
    let fanout_start = Instant::now();

    // Every edge fetches at once from its site's stager.
    let mut fetches = tokio::task::JoinSet::new();
    for (site, e, dir) in &edges {
        let site_index = site_names.iter().position(|n| n == site).unwrap_or(0);
        let args = vec![
            s("fetch"),
            bundle_id.clone(),
            s("--dir"),
            path_arg(dir),
            s("--stager"),
            stagers[site_index].mesh.clone(),
            s("--no-progress"),
        ];
        let log = logs.join(format!("edge-{site}-{e}.log"));
        let cmd = procs::command(&edge_bin, &args, &log)?;
        let name = format!("edge-{site}-{e}");
        let site = site.clone();
        fetches.spawn(async move {
            let mut cmd = cmd;
            let status = cmd.status().await;
            (name, site, status, fanout_start.elapsed().as_secs_f64())
        });
    }
    let mut done: Vec<(String, f64)> = Vec::new();
    let deadline = tokio::time::sleep(FANOUT_TIMEOUT);
    tokio::pin!(deadline);
    while !fetches.is_empty() {
        tokio::select! {
            joined = fetches.join_next() => {
                let Some(joined) = joined else { break };
                let (name, site, status, at) = joined.context("edge task failed")?;
                match status {
                    Ok(st) if st.success() => done.push((site, at)),
                    Ok(st) => bail!("{name} failed with {st}; see {}", logs.join(format!("{name}.log")).display()),
                    Err(e) => bail!("cannot run {name}: {e}"),
                }
            }
            _ = &mut deadline => bail!("edges did not finish within {FANOUT_TIMEOUT:?}"),
        }
        fleet.check_alive()?;
    }
    let all_edges_done_s = fanout_start.elapsed().as_secs_f64();

    // Bytes, from the daemons' own counters.
    let origin_metrics = procs::scrape(&origin.metrics).await?;
    let origin_egress_bytes =
        procs::metric_sum(&origin_metrics, "stagecoach_bytes_sent_total", &[]);
    let bundle_bytes = procs::metric_sum(&origin_metrics, "stagecoach_bundle_stored_bytes", &[]);
    let tree_bytes = procs::metric_sum(&origin_metrics, "stagecoach_bundle_raw_bytes", &[]);
    let mut sites = Vec::new();
    for (i, name) in site_names.iter().enumerate() {
        let text = procs::scrape(&stagers[i].metrics).await?;
        let wan_bytes = procs::metric_sum(
            &text,
            "stagecoach_bytes_received_total",
            &[("peer_role", "origin")],
        );
        let lan_bytes =
            procs::metric_sum(&text, "stagecoach_bytes_sent_total", &[("peer_role", "edge")]);
        let site_done: Vec<f64> = done
            .iter()
            .filter(|(s, _)| s == name)
            .map(|(_, t)| *t)
            .collect();
        sites.push(SiteResult {
            name: name.clone(),
            wan_bytes,
            lan_bytes,
            edges_done: site_done.len(),
            edges: config.edges_per_site,
            done_s: site_done.iter().cloned().fold(0.0, f64::max),
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

async fn enroll_token(origin_bin: &Path, origin_dir: &Path, role: &str, site: &str) -> Result<String> {
    let out = procs::run_to_end(
        origin_bin,
        &[
            s("enroll"),
            s("--dir"),
            path_arg(origin_dir),
            s("--role"),
            s(role),
            s("--site"),
            s(site),
        ],
    )
    .await?;
    out.lines()
        .map(str::trim)
        .find(|l| l.starts_with("sc1-"))
        .map(str::to_owned)
        .context("origin enroll printed no token")
}
