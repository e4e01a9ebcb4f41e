//! The WAN relay on real loopback sockets: rate, round-trip time, loss, many clients, queue drops.
//!
//! These are timed tests on a shared machine. The relay runs on its own thread, so load from the
//! QUIC endpoints in the test's runtime does not delay its timers; run them with
//! `--test-threads=1` so they do not compete with each other.

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use netsim::relay::{
    LinkShape, Relay, RelayConfig, RelayStats, BURST_DATAGRAMS, FULL_DATAGRAM_WIRE_BYTES,
    IPV4_UDP_HEADER_BYTES,
};
use quinn::{Endpoint, EndpointConfig, TokioRuntime, TransportConfig, VarInt};
use stagecoach_testing::wait_until_async;
use tokio::net::UdpSocket;

/// The link of the QUIC tests: 50 Mbit/s, 40 ms each way, so an RTT of 80 ms.
const RATE_MBIT_PER_S: f64 = 50.0;
const ONE_WAY_LATENCY_MS: u64 = 40;
const EXPECTED_RTT: Duration = Duration::from_millis(2 * ONE_WAY_LATENCY_MS);

/// How long the bulk transfer is measured.
const BULK_DURATION: Duration = Duration::from_secs(8);

/// Relative tolerance of goodput and RTT.
const TOLERANCE: f64 = 0.15;

/// Round trips of the ping-pong that measures the RTT.
const PINGS: usize = 11;

/// Quinn's windows: far above the 500 KB bandwidth-delay product, so flow control never limits
/// the transfer and the congestion controller meets the relay's queue.
const STREAM_RECEIVE_WINDOW_BYTES: u32 = 16 * 1024 * 1024;
const CONNECTION_RECEIVE_WINDOW_BYTES: u32 = 64 * 1024 * 1024;
const SEND_WINDOW_BYTES: u64 = 64 * 1024 * 1024;

/// Receive buffer of the QUIC endpoints' sockets, in bytes. The endpoints share two cores with
/// the relay and whatever else the machine runs; with the default buffer (208 KiB, 33 ms at
/// 50 Mbit/s) a client that falls behind for a moment loses datagrams in its own kernel, Cubic
/// takes that for congestion, and regrowing its window by one datagram per round trip takes
/// longer than the test. 4 MiB absorbs a stall of over half a second.
const ENDPOINT_RECEIVE_BUFFER_BYTES: usize = 4 * 1024 * 1024;

/// How long a UDP test waits for an answer that should come.
const REPLY_TIMEOUT: Duration = Duration::from_secs(2);

fn any_loopback_port() -> SocketAddr {
    (Ipv4Addr::LOCALHOST, 0).into()
}

