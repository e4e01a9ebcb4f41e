//! A canary rollout across 2 sites × 4 edges with simulated machines (issue 7): the real
//! origin, stagers and edge daemons on loopback; `origin rollout start` swaps site-a's canary,
//! then the rest of site-a, then site-b's canary, whose health check fails. The rollout must
//! halt there, that canary must be rolled back (its machine boots the rescue OS), site-a must
//! stay on the new version, the rest of site-b must never be offered it, and `rollout status`
//! must say why.

use std::path::Path;
use std::time::Duration;

use netsim::datagen;
use netsim::machines::{self, machine_root};
use netsim::procs::Binaries;
use netsim::testbed::Testbed;
use serde_json::Value;
use stagecoach_testing::{wait_for_async, wait_until_async};

/// How often the origin is asked while waiting on it.
const POLL: Duration = Duration::from_millis(200);

const MIB: u64 = 1024 * 1024;

fn bins() -> Binaries {
    Binaries::beside_current_exe().expect("build the binaries: cargo build --release --bins")
}

/// Runs `origin ARGS --dir ORIGIN_DIR`: (success, stdout, stderr).
async fn origin(mesh: &Testbed, args: &[&str]) -> (bool, String, String) {
    let run = mesh.origin_cli(args).await.expect("run origin");
    (run.ok, run.stdout, run.stderr)
}

async fn origin_json(mesh: &Testbed, args: &[&str]) -> Value {
    mesh.origin_json(args).await.expect("origin --json")
}

fn slot_os(status: &Value, slot: &str) -> String {
    status["slots"]
        .as_array()
        .expect("slots")
        .iter()
        .find(|s| s["slot"] == slot)
        .and_then(|s| s["os"]["bundle"].as_str())
        .unwrap_or("empty")
        .to_owned()
}

