//! Regional stagers (issue 15), emulated with the real binaries on loopback: sites whose
//! stagers pull through a region's stager (`stager serve --upstream`) instead of the origin,
//! each link an emulated WAN relay whose bytes are counted ([`netsim::emulate`]). The origin
//! sends each bundle once per region; when the regional stager dies, the sites' stagers fail
//! over to the origin and their edges finish.
//!
//! The tests run one at a time. Times are printed, not asserted: they are figures for the
//! README.

use std::path::Path;
use std::time::{Duration, Instant};

use netsim::datagen;
use netsim::emulate::{self, EmulateOptions, Emulation};
use netsim::procs::{metric_sum, Binaries};
use netsim::report::RunResult;
use netsim::testbed;
use netsim::topology::{Strategy, Topology};
use stagecoach_testing::wait_for_async;

const MIB: u64 = 1024 * 1024;

/// How long the stagers and edges may take to move a bundle.
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(300);

/// How often counters are read while waiting.
const POLL: Duration = Duration::from_millis(50);

/// How long `stager status` may take to show a failover (the daemon rewrites it every 2 s).
const STATUS_TIMEOUT: Duration = Duration::from_secs(10);

/// Progress of the edges after the kill counts as resumed once they received this much more.
const RESUMED_BYTES: u64 = MIB;

/// One test at a time: each starts a whole mesh on a machine that may have two cores.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Region `eu` (one stager, 400 Mbit/s from the origin) and two sites in it, each one stager
/// and two edges behind 300 Mbit/s: a 128 MiB bundle takes a few seconds on each link.
const REGION_OF_TWO_SITES: &str = r#"
name = "region-of-two-sites"
strategy = "staged"
[bundle]
size_mib = 128
[origin]
uplink_mbit = 10000
[lan]
node_mbit = 1000
latency_ms = 0.2
[[regions]]
name = "eu"
stagers = 1
wan = { mbit = 400, latency_ms = 5 }
[[sites]]
name = "paris"
edges = 2
region = "eu"
wan = { mbit = 300, latency_ms = 5 }
[[sites]]
name = "berlin"
edges = 2
region = "eu"
wan = { mbit = 300, latency_ms = 5 }
"#;

/// Three sites of two sibling stagers and one edge, flat (each pulls from the origin) or tiered
/// (all three in region `eu`): what the origin sends, as copies of the bundle. `netsim emulate`
/// of a topology with regions and several stagers per site.
fn small_fleet(tiered: bool) -> Topology {
    let region = if tiered { "region = \"eu\"" } else { "" };
    let regions = if tiered {
        "[[regions]]\nname = \"eu\"\nstagers = 1\nwan = { mbit = 400, latency_ms = 5 }\n"
    } else {
        ""
    };
    let mut text = format!(
        "name = \"{}\"\nstrategy = \"staged\"\n[bundle]\nsize_mib = 64\n[origin]\n\
         uplink_mbit = 10000\n[lan]\nnode_mbit = 1000\nlatency_ms = 0.2\n{regions}",
        if tiered { "tiered" } else { "flat" }
    );
    for site in ["north", "south", "west"] {
        text.push_str(&format!(
            "[[sites]]\nname = \"{site}\"\nstagers = 2\nedges = 1\n{region}\n\
             wan = {{ mbit = 300, latency_ms = 5 }}\n"
        ));
    }
    Topology::from_toml_str(&text).expect("small fleet topology")
}

fn options(work: Option<&Path>) -> EmulateOptions {
    EmulateOptions {
        binaries: Binaries::beside_current_exe()
            .expect("build the binaries: cargo build --release --bins"),
        work_dir: work.map(Path::to_path_buf),
        seed: 7,
        capture_dir: None,
        origin_args: Vec::new(),
    }
}

/// Whether a stager's log says it failed over from an upstream (its `upstream failover` line).
fn logs_failover(log: &str) -> bool {
    log.lines().any(|line| line.contains("upstream failover"))
}

/// The origin's line of `stager status` (`ADDR origin STATE pulled N MiB`) says it is in use.
fn status_origin_in_use(status: &str) -> bool {
    status.lines().any(|line| {
        let words: Vec<&str> = line.split_whitespace().collect();
        words.get(1) == Some(&"origin") && line.contains("in use")
    })
}

