//! Encrypted bundles: what a holder of the chunks and manifest without the key sees (no
//! plaintext), what an edge with the key restores (the tree, byte for byte), and what it refuses
//! (a missing generation, a wrong key, a chunk sealed under another generation or for another
//! chunk) with an error naming the generation and nothing written.

mod bundle_common;

use std::collections::HashSet;
use std::fs;
use std::path::Path;

use bundle_common::*;
use proto::chunking::ChunkerParams;
use proto::hash::BlobHash;
use proto::keys::{ContentKey, KeyGeneration, KeyRing};
use proto::manifest::{ChunkRef, Manifest, PayloadLayout, SignedManifest};
use proto::pack::{unpack, unpack_with, MemChunks, PackOptions, UnpackError};
use proto::seal::{self, SealError, SealedMeta};

const MARKERS: [&[u8]; 3] = [
    b"PLANTED-MARKER-root-password-hunter2",
    b"PLANTED-MARKER-BEGIN OPENSSH PRIVATE KEY",
    b"PLANTED-MARKER-wifi-psk-correct-horse",
];

fn key(byte: u8) -> ContentKey {
    ContentKey::from_bytes([byte; 32])
}

fn ring(entries: &[(u32, u8)]) -> KeyRing {
    let mut ring = KeyRing::new();
    for (generation, byte) in entries {
        ring.insert(KeyGeneration(*generation), key(*byte))
            .expect("insert");
    }
    ring
}

/// A tree of text and random files with the markers planted, some repeated.
fn tree_with_markers(root: &Path) {
    let files = mixed_tree(21, 60, 3 << 20, 2);
    write_files(root, &files);
    fs::create_dir_all(root.join("etc/ssh")).expect("mkdir");
    for (i, marker) in MARKERS.iter().enumerate() {
        let mut text = b"# configuration\n".repeat(40);
        text.extend_from_slice(marker);
        text.extend_from_slice(b"\n");
        fs::write(root.join(format!("etc/ssh/secret{i}.conf")), &text).expect("write");
    }
    fs::write(root.join("PLANTED-MARKER-filename.txt"), b"x").expect("write");
}

fn encrypted_options(generation: u32, byte: u8) -> PackOptions {
    let mut options = options(ChunkerParams::DEFAULT);
    options.encrypt = Some((KeyGeneration(generation), key(byte)));
    options
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn assert_no_marker(what: &str, bytes: &[u8]) {
    for marker in MARKERS.iter().chain([&b"PLANTED-MARKER"[..]].iter()) {
        assert!(
            !contains(bytes, marker),
            "{what} holds the plaintext marker {:?}",
            String::from_utf8_lossy(marker)
        );
    }
}

#[test]
fn an_encrypted_bundle_shows_no_plaintext_and_unpacks_byte_identical_with_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("src");
    tree_with_markers(&src);

    // The clear bundle's chunks decompress to the markers, so the search below can find them.
    let (_, clear_chunks) = pack_mem(&src, &options(ChunkerParams::DEFAULT));
    let mut found = Vec::new();
    for hash in clear_chunks.hashes() {
        found.extend(zstd::decode_all(clear_chunks.get(hash).expect("held")).expect("zstd"));
    }
    assert!(
        contains(&found, MARKERS[0]),
        "the search must be able to find a marker"
    );
    let clear = pack_mem(&src, &options(ChunkerParams::DEFAULT)).0;

    let (packed, chunks) = pack_mem(&src, &encrypted_options(1, 1));
    assert_eq!(
        packed.manifest.format,
        proto::manifest::SEALED_MANIFEST_FORMAT
    );
    assert_eq!(packed.manifest.total_raw_bytes, 0, "raw sizes are sealed");
    assert_no_marker("the signed manifest", &packed.signed.to_bytes());
    for hash in chunks.hashes() {
        let bytes = chunks.get(hash).expect("held");
        assert_eq!(
            BlobHash::of(bytes),
            *hash,
            "content addresses cover the ciphertext"
        );
        assert_no_marker(&format!("chunk {hash}"), bytes);
        if let Ok(inflated) = zstd::decode_all(bytes) {
            assert_no_marker(&format!("chunk {hash} decompressed"), &inflated);
        }
    }
    // Convergent within one key: packing again gives the same bundle.
    let (again, _) = pack_mem(&src, &encrypted_options(1, 1));
    assert_eq!(again.id, packed.id);
    // Overhead: one 16-byte tag per chunk, plus the sealed metadata.
    let overhead =
        packed.manifest.total_stored_bytes as f64 / clear.manifest.total_stored_bytes as f64 - 1.0;
    assert!(
        overhead < 0.01,
        "stored bytes grew by {:.3}%",
        overhead * 100.0
    );

    let out = dir.path().join("out");
    let stats = unpack_with(
        &packed.manifest,
        &ring(&[(1, 1)]),
        &chunks,
        &out,
        &mut |_| {},
    )
    .expect("unpack with the key");
    assert!(stats.raw_bytes > 0);
    assert_same_entries(&snapshot(&src), &snapshot(&out));
    for i in 0..MARKERS.len() {
        let rel = format!("etc/ssh/secret{i}.conf");
        assert_eq!(
            fs::read(src.join(&rel)).expect("read"),
            fs::read(out.join(&rel)).expect("read")
        );
    }
}

