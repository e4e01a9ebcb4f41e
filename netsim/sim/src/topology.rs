//! Topology files: the fleet that `netsim simulate`, `netsim emulate` and `netsim compare` run.
//!
//! A topology is a TOML file. Every rate is in megabits per second (10^6 bit/s), every latency in
//! milliseconds (one way), every size in binary units (MiB = 2^20 bytes, KiB = 2^10 bytes).
//!
//! ```toml
//! name = "two-sites"             # free text, shown in every result
//! strategy = "mesh"              # direct | staged | mesh (default mesh; the CLI may override)
//!
//! [bundle]
//! size_mib = 64                  # bundle size in MiB (fractions allowed) ...
//! # path = "/some/tree"          # ... or a real tree: simulate uses the sum of its file sizes,
//!                                #     emulate packs it. Relative paths are relative to the file.
//! piece_kib = 512                # simulate's piece size in KiB (emulate uses the real chunking)
//!
//! [origin]
//! uplink_mbit = 1000             # the origin's uplink, shared by every site
//!
//! [lan]
//! node_mbit = 1000               # each node's LAN rate, in each direction (up and down)
//! latency_ms = 0.2               # one-way latency of one LAN hop
//!
//! [mesh]                         # optional
//! peers_per_edge = 16            # peers each edge knows in `mesh` (default 16; all other edges
//!                                # of the site when the site is smaller)
//!
//! [planner]                      # optional overrides of the planner settings simulate gives
//!                                # each node (those of the real binaries; emulate ignores them)
//! max_in_flight_per_source = 4   # requests in flight to one source
//! endgame_max_duplicates = 1     # extra copies of one piece requested in the endgame
//! upstream_fallback_ms = 2000        # how long a piece waits for a peer before an upstream serves it
//!
//! [[sites]]                      # one table per site ...
//! name = "east"                  # unique across the file
//! stagers = 1                    # stagers in the site (default 1, at least 1)
//! edges = 4                      # edges in the site (at least 1)
//! wan = { mbit = 50, latency_ms = 40, jitter_ms = 2, loss = 0.0 }
//! #   mbit: the site's WAN rate, origin → site; latency_ms: one way (RTT is twice that, as in
//! #   netsim's relay); jitter_ms: each datagram's delay is latency ± a uniform draw up to this
//! #   (emulate only: the simulator uses the mean); loss: packet loss probability in [0, 1).
//! #   latency_ms, jitter_ms and loss default to 0.
//! # lan_mbit = 1000              # optional: this site's LAN rate instead of lan.node_mbit
//! # region = "eu"                # optional: the site's stagers pull through the region's
//! #                              # stagers (then the origin, on failover); `wan` is then the
//! #                              # site's link from its region (and from the origin)
//!
//! [[regions]]                    # optional: regional stagers between the origin and sites
//! name = "eu"                    # unique; a site joins it with `region = "eu"`
//! stagers = 1                    # the region's stagers (default 1, at least 1)
//! wan = { mbit = 1000, latency_ms = 20 }  # the link origin → the region's stagers
//!
//! [[site_groups]]                # ... and/or groups of identical sites for big fleets
//! count = 50                     # number of sites in the group (at least 1)
//! name_prefix = "dc"             # sites are named dc-000, dc-001, …
//! stagers = 1
//! edges = 200
//! wan = { mbit = 100, latency_ms = 30 }
//! # lan_mbit = 10000
//! # region = "eu"
//! ```
//!
//! `[[sites]]` come first in the expanded site list, then each group's sites in file order. Unknown
//! keys are errors, so a typo never silently falls back to a default.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Default piece size of the simulator, in KiB.
pub const DEFAULT_PIECE_KIB: u64 = 512;

/// Default number of peers an edge knows in `mesh`.
pub const DEFAULT_PEERS_PER_EDGE: u32 = 16;

/// Most sites one topology may expand to.
pub const MAX_SITES: usize = 100_000;

