//! Certificate authority on disk and enrollment over real QUIC endpoints on 127.0.0.1.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ed25519_dalek::VerifyingKey;
use proto::net::ca::CA_KEY_FILE;
use proto::net::identity::NODE_KEY_FILE;
use proto::net::{
    accept, call, cert_fingerprint, client_endpoint, connect, enroll, enroll_endpoint,
    peer_identity, serve_enrollment, server_endpoint, CertAuthority, EnrollDenied, EnrollGrant,
    EnrollToken, NetError, NodeIdentity, PeerIdentity, Role, ServerPin, Site,
};
use proto::wire::{ErrorCode, Request, Response, MAX_FRAME_BYTES};
use rustls::pki_types::pem::PemObject;

/// Bound on every step of a test, so a bug fails the test instead of hanging it.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);

async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(STEP_TIMEOUT, fut)
        .await
        .unwrap_or_else(|_| panic!("{what} took longer than {STEP_TIMEOUT:?}"))
}

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().expect("addr")
}

fn site(name: &str) -> Site {
    Site::new(name).expect("site")
}

/// One-time secrets the test origin has handed out, with what each grants.
type Secrets = Arc<Mutex<HashMap<[u8; 32], (Role, Site)>>>;

/// An origin: CA, its own identity, a mesh endpoint, and an enrollment endpoint whose handler
/// accepts each secret it issued once.
struct Origin {
    ca: Arc<CertAuthority>,
    identity: NodeIdentity,
    publisher_key: VerifyingKey,
    mesh: quinn::Endpoint,
    mesh_addr: SocketAddr,
    enroll_addr: SocketAddr,
    secrets: Secrets,
}

impl Origin {
    fn start() -> Origin {
        let ca = Arc::new(CertAuthority::generate().expect("ca"));
        let publisher_key = proto::manifest::generate_signing_key().verifying_key();
        Origin::serve(ca, publisher_key, Role::Origin)
    }

    /// An enrollment server whose certificate, from `ca`, has `role` (only an origin's is
    /// trusted by a token that pins the CA).
    fn serve(ca: Arc<CertAuthority>, publisher_key: VerifyingKey, role: Role) -> Origin {
        let identity = ca
            .node_identity(role, &site("core"), publisher_key, "unused".to_owned())
            .expect("origin identity");
        let mesh = server_endpoint(loopback(), &identity).expect("mesh");
        let mesh_addr = mesh.local_addr().expect("addr");
        let enrollment = enroll_endpoint(loopback(), &identity).expect("enroll endpoint");
        let enroll_addr = enrollment.local_addr().expect("addr");
        let secrets: Secrets = Arc::default();

        let handler_ca = ca.clone();
        let handler_secrets = secrets.clone();
        tokio::spawn(serve_enrollment(enrollment, move |request| {
            // One-time: the secret is consumed whether or not issuing succeeds.
            let granted = handler_secrets
                .lock()
                .expect("lock")
                .remove(&request.secret);
            let result = match granted {
                Some((role, site)) => EnrollGrant::issue(
                    &handler_ca,
                    &request.csr_pem,
                    role,
                    &site,
                    &publisher_key,
                    mesh_addr.to_string(),
                )
                .map(|mut grant| {
                    grant.stagers = site_stagers(site.as_str());
                    grant
                }),
                None => Err(EnrollDenied::forbidden(
                    "unknown or already used token; ask for a new one with `origin enroll`",
                )),
            };
            async move { result }
        }));
        Origin {
            ca,
            identity,
            publisher_key,
            mesh,
            mesh_addr,
            enroll_addr,
            secrets,
        }
    }

    /// What `origin enroll --role R --site S` prints.
    fn token(&self, role: Role, site_name: &str) -> String {
        self.token_with(vec![self.enroll_addr], self.ca_pin(), role, site_name)
    }

    /// A token trusting any origin of this origin's CA.
    fn ca_pin(&self) -> ServerPin {
        ServerPin::Ca(cert_fingerprint(self.ca.cert_der()))
    }

