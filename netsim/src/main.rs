//! `netsim`: the local demo of the whole mesh.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use netsim::demo::{self, DemoConfig, DemoStrategy};
use netsim::procs::Binaries;

#[derive(Parser)]
#[command(
    name = "netsim",
    version,
    about = "Run and measure a Stagecoach mesh on this machine"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start an origin and two sites (a stager and four edges each) on loopback, publish a
    /// generated bundle, let every edge fetch it (from the stager, and with `mesh` from each
    /// other too), and print who moved how many bytes.
    Demo {
        /// Print the result as one JSON object instead of a table.
        #[arg(long)]
        json: bool,
        /// Size of the generated bundle in MiB.
        #[arg(long, default_value_t = 256)]
        bundle_mib: u64,
        /// Number of sites.
        #[arg(long, default_value_t = 2)]
        sites: usize,
        /// Edges per site.
        #[arg(long, default_value_t = 4)]
        edges: usize,
        /// How edges get the bundle.
        #[arg(long, value_enum, default_value_t = DemoStrategy::Mesh)]
        strategy: DemoStrategy,
        /// Upload limit of each stager to its edges, in Mbit/s (default: unlimited). A slow
        /// stager shows what peers take off it.
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        stager_upload_mbit: Option<u64>,
        /// End with an OS swap on every edge: each edge gets a simulated machine running a
        /// small factory OS, and `origin swap` moves them all to the demo bundle.
        #[arg(long)]
        swap: bool,
        /// Keep state and logs in this directory instead of a temporary one.
        #[arg(long)]
        work_dir: Option<std::path::PathBuf>,
        /// Where the origin, stager and edge-agent binaries are (default: beside netsim).
        #[arg(long)]
        bin_dir: Option<std::path::PathBuf>,
    },
    /// Simulate a topology in virtual time (flow-level network, the real download planner);
    /// writes result.json, result.md and completion.svg.
    Simulate {
        /// The topology file (TOML), e.g. netsim/topologies/continent.toml.
        topology: std::path::PathBuf,
        /// direct, staged or mesh (default: the topology's).
        #[arg(long)]
        strategy: Option<netsim::topology::Strategy>,
        /// Output directory.
        #[arg(long, default_value = "netsim-out")]
        out: std::path::PathBuf,
        /// Seed of the planners' tie-breaking.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Simulate the three strategies side by side and print one table, with each time as a
    /// ratio to the line-rate floor; writes compare.json, compare.md and compare.svg.
    Compare {
        /// The topology file (TOML).
        topology: std::path::PathBuf,
        /// Output directory.
        #[arg(long, default_value = "netsim-out")]
        out: std::path::PathBuf,
        /// Seed of the planners' tie-breaking.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
}

/// Exit status after Ctrl-C, as shells report a SIGINT death (128 + 2).
const EXIT_INTERRUPTED: u8 = 130;

fn main() -> std::process::ExitCode {
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the runtime: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) if error.is::<demo::Interrupted>() => {
            eprintln!("netsim: interrupted; every process it started was stopped");
            std::process::ExitCode::from(EXIT_INTERRUPTED)
        }
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "netsim=info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Simulate {
            topology,
            strategy,
            out,
            seed,
        } => {
            let topo = netsim::topology::Topology::load(&topology)?;
            let strategy = strategy.unwrap_or(topo.strategy);
            let started = std::time::Instant::now();
            let result = netsim::simulate::simulate(&topo, strategy, seed)?;
            result.write_files(&out)?;
            print!("{}", result.markdown());
            eprintln!(
                "simulated in {:.2} s of wall time; files in {}",
                started.elapsed().as_secs_f64(),
                out.display()
            );
        }
        Command::Compare {
            topology,
            out,
            seed,
        } => {
            let topo = netsim::topology::Topology::load(&topology)?;
            let table = netsim::compare::compare_simulated(&topo, seed, &out)?;
            print!("{}", table.markdown());
            eprintln!("files in {}", out.display());
        }
        Command::Demo {
            json,
            bundle_mib,
            sites,
            edges,
            strategy,
            stager_upload_mbit,
            swap,
            work_dir,
            bin_dir,
        } => {
            let binaries = match bin_dir {
                Some(dir) => Binaries::in_dir(dir)?,
                None => Binaries::beside_current_exe()?,
            };
            if !json {
                eprintln!(
                    "netsim demo ({strategy}): origin + {sites} sites × (1 stager + {edges} edges), {bundle_mib} MiB bundle, all on loopback"
                );
            }
            let result = demo::run(DemoConfig {
                sites,
                edges_per_site: edges,
                bundle_bytes: bundle_mib
                    .checked_mul(1024 * 1024)
                    .context("--bundle-mib is too large")?,
                seed: 1,
                strategy,
                stager_upload_mbit,
                swap,
                work_dir,
                binaries,
            })
            .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&result)?);
            } else {
                print!("{}", result.table());
            }
            if let Some(swap) = &result.swap {
                if swap.done < swap.edges {
                    anyhow::bail!(
                        "{} of {} edges did not end on the new OS",
                        swap.edges - swap.done,
                        swap.edges
                    );
                }
            }
        }
    }
    Ok(())
}
