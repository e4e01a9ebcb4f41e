//! The stager as its site's edges and the origin see it: real processes on loopback (netsim's
//! [`Testbed`]: an origin, the stager, and clients with certificates of their own), asked over the
//! mesh protocol. Request handling, authorization by role and site, preheating, and resuming a
//! bundle across an origin restart.
//!
//! The binaries must be built first: `cargo build --release --bins`.

use std::path::Path;
use std::time::Duration;

use netsim::datagen;
use netsim::procs::{metric_sum, Binaries};
use netsim::relay::{LinkShape, Relay, RelayConfig};
use netsim::testbed::{Testbed, TestbedClient};
use proto::manifest::{BundleId, Manifest, SignedManifest};
use proto::store::{Store, StoreOptions};
use proto::transfer::fetch::{fetch_blob, fetch_manifest, FetchError};
use proto::transfer::PeerCounters;
use proto::wire::{ErrorCode, Request, Response};
use proto::BlobHash;
use stagecoach_testing::wait_for_async;

const MIB: u64 = 1024 * 1024;

/// How long a stager may take to preheat a bundle of these tests.
const PREHEAT_TIMEOUT: Duration = Duration::from_secs(120);

/// How often a stager's log and metrics are read while waiting on them.
const POLL: Duration = Duration::from_millis(50);

fn bins() -> Binaries {
    Binaries::beside_current_exe().expect("build the binaries first: cargo build --release --bins")
}

/// A mesh of one origin and one stager for `site-a` (no enrolled edges), with `tree` (of
/// `bytes`) published as `os@1` and preheated. Returns the mesh and the bundle id.
async fn preheated_mesh(work: &Path, bytes: u64) -> (Testbed, BundleId) {
    let tree = work.join("tree");
    datagen::generate_tree(&tree, bytes, 41).expect("tree");
    let mut mesh = Testbed::start(bins(), &work.join("mesh"), 1, 0, &[])
        .await
        .expect("mesh");
    let id = mesh.publish(&tree, "os", "1").await.expect("publish");
    mesh.wait_preheated("site-a", PREHEAT_TIMEOUT)
        .await
        .expect("preheat");
    (mesh, id.parse().expect("bundle id"))
}

/// The verified manifest of `id` from the node at `addr`, asked as `client`.
async fn manifest(client: &TestbedClient, addr: &str, id: BundleId) -> (SignedManifest, Manifest) {
    let conn = client.connect(addr).await.expect("connect");
    fetch_manifest(&conn, id, &[*client.identity.publisher_key()])
        .await
        .expect("the manifest, verified")
}

/// Fetches blob `hash` of `size` bytes from the node at `addr` into `store`, as `client`.
async fn fetch(
    client: &TestbedClient,
    addr: &str,
    store: &Store,
    hash: BlobHash,
    size: u64,
) -> Result<u64, FetchError> {
    let conn = client.connect(addr).await.expect("connect");
    fetch_blob(&conn, store, hash, size, &PeerCounters::detached(), None).await
}

