//! Issue 3: peak RSS of a stager serving N concurrent edge fetches (target: under 256 MiB).
//!
//! The origin and the stager are real processes on loopback, started through netsim's [`Testbed`]
//! (one site, one stager), and N edges are enrolled with real `origin enroll --role edge`
//! tokens. A generated bundle is published and preheated into the stager; then N edges fetch
//! the whole bundle from the stager at once, in one of two ways (`STAGECOACH_RSS_MODE`):
//!
//! - `inproc` (default): N clients in this process, each with its own edge identity, QUIC
//!   endpoint (its own UDP socket), connection and store. All connect and fetch the verified
//!   manifest first; then all are released at once, and each fetches every distinct chunk with
//!   the real verified path (`proto::transfer::fetch::fetch_blob`, every 16 KiB group verified and
//!   written to its store), 4 requests at a time as `edge-agent fetch` does
//!   (`STAGECOACH_RSS_LANES`).
//! - `processes`: N real `edge-agent fetch` processes started at once. Memory and time are fine
//!   for 100, but on a small machine the 100 processes starve the stager of CPU: some TLS
//!   handshakes take over 10 s, those edges fall back to the origin for the manifest, and they
//!   start receiving from the stager after the first edges have finished, so not all N are in
//!   flight at once (the run then fails its overlap check). Hence the default.
//!
//! A sampler thread reads the stager's `VmRSS` from `/proc/<pid>/status` every 50 ms; the
//! verdict is the stager's `VmHWM` at the end, with the high-water mark reset (via
//! `/proc/<pid>/clear_refs`) just before the fan-out, so that preheating does not count.
//!
//! That the fetches overlapped is checked from the edges' stores: a watcher notes when each
//! edge wrote its first verified bytes (the first allocated block under `store/blobs`); the most
//! edges receiving at once (from their first bytes until their fetch ended) must be N.
//!
//! Run (the binaries must be built first; the harness starts them from `target/release`):
//!
//! ```text
//! cargo build --release --bins
//! cargo bench -p benches --bench stager_rss
//! ```
//!
//! Environment: `STAGECOACH_RSS_MIB` (bundle size, default 64), `STAGECOACH_RSS_FETCHES`
//! (N, default 100), `STAGECOACH_RSS_MODE` (`inproc` or `processes`), `STAGECOACH_RSS_LANES`
//! (requests in flight per in-process client, default 4), `STAGECOACH_RSS_JSON` (result file,
//! default `<target>/stager_rss.json`), `STAGECOACH_RSS_WORK` (keep state and logs in this
//! directory instead of a temporary one).
//!
//! Exits non-zero when a fetch fails, when the fetches did not all overlap, or when the peak is
//! at or over the target (the JSON is written first in the last two cases).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use netsim::datagen;
use netsim::procs::{self, Binaries};
use netsim::testbed::{site_name, EdgeNode, StagerNode, Testbed};
use proto::manifest::{BundleId, Manifest};
use proto::net::{client_endpoint, connect, NodeIdentity};
use proto::store::{Store, StoreOptions};
use proto::transfer::fetch::{fetch_blob, fetch_manifest};
use proto::transfer::PeerCounters;
use proto::BlobHash;
use serde_json::json;

/// Default size of the generated bundle tree, in MiB.
const DEFAULT_BUNDLE_MIB: u64 = 64;
/// Default number of concurrent edge fetches.
const DEFAULT_FETCHES: usize = 100;
/// The target of issue 3.
const TARGET_RSS_BYTES: u64 = 256 * 1024 * 1024;
/// How often the stager's RSS is sampled.
const SAMPLE_INTERVAL: Duration = Duration::from_millis(50);
/// How often the edges' stores are checked for their first received bytes.
const START_POLL_INTERVAL: Duration = Duration::from_millis(100);
/// How long the stager may take to pull the bundle from the origin.
const PREHEAT_TIMEOUT: Duration = Duration::from_secs(600);
/// How long the whole fan-out may take.
const FANOUT_TIMEOUT: Duration = Duration::from_secs(1200);
/// Seed of the generated tree.
const TREE_SEED: u64 = 3;
/// Counter of requests served, by `kind`.
const REQUESTS: &str = "stagecoach_requests_total";
/// Counter of bytes sent, by `peer_role`.
const BYTES_SENT: &str = "stagecoach_bytes_sent_total";

