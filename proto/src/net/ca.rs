//! The mesh certificate authority: an ed25519 key and a self-signed certificate that every node
//! trusts, kept by the origin. It issues node certificates whose names it chooses itself.

use std::path::Path;
use std::time::{Duration, SystemTime};

use ed25519_dalek::VerifyingKey;
use rand::RngCore;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData,
    SanType, SerialNumber,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer};

pub use super::cert::IssuedCert;
use super::cert::{
    bad_file, read_cert, read_small, KEY_SAN_SUFFIX, MESH_SERVER_NAME, ROLE_SAN_SUFFIX,
};
use super::error::NetError;
use super::identity::{NodeId, NodeIdentity, Role, Site, NODE_ID_BYTES};
use super::pem;

/// File of the CA private key (PKCS#8 PEM, mode 0600).
pub const CA_KEY_FILE: &str = "ca.key";
/// File of the CA certificate (PEM); copy it anywhere, it is public.
pub const CA_CERT_FILE: &str = "ca.crt";

/// How long the CA certificate is valid. Long, because replacing it means enrolling every node
/// again.
pub const CA_VALIDITY: Duration = Duration::from_secs(20 * 365 * 24 * 3600);

/// How long a node certificate is valid. There is no renewal yet, so this outlives the machine.
pub const NODE_CERT_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// How far before "now" certificates start being valid, to tolerate clocks that run behind.
pub const CLOCK_SKEW_ALLOWANCE: Duration = Duration::from_secs(3600);

/// Largest certificate signing request accepted, in bytes of PEM (ours are about 400).
pub const MAX_CSR_PEM_BYTES: usize = 8 * 1024;

/// Bytes of random serial number in every certificate (RFC 5280 allows up to 20).
const SERIAL_BYTES: usize = 16;

/// Common name of the CA certificate, before the mesh tag.
const CA_COMMON_NAME: &str = "Stagecoach mesh CA";

/// Random bytes in the CA's name that tell one mesh's CA from another's.
const MESH_TAG_BYTES: usize = 8;

/// The mesh certificate authority.
pub struct CertAuthority {
    issuer: Issuer<'static, KeyPair>,
    cert: CertificateDer<'static>,
}

