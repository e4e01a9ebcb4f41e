//! A whole mesh of real processes on loopback: one origin, stagers, enrolled edges. Used by the
//! demo and the integration tests.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde::Deserialize;

use crate::procs::{self, Binaries, Fleet};

/// How long one edge fetch may take before it counts as failed.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(600);

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
    /// The web console (origin with `--console` only).
    #[serde(default)]
    pub console: Option<String>,
}

/// One stager of the mesh.
#[derive(Clone, Debug)]
pub struct StagerNode {
    /// Its site.
    pub site: String,
    /// Its process name in the fleet.
    pub name: String,
    /// State directory.
    pub dir: PathBuf,
    /// Addresses (from its ready file).
    pub ready: Ready,
    /// Extra flags it was started with.
    pub extra_args: Vec<String>,
    /// Mesh addresses of the other stagers of its site it was told of (`--sibling`).
    pub siblings: Vec<String>,
    /// Its upstream stagers, in order of preference (`--upstream`); the origin comes after.
    pub upstreams: Vec<String>,
}

/// One enrolled edge.
#[derive(Clone, Debug)]
pub struct EdgeNode {
    /// Its site.
    pub site: String,
    /// Its name, e.g. `edge-site-a-0`.
    pub name: String,
    /// State directory.
    pub dir: PathBuf,
    /// Its daemon's addresses, once started ([`Testbed::start_edge_daemon`]).
    pub daemon: Option<Ready>,
    /// Flags its daemon was started with.
    pub daemon_args: Vec<String>,
}

/// What one edge fetch did.
#[derive(Clone, Debug)]
pub struct EdgeFetch {
    /// The edge.
    pub edge: EdgeNode,
    /// Seconds from the start of the fan-out until it finished.
    pub done_s: f64,
    /// Whether it succeeded.
    pub ok: bool,
    /// Its output (stdout and stderr).
    pub log: PathBuf,
}

/// Panics unless `fetched` holds `edges` fetches that all succeeded, naming the first that did
/// not with its log (for tests).
pub fn assert_all_fetched(fetched: &[EdgeFetch], edges: usize) {
    assert_eq!(fetched.len(), edges, "every edge fetched");
    for f in fetched {
        assert!(
            f.ok,
            "{} did not get the bundle: {}",
            f.edge.name,
            std::fs::read_to_string(&f.log).unwrap_or_default()
        );
    }
}

/// The running mesh. Dropping it stops every process.
pub struct Testbed {
    /// Binaries used.
    pub bins: Binaries,
    /// Work directory.
    pub work: PathBuf,
    /// Daemons.
    pub fleet: Fleet,
    /// The origin's state directory.
    pub origin_dir: PathBuf,
    /// The origin's addresses.
    pub origin: Ready,
    /// Stagers, one or more per site.
    pub stagers: Vec<StagerNode>,
    /// Edges.
    pub edges: Vec<EdgeNode>,
    /// Per site, the address its nodes reach the origin at when it is not the origin's own (a
    /// relay in front of it: [`Testbed::route_site_via`]).
    site_origins: HashMap<String, String>,
    /// Per site, the upstream stagers its stagers added from now on pull through before the
    /// origin ([`Testbed::route_site_upstreams`]).
    site_upstreams: HashMap<String, Vec<String>>,
    /// Arguments every start of the origin gets, restarts included (`--store URL`).
    origin_store_args: Vec<String>,
    /// The etcd cluster the origin keeps its store in, when this testbed started one
    /// ([`ORIGIN_STORE_VAR`]); last, so it stops after the origin.
    etcd: Option<stagecoach_testing::etcd::EtcdCluster>,
}

/// Set to `etcd` to run every testbed's origin on a 3-member etcd cluster the testbed starts
/// (`origin serve --store etcd://...`), so any suite runs against etcd instead of the origin's
/// embedded RocksDB: `STAGECOACH_TEST_ORIGIN_STORE=etcd cargo test ...`.
pub const ORIGIN_STORE_VAR: &str = "STAGECOACH_TEST_ORIGIN_STORE";

fn s(x: impl AsRef<str>) -> String {
    x.as_ref().to_owned()
}

fn p(path: &Path) -> String {
    path.display().to_string()
}

/// Rewrites the origin address an enrolled node's identity (in `identity_dir`) holds.
fn set_identity_origin(identity_dir: &Path, origin_addr: &str) -> Result<()> {
    let path = identity_dir.join(proto::net::identity::MESH_FILE);
    let text = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut mesh: serde_json::Value =
        serde_json::from_slice(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    let slot = mesh
        .get_mut("origin_addr")
        .with_context(|| format!("{} names no origin_addr", path.display()))?;
    *slot = serde_json::Value::String(origin_addr.to_owned());
    let text = serde_json::to_vec_pretty(&mesh)?;
    std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))
}

/// Process name of the origin in the fleet.
pub const ORIGIN_NAME: &str = "origin";

/// How long sibling stagers may take to connect to each other once all are up (they dial every
/// second).
pub const SIBLINGS_TIMEOUT: Duration = Duration::from_secs(30);

/// How often a condition of the mesh (a log line, a file) is checked while waiting for it.
const POLL: Duration = Duration::from_millis(100);

