//! The blob store as its users see it: storing and reading blobs, resuming downloads, serving
//! partial blobs, refusing bad input, manifests and pins.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use proto::manifest::{generate_signing_key, ChunkRef, PayloadLayout, MANIFEST_FORMAT};
use proto::store::{BlobStatus, Store, StoreError, StoreOptions};
use proto::verify::{
    self, compute_outboard, encode_ranges, DecodeItem, Decoder, GroupRanges, VerifyError,
    GROUP_BYTES,
};
use proto::{BlobHash, BundleKind, Manifest};

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

/// The response stream a source holding `data` would send for `ranges`.
fn stream(data: &[u8], ranges: &GroupRanges) -> Vec<u8> {
    let outboard = compute_outboard(data);
    let mut out = Vec::new();
    encode_ranges(data, &outboard.data, outboard.hash, ranges, &mut out).unwrap();
    out
}

fn open(dir: &Path) -> Store {
    Store::open(dir, StoreOptions::default()).unwrap()
}

fn data_path(dir: &Path, hash: &BlobHash) -> std::path::PathBuf {
    let hex = hash.to_string();
    dir.join("blobs")
        .join(&hex[..2])
        .join(format!("{hex}.data"))
}

#[test]
fn put_and_get_round_trip_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let blobs = [
        blob(0, 1),
        blob(1, 2),
        blob(16384, 3),
        blob(1024 * 1024 + 5, 4),
    ];
    let mut hashes = Vec::new();
    {
        let store = open(dir.path());
        for data in &blobs {
            let hash = store.put_blob(data).unwrap();
            assert_eq!(hash, BlobHash::of(data));
            assert!(store.has_blob(&hash));
            assert_eq!(
                store.blob_status(&hash).unwrap(),
                BlobStatus::Complete {
                    size: data.len() as u64
                }
            );
            // Storing it again is harmless and returns the same name.
            assert_eq!(store.put_blob(data).unwrap(), hash);
            hashes.push(hash);
        }
    }
    let store = open(dir.path());
    for (data, hash) in blobs.iter().zip(&hashes) {
        assert_eq!(store.get_blob(hash).unwrap().as_deref(), Some(&data[..]));
    }
    let unknown = BlobHash::of(b"never stored");
    assert_eq!(store.get_blob(&unknown).unwrap(), None);
    assert_eq!(store.blob_status(&unknown).unwrap(), BlobStatus::Missing);
    assert_eq!(
        store
            .read_range(&hashes[3], 1000..70_000)
            .unwrap()
            .as_deref(),
        Some(&blobs[3][1000..70_000])
    );
    assert_eq!(store.list_blobs().len(), 4);
}

#[test]
fn a_download_resumes_after_drop_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let data = blob(3 * 1024 * 1024 + 100, 5);
    let hash = BlobHash::of(&data);
    let size = data.len() as u64;
    {
        let store = open(dir.path());
        let mut writer = store.begin_or_resume(hash, size).unwrap();
        assert_eq!(writer.missing().count(size), verify::group_count(size));
        let first = GroupRanges::groups(0..40);
        let groups = writer
            .write_stream(&stream(&data, &first)[..], first)
            .unwrap();
        assert_eq!(groups, 40);
        // Dropped without finish: what arrived is kept.
    }
    let store = open(dir.path());
    match store.blob_status(&hash).unwrap() {
        BlobStatus::Partial { verified, .. } => assert_eq!(verified, GroupRanges::groups(0..40)),
        other => panic!("expected a partial blob, got {other:?}"),
    }
    assert_eq!(
        store.get_blob(&hash).unwrap(),
        None,
        "a partial blob is not readable whole"
    );
    let mut writer = store.begin_or_resume(hash, size).unwrap();
    let missing = writer.missing();
    assert_eq!(missing, GroupRanges::groups(40..verify::group_count(size)));
    writer
        .write_stream(&stream(&data, &missing)[..], missing)
        .unwrap();
    assert!(writer.is_complete());
    writer.finish().unwrap();
    assert_eq!(store.get_blob(&hash).unwrap(), Some(data));
}