    /// A token naming `addrs` and `pin`, whose secret this origin accepts.
    fn token_with(
        &self,
        addrs: Vec<SocketAddr>,
        pin: ServerPin,
        role: Role,
        site_name: &str,
    ) -> String {
        let token = EnrollToken::new(addrs, pin, role, site(site_name));
        self.secrets
            .lock()
            .expect("lock")
            .insert(token.secret, (role, site(site_name)));
        token.to_string()
    }
}

/// The stagers the test origin names to a node of `site`.
fn site_stagers(site: &str) -> Vec<String> {
    match site {
        "fra1" => vec!["10.1.0.1:7410".to_owned(), "10.1.0.2:7410".to_owned()],
        _ => Vec::new(),
    }
}

#[tokio::test]
async fn enrolled_node_gets_its_role_and_site_and_joins_the_mesh() {
    let origin = Origin::start();
    let text = origin.token(Role::Stager, "fra1");
    let dir = tempfile::tempdir().expect("tempdir");
    let node_dir = dir.path().join("stager");

    let token = EnrollToken::parse(&text).expect("parse");
    let enrolled = within("enroll", enroll(&token, &node_dir))
        .await
        .expect("enroll");
    assert_eq!(enrolled.role(), Role::Stager);
    assert_eq!(enrolled.site().as_str(), "fra1");

    // What a restarted daemon loads is what enrollment produced.
    let loaded = NodeIdentity::load(&node_dir).expect("load");
    assert_eq!(loaded.identity(), enrolled.identity());
    assert_eq!(loaded.publisher_key(), &origin.publisher_key);
    assert_eq!(loaded.origin_addr(), origin.mesh_addr.to_string());
    assert_eq!(loaded.ca_cert_der(), origin.ca.cert_der());
    assert_eq!(
        enrolled.stagers(),
        site_stagers("fra1"),
        "the site's stagers follow"
    );
    assert_eq!(loaded.stagers(), site_stagers("fra1"), "and are kept");
    let key_mode = std::fs::metadata(node_dir.join(NODE_KEY_FILE))
        .expect("key file")
        .permissions()
        .mode();
    assert_eq!(key_mode & 0o777, 0o600, "the node key must be private");

    // The new identity passes mutual TLS, and each side sees the other's role and site.
    let mesh = origin.mesh.clone();
    let serving = tokio::spawn(async move {
        let incoming = mesh.accept().await.expect("endpoint open");
        let (conn, peer) = accept(incoming).await.expect("handshake");
        let (mut send, mut recv) = conn.accept_bi().await.expect("stream");
        let _: Option<Request> = proto::net::read_frame(&mut recv, MAX_FRAME_BYTES)
            .await
            .expect("read");
        proto::net::write_frame(&mut send, &Response::Ok)
            .await
            .expect("write");
        send.finish().expect("finish");
        conn.closed().await;
        peer
    });
    let client = client_endpoint(&loaded).expect("client");
    let origin_addr: SocketAddr = loaded.origin_addr().parse().expect("origin addr");
    let conn = within("connect", connect(&client, origin_addr))
        .await
        .expect("connect");
    assert_eq!(peer_identity(&conn).expect("peer").role, Role::Origin);
    let answer = within("call", call(&conn, &Request::ListBundles, MAX_FRAME_BYTES))
        .await
        .expect("call");
    assert_eq!(answer, Response::Ok);
    conn.close(0u32.into(), b"done");
    let seen: PeerIdentity = within("server", serving).await.expect("server task");
    assert_eq!(seen, *loaded.identity());

    // The token was one-time.
    let again = within("enroll again", enroll(&token, &dir.path().join("other")))
        .await
        .expect_err("a used token must be refused");
    let NetError::EnrollRefused { code, message } = &again else {
        panic!("expected a refusal, got {again:?}");
    };
    assert_eq!(*code, ErrorCode::Forbidden);
    assert!(message.contains("already used"), "{message}");

    // And a node never enrolls over its existing identity.
    let fresh = origin.token(Role::Stager, "fra1");
    let err = within(
        "enroll over",
        enroll(&EnrollToken::parse(&fresh).expect("parse"), &node_dir),
    )
    .await
    .expect_err("must not replace an identity");
    assert!(matches!(err, NetError::AlreadyEnrolled { .. }), "{err:?}");
}

