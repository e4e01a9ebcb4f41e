//! `netsim`: the local demo of the whole mesh, emulation and simulation of topologies.

use std::io::IsTerminal;
use std::path::Path;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use netsim::demo::{self, DemoConfig, DemoOverrides};
use netsim::emulate::{self, EmulateOptions};
use netsim::procs::Binaries;
use netsim::progress::Progress;
use netsim::report::RunResult;
use netsim::run::{Interrupted, WorkDir};

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
    /// Emulate a built-in topology with the real binaries on loopback — an origin and two sites
    /// (a stager and four edges each), each site's WAN a relay of 1 Gbit/s and 2 ms — publish a
    /// generated 256 MiB OS-like bundle, let every edge fetch it (from the stager, and with
    /// `mesh` from each other too), and print who moved how many bytes. The flags override the
    /// topology's fields. While it runs it shows its progress on stderr (when a terminal); its
    /// own log and every daemon's go to files in the work directory's `logs/`, whose path it
    /// prints (a temporary work directory keeps only them at the end).
    Demo {
        /// Print the result as one JSON object instead of a table.
        #[arg(long)]
        json: bool,
        /// Print netsim's own log lines on stderr instead of the progress display (the
        /// daemons' logs stay in their files).
        #[arg(short, long)]
        verbose: bool,
        /// Emulate this topology file (TOML) instead of the built-in one.
        #[arg(long)]
        topology: Option<std::path::PathBuf>,
        /// Size of the generated bundle tree in MiB (default: the topology's, 256).
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        bundle_mib: Option<u64>,
        /// Number of sites (default: the topology's, 2); extra sites are like its last one.
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        sites: Option<u64>,
        /// Edges per site (default: the topology's, 4).
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        edges: Option<u64>,
        /// How edges get the bundle: direct, staged or mesh (default: the topology's, mesh).
        #[arg(long)]
        strategy: Option<netsim::topology::Strategy>,
        /// Stagers per site (default: the topology's, 1). With 2 or more they back each other
        /// up: each chunk crosses the WAN to one of them, the others copy it over the LAN, and
        /// the table shows what each pulled.
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        stagers_per_site: Option<u64>,
        /// Upload limit of each stager to its edges, in Mbit/s (default: the site's LAN rate,
        /// 10 Gbit/s in the built-in topology). A slow stager shows what peers take off it.
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        stager_upload_mbit: Option<u64>,
        /// End with an OS swap on every edge: each edge gets a simulated machine running a
        /// small factory OS, and `origin swap` moves them all to the demo bundle.
        #[arg(long)]
        swap: bool,
        /// Publish the bundle encrypted, with plaintext markers planted in it, and end by
        /// searching every stager's store, every edge's store and the captured WAN traffic
        /// (`captures/SITE.wan.pcap`) for them, and unpacking the bundle on every edge. Fails
        /// if a marker is found or an unpacked copy differs from the tree.
        #[arg(long)]
        encrypt: bool,
        /// The origin's web console listens here (loopback; port 0 picks a free one). The demo
        /// makes an admin account `demo` with a random password and prints both.
        #[arg(long, default_value = "127.0.0.1:0")]
        console: String,
        /// After the result, keep the whole mesh up (origin, stagers, edges, console) until
        /// Ctrl-C, so you can look around.
        #[arg(long)]
        hold: bool,
        /// Keep state and logs in this new (or empty) directory instead of a temporary one.
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
    /// Run a topology with the real origin, stager and edge-agent binaries on loopback, each
    /// site's WAN an emulated link (a relay applying its rate, latency, jitter and loss);
    /// writes result.json, result.md and completion.svg, like `simulate`.
    Emulate {
        /// The topology file (TOML), e.g. netsim/topologies/two-sites.toml.
        topology: std::path::PathBuf,
        /// direct, staged or mesh (default: the topology's).
        #[arg(long)]
        strategy: Option<netsim::topology::Strategy>,
        /// Output directory.
        #[arg(long, default_value = "netsim-out")]
        out: std::path::PathBuf,
        /// Keep state and logs in this new (or empty) directory instead of a temporary one.
        #[arg(long)]
        work_dir: Option<std::path::PathBuf>,
        /// Where the origin, stager and edge-agent binaries are (default: beside netsim).
        #[arg(long)]
        bin_dir: Option<std::path::PathBuf>,
        /// Seed of the relays' jitter and loss draws.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Run the three strategies side by side (simulated, or with `--emulate` emulated) and
    /// print one table, with each time as a ratio to the line-rate floor; writes
    /// compare.json, compare.md and compare.svg, and each run's files under <strategy>/.
    Compare {
        /// The topology file (TOML).
        topology: std::path::PathBuf,
        /// Output directory.
        #[arg(long, default_value = "netsim-out")]
        out: std::path::PathBuf,
        /// Seed of the planners' tie-breaking (simulated) or the relays' draws (emulated).
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Emulate with the real binaries (as `netsim emulate`) instead of simulating.
        #[arg(long)]
        emulate: bool,
        /// With --emulate: keep state and logs in this new (or empty) directory.
        #[arg(long, requires = "emulate")]
        work_dir: Option<std::path::PathBuf>,
        /// With --emulate: where the binaries are (default: beside netsim).
        #[arg(long, requires = "emulate")]
        bin_dir: Option<std::path::PathBuf>,
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
        Err(error) if error.is::<Interrupted>() => {
            eprintln!("netsim: interrupted; every process it started was stopped");
            std::process::ExitCode::from(EXIT_INTERRUPTED)
        }
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Which log lines netsim writes when `RUST_LOG` does not say.
const DEFAULT_LOG_FILTER: &str = "netsim=info";

/// Sends netsim's log lines to stderr, coloured only when stderr is a terminal.
fn log_to_stderr() {
    tracing_subscriber::fmt()
        .with_env_filter(log_filter())
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

/// Sends netsim's log lines to the file `path` (created, or truncated), without colour.
fn log_to_file(path: &Path) -> Result<()> {
    let file = std::fs::File::create(path)
        .with_context(|| format!("cannot create log file {}", path.display()))?;
    tracing_subscriber::fmt()
        .with_env_filter(log_filter())
        .with_writer(std::sync::Mutex::new(file))
        .with_ansi(false)
        .init();
    Ok(())
}

fn log_filter() -> tracing_subscriber::EnvFilter {
    tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| DEFAULT_LOG_FILTER.into())
}

async fn run() -> Result<()> {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Demo { .. }) {
        log_to_stderr();
    }
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
        Command::Emulate {
            topology,
            strategy,
            out,
            work_dir,
            bin_dir,
            seed,
        } => {
            let topo = netsim::topology::Topology::load(&topology)?;
            let strategy = strategy.unwrap_or(topo.strategy);
            let options = EmulateOptions {
                binaries: binaries(bin_dir)?,
                work_dir,
                seed,
                capture_dir: None,
                origin_args: Vec::new(),
            };
            let started = std::time::Instant::now();
            let result = emulate::emulate(&topo, strategy, &options).await?;
            result.write_files(&out)?;
            print!("{}", result.markdown());
            eprintln!(
                "emulated in {:.1} s of wall time; files in {}",
                started.elapsed().as_secs_f64(),
                out.display()
            );
            check_every_edge(&result)?;
        }
        Command::Compare {
            topology,
            out,
            seed,
            emulate,
            work_dir,
            bin_dir,
        } => {
            let topo = netsim::topology::Topology::load(&topology)?;
            let table = if emulate {
                let options = EmulateOptions {
                    binaries: binaries(bin_dir)?,
                    work_dir,
                    seed,
                    capture_dir: None,
                    origin_args: Vec::new(),
                };
                emulate::compare_emulated(&topo, &options, &out).await?
            } else {
                netsim::compare::compare_simulated(&topo, seed, &out)?
            };
            print!("{}", table.markdown());
            eprintln!("files in {}", out.display());
            for run in &table.runs {
                check_every_edge(run)?;
            }
        }
        Command::Demo {
            json,
            verbose,
            topology,
            bundle_mib,
            sites,
            edges,
            strategy,
            stagers_per_site,
            stager_upload_mbit,
            swap,
            encrypt,
            console,
            hold,
            work_dir,
            bin_dir,
        } => {
            let binaries = binaries(bin_dir)?;
            let count = |n: Option<u64>, flag: &str| -> Result<Option<usize>> {
                n.map(|n| usize::try_from(n).with_context(|| format!("{flag} is too large")))
                    .transpose()
            };
            let topo = demo::demo_topology(
                topology.as_deref(),
                &DemoOverrides {
                    bundle_mib,
                    sites: count(sites, "--sites")?,
                    edges: count(edges, "--edges")?,
                    strategy,
                    stagers_per_site: count(stagers_per_site, "--stagers-per-site")?,
                },
            )?;
            let work = WorkDir::create(work_dir.as_deref(), "stagecoach-demo-")?;
            let logs = work.logs();
            std::fs::create_dir_all(&logs)
                .with_context(|| format!("cannot create {}", logs.display()))?;
            let progress = if verbose {
                log_to_stderr();
                Progress::hidden()
            } else {
                log_to_file(&logs.join(NETSIM_LOG))?;
                Progress::stderr()
            };
            let shape: Vec<String> = topo
                .sites
                .iter()
                .map(|s| {
                    let stagers = if s.stagers == 1 { "stager" } else { "stagers" };
                    format!("{} ({} {stagers} + {} edges)", s.name, s.stagers, s.edges)
                })
                .collect();
            let bundle = match (&topo.bundle.path, topo.bundle.size_bytes) {
                (Some(path), _) => path.display().to_string(),
                (None, Some(bytes)) => format!("{} MiB", bytes / (1024 * 1024)),
                (None, None) => "no bundle".to_owned(),
            };
            eprintln!(
                "netsim demo ({}): topology {}, origin + {}, {bundle} bundle, all on loopback behind WAN relays",
                topo.strategy,
                topo.name,
                shape.join(", ")
            );
            eprintln!("logs: {}", logs.display());
            let started = std::time::Instant::now();
            let show = |result: &demo::DemoResult| {
                if json {
                    match serde_json::to_string_pretty(result) {
                        Ok(text) => println!("{text}"),
                        Err(error) => eprintln!("cannot print the result as JSON: {error}"),
                    }
                } else {
                    print!("{}", result.table());
                }
            };
            let result = demo::run(
                DemoConfig {
                    topology: topo,
                    seed: 1,
                    stager_upload_mbit,
                    swap,
                    encrypt,
                    console,
                    hold,
                    binaries,
                },
                work.path(),
                &progress,
                &show,
            )
            .await;
            progress.clear();
            // A temporary work directory goes, but its logs stay where the line above said.
            if let Err(error) = work.keep_logs() {
                eprintln!("warning: {error:#}");
            }
            let result = match result {
                Ok(result) => result,
                Err(error) if error.is::<Interrupted>() => return Err(error),
                Err(error) => {
                    return Err(error.context(format!(
                        "the demo failed; its logs are in {}",
                        logs.display()
                    )))
                }
            };
            if !hold {
                show(&result);
                eprintln!(
                    "demo ran in {:.1} s of wall time",
                    started.elapsed().as_secs_f64()
                );
            }
            if let Some(enc) = &result.encryption {
                if !enc.found.is_empty() {
                    anyhow::bail!(
                        "planted plaintext found where only ciphertext belongs:\n  {}",
                        enc.found.join("\n  ")
                    );
                }
                if enc.edges_identical < enc.edges {
                    anyhow::bail!(
                        "{} of {} edges did not unpack the published tree",
                        enc.edges - enc.edges_identical,
                        enc.edges
                    );
                }
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

/// netsim's own log file in a demo's `logs/`, beside the daemons' logs.
const NETSIM_LOG: &str = "netsim.log";

/// The binaries in `bin_dir`, or beside this executable.
fn binaries(bin_dir: Option<std::path::PathBuf>) -> Result<Binaries> {
    match bin_dir {
        Some(dir) => Binaries::in_dir(dir),
        None => Binaries::beside_current_exe(),
    }
}

/// Fails (after the result was printed and written) when an edge never got the bundle.
fn check_every_edge(run: &RunResult) -> Result<()> {
    let (done, total) = (run.edges_done(), run.total_edges());
    if done < total {
        anyhow::bail!(
            "{}: {} of {total} edges did not get the bundle (see the notes above)",
            run.strategy,
            total - done
        );
    }
    Ok(())
}
