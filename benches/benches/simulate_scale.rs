//! The simulator's scale target: 200 sites × 500 edges (and the 50-site continent), each
//! strategy simulated in under a minute of wall time. Prints the wall time of each run and the
//! simulated time until every edge holds the bundle; the exit status is the verdict.
//!
//! ```text
//! cargo bench -p benches --bench simulate_scale
//! ```

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use netsim::simulate::{simulate, Strategy};
use netsim::topology::Topology;

/// The most wall time one strategy of one topology may take.
const WALL_TARGET: Duration = Duration::from_secs(60);

fn main() -> ExitCode {
    // `cargo test --all-targets` runs bench targets without `--bench`.
    if !std::env::args().any(|arg| arg == "--bench") {
        println!(
            "simulate_scale: not run (run it with `cargo bench -p benches --bench simulate_scale`)"
        );
        return ExitCode::SUCCESS;
    }
    let topologies = Path::new(env!("CARGO_MANIFEST_DIR")).join("../netsim/topologies");
    let mut within_target = true;
    for file in ["fleet-200x500.toml", "continent.toml"] {
        let topo = match Topology::load(&topologies.join(file)) {
            Ok(topo) => topo,
            Err(error) => {
                eprintln!("simulate_scale: {file}: {error}");
                return ExitCode::FAILURE;
            }
        };
        for strategy in Strategy::ALL {
            let start = Instant::now();
            let result = match simulate(&topo, strategy, 1) {
                Ok(result) => result,
                Err(error) => {
                    eprintln!("simulate_scale: {file} {strategy}: {error}");
                    return ExitCode::FAILURE;
                }
            };
            let wall = start.elapsed();
            let done = result.edges_done();
            let verdict = if wall <= WALL_TARGET && done == topo.total_edges() {
                "ok"
            } else {
                within_target = false;
                "OVER"
            };
            println!(
                "{file} {strategy}: {:.2} s wall, {done} of {} edges done at {:.1} s simulated ({:.2}× floor)  {verdict}",
                wall.as_secs_f64(),
                topo.total_edges(),
                result.all_edges_done_s.unwrap_or(f64::NAN),
                result.ratio_to_floor().unwrap_or(f64::NAN),
            );
        }
    }
    if within_target {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
