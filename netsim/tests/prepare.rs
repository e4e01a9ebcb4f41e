//! `origin prepare` (issue 17) with the real binaries on loopback: 2 sites × 2 edges, each with
//! a simulated machine. One edge's daemon is down while the target OS and the rescue OS are
//! prepared to every node; the other three prepare at once, that one stays pending and
//! prepares when its daemon comes back (its store then holds the bundle whole and pinned, and
//! its keep-set names it). A rollout of the prepared bundle then fetches 0 bytes on every
//! node, counted from the edges' metrics endpoints: it only validates and swaps. So does the
//! boot-time negotiation of another prepared bundle. The operations survive a restart of the
//! origin.
//!
//! The target OS is `STAGECOACH_PREPARE_MIB` MiB (default [`DEFAULT_TARGET_MIB`]); the issue's
//! 256 MiB case is the same test with `STAGECOACH_PREPARE_MIB=256` (see the README).

use std::path::Path;
use std::time::{Duration, Instant};

use netsim::datagen;
use netsim::machines;
use netsim::procs::{metric_sum, Binaries};
use netsim::testbed::Testbed;
use serde_json::Value;
use stagecoach_testing::{wait_for_async, wait_until_async};

/// How often the origin is asked while waiting on it.
const POLL: Duration = Duration::from_millis(200);

const MIB: u64 = 1024 * 1024;

/// Size of the target OS tree when `STAGECOACH_PREPARE_MIB` is not set, in MiB.
const DEFAULT_TARGET_MIB: u64 = 24;

/// The edges' counter of bytes received for fetched bundles (`edge_agent::daemon::FETCH_BYTES`).
const FETCH_BYTES: &str = "stagecoach_fetch_bytes_total";

/// The edges' counter of blob bytes received from any source (stager, peer, origin).
const BYTES_RECEIVED: &str = "stagecoach_bytes_received_total";

fn bins() -> Binaries {
    Binaries::beside_current_exe().expect("build the binaries: cargo build --release --bins")
}

fn target_mib() -> u64 {
    std::env::var("STAGECOACH_PREPARE_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_TARGET_MIB)
}

async fn origin(mesh: &Testbed, args: &[&str]) -> (bool, String, String) {
    let run = mesh.origin_cli(args).await.expect("run origin");
    (run.ok, run.stdout, run.stderr)
}

async fn origin_json(mesh: &Testbed, args: &[&str]) -> Value {
    mesh.origin_json(args).await.expect("origin --json")
}

/// The node id of edge `name` (its daemon's address is in the node table).
fn node_id(nodes: &Value, addr: &str) -> String {
    nodes
        .as_array()
        .expect("rows")
        .iter()
        .find(|r| r["data_addr"] == addr)
        .and_then(|r| r["id"].as_str())
        .unwrap_or_else(|| panic!("no node with address {addr}: {nodes:#}"))
        .to_owned()
}

fn state_of<'a>(status: &'a Value, node: &str) -> &'a str {
    status["operation"]["nodes"][node]["state"]
        .as_str()
        .unwrap_or("missing")
}

/// Whether edge `name`'s keep-set, as the origin answers it, names `bundle`.
async fn keeps(mesh: &Testbed, name: &str, bundle: &proto::BundleId) -> bool {
    let client = mesh.edge_client(name).expect("edge client");
    match client
        .call(&mesh.origin.mesh, &proto::wire::Request::KeepSet)
        .await
        .expect("keep-set")
    {
        proto::wire::Response::KeepSet(keep) => keep.bundles.contains(bundle),
        other => panic!("no keep-set: {other:?}"),
    }
}

