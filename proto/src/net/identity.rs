//! Who a node is: its role, site and key, as carried in its certificate and saved on disk.
//!
//! A node certificate names the node three ways, all as DNS subject alternative names set by
//! the CA (never copied from the request):
//!
//! - [`MESH_SERVER_NAME`] (`node.stagecoach`), the one name every client verifies, so any node
//!   can serve any other;
//! - `<role>.<site>.id.stagecoach`, which [`peer_identity`] reads back;
//! - `<node-id>.key.stagecoach`, for operators reading the certificate (the node id itself is
//!   taken from the certified public key, not from this name).

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use data_encoding::BASE32_DNSSEC;
use ed25519_dalek::VerifyingKey;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde::{Deserialize, Serialize};

use super::cert::{bad_file, read_cert, read_small, verify_node_cert};
pub use super::cert::{IssuedCert, KEY_SAN_SUFFIX, MESH_SERVER_NAME, ROLE_SAN_SUFFIX};
use super::error::NetError;
use super::pem;
pub use proto_core::role::Role;

/// Longest site name, in characters (the limit of one DNS label).
pub const MAX_SITE_CHARS: usize = 63;

/// Bytes of an ed25519 public key, and so of a [`NodeId`].
pub const NODE_ID_BYTES: usize = 32;

/// File of a node's private key (PKCS#8 PEM, mode 0600).
pub const NODE_KEY_FILE: &str = "node.key";
/// File of a node's certificate (PEM). Its presence means "enrolled".
pub const NODE_CERT_FILE: &str = "node.crt";
/// File of the mesh CA certificate (PEM).
pub const CA_CERT_FILE: &str = "ca.crt";
/// File of the mesh settings learnt at enrollment (JSON: publisher key, origin address).
pub const MESH_FILE: &str = "mesh.json";

/// A datacenter name: one DNS label (`[a-z0-9-]{1,63}`, not starting or ending with `-`), so it
/// fits in a certificate name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Site(String);

impl Site {
    /// Checks `name` and wraps it.
    pub fn new(name: impl Into<String>) -> Result<Self, NetError> {
        let name = name.into();
        let reason = if name.is_empty() {
            Some("it is empty")
        } else if name.len() > MAX_SITE_CHARS {
            Some("it is longer than 63 characters")
        } else if !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            Some("it may hold only lowercase letters, digits and '-'")
        } else if name.starts_with('-') || name.ends_with('-') {
            Some("it may not start or end with '-'")
        } else {
            None
        };
        match reason {
            Some(reason) => Err(NetError::InvalidSite { site: name, reason }),
            None => Ok(Site(name)),
        }
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Site {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for Site {
    type Err = NetError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Site::new(s)
    }
}

impl TryFrom<String> for Site {
    type Error = NetError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        Site::new(s)
    }
}

impl From<Site> for String {
    fn from(site: Site) -> Self {
        site.0
    }
}

/// A node's ed25519 public key: its stable id. Shown as 52 characters of lowercase base32hex,
/// which fits in one DNS label.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NodeId(pub [u8; NODE_ID_BYTES]);

impl NodeId {
    /// The raw public key.
    pub fn as_bytes(&self) -> &[u8; NODE_ID_BYTES] {
        &self.0
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&BASE32_DNSSEC.encode(&self.0))
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({self})")
    }
}

impl FromStr for NodeId {
    type Err = NetError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = BASE32_DNSSEC
            .decode(s.as_bytes())
            .map_err(|_| NetError::InvalidNodeId(s.to_owned()))?;
        let bytes: [u8; NODE_ID_BYTES] = bytes
            .try_into()
            .map_err(|_| NetError::InvalidNodeId(s.to_owned()))?;
        Ok(NodeId(bytes))
    }
}

/// The identity a verified certificate proves.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PeerIdentity {
    /// What the node does.
    pub role: Role,
    /// Where it runs.
    pub site: Site,
    /// Its public key.
    pub node_id: NodeId,
}

