//! A private network for a test VM ([`GuestNetwork`]): QEMU runs in a network namespace of its
//! own that has nothing but a loopback interface, so QEMU's user-mode network can reach only
//! what this module relays into that namespace. User-mode networking alone lets a guest reach
//! every port of the host (at 10.0.2.2) and, through the host, anything the host reaches; here
//! the guest reaches the UDP ports of the host's loopback a test names (its origin and stager)
//! and nothing else, and the host reaches the guest's agent through one forwarded UDP port.
//!
//! The relays are plain threads with blocking sockets: a socket bound in one namespace stays
//! there, so each relay listens in one namespace and sends from sockets made in the other, one
//! per client address so that the answers find their way back.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

/// How often a relay thread looks at its stop flag.
const POLL: Duration = Duration::from_millis(100);

/// Largest UDP payload relayed.
const MAX_DATAGRAM: usize = 65_536;

/// Most client addresses one relay keeps a socket for (a guest's agent has a few connections).
const MAX_CLIENTS: usize = 256;

/// `127.0.0.1:port`.
fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

/// A network namespace holding one VM's QEMU, and the relays in and out of it. Dropping it
/// stops the relays and closes their sockets (the namespace goes with its last process).
pub struct GuestNetwork {
    ns: Arc<File>,
    stop: Arc<AtomicBool>,
    relays: Vec<JoinHandle<()>>,
    /// Datagrams relayed, both ways.
    pub relayed: Arc<AtomicU64>,
}

impl GuestNetwork {
    /// A new namespace with its loopback up. Inside it, UDP to `127.0.0.1:P` for each `P` of
    /// `reach` arrives at the host's `127.0.0.1:P`; on the host, UDP to `127.0.0.1:agent_port`
    /// arrives at the namespace's `127.0.0.1:agent_port`, where QEMU's `hostfwd` listens.
    /// Needs root (or CAP_SYS_ADMIN) and iproute2's `ip`.
    pub fn new(reach: &[u16], agent_port: u16) -> Result<GuestNetwork> {
        let ns = Arc::new(new_namespace()?);
        let mut network = GuestNetwork {
            ns: ns.clone(),
            stop: Arc::new(AtomicBool::new(false)),
            relays: Vec::new(),
            relayed: Arc::new(AtomicU64::new(0)),
        };
        for &port in reach {
            let listen =
                in_namespace(&ns, move || UdpSocket::bind(loopback(port))).with_context(|| {
                    format!("cannot listen on 127.0.0.1:{port} in the VM's namespace")
                })?;
            network.spawn_relay(
                listen,
                loopback(port),
                Arc::new(|| UdpSocket::bind(loopback(0))),
            );
        }
        let listen = UdpSocket::bind(loopback(agent_port))
            .with_context(|| format!("cannot listen on the host's 127.0.0.1:{agent_port}"))?;
        let inner = ns.clone();
        network.spawn_relay(
            listen,
            loopback(agent_port),
            Arc::new(move || {
                in_namespace(&inner, || UdpSocket::bind(loopback(0)))
                    .map_err(|error| io::Error::other(format!("{error:#}")))
            }),
        );
        Ok(network)
    }

    /// The namespace's file descriptor, for `setns` in a child before it runs QEMU.
    pub fn namespace_fd(&self) -> RawFd {
        self.ns.as_raw_fd()
    }

    /// Relays what arrives at `listen` to `target`, from a socket `upstream` makes per client.
    fn spawn_relay(
        &mut self,
        listen: UdpSocket,
        target: SocketAddr,
        upstream: Arc<dyn Fn() -> io::Result<UdpSocket> + Send + Sync>,
    ) {
        let stop = self.stop.clone();
        let relayed = self.relayed.clone();
        self.relays.push(std::thread::spawn(move || {
            if let Err(error) = relay(listen, target, upstream, &stop, &relayed) {
                tracing::warn!(%target, error = format!("{error:#}"), "VM network relay stopped");
            }
        }));
    }
}

