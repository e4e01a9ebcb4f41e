//! Enrollment: how a node without a certificate gets one.
//!
//! `origin enroll --role R --site S` makes an [`EnrollToken`]: the enrollment addresses of the
//! origins up, the BLAKE3 fingerprint of the mesh CA's certificate, a one-time secret, and the
//! role and site it grants (the secret is kept in the control-plane store, so any origin
//! sharing it redeems the token, once). `stager enroll TOKEN` / `edge-agent enroll TOKEN` call
//! [`enroll`], which generates the node's ed25519 key, connects to the first enrollment endpoint
//! that answers, trusting only an origin certificate issued by the CA the token pins (the node
//! has no CA certificate yet; the server sends it in its chain), sends [`Request::Enroll`] with
//! the secret and a CSR, and saves the [`NodeIdentity`] it gets back. Tokens of format 1 (one
//! address, the server certificate's own fingerprint) are still read.
//!
//! The enrollment endpoint is a separate UDP port with server authentication only: its clients
//! have no certificate yet. The origin serves it with [`serve_enrollment`] and a handler that
//! checks the secret and issues the certificate ([`EnrollGrant::issue`]).

use std::fmt;
use std::future::Future;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use data_encoding::BASE32_DNSSEC;
use ed25519_dalek::VerifyingKey;
use quinn::{Endpoint, TransportConfig, VarInt};
use rand::RngCore;
use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

use super::ca::{CertAuthority, IssuedCert};
use super::error::NetError;
use super::frames::{read_frame, refuse_stream, write_frame};
use super::identity::{NodeIdentity, Role, Site, MESH_SERVER_NAME};
use super::tls::{crypto_provider, install_crypto_provider, quic_server_config};
use crate::codec;
use crate::wire::{ErrorCode, Request, Response};

/// ALPN protocol of the enrollment endpoint; distinct from the mesh's, so neither side can be
/// mistaken for the other.
pub const ENROLL_ALPN: &[u8] = b"stagecoach-enroll/1";

/// What every token this build writes starts with: `sc`, the format version, `-`.
pub const TOKEN_PREFIX: &str = "sc2-";

/// Format version of tokens this build writes (it reads this one and version 1).
pub const TOKEN_VERSION: u32 = 2;

/// Longest token accepted, in characters (real ones are 170 to 400).
pub const MAX_TOKEN_CHARS: usize = 1024;

/// Most enrollment addresses one token carries.
pub const MAX_TOKEN_ADDRS: usize = 8;

/// Longest the QUIC handshake with one enrollment address may take before the next one is
/// tried (an origin that is down answers nothing).
pub const ENROLL_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(4);

/// Bytes of BLAKE3 checksum at the end of a token, to catch copy-paste damage.
const TOKEN_CHECKSUM_BYTES: usize = 4;

/// Largest enrollment request accepted by the server, in bytes (a CSR is about 400).
pub const MAX_ENROLL_REQUEST_BYTES: usize = 16 * 1024;

/// Largest enrollment answer accepted by the client, in bytes (two certificates).
pub const MAX_ENROLL_RESPONSE_BYTES: usize = 64 * 1024;

/// Longest one enrollment may take, handshake to answer, on either side.
pub const ENROLL_TIMEOUT: Duration = Duration::from_secs(10);

/// Enrollments served at once; more are refused at the door until one finishes.
pub const MAX_CONCURRENT_ENROLLMENTS: usize = 64;

/// Idle timeout of enrollment connections, in milliseconds.
const ENROLL_IDLE_TIMEOUT_MS: u32 = 10_000;

/// Which enrollment servers a token trusts.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum ServerPin {
    /// Exactly the certificate with this BLAKE3 fingerprint (format 1: one origin).
    Cert([u8; 32]),
    /// Any origin certificate issued by the CA whose certificate has this BLAKE3 fingerprint
    /// (format 2: every origin of the mesh).
    Ca([u8; 32]),
}

impl fmt::Debug for ServerPin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServerPin::Cert(fingerprint) => write!(f, "Cert({})", hex::encode(fingerprint)),
            ServerPin::Ca(fingerprint) => write!(f, "Ca({})", hex::encode(fingerprint)),
        }
    }
}

/// A one-time enrollment token, printed by `origin enroll` and pasted into `... enroll TOKEN`.
///
/// Its text form is `sc<version>-` followed by lowercase base32 of the encoded fields and a
/// checksum. Anyone holding it can enroll one node with its role and site, so it is a secret.
#[derive(Clone, PartialEq, Eq)]
pub struct EnrollToken {
    /// Where enrollment endpoints listen, tried in order (at least one).
    pub enroll_addrs: Vec<SocketAddr>,
    /// Which servers may answer.
    pub pin: ServerPin,
    /// The one-time secret the origin checks.
    pub secret: [u8; 32],
    /// The role the certificate will carry.
    pub role: Role,
    /// The site the certificate will carry.
    pub site: Site,
}

