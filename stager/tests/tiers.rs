//! Stagers next to and above each other (issue 15), as real processes on loopback: siblings of
//! one site split the upstream pulls, a regional stager serves the stagers of its sites, and a
//! stager that lies or dies is left for the next source.
//!
//! The binaries must be built first, with the test hooks:
//! `cargo build --release --bins --features stager/test-hooks`.

use std::path::Path;
use std::time::Duration;

use netsim::datagen;
use netsim::procs::{metric_sum, Binaries};
use netsim::testbed::Testbed;
use proto::manifest::{BundleId, Manifest};

const MIB: u64 = 1024 * 1024;

/// How long a stager may take to preheat a bundle of these tests.
const PREHEAT_TIMEOUT: Duration = Duration::from_secs(120);

fn bins() -> Binaries {
    Binaries::beside_current_exe().expect("build the binaries first: cargo build --release --bins")
}

fn s(text: &str) -> String {
    text.to_owned()
}

/// A mesh of one origin and no stager yet, with a tree of `bytes` ready to publish.
async fn mesh_and_tree(work: &Path, bytes: u64, seed: u64) -> (Testbed, std::path::PathBuf) {
    let tree = work.join(format!("tree-{seed}"));
    datagen::generate_incompressible_tree(&tree, bytes, seed).expect("tree");
    let mesh = Testbed::start(bins(), &work.join("mesh"), 0, 0, &[])
        .await
        .expect("mesh");
    (mesh, tree)
}

/// The verified manifest of bundle `id` from the origin.
async fn manifest_of(mesh: &Testbed, id: &str) -> Manifest {
    let client = mesh.origin_client().expect("origin client");
    let conn = client.connect(&mesh.origin.mesh).await.expect("connect");
    let id: BundleId = id.parse().expect("bundle id");
    let (_, manifest) =
        proto::transfer::fetch::fetch_manifest(&conn, id, &[*client.identity.publisher_key()])
            .await
            .expect("manifest");
    manifest
}

fn stored_bytes(manifest: &Manifest) -> u64 {
    let mut seen = std::collections::HashSet::new();
    manifest
        .chunks
        .iter()
        .filter(|c| seen.insert(c.hash))
        .map(|c| c.stored_bytes)
        .sum()
}

/// Bytes a stager received from the origin and from upstream stagers (its WAN pulls).
fn pulled(metrics: &str) -> u64 {
    metric_sum(
        metrics,
        "stagecoach_bytes_received_total",
        &[("peer_role", "origin")],
    ) + metrics
        .lines()
        .filter(|l| l.starts_with("stagecoach_bytes_received_total{") && l.contains("upstream "))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<u64>().ok())
        .sum::<u64>()
}

/// Asserts from a stager's `metrics` that it banned one stager of `kind` (`sibling` or
/// `upstream`) at its first bad group: at most one per request it had in flight to it. The
/// bad groups counted.
fn assert_banned_at_its_first_bad_groups(metrics: &str, kind: &str) -> u64 {
    assert_eq!(
        metric_sum(metrics, "stagecoach_stager_bans_total", &[("kind", kind)]),
        1,
        "one {kind} stager banned, once:\n{metrics}"
    );
    let failures = metric_sum(
        metrics,
        "stagecoach_verify_failures_total",
        &[("peer_role", "stager")],
    );
    assert!(
        (1..=stager::upstream::MAX_UPSTREAM_FLIGHTS.max(stager::node::PREHEAT_CONCURRENCY) as u64)
            .contains(&failures),
        "{failures} bad groups before the ban"
    );
    failures
}

/// Waits until the log of stager `name` holds `needle` at least `times` times.
async fn wait_log(mesh: &Testbed, name: &str, needle: &str, times: usize) {
    let path = mesh.work.join("logs").join(format!("{name}.log"));
    for _ in 0..1200 {
        let log = std::fs::read_to_string(&path).unwrap_or_default();
        if log.matches(needle).count() >= times {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the log of {name} never showed {needle:?} {times} times");
}

/// The line of `text` that mentions `needle`.
fn line_with<'a>(text: &'a str, needle: &str) -> &'a str {
    text.lines()
        .find(|line| line.contains(needle))
        .unwrap_or_else(|| panic!("no line with {needle:?} in:\n{text}"))
}

