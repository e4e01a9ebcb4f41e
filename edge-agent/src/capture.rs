//! Capturing an image when the origin has none for this node (brief 004).
//!
//! The origin answers a negotiation with `NoImageCapture` when no rule matches the node and its
//! class may capture. The edge then empties its spare slot (the one not booted: on a real
//! machine a fresh ext4 filesystem on the slot's partition, mounted for the script), runs the
//! operator's install script with that slot's directory as its argument (bounded by a timeout,
//! its output logged), packs the slot as an `os-image` bundle whose selectors and metadata carry
//! the node's inventory facts, and publishes it with a publisher identity it was given
//! explicitly (`--publisher-dir`, a copy of `ORIGIN_HOME/publisher`): an edge certificate alone
//! may not upload. The origin then adds a rule mapping the node's model (else manufacturer,
//! else class) to the captured bundle, so the next node with the same facts gets it.
//!
//! A captured image never carries a slot's completion marker: a script that copies the running
//! OS copies its marker too, and a bundle holding one would mark a slot complete as soon as
//! that file was unpacked, before the rest. The capture removes it before packing.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use proto::inventory::Inventory;
use proto::manifest::Selector;
use proto::net::NodeIdentity;
use proto::pack::PackOptions;
use proto::publish::Publisher;
use proto::wire::BundleInfo;
use proto::BundleKind;
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::state::NodeConfig;
use crate::swap::platform::SLOT_MARKER_FILE;
use crate::swap::sim::recorded_booted_slot;
use crate::swap::{MachineSpec, Platform, Slot};

/// How long an install script may run by default.
pub const DEFAULT_SCRIPT_TIMEOUT: Duration = Duration::from_secs(1800);

/// Lines of a script's output kept for an error message.
const OUTPUT_TAIL_LINES: usize = 20;

/// Metadata keys of a captured image (the origin's `policy::capture_keys` reads the first four).
pub mod keys {
    /// The capturing node's id; marks a captured image.
    pub const NODE: &str = "capture.node";
    /// DMI model.
    pub const MODEL: &str = "capture.model";
    /// DMI manufacturer.
    pub const MANUFACTURER: &str = "capture.manufacturer";
    /// Configured class.
    pub const CLASS: &str = "capture.class";
    /// Configured role.
    pub const ROLE: &str = "capture.role";
    /// The node's site.
    pub const SITE: &str = "capture.site";
    /// CPU model.
    pub const CPU_MODEL: &str = "capture.cpu-model";
    /// Logical CPUs.
    pub const CPU_COUNT: &str = "capture.cpu-count";
    /// Memory in bytes.
    pub const MEMORY_BYTES: &str = "capture.memory-bytes";
    /// When (seconds since the Unix epoch).
    pub const AT: &str = "capture.at";
    /// The install script that built it.
    pub const SCRIPT: &str = "capture.script";
}

/// What a capture needs.
#[derive(Clone, Debug)]
pub struct CaptureOptions {
    /// The machine whose spare slot receives the install.
    pub machine: MachineSpec,
    /// The install script; run with the spare slot's directory as its one argument.
    pub script: PathBuf,
    /// A publisher directory (identity files and `manifest-signing.key`).
    pub publisher_dir: PathBuf,
    /// Bundle name (the origin's `[capture] name`).
    pub name: String,
    /// Bundle version (default: the time and the node id).
    pub version: Option<String>,
    /// How long the script may run.
    pub timeout: Duration,
}

/// How a node captures, as configured on its command line (`--capture-script` and friends);
/// the bundle name comes from the origin's answer.
#[derive(Clone, Debug)]
pub struct CaptureSetup {
    /// The machine whose spare slot receives the install.
    pub machine: MachineSpec,
    /// The install script.
    pub script: PathBuf,
    /// A publisher directory.
    pub publisher_dir: PathBuf,
    /// How long the script may run.
    pub timeout: Duration,
}