#[test]
fn an_edge_without_the_generation_or_with_a_wrong_key_fails_naming_it_and_writes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("src");
    tree_with_markers(&src);
    let (packed, chunks) = pack_mem(&src, &encrypted_options(3, 1));

    let cases = [
        ("no keys at all", KeyRing::new()),
        ("other generations only", ring(&[(1, 1), (2, 1)])),
    ];
    for (what, keys) in cases {
        let dest = dir.path().join(format!("slot-{}", what.replace(' ', "-")));
        let error =
            unpack_with(&packed.manifest, &keys, &chunks, &dest, &mut |_| {}).expect_err(what);
        assert!(matches!(error, UnpackError::Key(_)), "{what}: {error}");
        let text = error.to_string();
        assert!(text.contains("key generation 3"), "{what}: {text}");
        assert!(text.contains("nothing was written"), "{what}: {text}");
        assert!(!dest.exists(), "{what}: the destination was created");
    }
    // A clear-only caller gets the same clear error.
    let dest = dir.path().join("plain-unpack");
    let error = unpack(&packed.manifest, &chunks, &dest, &mut |_| {}).expect_err("no ring");
    assert!(error.to_string().contains("key generation 3"), "{error}");
    assert!(!dest.exists());

    // A key of the right generation that is not the publisher's.
    let dest = dir.path().join("wrong-key");
    let error = unpack_with(
        &packed.manifest,
        &ring(&[(3, 9)]),
        &chunks,
        &dest,
        &mut |_| {},
    )
    .expect_err("wrong key");
    assert!(
        matches!(
            error,
            UnpackError::Sealed(SealError::MetaDoesNotOpen { .. })
        ),
        "{error}"
    );
    assert!(error.to_string().contains("key generation 3"), "{error}");
    assert!(!dest.exists());
}

/// Re-signs `manifest` with the chunk list `clear` and sealed metadata `meta` under `key`, as a
/// publisher holding generation `generation`'s key would.
fn resign(
    manifest: &Manifest,
    generation: u32,
    key_byte: u8,
    clear: Vec<ChunkRef>,
    meta: &SealedMeta,
) -> Manifest {
    let generation = KeyGeneration(generation);
    let sealed = seal::seal_meta(&key(key_byte), generation, meta, &clear).expect("seal meta");
    let mut forged = manifest.clone();
    forged.total_stored_bytes = clear.iter().map(|c| c.stored_bytes).sum();
    forged.chunks = clear;
    forged.layout = PayloadLayout::Sealed {
        generation,
        meta: sealed,
    };
    let signed = forged.sign(&test_key());
    SignedManifest::from_bytes(&signed.to_bytes())
        .expect("decode")
        .verify(&[test_key().verifying_key()])
        .expect("a correctly signed manifest")
}

