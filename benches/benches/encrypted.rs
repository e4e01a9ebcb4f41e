//! Encrypted against clear bundles, side by side in one run, on a generated 64 MiB tree (half
//! text-like, half incompressible) with chunks held in memory: pack throughput, unpack
//! throughput (every chunk verified, opened when encrypted, decompressed and written to a
//! temporary directory), stored size, and the new stored bytes of a version 2 with 1% of the
//! files edited (what would cross the WAN).
//!
//! `cargo bench -p benches --bench encrypted` (built with the workspace's one command line,
//! see the README). Prints a table; the verdict is a figure of this machine, not an assertion.

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use proto::hash::BlobHash;
use proto::keys::{ContentKey, KeyGeneration, KeyRing};
use proto::manifest::{generate_signing_key, BundleKind};
use proto::pack::{pack_path, unpack_with, MemChunks, PackOptions, PackedBundle};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

/// Content of the generated tree, in bytes.
const TREE_BYTES: u64 = 64 << 20;
/// Runs of each measurement; the best is reported.
const RUNS: usize = 3;
/// Share of files edited in version 2.
const CHANGED_FRACTION: f64 = 0.01;

fn text_bytes(rng: &mut StdRng, words: &[Vec<u8>], len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 16);
    while out.len() < len {
        let r: u32 = rng.gen();
        let u = (r >> 16) as usize;
        out.extend_from_slice(&words[((u * u) >> 20) % words.len()]);
        out.push(if r & 0xf == 0 { b'\n' } else { b' ' });
    }
    out.truncate(len);
    out
}

/// Writes the tree; returns its files and the content bytes written.
fn generate_tree(root: &Path) -> (Vec<PathBuf>, u64) {
    let mut rng = StdRng::seed_from_u64(64);
    let words: Vec<Vec<u8>> = (0..4096)
        .map(|_| {
            let len = rng.gen_range(2..12);
            (0..len).map(|_| rng.gen_range(b'a'..=b'z')).collect()
        })
        .collect();
    let mut files = Vec::new();
    let mut written = 0u64;
    while written < TREE_BYTES {
        let len = (1024.0 * 1024f64.powf(rng.gen::<f64>())) as usize;
        let bytes = if files.len() % 2 == 0 {
            text_bytes(&mut rng, &words, len)
        } else {
            let mut b = vec![0u8; len];
            rng.fill_bytes(&mut b);
            b
        };
        let dir = root.join(format!("d{}", files.len() % 16));
        fs::create_dir_all(&dir).expect("create dir");
        let path = dir.join(format!("file{:05}", files.len()));
        fs::write(&path, &bytes).expect("write file");
        files.push(path);
        written += len as u64;
    }
    (files, written)
}

/// Copies `v1` to `v2` and edits `CHANGED_FRACTION` of its files (16 bytes in the middle).
fn version_two(v1: &Path, files: &[PathBuf], v2: &Path) {
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(v1)
        .arg(v2)
        .status()
        .expect("cp");
    assert!(status.success());
    let mut rng = StdRng::seed_from_u64(2);
    let changes = (files.len() as f64 * CHANGED_FRACTION).ceil() as usize;
    for _ in 0..changes {
        let file = &files[rng.gen_range(0..files.len())];
        let path = v2.join(file.strip_prefix(v1).expect("under v1"));
        let mut bytes = fs::read(&path).expect("read");
        let at = bytes.len() / 2;
        let end = (at + 16).min(bytes.len());
        rng.fill_bytes(&mut bytes[at..end]);
        fs::write(&path, &bytes).expect("write");
    }
}

struct Figures {
    pack_mib_s: f64,
    unpack_mib_s: f64,
    stored_bytes: u64,
    v2_new_bytes: u64,
}