#[test]
fn a_partial_blob_serves_exactly_its_verified_groups_even_while_writing() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let data = blob(100 * GROUP_BYTES as usize + 17, 6);
    let hash = BlobHash::of(&data);
    let size = data.len() as u64;
    let have = GroupRanges::groups(0..10).union(&GroupRanges::groups(50..60));
    let mut writer = store.begin_or_resume(hash, size).unwrap();
    writer
        .write_stream(&stream(&data, &have)[..], have.clone())
        .unwrap();

    // Not yet committed, but verified and written: served at once (cut-through).
    let check_served = |store: &Store| {
        let mut out = Vec::new();
        let served = store
            .encode_ranges(&hash, &GroupRanges::all(), &mut out)
            .unwrap();
        assert_eq!(served, have);
        let mut got = Vec::new();
        let size_seen = verify::decode_from_reader(&out[..], hash, served, |item| {
            if let DecodeItem::Group(group) = item {
                got.push(group.index());
                let start = group.offset() as usize;
                assert_eq!(group.data(), &data[start..start + group.data().len()]);
            }
        })
        .unwrap();
        assert_eq!(size_seen, size);
        assert_eq!(got, have.iter_groups(size).collect::<Vec<_>>());
    };
    check_served(&store);
    assert_eq!(
        store
            .servable_ranges(&hash, &GroupRanges::groups(5..55))
            .unwrap(),
        Some((
            size,
            GroupRanges::groups(5..10).union(&GroupRanges::groups(50..55))
        ))
    );
    writer.commit().unwrap();
    drop(writer);
    drop(store);
    let store = open(dir.path());
    check_served(&store);
    assert_eq!(
        store.read_range(&hash, 0..1000).unwrap().as_deref(),
        Some(&data[..1000])
    );
    assert_eq!(
        store.read_range(&hash, 0..(11 * GROUP_BYTES)).unwrap(),
        None
    );
}

#[test]
fn a_corrupt_stream_keeps_what_verified_and_names_the_bad_group() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let data = blob(20 * GROUP_BYTES as usize, 7);
    let hash = BlobHash::of(&data);
    let size = data.len() as u64;
    let mut bad = stream(&data, &GroupRanges::all());
    // Corrupt group 12's bytes: find them in the stream by decoding the clean copy.
    let mut offset_of_group_12 = None;
    let mut decoder = Decoder::new(hash, GroupRanges::all());
    let mut at = 0;
    while let Some(n) = decoder.needed() {
        if let DecodeItem::Group(group) = decoder.push(&bad[at..at + n]).unwrap() {
            if group.index() == 12 {
                offset_of_group_12 = Some(at);
            }
        }
        at += n;
    }
    bad[offset_of_group_12.unwrap() + 100] ^= 0x01;

    let mut writer = store.begin_or_resume(hash, size).unwrap();
    let error = writer
        .write_stream(&bad[..], GroupRanges::all())
        .unwrap_err();
    assert!(
        matches!(
            error,
            StoreError::Verify(VerifyError::GroupMismatch { group: 12, .. })
        ),
        "{error}"
    );
    assert_eq!(writer.verified(), GroupRanges::groups(0..12));
    // The bad group's bytes never reached the disk.
    let mut on_disk = vec![0u8; GROUP_BYTES as usize];
    std::fs::File::open(data_path(dir.path(), &hash))
        .unwrap()
        .read_exact_at(&mut on_disk, 12 * GROUP_BYTES)
        .unwrap();
    assert!(on_disk.iter().all(|b| *b == 0));
    let missing = writer.missing();
    writer
        .write_stream(&stream(&data, &missing)[..], missing)
        .unwrap();
    writer.finish().unwrap();
    assert_eq!(store.get_blob(&hash).unwrap(), Some(data));
}

