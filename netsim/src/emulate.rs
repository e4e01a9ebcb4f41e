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
//! - Per region (`[[regions]]`, `staged` and `mesh`) a **region relay** in front of the uplink
//!   relay (or the origin), shaped as the region's `wan`, and the region's stagers behind it:
//!   stagers enrolled for the site `region-NAME` ([`testbed::region_site`]), with no edges,
//!   siblings of each other when there are several.
//! - Per site in a region, besides its WAN relay to the origin, one relay per regional stager,
//!   each shaped as the site's `wan` too (a relay leads to one address). The site's stagers get
//!   them as `--upstream` (in the region's order) and the origin relay as `--origin`, their
//!   failover path. The site's WAN bytes are the sum over its relays (the result's notes say
//!   how much came from the region and how much from the origin).
//! - Per site its stagers (`staged`, `mesh`), each with `--upload-limit-mbit` set to the site's
//!   LAN rate: a node's LAN port up. With `stagers >= 2` they are siblings (`--sibling`, see
//!   [`Testbed::add_stagers`]): each chunk crosses the WAN to one of them and the others copy
//!   it over the LAN (loopback, not shaped).
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
//! The origin's egress on the links (what its uplink relay carried, or without one the sum over
//! the relays in front of it) is in the result's notes as copies of the bundle: about one per
//! site without regions, one per region (plus any failover) with them.
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
use crate::relay::{
    self, DirectionStats, LinkShape, Relay, RelayConfig, RelayStats, MIN_WAN_QUEUE_BYTES,
};
use crate::report::{Mode, RegionResult, RunResult, SiteResult, SiteStagers};
use crate::run::{Interrupted, WorkDir};
use crate::testbed::{self, EdgeFetch, EdgeNode, Testbed};
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
    for region in &topo.regions {
        let site = testbed::region_site(&region.name);
        proto::net::Site::new(site.as_str()).map_err(|e| {
            anyhow::anyhow!(
                "region {:?} cannot be emulated: its stagers' site {site:?} is not valid: {e} \
                 (use lowercase letters, digits and '-')",
                region.name
            )
        })?;
        ensure!(
            !topo.sites.iter().any(|s| s.name == site),
            "site {site:?} has the name region {:?}'s stagers are enrolled for; rename one",
            region.name
        );
    }
    Ok(())
}

/// Where the WAN relay of `site` writes its capture, in [`EmulateOptions::capture_dir`] `dir`.
pub fn wan_capture_path(dir: &Path, site: &str) -> PathBuf {
    dir.join(format!("{site}.wan.pcap"))
}

/// Where the relay from site `site` to the `index`th stager of its region writes its capture,
/// in [`EmulateOptions::capture_dir`] `dir`.
pub fn regional_capture_path(dir: &Path, site: &str, index: usize) -> PathBuf {
    dir.join(format!("{site}.wan-region-{index}.pcap"))
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
        .map(|site| &site.wan)
        .chain(topo.regions.iter().map(|region| &region.wan))
        .map(|wan| Duration::from_secs_f64(2.0 * wan.latency_ms / 1000.0))
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
    // A site in a region may fail over to the origin, so every link from the origin counts.
    let links = topo.sites.iter().map(|site| site.wan.mbit).sum::<f64>()
        + topo
            .regions
            .iter()
            .map(|region| region.wan.mbit)
            .sum::<f64>();
    topo.origin_uplink_mbit < links
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
    site_links: Vec<SiteLinks>,
    /// One per region, in topology order (none with `direct`).
    region_links: Vec<RegionLink>,
    /// In front of the origin; `None` while starting, and when the uplink cannot limit the
    /// sites ([`uplink_binds`]).
    uplink_relay: Option<Relay>,
}

/// The relays of one site's WAN link, each shaped as the site's `wan`.
struct SiteLinks {
    /// Towards the origin (or its uplink relay): the site's only link outside a region, its
    /// failover path inside one.
    origin: Relay,
    /// Towards each stager of the site's region, in the region's order (empty outside a
    /// region, and with `direct`).
    regional: Vec<Relay>,
}

