//! Canary-then-replicate rollouts (brief 003): a pure state machine, no I/O, no clock.
//!
//! A [`Rollout`] moves one bundle to a set of target nodes in waves: for each site, in the
//! order the sites first appear among the targets, a canary wave (the site's first eligible
//! node), then a wave with the rest of that site. The next wave starts only when every node of
//! the current one has settled: reported healthy, or failed and been rolled back.
//!
//! - Every failed node is rolled back at once ([`Action::RollBack`]).
//! - A failed canary halts the rollout whatever the threshold: the canary is the test.
//! - Failures past [`RolloutOptions::failure_threshold`] halt the rollout. Failures within it
//!   are tolerated: the node is rolled back and its wave can still advance.
//! - A node running a newer version than the bundle's is skipped (never offered) unless
//!   [`RolloutOptions::downgrade`] is set; a node already running the bundle's version is
//!   skipped too. Both show in [`RolloutStatus::skipped`] with the reason.
//!
//! The caller owns the I/O: feed an event ([`Rollout::on_node_report`], [`Rollout::pause`],
//! [`Rollout::resume`], [`Rollout::abort`]) and persist the rollout (it is `serde`), then take
//! [`Rollout::next_actions`], carry them out, and persist again. Each action is returned once,
//! but the actions an event causes are part of the persisted state until taken, so a rollout
//! restored after a crash before the second write returns them again; offers and roll-backs
//! are idempotent, so doing one twice is harmless.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;

use proto::version::compare_versions;
use serde::{Deserialize, Serialize};

use crate::policy::BundleRef;

/// One node a rollout targets.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    /// Node id.
    pub node: String,
    /// The node's site.
    pub site: String,
}

impl Target {
    /// `node` in `site`.
    pub fn new(node: impl Into<String>, site: impl Into<String>) -> Self {
        Self {
            node: node.into(),
            site: site.into(),
        }
    }
}

/// How many failed nodes a rollout tolerates before it halts.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailureThreshold {
    /// Halt when more than this many nodes failed (0: the first failure halts).
    Count(u32),
    /// Halt when more than this fraction (0.0–1.0) of the nodes to be offered failed, rounded
    /// down to whole nodes.
    Fraction(f64),
}

/// How a rollout behaves.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct RolloutOptions {
    /// Failures tolerated outside canary waves.
    pub failure_threshold: FailureThreshold,
    /// Offer the bundle to nodes running a newer version too.
    pub downgrade: bool,
}

impl Default for RolloutOptions {
    /// The first failure halts; never downgrade.
    fn default() -> Self {
        Self {
            failure_threshold: FailureThreshold::Count(0),
            downgrade: false,
        }
    }
}

/// What the origin must do next.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "kebab-case")]
pub enum Action {
    /// Make `bundle` the node's desired version.
    Offer {
        /// The node.
        node: String,
        /// The bundle to run.
        bundle: BundleRef,
    },
    /// Make the version the node ran before the rollout its desired version again.
    RollBack {
        /// The node.
        node: String,
        /// The version it ran before (`None`: it did not run this bundle; remove it).
        to_version: Option<String>,
    },
    /// Every wave settled: the rollout is complete.
    Done,
    /// The rollout stopped; no node will be offered the bundle any more.
    Halted {
        /// Why.
        reason: HaltReason,
    },
}

/// What a node reports after it was offered the bundle.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "report", rename_all = "kebab-case")]
pub enum NodeReport {
    /// The node runs the bundle and passed its health check.
    Healthy,
    /// The node could not install or run the bundle.
    Failed {
        /// What went wrong, in the node's words.
        reason: String,
    },
}

/// Why a rollout halted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "why", rename_all = "kebab-case")]
pub enum HaltReason {
    /// A site's canary failed.
    CanaryFailed {
        /// The canary.
        node: String,
        /// Its site.
        site: String,
        /// What it reported.
        reason: String,
    },
    /// More nodes failed than the threshold allows.
    TooManyFailures {
        /// Nodes that failed so far.
        failed: u32,
        /// Failures the threshold allows.
        allowed: u32,
        /// The node whose failure crossed the threshold.
        node: String,
        /// What it reported.
        reason: String,
    },
    /// An operator aborted it.
    Aborted,
}

