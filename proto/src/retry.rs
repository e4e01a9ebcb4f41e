//! The one retry loop: exponential backoff with full jitter, bounded by a number of attempts and
//! optionally by the time spent, a warning per failed attempt, and an error that says how many
//! attempts were made. Every retry of an operation that can fail for a while (a chunk from the
//! origin, a preheat, a start-up negotiation) goes through [`retry`].
//!
//! "Full jitter": the wait after the n-th failed attempt is drawn uniformly from zero to
//! `min(max_delay, base_delay × 2^(n-1))`, so nodes that failed together do not retry together.

use std::fmt;
use std::future::Future;
use std::time::Duration;

use rand::Rng;
use tokio::time::Instant;

/// How often and how long to retry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Most attempts, the first one included (at least 1).
    pub max_attempts: u32,
    /// No attempt starts later than this after the first one (`None`: attempts bound alone).
    pub max_elapsed: Option<Duration>,
    /// Upper bound of the first wait; doubles per failed attempt.
    pub base_delay: Duration,
    /// Upper bound of any wait.
    pub max_delay: Duration,
}

impl RetryPolicy {
    /// `max_attempts` attempts (at least 1), waits growing from `base_delay` up to `max_delay`.
    pub fn new(max_attempts: u32, base_delay: Duration, max_delay: Duration) -> Self {
        Self {
            max_attempts: max_attempts.max(1),
            max_elapsed: None,
            base_delay,
            max_delay: max_delay.max(base_delay),
        }
    }

    /// The same policy, also stopping once `max_elapsed` has passed since the first attempt.
    pub fn with_max_elapsed(mut self, max_elapsed: Duration) -> Self {
        self.max_elapsed = Some(max_elapsed);
        self
    }

    /// The upper bound of the wait after failed attempt `attempt` (1-based):
    /// `min(max_delay, base_delay × 2^(attempt-1))`. The actual wait is uniform in `0..=` it.
    pub fn delay_cap(&self, attempt: u32) -> Duration {
        let factor = 1u32
            .checked_shl(attempt.saturating_sub(1))
            .unwrap_or(u32::MAX);
        self.base_delay
            .checked_mul(factor)
            .unwrap_or(self.max_delay)
            .min(self.max_delay)
    }

    fn jittered_delay(&self, attempt: u32) -> Duration {
        let cap = self.delay_cap(attempt);
        if cap.is_zero() {
            return cap;
        }
        rand::thread_rng().gen_range(Duration::ZERO..=cap)
    }
}

/// Why [`retry`] stopped without a result.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GaveUp {
    /// The policy's attempts are used up.
    Attempts,
    /// The next attempt would start after the policy's time limit.
    Elapsed,
    /// The error is not one a retry can fix.
    NotRetryable,
}

impl fmt::Display for GaveUp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            GaveUp::Attempts => "no attempts left",
            GaveUp::Elapsed => "out of time",
            GaveUp::NotRetryable => "the error is not retryable",
        })
    }
}

/// The last error of an operation [`retry`] gave up on, with the attempts made.
#[derive(Debug, thiserror::Error)]
#[error("{what} failed after {attempts} attempt(s) in {:.1} s ({why}): {last:#}", elapsed.as_secs_f64())]
pub struct RetryError<E> {
    /// What was tried (the `what` given to [`retry`]).
    pub what: String,
    /// Attempts made.
    pub attempts: u32,
    /// Time from the first attempt to giving up.
    pub elapsed: Duration,
    /// Why no further attempt was made.
    pub why: GaveUp,
    /// The error of the last attempt.
    #[source]
    pub last: E,
}

impl<E> RetryError<E> {
    /// The error of the last attempt.
    pub fn into_last(self) -> E {
        self.last
    }
}

