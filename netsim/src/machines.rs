//! Simulated machines behind the edges of a [`Testbed`], and OS swaps the origin starts on them.
//!
//! Each edge gets a machine root (`EDGE_DIR/machine`, a `SimPlatform`): it is provisioned with
//! a factory OS fetched through the mesh, and the edge's daemon is told to swap it when the
//! origin asks (`edge-agent serve --machine-root`). [`swap_all`] then runs `origin swap`, the
//! command an operator types, against the edges' daemons.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::procs;
use crate::testbed::{EdgeNode, Testbed};

/// The machine root of `edge`.
pub fn machine_root(edge: &EdgeNode) -> PathBuf {
    edge.dir.join("machine")
}

/// Gives every edge that has no daemon yet a simulated machine running `factory_os` (a bundle
/// id the origin published): the edge fetches it through its stager, then `edge-agent
/// sim-provision` installs it in slot A. Start the daemons afterwards with [`daemon_flags`].
pub async fn provision(mesh: &mut Testbed, factory_os: &str) -> Result<()> {
    let edges: Vec<EdgeNode> = mesh
        .edges
        .iter()
        .filter(|e| e.daemon.is_none())
        .cloned()
        .collect();
    let fetched = mesh.fetch_all(&edges, factory_os).await?;
    if let Some(failed) = fetched.iter().find(|f| !f.ok) {
        bail!(
            "{} could not fetch the factory OS: {}",
            failed.edge.name,
            std::fs::read_to_string(&failed.log)
                .unwrap_or_default()
                .trim()
        );
    }
    for edge in &edges {
        let root = machine_root(edge);
        procs::run_to_end(
            &mesh.bins.path("edge-agent"),
            &[
                "sim-provision".into(),
                "--root".into(),
                path(&root),
                "--edge-dir".into(),
                path(&edge.dir),
                "--os".into(),
                factory_os.to_owned(),
            ],
        )
        .await
        .with_context(|| format!("cannot provision {}'s machine", edge.name))?;
    }
    Ok(())
}

/// Flags that make an edge's daemon swap its machine when the origin asks, with `checks` as
/// the health checks of the new OS (`reach-stager=ADDR`, `command=...`; empty: the defaults).
pub fn daemon_flags(edge: &EdgeNode, checks: &[String]) -> Vec<String> {
    let mut flags = vec!["--machine-root".to_owned(), path(&machine_root(edge))];
    for check in checks {
        flags.push("--swap-health-check".to_owned());
        flags.push(check.clone());
    }
    flags
}

/// How one edge's swap ended, as `origin swap` printed it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SwapLine {
    /// The edge's daemon address.
    pub edge: String,
    /// `done`, `rolled-back`, `aborted`, or `error`.
    pub outcome: String,
    /// The rest of the line: why, when it did not end on the new OS.
    pub detail: String,
}

/// What `origin swap` did.
#[derive(Clone, Debug)]
pub struct SwapRun {
    /// Whether it exited 0 (every edge on the new OS).
    pub all_done: bool,
    /// One line per edge.
    pub lines: Vec<SwapLine>,
    /// Its whole output, for failure messages.
    pub output: String,
}

/// Runs `origin swap --target TARGET --rescue RESCUE` against the daemons of `edges`.
pub async fn swap_all(
    mesh: &Testbed,
    edges: &[EdgeNode],
    target: &str,
    rescue: &str,
) -> Result<SwapRun> {
    let mut args = vec![
        "swap".to_owned(),
        "--dir".to_owned(),
        path(&mesh.origin_dir),
        "--target".to_owned(),
        target.to_owned(),
        "--rescue".to_owned(),
        rescue.to_owned(),
        "--no-progress".to_owned(),
    ];
    for edge in edges {
        let daemon = edge
            .daemon
            .as_ref()
            .with_context(|| format!("{} has no daemon", edge.name))?;
        args.push("--edge".to_owned());
        args.push(daemon.mesh.clone());
    }
    let output = tokio::process::Command::new(mesh.bins.path("origin"))
        .args(&args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .context("cannot run origin swap")?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let lines = stdout
        .lines()
        .filter_map(|line| {
            let (edge, rest) = line.split_once("  ")?;
            let (outcome, detail) = match rest.split_once(": ") {
                Some((outcome, detail)) => (outcome, detail),
                None => (rest, ""),
            };
            Some(SwapLine {
                edge: edge.to_owned(),
                outcome: outcome.to_owned(),
                detail: detail.to_owned(),
            })
        })
        .collect();
    Ok(SwapRun {
        all_done: output.status.success(),
        lines,
        output: format!("{stdout}{}", String::from_utf8_lossy(&output.stderr)),
    })
}

/// `edge-agent status --json` of `edge`'s machine.
pub async fn status(mesh: &Testbed, edge: &EdgeNode) -> Result<serde_json::Value> {
    let text = procs::run_to_end(
        &mesh.bins.path("edge-agent"),
        &[
            "status".into(),
            "--root".into(),
            path(&machine_root(edge)),
            "--json".into(),
        ],
    )
    .await?;
    serde_json::from_str(&text).context("edge-agent status printed no JSON")
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

/// The OS bundles a demo machine starts from: a factory OS in slot A and the rescue OS a swap
/// puts in slot B.
#[derive(Clone, Debug)]
pub struct BaseImages {
    /// The factory OS every machine is provisioned with.
    pub factory: String,
    /// The rescue OS.
    pub rescue: String,
}

/// Size of the generated factory and rescue OS trees, in bytes.
pub const BASE_IMAGE_BYTES: u64 = 1024 * 1024;

/// Publishes a small factory OS and a rescue OS (generated trees under `work`), and provisions a
/// simulated machine behind every edge that has no daemon yet. Start the daemons afterwards with
/// [`daemon_flags`] and [`reach_stager_check`].
pub async fn prepare(mesh: &mut Testbed, work: &Path, seed: u64) -> Result<BaseImages> {
    let factory_tree = work.join("factory-os");
    let rescue_tree = work.join("rescue-os");
    crate::datagen::generate_tree(&factory_tree, BASE_IMAGE_BYTES, seed ^ 0xfac7)?;
    crate::datagen::generate_tree(&rescue_tree, BASE_IMAGE_BYTES, seed ^ 0x5e5c)?;
    let factory = mesh.publish(&factory_tree, "factory-os", "1").await?;
    let rescue = mesh
        .publish_as(&rescue_tree, "rescue-os", "1", "base-os")
        .await?;
    provision(mesh, &factory).await?;
    Ok(BaseImages { factory, rescue })
}

/// The health check "this edge reaches its site's first stager".
pub fn reach_stager_check(mesh: &Testbed, edge: &EdgeNode) -> Vec<String> {
    mesh.stager_addrs(&edge.site)
        .into_iter()
        .take(1)
        .map(|addr| format!("reach-stager={addr}"))
        .collect()
}
