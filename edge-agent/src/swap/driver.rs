//! The driver: runs the pure state machine against a [`Platform`] and a bundle store.
//!
//! The entry points are [`start_swap`] (the CLI's `swap`, and later the origin's remote
//! trigger), [`resume`] (run at every boot), and [`rollback`]. Each journals the state before
//! performing its side effect, so a crash anywhere is followed by a redo at the next boot.

use ed25519_dalek::VerifyingKey;
use proto::pack::UnpackProgress;
use proto::BundleKind;

use super::boot::Slot;
use super::bundles::{self, BundleError, BundleStore};
use super::fault::{self, Phase};
use super::identity;
use super::journal::{Journal, JournalError};
use super::machine::{self, Action, Outcome, RollbackRefused, Step, SwapState};
use super::plan::{PlanError, SwapPlan};
use super::platform::{Platform, PlatformError, SlotMarker, SLOT_MARKER_FILE};

/// The pin tag under which the machine's store keeps a bundle its slots need (the rescue and
/// the target stay for repair, reinstall and retries, whatever the fetch side unpins).
pub fn slot_pin_tag(id: &proto::BundleId) -> String {
    format!("os-slot:{id}")
}

/// What the machine and its bundles are, for one run of the agent.
pub struct SwapContext<'a> {
    /// The machine.
    pub platform: &'a mut dyn Platform,
    /// The store in the machine's storage area (outside both slots).
    pub store: &'a dyn BundleStore,
    /// The store the bundles come from, when they are not in `store` yet.
    pub source: Option<&'a dyn BundleStore>,
}

/// How a run of the agent ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RunEnd {
    /// The procedure reached an end state during this run.
    Finished(SwapState),
    /// The procedure was already at an end state; nothing was done.
    Idle(SwapState),
    /// A reboot was requested; the agent should exit with [`super::REBOOT_EXIT_CODE`].
    Rebooting(SwapState),
}

