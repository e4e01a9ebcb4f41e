//! TLS configurations and QUIC endpoints of the mesh.
//!
//! Mesh endpoints use mutual TLS 1.3: the server demands a client certificate signed by the
//! mesh CA (a node without one is refused in the handshake), and the client verifies the
//! server's certificate against the same CA under the name [`MESH_SERVER_NAME`]. Every config
//! is built on an explicit ring provider, so it works whatever provider the process default is.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{Connection, Endpoint, TransportConfig, VarInt};
use rustls::server::WebPkiClientVerifier;
use rustls::ServerConfig;

use super::cert::ca_roots;
pub(crate) use super::cert::crypto_provider;
pub use super::cert::MESH_SERVER_NAME;
use super::error::NetError;
use super::identity::{peer_identity, NodeIdentity, PeerIdentity};

/// ALPN protocol of mesh connections.
pub const MESH_ALPN: &[u8] = b"stagecoach/1";

/// Receive window of one stream, in bytes: enough to keep a WAN link with a large
/// bandwidth-delay product full on a single stream.
pub const STREAM_RECEIVE_WINDOW_BYTES: u32 = 16 * 1024 * 1024;

/// Receive window of one connection, in bytes (several busy streams at once).
pub const CONNECTION_RECEIVE_WINDOW_BYTES: u32 = 64 * 1024 * 1024;

/// Send window of one connection, in bytes.
pub const CONNECTION_SEND_WINDOW_BYTES: u64 = 64 * 1024 * 1024;

/// Bidirectional streams (requests) a peer may have open at once on one connection.
pub const MAX_CONCURRENT_BIDI_STREAMS: u32 = 1024;

/// Largest UDP payload a mesh endpoint accepts and probes for, in bytes. Path MTU discovery
/// starts at QUIC's safe 1200 and climbs only as far as the path carries (1452 across an
/// Ethernet WAN), so a LAN with jumbo frames (or loopback) moves the same bytes in about a
/// quarter of the packets: a quarter of the per-packet work (packet protection,
/// acknowledgements, system calls) on both ends. Probes the path drops cost only the probe.
///
/// The bound is what keeps quinn's segmentation offload working: quinn hands the kernel up to
/// [`GSO_BATCH_DATAGRAMS`] datagrams in one send, and Linux refuses (`EMSGSIZE`) a send whose
/// payload exceeds the 65,507 bytes of one IPv4 UDP datagram. With 9000-byte jumbo frames
/// the batch would not fit, every large send would fail, and quinn would fall back to 1200.
pub const MAX_UDP_PAYLOAD_BYTES: u16 = (65_507 / GSO_BATCH_DATAGRAMS) as u16;

/// Datagrams quinn 0.11 hands the kernel in one segmentation-offload send (its
/// `MAX_TRANSMIT_SEGMENTS`).
pub const GSO_BATCH_DATAGRAMS: u32 = 10;

/// How often an idle connection sends a keep-alive, so NATs and the idle timeout spare it.
pub const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(5);

/// How long a connection may hear nothing before it is dropped, in milliseconds.
pub const IDLE_TIMEOUT_MS: u32 = 30_000;

/// Keep-alive of a [`watched_client_config`] connection.
pub const WATCHED_KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(1);

/// Idle timeout of a [`watched_client_config`] connection, in milliseconds: a peer that died
/// (killed, its machine gone) is noticed within this, not within [`IDLE_TIMEOUT_MS`].
pub const WATCHED_IDLE_TIMEOUT_MS: u32 = 4_000;

/// How long [`connect`] and [`accept`] wait for the handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long [`connect_within_lan`] waits for the handshake: a source on the site's LAN (a
/// stager, a peer) that takes longer is taken for dead, so a killed stager holds up no
/// download for the WAN's [`HANDSHAKE_TIMEOUT`].
pub const LAN_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);

