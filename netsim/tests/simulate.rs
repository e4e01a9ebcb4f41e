//! The simulator, the topology format and the result files, driven in-process (no binaries, no
//! sockets). The scale run (200 sites × 500 edges under a minute of wall time) is a benchmark:
//! `cargo bench -p benches --bench simulate_scale`.

use std::path::{Path, PathBuf};

use netsim::compare::{compare_simulated, CompareTable};
use netsim::report::RunResult;
use netsim::simulate::{max_min_rates, simulate, simulate_with, FlowLinks, SimOptions, Strategy};
use netsim::topology::{Topology, TopologyError};

const MIB: u64 = 1024 * 1024;

fn topologies_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("topologies")
}

/// A fresh directory under the system temp dir.
fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("netsim-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A topology of `sites` sites with distinct WAN rates (so they are not folded unless asked).
fn sites_topology(
    sites: usize,
    edges: u32,
    wan_mbit: f64,
    lan_mbit: f64,
    bundle_mib: u64,
) -> Topology {
    let mut text = format!(
        r#"
name = "test"
[bundle]
size_mib = {bundle_mib}
piece_kib = 1024
[origin]
uplink_mbit = 100000
[lan]
node_mbit = {lan_mbit}
latency_ms = 0.1
"#
    );
    for i in 0..sites {
        text.push_str(&format!(
            "[[sites]]\nname = \"s{i}\"\nedges = {edges}\nwan = {{ mbit = {}, latency_ms = 10 }}\n",
            wan_mbit + i as f64
        ));
    }
    Topology::from_toml_str(&text).unwrap()
}

fn close(actual: f64, expected: f64, tolerance: f64) -> bool {
    (actual - expected).abs() <= tolerance * expected.abs()
}

// ---- byte accounting ------------------------------------------------------------------------

#[test]
fn staged_pulls_the_bundle_over_each_wan_once() {
    let topo = sites_topology(3, 6, 200.0, 1000.0, 16);
    let result = simulate(&topo, Strategy::Staged, 1).unwrap();
    let bundle = 16 * MIB;
    assert_eq!(result.bundle_bytes, bundle);
    for site in &result.sites {
        assert_eq!(site.edges_done, 6);
        assert!(
            close(site.wan_bytes as f64, bundle as f64, 0.001),
            "site {} pulled {} bytes over its WAN",
            site.name,
            site.wan_bytes
        );
        assert_eq!(site.peer_bytes, 0);
        assert!(site.stager_egress_bytes >= 6 * bundle);
    }
    assert!(close(
        result.origin_egress_bytes as f64,
        (3 * bundle) as f64,
        0.001
    ));
}

#[test]
fn direct_pulls_one_copy_per_edge_over_the_wan() {
    let topo = sites_topology(2, 5, 200.0, 1000.0, 8);
    let result = simulate(&topo, Strategy::Direct, 1).unwrap();
    let bundle = 8 * MIB;
    for site in &result.sites {
        assert_eq!(site.wan_bytes, 5 * bundle, "site {}", site.name);
        assert_eq!(site.stager_egress_bytes, 0);
        assert_eq!(site.peer_bytes, 0);
    }
    assert_eq!(result.origin_egress_bytes, 10 * bundle);
}

#[test]
fn mesh_offloads_a_stager_whose_lan_port_is_the_bottleneck() {
    // A fast WAN and 16 edges behind one 1 Gbit/s stager port: staged is bound by the stager's
    // uplink, mesh spreads the serving over the edges.
    let topo = sites_topology(1, 16, 10_000.0, 1000.0, 32);
    let staged = simulate(&topo, Strategy::Staged, 1).unwrap();
    let mesh = simulate(&topo, Strategy::Mesh, 1).unwrap();
    let (staged_site, mesh_site) = (&staged.sites[0], &mesh.sites[0]);
    assert!(
        mesh_site.stager_egress_bytes < staged_site.stager_egress_bytes,
        "mesh stager egress {} not below staged {}",
        mesh_site.stager_egress_bytes,
        staged_site.stager_egress_bytes
    );
    assert!(mesh_site.peer_bytes > 0);
    assert!(mesh.all_edges_done_s.unwrap() < staged.all_edges_done_s.unwrap());
    // Both still cross the WAN once.
    assert!(close(mesh_site.wan_bytes as f64, (32 * MIB) as f64, 0.001));
}

// ---- timing -----------------------------------------------------------------------------------

#[test]
fn one_piece_over_one_link_takes_size_over_rate_plus_round_trips() {
    // One edge, one piece, direct: the WAN (100 Mbit/s, 10 ms each way) is the only bottleneck.
    let topo = Topology::from_toml_str(
        r#"
name = "one-link"
strategy = "direct"
[bundle]
size_mib = 50
piece_kib = 51200
[origin]
uplink_mbit = 100000
[lan]
node_mbit = 100000
latency_ms = 0
[[sites]]
name = "only"
edges = 1
wan = { mbit = 100, latency_ms = 10 }
"#,
    )
    .unwrap();
    let result = simulate(&topo, Strategy::Direct, 1).unwrap();
    // The link's rate counts wire bytes, so the bundle moves at the protocol's efficiency; and
    // the session is set up (handshake, name, manifest) before the piece's own round trip.
    use netsim::simulate::fleet::{wire_efficiency, SESSION_SETUP_ROUND_TRIPS};
    let line_rate = (50 * MIB) as f64 / (100e6 / 8.0) + 0.020;
    let expected = (50 * MIB) as f64 / (100e6 / 8.0 * wire_efficiency())
        + 0.020 * f64::from(1 + SESSION_SETUP_ROUND_TRIPS);
    let actual = result.all_edges_done_s.unwrap();
    assert!(
        close(actual, expected, 0.02),
        "took {actual} s, expected {expected} s"
    );
    // The floor is that path at line rate, with one round trip.
    assert!(close(result.line_rate_floor_s, line_rate, 1e-9));
}

#[test]
fn staged_on_a_slow_wan_stays_near_the_floor() {
    let topo = Topology::load(&topologies_dir().join("two-sites.toml")).unwrap();
    let result = simulate(&topo, Strategy::Staged, 1).unwrap();
    let ratio = result.ratio_to_floor().unwrap();
    assert!((1.0..1.3).contains(&ratio), "staged at {ratio}× the floor");
}

#[test]
fn loss_slows_a_wan_down() {
    let lossless = sites_topology(1, 2, 100.0, 1000.0, 16);
    let mut lossy = lossless.clone();
    lossy.sites[0].wan.loss = 0.001;
    let fast = simulate(&lossless, Strategy::Staged, 1).unwrap();
    let slow = simulate(&lossy, Strategy::Staged, 1).unwrap();
    assert!(slow.all_edges_done_s.unwrap() > 1.5 * fast.all_edges_done_s.unwrap());
}

#[test]
fn same_seed_same_result() {
    let topo = sites_topology(2, 8, 100.0, 1000.0, 8);
    let a = simulate(&topo, Strategy::Mesh, 9).unwrap();
    let b = simulate(&topo, Strategy::Mesh, 9).unwrap();
    assert_eq!(a, b);
}

#[test]
fn folding_identical_sites_matches_simulating_each() {
    let topo = Topology::from_toml_str(
        r#"
name = "folded"
[bundle]
size_mib = 16
piece_kib = 1024
[origin]
uplink_mbit = 300
[lan]
node_mbit = 1000
[[site_groups]]
count = 4
name_prefix = "dc"
edges = 3
wan = { mbit = 100, latency_ms = 5 }
"#,
    )
    .unwrap();
    for strategy in Strategy::ALL {
        let folded = simulate(&topo, strategy, 1).unwrap();
        let each = simulate_with(
            &topo,
            strategy,
            &SimOptions {
                fold_identical_sites: false,
                ..SimOptions::default()
            },
        )
        .unwrap();
        assert!(folded
            .notes
            .iter()
            .any(|n| n.contains("4 sites simulated as 1")));
        let (f, e) = (
            folded.all_edges_done_s.unwrap(),
            each.all_edges_done_s.unwrap(),
        );
        assert!(close(f, e, 0.03), "{strategy}: folded {f} s, each {e} s");
        assert!(close(
            folded.origin_egress_bytes as f64,
            each.origin_egress_bytes as f64,
            0.01
        ));
        assert_eq!(folded.sites.len(), 4);
        assert_eq!(folded.sites[3].name, "dc-003");
    }
}

// ---- max-min fairness ---------------------------------------------------------------------------

#[test]
fn two_flows_on_one_link_get_half_each() {
    let rates = max_min_rates(&[100.0], &[FlowLinks::new(&[0]), FlowLinks::new(&[0])]);
    assert_eq!(rates, vec![50.0, 50.0]);
}

#[test]
fn a_flow_bottlenecked_elsewhere_leaves_the_rest_to_others() {
    // Link 0 (100) carries both flows; link 1 (10) also carries the second.
    let rates = max_min_rates(
        &[100.0, 10.0],
        &[FlowLinks::new(&[0]), FlowLinks::new(&[0, 1])],
    );
    assert_eq!(rates, vec![90.0, 10.0]);
}

#[test]
fn max_min_on_a_parking_lot() {
    // Links 0..3 of capacity 1; a long flow crosses all three, each link also has a short flow.
    let mut flows = vec![FlowLinks::new(&[0, 1, 2])];
    for l in 0..3 {
        flows.push(FlowLinks::new(&[l]));
    }
    let rates = max_min_rates(&[1.0, 1.0, 1.0], &flows);
    for rate in rates {
        assert!(close(rate, 0.5, 1e-12));
    }
    // Raise link 1: it no longer constrains anyone, the others still split their link.
    let rates = max_min_rates(&[1.0, 5.0, 1.0], &flows);
    assert!(close(rates[0], 0.5, 1e-12));
    assert!(close(rates[2], 4.5, 1e-12));
}

// ---- topology files -----------------------------------------------------------------------------

fn parse_error(text: &str) -> String {
    match Topology::from_toml_str(text) {
        Ok(_) => panic!("accepted:\n{text}"),
        Err(error) => error.to_string(),
    }
}

const VALID: &str = r#"
name = "t"
[bundle]
size_mib = 1
[origin]
uplink_mbit = 100
[lan]
node_mbit = 1000
[[sites]]
name = "a"
edges = 2
wan = { mbit = 50, latency_ms = 20, loss = 0.01 }
"#;

#[test]
fn topology_errors_name_the_field() {
    assert!(Topology::from_toml_str(VALID).is_ok());
    let cases = [
        ("loss = 0.01", "loss = 1.0", "sites[0].wan.loss"),
        ("loss = 0.01", "loss = -0.1", "sites[0].wan.loss"),
        ("mbit = 50", "mbit = 0", "sites[0].wan.mbit"),
        (
            "latency_ms = 20",
            "latency_ms = -1",
            "sites[0].wan.latency_ms",
        ),
        ("edges = 2", "edges = 0", "sites[0].edges"),
        ("uplink_mbit = 100", "uplink_mbit = 0", "origin.uplink_mbit"),
        ("node_mbit = 1000", "node_mbit = -5", "lan.node_mbit"),
        ("size_mib = 1", "size_mib = 0", "bundle.size_mib"),
        ("size_mib = 1", "size_mib = 1\npath = \"/tmp\"", "bundle"),
        (
            "size_mib = 1",
            "size_mib = 1\npiece_kib = 0",
            "bundle.piece_kib",
        ),
        ("edges = 2", "edges = 2\nlan_mbit = 0", "sites[0].lan_mbit"),
        ("edges = 2", "edges = 2\nstagers = 0", "sites[0].stagers"),
        ("name = \"t\"", "name = \"\"", "name"),
    ];
    for (from, to, field) in cases {
        let message = parse_error(&VALID.replacen(from, to, 1));
        assert!(
            message.contains(&format!("`{field}`")),
            "{to:?}: {message:?} does not name `{field}`"
        );
    }
    // Serde's own errors name the key too.
    let message = parse_error(&VALID.replacen("edges = 2", "edgez = 2", 1));
    assert!(message.contains("edgez"), "{message}");
    let message = parse_error(&VALID.replacen("mbit = 50", "mbit = \"fast\"", 1));
    assert!(message.contains("mbit"), "{message}");
    // Groups and duplicate names.
    let group = format!(
        "{}\n[[site_groups]]\ncount = 2\nname_prefix = \"g\"\nedges = 1\nwan = {{ mbit = 1, loss = 2 }}\n",
        VALID
    );
    assert!(parse_error(&group).contains("`site_groups[0].wan.loss`"));
    let twice = format!("{VALID}\n[[sites]]\nname = \"a\"\nedges = 1\nwan = {{ mbit = 1 }}\n");
    assert!(parse_error(&twice).contains("`sites[1].name`"));
    assert!(matches!(
        Topology::from_toml_str("name = ").unwrap_err(),
        TopologyError::Parse(_)
    ));
}

#[test]
fn site_groups_expand_in_order() {
    let text = format!(
        "{VALID}\n[[site_groups]]\ncount = 3\nname_prefix = \"dc\"\nedges = 7\nlan_mbit = 25000\nwan = {{ mbit = 10 }}\n"
    );
    let topo = Topology::from_toml_str(&text).unwrap();
    let names: Vec<&str> = topo.sites.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["a", "dc-000", "dc-001", "dc-002"]);
    assert_eq!(topo.total_edges(), 2 + 3 * 7);
    assert_eq!(topo.total_stagers(), 4);
    assert_eq!(topo.sites[0].lan_mbit, 1000.0);
    assert_eq!(topo.sites[1].lan_mbit, 25000.0);
    assert_eq!(topo.strategy, Strategy::Mesh);
}

