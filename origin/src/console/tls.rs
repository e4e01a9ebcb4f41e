//! HTTPS for the console: `origin serve --console ADDR --console-tls-cert FILE
//! --console-tls-key FILE` (PEM), or `--console-tls-mesh` for the origin's own certificate,
//! issued by the mesh CA. The same axum router as plain HTTP, served with rustls through
//! tokio-rustls, HTTP/1.1 only, with the same connection bound and header timeout as
//! [`proto::metrics::serve_router`] and a bound on the handshake too.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

/// Largest certificate or key file read, in bytes.
pub const MAX_PEM_FILE_BYTES: u64 = 1024 * 1024;

/// How long a client may take to finish the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the console's certificate comes from.
#[derive(Clone, Debug)]
pub enum TlsSource {
    /// A certificate chain and its private key, PEM files (`--console-tls-cert/-key`).
    Files {
        /// The chain, leaf first.
        cert: PathBuf,
        /// The private key (PKCS#8, PKCS#1 or SEC1).
        key: PathBuf,
    },
    /// The origin's own mesh certificate and key, issued by the mesh CA
    /// (`--console-tls-mesh`); browsers must trust the mesh CA (`<home>/ca/ca.crt`).
    Mesh,
}

/// Why the console's TLS cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file is not what it should be.
    #[error("{}: {why}", path.display())]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// rustls refused the certificate and key.
    #[error("the console's certificate and key cannot be used together: {0}")]
    Config(#[from] rustls::Error),
}

/// The rustls server configuration for `source`; `identity_dir` holds the origin's mesh
/// identity (`node.crt`, `node.key`, `ca.crt`).
pub fn server_config(
    source: &TlsSource,
    identity_dir: &Path,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let (cert_path, key_path, ca_path) = match source {
        TlsSource::Files { cert, key } => (cert.clone(), key.clone(), None),
        TlsSource::Mesh => (
            identity_dir.join(proto::net::identity::NODE_CERT_FILE),
            identity_dir.join(proto::net::identity::NODE_KEY_FILE),
            Some(identity_dir.join(proto::net::identity::CA_CERT_FILE)),
        ),
    };
    let mut chain = read_certs(&cert_path)?;
    if let Some(ca_path) = ca_path {
        chain.extend(read_certs(&ca_path)?);
    }
    let key_pem = read_bounded(&key_path)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::Pem {
        path: key_path.clone(),
        why: format!("no PEM private key (PKCS#8, PKCS#1 or SEC1): {e}"),
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn read_bounded(path: &Path) -> Result<Vec<u8>, TlsError> {
    use std::io::Read as _;
    let read = |e| TlsError::Read {
        path: path.to_owned(),
        source: e,
    };
    let file = std::fs::File::open(path).map_err(read)?;
    let mut bytes = Vec::new();
    file.take(MAX_PEM_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(read)?;
    if bytes.len() as u64 > MAX_PEM_FILE_BYTES {
        return Err(TlsError::Pem {
            path: path.to_owned(),
            why: format!("larger than {MAX_PEM_FILE_BYTES} bytes"),
        });
    }
    Ok(bytes)
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read_bounded(path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: path.to_owned(),
            why: format!("a certificate does not parse: {e}"),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.to_owned(),
            why: "no PEM certificate in it".into(),
        });
    }
    Ok(certs)
}

/// Serves `router` over HTTPS on `addr` with `config`; returns the bound address. The
/// router's handlers get the client's address as `ConnectInfo<SocketAddr>`; connections are
/// bounded and timed as plain HTTP's ([`proto::metrics::serve_router_with`]), plus a
/// [`HANDSHAKE_TIMEOUT`] for the TLS handshake.
pub async fn serve(
    addr: SocketAddr,
    router: Router,
    config: Arc<rustls::ServerConfig>,
) -> std::io::Result<SocketAddr> {
    let acceptor = TlsAcceptor::from(config);
    proto::metrics::serve_router_with(addr, router, move |stream, peer| {
        let acceptor = acceptor.clone();
        async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => Some(tls),
                Ok(Err(error)) => {
                    tracing::debug!(%error, %peer, "console TLS handshake failed");
                    None
                }
                Err(_) => {
                    tracing::debug!(%peer, "console TLS handshake timed out");
                    None
                }
            }
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_missing_and_empty_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, b"").expect("write");
        let missing = TlsSource::Files {
            cert: dir.path().join("nope.pem"),
            key: empty.clone(),
        };
        let error = server_config(&missing, dir.path())
            .expect_err("missing")
            .to_string();
        assert!(error.contains("nope.pem"), "{error}");
        let no_cert = TlsSource::Files {
            cert: empty.clone(),
            key: empty,
        };
        let error = server_config(&no_cert, dir.path())
            .expect_err("empty")
            .to_string();
        assert!(error.contains("no PEM certificate"), "{error}");
    }
}
