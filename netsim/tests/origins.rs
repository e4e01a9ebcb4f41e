//! Several origins of one mesh on a real 3-member etcd cluster (issue 14), with the real
//! binaries on loopback: a bundle published at one origin is replicated, verified, to the
//! other; a stager that knows both (`stager serve --also-origin`) finishes a bundle from the
//! second when the one it pulls from is killed mid-bundle, without pulling again what it had.
//! Each origin's link into the site is an emulated WAN. Times are printed, not asserted: they
//! are figures for the README. Skipped, counted, where etcd is not installed.

use std::time::{Duration, Instant};

use netsim::datagen;
use netsim::procs::Binaries;
use netsim::relay::{LinkShape, Relay, RelayConfig};
use netsim::testbed::Testbed;
use serde_json::Value;
use stagecoach_testing::etcd::{self, EtcdCluster};
use stagecoach_testing::wait_for_async;

const MIB: u64 = 1024 * 1024;

const SITE: &str = "site-a";

/// Each origin's WAN into the site: 200 Mbit/s, 5 ms each way (a 128 MiB bundle crosses in
/// about 5.5 s).
const WAN_MBIT: f64 = 200.0;
const WAN_LATENCY_MS: u64 = 5;

const TRANSFER_TIMEOUT: Duration = Duration::from_secs(300);
const POLL: Duration = Duration::from_millis(50);

fn bins() -> Binaries {
    Binaries::beside_current_exe().expect("build the binaries: cargo build --release --bins")
}

fn wan_to(origin: &str) -> Relay {
    Relay::start(RelayConfig::symmetric(
        "127.0.0.1:0".parse().expect("address"),
        origin.parse().expect("origin address"),
        LinkShape::wan(WAN_MBIT, WAN_LATENCY_MS, 0, 0.0),
        15,
    ))
    .expect("WAN relay")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stager_finishes_from_another_origin_when_the_one_it_pulls_from_is_killed() {
    if !stagecoach_testing::can_run(
        "a_stager_finishes_from_another_origin_when_the_one_it_pulls_from_is_killed",
        &[etcd::available()],
    ) {
        return;
    }
    let cluster = tokio::task::block_in_place(|| EtcdCluster::start(3)).expect("etcd cluster");
    let store = cluster.store_url("stagecoach");
    let work = tempfile::tempdir().expect("tempdir");
    let tree = work.path().join("tree");
    // STAGECOACH_ORIGINS_BUNDLE_MIB=1024 measures the replication of a 1 GiB bundle.
    let bundle_mib: u64 = std::env::var("STAGECOACH_ORIGINS_BUNDLE_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(128);
    datagen::generate_incompressible_tree(&tree, bundle_mib * MIB, 171).expect("tree");
    let mut mesh = Testbed::start_on_store(
        bins(),
        &work.path().join("mesh"),
        0,
        0,
        &[],
        &[],
        Some(&store),
    )
    .await
    .expect("mesh");
    let (second, second_ready) = mesh.join_origin("origin-2").await.expect("second origin");
    let wan1 = wan_to(&mesh.origin.mesh);
    let wan2 = wan_to(&second_ready.mesh);
    mesh.route_site_via(SITE, &wan1.local_addr().to_string());
    mesh.add_stager(
        SITE,
        &["--also-origin".into(), wan2.local_addr().to_string()],
    )
    .await
    .expect("stager");
    mesh.add_edge(SITE, 0).await.expect("edge");
    mesh.start_edge_daemons(false, &[])
        .await
        .expect("edge daemon");

    // Published at the first origin: `origin publish` returns once every origin up holds
    // the bundle (the second pulled it, verified).
    let publishing = Instant::now();
    let id = mesh.publish(&tree, "os", "1").await.expect("publish");
    let publish_s = publishing.elapsed().as_secs_f64();
    let run = netsim::procs::run_cli(
        &mesh.bins.path("origin"),
        &[
            "bundles".into(),
            "--json".into(),
            "--dir".into(),
            second.display().to_string(),
        ],
    )
    .await
    .expect("origin bundles");
    let list: Value = serde_json::from_str(run.stdout.trim()).expect("bundles JSON");
    assert!(
        list.as_array()
            .is_some_and(|l| l.iter().any(|b| b["id"].as_str() == Some(id.as_str()))),
        "the publish returned before the second origin held the bundle: {list:#}"
    );
    // The second origin logs how long its pull took.
    let log =
        std::fs::read_to_string(mesh.work.join("logs").join("origin-2.log")).unwrap_or_default();
    let replication_s: f64 = log
        .lines()
        .find(|l| l.contains("bundle pulled from another origin"))
        .and_then(|l| l.split("secs=").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|secs| secs.parse().ok())
        .expect("the second origin logged its pull");
    let metrics = mesh.origin_metrics().await.expect("first origin's metrics");
    let bundle = netsim::procs::metric_sum(&metrics, "stagecoach_bundle_stored_bytes", &[]);
    assert!(bundle > 0, "{metrics}");

    // The edge fetches through its stager, which pulls from the first origin; once a third
    // crossed, the first origin dies.
    let edges = mesh.edges.clone();
    let fetches = mesh.start_fetches(&edges, &id).expect("fetch");
    wait_for_async(TRANSFER_TIMEOUT, POLL, async || {
        let crossed = wan1.stats().down.forwarded_bytes;
        anyhow::Ok((crossed * 3 >= bundle).then_some(crossed))
    })
    .await
    .expect("a third of the bundle crossed the first origin's WAN");
    let at_kill = wan1.stats().down.forwarded_bytes;
    let killed = Instant::now();
    mesh.kill_origin().await.expect("kill -9 the first origin");
    assert!(
        (at_kill as f64) < 0.9 * bundle as f64,
        "the bundle had nearly crossed ({at_kill} of {bundle} B) before the origin died: the \
         test proves nothing"
    );
    let resumed = wait_for_async(TRANSFER_TIMEOUT, POLL, async || {
        anyhow::Ok((wan2.stats().down.forwarded_bytes >= MIB).then_some(()))
    })
    .await;
    let resumed_s = killed.elapsed().as_secs_f64();
    assert!(
        resumed.is_ok(),
        "the stager never pulled from the second origin"
    );
    let fetched = fetches.wait().await.expect("fetch");
    netsim::testbed::assert_all_fetched(&fetched, 1);
    let payload = mesh.wan_bytes(SITE).await.expect("stager metrics");
    let link = wan1.stats().down.forwarded_bytes + wan2.stats().down.forwarded_bytes;
    let payload_ratio = payload as f64 / bundle as f64;
    eprintln!(
        "two origins: publish of the {bundle} B bundle {publish_s:.2} s, of which the second \
         origin's verified pull {replication_s:.2} s; the first killed after {at_kill} B crossed its WAN; the stager pulled from the \
         second {resumed_s:.2} s after the kill; edge done {:.2} s after the fetch began; WAN \
         into the site {payload} B payload ({payload_ratio:.4}× the bundle), {link} B on the \
         links ({:.4}×)",
        fetched.iter().map(|f| f.done_s).fold(0.0, f64::max),
        link as f64 / bundle as f64,
    );
    if let Ok(status) = mesh.stager_status(&mesh.stagers[0].name.clone()).await {
        eprintln!("stager status:\n{}{}", status.stdout, status.stderr);
    }
    assert!(
        payload_ratio <= 1.05,
        "the site pulled {payload} B across the WANs for a {bundle} B bundle \
         ({payload_ratio:.3}×): the stager pulled again what it had from the first origin"
    );
    mesh.shutdown().await;
    wan1.shutdown();
    wan2.shutdown();
    drop(cluster);
}
