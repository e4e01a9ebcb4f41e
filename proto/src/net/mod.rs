//! QUIC transport and node identity: the I/O shell around [`crate::wire`].
//!
//! Every node holds an ed25519 key and a certificate issued by the mesh's certificate authority
//! (the origin). The certificate carries the node's [`Role`] and [`Site`]; both ends of every
//! mesh connection present one (mutual TLS), so a node without a valid certificate is refused
//! during the handshake, before it can open a stream.
//!
//! - [`ca`]: the certificate authority (`origin init`) and certificate issuing.
//! - `cert` (private): what `ca`, `identity` and `tls` share about node certificates, so they
//!   form no cycle.
//! - [`identity`]: roles, sites, node ids, a node's saved identity, and [`peer_identity`].
//! - [`tls`]: rustls configurations, transport tuning, mesh endpoints and [`connect`].
//! - [`enroll`]: one-time enrollment tokens, the enrollment server and [`enroll::enroll`].
//! - [`frames`]: reading and writing [`crate::wire`] frames on QUIC streams.
//! - [`udp`]: UDP sockets with kernel buffers sized for fat links, under every mesh endpoint.
//!
//! One request travels on one bidirectional stream; a subscription is a stream that stays open.

pub mod ca;
mod cert;
pub mod enroll;
mod error;
pub mod frames;
pub mod identity;
mod pem;
pub mod tls;
pub mod udp;

pub use ca::{CertAuthority, IssuedCert};
pub use enroll::probe;
pub use enroll::{
    cert_fingerprint, enroll, enroll_endpoint, serve_enrollment, EnrollDenied, EnrollGrant,
    EnrollRequest, EnrollToken, ServerPin,
};
pub use error::NetError;
pub use frames::{
    call, read_exact, read_frame, read_frame_counted, read_up_to, refuse_stream, send_request,
    write_frame,
};
pub use identity::{peer_identity, NodeId, NodeIdentity, PeerIdentity, Role, Site};
pub use tls::{
    accept, advertised, client_endpoint, connect, connect_with, connect_within_lan,
    install_crypto_provider, server_endpoint, watched_client_config, CONNECTION_SEND_WINDOW_BYTES,
    HANDSHAKE_TIMEOUT, LAN_HANDSHAKE_TIMEOUT, MESH_ALPN, MESH_SERVER_NAME, WATCHED_IDLE_TIMEOUT_MS,
};