/// The encoded fields of a format-1 token (its body before the checksum).
#[derive(Serialize, Deserialize)]
struct TokenBodyV1 {
    enroll_addr: SocketAddr,
    server_fingerprint: [u8; 32],
    secret: [u8; 32],
    role: Role,
    site: Site,
}

/// The encoded fields of a format-2 token.
#[derive(Serialize, Deserialize)]
struct TokenBodyV2 {
    enroll_addrs: Vec<SocketAddr>,
    ca_fingerprint: [u8; 32],
    secret: [u8; 32],
    role: Role,
    site: Site,
}

impl EnrollToken {
    /// A token with a fresh random secret. The origin stores the secret (with role and site)
    /// and checks it when the node enrolls. At most [`MAX_TOKEN_ADDRS`] addresses are kept.
    pub fn new(mut enroll_addrs: Vec<SocketAddr>, pin: ServerPin, role: Role, site: Site) -> Self {
        let mut secret = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut secret);
        enroll_addrs.truncate(MAX_TOKEN_ADDRS);
        EnrollToken {
            enroll_addrs,
            pin,
            secret,
            role,
            site,
        }
    }

    /// The copy-pasteable text form (format 2, or 1 for a token that pins one certificate).
    pub fn encode(&self) -> String {
        // Encoding plain fields and a short string cannot fail; an empty body would be caught
        // by `parse` as damage, never silently accepted.
        let (version, mut bytes) = match self.pin {
            ServerPin::Cert(server_fingerprint) => {
                let body = TokenBodyV1 {
                    enroll_addr: self
                        .enroll_addrs
                        .first()
                        .copied()
                        .unwrap_or_else(|| SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))),
                    server_fingerprint,
                    secret: self.secret,
                    role: self.role,
                    site: self.site.clone(),
                };
                (1, codec::encode(&body).unwrap_or_default())
            }
            ServerPin::Ca(ca_fingerprint) => {
                let body = TokenBodyV2 {
                    enroll_addrs: self.enroll_addrs.clone(),
                    ca_fingerprint,
                    secret: self.secret,
                    role: self.role,
                    site: self.site.clone(),
                };
                (TOKEN_VERSION, codec::encode(&body).unwrap_or_default())
            }
        };
        let checksum = blake3::hash(&bytes);
        bytes.extend_from_slice(&checksum.as_bytes()[..TOKEN_CHECKSUM_BYTES]);
        format!("sc{version}-{}", BASE32_DNSSEC.encode(&bytes))
    }

    /// Reads a token's text form (surrounding whitespace is ignored).
    pub fn parse(text: &str) -> Result<Self, NetError> {
        let text = text.trim();
        if text.len() > MAX_TOKEN_CHARS {
            return Err(NetError::BadToken(format!(
                "{} characters, more than a token ever has ({MAX_TOKEN_CHARS}); paste only the \
                 token",
                text.len()
            )));
        }
        let Some(rest) = text.strip_prefix("sc") else {
            return Err(NetError::BadToken(format!(
                "it does not start with `{TOKEN_PREFIX}`; copy the whole line `origin enroll` \
                 printed"
            )));
        };
        let Some((version, payload)) = rest.split_once('-') else {
            return Err(NetError::BadToken(format!(
                "it does not start with `{TOKEN_PREFIX}`; copy the whole line `origin enroll` \
                 printed"
            )));
        };
        let version = match version.parse::<u32>() {
            Ok(version @ (1 | TOKEN_VERSION)) => version,
            Ok(other) => {
                return Err(NetError::BadToken(format!(
                    "token format version {other} is not supported (this build reads versions \
                     1 and {TOKEN_VERSION}); use the same Stagecoach version as the origin"
                )))
            }
            Err(_) => {
                return Err(NetError::BadToken(format!(
                    "it does not start with `{TOKEN_PREFIX}`; copy the whole line `origin \
                     enroll` printed"
                )))
            }
        };
        let bytes = BASE32_DNSSEC
            .decode(payload.as_bytes())
            .map_err(|e| match e.kind {
                // A cut can also leave stray bits in the last character.
                data_encoding::DecodeKind::Length | data_encoding::DecodeKind::Trailing => {
                    NetError::BadToken(
                        "it is cut short or has extra characters; copy the whole token again"
                            .to_owned(),
                    )
                }
                _ => NetError::BadToken(
                    "it holds characters a token never has; it was damaged in copying".to_owned(),
                ),
            })?;
        let damaged = || {
            NetError::BadToken(
                "its checksum does not match; it was damaged or cut in copying, copy it again"
                    .to_owned(),
            )
        };
        let split = bytes
            .len()
            .checked_sub(TOKEN_CHECKSUM_BYTES)
            .ok_or_else(damaged)?;
        let (body, checksum) = bytes.split_at(split);
        if blake3::hash(body).as_bytes()[..TOKEN_CHECKSUM_BYTES] != *checksum {
            return Err(damaged());
        }
        let unreadable =
            |e: crate::codec::CodecError| NetError::BadToken(format!("unreadable fields: {e}"));
        let token = if version == 1 {
            let body: TokenBodyV1 = codec::decode(body, MAX_TOKEN_CHARS).map_err(unreadable)?;
            EnrollToken {
                enroll_addrs: vec![body.enroll_addr],
                pin: ServerPin::Cert(body.server_fingerprint),
                secret: body.secret,
                role: body.role,
                site: body.site,
            }
        } else {
            let body: TokenBodyV2 = codec::decode(body, MAX_TOKEN_CHARS).map_err(unreadable)?;
            EnrollToken {
                enroll_addrs: body.enroll_addrs,
                pin: ServerPin::Ca(body.ca_fingerprint),
                secret: body.secret,
                role: body.role,
                site: body.site,
            }
        };
        if token.enroll_addrs.is_empty() || token.enroll_addrs.len() > MAX_TOKEN_ADDRS {
            return Err(NetError::BadToken(format!(
                "it names {} enrollment addresses (1 to {MAX_TOKEN_ADDRS} are valid)",
                token.enroll_addrs.len()
            )));
        }
        Ok(token)
    }
}