/// Most nodes (stagers + edges) one topology may hold.
pub const MAX_NODES: u64 = 10_000_000;

/// Bits per megabit.
const BITS_PER_MBIT: f64 = 1e6;

/// How bundles travel from the origin to the edges.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    /// Every edge fetches the whole bundle from the origin across its site's WAN.
    Direct,
    /// The site's stager pulls the bundle across the WAN once; edges fetch only from the stager.
    Staged,
    /// Like `staged`, and edges also fetch pieces from each other inside the site.
    Mesh,
}

impl Strategy {
    /// All strategies, in the order tables list them.
    pub const ALL: [Strategy; 3] = [Strategy::Direct, Strategy::Staged, Strategy::Mesh];

    /// The name used in files and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::Direct => "direct",
            Strategy::Staged => "staged",
            Strategy::Mesh => "mesh",
        }
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Strategy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "direct" => Ok(Strategy::Direct),
            "staged" => Ok(Strategy::Staged),
            "mesh" => Ok(Strategy::Mesh),
            other => Err(format!(
                "unknown strategy {other:?}: expected direct, staged or mesh"
            )),
        }
    }
}

/// What went wrong reading a topology.
#[derive(Debug)]
pub enum TopologyError {
    /// The file could not be read.
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The text is not TOML of the expected shape (a syntax error, an unknown or misspelt key, a
    /// value of the wrong type). The message names the key and the line.
    Parse(String),
    /// A value is out of range. `field` is its path, e.g. `sites[1].wan.loss`.
    Invalid {
        /// Path of the offending key.
        field: String,
        /// What is wrong and what is allowed.
        problem: String,
    },
}

impl fmt::Display for TopologyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TopologyError::Read { path, source } => {
                write!(f, "cannot read topology {}: {source}", path.display())
            }
            TopologyError::Parse(message) => write!(f, "topology is not valid: {message}"),
            TopologyError::Invalid { field, problem } => {
                write!(f, "topology field `{field}` {problem}")
            }
        }
    }
}

impl std::error::Error for TopologyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            TopologyError::Read { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// A validated topology: every default filled in, every group expanded into sites.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Topology {
    /// Free-text name shown in results.
    pub name: String,
    /// The strategy the file asks for (the CLI may run another).
    pub strategy: Strategy,
    /// The bundle that is distributed.
    pub bundle: BundleSpec,
    /// The origin's uplink rate, in Mbit/s.
    pub origin_uplink_mbit: f64,
    /// One-way latency of one LAN hop, in ms.
    pub lan_latency_ms: f64,
    /// Each node's LAN rate where no site overrides it (`lan.node_mbit`; regional stagers'), in
    /// Mbit/s.
    pub lan_node_mbit: f64,
    /// Peers each edge knows in `mesh` (before capping at the site's other edges).
    pub peers_per_edge: u32,
    /// Overrides of the download planner's defaults.
    pub planner: PlannerOverrides,
    /// Regions: regional stagers between the origin and the sites that name them.
    pub regions: Vec<Region>,
    /// Every site, groups expanded.
    pub sites: Vec<Site>,
}

/// A region: stagers that pull each bundle from the origin once and serve it to the stagers
/// of the region's sites.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Region {
    /// Unique name (sites name it in `region`).
    pub name: String,
    /// The region's stagers (at least 1).
    pub stagers: u32,
    /// The link origin → the region's stagers.
    pub wan: WanLink,
}

/// The bundle of a topology.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BundleSpec {
    /// Size in bytes when the file gave `size_mib`.
    pub size_bytes: Option<u64>,
    /// The tree when the file gave `path` (already resolved against the file's directory).
    pub path: Option<PathBuf>,
    /// The simulator's piece size in bytes.
    pub piece_bytes: u64,
}

