//! `netsim demo`: an emulation of a built-in topology ([`BUILTIN_TOPOLOGY`], two sites of one
//! stager and four edges behind fast WAN links), run by [`crate::emulate`]'s machinery — the real
//! binaries, a relay on each site's WAN path — with what only the demo does on top: an OS-like
//! bundle (about half of it compresses, as an image does), the table it prints, and with
//! `--swap` an OS swap of every edge at the end.
//!
//! The demo's flags override the topology's fields (`--bundle-mib`, `--sites`, `--edges`,
//! `--strategy`, `--stagers-per-site`); `--topology FILE` runs it on another topology. With two
//! or more stagers per site they are siblings: the table shows each stager's bytes pulled over
//! the WAN and copied from its siblings, and the site's WAN bytes stay about one bundle. WAN bytes are reported twice:
//! `wan_bytes`, the payload the origin sent to the site's nodes (what the site pulled, as the
//! mesh counts it), and `wan_link_bytes`, what the site's relay carried origin → site (UDP
//! payload: QUIC's headers, acknowledgements and retransmissions included).

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};

use crate::datagen;
use crate::emulate::{self, EmulateOptions, Emulation};
use crate::machines;
use crate::plaintext;
use crate::procs::{self, Binaries};
use crate::progress::Progress;
use crate::run::Interrupted;
use crate::testbed::{self, site_name, Testbed};
use crate::topology::{Strategy, Topology};

/// The topology `netsim demo` emulates unless `--topology` names another.
pub const BUILTIN_TOPOLOGY: &str = include_str!("../topologies/demo.toml");

/// Name the demo's bundle is published under.
const BUNDLE_NAME: &str = "demo-os";

const MIB: u64 = 1024 * 1024;

/// Most stagers per site `--stagers-per-site` starts: each is a process on this machine.
pub const MAX_STAGERS_PER_SITE: usize = 8;

/// The demo's flags that override fields of its topology (`None`: the topology's).
#[derive(Clone, Debug, Default)]
pub struct DemoOverrides {
    /// Size of the generated bundle tree, in MiB (replaces the topology's bundle).
    pub bundle_mib: Option<u64>,
    /// Number of sites: the first ones of the topology, or more like its last site.
    pub sites: Option<usize>,
    /// Edges of every site.
    pub edges: Option<usize>,
    /// How edges get the bundle.
    pub strategy: Option<Strategy>,
    /// Stagers of every site (siblings of each other when more than one).
    pub stagers_per_site: Option<usize>,
}

/// The demo's topology: `file`, or [`BUILTIN_TOPOLOGY`] when `None`, with `overrides` applied.
///
/// With `sites` larger than the topology's, the extra sites are copies of its last site named
/// `site-c`, `site-d`, … ([`site_name`]); with fewer, the first ones are kept.
pub fn demo_topology(file: Option<&Path>, overrides: &DemoOverrides) -> Result<Topology> {
    let mut topo = match file {
        Some(path) => Topology::load(path)?,
        None => Topology::from_toml_str(BUILTIN_TOPOLOGY)
            .context("the built-in demo topology is not valid")?,
    };
    if let Some(mib) = overrides.bundle_mib {
        ensure!(mib > 0, "--bundle-mib must be at least 1");
        topo.bundle.size_bytes = Some(mib.checked_mul(MIB).context("--bundle-mib is too large")?);
        topo.bundle.path = None;
    }
    if let Some(sites) = overrides.sites {
        ensure!(sites > 0, "--sites must be at least 1");
        let template = topo
            .sites
            .last()
            .cloned()
            .context("the topology has no site")?;
        topo.sites.truncate(sites);
        for i in topo.sites.len()..sites {
            let mut site = template.clone();
            site.name = site_name(i);
            if topo.sites.iter().any(|s| s.name == site.name) {
                site.name = format!("{}-{i}", template.name);
            }
            topo.sites.push(site);
        }
    }
    if let Some(edges) = overrides.edges {
        ensure!(edges > 0, "--edges must be at least 1");
        let edges = u32::try_from(edges).context("--edges is too large")?;
        for site in &mut topo.sites {
            site.edges = edges;
        }
    }
    if let Some(strategy) = overrides.strategy {
        topo.strategy = strategy;
    }
    if let Some(stagers) = overrides.stagers_per_site {
        ensure!(stagers > 0, "--stagers-per-site must be at least 1");
        ensure!(
            stagers <= MAX_STAGERS_PER_SITE,
            "--stagers-per-site runs at most {MAX_STAGERS_PER_SITE} stagers per site on one machine"
        );
        let stagers = u32::try_from(stagers).context("--stagers-per-site is too large")?;
        for site in &mut topo.sites {
            site.stagers = stagers;
        }
    }
    emulate::check_emulatable(&topo)?;
    Ok(topo)
}

