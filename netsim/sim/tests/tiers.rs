//! Backup (sibling) and regional stagers in the simulator (issue 15): how many copies of the
//! bundle cross each link, and what tiering does to the time a fleet takes.

use std::path::Path;

use netsim_sim::report::RunResult;
use netsim_sim::simulate::{simulate, simulate_with, SimOptions, Strategy};
use netsim_sim::topology::Topology;

const MIB: u64 = 1024 * 1024;

/// `topologies/tiered.toml` at the root of the workspace.
fn tiered_topology() -> Topology {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../topologies/tiered.toml");
    Topology::load(&path).unwrap()
}

/// The same fleet with no regions: every site's stagers pull from the origin.
fn flattened(topo: &Topology) -> Topology {
    let mut flat = topo.clone();
    flat.name = format!("{} (flat)", topo.name);
    flat.regions.clear();
    for site in &mut flat.sites {
        site.region = None;
    }
    flat
}

fn close(actual: f64, expected: f64, tolerance: f64) -> bool {
    (actual - expected).abs() <= tolerance * expected.abs()
}

fn times_bundle(bytes: u64, result: &RunResult) -> f64 {
    bytes as f64 / result.bundle_bytes as f64
}

#[test]
fn a_tiered_fleet_sends_one_copy_per_region_and_beats_the_flat_one_on_a_busy_origin() {
    let tiered_topo = tiered_topology();
    assert_eq!(tiered_topo.regions.len(), 20);
    assert_eq!(tiered_topo.sites.len(), 1000);
    assert_eq!(tiered_topo.total_edges(), 100_000);
    let flat_topo = flattened(&tiered_topo);

    let tiered = simulate(&tiered_topo, Strategy::Mesh, 1).unwrap();
    assert!(tiered
        .notes
        .iter()
        .any(|n| n.contains("20 regions simulated as 1 class")));
    let flat = simulate(&flat_topo, Strategy::Mesh, 1).unwrap();
    let bundle = tiered.bundle_bytes;
    assert_eq!(bundle, 256 * MIB);
    assert_eq!(tiered.edges_done(), 100_000);
    assert_eq!(flat.edges_done(), 100_000);

    let tiered_s = tiered.all_edges_done_s.unwrap();
    let flat_s = flat.all_edges_done_s.unwrap();
    eprintln!(
        "1000 sites x 100 edges, 256 MiB, mesh: tiered (20 regions) {tiered_s:.1} s, origin egress \
         {:.2}x bundle; flat {flat_s:.1} s, origin egress {:.2}x bundle; flat / tiered = {:.2}",
        times_bundle(tiered.origin_egress_bytes, &tiered),
        times_bundle(flat.origin_egress_bytes, &flat),
        flat_s / tiered_s,
    );

    // The origin sends one copy per region, against one per site flat.
    assert!(
        close(
            tiered.origin_egress_bytes as f64,
            20.0 * bundle as f64,
            0.01
        ),
        "tiered origin egress {:.3}x bundle",
        times_bundle(tiered.origin_egress_bytes, &tiered)
    );
    assert!(
        close(
            flat.origin_egress_bytes as f64,
            1000.0 * bundle as f64,
            0.01
        ),
        "flat origin egress {:.3}x bundle",
        times_bundle(flat.origin_egress_bytes, &flat)
    );
    // Each region pulled the bundle once and served each of its 50 sites once.
    assert_eq!(tiered.regions.len(), 20);
    for region in &tiered.regions {
        assert_eq!(region.sites, 50, "{}", region.name);
        assert!(
            close(region.pulled_bytes as f64, bundle as f64, 0.01),
            "{}",
            region.name
        );
        assert!(
            close(region.served_bytes as f64, 50.0 * bundle as f64, 0.01),
            "{}",
            region.name
        );
    }
    // Every site still receives one copy across its own WAN, from its region.
    for site in &tiered.sites {
        assert!(
            close(site.wan_bytes as f64, bundle as f64, 0.01),
            "{}",
            site.name
        );
    }
    assert!(flat.regions.is_empty());

    // Flat, the origin's uplink is the bottleneck: 1000 copies through 10 Gbit/s take at least
    // the floor, and the fleet takes about that. Tiered, the origin sends 20 copies and every
    // region's link serves its own 50 sites at once, so the fleet finishes sooner.
    let origin_bound_s = 1000.0 * bundle as f64 / flat_topo.origin_uplink_bytes_per_s();
    assert!(flat_s >= origin_bound_s, "{flat_s} < {origin_bound_s}");
    assert!(flat_s < 1.2 * flat.line_rate_floor_s, "{flat_s}");
    assert!(tiered_s < flat_s, "tiered {tiered_s} s, flat {flat_s} s");
    assert!(tiered.line_rate_floor_s < flat.line_rate_floor_s);
    assert!(tiered_s >= tiered.line_rate_floor_s);

    let markdown = tiered.markdown();
    assert!(
        markdown.contains("| origin | 1000 | 5.0 GiB | 20.00 |"),
        "{markdown}"
    );
    assert!(markdown.contains("| region eu-west | 50 |"), "{markdown}");
}