/// Starts `origin serve` for the home `origin_dir` as process `name` of the fleet (its log
/// `logs/NAME.log`), its mesh endpoint on `listen`, and waits until it is ready.
async fn start_origin(
    name: &str,
    bins: &Binaries,
    work: &Path,
    origin_dir: &Path,
    listen: &str,
    fleet: &mut Fleet,
    extra_args: &[String],
) -> Result<Ready> {
    let ready_file = work.join(format!("{name}.ready.json"));
    let _ = std::fs::remove_file(&ready_file);
    let mut args = vec![
        s("serve"),
        s("--dir"),
        p(origin_dir),
        s("--listen"),
        s(listen),
        s("--enroll-listen"),
        s("127.0.0.1:0"),
        s("--metrics-listen"),
        s("127.0.0.1:0"),
        s("--ready-file"),
        p(&ready_file),
    ];
    args.extend(extra_args.iter().cloned());
    // Append, so a restarted origin keeps its earlier log.
    let log = work.join("logs").join(format!("{name}.log"));
    let cmd = procs::command_appending(&bins.path("origin"), &args, &log)?;
    fleet.spawn(name, cmd)?;
    procs::wait_ready(&ready_file, fleet).await
}

/// The site name a regional stager of region `region` is enrolled for: `region-NAME`.
pub fn region_site(region: &str) -> String {
    format!("region-{region}")
}

/// Loopback addresses with ports free right now, one per stager of a group that must know each
/// other's addresses before any of them starts. The kernel hands out each port while its socket
/// is bound, so the ports differ; they are released just before the stagers bind them, a window
/// of milliseconds in which another process would have to pick the same port of thousands.
fn free_loopback_ports(count: usize) -> Result<Vec<String>> {
    let sockets = (0..count)
        .map(|_| std::net::UdpSocket::bind(("127.0.0.1", 0)))
        .collect::<std::io::Result<Vec<_>>>()
        .context("cannot reserve loopback ports for the stagers")?;
    sockets
        .iter()
        .map(|socket| Ok(socket.local_addr()?.to_string()))
        .collect()
}

/// The name of site `index`: `site-a`, `site-b`, ...
pub fn site_name(index: usize) -> String {
    let letter = (b'a' + (index % 26) as u8) as char;
    if index < 26 {
        format!("site-{letter}")
    } else {
        format!("site-{letter}{}", index / 26)
    }
}

impl Testbed {
    /// Starts an origin, one stager per site (with `stager_args` added), and enrolls
    /// `edges_per_site` edges per site.
    pub async fn start(
        bins: Binaries,
        work: &Path,
        sites: usize,
        edges_per_site: usize,
        stager_args: &[String],
    ) -> Result<Testbed> {
        Self::start_with(bins, work, sites, edges_per_site, stager_args, &[]).await
    }

    /// Like [`Testbed::start`], with `origin_args` added to `origin serve`.
    pub async fn start_with(
        bins: Binaries,
        work: &Path,
        sites: usize,
        edges_per_site: usize,
        stager_args: &[String],
        origin_args: &[String],
    ) -> Result<Testbed> {
        Self::start_on_store(
            bins,
            work,
            sites,
            edges_per_site,
            stager_args,
            origin_args,
            None,
        )
        .await
    }

    /// Like [`Testbed::start_with`], the origin keeping its control plane in the store `store`
    /// (`origin serve --store`, e.g. `etcd://A,B,C/PREFIX`) at every start, restarts included;
    /// the origin's embedded RocksDB when `None`.
    pub async fn start_on_store(
        bins: Binaries,
        work: &Path,
        sites: usize,
        edges_per_site: usize,
        stager_args: &[String],
        origin_args: &[String],
        store: Option<&str>,
    ) -> Result<Testbed> {
        let mut etcd = None;
        let mut store = store.map(str::to_owned);
        if store.is_none() {
            match std::env::var(ORIGIN_STORE_VAR).as_deref() {
                Ok("etcd") => {
                    stagecoach_testing::etcd::available()
                        .map_err(|why| anyhow::anyhow!("{ORIGIN_STORE_VAR}=etcd: {why}"))?;
                    let cluster = tokio::task::spawn_blocking(|| {
                        stagecoach_testing::etcd::EtcdCluster::start(3)
                    })
                    .await?
                    .context("cannot start a 3-member etcd cluster for the origin")?;
                    store = Some(cluster.store_url("stagecoach"));
                    etcd = Some(cluster);
                }
                Ok("" | "rocksdb") | Err(_) => {}
                Ok(other) => bail!("{ORIGIN_STORE_VAR}={other}: use etcd or rocksdb"),
            }
        }
        let origin_store_args: Vec<String> =
            store.map(|url| vec![s("--store"), url]).unwrap_or_default();
        let first_args: Vec<String> = origin_store_args
            .iter()
            .chain(origin_args)
            .cloned()
            .collect();
        let logs = work.join("logs");
        std::fs::create_dir_all(&logs)?;
        let origin_bin = bins.path("origin");
        let origin_dir = work.join("origin");
        procs::run_to_end(&origin_bin, &[s("init"), s("--dir"), p(&origin_dir)]).await?;
        let mut fleet = Fleet::default();
        let origin = start_origin(
            ORIGIN_NAME,
            &bins,
            work,
            &origin_dir,
            "127.0.0.1:0",
            &mut fleet,
            &first_args,
        )
        .await?;
        let mut mesh = Testbed {
            bins,
            work: work.to_owned(),
            fleet,
            origin_dir,
            origin,
            stagers: Vec::new(),
            edges: Vec::new(),
            site_origins: HashMap::new(),
            site_upstreams: HashMap::new(),
            origin_store_args,
            etcd,
        };
        for i in 0..sites {
            let site = site_name(i);
            mesh.add_stager(&site, stager_args).await?;
            for e in 0..edges_per_site {
                mesh.add_edge(&site, e).await?;
            }
        }
        Ok(mesh)
    }

    /// Makes the nodes of `site` added from now on reach the origin at `origin_addr` (a relay
    /// in front of the origin, say) instead of the origin's own address: stagers get it as
    /// `--origin`, and each edge's identity names it as the origin's address (edges ask the
    /// origin directly when they have no stager, and as the last resort otherwise).
    pub fn route_site_via(&mut self, site: &str, origin_addr: &str) {
        self.site_origins
            .insert(site.to_owned(), origin_addr.to_owned());
    }