/// What to run.
#[derive(Clone, Debug)]
pub struct DemoConfig {
    /// The topology to emulate, overrides applied ([`demo_topology`]); its `strategy` runs.
    pub topology: Topology,
    /// Seed of the generated tree and of the relays' draws.
    pub seed: u64,
    /// Upload limit of every stager to its edges, in Mbit/s (`None`: its site's LAN rate).
    pub stager_upload_mbit: Option<u64>,
    /// End with an OS swap on every edge: each edge has a simulated machine, and the origin
    /// swaps them all to the demo bundle (`origin swap`).
    pub swap: bool,
    /// Publish the bundle encrypted (`origin publish --encrypt`) with plaintext markers planted
    /// in it, let the demo's edges read it, capture each site's WAN traffic, and end by
    /// searching the stagers' stores, the edges' stores and the captures for the markers and
    /// unpacking the bundle on every edge ([`EncryptionResult`]).
    pub encrypt: bool,
    /// The origin's web console listens here (`origin serve --console`; loopback only, as
    /// the console has no TLS in the demo); the demo makes an admin account and prints how
    /// to log in.
    pub console: String,
    /// After the result, keep every process up until Ctrl-C, so a person can look at the
    /// console and the daemons' metrics.
    pub hold: bool,
    /// Where the binaries live.
    pub binaries: Binaries,
}

/// The console account the demo makes.
pub const DEMO_ADMIN: &str = "demo";

/// One site's line of the result.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SiteResult {
    /// Site name.
    pub name: String,
    /// Payload bytes the origin and the regional stagers sent to the site's nodes (its
    /// stagers; with `direct`, its edges): what the site pulled over the WAN.
    pub wan_bytes: u64,
    /// Bytes the site's WAN relay carried origin → site: UDP payload, so QUIC's overhead
    /// included.
    pub wan_link_bytes: u64,
    /// The site's WAN rate, in Mbit/s.
    pub wan_mbit: f64,
    /// The site's WAN latency, one way, in ms.
    pub wan_latency_ms: f64,
    /// Bytes served inside the site: `stager_egress_bytes + peer_bytes`.
    pub lan_bytes: u64,
    /// Bytes the site's stager(s) sent to its edges.
    pub stager_egress_bytes: u64,
    /// Bytes edges of the site sent to other edges of the site (0 unless `mesh`).
    pub peer_bytes: u64,
    /// Edges holding the whole bundle at the end.
    pub edges_done: usize,
    /// Edges in the site.
    pub edges: usize,
    /// Seconds from publish until the last edge of the site held the bundle.
    pub done_s: f64,
    /// Seconds from publish until each edge held the bundle, ascending.
    pub edge_done_s: Vec<f64>,
    /// What each of the site's stagers pulled, in start order.
    #[serde(default)]
    pub stagers: Vec<StagerPulled>,
}

/// What one stager pulled, from its stager's metrics (payload bytes received).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StagerPulled {
    /// The stager's name, e.g. `stager-site-a-1`.
    pub name: String,
    /// From its upstreams across the WAN: the origin and any regional stager.
    pub upstream_bytes: u64,
    /// From the other stagers of its site, over the LAN.
    pub sibling_bytes: u64,
}

impl StagerPulled {
    /// Reads what stager `name` of `site` pulled from its metrics `text`.
    fn from_metrics(name: &str, site: &str, text: &str) -> Self {
        let moved = emulate::StagerPulled::from_metrics(site, text);
        Self {
            name: name.to_owned(),
            upstream_bytes: moved.upstream_bytes,
            sibling_bytes: moved.sibling_bytes,
        }
    }
}

