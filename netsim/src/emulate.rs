//! `netsim emulate`: a topology run by the real `origin`, `stager` and `edge-agent` binaries on
//! loopback, every site behind an emulated WAN link. It writes the same [`RunResult`] as
//! `netsim simulate`, so the same files (result.json, result.md, completion.svg) and the same
//! comparison table come out of it.
//!
//! # What runs
//!
//! - One `origin`, and in front of it an **uplink relay** ([`crate::relay`]) that applies
//!   `origin.uplink_mbit` to everything the origin sends, shared by all sites — unless the
//!   uplink is at least the sum of the sites' WAN rates, so it can never be the bottleneck
//!   ([`uplink_binds`]): then the sites' relays send to the origin directly, which saves every
//!   datagram one user-space hop on this machine's cores.
//! - Per site a **WAN relay** in front of the uplink relay (or the origin), applying the site's `wan` link (rate,
//!   latency, jitter, loss) in both directions. The site's nodes reach the origin only through
//!   it ([`Testbed::route_site_via`]): stagers get it as `--origin`, edges' identities name it. Its
//!   counters are the site's WAN bytes: UDP payload origin → site, so QUIC's headers,
//!   acknowledgements and retransmissions are in them.
//! - Per site its stagers (`staged`, `mesh`), each with `--upload-limit-mbit` set to the site's
//!   LAN rate: a node's LAN port up.
//! - Per site its edges, enrolled. `direct`: each runs `edge-agent fetch` with no stager, so it
//!   fetches from the origin through the site's relay. `staged`: `edge-agent fetch` from the
//!   site's stagers. `mesh`: edge daemons (`edge-agent serve --peers on`, uploads limited to the
//!   LAN rate) start first, and each edge's fetch goes through its daemon, which takes pieces
//!   from the stagers and from the site's other edges.
//!
//! The bundle is the topology's tree (`bundle.path`), or, for `bundle.size_mib`, a generated
//! tree of random bytes ([`datagen::generate_incompressible_tree`]) so that the stored bundle,
//! and so every copy on the wire, is the topology's size, as the simulator assumes.
//!
//! # Timing
//!
//! Time 0 is the moment `origin publish` returns: the bundle is announced, stagers start pulling,
//! and every edge's fetch starts. An edge is complete when its `edge-agent fetch` exits with
//! success (the bundle verified and pinned).
//!
//! # What is not emulated
//!
//! Inside a site everything is loopback: the LAN's latency (`lan.latency_ms`) is not added, and
//! only uploads are rate-limited (stagers, and edge daemons to peers), not each edge's download.
//! Every process shares this machine's cores, so a fleet is limited to what one machine runs.
//!
//! Every process started is stopped when the run ends, fails, or is interrupted with Ctrl-C
//! ([`Interrupted`]).
//!
//! # Phases
//!
//! [`emulate`] runs [`Emulation::start`] (origin, relays, stagers, enrolled edges),
//! [`Emulation::start_edge_daemons`] (`mesh`), [`Emulation::fan_out`] (publish, every edge
//! fetches) and [`Emulation::collect`] (the [`RunResult`]). `netsim demo` runs the same phases
//! on its built-in topology, with its own steps in between (simulated machines before the
//! daemons start, an OS swap after the fan-out) while the emulation lives. What both share
//! beyond these phases (the work directory, [`Interrupted`]) is in [`crate::run`], so this
//! module does not depend on the demo.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use crate::compare::CompareTable;
use crate::cpu::CpuSample;
use crate::datagen;
use crate::procs::{self, Binaries};
use crate::progress::Progress;
use crate::relay::{self, LinkShape, Relay, RelayConfig, RelayStats, MIN_WAN_QUEUE_BYTES};
use crate::report::{Mode, RunResult, SiteResult};
use crate::run::{Interrupted, WorkDir};
use crate::testbed::{EdgeFetch, EdgeNode, Testbed};
use crate::topology::{Site, Strategy, Topology, WanLink};

/// How often progress is logged while edges fetch.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(5);

