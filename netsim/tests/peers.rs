//! Peer caching inside a site, with real processes on loopback: edge daemons that fetch from
//! their stager and from each other, found through the site's gossip.

use std::path::Path;
use std::time::Instant;

use netsim::datagen;
use netsim::mesh::{EdgeFetch, Mesh};
use netsim::procs::{metric_sum, Binaries};

const MIB: u64 = 1024 * 1024;

fn bins() -> Binaries {
    Binaries::beside_current_exe().expect("build the binaries: cargo build --release --bins")
}

fn s(x: &str) -> String {
    x.to_owned()
}

fn assert_all_ok(fetched: &[EdgeFetch]) {
    for f in fetched {
        assert!(
            f.ok,
            "{} failed: {}",
            f.edge.name,
            std::fs::read_to_string(&f.log).unwrap_or_default()
        );
    }
}

async fn stored_bytes(mesh: &Mesh) -> u64 {
    let text = mesh.origin_metrics().await.expect("origin metrics");
    metric_sum(&text, "stagecoach_bundle_stored_bytes", &[])
}

/// One run of 1 site × 8 edges with the stager's upload held to one edge link's rate.
async fn fan_out(work: &Path, tree: &Path, peers: bool, rate_mbit: u64) -> (f64, u64, u64) {
    let limit = [s("--upload-limit-mbit"), rate_mbit.to_string()];
    let mut mesh = Mesh::start(bins(), work, 1, 8, &limit).await.expect("mesh");
    let mut edge_args = limit.to_vec();
    edge_args.extend([s("--max-uploads"), s("4")]);
    mesh.start_edge_daemons(peers, &edge_args)
        .await
        .expect("edge daemons");
    let id = mesh.publish(tree, "os", "1").await.expect("publish");
    mesh.wait_preheated("site-a", std::time::Duration::from_secs(120))
        .await
        .expect("preheat");
    let started = Instant::now();
    let edges = mesh.edges.clone();
    let fetched = mesh.fetch_all(&edges, &id).await.expect("fetch");
    let elapsed = started.elapsed().as_secs_f64();
    assert_all_ok(&fetched);
    let stager_egress = mesh.lan_bytes("site-a").await.expect("stager egress");
    let (peer_bytes, _) = mesh.peer_bytes("site-a").await.expect("peer bytes");
    let bundle = stored_bytes(&mesh).await;
    eprintln!(
        "peers {}: all 8 edges in {elapsed:.2} s; stager egress {stager_egress} B ({:.2}× the bundle), peer bytes {peer_bytes} B",
        if peers { "on" } else { "off" },
        stager_egress as f64 / bundle as f64
    );
    mesh.shutdown().await;
    (elapsed, stager_egress, bundle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_take_load_off_a_slow_stager() {
    let work = tempfile::tempdir().expect("tempdir");
    let tree = work.path().join("tree");
    datagen::generate_tree(&tree, 32 * MIB, 21).expect("tree");
    // One edge link: 100 Mbit/s, for the stager and for every edge.
    let (off_s, off_egress, bundle) = fan_out(&work.path().join("off"), &tree, false, 100).await;
    let (on_s, on_egress, _) = fan_out(&work.path().join("on"), &tree, true, 100).await;
    assert!(
        off_egress as f64 >= 7.9 * bundle as f64,
        "without peers the stager serves every edge: {off_egress} B for a {bundle} B bundle"
    );
    assert!(
        on_egress as f64 <= 2.5 * bundle as f64,
        "with peers the stager sent {on_egress} B, more than 2.5 × the {bundle} B bundle"
    );
    assert!(
        off_s >= 2.5 * on_s,
        "peers on took {on_s:.2} s, peers off {off_s:.2} s: less than 2.5× sooner"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lying_edge_is_banned_and_the_others_finish() {
    let work = tempfile::tempdir().expect("tempdir");
    let tree = work.path().join("tree");
    datagen::generate_tree(&tree, 8 * MIB, 22).expect("tree");
    let mut mesh = Mesh::start(bins(), work.path(), 1, 4, &[])
        .await
        .expect("mesh");
    mesh.start_edge_daemons(true, &[]).await.expect("daemons");
    let id = mesh.publish(&tree, "os", "1").await.expect("publish");
    // The liar gets the bundle first, then serves it corrupted.
    let liar = mesh.edges[0].clone();
    let fetched = mesh
        .fetch_all(std::slice::from_ref(&liar), &id)
        .await
        .expect("liar fetch");
    assert_all_ok(&fetched);
    mesh.kill_edge(&liar.name).await.expect("kill liar");
    let index = mesh
        .edges
        .iter()
        .position(|e| e.name == liar.name)
        .expect("liar");
    mesh.edges[index]
        .daemon_args
        .push(s("--test-corrupt-serving"));
    mesh.restart_edge(&liar.name).await.expect("restart liar");
    // Give the liar's announcement time to reach the others.
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;

    let honest: Vec<_> = mesh.edges[1..].to_vec();
    let fetched = mesh.fetch_all(&honest, &id).await.expect("fetch");
    assert_all_ok(&fetched);
    let mut bans = 0;
    let mut failures = 0;
    for edge in &honest {
        let text = mesh.edge_metrics(&edge.name).await.expect("metrics");
        bans += metric_sum(
            &text,
            "stagecoach_sources_banned_total",
            &[("peer_role", "edge")],
        );
        failures += metric_sum(&text, "stagecoach_verify_failures_total", &[]);
    }
    let liar_text = mesh.edge_metrics(&liar.name).await.expect("liar metrics");
    let liar_sent = metric_sum(
        &liar_text,
        "stagecoach_bytes_sent_total",
        &[("peer_role", "edge")],
    );
    assert!(
        liar_sent > 0,
        "the liar was never asked for data, so the test proved nothing"
    );
    assert!(bans >= 1, "no edge banned the liar");
    assert!(
        failures >= bans,
        "every ban follows a verification failure ({failures} failures, {bans} bans)"
    );
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sites_keep_peer_traffic_inside_each_site() {
    let work = tempfile::tempdir().expect("tempdir");
    let tree = work.path().join("tree");
    datagen::generate_tree(&tree, 8 * MIB, 23).expect("tree");
    let mut mesh = Mesh::start(bins(), work.path(), 2, 3, &[])
        .await
        .expect("mesh");
    mesh.start_edge_daemons(true, &[]).await.expect("daemons");
    let id = mesh.publish(&tree, "os", "1").await.expect("publish");
    let edges = mesh.edges.clone();
    let fetched = mesh.fetch_all(&edges, &id).await.expect("fetch");
    assert_all_ok(&fetched);
    let bundle = stored_bytes(&mesh).await;
    for site in ["site-a", "site-b"] {
        let (_, cross) = mesh.peer_bytes(site).await.expect("peer bytes");
        assert_eq!(cross, 0, "edges of {site} sent bytes to another site");
        let wan = mesh.wan_bytes(site).await.expect("wan");
        assert!(
            (wan as f64) <= 1.05 * bundle as f64,
            "{site} pulled {wan} B over the WAN for a {bundle} B bundle"
        );
    }
    mesh.shutdown().await;
}