/// The demo's result, also printed as JSON with `--json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DemoResult {
    /// The topology's name.
    pub topology: String,
    /// How edges got the bundle.
    pub strategy: Strategy,
    /// The stagers' upload limit to their edges, in Mbit/s (`None`: each site's LAN rate,
    /// which differs between sites, or no stagers with `direct`).
    pub stager_upload_mbit: Option<u64>,
    /// The origin's uplink, shared by every site, in Mbit/s.
    pub origin_uplink_mbit: f64,
    /// The bundle id.
    pub bundle_id: String,
    /// Payload bytes of the published tree.
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
    /// What the emulation noted: relay drops, what is not emulated.
    #[serde(default)]
    pub notes: Vec<String>,
    /// The swap at the end, with `--swap`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swap: Option<SwapResult>,
    /// The time one copy of the bundle takes through the slowest site's WAN link at its rate:
    /// no fan-out can end sooner.
    #[serde(default)]
    pub wan_floor_s: f64,
    /// What the fan-out cost in CPU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<CpuResult>,
    /// The plaintext search and the unpack at the end, with `--encrypt`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<EncryptionResult>,
}

/// CPU seconds (user + system) spent from the moment `origin publish` returned until the last
/// edge held the bundle ([`crate::cpu`]).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CpuResult {
    /// By the origin.
    pub origin_s: f64,
    /// By every stager.
    pub stagers_s: f64,
    /// By every edge's daemon.
    pub edge_daemons_s: f64,
    /// By the `edge-agent fetch` commands (all the edge's work when it runs no daemon).
    pub fetch_commands_s: f64,
    /// The mesh: origin, stagers, edge daemons and fetch commands.
    pub mesh_s: f64,
    /// By netsim itself: the WAN relays, the progress display, the harness. Not the mesh's.
    pub netsim_s: f64,
    /// Bytes delivered, verified and stored at the edges: the bundle's stored bytes per edge
    /// that holds it.
    pub delivered_bytes: u64,
    /// `mesh_s` per GiB of `delivered_bytes`.
    pub mesh_s_per_gib: f64,
}

impl CpuResult {
    fn from_fanout(mesh: &Testbed, fanout: &emulate::Fanout, delivered_bytes: u64) -> Self {
        let (before, after) = (&fanout.cpu_before, &fanout.cpu_after);
        let secs = |names: &mut dyn Iterator<Item = &str>| -> f64 {
            names
                .map(|name| after.child_since(before, name).as_secs_f64())
                .sum()
        };
        let origin_s = secs(&mut std::iter::once(testbed::ORIGIN_NAME));
        let stagers_s = secs(&mut mesh.stagers.iter().map(|st| st.name.as_str()));
        let edge_daemons_s = secs(&mut mesh.edges.iter().map(|e| e.name.as_str()));
        let fetch_commands_s = after.reaped.saturating_sub(before.reaped).as_secs_f64();
        let mesh_s = origin_s + stagers_s + edge_daemons_s + fetch_commands_s;
        let gib = delivered_bytes as f64 / (1024.0 * 1024.0 * 1024.0);
        Self {
            origin_s,
            stagers_s,
            edge_daemons_s,
            fetch_commands_s,
            mesh_s,
            netsim_s: after.own.saturating_sub(before.own).as_secs_f64(),
            delivered_bytes,
            mesh_s_per_gib: if gib > 0.0 { mesh_s / gib } else { 0.0 },
        }
    }
}

/// What `--encrypt` found at the end of the demo.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EncryptionResult {
    /// The plaintext markers planted in the published tree.
    pub markers: Vec<String>,
    /// Files and bytes of the stagers' directories searched (stores, indexes, state).
    pub stager_files: u64,
    /// See [`EncryptionResult::stager_files`].
    pub stager_bytes: u64,
    /// Files and bytes of the edges' stores (what they serve to peers) searched.
    pub edge_store_files: u64,
    /// See [`EncryptionResult::edge_store_files`].
    pub edge_store_bytes: u64,
    /// Bytes of the sites' captured WAN traffic (origin ↔ stagers, both ways, pcap) searched.
    pub capture_bytes: u64,
    /// `marker in file` for every place a marker was found: empty when nothing leaked.
    pub found: Vec<String>,
    /// Edges whose unpacked bundle is the published tree, byte for byte.
    pub edges_identical: usize,
    /// Edges asked to unpack.
    pub edges: usize,
    /// One line per edge whose unpack failed or differed.
    pub failures: Vec<String>,
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

/// One line saying how `strategy` moves the bundle.
fn strategy_line(strategy: Strategy) -> &'static str {
    match strategy {
        Strategy::Direct => "every edge fetches from the origin across its site's WAN",
        Strategy::Staged => "edges fetch from their stager only",
        Strategy::Mesh => "edges fetch from their stager and from each other",
    }
}

