//! What identity, the CA and TLS share about a node certificate: the names it carries, a
//! freshly issued key and certificate, the check that one chains to the mesh CA, and reading
//! the small PEM files they are kept in.
//!
//! A leaf: it uses nothing else of [`crate::net`] but the error type, so
//! `identity`, `ca` and `tls` depend on it and not on each other in a cycle.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::SystemTime;

use rustls::client::danger::ServerCertVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;

use super::error::NetError;

/// The server name in every node certificate; clients verify servers against it.
pub const MESH_SERVER_NAME: &str = "node.stagecoach";

/// Suffix of the subject alternative name that carries `<role>.<site>`.
pub const ROLE_SAN_SUFFIX: &str = ".id.stagecoach";

/// Suffix of the subject alternative name that carries the node id.
pub const KEY_SAN_SUFFIX: &str = ".key.stagecoach";

/// Largest identity file read, in bytes; real ones are a few hundred bytes.
const MAX_IDENTITY_FILE_BYTES: u64 = 64 * 1024;

/// A freshly issued node key and certificate.
pub struct IssuedCert {
    /// The node's private key (ed25519, PKCS#8).
    pub key: PrivatePkcs8KeyDer<'static>,
    /// The node's certificate, signed by the CA.
    pub cert: CertificateDer<'static>,
}

/// The provider every Stagecoach TLS config is built on.
pub(crate) fn crypto_provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

/// Checks that `cert` chains to `ca` and is usable both as a mesh server (under
/// [`MESH_SERVER_NAME`]) and as a mesh client, as every node certificate must be.
pub(crate) fn verify_node_cert(
    cert: &CertificateDer<'static>,
    ca: &CertificateDer<'static>,
) -> Result<(), NetError> {
    let provider = crypto_provider();
    let roots = ca_roots(ca)?;
    let now = UnixTime::since_unix_epoch(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default(),
    );
    let client_verifier =
        WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| NetError::TlsConfig(format!("client verifier: {e}")))?;
    client_verifier
        .verify_client_cert(cert, &[], now)
        .map_err(|e| NetError::BadCertificate(format!("not valid for this mesh's CA: {e}")))?;
    let server_verifier =
        rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider)
            .build()
            .map_err(|e| NetError::TlsConfig(format!("server verifier: {e}")))?;
    let name = ServerName::try_from(MESH_SERVER_NAME)
        .map_err(|e| NetError::TlsConfig(format!("server name: {e}")))?;
    server_verifier
        .verify_server_cert(cert, &[], &name, &[], now)
        .map_err(|e| NetError::BadCertificate(format!("not valid as a mesh server: {e}")))?;
    Ok(())
}

pub(crate) fn ca_roots(ca: &CertificateDer<'static>) -> Result<Arc<RootCertStore>, NetError> {
    let mut roots = RootCertStore::empty();
    roots
        .add(ca.clone())
        .map_err(|e| NetError::BadCertificate(format!("unusable CA certificate: {e}")))?;
    Ok(Arc::new(roots))
}

/// Reads a file of at most [`MAX_IDENTITY_FILE_BYTES`].
pub(crate) fn read_small(path: &Path) -> Result<Vec<u8>, NetError> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|e| NetError::io("read", path, e))?;
    let mut bytes = Vec::new();
    file.take(MAX_IDENTITY_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| NetError::io("read", path, e))?;
    if bytes.len() as u64 > MAX_IDENTITY_FILE_BYTES {
        return Err(bad_file(
            path,
            format!("larger than {MAX_IDENTITY_FILE_BYTES} bytes"),
        ));
    }
    Ok(bytes)
}

/// Reads one PEM certificate.
pub(crate) fn read_cert(path: &Path) -> Result<CertificateDer<'static>, NetError> {
    CertificateDer::from_pem_slice(&read_small(path)?)
        .map_err(|e| bad_file(path, format!("no PEM certificate: {e}")))
}

pub(crate) fn bad_file(path: &Path, reason: impl Into<String>) -> NetError {
    NetError::BadFile {
        path: PathBuf::from(path),
        reason: reason.into(),
    }
}
