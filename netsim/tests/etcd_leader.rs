//! The origin's store on a real 3-member etcd cluster loses its leader (issue 14): the etcd
//! member that leads is killed with SIGKILL while the origin takes publishes (`origin publish`,
//! one after another) and inventory reports (two edges, each reporting in a loop), and comes
//! back later. Every publish must either complete or fail with a clear error; none may be
//! half-recorded (listed without its package record and audit record, or the other way
//! round); and nothing acknowledged may be lost: every publish that succeeded is listed and
//! audited, and each node's record counts at least the reports the origin acknowledged.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use netsim::datagen;
use netsim::procs::Binaries;
use netsim::testbed::Testbed;
use proto::inventory::Inventory;
use proto::wire::{NodeReport, ReportEvent, Request, Response};
use serde_json::Value;
use stagecoach_testing::etcd::{self, EtcdCluster};
use stagecoach_testing::wait_until_async;

fn bins() -> Binaries {
    Binaries::beside_current_exe().expect("build the binaries: cargo build --release --bins")
}

/// The index (in `cluster.endpoints()`) of the member `origin status` names as etcd's leader.
async fn etcd_leader(mesh: &Testbed, cluster: &EtcdCluster) -> Option<usize> {
    let status = mesh.origin_json(&["status", "--json"]).await.ok()?;
    let line = status["members"]
        .as_array()?
        .iter()
        .filter_map(Value::as_str)
        .find(|m| m.contains(": up, leader"))?
        .to_owned();
    cluster
        .endpoints()
        .iter()
        .position(|e| line.starts_with(&format!("http://{e}")) || line.starts_with(e.as_str()))
}

