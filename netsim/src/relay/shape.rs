//! What a relay does to datagrams: the shape of each direction of its link, and the relay's
//! configuration.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use super::{CLIENT_IDLE_TIMEOUT, MAX_ONE_WAY_DELAY, MIN_WAN_QUEUE_BYTES};

/// The behaviour of one direction of a link.
#[derive(Clone, Debug, PartialEq)]
pub struct LinkShape {
    /// Bottleneck rate in bits per second of wire bytes (payload plus
    /// [`super::IPV4_UDP_HEADER_BYTES`]); `None` for no limit (and no queue).
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
    pub(super) fn validate(&self, direction: &str) -> io::Result<()> {
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
    /// Address clients send to (port 0 for any free port; see [`super::Relay::local_addr`]).
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
    /// Write every datagram forwarded, both ways, to this pcap file; `None`: no capture.
    pub capture: Option<std::path::PathBuf>,
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
            capture: None,
        }
    }

    /// The round-trip time the link adds: `up.latency + down.latency`.
    pub fn rtt(&self) -> Duration {
        self.up.latency + self.down.latency
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
