//! Unpacking untrusted input: corrupt chunks, zstd bombs, and tar streams that try to write
//! outside the destination.

mod bundle_common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::symlink;
use std::path::Path;

use bundle_common::*;
use proto::chunking::ChunkerParams;
use proto::hash::BlobHash;
use proto::manifest::{BundleKind, ChunkRef, Manifest, PayloadLayout, MANIFEST_FORMAT};
use proto::pack::{unpack, unpack_to_writer, MemChunks, UnpackError, MAX_CHUNK_RAW_BYTES};
use tar::{EntryType, Header};

const SMALL_CHUNKS: ChunkerParams = ChunkerParams {
    min_bytes: 1024,
    avg_bytes: 4096,
    max_bytes: 16384,
};

fn pseudo_random(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// Sum of regular file sizes under `root`.
fn content_bytes(root: &Path) -> u64 {
    snapshot(root)
        .values()
        .map(|e| match e.kind {
            EntryKind::File { len, .. } => len,
            _ => 0,
        })
        .sum()
}

#[test]
fn corrupt_chunk_is_refused_by_name_and_none_of_it_is_written() {
    let src = tempfile::tempdir().unwrap();
    for i in 0..4u32 {
        fs::write(
            src.path().join(format!("file{i}")),
            pseudo_random(200_000, i + 1),
        )
        .unwrap();
    }
    let (packed, mut chunks) = pack_mem(src.path(), &options(SMALL_CHUNKS));
    let manifest = packed.manifest;
    let bad = manifest.chunks.len() / 2;
    let bad_hash = manifest.chunks[bad].hash;
    let mut stored = chunks.get(&bad_hash).unwrap().to_vec();
    stored[10] ^= 0x01;
    chunks.insert(bad_hash, stored);
    let offset_of_bad: u64 = manifest.chunks[..bad].iter().map(|c| c.raw_bytes).sum();

    // Streaming: exactly the chunks before the bad one reach the writer.
    let mut written = Vec::new();
    let err = unpack_to_writer(&manifest, &chunks, &mut written, &mut |_| {}).unwrap_err();
    assert!(
        matches!(err, UnpackError::Corrupt { index, hash, .. } if index == bad && hash == bad_hash),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(message.contains(&bad_hash.to_string()), "{message}");
    assert!(message.contains(&format!("chunk {bad}")), "{message}");
    assert_eq!(written.len() as u64, offset_of_bad);

    // Into a directory: no file holds bytes from the bad chunk or after it.
    let out = tempfile::tempdir().unwrap();
    let err = unpack(&manifest, &chunks, out.path(), &mut |_| {}).unwrap_err();
    assert!(
        matches!(err, UnpackError::Corrupt { index, .. } if index == bad),
        "{err:?}"
    );
    let on_disk = content_bytes(out.path());
    assert!(
        on_disk > 0 && on_disk < offset_of_bad,
        "{on_disk} bytes written, bad chunk at {offset_of_bad}"
    );
}

#[test]
fn a_source_serving_another_valid_chunk_is_caught() {
    let src = tempfile::tempdir().unwrap();
    fs::write(src.path().join("a"), pseudo_random(100_000, 9)).unwrap();
    let (packed, mut chunks) = pack_mem(src.path(), &options(SMALL_CHUNKS));
    let first = packed.manifest.chunks[0].hash;
    let second = packed.manifest.chunks[1].hash;
    let other = chunks.get(&second).unwrap().to_vec();
    chunks.insert(first, other);
    let out = tempfile::tempdir().unwrap();
    let err = unpack(&packed.manifest, &chunks, out.path(), &mut |_| {}).unwrap_err();
    assert!(
        matches!(err, UnpackError::Corrupt { index: 0, .. }),
        "{err:?}"
    );
}

#[test]
fn missing_chunk_error_names_the_chunk() {
    let src = tempfile::tempdir().unwrap();
    fs::write(src.path().join("a"), pseudo_random(100_000, 3)).unwrap();
    let (packed, full) = pack_mem(src.path(), &options(SMALL_CHUNKS));
    let mut partial = MemChunks::new();
    for chunk in &packed.manifest.chunks[..3] {
        partial.insert(chunk.hash, full.get(&chunk.hash).unwrap().to_vec());
    }
    let out = tempfile::tempdir().unwrap();
    let err = unpack(&packed.manifest, &partial, out.path(), &mut |_| {}).unwrap_err();
    let missing = packed.manifest.chunks[3].hash;
    assert!(
        matches!(err, UnpackError::Fetch { index: 3, hash, .. } if hash == missing),
        "{err:?}"
    );
}

/// A manifest whose payload is `payload`, as one chunk compressed with zstd.
fn single_chunk_bundle(payload: &[u8], layout: PayloadLayout) -> (Manifest, MemChunks) {
    let stored = zstd::bulk::compress(payload, 3).unwrap();
    bundle_of(stored, payload.len() as u64, layout)
}

fn bundle_of(stored: Vec<u8>, raw_bytes: u64, layout: PayloadLayout) -> (Manifest, MemChunks) {
    let hash = BlobHash::of(&stored);
    let chunk = ChunkRef {
        hash,
        stored_bytes: stored.len() as u64,
        raw_bytes,
    };
    let mut chunks = MemChunks::new();
    chunks.insert(hash, stored);
    let manifest = Manifest {
        format: MANIFEST_FORMAT,
        name: "crafted".into(),
        version: "1".into(),
        kind: BundleKind::Package,
        selectors: vec![],
        dependencies: vec![],
        layout,
        chunks: vec![chunk],
        total_raw_bytes: chunk.raw_bytes,
        total_stored_bytes: chunk.stored_bytes,
        metadata: BTreeMap::new(),
        publisher: [0; 32],
    };
    (manifest, chunks)
}

#[test]
fn zstd_bomb_is_refused_without_inflating() {
    // 64 MiB of zeros compress to a few KiB; the manifest claims 1 MiB.
    let bomb = zstd::bulk::compress(&vec![0u8; 64 << 20], 19).unwrap();
    assert!(bomb.len() < 64 * 1024);
    let (manifest, chunks) = bundle_of(bomb.clone(), 1 << 20, PayloadLayout::Tree);
    let mut sink = Vec::new();
    let err = unpack_to_writer(&manifest, &chunks, &mut sink, &mut |_| {}).unwrap_err();
    assert!(
        matches!(err, UnpackError::BadCompression { index: 0, .. }),
        "{err:?}"
    );
    assert!(sink.is_empty());

    // Claiming the true size is refused before anything is fetched: it is above any chunk.
    let (manifest, chunks) = bundle_of(bomb, 64 << 20, PayloadLayout::Tree);
    let err = unpack_to_writer(&manifest, &chunks, &mut sink, &mut |_| {}).unwrap_err();
    assert!(
        matches!(err, UnpackError::ChunkTooLarge { limit, .. } if limit == MAX_CHUNK_RAW_BYTES),
        "{err:?}"
    );
}

/// Hand-written tar streams, to say things our packer never would.
struct CraftedTar(Vec<u8>);

impl CraftedTar {
    fn new() -> Self {
        CraftedTar(Vec::new())
    }

    fn entry(mut self, path: &[u8], entry_type: EntryType, data: &[u8], link: &[u8]) -> Self {
        let mut header = Header::new_gnu();
        header.as_old_mut().name[..path.len()].copy_from_slice(path);
        header.as_old_mut().linkname[..link.len()].copy_from_slice(link);
        header.set_entry_type(entry_type);
        header.set_mode(0o644);
        header.set_uid(0);
        header.set_gid(0);
        header.set_size(data.len() as u64);
        header.set_mtime(1);
        header.set_cksum();
        self.0.extend_from_slice(header.as_bytes());
        self.0.extend_from_slice(data);
        let pad = (512 - data.len() % 512) % 512;
        self.0.extend(std::iter::repeat_n(0u8, pad));
        self
    }

    fn file(self, path: &[u8], data: &[u8]) -> Self {
        self.entry(path, EntryType::Regular, data, b"")
    }

    fn finish(mut self) -> Vec<u8> {
        self.0.extend_from_slice(&[0u8; 1024]);
        self.0
    }
}

/// Unpacks `payload` into `<tmp>/dest` and checks it failed and that nothing named `evil`
/// appeared anywhere in `<tmp>`.
fn assert_refused(payload: Vec<u8>, tmp: &Path) -> UnpackError {
    let (manifest, chunks) = single_chunk_bundle(&payload, PayloadLayout::Tree);
    let dest = tmp.join("dest");
    let err = unpack(&manifest, &chunks, &dest, &mut |_| {}).expect_err("must refuse");
    for (rel, _) in snapshot(tmp) {
        assert!(
            !String::from_utf8_lossy(&rel).contains("evil"),
            "{:?} was written",
            String::from_utf8_lossy(&rel)
        );
    }
    err
}

/// Builds a crafted payload given the test's temporary directory.
type PayloadIn = Box<dyn Fn(&Path) -> Vec<u8>>;

#[test]
fn path_traversal_entries_are_refused() {
    let cases: Vec<(&str, PayloadIn)> = vec![
        (
            "parent",
            Box::new(|_| CraftedTar::new().file(b"../evil", b"x").finish()),
        ),
        (
            "nested parent",
            Box::new(|_| CraftedTar::new().file(b"a/../../evil", b"x").finish()),
        ),
        (
            "absolute",
            Box::new(|tmp| {
                let abs = tmp.join("evil-absolute");
                CraftedTar::new()
                    .file(abs.to_str().unwrap().as_bytes(), b"x")
                    .finish()
            }),
        ),
        (
            "long name",
            Box::new(|_| {
                let mut long = b"../".repeat(40);
                long.extend_from_slice(b"evil");
                let mut header = Header::new_gnu();
                header.as_old_mut().name[..13].copy_from_slice(b"././@LongLink");
                header.set_entry_type(EntryType::GNULongName);
                header.set_size(long.len() as u64 + 1);
                header.set_cksum();
                let mut tar = CraftedTar(header.as_bytes().to_vec());
                tar.0.extend_from_slice(&long);
                tar.0.push(0);
                let pad = (512 - tar.0.len() % 512) % 512;
                tar.0.extend(std::iter::repeat_n(0u8, pad));
                tar.file(b"harmless", b"x").finish()
            }),
        ),
    ];
    for (name, payload) in cases {
        let tmp = tempfile::tempdir().unwrap();
        let err = assert_refused(payload(tmp.path()), tmp.path());
        assert!(
            matches!(err, UnpackError::UnsafePath { .. }),
            "{name}: {err:?}"
        );
    }
}

#[test]
fn nothing_is_written_through_a_symlink() {
    let tmp = tempfile::tempdir().unwrap();
    let outside = tmp.path().join("outside");
    fs::create_dir(&outside).unwrap();
    // A symlink to a directory outside, then a file "inside" it.
    let payload = CraftedTar::new()
        .entry(
            b"link",
            EntryType::Symlink,
            b"",
            outside.to_str().unwrap().as_bytes(),
        )
        .file(b"link/evil", b"x")
        .finish();
    let err = assert_refused(payload, tmp.path());
    assert!(matches!(err, UnpackError::UnsafePath { .. }), "{err:?}");

    // The same with a relative target.
    let tmp = tempfile::tempdir().unwrap();
    let payload = CraftedTar::new()
        .entry(b"up", EntryType::Symlink, b"", b"..")
        .file(b"up/evil", b"x")
        .finish();
    let err = assert_refused(payload, tmp.path());
    assert!(matches!(err, UnpackError::UnsafePath { .. }), "{err:?}");
}

#[test]
fn an_existing_symlink_in_dest_is_replaced_not_followed() {
    let tmp = tempfile::tempdir().unwrap();
    let victim = tmp.path().join("victim.txt");
    fs::write(&victim, b"keep").unwrap();
    let dest = tmp.path().join("dest");
    fs::create_dir(&dest).unwrap();
    symlink(&victim, dest.join("f")).unwrap();
    let payload = CraftedTar::new().file(b"f", b"new content").finish();
    let (manifest, chunks) = single_chunk_bundle(&payload, PayloadLayout::Tree);
    unpack(&manifest, &chunks, &dest, &mut |_| {}).unwrap();
    assert_eq!(fs::read(&victim).unwrap(), b"keep");
    assert!(fs::symlink_metadata(dest.join("f")).unwrap().is_file());
    assert_eq!(fs::read(dest.join("f")).unwrap(), b"new content");
}

#[test]
fn entry_types_and_pax_keys_the_packer_never_writes_are_refused() {
    // A pax `path` would rename the next entry behind the header's back.
    let tmp = tempfile::tempdir().unwrap();
    let pax = CraftedTar::new()
        .entry(b"pax", EntryType::XHeader, b"19 path=../../evil\n", b"")
        .file(b"harmless", b"x")
        .finish();
    let err = assert_refused(pax, tmp.path());
    assert!(
        matches!(err, UnpackError::Malformed(ref m) if m.contains("not one this packer writes")),
        "{err:?}"
    );

    // A pax `size` would make this reader and others disagree on where entries start.
    let tmp = tempfile::tempdir().unwrap();
    let pax = CraftedTar::new()
        .entry(b"pax", EntryType::XHeader, b"12 size=512\n", b"")
        .file(b"evil", b"x")
        .finish();
    let err = assert_refused(pax, tmp.path());
    assert!(matches!(err, UnpackError::Malformed(_)), "{err:?}");

    let tmp = tempfile::tempdir().unwrap();
    let global = CraftedTar::new()
        .entry(b"global", EntryType::XGlobalHeader, b"13 mtime=1.5\n", b"")
        .file(b"evil", b"x")
        .finish();
    let err = assert_refused(global, tmp.path());
    assert!(
        matches!(
            err,
            UnpackError::UnsupportedEntry {
                entry_type: 'g',
                ..
            }
        ),
        "{err:?}"
    );

    // A file standing for the destination itself.
    let tmp = tempfile::tempdir().unwrap();
    let root_file = CraftedTar::new().file(b"./", b"x").finish();
    let err = assert_refused(root_file, tmp.path());
    assert!(matches!(err, UnpackError::UnsafePath { .. }), "{err:?}");
}

#[test]
fn hard_links_to_anything_but_an_earlier_file_of_the_stream_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let outside = tmp.path().join("outside");
    fs::write(&outside, b"secret").unwrap();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "absolute",
            CraftedTar::new()
                .entry(
                    b"evil",
                    EntryType::Link,
                    b"",
                    outside.to_str().unwrap().as_bytes(),
                )
                .finish(),
        ),
        (
            "parent",
            CraftedTar::new()
                .entry(b"evil", EntryType::Link, b"", b"../outside")
                .finish(),
        ),
        (
            // dest/planted is a hard link to a file outside, planted before the unpack.
            "already in dest",
            CraftedTar::new()
                .entry(b"evil", EntryType::Link, b"", b"planted")
                .finish(),
        ),
        (
            "not yet unpacked",
            CraftedTar::new()
                .entry(b"evil", EntryType::Link, b"", b"later")
                .file(b"later", b"x")
                .finish(),
        ),
        (
            "a directory",
            CraftedTar::new()
                .entry(b"dir/", EntryType::Directory, b"", b"")
                .entry(b"evil", EntryType::Link, b"", b"dir")
                .finish(),
        ),
        (
            "itself",
            CraftedTar::new()
                .entry(b"evil", EntryType::Link, b"", b"evil")
                .finish(),
        ),
    ];
    for (name, payload) in cases {
        let case_dir = tempfile::tempdir().unwrap();
        let dest = case_dir.path().join("dest");
        fs::create_dir(&dest).unwrap();
        fs::hard_link(&outside, dest.join("planted")).unwrap();
        let (manifest, chunks) = single_chunk_bundle(&payload, PayloadLayout::Tree);
        let err = unpack(&manifest, &chunks, &dest, &mut |_| {}).expect_err(name);
        assert!(
            matches!(err, UnpackError::UnsafePath { .. }),
            "{name}: {err:?}"
        );
        assert!(!dest.join("evil").exists(), "{name}: the link was made");
    }
    assert_eq!(fs::read(&outside).unwrap(), b"secret");
}