/// Installs rustls' ring provider as the process default, once; later calls do nothing. Call it
/// at start-up: when a second provider is linked (libp2p's QUIC brings one), rustls builders
/// that rely on the default panic unless one was installed.
pub fn install_crypto_provider() {
    // An error means a default is already installed, which is all this function promises.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// QUIC transport settings of mesh connections, tuned for throughput on fat, long links.
pub fn transport_config() -> TransportConfig {
    let mut transport = TransportConfig::default();
    transport
        .stream_receive_window(VarInt::from_u32(STREAM_RECEIVE_WINDOW_BYTES))
        .receive_window(VarInt::from_u32(CONNECTION_RECEIVE_WINDOW_BYTES))
        .send_window(CONNECTION_SEND_WINDOW_BYTES)
        .max_concurrent_bidi_streams(VarInt::from_u32(MAX_CONCURRENT_BIDI_STREAMS))
        // The protocol uses bidirectional streams only.
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .keep_alive_interval(Some(KEEP_ALIVE_INTERVAL))
        .max_idle_timeout(Some(VarInt::from_u32(IDLE_TIMEOUT_MS).into()));
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(MAX_UDP_PAYLOAD_BYTES);
    transport.mtu_discovery_config(Some(mtu));
    transport
}

/// The endpoint settings of every mesh endpoint: datagrams up to [`MAX_UDP_PAYLOAD_BYTES`].
fn endpoint_config() -> quinn::EndpointConfig {
    let mut config = quinn::EndpointConfig::default();
    // In quinn's range (1200..=65527), so this cannot fail.
    let _ = config.max_udp_payload_size(MAX_UDP_PAYLOAD_BYTES);
    config
}

/// A mesh server endpoint on `bind`: it accepts only clients holding a certificate from the
/// mesh CA, and can also connect out (with [`connect`]) as `identity`.
pub fn server_endpoint(bind: SocketAddr, identity: &NodeIdentity) -> Result<Endpoint, NetError> {
    install_crypto_provider();
    let server_config = mesh_server_config(identity)?;
    let mut endpoint = endpoint_on(bind, Some(server_config))?;
    endpoint.set_default_client_config(mesh_client_config(identity)?);
    let addr = endpoint.local_addr().unwrap_or(bind);
    tracing::info!(%addr, node = %identity.identity(), "mesh endpoint listening");
    Ok(endpoint)
}

/// A client-only mesh endpoint on an ephemeral IPv4 port. (To reach IPv6 peers, use a
/// [`server_endpoint`] bound to `[::]:0`, which connects out too.)
pub fn client_endpoint(identity: &NodeIdentity) -> Result<Endpoint, NetError> {
    install_crypto_provider();
    let bind = SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0));
    let mut endpoint = endpoint_on(bind, None)?;
    endpoint.set_default_client_config(mesh_client_config(identity)?);
    Ok(endpoint)
}

/// A quinn endpoint on a socket from [`super::udp::bind`] (large kernel buffers), serving
/// `server_config` when given.
fn endpoint_on(
    bind: SocketAddr,
    server_config: Option<quinn::ServerConfig>,
) -> Result<Endpoint, NetError> {
    let socket = super::udp::bind(bind).map_err(|source| NetError::Bind { addr: bind, source })?;
    Endpoint::new(
        endpoint_config(),
        server_config,
        socket,
        std::sync::Arc::new(quinn::TokioRuntime),
    )
    .map_err(|source| NetError::Bind { addr: bind, source })
}

/// Connects to the mesh node at `addr`, verifying its certificate against the mesh CA.
///
/// In TLS 1.3 the client finishes its handshake before the server has checked the client's
/// certificate, so a server that refuses this node closes the connection just after this
/// returns; the first stream operation then fails with [`NetError::RefusedByPeer`].
pub async fn connect(endpoint: &Endpoint, addr: SocketAddr) -> Result<Connection, NetError> {
    connect_within(endpoint, addr, HANDSHAKE_TIMEOUT).await
}

/// The address to tell others when none is configured: `bound`, with an unspecified IP (a
/// bind to all interfaces) read as loopback of its family.
pub fn advertised(bound: SocketAddr) -> SocketAddr {
    match bound.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => (Ipv4Addr::LOCALHOST, bound.port()).into(),
        IpAddr::V6(ip) if ip.is_unspecified() => (Ipv6Addr::LOCALHOST, bound.port()).into(),
        _ => bound,
    }
}

/// [`connect`] to a node of the site's LAN, waiting at most [`LAN_HANDSHAKE_TIMEOUT`].
pub async fn connect_within_lan(
    endpoint: &Endpoint,
    addr: SocketAddr,
) -> Result<Connection, NetError> {
    connect_within(endpoint, addr, LAN_HANDSHAKE_TIMEOUT).await
}

