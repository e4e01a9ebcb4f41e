//! Content keys of encrypted bundles (issue 16) with real processes on loopback: the origin
//! gives an edge of a reading class every generation, at its start and after `origin keys
//! rotate`; an edge of another class gets an empty list; a stager's certificate is refused by
//! the authorization table; `keys retire` reaches the edges' rings; a revoked node is refused
//! and the keys rotate without it, so it cannot open a bundle published after. The ring on the edge is 0600 and no stager holds a key.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use netsim::procs::Binaries;
use netsim::testbed::{EdgeNode, Testbed};
use proto::keys::{KeyGeneration, KeyRing};
use proto::wire::{ErrorCode, Request, Response};
use stagecoach_testing::wait_until_async;

/// How long an edge may take to pick up a change of its keys (it asks every second here).
const KEYS_TIMEOUT: Duration = Duration::from_secs(60);

fn bins() -> Binaries {
    Binaries::beside_current_exe().expect("build the binaries: cargo build --release --bins")
}

async fn origin_ok(mesh: &Testbed, args: &[&str]) -> String {
    let out = mesh.origin_cli(args).await.expect("run origin");
    assert!(
        out.ok,
        "origin {args:?} failed:\n{}\n{}",
        out.stdout, out.stderr
    );
    out.stdout
}

fn identity(edge: &EdgeNode) -> proto::net::NodeIdentity {
    proto::net::NodeIdentity::load(&edge.dir.join("identity")).expect("edge identity")
}

fn ring_path(edge: &EdgeNode) -> std::path::PathBuf {
    edge.dir.join("identity").join(proto::keyring::KEYRING_FILE)
}

fn ring(edge: &EdgeNode) -> KeyRing {
    proto::keyring::load(&ring_path(edge)).expect("the edge's key ring")
}

fn generations(ring: &KeyRing) -> Vec<u32> {
    ring.generations().map(|g| g.0).collect()
}

async fn wait_for_generations(edge: &EdgeNode, want: &[u32], why: &str) {
    let reached = wait_until_async(KEYS_TIMEOUT, Duration::from_millis(200), async || {
        generations(&ring(edge)) == want
    })
    .await;
    assert!(
        reached.is_ok(),
        "{why}: {} holds generations {:?}, expected {want:?}",
        edge.name,
        generations(&ring(edge))
    );
}

/// Asks the origin for content keys with `identity`'s certificate, as an edge would.
async fn ask_keys(mesh: &Testbed, identity: &proto::net::NodeIdentity) -> Response {
    let endpoint = proto::net::client_endpoint(identity).expect("endpoint");
    let addr = mesh.origin.mesh.parse().expect("origin address");
    let conn = proto::net::connect(&endpoint, addr).await.expect("connect");
    let answer = proto::net::call(&conn, &Request::ContentKeys, proto::wire::MAX_FRAME_BYTES)
        .await
        .expect("answer");
    conn.close(0u32.into(), b"done");
    answer
}

