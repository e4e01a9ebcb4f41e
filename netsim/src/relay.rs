//! A user-space UDP relay that makes a loopback path behave like a WAN link.
//!
//! This kernel has no netem, so netsim emulates the WAN in user space: start a [`Relay`] in front
//! of a server, point the clients at [`Relay::local_addr`] instead of the server, and every
//! datagram crosses one [`LinkShape`] on the way up (client → server) and another on the way down
//! (server → client). QUIC runs over it unchanged, so the real `origin` and `stager` binaries can
//! talk through it.
//!
//! # One direction of the link
//!
//! 1. **Rate.** Datagrams wait in a FIFO of `queue_bytes` for a token bucket that fills at
//!    `rate_bits_per_s` and holds a burst of [`BURST_DATAGRAMS`] full-size datagrams. A datagram
//!    that finds the FIFO full is dropped (tail drop, counted in
//!    [`DirectionStats::dropped_queue_datagrams`]). The rate and the FIFO count wire bytes: the
//!    payload plus [`IPV4_UDP_HEADER_BYTES`], as a router would.
//! 2. **Delay.** A datagram that leaves the bucket is released `latency` ± a uniform draw from
//!    `jitter` later. By default the link is FIFO (for all its clients together, so within every
//!    flow too): a datagram that drew a short delay waits for the one ahead of it. Order is
//!    kept, at the price of delays skewed long when the jitter exceeds the gap between
//!    datagrams. With [`LinkShape::reorder`] each datagram keeps the delay it drew, so datagrams
//!    closer together than the jitter can swap, as on multi-path networks.
//! 3. **Loss.** A datagram is then dropped with probability `loss`, from an RNG seeded by
//!    [`RelayConfig::seed`] (counted in [`DirectionStats::dropped_loss_datagrams`]). The same
//!    seed and the same arrivals give the same drops; arrival times on real sockets vary, so a
//!    run is reproducible in its statistics, not datagram for datagram.
//!
//! Departure and release times are computed exactly when a datagram arrives, so the long-run
//! rate does not depend on timer precision. One task per direction sleeps until
//! the earliest release time and then sends every datagram that is due. Tokio's timers tick in
//! milliseconds, so a datagram leaves within about a millisecond of its release time, early or
//! late: on an idle machine, UDP echoes through a link of 40 ms each way take 79.5–84 ms,
//! median 80.6 ms.
//!
//! # Round-trip time
//!
//! Latency is one-way. A link's round-trip time is `up.latency + down.latency`: a "40 ms link"
//! built with [`LinkShape::wan`] and [`RelayConfig::symmetric`] has an RTT of 80 ms, and its
//! bandwidth-delay product is `rate × 80 ms` (500 KB at 50 Mbit/s). Because the rate counts
//! headers, QUIC's goodput through a 50 Mbit/s link is about 48 Mbit/s once past slow start.
//!
//! # Clients
//!
//! Like a NAT, the relay opens one upstream socket per client source address, so the server
//! sees each client as a distinct peer and replies go back to the client they belong to. A
//! mapping that carries no datagram in either direction for [`RelayConfig::client_idle_timeout`]
//! is closed; at most [`MAX_CLIENTS`] exist at once.
//!
//! # Threads
//!
//! The relay runs on its own OS thread with a current-thread tokio runtime, so a busy client or
//! server in the same process does not delay its timers, and [`Relay::start`] is an ordinary
//! function callable from any context. [`Relay::shutdown`] or dropping the [`Relay`] stops that
//! thread (waiting the moment it takes to end) and closes every socket.

use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tokio::net::UdpSocket;
use tokio::sync::{oneshot, Notify};

/// Bytes of IPv4 and UDP headers that each datagram adds on the wire; the rate and the queue
/// count them.
pub const IPV4_UDP_HEADER_BYTES: usize = 28;

/// Wire size of a full-size datagram (an Ethernet MTU), in bytes; sizes the token bucket's burst.
pub const FULL_DATAGRAM_WIRE_BYTES: usize = 1500;

/// How many full-size datagrams the token bucket lets through back to back after an idle spell.
pub const BURST_DATAGRAMS: usize = 4;

/// Smallest queue [`LinkShape::wan`] gives a link, in bytes, so slow links still absorb a burst.
pub const MIN_WAN_QUEUE_BYTES: usize = 64 * 1024;

