//! `origin`: create a mesh, enroll nodes, publish bundles, serve them. This file parses the
//! command line and dispatches to [`cmd`].

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};
use origin::home::{OriginHome, DEFAULT_ENROLL_LISTEN, DEFAULT_LISTEN};
use origin::server::{self, ServeConfig};
use proto::net::Role;
use proto::wire::ControlCommand;
use proto::BundleKind;

mod cmd;

use cmd::bundles::{parse_dep, parse_pair, PublishArgs};
use cmd::control::{
    AdminCommand, ClassCommand, KeysCommand, NodesCommand, OverrideCommand, PolicyCommand,
    RolloutCommand,
};
use cmd::prepare::{PrepareArgs, PrepareCommand};
use cmd::store::EtcdTlsArgs;

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
    /// Create the mesh: its certificate authority, the publisher's key, an empty store. With
    /// `--join`, set up another origin of an existing mesh from its sealed key export
    /// (`origin keys export`): the same CA, publisher key and content keys, its own identity.
    Init {
        /// A key export of an origin of the mesh to join (`origin keys export --to FILE`).
        #[arg(long)]
        join: Option<PathBuf>,
        #[command(flatten)]
        passphrase: cmd::setup::PassphraseArgs,
    },
    /// Serve bundles to stagers, uploads from the publisher, and enrollments.
    Serve {
        /// Mesh address (QUIC, mutual TLS).
        #[arg(long, default_value = DEFAULT_LISTEN)]
        listen: SocketAddr,
        /// Enrollment address (QUIC).
        #[arg(long, default_value = DEFAULT_ENROLL_LISTEN)]
        enroll_listen: SocketAddr,
        /// The address other machines reach this origin at, told to the other origins, put in
        /// enrollment tokens and given to enrolled nodes (with the mesh's and the enrollment
        /// ports); by default the --listen address.
        #[arg(long)]
        advertise: Option<std::net::IpAddr>,
        /// Prometheus metrics address (HTTP).
        #[arg(long, default_value = "127.0.0.1:9400")]
        metrics_listen: SocketAddr,
        /// Serve the web console (and metrics and health beside it) on this address, e.g.
        /// 127.0.0.1:8080; off by default. A non-loopback address needs TLS
        /// (`--console-tls-cert/--console-tls-key` or `--console-tls-mesh`). Accounts:
        /// `origin admin add`.
        #[arg(long)]
        console: Option<SocketAddr>,
        /// Serve the console over HTTPS with this certificate chain (PEM, leaf first).
        #[arg(
            long,
            requires = "console_tls_key",
            conflicts_with = "console_tls_mesh"
        )]
        console_tls_cert: Option<PathBuf>,
        /// The private key of `--console-tls-cert` (PEM).
        #[arg(long, requires = "console_tls_cert")]
        console_tls_key: Option<PathBuf>,
        /// Serve the console over HTTPS with the origin's own certificate, issued by the mesh
        /// CA (browsers must trust `<home>/ca/ca.crt`).
        #[arg(long)]
        console_tls_mesh: bool,
        /// Write the bound addresses as JSON to this file once listening.
        #[arg(long)]
        ready_file: Option<PathBuf>,
        /// The control-plane store: `rocksdb` (the embedded database in the origin's home,
        /// for one origin) or `etcd://HOST:PORT,HOST:PORT,...[/PREFIX]` (an etcd cluster
        /// several origins share; prefix `stagecoach` by default).
        #[arg(long, default_value = "rocksdb", env = "STAGECOACH_ORIGIN_STORE")]
        store: String,
        #[command(flatten)]
        etcd_tls: EtcdTlsArgs,
        /// Test hook: corrupt every blob part served (only in a build with the `test-hooks`
        /// feature).
        #[cfg(feature = "test-hooks")]
        #[arg(long, hide = true)]
        test_corrupt_serving: bool,
    },
    /// Print a one-time token that enrolls one node with a role and a site.
    Enroll {
        /// `stager` or `edge`.
        #[arg(long)]
        role: Role,
        /// The node's site (a DNS label).
        #[arg(long)]
        site: String,
        /// Print the token and what it grants as JSON.
        #[arg(long)]
        json: bool,
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
        /// Encrypt the bundle with the newest content-key generation (`origin keys rotate`
        /// makes one): stagers and peers carry it without being able to read it.
        #[arg(long)]
        encrypt: bool,
        /// The publish is complete once this many origins hold the bundle, verified (the
        /// others pull it from this one); default: every origin that is up. 1 returns at once.
        #[arg(long)]
        replicas: Option<usize>,
        /// Seconds to wait for the replicas before failing (the bundle stays published).
        #[arg(long, default_value_t = 600)]
        replica_timeout_secs: u64,
        /// No progress bar.
        #[arg(long)]
        no_progress: bool,
    },
    /// List published bundles.
    Bundles {
        /// Print JSON (each bundle's id, name, version, kind, chunk count, sizes and sequence).
        #[arg(long)]
        json: bool,
    },
    /// Swap the OS of edges remotely: each edge fetches the bundles from its site, verifies
    /// them, and runs the crash-safe swap (its daemon needs --machine-root or --linux-config).
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
    /// List the nodes: id, site, class, role, installed, desired, state, last seen; or
    /// revoke one (`origin nodes revoke NODE`).
    Nodes {
        #[command(subcommand)]
        command: Option<NodesCommand>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Content keys of encrypted bundles: rotate, list, retire (asks the running origin).
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
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
    /// Prepare nodes now: the nodes a selector picks fetch a bundle through their site, verify
    /// it and keep it, without swapping, so a later rollout or boot only validates and swaps.
    /// Offline nodes prepare when they come back. `origin prepare status [ID]` shows one.
    #[command(args_conflicts_with_subcommands = true)]
    Prepare {
        #[command(subcommand)]
        command: Option<PrepareCommand>,
        #[command(flatten)]
        args: PrepareArgs,
    },
    /// Web console accounts (asks the running origin; `origin serve --console` serves the
    /// console).
    Admin {
        #[command(subcommand)]
        command: AdminCommand,
    },
    /// The running origin's store (backend, each etcd member's health) and the origins that
    /// share it and are up (asks the running origin).
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// The control-plane store: its health, and copying one into another.
    Store {
        #[command(subcommand)]
        command: StoreCommand,
    },
}

