//! What every Stagecoach test shares, so that a test run says what it ran.
//!
//! - [`skip_or_fail`] and [`can_run`]: a test that cannot run on this machine (no root, a
//!   missing tool, no loop devices) never reports `ok` silently. With
//!   `STAGECOACH_REQUIRE_ALL=1` (set by `.ci/run`) it fails with the reason; otherwise it prints
//!   `skipped: <test>: <reason>` to stderr, and appends that line to the file named by
//!   `STAGECOACH_SKIP_LOG` so a run can count its skips at the end.
//! - [`need`]: the preconditions tests ask for, each an `Err` with a reason that says what to
//!   install or how to run.
//! - [`wait_until`], [`wait_for`] and their async twins: wait on a condition with a timeout,
//!   instead of sleeping and hoping.
//! - [`etcd`]: a real etcd cluster on loopback (the origin's shared control-plane store).
//! - [`debian`]: Debian root trees built with mmdebstrap, cached by their inputs.
//!
//! This crate is a dev-dependency of every crate (and a dependency of `netsim`, whose mesh
//! harness is test support); nothing in a node's binary links it.

use std::fmt;
use std::io::Write;
use std::time::{Duration, Instant};

pub mod debian;
pub mod etcd;
pub mod need;

/// Set to `1` to make every test that cannot run fail instead of skipping.
pub const REQUIRE_ALL_VAR: &str = "STAGECOACH_REQUIRE_ALL";

/// Names a file that every skip is appended to, one `skipped: <test>: <reason>` line each.
pub const SKIP_LOG_VAR: &str = "STAGECOACH_SKIP_LOG";

/// Whether this run demands that every test really runs (`STAGECOACH_REQUIRE_ALL=1`).
pub fn require_all() -> bool {
    std::env::var(REQUIRE_ALL_VAR).is_ok_and(|value| value.trim() == "1")
}

/// Reports that `test` cannot run here because of `reason`; the caller returns right after.
///
/// With `STAGECOACH_REQUIRE_ALL=1` this panics with the reason, so the test fails. Otherwise it
/// prints `skipped: <test>: <reason>` to stderr and appends that line to the file named by
/// `STAGECOACH_SKIP_LOG`, when set.
#[track_caller]
pub fn skip_or_fail(test: &str, reason: &str) {
    let line = format!("skipped: {test}: {reason}");
    if require_all() {
        panic!("{line} ({REQUIRE_ALL_VAR}=1: every test must run on this machine)");
    }
    eprintln!("{line}");
    if let Some(path) = std::env::var_os(SKIP_LOG_VAR) {
        // Tests of one binary run on several threads: one append of one whole line each.
        let appended = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut file| file.write_all(format!("{line}\n").as_bytes()));
        if let Err(error) = appended {
            eprintln!(
                "cannot append to {SKIP_LOG_VAR}={}: {error}",
                path.to_string_lossy()
            );
        }
    }
}

/// Whether `test` can run here: true when every precondition holds. Otherwise reports the
/// reasons of those that do not through [`skip_or_fail`] and returns false, and the test
/// returns:
///
/// ```no_run
/// use stagecoach_testing::{can_run, need};
/// if !can_run("swaps_on_ext4", &[need::root(), need::tools(&["losetup"])]) {
///     return;
/// }
/// ```
#[track_caller]
pub fn can_run(test: &str, preconditions: &[Result<(), String>]) -> bool {
    let reasons: Vec<&str> = preconditions
        .iter()
        .filter_map(|check| check.as_ref().err())
        .map(String::as_str)
        .collect();
    if reasons.is_empty() {
        return true;
    }
    skip_or_fail(test, &reasons.join("; "));
    false
}

/// A condition that did not come true in time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TimedOut {
    /// How long it was waited for.
    pub after: Duration,
}

impl fmt::Display for TimedOut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the condition did not hold within {:?}", self.after)
    }
}

impl std::error::Error for TimedOut {}

/// Why [`wait_for`] gave up: time ran out, or the condition failed for good.
#[derive(Debug)]
pub enum WaitError<E> {
    /// The condition did not come true in time.
    TimedOut(TimedOut),
    /// The condition returned an error (a process it watches died, say).
    Failed(E),
}