    /// Makes the stagers of `site` added from now on pull from the stagers at `upstreams` (a
    /// region's stagers, or relays in front of them), in this order of preference, before the
    /// origin: each gets `--upstream ADDR` per address. The origin stays their last resort.
    pub fn route_site_upstreams(&mut self, site: &str, upstreams: &[String]) {
        self.site_upstreams
            .insert(site.to_owned(), upstreams.to_vec());
    }

    /// The address the nodes of `site` reach the origin at.
    pub fn origin_addr_for(&self, site: &str) -> &str {
        self.site_origins
            .get(site)
            .map_or(self.origin.mesh.as_str(), String::as_str)
    }

    /// A one-time token from the origin.
    pub async fn token(&self, role: &str, site: &str) -> Result<String> {
        let out = procs::run_to_end(
            &self.bins.path("origin"),
            &[
                s("enroll"),
                s("--dir"),
                p(&self.origin_dir),
                s("--role"),
                s(role),
                s("--site"),
                s(site),
            ],
        )
        .await?;
        out.lines()
            .map(str::trim)
            .find(|l| l.starts_with(proto::net::enroll::TOKEN_PREFIX))
            .map(str::to_owned)
            .context("origin enroll printed no token")
    }

    /// Enrolls the node of `bin` as a `role` of `site`, keeping its state in `dir`.
    async fn enroll(&self, bin: &Path, role: &str, site: &str, dir: &Path) -> Result<()> {
        let token = self.token(role, site).await?;
        procs::run_to_end(bin, &[s("enroll"), token, s("--dir"), p(dir)]).await?;
        Ok(())
    }

    /// Enrolls and starts a stager for `site`.
    pub async fn add_stager(&mut self, site: &str, extra_args: &[String]) -> Result<StagerNode> {
        let index = self.stagers.iter().filter(|st| st.site == site).count();
        let name = format!("stager-{site}-{index}");
        let dir = self.work.join(&name);
        self.enroll(&self.bins.path("stager"), "stager", site, &dir)
            .await?;
        let mut node = self.new_stager_node(site, name, dir, extra_args);
        node.ready = self.start_stager(&node, "127.0.0.1:0").await?;
        self.stagers.push(node.clone());
        Ok(node)
    }

    /// Enrolls and starts `count` stagers for `site` that know each other: each is started
    /// with `--sibling` naming the others (and the site's stagers started before), so each
    /// chunk crosses the WAN to one of them and the others copy it over the LAN. Their mesh
    /// ports are picked before any starts ([`free_loopback_ports`]), so no restart is needed;
    /// a stager tolerates a sibling that is not up yet. With `count` 1 this is
    /// [`Testbed::add_stager`]. A stager killed and restarted ([`Testbed::restart_stager`])
    /// keeps its address and its siblings.
    pub async fn add_stagers(
        &mut self,
        site: &str,
        count: usize,
        extra_args: &[String],
    ) -> Result<Vec<StagerNode>> {
        if count <= 1 {
            let mut added = Vec::new();
            for _ in 0..count {
                added.push(self.add_stager(site, extra_args).await?);
            }
            return Ok(added);
        }
        let first = self.stagers.iter().filter(|st| st.site == site).count();
        let mut nodes = Vec::with_capacity(count);
        for index in first..first + count {
            let name = format!("stager-{site}-{index}");
            let dir = self.work.join(&name);
            self.enroll(&self.bins.path("stager"), "stager", site, &dir)
                .await?;
            nodes.push(self.new_stager_node(site, name, dir, extra_args));
        }
        let earlier = self.stager_addrs(site);
        let listen = free_loopback_ports(count)?;
        for (i, node) in nodes.iter_mut().enumerate() {
            node.siblings = earlier
                .iter()
                .chain(
                    listen
                        .iter()
                        .enumerate()
                        .filter(|(j, _)| *j != i)
                        .map(|(_, a)| a),
                )
                .cloned()
                .collect();
        }
        for (node, listen) in nodes.iter_mut().zip(&listen) {
            node.ready = self.start_stager(node, listen).await?;
            self.stagers.push(node.clone());
        }
        // Until a stager reached its siblings it owns every chunk itself; a bundle published
        // then would cross the WAN to several of them. In a real site they run long before.
        self.wait_siblings_connected(&nodes, SIBLINGS_TIMEOUT)
            .await?;
        Ok(nodes)
    }

    /// Waits until each of `nodes` logged that it connected to every one of its siblings (in
    /// its current run: its log is appended across restarts).
    pub async fn wait_siblings_connected(
        &mut self,
        nodes: &[StagerNode],
        timeout: Duration,
    ) -> Result<()> {
        let logs = self.work.join("logs");
        let fleet = &mut self.fleet;
        stagecoach_testing::wait_for_async(timeout, POLL, async || {
            let all = nodes.iter().all(|node| {
                let whole = std::fs::read_to_string(logs.join(format!("{}.log", node.name)))
                    .unwrap_or_default();
                let log = whole
                    .rfind("stager serving")
                    .map_or(whole.as_str(), |at| &whole[at..]);
                node.siblings.iter().all(|addr| {
                    let marker = format!("sibling={addr} ");
                    log.lines()
                        .any(|l| l.contains("sibling stager connected") && l.contains(&marker))
                })
            });
            if all {
                return Ok(Some(()));
            }
            fleet.check_alive().map(|()| None)
        })
        .await
        .context("the stagers of a site did not all reach their siblings")
    }