/// Optional overrides of `proto::planner::PlannerConfig`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlannerOverrides {
    /// Requests in flight to one source.
    pub max_in_flight_per_source: Option<u32>,
    /// Extra copies of one piece requested in the endgame.
    pub endgame_max_duplicates: Option<u32>,
    /// How long a piece waits for a peer before an upstream serves it, in ms.
    #[serde(alias = "seed_fallback_ms")]
    pub upstream_fallback_ms: Option<f64>,
}

/// One site.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Site {
    /// Unique name.
    pub name: String,
    /// Stagers in the site (at least 1).
    pub stagers: u32,
    /// Edges in the site (at least 1).
    pub edges: u32,
    /// The WAN link between the origin and the site.
    pub wan: WanLink,
    /// Each node's LAN rate in this site, in Mbit/s, each direction.
    pub lan_mbit: f64,
    /// The region whose stagers this site's stagers pull through (`None`: the origin).
    pub region: Option<String>,
}

/// A WAN link, origin → site.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WanLink {
    /// Rate in Mbit/s.
    pub mbit: f64,
    /// One-way latency in ms.
    #[serde(default)]
    pub latency_ms: f64,
    /// Each datagram's delay varies by up to this either side, in ms (emulate only).
    #[serde(default)]
    pub jitter_ms: f64,
    /// Packet loss probability in [0, 1).
    #[serde(default)]
    pub loss: f64,
}