impl CaptureSetup {
    /// The options of a capture published as `name`.
    pub fn options(&self, name: &str) -> CaptureOptions {
        CaptureOptions {
            machine: self.machine.clone(),
            script: self.script.clone(),
            publisher_dir: self.publisher_dir.clone(),
            name: name.to_owned(),
            version: None,
            timeout: self.timeout,
        }
    }
}

/// What a capture did.
#[derive(Clone, Debug)]
pub struct Captured {
    /// The slot the script installed into.
    pub slot: Slot,
    /// The published bundle.
    pub info: BundleInfo,
}

/// Opens `machine` for a capture: a simulated machine that recorded no boot runs from A; a
/// real one from the slot its kernel command line names.
fn open_machine(machine: &MachineSpec) -> Result<Box<dyn Platform>> {
    let booted = match machine {
        MachineSpec::Sim { root } => Some(
            recorded_booted_slot(root)
                .with_context(|| format!("cannot read the booted slot of {}", root.display()))?
                .unwrap_or(Slot::A),
        ),
        MachineSpec::Linux { .. } => None,
    };
    machine
        .open(booted)
        .context("cannot open the machine to capture")
}

/// The slot not booted: the one a capture installs into.
fn spare_of(booted: Slot) -> Slot {
    match booted {
        Slot::A => Slot::B,
        Slot::B => Slot::A,
    }
}

/// The selectors and metadata of a captured image: the node's inventory facts.
pub fn capture_facts(
    node_id: &str,
    inventory: &Inventory,
    script: &Path,
    at_s: u64,
) -> (Vec<Selector>, BTreeMap<String, String>) {
    let mut metadata = BTreeMap::new();
    metadata.insert(keys::NODE.to_owned(), node_id.to_owned());
    metadata.insert(keys::AT.to_owned(), at_s.to_string());
    metadata.insert(keys::SCRIPT.to_owned(), script.display().to_string());
    let mut selectors = Vec::new();
    let facts = [
        ("model", keys::MODEL, &inventory.model),
        ("manufacturer", keys::MANUFACTURER, &inventory.manufacturer),
        ("class", keys::CLASS, &inventory.class),
        ("role", keys::ROLE, &inventory.role),
        ("site", keys::SITE, &inventory.site),
        ("cpu-model", keys::CPU_MODEL, &inventory.cpu_model),
    ];
    for (selector, key, value) in facts {
        if let Some(value) = value.as_ref().filter(|v| !v.is_empty()) {
            metadata.insert(key.to_owned(), value.clone());
            if matches!(selector, "model" | "manufacturer" | "class") {
                selectors.push(Selector {
                    key: selector.to_owned(),
                    value: value.clone(),
                });
            }
        }
    }
    if let Some(count) = inventory.cpu_count {
        metadata.insert(keys::CPU_COUNT.to_owned(), count.to_string());
    }
    if let Some(bytes) = inventory.memory_bytes {
        metadata.insert(keys::MEMORY_BYTES.to_owned(), bytes.to_string());
    }
    (selectors, metadata)
}