/// Lowercase hex, as a key would be printed.
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Every file under `dir`.
fn files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            files(&path, out);
        } else {
            out.push(path);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn edges_of_reading_classes_get_keys_from_the_origin_and_nobody_else_does() {
    let work = tempfile::tempdir().expect("tempdir");
    let mut mesh = Testbed::start(bins(), work.path(), 1, 2, &[])
        .await
        .expect("mesh");
    let site = mesh.stagers[0].site.clone();
    let (reader, other) = (mesh.edges[0].clone(), mesh.edges[1].clone());
    let reader_id = identity(&reader).node_id().to_string();
    let other_id = identity(&other).node_id().to_string();

    // The origin made generation 1 at its first start.
    let listed = origin_ok(&mesh, &["keys", "list", "--json"]).await;
    let rows: serde_json::Value = serde_json::from_str(listed.trim()).expect("keys JSON");
    assert_eq!(rows[0]["generation"], 1, "{rows}");
    assert_eq!(rows[0]["current"], true, "{rows}");
    let origin_ring = proto::keyring::load(&mesh.origin_dir.join(proto::keyring::KEYRING_FILE))
        .expect("origin ring");
    let key_1 = origin_ring
        .get(KeyGeneration(1))
        .expect("generation 1")
        .clone();
    assert!(!listed.contains(&hex(key_1.expose_secret())));

    // Before any class may read, an enrolled edge gets an empty list.
    match ask_keys(&mesh, &identity(&reader)).await {
        Response::ContentKeys { generations } => assert!(generations.is_empty()),
        other => panic!("expected an empty key list, got {other:?}"),
    }

    let policy = work.path().join("policy.toml");
    std::fs::write(&policy, "[encryption]\nread_classes = [\"secure\"]\n").expect("policy");
    origin_ok(
        &mesh,
        &["policy", "load", policy.to_str().expect("utf-8 path")],
    )
    .await;
    origin_ok(&mesh, &["class", "set", &reader_id, "secure"]).await;
    origin_ok(&mesh, &["class", "set", &other_id, "web"]).await;

    mesh.start_edge_daemons(false, &["--keys-refresh-secs".into(), "1".into()])
        .await
        .expect("daemons");
    wait_for_generations(&reader, &[1], "at the daemon's start").await;
    assert_eq!(
        ring(&reader).get(KeyGeneration(1)).expect("held"),
        &key_1,
        "the key the origin keeps"
    );
    let mode = std::fs::metadata(ring_path(&reader))
        .expect("stat")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the ring is its owner's only");

    // An edge of a class that may not read: an empty list, and no ring written.
    match ask_keys(&mesh, &identity(&other)).await {
        Response::ContentKeys { generations } => assert!(generations.is_empty()),
        other => panic!("expected an empty key list, got {other:?}"),
    }
    assert!(ring(&other).is_empty());

    // A stager's certificate is refused by the table, and a stager does not relay the request.
    let stager = mesh
        .enroll_client("stager", &site, "keys-stager")
        .await
        .expect("stager client");
    match ask_keys(&mesh, &stager.identity).await {
        Response::Error { code, message } => {
            assert_eq!(code, ErrorCode::Forbidden);
            assert!(message.contains("only the edge role may"), "{message}");
        }
        other => panic!("a stager got {other:?}"),
    }
    let edge_client = mesh
        .enroll_client("edge", &site, "keys-edge")
        .await
        .expect("edge client");
    match edge_client
        .call(&mesh.stagers[0].ready.mesh, &Request::ContentKeys)
        .await
        .expect("stager answers")
    {
        Response::Error { code, message } => {
            assert_eq!(code, ErrorCode::BadRequest);
            assert!(message.contains("not a request for a stager"), "{message}");
        }
        other => panic!("a stager answered {other:?}"),
    }
    // An edge that never reported is told so.
    match ask_keys(&mesh, &edge_client.identity).await {
        Response::Error { code, message } => {
            assert_eq!(code, ErrorCode::NotFound);
            assert!(message.contains("has not reported"), "{message}");
        }
        other => panic!("an unknown edge got {other:?}"),
    }

    // Rotation: the reader gets the new generation and keeps the old.
    let rotated = origin_ok(&mesh, &["keys", "rotate"]).await;
    assert!(rotated.contains("key generation 2"), "{rotated}");
    wait_for_generations(&reader, &[1, 2], "after a rotation").await;

    // Retirement: the reader drops it at its next refresh. The current one cannot be retired.
    let current = mesh
        .origin_cli(&["keys", "retire", "2"])
        .await
        .expect("run origin");
    assert!(!current.ok, "retiring the current generation must fail");
    assert!(
        current.stdout.contains("current generation")
            || current.stderr.contains("current generation"),
        "{}\n{}",
        current.stdout,
        current.stderr
    );
    origin_ok(&mesh, &["keys", "retire", "1"]).await;
    wait_for_generations(&reader, &[2], "after retiring generation 1").await;

    // No stager directory holds a key file or a key.
    let key_2 = ring(&reader).get(KeyGeneration(2)).expect("held").clone();
    for stager in &mesh.stagers {
        let mut all = Vec::new();
        files(&stager.dir, &mut all);
        assert!(!all.is_empty(), "{} has files", stager.dir.display());
        for file in all {
            assert_ne!(
                file.file_name().and_then(|n| n.to_str()),
                Some(proto::keyring::KEYRING_FILE),
                "{}",
                file.display()
            );
            let bytes = std::fs::read(&file).unwrap_or_default();
            for key in [&key_1, &key_2] {
                assert!(
                    !bytes
                        .windows(key.expose_secret().len())
                        .any(|w| w == key.expose_secret()),
                    "a key is in {}",
                    file.display()
                );
            }
        }
    }

    // A class that requires encryption is never rolled out an unencrypted bundle.
    std::fs::write(
        &policy,
        "[encryption]\nread_classes = [\"secure\"]\nrequire_classes = [\"vault\"]\n",
    )
    .expect("policy");
    origin_ok(
        &mesh,
        &["policy", "load", policy.to_str().expect("utf-8 path")],
    )
    .await;
    origin_ok(&mesh, &["class", "set", &other_id, "vault"]).await;
    let tree = work.path().join("plain-os");
    std::fs::create_dir_all(tree.join("etc")).expect("tree");
    std::fs::write(tree.join("etc/os-release"), "NAME=plain\n").expect("tree");
    mesh.publish(&tree, "plain-os", "1").await.expect("publish");
    let selector = format!("node={other_id}");
    let refused = mesh
        .origin_cli(&[
            "rollout",
            "start",
            "plain-os@1",
            "--to",
            &selector,
            "--rescue",
            "plain-os@1",
        ])
        .await
        .expect("run origin");
    let said = format!("{}\n{}", refused.stdout, refused.stderr);
    assert!(
        !refused.ok,
        "a plain rollout to a vault node must fail: {said}"
    );
    assert!(said.contains("not encrypted"), "{said}");
    assert!(said.contains("require_classes"), "{said}");

    // Revocation: the node is refused, drops its keys, and the keys rotate without it.
    let revoked = origin_ok(&mesh, &["nodes", "revoke", &reader_id]).await;
    assert!(revoked.contains("revoked"), "{revoked}");
    assert!(revoked.contains("key generation 3"), "{revoked}");
    match ask_keys(&mesh, &identity(&reader)).await {
        Response::Error { code, message } => {
            assert_eq!(code, ErrorCode::Forbidden);
            assert!(message.contains("revoked"), "{message}");
        }
        other => panic!("a revoked node got {other:?}"),
    }
    let nodes = origin_ok(&mesh, &["nodes", "--json"]).await;
    let rows: serde_json::Value = serde_json::from_str(nodes.trim()).expect("nodes JSON");
    let revoked_row = rows
        .as_array()
        .expect("rows")
        .iter()
        .find(|row| row["id"] == reader_id.as_str())
        .expect("the revoked node's row");
    assert_eq!(revoked_row["revoked"], true, "{revoked_row}");
    wait_for_generations(&reader, &[], "after the node's revocation").await;
    let origin_ring = proto::keyring::load(&mesh.origin_dir.join(proto::keyring::KEYRING_FILE))
        .expect("origin ring");
    assert_eq!(origin_ring.newest().map(|(g, _)| g), Some(KeyGeneration(3)));

    // A bundle published after the revocation is sealed with generation 3, which the revoked
    // node never gets: its fetch carries only ciphertext, and its unpack asks the origin, is
    // refused, fails naming the generation and writes nothing.
    mesh.kill_edge(&reader.name)
        .await
        .expect("stop the reader's daemon");
    let tree = work.path().join("after-revocation");
    netsim::datagen::generate_tree(&tree, 1024 * 1024, 7).expect("tree");
    let published = origin_ok(
        &mesh,
        &[
            "publish",
            tree.to_str().expect("utf-8 path"),
            "--name",
            "after-revocation",
            "--version",
            "1",
            "--encrypt",
            "--no-progress",
        ],
    )
    .await;
    let bundle = published
        .lines()
        .find_map(|l| l.strip_prefix("bundle "))
        .and_then(|rest| rest.split_whitespace().next())
        .expect("a bundle id")
        .to_owned();
    let out = work.path().join("revoked-unpack");
    let run = mesh
        .fetch_to(&reader, &bundle, &out)
        .await
        .expect("edge-agent fetch");
    assert!(!run.ok, "a revoked node unpacked a later bundle");
    assert!(
        run.stderr.contains("key generation 3"),
        "the error names the generation:\n{}",
        run.stderr
    );
    assert!(!out.exists(), "the revoked node wrote {}", out.display());
    assert!(ring(&reader).is_empty(), "the revoked node got a key");

    // Every change is in the audit log, and no key is.
    let audit = origin_ok(&mesh, &["audit", "--limit", "50", "--json"]).await;
    for action in ["keys.create", "keys.rotate", "keys.retire", "node.revoke"] {
        assert!(audit.contains(action), "{action} missing from {audit}");
    }
    for (_, key) in [(1, &key_1), (2, &key_2)] {
        assert!(!audit.contains(&hex(key.expose_secret())));
    }
}
