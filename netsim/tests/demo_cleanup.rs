//! `netsim demo` stops every process it started: when it is interrupted (Ctrl-C) in the middle
//! of the fan-out, and when it fails. Processes are found by their command line, which names
//! the demo's work directory.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use netsim::procs;

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

fn assert_nothing_left(work: &Path) {
    // Children get SIGKILL; give the kernel a moment to reap them.
    let left = procs::wait_until_gone(work, Duration::from_secs(5));
    assert!(
        left.is_empty(),
        "processes left running after the demo stopped: {left:#?}"
    );
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
    procs::wait_for_fanout(&mut demo, &work_dir.join("logs"), START_TIMEOUT)
        .expect("the demo reaches its fan-out");
    // The demo, the origin and two stagers at least; edge fetches start one by one.
    let running = procs::processes_mentioning(&work_dir);
    assert!(
        running.len() >= 4,
        "expected the demo, the origin and the stagers to be running, found {running:#?}"
    );

    // SAFETY: kill(2) with a pid we own.
    let rc = unsafe { libc::kill(demo.id() as i32, libc::SIGINT) };
    assert_eq!(rc, 0, "cannot signal the demo");
    let status = procs::wait_for_exit(&mut demo, STOP_TIMEOUT).expect("the demo stops");
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

/// `--hold` keeps the whole mesh and the origin's console up after the result, with the
/// demo's admin account, until Ctrl-C; then every process stops and the demo exits 0.
#[test]
fn hold_keeps_the_mesh_and_its_console_up_until_ctrl_c() {
    let work = tempfile::tempdir().expect("tempdir");
    let work_dir = work.path().join("demo");
    let mut demo = Command::new(bin_dir().join("netsim"))
        .args(["demo", "--bundle-mib", "4", "--hold", "--work-dir"])
        .arg(&work_dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start netsim demo --hold");
    let stdout = demo.stdout.take().expect("stdout");
    // The result table comes while every process still runs.
    let (lines, table) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if line.starts_with("origin egress") && lines.send(line).is_err() {
                return;
            }
        }
    });
    let egress = table
        .recv_timeout(START_TIMEOUT)
        .expect("the demo prints its result and holds");
    assert!(egress.contains("all edges hold the bundle"), "{egress}");
    assert_eq!(demo.try_wait().expect("wait"), None, "the demo holds");

    let login = std::fs::read_to_string(work_dir.join("console-login.txt")).expect("login file");
    let field = |prefix: &str| {
        login
            .lines()
            .find_map(|l| l.strip_prefix(prefix))
            .expect("a login field")
            .trim()
            .to_owned()
    };
    let console = login
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("http://"))
        .map(|l| l.trim_end_matches('/').to_owned())
        .expect("the console's address");
    let (name, password) = (field("name:"), field("password:"));
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let overview: serde_json::Value = runtime.block_on(async {
        let session = netsim::console::log_in(&console, &name, &password)
            .await
            .expect("log in with the printed account");
        let cookie = session.cookie;
        let overview = netsim::http::get(&console, "/api/overview", &[("cookie", &cookie)])
            .await
            .expect("overview");
        serde_json::from_str(&overview.body).expect("overview JSON")
    });
    let sites = overview["sites"].as_array().expect("sites");
    assert_eq!(sites.len(), 2, "{overview:#}");
    let stored = overview["bundles"][0]["stored_bytes"]
        .as_u64()
        .expect("the bundle's stored bytes");
    for site in sites {
        assert_eq!(site["stagers"], 1, "{site}");
        assert_eq!(site["edges"], 4, "{site}");
        assert!(
            site["wan_bytes_from_origin"].as_u64() >= Some(stored),
            "{site}: the site pulled the {stored}-byte bundle"
        );
    }
    assert_eq!(overview["account"]["role"], "admin");

    // SAFETY: kill(2) with a pid we own.
    let rc = unsafe { libc::kill(demo.id() as i32, libc::SIGINT) };
    assert_eq!(rc, 0, "cannot signal the demo");
    let status = procs::wait_for_exit(&mut demo, STOP_TIMEOUT).expect("the demo stops");
    assert!(
        status.success(),
        "a held demo ends well on Ctrl-C: {status}"
    );
    assert_nothing_left(&work_dir);
}