impl CertAuthority {
    /// Creates a new CA in memory: an ed25519 key and a self-signed certificate.
    pub fn generate() -> Result<Self, NetError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ED25519)?;
        let mut params = CertificateParams::default();
        // A random suffix keeps two meshes' CAs apart: TLS finds an issuer by name, so with
        // equal names a foreign certificate fails as a bad signature instead of an unknown CA.
        let mut mesh_tag = [0u8; MESH_TAG_BYTES];
        rand::thread_rng().fill_bytes(&mut mesh_tag);
        let mut name = DistinguishedName::new();
        name.push(
            DnType::CommonName,
            format!("{CA_COMMON_NAME} {}", hex::encode(mesh_tag)),
        );
        params.distinguished_name = name;
        // May sign node certificates, never other CAs.
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        set_validity(&mut params, CA_VALIDITY);
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key)?.der().clone();
        Ok(CertAuthority {
            issuer: Issuer::new(params, key),
            cert,
        })
    }

    /// Creates a new CA and saves it in `dir`, refusing if one is already there
    /// (`origin init`).
    pub fn create(dir: &Path) -> Result<Self, NetError> {
        let ca = Self::generate()?;
        ca.save(dir)?;
        Ok(ca)
    }

    /// True when `dir` holds a CA key.
    pub fn exists(dir: &Path) -> bool {
        dir.join(CA_KEY_FILE).exists()
    }

    /// Saves the CA into `dir` (created if missing): the key with mode 0600, then the
    /// certificate. Refuses to replace an existing CA, since every enrolled node trusts it.
    pub fn save(&self, dir: &Path) -> Result<(), NetError> {
        if Self::exists(dir) {
            return Err(NetError::AuthorityExists {
                dir: dir.to_owned(),
            });
        }
        std::fs::create_dir_all(dir).map_err(|e| NetError::io("create directory", dir, e))?;
        let cert_path = dir.join(CA_CERT_FILE);
        pem::write_atomic(
            &cert_path,
            pem::encode("CERTIFICATE", &self.cert).as_bytes(),
            pem::PUBLIC_FILE_MODE,
        )?;
        // The key last: its presence is what `exists` checks.
        let key_path = dir.join(CA_KEY_FILE);
        pem::write_atomic(
            &key_path,
            self.issuer.key().serialize_pem().as_bytes(),
            pem::SECRET_FILE_MODE,
        )?;
        tracing::info!(dir = %dir.display(), "saved certificate authority");
        Ok(())
    }

    /// Loads the CA saved in `dir`.
    pub fn load(dir: &Path) -> Result<Self, NetError> {
        if !Self::exists(dir) {
            return Err(NetError::NoAuthority {
                dir: dir.to_owned(),
            });
        }
        let key_path = dir.join(CA_KEY_FILE);
        let key_der = PrivatePkcs8KeyDer::from_pem_slice(&read_small(&key_path)?)
            .map_err(|e| bad_file(&key_path, format!("no PKCS#8 private key: {e}")))?;
        let key = KeyPair::try_from(&key_der)
            .map_err(|e| bad_file(&key_path, format!("unusable key: {e}")))?;
        let cert_path = dir.join(CA_CERT_FILE);
        let cert = read_cert(&cert_path)?;
        let (_, parsed) = x509_parser::parse_x509_certificate(&cert)
            .map_err(|e| bad_file(&cert_path, format!("not an X.509 certificate: {e}")))?;
        if parsed.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(bad_file(
                &cert_path,
                format!("it does not belong to the key in {CA_KEY_FILE}"),
            ));
        }
        let issuer = Issuer::from_ca_cert_der(&cert, key)
            .map_err(|e| bad_file(&cert_path, format!("not a usable CA certificate: {e}")))?;
        Ok(CertAuthority { issuer, cert })
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// The CA certificate, PEM (what [`crate::wire::Response::Enrolled`] carries).
    pub fn cert_pem(&self) -> String {
        pem::encode("CERTIFICATE", &self.cert)
    }

    /// Issues a node certificate for the key in `csr_pem`, for `role` in `site`. The request's
    /// signature proves the requester holds the key; everything else in it (names, usages) is
    /// ignored, and the CA sets the names from `role` and `site`. Returns the certificate, PEM.
    pub fn issue(&self, csr_pem: &str, role: Role, site: &Site) -> Result<String, NetError> {
        if csr_pem.len() > MAX_CSR_PEM_BYTES {
            return Err(NetError::BadCsr(format!(
                "{} bytes, more than the limit of {MAX_CSR_PEM_BYTES}",
                csr_pem.len()
            )));
        }
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| NetError::BadCsr(e.to_string()))?;
        if csr.public_key.algorithm() != &rcgen::PKCS_ED25519 {
            return Err(NetError::BadCsr(
                "the key is not ed25519; node keys must be ed25519".to_owned(),
            ));
        }
        let cert = self.sign(&csr.public_key, role, site)?;
        Ok(pem::encode("CERTIFICATE", &cert))
    }

    /// Generates a key and issues its certificate directly, for nodes that hold the CA (the
    /// origin's own endpoint) or are set up beside it (a publisher).
    pub fn issue_self(&self, role: Role, site: &Site) -> Result<IssuedCert, NetError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ED25519)?;
        let cert = self.sign(&key, role, site)?;
        Ok(IssuedCert {
            key: PrivatePkcs8KeyDer::from(key.serialize_der()),
            cert,
        })
    }

    /// [`CertAuthority::issue_self`] wrapped into a complete [`NodeIdentity`].
    pub fn node_identity(
        &self,
        role: Role,
        site: &Site,
        publisher_key: VerifyingKey,
        origin_addr: String,
    ) -> Result<NodeIdentity, NetError> {
        let issued = self.issue_self(role, site)?;
        NodeIdentity::new(issued, self.cert.clone(), publisher_key, origin_addr)
    }

    fn sign(
        &self,
        public_key: &impl PublicKeyData,
        role: Role,
        site: &Site,
    ) -> Result<CertificateDer<'static>, NetError> {
        let raw: [u8; NODE_ID_BYTES] = public_key
            .der_bytes()
            .try_into()
            .map_err(|_| NetError::BadCsr("the ed25519 key is not 32 bytes".to_owned()))?;
        let node_id = NodeId(raw);
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, format!("{role}.{site}"));
        params.distinguished_name = name;
        params.subject_alt_names = vec![
            SanType::DnsName(MESH_SERVER_NAME.try_into()?),
            SanType::DnsName(format!("{role}.{site}{ROLE_SAN_SUFFIX}").try_into()?),
            SanType::DnsName(format!("{node_id}{KEY_SAN_SUFFIX}").try_into()?),
        ];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        // Every node both serves (stagers, peers) and connects out.
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        set_validity(&mut params, NODE_CERT_VALIDITY);
        params.serial_number = Some(random_serial());
        let cert = params.signed_by(public_key, &self.issuer)?;
        tracing::info!(%role, %site, node = %node_id, "issued node certificate");
        Ok(cert.der().clone())
    }
}

impl std::fmt::Debug for CertAuthority {
    // Never prints the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertAuthority").finish_non_exhaustive()
    }
}

fn set_validity(params: &mut CertificateParams, validity: Duration) {
    let now = SystemTime::now();
    params.not_before = now
        .checked_sub(CLOCK_SKEW_ALLOWANCE)
        .unwrap_or(SystemTime::UNIX_EPOCH)
        .into();
    params.not_after = now.checked_add(validity).unwrap_or(now).into();
}

fn random_serial() -> SerialNumber {
    let mut serial = [0u8; SERIAL_BYTES];
    rand::thread_rng().fill_bytes(&mut serial);
    // Positive and of full length, as RFC 5280 wants serials to be positive integers.
    serial[0] = (serial[0] & 0x7f) | 0x01;
    SerialNumber::from_slice(&serial)
}
