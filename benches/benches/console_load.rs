//! Issue 17: the console's page load with 10,000 nodes in 100 sites in the origin's database.
//!
//! Fills a fresh origin's database with 10,000 node records in 100 sites (100 edges each, a
//! class and an installed version apiece) through the database's own write path
//! (`origin::db::Db::commit`, the synced batches node reports are written with), starts the
//! real `origin serve --console 127.0.0.1:0`, adds an admin with `origin admin add`, logs in,
//! and times each page from sending the request to the last byte of the answer, on loopback,
//! `STAGECOACH_CONSOLE_REQUESTS` times (default 50): the nodes page (first page, and a search),
//! its JSON twin, the sites page, the overview, and the rollout page and its JSON twin for a
//! rollout of an OS bundle to all 10,000 nodes (100 sites, so 100 canary waves and 100 site
//! rows). The nodes report no daemon address, so the first canary fails at once and the
//! rollout halts without sending a packet; the page still shows every site and wave. Prints the
//! median and p95 of each.
//!
//! Run (the binaries must be built first; the harness starts them from `target/release`):
//!
//! ```text
//! cargo build --release --workspace --all-targets --features origin/test-hooks,stager/test-hooks,edge-agent/test-hooks
//! cargo bench --workspace --features origin/test-hooks,stager/test-hooks,edge-agent/test-hooks --bench console_load
//! ```

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hyper::StatusCode;
use netsim::http;
use origin::db::{Db, NodeRecord, NodeState, Put};
use proto::wire::{NodeBundle, ReportEvent};

const SITES: usize = 100;
const NODES_PER_SITE: usize = 100;
/// Node records per synced batch while filling.
const FILL_BATCH: usize = 500;
const ADMIN: &str = "bench";
const ADMIN_PASSWORD: &str = "bench-password-long-enough";