/// Asserts the store under `edge_dir` holds bundle `id` whole, with its pin.
fn assert_held_and_pinned(edge_dir: &Path, id: &str) {
    let store = proto::store::Store::open(edge_dir.join("store"), Default::default())
        .expect("open the edge's store");
    let bundle: proto::BundleId = id.parse().expect("bundle id");
    let signed = store
        .get_manifest(&bundle)
        .expect("read the manifest")
        .unwrap_or_else(|| panic!("{} holds no manifest of {id}", edge_dir.display()));
    let manifest = signed.verify_as(bundle, &[]).expect("manifest");
    assert!(
        proto::bundles::has_all_chunks(&store, &manifest),
        "{} does not hold every chunk of {id}",
        edge_dir.display()
    );
    let tag = proto::bundles::pin_tag(&bundle);
    for chunk in &manifest.chunks {
        assert!(
            store.pins(&chunk.hash).contains(&tag),
            "chunk {} of {id} is not pinned in {}",
            chunk.hash,
            edge_dir.display()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_nodes_swap_without_fetching_and_an_offline_node_prepares_when_back() {
    let work = tempfile::tempdir().expect("tempdir");
    let w = work.path();
    let mut mesh = Testbed::start(bins(), &w.join("mesh"), 2, 2, &[])
        .await
        .expect("mesh");
    let base = machines::prepare(&mut mesh, w, 17)
        .await
        .expect("base images");
    let mib = target_mib();
    datagen::generate_tree(&w.join("target"), mib * MIB, 3).expect("tree");
    let target = mesh
        .publish(&w.join("target"), "os", "2")
        .await
        .expect("publish target");

    let stagers = [
        mesh.stager_addrs("site-a")[0].clone(),
        mesh.stager_addrs("site-b")[0].clone(),
    ];
    mesh.start_edge_daemons_with(true, &[], |edge| {
        let stager = if edge.site == "site-a" {
            &stagers[0]
        } else {
            &stagers[1]
        };
        machines::daemon_flags(edge, &[format!("reach-stager={stager}")])
    })
    .await
    .expect("daemons");
    let reported = wait_until_async(Duration::from_secs(60), POLL, async || {
        let nodes = origin_json(&mesh, &["nodes", "--json"]).await;
        nodes.as_array().is_some_and(|rows| {
            rows.iter()
                .filter(|r| r["data_addr"].as_str().is_some_and(|a| !a.is_empty()))
                .count()
                == 4
        })
    })
    .await;
    assert!(reported.is_ok(), "not every daemon reported its address");
    let nodes = origin_json(&mesh, &["nodes", "--json"]).await;
    let edges = mesh.edges.clone();
    let ids: Vec<String> = edges
        .iter()
        .map(|e| node_id(&nodes, &e.daemon.as_ref().expect("daemon").mesh))
        .collect();

    // Bad input gets a clear error and starts nothing.
    for (args, expected) in [
        (
            vec!["prepare", "no-such-os@9", "--to", "all"],
            "no published bundle",
        ),
        (
            vec!["prepare", "os@2", "--to", "site=nowhere"],
            "matches none",
        ),
        (
            vec!["prepare", "os@2", "--to", "colour=red"],
            "unknown selector key",
        ),
        (vec!["prepare", "os@2"], "--to"),
        (vec!["prepare", "status", "99"], "no prepare operation 99"),
        (vec!["prepare", "status"], "no prepare operation"),
    ] {
        let (ok, out, err) = origin(&mesh, &args).await;
        assert!(
            !ok && format!("{out}{err}").contains(expected),
            "origin {args:?} must fail saying {expected:?}:\n{out}\n{err}"
        );
    }

    // The second edge of site-b is down during the prepare.
    let offline = edges
        .iter()
        .rposition(|e| e.site == "site-b")
        .expect("an edge of site-b");
    let offline_name = edges[offline].name.clone();
    let offline_id = ids[offline].clone();
    mesh.kill_edge(&offline_name).await.expect("kill edge");

    let started = Instant::now();
    let prepared = origin_json(
        &mesh,
        &["prepare", "os@2", "--to", "all", "--wait", "--json"],
    )
    .await;
    let prepare_s = started.elapsed().as_secs_f64();
    let rescue = origin_json(
        &mesh,
        &["prepare", "rescue-os@1", "--to", "all", "--wait", "--json"],
    )
    .await;
    for status in [&prepared, &rescue] {
        assert_eq!(status["settled"], true, "{status:#}");
        for (index, id) in ids.iter().enumerate() {
            let expected = if index == offline {
                "pending"
            } else {
                "prepared"
            };
            assert_eq!(state_of(status, id), expected, "{id}: {status:#}");
        }
        let detail = status["operation"]["nodes"][&offline_id]["detail"]
            .as_str()
            .unwrap_or("");
        assert!(detail.contains("offline"), "{detail}");
        assert_eq!(status["sites"]["site-a"]["prepared"], 2, "{status:#}");
        assert_eq!(status["sites"]["site-b"]["pending"], 1, "{status:#}");
    }
    let prepare_id = prepared["operation"]["id"]
        .as_u64()
        .expect("id")
        .to_string();
    let (ok, text, _) = origin(&mesh, &["prepare", "status", &prepare_id]).await;
    assert!(
        ok && text.contains("site-a") && text.contains("pending") && text.contains("prepared"),
        "`prepare status` must show the sites and nodes:\n{text}"
    );
    let received: u64 = {
        let mut total = 0;
        for (index, edge) in edges.iter().enumerate() {
            if index != offline {
                let text = mesh.edge_metrics(&edge.name).await.expect("metrics");
                total += metric_sum(&text, FETCH_BYTES, &[]);
            }
        }
        total
    };
    assert!(received > 0, "the online nodes fetched nothing to prepare");

    // The offline edge comes back: it reports, and the origin asks it to prepare both.
    let back = Instant::now();
    mesh.restart_edge(&offline_name)
        .await
        .expect("restart edge");
    let caught_up = wait_until_async(Duration::from_secs(120), POLL, async || {
        let a = origin_json(&mesh, &["prepare", "status", &prepare_id, "--json"]).await;
        let b = origin_json(&mesh, &["prepare", "status", "--json"]).await;
        state_of(&a, &offline_id) == "prepared" && state_of(&b, &offline_id) == "prepared"
    })
    .await;
    if caught_up.is_err() {
        let a = origin_json(&mesh, &["prepare", "status", &prepare_id, "--json"]).await;
        panic!("the edge that came back did not prepare: {a:#}");
    }
    println!(
        "{offline_name} prepared both bundles {:.1} s after its daemon came back",
        back.elapsed().as_secs_f64()
    );
    // Its keep-set names the prepared bundles, so retention never evicts them.
    let client = mesh.edge_client(&offline_name).expect("edge client");
    let keep = client
        .call(&mesh.origin.mesh, &proto::wire::Request::KeepSet)
        .await
        .expect("keep-set");
    let proto::wire::Response::KeepSet(keep) = keep else {
        panic!("no keep-set: {keep:?}");
    };
    for id in [&target, &base.rescue] {
        let id: proto::BundleId = id.parse().expect("id");
        assert!(keep.bundles.contains(&id), "{id} is not kept: {keep:?}");
    }
    // Its store holds the target whole and pinned (looked at with the daemon down).
    mesh.kill_edge(&offline_name).await.expect("kill edge");
    assert_held_and_pinned(&edges[offline].dir, &target);
    // Back on the same address: the rollout finds it where it last reported.
    mesh.restart_edge(&offline_name)
        .await
        .expect("restart edge");

    // The rollout of the prepared bundle fetches nothing on any node.
    let mut before = Vec::new();
    for edge in &edges {
        let text = mesh.edge_metrics(&edge.name).await.expect("metrics");
        before.push((
            metric_sum(&text, FETCH_BYTES, &[]),
            metric_sum(&text, BYTES_RECEIVED, &[]),
            metric_sum(&text, "stagecoach_fetches_total", &[("held", "whole")]),
        ));
    }
    let started = Instant::now();
    origin_json(
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
    let settled = wait_for_async(Duration::from_secs(180), POLL, async || {
        let status = origin_json(&mesh, &["rollout", "status", "--json"]).await;
        Ok::<_, std::convert::Infallible>((status["phase"]["phase"] != "running").then_some(status))
    })
    .await;
    let Ok(status) = settled else {
        panic!("the rollout did not settle");
    };
    let rollout_s = started.elapsed().as_secs_f64();
    assert_eq!(status["phase"]["phase"], "done", "{status:#}");
    let mut fetched_during_rollout = 0;
    for (edge, (fetch_before, received_before, whole_before)) in edges.iter().zip(&before) {
        let text = mesh.edge_metrics(&edge.name).await.expect("metrics");
        let fetch = metric_sum(&text, FETCH_BYTES, &[]) - fetch_before;
        let received = metric_sum(&text, BYTES_RECEIVED, &[]) - received_before;
        let whole =
            metric_sum(&text, "stagecoach_fetches_total", &[("held", "whole")]) - whole_before;
        println!(
            "{}: rollout fetched {fetch} bytes ({received} blob bytes received), {whole} bundles already whole",
            edge.name
        );
        assert_eq!(
            fetch, 0,
            "{} fetched bytes for a prepared bundle",
            edge.name
        );
        assert_eq!(
            received, 0,
            "{} received blob bytes during the rollout",
            edge.name
        );
        assert!(
            whole >= 2,
            "{}: the swap's two bundles were not fetched from the store",
            edge.name
        );
        fetched_during_rollout += fetch;
        let machine = machines::status(&mesh, edge).await.expect("machine");
        assert_eq!(machine["booted"], "A", "{}: {machine}", edge.name);
    }

    // Boot-time negotiation of a prepared bundle receives nothing either: os@3 is prepared to
    // every node, then the policy names it for one node's class, which negotiates at its start.
    datagen::generate_tree(&w.join("next"), 2 * MIB, 5).expect("tree");
    mesh.publish(&w.join("next"), "os", "3")
        .await
        .expect("publish os@3");
    let next = origin_json(
        &mesh,
        &["prepare", "os@3", "--to", "all", "--wait", "--json"],
    )
    .await;
    assert_eq!(next["sites"]["site-a"]["prepared"], 2, "{next:#}");
    assert_eq!(next["sites"]["site-b"]["prepared"], 2, "{next:#}");
    let booting = edges[0].clone();
    mesh.set_class(&booting, "next").await.expect("class");
    let policy = w.join("next.toml");
    std::fs::write(
        &policy,
        "[[rule]]\nid = \"next\"\nclass = \"next\"\nbundles = [\"os@3\"]\n",
    )
    .expect("policy");
    mesh.origin_ok(&["policy", "load", policy.to_str().expect("utf-8")])
        .await
        .expect("policy load");
    mesh.kill_edge(&booting.name).await.expect("kill edge");
    mesh.restart_edge(&booting.name)
        .await
        .expect("restart edge");
    let negotiated = wait_for_async(Duration::from_secs(60), POLL, async || {
        let text = mesh.edge_metrics(&booting.name).await.expect("metrics");
        let fetched = metric_sum(
            &text,
            "stagecoach_negotiations_total",
            &[("answer", "fetched")],
        );
        Ok::<_, std::convert::Infallible>((fetched > 0).then_some(text))
    })
    .await;
    let Ok(text) = negotiated else {
        panic!("{} did not negotiate os@3 at its start", booting.name);
    };
    assert_eq!(
        metric_sum(&text, "stagecoach_negotiation_bundles_fetched_total", &[]),
        1,
        "{text}"
    );
    let negotiation_bytes = metric_sum(&text, "stagecoach_negotiation_bytes_total", &[]);
    assert_eq!(negotiation_bytes, 0, "{text}");
    assert_eq!(metric_sum(&text, FETCH_BYTES, &[]), 0, "{text}");
    assert_eq!(metric_sum(&text, BYTES_RECEIVED, &[]), 0, "{text}");
    println!(
        "{}: boot-time negotiation of the prepared os@3 fetched {negotiation_bytes} bytes",
        booting.name
    );

    // Cancel: a small bundle is prepared to every node while one edge is down; the three
    // others prepare and keep it. Cancelling the operation releases it from their keep-sets,
    // and the edge that comes back is not asked any more.
    datagen::generate_tree(&w.join("tools"), 256 * 1024, 9).expect("tree");
    let tools: proto::BundleId = mesh
        .publish(&w.join("tools"), "tools", "1")
        .await
        .expect("publish tools")
        .parse()
        .expect("id");
    let down = 0;
    let down_name = edges[down].name.clone();
    mesh.kill_edge(&down_name).await.expect("kill edge");
    let started = origin_json(&mesh, &["prepare", "tools@1", "--to", "all", "--json"]).await;
    let cancel_id = started["operation"]["id"].as_u64().expect("id").to_string();
    let others: Vec<usize> = (0..ids.len()).filter(|i| *i != down).collect();
    wait_until_async(Duration::from_secs(60), POLL, async || {
        let status = origin_json(&mesh, &["prepare", "status", &cancel_id, "--json"]).await;
        others
            .iter()
            .all(|i| state_of(&status, &ids[*i]) == "prepared")
    })
    .await
    .expect("the online nodes prepare tools@1");
    assert!(
        keeps(&mesh, &edges[others[0]].name, &tools).await,
        "a prepared node keeps tools@1"
    );
    let cancelled = origin_json(&mesh, &["prepare", "cancel", &cancel_id, "--json"]).await;
    assert_eq!(
        state_of(&cancelled, &ids[down]),
        "cancelled",
        "{cancelled:#}"
    );
    assert_eq!(cancelled["settled"], true, "{cancelled:#}");
    assert!(
        cancelled["operation"]["cancelled"]["actor"].is_string(),
        "{cancelled:#}"
    );
    for i in &others {
        assert_eq!(state_of(&cancelled, &ids[*i]), "prepared", "{cancelled:#}");
    }
    assert!(
        !keeps(&mesh, &edges[others[0]].name, &tools).await,
        "a cancelled operation keeps nothing"
    );
    for (args, expected) in [
        (
            vec!["prepare", "cancel", cancel_id.as_str()],
            "cancelled already",
        ),
        (vec!["prepare", "cancel", "999"], "no prepare operation 999"),
    ] {
        let (ok, out, err) = origin(&mesh, &args).await;
        assert!(
            !ok && format!("{out}{err}").contains(expected),
            "origin {args:?} must fail saying {expected:?}:\n{out}\n{err}"
        );
    }
    let reported_before = |nodes: &Value| {
        nodes
            .as_array()
            .and_then(|rows| rows.iter().find(|r| r["id"] == ids[down].as_str()))
            .and_then(|r| r["reports"].as_u64())
            .unwrap_or(0)
    };
    let reports = reported_before(&origin_json(&mesh, &["nodes", "--json"]).await);
    mesh.restart_edge(&down_name).await.expect("restart edge");
    wait_until_async(Duration::from_secs(60), POLL, async || {
        reported_before(&origin_json(&mesh, &["nodes", "--json"]).await) > reports
    })
    .await
    .expect("the edge that came back reports");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after_back = origin_json(&mesh, &["prepare", "status", &cancel_id, "--json"]).await;
    assert_eq!(
        after_back["operation"], cancelled["operation"],
        "the edge that came back was asked for a cancelled operation"
    );
    assert!(
        !keeps(&mesh, &down_name, &tools).await,
        "the cancelled bundle is not kept"
    );

    // The operations are in the origin's database: a restart of the origin keeps them.
    let before_restart = origin_json(&mesh, &["prepare", "status", &prepare_id, "--json"]).await;
    mesh.kill_origin().await.expect("kill origin");
    mesh.restart_origin().await.expect("restart origin");
    let after = origin_json(&mesh, &["prepare", "status", &prepare_id, "--json"]).await;
    assert_eq!(
        after["operation"], before_restart["operation"],
        "the operation changed across the origin's restart"
    );
    for id in &ids {
        assert_eq!(state_of(&after, id), "prepared", "{id}: {after:#}");
    }

    println!(
        "prepare of a {mib} MiB OS to 3 online nodes of 2 sites: {received} bytes fetched, `--wait` returned after {prepare_s:.1} s (after the offline node's connection attempt timed out); rollout to 4 nodes: {rollout_s:.1} s, {fetched_during_rollout} bytes fetched"
    );
    mesh.shutdown().await;
}
