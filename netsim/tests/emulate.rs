//! `netsim emulate` with the real binaries on loopback, each site behind a WAN relay: the bytes
//! each strategy moves over each site's WAN, the simulator's calibration against it, the files
//! it writes, and that Ctrl-C stops every process it started.
//!
//! The tests run one at a time (each starts a whole mesh, and the machine may have two cores):
//! each holds [`SERIAL`] while it runs. No test asserts a time: how long each strategy takes is
//! a figure of `netsim compare --emulate` and of `cargo bench -p benches --bench calibration`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use netsim::emulate::{self, EmulateOptions};
use netsim::procs::{self, Binaries};
use netsim::report::RunResult;
use netsim::topology::{Strategy, Topology};

/// One emulation at a time: they would slow each other down past their timeouts.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// How long `netsim emulate` may take to stop after SIGINT.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// How long to wait for `netsim emulate` to reach the fan-out.
const START_TIMEOUT: Duration = Duration::from_secs(120);

/// How often the process table is read while waiting for processes.
const PROCESS_POLL: Duration = Duration::from_millis(50);

/// How long one `netsim emulate` run of a small topology may take.
const RUN_TIMEOUT: Duration = Duration::from_secs(300);

/// Two sites of three edges behind a 100 Mbit/s WAN of 5 ms each way, an 8 MiB bundle: quick to
/// emulate, and every edge's bytes cross its site's WAN with `direct`.
const SMALL_TWO_SITES: &str = r#"
name = "small-two-sites"
[bundle]
size_mib = 8
[origin]
uplink_mbit = 1000
[lan]
node_mbit = 1000
latency_ms = 0.2
[[sites]]
name = "east"
edges = 3
wan = { mbit = 100, latency_ms = 5 }
[[sites]]
name = "west"
edges = 3
wan = { mbit = 100, latency_ms = 5 }
"#;

/// Holds [`SERIAL`] from a plain test (outside any runtime).
fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    SERIAL.blocking_lock()
}

fn binaries() -> Binaries {
    Binaries::beside_current_exe().expect("build the binaries first: cargo build --release --bins")
}

fn netsim_bin() -> PathBuf {
    let path = binaries().path("netsim");
    assert!(
        path.is_file(),
        "build the binaries first: cargo build --release --bins"
    );
    path
}

fn topologies_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("topologies")
}

fn options() -> EmulateOptions {
    EmulateOptions {
        binaries: binaries(),
        work_dir: None,
        seed: 1,
        capture_dir: None,
        origin_args: Vec::new(),
    }
}

/// `wan_bytes / bundle_bytes` of every site.
fn wan_copies(run: &RunResult) -> Vec<(String, f64)> {
    run.sites
        .iter()
        .map(|s| (s.name.clone(), s.wan_bytes as f64 / run.bundle_bytes as f64))
        .collect()
}