impl PeerIdentity {
    /// Reads the identity out of a node certificate. Does not check who signed it: call this
    /// only on certificates TLS has verified (see [`peer_identity`]) or that you checked.
    pub fn from_cert_der(der: &[u8]) -> Result<Self, NetError> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| NetError::BadCertificate(format!("not an X.509 certificate: {e}")))?;

        let spki = cert.public_key();
        if spki.algorithm.algorithm != x509_parser::oid_registry::OID_SIG_ED25519 {
            return Err(NetError::BadCertificate(format!(
                "the key is {}, not ed25519",
                spki.algorithm.algorithm
            )));
        }
        let node_id: [u8; NODE_ID_BYTES] = spki
            .subject_public_key
            .data
            .as_ref()
            .try_into()
            .map_err(|_| NetError::BadCertificate("the ed25519 key is not 32 bytes".to_owned()))?;

        let san = cert
            .subject_alternative_name()
            .map_err(|e| NetError::BadCertificate(format!("unreadable subject names: {e}")))?;
        let names = san
            .as_ref()
            .map(|ext| ext.value.general_names.as_slice())
            .unwrap_or_default();
        let mut role_names = names.iter().filter_map(|name| match name {
            x509_parser::extensions::GeneralName::DNSName(dns) => dns.strip_suffix(ROLE_SAN_SUFFIX),
            _ => None,
        });
        let (Some(role_site), None) = (role_names.next(), role_names.next()) else {
            return Err(NetError::BadCertificate(format!(
                "expected exactly one `<role>.<site>{ROLE_SAN_SUFFIX}` name; was it issued by \
                 a Stagecoach CA?"
            )));
        };
        let Some((role, site)) = role_site.split_once('.') else {
            return Err(NetError::BadCertificate(format!(
                "`{role_site}{ROLE_SAN_SUFFIX}` does not name a role and a site"
            )));
        };
        Ok(PeerIdentity {
            role: role.parse()?,
            site: Site::new(site)?,
            node_id: NodeId(node_id),
        })
    }
}

impl fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} in {}", self.role, self.node_id, self.site)
    }
}

/// The identity of the node at the other end of `conn`, from the certificate TLS verified
/// during the handshake. Fails on the enrollment endpoint, where clients present none.
pub fn peer_identity(conn: &quinn::Connection) -> Result<PeerIdentity, NetError> {
    let any = conn.peer_identity().ok_or(NetError::NoPeerCertificate)?;
    let chain = any
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| NetError::BadCertificate("the session holds no X.509 chain".to_owned()))?;
    let leaf = chain.first().ok_or(NetError::NoPeerCertificate)?;
    PeerIdentity::from_cert_der(leaf)
}

/// Everything a node needs to join the mesh: its key and certificate, the mesh CA, the
/// publisher's key (to check manifests) and where the origin listens.
///
/// On disk it is a directory of [`NODE_KEY_FILE`], [`NODE_CERT_FILE`], [`CA_CERT_FILE`] and
/// [`MESH_FILE`].
pub struct NodeIdentity {
    key: PrivatePkcs8KeyDer<'static>,
    cert: CertificateDer<'static>,
    ca_cert: CertificateDer<'static>,
    publisher_key: VerifyingKey,
    origin_addr: String,
    stagers: Vec<String>,
    origins: Vec<String>,
    me: PeerIdentity,
}

/// The contents of [`MESH_FILE`].
#[derive(Serialize, Deserialize)]
struct MeshFile {
    /// Hex of the publisher's ed25519 public key.
    publisher_key: String,
    /// The origin's mesh address.
    origin_addr: String,
    /// The site's stagers the origin named at enrollment (`host:port` each).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    stagers: Vec<String>,
    /// Every origin up at enrollment (mesh `host:port` each), the enrolling one included.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    origins: Vec<String>,
}