#[tokio::test]
async fn token_with_a_wrong_fingerprint_does_not_enroll() {
    let origin = Origin::start();
    let mut token = EnrollToken::parse(&origin.token(Role::Edge, "fra1")).expect("parse");
    let ServerPin::Ca(pinned) = &mut token.pin else {
        panic!("tokens pin the CA");
    };
    pinned[0] ^= 1;
    let dir = tempfile::tempdir().expect("tempdir");

    let err = within("enroll", enroll(&token, dir.path()))
        .await
        .expect_err("a server with another certificate must not be trusted");
    assert!(
        matches!(err, NetError::FingerprintMismatch { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("fingerprint mismatch"), "{err}");

    // Nothing was saved, and the secret was never sent, so it still works with the right pin.
    let not_enrolled = NodeIdentity::load(dir.path()).expect_err("nothing saved");
    assert!(matches!(not_enrolled, NetError::NotEnrolled { .. }));
    assert!(
        not_enrolled.to_string().contains("enroll TOKEN"),
        "{not_enrolled}"
    );
    token.pin = origin.ca_pin();
    within("enroll", enroll(&token, dir.path()))
        .await
        .expect("the secret was not spent by the failed attempt");
}

#[tokio::test]
async fn a_token_tries_its_origins_in_turn_and_trusts_only_origins_of_its_ca() {
    let origin = Origin::start();
    // A stager of the same mesh, whose certificate the same CA issued, answering enrollments:
    // it must not be trusted with a secret.
    let impostor = Origin::serve(origin.ca.clone(), origin.publisher_key, Role::Stager);
    // An origin that is down: the port is bound, nothing answers.
    let silent = std::net::UdpSocket::bind(loopback()).expect("bind");
    let down = silent.local_addr().expect("addr");
    let dir = tempfile::tempdir().expect("tempdir");

    let only_impostor = origin.token_with(
        vec![impostor.enroll_addr],
        origin.ca_pin(),
        Role::Edge,
        "fra1",
    );
    let err = within(
        "enroll at the impostor",
        enroll(
            &EnrollToken::parse(&only_impostor).expect("parse"),
            &dir.path().join("a"),
        ),
    )
    .await
    .expect_err("a stager's certificate must not be trusted");
    assert!(
        matches!(err, NetError::FingerprintMismatch { addr } if addr == impostor.enroll_addr),
        "{err:?}"
    );

    // Down, impostor, origin: the first two are passed over and the third enrolls the node.
    let started = std::time::Instant::now();
    let text = origin.token_with(
        vec![down, impostor.enroll_addr, origin.enroll_addr],
        origin.ca_pin(),
        Role::Edge,
        "fra1",
    );
    let enrolled = tokio::time::timeout(
        Duration::from_secs(20),
        enroll(
            &EnrollToken::parse(&text).expect("parse"),
            &dir.path().join("b"),
        ),
    )
    .await
    .expect("in time")
    .expect("enrolled at the third address");
    assert_eq!(enrolled.role(), Role::Edge);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "an origin that is down costs one handshake timeout, took {:?}",
        started.elapsed()
    );
    assert!(
        impostor.secrets.lock().expect("lock").is_empty(),
        "the impostor never had a secret to check"
    );

    // A token of the first format (the origin's own certificate pinned) still enrolls.
    let first = origin.token_with(
        vec![origin.enroll_addr],
        ServerPin::Cert(cert_fingerprint(origin.identity.cert_der())),
        Role::Stager,
        "fra1",
    );
    assert!(first.starts_with("sc1-"), "{first}");
    within(
        "enroll with a format-1 token",
        enroll(
            &EnrollToken::parse(&first).expect("parse"),
            &dir.path().join("c"),
        ),
    )
    .await
    .expect("format 1 still enrolls");

    // A token pinning another mesh's CA trusts none of these origins.
    let other = Arc::new(CertAuthority::generate().expect("ca"));
    let foreign = origin.token_with(
        vec![origin.enroll_addr],
        ServerPin::Ca(cert_fingerprint(other.cert_der())),
        Role::Edge,
        "fra1",
    );
    let err = within(
        "enroll with another CA pinned",
        enroll(
            &EnrollToken::parse(&foreign).expect("parse"),
            &dir.path().join("d"),
        ),
    )
    .await
    .expect_err("another CA");
    assert!(
        matches!(err, NetError::FingerprintMismatch { .. }),
        "{err:?}"
    );
    drop(silent);
}

#[test]
fn certificate_authority_survives_a_restart_and_is_never_replaced() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca_dir = dir.path().join("ca");
    let missing = CertAuthority::load(&ca_dir).expect_err("no CA yet");
    assert!(missing.to_string().contains("origin init"), "{missing}");

    let created = CertAuthority::create(&ca_dir).expect("create");
    let key_mode = std::fs::metadata(ca_dir.join(CA_KEY_FILE))
        .expect("key file")
        .permissions()
        .mode();
    assert_eq!(key_mode & 0o777, 0o600, "the CA key must be private");
    let err = CertAuthority::create(&ca_dir).expect_err("second init");
    assert!(matches!(err, NetError::AuthorityExists { .. }), "{err:?}");

    // The reloaded CA issues certificates that chain to the original CA certificate.
    let loaded = CertAuthority::load(&ca_dir).expect("load");
    assert_eq!(loaded.cert_der(), created.cert_der());
    let publisher_key = proto::manifest::generate_signing_key().verifying_key();
    let issued = loaded
        .issue_self(Role::Publisher, &site("core"))
        .expect("issue");
    let node = NodeIdentity::new(
        issued,
        created.cert_der().clone(),
        publisher_key,
        "127.0.0.1:7000".to_owned(),
    )
    .expect("chains to the original CA");
    assert_eq!(node.role(), Role::Publisher);

    // A certificate from another CA does not pass as this mesh's.
    let other = CertAuthority::generate().expect("other");
    let foreign = other.issue_self(Role::Edge, &site("core")).expect("issue");
    let err = NodeIdentity::new(
        foreign,
        created.cert_der().clone(),
        publisher_key,
        String::new(),
    )
    .expect_err("foreign certificate");
    assert!(matches!(err, NetError::BadCertificate(_)), "{err:?}");
}