impl fmt::Display for EnrollToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.encode())
    }
}

impl FromStr for EnrollToken {
    type Err = NetError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        EnrollToken::parse(s)
    }
}

impl fmt::Debug for EnrollToken {
    // Never prints the secret.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EnrollToken")
            .field("enroll_addrs", &self.enroll_addrs)
            .field("pin", &self.pin)
            .field("role", &self.role)
            .field("site", &self.site)
            .finish_non_exhaustive()
    }
}

/// BLAKE3 of a certificate's DER: what a token pins (the CA's, or for format 1 the server's).
pub fn cert_fingerprint(cert_der: &[u8]) -> [u8; 32] {
    *blake3::hash(cert_der).as_bytes()
}

/// What the enrollment handler is asked.
pub struct EnrollRequest {
    /// The one-time secret from the token.
    pub secret: [u8; 32],
    /// The node's certificate signing request, PEM (pass it to [`CertAuthority::issue`]).
    pub csr_pem: String,
    /// Where the request came from, for logs.
    pub remote: SocketAddr,
}

impl fmt::Debug for EnrollRequest {
    // Never prints the secret.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EnrollRequest")
            .field("remote", &self.remote)
            .finish_non_exhaustive()
    }
}

/// What the enrollment handler grants: the fields of [`Response::Enrolled`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnrollGrant {
    /// The node's certificate, PEM.
    pub cert_pem: String,
    /// The mesh CA certificate, PEM.
    pub ca_pem: String,
    /// The publisher's ed25519 public key.
    pub publisher_key: [u8; 32],
    /// Where the origin's mesh endpoint listens (`host:port`).
    pub origin_addr: String,
    /// The node's site's stagers the origin knows to be up (`host:port` each), sent after the
    /// grant as [`Response::SiteStagers`]; empty sends none.
    pub stagers: Vec<String>,
    /// The mesh addresses of the origins up, sent after the stagers as [`Response::Origins`].
    pub origins: Vec<String>,
}

impl EnrollGrant {
    /// Issues the certificate for `csr_pem` with `role` and `site` and wraps it with the rest of
    /// what a node needs. A bad request is [`ErrorCode::BadRequest`], anything else
    /// [`ErrorCode::Internal`].
    pub fn issue(
        ca: &CertAuthority,
        csr_pem: &str,
        role: Role,
        site: &Site,
        publisher_key: &VerifyingKey,
        origin_addr: String,
    ) -> Result<Self, EnrollDenied> {
        let cert_pem = ca.issue(csr_pem, role, site).map_err(|e| match e {
            NetError::BadCsr(_) => EnrollDenied::new(ErrorCode::BadRequest, e.to_string()),
            other => EnrollDenied::new(ErrorCode::Internal, other.to_string()),
        })?;
        Ok(EnrollGrant {
            cert_pem,
            ca_pem: ca.cert_pem(),
            publisher_key: publisher_key.to_bytes(),
            origin_addr,
            stagers: Vec::new(),
            origins: Vec::new(),
        })
    }
}

