//! Bundle packing and unpacking throughput on a generated 64 MiB tree, chunks held in memory.
//!
//! `cargo bench --release -p benches --bench bundle -- --warm-up-time 1 --measurement-time 5`

use std::fs;
use std::io;
use std::path::Path;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use proto::manifest::{generate_signing_key, BundleKind};
use proto::pack::{pack_path, unpack, unpack_to_writer, MemChunks, PackOptions};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

/// Content of the generated tree, in bytes.
const TREE_BYTES: u64 = 64 << 20;
/// Large files in it; small files (1 KiB to 1 MiB, log-uniform) make up about a third.
const LARGE_FILES: u64 = 4;

/// Words of 2–11 letters, picked with a skew: compresses about 3:1 like text and code.
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

/// Half text-like, half incompressible files; returns the content bytes written.
fn generate_tree(root: &Path) -> u64 {
    let mut rng = StdRng::seed_from_u64(64);
    let words: Vec<Vec<u8>> = (0..4096)
        .map(|_| {
            let len = rng.gen_range(2..12);
            (0..len).map(|_| rng.gen_range(b'a'..=b'z')).collect()
        })
        .collect();
    let mut written = 0u64;
    let mut index = 0;
    let mut write = |rng: &mut StdRng, dir: &str, len: usize| {
        let bytes = if index % 2 == 0 {
            text_bytes(rng, &words, len)
        } else {
            let mut b = vec![0u8; len];
            rng.fill_bytes(&mut b);
            b
        };
        let dir = root.join(dir);
        fs::create_dir_all(&dir).expect("create dir");
        fs::write(dir.join(format!("file{index:05}")), &bytes).expect("write file");
        index += 1;
        len as u64
    };
    while written < TREE_BYTES / 3 {
        let len = (1024.0 * 1024f64.powf(rng.gen::<f64>())) as usize;
        let dir = format!("d{}", len % 16);
        written += write(&mut rng, &dir, len);
    }
    let large = ((TREE_BYTES - written) / LARGE_FILES) as usize;
    for _ in 0..LARGE_FILES {
        written += write(&mut rng, "large", large);
    }
    written
}

fn bundle(c: &mut Criterion) {
    let src = tempfile::tempdir().expect("tempdir");
    let content_bytes = generate_tree(src.path());
    let key = generate_signing_key();
    let options = PackOptions::new("bench", "1", BundleKind::Package);

    let mut group = c.benchmark_group("bundle");
    group.sample_size(10);
    group.throughput(Throughput::Bytes(content_bytes));

    for level in [1, 3, 9] {
        let mut options = options.clone();
        options.zstd_level = level;
        let mut chunks = MemChunks::new();
        let packed = pack_path(src.path(), &options, &key, &mut chunks, &mut |_| {}).expect("pack");
        println!(
            "zstd level {level}: {} chunks, stored {:.1} MB of {:.1} MB ({:.0}%)",
            packed.manifest.chunks.len(),
            packed.manifest.total_stored_bytes as f64 / 1e6,
            packed.manifest.total_raw_bytes as f64 / 1e6,
            100.0 * packed.manifest.total_stored_bytes as f64
                / packed.manifest.total_raw_bytes as f64
        );
        group.bench_function(format!("pack_64MiB_tree_zstd{level}"), |b| {
            b.iter(|| {
                let mut chunks = MemChunks::new();
                pack_path(src.path(), &options, &key, &mut chunks, &mut |_| {}).expect("pack")
            })
        });
    }

    let mut chunks = MemChunks::new();
    let packed = pack_path(src.path(), &options, &key, &mut chunks, &mut |_| {}).expect("pack");
    let out = tempfile::tempdir().expect("tempdir");
    group.bench_function("unpack_64MiB_tree", |b| {
        b.iter_batched(
            || tempfile::tempdir_in(out.path()).expect("tempdir"),
            |dest| {
                unpack(&packed.manifest, &chunks, dest.path(), &mut |_| {}).expect("unpack");
                dest // Dropped (deleted) outside the timing.
            },
            BatchSize::PerIteration,
        )
    });
    group.bench_function("verify_decompress_64MiB", |b| {
        b.iter(|| {
            unpack_to_writer(&packed.manifest, &chunks, &mut io::sink(), &mut |_| {})
                .expect("verify")
        })
    });
    group.finish();
}

criterion_group!(benches, bundle);
criterion_main!(benches);