impl fmt::Display for HaltReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HaltReason::CanaryFailed { node, site, reason } => {
                write!(f, "canary {node} of site {site} failed: {reason}")
            }
            HaltReason::TooManyFailures {
                failed,
                allowed,
                node,
                reason,
            } => write!(
                f,
                "{failed} node(s) failed, more than the {allowed} allowed; the last was {node}: {reason}"
            ),
            HaltReason::Aborted => f.write_str("aborted by an operator"),
        }
    }
}

/// Where a rollout stands.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "kebab-case")]
pub enum Phase {
    /// Offering waves.
    Running,
    /// No new wave starts until resumed; reports are still taken.
    Paused,
    /// Stopped for good.
    Halted {
        /// Why.
        reason: HaltReason,
    },
    /// Every wave settled.
    Done,
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Phase::Running => f.write_str("running"),
            Phase::Paused => f.write_str("paused"),
            Phase::Halted { reason } => write!(f, "halted: {reason}"),
            Phase::Done => f.write_str("done"),
        }
    }
}

/// Whether a wave is a site's canary or the rest of the site.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WaveKind {
    /// One node, first in its site.
    Canary,
    /// The site's other eligible nodes.
    Rest,
}

/// One node's progress.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum NodeState {
    /// Its wave has not started.
    Pending,
    /// Offered the bundle; no report yet.
    Offered,
    /// Runs the bundle and reported healthy.
    Healthy,
    /// Reported a failure and was rolled back.
    Failed {
        /// What it reported.
        reason: String,
    },
    /// Never offered.
    Skipped {
        /// Why.
        reason: SkipReason,
    },
}

/// Why a node is not part of any wave.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "because", rename_all = "kebab-case")]
pub enum SkipReason {
    /// It already runs the bundle's version.
    AlreadyCurrent,
    /// It runs a newer version and the rollout does not downgrade.
    WouldDowngrade {
        /// The version it runs.
        running: String,
    },
}

impl fmt::Display for NodeState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NodeState::Pending => f.write_str("pending"),
            NodeState::Offered => f.write_str("offered"),
            NodeState::Healthy => f.write_str("healthy"),
            NodeState::Failed { reason } => write!(f, "failed, rolled back: {reason}"),
            NodeState::Skipped {
                reason: SkipReason::AlreadyCurrent,
            } => f.write_str("skipped: already runs this version"),
            NodeState::Skipped {
                reason: SkipReason::WouldDowngrade { running },
            } => write!(f, "skipped: runs newer {running} (no downgrade)"),
        }
    }
}

/// A request the rollout cannot take in its current state.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum RolloutError {
    /// No target nodes.
    #[error("the rollout has no target nodes; check the selector")]
    NoTargets,
    /// A node is listed twice.
    #[error("node {node} is listed twice among the targets")]
    DuplicateNode {
        /// The node.
        node: String,
    },
    /// A failure fraction outside 0.0–1.0.
    #[error("failure threshold {fraction} is not a fraction between 0 and 1")]
    BadFraction {
        /// The fraction given.
        fraction: f64,
    },
    /// A report from a node the rollout does not target.
    #[error("node {node} is not part of this rollout")]
    UnknownNode {
        /// The node.
        node: String,
    },
    /// A report from a node that is not waiting for one.
    #[error("node {node} reported, but it is {state}; only offered nodes report")]
    UnexpectedReport {
        /// The node.
        node: String,
        /// Its state.
        state: NodeState,
    },
    /// `pause` or `resume` in a phase that has no such step.
    #[error("cannot {request} a rollout that is {phase}")]
    WrongPhase {
        /// `pause`, `resume` or `abort`.
        request: &'static str,
        /// The rollout's phase.
        phase: Phase,
    },
}

