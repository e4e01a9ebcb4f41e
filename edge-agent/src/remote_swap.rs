//! A swap the origin asked for over the mesh ([`proto::wire::Request::StartSwap`]).
//!
//! The daemon has already fetched both bundles (verified, group by group) into the edge's store.
//! Here it copies them into the machine's own store (checking every chunk again), then runs the
//! swap procedure exactly as `edge-agent swap` does at a console. On a simulated machine the
//! daemon acts as the machine's firmware and supervisor ([`run_sim_machine`]), starting the
//! agent "booted" from the slot the boot loader chose until the procedure settles, and reads the
//! journal for the outcome. On a real machine ([`MachineSpec::Linux`]) the daemon runs the
//! procedure itself up to its first reboot and answers [`SwapProgress::Rebooting`]; after each
//! boot `edge-agent resume` (started by the machine's init before the daemon) carries the
//! journal on, and the origin asks the daemon of the rebooted machine how it ended
//! ([`journal_answer`]). Nothing here trusts the request beyond its bundle ids: the bundles
//! must be signed by the mesh's publisher, and the swap verifies them again before it touches a
//! slot.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use ed25519_dalek::VerifyingKey;
use proto::store::Store;
use proto::BundleId;

use crate::swap::bundles::{stage_bundle, BundleStore};
use crate::swap::machine::Step;
use crate::swap::plan::DEFAULT_IDENTITY_PATHS;
use crate::swap::sim::{
    self, run_sim_machine, BootExit, NoHooks, SimMachineConfig, DEFAULT_MAX_BOOTS,
};
use crate::swap::{
    driver, open_machine_store, status, HealthCheck, MachineSpec, RunEnd, SwapContext, SwapPlan,
    SwapState,
};

/// Pin tag of bundles delivered to the machine's store for a remote swap.
pub const DELIVERED_TAG: &str = "remote-swap";

/// How the daemon swaps this machine when the origin asks.
#[derive(Clone, Debug)]
pub struct RemoteSwapConfig {
    /// The machine: a simulated one (made by `edge-agent sim-provision`) or this real one.
    pub machine: MachineSpec,
    /// Health checks (`network-up`, `reach-stager=HOST:PORT`, `command=...`); empty means the
    /// defaults: network up and one of the site's stagers reachable.
    pub health_checks: Vec<String>,
    /// Trial boots of the new OS before the rescue takes over.
    pub boot_attempts: u8,
    /// The `edge-agent` executable the supervisor of a simulated machine boots.
    pub agent: PathBuf,
}

/// Where a remote swap stands when [`run`] returns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SwapProgress {
    /// The procedure ended (a simulated machine always gets this far).
    Ended(RemoteSwapEnd),
    /// A real machine is rebooting at this journaled step; it carries on after the boot.
    Rebooting {
        /// The journal's step.
        step: String,
    },
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

/// Checks that the machine can be swapped (a provisioned simulated machine, or a real one whose
/// configuration, slot devices and kernel command line are usable), so a misconfigured daemon
/// says so at start rather than when the origin asks.
pub fn check_machine(machine: &MachineSpec) -> Result<()> {
    match machine {
        MachineSpec::Sim { root } => {
            if !sim::grubenv_path(root).is_file() {
                bail!(
                    "{} is not a simulated machine (no {}): create it with `edge-agent sim-provision`",
                    root.display(),
                    sim::grubenv_path(root).display()
                );
            }
            Ok(())
        }
        MachineSpec::Linux { config } => {
            machine.open(None).with_context(|| {
                format!("the machine of {} cannot be swapped", config.display())
            })?;
            Ok(())
        }
    }
}

/// Delivers `rescue` and `target` from the edge's `store` into the machine's store, then runs
/// the swap: to its end on a simulated machine, up to its first reboot on a real one. `keys`
/// (the edge's content keys) go into the machine's storage area first. Blocking: run it on a
/// blocking thread.
pub fn run(
    config: &RemoteSwapConfig,
    store: &Store,
    publisher: &VerifyingKey,
    keys: &proto::keys::KeyRing,
    stagers: &[std::net::SocketAddr],
    target: BundleId,
    rescue: BundleId,
) -> Result<SwapProgress> {
    // The daemon checked the machine at start (`check_machine`); opening it checks it again.
    let trusted = [*publisher];
    let mut platform = config
        .machine
        .open(None)
        .context("cannot open the machine")?;
    // The edge's content keys go into the machine's storage area with the bundles, so the
    // swap can open an encrypted OS (the ring file is replaced as a whole).
    if !keys.is_empty() {
        proto::keyring::save(&driver::machine_keyring_path(platform.as_ref()), keys)
            .context("cannot give the machine this edge's content keys")?;
    }
    let machine_store = open_machine_store(platform.as_ref())?;
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
    let health_checks = health_checks(config, stagers)?;
    match &config.machine {
        MachineSpec::Sim { root } => {
            // The machine's store closes here: the agent the supervisor boots opens it.
            drop(machine_store);
            drop(platform);
            run_sim(config, root, publisher, &health_checks, target, rescue)
                .map(SwapProgress::Ended)
        }
        MachineSpec::Linux { .. } => {
            let plan = SwapPlan {
                target,
                rescue,
                identity_paths: DEFAULT_IDENTITY_PATHS
                    .iter()
                    .map(|p| (*p).to_owned())
                    .collect(),
                health_checks,
                boot_attempts: config.boot_attempts,
                trusted_publishers: vec![hex::encode(publisher.as_bytes())],
                source_store: None,
            };
            let mut ctx = SwapContext {
                platform: platform.as_mut(),
                store: &machine_store as &dyn BundleStore,
                source: None,
            };
            tracing::info!(%target, %rescue, "swap starting on this machine");
            match driver::start_swap(&mut ctx, plan).context("the swap failed")? {
                RunEnd::Rebooting(state) => Ok(SwapProgress::Rebooting {
                    step: state.step.name().to_owned(),
                }),
                RunEnd::Finished(state) | RunEnd::Idle(state) => {
                    Ok(SwapProgress::Ended(end_of(&state, 1)))
                }
            }
        }
    }
}