/// One site of `stagers` stagers and `edges` edges, optionally in a region of
/// `regional_stagers` stagers; 64 MiB in 256 KiB pieces.
fn site_topology(stagers: u32, edges: u32, regional_stagers: Option<u32>) -> Topology {
    let mut text = format!(
        r#"
name = "siblings"
[bundle]
size_mib = 64
piece_kib = 256
[origin]
uplink_mbit = 1000
[lan]
node_mbit = 1000
latency_ms = 0.1
[[sites]]
name = "dc"
stagers = {stagers}
edges = {edges}
wan = {{ mbit = 200, latency_ms = 10 }}
"#
    );
    if let Some(regional) = regional_stagers {
        text.push_str(&format!(
            "region = \"eu\"\n[[regions]]\nname = \"eu\"\nstagers = {regional}\n\
             wan = {{ mbit = 500, latency_ms = 20 }}\n"
        ));
    }
    Topology::from_toml_str(&text).unwrap()
}

#[test]
fn two_stagers_of_a_site_pull_the_bundle_across_its_wan_once_between_them() {
    let topo = site_topology(2, 20, None);
    for strategy in [Strategy::Staged, Strategy::Mesh] {
        let result = simulate(&topo, strategy, 1).unwrap();
        let bundle = result.bundle_bytes as f64;
        let site = &result.sites[0];
        assert_eq!(site.edges_done, 20, "{strategy}");
        assert!(
            close(site.wan_bytes as f64, bundle, 0.01),
            "{strategy}: site WAN {:.3}x bundle",
            site.wan_bytes as f64 / bundle
        );
        assert!(close(result.origin_egress_bytes as f64, bundle, 0.01));
        assert_eq!(result.site_stagers.len(), 1);
        let pulled = &result.site_stagers[0].pulled_bytes;
        eprintln!(
            "{strategy}: 2 stagers pulled {:.3} and {:.3} of the bundle, site WAN {:.3}x bundle",
            pulled[0] as f64 / bundle,
            pulled[1] as f64 / bundle,
            site.wan_bytes as f64 / bundle
        );
        assert_eq!(pulled.len(), 2);
        assert_eq!(pulled.iter().sum::<u64>(), site.wan_bytes);
        for &share in pulled {
            let fraction = share as f64 / bundle;
            assert!((0.4..=0.6).contains(&fraction), "{strategy}: {fraction}");
        }
        // Each stager copied the other's half over the LAN, beside serving the edges.
        assert!(
            site.stager_egress_bytes as f64 >= 0.9 * bundle,
            "{strategy}"
        );
    }
    // With one stager nothing is listed, and the WAN still carries one copy.
    let single = simulate(&site_topology(1, 20, None), Strategy::Staged, 1).unwrap();
    assert!(single.site_stagers.is_empty());
    assert_eq!(single.sites[0].wan_bytes, single.bundle_bytes);
}

#[test]
fn two_regional_stagers_split_the_regions_pull_and_serve_a_site_of_two_stagers() {
    let topo = site_topology(2, 10, Some(2));
    let result = simulate(&topo, Strategy::Mesh, 1).unwrap();
    let bundle = result.bundle_bytes as f64;
    assert_eq!(result.edges_done(), 10);
    let region = &result.regions[0];
    eprintln!(
        "region: pulled {:.3}x bundle ({:?}), served {:.3}x; site WAN {:.3}x; origin {:.3}x",
        region.pulled_bytes as f64 / bundle,
        region.stager_pulled_bytes,
        region.served_bytes as f64 / bundle,
        result.sites[0].wan_bytes as f64 / bundle,
        result.origin_egress_bytes as f64 / bundle,
    );
    assert!(close(region.pulled_bytes as f64, bundle, 0.01));
    assert!(close(result.origin_egress_bytes as f64, bundle, 0.01));
    for &share in &region.stager_pulled_bytes {
        let fraction = share as f64 / bundle;
        assert!((0.4..=0.6).contains(&fraction), "{fraction}");
    }
    // The site's stagers may race for a piece both regional stagers hold (endgame duplicates):
    // a cancelled copy costs its partial bytes, within 5% here.
    let site_wan = result.sites[0].wan_bytes as f64;
    assert!((bundle..=1.05 * bundle).contains(&site_wan), "{site_wan}");
    assert!(close(region.served_bytes as f64, site_wan, 1e-9));

    // In `direct` every edge pulls from the origin across its site's WAN; regions idle.
    let direct = simulate(&topo, Strategy::Direct, 1).unwrap();
    assert_eq!(direct.edges_done(), 10);
    assert_eq!(direct.origin_egress_bytes, 10 * direct.bundle_bytes);
    assert_eq!(direct.regions[0].pulled_bytes, 0);
    assert_eq!(direct.regions[0].served_bytes, 0);
}

