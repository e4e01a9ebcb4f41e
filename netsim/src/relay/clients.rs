//! The relay's clients, as a NAT sees them: one upstream socket per client source address, so
//! the server tells clients apart and replies go back to the client they belong to. The tasks
//! here receive datagrams (from clients on the listen socket, from the server on each upstream
//! socket) and hand them to the direction's [`Link`].

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;

use super::capture::Capture;
use super::link::{Datagram, Link};
use super::model::LinkModel;
use super::stats::Counters;
use super::{lock, RelayConfig, MAX_CLIENTS};

/// Largest UDP payload, in bytes: the size of every receive buffer.
const MAX_DATAGRAM_BYTES: usize = 65_535;

/// Mixed into [`RelayConfig::seed`] for the down direction, so the two directions draw
/// independent losses.
const DOWN_SEED_SALT: u64 = 0x9e37_79b9_7f4a_7c15;

/// The relay's state shared by its tasks (all on the relay's one thread).
pub(super) struct Shared {
    listen: Arc<UdpSocket>,
    upstream: SocketAddr,
    up: Arc<Link>,
    down: Arc<Link>,
    clients: Mutex<HashMap<SocketAddr, Arc<Client>>>,
    client_idle_timeout: Duration,
    /// Origin of [`Client::last_active_ms`].
    epoch: Instant,
    counters: Arc<Counters>,
}

/// One client mapping: the upstream socket that stands for `addr`.
struct Client {
    addr: SocketAddr,
    socket: Arc<UdpSocket>,
    /// When the mapping last carried a datagram, in milliseconds since [`Shared::epoch`].
    last_active_ms: AtomicU64,
}

impl Shared {
    pub(super) fn new(
        listen: Arc<UdpSocket>,
        config: &RelayConfig,
        counters: Arc<Counters>,
        capture: Option<Arc<Capture>>,
    ) -> Arc<Self> {
        let now = Instant::now();
        let up = Link::new(
            LinkModel::new(config.up.clone(), config.seed, now),
            counters.up.clone(),
            capture.clone(),
        );
        let down = Link::new(
            LinkModel::new(config.down.clone(), config.seed ^ DOWN_SEED_SALT, now),
            counters.down.clone(),
            capture,
        );
        Arc::new(Self {
            listen,
            upstream: config.upstream,
            up,
            down,
            clients: Mutex::new(HashMap::new()),
            client_idle_timeout: config.client_idle_timeout,
            epoch: now,
            counters,
        })
    }

    /// Runs the relay: both egress tasks, and the up direction's ingress in this task.
    pub(super) async fn run(self: Arc<Self>) {
        tokio::spawn(self.up.clone().egress("up"));
        tokio::spawn(self.down.clone().egress("down"));
        let mut buf = vec![0u8; MAX_DATAGRAM_BYTES];
        loop {
            let (len, from) = match self.listen.recv_from(&mut buf).await {
                Ok(received) => received,
                Err(error) => {
                    // An unconnected UDP socket reports only transient errors here.
                    tracing::debug!(%error, "relay listen socket receive failed");
                    continue;
                }
            };
            let Some(client) = self.client(from) else {
                self.counters.refused_datagrams.fetch_add(1, Relaxed);
                continue;
            };
            self.up.offer(Datagram {
                payload: buf[..len].to_vec(),
                socket: client.socket.clone(),
                to: None,
            });
        }
    }

    /// The mapping of client `addr`, opened if new; `None` if none can be opened.
    fn client(self: &Arc<Self>, addr: SocketAddr) -> Option<Arc<Client>> {
        let mut clients = lock(&self.clients);
        if let Some(client) = clients.get(&addr) {
            client.touch(self.epoch);
            return Some(client.clone());
        }
        if clients.len() >= MAX_CLIENTS {
            tracing::warn!(
                client = %addr,
                max_clients = MAX_CLIENTS,
                "relay full: datagram dropped"
            );
            return None;
        }
        let socket = match self.upstream_socket() {
            Ok(socket) => Arc::new(socket),
            Err(error) => {
                tracing::warn!(
                    client = %addr,
                    upstream = %self.upstream,
                    %error,
                    "cannot open an upstream socket: datagram dropped"
                );
                return None;
            }
        };
        let client = Arc::new(Client {
            addr,
            socket,
            last_active_ms: AtomicU64::new(0),
        });
        client.touch(self.epoch);
        clients.insert(addr, client.clone());
        self.counters.active_clients.fetch_add(1, Relaxed);
        tracing::debug!(
            client = %addr,
            via = ?client.socket.local_addr().ok(),
            "client mapping opened"
        );
        tokio::spawn(self.clone().relay_replies(client.clone()));
        Some(client)
    }

    /// A socket connected to the upstream server (so the kernel passes only its replies).
    fn upstream_socket(&self) -> io::Result<UdpSocket> {
        let any: SocketAddr = match self.upstream {
            SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let socket = std::net::UdpSocket::bind(any)?;
        proto::net::udp::enlarge_buffers(&socket, super::SOCKET_BUFFER_BYTES);
        socket.connect(self.upstream)?;
        socket.set_nonblocking(true)?;
        UdpSocket::from_std(socket)
    }

    /// Down direction ingress of one client, until its mapping expires.
    async fn relay_replies(self: Arc<Self>, client: Arc<Client>) {
        let mut buf = vec![0u8; MAX_DATAGRAM_BYTES];
        loop {
            let idle_deadline = client.idle_deadline(self.epoch, self.client_idle_timeout);
            tokio::select! {
                received = client.socket.recv(&mut buf) => match received {
                    Ok(len) => {
                        client.touch(self.epoch);
                        self.down.offer(Datagram {
                            payload: buf[..len].to_vec(),
                            socket: self.listen.clone(),
                            to: Some(client.addr),
                        });
                    }
                    // A connected socket reports ICMP errors, e.g. the server is not listening.
                    Err(error) => {
                        tracing::debug!(
                            client = %client.addr,
                            %error,
                            "upstream socket receive failed"
                        );
                    }
                },
                () = tokio::time::sleep_until(idle_deadline.into()) => {
                    // Checked under the lock that `client()` touches under, so a datagram is
                    // never relayed through a mapping already removed.
                    let mut clients = lock(&self.clients);
                    let idle_deadline = client.idle_deadline(self.epoch, self.client_idle_timeout);
                    if idle_deadline <= Instant::now() {
                        clients.remove(&client.addr);
                        self.counters.active_clients.fetch_sub(1, Relaxed);
                        tracing::debug!(client = %client.addr, "client mapping expired");
                        return;
                    }
                }
            }
        }
    }
}

impl Client {
    fn touch(&self, epoch: Instant) {
        self.last_active_ms
            .store(epoch.elapsed().as_millis() as u64, Relaxed);
    }

    fn idle_deadline(&self, epoch: Instant, idle_timeout: Duration) -> Instant {
        epoch + Duration::from_millis(self.last_active_ms.load(Relaxed)) + idle_timeout
    }
}