impl DemoResult {
    /// A human-readable table.
    pub fn table(&self) -> String {
        let mib = |b: u64| b as f64 / MIB as f64;
        let times = |b: u64| b as f64 / self.bundle_bytes.max(1) as f64;
        let mut out = String::new();
        out.push_str(&format!(
            "bundle {} — {:.1} MiB tree, {:.1} MiB stored; published in {:.2} s\n",
            &self.bundle_id[..16.min(self.bundle_id.len())],
            mib(self.tree_bytes),
            mib(self.bundle_bytes),
            self.publish_s
        ));
        let limit = match (self.strategy, self.stager_upload_mbit) {
            (Strategy::Direct, _) => "no stagers".to_owned(),
            (_, Some(mbit)) => format!("stager upload {mbit} Mbit/s"),
            (_, None) => "stager upload at each site's LAN rate".to_owned(),
        };
        out.push_str(&format!(
            "topology {}, strategy {}: {}; {limit}\n",
            self.topology,
            self.strategy,
            strategy_line(self.strategy)
        ));
        let mut links: Vec<(String, Vec<&str>)> = Vec::new();
        for site in &self.sites {
            let link = format!(
                "{} Mbit/s, {} ms each way",
                site.wan_mbit, site.wan_latency_ms
            );
            match links.iter_mut().find(|(l, _)| *l == link) {
                Some((_, names)) => names.push(&site.name),
                None => links.push((link, vec![&site.name])),
            }
        }
        let links: Vec<String> = links
            .iter()
            .map(|(link, names)| format!("{} {link}", names.join(", ")))
            .collect();
        out.push_str(&format!(
            "WAN (emulated by a relay per site): {}; origin uplink {} Mbit/s\n\n",
            links.join("; "),
            self.origin_uplink_mbit
        ));
        out.push_str(
            "site       WAN MiB  (× bundle)  on the link  stager→edges MiB  (× bundle)  edge→edge MiB  (× bundle)  edges done   done after\n",
        );
        for site in &self.sites {
            out.push_str(&format!(
                "{:<8} {:>9.1}  ({:>6.2}×)  {:>7.1} MiB  {:>16.1}  ({:>6.2}×)  {:>13.1}  ({:>6.2}×)  {:>5}/{:<5} {:>8.2} s\n",
                site.name,
                mib(site.wan_bytes),
                times(site.wan_bytes),
                mib(site.wan_link_bytes),
                mib(site.stager_egress_bytes),
                times(site.stager_egress_bytes),
                mib(site.peer_bytes),
                times(site.peer_bytes),
                site.edges_done,
                site.edges,
                site.done_s
            ));
        }
        let several = self.sites.iter().any(|site| site.stagers.len() > 1);
        if several {
            out.push_str("\nstager                 pulled over the WAN MiB  (× bundle)  from siblings MiB  (× bundle)\n");
            for stager in self.sites.iter().flat_map(|site| &site.stagers) {
                out.push_str(&format!(
                    "{:<22} {:>23.1}  ({:>6.2}×)  {:>17.1}  ({:>6.2}×)\n",
                    stager.name,
                    mib(stager.upstream_bytes),
                    times(stager.upstream_bytes),
                    mib(stager.sibling_bytes),
                    times(stager.sibling_bytes)
                ));
            }
        }
        out.push_str(&format!(
            "\norigin egress {:.1} MiB ({:.2}× bundle); all edges hold the bundle after {:.2} s ({:.1}× the WAN floor of {:.2} s)\n",
            mib(self.origin_egress_bytes),
            times(self.origin_egress_bytes),
            self.all_edges_done_s,
            self.all_edges_done_s / self.wan_floor_s.max(f64::MIN_POSITIVE),
            self.wan_floor_s
        ));
        if let Some(cpu) = &self.cpu {
            out.push_str(&format!(
                "CPU from publish to the last edge: {:.1} s for {:.1} MiB delivered to the edges = {:.1} CPU-s per GiB (origin {:.1}, stagers {:.1}, edge daemons {:.1}, fetch commands {:.1}); the relays and netsim {:.1} s more\n",
                cpu.mesh_s,
                mib(cpu.delivered_bytes),
                cpu.mesh_s_per_gib,
                cpu.origin_s,
                cpu.stagers_s,
                cpu.edge_daemons_s,
                cpu.fetch_commands_s,
                cpu.netsim_s
            ));
        }
        if let Some(swap) = &self.swap {
            out.push_str(&format!(
                "OS swap (origin swap, simulated machines): {}/{} edges run the demo bundle from slot A, rescue OS in slot B, after {:.2} s\n",
                swap.done, swap.edges, swap.seconds
            ));
            for failure in &swap.failures {
                out.push_str(&format!("  {failure}\n"));
            }
        }
        if let Some(enc) = &self.encryption {
            out.push_str(&format!(
                "encrypted bundle: {} planted plaintext markers searched in {:.1} MiB of stager state ({} files), {:.1} MiB of edge stores ({} files) and {:.1} MiB of captured WAN traffic: {}\n",
                enc.markers.len(),
                mib(enc.stager_bytes),
                enc.stager_files,
                mib(enc.edge_store_bytes),
                enc.edge_store_files,
                mib(enc.capture_bytes),
                if enc.found.is_empty() {
                    "none found".to_owned()
                } else {
                    format!("{} FOUND", enc.found.len())
                }
            ));
            for found in &enc.found {
                out.push_str(&format!("  {found}\n"));
            }
            out.push_str(&format!(
                "unpacked with the content key: {}/{} edges hold the published tree byte for byte\n",
                enc.edges_identical, enc.edges
            ));
            for failure in &enc.failures {
                out.push_str(&format!("  {failure}\n"));
            }
        }
        // The emulation's fixed caveats are in the JSON; only what went wrong is printed.
        for note in self.notes.iter().filter(|n| !n.starts_with("emulated:")) {
            out.push_str(&format!("note: {note}\n"));
        }
        out
    }
}

