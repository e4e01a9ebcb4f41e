//! The swap state machine: pure, no I/O.
//!
//! A [`SwapState`] is what the journal holds. The driver asks [`action`] for the side effect of
//! the current step, journals the state *before* performing it, performs it, and asks
//! [`advance`] for the next state. After every boot it first calls [`on_boot`], which reconciles
//! the journal with the slot the firmware actually booted. Because the state is journaled before
//! each side effect and every side effect is idempotent, resuming from any journaled state simply
//! redoes that step (or skips it when the boot shows it already took effect).
//!
//! Safety argument, in one place. The firmware ([`super::boot::firmware_boot`]) boots the rescue
//! slot B once (`next_entry`) only after B holds the rescue OS, makes B the default before slot A
//! is wiped, and makes A the default again (with a trial counter falling back to B) only after A
//! holds the complete new OS. So at every instant the slot the firmware would choose holds a
//! complete OS: the old one, the rescue, or the new one.

use serde::{Deserialize, Serialize};

use super::boot::Slot;
use super::plan::SwapPlan;
use proto::BundleId;

/// Version of the journal format written by this build.
pub const JOURNAL_FORMAT: u32 = 1;

/// Boots into the rescue slot that may fail (B did not come up, or a power cut lost the boot)
/// before the swap gives up and stays on the old OS.
pub const MAX_RESCUE_BOOT_TRIES: u32 = 3;

/// Health-check failures remembered in the journal (the oldest are dropped).
pub const MAX_RECORDED_FAILURES: usize = 16;

/// One journaled step of the procedure (brief 000, claims 7–14), in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Step {
    /// Verify both bundles' signed manifests and every chunk. Touches nothing.
    VerifyBundles,
    /// Keep both bundles packed in the machine's storage area, outside the slots.
    StageBundles,
    /// Copy the identity (network configuration, host keys, ACLs) of the running OS to storage.
    PreserveIdentity,
    /// Unpack the rescue OS to slot B (skipped when B already holds it).
    InstallRescue,
    /// Copy the preserved identity into slot B, so the rescue is reachable as this machine.
    RescueIdentity,
    /// Set the boot loader to boot B once.
    BootRescueOnce,
    /// Reboot into B.
    RebootToRescue,
    /// Running from B: make B the default, so a power cut from here on boots the rescue.
    MakeRescueDefault,
    /// Wipe slot A.
    WipeTarget,
    /// Unpack the target OS to slot A.
    InstallTarget,
    /// Copy the preserved identity into slot A.
    TargetIdentity,
    /// Make A the default with a trial counter; the firmware falls back to B when it runs out.
    ArmTrial,
    /// Reboot into A for a trial.
    RebootToTarget,
    /// Running from A on a trial boot: run the health checks.
    HealthCheck,
    /// A health check failed: reboot, spending one more trial boot.
    RetryTrial,
    /// Mark A good and make it the default for good.
    Commit,
    /// The new OS runs and is committed.
    Done,
    /// Something failed before slot A was touched: make the old OS the default again.
    Abandon,
    /// Reboot into the old OS after abandoning.
    RebootToOld,
    /// The swap was abandoned; the old OS runs, untouched.
    Aborted,
    /// The new OS failed: mark A bad and make the rescue slot the default.
    RollBack,
    /// Reboot into the rescue slot after rolling back.
    RebootAfterRollback,
    /// Rolled back: the rescue OS runs; bundles and identity are kept for a retry.
    RolledBack,
}

impl Step {
    /// Every step, in procedure order, then the failure paths.
    pub const ALL: [Step; 23] = [
        Step::VerifyBundles,
        Step::StageBundles,
        Step::PreserveIdentity,
        Step::InstallRescue,
        Step::RescueIdentity,
        Step::BootRescueOnce,
        Step::RebootToRescue,
        Step::MakeRescueDefault,
        Step::WipeTarget,
        Step::InstallTarget,
        Step::TargetIdentity,
        Step::ArmTrial,
        Step::RebootToTarget,
        Step::HealthCheck,
        Step::RetryTrial,
        Step::Commit,
        Step::Done,
        Step::Abandon,
        Step::RebootToOld,
        Step::Aborted,
        Step::RollBack,
        Step::RebootAfterRollback,
        Step::RolledBack,
    ];