fn assert_refused(answer: &Response, code: ErrorCode, what: &str) {
    assert!(
        matches!(answer, Response::Error { code: c, .. } if *c == code),
        "{what}: expected a {code:?} refusal, got {answer:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_chunks_of_verified_bundles_and_refuses_other_blobs() {
    let work = tempfile::tempdir().expect("tempdir");
    let (mesh, id) = preheated_mesh(work.path(), 4 * MIB).await;
    let stager = mesh.stagers[0].ready.mesh.clone();
    let edge = mesh
        .enroll_client("edge", "site-a", "edge-a")
        .await
        .expect("edge client");
    let (_, manifest) = manifest(&edge, &stager, id).await;
    let store =
        Store::open(work.path().join("edge-store"), StoreOptions::default()).expect("edge store");

    // A chunk of the bundle: every 16 KiB group verified on arrival, the whole chunk stored.
    let chunk = manifest.chunks[0];
    let received = fetch(&edge, &stager, &store, chunk.hash, chunk.stored_bytes)
        .await
        .expect("a chunk of a verified bundle is served");
    assert!(received >= chunk.stored_bytes, "{received} B received");
    assert!(store.has_blob(&chunk.hash));

    // A blob no verified manifest names: refused by name, and not fetched from the origin.
    let wan_before = mesh.wan_bytes("site-a").await.expect("wan bytes");
    let stranger = BlobHash::of(b"no manifest names this blob");
    let refused = fetch(&edge, &stager, &store, stranger, MIB).await;
    match refused {
        Err(FetchError::Refused {
            code: ErrorCode::NotFound,
            message,
        }) => assert!(
            message.contains(&stranger.to_string()),
            "the refusal names the blob: {message}"
        ),
        other => panic!("a blob no manifest names must be refused as not found, got {other:?}"),
    }
    assert!(!store.has_blob(&stranger));
    let wan_after = mesh.wan_bytes("site-a").await.expect("wan bytes");
    assert_eq!(
        wan_after, wan_before,
        "the stager went to the origin for a blob no manifest names"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_and_sites_are_checked_against_the_certificate() {
    let work = tempfile::tempdir().expect("tempdir");
    let (mesh, id) = preheated_mesh(work.path(), 2 * MIB).await;
    let stager = mesh.stagers[0].ready.mesh.clone();
    let origin = mesh.origin.mesh.clone();
    let edge = mesh
        .enroll_client("edge", "site-a", "edge-a")
        .await
        .expect("edge of site-a");
    let (signed, manifest) = manifest(&edge, &stager, id).await;

    // An edge may fetch, but publish neither to its stager nor to the origin.
    let publish = Request::Publish {
        manifest: signed.clone(),
    };
    let upload = Request::PutBlob {
        hash: manifest.chunks[0].hash,
        data: vec![0; 16],
    };
    for (node, addr) in [("stager", &stager), ("origin", &origin)] {
        for request in [&publish, &upload] {
            let answer = edge.call(addr, request).await.expect("answer");
            assert_refused(
                &answer,
                ErrorCode::Forbidden,
                &format!("edge uploads to the {node}"),
            );
        }
    }

    // An edge of another site gets nothing from this site's stager; a stager of another site
    // gets data (a stager serves the stagers below it, as a region's stager), nothing else.
    let get_manifest = Request::GetManifest { id };
    let get_blob = Request::GetBlob {
        hash: manifest.chunks[0].hash,
        size: manifest.chunks[0].stored_bytes,
        groups: vec![(0, 1)],
    };
    let below = mesh
        .enroll_client("stager", "site-b", "stager-b")
        .await
        .expect("stager of site-b");
    let answer = below.call(&stager, &get_manifest).await.expect("answer");
    assert!(
        matches!(answer, Response::Manifest(_)),
        "a stager below gets the manifest: {answer:?}"
    );
    let report = Request::KeepSet;
    let answer = below.call(&stager, &report).await.expect("answer");
    assert_refused(
        &answer,
        ErrorCode::Forbidden,
        "a stager of site-b asks for a keep-set",
    );
    for (role, name) in [("edge", "edge-b")] {
        let stranger = mesh
            .enroll_client(role, "site-b", name)
            .await
            .expect("client of site-b");
        for request in [&get_manifest, &get_blob, &Request::ListBundles] {
            let answer = stranger.call(&stager, request).await.expect("answer");
            assert_refused(
                &answer,
                ErrorCode::Forbidden,
                &format!("a {role} of site-b asks site-a's stager {request:?}"),
            );
            if let Response::Error { message, .. } = &answer {
                assert!(
                    message.contains("site-a"),
                    "the refusal says why: {message}"
                );
            }
        }
    }

    // The same requests from the site's own edge are answered.
    let answer = edge.call(&stager, &get_manifest).await.expect("answer");
    assert!(
        matches!(answer, Response::Manifest(_)),
        "the site's edge gets the manifest: {answer:?}"
    );
    let text = mesh
        .stager_metrics(&mesh.stagers[0].name)
        .await
        .expect("metrics");
    assert!(
        metric_sum(&text, "stagecoach_forbidden_total", &[]) >= 6,
        "every refusal is counted:\n{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_publish_reaches_the_stager_with_no_edge_asking() {
    let work = tempfile::tempdir().expect("tempdir");
    // No edge exists yet: whatever the stager holds, it pulled on the announcement alone.
    let (mut mesh, id) = preheated_mesh(work.path(), 6 * MIB).await;
    let stager = mesh.stagers[0].ready.mesh.clone();
    let edge = mesh
        .enroll_client("edge", "site-a", "edge-a")
        .await
        .expect("edge client");
    let (_, manifest) = manifest(&edge, &stager, id).await;
    let pulled = mesh.wan_bytes("site-a").await.expect("wan bytes");
    assert!(
        pulled >= manifest.total_stored_bytes,
        "the stager pulled {pulled} B of a {} B bundle",
        manifest.total_stored_bytes
    );

    // With the origin gone, every chunk still comes from the stager's store.
    mesh.kill_origin().await.expect("kill the origin");
    let store =
        Store::open(work.path().join("edge-store"), StoreOptions::default()).expect("edge store");
    for chunk in &manifest.chunks {
        fetch(&edge, &stager, &store, chunk.hash, chunk.stored_bytes)
            .await
            .unwrap_or_else(|error| panic!("chunk {} not held by the stager: {error}", chunk.hash));
    }
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stager_resumes_a_bundle_after_the_origin_restarts() {
    let work = tempfile::tempdir().expect("tempdir");
    let tree = work.path().join("tree");
    datagen::generate_tree(&tree, 24 * MIB, 43).expect("tree");
    let mut mesh = Testbed::start(bins(), &work.path().join("mesh"), 0, 0, &[])
        .await
        .expect("mesh");
    // The site reaches the origin through a 40 Mbit/s WAN, so the bundle takes seconds to
    // cross and the origin can die halfway.
    let origin: std::net::SocketAddr = mesh.origin.mesh.parse().expect("origin address");
    let wan = Relay::start(RelayConfig::symmetric(
        "127.0.0.1:0".parse().expect("address"),
        origin,
        LinkShape::wan(40.0, 5, 0, 0.0),
        1,
    ))
    .expect("WAN relay");
    mesh.route_site_via("site-a", &wan.local_addr().to_string());
    let node = mesh.add_stager("site-a", &[]).await.expect("stager");
    let id = mesh.publish(&tree, "os", "1").await.expect("publish");
    let text = mesh.origin_metrics().await.expect("origin metrics");
    let bundle = metric_sum(&text, "stagecoach_bundle_stored_bytes", &[]);
    assert!(bundle > 0, "the origin reports the bundle's size:\n{text}");

    // The origin dies once a third of the bundle crossed.
    let third = wait_for_async(PREHEAT_TIMEOUT, POLL, async || {
        let pulled = mesh.wan_bytes("site-a").await?;
        anyhow::Ok((pulled * 3 >= bundle).then_some(pulled))
    })
    .await
    .expect("a third of the bundle crossed the WAN");
    mesh.kill_origin().await.expect("kill the origin");
    let at_kill = mesh.wan_bytes("site-a").await.expect("wan bytes");
    assert!(
        (at_kill as f64) < 0.9 * bundle as f64,
        "the bundle had nearly crossed ({at_kill} of {bundle} B, {third} B when seen) before \
         the origin died: the test proves nothing"
    );
    mesh.restart_origin().await.expect("restart the origin");

    // The stager finishes the bundle without pulling it again from the start.
    let log = mesh.work.join("logs").join(format!("{}.log", node.name));
    let held = wait_for_async(PREHEAT_TIMEOUT, POLL, async || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        mesh.fleet.check_alive()?;
        anyhow::Ok(
            text.lines()
                .any(|l| l.contains("bundle held by the site") && l.contains(&id))
                .then_some(()),
        )
    })
    .await;
    assert!(
        held.is_ok(),
        "the stager did not finish the bundle after the origin restarted: {held:?}\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let total = mesh.wan_bytes("site-a").await.expect("wan bytes");
    eprintln!(
        "bundle {bundle} B; the stager pulled {at_kill} B before the origin died, {total} B in all"
    );
    assert!(
        (total as f64) < 1.5 * bundle as f64,
        "the stager pulled {total} B for a {bundle} B bundle: it started over instead of resuming"
    );
    mesh.shutdown().await;
    wan.shutdown();
}
