//! Encrypted bundles end to end with the real binaries on loopback: stagers and edges carry
//! only ciphertext, edges with the key restore the tree byte for byte, an edge without the key
//! generation fails clearly and writes nothing, and a 1% change costs the site about the same
//! WAN bytes encrypted as clear. The keys travel as in production: the origin made generation
//! 1 at its first start, `[encryption] read_classes` says which classes may read, and an edge
//! that meets a generation it lacks asks the origin once before it unpacks.

use std::path::{Path, PathBuf};
use std::time::Duration;

use netsim::datagen;
use netsim::procs::Binaries;
use netsim::testbed::{EdgeNode, Testbed};

const MIB: u64 = 1024 * 1024;
const PREHEAT_TIMEOUT: Duration = Duration::from_secs(120);

const MARKERS: [&str; 3] = [
    "PLANTED-MARKER-root-password-hunter2",
    "PLANTED-MARKER-BEGIN OPENSSH PRIVATE KEY",
    "PLANTED-MARKER-wifi-psk-correct-horse",
];

fn bins() -> Binaries {
    Binaries::beside_current_exe().expect("build the binaries: cargo build --release --bins")
}

/// Lets edges of class `secure` read encrypted bundles, and puts `readers` in that class and
/// every other edge of `mesh` in class `web`.
async fn let_read(mesh: &Testbed, readers: &[&str]) {
    mesh.set_read_classes(&["secure"]).await.expect("policy");
    for edge in &mesh.edges {
        let class = if readers.contains(&edge.name.as_str()) {
            "secure"
        } else {
            "web"
        };
        mesh.set_class(edge, class).await.expect("class set");
    }
}

/// Every regular file under `dir`, recursively.
fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        match entry.file_type() {
            Ok(t) if t.is_dir() => files_under(&path, out),
            Ok(t) if t.is_file() => out.push(path),
            _ => {}
        }
    }
}

