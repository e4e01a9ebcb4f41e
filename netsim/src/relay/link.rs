//! One direction of a running relay: the [`LinkModel`] decides each datagram's fate when it
//! arrives, the delay line holds it until its release time, and the egress task sends it.

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;
use tokio::sync::Notify;

use super::capture::Capture;
use super::model::{LinkModel, Verdict};
use super::stats::DirectionCounters;
use super::{lock, MAX_IN_FLIGHT_BYTES, WAN_MAX_DATAGRAM_BYTES};

/// poller rounds its wait up too, so a wake-up comes 0–2 ms late; the egress task aims one tick
/// early and sends every datagram due within a tick, which centres the error on zero.
const TIMER_TICK: Duration = Duration::from_millis(1);

/// A datagram on its way through the relay.
pub(super) struct Datagram {
    pub(super) payload: Vec<u8>,
    /// The socket it leaves by.
    pub(super) socket: Arc<UdpSocket>,
    /// Its destination; `None` when `socket` is connected.
    pub(super) to: Option<SocketAddr>,
}

/// One direction of the link: the model decides, the delay line holds, the egress task sends.
pub(super) struct Link {
    state: Mutex<LinkState>,
    /// Wakes the egress task when a datagram becomes the first one due.
    head_changed: Notify,
    counters: Arc<DirectionCounters>,
    /// Where forwarded datagrams are recorded, when the relay captures.
    capture: Option<Arc<Capture>>,
}

struct LinkState {
    model: LinkModel,
    /// Datagrams waiting for their release time, earliest first.
    delay_line: BinaryHeap<Reverse<Delayed>>,
    delay_line_bytes: usize,
    /// Breaks ties between equal release times in arrival order.
    next_seq: u64,
}

struct Delayed {
    release: Instant,
    seq: u64,
    datagram: Datagram,
}

impl PartialEq for Delayed {
    fn eq(&self, other: &Self) -> bool {
        (self.release, self.seq) == (other.release, other.seq)
    }
}

impl Eq for Delayed {}

impl PartialOrd for Delayed {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Delayed {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.release, self.seq).cmp(&(other.release, other.seq))
    }
}

impl Link {
    pub(super) fn new(
        model: LinkModel,
        counters: Arc<DirectionCounters>,
        capture: Option<Arc<Capture>>,
    ) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(LinkState {
                model,
                delay_line: BinaryHeap::new(),
                delay_line_bytes: 0,
                next_seq: 0,
            }),
            head_changed: Notify::new(),
            counters,
            capture,
        })
    }

    /// Takes a datagram that just arrived: drops it, or schedules its release.
    pub(super) fn offer(&self, datagram: Datagram) {
        let now = Instant::now();
        let len = datagram.payload.len();
        self.counters.received_datagrams.fetch_add(1, Relaxed);
        self.counters.received_bytes.fetch_add(len as u64, Relaxed);
        if len > WAN_MAX_DATAGRAM_BYTES {
            self.counters
                .dropped_oversize_datagrams
                .fetch_add(1, Relaxed);
            return;
        }
        let mut state = lock(&self.state);
        let release = match state.model.offer(now, len) {
            Verdict::Release(release) => release,
            Verdict::DropQueue => {
                self.counters.dropped_queue_datagrams.fetch_add(1, Relaxed);
                return;
            }
            Verdict::DropLoss => {
                self.counters.dropped_loss_datagrams.fetch_add(1, Relaxed);
                return;
            }
        };
        if state.delay_line_bytes + len > MAX_IN_FLIGHT_BYTES {
            self.counters.dropped_queue_datagrams.fetch_add(1, Relaxed);
            return;
        }
        let is_first = state
            .delay_line
            .peek()
            .is_none_or(|Reverse(first)| release < first.release);
        let seq = state.next_seq;
        state.next_seq += 1;
        state.delay_line_bytes += len;
        state.delay_line.push(Reverse(Delayed {
            release,
            seq,
            datagram,
        }));
        if is_first {
            self.head_changed.notify_one();
        }
    }

    /// Sends every datagram when it is due, forever.
    pub(super) async fn egress(self: Arc<Self>, direction: &'static str) {
        let mut due = Vec::new();
        loop {
            let next_release = {
                let mut state = lock(&self.state);
                let now = Instant::now();
                while state
                    .delay_line
                    .peek()
                    .is_some_and(|Reverse(first)| first.release <= now + TIMER_TICK)
                {
                    if let Some(Reverse(delayed)) = state.delay_line.pop() {
                        state.delay_line_bytes -= delayed.datagram.payload.len();
                        due.push(delayed.datagram);
                    }
                }
                state.delay_line.peek().map(|Reverse(first)| first.release)
            };
            for datagram in due.drain(..) {
                self.send(direction, datagram).await;
            }
            match next_release {
                Some(release) => {
                    let wake_at = release.checked_sub(TIMER_TICK).unwrap_or(release);
                    tokio::select! {
                        () = tokio::time::sleep_until(wake_at.into()) => {}
                        () = self.head_changed.notified() => {}
                    }
                }
                None => self.head_changed.notified().await,
            }
        }
    }

    async fn send(&self, direction: &'static str, datagram: Datagram) {
        let sent = match datagram.to {
            Some(to) => datagram.socket.send_to(&datagram.payload, to).await,
            None => datagram.socket.send(&datagram.payload).await,
        };
        match sent {
            Ok(len) => {
                self.counters.forwarded_datagrams.fetch_add(1, Relaxed);
                self.counters.forwarded_bytes.fetch_add(len as u64, Relaxed);
                if let Some(capture) = &self.capture {
                    capture.record(&datagram.payload[..len]);
                }
            }
            Err(error) => {
                self.counters.send_errors.fetch_add(1, Relaxed);
                tracing::debug!(direction, to = ?datagram.to, %error, "relay send failed");
            }
        }
    }
}
