//! Fault injection for crash tests: the agent SIGKILLs itself at a chosen point.
//!
//! Compiled in only with the crate's `test-hooks` feature (the crash tests turn it on; a normal
//! build has no such switch): without it the crash points are empty and no variable is read.
//! With it, off unless `init_from_env` finds one of the variables `STAGECOACH_CRASH_AT` or
//! `STAGECOACH_CRASH_AFTER_OPS`. A SIGKILL runs no destructor and flushes nothing, like a power
//! cut seen from the process (the page cache survives it; that is what the fsyncs are for).

#[cfg(feature = "test-hooks")]
use std::sync::atomic::{AtomicU64, Ordering};
#[cfg(feature = "test-hooks")]
use std::sync::OnceLock;

use super::machine::Step;

/// `<step>:<before|after>`: die just before or just after the side effect of that step (the
/// step's state is already journaled in both cases). Step names are [`Step::name`].
#[cfg(feature = "test-hooks")]
pub const CRASH_AT_ENV: &str = "STAGECOACH_CRASH_AT";

/// `N`: die at the N-th crash point of this process (journal writes, and every file operation
/// of unpacking, wiping and copying the identity).
#[cfg(feature = "test-hooks")]
pub const CRASH_AFTER_OPS_ENV: &str = "STAGECOACH_CRASH_AFTER_OPS";

/// Where around a step's side effect a crash lands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// After the step is journaled, before its side effect.
    Before,
    /// After its side effect, before the next state is journaled.
    After,
}

#[cfg(feature = "test-hooks")]
#[derive(Debug)]
struct Faults {
    at: Option<(Step, Phase)>,
    after_ops: Option<u64>,
    ops: AtomicU64,
}

#[cfg(feature = "test-hooks")]
static FAULTS: OnceLock<Faults> = OnceLock::new();

/// Reads the fault-injection variables. Call once at start-up; an error names the bad value.
#[cfg(feature = "test-hooks")]
pub fn init_from_env() -> Result<(), String> {
    let at = match std::env::var(CRASH_AT_ENV) {
        Ok(text) => Some(parse_crash_at(&text)?),
        Err(_) => None,
    };
    let after_ops =
        match std::env::var(CRASH_AFTER_OPS_ENV) {
            Ok(text) => Some(text.parse::<u64>().map_err(|_| {
                format!("{CRASH_AFTER_OPS_ENV}={text:?} is not a count of operations")
            })?),
            Err(_) => None,
        };
    if at.is_some() || after_ops.is_some() {
        tracing::warn!(?at, ?after_ops, "fault injection armed");
    }
    // A second call keeps the first setting: the variables do not change within a process.
    let _ = FAULTS.set(Faults {
        at,
        after_ops,
        ops: AtomicU64::new(0),
    });
    Ok(())
}

/// Parses `<step>:<before|after>`.
#[cfg(feature = "test-hooks")]
pub fn parse_crash_at(text: &str) -> Result<(Step, Phase), String> {
    let bad = || {
        format!("{CRASH_AT_ENV}={text:?}: expected <step>:<before|after>, with a step such as install-target")
    };
    let (step, phase) = text.split_once(':').ok_or_else(bad)?;
    let step = Step::from_name(step).ok_or_else(bad)?;
    let phase = match phase {
        "before" => Phase::Before,
        "after" => Phase::After,
        _ => return Err(bad()),
    };
    Ok((step, phase))
}

/// A crash point around a step's side effect.
#[cfg(feature = "test-hooks")]
pub fn step_point(step: Step, phase: Phase) {
    if let Some(faults) = FAULTS.get() {
        if faults.at == Some((step, phase)) {
            die(&format!("{}:{phase:?}", step.name()));
        }
    }
    op_point("step");
}

/// A crash point after one operation (`what` is logged when it fires).
#[cfg(feature = "test-hooks")]
pub fn op_point(what: &'static str) {
    if let Some(faults) = FAULTS.get() {
        let done = faults.ops.fetch_add(1, Ordering::SeqCst) + 1;
        if faults.after_ops == Some(done) {
            die(&format!("operation {done} ({what})"));
        }
    }
}

/// A crash point around a step's side effect: nothing, in a build without `test-hooks`.
#[cfg(not(feature = "test-hooks"))]
#[inline(always)]
pub fn step_point(_step: Step, _phase: Phase) {}

/// A crash point after one operation: nothing, in a build without `test-hooks`.
#[cfg(not(feature = "test-hooks"))]
#[inline(always)]
pub fn op_point(_what: &'static str) {}

#[cfg(feature = "test-hooks")]
fn die(point: &str) -> ! {
    eprintln!("fault injection: SIGKILL at {point}");
    // SAFETY: kill and getpid have no memory-safety preconditions.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGKILL);
    }
    // SIGKILL cannot be caught; should the kill somehow fail, end just as abruptly.
    std::process::abort()
}

#[cfg(feature = "test-hooks")]
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crash_at_parses_step_and_phase() {
        assert_eq!(
            parse_crash_at("install-target:before"),
            Ok((Step::InstallTarget, Phase::Before))
        );
        assert_eq!(
            parse_crash_at("commit:after"),
            Ok((Step::Commit, Phase::After))
        );
        assert!(parse_crash_at("install-target").is_err());
        assert!(parse_crash_at("nope:before").is_err());
        assert!(parse_crash_at("commit:during").is_err());
    }
}