struct Serve(Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn node(site: usize, index: usize) -> NodeRecord {
    let site_name = format!("site-{site:03}");
    let version = format!("1.{}.0", (site + index) % 4);
    let inventory = proto::inventory::Inventory {
        role: Some("edge".into()),
        class: Some(format!("class-{}", index % 5)),
        site: Some(site_name.clone()),
        cpu_count: Some(8),
        memory_bytes: Some(16 << 30),
        ..Default::default()
    };
    let bundle = NodeBundle {
        name: "web".into(),
        version,
        id: proto::BundleId::from_bytes([(site % 251) as u8; 32]),
    };
    NodeRecord {
        id: format!("{:064x}", site * NODES_PER_SITE + index),
        site: site_name,
        inventory,
        installed: vec![bundle.clone()],
        held: vec![bundle.clone()],
        desired: vec![bundle],
        state: NodeState::InSync,
        state_detail: String::new(),
        // No daemon address: a rollout cannot reach these made-up nodes, and tries nothing.
        data_addr: String::new(),
        first_seen_ms: 1_700_000_000_000,
        last_seen_ms: 1_700_000_100_000,
        last_event: ReportEvent::Started,
        reports: 3,
    }
}

fn fill(db_dir: &Path) -> Result<()> {
    let db = Db::open(db_dir)?;
    let mut puts = Vec::with_capacity(FILL_BATCH);
    for site in 0..SITES {
        for index in 0..NODES_PER_SITE {
            puts.push(Put::Node(Box::new(node(site, index))));
            if puts.len() == FILL_BATCH {
                db.commit(&puts, None)?;
                puts.clear();
            }
        }
    }
    if !puts.is_empty() {
        db.commit(&puts, None)?;
    }
    Ok(())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let requests: usize = std::env::var("STAGECOACH_CONSOLE_REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let bins = netsim::procs::Binaries::beside_current_exe()?;
    let origin = bins.path("origin");
    let work = tempfile::tempdir()?;
    let dir = work.path().join("origin");
    let dir_arg = dir.display().to_string();
    let init = Command::new(&origin)
        .args(["init", "--dir", &dir_arg])
        .output()?;
    if !init.status.success() {
        bail!("origin init: {init:?}");
    }
    let started = Instant::now();
    fill(&origin::home::OriginHome::new(&dir).db_dir())?;
    println!(
        "filled {} nodes in {SITES} sites in {:.1} s",
        SITES * NODES_PER_SITE,
        started.elapsed().as_secs_f64()
    );

    let ready = work.path().join("ready.json");
    let _serve = Serve(
        Command::new(&origin)
            .args(["serve", "--dir", &dir_arg, "--listen", "127.0.0.1:0"])
            .args([
                "--enroll-listen",
                "127.0.0.1:0",
                "--metrics-listen",
                "127.0.0.1:0",
            ])
            .args(["--console", "127.0.0.1:0", "--ready-file"])
            .arg(&ready)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start origin serve")?,
    );
    let console = stagecoach_wait(&ready)?;
    let mut add = Command::new(&origin)
        .args([
            "admin",
            "add",
            ADMIN,
            "--role",
            "admin",
            "--password-stdin",
            "--dir",
            &dir_arg,
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()?;
    {
        use std::io::Write as _;
        add.stdin
            .take()
            .context("stdin")?
            .write_all(format!("{ADMIN_PASSWORD}\n").as_bytes())?;
    }
    if !add.wait()?.success() {
        bail!("origin admin add failed");
    }
    let cookie = netsim::console::log_in(&console, ADMIN, ADMIN_PASSWORD)
        .await?
        .cookie;

    let rollout = start_rollout(&origin, &dir_arg, work.path())?;
    let bundles = http::get(&console, "/api/bundles", &[("cookie", cookie.as_str())]).await?;
    let bundles: serde_json::Value = serde_json::from_str(&bundles.body)?;
    let id = bundles["bundles"]
        .as_array()
        .and_then(|b| b.iter().find(|b| b["name"] == "os" && b["version"] == "2"))
        .and_then(|b| b["id"].as_str())
        .context("the rolled-out bundle's id")?
        .to_owned();
    // The first lines say what started; the rest is one line per node.
    for line in rollout.lines().take(3) {
        println!("rollout start: {line}");
    }
    let rollout_page = format!("/rollouts/{id}");
    let rollout_api = format!("/api/rollouts/{id}");

    println!("console page load, {requests} requests each, request to last byte on loopback:");
    println!("| page | median | p95 | bytes |");
    println!("|---|---|---|---|");
    for path in [
        "/nodes",
        "/nodes?q=site-042",
        "/nodes?site=site-077&class=class-3",
        "/api/nodes",
        "/sites",
        "/",
        &rollout_page,
        &rollout_api,
    ] {
        let mut times = Vec::with_capacity(requests);
        let mut bytes = 0;
        for _ in 0..requests {
            let start = Instant::now();
            let answer = http::get(&console, path, &[("cookie", cookie.as_str())]).await?;
            times.push(start.elapsed());
            if answer.status != StatusCode::OK {
                bail!("{path}: {} {}", answer.status, answer.body);
            }
            bytes = answer.body.len();
        }
        times.sort();
        let shown = path.replace(&id, "{id}");
        println!(
            "| `{shown}` | {:.1} ms | {:.1} ms | {bytes} |",
            percentile(&times, 0.5).as_secs_f64() * 1e3,
            percentile(&times, 0.95).as_secs_f64() * 1e3,
        );
    }
    Ok(())
}

/// Publishes a small OS bundle and a rescue OS and starts `origin rollout start os@2 --to
/// all`; returns the command's output.
fn start_rollout(origin: &Path, dir_arg: &str, work: &Path) -> Result<String> {
    let cli = |args: &[&str]| -> Result<String> {
        let out = Command::new(origin)
            .args(args)
            .args(["--dir", dir_arg])
            .output()?;
        if !out.status.success() {
            bail!(
                "origin {}: {}{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    for (name, version, kind, seed) in
        [("os", "2", "os-image", 2), ("rescue-os", "1", "base-os", 1)]
    {
        let tree = work.join(name);
        netsim::datagen::generate_tree(&tree, 64 * 1024, seed)?;
        let tree = tree.display().to_string();
        cli(&[
            "publish",
            &tree,
            "--name",
            name,
            "--version",
            version,
            "--kind",
            kind,
            "--no-progress",
        ])?;
    }
    cli(&[
        "rollout",
        "start",
        "os@2",
        "--to",
        "all",
        "--rescue",
        "rescue-os@1",
    ])
}

/// Waits for `origin serve`'s ready file to name the console; returns its address.
fn stagecoach_wait(ready: &Path) -> Result<String> {
    let mut console = None;
    stagecoach_testing::wait_until(Duration::from_secs(60), Duration::from_millis(50), || {
        console = std::fs::read(ready)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| v["console"].as_str().map(str::to_owned));
        console.is_some()
    })
    .context("origin serve did not write its ready file")?;
    console.context("no console address")
}
