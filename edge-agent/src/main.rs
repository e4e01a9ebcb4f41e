//! `edge-agent`: the per-machine agent's command line.
//!
//! Every command is a variant of [`Command`] with its own argument struct; add new ones the same
//! way. Exit codes: 0 success, 1 error, [`EXIT_SWAP_FAILED`] when a swap ended on the old or the
//! rescue OS, [`REBOOT_EXIT_CODE`] when the agent asks its supervisor to reboot.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};

use edge_agent::swap::bundles::{parse_trusted_keys, BundleStore};
use edge_agent::swap::machine::Step;
use edge_agent::swap::plan::{DEFAULT_BOOT_ATTEMPTS, DEFAULT_IDENTITY_PATHS};
use edge_agent::swap::sim::{
    run_sim_machine, BootExit, NoHooks, SimMachineConfig, DEFAULT_MAX_BOOTS,
};
use edge_agent::swap::store::open_store;
use edge_agent::swap::{
    self, machine_store_dir, open_machine_store, status, HealthCheck, MachineSpec, RunEnd, Slot,
    SwapContext, SwapPlan, REBOOT_EXIT_CODE,
};
use proto::BundleId;

/// Exit code of a swap that ended without the new OS (aborted or rolled back); `status` says why.
pub const EXIT_SWAP_FAILED: u8 = 3;

#[derive(Parser, Debug)]
#[command(
    name = "edge-agent",
    version,
    about = "Stagecoach edge agent: swaps this machine's operating system safely"
)]
struct Cli {
    /// Log filter, in RUST_LOG syntax (e.g. `debug`, `edge_agent=trace`).
    #[arg(long, global = true, env = "EDGE_AGENT_LOG", default_value = "info")]
    log: String,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Swap the OS: rescue to slot B, boot it, target to slot A with this machine's identity,
    /// trial-boot A with health checks, then commit or roll back to the rescue.
    Swap(SwapArgs),
    /// Continue the journaled swap, if any. Run at every boot (a systemd unit on a real machine).
    Resume(MachineArgs),
    /// Show the slots, the boot loader and the swap journal.
    Status(StatusArgs),
    /// Roll back: to the old OS if slot A is not yet wiped, else to the rescue OS.
    Rollback(RollbackArgs),
    /// Create a simulated machine running an OS bundle from slot A.
    SimProvision(SimProvisionArgs),
    /// Run a simulated machine: firmware, then the agent, rebooting until it settles.
    SimMachine(SimMachineArgs),
    /// Obtain this edge's certificate with a token from `origin enroll --role edge`.
    Enroll(EnrollArgs),
    /// Download a bundle from the site's stagers (then the origin), verifying every 16 KiB.
    /// When this edge's daemon (`edge-agent serve`) runs, it does the download, with peers.
    Fetch(FetchArgs),
    /// Run the edge's daemon: serve what this edge holds to the peers of its site, and fetch
    /// bundles (from stagers and peers at once) when this node or the origin asks. At start it
    /// reports its inventory and negotiates what to boot with the origin.
    Serve(Box<ServeArgs>),
    /// Report this node's inventory and holdings and ask the origin what to boot; fetch the
    /// bundles that differ and record them as installed. Goes through the daemon when it runs.
    Negotiate(NegotiateArgs),
    /// Build an image when the origin has none for this node (brief 004): run an install script
    /// into the spare slot, pack it with this node's inventory as metadata, and publish it with
    /// a publisher identity (`--publisher-dir`: an edge certificate may not publish).
    Capture(CaptureArgs),
}

/// How to capture an image (brief 004).
#[derive(Args, Debug, Clone, Default)]
struct CaptureFlags {
    /// Install script run into the spare slot when the origin has no image and the node's class
    /// may capture; its one argument is the slot's directory.
    #[arg(long)]
    capture_script: Option<PathBuf>,
    /// A publisher directory (a copy of ORIGIN_HOME/publisher: identity and signing key), for
    /// the upload of a captured image.
    #[arg(long)]
    publisher_dir: Option<PathBuf>,
    /// How long the install script may run, in seconds.
    #[arg(long, default_value_t = edge_agent::capture::DEFAULT_SCRIPT_TIMEOUT.as_secs())]
    capture_timeout_s: u64,
}

impl CaptureFlags {
    fn setup(
        &self,
        machine: Option<&MachineSpec>,
    ) -> Result<Option<edge_agent::capture::CaptureSetup>> {
        let Some(script) = &self.capture_script else {
            return Ok(None);
        };
        let Some(publisher_dir) = &self.publisher_dir else {
            bail!("--capture-script needs --publisher-dir: uploading a captured image needs publisher rights");
        };
        let Some(machine) = machine else {
            bail!("--capture-script needs --machine-root or --linux-config: the script installs into the machine's spare slot");
        };
        Ok(Some(edge_agent::capture::CaptureSetup {
            machine: machine.clone(),
            script: script.clone(),
            publisher_dir: publisher_dir.clone(),
            timeout: std::time::Duration::from_secs(self.capture_timeout_s),
        }))
    }
}