#[test]
fn folding_sites_of_a_region_matches_simulating_each() {
    // 3 regions of 4 identical sites (a and c identical), and 2 flat sites: folded, 2 classes
    // of regions and 3 of sites.
    let mut text = String::from(
        r#"
name = "folding"
[bundle]
size_mib = 32
piece_kib = 512
[origin]
uplink_mbit = 400
[lan]
node_mbit = 1000
latency_ms = 0.1
[[regions]]
name = "a"
wan = { mbit = 300, latency_ms = 15 }
[[regions]]
name = "b"
stagers = 2
wan = { mbit = 300, latency_ms = 25 }
[[regions]]
name = "c"
wan = { mbit = 300, latency_ms = 15 }
"#,
    );
    for region in ["a", "b", "c"] {
        text.push_str(&format!(
            "[[site_groups]]\ncount = 4\nname_prefix = \"{region}\"\nstagers = 2\nedges = 6\n\
             wan = {{ mbit = 100, latency_ms = 10 }}\nregion = \"{region}\"\n"
        ));
    }
    text.push_str(
        "[[site_groups]]\ncount = 2\nname_prefix = \"flat\"\nedges = 6\n\
         wan = { mbit = 100, latency_ms = 10 }\n",
    );
    let topo = Topology::from_toml_str(&text).unwrap();
    for strategy in [Strategy::Staged, Strategy::Mesh] {
        let folded = simulate(&topo, strategy, 1).unwrap();
        let each = simulate_with(
            &topo,
            strategy,
            &SimOptions {
                seed: 1,
                fold_identical_sites: false,
                ..SimOptions::default()
            },
        )
        .unwrap();
        assert!(folded
            .notes
            .iter()
            .any(|n| n.contains("14 sites simulated as 3 classes")));
        assert!(folded
            .notes
            .iter()
            .any(|n| n.contains("3 regions simulated as 2 classes")));
        let (a, b) = (
            folded.all_edges_done_s.unwrap(),
            each.all_edges_done_s.unwrap(),
        );
        eprintln!("{strategy}: folded {a:.3} s, each site {b:.3} s");
        assert!(close(a, b, 0.03), "{strategy}: folded {a} s, each {b} s");
        // One copy per region and per flat site.
        let bundle = folded.bundle_bytes as f64;
        for result in [&folded, &each] {
            assert!(close(result.origin_egress_bytes as f64, 5.0 * bundle, 0.01));
            assert_eq!(result.site_stagers.len(), 12);
            assert_eq!(result.regions.len(), 3);
            for region in &result.regions {
                assert_eq!(region.sites, 4);
                assert!(close(region.served_bytes as f64, 4.0 * bundle, 0.01));
            }
        }
        assert_eq!(folded.regions, {
            let mut regions = each.regions.clone();
            // Timing differs slightly between the runs; the copies do not.
            for (r, f) in regions.iter_mut().zip(&folded.regions) {
                assert!(close(r.served_bytes as f64, f.served_bytes as f64, 0.01));
                assert!(close(r.pulled_bytes as f64, f.pulled_bytes as f64, 0.01));
                r.served_bytes = f.served_bytes;
                r.pulled_bytes = f.pulled_bytes;
                r.stager_pulled_bytes = f.stager_pulled_bytes.clone();
            }
            regions
        });
    }
}

#[test]
fn a_result_without_regions_reads_and_writes_as_before() {
    let result = simulate(&site_topology(1, 4, None), Strategy::Staged, 1).unwrap();
    let value = serde_json::to_value(&result).unwrap();
    assert!(value.get("regions").is_none());
    assert!(value.get("site_stagers").is_none());
    let back: RunResult = serde_json::from_value(value).unwrap();
    assert_eq!(back, result);
    assert!(!result.markdown().contains("| upstream |"));
}
