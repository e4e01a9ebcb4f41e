//! A new version of a tree shares most of its stored chunks with the old one, and the
//! measurement that chose [`ChunkerParams::DEFAULT`].

mod bundle_common;

use std::collections::HashSet;
use std::path::Path;
use std::time::Instant;

use bundle_common::*;
use proto::chunking::ChunkerParams;
use proto::hash::BlobHash;
use proto::manifest::Manifest;
use proto::pack::PackedBundle;

/// Files in v1.
const V1_FILES: usize = 2_000;
/// Content of v1, in bytes.
const V1_BYTES: usize = 256 << 20;
/// Large files among them (disk images, archives, databases).
const V1_LARGE_FILES: usize = 10;
/// Share of files edited between v1 and v2.
const CHANGED_FRACTION: f64 = 0.01;
/// Files added in v2.
const ADDED_FILES: usize = 10;

/// v1 and v2 written to disk once per test binary.
struct Versions {
    _dir: tempfile::TempDir,
    v1: std::path::PathBuf,
    v2: std::path::PathBuf,
}

fn versions() -> Versions {
    let dir = tempfile::tempdir().unwrap();
    let v1_files = mixed_tree(11, V1_FILES, V1_BYTES, V1_LARGE_FILES);
    let v2_files = next_version(&v1_files, 12, CHANGED_FRACTION, ADDED_FILES);
    let v1 = dir.path().join("v1");
    let v2 = dir.path().join("v2");
    write_files(&v1, &v1_files);
    write_files(&v2, &v2_files);
    Versions { _dir: dir, v1, v2 }
}

/// Share of v2's distinct stored bytes that v1 already holds, and v2's new stored bytes.
fn reuse(v1: &Manifest, v2: &Manifest) -> (f64, u64) {
    let old: HashSet<BlobHash> = v1.chunks.iter().map(|c| c.hash).collect();
    let mut seen = HashSet::new();
    let (mut total, mut reused) = (0u64, 0u64);
    for chunk in &v2.chunks {
        if seen.insert(chunk.hash) {
            total += chunk.stored_bytes;
            if old.contains(&chunk.hash) {
                reused += chunk.stored_bytes;
            }
        }
    }
    (reused as f64 / total.max(1) as f64, total - reused)
}

fn timed_pack(path: &Path, chunker: ChunkerParams) -> (PackedBundle, f64) {
    let started = Instant::now();
    let (packed, _) = pack_mem(path, &options(chunker));
    (packed, started.elapsed().as_secs_f64())
}

#[test]
fn one_percent_of_files_edited_reuses_most_stored_bytes() {
    let versions = versions();
    let (v1, _) = timed_pack(&versions.v1, ChunkerParams::DEFAULT);
    let (v2, _) = timed_pack(&versions.v2, ChunkerParams::DEFAULT);
    let (fraction, new_bytes) = reuse(&v1.manifest, &v2.manifest);
    println!(
        "v2 reuses {:.1}% of its stored bytes from v1; {:.1} MB new of {:.1} MB stored",
        fraction * 100.0,
        new_bytes as f64 / 1e6,
        v2.manifest.total_stored_bytes as f64 / 1e6
    );
    assert!(fraction > 0.70, "only {:.1}% reused", fraction * 100.0);
}

/// Prints, for several chunk sizes, how much of v2 is reused, how many chunks it has, how big
/// its manifest is, and how fast it packs. This table chose [`ChunkerParams::DEFAULT`].
///
/// `cargo test --release -p proto --test bundle_dedup -- --ignored --nocapture`
#[test]
#[ignore = "packs 2 × 256 MiB per setting; about a minute"]
fn measure_chunker_params() {
    let versions = versions();
    println!(
        "| avg      | min/max             | reused | new MB | stored MB | chunks | manifest KB | pack MB/s |"
    );
    println!(
        "|----------|---------------------|--------|--------|-----------|--------|-------------|-----------|"
    );
    for avg_kib in [64usize, 256, 512, 1024, 4096] {
        let params = ChunkerParams::with_avg(avg_kib * 1024);
        let (v1, _) = timed_pack(&versions.v1, params);
        let (v2, secs) = timed_pack(&versions.v2, params);
        let (fraction, new_bytes) = reuse(&v1.manifest, &v2.manifest);
        println!(
            "| {:>4} KiB | {:>5} KiB/{:>5} KiB | {:>5.1}% | {:>6.1} | {:>9.1} | {:>6} | {:>11.1} | {:>9.0} |",
            avg_kib,
            params.min_bytes / 1024,
            params.max_bytes / 1024,
            fraction * 100.0,
            new_bytes as f64 / 1e6,
            v2.manifest.total_stored_bytes as f64 / 1e6,
            v2.manifest.chunks.len(),
            v2.signed.manifest_bytes.len() as f64 / 1e3,
            v2.manifest.total_raw_bytes as f64 / 1e6 / secs,
        );
    }
}