/// Why the agent could not go on.
#[derive(Debug, thiserror::Error)]
pub enum SwapError {
    /// The plan is invalid.
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// The journal is unreadable or unwritable.
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// Another swap is in progress.
    #[error("a swap to {target} is in progress (step {step}): wait for it, or run `edge-agent rollback` first")]
    InProgress {
        /// Its target.
        target: proto::BundleId,
        /// Its step.
        step: &'static str,
    },
    /// No swap is on record.
    #[error("no swap is on record on this machine")]
    NoSwap,
    /// The rollback request was refused.
    #[error(transparent)]
    Rollback(#[from] RollbackRefused),
    /// A step that cannot fail over to another path failed (a reboot, or the recovery itself).
    #[error("step {step} failed: {reason}; the journal keeps the step and the next boot (or `edge-agent resume`) redoes it")]
    Stuck {
        /// The step.
        step: &'static str,
        /// Why.
        reason: String,
    },
    /// The platform failed outside any step.
    #[error(transparent)]
    Platform(#[from] PlatformError),
}

/// Starts a swap (or resumes the same one if it is already in progress) and runs it as far as
/// this boot allows. The library entry point for the CLI and for a remote trigger.
pub fn start_swap(ctx: &mut SwapContext<'_>, plan: SwapPlan) -> Result<RunEnd, SwapError> {
    plan.validate()?;
    let journal = Journal::in_storage(&ctx.platform.storage_dir());
    if let Some(existing) = journal.load()? {
        if !existing.step.is_terminal() {
            if existing.plan == plan {
                tracing::info!(step = existing.step.name(), "resuming the same swap");
                return run(ctx, &journal, existing);
            }
            return Err(SwapError::InProgress {
                target: existing.plan.target,
                step: existing.step.name(),
            });
        }
    }
    let booted = ctx.platform.booted_slot();
    let state = SwapState::new(plan, booted);
    tracing::info!(target = %state.plan.target, rescue = %state.plan.rescue, booted = %booted, "swap starting");
    journal.save(&state)?;
    run(ctx, &journal, state)
}

/// Continues the journaled swap, if any (run at every boot). `Ok(None)` when none is on record.
pub fn resume(ctx: &mut SwapContext<'_>) -> Result<Option<RunEnd>, SwapError> {
    let journal = Journal::in_storage(&ctx.platform.storage_dir());
    match journal.load()? {
        None => Ok(None),
        Some(state) => run(ctx, &journal, state).map(Some),
    }
}

/// Rolls back: before slot A is wiped, to the old OS; after, to the rescue OS.
pub fn rollback(ctx: &mut SwapContext<'_>, reason: &str) -> Result<RunEnd, SwapError> {
    let journal = Journal::in_storage(&ctx.platform.storage_dir());
    let state = journal.load()?.ok_or(SwapError::NoSwap)?;
    let next = machine::request_rollback(&state, reason)?;
    if next != state {
        tracing::warn!(
            from = state.step.name(),
            to = next.step.name(),
            reason,
            "rollback requested"
        );
        journal.save(&next)?;
    }
    run(ctx, &journal, next)
}

fn run(
    ctx: &mut SwapContext<'_>,
    journal: &Journal,
    state: SwapState,
) -> Result<RunEnd, SwapError> {
    let booted = ctx.platform.booted_slot();
    if state.step.is_terminal() {
        return Ok(RunEnd::Idle(state));
    }
    let mut state = {
        let reconciled = machine::on_boot(&state, booted);
        if reconciled != state {
            tracing::info!(from = state.step.name(), to = reconciled.step.name(), booted = %booted, "reconciled journal with the booted slot");
            journal.save(&reconciled)?;
        }
        reconciled
    };
    loop {
        if state.step.is_terminal() {
            report_end(&state);
            return Ok(RunEnd::Finished(state));
        }
        let step = state.step;
        let action = machine::action(&state, booted);
        tracing::info!(step = step.name(), booted = %booted, "step");
        fault::step_point(step, Phase::Before);
        if action == Action::Reboot {
            return match ctx.platform.reboot() {
                Ok(()) => {
                    // A crash here is a power cut in the middle of the reboot.
                    fault::step_point(step, Phase::After);
                    Ok(RunEnd::Rebooting(state))
                }
                Err(e) => Err(SwapError::Stuck {
                    step: step.name(),
                    reason: e.to_string(),
                }),
            };
        }
        let outcome = perform(ctx, &state, &action);
        fault::step_point(step, Phase::After);
        if let Outcome::Failed(reason) = &outcome {
            tracing::warn!(step = step.name(), %reason, "step failed");
        }
        let next = machine::advance(&state, booted, outcome.clone());
        if next == state {
            let reason = match outcome {
                Outcome::Failed(reason) => reason,
                Outcome::Succeeded => "the step made no progress".to_owned(),
            };
            return Err(SwapError::Stuck {
                step: step.name(),
                reason,
            });
        }
        journal.save(&next)?;
        state = next;
    }
}

fn report_end(state: &SwapState) {
    match state.step {
        Step::Done => {
            tracing::info!(target = %state.plan.target, "swap complete: the new OS is committed")
        }
        step => tracing::error!(
            step = step.name(),
            reason = state.failure.as_deref().unwrap_or("none recorded"),
            "swap ended without the new OS"
        ),
    }
}

fn perform(ctx: &mut SwapContext<'_>, state: &SwapState, action: &Action) -> Outcome {
    match try_perform(ctx, state, action) {
        Ok(()) => Outcome::Succeeded,
        Err(reason) => Outcome::Failed(reason),
    }
}

fn try_perform(
    ctx: &mut SwapContext<'_>,
    state: &SwapState,
    action: &Action,
) -> Result<(), String> {
    let plan = &state.plan;
    let text = |e: &dyn std::fmt::Display| e.to_string();
    match action {
        Action::VerifyBundles => {
            let trusted = trusted_keys(plan)?;
            let source = ctx.source.unwrap_or(ctx.store);
            let mut tick = || fault::op_point("verify chunk");
            let target = bundles::verify_bundle(source, &plan.target, &trusted, &mut tick)
                .map_err(|e| format!("target {e}"))?;
            let rescue = bundles::verify_bundle(source, &plan.rescue, &trusted, &mut tick)
                .map_err(|e| format!("rescue {e}"))?;
            check_kind(
                "target",
                &target,
                &[BundleKind::OsImage, BundleKind::BaseOs],
            )?;
            check_kind("rescue", &rescue, &[BundleKind::BaseOs])?;
            Ok(())
        }
        Action::StageBundles => {
            let trusted = trusted_keys(plan)?;
            for id in [plan.rescue, plan.target] {
                match ctx.source {
                    Some(source) => {
                        bundles::stage_bundle(
                            source,
                            ctx.store,
                            &id,
                            &trusted,
                            &slot_pin_tag(&id),
                            &mut || fault::op_point("stage chunk"),
                        )
                        .map_err(|e| text(&e))?;
                    }
                    None => ctx.store.pin(&id, &slot_pin_tag(&id)).map_err(|e| {
                        format!("cannot pin bundle {id} in the machine's store: {e}")
                    })?,
                }
                fault::op_point("stage bundle");
            }
            Ok(())
        }
        Action::PreserveIdentity { from } => {
            let root = ctx.platform.slot_root(*from).map_err(|e| text(&e))?;
            identity::preserve(&root, &plan.identity_paths, &ctx.platform.storage_dir())
                .map(|_| ())
                .map_err(|e| text(&e))
        }
        Action::Install { slot, bundle } => install(ctx, plan, *slot, bundle),
        Action::RestoreIdentity { into } => {
            let root = ctx.platform.slot_root(*into).map_err(|e| text(&e))?;
            identity::restore(&ctx.platform.storage_dir(), &root)
                .map(|_| ())
                .map_err(|e| text(&e))
        }
        Action::BootOnce(slot) => ctx.platform.set_boot_once(*slot).map_err(|e| text(&e)),
        Action::MakeDefault(slot) => ctx.platform.set_default(*slot).map_err(|e| text(&e)),
        Action::Wipe(slot) => ctx.platform.wipe_slot(*slot).map_err(|e| text(&e)),
        Action::ArmTrial { slot, attempts } => ctx
            .platform
            .arm_trial(*slot, *attempts)
            .map_err(|e| text(&e)),
        Action::RunHealthChecks => {
            let failures: Vec<String> = plan
                .health_checks
                .iter()
                .filter_map(|check| ctx.platform.run_health_check(check).err())
                .collect();
            if failures.is_empty() {
                Ok(())
            } else {
                Err(failures.join("; "))
            }
        }
        Action::Commit(slot) => ctx.platform.commit_slot(*slot).map_err(|e| text(&e)),
        Action::RollBack { bad, default } => ctx
            .platform
            .roll_back_slot(*bad, *default)
            .map_err(|e| text(&e)),
        // The run loop handles reboots itself.
        Action::Reboot | Action::Nothing => Ok(()),
    }
}

/// Installs `bundle` into `slot`: marker removed, slot formatted, bundle unpacked and verified
/// chunk by chunk, filesystem synced, marker written. Skipped when the marker already names it.
fn install(
    ctx: &mut SwapContext<'_>,
    plan: &SwapPlan,
    slot: Slot,
    bundle: &proto::BundleId,
) -> Result<(), String> {
    let text = |e: &dyn std::fmt::Display| e.to_string();
    let current = ctx.platform.slot_marker(slot).unwrap_or_else(|e| {
        tracing::warn!(slot = %slot, error = %e, "cannot read the slot marker; treating the slot as empty");
        None
    });
    if current.as_ref().map(|m| m.bundle) == Some(*bundle) {
        tracing::info!(slot = %slot, bundle = %bundle, "slot already holds the bundle; skipping unpack");
        return Ok(());
    }
    if slot == ctx.platform.booted_slot() {
        return Err(format!(
            "slot {slot} is running {} and cannot be reinstalled with {bundle} while it runs",
            current.map_or("an unknown OS".to_owned(), |m| format!(
                "{} {}",
                m.name, m.version
            ))
        ));
    }
    let trusted = trusted_keys(plan)?;
    install_bundle(ctx.platform, ctx.store, slot, bundle, &trusted)
        .map(|_| ())
        .map_err(|e| text(&e))
}

/// Why a slot could not be filled.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// The bundle is refused or unreadable (boxed: the error is large and rare).
    #[error(transparent)]
    Bundle(Box<BundleError>),
    /// The platform failed.
    #[error(transparent)]
    Platform(#[from] PlatformError),
    /// The machine's content-key ring cannot be read.
    #[error("cannot read the machine's content keys: {0}")]
    Keys(#[from] proto::keyring::KeyringError),
    /// The bundle carries the slot marker's own path.
    #[error("bundle {0} contains {SLOT_MARKER_FILE}, a path reserved for the agent: repack it without that file")]
    ReservedPath(proto::BundleId),
}

impl From<BundleError> for InstallError {
    fn from(e: BundleError) -> Self {
        InstallError::Bundle(Box::new(e))
    }
}

/// Fills `slot` with bundle `id` from `store`: verifies the manifest, removes the marker, formats
/// the slot, unpacks (every chunk checked before use), syncs, and writes the marker last.
/// Used by the swap and to provision a machine.
pub fn install_bundle(
    platform: &mut dyn Platform,
    store: &dyn BundleStore,
    slot: Slot,
    id: &proto::BundleId,
    trusted: &[VerifyingKey],
) -> Result<SlotMarker, InstallError> {
    let manifest = bundles::verified_manifest(store, id, trusted)?;
    // An encrypted bundle opens with a key of the machine's ring, kept in its storage area
    // outside both slots; a missing or wrong key is found before the slot is touched.
    let keys = match manifest.layout.sealed_generation() {
        Some(_) => proto::keyring::load(&machine_keyring_path(platform))?,
        None => proto::keys::KeyRing::new(),
    };
    bundles::check_keys(id, &manifest, &keys)?;
    platform.clear_slot_marker(slot)?;
    fault::op_point("clear marker");
    platform.format_slot(slot)?;
    fault::op_point("format slot");
    let root = platform.slot_root(slot)?;
    let started = std::time::Instant::now();
    let stats = bundles::unpack_bundle(
        store,
        id,
        &manifest,
        &keys,
        &root,
        &mut |_: UnpackProgress| fault::op_point("unpack chunk"),
    )?;
    if root.join(SLOT_MARKER_FILE).exists() {
        return Err(InstallError::ReservedPath(*id));
    }
    let marker = SlotMarker::for_manifest(*id, &manifest);
    platform.seal_slot(slot, &marker)?;
    fault::op_point("seal slot");
    tracing::info!(
        slot = %slot,
        bundle = %id,
        name = %manifest.name,
        version = %manifest.version,
        files = stats.files,
        raw_bytes = stats.raw_bytes,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "slot installed"
    );
    Ok(marker)
}

/// The machine's content-key ring: `content-keys.bin` in its storage area, outside both slots.
pub fn machine_keyring_path(platform: &dyn Platform) -> std::path::PathBuf {
    platform.storage_dir().join(proto::keyring::KEYRING_FILE)
}

fn trusted_keys(plan: &SwapPlan) -> Result<Vec<VerifyingKey>, String> {
    bundles::parse_trusted_keys(&plan.trusted_publishers).map_err(|e| e.to_string())
}

fn check_kind(
    role: &str,
    manifest: &proto::Manifest,
    allowed: &[BundleKind],
) -> Result<(), String> {
    if allowed.contains(&manifest.kind) {
        return Ok(());
    }
    let names: Vec<&str> = allowed.iter().map(|k| k.as_str()).collect();
    Err(format!(
        "the {role} bundle {} {} is a {} bundle; a {role} must be {}",
        manifest.name,
        manifest.version,
        manifest.kind,
        names.join(" or ")
    ))
}