impl<E: fmt::Display> fmt::Display for WaitError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WaitError::TimedOut(timed_out) => timed_out.fmt(f),
            // `{:#}` so an anyhow error shows its whole chain.
            WaitError::Failed(error) => write!(f, "{error:#}"),
        }
    }
}

impl<E: fmt::Display + fmt::Debug> std::error::Error for WaitError<E> {}

/// Checks `condition` at once and then every `poll` until it returns `Ok(Some(value))`, which is
/// returned, or `Err`, which ends the wait, or until `timeout` has passed. Blocks the thread.
pub fn wait_for<T, E>(
    timeout: Duration,
    poll: Duration,
    mut condition: impl FnMut() -> Result<Option<T>, E>,
) -> Result<T, WaitError<E>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = condition().map_err(WaitError::Failed)? {
            return Ok(value);
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(WaitError::TimedOut(TimedOut { after: timeout }));
        }
        std::thread::sleep(poll.min(deadline - now));
    }
}

/// Checks `condition` at once and then every `poll` until it is true or `timeout` has passed.
/// Blocks the thread.
pub fn wait_until(
    timeout: Duration,
    poll: Duration,
    mut condition: impl FnMut() -> bool,
) -> Result<(), TimedOut> {
    wait_for(timeout, poll, || {
        Ok::<_, std::convert::Infallible>(condition().then_some(()))
    })
    .map_err(|error| match error {
        WaitError::TimedOut(timed_out) => timed_out,
        WaitError::Failed(never) => match never {},
    })
}

/// [`wait_for`] for async code: sleeps on the tokio timer between checks.
pub async fn wait_for_async<T, E>(
    timeout: Duration,
    poll: Duration,
    mut condition: impl AsyncFnMut() -> Result<Option<T>, E>,
) -> Result<T, WaitError<E>> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = condition().await.map_err(WaitError::Failed)? {
            return Ok(value);
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return Err(WaitError::TimedOut(TimedOut { after: timeout }));
        }
        tokio::time::sleep(poll.min(deadline - now)).await;
    }
}

/// [`wait_until`] for async code: sleeps on the tokio timer between checks.
pub async fn wait_until_async(
    timeout: Duration,
    poll: Duration,
    mut condition: impl AsyncFnMut() -> bool,
) -> Result<(), TimedOut> {
    let waited = wait_for_async(timeout, poll, async || {
        Ok::<_, std::convert::Infallible>(condition().await.then_some(()))
    })
    .await;
    waited.map_err(|error| match error {
        WaitError::TimedOut(timed_out) => timed_out,
        WaitError::Failed(never) => match never {},
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_until_returns_once_the_condition_holds() {
        let mut calls = 0;
        let waited = wait_until(Duration::from_secs(5), Duration::from_millis(1), || {
            calls += 1;
            calls == 3
        });
        assert_eq!(waited, Ok(()));
        assert_eq!(calls, 3);
    }

    #[test]
    fn wait_until_times_out_with_the_timeout_in_the_error() {
        let timeout = Duration::from_millis(30);
        let error = wait_until(timeout, Duration::from_millis(5), || false).unwrap_err();
        assert_eq!(error.after, timeout);
        assert!(error.to_string().contains("30ms"), "{error}");
    }

    #[test]
    fn wait_for_stops_at_the_first_error() {
        let mut calls = 0;
        let waited: Result<(), _> =
            wait_for(Duration::from_secs(5), Duration::from_millis(1), || {
                calls += 1;
                Err("the process died")
            });
        assert!(matches!(waited, Err(WaitError::Failed("the process died"))));
        assert_eq!(calls, 1);
    }

    #[tokio::test]
    async fn wait_for_async_hands_back_the_value() {
        let mut calls = 0u32;
        let value = wait_for_async(
            Duration::from_secs(5),
            Duration::from_millis(1),
            async || {
                calls += 1;
                Ok::<_, String>((calls == 2).then_some(calls * 10))
            },
        )
        .await
        .expect("comes true");
        assert_eq!(value, 20);
    }

    #[test]
    fn can_run_passes_when_every_precondition_holds() {
        assert!(can_run("nothing needed", &[Ok(()), Ok(())]));
    }
}