/// How often the progress display is updated while edges fetch (the bytes inside the sites
/// are scraped from the stagers' and daemons' metrics at this pace, and only when it is drawn).
const PROGRESS_REDRAW: Duration = Duration::from_secs(1);

/// How long the whole fan-out may take before the run gives up.
pub const FANOUT_TIMEOUT: Duration = Duration::from_secs(1800);

/// Most edges one emulation starts: each is a process (two with `mesh`) on this machine.
pub const MAX_EMULATED_EDGES: u64 = 64;

/// Name the bundle is published under.
const BUNDLE_NAME: &str = "netsim-emulate";

/// Seed of the generated bundle tree.
const TREE_SEED: u64 = 1;

/// How to run an emulation.
#[derive(Clone, Debug)]
pub struct EmulateOptions {
    /// Where the origin, stager and edge-agent binaries are.
    pub binaries: Binaries,
    /// Where state and logs go: created, and must be empty; a temporary directory (removed at
    /// the end) when `None`. [`compare_emulated`] puts each strategy in a subdirectory.
    pub work_dir: Option<PathBuf>,
    /// Seeds the relays' jitter and loss draws.
    pub seed: u64,
    /// Each site's WAN relay writes what it carries, both ways, to `SITE.wan.pcap` in this
    /// directory (pcap, see [`RelayConfig::capture`]); `None`: no capture.
    pub capture_dir: Option<PathBuf>,
    /// More `origin serve` flags (the demo's `--console ADDR`).
    pub origin_args: Vec<String>,
}

/// Emulates `topo` under `strategy`: starts the binaries behind relays, publishes the bundle,
/// lets every edge fetch it, and returns who moved how many bytes and when each edge finished.
/// Every process and relay it started is stopped before it returns, also on error; Ctrl-C
/// stops the run with [`Interrupted`].
pub async fn emulate(
    topo: &Topology,
    strategy: Strategy,
    options: &EmulateOptions,
) -> Result<RunResult> {
    check_emulatable(topo)?;
    let work_dir = WorkDir::create(options.work_dir.as_deref(), "stagecoach-emulate-")?;
    let work = work_dir.path();
    let mut slot = None;
    let result = tokio::select! {
        result = run_strategy(topo, strategy, options, work, None, &mut slot) => result,
        _ = tokio::signal::ctrl_c() => Err(Interrupted.into()),
    };
    if let Some(emulation) = slot.as_mut() {
        emulation.shutdown().await;
    }
    if result.is_err() && options.work_dir.is_some() {
        tracing::error!(logs = %work.join("logs").display(), "emulation failed; daemon logs kept");
    }
    result
}

/// Emulates the three strategies of [`Strategy::ALL`] one after the other over `topo` (each
/// from a fresh start, in `<work>/<strategy>/`, one generated tree shared), tabulates them like
/// [`crate::compare::compare_with`], and writes the comparison's files into `out_dir`.
pub async fn compare_emulated(
    topo: &Topology,
    options: &EmulateOptions,
    out_dir: &Path,
) -> Result<CompareTable> {
    check_emulatable(topo)?;
    let work_dir = WorkDir::create(options.work_dir.as_deref(), "stagecoach-emulate-")?;
    let work = work_dir.path();
    let mut slot = None;
    let runs = async {
        let tree = bundle_tree(topo, work)?;
        let mut runs = Vec::new();
        for strategy in Strategy::ALL {
            let run = run_strategy(
                topo,
                strategy,
                options,
                &work.join(strategy.as_str()),
                Some(&tree),
                &mut slot,
            )
            .await;
            if let Some(emulation) = slot.as_mut() {
                emulation.shutdown().await;
            }
            slot = None;
            runs.push(run?);
        }
        Ok::<_, anyhow::Error>(runs)
    };
    let runs = tokio::select! {
        runs = runs => runs,
        _ = tokio::signal::ctrl_c() => Err(Interrupted.into()),
    };
    if let Some(emulation) = slot.as_mut() {
        emulation.shutdown().await;
    }
    let table = CompareTable::from_runs(runs?)?;
    table.write_files(out_dir)?;
    Ok(table)
}