/// Arguments of `edge-agent capture`.
#[derive(Args, Debug)]
struct CaptureArgs {
    /// The edge's state directory (identity and configuration).
    #[arg(long, default_value = "/var/lib/stagecoach/edge")]
    dir: PathBuf,
    /// Root of the simulated machine whose spare slot receives the install.
    #[arg(
        long,
        required_unless_present = "linux_config",
        conflicts_with = "linux_config"
    )]
    machine_root: Option<PathBuf>,
    /// JSON configuration of the real machine this runs on, whose spare slot partition
    /// receives the install (formatted, then mounted for the script).
    #[arg(long)]
    linux_config: Option<PathBuf>,
    /// The install script; its one argument is the spare slot's directory.
    #[arg(long)]
    script: PathBuf,
    /// A publisher directory (a copy of ORIGIN_HOME/publisher).
    #[arg(long)]
    publisher_dir: PathBuf,
    /// Bundle name.
    #[arg(long, default_value = "captured-os")]
    name: String,
    /// Bundle version (default: the time and this node's id).
    #[arg(long)]
    version: Option<String>,
    /// How long the install script may run, in seconds.
    #[arg(long, default_value_t = edge_agent::capture::DEFAULT_SCRIPT_TIMEOUT.as_secs())]
    timeout_s: u64,
    #[command(flatten)]
    facts: NodeFacts,
}

/// What the operator configures about a node: reported with its inventory, kept in the edge's
/// directory once given.
#[derive(Args, Debug, Clone, Default)]
struct NodeFacts {
    /// This node's role (e.g. `web`), for the origin's policy.
    #[arg(long)]
    role: Option<String>,
    /// This node's class (e.g. `edge-cache`), for the origin's policy.
    #[arg(long)]
    class: Option<String>,
    /// A feature this node asks for (repeatable; replaces the saved list).
    #[arg(long = "feature")]
    features: Vec<String>,
    /// Where `/proc` and `/sys` are read from (default `/`; tests point it at a fake tree).
    #[arg(long)]
    inventory_root: Option<PathBuf>,
}

impl NodeFacts {
    fn config(&self, dir: &Path) -> Result<edge_agent::state::NodeConfig> {
        edge_agent::state::NodeConfig::load_with(
            dir,
            edge_agent::state::NodeConfig {
                role: self.role.clone(),
                class: self.class.clone(),
                features: self.features.clone(),
                inventory_root: self.inventory_root.clone(),
            },
        )
    }
}

/// Arguments of `edge-agent negotiate`.
#[derive(Args, Debug)]
struct NegotiateArgs {
    /// The edge's state directory (identity and bundle store).
    #[arg(long, default_value = "/var/lib/stagecoach/edge")]
    dir: PathBuf,
    /// A stager of this site (repeatable; with those the origin named at enrollment, the first
    /// to answer is used, then the origin).
    #[arg(long = "stager")]
    stagers: Vec<std::net::SocketAddr>,
    #[command(flatten)]
    facts: NodeFacts,
    #[command(flatten)]
    capture: CaptureFlags,
    /// Root of the simulated machine (for --capture-script).
    #[arg(long, conflicts_with = "linux_config")]
    machine_root: Option<PathBuf>,
    /// JSON configuration of the real machine this runs on (for --capture-script).
    #[arg(long)]
    linux_config: Option<PathBuf>,
}