#[test]
fn a_chunk_sealed_under_another_generation_or_for_another_chunk_is_caught_by_the_edge() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("src");
    tree_with_markers(&src);
    let (gen1, mut chunks) = pack_mem(&src, &encrypted_options(1, 1));
    let (gen2, chunks2) = pack_mem(&src, &encrypted_options(2, 2));
    let keys = ring(&[(1, 1), (2, 2)]);
    let meta1 = proto::pack::unseal(&gen1.manifest, &keys)
        .expect("opens")
        .expect("sealed")
        .meta;

    // Substituting a ciphertext chunk in the clear list without resealing the metadata: the
    // metadata no longer opens (it is bound to the list), before anything is written.
    let mut clear = gen1.manifest.chunks.clone();
    clear[0] = gen2.manifest.chunks[0];
    let mut tampered = gen1.manifest.clone();
    tampered.chunks = clear.clone();
    tampered.total_stored_bytes = clear.iter().map(|c| c.stored_bytes).sum();
    let dest = dir.path().join("meta-bound");
    let error = unpack_with(&tampered, &keys, &chunks, &dest, &mut |_| {}).expect_err("bound");
    assert!(error.to_string().contains("key generation 1"), "{error}");
    assert!(!dest.exists());

    // The same plaintext sealed under generation 2 put in place of generation 1's (the last
    // chunk, so earlier ones are written first), with the metadata sealed and the manifest
    // signed accordingly: the chunk does not open, and what was written is removed.
    for hash in chunks2.hashes() {
        chunks.insert(*hash, chunks2.get(hash).expect("held").to_vec());
    }
    let last = gen1.manifest.chunks.len() - 1;
    assert!(last > 0);
    let mut clear = gen1.manifest.chunks.clone();
    clear[last] = gen2.manifest.chunks[last];
    let confused = resign(&gen1.manifest, 1, 1, clear, &meta1);
    let dest = dir.path().join("generation-confusion");
    fs::create_dir_all(&dest).expect("empty slot");
    let error = unpack_with(&confused, &keys, &chunks, &dest, &mut |_| {}).expect_err("confused");
    match &error {
        UnpackError::Sealed(SealError::ChunkDoesNotOpen { index, .. }) => assert_eq!(*index, last),
        other => panic!("expected a chunk that does not open, got {other}"),
    }
    assert!(error.to_string().contains("key generation 1"), "{error}");
    assert_eq!(
        fs::read_dir(&dest).expect("read").count(),
        0,
        "what earlier chunks wrote was removed"
    );

    // Chunks of this bundle swapped in the ciphertext list but not in the metadata: refused
    // before anything is written.
    let mut swapped = gen1.manifest.chunks.clone();
    swapped.swap(0, last);
    let confused = resign(&gen1.manifest, 1, 1, swapped, &meta1);
    let dest = dir.path().join("chunk-confusion");
    let error = unpack_with(&confused, &keys, &chunks, &dest, &mut |_| {}).expect_err("confused");
    assert!(matches!(error, UnpackError::Sealed(_)), "{error}");
    assert!(error.to_string().contains("key generation 1"), "{error}");
    assert!(!dest.exists());
}

#[test]
fn version_two_with_a_small_change_reuses_as_many_stored_bytes_encrypted_as_clear() {
    let dir = tempfile::tempdir().expect("tempdir");
    let v1_files = mixed_tree(31, 400, 24 << 20, 4);
    let v2_files = next_version(&v1_files, 32, 0.01, 2);
    let (v1, v2) = (dir.path().join("v1"), dir.path().join("v2"));
    write_files(&v1, &v1_files);
    write_files(&v2, &v2_files);
    let new_bytes = |options: &PackOptions| {
        let (a, _) = pack_mem(&v1, options);
        let (b, _) = pack_mem(&v2, options);
        let old: HashSet<BlobHash> = a.manifest.chunks.iter().map(|c| c.hash).collect();
        let mut seen = HashSet::new();
        b.manifest
            .chunks
            .iter()
            .filter(|c| seen.insert(c.hash) && !old.contains(&c.hash))
            .map(|c| c.stored_bytes)
            .sum::<u64>()
    };
    let clear = new_bytes(&options(ChunkerParams::DEFAULT));
    let encrypted = new_bytes(&encrypted_options(1, 1));
    println!("new stored bytes of v2: clear {clear}, encrypted {encrypted}");
    assert!(clear > 0);
    let ratio = encrypted as f64 / clear as f64;
    assert!(
        (0.9..=1.1).contains(&ratio),
        "encrypted v2 needs {encrypted} new bytes, clear {clear}"
    );
}

#[test]
fn an_image_bundle_hides_its_file_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("PLANTED-MARKER-disk.img");
    fs::write(
        &image,
        text_bytes(
            &mut <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(5),
            300_000,
        ),
    )
    .expect("write");
    let mut chunks = MemChunks::new();
    let packed = proto::pack::pack_path(
        &image,
        &encrypted_options(1, 1),
        &test_key(),
        &mut chunks,
        &mut |_| {},
    )
    .expect("pack");
    assert_no_marker("the image's manifest", &packed.signed.to_bytes());
    let out = dir.path().join("out");
    unpack_with(
        &packed.manifest,
        &ring(&[(1, 1)]),
        &chunks,
        &out,
        &mut |_| {},
    )
    .expect("unpack");
    assert_eq!(
        fs::read(out.join("PLANTED-MARKER-disk.img")).expect("read"),
        fs::read(&image).expect("read")
    );
}