/// Fails when `topo` cannot run on this machine: too many edges, or a site name that is not a
/// valid site of a certificate.
pub fn check_emulatable(topo: &Topology) -> Result<()> {
    let edges = topo.total_edges();
    ensure!(
        edges <= MAX_EMULATED_EDGES,
        "topology {} has {edges} edges; emulate runs at most {MAX_EMULATED_EDGES} on one \
         machine (use `netsim simulate` for large fleets)",
        topo.name
    );
    for site in &topo.sites {
        proto::net::Site::new(site.name.as_str()).map_err(|e| {
            anyhow::anyhow!(
                "site name {:?} cannot be emulated: {e} (use lowercase letters, digits and '-')",
                site.name
            )
        })?;
    }
    Ok(())
}

/// Where the WAN relay of `site` writes its capture, in [`EmulateOptions::capture_dir`] `dir`.
pub fn wan_capture_path(dir: &Path, site: &str) -> PathBuf {
    dir.join(format!("{site}.wan.pcap"))
}

/// The relay shape of one direction of a site's WAN link.
pub fn wan_shape(link: &WanLink) -> LinkShape {
    let rate_bits_per_s = mbit_to_bits(link.mbit);
    let latency = Duration::from_secs_f64(link.latency_ms / 1000.0);
    LinkShape {
        rate_bits_per_s: Some(rate_bits_per_s),
        latency,
        jitter: Duration::from_secs_f64(link.jitter_ms / 1000.0),
        loss: link.loss,
        // One bandwidth-delay product of the round trip, as `LinkShape::wan`.
        queue_bytes: relay::bdp_bytes(rate_bits_per_s, 2 * latency).max(MIN_WAN_QUEUE_BYTES),
        reorder: false,
    }
}

/// The relay shape of the origin's uplink (origin → every site): its rate, no delay, a queue
/// of one bandwidth-delay product of the longest site round trip.
pub fn uplink_shape(topo: &Topology) -> LinkShape {
    let rate_bits_per_s = mbit_to_bits(topo.origin_uplink_mbit);
    let longest_rtt = topo
        .sites
        .iter()
        .map(|site| Duration::from_secs_f64(2.0 * site.wan.latency_ms / 1000.0))
        .max()
        .unwrap_or_default();
    LinkShape {
        rate_bits_per_s: Some(rate_bits_per_s),
        queue_bytes: relay::bdp_bytes(rate_bits_per_s, longest_rtt).max(MIN_WAN_QUEUE_BYTES),
        ..LinkShape::ideal()
    }
}

/// Whether the origin's uplink can limit the sites: it is narrower than their WAN links
/// together. When it is not, emulate runs no uplink relay.
pub fn uplink_binds(topo: &Topology) -> bool {
    topo.origin_uplink_mbit < topo.sites.iter().map(|site| site.wan.mbit).sum::<f64>()
}

fn mbit_to_bits(mbit: f64) -> u64 {
    (mbit * 1e6).round().max(1.0) as u64
}

/// An upload limit in whole Mbit/s for a LAN rate (the binaries take integers), at least 1.
pub fn lan_limit_mbit(site: &Site) -> u64 {
    site.lan_mbit.round().max(1.0) as u64
}

/// Everything one run started: the mesh of real processes and the relays in front of the
/// origin. Dropping it kills what is left; [`Emulation::shutdown`] stops it in order.
pub struct Emulation {
    /// The processes: origin, stagers, edges (and their daemons).
    pub mesh: Testbed,
    topo: Topology,
    strategy: Strategy,
    /// One per site, in topology order.
    site_relays: Vec<Relay>,
    /// In front of the origin; `None` while starting, and when the uplink cannot limit the
    /// sites ([`uplink_binds`]).
    uplink_relay: Option<Relay>,
}

impl Emulation {
    /// Stops every process (the relays stop when the emulation is dropped).
    pub async fn shutdown(&mut self) {
        self.mesh.shutdown().await;
        // The relays stop when dropped with the emulation.
    }
}

