//! Cache bound and LRU eviction: the unpinned blobs never exceed the limit, the least recently
//! used go first, pinned blobs and open downloads are never evicted.

use std::path::Path;

use proto::store::{BlobStatus, Store, StoreOptions};
use proto::verify::{compute_outboard, encode_ranges, GroupRanges};
use proto::BlobHash;

const MIB: usize = 1024 * 1024;

fn blob(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(2).wrapping_add(1);
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let take = (len - out.len()).min(8);
        out.extend_from_slice(&state.to_le_bytes()[..take]);
    }
    out
}

fn open(dir: &Path, limit_bytes: u64) -> Store {
    Store::open(
        dir,
        StoreOptions {
            cache_limit_bytes: limit_bytes,
            ..StoreOptions::default()
        },
    )
    .unwrap()
}

fn files_exist(dir: &Path, hash: &BlobHash) -> bool {
    let hex = hash.to_string();
    let sub = dir.join("blobs").join(&hex[..2]);
    sub.join(format!("{hex}.data")).exists() || sub.join(format!("{hex}.obao")).exists()
}

#[test]
fn least_recently_used_blobs_go_first_and_the_bound_holds() {
    let dir = tempfile::tempdir().unwrap();
    let limit = 3 * MIB as u64;
    let store = open(dir.path(), limit);
    let blobs: Vec<Vec<u8>> = (0..6).map(|i| blob(MIB, i + 1)).collect();
    let mut hashes = Vec::new();
    for data in &blobs[..3] {
        hashes.push(store.put_blob(data).unwrap());
        assert!(store.usage().cached_bytes <= limit);
    }
    // Use the oldest one: now blob 1 is the least recently used.
    assert!(store.get_blob(&hashes[0]).unwrap().is_some());
    hashes.push(store.put_blob(&blobs[3]).unwrap());
    assert!(store.usage().cached_bytes <= limit);
    assert!(store.has_blob(&hashes[0]), "recently read blob was evicted");
    assert!(
        !store.has_blob(&hashes[1]),
        "least recently used blob was kept"
    );
    assert!(
        !files_exist(dir.path(), &hashes[1]),
        "evicted files stay on disk"
    );
    assert_eq!(store.blob_status(&hashes[1]).unwrap(), BlobStatus::Missing);

    // Serving a blob counts as use too.
    let mut out = Vec::new();
    store
        .encode_ranges(&hashes[2], &GroupRanges::group(0), &mut out)
        .unwrap();
    hashes.push(store.put_blob(&blobs[4]).unwrap());
    assert!(store.has_blob(&hashes[2]));
    assert!(!store.has_blob(&hashes[0]));
    assert!(store.usage().cached_bytes <= limit);
    assert_eq!(store.usage().blobs, 3);

    // The order survives a restart.
    drop(store);
    let store = open(dir.path(), limit);
    hashes.push(store.put_blob(&blobs[5]).unwrap());
    assert!(!store.has_blob(&hashes[3]), "restart forgot the LRU order");
    assert!(store.has_blob(&hashes[2]));
    assert!(store.has_blob(&hashes[4]));
}

#[test]
fn pinned_blobs_are_never_evicted() {
    let dir = tempfile::tempdir().unwrap();
    let limit = 2 * MIB as u64;
    let store = open(dir.path(), limit);
    let pinned = blob(MIB, 100);
    let pinned_hash = store.put_blob(&pinned).unwrap();
    store.pin(&pinned_hash, "installed").unwrap();
    // A blob pinned before it arrives is protected too.
    let early = blob(MIB, 101);
    let early_hash = BlobHash::of(&early);
    store.pin(&early_hash, "desired").unwrap();
    store.put_blob(&early).unwrap();

    for i in 0..8 {
        store.put_blob(&blob(MIB, 200 + i)).unwrap();
        let usage = store.usage();
        assert!(usage.cached_bytes <= limit, "{usage:?}");
        assert_eq!(usage.pinned_bytes, 2 * MIB as u64);
        assert!(store.has_blob(&pinned_hash));
        assert!(store.has_blob(&early_hash));
    }
    // Unpinned, the old blob is the least recently used and goes at once.
    store.unpin(&pinned_hash, "installed").unwrap();
    assert!(!store.has_blob(&pinned_hash));
    assert!(store.usage().cached_bytes <= limit);
    assert!(store.has_blob(&early_hash));
}

#[test]
fn an_open_download_is_not_evicted_and_a_smaller_limit_applies_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 2 * MIB as u64);
    let downloading = blob(MIB, 300);
    let hash = BlobHash::of(&downloading);
    let mut writer = store.begin_or_resume(hash, MIB as u64).unwrap();
    let first = GroupRanges::groups(0..8);
    let outboard = compute_outboard(&downloading);
    let mut stream = Vec::new();
    encode_ranges(&downloading, &outboard.data, hash, &first, &mut stream).unwrap();
    writer.write_stream(&stream[..], first).unwrap();
    for i in 0..4 {
        store.put_blob(&blob(MIB, 400 + i)).unwrap();
    }
    assert!(matches!(
        store.blob_status(&hash).unwrap(),
        BlobStatus::Partial { .. }
    ));
    writer.commit().unwrap();
    drop(writer);
    drop(store);

    // Reopened with room for one blob: everything else goes; the download's commit was its
    // latest use, so it is what stays.
    let store = open(dir.path(), MIB as u64);
    let usage = store.usage();
    assert!(usage.cached_bytes <= MIB as u64, "{usage:?}");
    assert_eq!(usage.blobs, 1);
    assert!(matches!(
        store.blob_status(&hash).unwrap(),
        BlobStatus::Partial { .. }
    ));
}

#[test]
fn one_blob_larger_than_the_cache_is_kept_until_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), MIB as u64 / 2);
    let big = store.put_blob(&blob(MIB, 500)).unwrap();
    assert!(
        store.has_blob(&big),
        "the blob just written must stay readable"
    );
    let next = store.put_blob(&blob(MIB, 501)).unwrap();
    assert!(store.has_blob(&next));
    assert!(!store.has_blob(&big));
}
