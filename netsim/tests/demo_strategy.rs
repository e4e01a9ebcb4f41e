//! `netsim demo --strategy direct|staged|mesh`, run as a user runs it (the real `netsim` binary
//! with `--json`, emulating its built-in topology): every edge ends with the bundle, each site
//! pulls it over the WAN once (the payload the origin sent, and what the site's WAN relay
//! carried) — once per edge with `direct` — and the bytes served inside a site come from the
//! stager alone (`staged`) or from the stager and the other edges (`mesh`). With `--encrypt`,
//! no planted plaintext is found where stagers, peers or the WAN could see it.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

/// How long one demo run may take (a few seconds when the machine is idle).
const DEMO_TIMEOUT: Duration = Duration::from_secs(300);
const SITES: u64 = 2;
const EDGES: u64 = 3;
/// The stagers' upload limit: slow enough that edges of a `mesh` site serve each other.
const STAGER_UPLOAD_MBIT: u64 = 80;

/// The `netsim` binary, beside the other workspace binaries.
fn netsim_bin() -> PathBuf {
    netsim::procs::Binaries::beside_current_exe()
        .expect("build the binaries first: cargo build --release --bins")
        .path("netsim")
}

/// Runs `netsim demo --json` with `strategy` and returns its JSON result.
fn run_demo(strategy: &str) -> Value {
    let work = tempfile::tempdir().expect("tempdir");
    run_demo_in(work.path(), strategy, &[])
}

/// Runs `netsim demo --json` with `strategy` and `extra` flags, its work directory in `work`,
/// and returns its JSON result.
fn run_demo_in(work: &std::path::Path, strategy: &str, extra: &[&str]) -> Value {
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let stdout_path = work.join("stdout.json");
    let stderr_path = work.join("stderr.log");
    let mut demo = Command::new(netsim_bin())
        .args(["demo", "--json", "--bundle-mib", "16"])
        .args(["--sites", &SITES.to_string(), "--edges", &EDGES.to_string()])
        .args(["--strategy", strategy])
        .args(["--stager-upload-mbit", &STAGER_UPLOAD_MBIT.to_string()])
        .args(extra)
        .arg("--work-dir")
        .arg(work.join("demo"))
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&stdout_path).expect("stdout file"))
        .stderr(std::fs::File::create(&stderr_path).expect("stderr file"))
        .spawn()
        .expect("start netsim demo");
    // Killed when it overruns; its children die with it (PR_SET_PDEATHSIG).
    let status = netsim::procs::wait_for_exit(&mut demo, DEMO_TIMEOUT).unwrap_or_else(|error| {
        panic!("netsim demo --strategy {strategy} did not finish: {error:#}")
    });
    let stdout = std::fs::read_to_string(&stdout_path).unwrap_or_default();
    let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
    assert!(
        status.success(),
        "netsim demo --strategy {strategy} failed with {status}:\n{stderr}"
    );
    let result: Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("the demo printed no JSON ({e}):\n{stdout}\n{stderr}"));
    eprintln!("--strategy {strategy}:\n{stdout}");
    result
}

fn u(value: &Value, field: &str) -> u64 {
    value[field]
        .as_u64()
        .unwrap_or_else(|| panic!("no number `{field}` in {value}"))
}

/// QUIC's overhead on the WAN link (headers, acknowledgements, and retransmissions of
/// datagrams a busy receiver's socket dropped) on top of the payload: what a site's relay may
/// carry beyond one copy of the bundle per copy pulled, as `netsim/tests/emulate.rs` allows.
const LINK_OVERHEAD: f64 = 0.15;

/// One demo at a time: each runs a dozen processes, and the byte counts on the link grow with
/// retransmissions when several demos share two cores.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The site's bytes over its WAN, as the origin counted its payload and as the site's relay
/// counted UDP payload: both `copies` × `bundle`, the relay's a little more.
fn check_wan(site: &Value, bundle: u64, copies: u64) {
    let name = site["name"].as_str().expect("site name");
    let expected = (copies * bundle) as f64;
    let wan = u(site, "wan_bytes") as f64;
    assert!(
        wan >= 0.99 * expected && wan <= 1.05 * expected,
        "{name} pulled {wan} B over the WAN for a {bundle} B bundle (expected {copies} ×)"
    );
    let link = u(site, "wan_link_bytes") as f64;
    assert!(
        link >= wan && link <= (1.0 + LINK_OVERHEAD) * expected,
        "{name}'s WAN relay carried {link} B origin → site for {wan} B of payload \
         (expected {copies} × {bundle} B plus at most {LINK_OVERHEAD} overhead)"
    );
}

/// The common part of every run: the built-in topology, the strategy, every edge done and
/// timed. Returns the bundle's stored bytes and the sites.
fn check_run(result: &Value, strategy: &str) -> (u64, Vec<Value>) {
    assert_eq!(
        result["strategy"], strategy,
        "the result names its strategy"
    );
    assert_eq!(result["topology"], "demo", "the built-in topology runs");
    let bundle = u(result, "bundle_bytes");
    assert!(bundle > 0, "empty bundle");
    assert!(
        result["all_edges_done_s"].as_f64().is_some(),
        "no all_edges_done_s in {result}"
    );
    let sites = result["sites"].as_array().expect("sites").clone();
    assert_eq!(sites.len() as u64, SITES);
    for site in &sites {
        let name = site["name"].as_str().expect("site name");
        assert_eq!(u(site, "edges_done"), EDGES, "{name}: not every edge done");
        let times = site["edge_done_s"].as_array().expect("edge_done_s");
        assert_eq!(times.len() as u64, EDGES, "{name}: one time per edge");
        assert_eq!(
            u(site, "lan_bytes"),
            u(site, "stager_egress_bytes") + u(site, "peer_bytes"),
            "{name}: lan_bytes is what the stager and the peers served"
        );
    }
    (bundle, sites)
}

