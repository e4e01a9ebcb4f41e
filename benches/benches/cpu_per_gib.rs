//! CPU per GiB delivered, verified and stored at the edges (issue 19), beside a baseline
//! measured in the same run.
//!
//! - **mesh**: `netsim demo --json` (the built binary, its built-in topology: two sites of a
//!   stager and four edges, 1 Gbit/s WAN per site), whose result carries the CPU seconds,
//!   user and system, of the origin, the stagers, the edge daemons and the fetch commands from
//!   the moment the bundle was published until the last edge held it ([`netsim::cpu`]).
//! - **baseline**: plain quinn streams carrying the same bytes (the bundle's stored size, once
//!   per edge) from one sender to as many receivers, each hashing what it reads with BLAKE3 and
//!   writing it to a file (fsynced at the end), all in this process on two worker threads, with
//!   the mesh's TLS and transport settings. Its CPU is this process's, over the transfer.
//!
//! ```text
//! cargo build --release --workspace --all-targets
//! cargo bench -p benches --bench cpu_per_gib
//! ```
//!
//! `STAGECOACH_CPU_MIB` sets the demo's tree size (default 256), `STAGECOACH_CPU_ROUNDS` the
//! number of rounds (default 2; the table shows each and the median).

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use netsim::procs::Binaries;
use proto::net::{
    accept, client_endpoint, connect, send_request, CertAuthority, NodeIdentity, Role, Site,
};
use proto::wire::Request;
use rand::RngCore;
use serde_json::Value;

const DEFAULT_MIB: u64 = 256;
const DEFAULT_ROUNDS: usize = 2;
/// Slice the baseline's sender hands to quinn at a time.
const WRITE_BYTES: usize = 1024 * 1024;
const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One round's figures.
struct Round {
    /// Mesh CPU seconds per GiB delivered.
    mesh: f64,
    /// Baseline CPU seconds per GiB delivered.
    baseline: f64,
    /// The demo's time until every edge held the bundle, over its WAN floor.
    floor_ratio: f64,
    /// The demo's CPU split, for the table.
    split: String,
}

fn main() -> Result<()> {
    let mib: u64 = env_or("STAGECOACH_CPU_MIB", DEFAULT_MIB);
    let rounds: usize = env_or("STAGECOACH_CPU_ROUNDS", DEFAULT_ROUNDS).max(1);
    let bins = Binaries::beside_current_exe()
        .context("build the binaries first: cargo build --release --workspace --all-targets")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    let mut results = Vec::new();
    for round in 1..=rounds {
        let work = tempfile::tempdir().context("cannot create a work directory")?;
        eprintln!("cpu_per_gib round {round}/{rounds}: netsim demo --bundle-mib {mib}…");
        let demo = run_demo(&bins, mib, work.path())?;
        let cpu = &demo["cpu"];
        let number = |value: &Value, field: &str| -> Result<f64> {
            value[field]
                .as_f64()
                .with_context(|| format!("no `{field}` in the demo's result: {value}"))
        };
        let delivered = number(cpu, "delivered_bytes")? as u64;
        let bundle = number(&demo, "bundle_bytes")? as u64;
        if bundle == 0 || !delivered.is_multiple_of(bundle) {
            bail!("delivered {delivered} B is not a whole number of {bundle} B bundles");
        }
        let receivers = (delivered / bundle) as usize;
        eprintln!("cpu_per_gib round {round}/{rounds}: baseline, {receivers} receivers…");
        let baseline_s = runtime.block_on(baseline(bundle, receivers, work.path()))?;
        let split = format!(
            "origin {:.1} + stagers {:.1} + edge daemons {:.1} + fetch commands {:.1} s (relays and netsim {:.1} s more)",
            number(cpu, "origin_s")?,
            number(cpu, "stagers_s")?,
            number(cpu, "edge_daemons_s")?,
            number(cpu, "fetch_commands_s")?,
            number(cpu, "netsim_s")?,
        );
        results.push(Round {
            mesh: number(cpu, "mesh_s_per_gib")?,
            baseline: baseline_s / (delivered as f64 / GIB),
            floor_ratio: number(&demo, "all_edges_done_s")? / number(&demo, "wan_floor_s")?,
            split,
        });
    }
    println!(
        "\n| round | mesh CPU-s per GiB at the edges | plain quinn + BLAKE3 + file, CPU-s per GiB | ratio | all edges done / WAN floor | mesh CPU split |"
    );
    println!("|---|---|---|---|---|---|");
    for (i, r) in results.iter().enumerate() {
        println!(
            "| {} | {:.2} | {:.2} | {:.2}× | {:.1}× | {} |",
            i + 1,
            r.mesh,
            r.baseline,
            r.mesh / r.baseline,
            r.floor_ratio,
            r.split
        );
    }
    let median = |f: &dyn Fn(&Round) -> f64| {
        let mut v: Vec<f64> = results.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        let mid = v.len() / 2;
        if v.len().is_multiple_of(2) {
            (v[mid - 1] + v[mid]) / 2.0
        } else {
            v[mid]
        }
    };
    println!(
        "| median | {:.2} | {:.2} | {:.2}× | {:.1}× | |",
        median(&|r| r.mesh),
        median(&|r| r.baseline),
        median(&|r| r.mesh / r.baseline),
        median(&|r| r.floor_ratio)
    );
    Ok(())
}

