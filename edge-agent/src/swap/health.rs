//! Running the health checks of a trial boot.

use std::io::Read;
use std::net::{TcpStream, ToSocketAddrs};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::boot::Slot;
use super::plan::HealthCheck;

/// Longest a command check may run before it is killed and counted as failed, in seconds.
pub const COMMAND_TIMEOUT_SECS: u64 = 60;

/// Longest a TCP connection to the stager may take to open, in milliseconds.
pub const STAGER_CONNECT_TIMEOUT_MS: u64 = 5_000;

/// How often a running command is polled for its exit, in milliseconds.
const POLL_INTERVAL_MS: u64 = 10;

/// Output of a failed command kept in the failure reason, in bytes (the tail is kept).
pub const MAX_REPORTED_OUTPUT_BYTES: usize = 512;

/// Variable naming the slot under test (`A` or `B`) for command checks.
pub const SLOT_ENV: &str = "STAGECOACH_SLOT";

/// Variable holding the root directory of the OS under test for command checks (`/` on a real
/// machine, the slot directory in the simulator).
pub const SLOT_ROOT_ENV: &str = "STAGECOACH_SLOT_ROOT";

/// Where the kernel lists network interfaces.
const SYS_CLASS_NET: &str = "/sys/class/net";

/// Runs one check; `Err` holds a reason an operator can act on.
pub fn run_check(check: &HealthCheck, slot: Slot, slot_root: &Path) -> Result<(), String> {
    let started = Instant::now();
    let result = match check {
        HealthCheck::NetworkUp => network_up(),
        HealthCheck::ReachStager { addr } => reach(addr),
        HealthCheck::Command { command } => run_command(command, slot, slot_root),
    };
    let elapsed_ms = started.elapsed().as_millis() as u64;
    match &result {
        Ok(()) => tracing::info!(check = %check, elapsed_ms, "health check passed"),
        Err(reason) => tracing::warn!(check = %check, elapsed_ms, %reason, "health check failed"),
    }
    result.map_err(|reason| {
        format!(
            "health check {} failed: {reason}",
            short(&check.to_string())
        )
    })
}

/// Longest check description quoted in a failure reason, in characters.
const MAX_CHECK_CHARS: usize = 60;

/// A check's description, cut to [`MAX_CHECK_CHARS`] so reasons stay readable.
fn short(text: &str) -> String {
    if text.chars().count() <= MAX_CHECK_CHARS {
        return text.to_owned();
    }
    let cut: String = text.chars().take(MAX_CHECK_CHARS).collect();
    format!("{cut}...")
}

fn network_up() -> Result<(), String> {
    let entries = std::fs::read_dir(SYS_CLASS_NET)
        .map_err(|e| format!("cannot list {SYS_CLASS_NET}: {e}"))?;
    let mut seen = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == "lo" {
            continue;
        }
        let state = std::fs::read_to_string(entry.path().join("operstate")).unwrap_or_default();
        if state.trim() == "up" {
            return Ok(());
        }
        seen.push(format!("{name}={}", state.trim()));
    }
    Err(format!(
        "no network interface other than lo is up ({})",
        if seen.is_empty() {
            "none found".to_owned()
        } else {
            seen.join(", ")
        }
    ))
}

/// One of the stagers in `addrs` (`HOST:PORT`, several separated by commas: a site's stager
/// and its backups) answers.
fn reach(addrs: &str) -> Result<(), String> {
    let mut failures = Vec::new();
    for addr in addrs.split(',').map(str::trim).filter(|a| !a.is_empty()) {
        match reach_one(addr) {
            Ok(()) => return Ok(()),
            Err(reason) => failures.push(reason),
        }
    }
    if failures.is_empty() {
        return Err(format!("no stager address in {addrs:?}"));
    }
    Err(failures.join("; "))
}

fn reach_one(addr: &str) -> Result<(), String> {
    let timeout = Duration::from_millis(STAGER_CONNECT_TIMEOUT_MS);
    let addrs: Vec<_> = addr
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve stager address {addr}: {e}"))?
        .collect();
    let mut last = format!("{addr} resolves to no address");
    for socket in addrs {
        // A stager serves QUIC (UDP); a TCP service at the address (a proxy, say) counts too.
        match quic_probe(socket, timeout) {
            Ok(()) => return Ok(()),
            Err(quic) => match TcpStream::connect_timeout(&socket, timeout) {
                Ok(_) => return Ok(()),
                Err(tcp) => {
                    last = format!("cannot reach stager {socket}: QUIC: {quic}; TCP: {tcp}")
                }
            },
        }
    }
    Err(last)
}

