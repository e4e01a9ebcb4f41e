//! `origin publish` and `origin bundles`: put a bundle into the running origin, list them.

use std::path::Path;

use anyhow::{bail, Result};
use origin::home::OriginHome;
use proto::manifest::{Dependency, Selector};
use proto::net::{client_endpoint, connect};
use proto::pack::PackOptions;
use proto::wire::ControlCommand;
use proto::BundleKind;

/// What `origin publish` packs and how.
pub struct PublishArgs<'a> {
    /// Directory tree or image file.
    pub path: &'a Path,
    /// Bundle name.
    pub name: String,
    /// Bundle version.
    pub version: String,
    /// The bundle's kind.
    pub kind: BundleKind,
    /// Compatibility selectors KEY=VALUE.
    pub selectors: Vec<(String, String)>,
    /// Dependencies NAME@VERSION.
    pub dependencies: Vec<(String, String)>,
    /// Encrypt with the newest content-key generation of the origin's key ring.
    pub encrypt: bool,
    /// How many origins must hold the bundle (`None`: every origin up).
    pub replicas: Option<usize>,
    /// How long to wait for them.
    pub replica_timeout: std::time::Duration,
    /// Show a progress bar.
    pub progress: bool,
}

/// `origin publish`: packs, uploads and publishes; prints the bundle.
pub async fn publish(home: &OriginHome, args: PublishArgs<'_>) -> Result<()> {
    let mut options = PackOptions::new(args.name, args.version, args.kind);
    options.selectors = args
        .selectors
        .into_iter()
        .map(|(key, value)| Selector { key, value })
        .collect();
    options.dependencies = args
        .dependencies
        .into_iter()
        .map(|(name, version)| Dependency { name, version })
        .collect();
    if args.encrypt {
        let ring = home.dir().join(proto::keyring::KEYRING_FILE);
        let (generation, key) = proto::publish::newest_content_key(&ring)?;
        eprintln!("encrypting with {generation}");
        options.encrypt = Some((generation, key));
    }
    let info = origin::publish::publish(home, args.path, options, args.progress).await?;
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
    wait_for_replicas(
        home,
        &info.id,
        args.replicas,
        args.replica_timeout,
        args.progress,
    )
    .await
}

/// Waits until `wanted` origins (every origin up when `None`) hold bundle `id`.
async fn wait_for_replicas(
    home: &OriginHome,
    id: &proto::manifest::BundleId,
    wanted: Option<usize>,
    timeout: std::time::Duration,
    progress: bool,
) -> Result<()> {
    if wanted == Some(1) {
        return Ok(());
    }
    let started = std::time::Instant::now();
    let spinner = if progress {
        indicatif::ProgressBar::new_spinner()
    } else {
        indicatif::ProgressBar::hidden()
    };
    spinner.enable_steady_tick(std::time::Duration::from_millis(200));
    loop {
        let reply = origin::admin::run(home, ControlCommand::BundleHolders { id: *id }).await?;
        anyhow::ensure!(
            reply.success,
            "cannot tell which origins hold it: {}",
            reply.text
        );
        let answer: serde_json::Value = serde_json::from_str(&reply.json)?;
        let count = |field: &str| answer[field].as_array().map_or(0, Vec::len);
        let (held, up) = (count("holders"), count("up"));
        let needed = wanted.unwrap_or(up).max(1);
        spinner.set_message(format!("held by {held} of {needed} origins"));
        if held >= needed {
            spinner.finish_and_clear();
            if needed > 1 {
                println!(
                    "held by {held} origins, verified ({:.1} s after the publish)",
                    started.elapsed().as_secs_f64()
                );
            }
            return Ok(());
        }
        if started.elapsed() >= timeout {
            spinner.finish_and_clear();
            bail!(
                "published, but held by {held} of the {needed} origins wanted after {:?}: the \
                 others pull it when they can (`origin status` shows the origins up)",
                timeout
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
}

/// `origin bundles`: the published bundles, oldest first; with `json`, as a JSON array.
pub async fn list(home: &OriginHome, json: bool) -> Result<()> {
    let identity = home.publisher_identity()?;
    let endpoint = client_endpoint(&identity)?;
    let conn = connect(&endpoint, home.mesh_addr()?).await?;
    let list = proto::transfer::fetch::list_bundles(&conn).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(());
    }
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
    Ok(())
}

/// Parses `KEY=VALUE` (for `--selector`).
pub fn parse_pair(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))
}

/// Parses `NAME@VERSION` (for `--depends`).
pub fn parse_dep(s: &str) -> Result<(String, String), String> {
    s.split_once('@')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("expected NAME@VERSION, got {s:?}"))
}
