//! `netsim demo` stops every process it started: when it is interrupted (Ctrl-C) in the middle
//! of the fan-out, and when it fails. Processes are found by their command line, which names
//! the demo's work directory.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long the demo may take to stop after the signal.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long to wait for the demo to reach the fan-out.
const START_TIMEOUT: Duration = Duration::from_secs(120);

fn bin_dir() -> PathBuf {
    let mut dir = std::env::current_exe().expect("exe");
    dir.pop();
    if dir.ends_with("deps") {
        dir.pop();
    }
    assert!(
        dir.join("netsim").is_file(),
        "build the binaries first: cargo build --release --bins"
    );
    dir
}

/// Pids of live processes whose command line mentions `needle`.
fn processes_mentioning(needle: &Path) -> Vec<(u32, String)> {
    let needle = needle.to_string_lossy().into_owned();
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(raw) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
        // A zombie has an empty command line; it no longer runs.
        if cmdline.contains(&needle) {
            found.push((pid, cmdline));
        }
    }
    found
}

fn wait_for_exit(child: &mut std::process::Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + STOP_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("netsim demo did not stop within {STOP_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn assert_nothing_left(work: &Path) {
    // Children get SIGKILL; give the kernel a moment to reap them.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left = processes_mentioning(work);
        if left.is_empty() {
            return;
        }
        if Instant::now() > deadline {
            panic!("processes left running after the demo stopped: {left:#?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn ctrl_c_during_the_fanout_stops_every_process() {
    let work = tempfile::tempdir().expect("tempdir");
    let work_dir = work.path().join("demo");
    let mut demo = Command::new(bin_dir().join("netsim"))
        .args(["demo", "--bundle-mib", "48", "--work-dir"])
        .arg(&work_dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start netsim demo");

    // Wait until edges are fetching: their fetch logs appear once the fan-out started.
    let deadline = Instant::now() + START_TIMEOUT;
    let logs = work_dir.join("logs");
    loop {
        let fetching = std::fs::read_dir(&logs)
            .map(|dir| {
                dir.flatten()
                    .any(|e| e.file_name().to_string_lossy().ends_with(".fetch.log"))
            })
            .unwrap_or(false);
        if fetching {
            break;
        }
        if let Some(status) = demo.try_wait().expect("wait") {
            panic!("demo ended before the fan-out: {status}");
        }
        assert!(
            Instant::now() < deadline,
            "the demo never reached the fan-out"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The demo, the origin and two stagers at least; edge fetches start one by one.
    let running = processes_mentioning(&work_dir);
    assert!(
        running.len() >= 4,
        "expected the demo, the origin and the stagers to be running, found {running:#?}"
    );

    // SAFETY: kill(2) with a pid we own.
    let rc = unsafe { libc::kill(demo.id() as i32, libc::SIGINT) };
    assert_eq!(rc, 0, "cannot signal the demo");
    let status = wait_for_exit(&mut demo);
    assert_eq!(
        status.code(),
        Some(130),
        "an interrupted demo exits with 130, got {status}"
    );
    assert_nothing_left(&work_dir);
}

#[test]
fn a_failing_demo_stops_every_process() {
    let work = tempfile::tempdir().expect("tempdir");
    let work_dir = work.path().join("demo");
    // Binaries where every edge fetch fails: the demo must fail and clean up.
    let bins = work.path().join("bins");
    std::fs::create_dir_all(&bins).expect("bins dir");
    let real = bin_dir();
    for name in ["origin", "stager"] {
        std::os::unix::fs::symlink(real.join(name), bins.join(name)).expect("symlink");
    }
    let wrapper = format!(
        "#!/bin/sh\ncase \"$1\" in fetch) echo 'injected fetch failure' >&2; exit 3;; esac\nexec '{}' \"$@\"\n",
        real.join("edge-agent").display()
    );
    let wrapper_path = bins.join("edge-agent");
    std::fs::write(&wrapper_path, wrapper).expect("wrapper");
    let mut perms = std::fs::metadata(&wrapper_path)
        .expect("meta")
        .permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    std::fs::set_permissions(&wrapper_path, perms).expect("chmod");

    let output = Command::new(real.join("netsim"))
        .args(["demo", "--bundle-mib", "4", "--work-dir"])
        .arg(&work_dir)
        .arg("--bin-dir")
        .arg(&bins)
        .output()
        .expect("run netsim demo");
    assert!(!output.status.success(), "the demo should have failed");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("failed to fetch") && stderr.contains("injected fetch failure"),
        "the error should name the failing edge and its log: {stderr}"
    );
    assert_nothing_left(&work_dir);
}
