//! Live updates: `GET /api/events`, a server-sent-event stream of [`LiveState`], and the
//! rollout page's per-site progress.
//!
//! One poller per origin reads the server-side state every [`POLL_INTERVAL`] (only while a
//! stream is open) and publishes it on a `watch` channel when it changed; each stream sends the
//! current state when it opens, then each change, with keep-alives between. At most
//! [`MAX_EVENT_STREAMS`] streams are open at once (more get 503), and a stream ends within
//! [`SESSION_CHECK_INTERVAL`] of its session ending.

// CommandError carries the policy's own errors whole (see `commands`); built once per poll.
#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::response::sse::{Event, KeepAlive, Sse};
use proto::wire::RolloutAction;
use serde::Serialize;
use tokio::sync::{watch, OwnedSemaphorePermit};

use super::overview::{self, AccountView, BundleView, RolloutView, SiteView};
use super::Console;
use crate::control::{CommandError, ControlPlane};
use crate::rollout::plan::{NodeState, RolloutStatus, WaveKind};
use crate::rollout::service::RolloutServiceError;

/// Event streams open at once per origin; one more gets 503. Half the connections the HTTP
/// server takes ([`proto::metrics::MAX_HTTP_CONNECTIONS`]), so open pages never keep page
/// loads, logins and the buttons' requests out.
pub const MAX_EVENT_STREAMS: usize = proto::metrics::MAX_HTTP_CONNECTIONS / 2;

/// How often the poller reads the server-side state while a stream is open.
pub const POLL_INTERVAL: Duration = Duration::from_millis(500);

/// How often a stream checks that its session is still live.
pub const SESSION_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// Comment lines sent on an idle stream, so proxies and browsers keep it open.
pub const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(15);

/// The SSE event name of a [`LiveState`].
pub const STATE_EVENT: &str = "state";

/// What a live page shows; sent as JSON in each `state` event.
#[derive(Clone, Debug, Serialize)]
pub struct LiveState {
    /// Nodes that reported, every role.
    pub nodes: usize,
    /// Per site: its nodes by role.
    pub sites: Vec<SiteView>,
    /// Every published bundle version, in publish order.
    pub bundles: Vec<BundleView>,
    /// The rollout under way (running or paused), if any, as on the overview.
    pub rollouts: Vec<RolloutView>,
    /// The latest rollout (under way or finished) with its per-site progress, if any.
    pub rollout: Option<RolloutProgress>,
}

/// A rollout's progress, as the rollout page shows it.
#[derive(Clone, Debug, Serialize)]
pub struct RolloutProgress {
    /// Its id in the console's URLs: the id of the bundle it installs.
    pub id: String,
    /// `name@version`.
    pub bundle: String,
    /// `running`, `paused`, `halted: why` or `done`.
    pub phase: String,
    /// Whether pause, resume and abort apply (running or paused).
    pub under_way: bool,
    /// The wave whose offers are out, from 0.
    pub current_wave: Option<usize>,
    /// Nodes that failed so far, and how many the threshold allows.
    pub failed: u32,
    /// Failures the threshold allows outside canary waves.
    pub allowed_failures: u32,
    /// Every wave in order.
    pub waves: Vec<WaveProgress>,
    /// Per site, over its waves.
    pub sites: Vec<SiteProgress>,
    /// Every failed node with what it reported.
    pub failures: Vec<Failure>,
    /// Targets never offered.
    pub skipped: usize,
}

/// One wave's counts.
#[derive(Clone, Debug, Default, Serialize)]
pub struct WaveProgress {
    /// Position, from 0.
    pub index: usize,
    /// Its site.
    pub site: String,
    /// `canary` or `rest`.
    pub kind: String,
    /// Its nodes by state.
    pub counts: Counts,
}

/// One site's counts over its waves.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SiteProgress {
    /// The site.
    pub site: String,
    /// Its nodes by state.
    pub counts: Counts,
}