/// Largest one-way delay (latency plus jitter) a link accepts.
pub const MAX_ONE_WAY_DELAY: Duration = Duration::from_secs(60);

/// Default of [`RelayConfig::client_idle_timeout`]: longer than QUIC's usual idle timeouts, so a
/// connection outlives its mapping only when it would have died anyway.
pub const CLIENT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Most client mappings (upstream sockets) open at once; datagrams from further clients are
/// dropped and counted in [`RelayStats::refused_datagrams`].
pub const MAX_CLIENTS: usize = 1024;

/// Bytes of released-but-undelivered datagrams one direction holds at most. A shaped link holds
/// about `rate × latency`; this bounds the unshaped ones. Datagrams beyond it count as queue drops.
pub const MAX_IN_FLIGHT_BYTES: usize = 64 * 1024 * 1024;

/// Granularity of tokio's timers. A timer fires on the first tick after its deadline and the
/// poller rounds its wait up too, so a wake-up comes 0–2 ms late; the egress task aims one tick
/// early and sends every datagram due within a tick, which centres the error on zero.
const TIMER_TICK: Duration = Duration::from_millis(1);

/// Kernel receive and send buffer asked for each relay socket, in bytes (the kernel caps it at
/// `net.core.rmem_max` / `wmem_max`). The default (208 KiB) overflows when the relay thread is
/// descheduled for a few milliseconds at high rates, and a datagram the kernel drops there is
/// lost without being counted.
pub const SOCKET_BUFFER_BYTES: usize = 4 * 1024 * 1024;

/// Largest UDP payload, in bytes: the size of every receive buffer.
const MAX_DATAGRAM_BYTES: usize = 65_535;

/// Mixed into [`RelayConfig::seed`] for the down direction, so the two directions draw
/// independent losses.
const DOWN_SEED_SALT: u64 = 0x9e37_79b9_7f4a_7c15;

/// The behaviour of one direction of a link.
#[derive(Clone, Debug, PartialEq)]
pub struct LinkShape {
    /// Bottleneck rate in bits per second of wire bytes (payload plus
    /// [`IPV4_UDP_HEADER_BYTES`]); `None` for no limit (and no queue).
    pub rate_bits_per_s: Option<u64>,
    /// One-way delay added to every datagram.
    pub latency: Duration,
    /// Each datagram's delay is `latency` plus a uniform draw from `-jitter..=jitter` (never
    /// below zero).
    pub jitter: Duration,
    /// Probability in `0.0..=1.0` that a datagram is lost after the queue.
    pub loss: f64,
    /// Wire bytes that may wait for the rate limit; a datagram that does not fit is dropped.
    pub queue_bytes: usize,
    /// Whether jitter may reorder datagrams (`false`: FIFO, a datagram never overtakes the one
    /// before it).
    pub reorder: bool,
}

impl LinkShape {
    /// A perfect link: no rate limit, no delay, no loss.
    pub fn ideal() -> Self {
        Self {
            rate_bits_per_s: None,
            latency: Duration::ZERO,
            jitter: Duration::ZERO,
            loss: 0.0,
            queue_bytes: 0,
            reorder: false,
        }
    }

    /// One direction of a WAN link: `mbit_per_s` megabits per second, `latency_ms` one way (the
    /// RTT of a symmetric link is twice that), `jitter_ms` either side, `loss` probability,
    /// without reordering. The queue holds one bandwidth-delay product of the symmetric round
    /// trip (`rate × 2 × latency`), at least [`MIN_WAN_QUEUE_BYTES`].
    pub fn wan(mbit_per_s: f64, latency_ms: u64, jitter_ms: u64, loss: f64) -> Self {
        let rate_bits_per_s = (mbit_per_s * 1e6).round() as u64;
        let latency = Duration::from_millis(latency_ms);
        Self {
            rate_bits_per_s: Some(rate_bits_per_s),
            latency,
            jitter: Duration::from_millis(jitter_ms),
            loss,
            queue_bytes: bdp_bytes(rate_bits_per_s, 2 * latency).max(MIN_WAN_QUEUE_BYTES),
            reorder: false,
        }
    }