/// Arguments of `edge-agent serve`.
#[derive(Args, Debug)]
struct ServeArgs {
    /// The edge's state directory (identity and bundle store).
    #[arg(long, default_value = "/var/lib/stagecoach/edge")]
    dir: PathBuf,
    /// A stager of this site (repeatable; those the origin named at enrollment are used too).
    #[arg(long = "stager")]
    stagers: Vec<std::net::SocketAddr>,
    /// Address to serve the site's peers on (QUIC).
    #[arg(long, default_value = "0.0.0.0:7420")]
    listen: std::net::SocketAddr,
    /// Prometheus metrics address (HTTP).
    #[arg(long, default_value = "127.0.0.1:9420")]
    metrics_listen: std::net::SocketAddr,
    /// Write the bound addresses as JSON to this file once listening.
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// Fetch from and serve the site's peers (`on`), or only the stagers (`off`).
    #[arg(long, default_value = "on", value_parser = ["on", "off"])]
    peers: String,
    /// Peer discovery (libp2p) listen address.
    #[arg(long, default_value = "/ip4/0.0.0.0/tcp/0")]
    p2p_listen: String,
    /// Discover peers with mDNS too (besides the stager's peer list).
    #[arg(long)]
    mdns: bool,
    /// Upload limit to peers, in Mbit/s (default: none).
    #[arg(long)]
    upload_limit_mbit: Option<u64>,
    /// Uploads to peers served at once; more are refused as busy.
    #[arg(long, default_value_t = edge_agent::daemon::DEFAULT_MAX_UPLOADS)]
    max_uploads: usize,
    /// Test hook: corrupt every blob part served to peers (only in a build with the
    /// `test-hooks` feature).
    #[cfg(feature = "test-hooks")]
    #[arg(long, hide = true)]
    test_corrupt_serving: bool,
    /// Root of the simulated machine this daemon swaps when the origin asks (made by
    /// `sim-provision`); without it, swap requests are refused.
    #[arg(long, conflicts_with = "linux_config")]
    machine_root: Option<PathBuf>,
    /// JSON configuration of the real machine this daemon runs on and swaps when the origin
    /// asks (slot devices, grubenv, storage, reboot command): the swap runs here up to its
    /// first reboot, and `edge-agent resume` carries it on after each boot.
    #[arg(long)]
    linux_config: Option<PathBuf>,
    /// The address the origin and peers reach this daemon's mesh endpoint at, when it is not
    /// the bound one (behind NAT or port forwarding, as in a VM).
    #[arg(long)]
    advertise: Option<std::net::SocketAddr>,
    /// Health check of remote swaps: `network-up`, `reach-stager=HOST:PORT` (several
    /// separated by commas: any one) or `command=SHELL COMMAND`; repeat (default: network-up
    /// and any of the --stager addresses reachable).
    #[arg(long = "swap-health-check")]
    swap_health_checks: Vec<HealthCheck>,
    /// Trial boots of the new OS in a remote swap before the rescue takes over.
    #[arg(long, default_value_t = DEFAULT_BOOT_ATTEMPTS)]
    swap_boot_attempts: u8,
    /// Bound on the store, in GiB (fractions allowed: 0.5 is 512 MiB). The bundles this node
    /// must keep (installed, desired, a swap's, the origin's keep-set) are kept even beyond it,
    /// with a warning; the others are evicted least recently used.
    #[arg(long = "cache-gib", value_name = "GIB", default_value = edge_agent::daemon::DEFAULT_CACHE_GIB, value_parser = proto::retention::parse_cache_gib)]
    cache_limit_bytes: u64,
    /// How often to ask the origin for this node's content keys (encrypted bundles), in
    /// seconds; they are also asked at every start.
    #[arg(long, default_value_t = edge_agent::keys::DEFAULT_REFRESH_INTERVAL.as_secs(), value_parser = clap::value_parser!(u64).range(1..))]
    keys_refresh_secs: u64,
    #[command(flatten)]
    facts: NodeFacts,
    #[command(flatten)]
    capture: CaptureFlags,
}

/// Arguments of `edge-agent enroll`.
#[derive(Args, Debug)]
struct EnrollArgs {
    /// The token.
    token: String,
    /// The edge's state directory (identity and bundle store).
    #[arg(long, default_value = "/var/lib/stagecoach/edge")]
    dir: PathBuf,
    /// A stager of this site to report through (repeatable; besides those the origin named at
    /// enrollment; with none, the origin directly).
    #[arg(long = "stager")]
    stagers: Vec<std::net::SocketAddr>,
    #[command(flatten)]
    facts: NodeFacts,
}

/// Arguments of `edge-agent fetch`.
#[derive(Args, Debug)]
struct FetchArgs {
    /// NAME@VERSION, NAME (the newest) or a bundle id.
    #[arg(value_name = "BUNDLE")]
    bundle_text: String,
    /// The edge's state directory (identity and bundle store).
    #[arg(long, default_value = "/var/lib/stagecoach/edge")]
    dir: PathBuf,
    /// A stager of this site (repeatable; with those the origin named at enrollment, the first
    /// to answer is used, then the origin).
    #[arg(long = "stager")]
    stagers: Vec<std::net::SocketAddr>,
    /// Also unpack the bundle into this directory.
    #[arg(long)]
    to: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    no_progress: bool,
}

/// Which machine to act on.
#[derive(Args, Debug, Clone)]
struct MachineArgs {
    /// Root directory of a simulated machine.
    #[arg(
        long,
        required_unless_present = "linux_config",
        conflicts_with = "linux_config"
    )]
    root: Option<PathBuf>,
    /// JSON configuration of a real machine (slot devices, grubenv, storage, reboot command).
    #[arg(long)]
    linux_config: Option<PathBuf>,
    /// The slot running now (default: what the simulator recorded, or the kernel command line).
    #[arg(long)]
    booted_slot: Option<Slot>,
}

