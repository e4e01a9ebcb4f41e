//! Starting the real Stagecoach binaries and making sure every one of them stops.
//!
//! Each child is started with `PR_SET_PDEATHSIG = SIGKILL`, so it dies with netsim even when
//! netsim itself is killed with SIGKILL; [`Fleet`]'s `Drop` kills whatever is left on every
//! other exit path (error, panic, Ctrl-C).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use stagecoach_testing::WaitError;
use tokio::process::{Child, Command};

/// How long a daemon may take to write its ready file.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// How often the ready file is polled.
const READY_POLL: Duration = Duration::from_millis(20);

/// How often a child's status or the process table is polled.
const PROCESS_POLL: Duration = Duration::from_millis(50);

/// Where the sibling binaries (`origin`, `stager`, `edge-agent`) live.
#[derive(Clone, Debug)]
pub struct Binaries {
    dir: PathBuf,
}

impl Binaries {
    /// The directory of the running executable, which `cargo build --bins` fills with all
    /// workspace binaries.
    pub fn beside_current_exe() -> Result<Self> {
        let exe = std::env::current_exe().context("cannot find the running executable")?;
        let mut dir = exe
            .parent()
            .context("the running executable has no parent directory")?
            .to_path_buf();
        // Integration tests run from target/<profile>/deps.
        if dir.ends_with("deps") {
            dir.pop();
        }
        Self::in_dir(dir)
    }

    /// Binaries in `dir`; fails with a hint when one is missing.
    pub fn in_dir(dir: PathBuf) -> Result<Self> {
        for name in ["origin", "stager", "edge-agent"] {
            if !dir.join(name).is_file() {
                bail!(
                    "binary `{name}` not found in {}: build them with `cargo build --release --bins`",
                    dir.display()
                );
            }
        }
        Ok(Self { dir })
    }

    /// Path of binary `name`.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Fails, saying how to fix it, unless `stager` and `edge-agent` were built with their
    /// test switches (`serve --test-corrupt-serving`), which only the `test-hooks` feature
    /// compiles in.
    pub fn require_test_hooks(&self) -> Result<()> {
        for name in ["origin", "stager", "edge-agent"] {
            let bin = self.path(name);
            // With the switch, clap reaches `--help` and succeeds; without, it refuses the switch.
            let output = std::process::Command::new(&bin)
                .args(["serve", "--test-corrupt-serving", "--help"])
                .output()
                .with_context(|| format!("cannot run {}", bin.display()))?;
            if !output.status.success() {
                bail!(
                    "{} has no test switches: build the binaries with \
                     `cargo build --release --bins --features {TEST_HOOK_FEATURES}` (as `make test` does)",
                    bin.display()
                );
            }
        }
        Ok(())
    }
}

/// The cargo features that compile the test switches into the binaries.
pub const TEST_HOOK_FEATURES: &str = "origin/test-hooks,stager/test-hooks,edge-agent/test-hooks";

/// A command to run, with its log file (truncated).
pub fn command(bin: &Path, args: &[String], log: &Path) -> Result<Command> {
    let log_file = std::fs::File::create(log)
        .with_context(|| format!("cannot create log file {}", log.display()))?;
    command_with_log(bin, args, log_file)
}

/// A command to run, appending to its log file.
pub fn command_appending(bin: &Path, args: &[String], log: &Path) -> Result<Command> {
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("cannot open log file {}", log.display()))?;
    command_with_log(bin, args, log_file)
}

fn command_with_log(bin: &Path, args: &[String], log_file: std::fs::File) -> Result<Command> {
    let err_file = log_file
        .try_clone()
        .context("cannot duplicate log file handle")?;
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(log_file))
        .stderr(Stdio::from(err_file))
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        )
        .env("NO_COLOR", "1")
        .kill_on_drop(true);
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(cmd)
}

/// Every long-running process netsim started. Dropping it kills them all.
#[derive(Default)]
pub struct Fleet {
    children: Vec<(String, Child)>,
}

/// Sends SIGTERM to `child` if it has not been reaped.
fn terminate(child: &Child) {
    if let Some(pid) = child.id() {
        // SAFETY: plain kill(2) on a pid we started and have not reaped.
        unsafe {
            libc::kill(pid as i32, libc::SIGTERM);
        }
    }
}

/// How long a child may take to exit after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(3);