    /// Explains what is wrong with this shape, if anything.
    fn validate(&self, direction: &str) -> io::Result<()> {
        let invalid = |what: String| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("relay link {direction}: {what}"),
            )
        };
        if !(0.0..=1.0).contains(&self.loss) {
            return Err(invalid(format!(
                "loss must be a probability in 0.0..=1.0, not {}",
                self.loss
            )));
        }
        if self.rate_bits_per_s == Some(0) {
            return Err(invalid(
                "a rate of 0 bit/s passes nothing; use None for no limit".into(),
            ));
        }
        if self.latency + self.jitter > MAX_ONE_WAY_DELAY {
            return Err(invalid(format!(
                "latency plus jitter may be at most {MAX_ONE_WAY_DELAY:?}, not {:?}",
                self.latency + self.jitter
            )));
        }
        Ok(())
    }
}

/// Bytes a link of `rate_bits_per_s` carries in `time`: its bandwidth-delay product when `time`
/// is the round trip.
pub fn bdp_bytes(rate_bits_per_s: u64, time: Duration) -> usize {
    (rate_bits_per_s as f64 / 8.0 * time.as_secs_f64()).round() as usize
}

/// Where a relay listens, where it forwards, and how each direction behaves.
#[derive(Clone, Debug)]
pub struct RelayConfig {
    /// Address clients send to (port 0 for any free port; see [`Relay::local_addr`]).
    pub listen: SocketAddr,
    /// The real server every client's datagrams go to.
    pub upstream: SocketAddr,
    /// Client → server.
    pub up: LinkShape,
    /// Server → client.
    pub down: LinkShape,
    /// Seeds the jitter and loss draws of both directions.
    pub seed: u64,
    /// A client mapping that carries nothing for this long is closed.
    pub client_idle_timeout: Duration,
}

impl RelayConfig {
    /// A symmetric link: `link` both ways, so the RTT is twice `link.latency`.
    pub fn symmetric(listen: SocketAddr, upstream: SocketAddr, link: LinkShape, seed: u64) -> Self {
        Self {
            listen,
            upstream,
            up: link.clone(),
            down: link,
            seed,
            client_idle_timeout: CLIENT_IDLE_TIMEOUT,
        }
    }

    /// The round-trip time the link adds: `up.latency + down.latency`.
    pub fn rtt(&self) -> Duration {
        self.up.latency + self.down.latency
    }
}

/// Counters of one direction since the relay started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DirectionStats {
    /// Datagrams that arrived at the relay.
    pub received_datagrams: u64,
    /// Payload bytes that arrived at the relay.
    pub received_bytes: u64,
    /// Datagrams sent on after shaping.
    pub forwarded_datagrams: u64,
    /// Payload bytes sent on after shaping (UDP payload, without headers).
    pub forwarded_bytes: u64,
    /// Datagrams dropped because the queue was full.
    pub dropped_queue_datagrams: u64,
    /// Datagrams dropped by the random loss.
    pub dropped_loss_datagrams: u64,
    /// Datagrams the relay failed to send (the socket refused them).
    pub send_errors: u64,
}

impl DirectionStats {
    /// Datagrams received but neither forwarded nor dropped yet: in the queue or the delay line.
    pub fn in_flight_datagrams(&self) -> u64 {
        self.received_datagrams.saturating_sub(
            self.forwarded_datagrams
                + self.dropped_queue_datagrams
                + self.dropped_loss_datagrams
                + self.send_errors,
        )
    }
}

/// A snapshot of a relay's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RelayStats {
    /// Client → server.
    pub up: DirectionStats,
    /// Server → client.
    pub down: DirectionStats,
    /// Client mappings open now.
    pub active_clients: u64,
    /// Datagrams dropped because no mapping could be opened for their client (see
    /// [`MAX_CLIENTS`]).
    pub refused_datagrams: u64,
}

