//! Issue 17: server-sent-event fan-out of the origin's console to 50 open pages.
//!
//! A real origin (netsim's [`Testbed`], one site, one edge whose daemon is replaced by a
//! socket that never answers, so a rollout stays running) serves its console on loopback. 50
//! sessions log in (one account, one session each) and each opens `GET /api/events`. Then the
//! rollout is paused and resumed through the console's API, `STAGECOACH_SSE_CHANGES` times
//! (default 10): for each change, the time from the API's answer (the change is made) to the
//! event naming the new phase arriving on all 50 streams. Prints the median and max over the
//! changes, of the slowest stream and of the median stream.
//!
//! The console reads its state every 500 ms (`console::live::POLL_INTERVAL`) and sends only
//! on change, so the figure is bounded below by the wait for the next read (0–500 ms). Each
//! change is made right after the previous event arrived, i.e. right after a read, so the
//! figure sits near the top of that range: ~480 ms, of which the spread across the 50 streams
//! is under a millisecond.
//!
//! Run (the binaries must be built first; the harness starts them from `target/release`):
//!
//! ```text
//! cargo build --release --workspace --all-targets --features origin/test-hooks,stager/test-hooks,edge-agent/test-hooks
//! cargo bench --workspace --features origin/test-hooks,stager/test-hooks,edge-agent/test-hooks --bench console_sse
//! ```
//!
//! Environment: `STAGECOACH_SSE_PAGES` (streams, default 50), `STAGECOACH_SSE_CHANGES`.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hyper::Method;
use netsim::console::HeldRollout;
use netsim::http;
use netsim::procs::Binaries;
use netsim::sse::EventStream;
use serde_json::Value;

const ADMIN: &str = "bench";
const ADMIN_PASSWORD: &str = "bench-has-a-long-password";

/// How long one change may take to reach every stream.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(30);

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() -> Result<()> {
    if std::env::args().any(|a| a == "--list") {
        println!("console_sse: bench");
        return Ok(());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(run())
}

fn phase_of(data: &str) -> Option<String> {
    let state: Value = serde_json::from_str(data).ok()?;
    state["rollout"]["phase"].as_str().map(str::to_owned)
}

async fn log_in(console: &str) -> Result<(String, String)> {
    let session = netsim::console::log_in(console, ADMIN, ADMIN_PASSWORD).await?;
    Ok((session.cookie, session.csrf))
}

fn median(values: &mut [Duration]) -> Duration {
    values.sort();
    values[values.len() / 2]
}

async fn run() -> Result<()> {
    let pages = env_usize("STAGECOACH_SSE_PAGES", 50);
    let changes = env_usize("STAGECOACH_SSE_CHANGES", 10).max(1);
    let work = tempfile::tempdir()?;
    let bins = Binaries::beside_current_exe().context("build the binaries first")?;
    let mut held =
        HeldRollout::start(bins, work.path(), &[(ADMIN, "admin", ADMIN_PASSWORD)]).await?;
    let console = held.console.clone();
    let mesh = &mut held.mesh;
    mesh.rollout_all("os@2", "rescue-os@1").await?;

    let mut sessions = Vec::new();
    for _ in 0..pages {
        sessions.push(log_in(&console).await?);
    }
    let (arrivals_tx, mut arrivals) = tokio::sync::mpsc::unbounded_channel();
    for (index, (cookie, _)) in sessions.iter().enumerate() {
        let mut stream = EventStream::open(&console, "/api/events", cookie).await?;
        let first = stream.next(CHANGE_TIMEOUT).await?;
        if phase_of(&first.data).as_deref() != Some("running") {
            bail!("stream {index} opened on {}", first.data);
        }
        let arrivals_tx = arrivals_tx.clone();
        tokio::spawn(async move {
            while let Ok(event) = stream.next(Duration::from_secs(3600)).await {
                if let Some(phase) = phase_of(&event.data) {
                    let _ = arrivals_tx.send((index, phase, Instant::now()));
                }
            }
        });
    }
    println!("{pages} event streams open on {console}; {changes} changes");

    let (_, csrf) = &sessions[0];
    let cookie = sessions[0].0.clone();
    let mut slowest = Vec::new();
    let mut medians = Vec::new();
    for change in 0..changes {
        let (action, phase) = if change % 2 == 0 {
            ("pause", "paused")
        } else {
            ("resume", "running")
        };
        let answer = http::request(
            &console,
            Method::POST,
            &format!(
                "/api/rollouts/{}/{action}",
                mesh_rollout_id(&console, &cookie).await?
            ),
            &[("cookie", cookie.as_str()), ("x-csrf-token", csrf.as_str())],
            Vec::new(),
        )
        .await?;
        let changed = Instant::now();
        if !answer.status.is_success() {
            bail!("{action}: {} {}", answer.status, answer.body);
        }
        let mut seen = vec![None; pages];
        let deadline = tokio::time::Instant::now() + CHANGE_TIMEOUT;
        while seen.iter().any(Option::is_none) {
            let (index, got, at) = tokio::time::timeout_at(deadline, arrivals.recv())
                .await
                .context("not every stream got the change in time")?
                .context("streams ended")?;
            if got == phase && seen[index].is_none() {
                seen[index] = Some(at.saturating_duration_since(changed));
            }
        }
        let mut latencies: Vec<Duration> = seen.into_iter().flatten().collect();
        let max = *latencies.iter().max().context("no latencies")?;
        let mid = median(&mut latencies);
        println!(
            "change {}: {action}: all {pages} streams after {:.1} ms (median stream {:.1} ms)",
            change + 1,
            max.as_secs_f64() * 1e3,
            mid.as_secs_f64() * 1e3
        );
        slowest.push(max);
        medians.push(mid);
    }
    let max_of_slowest = *slowest.iter().max().context("no changes")?;
    println!(
        "console SSE fan-out to {pages} pages over {changes} changes: last page after median {:.0} ms, max {:.0} ms; median page after median {:.0} ms",
        median(&mut slowest).as_secs_f64() * 1e3,
        max_of_slowest.as_secs_f64() * 1e3,
        median(&mut medians).as_secs_f64() * 1e3,
    );
    mesh.shutdown().await;
    Ok(())
}

/// The running rollout's console id.
async fn mesh_rollout_id(console: &str, cookie: &str) -> Result<String> {
    let overview = http::get(console, "/api/overview", &[("cookie", cookie)]).await?;
    let overview: Value = serde_json::from_str(&overview.body)?;
    overview["rollouts"][0]["id"]
        .as_str()
        .map(str::to_owned)
        .context("no rollout under way")
}
