//! CPU time of the processes a run started, and of netsim itself, so a run can say what moving
//! its bytes cost: CPU seconds (user + system) per GiB delivered.
//!
//! Long-running children (daemons) are read from `/proc/PID/stat` while they run; short ones
//! (an `edge-agent fetch` without a daemon) are counted when netsim reaps them, through
//! `getrusage(RUSAGE_CHILDREN)`; netsim's own threads (the WAN relays, the harness) through
//! `getrusage(RUSAGE_SELF)`.

use std::collections::BTreeMap;
use std::time::Duration;

/// CPU time at one moment.
#[derive(Clone, Debug, Default)]
pub struct CpuSample {
    /// Each named running child's CPU so far.
    pub children: BTreeMap<String, Duration>,
    /// CPU of every child netsim reaped so far (and of their reaped children).
    pub reaped: Duration,
    /// netsim's own CPU so far: relays, harness.
    pub own: Duration,
}

impl CpuSample {
    /// Samples `children` (name, pid) and this process now. A child that exited in the
    /// meantime is left out (its time shows in `reaped` once reaped).
    pub fn now(children: &[(String, u32)]) -> Self {
        let children = children
            .iter()
            .filter_map(|(name, pid)| process_cpu(*pid).map(|cpu| (name.clone(), cpu)))
            .collect();
        Self {
            children,
            reaped: rusage(libc::RUSAGE_CHILDREN),
            own: rusage(libc::RUSAGE_SELF),
        }
    }

    /// CPU spent by child `name` from `earlier` to `self` (zero when it is missing in either).
    pub fn child_since(&self, earlier: &CpuSample, name: &str) -> Duration {
        match (self.children.get(name), earlier.children.get(name)) {
            (Some(now), Some(then)) => now.saturating_sub(*then),
            _ => Duration::ZERO,
        }
    }
}

/// User + system time of process `pid`, from `/proc/PID/stat`; `None` when it is gone or the
/// file cannot be read (not Linux).
pub fn process_cpu(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat_cpu(&stat, clock_ticks_per_second())
}

/// utime + stime (fields 14 and 15) of a `/proc/PID/stat` line. The command name (field 2)
/// is in parentheses and may hold spaces, so fields are counted after its closing one.
fn parse_stat_cpu(stat: &str, ticks_per_second: u64) -> Option<Duration> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_name.split_whitespace();
    // After the name: state (3), ppid (4), ... utime is field 14, the 12th here.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    let ticks = utime + stime;
    let per_second = ticks_per_second.max(1);
    Some(
        Duration::from_secs(ticks / per_second)
            + Duration::from_nanos((ticks % per_second) * 1_000_000_000 / per_second),
    )
}

fn clock_ticks_per_second() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(ticks).ok().filter(|t| *t > 0).unwrap_or(100)
}

/// User + system time of this process so far (every thread).
pub fn own() -> Duration {
    rusage(libc::RUSAGE_SELF)
}

/// User + system time of `who` (`RUSAGE_SELF` or `RUSAGE_CHILDREN`).
fn rusage(who: libc::c_int) -> Duration {
    // SAFETY: getrusage writes one `rusage` into the zeroed struct we own.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(who, &mut usage) } != 0 {
        return Duration::ZERO;
    }
    let time = |t: libc::timeval| {
        Duration::from_secs(u64::try_from(t.tv_sec).unwrap_or(0))
            + Duration::from_micros(u64::try_from(t.tv_usec).unwrap_or(0))
    };
    time(usage.ru_utime) + time(usage.ru_stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_are_read_past_a_name_with_spaces() {
        let line = "1234 (tokio worker 1) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 4 0 100 0 0";
        assert_eq!(parse_stat_cpu(line, 100), Some(Duration::from_millis(3250)));
        assert_eq!(parse_stat_cpu("garbage", 100), None);
    }

    #[test]
    fn this_process_and_a_busy_child_are_measured() {
        let own = process_cpu(std::process::id()).expect("own /proc entry");
        let spin = std::time::Instant::now();
        while spin.elapsed() < Duration::from_millis(200) {
            std::hint::black_box(blake3::hash(&[0u8; 4096]));
        }
        let later = process_cpu(std::process::id()).expect("own /proc entry");
        assert!(later > own, "{own:?} then {later:?}");
        assert!(rusage(libc::RUSAGE_SELF) >= later.saturating_sub(Duration::from_millis(20)));
    }
}
