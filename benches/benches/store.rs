//! Blob store throughput: storing a complete blob (hash, outboard, two fsynced files, a synced
//! index write), reading it back (with hash check), and a download through the partial writer.
//!
//! `cargo bench --release -p benches --bench store -- --warm-up-time 1 --measurement-time 3`

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use proto::store::{Store, StoreOptions};
use proto::verify::{compute_outboard, encode_ranges, GroupRanges};
use proto::BlobHash;

/// Blob sizes measured, with their labels.
const SIZES: [(&str, usize); 2] = [("1MiB", 1 << 20), ("4MiB", 4 << 20)];

/// Cache bound for the bench store: puts of fresh blobs keep evicting, so disk use stays flat.
const BENCH_CACHE_LIMIT_BYTES: u64 = 256 << 20;

fn data(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(2).wrapping_add(1);
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// `base` with a counter in its first bytes: a new blob every time, so puts are not deduplicated.
fn variant(base: &[u8], counter: u64) -> Vec<u8> {
    let mut out = base.to_vec();
    out[..8].copy_from_slice(&counter.to_le_bytes());
    out
}

fn store(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let store = Store::open(
        dir.path(),
        StoreOptions {
            cache_limit_bytes: BENCH_CACHE_LIMIT_BYTES,
            ..StoreOptions::default()
        },
    )
    .expect("open bench store");
    let mut counter = 0u64;
    for (label, len) in SIZES {
        let base = data(len, len as u64);
        let mut group = c.benchmark_group(format!("store_{label}"));
        group.throughput(Throughput::Bytes(len as u64));
        group.bench_function("put", |b| {
            b.iter_batched(
                || {
                    counter += 1;
                    variant(&base, counter)
                },
                |blob| store.put_blob(&blob).expect("put"),
                BatchSize::LargeInput,
            )
        });
        let hash = store.put_blob(&base).expect("put");
        group.bench_function("get", |b| {
            b.iter(|| store.get_blob(&hash).expect("get").expect("present"))
        });
        group.bench_function("download", |b| {
            b.iter_batched(
                || {
                    counter += 1;
                    let blob = variant(&base, counter);
                    let outboard = compute_outboard(&blob);
                    let mut stream = Vec::new();
                    encode_ranges(
                        &blob,
                        &outboard.data,
                        outboard.hash,
                        &GroupRanges::all(),
                        &mut stream,
                    )
                    .expect("encode");
                    (BlobHash::of(&blob), stream)
                },
                |(hash, stream)| {
                    let mut writer = store.begin_or_resume(hash, len as u64).expect("begin");
                    writer
                        .write_stream(&stream[..], GroupRanges::all())
                        .expect("write");
                    writer.finish().expect("finish");
                },
                BatchSize::LargeInput,
            )
        });
        group.finish();
    }
}

criterion_group!(benches, store);
criterion_main!(benches);