/// A rollout in progress. Serialize it to persist it; deserialize it to resume.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    bundle: BundleRef,
    options: RolloutOptions,
    /// Every target, in the order given.
    nodes: Vec<NodeRecord>,
    waves: Vec<Wave>,
    /// The wave being run; `waves.len()` once all ran.
    current_wave: usize,
    /// True once the current wave's offers went out.
    wave_started: bool,
    phase: Phase,
    allowed_failures: u32,
    failures: u32,
    /// Actions not yet returned by `next_actions`. At most two per node plus one.
    outbox: VecDeque<Action>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct NodeRecord {
    node: String,
    site: String,
    previous_version: Option<String>,
    state: NodeState,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Wave {
    site: String,
    kind: WaveKind,
    /// Indexes into `Rollout::nodes`.
    nodes: Vec<usize>,
}

impl Rollout {
    /// Plans a rollout of `bundle` to `targets`.
    ///
    /// `current_versions` maps a node to the version of `bundle.name` it runs now; a node
    /// missing from it does not run the bundle and is always offered.
    pub fn new(
        bundle: BundleRef,
        targets: Vec<Target>,
        current_versions: &BTreeMap<String, String>,
        options: RolloutOptions,
    ) -> Result<Self, RolloutError> {
        if targets.is_empty() {
            return Err(RolloutError::NoTargets);
        }
        if let FailureThreshold::Fraction(fraction) = options.failure_threshold {
            if !(0.0..=1.0).contains(&fraction) {
                return Err(RolloutError::BadFraction { fraction });
            }
        }
        let mut seen = BTreeSet::new();
        let mut sites: Vec<String> = Vec::new();
        let mut nodes = Vec::with_capacity(targets.len());
        for target in targets {
            if !seen.insert(target.node.clone()) {
                return Err(RolloutError::DuplicateNode { node: target.node });
            }
            if !sites.contains(&target.site) {
                sites.push(target.site.clone());
            }
            let previous_version = current_versions.get(&target.node).cloned();
            let state = match previous_version.as_deref() {
                Some(running) => match compare_versions(running, &bundle.version) {
                    Ordering::Equal => NodeState::Skipped {
                        reason: SkipReason::AlreadyCurrent,
                    },
                    Ordering::Greater if !options.downgrade => NodeState::Skipped {
                        reason: SkipReason::WouldDowngrade {
                            running: running.to_owned(),
                        },
                    },
                    _ => NodeState::Pending,
                },
                None => NodeState::Pending,
            };
            nodes.push(NodeRecord {
                node: target.node,
                site: target.site,
                previous_version,
                state,
            });
        }

        let mut waves = Vec::new();
        for site in &sites {
            let eligible: Vec<usize> = (0..nodes.len())
                .filter(|&i| nodes[i].site == *site && nodes[i].state == NodeState::Pending)
                .collect();
            let Some((&canary, rest)) = eligible.split_first() else {
                continue;
            };
            waves.push(Wave {
                site: site.clone(),
                kind: WaveKind::Canary,
                nodes: vec![canary],
            });
            if !rest.is_empty() {
                waves.push(Wave {
                    site: site.clone(),
                    kind: WaveKind::Rest,
                    nodes: rest.to_vec(),
                });
            }
        }

        let eligible_count = waves.iter().map(|w| w.nodes.len()).sum::<usize>();
        let allowed_failures = match options.failure_threshold {
            FailureThreshold::Count(count) => count,
            // Truncation is the rounding down the threshold documents.
            FailureThreshold::Fraction(fraction) => (fraction * eligible_count as f64) as u32,
        };
        Ok(Self {
            bundle,
            options,
            nodes,
            waves,
            current_wave: 0,
            wave_started: false,
            phase: Phase::Running,
            allowed_failures,
            failures: 0,
            outbox: VecDeque::new(),
        })
    }

    /// The actions that became due since the last call: offers of the next wave once the
    /// current one settled, roll-backs of failed nodes, and a final `Done` or `Halted`.
    pub fn next_actions(&mut self) -> Vec<Action> {
        self.advance();
        debug_assert!(self.outbox.len() <= 2 * self.nodes.len() + 1);
        self.outbox.drain(..).collect()
    }

    /// Takes a node's report. Failed nodes are rolled back; a failed canary, or a failure past
    /// the threshold, halts the rollout. Repeating a report is harmless.
    pub fn on_node_report(&mut self, node: &str, report: NodeReport) -> Result<(), RolloutError> {
        let index = self
            .nodes
            .iter()
            .position(|record| record.node == node)
            .ok_or_else(|| RolloutError::UnknownNode {
                node: node.to_owned(),
            })?;
        let record = &mut self.nodes[index];
        match (&record.state, report) {
            (NodeState::Offered, NodeReport::Healthy) => {
                record.state = NodeState::Healthy;
            }
            (NodeState::Offered, NodeReport::Failed { reason }) => {
                record.state = NodeState::Failed {
                    reason: reason.clone(),
                };
                self.outbox.push_back(Action::RollBack {
                    node: record.node.clone(),
                    to_version: record.previous_version.clone(),
                });
                self.failures += 1;
                let site = record.site.clone();
                self.on_failure(index, site, reason);
            }
            (NodeState::Healthy, NodeReport::Healthy)
            | (NodeState::Failed { .. }, NodeReport::Failed { .. }) => {}
            (state, _) => {
                return Err(RolloutError::UnexpectedReport {
                    node: node.to_owned(),
                    state: state.clone(),
                })
            }
        }
        Ok(())
    }

    /// Starts no new wave until [`Rollout::resume`]; nodes already offered still report.
    pub fn pause(&mut self) -> Result<(), RolloutError> {
        match self.phase {
            Phase::Running => {
                self.phase = Phase::Paused;
                Ok(())
            }
            _ => Err(self.wrong_phase("pause")),
        }
    }

    /// Lets a paused rollout start waves again.
    pub fn resume(&mut self) -> Result<(), RolloutError> {
        match self.phase {
            Phase::Paused => {
                self.phase = Phase::Running;
                Ok(())
            }
            _ => Err(self.wrong_phase("resume")),
        }
    }

    /// Stops the rollout for good. Nodes keep what they run; nodes already offered still report,
    /// and those that fail are still rolled back.
    pub fn abort(&mut self) -> Result<(), RolloutError> {
        match self.phase {
            Phase::Running | Phase::Paused => {
                self.halt(HaltReason::Aborted);
                Ok(())
            }
            _ => Err(self.wrong_phase("abort")),
        }
    }

    /// The nodes offered the bundle that have not reported: after a restart or a takeover,
    /// their swaps may have ended, be under way or never have started.
    pub fn in_flight(&self) -> Vec<String> {
        self.nodes
            .iter()
            .filter(|record| record.state == NodeState::Offered)
            .map(|record| record.node.clone())
            .collect()
    }

    /// True while the rollout needs a driver: running, paused, or halted with offers out.
    pub fn active(&self) -> bool {
        matches!(self.phase, Phase::Running | Phase::Paused)
            || self.nodes.iter().any(|r| r.state == NodeState::Offered)
    }

    /// The bundle being rolled out.
    pub fn bundle(&self) -> &BundleRef {
        &self.bundle
    }

    /// The phase: running, paused, halted (with why) or done.
    pub fn phase(&self) -> &Phase {
        &self.phase
    }

    /// Every wave with its nodes' states, the skipped nodes, and why the rollout halted.
    pub fn status(&self) -> RolloutStatus {
        let node_status = |index: usize| {
            let record = &self.nodes[index];
            NodeStatus {
                node: record.node.clone(),
                site: record.site.clone(),
                previous_version: record.previous_version.clone(),
                state: record.state.clone(),
            }
        };
        RolloutStatus {
            bundle: self.bundle.clone(),
            phase: self.phase.clone(),
            options: self.options,
            current_wave: (self.wave_started && self.current_wave < self.waves.len())
                .then_some(self.current_wave),
            waves: self
                .waves
                .iter()
                .enumerate()
                .map(|(index, wave)| WaveStatus {
                    index,
                    site: wave.site.clone(),
                    kind: wave.kind,
                    nodes: wave.nodes.iter().map(|&i| node_status(i)).collect(),
                })
                .collect(),
            skipped: (0..self.nodes.len())
                .filter(|&i| matches!(self.nodes[i].state, NodeState::Skipped { .. }))
                .map(node_status)
                .collect(),
            failed: self.failures,
            allowed_failures: self.allowed_failures,
        }
    }

    /// Starts waves while the current one has settled and the rollout runs.
    fn advance(&mut self) {
        while self.phase == Phase::Running {
            let Some(wave) = self.waves.get(self.current_wave) else {
                self.phase = Phase::Done;
                self.outbox.push_back(Action::Done);
                return;
            };
            if !self.wave_started {
                for &index in &wave.nodes {
                    let record = &mut self.nodes[index];
                    debug_assert_eq!(record.state, NodeState::Pending);
                    record.state = NodeState::Offered;
                    self.outbox.push_back(Action::Offer {
                        node: record.node.clone(),
                        bundle: self.bundle.clone(),
                    });
                }
                self.wave_started = true;
                return;
            }
            let settled = wave.nodes.iter().all(|&index| {
                matches!(
                    self.nodes[index].state,
                    NodeState::Healthy | NodeState::Failed { .. }
                )
            });
            if !settled {
                return;
            }
            self.current_wave += 1;
            self.wave_started = false;
        }
    }

    /// Halts on a failed canary or a failure past the threshold, unless already stopped.
    fn on_failure(&mut self, index: usize, site: String, reason: String) {
        if !matches!(self.phase, Phase::Running | Phase::Paused) {
            return;
        }
        let in_canary = self
            .waves
            .iter()
            .any(|wave| wave.kind == WaveKind::Canary && wave.nodes.contains(&index));
        let node = self.nodes[index].node.clone();
        if in_canary {
            self.halt(HaltReason::CanaryFailed { node, site, reason });
        } else if self.failures > self.allowed_failures {
            self.halt(HaltReason::TooManyFailures {
                failed: self.failures,
                allowed: self.allowed_failures,
                node,
                reason,
            });
        }
    }

    fn halt(&mut self, reason: HaltReason) {
        self.phase = Phase::Halted {
            reason: reason.clone(),
        };
        self.outbox.push_back(Action::Halted { reason });
    }

    fn wrong_phase(&self, request: &'static str) -> RolloutError {
        RolloutError::WrongPhase {
            request,
            phase: self.phase.clone(),
        }
    }
}

/// A rollout's state for `origin rollout status`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RolloutStatus {
    /// The bundle.
    pub bundle: BundleRef,
    /// Running, paused, halted (with why) or done.
    pub phase: Phase,
    /// The options it was started with.
    pub options: RolloutOptions,
    /// The wave whose offers are out (`None` before the first and after the last).
    pub current_wave: Option<usize>,
    /// Every wave in order.
    pub waves: Vec<WaveStatus>,
    /// Targets never offered, with the reason.
    pub skipped: Vec<NodeStatus>,
    /// Nodes that failed so far.
    pub failed: u32,
    /// Failures the threshold allows outside canary waves.
    pub allowed_failures: u32,
}