#[test]
fn a_part_written_whole_keeps_what_verified_and_names_the_bad_group() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    // Not a whole number of groups, so the last run ends short.
    let data = blob(40 * GROUP_BYTES as usize + 777, 17);
    let hash = BlobHash::of(&data);
    let size = data.len() as u64;
    // Two runs of groups, so a part carries separate runs and parents from both subtrees.
    let first = GroupRanges::groups(3..9).union(&GroupRanges::groups(20..41));
    let mut bad = stream(&data, &first);
    let mut decoder = Decoder::new(hash, first.clone());
    let (mut at, mut offset_of_group_25) = (0, None);
    while let Some(n) = decoder.needed() {
        if let DecodeItem::Group(group) = decoder.push(&bad[at..at + n]).unwrap() {
            if group.index() == 25 {
                offset_of_group_25 = Some(at);
            }
        }
        at += n;
    }
    bad[offset_of_group_25.unwrap() + 5] ^= 0x01;

    let mut writer = store.begin_or_resume(hash, size).unwrap();
    let error = writer.write_part(&bad, first.clone()).unwrap_err();
    assert!(
        matches!(
            error,
            StoreError::Verify(VerifyError::GroupMismatch { group: 25, .. })
        ),
        "{error}"
    );
    assert_eq!(
        writer.verified(),
        GroupRanges::groups(3..9).union(&GroupRanges::groups(20..25))
    );
    // The groups written are served with the parents above them.
    let mut served = Vec::new();
    store
        .encode_ranges(&hash, &GroupRanges::groups(20..25), &mut served)
        .unwrap();
    assert_eq!(served, stream(&data, &GroupRanges::groups(20..25)));
    // A stream longer than its ranges is refused.
    let mut long = stream(&data, &GroupRanges::group(0));
    long.push(0);
    assert!(matches!(
        writer.write_part(&long, GroupRanges::group(0)),
        Err(StoreError::Verify(VerifyError::TrailingBytes { extra: 1 }))
    ));
    let missing = writer.missing();
    assert_eq!(
        writer
            .write_part(&stream(&data, &missing), missing.clone())
            .unwrap(),
        missing.count(size)
    );
    writer.finish().unwrap();
    assert_eq!(store.get_blob(&hash).unwrap(), Some(data));
}

#[test]
fn writers_refuse_foreign_items_wrong_sizes_and_a_second_writer() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let data = blob(50_000, 8);
    let other = blob(50_000, 9);
    let hash = BlobHash::of(&data);
    let size = data.len() as u64;

    let mut writer = store.begin_or_resume(hash, size).unwrap();
    assert!(matches!(
        store.begin_or_resume(hash, size),
        Err(StoreError::WriteInProgress { .. })
    ));
    let other_stream = stream(&other, &GroupRanges::all());
    let mut decoder = Decoder::new(BlobHash::of(&other), GroupRanges::all());
    let mut at = 0;
    let mut refused = 0;
    while let Some(n) = decoder.needed() {
        let item = decoder.push(&other_stream[at..at + n]).unwrap();
        at += n;
        if !matches!(item, DecodeItem::Size(_)) {
            let result = writer.accept(item);
            assert!(
                matches!(result, Err(StoreError::ForeignItem { .. })),
                "{result:?}"
            );
            refused += 1;
        }
    }
    assert!(refused > 0);
    assert!(writer.verified().is_empty());
    // A stream claiming another size is refused before any data.
    let mut lying = stream(&data, &GroupRanges::all());
    lying[..8].copy_from_slice(&(size + 1).to_le_bytes());
    assert!(matches!(
        writer.write_stream(&lying[..], GroupRanges::all()),
        Err(StoreError::Verify(VerifyError::SizeMismatch { .. }))
    ));
    writer
        .write_stream(
            &stream(&data, &GroupRanges::group(0))[..],
            GroupRanges::group(0),
        )
        .unwrap();
    drop(writer);
    assert!(matches!(
        store.begin_or_resume(hash, size + 1),
        Err(StoreError::SizeMismatch { .. })
    ));
    let writer = store.begin_or_resume(hash, size).unwrap();
    assert!(matches!(
        writer.finish(),
        Err(StoreError::Incomplete {
            verified: 1,
            total: 4,
            ..
        })
    ));
}

#[test]
fn a_corrupted_file_on_disk_is_detected_not_served() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let data = blob(10 * GROUP_BYTES as usize, 10);
    let hash = store.put_blob(&data).unwrap();
    let file = OpenOptions::new()
        .write(true)
        .open(data_path(dir.path(), &hash))
        .unwrap();
    file.write_all_at(b"rot", 4 * GROUP_BYTES + 9).unwrap();
    assert!(matches!(
        store.get_blob(&hash),
        Err(StoreError::Corrupt { .. })
    ));
    let mut out = Vec::new();
    let error = store
        .encode_ranges(&hash, &GroupRanges::all(), &mut out)
        .unwrap_err();
    assert!(
        matches!(
            error,
            StoreError::Encode {
                source: verify::EncodeError::DataCorrupt { group: 4, .. },
                ..
            }
        ),
        "{error}"
    );
    // Groups before the damage are still servable.
    let mut out = Vec::new();
    store
        .encode_ranges(&hash, &GroupRanges::groups(0..4), &mut out)
        .unwrap();
}