impl SiteLinks {
    /// Every relay of the site's link.
    fn relays(&self) -> impl Iterator<Item = &Relay> {
        std::iter::once(&self.origin).chain(&self.regional)
    }

    /// What the site's relays counted, added up.
    fn stats(&self) -> RelayStats {
        self.relays()
            .map(Relay::stats)
            .fold(RelayStats::default(), add_stats)
    }
}

/// One region's link from the origin to its stagers.
struct RegionLink {
    /// The region's name.
    name: String,
    /// Shaped as the region's `wan`, in front of the origin (or its uplink relay).
    relay: Relay,
}

/// `a + b`, counter by counter.
fn add_stats(a: RelayStats, b: RelayStats) -> RelayStats {
    let add = |a: DirectionStats, b: DirectionStats| DirectionStats {
        received_datagrams: a.received_datagrams + b.received_datagrams,
        received_bytes: a.received_bytes + b.received_bytes,
        forwarded_datagrams: a.forwarded_datagrams + b.forwarded_datagrams,
        forwarded_bytes: a.forwarded_bytes + b.forwarded_bytes,
        dropped_queue_datagrams: a.dropped_queue_datagrams + b.dropped_queue_datagrams,
        dropped_loss_datagrams: a.dropped_loss_datagrams + b.dropped_loss_datagrams,
        dropped_oversize_datagrams: a.dropped_oversize_datagrams + b.dropped_oversize_datagrams,
        send_errors: a.send_errors + b.send_errors,
    };
    RelayStats {
        up: add(a.up, b.up),
        down: add(a.down, b.down),
        active_clients: a.active_clients + b.active_clients,
        refused_datagrams: a.refused_datagrams + b.refused_datagrams,
    }
}

/// What one site's WAN relays carried origin → site so far, split by where it came from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SiteWanBytes {
    /// Through the relay towards the origin.
    pub from_origin: u64,
    /// Through the relays towards the region's stagers, added up.
    pub from_region: u64,
}

impl SiteWanBytes {
    /// Both: the site's WAN bytes.
    pub fn total(&self) -> u64 {
        self.from_origin + self.from_region
    }
}

impl Emulation {
    /// Stops every process (the relays stop when the emulation is dropped).
    pub async fn shutdown(&mut self) {
        self.mesh.shutdown().await;
        // The relays stop when dropped with the emulation.
    }

    /// What site `site`'s WAN relays carried origin → site so far; `None` for no such site.
    pub fn site_wan_bytes(&self, site: &str) -> Option<SiteWanBytes> {
        let index = self.topo.sites.iter().position(|s| s.name == site)?;
        let links = &self.site_links[index];
        Some(SiteWanBytes {
            from_origin: links.origin.stats().down.forwarded_bytes,
            from_region: links
                .regional
                .iter()
                .map(|relay| relay.stats().down.forwarded_bytes)
                .sum(),
        })
    }

    /// What region `region`'s link carried origin → its stagers so far; `None` for no such
    /// region (or none started, with `direct`).
    pub fn region_wan_bytes(&self, region: &str) -> Option<u64> {
        self.region_links
            .iter()
            .find(|link| link.name == region)
            .map(|link| link.relay.stats().down.forwarded_bytes)
    }