    /// The kebab-case name used in logs, `status` and `STAGECOACH_CRASH_AT`.
    pub fn name(self) -> &'static str {
        match self {
            Step::VerifyBundles => "verify-bundles",
            Step::StageBundles => "stage-bundles",
            Step::PreserveIdentity => "preserve-identity",
            Step::InstallRescue => "install-rescue",
            Step::RescueIdentity => "rescue-identity",
            Step::BootRescueOnce => "boot-rescue-once",
            Step::RebootToRescue => "reboot-to-rescue",
            Step::MakeRescueDefault => "make-rescue-default",
            Step::WipeTarget => "wipe-target",
            Step::InstallTarget => "install-target",
            Step::TargetIdentity => "target-identity",
            Step::ArmTrial => "arm-trial",
            Step::RebootToTarget => "reboot-to-target",
            Step::HealthCheck => "health-check",
            Step::RetryTrial => "retry-trial",
            Step::Commit => "commit",
            Step::Done => "done",
            Step::Abandon => "abandon",
            Step::RebootToOld => "reboot-to-old",
            Step::Aborted => "aborted",
            Step::RollBack => "roll-back",
            Step::RebootAfterRollback => "reboot-after-rollback",
            Step::RolledBack => "rolled-back",
        }
    }

    /// Parses a [`Step::name`].
    pub fn from_name(name: &str) -> Option<Step> {
        Step::ALL.into_iter().find(|s| s.name() == name)
    }

    /// True for the states the procedure ends in.
    pub fn is_terminal(self) -> bool {
        matches!(self, Step::Done | Step::Aborted | Step::RolledBack)
    }

    /// True while slot A still holds the old OS untouched (the wipe is not journaled yet).
    pub fn before_wipe(self) -> bool {
        matches!(
            self,
            Step::VerifyBundles
                | Step::StageBundles
                | Step::PreserveIdentity
                | Step::InstallRescue
                | Step::RescueIdentity
                | Step::BootRescueOnce
                | Step::RebootToRescue
                | Step::MakeRescueDefault
        )
    }
}

/// The journal: one swap's plan and where it stands.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwapState {
    /// [`JOURNAL_FORMAT`] at the time of writing.
    pub format: u32,
    /// What this swap does.
    pub plan: SwapPlan,
    /// The current step: journaled before its side effect.
    pub step: Step,
    /// The slot the swap started on; an abandoned swap returns to it.
    pub started_on: Slot,
    /// Boots that should have reached the rescue slot but came back to A.
    pub rescue_boot_tries: u32,
    /// Trial boots of the new OS seen so far.
    pub trial_boots: u32,
    /// Health-check failures, oldest first, at most [`MAX_RECORDED_FAILURES`].
    pub health_failures: Vec<String>,
    /// Why the swap was abandoned or rolled back.
    pub failure: Option<String>,
    /// Whether an operator asked for the rollback (so ending on the old or rescue OS is what
    /// was wanted, not a failure).
    #[serde(default)]
    pub rollback_requested: bool,
}

/// The side effect of a step, for the driver to perform.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Verify both bundles completely.
    VerifyBundles,
    /// Copy both bundles into the machine's storage area and pin them.
    StageBundles,
    /// Copy the identity paths of `from` into storage.
    PreserveIdentity {
        /// The running slot.
        from: Slot,
    },
    /// Install `bundle` into `slot` (marker removed first, written last); skipped when the
    /// slot's marker already names the bundle.
    Install {
        /// Slot to fill.
        slot: Slot,
        /// Bundle to unpack.
        bundle: BundleId,
    },
    /// Copy the preserved identity into `into`.
    RestoreIdentity {
        /// Slot to receive it.
        into: Slot,
    },
    /// Boot `0` on the next boot only.
    BootOnce(Slot),
    /// Make `0` the default, clearing any once-boot and trial counter.
    MakeDefault(Slot),
    /// Wipe a slot (marker first).
    Wipe(Slot),
    /// Make `slot` the default for `attempts` trial boots.
    ArmTrial {
        /// Slot on trial.
        slot: Slot,
        /// Trial boots.
        attempts: u8,
    },
    /// Reboot the machine.
    Reboot,
    /// Run the plan's health checks.
    RunHealthChecks,
    /// Mark `0` good and make it the default.
    Commit(Slot),
    /// Mark `bad` bad and make `default` the default.
    RollBack {
        /// The slot that failed.
        bad: Slot,
        /// The slot to boot from now on.
        default: Slot,
    },
    /// Nothing: the procedure has ended.
    Nothing,
}