#[test]
fn manifests_are_stored_by_bundle_id() {
    let dir = tempfile::tempdir().unwrap();
    let key = generate_signing_key();
    let chunk = blob(1000, 11);
    let manifest = |version: &str| {
        Manifest {
            format: MANIFEST_FORMAT,
            name: "base".into(),
            version: version.into(),
            kind: BundleKind::BaseOs,
            selectors: Vec::new(),
            dependencies: Vec::new(),
            layout: PayloadLayout::Tree,
            chunks: vec![ChunkRef {
                hash: BlobHash::of(&chunk),
                stored_bytes: 1000,
                raw_bytes: 1000,
            }],
            total_raw_bytes: 1000,
            total_stored_bytes: 1000,
            metadata: BTreeMap::new(),
            publisher: [0; 32],
        }
        .sign(&key)
    };
    let one = manifest("1");
    let two = manifest("2");
    {
        let store = open(dir.path());
        assert_eq!(store.put_manifest(&one).unwrap(), one.id());
        store.put_manifest(&two).unwrap();
    }
    let store = open(dir.path());
    assert_eq!(store.get_manifest(&one.id()).unwrap(), Some(one.clone()));
    let mut listed = store.list_manifests().unwrap();
    listed.sort_by_key(|m| m.id());
    let mut expected = vec![one.clone(), two.clone()];
    expected.sort_by_key(|m| m.id());
    assert_eq!(listed, expected);
    store.delete_manifest(&one.id()).unwrap();
    assert_eq!(store.get_manifest(&one.id()).unwrap(), None);
    assert!(store
        .get_manifest(&two.id())
        .unwrap()
        .unwrap()
        .verify(&[])
        .is_ok());
}

#[test]
fn pins_survive_reopen_and_block_deletion() {
    let dir = tempfile::tempdir().unwrap();
    let data = blob(5000, 12);
    let hash;
    {
        let store = open(dir.path());
        hash = store.put_blob(&data).unwrap();
        store.pin(&hash, "desired:base-1").unwrap();
        store.pin(&hash, "installed:base-0").unwrap();
        assert!(matches!(
            store.pin(&hash, ""),
            Err(StoreError::BadTag { .. })
        ));
    }
    let store = open(dir.path());
    assert_eq!(
        store.pins(&hash),
        vec!["desired:base-1", "installed:base-0"]
    );
    assert!(matches!(
        store.delete_blob(&hash),
        Err(StoreError::Pinned { .. })
    ));
    store.unpin(&hash, "desired:base-1").unwrap();
    assert_eq!(store.unpin_tag("installed:base-0").unwrap(), 1);
    assert!(store.pins(&hash).is_empty());
    assert!(store.delete_blob(&hash).unwrap());
    assert!(!store.has_blob(&hash));
    assert!(!data_path(dir.path(), &hash).exists());
}

#[test]
fn many_threads_share_one_store() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(open(dir.path()));
    let shared = blob(300_000, 13);
    let shared_hash = store.put_blob(&shared).unwrap();
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let store = Arc::clone(&store);
            let shared = shared.clone();
            std::thread::spawn(move || {
                for i in 0..10u64 {
                    let own = blob(20_000 + i as usize, t * 100 + i + 1);
                    let hash = store.put_blob(&own).unwrap();
                    assert_eq!(store.get_blob(&hash).unwrap(), Some(own));
                    assert_eq!(
                        store.get_blob(&shared_hash).unwrap().as_deref(),
                        Some(&shared[..])
                    );
                    let mut out = Vec::new();
                    store
                        .encode_ranges(&shared_hash, &GroupRanges::groups(i..i + 3), &mut out)
                        .unwrap();
                    verify::decode_from_reader(
                        &out[..],
                        shared_hash,
                        GroupRanges::groups(i..i + 3),
                        |_| {},
                    )
                    .unwrap();
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    assert_eq!(store.list_blobs().len(), 81);
}
