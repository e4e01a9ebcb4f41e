//! Packing holds a few chunks in memory, not the input. Alone in its own test binary, so no
//! other test's allocations count towards the measured peak.

mod bundle_common;

use std::fs::{self, File};
use std::io::Write;

use bundle_common::*;
use proto::chunking::ChunkerParams;
use proto::hash::BlobHash;
use proto::pack::{pack_path, ChunkSink};
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};

/// Input size, in bytes: far above what packing may hold.
const INPUT_BYTES: usize = 192 << 20;
/// Most the resident set may grow while packing, in bytes: chunker buffer (2 × 2 MiB), read
/// buffer (1 MiB), 2 threads × 2 chunks in flight × (raw + compressed), zstd contexts, slack.
const PACK_PEAK_BYTES_LIMIT: u64 = 48 << 20;

/// Counts what it is given and keeps nothing, like a store that writes to disk.
#[derive(Default)]
struct CountingSink {
    chunks: u64,
    bytes: u64,
}

impl ChunkSink for CountingSink {
    type Error = std::convert::Infallible;

    fn put_chunk(&mut self, _hash: BlobHash, stored: &[u8]) -> Result<(), Self::Error> {
        self.chunks += 1;
        self.bytes += stored.len() as u64;
        Ok(())
    }
}

/// A field of /proc/self/status, in bytes.
fn status_bytes(field: &str) -> u64 {
    let status = fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    let line = status
        .lines()
        .find(|l| l.starts_with(field))
        .unwrap_or_else(|| panic!("{field} not in /proc/self/status"));
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("a number of kB");
    kib * 1024
}

#[test]
fn packing_memory_is_bounded_by_chunk_size_not_input_size() {
    let src = tempfile::tempdir().unwrap();
    let image = src.path().join("disk.img");
    let mut file = File::create(&image).unwrap();
    let mut rng = StdRng::seed_from_u64(5);
    let mut block = vec![0u8; 1 << 20];
    for _ in 0..INPUT_BYTES / block.len() {
        rng.fill_bytes(&mut block);
        file.write_all(&block).unwrap();
    }
    drop(file);
    drop(block);

    // Writing 5 to clear_refs resets the peak resident set (VmHWM) to the current one.
    fs::write("/proc/self/clear_refs", "5").expect("reset peak RSS");
    let baseline = status_bytes("VmRSS:");
    let mut options = options(ChunkerParams::DEFAULT);
    options.compress_threads = 2;
    let mut sink = CountingSink::default();
    let packed = pack_path(&image, &options, &test_key(), &mut sink, &mut |_| {}).unwrap();
    let growth = status_bytes("VmHWM:").saturating_sub(baseline);
    println!(
        "packing {} MiB in {} chunks raised the peak RSS by {:.1} MiB",
        INPUT_BYTES >> 20,
        sink.chunks,
        growth as f64 / (1 << 20) as f64
    );
    assert_eq!(packed.manifest.total_raw_bytes, INPUT_BYTES as u64);
    assert!(
        growth < PACK_PEAK_BYTES_LIMIT,
        "packing raised the peak RSS by {growth} bytes"
    );
}
