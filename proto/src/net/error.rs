//! The one error type of [`crate::net`], and how QUIC and TLS failures map onto it.

use std::net::SocketAddr;
use std::path::PathBuf;

use quinn::{ConnectionError, ReadError, WriteError};

use crate::wire::{ErrorCode, FrameError, PROTOCOL_VERSION};

/// First QUIC transport error code that carries a TLS alert (RFC 9001 §4.8: 0x100 + alert).
const CRYPTO_ERROR_BASE: u64 = 0x100;

/// One past the last QUIC transport error code that carries a TLS alert.
const CRYPTO_ERROR_END: u64 = 0x200;

/// Why a transport, identity or enrollment operation failed.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// A site name is not a DNS label.
    #[error(
        "invalid site name {site:?}: {reason} (use 1 to 63 of a-z, 0-9 and '-', e.g. \"fra1\")"
    )]
    InvalidSite {
        /// The name given.
        site: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A role name is not one of the four roles.
    #[error("unknown role {0:?}: expected one of origin, publisher, stager, edge")]
    UnknownRole(String),
    /// A node id is not 52 characters of lowercase base32hex.
    #[error("invalid node id {0:?}: expected 52 characters of 0-9 and a-v")]
    InvalidNodeId(String),
    /// The directory holds no node identity.
    #[error(
        "this node is not enrolled: no identity in {}; get a token with `origin enroll` and run \
         `stager enroll TOKEN` or `edge-agent enroll TOKEN`",
        dir.display()
    )]
    NotEnrolled {
        /// The identity directory.
        dir: PathBuf,
    },
    /// The directory already holds a node identity; enrolling again would replace its key.
    #[error(
        "this node is already enrolled: {} holds an identity; remove that directory first to \
         enroll again",
        dir.display()
    )]
    AlreadyEnrolled {
        /// The identity directory.
        dir: PathBuf,
    },
    /// The directory holds no certificate authority.
    #[error("no certificate authority in {}: run `origin init` first", dir.display())]
    NoAuthority {
        /// The CA directory.
        dir: PathBuf,
    },
    /// The directory already holds a certificate authority; replacing it would orphan every
    /// enrolled node.
    #[error(
        "a certificate authority already exists in {}; every enrolled node trusts it, so it is \
         never overwritten",
        dir.display()
    )]
    AuthorityExists {
        /// The CA directory.
        dir: PathBuf,
    },
    /// Reading or writing a file failed.
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        /// What was being done ("read", "write", "create directory").
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A file exists but its contents are not what they should be.
    #[error("{} is damaged: {reason}; restore it from a backup or enroll again", path.display())]
    BadFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A certificate could not be parsed or does not carry a Stagecoach identity.
    #[error("bad certificate: {0}")]
    BadCertificate(String),
    /// A certificate signing request was refused.
    #[error("bad certificate signing request: {0}")]
    BadCsr(String),
    /// Generating a key, request or certificate failed.
    #[error("cannot create certificate material: {0}")]
    CertGen(#[from] rcgen::Error),
    /// A TLS configuration could not be built from the identity.
    #[error("cannot configure TLS: {0}")]
    TlsConfig(String),
    /// An enrollment token could not be read.
    #[error("invalid enrollment token: {0}")]
    BadToken(String),
    /// The enrollment server refused the request.
    #[error("enrollment refused ({code:?}): {message}")]
    EnrollRefused {
        /// Why, for machines.
        code: ErrorCode,
        /// Why, from the server.
        message: String,
    },
    /// Binding a UDP socket failed.
    #[error("cannot listen on {addr}: {source} (is another process using the port?)")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// A connection could not be started (bad address, endpoint closed).
    #[error("cannot connect to {addr}: {reason}")]
    Connect {
        /// The peer.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// An operation took longer than its bound.
    #[error("{what} timed out after {after_ms} ms")]
    Timeout {
        /// What was being waited for.
        what: &'static str,
        /// The bound, in milliseconds.
        after_ms: u64,
    },
    /// The peer aborted the TLS handshake with an alert: it does not accept our certificate, or
    /// we offered none.
    #[error("the peer refused the TLS handshake ({alert}): {hint}")]
    RefusedByPeer {
        /// The TLS alert, e.g. `CertificateRequired` or `UnknownCA`.
        alert: String,
        /// What to do about it.
        hint: &'static str,
    },
    /// This node refused the peer during the TLS handshake, e.g. because its certificate is not
    /// from this mesh's CA.
    #[error("TLS handshake failed: {0}")]
    HandshakeFailed(String),
    /// The enrollment server's certificate is not the one the token pins.
    #[error(
        "the server at {addr} is not the enrollment server the token names (certificate \
         fingerprint mismatch): check the token and the address, or someone is intercepting"
    )]
    FingerprintMismatch {
        /// The address dialled.
        addr: SocketAddr,
    },
    /// The peer presented no certificate (only possible on the enrollment endpoint).
    #[error("the peer presented no certificate")]
    NoPeerCertificate,
    /// The connection ended or failed.
    #[error("connection lost: {0}")]
    ConnectionLost(String),
    /// The peer reset the stream it was sending on.
    #[error("the peer abandoned the stream (reset with code {code})")]
    StreamReset {
        /// The application error code.
        code: u64,
    },
    /// The peer stopped reading the stream this node was sending on.
    #[error("the peer stopped reading the stream (code {code})")]
    StreamStopped {
        /// The application error code.
        code: u64,
    },
    /// A stream was used after it was finished or reset (a bug in the caller).
    #[error("stream already closed")]
    StreamClosed,
    /// A frame's length prefix exceeds the bound; its payload was not read.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge {
        /// The announced length.
        len: usize,
        /// The bound.
        max: usize,
    },
    /// A frame's payload is not a valid message.
    #[error("malformed frame: {0}")]
    MalformedFrame(String),
    /// The peer speaks another protocol version.
    #[error(
        "peer speaks protocol version {found}, this node speaks {PROTOCOL_VERSION}; upgrade the \
         older side"
    )]
    ProtocolVersion {
        /// The version found.
        found: u16,
    },
    /// The stream ended in the middle of a frame or a fixed-length read.
    #[error("stream ended after {got} of {expected} bytes")]
    Truncated {
        /// Bytes wanted.
        expected: usize,
        /// Bytes received before the end.
        got: usize,
    },
    /// The peer answered with something the protocol does not allow here.
    #[error("unexpected answer: {0}")]
    UnexpectedMessage(String),
}