    /// Enrolls and starts `count` regional stagers of `region`: stagers of the site
    /// [`region_site`] (`region-NAME`), with no edges, siblings of each other. Sites pull
    /// through them when their stagers name them with `--upstream`
    /// ([`Testbed::route_site_upstreams`]); they reach the origin at
    /// [`Testbed::origin_addr_for`] of their site (a relay shaped as the region's link, say).
    pub async fn add_regional_stagers(
        &mut self,
        region: &str,
        count: usize,
        extra_args: &[String],
    ) -> Result<Vec<StagerNode>> {
        self.add_stagers(&region_site(region), count, extra_args)
            .await
    }

    /// A stager of `site` not started yet, with the site's upstreams.
    fn new_stager_node(
        &self,
        site: &str,
        name: String,
        dir: PathBuf,
        extra_args: &[String],
    ) -> StagerNode {
        StagerNode {
            site: site.to_owned(),
            name,
            dir,
            ready: Ready {
                mesh: String::new(),
                enroll: None,
                metrics: String::new(),
                console: None,
            },
            extra_args: extra_args.to_vec(),
            siblings: Vec::new(),
            upstreams: self.site_upstreams.get(site).cloned().unwrap_or_default(),
        }
    }

    /// What `stager status --dir DIR` prints for stager `name`: the upstream in use, its
    /// failovers with their reasons, bytes pulled per upstream and served to siblings.
    pub async fn stager_status(&self, name: &str) -> Result<procs::CliRun> {
        let node = self
            .stagers
            .iter()
            .find(|st| st.name == name)
            .context("no such stager")?;
        procs::run_cli(
            &self.bins.path("stager"),
            &[s("status"), s("--dir"), p(&node.dir)],
        )
        .await
    }

    async fn start_stager(&mut self, node: &StagerNode, listen: &str) -> Result<Ready> {
        let ready_file = self.work.join(format!("{}.ready.json", node.name));
        let _ = std::fs::remove_file(&ready_file);
        let mut args = vec![
            s("serve"),
            s("--dir"),
            p(&node.dir),
            s("--site"),
            node.site.clone(),
            s("--origin"),
            self.origin_addr_for(&node.site).to_owned(),
            s("--listen"),
            s(listen),
            s("--metrics-listen"),
            s("127.0.0.1:0"),
            s("--ready-file"),
            p(&ready_file),
        ];
        for addr in &node.upstreams {
            args.extend([s("--upstream"), addr.clone()]);
        }
        for addr in &node.siblings {
            args.extend([s("--sibling"), addr.clone()]);
        }
        args.extend(node.extra_args.iter().cloned());
        let log = self.work.join("logs").join(format!("{}.log", node.name));
        // Append, so a restarted stager keeps its earlier log.
        let cmd = procs::command_appending(&self.bins.path("stager"), &args, &log)?;
        self.fleet.spawn(&node.name, cmd)?;
        procs::wait_ready(&ready_file, &mut self.fleet).await
    }

    /// The etcd cluster holding the origin's store, when this testbed started one
    /// ([`ORIGIN_STORE_VAR`]).
    pub fn etcd(&mut self) -> Option<&mut stagecoach_testing::etcd::EtcdCluster> {
        self.etcd.as_mut()
    }

    /// Kills the origin with SIGKILL.
    pub async fn kill_origin(&mut self) -> Result<()> {
        self.fleet.kill(ORIGIN_NAME).await
    }

    /// Stops the origin as an operator would (SIGTERM): it closes its connections, so the
    /// stagers and daemons reconnect as soon as it is back instead of after their idle timeout.
    pub async fn stop_origin(&mut self) -> Result<()> {
        self.fleet.stop(ORIGIN_NAME).await
    }

    /// Restarts the origin on the same mesh address (after [`Testbed::kill_origin`] or
    /// [`Testbed::stop_origin`]); its
    /// enrollment and metrics endpoints get new ports.
    pub async fn restart_origin(&mut self) -> Result<()> {
        self.restart_origin_with(&[]).await
    }

    /// Like [`Testbed::restart_origin`], with `extra_args` added to `origin serve` (after the
    /// store's, which every start gets).
    pub async fn restart_origin_with(&mut self, extra_args: &[String]) -> Result<()> {
        let listen = self.origin.mesh.clone();
        let args: Vec<String> = self
            .origin_store_args
            .iter()
            .chain(extra_args)
            .cloned()
            .collect();
        self.origin = start_origin(
            ORIGIN_NAME,
            &self.bins,
            &self.work,
            &self.origin_dir,
            &listen,
            &mut self.fleet,
            &args,
        )
        .await?;
        Ok(())
    }

    /// Sets up another origin of this mesh, `name`, as an operator would: `origin keys
    /// export` from the first, `origin init --join` into `work/NAME`, and `origin serve` on the
    /// same store (the testbed's origin must keep its store in etcd). Returns its home; the
    /// `origin` command line reaches it with `--dir` that home, and the fleet knows it as
    /// `name` (kill it with `fleet.kill(name)`).
    pub async fn join_origin(&mut self, name: &str) -> Result<(PathBuf, Ready)> {
        ensure!(
            self.origin_store_args
                .iter()
                .any(|a| a.starts_with("etcd://")),
            "a second origin needs the first one's store in etcd"
        );
        let sealed = self.work.join(format!("{name}.keys"));
        let passphrase = self.work.join(format!("{name}.passphrase"));
        std::fs::write(&passphrase, "a passphrase for the tests\n")?;
        let origin_bin = self.bins.path("origin");
        procs::run_to_end(
            &origin_bin,
            &[
                s("keys"),
                s("export"),
                s("--dir"),
                p(&self.origin_dir),
                s("--to"),
                p(&sealed),
                s("--passphrase-file"),
                p(&passphrase),
            ],
        )
        .await?;
        let dir = self.work.join(name);
        procs::run_to_end(
            &origin_bin,
            &[
                s("init"),
                s("--dir"),
                p(&dir),
                s("--join"),
                p(&sealed),
                s("--passphrase-file"),
                p(&passphrase),
            ],
        )
        .await?;
        let ready = start_origin(
            name,
            &self.bins,
            &self.work,
            &dir,
            "127.0.0.1:0",
            &mut self.fleet,
            &self.origin_store_args,
        )
        .await?;
        Ok((dir, ready))
    }