#[test]
fn the_ca_sets_names_itself_and_ignores_those_in_the_request() {
    let ca = CertAuthority::generate().expect("ca");
    // A node asks to be the origin of another site.
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("key");
    let params = rcgen::CertificateParams::new(vec![
        "origin.core.id.stagecoach".to_owned(),
        "evil.example".to_owned(),
    ])
    .expect("params");
    let csr = params
        .serialize_request(&key)
        .expect("csr")
        .pem()
        .expect("pem");

    let cert_pem = ca.issue(&csr, Role::Edge, &site("fra1")).expect("issue");
    let cert = rustls::pki_types::CertificateDer::from_pem_slice(cert_pem.as_bytes()).expect("pem");
    let identity = PeerIdentity::from_cert_der(&cert).expect("identity");
    assert_eq!(identity.role, Role::Edge);
    assert_eq!(identity.site.as_str(), "fra1");
    assert_eq!(identity.node_id.as_bytes().as_slice(), key.public_key_raw());
    assert!(!cert_pem.is_empty());
    let (_, parsed) = x509_parser::parse_x509_certificate(&cert).expect("x509");
    let names = format!("{:?}", parsed.subject_alternative_name().expect("san"));
    assert!(!names.contains("evil.example"), "{names}");
    assert!(!names.contains("origin.core"), "{names}");

    // Garbage and non-ed25519 keys are refused with a reason.
    let err = ca
        .issue("not a csr", Role::Edge, &site("fra1"))
        .expect_err("garbage");
    assert!(matches!(err, NetError::BadCsr(_)), "{err:?}");
    let p256 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&p256)
        .expect("csr")
        .pem()
        .expect("pem");
    let err = ca.issue(&csr, Role::Edge, &site("fra1")).expect_err("p256");
    assert!(err.to_string().contains("ed25519"), "{err}");
}