/// A running relay; dropping it stops it.
#[derive(Debug)]
pub struct Relay {
    local_addr: SocketAddr,
    counters: Arc<Counters>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Relay {
    /// Binds `config.listen` and starts relaying to `config.upstream` on a thread of its own.
    /// Callable from inside or outside a tokio runtime; fails if a shape is invalid or the
    /// address cannot be bound.
    pub fn start(config: RelayConfig) -> io::Result<Relay> {
        config.up.validate("up")?;
        config.down.validate("down")?;
        let listen = std::net::UdpSocket::bind(config.listen)?;
        enlarge_buffers(&listen);
        listen.set_nonblocking(true)?;
        let local_addr = listen.local_addr()?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let listen = {
            let _in_runtime = runtime.enter();
            Arc::new(UdpSocket::from_std(listen)?)
        };
        tracing::info!(
            listen = %local_addr,
            upstream = %config.upstream,
            rtt_ms = config.rtt().as_millis() as u64,
            up_rate_bits_per_s = ?config.up.rate_bits_per_s,
            down_rate_bits_per_s = ?config.down.rate_bits_per_s,
            "relay started"
        );
        let counters = Arc::new(Counters::default());
        let (stop, stopped) = oneshot::channel();
        let relay_counters = counters.clone();
        let thread = std::thread::Builder::new()
            .name("netsim-relay".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let relay = Shared::new(listen, &config, relay_counters);
                    tokio::select! {
                        // Sent by `Relay::drop`, or dropped with the `Relay`.
                        _ = stopped => {}
                        () = relay.run() => {}
                    }
                });
                // Dropping the runtime cancels every task and closes every socket.
            })?;
        Ok(Relay {
            local_addr,
            counters,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// The address clients should send to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The counters now; the relay keeps running.
    pub fn stats(&self) -> RelayStats {
        self.counters.snapshot()
    }

    /// Stops the relay and waits for its thread; datagrams still queued or delayed are dropped.
    pub fn shutdown(self) {
        drop(self);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            // An error means the relay thread has already ended.
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!(listen = %self.local_addr, "relay thread panicked");
            }
        }
    }
}

/// The relay's state shared by its tasks (all on the relay's one thread).
struct Shared {
    listen: Arc<UdpSocket>,
    upstream: SocketAddr,
    up: Arc<Link>,
    down: Arc<Link>,
    clients: Mutex<HashMap<SocketAddr, Arc<Client>>>,
    client_idle_timeout: Duration,
    /// Origin of [`Client::last_active_ms`].
    epoch: Instant,
    counters: Arc<Counters>,
}

/// One client mapping: the upstream socket that stands for `addr`.
struct Client {
    addr: SocketAddr,
    socket: Arc<UdpSocket>,
    /// When the mapping last carried a datagram, in milliseconds since [`Shared::epoch`].
    last_active_ms: AtomicU64,
}

impl Shared {
    fn new(listen: Arc<UdpSocket>, config: &RelayConfig, counters: Arc<Counters>) -> Arc<Self> {
        let now = Instant::now();
        let up = Link::new(
            LinkModel::new(config.up.clone(), config.seed, now),
            counters.up.clone(),
        );
        let down = Link::new(
            LinkModel::new(config.down.clone(), config.seed ^ DOWN_SEED_SALT, now),
            counters.down.clone(),
        );
        Arc::new(Self {
            listen,
            upstream: config.upstream,
            up,
            down,
            clients: Mutex::new(HashMap::new()),
            client_idle_timeout: config.client_idle_timeout,
            epoch: now,
            counters,
        })
    }

    /// Runs the relay: both egress tasks, and the up direction's ingress in this task.
    async fn run(self: Arc<Self>) {
        tokio::spawn(self.up.clone().egress("up"));
        tokio::spawn(self.down.clone().egress("down"));
        let mut buf = vec![0u8; MAX_DATAGRAM_BYTES];
        loop {
            let (len, from) = match self.listen.recv_from(&mut buf).await {
                Ok(received) => received,
                Err(error) => {
                    // An unconnected UDP socket reports only transient errors here.
                    tracing::debug!(%error, "relay listen socket receive failed");
                    continue;
                }
            };
            let Some(client) = self.client(from) else {
                self.counters.refused_datagrams.fetch_add(1, Relaxed);
                continue;
            };
            self.up.offer(Datagram {
                payload: buf[..len].to_vec(),
                socket: client.socket.clone(),
                to: None,
            });
        }
    }

    /// The mapping of client `addr`, opened if new; `None` if none can be opened.
    fn client(self: &Arc<Self>, addr: SocketAddr) -> Option<Arc<Client>> {
        let mut clients = lock(&self.clients);
        if let Some(client) = clients.get(&addr) {
            client.touch(self.epoch);
            return Some(client.clone());
        }
        if clients.len() >= MAX_CLIENTS {
            tracing::warn!(
                client = %addr,
                max_clients = MAX_CLIENTS,
                "relay full: datagram dropped"
            );
            return None;
        }
        let socket = match self.upstream_socket() {
            Ok(socket) => Arc::new(socket),
            Err(error) => {
                tracing::warn!(
                    client = %addr,
                    upstream = %self.upstream,
                    %error,
                    "cannot open an upstream socket: datagram dropped"
                );
                return None;
            }
        };
        let client = Arc::new(Client {
            addr,
            socket,
            last_active_ms: AtomicU64::new(0),
        });
        client.touch(self.epoch);
        clients.insert(addr, client.clone());
        self.counters.active_clients.fetch_add(1, Relaxed);
        tracing::debug!(
            client = %addr,
            via = ?client.socket.local_addr().ok(),
            "client mapping opened"
        );
        tokio::spawn(self.clone().relay_replies(client.clone()));
        Some(client)
    }