impl MachineArgs {
    fn spec(&self) -> Result<MachineSpec> {
        match (&self.root, &self.linux_config) {
            (Some(root), None) => Ok(MachineSpec::Sim { root: root.clone() }),
            (None, Some(config)) => Ok(MachineSpec::Linux {
                config: config.clone(),
            }),
            _ => bail!(
                "give exactly one of --root (simulated machine) and --linux-config (real machine)"
            ),
        }
    }
}

#[derive(Args, Debug)]
struct SwapArgs {
    #[command(flatten)]
    machine: MachineArgs,
    /// Bundle id of the OS to install in slot A.
    #[arg(long)]
    target: BundleId,
    /// Bundle id of the base (rescue) OS for slot B.
    #[arg(long)]
    rescue: BundleId,
    /// Trusted publisher key (64 hex digits); repeat for several.
    #[arg(long = "trust", required = true)]
    trusted: Vec<String>,
    /// Blob store holding both bundles (default: the machine's own store in its storage area).
    #[arg(long)]
    store: Option<PathBuf>,
    /// Identity path to carry over, relative to the slot root; repeat (default: network
    /// configuration, SSH host keys, etc/stagecoach).
    #[arg(long = "identity")]
    identity: Vec<String>,
    /// Health check: `network-up`, `reach-stager=HOST:PORT` or `command=SHELL COMMAND`; repeat
    /// (default: network-up and reach-stager with --stager). `reach-stager=A:P,B:P` passes when
    /// any of them answers.
    #[arg(long = "health-check")]
    health_checks: Vec<HealthCheck>,
    /// The stager's address, for the default health checks.
    #[arg(long)]
    stager: Option<String>,
    /// Trial boots of the new OS before falling back to the rescue.
    #[arg(long, default_value_t = DEFAULT_BOOT_ATTEMPTS)]
    boot_attempts: u8,
}

#[derive(Args, Debug)]
struct StatusArgs {
    #[command(flatten)]
    machine: MachineArgs,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct RollbackArgs {
    #[command(flatten)]
    machine: MachineArgs,
    /// Why, for the journal and the report.
    #[arg(long, default_value = "operator request")]
    reason: String,
}

#[derive(Args, Debug)]
struct SimProvisionArgs {
    /// Root directory of the simulated machine to create.
    #[arg(long)]
    root: PathBuf,
    /// Blob store holding the OS bundle.
    #[arg(
        long,
        required_unless_present = "edge_dir",
        conflicts_with = "edge_dir"
    )]
    store: Option<PathBuf>,
    /// An enrolled edge's directory: take the bundle from its store (the daemon must not be
    /// running) and trust its mesh's publisher.
    #[arg(long)]
    edge_dir: Option<PathBuf>,
    /// Bundle id of the OS to install in slot A.
    #[arg(long)]
    os: BundleId,
    /// Trusted publisher key (64 hex digits); repeat for several.
    #[arg(long = "trust", required_unless_present = "edge_dir")]
    trusted: Vec<String>,
}

