//! Mutual TLS between mesh nodes over real QUIC endpoints on 127.0.0.1, and frame errors on
//! live streams.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ed25519_dalek::VerifyingKey;
use proto::net::{
    accept, call, client_endpoint, connect, peer_identity, read_frame, refuse_stream,
    server_endpoint, write_frame, CertAuthority, IssuedCert, NetError, NodeIdentity, PeerIdentity,
    Role, Site, MESH_ALPN, MESH_SERVER_NAME,
};
use proto::wire::{ErrorCode, Request, Response, MAX_FRAME_BYTES, PROTOCOL_VERSION};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

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

fn publisher_key() -> VerifyingKey {
    proto::manifest::generate_signing_key().verifying_key()
}

fn node(ca: &CertAuthority, role: Role, site: &str) -> NodeIdentity {
    ca.node_identity(
        role,
        &Site::new(site).expect("site"),
        publisher_key(),
        "127.0.0.1:1".to_owned(),
    )
    .expect("identity")
}

/// A client endpoint that trusts `ca` but presents `client_cert` (or no certificate at all),
/// for trying what a mesh node never does.
fn raw_client(ca: &CertificateDer<'static>, client_cert: Option<IssuedCert>) -> quinn::Endpoint {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).expect("root");
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls13")
        .with_root_certificates(roots);
    let mut tls = match client_cert {
        Some(issued) => builder
            .with_client_auth_cert(vec![issued.cert], PrivateKeyDer::Pkcs8(issued.key))
            .expect("client cert"),
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![MESH_ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("quic");
    let mut endpoint = quinn::Endpoint::client(loopback()).expect("bind");
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(quic)));
    endpoint
}

/// Accepts one connection on `server` and returns how the handshake ended.
async fn accept_one(
    server: &quinn::Endpoint,
) -> Result<(quinn::Connection, PeerIdentity), NetError> {
    let incoming = within("incoming connection", server.accept())
        .await
        .expect("endpoint open");
    within("server handshake", accept(incoming)).await
}

#[tokio::test]
async fn mutual_tls_round_trip_shows_role_and_site_on_both_sides() {
    let ca = CertAuthority::generate().expect("ca");
    let origin = node(&ca, Role::Origin, "core");
    let stager = node(&ca, Role::Stager, "fra1");
    let server = server_endpoint(loopback(), &origin).expect("server");
    let addr = server.local_addr().expect("addr");

    let serving = tokio::spawn(async move {
        let (conn, client) = accept_one(&server).await.expect("handshake");
        let (mut send, mut recv) = conn.accept_bi().await.expect("stream");
        let request: Request = read_frame(&mut recv, MAX_FRAME_BYTES)
            .await
            .expect("read")
            .expect("a request");
        // Echo who asked, so the client sees what the server saw.
        let answer = Response::Error {
            code: ErrorCode::NotFound,
            message: format!("{} {}", client.role, client.site),
        };
        write_frame(&mut send, &answer).await.expect("write");
        send.finish().expect("finish");
        conn.closed().await;
        (client, request)
    });

    let client = client_endpoint(&stager).expect("client");
    let conn = within("connect", connect(&client, addr))
        .await
        .expect("connect");
    let server_seen = peer_identity(&conn).expect("server identity");
    assert_eq!(server_seen, *origin.identity());
    assert_eq!(server_seen.role, Role::Origin);
    assert_eq!(server_seen.site.as_str(), "core");

    let request = Request::Resolve {
        name: "ubuntu".to_owned(),
        version: None,
    };
    let answer = within("call", call(&conn, &request, MAX_FRAME_BYTES))
        .await
        .expect("answer");
    assert_eq!(
        answer,
        Response::Error {
            code: ErrorCode::NotFound,
            message: "stager fra1".to_owned()
        }
    );
    conn.close(0u32.into(), b"done");

    let (client_seen, received) = within("server task", serving).await.expect("server");
    assert_eq!(client_seen, *stager.identity());
    assert_eq!(client_seen.node_id, stager.node_id());
    assert_eq!(received, request);
}

