//! One direction of a link as a pure function of arrival times: the token bucket, the queue
//! in front of it, the delay and the loss. No clock and no sockets, so it is tested in
//! virtual time.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::shape::LinkShape;
use super::{BURST_DATAGRAMS, FULL_DATAGRAM_WIRE_BYTES, IPV4_UDP_HEADER_BYTES};

/// What a link does with a datagram, decided when it arrives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Verdict {
    /// Deliver it at this instant.
    Release(Instant),
    /// The queue is full.
    DropQueue,
    /// The random loss took it.
    DropLoss,
}

/// One direction of a link as a pure function of arrival times: no clock, no sockets.
pub(super) struct LinkModel {
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
    pub(super) fn new(shape: LinkShape, seed: u64, now: Instant) -> Self {
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
    pub(super) fn offer(&mut self, now: Instant, payload_bytes: usize) -> Verdict {
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
}