#[derive(Args, Debug)]
struct SimMachineArgs {
    /// Root directory of the simulated machine.
    #[arg(long)]
    root: PathBuf,
    /// Boots before giving up.
    #[arg(long, default_value_t = DEFAULT_MAX_BOOTS)]
    max_boots: u32,
    /// The agent command of the first boot, e.g. `swap --target ID ...`; `--root` and
    /// `--booted-slot` are added. Later boots run `resume`.
    #[arg(last = true, required = true)]
    agent_args: Vec<OsString>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log);
    #[cfg(feature = "test-hooks")]
    if let Err(e) = swap::fault::init_from_env() {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    match run(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn run(command: Command) -> Result<ExitCode> {
    match command {
        Command::Swap(args) => cmd_swap(args),
        Command::Resume(machine) => cmd_resume(&machine),
        Command::Status(args) => cmd_status(&args),
        Command::Rollback(args) => cmd_rollback(&args),
        Command::SimProvision(args) => cmd_sim_provision(&args),
        Command::SimMachine(args) => cmd_sim_machine(args),
        Command::Enroll(args) => cmd_enroll(&args),
        Command::Fetch(args) => cmd_fetch(&args),
        Command::Serve(args) => cmd_serve(*args),
        Command::Negotiate(args) => cmd_negotiate(&args),
        Command::Capture(args) => cmd_capture(&args),
    }
}

fn cmd_capture(args: &CaptureArgs) -> Result<ExitCode> {
    let config = args.facts.config(&args.dir)?;
    let identity = proto::net::NodeIdentity::load(&edge_agent::state::identity_dir(&args.dir))
        .with_context(|| format!("{} holds no enrolled edge", args.dir.display()))?;
    let machine = machine_spec(args.machine_root.as_ref(), args.linux_config.as_ref())
        .context("capture needs --machine-root or --linux-config")?;
    let options = edge_agent::capture::CaptureOptions {
        machine,
        script: args.script.clone(),
        publisher_dir: args.publisher_dir.clone(),
        name: args.name.clone(),
        version: args.version.clone(),
        timeout: std::time::Duration::from_secs(args.timeout_s),
    };
    let captured =
        runtime()?.block_on(edge_agent::capture::capture(&identity, &config, &options))?;
    println!(
        "captured slot {} as {}@{} ({}), {} chunks, {} bytes stored",
        captured.slot,
        captured.info.name,
        captured.info.version,
        captured.info.id,
        captured.info.chunk_count,
        captured.info.stored_bytes
    );
    Ok(ExitCode::SUCCESS)
}

fn cmd_swap(args: SwapArgs) -> Result<ExitCode> {
    let spec = args.machine.spec()?;
    let mut platform = spec
        .open(args.machine.booted_slot)
        .context("cannot open the machine")?;
    let machine_store = machine_store_dir(platform.as_ref());
    let source_store = match &args.store {
        Some(dir) if !same_dir(dir, &machine_store) => Some(
            dir.canonicalize()
                .with_context(|| format!("bundle store {} does not exist", dir.display()))?,
        ),
        _ => None,
    };
    let health_checks = if args.health_checks.is_empty() {
        let Some(stager) = &args.stager else {
            bail!("the default health checks (network up, stager reachable) need the stager's address: pass --stager HOST:PORT, or choose checks with --health-check");
        };
        vec![
            HealthCheck::NetworkUp,
            HealthCheck::ReachStager {
                addr: stager.clone(),
            },
        ]
    } else {
        args.health_checks
    };
    let identity_paths = if args.identity.is_empty() {
        DEFAULT_IDENTITY_PATHS
            .iter()
            .map(|p| (*p).to_owned())
            .collect()
    } else {
        args.identity
    };
    let plan = SwapPlan {
        target: args.target,
        rescue: args.rescue,
        identity_paths,
        health_checks,
        boot_attempts: args.boot_attempts,
        trusted_publishers: args.trusted,
        source_store,
    };
    let store = open_store(&machine_store).with_context(|| {
        format!(
            "cannot open the machine's store {}",
            machine_store.display()
        )
    })?;
    let source = match &plan.source_store {
        Some(dir) => Some(
            open_store(dir)
                .with_context(|| format!("cannot open bundle store {}", dir.display()))?,
        ),
        None => None,
    };
    let mut ctx = SwapContext {
        platform: platform.as_mut(),
        store: &store,
        source: source.as_ref().map(|s| s as &dyn BundleStore),
    };
    let end = swap::start_swap(&mut ctx, plan).context("swap failed")?;
    Ok(exit_for(&end))
}

fn cmd_resume(machine: &MachineArgs) -> Result<ExitCode> {
    let spec = machine.spec()?;
    let mut platform = spec
        .open(machine.booted_slot)
        .context("cannot open the machine")?;
    let journal = swap::journal::Journal::in_storage(&platform.storage_dir());
    let Some(state) = journal.load().context("cannot read the swap journal")? else {
        tracing::info!("no swap on record; nothing to resume");
        return Ok(ExitCode::SUCCESS);
    };
    if state.step.is_terminal() {
        tracing::info!(
            step = state.step.name(),
            "the last swap has ended; nothing to resume"
        );
        return Ok(ExitCode::SUCCESS);
    }
    let store = open_machine_store(platform.as_ref())?;
    // The source store is read only until the bundles are staged into the machine's store.
    let needs_source = matches!(state.step, Step::VerifyBundles | Step::StageBundles);
    let source = match (&state.plan.source_store, needs_source) {
        (Some(dir), true) => Some(
            open_store(dir)
                .with_context(|| format!("cannot open bundle store {}", dir.display()))?,
        ),
        _ => None,
    };
    let mut ctx = SwapContext {
        platform: platform.as_mut(),
        store: &store,
        source: source.as_ref().map(|s| s as &dyn BundleStore),
    };
    match swap::resume(&mut ctx).context("resuming the swap failed")? {
        Some(end) => Ok(exit_for(&end)),
        None => Ok(ExitCode::SUCCESS),
    }
}

fn cmd_status(args: &StatusArgs) -> Result<ExitCode> {
    let spec = args.machine.spec()?;
    let mut platform = spec
        .open(args.machine.booted_slot)
        .context("cannot open the machine")?;
    let report = status::collect(platform.as_mut());
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).context("cannot encode the status")?
        );
    } else {
        print!("{report}");
    }
    Ok(ExitCode::SUCCESS)
}