#[test]
fn line_rate_floor_takes_the_slowest_site_and_the_origin() {
    let topo = Topology::from_toml_str(VALID).unwrap();
    // 1 MiB over min(50 Mbit/s × 0.99, 1000 Mbit/s) plus 2 × 20 ms.
    let expected = MIB as f64 / (50e6 / 8.0 * 0.99) + 0.040;
    assert!(close(topo.line_rate_floor_s(MIB), expected, 1e-9));
    // A thin origin uplink sets the floor when it must carry one copy per site.
    let thin = VALID.replacen("uplink_mbit = 100", "uplink_mbit = 10", 1);
    let topo = Topology::from_toml_str(&thin).unwrap();
    let expected = MIB as f64 / (10e6 / 8.0) + 0.040;
    assert!(close(topo.line_rate_floor_s(MIB), expected, 1e-9));
}

#[test]
fn shipped_topologies_load() {
    let two = Topology::load(&topologies_dir().join("two-sites.toml")).unwrap();
    assert_eq!((two.sites.len(), two.total_edges()), (2, 8));
    assert_eq!(two.bundle_bytes().unwrap(), 64 * MIB);
    let continent = Topology::load(&topologies_dir().join("continent.toml")).unwrap();
    assert_eq!(
        (continent.sites.len(), continent.total_edges()),
        (50, 10_000)
    );
    let fleet = Topology::load(&topologies_dir().join("fleet-200x500.toml")).unwrap();
    assert_eq!((fleet.sites.len(), fleet.total_edges()), (200, 100_000));
}

