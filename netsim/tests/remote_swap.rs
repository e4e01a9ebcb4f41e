//! The origin swaps the OS of edges remotely, over the mesh's mutual-TLS channel: real origin,
//! stager and edge daemons on loopback, each edge with a simulated machine (SimPlatform).

use std::path::Path;

use netsim::datagen;
use netsim::machines::{self, machine_root};
use netsim::procs::Binaries;
use netsim::testbed::Testbed;

const MIB: u64 = 1024 * 1024;

fn bins() -> Binaries {
    Binaries::beside_current_exe().expect("build the binaries: cargo build --release --bins")
}

/// A small OS tree with an identity file the swap must carry over.
fn os_tree(dir: &Path, bytes: u64, seed: u64, identity: Option<&str>) {
    datagen::generate_tree(dir, bytes, seed).expect("tree");
    if let Some(identity) = identity {
        let etc = dir.join("etc/stagecoach");
        std::fs::create_dir_all(&etc).expect("etc");
        std::fs::write(etc.join("node.conf"), identity).expect("identity");
    }
}

fn slot_os(status: &serde_json::Value, slot: &str) -> String {
    status["slots"]
        .as_array()
        .expect("slots")
        .iter()
        .find(|s| s["slot"] == slot)
        .and_then(|s| s["os"]["bundle"].as_str())
        .unwrap_or("empty")
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_origin_swaps_edges_and_a_failing_health_check_rolls_back() {
    let work = tempfile::tempdir().expect("tempdir");
    let w = work.path();
    let mut mesh = Testbed::start(bins(), &w.join("mesh"), 1, 3, &[])
        .await
        .expect("mesh");
    os_tree(
        &w.join("factory"),
        MIB,
        1,
        Some("hostname=factory\nkey=from-the-factory\n"),
    );
    os_tree(&w.join("rescue"), MIB, 2, None);
    os_tree(&w.join("target"), 4 * MIB, 3, None);
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
    // Each machine's identity differs, as real ones do.
    for (i, edge) in mesh.edges.iter().enumerate() {
        let conf = machine_root(edge).join("slots/a/etc/stagecoach/node.conf");
        std::fs::write(&conf, format!("hostname={}\nkey=secret-{i}\n", edge.name))
            .expect("write identity");
    }
    // Every edge may read encrypted bundles, so each holds a key ring in its identity
    // directory (issue 16), which the swap must leave as it was, like the identity.
    let policy = w.join("policy.toml");
    std::fs::write(&policy, "[encryption]\nread_classes = [\"swapped\"]\n").expect("policy");
    let loaded = mesh
        .origin_cli(&["policy", "load", policy.to_str().expect("utf-8")])
        .await
        .expect("policy load");
    assert!(loaded.ok, "{}\n{}", loaded.stdout, loaded.stderr);
    for edge in &mesh.edges {
        let id = proto::net::NodeIdentity::load(&edge.dir.join("identity"))
            .expect("identity")
            .node_id()
            .to_string();
        let set = mesh
            .origin_cli(&["class", "set", &id, "swapped"])
            .await
            .expect("class set");
        assert!(set.ok, "{}\n{}", set.stdout, set.stderr);
    }
    let stager = mesh.stager_addrs("site-a")[0].clone();
    let failing = mesh.edges[2].name.clone();
    mesh.start_edge_daemons_with(true, &["--keys-refresh-secs".into(), "1".into()], |edge| {
        let mut checks = vec![format!("reach-stager={stager}")];
        if edge.name == failing {
            checks.push("command=echo disk check failed >&2; false".to_owned());
        }
        machines::daemon_flags(edge, &checks)
    })
    .await
    .expect("daemons");

    let edges = mesh.edges.clone();
    let ring_path = |edge: &netsim::testbed::EdgeNode| {
        edge.dir.join("identity").join(proto::keyring::KEYRING_FILE)
    };
    let mut rings = Vec::new();
    for edge in &edges {
        let path = ring_path(edge);
        let held = stagecoach_testing::wait_until_async(
            std::time::Duration::from_secs(60),
            std::time::Duration::from_millis(200),
            async || proto::keyring::load(&path).is_ok_and(|ring| ring.len() == 1),
        )
        .await;
        assert!(held.is_ok(), "{} got no content key", edge.name);
        rings.push(std::fs::read(&path).expect("ring"));
    }
    let run = machines::swap_all(&mesh, &edges, "os@2", "rescue-os@1")
        .await
        .expect("origin swap");
    assert!(
        !run.all_done,
        "origin swap must exit non-zero when an edge rolled back:\n{}",
        run.output
    );
    assert_eq!(run.lines.len(), 3, "one line per edge:\n{}", run.output);

    for (i, edge) in edges.iter().enumerate() {
        let addr = &edge.daemon.as_ref().expect("daemon").mesh;
        let line = run
            .lines
            .iter()
            .find(|l| &l.edge == addr)
            .unwrap_or_else(|| panic!("no line for {}:\n{}", edge.name, run.output));
        let status = machines::status(&mesh, edge).await.expect("status");
        // The key ring is where it was, byte for byte, readable by its owner only.
        let path = ring_path(edge);
        assert_eq!(
            std::fs::read(&path).expect("ring after the swap"),
            rings[i],
            "{}'s key ring did not survive the swap",
            edge.name
        );
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&path).expect("stat").permissions(),
        );
        assert_eq!(mode & 0o777, 0o600, "{}", edge.name);
        let conf = std::fs::read_to_string(machine_root(edge).join(if edge.name == failing {
            "slots/b/etc/stagecoach/node.conf"
        } else {
            "slots/a/etc/stagecoach/node.conf"
        }))
        .expect("identity after the swap");
        assert_eq!(
            conf,
            format!("hostname={}\nkey=secret-{i}\n", edge.name),
            "{}'s identity was not carried over byte for byte",
            edge.name
        );
        if edge.name == failing {
            assert_eq!(line.outcome, "rolled-back", "{}", run.output);
            assert!(
                line.detail.contains("health check") && line.detail.contains("disk check failed"),
                "the report must say why: {:?}",
                line.detail
            );
            assert_eq!(status["booted"], "B", "{status}");
            assert_eq!(slot_os(&status, "B"), rescue, "{status}");
        } else {
            assert_eq!(line.outcome, "done", "{}", run.output);
            assert_eq!(status["booted"], "A", "{status}");
            assert_eq!(slot_os(&status, "A"), target, "{status}");
            assert_eq!(slot_os(&status, "B"), rescue, "{status}");
            assert_eq!(status["swap"]["Ok"]["step"], "done", "{status}");
        }
    }
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_without_a_machine_refuses_and_says_why() {
    let work = tempfile::tempdir().expect("tempdir");
    let w = work.path();
    let mut mesh = Testbed::start(bins(), &w.join("mesh"), 1, 1, &[])
        .await
        .expect("mesh");
    os_tree(&w.join("os"), MIB, 4, None);
    mesh.publish(&w.join("os"), "os", "1")
        .await
        .expect("publish");
    mesh.start_edge_daemons(false, &[]).await.expect("daemon");
    let edges = mesh.edges.clone();
    let run = machines::swap_all(&mesh, &edges, "os@1", "os@1")
        .await
        .expect("origin swap");
    assert!(!run.all_done, "{}", run.output);
    assert!(
        run.output.contains("no machine configured"),
        "the refusal must say why:\n{}",
        run.output
    );
    mesh.shutdown().await;
}

#[test]
fn the_demo_ends_with_every_edge_on_the_new_os() {
    let work = tempfile::tempdir().expect("tempdir");
    let output = std::process::Command::new(bins().path("netsim"))
        .args(["demo", "--json", "--swap", "--bundle-mib", "8"])
        .args(["--sites", "2", "--edges", "2"])
        .arg("--work-dir")
        .arg(work.path().join("demo"))
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run netsim demo");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "netsim demo --swap failed:\n{stderr}"
    );
    let result: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("the demo prints JSON");
    let swap = &result["swap"];
    assert_eq!(swap["edges"], 4, "{result}");
    assert_eq!(swap["done"], 4, "{result}");
    // Every machine now runs the demo bundle from slot A.
    let bundle = result["bundle_id"].as_str().expect("bundle id");
    let mut machines = 0;
    for entry in std::fs::read_dir(work.path().join("demo")).expect("work dir") {
        let marker = entry
            .expect("entry")
            .path()
            .join("machine/slots/a/.stagecoach-slot.json");
        if let Ok(text) = std::fs::read_to_string(&marker) {
            assert!(text.contains(bundle), "{}: {text}", marker.display());
            machines += 1;
        }
    }
    assert_eq!(machines, 4, "every edge has a machine on the new OS");
}
