//! Retention on a real store: bundles fetched over a real mesh connection on loopback (the same
//! `fetch_manifest`/`fetch_blob` a node uses) into a small store, with the keep-set moving
//! forward; the garbage collector never frees a chunk a kept bundle shares; a node the origin
//! does not answer unpins nothing.

mod bundle_common;

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bundle_common::*;
use proto::bundles::{has_all_chunks, pin_bundle, StoreSink};
use proto::chunking::ChunkerParams;
use proto::manifest::{BundleId, Manifest};
use proto::metrics::Metrics;
use proto::net::{
    client_endpoint, connect, server_endpoint, write_frame, CertAuthority, PeerIdentity, Role, Site,
};
use proto::pack::{pack_path, unpack};
use proto::retention::Retention;
use proto::store::{BlobStatus, Store, StoreOptions};
use proto::transfer::fetch::{fetch_blob, fetch_manifest, keep_set};
use proto::transfer::serve::{serve_blob, spans_to_ranges, ServeOptions};
use proto::transfer::server::{self, RequestHandler};
use proto::transfer::PeerCounters;
use proto::wire::{ErrorCode, KeepSet, Request, Response};
use proto::BlobHash;
use quinn::{RecvStream, SendStream};

const MIB: u64 = 1024 * 1024;

/// Bound on every network step, so a bug fails the test instead of hanging it.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(STEP_TIMEOUT, fut)
        .await
        .unwrap_or_else(|_| panic!("{what} took longer than {STEP_TIMEOUT:?}"))
}

/// An origin on loopback: manifests and blobs from its store, and the keep-set the test sets
/// (`None`: it refuses, as an origin that cannot say).
struct TestOrigin {
    store: Store,
    keep: Mutex<Option<Vec<BundleId>>>,
}

impl RequestHandler for TestOrigin {
    async fn handle(
        self: Arc<Self>,
        _peer: PeerIdentity,
        request: Request,
        mut send: SendStream,
        _recv: RecvStream,
    ) {
        let response = match request {
            Request::GetManifest { id } => match self.store.get_manifest(&id) {
                Ok(Some(signed)) => Response::Manifest(signed),
                _ => Response::Error {
                    code: ErrorCode::NotFound,
                    message: format!("no bundle {id}"),
                },
            },
            Request::GetBlob { hash, groups, .. } => {
                let Ok(ranges) = spans_to_ranges(&groups) else {
                    return;
                };
                let counters = PeerCounters::detached();
                let options = ServeOptions {
                    progress: None,
                    corrupt: false,
                    counters: &counters,
                    pace: None,
                };
                let _ = serve_blob(&self.store, &mut send, hash, ranges, options).await;
                return;
            }
            Request::KeepSet => {
                let keep = self.keep.lock().unwrap().clone();
                match keep {
                    Some(bundles) => Response::KeepSet(KeepSet { bundles }),
                    None => Response::Error {
                        code: ErrorCode::Internal,
                        message: "the origin cannot say".into(),
                    },
                }
            }
            _ => Response::Error {
                code: ErrorCode::BadRequest,
                message: "not here".into(),
            },
        };
        if write_frame(&mut send, &response).await.is_ok() {
            let _ = send.finish();
        }
    }
}

/// One published version: its source tree, id and manifest.
struct Version {
    tree: tempfile::TempDir,
    id: BundleId,
    manifest: Manifest,
}

/// Packs `count` versions of one bundle into `store`, each a small edit of the one before.
fn publish_versions(store: &Store, count: usize) -> Vec<Version> {
    let mut files = mixed_tree(18, 20, 1_500_000, 2);
    let mut out = Vec::new();
    for i in 0..count {
        if i > 0 {
            files = next_version(&files, 1000 + i as u64, 0.15, 2);
        }
        let tree = tempfile::tempdir().unwrap();
        write_files(tree.path(), &files);
        let mut options = options(ChunkerParams::with_avg(16 * 1024));
        options.version = format!("1.{i}");
        let packed = pack_path(
            tree.path(),
            &options,
            &test_key(),
            &mut StoreSink(store),
            &mut |_| {},
        )
        .unwrap();
        store.put_manifest(&packed.signed).unwrap();
        pin_bundle(store, &packed.id, &packed.manifest).unwrap();
        out.push(Version {
            tree,
            id: packed.id,
            manifest: packed.manifest,
        });
    }
    out
}

/// Unique chunks of `manifest`, with their sizes.
fn chunks(manifest: &Manifest) -> HashMap<BlobHash, u64> {
    manifest
        .chunks
        .iter()
        .map(|c| (c.hash, c.stored_bytes))
        .collect()
}