/// Makes the console's admin account with a fresh random password and prints the console's
/// address and how to log in (the password also goes to `console-login.txt`, mode 0600, in
/// the work directory).
async fn show_console(
    mesh: &crate::testbed::Testbed,
    progress: &Progress,
    work: &Path,
) -> Result<()> {
    let Some(console) = mesh.origin.console.clone() else {
        bail!("the origin did not say its console's address");
    };
    let password: String = {
        use rand::Rng;
        const ALPHABET: &[u8] = b"abcdefghijkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789";
        let mut rng = rand::thread_rng();
        (0..20)
            .map(|_| char::from(ALPHABET[rng.gen_range(0..ALPHABET.len())]))
            .collect()
    };
    crate::console::add_account(mesh, DEMO_ADMIN, "admin", &password).await?;
    let login_file = work.join("console-login.txt");
    proto::durable::write_atomic(
        &login_file,
        format!("http://{console}/\nname: {DEMO_ADMIN}\npassword: {password}\n").as_bytes(),
        proto::durable::MODE_PRIVATE,
    )
    .with_context(|| format!("cannot write {}", login_file.display()))?;
    progress.println(format!(
        "console: http://{console}/  (log in as `{DEMO_ADMIN}`, password `{password}`)"
    ));
    Ok(())
}

/// Runs the demo in `work` (an empty directory: [`crate::run::WorkDir`]), showing how it goes
/// on `progress`; stops every process it started before returning, on success, failure or
/// Ctrl-C ([`Interrupted`]).
///
/// With [`DemoConfig::hold`], `on_result` gets the result while every process still runs, and
/// the demo waits for Ctrl-C before stopping them.
pub async fn run(
    config: DemoConfig,
    work: &Path,
    progress: &Progress,
    on_result: impl FnOnce(&DemoResult),
) -> Result<DemoResult> {
    let mut slot = None;
    let result = tokio::select! {
        result = run_in(&config, work, progress, &mut slot) => result,
        _ = tokio::signal::ctrl_c() => Err(Interrupted.into()),
    };
    if let (Ok(result), true) = (&result, config.hold) {
        progress.clear();
        on_result(result);
        eprintln!("holding the mesh up: press Ctrl-C to stop every process");
        let _ = tokio::signal::ctrl_c().await;
    }
    if let Some(emulation) = slot.as_mut() {
        progress.phase("stopping every process");
        emulation.shutdown().await;
    }
    drop(slot);
    result
}

