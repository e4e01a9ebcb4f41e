//! Leader-driven rollouts (issue 14): two origins share a real 3-member etcd cluster; the one
//! elected through etcd's election API drives the rollout. The rollout is started at the other
//! origin (it commits to the store; the driver takes it up), and the driving origin is killed
//! with SIGKILL in the middle of the fan-out. The other origin must be elected, resume from
//! the stored state and finish: every node swapped exactly once (its daemon counts one swap),
//! the canary first, every node healthy, and one audit log with no gap, one takeover and one
//! `healthy` step per node.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use netsim::datagen;
use netsim::machines;
use netsim::procs::{self, Binaries};
use netsim::testbed::Testbed;
use serde_json::Value;
use stagecoach_testing::etcd::{self, EtcdCluster};
use stagecoach_testing::{wait_for_async, wait_until_async};

const MIB: u64 = 1024 * 1024;
const POLL: Duration = Duration::from_millis(200);
const EDGES: usize = 6;

fn bins() -> Binaries {
    Binaries::beside_current_exe().expect("build the binaries: cargo build --release --bins")
}

/// Runs `origin ARGS --dir DIR` and returns its stdout, failing the test when it fails.
async fn origin_at(mesh: &Testbed, dir: &Path, args: &[&str]) -> String {
    mesh.origin_ok_at(dir, args).await.expect("origin")
}

async fn json_at(mesh: &Testbed, dir: &Path, args: &[&str]) -> Value {
    mesh.origin_json_at(dir, args).await.expect("origin --json")
}