fn assert_every_edge_done(run: &RunResult) {
    assert_eq!(
        run.edges_done(),
        run.total_edges(),
        "{}: every edge should hold the bundle; notes: {:#?}",
        run.strategy,
        run.notes
    );
    for site in &run.sites {
        assert_eq!(
            site.edge_done_s.len(),
            site.edges as usize,
            "{}: one time per edge of {}",
            run.strategy,
            site.name
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_crosses_each_wan_once_per_edge_and_staged_once_per_site() {
    let _serial = SERIAL.lock().await;
    let topo = Topology::from_toml_str(SMALL_TWO_SITES).expect("topology");
    let direct = emulate::emulate(&topo, Strategy::Direct, &options())
        .await
        .expect("emulate direct");
    let staged = emulate::emulate(&topo, Strategy::Staged, &options())
        .await
        .expect("emulate staged");
    assert_every_edge_done(&direct);
    assert_every_edge_done(&staged);
    let bundle = direct.bundle_bytes as f64;
    // The generated bundle is incompressible, so the stored bundle is the topology's size.
    let size = topo.bundle_bytes().expect("size") as f64;
    assert!(
        (bundle / size - 1.0).abs() < 0.05,
        "the stored bundle ({bundle} B) should be the topology's size ({size} B)"
    );

    // WAN bytes are UDP payload through the relay: the bundle plus QUIC's overhead (a few %).
    for (site, copies) in wan_copies(&direct) {
        let edges = f64::from(
            topo.sites
                .iter()
                .find(|s| s.name == site)
                .expect("site")
                .edges,
        );
        assert!(
            copies >= edges * 0.99 && copies <= edges * 1.15,
            "direct: site {site} should carry one copy per edge ({edges}) over its WAN, carried {copies:.2}"
        );
    }
    for (site, copies) in wan_copies(&staged) {
        assert!(
            (0.99..=1.15).contains(&copies),
            "staged: site {site} should carry one copy over its WAN, carried {copies:.2}"
        );
    }

    // Origin egress: one copy per edge with direct, one per site with staged.
    let sites = topo.sites.len() as f64;
    let edges = topo.total_edges() as f64;
    let direct_egress = direct.origin_egress_bytes as f64 / bundle;
    let staged_egress = staged.origin_egress_bytes as f64 / bundle;
    assert!(
        (direct_egress - edges).abs() < 0.1 * edges,
        "direct: origin egress should be {edges} copies, was {direct_egress:.2}"
    );
    assert!(
        (staged_egress - sites).abs() < 0.1 * sites,
        "staged: origin egress should be {sites} copies (one per site, not per edge), was {staged_egress:.2}"
    );
    // How much sooner staging finishes is a timing figure: `netsim compare --emulate` reports
    // it; the test prints it.
    let (t_direct, t_staged) = (
        direct.all_edges_done_s.expect("direct done"),
        staged.all_edges_done_s.expect("staged done"),
    );
    eprintln!(
        "direct: {t_direct:.2} s, WAN copies per site {:?}, origin egress {direct_egress:.2} copies; \
         staged: {t_staged:.2} s, WAN copies per site {:?}, origin egress {staged_egress:.2} copies",
        wan_copies(&direct),
        wan_copies(&staged)
    );
}

/// The simulator's byte accounting matches the emulation's, strategy by strategy: what crosses
/// each site's WAN, what the origin sends, that stagers serve with `staged` and peers with
/// `mesh`. Bytes do not depend on how busy the machine is, so this holds on any machine; the
/// timing half of the calibration (simulated against emulated time, ±20% on an idle machine)
/// is a benchmark: `cargo bench -p benches --bench calibration`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulate_is_calibrated_against_emulate() {
    let _serial = SERIAL.lock().await;
    let topo =
        Topology::load(&topologies_dir().join("calibration.toml")).expect("calibration topology");
    let out = tempfile::tempdir().expect("tempdir");
    let emulated = emulate::compare_emulated(&topo, &options(), &out.path().join("emulated"))
        .await
        .expect("compare --emulate");
    print!("{}", emulated.text());
    for file in ["compare.json", "compare.md", "compare.svg"] {
        assert!(out.path().join("emulated").join(file).is_file(), "{file}");
    }
    let simulated = netsim::compare::compare_simulated(&topo, 1, &out.path().join("simulated"))
        .expect("compare (simulated)");
    print!("{}", simulated.text());
    let bundle = emulated.bundle_bytes as f64;
    for (emu, sim) in emulated.rows.iter().zip(&simulated.rows) {
        let strategy = emu.strategy;
        assert_eq!(strategy, sim.strategy);
        assert!(
            emu.all_edges_done_s.is_some() && sim.all_edges_done_s.is_some(),
            "{strategy}: every edge holds the bundle in both"
        );
        // The emulation counts QUIC's framing and retransmissions too (a few %).
        let wan_emu = emu.wan_bytes_per_site_mean / bundle;
        let wan_sim = sim.wan_bytes_per_site_mean / bundle;
        assert!(
            (wan_emu - wan_sim).abs() <= 0.15 * wan_sim,
            "{strategy}: WAN copies per site: simulated {wan_sim:.2}, emulated {wan_emu:.2}"
        );
        let origin_emu = emu.origin_egress_bytes as f64 / bundle;
        let origin_sim = sim.origin_egress_bytes as f64 / bundle;
        assert!(
            (origin_emu - origin_sim).abs() <= 0.15 * origin_sim,
            "{strategy}: origin egress copies: simulated {origin_sim:.2}, emulated {origin_emu:.2}"
        );
        // Who serves the site: the stager with staged, the stager and peers with mesh, nobody
        // with direct.
        assert_eq!(
            emu.stager_egress_bytes > 0,
            sim.stager_egress_bytes > 0,
            "{strategy}: stager egress: simulated {} B, emulated {} B",
            sim.stager_egress_bytes,
            emu.stager_egress_bytes
        );
        // Peers serve nothing without the mesh. With it, how much they serve depends on how
        // fast the stager is next to them (the simulator may let the stager serve it all on a
        // small topology), so only the absence is asserted.
        if strategy != netsim::topology::Strategy::Mesh {
            assert_eq!(
                (emu.peer_bytes, sim.peer_bytes),
                (0, 0),
                "{strategy}: peer bytes without the mesh"
            );
        }
    }
}

#[test]
fn emulate_writes_result_files_that_parse() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let topo_path = dir.path().join("small.toml");
    std::fs::write(&topo_path, SMALL_TWO_SITES).expect("write topology");
    let out = dir.path().join("out");
    let stderr_path = dir.path().join("stderr.log");
    let mut child = Command::new(netsim_bin())
        .arg("emulate")
        .arg(&topo_path)
        .args(["--strategy", "mesh", "--out"])
        .arg(&out)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr_path).expect("stderr file"))
        .spawn()
        .expect("start netsim emulate");
    let status = procs::wait_for_exit(&mut child, RUN_TIMEOUT).expect("netsim emulate ends");
    let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
    assert!(
        status.success(),
        "netsim emulate failed with {status}:\n{stderr}"
    );

    let json = std::fs::read_to_string(out.join("result.json")).expect("result.json");
    let result: serde_json::Value = serde_json::from_str(&json).expect("result.json parses");
    assert_eq!(result["mode"], "emulate");
    assert_eq!(result["strategy"], "mesh");
    let sites = result["sites"].as_array().expect("sites");
    assert_eq!(sites.len(), 2);
    let bundle = result["bundle_bytes"].as_u64().expect("bundle_bytes");
    for site in sites {
        let wan = site["wan_bytes"].as_u64().expect("wan_bytes");
        assert!(
            wan >= bundle,
            "each site pulls the bundle over its WAN: {site}"
        );
        let times = site["edge_done_s"].as_array().expect("edge_done_s");
        assert_eq!(times.len(), 3, "one time per edge: {site}");
        assert!(times.iter().all(|t| t.as_f64().is_some_and(|t| t > 0.0)));
    }
    // And the same thing through the library's type.
    let typed: RunResult = serde_json::from_str(&json).expect("RunResult");
    assert!(typed.all_edges_done_s.is_some());

    let markdown = std::fs::read_to_string(out.join("result.md")).expect("result.md");
    assert!(markdown.contains("mesh (emulate)") && markdown.contains("| east |"));
    let svg = std::fs::read_to_string(out.join("completion.svg")).expect("completion.svg");
    assert!(svg.starts_with("<svg") && svg.contains("east") && svg.contains("west"));
}