/// What every run through stagers shows: every edge holds the bundle, and each site pulled it
/// across the WAN once. Returns the bundle's stored bytes and the sites.
fn check_common(result: &Value, strategy: &str) -> (u64, Vec<Value>) {
    let (bundle, sites) = check_run(result, strategy);
    for site in &sites {
        check_wan(site, bundle, 1);
    }
    (bundle, sites)
}

#[test]
fn direct_edges_each_pull_the_bundle_over_the_wan() {
    let result = run_demo("direct");
    let (bundle, sites) = check_run(&result, "direct");
    for site in &sites {
        let name = site["name"].as_str().expect("site name");
        check_wan(site, bundle, EDGES);
        assert_eq!(
            u(site, "lan_bytes"),
            0,
            "{name}: direct moves nothing inside the site"
        );
    }
}

#[test]
fn staged_edges_get_everything_from_their_stager() {
    let result = run_demo("staged");
    let (bundle, sites) = check_common(&result, "staged");
    let every_edge = (EDGES * bundle) as f64;
    for site in &sites {
        let name = site["name"].as_str().expect("site name");
        assert_eq!(
            u(site, "peer_bytes"),
            0,
            "{name}: staged edges served peers"
        );
        let egress = u(site, "stager_egress_bytes") as f64;
        assert!(
            egress >= 0.99 * every_edge && egress <= 1.05 * every_edge,
            "{name}: the stager sent {egress} B, expected about {EDGES} × {bundle} B"
        );
    }
}

#[test]
fn mesh_edges_get_everything_from_inside_their_site() {
    let result = run_demo("mesh");
    let (bundle, sites) = check_common(&result, "mesh");
    let every_edge = (EDGES * bundle) as f64;
    for site in &sites {
        let name = site["name"].as_str().expect("site name");
        let stager = u(site, "stager_egress_bytes");
        let peers = u(site, "peer_bytes");
        // Every edge got every byte from somewhere inside the site.
        assert!(
            (stager + peers) as f64 >= 0.99 * every_edge,
            "{name}: stager {stager} B + peers {peers} B is less than {EDGES} × {bundle} B"
        );
        // The stager is held to {STAGER_UPLOAD_MBIT} Mbit/s and edges ask it for one chunk at a
        // time, preferring peers: the edges always end up serving each other.
        assert!(
            peers > 0,
            "{name}: with a slow stager the edges never served each other"
        );
    }
}

/// `netsim demo --encrypt` (issue 16): the bundle crosses the WAN, the stagers and the peers
/// encrypted. The demo searches every stager's directory, every edge's store and the captured
/// WAN traffic for the plaintext markers it planted, and unpacks the bundle on every edge.
#[test]
fn an_encrypted_demo_leaks_no_planted_plaintext_and_every_edge_unpacks_the_tree() {
    let work = tempfile::tempdir().expect("tempdir");
    let result = run_demo_in(work.path(), "mesh", &["--encrypt"]);
    let (bundle, sites) = check_common(&result, "mesh");
    assert!(
        u(&result, "tree_bytes") > bundle,
        "the origin reads the payload size from the sealed metadata: {result}"
    );
    let enc = &result["encryption"];
    let markers: Vec<String> = enc["markers"]
        .as_array()
        .expect("markers")
        .iter()
        .map(|m| m.as_str().expect("marker").to_owned())
        .collect();
    assert_eq!(markers.len(), 3, "{enc}");
    assert_eq!(
        enc["found"],
        serde_json::json!([]),
        "plaintext leaked: {enc}"
    );
    // What was searched is what carried the bundle: every stager holds a copy, every edge
    // store one, and the captures hold every site's WAN traffic.
    let copies = |field: &str| u(enc, field) as f64 / bundle as f64;
    assert!(copies("stager_bytes") >= SITES as f64, "{enc}");
    assert!(
        copies("edge_store_bytes") >= (SITES * EDGES) as f64,
        "{enc}"
    );
    let wan: u64 = sites.iter().map(|s| u(s, "wan_link_bytes")).sum();
    assert!(
        u(enc, "capture_bytes") >= wan,
        "the captures hold less than the relays carried ({wan} B): {enc}"
    );
    assert_eq!(u(enc, "edges"), SITES * EDGES);
    assert_eq!(u(enc, "edges_identical"), SITES * EDGES, "{enc}");
    // The control: the same search finds every marker in the tree that was published, in
    // its bytes or its file names.
    let tree = work.path().join("demo").join("tree");
    let source = netsim::plaintext::search(&[tree], &markers).expect("search the tree");
    for marker in &markers {
        assert!(
            source.found.iter().any(|f| f.starts_with(marker.as_str())),
            "{marker} is not in the published tree: {:?}",
            source.found
        );
    }
}
