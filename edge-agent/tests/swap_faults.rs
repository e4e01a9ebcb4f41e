//! Crash safety: the agent is SIGKILLed before and after every journaled step, and at random
//! points, then power-cycled through the firmware's choice. Every boot must find a complete OS
//! (checked file by file), and every trial must end completed or rolled back on its own.

mod swap_support;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs;
use std::path::Path;
use std::process::Command;

use edge_agent::swap::fault::{CRASH_AFTER_OPS_ENV, CRASH_AT_ENV};
use edge_agent::swap::sim::{self, BootExit, BootRecord};
use edge_agent::swap::{firmware_boot, GrubEnv, Slot, Step};
use rand::{Rng, SeedableRng};
use swap_support::{agent, journal, run_machine, CheckingHooks, Fixture};

/// Kills per randomized trial at most, so that every trial can finish.
const MAX_KILLS_PER_TRIAL: u32 = 3;

/// Highest crash point drawn for a boot (a boot of these tiny bundles passes 20–60 points; a
/// number beyond the boot's last point means no crash in that boot).
const MAX_CRASH_POINT: u64 = 70;

/// Variable that fixes the randomized trials' seed, to reproduce a failure.
const SEED_ENV: &str = "STAGECOACH_TRIAL_SEED";

/// Fails the test at once, saying why, when the agent binary was built without the crash
/// points (the `test-hooks` feature; this crate's dev-dependency on itself turns it on).
fn require_fault_hooks() {
    let output = Command::new(agent())
        .args(["status", "--root", "/nonexistent-stagecoach-machine"])
        .env(CRASH_AT_ENV, "no-such-step:before")
        .output()
        .expect("run the agent");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(CRASH_AT_ENV),
        "{} ignores {CRASH_AT_ENV}: it was built without the `test-hooks` feature; build it with \
         `cargo build --release -p edge-agent --features edge-agent/test-hooks` (`make test` \
         does); its stderr: {stderr}",
        agent().display()
    );
}

fn next_boot(root: &Path) -> Slot {
    let env = GrubEnv::parse(&fs::read(sim::grubenv_path(root)).expect("grubenv")).expect("parse");
    firmware_boot(&env).0
}

fn killed(history: &[BootRecord]) -> u32 {
    history
        .iter()
        .filter(|b| matches!(b.exit, BootExit::Killed(_)))
        .count() as u32
}

/// How a trial ended, as a user would describe it; `Err` when the machine is not in the state
/// its journal claims.
fn outcome(fixture: &Fixture, root: &Path) -> Result<&'static str, String> {
    let state = journal(root);
    let (slot, expect, label) = match state.as_ref().map(|s| s.step) {
        None => (Slot::A, "old", "killed before the journal: old OS kept"),
        Some(Step::Done) => (Slot::A, "new", "completed on the new OS"),
        Some(Step::RolledBack) => (Slot::B, "rescue", "rolled back to the rescue OS"),
        Some(Step::Aborted) => (Slot::A, "old", "aborted: old OS kept"),
        Some(step) => {
            return Err(format!(
                "the machine settled in the middle of the procedure, at {step:?}"
            ))
        }
    };
    if next_boot(root) != slot {
        return Err(format!(
            "{label}, but the firmware's next boot is not slot {slot}"
        ));
    }
    if fixture.check_slot(root, slot)? != expect {
        return Err(format!(
            "{label}, but slot {slot} does not hold the {expect} OS"
        ));
    }
    if label != "aborted: old OS kept"
        && state.is_some()
        && fixture.check_slot(root, Slot::B)? != "rescue"
    {
        return Err(format!("{label}, but slot B lost the rescue OS"));
    }
    Ok(label)
}

struct Scenario {
    name: &'static str,
    /// Failing health checks to inject (`ROOT/health-fails`).
    health_fails: u32,
    /// The steps to crash at, before and after each.
    steps: &'static [Step],
    /// Expected end.
    expect: &'static str,
}

