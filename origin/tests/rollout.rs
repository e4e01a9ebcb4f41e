//! The rollout state machine: waves, halts, roll-backs, pause/resume/abort, never-downgrade,
//! and resuming from a persisted copy. Scenarios are tables of events and the actions each
//! must produce.

use std::collections::BTreeMap;

use origin::policy::BundleRef;
use origin::rollout::plan::{
    Action, FailureThreshold, HaltReason, NodeReport, NodeState, Phase, Rollout, RolloutError,
    RolloutOptions, SkipReason, Target, WaveKind,
};

/// Something that happens to a rollout, after which the test takes `next_actions`.
#[derive(Clone, Debug)]
enum Event {
    Poll,
    Healthy(&'static str),
    Failed(&'static str, &'static str),
    Pause,
    Resume,
    Abort,
}

fn new_os() -> BundleRef {
    BundleRef::new("os", "2.0")
}

/// Two sites, four nodes each, all running os 1.0.
fn two_sites() -> (Vec<Target>, BTreeMap<String, String>) {
    let mut targets = Vec::new();
    let mut versions = BTreeMap::new();
    for site in ["a", "b"] {
        for i in 1..=4 {
            let node = format!("{site}{i}");
            versions.insert(node.clone(), "1.0".to_owned());
            targets.push(Target::new(node, site));
        }
    }
    (targets, versions)
}

fn rollout_with(options: RolloutOptions) -> Rollout {
    let (targets, versions) = two_sites();
    Rollout::new(new_os(), targets, &versions, options).expect("valid rollout")
}

fn offer(nodes: &[&str]) -> Vec<Action> {
    nodes
        .iter()
        .map(|node| Action::Offer {
            node: (*node).to_owned(),
            bundle: new_os(),
        })
        .collect()
}

fn roll_back(node: &str) -> Action {
    Action::RollBack {
        node: node.to_owned(),
        to_version: Some("1.0".to_owned()),
    }
}

fn apply(rollout: &mut Rollout, event: &Event) -> Result<Vec<Action>, RolloutError> {
    match event {
        Event::Poll => {}
        Event::Healthy(node) => rollout.on_node_report(node, NodeReport::Healthy)?,
        Event::Failed(node, reason) => rollout.on_node_report(
            node,
            NodeReport::Failed {
                reason: (*reason).to_owned(),
            },
        )?,
        Event::Pause => rollout.pause()?,
        Event::Resume => rollout.resume()?,
        Event::Abort => rollout.abort()?,
    }
    Ok(rollout.next_actions())
}

/// Runs `steps`, checking the actions after each event.
fn run(rollout: &mut Rollout, steps: &[(Event, Vec<Action>)]) {
    for (index, (event, expected)) in steps.iter().enumerate() {
        let actions = apply(rollout, event)
            .unwrap_or_else(|e| panic!("step {index} ({event:?}) was refused: {e}"));
        assert_eq!(&actions, expected, "step {index}: {event:?}");
    }
}

fn state_of(rollout: &Rollout, node: &str) -> NodeState {
    rollout
        .status()
        .node(node)
        .unwrap_or_else(|| panic!("{node} in status"))
        .state
        .clone()
}

#[test]
fn waves_run_canary_then_rest_site_by_site() {
    use Event::*;
    let mut rollout = rollout_with(RolloutOptions::default());
    let status = rollout.status();
    let waves: Vec<(String, WaveKind, Vec<String>)> = status
        .waves
        .iter()
        .map(|w| {
            (
                w.site.clone(),
                w.kind,
                w.nodes.iter().map(|n| n.node.clone()).collect(),
            )
        })
        .collect();
    let names = |nodes: &[&str]| nodes.iter().map(|n| n.to_string()).collect::<Vec<_>>();
    assert_eq!(
        waves,
        [
            ("a".into(), WaveKind::Canary, names(&["a1"])),
            ("a".into(), WaveKind::Rest, names(&["a2", "a3", "a4"])),
            ("b".into(), WaveKind::Canary, names(&["b1"])),
            ("b".into(), WaveKind::Rest, names(&["b2", "b3", "b4"])),
        ]
    );
    run(
        &mut rollout,
        &[
            (Poll, offer(&["a1"])),
            (Poll, vec![]),
            (Healthy("a1"), offer(&["a2", "a3", "a4"])),
            (Healthy("a3"), vec![]),
            (Healthy("a2"), vec![]),
            // A repeated report changes nothing.
            (Healthy("a2"), vec![]),
            (Healthy("a4"), offer(&["b1"])),
            (Healthy("b1"), offer(&["b2", "b3", "b4"])),
            (Healthy("b2"), vec![]),
            (Healthy("b3"), vec![]),
            (Healthy("b4"), vec![Action::Done]),
            (Poll, vec![]),
        ],
    );
    assert_eq!(rollout.phase(), &Phase::Done);
}

#[test]
fn a_failed_canary_in_site_two_halts_and_rolls_back_only_that_canary() {
    use Event::*;
    let mut rollout = rollout_with(RolloutOptions::default());
    let why = HaltReason::CanaryFailed {
        node: "b1".into(),
        site: "b".into(),
        reason: "health check: sshd did not start".into(),
    };
    run(
        &mut rollout,
        &[
            (Poll, offer(&["a1"])),
            (Healthy("a1"), offer(&["a2", "a3", "a4"])),
            (Healthy("a2"), vec![]),
            (Healthy("a3"), vec![]),
            (Healthy("a4"), offer(&["b1"])),
            (
                Failed("b1", "health check: sshd did not start"),
                vec![
                    roll_back("b1"),
                    Action::Halted {
                        reason: why.clone(),
                    },
                ],
            ),
            (Poll, vec![]),
        ],
    );

    let status = rollout.status();
    assert_eq!(status.phase, Phase::Halted { reason: why });
    for node in ["a1", "a2", "a3", "a4"] {
        assert_eq!(
            state_of(&rollout, node),
            NodeState::Healthy,
            "{node} keeps 2.0"
        );
    }
    assert_eq!(
        state_of(&rollout, "b1"),
        NodeState::Failed {
            reason: "health check: sshd did not start".into()
        }
    );
    for node in ["b2", "b3", "b4"] {
        assert_eq!(
            state_of(&rollout, node),
            NodeState::Pending,
            "{node} never offered"
        );
    }
    let shown = status.to_string();
    assert!(
        shown.contains("halted: canary b1 of site b failed: health check: sshd did not start"),
        "{shown}"
    );
    // Halted is final: nothing can restart it.
    assert!(rollout.resume().is_err());
    assert!(rollout.pause().is_err());
    assert!(rollout.abort().is_err());
}

#[test]
fn failures_within_the_threshold_are_rolled_back_and_tolerated() {
    use Event::*;
    // (threshold, allowed failures for 8 nodes)
    let thresholds = [
        (FailureThreshold::Count(1), 1),
        (FailureThreshold::Fraction(0.125), 1),
        (FailureThreshold::Fraction(0.2), 1),
    ];
    for (threshold, allowed) in thresholds {
        let mut rollout = rollout_with(RolloutOptions {
            failure_threshold: threshold,
            downgrade: false,
        });
        assert_eq!(rollout.status().allowed_failures, allowed, "{threshold:?}");
        run(
            &mut rollout,
            &[
                (Poll, offer(&["a1"])),
                (Healthy("a1"), offer(&["a2", "a3", "a4"])),
                (Failed("a3", "disk full"), vec![roll_back("a3")]),
                (Healthy("a2"), vec![]),
                // The wave settles with a3 rolled back, and the rollout goes on.
                (Healthy("a4"), offer(&["b1"])),
                (Healthy("b1"), offer(&["b2", "b3", "b4"])),
                (
                    Failed("b4", "kernel panic"),
                    vec![
                        roll_back("b4"),
                        Action::Halted {
                            reason: HaltReason::TooManyFailures {
                                failed: 2,
                                allowed: 1,
                                node: "b4".into(),
                                reason: "kernel panic".into(),
                            },
                        },
                    ],
                ),
                // Nodes already offered still report; failures are still rolled back.
                (Healthy("b2"), vec![]),
                (Failed("b3", "timeout"), vec![roll_back("b3")]),
            ],
        );
        assert_eq!(state_of(&rollout, "b2"), NodeState::Healthy);
    }
}

#[test]
fn a_failed_canary_halts_whatever_the_threshold() {
    use Event::*;
    let mut rollout = rollout_with(RolloutOptions {
        failure_threshold: FailureThreshold::Fraction(1.0),
        downgrade: false,
    });
    run(
        &mut rollout,
        &[
            (Poll, offer(&["a1"])),
            (
                Failed("a1", "no boot"),
                vec![
                    roll_back("a1"),
                    Action::Halted {
                        reason: HaltReason::CanaryFailed {
                            node: "a1".into(),
                            site: "a".into(),
                            reason: "no boot".into(),
                        },
                    },
                ],
            ),
        ],
    );
}

#[test]
fn pause_holds_the_next_wave_and_resume_releases_it() {
    use Event::*;
    let mut rollout = rollout_with(RolloutOptions::default());
    run(
        &mut rollout,
        &[
            (Poll, offer(&["a1"])),
            (Pause, vec![]),
            // Offered nodes still report while paused; the next wave waits.
            (Healthy("a1"), vec![]),
            (Poll, vec![]),
            (Resume, offer(&["a2", "a3", "a4"])),
            (Pause, vec![]),
        ],
    );
    assert_eq!(rollout.phase(), &Phase::Paused);
    assert!(matches!(
        rollout.pause(),
        Err(RolloutError::WrongPhase {
            request: "pause",
            ..
        })
    ));
    // A failure while paused still halts and rolls back.
    run(
        &mut rollout,
        &[(
            Failed("a2", "bad"),
            vec![
                roll_back("a2"),
                Action::Halted {
                    reason: HaltReason::TooManyFailures {
                        failed: 1,
                        allowed: 0,
                        node: "a2".into(),
                        reason: "bad".into(),
                    },
                },
            ],
        )],
    );
    assert!(rollout.resume().is_err());

    let mut running = rollout_with(RolloutOptions::default());
    assert!(matches!(
        running.resume(),
        Err(RolloutError::WrongPhase {
            request: "resume",
            ..
        })
    ));
}

#[test]
fn abort_stops_offering_but_still_takes_reports() {
    use Event::*;
    let mut rollout = rollout_with(RolloutOptions::default());
    run(
        &mut rollout,
        &[
            (Poll, offer(&["a1"])),
            (Healthy("a1"), offer(&["a2", "a3", "a4"])),
            (
                Abort,
                vec![Action::Halted {
                    reason: HaltReason::Aborted,
                }],
            ),
            (Healthy("a2"), vec![]),
            (Healthy("a3"), vec![]),
            (Failed("a4", "late failure"), vec![roll_back("a4")]),
            (Poll, vec![]),
        ],
    );
    assert_eq!(
        rollout.phase(),
        &Phase::Halted {
            reason: HaltReason::Aborted
        }
    );
    assert_eq!(
        state_of(&rollout, "a1"),
        NodeState::Healthy,
        "nodes keep what they run"
    );
    assert_eq!(state_of(&rollout, "b1"), NodeState::Pending);
    assert!(rollout
        .status()
        .to_string()
        .contains("aborted by an operator"));
    assert!(rollout.abort().is_err());
}

#[test]
fn nodes_are_never_offered_an_older_version_unless_the_rollout_downgrades() {
    // (downgrade, expected states of a1..a4, expected canary of site a)
    let skipped = |reason| NodeState::Skipped { reason };
    let newer = || {
        skipped(SkipReason::WouldDowngrade {
            running: "10.0".into(),
        })
    };
    let cases = [
        (
            false,
            [
                newer(),
                skipped(SkipReason::AlreadyCurrent),
                NodeState::Offered,
                NodeState::Pending,
            ],
            "a3",
        ),
        (
            true,
            [
                NodeState::Offered,
                skipped(SkipReason::AlreadyCurrent),
                NodeState::Pending,
                NodeState::Pending,
            ],
            "a1",
        ),
    ];
    for (downgrade, states, canary) in cases {
        let targets: Vec<Target> = ["a1", "a2", "a3", "a4", "b1"]
            .iter()
            .map(|n| Target::new(*n, &n[..1]))
            .collect();
        // a1 runs 10.0 (newer than 9.0 numerically, older as text), a2 the same version, a3
        // an older one, a4 none at all; b1 runs a newer version too.
        let versions: BTreeMap<String, String> =
            [("a1", "10.0"), ("a2", "9.0"), ("a3", "8.5"), ("b1", "9.1")]
                .into_iter()
                .map(|(n, v)| (n.to_owned(), v.to_owned()))
                .collect();
        let bundle = BundleRef::new("os", "9.0");
        let mut rollout = Rollout::new(
            bundle.clone(),
            targets,
            &versions,
            RolloutOptions {
                failure_threshold: FailureThreshold::Count(0),
                downgrade,
            },
        )
        .expect("valid");
        assert_eq!(
            rollout.next_actions(),
            [Action::Offer {
                node: canary.into(),
                bundle
            }],
            "downgrade {downgrade}"
        );
        for (node, state) in ["a1", "a2", "a3", "a4"].iter().zip(states) {
            assert_eq!(
                state_of(&rollout, node),
                state,
                "downgrade {downgrade}: {node}"
            );
        }
        let site_b_waves = rollout
            .status()
            .waves
            .iter()
            .filter(|w| w.site == "b")
            .count();
        assert_eq!(site_b_waves, usize::from(downgrade), "b1 runs 9.1");
        if !downgrade {
            let shown = rollout.status().to_string();
            assert!(
                shown.contains("skipped: runs newer 10.0 (no downgrade)"),
                "{shown}"
            );
        }
    }
}

#[test]
fn a_persisted_rollout_resumes_identically() {
    use Event::*;
    let mut original = rollout_with(RolloutOptions {
        failure_threshold: FailureThreshold::Count(1),
        downgrade: false,
    });
    run(
        &mut original,
        &[
            (Poll, offer(&["a1"])),
            (Healthy("a1"), offer(&["a2", "a3", "a4"])),
            (Healthy("a2"), vec![]),
            (Failed("a3", "disk full"), vec![roll_back("a3")]),
            (Pause, vec![]),
        ],
    );
    // An event whose actions were not taken before the "crash": they must come back.
    original
        .on_node_report("a4", NodeReport::Healthy)
        .expect("a4 reports");
    let persisted = serde_json::to_string(&original).expect("serializes");
    let mut restored: Rollout = serde_json::from_str(&persisted).expect("deserializes");
    assert_eq!(restored, original);
    assert_eq!(restored.status(), original.status());

    let rest = [
        Resume,
        Healthy("b1"),
        Failed("b2", "no network"),
        Healthy("b3"),
        Healthy("b4"),
        Poll,
    ];
    let mut all_actions = Vec::new();
    for event in &rest {
        let from_original = apply(&mut original, event).expect("original takes it");
        let from_restored = apply(&mut restored, event).expect("restored takes it");
        assert_eq!(from_restored, from_original, "{event:?}");
        all_actions.extend(from_restored);
    }
    assert_eq!(restored, original);
    assert_eq!(
        all_actions,
        [
            offer(&["b1"]),
            offer(&["b2", "b3", "b4"]),
            vec![
                roll_back("b2"),
                Action::Halted {
                    reason: HaltReason::TooManyFailures {
                        failed: 2,
                        allowed: 1,
                        node: "b2".into(),
                        reason: "no network".into(),
                    },
                },
            ],
        ]
        .concat()
    );
    let status_json = serde_json::to_string(&restored.status()).expect("status serializes");
    let status_back = serde_json::from_str(&status_json).expect("status deserializes");
    assert_eq!(restored.status(), status_back);
}

#[test]
fn bad_input_is_refused_with_a_reason() {
    let (targets, versions) = two_sites();
    let options = RolloutOptions::default();
    assert_eq!(
        Rollout::new(new_os(), vec![], &versions, options),
        Err(RolloutError::NoTargets)
    );
    let mut twice = targets.clone();
    twice.push(Target::new("a2", "b"));
    assert_eq!(
        Rollout::new(new_os(), twice, &versions, options),
        Err(RolloutError::DuplicateNode { node: "a2".into() })
    );
    for fraction in [-0.1, 1.5, f64::NAN] {
        let bad = RolloutOptions {
            failure_threshold: FailureThreshold::Fraction(fraction),
            downgrade: false,
        };
        assert!(matches!(
            Rollout::new(new_os(), targets.clone(), &versions, bad),
            Err(RolloutError::BadFraction { .. })
        ));
    }

    let mut rollout = rollout_with(options);
    rollout.next_actions();
    assert_eq!(
        rollout.on_node_report("z9", NodeReport::Healthy),
        Err(RolloutError::UnknownNode { node: "z9".into() })
    );
    // b2 was never offered: its report is refused, and changes nothing.
    let before = rollout.clone();
    assert!(matches!(
        rollout.on_node_report("b2", NodeReport::Healthy),
        Err(RolloutError::UnexpectedReport { .. })
    ));
    assert_eq!(rollout, before);
}