/// Why the enrollment handler refuses; sent to the node as [`Response::Error`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnrollDenied {
    /// Why, for machines.
    pub code: ErrorCode,
    /// Why, for the operator at the node.
    pub message: String,
}

impl EnrollDenied {
    /// A refusal with `code` and `message`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        EnrollDenied {
            code,
            message: message.into(),
        }
    }

    /// The secret is unknown, used or expired.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Forbidden, message)
    }

    /// The origin failed; the node may retry.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Internal, message)
    }
}

/// An enrollment endpoint on `bind` (its own UDP port), presenting `identity`'s certificate,
/// followed by the CA's (what format-2 tokens pin), and asking clients for none. Put
/// [`cert_fingerprint`] of `identity.ca_cert_der()` in the tokens.
pub fn enroll_endpoint(bind: SocketAddr, identity: &NodeIdentity) -> Result<Endpoint, NetError> {
    install_crypto_provider();
    let mut tls = rustls::ServerConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| NetError::TlsConfig(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(
            vec![identity.cert_der().clone(), identity.ca_cert_der().clone()],
            identity.private_key(),
        )
        .map_err(|e| NetError::TlsConfig(e.to_string()))?;
    tls.alpn_protocols = vec![ENROLL_ALPN.to_vec()];
    let config = quic_server_config(tls, enroll_transport())?;
    let endpoint =
        Endpoint::server(config, bind).map_err(|source| NetError::Bind { addr: bind, source })?;
    let addr = endpoint.local_addr().unwrap_or(bind);
    tracing::info!(%addr, "enrollment endpoint listening");
    Ok(endpoint)
}

/// Answers enrollment requests on `endpoint` with `handler` until the endpoint is closed. Each
/// enrollment runs in its own task, bounded by [`ENROLL_TIMEOUT`] and
/// [`MAX_CONCURRENT_ENROLLMENTS`]; failures are logged, never fatal.
pub async fn serve_enrollment<H, F>(endpoint: Endpoint, handler: H)
where
    H: Fn(EnrollRequest) -> F + Send + Sync + 'static,
    F: Future<Output = Result<EnrollGrant, EnrollDenied>> + Send + 'static,
{
    let handler = Arc::new(handler);
    let slots = Arc::new(Semaphore::new(MAX_CONCURRENT_ENROLLMENTS));
    while let Some(incoming) = endpoint.accept().await {
        let remote = incoming.remote_address();
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::warn!(
                %remote,
                limit = MAX_CONCURRENT_ENROLLMENTS,
                "too many enrollments at once; refused"
            );
            incoming.refuse();
            continue;
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match tokio::time::timeout(ENROLL_TIMEOUT, serve_one(incoming, &*handler)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(%remote, error = %e, kind = e.kind(), "enrollment failed")
                }
                Err(_) => tracing::warn!(
                    %remote,
                    timeout_ms = ENROLL_TIMEOUT.as_millis() as u64,
                    "enrollment timed out"
                ),
            }
        });
    }
    tracing::info!("enrollment endpoint closed");
}

async fn serve_one<H, F>(incoming: quinn::Incoming, handler: &H) -> Result<(), NetError>
where
    H: Fn(EnrollRequest) -> F,
    F: Future<Output = Result<EnrollGrant, EnrollDenied>>,
{
    let remote = incoming.remote_address();
    let conn = incoming.accept()?.await?;
    let (mut send, mut recv) = conn.accept_bi().await?;
    let request = match read_frame::<Request>(&mut recv, MAX_ENROLL_REQUEST_BYTES).await {
        Ok(Some(request)) => request,
        Ok(None) => {
            return Err(NetError::UnexpectedMessage(
                "the client closed the stream without a request".to_owned(),
            ))
        }
        Err(e) if e.is_bad_input() => {
            refuse_stream(&mut send, &mut recv, &e).await?;
            let _ = send.stopped().await;
            return Err(e);
        }
        Err(e) => return Err(e),
    };
    let mut stagers = None;
    let mut origins = None;
    let answer = match request {
        Request::Enroll { secret, csr_pem } => {
            match handler(EnrollRequest {
                secret,
                csr_pem,
                remote,
            })
            .await
            {
                Ok(grant) => {
                    tracing::info!(%remote, stagers = grant.stagers.len(), "enrollment granted");
                    stagers = Some(Response::SiteStagers(grant.stagers));
                    origins = Some(Response::Origins(grant.origins));
                    Response::Enrolled {
                        cert_pem: grant.cert_pem,
                        ca_pem: grant.ca_pem,
                        publisher_key: grant.publisher_key,
                        origin_addr: grant.origin_addr,
                    }
                }
                Err(denied) => {
                    tracing::warn!(
                        %remote,
                        code = ?denied.code,
                        reason = %denied.message,
                        "enrollment denied"
                    );
                    Response::Error {
                        code: denied.code,
                        message: denied.message,
                    }
                }
            }
        }
        _ => Response::Error {
            code: ErrorCode::BadRequest,
            message: "this is the enrollment endpoint; it answers only Enroll requests".to_owned(),
        },
    };
    write_frame(&mut send, &answer).await?;
    for frame in [&stagers, &origins].into_iter().flatten() {
        write_frame(&mut send, frame).await?;
    }
    send.finish()?;
    // Dropping the connection before the client has the answer could discard it.
    let _ = send.stopped().await;
    Ok(())
}