impl Topology {
    /// Reads and validates a topology file. A relative `bundle.path` is resolved against the
    /// file's directory.
    pub fn load(path: &Path) -> Result<Topology, TopologyError> {
        let text = std::fs::read_to_string(path).map_err(|source| TopologyError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::parse(&text, Some(base))
    }

    /// Parses and validates topology text. A relative `bundle.path` stays relative to the current
    /// directory.
    pub fn from_toml_str(text: &str) -> Result<Topology, TopologyError> {
        Self::parse(text, None)
    }

    fn parse(text: &str, base: Option<&Path>) -> Result<Topology, TopologyError> {
        let raw: RawTopology =
            toml::from_str(text).map_err(|e| TopologyError::Parse(e.to_string()))?;
        raw.validate(base)
    }

    /// Total edges over all sites.
    pub fn total_edges(&self) -> u64 {
        self.sites.iter().map(|s| u64::from(s.edges)).sum()
    }

    /// The region named `name`.
    pub fn region(&self, name: &str) -> Option<&Region> {
        self.regions.iter().find(|r| r.name == name)
    }

    /// Total stagers over all sites (regional stagers not counted).
    pub fn total_stagers(&self) -> u64 {
        self.sites.iter().map(|s| u64::from(s.stagers)).sum()
    }

    /// The origin's uplink rate in bytes per second.
    pub fn origin_uplink_bytes_per_s(&self) -> f64 {
        mbit_to_bytes_per_s(self.origin_uplink_mbit)
    }

    /// One-way latency of one LAN hop, in seconds.
    pub fn lan_latency_s(&self) -> f64 {
        self.lan_latency_ms / 1000.0
    }

    /// Round trip of a path inside one site (node → node), in seconds.
    pub fn lan_rtt_s(&self) -> f64 {
        2.0 * self.lan_latency_s()
    }

    /// Round trip of the path origin → a node of `site`, in seconds: twice the WAN's and one LAN
    /// hop's one-way latencies.
    pub fn origin_rtt_s(&self, site: &Site) -> f64 {
        2.0 * (site.wan.latency_ms / 1000.0 + self.lan_latency_s())
    }

    /// The bundle's size in bytes: `size_mib`, or the sum of the file sizes under `path`.
    pub fn bundle_bytes(&self) -> anyhow::Result<u64> {
        match (&self.bundle.size_bytes, &self.bundle.path) {
            (Some(bytes), _) => Ok(*bytes),
            (None, Some(path)) => tree_bytes(path),
            (None, None) => anyhow::bail!("topology has neither bundle.size_mib nor bundle.path"),
        }
    }

    /// The line-rate floor in seconds: no strategy can put the bundle on every edge sooner.
    ///
    /// For each site: `bundle_bytes / min(WAN goodput, LAN node rate)` plus one round trip
    /// origin → node ([`Topology::origin_rtt_s`]); every byte an edge holds crossed the site's
    /// WAN and the edge's LAN port, pipelined at best, after at least one request. WAN goodput is
    /// `mbit × (1 − loss)`. For the origin: `copies × bundle_bytes / uplink` plus the smallest
    /// origin round trip, since every copy leaves through the uplink. The floor is the largest
    /// of these.
    ///
    /// Without regions a copy per site is the fewest. With regions, a strategy either sends
    /// through them (one copy per flat site and per region that sites name, and each region's
    /// link carries one copy per site of the region, after the region's round trip from the
    /// origin) or around them (`direct`: one copy per edge); the floor is the smaller of the
    /// two.
    pub fn line_rate_floor_s(&self, bundle_bytes: u64) -> f64 {
        let bytes = bundle_bytes as f64;
        let per_site = self
            .sites
            .iter()
            .map(|site| {
                let rate = site.wan_goodput_bytes_per_s().min(site.lan_bytes_per_s());
                bytes / rate + self.origin_rtt_s(site)
            })
            .fold(0.0, f64::max);
        let min_rtt = self
            .sites
            .iter()
            .map(|site| self.origin_rtt_s(site))
            .fold(f64::INFINITY, f64::min);
        let uplink = self.origin_uplink_bytes_per_s();
        let flat_sites = self.sites.iter().filter(|s| s.region.is_none()).count();
        if flat_sites == self.sites.len() {
            return per_site.max(self.sites.len() as f64 * bytes / uplink + min_rtt);
        }
        let mut copies = flat_sites as f64;
        let mut through_regions = per_site;
        for region in &self.regions {
            let members = self
                .sites
                .iter()
                .filter(|s| s.region.as_deref() == Some(region.name.as_str()))
                .count();
            if members == 0 {
                continue;
            }
            copies += 1.0;
            let goodput = mbit_to_bytes_per_s(region.wan.mbit) * (1.0 - region.wan.loss);
            let region_rtt_s = 2.0 * (region.wan.latency_ms / 1000.0 + self.lan_latency_s());
            through_regions = through_regions.max(members as f64 * bytes / goodput + region_rtt_s);
        }
        through_regions = through_regions.max(copies * bytes / uplink + min_rtt);
        let around_regions = per_site.max(self.total_edges() as f64 * bytes / uplink + min_rtt);
        through_regions.min(around_regions)
    }
}

impl Site {
    /// WAN rate in bytes per second, before loss.
    pub fn wan_bytes_per_s(&self) -> f64 {
        mbit_to_bytes_per_s(self.wan.mbit)
    }

    /// WAN goodput in bytes per second: the rate less the share lost, `rate × (1 − loss)`.
    pub fn wan_goodput_bytes_per_s(&self) -> f64 {
        self.wan_bytes_per_s() * (1.0 - self.wan.loss)
    }

    /// Each node's LAN rate in bytes per second (each direction).
    pub fn lan_bytes_per_s(&self) -> f64 {
        mbit_to_bytes_per_s(self.lan_mbit)
    }

    /// Everything but the name: sites with equal keys behave identically.
    pub(crate) fn shape_key(&self) -> [u64; 8] {
        // FNV-1a of the region's name: sites of different regions never fold together.
        let region = self.region.as_deref().map_or(0, |name| {
            name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
            })
        });
        [
            region,
            u64::from(self.stagers),
            u64::from(self.edges),
            self.wan.mbit.to_bits(),
            self.wan.latency_ms.to_bits(),
            self.wan.jitter_ms.to_bits(),
            self.wan.loss.to_bits(),
            self.lan_mbit.to_bits(),
        ]
    }
}