/// The tree to publish: the topology's, or a generated one in `work/tree`.
fn bundle_tree(topo: &Topology, work: &Path) -> Result<PathBuf> {
    if let Some(path) = &topo.bundle.path {
        ensure!(
            path.exists(),
            "bundle.path {} does not exist",
            path.display()
        );
        return Ok(path.clone());
    }
    let bytes = topo.bundle_bytes()?;
    let tree = work.join("tree");
    tracing::info!(bytes, tree = %tree.display(), "generating the bundle tree (random bytes)");
    datagen::generate_incompressible_tree(&tree, bytes, TREE_SEED)?;
    Ok(tree)
}

/// Runs one strategy in `work` (created; must be empty). What it starts goes into `slot`, which
/// the caller shuts down.
async fn run_strategy(
    topo: &Topology,
    strategy: Strategy,
    options: &EmulateOptions,
    work: &Path,
    tree: Option<&Path>,
    slot: &mut Option<Emulation>,
) -> Result<RunResult> {
    crate::run::ensure_empty_dir(work)?;
    let tree = match tree {
        Some(tree) => tree.to_path_buf(),
        None => bundle_tree(topo, work)?,
    };
    let emulation = Emulation::start(topo, strategy, options, work, None, slot).await?;
    if strategy == Strategy::Mesh {
        emulation.start_edge_daemons(true, |_| Vec::new()).await?;
    }
    let fanout = emulation
        .fan_out(&tree, BUNDLE_NAME, &Progress::hidden())
        .await?;
    emulation.collect(&fanout.fetches).await
}

/// What [`Emulation::fan_out`] did: the bundle it published and every edge's fetch.
#[derive(Clone, Debug)]
pub struct Fanout {
    /// The published bundle's id.
    pub bundle_id: String,
    /// Seconds `origin publish` took (packing included).
    pub publish_s: f64,
    /// One per edge; `done_s` counts from the moment `origin publish` returned.
    pub fetches: Vec<EdgeFetch>,
    /// CPU of every process (and of netsim) when `origin publish` had returned...
    pub cpu_before: CpuSample,
    /// ... and when the last fetch ended.
    pub cpu_after: CpuSample,
}

