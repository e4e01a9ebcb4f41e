//! Issue 14: the control-plane store on etcd against the embedded RocksDB, side by side in one
//! run: control operations per second while 10,000 nodes enroll and then report their
//! inventory, and the latency of recording a published package.
//!
//! Both stores are driven through the origin's own store API (`origin::db::Db::change`, the
//! read-modify-write every node report and every publish goes through, with its audit record
//! and, on etcd, its revision compare), from `STAGECOACH_STORE_BENCH_THREADS` threads (default
//! 4). On etcd, the threads are split between two connections: two origins sharing the
//! cluster, so their changes conflict and are retried as in production. The etcd cluster is a
//! real 3-member one of Debian's `etcd-server` on loopback (fsync on), started by the bench.
//!
//! ```text
//! cargo bench -p benches --bench control_store
//! STAGECOACH_STORE_BENCH_NODES=2000 cargo bench -p benches --bench control_store
//! ```

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use origin::db::{
    Audit, Commit, Db, DbError, NodeRecord, NodeState, PackageRecord, Put, StoreConfig,
};
use proto::wire::{NodeBundle, ReportEvent};
use stagecoach_testing::etcd::{self, EtcdCluster};

/// Published packages recorded, for the latency figures.
const PUBLISHES: usize = 50;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn node(index: usize) -> NodeRecord {
    let site = format!("site-{:03}", index % 100);
    NodeRecord {
        id: format!("{index:064x}"),
        site: site.clone(),
        inventory: proto::inventory::Inventory {
            role: Some("edge".into()),
            class: Some(format!("class-{}", index % 5)),
            site: Some(site),
            cpu_count: Some(8),
            memory_bytes: Some(16 << 30),
            model: Some("PowerEdge R640".into()),
            ..Default::default()
        },
        installed: vec![NodeBundle {
            name: "web".into(),
            version: "1.0".into(),
            id: proto::BundleId::from_bytes([7; 32]),
        }],
        held: Vec::new(),
        desired: Vec::new(),
        state: NodeState::Reported,
        state_detail: String::new(),
        data_addr: String::new(),
        first_seen_ms: 1,
        last_seen_ms: 1,
        last_event: ReportEvent::Enrolled,
        reports: 0,
    }
}

/// What one store did.
struct Figures {
    enroll_per_s: f64,
    report_per_s: f64,
    publish_median_ms: f64,
    publish_p95_ms: f64,
    retries: u64,
}

/// Runs `ops` changes spread over `threads` threads, `dbs` handed out round-robin; returns the
/// changes per second and how many times a change ran again after a conflict.
fn run_ops(
    dbs: &[Db],
    threads: usize,
    ops: usize,
    op: impl Fn(&Db, usize, &AtomicU64) -> Result<(), DbError> + Sync,
) -> Result<(f64, u64)> {
    let next = AtomicU64::new(0);
    let retries = AtomicU64::new(0);
    let started = Instant::now();
    std::thread::scope(|scope| -> Result<()> {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let db = &dbs[t % dbs.len()];
                let (next, retries, op) = (&next, &retries, &op);
                scope.spawn(move || -> Result<(), DbError> {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                        if i >= ops {
                            return Ok(());
                        }
                        op(db, i, retries)?;
                    }
                })
            })
            .collect();
        for handle in handles {
            handle
                .join()
                .map_err(|_| anyhow::anyhow!("a bench thread panicked"))??;
        }
        Ok(())
    })?;
    let secs = started.elapsed().as_secs_f64();
    Ok((ops as f64 / secs, retries.load(Ordering::Relaxed)))
}

