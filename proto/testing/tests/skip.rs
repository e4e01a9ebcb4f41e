//! `skip_or_fail` as a test run sees it: the test binary runs its own ignored `child_skips`
//! test in a child process, with and without `STAGECOACH_REQUIRE_ALL=1`.

use std::process::Command;

use stagecoach_testing::{skip_or_fail, REQUIRE_ALL_VAR, SKIP_LOG_VAR};

/// The child's reason, to be found in its output.
const REASON: &str = "needs a flux capacitor";

/// Runs in the child only (it is ignored in a normal run): reports a skip and returns.
#[test]
#[ignore = "run by skip_is_reported_and_fails_under_require_all in a child process"]
fn child_skips() {
    skip_or_fail("child_skips", REASON);
}

fn run_child(require_all: bool, skip_log: &std::path::Path) -> std::process::Output {
    let exe = std::env::current_exe().expect("test executable");
    let mut child = Command::new(exe);
    child
        .args(["child_skips", "--exact", "--ignored", "--nocapture"])
        .env(SKIP_LOG_VAR, skip_log)
        .env_remove(REQUIRE_ALL_VAR);
    if require_all {
        child.env(REQUIRE_ALL_VAR, "1");
    }
    child.output().expect("run the test binary")
}

#[test]
fn skip_is_reported_and_fails_under_require_all() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("skips.log");

    let relaxed = run_child(false, &log);
    let stderr = String::from_utf8_lossy(&relaxed.stderr);
    assert!(relaxed.status.success(), "a plain skip passes: {stderr}");
    assert!(
        stderr.contains(&format!("skipped: child_skips: {REASON}")),
        "{stderr}"
    );
    let logged = std::fs::read_to_string(&log).expect("skip log written");
    assert_eq!(logged, format!("skipped: child_skips: {REASON}\n"));

    let strict = run_child(true, &log);
    let output = format!(
        "{}{}",
        String::from_utf8_lossy(&strict.stdout),
        String::from_utf8_lossy(&strict.stderr)
    );
    assert!(
        !strict.status.success(),
        "under {REQUIRE_ALL_VAR}=1 a skip fails the test: {output}"
    );
    assert!(
        output.contains(REASON),
        "the failure names the reason: {output}"
    );
    // A failure is not a skip: the log still holds the one line.
    let logged = std::fs::read_to_string(&log).expect("skip log");
    assert_eq!(logged.lines().count(), 1, "{logged}");
}