/// Nodes by state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    /// Run the bundle and reported healthy.
    pub done: usize,
    /// Reported a failure and rolled back.
    pub failed: usize,
    /// Offered, no report yet.
    pub offered: usize,
    /// Their wave has not started.
    pub pending: usize,
    /// All of the above.
    pub total: usize,
}

/// A failed node.
#[derive(Clone, Debug, Serialize)]
pub struct Failure {
    /// The node.
    pub node: String,
    /// Its site.
    pub site: String,
    /// What it reported.
    pub reason: String,
}

impl Counts {
    fn add(&mut self, state: &NodeState) {
        match state {
            NodeState::Healthy => self.done += 1,
            NodeState::Failed { .. } => self.failed += 1,
            NodeState::Offered => self.offered += 1,
            NodeState::Pending => self.pending += 1,
            NodeState::Skipped { .. } => return,
        }
        self.total += 1;
    }
}

impl RolloutProgress {
    /// The progress of `status`, whose console id is `id`.
    pub fn of(id: String, status: &RolloutStatus) -> Self {
        let mut sites: BTreeMap<String, Counts> = BTreeMap::new();
        let mut failures = Vec::new();
        let waves = status
            .waves
            .iter()
            .map(|wave| {
                let mut counts = Counts::default();
                let site = sites.entry(wave.site.clone()).or_default();
                for node in &wave.nodes {
                    counts.add(&node.state);
                    site.add(&node.state);
                    if let NodeState::Failed { reason } = &node.state {
                        failures.push(Failure {
                            node: node.node.clone(),
                            site: node.site.clone(),
                            reason: reason.clone(),
                        });
                    }
                }
                WaveProgress {
                    index: wave.index,
                    site: wave.site.clone(),
                    kind: match wave.kind {
                        WaveKind::Canary => "canary",
                        WaveKind::Rest => "rest",
                    }
                    .to_owned(),
                    counts,
                }
            })
            .collect();
        Self {
            id,
            bundle: status.bundle.to_string(),
            phase: status.phase.to_string(),
            under_way: matches!(
                status.phase,
                crate::rollout::plan::Phase::Running | crate::rollout::plan::Phase::Paused
            ),
            current_wave: status.current_wave,
            failed: status.failed,
            allowed_failures: status.allowed_failures,
            waves,
            sites: sites
                .into_iter()
                .map(|(site, counts)| SiteProgress { site, counts })
                .collect(),
            failures,
            skipped: status.skipped.len(),
        }
    }
}

/// The latest rollout (under way or finished) with its console id, if there was one.
pub async fn latest_rollout(
    control: &ControlPlane,
    catalog: &crate::catalog::Catalog,
) -> Result<Option<RolloutProgress>, CommandError> {
    let status = match control.rollouts().act(RolloutAction::Status).await {
        Ok(status) => status,
        Err(RolloutServiceError::NeverStarted) => return Ok(None),
        Err(error) => return Err(error.into()),
    };
    let id = match control.rollout_keep() {
        Some(kept) => kept.target.to_string(),
        None => match catalog
            .all()
            .into_iter()
            .rev()
            .find(|b| b.name == status.bundle.name && b.version == status.bundle.version)
        {
            Some(bundle) => bundle.id.to_string(),
            None => return Ok(None),
        },
    };
    Ok(Some(RolloutProgress::of(id, &status)))
}

/// Reads what a live page shows.
pub async fn gather(origin: &crate::server::Origin) -> Result<LiveState, CommandError> {
    let view = overview::gather(
        origin,
        AccountView {
            name: String::new(),
            role: String::new(),
        },
    )
    .await?;
    let rollout = latest_rollout(origin.control(), origin.catalog()).await?;
    Ok(LiveState {
        nodes: view.nodes,
        sites: view.sites,
        bundles: view.bundles,
        rollouts: view.rollouts,
        rollout,
    })
}

