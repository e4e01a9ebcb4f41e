//! Login rate limiting: after [`FREE_FAILURES`] wrong passwords for one name or from one
//! address, every further attempt is refused (429) until a delay has passed, and the delay
//! doubles with each further failure up to [`MAX_DELAY`].
//!
//! An attempt counts as a failure when it starts and is forgiven when it succeeds, so
//! concurrent guesses cannot slip past the count while their passwords are being checked.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Wrong passwords allowed before attempts are delayed.
pub const FREE_FAILURES: u32 = 5;

/// The first delay, after the last free failure.
pub const FIRST_DELAY: Duration = Duration::from_secs(5);

/// The longest delay.
pub const MAX_DELAY: Duration = Duration::from_secs(15 * 60);

/// A name or address whose last failure is this old starts again from zero.
pub const FORGET_AFTER: Duration = Duration::from_secs(60 * 60);

/// Most names (and, apart, addresses) tracked; past it, entries not delaying anyone go first.
pub const MAX_TRACKED: usize = 10_000;

#[derive(Clone, Copy, Debug)]
struct Entry {
    failures: u32,
    blocked_until: Option<Instant>,
    last_failure: Instant,
}

struct Table<K> {
    entries: Mutex<HashMap<K, Entry>>,
}

impl<K> Default for Table<K> {
    fn default() -> Self {
        Self {
            entries: Mutex::new(HashMap::new()),
        }
    }
}

impl<K: Eq + Hash + Clone> Table<K> {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<K, Entry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How long `key` must still wait at `now`, if at all.
    fn wait(&self, key: &K, now: Instant) -> Option<Duration> {
        let entries = self.lock();
        let until = entries.get(key)?.blocked_until?;
        (until > now).then(|| until - now)
    }

    fn count_failure(&self, key: &K, now: Instant) {
        let mut entries = self.lock();
        if entries.len() >= MAX_TRACKED && !entries.contains_key(key) {
            entries.retain(|_, e| e.blocked_until.is_some_and(|until| until > now));
            if entries.len() >= MAX_TRACKED {
                return;
            }
        }
        let entry = entries.entry(key.clone()).or_insert(Entry {
            failures: 0,
            blocked_until: None,
            last_failure: now,
        });
        if now.saturating_duration_since(entry.last_failure) > FORGET_AFTER {
            entry.failures = 0;
            entry.blocked_until = None;
        }
        entry.failures = entry.failures.saturating_add(1);
        entry.last_failure = now;
        if entry.failures >= FREE_FAILURES {
            entry.blocked_until = Some(now + delay_after(entry.failures));
        }
    }

    fn forgive(&self, key: &K) {
        self.lock().remove(key);
    }
}

/// The delay after the `failures`-th consecutive failure (from the [`FREE_FAILURES`]-th on).
pub fn delay_after(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(FREE_FAILURES).min(16);
    FIRST_DELAY.saturating_mul(1 << doublings).min(MAX_DELAY)
}

/// The limiter of one console.
#[derive(Default)]
pub struct LoginLimiter {
    names: Table<String>,
    addrs: Table<IpAddr>,
}

impl LoginLimiter {
    /// Starts an attempt for `name` from `addr` at `now`: `Err(wait)` when either must still
    /// wait (the attempt is refused and not counted), else the attempt counts as a failure
    /// until [`LoginLimiter::succeeded`] forgives it.
    pub fn begin(&self, name: &str, addr: IpAddr, now: Instant) -> Result<(), Duration> {
        let name = name.to_owned();
        let wait = [self.names.wait(&name, now), self.addrs.wait(&addr, now)]
            .into_iter()
            .flatten()
            .max();
        if let Some(wait) = wait {
            return Err(wait);
        }
        self.names.count_failure(&name, now);
        self.addrs.count_failure(&addr, now);
        Ok(())
    }

    /// The attempt for `name` from `addr` had the right password: both start again from zero.
    pub fn succeeded(&self, name: &str, addr: IpAddr) {
        self.names.forgive(&name.to_owned());
        self.addrs.forgive(&addr);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ADDR: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    #[test]
    fn five_failures_then_growing_delays() {
        let limiter = LoginLimiter::default();
        let t0 = Instant::now();
        for _ in 0..FREE_FAILURES {
            limiter.begin("alice", ADDR, t0).expect("free attempt");
        }
        assert_eq!(limiter.begin("alice", ADDR, t0), Err(FIRST_DELAY));
        let t1 = t0 + FIRST_DELAY;
        limiter.begin("alice", ADDR, t1).expect("after the delay");
        assert_eq!(limiter.begin("alice", ADDR, t1), Err(2 * FIRST_DELAY));
        assert_eq!(delay_after(100), MAX_DELAY);
    }

    #[test]
    fn another_name_from_a_blocked_address_waits_too_and_success_forgives() {
        let limiter = LoginLimiter::default();
        let t0 = Instant::now();
        let other = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2));
        for i in 0..FREE_FAILURES {
            limiter.begin(&format!("name{i}"), ADDR, t0).expect("free");
        }
        assert!(limiter.begin("bob", ADDR, t0).is_err(), "the address waits");
        limiter.begin("bob", other, t0).expect("bob from elsewhere");
        limiter.succeeded("bob", other);
        for _ in 0..FREE_FAILURES - 1 {
            limiter.begin("carol", other, t0).expect("free");
        }
        limiter.succeeded("carol", other);
        limiter.begin("carol", other, t0).expect("forgiven");
    }
}
