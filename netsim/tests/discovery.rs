//! Peer discovery (libp2p) with real processes on loopback: edges learn each other's libp2p
//! addresses from the stager's list of known peers and dial them, so when the stager goes away
//! they still find and use each other.

use std::time::Duration;

use netsim::datagen;
use netsim::procs::{metric_sum, Binaries};
use netsim::testbed::Testbed;

const MIB: u64 = 1024 * 1024;

fn bins() -> Binaries {
    Binaries::beside_current_exe().expect("build the binaries: cargo build --release --bins")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edges_found_by_discovery_share_when_the_stager_is_gone() {
    let work = tempfile::tempdir().expect("tempdir");
    let tree = work.path().join("tree");
    datagen::generate_tree(&tree, 8 * MIB, 31).expect("tree");
    let mut mesh = Testbed::start(bins(), &work.path().join("mesh"), 1, 2, &[])
        .await
        .expect("mesh");
    mesh.start_edge_daemons(true, &[]).await.expect("daemons");
    let id = mesh.publish(&tree, "os", "1").await.expect("publish");
    // A few tracker rounds: each edge learns the other's libp2p addresses from the stager and
    // dials it.
    let (a, b) = (mesh.edges[0].clone(), mesh.edges[1].clone());
    let found = |log: &str| log.contains("discovered a peer of the site");
    let log_of = |name: &str| {
        std::fs::read_to_string(mesh.work.join(format!("logs/{name}.log"))).unwrap_or_default()
    };
    let both = stagecoach_testing::wait_until_async(
        Duration::from_secs(30),
        Duration::from_millis(200),
        async || found(&log_of(&a.name)) && found(&log_of(&b.name)),
    )
    .await;
    assert!(
        both.is_ok(),
        "the edges did not discover each other through the stager's list:\n--- {}\n{}\n--- {}\n{}",
        a.name,
        log_of(&a.name),
        b.name,
        log_of(&b.name)
    );

    // The stager goes away: A gets the bundle from the origin (the last resort), and B, which
    // cannot learn from any tracker what A holds, asks A directly and fetches from it.
    let stager = mesh.stagers[0].name.clone();
    mesh.kill_stager(&stager).await.expect("kill stager");
    let fetched = mesh
        .fetch_all(std::slice::from_ref(&a), &id)
        .await
        .expect("fetch a");
    assert!(
        fetched[0].ok,
        "A failed: {}",
        std::fs::read_to_string(&fetched[0].log).unwrap_or_default()
    );
    let origin_to_edges = |text: &str| {
        metric_sum(
            text,
            "stagecoach_bytes_sent_total",
            &[("peer_role", "edge")],
        )
    };
    let origin_before = origin_to_edges(&mesh.origin_metrics().await.expect("origin metrics"));
    let fetched = mesh
        .fetch_all(std::slice::from_ref(&b), &id)
        .await
        .expect("fetch b");
    assert!(
        fetched[0].ok,
        "B failed: {}",
        std::fs::read_to_string(&fetched[0].log).unwrap_or_default()
    );
    let origin_text = mesh.origin_metrics().await.expect("origin metrics");
    let origin_after = origin_to_edges(&origin_text);
    let bundle = metric_sum(&origin_text, "stagecoach_bundle_stored_bytes", &[]);
    let (peer_bytes, cross) = mesh.peer_bytes("site-a").await.expect("peer bytes");
    assert_eq!(cross, 0);
    assert!(
        peer_bytes as f64 >= 0.9 * bundle as f64,
        "B got {peer_bytes} B from A for a {bundle} B bundle: discovery did not make A a source"
    );
    assert!(
        ((origin_after - origin_before) as f64) < 0.1 * bundle as f64,
        "the origin sent B {} B: B did not use its discovered peer",
        origin_after - origin_before
    );
    mesh.shutdown().await;
}