impl NetError {
    /// A short, stable label for counting errors by kind (e.g. as a metrics label).
    pub fn kind(&self) -> &'static str {
        match self {
            NetError::InvalidSite { .. } => "invalid_site",
            NetError::UnknownRole(_) => "unknown_role",
            NetError::InvalidNodeId(_) => "invalid_node_id",
            NetError::NotEnrolled { .. } => "not_enrolled",
            NetError::AlreadyEnrolled { .. } => "already_enrolled",
            NetError::NoAuthority { .. } => "no_authority",
            NetError::AuthorityExists { .. } => "authority_exists",
            NetError::Io { .. } => "io",
            NetError::BadFile { .. } => "bad_file",
            NetError::BadCertificate(_) => "bad_certificate",
            NetError::BadCsr(_) => "bad_csr",
            NetError::CertGen(_) => "cert_gen",
            NetError::TlsConfig(_) => "tls_config",
            NetError::BadToken(_) => "bad_token",
            NetError::EnrollRefused { .. } => "enroll_refused",
            NetError::Bind { .. } => "bind",
            NetError::Connect { .. } => "connect",
            NetError::Timeout { .. } => "timeout",
            NetError::RefusedByPeer { .. } => "refused_by_peer",
            NetError::HandshakeFailed(_) => "handshake_failed",
            NetError::FingerprintMismatch { .. } => "fingerprint_mismatch",
            NetError::NoPeerCertificate => "no_peer_certificate",
            NetError::ConnectionLost(_) => "connection_lost",
            NetError::StreamReset { .. } => "stream_reset",
            NetError::StreamStopped { .. } => "stream_stopped",
            NetError::StreamClosed => "stream_closed",
            NetError::FrameTooLarge { .. } => "frame_too_large",
            NetError::MalformedFrame(_) => "malformed_frame",
            NetError::ProtocolVersion { .. } => "protocol_version",
            NetError::Truncated { .. } => "truncated",
            NetError::UnexpectedMessage(_) => "unexpected_message",
        }
    }

    /// True when the peer sent bytes that break the protocol (bad frames, wrong version,
    /// truncated data): the stream should be refused and counted, the connection may go on.
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            NetError::FrameTooLarge { .. }
                | NetError::MalformedFrame(_)
                | NetError::ProtocolVersion { .. }
                | NetError::Truncated { .. }
        )
    }

    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
        source: std::io::Error,
    ) -> Self {
        NetError::Io {
            action,
            path: path.into(),
            source,
        }
    }
}