fn os_tree(dir: &Path, bytes: u64, seed: u64) {
    datagen::generate_tree(dir, bytes, seed).expect("tree");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_canary_in_site_b_halts_the_rollout_and_site_a_keeps_the_new_os() {
    let work = tempfile::tempdir().expect("tempdir");
    let w = work.path();
    let mut mesh = Testbed::start(bins(), &w.join("mesh"), 2, 4, &[])
        .await
        .expect("mesh");
    os_tree(&w.join("factory"), MIB, 1);
    os_tree(&w.join("rescue"), MIB, 2);
    os_tree(&w.join("target"), 2 * MIB, 3);
    let factory = mesh
        .publish(&w.join("factory"), "factory-os", "1")
        .await
        .expect("publish factory");
    let rescue = mesh
        .publish_as(&w.join("rescue"), "rescue-os", "1", "base-os")
        .await
        .expect("publish rescue");
    let target = mesh
        .publish(&w.join("target"), "os", "2")
        .await
        .expect("publish target");
    machines::provision(&mut mesh, &factory)
        .await
        .expect("provision");

    // Every machine of site-b fails the new OS's health check, so whichever node is its canary
    // fails; site-a's pass.
    let stagers = [
        mesh.stager_addrs("site-a")[0].clone(),
        mesh.stager_addrs("site-b")[0].clone(),
    ];
    mesh.start_edge_daemons_with(false, &[], |edge| {
        let stager = if edge.site == "site-a" {
            &stagers[0]
        } else {
            &stagers[1]
        };
        let mut checks = vec![format!("reach-stager={stager}")];
        if edge.site == "site-b" {
            checks.push("command=echo service check failed >&2; false".to_owned());
        }
        machines::daemon_flags(edge, &checks)
    })
    .await
    .expect("daemons");

    // Every daemon reports its address at start; wait until the origin knows all eight.
    let with_addr = |nodes: &serde_json::Value| {
        nodes
            .as_array()
            .map(|rows| {
                rows.iter()
                    .filter(|r| r["data_addr"].as_str().is_some_and(|a| !a.is_empty()))
                    .count()
            })
            .unwrap_or(0)
    };
    let reported = wait_until_async(Duration::from_secs(60), POLL, async || {
        with_addr(&origin_json(&mesh, &["nodes", "--json"]).await) == 8
    })
    .await;
    if reported.is_err() {
        let nodes = origin_json(&mesh, &["nodes", "--json"]).await;
        panic!(
            "only {} of 8 edges reported their daemon: {nodes:#}",
            with_addr(&nodes)
        );
    }

    let started = origin_json(
        &mesh,
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
        Some(4),
        "canary + rest for each of the two sites: {started:#}"
    );
    let (ok, out, err) = origin(
        &mesh,
        &[
            "rollout",
            "start",
            "os@2",
            "--to",
            "all",
            "--rescue",
            "rescue-os@1",
        ],
    )
    .await;
    assert!(!ok && out.contains("already running"), "{out}\n{err}");

    // Wait for it to halt.
    let settled = wait_for_async(Duration::from_secs(180), POLL, async || {
        let status = origin_json(&mesh, &["rollout", "status", "--json"]).await;
        Ok::<_, std::convert::Infallible>((status["phase"]["phase"] != "running").then_some(status))
    })
    .await;
    let Ok(status) = settled else {
        let status = origin_json(&mesh, &["rollout", "status", "--json"]).await;
        panic!("the rollout did not settle: {status:#}");
    };
    let reason = &status["phase"]["reason"];
    assert_eq!(status["phase"]["phase"], "halted", "{status:#}");
    assert_eq!(reason["why"], "canary-failed", "{status:#}");
    assert_eq!(reason["site"], "site-b", "{status:#}");
    assert!(
        reason["reason"]
            .as_str()
            .is_some_and(|r| r.contains("service check failed")),
        "the status must carry the canary's own words: {status:#}"
    );
    let (ok, text, _) = origin(&mesh, &["rollout", "status"]).await;
    assert!(
        ok && text.contains("halted") && text.contains("service check failed"),
        "`rollout status` must say why it halted:\n{text}"
    );
    let canary = reason["node"].as_str().expect("canary id").to_owned();

    // Which machine is which node: the rows carry each daemon's address.
    let nodes = origin_json(&mesh, &["nodes", "--json"]).await;
    let id_of = |addr: &str| -> String {
        nodes
            .as_array()
            .expect("rows")
            .iter()
            .find(|r| r["data_addr"] == addr)
            .and_then(|r| r["id"].as_str())
            .unwrap_or_else(|| panic!("no node with address {addr}"))
            .to_owned()
    };
    let edges = mesh.edges.clone();
    let mut canary_seen = false;
    for edge in &edges {
        let id = id_of(&edge.daemon.as_ref().expect("daemon").mesh);
        let machine = machines::status(&mesh, edge).await.expect("machine status");
        if edge.site == "site-a" {
            assert_eq!(machine["booted"], "A", "{}: {machine}", edge.name);
            assert_eq!(slot_os(&machine, "A"), target, "{}: {machine}", edge.name);
            assert_eq!(slot_os(&machine, "B"), rescue, "{}: {machine}", edge.name);
        } else if id == canary {
            canary_seen = true;
            assert_eq!(
                machine["booted"], "B",
                "the failed canary must be rolled back to its rescue OS: {machine}"
            );
            assert_eq!(slot_os(&machine, "B"), rescue, "{machine}");
        } else {
            assert_eq!(
                slot_os(&machine, "A"),
                factory,
                "{} of site-b was offered the bundle after its canary failed: {machine}",
                edge.name
            );
            assert!(
                machine_root(edge).exists(),
                "{} lost its machine",
                edge.name
            );
        }
    }
    assert!(canary_seen, "the canary {canary} is not a site-b edge");
    let site_b_pending = status["waves"]
        .as_array()
        .expect("waves")
        .iter()
        .filter(|w| w["site"] == "site-b" && w["kind"] == "rest")
        .flat_map(|w| w["nodes"].as_array().cloned().unwrap_or_default())
        .all(|n| n["state"]["state"] == "pending");
    assert!(
        site_b_pending,
        "site-b's rest must stay pending: {status:#}"
    );

    // A halted rollout takes no more pause/resume, and the audit log has the start.
    let (ok, out, err) = origin(&mesh, &["rollout", "resume"]).await;
    assert!(!ok && out.contains("no longer running"), "{out}\n{err}");
    let audit = origin_json(&mesh, &["audit", "--json"]).await;
    assert!(
        audit.to_string().contains("rollout.start"),
        "the rollout's start is audited: {audit}"
    );
    mesh.shutdown().await;
}
