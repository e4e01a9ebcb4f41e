//! The mesh with real processes on loopback: origin, stagers and edges as separate binaries.

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use netsim::datagen;
use netsim::procs::{metric_sum, Binaries};
use netsim::testbed::Testbed;
use proto::net::{call, client_endpoint, connect, NodeIdentity};
use proto::pack::{pack_path, MemChunks, PackOptions};
use proto::wire::{ErrorCode, Request, Response, MAX_FRAME_BYTES};
use proto::BundleKind;
use stagecoach_testing::wait_for_async;

const MIB: u64 = 1024 * 1024;

fn bins() -> Binaries {
    Binaries::beside_current_exe().expect("build the binaries: cargo build --release --bins")
}

fn origin_sent_to_site(text: &str, site: &str) -> u64 {
    metric_sum(
        text,
        "stagecoach_bytes_sent_total",
        &[("peer_role", "stager"), ("peer_site", site)],
    )
}

fn stored_bytes_of(text: &str) -> u64 {
    metric_sum(text, "stagecoach_bundle_stored_bytes", &[])
}

/// Chunk hashes and stored sizes of `tree` as the origin would pack it.
fn chunks_of(tree: &Path) -> Vec<(proto::BlobHash, u64)> {
    let key = proto::manifest::generate_signing_key();
    let mut sink = MemChunks::new();
    let packed = pack_path(
        tree,
        &PackOptions::new("x", "1", BundleKind::OsImage),
        &key,
        &mut sink,
        &mut |_| {},
    )
    .expect("pack");
    packed
        .manifest
        .chunks
        .iter()
        .map(|c| (c.hash, c.stored_bytes))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sites_pull_one_copy_each_and_a_new_version_pulls_only_new_chunks() {
    let work = tempfile::tempdir().expect("tempdir");
    let tree = work.path().join("tree");
    let files = datagen::generate_tree(&tree, 24 * MIB, 11).expect("tree");
    let mut mesh = Testbed::start(bins(), work.path(), 2, 4, &[])
        .await
        .expect("mesh");

    // v1: every edge asks at the same moment as the stagers' preheat.
    let v1 = mesh.publish(&tree, "os", "1").await.expect("publish v1");
    let edges = mesh.edges.clone();
    let fetched = mesh.fetch_all(&edges, &v1).await.expect("fetch");
    for f in &fetched {
        assert!(
            f.ok,
            "{} failed: {}",
            f.edge.name,
            std::fs::read_to_string(&f.log).unwrap_or_default()
        );
    }
    let origin = mesh.origin_metrics().await.expect("metrics");
    let bundle = stored_bytes_of(&origin);
    assert!(bundle > 0);
    for site in ["site-a", "site-b"] {
        let wan = origin_sent_to_site(&origin, site);
        let ratio = wan as f64 / bundle as f64;
        println!("{site}: origin sent {wan} bytes for a {bundle}-byte bundle ({ratio:.4}×)");
        assert!(
            (0.99..=1.01).contains(&ratio),
            "{site} pulled {ratio:.4}× the bundle"
        );
        let lan = mesh.lan_bytes(site).await.expect("lan");
        assert!(
            lan as f64 >= 4.0 * bundle as f64,
            "{site} served {lan} bytes to its 4 edges"
        );
    }
    let total = metric_sum(
        &origin,
        "stagecoach_bytes_sent_total",
        &[("peer_role", "stager")],
    );
    let ratio = total as f64 / bundle as f64;
    assert!(
        (1.98..=2.02).contains(&ratio),
        "origin egress {ratio:.4}× the bundle for 2 sites"
    );

    // v2: 1% of the files changed and a few added.
    let v1_chunks: HashSet<proto::BlobHash> =
        chunks_of(&tree).into_iter().map(|(h, _)| h).collect();
    datagen::mutate_tree(&tree, &files, 0.01, 3, 12).expect("mutate");
    let v2_chunks = chunks_of(&tree);
    let mut seen = HashSet::new();
    let new_bytes: u64 = v2_chunks
        .iter()
        .filter(|(h, _)| !v1_chunks.contains(h) && seen.insert(*h))
        .map(|(_, s)| s)
        .sum();
    let before: Vec<u64> = ["site-a", "site-b"]
        .iter()
        .map(|s| origin_sent_to_site(&origin, s))
        .collect();
    let v2 = mesh.publish(&tree, "os", "2").await.expect("publish v2");
    let fetched = mesh.fetch_all(&edges, &v2).await.expect("fetch v2");
    assert!(fetched.iter().all(|f| f.ok));
    let origin = mesh.origin_metrics().await.expect("metrics");
    let v2_bundle = stored_bytes_of(&origin);
    for (i, site) in ["site-a", "site-b"].iter().enumerate() {
        let pulled = origin_sent_to_site(&origin, site) - before[i];
        println!(
            "{site}: v2 ({v2_bundle} bytes stored) pulled {pulled} bytes over the WAN; its new chunks are {new_bytes} bytes ({:.1}% of v2)",
            100.0 * new_bytes as f64 / v2_bundle as f64
        );
        assert!(
            pulled >= new_bytes,
            "{site} pulled less than the new chunks"
        );
        assert!(
            (pulled as f64) <= new_bytes as f64 * 1.02 + 64.0 * 1024.0,
            "{site} pulled {pulled} bytes, more than the {new_bytes} new bytes"
        );
    }
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stager_killed_mid_transfer_resumes_without_refetching() {
    let work = tempfile::tempdir().expect("tempdir");
    let tree = work.path().join("tree");
    // Random content so the bundle stays big after compression.
    datagen::generate_tree(&tree, 160 * MIB, 21).expect("tree");
    let mut mesh = Testbed::start(bins(), work.path(), 1, 1, &[])
        .await
        .expect("mesh");
    let v1 = mesh.publish(&tree, "os", "1").await.expect("publish");
    let origin = mesh.origin_metrics().await.expect("metrics");
    let bundle = stored_bytes_of(&origin);

    // Kill the stager once about a third has crossed the WAN.
    let sent = wait_for_async(
        Duration::from_secs(120),
        Duration::from_millis(5),
        async || {
            let text = mesh.origin_metrics().await?;
            let sent = origin_sent_to_site(&text, "site-a");
            anyhow::Ok((sent > bundle / 3).then_some(sent))
        },
    )
    .await
    .expect("a third of the bundle crosses the WAN");
    println!("killing the stager after {sent} of {bundle} bytes");
    mesh.kill_stager("stager-site-a-0").await.expect("kill");
    let text = mesh.origin_metrics().await.expect("metrics");
    let at_kill = origin_sent_to_site(&text, "site-a");
    assert!(
        at_kill < bundle,
        "the transfer finished before the kill; make the bundle bigger"
    );
    mesh.restart_stager("stager-site-a-0")
        .await
        .expect("restart");
    mesh.wait_preheated("site-a", Duration::from_secs(300))
        .await
        .expect("preheat");
    let edges = mesh.edges.clone();
    let fetched = mesh.fetch_all(&edges, &v1).await.expect("fetch");
    assert!(
        fetched.iter().all(|f| f.ok),
        "the edge could not fetch after the restart"
    );
    let text = mesh.origin_metrics().await.expect("metrics");
    let upstream = origin_sent_to_site(&text, "site-a");
    let ratio = upstream as f64 / bundle as f64;
    println!(
        "stager upstream bytes with a kill -9 at {at_kill}: {upstream} ({ratio:.4}× the bundle)"
    );
    assert!(
        ratio <= 1.05,
        "resumed transfer pulled {ratio:.4}× the bundle"
    );
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_stager_is_rejected_and_the_edge_completes_from_the_origin() {
    bins().require_test_hooks().expect("test switches");
    let work = tempfile::tempdir().expect("tempdir");
    let tree = work.path().join("tree");
    datagen::generate_tree(&tree, 4 * MIB, 31).expect("tree");
    let mut mesh = Testbed::start(
        bins(),
        work.path(),
        1,
        1,
        &["--test-corrupt-serving".to_owned()],
    )
    .await
    .expect("mesh");
    let id = mesh.publish(&tree, "os", "1").await.expect("publish");
    mesh.wait_preheated("site-a", Duration::from_secs(60))
        .await
        .expect("preheat");
    let edge = mesh.edges[0].clone();
    let out = work.path().join("unpacked");
    let output = tokio::process::Command::new(mesh.bins.path("edge-agent"))
        .args(["fetch", &id, "--dir"])
        .arg(&edge.dir)
        .args([
            "--stager",
            &mesh.stagers[0].ready.mesh,
            "--no-progress",
            "--to",
        ])
        .arg(&out)
        .output()
        .await
        .expect("run edge-agent");
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "edge failed:\n{log}");
    assert!(
        log.contains("did not verify"),
        "the bad group was not reported:\n{log}"
    );
    assert!(
        log.contains("banned"),
        "the lying stager was not banned:\n{log}"
    );
    // Every file arrived intact from the origin.
    for entry in walk(&tree) {
        let rel = entry.strip_prefix(&tree).expect("prefix");
        assert_eq!(
            std::fs::read(&entry).expect("read source"),
            std::fs::read(out.join(rel)).expect("read unpacked"),
            "{} differs",
            rel.display()
        );
    }
    mesh.shutdown().await;
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read_dir") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edges_may_not_publish_and_bad_frames_close_only_their_stream() {
    let work = tempfile::tempdir().expect("tempdir");
    let mut mesh = Testbed::start(bins(), work.path(), 1, 1, &[])
        .await
        .expect("mesh");
    let identity = NodeIdentity::load(&mesh.edges[0].dir.join("identity")).expect("edge identity");
    let endpoint = client_endpoint(&identity).expect("endpoint");
    let origin = connect(&endpoint, mesh.origin.mesh.parse().expect("addr"))
        .await
        .expect("edge connects to the origin");

    // An edge certificate trying to upload or publish is refused.
    let data = b"not from the publisher".to_vec();
    let answer = call(
        &origin,
        &Request::PutBlob {
            hash: proto::BlobHash::of(&data),
            data,
        },
        MAX_FRAME_BYTES,
    )
    .await
    .expect("answer");
    assert!(
        matches!(
            answer,
            Response::Error {
                code: ErrorCode::Forbidden,
                ..
            }
        ),
        "edge upload was not refused: {answer:?}"
    );

    for (name, addr) in [
        ("origin", mesh.origin.mesh.clone()),
        ("stager", mesh.stagers[0].ready.mesh.clone()),
    ] {
        let conn = connect(&endpoint, addr.parse().expect("addr"))
            .await
            .expect("connect");
        // An oversized length prefix, then a malformed frame, each on its own stream.
        for garbage in [
            vec![0xff, 0xff, 0xff, 0xff, 1, 0],
            vec![8, 0, 0, 0, 1, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
        ] {
            let (mut send, mut recv) = conn.open_bi().await.expect("stream");
            send.write_all(&garbage).await.expect("write");
            let _ = send.finish();
            let answer: Option<Response> = proto::net::read_frame(&mut recv, MAX_FRAME_BYTES)
                .await
                .expect("the daemon answers the bad stream");
            assert!(
                matches!(
                    answer,
                    Some(Response::Error {
                        code: ErrorCode::BadRequest,
                        ..
                    })
                ),
                "{name} answered {answer:?}"
            );
        }
        // The same connection still serves good requests.
        let answer = call(&conn, &Request::ListBundles, MAX_FRAME_BYTES)
            .await
            .expect("list");
        assert!(
            matches!(answer, Response::Bundles(_)),
            "{name} stopped serving: {answer:?}"
        );
        let text = if name == "origin" {
            mesh.origin_metrics().await.expect("metrics")
        } else {
            mesh.stager_metrics("stager-site-a-0")
                .await
                .expect("metrics")
        };
        assert_eq!(
            metric_sum(&text, "stagecoach_bad_frames_total", &[]),
            2,
            "{name} did not count"
        );
    }
    mesh.shutdown().await;
}