fn measure(dbs: &[Db], nodes: usize, threads: usize) -> Result<Figures> {
    // Enrollment: a new node record and its audit record each.
    let (enroll_per_s, enroll_retries) = run_ops(dbs, threads, nodes, |db, i, retries| {
        let mut runs = 0;
        db.change(|| {
            runs += 1;
            let existing = db.node(&node(i).id)?;
            let record = existing.unwrap_or_else(|| node(i));
            let audit = Audit::new(record.id.clone(), "edge", "node.enroll", "enrolled");
            Ok::<_, DbError>(Commit::new(
                vec![Put::Node(Box::new(record))],
                Some(audit),
                (),
            ))
        })?;
        retries.fetch_add(runs - 1, Ordering::Relaxed);
        Ok(())
    })?;
    // Reports: read the node, count the report, write it back (no audit: nothing it holds
    // changed, as in most reports).
    let (report_per_s, report_retries) = run_ops(dbs, threads, nodes, |db, i, retries| {
        let mut runs = 0;
        db.change(|| {
            runs += 1;
            let mut record = db.node(&node(i).id)?.unwrap_or_else(|| node(i));
            record.reports += 1;
            record.last_seen_ms += 1;
            record.last_event = ReportEvent::Started;
            Ok::<_, DbError>(Commit::new(vec![Put::Node(Box::new(record))], None, ()))
        })?;
        retries.fetch_add(runs - 1, Ordering::Relaxed);
        Ok(())
    })?;
    // Publishes, one at a time: the package table read, the record and its audit written.
    let mut latencies = Vec::with_capacity(PUBLISHES);
    for p in 0..PUBLISHES {
        let started = Instant::now();
        dbs[0].change(|| {
            let seq = dbs[0].packages()?.len() as u64 + 1;
            let record = PackageRecord {
                name: "os".into(),
                version: format!("1.{p}"),
                id: proto::BundleId::from_bytes([p as u8; 32]),
                kind: "os-image".into(),
                depends: Vec::new(),
                stored_bytes: 1 << 30,
                raw_bytes: 2 << 30,
                seq,
                published_ms: 1,
                encrypted: false,
                key_generation: None,
            };
            let audit = Audit::new("publisher", "publisher", "package.publish", &record.version);
            Ok::<_, DbError>(Commit::new(
                vec![Put::Package(Box::new(record))],
                Some(audit),
                (),
            ))
        })?;
        latencies.push(started.elapsed());
    }
    latencies.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    Ok(Figures {
        enroll_per_s,
        report_per_s,
        publish_median_ms: ms(latencies[latencies.len() / 2]),
        publish_p95_ms: ms(latencies[latencies.len() * 95 / 100]),
        retries: enroll_retries + report_retries,
    })
}

fn main() -> Result<()> {
    let nodes = env_usize("STAGECOACH_STORE_BENCH_NODES", 10_000);
    let threads = env_usize("STAGECOACH_STORE_BENCH_THREADS", 4).max(1);
    println!("control_store: {nodes} nodes enroll, then report; {PUBLISHES} publishes; {threads} threads");

    let dir = tempfile::tempdir()?;
    let rocks = Db::open(&dir.path().join("db")).context("open RocksDB")?;
    let rocks_figures = measure(std::slice::from_ref(&rocks), nodes, threads)?;
    drop(rocks);

    let etcd_figures = if let Err(why) = etcd::available() {
        println!("etcd: skipped: {why}");
        None
    } else {
        let cluster = EtcdCluster::start(3).context("start a 3-member etcd cluster")?;
        let config = StoreConfig::parse(&cluster.store_url("bench"), Path::new("/nonexistent"))?;
        // Two origins sharing the cluster.
        let dbs = [Db::open_store(&config)?, Db::open_store(&config)?];
        let figures = measure(&dbs, nodes, threads)?;
        let audit = dbs[0].audit(1)?;
        println!(
            "etcd: last audit #{} (expected {})",
            audit.last().map_or(0, |r| r.seq),
            nodes + PUBLISHES
        );
        Some(figures)
    };

    println!();
    println!(
        "{:<10} {:>12} {:>12} {:>16} {:>14} {:>9}",
        "store", "enroll/s", "report/s", "publish median", "publish p95", "retries"
    );
    let row = |name: &str, f: &Figures| {
        println!(
            "{name:<10} {:>12.0} {:>12.0} {:>13.1} ms {:>11.1} ms {:>9}",
            f.enroll_per_s, f.report_per_s, f.publish_median_ms, f.publish_p95_ms, f.retries
        );
    };
    row("rocksdb", &rocks_figures);
    if let Some(etcd) = &etcd_figures {
        row("etcd", etcd);
        println!(
            "etcd ÷ rocksdb: enroll {:.2}×, report {:.2}×, publish latency {:.2}×",
            etcd.enroll_per_s / rocks_figures.enroll_per_s,
            etcd.report_per_s / rocks_figures.report_per_s,
            etcd.publish_median_ms / rocks_figures.publish_median_ms
        );
    }
    Ok(())
}