/// How a side effect went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// It took effect.
    Succeeded,
    /// It did not; the reason is reported to the operator.
    Failed(String),
}

/// Why an operator's rollback request was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RollbackRefused {
    /// The swap already ended on the old or the rescue OS.
    #[error("nothing to roll back: the swap already ended in {0:?} ({reason})", reason = .1.as_deref().unwrap_or("no reason recorded"))]
    AlreadyEnded(Step, Option<String>),
}

impl SwapState {
    /// A fresh journal for `plan`, at its first step, started while running from `booted`.
    pub fn new(plan: SwapPlan, booted: Slot) -> Self {
        Self {
            format: JOURNAL_FORMAT,
            plan,
            step: Step::VerifyBundles,
            started_on: booted,
            rescue_boot_tries: 0,
            trial_boots: 0,
            health_failures: Vec::new(),
            failure: None,
            rollback_requested: false,
        }
    }

    fn at(&self, step: Step) -> Self {
        Self {
            step,
            ..self.clone()
        }
    }

    fn failing(&self, step: Step, reason: String) -> Self {
        Self {
            step,
            failure: Some(reason),
            ..self.clone()
        }
    }

    /// Counts a boot that should have reached B but did not; gives up after the bound.
    fn rescue_boot_missed(&self) -> Self {
        let tries = self.rescue_boot_tries + 1;
        if tries >= MAX_RESCUE_BOOT_TRIES {
            Self {
                rescue_boot_tries: tries,
                ..self.failing(
                    Step::Abandon,
                    format!(
                        "the rescue slot B did not stay booted in {tries} tries; the old OS in A is untouched"
                    ),
                )
            }
        } else {
            Self {
                rescue_boot_tries: tries,
                ..self.at(Step::BootRescueOnce)
            }
        }
    }

    fn trial_boot(&self) -> Self {
        Self {
            trial_boots: self.trial_boots + 1,
            ..self.at(Step::HealthCheck)
        }
    }

    /// The firmware fell back to B: the trial's boot attempts ran out.
    fn attempts_exhausted(&self) -> Self {
        let last = self
            .health_failures
            .last()
            .map(String::as_str)
            .unwrap_or("none recorded: the boots ended before the checks finished");
        self.failing(
            Step::RollBack,
            format!(
                "the new OS did not pass its health checks within {} boot attempts; last failure: {last}",
                self.plan.boot_attempts
            ),
        )
    }
}