impl From<FrameError> for NetError {
    fn from(err: FrameError) -> Self {
        match err {
            FrameError::TooLarge { len, max } => NetError::FrameTooLarge { len, max },
            FrameError::Version { found } => NetError::ProtocolVersion { found },
            FrameError::TooShort(_) | FrameError::Malformed(_) => {
                NetError::MalformedFrame(err.to_string())
            }
        }
    }
}

impl From<ConnectionError> for NetError {
    fn from(err: ConnectionError) -> Self {
        match err {
            // The peer's TLS stack sent an alert: it refused us.
            ConnectionError::ConnectionClosed(ref close) => {
                let code = u64::from(close.error_code);
                if (CRYPTO_ERROR_BASE..CRYPTO_ERROR_END).contains(&code) {
                    let alert = rustls::AlertDescription::from((code - CRYPTO_ERROR_BASE) as u8);
                    NetError::RefusedByPeer {
                        alert: format!("{alert:?}"),
                        hint: alert_hint(alert),
                    }
                } else {
                    NetError::ConnectionLost(err.to_string())
                }
            }
            // Our TLS stack refused the peer (its reason names the certificate problem).
            ConnectionError::TransportError(ref transport) => {
                let code = u64::from(transport.code);
                if (CRYPTO_ERROR_BASE..CRYPTO_ERROR_END).contains(&code) {
                    NetError::HandshakeFailed(format!(
                        "{}; the peer must hold a certificate from this mesh's CA",
                        transport.reason
                    ))
                } else {
                    NetError::ConnectionLost(err.to_string())
                }
            }
            other => NetError::ConnectionLost(other.to_string()),
        }
    }
}

impl From<ReadError> for NetError {
    fn from(err: ReadError) -> Self {
        match err {
            ReadError::Reset(code) => NetError::StreamReset {
                code: code.into_inner(),
            },
            ReadError::ConnectionLost(lost) => lost.into(),
            ReadError::ClosedStream => NetError::StreamClosed,
            other => NetError::ConnectionLost(other.to_string()),
        }
    }
}

impl From<WriteError> for NetError {
    fn from(err: WriteError) -> Self {
        match err {
            WriteError::Stopped(code) => NetError::StreamStopped {
                code: code.into_inner(),
            },
            WriteError::ConnectionLost(lost) => lost.into(),
            WriteError::ClosedStream => NetError::StreamClosed,
            other => NetError::ConnectionLost(other.to_string()),
        }
    }
}

impl From<proto_core::role::UnknownRole> for NetError {
    fn from(unknown: proto_core::role::UnknownRole) -> Self {
        NetError::UnknownRole(unknown.0)
    }
}

impl From<quinn::ClosedStream> for NetError {
    fn from(_: quinn::ClosedStream) -> Self {
        NetError::StreamClosed
    }
}

/// What an operator should do about a TLS alert the peer sent.
fn alert_hint(alert: rustls::AlertDescription) -> &'static str {
    use rustls::AlertDescription as A;
    match alert {
        A::CertificateRequired => {
            "this node presented no certificate; enroll it with a token from `origin enroll`"
        }
        A::UnknownCA | A::BadCertificate | A::DecryptError => {
            "this node's certificate is not from the peer's mesh CA; enroll it against this mesh"
        }
        A::CertificateExpired => "this node's certificate has expired; enroll it again",
        A::CertificateRevoked => "this node's certificate was revoked; enroll it again",
        A::NoApplicationProtocol => {
            "the peer does not speak this protocol; check the address and port"
        }
        A::ProtocolVersion | A::HandshakeFailure | A::InsufficientSecurity => {
            "no common TLS parameters; check that both sides run Stagecoach"
        }
        _ => "check that both nodes belong to the same mesh",
    }
}

impl From<crate::durable::DurableError> for NetError {
    fn from(error: crate::durable::DurableError) -> Self {
        match error {
            crate::durable::DurableError::Io {
                action,
                path,
                source,
            } => NetError::Io {
                action,
                path,
                source,
            },
            crate::durable::DurableError::Json { path, source } => NetError::BadFile {
                path,
                reason: format!("cannot encode it as JSON: {source}"),
            },
        }
    }
}
