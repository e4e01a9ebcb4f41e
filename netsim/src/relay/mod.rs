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
//! 0. **MTU.** A datagram larger than [`WAN_MAX_DATAGRAM_BYTES`] (an Ethernet frame's payload) is
//!    dropped on arrival (counted in [`DirectionStats::dropped_oversize_datagrams`]), so QUIC's
//!    path MTU discovery finds a WAN's size through the relay and loopback's beside it.
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
//!
//! # Code map
//!
//! - `shape`: what a link does ([`LinkShape`]) and what a relay joins ([`RelayConfig`]).
//! - `model`: one direction of a link as a pure function of arrival times (token bucket,
//!   queue, delay, loss); no clock, no sockets.
//! - `link`: one direction at run time: the delay line and the task that sends what is due.
//! - `clients`: the NAT-like client mappings and the tasks that receive datagrams.
//! - `stats`: the counters ([`RelayStats`]).
//! - `capture`: the optional pcap file of every datagram forwarded ([`RelayConfig::capture`]).

mod capture;
mod clients;
mod link;
mod model;
mod shape;
mod stats;

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::oneshot;

use capture::Capture;
use clients::Shared;
pub use shape::{bdp_bytes, LinkShape, RelayConfig};
use stats::Counters;
pub use stats::{DirectionStats, RelayStats};

pub use netsim_sim::IPV4_UDP_HEADER_BYTES;

/// Wire size of a full-size datagram (an Ethernet MTU), in bytes; sizes the token bucket's burst.
pub const FULL_DATAGRAM_WIRE_BYTES: usize = 1500;

/// Largest UDP payload a relay carries, in bytes: a full-size datagram less its IPv4 and UDP
/// headers. A WAN is Ethernet-sized even where the ends (loopback here) carry jumbo frames, so
/// larger datagrams (QUIC's path MTU probes) are dropped, as a real path drops them, and counted
/// in [`DirectionStats::dropped_oversize_datagrams`].
pub const WAN_MAX_DATAGRAM_BYTES: usize = FULL_DATAGRAM_WIRE_BYTES - IPV4_UDP_HEADER_BYTES;

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

/// Kernel receive and send buffer asked for each relay socket: the mesh endpoints' size. The
/// default (208 KiB) overflows when the relay thread is descheduled for a few milliseconds at
/// high rates, and a datagram the kernel drops there is lost without being counted.
pub use proto::net::udp::SOCKET_BUFFER_BYTES;

/// A running relay; dropping it stops it.
#[derive(Debug)]
pub struct Relay {
    local_addr: SocketAddr,
    counters: Arc<Counters>,
    capture: Option<Arc<Capture>>,
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
        proto::net::udp::enlarge_buffers(&listen, SOCKET_BUFFER_BYTES);
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
        let capture = match &config.capture {
            Some(path) => Some(Arc::new(Capture::create(path).map_err(|error| {
                io::Error::new(
                    error.kind(),
                    format!("cannot create the capture file {}: {error}", path.display()),
                )
            })?)),
            None => None,
        };
        let (stop, stopped) = oneshot::channel();
        let relay_counters = counters.clone();
        let relay_capture = capture.clone();
        let thread = std::thread::Builder::new()
            .name("netsim-relay".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let relay = Shared::new(listen, &config, relay_counters, relay_capture);
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
            capture,
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

    /// Writes out the datagrams captured so far (see [`RelayConfig::capture`]), so the file
    /// can be read while the relay runs.
    pub fn flush_capture(&self) {
        if let Some(capture) = &self.capture {
            capture.flush();
        }
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

/// Locks `mutex`; a panic elsewhere while holding it leaves counters and queues usable.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

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