fn relay_listen() -> SocketAddr {
    // Another loopback address than the endpoints', so a misrouted datagram cannot look right.
    (Ipv4Addr::new(127, 0, 0, 2), 0).into()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_through_a_50_mbit_80_ms_link_gets_the_rate_and_the_rtt() -> Result<()> {
    let mut link = LinkShape::wan(RATE_MBIT_PER_S, ONE_WAY_LATENCY_MS, 0, 0.0);
    // A queue of 1.5 bandwidth-delay products (750 KB): at a loss the window is about pipe plus
    // queue (2.5 BDP), and Cubic's decrease to 0.7 of it (1.75 BDP) still fills the pipe, so
    // the link never idles after the first loss.
    link.queue_bytes = link.queue_bytes * 3 / 2;
    let server = QuicServer::start()?;
    let relay = Relay::start(RelayConfig::symmetric(relay_listen(), server.addr, link, 1))?;

    let client = quic_endpoint(None)?;
    let conn = client
        .connect_with(server.client_config()?, relay.local_addr(), "localhost")?
        .await
        .context("QUIC handshake through the relay")?;

    let idle_rtt = ping_pong_median_rtt(&conn).await?;
    let download = bulk_download(&conn, BULK_DURATION).await?;
    let busy_rtt = conn.rtt();
    // The queue drains in at most `queue_bytes / rate` (120 ms); then the RTT is the link's again.
    settle(&relay).await;
    let rtt_after = ping_pong_median_rtt(&conn).await?;
    let stats = relay.stats();
    println!(
        "goodput {:.2} Mbit/s ({} bytes in {:.2?}; second half {:.2} Mbit/s), \
         ping-pong RTT {idle_rtt:.2?} before and {rtt_after:.2?} after the transfer \
         (quinn's smoothed RTT at its end, queue included: {busy_rtt:.2?}), \
         datagrams down {}, queue drops down {}",
        download.goodput_mbit_per_s(),
        download.bytes,
        download.elapsed,
        download.steady_goodput_mbit_per_s(),
        stats.down.received_datagrams,
        stats.down.dropped_queue_datagrams,
    );
    conn.close(VarInt::from_u32(0), b"done");

    assert_within(
        download.goodput_mbit_per_s(),
        RATE_MBIT_PER_S,
        "goodput (Mbit/s)",
    );
    for rtt in [idle_rtt, rtt_after] {
        assert_within(
            rtt.as_secs_f64() * 1e3,
            EXPECTED_RTT.as_secs_f64() * 1e3,
            "RTT (ms)",
        );
    }
    assert_eq!(stats.down.dropped_loss_datagrams, 0);
    assert_eq!(stats.down.send_errors, 0);
    client.wait_idle().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_percent_loss_drops_one_percent_of_datagrams() -> Result<()> {
    const DATAGRAMS: usize = 25_000;
    const BATCH: usize = 50;
    let sink = UdpSocket::bind(any_loopback_port()).await?;
    let link = LinkShape {
        loss: 0.01,
        ..LinkShape::ideal()
    };
    let relay = Relay::start(RelayConfig::symmetric(
        relay_listen(),
        sink.local_addr()?,
        link,
        7,
    ))?;
    let sink_count = tokio::spawn(count_datagrams(sink));

    let client = UdpSocket::bind(any_loopback_port()).await?;
    client.connect(relay.local_addr()).await?;
    for batch in 0..DATAGRAMS / BATCH {
        for i in 0..BATCH {
            client
                .send(&((batch * BATCH + i) as u64).to_be_bytes())
                .await?;
        }
        // Paced, so neither the relay's socket buffer nor the sink's overflows.
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let stats = settle(&relay).await;
    let up = stats.up;
    let share = up.dropped_loss_datagrams as f64 / up.received_datagrams as f64;
    println!(
        "lost {} of {} datagrams: {:.3}%",
        up.dropped_loss_datagrams,
        up.received_datagrams,
        share * 100.0
    );
    assert!(
        up.received_datagrams >= 20_000,
        "only {} datagrams reached the relay",
        up.received_datagrams
    );
    assert!(
        (0.007..=0.013).contains(&share),
        "lost {:.3}%, not 1% ± 0.3%",
        share * 100.0
    );
    assert_eq!(up.dropped_queue_datagrams, 0);
    assert_eq!(
        up.forwarded_datagrams + up.dropped_loss_datagrams,
        up.received_datagrams
    );
    drop(relay);
    assert_eq!(sink_count.await?, up.forwarded_datagrams);
    Ok(())
}

#[tokio::test]
async fn each_client_gets_its_own_replies() -> Result<()> {
    const CLIENTS: usize = 3;
    const MESSAGES: usize = 50;
    let echo = UdpSocket::bind(any_loopback_port()).await?;
    let echo_addr = echo.local_addr()?;
    let echo_peers = Arc::new(Mutex::new(HashSet::new()));
    let echo_server = tokio::spawn(echo_server(echo, echo_peers.clone()));
    let relay = Relay::start(RelayConfig::symmetric(
        relay_listen(),
        echo_addr,
        LinkShape::wan(10.0, 5, 2, 0.0),
        3,
    ))?;
    let relay_addr = relay.local_addr();

    let clients: Vec<_> = (0..CLIENTS)
        .map(|client| {
            tokio::spawn(async move {
                let socket = UdpSocket::bind(any_loopback_port()).await?;
                socket.connect(relay_addr).await?;
                let addr = socket.local_addr()?;
                let mut buf = [0u8; 64];
                for message in 0..MESSAGES {
                    let sent = format!("client {client} message {message}");
                    socket.send(sent.as_bytes()).await?;
                    let len = tokio::time::timeout(REPLY_TIMEOUT, socket.recv(&mut buf))
                        .await
                        .with_context(|| format!("no reply to {sent:?}"))??;
                    ensure!(
                        &buf[..len] == sent.as_bytes(),
                        "client {client} sent {sent:?} and got {:?}",
                        String::from_utf8_lossy(&buf[..len])
                    );
                }
                anyhow::Ok(addr)
            })
        })
        .collect();
    let mut client_addrs = HashSet::new();
    for client in clients {
        client_addrs.insert(client.await??);
    }
    // The relay counts a datagram after its send returns, so the last reply can reach its client
    // a moment before it is counted.
    let expected = (CLIENTS * MESSAGES) as u64;
    let _ = wait_until_async(REPLY_TIMEOUT, Duration::from_millis(5), async || {
        let stats = relay.stats();
        stats.up.forwarded_datagrams >= expected && stats.down.forwarded_datagrams >= expected
    })
    .await;
    let stats = relay.stats();
    assert_eq!(stats.active_clients, CLIENTS as u64);
    assert_eq!(stats.up.forwarded_datagrams, expected);
    assert_eq!(stats.down.forwarded_datagrams, expected);
    // The server saw one peer per client, none of them a client's own address: the relay's.
    let echo_peers = echo_peers.lock().expect("echo peers").clone();
    assert_eq!(echo_peers.len(), CLIENTS);
    assert!(echo_peers.is_disjoint(&client_addrs));
    echo_server.abort();
    Ok(())
}

#[tokio::test]
async fn idle_client_mappings_expire_and_reopen() -> Result<()> {
    const IDLE_TIMEOUT: Duration = Duration::from_millis(200);
    let echo = UdpSocket::bind(any_loopback_port()).await?;
    let echo_addr = echo.local_addr()?;
    let echo_server = tokio::spawn(echo_server(echo, Arc::default()));
    let mut config = RelayConfig::symmetric(relay_listen(), echo_addr, LinkShape::ideal(), 1);
    config.client_idle_timeout = IDLE_TIMEOUT;
    let relay = Relay::start(config)?;

    let client = UdpSocket::bind(any_loopback_port()).await?;
    client.connect(relay.local_addr()).await?;
    let mut buf = [0u8; 16];
    client.send(b"one").await?;
    tokio::time::timeout(REPLY_TIMEOUT, client.recv(&mut buf)).await??;
    assert_eq!(relay.stats().active_clients, 1);

    let closed = wait_until_async(IDLE_TIMEOUT * 10, Duration::from_millis(10), async || {
        relay.stats().active_clients == 0
    })
    .await;
    assert!(
        closed.is_ok(),
        "the idle mapping was not closed: {:?}",
        relay.stats()
    );

    client.send(b"two").await?;
    let len = tokio::time::timeout(REPLY_TIMEOUT, client.recv(&mut buf)).await??;
    assert_eq!(&buf[..len], b"two");
    assert_eq!(relay.stats().active_clients, 1);
    echo_server.abort();
    Ok(())
}

#[tokio::test]
async fn sending_faster_than_the_rate_drops_at_the_queue_tail() -> Result<()> {
    const RATE_BITS_PER_S: u64 = 1_000_000;
    const QUEUE_BYTES: usize = 10_000;
    const PAYLOAD_BYTES: usize = 1_000;
    const DATAGRAMS: usize = 200;
    let sink = UdpSocket::bind(any_loopback_port()).await?;
    let link = LinkShape {
        rate_bits_per_s: Some(RATE_BITS_PER_S),
        latency: Duration::from_millis(10),
        queue_bytes: QUEUE_BYTES,
        ..LinkShape::ideal()
    };
    let relay = Relay::start(RelayConfig::symmetric(
        relay_listen(),
        sink.local_addr()?,
        link,
        5,
    ))?;
    let sink_count = tokio::spawn(count_datagrams(sink));

    let client = UdpSocket::bind(any_loopback_port()).await?;
    client.connect(relay.local_addr()).await?;
    let started = Instant::now();
    for _ in 0..DATAGRAMS {
        client.send(&[7u8; PAYLOAD_BYTES]).await?;
        // About 8 Mbit/s: eight times the rate, slow enough for the relay's socket buffer.
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let sending = started.elapsed();
    let stats = settle(&relay).await;
    let up = stats.up;
    println!("sent {DATAGRAMS} in {sending:.2?}: {up:?}");

    assert!(up.dropped_queue_datagrams > 0, "no queue drops: {up:?}");
    assert_eq!(
        up.forwarded_datagrams + up.dropped_queue_datagrams,
        up.received_datagrams
    );
    // What passed is at most the burst, the queue, and the rate over the sending time.
    let wire_bytes = (PAYLOAD_BYTES + IPV4_UDP_HEADER_BYTES) as f64;
    let burst_bytes = (BURST_DATAGRAMS * FULL_DATAGRAM_WIRE_BYTES) as f64;
    let most =
        (burst_bytes + QUEUE_BYTES as f64 + RATE_BITS_PER_S as f64 / 8.0 * sending.as_secs_f64())
            / wire_bytes;
    assert!(
        up.forwarded_datagrams as f64 <= most.ceil(),
        "{} forwarded, at most {most:.1} fit",
        up.forwarded_datagrams
    );
    // And the link was kept busy: at least the rate over the sending time passed.
    let least = RATE_BITS_PER_S as f64 / 8.0 * sending.as_secs_f64() / wire_bytes;
    assert!(
        up.forwarded_datagrams as f64 >= least.floor(),
        "{} forwarded, at least {least:.1} should have",
        up.forwarded_datagrams
    );
    drop(relay);
    assert_eq!(sink_count.await?, up.forwarded_datagrams);
    Ok(())
}

/// Fails unless `actual` is within [`TOLERANCE`] of `expected`.
fn assert_within(actual: f64, expected: f64, what: &str) {
    let error = (actual - expected).abs() / expected;
    assert!(
        error <= TOLERANCE,
        "{what}: measured {actual:.2}, expected {expected:.2} ± {:.0}%",
        TOLERANCE * 100.0
    );
}

/// Waits (at most [`REPLY_TIMEOUT`]) until the relay holds no datagram in either direction, and
/// returns its counters.
async fn settle(relay: &Relay) -> RelayStats {
    let _ = wait_until_async(REPLY_TIMEOUT, Duration::from_millis(10), async || {
        let stats = relay.stats();
        stats.up.in_flight_datagrams() == 0 && stats.down.in_flight_datagrams() == 0
    })
    .await;
    relay.stats()
}

/// Counts datagrams until none arrives for a while.
async fn count_datagrams(socket: UdpSocket) -> u64 {
    let mut buf = vec![0u8; 65_535];
    let mut count = 0;
    while let Ok(Ok(_)) = tokio::time::timeout(REPLY_TIMEOUT, socket.recv_from(&mut buf)).await {
        count += 1;
    }
    count
}

/// Echoes every datagram to its sender, noting each sender in `peers`.
async fn echo_server(socket: UdpSocket, peers: Arc<Mutex<HashSet<SocketAddr>>>) -> Result<()> {
    let mut buf = vec![0u8; 65_535];
    loop {
        let (len, from) = socket.recv_from(&mut buf).await?;
        peers.lock().expect("echo peers").insert(from);
        socket.send_to(&buf[..len], from).await?;
    }
}

/// Median round trip of small messages echoed on one stream.
async fn ping_pong_median_rtt(conn: &quinn::Connection) -> Result<Duration> {
    let (mut send, mut recv) = conn.open_bi().await?;
    send.write_all(&[MODE_PING]).await?;
    let mut rtts = Vec::with_capacity(PINGS);
    let mut pong = [0u8; 8];
    for ping in 0..PINGS as u64 {
        let sent = Instant::now();
        send.write_all(&ping.to_be_bytes()).await?;
        recv.read_exact(&mut pong).await?;
        rtts.push(sent.elapsed());
        ensure!(pong == ping.to_be_bytes(), "pong {pong:?} for ping {ping}");
    }
    send.finish()?;
    rtts.sort();
    Ok(rtts[PINGS / 2])
}

/// What a bulk download measured.
struct Download {
    bytes: u64,
    elapsed: Duration,
    /// Bytes and time of the second half only: the steady state, after slow start.
    second_half_bytes: u64,
    second_half_elapsed: Duration,
}

impl Download {
    fn goodput_mbit_per_s(&self) -> f64 {
        mbit_per_s(self.bytes, self.elapsed)
    }

    fn steady_goodput_mbit_per_s(&self) -> f64 {
        mbit_per_s(self.second_half_bytes, self.second_half_elapsed)
    }
}

fn mbit_per_s(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 * 8.0 / elapsed.as_secs_f64() / 1e6
}

/// Asks the server for an endless stream and reads it for `duration`, timed from the request
/// (after the handshake, including slow start) to the last read; then stops the stream.
async fn bulk_download(conn: &quinn::Connection, duration: Duration) -> Result<Download> {
    let (mut send, mut recv) = conn.open_bi().await?;
    send.write_all(&[MODE_BULK]).await?;
    let started = Instant::now();
    let deadline = started + duration;
    let mut bytes = 0u64;
    let mut half_time = None;
    loop {
        let chunk =
            tokio::time::timeout_at(deadline.into(), recv.read_chunk(usize::MAX, true)).await;
        match chunk {
            Err(_) => break,
            Ok(Ok(Some(chunk))) => bytes += chunk.bytes.len() as u64,
            Ok(Ok(None)) => bail!("the server ended the bulk stream"),
            Ok(Err(error)) => return Err(error).context("bulk stream"),
        }
        if half_time.is_none() && started.elapsed() >= duration / 2 {
            half_time = Some((Instant::now(), bytes));
        }
    }
    let elapsed = started.elapsed();
    recv.stop(VarInt::from_u32(0))?;
    let (half_at, half_bytes) = half_time.context("the bulk stream stalled")?;
    Ok(Download {
        bytes,
        elapsed,
        second_half_bytes: bytes - half_bytes,
        second_half_elapsed: half_at.elapsed(),
    })
}

/// First byte of a stream: echo 8-byte pings.
const MODE_PING: u8 = b'p';
/// First byte of a stream: send data until the client stops reading.
const MODE_BULK: u8 = b'b';
/// Size of the server's writes in a bulk transfer.
const BULK_WRITE_BYTES: usize = 64 * 1024;

/// A QUIC server on loopback with a self-signed certificate for `localhost`.
struct QuicServer {
    addr: SocketAddr,
    cert: quinn::rustls::pki_types::CertificateDer<'static>,
    _endpoint: Endpoint,
}

impl QuicServer {
    fn start() -> Result<Self> {
        let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])?;
        let cert = certified.cert.der().clone();
        let key = quinn::rustls::pki_types::PrivateKeyDer::Pkcs8(
            certified.signing_key.serialize_der().into(),
        );
        let mut config = quinn::ServerConfig::with_single_cert(vec![cert.clone()], key)?;
        config.transport_config(Arc::new(transport()));
        let endpoint = quic_endpoint(Some(config))?;
        let addr = endpoint.local_addr()?;
        tokio::spawn(serve(endpoint.clone()));
        Ok(Self {
            addr,
            cert,
            _endpoint: endpoint,
        })
    }

    fn client_config(&self) -> Result<quinn::ClientConfig> {
        let mut roots = quinn::rustls::RootCertStore::empty();
        roots.add(self.cert.clone())?;
        let mut config = quinn::ClientConfig::with_root_certificates(Arc::new(roots))?;
        config.transport_config(Arc::new(transport()));
        Ok(config)
    }
}

/// A QUIC endpoint on loopback whose socket has a receive buffer of
/// [`ENDPOINT_RECEIVE_BUFFER_BYTES`].
fn quic_endpoint(server_config: Option<quinn::ServerConfig>) -> Result<Endpoint> {
    let socket = std::net::UdpSocket::bind(any_loopback_port())?;
    quinn::udp::UdpSocketState::new((&socket).into())?
        .set_recv_buffer_size((&socket).into(), ENDPOINT_RECEIVE_BUFFER_BYTES)?;
    Ok(Endpoint::new(
        EndpointConfig::default(),
        server_config,
        socket,
        Arc::new(TokioRuntime),
    )?)
}

fn transport() -> TransportConfig {
    let mut transport = TransportConfig::default();
    transport
        .stream_receive_window(VarInt::from_u32(STREAM_RECEIVE_WINDOW_BYTES))
        .receive_window(VarInt::from_u32(CONNECTION_RECEIVE_WINDOW_BYTES))
        .send_window(SEND_WINDOW_BYTES);
    transport
}

async fn serve(endpoint: Endpoint) {
    while let Some(incoming) = endpoint.accept().await {
        tokio::spawn(async move {
            let Ok(conn) = incoming.await else { return };
            while let Ok((send, recv)) = conn.accept_bi().await {
                tokio::spawn(serve_stream(send, recv));
            }
        });
    }
}

async fn serve_stream(mut send: quinn::SendStream, mut recv: quinn::RecvStream) -> Result<()> {
    let mut mode = [0u8; 1];
    recv.read_exact(&mut mode).await?;
    match mode[0] {
        MODE_PING => {
            let mut ping = [0u8; 8];
            while recv.read_exact(&mut ping).await.is_ok() {
                send.write_all(&ping).await?;
            }
        }
        MODE_BULK => {
            let data = vec![0x5a; BULK_WRITE_BYTES];
            // Ends when the client stops reading.
            while send.write_all(&data).await.is_ok() {}
        }
        other => bail!("unknown stream mode {other}"),
    }
    Ok(())
}