/// Runs `script` with `slot_dir` as its argument, logging its output; fails past `timeout` or
/// on a non-zero exit, with the end of its output.
pub async fn run_script(script: &Path, slot_dir: &Path, timeout: Duration) -> Result<()> {
    tracing::info!(script = %script.display(), slot = %slot_dir.display(), timeout_s = timeout.as_secs(), "running the install script into the spare slot");
    let mut child = tokio::process::Command::new(script)
        .arg(slot_dir)
        .env("STAGECOACH_SLOT_DIR", slot_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot run the install script {}", script.display()))?;
    let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
        bail!("the install script's output cannot be read");
    };
    let log = |stream: &'static str, reader: Box<dyn tokio::io::AsyncRead + Send + Unpin>| {
        tokio::spawn(async move {
            let mut lines = BufReader::new(reader).lines();
            let mut tail = std::collections::VecDeque::new();
            while let Ok(Some(line)) = lines.next_line().await {
                tracing::info!(stream, "install script: {line}");
                if tail.len() == OUTPUT_TAIL_LINES {
                    tail.pop_front();
                }
                tail.push_back(line);
            }
            tail.into_iter().collect::<Vec<_>>()
        })
    };
    let out = log("stdout", Box::new(stdout));
    let err = log("stderr", Box::new(stderr));
    let status = match tokio::time::timeout(timeout, child.wait()).await {
        Ok(status) => status.context("waiting for the install script")?,
        Err(_) => {
            let _ = child.kill().await;
            bail!(
                "the install script {} ran longer than {} s and was killed",
                script.display(),
                timeout.as_secs()
            );
        }
    };
    let _ = out.await;
    let tail = err.await.unwrap_or_default();
    if !status.success() {
        bail!(
            "the install script {} failed ({status}){}",
            script.display(),
            if tail.is_empty() {
                String::new()
            } else {
                format!(": {}", tail.join(" | "))
            }
        );
    }
    tracing::info!(script = %script.display(), "install script done");
    Ok(())
}

/// Captures: checks the publisher rights, empties the spare slot, runs the script into it,
/// packs it with the node's facts and publishes it on the origin. `identity` is this edge's
/// (its node id, site and the origin's address); `inventory_of` gives its facts.
pub async fn capture(
    identity: &NodeIdentity,
    config: &NodeConfig,
    options: &CaptureOptions,
) -> Result<Captured> {
    // Before anything is touched: without publisher rights the result could not be uploaded.
    let publisher = Publisher::load(&options.publisher_dir).with_context(|| {
        format!(
            "capturing needs publisher rights: give --publisher-dir a copy of ORIGIN_HOME/publisher ({} is not one)",
            options.publisher_dir.display()
        )
    })?;
    let origin: SocketAddr = identity.origin_addr().parse().with_context(|| {
        format!(
            "this edge's identity names the origin as {:?}, not an address",
            identity.origin_addr()
        )
    })?;
    // The platform keeps the spare slot mounted (on a real machine) until it is dropped, after
    // the upload.
    let mut platform = open_machine(&options.machine)?;
    let spare = spare_of(platform.booted_slot());
    platform
        .wipe_slot(spare)
        .with_context(|| format!("cannot empty the spare slot {spare}"))?;
    let dir = platform
        .slot_root(spare)
        .with_context(|| format!("cannot reach the spare slot {spare}"))?;
    run_script(&options.script, &dir, options.timeout).await?;
    let marker = dir.join(SLOT_MARKER_FILE);
    if marker.exists() {
        tracing::info!(slot = %spare, "the install script left a slot marker (a copy of the running OS?); removed: a captured image carries none");
        std::fs::remove_file(&marker)
            .with_context(|| format!("cannot remove {}", marker.display()))?;
    }

    let inventory = crate::negotiate::collect_inventory(identity, config);
    let node_id = identity.node_id().to_string();
    let at_s = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let version = options
        .version
        .clone()
        .unwrap_or_else(|| format!("{at_s}.{}", node_id.chars().take(8).collect::<String>()));
    let (selectors, metadata) = capture_facts(&node_id, &inventory, &options.script, at_s);
    let mut pack = PackOptions::new(options.name.clone(), version, BundleKind::OsImage);
    pack.selectors = selectors;
    pack.metadata = metadata;
    tracing::info!(slot = %spare, name = %pack.name, version = %pack.version, %origin, "packing and publishing the captured slot");
    let info = proto::publish::publish_path(
        &publisher.identity,
        &publisher.key,
        origin,
        &dir,
        pack,
        |_| {},
        || {},
    )
    .await
    .context("cannot publish the captured image")?;
    tracing::info!(bundle = %info.id, name = %info.name, version = %info.version, "captured image published");
    drop(platform);
    Ok(Captured { slot: spare, info })
}