    /// A client of this mesh with a certificate of its own, a `role` (`edge`, `stager`) of
    /// `site`, enrolled with a token from the origin and kept in `work/clients/NAME`: what a
    /// test uses to ask a node something as that role.
    pub async fn enroll_client(&self, role: &str, site: &str, name: &str) -> Result<TestbedClient> {
        let token = self.token(role, site).await?;
        let token = proto::net::EnrollToken::parse(&token).context("the origin's token")?;
        let dir = self.work.join("clients").join(name);
        let identity = proto::net::enroll(&token, &dir)
            .await
            .with_context(|| format!("cannot enroll {name} as a {role} of {site}"))?;
        TestbedClient::new(identity)
    }

    /// A client holding the origin's own certificate (what `origin swap` uses).
    pub fn origin_client(&self) -> Result<TestbedClient> {
        let dir = self.origin_dir.join("identity");
        let identity = proto::net::NodeIdentity::load(&dir)
            .with_context(|| format!("cannot load the origin's identity from {}", dir.display()))?;
        TestbedClient::new(identity)
    }

    /// A client holding edge `name`'s own certificate: what a test uses to ask the origin
    /// what that node may ask (its keep-set, say).
    pub fn edge_client(&self, name: &str) -> Result<TestbedClient> {
        let edge = self
            .edges
            .iter()
            .find(|e| e.name == name)
            .context("no such edge")?;
        let dir = edge.dir.join("identity");
        let identity = proto::net::NodeIdentity::load(&dir)
            .with_context(|| format!("cannot load {name}'s identity from {}", dir.display()))?;
        TestbedClient::new(identity)
    }

    /// Kills stager `name` with SIGKILL.
    pub async fn kill_stager(&mut self, name: &str) -> Result<()> {
        self.fleet.kill(name).await
    }

    /// Restarts stager `name` on the same mesh address (after [`Testbed::kill_stager`]).
    pub async fn restart_stager(&mut self, name: &str) -> Result<()> {
        let index = self
            .stagers
            .iter()
            .position(|st| st.name == name)
            .context("no such stager")?;
        let node = self.stagers[index].clone();
        let ready = self.start_stager(&node, &node.ready.mesh.clone()).await?;
        self.stagers[index].ready = ready;
        Ok(())
    }

    /// Enrolls edge number `index` of `site`.
    pub async fn add_edge(&mut self, site: &str, index: usize) -> Result<EdgeNode> {
        let name = format!("edge-{site}-{index}");
        let dir = self.work.join(&name);
        self.enroll(&self.bins.path("edge-agent"), "edge", site, &dir)
            .await?;
        if let Some(origin_addr) = self.site_origins.get(site) {
            set_identity_origin(&dir.join("identity"), origin_addr)?;
        }
        let edge = EdgeNode {
            site: site.to_owned(),
            name,
            dir,
            daemon: None,
            daemon_args: Vec::new(),
        };
        self.edges.push(edge.clone());
        Ok(edge)
    }

    /// Starts the daemon (`edge-agent serve`) of every edge, with `--peers on|off` and
    /// `extra_args`; `edge-agent fetch` then goes through the daemon.
    pub async fn start_edge_daemons(&mut self, peers: bool, extra_args: &[String]) -> Result<()> {
        self.start_edge_daemons_with(peers, extra_args, |_| Vec::new())
            .await
    }

    /// Like [`Testbed::start_edge_daemons`], with flags of each edge's own after `extra_args`
    /// (`per_edge` gets the edge: its machine root, say).
    pub async fn start_edge_daemons_with(
        &mut self,
        peers: bool,
        extra_args: &[String],
        per_edge: impl Fn(&EdgeNode) -> Vec<String>,
    ) -> Result<()> {
        for index in 0..self.edges.len() {
            let mut args = vec![s("--peers"), s(if peers { "on" } else { "off" })];
            args.extend(extra_args.iter().cloned());
            args.extend(per_edge(&self.edges[index]));
            self.edges[index].daemon_args = args;
            let edge = self.edges[index].clone();
            let ready = self.start_edge_daemon(&edge, "127.0.0.1:0").await?;
            self.edges[index].daemon = Some(ready);
        }
        Ok(())
    }

    async fn start_edge_daemon(&mut self, edge: &EdgeNode, listen: &str) -> Result<Ready> {
        let ready_file = self.work.join(format!("{}.ready.json", edge.name));
        let _ = std::fs::remove_file(&ready_file);
        let mut args = vec![
            s("serve"),
            s("--dir"),
            p(&edge.dir),
            s("--listen"),
            s(listen),
            s("--metrics-listen"),
            s("127.0.0.1:0"),
            s("--p2p-listen"),
            s("/ip4/127.0.0.1/tcp/0"),
            s("--ready-file"),
            p(&ready_file),
        ];
        for addr in self.stager_addrs(&edge.site) {
            args.push(s("--stager"));
            args.push(addr);
        }
        args.extend(edge.daemon_args.iter().cloned());
        let log = self.work.join("logs").join(format!("{}.log", edge.name));
        let cmd = procs::command_appending(&self.bins.path("edge-agent"), &args, &log)?;
        self.fleet.spawn(&edge.name, cmd)?;
        procs::wait_ready(&ready_file, &mut self.fleet).await
    }