async fn run_in(
    config: &DemoConfig,
    work: &Path,
    progress: &Progress,
    slot: &mut Option<Emulation>,
) -> Result<DemoResult> {
    let topo = &config.topology;
    let strategy = topo.strategy;
    let tree = match &topo.bundle.path {
        Some(path) => path.clone(),
        None => {
            let bytes = topo.bundle_bytes()?;
            progress.phase(format!(
                "generating a {} MiB OS-like tree to publish",
                bytes.div_ceil(MIB)
            ));
            let tree = work.join("tree");
            datagen::generate_tree(&tree, bytes, config.seed)?;
            tree
        }
    };
    let markers = if config.encrypt {
        ensure!(
            topo.bundle.path.is_none(),
            "--encrypt plants plaintext markers in a generated tree; the topology names a tree \
             of its own ({}), which the demo does not change",
            tree.display()
        );
        plaintext::plant_markers(&tree, config.seed)?
    } else {
        Vec::new()
    };
    let capture_dir = if config.encrypt {
        let dir = work.join("captures");
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        Some(dir)
    } else {
        None
    };
    progress.phase(format!(
        "starting the origin, {} WAN relays, {} and {} enrolled edges",
        topo.sites.len(),
        match strategy {
            Strategy::Direct => "no stagers".to_owned(),
            _ => format!("{} stagers", topo.total_stagers()),
        },
        topo.total_edges()
    ));
    let options = EmulateOptions {
        binaries: config.binaries.clone(),
        work_dir: Some(work.to_path_buf()),
        seed: config.seed,
        capture_dir,
        origin_args: vec!["--console".into(), config.console.clone()],
    };
    let emulation = Emulation::start(
        topo,
        strategy,
        &options,
        work,
        config.stager_upload_mbit,
        slot,
    )
    .await?;
    show_console(&emulation.mesh, progress, work).await?;
    if config.encrypt {
        progress.phase("letting the demo's edges read encrypted bundles (class demo)");
        let_edges_read(&emulation.mesh).await?;
    }
    let base = if config.swap {
        // Every edge gets a machine running a small factory OS before the demo starts.
        progress.phase("giving every edge a simulated machine with a factory OS");
        let base = machines::prepare(&mut emulation.mesh, work, config.seed).await?;
        let flags: HashMap<String, Vec<String>> = emulation
            .mesh
            .edges
            .iter()
            .map(|edge| {
                let checks = machines::reach_stager_check(&emulation.mesh, edge);
                (edge.name.clone(), machines::daemon_flags(edge, &checks))
            })
            .collect();
        // The origin asks the daemons to swap, so every edge runs one (peers on only in `mesh`).
        emulation
            .start_edge_daemons(strategy == Strategy::Mesh, |edge| {
                flags.get(&edge.name).cloned().unwrap_or_default()
            })
            .await?;
        Some(base)
    } else {
        if strategy == Strategy::Mesh {
            progress.phase("starting every edge's daemon (peers on)");
            emulation.start_edge_daemons(true, |_| Vec::new()).await?;
        }
        None
    };

    let publish_args: &[&str] = if config.encrypt { &["--encrypt"] } else { &[] };
    let fanout = emulation
        .fan_out_with(&tree, BUNDLE_NAME, publish_args, progress)
        .await?;
    progress.phase("reading the counters");
    if let Some(failed) = fanout.fetches.iter().find(|f| !f.ok) {
        let log = std::fs::read_to_string(&failed.log).unwrap_or_default();
        bail!(
            "{} failed to fetch the bundle (log: {}):\n{}",
            failed.edge.name,
            failed.log.display(),
            log.trim()
        );
    }
    let run = emulation.collect(&fanout.fetches).await?;
    let edges_done: u64 = run.sites.iter().map(|s| u64::from(s.edges_done)).sum();
    let cpu = CpuResult::from_fanout(
        &emulation.mesh,
        &fanout,
        edges_done.saturating_mul(run.bundle_bytes),
    );
    let wan_floor_s = topo
        .sites
        .iter()
        .map(|site| run.bundle_bytes as f64 * 8.0 / (site.wan.mbit * 1e6))
        .fold(0.0, f64::max);
    let mesh = &emulation.mesh;
    let origin_metrics = mesh.origin_metrics().await?;
    let tree_bytes = procs::metric_sum(&origin_metrics, "stagecoach_bundle_raw_bytes", &[]);
    let relays = emulation.site_relay_stats();
    let mut regional_metrics = Vec::new();
    let region_sites: Vec<String> = topo
        .regions
        .iter()
        .map(|region| testbed::region_site(&region.name))
        .collect();
    for stager in mesh
        .stagers
        .iter()
        .filter(|st| region_sites.contains(&st.site))
    {
        regional_metrics.push(procs::scrape(&stager.ready.metrics).await?);
    }
    let mut sites = Vec::new();
    for ((site, result), relay) in topo.sites.iter().zip(&run.sites).zip(&relays) {
        let sent_to_site = |text: &str| {
            procs::metric_sum(
                text,
                "stagecoach_bytes_sent_total",
                &[("peer_site", site.name.as_str())],
            )
        };
        let mut stagers = Vec::new();
        for stager in mesh.stagers.iter().filter(|st| st.site == site.name) {
            let text = procs::scrape(&stager.ready.metrics).await?;
            stagers.push(StagerPulled::from_metrics(&stager.name, &site.name, &text));
        }
        sites.push(SiteResult {
            name: site.name.clone(),
            wan_bytes: sent_to_site(&origin_metrics)
                + regional_metrics
                    .iter()
                    .map(|text| sent_to_site(text))
                    .sum::<u64>(),
            wan_link_bytes: relay.down.forwarded_bytes,
            wan_mbit: site.wan.mbit,
            wan_latency_ms: site.wan.latency_ms,
            lan_bytes: result.lan_bytes,
            stager_egress_bytes: result.stager_egress_bytes,
            peer_bytes: result.peer_bytes,
            edges_done: result.edges_done as usize,
            edges: site.edges as usize,
            done_s: result.edge_done_s.last().copied().unwrap_or(0.0),
            edge_done_s: result.edge_done_s.clone(),
            stagers,
        });
    }
    let all_edges_done_s = run
        .all_edges_done_s
        .unwrap_or_else(|| sites.iter().map(|s| s.done_s).fold(0.0, f64::max));
    let stager_upload_mbit = config
        .stager_upload_mbit
        .or_else(|| {
            let limits: Vec<u64> = topo.sites.iter().map(emulate::lan_limit_mbit).collect();
            limits
                .first()
                .copied()
                .filter(|first| limits.iter().all(|l| l == first))
        })
        .filter(|_| strategy != Strategy::Direct);
    let swap = match base {
        Some(base) => {
            progress.phase("swapping every edge's OS to the demo bundle");
            Some(swap_every_edge(mesh, &fanout.bundle_id, &base.rescue).await?)
        }
        None => None,
    };
    let encryption = if config.encrypt {
        Some(check_encryption(emulation, &tree, &fanout.bundle_id, markers, progress).await?)
    } else {
        None
    };
    Ok(DemoResult {
        topology: topo.name.clone(),
        strategy,
        stager_upload_mbit,
        origin_uplink_mbit: topo.origin_uplink_mbit,
        bundle_id: fanout.bundle_id,
        tree_bytes,
        bundle_bytes: run.bundle_bytes,
        origin_egress_bytes: run.origin_egress_bytes,
        publish_s: fanout.publish_s,
        all_edges_done_s,
        sites,
        notes: run.notes,
        swap,
        wan_floor_s,
        cpu: Some(cpu),
        encryption,
    })
}