/// Reconciles the journal with the slot the firmware booted. Call once per boot, before the
/// first [`action`]; the result is to be journaled if it differs.
pub fn on_boot(state: &SwapState, booted: Slot) -> SwapState {
    use Slot::{A, B};
    match (state.step, booted) {
        // The once-boot reached B (or a power cut after setting it did).
        (Step::BootRescueOnce | Step::RebootToRescue, B) => state.at(Step::MakeRescueDefault),
        // Rebooted toward B but came back to A: B failed, or a power cut lost the boot.
        (Step::RebootToRescue | Step::MakeRescueDefault, A) => state.rescue_boot_missed(),
        // A is being rewritten while B is the default: booting A here means someone changed the
        // boot loader under us. Do not trust A.
        (Step::WipeTarget | Step::InstallTarget | Step::TargetIdentity, A) => state.failing(
            Step::RollBack,
            format!(
                "booted slot A during {}, while the rescue slot B was the default",
                state.step.name()
            ),
        ),
        // The trial counter was written (the firmware chose A): this is a trial boot.
        (Step::ArmTrial | Step::RebootToTarget | Step::HealthCheck | Step::RetryTrial, A) => {
            state.trial_boot()
        }
        // On trial but the firmware chose B: the attempts ran out.
        (Step::RebootToTarget | Step::HealthCheck | Step::RetryTrial | Step::Commit, B) => {
            state.attempts_exhausted()
        }
        (Step::RebootToOld, slot) if slot == state.started_on => state.at(Step::Aborted),
        (Step::RebootToOld, _) => state.at(Step::Abandon),
        (Step::RebootAfterRollback, B) => state.at(Step::RolledBack),
        (Step::RebootAfterRollback, A) => state.at(Step::RollBack),
        _ => state.clone(),
    }
}

/// The side effect of the current step, to be run on slot `booted`.
pub fn action(state: &SwapState, booted: Slot) -> Action {
    let plan = &state.plan;
    match state.step {
        Step::VerifyBundles => Action::VerifyBundles,
        Step::StageBundles => Action::StageBundles,
        Step::PreserveIdentity => Action::PreserveIdentity { from: booted },
        Step::InstallRescue => Action::Install {
            slot: Slot::B,
            bundle: plan.rescue,
        },
        Step::RescueIdentity => Action::RestoreIdentity { into: Slot::B },
        Step::BootRescueOnce => Action::BootOnce(Slot::B),
        Step::RebootToRescue
        | Step::RebootToTarget
        | Step::RetryTrial
        | Step::RebootToOld
        | Step::RebootAfterRollback => Action::Reboot,
        Step::MakeRescueDefault => Action::MakeDefault(Slot::B),
        Step::WipeTarget => Action::Wipe(Slot::A),
        Step::InstallTarget => Action::Install {
            slot: Slot::A,
            bundle: plan.target,
        },
        Step::TargetIdentity => Action::RestoreIdentity { into: Slot::A },
        Step::ArmTrial => Action::ArmTrial {
            slot: Slot::A,
            attempts: plan.boot_attempts,
        },
        Step::HealthCheck => Action::RunHealthChecks,
        Step::Commit => Action::Commit(Slot::A),
        Step::Abandon => Action::MakeDefault(state.started_on),
        Step::RollBack => Action::RollBack {
            bad: Slot::A,
            default: Slot::B,
        },
        Step::Done | Step::Aborted | Step::RolledBack => Action::Nothing,
    }
}

/// The state after the current step's side effect, performed on slot `booted`, ended in
/// `outcome`. A failed reboot or failed recovery step keeps the state, to be redone.
pub fn advance(state: &SwapState, booted: Slot, outcome: Outcome) -> SwapState {
    let reason = match outcome {
        Outcome::Succeeded => return succeeded(state, booted),
        Outcome::Failed(reason) => reason,
    };
    match state.step {
        // Nothing was touched yet: the swap simply did not start.
        Step::VerifyBundles => state.failing(Step::Aborted, reason),
        step if step.before_wipe() && step != Step::RebootToRescue => {
            state.failing(Step::Abandon, format!("{} failed: {reason}", step.name()))
        }
        Step::WipeTarget
        | Step::InstallTarget
        | Step::TargetIdentity
        | Step::ArmTrial
        | Step::Commit => state.failing(
            Step::RollBack,
            format!("{} failed: {reason}", state.step.name()),
        ),
        Step::HealthCheck => {
            let mut next = state.at(Step::RetryTrial);
            next.health_failures.push(reason);
            if next.health_failures.len() > MAX_RECORDED_FAILURES {
                next.health_failures.remove(0);
            }
            next
        }
        // Reboots and the recovery steps themselves: stay, the driver reports and a later boot
        // (or the operator) redoes them.
        _ => state.clone(),
    }
}