/// [`connect`], waiting at most `timeout` for the handshake.
async fn connect_within(
    endpoint: &Endpoint,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<Connection, NetError> {
    let connecting = endpoint
        .connect(addr, MESH_SERVER_NAME)
        .map_err(|e| NetError::Connect {
            addr,
            reason: e.to_string(),
        })?;
    finish_connect(connecting, addr, timeout).await
}

/// [`connect`] with `config` instead of the endpoint's default, waiting at most `timeout` for
/// the handshake.
pub async fn connect_with(
    endpoint: &Endpoint,
    config: quinn::ClientConfig,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<Connection, NetError> {
    let connecting = endpoint
        .connect_with(config, addr, MESH_SERVER_NAME)
        .map_err(|e| NetError::Connect {
            addr,
            reason: e.to_string(),
        })?;
    finish_connect(connecting, addr, timeout).await
}

async fn finish_connect(
    connecting: quinn::Connecting,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<Connection, NetError> {
    let conn = tokio::time::timeout(timeout, connecting)
        .await
        .map_err(|_| NetError::Timeout {
            what: "TLS handshake",
            after_ms: timeout.as_millis() as u64,
        })??;
    tracing::debug!(peer = %addr, "connected");
    Ok(conn)
}

/// Completes an incoming mesh connection and returns it with the client's verified identity.
/// Clients without a valid certificate fail here, in the handshake.
pub async fn accept(incoming: quinn::Incoming) -> Result<(Connection, PeerIdentity), NetError> {
    let remote = incoming.remote_address();
    let connecting = incoming.accept()?;
    let conn = tokio::time::timeout(HANDSHAKE_TIMEOUT, connecting)
        .await
        .map_err(|_| NetError::Timeout {
            what: "TLS handshake",
            after_ms: HANDSHAKE_TIMEOUT.as_millis() as u64,
        })?
        .inspect_err(|e| tracing::info!(%remote, error = %e, "refused connection"))?;
    let peer = peer_identity(&conn)?;
    tracing::debug!(%remote, %peer, "accepted connection");
    Ok((conn, peer))
}

/// The quinn server config of a mesh endpoint (mutual TLS, [`MESH_ALPN`], tuned transport).
pub fn mesh_server_config(identity: &NodeIdentity) -> Result<quinn::ServerConfig, NetError> {
    let provider = crypto_provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(
        ca_roots(identity.ca_cert_der())?,
        provider.clone(),
    )
    .build()
    .map_err(|e| NetError::TlsConfig(format!("client verifier: {e}")))?;
    let mut tls = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_config)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![identity.cert_der().clone()], identity.private_key())
        .map_err(tls_config)?;
    tls.alpn_protocols = vec![MESH_ALPN.to_vec()];
    quic_server_config(tls, transport_config())
}

/// The quinn client config of a mesh endpoint (mutual TLS, [`MESH_ALPN`], tuned transport).
pub fn mesh_client_config(identity: &NodeIdentity) -> Result<quinn::ClientConfig, NetError> {
    let mut tls = rustls::ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_config)?
        .with_root_certificates(ca_roots(identity.ca_cert_der())?)
        .with_client_auth_cert(vec![identity.cert_der().clone()], identity.private_key())
        .map_err(tls_config)?;
    tls.alpn_protocols = vec![MESH_ALPN.to_vec()];
    let quic = QuicClientConfig::try_from(tls).map_err(tls_config)?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    config.transport_config(Arc::new(transport_config()));
    Ok(config)
}

/// A mesh client config whose connections notice a dead peer within
/// [`WATCHED_IDLE_TIMEOUT_MS`] (keep-alive every [`WATCHED_KEEP_ALIVE_INTERVAL`]): for links
/// with somewhere else to go when the peer dies, such as a stager's upstream stagers and
/// siblings.
pub fn watched_client_config(identity: &NodeIdentity) -> Result<quinn::ClientConfig, NetError> {
    let mut config = mesh_client_config(identity)?;
    let mut transport = transport_config();
    transport
        .keep_alive_interval(Some(WATCHED_KEEP_ALIVE_INTERVAL))
        .max_idle_timeout(Some(VarInt::from_u32(WATCHED_IDLE_TIMEOUT_MS).into()));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// Wraps a rustls server config for quinn with `transport`.
pub(crate) fn quic_server_config(
    tls: ServerConfig,
    transport: TransportConfig,
) -> Result<quinn::ServerConfig, NetError> {
    let quic = QuicServerConfig::try_from(tls).map_err(tls_config)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

fn tls_config(err: impl std::fmt::Display) -> NetError {
    NetError::TlsConfig(err.to_string())
}
