//! Backup stagers (issue 15), with the real binaries on loopback and the site's WAN an emulated
//! link: a site with two stagers (`stager serve --sibling`) pulls each chunk across the WAN once,
//! to one of them, and its edges finish when one of the two is killed mid-bundle.
//!
//! The tests run one at a time (each starts a mesh and moves hundreds of MiB on a machine that
//! may have two cores). Times are printed, not asserted: they are figures for the README.

use std::path::Path;
use std::time::{Duration, Instant};

use netsim::datagen;
use netsim::procs::{metric_sum, Binaries};
use netsim::relay::{LinkShape, Relay, RelayConfig};
use netsim::testbed::Testbed;
use stagecoach_testing::wait_for_async;

const MIB: u64 = 1024 * 1024;

/// The site of every test.
const SITE: &str = "site-a";

/// The site's WAN: 300 Mbit/s, 5 ms each way, so a 256 MiB bundle crosses in about 7 s.
const WAN_MBIT: f64 = 300.0;
const WAN_LATENCY_MS: u64 = 5;

/// How long a stager may take to pull a bundle, and the edges to fetch it.
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(300);

/// How often counters are read while waiting.
const POLL: Duration = Duration::from_millis(50);

/// Progress of the edges after a kill counts as resumed once they received this much more.
const RESUMED_BYTES: u64 = MIB;

/// One test at a time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn bins() -> Binaries {
    Binaries::beside_current_exe().expect("build the binaries: cargo build --release --bins")
}

/// A mesh with an origin and site [`SITE`] behind a WAN relay, with `stagers` sibling stagers
/// and `edges` enrolled edges.
async fn site_behind_a_wan(work: &Path, stagers: usize, edges: usize) -> (Testbed, Relay) {
    let mut mesh = Testbed::start(bins(), work, 0, 0, &[]).await.expect("mesh");
    let origin = mesh.origin.mesh.parse().expect("origin address");
    let wan = Relay::start(RelayConfig::symmetric(
        "127.0.0.1:0".parse().expect("address"),
        origin,
        LinkShape::wan(WAN_MBIT, WAN_LATENCY_MS, 0, 0.0),
        15,
    ))
    .expect("WAN relay");
    mesh.route_site_via(SITE, &wan.local_addr().to_string());
    mesh.add_stagers(SITE, stagers, &[]).await.expect("stagers");
    for index in 0..edges {
        mesh.add_edge(SITE, index).await.expect("edge");
    }
    (mesh, wan)
}

/// The stored bytes of the published bundle, from the origin.
async fn bundle_bytes(mesh: &Testbed) -> u64 {
    let text = mesh.origin_metrics().await.expect("origin metrics");
    let bytes = metric_sum(&text, "stagecoach_bundle_stored_bytes", &[]);
    assert!(bytes > 0, "the origin reports no stored bundle:\n{text}");
    bytes
}