/// Runs `operation` (given the 1-based attempt number) until it succeeds, `retryable` says its
/// error cannot be fixed by trying again, or `policy` runs out. Each failed attempt is logged as
/// a warning with `what`, the attempt number, the wait before the next one, and the error (in
/// the alternate form, `{:#}`, which shows an `anyhow` error's whole chain).
pub async fn retry<T, E, Op, Fut, Retryable>(
    what: &str,
    policy: &RetryPolicy,
    retryable: Retryable,
    mut operation: Op,
) -> Result<T, RetryError<E>>
where
    E: fmt::Display,
    Op: FnMut(u32) -> Fut,
    Fut: Future<Output = Result<T, E>>,
    Retryable: Fn(&E) -> bool,
{
    let started = Instant::now();
    let max_attempts = policy.max_attempts.max(1);
    let mut attempt = 1;
    loop {
        let error = match operation(attempt).await {
            Ok(value) => return Ok(value),
            Err(error) => error,
        };
        let delay = policy.jittered_delay(attempt);
        let why = if !retryable(&error) {
            Some(GaveUp::NotRetryable)
        } else if attempt >= max_attempts {
            Some(GaveUp::Attempts)
        } else if policy
            .max_elapsed
            .is_some_and(|limit| started.elapsed() + delay > limit)
        {
            Some(GaveUp::Elapsed)
        } else {
            None
        };
        if let Some(why) = why {
            tracing::warn!(
                what,
                attempt,
                max_attempts,
                error = format!("{error:#}"),
                %why,
                "attempt failed; giving up"
            );
            return Err(RetryError {
                what: what.to_owned(),
                attempts: attempt,
                elapsed: started.elapsed(),
                why,
                last: error,
            });
        }
        tracing::warn!(
            what,
            attempt,
            max_attempts,
            delay_ms = delay.as_millis() as u64,
            error = format!("{error:#}"),
            "attempt failed; retrying"
        );
        tokio::time::sleep(delay).await;
        attempt += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Debug, PartialEq)]
    enum Failure {
        Transient,
        Fatal,
    }

    impl fmt::Display for Failure {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "{self:?}")
        }
    }

    fn is_transient(error: &Failure) -> bool {
        *error == Failure::Transient
    }

    const BASE: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(1);

    /// Runs `retry` with an operation that fails with `failures` in turn and then succeeds;
    /// returns the result and the instants (paused clock) at which each attempt started.
    async fn run(
        policy: RetryPolicy,
        failures: Vec<Failure>,
    ) -> (Result<u32, RetryError<Failure>>, Vec<Instant>) {
        let starts = Arc::new(Mutex::new(Vec::new()));
        let failures = Arc::new(Mutex::new(failures.into_iter()));
        let result = retry("the test operation", &policy, is_transient, |attempt| {
            let starts = starts.clone();
            let failures = failures.clone();
            async move {
                starts.lock().expect("lock").push(Instant::now());
                match failures.lock().expect("lock").next() {
                    Some(failure) => Err(failure),
                    None => Ok(attempt),
                }
            }
        })
        .await;
        let starts = starts.lock().expect("lock").clone();
        (result, starts)
    }

    #[test]
    fn delay_caps_double_up_to_the_maximum() {
        let policy = RetryPolicy::new(100, BASE, MAX);
        let caps: Vec<u64> = (1..=6)
            .map(|a| policy.delay_cap(a).as_millis() as u64)
            .collect();
        assert_eq!(caps, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(policy.delay_cap(u32::MAX), MAX);
    }

    #[tokio::test(start_paused = true)]
    async fn succeeds_after_transient_failures_with_bounded_waits() {
        let policy = RetryPolicy::new(10, BASE, MAX);
        let failures = (0..6).map(|_| Failure::Transient).collect();
        let (result, starts) = run(policy, failures).await;
        assert_eq!(result.expect("succeeds at the seventh attempt"), 7);
        assert_eq!(starts.len(), 7);
        for (n, pair) in starts.windows(2).enumerate() {
            let waited = pair[1] - pair[0];
            let cap = policy.delay_cap(n as u32 + 1);
            assert!(waited <= cap, "wait {n}: {waited:?} above its cap {cap:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_at_the_attempt_limit() {
        let policy = RetryPolicy::new(4, BASE, MAX);
        let failures = (0..10).map(|_| Failure::Transient).collect();
        let (result, starts) = run(policy, failures).await;
        let error = result.expect_err("never succeeds");
        assert_eq!(starts.len(), 4);
        assert_eq!(error.attempts, 4);
        assert_eq!(error.why, GaveUp::Attempts);
        assert_eq!(error.last, Failure::Transient);
        let message = error.to_string();
        assert!(
            message.contains("the test operation failed after 4 attempt(s)"),
            "{message}"
        );
        // No wait after the last attempt: the error comes as soon as it failed.
        let total: Duration = starts.windows(2).map(|p| p[1] - p[0]).sum();
        assert_eq!(error.elapsed, total);
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_when_out_of_time() {
        let limit = Duration::from_secs(5);
        let policy = RetryPolicy::new(u32::MAX, BASE, MAX).with_max_elapsed(limit);
        let failures = (0..100_000).map(|_| Failure::Transient).collect();
        let (result, starts) = run(policy, failures).await;
        let error = result.expect_err("never succeeds");
        assert_eq!(error.why, GaveUp::Elapsed);
        assert_eq!(error.attempts as usize, starts.len());
        let last_start = starts[starts.len() - 1] - starts[0];
        assert!(last_start <= limit, "an attempt started at {last_start:?}");
        // It stops only when the next wait (at most MAX) would cross the limit.
        assert!(
            error.elapsed + MAX > limit,
            "stopped early at {:?}",
            error.elapsed
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_non_retryable_error_stops_at_once() {
        let policy = RetryPolicy::new(10, BASE, MAX);
        let failures = vec![Failure::Transient, Failure::Fatal, Failure::Transient];
        let (result, starts) = run(policy, failures).await;
        let error = result.expect_err("fatal");
        assert_eq!(starts.len(), 2);
        assert_eq!(error.attempts, 2);
        assert_eq!(error.why, GaveUp::NotRetryable);
        assert_eq!(error.last, Failure::Fatal);
        assert_eq!(error.elapsed, starts[1] - starts[0]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_first_success_does_not_wait() {
        let started = Instant::now();
        let (result, starts) = run(RetryPolicy::new(3, BASE, MAX), Vec::new()).await;
        assert_eq!(result.expect("succeeds"), 1);
        assert_eq!(starts, [started]);
    }
}
