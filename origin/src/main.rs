//! `origin`: create a mesh, enroll nodes, publish bundles, serve them.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use origin::admin;
use origin::home::{OriginHome, DEFAULT_ENROLL_LISTEN, DEFAULT_LISTEN};
use origin::server::{self, ServeConfig};
use proto::manifest::{Dependency, Selector};
use proto::net::{client_endpoint, connect, EnrollToken, Role, Site};
use proto::pack::PackOptions;
use proto::wire::ControlCommand;
use proto::BundleKind;

#[derive(Parser)]
#[command(
    name = "origin",
    version,
    about = "Stagecoach origin: the mesh's CA, publisher and source"
)]
struct Cli {
    /// The origin's state directory.
    #[arg(
        long,
        global = true,
        default_value = "/var/lib/stagecoach/origin",
        env = "STAGECOACH_ORIGIN_DIR"
    )]
    dir: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create the mesh: its certificate authority, the publisher's key, an empty store.
    Init,
    /// Serve bundles to stagers, uploads from the publisher, and enrollments.
    Serve {
        /// Mesh address (QUIC, mutual TLS).
        #[arg(long, default_value = DEFAULT_LISTEN)]
        listen: SocketAddr,
        /// Enrollment address (QUIC).
        #[arg(long, default_value = DEFAULT_ENROLL_LISTEN)]
        enroll_listen: SocketAddr,
        /// Prometheus metrics address (HTTP).
        #[arg(long, default_value = "127.0.0.1:9400")]
        metrics_listen: SocketAddr,
        /// Write the bound addresses as JSON to this file once listening.
        #[arg(long)]
        ready_file: Option<PathBuf>,
    },
    /// Print a one-time token that enrolls one node with a role and a site.
    Enroll {
        /// `stager` or `edge`.
        #[arg(long)]
        role: Role,
        /// The node's site (a DNS label).
        #[arg(long)]
        site: String,
    },
    /// Pack a directory tree or an image and publish it to the running origin.
    Publish {
        /// Directory tree or image file.
        path: PathBuf,
        /// Bundle name.
        #[arg(long)]
        name: String,
        /// Bundle version.
        #[arg(long)]
        version: String,
        /// os-image, base-os, package, boot-image or script.
        #[arg(long, default_value = "package")]
        kind: BundleKind,
        /// Compatibility selector KEY=VALUE (repeatable).
        #[arg(long = "selector", value_parser = parse_pair)]
        selectors: Vec<(String, String)>,
        /// Dependency NAME@VERSION (repeatable; VERSION may be *).
        #[arg(long = "depends", value_parser = parse_dep)]
        dependencies: Vec<(String, String)>,
        /// No progress bar.
        #[arg(long)]
        no_progress: bool,
    },
    /// List published bundles.
    Bundles,
    /// Swap the OS of edges remotely: each edge fetches the bundles from its site, verifies
    /// them, and runs the crash-safe swap (its daemon needs --machine-root).
    Swap {
        /// The OS to install: a bundle id, NAME@VERSION or NAME (the newest).
        #[arg(long)]
        target: String,
        /// The rescue (base) OS, likewise.
        #[arg(long)]
        rescue: String,
        /// An edge daemon's mesh address (repeatable).
        #[arg(long = "edge", required = true)]
        edges: Vec<SocketAddr>,
        /// No progress display.
        #[arg(long)]
        no_progress: bool,
    },
    /// Load or check the policy: rules from inventory facts to bundles, their precedence, and
    /// features (asks the running origin).
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// List the nodes: id, site, class, role, installed, desired, state, last seen.
    Nodes {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Put a node in a class.
    Class {
        #[command(subcommand)]
        command: ClassCommand,
    },
    /// Pin bundle versions on one node (an override outranks every other rule).
    Override {
        #[command(subcommand)]
        command: OverrideCommand,
    },
    /// Show the audit log of changes, newest last.
    Audit {
        /// How many records.
        #[arg(long, default_value_t = 20)]
        limit: u32,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run a bundle on a node in test mode: not persisted anywhere; a restart of the node
    /// (or of the origin) forgets it.
    TestRun {
        /// The node's id (or a unique prefix of it).
        #[arg(long)]
        node: String,
        /// A bundle id, NAME@VERSION or NAME (the newest).
        bundle: String,
    },
    /// Canary rollouts of an OS bundle: one canary per site, then the rest of the site, site
    /// by site; each node swaps remotely and health-checks; a failed canary halts it.
    Rollout {
        #[command(subcommand)]
        command: RolloutCommand,
    },
}

#[derive(Subcommand)]
enum RolloutCommand {
    /// Start a rollout (one at a time).
    Start {
        /// The OS to install: NAME@VERSION, NAME (the newest) or a bundle id.
        bundle: String,
        /// Which nodes: `all`, or KEY=VALUE[,KEY=VALUE] with keys site, class, role, node.
        #[arg(long = "to")]
        selector: String,
        /// The rescue OS every swap keeps in its spare slot.
        #[arg(long)]
        rescue: String,
        /// Failures tolerated outside canary waves before the rollout halts.
        #[arg(long, default_value_t = 0)]
        max_failures: u32,
        /// Offer the bundle to nodes that run a newer version too.
        #[arg(long)]
        downgrade: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Where the rollout stands: every wave, every node, and why it halted.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Start no new wave until resumed (swaps already started finish).
    Pause,
    /// Continue a paused rollout.
    Resume,
    /// Halt the rollout for good (swaps already started finish).
    Abort,
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Replace the policy with a TOML file (rules, precedence, features); audited.
    Load {
        /// The policy file.
        file: PathBuf,
    },
    /// Resolve every node and list every conflict; exits non-zero if any node does not resolve.
    Check {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum ClassCommand {
    /// Put NODE in CLASS (outranks the class the node reports).
    Set {
        /// Node id (or a unique prefix).
        node: String,
        /// The class.
        class: String,
    },
}

#[derive(Subcommand)]
enum OverrideCommand {
    /// Pin NAME@VERSION on NODE.
    Set {
        /// Node id (or a unique prefix).
        node: String,
        /// NAME@VERSION.
        bundle: String,
    },
    /// Remove NODE's overrides (all, or of one bundle name).
    Clear {
        /// Node id (or a unique prefix).
        node: String,
        /// Only this bundle name.
        #[arg(long)]
        name: Option<String>,
    },
}

fn parse_pair(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))
}

fn parse_dep(s: &str) -> Result<(String, String), String> {
    s.split_once('@')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("expected NAME@VERSION, got {s:?}"))
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let home = OriginHome::new(&cli.dir);
    match cli.command {
        Command::Init => {
            home.init()?;
            println!("origin initialised in {}", home.dir().display());
            println!("next: origin serve --dir {}", home.dir().display());
        }
        Command::Serve {
            listen,
            enroll_listen,
            metrics_listen,
            ready_file,
        } => {
            server::serve(
                home,
                ServeConfig {
                    listen,
                    enroll_listen,
                    metrics_listen,
                    ready_file,
                },
            )
            .await?
        }
        Command::Enroll { role, site } => {
            if !matches!(role, Role::Stager | Role::Edge) {
                anyhow::bail!("only stager and edge nodes enroll with tokens");
            }
            let site = Site::new(site)?;
            let addrs = home.serve_addrs()?;
            let enroll_addr: SocketAddr = addrs.enroll.parse().context("bad enroll address")?;
            let identity = home.origin_identity()?;
            let fingerprint = proto::net::cert_fingerprint(identity.cert_der());
            let token = EnrollToken::new(enroll_addr, fingerprint, role, site.clone());
            origin::tokens::record(&home.tokens_dir(), &token.secret, role, &site)?;
            println!("{}", token.encode());
            eprintln!("one-time token for a {role} in site {site}; valid 24 h");
        }
        Command::Publish {
            path,
            name,
            version,
            kind,
            selectors,
            dependencies,
            no_progress,
        } => {
            let mut options = PackOptions::new(name, version, kind);
            options.selectors = selectors
                .into_iter()
                .map(|(key, value)| Selector { key, value })
                .collect();
            options.dependencies = dependencies
                .into_iter()
                .map(|(name, version)| Dependency { name, version })
                .collect();
            let info = origin::publish::publish(&home, &path, options, !no_progress).await?;
            println!(
                "bundle {} {}@{} ({} chunks, {} bytes stored, {} bytes raw, seq {})",
                info.id,
                info.name,
                info.version,
                info.chunk_count,
                info.stored_bytes,
                info.raw_bytes,
                info.seq
            );
        }
        Command::Bundles => {
            let identity = home.publisher_identity()?;
            let endpoint = client_endpoint(&identity)?;
            let conn = connect(&endpoint, home.mesh_addr()?).await?;
            let list = proto::mesh::fetch::list_bundles(&conn).await?;
            println!(
                "{:<4} {:<24} {:<12} {:<10} {:>12} {:>12}  id",
                "seq", "name", "version", "kind", "stored", "raw"
            );
            for b in list {
                println!(
                    "{:<4} {:<24} {:<12} {:<10} {:>12} {:>12}  {}",
                    b.seq,
                    b.name,
                    b.version,
                    b.kind.to_string(),
                    b.stored_bytes,
                    b.raw_bytes,
                    b.id
                );
            }
        }
        Command::Swap {
            target,
            rescue,
            edges,
            no_progress,
        } => {
            let target = origin::remote::resolve_bundle(&home, &target).await?;
            let rescue = origin::remote::resolve_bundle(&home, &rescue).await?;
            let identity = home.origin_identity()?;
            let results =
                origin::remote::swap_edges(&identity, &edges, target, rescue, !no_progress).await?;
            let mut failed = 0;
            for r in &results {
                match &r.result {
                    Ok((outcome, None)) => println!("{}  {outcome}", r.edge),
                    Ok((outcome, Some(why))) => println!("{}  {outcome}: {why}", r.edge),
                    Err(e) => println!("{}  error: {e}", r.edge),
                }
                if !r.succeeded() {
                    failed += 1;
                }
            }
            if failed > 0 {
                anyhow::bail!(
                    "{failed} of {} edges did not end on the new OS",
                    results.len()
                );
            }
        }
        Command::Policy {
            command: PolicyCommand::Load { file },
        } => {
            let toml = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read the policy file {}", file.display()))?;
            let source = file.display().to_string();
            let reply = admin::run(&home, ControlCommand::PolicyLoad { source, toml }).await?;
            admin::print(&reply, false, "the policy was not loaded")?;
        }
        Command::Policy {
            command: PolicyCommand::Check { json },
        } => {
            let reply = admin::run(&home, ControlCommand::PolicyCheck).await?;
            admin::print(
                &reply,
                json,
                "the policy does not resolve every node (conflicts or errors above)",
            )?;
        }
        Command::Nodes { json } => {
            let reply = admin::run(&home, ControlCommand::Nodes).await?;
            admin::print(&reply, json, "cannot list the nodes")?;
        }
        Command::Class {
            command: ClassCommand::Set { node, class },
        } => {
            let reply = admin::run(&home, ControlCommand::ClassSet { node, class }).await?;
            admin::print(&reply, false, "the class was not set")?;
        }
        Command::Override {
            command: OverrideCommand::Set { node, bundle },
        } => {
            let reply = admin::run(&home, ControlCommand::OverrideSet { node, bundle }).await?;
            admin::print(&reply, false, "the override was not set")?;
        }
        Command::Override {
            command: OverrideCommand::Clear { node, name },
        } => {
            let reply = admin::run(&home, ControlCommand::OverrideClear { node, name }).await?;
            admin::print(&reply, false, "the override was not cleared")?;
        }
        Command::Audit { limit, json } => {
            let reply = admin::run(&home, ControlCommand::Audit { limit }).await?;
            admin::print(&reply, json, "cannot read the audit log")?;
        }
        Command::TestRun { node, bundle } => {
            let reply = admin::run(&home, ControlCommand::TestRun { node, bundle }).await?;
            admin::print(&reply, false, "the test run did not start")?;
        }
        Command::Rollout { command } => {
            use proto::wire::RolloutAction;
            let (command, json, failure) = match command {
                RolloutCommand::Start {
                    bundle,
                    selector,
                    rescue,
                    max_failures,
                    downgrade,
                    json,
                } => (
                    ControlCommand::RolloutStart {
                        bundle,
                        rescue,
                        selector,
                        max_failures,
                        downgrade,
                    },
                    json,
                    "the rollout did not start",
                ),
                RolloutCommand::Status { json } => (
                    ControlCommand::Rollout {
                        action: RolloutAction::Status,
                    },
                    json,
                    "no rollout status",
                ),
                RolloutCommand::Pause => (
                    ControlCommand::Rollout {
                        action: RolloutAction::Pause,
                    },
                    false,
                    "cannot pause the rollout",
                ),
                RolloutCommand::Resume => (
                    ControlCommand::Rollout {
                        action: RolloutAction::Resume,
                    },
                    false,
                    "cannot resume the rollout",
                ),
                RolloutCommand::Abort => (
                    ControlCommand::Rollout {
                        action: RolloutAction::Abort,
                    },
                    false,
                    "cannot abort the rollout",
                ),
            };
            let reply = admin::run(&home, command).await?;
            admin::print(&reply, json, failure)?;
        }
    }
    Ok(())
}