impl Fleet {
    /// Starts `cmd` as `name` and keeps it.
    pub fn spawn(&mut self, name: &str, mut cmd: Command) -> Result<u32> {
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        let pid = child.id().unwrap_or(0);
        tracing::debug!(name, pid, "started");
        self.children.push((name.to_owned(), child));
        Ok(pid)
    }

    /// Every running child's name and pid.
    pub fn pids(&self) -> Vec<(String, u32)> {
        self.children
            .iter()
            .filter_map(|(name, child)| child.id().map(|pid| (name.clone(), pid)))
            .collect()
    }

    /// Fails if any child has exited, naming it and its status.
    pub fn check_alive(&mut self) -> Result<()> {
        for (name, child) in &mut self.children {
            if let Ok(Some(status)) = child.try_wait() {
                bail!("{name} exited early with {status}; see its log");
            }
        }
        Ok(())
    }

    /// Kills the child called `name` with SIGKILL and waits for it.
    pub async fn kill(&mut self, name: &str) -> Result<()> {
        if let Some(pos) = self.children.iter().position(|(n, _)| n == name) {
            let (_, mut child) = self.children.remove(pos);
            child
                .kill()
                .await
                .with_context(|| format!("cannot kill {name}"))?;
        }
        Ok(())
    }

    /// Stops the child called `name`: SIGTERM, a short grace period, then SIGKILL.
    pub async fn stop(&mut self, name: &str) -> Result<()> {
        let Some(pos) = self.children.iter().position(|(n, _)| n == name) else {
            return Ok(());
        };
        let (_, mut child) = self.children.remove(pos);
        terminate(&child);
        if tokio::time::timeout(STOP_GRACE, child.wait())
            .await
            .is_err()
        {
            tracing::warn!(name = %name, "did not stop on SIGTERM; killing");
            child
                .kill()
                .await
                .with_context(|| format!("cannot kill {name}"))?;
        }
        Ok(())
    }

    /// Stops every child: SIGTERM, a short grace period, then SIGKILL.
    pub async fn shutdown(&mut self) {
        for (_, child) in &self.children {
            terminate(child);
        }
        let deadline = Instant::now() + STOP_GRACE;
        for (name, child) in &mut self.children {
            let left = deadline.saturating_duration_since(Instant::now());
            if tokio::time::timeout(left, child.wait()).await.is_err() {
                tracing::warn!(name = %name, "did not stop on SIGTERM; killing");
                let _ = child.kill().await;
            }
        }
        self.children.clear();
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for (_, child) in &mut self.children {
            let _ = child.start_kill();
        }
    }
}

/// Waits until `path` exists and parses as JSON `T` (daemons write it atomically once bound).
pub async fn wait_ready<T: serde::de::DeserializeOwned>(
    path: &Path,
    fleet: &mut Fleet,
) -> Result<T> {
    stagecoach_testing::wait_for_async(READY_TIMEOUT, READY_POLL, async || {
        if let Ok(bytes) = std::fs::read(path) {
            if let Ok(value) = serde_json::from_slice(&bytes) {
                return Ok(Some(value));
            }
        }
        fleet.check_alive().map(|()| None)
    })
    .await
    .with_context(|| format!("{} did not appear", path.display()))
}