impl NodeIdentity {
    /// Assembles an identity, checking that the certificate matches the key, chains to
    /// `ca_cert` and carries a Stagecoach identity.
    pub fn new(
        issued: IssuedCert,
        ca_cert: CertificateDer<'static>,
        publisher_key: VerifyingKey,
        origin_addr: String,
    ) -> Result<Self, NetError> {
        let me = PeerIdentity::from_cert_der(&issued.cert)?;
        let key_pair = rcgen::KeyPair::try_from(&issued.key)?;
        if key_pair.public_key_raw() != me.node_id.as_bytes() {
            return Err(NetError::BadCertificate(
                "the certificate is for another key than this node's".to_owned(),
            ));
        }
        verify_node_cert(&issued.cert, &ca_cert)?;
        Ok(NodeIdentity {
            key: issued.key,
            cert: issued.cert,
            ca_cert,
            publisher_key,
            origin_addr,
            stagers: Vec::new(),
            origins: Vec::new(),
            me,
        })
    }

    /// This identity with `stagers` as the site's stagers learnt at enrollment.
    pub fn with_stagers(mut self, stagers: Vec<String>) -> Self {
        self.stagers = stagers;
        self
    }

    /// This identity with `origins` as the origins up at enrollment.
    pub fn with_origins(mut self, origins: Vec<String>) -> Self {
        self.origins = origins;
        self
    }

    /// True when `dir` holds an identity (it may still fail to load if damaged).
    pub fn exists(dir: &Path) -> bool {
        dir.join(NODE_CERT_FILE).exists()
    }

    /// Loads the identity saved in `dir`, with the same checks as [`NodeIdentity::new`].
    pub fn load(dir: &Path) -> Result<Self, NetError> {
        if !Self::exists(dir) {
            return Err(NetError::NotEnrolled {
                dir: dir.to_owned(),
            });
        }
        let key_path = dir.join(NODE_KEY_FILE);
        let key = PrivatePkcs8KeyDer::from_pem_slice(&read_small(&key_path)?)
            .map_err(|e| bad_file(&key_path, format!("no PKCS#8 private key: {e}")))?;
        let cert = read_cert(&dir.join(NODE_CERT_FILE))?;
        let ca_cert = read_cert(&dir.join(CA_CERT_FILE))?;

        let mesh_path = dir.join(MESH_FILE);
        let mesh: MeshFile = serde_json::from_slice(&read_small(&mesh_path)?)
            .map_err(|e| bad_file(&mesh_path, e.to_string()))?;
        let publisher_key = parse_publisher_key(&mesh.publisher_key)
            .map_err(|reason| bad_file(&mesh_path, reason))?;

        Ok(Self::new(
            IssuedCert { key, cert },
            ca_cert,
            publisher_key,
            mesh.origin_addr,
        )?
        .with_stagers(mesh.stagers)
        .with_origins(mesh.origins))
    }

    /// Saves the identity into `dir` (created if missing), replacing any identity there. The
    /// key file is written with mode 0600; every file is replaced atomically, and the
    /// certificate, whose presence means "enrolled", is written last.
    pub fn save(&self, dir: &Path) -> Result<(), NetError> {
        std::fs::create_dir_all(dir).map_err(|e| NetError::io("create directory", dir, e))?;
        let mesh = MeshFile {
            publisher_key: hex::encode(self.publisher_key.as_bytes()),
            origin_addr: self.origin_addr.clone(),
            stagers: self.stagers.clone(),
            origins: self.origins.clone(),
        };
        let mesh_json = serde_json::to_vec_pretty(&mesh)
            .map_err(|e| bad_file(&dir.join(MESH_FILE), e.to_string()))?;
        let files: [(&str, Vec<u8>, u32); 4] = [
            (
                NODE_KEY_FILE,
                pem::encode("PRIVATE KEY", self.key.secret_pkcs8_der()).into_bytes(),
                pem::SECRET_FILE_MODE,
            ),
            (
                CA_CERT_FILE,
                pem::encode("CERTIFICATE", &self.ca_cert).into_bytes(),
                pem::PUBLIC_FILE_MODE,
            ),
            (MESH_FILE, mesh_json, pem::PUBLIC_FILE_MODE),
            (
                NODE_CERT_FILE,
                pem::encode("CERTIFICATE", &self.cert).into_bytes(),
                pem::PUBLIC_FILE_MODE,
            ),
        ];
        for (name, bytes, mode) in files {
            let path = dir.join(name);
            pem::write_atomic(&path, &bytes, mode)?;
        }
        tracing::info!(dir = %dir.display(), node = %self.me, "saved node identity");
        Ok(())
    }