/// The class the demo's edges are put in with `--encrypt`, and the policy that lets it read.
const READER_CLASS: &str = "demo";

/// Lets class [`READER_CLASS`] read encrypted bundles and puts every edge in it, as an
/// operator does (`origin policy load`, `origin class set`).
async fn let_edges_read(mesh: &Testbed) -> Result<()> {
    mesh.set_read_classes(&[READER_CLASS]).await?;
    for edge in &mesh.edges {
        mesh.set_class(edge, READER_CLASS).await?;
    }
    Ok(())
}

/// Searches every stager's directory, every edge's store and the captured WAN traffic for
/// `markers`, then stops the edges' daemons and unpacks `bundle` on every edge with
/// `edge-agent fetch --to`, comparing each copy with `tree`.
async fn check_encryption(
    emulation: &mut Emulation,
    tree: &Path,
    bundle: &str,
    markers: Vec<String>,
    progress: &Progress,
) -> Result<EncryptionResult> {
    progress
        .phase("searching stagers, edge stores and captured WAN traffic for the planted plaintext");
    emulation.flush_captures();
    let mesh = &emulation.mesh;
    let stager_dirs: Vec<_> = mesh.stagers.iter().map(|st| st.dir.clone()).collect();
    let edge_stores: Vec<_> = mesh.edges.iter().map(|e| e.dir.join("store")).collect();
    let captures = vec![mesh.work.join("captures")];
    let (stagers, edges, wan, markers) = tokio::task::spawn_blocking(move || -> Result<_> {
        Ok((
            plaintext::search(&stager_dirs, &markers)?,
            plaintext::search(&edge_stores, &markers)?,
            plaintext::search(&captures, &markers)?,
            markers,
        ))
    })
    .await
    .context("the search panicked")??;
    ensure!(
        wan.bytes > 0,
        "the WAN relays captured nothing: there is no traffic to search"
    );
    let found: Vec<String> = [&stagers, &edges, &wan]
        .iter()
        .flat_map(|s| s.found.iter().cloned())
        .collect();

    progress.phase("unpacking the bundle on every edge and comparing it with the published tree");
    let names: Vec<String> = emulation
        .mesh
        .edges
        .iter()
        .map(|e| e.name.clone())
        .collect();
    for name in &names {
        emulation.mesh.stop_edge(name).await?;
    }
    let mesh = &emulation.mesh;
    let mut failures = Vec::new();
    let mut identical = 0;
    for edge in &mesh.edges {
        let out = mesh.work.join("unpacked").join(&edge.name);
        let run = mesh.fetch_to(edge, bundle, &out).await?;
        if !run.ok {
            failures.push(format!(
                "{}: edge-agent fetch --to failed: {}",
                edge.name,
                run.stderr.trim()
            ));
            continue;
        }
        let (source, copy) = (tree.to_path_buf(), out.clone());
        let differences =
            tokio::task::spawn_blocking(move || plaintext::tree_differences(&source, &copy))
                .await
                .context("the comparison panicked")??;
        if differences.is_empty() {
            identical += 1;
        } else {
            failures.push(format!(
                "{}: {} entries differ from the source, first: {}",
                edge.name,
                differences.len(),
                differences[0]
            ));
        }
        // Each copy is as large as the tree; keep only the ones that differ.
        if differences.is_empty() {
            std::fs::remove_dir_all(&out)
                .with_context(|| format!("cannot remove {}", out.display()))?;
        }
    }
    Ok(EncryptionResult {
        markers,
        stager_files: stagers.files,
        stager_bytes: stagers.bytes,
        edge_store_files: edges.files,
        edge_store_bytes: edges.bytes,
        capture_bytes: wan.bytes,
        found,
        edges_identical: identical,
        edges: mesh.edges.len(),
        failures,
    })
}