    /// Bytes that left the origin on the emulated links so far: what its uplink relay carried
    /// down, or without one, what the relays in front of it carried (every region's, and every
    /// site's towards the origin). UDP payload, QUIC's overhead included.
    pub fn origin_link_bytes(&self) -> u64 {
        match &self.uplink_relay {
            Some(relay) => relay.stats().down.forwarded_bytes,
            None => {
                let regions: u64 = self
                    .region_links
                    .iter()
                    .map(|link| link.relay.stats().down.forwarded_bytes)
                    .sum();
                let sites: u64 = self
                    .site_links
                    .iter()
                    .map(|links| links.origin.stats().down.forwarded_bytes)
                    .sum();
                regions + sites
            }
        }
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
            site_links: Vec::new(),
            region_links: Vec::new(),
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
        // Seeds of the relays' draws: the sites' as before regions existed, then the regions'.
        let mut seeds = (1..).map(|i: u64| options.seed.wrapping_add(i));
        let site_seeds: Vec<u64> = seeds.by_ref().take(topo.sites.len()).collect();

        // The regions first: their stagers' addresses are where the sites' relays lead.
        let mut regional_addrs: HashMap<String, Vec<SocketAddr>> = HashMap::new();
        if strategy != Strategy::Direct {
            for region in &topo.regions {
                let site = testbed::region_site(&region.name);
                let relay = Relay::start(RelayConfig {
                    capture: options
                        .capture_dir
                        .as_ref()
                        .map(|dir| wan_capture_path(dir, &site)),
                    ..RelayConfig::symmetric(
                        loopback_any(),
                        uplink_addr,
                        wan_shape(&region.wan),
                        seeds.next().unwrap_or(options.seed),
                    )
                })
                .with_context(|| format!("cannot start the WAN relay of region {}", region.name))?;
                emulation
                    .mesh
                    .route_site_via(&site, &relay.local_addr().to_string());
                let stagers = emulation
                    .mesh
                    .add_regional_stagers(&region.name, region.stagers as usize, &[])
                    .await?;
                let addrs = stagers
                    .iter()
                    .map(|st| {
                        st.ready.mesh.parse::<SocketAddr>().with_context(|| {
                            format!("mesh address {:?} of {}", st.ready.mesh, st.name)
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                tracing::info!(
                    region = %region.name,
                    relay = %relay.local_addr(),
                    stagers = addrs.len(),
                    wan_mbit = region.wan.mbit,
                    latency_ms = region.wan.latency_ms,
                    "region WAN relay and stagers"
                );
                regional_addrs.insert(region.name.clone(), addrs);
                emulation.region_links.push(RegionLink {
                    name: region.name.clone(),
                    relay,
                });
            }
        }

        for (site, seed) in topo.sites.iter().zip(site_seeds) {
            let shape = wan_shape(&site.wan);
            let relay = Relay::start(RelayConfig {
                capture: options
                    .capture_dir
                    .as_ref()
                    .map(|dir| wan_capture_path(dir, &site.name)),
                ..RelayConfig::symmetric(loopback_any(), uplink_addr, shape.clone(), seed)
            })
            .with_context(|| format!("cannot start the WAN relay of site {}", site.name))?;
            emulation
                .mesh
                .route_site_via(&site.name, &relay.local_addr().to_string());
            // Inside a region, one more relay per regional stager, each shaped as the site's
            // link: a relay leads to one address.
            let targets = site
                .region
                .as_ref()
                .and_then(|region| regional_addrs.get(region))
                .cloned()
                .unwrap_or_default();
            let mut regional = Vec::with_capacity(targets.len());
            for (k, target) in targets.iter().enumerate() {
                let relay = Relay::start(RelayConfig {
                    capture: options
                        .capture_dir
                        .as_ref()
                        .map(|dir| regional_capture_path(dir, &site.name, k)),
                    ..RelayConfig::symmetric(
                        loopback_any(),
                        *target,
                        shape.clone(),
                        seed.wrapping_add(1000 * (k as u64 + 1)),
                    )
                })
                .with_context(|| {
                    format!(
                        "cannot start the WAN relay of site {} to its region",
                        site.name
                    )
                })?;
                regional.push(relay);
            }
            let upstreams: Vec<String> = regional
                .iter()
                .map(|relay| relay.local_addr().to_string())
                .collect();
            emulation.mesh.route_site_upstreams(&site.name, &upstreams);
            tracing::info!(
                site = %site.name,
                relay = %relay.local_addr(),
                region = site.region.as_deref().unwrap_or("-"),
                regional_relays = %upstreams.join(","),
                wan_mbit = site.wan.mbit,
                latency_ms = site.wan.latency_ms,
                jitter_ms = site.wan.jitter_ms,
                loss = site.wan.loss,
                "site WAN relay"
            );
            emulation.site_links.push(SiteLinks {
                origin: relay,
                regional,
            });
        }

        for site in &topo.sites {
            if strategy != Strategy::Direct {
                let mbit = stager_upload_mbit.unwrap_or_else(|| lan_limit_mbit(site));
                let limit = vec!["--upload-limit-mbit".to_owned(), mbit.to_string()];
                emulation
                    .mesh
                    .add_stagers(&site.name, site.stagers as usize, &limit)
                    .await?;
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
                            .zip(&self.site_links)
                            .map(|(site, links)| {
                                format!("{} {:.1}", site.name, links.stats().down.forwarded_bytes as f64 / (1024.0 * 1024.0))
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
        self.site_links
            .iter()
            .map(|links| links.stats().down.forwarded_bytes)
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
        for relay in self.site_links.iter().flat_map(SiteLinks::relays) {
            relay.flush_capture();
        }
        for link in &self.region_links {
            link.relay.flush_capture();
        }
    }

    /// What each site's WAN relays counted so far, in topology order (a site in a region: its
    /// relays to the region's stagers and to the origin, added up).
    pub fn site_relay_stats(&self) -> Vec<RelayStats> {
        self.site_links.iter().map(SiteLinks::stats).collect()
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
        for (site, links) in topo.sites.iter().zip(&emulation.site_links) {
            let stats = links.stats();
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
        notes.extend(self.tier_notes(bundle_bytes));
        let (regions, site_stagers) = self.tier_results(&mut notes).await;
        Ok(RunResult {
            topology: topo.name.clone(),
            strategy,
            mode: Mode::Emulate,
            bundle_bytes,
            all_edges_done_s,
            line_rate_floor_s: topo.line_rate_floor_s(bundle_bytes),
            origin_egress_bytes,
            sites,
            regions,
            site_stagers,
            notes,
        })
    }

    /// The regions' and the sites' stagers' shares, from the stagers' metrics (payload bytes,
    /// as the simulator counts them). A stager that does not answer (killed by a test) counts
    /// nothing, which `notes` says.
    async fn tier_results(&self, notes: &mut Vec<String>) -> (Vec<RegionResult>, Vec<SiteStagers>) {
        let mut pulled = HashMap::new();
        for stager in &self.mesh.stagers {
            match procs::scrape(&stager.ready.metrics).await {
                Ok(text) => {
                    pulled.insert(
                        stager.name.clone(),
                        StagerPulled::from_metrics(&stager.site, &text),
                    );
                }
                Err(error) => notes.push(format!(
                    "{} did not answer for its metrics ({error:#}); its bytes are not counted",
                    stager.name
                )),
            }
        }
        let of_site = |site: &str| -> Vec<StagerPulled> {
            self.mesh
                .stagers
                .iter()
                .filter(|st| st.site == site)
                .map(|st| pulled.get(&st.name).copied().unwrap_or_default())
                .collect()
        };
        let regions = if self.strategy == Strategy::Direct {
            Vec::new()
        } else {
            self.topo
                .regions
                .iter()
                .map(|region| {
                    let stagers = of_site(&testbed::region_site(&region.name));
                    RegionResult {
                        name: region.name.clone(),
                        sites: self
                            .topo
                            .sites
                            .iter()
                            .filter(|site| site.region.as_deref() == Some(region.name.as_str()))
                            .count() as u32,
                        pulled_bytes: stagers.iter().map(|st| st.upstream_bytes).sum(),
                        stager_pulled_bytes: stagers.iter().map(|st| st.upstream_bytes).collect(),
                        served_bytes: stagers.iter().map(|st| st.served_stagers_bytes).sum(),
                    }
                })
                .collect()
        };
        let site_stagers = if self.strategy == Strategy::Direct {
            Vec::new()
        } else {
            self.topo
                .sites
                .iter()
                .filter(|site| site.stagers > 1)
                .map(|site| SiteStagers {
                    site: site.name.clone(),
                    pulled_bytes: of_site(&site.name)
                        .iter()
                        .map(|st| st.upstream_bytes)
                        .collect(),
                })
                .collect()
        };
        (regions, site_stagers)
    }
}

/// What one stager moved, from its metrics: payload bytes, by whom it came from or went to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StagerPulled {
    /// From its upstreams across the WAN: the origin and stagers of other sites (a region's).
    pub upstream_bytes: u64,
    /// From the other stagers of its site, over the LAN.
    pub sibling_bytes: u64,
    /// To stagers of other sites (what a regional stager serves its sites' stagers).
    pub served_stagers_bytes: u64,
}

impl StagerPulled {
    /// Reads what a stager of `site` moved from its Prometheus text `metrics`.
    pub fn from_metrics(site: &str, metrics: &str) -> Self {
        let received = "stagecoach_bytes_received_total";
        let sent = "stagecoach_bytes_sent_total";
        let from_origin = procs::metric_sum(metrics, received, &[("peer_role", "origin")]);
        let from_stagers = procs::metric_sum(metrics, received, &[("peer_role", "stager")]);
        let sibling_bytes = procs::metric_sum(
            metrics,
            received,
            &[("peer_role", "stager"), ("peer_site", site)],
        );
        let to_stagers = procs::metric_sum(metrics, sent, &[("peer_role", "stager")]);
        let to_siblings = procs::metric_sum(
            metrics,
            sent,
            &[("peer_role", "stager"), ("peer_site", site)],
        );
        Self {
            upstream_bytes: from_origin + from_stagers.saturating_sub(sibling_bytes),
            sibling_bytes,
            served_stagers_bytes: to_stagers.saturating_sub(to_siblings),
        }
    }
}

impl Emulation {
    /// The notes on regions and several stagers per site: how a site's WAN bytes add up, what
    /// each link carried, and the origin's egress on the links as copies of the bundle.
    fn tier_notes(&self, bundle_bytes: u64) -> Vec<String> {
        let copies = |bytes: u64| bytes as f64 / bundle_bytes.max(1) as f64;
        let mut notes = Vec::new();
        if !self.region_links.is_empty() {
            notes.push(
                "emulated: a site in a region reaches each regional stager and the origin \
                 through relays of its own, each shaped as the site's WAN link (a relay leads to \
                 one address); its WAN bytes are their sum"
                    .to_owned(),
            );
            for link in &self.region_links {
                let bytes = link.relay.stats().down.forwarded_bytes;
                notes.push(format!(
                    "emulated: region {}: its link carried {} origin → regional stagers ({:.2}× \
                     the bundle)",
                    link.name,
                    crate::report::human_bytes(bytes as f64),
                    copies(bytes)
                ));
            }
            for (site, links) in self.topo.sites.iter().zip(&self.site_links) {
                if links.regional.is_empty() {
                    continue;
                }
                let from_origin = links.origin.stats().down.forwarded_bytes;
                let from_region: u64 = links
                    .regional
                    .iter()
                    .map(|relay| relay.stats().down.forwarded_bytes)
                    .sum();
                notes.push(format!(
                    "emulated: {}: {} from its region's stagers, {} from the origin",
                    site.name,
                    crate::report::human_bytes(from_region as f64),
                    crate::report::human_bytes(from_origin as f64)
                ));
            }
        }
        if self.topo.sites.iter().any(|site| site.stagers > 1) && self.strategy != Strategy::Direct
        {
            notes.push(
                "emulated: a site's stagers are siblings (`stager serve --sibling`): each chunk \
                 crosses the WAN to one of them, the others copy it over the LAN"
                    .to_owned(),
            );
        }
        let origin_link_bytes = self.origin_link_bytes();
        notes.push(format!(
            "emulated: origin egress on the links {} = {:.2}× the bundle ({})",
            crate::report::human_bytes(origin_link_bytes as f64),
            copies(origin_link_bytes),
            if self.uplink_relay.is_some() {
                "its uplink relay"
            } else {
                "the relays in front of it"
            }
        ));
        notes
    }
}

fn loopback_any() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}