/// Converts Mbit/s to bytes per second.
pub fn mbit_to_bytes_per_s(mbit: f64) -> f64 {
    mbit * BITS_PER_MBIT / 8.0
}

/// Sum of the sizes of the regular files under `path` (or its size if it is a file).
fn tree_bytes(path: &Path) -> anyhow::Result<u64> {
    use anyhow::Context;
    let meta = std::fs::symlink_metadata(path)
        .with_context(|| format!("cannot read bundle.path {}", path.display()))?;
    if meta.is_file() {
        return Ok(meta.len());
    }
    if !meta.is_dir() {
        return Ok(0);
    }
    let mut total = 0;
    let entries = std::fs::read_dir(path)
        .with_context(|| format!("cannot list bundle.path {}", path.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("cannot list {}", path.display()))?;
        total += tree_bytes(&entry.path())?;
    }
    Ok(total)
}

// ---------------------------------------------------------------------------------------------
// The file as written, before defaults and validation.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTopology {
    name: String,
    #[serde(default = "default_strategy")]
    strategy: Strategy,
    bundle: RawBundle,
    origin: RawOrigin,
    lan: RawLan,
    #[serde(default)]
    mesh: RawMesh,
    #[serde(default)]
    planner: PlannerOverrides,
    #[serde(default)]
    sites: Vec<RawSite>,
    #[serde(default)]
    site_groups: Vec<RawSiteGroup>,
    #[serde(default)]
    regions: Vec<RawRegion>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRegion {
    name: String,
    #[serde(default = "default_stagers")]
    stagers: u32,
    wan: WanLink,
}