impl Drop for GuestNetwork {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for relay in self.relays.drain(..) {
            let _ = relay.join();
        }
    }
}

/// One relay: datagrams from each client to `target` through its own upstream socket, and a
/// thread per client carrying the answers back. Returns when `stop` is set.
fn relay(
    listen: UdpSocket,
    target: SocketAddr,
    upstream: Arc<dyn Fn() -> io::Result<UdpSocket> + Send + Sync>,
    stop: &Arc<AtomicBool>,
    relayed: &Arc<AtomicU64>,
) -> Result<()> {
    listen.set_read_timeout(Some(POLL))?;
    let listen = Arc::new(listen);
    let mut clients: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
    let mut answers = Vec::new();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    while !stop.load(Ordering::Relaxed) {
        let (len, client) = match listen.recv_from(&mut buf) {
            Ok(received) => received,
            Err(error) if is_timeout(&error) => continue,
            Err(error) => return Err(error).context("relay receive"),
        };
        let socket = match clients.get(&client) {
            Some(socket) => socket.clone(),
            None if clients.len() >= MAX_CLIENTS => {
                tracing::warn!(%client, %target, "VM network relay: too many clients; datagram dropped");
                continue;
            }
            None => {
                let made = upstream().and_then(|socket| {
                    socket.connect(target)?;
                    socket.set_read_timeout(Some(POLL))?;
                    Ok(socket)
                });
                let socket = match made {
                    Ok(socket) => Arc::new(socket),
                    Err(error) => {
                        tracing::warn!(%client, %target, %error, "VM network relay: no upstream socket; datagram dropped");
                        continue;
                    }
                };
                clients.insert(client, socket.clone());
                let (back, listen, stop, relayed) = (
                    socket.clone(),
                    listen.clone(),
                    stop.clone(),
                    relayed.clone(),
                );
                answers.push(std::thread::spawn(move || {
                    let mut buf = vec![0u8; MAX_DATAGRAM];
                    while !stop.load(Ordering::Relaxed) {
                        match back.recv(&mut buf) {
                            Ok(len) => {
                                if listen.send_to(&buf[..len], client).is_ok() {
                                    relayed.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                            Err(error) if is_timeout(&error) => {}
                            // Nothing listens at the target yet (ICMP port unreachable):
                            // the client retries.
                            Err(error) if error.kind() == io::ErrorKind::ConnectionRefused => {}
                            Err(_) => break,
                        }
                    }
                }));
                socket
            }
        };
        match socket.send(&buf[..len]) {
            Ok(_) => {
                relayed.fetch_add(1, Ordering::Relaxed);
            }
            Err(error) => {
                tracing::debug!(%client, %target, %error, "VM network relay: send failed")
            }
        }
    }
    for answer in answers {
        let _ = answer.join();
    }
    Ok(())
}

fn is_timeout(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

/// A new network namespace with its loopback up, held by the returned descriptor.
fn new_namespace() -> Result<File> {
    std::thread::spawn(|| -> Result<File> {
        // SAFETY: unshare changes only this thread's namespaces; the thread ends right after.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            bail!(
                "cannot make a network namespace for the VM (needs root): {}",
                io::Error::last_os_error()
            );
        }
        let ns = File::open("/proc/thread-self/ns/net")
            .context("cannot open the new network namespace")?;
        // A child forked from this thread starts in its namespace.
        let output = Command::new("ip")
            .args(["link", "set", "lo", "up"])
            .stdin(Stdio::null())
            .output()
            .context("cannot run ip (Debian: iproute2)")?;
        if !output.status.success() {
            bail!(
                "ip link set lo up failed in the VM's namespace: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(ns)
    })
    .join()
    .map_err(|_| anyhow!("the namespace thread panicked"))?
}

/// Runs `make` on a thread that joined the namespace `ns`: a socket it binds lives there.
fn in_namespace<T: Send>(ns: &File, make: impl FnOnce() -> io::Result<T> + Send) -> Result<T> {
    let fd = ns.as_raw_fd();
    std::thread::scope(|scope| {
        scope
            .spawn(move || -> Result<T> {
                // SAFETY: setns changes only this thread's network namespace; `fd` stays open
                // for the call (the caller borrows the file).
                if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } != 0 {
                    bail!(
                        "cannot enter the VM's network namespace: {}",
                        io::Error::last_os_error()
                    );
                }
                Ok(make()?)
            })
            .join()
            .map_err(|_| anyhow!("the namespace thread panicked"))?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Datagrams cross both ways, and the namespace reaches nothing else: needs root.
    #[test]
    fn the_namespace_reaches_only_the_relayed_ports() {
        if !stagecoach_testing::can_run(
            "vmnet::the_namespace_reaches_only_the_relayed_ports",
            &[stagecoach_testing::need::network_namespaces()],
        ) {
            return;
        }
        // A host service the namespace may reach, and one it may not.
        let allowed = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let forbidden = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let allowed_port = allowed.local_addr().expect("addr").port();
        let forbidden_port = forbidden.local_addr().expect("addr").port();
        let agent_port = crate::vm::free_udp_port().expect("port");
        let network = GuestNetwork::new(&[allowed_port], agent_port).expect("network");

        // Out: a socket in the namespace reaches the allowed port, and its answer comes back.
        let inside = in_namespace(&network.ns, || UdpSocket::bind("127.0.0.1:0")).expect("bind");
        inside
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        inside
            .send_to(b"hello", ("127.0.0.1", allowed_port))
            .expect("send");
        let mut buf = [0u8; 16];
        allowed
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let (len, from) = allowed.recv_from(&mut buf).expect("the host got it");
        assert_eq!(&buf[..len], b"hello");
        allowed.send_to(b"back", from).expect("answer");
        let len = inside.recv(&mut buf).expect("the answer came back");
        assert_eq!(&buf[..len], b"back");

        // The other port is not there, nor is anything off the loopback.
        let _ = inside.send_to(b"nope", ("127.0.0.1", forbidden_port));
        forbidden
            .set_read_timeout(Some(Duration::from_millis(500)))
            .expect("timeout");
        assert!(
            forbidden.recv_from(&mut buf).is_err(),
            "a port not relayed must not be reachable from the namespace"
        );
        let off_loopback = inside.send_to(b"out", ("192.0.2.1", 9));
        assert!(
            off_loopback.is_err(),
            "the namespace has no route off its loopback"
        );

        // In: the host's agent port reaches a socket in the namespace (QEMU's hostfwd there).
        let guest = in_namespace(&network.ns, move || {
            UdpSocket::bind(("127.0.0.1", agent_port))
        })
        .expect("bind in the namespace");
        guest
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let host = UdpSocket::bind("127.0.0.1:0").expect("bind");
        host.send_to(b"ping", ("127.0.0.1", agent_port))
            .expect("send");
        let (len, from) = guest.recv_from(&mut buf).expect("the guest side got it");
        assert_eq!(&buf[..len], b"ping");
        guest.send_to(b"pong", from).expect("answer");
        host.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let len = host.recv(&mut buf).expect("the answer came back");
        assert_eq!(&buf[..len], b"pong");
        // (An answer is counted just after it is sent: "pong" may not be yet.)
        assert!(network.relayed.load(Ordering::Relaxed) >= 3);

        // A machine started again (after a power cut) gets the same ports: dropping the
        // network closed them.
        drop(guest);
        drop(network);
        let again = GuestNetwork::new(&[allowed_port], agent_port);
        assert!(
            again.is_ok(),
            "the ports are free again once the network is dropped: {:?}",
            again.err()
        );
    }
}
