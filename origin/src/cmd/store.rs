//! `--store` (which control-plane store `origin serve` uses) and `origin store ...`: the
//! store's health, and copying a store into another (the embedded RocksDB into etcd, and back).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};

use origin::db::etcd::EtcdTls;
use origin::db::{Db, StoreConfig};
use origin::home::OriginHome;

/// Entries per etcd transaction when copying (etcd's default bound is 128 operations).
pub const COPY_BATCH: usize = 100;

/// How to reach etcd over TLS, for `--store etcd://...`.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct EtcdTlsArgs {
    /// The CA that issued the etcd members' certificates (PEM): talk TLS to etcd.
    #[arg(long, value_name = "FILE", env = "STAGECOACH_ETCD_CA")]
    pub etcd_ca: Option<PathBuf>,
    /// This origin's client certificate for etcd (PEM), for a cluster that asks for one.
    #[arg(long, value_name = "FILE", requires_all = ["etcd_ca", "etcd_key"], env = "STAGECOACH_ETCD_CERT")]
    pub etcd_cert: Option<PathBuf>,
    /// The private key of `--etcd-cert` (PEM).
    #[arg(
        long,
        value_name = "FILE",
        requires = "etcd_cert",
        env = "STAGECOACH_ETCD_KEY"
    )]
    pub etcd_key: Option<PathBuf>,
}

impl EtcdTlsArgs {
    /// The store `text` names (`rocksdb`, or `etcd://...` with these TLS files).
    pub fn store(&self, text: &str, home: &OriginHome) -> Result<StoreConfig> {
        let config = StoreConfig::parse(text, &home.db_dir())?;
        Ok(match (config, &self.etcd_ca) {
            (StoreConfig::Etcd(etcd), Some(ca)) => StoreConfig::Etcd(etcd.with_tls(EtcdTls {
                ca: ca.clone(),
                client: self.etcd_cert.clone().zip(self.etcd_key.clone()),
            })),
            (config, _) => config,
        })
    }
}

/// Opens the store, saying which.
fn open(config: &StoreConfig) -> Result<Db> {
    Db::open_store(config)
        .with_context(|| format!("cannot open the control-plane store ({config})"))
}

/// `origin store status`: the backend and its health (each etcd member's role and term).
pub fn status(config: &StoreConfig) -> Result<()> {
    let db = open(config)?;
    println!("store: {config}");
    for line in db.health()? {
        println!("  {line}");
    }
    let audit = db.audit(1)?;
    match audit.last() {
        Some(last) => println!("  last change: audit #{} ({})", last.seq, last.action),
        None => println!("  no change recorded yet"),
    }
    Ok(())
}

/// `origin store copy --from A --to B`: every record of A into B, which must be empty. The
/// origin must not run on A meanwhile (RocksDB refuses a second process anyway).
pub fn copy(from: &StoreConfig, to: &StoreConfig) -> Result<()> {
    if from == to {
        bail!("--from and --to name the same store ({from})");
    }
    let source = open(from)?;
    let tables = source.export()?;
    let total: usize = tables.iter().map(|(_, entries)| entries.len()).sum();
    drop(source);
    let target = open(to)?;
    let bar = ProgressBar::new(total as u64);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} records")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message(format!("copying into {to}"));
    let written = target
        .import(&tables, COPY_BATCH, |n| bar.set_position(n))
        .with_context(|| format!("cannot copy into {to}"))?;
    bar.finish_and_clear();
    let audit = target.audit(1)?;
    println!(
        "copied {written} records from {from} into {to}; the audit log goes on from #{}",
        audit.last().map_or(0, |r| r.seq)
    );
    for (table, entries) in &tables {
        println!("  {table:<10} {}", entries.len());
    }
    Ok(())
}