fn default_strategy() -> Strategy {
    Strategy::Mesh
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBundle {
    size_mib: Option<f64>,
    path: Option<PathBuf>,
    piece_kib: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOrigin {
    uplink_mbit: f64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLan {
    node_mbit: f64,
    #[serde(default)]
    latency_ms: f64,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMesh {
    peers_per_edge: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSite {
    name: String,
    #[serde(default = "default_stagers")]
    stagers: u32,
    edges: u32,
    wan: WanLink,
    lan_mbit: Option<f64>,
    region: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSiteGroup {
    count: u32,
    name_prefix: String,
    #[serde(default = "default_stagers")]
    stagers: u32,
    edges: u32,
    wan: WanLink,
    lan_mbit: Option<f64>,
    region: Option<String>,
}

fn default_stagers() -> u32 {
    1
}

fn invalid(field: impl Into<String>, problem: impl Into<String>) -> TopologyError {
    TopologyError::Invalid {
        field: field.into(),
        problem: problem.into(),
    }
}

/// A rate or size: finite and greater than zero.
fn positive(field: &str, value: f64) -> Result<f64, TopologyError> {
    if value.is_finite() && value > 0.0 {
        Ok(value)
    } else {
        Err(invalid(
            field,
            format!("must be greater than 0, got {value}"),
        ))
    }
}

/// A latency: finite and not negative.
fn non_negative(field: &str, value: f64) -> Result<f64, TopologyError> {
    if value.is_finite() && value >= 0.0 {
        Ok(value)
    } else {
        Err(invalid(field, format!("must be 0 or more, got {value}")))
    }
}

impl RawTopology {
    fn validate(self, base: Option<&Path>) -> Result<Topology, TopologyError> {
        if self.name.trim().is_empty() {
            return Err(invalid("name", "must not be empty"));
        }
        let bundle = self.bundle.validate(base)?;
        let origin_uplink_mbit = positive("origin.uplink_mbit", self.origin.uplink_mbit)?;
        let node_mbit = positive("lan.node_mbit", self.lan.node_mbit)?;
        let lan_latency_ms = non_negative("lan.latency_ms", self.lan.latency_ms)?;
        let peers_per_edge = self.mesh.peers_per_edge.unwrap_or(DEFAULT_PEERS_PER_EDGE);
        if peers_per_edge == 0 {
            return Err(invalid(
                "mesh.peers_per_edge",
                "must be at least 1 (use strategy \"staged\" for no peers)",
            ));
        }
        validate_planner(&self.planner)?;

        let mut sites = Vec::new();
        for (i, raw) in self.sites.into_iter().enumerate() {
            let field = format!("sites[{i}]");
            sites.push(
                validate_site(
                    &field,
                    raw.name,
                    raw.stagers,
                    raw.edges,
                    raw.wan,
                    raw.lan_mbit,
                    node_mbit,
                )?
                .in_region(raw.region),
            );
        }
        for (g, group) in self.site_groups.into_iter().enumerate() {
            let field = format!("site_groups[{g}]");
            if group.count == 0 {
                return Err(invalid(format!("{field}.count"), "must be at least 1"));
            }
            if group.name_prefix.trim().is_empty() {
                return Err(invalid(format!("{field}.name_prefix"), "must not be empty"));
            }
            if sites.len() + group.count as usize > MAX_SITES {
                return Err(invalid(
                    format!("{field}.count"),
                    format!("makes more than {MAX_SITES} sites"),
                ));
            }
            for i in 0..group.count {
                sites.push(
                    validate_site(
                        &field,
                        format!("{}-{i:03}", group.name_prefix),
                        group.stagers,
                        group.edges,
                        group.wan,
                        group.lan_mbit,
                        node_mbit,
                    )?
                    .in_region(group.region.clone()),
                );
            }
        }
        if sites.is_empty() {
            return Err(invalid(
                "sites",
                "is empty: give at least one [[sites]] or [[site_groups]] table",
            ));
        }
        let mut names = std::collections::HashSet::new();
        for (i, site) in sites.iter().enumerate() {
            if !names.insert(site.name.as_str()) {
                return Err(invalid(
                    format!("sites[{i}].name"),
                    format!("{:?} is used by more than one site", site.name),
                ));
            }
        }
        let regions = validate_regions(self.regions)?;
        for (i, site) in sites.iter().enumerate() {
            if let Some(region) = &site.region {
                if !regions.iter().any(|r| &r.name == region) {
                    let known: Vec<&str> = regions.iter().map(|r| r.name.as_str()).collect();
                    return Err(invalid(
                        format!("sites[{i}].region"),
                        format!(
                            "of site {:?} names no region: {region:?} (regions: {})",
                            site.name,
                            if known.is_empty() {
                                "none".to_owned()
                            } else {
                                known.join(", ")
                            }
                        ),
                    ));
                }
            }
        }
        let nodes: u64 = sites
            .iter()
            .map(|s| u64::from(s.stagers) + u64::from(s.edges))
            .sum();
        if nodes > MAX_NODES {
            return Err(invalid(
                "sites",
                format!("hold {nodes} nodes, more than the limit of {MAX_NODES}"),
            ));
        }
        Ok(Topology {
            name: self.name,
            strategy: self.strategy,
            bundle,
            origin_uplink_mbit,
            lan_latency_ms,
            lan_node_mbit: node_mbit,
            peers_per_edge,
            planner: self.planner,
            regions,
            sites,
        })
    }
}

impl RawBundle {
    fn validate(self, base: Option<&Path>) -> Result<BundleSpec, TopologyError> {
        let piece_kib = self.piece_kib.unwrap_or(DEFAULT_PIECE_KIB);
        if piece_kib == 0 {
            return Err(invalid("bundle.piece_kib", "must be at least 1"));
        }
        let piece_bytes = piece_kib
            .checked_mul(1024)
            .ok_or_else(|| invalid("bundle.piece_kib", "is too large"))?;
        match (self.size_mib, self.path) {
            (Some(_), Some(_)) => Err(invalid(
                "bundle",
                "has both size_mib and path: give exactly one",
            )),
            (None, None) => Err(invalid(
                "bundle",
                "needs size_mib (a synthetic bundle) or path (a real tree)",
            )),
            (Some(mib), None) => {
                let mib = positive("bundle.size_mib", mib)?;
                let bytes = (mib * 1024.0 * 1024.0).round();
                if bytes < 1.0 || bytes > u64::MAX as f64 / 2.0 {
                    return Err(invalid("bundle.size_mib", format!("{mib} is out of range")));
                }
                Ok(BundleSpec {
                    size_bytes: Some(bytes as u64),
                    path: None,
                    piece_bytes,
                })
            }
            (None, Some(path)) => {
                let path = match base {
                    Some(base) if path.is_relative() => base.join(path),
                    _ => path,
                };
                Ok(BundleSpec {
                    size_bytes: None,
                    path: Some(path),
                    piece_bytes,
                })
            }
        }
    }
}

fn validate_planner(planner: &PlannerOverrides) -> Result<(), TopologyError> {
    if planner.max_in_flight_per_source == Some(0) {
        return Err(invalid(
            "planner.max_in_flight_per_source",
            "must be at least 1",
        ));
    }
    if let Some(ms) = planner.upstream_fallback_ms {
        non_negative("planner.upstream_fallback_ms", ms)?;
    }
    Ok(())
}

fn validate_regions(raw: Vec<RawRegion>) -> Result<Vec<Region>, TopologyError> {
    let mut regions: Vec<Region> = Vec::with_capacity(raw.len());
    for (i, region) in raw.into_iter().enumerate() {
        let field = format!("regions[{i}]");
        if region.name.trim().is_empty() {
            return Err(invalid(format!("{field}.name"), "must not be empty"));
        }
        if regions.iter().any(|r| r.name == region.name) {
            return Err(invalid(
                format!("{field}.name"),
                format!("{:?} is used by more than one region", region.name),
            ));
        }
        if region.stagers == 0 {
            return Err(invalid(
                format!("{field}.stagers"),
                format!("of region {:?} must be at least 1", region.name),
            ));
        }
        validate_link(&field, &region.wan)?;
        regions.push(Region {
            name: region.name,
            stagers: region.stagers,
            wan: region.wan,
        });
    }
    Ok(regions)
}

fn validate_link(field: &str, wan: &WanLink) -> Result<(), TopologyError> {
    positive(&format!("{field}.wan.mbit"), wan.mbit)?;
    non_negative(&format!("{field}.wan.latency_ms"), wan.latency_ms)?;
    non_negative(&format!("{field}.wan.jitter_ms"), wan.jitter_ms)?;
    if !(wan.loss.is_finite() && (0.0..1.0).contains(&wan.loss)) {
        return Err(invalid(
            format!("{field}.wan.loss"),
            format!("must be in [0, 1), got {}", wan.loss),
        ));
    }
    Ok(())
}

impl Site {
    fn in_region(mut self, region: Option<String>) -> Self {
        self.region = region;
        self
    }
}

fn validate_site(
    field: &str,
    name: String,
    stagers: u32,
    edges: u32,
    wan: WanLink,
    lan_mbit: Option<f64>,
    default_lan_mbit: f64,
) -> Result<Site, TopologyError> {
    if name.trim().is_empty() {
        return Err(invalid(format!("{field}.name"), "must not be empty"));
    }
    if stagers == 0 {
        return Err(invalid(
            format!("{field}.stagers"),
            format!("of site {name:?} must be at least 1"),
        ));
    }
    if edges == 0 {
        return Err(invalid(
            format!("{field}.edges"),
            format!("of site {name:?} must be at least 1"),
        ));
    }
    validate_link(field, &wan)?;
    let lan_mbit = match lan_mbit {
        Some(mbit) => positive(&format!("{field}.lan_mbit"), mbit)?,
        None => default_lan_mbit,
    };
    Ok(Site {
        name,
        stagers,
        edges,
        wan,
        lan_mbit,
        region: None,
    })
}