    /// Stops edge `name`'s daemon as an operator would (SIGTERM, then SIGKILL after a grace
    /// period); its store stays for `edge-agent fetch`.
    pub async fn stop_edge(&mut self, name: &str) -> Result<()> {
        self.fleet.stop(name).await?;
        if let Some(edge) = self.edges.iter_mut().find(|e| e.name == name) {
            edge.daemon = None;
        }
        Ok(())
    }

    /// Kills edge `name`'s daemon with SIGKILL.
    pub async fn kill_edge(&mut self, name: &str) -> Result<()> {
        self.fleet.kill(name).await
    }

    /// Restarts edge `name`'s daemon on the same address (after [`Testbed::kill_edge`]).
    pub async fn restart_edge(&mut self, name: &str) -> Result<()> {
        let index = self
            .edges
            .iter()
            .position(|e| e.name == name)
            .context("no such edge")?;
        let edge = self.edges[index].clone();
        let listen = edge
            .daemon
            .as_ref()
            .map(|d| d.mesh.clone())
            .context("the edge has no daemon to restart")?;
        let ready = self.start_edge_daemon(&edge, &listen).await?;
        self.edges[index].daemon = Some(ready);
        Ok(())
    }

    /// Prometheus text of edge `name`'s daemon.
    pub async fn edge_metrics(&self, name: &str) -> Result<String> {
        let edge = self
            .edges
            .iter()
            .find(|e| e.name == name)
            .context("no such edge")?;
        let daemon = edge.daemon.as_ref().context("the edge has no daemon")?;
        procs::scrape(&daemon.metrics).await
    }

    /// Bytes the edges of `site` sent to peers, split into (same site, other sites).
    pub async fn peer_bytes(&self, site: &str) -> Result<(u64, u64)> {
        let (mut same, mut other) = (0, 0);
        for edge in self.edges.iter().filter(|e| e.site == site) {
            let Some(daemon) = &edge.daemon else { continue };
            let text = procs::scrape(&daemon.metrics).await?;
            for line in text.lines() {
                if !line.starts_with("stagecoach_bytes_sent_total{")
                    || !line.contains("peer_role=\"edge\"")
                {
                    continue;
                }
                let value: u64 = line
                    .rsplit(' ')
                    .next()
                    .and_then(|v| v.parse::<f64>().ok())
                    .map(|v| v as u64)
                    .unwrap_or(0);
                if line.contains(&format!("peer_site=\"{site}\"")) {
                    same += value;
                } else {
                    other += value;
                }
            }
        }
        Ok((same, other))
    }

    /// Publishes `tree` as `name@version`; returns the bundle id.
    pub async fn publish(&self, tree: &Path, name: &str, version: &str) -> Result<String> {
        self.publish_as(tree, name, version, "os-image").await
    }

    /// Publishes `tree` as `name@version` of `kind` (`os-image`, `base-os`, `package`, ...);
    /// returns the bundle id.
    pub async fn publish_as(
        &self,
        tree: &Path,
        name: &str,
        version: &str,
        kind: &str,
    ) -> Result<String> {
        self.publish_with(tree, name, version, kind, &[]).await
    }

    /// Like [`Testbed::publish_as`], with more flags for `origin publish` (`--encrypt`, say).
    pub async fn publish_with(
        &self,
        tree: &Path,
        name: &str,
        version: &str,
        kind: &str,
        extra_args: &[&str],
    ) -> Result<String> {
        let mut args = vec![
            s("publish"),
            p(tree),
            s("--dir"),
            p(&self.origin_dir),
            s("--name"),
            s(name),
            s("--version"),
            s(version),
            s("--kind"),
            s(kind),
            s("--no-progress"),
        ];
        args.extend(extra_args.iter().copied().map(s));
        let out = procs::run_to_end(&self.bins.path("origin"), &args).await?;
        out.lines()
            .find_map(|l| l.strip_prefix("bundle "))
            .and_then(|rest| rest.split_whitespace().next())
            .map(str::to_owned)
            .context("origin publish did not print the bundle id")
    }

    /// The mesh addresses of the stagers of `site`.
    pub fn stager_addrs(&self, site: &str) -> Vec<String> {
        self.stagers
            .iter()
            .filter(|st| st.site == site)
            .map(|st| st.ready.mesh.clone())
            .collect()
    }

    /// Starts `edge-agent fetch` for `bundle` on each of `edges` at once and waits for all.
    pub async fn fetch_all(&self, edges: &[EdgeNode], bundle: &str) -> Result<Vec<EdgeFetch>> {
        self.fetch_all_with(edges, bundle, |_| {}).await
    }

    /// Like [`Testbed::fetch_all`], calling `on_done` with each fetch as it ends (in the order
    /// they end).
    pub async fn fetch_all_with(
        &self,
        edges: &[EdgeNode],
        bundle: &str,
        mut on_done: impl FnMut(&EdgeFetch),
    ) -> Result<Vec<EdgeFetch>> {
        let mut fetches = self.start_fetches(edges, bundle)?;
        let mut results = Vec::new();
        while let Some(fetch) = fetches.next().await? {
            on_done(&fetch);
            results.push(fetch);
        }
        Ok(results)
    }

    /// Starts `edge-agent fetch` for `bundle` on each of `edges` at once and returns without
    /// waiting: the fetches run while the caller changes the mesh (kills a stager, say), and
    /// [`Fetches::next`] / [`Fetches::wait`] collect them.
    pub fn start_fetches(&self, edges: &[EdgeNode], bundle: &str) -> Result<Fetches> {
        let start = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for edge in edges {
            let args = self.fetch_args(edge, bundle, &[]);
            let log = self
                .work
                .join("logs")
                .join(format!("{}.fetch.log", edge.name));
            let mut cmd = procs::command(&self.bins.path("edge-agent"), &args, &log)?;
            let edge = edge.clone();
            tasks.spawn(async move {
                let status = tokio::time::timeout(FETCH_TIMEOUT, cmd.status()).await;
                let ok = matches!(status, Ok(Ok(st)) if st.success());
                EdgeFetch {
                    edge,
                    done_s: start.elapsed().as_secs_f64(),
                    ok,
                    log,
                }
            });
        }
        Ok(Fetches { tasks })
    }