const HEALTHY_PATH: &[Step] = &[
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
    Step::Commit,
];

#[test]
fn crash_before_and_after_every_step_still_boots_a_complete_os_and_finishes() {
    require_fault_hooks();
    let fixture = Fixture::new();
    let scenarios = [
        Scenario {
            name: "healthy target",
            health_fails: 0,
            steps: HEALTHY_PATH,
            expect: "completed on the new OS",
        },
        Scenario {
            name: "target failing every health check",
            health_fails: 99,
            steps: &[Step::HealthCheck, Step::RetryTrial, Step::RollBack],
            expect: "rolled back to the rescue OS",
        },
    ];
    let mut trials = 0;
    for scenario in &scenarios {
        for step in scenario.steps {
            for phase in ["before", "after"] {
                let crash_at = format!("{}:{phase}", step.name());
                let root =
                    fixture.machine(&format!("{}-{crash_at}", scenario.name.replace(' ', "-")));
                fs::write(root.join("health-fails"), scenario.health_fails.to_string())
                    .expect("write");
                let mut hooks = CheckingHooks::new(&fixture, &root);
                let armed = crash_at.clone();
                hooks.env = Box::new(move |_, history| {
                    if killed(history) == 0 {
                        vec![(CRASH_AT_ENV.to_owned(), armed.clone())]
                    } else {
                        Vec::new()
                    }
                });
                let boots = run_machine(&root, fixture.swap_args(&fixture.target), &mut hooks)
                    .unwrap_or_else(|e| panic!("{} / {crash_at}: {e}", scenario.name));
                assert!(
                    hooks.problems.is_empty(),
                    "{} / {crash_at}: {:?}",
                    scenario.name,
                    hooks.problems
                );
                assert_eq!(
                    killed(&boots),
                    1,
                    "{} / {crash_at}: the crash point was never reached",
                    scenario.name
                );
                assert_eq!(
                    outcome(&fixture, &root),
                    Ok(scenario.expect),
                    "{} / {crash_at}",
                    scenario.name
                );
                trials += 1;
            }
        }
    }

    // The operator's rollback, after the commit and before the wipe.
    for (step, before_wipe) in [
        (Step::RollBack, false),
        (Step::RebootAfterRollback, false),
        (Step::Abandon, true),
    ] {
        for phase in ["before", "after"] {
            let crash_at = format!("{}:{phase}", step.name());
            let root = fixture.machine(&format!("rollback-{crash_at}"));
            if before_wipe {
                // A swap that died as it was about to boot the rescue.
                let status = Command::new(agent())
                    .args(fixture.swap_args(&fixture.target))
                    .args([
                        "--root".as_ref(),
                        root.as_os_str(),
                        "--booted-slot".as_ref(),
                        "A".as_ref(),
                    ])
                    .env(CRASH_AT_ENV, "boot-rescue-once:before")
                    .status()
                    .expect("run");
                assert_eq!(status.code(), None, "killed");
            } else {
                run_machine(&root, fixture.swap_args(&fixture.target), &mut sim::NoHooks)
                    .expect("swap");
                assert_eq!(journal(&root).map(|s| s.step), Some(Step::Done));
            }
            let mut hooks = CheckingHooks::new(&fixture, &root);
            let armed = crash_at.clone();
            hooks.env = Box::new(move |_, history| {
                if killed(history) == 0 {
                    vec![(CRASH_AT_ENV.to_owned(), armed.clone())]
                } else {
                    Vec::new()
                }
            });
            let boots = run_machine(&root, vec![OsString::from("rollback")], &mut hooks)
                .unwrap_or_else(|e| panic!("rollback / {crash_at}: {e}"));
            assert!(
                hooks.problems.is_empty(),
                "rollback / {crash_at}: {:?}",
                hooks.problems
            );
            assert_eq!(
                killed(&boots),
                1,
                "rollback / {crash_at}: the crash point was never reached"
            );
            let expect = if before_wipe {
                "aborted: old OS kept"
            } else {
                "rolled back to the rescue OS"
            };
            assert_eq!(
                outcome(&fixture, &root),
                Ok(expect),
                "rollback / {crash_at}"
            );
            trials += 1;
        }
    }
    println!("{trials} crash trials, every one booted a complete OS at every boot and settled as expected");
}