    /// A socket connected to the upstream server (so the kernel passes only its replies).
    fn upstream_socket(&self) -> io::Result<UdpSocket> {
        let any: SocketAddr = match self.upstream {
            SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let socket = std::net::UdpSocket::bind(any)?;
        enlarge_buffers(&socket);
        socket.connect(self.upstream)?;
        socket.set_nonblocking(true)?;
        UdpSocket::from_std(socket)
    }

    /// Down direction ingress of one client, until its mapping expires.
    async fn relay_replies(self: Arc<Self>, client: Arc<Client>) {
        let mut buf = vec![0u8; MAX_DATAGRAM_BYTES];
        loop {
            let idle_deadline = client.idle_deadline(self.epoch, self.client_idle_timeout);
            tokio::select! {
                received = client.socket.recv(&mut buf) => match received {
                    Ok(len) => {
                        client.touch(self.epoch);
                        self.down.offer(Datagram {
                            payload: buf[..len].to_vec(),
                            socket: self.listen.clone(),
                            to: Some(client.addr),
                        });
                    }
                    // A connected socket reports ICMP errors, e.g. the server is not listening.
                    Err(error) => {
                        tracing::debug!(
                            client = %client.addr,
                            %error,
                            "upstream socket receive failed"
                        );
                    }
                },
                () = tokio::time::sleep_until(idle_deadline.into()) => {
                    // Checked under the lock that `client()` touches under, so a datagram is
                    // never relayed through a mapping already removed.
                    let mut clients = lock(&self.clients);
                    let idle_deadline = client.idle_deadline(self.epoch, self.client_idle_timeout);
                    if idle_deadline <= Instant::now() {
                        clients.remove(&client.addr);
                        self.counters.active_clients.fetch_sub(1, Relaxed);
                        tracing::debug!(client = %client.addr, "client mapping expired");
                        return;
                    }
                }
            }
        }
    }
}

impl Client {
    fn touch(&self, epoch: Instant) {
        self.last_active_ms
            .store(epoch.elapsed().as_millis() as u64, Relaxed);
    }

    fn idle_deadline(&self, epoch: Instant, idle_timeout: Duration) -> Instant {
        epoch + Duration::from_millis(self.last_active_ms.load(Relaxed)) + idle_timeout
    }
}

/// A datagram on its way through the relay.
struct Datagram {
    payload: Vec<u8>,
    /// The socket it leaves by.
    socket: Arc<UdpSocket>,
    /// Its destination; `None` when `socket` is connected.
    to: Option<SocketAddr>,
}

/// One direction of the link: the model decides, the delay line holds, the egress task sends.
struct Link {
    state: Mutex<LinkState>,
    /// Wakes the egress task when a datagram becomes the first one due.
    head_changed: Notify,
    counters: Arc<DirectionCounters>,
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
    fn new(model: LinkModel, counters: Arc<DirectionCounters>) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(LinkState {
                model,
                delay_line: BinaryHeap::new(),
                delay_line_bytes: 0,
                next_seq: 0,
            }),
            head_changed: Notify::new(),
            counters,
        })
    }

    /// Takes a datagram that just arrived: drops it, or schedules its release.
    fn offer(&self, datagram: Datagram) {
        let now = Instant::now();
        let len = datagram.payload.len();
        self.counters.received_datagrams.fetch_add(1, Relaxed);
        self.counters.received_bytes.fetch_add(len as u64, Relaxed);
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
    async fn egress(self: Arc<Self>, direction: &'static str) {
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
            }
            Err(error) => {
                self.counters.send_errors.fetch_add(1, Relaxed);
                tracing::debug!(direction, to = ?datagram.to, %error, "relay send failed");
            }
        }
    }
}

/// What a link does with a datagram, decided when it arrives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    /// Deliver it at this instant.
    Release(Instant),
    /// The queue is full.
    DropQueue,
    /// The random loss took it.
    DropLoss,
}