    /// The identity this node's certificate proves.
    pub fn identity(&self) -> &PeerIdentity {
        &self.me
    }

    /// This node's role.
    pub fn role(&self) -> Role {
        self.me.role
    }

    /// This node's site.
    pub fn site(&self) -> &Site {
        &self.me.site
    }

    /// This node's id (its public key).
    pub fn node_id(&self) -> NodeId {
        self.me.node_id
    }

    /// This node's certificate, DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// The mesh CA certificate, DER.
    pub fn ca_cert_der(&self) -> &CertificateDer<'static> {
        &self.ca_cert
    }

    /// The publisher's key, to check manifest signatures with.
    pub fn publisher_key(&self) -> &VerifyingKey {
        &self.publisher_key
    }

    /// Where the origin's mesh endpoint listens, as given at enrollment (`host:port`).
    pub fn origin_addr(&self) -> &str {
        &self.origin_addr
    }

    /// Every origin to ask, in order: the one enrolled with, then the others up at enrollment.
    pub fn origin_addrs(&self) -> Vec<String> {
        let mut all = vec![self.origin_addr.clone()];
        for origin in &self.origins {
            if !all.contains(origin) {
                all.push(origin.clone());
            }
        }
        all
    }

    /// The site's stagers the origin named at enrollment (`host:port` each; empty when it
    /// knew none up, or for an identity enrolled before origins named them).
    pub fn stagers(&self) -> &[String] {
        &self.stagers
    }

    /// The private key, for building TLS configurations.
    pub(crate) fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key.clone_key())
    }
}

impl Clone for NodeIdentity {
    fn clone(&self) -> Self {
        NodeIdentity {
            key: self.key.clone_key(),
            cert: self.cert.clone(),
            ca_cert: self.ca_cert.clone(),
            publisher_key: self.publisher_key,
            origin_addr: self.origin_addr.clone(),
            stagers: self.stagers.clone(),
            origins: self.origins.clone(),
            me: self.me.clone(),
        }
    }
}

impl fmt::Debug for NodeIdentity {
    // Never prints the private key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeIdentity")
            .field("me", &self.me)
            .field("origin_addr", &self.origin_addr)
            .field("stagers", &self.stagers)
            .field("origins", &self.origins)
            .field("publisher_key", &hex::encode(self.publisher_key.as_bytes()))
            .finish_non_exhaustive()
    }
}

/// Parses the hex of an ed25519 public key.
pub(crate) fn parse_publisher_key(hex_key: &str) -> Result<VerifyingKey, String> {
    let bytes = hex::decode(hex_key).map_err(|e| format!("publisher key is not hex: {e}"))?;
    let bytes: [u8; 32] = bytes
        .try_into()
        .map_err(|_| "publisher key is not 32 bytes".to_owned())?;
    VerifyingKey::from_bytes(&bytes)
        .map_err(|e| format!("publisher key is not an ed25519 key: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn site_names_must_be_dns_labels() {
        assert_eq!(Site::new("fra-1").expect("valid").as_str(), "fra-1");
        assert!(Site::new("a".repeat(63)).is_ok());
        for bad in ["", "Fra1", "fra.1", "fra_1", "-fra", "fra-", "é"] {
            let err = Site::new(bad).expect_err(bad);
            assert!(matches!(err, NetError::InvalidSite { .. }), "{bad}");
        }
        let err = Site::new("a".repeat(64)).expect_err("too long");
        assert!(err.to_string().contains("longer than 63"));
    }

    #[test]
    fn node_ids_fit_in_a_dns_label_and_round_trip() {
        let id = NodeId([0xab; NODE_ID_BYTES]);
        let text = id.to_string();
        assert!(text.len() <= MAX_SITE_CHARS);
        assert_eq!(text.parse::<NodeId>().expect("parse"), id);
        assert!("not-an-id".parse::<NodeId>().is_err());
    }
}