/// `stager status` lists at least one failover (`at T: FROM -> TO (reason)` under
/// `failovers:`).
fn status_lists_failover(status: &str) -> bool {
    status
        .split_once("failovers:")
        .is_some_and(|(_, list)| list.lines().any(|line| line.contains("->")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn site_stagers_fail_over_to_the_origin_when_the_regional_stager_dies() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let topo = Topology::from_toml_str(REGION_OF_TWO_SITES).expect("topology");
    let work = tempfile::tempdir().expect("tempdir");
    let tree = work.path().join("tree");
    datagen::generate_incompressible_tree(&tree, 128 * MIB, 153).expect("tree");
    let run_dir = work.path().join("run");
    let options = options(Some(&run_dir));
    let mut slot = None;
    let emulation = Emulation::start(&topo, Strategy::Staged, &options, &run_dir, None, &mut slot)
        .await
        .expect("emulation");
    // Daemons with peers off: the edges fetch from their stager, and their metrics show their
    // progress.
    emulation
        .start_edge_daemons(false, |_| Vec::new())
        .await
        .expect("edge daemons");
    let id = emulation
        .mesh
        .publish(&tree, "os", "1")
        .await
        .expect("publish");
    let origin_metrics = emulation.mesh.origin_metrics().await.expect("metrics");
    let bundle = metric_sum(&origin_metrics, "stagecoach_bundle_stored_bytes", &[]);
    assert!(bundle > 0, "the origin reports no stored bundle");
    let edges = emulation.mesh.edges.clone();
    let fetches = emulation.mesh.start_fetches(&edges, &id).expect("fetches");

    // Both sites pulled a third of the bundle through the region.
    let sites: Vec<String> = topo.sites.iter().map(|s| s.name.clone()).collect();
    wait_for_async(TRANSFER_TIMEOUT, POLL, async || {
        let least = sites
            .iter()
            .filter_map(|site| emulation.site_wan_bytes(site))
            .map(|bytes| bytes.from_region)
            .min()
            .unwrap_or(0);
        anyhow::Ok((least * 3 >= bundle).then_some(()))
    })
    .await
    .expect("both sites pulled a third of the bundle through the region");
    let regional = format!("stager-{}-0", testbed::region_site("eu"));
    let edges_at_kill = emulation.mesh.edge_received_bytes().await.expect("bytes");
    let at_kill: Vec<_> = sites
        .iter()
        .map(|site| emulation.site_wan_bytes(site).expect("site"))
        .collect();
    let killed_at = Instant::now();
    emulation
        .mesh
        .kill_stager(&regional)
        .await
        .expect("kill -9 the regional stager");
    for (site, bytes) in sites.iter().zip(&at_kill) {
        assert!(
            (bytes.total() as f64) < 0.9 * bundle as f64,
            "{site} had nearly the whole bundle ({} of {bundle} B) when the regional stager \
             died: the test proves nothing",
            bytes.total()
        );
    }

    let mut resumed_s = None;
    // Per site, when its link from the origin carried [`RESUMED_BYTES`] more than at the kill.
    let mut origin_resumed_s: Vec<Option<f64>> = vec![None; sites.len()];
    let mut fetches = fetches;
    let mut fetched = Vec::new();
    loop {
        tokio::select! {
            done = fetches.next() => match done.expect("fetch") {
                Some(fetch) => fetched.push(fetch),
                None => break,
            },
            _ = tokio::time::sleep(POLL), if resumed_s.is_none() || origin_resumed_s.contains(&None) => {
                for ((site, before), resumed) in sites.iter().zip(&at_kill).zip(&mut origin_resumed_s) {
                    let now = emulation.site_wan_bytes(site).map_or(0, |b| b.from_origin);
                    if resumed.is_none() && now >= before.from_origin + RESUMED_BYTES {
                        *resumed = Some(killed_at.elapsed().as_secs_f64());
                    }
                }
                if let Ok(received) = emulation.mesh.edge_received_bytes().await {
                    if received >= edges_at_kill + RESUMED_BYTES {
                        resumed_s = Some(killed_at.elapsed().as_secs_f64());
                    }
                }
            }
        }
    }
    let all_done_s = killed_at.elapsed().as_secs_f64();
    testbed::assert_all_fetched(&fetched, edges.len());

    eprintln!(
        "regional stager killed: the sites' links from the origin carried data {:?} s after the \
         kill; the edges' bytes grew again {:.3} s after it, all done {all_done_s:.2} s after it; \
         bundle {bundle} B; region link {} B",
        origin_resumed_s,
        resumed_s.unwrap_or(f64::NAN),
        emulation.region_wan_bytes("eu").unwrap_or(0)
    );
    for (site, before) in sites.iter().zip(&at_kill) {
        let after = emulation.site_wan_bytes(site).expect("site");
        eprintln!(
            "{site}: at the kill {} B from the region, {} B from the origin; at the end {} B from \
             the region, {} B from the origin ({:.3}× the bundle in all)",
            before.from_region,
            before.from_origin,
            after.from_region,
            after.from_origin,
            after.total() as f64 / bundle as f64
        );
        assert!(
            after.from_origin > before.from_origin + bundle / 10,
            "{site} did not pull the rest of the bundle from the origin after its regional \
             stager died ({} B before, {} B after)",
            before.from_origin,
            after.from_origin
        );
        assert!(
            (after.total() as f64) <= 1.5 * bundle as f64,
            "{site} pulled {} B across its WAN for a {bundle} B bundle: it started over \
             instead of resuming",
            after.total()
        );
    }
    // Each site's stager says it failed over: `stager status` shows the origin in use and the
    // failover (the daemon rewrites its status every 2 s), its log and metrics the failover.
    let mesh = &emulation.mesh;
    for stager in mesh.stagers.iter().filter(|st| sites.contains(&st.site)) {
        let status = wait_for_async(STATUS_TIMEOUT, POLL, async || {
            let status = mesh.stager_status(&stager.name).await?;
            let shown =
                status_origin_in_use(&status.stdout) && status_lists_failover(&status.stdout);
            anyhow::Ok(shown.then_some(status.stdout))
        })
        .await;
        let log =
            std::fs::read_to_string(mesh.work.join("logs").join(format!("{}.log", stager.name)))
                .unwrap_or_default();
        let metrics = mesh.stager_metrics(&stager.name).await.expect("metrics");
        let failovers = metric_sum(&metrics, "stagecoach_stager_failovers_total", &[]);
        let status = match status {
            Ok(status) => status,
            Err(error) => panic!(
                "{}: stager status does not show the failover to the origin ({error}):\n{}",
                stager.name,
                mesh.stager_status(&stager.name)
                    .await
                    .map(|s| s.stdout)
                    .unwrap_or_default()
            ),
        };
        eprintln!(
            "stager status of {} ({failovers} failovers counted):\n{status}",
            stager.name
        );
        assert!(
            failovers > 0 && logs_failover(&log),
            "{} counted {failovers} failovers, and its log {} an `upstream failover` line",
            stager.name,
            if logs_failover(&log) { "has" } else { "has no" }
        );
    }
    let run = emulation.collect(&fetched).await.expect("collect");
    for note in &run.notes {
        eprintln!("note: {note}");
    }
    if let Some(emulation) = slot.as_mut() {
        emulation.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_makes_the_origin_send_the_bundle_once() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let flat = emulate::emulate(&small_fleet(false), Strategy::Staged, &options(None))
        .await
        .expect("flat");
    let tiered = emulate::emulate(&small_fleet(true), Strategy::Staged, &options(None))
        .await
        .expect("tiered");
    for run in [&flat, &tiered] {
        assert_every_edge_done(run);
    }
    let copies = |run: &RunResult| run.origin_egress_bytes as f64 / run.bundle_bytes as f64;
    let link_note = |run: &RunResult| {
        run.notes
            .iter()
            .find(|n| n.contains("origin egress on the links"))
            .cloned()
            .unwrap_or_default()
    };
    eprintln!(
        "origin egress ÷ bundle, 3 sites of 2 stagers + 1 edge, 64 MiB, staged: flat {:.3} \
         ({}), tiered through one regional stager {:.3} ({}); all edges done after {:.2} s \
         flat, {:.2} s tiered",
        copies(&flat),
        link_note(&flat),
        copies(&tiered),
        link_note(&tiered),
        flat.all_edges_done_s.unwrap_or(f64::NAN),
        tiered.all_edges_done_s.unwrap_or(f64::NAN),
    );
    assert!(
        copies(&flat) >= 2.9,
        "flat: the origin should send one copy per site (3), sent {:.3}",
        copies(&flat)
    );
    assert!(
        copies(&tiered) <= 1.1,
        "tiered: the origin should send one copy for the region, sent {:.3}",
        copies(&tiered)
    );
    // Every site still pulled one copy across its own WAN link, not one per stager.
    for run in [&flat, &tiered] {
        for site in &run.sites {
            let ratio = site.wan_bytes as f64 / run.bundle_bytes as f64;
            assert!(
                (0.99..=1.15).contains(&ratio),
                "{}: {} carried {ratio:.3} copies over its WAN, not one",
                run.topology,
                site.name
            );
        }
    }
}

fn assert_every_edge_done(run: &RunResult) {
    for site in &run.sites {
        assert_eq!(
            site.edges_done, site.edges,
            "{}: {} of {} edges got the bundle; notes: {:?}",
            run.topology, site.edges_done, site.edges, run.notes
        );
    }
}