/// One direction of a link as a pure function of arrival times: no clock, no sockets.
struct LinkModel {
    shape: LinkShape,
    bucket: Option<TokenBucket>,
    /// Departure time and wire bytes of each datagram waiting for the bucket, oldest first.
    queue: VecDeque<(Instant, usize)>,
    queue_bytes: usize,
    /// Release time of the last datagram delivered, which a FIFO link never releases before.
    last_release: Option<Instant>,
    rng: StdRng,
}

impl LinkModel {
    fn new(shape: LinkShape, seed: u64, now: Instant) -> Self {
        let bucket = shape
            .rate_bits_per_s
            .map(|rate| TokenBucket::new(rate, now));
        Self {
            shape,
            bucket,
            queue: VecDeque::new(),
            queue_bytes: 0,
            last_release: None,
            rng: StdRng::seed_from_u64(seed),
        }
    }

    /// The fate of a datagram of `payload_bytes` arriving at `now`; `now` must not go back.
    fn offer(&mut self, now: Instant, payload_bytes: usize) -> Verdict {
        let wire_bytes = payload_bytes + IPV4_UDP_HEADER_BYTES;
        let departure = match &mut self.bucket {
            None => now,
            Some(bucket) => {
                while self.queue.front().is_some_and(|&(left, _)| left <= now) {
                    if let Some((_, bytes)) = self.queue.pop_front() {
                        self.queue_bytes -= bytes;
                    }
                }
                let (departure, tokens_left) = bucket.departure(now, wire_bytes);
                let waits = departure > now;
                if waits && self.queue_bytes + wire_bytes > self.shape.queue_bytes {
                    return Verdict::DropQueue;
                }
                bucket.take(departure, tokens_left);
                if waits {
                    self.queue.push_back((departure, wire_bytes));
                    self.queue_bytes += wire_bytes;
                }
                departure
            }
        };
        let mut release = departure + self.delay();
        if !self.shape.reorder {
            release = release.max(self.last_release.unwrap_or(release));
        }
        // Lost after the queue, as on a real link: a lost datagram still used its share of the
        // rate.
        if self.shape.loss > 0.0 && self.rng.gen_bool(self.shape.loss) {
            return Verdict::DropLoss;
        }
        self.last_release = Some(release);
        Verdict::Release(release)
    }

    /// One datagram's delay: latency ± uniform jitter, at least zero.
    fn delay(&mut self) -> Duration {
        if self.shape.jitter.is_zero() {
            return self.shape.latency;
        }
        // Both are at most `MAX_ONE_WAY_DELAY`, so nanoseconds fit an i64.
        let jitter_ns = self.shape.jitter.as_nanos() as i64;
        let delay_ns =
            self.shape.latency.as_nanos() as i64 + self.rng.gen_range(-jitter_ns..=jitter_ns);
        Duration::from_nanos(delay_ns.max(0) as u64)
    }
}

/// A token bucket that datagrams leave in FIFO order, computed in virtual time: it says when a
/// datagram arriving now will have its tokens, rather than waiting for them.
struct TokenBucket {
    bytes_per_s: f64,
    burst_bytes: f64,
    /// Tokens in the bucket at `tokens_at`; negative after a datagram larger than the burst.
    tokens: f64,
    /// The last departure (or the start); no datagram leaves before it.
    tokens_at: Instant,
}

impl TokenBucket {
    fn new(rate_bits_per_s: u64, now: Instant) -> Self {
        let burst_bytes = (BURST_DATAGRAMS * FULL_DATAGRAM_WIRE_BYTES) as f64;
        Self {
            bytes_per_s: rate_bits_per_s as f64 / 8.0,
            burst_bytes,
            tokens: burst_bytes,
            tokens_at: now,
        }
    }

    /// When a datagram of `wire_bytes` arriving at `now` leaves, and the tokens left after it.
    fn departure(&self, now: Instant, wire_bytes: usize) -> (Instant, f64) {
        let start = now.max(self.tokens_at);
        let refilled = (start - self.tokens_at).as_secs_f64() * self.bytes_per_s;
        let tokens = (self.tokens + refilled).min(self.burst_bytes);
        let wait_s = ((wire_bytes as f64 - tokens) / self.bytes_per_s).max(0.0);
        let departure = start + Duration::from_secs_f64(wait_s);
        (
            departure,
            tokens + wait_s * self.bytes_per_s - wire_bytes as f64,
        )
    }

