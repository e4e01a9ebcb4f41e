//! `stager`: a site's stage server.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};
use proto::net::{enroll, EnrollToken};
use stager::node::{self, StagerConfig};

#[derive(Parser)]
#[command(
    name = "stager",
    version,
    about = "Stagecoach stager: pulls bundles once per site and serves the site"
)]
struct Cli {
    /// The stager's state directory.
    #[arg(
        long,
        global = true,
        default_value = "/var/lib/stagecoach/stager",
        env = "STAGECOACH_STAGER_DIR"
    )]
    dir: PathBuf,
    #[command(subcommand)]
    command: Command,
}

// Parsed once at start: the size of the largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Obtain this stager's certificate with a token from `origin enroll --role stager`.
    Enroll {
        /// The token.
        token: String,
    },
    /// Follow the origin and serve the site.
    Serve {
        /// The site this stager serves (checked against its certificate).
        #[arg(long)]
        site: Option<String>,
        /// The origin's mesh address (default: the one learnt at enrollment). Control requests
        /// always go here; data too when no --upstream answers.
        #[arg(long)]
        origin: Option<SocketAddr>,
        /// Another origin of the mesh (repeatable, in order of preference after --origin):
        /// control requests and data go to the next one that answers when an origin cannot
        /// be reached, without refetching verified data.
        #[arg(long = "also-origin", value_name = "ADDR")]
        more_origins: Vec<SocketAddr>,
        /// An upstream stager (a region's) to pull bundles through (repeatable, in order of
        /// preference; the origin comes after them).
        #[arg(long = "upstream", value_name = "ADDR")]
        upstreams: Vec<SocketAddr>,
        /// Another stager of this site (repeatable): each chunk is then pulled across the WAN
        /// by one of the site's stagers, and the others copy it from that one.
        #[arg(long = "sibling", value_name = "ADDR")]
        siblings: Vec<SocketAddr>,
        /// Mesh address for the site's edges.
        #[arg(long, default_value = "0.0.0.0:7410")]
        listen: SocketAddr,
        /// Where the site's edges reach this stager (default: --listen as bound, 0.0.0.0 read
        /// as 127.0.0.1). The origin gives it to the edges that enroll in the site.
        #[arg(long)]
        advertise: Option<SocketAddr>,
        /// Prometheus metrics address (HTTP).
        #[arg(long, default_value = "127.0.0.1:9410")]
        metrics_listen: SocketAddr,
        /// Write the bound addresses as JSON to this file once listening.
        #[arg(long)]
        ready_file: Option<PathBuf>,
        /// Bound on the store, in GiB (fractions allowed: 0.5 is 512 MiB). Bundles the site's
        /// keep-set names are kept even beyond it (with a warning); the others are evicted least
        /// recently used.
        #[arg(long = "cache-gib", value_name = "GIB", default_value = node::DEFAULT_CACHE_GIB, value_parser = proto::retention::parse_cache_gib)]
        cache_limit_bytes: u64,
        /// Test hook: corrupt every blob part served to edges (only in a build with the
        /// `test-hooks` feature).
        #[cfg(feature = "test-hooks")]
        #[arg(long, hide = true)]
        test_corrupt_serving: bool,
        /// Upload limit to the site's edges, in Mbit/s (default: none).
        #[arg(long)]
        upload_limit_mbit: Option<u64>,
    },
    /// What the running stager pulls from where: its upstreams (the one in use), failovers,
    /// siblings and bytes moved.
    Status,
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
    match cli.command {
        Command::Enroll { token } => {
            let token = EnrollToken::parse(&token)?;
            let identity = enroll(&token, &node::identity_dir(&cli.dir)).await?;
            println!(
                "enrolled as {} in site {}; origin at {}",
                identity.role(),
                identity.site(),
                identity.origin_addr()
            );
        }
        Command::Serve {
            site,
            origin,
            more_origins,
            upstreams,
            siblings,
            listen,
            advertise,
            metrics_listen,
            ready_file,
            cache_limit_bytes,
            #[cfg(feature = "test-hooks")]
            test_corrupt_serving,
            upload_limit_mbit,
        } => {
            #[cfg(not(feature = "test-hooks"))]
            let test_corrupt_serving = false;
            node::serve(StagerConfig {
                dir: cli.dir,
                site,
                origin,
                more_origins,
                upstreams,
                siblings,
                listen,
                advertise,
                metrics_listen,
                ready_file,
                cache_limit_bytes,
                test_corrupt_serving,
                upload_limit_bits_per_s: upload_limit_mbit.map(|m| m * 1_000_000),
            })
            .await?
        }
        Command::Status => print!("{}", node::render_status(&cli.dir)?),
    }
    Ok(())
}