    /// Bytes the edges' daemons received so far, from every source (stagers, the origin,
    /// peers): the edges' progress. Edges without a daemon count nothing.
    pub async fn edge_received_bytes(&self) -> Result<u64> {
        let mut total = 0;
        for edge in &self.edges {
            let Some(daemon) = &edge.daemon else { continue };
            let text = procs::scrape(&daemon.metrics).await?;
            total += procs::metric_sum(&text, "stagecoach_bytes_received_total", &[]);
        }
        Ok(total)
    }

    /// Runs `edge-agent fetch BUNDLE --to OUT` on `edge` (its daemon, if any, stopped): fetches
    /// what its store lacks from its site's stagers, then unpacks into `out`.
    pub async fn fetch_to(
        &self,
        edge: &EdgeNode,
        bundle: &str,
        out: &Path,
    ) -> Result<procs::CliRun> {
        let args = self.fetch_args(edge, bundle, &[s("--to"), p(out)]);
        procs::run_cli(&self.bins.path("edge-agent"), &args).await
    }

    /// `edge-agent fetch BUNDLE --dir DIR --no-progress EXTRA --stager ...` for `edge`.
    fn fetch_args(&self, edge: &EdgeNode, bundle: &str, extra: &[String]) -> Vec<String> {
        let mut args = vec![
            s("fetch"),
            s(bundle),
            s("--dir"),
            p(&edge.dir),
            s("--no-progress"),
        ];
        args.extend(extra.iter().cloned());
        for addr in self.stager_addrs(&edge.site) {
            args.push(s("--stager"));
            args.push(addr);
        }
        args
    }

    /// Runs the `origin` command line against this mesh's origin: `origin ARGS --dir ORIGIN_DIR`.
    pub async fn origin_cli(&self, args: &[&str]) -> Result<procs::CliRun> {
        procs::run_cli(&self.bins.path("origin"), &self.origin_args(args)).await
    }

    /// `args` and then `--dir ORIGIN_DIR`.
    fn origin_args(&self, args: &[&str]) -> Vec<String> {
        let mut all: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        all.push("--dir".into());
        all.push(self.origin_dir.display().to_string());
        all
    }

    /// Like [`Testbed::origin_cli`], with `input` on its standard input (`origin admin add
    /// --password-stdin`).
    pub async fn origin_cli_input(&self, args: &[&str], input: &[u8]) -> Result<procs::CliRun> {
        procs::run_cli_input(&self.bins.path("origin"), &self.origin_args(args), input).await
    }

    /// Like [`Testbed::origin_cli`], failing with its output unless the command succeeds;
    /// returns its stdout.
    pub async fn origin_ok(&self, args: &[&str]) -> Result<String> {
        let run = self.origin_cli(args).await?;
        ensure!(
            run.ok,
            "origin {} failed:\n{}{}",
            args.join(" "),
            run.stdout,
            run.stderr
        );
        Ok(run.stdout)
    }

    /// Like [`Testbed::origin_ok`] for a command run with `--json`: its output, parsed.
    pub async fn origin_json(&self, args: &[&str]) -> Result<serde_json::Value> {
        let out = self.origin_ok(args).await?;
        serde_json::from_str(out.trim())
            .with_context(|| format!("origin {}: not JSON:\n{out}", args.join(" ")))
    }

    /// Like [`Testbed::origin_ok`], for the origin whose home is `dir` (one
    /// [`Testbed::join_origin`] set up).
    pub async fn origin_ok_at(&self, dir: &Path, args: &[&str]) -> Result<String> {
        let mut all: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        all.push("--dir".into());
        all.push(dir.display().to_string());
        let run = procs::run_cli(&self.bins.path("origin"), &all).await?;
        ensure!(
            run.ok,
            "origin {} at {} failed:\n{}{}",
            args.join(" "),
            dir.display(),
            run.stdout,
            run.stderr
        );
        Ok(run.stdout)
    }

    /// Like [`Testbed::origin_json`], for the origin whose home is `dir`.
    pub async fn origin_json_at(&self, dir: &Path, args: &[&str]) -> Result<serde_json::Value> {
        let out = self.origin_ok_at(dir, args).await?;
        serde_json::from_str(out.trim())
            .with_context(|| format!("origin {}: not JSON:\n{out}", args.join(" ")))
    }

    /// Loads a policy whose `[encryption] read_classes` are `classes` (`origin policy load`):
    /// edges of those classes receive the content keys.
    pub async fn set_read_classes(&self, classes: &[&str]) -> Result<()> {
        let policy = self.work.join("encryption-policy.toml");
        let list: Vec<String> = classes.iter().map(|c| format!("{c:?}")).collect();
        std::fs::write(
            &policy,
            format!("[encryption]\nread_classes = [{}]\n", list.join(", ")),
        )
        .with_context(|| format!("cannot write {}", policy.display()))?;
        self.origin_ok(&["policy", "load", &policy.display().to_string()])
            .await
            .map(drop)
    }

    /// Puts `edge` in `class` (`origin class set`).
    pub async fn set_class(&self, edge: &EdgeNode, class: &str) -> Result<()> {
        let identity = proto::net::NodeIdentity::load(&edge.dir.join("identity"))
            .with_context(|| format!("cannot read the identity of {}", edge.name))?;
        let id = identity.node_id().to_string();
        self.origin_ok(&["class", "set", &id, class])
            .await
            .map(drop)
    }