fn measure(
    v1: &Path,
    v2: &Path,
    content_bytes: u64,
    options: &PackOptions,
    keys: &KeyRing,
) -> Figures {
    let key = generate_signing_key();
    let mib = content_bytes as f64 / (1 << 20) as f64;
    let mut best_pack = f64::MAX;
    let mut packed: Option<(PackedBundle, MemChunks)> = None;
    for _ in 0..RUNS {
        let mut chunks = MemChunks::new();
        let started = Instant::now();
        let bundle = pack_path(v1, options, &key, &mut chunks, &mut |_| {}).expect("pack");
        best_pack = best_pack.min(started.elapsed().as_secs_f64());
        packed = Some((bundle, chunks));
    }
    let (bundle, chunks) = packed.expect("packed");
    let mut best_unpack = f64::MAX;
    for _ in 0..RUNS {
        let dest = tempfile::tempdir().expect("tempdir");
        let started = Instant::now();
        unpack_with(
            &bundle.manifest,
            keys,
            &chunks,
            &dest.path().join("out"),
            &mut |_| {},
        )
        .expect("unpack");
        best_unpack = best_unpack.min(started.elapsed().as_secs_f64());
    }
    let mut chunks2 = MemChunks::new();
    let bundle2 = pack_path(v2, options, &key, &mut chunks2, &mut |_| {}).expect("pack v2");
    let old: HashSet<BlobHash> = bundle.manifest.chunks.iter().map(|c| c.hash).collect();
    let mut seen = HashSet::new();
    let v2_new_bytes = bundle2
        .manifest
        .chunks
        .iter()
        .filter(|c| seen.insert(c.hash) && !old.contains(&c.hash))
        .map(|c| c.stored_bytes)
        .sum::<u64>()
        + bundle2.signed.to_bytes().len() as u64;
    Figures {
        pack_mib_s: mib / best_pack,
        unpack_mib_s: mib / best_unpack,
        stored_bytes: chunks.stored_bytes() + bundle.signed.to_bytes().len() as u64,
        v2_new_bytes,
    }
}

fn main() {
    let dir = tempfile::tempdir().expect("tempdir");
    let v1 = dir.path().join("v1");
    let v2 = dir.path().join("v2");
    let (files, content_bytes) = generate_tree(&v1);
    version_two(&v1, &files, &v2);
    let clear_options = PackOptions::new("bench", "1", BundleKind::Package);
    let mut encrypted_options = clear_options.clone();
    let generation = KeyGeneration(1);
    let key = ContentKey::generate();
    encrypted_options.encrypt = Some((generation, key.clone()));
    let mut keys = KeyRing::new();
    keys.insert(generation, key).expect("ring");

    let clear = measure(&v1, &v2, content_bytes, &clear_options, &KeyRing::new());
    let encrypted = measure(&v1, &v2, content_bytes, &encrypted_options, &keys);
    println!(
        "encrypted vs clear bundles, {} MiB tree, {} files, best of {RUNS}",
        content_bytes >> 20,
        files.len()
    );
    println!("| measure | clear | encrypted | encrypted / clear |");
    println!("|---|---|---|---|");
    println!(
        "| pack (MiB/s of content) | {:.0} | {:.0} | {:.2}x |",
        clear.pack_mib_s,
        encrypted.pack_mib_s,
        encrypted.pack_mib_s / clear.pack_mib_s
    );
    println!(
        "| unpack (MiB/s of content) | {:.0} | {:.0} | {:.2}x |",
        clear.unpack_mib_s,
        encrypted.unpack_mib_s,
        encrypted.unpack_mib_s / clear.unpack_mib_s
    );
    println!(
        "| stored bytes (chunks + manifest) | {} | {} | +{:.3}% |",
        clear.stored_bytes,
        encrypted.stored_bytes,
        (encrypted.stored_bytes as f64 / clear.stored_bytes as f64 - 1.0) * 100.0
    );
    println!(
        "| v2 (1% of files edited): new stored bytes | {} | {} | {:.3}x |",
        clear.v2_new_bytes,
        encrypted.v2_new_bytes,
        encrypted.v2_new_bytes as f64 / clear.v2_new_bytes.max(1) as f64
    );
}