/// Payload bytes the origin sent to the nodes of [`SITE`] (its metrics outlive any stager).
async fn origin_sent_to_site(mesh: &Testbed) -> u64 {
    let text = mesh.origin_metrics().await.expect("origin metrics");
    metric_sum(&text, "stagecoach_bytes_sent_total", &[("peer_site", SITE)])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edges_finish_when_one_of_two_stagers_is_killed_mid_bundle() {
    const EDGES: usize = 4;
    let _serial = ONE_AT_A_TIME.lock().await;
    let work = tempfile::tempdir().expect("tempdir");
    let tree = work.path().join("tree");
    datagen::generate_incompressible_tree(&tree, 256 * MIB, 151).expect("tree");
    let (mut mesh, wan) = site_behind_a_wan(&work.path().join("mesh"), 2, EDGES).await;
    // Daemons with peers off: the edges fetch from the two stagers only, and their metrics
    // show their progress.
    mesh.start_edge_daemons(false, &[])
        .await
        .expect("edge daemons");
    let id = mesh.publish(&tree, "os", "1").await.expect("publish");
    let bundle = bundle_bytes(&mesh).await;
    let edges = mesh.edges.clone();
    let fetches = mesh.start_fetches(&edges, &id).expect("fetches");

    // A third of the bundle crossed the WAN: both stagers are pulling and serving.
    let third = wait_for_async(TRANSFER_TIMEOUT, POLL, async || {
        let crossed = wan.stats().down.forwarded_bytes;
        anyhow::Ok((crossed * 3 >= bundle).then_some(crossed))
    })
    .await
    .expect("a third of the bundle crossed the WAN");
    let victim = mesh.stagers[0].name.clone();
    let survivor = mesh.stagers[1].name.clone();
    let edges_at_kill = mesh.edge_received_bytes().await.expect("edge bytes");
    let wan_at_kill = wan.stats().down.forwarded_bytes;
    let killed_at = Instant::now();
    mesh.kill_stager(&victim).await.expect("kill -9 a stager");
    assert!(
        (wan_at_kill as f64) < 0.9 * bundle as f64,
        "the bundle had nearly crossed ({wan_at_kill} of {bundle} B, {third} B when seen) \
         before the stager died: the test proves nothing"
    );

    // How long until the edges' progress resumes, and the longest stall after the kill.
    let watch = watch_progress(&mesh, &wan, edges_at_kill, wan_at_kill, killed_at);
    let (fetched, progress) = tokio::join!(fetches.wait(), watch);
    let fetched = fetched.expect("fetches");
    netsim::testbed::assert_all_fetched(&fetched, EDGES);
    let crossed = wan.stats().down.forwarded_bytes;
    let payload = origin_sent_to_site(&mesh).await;
    let link_ratio = crossed as f64 / bundle as f64;
    let payload_ratio = payload as f64 / bundle as f64;
    eprintln!(
        "backup stager: killed {victim} after {wan_at_kill} B of the {bundle} B bundle crossed; \
         edges resumed {:.3} s after the kill (longest stall after it {:.3} s), WAN resumed \
         {:.3} s after it; all {EDGES} edges done in {:.2} s; WAN into the site: {payload} B \
         payload ({payload_ratio:.4}× the bundle), {crossed} B on the link ({link_ratio:.4}×)",
        progress.edges_resumed_s.unwrap_or(f64::NAN),
        progress.longest_stall_s,
        progress.wan_resumed_s.unwrap_or(f64::NAN),
        fetched.iter().map(|f| f.done_s).fold(0.0, f64::max),
    );
    if let Ok(status) = mesh.stager_status(&survivor).await {
        eprintln!(
            "stager status of {survivor}:\n{}{}",
            status.stdout, status.stderr
        );
    }
    assert!(
        payload_ratio <= 1.05,
        "the site pulled {payload} B across the WAN for a {bundle} B bundle ({payload_ratio:.3}×): \
         the surviving stager pulled again what its sibling had pulled"
    );
    mesh.shutdown().await;
    wan.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_cold_stagers_pull_each_chunk_across_the_wan_once() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let work = tempfile::tempdir().expect("tempdir");
    let tree = work.path().join("tree");
    datagen::generate_incompressible_tree(&tree, 64 * MIB, 152).expect("tree");
    // What one stager pulls for this bundle is the yardstick: the payload of one copy, with
    // the verification hashes and framing the protocol adds to it.
    let one = cold_pull(&work.path().join("one"), &tree, 1).await;
    let two = cold_pull(&work.path().join("two"), &tree, 2).await;
    let bundle = two.bundle as f64;
    let ratio = two.payload as f64 / one.payload as f64;
    eprintln!(
        "cold stagers: one stager pulled {} B ({:.4}× the {} B bundle; link {:.4}×), two sibling \
         stagers {} B ({:.4}×; link {:.4}×), split {:?}: {ratio:.4}× what one pulls",
        one.payload,
        one.payload as f64 / bundle,
        two.bundle,
        one.link as f64 / bundle,
        two.payload,
        two.payload as f64 / bundle,
        two.link as f64 / bundle,
        two.from_origin,
    );
    assert!(
        (0.99..=1.01).contains(&ratio),
        "two cold stagers pulled {ratio:.4}× what one stager pulls across the WAN, not the same \
         (±1%): some chunks crossed twice"
    );
    let pulled: u64 = two.from_origin.iter().sum();
    assert!(
        (pulled as f64 / two.payload as f64 - 1.0).abs() <= 0.01,
        "the stagers count {pulled} B from the origin, the origin {} B",
        two.payload
    );
    // Each chunk has one owner among the live stagers: both pulled a share.
    for (index, bytes) in two.from_origin.iter().enumerate() {
        assert!(
            *bytes as f64 >= 0.1 * bundle,
            "stager {index} pulled only {bytes} B of the {bundle} B bundle: the chunks are not \
             shared out"
        );
    }
}

/// What a site of cold stagers pulled for one bundle.
struct ColdPull {
    /// The bundle's stored bytes.
    bundle: u64,
    /// Payload bytes the origin sent to the site.
    payload: u64,
    /// UDP payload the WAN link carried origin → site.
    link: u64,
    /// Payload bytes each stager received from the origin.
    from_origin: Vec<u64>,
}

/// Publishes `tree` to a site of `stagers` cold sibling stagers and waits until each holds it.
async fn cold_pull(work: &Path, tree: &Path, stagers: usize) -> ColdPull {
    let (mut mesh, wan) = site_behind_a_wan(work, stagers, 0).await;
    mesh.publish(tree, "os", "1").await.expect("publish");
    let bundle = bundle_bytes(&mesh).await;
    mesh.wait_preheated(SITE, TRANSFER_TIMEOUT)
        .await
        .expect("the stagers hold the bundle");
    let names: Vec<String> = mesh.stagers.iter().map(|st| st.name.clone()).collect();
    let mut from_origin = Vec::new();
    for name in &names {
        let text = mesh.stager_metrics(name).await.expect("stager metrics");
        let received = "stagecoach_bytes_received_total";
        let upstream = metric_sum(&text, received, &[("peer_role", "origin")]);
        let sibling = metric_sum(
            &text,
            received,
            &[("peer_role", "stager"), ("peer_site", SITE)],
        );
        eprintln!(
            "{name}: {upstream} B from the origin ({:.3}× the bundle), {sibling} B from its siblings",
            upstream as f64 / bundle as f64
        );
        from_origin.push(upstream);
    }
    let pull = ColdPull {
        bundle,
        payload: origin_sent_to_site(&mesh).await,
        link: wan.stats().down.forwarded_bytes,
        from_origin,
    };
    mesh.shutdown().await;
    wan.shutdown();
    pull
}

/// How the edges' progress went after a kill.
struct Progress {
    /// Seconds from the kill until the edges received [`RESUMED_BYTES`] more than at the kill.
    edges_resumed_s: Option<f64>,
    /// Seconds from the kill until the WAN carried [`RESUMED_BYTES`] more than at the kill.
    wan_resumed_s: Option<f64>,
    /// The longest time after the kill in which the edges received nothing.
    longest_stall_s: f64,
}

/// Watches the edges' received bytes and the WAN after a kill, while the fetches run (the
/// caller joins this with them): stops once the edges' bytes resumed and then stopped growing
/// for `QUIET` (they are done, or stuck, which the fetches report), or after
/// [`TRANSFER_TIMEOUT`].
async fn watch_progress(
    mesh: &Testbed,
    wan: &Relay,
    edges_at_kill: u64,
    wan_at_kill: u64,
    killed_at: Instant,
) -> Progress {
    /// The edges are done (or stuck, which the fetches report) once nothing moved this long.
    const QUIET: Duration = Duration::from_secs(5);
    let mut progress = Progress {
        edges_resumed_s: None,
        wan_resumed_s: None,
        longest_stall_s: 0.0,
    };
    let mut last = edges_at_kill;
    let mut last_change = killed_at;
    while killed_at.elapsed() < TRANSFER_TIMEOUT {
        tokio::time::sleep(POLL).await;
        let now = Instant::now();
        let since_kill = now.duration_since(killed_at).as_secs_f64();
        if progress.wan_resumed_s.is_none()
            && wan.stats().down.forwarded_bytes >= wan_at_kill + RESUMED_BYTES
        {
            progress.wan_resumed_s = Some(since_kill);
        }
        let Ok(received) = mesh.edge_received_bytes().await else {
            continue;
        };
        if received > last {
            progress.longest_stall_s = progress
                .longest_stall_s
                .max(now.duration_since(last_change).as_secs_f64());
            last = received;
            last_change = now;
        }
        if progress.edges_resumed_s.is_none() && received >= edges_at_kill + RESUMED_BYTES {
            progress.edges_resumed_s = Some(since_kill);
        }
        if progress.edges_resumed_s.is_some() && now.duration_since(last_change) >= QUIET {
            break;
        }
    }
    progress
}