/// Runs a short-lived command to completion and returns its stdout; fails with its stderr.
pub async fn run_to_end(bin: &Path, args: &[String]) -> Result<String> {
    let mut cmd = Command::new(bin);
    cmd.args(args).stdin(Stdio::null()).kill_on_drop(true);
    let output = cmd
        .output()
        .await
        .with_context(|| format!("cannot run {}", bin.display()))?;
    if !output.status.success() {
        bail!(
            "{} {} failed with {}: {}",
            bin.display(),
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Fetches the Prometheus text of a daemon's metrics endpoint (`GET /metrics`).
pub async fn scrape(addr: &str) -> Result<String> {
    let response = crate::http::get(addr, "/metrics", &[]).await?;
    if !response.status.is_success() {
        bail!("metrics endpoint {addr} answered {}", response.status);
    }
    Ok(response.body)
}

/// Sums every series of `name` in Prometheus text whose labels include all of `labels`.
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> u64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (series_name, series_labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            if series_name != name {
                return None;
            }
            let all = labels
                .iter()
                .all(|(k, v)| series_labels.contains(&format!("{k}=\"{v}\"")));
            if !all {
                return None;
            }
            value.trim().parse::<u64>().ok()
        })
        .sum()
}

/// What a command-line run printed and whether it succeeded.
#[derive(Clone, Debug)]
pub struct CliRun {
    /// Whether it exited 0.
    pub ok: bool,
    /// Its standard output.
    pub stdout: String,
    /// Its standard error.
    pub stderr: String,
}

/// Runs `bin ARGS` to its end with no input (killed if the future is dropped).
pub async fn run_cli(bin: &Path, args: &[String]) -> Result<CliRun> {
    let output = Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .with_context(|| format!("cannot run {}", bin.display()))?;
    Ok(CliRun {
        ok: output.status.success(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    })
}

/// Runs `bin ARGS` to its end with `input` on its standard input (killed if the future is
/// dropped).
pub async fn run_cli_input(bin: &Path, args: &[String], input: &[u8]) -> Result<CliRun> {
    use tokio::io::AsyncWriteExt;
    let mut child = Command::new(bin)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot run {}", bin.display()))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(input).await?;
    }
    let output = child
        .wait_with_output()
        .await
        .with_context(|| format!("cannot run {}", bin.display()))?;
    Ok(CliRun {
        ok: output.status.success(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    })
}

/// Every live process's pid and arguments, read from `/proc` (a process that ends while it is
/// read is skipped; a zombie has no arguments).
pub fn live_processes() -> Vec<(u32, Vec<String>)> {
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
        let args = raw
            .split(|&b| b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        found.push((pid, args));
    }
    found
}

/// Pids and command lines of the live processes whose command line mentions `needle` (a work
/// directory, say: every process a run started names it).
pub fn processes_mentioning(needle: &Path) -> Vec<(u32, String)> {
    let needle = needle.to_string_lossy();
    live_processes()
        .into_iter()
        .map(|(pid, args)| (pid, args.join(" ")))
        .filter(|(_, cmdline)| cmdline.contains(needle.as_ref()))
        .collect()
}

/// Waits up to `timeout` until no live process mentions `needle`; returns those still running.
pub fn wait_until_gone(needle: &Path, timeout: Duration) -> Vec<(u32, String)> {
    let _ = stagecoach_testing::wait_until(timeout, PROCESS_POLL, || {
        processes_mentioning(needle).is_empty()
    });
    processes_mentioning(needle)
}

/// Waits up to `timeout` for `child` to exit; kills it (and fails) when it does not.
pub fn wait_for_exit(
    child: &mut std::process::Child,
    timeout: Duration,
) -> Result<std::process::ExitStatus> {
    let exited = stagecoach_testing::wait_for(timeout, PROCESS_POLL, || child.try_wait());
    match exited {
        Ok(status) => Ok(status),
        Err(WaitError::Failed(error)) => Err(error).context("cannot wait for the child"),
        Err(WaitError::TimedOut(_)) => {
            let _ = child.kill();
            let _ = child.wait();
            bail!("the child did not stop within {timeout:?}");
        }
    }
}

/// Waits up to `timeout` until a `*.fetch.log` appears under `logs`: a netsim run (demo or
/// emulate) has started its fan-out. Fails when `child` (that run) exits first.
pub fn wait_for_fanout(
    child: &mut std::process::Child,
    logs: &Path,
    timeout: Duration,
) -> Result<()> {
    stagecoach_testing::wait_for(timeout, PROCESS_POLL, || {
        let fetching = std::fs::read_dir(logs)
            .map(|dir| {
                dir.flatten()
                    .any(|e| e.file_name().to_string_lossy().ends_with(".fetch.log"))
            })
            .unwrap_or(false);
        if fetching {
            return Ok(Some(()));
        }
        match child.try_wait().context("cannot wait for the child")? {
            Some(status) => bail!("the run ended before the fan-out: {status}"),
            None => Ok(None),
        }
    })
    .context("the run never reached the fan-out")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_sum_filters_by_labels() {
        let text = "# HELP x y\nstagecoach_bytes_sent_total{peer_role=\"edge\",peer_site=\"a\"} 10\nstagecoach_bytes_sent_total{peer_role=\"stager\",peer_site=\"a\"} 5\nother 7\n";
        assert_eq!(metric_sum(text, "stagecoach_bytes_sent_total", &[]), 15);
        assert_eq!(
            metric_sum(
                text,
                "stagecoach_bytes_sent_total",
                &[("peer_role", "edge")]
            ),
            10
        );
        assert_eq!(metric_sum(text, "other", &[]), 7);
        assert_eq!(metric_sum(text, "missing", &[]), 0);
    }
}