fn succeeded(state: &SwapState, booted: Slot) -> SwapState {
    let next = match state.step {
        Step::VerifyBundles => Step::StageBundles,
        Step::StageBundles => Step::PreserveIdentity,
        Step::PreserveIdentity => Step::InstallRescue,
        Step::InstallRescue => Step::RescueIdentity,
        // Already running the rescue (a retry after a rollback): no reboot needed.
        Step::RescueIdentity if booted == Slot::B => Step::MakeRescueDefault,
        Step::RescueIdentity => Step::BootRescueOnce,
        Step::BootRescueOnce => Step::RebootToRescue,
        Step::MakeRescueDefault => Step::WipeTarget,
        Step::WipeTarget => Step::InstallTarget,
        Step::InstallTarget => Step::TargetIdentity,
        Step::TargetIdentity => Step::ArmTrial,
        Step::ArmTrial => Step::RebootToTarget,
        Step::HealthCheck => Step::Commit,
        Step::Commit => Step::Done,
        Step::Abandon if booted == state.started_on => Step::Aborted,
        Step::Abandon => Step::RebootToOld,
        Step::RollBack if booted == Slot::B => Step::RolledBack,
        Step::RollBack => Step::RebootAfterRollback,
        // A reboot that returns has not happened yet; terminal states stay.
        other => other,
    };
    state.at(next)
}

