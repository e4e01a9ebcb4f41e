//! A swap the origin asked for over the mesh ([`proto::wire::Request::StartSwap`]).
//!
//! The daemon has already fetched both bundles (verified, group by group) into the edge's store.
//! Here it copies them into the machine's own store (checking every chunk again), then runs the
//! swap procedure exactly as `edge-agent swap` does at a console: for a simulated machine, the
//! daemon acts as the machine's firmware and supervisor ([`run_sim_machine`]), starting the
//! agent "booted" from the slot the boot loader chose until the procedure settles, and reads the
//! journal for the outcome. Nothing here trusts the request beyond its bundle ids: the bundles
//! must be signed by the mesh's publisher, and the swap verifies them again before it touches a
//! slot.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use ed25519_dalek::VerifyingKey;
use proto::store::Store;
use proto::BundleId;

use crate::swap::bundles::stage_bundle;
use crate::swap::machine::Step;
use crate::swap::sim::{
    self, run_sim_machine, BootExit, NoHooks, SimMachineConfig, SimPlatform, DEFAULT_MAX_BOOTS,
};
use crate::swap::store::open_store;
use crate::swap::{status, Slot};

/// Pin tag of bundles delivered to the machine's store for a remote swap.
pub const DELIVERED_TAG: &str = "remote-swap";

/// How the daemon swaps this machine when the origin asks.
#[derive(Clone, Debug)]
pub struct RemoteSwapConfig {
    /// Root of the simulated machine (made by `edge-agent sim-provision`).
    pub machine_root: PathBuf,
    /// Health checks (`network-up`, `reach-stager=HOST:PORT`, `command=...`); empty means the
    /// defaults: network up and the first stager reachable.
    pub health_checks: Vec<String>,
    /// Trial boots of the new OS before the rescue takes over.
    pub boot_attempts: u8,
    /// The `edge-agent` executable the supervisor boots.
    pub agent: PathBuf,
}

/// How a remote swap ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteSwapEnd {
    /// The journal's final step (`done`, `rolled-back`, `aborted`).
    pub outcome: String,
    /// Why, when the machine did not end on the new OS.
    pub failure: Option<String>,
    /// Boots the machine took.
    pub boots: u32,
}

/// Checks that `root` is a provisioned simulated machine, so a misconfigured daemon says so at
/// start rather than when the origin asks.
pub fn check_machine(root: &Path) -> Result<()> {
    if !sim::grubenv_path(root).is_file() {
        bail!(
            "{} is not a simulated machine (no {}): create it with `edge-agent sim-provision`",
            root.display(),
            sim::grubenv_path(root).display()
        );
    }
    Ok(())
}

/// Delivers `rescue` and `target` from the edge's `store` into the machine's store, then runs
/// the swap to its end; `keys` (the edge's content keys) go into the machine's storage area first.
/// Blocking: run it on a blocking thread.
pub fn run(
    config: &RemoteSwapConfig,
    store: &Store,
    publisher: &VerifyingKey,
    keys: &proto::keys::KeyRing,
    stager: Option<std::net::SocketAddr>,
    target: BundleId,
    rescue: BundleId,
) -> Result<RemoteSwapEnd> {
    check_machine(&config.machine_root)?;
    let trusted = [*publisher];
    // The edge's content keys go into the machine's storage area with the bundles, so the
    // swap can open an encrypted OS (the ring file is replaced as a whole).
    if !keys.is_empty() {
        let path = sim::storage_dir(&config.machine_root).join(proto::keyring::KEYRING_FILE);
        proto::keyring::save(&path, keys)
            .context("cannot give the machine this edge's content keys")?;
    }
    {
        let machine_store_dir = sim::store_dir(&config.machine_root);
        let machine_store = open_store(&machine_store_dir).with_context(|| {
            format!(
                "cannot open the machine's store {}",
                machine_store_dir.display()
            )
        })?;
        for (what, id) in [("rescue", rescue), ("target", target)] {
            stage_bundle(
                store,
                &machine_store,
                &id,
                &trusted,
                DELIVERED_TAG,
                &mut || {},
            )
            .with_context(|| format!("cannot deliver the {what} bundle {id} to the machine"))?;
        }
        // The machine's store closes here: the agent the supervisor boots opens it.
    }
    let mut first_args: Vec<OsString> = vec![
        "swap".into(),
        "--target".into(),
        target.to_string().into(),
        "--rescue".into(),
        rescue.to_string().into(),
        "--trust".into(),
        hex::encode(publisher.as_bytes()).into(),
        "--boot-attempts".into(),
        config.boot_attempts.to_string().into(),
    ];
    if config.health_checks.is_empty() {
        let Some(stager) = stager else {
            bail!("the default health checks need a stager: start the daemon with --stager, or give --swap-health-check");
        };
        first_args.extend(["--stager".into(), stager.to_string().into()]);
    } else {
        for check in &config.health_checks {
            first_args.extend(["--health-check".into(), check.into()]);
        }
    }
    let supervisor = SimMachineConfig {
        agent: config.agent.clone(),
        root: config.machine_root.clone(),
        first_args,
        max_boots: DEFAULT_MAX_BOOTS,
    };
    tracing::info!(%target, %rescue, root = %config.machine_root.display(), "swap starting");
    let boots = run_sim_machine(&supervisor, &mut NoHooks).with_context(|| {
        format!(
            "the simulated machine {} failed",
            config.machine_root.display()
        )
    })?;
    let last = boots.last().map(|b| b.exit);
    let booted = sim::recorded_booted_slot(&config.machine_root)
        .ok()
        .flatten()
        .unwrap_or(Slot::A);
    let mut platform = SimPlatform::open(&config.machine_root, booted)
        .context("cannot open the machine after the swap")?;
    let report = status::collect(&mut platform);
    let swap = report
        .swap
        .map_err(anyhow::Error::msg)
        .context("cannot read the swap journal")?;
    let Some(swap) = swap else {
        bail!("the swap left no journal (agent exit: {last:?})");
    };
    if !swap.finished {
        bail!(
            "the swap stopped at step {} (agent exit: {last:?})",
            swap.step
        );
    }
    if let Some(BootExit::Killed(signal)) = last {
        bail!("the agent was killed by signal {signal}");
    }
    let failure = (swap.step != Step::Done.name()).then(|| {
        swap.failure
            .clone()
            .unwrap_or_else(|| "no reason recorded".into())
    });
    Ok(RemoteSwapEnd {
        outcome: swap.step.to_owned(),
        failure,
        boots: boots.len() as u32,
    })
}