#[derive(Subcommand)]
enum StoreCommand {
    /// The store's backend and health (each etcd member up or down, leader or follower).
    Status {
        /// The store: `rocksdb` (this home's; `origin serve` must not be running) or
        /// `etcd://HOST:PORT,...[/PREFIX]`.
        #[arg(long, default_value = "rocksdb", env = "STAGECOACH_ORIGIN_STORE")]
        store: String,
        #[command(flatten)]
        etcd_tls: EtcdTlsArgs,
    },
    /// Copy every record (nodes, packages, classes, overrides, policy, audit log, ...) of one
    /// store into another, empty one: this home's RocksDB into etcd, or etcd into it. Stop
    /// `origin serve` first.
    Copy {
        /// The store copied from.
        #[arg(long, default_value = "rocksdb")]
        from: String,
        /// The store copied into (it must be empty).
        #[arg(long)]
        to: String,
        #[command(flatten)]
        etcd_tls: EtcdTlsArgs,
    },
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
        Command::Init {
            join: None,
            passphrase: _,
        } => cmd::setup::init(&home),
        Command::Init {
            join: Some(file),
            passphrase,
        } => cmd::setup::join(&home, &file, &passphrase),
        Command::Serve {
            listen,
            enroll_listen,
            advertise,
            metrics_listen,
            console,
            console_tls_cert,
            console_tls_key,
            console_tls_mesh,
            ready_file,
            store,
            etcd_tls,
            #[cfg(feature = "test-hooks")]
            test_corrupt_serving,
        } => {
            let store = etcd_tls.store(&store, &home)?;
            let console_tls = match (console_tls_cert, console_tls_key, console_tls_mesh) {
                (Some(cert), Some(key), _) => {
                    Some(origin::console::tls::TlsSource::Files { cert, key })
                }
                (_, _, true) => Some(origin::console::tls::TlsSource::Mesh),
                _ => None,
            };
            #[cfg(not(feature = "test-hooks"))]
            let test_corrupt_serving = false;
            server::serve(
                home,
                ServeConfig {
                    listen,
                    enroll_listen,
                    metrics_listen,
                    console,
                    console_tls,
                    ready_file,
                    store,
                    advertise,
                    test_corrupt_serving,
                },
            )
            .await
        }
        Command::Store { command } => match command {
            StoreCommand::Status { store, etcd_tls } => {
                cmd::store::status(&etcd_tls.store(&store, &home)?)
            }
            StoreCommand::Copy { from, to, etcd_tls } => {
                cmd::store::copy(&etcd_tls.store(&from, &home)?, &etcd_tls.store(&to, &home)?)
            }
        },
        Command::Enroll { role, site, json } => cmd::setup::enroll(&home, role, site, json).await,
        Command::Publish {
            path,
            name,
            version,
            kind,
            selectors,
            dependencies,
            encrypt,
            replicas,
            replica_timeout_secs,
            no_progress,
        } => {
            let args = PublishArgs {
                path: &path,
                name,
                version,
                kind,
                selectors,
                dependencies,
                encrypt,
                replicas,
                replica_timeout: std::time::Duration::from_secs(replica_timeout_secs),
                progress: !no_progress,
            };
            cmd::bundles::publish(&home, args).await
        }
        Command::Bundles { json } => cmd::bundles::list(&home, json).await,
        Command::Swap {
            target,
            rescue,
            edges,
            no_progress,
        } => cmd::swap::swap(&home, &target, &rescue, &edges, !no_progress).await,
        Command::Policy { command } => cmd::control::policy(&home, command).await,
        Command::Nodes {
            command: Some(command),
            ..
        } => cmd::control::nodes(&home, command).await,
        Command::Nodes {
            command: None,
            json,
        } => cmd::control::run(&home, ControlCommand::Nodes, json, "cannot list the nodes").await,
        Command::Keys { command } => cmd::control::keys(&home, command).await,
        Command::Class { command } => cmd::control::class(&home, command).await,
        Command::Override { command } => cmd::control::override_(&home, command).await,
        Command::Audit { limit, json } => {
            cmd::control::run(
                &home,
                ControlCommand::Audit { limit },
                json,
                "cannot read the audit log",
            )
            .await
        }
        Command::TestRun { node, bundle } => {
            cmd::control::run(
                &home,
                ControlCommand::TestRun { node, bundle },
                false,
                "the test run did not start",
            )
            .await
        }
        Command::Status { json } => {
            cmd::control::run(
                &home,
                ControlCommand::Status,
                json,
                "cannot read the origin's status",
            )
            .await
        }
        Command::Rollout { command } => cmd::control::rollout(&home, command).await,
        Command::Prepare { command, args } => cmd::prepare::prepare(&home, command, args).await,
        Command::Admin { command } => cmd::control::admin(&home, command).await,
    }
}