fn randomized_trials(trials: u32) {
    require_fault_hooks();
    let seed: u64 = match std::env::var(SEED_ENV) {
        Ok(text) => text.parse().expect("STAGECOACH_TRIAL_SEED is a u64"),
        Err(_) => rand::random(),
    };
    println!(
        "randomized crash trials: {trials} trials, seed {seed} (rerun with {SEED_ENV}={seed})"
    );
    let fixture = Fixture::new();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut outcomes: BTreeMap<&'static str, u32> = BTreeMap::new();
    let mut total_kills = 0;
    let mut total_boots = 0;
    let started = std::time::Instant::now();
    for trial in 0..trials {
        let trial_seed: u64 = rng.gen();
        let mut trial_rng = rand::rngs::StdRng::seed_from_u64(trial_seed);
        let health_fails: u32 = match trial_rng.gen_range(0..100) {
            0..=54 => 0,
            55..=69 => 1,
            70..=79 => 2,
            _ => 99,
        };
        let root = fixture.machine("random");
        fs::write(root.join("health-fails"), health_fails.to_string()).expect("write");
        let mut hooks = CheckingHooks::new(&fixture, &root);
        let mut kill_rng = rand::rngs::StdRng::seed_from_u64(trial_rng.gen());
        hooks.env = Box::new(move |_, history| {
            if killed(history) < MAX_KILLS_PER_TRIAL && kill_rng.gen_bool(0.6) {
                let point = kill_rng.gen_range(1..=MAX_CRASH_POINT);
                vec![(CRASH_AFTER_OPS_ENV.to_owned(), point.to_string())]
            } else {
                Vec::new()
            }
        });
        let context = format!(
            "trial {trial} (seed {seed}, trial seed {trial_seed}, health fails {health_fails})"
        );
        let boots = run_machine(&root, fixture.swap_args(&fixture.target), &mut hooks)
            .unwrap_or_else(|e| panic!("{context}: {e}"));
        assert!(hooks.problems.is_empty(), "{context}: {:?}", hooks.problems);
        assert!(
            matches!(boots.last().map(|b| b.exit), Some(BootExit::Exited(0 | 3))),
            "{context}: the last boot ended {:?}",
            boots.last().map(|b| b.exit)
        );
        let label = outcome(&fixture, &root).unwrap_or_else(|e| panic!("{context}: {e}"));
        *outcomes.entry(label).or_default() += 1;
        total_kills += killed(&boots);
        total_boots += boots.len();
    }
    println!(
        "{trials} trials in {:.1} s: {total_boots} boots, {total_kills} SIGKILLs; every boot found a complete OS",
        started.elapsed().as_secs_f64()
    );
    for (label, count) in &outcomes {
        println!("  {count:5}  {label}");
    }
    let settled: u32 = outcomes
        .iter()
        .filter(|(label, _)| label.starts_with("completed") || label.starts_with("rolled back"))
        .map(|(_, n)| n)
        .sum();
    // Aborting (the rescue lost three boots in a row to kills) is allowed but must stay rare.
    assert!(
        settled * 10 >= trials * 9,
        "too few trials completed or rolled back: {outcomes:?}"
    );
    assert!(
        outcomes
            .get("completed on the new OS")
            .copied()
            .unwrap_or(0)
            > 0,
        "{outcomes:?}"
    );
}

#[test]
fn randomized_crashes_100_trials() {
    randomized_trials(100);
}

/// Run with `cargo test --release -p edge-agent --test swap_faults -- --ignored --nocapture`.
#[test]
#[ignore = "1,000 trials take a few minutes"]
fn randomized_crashes_1000_trials() {
    randomized_trials(1000);
}