const MIB: f64 = 1024.0 * 1024.0;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> Result<T> {
    match std::env::var(name) {
        Ok(text) => text
            .trim()
            .parse()
            .map_err(|_| anyhow::anyhow!("{name}={text:?} is not a valid value")),
        Err(_) => Ok(default),
    }
}

fn main() -> ExitCode {
    // `cargo bench` passes `--bench`; `cargo test --all-targets` runs bench targets without it,
    // and a run of 100 processes is no unit test.
    if !std::env::args().any(|arg| arg == "--bench") {
        println!("stager_rss: skipped (run it with `cargo bench -p benches --bench stager_rss`)");
        return ExitCode::SUCCESS;
    }
    match run_main() {
        Ok(verdict) => verdict,
        Err(error) => {
            eprintln!("stager_rss: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_main() -> Result<ExitCode> {
    let bundle_mib: u64 = env_or("STAGECOACH_RSS_MIB", DEFAULT_BUNDLE_MIB)?;
    let fetches: usize = env_or("STAGECOACH_RSS_FETCHES", DEFAULT_FETCHES)?;
    let lanes: usize = env_or("STAGECOACH_RSS_LANES", DEFAULT_LANES_PER_CLIENT)?;
    if bundle_mib == 0 || fetches == 0 || lanes == 0 {
        bail!(
            "STAGECOACH_RSS_MIB, STAGECOACH_RSS_FETCHES and STAGECOACH_RSS_LANES must be positive"
        );
    }
    let mode = match std::env::var("STAGECOACH_RSS_MODE").as_deref() {
        Ok("inproc") | Err(_) => Mode::InProcess,
        Ok("processes") => Mode::Processes,
        Ok(other) => bail!("STAGECOACH_RSS_MODE={other:?}: expected `inproc` or `processes`"),
    };
    let bins = Binaries::beside_current_exe()?;
    let json_path = match std::env::var_os("STAGECOACH_RSS_JSON") {
        Some(path) => PathBuf::from(path),
        None => default_json_path(&bins)?,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    let config = Config {
        mode,
        lanes,
        bins,
        bundle_bytes: bundle_mib * 1024 * 1024,
        fetches,
        json_path,
    };
    runtime.block_on(run(config))
}

/// `<target>/stager_rss.json`, where the binaries are in `<target>/release`.
fn default_json_path(bins: &Binaries) -> Result<PathBuf> {
    let profile_dir = bins
        .path("stager")
        .parent()
        .map(Path::to_path_buf)
        .context("the binaries have no directory")?;
    let target = profile_dir
        .parent()
        .context("the binaries' directory has no parent")?;
    Ok(target.join("stager_rss.json"))
}

struct Config {
    mode: Mode,
    /// Requests each in-process client keeps in flight.
    lanes: usize,
    bins: Binaries,
    bundle_bytes: u64,
    fetches: usize,
    json_path: PathBuf,
}

/// Who fetches from the stager.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// N `edge-agent fetch` processes, started at once.
    Processes,
    /// N clients in this process, each with its edge's identity, endpoint and store: all connect
    /// and fetch the verified manifest first, then all start fetching blobs at once.
    InProcess,
}

impl Mode {
    fn describe(self) -> &'static str {
        match self {
            Mode::Processes => "`edge-agent fetch` processes",
            Mode::InProcess => "in-process clients (own identity, QUIC endpoint and store each)",
        }
    }
}

/// How one edge's fetch ended.
struct Outcome {
    /// The edge.
    name: String,
    /// Seconds from the start of the fan-out until it ended.
    done_s: f64,
    /// Why it failed, if it did.
    error: Option<String>,
}

/// What the fan-out did.
struct FanOut {
    results: Vec<Outcome>,
    /// In-process only: seconds until every client had connected and verified the manifest.
    setup_s: Option<f64>,
}

async fn fan_out(
    mode: Mode,
    lanes: usize,
    mesh: &Testbed,
    edges: &[EdgeNode],
    stager: &StagerNode,
    bundle_id: &str,
    started: Instant,
) -> Result<FanOut> {
    match mode {
        Mode::Processes => {
            let fetches = mesh.fetch_all(edges, bundle_id).await?;
            let results = fetches
                .into_iter()
                .map(|fetch| Outcome {
                    error: (!fetch.ok).then(|| {
                        let log = std::fs::read_to_string(&fetch.log).unwrap_or_default();
                        format!("edge-agent fetch failed:\n{log}")
                    }),
                    name: fetch.edge.name,
                    done_s: fetch.done_s,
                })
                .collect();
            Ok(FanOut {
                results,
                setup_s: None,
            })
        }
        Mode::InProcess => {
            let addr: SocketAddr = stager
                .ready
                .mesh
                .parse()
                .with_context(|| format!("bad stager address {:?}", stager.ready.mesh))?;
            let id: BundleId = bundle_id
                .parse()
                .map_err(|e| anyhow::anyhow!("bad bundle id {bundle_id:?}: {e}"))?;
            fetch_in_process(edges, addr, id, lanes, started).await
        }
    }
}

/// Chunk requests each in-process client keeps in flight by default, as `edge-agent fetch`
/// does (`MAX_IN_FLIGHT_PER_SOURCE` in edge-agent's download).
const DEFAULT_LANES_PER_CLIENT: usize = 4;

/// One in-process edge: its identity's endpoint, a connection to the stager, the verified
/// manifest and its own store.
struct Client {
    name: String,
    endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    manifest: Manifest,
    store: Store,
}

impl Client {
    /// Loads the edge's identity, connects to the stager and fetches the verified manifest.
    async fn prepare(edge: EdgeNode, stager: SocketAddr, id: BundleId) -> Result<Client> {
        let identity = NodeIdentity::load(&edge.dir.join("identity"))
            .with_context(|| format!("cannot load the identity of {}", edge.name))?;
        let endpoint = client_endpoint(&identity)?;
        let conn = connect(&endpoint, stager)
            .await
            .with_context(|| format!("{} cannot connect to the stager", edge.name))?;
        let (_, manifest) = fetch_manifest(&conn, id, &[*identity.publisher_key()])
            .await
            .with_context(|| format!("{} cannot fetch the manifest", edge.name))?;
        let store_dir = edge.dir.join("store");
        let store = Store::open(&store_dir, StoreOptions::default())
            .with_context(|| format!("cannot open the store in {}", store_dir.display()))?;
        Ok(Client {
            name: edge.name,
            endpoint,
            conn,
            manifest,
            store,
        })
    }

    /// Fetches every distinct chunk of the manifest into the store with the real verified
    /// path (`fetch_blob`), `lanes` requests at a time.
    async fn fetch(&self, lanes: usize) -> Result<()> {
        let mut seen = std::collections::HashSet::new();
        let pieces: Vec<(BlobHash, u64)> = self
            .manifest
            .chunks
            .iter()
            .filter(|chunk| seen.insert(chunk.hash))
            .map(|chunk| (chunk.hash, chunk.stored_bytes))
            .collect();
        let mut tasks = tokio::task::JoinSet::new();
        for lane in 0..lanes {
            let mine: Vec<(BlobHash, u64)> =
                pieces.iter().skip(lane).step_by(lanes).copied().collect();
            let (conn, store) = (self.conn.clone(), self.store.clone());
            tasks.spawn(async move {
                let counters = PeerCounters::detached();
                for (hash, size) in mine {
                    fetch_blob(&conn, &store, hash, size, &counters, None)
                        .await
                        .with_context(|| format!("cannot fetch blob {hash}"))?;
                }
                anyhow::Ok(())
            });
        }
        while let Some(done) = tasks.join_next().await {
            done.context("a fetch lane panicked")??;
        }
        if let Some((hash, _)) = pieces.iter().find(|(hash, _)| !self.store.has_blob(hash)) {
            bail!("blob {hash} is not complete in the store after the fetch");
        }
        Ok(())
    }

    fn close(&self) {
        self.conn.close(0u32.into(), b"done");
        self.endpoint.close(0u32.into(), b"done");
    }
}

/// N in-process clients: all connect and verify the manifest, then all fetch at once.
async fn fetch_in_process(
    edges: &[EdgeNode],
    stager: SocketAddr,
    id: BundleId,
    lanes: usize,
    started: Instant,
) -> Result<FanOut> {
    let mut setup = tokio::task::JoinSet::new();
    for edge in edges {
        setup.spawn(Client::prepare(edge.clone(), stager, id));
    }
    let mut clients = Vec::new();
    while let Some(done) = setup.join_next().await {
        clients.push(done.context("a client task panicked")??);
    }
    let setup_s = started.elapsed().as_secs_f64();
    let mut fetches = tokio::task::JoinSet::new();
    for client in clients {
        fetches.spawn(async move {
            let result = client.fetch(lanes).await;
            let done_s = started.elapsed().as_secs_f64();
            client.close();
            Outcome {
                name: client.name,
                done_s,
                error: result.err().map(|e| format!("{e:#}")),
            }
        });
    }
    let mut results = Vec::new();
    while let Some(done) = fetches.join_next().await {
        results.push(done.context("a fetch task panicked")?);
    }
    Ok(FanOut {
        results,
        setup_s: Some(setup_s),
    })
}

async fn run(config: Config) -> Result<ExitCode> {
    let temp;
    let work = match std::env::var_os("STAGECOACH_RSS_WORK") {
        Some(dir) => {
            let dir = PathBuf::from(dir);
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            dir
        }
        None => {
            temp = tempfile::Builder::new()
                .prefix("stagecoach-rss-")
                .tempdir()
                .context("cannot create a temporary directory")?;
            temp.path().to_path_buf()
        }
    };
    let mut slot = None;
    let result = tokio::select! {
        result = run_in(&config, &work, &mut slot) => result,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    // Every path stops every process (the fleet's Drop would kill them too).
    if let Some(mesh) = slot.as_mut() {
        mesh.shutdown().await;
    }
    result
}

async fn run_in(config: &Config, work: &Path, slot: &mut Option<Testbed>) -> Result<ExitCode> {
    let n = config.fetches;
    let site = site_name(0);
    eprintln!(
        "stager_rss: generating a {:.0} MiB tree, starting origin + stager, enrolling {n} edges…",
        config.bundle_bytes as f64 / MIB
    );
    let tree = work.join("tree");
    datagen::generate_tree(&tree, config.bundle_bytes, TREE_SEED)?;
    let mesh = slot.insert(Testbed::start(config.bins.clone(), work, 1, n, &[]).await?);
    let stager = mesh
        .stagers
        .first()
        .cloned()
        .context("the mesh started no stager")?;
    let pid = find_stager_pid(&config.bins, &stager)?;

    let bundle_id = mesh.publish(&tree, "rss-bench", "1.0.0").await?;
    mesh.wait_preheated(&site, PREHEAT_TIMEOUT).await?;
    let origin_metrics = mesh.origin_metrics().await?;
    let stored_bytes = procs::metric_sum(&origin_metrics, "stagecoach_bundle_stored_bytes", &[]);
    let raw_bytes = procs::metric_sum(&origin_metrics, "stagecoach_bundle_raw_bytes", &[]);
    eprintln!(
        "stager_rss: bundle {} preheated in stager pid {pid}; {n} edges fetching at once…",
        &bundle_id[..16.min(bundle_id.len())]
    );

    // Before the fan-out: the stager at rest, holding the bundle.
    let before = read_status(pid)?;
    let hwm_reset = reset_hwm(pid);
    let metrics_before = mesh.stager_metrics(&stager.name).await?;
    let sent_before = procs::metric_sum(&metrics_before, BYTES_SENT, &[("peer_role", "edge")]);
    let blobs_before = procs::metric_sum(&metrics_before, REQUESTS, &[("kind", "get_blob")]);
    let origin_manifests_before = procs::metric_sum(
        &mesh.origin_metrics().await?,
        REQUESTS,
        &[("kind", "manifest")],
    );

    let sampler = Sampler::start(pid);
    let started = Instant::now();
    let edges = mesh.edges.clone();
    let watcher = StartWatcher::start(
        edges
            .iter()
            .map(|e| e.dir.join("store").join("blobs"))
            .collect(),
        started,
    );
    let fanout = tokio::time::timeout(
        FANOUT_TIMEOUT,
        fan_out(
            config.mode,
            config.lanes,
            mesh,
            &edges,
            &stager,
            &bundle_id,
            started,
        ),
    )
    .await;
    let wall_s = started.elapsed().as_secs_f64();
    let samples = sampler.stop();
    let first_bytes_s = watcher.stop();
    let after = read_status(pid)?;
    let FanOut { results, setup_s } = fanout
        .with_context(|| format!("the fan-out did not finish within {FANOUT_TIMEOUT:?}"))??;

    let failed: Vec<&Outcome> = results.iter().filter(|f| f.error.is_some()).collect();
    if let Some(first) = failed.first() {
        eprintln!(
            "stager_rss: {} of {n} fetches failed; {}: {}",
            failed.len(),
            first.name,
            first.error.as_deref().unwrap_or_default().trim()
        );
        bail!("{} of {n} edge fetches failed", failed.len());
    }

    let metrics_after = mesh.stager_metrics(&stager.name).await?;
    let sent_bytes = procs::metric_sum(&metrics_after, BYTES_SENT, &[("peer_role", "edge")])
        .saturating_sub(sent_before);
    let blob_requests = procs::metric_sum(&metrics_after, REQUESTS, &[("kind", "get_blob")])
        .saturating_sub(blobs_before);
    let origin_metrics = mesh.origin_metrics().await?;
    let origin_to_edges = procs::metric_sum(&origin_metrics, BYTES_SENT, &[("peer_role", "edge")]);
    // Edges whose stager did not answer the manifest request in time asked the origin.
    let origin_manifests = procs::metric_sum(&origin_metrics, REQUESTS, &[("kind", "manifest")])
        .saturating_sub(origin_manifests_before);
    let mut done: Vec<f64> = results.iter().map(|f| f.done_s).collect();
    done.sort_by(f64::total_cmp);
    let first_done_s = done.first().copied().unwrap_or(0.0);
    let last_done_s = done.last().copied().unwrap_or(0.0);
    // An edge is receiving from its first verified bytes until its fetch ended.
    // (Results come in the order the fetches ended; the watcher's in the mesh's edge order.)
    let first_by_edge: std::collections::HashMap<&str, f64> = edges
        .iter()
        .zip(&first_bytes_s)
        .filter_map(|(edge, first)| first.map(|t| (edge.name.as_str(), t)))
        .collect();
    let spans: Vec<(f64, f64)> = results
        .iter()
        .filter_map(|fetch| {
            let first = first_by_edge.get(fetch.name.as_str())?;
            Some((*first, fetch.done_s))
        })
        .collect();
    let max_in_flight = max_overlap(&spans);
    let last_first_bytes_s = first_bytes_s.iter().flatten().copied().fold(0.0, f64::max);
    let overlapped = max_in_flight == n;

    let peak_sampled_kib = samples.iter().map(|s| s.rss_kib).max().unwrap_or(0);
    let peak_anon_kib = samples.iter().map(|s| s.anon_kib).max().unwrap_or(0);
    let peak_file_kib = samples.iter().map(|s| s.file_kib).max().unwrap_or(0);
    let peak_at_s = samples
        .iter()
        .max_by_key(|s| s.rss_kib)
        .map_or(0.0, |s| s.at_s);
    let min_available_kib = samples.iter().map(|s| s.mem_available_kib).min();
    // With the reset, VmHWM covers the fan-out only; without it, the stager's whole life.
    let peak_bytes = after.hwm_kib.max(peak_sampled_kib) * 1024;
    let pass = peak_bytes < TARGET_RSS_BYTES;
    let mib = |kib: u64| kib as f64 / 1024.0;

    println!();
    println!("stager RSS under {n} concurrent edge fetches (issue 3)");
    println!(
        "  bundle            {:.1} MiB tree, {:.1} MiB stored",
        raw_bytes as f64 / MIB,
        stored_bytes as f64 / MIB
    );
    println!(
        "  fetches           {n} × {}, all ok; {blob_requests} blob requests served",
        config.mode.describe()
    );
    if let Some(setup_s) = setup_s {
        println!(
            "  setup             {n} connections and verified manifests in {setup_s:.2} s; then all {n} fetches released at once"
        );
    }
    println!(
        "  stager sent       {:.1} MiB to edges ({:.2}× bundle × N); origin sent edges {} B ({} edges fell back to it for the manifest)",
        sent_bytes as f64 / MIB,
        sent_bytes as f64 / (stored_bytes.max(1) as f64 * n as f64),
        origin_to_edges,
        origin_manifests
    );
    println!(
        "  wall time         {wall_s:.2} s (first edge done {first_done_s:.2} s, last {last_done_s:.2} s)"
    );
    println!(
        "  overlap           {max_in_flight} of {n} edges receiving at once; the last started receiving at {last_first_bytes_s:.2} s{}",
        if spans.len() < n { " (some never seen receiving)" } else { "" }
    );
    println!(
        "  RSS before        {:.1} MiB (VmHWM over preheat {:.1} MiB)",
        mib(before.rss_kib),
        mib(before.hwm_kib)
    );
    println!(
        "  peak RSS          {:.1} MiB VmHWM{}; sampled peak {:.1} MiB at {peak_at_s:.2} s (anon {:.1}, file {:.1}); {} samples",
        mib(after.hwm_kib),
        if hwm_reset { " (reset before the fan-out)" } else { " (whole life: reset failed)" },
        mib(peak_sampled_kib),
        mib(peak_anon_kib),
        mib(peak_file_kib),
        samples.len()
    );
    println!(
        "  RSS after         {:.1} MiB, {} threads",
        mib(after.rss_kib),
        after.threads
    );
    if let Some(kib) = min_available_kib {
        println!(
            "  machine           min MemAvailable {:.0} MiB during the fan-out",
            mib(kib)
        );
    }
    println!(
        "  verdict           {} ({:.1} MiB {} 256 MiB)",
        if pass { "PASS" } else { "FAIL" },
        peak_bytes as f64 / MIB,
        if pass { "<" } else { ">=" }
    );

    let result = json!({
        "bundle_id": bundle_id,
        "bundle_raw_bytes": raw_bytes,
        "bundle_stored_bytes": stored_bytes,
        "fetches": n,
        "fetch_mode": config.mode.describe(),
        "setup_s": setup_s,
        "lanes_per_client": (config.mode == Mode::InProcess).then_some(config.lanes),
        "stager_sent_bytes": sent_bytes,
        "stager_blob_requests": blob_requests,
        "origin_sent_to_edges_bytes": origin_to_edges,
        "origin_manifests_to_edges": origin_manifests,
        "wall_s": wall_s,
        "first_done_s": first_done_s,
        "last_done_s": last_done_s,
        "last_edge_first_bytes_s": last_first_bytes_s,
        "max_in_flight": max_in_flight,
        "rss_before_bytes": before.rss_kib * 1024,
        "hwm_before_bytes": before.hwm_kib * 1024,
        "hwm_reset_before_fanout": hwm_reset,
        "peak_rss_bytes": peak_bytes,
        "vm_hwm_bytes": after.hwm_kib * 1024,
        "sampled_peak_rss_bytes": peak_sampled_kib * 1024,
        "sampled_peak_anon_bytes": peak_anon_kib * 1024,
        "sampled_peak_file_bytes": peak_file_kib * 1024,
        "rss_after_bytes": after.rss_kib * 1024,
        "min_mem_available_bytes": min_available_kib.map(|k| k * 1024),
        "target_bytes": TARGET_RSS_BYTES,
        "pass": pass,
        "nproc": std::thread::available_parallelism().map(|p| p.get()).unwrap_or(0),
        "samples_ms_kib": samples.iter().map(|s| [(s.at_s * 1000.0).round() as u64, s.rss_kib]).collect::<Vec<_>>(),
    });
    if let Some(parent) = config.json_path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    std::fs::write(&config.json_path, serde_json::to_vec_pretty(&result)?)
        .with_context(|| format!("cannot write {}", config.json_path.display()))?;
    println!("  result            {}", config.json_path.display());

    if !overlapped {
        eprintln!("stager_rss: the fetches did not all overlap; the peak is not of {n} at once");
        return Ok(ExitCode::FAILURE);
    }
    Ok(if pass {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The pid of `stager`'s `stager serve` process: the one whose command line is that binary
/// with `--dir <its state directory>`.
fn find_stager_pid(bins: &Binaries, stager: &StagerNode) -> Result<u32> {
    let bin = bins.path("stager").display().to_string();
    let dir = stager.dir.display().to_string();
    let found: Vec<u32> = procs::live_processes()
        .into_iter()
        .filter(|(_, args)| {
            let is_stager = args.first().is_some_and(|a| *a == bin);
            let serves = args.iter().any(|a| a == "serve");
            let its_dir = args.windows(2).any(|w| w[0] == "--dir" && w[1] == dir);
            is_stager && serves && its_dir
        })
        .map(|(pid, _)| pid)
        .collect();
    match found.as_slice() {
        [pid] => Ok(*pid),
        [] => bail!("no `stager serve --dir {dir}` process found in /proc"),
        many => bail!("several stager processes for {dir}: {many:?}"),
    }
}

/// Memory figures of one process from `/proc/<pid>/status`, in KiB.
#[derive(Clone, Copy, Debug, Default)]
struct Status {
    rss_kib: u64,
    hwm_kib: u64,
    anon_kib: u64,
    file_kib: u64,
    threads: u64,
}

fn read_status(pid: u32) -> Result<Status> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    let mut status = Status::default();
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let number = value
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        match key {
            "VmRSS" => status.rss_kib = number,
            "VmHWM" => status.hwm_kib = number,
            "RssAnon" => status.anon_kib = number,
            "RssFile" => status.file_kib = number,
            "Threads" => status.threads = number,
            _ => {}
        }
    }
    if status.rss_kib == 0 {
        bail!("{path} has no VmRSS");
    }
    Ok(status)
}

/// Resets the process's peak RSS (VmHWM) to its current RSS; false when the kernel refused.
fn reset_hwm(pid: u32) -> bool {
    let reset = std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok();
    if !reset {
        eprintln!("stager_rss: cannot reset VmHWM; the peak covers the stager's whole life");
    }
    reset
}

fn mem_available_kib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

#[derive(Clone, Copy, Debug)]
struct Sample {
    at_s: f64,
    rss_kib: u64,
    anon_kib: u64,
    file_kib: u64,
    mem_available_kib: u64,
}

/// Reads the stager's RSS every [`SAMPLE_INTERVAL`] on a thread of its own, so that a busy
/// runtime does not delay it.
struct Sampler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<Sample>>,
}

impl Sampler {
    fn start(pid: u32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let started = Instant::now();
            let mut samples = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                if let Ok(status) = read_status(pid) {
                    samples.push(Sample {
                        at_s: started.elapsed().as_secs_f64(),
                        rss_kib: status.rss_kib,
                        anon_kib: status.anon_kib,
                        file_kib: status.file_kib,
                        mem_available_kib: mem_available_kib().unwrap_or(0),
                    });
                }
                std::thread::sleep(SAMPLE_INTERVAL);
            }
            samples
        });
        Self { stop, thread }
    }

    fn stop(self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
}

/// Notes, per store directory, when its first data block was written: when that edge first
/// received verified bytes. Polls on a thread of its own; each directory is walked only until
/// it has data.
struct StartWatcher {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<Option<f64>>>,
}

impl StartWatcher {
    fn start(dirs: Vec<PathBuf>, started: Instant) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut first: Vec<Option<f64>> = vec![None; dirs.len()];
            loop {
                // Read the flag first, so that one last pass runs after the fetches ended.
                let last_pass = flag.load(Ordering::Relaxed);
                for (dir, seen) in dirs.iter().zip(first.iter_mut()) {
                    if seen.is_none() && has_data(dir) {
                        *seen = Some(started.elapsed().as_secs_f64());
                    }
                }
                if last_pass || first.iter().all(Option::is_some) {
                    return first;
                }
                std::thread::sleep(START_POLL_INTERVAL);
            }
        });
        Self { stop, thread }
    }

    fn stop(self) -> Vec<Option<f64>> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
}

/// Whether any file under `dir` has an allocated block (blob files start sparse).
fn has_data(dir: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    entries.flatten().any(|entry| match entry.metadata() {
        Ok(meta) if meta.is_dir() => has_data(&entry.path()),
        Ok(meta) => meta.blocks() > 0,
        Err(_) => false,
    })
}

/// Most spans `[start, end)` that cover one instant.
fn max_overlap(spans: &[(f64, f64)]) -> usize {
    let mut events: Vec<(f64, i32)> = spans
        .iter()
        .flat_map(|&(start, end)| [(start, 1), (end, -1)])
        .collect();
    // Ends before starts at the same instant: touching spans do not overlap.
    events.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let (mut now, mut most) = (0i32, 0i32);
    for (_, delta) in events {
        now += delta;
        most = most.max(now);
    }
    most.max(0) as usize
}