#[tokio::test]
async fn client_without_a_certificate_is_refused_in_the_handshake() {
    let ca = CertAuthority::generate().expect("ca");
    let origin = node(&ca, Role::Origin, "core");
    let server = server_endpoint(loopback(), &origin).expect("server");
    let addr = server.local_addr().expect("addr");
    let serving = tokio::spawn(async move { accept_one(&server).await.map(|_| ()) });

    let client = raw_client(ca.cert_der(), None);
    // TLS 1.3 lets the client finish first; the refusal arrives on the first stream at latest.
    let outcome = match within("connect", connect(&client, addr)).await {
        Err(e) => Err(e),
        Ok(conn) => within("call", call(&conn, &Request::ListBundles, MAX_FRAME_BYTES)).await,
    };
    let err = outcome.expect_err("a node without a certificate must be refused");
    assert!(
        matches!(&err, NetError::RefusedByPeer { alert, .. } if alert == "CertificateRequired"),
        "{err:?}"
    );
    assert!(err.to_string().contains("origin enroll"), "{err}");

    let server_err = within("server task", serving)
        .await
        .expect("task")
        .expect_err("server must not accept");
    assert!(
        matches!(server_err, NetError::HandshakeFailed(_)),
        "{server_err:?}"
    );
}

#[tokio::test]
async fn client_with_a_certificate_from_another_ca_is_refused() {
    let ca = CertAuthority::generate().expect("ca");
    let origin = node(&ca, Role::Origin, "core");
    let server = server_endpoint(loopback(), &origin).expect("server");
    let addr = server.local_addr().expect("addr");
    let serving = tokio::spawn(async move {
        let first = accept_one(&server).await.map(|_| ());
        let second = accept_one(&server).await.map(|_| ());
        (first, second)
    });

    // A rogue node that trusts the real CA (so it accepts the server) but holds a certificate
    // from its own CA, with a role and site that look right.
    let rogue_ca = CertAuthority::generate().expect("rogue ca");
    let rogue_cert = rogue_ca
        .issue_self(Role::Stager, &Site::new("fra1").expect("site"))
        .expect("rogue cert");
    let client = raw_client(ca.cert_der(), Some(rogue_cert));
    let outcome = match within("connect", connect(&client, addr)).await {
        Err(e) => Err(e),
        Ok(conn) => within("call", call(&conn, &Request::ListBundles, MAX_FRAME_BYTES)).await,
    };
    let err = outcome.expect_err("a certificate from another CA must be refused");
    assert!(
        matches!(&err, NetError::RefusedByPeer { alert, .. } if alert == "UnknownCA"),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("not from the peer's mesh CA"),
        "{err}"
    );

    // A node wholly of another mesh also refuses our server: it does not trust our CA.
    let stranger = node(&rogue_ca, Role::Edge, "fra1");
    let stranger_client = client_endpoint(&stranger).expect("client");
    let err = within("connect", connect(&stranger_client, addr))
        .await
        .expect_err("the stranger must not trust our server");
    assert!(matches!(err, NetError::HandshakeFailed(_)), "{err:?}");

    let (first, second) = within("server task", serving).await.expect("task");
    assert!(
        matches!(first, Err(NetError::HandshakeFailed(_))),
        "{first:?}"
    );
    assert!(second.is_err(), "{second:?}");
}