/// The checks the new OS must pass: the configured ones, else network up and one of the site's
/// stagers reachable (a site with a backup stager passes while either answers).
fn health_checks(
    config: &RemoteSwapConfig,
    stagers: &[std::net::SocketAddr],
) -> Result<Vec<HealthCheck>> {
    if config.health_checks.is_empty() {
        if stagers.is_empty() {
            bail!("the default health checks need a stager: start the daemon with --stager, or give --swap-health-check");
        }
        let addr = stagers
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(",");
        return Ok(vec![
            HealthCheck::NetworkUp,
            HealthCheck::ReachStager { addr },
        ]);
    }
    config
        .health_checks
        .iter()
        .map(|check| {
            check
                .parse::<HealthCheck>()
                .map_err(|e| anyhow::anyhow!("bad health check {check:?}: {e}"))
        })
        .collect()
}

/// How a journal that reached an end ended.
fn end_of(state: &SwapState, boots: u32) -> RemoteSwapEnd {
    let failure = (state.step != Step::Done).then(|| {
        state
            .failure
            .clone()
            .unwrap_or_else(|| "no reason recorded".into())
    });
    RemoteSwapEnd {
        outcome: state.step.name().to_owned(),
        failure,
        boots,
    }
}

/// The answer to [`proto::wire::Request::SwapStatus`]: how the machine's last swap, which must
/// be to `target`, stands, from its journal.
pub fn journal_answer(machine: &MachineSpec, target: BundleId) -> Result<JournalAnswer> {
    let platform = machine.open(None).context("cannot open the machine")?;
    let journal = crate::swap::journal::Journal::in_storage(&platform.storage_dir());
    let Some(state) = journal.load().context("cannot read the swap journal")? else {
        bail!("this machine has no swap on record");
    };
    if state.plan.target != target {
        bail!(
            "this machine's last swap is to {}, not {target}",
            state.plan.target
        );
    }
    if state.step.is_terminal() {
        Ok(JournalAnswer::Ended(end_of(&state, state.trial_boots)))
    } else {
        Ok(JournalAnswer::Running {
            step: state.step.name().to_owned(),
        })
    }
}

/// What the journal says of a swap.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JournalAnswer {
    /// It ended.
    Ended(RemoteSwapEnd),
    /// It runs, at this step.
    Running {
        /// The step.
        step: String,
    },
}

/// Runs the swap on a simulated machine, the daemon acting as its supervisor, to its end.
fn run_sim(
    config: &RemoteSwapConfig,
    root: &Path,
    publisher: &VerifyingKey,
    health_checks: &[HealthCheck],
    target: BundleId,
    rescue: BundleId,
) -> Result<RemoteSwapEnd> {
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
    for check in health_checks {
        first_args.extend(["--health-check".into(), check.to_string().into()]);
    }
    let supervisor = SimMachineConfig {
        agent: config.agent.clone(),
        root: root.to_path_buf(),
        first_args,
        max_boots: DEFAULT_MAX_BOOTS,
    };
    tracing::info!(%target, %rescue, root = %root.display(), "swap starting");
    let boots = run_sim_machine(&supervisor, &mut NoHooks)
        .with_context(|| format!("the simulated machine {} failed", root.display()))?;
    let last = boots.last().map(|b| b.exit);
    let mut platform = config
        .machine
        .open(None)
        .context("cannot open the machine after the swap")?;
    let report = status::collect(platform.as_mut());
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

/// Records the OS the machine runs (the booted slot's marker) in the edge's `installed.json`,
/// in place of any other version of the same bundle and of the OS it ran before (a rollback to
/// the rescue replaces the OS the swap left), so the edge's reports name it. Returns the
/// marker, or `None` when the running slot carries none (a machine installed by other means).
pub fn record_running_os(
    dir: &Path,
    machine: &MachineSpec,
) -> Result<Option<crate::swap::SlotMarker>> {
    let mut platform = machine.open(None).context("cannot open the machine")?;
    let booted = platform.booted_slot();
    let Some(marker) = platform
        .slot_marker(booted)
        .with_context(|| format!("cannot read the marker of the running slot {booted}"))?
    else {
        return Ok(None);
    };
    let previous = crate::state::load_running_os(dir)?;
    let entry = proto::wire::NodeBundle {
        name: marker.name.clone(),
        version: marker.version.clone(),
        id: marker.bundle,
    };
    let mut installed = crate::state::load_installed(dir)?;
    let before = installed.clone();
    installed.retain(|bundle| bundle.name != entry.name && Some(bundle) != previous.as_ref());
    installed.push(entry.clone());
    installed.sort();
    if installed != before {
        crate::state::save_installed(dir, &installed)?;
        tracing::info!(slot = %booted, bundle = %marker.bundle, name = %marker.name, version = %marker.version, "recorded the running OS as installed");
    }
    if previous.as_ref() != Some(&entry) {
        crate::state::save_running_os(dir, &entry)?;
    }
    Ok(Some(marker))
}