/// Runs `origin swap` on every edge: the demo bundle to slot A, the rescue OS to slot B.
async fn swap_every_edge(mesh: &Testbed, target: &str, rescue: &str) -> Result<SwapResult> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_builtin_topology_is_two_sites_of_four_edges_and_256_mib() {
        let topo = demo_topology(None, &DemoOverrides::default()).expect("built-in topology");
        assert_eq!(topo.name, "demo");
        assert_eq!(topo.strategy, Strategy::Mesh);
        assert_eq!(topo.bundle.size_bytes, Some(256 * MIB));
        let names: Vec<&str> = topo.sites.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["site-a", "site-b"]);
        assert!(topo.sites.iter().all(|s| s.edges == 4 && s.stagers == 1));
    }

    #[test]
    fn flags_override_the_topology() {
        let overrides = DemoOverrides {
            bundle_mib: Some(16),
            sites: Some(3),
            edges: Some(2),
            strategy: Some(Strategy::Staged),
            stagers_per_site: Some(2),
        };
        let topo = demo_topology(None, &overrides).expect("topology");
        assert_eq!(topo.bundle.size_bytes, Some(16 * MIB));
        assert_eq!(topo.strategy, Strategy::Staged);
        let names: Vec<&str> = topo.sites.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["site-a", "site-b", "site-c"]);
        assert!(topo.sites.iter().all(|s| s.edges == 2 && s.stagers == 2));
        assert_eq!(topo.sites[2].wan, topo.sites[1].wan);

        let one = demo_topology(
            None,
            &DemoOverrides {
                sites: Some(1),
                ..DemoOverrides::default()
            },
        )
        .expect("topology");
        assert_eq!(one.sites.len(), 1);
        assert_eq!(one.sites[0].name, "site-a");
    }

    #[test]
    fn impossible_overrides_are_refused() {
        for overrides in [
            DemoOverrides {
                sites: Some(0),
                ..DemoOverrides::default()
            },
            DemoOverrides {
                edges: Some(0),
                ..DemoOverrides::default()
            },
            DemoOverrides {
                bundle_mib: Some(u64::MAX),
                ..DemoOverrides::default()
            },
            DemoOverrides {
                stagers_per_site: Some(0),
                ..DemoOverrides::default()
            },
            DemoOverrides {
                stagers_per_site: Some(MAX_STAGERS_PER_SITE + 1),
                ..DemoOverrides::default()
            },
            // More edges than one machine runs.
            DemoOverrides {
                edges: Some(1000),
                ..DemoOverrides::default()
            },
        ] {
            assert!(demo_topology(None, &overrides).is_err(), "{overrides:?}");
        }
    }
}