/// One wave in a [`RolloutStatus`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WaveStatus {
    /// Position, from 0.
    pub index: usize,
    /// The site.
    pub site: String,
    /// Canary or the rest of the site.
    pub kind: WaveKind,
    /// Its nodes.
    pub nodes: Vec<NodeStatus>,
}

/// One node in a [`RolloutStatus`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// The node.
    pub node: String,
    /// Its site.
    pub site: String,
    /// The version it ran when the rollout started.
    pub previous_version: Option<String>,
    /// Where it stands.
    pub state: NodeState,
}

impl RolloutStatus {
    /// The status of `node`, wherever it is.
    pub fn node(&self, node: &str) -> Option<&NodeStatus> {
        self.waves
            .iter()
            .flat_map(|wave| &wave.nodes)
            .chain(&self.skipped)
            .find(|status| status.node == node)
    }
}

impl fmt::Display for RolloutStatus {
    /// The phase and why, then one line per node grouped by wave.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "rollout of {}: {}", self.bundle, self.phase)?;
        writeln!(
            f,
            "failures: {} (allowed outside canaries: {})",
            self.failed, self.allowed_failures
        )?;
        for wave in &self.waves {
            let kind = match wave.kind {
                WaveKind::Canary => "canary",
                WaveKind::Rest => "rest",
            };
            let marker = if self.current_wave == Some(wave.index) {
                "  <- current"
            } else {
                ""
            };
            writeln!(
                f,
                "wave {} ({kind}, site {}){marker}",
                wave.index, wave.site
            )?;
            for node in &wave.nodes {
                write_node(f, node)?;
            }
        }
        if !self.skipped.is_empty() {
            writeln!(f, "skipped")?;
            for node in &self.skipped {
                write_node(f, node)?;
            }
        }
        Ok(())
    }
}

fn write_node(f: &mut fmt::Formatter<'_>, node: &NodeStatus) -> fmt::Result {
    writeln!(
        f,
        "  {}  (was {})  {}",
        node.node,
        node.previous_version.as_deref().unwrap_or("-"),
        node.state
    )
}