/// `stagecoach_swaps_total{outcome=...}` in an edge daemon's metrics.
fn swaps(metrics: &str, outcome: &str) -> u64 {
    let key = format!("stagecoach_swaps_total{{outcome=\"{outcome}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&key))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

fn node_states(status: &Value) -> Vec<(String, String)> {
    status["waves"]
        .as_array()
        .map(|waves| {
            waves
                .iter()
                .flat_map(|w| w["nodes"].as_array().cloned().unwrap_or_default())
                .map(|n| {
                    (
                        n["node"].as_str().unwrap_or_default().to_owned(),
                        n["state"]["state"].as_str().unwrap_or_default().to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_driving_origin_mid_fan_out_hands_the_rollout_over_without_a_second_swap() {
    let test =
        "killing_the_driving_origin_mid_fan_out_hands_the_rollout_over_without_a_second_swap";
    if !stagecoach_testing::can_run(test, &[etcd::available()]) {
        return;
    }
    let cluster = tokio::task::block_in_place(|| {
        EtcdCluster::start(3).expect("start a 3-member etcd cluster")
    });
    let store = cluster.store_url("stagecoach");
    let work = tempfile::tempdir().expect("tempdir");
    let w = work.path();
    let mut mesh =
        Testbed::start_on_store(bins(), &w.join("mesh"), 1, EDGES, &[], &[], Some(&store))
            .await
            .expect("mesh");
    for (dir, bytes, seed) in [
        ("factory", MIB, 1),
        ("rescue", MIB, 2),
        ("target", 2 * MIB, 3),
    ] {
        datagen::generate_tree(&w.join(dir), bytes, seed).expect("tree");
    }
    let factory = mesh
        .publish(&w.join("factory"), "factory-os", "1")
        .await
        .expect("publish factory");
    mesh.publish_as(&w.join("rescue"), "rescue-os", "1", "base-os")
        .await
        .expect("publish rescue");
    let target = mesh
        .publish(&w.join("target"), "os", "2")
        .await
        .expect("publish target");
    machines::provision(&mut mesh, &factory)
        .await
        .expect("provision");
    // Each new OS takes ten seconds to pass its checks, so the rest of the site's wave is still
    // swapping when the next origin takes over: it must wait for those swaps, not start them.
    let stager = mesh.stager_addrs("site-a")[0].clone();
    mesh.start_edge_daemons_with(false, &[], |edge| {
        machines::daemon_flags(
            edge,
            &[
                format!("reach-stager={stager}"),
                "command=sleep 10".to_owned(),
            ],
        )
    })
    .await
    .expect("daemons");
    let (second, second_ready) = mesh
        .join_origin("origin-2")
        .await
        .expect("join a second origin");
    let first: PathBuf = mesh.origin_dir.clone();

    let reported = wait_until_async(Duration::from_secs(60), POLL, async || {
        let nodes = json_at(&mesh, &first, &["nodes", "--json"]).await;
        nodes.as_array().is_some_and(|rows| {
            rows.iter()
                .filter(|r| r["data_addr"].as_str().is_some_and(|a| !a.is_empty()))
                .count()
                == EDGES
        })
    })
    .await;
    assert!(reported.is_ok(), "not every edge reported its daemon");

    // The first origin leads the election (it campaigned first); both say so.
    let status = json_at(&mesh, &second, &["status", "--json"]).await;
    let first_id = status["origins"]
        .as_array()
        .expect("origins")
        .iter()
        .find(|o| o["mesh"] == mesh.origin.mesh.as_str())
        .and_then(|o| o["node_id"].as_str())
        .expect("the first origin is up")
        .to_owned();
    assert_eq!(
        status["rollout_driver"]["node_id"],
        first_id.as_str(),
        "{status:#}"
    );

    // Started at the second origin: the store carries it to the driver.
    let started = json_at(
        &mesh,
        &second,
        &[
            "rollout",
            "start",
            "os@2",
            "--to",
            "all",
            "--rescue",
            "rescue-os@1",
            "--json",
        ],
    )
    .await;
    assert_eq!(
        started["waves"].as_array().map(Vec::len),
        Some(2),
        "{started:#}"
    );

    // Kill the driver once the canary is healthy and the rest of the site is swapping.
    let fan_out = wait_for_async(Duration::from_secs(120), POLL, async || {
        let status = json_at(&mesh, &second, &["rollout", "status", "--json"]).await;
        let states = node_states(&status);
        let healthy = states.iter().filter(|(_, s)| s == "healthy").count();
        let offered = states.iter().filter(|(_, s)| s == "offered").count();
        Ok::<_, std::convert::Infallible>((healthy >= 1 && offered >= 2).then_some(states))
    })
    .await;
    let Ok(before) = fan_out else {
        let status = origin_at(&mesh, &second, &["rollout", "status"]).await;
        panic!("the fan-out never started:\n{status}");
    };
    mesh.kill_origin().await.expect("kill the driving origin");
    let killed = Instant::now();
    let killed_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    eprintln!("killed the driving origin with {before:?}");

    let done = wait_for_async(Duration::from_secs(240), POLL, async || {
        let status = json_at(&mesh, &second, &["rollout", "status", "--json"]).await;
        Ok::<_, std::convert::Infallible>((status["phase"]["phase"] != "running").then_some(status))
    })
    .await;
    let Ok(status) = done else {
        let status = origin_at(&mesh, &second, &["rollout", "status"]).await;
        panic!("the rollout did not finish after its driver died:\n{status}");
    };
    let finished = killed.elapsed();
    assert_eq!(status["phase"]["phase"], "done", "{status:#}");
    let states = node_states(&status);
    assert_eq!(states.len(), EDGES, "{status:#}");
    assert!(
        states.iter().all(|(_, s)| s == "healthy"),
        "every node healthy: {status:#}"
    );
    let after = json_at(&mesh, &second, &["status", "--json"]).await;
    assert_ne!(
        after["rollout_driver"]["node_id"],
        first_id.as_str(),
        "{after:#}"
    );
    // Its metrics say so, and that it lacks none of the published bundles.
    let metrics = procs::scrape(&second_ready.metrics)
        .await
        .expect("the second origin's metrics");
    for line in [
        "stagecoach_origin_drives_rollouts 1",
        "stagecoach_origin_bundles_lacking 0",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "no `{line}`:\n{metrics}"
        );
    }

    // Each machine swapped exactly once and runs the new OS.
    let edges = mesh.edges.clone();
    for edge in &edges {
        let metrics = mesh.edge_metrics(&edge.name).await.expect("edge metrics");
        assert_eq!(swaps(&metrics, "done"), 1, "{} swapped once", edge.name);
        for outcome in ["failed", "error"] {
            assert_eq!(swaps(&metrics, outcome), 0, "{}: {outcome}", edge.name);
        }
        let machine = machines::status(&mesh, edge).await.expect("machine status");
        assert_eq!(machine["booted"], "A", "{}: {machine}", edge.name);
        let os = machine["slots"]
            .as_array()
            .and_then(|slots| slots.iter().find(|s| s["slot"] == "A"))
            .and_then(|s| s["os"]["bundle"].as_str())
            .unwrap_or_default()
            .to_owned();
        assert_eq!(os, target, "{}: {machine}", edge.name);
    }

    // One audit log: no gap, no duplicate, one takeover, each node healthy once.
    let audit = json_at(&mesh, &second, &["audit", "--limit", "1000", "--json"]).await;
    let records = audit.as_array().expect("audit records");
    let seqs: Vec<u64> = records.iter().filter_map(|r| r["seq"].as_u64()).collect();
    assert_eq!(
        seqs,
        (1..=seqs.len() as u64).collect::<Vec<_>>(),
        "no gap, no duplicate"
    );
    let takeovers: Vec<&Value> = records
        .iter()
        .filter(|r| r["action"] == "rollout.takeover")
        .collect();
    assert_eq!(takeovers.len(), 1, "{records:#?}");
    for (node, _) in &states {
        let healthy = records
            .iter()
            .filter(|r| r["action"] == "rollout.step")
            .filter(|r| {
                r["detail"]
                    .as_str()
                    .is_some_and(|d| d.contains(&format!("{node} healthy")))
            })
            .count();
        assert_eq!(healthy, 1, "{node} healthy once: {records:#?}");
    }
    // The canary came first: no other node was offered before its healthy step (the driver
    // records the canary's report and the next wave's offers in one save at the earliest).
    let canary = &status["waves"][0]["nodes"][0]["node"];
    assert_eq!(status["waves"][0]["kind"], "canary", "{status:#}");
    let step_of = |needle: String| {
        records
            .iter()
            .position(|r| r["detail"].as_str().is_some_and(|d| d.contains(&needle)))
    };
    let canary_healthy = step_of(format!("{} healthy", canary.as_str().unwrap_or("?")));
    for (node, _) in states.iter().skip(1) {
        assert!(
            step_of(format!("{node} offered")) >= canary_healthy,
            "{node} offered before the canary was healthy: {records:#?}"
        );
    }
    let takeover_ms = takeovers[0]["at_ms"].as_u64().unwrap_or(0);
    let next_step_ms = records
        .iter()
        .filter(|r| r["action"] == "rollout.step")
        .filter_map(|r| r["at_ms"].as_u64())
        .find(|&at| at >= takeover_ms)
        .unwrap_or(0);
    eprintln!(
        "kill -> takeover {:.1} s, kill -> next rollout step {:.1} s, kill -> rollout done {:.1} s",
        takeover_ms.saturating_sub(killed_ms) as f64 / 1000.0,
        next_step_ms.saturating_sub(killed_ms) as f64 / 1000.0,
        finished.as_secs_f64()
    );
    mesh.shutdown().await;
    drop(cluster);
}