/// Bytes of the store's blob files (data and outboards), as on disk.
fn blob_file_bytes(store_dir: &Path) -> u64 {
    let mut total = 0;
    for dir in std::fs::read_dir(store_dir.join("blobs")).unwrap() {
        let dir = dir.unwrap().path();
        if !dir.is_dir() {
            continue;
        }
        for file in std::fs::read_dir(&dir).unwrap() {
            total += file.unwrap().metadata().unwrap().len();
        }
    }
    total
}

/// Fetches bundle `id` as a node does: the manifest, a hold while its chunks arrive, every
/// chunk verified, then the bundle pinned and its manifest stored, and a collection.
async fn fetch_bundle(
    conn: &quinn::Connection,
    retention: &Retention,
    id: BundleId,
    trusted: &[ed25519_dalek::VerifyingKey],
) -> Manifest {
    let store = retention.store().clone();
    let (signed, manifest) = within("manifest", fetch_manifest(conn, id, trusted))
        .await
        .unwrap();
    let hold = retention.hold(id, &manifest).unwrap();
    let counters = PeerCounters::detached();
    for (hash, size) in chunks(&manifest) {
        within(
            "blob",
            fetch_blob(conn, &store, hash, size, &counters, None),
        )
        .await
        .unwrap();
    }
    pin_bundle(&store, &id, &manifest).unwrap();
    store.put_manifest(&signed).unwrap();
    drop(hold);
    retention.fetched(id);
    retention.collect().unwrap();
    manifest
}