/// A 3-member etcd cluster, and a testbed of one site and two edges whose origin keeps its
/// store there; `None` (a counted skip) where etcd is not installed.
async fn start(test: &str) -> Option<(EtcdCluster, tempfile::TempDir, Testbed)> {
    if !stagecoach_testing::can_run(test, &[etcd::available()]) {
        return None;
    }
    let cluster = tokio::task::block_in_place(|| {
        EtcdCluster::start(3).expect("start a 3-member etcd cluster")
    });
    let store = cluster.store_url("stagecoach");
    let work = tempfile::tempdir().expect("tempdir");
    let mesh = Testbed::start_on_store(
        bins(),
        &work.path().join("mesh"),
        1,
        2,
        &[],
        &[],
        Some(&store),
    )
    .await
    .expect("mesh");
    Some((cluster, work, mesh))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_etcd_leader_loses_no_acknowledged_publish_or_report() {
    let Some((mut cluster, work, mut mesh)) =
        start("killing_the_etcd_leader_loses_no_acknowledged_publish_or_report").await
    else {
        return;
    };
    let w = work.path();

    // Two edges report in a loop, each counting the reports the origin acknowledged.
    let before = mesh.origin_json(&["nodes", "--json"]).await.expect("nodes");
    let counted_before = |node_id: &str| {
        before
            .as_array()
            .and_then(|rows| rows.iter().find(|r| r["id"] == node_id))
            .and_then(|r| r["reports"].as_u64())
            .unwrap_or(0)
    };
    let stop = Arc::new(AtomicBool::new(false));
    let mut reporters = Vec::new();
    for edge in mesh.edges.clone() {
        let client = mesh.edge_client(&edge.name).expect("edge client");
        let node_id = client.identity.node_id().to_string();
        let origin = mesh.origin.mesh.clone();
        let stop = stop.clone();
        reporters.push(tokio::spawn(async move {
            let (mut acked, mut refused, mut sent) = (0u64, Vec::<String>::new(), 0u64);
            while !stop.load(Ordering::Relaxed) {
                let report = Request::ReportNode {
                    report: NodeReport {
                        event: ReportEvent::Updated,
                        inventory: Inventory::default(),
                        installed: Vec::new(),
                        held: Vec::new(),
                        data_addr: String::new(),
                    },
                    negotiate: false,
                };
                sent += 1;
                match client.call(&origin, &report).await {
                    Ok(Response::Ok) => acked += 1,
                    Ok(Response::Error { message, .. }) => refused.push(message),
                    Ok(other) => panic!("unexpected answer to a report: {other:?}"),
                    Err(error) => refused.push(format!("{error:#}")),
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            (node_id, acked, sent, refused)
        }));
    }

    // Publishes one after another; the etcd leader is killed after the third and brought back
    // ten seconds later; three more publishes after that.
    let mut published = Vec::new();
    let mut failed = Vec::new();
    let mut killed: Option<(usize, Instant)> = None;
    let mut restarted_at: Option<usize> = None;
    for version in 1..=60u64 {
        let tree = w.join(format!("tree-{version}"));
        datagen::generate_tree(&tree, 64 * 1024, version).expect("tree");
        let v = version.to_string();
        match mesh.publish(&tree, "app", &v).await {
            Ok(_) => published.push(v),
            Err(error) => {
                let message = format!("{error:#}");
                assert!(
                    message.contains("etcd") || message.contains("package table"),
                    "a failed publish says why: {message}"
                );
                failed.push((v, message));
            }
        }
        if version == 3 {
            let leader = etcd_leader(&mesh, &cluster).await.expect("an etcd leader");
            tokio::task::block_in_place(|| cluster.kill(leader)).expect("kill the etcd leader");
            eprintln!("killed etcd member {leader} (the leader) after publish 3");
            killed = Some((leader, Instant::now()));
        }
        match (killed, restarted_at) {
            (Some((member, at)), None) if at.elapsed() > Duration::from_secs(10) => {
                tokio::task::block_in_place(|| cluster.restart(member))
                    .expect("restart the member");
                eprintln!("restarted etcd member {member} after publish {version}");
                restarted_at = Some(published.len() + failed.len());
            }
            (_, Some(then)) if published.len() + failed.len() >= then + 3 => break,
            _ => {}
        }
    }
    assert!(restarted_at.is_some(), "the member was never brought back");
    stop.store(true, Ordering::Relaxed);
    let mut reports = Vec::new();
    for reporter in reporters {
        reports.push(reporter.await.expect("reporter"));
    }
    eprintln!(
        "{} publishes completed, {} failed: {failed:?}",
        published.len(),
        failed.len()
    );
    assert!(published.len() >= 6, "most publishes complete: {failed:?}");

    // A write that timed out may still commit; the origin lists such a bundle from its own
    // store within a replication round. Wait for the listing and the records to agree.
    let listed = async || -> Vec<String> {
        let bundles = mesh
            .origin_json(&["bundles", "--json"])
            .await
            .expect("bundles");
        let mut versions: Vec<String> = bundles
            .as_array()
            .expect("bundle list")
            .iter()
            .filter(|b| b["name"] == "app")
            .filter_map(|b| b["version"].as_str().map(str::to_owned))
            .collect();
        versions.sort();
        versions
    };
    let audited = async || -> Vec<String> {
        let audit = mesh
            .origin_json(&["audit", "--limit", "10000", "--json"])
            .await
            .expect("audit");
        let mut versions: Vec<String> = audit
            .as_array()
            .expect("audit records")
            .iter()
            .filter(|r| r["action"] == "package.publish")
            .filter_map(|r| r["detail"].as_str())
            .filter_map(|d| d.split_whitespace().find_map(|w| w.strip_prefix("app@")))
            .map(|v| v.trim_end_matches([',', ':', ';']).to_owned())
            .collect();
        versions.sort();
        versions
    };
    let agree = wait_until_async(
        Duration::from_secs(20),
        Duration::from_millis(500),
        async || listed().await == audited().await,
    )
    .await;
    let (listed, audited) = (listed().await, audited().await);
    assert!(
        agree.is_ok(),
        "listed {listed:?} but audited {audited:?}: a half-recorded publish"
    );
    for v in &published {
        assert!(
            listed.contains(v),
            "acknowledged publish app@{v} lost: {listed:?}"
        );
    }
    let mut once = audited.clone();
    once.dedup();
    assert_eq!(once, audited, "a publish audited twice");

    // Every acknowledged report is counted.
    let nodes = mesh.origin_json(&["nodes", "--json"]).await.expect("nodes");
    for (node_id, acked, sent, refused) in &reports {
        let counted = nodes
            .as_array()
            .expect("rows")
            .iter()
            .find(|r| r["id"] == node_id.as_str())
            .and_then(|r| r["reports"].as_u64())
            .unwrap_or(0)
            - counted_before(node_id);
        eprintln!(
            "{node_id}: {sent} reports sent, {acked} acknowledged, {counted} counted, {} refused",
            refused.len()
        );
        assert!(*acked > 0, "{node_id}: no report acknowledged");
        assert!(
            counted >= *acked,
            "{node_id}: {acked} reports acknowledged but {counted} counted"
        );
        assert!(
            counted <= *sent,
            "{node_id}: {counted} counted of {sent} sent"
        );
    }
    let audit = mesh
        .origin_json(&["audit", "--limit", "10000", "--json"])
        .await
        .expect("audit");
    let seqs: Vec<u64> = audit
        .as_array()
        .expect("records")
        .iter()
        .filter_map(|r| r["seq"].as_u64())
        .collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>(), "no gap");
    mesh.shutdown().await;
    drop(cluster);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_quorum_the_origin_refuses_changes_but_serves_bundles_and_recovers() {
    let Some((mut cluster, work, mut mesh)) =
        start("without_quorum_the_origin_refuses_changes_but_serves_bundles_and_recovers").await
    else {
        return;
    };
    let w = work.path();
    datagen::generate_tree(&w.join("os"), 4 * 1024 * 1024, 7).expect("tree");
    let bundle = mesh
        .publish(&w.join("os"), "os", "1")
        .await
        .expect("publish");
    let nodes = mesh.origin_json(&["nodes", "--json"]).await.expect("nodes");
    let node = nodes[0]["id"].as_str().expect("a node").to_owned();

    tokio::task::block_in_place(|| {
        cluster.kill(1)?;
        cluster.kill(2)
    })
    .expect("kill two members");
    // A change is refused, clearly.
    let refused = mesh
        .origin_cli(&["class", "set", &node, "web"])
        .await
        .expect("run origin");
    assert!(!refused.ok, "a change without quorum: {}", refused.stdout);
    let said = format!("{}{}", refused.stdout, refused.stderr);
    assert!(
        said.contains("no leader") || said.contains("quorum"),
        "the refusal says why: {said}"
    );
    // The stager (cold) pulls the bundle from the origin and the edges get it.
    let edges = mesh.edges.clone();
    let fetched = mesh.fetch_all(&edges, &bundle).await.expect("fetch");
    assert!(
        fetched.iter().all(|f| f.ok),
        "edges fetch while the store has no quorum: {fetched:?}"
    );

    // The members return: the change goes through without a restart of the origin.
    tokio::task::block_in_place(|| {
        cluster.restart(1)?;
        cluster.restart(2)
    })
    .expect("restart the members");
    let accepted = wait_until_async(
        Duration::from_secs(30),
        Duration::from_millis(500),
        async || {
            mesh.origin_cli(&["class", "set", &node, "web"])
                .await
                .is_ok_and(|run| run.ok)
        },
    )
    .await;
    assert!(
        accepted.is_ok(),
        "changes accepted again once the members are back"
    );
    mesh.shutdown().await;
    drop(cluster);
}