/// Runs `netsim demo --json --bundle-mib MIB` in `work` and returns its result.
fn run_demo(bins: &Binaries, mib: u64, work: &Path) -> Result<Value> {
    let output = std::process::Command::new(bins.path("netsim"))
        .args(["demo", "--json", "--bundle-mib", &mib.to_string()])
        .arg("--work-dir")
        .arg(work.join("demo"))
        .stdin(std::process::Stdio::null())
        .output()
        .context("cannot run netsim demo")?;
    if !output.status.success() {
        bail!(
            "netsim demo failed with {}:\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    serde_json::from_slice(&output.stdout).context("netsim demo printed no JSON")
}

/// Sends `bytes` random bytes to each of `receivers` clients over plain quinn streams; each
/// hashes them with BLAKE3 and writes them to a file under `work`. Returns the CPU seconds this
/// process spent from the first byte sent to the last file synced.
async fn baseline(bytes: u64, receivers: usize, work: &Path) -> Result<f64> {
    proto::net::install_crypto_provider();
    let mut data = vec![0u8; usize::try_from(bytes)?];
    rand::thread_rng().fill_bytes(&mut data);
    let data = Bytes::from(data);
    let ca = CertAuthority::generate()?;
    let publisher = proto::manifest::generate_signing_key().verifying_key();
    let identity = |role, name: &str| -> Result<NodeIdentity> {
        Ok(ca.node_identity(role, &Site::new("bench")?, publisher, format!("{name}:1"))?)
    };
    let server =
        proto::net::server_endpoint("127.0.0.1:0".parse()?, &identity(Role::Stager, "sender")?)?;
    let addr = server.local_addr()?;
    let sender = tokio::spawn(send_to_all(server.clone(), data));
    let mut clients = Vec::new();
    for i in 0..receivers {
        let endpoint = client_endpoint(&identity(Role::Edge, &format!("edge{i}"))?)?;
        let conn = connect(&endpoint, addr).await?;
        clients.push((endpoint, conn));
    }
    let dir = tempfile::tempdir_in(work)?;
    let started_cpu = netsim::cpu::own();
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (i, (_endpoint, conn)) in clients.iter().enumerate() {
        let conn = conn.clone();
        let path = dir.path().join(format!("edge{i}"));
        tasks.spawn(async move { receive(&conn, &path).await });
    }
    while let Some(done) = tasks.join_next().await {
        let (received, _hash) = done.context("a receiver panicked")??;
        if received != bytes {
            bail!("a receiver got {received} B of {bytes}");
        }
    }
    let cpu = netsim::cpu::own().saturating_sub(started_cpu);
    eprintln!(
        "baseline: {receivers} × {:.1} MiB in {:.2} s, {:.2} CPU-s",
        bytes as f64 / (1024.0 * 1024.0),
        started.elapsed().as_secs_f64(),
        cpu.as_secs_f64()
    );
    server.close(0u32.into(), b"done");
    sender.abort();
    Ok(cpu.as_secs_f64())
}

/// Answers every stream of every connection with all of `data`, from memory.
async fn send_to_all(endpoint: quinn::Endpoint, data: Bytes) {
    while let Some(incoming) = endpoint.accept().await {
        let data = data.clone();
        tokio::spawn(async move {
            let Ok((conn, _peer)) = accept(incoming).await else {
                return;
            };
            while let Ok((mut send, _recv)) = conn.accept_bi().await {
                let data = data.clone();
                tokio::spawn(async move {
                    let mut offset = 0;
                    while offset < data.len() {
                        let end = (offset + WRITE_BYTES).min(data.len());
                        if send.write_chunk(data.slice(offset..end)).await.is_err() {
                            return;
                        }
                        offset = end;
                    }
                    let _ = send.finish();
                    let _ = send.stopped().await;
                });
            }
        });
    }
}

/// Asks for the bytes, hashes them with BLAKE3 and writes them to `path` as they arrive,
/// fsyncing at the end; returns the count and the hash.
async fn receive(conn: &quinn::Connection, path: &Path) -> Result<(u64, blake3::Hash)> {
    let mut file = std::fs::File::create(path)?;
    let mut hasher = blake3::Hasher::new();
    let mut recv = send_request(conn, &Request::ListBundles).await?;
    let mut received = 0u64;
    while let Some(chunk) = recv.read_chunk(usize::MAX, true).await? {
        received += chunk.bytes.len() as u64;
        tokio::task::block_in_place(|| -> std::io::Result<()> {
            hasher.update(&chunk.bytes);
            file.write_all(&chunk.bytes)
        })?;
    }
    tokio::task::block_in_place(|| file.sync_all())?;
    Ok((received, hasher.finalize()))
}
