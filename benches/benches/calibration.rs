//! The timing half of the simulator's calibration: `netsim simulate` against `netsim emulate`
//! (the real binaries on loopback behind WAN relays) on `netsim/topologies/calibration.toml`,
//! strategy by strategy. The simulator is calibrated when its time until every edge holds the
//! bundle is within ±20% of the emulated one.
//!
//! Emulated times measure this machine as much as the network: other work only ever slows an
//! emulation down. So this is a benchmark, not a test (`netsim/tests/emulate.rs` checks the
//! byte accounting, which does not depend on load): each strategy's time is the fastest of
//! `STAGECOACH_CALIBRATION_ROUNDS` (default 2) emulations, the load average is printed before
//! and after, and the verdict is the exit status. Run it on an idle machine, after building the
//! binaries:
//!
//! ```text
//! cargo build --release --bins
//! cargo bench -p benches --bench calibration
//! ```
//!
//! `STAGECOACH_CALIBRATION_TOPOLOGY` names another file of `netsim/topologies/`, for example
//! `calibration-tiered.toml` (a region's stager and sites of two sibling stagers).

use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result};
use netsim::emulate::{self, EmulateOptions};
use netsim::procs::Binaries;
use netsim::topology::{Strategy, Topology};

/// The largest relative difference between simulated and emulated time-to-100% that counts as
/// calibrated.
const CALIBRATION_TOLERANCE: f64 = 0.20;

/// Emulations of each strategy by default; the fastest counts.
const DEFAULT_ROUNDS: usize = 2;

fn main() -> ExitCode {
    // `cargo test --all-targets` runs bench targets without `--bench`; minutes of emulation are
    // no unit test.
    if !std::env::args().any(|arg| arg == "--bench") {
        println!("calibration: not run (run it with `cargo bench -p benches --bench calibration`)");
        return ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("calibration: cannot start a runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run()) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("calibration: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the comparison and prints the table; true when every strategy is within tolerance.
async fn run() -> Result<bool> {
    let rounds: usize = match std::env::var("STAGECOACH_CALIBRATION_ROUNDS") {
        Ok(text) => text
            .trim()
            .parse()
            .with_context(|| format!("STAGECOACH_CALIBRATION_ROUNDS={text:?} is not a count"))?,
        Err(_) => DEFAULT_ROUNDS,
    };
    let topologies = Path::new(env!("CARGO_MANIFEST_DIR")).join("../netsim/topologies");
    let file = std::env::var("STAGECOACH_CALIBRATION_TOPOLOGY")
        .unwrap_or_else(|_| "calibration.toml".to_owned());
    let topo = Topology::load(&topologies.join(&file))?;
    println!("calibration: topology {file}");
    let options = EmulateOptions {
        binaries: Binaries::beside_current_exe()?,
        work_dir: None,
        seed: 1,
        capture_dir: None,
        origin_args: Vec::new(),
    };
    let out = tempfile::tempdir()?;
    println!("calibration: load average before: {}", load_average());
    let mut emulated_s = [f64::INFINITY; 3];
    for round in 0..rounds.max(1) {
        let table = emulate::compare_emulated(
            &topo,
            &options,
            &out.path().join(format!("emulated-{round}")),
        )
        .await?;
        for (best, row) in emulated_s.iter_mut().zip(&table.rows) {
            let t = row
                .all_edges_done_s
                .with_context(|| format!("{}: not every emulated edge finished", row.strategy))?;
            *best = best.min(t);
        }
    }
    println!("calibration: load average after: {}", load_average());
    let simulated = netsim::compare::compare_simulated(&topo, 1, &out.path().join("simulated"))?;
    println!("strategy  simulate  emulate  difference");
    let mut calibrated = true;
    for (strategy, (t_emu, sim)) in Strategy::ALL
        .iter()
        .zip(emulated_s.iter().zip(&simulated.rows))
    {
        let t_sim = sim
            .all_edges_done_s
            .with_context(|| format!("{strategy}: not every simulated edge finished"))?;
        let difference = (t_sim - t_emu) / t_emu;
        let verdict = if difference.abs() <= CALIBRATION_TOLERANCE {
            "ok"
        } else {
            calibrated = false;
            "OFF"
        };
        println!(
            "{:<8}  {t_sim:>6.2} s  {t_emu:>5.2} s  {:>+6.1}%  {verdict}",
            strategy.as_str(),
            difference * 100.0
        );
    }
    if !calibrated {
        println!(
            "calibration: simulate is off by more than {:.0}% for some strategy; on a busy \
             machine rerun when it is idle",
            CALIBRATION_TOLERANCE * 100.0
        );
    }
    Ok(calibrated)
}

/// The 1-, 5- and 15-minute load averages, for the log.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|text| {
            text.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_else(|_| "unknown".to_owned())
}
