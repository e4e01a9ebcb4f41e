//! The console over HTTPS (issue 17) with the real `origin` binary: `--console-tls-cert` and
//! `--console-tls-key` (here the origin's own mesh certificate and key as PEM files) on a
//! non-loopback address, then `--console-tls-mesh`. A client that trusts the mesh CA loads
//! the login page and logs in, and the session cookie carries `Secure`.

use std::io::Write as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject as _;
use stagecoach_testing::wait_until;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ADMIN: &str = "alice";
const ADMIN_PASSWORD: &str = "alice-has-a-long-password";

/// Largest answer read, in bytes.
const MAX_ANSWER_BYTES: u64 = 1024 * 1024;

const ORIGIN: &str = env!("CARGO_BIN_EXE_origin");

/// A running `origin serve`, killed when dropped.
struct Serve(Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn serve(dir: &Path, console_flags: &[String]) -> (Serve, String) {
    let ready = dir.join("ready.json");
    let _ = std::fs::remove_file(&ready);
    let mut args: Vec<String> = [
        "serve",
        "--dir",
        &dir.display().to_string(),
        "--listen",
        "127.0.0.1:0",
        "--enroll-listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
        "--ready-file",
        &ready.display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend_from_slice(console_flags);
    let child = Command::new(ORIGIN)
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start origin serve");
    let serve = Serve(child);
    wait_until(Duration::from_secs(30), Duration::from_millis(50), || {
        std::fs::read(&ready)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .is_some_and(|v| v["console"].is_string())
    })
    .expect("origin serve writes its ready file");
    let addrs: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&ready).expect("ready file")).expect("JSON");
    let console = addrs["console"].as_str().expect("console").to_owned();
    let port = console.rsplit(':').next().expect("a port");
    (serve, format!("127.0.0.1:{port}"))
}

/// One HTTP/1.1 request over TLS to `addr`, trusting `ca_pem`; returns the raw answer.
async fn https(addr: &str, ca_pem: &[u8], request: String) -> String {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(ca_pem) {
        roots.add(cert.expect("CA PEM")).expect("add the CA");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let name =
        rustls::pki_types::ServerName::try_from(proto::net::MESH_SERVER_NAME).expect("server name");
    let mut tls = connector.connect(name, tcp).await.expect("TLS handshake");
    tls.write_all(request.as_bytes()).await.expect("send");
    let mut answer = Vec::new();
    (&mut tls)
        .take(MAX_ANSWER_BYTES)
        .read_to_end(&mut answer)
        .await
        .expect("read the answer");
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_over_https_with_given_and_mesh_certificates() {
    let work = tempfile::tempdir().expect("tempdir");
    let dir = work.path().join("origin");
    let init = Command::new(ORIGIN)
        .args(["init", "--dir", &dir.display().to_string()])
        .output()
        .expect("origin init");
    assert!(init.status.success(), "{init:?}");
    let identity = dir.join("identity");
    let ca_pem = std::fs::read(identity.join("ca.crt")).expect("the mesh CA");

    let given = [
        "--console".to_owned(),
        "0.0.0.0:0".into(),
        "--console-tls-cert".into(),
        identity.join("node.crt").display().to_string(),
        "--console-tls-key".into(),
        identity.join("node.key").display().to_string(),
    ];
    let mesh = [
        "--console".to_owned(),
        "127.0.0.1:0".into(),
        "--console-tls-mesh".into(),
    ];
    for (round, flags) in [&given[..], &mesh[..]].into_iter().enumerate() {
        let (_serve, addr) = serve(&dir, flags);
        if round == 0 {
            let mut add = Command::new(ORIGIN)
                .args(["admin", "add", ADMIN, "--role", "admin", "--password-stdin"])
                .args(["--dir", &dir.display().to_string()])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("origin admin add");
            add.stdin
                .take()
                .expect("stdin")
                .write_all(format!("{ADMIN_PASSWORD}\n").as_bytes())
                .expect("password");
            let out = add.wait_with_output().expect("origin admin add");
            assert!(out.status.success(), "{out:?}");
        }
        let page = https(
            &addr,
            &ca_pem,
            format!("GET /login HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"),
        )
        .await;
        assert!(page.starts_with("HTTP/1.1 200"), "{flags:?}: {page}");
        assert!(page.contains("<form"), "{page}");

        let body = format!("name={ADMIN}&password={ADMIN_PASSWORD}");
        let login = format!(
            "POST /login HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/x-www-form-urlencoded\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let answer = https(&addr, &ca_pem, login).await;
        assert!(answer.starts_with("HTTP/1.1 303"), "{flags:?}: {answer}");
        let cookie = answer
            .lines()
            .find(|l| l.to_ascii_lowercase().starts_with("set-cookie:"))
            .expect("a session cookie");
        for attribute in ["HttpOnly", "SameSite=Strict", "Secure"] {
            assert!(cookie.contains(attribute), "{attribute}: {cookie}");
        }
    }
}
