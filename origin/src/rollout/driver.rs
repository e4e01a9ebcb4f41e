//! Runs a [`Rollout`] against the fleet: the I/O half of [`super::plan`].
//!
//! [`run`] takes the state machine's actions and carries them out through a [`Fleet`] (offers
//! of one wave run at once; roll-backs run as they come), feeds every node's report back,
//! saves the rollout after every step (so a restarted origin resumes it), and obeys the
//! operator's [`Control`]s. It returns when the rollout is done, or halted with no offer still
//! out; a halted rollout still waits for the nodes it already offered, so their failures are
//! rolled back and their successes recorded.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;

use super::plan::{Action, NodeReport, Phase, Rollout, RolloutError, RolloutStatus};
use crate::policy::BundleRef;

/// Why a roll-back or a save failed: logged, never fatal to the rollout.
pub type StepError = Box<dyn std::error::Error + Send + Sync>;

/// How the origin moves nodes; implemented over the mesh by the server and by fakes in tests.
pub trait Fleet: Send + Sync + 'static {
    /// Installs `bundle` on `node` (fetch, verify, swap, health check) and says how it went. A
    /// node whose new OS fails its health check rolls itself back and reports `Failed`.
    fn install(&self, node: &str, bundle: &BundleRef) -> impl Future<Output = NodeReport> + Send;

    /// Goes on with an install another driver offered before it stopped (a restart, a
    /// takeover): a swap that already ended must be reported, not run again. By default,
    /// [`Fleet::install`].
    fn resume_install(
        &self,
        node: &str,
        bundle: &BundleRef,
    ) -> impl Future<Output = NodeReport> + Send {
        self.install(node, bundle)
    }

    /// Makes the version `node` ran before the rollout (`None`: none of this bundle) its
    /// desired version again.
    fn roll_back(
        &self,
        node: &str,
        bundle: &BundleRef,
        to_version: Option<&str>,
    ) -> impl Future<Output = Result<(), StepError>> + Send;
}

/// An operator's request to a running rollout.
#[derive(Debug)]
pub enum Control {
    /// Start no new wave until resumed.
    Pause(oneshot::Sender<Result<RolloutStatus, RolloutError>>),
    /// Continue a paused rollout.
    Resume(oneshot::Sender<Result<RolloutStatus, RolloutError>>),
    /// Halt for good (offers already out still report).
    Abort(oneshot::Sender<Result<RolloutStatus, RolloutError>>),
    /// Where it stands.
    Status(oneshot::Sender<RolloutStatus>),
}

/// A handle on a rollout running in a task.
#[derive(Clone, Debug)]
pub struct RolloutHandle {
    control: mpsc::Sender<Control>,
}

/// The rollout task ended (done or halted) and takes no more requests.
#[derive(Debug, thiserror::Error)]
#[error("the rollout is no longer running")]
pub struct Finished;

impl RolloutHandle {
    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Control,
    ) -> Result<T, Finished> {
        let (tx, rx) = oneshot::channel();
        self.control.send(make(tx)).await.map_err(|_| Finished)?;
        rx.await.map_err(|_| Finished)
    }

    /// Pauses it.
    pub async fn pause(&self) -> Result<Result<RolloutStatus, RolloutError>, Finished> {
        self.ask(Control::Pause).await
    }

    /// Resumes it.
    pub async fn resume(&self) -> Result<Result<RolloutStatus, RolloutError>, Finished> {
        self.ask(Control::Resume).await
    }

    /// Aborts it.
    pub async fn abort(&self) -> Result<Result<RolloutStatus, RolloutError>, Finished> {
        self.ask(Control::Abort).await
    }

    /// Its status now.
    pub async fn status(&self) -> Result<RolloutStatus, Finished> {
        self.ask(Control::Status).await
    }
}

/// Where a rollout is saved after every step.
pub trait SaveRollout: Send + 'static {
    /// Persists `rollout` (it is `serde`). An error is logged and the rollout goes on: losing a
    /// save costs a repeated, idempotent action after a restart, never a wrong one.
    fn save(&mut self, rollout: &Rollout) -> Result<(), StepError>;
}

impl<F: FnMut(&Rollout) -> Result<(), StepError> + Send + 'static> SaveRollout for F {
    fn save(&mut self, rollout: &Rollout) -> Result<(), StepError> {
        self(rollout)
    }
}

