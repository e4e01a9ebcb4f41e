//! The edge daemon (`edge-agent serve`) as its peers, its stagers and the origin see it: real
//! processes on loopback (netsim's [`Testbed`]) and clients with certificates of their own, asking
//! over the mesh protocol. Serving the site's peers, authorization by role and site (only the
//! origin starts a swap), and falling back to a second stager, then the origin, when stagers die.
//!
//! The binaries must be built first: `cargo build --release --bins`.

use std::path::Path;
use std::time::Duration;

use netsim::datagen;
use netsim::procs::{metric_sum, Binaries};
use netsim::testbed::{EdgeFetch, Testbed, TestbedClient};
use proto::manifest::BundleId;
use proto::store::{Store, StoreOptions};
use proto::transfer::fetch::{fetch_blob, fetch_manifest};
use proto::transfer::PeerCounters;
use proto::wire::{ErrorCode, Request, Response};

const MIB: u64 = 1024 * 1024;

/// How long the stagers of these tests may take to preheat a bundle.
const PREHEAT_TIMEOUT: Duration = Duration::from_secs(120);

fn bins() -> Binaries {
    Binaries::beside_current_exe().expect("build the binaries first: cargo build --release --bins")
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

fn assert_forbidden(answer: &Response, what: &str) {
    assert!(
        matches!(
            answer,
            Response::Error {
                code: ErrorCode::Forbidden,
                ..
            }
        ),
        "{what}: expected a refusal, got {answer:?}"
    );
}

/// One site, one stager, one edge whose daemon runs (peers on); `tree` of `bytes` published as
/// `os@1` and fetched by the edge.
async fn mesh_with_a_fetched_bundle(work: &Path, bytes: u64) -> (Testbed, BundleId) {
    let tree = work.join("tree");
    datagen::generate_tree(&tree, bytes, 51).expect("tree");
    let mut mesh = Testbed::start(bins(), &work.join("mesh"), 1, 1, &[])
        .await
        .expect("mesh");
    mesh.start_edge_daemons(true, &[]).await.expect("daemon");
    let id = mesh.publish(&tree, "os", "1").await.expect("publish");
    let edges = mesh.edges.clone();
    assert_all_ok(&mesh.fetch_all(&edges, &id).await.expect("fetch"));
    (mesh, id.parse().expect("bundle id"))
}

fn daemon_addr(mesh: &Testbed) -> String {
    mesh.edges[0]
        .daemon
        .as_ref()
        .expect("the edge's daemon runs")
        .mesh
        .clone()
}

async fn client(mesh: &Testbed, role: &str, site: &str, name: &str) -> TestbedClient {
    mesh.enroll_client(role, site, name)
        .await
        .unwrap_or_else(|error| panic!("enroll {name}: {error:#}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_what_it_holds_to_its_site_and_refuses_everyone_else() {
    let work = tempfile::tempdir().expect("tempdir");
    let (mesh, id) = mesh_with_a_fetched_bundle(work.path(), 4 * MIB).await;
    let daemon = daemon_addr(&mesh);

    // A peer of the site gets the manifest and a chunk, verified group by group.
    let peer = client(&mesh, "edge", "site-a", "peer-a").await;
    let conn = peer.connect(&daemon).await.expect("connect");
    let (_, manifest) = fetch_manifest(&conn, id, &[*peer.identity.publisher_key()])
        .await
        .expect("the site's peer gets the manifest");
    let store =
        Store::open(work.path().join("peer-store"), StoreOptions::default()).expect("peer store");
    let chunk = manifest.chunks[0];
    fetch_blob(
        &conn,
        &store,
        chunk.hash,
        chunk.stored_bytes,
        &PeerCounters::detached(),
        None,
    )
    .await
    .expect("the site's peer gets a chunk");
    assert!(store.has_blob(&chunk.hash));
    // A peer may not make this edge fetch (only the edge itself or the origin may).
    let fetch = Request::Fetch {
        bundle: id.to_string(),
    };
    assert_forbidden(
        &peer.call(&daemon, &fetch).await.expect("answer"),
        "a peer asks the edge to fetch",
    );

    // An edge or a stager of another site, or the site's stager, gets no data from an edge.
    let get_manifest = Request::GetManifest { id };
    let get_blob = Request::GetBlob {
        hash: chunk.hash,
        size: chunk.stored_bytes,
        groups: vec![(0, 1)],
    };
    for (role, site, name) in [
        ("edge", "site-b", "edge-b"),
        ("stager", "site-b", "stager-b"),
        ("stager", "site-a", "stager-a"),
    ] {
        let other = client(&mesh, role, site, name).await;
        for request in [&get_manifest, &get_blob] {
            let answer = other.call(&daemon, request).await.expect("answer");
            assert_forbidden(&answer, &format!("a {role} of {site} asks {request:?}"));
        }
    }
    let text = mesh
        .edge_metrics(&mesh.edges[0].name)
        .await
        .expect("metrics");
    assert!(
        metric_sum(&text, "stagecoach_forbidden_total", &[]) >= 7,
        "every refusal is counted:\n{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_origin_may_start_a_swap() {
    let work = tempfile::tempdir().expect("tempdir");
    let (mesh, id) = mesh_with_a_fetched_bundle(work.path(), MIB).await;
    let daemon = daemon_addr(&mesh);
    let swap = Request::StartSwap {
        target: id,
        rescue: id,
    };
    for (role, site, name) in [
        ("edge", "site-a", "peer-a"),
        ("stager", "site-a", "stager-a"),
        ("edge", "site-b", "edge-b"),
    ] {
        let other = client(&mesh, role, site, name).await;
        let answer = other.call(&daemon, &swap).await.expect("answer");
        assert_forbidden(&answer, &format!("a {role} of {site} starts a swap"));
        if let Response::Error { message, .. } = &answer {
            assert!(message.contains("swap"), "the refusal says what: {message}");
        }
    }
    // The origin's certificate passes: this daemon has no machine to swap, and says so.
    let origin = mesh.origin_client().expect("origin client");
    let answer = origin.call(&daemon, &swap).await.expect("answer");
    match &answer {
        Response::Error {
            code: ErrorCode::BadRequest,
            message,
        } => assert!(
            message.contains("no machine configured"),
            "the origin is told why the swap cannot run: {message}"
        ),
        other => panic!("the origin's swap request should reach the swap, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_falls_back_to_a_second_stager_then_to_the_origin() {
    let work = tempfile::tempdir().expect("tempdir");
    let tree = work.path().join("tree");
    datagen::generate_tree(&tree, 4 * MIB, 52).expect("tree");
    let mut mesh = Testbed::start(bins(), &work.path().join("mesh"), 1, 1, &[])
        .await
        .expect("mesh");
    let second = mesh.add_stager("site-a", &[]).await.expect("second stager");
    mesh.start_edge_daemons(false, &[]).await.expect("daemon");
    let id = mesh.publish(&tree, "os", "1").await.expect("publish");
    mesh.wait_preheated("site-a", PREHEAT_TIMEOUT)
        .await
        .expect("both stagers preheat");
    let edge_bytes = |text: &str| {
        metric_sum(
            text,
            "stagecoach_bytes_sent_total",
            &[("peer_role", "edge")],
        )
    };
    let bundle = metric_sum(
        &mesh.origin_metrics().await.expect("origin metrics"),
        "stagecoach_bundle_stored_bytes",
        &[],
    );

    // The first stager dies: the edge fetches from the second, not from the origin.
    let first = mesh.stagers[0].name.clone();
    mesh.kill_stager(&first)
        .await
        .expect("kill the first stager");
    let origin_before = edge_bytes(&mesh.origin_metrics().await.expect("origin metrics"));
    let edges = mesh.edges.clone();
    assert_all_ok(&mesh.fetch_all(&edges, &id).await.expect("fetch"));
    let from_second = edge_bytes(&mesh.stager_metrics(&second.name).await.expect("metrics"));
    let from_origin =
        edge_bytes(&mesh.origin_metrics().await.expect("origin metrics")) - origin_before;
    assert!(
        from_second as f64 >= 0.9 * bundle as f64,
        "the second stager sent {from_second} B of a {bundle} B bundle"
    );
    assert!(
        (from_origin as f64) < 0.1 * bundle as f64,
        "the origin sent {from_origin} B although a stager was up"
    );

    // Both stagers are gone: a new bundle comes from the origin, the last resort.
    mesh.kill_stager(&second.name)
        .await
        .expect("kill the second stager");
    let tree2 = work.path().join("tree2");
    datagen::generate_tree(&tree2, 4 * MIB, 53).expect("tree 2");
    let id2 = mesh.publish(&tree2, "os", "2").await.expect("publish 2");
    let origin_text = mesh.origin_metrics().await.expect("origin metrics");
    // The gauge is the newest bundle's size.
    let bundle = metric_sum(&origin_text, "stagecoach_bundle_stored_bytes", &[]);
    let origin_before = edge_bytes(&origin_text);
    assert_all_ok(&mesh.fetch_all(&edges, &id2).await.expect("fetch 2"));
    let from_origin =
        edge_bytes(&mesh.origin_metrics().await.expect("origin metrics")) - origin_before;
    assert!(
        from_origin as f64 >= 0.9 * bundle as f64,
        "with no stager up the origin sent {from_origin} B of a {bundle} B bundle"
    );
    mesh.shutdown().await;
}