    /// Prometheus text of the origin.
    pub async fn origin_metrics(&self) -> Result<String> {
        procs::scrape(&self.origin.metrics).await
    }

    /// Prometheus text of stager `name`.
    pub async fn stager_metrics(&self, name: &str) -> Result<String> {
        let node = self
            .stagers
            .iter()
            .find(|st| st.name == name)
            .context("no such stager")?;
        procs::scrape(&node.ready.metrics).await
    }

    /// Bytes the stagers of `site` received from the origin.
    pub async fn wan_bytes(&self, site: &str) -> Result<u64> {
        self.site_stager_sum(site, "stagecoach_bytes_received_total", "origin")
            .await
    }

    /// Bytes the stagers of `site` sent to edges.
    pub async fn lan_bytes(&self, site: &str) -> Result<u64> {
        self.site_stager_sum(site, "stagecoach_bytes_sent_total", "edge")
            .await
    }

    /// Bytes the stagers of `site` sent to its edges (the same as [`Testbed::lan_bytes`], which
    /// counts only the stagers; with peers, edges serve each other too: [`Testbed::peer_bytes`]).
    pub async fn stager_egress_bytes(&self, site: &str) -> Result<u64> {
        self.lan_bytes(site).await
    }

    async fn site_stager_sum(&self, site: &str, metric: &str, peer_role: &str) -> Result<u64> {
        let mut total = 0;
        for st in self.stagers.iter().filter(|st| st.site == site) {
            let text = procs::scrape(&st.ready.metrics).await?;
            total += procs::metric_sum(&text, metric, &[("peer_role", peer_role)]);
        }
        Ok(total)
    }

    /// Waits until every stager of `site` holds every bundle announced to it (its preheat
    /// finished).
    pub async fn wait_preheated(&mut self, site: &str, timeout: Duration) -> Result<()> {
        let logs = self.work.join("logs");
        let names: Vec<String> = self
            .stagers
            .iter()
            .filter(|st| st.site == site)
            .map(|st| st.name.clone())
            .collect();
        let fleet = &mut self.fleet;
        stagecoach_testing::wait_for_async(timeout, POLL, async || {
            let all = names.iter().all(|name| {
                let whole =
                    std::fs::read_to_string(logs.join(format!("{name}.log"))).unwrap_or_default();
                // Only the current run of the stager counts (its log is appended across restarts).
                let log = whole
                    .rfind("stager serving")
                    .map_or(whole.as_str(), |at| &whole[at..]);
                // By bundle: a stager that resubscribes (after a failover, say) hears an
                // unfinished announcement again.
                let ids = |marker: &str| {
                    log.lines()
                        .filter(|line| line.contains(marker))
                        .filter_map(|line| line.split("bundle=").nth(1)?.split(' ').next())
                        .collect::<std::collections::HashSet<_>>()
                };
                let held = ids("bundle held by the site");
                let announced = ids(" announced ");
                !held.is_empty() && announced.is_subset(&held)
            });
            if all {
                return Ok(Some(()));
            }
            fleet.check_alive().map(|()| None)
        })
        .await
        .with_context(|| format!("stagers of {site} did not finish preheating"))
    }

    /// Stops every process.
    pub async fn shutdown(&mut self) {
        self.fleet.shutdown().await;
    }
}

/// Edge fetches running ([`Testbed::start_fetches`]). Dropping it kills the fetch commands
/// still running.
pub struct Fetches {
    tasks: tokio::task::JoinSet<EdgeFetch>,
}

impl Fetches {
    /// The next fetch to end, `None` once every one has.
    pub async fn next(&mut self) -> Result<Option<EdgeFetch>> {
        match self.tasks.join_next().await {
            Some(done) => Ok(Some(done.context("fetch task panicked")?)),
            None => Ok(None),
        }
    }

    /// Waits for every fetch, in the order they end.
    pub async fn wait(mut self) -> Result<Vec<EdgeFetch>> {
        let mut results = Vec::new();
        while let Some(fetch) = self.next().await? {
            results.push(fetch);
        }
        Ok(results)
    }
}

/// A mesh client with a certificate of its own ([`Testbed::enroll_client`],
/// [`Testbed::origin_client`]).
pub struct TestbedClient {
    /// Its identity (role and site in the certificate).
    pub identity: proto::net::NodeIdentity,
    /// Its client endpoint.
    pub endpoint: quinn::Endpoint,
}

impl TestbedClient {
    fn new(identity: proto::net::NodeIdentity) -> Result<TestbedClient> {
        let endpoint = proto::net::client_endpoint(&identity).context("client endpoint")?;
        Ok(TestbedClient { identity, endpoint })
    }

    /// A connection to the mesh node at `addr` (`127.0.0.1:PORT`).
    pub async fn connect(&self, addr: &str) -> Result<quinn::Connection> {
        let addr: std::net::SocketAddr = addr
            .parse()
            .with_context(|| format!("bad mesh address {addr:?}"))?;
        Ok(proto::net::connect(&self.endpoint, addr).await?)
    }

    /// Sends `request` to the node at `addr` on a new connection and returns its one-frame
    /// answer (an error answer is a [`proto::wire::Response::Error`], not an `Err`).
    pub async fn call(
        &self,
        addr: &str,
        request: &proto::wire::Request,
    ) -> Result<proto::wire::Response> {
        let conn = self.connect(addr).await?;
        let answer = proto::net::call(&conn, request, proto::wire::MAX_FRAME_BYTES).await;
        conn.close(0u32.into(), b"done");
        Ok(answer?)
    }
}
