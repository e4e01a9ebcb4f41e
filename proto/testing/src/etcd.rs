//! A real etcd cluster on loopback for tests: Debian's `etcd` (package `etcd-server`), one
//! process per member on ephemeral ports, each with its own data directory, killed and removed
//! when the [`EtcdCluster`] is dropped. Members can be killed and started again, as a test of
//! quorum loss needs.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::need;

/// How long a cluster may take to elect a leader and answer on every member.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Whether etcd is installed (`Err` says what to install).
pub fn available() -> Result<(), String> {
    need::tools(&["etcd"])
}

/// One member.
struct Member {
    name: String,
    client: SocketAddr,
    peer: SocketAddr,
    data: PathBuf,
    log: PathBuf,
    process: Option<Child>,
}

/// A running cluster; its members stop and their data is removed on drop.
pub struct EtcdCluster {
    members: Vec<Member>,
    dir: PathBuf,
    token: String,
}

fn free_port() -> io::Result<SocketAddr> {
    TcpListener::bind("127.0.0.1:0")?.local_addr()
}

impl EtcdCluster {
    /// Starts `size` members and waits until each answers `/health` (a leader is elected).
    pub fn start(size: usize) -> io::Result<Self> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let token = format!(
            "stagecoach-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let dir = std::env::temp_dir().join(&token);
        std::fs::create_dir_all(&dir)?;
        let mut members = Vec::with_capacity(size);
        for i in 0..size {
            members.push(Member {
                name: format!("m{i}"),
                client: free_port()?,
                peer: free_port()?,
                data: dir.join(format!("m{i}.etcd")),
                log: dir.join(format!("m{i}.log")),
                process: None,
            });
        }
        let mut cluster = Self {
            members,
            dir,
            token,
        };
        for i in 0..size {
            cluster.spawn(i, "new")?;
        }
        cluster.wait_healthy(START_TIMEOUT)?;
        Ok(cluster)
    }

    fn spawn(&mut self, i: usize, state: &str) -> io::Result<()> {
        let initial: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("{}=http://{}", m.name, m.peer))
            .collect();
        let member = &self.members[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&member.log)?;
        let etcd = need::find_tool("etcd")
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "etcd is not installed"))?;
        let child = Command::new(etcd)
            .args(["--name", &member.name])
            .arg("--data-dir")
            .arg(&member.data)
            .args(["--listen-client-urls", &format!("http://{}", member.client)])
            .args([
                "--advertise-client-urls",
                &format!("http://{}", member.client),
            ])
            .args(["--listen-peer-urls", &format!("http://{}", member.peer)])
            .args([
                "--initial-advertise-peer-urls",
                &format!("http://{}", member.peer),
            ])
            .args(["--initial-cluster", &initial.join(",")])
            .args(["--initial-cluster-token", &self.token])
            .args(["--initial-cluster-state", state])
            // A policy load rewrites every node whose desired bundles change, in one
            // transaction: allow fleets of test size.
            .args(["--max-txn-ops", "20000", "--max-request-bytes", "33554432"])
            .args(["--heartbeat-interval", "100", "--election-timeout", "1000"])
            .args(["--logger", "zap", "--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        self.members[i].process = Some(child);
        Ok(())
    }

    /// Waits until every running member answers `/health` with `true`.
    pub fn wait_healthy(&mut self, timeout: Duration) -> io::Result<()> {
        let deadline = Instant::now() + timeout;
        for i in 0..self.members.len() {
            if self.members[i].process.is_none() {
                continue;
            }
            loop {
                if let Some(process) = self.members[i].process.as_mut() {
                    if let Some(status) = process.try_wait()? {
                        return Err(io::Error::other(format!(
                            "etcd member {} exited ({status}); its log:\n{}",
                            self.members[i].name,
                            self.log(i)
                        )));
                    }
                }
                if health(self.members[i].client).unwrap_or(false) {
                    break;
                }
                if Instant::now() >= deadline {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!(
                            "etcd member {} not healthy after {timeout:?}; its log:\n{}",
                            self.members[i].name,
                            self.log(i)
                        ),
                    ));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Ok(())
    }

    /// The members' client addresses, `HOST:PORT`.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| m.client.to_string()).collect()
    }

    /// `etcd://A,B,C/PREFIX`: what `origin serve --store` takes.
    pub fn store_url(&self, prefix: &str) -> String {
        format!("etcd://{}/{prefix}", self.endpoints().join(","))
    }

    /// Kills member `i` (SIGKILL) and waits for it to exit.
    pub fn kill(&mut self, i: usize) -> io::Result<()> {
        if let Some(mut process) = self.members[i].process.take() {
            process.kill()?;
            process.wait()?;
        }
        Ok(())
    }

    /// Starts member `i` again on its data (it rejoins the cluster).
    pub fn restart(&mut self, i: usize) -> io::Result<()> {
        self.kill(i)?;
        self.spawn(i, "existing")
    }

    /// Member `i`'s log so far (for a failure message).
    pub fn log(&self, i: usize) -> String {
        let text = std::fs::read_to_string(&self.members[i].log).unwrap_or_default();
        let start = text.len().saturating_sub(4000);
        let start = (start..text.len())
            .find(|&n| text.is_char_boundary(n))
            .unwrap_or(text.len());
        text[start..].to_owned()
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            let _ = self.kill(i);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Whether the member at `addr` answers `GET /health` with `"health":"true"`.
fn health(addr: SocketAddr) -> io::Result<bool> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.write_all(
        format!("GET /health HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    Ok(answer.contains("\"health\":\"true\""))
}