/// Enrolls this node with `token` and saves its identity in `dir`, which must not hold one.
pub async fn enroll(token: &EnrollToken, dir: &Path) -> Result<NodeIdentity, NetError> {
    if NodeIdentity::exists(dir) {
        return Err(NetError::AlreadyEnrolled {
            dir: dir.to_owned(),
        });
    }
    install_crypto_provider();
    let key = KeyPair::generate_for(&rcgen::PKCS_ED25519)?;
    let mut params = CertificateParams::default();
    // Informational only: the CA names the certificate itself.
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, format!("{}.{}", token.role, token.site));
    params.distinguished_name = name;
    let csr_pem = params.serialize_request(&key)?.pem()?;

    let (answer, stagers, origins) = ask_in_turn(token, &csr_pem).await?;

    let (cert_pem, ca_pem, publisher_key, origin_addr) = match answer {
        Response::Enrolled {
            cert_pem,
            ca_pem,
            publisher_key,
            origin_addr,
        } => (cert_pem, ca_pem, publisher_key, origin_addr),
        Response::Error { code, message } => return Err(NetError::EnrollRefused { code, message }),
        other => {
            return Err(NetError::UnexpectedMessage(format!(
                "the enrollment server answered {other:?}"
            )))
        }
    };
    let cert = CertificateDer::from_pem_slice(cert_pem.as_bytes())
        .map_err(|e| NetError::BadCertificate(format!("issued certificate is not PEM: {e}")))?;
    let ca_cert = CertificateDer::from_pem_slice(ca_pem.as_bytes())
        .map_err(|e| NetError::BadCertificate(format!("CA certificate is not PEM: {e}")))?;
    let publisher_key = VerifyingKey::from_bytes(&publisher_key).map_err(|e| {
        NetError::UnexpectedMessage(format!("the publisher key is not an ed25519 key: {e}"))
    })?;
    let issued = IssuedCert {
        key: PrivatePkcs8KeyDer::from(key.serialize_der()),
        cert,
    };
    let identity = NodeIdentity::new(issued, ca_cert, publisher_key, origin_addr)?
        .with_stagers(stagers)
        .with_origins(origins);
    if identity.role() != token.role || identity.site() != &token.site {
        return Err(NetError::BadCertificate(format!(
            "the origin issued a certificate for {} in {}, but the token is for {} in {}",
            identity.role(),
            identity.site(),
            token.role,
            token.site
        )));
    }
    identity.save(dir)?;
    tracing::info!(node = %identity.identity(), dir = %dir.display(), "enrolled");
    Ok(identity)
}

/// A client endpoint of its own on an ephemeral port of `addr`'s address family.
fn endpoint_towards(addr: SocketAddr) -> Result<Endpoint, NetError> {
    let bind = if addr.is_ipv4() {
        SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))
    } else {
        SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0))
    };
    Endpoint::client(bind).map_err(|source| NetError::Bind { addr: bind, source })
}

/// What one enrollment attempt got: the answer, the site's stagers and the origins up.
type Exchanged = (Response, Vec<String>, Vec<String>);