    /// Commits a departure computed by [`TokenBucket::departure`].
    fn take(&mut self, departure: Instant, tokens_left: f64) {
        self.tokens = tokens_left;
        self.tokens_at = departure;
    }
}

/// The counters behind [`RelayStats`], written by the relay thread and read by anyone.
#[derive(Debug, Default)]
struct Counters {
    up: Arc<DirectionCounters>,
    down: Arc<DirectionCounters>,
    active_clients: AtomicU64,
    refused_datagrams: AtomicU64,
}

#[derive(Debug, Default)]
struct DirectionCounters {
    received_datagrams: AtomicU64,
    received_bytes: AtomicU64,
    forwarded_datagrams: AtomicU64,
    forwarded_bytes: AtomicU64,
    dropped_queue_datagrams: AtomicU64,
    dropped_loss_datagrams: AtomicU64,
    send_errors: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> RelayStats {
        RelayStats {
            up: self.up.snapshot(),
            down: self.down.snapshot(),
            active_clients: self.active_clients.load(Relaxed),
            refused_datagrams: self.refused_datagrams.load(Relaxed),
        }
    }
}

impl DirectionCounters {
    fn snapshot(&self) -> DirectionStats {
        DirectionStats {
            received_datagrams: self.received_datagrams.load(Relaxed),
            received_bytes: self.received_bytes.load(Relaxed),
            forwarded_datagrams: self.forwarded_datagrams.load(Relaxed),
            forwarded_bytes: self.forwarded_bytes.load(Relaxed),
            dropped_queue_datagrams: self.dropped_queue_datagrams.load(Relaxed),
            dropped_loss_datagrams: self.dropped_loss_datagrams.load(Relaxed),
            send_errors: self.send_errors.load(Relaxed),
        }
    }
}

/// Asks for [`SOCKET_BUFFER_BYTES`] of receive and send buffer; a refusal leaves the default,
/// which works, only with less slack.
fn enlarge_buffers(socket: &std::net::UdpSocket) {
    use std::os::fd::AsRawFd;
    let bytes = libc::c_int::try_from(SOCKET_BUFFER_BYTES).unwrap_or(libc::c_int::MAX);
    for option in [libc::SO_RCVBUF, libc::SO_SNDBUF] {
        // SAFETY: setsockopt(2) on a socket we own, reading a c_int that lives across the call.
        let result = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                option,
                std::ptr::from_ref(&bytes).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if result != 0 {
            let error = io::Error::last_os_error();
            tracing::debug!(option, %error, "cannot enlarge a relay socket buffer");
        }
    }
}

