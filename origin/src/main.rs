//! `origin`: create a mesh, enroll nodes, publish bundles, serve them.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use origin::home::{OriginHome, DEFAULT_ENROLL_LISTEN, DEFAULT_LISTEN};
use origin::server::{self, ServeConfig};
use proto::manifest::{Dependency, Selector};
use proto::net::{client_endpoint, connect, EnrollToken, Role, Site};
use proto::pack::PackOptions;
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
    }
    Ok(())
}