/// Asks the token's enrollment addresses in order until one answers. An address that cannot
/// be reached, does not finish the handshake within [`ENROLL_HANDSHAKE_TIMEOUT`] or shows a
/// certificate the token does not trust has not seen the secret, so the next one is tried;
/// once the secret is sent, that server's answer (or failure) is final, since it may have spent
/// the token.
async fn ask_in_turn(token: &EnrollToken, csr_pem: &str) -> Result<Exchanged, NetError> {
    let mut failures: Vec<(SocketAddr, NetError, bool)> = Vec::new();
    for &addr in &token.enroll_addrs {
        let mismatch = Arc::new(AtomicBool::new(false));
        let client_config = pinned_client_config(token.pin, mismatch.clone())?;
        let endpoint = endpoint_towards(addr)?;
        let attempt = tokio::time::timeout(
            ENROLL_TIMEOUT,
            exchange(&endpoint, client_config, addr, token, csr_pem.to_owned()),
        )
        .await
        .unwrap_or(Err(Attempt::Sent(NetError::Timeout {
            what: "enrollment",
            after_ms: ENROLL_TIMEOUT.as_millis() as u64,
        })));
        endpoint.close(VarInt::from_u32(0), b"enrolled");
        match attempt {
            Ok(exchanged) => return Ok(exchanged),
            Err(Attempt::Sent(error)) => return Err(error),
            Err(Attempt::NotSent(error)) => {
                let refused_pin = mismatch.load(Ordering::SeqCst);
                tracing::warn!(%addr, %error, refused_pin, "enrollment server not usable; trying the next one");
                failures.push((addr, error, refused_pin));
            }
        }
    }
    // A server that showed an untrusted certificate says more than one that was down.
    if let Some((addr, _, _)) = failures.iter().find(|(_, _, refused_pin)| *refused_pin) {
        return Err(NetError::FingerprintMismatch { addr: *addr });
    }
    match failures.pop() {
        Some((_, error, _)) if failures.is_empty() => Err(error),
        Some((addr, error, _)) => Err(NetError::Connect {
            addr,
            reason: format!(
                "no enrollment address of the token answered (the last: {error}; before it: {})",
                failures
                    .iter()
                    .map(|(addr, error, _)| format!("{addr}: {error}"))
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
        }),
        None => Err(NetError::BadToken(
            "it names no enrollment address".to_owned(),
        )),
    }
}

/// How an enrollment attempt failed: before the secret left (another server may be asked) or
/// after.
enum Attempt {
    NotSent(NetError),
    Sent(NetError),
}

/// Connects to `addr`, sends the request and reads the answer.
async fn exchange(
    endpoint: &Endpoint,
    client_config: quinn::ClientConfig,
    addr: SocketAddr,
    token: &EnrollToken,
    csr_pem: String,
) -> Result<Exchanged, Attempt> {
    let connecting = endpoint
        .connect_with(client_config, addr, MESH_SERVER_NAME)
        .map_err(|e| {
            Attempt::NotSent(NetError::Connect {
                addr,
                reason: e.to_string(),
            })
        })?;
    let conn = match tokio::time::timeout(ENROLL_HANDSHAKE_TIMEOUT, connecting).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(error)) => return Err(Attempt::NotSent(error.into())),
        Err(_) => {
            return Err(Attempt::NotSent(NetError::Timeout {
                what: "enrollment handshake",
                after_ms: ENROLL_HANDSHAKE_TIMEOUT.as_millis() as u64,
            }))
        }
    };
    exchange_on(conn, token, csr_pem)
        .await
        .map_err(Attempt::Sent)
}

/// Sends the request on `conn` and reads the answer.
async fn exchange_on(
    conn: quinn::Connection,
    token: &EnrollToken,
    csr_pem: String,
) -> Result<Exchanged, NetError> {
    let (mut send, mut recv) = conn.open_bi().await?;
    let request = Request::Enroll {
        secret: token.secret,
        csr_pem,
    };
    write_frame(&mut send, &request).await?;
    send.finish()?;
    let answer = read_frame::<Response>(&mut recv, MAX_ENROLL_RESPONSE_BYTES)
        .await?
        .ok_or_else(|| {
            NetError::UnexpectedMessage(
                "the enrollment server closed the stream without answering".to_owned(),
            )
        })?;
    // The site's stagers, then the origins up, follow a grant (an older origin sends fewer
    // frames). The certificate is issued and the token spent by now, so a list that does not
    // arrive costs only the list.
    let (mut stagers, mut origins) = (Vec::new(), Vec::new());
    if let Response::Enrolled { .. } = &answer {
        stagers = read_list(&mut recv, "the site's stagers", |frame| match frame {
            Response::SiteStagers(list) => Some(std::mem::take(list)),
            _ => None,
        })
        .await;
        origins = read_list(&mut recv, "the origins", |frame| match frame {
            Response::Origins(list) => Some(std::mem::take(list)),
            _ => None,
        })
        .await;
    }
    conn.close(VarInt::from_u32(0), b"done");
    Ok((answer, stagers, origins))
}