/// The files under `dir` that hold any marker, with the marker; and how many bytes were searched.
fn markers_in(dir: &Path) -> (Vec<(PathBuf, &'static str)>, u64) {
    let mut files = Vec::new();
    files_under(dir, &mut files);
    let mut found = Vec::new();
    let mut searched = 0u64;
    for file in files {
        let Ok(bytes) = std::fs::read(&file) else {
            continue;
        };
        searched += bytes.len() as u64;
        for marker in MARKERS.iter().chain(["PLANTED-MARKER"].iter()) {
            if bytes.windows(marker.len()).any(|w| w == marker.as_bytes()) {
                found.push((file.clone(), *marker));
            }
        }
    }
    (found, searched)
}

async fn publish(mesh: &Testbed, tree: &Path, version: &str, encrypt: bool) -> String {
    let extra: &[&str] = if encrypt { &["--encrypt"] } else { &[] };
    mesh.publish_with(tree, "secret-os", version, "os-image", extra)
        .await
        .expect("origin publish")
}

/// `edge-agent fetch BUNDLE --to OUT` on `edge` (the bundle is already in its store).
async fn unpack_on(
    mesh: &Testbed,
    edge: &EdgeNode,
    bundle: &str,
    out: &Path,
) -> netsim::procs::CliRun {
    mesh.fetch_to(edge, bundle, out)
        .await
        .expect("edge-agent fetch")
}

fn same_tree(a: &Path, b: &Path) {
    let status = std::process::Command::new("diff")
        .arg("-r")
        .arg("--no-dereference")
        .arg(a)
        .arg(b)
        .status()
        .expect("diff");
    assert!(
        status.success(),
        "{} and {} differ",
        a.display(),
        b.display()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stagers_and_peers_carry_only_ciphertext_and_edges_with_the_key_restore_the_tree() {
    let work = tempfile::tempdir().expect("tempdir");
    let tree = work.path().join("tree");
    let files = datagen::generate_tree(&tree, 8 * MIB, 41).expect("tree");
    std::fs::create_dir_all(tree.join("etc/ssh")).expect("mkdir");
    for (i, marker) in MARKERS.iter().enumerate() {
        let text = format!("{}{marker}\n", "# configuration line\n".repeat(30));
        std::fs::write(tree.join(format!("etc/ssh/secret{i}.conf")), text).expect("write");
    }
    std::fs::write(tree.join("PLANTED-MARKER-file-name"), b"x").expect("write");
    let mut mesh = Testbed::start(bins(), work.path(), 2, 2, &[])
        .await
        .expect("mesh");

    // Every edge but the first of site b may read. No edge holds a key yet: each asks the
    // origin when it first meets generation 1.
    let edges = mesh.edges.clone();
    let keyless = edges
        .iter()
        .find(|e| e.site == "site-b")
        .expect("an edge of site b")
        .name
        .clone();
    let readers: Vec<&str> = edges
        .iter()
        .map(|e| e.name.as_str())
        .filter(|name| *name != keyless)
        .collect();
    let_read(&mesh, &readers).await;

    let v1 = publish(&mesh, &tree, "1", true).await;
    let fetched = mesh.fetch_all(&edges, &v1).await.expect("fetch");
    for f in &fetched {
        assert!(
            f.ok,
            "{} failed: {}",
            f.edge.name,
            std::fs::read_to_string(&f.log).unwrap_or_default()
        );
    }
    for site in ["site-a", "site-b"] {
        mesh.wait_preheated(site, PREHEAT_TIMEOUT)
            .await
            .expect("preheated");
    }

    // Unpacking: byte-identical with the key; without it, a clear error and nothing written.
    for edge in &edges {
        let out = work.path().join("unpacked").join(&edge.name);
        let run = unpack_on(&mesh, edge, &v1, &out).await;
        if edge.name == keyless {
            assert!(!run.ok, "{} unpacked without the key", edge.name);
            assert!(run.stderr.contains("key generation 1"), "{}", run.stderr);
            assert!(!out.exists(), "{} wrote {}", edge.name, out.display());
        } else {
            assert!(run.ok, "{}: {}", edge.name, run.stderr);
            same_tree(&tree, &out);
        }
    }

    // No marker in any stager's directory (store, index, logs of its state) or any edge's
    // store (the blobs its peers read).
    let mut searched = 0;
    for stager in &mesh.stagers {
        let (found, bytes) = markers_in(&stager.dir);
        assert!(
            found.is_empty(),
            "stager {} holds plaintext: {found:?}",
            stager.name
        );
        searched += bytes;
    }
    for edge in &edges {
        let (found, bytes) = markers_in(&edge.dir.join("store"));
        assert!(
            found.is_empty(),
            "edge {} store holds plaintext: {found:?}",
            edge.name
        );
        searched += bytes;
    }
    println!("searched {searched} bytes of stager and edge stores: no marker");
    assert!(
        searched > 8 * MIB,
        "the stores hold the bundle ({searched} bytes searched)"
    );

    // Version 2 with a 1% change, clear then encrypted: the WAN bytes into site a.
    let _clear_v1 = publish(&mesh, &tree, "1-clear", false).await;
    mesh.wait_preheated("site-a", PREHEAT_TIMEOUT)
        .await
        .expect("preheated");
    datagen::mutate_tree(&tree, &files, 0.01, 2, 42).expect("mutate");
    let before = mesh.wan_bytes("site-a").await.expect("wan");
    let _clear_v2 = publish(&mesh, &tree, "2-clear", false).await;
    mesh.wait_preheated("site-a", PREHEAT_TIMEOUT)
        .await
        .expect("preheated");
    let after_clear = mesh.wan_bytes("site-a").await.expect("wan");
    let _v2 = publish(&mesh, &tree, "2", true).await;
    mesh.wait_preheated("site-a", PREHEAT_TIMEOUT)
        .await
        .expect("preheated");
    let after_encrypted = mesh.wan_bytes("site-a").await.expect("wan");
    let clear = after_clear - before;
    let encrypted = after_encrypted - after_clear;
    println!("v2 (1% change) into site a: clear {clear} WAN bytes, encrypted {encrypted}");
    assert!(clear > 0 && encrypted > 0);
    let ratio = encrypted as f64 / clear as f64;
    assert!(
        (0.9..=1.1).contains(&ratio),
        "encrypted v2 cost {encrypted} WAN bytes, clear {clear} ({ratio:.3}x)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_ciphertext_is_refused_by_hash_and_the_edge_unpacks_intact_bytes() {
    bins().require_test_hooks().expect("test switches");
    let work = tempfile::tempdir().expect("tempdir");
    let tree = work.path().join("tree");
    datagen::generate_tree(&tree, 4 * MIB, 43).expect("tree");
    // The stager alters every part it serves (after its own store verified the ciphertext it
    // pulled from the origin by hash).
    let mut mesh = Testbed::start(
        bins(),
        work.path(),
        1,
        1,
        &["--test-corrupt-serving".to_owned()],
    )
    .await
    .expect("mesh");
    let edge = mesh.edges[0].clone();
    let_read(&mesh, &[edge.name.as_str()]).await;
    let id = publish(&mesh, &tree, "1", true).await;
    mesh.wait_preheated("site-a", PREHEAT_TIMEOUT)
        .await
        .expect("preheat");
    let out = work.path().join("unpacked");
    let run = unpack_on(&mesh, &edge, &id, &out).await;
    let log = format!("{}{}", run.stdout, run.stderr);
    assert!(run.ok, "edge failed:\n{log}");
    assert!(
        log.contains("did not verify"),
        "the tampered group was not refused:\n{log}"
    );
    assert!(
        log.contains("banned"),
        "the lying stager was not banned:\n{log}"
    );
    same_tree(&tree, &out);
    mesh.shutdown().await;
}

/// The stager's count of responses from the origin that did not verify.
async fn origin_verify_failures(mesh: &Testbed, stager: &str) -> f64 {
    let text = mesh.stager_metrics(stager).await.unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with("stagecoach_verify_failures_total{") && l.contains("\"origin\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stager_refuses_ciphertext_tampered_upstream_and_edges_never_see_it() {
    bins().require_test_hooks().expect("test switches");
    let work = tempfile::tempdir().expect("tempdir");
    let tree = work.path().join("tree");
    datagen::generate_tree(&tree, 4 * MIB, 44).expect("tree");
    let mut mesh = Testbed::start(bins(), work.path(), 1, 1, &[])
        .await
        .expect("mesh");
    let edge = mesh.edges[0].clone();
    let stager = mesh.stagers[0].name.clone();
    let_read(&mesh, &[edge.name.as_str()]).await;

    // Published while the stager is down; then the origin comes back tampering with every
    // part it serves (after its own store verified it), as a lying upstream would.
    mesh.kill_stager(&stager).await.expect("stop the stager");
    let id = publish(&mesh, &tree, "1", true).await;
    mesh.kill_origin().await.expect("stop the origin");
    mesh.restart_origin_with(&["--test-corrupt-serving".to_owned()])
        .await
        .expect("lying origin");
    mesh.restart_stager(&stager).await.expect("stager back");
    let caught = stagecoach_testing::wait_until_async(
        PREHEAT_TIMEOUT,
        Duration::from_millis(200),
        async || origin_verify_failures(&mesh, &stager).await > 0.0,
    )
    .await;
    assert!(
        caught.is_ok(),
        "the stager never counted a tampered part from the origin"
    );
    let stager_log =
        std::fs::read_to_string(work.path().join("logs").join(format!("{stager}.log")))
            .unwrap_or_default();
    assert!(
        stager_log.contains("did not verify"),
        "the stager does not say why it refused:\n{stager_log}"
    );

    // With an honest origin again, the edge completes through the stager, and nothing it was
    // served failed verification: the tampered bytes stopped at the stager.
    mesh.kill_origin().await.expect("stop the lying origin");
    mesh.restart_origin().await.expect("honest origin");
    let out = work.path().join("unpacked");
    let run = unpack_on(&mesh, &edge, &id, &out).await;
    let log = format!("{}{}", run.stdout, run.stderr);
    assert!(run.ok, "edge failed:\n{log}");
    assert!(
        !log.contains("did not verify"),
        "the edge was served tampered data:\n{log}"
    );
    same_tree(&tree, &out);
    mesh.shutdown().await;
}