/// The state after an operator asks to roll back: before slot A is wiped, back to the old OS;
/// after, to the rescue OS.
pub fn request_rollback(state: &SwapState, reason: &str) -> Result<SwapState, RollbackRefused> {
    let reason = format!("rollback requested: {reason}");
    match state.step {
        Step::Aborted | Step::RolledBack => Err(RollbackRefused::AlreadyEnded(
            state.step,
            state.failure.clone(),
        )),
        // Already on the way back.
        Step::Abandon | Step::RebootToOld | Step::RollBack | Step::RebootAfterRollback => {
            Ok(state.clone())
        }
        step => {
            let to = if step.before_wipe() {
                Step::Abandon
            } else {
                Step::RollBack
            };
            Ok(SwapState {
                rollback_requested: true,
                ..state.failing(to, reason)
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::boot::{firmware_boot, GrubEnv, SlotHealth};
    use super::super::plan::{HealthCheck, DEFAULT_BOOT_ATTEMPTS};
    use super::*;
    use proto::BlobHash;

    fn plan() -> SwapPlan {
        SwapPlan {
            target: BlobHash::of(b"target"),
            rescue: BlobHash::of(b"rescue"),
            identity_paths: vec!["etc/hostname".into()],
            health_checks: vec![HealthCheck::NetworkUp],
            boot_attempts: DEFAULT_BOOT_ATTEMPTS,
            trusted_publishers: vec!["00".repeat(32)],
            source_store: None,
        }
    }

    /// A model machine: the boot environment, which slots hold a complete OS, and which OS.
    #[derive(Clone, Debug)]
    struct Model {
        env: GrubEnv,
        /// What each slot holds: Some(name) when complete.
        slots: [Option<&'static str>; 2],
        booted: Slot,
        journal: SwapState,
        /// Health of the new OS on each trial boot, consumed in order (true = passes).
        health: Vec<bool>,
    }

    impl Model {
        fn new(health: Vec<bool>) -> Self {
            let mut env = GrubEnv::new();
            env.set_default(Slot::A);
            Self {
                env,
                slots: [Some("old"), None],
                booted: Slot::A,
                journal: SwapState::new(plan(), Slot::A),
                health,
            }
        }

        fn holds(&self, slot: Slot) -> Option<&'static str> {
            self.slots[slot as usize]
        }

        /// Power-on: the firmware chooses, and the slot it chose must hold a complete OS.
        fn power_on(&mut self) {
            let (slot, env) = firmware_boot(&self.env);
            self.env = env;
            self.booted = slot;
            assert!(
                self.holds(slot).is_some(),
                "booted empty slot {slot} at {:?}",
                self.journal.step
            );
            self.journal = on_boot(&self.journal, slot);
        }

        /// Performs the side effect of the current step; `false` when it was a reboot.
        fn perform(&mut self) -> Option<Outcome> {
            let outcome = match action(&self.journal, self.booted) {
                Action::VerifyBundles | Action::StageBundles | Action::PreserveIdentity { .. } => {
                    Outcome::Succeeded
                }
                Action::Install { slot, .. } => {
                    assert_ne!(slot, self.booted, "installing into the running slot");
                    self.slots[slot as usize] =
                        Some(if slot == Slot::A { "new" } else { "rescue" });
                    Outcome::Succeeded
                }
                Action::RestoreIdentity { .. } => Outcome::Succeeded,
                Action::BootOnce(slot) => {
                    self.env.set_boot_once(slot);
                    Outcome::Succeeded
                }
                Action::MakeDefault(slot) => {
                    self.env.set_default(slot);
                    Outcome::Succeeded
                }
                Action::Wipe(slot) => {
                    assert_ne!(slot, self.booted, "wiping the running slot");
                    self.slots[slot as usize] = None;
                    Outcome::Succeeded
                }
                Action::ArmTrial { slot, attempts } => {
                    self.env.arm_trial(slot, attempts);
                    Outcome::Succeeded
                }
                Action::Reboot => return None,
                Action::RunHealthChecks => {
                    if self.health.is_empty() || self.health.remove(0) {
                        Outcome::Succeeded
                    } else {
                        Outcome::Failed("stager unreachable".into())
                    }
                }
                Action::Commit(slot) => {
                    self.env.set_default(slot);
                    self.env.mark(slot, SlotHealth::Good);
                    Outcome::Succeeded
                }
                Action::RollBack { bad, default } => {
                    self.env.set_default(default);
                    self.env.mark(bad, SlotHealth::Bad);
                    Outcome::Succeeded
                }
                Action::Nothing => Outcome::Succeeded,
            };
            Some(outcome)
        }

        /// Runs to a terminal step. `crash` = (n, journaled): power is cut after the n-th side
        /// effect, before its result is journaled (`false`) or after (`true`).
        fn run(&mut self, mut crash: Option<(usize, bool)>) {
            let mut boots = 0;
            let mut effects = 0;
            while !self.journal.step.is_terminal() {
                assert!(boots < 50, "no progress at {:?}", self.journal.step);
                match self.perform() {
                    None => {
                        boots += 1;
                        self.power_on();
                    }
                    Some(outcome) => {
                        effects += 1;
                        let cut = matches!(crash, Some((n, _)) if n == effects);
                        if cut && crash.is_some_and(|(_, journaled)| !journaled) {
                            crash = None;
                            boots += 1;
                            self.power_on();
                            continue;
                        }
                        self.journal = advance(&self.journal, self.booted, outcome);
                        if cut {
                            crash = None;
                            boots += 1;
                            self.power_on();
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn healthy_target_ends_committed_on_the_new_os() {
        let mut m = Model::new(vec![true]);
        m.run(None);
        assert_eq!(m.journal.step, Step::Done);
        assert_eq!(m.booted, Slot::A);
        assert_eq!(m.holds(Slot::A), Some("new"));
        assert_eq!(m.holds(Slot::B), Some("rescue"), "the rescue OS stays");
        assert_eq!(
            firmware_boot(&m.env).0,
            Slot::A,
            "A is the default for good"
        );
        assert_eq!(m.env.boot_counter(), None);
    }

    #[test]
    fn target_failing_three_times_rolls_back_to_rescue_with_the_reason() {
        let mut m = Model::new(vec![false, false, false]);
        m.run(None);
        assert_eq!(m.journal.step, Step::RolledBack);
        assert_eq!(m.booted, Slot::B);
        assert_eq!(m.journal.trial_boots, 3);
        assert_eq!(m.journal.health_failures.len(), 3);
        let failure = m.journal.failure.clone().expect("reason");
        assert!(failure.contains("3 boot attempts"), "{failure}");
        assert!(failure.contains("stager unreachable"), "{failure}");
        assert_eq!(m.env.slot_health(Slot::A), Some(SlotHealth::Bad));
        assert_eq!(firmware_boot(&m.env).0, Slot::B);
    }

    #[test]
    fn one_failed_check_then_success_commits() {
        let mut m = Model::new(vec![false, true]);
        m.run(None);
        assert_eq!(m.journal.step, Step::Done);
        assert_eq!(m.journal.trial_boots, 2);
    }

    #[test]
    fn power_cut_after_any_side_effect_still_ends_well() {
        // Count the side effects of a clean run, then cut power after each one.
        for health in [vec![true], vec![false, false, false], vec![false, true]] {
            let mut total = 0;
            let mut probe = Model::new(health.clone());
            while !probe.journal.step.is_terminal() {
                if let Some(outcome) = probe.perform() {
                    total += 1;
                    probe.journal = advance(&probe.journal, probe.booted, outcome);
                } else {
                    probe.power_on();
                }
            }
            for crash in (1..=total).flat_map(|n| [(n, false), (n, true)]) {
                let mut m = Model::new(health.clone());
                m.run(Some(crash));
                assert!(
                    matches!(m.journal.step, Step::Done | Step::RolledBack),
                    "crash {crash:?}: ended in {:?}",
                    m.journal.step
                );
                // Whatever happened, the default boot holds a complete OS.
                let (slot, _) = firmware_boot(&m.env);
                assert!(m.holds(slot).is_some());
            }
        }
    }

    #[test]
    fn verify_failure_aborts_without_any_side_effect() {
        let state = SwapState::new(plan(), Slot::A);
        let next = advance(&state, Slot::A, Outcome::Failed("bad signature".into()));
        assert_eq!(next.step, Step::Aborted);
        assert_eq!(next.failure.as_deref(), Some("bad signature"));
        assert_eq!(action(&next, Slot::A), Action::Nothing);
    }

    #[test]
    fn failure_before_wipe_returns_to_the_old_os() {
        let mut m = Model::new(vec![true]);
        m.journal = m.journal.at(Step::InstallRescue);
        m.journal = advance(&m.journal, Slot::A, Outcome::Failed("disk full".into()));
        assert_eq!(m.journal.step, Step::Abandon);
        m.run(None);
        assert_eq!(m.journal.step, Step::Aborted);
        assert_eq!(m.holds(Slot::A), Some("old"));
        assert!(m
            .journal
            .failure
            .as_deref()
            .unwrap_or("")
            .contains("disk full"));
    }

    #[test]
    fn rescue_that_never_boots_leaves_the_old_os() {
        let mut state = SwapState::new(plan(), Slot::A).at(Step::RebootToRescue);
        for _ in 0..MAX_RESCUE_BOOT_TRIES {
            state = on_boot(&state, Slot::A);
            if state.step == Step::BootRescueOnce {
                state = state.at(Step::RebootToRescue);
            }
        }
        assert_eq!(state.step, Step::Abandon);
        assert!(state.failure.is_some());
    }

    #[test]
    fn operator_rollback_goes_to_old_os_before_wipe_and_rescue_after() {
        let state = SwapState::new(plan(), Slot::A).at(Step::InstallRescue);
        assert_eq!(
            request_rollback(&state, "ops").map(|s| s.step),
            Ok(Step::Abandon)
        );
        let state = state.at(Step::Done);
        assert_eq!(
            request_rollback(&state, "ops").map(|s| s.step),
            Ok(Step::RollBack)
        );
        let state = state.at(Step::RolledBack);
        assert!(request_rollback(&state, "ops").is_err());
    }

    #[test]
    fn on_boot_is_idempotent() {
        for step in Step::ALL {
            for slot in Slot::ALL {
                let state = SwapState::new(plan(), Slot::A).at(step);
                let once = on_boot(&state, slot);
                let twice = on_boot(&once, slot);
                // A second call may only count another trial boot, never move elsewhere.
                assert_eq!(once.step, twice.step, "{step:?} on {slot}");
            }
        }
    }

    #[test]
    fn step_names_round_trip() {
        for step in Step::ALL {
            assert_eq!(Step::from_name(step.name()), Some(step));
        }
    }
}