/// The console's event streams: their bound and the poller they share.
pub struct Live {
    streams: Arc<tokio::sync::Semaphore>,
    updates: tokio::sync::OnceCell<watch::Receiver<Option<Arc<str>>>>,
}

impl Default for Live {
    fn default() -> Self {
        Self {
            streams: Arc::new(tokio::sync::Semaphore::new(MAX_EVENT_STREAMS)),
            updates: tokio::sync::OnceCell::new(),
        }
    }
}

impl Live {
    /// A permit for one more stream, or `None` when [`MAX_EVENT_STREAMS`] are open.
    pub fn admit(&self) -> Option<OwnedSemaphorePermit> {
        self.streams.clone().try_acquire_owned().ok()
    }

    /// The state's updates, starting the poller on first use.
    async fn subscribe(&self, console: &Arc<Console>) -> watch::Receiver<Option<Arc<str>>> {
        self.updates
            .get_or_init(|| async {
                let (sender, receiver) = watch::channel(None);
                let changed = console.origin.control().rollout_changed();
                tokio::spawn(poll(Arc::downgrade(console), sender, changed));
                receiver
            })
            .await
            .clone()
    }
}

/// Reads the state every [`POLL_INTERVAL`], and at once when an operator changed the rollout
/// (`changed`, from the control plane: the console's buttons and `origin rollout`), while a
/// stream listens (beyond the receiver the console keeps) and publishes it when it changed;
/// ends with the console.
async fn poll(
    console: std::sync::Weak<Console>,
    sender: watch::Sender<Option<Arc<str>>>,
    changed: Arc<tokio::sync::Notify>,
) {
    let mut ticks = tokio::time::interval(POLL_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = changed.notified() => {}
        }
        let Some(console) = console.upgrade() else {
            return;
        };
        if sender.receiver_count() <= 1 {
            continue;
        }
        let state = match gather(&console.origin).await {
            Ok(state) => state,
            Err(error) => {
                tracing::warn!(%error, "console: cannot read the live state");
                continue;
            }
        };
        let json = match serde_json::to_string(&state) {
            Ok(json) => json,
            Err(error) => {
                tracing::warn!(%error, "console: cannot encode the live state");
                continue;
            }
        };
        sender.send_if_modified(|current| {
            if current.as_deref() == Some(json.as_str()) {
                false
            } else {
                *current = Some(json.into());
                true
            }
        });
    }
}

/// One open stream.
struct Stream {
    console: Arc<Console>,
    session_id: String,
    updates: watch::Receiver<Option<Arc<str>>>,
    _permit: OwnedSemaphorePermit,
}

/// The SSE response of one stream for the session `session_id`.
pub(super) async fn events(
    console: Arc<Console>,
    session_id: String,
    permit: OwnedSemaphorePermit,
) -> Sse<impl futures_util::Stream<Item = Result<Event, Infallible>>> {
    let mut updates = console.live.subscribe(&console).await;
    // The state as it is now goes first (when the poller has read it).
    updates.mark_changed();
    let stream = Stream {
        console,
        session_id,
        updates,
        _permit: permit,
    };
    let events = futures_util::stream::unfold(stream, |mut stream| async move {
        let mut session_check = tokio::time::interval(SESSION_CHECK_INTERVAL);
        session_check.reset();
        loop {
            tokio::select! {
                changed = stream.updates.changed() => {
                    changed.ok()?;
                    let current = stream.updates.borrow_and_update().clone();
                    if let Some(json) = current {
                        let event = Event::default().event(STATE_EVENT).data(&*json);
                        return Some((Ok(event), stream));
                    }
                }
                _ = session_check.tick() => {
                    if !stream.console.session_live(&stream.session_id) {
                        return None;
                    }
                }
            }
        }
    });
    Sse::new(events).keep_alive(KeepAlive::new().interval(KEEP_ALIVE_INTERVAL))
}