/// Starts `rollout` in a task; the handle controls it, the join handle gives its final state.
pub fn spawn<F: Fleet, S: SaveRollout>(
    rollout: Rollout,
    fleet: Arc<F>,
    save: S,
) -> (RolloutHandle, tokio::task::JoinHandle<Rollout>) {
    let (tx, rx) = mpsc::channel(16);
    let task = tokio::spawn(run(rollout, fleet, save, rx));
    (RolloutHandle { control: tx }, task)
}

/// Drives `rollout` to its end (see the module docs) and returns it in its final state.
pub async fn run<F: Fleet, S: SaveRollout>(
    mut rollout: Rollout,
    fleet: Arc<F>,
    mut save: S,
    mut control: mpsc::Receiver<Control>,
) -> Rollout {
    let bundle = rollout.bundle().clone();
    let mut installs: JoinSet<(String, NodeReport)> = JoinSet::new();
    let mut roll_backs: JoinSet<()> = JoinSet::new();
    let mut control_open = true;
    // Offers a previous driver made and saw no report of (it died, or the origin restarted).
    for node in rollout.in_flight() {
        tracing::info!(%node, %bundle, "rollout: resuming an offer made before");
        let (fleet, bundle) = (fleet.clone(), bundle.clone());
        installs.spawn(async move {
            let report = fleet.resume_install(&node, &bundle).await;
            (node, report)
        });
    }
    loop {
        for action in rollout.next_actions() {
            match action {
                Action::Offer { node, bundle } => {
                    tracing::info!(%node, %bundle, "rollout: offering");
                    let fleet = fleet.clone();
                    installs.spawn(async move {
                        let report = fleet.install(&node, &bundle).await;
                        (node, report)
                    });
                }
                Action::RollBack { node, to_version } => {
                    tracing::warn!(%node, to = ?to_version, "rollout: rolling back");
                    let fleet = fleet.clone();
                    let bundle = bundle.clone();
                    roll_backs.spawn(async move {
                        if let Err(error) =
                            fleet.roll_back(&node, &bundle, to_version.as_deref()).await
                        {
                            tracing::error!(%node, %error, "rollout: roll-back failed");
                        }
                    });
                }
                Action::Done => tracing::info!(%bundle, "rollout: done"),
                Action::Halted { reason } => {
                    tracing::warn!(%bundle, %reason, "rollout: halted")
                }
            }
        }
        save_logged(&mut save, &rollout);
        let settled = matches!(rollout.phase(), Phase::Done | Phase::Halted { .. });
        if settled && installs.is_empty() {
            break;
        }
        tokio::select! {
            Some(joined) = installs.join_next(), if !installs.is_empty() => {
                let (node, report) = match joined {
                    Ok(pair) => pair,
                    Err(error) => {
                        // An install task that panicked says nothing about its node; the node
                        // stays offered and the operator sees it in the status.
                        tracing::error!(%error, "rollout: an install task failed");
                        continue;
                    }
                };
                match &report {
                    NodeReport::Healthy => tracing::info!(%node, "rollout: node healthy"),
                    NodeReport::Failed { reason } => {
                        tracing::warn!(%node, %reason, "rollout: node failed")
                    }
                }
                if let Err(error) = rollout.on_node_report(&node, report) {
                    tracing::error!(%node, %error, "rollout: report not taken");
                }
            }
            request = control.recv(), if control_open => match request {
                Some(request) => answer(&mut rollout, request),
                None => control_open = false,
            },
            else => {
                // Nothing to wait for and no one to listen: a paused rollout with its
                // controller gone stays paused (saved) until the origin restarts it.
                break;
            }
        }
    }
    // Roll-backs already started finish before the task reports the end.
    while roll_backs.join_next().await.is_some() {}
    save_logged(&mut save, &rollout);
    rollout
}

fn answer(rollout: &mut Rollout, request: Control) {
    let reply =
        |rollout: &Rollout, result: Result<(), RolloutError>| result.map(|()| rollout.status());
    match request {
        Control::Pause(tx) => {
            let result = rollout.pause();
            let _ = tx.send(reply(rollout, result));
        }
        Control::Resume(tx) => {
            let result = rollout.resume();
            let _ = tx.send(reply(rollout, result));
        }
        Control::Abort(tx) => {
            let result = rollout.abort();
            let _ = tx.send(reply(rollout, result));
        }
        Control::Status(tx) => {
            let _ = tx.send(rollout.status());
        }
    }
}