#[tokio::test]
async fn bad_frames_fail_their_own_stream_with_distinct_errors() {
    let ca = CertAuthority::generate().expect("ca");
    let origin = node(&ca, Role::Origin, "core");
    let edge = node(&ca, Role::Edge, "fra1");
    let server = server_endpoint(loopback(), &origin).expect("server");
    let addr = server.local_addr().expect("addr");

    // The server answers every good request with Ok and refuses bad ones, reporting each
    // stream's error kind.
    let (kinds_tx, mut kinds_rx) = tokio::sync::mpsc::channel::<&'static str>(16);
    tokio::spawn(async move {
        let (conn, _) = accept_one(&server).await.expect("handshake");
        while let Ok((mut send, mut recv)) = conn.accept_bi().await {
            let kinds_tx = kinds_tx.clone();
            tokio::spawn(async move {
                match read_frame::<Request>(&mut recv, MAX_FRAME_BYTES).await {
                    Ok(Some(_)) => {
                        write_frame(&mut send, &Response::Ok).await.expect("write");
                        send.finish().expect("finish");
                        kinds_tx.send("ok").await.expect("report");
                    }
                    Ok(None) => kinds_tx.send("empty").await.expect("report"),
                    Err(e) => {
                        assert!(e.is_bad_input(), "{e:?}");
                        refuse_stream(&mut send, &mut recv, &e)
                            .await
                            .expect("refuse");
                        kinds_tx.send(e.kind()).await.expect("report");
                    }
                }
            });
        }
    });

    let client = client_endpoint(&edge).expect("client");
    let conn = within("connect", connect(&client, addr))
        .await
        .expect("connect");

    // Sends raw bytes on a new stream and returns the server's one-frame answer.
    let raw = |bytes: Vec<u8>| {
        let conn = conn.clone();
        async move {
            let (mut send, mut recv) = conn.open_bi().await.expect("open");
            send.write_all(&bytes).await.expect("write");
            send.finish().expect("finish");
            read_frame::<Response>(&mut recv, MAX_FRAME_BYTES)
                .await
                .expect("answer")
                .expect("a frame")
        }
    };

    // A length prefix far beyond the bound: refused before any allocation.
    let oversized = within("oversized", raw(u32::MAX.to_le_bytes().to_vec())).await;
    let Response::Error { code, message } = oversized else {
        panic!("expected an error, got {oversized:?}");
    };
    assert_eq!(code, ErrorCode::BadRequest);
    assert!(message.contains("exceeds the limit"), "{message}");
    assert_eq!(
        within("kind", kinds_rx.recv()).await,
        Some("frame_too_large")
    );

    // A valid length and version, then bytes that are no request.
    let mut garbage = 7u32.to_le_bytes().to_vec();
    garbage.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    garbage.extend_from_slice(&[0xff; 5]);
    let malformed = within("malformed", raw(garbage)).await;
    let Response::Error { code, message } = malformed else {
        panic!("expected an error, got {malformed:?}");
    };
    assert_eq!(code, ErrorCode::BadRequest);
    assert!(message.starts_with("malformed frame"), "{message}");
    assert_eq!(
        within("kind", kinds_rx.recv()).await,
        Some("malformed_frame")
    );

    // Half a length prefix, then the end of the stream.
    let truncated = within("truncated", raw(vec![1, 0])).await;
    assert!(
        matches!(&truncated, Response::Error { message, .. } if message.contains("2 of 4 bytes")),
        "{truncated:?}"
    );
    assert_eq!(within("kind", kinds_rx.recv()).await, Some("truncated"));

    // The connection is unharmed: a good request on another stream still works.
    let answer = within("call", call(&conn, &Request::ListBundles, MAX_FRAME_BYTES))
        .await
        .expect("answer");
    assert_eq!(answer, Response::Ok);
    assert_eq!(within("kind", kinds_rx.recv()).await, Some("ok"));
}

#[test]
fn mesh_certificates_name_the_mesh_server() {
    // Every node certificate must verify under the one name clients check.
    let ca = CertAuthority::generate().expect("ca");
    let edge = node(&ca, Role::Edge, "fra1");
    let (_, cert) = x509_parser::parse_x509_certificate(edge.cert_der()).expect("x509");
    let names: Vec<String> = cert
        .subject_alternative_name()
        .expect("san")
        .expect("san present")
        .value
        .general_names
        .iter()
        .map(|name| name.to_string())
        .collect();
    assert!(
        names.iter().any(|n| n.contains(MESH_SERVER_NAME)),
        "{names:?}"
    );
    assert!(
        names.iter().any(|n| n.contains("edge.fra1.id.stagecoach")),
        "{names:?}"
    );
}