#[test]
fn an_oversized_pax_header_is_refused_before_it_is_read() {
    let tmp = tempfile::tempdir().unwrap();
    let mut header = Header::new_ustar();
    header.set_entry_type(EntryType::XHeader);
    header.set_size(1 << 30);
    header.set_cksum();
    let mut payload = header.as_bytes().to_vec();
    payload.extend_from_slice(&[b'1'; 4096]);
    let (manifest, chunks) = single_chunk_bundle(&payload, PayloadLayout::Tree);
    let err = unpack(&manifest, &chunks, &tmp.path().join("dest"), &mut |_| {}).unwrap_err();
    assert!(
        matches!(err, UnpackError::Malformed(ref m) if m.contains("pax header")),
        "{err:?}"
    );
}

#[test]
fn an_oversized_long_name_is_refused_before_it_is_read() {
    let tmp = tempfile::tempdir().unwrap();
    let mut header = Header::new_gnu();
    header.as_old_mut().name[..13].copy_from_slice(b"././@LongLink");
    header.set_entry_type(EntryType::GNULongName);
    header.set_size(1 << 30);
    header.set_cksum();
    let mut payload = header.as_bytes().to_vec();
    payload.extend_from_slice(&[b'a'; 4096]);
    let (manifest, chunks) = single_chunk_bundle(&payload, PayloadLayout::Tree);
    let err = unpack(&manifest, &chunks, &tmp.path().join("dest"), &mut |_| {}).unwrap_err();
    assert!(
        matches!(err, UnpackError::Malformed(ref m) if m.contains("long name")),
        "{err:?}"
    );
}

#[test]
fn an_image_name_with_a_path_is_refused() {
    for name in ["../evil", "a/evil", "..", ""] {
        let tmp = tempfile::tempdir().unwrap();
        let (manifest, chunks) = single_chunk_bundle(
            b"image bytes",
            PayloadLayout::Image {
                file_name: name.into(),
            },
        );
        let err = unpack(&manifest, &chunks, &tmp.path().join("dest"), &mut |_| {}).unwrap_err();
        assert!(
            matches!(err, UnpackError::UnsafePath { .. }),
            "{name:?}: {err:?}"
        );
        assert!(!tmp.path().join("evil").exists());
    }
}