fn save_logged<S: SaveRollout>(save: &mut S, rollout: &Rollout) {
    if let Err(error) = save.save(rollout) {
        tracing::error!(%error, "rollout: cannot save its state; it goes on");
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::sync::Mutex;
    use std::time::Duration;

    use super::*;
    use crate::rollout::plan::{FailureThreshold, HaltReason, NodeState, RolloutOptions, Target};

    /// A fleet whose nodes fail when listed, and which records every call.
    #[derive(Default)]
    struct FakeFleet {
        failing: BTreeSet<String>,
        /// Nodes whose install waits until released.
        gate: Option<tokio::sync::Semaphore>,
        installed: Mutex<Vec<String>>,
        /// Offers a previous driver made, gone on with.
        resumed: Mutex<Vec<String>>,
        rolled_back: Mutex<Vec<(String, Option<String>)>>,
    }

    impl Fleet for FakeFleet {
        async fn install(&self, node: &str, _bundle: &BundleRef) -> NodeReport {
            if let Some(gate) = &self.gate {
                if let Ok(permit) = gate.acquire().await {
                    permit.forget();
                }
            }
            self.installed.lock().expect("lock").push(node.to_owned());
            if self.failing.contains(node) {
                NodeReport::Failed {
                    reason: "health check reach-stager failed".into(),
                }
            } else {
                NodeReport::Healthy
            }
        }

        async fn roll_back(
            &self,
            node: &str,
            _bundle: &BundleRef,
            to_version: Option<&str>,
        ) -> Result<(), StepError> {
            self.rolled_back
                .lock()
                .expect("lock")
                .push((node.to_owned(), to_version.map(str::to_owned)));
            Ok(())
        }
    }

    impl FakeFleet {
        fn resumed(&self) -> Vec<String> {
            self.resumed.lock().expect("lock").clone()
        }
    }

    #[tokio::test]
    async fn a_resumed_rollout_goes_on_with_offers_out_and_offers_no_node_twice() {
        // A driver offered east's canary, then died before its report.
        let mut before = rollout(&BTreeMap::new());
        let offered = before.next_actions();
        assert_eq!(offered.len(), 1, "{offered:?}");
        assert_eq!(before.in_flight(), ["east-0"]);
        let stored: Rollout =
            serde_json::from_str(&serde_json::to_string(&before).expect("encode")).expect("decode");
        let fleet = Arc::new(ResumeFleet::default());
        let (_handle, task) = spawn(stored, fleet.clone(), |_: &Rollout| Ok(()));
        let done = tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("the rollout ends")
            .expect("task");
        assert_eq!(done.phase(), &Phase::Done);
        assert_eq!(
            fleet.0.resumed(),
            ["east-0"],
            "the canary is asked how it went"
        );
        let mut installed = fleet.0.installed.lock().expect("lock").clone();
        assert!(
            !installed.contains(&"east-0".to_owned()),
            "east-0 offered twice"
        );
        installed.sort();
        installed.dedup();
        assert_eq!(installed.len(), 7, "every other node once: {installed:?}");
        assert!(done.in_flight().is_empty());
    }

    /// A fleet that tells resumed offers from new ones.
    #[derive(Default)]
    struct ResumeFleet(FakeFleet);

    impl Fleet for ResumeFleet {
        async fn install(&self, node: &str, bundle: &BundleRef) -> NodeReport {
            self.0.install(node, bundle).await
        }

        async fn resume_install(&self, node: &str, _bundle: &BundleRef) -> NodeReport {
            self.0.resumed.lock().expect("lock").push(node.to_owned());
            NodeReport::Healthy
        }

        async fn roll_back(
            &self,
            node: &str,
            bundle: &BundleRef,
            to_version: Option<&str>,
        ) -> Result<(), StepError> {
            self.0.roll_back(node, bundle, to_version).await
        }
    }

    fn two_sites() -> Vec<Target> {
        let mut targets = Vec::new();
        for site in ["east", "west"] {
            for i in 0..4 {
                targets.push(Target::new(format!("{site}-{i}"), site));
            }
        }
        targets
    }

    fn rollout(current: &BTreeMap<String, String>) -> Rollout {
        Rollout::new(
            BundleRef::new("os", "2"),
            two_sites(),
            current,
            RolloutOptions {
                failure_threshold: FailureThreshold::Count(0),
                ..RolloutOptions::default()
            },
        )
        .expect("rollout")
    }

    #[tokio::test]
    async fn a_failing_canary_of_the_second_site_halts_with_the_first_site_done() {
        let current: BTreeMap<String, String> = two_sites()
            .into_iter()
            .map(|t| (t.node, "1".to_owned()))
            .collect();
        let fleet = Arc::new(FakeFleet {
            failing: ["west-0".to_owned()].into(),
            ..FakeFleet::default()
        });
        let saves = Arc::new(Mutex::new(0usize));
        let counted = saves.clone();
        let (_handle, task) = spawn(rollout(&current), fleet.clone(), move |_: &Rollout| {
            *counted.lock().expect("lock") += 1;
            Ok(())
        });
        let done = tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("the rollout ends")
            .expect("task");
        let status = done.status();
        match &status.phase {
            Phase::Halted {
                reason: HaltReason::CanaryFailed { node, site, reason },
            } => {
                assert_eq!((node.as_str(), site.as_str()), ("west-0", "west"));
                assert!(reason.contains("health check"), "{reason}");
            }
            other => panic!("expected a halt on west's canary, got {other}"),
        }
        let installed = fleet.installed.lock().expect("lock").clone();
        let east: Vec<_> = installed.iter().filter(|n| n.starts_with("east")).collect();
        assert_eq!(east.len(), 4, "all of site 1 got the bundle: {installed:?}");
        assert!(
            !installed
                .iter()
                .any(|n| n.starts_with("west-") && n != "west-0"),
            "the rest of west was offered after its canary failed: {installed:?}"
        );
        assert_eq!(
            fleet.rolled_back.lock().expect("lock").clone(),
            vec![("west-0".to_owned(), Some("1".to_owned()))]
        );
        for i in 0..4 {
            assert_eq!(
                status.node(&format!("east-{i}")).expect("node").state,
                NodeState::Healthy
            );
        }
        assert!(*saves.lock().expect("lock") >= 4, "saved after every step");
    }

    #[tokio::test]
    async fn pause_holds_the_next_wave_and_resume_finishes() {
        let fleet = Arc::new(FakeFleet {
            gate: Some(tokio::sync::Semaphore::new(0)),
            ..FakeFleet::default()
        });
        let (handle, task) = spawn(rollout(&BTreeMap::new()), fleet.clone(), |_: &Rollout| {
            Ok(())
        });
        let paused = handle.pause().await.expect("running").expect("pausable");
        assert_eq!(paused.phase, Phase::Paused);
        // Let the canary that was already offered finish: no further wave may start.
        fleet.gate.as_ref().expect("gate").add_permits(100);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(fleet.installed.lock().expect("lock").len(), 1);
        let status = handle.status().await.expect("running");
        assert_eq!(status.phase, Phase::Paused);
        handle.resume().await.expect("running").expect("resumable");
        let done = tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("ends")
            .expect("task");
        assert_eq!(*done.phase(), Phase::Done);
        assert_eq!(fleet.installed.lock().expect("lock").len(), 8);
        assert!(
            handle.status().await.is_err(),
            "a finished rollout takes no requests"
        );
    }

    #[tokio::test]
    async fn abort_stops_new_offers_and_waits_for_the_ones_out() {
        let fleet = Arc::new(FakeFleet {
            gate: Some(tokio::sync::Semaphore::new(0)),
            ..FakeFleet::default()
        });
        let (handle, task) = spawn(rollout(&BTreeMap::new()), fleet.clone(), |_: &Rollout| {
            Ok(())
        });
        let aborted = handle.abort().await.expect("running").expect("abortable");
        assert!(matches!(
            aborted.phase,
            Phase::Halted {
                reason: HaltReason::Aborted
            }
        ));
        fleet.gate.as_ref().expect("gate").add_permits(100);
        let done = tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("ends")
            .expect("task");
        assert_eq!(
            fleet.installed.lock().expect("lock").clone(),
            vec!["east-0".to_owned()],
            "only the canary already offered ran"
        );
        assert_eq!(
            done.status().node("east-0").expect("node").state,
            NodeState::Healthy
        );
    }
}