/// Waits until `stager status` of `name` (rewritten every 2 s) satisfies `ok`; its text.
async fn wait_status(mesh: &Testbed, name: &str, ok: impl Fn(&str) -> bool) -> String {
    let dir = &mesh
        .stagers
        .iter()
        .find(|st| st.name == name)
        .expect("stager")
        .dir;
    let mut last = String::new();
    for _ in 0..100 {
        last = stager::node::render_status(dir).unwrap_or_default();
        if ok(&last) {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_cold_siblings_pull_each_chunk_upstream_once_between_them() {
    let work = tempfile::tempdir().expect("tempdir");
    let (mut mesh, tree) = mesh_and_tree(work.path(), 24 * MIB, 7).await;
    // Both start cold (nothing published yet), each with the other as its sibling; this returns
    // once each reached the other.
    let stagers = mesh.add_stagers("site-a", 2, &[]).await.expect("stagers");
    let (first, second) = (stagers[0].clone(), stagers[1].clone());

    let id = mesh.publish(&tree, "os", "1").await.expect("publish");
    mesh.wait_preheated("site-a", PREHEAT_TIMEOUT)
        .await
        .expect("both stagers hold the bundle");
    let bundle = stored_bytes(&manifest_of(&mesh, &id).await);
    let a = pulled(&mesh.stager_metrics(&first.name).await.expect("metrics"));
    let b = pulled(&mesh.stager_metrics(&second.name).await.expect("metrics"));
    let ratio = (a + b) as f64 / bundle as f64;
    eprintln!(
        "two cold siblings: stager 0 pulled {a} B, stager 1 {b} B, together {ratio:.4}× the \
         bundle's {bundle} B"
    );
    // Payload plus the bao tree's parent hashes (64 B per 16 KiB group: 0.4%) and part headers.
    assert!(
        ratio <= 1.01,
        "the site pulled {ratio:.4}× the bundle upstream"
    );
    assert!(
        a > bundle / 5 && b > bundle / 5,
        "each stager pulled its share: {a} and {b} of {bundle}"
    );
    let text = wait_status(&mesh, &second.name, |t| {
        !t.contains("from siblings 0.0 MiB")
    })
    .await;
    assert!(!text.contains("from siblings 0.0 MiB"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lying_sibling_is_banned_and_its_chunks_come_from_upstream() {
    let work = tempfile::tempdir().expect("tempdir");
    let (mut mesh, tree) = mesh_and_tree(work.path(), 8 * MIB, 8).await;
    let liar = mesh
        .add_stager("site-a", &[s("--test-corrupt-serving")])
        .await
        .expect("lying stager");
    let honest = mesh
        .add_stager("site-a", &[s("--sibling"), liar.ready.mesh.clone()])
        .await
        .expect("honest stager");
    wait_log(&mesh, &honest.name, "sibling stager connected", 1).await;

    let id = mesh.publish(&tree, "os", "1").await.expect("publish");
    mesh.wait_preheated("site-a", PREHEAT_TIMEOUT)
        .await
        .expect("the honest stager holds the bundle");
    let bundle = stored_bytes(&manifest_of(&mesh, &id).await);
    let metrics = mesh.stager_metrics(&honest.name).await.expect("metrics");
    let failures = assert_banned_at_its_first_bad_groups(&metrics, "sibling");
    // Groups that verified before the bad one are kept; the bad one and everything after it
    // came from upstream.
    let from_liar = metric_sum(
        &metrics,
        "stagecoach_bytes_received_total",
        &[("peer_role", "stager"), ("peer_site", "site-a")],
    );
    eprintln!("{failures} bad groups, {from_liar} B taken from the liar before the ban");
    assert!(
        pulled(&metrics) + from_liar >= bundle,
        "the honest stager pulled the rest upstream"
    );
    let text = wait_status(&mesh, &honest.name, |t| {
        t.contains(&liar.ready.mesh) && line_with(t, &liar.ready.mesh).contains("banned")
    })
    .await;
    assert!(
        line_with(&text, &liar.ready.mesh).contains("banned"),
        "stager status shows the ban:\n{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_regional_stager_serves_its_sites_which_fail_over_to_the_origin_when_it_dies() {
    let work = tempfile::tempdir().expect("tempdir");
    let (mut mesh, tree) = mesh_and_tree(work.path(), 16 * MIB, 9).await;
    let regional = mesh.add_stager("region-eu", &[]).await.expect("regional");
    let below = mesh
        .add_stager("site-a", &[s("--upstream"), regional.ready.mesh.clone()])
        .await
        .expect("site stager");

    let first = mesh.publish(&tree, "os", "1").await.expect("publish");
    mesh.wait_preheated("site-a", PREHEAT_TIMEOUT)
        .await
        .expect("the site holds os@1");
    let bundle = stored_bytes(&manifest_of(&mesh, &first).await);
    let metrics = mesh.stager_metrics(&below.name).await.expect("metrics");
    let from_origin = metric_sum(
        &metrics,
        "stagecoach_bytes_received_total",
        &[("peer_role", "origin")],
    );
    let through_region = pulled(&metrics) - from_origin;
    eprintln!(
        "site stager: {through_region} B through the regional stager, {from_origin} B from the \
         origin, bundle {bundle} B"
    );
    assert!(
        through_region >= bundle && from_origin < bundle / 100,
        "the site pulled through its region: {through_region} B, {from_origin} B from the origin"
    );
    let regional_in_use = |t: &str| {
        t.contains(&regional.ready.mesh) && line_with(t, &regional.ready.mesh).contains("in use")
    };
    let text = wait_status(&mesh, &below.name, regional_in_use).await;
    assert!(regional_in_use(&text), "{text}");

    // The regional stager dies: the site goes on from the origin.
    mesh.kill_stager(&regional.name).await.expect("kill -9");
    let tree2 = work.path().join("tree-2");
    datagen::generate_incompressible_tree(&tree2, 8 * MIB, 10).expect("tree 2");
    let killed = std::time::Instant::now();
    let second = mesh.publish(&tree2, "os", "2").await.expect("publish os@2");
    // Announced through the origin once the dead regional stager is noticed.
    wait_log(
        &mesh,
        &below.name,
        &format!("bundle held by the site bundle={second}"),
        1,
    )
    .await;
    eprintln!(
        "os@2 held by the site {:.1} s after the regional stager was killed",
        killed.elapsed().as_secs_f64()
    );
    let metrics = mesh.stager_metrics(&below.name).await.expect("metrics");
    assert!(
        metric_sum(
            &metrics,
            "stagecoach_stager_failovers_total",
            &[("reason", "down")]
        ) >= 1,
        "the failover is counted:\n{metrics}"
    );
    let text = wait_status(&mesh, &below.name, |t| t.contains("-> ")).await;
    assert!(line_with(&text, "origin ").contains("in use"), "{text}");
    assert!(
        line_with(&text, "-> ").contains("(down"),
        "the failover and its reason are shown:\n{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lying_regional_stager_is_banned_and_the_site_pulls_from_the_origin() {
    let work = tempfile::tempdir().expect("tempdir");
    let (mut mesh, tree) = mesh_and_tree(work.path(), 8 * MIB, 11).await;
    let regional = mesh
        .add_stager("region-eu", &[s("--test-corrupt-serving")])
        .await
        .expect("regional");
    let below = mesh
        .add_stager("site-a", &[s("--upstream"), regional.ready.mesh.clone()])
        .await
        .expect("site stager");
    mesh.publish(&tree, "os", "1").await.expect("publish");
    mesh.wait_preheated("site-a", PREHEAT_TIMEOUT)
        .await
        .expect("the site holds the bundle");
    let metrics = mesh.stager_metrics(&below.name).await.expect("metrics");
    assert_banned_at_its_first_bad_groups(&metrics, "upstream");
    let text = wait_status(&mesh, &below.name, |t| t.contains("-> ")).await;
    assert!(
        line_with(&text, &regional.ready.mesh).contains("banned"),
        "{text}"
    );
    assert!(line_with(&text, "origin ").contains("in use"), "{text}");
    assert!(line_with(&text, "-> ").contains("(bad_data"), "{text}");
}

/// Bytes from the origin to edges below one 16 KiB group carry no bundle data, only control
/// answers (the content keys an edge asks the origin for at enrollment, say).
const NO_BUNDLE_DATA: u64 = 16 * 1024;

/// Payload bytes the origin sent to edges (of any site).
async fn origin_sent_to_edges(mesh: &Testbed) -> u64 {
    let text = mesh.origin_metrics().await.expect("origin metrics");
    metric_sum(
        &text,
        "stagecoach_bytes_sent_total",
        &[("peer_role", "edge")],
    )
}

/// `edge-agent fetch BUNDLE --dir DIR --no-progress`, with no `--stager`: the edge has only
/// what enrollment told it.
async fn fetch_unconfigured(mesh: &Testbed, dir: &Path, bundle: &str) -> netsim::procs::CliRun {
    let args = [
        s("fetch"),
        s(bundle),
        s("--dir"),
        dir.display().to_string(),
        s("--no-progress"),
    ];
    netsim::procs::run_cli(&mesh.bins.path("edge-agent"), &args)
        .await
        .expect("edge-agent fetch")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_learns_its_sites_stagers_at_enrollment_and_fetches_from_the_survivor() {
    let work = tempfile::tempdir().expect("tempdir");
    let (mut mesh, tree) = mesh_and_tree(work.path(), 8 * MIB, 11).await;
    let stagers = mesh.add_stagers("site-a", 2, &[]).await.expect("stagers");
    let regional = mesh
        .add_stager("region-eu", &[])
        .await
        .expect("another site's stager");
    for stager in stagers.iter().chain([&regional]) {
        wait_log(
            &mesh,
            &stager.name,
            "the origin knows where this stager serves its site",
            1,
        )
        .await;
    }

    // Enrolled with a token only: the origin names the site's two stagers, not the other site's.
    let dir = work.path().join("edge-unconfigured");
    let token = mesh.token("edge", "site-a").await.expect("token");
    let enrolled = netsim::procs::run_cli(
        &mesh.bins.path("edge-agent"),
        &[s("enroll"), token, s("--dir"), dir.display().to_string()],
    )
    .await
    .expect("edge-agent enroll");
    assert!(enrolled.ok, "{}\n{}", enrolled.stdout, enrolled.stderr);
    let line = line_with(&enrolled.stdout, "site stagers");
    for stager in &stagers {
        assert!(line.contains(&stager.ready.mesh), "{line}");
    }
    assert!(!line.contains(&regional.ready.mesh), "{line}");

    let first = mesh.publish(&tree, "os", "1").await.expect("publish");
    mesh.wait_preheated("site-a", PREHEAT_TIMEOUT)
        .await
        .expect("the site holds os@1");
    let fetched = fetch_unconfigured(&mesh, &dir, &first).await;
    assert!(fetched.ok, "{}\n{}", fetched.stdout, fetched.stderr);
    let control = origin_sent_to_edges(&mesh).await;
    assert!(
        control < NO_BUNDLE_DATA,
        "the edge fetched from its site's stagers, not the origin ({control} B from it)"
    );

    // One stager dies: the edge fetches the next bundle from the other.
    let served_by = |metrics: &str| {
        metric_sum(
            metrics,
            "stagecoach_bytes_sent_total",
            &[("peer_role", "edge")],
        )
    };
    let before = served_by(
        &mesh
            .stager_metrics(&stagers[1].name)
            .await
            .expect("metrics"),
    );
    mesh.kill_stager(&stagers[0].name).await.expect("kill -9");
    let tree2 = work.path().join("tree-2");
    datagen::generate_incompressible_tree(&tree2, 4 * MIB, 12).expect("tree 2");
    let second = mesh.publish(&tree2, "os", "2").await.expect("publish os@2");
    let started = std::time::Instant::now();
    let fetched = fetch_unconfigured(&mesh, &dir, &second).await;
    assert!(fetched.ok, "{}\n{}", fetched.stdout, fetched.stderr);
    eprintln!(
        "os@2 fetched in {:.2} s with one of the two stagers dead (its handshake times out \
         after {} ms)",
        started.elapsed().as_secs_f64(),
        proto::net::LAN_HANDSHAKE_TIMEOUT.as_millis()
    );
    let sent = origin_sent_to_edges(&mesh).await - control;
    assert!(
        sent < NO_BUNDLE_DATA,
        "the edge fetched os@2 from the surviving stager, not the origin ({sent} B from it)"
    );
    let after = served_by(
        &mesh
            .stager_metrics(&stagers[1].name)
            .await
            .expect("metrics"),
    );
    assert!(
        after - before >= 4 * MIB,
        "the survivor served os@2: {} B",
        after - before
    );
}