/// Unpacks `manifest` from `store` and compares the tree with `source`.
fn assert_unpacks_to(store: &Store, manifest: &Manifest, source: &Path, what: &str) {
    let out = tempfile::tempdir().unwrap();
    let root = out.path().join("root");
    unpack(manifest, store, &root, &mut |_| {})
        .unwrap_or_else(|e| panic!("{what}: cannot unpack: {e}"));
    assert!(
        snapshot(source) == snapshot(&root),
        "{what}: unpacked tree differs from the source"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_versions_stay_within_a_small_store_and_kept_bundles_stay_whole() {
    let origin_dir = tempfile::tempdir().unwrap();
    let origin_store = Store::open(origin_dir.path(), StoreOptions::default()).unwrap();
    let versions = publish_versions(&origin_store, 20);
    let trusted = [test_key().verifying_key()];

    let ca = CertAuthority::generate().unwrap();
    let site = Site::new("a").unwrap();
    let origin_identity = ca
        .node_identity(Role::Origin, &site, trusted[0], "127.0.0.1:1".into())
        .unwrap();
    let edge_identity = ca
        .node_identity(Role::Edge, &site, trusted[0], "127.0.0.1:1".into())
        .unwrap();
    let server = server_endpoint("127.0.0.1:0".parse().unwrap(), &origin_identity).unwrap();
    let addr: SocketAddr = server.local_addr().unwrap();
    let origin = Arc::new(TestOrigin {
        store: origin_store.clone(),
        keep: Mutex::new(None),
    });
    let accept = tokio::spawn(server::run(server.clone(), origin.clone(), Metrics::new()));
    let client = client_endpoint(&edge_identity).unwrap();
    let conn = within("connect", connect(&client, addr)).await.unwrap();

    let limit = 2 * MIB;
    let node_dir = tempfile::tempdir().unwrap();
    let store = Store::open(
        node_dir.path(),
        StoreOptions {
            cache_limit_bytes: limit,
            ..StoreOptions::default()
        },
    )
    .unwrap();
    let retention = Retention::new(store.clone(), trusted.to_vec());
    let published_bytes: u64 = versions
        .iter()
        .flat_map(|v| chunks(&v.manifest))
        .collect::<HashMap<_, _>>()
        .values()
        .sum();
    assert!(
        published_bytes > 2 * limit,
        "the test needs more published than the store holds ({published_bytes} bytes)"
    );

    let mut bundles_evicted = 0usize;
    let mut refetched = 0usize;
    for (i, version) in versions.iter().enumerate() {
        fetch_bundle(&conn, &retention, version.id, &trusted).await;
        // The origin's keep-set moves forward: the current version and the one before (its
        // rescue).
        let kept: Vec<&Version> = versions[i.saturating_sub(1)..=i].iter().collect();
        *origin.keep.lock().unwrap() = Some(kept.iter().map(|v| v.id).collect());
        let ticket = retention.ticket();
        let answer = within("keep-set", keep_set(&conn, &Request::KeepSet))
            .await
            .unwrap();
        let report = retention.set_keep_set(ticket, answer.bundles).unwrap();
        bundles_evicted += report.evicted_bundles.len();

        let kept_bytes: u64 = kept
            .iter()
            .flat_map(|v| chunks(&v.manifest))
            .collect::<HashMap<_, _>>()
            .values()
            .sum();
        let usage = store.usage();
        assert!(
            usage.stored_bytes() <= limit.max(kept_bytes),
            "step {i}: the store holds {} bytes, limit {limit}, kept {kept_bytes}",
            usage.stored_bytes()
        );
        assert_eq!(
            usage.pinned_bytes, kept_bytes,
            "step {i}: pins are not the keep-set"
        );
        // On disk: the blobs plus their outboards (under 1% more) and nothing else.
        let on_disk = blob_file_bytes(node_dir.path());
        assert!(
            on_disk <= limit.max(kept_bytes) * 101 / 100,
            "step {i}: {on_disk} bytes of blob files on disk, limit {limit}, kept {kept_bytes}"
        );
        for v in &kept {
            assert!(
                has_all_chunks(&store, &v.manifest),
                "step {i}: kept bundle {} is not whole",
                v.manifest.version
            );
            for chunk in &v.manifest.chunks {
                store
                    .get_blob(&chunk.hash)
                    .unwrap()
                    .expect("kept chunk readable and verified");
            }
        }
        assert_unpacks_to(
            &store,
            &version.manifest,
            version.tree.path(),
            &format!("step {i}"),
        );

        // Every fourth step, a version evicted long ago is fetched again and comes back whole.
        if i >= 6 && i % 4 == 2 {
            let old = &versions[i - 6];
            assert!(
                !has_all_chunks(&store, &old.manifest),
                "step {i}: version {} should have been evicted",
                old.manifest.version
            );
            let manifest = fetch_bundle(&conn, &retention, old.id, &trusted).await;
            assert_unpacks_to(
                &store,
                &manifest,
                old.tree.path(),
                &format!("step {i}: refetched {}", old.manifest.version),
            );
            refetched += 1;
            // Kept bundles survived the refetch.
            for v in &kept {
                assert!(has_all_chunks(&store, &v.manifest));
            }
        }
    }
    assert!(bundles_evicted > 0, "no bundle was ever evicted");
    assert!(refetched >= 3);

    // The origin stops answering: a restarted node (no keep-set yet) and a running one both
    // keep every pin they have, even with a limit far below what they keep.
    *origin.keep.lock().unwrap() = None;
    let pins_before: Vec<(BlobHash, Vec<String>)> = store
        .list_blobs()
        .iter()
        .map(|b| (b.hash, store.pins(&b.hash)))
        .collect();
    let answer = within("keep-set", keep_set(&conn, &Request::KeepSet)).await;
    let error = answer.expect_err("the origin refuses");
    retention.keep_set_unavailable(&error).unwrap();
    let restarted = Retention::new(store.clone(), trusted.to_vec());
    let answer = within("keep-set", keep_set(&conn, &Request::KeepSet)).await;
    restarted
        .keep_set_unavailable(&answer.expect_err("the origin refuses"))
        .unwrap();
    let pins_after: Vec<(BlobHash, Vec<String>)> = store
        .list_blobs()
        .iter()
        .filter(|b| b.pinned)
        .map(|b| (b.hash, store.pins(&b.hash)))
        .collect();
    let pinned_before: Vec<_> = pins_before
        .into_iter()
        .filter(|(_, tags)| !tags.is_empty())
        .collect();
    assert_eq!(pinned_before, pins_after, "pins changed without the origin");
    let last = &versions[versions.len() - 1];
    assert!(has_all_chunks(&store, &last.manifest));

    conn.close(0u32.into(), b"done");
    client.close(0u32.into(), b"done");
    server.close(0u32.into(), b"done");
    accept.abort();
}

#[test]
fn gc_never_removes_a_chunk_a_kept_bundle_shares() {
    let trees = tempfile::tempdir().unwrap();
    let v1_files = mixed_tree(5, 10, 1_000_000, 1);
    let v2_files = next_version(&v1_files, 6, 0.3, 3);
    let (v1_root, v2_root) = (trees.path().join("v1"), trees.path().join("v2"));
    write_files(&v1_root, &v1_files);
    write_files(&v2_root, &v2_files);

    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    let mut packed = Vec::new();
    for (root, version) in [(&v1_root, "1"), (&v2_root, "2")] {
        let mut options = options(ChunkerParams::with_avg(16 * 1024));
        options.version = version.into();
        let bundle = pack_path(
            root,
            &options,
            &test_key(),
            &mut StoreSink(&store),
            &mut |_| {},
        )
        .unwrap();
        store.put_manifest(&bundle.signed).unwrap();
        pin_bundle(&store, &bundle.id, &bundle.manifest).unwrap();
        packed.push(bundle);
    }
    drop(store);
    // Reopened with a limit far below one bundle: everything unpinned must go, everything kept
    // must stay.
    let store = Store::open(
        dir.path(),
        StoreOptions {
            cache_limit_bytes: 64 * 1024,
            ..StoreOptions::default()
        },
    )
    .unwrap();
    let retention = Retention::new(store.clone(), vec![test_key().verifying_key()]);
    let (v1, v2) = (&packed[0], &packed[1]);
    let v1_chunks: BTreeSet<BlobHash> = v1.manifest.chunks.iter().map(|c| c.hash).collect();
    let v2_chunks: BTreeSet<BlobHash> = v2.manifest.chunks.iter().map(|c| c.hash).collect();
    let shared: Vec<BlobHash> = v1_chunks.intersection(&v2_chunks).copied().collect();
    let only_v1: Vec<BlobHash> = v1_chunks.difference(&v2_chunks).copied().collect();
    assert!(
        !shared.is_empty() && !only_v1.is_empty(),
        "versions must share some chunks"
    );

    // A blob being written, named by no bundle: never collected while its writer is open.
    let partial_data = vec![9u8; 100_000];
    let partial_hash = BlobHash::of(&partial_data);
    let writer = store
        .begin_or_resume(partial_hash, partial_data.len() as u64)
        .unwrap();

    let report = retention.set_keep_set(retention.ticket(), [v2.id]).unwrap();
    assert_eq!(report.kept, vec![v2.id]);
    assert_eq!(report.evicted_bundles, vec![v1.id]);
    for hash in &shared {
        assert!(
            store.has_blob(hash),
            "a chunk shared with the kept bundle was collected"
        );
        assert_eq!(store.pins(hash), vec![proto::bundles::pin_tag(&v2.id)]);
    }
    for hash in &only_v1 {
        assert!(
            !store.has_blob(hash),
            "an unkept chunk stayed in a full store"
        );
    }
    assert!(has_all_chunks(&store, &v2.manifest));
    assert!(store.get_manifest(&v1.id).unwrap().is_none());
    // The kept set exceeds the limit: kept anyway.
    assert!(report.pinned_bytes > report.limit_bytes);
    assert!(matches!(
        store.blob_status(&partial_hash).unwrap(),
        BlobStatus::Partial { .. }
    ));
    drop(writer);

    let out = trees.path().join("out");
    unpack(&v2.manifest, &store, &out, &mut |_| {}).unwrap();
    assert!(snapshot(&v2_root) == snapshot(&out));
}

#[test]
fn without_the_origins_word_nothing_is_unpinned() {
    let trees = tempfile::tempdir().unwrap();
    let files = mixed_tree(8, 6, 500_000, 1);
    let root = trees.path().join("v1");
    write_files(&root, &files);
    let dir = tempfile::tempdir().unwrap();
    let id = {
        let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
        let bundle = pack_path(
            &root,
            &options(ChunkerParams::with_avg(16 * 1024)),
            &test_key(),
            &mut StoreSink(&store),
            &mut |_| {},
        )
        .unwrap();
        store.put_manifest(&bundle.signed).unwrap();
        pin_bundle(&store, &bundle.id, &bundle.manifest).unwrap();
        bundle.id
    };
    // Restarted with a tiny limit, never hearing from the origin, collecting after a fetch.
    let store = Store::open(
        dir.path(),
        StoreOptions {
            cache_limit_bytes: 1,
            ..StoreOptions::default()
        },
    )
    .unwrap();
    let retention = Retention::new(store.clone(), vec![test_key().verifying_key()]);
    let report = retention.collect().unwrap();
    assert_eq!(report.unpinned, 0);
    assert!(report.evicted_bundles.is_empty());
    let manifest = store
        .get_manifest(&id)
        .unwrap()
        .expect("manifest kept")
        .verify_as(id, &[test_key().verifying_key()])
        .unwrap();
    assert!(has_all_chunks(&store, &manifest));
    let out = trees.path().join("out");
    unpack(&manifest, &store, &out, &mut |_| {}).unwrap();
    assert!(snapshot(&root) == snapshot(&out));
}