/// Reads one optional frame after a grant: the list `take` finds in it, or none (logged)
/// when it is missing, unreadable or another answer.
async fn read_list(
    recv: &mut quinn::RecvStream,
    what: &str,
    take: impl FnOnce(&mut Response) -> Option<Vec<String>>,
) -> Vec<String> {
    match read_frame::<Response>(recv, MAX_ENROLL_RESPONSE_BYTES).await {
        Ok(Some(mut frame)) => take(&mut frame).unwrap_or_else(|| {
            tracing::warn!(answer = ?frame, "the enrollment server sent something else than {what}; enrolled without them");
            Vec::new()
        }),
        Ok(None) => Vec::new(),
        Err(error) => {
            tracing::warn!(%error, "cannot read {what} from the enrollment server; enrolled without them");
            Vec::new()
        }
    }
}

fn enroll_transport() -> TransportConfig {
    let mut transport = TransportConfig::default();
    transport
        .max_concurrent_bidi_streams(VarInt::from_u32(1))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .max_idle_timeout(Some(VarInt::from_u32(ENROLL_IDLE_TIMEOUT_MS).into()));
    transport
}

/// A client config that trusts only what `pin` names: one server certificate, or the origin
/// certificates of one CA. Sets `mismatch` when the server shows another.
fn pinned_client_config(
    pin: ServerPin,
    mismatch: Arc<AtomicBool>,
) -> Result<quinn::ClientConfig, NetError> {
    let provider = crypto_provider();
    let verifier = PinnedServerVerifier {
        pin,
        algorithms: provider.signature_verification_algorithms,
        mismatch,
    };
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| NetError::TlsConfig(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    tls.alpn_protocols = vec![ENROLL_ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| NetError::TlsConfig(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    config.transport_config(Arc::new(enroll_transport()));
    Ok(config)
}

/// Checks that a mesh node answers QUIC at `addr`: a handshake is started and abandoned as
/// soon as the server shows a certificate (no certificate is trusted, nothing is sent beyond
/// the handshake, and no client certificate is needed). A health check uses it to tell that
/// the stager is up before it has any identity at hand. Fails when nothing answers within
/// `timeout`.
pub async fn probe(addr: SocketAddr, timeout: Duration) -> Result<(), NetError> {
    install_crypto_provider();
    let answered = Arc::new(AtomicBool::new(false));
    // An all-zero fingerprint matches no certificate: any server's certificate is refused, and
    // seeing one is the proof that the server answered.
    let config = pinned_client_config(ServerPin::Cert([0u8; 32]), answered.clone())?;
    let endpoint = endpoint_towards(addr)?;
    let connecting = endpoint
        .connect_with(config, addr, MESH_SERVER_NAME)
        .map_err(|e| NetError::Connect {
            addr,
            reason: e.to_string(),
        })?;
    let outcome = tokio::time::timeout(timeout, connecting).await;
    endpoint.close(VarInt::from_u32(0), b"probe");
    match outcome {
        _ if answered.load(Ordering::SeqCst) => Ok(()),
        // A server that closed the handshake (a refused ALPN, say) answered too.
        Ok(Err(quinn::ConnectionError::ConnectionClosed(_))) | Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(NetError::Connect {
            addr,
            reason: e.to_string(),
        }),
        Err(_) => Err(NetError::Timeout {
            what: "QUIC handshake (probe)",
            after_ms: timeout.as_millis() as u64,
        }),
    }
}

/// Accepts only what the pin names: the pinned certificate, or a certificate of the role
/// origin that chains to the pinned CA (whose certificate the server sends after its own). The
/// handshake signature is still checked against the certificate, so the server must hold its
/// key, not just a copy of it.
#[derive(Debug)]
struct PinnedServerVerifier {
    pin: ServerPin,
    algorithms: WebPkiSupportedAlgorithms,
    mismatch: Arc<AtomicBool>,
}

impl PinnedServerVerifier {
    fn trusted(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        now: UnixTime,
    ) -> bool {
        match self.pin {
            // blake3::Hash compares in constant time.
            ServerPin::Cert(fingerprint) => {
                blake3::hash(end_entity.as_ref()) == blake3::Hash::from_bytes(fingerprint)
            }
            ServerPin::Ca(fingerprint) => {
                let pinned = blake3::Hash::from_bytes(fingerprint);
                let Some(ca) = intermediates
                    .iter()
                    .find(|cert| blake3::hash(cert.as_ref()) == pinned)
                else {
                    return false;
                };
                let Ok(roots) = super::cert::ca_roots(&ca.clone().into_owned()) else {
                    return false;
                };
                let Ok(chain) = rustls::client::WebPkiServerVerifier::builder_with_provider(
                    roots,
                    crypto_provider(),
                )
                .build() else {
                    return false;
                };
                // Issued by the pinned CA, valid now, for the mesh's server name...
                if chain
                    .verify_server_cert(end_entity, intermediates, server_name, &[], now)
                    .is_err()
                {
                    return false;
                }
                // ...and an origin's: a stager or an edge of the same mesh must not be able to
                // answer for the origins and take the secret.
                matches!(
                    super::identity::PeerIdentity::from_cert_der(end_entity.as_ref()),
                    Ok(peer) if peer.role == Role::Origin
                )
            }
        }
    }
}

impl ServerCertVerifier for PinnedServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if self.trusted(end_entity, intermediates, server_name, now) {
            Ok(ServerCertVerified::assertion())
        } else {
            self.mismatch.store(true, Ordering::SeqCst);
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token() -> EnrollToken {
        EnrollToken::new(
            vec![
                "127.0.0.1:4434".parse().expect("addr"),
                "10.20.30.40:4434".parse().expect("addr"),
                "[fd00::17]:4434".parse().expect("addr"),
            ],
            ServerPin::Ca([7; 32]),
            Role::Edge,
            Site::new("fra1").expect("site"),
        )
    }

    #[test]
    fn tokens_round_trip_through_text() {
        let token = token();
        let text = token.encode();
        assert!(text.starts_with(TOKEN_PREFIX));
        assert!(
            text.len() < 300,
            "{} characters is too long to paste",
            text.len()
        );
        assert_eq!(
            EnrollToken::parse(&format!("  {text}\n")).expect("parse"),
            token
        );
        // Two tokens never share a secret.
        assert_ne!(
            EnrollToken::new(
                token.enroll_addrs.clone(),
                token.pin,
                Role::Edge,
                token.site.clone()
            )
            .secret,
            token.secret
        );
        // A token of the first format (one origin, its certificate pinned) still reads.
        let first = EnrollToken::new(
            vec!["127.0.0.1:4434".parse().expect("addr")],
            ServerPin::Cert([9; 32]),
            Role::Stager,
            Site::new("ams2").expect("site"),
        );
        let text = first.encode();
        assert!(text.starts_with("sc1-"), "{text}");
        assert_eq!(EnrollToken::parse(&text).expect("parse"), first);
        // At most MAX_TOKEN_ADDRS addresses, and never none.
        let many = EnrollToken::new(
            vec!["127.0.0.1:1".parse().expect("addr"); 20],
            ServerPin::Ca([7; 32]),
            Role::Edge,
            Site::new("fra1").expect("site"),
        );
        assert_eq!(many.enroll_addrs.len(), MAX_TOKEN_ADDRS);
        let mut none = token.clone();
        none.enroll_addrs.clear();
        assert!(EnrollToken::parse(&none.encode())
            .expect_err("no address")
            .to_string()
            .contains("0 enrollment addresses"));
    }

    #[test]
    fn damaged_tokens_say_what_is_wrong() {
        let text = token().encode();
        // However much is lost, a cut token is refused, never misread.
        for lost in 1..=8 {
            let cut = &text[..text.len() - lost];
            let err = EnrollToken::parse(cut).expect_err("cut");
            let shown = err.to_string();
            assert!(
                shown.contains("cut short") || shown.contains("checksum"),
                "{lost}: {shown}"
            );
        }

        let mut flipped = text.clone().into_bytes();
        let last = flipped.len() - 10;
        flipped[last] = if flipped[last] == b'a' { b'b' } else { b'a' };
        let flipped = String::from_utf8(flipped).expect("ascii");
        assert!(EnrollToken::parse(&flipped)
            .expect_err("flipped")
            .to_string()
            .contains("checksum"));

        let newer = text.replacen("sc2-", "sc3-", 1);
        assert!(EnrollToken::parse(&newer)
            .expect_err("version")
            .to_string()
            .contains("version 3"));

        assert!(EnrollToken::parse("hello")
            .expect_err("junk")
            .to_string()
            .contains("sc2-"));
        assert!(EnrollToken::parse("sc2-!!!!!!!!")
            .expect_err("chars")
            .to_string()
            .contains("damaged"));
    }

    #[test]
    fn debug_output_hides_the_secret() {
        let token = token();
        let shown = format!("{token:?}");
        assert!(!shown.contains(&hex::encode(token.secret)));
        assert!(!shown.contains("secret"));
    }
}
