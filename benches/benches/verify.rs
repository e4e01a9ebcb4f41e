//! Verified streaming throughput: outboard computation, range encoding and sans-IO verified
//! decoding, each beside plain `blake3::hash` of the same bytes so the decode/hash ratio can be
//! read off one run. Target: verified decode at >= 80 % of plain hashing on one core.
//!
//! `cargo bench --release -p benches --bench verify -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use proto::verify::{
    compute_outboard, encode_ranges, encoded_len, DecodeItem, Decoder, GroupRanges,
};

/// Data sizes measured, with their labels.
const SIZES: [(&str, usize); 2] = [("16MiB", 16 << 20), ("256MiB", 256 << 20)];

/// Samples for the large size (criterion's minimum), to keep the run short.
const LARGE_SAMPLES: usize = 10;

fn data(len: usize) -> Vec<u8> {
    let mut state = 0x1234_5678_9abc_def1u64;
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

/// Decodes a whole in-memory stream the way a network task would, returning the verified bytes.
fn decode(stream: &[u8], decoder: &mut Decoder) -> u64 {
    let mut at = 0;
    let mut verified = 0u64;
    while let Some(needed) = decoder.needed() {
        let item = decoder
            .push(&stream[at..at + needed])
            .expect("bench stream verifies");
        if let DecodeItem::Group(group) = item {
            verified += black_box(group.data()).len() as u64;
        }
        at += needed;
    }
    verified
}

fn verify(c: &mut Criterion) {
    for (label, len) in SIZES {
        let data = data(len);
        let outboard = compute_outboard(&data);
        let all = GroupRanges::all();
        let stream_len = encoded_len(len as u64, &all) as usize;
        let mut stream = Vec::with_capacity(stream_len);
        encode_ranges(&data, &outboard.data, outboard.hash, &all, &mut stream)
            .expect("encode bench data");

        let mut group = c.benchmark_group(format!("verify_{label}"));
        group.throughput(Throughput::Bytes(len as u64));
        if len > 64 << 20 {
            group.sample_size(LARGE_SAMPLES);
        }
        group.bench_function("blake3_hash", |b| b.iter(|| blake3::hash(black_box(&data))));
        group.bench_function("outboard", |b| {
            b.iter(|| compute_outboard(black_box(&data)))
        });
        group.bench_function("encode", |b| {
            let mut out = Vec::with_capacity(stream_len);
            b.iter(|| {
                out.clear();
                encode_ranges(&data, &outboard.data, outboard.hash, &all, &mut out)
                    .expect("encode bench data")
            })
        });
        group.bench_function("decode", |b| {
            b.iter(|| {
                let mut decoder = Decoder::new(outboard.hash, all.clone());
                let verified = decode(&stream, &mut decoder);
                assert_eq!(verified, len as u64);
            })
        });
        group.finish();
    }
}

criterion_group!(benches, verify);
criterion_main!(benches);