impl Emulation {
    /// Starts what a run of `topo` under `strategy` needs before the bundle is published: the
    /// origin, its uplink relay, one WAN relay per site, the sites' stagers (none with `direct`;
    /// each with `--upload-limit-mbit` of `stager_upload_mbit`, or of its site's LAN rate when
    /// `None`) and their enrolled edges, without daemons ([`Emulation::start_edge_daemons`]).
    /// The emulation goes into `slot` as soon as the origin runs, so the caller can shut down
    /// whatever started even when this fails.
    pub async fn start<'a>(
        topo: &Topology,
        strategy: Strategy,
        options: &EmulateOptions,
        work: &Path,
        stager_upload_mbit: Option<u64>,
        slot: &'a mut Option<Emulation>,
    ) -> Result<&'a mut Emulation> {
        check_emulatable(topo)?;
        tracing::info!(
            topology = %topo.name,
            %strategy,
            sites = topo.sites.len(),
            edges = topo.total_edges(),
            work = %work.display(),
            "emulation starting"
        );

        // The origin alone first: the relays need its address, the sites need the relays'.
        let mesh = Testbed::start_with(
            options.binaries.clone(),
            work,
            0,
            0,
            &[],
            &options.origin_args,
        )
        .await?;
        let emulation = slot.insert(Emulation {
            mesh,
            topo: topo.clone(),
            strategy,
            site_relays: Vec::new(),
            uplink_relay: None,
        });
        let origin_addr: SocketAddr = emulation
            .mesh
            .origin
            .mesh
            .parse()
            .with_context(|| format!("origin mesh address {:?}", emulation.mesh.origin.mesh))?;
        let uplink_addr = if uplink_binds(topo) {
            let uplink_relay = Relay::start(RelayConfig {
                up: LinkShape::ideal(),
                ..RelayConfig::symmetric(
                    loopback_any(),
                    origin_addr,
                    uplink_shape(topo),
                    options.seed,
                )
            })
            .context("cannot start the origin uplink relay")?;
            let addr = uplink_relay.local_addr();
            emulation.uplink_relay = Some(uplink_relay);
            addr
        } else {
            tracing::info!(
                uplink_mbit = topo.origin_uplink_mbit,
                "no uplink relay: the origin's uplink is at least the sites' WAN rates together"
            );
            origin_addr
        };
        for (i, site) in topo.sites.iter().enumerate() {
            let shape = wan_shape(&site.wan);
            let relay = Relay::start(RelayConfig {
                capture: options
                    .capture_dir
                    .as_ref()
                    .map(|dir| wan_capture_path(dir, &site.name)),
                ..RelayConfig::symmetric(
                    loopback_any(),
                    uplink_addr,
                    shape,
                    options.seed.wrapping_add(1 + i as u64),
                )
            })
            .with_context(|| format!("cannot start the WAN relay of site {}", site.name))?;
            emulation
                .mesh
                .route_site_via(&site.name, &relay.local_addr().to_string());
            tracing::info!(
                site = %site.name,
                relay = %relay.local_addr(),
                wan_mbit = site.wan.mbit,
                latency_ms = site.wan.latency_ms,
                jitter_ms = site.wan.jitter_ms,
                loss = site.wan.loss,
                "site WAN relay"
            );
            emulation.site_relays.push(relay);
        }

        for site in &topo.sites {
            if strategy != Strategy::Direct {
                let mbit = stager_upload_mbit.unwrap_or_else(|| lan_limit_mbit(site));
                let limit = vec!["--upload-limit-mbit".to_owned(), mbit.to_string()];
                for _ in 0..site.stagers {
                    emulation.mesh.add_stager(&site.name, &limit).await?;
                }
            }
            for e in 0..site.edges {
                emulation.mesh.add_edge(&site.name, e as usize).await?;
            }
            tracing::info!(site = %site.name, stagers = if strategy == Strategy::Direct { 0 } else { site.stagers }, edges = site.edges, "site started");
        }
        Ok(emulation)
    }

    /// Starts every edge's daemon (`edge-agent serve`), its uploads limited to its site's LAN
    /// rate, with `--peers on|off`, and `per_edge`'s flags of each edge's own (a machine root,
    /// say). `mesh` runs with peers on; the other strategies need daemons only for extras such
    /// as the demo's OS swap.
    pub async fn start_edge_daemons(
        &mut self,
        peers: bool,
        per_edge: impl Fn(&EdgeNode) -> Vec<String>,
    ) -> Result<()> {
        let limits: HashMap<String, u64> = self
            .topo
            .sites
            .iter()
            .map(|site| (site.name.clone(), lan_limit_mbit(site)))
            .collect();
        self.mesh
            .start_edge_daemons_with(peers, &[], |edge| {
                let mut flags = match limits.get(&edge.site) {
                    Some(mbit) => vec!["--upload-limit-mbit".to_owned(), mbit.to_string()],
                    None => Vec::new(),
                };
                flags.extend(per_edge(edge));
                flags
            })
            .await
    }

    /// Publishes `tree` as `name@1.0.0` and lets every edge fetch it at once, logging progress
    /// (WAN MiB per site) every few seconds and showing it on `progress`; gives up after
    /// [`FANOUT_TIMEOUT`]. A failed fetch is in the result, not an error.
    pub async fn fan_out(&self, tree: &Path, name: &str, progress: &Progress) -> Result<Fanout> {
        self.fan_out_with(tree, name, &[], progress).await
    }

    /// Like [`Emulation::fan_out`], publishing with more `origin publish` flags (`--encrypt`).
    pub async fn fan_out_with(
        &self,
        tree: &Path,
        name: &str,
        publish_args: &[&str],
        progress: &Progress,
    ) -> Result<Fanout> {
        progress.phase(format!("publishing {}", tree.display()));
        let publish_started = Instant::now();
        let bundle_id = self
            .mesh
            .publish_with(tree, name, "1.0.0", "os-image", publish_args)
            .await?;
        let publish_s = publish_started.elapsed().as_secs_f64();
        tracing::info!(bundle = %bundle_id, publish_s, "published; edges fetching");

        let edges = self.mesh.edges.clone();
        let cpu_before = CpuSample::now(&self.mesh.fleet.pids());
        progress.start_fanout(edges.len() as u64);
        let fetches = {
            let fanout = self
                .mesh
                .fetch_all_with(&edges, &bundle_id, |_| progress.edge_done());
            tokio::pin!(fanout);
            let started = Instant::now();
            let mut ticker = tokio::time::interval(PROGRESS_INTERVAL);
            ticker.tick().await;
            let mut redraw = tokio::time::interval(PROGRESS_REDRAW);
            redraw.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    fetches = &mut fanout => break fetches?,
                    _ = redraw.tick(), if !progress.is_hidden() => {
                        let lan_bytes = tokio::time::timeout(PROGRESS_REDRAW, self.lan_bytes())
                            .await
                            .ok()
                            .and_then(Result::ok);
                        progress.set_bytes(self.wan_down_bytes(), lan_bytes);
                    }
                    _ = ticker.tick() => {
                        let wan_mib: Vec<String> = self
                            .topo
                            .sites
                            .iter()
                            .zip(&self.site_relays)
                            .map(|(site, relay)| {
                                format!("{} {:.1}", site.name, relay.stats().down.forwarded_bytes as f64 / (1024.0 * 1024.0))
                            })
                            .collect();
                        tracing::info!(
                            elapsed_s = started.elapsed().as_secs(),
                            wan_mib = %wan_mib.join(", "),
                            "fetching"
                        );
                        if started.elapsed() > FANOUT_TIMEOUT {
                            bail!("edges did not finish within {FANOUT_TIMEOUT:?}");
                        }
                    }
                }
            }
        };
        let cpu_after = CpuSample::now(&self.mesh.fleet.pids());
        Ok(Fanout {
            bundle_id,
            publish_s,
            fetches,
            cpu_before,
            cpu_after,
        })
    }

    /// Bytes the sites' WAN relays carried origin → site so far, all sites together.
    fn wan_down_bytes(&self) -> u64 {
        self.site_relays
            .iter()
            .map(|relay| relay.stats().down.forwarded_bytes)
            .sum()
    }

    /// Bytes served inside the sites so far: by the stagers to their edges and by edges to
    /// each other, read from their metrics.
    async fn lan_bytes(&self) -> Result<u64> {
        let mut total = 0;
        for site in &self.topo.sites {
            let (same_site, other_sites) = self.mesh.peer_bytes(&site.name).await?;
            total += self.mesh.stager_egress_bytes(&site.name).await? + same_site + other_sites;
        }
        Ok(total)
    }

    /// Writes out what the sites' WAN relays captured so far ([`EmulateOptions::capture_dir`]).
    pub fn flush_captures(&self) {
        for relay in &self.site_relays {
            relay.flush_capture();
        }
    }

    /// What each site's WAN relay counted so far, in topology order.
    pub fn site_relay_stats(&self) -> Vec<RelayStats> {
        self.site_relays.iter().map(Relay::stats).collect()
    }

    /// The topology this emulation runs.
    pub fn topology(&self) -> &Topology {
        &self.topo
    }

    /// Reads every counter and builds the result of a fan-out's `fetches`: WAN bytes are what
    /// each site's relay carried origin → site since it started.
    pub async fn collect(&self, fetches: &[EdgeFetch]) -> Result<RunResult> {
        let (topo, strategy, emulation) = (&self.topo, self.strategy, self);
        let mesh = &emulation.mesh;
        let origin_metrics = mesh.origin_metrics().await?;
        let bundle_bytes =
            procs::metric_sum(&origin_metrics, "stagecoach_bundle_stored_bytes", &[]);
        ensure!(
            bundle_bytes > 0,
            "the origin reports no stored bundle bytes"
        );
        let origin_egress_bytes = ["stager", "edge"]
            .iter()
            .map(|role| {
                procs::metric_sum(
                    &origin_metrics,
                    "stagecoach_bytes_sent_total",
                    &[("peer_role", role)],
                )
            })
            .sum();

        let mut notes = Vec::new();
        let mut sites = Vec::new();
        let mut wan_up_bytes = 0;
        for (site, relay) in topo.sites.iter().zip(&emulation.site_relays) {
            let stats = relay.stats();
            wan_up_bytes += stats.up.forwarded_bytes;
            let dropped_queue =
                stats.down.dropped_queue_datagrams + stats.up.dropped_queue_datagrams;
            let dropped_loss = stats.down.dropped_loss_datagrams + stats.up.dropped_loss_datagrams;
            tracing::info!(
                site = %site.name,
                wan_down_bytes = stats.down.forwarded_bytes,
                wan_up_bytes = stats.up.forwarded_bytes,
                dropped_queue,
                dropped_loss,
                "site WAN relay totals"
            );
            if dropped_queue + dropped_loss > 0 {
                notes.push(format!(
                    "{}: the WAN relay dropped {dropped_queue} datagrams at its queue and \
                 {dropped_loss} to loss (of {} sent down)",
                    site.name, stats.down.received_datagrams
                ));
            }
            let mut edge_done_s: Vec<f64> = fetches
                .iter()
                .filter(|f| f.edge.site == site.name && f.ok)
                .map(|f| f.done_s)
                .collect();
            edge_done_s.sort_by(f64::total_cmp);
            for failed in fetches.iter().filter(|f| f.edge.site == site.name && !f.ok) {
                let log = std::fs::read_to_string(&failed.log).unwrap_or_default();
                let last = log.lines().last().unwrap_or("").trim().to_owned();
                tracing::error!(edge = %failed.edge.name, log = %failed.log.display(), %last, "edge fetch failed");
                notes.push(format!(
                    "{} did not get the bundle: {last} (log: {})",
                    failed.edge.name,
                    failed.log.display()
                ));
            }
            let edges = f64::from(site.edges);
            let mut completion = vec![(0.0, 0.0)];
            for (k, &t) in edge_done_s.iter().enumerate() {
                completion.push((t, (k + 1) as f64 / edges));
            }
            let stager_egress_bytes = mesh.stager_egress_bytes(&site.name).await?;
            let (peer_bytes, _other_sites) = mesh.peer_bytes(&site.name).await?;
            let edges_done = edge_done_s.len() as u32;
            sites.push(SiteResult {
                name: site.name.clone(),
                edges: site.edges,
                wan_bytes: stats.down.forwarded_bytes,
                lan_bytes: stager_egress_bytes + peer_bytes,
                stager_egress_bytes,
                peer_bytes,
                edges_done,
                done_s: (edges_done == site.edges)
                    .then(|| edge_done_s.last().copied().unwrap_or(0.0)),
                completion,
                edge_done_s,
            });
        }
        let all_edges_done_s = sites
            .iter()
            .map(|s| s.done_s)
            .try_fold(0.0, |latest: f64, done| done.map(|t| latest.max(t)));
        notes.push(format!(
            "emulated: real binaries on loopback; WAN bytes are UDP payload origin → site through \
         each site's relay (QUIC overhead included; site → origin carried {} in all)",
            crate::report::human_bytes(wan_up_bytes as f64)
        ));
        notes.push(match &emulation.uplink_relay {
            Some(relay) => format!(
                "emulated: the origin's uplink relay carried {} to all sites",
                crate::report::human_bytes(relay.stats().down.forwarded_bytes as f64)
            ),
            None => format!(
                "emulated: no uplink relay, as the origin's uplink ({} Mbit/s) is at least the \
                 sites' WAN rates together",
                topo.origin_uplink_mbit
            ),
        });
        notes.push("emulated: LAN latency not added; LAN rates limit uploads only".to_owned());
        Ok(RunResult {
            topology: topo.name.clone(),
            strategy,
            mode: Mode::Emulate,
            bundle_bytes,
            all_edges_done_s,
            line_rate_floor_s: topo.line_rate_floor_s(bundle_bytes),
            origin_egress_bytes,
            sites,
            regions: Vec::new(),
            site_stagers: Vec::new(),
            notes,
        })
    }
}

fn loopback_any() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}