/// A QUIC handshake with the stager at `addr`, abandoned once it answers.
fn quic_probe(addr: std::net::SocketAddr, timeout: Duration) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start a runtime for the probe: {e}"))?;
    runtime
        .block_on(proto::net::probe(addr, timeout))
        .map_err(|e| e.to_string())
}

fn run_command(command: &str, slot: Slot, slot_root: &Path) -> Result<(), String> {
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(command)
        .env(SLOT_ENV, slot.as_str())
        .env(SLOT_ROOT_ENV, slot_root)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start sh: {e}"))?;
    // Drain the pipes on threads so a chatty command cannot block on a full pipe.
    let readers: Vec<_> = [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    ]
    .into_iter()
    .flatten()
    .map(|mut pipe| {
        std::thread::spawn(move || {
            let mut out = Vec::new();
            let _ = pipe.read_to_end(&mut out);
            out
        })
    })
    .collect();
    let deadline = Instant::now() + Duration::from_secs(COMMAND_TIMEOUT_SECS);
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Ok(status),
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                break Err(format!("timed out after {COMMAND_TIMEOUT_SECS} s"));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(POLL_INTERVAL_MS)),
            Err(e) => break Err(format!("cannot wait for sh: {e}")),
        }
    };
    let mut output = Vec::new();
    for reader in readers {
        output.extend(reader.join().unwrap_or_default());
    }
    let status = status?;
    if status.success() {
        return Ok(());
    }
    let tail_start = output.len().saturating_sub(MAX_REPORTED_OUTPUT_BYTES);
    let tail = String::from_utf8_lossy(&output[tail_start..])
        .trim()
        .to_owned();
    Err(if tail.is_empty() {
        format!("{status}")
    } else {
        format!("{status}: {tail}")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_check_reports_status_and_output() {
        let root = Path::new("/");
        assert_eq!(
            run_check(&"command=true".parse().expect("check"), Slot::A, root),
            Ok(())
        );
        let err = run_check(
            &"command=echo stager down >&2; exit 3"
                .parse()
                .expect("check"),
            Slot::A,
            root,
        )
        .expect_err("fails");
        assert!(err.contains("exit status: 3"), "{err}");
        assert!(err.contains("stager down"), "{err}");
    }

    #[test]
    fn command_sees_the_slot_under_test() {
        let check =
            "command=test \"$STAGECOACH_SLOT\" = B && test \"$STAGECOACH_SLOT_ROOT\" = /tmp"
                .parse()
                .expect("check");
        assert_eq!(run_check(&check, Slot::B, Path::new("/tmp")), Ok(()));
        assert!(run_check(&check, Slot::A, Path::new("/tmp")).is_err());
    }

    #[test]
    fn unreachable_stager_fails_with_the_address() {
        // Port 1 on loopback: nothing listens there.
        let err = run_check(
            &"reach-stager=127.0.0.1:1".parse().expect("check"),
            Slot::A,
            Path::new("/"),
        )
        .expect_err("nothing listens");
        assert!(err.contains("127.0.0.1:1"), "{err}");
    }

    #[test]
    fn one_reachable_stager_of_several_is_enough() {
        // A TCP service counts as a stager that answers.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listener");
        let live = listener.local_addr().expect("address");
        let check = format!("reach-stager=127.0.0.1:1,{live}")
            .parse()
            .expect("check");
        assert_eq!(run_check(&check, Slot::A, Path::new("/")), Ok(()));
        let err = run_check(
            &"reach-stager=127.0.0.1:1,127.0.0.1:2"
                .parse()
                .expect("check"),
            Slot::A,
            Path::new("/"),
        )
        .expect_err("neither answers");
        assert!(
            err.contains("127.0.0.1:1") && err.contains("127.0.0.1:2"),
            "both are named: {err}"
        );
    }
}