#[test]
fn bundle_path_uses_the_tree_size() {
    let dir = scratch_dir("tree");
    std::fs::create_dir_all(dir.join("tree/sub")).unwrap();
    std::fs::write(dir.join("tree/a"), vec![1u8; 3000]).unwrap();
    std::fs::write(dir.join("tree/sub/b"), vec![2u8; 5000]).unwrap();
    let text = VALID.replacen("size_mib = 1", "path = \"tree\"\npiece_kib = 4", 1);
    std::fs::write(dir.join("topo.toml"), text).unwrap();
    let topo = Topology::load(&dir.join("topo.toml")).unwrap();
    assert_eq!(topo.bundle_bytes().unwrap(), 8000);
    let result = simulate(&topo, Strategy::Staged, 1).unwrap();
    assert_eq!(result.sites[0].wan_bytes, 8000);
    let _ = std::fs::remove_dir_all(&dir);
}

// ---- result files -------------------------------------------------------------------------------

/// A minimal well-formedness check: one root `<svg>`, every tag closed in order, no stray `<`
/// or `&` in text.
fn assert_well_formed_svg(svg: &str) {
    assert!(
        svg.trim_start().starts_with("<svg "),
        "does not start with <svg"
    );
    let mut stack: Vec<String> = Vec::new();
    let mut rest = svg;
    let mut roots = 0;
    while let Some(start) = rest.find('<') {
        let text = &rest[..start];
        assert!(!text.contains('>'), "stray > in text {text:?}");
        check_entities(text);
        let end = rest[start..].find('>').expect("unclosed tag") + start;
        let tag = &rest[start + 1..end];
        assert!(!tag.contains('<'), "< inside tag {tag:?}");
        if let Some(name) = tag.strip_prefix('/') {
            assert_eq!(
                stack.pop().as_deref(),
                Some(name.trim()),
                "mismatched </{name}>"
            );
        } else if !tag.ends_with('/') {
            let name = tag.split_whitespace().next().unwrap().to_string();
            if stack.is_empty() {
                roots += 1;
            }
            stack.push(name);
        } else {
            check_attributes(tag);
        }
        rest = &rest[end + 1..];
    }
    assert!(stack.is_empty(), "unclosed {stack:?}");
    assert_eq!(roots, 1);
}