fn cmd_rollback(args: &RollbackArgs) -> Result<ExitCode> {
    let spec = args.machine.spec()?;
    let mut platform = spec
        .open(args.machine.booted_slot)
        .context("cannot open the machine")?;
    let store = open_machine_store(platform.as_ref())?;
    let mut ctx = SwapContext {
        platform: platform.as_mut(),
        store: &store,
        source: None,
    };
    let end = swap::rollback(&mut ctx, &args.reason).context("rollback failed")?;
    Ok(exit_for(&end))
}

fn cmd_sim_provision(args: &SimProvisionArgs) -> Result<ExitCode> {
    let mut trusted = parse_trusted_keys(&args.trusted)?;
    let store_dir = match (&args.store, &args.edge_dir) {
        (Some(store), _) => store.clone(),
        (None, Some(edge_dir)) => {
            let identity =
                proto::net::NodeIdentity::load(&edge_agent::state::identity_dir(edge_dir))
                    .with_context(|| format!("{} holds no enrolled edge", edge_dir.display()))?;
            trusted.push(*identity.publisher_key());
            edge_dir.join("store")
        }
        (None, None) => bail!("give --store or --edge-dir"),
    };
    let store = open_store(&store_dir)
        .with_context(|| format!("cannot open bundle store {}", store_dir.display()))?;
    // The edge's content keys go with the machine (into its storage area), so it can open an
    // encrypted OS.
    let keys = match &args.edge_dir {
        Some(edge_dir) => Some(edge_agent::keys::load(edge_dir)?),
        None => None,
    };
    let marker = swap::provision_sim(&args.root, &store, &args.os, &trusted, keys.as_ref())
        .with_context(|| format!("cannot provision {}", args.root.display()))?;
    println!(
        "provisioned {}: slot A runs {} {} (bundle {})",
        args.root.display(),
        marker.name,
        marker.version,
        marker.bundle
    );
    Ok(ExitCode::SUCCESS)
}

fn cmd_sim_machine(args: SimMachineArgs) -> Result<ExitCode> {
    let agent = std::env::current_exe().context("cannot find the edge-agent executable")?;
    let config = SimMachineConfig {
        agent,
        root: args.root.clone(),
        first_args: args.agent_args,
        max_boots: args.max_boots,
    };
    let boots = run_sim_machine(&config, &mut NoHooks)
        .with_context(|| format!("simulated machine {} failed", args.root.display()))?;
    for boot in &boots {
        println!(
            "boot {}: slot {} ({} {}) -> {:?}",
            boot.index, boot.slot, boot.marker.name, boot.marker.version, boot.exit
        );
    }
    let code = match boots.last().map(|b| b.exit) {
        Some(BootExit::Exited(code)) => u8::try_from(code).unwrap_or(1),
        _ => 1,
    };
    Ok(ExitCode::from(code))
}