#[test]
fn ctrl_c_stops_every_process_emulate_started() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let work_dir = dir.path().join("work");
    let mut child = Command::new(netsim_bin())
        .arg("emulate")
        .arg(topologies_dir().join("calibration.toml"))
        .args(["--strategy", "direct", "--out"])
        .arg(dir.path().join("out"))
        .arg("--work-dir")
        .arg(&work_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start netsim emulate");

    // Wait until edges are fetching: their fetch logs appear once the fan-out started.
    procs::wait_for_fanout(&mut child, &work_dir.join("logs"), START_TIMEOUT)
        .expect("netsim emulate reaches its fan-out");
    // netsim, the origin and edge fetches run.
    let started = stagecoach_testing::wait_until(START_TIMEOUT, PROCESS_POLL, || {
        procs::processes_mentioning(&work_dir).len() >= 3
    });
    assert!(
        started.is_ok(),
        "expected netsim, the origin and edge fetches to be running, found {:#?}",
        procs::processes_mentioning(&work_dir)
    );

    // SAFETY: kill(2) with the pid of a child we started.
    let rc = unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    assert_eq!(rc, 0, "cannot signal netsim emulate");
    let status = procs::wait_for_exit(&mut child, STOP_TIMEOUT).expect("netsim emulate stops");
    assert_eq!(
        status.code(),
        Some(130),
        "an interrupted emulation exits with 130, got {status}"
    );
    assert_nothing_left(&work_dir);
}

fn assert_nothing_left(work: &Path) {
    // Children get SIGKILL at worst; give the kernel a moment to reap them.
    let left = procs::wait_until_gone(work, Duration::from_secs(5));
    assert!(
        left.is_empty(),
        "processes left running after netsim emulate stopped: {left:#?}"
    );
}

/// The full `two-sites.toml` comparison, emulated and simulated side by side: about two minutes
/// on an idle 2-core machine. Run it for the figures:
/// `cargo test --release -p netsim --test emulate -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "about two minutes: run with --ignored --nocapture for the two-sites figures"]
async fn two_sites_compare_emulated_and_simulated() {
    let _serial = SERIAL.lock().await;
    let topo = Topology::load(&topologies_dir().join("two-sites.toml")).expect("two-sites");
    let out = tempfile::tempdir().expect("tempdir");
    let emulated = emulate::compare_emulated(&topo, &options(), &out.path().join("emulated"))
        .await
        .expect("compare --emulate");
    let simulated = netsim::compare::compare_simulated(&topo, 1, &out.path().join("simulated"))
        .expect("compare (simulated)");
    print!("{}\n{}", emulated.text(), simulated.text());
    for (emu, sim) in emulated.rows.iter().zip(&simulated.rows) {
        let t_emu = emu.all_edges_done_s.expect("every emulated edge done");
        let t_sim = sim.all_edges_done_s.expect("every simulated edge done");
        eprintln!(
            "{:<8} simulate {t_sim:>6.2} s  emulate {t_emu:>6.2} s  {:>+6.1}%",
            emu.strategy.as_str(),
            (t_sim - t_emu) / t_emu * 100.0
        );
    }
    let copies = |row: &netsim::compare::CompareRow| {
        row.wan_bytes_per_site_mean / emulated.bundle_bytes as f64
    };
    let edges_per_site = f64::from(topo.sites[0].edges);
    assert!((edges_per_site * 0.99..=edges_per_site * 1.15).contains(&copies(&emulated.rows[0])));
    for row in &emulated.rows[1..] {
        assert!((0.99..=1.15).contains(&copies(row)), "{:?}", row.strategy);
    }
}