/// Locks `mutex`; a panic elsewhere while holding it leaves counters and queues usable.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// 1 Mbit/s: a datagram of 1222 payload bytes (1250 on the wire) takes exactly 10 ms.
    fn one_mbit(queue_bytes: usize) -> LinkShape {
        LinkShape {
            rate_bits_per_s: Some(1_000_000),
            queue_bytes,
            ..LinkShape::ideal()
        }
    }

    fn release(verdict: Verdict) -> Instant {
        match verdict {
            Verdict::Release(at) => at,
            other => panic!("expected a release, got {other:?}"),
        }
    }

    fn assert_close(actual: Duration, expected: Duration) {
        let error = actual.abs_diff(expected);
        assert!(
            error < Duration::from_micros(1),
            "{actual:?} is not {expected:?}"
        );
    }

    #[test]
    fn the_bucket_passes_a_burst_then_spaces_datagrams_at_the_rate() {
        let t0 = Instant::now();
        let mut link = LinkModel::new(one_mbit(1 << 20), 1, t0);
        let released: Vec<Duration> = (0..8).map(|_| release(link.offer(t0, 1222)) - t0).collect();
        // 6000 tokens: four datagrams of 1250 leave at once with 1000 tokens left, so the fifth
        // waits for 250 bytes (2 ms) and each one after it for 1250 (10 ms).
        for (i, at) in released.iter().enumerate() {
            let expected = if i < 4 { 0 } else { 2 + 10 * (i - 4) };
            assert_close(*at, expected as u32 * MS);
        }
    }

    #[test]
    fn a_full_queue_drops_at_the_tail_and_drains_at_the_rate() {
        let t0 = Instant::now();
        let mut link = LinkModel::new(one_mbit(2500), 1, t0);
        for _ in 0..4 {
            assert_eq!(link.offer(t0, 1222), Verdict::Release(t0));
        }
        // Two datagrams fit the queue, the third does not.
        assert!(matches!(link.offer(t0, 1222), Verdict::Release(_)));
        assert!(matches!(link.offer(t0, 1222), Verdict::Release(_)));
        assert_eq!(link.offer(t0, 1222), Verdict::DropQueue);
        // At 2 ms the first queued datagram has left, so one more fits; it leaves at 22 ms.
        let at = release(link.offer(t0 + 2 * MS, 1222));
        assert_close(at - t0, 22 * MS);
        assert_eq!(link.offer(t0 + 2 * MS, 1222), Verdict::DropQueue);
    }

    #[test]
    fn latency_is_added_after_the_rate() {
        let t0 = Instant::now();
        let shape = LinkShape {
            latency: 40 * MS,
            ..one_mbit(1 << 20)
        };
        let mut link = LinkModel::new(shape, 1, t0);
        assert_eq!(link.offer(t0, 100), Verdict::Release(t0 + 40 * MS));
    }

    #[test]
    fn a_fifo_link_keeps_order_under_jitter_and_a_reordering_one_keeps_each_delay() {
        let t0 = Instant::now();
        let jittery = LinkShape {
            latency: 20 * MS,
            jitter: 10 * MS,
            ..LinkShape::ideal()
        };
        let arrivals: Vec<Instant> = (0..1000)
            .map(|i| t0 + i * Duration::from_micros(100))
            .collect();

        let mut fifo = LinkModel::new(jittery.clone(), 7, t0);
        let fifo_releases: Vec<Instant> = arrivals
            .iter()
            .map(|&at| release(fifo.offer(at, 100)))
            .collect();
        assert!(fifo_releases.windows(2).all(|pair| pair[0] <= pair[1]));

        let mut reordering = LinkModel::new(
            LinkShape {
                reorder: true,
                ..jittery
            },
            7,
            t0,
        );
        let releases: Vec<Instant> = arrivals
            .iter()
            .map(|&at| release(reordering.offer(at, 100)))
            .collect();
        for (arrival, released) in arrivals.iter().zip(&releases) {
            let delay = *released - *arrival;
            assert!((10 * MS..=30 * MS).contains(&delay), "delay {delay:?}");
        }
        assert!(
            releases.windows(2).any(|pair| pair[0] > pair[1]),
            "jitter of 10 ms should reorder datagrams 0.1 ms apart"
        );
    }

    #[test]
    fn loss_drops_its_share_and_the_seed_reproduces_it() {
        let t0 = Instant::now();
        let lossy = LinkShape {
            loss: 0.01,
            ..LinkShape::ideal()
        };
        let drops = |seed| {
            let mut link = LinkModel::new(lossy.clone(), seed, t0);
            (0..100_000)
                .map(|_| link.offer(t0, 100))
                .filter(|verdict| *verdict == Verdict::DropLoss)
                .count()
        };
        let first = drops(42);
        assert!((900..=1100).contains(&first), "{first} drops of 100000");
        assert_eq!(first, drops(42));
    }

    #[test]
    fn a_wan_queue_holds_one_round_trip_of_the_rate() {
        let link = LinkShape::wan(50.0, 40, 0, 0.0);
        assert_eq!(link.rate_bits_per_s, Some(50_000_000));
        assert_eq!(link.queue_bytes, 500_000);
        assert_eq!(
            LinkShape::wan(1.0, 1, 0, 0.0).queue_bytes,
            MIN_WAN_QUEUE_BYTES
        );
    }

    #[test]
    fn invalid_shapes_are_refused() {
        let any: SocketAddr = (Ipv4Addr::LOCALHOST, 0).into();
        for shape in [
            LinkShape {
                loss: 1.5,
                ..LinkShape::ideal()
            },
            LinkShape {
                loss: f64::NAN,
                ..LinkShape::ideal()
            },
            LinkShape {
                rate_bits_per_s: Some(0),
                ..LinkShape::ideal()
            },
            LinkShape {
                latency: 2 * MAX_ONE_WAY_DELAY,
                ..LinkShape::ideal()
            },
        ] {
            let error = Relay::start(RelayConfig::symmetric(any, any, shape, 1)).unwrap_err();
            assert_eq!(error.kind(), io::ErrorKind::InvalidInput);
        }
    }
}
