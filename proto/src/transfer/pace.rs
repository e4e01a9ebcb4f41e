//! Upload pacing: a token bucket shared by every upload of a node, so a stager or an edge
//! never sends faster than its configured rate, however many peers ask at once.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Most a limiter lets through at once after an idle spell, in seconds of its rate: small
/// enough that the average holds over any second, large enough for one part at a time.
pub const BURST_SECONDS: f64 = 0.05;

/// Smallest burst, in bytes: one blob part (32 groups of 16 KiB) must always fit.
pub const MIN_BURST_BYTES: f64 = 512.0 * 1024.0 + 64.0 * 1024.0;

/// A token bucket in bytes per second. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct RateLimit {
    bytes_per_s: f64,
    burst_bytes: f64,
    state: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl RateLimit {
    /// A limit of `bits_per_s` (as link rates are quoted).
    pub fn from_bits_per_s(bits_per_s: u64) -> Self {
        let bytes_per_s = (bits_per_s as f64 / 8.0).max(1.0);
        let burst_bytes = (bytes_per_s * BURST_SECONDS).max(MIN_BURST_BYTES);
        Self {
            bytes_per_s,
            burst_bytes,
            state: Mutex::new(Bucket {
                tokens: burst_bytes,
                at: Instant::now(),
            }),
        }
    }

    /// The rate, in bytes per second.
    pub fn bytes_per_s(&self) -> f64 {
        self.bytes_per_s
    }

    /// Waits until `bytes` may be sent, then takes them. Callers ask for one part at a time;
    /// debt is allowed (the bucket goes negative) so a part larger than the burst still passes,
    /// and the next caller waits it off.
    pub async fn acquire(&self, bytes: u64) {
        let wait = {
            let mut bucket = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            let refill = now.duration_since(bucket.at).as_secs_f64() * self.bytes_per_s;
            bucket.tokens = (bucket.tokens + refill).min(self.burst_bytes);
            bucket.at = now;
            bucket.tokens -= bytes as f64;
            if bucket.tokens >= 0.0 {
                Duration::ZERO
            } else {
                Duration::from_secs_f64(-bucket.tokens / self.bytes_per_s)
            }
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn holds_the_rate_over_many_parts() {
        // 80 Mbit/s = 10 MB/s: 30 parts of 512 KiB (15.7 MB) take about 1.5 s, minus the burst.
        let limit = RateLimit::from_bits_per_s(80_000_000);
        let started = Instant::now();
        for _ in 0..30 {
            limit.acquire(512 * 1024).await;
        }
        let elapsed = started.elapsed().as_secs_f64();
        let expected = (30.0 * 512.0 * 1024.0 - limit.burst_bytes) / limit.bytes_per_s();
        assert!(
            elapsed >= expected * 0.95 && elapsed <= expected * 1.5 + 0.1,
            "took {elapsed:.3} s, expected about {expected:.3} s"
        );
    }
}