/// The exit code for how a run ended: a swap that ended on the old or rescue OS is a failure
/// unless an operator asked for the rollback.
fn exit_for(end: &RunEnd) -> ExitCode {
    match end {
        RunEnd::Rebooting(_) => ExitCode::from(REBOOT_EXIT_CODE as u8),
        RunEnd::Idle(_) => ExitCode::SUCCESS,
        RunEnd::Finished(state) if state.step == Step::Done || state.rollback_requested => {
            println!("swap {}", state.step.name());
            ExitCode::SUCCESS
        }
        RunEnd::Finished(state) => {
            println!(
                "swap {}: {}",
                state.step.name(),
                state.failure.as_deref().unwrap_or("no reason recorded")
            );
            ExitCode::from(EXIT_SWAP_FAILED)
        }
    }
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn cmd_enroll(args: &EnrollArgs) -> Result<ExitCode> {
    let token = proto::net::EnrollToken::parse(&args.token)?;
    let dir = edge_agent::state::identity_dir(&args.dir);
    let runtime = runtime()?;
    let identity = runtime.block_on(proto::net::enroll(&token, &dir))?;
    println!(
        "enrolled as {} in site {}; origin at {}",
        identity.role(),
        identity.site(),
        identity.origin_addr()
    );
    println!("node id {}", identity.node_id());
    if !identity.stagers().is_empty() {
        println!("site stagers {}", identity.stagers().join(", "));
    }
    if identity.origin_addrs().len() > 1 {
        println!("origins {}", identity.origin_addrs().join(", "));
    }
    // The inventory at enrollment; a failure here leaves the node enrolled (it reports again
    // at every start).
    let config = args.facts.config(&args.dir)?;
    let reported = runtime.block_on(async {
        let node = edge_agent::fetch::Node::open(
            &args.dir,
            &args.stagers,
            proto::metrics::Metrics::new(),
        )?;
        let report = edge_agent::negotiate::build_report(
            &node,
            &args.dir,
            &config,
            proto::wire::ReportEvent::Enrolled,
            "",
        )?;
        let via = edge_agent::negotiate::report_only(&node, &report).await;
        // The content keys its class may read, from the origin directly, once it knows the
        // node; a failure leaves it without keys until its daemon starts.
        if via.is_ok() {
            match edge_agent::keys::refresh(&node.endpoint, &node.identity, &args.dir).await {
                Ok(keys) => println!(
                    "content keys: {} generation(s) this node may read",
                    keys.generations.len()
                ),
                Err(error) => tracing::warn!(
                    error = format!("{error:#}"),
                    "enrolled, but no content keys yet; the daemon asks at its start"
                ),
            }
        }
        node.endpoint.close(0u32.into(), b"done");
        via
    });
    match reported {
        Ok(via) => println!("inventory reported to {via}"),
        Err(error) => {
            tracing::warn!(
                error = format!("{error:#}"),
                "enrolled, but the inventory was not reported; it will be at the next start"
            )
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn cmd_negotiate(args: &NegotiateArgs) -> Result<ExitCode> {
    let config = args.facts.config(&args.dir)?;
    let machine = machine_spec(args.machine_root.as_ref(), args.linux_config.as_ref());
    let capture = args.capture.setup(machine.as_ref())?;
    let runtime = runtime()?;
    let outcome = match edge_agent::state::running_daemon(&args.dir) {
        Some(daemon) => {
            tracing::info!(daemon = %daemon.mesh, "this edge's daemon runs; it negotiates");
            runtime.block_on(negotiate_via_daemon(&args.dir, &daemon))?
        }
        None => runtime.block_on(async {
            let node = edge_agent::fetch::Node::open(
                &args.dir,
                &args.stagers,
                proto::metrics::Metrics::new(),
            )?;
            let mut outcome =
                edge_agent::negotiate::negotiate(&node, &args.dir, &config, "", &node).await;
            // No image, but this class may capture and we were told how: capture, then
            // negotiate again (the origin now names the captured image).
            let capture_as = match (&outcome, &capture) {
                (Ok(first), Some(setup)) => match &first.plan {
                    proto::wire::BootPlan::NoImageCapture { name, .. } => {
                        print!("{}", edge_agent::negotiate::describe(first));
                        Some(setup.options(name))
                    }
                    _ => None,
                },
                _ => None,
            };
            if let Some(options) = capture_as {
                let captured =
                    edge_agent::capture::capture(&node.identity, &config, &options).await?;
                println!(
                    "captured slot {} as {}@{} ({})",
                    captured.slot, captured.info.name, captured.info.version, captured.info.id
                );
                outcome =
                    edge_agent::negotiate::negotiate(&node, &args.dir, &config, "", &node).await;
            }
            node.endpoint.close(0u32.into(), b"done");
            outcome
        })?,
    };
    print!("{}", edge_agent::negotiate::describe(&outcome));
    if edge_agent::negotiate::is_failure(&outcome.plan) {
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

async fn negotiate_via_daemon(
    dir: &Path,
    daemon: &edge_agent::state::DaemonReady,
) -> Result<proto::wire::NegotiationOutcome> {
    use proto::wire::{Request, Response};
    let identity = proto::net::NodeIdentity::load(&edge_agent::state::identity_dir(dir))?;
    let addr: std::net::SocketAddr = daemon
        .mesh
        .parse()
        .with_context(|| format!("bad daemon address {:?}", daemon.mesh))?;
    let endpoint = proto::net::client_endpoint(&identity)?;
    let conn = proto::net::connect(&endpoint, addr)
        .await
        .with_context(|| format!("the daemon at {addr} does not answer; is it running?"))?;
    let answer = proto::net::call(&conn, &Request::Negotiate, proto::wire::MAX_FRAME_BYTES).await?;
    conn.close(0u32.into(), b"done");
    match answer {
        Response::Negotiated(outcome) => Ok(outcome),
        Response::Error { code, message } => {
            bail!("the daemon could not negotiate ({code:?}): {message}")
        }
        other => bail!("unexpected answer from the daemon: {other:?}"),
    }
}

/// The machine named by `--machine-root` (simulated) or `--linux-config` (real), if either.
fn machine_spec(root: Option<&PathBuf>, linux_config: Option<&PathBuf>) -> Option<MachineSpec> {
    match (root, linux_config) {
        (Some(root), _) => Some(MachineSpec::Sim { root: root.clone() }),
        (None, Some(config)) => Some(MachineSpec::Linux {
            config: config.clone(),
        }),
        (None, None) => None,
    }
}

fn cmd_serve(args: ServeArgs) -> Result<ExitCode> {
    let machine = machine_spec(args.machine_root.as_ref(), args.linux_config.as_ref());
    let capture = args.capture.setup(machine.as_ref())?;
    let config = edge_agent::daemon::DaemonConfig {
        dir: args.dir.clone(),
        stagers: args.stagers,
        listen: args.listen,
        metrics_listen: args.metrics_listen,
        peers: args.peers == "on",
        upload_limit_bits_per_s: args.upload_limit_mbit.map(|m| m * 1_000_000),
        max_uploads: args.max_uploads,
        #[cfg(feature = "test-hooks")]
        test_corrupt_serving: args.test_corrupt_serving,
        #[cfg(not(feature = "test-hooks"))]
        test_corrupt_serving: false,
        advertise: args.advertise,
        swap: match machine {
            Some(machine) => Some(edge_agent::remote_swap::RemoteSwapConfig {
                machine,
                health_checks: args
                    .swap_health_checks
                    .iter()
                    .map(ToString::to_string)
                    .collect(),
                boot_attempts: args.swap_boot_attempts,
                agent: std::env::current_exe().context("cannot find the edge-agent executable")?,
            }),
            None => None,
        },
        configured: args.facts.config(&args.dir)?,
        capture,
        cache_limit_bytes: args.cache_limit_bytes,
        keys_refresh: std::time::Duration::from_secs(args.keys_refresh_secs),
    };
    let ready_file = args.ready_file;
    let p2p = edge_agent::peers::P2pConfig {
        listen: args.p2p_listen,
        mdns: args.mdns,
    };
    runtime()?.block_on(edge_agent::daemon::serve_with_peers(
        config,
        p2p,
        move |ready| {
            if let Some(path) = &ready_file {
                edge_agent::state::write_json_atomically(path, ready)?;
            }
            Ok(())
        },
    ))?;
    Ok(ExitCode::SUCCESS)
}

fn cmd_fetch(args: &FetchArgs) -> Result<ExitCode> {
    if let Some(daemon) = edge_agent::state::running_daemon(&args.dir) {
        if args.to.is_some() {
            bail!("this edge's daemon holds the store; stop it to unpack with --to, or unpack after it stops");
        }
        let summary = runtime()?.block_on(edge_agent::fetch::fetch_via_daemon(
            &args.dir,
            &daemon,
            &args.bundle_text,
            !args.no_progress,
        ))?;
        if let Some(summary) = summary {
            println!(
                "bundle {} {}@{}: {} bytes received ({} from peers), {} of {} chunks already here (via the daemon)",
                summary.id,
                summary.name,
                summary.version,
                summary.bytes_received,
                summary.bytes_from_peers,
                summary.chunks_present,
                summary.chunks
            );
            return Ok(ExitCode::SUCCESS);
        }
    }
    let started = std::time::Instant::now();
    let spec: edge_agent::fetch::BundleSpec = args.bundle_text.parse()?;
    let report = runtime()?.block_on(edge_agent::fetch::fetch(
        &args.dir,
        &spec,
        &args.stagers,
        !args.no_progress,
    ))?;
    println!(
        "bundle {} {}@{}: {} bytes received, {} of {} chunks already here, {:.2} s",
        report.id,
        report.manifest.name,
        report.manifest.version,
        report.bytes_received,
        report.chunks_present,
        report.manifest.chunks.len(),
        started.elapsed().as_secs_f64()
    );
    if let Some(to) = &args.to {
        // Sealed with a generation this edge lacks: ask the origin once (the unpack then names
        // the generation if it is still missing, and writes nothing).
        if let Some(generation) = report.manifest.layout.sealed_generation() {
            if edge_agent::keys::load(&args.dir)?.get(generation).is_err() {
                runtime()?.block_on(async {
                    let node = edge_agent::fetch::Node::open(
                        &args.dir,
                        &args.stagers,
                        proto::metrics::Metrics::new(),
                    )?;
                    let ring = edge_agent::keys::ring_for(
                        &node.endpoint,
                        &node.identity,
                        &args.dir,
                        Some(generation),
                    )
                    .await;
                    node.endpoint.close(0u32.into(), b"done");
                    ring
                })?;
            }
        }
        edge_agent::fetch::unpack_to(&args.dir, &report.manifest, to, !args.no_progress)?;
        println!("unpacked into {}", to.display());
    }
    Ok(ExitCode::SUCCESS)
}