fn check_entities(text: &str) {
    for (i, _) in text.match_indices('&') {
        let entity = &text[i..text[i..].find(';').map_or(text.len(), |e| i + e + 1)];
        assert!(
            ["&amp;", "&lt;", "&gt;", "&quot;"].contains(&entity),
            "bad entity {entity:?}"
        );
    }
}

fn check_attributes(tag: &str) {
    assert_eq!(
        tag.matches('"').count() % 2,
        0,
        "unbalanced quotes in {tag:?}"
    );
    check_entities(tag);
}

#[test]
fn result_files_are_written_and_the_svg_is_well_formed() {
    let topo = Topology::load(&topologies_dir().join("two-sites.toml")).unwrap();
    let result = simulate(&topo, Strategy::Mesh, 1).unwrap();
    let dir = scratch_dir("report");
    result.write_files(&dir).unwrap();
    let json = std::fs::read_to_string(dir.join("result.json")).unwrap();
    let back: RunResult = serde_json::from_str(&json).unwrap();
    assert_eq!(back, result);
    let value: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(value["mode"], "simulate");
    assert_eq!(value["strategy"], "mesh");
    assert!(value["sites"][0]["completion"][0].is_array());
    let markdown = std::fs::read_to_string(dir.join("result.md")).unwrap();
    assert!(markdown.contains("| east |"));
    let svg = std::fs::read_to_string(dir.join("completion.svg")).unwrap();
    assert_well_formed_svg(&svg);
    assert!(svg.contains(">east</text>") && svg.contains("line-rate floor"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn many_sites_chart_as_bands() {
    let topo = sites_topology(12, 2, 100.0, 1000.0, 4);
    let result = simulate(&topo, Strategy::Staged, 1).unwrap();
    let svg = result.completion_svg();
    assert_well_formed_svg(&svg);
    assert!(svg.contains("12 sites: min–max") && svg.contains("median site"));
    assert!(!svg.contains(">s11</text>"));
}

#[test]
fn compare_tabulates_the_three_strategies() {
    let topo = Topology::load(&topologies_dir().join("two-sites.toml")).unwrap();
    let dir = scratch_dir("compare");
    let table = compare_simulated(&topo, 1, &dir).unwrap();
    let strategies: Vec<Strategy> = table.rows.iter().map(|r| r.strategy).collect();
    assert_eq!(strategies, Strategy::ALL);
    let bundle = (64 * MIB) as f64;
    let direct = &table.rows[0];
    assert!(close(direct.wan_bytes_per_site_mean, 4.0 * bundle, 1e-9));
    for row in &table.rows[1..] {
        assert!(close(row.wan_bytes_per_site_mean, bundle, 0.001));
        assert!(row.all_edges_done_s < direct.all_edges_done_s);
    }
    for row in &table.rows {
        assert!(row.ratio_to_floor.unwrap() >= 1.0);
    }
    for file in [
        "compare.json",
        "compare.md",
        "compare.svg",
        "mesh/result.json",
    ] {
        assert!(dir.join(file).is_file(), "{file} missing");
    }
    assert_well_formed_svg(&std::fs::read_to_string(dir.join("compare.svg")).unwrap());
    let back: CompareTable =
        serde_json::from_str(&std::fs::read_to_string(dir.join("compare.json")).unwrap()).unwrap();
    assert_eq!(back.rows, table.rows);
    let text = table.text();
    assert!(text.contains("direct") && text.contains("÷ floor"));
    let _ = std::fs::remove_dir_all(&dir);
}
