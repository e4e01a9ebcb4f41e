//! `origin prepare BUNDLE --to SELECTOR`, `origin prepare status [ID]` and `origin prepare
//! cancel ID`, client side: the
//! running origin stores the operation and asks the nodes; with `--wait` this polls its status,
//! drawing one progress bar per site on a terminal, until no node waits for an answer (offline
//! nodes are reported as pending: they prepare when they come back).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use origin::admin;
use origin::control::PrepareStatus;
use origin::db::PrepareState;
use origin::home::OriginHome;
use proto::wire::{ControlCommand, ControlReply};

/// How often `--wait` asks the origin for the operation's status.
const POLL_INTERVAL: Duration = Duration::from_millis(500);

#[derive(Subcommand)]
pub enum PrepareCommand {
    /// Where a prepare operation stands, site by site and node by node.
    Status {
        /// The operation's id (default: the newest).
        id: Option<u64>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Cancel a prepare operation: nodes that have not prepared are not asked any more, and
    /// no node keeps the bundle for it (their stores may collect it).
    Cancel {
        /// The operation's id.
        id: u64,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
pub struct PrepareArgs {
    /// The bundle: NAME@VERSION, NAME (the newest) or a bundle id.
    pub bundle: Option<String>,
    /// Which nodes: `all`, or KEY=VALUE[,KEY=VALUE] with keys site, class, role, node.
    #[arg(long = "to")]
    pub selector: Option<String>,
    /// Wait until every node is prepared, failed, or offline (offline nodes prepare when they
    /// come back), showing progress per site.
    #[arg(long)]
    pub wait: bool,
    /// Give up waiting after this many seconds (the operation goes on).
    #[arg(long, default_value_t = 3600)]
    pub timeout_secs: u64,
    /// No progress bars.
    #[arg(long)]
    pub no_progress: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `origin prepare ...`.
pub async fn prepare(
    home: &OriginHome,
    command: Option<PrepareCommand>,
    args: PrepareArgs,
) -> Result<()> {
    match command {
        Some(PrepareCommand::Status { id, json }) => {
            let reply = admin::run(home, ControlCommand::PrepareStatus { id }).await?;
            return admin::print(&reply, json, "no prepare status");
        }
        Some(PrepareCommand::Cancel { id, json }) => {
            let reply = admin::run(home, ControlCommand::PrepareCancel { id }).await?;
            return admin::print(&reply, json, "the prepare operation was not cancelled");
        }
        None => {}
    }
    let Some(bundle) = args.bundle else {
        bail!("name the bundle to prepare: `origin prepare NAME@VERSION --to SELECTOR` (or `origin prepare status [ID]`)");
    };
    let Some(selector) = args.selector else {
        bail!("say which nodes prepare {bundle}: --to all, or --to KEY=VALUE[,KEY=VALUE] with keys site, class, role, node");
    };
    let reply = admin::run(home, ControlCommand::Prepare { bundle, selector }).await?;
    if !reply.success || !args.wait {
        return admin::print(&reply, args.json, "the prepare did not start");
    }
    let started = decode(&reply)?;
    let id = started.operation.id;
    let bars = SiteBars::new(&started, !args.no_progress && !args.json);
    let deadline = Instant::now() + Duration::from_secs(args.timeout_secs);
    let (reply, status) = loop {
        let reply = admin::run(home, ControlCommand::PrepareStatus { id: Some(id) }).await?;
        if !reply.success {
            bars.clear();
            return admin::print(&reply, args.json, "no prepare status");
        }
        let status = decode(&reply)?;
        bars.show(&status);
        if status.settled {
            break (reply, status);
        }
        if Instant::now() >= deadline {
            bars.clear();
            admin::print(&reply, args.json, "")?;
            bail!(
                "prepare {id} is not settled after {} s; it goes on (`origin prepare status {id}`)",
                args.timeout_secs
            );
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    };
    bars.clear();
    admin::print(&reply, args.json, "")?;
    let failed = status.count(PrepareState::Failed);
    if failed > 0 {
        bail!(
            "{failed} node(s) could not prepare {} (see DETAIL above)",
            status.operation.bundle
        );
    }
    Ok(())
}

fn decode(reply: &ControlReply) -> Result<PrepareStatus> {
    serde_json::from_str(&reply.json).context("the origin's prepare status does not decode")
}

/// One progress bar per site, in bytes the site's nodes hold of the bundle.
struct SiteBars {
    multi: MultiProgress,
    bars: BTreeMap<String, ProgressBar>,
}

impl SiteBars {
    fn new(status: &PrepareStatus, show: bool) -> Self {
        let multi = MultiProgress::with_draw_target(if show {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        });
        let style = ProgressStyle::with_template(
            "{prefix:>12} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {wide_msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        let bars = status
            .sites
            .iter()
            .map(|(site, progress)| {
                let bar = multi.add(ProgressBar::new(progress.total_bytes));
                bar.set_style(style.clone());
                bar.set_prefix(site.clone());
                (site.clone(), bar)
            })
            .collect();
        Self { multi, bars }
    }

    fn show(&self, status: &PrepareStatus) {
        for (site, progress) in &status.sites {
            if let Some(bar) = self.bars.get(site) {
                bar.set_position(progress.done_bytes);
                bar.set_message(format!(
                    "{} prepared, {} fetching, {} pending, {} failed",
                    progress.prepared, progress.fetching, progress.pending, progress.failed
                ));
            }
        }
    }

    fn clear(&self) {
        for bar in self.bars.values() {
            bar.finish_and_clear();
        }
        let _ = self.multi.clear();
    }
}
